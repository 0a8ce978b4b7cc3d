"""fr_dist's ONNX export under insightface's runtime conventions (``insightface.model_zoo.ArcFaceONNX``).

ArcFaceONNX loads a recognition model with onnxruntime and expects: one input [N, 3, H, W] (it reads
``input_size`` from dims 2-3, so they are fixed, and feeds any N), one output; BGR uint8 crops turned
into the input by ``cv2.dnn.blobFromImages(imgs, 1 / std, (W, H), (mean,) * 3, swapRB=True)``, with
mean = std = 127.5 unless the first 8 graph nodes are named like MXNet's normalisation (``Sub`` /
``_minus`` and ``Mul`` / ``_mul``), in which case it feeds raw pixels. So a model that bakes the
normalisation in under other names would be normalised twice: fr_dist's graph must take the
normalised input straight into its first convolution. Checked here for iresnet (the demo's),
MobileFaceNet and ViT-T, exported by ``fr-dist export`` from an fr_dist ``.pt``, at N = 1 and 3,
against the PyTorch model fed by fr_dist's own preprocessing (BGR -> RGB, ``normalize_pixels``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from fr_dist.models import create_backbone

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) not installed")
onnx = pytest.importorskip("onnx", reason="onnx (test extra) not installed")

MEAN = STD = 127.5  # ArcFaceONNX's input_mean / input_std for a graph without normalisation nodes

MODELS = [
    ("iresnet_tiny", 128, {}),  # the CPU demo's backbone
    ("mobilefacenet", 512, {}),
    ("vit_t", 512, {}),
]


def blob_from_images(imgs: list[np.ndarray], scalefactor: float, size, mean, swap_rb: bool) -> np.ndarray:
    """``cv2.dnn.blobFromImages`` for crops already of ``size`` (no resize, no crop): NCHW float32 of
    ``(pixel - mean) * scalefactor``, channels reversed when ``swap_rb`` (BGR -> RGB)."""
    out = []
    for img in imgs:
        assert img.shape[:2] == (size[1], size[0]), "crops are given at the model's size"
        x = img[..., ::-1] if swap_rb else img  # [H, W, 3] BGR -> RGB
        x = (x.astype(np.float32) - np.asarray(mean, np.float32)) * np.float32(scalefactor)
        out.append(x.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]
    return np.ascontiguousarray(np.stack(out))  # [N, 3, H, W]


def arcface_onnx_mean_std(model) -> tuple[float, float]:
    """insightface ArcFaceONNX.__init__'s rule: (0, 1) when the first 8 nodes' names show an MXNet
    normalisation (a Sub/_minus AND a Mul/_mul), else (127.5, 127.5)."""
    names = [n.name for n in model.graph.node[:8]]
    find_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    find_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if find_sub and find_mul else (MEAN, STD)


def input_consumers(model) -> list[str]:
    """Op types of the nodes that read the graph input (a Sub / Mul / Div / Add there = baked normalisation)."""
    name = model.graph.input[0].name
    return [n.op_type for n in model.graph.node if name in n.input]


def _trained_looking(name: str, dim: int, kwargs: dict) -> nn.Module:
    """A backbone with perturbed weights and BatchNorm statistics from a few training-mode batches."""
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=dim, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None  # cumulative average of the calibration batches
        model.train()
        for _ in range(2):
            model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


def _export(tmp_path, name: str, dim: int, kwargs: dict):
    """``fr-dist export MODEL.pt --onnx MODEL.onnx`` on fr_dist's export file of the model."""
    from fr_dist.cli import main

    model = _trained_looking(name, dim, kwargs)
    spec = dict(name=name, embedding_size=dim, input_size=112, dropout=0.0, kwargs=kwargs)
    pt, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.onnx"
    torch.save({"state_dict": model.state_dict(), "model": spec}, pt)  # fr_dist.export's .pt layout
    assert main(["export", str(pt), "--onnx", str(out)]) == 0
    return model, out


@pytest.mark.parametrize("name,dim,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_onnx_export_runs_as_insightface_arcface_onnx(tmp_path, name, dim, kwargs):
    model, path = _export(tmp_path, name, dim, kwargs)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    # no normalisation in the graph: ArcFaceONNX applies (x - 127.5) / 127.5 itself, exactly once
    assert arcface_onnx_mean_std(graph) == (MEAN, STD)
    assert input_consumers(graph) == ["Conv"]
    # fp32 weights and fp32 input / output
    assert {i.data_type for i in graph.graph.initializer} == {onnx.TensorProto.FLOAT}
    for v in (*graph.graph.input, *graph.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert len(sess.get_inputs()) == 1 and len(sess.get_outputs()) == 1
    inp, outp = sess.get_inputs()[0], sess.get_outputs()[0]
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 112, 112]  # dynamic batch only
    input_size = tuple(inp.shape[2:4][::-1])  # as ArcFaceONNX reads it: (W, H)
    assert input_size == (112, 112) and outp.shape[1] == dim

    rng = np.random.default_rng(1)
    from fr_dist.data.image import normalize_pixels

    for n in (1, 3):
        imgs = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(n)]  # BGR crops
        blob = blob_from_images(imgs, 1.0 / STD, input_size, (MEAN,) * 3, swap_rb=True)
        emb = sess.run([outp.name], {inp.name: blob})[0]
        assert emb.shape == (n, dim) and emb.dtype == np.float32
        # the PyTorch model on fr_dist's own preprocessing of the same crops
        rgb = np.stack([img[..., ::-1] for img in imgs])  # [N, H, W, 3] BGR -> RGB
        x = torch.from_numpy(normalize_pixels(rgb)).permute(0, 3, 1, 2)  # [N, H, W, 3] -> [N, 3, H, W]
        torch.testing.assert_close(x, torch.from_numpy(blob), rtol=0, atol=1e-6)
        with torch.no_grad():
            ref = model(x).numpy()
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.9999, cos


def test_blob_and_normalisation_checks_are_insightface_s():
    # the numpy blob equals OpenCV's (a dependency of fr_dist) on the same BGR crops
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    ref = cv2.dnn.blobFromImages(imgs, 1.0 / STD, (112, 112), (MEAN,) * 3, swapRB=True)
    np.testing.assert_allclose(
        blob_from_images(imgs, 1.0 / STD, (112, 112), (MEAN,) * 3, True), ref, atol=1e-6
    )


def test_baked_normalisation_would_be_caught(tmp_path):
    from fr_dist.export import export_onnx

    class Baked(nn.Module):  # a graph that normalises raw pixels itself: ArcFaceONNX would do it twice
        def __init__(self):
            super().__init__()
            self.net = create_backbone("iresnet_tiny", embedding_size=8).eval()

        def forward(self, x):
            return self.net((x - 127.5) * (1 / 127.5))

    export_onnx(Baked(), dict(input_size=112), tmp_path / "baked.onnx")
    assert input_consumers(onnx.load(str(tmp_path / "baked.onnx"))) == ["Sub"]
