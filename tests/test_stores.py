"""The sweep's stores hold under a busy cluster: one launcher per sweep (a dead holder blocks
nothing), safe sweep names, every run found past MLflow's page size, and a measured trial that
reaches MLflow even when logging it failed. Real Ray, MLflow sqlite, Optuna and processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")


from mlflow.tracking import MlflowClient  # noqa: E402

from sweep import launch  # noqa: E402
from sweep.results import journal, rows, tracking  # noqa: E402
from sweep.search.sweepspec import SweepSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPACE = "params:\n  quant.scheme: {choice: [none, bf16]}\nstarts:\n  - {quant.scheme: bf16}\n"


# the launcher keeps bf16 in these spaces on every CPU class (conftest)
pytestmark = pytest.mark.usefixtures("every_scheme_searched")


def _space(tmp_path) -> str:
    p = tmp_path / "space.yaml"
    p.write_text(SPACE)
    return str(p)


def _argv(tmp_path, model, data, *extra):
    return ["--space", _space(tmp_path), "--model", model, "--dataset", data,
            "--root", str(tmp_path / "root"), "--name", "s", "--max-slowdown", "0",
            "--no-probes", *extra]


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--name", "it's"), ("--resume", "../up"),
                                        ("--name", ".hidden")])
def test_a_sweep_name_outside_the_rule_is_refused_before_anything_runs(
        tmp_path, tiny_checkpoint, small_manifest, capsys, flag, value):
    argv = [a for a in _argv(tmp_path, tiny_checkpoint, small_manifest) if a not in ("--name",
                                                                                       "s")]
    rc = launch.main([*argv, flag, value])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"`{flag}` must be 1 to 100 of the characters A-Z a-z 0-9 . _ -" in err
    assert repr(value) in err
    assert not (tmp_path / "root").exists() and not ray.is_initialized()


# ---- one launcher per sweep -------------------------------------------------------------------

HOLD = ("import sys, time; from pathlib import Path; from sweep.search import lock\n"
        "with lock.hold(Path(sys.argv[1]), 'n'):\n    print('held', flush=True)\n"
        "    time.sleep(600)\n")


def _holder(sweep_dir: Path) -> subprocess.Popen:
    """A process holding the sweep's lock, as a running launcher does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(sweep_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_launcher_is_refused_and_a_killed_holder_blocks_nothing(
        tmp_path, tiny_checkpoint, small_manifest, capsys):
    """While a launcher holds sweep `n`, a new launcher on `--name n` (a race on a new name)
    and a `--resume n` are refused before Ray starts, naming the holder's pid and host. Once the
    holder is SIGKILLed (no chance to clean up), `--resume n` runs the sweep to its end."""
    root = tmp_path / "root"
    here = root / "sweeps" / "n"
    holder = _holder(here)
    try:
        argv = _argv(tmp_path, tiny_checkpoint, small_manifest, "--num-samples", "0")
        argv[argv.index("s")] = "n"
        who = f"pid {holder.pid} on {socket.gethostname()}"
        assert launch.main(argv) == 2
        err = capsys.readouterr().err
        assert "sweep 'n' is in use by another launcher" in err and who in err, err
        SweepSpec(name="n", space=_space(tmp_path), model=tiny_checkpoint,
                  dataset=small_manifest, num_samples=0, max_slowdown=0, probes=False,
                  root=str(root)).save(here)
        assert launch.main(["--root", str(root), "--resume", "n"]) == 2
        err = capsys.readouterr().err
        assert who in err and "--resume n" in err, err
        assert not ray.is_initialized()
        assert sorted(p.name for p in here.iterdir()) == ["hyper.json", "hyper.lock"]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert launch.main(["--root", str(root), "--resume", "n"]) == 0
    summary = json.loads((here / "results" / "summary.json").read_text())
    assert summary["ok"] == 1 and summary["sweep"] == "n"
    assert json.loads((here / "hyper.lock").read_text())["pid"] == os.getpid()


# ---- more runs than one page ------------------------------------------------------------------


@pytest.fixture()
def fast_dir(tmp_path):
    """A folder in memory where there is one (/dev/shm): sqlite's commit per run on a disk
    made the 1005 runs below take 30 s instead of 5."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="hyper-test-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_sweep_of_more_runs_than_a_page_keeps_its_oldest(fast_dir):
    """1005 trial runs (MLflow answers 1000 per request, newest first): every one is read
    back, the baseline that ran first included."""
    uri = tracking.default_uri(fast_dir)
    exp_id = tracking.ensure_experiment(uri, fast_dir / "artifacts")
    client = MlflowClient(uri)
    t0 = int(time.time() * 1000)
    for i in range(1005):  # MLflow has no batch API for runs
        client.create_run(exp_id, start_time=t0 + i, tags={
            "hyper.sweep": "long", "hyper.kind": "trial", "hyper.trial_key": f"t{i:04d}"})
    got = tracking.sweep_rows(uri, exp_id, "long")
    assert len(got) == 1005 and len({r["run_id"] for r in got}) == 1005
    assert got[0]["trial_id"] == "t0000" and got[-1]["trial_id"] == "t1004"


# ---- nothing measured is lost when logging fails -----------------------------------------------


def _trial_runs(root: Path, sweep: str = "s"):
    client = MlflowClient(tracking.default_uri(root))
    exp = client.get_experiment_by_name("hyper")
    return client, [r for r in tracking.find_runs(client, exp.experiment_id, **{
        "hyper.sweep": sweep, "hyper.kind": "trial"})]


def _table(client, run_id: str, name: str) -> list:
    return json.loads(Path(client.download_artifacts(run_id, name)).read_text())["data"]


def test_reconcile_logs_what_mlflow_lacks_once(fast_dir):
    """A journal record whose run never got its figures is logged, with its transcripts, once;
    one whose trial another attempt finished is left alone; a broken file is named."""
    uri = tracking.default_uri(fast_dir)
    exp = tracking.ensure_experiment(uri, fast_dir / "artifacts")
    parent = tracking.start_parent(uri, exp, "s", {"space": "x"}, {})
    folder = fast_dir / "rows"
    folder.mkdir()
    result = {"wer": 0.25, "cer": 0.1, "latency_median_s": 0.02, "kernels": {}, "device": "cpu",
              "utterances": [{"id": f"u{i}", "hypothesis": "да", "latency_s": 0.02}
                             for i in range(3)]}

    def trial(key):
        run_id, _ = tracking.begin_trial(uri, exp, parent, "s", key, {"quant.scheme": "bf16"},
                                         {"device": "cpu"})
        journal.save(folder, {**rows.record(result), "run_id": run_id, "trial_key": key,
                              "sweep": "s"})
        return run_id

    lost = trial("a")  # measured, then logging failed: RUNNING without figures
    old = trial("b")  # the same, but Tune ran the trial again and that attempt finished
    new, _ = tracking.begin_trial(uri, exp, parent, "s", "b", {"quant.scheme": "bf16"}, {})
    tracking.finish_trial(uri, new, result)
    (folder / "broken.json").write_text("{")
    records, problems = journal.load(folder)
    assert len(records) == 2 and len(problems) == 1 and "broken.json" in problems[0]
    assert tracking.reconcile(uri, exp, records) == (1, [])
    client = MlflowClient(uri)
    run = client.get_run(lost)
    assert run.info.status == "FINISHED" and run.data.metrics["wer"] == 0.25
    assert run.data.tags["status"] == "ok" and len(_table(client, lost, "transcripts.json")) == 3
    assert client.get_run(old).info.status == "KILLED"
    assert tracking.reconcile(uri, exp, records) == (0, [])  # logged once, not appended again
    assert len(_table(client, lost, "transcripts.json")) == 3
    got = tracking.sweep_rows(uri, exp, "s")
    assert sorted(r["trial_id"] for r in got if r["status"] == "ok") == ["a", "b"]


def test_trials_whose_logging_failed_stay_measured_and_reach_mlflow(
        tmp_path, tiny_checkpoint, small_manifest, capsys, monkeypatch):
    """The artifact store cannot be written while the trials run (a file stands where its
    folder goes: a full disk would do the same): logging each measured trial fails midway.
    No trial is FAILED (Optuna gets the figures) and the launcher says why; once the store is
    writable again, the end of the sweep logs every row, figures and transcripts, from the
    journal."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "artifacts").write_text("in the way")
    finish = launch.finish

    def store_back(*a, **k):
        (root / "artifacts").unlink()
        return finish(*a, **k)

    monkeypatch.setattr(launch, "finish", store_back)
    summary = launch.run(launch.parse_args(_argv(tmp_path, tiny_checkpoint, small_manifest,
                                                 "--num-samples", "1")))
    err = capsys.readouterr().err
    assert "was measured but not logged to MLflow (" in err
    assert "note: 2 measured trials whose logging had failed were logged" in err
    client, runs = _trial_runs(root)
    assert sorted(r.data.params["quant.scheme"] for r in runs) == ["bf16", "none"]
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for r in runs:
        assert {"wer", "latency_median_s", "speedup"} <= set(r.data.metrics)
        assert len(_table(client, r.info.run_id, "transcripts.json")) == 3
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{root / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.user_attrs["run_id"] for t in study.trials} == {r.info.run_id for r in runs}
    assert summary["ok"] == 2 and summary["failed"] == 0 and summary["reconciled"] == 2
    assert len(journal.load(root / "sweeps" / "s" / journal.DIR)[0]) == 2


# ---- a resumed sweep's console ----------------------------------------------------------------


def test_a_resumed_sweeps_progress_counts_the_trials_measured_before(fast_dir, capsys):
    """The killed launcher measured the baseline and a bf16 trial, one trial failed and one was
    cut off. The resumed launcher's progress starts from them ([3/7], the front of two, the
    best speed-up), counts the trial Tune re-runs (restored from MLflow) once, then goes on."""
    from ray.tune.experiment import Trial

    from sweep.search.sampler import Progress

    uri = tracking.default_uri(fast_dir)
    exp = tracking.ensure_experiment(uri, fast_dir / "artifacts")
    parent = tracking.start_parent(uri, exp, "s", {"space": "x"}, {})
    base = {"wer": 0.3, "cer": 0.1, "latency_median_s": 0.1}
    bf16 = {"wer": 0.35, "cer": 0.12, "latency_median_s": 0.05, "speedup": 2.0, "dwer": 0.17,
            "baseline": base, "kernels": {}}
    for key, scheme, end in [("a", "none", {**base, "speedup": 1.0, "dwer": 0.0,
                                           "baseline": base, "kernels": {}}),
                             ("b", "bf16", bf16), ("c", "dynamic_int8", "failed"),
                             ("d", "dynamic_int8", None)]:
        run_id, _ = tracking.begin_trial(uri, exp, parent, "s", key, {"quant.scheme": scheme},
                                         {"device": "cpu"})
        if end == "failed":
            tracking.fail_trial(uri, run_id, RuntimeError("boom"))
        elif end:
            tracking.finish_trial(uri, run_id, end)
    progress = Progress(6, None, [("wer", "min"), ("latency_median_s", "min")],
                        store=(uri, exp, "s"))
    progress.setup()

    # Tune's saved state knew a, b and d (the cut-off trial it runs again), not c: its searcher
    # asks for another trial in c's place, so the sweep will have measured 7
    known = [Trial("trainable", config={"quant.scheme": "bf16"}, trial_id=key, stub=True)
             for key in ("a", "b", "d")]

    def arrives(key, result):
        trial = Trial("trainable", config={"quant.scheme": "bf16"}, trial_id=key, stub=True)
        trial.set_status(Trial.RUNNING)
        progress.on_trial_result(0, [*known, trial], trial, {**result, "status": "ok"})
        return capsys.readouterr().err

    assert arrives("b", {**bf16, "restored": True}).startswith(
        "[3/7] running 0 failed 1 pruned 0 front 2 best 2.00x")
    assert arrives("e", {**bf16, "speedup": 2.5, "latency_median_s": 0.04}).startswith(
        "[4/7] running 0 failed 1 pruned 0 front 2 best 2.50x")
