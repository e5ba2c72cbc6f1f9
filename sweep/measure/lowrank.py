"""Low-rank factorisation of Linear layers from their calibration activations (LiteASR's way).

A layer's outputs y = W x + b on the calibration clips have principal directions V (the
eigenvectors of their covariance, largest first). Keeping the k that hold `energy` of the
variance, y ~ V_k V_k^T (y - mu) + mu = (V_k)(V_k^T W) x + V_k V_k^T (b - mu) + mu: two Linear
layers, in -> k and k -> out, with k (in + out) multiply-adds per row instead of in * out. A layer
is factored only where that saves work; the others stay as they are.

Whisper encodes 30 s windows, and a short command leaves most frames silent padding: counted
frame by frame, the padding's variance (its position embeddings) decides the directions and the
speech's are lost (whisper-base at energy 0.999: calibration KL 0.127, 10 of 19 clips wrong).
So each clip's speech frames and its padding frames weigh the same (KL 0.011 at 0.999).
"""

from __future__ import annotations

import torch
from torch import nn

from . import stored
from .modules import run_calibration


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


MARGIN = 25  # encoder positions (0.5 s) after the last non-silent frame still count as speech


def speech_positions(features: torch.Tensor) -> list[int]:
    """Per clip of a (batch, mels, frames) log-mel batch: encoder positions up to the end of its
    audio (HF pads the audio with zeros: those frames are all at the log-mel floor) plus
    MARGIN, at most the window's."""
    floor = features.amin(dim=(1, 2), keepdim=True)
    frames = (features > floor + 1e-6).any(1)  # (batch, frames)
    last = torch.where(frames.any(1), frames.shape[1] - frames.flip(1).int().argmax(1), 0)
    return [min((int(n) + 1) // 2 + MARGIN, features.shape[-1] // 2) for n in last]


class _Moments(nn.Module):
    """Wraps a Linear while calibrating: weighted sum and Gram matrix of its outputs (float64).
    `speech` (shared, set per clip) holds the speech positions of the encoder's current batch:
    rows of speech and rows of padding then weigh half each per clip."""

    def __init__(self, linear: nn.Linear, speech: dict):
        super().__init__()
        self.linear, self.speech, self.weight = linear, speech, 0.0
        self.sum = torch.zeros(linear.out_features, dtype=torch.float64,
                               device=linear.weight.device)
        self.gram = torch.zeros(linear.out_features, linear.out_features, dtype=torch.float64,
                                device=linear.weight.device)

    def forward(self, x):
        y = self.linear(x)
        rows = y.detach().reshape(-1, y.shape[-1]).double()
        w = torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device)
        ns = self.speech.get("n")
        if ns and y.dim() == 3 and len(ns) == y.shape[0]:
            w = w.view(y.shape[0], y.shape[1])
            for b, n in enumerate(ns):
                if 0 < n < y.shape[1]:
                    w[b, :n] = 0.5 * y.shape[1] / n
                    w[b, n:] = 0.5 * y.shape[1] / (y.shape[1] - n)
            w = w.reshape(-1)
        self.weight += float(w.sum())
        self.sum += w @ rows
        self.gram += rows.T @ (rows * w[:, None])
        return y


def output_moments(model: nn.Module, linears: dict[str, nn.Linear],
                   calibrate) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(mean, covariance) of each Linear's outputs while `calibrate(model)` runs, speech and
    padding weighing half each per clip in the encoder (see the module's doc)."""
    speech: dict = {}
    wraps = {n: _Moments(lin, speech) for n, lin in linears.items()}
    hook = model.model.encoder.register_forward_pre_hook(lambda m, args, kwargs: speech.update(
        n=speech_positions(args[0] if args else kwargs["input_features"])), with_kwargs=True)
    run_calibration(model, calibrate, hooks=[hook], swaps=wraps)
    blind = [n for n, w in wraps.items() if not w.weight]
    if blind:
        raise LowRankError(f"calibration ran no data through {blind[0]}")
    out = {}
    for n, w in wraps.items():
        mean = w.sum / w.weight
        out[n] = (mean, w.gram / w.weight - torch.outer(mean, mean))
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


# ---- stored form (sweep.measure.stored): each factor as it runs ----------------------------


def _lowrank_save(m: LowRankLinear):
    own, spec = {}, {}
    for part in ("down", "up"):
        tensors, spec[part] = stored.save_part(getattr(m, part))
        own |= {f"{part}.{k}": t for k, t in tensors.items()}
    return own, spec


def _lowrank_load(own, spec, every):
    return LowRankLinear(*(stored.load_part(
        {k[len(part) + 1:]: t for k, t in own.items() if k.startswith(part + ".")},
        spec[part], every) for part in ("down", "up")))


stored.register(LowRankLinear, "lowrank_linear", _lowrank_save, _lowrank_load,
                lambda spec, dtype: "none",
                "Linear as two low-rank factors (each stored as it runs)")
