"""One codec for a trial's row: what a trial's result becomes in MLflow, and the row read back
from its run. Used by `tracking` (logging, `sweep_rows`), the worker (a resumed trial's row)
and `export`. MLflow's entities come in as plain arguments: nothing here imports MLflow.

A *row* is a flat dict: every figure under its row key (`figures.flatten`), `baseline` (the
baseline's figures), `device`, `kernels` (layer type -> implementation), `node`, `node_id`,
`gpu_ids`, and, read back from a run, `recipe`, `status`, `error`, `trial_id`, `run_id`,
`start_time`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import figures

BASE = "baseline_"  # MLflow metric prefix of the baseline's figures
# Row fields kept as run tags, and how each is written and read back.
_TAGS = {
    "device": (str, str),
    # the worker's machine (sweep.inputs.machine.info): CPU model, the ISA flags present that
    # decide the fast kernels, oneDNN's cap in force (None: uncapped, kept as an empty tag)
    "cpu": (str, str),
    "isa": (lambda v: ",".join(v), lambda s: [f for f in s.split(",") if f]),
    "isa_cap": (lambda v: v or "", lambda s: s or None),
    "kernels": (lambda v: json.dumps(v or {}, sort_keys=True), json.loads),
    "node": (str, str),
    "node_id": (str, str),
    "gpu_ids": (lambda v: ",".join(map(str, v)), lambda s: [g for g in s.split(",") if g]),
    "status": (str, str),  # ok, or pruned (stopped early, with its partial figures)
    "stop_reason": (str, str),  # why a pruned trial was stopped, in a line
}
# What the worker reports to Tune besides the figures (and its own status/run/trial keys).
TUNE_FIELDS = ("baseline", *_TAGS)


def tags(fields: Mapping) -> dict[str, str]:
    """Run tags of the row fields present in `fields` (others are left to the caller)."""
    return {k: enc(fields[k]) for k, (enc, _) in _TAGS.items() if _given(fields, k)}


_NULLABLE = ("isa_cap",)  # recorded when None too (null means "no cap", not "not known")


def _given(fields: Mapping, key: str) -> bool:
    return key in fields and (fields[key] is not None or key in _NULLABLE)


def params(recipe: Mapping) -> dict[str, str]:
    """The flat recipe as run params (MLflow keeps text; `Recipe.from_flat` reads it back)."""
    return {k: str(v) for k, v in sorted(recipe.items())}


def to_mlflow(result: Mapping) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a finished trial's result: its figures, the baseline's figures as
    `baseline_<name>`, and status/kernels/device/node tags."""
    metrics = {k: float(v) for k, v in figures.flatten(result).items()}
    metrics.update({BASE + k: float(v) for k, v in figures.flatten(
        result.get("baseline") or {}).items()})
    return metrics, tags({"kernels": {}, "status": "ok", **result})


# Tables a trial's run keeps as artifacts: file -> (the result's list, its columns).
TABLES = {"transcripts.json": ("utterances", ("id", "lang", "reference", "hypothesis",
                                              "latency_s", "tokens", "loop")),
          "probes.json": ("probes", ("id", "hypothesis"))}


def record(result: Mapping) -> dict:
    """Everything MLflow keeps of a measured trial, as plain data: `metrics` and `tags`
    (`to_mlflow`), `tables` (artifact file -> column -> values) and `end`, the state its run
    ends in: FINISHED, or FAILED for a trial stopped early (`pruned`: its partial figures are
    logged all the same, and a resumed sweep does not take it for a finished one). The sweep's
    journal keeps it before it is logged (`tracking.log_record`)."""
    metrics, tags_ = to_mlflow(result)
    tables = {name: {c: [u.get(c) for u in result[key]] for c in cols}
              for name, (key, cols) in TABLES.items() if result.get(key)}
    ok = result.get("status", "ok") == "ok"
    return {"metrics": metrics, "tags": tags_, "tables": tables,
            "end": "FINISHED" if ok else "FAILED"}


def from_result(result: Mapping) -> dict:
    """The row of a trial measured in this process: exactly what `from_mlflow` reads back
    once `to_mlflow`'s output is logged."""
    return {**figures.flatten(result), "baseline": figures.flatten(result.get("baseline") or {}),
            **{k: dec(enc(result[k])) for k, (enc, dec) in _TAGS.items()
               if _given(result, k)}}


def tune_row(row: Mapping) -> dict:
    """What a trial reports to Tune (and Optuna) of its row: every figure and TUNE_FIELDS. A
    list-valued tag (`isa`, `gpu_ids`) goes as its tag text: Tune's TensorBoard logger refuses
    lists of strings with a warning per trial."""
    return {k: _TAGS[k][0](v) if k in _TAGS and isinstance(v, list) else v
            for k, v in row.items()
            if k in TUNE_FIELDS or "tune" in getattr(figures.of_key(k), "to", ())}


def _status(run_status: str, tag: str | None) -> str:
    return {"FINISHED": tag or "ok", "FAILED": tag or "failed"}.get(run_status,
                                                                    run_status.lower())


def from_mlflow(info: Any, metrics: Mapping[str, float], tags_: Mapping[str, str],
                params_: Mapping[str, str]) -> dict:
    """The row of one trial run (`run.info`, `run.data.metrics/tags/params`). Never raises on
    a bad run: a recipe no parameter allows or a broken tag gives status `unreadable` and the
    reason in `error`, so one bad row cannot take the end of a sweep down."""
    from ..techniques.recipe import Recipe  # lazily: plugins register by then

    row = {**{k: figures.cast(k, v) for k, v in metrics.items() if not k.startswith(BASE)},
           "baseline": {k[len(BASE):]: figures.cast(k[len(BASE):], v)
                        for k, v in metrics.items() if k.startswith(BASE)},
           "status": _status(info.status, tags_.get("status")),
           "trial_id": tags_.get("hyper.trial_key"), "run_id": info.run_id,
           "device": tags_.get("device"), "error": tags_.get("error"), "kernels": {},
           "recipe": dict(params_), "start_time": info.start_time}
    try:
        # `status` comes from the run's state and its tag together (above)
        row.update({k: dec(tags_[k]) for k, (_, dec) in _TAGS.items()
                    if k in tags_ and k != "status"})
        row["recipe"] = Recipe.from_flat(dict(params_)).to_flat()
    except ValueError as e:  # RecipeError and JSONDecodeError are ValueErrors
        row.update(status="unreadable", error=f"{type(e).__name__}: {e}")
    return row


def from_run(run: Any) -> dict:
    """`from_mlflow` of an MLflow `Run` object."""
    return from_mlflow(run.info, run.data.metrics, run.data.tags, run.data.params)
