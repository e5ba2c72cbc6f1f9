"""FFN shrinking: whole neurons removed from the fc1/fc2 pairs (really fewer weights)."""

from __future__ import annotations

import dataclasses

from .base import Param, Storage, Technique, technique


@technique("struct")
class StructConfig(Technique):
    PARAMS = {"struct.ffn_rate": Param("float", 0.0, 0.0, 0.9, help="share of FFN neurons removed "
                                       "per layer (lowest L2 of fc1 row + fc2 column)"),
              # whisper-base's decoder loops once 5% of its FFN goes, its encoder (88% of the
              # FLOPs) takes 10% well: let the search shrink the stacks apart
              "struct.stacks": Param("choice", "both", choices=("both", "encoder", "decoder"),
                                     help="which stacks lose FFN neurons")}
    STORAGE = Storage(True, lambda cfg: False, "neurons removed from the weights; config.json "
                      "records the new FFN widths, so plain `from_pretrained` loads it")

    def canonical(self):  # the stacks mean nothing while no neuron goes
        return self if self.ffn_rate > 0 else dataclasses.replace(self, stacks="both")

    def apply(self, model, ctx) -> None:
        from ..measure import structured

        stacks = ("encoder", "decoder") if self.stacks == "both" else (self.stacks,)
        ctx.notes += structured.shrink_ffn(model, self.ffn_rate, stacks)

    def describe(self) -> str:
        where = "" if self.stacks == "both" else f" ({self.stacks[:3]})"
        return f"ffn -{self.ffn_rate:.0%}{where}"
