"""One registry of figures, one codec for a trial's row, one saved sweep spec: every figure the
evaluator produces reaches MLflow, Tune and trials.csv; a space's objectives make the front; a
restored trial's row is the row recorded before the kill, field for field."""

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep.inputs.machine import caps, isa  # noqa: E402
from sweep.results import figures, pareto, rows, tracking  # noqa: E402
from sweep import launch  # noqa: E402
from sweep.search import worker  # noqa: E402
from sweep.search.sweepspec import SweepSpec  # noqa: E402

# What the evaluator returns besides figures, and where each goes instead.
NOT_FIGURES = {"recipe": "params", "baseline": "baseline_* metrics", "kernels": "tag",
               "device": "tag", "utterances": "transcripts.json", "notes": "the evaluate JSON",
               "numbers": "the sweep's --numbers",
               "status": "tag", "probes": "probes.json",
               "cpu": "tag", "isa": "tag", "isa_cap": "tag",
               "hallucination_by_lang": "the evaluate JSON (hallucination_excess: the figure)"}


@pytest.fixture(scope="module")
def result(tiny_checkpoint, small_manifest):
    """A real trial result of the tiny model on one clip, as the worker completes it."""
    from sweep.inputs.data import load_eval_set
    from sweep.inputs.probes import probes
    from sweep.measure.evaluate import MeasureOptions, run_trial
    from sweep.inputs.models import load_model
    from sweep.techniques.recipe import Recipe

    lm = load_model(tiny_checkpoint)
    res, _ = run_trial(lm.model, lm.processor, load_eval_set(small_manifest, max_samples=1),
                       Recipe.parse("prune.rate=0.25"),
                       MeasureOptions(warmup=0, confidence=0.9), probes=probes(seconds=1.0)[:2])
    return {**res, "trial_s": 2.5, "worker_prepare_s": 1.25, "node": os.uname().nodename,
            "node_id": "node-x", "gpu_ids": []}


def test_every_list_of_figures_is_derived_from_the_registry():
    assert tracking.METRICS == figures.keys("mlflow")
    assert pareto.METRICS == figures.names("objective")
    assert pareto.DEFAULT_OBJECTIVES is figures.DEFAULT_OBJECTIVES
    assert {m for m, _ in figures.DEFAULT_OBJECTIVES} <= set(pareto.METRICS)
    for f in figures.FIGURES:
        assert set(figures.RECORDED) <= set(f.to), f  # the rule: MLflow, Tune and trials.csv
        assert f.better or "objective" not in f.to, f
        assert f.of is None or f.of in figures.BY_NAME, f
    with pytest.raises(ValueError, match="kind='list'.*allowed: float, int, pair"):
        figures.Figure("x", kind="list")


def test_every_figure_the_evaluator_produces_is_registered(result):
    numeric = {k for k, v in result.items() if figures._number(v)}
    pairs = {k for k, v in result.items() if isinstance(v, list) and len(v) == 2
             and all(map(figures._number, v))}
    assert numeric | pairs <= set(figures.BY_NAME), (numeric | pairs) - set(figures.BY_NAME)
    assert set(figures.BY_NAME) <= set(result), set(figures.BY_NAME) - set(result)
    rest = set(result) - set(figures.BY_NAME) - {"node", "node_id", "gpu_ids"}
    assert rest <= set(NOT_FIGURES), rest - set(NOT_FIGURES)


def _store(tmp_path):
    uri = tracking.default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, tmp_path / "artifacts")
    parent = tracking.start_parent(uri, exp, "s", {"space": "x"}, {})
    return uri, exp, parent


def test_restored_row_equals_the_recorded_one_field_for_field(result, tmp_path, monkeypatch):
    from ray import tune

    uri, exp, parent = _store(tmp_path)
    flat, key = result["recipe"], "trial-1"
    tags = {"device": "cpu", "node": result["node"], "node_id": "node-x", "gpu_ids": [],
            "cpus": 1}
    run_id, done = tracking.begin_trial(uri, exp, parent, "s", key, flat, tags)
    assert done is None
    tracking.finish_trial(uri, run_id, result)
    first = worker.reported(rows.from_result(result), run_id, key)  # what Tune got first
    assert {"dwer_ci95_lo", "dwer_ci95_hi", "kernels", "worker_prepare_s", "param_mb",
            "peak_rss_mb"} <= set(first)

    # The worker's restore path, as after a kill: begin_trial finds the FINISHED run.
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: key))
    monkeypatch.setattr(worker, "_assigned", lambda: (1, []))
    monkeypatch.setattr(worker, "_node_id", lambda: "node-x")
    ctx = worker.SweepContext(sweep="s", model="unused", data={}, language=None,
                              numbers="auto", tracking_uri=uri, experiment_id=exp,
                              parent_run_id=parent, cpus_per_trial=1)
    restored = worker.run_one(dict(flat), ctx)
    assert restored.pop("restored") is True
    assert restored == first
    assert {k: type(v) for k, v in restored.items()} == {k: type(v) for k, v in first.items()}

    (row,) = tracking.sweep_rows(uri, exp, "s")
    assert row["trial_id"] == key and row["recipe"] == flat
    shown = rows.tune_row(row)  # the row read back, as Tune sees it: what it got first
    assert shown and {k: first[k] for k in shown} == shown
    assert row["run_id"] == first["run_id"] and row["status"] == first["status"] == "ok"


def test_an_undecodable_run_is_an_unreadable_row(tmp_path):
    uri, exp, parent = _store(tmp_path)
    run_id, _ = tracking.begin_trial(uri, exp, parent, "s", "bad",
                                     {"quant.scheme": "int3"}, {"device": "cpu"})
    tracking.finish_trial(uri, run_id, {"wer": 0.1})
    (row,) = tracking.sweep_rows(uri, exp, "s")
    assert row["status"] == "unreadable" and "int3" in row["error"]
    info = SimpleNamespace(status="FINISHED", run_id="r", start_time=0)
    bad = rows.from_mlflow(info, {"wer": 0.1}, {"kernels": "{not json"}, {})
    assert bad["status"] == "unreadable" and "JSONDecodeError" in bad["error"]


# ---- a real tiny sweep whose space ranks on cer and latency_p90_s ---------------------------

SPACE = """
params:
  quant.scheme: {choice: [none, bf16]}
  prune.rate: {float: [0.0, 0.5], step: 0.25}
objectives: {cer: min, latency_p90_s: min}
constraints: {max_dwer: 10.0}
confidence: 0.9   # so that dwer_upper is measured too
starts:
  - {quant.scheme: none, prune.rate: 0.25}
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_checkpoint, small_manifest):
    tmp = tmp_path_factory.mktemp("figsweep")
    (tmp / "space.yaml").write_text(SPACE)
    root = tmp / "root"
    args = launch.parse_args(["--space", str(tmp / "space.yaml"), "--model", tiny_checkpoint,
                              "--dataset", small_manifest, "--root", str(root), "--name", "o",
                              "--num-samples", "1", "--max-slowdown", "0", "--seed", "0",
                              "--profile", "5", "--early-stop", "off"])
    try:
        summary = launch.run(args)
    finally:
        ray.shutdown()
    client = MlflowClient(tracking.default_uri(root))
    exp = client.get_experiment_by_name("hyper").experiment_id
    runs = [r for r in client.search_runs([exp]) if r.data.tags.get("hyper.kind") == "trial"]
    return root, summary, runs


def test_every_figure_reaches_mlflow_tune_and_trials_csv(sweep):
    root, summary, runs = sweep
    ok = [r for r in runs if r.info.status == "FINISHED"]
    assert len(ok) == summary["ok"] == 2
    for r in ok:
        assert set(figures.keys("mlflow")) <= set(r.data.metrics), \
            set(figures.keys("mlflow")) - set(r.data.metrics)
    tune = [json.loads(p.read_text().splitlines()[-1])
            for p in (root / "sweeps" / "o").glob("*/result.json")]
    assert len(tune) == 2
    for res in tune:
        assert set(figures.keys("tune")) <= set(res), set(figures.keys("tune")) - set(res)
    with open(root / "sweeps" / "o" / "results" / "trials.csv", newline="") as fh:
        head = next(csv.reader(fh))
    assert set(figures.keys("csv")) <= set(head), set(figures.keys("csv")) - set(head)
    # and the machine each trial ran on: CPU model, ISA flags, oneDNN's cap (null: none)
    assert {"cpu", "isa", "isa_cap"} <= set(head)
    for r in ok:
        assert r.data.tags["cpu"] and r.data.tags["isa_cap"] == (caps() or "")  # every cap in force
        assert r.data.tags["isa"].split(",") == isa()


def test_profile_is_each_trials_artifact(sweep):
    """--profile: every finished trial's top operators by self time, as text and JSON."""
    root, _, runs = sweep
    client = MlflowClient(tracking.default_uri(root))
    for r in [r for r in runs if r.info.status == "FINISHED"]:
        assert "profile_error" not in r.data.tags
        names = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"profile.txt", "profile.json"} <= names, names
        prof = json.loads(Path(client.download_artifacts(r.info.run_id, "profile.json"))
                          .read_text())
        assert len(prof["rows"]) == 5 and prof["clips"] == 3
        selfs = [row["self_cpu_s"] for row in prof["rows"]]
        assert selfs == sorted(selfs, reverse=True) and 0 < sum(
            row["self_share"] for row in prof["rows"]) <= 1 + 1e-9
        text = Path(client.download_artifacts(r.info.run_id, "profile.txt")).read_text()
        assert text.splitlines()[0].startswith("top 5 operators by self CPU time over 3 clips")
        assert prof["rows"][0]["name"][:40] in text


def test_the_front_is_on_the_spaces_objectives(sweep):
    root, summary, runs = sweep
    out = root / "sweeps" / "o" / "results"
    objs = [("cer", "min"), ("latency_p90_s", "min")]
    data = json.loads((out / "pareto.json").read_text())
    assert [tuple(o) for o in data["objectives"]] == objs
    assert (out / "pareto.csv").read_text().splitlines()[0].startswith("cer,latency_p90_s,")
    logged = [(r.data.metrics["cer"], r.data.metrics["latency_p90_s"]) for r in runs
              if r.info.status == "FINISHED"]
    front = data["front"]
    assert front
    for row in front:
        c, t = row["cer"], row["latency_p90_s"]
        assert not any(c2 <= c and t2 <= t and (c2, t2) != (c, t) for c2, t2 in logged)
    knee = pareto.knee(front, objs)  # None on a front of the baseline alone
    assert summary["knee"] == data["knee"] == (knee and knee["trial_id"])
    base = data["baseline"]
    assert data["reference_point"] == pytest.approx([base["cer"] * 1.5, base["latency_p90_s"]])
    assert summary["hypervolume"] == pytest.approx(data["hypervolume"])


def test_the_saved_spec_is_read_by_resume_and_export(sweep):
    root, _, _ = sweep
    spec = SweepSpec.load(root / "sweeps" / "o")
    assert spec.name == "o" and spec.num_samples == 1 and spec.max_slowdown == 0
    assert spec.profile == 5
    client = MlflowClient(tracking.default_uri(root))
    exp = client.get_experiment_by_name("hyper").experiment_id
    (parent,) = [r for r in client.search_runs([exp]) if r.data.tags.get("hyper.kind") == "sweep"]
    assert SweepSpec.from_params(parent.data.params, "o") == spec
    args = launch._restore_args(launch.parse_args(["--root", str(root), "--resume", "o",
                                                   "--time-budget", "9"]))
    assert (args.resume, args.time_budget, args.dataset) == ("o", 9, spec.dataset)


def test_spec_defaults_are_the_cli_defaults_and_old_files_still_read(tmp_path):
    cli = vars(launch.parse_args([]))
    # what the console shows is not a setting of the sweep: a resume may choose again
    assert set(SweepSpec.fields()) == set(cli) - {"resume", "inject", "verbose"}
    assert {k: getattr(SweepSpec(name="x"), k) for k in cli if k in SweepSpec.fields()} == {
        **{k: v for k, v in cli.items() if k in SweepSpec.fields()}, "name": "x"}
    old = {**cli, "name": None, "resume": None, "inject": {}, "num_samples": 3}  # vars(args)
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "hyper.json").write_text(json.dumps(old))
    assert SweepSpec.load(tmp_path / "s1") == SweepSpec(name="s1", num_samples=3)
    legacy = {"model": "m", "data.dataset": "/d.jsonl", "dataset": "d", "data.max_samples": "3",
              "data.language": "None", "numbers": "words", "warmup": "0"}
    spec = SweepSpec.from_params(legacy, "s")
    assert (spec.model, spec.dataset, spec.max_samples, spec.language, spec.numbers,
            spec.warmup) == ("m", "/d.jsonl", 3, None, "words", 0)
    with pytest.raises(ValueError, match="needs its `name`"):
        SweepSpec.from_dict({})
    assert Path(SweepSpec(name="x").save(tmp_path)).name == "hyper.json"
