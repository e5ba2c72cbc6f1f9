"""Low-rank factorisation of Linear layers from their calibration activations (LiteASR's way).

A layer's outputs y = W x + b on the calibration clips have principal directions V (the
eigenvectors of their covariance, largest first). Keeping the k that hold `energy` of the
variance, y ~ V_k V_k^T (y - mu) + mu = (V_k)(V_k^T W) x + V_k V_k^T (b - mu) + mu: two Linear
layers, in -> k and k -> out, with k (in + out) multiply-adds per row instead of in * out. A layer
is factored only where that saves work; the others stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankError(RuntimeError):
    """Factorisation cannot run as asked; the message says why."""


class LowRankLinear(nn.Module):
    """`up(down(x))`: a Linear replaced by its rank-`rank` factors (`down`: in -> rank, no bias;
    `up`: rank -> out). Either may later be quantized like any Linear of its layer type."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.down, self.up = down, up

    in_features = property(lambda self: self.down.in_features)
    out_features = property(lambda self: self.up.out_features)
    rank = property(lambda self: self.down.out_features)

    def forward(self, x):
        return self.up(self.down(x))

    def dense(self) -> nn.Linear:
        """The same map as one Linear (rank-limited weight), for checks and plain storage."""
        w = self.up.weight.detach().float() @ self.down.weight.detach().float()
        lin = nn.Linear(self.in_features, self.out_features, self.up.bias is not None,
                        device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.up.bias is not None:
                lin.bias.copy_(self.up.bias.detach().float())
        return lin


class _Moments(nn.Module):
    """Wraps a Linear while calibrating: running sum and Gram matrix of its outputs (float64)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear, self.rows = linear, 0
        self.sum = torch.zeros(linear.out_features, dtype=torch.float64,
                               device=linear.weight.device)
        self.gram = torch.zeros(linear.out_features, linear.out_features, dtype=torch.float64,
                                device=linear.weight.device)

    def forward(self, x):
        y = self.linear(x)
        y2 = y.detach().reshape(-1, y.shape[-1]).double()
        self.rows += y2.shape[0]
        self.sum += y2.sum(0)
        self.gram += y2.T @ y2
        return y


def output_moments(model: nn.Module, linears: dict[str, nn.Linear], calibrate,
                   set_module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(mean, covariance) of each Linear's outputs while `calibrate(model)` runs."""
    wraps = {n: _Moments(lin) for n, lin in linears.items()}
    for n, w in wraps.items():
        set_module(model, n, w)
    try:
        with torch.inference_mode():
            calibrate(model)
    finally:
        for n, lin in linears.items():
            set_module(model, n, lin)
    blind = [n for n, w in wraps.items() if not w.rows]
    if blind:
        raise LowRankError(f"calibration ran no data through {blind[0]}")
    out = {}
    for n, w in wraps.items():
        mean = w.sum / w.rows
        out[n] = (mean, w.gram / w.rows - torch.outer(mean, mean))
    return out


def rank_for(eigenvalues: torch.Tensor, energy: float) -> int:
    """Fewest leading components (eigenvalues sorted largest first) holding `energy` of the
    total variance."""
    vals = eigenvalues.clamp_min(0)
    share = torch.cumsum(vals, 0) / vals.sum().clamp_min(1e-30)
    return min(int((share < energy - 1e-12).sum().item()) + 1, len(vals))


def break_even(linear: nn.Linear) -> int:
    """Largest rank at which the factors do less work than the layer: k (in + out) < in out."""
    i, o = linear.in_features, linear.out_features
    return (i * o - 1) // (i + o)


def factor(linear: nn.Linear, mean: torch.Tensor, cov: torch.Tensor,
           energy: float) -> tuple[LowRankLinear | None, int]:
    """The factors of `linear` keeping `energy` of its output variance, and their rank; None
    (with the rank it would need) when that rank saves no work."""
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    vals, vecs = vals.flip(0), vecs.flip(1)
    k = rank_for(vals, energy)
    if k > break_even(linear):
        return None, k
    v = vecs[:, :k]  # (out, k), float64
    w = linear.weight.detach().double()
    b = linear.bias.detach().double() if linear.bias is not None else torch.zeros_like(mean)
    dev, dt = linear.weight.device, linear.weight.dtype
    down = nn.Linear(linear.in_features, k, bias=False, device=dev, dtype=dt)
    up = nn.Linear(k, linear.out_features, bias=True, device=dev, dtype=dt)
    with torch.no_grad():
        down.weight.copy_(v.T @ w)
        up.weight.copy_(v)
        up.bias.copy_(v @ (v.T @ (b - mean)) + mean)
    return LowRankLinear(down.eval(), up.eval()), k
