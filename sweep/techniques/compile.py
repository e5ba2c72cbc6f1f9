"""torch.compile of the encoder and decoder stacks (generate's loop stays Python)."""

from __future__ import annotations

from .base import Param, Requires, Storage, Technique, technique


@technique("compile")
class CompileConfig(Technique):
    PARAMS = {"compile.mode": Param(
        "choice", "none", choices=("none", "default", "reduce-overhead", "max-autotune"),
        requires=(Requires(("reduce-overhead",), why="it means CUDA graphs"),),
        help="torch.compile mode of the encoder and decoder modules; none = eager")}
    STORAGE = Storage(False, lambda cfg: True, "re-applied at load: compiled graphs cannot be "
                      "saved; the first call compiles")

    compiles = property(lambda self: self.mode != "none")

    def apply(self, model, ctx) -> None:
        for stack in (model.model.encoder, model.model.decoder):
            stack.compile(mode=None if self.mode == "default" else self.mode)
        ctx.notes.append(f"compile: encoder and decoder, mode={self.mode}")

    def describe(self) -> str:
        return f"compile {self.mode}"
