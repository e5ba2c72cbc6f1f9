"""Screening: single changes planned from the anchors, the table, the space bounded by it; and a
real screened sweep (tiny model, Ray, MLflow) whose joint search stays inside the bounds."""

import json

import pytest

from sweep.search import screen
from sweep.search.space import load_space, space_from_dict

SPACE = {
    "params": {
        "prune.rate": {"float": [0.0, 0.6], "step": 0.05},
        "struct.ffn_rate": {"float": [0.0, 0.3], "step": 0.1},
        "quant.scheme": {"choice": ["none", "dynamic_int8", "bf16", "int8_act_int4_weight"]},
    },
    "constraints": {"max_dwer": 0.1},
    "starts": [{"quant.scheme": "dynamic_int8"}],
}


# the launcher keeps bf16 in these spaces on every CPU class (conftest)
pytestmark = pytest.mark.usefixtures("every_scheme_searched")


def test_plan_changes_one_dimension_from_each_anchor():
    space = space_from_dict(SPACE)
    pts = screen.plan(space, {"baseline": {}, "start 1": {"quant.scheme": "dynamic_int8"}})
    by = {(p.anchor, p.dim, p.value) for p in pts}
    assert ("baseline", "prune.rate", 0.2) in by and ("baseline", "prune.rate", 0.6) in by
    assert ("baseline", "quant.scheme", "bf16") in by
    assert ("start 1", "quant.scheme", "none") not in by  # that is the baseline: measured
    assert ("start 1", "prune.rate", 0.4) in by
    for p in pts:  # each point differs from its anchor in exactly its dimension
        anchor = {} if p.anchor == "baseline" else {"quant.scheme": "dynamic_int8"}
        base = {**space.baseline(), **anchor}
        assert {k for k in p.point if p.point[k] != base.get(k)} == {p.dim}
    keys = [screen.recipe_key(p.point) for p in pts]
    assert len(keys) == len(set(keys))  # nothing measured twice


def test_plan_skips_no_ops_and_the_shipped_spaces_plan():
    full = load_space("full")
    pts = screen.plan(full, {"baseline": {}, "start 1": full.starts[0]})
    dims = {p.dim for p in pts}
    # pruning targets, norm and scope change nothing at rate 0: never screened alone
    assert "prune.rate" in dims and not dims & {"prune.norm", "prune.scope", "prune.targets"}
    assert "device" not in dims and all(p.point.get("device", "cpu") == "cpu" for p in pts)


def _row(dim, value, status="ok", dwer=0.0, anchor="baseline", reason=None):
    return {"dim": dim, "value": value, "anchor": anchor, "status": status, "dwer": dwer,
            "speedup": 1.2, "clips_measured": 8, "reason": reason}


def test_narrow_drops_what_is_out_of_reach_from_every_anchor():
    space = space_from_dict(SPACE)  # reach: max(0.25, 3 x 0.1) = 0.3
    rows = [_row("prune.rate", 0.2, dwer=0.05), _row("prune.rate", 0.4, dwer=0.5),
            _row("prune.rate", 0.6, "pruned", None, reason="loops on 4 of the first 4 clips"),
            _row("quant.scheme", "int8_act_int4_weight", "failed", None, reason="boom"),
            _row("quant.scheme", "bf16", "pruned", None,
                 reason="4.0x slower than the baseline on the first 2 clips"),
            _row("struct.ffn_rate", 0.2, dwer=0.9),
            _row("struct.ffn_rate", 0.2, dwer=0.1, anchor="start 1"),
            _row("struct.ffn_rate", 0.3, dwer=2.0)]
    narrowed, changes = screen.narrow(space, rows)
    assert (narrowed.params["prune.rate"].lo, narrowed.params["prune.rate"].hi) == (0.0, 0.2)
    # broken alone: dropped; slow alone is not broken; a start's value is always kept
    assert narrowed.params["quant.scheme"].choices == ("none", "dynamic_int8", "bf16")
    # out of reach from the baseline but not from the start: kept
    assert narrowed.params["struct.ffn_rate"].hi == pytest.approx(0.2)
    assert any("prune.rate: [0, 0.6] -> [0, 0.2]" in c for c in changes)
    assert any("dropped int8_act_int4_weight" in c for c in changes)
    # nothing within reach at all: the dimension is fixed at its low end
    fixed, _ = screen.narrow(space, [_row("prune.rate", 0.2, dwer=1.0)])
    assert fixed.params["prune.rate"].kind == "value" and fixed.params["prune.rate"].value == 0.0


def test_best_start_is_the_fastest_within_budget():
    space = space_from_dict({**SPACE, "starts": [{"quant.scheme": "dynamic_int8"},
                                                 {"quant.scheme": "bf16"}]})
    base = {"wer": 0.3, "latency_median_s": 1.0}
    res = [{"status": "ok", "dwer": 0.05, "speedup": 1.8, "baseline": base},
           {"status": "ok", "dwer": 0.5, "speedup": 2.5, "baseline": base}]
    assert screen.best_start(space, res) == 0  # the faster one is over budget
    assert screen.best_start(space, [None, {"status": "failed"}]) is None


# --- a real screened sweep --------------------------------------------------------------------


def test_a_screened_sweep_searches_inside_the_bounds(tmp_path, tiny_checkpoint, small_manifest):
    """bf16 fails whenever it runs (fault injection): screening sees it break alone, drops it,
    and the joint search never samples it; the table is in MLflow and the report."""
    ray = pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    from sweep import launch

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  quant.scheme: {choice: [none, dynamic_int8, bf16]}\n"
                     "  prune.rate: {float: [0.0, 0.25], step: 0.25}\n"
                     "constraints: {max_dwer: 0.5}\n")
    root = tmp_path / "root"
    args = launch.parse_args(["--space", str(space), "--model", tiny_checkpoint, "--dataset",
                              small_manifest, "--root", str(root), "--name", "s", "--seed", "0",
                              "--num-samples", "3", "--max-slowdown", "0", "--screen", "on",
                              "--screen-clips", "2", "--no-probes"])
    args.inject = {"quant.scheme=bf16": "raise"}
    try:
        launch.run(args)
    finally:
        ray.shutdown()
    saved = json.loads((root / "sweeps" / "s" / "screen" / "screen.json").read_text())
    planned = screen.plan(load_space(str(space)), saved["anchors"])
    assert [(r["dim"], r["value"]) for r in saved["rows"]] == [(p.dim, p.value) for p in planned]
    assert {(r["dim"], r["value"]) for r in saved["rows"]} == {
        ("quant.scheme", "dynamic_int8"), ("quant.scheme", "bf16"), ("prune.rate", 0.25)}
    bf16 = [r for r in saved["rows"] if r["value"] == "bf16"][0]
    assert bf16["status"] == "failed" and "injected failure" in bf16["reason"]
    assert saved["clips"] == 2 and saved["changes"] == [
        "quant.scheme: dropped bf16 (out of reach alone)"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper").experiment_id
    runs = client.search_runs([exp], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("hyper.kind") == "sweep"][0]
    assert {"screen/screen.json", "screen/screen.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "screen")}
    screened = [r for r in runs if r.data.tags.get("hyper.sweep") == "s/screen"]
    assert len(screened) == len(saved["rows"])
    assert all(r.data.metrics.get("clips_measured", 0) <= 2 for r in screened)
    # the joint search sampled only inside the bounded space: never bf16
    main = [r for r in runs if r.data.tags.get("hyper.sweep") == "s"
            and r.data.tags.get("hyper.kind") == "trial"]
    assert len(main) == 4 and all(r.data.params["quant.scheme"] != "bf16" for r in main)
    report = (root / "sweeps" / "s" / "results" / "report.html").read_text()
    assert "Screening: each change alone" in report and "dropped bf16" in report

    # a second sweep (another seed) reads that screening instead of measuring it again
    again = launch.parse_args(["--space", str(space), "--model", tiny_checkpoint, "--dataset",
                               small_manifest, "--root", str(root), "--name", "s2", "--seed",
                               "1", "--num-samples", "3", "--max-slowdown", "0", "--screen-from",
                               str(root / "sweeps" / "s"), "--no-probes"])
    try:
        launch.run(again)
    finally:
        ray.shutdown()
    read = json.loads((root / "sweeps" / "s2" / "screen" / "screen.json").read_text())
    assert read["rows"] == saved["rows"] and read["changes"] == saved["changes"]
    assert read["from"].endswith("sweeps/s/screen/screen.json")
    runs = client.search_runs([exp], max_results=1000)
    assert not [r for r in runs if r.data.tags.get("hyper.sweep") == "s2/screen"]
    second = [r for r in runs if r.data.tags.get("hyper.sweep") == "s2"
              and r.data.tags.get("hyper.kind") == "trial"]
    assert len(second) == 4 and all(r.data.params["quant.scheme"] != "bf16" for r in second)
    assert "dropped bf16" in (root / "sweeps" / "s2" / "results" / "report.html").read_text()
    # the local sampler's mutations say whose they are, in trials.csv and the summary
    import csv

    results = root / "sweeps" / "s2" / "results"
    with open(results / "trials.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = {r["run_id"] for r in rows}
    mutated = [r for r in rows if r.get("parent_run")]
    assert all(r["parent_run"] in ids and r["changed"] and r["origin"] == "sampled"
               for r in mutated)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["sampled_by_mutation"] == len(mutated) <= summary["sampled"]
    assert 0 <= summary["front_from_mutation"] <= summary["front_from_sampling"]


def test_screen_from_is_refused_when_it_is_no_screening_of_the_space(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": [{"dim": "quant.enc_attn", "value": "bf16"}]}))
    space = load_space(str(_space_file(tmp_path)))
    with pytest.raises(ValueError, match=r"`--screen-from` must be a screening of space "
                                         r".*which screened quant.enc_attn"):
        screen.read_saved(other, space)
    with pytest.raises(ValueError, match=r"`--screen-from` must be a sweep's screen/screen.json "
                                         r"or its folder, got '.*nowhere'"):
        screen.read_saved(tmp_path / "nowhere", space)


def _space_file(tmp_path):
    p = tmp_path / "small.yaml"
    p.write_text("params:\n  quant.scheme: {choice: [none, dynamic_int8]}\n"
                 "constraints: {max_dwer: 0.5}\n")
    return p
