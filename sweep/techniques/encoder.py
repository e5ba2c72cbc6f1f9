"""The encoder's own levers: the mel window it sees, and torch.compile of the encoder alone."""

from __future__ import annotations

import dataclasses

from ..measure.window import FULL_S, SECONDS, Window
from .base import Param, Requires, Technique, technique

_W = Window()  # the defaults, stated once where the window is cut
_TUNED = ("bucket_s",) + SECONDS  # the auto window's settings (nothing on the full one)


def _seconds(name: str, help: str) -> Param:
    return Param("float", getattr(_W, name), 0, FULL_S, help=help)


@technique("encoder")
class EncoderConfig(Technique):
    PARAMS = {
        "encoder.window": Param("choice", "full", choices=("full", "auto"), help="mel window the "
                                "encoder sees: full = Whisper's 30 s; auto = the clip rounded up "
                                "to encoder.bucket_s (trimmed position embeddings; WER measured)"),
        "encoder.bucket_s": Param("int", _W.bucket_s, 1, int(FULL_S), help="auto window step "
                                  "in seconds (few distinct shapes); unused with "
                                  "encoder.window=full"),
        # The auto window's WER cost (+64% to +187% on the shared Russian clips) comes from
        # cutting the silence Whisper always saw after the speech: give some back.
        "encoder.margin_s": _seconds("margin_s", help="auto window: seconds of silence encoded "
                                     "beyond the speech's end (whisper.cpp's audio_ctx users "
                                     "add ~1.3 s); unused with encoder.window=full"),
        "encoder.pad_s": _seconds("pad_s", help="auto window: seconds of silence put before "
                                  "the speech (not when the clip would no longer fit 30 s); "
                                  "unused with encoder.window=full"),
        # Whisper-base on a window of a few seconds repeats itself or drops words: a short VAD
        # piece (2 s between long pauses) gets this much window however short it is.
        "encoder.min_s": _seconds("min_s", help="auto window: at least this many seconds are "
                                  "encoded, silence after the speech (a floor for short clips "
                                  "and pieces); unused with encoder.window=full"),
        # The encoder is 88% of whisper-base's FLOPs: in bf16 on AMX, eager spends a fifth of
        # its time in unfused copies, adds and GELUs around the matmuls.
        "encoder.compile": Param("choice", "none", choices=("none", "default", "freeze"),
                                 requires=(Requires(("default", "freeze"), key="compile.mode",
                                                    equals="none", why="compile.mode compiles "
                                                    "the encoder already"),),
                                 help="torch.compile of the encoder alone: default = inductor; "
                                 "freeze = inductor with freezing (weights become constants, "
                                 "prepacked for oneDNN; inference only); none = eager"),
    }

    def canonical(self):  # bucket, margin, padding and floor mean nothing on the full window
        return self if self.window != "full" else dataclasses.replace(
            self, **{n: getattr(_W, n) for n in _TUNED})

    compiles = property(lambda self: self.compile != "none")

    def cheap(self):  # the same window, eager
        return dataclasses.replace(self, compile="none") if self.compiles else self

    def apply(self, model, ctx) -> None:
        from ..measure import window

        if self.compile != "none":
            window.compile_encoder(model, freeze=self.compile == "freeze")
            ctx.notes.append(f"encoder: torch.compile ({self.compile})")
            for t in ("enc_attn", "enc_mlp"):  # inductor's kernels now, around the same matmuls
                ctx.kernels[t] = f"{ctx.kernels.get(t, 'fp32')}, compiled ({self.compile})"

    def decoding(self) -> dict:
        return {"window": Window(self.window, **{n: getattr(self, n) for n in _TUNED})
                if self.window != "full" else Window()}

    def describe(self) -> str:
        return ", ".join(filter(None, (
            self.window != "full" and f"window auto/{self.bucket_s}s" + (
                f" +{self.margin_s:g}s" if self.margin_s else "") + (
                f" pad {self.pad_s:g}s" if self.pad_s else "") + (
                f" >={self.min_s:g}s" if self.min_s else ""),
            self.compile != "none" and f"encoder compiled ({self.compile})")))
