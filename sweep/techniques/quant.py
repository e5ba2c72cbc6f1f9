"""Quantization per layer type: int8 (dynamic, static, weight-only), int8-activation/int4-weight,
bf16/fp16 casts or autocast, bitsandbytes on CUDA. Each Linear gets the implementation of its
scheme that `sweep.measure.kernels` measured fastest on this machine."""

from __future__ import annotations

import re
from collections import defaultdict

from .base import LAYER_TYPES, Param, RecipeError, Requires, Storage, Technique, technique

SCHEMES = ("none", "dynamic_int8", "static_int8", "int8_token", "int8_weight_only",
           "int8_act_int4_weight", "bf16", "fp16", "autocast_bf16", "autocast_fp16", "bnb_int8",
           "bnb_nf4")
SHORT = {"dynamic_int8": "int8 dyn", "static_int8": "int8 static", "int8_token": "int8 tok",
         "int8_weight_only": "int8 wo", "int8_act_int4_weight": "int8a/int4w"}  # else "_" -> " "
# Schemes whose blocks the fallback may move to `quant.fallback` (integer weights or activations)
LOWBIT = ("dynamic_int8", "static_int8", "int8_token", "int8_weight_only", "int8_act_int4_weight",
          "bnb_int8", "bnb_nf4")
ACT_INT8 = ("dynamic_int8", "static_int8", "int8_token")  # int8 activations: what smoothing helps
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
        for t in LAYER_TYPES} | {
        # Precision per block (sweep.measure.blocks): a block is an encoder or decoder layer, or
        # the head; its sensitivity is the KL int8 on it alone adds on the calibration clips.
        "quant.fallback_blocks": Param("int", 0, 0, 64, help="the N blocks whose int8 harms "
                                       "the next-token distributions most (measured on the "
                                       "calibration clips) run in quant.fallback instead; 0 = "
                                       "none"),
        "quant.fallback_budget": Param("float", 0.0, 0.0, 1.0, help="accuracy-aware fallback: "
                                       "the fewest most harmful blocks move to quant.fallback "
                                       "until the KL from the unquantized model on the "
                                       "calibration clips is at most this (nats per token); "
                                       "0 = off"),
        "quant.fallback": Param("choice", "bf16", choices=("bf16", "none"), help="precision of "
                                "the blocks the fallback moves out of int8 (none = fp32)"),
        "quant.smooth": Param("float", 0.0, 0.0, 1.0, hi_open=True, help="SmoothQuant's "
                              "migration strength alpha for the encoder's int8-activation "
                              "layers (outlier channels moved into the weights, scales from the "
                              "calibration clips, folded into the LayerNorms and v_proj); 0 = "
                              "off")}
    # need calibration audio when not at their defaults
    CALIBRATED = ("quant.fallback_blocks", "quant.fallback_budget", "quant.smooth")
    STORAGE = Storage(True, lambda cfg: False, "stored as it runs: int8 layers as int8 tensors "
                      "with their scales and zero points, bf16/fp16 layers in that dtype, each "
                      "rebuilt at load with the trial's kernel", stored=True,
                      forms=("sweep.measure.kernels", "sweep.measure.int8"))

    def by_layer_type(self) -> dict[str, str]:  # `inherit` resolved
        return {t: self.scheme if getattr(self, t) == "inherit" else getattr(self, t)
                for t in LAYER_TYPES}

    def _check(self):
        if self.fallback_blocks and self.fallback_budget:
            raise RecipeError("`quant.fallback_blocks` and `quant.fallback_budget` must not both "
                              f"be set (a count or a budget), got {self.fallback_blocks=}, "
                              f"{self.fallback_budget=}")

    # Layer types on dynamic int8, whose usual kernel (fbgemm's, per tensor) computes one
    # activation scale over the whole input: rows decoded together (a batch of clips, pieces or
    # server requests) share it, so a row's result can depend on its batchmates (19 of 64
    # answers of a batching server differed, issue #28). int8_token scales each row; static
    # int8's scales are fixed at calibration. (Where the kernel table picked torchao's
    # per-token kernel instead, the coupling is absent and this errs on the cautious side.)
    batch_coupled = property(lambda self: sorted(
        t for t, s in self.by_layer_type().items() if s == "dynamic_int8"))

    # the fallback acts on int8 layers only
    falls_back = property(lambda self: bool(self.fallback_blocks or self.fallback_budget) and any(
        s in LOWBIT for s in self.by_layer_type().values()))
    # the encoder's layer types SmoothQuant acts on (those quantizing their activations)
    smoothed = property(lambda self: [t for t in ("enc_attn", "enc_mlp") if self.smooth and (
        self.by_layer_type()[t] in ACT_INT8)])
    # static int8 scales, the fallback's sensitivities and smoothing come from calibration clips
    calibrates = property(lambda self: self.falls_back or bool(self.smoothed) or "static_int8"
                          in self.by_layer_type().values())

    def canonical(self):  # what runs per layer type, however it is spelled
        fall = {"fallback": (self.fallback_blocks, self.fallback_budget, self.fallback)}
        return self.by_layer_type() | (fall if self.falls_back else {}) | (
            {"smooth": self.smooth} if self.smoothed else {})

    def apply(self, model, ctx) -> None:
        from ..measure import blocks, compress, int8, kernels, modules  # noqa: F401 - int8_token

        if ctx.sparsity is None:  # quantized weights hide their zeros
            ctx.sparsity = compress.linear_sparsity(model)
        plan = self.by_layer_type()
        if self.falls_back and ctx.calibrate is None:
            raise compress.CompressError("`quant.fallback_blocks`/`quant.fallback_budget` need "
                                         "calibration data: pass apply_recipe(..., calibrate=fn)")
        # the unquantized model's view of the calibration clips, before anything changes
        probe = blocks.Probe.capture(model, ctx.calibrate) if self.falls_back else None
        if self.smoothed:
            if ctx.calibrate is None:
                raise compress.CompressError("`quant.smooth` needs calibration data: pass "
                                             "apply_recipe(..., calibrate=fn)")
            n = int8.smooth_encoder(model, self.smoothed, self.smooth, ctx.calibrate)
            ctx.notes.append(f"SmoothQuant alpha {self.smooth:g}: {n} input groups smoothed")
        todo = compress.linears_of(model, [t for t, s in plan.items() if s != "none"])
        for name in compress.cast_encoder_stack(model, plan, ctx):
            todo.pop(name)
        stats = compress.calibrate_linears(model, {n: m for n, m in todo.items() if plan[
            compress.layer_type_of(n)] == "static_int8"}, ctx)
        chosen, measured, built = defaultdict(set), {}, {}
        scripted = ctx.recipe.decode.compile == "script"  # the decoder and head run traced

        def build(name, lin, scheme):
            lt, rows = compress.layer_type_of(name), _tokens(model, name)
            try:
                impl, entry = kernels.choose(scheme, lin, rows,
                                             compiled=ctx.recipe.compile.active,
                                             traced=scripted and not lt.startswith("enc_"))
                new = impl.build(lin, stats.get(name)).eval()
            except Exception as e:
                raise compress.CompressError(
                    f"`quant.{lt}`={scheme} on {ctx.recipe.device}: {e}") from e
            shape = f"{lin.in_features}x{lin.out_features} on {rows} rows"
            measured[lt, shape, scheme] = f"{impl.name} {entry['speedup'][impl.name]:.2f}x"
            return new, impl.name

        for name, lin in todo.items():
            built[name], impl_name = build(name, lin, plan[compress.layer_type_of(name)])
            chosen[compress.layer_type_of(name)].add(impl_name)
        low = {n: m for n, m in built.items() if plan[compress.layer_type_of(n)] in LOWBIT}
        for name, mod in built.items():
            if name not in low or probe is None:
                modules.set_module(model, name, mod)
        if probe is not None:
            fall = {n: build(n, todo[n], self.fallback)[0] if self.fallback != "none"
                    else todo[n] for n in low}
            key = (f"{ctx.recipe.device}|" + ",".join(f"{t}={s}" for t, s in plan.items())
                   + "|" + "+".join(sorted({i for s in chosen.values() for i in s})))
            ranking = blocks.sensitivity_cached(model, low, dict(todo), probe, key)
            moved, kl = blocks.fallback(model, low, fall, probe, ranking,
                                        count=self.fallback_blocks, budget=self.fallback_budget)
            ctx.notes.append(f"int8 sensitivity per block (KL nats/token): "
                             f"{blocks.ranking_note(ranking)}")
            ctx.notes.append(f"fallback to {self.fallback}: {', '.join(moved) or 'no block'}"
                             + (f" (KL {kl:.3g}, budget {self.fallback_budget:g})"
                                if kl is not None else ""))
            for lt in {compress.layer_type_of(n) for n in low
                       if blocks.block_of(n) in moved}:
                chosen[lt].add(f"{self.fallback if self.fallback != 'none' else 'fp32'} "
                               "(fallback)")
        ctx.kernels.update({lt: "+".join(sorted(names)) for lt, names in chosen.items()})
        ctx.notes += [f"{scheme} {lt} {shape}: {what} vs fp32"
                      for (lt, shape, scheme), what in measured.items()]

    def describe(self) -> str:
        by = self.by_layer_type()
        text = " + ".join(f"{SHORT.get(s, s.replace('_', ' '))} "
                          f"({_abbrev([t for t in by if by[t] == s])})"
                          for s in dict.fromkeys(by.values()) if s != "none")
        if self.smoothed:
            text += f", smooth {self.smooth:g}"
        if self.falls_back:
            text += (f", {self.fallback} fallback " + (
                f"{self.fallback_blocks} blocks" if self.fallback_blocks
                else f"to KL {self.fallback_budget:g}"))
        return text


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
