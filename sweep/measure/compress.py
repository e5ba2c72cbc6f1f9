"""Apply a Recipe to a HF Whisper model: each active technique's `apply`, in registration order
(struct -> prune -> quant -> compile -> encoder -> decode), and the decoding options they set.

The techniques live in `sweep.techniques`; this module is the torch side they share: layer
types of Whisper's Linear layers, module swaps, static int8 calibration, the encoder stack cast.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import kernels, stored
from .modules import run_calibration, set_module
from .decode import Plan, plan_for
from ..techniques.base import LAYER_TYPES

if TYPE_CHECKING:  # the techniques call back into this module: no run-time import of recipes
    from ..techniques.recipe import Recipe

__all__ = ["LAYER_TYPES", "Applied", "CompressError", "apply_recipe", "layer_type_of",
           "recompile_count"]

_TYPE_RULES = [(re.compile(p), t) for p, t in (
    (r"model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj", "enc_attn"),
    (r"model\.encoder\.layers\.\d+\.fc[12]", "enc_mlp"),
    (r"model\.decoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj", "dec_self"),
    (r"model\.decoder\.layers\.\d+\.encoder_attn\.(q|k|v|out)_proj", "dec_cross"),
    (r"model\.decoder\.layers\.\d+\.fc[12]", "dec_mlp"),
    (r"proj_out", "head"))]
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def layer_type_of(name: str) -> str | None:
    """Layer type of a module name of WhisperForConditionalGeneration, None for the others."""
    name = name.replace("_orig_mod.", "")  # names inside torch.compile wrappers
    name = re.sub(r"\.(down|up)$", "", name)  # low-rank factors have their layer's type
    return next((t for rule, t in _TYPE_RULES if rule.fullmatch(name)), None)


class CompressError(RuntimeError):
    """A recipe cannot be applied here; the message names the scheme, layer type and why."""


@dataclass
class Applied:
    model: nn.Module
    kernels: dict[str, str]  # layer type -> implementation that runs it ("fp32" = untouched)
    sparsity: float | None  # share of zero weights in Linear layers, before quantization
    notes: list[str] = field(default_factory=list)
    options: Plan = field(default_factory=Plan.default)  # hand to transcription, with the model


@dataclass
class Context:
    recipe: Recipe
    calibrate: Callable[[nn.Module], None] | None
    kernels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sparsity: float | None = None


def apply_recipe(model: nn.Module, recipe: Recipe, *,
                 calibrate: Callable[[nn.Module], None] | None = None,
                 known_kernels: dict[str, str] | None = None) -> Applied:
    """Modify `model` in place by `recipe` (pass a copy to keep the original); see module doc.
    `known_kernels`: what already runs each layer type (a loaded checkpoint's stored modules)."""
    device = next(model.parameters()).device.type
    if device != recipe.device:
        raise CompressError(f"recipe has device={recipe.device!r} but the model is on {device!r}")
    model.eval()
    if recipe.compiles:  # graphs guard on module ids: none of an earlier trial's may be reused
        torch._dynamo.reset()
    ctx = Context(recipe, calibrate, kernels=dict(known_kernels or {}))
    for cfg in recipe.configs():
        if cfg.active:
            cfg.apply(model, ctx)
    options = plan_for(recipe)
    if options != Plan.default():
        from .decode import isa_note

        ctx.notes += [f"decode: {options.describe()}", f"isa: {isa_note()}"]
    sparsity = ctx.sparsity if ctx.sparsity is not None else linear_sparsity(model)
    return Applied(model, {t: ctx.kernels.get(t, "fp32") for t in LAYER_TYPES}, sparsity,
                   ctx.notes, options)


def linear_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over the float nn.Linear weights (shared ones once)."""
    seen, zeros, total = set(), 0, 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and type(w) is nn.Parameter and id(w) not in seen:
            seen.add(id(w))
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def recompile_count() -> int:
    """Graphs dynamo has compiled in this process (never reset): take differences around a
    phase, e.g. after warm-up vs after timing, to count recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def linears_of(model, types) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and layer_type_of(n) in types}


class Observer(nn.Module):
    """Wraps a Linear while calibrating static int8: min/max of its input and output."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear, self.calls = linear, 0
        self.stats = {"in_min": float("inf"), "in_max": -float("inf"),
                      "out_min": float("inf"), "out_max": -float("inf")}

    def forward(self, x):
        y = self.linear(x)
        for side, t in (("in", x), ("out", y)):
            lo, hi = torch.aminmax(t.detach().float())
            self.stats[f"{side}_min"] = min(self.stats[f"{side}_min"], lo.item())
            self.stats[f"{side}_max"] = max(self.stats[f"{side}_max"], hi.item())
        self.calls += 1
        return y


def calibrate_linears(model, linears: dict[str, nn.Linear], ctx: Context) -> dict[str, dict]:
    """Observe `linears` while `ctx.calibrate(model)` runs calibration audio; their stats."""
    if not linears:
        return {}
    if ctx.calibrate is None:
        raise CompressError("static_int8 needs calibration data: pass apply_recipe(..., "
                            "calibrate=fn), fn(model) running audio disjoint from the eval set")
    observers = {name: Observer(lin) for name, lin in linears.items()}
    run_calibration(model, ctx.calibrate, swaps=observers)
    blind = sorted({layer_type_of(n) for n, o in observers.items() if not o.calls})
    if blind:
        raise CompressError(f"static_int8: calibrate() ran no data through {', '.join(blind)}")
    calls = [o.calls for o in observers.values()]
    ctx.notes.append(f"static_int8: {len(calls)} layers calibrated, {min(calls)}-{max(calls)} "
                     "calls each")
    return {name: obs.stats for name, obs in observers.items()}


def cast_encoder_stack(model, plan: dict[str, str], ctx: Context) -> list[str]:
    """With the whole encoder cast (enc_attn and enc_mlp both bf16 or both fp16), casting the
    stack once at its boundary can beat casting around every Linear: measured, cached.
    Returns the names of the Linear layers it took care of."""
    scheme = plan["enc_attn"]
    if scheme not in _CAST or plan["enc_mlp"] != scheme:
        return []
    enc, dtype, c = model.model.encoder, _CAST[scheme], model.config
    key = (f"encoder-cast|{scheme}|d{c.d_model}|ffn{enc.layers[0].fc1.out_features}"
           f"|h{c.encoder_attention_heads}|t{c.max_source_positions}"
           f"|th{torch.get_num_threads()}|{ctx.recipe.device}")
    entry = kernels.choose_cached(key, lambda: _time_encoder_cast(enc.layers[0], dtype, c),
                                  device=ctx.recipe.device)
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in entry["speedup"].items())
    ctx.notes.append(f"{scheme} encoder: {entry['choice']} chosen ({ratios} vs fp32, one layer)")
    if entry["choice"] != "stack":
        return []
    # the decoder's dtype (its positions': the token embedding may be int8)
    stored.cast_stack(enc, dtype, model.model.decoder.embed_positions.weight.dtype)
    ctx.kernels.update(enc_attn=f"{scheme} encoder stack", enc_mlp=f"{scheme} encoder stack")
    return list(linears_of(model, ("enc_attn", "enc_mlp")))


def _time_encoder_cast(layer: nn.Module, dtype: torch.dtype, config) -> dict:
    import copy

    x = torch.randn(1, config.max_source_positions, config.d_model, device=layer.fc1.weight.device)
    per_linear, stack = copy.deepcopy(layer), copy.deepcopy(layer).to(dtype)
    for name, mod in list(per_linear.named_modules()):
        if isinstance(mod, nn.Linear):
            set_module(per_linear, name, kernels.CastLinear(mod, dtype))
    secs = kernels.time_calls({"fp32": lambda: layer(x, None), "per-linear": lambda: per_linear(
        x, None), "stack": lambda: stored.cast_output((stack(x.to(dtype), None),), x.dtype)})
    return {"choice": min(("per-linear", "stack"), key=secs.get), "seconds": secs,
            "speedup": {k: secs["fp32"] / secs[k] for k in ("per-linear", "stack")}}
