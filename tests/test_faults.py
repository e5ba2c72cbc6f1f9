"""A sweep survives failing recipes, hung trials, a lost node and bad input, and never loses a
measured trial (a SIGKILLed launcher: tests/test_resume.py). Real Ray, real Optuna storage, real
MLflow sqlite."""

import json
import multiprocessing as mp
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
optuna = pytest.importorskip("optuna")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep import launch  # noqa: E402
from sweep.results import tracking  # noqa: E402

SPACE = """
params:
  quant.scheme: {choice: [none, dynamic_int8, bf16]}
  prune.rate: {float: [0.0, 0.5], step: 0.25}
"""


# the launcher keeps bf16 in these spaces on every CPU class (conftest)
pytestmark = pytest.mark.usefixtures("every_scheme_searched")


def _space(tmp_path) -> str:
    p = tmp_path / "space.yaml"
    p.write_text(SPACE)
    return str(p)


def _argv(tmp_path, model, data, *extra):
    return ["--space", _space(tmp_path), "--model", model, "--dataset", data,
            "--root", str(tmp_path / "root"), "--name", "f", "--seed", "3",
            "--max-slowdown", "0", *extra]


def _runs(root: Path, sweep="f"):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get("hyper.kind") == "trial" and r.data.tags.get("hyper.sweep") == sweep]


def _study(root: Path, sweep="f"):
    return optuna.load_study(study_name=sweep, storage=f"sqlite:///{root / 'optuna.db'}")


def test_failing_and_hung_recipes_become_failed_trials(tmp_path, tiny_checkpoint, small_manifest):
    args = launch.parse_args(_argv(tmp_path, tiny_checkpoint, small_manifest, "--num-samples",
                                   "5", "--trial-timeout", "20"))
    args.inject = {"quant.scheme=dynamic_int8": "raise", "quant.scheme=bf16": "hang:600"}
    summary = launch.run(args)
    root = tmp_path / "root"
    runs = _runs(root)
    failed = [r for r in runs if r.info.status == "FAILED"]
    ok = [r for r in runs if r.info.status == "FINISHED"]
    raised = [r for r in failed if "injected failure" in r.data.tags["error"]]
    hung = [r for r in failed if "--trial-timeout" in r.data.tags["error"]]
    assert raised and hung and ok, [r.data.tags.get("error") for r in failed]
    assert all(r.data.params["quant.scheme"] == "none" for r in ok)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert "traceback.txt" in [a.path for a in client.list_artifacts(failed[0].info.run_id)]
    # Optuna learned of each failure; the front holds only finished trials.
    states = [t.state for t in _study(root).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == len(failed)
    assert optuna.trial.TrialState.RUNNING not in states
    front = json.loads((root / "sweeps" / "f" / "results" / "pareto.json").read_text())["front"]
    assert {r["run_id"] for r in front} <= {r.info.run_id for r in ok}
    assert summary["failed"] == len(failed)
    # Their time counts in the sweep's trial seconds (the hung one ran ~20 s).
    assert all(r.data.metrics["trial_s"] > 0 for r in failed)
    assert summary["trial_sum_s"] == pytest.approx(
        sum(r.data.metrics["trial_s"] for r in runs if "trial_s" in r.data.metrics))
    assert summary["trial_sum_s"] > 20


def test_lost_node_trial_is_retried_elsewhere_without_duplicates(tmp_path, tiny_checkpoint,
                                                                 small_manifest):
    from ray.cluster_utils import Cluster

    Path("/tmp/ray").mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": "/tmp/hyper-ray-l", "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    root = tmp_path / "root"
    args = launch.parse_args(_argv(tmp_path, tiny_checkpoint, small_manifest, "--num-samples",
                                   "2", "--address", cluster.address, "--cpus-per-trial", "1"))
    args.inject = {"quant.scheme=none": "hang:25"}  # keeps the baseline busy long enough
    result = {}
    th = threading.Thread(target=lambda: result.update(s=launch.run(args)), daemon=True)
    try:
        th.start()
        t0 = time.time()
        while not [r for r in _runs(root) if r.info.status == "RUNNING"]:
            assert time.time() - t0 < 120, "no trial started"
            time.sleep(0.5)
        victim = [r for r in _runs(root) if r.info.status == "RUNNING"][0]
        node = next(n for n in nodes if n.node_id == victim.data.tags["node_id"])
        cluster.remove_node(node, allow_graceful=False)
        th.join(timeout=500)
        assert "s" in result, "the sweep did not finish after losing a node"
        runs = _runs(root)
        same = [r for r in runs if r.data.tags["hyper.trial_key"]
                == victim.data.tags["hyper.trial_key"]]
        assert {r.info.status for r in same} == {"FAILED", "FINISHED"}, [
            r.info.status for r in same]
        (lost,) = [r for r in same if r.info.status == "FAILED"]  # says why, not only KILLED
        assert lost.data.tags["status"] == "died" and lost.data.tags["death"]
        finished = [r.data.tags["hyper.trial_key"] for r in runs if r.info.status == "FINISHED"]
        assert len(finished) == len(set(finished))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_trial_whose_worker_dies_says_why(tmp_path, tiny_checkpoint, small_manifest, capsys):
    """The bf16 trial's worker SIGKILLs itself, as the OOM killer would: Tune retries it twice
    and gives up. Each attempt's run ends FAILED with status `died` and Ray's report of the
    death, the launcher says so, and the summary counts the deaths, not a lost interruption."""
    space = tmp_path / "dies.yaml"
    space.write_text("params:\n  quant.scheme: {choice: [none, bf16]}\n"
                     "starts:\n  - {quant.scheme: bf16}\n")
    argv = _argv(tmp_path, tiny_checkpoint, small_manifest, "--num-samples", "1", "--no-probes")
    argv[argv.index("--space") + 1] = str(space)
    args = launch.parse_args(argv)
    args.inject = {"quant.scheme=bf16": "kill"}
    summary = launch.run(args)
    err = capsys.readouterr().err
    runs = _runs(tmp_path / "root")
    died = [r for r in runs if r.data.params["quant.scheme"] == "bf16"]
    assert len(died) == 3, [(r.info.status, r.data.tags.get("status")) for r in died]
    for r in died:
        assert r.info.status == "FAILED" and r.data.tags["status"] == "died"
        assert "ActorDiedError" in r.data.tags["death"], r.data.tags["death"]
        assert r.data.tags["error"].startswith("ActorDiedError")
    assert err.count("lost its worker") == 3, err
    assert summary["worker_deaths"] == 3 and summary["failed"] == 1 and summary["ok"] == 1
    assert summary["interrupted"] == 0
    states = [t.state for t in _study(tmp_path / "root").trials]
    assert sorted(states) == sorted([optuna.trial.TrialState.COMPLETE,
                                     optuna.trial.TrialState.FAIL])


def _hammer(uri, exp_id, parent, who, n):
    for i in range(n):
        run_id, _ = tracking.begin_trial(uri, exp_id, parent, "c", f"{who}-{i}",
                                         {"prune.rate": 0.1 * i}, {"device": "cpu"})
        tracking.finish_trial(uri, run_id, {"wer": 0.1 * i, "latency_median_s": 1.0,
                                            "kernels": {}, "device": "cpu"})


def test_concurrent_writers_on_one_sqlite_store_lose_nothing(tmp_path):
    uri = tracking.default_uri(tmp_path)
    tracking.check_uri(uri)
    exp_id = tracking.ensure_experiment(uri, tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp_id, "c", {"space": "x"}, {})
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(uri, exp_id, parent, w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    rows = tracking.sweep_rows(uri, exp_id, "c")
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)
    assert len({r["trial_id"] for r in rows}) == 24


def _bad(tmp_path, tiny_checkpoint, small_manifest, capsys, **over):
    argv = _argv(tmp_path, over.pop("model", tiny_checkpoint),
                 over.pop("data", small_manifest), *over.pop("extra", []))
    rc = launch.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not ray.is_initialized()
    assert not (tmp_path / "root" / "mlflow.db").exists()
    return err


def test_bad_inputs_are_refused_before_anything_runs(tmp_path, tiny_checkpoint, small_manifest,
                                                     capsys):
    notwhisper = tmp_path / "bert"
    notwhisper.mkdir()
    (notwhisper / "config.json").write_text('{"model_type": "bert"}')
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"audio": "a.flac", "text": "да"}\n{"audio": "b.flac"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"audio": "a.flac", "text": ""}\n')
    cases = {
        "nosuch-org/nosuch-model": dict(model="nosuch-org/nosuch-model"),
        "model_type": dict(model=str(notwhisper)),
        "nosuch-org/nosuch-data": dict(data="nosuch-org/nosuch-data"),
        "lacks `text`": dict(data=str(nokey)),
        "empty": dict(data=str(empty)),
        "cannot be written": dict(extra=["--tracking-uri", "sqlite:////proc/hyper/x.db"]),
        "absolute sqlite path": dict(extra=["--tracking-uri", "sqlite:///rel/x.db"]),
        "--address": dict(extra=["--address", "127.0.0.1:9"]),
    }
    for needle, over in cases.items():
        err = _bad(tmp_path, tiny_checkpoint, small_manifest, capsys, **over)
        assert needle.lower() in err.lower(), (needle, err)


def test_undecodable_audio_is_skipped_counted_and_logged(tmp_path, tiny_checkpoint,
                                                         small_manifest):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"not audio at all")
    man = tmp_path / "m.jsonl"
    lines = Path(small_manifest).read_text(encoding="utf-8").splitlines()[:2]
    lines.append(json.dumps({"audio": str(bad), "text": "раз два", "lang": "ru"}))
    man.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert launch.main(_argv(tmp_path, tiny_checkpoint, str(man), "--num-samples", "1")) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper")
    parent = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("hyper.kind") == "sweep"][0]
    assert parent.data.params["skipped_utterances"] == "1"
    assert "broken.flac" in parent.data.params["skipped_reasons"]
    assert parent.data.params["n_utterances"] == "2"


def test_secrets_never_reach_mlflow(tmp_path, tiny_checkpoint, small_manifest, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETVALUE123")
    argv = _argv(tmp_path, tiny_checkpoint, small_manifest, "--num-samples", "0")
    monkeypatch.setattr(sys, "argv", ["launch", *argv, "--api-token", "hf_SECRETVALUE123"])
    assert launch.main(argv) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper")
    for r in client.search_runs([exp.experiment_id]):
        blob = json.dumps([r.data.params, r.data.tags])
        assert "SECRETVALUE" not in blob


def test_ui_listens_on_loopback_by_default(tmp_path):
    from sweep import ui

    cmd = ui.command(tmp_path, "127.0.0.1", 5000)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert ui.main(["--root", str(tmp_path / "none")]) == 2


def test_stale_optuna_trial_that_finished_in_mlflow_is_recovered(tmp_path):
    """Killed between MLflow's FINISHED and Optuna's tell: the measurement reaches Optuna at the
    end of the sweep (COMPLETE, its run id and constraint); a trial never measured is FAIL."""
    from sweep.search.space import space_from_dict
    from sweep.search.study import mark_stale_optuna

    space = space_from_dict({"params": {"quant.scheme": {"choice": ["none", "bf16"]}},
                             "constraints": {"max_dwer": 0.1}})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage,
                                directions=["minimize", "minimize"])
    for scheme in ("bf16", "none"):  # both asked for, neither told: a killed launcher
        study.enqueue_trial({"quant.scheme": scheme})
        space.sample(study.ask())
    rows = [{"status": "ok", "run_id": "r1", "wer": 0.30, "latency_median_s": 0.5, "dwer": 0.2,
             "recipe": {"quant.scheme": "bf16"}, "baseline": {"wer": 0.25}}]
    assert mark_stale_optuna(tmp_path, "s", rows, space) == (1, 1)
    measured, lost = optuna.load_study(study_name="s", storage=storage).trials
    assert measured.state == optuna.trial.TrialState.COMPLETE
    assert measured.values == [0.30, 0.5] and measured.user_attrs["run_id"] == "r1"
    assert measured.constraints == {"max_dwer": pytest.approx(0.1)}  # dwer 0.2 over 0.1
    assert lost.state == optuna.trial.TrialState.FAIL
