"""Tune callbacks in the sweep's driver that keep its record whole: a trial measured on a node
whose logging failed reaches the sweep's journal (`Journal`), and a trial whose worker died says
why on its MLflow run (`Deaths`). Plain data only: Tune pickles callbacks with its state."""

from __future__ import annotations

import json
import re
import sys

from ray import cloudpickle
from ray import tune

from ..results import journal


class Journal(tune.Callback):
    """A trial's record that its worker could not log (`worker._keep`: its result carries
    `unlogged` and the record as `journal`) is written to the launcher's journal folder, where
    `tracking.reconcile` finds it at the end of the sweep or on --resume: a worker on a node
    without the launcher's disk kept no copy of its own."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("journal"):
            return
        why = result.get("unlogged")
        try:
            path = journal.save(self.folder, json.loads(result["journal"]))
        except (OSError, ValueError) as e:
            print(f"warning: trial {trial.trial_id} was measured but neither logged to MLflow "
                  f"({why}) nor kept in {self.folder}: {e}", file=sys.stderr)
            return
        print(f"warning: trial {trial.trial_id} was measured but not logged to MLflow ({why}); "
              f"kept in {path}, logged at the end of the sweep", file=sys.stderr)


class Deaths(tune.Callback):
    """A trial whose worker process died (the OOM killer, a segfault, its node lost) is retried
    by Tune (`FailureConfig`) and at last given up; its MLflow run stayed RUNNING and was later
    closed as an unexplained kill. Here each such attempt's run ends the moment Tune learns of
    it: FAILED, status `died`, Ray's report of why as `death` and its gist as `error` (an error
    the trainable itself raised: status `failed`)."""

    def __init__(self, uri: str, exp_id: str, sweep: str):
        self.uri, self.exp_id, self.sweep = uri, exp_id, sweep

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._record(trial, "retried")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "given up")

    def _record(self, trial, what: str) -> None:
        from ..results import tracking

        died, report = why(trial)
        line = gist(report)
        try:
            tracking.end_attempt(self.uri, self.exp_id, self.sweep, trial.trial_id,
                                 "died" if died else "failed", line, report if died else None)
            said = "its run says why (tag `death`)" if died else "its run has the error"
        except Exception as e:  # noqa: BLE001 - the store failed too: at least say it here
            said = f"not recorded in MLflow ({type(e).__name__}: {e})"
        print(f"warning: trial {trial.trial_id} {'lost its worker' if died else 'raised'} "
              f"({what}): {line}; {said}", file=sys.stderr)


def why(trial) -> tuple[bool, str]:
    """(whether the trial's worker died, Ray's report of its last error)."""
    from ray.exceptions import (NodeDiedError, OutOfMemoryError, RayActorError,
                                RayTaskError, WorkerCrashedError)

    exc, text = None, None
    try:  # written in the driver's staging folder the moment Tune handles the error
        with open(trial.pickled_error_file, "rb") as f:
            exc = cloudpickle.load(f)
    except Exception:  # noqa: BLE001 - none, or one Ray could not pickle: its text then
        try:
            with open(trial.error_file, encoding="utf-8") as f:
                text = f.read().rsplit("Failure #", 1)[-1].split("\n", 1)[-1].strip()
        except (OSError, TypeError):
            pass
    if exc is None:
        return True, text or "no error recorded by Ray"
    if isinstance(exc, RayTaskError):  # the trainable's own exception, or a death inside it
        cause = exc.as_instanceof_cause()
        died = isinstance(cause, (RayActorError, WorkerCrashedError, OutOfMemoryError))
        return died, f"{type(cause).__name__}: {cause}" if died else str(exc)
    died = isinstance(exc, (RayActorError, WorkerCrashedError, OutOfMemoryError, NodeDiedError))
    return died, f"{type(exc).__name__}: {exc}"


def gist(report: str) -> str:
    """Ray's report in a line: the error's name with its exit type and detail when Ray gives
    them (a SIGKILLed worker, Ray 2.60: "ActorDiedError SYSTEM_ERROR Worker unexpectedly exits
    with a connection error code 2"), else its first line."""
    name = report.split(":", 1)[0] if ":" in report.split("\n", 1)[0] else ""
    kind = re.search(r"exit type: (\w+)", report, re.I)
    detail = re.search(r"exit detail: (.+?)(?:\. |\n|$)", report, re.I)
    if kind or detail:
        return " ".join(x for x in (name, kind and kind.group(1),
                                    detail and detail.group(1).strip()) if x)[:500]
    return report.strip().split("\n", 1)[0][:500]
