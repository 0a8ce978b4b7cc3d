"""SphereFace2: binary one-vs-all loss without a softmax normaliser, model-parallel over classes.

For a global batch of B embeddings with cosines c_ij = <x_i/|x_i|, w_j/|w_j|>:

    L = (lw / (r B)) sum_i [ lam softplus(-(r g_hat_iy + b)) + (1 - lam) sum_{j != y_i} softplus(r g_hat_ij + b) ]

with g_hat from :func:`fr_dist.heads.margins.sphereface2_target_value`. Every term involves one
(sample, class) pair, so a rank owning classes [start, start + n) computes its part alone: the
forward needs the gathered batch only, and no max/sum all-reduce over B-length vectors exists.

Per step, :class:`SphereFace2Head` issues one all-gather (embeddings with labels packed in),
one reduce-scatter (embedding gradients), a 1-element all-reduce of the loss value and a
1-element all-reduce of dL/db (plus the optional 3-int shape handshake, ``check_inputs``).

Weight normalisation (as OpenSphere): at the start of each forward the head re-projects its
own weight rows onto the unit sphere in place, outside autograd; the forward divides by the
(detached) row norms, so ``weight.grad`` is dL/dW_used, the gradient w.r.t. the unit-norm rows.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fr_dist import comm
from fr_dist.heads import sf2_triton
from fr_dist.heads.base import ShardedClassifier, autocast_gemm_dtype
from fr_dist.heads.margins import (
    SPHEREFACE2_MARGINS,
    sphereface2_bias_init,
    sphereface2_target_value,
    target_mask,
)
from fr_dist.heads.sampling import num_sampled, sample_negatives
from fr_dist.heads.sf2_fused import FusedPlan, RowAdamW, RowOptimizer, sphereface2_fused_partial_loss

__all__ = ["SphereFace2Head", "sphereface2_loss", "sphereface2_partial_loss", "GRAD_MODES"]

GRAD_MODES = ("detached", "exact")

# Rows of the [N, n] cosine matrix processed at once in the fused loss (bounds temporaries).
_CHUNK_ELEMS = 1 << 22


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z), exact for every z (no threshold switch)."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def _check_hparams(margin: str, grad: str, lam: float) -> None:
    if margin not in SPHEREFACE2_MARGINS:
        raise ValueError(f"unknown SphereFace2 margin {margin!r}; known: {SPHEREFACE2_MARGINS}")
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {grad!r}; known: {GRAD_MODES}")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam (lambda) must be in (0, 1), got {lam}")


PROXY_DTYPES = ("fp32", "bf16")
# the fused chunk's elementwise part: auto = the Triton kernel on CUDA when Triton is installed, else eager
KERNELS = ("auto", "eager", "triton")


def _check_fused_options(
    fused, chunk_size, fused_update, proxy_dtype, master_weights, sample_rate, num_negatives
):
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    if proxy_dtype not in PROXY_DTYPES:
        raise ValueError(f"unknown proxy_dtype {proxy_dtype!r}; known: {PROXY_DTYPES}")
    if (proxy_dtype != "fp32" or master_weights) and not fused_update:
        raise ValueError(
            "proxy_dtype=bf16 / master_weights need fused_update=True (the head owns the update)"
        )
    if master_weights and proxy_dtype == "fp32":
        raise ValueError("master_weights only applies to proxy_dtype=bf16")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if num_negatives < 0 or (num_negatives and sample_rate < 1.0):
        raise ValueError("give either sample_rate < 1 or num_negatives > 0 (negatives per rank), not both")
    if not fused and (fused_update or sample_rate < 1.0 or num_negatives):
        raise ValueError("fused_update / negative sampling need fused=True")


class _SphereFace2Partial(torch.autograd.Function):
    """Fused local loss: cos [N, n], target column [N], bias [1] -> partial loss (scalar).

    The gradient dL/dcos is computed in the forward, chunk by chunk, and kept in cos.dtype
    (one [N, n] tensor), as insightface's DistCrossEntropy does for softmax.
    """

    @staticmethod
    def forward(ctx, cos, target_col, bias, lam, r, m, t, lw, margin, grad, batch_size):
        N, n = cos.shape
        math_dtype = torch.float64 if cos.dtype == torch.float64 else torch.float32
        b = bias.detach().to(math_dtype).reshape(())
        grad_cos = torch.empty_like(cos)
        loss = torch.zeros((), dtype=math_dtype, device=cos.device)
        grad_b = torch.zeros((), dtype=math_dtype, device=cos.device)
        scale = lw / (r * batch_size)
        step = max(1, _CHUNK_ELEMS // max(n, 1))
        for lo in range(0, N, step):
            c = cos[lo : lo + step].detach().to(math_dtype)  # [rows, n]
            is_t = target_mask(target_col[lo : lo + step], n)  # [rows, n]
            if grad == "exact":
                with torch.enable_grad():
                    cr = c.requires_grad_(True)
                    ghat = sphereface2_target_value(cr, is_t, margin, m, t)
                    (dghat,) = torch.autograd.grad(ghat.sum(), cr)
                ghat = ghat.detach()
            else:
                ghat = sphereface2_target_value(c, is_t, margin, m, t)
                dghat = None
            z = r * ghat + b
            w_pos = torch.tensor(lam * scale, dtype=math_dtype, device=cos.device)
            w_neg = torch.tensor((1.0 - lam) * scale, dtype=math_dtype, device=cos.device)
            w = torch.where(is_t, w_pos, w_neg)  # [rows, n] per-entry weight
            isf = is_t.to(math_dtype)
            loss += (w * (_softplus(z) - isf * z)).sum()
            dz = w * (torch.sigmoid(z) - isf)  # dL/dz
            grad_b += dz.sum()
            gc = dz * r if dghat is None else dz * (r * dghat)
            grad_cos[lo : lo + step] = gc.to(cos.dtype)
        ctx.save_for_backward(grad_cos, grad_b)
        ctx.bias_dtype = bias.dtype
        return loss.to(cos.dtype if cos.dtype.is_floating_point else math_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_cos, grad_b = ctx.saved_tensors
        g_cos = grad_cos * grad_out.to(grad_cos.dtype)
        g_b = (grad_b * grad_out.to(grad_b.dtype)).reshape(1).to(ctx.bias_dtype)
        return g_cos, None, g_b, None, None, None, None, None, None, None, None


def sphereface2_partial_loss(
    cos: torch.Tensor,
    target_col: torch.Tensor,
    bias: torch.Tensor,
    *,
    lam: float,
    r: float,
    m: float,
    t: float,
    lw: float,
    margin: str,
    grad: str,
    batch_size: int,
) -> torch.Tensor:
    """This shard's share of the SphereFace2 loss (fused forward/backward, no collectives).

    cos [N, n] for the shard's n classes; target_col [N] in [-1, n); bias [1];
    batch_size is the GLOBAL batch size B that normalises the loss.
    """
    _check_hparams(margin, grad, lam)
    return _SphereFace2Partial.apply(
        cos,
        target_col,
        bias,
        float(lam),
        float(r),
        float(m),
        float(t),
        float(lw),
        margin,
        grad,
        int(batch_size),
    )


def sphereface2_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor,
    lam: float = 0.7,
    r: float = 40.0,
    m: float = 0.4,
    t: float = 3.0,
    lw: float = 50.0,
    margin: str = "C",
    grad: str = "detached",
) -> torch.Tensor:
    """Dense single-process reference, written with plain autograd ops (independent of the fused path).

    embeddings [B, D] (raw), weight [K, D], labels [B] in [0, K), bias [1] or scalar.
    The weight rows are divided by their detached norms, so for unit-norm rows (what the head
    keeps) ``weight.grad`` is OpenSphere's dL/dW_used; nothing is modified in place.
    """
    _check_hparams(margin, grad, lam)
    B, K = embeddings.shape[0], weight.shape[0]
    x_hat = F.normalize(embeddings, dim=1)  # [B, D]
    w_hat = weight / weight.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)  # [K, D]
    cos = x_hat @ w_hat.t()  # [B, K]
    is_t = F.one_hot(labels.long(), K).bool()  # [B, K]
    if grad == "exact":
        ghat = sphereface2_target_value(cos, is_t, margin, m, t)
    else:
        ghat = cos + (sphereface2_target_value(cos.detach(), is_t, margin, m, t) - cos.detach())
    z = r * ghat + bias.reshape(())
    pos = lam * F.softplus(-z, beta=1.0, threshold=1e9)
    neg = (1.0 - lam) * F.softplus(z, beta=1.0, threshold=1e9)
    per = torch.where(is_t, pos, neg)
    return lw / (r * B) * per.sum()


class SphereFace2Head(ShardedClassifier):
    """Model-parallel SphereFace2 classifier (the fr_dist product).

    ``loss = head(local_embeddings [B, D], local_labels [B])`` returns the loss of the GLOBAL
    batch (identical on every rank). ``head.weight`` is this rank's [num_local, D] shard and
    ``head.bias`` the shared learnable bias b, initialised from the GLOBAL K (OpenSphere's
    closed form) and kept identical on all ranks (its gradient is all-reduced).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        lam: float = 0.7,
        r: float = 40.0,
        m: float = 0.4,
        t: float = 3.0,
        lw: float = 50.0,
        margin: str = "C",
        grad: str = "detached",
        process_group=None,
        seed: int = 0,
        embedding_grad_scale: float = 1.0,
        check_inputs: bool = True,
        check_finite: bool = True,
        fused: bool = True,
        chunk_size: int = 0,
        fused_update: bool = False,
        proxy_dtype: str = "fp32",
        master_weights: bool = False,
        sample_rate: float = 1.0,
        num_negatives: int = 0,
        kernel: str = "auto",
    ):
        _check_hparams(margin, grad, lam)
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")
        _check_fused_options(
            fused, chunk_size, fused_update, proxy_dtype, master_weights, sample_rate, num_negatives
        )
        super().__init__(
            embedding_size,
            num_classes,
            process_group=process_group,
            seed=seed,
            embedding_grad_scale=embedding_grad_scale,
            check_inputs=check_inputs,
            check_finite=check_finite,
            # bf16 proxies are drawn straight into bf16: no transient fp32 [n, D] copy at 10^7+ rows
            param_dtype=torch.bfloat16
            if fused_update and proxy_dtype == "bf16" and not master_weights
            else torch.float32,
        )
        self.lam, self.r, self.m, self.t, self.lw = (
            float(lam),
            float(r),
            float(m),
            float(t),
            float(lw),
        )
        self.margin, self.grad = margin, grad
        b0 = sphereface2_bias_init(num_classes, lam, r, m, t, margin)
        self.bias = torch.nn.Parameter(torch.tensor([b0], dtype=torch.float32))  # [1], replicated
        self.fused = bool(fused)
        """Chunked single-pass loss (:mod:`fr_dist.heads.sf2_fused`); False = the cosine-block path."""
        self.chunk_size = int(chunk_size)
        """Classes per chunk of the fused pass; 0 = from a ~1 MB budget per [W*B, chunk] temporary."""
        self.fused_update = bool(fused_update)
        """Update the proxies (and their momentum) inside the forward of a training step with
        :attr:`row_optimizer`; the weight is then not a trainable parameter (requires_grad=False),
        so no optimizer must hold it and its [n, D] gradient is never allocated."""
        self.proxy_dtype = proxy_dtype
        self.master_weights = bool(master_weights)
        self.sample_rate, self.num_negatives = float(sample_rate), int(num_negatives)
        self.kernel = kernel
        """Elementwise part of the fused chunk: auto (Triton on CUDA when installed) | eager | triton."""
        if fused_update:
            self.weight.requires_grad_(False)
            if master_weights:
                self.register_buffer("weight_master", self.weight.detach().clone())  # [n, D] fp32
            if proxy_dtype == "bf16":
                self.weight.data = self.weight.data.to(torch.bfloat16)
            self.register_buffer("weight_momentum", torch.zeros_like(self.weight))  # [n, D], per row
        self.row_optimizer = RowOptimizer() if fused_update else None
        if self.sampling:
            self.generator = torch.Generator().manual_seed(int(seed) * 7919 + 104_729 + self.rank)

    @property
    def row_optimizer(self):
        """The fused update's optimizer: :class:`RowOptimizer` (SGD: lr / momentum / nesterov /
        weight_decay) or :class:`RowAdamW` (lr / betas / eps / weight_decay). The trainer sets it, and
        ``lr`` every step from the head's LR schedule. Assigning a :class:`RowAdamW` registers its
        per-row state (zeros) next to ``weight_momentum`` (its exp_avg): ``weight_exp_avg_sq`` [n, D]
        (the storage dtype of the proxies, bf16 or fp32) and ``weight_step`` [n] int32 (the per-row
        bias-correction count); all are checkpointed and re-sharded as rows. Assigning an SGD
        optimizer drops them again. Assign before loading a checkpoint."""
        return self._row_optimizer

    @row_optimizer.setter
    def row_optimizer(self, opt) -> None:
        if opt is not None and not self.fused_update:
            raise ValueError("row_optimizer needs fused_update=True")
        self._row_optimizer = opt
        if isinstance(opt, RowAdamW):
            if not hasattr(self, "weight_exp_avg_sq"):
                self.register_buffer("weight_exp_avg_sq", torch.zeros_like(self.weight_momentum))  # [n, D]
                self.register_buffer(
                    "weight_step", torch.zeros(self.num_local, dtype=torch.int32, device=self.weight.device)
                )  # [n]
        elif hasattr(self, "weight_exp_avg_sq"):
            del self.weight_exp_avg_sq, self.weight_step

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", lam={self.lam}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, "
            f"margin={self.margin}, grad={self.grad}, fused={self.fused}, fused_update={self.fused_update}, "
            f"proxy_dtype={self.proxy_dtype}, sample_rate={self.sample_rate}, num_negatives={self.num_negatives}, "
            f"kernel={self.kernel}"
        )

    @torch.no_grad()
    def load_resharded(self, shards, optimizer=None, source: str = "checkpoint") -> set:
        """As the base class; fp32 master rows missing from a checkpoint come from the loaded weight."""
        loaded = super().load_resharded(shards, optimizer, source)
        if hasattr(self, "weight_master") and "weight_master" not in loaded:
            self.weight_master.copy_(self.weight.float())
        if hasattr(self, "weight_step") and "weight_step" not in loaded:
            # no AdamW state saved (e.g. a fused-SGD run): its momentum is no exp_avg; start AdamW afresh
            warnings.warn(
                f"{source} has no fused AdamW state: exp_avg / exp_avg_sq / steps start at 0", stacklevel=2
            )
            for name in ("weight_momentum", "weight_exp_avg_sq", "weight_step"):
                getattr(self, name).zero_()
        return loaded

    @property
    def sampling(self) -> bool:
        """Negative sampling on: only positives and a random subset of negatives are used per step."""
        return self.sample_rate < 1.0 or self.num_negatives > 0

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Project the weight rows back onto the unit sphere (OpenSphere does this every forward)."""
        if self.num_local:
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self._forward_cosine_block(embeddings, labels)
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        x_hat = F.normalize(x_all, dim=1)  # [W*B, D]
        bias = comm.copy_to_shards(self.bias, self.process_group, name="bias")  # bwd: 1-elem all-reduce
        do_update = self.fused_update and self.training and torch.is_grad_enabled()
        plan = FusedPlan(
            **self._loss_hparams(),
            batch_size=x_all.shape[0],
            chunk_size=self.chunk_size,
            optimizer=self.row_optimizer,
            momentum=getattr(self, "weight_momentum", None),
            exp_avg_sq=getattr(self, "weight_exp_avg_sq", None),
            row_step=getattr(self, "weight_step", None),
            master=getattr(self, "weight_master", None),
            do_update=do_update,
            mm_dtype=autocast_gemm_dtype(x_hat.device),  # bf16 operands under autocast, as Partial FC's
            kernel=self._chunk_kernel(x_hat.device),
            # identical on every rank (gathered batch, replicated bias): all skip together
            update_ok=not do_update
            or bool(torch.isfinite(x_hat.detach()).all() and torch.isfinite(self.bias.detach()).all()),
        )
        if self.sampling:
            k = self.num_negatives or num_sampled(self.num_local, self.sample_rate)
            plan.index, target_col, plan.col_weight = sample_negatives(
                target_col, self.num_local, k, self.generator
            )  # [S], [W*B] in [-1, S), [S]
        partial = sphereface2_fused_partial_loss(x_hat, self.weight, bias, target_col, plan)
        return comm.reduce_from_shards(partial, self.process_group, name="loss")  # 1-elem all-reduce

    def _chunk_kernel(self, device: torch.device) -> str:
        if self.kernel == "eager" or (self.kernel == "auto" and device.type != "cuda"):
            return "eager"
        if sf2_triton.available(device):
            return "triton"
        if self.kernel == "triton":
            raise RuntimeError(
                "kernel='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU): "
                "pip install triton, or use kernel='eager'"
            )
        return "eager"

    def _loss_hparams(self) -> dict:
        """The loss hyper-parameters, as both loss paths take them."""
        return dict(
            lam=self.lam, r=self.r, m=self.m, t=self.t, lw=self.lw, margin=self.margin, grad=self.grad
        )

    def _forward_cosine_block(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unfused path: materialises cos [W*B, n] and dL/dcos (kept for comparison)."""
        self.renormalize_()
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        x_hat = F.normalize(x_all, dim=1)  # [W*B, D]
        w = self.weight
        w_hat = w / w.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n_r, D]
        cos = F.linear(x_hat, w_hat)  # [W*B, n_r] (bf16 under autocast)
        cos = cos.float() if cos.dtype in (torch.bfloat16, torch.float16) else cos
        bias = comm.copy_to_shards(self.bias, self.process_group, name="bias")  # bwd: 1-elem all-reduce
        partial = sphereface2_partial_loss(
            cos, target_col, bias, **self._loss_hparams(), batch_size=x_all.shape[0]
        )
        return comm.reduce_from_shards(partial, self.process_group, name="loss")  # 1-elem all-reduce
