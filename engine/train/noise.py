"""SGD noise, measured: the gradient noise scale of McCandlish et al. (2018, App. A.1), B_simple.

With gradient accumulation a step already computes k micro-batch gradients g_1..g_k (each the mean
over b samples) and their mean G (over B = k·b); under DDP every rank's micro-batches count (k =
ranks × micro-batches per rank): on a flush step the last micro-batch's backward runs without DDP's
all-reduce, each rank's norms are averaged over the ranks, and the loop then averages the gradients
itself (engine/train/distributed.py average_grads), as DDP would have. Their squared norms estimate, without bias,

    |G_true|² ≈ (B·|G|² − b·mean|g_i|²) / (B − b)
    tr(Σ)     ≈ (mean|g_i|² − |G|²) / (1/b − 1/B)          (Σ: the per-sample gradient covariance)
    B_simple  = tr(Σ) / |G_true|²

so the noise the paper varies (lr/B against B_simple) is recorded at no extra forward or backward:
on a flush step the loop keeps the accumulated gradient before each micro-batch's backward and
reads the micro-batch's own gradient as the difference. One step's estimates are noisy (either
can be negative); they are recorded raw (`noise_tr_sigma`, `noise_g2`) so that a reader can average
them before dividing, with `noise_scale` their ratio where |G_true|² > 0 and `grad_norm` = |G|.
"""
from __future__ import annotations

import math

import torch


class MicroGrads:
    """Accumulates mean|g_i|² over a step's micro-batches from the growing .grad buffers."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.prev: list[torch.Tensor | None] = [None] * len(params)
        self.sq: list[torch.Tensor] = []

    def after_backward(self, weight: float) -> None:
        """Call after a micro-batch's backward whose loss was scaled by `weight` (= b / B)."""
        total = None
        for j, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            d = g if self.prev[j] is None else g - self.prev[j]
            s = torch.linalg.vector_norm(d.detach(), dtype=torch.float64) ** 2   # float64 sums whatever the grads
            total = s if total is None else total + s
            self.prev[j] = g.detach().clone()
        if total is not None:
            self.sq.append(total / weight ** 2)

    def local_mean(self, mean) -> None:
        """Under DDP: replace this rank's micro-batch norms by their mean over every rank (`mean`:
        Dist.mean, an all-reduce), before the gradients themselves are averaged."""
        self.sq = [mean(torch.stack(self.sq).mean())]

    def fields(self, b: int, batch: int, lr: float) -> dict:
        """The record's fields, once the step's gradient is whole (before clipping); `batch`: the
        global batch (every rank's)."""
        big = sum(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) ** 2
                  for p in self.params if p.grad is not None)
        small = torch.stack(self.sq).mean()
        big, small = float(big), float(small)        # one sync, on a flush step (it syncs anyway)
        return estimate(small, big, b, batch, lr)


def estimate(small: float, big: float, b: int, batch: int, lr: float) -> dict:
    """B_simple's parts from mean|g_i|² (`small`, micro-batches of b) and |G|² (`big`, the batch)."""
    g2 = (batch * big - b * small) / (batch - b)
    s = (small - big) / (1 / b - 1 / batch)
    out = {"grad_norm": math.sqrt(big), "noise_g2": g2, "noise_tr_sigma": s, "lr_over_batch": lr / batch}
    if g2 > 0 and math.isfinite(s / g2):
        out["noise_scale"] = s / g2
    return out
