"""The encoder's own levers: the mel window it sees, and torch.compile of the encoder alone."""

from __future__ import annotations

import dataclasses

from .base import Param, Requires, Technique, technique


@technique("encoder")
class EncoderConfig(Technique):
    PARAMS = {
        "encoder.window": Param("choice", "full", choices=("full", "auto"), help="mel window the "
                                "encoder sees: full = Whisper's 30 s; auto = the clip rounded up "
                                "to encoder.bucket_s (trimmed position embeddings; WER measured)"),
        "encoder.bucket_s": Param("int", 5, 1, 30, help="auto window step in seconds (few "
                                  "distinct shapes); unused with encoder.window=full"),
        # The auto window's WER cost (+64% to +187% on the shared Russian clips) comes from
        # cutting the silence Whisper always saw after the speech: give some back.
        "encoder.margin_s": Param("float", 0.0, 0, 30, help="auto window: seconds of silence "
                                  "encoded beyond the speech's end (whisper.cpp's audio_ctx "
                                  "users add ~1.3 s); unused with encoder.window=full"),
        "encoder.pad_s": Param("float", 0.0, 0, 30, help="auto window: seconds of silence put "
                               "before the speech (not when the clip would no longer fit 30 "
                               "s); unused with encoder.window=full"),
        # Whisper-base on a window of a few seconds repeats itself or drops words: a short VAD
        # piece (2 s between long pauses) gets this much window however short it is.
        "encoder.min_s": Param("float", 0.0, 0, 30, help="auto window: at least this many "
                               "seconds are encoded, silence after the speech (a floor for "
                               "short clips and pieces); unused with encoder.window=full"),
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
            self, bucket_s=5, margin_s=0.0, pad_s=0.0, min_s=0.0)

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
        from ..measure.window import Window

        return {"window": Window(self.window, self.bucket_s, self.margin_s, self.pad_s,
                                 self.min_s) if self.window != "full" else Window()}

    def describe(self) -> str:
        return ", ".join(filter(None, (
            self.window != "full" and f"window auto/{self.bucket_s}s" + (
                f" +{self.margin_s:g}s" if self.margin_s else "") + (
                f" pad {self.pad_s:g}s" if self.pad_s else "") + (
                f" >={self.min_s:g}s" if self.min_s else ""),
            self.compile != "none" and f"encoder compiled ({self.compile})")))
