"""Segmentation: how a recording is cut into the pieces the model transcribes (Whisper's own
sequential 30 s windows, or the speech a VAD finds). Only the decoding options change; the
pieces are batched by `decode.batch` (`sweep.measure.segment`, `sweep.measure.batch`)."""

from __future__ import annotations

import dataclasses

from .base import Param, RecipeError, Technique, technique


@technique("segment")
class SegmentConfig(Technique):
    PARAMS = {
        "segment.method": Param("choice", "sequential", choices=("sequential", "vad"),
                                help="sequential = Whisper's own long-form decoding, 30 s "
                                "windows one after another (a clip up to 30 s is one window); "
                                "vad = Silero VAD's speech only, joined into pieces of at most "
                                "segment.max_s as segment.join says, each transcribed on its "
                                "own (long non-speech is never decoded)"),
        "segment.max_s": Param("float", 30.0, 1, 30, help="vad: speech joined into pieces of at "
                               "most this many seconds; unused with sequential"),
        "segment.join": Param("choice", "span", choices=("span", "speech"),
                              help="vad: span = a piece is the recording from its first speech "
                              "chunk to its last, the pauses between them kept (WhisperX); "
                              "speech = the chunks' speech alone, glued end to end "
                              "(faster-whisper's batched pipeline; whisper-base then skips "
                              "whole utterances); unused with sequential"),
        "segment.max_gap_s": Param("float", 10.0, 0, 30, help="vad with span: a pause longer "
                                   "than this between speech chunks ends a piece and is not "
                                   "decoded; unused otherwise"),
        "segment.threshold": Param("float", 0.5, 0, 1, lo_open=True, hi_open=True,
                                   help="vad: speech probability above which a 32 ms frame is "
                                   "speech; unused with sequential"),
        "segment.min_silence_s": Param("float", 0.16, 0, 10, help="vad: a pause shorter than "
                                       "this does not end a speech chunk; unused with "
                                       "sequential"),
        "segment.pad_s": Param("float", 0.4, 0, 5, help="vad: seconds kept on each side of a "
                               "speech chunk; unused with sequential"),
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
            return dataclasses.replace(self, max_gap_s=self.PARAMS["segment.max_gap_s"].default)
        return self

    def decoding(self) -> dict:
        from ..measure.segment import Segmenting

        cfg = self.canonical()  # sequential: nothing of the VAD's settings
        return {"segment": Segmenting(**{f.name: getattr(cfg, f.name)
                                         for f in dataclasses.fields(Segmenting)})}

    def describe(self) -> str:
        if self.method != "vad":
            return ""
        joined = (f"pauses <= {self.max_gap_s:g} s kept" if self.join == "span"
                  else "speech glued")
        return (f"VAD segments <= {self.max_s:g} s, {joined} (threshold {self.threshold:g}, "
                f"silence {self.min_silence_s:g} s, padding {self.pad_s:g} s)")
