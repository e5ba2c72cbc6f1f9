"""The sweep's Optuna study after Tune is done: loaded by name, its trials a killed launcher left
RUNNING settled (`mark_stale_optuna`) and its parameter importances written
(`write_importances`). Only Optuna's public API: the study's `tell` and the storage's own
methods, never `study._storage` or a trial's `_trial_id`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..results import pareto
from .sampler import mark_finished


def storage_url(root: Path) -> str:
    """The Optuna store of every sweep under `root` (one study per sweep, named as it)."""
    return f"sqlite:///{Path(root) / 'optuna.db'}"


def searcher_study(root: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage_url(root))


def mark_stale_optuna(root: Path, name: str, rows: list[dict], space) -> tuple[int, int]:
    """Optuna trials still RUNNING once Tune is done were asked for by a killed launcher.
    One whose trial finished in MLflow before the kill (same sampled params, a FINISHED run no
    COMPLETE trial holds) is told COMPLETE with that run's figures, so Optuna keeps every
    measurement; the others become FAIL. Returns (recovered, failed)."""
    import optuna

    # The storage is opened here rather than read off the study: a running trial's id (what
    # its constraints and attributes are written under before `tell`) is the storage's word.
    storage = optuna.storages.RDBStorage(storage_url(root))
    study = optuna.load_study(study_name=name, storage=storage)
    study_id = storage.get_study_id_from_name(name)
    done = optuna.trial.TrialState.COMPLETE
    linked = {t.user_attrs.get("run_id") for t in study.trials if t.state == done}
    spare = [r for r in rows if r["status"] == "ok" and r.get("run_id") not in linked]
    recovered = failed = 0
    for t in study.trials:
        if t.state != optuna.trial.TrialState.RUNNING:
            continue
        row = next((r for r in spare if all(str(r["recipe"].get(k)) == str(v)
                                            for k, v in t.params.items())), None)
        if row is None:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            failed += 1
            continue
        spare.remove(row)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        mark_finished(optuna.trial.Trial(study, trial_id), space, row)
        # no state given: a figure Optuna cannot take (NaN) makes the trial FAIL, not a crash
        told = study.tell(t.number, [float(row[m]) for m, _ in space.objectives])
        recovered += told.state == done
        failed += told.state != done
    return recovered, failed


def write_importances(study, out: Path, objectives=pareto.DEFAULT_OBJECTIVES) -> None:
    """Optuna's parameter importances per objective, in the space's order as the study's
    values (fANOVA needs enough finished trials)."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    imp = {}
    if len(done) >= 4:
        for i, (name, way) in enumerate(list(objectives)[:len(study.directions)]):
            sign = -1.0 if way == "max" else 1.0  # PED-ANOVA ranks what makes `target` low
            try:
                imp[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=i, sign=sign: sign * t.values[i])
            except (RuntimeError, ValueError, ZeroDivisionError) as e:
                imp[name] = {"error": str(e)}
    (out / "importances.json").write_text(json.dumps(imp, indent=1))
