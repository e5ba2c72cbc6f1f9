"""The benchmarks' code on tiny inputs: grid, replay and hypervolume curves on a synthetic
cache, the recipes bench end to end on a tiny model, overhead's cost split. No timings are
asserted (they belong in bench/results/, measured in one run)."""

import json

import numpy as np
import pytest

from bench import common, overhead, recipes, search

ROW_KEYS = {"name", "wer", "cer", "dwer", "latency_median_s", "speedup", "commit", "machine",
            "n_clips", "latency_repeats_s"}


def synthetic_cache(grid: dict, seed: int = 0, drop: int = 0) -> dict:
    """Figures shaped like the real ones: int8 faster and a little worse, pruning worse."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in search.grid_points(grid):
        q = sum(v == "dynamic_int8" for v in p.values())
        wer = 0.5 * (1 + 0.03 * q + 4 * p["prune.rate"] ** 2) + rng.normal(0, 0.003)
        rows.append({"key": search.key_of(p, grid), "point": p, "status": "ok",
                     "wer": wer, "dwer": wer / 0.5 - 1, "latency_median_s": 0.5,
                     "speedup": 1 + 0.6 * q + 0.5 * p["prune.rate"] + rng.normal(0, 0.02)})
    rows[-1] = {**rows[-1], "status": "failed", "error": "boom"}  # a recipe that broke
    return {"grid": grid, "clips": ["a", "b"], "rows": rows[drop:],
            "blocks": [{"baseline_latency_median_s": 0.8}, {"baseline_latency_median_s": 0.9}],
            "baseline": {"wer": 0.5}}


SMALL = {"quant.enc_attn": ["none", "dynamic_int8"], "quant.scheme": ["none", "dynamic_int8"],
         "prune.rate": [0.0, 0.1, 0.2, 0.3]}


def test_grid_is_fixed_distinct_and_inside_cpu_space():
    from sweep.techniques.recipe import Recipe
    from sweep.search.space import load_space

    pts = search.grid_points()
    assert len(pts) >= 200 and pts == search.grid_points()
    assert len({search.key_of(p) for p in pts}) == len(pts)
    assert len({json.dumps(Recipe.from_flat(p).to_flat(), sort_keys=True) for p in pts}) == len(pts)
    space = load_space("cpu")
    assert all(space.params[k].contains(v) for p in pts for k, v in p.items())


def test_replay_curves_and_trials_to_random(tmp_path):
    cache = synthetic_cache(SMALL)
    summary = search.run_replays(cache, seeds=2, n_trials=12, log=lambda m: None)
    assert set(summary["samplers"]) == set(search.SAMPLERS) and summary["hv_grid"] > 0
    for e in summary["samplers"].values():
        med = np.array(e["median"])
        assert len(med) == 12 and np.all(np.diff(med) >= -1e-12)  # HV never shrinks
        assert np.all(np.array(e["q25"]) <= med + 1e-12) and med.max() <= 1 + 1e-9
        assert len(e["trials_to_random_final_per_seed"]) == 2
    rnd = summary["samplers"]["random"]
    assert rnd["trials_to_random_final_median_curve"] is not None  # random reaches its own end
    meta = {**common.stamp(), "grid_stamp": {}, "cached": len(cache["rows"]), "seeds": 2,
            "grid_size": len(search.grid_points(SMALL)), "n_clips": 2, "trials": 12,
            "command": "test"}
    paths = common.write_search(summary, meta, cache, tmp_path)
    assert "trials to random's final HV" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["samplers"]["tpe"]["median"]
    assert paths["png"].stat().st_size > 0


def test_replay_on_partial_cache_uses_nearest_point():
    cache = synthetic_cache(SMALL, drop=5)
    pts, base = search.points_of(cache)
    assert base["latency_median_s"] == pytest.approx(0.85)
    curve = search.replay(pts, base, SMALL, "random", 0, 10)
    assert len(curve) == 10


def test_trials_to():
    assert search.trials_to([0.0, 0.2, 0.5, 0.5], 0.5) == 3
    assert search.trials_to([0.0, 0.2], 0.5) is None


def test_grid_evaluation_resumes(tiny_checkpoint, small_manifest, tmp_path):
    grid = {"quant.scheme": ["none", "dynamic_int8"], "prune.rate": [0.0, 0.1]}
    path = tmp_path / "grid.json"
    kw = {"n_clips": 2, "block": 3, "model": tiny_checkpoint, "dataset": small_manifest,
          "threads": 1, "grid": grid, "log": lambda m: None}
    cache = search.evaluate(path, budget_s=0.0, **kw)  # out of budget before the first block
    assert cache["rows"] == []
    cache = search.evaluate(path, **kw)
    assert len(cache["rows"]) == 4 and all(r["status"] == "ok" for r in cache["rows"])
    assert {"wer", "dwer", "speedup", "speedup_cpu", "block"} <= set(cache["rows"][0])
    assert {"baseline_latency_median_s", "baseline_cpu_median_s"} <= set(cache["blocks"][0])
    assert search.evaluate(path, **kw)["rows"] == cache["rows"]  # nothing left to measure
    with pytest.raises(ValueError, match="another grid"):
        search.evaluate(path, **{**kw, "grid": {"prune.rate": [0.0, 0.2]}})


def test_recipes_end_to_end_tiny(tiny_checkpoint, small_manifest, tmp_path):
    pytest.importorskip("faster_whisper")
    out = tmp_path / "res"
    rc = recipes.main(["--model", tiny_checkpoint, "--dataset", small_manifest, "--repeats",
                       "2", "--max-samples", "2", "--threads", "1", "--no-hand", "--extra",
                       "int8=quant.scheme=dynamic_int8", "--extra",
                       "static=quant.scheme=static_int8", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "recipes.json").read_text())
    assert isinstance(rows, list)
    assert [r["name"] for r in rows] == ["baseline", "int8", "static", "faster-whisper-int8",
                                         "faster-whisper-fp32"]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["n_clips"] == 2 and len(r["latency_repeats_s"]) == 2
        assert r["wer"] >= 0 and r["latency_median_s"] > 0
        assert r["dwer_ci95"][0] <= r["dwer_ci95"][1]
    assert rows[0]["speedup"] == 1.0 and rows[0]["dwer"] == 0.0
    assert {"enc_mlp", "head"} <= set(rows[1]["kernels"]) and rows[0]["kernels"] is None
    assert "## Kernels" in (out / "recipes.md").read_text()
    # faster-whisper runs in its own process; its CPU seconds are that process's, not ~0
    assert all(r["cpu_median_s"] > 0.2 * r["latency_median_s"] for r in rows[3:])
    assert "| baseline |" in (out / "recipes.md").read_text()
    assert (out / "recipes.png").stat().st_size > 0


def test_recipes_refuses_bad_variants_before_loading(capsys):
    assert recipes.main(["--extra", "no-equals-sign"]) == 2
    assert recipes.main(["--extra", "x=quant.schem=dynamic_int8"]) == 2
    assert "quant.scheme" in capsys.readouterr().err  # the closest valid key is named


def _front_row(wer, lat, dwer, speedup, rate):
    return {"wer": wer, "latency_median_s": lat, "dwer": dwer, "speedup": speedup,
            "status": "ok", "recipe": {"prune.rate": rate, "quant.scheme": "dynamic_int8"}}


def test_front_picks_from_pareto_json_and_grid(tmp_path):
    front = [_front_row(0.50, 0.50, 0.00, 1.6, 0.0), _front_row(0.505, 0.40, 0.01, 2.0, 0.1),
             _front_row(0.54, 0.35, 0.08, 2.3, 0.2), _front_row(0.9, 0.30, 0.8, 2.6, 0.3)]
    path = tmp_path / "pareto.json"
    path.write_text(json.dumps({"front": front}))
    picks = {name: flat["prune.rate"] for name, flat, _ in recipes.front_picks(path)}
    assert picks["front-fastest-dwer0.02"] == 0.1 and picks["front-fastest-dwer0.1"] == 0.2
    gpath = tmp_path / "grid.json"
    gpath.write_text(json.dumps(synthetic_cache(SMALL)))
    assert recipes.front_picks(gpath)


def test_headline_against_faster_whisper():
    rows = [{"name": "baseline", "source": "baseline", "dwer": 0.0, "speedup": 1.0,
             "dwer_ci95": [0.0, 0.0], "latency_repeats_s": [1.0, 1.0]},
            {"name": "a", "source": "front", "dwer": 0.01, "speedup": 2.0,
             "dwer_ci95": [-0.05, 0.08], "latency_repeats_s": [0.5, 0.5]},
            {"name": "b", "source": "hand", "dwer": 0.3, "speedup": 3.0,
             "dwer_ci95": [0.2, 0.4], "latency_repeats_s": [0.33, 0.33]},
            # within 2% on the point, but the data cannot rule out +15%: not the headline
            {"name": "c", "source": "extra", "dwer": 0.0, "speedup": 2.5,
             "dwer_ci95": [-0.1, 0.15], "latency_repeats_s": [0.4, 0.4]},
            {"name": "faster-whisper-int8", "source": "peer", "dwer": 0.0, "speedup": 1.6,
             "dwer_ci95": [-0.1, 0.1], "latency_repeats_s": [0.6, 0.7]}]
    h = recipes.headline(rows)
    assert h["best"] == "a" and h["speedup_vs_baseline"] == 2.0
    assert h["speedup_vs_faster_whisper_int8"] == pytest.approx(1.3)
    assert recipes.headline(rows, max_upper=None)["best"] == "c"


def test_overhead_cost_split(tmp_path):
    summary = {"wall_s": 100.0, "trial_sum_s": 80.0}
    rows = [{"status": "ok", "trial_s": 30.0, "prepare_s": 1.0, "worker_prepare_s": 10.0},
            {"status": "ok", "trial_s": 25.0, "prepare_s": 2.0, "worker_prepare_s": 0.0},
            {"status": "ok", "trial_s": 25.0, "prepare_s": 3.0, "worker_prepare_s": None},
            {"status": "failed", "trial_s": 0.0}]
    r = overhead.split_costs(summary, rows, 1, 130.0, {"begin": 0.5, "finish": 1.0})
    assert r["overhead_ratio"] == pytest.approx(100 / 80)
    per = r["per_trial_s"]
    assert per["worker_prepare_s"] == pytest.approx(10 / 4)
    assert per["ray_tune_s"] == pytest.approx(20 / 4 - 1.0)
    assert per["launcher_outside_tune_s"] == pytest.approx(30 / 4)
    assert per["measure_s"] == pytest.approx(np.mean([18.5, 22.5, 21.5, 0.0]))
    assert per["recipe_prepare_s"] == pytest.approx(6 / 4) and r["ok"] == 3
    r2 = overhead.split_costs(summary, rows, 2, 130.0, {"begin": 0.5, "finish": 1.0})
    assert r2["overhead_ratio"] == pytest.approx(100 / 40)
    meta = {**common.stamp(), "command": "t", "sweep_command": "s"}
    paths = overhead.write_outputs([r, r2], {"ray_init_s": 3.0, "mlflow_s": {
        "begin": [0.5], "finish": [1.0]}}, meta, tmp_path)
    assert "1 concurrent" in paths["md"].read_text() and paths["png"].stat().st_size > 0


def test_tune_results_reads_last_line(tmp_path):
    d = tmp_path / "trainable_abc"
    d.mkdir()
    (d / "result.json").write_text(json.dumps({"trial_key": "abc", "worker_prepare_s": 1.0})
                                   + "\n" + json.dumps({"trial_key": "abc",
                                                        "worker_prepare_s": 2.0}) + "\n")
    assert overhead.tune_results(tmp_path)["abc"]["worker_prepare_s"] == 2.0


# --- issue #19: sampler configurations replayed, and the full-space accounting ---------------

def test_compare_replays_variants_as_the_sweep_runs_them(tmp_path):
    grid = {**SMALL, "quant.enc_attn": ["none", "dynamic_int8", "bf16"]}  # the starts' values
    cache = synthetic_cache(grid)
    pts, base = search.points_of(cache)
    told = search.Variant("tpe")
    _, rows = search.replay_variant(pts, base, grid, told, 0, 8, scenario="starts")
    assert len(rows) == 9 and [r["origin"] for r in rows[:3]] == ["baseline", "start", "start"]
    assert rows[0]["recipe"] == {n: v[0] for n, v in grid.items()}
    with pytest.raises(ValueError, match="warm starts must take the grid's values"):
        search.replay_variant(pts, base, SMALL, told, 0, 8, scenario="starts")
    _, dead = search.replay_variant(pts, base, grid, told, 1, 12, scenario="int8 start, dead")
    shrunk = [r for r in dead if r["recipe"].get("struct.ffn_rate", 0) > 0]
    assert shrunk and all(r["status"] == "pruned" and r["wer"] == 1.0 for r in shrunk)
    assert all("struct.stacks" in r["recipe"] for r in shrunk)  # asked only when it shrinks
    variants = [told, search.Variant("tpe, starts not told", starts_told=False),
                search.Variant("random", "random")]
    summary = search.compare(cache, variants_=variants, seeds=2, num_samples=8,
                             log=lambda m: None)
    assert summary["ranking"] and sorted(summary["ranking"]) == sorted(v.name for v in variants)
    for e in summary["results"].values():
        for sc in search.SCENARIOS:
            med = np.array(e[sc]["median"])
            assert len(med) == 9 and np.all(np.diff(med) >= -1e-12) and med.max() <= 1 + 1e-9
            assert 0 <= e[sc]["seeds_with_sampled_on_front"] <= 2
            assert 0 <= e[sc]["sampled_infeasible_share"] <= 1
    meta = {**common.stamp(), "grid": "test", "grid_machine": "test", "machine_line": "test",
            "seconds": 1.0, "command": "test"}
    paths = search.write_compare(summary, meta, tmp_path)
    md = paths["md"].read_text()
    assert all(f"## {sc}" in md for sc in search.SCENARIOS) and "Ranking" in md
    assert json.loads(paths["json"].read_text())["results"]["random"]["starts"]["median"]


def _row(tid, origin, wer, lat, status="ok", base_wer=0.5):
    return {"trial_id": tid, "origin": origin, "status": status, "wer": wer,
            "latency_median_s": lat, "dwer": None if wer is None else wer / base_wer - 1,
            "recipe": {"prune.rate": 0.1 * len(tid)}}


SWEEP_ROWS = [
    _row("b", "baseline", 0.5, 1.0), _row("s1", "start", 0.5, 0.6),
    _row("s2", "start", 0.7, 0.3),  # over the budget
    _row("x1", "sampled", 0.48, 0.5),  # beats the start on both: the whole front
    _row("x2", "sampled", 0.6, 0.2), _row("x3", "sampled", 0.9, 0.4, "pruned"),
    _row("x4", "sampled", None, None, "failed"),
    _row("x5", "sampled", None, None, "killed"), _row("x5", "sampled", 0.5, 0.7),  # re-run
    _row("x6", "sampled", None, None, "killed")]  # killed and never re-run: counted
BASE = {"wer": 0.5, "latency_median_s": 1.0}


def test_search_full_accounting_on_synthetic_rows():
    from bench.search_full import earned

    e = earned(SWEEP_ROWS, BASE, None, {"max_dwer": 0.1})
    assert (e["front"], e["front_from_sampling"], e["front_from_starts"],
            e["front_from_baseline"]) == (1, 1, 0, 0)
    # reference (0.55, 1.0): x1 alone 0.07 x 0.5, the start alone 0.05 x 0.4
    assert e["hv"] == pytest.approx(0.035) and e["hv_starts"] == pytest.approx(0.02)
    assert e["hv_ratio"] == pytest.approx(1.75)
    assert (e["sampled"], e["sampled_infeasible"]) == (6, 4)  # x2 x3 x4 x6
    only_starts = earned([r for r in SWEEP_ROWS if r["origin"] != "sampled"], BASE, None,
                         {"max_dwer": 0.1})
    assert only_starts["hv_ratio"] == 1.0 and only_starts["sampled_infeasible_share"] is None
    none = earned(SWEEP_ROWS[:1] + SWEEP_ROWS[3:4], BASE, None, {"max_dwer": 0.1})
    assert none["hv_starts"] == 0 and none["hv_ratio"] == float("inf")


def test_search_full_verdict_checks_each_criterion():
    from bench.search_full import verdict

    def seed(on_front, ratio, sampled=10, bad=2):
        return {"front_from_sampling": on_front, "hv_ratio": ratio, "sampled": sampled,
                "sampled_infeasible": bad}

    ok = verdict([seed(1, 1.2), seed(2, float("inf")), seed(1, 1.0)])
    assert ok["passed"] and ok["median_hv_ratio"] == pytest.approx(1.2)
    assert ok["sampled_infeasible_share"] == pytest.approx(0.2)
    miss = verdict([seed(1, 1.2), seed(0, 1.3), seed(1, 1.5)])
    assert not miss["checks"]["sampled_on_front_every_seed"] and miss["checks"]["median_hv_ratio"]
    flat = verdict([seed(1, 1.05), seed(1, None), seed(1, 1.0)])
    assert not flat["checks"]["median_hv_ratio"] and flat["median_hv_ratio"] == 1.025
    waste = verdict([seed(1, 2.0, 10, 4), seed(1, 2.0, 10, 3)])
    assert not waste["checks"]["sampled_infeasible_share"] and not waste["passed"]
    assert not verdict([])["passed"]


def test_search_full_reads_a_sweeps_files(tmp_path):
    from bench.search_full import analyse, earned, read_sweep
    from sweep.results import report

    report.write_front(SWEEP_ROWS, BASE, tmp_path, constraints={"max_dwer": 0.1})
    e = earned(SWEEP_ROWS, BASE, None, {"max_dwer": 0.1})
    counts = {k: e[k] for k in ("front_from_sampling", "front_from_starts", "sampled",
                                "sampled_infeasible")}
    (tmp_path / "summary.json").write_text(json.dumps({"sweep": "t", "trials": 9,
                                                       "hypervolume": e["hv"], **counts}))
    got = analyse([{**read_sweep(tmp_path), "seed": 0}])
    (s,) = got["seeds"]
    assert s["agrees_with_summary"] and s["hv"] == pytest.approx(e["hv"])
    assert {k: s[k] for k in counts} == counts and not got["passed"]  # 4 of 6 infeasible
    for wrong in ({"sampled": 5}, {"hypervolume": e["hv"] * 1.01}):
        (tmp_path / "summary.json").write_text(json.dumps({**counts, **wrong}))
        assert not analyse([{**read_sweep(tmp_path), "seed": 0}])["seeds"][0][
            "agrees_with_summary"]


def test_search_full_runs_sweeps_on_the_tiny_model(tiny_checkpoint, small_manifest, tmp_path):
    """Smoke: the script end to end, one seed of 2 samples on a small space (a sweep in its own
    process, screening first), then once more reading the finished seed instead of running it
    again, then with a second seed kept from an earlier file (one sweep in all: the suite's
    time; `--screen-from`, which later seeds get, is test_screen's)."""
    from bench import search_full

    space = tmp_path / "space.yaml"
    space.write_text("name: smoke\nparams:\n  quant.scheme: {choice: [none, dynamic_int8]}\n"
                     "  prune.rate: {float: [0.0, 0.5], step: 0.25}\n"
                     "constraints: {max_dwer: 0.1}\nstarts:\n  - {quant.scheme: dynamic_int8}\n")
    argv = ["--space", str(space), "--model", tiny_checkpoint, "--dataset",
            f"{small_manifest}+embedded", "--max-samples", "2", "--num-samples", "2",
            "--seeds", "1", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
            "--", "--no-probes", "--warmup", "0", "--max-slowdown", "0", "--screen-clips", "2"]
    assert search_full.main(argv) == 0
    res = json.loads((tmp_path / "out" / "search-full.json").read_text())
    [s] = res["seeds"]
    assert s["trials"] == 3 and s["sampled"] <= 1 and s["agrees_with_summary"]
    screen = json.loads((tmp_path / "root" / "seed-0" / "sweeps" / "space-seed0" / "screen" /
                         "screen.json").read_text())
    assert "from" not in screen and screen["rows"]  # seed 0 screened itself
    assert s["front_from_baseline"] + s["front_from_starts"] + s["front_from_sampling"] == s[
        "front"]
    assert res["machine"]["isa"] is not None and "checks" in res
    # each seed names the commit it ran at (its parent run's tag) and the CPU of its trials
    assert s["commit"] and s["machine"]["cpu"] == res["machine"]["cpu"]
    assert "= summary.json" in (tmp_path / "out" / "search-full.md").read_text()
    first = (tmp_path / "root" / "seed-0" / "mlflow.db").stat().st_mtime
    assert search_full.main(argv) == 0  # read again, not run again
    assert (tmp_path / "root" / "seed-0" / "mlflow.db").stat().st_mtime == first
    # --keep: seed 1 as an earlier run measured it, on another machine and commit (a file from
    # before seeds carried their own: the file's commit and machine are the seed's)
    old = {**res, "commit": "0" * 40, "machine": {**res["machine"], "cpu": "Elsewhere CPU"},
           "seeds": [{k: v for k, v in s.items() if k not in ("commit", "machine", "date")}
                     | {"seed": 1, "sampled": 10, "sampled_infeasible": 9}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    keep = [*argv[:argv.index("--seeds")], "--seeds", "2", "--keep", str(tmp_path / "old.json"),
            "--screen", "off", *argv[argv.index("--seeds") + 2:]]
    assert search_full.main(keep) == 0
    assert (tmp_path / "root" / "seed-0" / "mlflow.db").stat().st_mtime == first
    assert not (tmp_path / "root" / "seed-1").exists()  # kept, not run
    got = json.loads((tmp_path / "out" / "search-full.json").read_text())
    k0, k1 = got["seeds"]
    assert k1["commit"] == "0" * 40 and k1["machine"]["cpu"] == "Elsewhere CPU"
    assert k0["commit"] == s["commit"] and k0["sampled"] == s["sampled"]
    assert got["sampled_infeasible_share"] == pytest.approx(
        (9 + s["sampled_infeasible"]) / (10 + s["sampled"]))
    assert "Elsewhere CPU" in (tmp_path / "out" / "search-full.md").read_text()
    bad = [*keep[:keep.index("--keep") + 1], str(tmp_path / "space.yaml"),
           *keep[keep.index("--keep") + 2:]]
    assert search_full.main(bad) == 2  # not a search-full.json: refused before any sweep


def test_decode_markdown_splits_a_clips_time_for_greedy_rows():
    from bench import decode

    row = {"name": "tok", "label": "int8 tok", "source": "extra", "wer": 0.2, "dwer": 0.01,
           "dwer_ci95": [-0.05, 0.04], "latency_median_s": 0.25, "speedup": 4.0, "loops": 0,
           "ms_per_token": 4.5, "encoder_s": 0.1, "prompt_ms": 9.0, "tokens": 12.0,
           "features_other_ms": 7.5}
    base = {**row, "name": "baseline", "source": "baseline", "tokens": None}
    meta = {"date": "d", "dataset": "x", "n_clips": 2, "audio_s": 6.0, "repeats": 1,
            "machine": {"cpu": "c", "cores": 2, "isa": ["avx2"]}, "isa": "i", "commit": "c"}
    md = decode.markdown([base, row], {"window": [], "throughput": []}, meta, {})
    split = md.split("## Where a clip's time goes")[1].splitlines()
    assert "| tok | 7.5 | 0.100 | 9.0 | 12 | 4.5 |" in split
    assert not any(ln.startswith("| baseline") for ln in split)  # generate has no loop clock
    assert "Encoder window" not in md


@pytest.mark.parametrize("item, message", [
    ("no-equals", "`--variant` must be name=recipe-string"),
    ("=quant.scheme=bf16", "`--variant` must be name=recipe-string"),
    ("baseline=quant.scheme=bf16", "`--variant` names must be new and unique"),
    ("x=quant.scheme=bogus", "`--variant` x: ")])
def test_decode_refuses_a_bad_variant_before_loading_anything(item, message, capsys):
    from bench import decode

    assert decode.main(["--variant", item]) == 2
    assert message in capsys.readouterr().err


def test_longform_says_how_finely_its_set_resolves_dwer():
    from bench import longform

    def row(name, lo, hi, fw=None, recipe="quant.scheme=dynamic_int8"):
        return {"name": name, "faster_whisper": fw, "dwer_ci95": [lo, hi], "recipe": recipe}

    rows = [row(longform.BASELINE, 0.0, 0.0, recipe=""), row("a", -0.10, 0.20),
            row("b", -0.04, 0.22), row("c", -0.2, 0.3),
            row("fw", -0.5, 0.5, fw="int8 batched", recipe="")]
    res = longform.resolution(rows, 12)
    assert res["recipes"] == 3 and np.isclose(res["dwer_half_width"], 0.15)
    assert np.isclose(res["dwer_needed"], -0.05)  # 10% upper bound - 15% half-width
    line = longform.resolution_line(res)
    assert "±15%" in line and "-5% or less" in line and "3 recipes" in line
    assert longform.resolution([rows[0], rows[-1]], 12) is None
    assert longform.resolution(rows, 1) is None and longform.resolution_line(None) == ""


def test_longform_refuses_a_bad_recipe_before_building_anything(capsys, tmp_path):
    from bench import longform

    assert longform.main(["--recipe", "x=encoder.min_s=abc", "--out", str(tmp_path)]) == 2
    assert longform.main(["--recipe", "no-name", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "`--recipe` x: `encoder.min_s` must be float in [0, 30], got 'abc'" in err
    assert "`--recipe` must be name=recipe-string, got 'no-name'" in err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
