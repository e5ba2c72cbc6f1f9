"""The evaluation core and `python -m sweep.evaluate`, on a tiny model and the real one."""

import json

import pytest

from sweep.evaluate import main as evaluate_main
from sweep.measure import evaluate
from sweep.inputs.data import load_eval_set
from sweep.techniques.recipe import Recipe

FIGURE_KEYS = {"wer", "cer", "dwer", "dcer", "latency_mean_s", "latency_median_s", "speedup",
               "loops", "kernels", "recipe", "baseline", "latency_p90_s", "rtf",
               "model_size_mb", "sparsity", "threads", "compile_s", "recompiles", "dwer_ci95"}


def _real_ru(manifest):
    """The real (not synthetic) Russian clips of the shared set."""
    kinds = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        kinds[rec["audio"]] = (rec["kind"], rec["lang"])
    full = load_eval_set(str(manifest), language="ru")
    full.utterances = [u for u in full.utterances if kinds.get(u.id, ("", ""))[0] == "real"]
    return full


def test_measure_tiny_model_reports_every_figure(tiny_checkpoint, small_manifest):
    from sweep.inputs.models import load_model

    lm = load_model(tiny_checkpoint)
    ev = load_eval_set(small_manifest)
    m = evaluate.measure(lm.model, lm.processor, ev, warmup=0)
    f = m.figures
    assert len(m.utterances) == len(ev) == 3
    assert f["latency_median_s"] > 0 and f["rtf"] > 0 and f["model_size_mb"] > 0
    assert f["wer"] >= 0.9  # random weights transcribe nothing right
    # Random weights run to the token cap: every clip counts as a loop.
    assert f["loops"] == sum(u["loop"] for u in m.utterances) == 3
    assert f["numbers"] == ["words"]


def test_language_is_required_when_utterances_lack_it(tiny_model, tmp_path):
    from sweep.inputs.data import EvalSet, Utterance
    from sweep.inputs.models import load_model

    ev = EvalSet(name="x", utterances=[Utterance("a", __import__("numpy").zeros(16000, "float32"),
                                                 "да", None, 1.0)], skipped=0, skipped_reasons=[])
    proc = load_model("random:tiny").processor
    with pytest.raises(ValueError, match="pass --language"):
        evaluate.measure(tiny_model, proc, ev)


def test_cli_writes_trial_json_with_baseline(tiny_checkpoint, small_manifest, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = evaluate_main(["--model", tiny_checkpoint, "--dataset", small_manifest, "--recipe",
                        "quant.scheme=dynamic_int8,prune.rate=0.3", "--json", str(out),
                        "--threads", "1", "--warmup", "0"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert FIGURE_KEYS <= set(d)
    assert d["recipe"]["quant.scheme"] == "dynamic_int8" and d["recipe"]["prune.rate"] == 0.3
    assert d["threads"] == 1 and d["kernels"]
    assert d["sparsity"] == pytest.approx(0.3, abs=0.02)
    assert d["speedup"] == pytest.approx(d["baseline"]["latency_median_s"]
                                         / d["latency_median_s"])
    text = capsys.readouterr().out
    assert "Configuration" in text and "dWER" in text and "baseline" in text


def test_cli_refuses_bad_recipe_before_loading(tmp_path, capsys):
    rc = evaluate_main(["--model", "random:tiny", "--recipe", "prune.rtae=0.3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "prune.rtae" in err and "prune.rate" in err


@pytest.mark.slow
def test_real_model_baseline_wer_on_real_russian_speech(real_model, speech_manifest):
    ev = _real_ru(speech_manifest)
    assert len(ev) >= 10
    m = evaluate.measure(real_model.model, real_model.processor, ev, warmup=0)
    assert m.figures["wer"] <= 0.45, m.figures
    assert m.figures["loops"] == 0


@pytest.mark.slow
def test_real_model_dynamic_int8_keeps_wer(real_model, speech_manifest):
    ev = _real_ru(speech_manifest)
    res, base = evaluate.run_trial(real_model.model, real_model.processor, ev,
                                   Recipe.parse("quant.scheme=dynamic_int8"),
                                   evaluate.MeasureOptions(warmup=1))
    assert res["wer"] <= 1.25 * base.figures["wer"], (res["wer"], base.figures["wer"])
    assert res["kernels"] and set(res["kernels"]) >= {"enc_attn", "dec_mlp"}
    lo, hi = res["dwer_ci95"]
    assert lo <= res["dwer"] <= hi


def test_a_trial_far_slower_than_the_baseline_is_stopped_early(tiny_checkpoint, small_manifest):
    from sweep.inputs.models import load_model

    lm = load_model(tiny_checkpoint)
    ev = load_eval_set(small_manifest)
    base = evaluate.measure(lm.model, lm.processor, ev, warmup=0)
    seen = []
    res, _ = evaluate.run_trial(lm.model, lm.processor, ev, Recipe.parse("prune.rate=0.1"),
                                evaluate.MeasureOptions(warmup=0, max_slowdown=1e-6),
                                baseline=base, progress=lambda done, total: seen.append(done))
    # A stopped trial is returned, not raised: what it measured is kept and logged as pruned.
    assert res["status"] == "pruned" and res["stop_kind"] == evaluate.TooSlow.kind
    assert "slower than the baseline on the first 2 clips" in res["stop_reason"]
    assert seen == [1, 2] and res["n_utterances"] == 2  # stopped before the third clip
    res, _ = evaluate.run_trial(lm.model, lm.processor, ev, Recipe.parse("prune.rate=0.1"),
                                evaluate.MeasureOptions(warmup=0, max_slowdown=1e6),
                                baseline=base)
    assert res["n_utterances"] == 3


@pytest.mark.parametrize("recipe, compiles", [
    ("encoder.compile=default", True), ("decode.loop=greedy,decode.compile=step", True),
    ("decode.loop=greedy,decode.compile=script", False), ("quant.scheme=dynamic_int8", False)])
def test_compile_time_is_reported_for_every_compiling_recipe(tiny_checkpoint, small_manifest,
                                                             recipe, compiles):
    """compile_s (the warm-up pass beyond a steady one) for whatever torch.compile's: the
    stacks, the encoder alone or the greedy step; 0 for eager recipes."""
    from sweep.inputs.models import load_model

    lm = load_model(tiny_checkpoint)
    ev = load_eval_set(small_manifest)
    ev.utterances = ev.utterances[:1]
    r = Recipe.parse(recipe)
    assert r.compiles is compiles
    result, _ = evaluate.run_trial(lm.model, lm.processor, ev, r,
                                   evaluate.MeasureOptions(threads=1))
    assert (result["compile_s"] > 0) is compiles


def test_every_encoder_window_is_warmed_before_timing(tiny_checkpoint, small_manifest):
    """The auto window gives clips of other lengths other encoder shapes: a compiled encoder
    builds its graphs in the warm-up, none while timing; the scripted step traces once for them all
    (issue #19: compiling at the first clips made the frozen encoder look 6x slower)."""
    import copy
    import dataclasses

    import numpy as np

    from sweep.inputs.models import load_model
    from sweep.measure import decode, window
    from sweep.measure.compress import apply_recipe, recompile_count

    lm = load_model(tiny_checkpoint)
    ev = load_eval_set(small_manifest)
    u = ev.utterances
    # 1.4 s, 2.9 s, 4.4 s: windows of 2, 3 and 5 s with 1 s buckets
    ev.utterances = [u[0], *(dataclasses.replace(x, audio=np.concatenate([x.audio] * k),
                                                 duration_s=x.duration_s * k)
                             for x, k in ((u[0], 2), (u[0], 3)))]
    applied = apply_recipe(copy.deepcopy(lm.model), Recipe.parse(
        "decode.loop=greedy,decode.compile=script,encoder.window=auto,encoder.bucket_s=1,"
        "encoder.compile=default"))
    full = window.full_frames(applied.model)
    windows = {applied.options.window.frames(x.duration_s, full) for x in ev}
    assert len(windows) == 3
    traces = decode.runtime(applied.model, applied.options).step.traces
    at_warm = {}
    m = evaluate.measure(applied.model, lm.processor, ev, language="ru", warmup=1,
                         options=applied.options,
                         on_warmed=lambda: at_warm.update(graphs=recompile_count(),
                                                          traces=len(traces)))
    assert m.figures["warm_windows"] == 2 and m.figures["warm_windows_s"] > 0
    assert at_warm["traces"] == 2  # the prompt step and the next, one pair for every window
    assert len(traces) == at_warm["traces"] and recompile_count() == at_warm["graphs"]
    # warmup=0 (the baseline, first looks): no pass at all before timing
    bare = evaluate.measure(lm.model, lm.processor, ev, language="ru", warmup=0)
    assert bare.figures["warm_windows"] == 0
