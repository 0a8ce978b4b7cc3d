"""arcface_torch runs in and out: every layout read from W = 2 and 3 sources, the refusals, and the round
trip fr_dist (W=2) -> arcface_torch files (W=2) -> fr_dist run -> resumed on W=3 -> arcface_torch (W=3) + ONNX.

The arcface_torch fixtures are written by fr_dist's own writer (train_v2) and, for the older layouts, by
``_write_old_layout`` below, which follows insightface's save code of the time (raw tensors / state dicts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fr_dist.convert import ImportedRun
from fr_dist.convert.arcface_torch import diagnose_rows, read_arcface_torch
from fr_dist.convert.arcface_torch_write import export_arcface_torch, write_arcface_torch
from fr_dist.errors import CheckpointError
from fr_dist.sharding import class_range
from fr_dist.testing import spawn_gloo

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import FlatNet  # noqa: E402  (BN-free: a resume on another W computes the same per sample)

K, D = 31, 16  # uneven on 2 and 3 ranks
TINY_DATA = dict(num_identities=K, images_per_identity=2, heldout_identities=4, heldout_pairs=8, seed=5)


def _register_flat():
    from fr_dist.models import registry

    registry._REGISTRY.setdefault("test_flat_arc", FlatNet)


def _imported(seed=0) -> ImportedRun:
    g = torch.Generator().manual_seed(seed)
    net = FlatNet()
    backbone = {k: torch.randn(v.shape, generator=g) for k, v in net.state_dict().items()}
    return ImportedRun(
        source="test",
        backbone=backbone,
        weight=torch.randn(K, D, generator=g),
        head_kind="softmax",
        backbone_momentum={k: torch.randn(v.shape, generator=g) for k, v in backbone.items()},
        weight_momentum=torch.randn(K, D, generator=g),
        step=7,
        epoch=1,
    )


def _write_old_layout(imp: ImportedRun, out, world: int, layout: str) -> None:
    """insightface's 2022 (softmax_fc_gpu + model_epoch) / 2021 (rank_r_softmax_weight[_mom] + backbone.pth) files."""
    out.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        s, n = class_range(K, r, world)
        if layout == "2022":
            torch.save({"weight": imp.weight[s : s + n].clone()}, out / f"softmax_fc_gpu_{r}.pt")
        else:
            torch.save(imp.weight[s : s + n].clone(), out / f"rank_{r}_softmax_weight.pt")
            torch.save(imp.weight_momentum[s : s + n].clone(), out / f"rank_{r}_softmax_weight_mom.pt")
    if layout == "2022":
        torch.save(imp.backbone, out / "model_epoch_2.pt")
        torch.save(imp.backbone, out / "model_epoch_3.pt")
    else:
        torch.save(imp.backbone, out / "backbone.pth")


def _write(layout, imp, out, world):
    if layout == "train_v2":
        write_arcface_torch(imp, out, world, model=FlatNet())
    else:
        _write_old_layout(imp, out, world, layout)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("layout", ["train_v2", "2022", "2021"])
def test_every_layout_reads_from_any_world_size(tmp_path, layout, world):
    imp = _imported()
    _write(layout, imp, tmp_path, world)
    got = read_arcface_torch(tmp_path, num_classes=K, embedding_size=D)
    assert torch.equal(got.weight, imp.weight) and got.head_kind == "softmax"
    assert all(torch.equal(got.backbone[k], v) for k, v in imp.backbone.items())
    assert f"W={world}" in got.source
    if layout == "train_v2":
        assert torch.equal(got.weight_momentum, imp.weight_momentum)
        assert set(got.backbone_momentum) == set(imp.backbone_momentum)
        assert all(torch.equal(got.backbone_momentum[k], v) for k, v in imp.backbone_momentum.items())
        assert (got.step, got.epoch) == (7, 1)
    elif layout == "2021":
        assert torch.equal(got.weight_momentum, imp.weight_momentum) and got.backbone_momentum is None
    else:
        assert got.weight_momentum is None and got.epoch == 3  # the newest model_epoch_<n>.pt


def test_rows_that_do_not_add_up_name_the_ranks(tmp_path):
    imp = _imported()
    write_arcface_torch(imp, tmp_path / "a", 4, model=FlatNet())
    (tmp_path / "a" / "checkpoint_gpu_1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank\(s\) 1 of W=4 missing .*classes \[8, 16\)"):
        read_arcface_torch(tmp_path / "a", num_classes=K)
    _write_old_layout(imp, tmp_path / "b", 3, "2021")
    (tmp_path / "b" / "rank_2_softmax_weight.pt").unlink()  # the LAST rank: no gap in the names
    with pytest.raises(
        CheckpointError, match=r"files of ranks 2\.\.2 of a W=3 run are missing \(classes \[21, 31\)\)"
    ):
        read_arcface_torch(tmp_path / "b", num_classes=K)


def test_issue_1758_shards_are_said_to_come_from_another_class_list():
    """insightface #1758 / #2056: 8 released shards, 91,180 rows, for MS1MV3's 93,431 classes."""
    counts = {r: class_range(91180, r, 8)[1] for r in range(8)}
    why = diagnose_rows(counts, 93431, "rank_*_softmax_weight.pt")
    assert "91180 rows for num_classes=93431" in why and "no rank's file is missing" in why
    assert "trained with num_classes=91180" in why and "cannot classify this data" in why
    assert diagnose_rows({r: class_range(93431, r, 8)[1] for r in range(8)}, 93431) is None


def test_refusals_name_the_file_and_the_numbers(tmp_path):
    imp = _imported()
    write_arcface_torch(imp, tmp_path / "v2", 2, model=FlatNet())
    with pytest.raises(CheckpointError, match=r"31 rows for num_classes=40"):
        read_arcface_torch(tmp_path / "v2", num_classes=40)
    with pytest.raises(CheckpointError, match=r"rows are 16-d, the config has model.embedding_size=512"):
        read_arcface_torch(tmp_path / "v2", num_classes=K, embedding_size=512)
    # a file that is not what its name says
    torch.save(torch.zeros(3, 3), tmp_path / "v2" / "checkpoint_gpu_1.pt")
    with pytest.raises(
        CheckpointError, match=r"checkpoint_gpu_1.pt: not an arcface_torch train_v2 checkpoint"
    ):
        read_arcface_torch(tmp_path / "v2")
    _write_old_layout(imp, tmp_path / "old", 2, "2021")
    torch.save({"weight": imp.weight}, tmp_path / "old" / "backbone.pth")  # a shard under the backbone's name
    with pytest.raises(CheckpointError, match=r"backbone.pth: expected backbone.pth .*a classifier shard"):
        read_arcface_torch(tmp_path / "old")
    # a file that carries code: torch.save(model) pickles the class
    torch.save(nn.Linear(2, 2), tmp_path / "old" / "backbone.pth")
    with pytest.raises(CheckpointError, match=r"backbone.pth: this backbone carries code .*torch.nn"):
        read_arcface_torch(tmp_path / "old")


# ----------------------------------------------------------------------------- the round trip


def _overrides(data_dir, out, **extra):
    base = {
        "output_dir": str(out),
        "device": "cpu",
        "data.rec": str(data_dir / "train.rec"),
        "data.num_workers": 0,
        "data.batch_size": 4,
        "model.name": "test_flat_arc",
        "model.embedding_size": D,
        "head.name": "partial_fc",
        "head.partial_fc.s": 16.0,
        "train.lr": 0.05,
        "train.momentum": 0.9,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "train.tensorboard": False,
        "checkpoint.save_at_end": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(rank, world, overrides, stop_at=None):
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    _register_flat()
    tr = build_trainer(
        load_config(None, overrides), DistEnv(rank=rank, world_size=world), torch.device("cpu")
    )
    tr.fit(stop_at=stop_at)
    out = dict(head=tr.head.weight.detach().clone(), start=tr.head.class_start, step=tr.step)
    if rank == 0:
        out["backbone"] = {k: v.detach().clone() for k, v in tr.bb.bare.state_dict().items()}
        out["losses"] = [json.loads(x)["loss"] for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    return out


def _train_each(rank, world, runs):
    """Several runs one after the other on the same ranks (one spawn)."""
    return [_train(rank, world, ov) for ov in runs]


def _rows(results):
    return torch.cat([r["head"] for r in sorted(results, key=lambda r: r["start"])])


@pytest.mark.dist
def test_round_trip_resumes_on_three_ranks_as_fr_dist_itself(tiny_data, tmp_path):
    from fr_dist.convert.run import read_run, write_run
    from fr_dist.export import export, load_backbone_from_checkpoint
    from fr_dist.train.config_load import load_config

    _register_flat()
    # an fr_dist run on 2 ranks to the end of its first epoch (62 images, global batch 8: 7 steps)
    native = tmp_path / "native"
    spawn_gloo(_train, 2, args=(_overrides(tiny_data, native, **{"train.max_steps": 9}), 7))
    # -> arcface_torch files of 2 ranks (fr_dist's writer) -> an fr_dist run folder
    export_arcface_torch(native, tmp_path / "arc2", world_size=2)
    assert sorted(p.name for p in (tmp_path / "arc2").iterdir()) == [
        "checkpoint_gpu_0.pt",
        "checkpoint_gpu_1.pt",
        "model.pt",
    ]
    imp = read_arcface_torch(tmp_path / "arc2", num_classes=K, embedding_size=D)
    assert (imp.step, imp.epoch) == (7, 1)
    conv = tmp_path / "conv"
    cfg = load_config(None, _overrides(tiny_data, conv, **{"train.max_steps": 9}))
    folder = write_run(imp, cfg, conv)
    assert folder.name == "7"
    # nothing trained yet: the converted checkpoint holds the native one's rows, momentum and backbone
    ref, _, _ = read_run(native)
    got, _, _ = read_run(conv)
    assert torch.equal(got.weight, ref.weight) and torch.equal(got.weight_momentum, ref.weight_momentum)
    assert all(torch.equal(got.backbone[k], v) for k, v in ref.backbone.items())
    assert all(torch.equal(got.backbone_momentum[k], v) for k, v in ref.backbone_momentum.items())
    model, _ = load_backbone_from_checkpoint(conv)  # what fr-dist eval --checkpoint reads
    # resume on 3 ranks for 2 steps: the same as fr_dist resuming its own checkpoint there
    more = {"train.max_steps": 9, "checkpoint.resume": "auto"}
    runs = [_overrides(tiny_data, conv, **more)]
    more["checkpoint.resume"] = str(native / "checkpoints" / "7")
    runs.append(_overrides(tiny_data, tmp_path / "again", **more))
    both = spawn_gloo(_train_each, 3, args=(runs,))
    resumed, again = [r[0] for r in both], [r[1] for r in both]
    assert resumed[0]["step"] == again[0]["step"] == 9
    torch.testing.assert_close(resumed[0]["losses"][-2:], again[0]["losses"][-2:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_rows(resumed), _rows(again), rtol=1e-6, atol=1e-7)
    for k, v in again[0]["backbone"].items():
        torch.testing.assert_close(resumed[0]["backbone"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    # and back out: arcface_torch on 3 ranks + ONNX, equal to the resumed run
    export_arcface_torch(conv, tmp_path / "arc3", world_size=3)
    export(conv, onnx_out=tmp_path / "m.onnx")
    back = read_arcface_torch(tmp_path / "arc3", num_classes=K, embedding_size=D)
    assert torch.equal(back.weight, _rows(resumed)) and back.step == 9
    model, _ = load_backbone_from_checkpoint(conv)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        emb = model(x)
    net = FlatNet()
    net.load_state_dict(torch.load(tmp_path / "arc3" / "model.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(net(x), emb)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    onnx_emb = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_emb), emb, rtol=1e-4, atol=1e-5)


def test_softmax_rows_into_a_sphereface2_run_and_back(tiny_data, tmp_path):
    """Another head family: the rows go through fr_dist.convert.across (its closed-form bias), and out again."""
    import torch.nn.functional as F

    from fr_dist.convert.run import read_run, write_run
    from fr_dist.train.config_load import load_config

    _register_flat()
    imp = _imported()
    write_arcface_torch(imp, tmp_path / "src", 2, model=FlatNet())
    cfg = load_config(None, _overrides(tiny_data, tmp_path / "run", **{"head.name": "sphereface2"}))
    write_run(read_arcface_torch(tmp_path / "src", num_classes=K, embedding_size=D), cfg, tmp_path / "run")
    got, _, _ = read_run(tmp_path / "run")
    assert got.head_kind == "sphereface2" and got.bias is not None
    assert got.weight_momentum is None or not got.weight_momentum.any()  # dropped across heads
    notes = json.loads((tmp_path / "run" / "converted.json").read_text())["notes"]
    assert any("softmax classifier -> sphereface2 head" in n and "bias b =" in n for n in notes), notes
    torch.testing.assert_close(got.weight, F.normalize(imp.weight, dim=1), rtol=0, atol=1e-2)  # bf16 rows
    export_arcface_torch(tmp_path / "run", tmp_path / "back", world_size=3)
    back = read_arcface_torch(tmp_path / "back", num_classes=K, embedding_size=D)
    assert back.head_kind == "softmax" and torch.allclose(back.weight.norm(dim=1), torch.ones(K), atol=1e-5)


def test_cli_convert_and_export(tiny_data, tmp_path, capsys):
    """``fr-dist convert --from arcface_torch`` prints its notes; ``fr-dist export --arcface-torch`` writes W files."""
    from fr_dist.cli import main
    from fr_dist.models import create_backbone

    net = create_backbone("iresnet_tiny", embedding_size=D)
    g = torch.Generator().manual_seed(3)
    imp = ImportedRun(
        source="test",
        backbone=net.state_dict(),
        weight=torch.randn(K, D, generator=g),
        head_kind="softmax",
        backbone_momentum={n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters()},
        weight_momentum=torch.randn(K, D, generator=g),
        step=5,
    )
    write_arcface_torch(imp, tmp_path / "src", 2, model=net)
    ov = [
        f"data.rec={tiny_data / 'train.rec'}",
        "data.synthetic.generate=false",
        "eval.bins=[]",
        "data.batch_size=4",
        "head.name=partial_fc",
    ]
    convert = [
        "convert",
        "--from",
        "arcface_torch",
        str(tmp_path / "src"),
        "--config",
        "configs/demo_cpu.yaml",
    ]
    assert main([*convert, str(tmp_path / "run"), *ov, f"model.embedding_size={D}"]) == 0
    out = capsys.readouterr().out
    assert "arcface_torch train_v2 checkpoint (W=2)" in out and "row SGD momentum carried" in out
    assert "checkpoint.resume=auto" in out
    assert (tmp_path / "run" / "checkpoints" / "5" / "meta.json").is_file()
    assert (
        main(["export", str(tmp_path / "run"), "--arcface-torch", str(tmp_path / "out"), "--world-size", "3"])
        == 0
    )
    back = read_arcface_torch(tmp_path / "out", num_classes=K)
    assert torch.equal(back.weight, imp.weight) and torch.equal(back.weight_momentum, imp.weight_momentum)
    assert main([*convert, str(tmp_path / "run2"), *ov, "model.embedding_size=32"]) == 2
    assert "rows are 16-d, the config has model.embedding_size=32" in capsys.readouterr().err
