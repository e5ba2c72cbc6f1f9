"""Segmentation: how a recording is cut into the pieces the model transcribes (Whisper's own
sequential 30 s windows, or the speech a VAD finds). Only the decoding options change; the
pieces are batched by `decode.batch` (`sweep.measure.segment`, `sweep.measure.batch`)."""

from __future__ import annotations

import dataclasses

from ..measure.segment import JOINS, METHODS, RANGES, Segmenting
from .base import Param, RecipeError, Technique, technique

_D = Segmenting()  # the defaults and ranges, stated once where the segmentation is done


def _num(name: str, **kw) -> Param:
    lo, hi, lo_open, hi_open = RANGES[name]
    return Param("float", getattr(_D, name), lo, hi, lo_open=lo_open, hi_open=hi_open, **kw)


@technique("segment")
class SegmentConfig(Technique):
    PARAMS = {
        "segment.method": Param("choice", _D.method, choices=METHODS,
                                help="sequential = Whisper's own long-form decoding, 30 s "
                                "windows one after another (a clip up to 30 s is one window); "
                                "vad = Silero VAD's speech only, joined into pieces of at most "
                                "segment.max_s as segment.join says, each transcribed on its "
                                "own (long non-speech is never decoded)"),
        "segment.max_s": _num("max_s", help="vad: speech joined into pieces of at most this "
                              "many seconds; unused with sequential"),
        "segment.join": Param("choice", _D.join, choices=JOINS,
                              help="vad: span = a piece is the recording from its first speech "
                              "chunk to its last, the pauses between them kept (WhisperX); "
                              "speech = the chunks' speech alone, glued end to end "
                              "(faster-whisper's batched pipeline; whisper-base then skips "
                              "whole utterances); unused with sequential"),
        "segment.max_gap_s": _num("max_gap_s", help="vad with span: a pause longer than this "
                                  "between speech chunks ends a piece and is not decoded; "
                                  "unused otherwise"),
        "segment.threshold": _num("threshold", help="vad: speech probability above which a "
                                  "32 ms frame is speech; unused with sequential"),
        "segment.min_silence_s": _num("min_silence_s", help="vad: a pause shorter than this "
                                      "does not end a speech chunk; unused with sequential"),
        "segment.pad_s": _num("pad_s", help="vad: seconds kept on each side of a speech "
                              "chunk; unused with sequential"),
    }

    def _check(self):
        if self.method == "vad" and self.pad_s * 2 >= self.max_s:
            raise RecipeError(f"`segment.pad_s` must leave room for speech in a piece: twice "
                              f"it must be under segment.max_s, got pad_s={self.pad_s} with "
                              f"max_s={self.max_s}")

    def canonical(self):  # the VAD's settings mean nothing to sequential decoding
        if self.method != "vad":
            return type(self)()
        if self.join != "span":  # nor the gap rule to glued speech
            return dataclasses.replace(self, max_gap_s=_D.max_gap_s)
        return self

    def decoding(self) -> dict:
        cfg = self.canonical()  # sequential: nothing of the VAD's settings
        return {"segment": Segmenting(**{f.name: getattr(cfg, f.name)
                                         for f in dataclasses.fields(Segmenting)})}

    def describe(self) -> str:
        if self.method != "vad":
            return ""
        seg = self.decoding()["segment"]
        return (f"VAD segments <= {self.max_s:g} s, {seg.joining()} (threshold "
                f"{self.threshold:g}, silence {self.min_silence_s:g} s, padding {self.pad_s:g} s)")
