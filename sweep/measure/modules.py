"""Module surgery shared by the techniques, the stored checkpoint and calibration: a leaf
module (torch only), so that anything may import it without an import cycle."""

from __future__ import annotations

import torch
from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name` (dotted, as `named_modules` gives)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def run_calibration(model: nn.Module, calibrate, *, hooks=(), swaps=None) -> None:
    """Run `calibrate(model)` (inference mode) with `hooks` (removable handles) and `swaps`
    (name -> module put in place of the model's own) in effect: every calibrated technique
    observes the same way, and the model is restored after, even on an error."""
    own = {n: model.get_submodule(n) for n in swaps or {}}
    for n, m in (swaps or {}).items():
        set_module(model, n, m)
    try:
        with torch.inference_mode():
            calibrate(model)
    finally:
        for h in hooks:
            h.remove()
        for n, m in own.items():
            set_module(model, n, m)


def sync(where: nn.Module | torch.device) -> None:
    """Wait for the device's queued work (a model's, or a device's): a CUDA clock reads the
    time the work was queued, not done. Nothing to wait for on CPU."""
    device = next(where.parameters()).device if isinstance(where, nn.Module) else where
    if device.type == "cuda":
        torch.cuda.synchronize(device)
