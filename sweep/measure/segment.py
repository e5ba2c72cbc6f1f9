"""Segmentation: how a recording is cut into pieces the model transcribes, each within Whisper's
30 s window (`segment.*` of a recipe).

- `sequential` (the default): Whisper's own long-form decoding. A clip of at most 30 s is one
  piece, as always. A longer recording goes window by window: with `decode.loop=generate`
  through HF `generate`'s long-form decoding (timestamps; each window starts where the last
  one's last complete segment ended: exactly what an unchanged model does, the baseline of a
  long-form set); with the greedy loop, which decodes without timestamps, in consecutive
  windows of at most 30 s, each cut at the quietest 100 ms of its last 5 s, so that a word is
  rarely cut in two (`quiet_cuts`).
- `vad`: Silero VAD v6 (ONNX, shipped inside faster-whisper's wheel: offline) finds the speech;
  consecutive speech chunks are joined into pieces of at most `max_s` seconds, each transcribed
  on its own; a recording without speech gives no piece and an empty transcript. How they are
  joined (`join`):
  - `span` (WhisperX's `merge_chunks`): a piece is the recording from its first chunk's start to
    its last chunk's end, the pauses between them kept; a pause longer than `max_gap_s` ends a
    piece, so long non-speech is never decoded.
  - `speech` (faster-whisper's `BatchedInferencePipeline`, `collect_chunks`): the chunks' speech
    alone, glued end to end. Measured on long Russian recordings (issue #28): whisper-base,
    which decodes a piece without timestamps, skips whole utterances when they abut like that
    (WER 0.47 against sequential decoding's 0.34 on two recordings, 122 words heard of 154;
    `span` 0.33, every word there), and faster-whisper's batched pipeline lost the same.

Pieces are independent of one another, so several are encoded and decoded as one batch
(`decode.batch`; `sweep.measure.batch`). Pure: numpy, and faster-whisper's VAD when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHODS = ("sequential", "vad")
JOINS = ("span", "speech")
RATE = 16_000
WINDOW_S = 30.0  # Whisper's window: any longer clip is long-form
# the VAD's numeric settings: (low, high, low open, high open); the recipe's params take these
RANGES = {"max_s": (1.0, WINDOW_S, False, False), "threshold": (0.0, 1.0, True, True),
          "min_silence_s": (0.0, 10.0, False, False), "pad_s": (0.0, 5.0, False, False),
          "max_gap_s": (0.0, WINDOW_S, False, False)}
CUT_SEARCH_S = 5.0  # a greedy sequential window is cut in its last 5 s ...
CUT_FRAME_S = 0.1  # ... at the quietest 100 ms


@dataclass(frozen=True)
class Segmenting:
    """`segment.*` of a recipe (the VAD's defaults are faster-whisper's batched pipeline's; its
    joining is WhisperX's, which measured more accurate)."""
    method: str = "sequential"
    max_s: float = 30.0  # vad: speech joined into pieces of at most this many seconds
    threshold: float = 0.5  # vad: speech probability above which a 32 ms frame is speech
    min_silence_s: float = 0.16  # vad: a pause shorter than this does not end a speech chunk
    pad_s: float = 0.4  # vad: seconds kept on each side of a speech chunk
    join: str = "span"  # vad: span = pauses between chunks kept in a piece; speech = glued
    max_gap_s: float = 10.0  # vad, span: a pause longer than this ends a piece (not decoded)

    def __post_init__(self):
        bad = []
        if self.method not in METHODS:
            bad.append(f"`segment.method` must be one of {METHODS}, got method={self.method!r}")
        if self.join not in JOINS:
            bad.append(f"`segment.join` must be one of {JOINS}, got join={self.join!r}")
        for name, (lo, hi, lo_open, hi_open) in RANGES.items():
            v = getattr(self, name)
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
            if not ok:
                bad.append(f"`segment.{name}` must be in {'(' if lo_open else '['}{lo:g}, "
                           f"{hi:g}{')' if hi_open else ']'}, got {name}={v!r}")
        if bad:
            raise ValueError("; ".join(bad))

    @property
    def vad(self) -> bool:
        return self.method == "vad"

    def describe(self) -> str:
        if not self.vad:
            return "sequential"
        return (f"VAD (threshold {self.threshold:g}, silence {self.min_silence_s:g} s, padding "
                f"{self.pad_s:g} s, pieces <= {self.max_s:g} s, {self.joining()})")

    def joining(self) -> str:
        """How speech chunks become pieces, in words (this and the recipe's description)."""
        return f"pauses <= {self.max_gap_s:g} s kept" if self.join == "span" else "speech glued"


@dataclass(frozen=True)
class Piece:
    """A part of a recording transcribed on its own: its samples, and where they came from
    (`spans`: (start, end) sample ranges of the recording, in order; a VAD piece joins several)."""
    audio: np.ndarray
    spans: tuple[tuple[int, int], ...]

    @property
    def duration_s(self) -> float:
        return self.audio.size / RATE


def is_long(duration_s: float) -> bool:
    """A clip longer than Whisper's window: transcribed in several windows."""
    return duration_s > WINDOW_S


def speech(audio: np.ndarray, seg: Segmenting) -> list[tuple[int, int]]:
    """Speech chunks of `audio` (16 kHz float32) as (start, end) samples, by Silero VAD with
    `seg`'s threshold, minimum silence and padding; none longer than `seg.max_s`."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if audio.size == 0:
        return []
    opts = VadOptions(threshold=seg.threshold, min_silence_duration_ms=int(
        round(seg.min_silence_s * 1000)), speech_pad_ms=int(round(seg.pad_s * 1000)),
        max_speech_duration_s=seg.max_s)
    out = [(int(s["start"]), int(s["end"])) for s in get_speech_timestamps(
        np.ascontiguousarray(audio, dtype=np.float32), opts, sampling_rate=RATE)]
    # padding may overrun max_s by a little: cut what is over (rare, and never speech's core)
    limit = int(seg.max_s * RATE)
    return [(s, min(e, s + limit)) for s, e in out if e > s]


def join(audio: np.ndarray, chunks: list[tuple[int, int]], max_s: float) -> list[Piece]:
    """Consecutive chunks joined, the audio between them left out, into pieces of at most
    `max_s` seconds (faster-whisper's `collect_chunks`)."""
    limit, pieces, cur, n = int(round(max_s * RATE)), [], [], 0
    for s, e in chunks:
        if cur and n + (e - s) > limit:
            pieces.append(cur)
            cur, n = [], 0
        cur.append((s, e))
        n += e - s
    if cur:
        pieces.append(cur)
    return [Piece(np.concatenate([audio[s:e] for s, e in p]), tuple(p)) for p in pieces]


def span(audio: np.ndarray, chunks: list[tuple[int, int]], max_s: float,
         max_gap_s: float) -> list[Piece]:
    """Consecutive chunks joined into contiguous stretches of the recording, the pauses between
    them kept, each at most `max_s` long; a pause over `max_gap_s` ends one (WhisperX's
    `merge_chunks`, with the gap rule so that long non-speech is never decoded)."""
    limit, gap, out = int(round(max_s * RATE)), int(round(max_gap_s * RATE)), []
    for s, e in chunks:
        if out and e - out[-1][0] <= limit and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return [Piece(audio[s:e], ((s, e),)) for s, e in out]


def quiet_cuts(audio: np.ndarray, window_s: float = WINDOW_S) -> list[tuple[int, int]]:
    """Consecutive (start, end) windows of at most `window_s` covering `audio`, each but the
    last ended at the quietest `CUT_FRAME_S` (lowest RMS) of its last `CUT_SEARCH_S`."""
    win, frame = int(window_s * RATE), int(CUT_FRAME_S * RATE)
    search = min(int(CUT_SEARCH_S * RATE), win // 2)
    out, start = [], 0
    while audio.size - start > win:
        lo, hi = start + win - search, start + win
        frames = audio[lo:hi][: (hi - lo) // frame * frame].reshape(-1, frame)
        energy = (frames.astype(np.float64) ** 2).mean(axis=1)
        q = int(np.argmin(energy[::-1]))  # the latest of equally quiet frames: longer windows
        cut = lo + (len(energy) - q) * frame - frame // 2
        out.append((start, cut))
        start = cut
    out.append((start, int(audio.size)))
    return out


def pieces(audio: np.ndarray, seg: Segmenting, *, windowed: bool) -> list[Piece]:
    """The pieces `audio` is transcribed as. `windowed`: cut a long sequential recording into
    30 s windows here (the greedy loop); else it stays one piece (HF generate seeks itself)."""
    if seg.vad:
        chunks = speech(audio, seg)
        if seg.join == "span":
            return span(audio, chunks, seg.max_s, seg.max_gap_s)
        return join(audio, chunks, seg.max_s)
    if windowed and is_long(audio.size / RATE):
        return [Piece(audio[s:e], ((s, e),)) for s, e in quiet_cuts(audio)]
    return [Piece(audio, ((0, int(audio.size)),))]
