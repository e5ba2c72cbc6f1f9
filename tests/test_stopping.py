"""Accuracy-aware early stopping: the sequential paired test stops what clearly cannot be
feasible and, over repeated looks, almost never what is within budget; a stopped trial keeps its
partial figures; the resolution warning; hallucination probes."""

import numpy as np
import pytest

from sweep.measure import stopping
from sweep.measure.stopping import EarlyStop, Infeasible, Loops, Stopper, TooSlow

N_CLIPS = 40
WORDS = 20  # words per clip


def _rows(rng, p_err: float, n=N_CLIPS, loop=False) -> list[dict]:
    """Clips whose hypotheses have binomial(WORDS, p_err) substituted words of a reference."""
    rows = []
    for i in range(n):
        ref = [f"w{i}_{k}" for k in range(WORDS)]
        bad = rng.random(WORDS) < p_err
        hyp = [f"x{k}" if b else w for k, (w, b) in enumerate(zip(ref, bad))]
        rows.append({"ref_norm": " ".join(ref), "hyp_norm": " ".join(hyp), "loop": loop,
                     "latency_s": 1.0, "duration_s": 3.0})
    return rows


def _stopped_at(base, trial, rule) -> int | None:
    """The clip count at which `rule` stops `trial`, or None when it runs to the end."""
    s = Stopper(base, len(trial), rule)
    for n in range(1, len(trial) + 1):
        try:
            s.check(trial[:n])
        except stopping.Stopped:
            return n
    return None


def test_looks_double_from_min_clips_and_share_alpha():
    rule = EarlyStop(max_dwer=0.1, min_clips=4)
    assert rule.looks(40) == [4, 8, 16, 32]
    assert rule.looks(4) == []  # the last clip is not a look: the trial is complete
    assert Stopper([], 40, rule).alpha_each == pytest.approx(0.05 / 4)


@pytest.mark.parametrize("bad, match", [
    (dict(min_clips=0), r"`early_stop.min_clips` must be >= 1, got self.min_clips=0"),
    (dict(alpha=1.5), r"`early_stop.alpha` must be in \(0, 1\)"),
    (dict(loop_share=0), r"`early_stop.loop_share` must be in \(0, 1\]"),
    (dict(loop_run=-1), r"`early_stop.loop_run` must be >= 0"),
])
def test_bad_rules_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        EarlyStop(**bad)


def test_resolve_follows_the_flag_and_the_budget():
    assert stopping.resolve("auto", 0.1, 4).enabled
    assert not stopping.resolve("auto", None, 4).enabled  # no budget: nothing to test against
    assert stopping.resolve("on", None, 4).enabled
    assert not stopping.resolve("off", 0.1, 4).enabled
    with pytest.raises(ValueError, match="`--early-stop` must be one of auto, on, off"):
        stopping.resolve("maybe", 0.1, 4)


def test_clearly_over_budget_is_stopped_and_just_inside_never():
    """Budget max_dwer +10%, baseline 10% word errors. A trial at 30% (+200%) is stopped, early;
    one at 10.5% (+5%, inside the budget) is stopped in at most alpha of 200 repeated sets."""
    rule = EarlyStop(max_dwer=0.1, min_clips=4)
    rng = np.random.default_rng(0)
    over, inside = [], []
    for _ in range(200):
        base = _rows(rng, 0.10)
        if len(over) < 30:
            over.append(_stopped_at(base, _rows(rng, 0.30), rule))
        inside.append(_stopped_at(base, _rows(rng, 0.105), rule))
    assert all(n is not None and n <= 16 for n in over), over
    assert sum(n is not None for n in inside) / len(inside) <= rule.alpha, inside


def test_a_recipe_that_loops_on_every_clip_stops_within_four_clips():
    rng = np.random.default_rng(1)
    base, trial = _rows(rng, 0.1), _rows(rng, 0.1, loop=True)
    # the default: no budget needed, stopped once its first 2 clips both loop
    assert _stopped_at(base, trial, EarlyStop()) == 2
    with pytest.raises(Loops, match="loops or transcribes nothing on each of its first 2 clips"):
        Stopper(base, N_CLIPS, EarlyStop()).check(trial[:2])
    assert _stopped_at(base, trial, EarlyStop(loop_run=0)) == 4  # at the first look only
    s = Stopper(base, N_CLIPS, EarlyStop(loop_run=0))
    with pytest.raises(Loops, match="loops or transcribes nothing on 4 of the first 4 clips"):
        s.check(trial[:4])
    # a model that says nothing is as broken, budget or not
    silent = [{**r, "hyp_norm": ""} for r in _rows(rng, 0.1)]
    assert _stopped_at(base, silent, EarlyStop()) == 2
    # one of the first two clips looping is no proof: the looks decide
    mixed = [trial[0], *_rows(rng, 0.1, n=N_CLIPS - 1)]
    assert _stopped_at(base, mixed, EarlyStop()) is None
    # loops the baseline has too are not the recipe's fault
    looping_base = _rows(rng, 0.1, loop=True)
    assert _stopped_at(looping_base, trial, EarlyStop()) is None


def test_off_never_stops_for_accuracy_but_slowness_still_does():
    rng = np.random.default_rng(2)
    base, trial = _rows(rng, 0.1), _rows(rng, 0.9, loop=True)
    assert _stopped_at(base, trial, EarlyStop(enabled=False, max_dwer=0.0)) is None
    slow = [{**r, "latency_s": 5.0} for r in trial]
    s = Stopper(base, N_CLIPS, EarlyStop(enabled=False), max_slowdown=3.0)
    with pytest.raises(TooSlow, match="5.0x slower than the baseline on the first 2 clips"):
        for n in range(1, 4):
            s.check(slow[:n])


def test_over_budget_names_the_bound_and_the_budget():
    rng = np.random.default_rng(3)
    base, trial = _rows(rng, 0.1), _rows(rng, 0.6)
    with pytest.raises(Infeasible, match=r"dWER >= \+\d+\.\d% \(one-sided 98\.8% bound\) on the "
                                         r"first 16 clips, over the budget max_dwer \+10\.0%"):
        Stopper(base, N_CLIPS, EarlyStop(max_dwer=0.1)).check(trial[:16])


# --- on the tiny model: a stopped trial's result ---------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, small_manifest):
    from sweep.inputs.data import load_eval_set
    from sweep.inputs.models import load_model
    from sweep.measure.evaluate import measure

    lm = load_model(tiny_checkpoint)
    evalset = load_eval_set(small_manifest)
    return lm, evalset, measure(lm.model, lm.processor, evalset, warmup=0)


def test_a_stopped_trial_keeps_its_partial_figures(tiny):
    from sweep.inputs.probes import probes
    from sweep.measure.evaluate import MeasureOptions, run_trial
    from sweep.techniques.recipe import Recipe

    lm, evalset, base = tiny
    recipe = Recipe.parse("prune.rate=0.25")
    # a budget no trial can meet (90% fewer errors than the baseline): stopped at the first look
    res, _ = run_trial(lm.model, lm.processor, evalset, recipe,
                       MeasureOptions(warmup=0, early_stop=EarlyStop(max_dwer=-0.9, min_clips=2)),
                       baseline=base, probes=probes(seconds=1.0)[:2])
    assert res["status"] == "pruned" and res["stop_kind"] == "over_budget"
    assert res["clips_measured"] == 2 < len(evalset)
    assert "over the budget max_dwer -90.0%" in res["stop_reason"]
    assert len(res["utterances"]) == 2 and res["probes"] == []  # probes skipped after a stop
    assert "hallucination_rate" not in res
    for k in ("wer", "cer", "dwer", "speedup", "latency_median_s"):
        assert np.isfinite(res[k]), k
    # a budget anything meets: never stopped, the whole set, probes heard
    res, _ = run_trial(lm.model, lm.processor, evalset, recipe,
                       MeasureOptions(warmup=0, early_stop=EarlyStop(max_dwer=100.0, min_clips=2)),
                       baseline=base, probes=probes(seconds=1.0)[:2])
    assert res["status"] == "ok" and res["clips_measured"] == len(evalset)
    assert 0.0 <= res["hallucination_rate"] <= 1.0 and len(res["probes"]) == 2


def test_probes_decode_only_their_first_tokens(tiny):
    """A probe answers "is any word heard?": decoding stops at `PROBE_TOKENS`, well before the
    clip's own cap (28 tokens for 1 s), which the random tiny model reaches on every clip."""
    from sweep.inputs.probes import probes
    from sweep.measure import evaluate

    lm, _, _ = tiny
    heard = probes(seconds=1.0)[:3]
    rate, texts = evaluate.hallucinations(lm.model, lm.processor, heard, language="en")
    lengths = [len(lm.processor.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    assert rate == 1.0 and len(texts) == 3  # the random model "hears" words in all of them
    assert max(lengths) <= evaluate.PROBE_TOKENS + 2, lengths  # re-tokenizing may split a few
    full = evaluate.transcribe(lm.model, lm.processor, heard[0], language="en")[1]
    assert len(full) > evaluate.PROBE_TOKENS + 2  # uncapped, the same probe runs on


def test_on_the_tiny_model_clearly_over_is_stopped_and_just_inside_never(tiny):
    """Budgets around a recipe's own measured dWER: just inside it the trial runs every clip
    (and measures the same), far below it the trial stops at the first look."""
    from sweep.measure.evaluate import MeasureOptions, run_trial
    from sweep.techniques.recipe import Recipe

    lm, evalset, base = tiny
    recipe = Recipe.parse("prune.rate=0.25")
    full, _ = run_trial(lm.model, lm.processor, evalset, recipe,
                        MeasureOptions(warmup=0, early_stop=EarlyStop(enabled=False)),
                        baseline=base)
    d = full["dwer"]
    inside, _ = run_trial(lm.model, lm.processor, evalset, recipe,
                          MeasureOptions(warmup=0,
                                         early_stop=EarlyStop(max_dwer=d + 0.01, min_clips=2)),
                          baseline=base)
    assert inside["status"] == "ok" and inside["clips_measured"] == len(evalset)
    assert inside["dwer"] == d
    over, _ = run_trial(lm.model, lm.processor, evalset, recipe,
                        MeasureOptions(warmup=0,
                                       early_stop=EarlyStop(max_dwer=d - 1.0, min_clips=2)),
                        baseline=base)
    assert over["status"] == "pruned" and over["stop_kind"] == "over_budget"
    assert over["clips_measured"] == 2


def test_a_broken_cheap_part_is_stopped_before_compiling_or_calibrating(tiny, monkeypatch):
    """The first look measures the recipe without its costly preparation; when that already
    fails the accuracy test, nothing is compiled and no calibration clip is decoded."""
    from sweep.measure import evaluate
    from sweep.measure.compress import recompile_count
    from sweep.techniques.recipe import Recipe

    lm, evalset, base = tiny
    calls = []
    real_calibrator = evaluate.calibrator
    monkeypatch.setattr(evaluate, "calibrator", lambda *a: calls.append(a) or real_calibrator(*a))
    for text in ("prune.rate=0.25,decode.loop=greedy,decode.compile=step",
                 "prune.rate=0.25,quant.scheme=static_int8"):
        graphs = recompile_count()
        res, _ = evaluate.run_trial(lm.model, lm.processor, evalset, Recipe.parse(text),
                                    evaluate.MeasureOptions(
                                        warmup=0, early_stop=EarlyStop(max_dwer=-0.9, min_clips=2)),
                                    baseline=base, calibration=evalset)
        assert res["status"] == "pruned" and res["stop_kind"] == "over_budget", text
        assert res["stop_reason"].startswith("first look, before compiling or calibrating: "
                                             "its cheap part (prune l1 0.25"), res["stop_reason"]
        assert res["clips_measured"] == 2 and res["recipe"] == Recipe.parse(text).to_flat()
        assert recompile_count() == graphs and calls == []
    # within budget: the first look passes and the recipe itself is prepared and measured
    res, _ = evaluate.run_trial(lm.model, lm.processor, evalset,
                                Recipe.parse("prune.rate=0.25,quant.scheme=static_int8"),
                                evaluate.MeasureOptions(
                                    warmup=0, early_stop=EarlyStop(max_dwer=100.0, min_clips=2)),
                                baseline=base, calibration=evalset)
    assert res["status"] == "ok" and res["clips_measured"] == len(evalset) and len(calls) == 1
    # nothing costly, or nothing cheap to look at: no first look
    assert Recipe.parse("prune.rate=0.25").cheap() is None
    assert Recipe.parse("quant.scheme=static_int8,encoder.compile=default").cheap() is None


def test_confidence_gives_an_upper_bound_above_the_point_estimate(tiny):
    from sweep.measure.evaluate import MeasureOptions, run_trial
    from sweep.techniques.recipe import Recipe

    lm, evalset, base = tiny
    res, _ = run_trial(lm.model, lm.processor, evalset, Recipe.parse("prune.rate=0.25"),
                       MeasureOptions(warmup=0, confidence=0.9), baseline=base)
    lo, hi = res["dwer_ci95"]
    assert lo <= res["dwer_upper"] <= hi + 1e-12  # one-sided 90% lies inside two-sided 95%


# --- probes and the resolution warning -------------------------------------------------------


def test_probes_are_non_speech_and_deterministic(tmp_path):
    from sweep.inputs import probes as P

    a, b = P.probes(), P.probes()
    assert [p.id for p in a] == [f"probe:{n}" for n in P.PROBES]
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b))
    assert all(p.text == "" and p.audio.dtype == np.float32 for p in a)
    assert not a[0].audio.any()  # digital silence
    rms = {p.id: float(np.sqrt(np.mean(p.audio.astype(float) ** 2))) for p in a}
    assert rms["probe:white-20dB"] == pytest.approx(0.1, rel=0.05)
    assert rms["probe:white-60dB"] == pytest.approx(0.001, rel=0.05)
    assert P.main(["--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.wav"))) == len(P.PROBES)
    with pytest.raises(ValueError, match="probe `seconds` must be > 0"):
        P.probes(seconds=0)


def test_resolution_warning_names_the_clips_a_budget_needs():
    from sweep.results.summary import clips_to_resolve, resolution_warning
    from sweep.search.space import space_from_dict

    tight = space_from_dict({"params": {"prune.rate": {"float": [0.0, 0.3]}},
                             "constraints": {"max_dwer": 0.02}})
    (line,) = resolution_warning(tight, 19)
    assert "19 clips resolve dWER to about +-23%" in line
    assert "about 2500 clips would resolve it" in line
    loose = space_from_dict({"params": {"prune.rate": {"float": [0.0, 0.3]}},
                             "constraints": {"max_dwer": 0.25}})
    assert resolution_warning(loose, 40) == []
    assert clips_to_resolve(0.2, 19, 0.1) == 76


def test_t_quantile_without_scipy_is_close(monkeypatch):
    import sys

    exact = [stopping.t_quantile(0.9875, df) for df in (3, 7, 15, 31)]
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as on a bare GPU machine
    approx = [stopping.t_quantile(0.9875, df) for df in (3, 7, 15, 31)]
    assert approx == pytest.approx(exact, rel=0.02)


def test_rungs_parse_place_and_judge():
    assert stopping.parse_rungs("0.5,0.25") == (0.25, 0.5)
    assert stopping.parse_rungs(None) == ()
    for bad in ("0.5,1", "x", "0"):
        with pytest.raises(ValueError, match=r"`--rungs` must be shares of the set in \(0, 1\)"):
            stopping.parse_rungs(bad)
    assert stopping.rung_points((0.25, 0.5), 40) == [10, 20]
    assert stopping.rung_points((0.1, 0.5), 3) == [2]  # at least 2 clips, never the last
    mine = {"dwer": 0.05, "speedup": 1.5}
    assert stopping.rung_verdict(mine, [], 0.1) is None
    assert "over the budget" in stopping.rung_verdict(mine, [], 0.02)
    beat = {"dwer": 0.01, "speedup": 2.0, "trial_id": "a"}
    assert "dominated by trial a" in stopping.rung_verdict(mine, [beat], None)
    trade = {"dwer": 0.0, "speedup": 1.2, "trial_id": "b"}  # better WER, slower: not dominated
    assert stopping.rung_verdict(mine, [trade, dict(mine)], None) is None


def test_a_rung_judge_stops_the_trial_with_its_reason():
    rng = np.random.default_rng(4)
    base, trial = _rows(rng, 0.1), _rows(rng, 0.1)
    seen = []

    def judge(n, figs):
        seen.append((n, sorted(figs)))
        if n == 20:
            raise stopping.Dominated("at the rung of 20 clips: test")

    s = Stopper(base, N_CLIPS, EarlyStop(enabled=False), rungs=(0.25, 0.5), judge=judge)
    with pytest.raises(stopping.Dominated):
        for n in range(1, N_CLIPS + 1):
            s.check(trial[:n])
    assert seen == [(10, ["dwer", "speedup"]), (20, ["dwer", "speedup"])]
