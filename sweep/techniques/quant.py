"""Quantization per layer type: int8 (dynamic, static, weight-only), int8-activation/int4-weight,
bf16/fp16 casts or autocast, bitsandbytes on CUDA. Each Linear gets the implementation of its
scheme that `sweep.measure.kernels` measured fastest on this machine."""

from __future__ import annotations

import re
from collections import defaultdict

from .base import LAYER_TYPES, Param, Requires, Storage, Technique, technique

SCHEMES = ("none", "dynamic_int8", "static_int8", "int8_weight_only", "int8_act_int4_weight",
           "bf16", "fp16", "autocast_bf16", "autocast_fp16", "bnb_int8", "bnb_nf4")
SHORT = {"dynamic_int8": "int8 dyn", "static_int8": "int8 static", "int8_weight_only": "int8 wo",
         "int8_act_int4_weight": "int8a/int4w"}  # others: "_" -> " "
_BNB = Requires(("bnb_int8", "bnb_nf4"), why="bitsandbytes kernels are CUDA-only")
# The head is tied to the token embedding: with embed.dtype int8|bf16 it runs from that tensor.
_TIED = Requires(SCHEMES, key="embed.dtype", equals="fp32",
                 why="otherwise the head runs from the tied embedding's own tensor")


@technique("quant")
class QuantConfig(Technique):
    PARAMS = {"quant.scheme": Param("choice", "none", choices=SCHEMES, requires=(_BNB,),
                                    help="scheme of every Linear layer unless overridden")} | {
        f"quant.{t}": Param("choice", "inherit", choices=("inherit",) + SCHEMES,
                            requires=(_BNB,) + ((_TIED,) if t == "head" else ()),
                            help=f"scheme of the {t} Linear layers; inherit = quant.scheme")
        for t in LAYER_TYPES}
    STORAGE = Storage(True, lambda cfg: False, "stored as it runs: int8 layers as int8 tensors "
                      "with their scales and zero points, bf16/fp16 layers in that dtype, each "
                      "rebuilt at load with the trial's kernel", stored=True)

    def by_layer_type(self) -> dict[str, str]:  # `inherit` resolved
        return {t: self.scheme if getattr(self, t) == "inherit" else getattr(self, t)
                for t in LAYER_TYPES}

    def canonical(self):  # what runs per layer type, however it is spelled
        return self.by_layer_type()

    def apply(self, model, ctx) -> None:
        from ..measure import compress, kernels

        if ctx.sparsity is None:  # quantized weights hide their zeros
            ctx.sparsity = compress.linear_sparsity(model)
        plan = self.by_layer_type()
        todo = compress.linears_of(model, [t for t, s in plan.items() if s != "none"])
        for name in compress.cast_encoder_stack(model, plan, ctx):
            todo.pop(name)
        stats = compress.calibrate_linears(model, {n: m for n, m in todo.items() if plan[
            compress.layer_type_of(n)] == "static_int8"}, ctx)
        chosen, measured = defaultdict(set), {}
        scripted = ctx.recipe.decode.compile == "script"  # the decoder and head run traced
        for name, lin in todo.items():
            lt, rows = compress.layer_type_of(name), _tokens(model, name)
            try:
                impl, entry = kernels.choose(plan[lt], lin, rows,
                                             compiled=ctx.recipe.compile.active,
                                             traced=scripted and not lt.startswith("enc_"))
                compress.set_module(model, name, impl.build(lin, stats.get(name)).eval())
            except Exception as e:
                raise compress.CompressError(
                    f"`quant.{lt}`={plan[lt]} on {ctx.recipe.device}: {e}") from e
            chosen[lt].add(impl.name)
            shape = f"{lin.in_features}x{lin.out_features} on {rows} rows"
            measured[lt, shape] = f"{impl.name} {entry['speedup'][impl.name]:.2f}x"
        ctx.kernels.update({lt: "+".join(sorted(names)) for lt, names in chosen.items()})
        ctx.notes += [f"{plan[lt]} {lt} {shape}: {what} vs fp32"
                      for (lt, shape), what in measured.items()]

    def describe(self) -> str:
        by = self.by_layer_type()
        return " + ".join(f"{SHORT.get(s, s.replace('_', ' '))} "
                          f"({_abbrev([t for t in by if by[t] == s])})"
                          for s in dict.fromkeys(by.values()) if s != "none")


def _tokens(model, name: str) -> int:
    """Rows a Linear sees per call in greedy decoding: the encoder and the cross-attention
    keys/values see every audio frame, the rest of the decoder one token per step."""
    frames = model.config.max_source_positions
    return frames if ".encoder." in name or re.search(r"encoder_attn\.[kv]_proj", name) else 1


def _abbrev(types: list[str]) -> str:
    if len(types) == len(LAYER_TYPES):
        return "all"
    out = []
    for short, group in (("enc", LAYER_TYPES[:2]), ("dec", LAYER_TYPES[2:5]), ("", ("head",))):
        got = [t for t in group if t in types]
        out += [short] if short and len(got) == len(group) else got
    return "+".join(out)
