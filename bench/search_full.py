"""`python -m bench.search_full`: does the joint search earn its place on the `full` space
(issue #19)? Runs `python -m sweep.launch --space full --num-samples 30` once per seed, each in
a subprocess with its own --root and --name, on the shared Russian clips plus the embedded set
(`--dataset shared+embedded --language ru`), then reads each sweep's summary.json, pareto.json
and trials.csv and reports per seed:

- front members from sampling, from the warm starts and the baseline;
- the front's hypervolume against that of the baseline and warm starts alone;
- the share of sampled trials that were infeasible (failed, stopped early or over a constraint).

Pass when, as the issue asks: in every seed at least one sampled trial is on the final feasible
front; the median over seeds of the hypervolume ratio is >= 1.1; at most 30% of all sampled
trials are infeasible. Hours on a quiet machine: run by hand. Results: bench/results/
search-full.json and .md, with the machine and its ISA of every seed (`--keep` adds seeds
measured by an earlier run, with that run's commit and machine, so a session that ends between
seeds loses none)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sweep.results import pareto

from . import common

OUT = common.RESULTS


@dataclass(frozen=True)
class Criteria:
    """The issue's pass/fail thresholds."""
    min_front_from_sampling: int = 1  # sampled trials on the final feasible front, every seed
    min_hv_ratio: float = 1.1  # median over seeds of HV(front) / HV(baseline + starts)
    max_sampled_infeasible: float = 0.3  # share of all seeds' sampled trials infeasible


def earned(rows: Sequence[Mapping], baseline: Mapping, objectives=None,
           constraints: Mapping[str, float] | None = None) -> dict:
    """One sweep's accounting from its trial rows (each with `status` and `origin`: baseline,
    start or sampled): front members by origin, the feasible front's hypervolume against that
    of the baseline and starts alone (`hv_ratio`: inf when they alone have none but the front
    has some, None when neither has), and how many sampled trials were infeasible (not `ok`,
    or over a constraint). A killed attempt counts only when its trial has no other row."""
    ids = [r.get("trial_id") for r in rows if r.get("status") != "killed"]
    rows = [r for r in rows if r.get("status") != "killed" or r.get("trial_id") not in ids]
    front = pareto.pareto_front(rows, objectives, constraints=constraints, baseline=baseline)
    own = pareto.pareto_front([r for r in rows if r.get("origin") in ("baseline", "start")],
                              objectives, constraints=constraints, baseline=baseline)
    hv = pareto.front_hypervolume(front, baseline, None, objectives, constraints=constraints)
    hv_starts = pareto.front_hypervolume(own, baseline, None, objectives,
                                         constraints=constraints)
    sampled = [r for r in rows if r.get("origin") == "sampled"]
    bad = sum(not pareto.feasible(r, constraints, baseline) for r in sampled)
    return {"front": len(front),
            **{f"front_from_{o}": sum(r.get("origin") == w for r in front)
               for o, w in (("sampling", "sampled"), ("starts", "start"),
                            ("baseline", "baseline"))},
            "hv": hv, "hv_starts": hv_starts,
            "hv_ratio": hv / hv_starts if hv_starts > 0 else (math.inf if hv > 0 else None),
            "sampled": len(sampled), "sampled_infeasible": bad,
            "sampled_infeasible_share": bad / len(sampled) if sampled else None}


def verdict(seeds: Sequence[Mapping], criteria: Criteria = Criteria()) -> dict:
    """The issue's three checks over the per-seed `earned` figures, each with its figure."""
    c = criteria
    ratios = [s["hv_ratio"] for s in seeds if s.get("hv_ratio") is not None]
    med = float(np.median(ratios)) if ratios else None
    sampled = sum(s["sampled"] for s in seeds)
    share = sum(s["sampled_infeasible"] for s in seeds) / sampled if sampled else None
    checks = {
        "sampled_on_front_every_seed": bool(seeds) and all(
            s["front_from_sampling"] >= c.min_front_from_sampling for s in seeds),
        "median_hv_ratio": med is not None and med >= c.min_hv_ratio,
        "sampled_infeasible_share": share is not None and share <= c.max_sampled_infeasible}
    return {"checks": checks, "passed": all(checks.values()), "median_hv_ratio": med,
            "sampled_infeasible_share": share,
            "seeds_with_sampled_on_front": sum(s["front_from_sampling"] >= 1 for s in seeds),
            "criteria": dataclasses.asdict(c)}


def _value(v: str):
    """A trials.csv cell as Python: empty is None, numbers are floats, the rest strings."""
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def read_sweep(results: Path) -> dict:
    """A finished sweep's files: summary.json, pareto.json (baseline, objectives, constraints)
    and trials.csv (every trial, with `origin`)."""
    results = Path(results)
    summary = json.loads((results / "summary.json").read_text(encoding="utf-8"))
    front = json.loads((results / "pareto.json").read_text(encoding="utf-8"))
    with open(results / "trials.csv", newline="", encoding="utf-8") as fh:
        rows = [{k: (v if k in ("trial_id", "status", "origin", "recipe", "run_id")
                     else _value(v)) for k, v in r.items()} for r in csv.DictReader(fh)]
    return {"summary": summary, "baseline": front["baseline"],
            "objectives": [tuple(o) for o in front["objectives"]],
            "constraints": front["constraints"], "rows": rows,
            "commit": sweep_commit(results), "machine": sweep_machine(rows)}


def sweep_commit(results: Path) -> str | None:
    """The commit a sweep ran at: its parent run's `git_commit` tag in the MLflow sqlite of its
    --root (results is ROOT/sweeps/NAME/results); None when absent or not one."""
    db = Path(results).parents[2] / "mlflow.db"
    if not db.is_file():
        return None
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        got = {v for (v,) in con.execute("SELECT value FROM tags WHERE key = 'git_commit'")}
    return got.pop() if len(got) == 1 else None


def sweep_machine(rows: Sequence[Mapping]) -> dict | None:
    """The CPU and ISA its trials ran on (trials.csv's `cpu`, `isa`, `isa_cap`)."""
    for r in rows:
        if r.get("cpu"):
            isa = r.get("isa")
            return {"cpu": r["cpu"], "isa": json.loads(isa) if isinstance(isa, str) else isa,
                    "isa_cap": r.get("isa_cap") or None}
    return None


def analyse(sweeps: Sequence[Mapping], criteria: Criteria = Criteria()) -> dict:
    """Per seed (`read_sweep` of each, with its `seed`): the accounting, checked against what
    the sweep's own summary.json counted; then the verdict over seeds."""
    seeds = []
    for s in sweeps:
        e = earned(s["rows"], s["baseline"], s["objectives"], s["constraints"])
        summ = s["summary"]
        e.update({k: s[k] for k in ("commit", "machine") if s.get(k)})
        e.update(seed=s.get("seed"), sweep=summ.get("sweep"), trials=summ.get("trials"),
                 wall_s=summ.get("wall_s"), summary_hypervolume=summ.get("hypervolume"),
                 # the launcher's own counts (summary.json), which these must equal
                 agrees_with_summary=all(summ.get(k) == e[k] for k in (
                     "front_from_sampling", "front_from_starts", "sampled",
                     "sampled_infeasible") if k in summ) and (
                     summ.get("hypervolume") is None
                     or math.isclose(summ["hypervolume"], e["hv"], rel_tol=1e-9, abs_tol=1e-12)))
        seeds.append(e)
    return {"seeds": seeds, **verdict(seeds, criteria)}


def kept_seeds(path: Path, below: int) -> list[dict]:
    """The per-seed figures of an earlier search-full.json for its seeds below `below`, each
    with the commit, machine and date of the run that measured it (the file's own, unless the
    seed carries them)."""
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("seeds"), list):
        raise ValueError(f"`--keep` must be a search-full.json with `seeds`, got {str(path)!r}")
    return [{**{k: old.get(k) for k in ("commit", "machine", "date")}, **s}
            for s in old["seeds"] if s.get("seed", below) < below]


def write(result: dict, meta: dict, out: Path) -> dict[str, Path]:
    """search-full.json and search-full.md."""
    out = Path(out)
    paths = {"json": common.write_json(out / "search-full.json", {**meta, **result}),
             "md": out / "search-full.md"}
    body = [(s["seed"], s["trials"], s["sampled"],
             f"{s['sampled_infeasible']} ({common.pct(s['sampled_infeasible_share'], False, 0)})",
             s["front"], s["front_from_sampling"], s["front_from_starts"],
             s["front_from_baseline"], f"{s['hv']:.4g}", f"{s['hv_starts']:.4g}",
             "—" if s["hv_ratio"] is None else "inf" if math.isinf(s["hv_ratio"])
             else f"{s['hv_ratio']:.2f}x", "—" if s["wall_s"] is None else f"{s['wall_s']:.0f}",
             "yes" if s["agrees_with_summary"] else "NO",
             f"{common.describe_isa(s['machine'])} at {str(s['commit'])[:7]}")
            for s in result["seeds"]]
    c, ck = result["criteria"], result["checks"]
    mark = {True: "pass", False: "FAIL"}
    med, share = result["median_hv_ratio"], result["sampled_infeasible_share"]
    lines = [f"# The search on `{meta['space']}`: sampled trials against the warm starts "
             f"({meta['date']})", "",
             f"- {len(result['seeds'])} seeds x `--num-samples {meta['num_samples']}` on "
             f"`--dataset {meta['dataset']}`{meta['language_note']}, model {meta['model']}, "
             f"sampler {meta['sampler']}, screening {meta.get('screen', 'each')}"
             + (" (the first seed's, read by the others)" if meta.get("screen") == "once"
                else ""),
             f"- machine: {meta['machine_line']}",
             f"- commit: {meta['commit']}; command: `{meta['command']}`",
             "- HV: the feasible front's hypervolume (WER, latency; against the baseline's "
             "latency and WER + max_dwer); HV starts: that of the baseline and warm starts alone;"
             " infeasible: sampled trials failed, stopped early or over a constraint", "",
             common.md_table(("seed", "trials", "sampled", "infeasible", "front",
                              "from sampling", "from starts", "from baseline", "HV",
                              "HV starts", "HV ratio", "wall s", "= summary.json",
                              "machine, commit"), body), "",
             f"- {mark[ck['sampled_on_front_every_seed']]}: a sampled trial on the final "
             f"feasible front in every seed ({result['seeds_with_sampled_on_front']}/"
             f"{len(result['seeds'])} seeds)",
             f"- {mark[ck['median_hv_ratio']]}: median HV ratio "
             f"{'—' if med is None else f'{med:.2f}x'} (needs >= {c['min_hv_ratio']:g}x)",
             f"- {mark[ck['sampled_infeasible_share']]}: sampled trials infeasible "
             f"{common.pct(share, False, 0)} of all seeds' (at most "
             f"{common.pct(c['max_sampled_infeasible'], False, 0)})",
             f"- overall: {'PASS' if result['passed'] else 'FAIL'}", ""]
    if meta.get("failed_seeds"):
        lines.insert(-1, f"- seeds whose sweep failed (left out): {meta['failed_seeds']}")
    paths["md"].write_text("\n".join(lines), encoding="utf-8")
    return paths


def seed_dir(args, seed: int) -> tuple[Path, str]:
    """A seed's --root and sweep --name."""
    return Path(args.root).resolve() / f"seed-{seed}", f"{Path(args.space).stem}-seed{seed}"


def run_seed(args, seed: int, log) -> Path | None:
    """One sweep in its own process, --root and --name; its results folder, or None when it
    failed. A finished seed is read again, an unfinished one resumed."""
    root, name = seed_dir(args, seed)
    results = root / "sweeps" / name / "results"
    if (results / "summary.json").is_file():
        log(f"seed {seed}: finished before, reading {results}")
        return results
    if (root / "sweeps" / name).exists():
        cmd = ["--resume", name, "--root", str(root)]
    else:
        root0, name0 = seed_dir(args, 0)
        first = root0 / "sweeps" / name0
        screening = {"off": ["--screen", "off"], "each": ["--screen", "on"]}.get(
            args.screen, ["--screen", "on"] if seed == 0 else ["--screen-from", str(first)])
        cmd = [*screening, "--space", args.space, "--num-samples", str(args.num_samples),
               "--seed",
               str(seed), "--sampler", args.sampler, "--root", str(root), "--name", name,
               "--model", args.model, "--dataset", args.dataset,
               *(["--language", args.language] if args.language else []),
               *(["--max-samples", str(args.max_samples)] if args.max_samples else []),
               *args.launch_args]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    log(f"seed {seed}: python -m sweep.launch {' '.join(cmd)}")
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "sweep.launch", *cmd], cwd=common.REPO,
                        env=env, check=False).returncode
    log(f"seed {seed}: exit {rc} after {time.perf_counter() - t0:.0f} s")
    return results if rc == 0 and (results / "summary.json").is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.search_full", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="full", help="search space (name or YAML path)")
    ap.add_argument("--num-samples", type=int, default=30,
                    help="trials per sweep after the baseline, warm starts included")
    ap.add_argument("--seeds", type=int, default=3, help="sweeps, with sampler seeds 0..N-1")
    ap.add_argument("--sampler", default="local", help="the sweep's --sampler")
    ap.add_argument("--screen", default="once", choices=("once", "each", "off"),
                    help="once: the first seed screens (--screen on), the others read its "
                         "screening (--screen-from; the same measurement on this machine and "
                         "data); each: every seed screens; off: none does")
    ap.add_argument("--dataset", default="shared+embedded",
                    help="the sweeps' --dataset (manifest sets joined by +)")
    ap.add_argument("--language", default="ru", help="the sweeps' --language ('' for none)")
    ap.add_argument("--max-samples", type=int, default=None, help="the sweeps' --max-samples")
    ap.add_argument("--model", default="embedded:whisper-base", help="the sweeps' --model")
    ap.add_argument("--root", default="/tmp/hyper-search-full",
                    help="one --root per seed under it (seed-0, ...); finished seeds are "
                         "read again, unfinished ones resumed")
    ap.add_argument("--out", default=str(OUT), help="folder for search-full.json and .md")
    ap.add_argument("--keep", type=Path, default=None, metavar="JSON",
                    help="an earlier search-full.json: its seeds among 0..N-1 are kept as "
                         "measured (with their commit and machine), not run again")
    ap.add_argument("launch_args", nargs="*", metavar="-- LAUNCH_ARG",
                    help="more arguments for sweep.launch, after --")
    args = ap.parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)
    if args.seeds < 1 or args.num_samples < 0:
        print(f"error: `--seeds` must be >= 1 and `--num-samples` >= 0, got {args.seeds=} "
              f"{args.num_samples=}", file=sys.stderr)
        return 2
    stamp = common.stamp()
    try:  # before any sweep runs
        kept = kept_seeds(args.keep, args.seeds) if args.keep else []
        kept_ids = {k["seed"] for k in kept}
        first = seed_dir(args, 0)[0]
        if args.screen == "once" and 0 in kept_ids and not first.exists():
            raise ValueError(f"`--screen once` reads seed 0's screening, but seed 0 is kept "
                             f"from {args.keep} and {first} is absent; use --screen off or each")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweeps, failed = [], []
    for seed in range(args.seeds):
        if seed in kept_ids:
            log(f"seed {seed}: kept from {args.keep}")
            continue
        results = run_seed(args, seed, log)
        if results is None:
            failed.append(seed)
            continue
        sweeps.append({**read_sweep(results), "seed": seed})
    if not sweeps and not kept:
        print(f"error: no sweep finished (seeds {failed}); see the sweeps' output above",
              file=sys.stderr)
        return 1
    new = analyse(sweeps)["seeds"]
    seeds = sorted([*kept, *({**{k: stamp[k] for k in ("commit", "machine", "date")}, **e}
                             for e in new)], key=lambda e: e["seed"])
    result = {"seeds": seeds, **verdict(seeds)}
    meta = {**stamp, "space": args.space, "num_samples": args.num_samples,
            "dataset": args.dataset, "language": args.language or None, "model": args.model,
            "sampler": args.sampler, "screen": args.screen, "max_samples": args.max_samples,
            "root": args.root, "kept_from": str(args.keep) if args.keep else None,
            "failed_seeds": failed, "language_note": f" `--language {args.language}`"
            if args.language else "", "command": "python -m bench.search_full " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    meta["machine_line"] = common.describe_machine(meta["machine"])
    paths = write(result, meta, Path(args.out))
    print(paths["md"].read_text(encoding="utf-8"))
    return 1 if failed else 0  # the verdict is the report's, not the exit status


if __name__ == "__main__":
    raise SystemExit(main())
