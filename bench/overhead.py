"""`python -m bench.overhead`: what a sweep costs beyond its trials' own work.

Runs `python -m sweep.launch` for 1 and 2 concurrent trials, reads its summary.json (wall_s:
the time inside Tune; trial_sum_s: the trials' own seconds) and every trial's figures (MLflow
metrics, plus Tune's result.json for what MLflow lacks), and splits a trial's cost into
measuring, recipe preparation, worker preparation (model + data + baseline, once per worker),
MLflow logging and Ray/Tune scheduling. MLflow logging and `ray.init` are also timed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import common

ENV = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
       "MLFLOW_DISABLE_TELEMETRY": "true"}


def time_ray_init() -> float:
    """`ray.init` of a local 2-CPU Ray, in a fresh process (as the launcher does it)."""
    code = ("import time, ray\nfrom sweep.search.sampler import init_ray\nt = time.perf_counter()\n"
            "init_ray(None)\nprint(time.perf_counter() - t)\nray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **ENV}, cwd=common.REPO, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_mlflow(n: int = 5, n_utts: int = 8) -> dict[str, list[float]]:
    """Seconds of begin_trial and of finish_trial for one trial with a realistic result (the
    trial's clock, trial_s, includes begin_trial but stops before finish_trial)."""
    from sweep.results import figures, tracking

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = tracking.default_uri(root)
        exp = tracking.ensure_experiment(uri, root / "artifacts")
        parent = tracking.start_parent(uri, exp, "bench", {"space": "quick"}, {})
        utts = [{"id": f"u{i}", "lang": "ru", "reference": "повтори еще раз",
                 "hypothesis": "Повтори еще раз.", "latency_s": 0.5, "tokens": 8, "loop": False}
                for i in range(n_utts)]
        result = {f.name: 0.5 for f in figures.FIGURES if f.kind != "pair"} | {
            "dwer_ci95": [0.0, 0.1], "baseline": {"wer": 0.5, "latency_median_s": 0.8},
            "kernels": {"enc_attn": "fp32"}, "device": "cpu", "utterances": utts}
        secs = {"begin": [], "finish": []}
        for i in range(n):
            t0 = time.perf_counter()
            run_id, _ = tracking.begin_trial(uri, exp, parent, "bench", f"t{i}",
                                             {"device": "cpu", "prune.rate": 0.1}, {"cpus": 2})
            t1 = time.perf_counter()
            tracking.finish_trial(uri, run_id, result)
            secs["begin"].append(t1 - t0)
            secs["finish"].append(time.perf_counter() - t1)
    return secs


def run_sweep(root: Path, name: str, concurrency: int, args) -> tuple[dict, list[dict], float]:
    """(summary.json, trial rows, command seconds) of one real sweep."""
    from sweep.results import tracking

    cmd = [sys.executable, "-m", "sweep.launch", "--space", args.space, "--num-samples",
           str(args.num_samples), "--max-concurrent", str(concurrency), "--root", str(root),
           "--name", name, "--model", args.model, "--dataset", args.dataset,
           "--max-samples", str(args.max_samples), "--seed", "0",
           "--max-slowdown", "0"]  # every trial measured to the end: no pruning on noise
    root.mkdir(parents=True, exist_ok=True)
    log = root / "launch.log"  # the sweep's own progress lines, to follow a slow run
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                              cwd=common.REPO, timeout=args.timeout)
    command_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{log.read_text()[-2000:]}")
    summary = json.loads((root / "sweeps" / name / "results" / "summary.json").read_text())
    uri = tracking.default_uri(root)
    rows = tracking.sweep_rows(uri, tracking.ensure_experiment(uri, root / "artifacts"), name)
    tune = tune_results(root / "sweeps" / name)
    for r in rows:  # Tune's record has what MLflow lacks (a failed trial's worker_prepare_s)
        for k in ("worker_prepare_s", "trial_s"):
            if r.get(k) is None:
                r[k] = tune.get(r["trial_id"], {}).get(k)
    return summary, rows, command_s


def tune_results(sweep_dir: Path) -> dict[str, dict]:
    """trial_key -> the last result Tune recorded for it."""
    out = {}
    for path in sweep_dir.glob("*/result.json"):
        lines = [x for x in path.read_text().splitlines() if x.strip()]
        if lines:
            res = json.loads(lines[-1])
            out[res.get("trial_key") or res.get("trial_id")] = res
    return out


def split_costs(summary: dict, rows: list[dict], concurrency: int, command_s: float,
                mlflow: dict) -> dict:
    """Per-trial seconds by cost, and the overhead ratio wall / (trial seconds / concurrency)
    (1.0: the sweep costs nothing beyond its trials). `mlflow`: {"begin": s, "finish": s};
    begin_trial runs inside trial_s, finish_trial after it (so inside Tune's share)."""
    n = max(len(rows), 1)
    wall = float(summary["wall_s"])
    # Every trial's own seconds, failed and pruned ones too (summary.json's trial_sum_s counts
    # only what MLflow holds, and MLflow has no trial_s for those).
    trial, prep, worker = (np.array([float(r.get(k) or 0) for r in rows]) for k in (
        "trial_s", "prepare_s", "worker_prepare_s"))
    tsum = float(trial.sum()) or float(summary["trial_sum_s"])
    measure = np.maximum(0.0, trial - prep - worker - mlflow["begin"])
    per_trial = {
        "measure_s": float(measure.sum() / n),
        "recipe_prepare_s": float(prep.sum() / n),
        "worker_prepare_s": float(worker.sum() / n),
        "mlflow_s": mlflow["begin"] + mlflow["finish"],
        "ray_tune_s": (concurrency * wall - tsum) / n - mlflow["finish"],
        "launcher_outside_tune_s": (command_s - wall) / n,
    }
    return {"concurrency": concurrency, "trials": len(rows),
            "ok": sum(r.get("status") == "ok" for r in rows), "wall_s": wall,
            "trial_sum_s": tsum, "trial_sum_s_summary": float(summary["trial_sum_s"]),
            "command_s": command_s,
            "overhead_ratio": wall / (tsum / concurrency) if tsum else None,
            "command_ratio": command_s / (tsum / concurrency) if tsum else None,
            "workers_loaded": int((worker > 0).sum()), "per_trial_s": per_trial,
            "trial_s_median": float(np.median(trial)) if len(rows) else None}


def write_outputs(results: list[dict], extra: dict, meta: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    paths = {"json": common.write_json(out / "overhead.json",
                                       {**meta, **extra, "sweeps": results}),
             "md": out / "overhead.md", "png": out / "overhead.png"}
    labels = {"measure_s": "measuring (transcribe + score)",
              "recipe_prepare_s": "recipe preparation (apply_recipe)",
              "worker_prepare_s": "worker preparation (model, data, baseline; once per worker)",
              "mlflow_s": "MLflow logging (begin + finish, timed alone)",
              "ray_tune_s": "Ray/Tune: slot time outside trials",
              "launcher_outside_tune_s": "launcher outside Tune (imports, ray.init, report)"}
    head = ("cost per trial (s)", *(f"{r['concurrency']} concurrent" for r in results))
    body = [(lab, *(f"{r['per_trial_s'][k]:.2f}" for r in results)) for k, lab in labels.items()]
    body += [("**wall_s / (trial_sum_s / concurrency)**",
              *(f"**{r['overhead_ratio']:.2f}**" for r in results)),
             ("whole command / (trial_sum_s / concurrency)",
              *(f"{r['command_ratio']:.2f}" for r in results)),
             ("trials (ok) / wall_s / trial_sum_s",
              *(f"{r['trials']} ({r['ok']}) / {r['wall_s']:.0f} / {r['trial_sum_s']:.0f}"
                for r in results))]
    lines = [f"# Sweep overhead ({meta['date']})", "",
             f"- sweeps: `{meta['sweep_command']}`",
             f"- ray.init alone: {extra['ray_init_s']:.1f} s; MLflow per trial alone: "
             f"begin {np.median(extra['mlflow_s']['begin']):.2f} s + finish "
             f"{np.median(extra['mlflow_s']['finish']):.2f} s (medians of "
             f"{len(extra['mlflow_s']['begin'])})",
             f"- machine: {common.describe_machine(meta['machine'])}",
             f"- commit: {meta['commit']}; command: `{meta['command']}`", "",
             common.md_table(head, body), ""]
    paths["md"].write_text("\n".join(lines), encoding="utf-8")
    fig, ax = common.figure_axes(8, 4.5)
    left = np.zeros(len(results))
    ys = [f"{r['concurrency']} concurrent" for r in results]
    for k, lab in labels.items():
        vals = np.array([max(0.0, r["per_trial_s"][k]) for r in results])
        ax.barh(ys, vals, left=left, label=lab.split(" (")[0])
        left += vals
    ax.set_xlabel("seconds per trial")
    ax.set_title("Where a sweep's time goes", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    fig.savefig(paths["png"], format="png")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-samples", type=int, default=6)
    ap.add_argument("--max-samples", type=int, default=4, help="clips per trial")
    ap.add_argument("--space", default="quick")
    ap.add_argument("--model", default="embedded:whisper-base")
    ap.add_argument("--dataset", default="embedded")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per sweep")
    ap.add_argument("--keep", default=None, help="keep the sweeps' folders here")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    meta = {**common.stamp(), "command": "python -m bench.overhead " + " ".join(
        argv if argv is not None else sys.argv[1:]),
        "sweep_command": f"python -m sweep.launch --space {args.space} --num-samples "
                         f"{args.num_samples} --max-concurrent N --model {args.model} "
                         f"--dataset {args.dataset} --max-samples {args.max_samples}"}
    extra = {"ray_init_s": time_ray_init(), "mlflow_s": time_mlflow()}
    mlflow = {k: float(np.median(v)) for k, v in extra["mlflow_s"].items()}
    results = []
    with tempfile.TemporaryDirectory(prefix="hyper-overhead-") as tmp:
        for c in args.concurrency:
            root = Path(args.keep or tmp) / f"c{c}"
            print(f"{c} concurrent: sweep under {root}", file=sys.stderr)
            name = f"overhead-c{c}-{time.strftime('%H%M%S')}"  # launch wants a new name
            summary, rows, command_s = run_sweep(root, name, c, args)
            results.append(split_costs(summary, rows, c, command_s, mlflow))
            print(f"{c} concurrent: wall {summary['wall_s']:.0f} s for "
                  f"{results[-1]['trial_sum_s']:.0f} s of trials", file=sys.stderr)
    paths = write_outputs(results, extra, meta, Path(args.out))
    print(paths["md"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
