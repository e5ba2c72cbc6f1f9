"""A technique defined outside HYPER, for tests/test_techniques.py: registered by
`HYPER_TECHNIQUES=<this file>` with no other file edited. It scales the decoder's final layer
norm (logits scale with it, so tokens stay: baked into the weights at export) and caps the
tokens per clip (a decoding option)."""

from __future__ import annotations

from sweep.techniques import Param, Storage, Technique, technique


@technique("toy")
class ToyConfig(Technique):
    PARAMS = {"toy.scale": Param("float", 1.0, 0.5, 4.0, help="factor on the decoder's final "
                                 "layer norm (a scaled logit keeps its argmax)"),
              "toy.max_tokens": Param("int", 0, 0, 448, help="at most this many tokens per "
                                      "clip; 0 = no cap")}
    STORAGE = Storage(True, lambda cfg: False, "scaled layer norm saved in the weights")

    def apply(self, model, ctx) -> None:
        import torch

        norm = model.model.decoder.layer_norm
        with torch.no_grad():
            norm.weight.mul_(self.scale)
            norm.bias.mul_(self.scale)
        ctx.notes.append(f"toy: decoder layer norm x{self.scale:g}")

    def decoding(self) -> dict:
        return {"max_new_tokens": self.max_tokens}

    def describe(self) -> str:
        return f"toy x{self.scale:g}" + (f", <= {self.max_tokens} tokens" if self.max_tokens
                                         else "")
