"""Tune callbacks in the sweep's driver that keep its record whole: a trial measured on a node
whose logging failed reaches the sweep's journal (`Journal`), and a trial whose worker died says
why on its MLflow run (`Deaths`). Plain data only: Tune pickles callbacks with its state."""

from __future__ import annotations

import json
import sys

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
