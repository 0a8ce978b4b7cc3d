"""An OpenSphere run (tools/make_opensphere_fixture.py: its current ckpt layout, and the 2022 layout with a
softmax head that initialises fr_dist's SphereFace2 head) -> fr_dist run folder (convert.run.write_run) ->
``checkpoint.resume=auto`` on 2 gloo ranks for 2 more steps."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
TINY_DATA = dict(num_identities=12, images_per_identity=4, heldout_identities=4, heldout_pairs=8, seed=3)
K, D, STEPS = 12, 16, 3


def _tool():
    spec = importlib.util.spec_from_file_location(
        "make_opensphere_fixture", REPO / "tools" / "make_opensphere_fixture.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _overrides(data_dir, out):
    ov = {
        "output_dir": str(out),
        "device": "cpu",
        "data.rec": str(data_dir / "train.rec"),
        "data.num_workers": 0,
        "data.batch_size": 4,
        "model.name": "iresnet_tiny",
        "model.embedding_size": D,
        "head.name": "sphereface2",
        "train.max_steps": STEPS + 2,
        "train.lr": 0.01,
        "train.momentum": 0.9,
        "train.warmup_steps": 0,
        "train.log_every": 1,
        "train.tensorboard": False,
        "checkpoint.save_at_end": False,
        "eval.bins": "[]",
    }
    return [f"{k}={v}" for k, v in ov.items()]


def _resume(rank, world, overrides):
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    cfg = load_config(None, overrides)
    tr = build_trainer(cfg, DistEnv(rank=rank, world_size=world), torch.device("cpu"))
    tr.fit()
    out = {"step": tr.step}
    if rank == 0:
        out["metrics"] = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    return out


@pytest.mark.parametrize(
    "layout,head", [("current", "SphereFace2"), pytest.param("2022", "ArcFace", marks=pytest.mark.slow)]
)
def test_opensphere_run_converts_and_resumes_on_two_ranks(tiny_data, tmp_path, layout, head):
    from fr_dist.convert.opensphere import read_opensphere
    from fr_dist.convert.run import read_run, write_run
    from fr_dist.train.config_load import load_config

    tool = _tool()
    write = tool.write_current if layout == "current" else tool.write_2022
    src = write(tmp_path / "os", arch="iresnet_tiny", head=head, classes=K, dim=D, steps=STEPS)
    imported = read_opensphere(src)
    assert imported.step == STEPS
    out = tmp_path / "run"
    ov = _overrides(tiny_data, out)
    folder = write_run(imported, load_config(None, ov), out)
    assert folder.name == str(STEPS)
    back, _, _ = read_run(out)
    assert back.step == STEPS and back.head_kind == "sphereface2"
    rows = torch.nn.functional.normalize(imported.weight, dim=1)
    torch.testing.assert_close(
        torch.nn.functional.normalize(back.weight.float(), dim=1), rows, rtol=0, atol=1e-2
    )
    notes = json.loads((out / "converted.json").read_text())["notes"]
    if head == "SphereFace2":
        assert float(back.bias) == pytest.approx(float(imported.bias), rel=1e-6)
        assert sum("momentum carried" in n for n in notes) == 2, notes  # backbone and rows
    else:
        assert any("softmax classifier -> sphereface2 head: rows normalised, bias b = " in n for n in notes)
    res = spawn_gloo(_resume, 2, args=(ov + ["checkpoint.resume=auto"],), timeout_s=300)
    assert res[0]["step"] == res[1]["step"] == STEPS + 2
    steps = [m["step"] for m in res[0]["metrics"] if "loss" in m]
    assert steps == [STEPS + 1, STEPS + 2]
    assert all(math.isfinite(m["loss"]) for m in res[0]["metrics"] if "loss" in m)
