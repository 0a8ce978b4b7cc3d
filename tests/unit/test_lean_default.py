"""The lean SphereFace2 update is what a config gets (fr_dist issue 18, item 5): ``fused_update=true`` with bf16
proxies + momentum by default (the planner's capacity headline), and one warning + the unfused fp32 head where
the training settings cannot use it (``fr_dist.train.resume.head_build_kwargs``, the one place deciding it)."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import pytest
import torch

from fr_dist.errors import ConfigError
from fr_dist.heads import create_head
from fr_dist.heads.losses.sphereface2 import SphereFace2Head
from fr_dist.heads.row_optim import ROW_OPTIMIZERS
from fr_dist.plan.config import RECIPE_KEYS, PlanConfig
from fr_dist.testing import spawn_gloo
from fr_dist.train import resume as resume_mod
from fr_dist.train.config_load import load_config
from fr_dist.train.optim import OPTIMIZERS
from fr_dist.train.resume import UNFUSED, head_build_kwargs

ROOT = Path(__file__).resolve().parents[2]
SF2_RECIPES = sorted(glob.glob(str(ROOT / "configs" / "*_sf2*.yaml"))) + [
    str(ROOT / "configs" / "demo_cpu.yaml")
]
LEAN = dict(fused_update=True, proxy_dtype="bf16", master_weights=False)


def _lean(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in LEAN}


# ----------------------------------------------------------------------------- the default


def test_default_config_builds_the_fused_bf16_head():
    cfg = load_config(None, [])
    kwargs, why = head_build_kwargs(cfg)
    assert why is None and _lean(kwargs) == LEAN
    head = create_head(cfg.head.name, embedding_size=8, num_classes=20, **kwargs)
    assert head.fused_update and head.optimizer_contract().row_optimizer
    assert head.weight.dtype == torch.bfloat16 and head.weight_momentum.dtype == torch.bfloat16
    assert not head.weight.requires_grad  # no [n, D] gradient
    # the head constructor keeps its own (unfused fp32) defaults: heads built directly are unchanged
    direct = SphereFace2Head(8, 20)
    assert not direct.fused_update and direct.weight.dtype == torch.float32


def _planned_sf2_keys() -> dict[str, str]:
    """The planner's recipe table, for the lean settings: head.sphereface2 field -> PlanConfig field (the
    table names the section by a placeholder such as ``head.{binary}``: its last part is the field)."""
    out = {
        k.split(".")[-1]: f
        for k, f in RECIPE_KEYS.items()
        if f in ("fused_update", "proxy_dtype", "fp32_master")
    }
    assert set(out) == set(LEAN), out
    return out


def test_planner_headline_settings_are_the_config_default():
    """What `fr-dist plan` counts by default (PlanConfig) is what a config without head keys trains."""
    cfg, plan = load_config(None, []), PlanConfig()
    for field, plan_field in _planned_sf2_keys().items():
        assert getattr(cfg.head.sphereface2, field) == getattr(plan, plan_field), field
    assert cfg.train.optimizer == plan.optimizer == "sgd" and cfg.train.momentum > 0  # SGD momentum


@pytest.mark.parametrize("path", SF2_RECIPES, ids=lambda p: Path(p).stem)
def test_sf2_recipes_run_the_lean_update(path):
    """Every SphereFace2 recipe states the lean settings (the planner's headline); only one whose own
    settings cannot use it falls back, saying why."""
    cfg, plan = load_config(path, [], check_paths=False), PlanConfig()
    for field, plan_field in _planned_sf2_keys().items():
        assert getattr(cfg.head.sphereface2, field) == getattr(plan, plan_field), field
    kwargs, why = head_build_kwargs(cfg)
    if cfg.train.grad_accum == 1:
        assert why is None and _lean(kwargs) == LEAN
    else:
        assert "train.grad_accum=1" in why and _lean(kwargs) == UNFUSED


# ----------------------------------------------------------------------------- the fallback


def test_grad_accum_falls_back_to_unfused_fp32():
    for extra in ([], ["head.sphereface2.fused_update=true", "head.sphereface2.proxy_dtype=bf16"]):
        cfg = load_config(None, ["train.grad_accum=4", *extra])  # no longer refused at load time
        kwargs, why = head_build_kwargs(cfg)
        assert _lean(kwargs) == UNFUSED == dict(fused_update=False, proxy_dtype="fp32", master_weights=False)
        assert why.startswith("head.sphereface2.fused_update=true needs train.grad_accum=1 (got 4)")
        assert "unfused update" in why and "fp32 proxies" in why
        head = create_head(cfg.head.name, embedding_size=8, num_classes=20, **kwargs)
        assert not head.fused_update and head.weight.dtype == torch.float32 and head.weight.requires_grad


def test_optimizer_without_a_row_optimizer_falls_back(monkeypatch):
    """Every train.optimizer choice has a row optimizer today; one without (simulated: AdamW's taken away)
    falls back, naming train.optimizer. Both reasons at once: one message naming both."""
    assert set(OPTIMIZERS) <= set(ROW_OPTIMIZERS)
    monkeypatch.setattr(resume_mod, "ROW_OPTIMIZERS", {"sgd": ROW_OPTIMIZERS["sgd"]})
    kwargs, why = head_build_kwargs(load_config(None, ["train.optimizer=adamw"]))
    assert _lean(kwargs) == UNFUSED
    assert "needs train.optimizer in sgd (got adamw)" in why
    _, why = head_build_kwargs(load_config(None, ["train.optimizer=adamw", "train.grad_accum=2"]))
    assert "train.grad_accum=1 (got 2) and train.optimizer in sgd (got adamw)" in why


def test_fp16_loss_scaling_keeps_the_fused_update():
    """The in-pass update runs in the forward on unscaled gradients (tests/integration/test_trainer.py,
    test_loss_scaling_leaves_every_update_unchanged[sf2-fused-update]); the planner's headline is fp16 too."""
    assert PlanConfig().amp == "fp16"
    kwargs, why = head_build_kwargs(load_config(None, ["train.amp=fp16"]))
    assert why is None and _lean(kwargs) == LEAN
    kwargs, why = head_build_kwargs(load_config(None, ["train.optimizer=adamw"]))
    assert why is None and _lean(kwargs) == LEAN  # the fused AdamW


def test_other_heads_and_unfused_configs_never_warn():
    for ov in (["head.name=partial_fc", "train.grad_accum=2"], ["head.sphereface2.fused_update=false"]):
        assert head_build_kwargs(load_config(None, ov))[1] is None


def test_validator_turning_off_and_refusing():
    off = load_config(None, ["head.sphereface2.fused_update=false"]).head.sphereface2
    assert (off.fused_update, off.proxy_dtype, off.master_weights) == (False, "fp32", False)  # one key
    with pytest.raises(ConfigError, match="proxy_dtype=bf16 needs head.sphereface2.fused_update=true"):
        load_config(None, ["head.sphereface2.fused_update=false", "head.sphereface2.proxy_dtype=bf16"])
    # a recipe states bf16 (configs/heads/sphereface2.yaml): the error says what to add
    recipe = str(ROOT / "configs" / "ms1mv3_r50_sf2.yaml")
    with pytest.raises(ConfigError, match="set head.sphereface2.proxy_dtype=fp32 as well"):
        load_config(recipe, ["head.sphereface2.fused_update=false"], check_paths=False)
    cfg = load_config(
        recipe,
        ["head.sphereface2.fused_update=false", "head.sphereface2.proxy_dtype=fp32"],
        check_paths=False,
    )
    assert head_build_kwargs(cfg) == (cfg.head.head_kwargs(), None)


# ----------------------------------------------------------------------------- training (spawned ranks)


def _overrides(data_dir, out, *extra):
    return [
        f"output_dir={out}",
        "device=cpu",
        f"data.rec={data_dir / 'train.rec'}",
        "data.num_workers=0",
        "data.batch_size=4",
        "model.name=iresnet_tiny",
        "model.embedding_size=16",
        "train.max_steps=2",
        "train.lr=0.05",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.tensorboard=false",
        "checkpoint.save_at_end=false",
        "head.sphereface2.r=16.0",
        *extra,
    ]


def _train(rank, world, runs):
    """Each of ``runs`` (override lists) trained in turn in the same spawned ranks (one spawn: CI time)."""
    from fr_dist.runtime import DistEnv
    from fr_dist.train.run import build_trainer

    out = []
    for overrides in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            env = DistEnv(rank=rank, world_size=world)
            tr = build_trainer(load_config(None, overrides), env, torch.device("cpu"))
        tr.fit()
        out.append(
            dict(
                head={k: v.detach().clone() for k, v in tr.head.state_dict().items()},
                backbone={k: v.detach().clone() for k, v in tr.bb.bare.state_dict().items()},
                fused=tr.head.fused_update,
                dtype=tr.head.weight.dtype,
                warnings=[str(w.message) for w in caught if "fused_update" in str(w.message)],
            )
        )
    return out


def _assert_bitwise(a: dict, b: dict):
    for part in ("head", "backbone"):
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"


@pytest.mark.dist
def test_default_training_equals_explicit_fused_bf16(tiny_data, tmp_path):
    """2 ranks x 2 steps: the default config trains exactly (bit for bit) as the explicit lean settings."""
    lean = ("head.sphereface2.fused_update=true", "head.sphereface2.proxy_dtype=bf16")
    runs = [_overrides(tiny_data, tmp_path / "d"), _overrides(tiny_data, tmp_path / "e", *lean)]
    for default, explicit in spawn_gloo(_train, 2, args=(runs,), timeout_s=300):
        assert default["fused"] and default["dtype"] == torch.bfloat16 and not default["warnings"]
        assert "weight_momentum" in default["head"]
        _assert_bitwise(default, explicit)


@pytest.mark.dist
def test_grad_accum_fallback_trains_as_the_unfused_head_with_one_warning(tiny_data, tmp_path):
    """grad_accum=2: the trainer builds the unfused fp32 head (bit for bit the explicit fused_update=false
    run) and warns once, on rank 0 only, naming train.grad_accum."""
    acc = ("train.grad_accum=2", "data.batch_size=2")
    runs = [
        _overrides(tiny_data, tmp_path / "f", *acc),
        _overrides(tiny_data, tmp_path / "u", *acc, "head.sphereface2.fused_update=false"),
    ]
    ranks = spawn_gloo(_train, 2, args=(runs,), timeout_s=300)
    (fell0, unfused0), (fell1, _) = ranks
    assert len(fell0["warnings"]) == 1 and fell1["warnings"] == [] and unfused0["warnings"] == []
    assert "train.grad_accum=1 (got 2)" in fell0["warnings"][0]
    for fell, unfused in ranks:
        assert not fell["fused"] and fell["dtype"] == torch.float32
        _assert_bitwise(fell, unfused)


# ----------------------------------------------------------------------------- resuming a run from before


def test_a_checkpoint_resumes_with_the_head_update_it_was_written_by(tmp_path):
    """A run started before the lean default (tests/fixtures/ckpt_v1: unfused, fp32 rows, its config without
    the keys) resumes unfused under today's defaults, with one warning; the checkpoints it writes say so in
    meta.json (``head_update``), and those resume the same way."""
    from fr_dist.data import make_synthetic_dataset
    from fr_dist.runtime import DistEnv
    from fr_dist.train import checkpoint as ckpt
    from fr_dist.train.run import build_trainer

    v1 = ROOT / "tests" / "fixtures" / "ckpt_v1"
    syn = dict(num_identities=6, images_per_identity=4, heldout_identities=2, heldout_pairs=4, seed=3)
    make_synthetic_dataset(tmp_path / "syn", **syn)
    ov = [
        f"output_dir={tmp_path / 'run'}",
        f"data.rec={tmp_path / 'syn' / 'train.rec'}",
        "train.tensorboard=false",
    ]
    cfg = load_config(v1 / "config.yaml", ov)
    assert _lean(cfg.head.head_kwargs()) == LEAN  # what today's defaults ask for

    def resume(path):
        tr = build_trainer(cfg, DistEnv(), torch.device("cpu"))
        assert tr.head.fused_update  # built as the config says ...
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.load_checkpoint(path)
        said = [str(w.message) for w in caught if "resuming with the checkpoint's" in str(w.message)]
        assert len(said) == 1 and "'fused_update': False" in said[0], said
        assert not tr.head.fused_update and tr.head.weight.dtype == torch.float32  # ... resumed as written
        return tr

    tr = resume(v1)
    saved = ckpt.safe_load(v1 / "head_rank0.pt")["params"]["weight"]
    assert torch.equal(tr.head.weight.detach(), saved) and tr.step == 2
    new = tr.save_checkpoint()
    assert ckpt.read_meta(new)["head_update"] == UNFUSED
    (new / "config.yaml").unlink()  # the meta alone says it
    assert torch.equal(resume(new).head.weight.detach(), saved)
