"""What the softmax losses' own tests share (tests/unit/test_loss_<name>.py): the float64 class rows and labels
their batches start from, and one head run over consecutive batches on a rank's slice of each global batch."""

from __future__ import annotations

import torch

from fr_dist import comm


def rows_and_labels(world: int, B: int, K: int, D: int, g: torch.Generator):
    """[K, D] float64 rows of different norms (in 0.5..1.5: a head must normalise them) and [world * B]
    labels with the first and the last class present."""
    W = torch.randn(K, D, generator=g, dtype=torch.float64) * (
        0.5 + torch.rand(K, 1, generator=g, dtype=torch.float64)
    )
    y = torch.randint(0, K, (world * B,), generator=g)
    y[0], y[-1] = 0, K - 1
    return W, y


def run_batches(head, batches, B: int, rank: int = 0, world: int = 1) -> list[dict]:
    """Every global batch (x_all [world * B, D], y_all [world * B]) through ``head`` on ``rank``'s slice [B]:
    per batch the loss, this rank's dL/dx, dL/dW, the head's state buffers (by name) and the collectives."""
    out = []
    for x_all, y_all in batches:
        x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)  # [B, D] this rank's rows
        comm.reset_comm_stats()
        loss = head(x, y_all[rank * B : (rank + 1) * B])
        loss.backward()
        state = {k: v.clone() for k, v in head.state_buffers().items()}
        out.append(
            dict(loss=loss.detach(), dx=x.grad, dW=head.weight.grad.clone(), stats=comm.comm_stats(), **state)
        )
        head.zero_grad(set_to_none=True)
    return out
