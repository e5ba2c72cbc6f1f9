"""HYPER's own lines on the console: known, harmless third-party noise is filtered at its source,
each by its logger or warning category plus its message, never a whole library nor all warnings.

Installed on `import sweep` (the package's `__init__`), so the launcher, export and every Ray
worker (which imports `sweep` to unpickle its trainable) hold the filters before torch,
transformers or torchao are imported: torchao warns while it is imported. `--verbose` (or
`HYPER_VERBOSE=1`, which Ray's workers inherit) lets everything through again. Pure: the
standard library only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager

VERBOSE_ENV = "HYPER_VERBOSE"

# logger name -> message of a known, harmless record logged there (any level up to WARNING).
NOISE = {
    # CPU wheels lack torchao's optional CUDA extensions (mxfp8, cutlass): said at its import.
    "torchao": r"^Failed to load .*_C_\w+.*\.so",
    # torchao registers its Enums with torch's pytree, which torch now calls deprecated.
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported",
    # generate() keeps our `max_new_tokens` cap over the model's `max_length`, as meant (per
    # clip); Whisper's own generate() hands its suppress tokens on beside its config (once).
    "transformers.generation.utils": r"^(Both `max_new_tokens`|Passing `generation_config` "
                                     r"together with generation-related arguments="
                                     r"\(\{('(begin_)?suppress_tokens'(, )?)+\}\))",
    # Something that walks a model's attributes (tracing a scripted step, loading a stored
    # checkpoint) reads its `loss_function` property; inference never computes a loss.
    "transformers.modeling_utils": r"^`loss_type=None` was set in the config but it is "
                                   r"unrecognized",
    # A new sqlite tracking store and a new Optuna study: not news, the launcher names both.
    "mlflow.store.db.utils": r"^(Creating initial MLflow database tables|Updating database tables)",
    "optuna.storages._rdb.storage": r"^A new study created in RDB",
}
# (category, message) of known, harmless warnings whose category is importable without
# importing their library. Optuna's ExperimentalWarning is Optuna's own class:
# `ignore_warning` adds it where Optuna is imported (`sweep.search.sampler`).
WARNINGS = [
    # Optuna's PED-ANOVA importances (importances.json, a side file): per objective they need
    # `target=` (search.study.write_importances orients max ones), and on a small sweep they say
    # that few trials make them coarse.
    (UserWarning, r"PedAnovaImportanceEvaluator computes the importances of params to achieve"),
    (UserWarning, r"Target and region quantiles select the same set of trials"),
    (UserWarning, r"Some regimes for parameter `[^`]*` have less than"),
    (UserWarning, r"The number of trials is too small to compute importances"),
    # Tune times our define-by-run sampling and warns past 1 s; on a loaded 2-core machine the
    # space's walk (conditions, TPE) can take that long, and no trial work happens there.
    (UserWarning, r"Define-by-run function passed in the `space` argument took"),
    # torch 2.13 calls its quantized tensors deprecated; fbgemm's int8 Linears (the dynamic
    # int8 scheme, and a stored checkpoint's packed weights) are built from them on purpose.
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other "
                  r"quantized tensor creation functions"),
]
# Tune's legacy console engine honours RunConfig(verbose=0); the default engine prints its
# configuration box and a TensorBoard hint whatever `verbose` says (ray 2.60).
TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}

_state = {"verbose": os.environ.get(VERBOSE_ENV, "") not in ("", "0"), "installed": False}
_ignored: list[tuple] = []  # the entries this module put in `warnings.filters`


def verbose() -> bool:
    return _state["verbose"]


class _Known(logging.Filter):
    """Drops one known message of one logger (checked when logged, so `--verbose` given after
    the import still shows everything)."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return (_state["verbose"] or record.levelno > logging.WARNING
                or not self.pattern.search(record.getMessage()))


def install() -> None:
    """Add the filters once per process (idempotent)."""
    if _state["installed"]:
        return
    _state["installed"] = True
    for name, pattern in NOISE.items():
        logging.getLogger(name).addFilter(_Known(pattern))
    for category, message in WARNINGS:
        ignore_warning(category, message)


def ignore_warning(category: type[Warning], message: str = "") -> None:
    """Ignore warnings of `category` (whose message starts with the regex `message`), unless
    verbose."""
    if _state["verbose"]:
        return
    warnings.filterwarnings("ignore", message=message, category=category)
    _ignored.append(warnings.filters[0])


def no_progress_bars() -> None:
    """Transformers' progress bars (writing a checkpoint's shards) unless verbose: export prints
    its own lines."""
    if not _state["verbose"]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def set_verbose(on: bool = True) -> None:
    """`--verbose`: every third-party line shows again, here and in workers started after."""
    _state["verbose"] = on
    if not on:
        return
    os.environ[VERBOSE_ENV] = "1"
    warnings.filters[:] = [f for f in warnings.filters if not any(f is g for g in _ignored)]
    _ignored.clear()
    getattr(warnings, "_filters_mutated", lambda: None)()


@contextmanager
def quiet_tune():
    """Around `Tuner.fit()`: Tune's console engine that keeps `verbose=0` silent, unless
    verbose; the environment is restored after."""
    if _state["verbose"]:
        yield
        return
    saved = {k: os.environ.get(k) for k in TUNE_ENV}
    os.environ.update(TUNE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Captured:
    """What `captured` took from its file descriptor: `text`, once the block has ended."""

    text = ""


@contextmanager
def captured(fd: int):
    """Whatever is written to file descriptor `fd` (1: stdout, 2: stderr) inside the block,
    C and C++ libraries below Python included (oneDNN's verbose log, libkineto's lines), into
    the yielded `Captured`'s `text` instead of the console; the descriptor is restored even on
    an error."""
    stream = sys.stdout if fd == 1 else sys.stderr
    out = Captured()
    with tempfile.TemporaryFile() as f:
        stream.flush()
        saved = os.dup(fd)
        os.dup2(f.fileno(), fd)
        try:
            yield out
        finally:
            stream.flush()
            os.dup2(saved, fd)
            os.close(saved)
            f.seek(0)
            out.text = f.read().decode(errors="replace")


def refusing(main):
    """A command's `main(argv)` whose bad input ends it as one line, `error: <message>` on
    stderr, and exit status 2, never a traceback. HYPER's input errors (RecipeError, DataError,
    ModelSpecError, CheckpointError...) are ValueErrors whose message names the rule, the value
    and what is allowed; a main with other exit statuses handles those errors itself."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run
