"""The trainer on spawned gloo ranks: loss falls, the DDP/head gradient convention, accumulation,
exact resume, and configs that fail before launch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist


TINY_DATA = dict(
    num_identities=24, images_per_identity=6, heldout_identities=10, heldout_pairs=20, seed=5
)  # the conftest's tiny_data fixture


class FlatNet(nn.Module):
    """BN-free backbone: per-rank batch statistics cannot differ from the 1-rank batch."""

    def __init__(self, embedding_size=16, input_size=112, dropout=0.0, activation_checkpointing=False, **_):
        super().__init__()
        self.embedding_size, self.input_size = embedding_size, input_size
        self.net = nn.Sequential(
            nn.AvgPool2d(8),
            nn.Flatten(),
            nn.Linear(3 * 14 * 14, 32),
            nn.PReLU(),
            nn.Linear(32, embedding_size),
        )

    def forward(self, x):
        return self.net(x)


# the unfused fp32 head update, for runs compared with one the lean default cannot take (grad_accum > 1)
UNFUSED = {"head.sphereface2.fused_update": False}


def _register_flat():
    from fr_dist.models import registry

    registry._REGISTRY.setdefault("test_flat", FlatNet)


def _overrides(data_dir, out, **extra):
    base = {
        "output_dir": str(out),
        "device": "cpu",
        "data.rec": str(data_dir / "train.rec"),
        "data.num_workers": 0,
        "data.batch_size": 4,
        "model.name": "test_flat",
        "model.embedding_size": 16,
        "train.max_steps": 3,
        "train.lr": 0.05,
        "train.momentum": 0.0,
        "train.weight_decay": 0.0,
        "train.warmup_steps": 0,
        "train.schedule": "poly",
        "train.clip_grad_norm": 0.0,
        "train.log_every": 1,
        "train.tensorboard": False,
        "checkpoint.save_at_end": False,
        "head.sphereface2.r": 16.0,
        "head.partial_fc.s": 16.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(rank, world, overrides, stop_at=None, resume_twice=False):
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    _register_flat()
    cfg = load_config(None, overrides)
    tr = build_trainer(cfg, DistEnv(rank=rank, world_size=world), torch.device("cpu"))
    res = tr.fit(stop_at=stop_at)
    out = dict(
        backbone={k: v.detach().clone() for k, v in tr.bb.bare.state_dict().items()},
        head=tr.head.weight.detach().clone(),
        start=tr.head.class_start,
        losses=[],
        step=tr.step,
        result=res,
    )
    if rank == 0:
        out["metrics"] = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    return out


def _full_head(results):
    return torch.cat([r["head"] for r in sorted(results, key=lambda r: r["start"])])


@pytest.mark.parametrize("head", ["sphereface2", "partial_fc"])
def test_two_rank_training_loss_decreases(tiny_data, tmp_path, head):
    ov = _overrides(
        tiny_data,
        tmp_path / head,
        **{
            "head.name": head,
            "train.max_steps": 30,
            "train.lr": 0.05,
            "data.batch_size": 8,
            "train.momentum": 0.9,
        },
    )
    res = spawn_gloo(_train, 2, args=(ov,), timeout_s=300)
    losses = [m["loss"] for m in res[0]["metrics"]]
    assert len(losses) == 30 and all(
        set(m) >= {"step", "loss", "lr", "images_per_s"} for m in res[0]["metrics"]
    )
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    assert (tmp_path / head / "config.yaml").is_file()


@pytest.mark.parametrize("head", ["sphereface2", "partial_fc"])
def test_two_rank_step_equals_one_rank_step(tiny_data, tmp_path, head):
    """DDP averages backbone grads; the head's reduce-scatter scales by W exactly once."""
    one = spawn_gloo(
        _train,
        1,
        args=(
            _overrides(
                tiny_data, tmp_path / "w1", **{"head.name": head, "data.batch_size": 8, "train.max_steps": 1}
            ),
        ),
    )
    two = spawn_gloo(
        _train,
        2,
        args=(
            _overrides(
                tiny_data, tmp_path / "w2", **{"head.name": head, "data.batch_size": 4, "train.max_steps": 1}
            ),
        ),
    )
    for k, v in one[0]["backbone"].items():
        torch.testing.assert_close(two[0]["backbone"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(two[1]["backbone"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(_full_head(two), _full_head(one), rtol=1e-5, atol=1e-6)


def test_grad_accumulation_2x2_equals_4x1(tiny_data, tmp_path):
    acc = spawn_gloo(
        _train,
        2,
        args=(
            _overrides(
                tiny_data,
                tmp_path / "a",
                **{"data.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 2, **UNFUSED},
            ),
        ),
    )
    big = spawn_gloo(
        _train,
        2,
        args=(
            _overrides(
                tiny_data,
                tmp_path / "b",
                **{"data.batch_size": 4, "train.grad_accum": 1, "train.max_steps": 2, **UNFUSED},
            ),
        ),
    )
    # the same 16 samples per optimizer step; the schedule advanced once per optimizer step
    assert [m["lr"] for m in acc[0]["metrics"]] == [m["lr"] for m in big[0]["metrics"]]
    for k, v in big[0]["backbone"].items():
        torch.testing.assert_close(acc[0]["backbone"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(_full_head(acc), _full_head(big), rtol=1e-4, atol=1e-6)


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    common = {"train.max_steps": 20, "train.momentum": 0.9, "checkpoint.every": 10, "data.batch_size": 4}
    full = spawn_gloo(_train, 2, args=(_overrides(tiny_data, tmp_path / "full", **common),))
    part = _overrides(tiny_data, tmp_path / "part", **common)
    spawn_gloo(_train, 2, args=(part, 10))
    assert (tmp_path / "part" / "checkpoints" / "10" / "meta.json").is_file()
    resumed = spawn_gloo(_train, 2, args=(part + ["checkpoint.resume=auto"],))
    assert resumed[0]["step"] == 20
    for k, v in full[0]["backbone"].items():
        torch.testing.assert_close(resumed[0]["backbone"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    torch.testing.assert_close(_full_head(resumed), _full_head(full), rtol=1e-6, atol=1e-7)
    # reshard: resume the step-10 checkpoint on 1 and on 3 ranks and keep training
    for world in (1, 3):
        other = spawn_gloo(
            _train,
            world,
            args=(
                part
                + [
                    "checkpoint.resume=" + str(tmp_path / "part" / "checkpoints" / "10"),
                    f"output_dir={tmp_path / f'w{world}'}",
                    f"data.batch_size={8 // world if world == 1 else 4}",
                ],
            ),
        )
        assert other[0]["step"] == 20


@pytest.mark.parametrize("head", ["sphereface2", "partial_fc"])
def test_bf16_autocast_and_bf16_classifier_train(tiny_data, tmp_path, head):
    ov = _overrides(
        tiny_data,
        tmp_path,
        **{"head.name": head, "train.amp": "bf16", "head.dtype": "bf16", "train.max_steps": 4},
    )
    res = spawn_gloo(_train, 2, args=(ov,))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in res[0]["metrics"])


def test_nonfinite_steps_are_skipped_then_abort(tiny_data, tmp_path):
    """lr=1e30 blows the weights up: steps are skipped with a warning, then training aborts."""
    ov = _overrides(
        tiny_data, tmp_path, **{"train.lr": 1e30, "train.max_steps": 20, "train.max_nonfinite_steps": 3}
    )
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        spawn_gloo(_train, 2, args=(ov,))
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[0]["step"] == 1


def _train_signalled(rank, world, overrides, at_step):
    """Rank 0 receives SIGUSR1 during step ``at_step`` (as Slurm sends before preemption)."""
    import signal

    from fr_dist.train.trainer import Trainer

    real = Trainer.train_step

    def step(self, batches):
        if self.step + 1 == at_step and rank == 0:
            signal.raise_signal(signal.SIGUSR1)
        return real(self, batches)

    Trainer.train_step = step
    return _train(rank, world, overrides)


def test_stop_signal_checkpoints_and_stops_all_ranks(tiny_data, tmp_path):
    ov = _overrides(tiny_data, tmp_path, **{"train.max_steps": 50, "train.log_every": 4})
    res = spawn_gloo(_train_signalled, 2, args=(ov, 6))
    assert [r["step"] for r in res] == [8, 8]  # both stop at the first log step after the signal
    assert all(r["result"]["preempted"] for r in res)
    assert (tmp_path / "checkpoints" / "8" / "meta.json").is_file()


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fr_dist.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
        ("train.lr=-0.1", "train.lr=-0.1 must be > 0"),
        ("head.partial_fc.sample_rate=0", "sample_rate=0.0 must be in (0, 1]"),
        ("head.partial_fc.sample_rate=1.5", "sample_rate=1.5 must be in (0, 1]"),
        ("head.name=sphereface3", "head.name='sphereface3' is not one of"),
        ("data.num_classes=5", "data.num_classes=5 is smaller than the dataset needs"),
    ],
)
def test_bad_config_fails_before_launch(tiny_data, tmp_path, override, message):
    r = _cli(
        "train",
        "--config",
        "configs/demo_cpu.yaml",
        f"data.rec={tiny_data / 'train.rec'}",
        "data.synthetic.generate=false",
        f"eval.bins=[{tiny_data / 'heldout.bin'}]",
        f"output_dir={tmp_path}",
        override,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_best_checkpoint_survives_resume(tiny_data, tmp_path):
    """RUN/best keeps the best accuracy over a stop + resume (the score travels in the checkpoint)."""
    bins = f"[{tiny_data / 'heldout.bin'}]"
    common = {"eval.bins": bins, "eval.nfolds": 5, "checkpoint.save_at_end": True, "train.max_steps": 4}
    first = spawn_gloo(_train, 1, args=(_overrides(tiny_data, tmp_path, **common), 2))
    second = spawn_gloo(
        _train, 1, args=(_overrides(tiny_data, tmp_path, **common) + ["checkpoint.resume=auto"],)
    )
    accs = [r[0]["result"]["eval"]["heldout"]["accuracy"] for r in (first, second)]
    best = json.loads((tmp_path / "best" / "eval.json").read_text())["heldout"]["accuracy"]
    assert best == max(accs)


def _train_with_scaler(rank, world, overrides, init_scale):
    """Train with a loss-scaling GradScaler (CPU GradScaler: the fp16 + CUDA path's scaling logic)."""
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    _register_flat()
    tr = build_trainer(
        load_config(None, overrides), DistEnv(rank=rank, world_size=world), torch.device("cpu")
    )
    if init_scale:
        tr.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
    tr.fit()
    return dict(
        head={k: v.detach().clone() for k, v in tr.head.state_dict().items()},
        backbone={k: v.detach().clone() for k, v in tr.bb.bare.state_dict().items()},
        scale=float(tr.scaler.get_scale()) if tr.scaler.is_enabled() else None,
        scaler_skips=tr.progress.scaler_skips,
        step=tr.step,
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"head.name": "sphereface2"},
        {"head.name": "partial_fc"},
        {"head.name": "sphereface2", "head.sphereface2.fused_update": "true", "train.momentum": 0.9},
    ],
    ids=["sf2", "pfc", "sf2-fused-update"],
)
def test_loss_scaling_leaves_every_update_unchanged(tiny_data, tmp_path, extra):
    """A GradScaler (x1024) scales the backbone's AND the head's gradients; both optimizers step through
    it (unscaled first), so 3 steps equal the unscaled run. A head optimizer stepped outside the scaler,
    on scaled gradients (checked: it fails all three cases), moves the head ~1024x further."""
    kw = {"train.max_steps": 3, "train.momentum": 0.0, "head.sphereface2.r": 16.0, **extra}
    ref = spawn_gloo(_train_with_scaler, 2, args=(_overrides(tiny_data, tmp_path / "ref", **kw), 0.0))
    scaled = spawn_gloo(_train_with_scaler, 2, args=(_overrides(tiny_data, tmp_path / "s", **kw), 1024.0))
    for r in range(2):
        assert scaled[r]["scale"] == 1024.0  # no step was skipped as non-finite
        for part in ("head", "backbone"):
            for k, v in ref[r][part].items():
                torch.testing.assert_close(scaled[r][part][k], v, rtol=1e-5, atol=1e-7, msg=f"{part}.{k}")


def test_fp16_scaler_warm_up_is_not_a_nonfinite_abort(tiny_data, tmp_path):
    """A GradScaler starting far too high (2^127: every gradient overflows) skips steps while it halves
    the scale, as fp16 training does from 2^16 on its first steps. Those skips are the scaler's to fix:
    fit() completes although they outnumber train.max_nonfinite_steps (it aborted before)."""
    kw = {"train.max_steps": 12, "train.max_nonfinite_steps": 2, "head.name": "sphereface2"}
    out = spawn_gloo(_train_with_scaler, 1, args=(_overrides(tiny_data, tmp_path, **kw), 2.0**127))[0]
    assert out["step"] == 12
    assert out["scaler_skips"] > 2  # more skips than the abort limit
    assert out["scale"] == 2.0 ** (127 - out["scaler_skips"])  # each skip halved the scale once
