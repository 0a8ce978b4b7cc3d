"""DeepSpeed ZeRO-1 bf16 on 2 CPU ranks (train, checkpoint, resume) and ONNX export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fr_dist.testing import spawn_gloo

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_trainer import _overrides, _train  # noqa: E402

TINY_DATA = dict(
    num_identities=16, images_per_identity=4, heldout_identities=10, heldout_pairs=20, seed=6
)  # the conftest's tiny_data fixture


@pytest.mark.dist
@pytest.mark.slow
def test_deepspeed_zero1_bf16_trains_checkpoints_resumes(tiny_data, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed extra not installed")
    ov = _overrides(
        tiny_data,
        tmp_path / "ds",
        **{
            "engine": "deepspeed",
            "deepspeed.zero_stage": 1,
            "deepspeed.bf16": True,
            "train.max_steps": 6,
            "checkpoint.every": 3,
            "train.momentum": 0.9,
            "model.name": "iresnet",
            "model.kwargs": "{layers: [1, 1, 1, 1], width: 8, stem_stride: 2}",
        },
    )
    first = spawn_gloo(_train, 2, args=(ov, 3), timeout_s=600)
    assert first[0]["step"] == 3
    ckpt = tmp_path / "ds" / "checkpoints" / "3"
    assert (ckpt / "meta.json").is_file() and (ckpt / "deepspeed").is_dir()
    resumed = spawn_gloo(_train, 2, args=(ov + ["checkpoint.resume=auto"],), timeout_s=600)
    assert resumed[0]["step"] == 6
    losses = [m["loss"] for m in resumed[0]["metrics"]]
    assert all(np.isfinite(losses))
    # the backbone parameters stay replicated across ranks under ZeRO-1 (BN running statistics
    # are per-rank, as with DDP broadcast_buffers=False)
    for k, v in resumed[0]["backbone"].items():
        if "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(resumed[1]["backbone"][k], v, msg=k)
    # and the DeepSpeed checkpoint exports like a DDP one
    from fr_dist.export import load_backbone_from_checkpoint

    model, spec = load_backbone_from_checkpoint(tmp_path / "ds")
    assert spec["embedding_size"] == 16


def test_onnx_export_matches_pytorch(tiny_data, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) not installed")
    import onnxruntime as ort

    ov = _overrides(
        tiny_data,
        tmp_path / "run",
        **{
            "train.max_steps": 2,
            "checkpoint.save_at_end": True,
            "model.name": "iresnet",
            "model.kwargs": "{layers: [1, 1, 1, 1], width: 8, stem_stride: 2}",
        },
    )
    spawn_gloo(_train, 1, args=(ov,), timeout_s=300)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fr_dist.cli",
            "export",
            str(tmp_path / "run"),
            "--torch",
            str(tmp_path / "b.pt"),
            "--onnx",
            str(tmp_path / "b.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from fr_dist.export import load_exported

    model, spec = load_exported(tmp_path / "b.pt")
    x = torch.rand(5, 3, 112, 112) * 2 - 1  # another batch size than the export's dummy input
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(["embedding"], {"input": x.numpy()})[0]
    assert out.shape == (5, 16)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

    # `fr-dist eval` on the exported model and on the run directory: table + JSON fields
    for ckpt in (tmp_path / "b.pt", tmp_path / "run"):
        js = tmp_path / f"eval_{ckpt.name}.json"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fr_dist.cli",
                "eval",
                "--checkpoint",
                str(ckpt),
                "--bin",
                str(tiny_data / "heldout.bin"),
                "--json",
                str(js),
                "--nfolds",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "heldout" in r.stdout and "accuracy" in r.stdout
        res = __import__("json").loads(js.read_text())["sets"]["heldout"]
        assert set(res) >= {"accuracy", "accuracy_std", "threshold", "val_at_far_1e-3", "auc", "eer"}
