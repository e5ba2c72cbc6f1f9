"""The tied token embedding: in whisper-base the decoder's token embedding, which the output head
shares, is 37% of all parameters. Stored and run in int8 or bf16, the head runs from the same
tensor, so the checkpoint holds it once and the trial measures what that costs in accuracy."""

from __future__ import annotations

from .base import Param, Requires, Storage, Technique, technique


@technique("embed")
class EmbedConfig(Technique):
    PARAMS = {"embed.dtype": Param(
        "choice", "fp32", choices=("fp32", "int8", "bf16"),
        requires=(Requires(("int8",), key="device", equals="cpu",
                           why="its head runs torch.ao's int8 kernels, CPU only"),),
        help="dtype of the token embedding and of the head tied to it: fp32 = as trained (the "
             "head follows quant.head); int8 = per-row int8 with its scales, lookups "
             "dequantized, the head an int8 Linear (dynamic activations) on the same tensor; "
             "bf16 = one bf16 tensor for both (with every Linear bf16 too: the whole model in "
             "bf16, as plain from_pretrained runs a bf16 checkpoint)")}
    STORAGE = Storage(True, lambda cfg: False, "the tied matrix stored once in its dtype (int8: "
                      "with its per-row scales), the head rebuilt from it at load", stored=True,
                      forms=("sweep.measure.tied",))

    def apply(self, model, ctx) -> None:
        from ..measure import tied

        tied.apply(model, self.dtype, ctx)

    def describe(self) -> str:
        return f"embedding+head {self.dtype}"
