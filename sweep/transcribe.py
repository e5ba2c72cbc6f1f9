"""`python -m sweep.transcribe --checkpoint DIR audio.wav ...`: transcribe files with an exported
checkpoint, as its users would in production (torch + transformers only).

Audio is read with soundfile and averaged/resampled to 16 kHz mono like every evaluation set
(`sweep.inputs.data.to_mono_16k`). Files of any length are decoded exactly as the trial measured
them (`sweep.measure.evaluate.transcribe`: greedy, `language=` and `task=` always passed), with
the recipe's segmentation: Whisper's sequential long-form decoding beyond 30 s, or the speech
its VAD finds, its pieces batched by `decode.batch`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from . import console
from .inputs.data import SAMPLE_RATE, to_mono_16k
from .measure.decode import streams
from .measure.evaluate import TASKS

WINDOW_S = 30.0  # Whisper's input window; longer audio is decoded window by window


class TranscribeError(ValueError):
    """An input that cannot be transcribed; the message names the file or option."""


def read_audio(path) -> np.ndarray:
    """float32 16 kHz mono samples of an audio file soundfile reads (wav, flac, ogg, mp3...)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        raise TranscribeError(f"`{path}` cannot be read as audio: {e}") from None
    if not data.shape[0]:
        raise TranscribeError(f"`{path}` holds no samples")
    return to_mono_16k(data, sr)


def default_language(ck) -> str | None:
    """The language the checkpoint was measured in, when its data set had a single one."""
    data = (getattr(ck, "metrics", None) or {}).get("data") or {}
    langs = data.get("languages") or []
    return data.get("language") or (langs[0] if len(langs) == 1 else None)


def _input_dtype(model) -> torch.dtype:
    w = model.model.encoder.conv1.weight  # casting recipes change the front-end's dtype
    return w.dtype if w.is_floating_point() else torch.float32


def transcribe_files(checkpoint, paths, *, language: str | None = None,
                     task: str = "transcribe", device: str | None = None) -> list[dict]:
    """Transcribe audio files with `checkpoint` (a directory, or what `sweep.load` returned).
    `language` defaults to the one the checkpoint was measured in. One dict per file:
    path and what `transcribe_audio` gives."""
    from .ship.checkpoint import load

    if task not in TASKS:
        raise TranscribeError(f"`task` must be one of {TASKS}, got {task=}")
    ck = checkpoint if hasattr(checkpoint, "model") else load(checkpoint, device=device)
    lang = language or default_language(ck)
    if not lang:
        raise TranscribeError("`language` is needed (e.g. ru, en): this checkpoint was not "
                              "measured on a single language, and Whisper must be told which")
    audios = [(str(p), read_audio(p)) for p in paths]  # every file readable before decoding
    from .measure.batch import groups

    # files share one stream when the recipe streams, `decode.batch` at a time (`seconds`:
    # their group's); else one at a time
    plan = getattr(ck, "options", None)
    size = plan.batch if plan is not None and streams(plan) else 1
    rows = []
    for g in groups([a.size / SAMPLE_RATE for _, a in audios], [lang] * len(audios), size,
                    stream=True):
        rows += [{"path": audios[i][0], **r} for i, r in zip(g, transcribe_together(
            ck, [audios[i][1] for i in g], language=lang, task=task))]
    return [{k: v for k, v in r.items() if k != "tokens"} for r in rows]


def transcribe_together(ck, audios: list[np.ndarray], *, language: str,
                        task: str = "transcribe") -> list[dict]:
    """Float32 16 kHz mono recordings with a loaded checkpoint, decoded together (`sweep.serve`
    batches requests with it), each segmented as its recipe says, the pieces of all of them
    `max(decode.batch, recordings)` at a time. Per recording: text, language, task,
    duration_s, seconds (the group's), cap_reached (some piece ran to its token cap) and
    tokens (the content token ids, every piece's)."""
    import dataclasses

    from .measure.batch import timed
    from .measure.decode import Plan

    plan = getattr(ck, "options", None) or Plan.default()
    plan = dataclasses.replace(plan, batch=max(plan.batch, len(audios)))
    heard, secs = timed(ck.model, ck.processor, audios, plan, language=language, task=task)
    return [{"text": h.text, "language": language, "task": task,
             "duration_s": a.size / SAMPLE_RATE, "seconds": secs,
             "cap_reached": h.cap_reached, "tokens": list(h.ids)}
            for a, h in zip(audios, heard)]


def transcribe_audio(ck, audio: np.ndarray, *, language: str,
                     task: str = "transcribe") -> dict:
    """One recording, as `python -m sweep.transcribe` decodes it: `transcribe_together`'s row."""
    return transcribe_together(ck, [audio], language=language, task=task)[0]


@console.refusing  # CheckpointError, TranscribeError, RecipeError: one line, exit 2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.transcribe", description=(
        "Transcribe audio files with a checkpoint exported by `python -m sweep.export`."))
    ap.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3...)")
    ap.add_argument("--checkpoint", required=True, help="the exported checkpoint directory")
    ap.add_argument("--language", default=None,
                    help="spoken language (default: the one the checkpoint was measured in)")
    ap.add_argument("--task", default="transcribe", choices=TASKS)
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="default: the device the checkpoint's recipe was measured on")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", action="store_true", help="one JSON object per file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    missing = [p for p in args.audio if not Path(p).is_file()]
    if missing:
        raise TranscribeError(f"audio file(s) not found: {missing}")
    rows = transcribe_files(args.checkpoint, args.audio, language=args.language,
                            task=args.task, device=args.device)
    for r in rows:
        print(json.dumps(r, ensure_ascii=False) if args.json else f"{r['path']}\t{r['text']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
