"""The binary family's head: a sharded classifier running a :class:`~fr_dist.heads.binary.BinaryLoss`.

Every term involves one (sample, class) pair, so a rank owning classes [start, start + n) computes its part
alone: the forward needs the gathered batch only, and no max/sum all-reduce over B-length vectors exists.
Per step the head issues one all-gather (embeddings with labels packed in), one reduce-scatter (embedding
gradients), a 1-element all-reduce of the loss value and a 1-element all-reduce of dL/db (plus the
optional 3-int shape handshake, ``check_inputs``).

Weight normalisation (as OpenSphere, ``BinaryLoss.project_rows``): each forward re-projects the head's own
weight rows onto the unit sphere in place, outside autograd; the loss uses the (detached) row norms, so
``weight.grad`` is dL/dW_used, the gradient w.r.t. the unit-norm rows. A loss with ``project_rows=False``
(UniFace) normalises differentiably instead (F.normalize with the loss's ``norm_eps``): the rows are never
modified by a forward and ``weight.grad`` is dL/dW_raw.

Two paths, on the same stages (:class:`~fr_dist.heads.binary.BinaryStages`): ``fused=True`` (default) the
chunked single pass of heads/binary.py (+ its Triton kernel, optional in-pass row update, negative
sampling); ``fused=False`` materialises cos [W*B, n] with autograd GEMMs and dL/dcos (kept for comparison).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fr_dist import comm
from fr_dist.heads.binary import BinaryLoss, BinaryPlan, BinaryStages, binary_partial_loss
from fr_dist.heads.row_optim import RowAdamW, RowOptimizer, build_row_optimizer
from fr_dist.heads.sampling import num_sampled, sample_negatives
from fr_dist.heads.sharded import (
    OptimizerContract,
    ShardedClassifier,
    autocast_gemm_dtype,
    resolve_loss,
)

__all__ = [
    "BinaryHead",
    "binary_block_loss",
    "KERNELS",
    "PROXY_DTYPES",
]

PROXY_DTYPES = ("fp32", "bf16")
# the fused chunk's elementwise part: auto = the Triton kernel on CUDA when Triton is installed, else eager
KERNELS = ("auto", "eager", "triton")

# Rows of the [N, n] cosine matrix processed at once by the materialised path (bounds temporaries).
_CHUNK_ELEMS = 1 << 22


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


class _BinaryBlock(torch.autograd.Function):
    """Materialised local loss: cos [N, n], target column [N], bias [1] -> partial loss (scalar).

    dL/dcos is computed in the forward, row chunk by row chunk, with the fused pass's stages, and kept in
    cos.dtype (one [N, n] tensor), as insightface's DistCrossEntropy does for softmax.
    """

    @staticmethod
    def forward(ctx, cos, target_col, bias, loss: BinaryLoss, batch_size):
        N, n = cos.shape
        cdt = torch.float64 if cos.dtype == torch.float64 else torch.float32
        b = float(bias.detach().reshape(()))
        co = loss.coefficients(b, batch_size)
        z0_t = torch.full((), co.z0, dtype=cdt, device=cos.device)
        grad_cos = torch.empty_like(cos)
        loss_acc = torch.zeros((), dtype=torch.float64, device=cos.device)
        gb_acc = torch.zeros((), dtype=torch.float64, device=cos.device)
        step = max(1, _CHUNK_ELEMS // max(n, 1))
        for lo in range(0, N, step):
            u = cos[lo : lo + step].detach().to(cdt, copy=True)  # [rows, n], becomes dL/dcos / alpha
            tc = target_col[lo : lo + step]  # [rows]
            pr = (tc >= 0).nonzero().reshape(-1)  # [p] rows with their target here
            pc = tc[pr]  # [p]
            cos_t = u[pr, pc].clone()  # [p]
            p, s = torch.empty_like(u), torch.empty_like(u)  # [rows, n]
            loss_n, gb_n = BinaryStages.negatives_(u, p, s, (pr, pc), None, co, z0_t, grads=True)
            loss_t, dz_t = BinaryStages.targets(loss.target_logit(cos_t, b), co.w_pos)
            loss_acc += loss_n + loss_t
            gb_acc += gb_n + BinaryStages.target_bias_grad(dz_t, cos_t, loss, b)
            u[pr, pc] = BinaryStages.target_grad(dz_t, cos_t, loss, co, b)
            grad_cos[lo : lo + step] = u.mul_(co.alpha).to(cos.dtype)
        if loss.bias_sign != 1.0:
            gb_acc = gb_acc * loss.bias_sign  # sum dL/dz -> dL/db
        ctx.save_for_backward(grad_cos, gb_acc)
        ctx.bias_dtype = bias.dtype
        return loss_acc.to(cos.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_cos, grad_b = ctx.saved_tensors
        g_cos = grad_cos * grad_out.to(grad_cos.dtype)
        g_b = (grad_b * grad_out.to(grad_b.dtype)).reshape(1).to(ctx.bias_dtype)
        return g_cos, None, g_b, None, None


def binary_block_loss(
    cos: torch.Tensor, target_col: torch.Tensor, bias: torch.Tensor, loss: BinaryLoss, batch_size: int
) -> torch.Tensor:
    """This shard's share of ``loss`` from a materialised cosine block (no collectives).

    cos [N, n] for the shard's n classes (differentiable); target_col [N] in [-1, n); bias [1];
    batch_size is the GLOBAL batch size B that normalises the loss.
    """
    return _BinaryBlock.apply(cos, target_col, bias, loss, int(batch_size))


class BinaryHead(ShardedClassifier):
    """Model-parallel classifier with a binary loss (the fr_dist product: SphereFace2).

    ``loss = head(local_embeddings [B, D], local_labels [B])`` returns the loss of the GLOBAL batch
    (identical on every rank). ``head.weight`` is this rank's [num_local, D] shard and ``head.bias`` the
    loss's shared learnable bias b, initialised from the GLOBAL K (:meth:`BinaryLoss.initial_bias`) and
    kept identical on all ranks (its gradient is all-reduced). A registered subclass sets ``loss_cls``:
    then ``loss`` may be omitted and its hyper-parameters given as keywords.
    """

    loss_cls: type = BinaryLoss

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        loss: BinaryLoss | None = None,
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
        **loss_kwargs,
    ):
        loss = resolve_loss(type(self), loss, loss_kwargs)
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
            init_std=loss.weight_init_std(embedding_size),
            embedding_grad_scale=embedding_grad_scale,
            check_inputs=check_inputs,
            check_finite=check_finite,
            # bf16 proxies are drawn straight into bf16: no transient fp32 [n, D] copy at 10^7+ rows
            param_dtype=torch.bfloat16
            if fused_update and proxy_dtype == "bf16" and not master_weights
            else torch.float32,
        )
        self.attach_loss(loss)
        b0 = loss.initial_bias(num_classes)
        self.bias = torch.nn.Parameter(torch.tensor([b0], dtype=torch.float32))  # [1], replicated
        self.fused = bool(fused)
        """Chunked single-pass loss (:mod:`fr_dist.heads.binary`); False = the materialised block path."""
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

    # ------------------------------------------------------------------ what the trainer asks
    def optimizer_contract(self) -> OptimizerContract:
        return OptimizerContract(
            row_optimizer=self.fused_update, option=f"head.{self.loss_name}.fused_update"
        )

    def configure_row_optimizer(self, kind: str, **hparams) -> None:
        self.row_optimizer = build_row_optimizer(kind, **hparams)

    def set_row_lr(self, lr: float) -> None:
        if self._row_optimizer is not None:
            self._row_optimizer.lr = lr

    def log_scalars(self) -> dict[str, float]:
        return {self.loss.bias_metric: float(self.bias.detach())}

    @property
    def row_optimizer(self):
        """The in-pass update's optimizer (:mod:`fr_dist.heads.row_optim`): ``RowOptimizer`` (SGD: lr /
        momentum / nesterov / weight_decay) or ``RowAdamW`` (lr / betas / eps / weight_decay). The trainer
        sets it (:meth:`configure_row_optimizer`) and ``lr`` every step from the head's LR schedule.
        Assigning a ``RowAdamW`` registers its per-row state (zeros) next to ``weight_momentum`` (its
        exp_avg): ``weight_exp_avg_sq`` [n, D] (the storage dtype of the proxies, bf16 or fp32) and
        ``weight_step`` [n] int32 (the per-row bias-correction count); all are checkpointed and re-sharded
        as rows. Assigning an SGD optimizer drops them again. Assign before loading a checkpoint."""
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
            super().extra_repr()
            + f", loss={self.loss!r}, fused={self.fused}, fused_update={self.fused_update}, "
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
        """Project the weight rows back onto the unit sphere (OpenSphere does this every forward; a loss with
        ``project_rows=False`` never asks for it)."""
        if self.num_local:
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self._forward_block(embeddings, labels)
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        x_hat = F.normalize(x_all, dim=1, eps=self.loss.norm_eps)  # [W*B, D]
        bias = comm.copy_to_shards(self.bias, self.process_group, name="bias")  # bwd: 1-elem all-reduce
        do_update = self.fused_update and self.training and torch.is_grad_enabled()
        plan = BinaryPlan(
            loss=self.loss,
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
        partial = binary_partial_loss(x_hat, self.weight, bias, target_col, plan)
        return comm.reduce_from_shards(partial, self.process_group, name="loss")  # 1-elem all-reduce

    def _chunk_kernel(self, device: torch.device) -> str:
        if self.kernel == "eager" or (self.kernel == "auto" and device.type != "cuda"):
            return "eager"
        from fr_dist.heads import binary_triton  # imports triton (which reads TRITON_INTERPRET once)

        if binary_triton.available(device):
            return "triton"
        if self.kernel == "triton":
            raise RuntimeError(
                "kernel='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU): "
                "pip install triton, or use kernel='eager'"
            )
        return "eager"

    def _forward_block(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The materialised path: cos [W*B, n] and dL/dcos (kept for comparison)."""
        eps = self.loss.norm_eps
        if self.loss.project_rows:
            self.renormalize_()
        x_all, labels_all = self.gather(embeddings, labels)  # [W*B, D], [W*B]
        target_col = self.local_targets(labels_all)  # [W*B] in [-1, n_r)
        x_hat = F.normalize(x_all, dim=1, eps=eps)  # [W*B, D]
        w = self.weight
        if self.loss.project_rows:
            w_hat = w / w.detach().norm(dim=1, keepdim=True).clamp_min(eps)  # [n_r, D]
        else:
            w_hat = F.normalize(w, dim=1, eps=eps)  # [n_r, D], differentiable: dL/dW_raw
        cos = F.linear(x_hat, w_hat)  # [W*B, n_r] (bf16 under autocast)
        cos = cos.float() if cos.dtype in (torch.bfloat16, torch.float16) else cos
        bias = comm.copy_to_shards(self.bias, self.process_group, name="bias")  # bwd: 1-elem all-reduce
        partial = binary_block_loss(cos, target_col, bias, self.loss, x_all.shape[0])
        return comm.reduce_from_shards(partial, self.process_group, name="loss")  # 1-elem all-reduce
