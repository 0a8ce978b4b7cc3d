"""Vision Transformer of insightface arcface_torch (``backbones/vit.py``): same modules, names and shapes.

112x112 input -> non-overlapping ``patch_size`` conv patches (9 -> 12 x 12 = 144 tokens, no class
token) + a learned position embedding -> (training only: the random patch mask drops
``int(L * mask_ratio)`` tokens per image) -> ``depth`` pre-norm blocks (LayerNorm, multi-head
attention without qkv bias, LayerNorm, ReLU6 MLP, stochastic depth) -> LayerNorm -> (training
only: the dropped tokens come back as the learned ``mask_token``) -> flatten [N, L*C] -> the
``feature`` head: Linear(L*C, C, no bias) - BatchNorm1d(C) - Linear(C, D, no bias) - BatchNorm1d(D)
(eps 2e-5). The state-dict keys and shapes equal insightface's ``VisionTransformer`` (checked
against it by ``tests/unit/test_vit.py``), so its released ``model.pt`` files load with
``load_state_dict(strict=True)``; under the same seed the initial weights are insightface's too.

Registered (``fr_dist.models``), with insightface ``get_model``'s arguments (112x112, patch 9, 8 heads):

    name                   C     depth  drop_path  mask    parameters (512-d)
    vit_t                  256   12     0.1        0.1     19,137,792
    vit_t_dp005_mask0      256   12     0.05       0.0     19,137,792
    vit_s                  512   12     0.1        0.1     76,023,296
    vit_s_dp005_mask_0     512   12     0.05       0.0     76,023,296
    vit_b                  512   24     0.1        0.1    113,833,472
    vit_b_dp005_mask_005   512   24     0.05       0.05   113,833,472
    vit_l                  768   24     0.05       0.05   255,684,352  (= insightface vit_l_dp005_mask_005)
    vit_l_dp005_mask_005   768   24     0.05       0.05   255,684,352
    vit_h                  1024  48     0.1        0.0    756,393,984

Every architecture argument can be changed through ``model.kwargs`` (``embed_dim``, ``depth``,
``num_heads``, ``patch_size``, ``mask_ratio``, ``drop_path_rate``, ...). fr_dist's common arguments
map onto insightface's: ``embedding_size`` = ``num_classes``, ``input_size`` = ``img_size``,
``activation_checkpointing`` = ``using_checkpoint`` (insightface turns it on for vit_b / vit_l / vit_h;
here ``model.activation_checkpointing`` decides, the recipes set it). ``dropout`` is refused:
insightface's ViT has no dropout before its head (``drop_rate`` is the MLP / projection dropout).

Two deliberate differences, neither visible in the weights:

* insightface's ``random_masking`` is called without its ratio, so it always masks 10% of the
  tokens whatever ``mask_ratio`` says (0.05 for the ``*_mask_005`` models); here ``mask_ratio`` is
  the ratio used. With ``mask_ratio=0.1`` the mask (and the random numbers it draws) is insightface's.
* with ``mask_ratio == 0`` the ``mask_token`` is never used, so it is frozen (``requires_grad``
  False): DDP without ``find_unused_parameters`` would otherwise wait for its gradient. It stays
  in the state dict.

The attention (scores, softmax, weighted sum) runs in float32 (or the input's dtype if wider) with
autocast off, as insightface's ``Attention`` does, and returns the input's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fr_dist.models.iresnet import checkpoint_stage, forwards_to

__all__ = ["VisionTransformer", "VIT_CONFIGS", "vit_factory"]

# insightface get_model's arguments of each name (img_size 112, patch 9, 8 heads, norm "ln" for all)
VIT_CONFIGS: dict[str, dict] = {
    "vit_t": dict(embed_dim=256, depth=12, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_t_dp005_mask0": dict(embed_dim=256, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_s": dict(embed_dim=512, depth=12, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_s_dp005_mask_0": dict(embed_dim=512, depth=12, drop_path_rate=0.05, mask_ratio=0.0),
    "vit_b": dict(embed_dim=512, depth=24, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_b_dp005_mask_005": dict(embed_dim=512, depth=24, drop_path_rate=0.05, mask_ratio=0.05),
    # insightface has no plain "vit_l": fr_dist's is its only ViT-L, vit_l_dp005_mask_005
    "vit_l": dict(embed_dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.05),
    "vit_l_dp005_mask_005": dict(embed_dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.05),
    "vit_h": dict(embed_dim=1024, depth=48, drop_path_rate=0.1, mask_ratio=0.0),
}
_VIT_COMMON = dict(patch_size=9, num_heads=8, norm_layer="ln")


def _no_autocast(device_type: str):
    """Autocast off on CPU / CUDA (``torch.autocast`` knows no other device, e.g. the planner's meta)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` and
    scale the kept ones by 1 / (1 - p) (timm's ``DropPath``; no parameters)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample: [N, 1, 1]
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Mlp(nn.Module):
    """fc1 - ReLU6 - dropout - fc2 - dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` one Linear(C, 3C), the scores in float32."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vit: embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, L, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(n, L, 3, h, c // h).permute(2, 0, 3, 1, 4)  # [3, N, h, L, c/h]
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        with _no_autocast(x.device.type):
            q, k, v = qkv.to(dtype).unbind(0)  # each [N, h, L, c/h]
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
            )
        out = out.to(qkv.dtype).transpose(1, 2).reshape(n, L, c)  # [N, h, L, c/h] -> [N, L, c]
        return self.proj_drop(self.proj(out))


class TokenBatchNorm(nn.Module):
    """insightface's ``VITBatchNorm`` (``norm_layer="bn"``): BatchNorm1d over the token axis of [N, L, C]."""

    def __init__(self, num_tokens: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def _norm(kind: str, dim: int, num_tokens: int) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "bn":
        return TokenBatchNorm(num_tokens)
    raise ValueError(f"vit: norm_layer must be 'ln' or 'bn', got {kind!r}")


class Block(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(
        self, dim, num_heads, num_tokens, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, norm
    ):
        super().__init__()
        self.norm1 = _norm(norm, dim, num_tokens)
        self.norm2 = _norm(norm, dim, num_tokens)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """[N, 3, S, S] -> conv(kernel = stride = patch_size) -> [N, L, C] tokens, L = (S // patch_size)^2."""

    def __init__(self, img_size: int, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"vit: input size {tuple(x.shape[-2:])} is not the model's {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, C, S/p, S/p] -> [N, L, C]


class VisionTransformer(nn.Module):
    """insightface's ``VisionTransformer`` under fr_dist's backbone arguments (see the module docstring)."""

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: str = "ln",
        mask_ratio: float = 0.1,
    ):
        super().__init__()
        if dropout:
            raise ValueError(
                "vit: model.dropout is not used by insightface's ViT; set model.kwargs.drop_rate "
                "(MLP / projection dropout) instead"
            )
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"vit: mask_ratio must be in [0, 1), got {mask_ratio}")
        if norm_layer == "bn" and mask_ratio > 0:
            raise ValueError("vit: norm_layer='bn' normalises per token and needs mask_ratio=0")
        if patch_size < 1 or input_size < patch_size:
            raise ValueError(f"vit: patch_size {patch_size} does not fit input_size {input_size}")
        self.embedding_size, self.input_size = int(embedding_size), int(input_size)
        self.embed_dim = int(embed_dim)
        self.mask_ratio = float(mask_ratio)
        self.activation_checkpointing = activation_checkpointing
        # module creation order = insightface's, so one seed gives the same initial weights
        self.patch_embed = PatchEmbed(self.input_size, patch_size, in_channels, self.embed_dim)
        L = self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, L, self.embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth, rising
        self.blocks = nn.ModuleList(
            Block(
                self.embed_dim,
                num_heads,
                L,
                mlp_ratio,
                qkv_bias,
                qk_scale,
                drop_rate,
                attn_drop_rate,
                r,
                norm_layer,
            )
            for r in rates
        )
        self.norm = _norm(norm_layer, self.embed_dim, L)
        self.feature = nn.Sequential(
            nn.Linear(self.embed_dim * L, self.embed_dim, bias=False),
            nn.BatchNorm1d(self.embed_dim, eps=2e-5),
            nn.Linear(self.embed_dim, self.embedding_size, bias=False),
            nn.BatchNorm1d(self.embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.mask_token.requires_grad_(self.mask_ratio > 0)  # unused without the mask (see above)

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``int(L * (1 - mask_ratio))`` tokens per image: ([N, L_keep, C], restore ids [N, L])."""
        n, L, c = x.shape
        keep = int(L * (1 - self.mask_ratio))
        ids_shuffle = torch.rand(n, L, device=x.device).argsort(dim=1)  # [N, L]: ascending noise first
        ids_restore = ids_shuffle.argsort(dim=1)  # [N, L]: inverse permutation
        idx = ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, c)  # [N, L_keep, C]
        return x.gather(1, idx), ids_restore

    def _unmask(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """[N, L_keep, C] + mask tokens -> [N, L, C] in the original token order."""
        n, keep, c = x.shape
        fill = self.mask_token.to(x.dtype).expand(n, ids_restore.shape[1] - keep, c)  # [N, L - L_keep, C]
        x = torch.cat([x, fill], dim=1)  # [N, L, C], shuffled order
        return x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, c))  # [N, L, C]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # [N, L, C]
        masked = self.training and self.mask_ratio > 0
        if masked:
            x, ids_restore = self._mask(x)  # [N, L_keep, C]
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint_stage(block, x) if ckpt else block(x)
        x = self.norm(x)
        if masked:
            x = self._unmask(x, ids_restore)  # [N, L, C]
        return x.flatten(1)  # [N, L, C] -> [N, L*C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x))  # [N, L*C] -> [N, D]


def vit_factory(name: str):
    """The registered factory of ``name`` (a key of :data:`VIT_CONFIGS`): insightface's arguments
    as defaults, any of them replaceable by keyword (``model.kwargs``)."""
    defaults = {**_VIT_COMMON, **VIT_CONFIGS[name]}

    @forwards_to(VisionTransformer)
    def factory(**kwargs) -> VisionTransformer:
        return VisionTransformer(**{**defaults, **kwargs})

    factory.__name__ = name
    factory.__doc__ = f"insightface get_model({name!r}): {defaults}"
    return factory
