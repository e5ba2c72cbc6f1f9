"""bench.gpu, the prepared GPU check of #17, dry-run on CPU on tiny shapes so that it does not
rot: the same command, with the packages the GPU machine lacks blocked."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu, gpu_prepare
from sweep.measure import scoring
from sweep.inputs.data import shared_dir

REPO = Path(__file__).resolve().parents[1]
# Absent on the GPU machine: importing any of them there fails, so here too.
BLOCKED = ("ray", "mlflow", "jiwer", "soundfile", "num2words", "torchao", "bitsandbytes")
SELECTED = ("baseline", "quant.scheme=bf16", "decode.loop=greedy", "quant.scheme=fp16")
WORKER = "quant.scheme=fp16"  # the gpu space's first warm start: the worker-path trial's recipe
needs_shared = pytest.mark.skipif(shared_dir() is None,
                                  reason="needs the shared speech set ($HYPER_SHARED or ../shared)")


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    out = tmp_path_factory.mktemp("carry") / "gpu_carry"
    info = gpu_prepare.prepare(gpu_prepare.Options(source="random:tiny", out=out, max_clips=2,
                                                        max_clip_s=2.0))
    assert info["clips"] == 2 and info["mib"] < gpu_prepare.CARRY_LIMIT_MIB
    return out


def _results_state():
    return {n: (p.stat().st_mtime_ns if p.exists() else None)
            for n in ("gpu.json", "gpu.md") for p in [REPO / "bench" / "results" / n]}


@needs_shared
def test_dry_run_on_cpu_without_the_missing_packages(carry, tmp_path):
    before = _results_state()
    out = tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--carry", str(carry), "--out", str(out),
            *(a for name in SELECTED for a in ("--only", name))]
    code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({BLOCKED!r})); "
            f"sys.argv = ['bench.gpu', *{args!r}]; runpy.run_module('bench.gpu', "
            "run_name='__main__')")
    # one thread: on a loaded 2-core machine, two spinning threads per process cost 5x
    env = {**os.environ, "HYPER_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results_state() == before  # a dry run never writes the GPU's results
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu-dryrun-cpu-worker-trial.json", "gpu-dryrun-cpu.json", "gpu-dryrun-cpu.md"]
    doc = json.loads((out / "gpu-dryrun-cpu.json").read_text())
    assert {"gpu", "driver", "versions", "rows", "study_comparison", "models"} <= set(doc)
    assert doc["kind"].startswith("cpu dry run") and doc["gpu"]["device"] == "cpu"
    rows = {(r["variant"], r["part"], r["batch"]): r for r in doc["rows"]}
    names = [v.name for v in gpu.variants("gpu")]
    for name in names:  # every recipe value: an accuracy row, a latency row per batch size
        for key in [(name, "accuracy", 1), (name, "latency", 1), (name, "latency", 2)]:
            r = rows.pop(key)
            assert r["status"] in ("ok", "skipped"), r
            if name in SELECTED:
                assert r["status"] == "ok", r
            else:
                assert r["status"] == "skipped" and r["reason"], r
            if any(x in name for x in ("bnb_", "2:4", "prune.rate=0.5", "reduce-overhead")):
                assert r["why"] == "needs cuda" and "device=cuda" in r["reason"], r
            if "int8_weight_only" in name or "int4" in name:
                assert r["why"] == "package missing" and "torchao" in r["reason"], r
    # the trial a sweep's GPU worker runs (sweep.search.worker.run_one), logged to JSON
    wrk = rows.pop((WORKER, "worker", 1))
    assert wrk["status"] == "ok", wrk
    n = doc["models"]["accuracy"]["clips"]  # --tiny: 1 of the 2 carried
    assert wrk["logged_status"] == "FINISHED" and wrk["transcripts"] == n
    assert 0 <= wrk["wer"] and wrk["speedup"] > 0 and wrk["worker_prepare_s"] > 0
    log = json.loads((out / wrk["log"]).read_text())
    assert log["params"]["quant.scheme"] == "fp16" and log["params"]["device"] == "cpu"
    assert {"wer", "dwer", "speedup", "latency_median_s", "trial_s"} <= set(log["metrics"])
    assert log["tags"]["device"] == "cpu" and log["tags"]["kernels"]
    assert [u["id"] for u in log["transcripts"]] == [
        u["id"] for u in map(json.loads, (carry / "clips" / "manifest.jsonl").read_text()
                             .splitlines())][:n]
    assert not rows  # nothing but those
    for name in SELECTED:
        lat = [doc["rows"][i] for i, r in enumerate(doc["rows"])
               if r["variant"] == name and r["part"] == "latency"]
        assert all(r["tokens_decoded"] == [4] and r["s_per_window"] > 0
                   and r["ms_per_token"] is not None for r in lat), lat
    acc = next(r for r in doc["rows"] if r["variant"] == "quant.scheme=bf16"
               and r["part"] == "accuracy")
    assert 0 <= acc["wer"] and len(acc["hypotheses"]) == 1 and acc["kernels"]
    md = (out / "gpu-dryrun-cpu.md").read_text()
    assert "## Accuracy" in md and "## Latency" in md and "needs cuda" in md
    assert "## A sweep's worker path" in md


def test_a_cpu_run_refuses_the_results_folder(tmp_path):
    (tmp_path / "CARRY.json").write_text("{}")
    with pytest.raises(SystemExit, match="never writes there"):
        gpu.main(["--device", "cpu", "--carry", str(tmp_path), "--out",
                  str(REPO / "bench" / "results")])


def test_cheap_rows_first_and_time_left_out_with_its_reason():
    vs = gpu.variants("gpu")
    tasks = gpu.plan(vs, gpu.worker_variant(vs, "gpu"))
    assert [t.variant.name for t in tasks if t.part == "worker"] == [WORKER]
    costs = [t.variant.cost for t in tasks]
    assert costs == sorted(costs) and tasks[0].variant.name == "baseline"
    assert tasks[-1].variant.flat == {"compile.mode": "max-autotune"}
    late = gpu.out_of_time(tasks[-1], remaining=30, tiny=False)
    assert late.startswith("device time:") and "30 s" in late
    assert gpu.out_of_time(tasks[0], remaining=30, tiny=False) is None


def test_fallback_scorer_counts_as_jiwer(monkeypatch):
    words = "a b c ab ba abc".split()
    rng = random.Random(0)
    pairs = [(" ".join(rng.choices(words, k=rng.randint(1, 7))),
              " ".join(rng.choices(words, k=rng.randint(0, 7)))) for _ in range(300)]
    pairs += [("hello world", ""), ("set kitchen lights to green", "set the kitchen light green")]
    with_jiwer = [scoring.utt_errors(r, h) for r, h in pairs]
    monkeypatch.setitem(sys.modules, "jiwer", None)
    assert [scoring.utt_errors(r, h) for r, h in pairs] == with_jiwer
    assert scoring.edit_distance("kitten", "sitting") == 3
