"""One registry of the figures a trial produces: name, direction, unit, format, where it goes,
whether it is relative to the baseline. Pure: no Ray, MLflow or torch.

Every list of figure names elsewhere is derived from `FIGURES` (`tracking.METRICS`, what the
worker reports to Tune, `pareto.METRICS`, the report's and the card's columns). Adding a figure
is one entry here plus the code that measures it (`sweep.measure.evaluate` or
`sweep.search.worker`).

Destinations (`to`): `mlflow` (a metric of the trial's run), `tune` (the result Tune and Optuna
see), `csv` (a column of trials.csv/pareto.csv and a key of pareto.json's rows), `report` (front
files' leading columns), `card` (the exported checkpoint's model card and `export --verify`),
`objective` (a space may optimise it), `baseline` (copied under a result's `baseline`, the
figures of the same process's unchanged model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RECORDED = ("mlflow", "tune", "csv")  # every figure of a trial reaches all three (tested)
DESTINATIONS = (*RECORDED, "report", "card", "objective", "baseline")
KINDS = ("float", "int", "pair")


@dataclass(frozen=True)
class Figure:
    name: str
    better: str | None = None  # "min", "max", or None (a description, not a goal)
    unit: str = ""  # "" (fraction or count), "s", "MB", "x", "audio s/s"
    fmt: str = ".3f"
    to: tuple[str, ...] = RECORDED
    relative: bool = False  # measured against the baseline of the same process
    kind: str = "float"  # "pair": the evaluator gives [lo, hi], stored as <name>_lo, <name>_hi
    label: str = ""  # card and table text (default: the name)
    by: str = "evaluate"  # who produces it: sweep.measure.evaluate, or the worker around it
    of: str | None = None  # a relative figure's absolute one (dwer of wer), to derive it
    allowance: str | None = None  # constraint widening the hypervolume's reference point
    neutral: float | None = None  # what the baseline scores on a relative figure
    help: str = ""

    def __post_init__(self):
        bad = [f"better={self.better!r} (allowed: min, max, None)"] * (
            self.better not in ("min", "max", None))
        bad += [f"kind={self.kind!r} (allowed: {', '.join(KINDS)})"] * (self.kind not in KINDS)
        bad += [f"to={d!r} (allowed: {', '.join(DESTINATIONS)})" for d in self.to
                if d not in DESTINATIONS]
        if bad:
            raise ValueError(f"figure `{self.name}`: {'; '.join(bad)}")

    def shown(self, v: float) -> str:
        """`v` with its unit, as tables, cards and progress lines print it ("1.8x", "0.4 s")."""
        return format(v, self.fmt) + (self.unit if self.unit in ("", "x") else f" {self.unit}")

    @property
    def keys(self) -> tuple[str, ...]:
        """Its names in rows, MLflow metrics and CSV columns."""
        return (f"{self.name}_lo", f"{self.name}_hi") if self.kind == "pair" else (self.name,)

    @property
    def text(self) -> str:
        return self.label or self.name


_OBJ = (*RECORDED, "report", "objective", "baseline")
FIGURES: tuple[Figure, ...] = (
    Figure("wer", "min", to=(*_OBJ, "card"), label="WER", allowance="max_dwer",
           help="corpus word error rate (fraction)"),
    Figure("cer", "min", to=(*_OBJ, "card"), label="CER", allowance="max_dcer",
           help="corpus character error rate (fraction)"),
    Figure("dwer", "min", fmt="+.1%", to=(*RECORDED, "report"), relative=True, of="wer",
           label="dWER", neutral=0.0, help="relative WER change against the baseline"),
    Figure("dcer", "min", fmt="+.1%", to=(*RECORDED, "report"), relative=True, of="cer",
           label="dCER", neutral=0.0, help="relative CER change against the baseline"),
    Figure("dwer_ci95", fmt="+.1%", relative=True, kind="pair",
           help="paired bootstrap 95% interval of dwer"),
    Figure("dwer_upper", "min", fmt="+.1%", relative=True, of="wer", neutral=0.0,
           help="one-sided upper bound of dwer at the space's `confidence` (only when the space "
                "sets one: `max_dwer` is then judged on it)"),
    Figure("hallucination_rate", "min", to=(*_OBJ, "card"), label="hallucination",
           help="share of the non-speech probes (silence, noise, hum, tones) transcribed with "
                "any word in its first tokens (`evaluate.PROBE_TOKENS`); untimed"),
    Figure("hallucination_excess", "min", fmt="+.2f", to=(*RECORDED, "report"), relative=True,
           neutral=0.0, label="hallucination vs baseline",
           help="the probe rate over the baseline's own in the same language, in the language "
                "where it is most over (the set's languages each probed): a rate the baseline "
                "itself fails says nothing of a recipe, this does (`max_extra_hallucination`)"),
    Figure("speedup", "max", unit="x", fmt=".2f", to=(*RECORDED, "report", "card"),
           relative=True, of="latency_median_s", label="speed-up", neutral=1.0,
           help="the baseline's median latency over the trial's; on a long-form set (a "
                "recording over 30 s) the trial's throughput over the baseline's (recordings "
                "decoded as one stream each wait for their group)"),
    Figure("latency_mean_s", "min", "s", to=_OBJ, help="mean seconds per clip"),
    Figure("latency_median_s", "min", "s", to=(*_OBJ, "card"), label="latency, median (s)",
           help="median seconds per clip (features + generate)"),
    Figure("latency_p90_s", "min", "s", to=(*_OBJ, "card"), label="latency, p90 (s)",
           help="90th percentile of seconds per clip"),
    Figure("rtf", "min", to=(*RECORDED, "card", "baseline"), label="real-time factor",
           help="seconds of wall time per second of audio"),
    Figure("throughput", "max", "audio s/s", ".1f", to=(*_OBJ, "card"),
           label="throughput (audio s per s)",
           help="seconds of audio transcribed per second of wall time over the whole set, at "
                "the trial's batch size, segmentation included (1 / rtf)"),
    Figure("model_size_mb", "min", "MB", ".1f", to=_OBJ, help="size on disk after the recipe"),
    Figure("param_mb", "min", "MB", ".0f", to=(*RECORDED, "card", "baseline"),
           label="size in memory (MB)",
           help="parameters and buffers in memory"),
    Figure("sparsity", fmt=".3f", to=(*RECORDED, "baseline"), help="share of zero weights"),
    Figure("loops", "min", fmt="d", kind="int", to=(*RECORDED, "baseline"),
           help="decodes that hit the token cap or looped"),
    Figure("compile_s", unit="s", fmt=".1f", help="compilation paid in the warm-up pass"),
    Figure("recompiles", "min", fmt="d", kind="int", help="graphs built while timing"),
    Figure("warmup_s", unit="s", fmt=".1f", help="the untimed warm-up pass"),
    Figure("warm_windows", fmt="d", kind="int",
           help="encoder windows warmed (untimed) besides the first clip's"),
    Figure("warm_windows_s", unit="s", fmt=".1f", help="the untimed passes warming them"),
    Figure("prepare_s", unit="s", fmt=".1f", help="applying the recipe to the model"),
    Figure("peak_rss_mb", unit="MB", fmt=".0f", help="peak resident memory of the process"),
    Figure("threads", fmt="d", kind="int", help="torch threads of the trial"),
    Figure("n_utterances", fmt="d", kind="int", help="clips scored"),
    Figure("clips_measured", fmt="d", kind="int",
           help="clips transcribed: all of them, or those before an early stop"),
    Figure("dropped_empty_refs", fmt="d", kind="int", help="clips without a reference"),
    Figure("trial_s", unit="s", fmt=".1f", by="worker", help="the trial's wall time"),
    Figure("worker_prepare_s", unit="s", fmt=".1f", by="worker",
           help="loading model, data and baseline (once per worker process)"),
)
BY_NAME: dict[str, Figure] = {f.name: f for f in FIGURES}
_BY_KEY: dict[str, Figure] = {k: f for f in FIGURES for k in f.keys}
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (("wer", "min"), ("latency_median_s", "min"))


def names(dest: str) -> tuple[str, ...]:
    """Figures that go to `dest`, in registry order."""
    if dest not in DESTINATIONS:
        raise ValueError(f"destination {dest!r} unknown (allowed: {', '.join(DESTINATIONS)})")
    return tuple(f.name for f in FIGURES if dest in f.to)


def keys(dest: str) -> tuple[str, ...]:
    """Row keys (a pair as its two halves) of the figures that go to `dest`."""
    return tuple(k for n in names(dest) for k in BY_NAME[n].keys)


def of_key(key: str) -> Figure | None:
    """The figure a row key belongs to (`dwer_ci95_lo` -> dwer_ci95), else None."""
    return _BY_KEY.get(key)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or (
        type(v).__module__ == "numpy" and hasattr(v, "item"))


def cast(key: str, value: Any) -> Any:
    """A stored value back in its figure's type: MLflow keeps every metric as a float, so
    `loops` 3 comes back 3.0; non-figures pass through."""
    f = of_key(key)
    if f is None or not _number(value):
        return value
    return int(value) if f.kind == "int" else float(value)


def flatten(result: Mapping) -> dict[str, float | int]:
    """The figures found in an evaluator's (or worker's) result as row keys and plain numbers;
    a pair `[lo, hi]` becomes `<name>_lo`, `<name>_hi`."""
    out = {}
    for f in FIGURES:
        v = result.get(f.name)
        if f.kind == "pair":
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_number, v)):
                out.update(zip(f.keys, (float(v[0]), float(v[1]))))
            else:  # a row (already flat) holds the halves themselves
                out.update({k: float(result[k]) for k in f.keys if _number(result.get(k))})
        elif _number(v):
            out[f.name] = cast(f.name, v)
    return out
