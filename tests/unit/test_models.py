"""Backbones: insightface parameter counts and key names, shapes, registry errors,
activation checkpointing (same outputs, grads and BN stats), channels-last, timm adapter."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from fr_dist.models import IRESNET_LAYERS, create_backbone, list_backbones, register_backbone
from fr_dist.models import registry as registry_mod
from fr_dist.models.vit import VIT_CONFIGS

# insightface arcface_torch backbones (512-d embedding, 112x112): every parameter, including the
# BatchNorm1d ``features.weight`` that insightface freezes (trainable = total - 512).
INSIGHTFACE_PARAMS = {
    18: 24_025_600,
    34: 34_139_328,
    50: 43_590_848,
    100: 65_156_160,
    200: 118_833_920,
}
MOBILEFACENET_PARAMS = 2_059_520  # get_mbf(num_features=512)
MOBILEFACENET_LARGE_PARAMS = 6_314_880  # get_mbf_large(num_features=512)


def _n_params(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _iresnet_closed_form(layers, width=64, emb=512, spatial=7) -> int:
    """Count written out from the architecture, independently of the module code."""
    bn = lambda c: 2 * c  # noqa: E731 - weight + bias

    def block(cin, cout, down):
        n = bn(cin) + 9 * cin * cout + bn(cout) + cout + 9 * cout * cout + bn(cout)
        return n + (cin * cout + bn(cout) if down else 0)

    total = 27 * width + bn(width) + width  # stem conv3x3, BN, PReLU
    cin = width
    for i, blocks in enumerate(layers):
        cout = width * 2**i
        total += block(cin, cout, True) + (blocks - 1) * block(cout, cout, False)
        cin = cout
    return total + bn(cin) + (cin * spatial * spatial * emb + emb) + bn(emb)  # bn2, fc, features


@pytest.mark.parametrize("depth", sorted(IRESNET_LAYERS))
def test_iresnet_parameter_counts_equal_insightface(depth):
    with torch.device("meta"):  # no memory, no init cost (iresnet200 is 119 M parameters)
        model = create_backbone(f"iresnet{depth}")
    assert _n_params(model) == INSIGHTFACE_PARAMS[depth]
    assert _n_params(model) == _iresnet_closed_form(IRESNET_LAYERS[depth])
    assert _n_params(model, trainable=True) == INSIGHTFACE_PARAMS[depth] - 512
    assert not model.features.weight.requires_grad
    assert model.embedding_size == 512 and model.input_size == 112


def test_iresnet_module_names_match_insightface_state_dict():
    with torch.device("meta"):
        keys = set(create_backbone("iresnet50").state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "prelu.weight",
        "layer1.0.bn1.weight",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.bias",
        "layer1.0.prelu.weight",
        "layer1.0.conv2.weight",
        "layer1.0.bn3.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer3.13.conv2.weight",
        "layer4.2.bn3.weight",
        "bn2.weight",
        "fc.weight",
        "fc.bias",
        "features.weight",
        "features.running_var",
    ):
        assert k in keys, k
    assert "layer3.14.conv1.weight" not in keys  # 14 blocks in stage 3


def test_mobilefacenet_counts_and_insightface_names():
    with torch.device("meta"):
        mbf = create_backbone("mobilefacenet")
        large = create_backbone("mobilefacenet_large")
    assert _n_params(mbf) == MOBILEFACENET_PARAMS
    assert _n_params(large) == MOBILEFACENET_LARGE_PARAMS
    keys = set(mbf.state_dict())
    for k in (
        "layers.0.layers.0.weight",
        "layers.1.layers.2.weight",  # blocks[0] == 1: depthwise ConvBlock
        "layers.2.layers.0.layers.0.weight",  # DepthWise -> ConvBlock -> conv
        "layers.3.layers.3.layers.2.layers.1.running_mean",  # Residual -> DepthWise -> LinearBlock -> BN
        "conv_sep.layers.0.weight",
        "features.layers.0.layers.0.weight",  # GDC depthwise 7x7
        "features.layers.2.weight",  # Linear(512, D, bias=False)
        "features.layers.3.running_var",
    ):
        assert k in keys, k
    assert mbf.features.layers[0].layers[0].kernel_size == (7, 7)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("iresnet18", {}),
        ("iresnet34", {}),
        ("iresnet50", {}),
        ("iresnet100", {}),
        ("iresnet", dict(layers=[1, 2, 1, 1], width=8)),
        ("iresnet_tiny", {}),
        ("mobilefacenet", {}),
        ("mobilefacenet_large", {}),
    ],
)
def test_forward_shapes(name, kwargs):
    torch.manual_seed(0)
    # train mode (batch statistics): with insightface's N(0, 0.1) conv init and unit running
    # stats, an untrained iresnet100 overflows in eval mode, in insightface as here
    model = create_backbone(name, embedding_size=64, **kwargs).train()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 112, 112))
    assert y.shape == (2, 64) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert model.embedding_size == 64 and model.input_size == 112


def test_every_registered_backbone_is_covered():
    # iresnet200: parameter count only (its CPU forward is slow); the rest run test_forward_shapes
    covered = {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "iresnet"}
    covered |= {"iresnet_tiny", "mobilefacenet", "mobilefacenet_large"}
    covered |= {"iresnet2060"} | set(VIT_CONFIGS)  # tests/unit/test_vit.py
    assert set(list_backbones()) == covered | {"timm/<model name>"}


def test_other_input_and_embedding_sizes():
    m = create_backbone("iresnet", layers=[1, 1, 1, 1], width=8, input_size=96, embedding_size=32)
    assert m.fc.in_features == 64 * 6 * 6  # 96 -> 48, 24, 12, 6
    assert m(torch.randn(2, 3, 96, 96)).shape == (2, 32)
    tiny = create_backbone("iresnet_tiny", embedding_size=128)
    assert tiny.fc.in_features == 128 * 4 * 4  # stride-2 stem: 112 -> 56 -> 28, 14, 7, 4
    assert _n_params(tiny) == 571_120
    assert tiny(torch.randn(2, 3, 112, 112)).shape == (2, 128)
    mbf = create_backbone("mobilefacenet", input_size=64, embedding_size=16)
    assert mbf(torch.randn(2, 3, 64, 64)).shape == (2, 16)
    with pytest.raises(ValueError, match="divisible by 16"):
        create_backbone("mobilefacenet", input_size=100)
    with pytest.raises(ValueError, match="4 positive block counts"):
        create_backbone("iresnet", layers=[1, 1, 1])


def test_unknown_name_and_argument_errors():
    with pytest.raises(ValueError) as e:
        create_backbone("iresnet5O")
    msg = str(e.value)
    assert "unknown backbone 'iresnet5O'" in msg and "did you mean 'iresnet50'" in msg
    assert "mobilefacenet" in msg and "timm/<model name>" in msg
    with pytest.raises(TypeError, match=r"backbone 'iresnet50' got unexpected argument\(s\) \['widht'\]"):
        create_backbone("iresnet50", widht=32)


def test_register_backbone_and_duplicates():
    @register_backbone("_test_linear")
    def _linear(embedding_size=512, input_size=112, dropout=0.0, fp16=False, activation_checkpointing=False):
        m = nn.Sequential(nn.Flatten(), nn.LazyLinear(embedding_size))
        m.embedding_size, m.input_size = embedding_size, input_size
        return m

    try:
        assert "_test_linear" in list_backbones()
        m = create_backbone("_test_linear", embedding_size=4, input_size=8)
        assert m(torch.randn(2, 3, 8, 8)).shape == (2, 4)
        with pytest.raises(ValueError, match="registered twice"):
            register_backbone("_test_linear")(_linear)
    finally:
        registry_mod._REGISTRY.pop("_test_linear", None)


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y.square().sum() + y[:, 0].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    return y.detach(), grads, stats


@pytest.mark.parametrize(
    "name,kwargs,size",
    [
        ("iresnet", dict(layers=[2, 1, 1, 1], width=8, stem_stride=2), 112),
        ("mobilefacenet", dict(blocks=(2, 1, 1, 1), scale=1), 32),
    ],
)
def test_activation_checkpointing_same_outputs_grads_and_bn_stats(name, kwargs, size):
    torch.manual_seed(0)
    ref = create_backbone(name, embedding_size=16, input_size=size, **kwargs).train()
    ckpt = create_backbone(
        name, embedding_size=16, input_size=size, activation_checkpointing=True, **kwargs
    ).train()
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, size, size)
    for _ in range(2):  # two steps: running stats must evolve identically
        y0, g0, s0 = _train_step(ref, x)
        y1, g1, s1 = _train_step(ckpt, x)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        assert g0.keys() == g1.keys() and len(g0) > 10
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)
        for k in s0:
            torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=0, msg=k)


def test_channels_last_flag():
    # (the backbones' own fp16 autocast flag, which no config reached, was removed: train.amp is the path)
    torch.manual_seed(0)
    ref = create_backbone("iresnet_tiny", embedding_size=32).eval()
    cl = create_backbone("iresnet_tiny", embedding_size=32, channels_last=True).eval()
    cl.load_state_dict(ref.state_dict())
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(cl(x), ref(x), rtol=1e-4, atol=1e-4)


def _timm_importable() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _timm_importable(), reason="timm (optional extra 'timm') cannot be imported here")
def test_timm_backbone_real():
    m = create_backbone("timm/resnet18", embedding_size=64).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 112, 112)).shape == (1, 64)
    v = create_backbone("timm/vit_tiny_patch16_224", embedding_size=64).eval()
    with torch.no_grad():
        assert v(torch.randn(1, 3, 112, 112)).shape == (1, 64)


@pytest.mark.skipif(_timm_importable(), reason="timm is importable: the missing-extra error cannot be shown")
def test_timm_missing_extra_error():
    with pytest.raises(ImportError, match=r"optional 'timm' extra: pip install 'fr_dist\[timm\]'"):
        create_backbone("timm/resnet18")


def test_timm_adapter_with_a_stand_in_module(monkeypatch):
    """The adapter (img_size for transformers, neck to embedding_size) without timm installed."""
    calls = []

    class Trunk(nn.Module):
        def __init__(self, img_size=None):
            super().__init__()
            self.num_features = 24
            self.conv = nn.Conv2d(3, 24, 3, stride=4)
            self.grad_ckpt = False

        def set_grad_checkpointing(self, enable=True):
            self.grad_ckpt = enable

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))  # pooled [N, 24]

    def create_model(name, pretrained=True, num_classes=1000, **kw):
        calls.append((name, pretrained, num_classes, kw))
        if name == "convnet" and "img_size" in kw:
            raise TypeError("unexpected keyword argument 'img_size'")
        if name == "nope":
            raise RuntimeError("Unknown model (nope)")
        return Trunk(kw.get("img_size"))

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    vit = create_backbone("timm/vit", embedding_size=16, input_size=112, activation_checkpointing=True)
    assert calls[-1] == ("vit", False, 0, {"img_size": 112}) and vit.trunk.grad_ckpt
    conv = create_backbone("timm/convnet", embedding_size=16)
    assert calls[-1] == ("convnet", False, 0, {})  # retried without img_size
    assert conv(torch.randn(2, 3, 112, 112)).shape == (2, 16)
    assert conv.embedding_size == 16 and conv.input_size == 112
    with pytest.raises(ValueError, match="timm backbone 'nope'"):
        create_backbone("timm/nope")
