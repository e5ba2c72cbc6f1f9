"""Command-line options shared by `sweep.evaluate` and `sweep.launch` (model and data), and their
loading."""

from __future__ import annotations

import sys
import time

DEFAULT_MODEL = "embedded:whisper-base"
DEFAULT_DATASET = "embedded"


def add_model_data_args(ap) -> None:
    g = ap.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="embedded:whisper-base (offline default), random:tiny|base|small|large-v3"
                        " (random weights, latency only), a local checkpoint dir or a Hub id")
    g.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="embedded (the repo's Russian set), shared (../shared/speech), a JSONL "
                        "manifest, several of these joined by + as one set (shared+embedded), "
                        "a save_to_disk folder or a Hugging Face dataset id")
    g.add_argument("--config", default=None, help="Hugging Face dataset config name")
    g.add_argument("--split", default="test", help="dataset split")
    g.add_argument("--audio-column", default="audio", help="dataset audio column")
    g.add_argument("--text-column", default="text", help="dataset reference text column")
    g.add_argument("--max-samples", type=int, default=None,
                   help="evaluate the first N usable utterances (default: all)")
    g.add_argument("--language", default=None,
                   help="language passed to generate() and used to filter the data "
                        "(default: each utterance's own `lang`)")
    g.add_argument("--numbers", default="auto", choices=("auto", "words", "none"),
                   help="number normalisation before scoring (digits -> words via num2words)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")


def load_data(args):
    from .data import load_eval_set

    return load_eval_set(args.dataset, max_samples=args.max_samples, config=args.config,
                         split=args.split, audio_column=args.audio_column,
                         text_column=args.text_column, language=args.language)


def require_references(evalset) -> None:
    """A sweep's fronts, constraints and MLflow runs are WER against references: a set without
    any (scored by agreement with the baseline's transcripts) is refused, before Ray starts."""
    from .data import DataError

    if not evalset.labelled:
        raise DataError(f"`dataset` {evalset.name!r} has no references (no line has `text`): "
                        "a sweep needs them; measure a recipe on it with `python -m "
                        "sweep.evaluate --recipe ...`, which scores agreement WER against the "
                        "baseline's own transcripts")


def load_calibration(args):
    """A calibration set disjoint from the evaluation set; the embedded one when none is left."""
    from .data import DataError, calibration_set

    try:
        return calibration_set(args.dataset, eval_max_samples=args.max_samples,
                               config=args.config, split=args.split,
                               audio_column=args.audio_column, text_column=args.text_column,
                               language=args.language)
    except DataError as e:
        print(f"note: {e}; calibrating on the embedded calibration set instead", file=sys.stderr)
        return calibration_set("embedded")


def quiet_transformers() -> None:
    """Per-call generate() warnings (max_length vs max_new_tokens, suppress_tokens) drown the
    progress lines; errors still show. `--verbose` (`sweep.console`) keeps them."""
    from transformers.utils import logging as hf_logging

    from .. import console

    if not console.verbose():
        hf_logging.set_verbosity_error()


def load_model_data(args, recipe=None):
    """Data first (cheap, validates input), then the model; calibration only when `recipe`
    (a `Recipe`) `calibrates`."""
    from .models import load_model

    quiet_transformers()
    evalset = load_data(args)
    calib = load_calibration(args) if recipe is not None and recipe.calibrates else None
    loaded = load_model(args.model, device=args.device)
    return loaded, evalset, calib


def progress(label: str, stream=None):
    """A callback(done, total) that rewrites one status line, at most every half second."""
    state = {"t": 0.0, "t0": time.perf_counter()}
    stream = stream or sys.stderr  # looked up now, not at import (pytest swaps it)

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - state["t"] < 0.5:
            return
        state["t"] = now
        end = "\n" if done >= total else ""
        stream.write(f"\r  {label}: {done}/{total} utterances, {now - state['t0']:.0f} s{end}")
        stream.flush()

    return report
