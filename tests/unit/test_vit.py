"""insightface's ViTs and iresnet2060: state-dict keys and shapes (committed lists from insightface's code,
and insightface's modules themselves when its repository is there), forward, the training-only patch
mask, determinism, activation checkpointing, and the float64 attention against its formula."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fr_dist.models import create_backbone
from fr_dist.models.iresnet import IRESNET2060_LAYERS, IResNet
from fr_dist.models.vit import VIT_CONFIGS, Attention

REPO = Path(__file__).resolve().parents[2]
KEYS = REPO / "tests" / "fixtures" / "insightface_keys"  # tools/make_vit_keys.py
INSIGHTFACE_REPO = Path(
    os.environ.get("FR_DIST_INSIGHTFACE_REPO", "/work/.mirror/deepinsight+insightface/repo")
)


def _tool():
    spec = importlib.util.spec_from_file_location("make_vit_keys", REPO / "tools" / "make_vit_keys.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MK = _tool()
DIGESTS = json.loads((KEYS / "digests.json").read_text())


@functools.cache
def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_backbone(name)


def _tiny(**kw) -> nn.Module:
    """A 2-block ViT on the 144 tokens of 112x112 / patch 9 (fast on CPU)."""
    args = dict(embedding_size=32, embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.0, mask_ratio=0.1)
    return create_backbone("vit_t", **{**args, **kw})


# ---------------------------------------------------------------------- keys: committed lists


@pytest.mark.parametrize("name", MK.FULL)
def test_keys_and_shapes_equal_insightface_committed_list(name):
    ref = json.loads((KEYS / f"{name}.json").read_text())
    assert ref["rev"] == MK.INSIGHTFACE_REV and ref["num_features"] == 512
    assert MK.key_shapes(_meta(name)) == ref["keys"]  # same keys, same shapes, same order


@pytest.mark.parametrize("name", sorted(MK.NAMES))
def test_key_digest_equals_insightface(name):
    assert MK.digest(MK.key_shapes(_meta(name))) == {
        k: v for k, v in DIGESTS["models"][name].items() if k != "insightface_name"
    }


def test_every_insightface_vit_is_registered_and_checked():
    assert set(DIGESTS["models"]) == set(MK.NAMES) == set(VIT_CONFIGS) | {"iresnet2060"}
    m = _meta("iresnet2060")
    assert (
        [len(s) for s in (m.layer1, m.layer2, m.layer3, m.layer4)] == IRESNET2060_LAYERS == [3, 128, 896, 3]
    )


# ---------------------------------------------------------------------- keys: insightface's modules


@pytest.fixture(scope="module")
def insightface():
    if not (INSIGHTFACE_REPO / "HEAD").exists() and not (INSIGHTFACE_REPO / ".git").exists():
        pytest.skip(f"{INSIGHTFACE_REPO} not found (the committed key lists ran)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MK.load_insightface_backbones(INSIGHTFACE_REPO)


@pytest.mark.parametrize("name", ["vit_t", "vit_s"])
def test_insightface_checkpoint_loads_strict_and_same_seed_same_weights(insightface, name):
    torch.manual_seed(0)
    ref = MK.insightface_model(insightface, name).state_dict()
    torch.manual_seed(0)
    ours = create_backbone(name)
    assert MK.key_shapes(ours) == [[k, list(v.shape)] for k, v in ref.items()]
    for k, v in ours.state_dict().items():  # module creation order and init = insightface's
        assert torch.equal(v, ref[k]), k
    ours.load_state_dict(ref, strict=True)


@pytest.mark.parametrize("train", [False, True])
def test_forward_equals_insightface(insightface, train):
    import sys

    vit_mod = sys.modules[f"{insightface.__name__}.vit"]
    kw = dict(embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.0, mask_ratio=0.1)
    ref = vit_mod.VisionTransformer(img_size=112, patch_size=9, num_classes=32, **kw).train(train)
    ours = _tiny().train(train)
    sd = ref.state_dict()
    for k, v in sd.items():  # trained-looking BN statistics
        if "running_var" in k:
            sd[k] = torch.rand_like(v) + 0.5
        elif "running_mean" in k:
            sd[k] = torch.randn_like(v) * 0.1
    ref.load_state_dict(sd)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 112, 112)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # insightface's torch.cuda.amp.autocast on a CPU
        torch.manual_seed(5)
        y_ref = ref(x)
    torch.manual_seed(5)  # train: the same random numbers -> the same patch mask
    y = ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- forward, mask, determinism


def test_vit_t_forward_shape():
    torch.manual_seed(0)
    m = create_backbone("vit_t")
    assert m.embedding_size == 512 and m.input_size == 112 and m.num_patches == 144
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        for mode in (True, False):
            y = m.train(mode)(x)
            assert y.shape == (2, 512) and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_meta_device_forward_and_flops():  # how fr_dist.plan measures a backbone it has no figures for
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = create_backbone("vit_t_dp005_mask0", embed_dim=32, depth=2, num_heads=4)
    with FlopCounterMode(display=False) as fc:
        y = m(torch.empty(2, 3, 112, 112, device="meta"))
    assert y.shape == (2, 512) and fc.get_total_flops() > 0


def _tokens_into_blocks(model, x) -> int:
    seen = []
    h = model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("ratio,kept", [(0.1, 129), (0.05, 136), (0.0, 144)])
def test_patch_mask_only_in_training(ratio, kept):
    torch.manual_seed(0)
    m = _tiny(mask_ratio=ratio)
    x = torch.randn(2, 3, 112, 112)
    assert _tokens_into_blocks(m.train(), x) == kept  # int(144 * (1 - ratio)) tokens
    assert _tokens_into_blocks(m.eval(), x) == 144


def test_mask_off_in_eval_changes_output_in_training():
    torch.manual_seed(0)
    masked = _tiny(mask_ratio=0.1)
    plain = _tiny(mask_ratio=0.0)
    plain.load_state_dict(masked.state_dict())
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), plain.eval()(x), rtol=0, atol=0)
        torch.manual_seed(1)
        a = masked.train()(x)
        torch.manual_seed(1)
        b = plain.train()(x)
    assert (a - b).abs().max() > 1e-3


def test_determinism():
    torch.manual_seed(3)
    a = _tiny(drop_path_rate=0.2)
    torch.manual_seed(3)
    b = _tiny(drop_path_rate=0.2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), a.eval()(x))
        outs = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            outs.append(a.train()(x))
    assert torch.equal(outs[0], outs[1])  # training: same seed, same mask and drop path
    assert not torch.equal(outs[0], outs[2])


def test_mask_token_trains_only_with_the_mask():
    assert not create_backbone(
        "vit_t_dp005_mask0", embed_dim=32, depth=1, num_heads=4
    ).mask_token.requires_grad
    torch.manual_seed(0)
    m = _tiny(mask_ratio=0.1).train()
    m(torch.randn(2, 3, 112, 112)).square().sum().backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_activation_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = _tiny(drop_path_rate=0.3, mask_ratio=0.1)
    ckpt = _tiny(drop_path_rate=0.3, mask_ratio=0.1, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 112, 112)
    res = []
    for m in (plain, ckpt):
        torch.manual_seed(11)  # the recompute replays the drop-path draws (RNG state preserved)
        y = m.train()(x)
        (y.square().sum() + y[:, 0].sum()).backward()
        res.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=0, atol=0)
    assert res[1][1].keys() == res[0][1].keys()
    for n, g in res[0][1].items():
        torch.testing.assert_close(res[1][1][n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_attention_float64_equals_its_formula():
    torch.manual_seed(0)
    att = Attention(24, num_heads=3, qkv_bias=True).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    q, k, v = att.qkv(x).reshape(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)  # each [N, h, L, c/h]
    w = (q @ k.transpose(-2, -1) * 8**-0.5).softmax(-1)  # [N, h, L, L]
    ref = att.proj((w @ v).transpose(1, 2).reshape(2, 7, 24))
    out = att(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # scores in float32, result in the input's dtype
        assert att.float()(x.float()).dtype == torch.bfloat16


def test_vit_argument_errors():
    with pytest.raises(ValueError, match="model.dropout is not used"):
        create_backbone("vit_t", dropout=0.1)
    with pytest.raises(ValueError, match="needs mask_ratio=0"):
        create_backbone("vit_t", norm_layer="bn", embed_dim=32, depth=1, num_heads=4)
    with pytest.raises(TypeError, match=r"backbone 'vit_t' got unexpected argument\(s\) \['embed_dims'\]"):
        create_backbone("vit_t", embed_dims=32)
    with pytest.raises(ValueError, match="input size"):
        _tiny()(torch.randn(1, 3, 96, 96))
    bn = create_backbone("vit_t", norm_layer="bn", mask_ratio=0.0, embed_dim=32, depth=1, num_heads=4)
    assert "blocks.0.norm1.bn.running_mean" in bn.state_dict()  # insightface's VITBatchNorm keys
    assert bn.train()(torch.randn(2, 3, 112, 112)).shape == (2, 512)


# ---------------------------------------------------------------------- iresnet2060's segments


def _saved_tensors(model, x) -> int:
    n = [0]

    def pack(t):
        n[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    return n[0], y


def test_iresnet_checkpoint_segments_same_outputs_grads_stats_fewer_saved():
    torch.manual_seed(0)
    kw = dict(layers=[1, 5, 4, 1], width=8, stem_stride=2, embedding_size=16)
    plain = IResNet(**kw).train()
    seg = IResNet(**kw, checkpoint_segments=(0, 2, 3, 0)).train()
    seg.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 112, 112)
    out = []
    for m in (plain, seg):
        n, y = _saved_tensors(m, x)
        (y.square().sum() + y[:, 0].sum()).backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        out.append((n, y.detach(), grads, {k: b.clone() for k, b in m.named_buffers()}))
    assert out[1][0] < out[0][0]  # the checkpointed segments saved nothing for the backward
    torch.testing.assert_close(out[1][1], out[0][1])
    for k, g in out[0][2].items():
        torch.testing.assert_close(out[1][2][k], g, msg=k)
    for k, b in out[0][3].items():  # BN running statistics updated once, as without checkpoints
        torch.testing.assert_close(out[1][3][k], b, msg=k)
    with pytest.raises(ValueError, match="checkpoint_segments"):
        IResNet(**kw, checkpoint_segments=(1, 2))
