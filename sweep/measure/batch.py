"""Transcribing clips and recordings as their decoding Plan says: each cut into pieces
(`plan.segment`, `sweep.measure.segment`), the pieces of all of them encoded and decoded
`plan.batch` at a time, the pieces' texts joined back per recording.

Pieces are batched longest first: with the clip's window (`encoder.window=auto`) a batch is
encoded on its longest piece's window, so pieces of like length go together. A long recording
decoded sequentially by HF generate (the unchanged model's own long-form decoding, the
baseline of a long-form set) is one call of its own: each window starts where the previous
one's text ended, so its windows cannot be batched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import decode, scoring
from .modules import sync
from .greedy import timestamp_begin
from .segment import Piece, is_long, pieces

RATE = 16_000
TIME_PRECISION = 0.02  # seconds per Whisper timestamp token
REST_MIN_S = 1.0  # a piece's rest after its last timestamp shorter than this is not decoded
REST_ROUNDS = 3  # pieces decoded at most this many times (the first and two rests)


@dataclass(frozen=True)
class Heard:
    """One recording's transcription: its text, content token ids (every piece's, in order),
    whether some piece ran to its token cap, and how many pieces it was decoded as."""
    text: str
    ids: list[int]
    cap_reached: bool
    pieces: int


def hf_long_form(model, processor, audio: np.ndarray, plan, *, language: str,
                 task: str) -> list[int]:
    """Token ids (timestamps included) of HF generate's sequential long-form decoding of one
    recording: 30 s windows, each from the last complete segment's end timestamp on."""
    from .window import input_dtype

    fe = processor.feature_extractor(audio, sampling_rate=RATE, return_tensors="pt",
                                     truncation=False, padding="longest",
                                     return_attention_mask=True)
    device = next(model.parameters()).device
    cap = scoring.max_new_tokens_for(30.0)  # per window
    kwargs = dict(return_timestamps=True, num_beams=1, do_sample=False,
                  max_new_tokens=min(cap, plan.max_new_tokens) if plan.max_new_tokens else cap)
    if getattr(model.generation_config, "is_multilingual", True):
        kwargs.update(language=language, task=task)
    if plan.no_repeat:
        kwargs["no_repeat_ngram_size"] = plan.no_repeat
    with torch.inference_mode():
        out = model.generate(fe.input_features.to(device=device, dtype=input_dtype(model)),
                             attention_mask=fe.attention_mask.to(device), **kwargs)
    ids = out["sequences"] if isinstance(out, dict) else out
    return [int(t) for t in ids[0].tolist()]


def _own_long_form(plan, duration_s: float) -> bool:
    return not plan.segment.vad and is_long(duration_s) and isinstance(plan, decode.GeneratePlan)


def _batches(work: list[tuple[int, Piece]], size: int) -> list[list[int]]:
    """Indices into `work` decoded together: longest first, `size` at a time."""
    order = sorted(range(len(work)), key=lambda k: -work[k][1].audio.size)
    return [order[b:b + size] for b in range(0, len(order), size)]


def _work(audios: list[np.ndarray], plan) -> list[tuple[int, Piece]]:
    """(recording index, piece) of every recording not decoded by HF's own long-form."""
    return [(i, p) for i, a in enumerate(audios) if not _own_long_form(plan, a.size / RATE)
            for p in pieces(a, plan.segment, windowed=True)]


def rest(piece: Piece, row: list[int], first: int, capped: bool) -> Piece | None:
    """What of `piece` its decoding (`row`, timestamps kept; `first`: the first timestamp
    token) left undecoded: the audio after its last timestamp, when the decoding ended there
    on its own with at least REST_MIN_S still to go. Whisper takes a closing timestamp as the
    window heard to its end; on a VAD piece there is speech after it (whisper-base, ending a
    30 s piece early, skipped a command there: docs/longform.md)."""
    stamps = [t for t in row if t >= first]
    if capped or not stamps or stamps[-1] == first:
        return None
    cut = int(round((stamps[-1] - first) * TIME_PRECISION * RATE))
    if piece.audio.size - cut < REST_MIN_S * RATE:
        return None
    # where the rest lies in the recording (for a glued piece, counted as if contiguous: the
    # span only orders the pieces)
    start = piece.spans[0][0] + cut
    return Piece(piece.audio[cut:], ((start, start + piece.audio.size - cut),))


def _decode_pieces(model, processor, work, plan, language, task,
                   follow) -> list[tuple[list[int], bool]]:
    """(token ids, cap reached) of each piece of `work` ((key, piece) pairs), timestamps kept.
    `follow(key, piece, row, capped)` may give one more (key, piece) to decode after a piece:
    it is appended to `work`, which grows."""
    def kept(d: float) -> int:  # each piece as if decoded alone: its own cap
        cap = scoring.max_new_tokens_for(d)
        return min(cap, plan.max_new_tokens) if plan.max_new_tokens else cap

    def capped(row: list[int], d: float) -> bool:
        return len(row) >= scoring.max_new_tokens_for(d)

    if decode.streams(plan):
        def then(k: int, row: list[int]):
            key, p = work[k]
            if (more := follow(key, p, row, capped(row, p.duration_s))) is not None:
                work.append(more)
                return more[1].audio, more[1].duration_s, kept(more[1].duration_s)

        durs = [p.duration_s for _, p in work]
        rows = decode.stream(model, processor, [p.audio for _, p in work], durs, plan,
                             language=language, task=task, caps=[kept(d) for d in durs],
                             then=then)
        return [(row, capped(row, p.duration_s)) for row, (_, p) in zip(rows, work)]
    got: list[tuple[list[int], bool]] = []
    while len(got) < len(work):  # in rounds: the pieces that follow come after a round
        todo = work[len(got):]
        rows: list = [None] * len(todo)
        for idx in _batches(todo, plan.batch):
            part = [todo[k][1] for k in idx]
            durs = [p.duration_s for p in part]
            cap = max(scoring.max_new_tokens_for(d) for d in durs)
            feats = decode.features(model, processor, [p.audio for p in part], durs, plan)
            out = decode.decode(model, feats, plan, language=language, task=task, cap=cap,
                                keep_timestamps=True)
            for k, row, d in zip(idx, out, durs):  # (a batch decodes to its longest's cap)
                row = row[:kept(d)]
                rows[k] = (row, capped(row, d))
        got += rows
        work += [m for (key, p), (row, c) in zip(todo, rows)
                 if (m := follow(key, p, row, c)) is not None]
    return got


def transcribe_many(model, processor, audios: list[np.ndarray], plan=None, *, language: str,
                    task: str = "transcribe") -> list[Heard]:
    """Transcribe several recordings (16 kHz float32) in one language, as `plan` says. With
    timestamps, a VAD piece whose decoding ended early is decoded again from its last
    timestamp (`rest`), at most REST_ROUNDS times in all."""
    plan = plan or decode.Plan.default()
    tok = processor.tokenizer
    eos = tok.eos_token_id
    first = timestamp_begin(model.generation_config)
    own = {i: hf_long_form(model, processor, a, plan, language=language, task=task)
           for i, a in enumerate(audios) if _own_long_form(plan, a.size / RATE)}
    rests = plan.timestamps and plan.segment.vad  # a VAD piece has speech up to its end

    def follow(key, piece, row, capped):  # its rest, keyed (recording, piece, rests...)
        if (rests and len(key) - 1 < REST_ROUNDS
                and (r := rest(piece, row, first, capped)) is not None):
            return key + (1,), r

    work = [((i, k), p) for k, (i, p) in enumerate(_work(audios, plan))]
    got = [([t for t in row if t < first], capped) for row, capped in
           _decode_pieces(model, processor, work, plan, language, task, follow)]
    order = sorted(range(len(work)), key=lambda k: work[k][0])
    work = [(work[k][0][0], work[k][1]) for k in order]
    got = [got[k] for k in order]
    out = []
    for i in range(len(audios)):
        if i in own:
            ids = own[i]
            out.append(Heard(tok.decode(ids, skip_special_tokens=True).strip(),
                             [t for t in ids if t < eos], False, 1))
            continue
        mine = [got[k] for k, (owner, _) in enumerate(work) if owner == i]
        texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids, _ in mine]
        out.append(Heard(" ".join(t for t in texts if t),
                         [t for ids, _ in mine for t in ids if t < eos],
                         any(cap for _, cap in mine), len(mine)))
    return out


def timed(model, processor, audios: list[np.ndarray], plan=None, *, language: str,
          task: str = "transcribe") -> tuple[list[Heard], float]:
    """`transcribe_many` and its wall seconds (segmentation included)."""
    sync(model)
    t0 = time.perf_counter()
    heard = transcribe_many(model, processor, audios, plan, language=language, task=task)
    sync(model)
    return heard, time.perf_counter() - t0


def warm(model, processor, recordings: list[list[np.ndarray]], languages: list[str], plan, *,
         task: str = "transcribe", tokens: int = 3, passes: int = 2) -> int:
    """Untimed passes of `tokens` tokens over one batch of every shape (pieces in the batch,
    encoder window) that transcribing `recordings` (each a group transcribed together) will
    decode; returns the shapes warmed. A compiled encoder or step compiles per shape, a
    scripted step traces per batch size: a shape first met while timing paid for it there."""
    import dataclasses

    from .window import full_frames

    short, full, seen = dataclasses.replace(plan, max_new_tokens=tokens), full_frames(model), {}
    if decode.streams(plan):  # each piece encoded alone (its window), one trace per row count
        for group, lang in zip(recordings, languages):
            work = _work(group, plan)
            for _, p in work:
                key = (min(plan.batch, len(work)), plan.window.frames(p.duration_s, full), lang)
                seen.setdefault(key, p.audio)
        for n, lang in {(n, lang) for n, _, lang in seen}:
            part = [a for (m, _, k), a in seen.items() if (m, k) == (n, lang)]
            part = part * -(-n // len(part))  # at least n: the stream runs n rows
            for _ in range(passes):
                decode.stream(model, processor, part, [a.size / RATE for a in part],
                              dataclasses.replace(short, batch=n), language=lang, task=task,
                              caps=[tokens] * len(part))
        return len(seen)
    for group, lang in zip(recordings, languages):
        work = _work(group, plan)
        for idx in _batches(work, plan.batch):
            part = [work[k][1].audio for k in idx]
            key = (len(part), max(plan.window.frames(a.size / RATE, full) for a in part), lang)
            seen.setdefault(key, part)
    for (_, _, lang), part in seen.items():
        for _ in range(passes):
            feats = decode.features(model, processor, part, [a.size / RATE for a in part],
                                    short)
            decode.decode(model, feats, short, language=lang, task=task, cap=tokens)
    return len(seen)


def groups(durations: list[float], langs: list[str], batch: int,
           stream: bool = False) -> list[list[int]]:
    """Indices of the clips transcribed together: up to `batch` consecutive clips of one
    language; a long recording alone (its own pieces fill the batches) unless the plan
    `stream`s (`decode.streams`): then up to `batch` recordings share one stream, whose rows
    a recording's pieces alone would leave empty most of the time."""
    out: list[list[int]] = []
    for i, (d, lang) in enumerate(zip(durations, langs)):
        last = out[-1] if out else None
        if (last is None or len(last) >= batch or langs[last[0]] != lang
                or not stream and (is_long(d) or is_long(durations[last[0]]))):
            out.append([i])
        else:
            last.append(i)
    return out
