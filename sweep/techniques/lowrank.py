"""Low-rank factorisation of the encoder's projections from calibration activations (LiteASR):
each layer's output keeps the principal directions that hold `lowrank.energy` of its variance on
the calibration clips, as two smaller Linear layers (quantized afterwards like any other)."""

from __future__ import annotations

from .base import Param, Storage, Technique, technique

# the encoder's projections that may be factored, as layer types
LAYERS = ("enc_attn+enc_mlp", "enc_attn", "enc_mlp")


@technique("lowrank")
class LowRankConfig(Technique):
    PARAMS = {
        "lowrank.energy": Param("float", 1.0, 0.5, 1.0, help="share of each layer's output "
                                "variance on the calibration clips its factors keep (PCA rank "
                                "by this threshold); 1 = off. A layer is factored only where "
                                "the rank saves work"),
        "lowrank.layers": Param("choice", "enc_attn+enc_mlp", choices=LAYERS,
                                help="encoder layer types factored: attention projections "
                                "(q, k, v, out), MLP (fc1, fc2) or both"),
    }
    # The factors are plain Linear layers (or what quant makes of them): stored as they run.
    STORAGE = Storage(True, lambda cfg: False, "factors stored as they run (two Linear layers "
                      "per factored projection, each as quant made it)", stored=True,
                      forms=("sweep.measure.lowrank",))
    CALIBRATED = ("lowrank.energy",)  # what needs calibration audio when not its default

    def canonical(self):  # which layers means nothing while nothing is factored
        return self if self.energy < 1 else type(self)()

    calibrates = property(lambda self: self.active)  # the PCA runs on calibration clips

    def apply(self, model, ctx) -> None:
        from ..measure import compress, lowrank, modules

        if self.energy >= 1:  # keeps every direction: nothing to factor
            return
        if ctx.calibrate is None:
            raise compress.CompressError(
                "lowrank needs calibration data (its PCA runs on calibration activations): pass "
                "apply_recipe(..., calibrate=fn), fn(model) running audio disjoint from the "
                "eval set")
        linears = compress.linears_of(model, self.layers.split("+"))
        moments = lowrank.output_moments(model, linears, ctx.calibrate)
        kept, ranks = 0, []
        for name, lin in linears.items():
            new, k = lowrank.factor(lin, *moments[name], self.energy)
            ranks.append(f"{name.removeprefix('model.encoder.layers.')} {k}/"
                         f"{min(lin.in_features, lin.out_features)}")
            if new is not None:
                modules.set_module(model, name, new)
                kept += 1
        ctx.notes.append(f"{self.describe()}: {kept}/{len(linears)} layers factored; rank/full: "
                         + ", ".join(ranks))

    def describe(self) -> str:
        return f"low-rank {self.energy:g}" + (
            "" if self.layers == LAYERS[0] else f" ({self.layers})")
