"""sweep.results.pareto: fronts, hypervolume, knee, constraints and the written reports."""

import csv
import itertools
import json
import math
import random

import numpy as np
import pytest

from sweep.results import pareto, report, report_html

BASE = {"wer": 0.5, "cer": 0.2, "latency_median_s": 1.0, "recipe": {"quant.scheme": "none"}}


def row(tid, wer, lat, *, status="ok", device="cpu", cer=None, **kw):
    cer = wer / 2 if cer is None else cer
    r = {"trial_id": tid, "wer": wer, "cer": cer, "latency_median_s": lat,
         "dwer": wer / BASE["wer"] - 1, "dcer": cer / BASE["cer"] - 1,
         "speedup": BASE["latency_median_s"] / lat if lat else None,
         "device": device, "status": status,
         "recipe": {"device": device, "quant.scheme": "dynamic_int8", "prune.rate": tid / 10}}
    r.update(kw)
    return r


def dominates(a, b):
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(25))
def test_front_is_exactly_the_nondominated_ok_rows(seed):
    rnd = random.Random(seed)
    grid = [round(0.1 * i, 1) for i in range(1, 8)]  # coarse grid: many ties and equal points
    rows = [row(i, rnd.choice(grid), rnd.choice(grid),
                status=rnd.choice(["ok", "ok", "ok", "failed", "timeout"]))
            for i in range(rnd.randint(0, 40))]
    if rows and seed % 3 == 0:
        rows.append(dict(rows[0], trial_id=999))  # an exact duplicate point
    front = pareto.pareto_front(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    ids = {r["trial_id"] for r in front}
    assert all(r["status"] == "ok" for r in front)
    for r in ok:
        p = (r["wer"], r["latency_median_s"])
        dominated = any(dominates((o["wer"], o["latency_median_s"]), p) for o in ok)
        assert (r["trial_id"] in ids) == (not dominated), (r, front)
    # failed rows may even dominate everything: they are still ignored
    best_failed = row(-1, 0.0, 0.0, status="failed")
    assert pareto.pareto_front([*rows, best_failed]) == front


def test_ties_stay_and_max_objectives_flip():
    rows = [row(1, 0.3, 0.5), row(2, 0.3, 0.5), row(3, 0.4, 0.5), row(4, 0.2, 0.9)]
    assert [r["trial_id"] for r in pareto.pareto_front(rows)] == [4, 1, 2]
    # maximise latency (absurd, but checks the flip): row 4 dominates everything
    front = pareto.pareto_front(rows, [("wer", "min"), ("latency_median_s", "max")])
    assert [r["trial_id"] for r in front] == [4]


def test_rows_missing_an_objective_or_nan_are_ignored():
    rows = [row(1, 0.3, 0.5), row(2, float("nan"), 0.1), row(3, 0.2, None)]
    assert [r["trial_id"] for r in pareto.pareto_front(rows)] == [1]


def test_constraint_keeps_over_budget_rows_off_the_front():
    rows = [row(1, 0.5, 1.0), row(2, 0.52, 0.6), row(3, 0.7, 0.3)]  # dwer 0, 4%, 40%
    assert len(pareto.pareto_front(rows)) == 3
    front = pareto.pareto_front(rows, constraints={"max_dwer": 0.05}, baseline=BASE)
    assert [r["trial_id"] for r in front] == [1, 2]
    front = pareto.pareto_front(rows, constraints={"max_dwer": 0.05, "min_speedup": 1.5},
                                baseline=BASE)
    assert [r["trial_id"] for r in front] == [2]


def test_constraint_values_are_optuna_style():
    r = row(1, 0.55, 0.5)  # dwer 0.1, dcer 0.375, speedup 2
    vals = pareto.constraint_values(
        r, {"max_dwer": 0.02, "max_dcer": 0.5, "max_latency_s": 0.4, "min_speedup": 1.5}, BASE)
    assert vals == pytest.approx([0.08, -0.125, 0.1, -0.5])
    # figures derived from the baseline when the row lacks them
    bare = {"wer": 0.55, "cer": 0.1, "latency_median_s": 0.25, "status": "ok"}
    assert pareto.constraint_values(bare, {"max_dwer": 0.02, "min_speedup": 3}, BASE) == \
        pytest.approx([0.08, -1.0])
    assert pareto.feasible(bare, {"min_speedup": 3}, BASE)
    assert not pareto.feasible(dict(bare, status="failed"), {}, BASE)
    failed = {"status": "failed", "trial_id": 7}
    assert pareto.constraint_values(failed, {"max_dwer": 0.02}, BASE) == [math.inf]
    with pytest.raises(ValueError, match="max_wer"):
        pareto.constraint_values(r, {"max_wer": 0.1}, BASE)


def test_one_constraint_table_judges_rows_and_refuses_limits():
    """Every constraint key is one `Constraint` row: the figure it bounds, its side and the
    limits it takes; the error names the rule."""
    c = pareto.CONSTRAINTS
    assert {k: (v.figure, v.side) for k, v in c.items()} == {
        "max_dwer": ("dwer", "max"), "max_dcer": ("dcer", "max"),
        "max_latency_s": ("latency_median_s", "max"), "min_speedup": ("speedup", "min"),
        "max_hallucination": ("hallucination_rate", "max"),
        "max_extra_hallucination": ("hallucination_excess", "max")}
    assert c["max_latency_s"].refuses(0) == c["min_speedup"].refuses(-1) == "must be > 0"
    assert c["max_hallucination"].refuses(1.5) == ("is a share of the probes and must be in "
                                                   "[0, 1]")
    assert c["max_dwer"].refuses(-1).endswith("and must be > -1")
    assert all(v.refuses(0.5) is None for v in c.values())
    # the baseline against itself on a relative figure measured, not derived: its neutral value
    base = {"wer": 0.5, "hallucination_rate": 1.0}
    assert pareto.constraint_values(base, {"max_extra_hallucination": 0.1}, base) == [
        pytest.approx(-0.1)]
    with pytest.raises(ValueError, match="constraint `max_x`: name must start max_/min_"):
        pareto.Constraint("max_x", "no_such_figure")


def test_fronts_by_device():
    rows = [row(1, 0.3, 0.5), row(2, 0.4, 0.4), row(3, 0.2, 0.1, device="cuda"),
            row(4, 0.25, 0.2, device="cuda"), row(5, 0.1, 0.1, device="cuda", status="failed")]
    fronts = pareto.fronts_by(rows)
    assert {k: [r["trial_id"] for r in v] for k, v in fronts.items()} == \
        {"cpu": [1, 2], "cuda": [3]}


def test_hypervolume_2d_hand_computed():
    ref = (1.0, 1.0)
    assert pareto.hypervolume([], ref) == 0.0
    assert pareto.hypervolume([(0.5, 0.5)], ref) == pytest.approx(0.25)
    # staircase: 0.8*0.2 + 0.5*0.3 + 0.2*0.3 (slabs by y) = 0.16 + 0.15 + 0.06
    pts = [(0.2, 0.8), (0.5, 0.5), (0.8, 0.2)]
    assert pareto.hypervolume(pts, ref) == pytest.approx(0.37)
    # dominated points, duplicates and points outside the box add nothing
    more = [*pts, (0.6, 0.6), (0.5, 0.5), (1.2, 0.1), (0.1, 1.0)]
    assert pareto.hypervolume(more, ref) == pytest.approx(0.37)


def test_hypervolume_3d_and_more_exact():
    ref = (1.0, 1.0, 1.0)
    assert pareto.hypervolume([(0.5, 0.5, 0.5)], ref) == pytest.approx(0.125)
    # two boxes 0.5^2*1 ... inclusion-exclusion by hand
    pts = [(0.0, 0.5, 0.5), (0.5, 0.0, 0.5)]
    # each: 1*0.5*0.5 = 0.25 and 0.5*1*0.5 = 0.25; overlap [0.5,1]x[0.5,1]x[0.5,1] = 0.125
    assert pareto.hypervolume(pts, ref) == pytest.approx(0.375)
    rng = np.random.default_rng(0)
    for d in (3, 4):
        pts = rng.uniform(0, 1, size=(12, d))
        exact = _inclusion_exclusion(pts, np.ones(d))
        assert pareto.hypervolume(pts, np.ones(d)) == pytest.approx(exact)
        assert pareto._hv_slices(pts, np.ones(d)) == pytest.approx(exact)


def _inclusion_exclusion(pts, ref):
    total = 0.0
    for k in range(1, len(pts) + 1):
        for combo in itertools.combinations(pts, k):
            corner = np.max(combo, axis=0)
            total += (-1) ** (k + 1) * float(np.prod(np.clip(ref - corner, 0, None)))
    return total


def test_reference_point():
    assert pareto.reference_point(BASE) == pytest.approx((0.75, 1.0))
    assert pareto.reference_point(BASE, max_dwer=0.02) == pytest.approx((0.51, 1.0))
    assert pareto.front_hypervolume([row(1, 0.5, 0.5)], BASE, 0.02) == pytest.approx(0.005)


def test_knee_on_a_hand_made_front():
    # extremes (0.1, 1.0) and (1.0, 0.1); (0.2, 0.2) bulges furthest toward the origin
    front = [row(1, 0.1, 1.0), row(2, 0.15, 0.5), row(3, 0.2, 0.2), row(4, 0.5, 0.15),
             row(5, 1.0, 0.1)]
    assert pareto.knee(front)["trial_id"] == 3
    assert pareto.knee([row(9, 0.3, 0.3)])["trial_id"] == 9
    assert pareto.knee([]) is None
    # straight front: no bulge, the point nearest the ideal corner
    line = [row(1, 0.0, 1.0), row(2, 0.5, 0.5), row(3, 1.0, 0.0)]
    assert pareto.knee(line)["trial_id"] == 2


def test_knee_is_never_the_baseline_and_the_fastest_on_small_fronts():
    base = row(0, 0.5, 1.0, recipe={"device": "cpu"})  # the unchanged model on the front
    # one point: the baseline alone gives no knee (nothing to ship but the original)
    assert pareto.knee([base]) is None
    # two points, one the baseline: the other one
    fast = row(1, 0.6, 0.4)
    assert pareto.knee([base, fast])["trial_id"] == 1
    # two compressed points: the fastest, not the one nearest the ideal corner
    a, b = row(2, 0.51, 0.8), row(3, 0.7, 0.3)
    assert pareto.knee([a, b])["trial_id"] == 3
    assert pareto.knee([base, a, b])["trial_id"] == 3  # the baseline does not count
    # objectives given as speed-up (max): still the fastest
    objs = [("wer", "min"), ("speedup", "max")]
    assert pareto.knee([a, b], objs)["trial_id"] == 3
    # many points: the bulge, never the baseline even where it is an extreme
    many = [base, row(4, 0.55, 0.5), row(5, 0.58, 0.2), row(6, 0.9, 0.15)]
    assert pareto.knee(many)["trial_id"] == 5


def test_max_dwer_is_judged_on_the_upper_bound_when_the_row_has_it():
    r = row(1, 0.505, 0.5)  # dwer +1%
    assert pareto.feasible(r, {"max_dwer": 0.02})
    assert not pareto.feasible({**r, "dwer_upper": 0.08}, {"max_dwer": 0.02})
    assert pareto.feasible({**r, "dwer_upper": 0.019}, {"max_dwer": 0.02})
    assert pareto.constraint_values({**r, "hallucination_rate": 0.3},
                                    {"max_hallucination": 0.2}) == pytest.approx([0.1])
    assert pareto.constraint_values(r, {"max_hallucination": 0.2}) == [float("inf")]


def test_constraints_the_baseline_itself_breaks_are_named():
    base = {**row(0, 0.5, 1.0), "dwer": 0.0, "speedup": 1.0, "hallucination_rate": 1.0}
    limits = {"max_dwer": 0.02, "min_speedup": 1.5, "max_hallucination": 0.2,
              "max_latency_s": 0.4}
    over = pareto.over_at_baseline(base, limits)
    assert over == pytest.approx({"max_hallucination": 0.8, "max_latency_s": 0.6})
    assert pareto.over_at_baseline(base, {"max_dwer": 0.02, "min_speedup": 2.0}) == {}
    assert pareto.over_at_baseline(row(0, 0.5, 1.0), {"max_hallucination": 0.2}) == {}
    # as the launcher asks: the baseline's own figures (no dwer or speedup), as row and base
    figs = {"wer": 0.5, "cer": 0.25, "latency_median_s": 1.0, "hallucination_rate": 1.0}
    assert pareto.over_at_baseline(figs, limits) == pytest.approx(over)


def test_verdict_says_no_measurable_change_when_the_interval_holds_zero():
    assert report.verdict({"dwer_ci95_lo": -0.1, "dwer_ci95_hi": 0.05}) == "no measurable change"
    assert report.verdict({"dwer_ci95_lo": -0.3, "dwer_ci95_hi": -0.01}) == "better"
    assert report.verdict({"dwer_ci95_lo": 0.01, "dwer_ci95_hi": 0.3}) == "worse"
    assert report.verdict({}) == "—"


def test_format_table_percent_only_in_print():
    rows = [row(1, 0.55, 0.5), row(2, 0.6, 0.8, status="failed")]
    text = report.format_table(rows, BASE)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["Configuration", "WER", "dWER"]
    assert "time per audio" in lines[0] and lines[0].split()[-2:] == ["delta", "accuracy"]
    assert lines[2].startswith("baseline")
    assert "+10.0%" in lines[3] and "-50.0%" in lines[3] and "0.500 s" in lines[3]
    assert lines[3].startswith("prune l1 0.10, int8 dyn (all)")  # Recipe.describe()
    assert "(failed)" in lines[4]
    odd = report.format_table([row(3, 0.5, 1.0, recipe={"quant.schem": "x", "device": "cuda"})],
                              BASE)
    assert "quant.schem=x [cuda]" in odd  # not a recipe: the keys that differ
    assert rows[0]["dwer"] == pytest.approx(0.1)  # the rows themselves keep fractions


def test_write_front_csv_json(tmp_path):
    rows = [row(1, 0.5, 1.0), row(2, 0.52, 0.6, kernels={"enc_mlp": "int8"}),
            row(3, 0.7, 0.7), row(4, 0.1, 0.1, status="failed")]
    paths = report.write_front(rows, BASE, tmp_path, pareto.DEFAULT_OBJECTIVES,
                               constraints={"max_dwer": 0.05})
    with open(paths["pareto_csv"], newline="") as fh:
        front = list(csv.DictReader(fh))
    assert list(front[0])[:2] == ["wer", "latency_median_s"]
    assert [r["trial_id"] for r in front] == ["1", "2"]
    assert front[1]["recipe"] == "device=cpu,quant.scheme=dynamic_int8,prune.rate=0.2"
    assert front[1]["prune.rate"] == "0.2" and json.loads(front[1]["kernels"]) == \
        {"enc_mlp": "int8"}
    with open(paths["trials_csv"], newline="") as fh:
        trials = list(csv.DictReader(fh))
    assert len(trials) == 4 and list(trials[0])[:2] == ["wer", "latency_median_s"]
    data = json.loads(paths["pareto_json"].read_text())
    assert [r["trial_id"] for r in data["front"]] == [1, 2]
    assert data["reference_point"] == pytest.approx([0.525, 1.0])
    assert data["hypervolume"] == pytest.approx(pareto.hypervolume([(0.5, 1.0), (0.52, 0.6)],
                                                                   (0.525, 1.0)))
    assert data["knee"] in (1, 2) and data["n_trials"] == 4 and data["n_ok"] == 3


def test_plot_and_html(tmp_path):
    rows = [row(i, 0.5 + 0.03 * i, 1.0 - 0.08 * i) for i in range(6)]
    rows += [row(10, 0.9, 0.95), row(11, 0.2, 0.2, status="failed")]
    front = pareto.pareto_front(rows)
    png = report.plot_front(rows, front, BASE, tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    links = {r["trial_id"]: f"http://127.0.0.1:5000/#/experiments/1/runs/run{r['trial_id']}"
             for r in rows}
    page = report_html.write_report_html(rows, front, BASE, tmp_path / "report.html", links)
    text = page.read_text()
    assert "quant.scheme = dynamic_int8" in text and "prune.rate=0.3" in text
    assert 'href="http://127.0.0.1:5000/#/experiments/1/runs/run3"' in text
    assert "run11" not in text  # failed rows are neither plotted nor listed
    assert "%" not in text.replace("%;", "")  # fractions here; percent only in format_table
    assert text.count('class="pt"') == 7 + 1  # 7 ok trials + the baseline
    assert "http" not in text.replace("http://127.0.0.1:5000", "").replace(
        "http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere


# ---------------------------------------------------------------------------------------------
# the front says only what the data resolves (issue #25)


def base_row(lat=1.0, **kw):
    """The unchanged model's own trial: dWER 0 with the interval [0, 0] evaluate gives it."""
    return row(0, BASE["wer"], lat, recipe={"device": "cpu"},
               **{"dwer_ci95_lo": 0.0, "dwer_ci95_hi": 0.0, **kw})


def ci(r, lo, hi):
    return {**r, "dwer_ci95_lo": lo, "dwer_ci95_hi": hi}


def ids(rows):
    return [r["trial_id"] for r in rows]


def test_a_slower_trial_whose_gain_is_inside_its_interval_is_off_the_front():
    # the resumed `quick` sweep: 2.3x slower, WER 11% lower, "no measurable change"
    slow = ci(row(1, 0.445, 2.3), -0.25, 0.03)
    fast = ci(row(2, 0.6, 0.5), 0.05, 0.35)  # measurably worse, 2x faster
    rows = [base_row(), slow, fast]
    assert report.verdict(slow) == pareto.NO_CHANGE
    # on point estimates it would be on the front (the lowest WER of all)
    assert not any(dominates((o["wer"], o["latency_median_s"]), (0.445, 2.3)) for o in rows)
    front, unresolved = pareto.front_split(rows, baseline=BASE)
    assert ids(front) == [0, 2] and ids(unresolved) == [1]
    assert pareto.pareto_front(rows, baseline=BASE) == front
    assert pareto.unresolved(rows, baseline=BASE) == unresolved
    # no baseline trial among the rows: its figures take its place, dominating, never listed
    assert pareto.front_split([slow, fast], baseline=BASE) == ([fast], [slow])
    # neither a baseline trial nor its figures: nothing to tie with, points decide
    assert ids(pareto.pareto_front([slow, fast])) == [1, 2]
    # a 0.82x bf16 head with -11.8% [-24%, +1%] (issue #25, `--space full`): off as well
    head = ci(row(3, 0.441, 1 / 0.82), -0.24, 0.01)
    assert ids(pareto.front_split([base_row(), head], baseline=BASE)[1]) == [3]


def test_a_slower_trial_with_a_resolved_gain_stays():
    better = ci(row(1, 0.4, 1.5), -0.3, -0.05)  # interval excludes 0: measurably better
    front, unresolved = pareto.front_split([base_row(), better], baseline=BASE)
    assert ids(front) == [1, 0] and unresolved == []
    assert pareto.knee(front)["trial_id"] == 1  # the only choice that is not the baseline


def test_the_baseline_keeps_its_place_and_a_faster_trial_its_own():
    # the reference the intervals are measured against stays beside a faster trial whose loss
    # is unresolved, and beside a measurably worse one, as on points
    fast = ci(row(1, 0.51, 0.7), -0.06, 0.10)
    worse = ci(row(2, 0.6, 0.5), 0.01, 0.40)
    assert pareto.front_split([base_row(), fast, worse], baseline=BASE) == (
        [base_row(), fast, worse], [])
    # a faster trial with an unresolved gain beats it (it would on points too)
    gain = ci(row(3, 0.49, 0.7), -0.1, 0.06)
    assert ids(pareto.front_split([base_row(), gain], baseline=BASE)[0]) == [3]


def test_ties_in_speed_stay_and_trials_are_compared_on_their_points():
    # as fast as the baseline, unresolved gain: tied on accuracy and on speed, both stay (on
    # points the trial would dominate the baseline: an advantage the data does not resolve)
    same = ci(row(1, 0.45, 1.0), -0.2, 0.05)
    assert ids(pareto.pareto_front([base_row(), same], baseline=BASE)) == [1, 0]
    assert ids(pareto.pareto_front([base_row(), {**same, "dwer_ci95_hi": -0.01}])) == [1]
    # two trials, both faster than the baseline, overlapping intervals: the rows hold no paired
    # test between them, so their points decide (the faster does not drive the other out)
    a = ci(row(2, 0.515, 0.6), -0.05, 0.11)
    b = ci(row(3, 0.48, 0.8), -0.12, 0.04)
    front, unresolved = pareto.front_split([base_row(), a, b], baseline=BASE)
    assert ids(front) == [3, 2] and unresolved == []  # b beats the baseline on points too
    # rows without intervals (bench grids, older sweeps): exactly the point front, as before
    plain = [base_row(dwer_ci95_lo=None), row(4, 0.45, 2.0)]
    assert ids(pareto.pareto_front(plain, baseline=BASE)) == [4, 0]


def test_an_infeasible_baseline_dominates_nothing():
    # Russian whisper-base hallucinates on every probe: with max_hallucination 0.2 the baseline
    # is off the front, and a slower trial under the limit stays however small its WER gain
    limits = {"max_hallucination": 0.2}
    base = {**BASE, "hallucination_rate": 1.0}
    slow = ci(row(1, 0.49, 1.4, hallucination_rate=0.1), -0.1, 0.08)
    rows = [base_row(hallucination_rate=1.0), slow]
    assert ids(pareto.pareto_front(rows, constraints=limits, baseline=base)) == [1]
    assert ids(pareto.pareto_front([slow], constraints=limits, baseline=base)) == [1]
    # baseline figures within the limit: the slower trial is dominated
    fine = {**BASE, "hallucination_rate": 0.1}
    assert pareto.front_split([slow], constraints=limits, baseline=fine) == ([], [slow])


@pytest.mark.parametrize("seed", range(15))
def test_no_front_member_is_slower_than_the_baseline_unless_measurably_better(seed):
    rnd = random.Random(seed)
    rows = [base_row()]
    for i in range(1, rnd.randint(2, 30)):
        wer, half = rnd.uniform(0.3, 0.8), rnd.uniform(0.02, 0.2)
        d = wer / BASE["wer"] - 1
        rows.append(ci(row(i, wer, rnd.choice([0.5, 0.8, 1.0, 1.3, 2.0])), d - half, d + half))
    front, unresolved = pareto.front_split(rows, baseline=BASE)
    for r in front:
        assert r["latency_median_s"] <= 1.0 or pareto.verdict(r) == "better", r
    # the unresolved are the point front's members the resolution takes off; the front is the
    # rest of it, and a tie at the baseline's own speed may keep one more
    point = {r["trial_id"] for r in rows if not any(
        dominates((o["wer"], o["latency_median_s"]), (r["wer"], r["latency_median_s"]))
        for o in rows)}
    assert set(ids(unresolved)) <= point and point - set(ids(unresolved)) <= set(ids(front))
    assert all(r["latency_median_s"] == 1.0 for r in front if r["trial_id"] not in point)
    assert not set(ids(front)) & set(ids(unresolved)) and front


def test_export_and_the_files_use_the_resolved_front(tmp_path):
    from sweep.ship.pick import ExportError, pick

    slow = ci(row(1, 0.445, 2.3, run_id="s"), -0.25, 0.03)
    fast = ci(row(2, 0.6, 0.5, run_id="f"), 0.05, 0.35)
    base = base_row(run_id="b")
    assert pick([base, slow, fast], "knee", baseline=BASE)["run_id"] == "f"
    with pytest.raises(ExportError, match="1 beat it only inside the data's resolution"):
        pick([base, slow], "knee", baseline=BASE)
    paths = report.write_front([base, slow, fast], BASE, tmp_path)
    data = json.loads(paths["pareto_json"].read_text())
    assert [r["trial_id"] for r in data["front"]] == [0, 2] and data["unresolved"] == [1]
    assert data["hypervolume"] == pytest.approx(pareto.hypervolume([(0.6, 0.5)], (0.75, 1.0)))
    with open(paths["trials_csv"], newline="") as fh:
        marks = {r["trial_id"]: r["front"] for r in csv.DictReader(fh)}
    assert marks == {"0": "member", "1": "unresolved", "2": "member"}
    table = report.format_table([base, fast], BASE, unresolved=[slow]).splitlines()
    assert table[2].startswith("baseline (on the front)")
    assert "(unresolved, off the front)" in table[4] and "no measurable change" in table[4]
    assert table[-1] == report.UNRESOLVED_NOTE
    assert report.UNRESOLVED not in report.format_table([base, fast], BASE)
