"""Backbone figures of the planner: parameters, forward FLOPs and activation bytes per 112x112 image.

Parameter count from the registry, forward FLOPs per image (FlopCounterMode on the meta device, batch 2 /
2) and activation bytes per image: bytes of the tensors autograd saves in a training forward
(torch.autograd.graph.saved_tensors_hooks, storages deduplicated, parameters excluded), fp32, measured on
CPU as (saved(B=4) - saved(B=2)) / 2 with torch 2.13. Under bf16 autocast iresnet50 measures 35,400,192
B/image: half, as :func:`fr_dist.plan.memory.activation_bytes` assumes for fp16/bf16. A backbone not in
the table (or at another embedding size) is measured once, the same way, and cached.
"""

from __future__ import annotations

from fr_dist.models import create_backbone

__all__ = ["BACKBONES", "backbone_info"]

BACKBONES: dict[str, dict] = {
    "iresnet_tiny": dict(params=1_358_704, fwd_flops=57_554_944, act_bytes=2_468_352),
    "iresnet18": dict(params=24_025_600, fwd_flops=5_219_909_632, act_bytes=46_113_792),
    "iresnet34": dict(params=34_139_328, fwd_flops=8_919_285_760, act_bytes=61_166_592),
    "iresnet50": dict(params=43_590_848, fwd_flops=12_618_661_888, act_bytes=70_800_384),
    "iresnet100": dict(params=65_156_160, fwd_flops=24_179_212_288, act_bytes=111_744_000),
    "iresnet200": dict(params=118_833_920, fwd_flops=46_837_891_072, act_bytes=195_437_568),
    # insightface's backbones/iresnet2060.py: act_bytes with its checkpoint_sequential segments (20, 100) in
    # training, as insightface runs it
    "iresnet2060": dict(params=1_122_301_120, fwd_flops=477_815_209_984, act_bytes=224_138_240),
    "mobilefacenet": dict(params=2_059_520, fwd_flops=875_041_792, act_bytes=45_214_720),
    "mobilefacenet_large": dict(params=6_314_880, fwd_flops=3_632_965_632, act_bytes=113_554_432),
    # insightface's ViTs (arcface_torch backbones/vit.py: patch 9, 144 tokens, mask_ratio 0.1 of the
    # WebFace42M recipes; act_bytes measured in train mode, i.e. with the patch masking)
    "vit_t": dict(params=19_137_792, fwd_flops=2_676_330_496, act_bytes=26_169_248),
    "vit_s": dict(params=76_023_296, fwd_flops=10_259_996_672, act_bytes=52_108_192),
    "vit_b": dict(params=113_833_472, fwd_flops=20_408_139_776, act_bytes=102_907_456),
    "vit_l": dict(params=255_684_352, fwd_flops=47_792_529_408, act_bytes=162_495_992),
    "vit_h": dict(params=756_393_984, fwd_flops=178_397_741_056, act_bytes=454_658_552),
    "none": dict(params=0, fwd_flops=0, act_bytes=0),  # head alone (benchmarks/classifier.py)
}
_BACKBONE_CACHE: dict[tuple, dict] = {}


def backbone_info(name: str, dim: int = 512) -> dict:
    """{params, fwd_flops, act_bytes} of a backbone at 112x112 (table above; else measured once, cached)."""
    if name in BACKBONES and (dim == 512 or name == "none"):
        return dict(BACKBONES[name])
    key = (name, dim)
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE[key] = _measure_backbone(name, dim)
    return _BACKBONE_CACHE[key]


def _measure_backbone(name: str, dim: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        meta = create_backbone(name, embedding_size=dim)
    params = sum(p.numel() for p in meta.parameters())
    with FlopCounterMode(display=False) as fc:
        meta(torch.empty(2, 3, 112, 112, device="meta"))
    net = create_backbone(name, embedding_size=dim).train()
    pptr = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}
    for b in (2, 4):
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            s = t.untyped_storage()
            if s.data_ptr() not in pptr:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(b, 3, 112, 112))
        saved[b] = sum(seen.values())
    return dict(params=params, fwd_flops=fc.get_total_flops() // 2, act_bytes=(saved[4] - saved[2]) // 2)
