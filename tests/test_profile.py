"""`--profile`: the top operators by self time of a recipe's transcription, printed and written
by `sweep.evaluate` (the sweep's MLflow artifacts are tested with its figures, test_figures_rows).
"""

import json

from sweep import evaluate  # the command (its measuring: sweep.measure.evaluate)
from sweep.measure.profile import ProfileOptions


def _argv(tiny_checkpoint, small_manifest, *extra):
    return ["--model", tiny_checkpoint, "--dataset", small_manifest, "--language", "ru",
            "--max-samples", "2", "--warmup", "0", *extra]


def test_evaluate_profile_prints_and_writes_the_top_operators(tiny_checkpoint, small_manifest,
                                                              tmp_path, capfd):
    out = tmp_path / "r.json"
    rc = evaluate.main(_argv(tiny_checkpoint, small_manifest, "--recipe",
                             "quant.scheme=dynamic_int8", "--profile", "6", "--profile-clips",
                             "2", "--json", str(out)))
    assert rc == 0
    captured = capfd.readouterr()
    printed = captured.out
    assert "USDT:" not in captured.err and "profiler_start" not in captured.err  # kineto's
    data = json.loads(out.read_text())
    prof = data["profile"]
    assert prof["clips"] == 2 and prof["top"] == 6 and len(prof["rows"]) == 6
    selfs = [r["self_cpu_s"] for r in prof["rows"]]
    assert selfs == sorted(selfs, reverse=True) and selfs[-1] > 0
    assert all(0 < r["self_share"] <= 1 and r["cpu_total_s"] >= r["self_cpu_s"] - 1e-9
               and r["calls"] >= 1 for r in prof["rows"])
    # the int8 recipe's own kernels show up among the operators of its decoding
    text = out.with_suffix(".profile.txt").read_text()
    assert text.splitlines()[0] in printed and len(text.splitlines()) == 2 + 6
    assert any("quantized" in r["name"] or "linear" in r["name"] for r in prof["rows"])
    # and the JSON says which machine it was measured on
    assert data["cpu"] and isinstance(data["isa"], list) and "isa_cap" in data


def test_profile_refuses_bad_counts_before_any_work(tiny_checkpoint, small_manifest, capsys):
    rc = evaluate.main(_argv(tiny_checkpoint, small_manifest, "--profile", "5",
                             "--profile-clips", "0"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "`--profile` clips must be an integer >= 1, got clips=0" in err
    assert "evaluating" not in err  # refused before the model was measured
    assert ProfileOptions().top == 20
