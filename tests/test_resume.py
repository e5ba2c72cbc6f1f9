"""Resume as users kill things: the space and the searcher survive a pickle and Tune's own
save/restore unchanged, and a real sweep on each shipped space, SIGKILLed with its whole session
(launcher and Ray) during a trial, resumes to a finished parent run, in-space parameters and
front files."""

import json
import os
import pickle
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("ray")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep.search import sampler as search  # noqa: E402
from sweep.techniques.recipe import PARAMS  # noqa: E402
from sweep.search.space import available_spaces, load_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("quick", "cpu", "full")


def _samples(space, n=40, seed=7) -> list[dict]:
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def in_space(space, name: str, value) -> bool:
    """True when `value` (a Python value, or MLflow's text of one) is one the space can give
    `name`: a value of its dimension, its condition's `else`, or the recipe default."""
    p = PARAMS[name]
    value = p.coerce(value) if isinstance(value, str) else value
    cond = space.conditions.get(name)
    allowed_else = [cond.otherwise] if cond is not None and cond.has_else else []
    dim = space.params.get(name)
    return (dim is not None and dim.contains(value)) or value in allowed_else \
        or value == p.default


@pytest.mark.parametrize("name", SHIPPED)
def test_space_round_trips_through_pickle_and_tune_save_restore(name, tmp_path):
    """The restored space samples exactly what the original does. A condition without `else`
    stays without one (an identity sentinel did not survive the pickle: every such child then
    "had" an else whose value was a fresh `object()`)."""
    assert set(SHIPPED) <= set(available_spaces())
    space = load_space(name)
    want = _samples(space)
    assert all(in_space(space, k, v) for s in want for k, v in s.items()), want

    assert _samples(pickle.loads(pickle.dumps(space))) == want

    searcher = search.make_searcher(space, sampler="tpe", seed=0, storage=None,
                                    study_name="s", devices={"cpu"})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = search.make_searcher(load_space("quick"), sampler="random", seed=1, storage=None,
                                    study_name="t", devices={"cpu"})
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert _samples(restored._space.space) == want
    assert restored._space.space == space


def test_condition_without_else_is_plain_data():
    """No identity sentinel: a condition equals its copy and says whether it has an `else`."""
    space = load_space("quick")
    cond = space.conditions["quant.enc_attn"]
    copy = pickle.loads(pickle.dumps(cond))
    assert copy == cond and not copy.has_else
    assert json.loads(json.dumps(vars(cond)))["has_else"] is False


# --------------------------------------------------------------------------------------------
# SIGKILL on the whole process group during a trial, then --resume


def _runs(root: Path, status: str) -> set[str]:
    """Trial runs of that MLflow status (read straight from sqlite: no client in the loop)."""
    db = root / "mlflow.db"
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db) as con:
            return {row[0] for row in con.execute(
                "select r.run_uuid from runs r join tags t on r.run_uuid = t.run_uuid where "
                "t.key = 'hyper.kind' and t.value = 'trial' and r.status = ?", (status,))}
    except sqlite3.Error:
        return set()


def _launch(argv, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sweep.launch", *argv], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _session(sid: int) -> list[int]:
    """Every process of session `sid`: Ray's workers run in process groups of their own, so a
    kill of the launcher's group alone leaves them to finish (and log) the trial."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def _kill_during_trial(proc, root: Path, finished: int, timeout=600) -> set[str]:
    """SIGKILL the launcher and the local Ray it started (its whole session) once `finished`
    trials are in MLflow and the next one is under way (a RUNNING trial run), as a preempted node
    or an OOM kill would. Returns the trial runs the kill left RUNNING (read once every process
    is gone): a trial may still end in the moment between the look and the kill."""
    t0 = time.time()
    while len(_runs(root, "FINISHED")) < finished or not _runs(root, "RUNNING"):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.time() - t0 < timeout, "no progress"
        time.sleep(0.2)
    for _ in range(50):
        pids = _session(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    proc.wait()
    assert not _session(proc.pid), "processes of the killed sweep survived"
    return _runs(root, "RUNNING")


def _trial_runs(root: Path, sweep: str):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    trials = [r for r in runs if r.data.tags.get("hyper.kind") == "trial"
              and r.data.tags.get("hyper.sweep") == sweep]
    parent = [r for r in runs if r.data.tags.get("hyper.kind") == "sweep"
              and r.data.tags.get("hyper.sweep") == sweep]
    return trials, parent


def _check_resumed(root: Path, space_name: str, log: Path, left_running: set) -> dict:
    space = load_space(space_name)
    trials, parent = _trial_runs(root, "k")
    text = log.read_text()[-4000:]
    assert [p.info.status for p in parent] == ["FINISHED"], text
    assert trials and all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in trials)
    # A failed trial failed for a reason of its own, never for an out-of-space value.
    for r in trials:
        err = r.data.tags.get("error", "")
        assert "object at 0x" not in err and "RecipeError" not in err, err
        for k, v in r.data.params.items():
            if k in PARAMS:
                assert in_space(space, k, v), (k, v)
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{root / 'optuna.db'}")
    for t in study.trials:
        assert t.state != optuna.trial.TrialState.RUNNING
        for k, v in t.params.items():
            assert in_space(space, k, v), (k, v)
    # Optuna keeps every measurement, once: its COMPLETE trials are MLflow's FINISHED runs
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.user_attrs["run_id"] for t in complete} == {
        r.info.run_id for r in trials if r.info.status == "FINISHED"}
    out = root / "sweeps" / "k" / "results"
    for f in ("pareto.csv", "pareto.json", "trials.csv", "summary.json", "report.html"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    keys = [r.data.tags["hyper.trial_key"] for r in trials if r.info.status == "FINISHED"]
    assert len(keys) == len(set(keys)), "a trial was logged twice"
    assert summary["ok"] == len(keys)
    # The trials the kills interrupted: each run a kill left RUNNING was closed as KILLED and the
    # summary counts its trial, with whether it was measured again after the resume.
    killed = [r for r in trials if r.info.status == "KILLED"]
    assert {r.info.run_id for r in killed} == left_running
    assert summary["interrupted"] == len({r.data.tags["hyper.trial_key"] for r in killed})
    assert summary["interrupted_rerun"] + summary["interrupted_lost"] == len(killed)
    return summary


# (space, samples, kills at these FINISHED counts): each resumed sweep has to sample new trials
# after the restore, with conditions that have no `else` (where the sentinel bug struck).
CASES = {
    # one kill is the first kill of quick-twice: by hand only (the suite's time, CI's limit)
    "quick": pytest.param(("quick", 4, (2,)), marks=pytest.mark.slow),
    "quick-twice": ("quick", 5, (2, 4)),
    "cpu": pytest.param(("cpu", 6, (3,)), marks=pytest.mark.slow),
    "full": pytest.param(("full", 6, (3,)), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_shipped_space_survives_sigkill_and_resumes(case, tmp_path, tiny_checkpoint,
                                                    small_manifest):
    space_name, samples, kills = case
    root = tmp_path / "root"
    argv = ["--space", space_name, "--model", tiny_checkpoint, "--dataset", small_manifest,
            "--root", str(root), "--name", "k", "--seed", "1", "--num-samples", str(samples),
            "--max-slowdown", "0", "--trial-timeout", "240"]
    resume = ["--root", str(root), "--resume", "k"]
    log = tmp_path / "log"
    with open(log, "w") as f:
        left = _kill_during_trial(_launch(argv, f), root, finished=kills[0])
        for at in kills[1:]:
            left |= _kill_during_trial(_launch(resume, f), root, finished=at)
        assert left, "no kill caught a trial under way"
        measured, start = len(_runs(root, "FINISHED")), log.stat().st_size
        done = _launch(resume, f)
        assert done.wait(timeout=1200) == 0, log.read_text()[-4000:]
    summary = _check_resumed(root, space_name, log, left)
    # The resumed console counts the trials measured before the kill (it started at [1/N])
    first = re.search(rb"^\[(\d+)/\d+\] ", log.read_bytes()[start:], re.M)
    assert first and int(first[1]) >= measured >= 2, (measured, first)
    assert summary["trials"] >= samples + 1 - summary["failed"]


def test_unreadable_trial_row_is_skipped_with_a_warning(tmp_path, tiny_checkpoint,
                                                        small_manifest, capsys):
    """One bad row never takes the launcher down: a trial run whose recipe no parameter allows
    (what the sentinel bug logged) and one without figures are skipped with a warning naming
    them; the launcher exits 0 with the front of the rest."""
    from sweep import launch
    from sweep.results import tracking

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  quant.scheme: {choice: [none, bf16]}\n")
    root = tmp_path / "root"
    argv = ["--space", str(space), "--model", tiny_checkpoint, "--dataset", small_manifest,
            "--root", str(root), "--name", "u", "--num-samples", "1", "--max-slowdown", "0"]
    assert launch.main(argv) == 0
    uri = tracking.default_uri(root)
    exp_id = tracking.ensure_experiment(uri, root / "artifacts")
    good = [r for r in tracking.sweep_rows(uri, exp_id, "u") if r["status"] == "ok"]
    parent = _trial_runs(root, "u")[1][0].info.run_id
    bad = {"bogus-recipe": {"quant.scheme": "bf16", "quant.enc_attn": "<object object at 0x7f>"},
           "bogus-figures": {"quant.scheme": "bf16"}}
    for key, recipe in bad.items():
        run_id, _ = tracking.begin_trial(uri, exp_id, parent, "u", key, recipe, {})
        figures = {"wer": 0.1} if key == "bogus-figures" else {
            "wer": 0.1, "cer": 0.1, "latency_median_s": 1e-4}
        tracking.finish_trial(uri, run_id, figures)
    capsys.readouterr()

    assert launch.main(["--root", str(root), "--resume", "u"]) == 0
    err = capsys.readouterr().err
    assert "warning: trial bogus-recipe" in err and "quant.enc_attn" in err, err
    assert "warning: trial bogus-figures" in err and "latency_median_s" in err, err
    out = root / "sweeps" / "u" / "results"
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert front and {r["trial_id"] for r in front} <= {r["trial_id"] for r in good}
    listed = (out / "trials.csv").read_text()
    assert all(r["trial_id"] in listed for r in good) and "bogus-recipe" in listed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unreadable"] == 2 and summary["ok"] == len(good)
    assert [p.info.status for p in _trial_runs(root, "u")[1]] == ["FINISHED"]


def test_parent_run_ends_failed_when_the_end_of_sweep_breaks(tmp_path, tiny_checkpoint,
                                                             small_manifest, monkeypatch):
    """Whatever breaks after the parent run began, it ends FAILED, never left RUNNING."""
    from sweep import launch

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(launch.report, "write_front", broken)
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  quant.scheme: {value: none}\n")
    root = tmp_path / "root"
    args = launch.parse_args(["--space", str(space), "--model", tiny_checkpoint, "--dataset",
                              small_manifest, "--root", str(root), "--name", "p",
                              "--num-samples", "0"])
    with pytest.raises(RuntimeError, match="disk full"):
        launch.run(args)
    assert [p.info.status for p in _trial_runs(root, "p")[1]] == ["FAILED"]


def test_interrupted_trials_are_rerun_by_id_or_recipe_else_lost():
    from sweep.results.summary import interrupted

    def row(tid, status, **recipe):
        return {"trial_id": tid, "status": status, "recipe": recipe}
    rows = [row("a", "killed", x=1), row("a", "ok", x=1),  # Tune re-ran the trial itself
            row("b", "killed", x=2), row("c", "ok", x=2),  # the searcher asked for it again
            row("d", "killed", x=3), row("e", "failed", x=4)]  # never measured
    assert interrupted(rows) == {"interrupted": 3, "interrupted_rerun": 2, "interrupted_lost": 1}


def test_the_local_sampler_resumes_where_it_stopped(tmp_path):
    """Tune's save/restore of the sweep's default searcher mid-study: the restored one asks
    for the same recipes next as the original (its RNG, plans and study come back)."""
    space = load_space("full")

    def fresh():
        return search.make_searcher(space, sampler="local", seed=3, storage=None,
                                    study_name="s", devices={"cpu"})

    searcher = fresh()
    for i in range(8):  # the baseline, the starts, then sampled trials, each on the front
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"status": "ok", "wer": 0.3 - 0.001 * i,
                                             "latency_median_s": 1.0 / (1 + i), "dwer": 0.0})
    assert config
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = fresh()
    restored.restore(str(tmp_path / "searcher.pkl"))
    ahead = [searcher.suggest(f"u{i}") for i in range(5)]
    assert [restored.suggest(f"u{i}") for i in range(5)] == ahead
