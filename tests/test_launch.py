"""The sweep end to end: real Ray, real Optuna, real MLflow sqlite, a tiny real-shaped model."""

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep import launch  # noqa: E402
from sweep.results import report  # noqa: E402


# the launcher keeps bf16 in these spaces on every CPU class (conftest)
pytestmark = pytest.mark.usefixtures("every_scheme_searched")


def _space(tmp_path, body: str) -> str:
    p = tmp_path / "space.yaml"
    p.write_text(body)
    return str(p)


SPACE = """
name: test
description: small CPU space for the tests
params:
  quant.scheme: {choice: [none, dynamic_int8, bf16]}
  prune.rate: {float: [0.0, 0.5], step: 0.25}
"""


def _argv(tmp_path, tiny_checkpoint, small_manifest, space, *extra):
    return ["--space", space, "--model", tiny_checkpoint, "--dataset", small_manifest,
            "--root", str(tmp_path / "root"), "--name", "t", "--seed", "1",
            "--max-slowdown", "0", *extra]


def _children(root: Path, sweep: str = "t"):
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("hyper.kind") == "sweep"]
    child = [r for r in runs if r.data.tags.get("hyper.kind") == "trial"]
    return parent, child


def test_sweep_logs_every_trial_and_writes_a_true_front(tmp_path, tiny_checkpoint,
                                                        small_manifest):
    space = _space(tmp_path, SPACE + "starts:\n  - {quant.scheme: bf16, prune.rate: 0.25}\n")
    rc = launch.main(_argv(tmp_path, tiny_checkpoint, small_manifest, space,
                           "--num-samples", "4", "--eval-dataset", small_manifest))
    assert rc == 0
    root = tmp_path / "root"
    parent, child = _children(root)
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    finished = [r for r in child if r.info.status == "FINISHED"]
    assert len(finished) == 5  # 4 sampled + the baseline
    for r in finished:
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert {"quant.scheme", "prune.rate"} <= set(r.data.params)
        for m in ("wer", "cer", "dwer", "latency_median_s", "speedup"):
            assert m in r.data.metrics
    # The baseline runs first and measures the unmodified model.
    first, second = sorted(finished, key=lambda r: r.info.start_time)[:2]
    assert first.data.params["quant.scheme"] == "none"
    assert float(first.data.params["prune.rate"]) == 0.0
    # Then the space's warm start, as written there.
    assert second.data.params["quant.scheme"] == "bf16"
    assert float(second.data.params["prune.rate"]) == 0.25
    out = root / "sweeps" / "t" / "results"
    for f in ("pareto.csv", "trials.csv", "pareto.json", "pareto.png", "report.html",
              "summary.json"):
        assert (out / f).is_file(), f
    assert (out / "pareto.csv").read_text().splitlines()[0].startswith("wer,latency_median_s")
    # Non-dominated against every logged trial.
    logged = [(r.data.metrics["wer"], r.data.metrics["latency_median_s"]) for r in finished]
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert front
    for row in front:
        w, t = row["wer"], row["latency_median_s"]
        assert not any(w2 <= w and t2 <= t and (w2, t2) != (w, t) for w2, t2 in logged)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 5 and summary["trials"] == 5
    # Honest accounting: each trial's origin in trials.csv, the front's members by origin
    import csv

    with open(out / "trials.csv", newline="") as fh:
        origins = [r["origin"] for r in csv.DictReader(fh)]
    assert origins.count("baseline") == 1 and origins.count("start") >= 1
    assert summary["sampled"] == origins.count("sampled") >= 1
    assert 0 <= summary["sampled_infeasible"] <= summary["sampled"]
    assert (summary["front_from_starts"] + summary["front_from_sampling"]
            + summary["front_from_baseline"]) == summary["front"] == len(front)
    from sweep.results.pareto import is_baseline_recipe

    assert summary["front_from_baseline"] == sum(is_baseline_recipe(r["recipe"]) for r in front)
    # The front, measured again on the second set, keeps its recipes.
    again = json.loads((out / "front_eval.json").read_text())
    assert [r["recipe"] for r in again["rows"]] == [r["recipe"] for r in front]
    assert all(r["latency_median_s"] > 0 for r in again["rows"])


def test_constraint_keeps_over_budget_trials_off_the_front(tmp_path, tiny_checkpoint,
                                                           small_manifest):
    space = _space(tmp_path, SPACE + "constraints: {min_speedup: 1.3}\n")
    assert launch.main(_argv(tmp_path, tiny_checkpoint, small_manifest, space,
                             "--num-samples", "3")) == 0
    out = tmp_path / "root" / "sweeps" / "t" / "results"
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert all(r["speedup"] >= 1.3 for r in front)
    _, child = _children(tmp_path / "root")
    over = [r for r in child if r.data.metrics.get("speedup", 0) < 1.3]
    assert over  # the baseline at least (speedup ~1)
    front_runs = {r.get("run_id") for r in front}
    assert not front_runs & {r.info.run_id for r in over}
    # Optuna itself was told: every finished trial carries its constraint value.
    import optuna

    study = optuna.load_study(study_name="t",
                              storage=f"sqlite:///{tmp_path / 'root' / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all("min_speedup" in str(t.constraints) for t in done)
    for t in done:
        (value,) = t.constraints.values()
        assert (value <= 0) == (t.user_attrs["speedup"] >= 1.3)


def test_bad_space_is_refused_with_all_errors_before_anything_runs(tmp_path, tiny_checkpoint,
                                                                   small_manifest, capsys):
    space = _space(tmp_path, """
params:
  prune.rtae: {float: [0, 0.5]}
  quant.scheme: {choice: [none, int3]}
  prune.rate: {float: [0.5, 0.1]}
objectivs: {wer: min}
""")
    rc = launch.main(_argv(tmp_path, tiny_checkpoint, small_manifest, space))
    err = capsys.readouterr().err
    assert rc == 2
    assert "prune.rtae" in err and "prune.rate" in err and "int3" in err and "objectivs" in err
    assert not (tmp_path / "root").exists()  # nothing was started or written
    assert not ray.is_initialized()


def test_two_node_cluster_runs_trials_on_both_nodes_and_schedules_gpu(tmp_path, tiny_checkpoint,
                                                                      small_manifest):
    from ray.cluster_utils import Cluster

    # Cluster writes the head's address to /tmp/ray whatever temp_dir says.
    Path("/tmp/ray").mkdir(exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": "/tmp/hyper-ray-c", "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        space = _space(tmp_path, SPACE + "  device: {choice: [cpu, cuda]}\n")
        rc = launch.main(_argv(tmp_path, tiny_checkpoint, small_manifest, space,
                               "--num-samples", "5", "--address", cluster.address,
                               "--max-concurrent", "2", "--cpus-per-trial", "1"))
        assert rc == 0
        _, child = _children(tmp_path / "root")
        nodes = {r.data.tags["node_id"] for r in child if r.data.tags.get("device") == "cpu"}
        assert len(nodes) == 2, nodes
        cuda = [r for r in child if r.data.tags.get("device") == "cuda"]
        # Without a real GPU the trial checks what Ray gave it, on the GPU node, and says so.
        assert cuda
        for r in cuda:
            assert r.data.tags["gpu_ids"] and r.data.tags["node_id"] == gpu_node.node_id
            assert r.info.status == "FAILED" and "torch sees no CUDA" in r.data.tags["error"]
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_front_table_prints_percent_only_in_text(tmp_path):
    rows = [{"trial_id": "a", "wer": 0.2, "cer": 0.1, "dwer": 0.0, "dcer": 0.0,
             "latency_median_s": 1.0, "speedup": 1.0, "status": "ok", "device": "cpu",
             "recipe": {"quant.scheme": "none"}}]
    text = report.format_table(rows, {"wer": 0.2, "cer": 0.1, "latency_median_s": 1.0})
    assert "%" in text


def test_trials_stopped_at_a_rung_are_pruned_with_their_partial_figures(
        tmp_path, tiny_checkpoint, small_manifest):
    """--rungs on a budget no recipe meets (50% fewer word errors than the baseline): every
    compressed trial stops after the rung's 2 of 3 clips. MLflow, Optuna, trials.csv and the
    summary say `pruned`, with the reason and the clips measured; the front holds only trials
    that measured the whole set."""
    import csv

    import optuna

    space = _space(tmp_path, SPACE + "constraints: {max_dwer: -0.5}\n"
                   "starts:\n  - {quant.scheme: bf16, prune.rate: 0.25}\n")
    rc = launch.main(_argv(tmp_path, tiny_checkpoint, small_manifest, space,
                           "--num-samples", "2", "--rungs", "0.5", "--no-probes"))
    assert rc == 0
    root = tmp_path / "root"
    _, child = _children(root)
    pruned = [r for r in child if r.data.tags.get("status") == "pruned"]
    assert len(pruned) >= 2, [(r.data.tags.get("status"), r.data.tags.get("error")) for r in child]
    for r in pruned:
        assert r.info.status == "FAILED"  # not taken for a finished trial on --resume
        assert "at the rung of 2 clips" in r.data.tags["stop_reason"]
        assert r.data.metrics["clips_measured"] == 2
        assert {"wer", "dwer", "speedup", "latency_median_s"} <= set(r.data.metrics)
    out = root / "sweeps" / "t" / "results"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruned"] == len(pruned) and summary["failed"] == 0
    assert summary["pruned_clips_mean"] == 2
    with open(out / "trials.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "pruned"]
    assert len(rows) == len(pruned) and all("rung" in r["stop_reason"] for r in rows)
    for r in json.loads((out / "pareto.json").read_text())["front"]:
        assert r["clips_measured"] == 3
    # what export may pick from: only trials that measured the whole set
    from sweep import export

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = [r for r in _children(root)[0]][0]
    exportable = export.trial_rows(client, parent.info.experiment_id, parent.info.run_id)
    assert exportable and all(r["clips_measured"] == 3 for r in exportable)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{root / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(pruned)


@pytest.mark.parametrize("value", ["-5", "0", "soon"])
def test_a_bad_trial_timeout_is_refused_before_anything_runs(tmp_path, tiny_checkpoint,
                                                             small_manifest, capsys, value):
    rc = launch.main([*_argv(tmp_path, tiny_checkpoint, small_manifest, "quick"),
                      "--trial-timeout", value])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"`--trial-timeout` must be auto, off or seconds > 0, got '{value}'" in err
    assert not (tmp_path / "root").exists() and not ray.is_initialized()


def test_the_auto_trial_timeout_follows_the_baseline():
    from sweep.search.worker import AUTO_TIMEOUT_MIN_S, parse_timeout, timeout_s

    slow = {"latency_mean_s": 8.7, "n_utterances": 59}  # whisper-large-v3 on a CPU
    fast = {"latency_mean_s": 0.3, "n_utterances": 59}  # whisper-base
    assert timeout_s("auto", slow) == pytest.approx(10 * 8.7 * 59)
    assert timeout_s("auto", fast) == AUTO_TIMEOUT_MIN_S
    assert timeout_s(parse_timeout("45"), slow) == 45.0
    assert timeout_s(parse_timeout("off"), slow) is None
