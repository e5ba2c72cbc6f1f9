"""`python -m bench.search`: how many trials each sampler needs, measured without the noise.

1. evaluate: a fixed grid of cpu.yaml recipes, each measured once on a few embedded clips,
   cached in search_grid.json (resumable; `--budget-s` stops between blocks). A block of
   recipes is timed interleaved per clip with the baseline; the replay's latency_norm_s =
   reference baseline latency / speedup in its block, which cancels drift between blocks.
2. replay: the sweep's own samplers (TPE, NSGA-II, random) and max_dwer constraint against
   the cache, many seeds; hypervolume vs trials, median and IQR.
3. compare (`--compare`): sampler configurations replayed as the sweep runs them (the baseline
   and the warm starts enqueued first, constraint values told, early-stopped trials pruned),
   on the grid and on the grid times dead FFN shrinking (most of `full` is broken models);
   HV, HV against the starts alone, sampled trials on the front and infeasible, at the budget.
   Writes search_samplers.json and .md: the sweep's sampler defaults are chosen from it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from sweep.console import refusing

from . import common

# 3 x 3 x 2 x 2 x 6 = 216 recipes, values cpu.yaml allows, the first ones the baseline's.
# (No struct.ffn_rate: from 0.05 on whisper-base loops on every clip, dead points only.)
GRID = {"quant.enc_attn": ["none", "dynamic_int8", "bf16"],
        "quant.enc_mlp": ["none", "dynamic_int8", "bf16"],
        "quant.scheme": ["none", "dynamic_int8"],  # decoder and head (encoder overridden)
        "quant.dec_mlp": ["inherit", "bf16"],
        "prune.rate": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]}
SAMPLERS = ("tpe", "nsga2", "random")
CACHE = common.RESULTS / "search_grid.json"
MAX_DWER = 0.1  # cpu.yaml's constraint and the hypervolume's reference point


def grid_points(grid: dict = GRID) -> list[dict]:
    """Every combination, in a fixed shuffled order (the order blocks are evaluated in), so
    that a partly evaluated grid is an even sample of the whole."""
    names = list(grid)
    pts = [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]
    return [pts[i] for i in np.random.default_rng(0).permutation(len(pts))]


def key_of(point: dict, grid: dict = GRID) -> str:
    return ",".join(f"{n}={point[n]:g}" if isinstance(point[n], float) else f"{n}={point[n]}"
                    for n in grid)


def evaluate(cache_path: Path, *, n_clips: int = 8, block: int = 6, budget_s: float | None = None,
             model: str = "embedded:whisper-base", dataset: str = "embedded",
             threads: int | None = None, grid: dict = GRID, log=print) -> dict:
    """Measure the grid points not yet cached, `block` at a time, until done or out of budget."""
    from sweep.inputs import cli
    from sweep.results import report
    from sweep.inputs.data import load_eval_set
    from sweep.measure.evaluate import _lang_of, set_threads
    from sweep.inputs.models import load_model
    from sweep.techniques.recipe import Recipe

    from .harness import Variant, summarize, timed_pass

    t_start = time.perf_counter()
    ev = load_eval_set(dataset)
    step = max(1, len(ev) // n_clips)  # spread over the set, deterministic
    clips = ev.utterances[::step][:n_clips]
    cache = load_cache(cache_path)
    threads = set_threads(threads)
    ident = {"grid": grid, "clips": [u.id for u in clips], "model": model, "dataset": dataset,
             "threads": threads}
    if cache and any(cache.get(k) != v for k, v in ident.items()):
        raise ValueError(f"cache {cache_path} has another grid, clips, model, data or threads")
    cache = cache or {**ident, **common.stamp(threads), "rows": [], "blocks": []}
    done = {r["key"] for r in cache["rows"]}
    todo = [p for p in grid_points(grid) if key_of(p, grid) not in done]
    log(f"grid: {len(done)} cached, {len(todo)} to measure on {len(clips)} clips")
    if not todo:
        return cache
    cli.quiet_transformers()
    loaded = load_model(model)
    langs = [_lang_of(u, None) for u in clips]
    for b in range(0, len(todo), block):
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            log(f"budget of {budget_s:.0f} s spent: {len(todo) - b} points left for next time")
            break
        variants, rows = [Variant("baseline", "baseline", runner=loaded.model)], []
        for p in todo[b:b + block]:
            row = {"key": key_of(p, grid), "point": p, "status": "ok"}  # recipe: the point
            v = Variant(row["key"], "grid", report.recipe_string(Recipe.from_flat(p).to_flat()))
            try:
                v.prepare(loaded, threads)
                variants.append(v)
            except Exception as e:  # noqa: BLE001 - a recipe that cannot apply is a failed trial
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
        for v in variants:  # untimed warm-up
            v.run(loaded.processor, clips[0], langs[0])
        figs = {r["name"]: r for r in summarize(
            variants, timed_pass(variants, loaded.processor, clips, langs, 1), clips, langs)}
        base = figs.pop("baseline")
        cache["blocks"].append({"baseline_latency_median_s": base["latency_median_s"],
                                "baseline_cpu_median_s": base["cpu_median_s"],
                                "wer": base["wer"], "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "load_avg_1": round(os.getloadavg()[0], 2)})
        for row in rows:
            if row["key"] in figs:
                row.update({k: figs[row["key"]][k] for k in (
                    "wer", "cer", "dwer", "dcer", "dwer_ci95", "latency_median_s", "speedup",
                    "cpu_median_s", "speedup_cpu", "loops", "prepare_s")},
                    block=len(cache["blocks"]) - 1)
        cache["rows"] = [{k: v for k, v in r.items() if k != "recipe"} for r in cache["rows"]
                         + rows]  # the point is the recipe: keep the file small
        cache["baseline"] = {"wer": base["wer"], "cer": base["cer"]}
        common.write_json(cache_path, cache)
        log(f"  {len(cache['rows'])}/{len(grid_points(grid))} points, "
            f"{time.perf_counter() - t_start:.0f} s")
    return cache


def load_cache(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def points_of(cache: dict) -> tuple[dict, dict]:
    """(key -> row with latency_norm_s, baseline {wer, latency_median_s}) from a cache: the
    median of the blocks' baseline seconds over each row's speedup in its block, by CPU
    seconds when measured (a loaded machine's waiting left out), else wall seconds."""
    cpu = all("baseline_cpu_median_s" in b for b in cache["blocks"])
    col, key = ("baseline_cpu_median_s", "speedup_cpu") if cpu else (
        "baseline_latency_median_s", "speedup")
    ref = float(np.median([b[col] for b in cache["blocks"]]))
    base = {"wer": cache["baseline"]["wer"], "latency_median_s": ref, "clock": col}
    pts = {}
    for r in cache["rows"]:
        r = {"recipe": r["point"], **r}
        if r.get("status", "ok") == "ok":
            r["latency_norm_s"] = ref / r[key]
        pts[r["key"]] = r
    return pts, base


def _nearest(point: dict, pts: dict, grid: dict) -> dict:
    """The cached row closest to `point`, so that a partly evaluated grid still replays."""
    def dist(r):
        d = 0.0
        for n, vals in grid.items():
            a, b = point[n], r["point"][n]
            if isinstance(vals[0], (int, float)):
                d += abs(a - b) / ((max(vals) - min(vals)) or 1)
            else:
                d += a != b
        return d
    return min(pts.values(), key=dist)


def _suggest(trial, grid: dict) -> dict:
    """The sweep's way of asking: evenly spaced numbers as stepped floats, the rest as
    categoricals; values snapped back onto the grid."""
    out = {}
    for n, vals in grid.items():
        steps = np.diff(vals) if isinstance(vals[0], float) and len(vals) > 2 else None
        if steps is not None and np.allclose(steps, steps[0]):
            v = trial.suggest_float(n, vals[0], vals[-1], step=float(steps[0]))
            out[n] = min(vals, key=lambda g: abs(g - v))
        else:
            out[n] = trial.suggest_categorical(n, list(vals))
    return out


def replay(pts: dict, base: dict, grid: dict, sampler: str, seed: int, n_trials: int,
           max_dwer: float = MAX_DWER) -> list[float]:
    """Hypervolume after each of `n_trials` trials of one study: the baseline first (as the
    sweep enqueues it), then the sampler's picks looked up in the cache."""
    import optuna

    from sweep.results import pareto
    from sweep.search.sampler import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # TPE's `group` is "experimental": the sweep uses it anyway
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(directions=["minimize", "minimize"],
                                    sampler=make_sampler(sampler, seed))
    study.enqueue_trial({n: v[0] for n, v in grid.items()})  # first values: the baseline
    ref = pareto.reference_point(base, max_dwer)
    seen, curve = [], []
    for _ in range(n_trials):
        trial = study.ask()
        point = _suggest(trial, grid)
        row = pts.get(key_of(point, grid)) or _nearest(point, pts, grid)
        if row.get("status", "ok") != "ok":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            trial.set_constraint("max_dwer", row["dwer"] - max_dwer)
            study.tell(trial, [row["wer"], row["latency_norm_s"]])
            seen.append((row["wer"], row["latency_norm_s"]))
        curve.append(pareto.hypervolume(seen, ref))
    return curve


def run_replays(cache: dict, *, samplers=SAMPLERS, seeds: int = 10, n_trials: int = 80,
                max_dwer: float = MAX_DWER, log=print) -> dict:
    """Curves per sampler and seed, their median/IQR, and trials to reach random's final HV."""
    from sweep.results import pareto

    grid = cache["grid"]
    pts, base = points_of(cache)
    ok = [(r["wer"], r["latency_norm_s"]) for r in pts.values() if r.get("status") == "ok"]
    hv_grid = pareto.hypervolume(ok, pareto.reference_point(base, max_dwer))
    curves = {}
    for s in samplers:
        curves[s] = [replay(pts, base, grid, s, seed, n_trials, max_dwer) for seed in range(seeds)]
        log(f"  {s}: {seeds} seeds x {n_trials} trials replayed")
    return summarize_curves(curves, hv_grid, n_points=len(pts), max_dwer=max_dwer)


def trials_to(curve, target: float) -> int | None:
    """1-based trial count at which `curve` first reaches `target` (None: never)."""
    hit = np.nonzero(np.asarray(curve) >= target * (1 - 1e-9))[0]
    return int(hit[0]) + 1 if len(hit) else None


def summarize_curves(curves: dict, hv_grid: float, *, n_points: int, max_dwer: float) -> dict:
    """Normalised by the whole grid's hypervolume (1.0 = the grid's true front found)."""
    out = {"hv_grid": hv_grid, "n_points": n_points, "max_dwer": max_dwer, "samplers": {}}
    final_random = None
    if "random" in curves:
        final_random = float(np.median([c[-1] for c in curves["random"]]))
    out["random_final_hv"] = final_random
    for s, cs in curves.items():
        a = np.asarray(cs, float) / (hv_grid or 1.0)
        q25, med, q75 = np.quantile(a, [0.25, 0.5, 0.75], axis=0)
        entry = {"median": med.tolist(), "q25": q25.tolist(), "q75": q75.tolist(),
                 "per_seed": a.tolist()}
        if final_random is not None:
            per_seed = [trials_to(c, final_random) for c in cs]
            # Seeds that never get there count as infinitely many trials.
            med_seed = float(np.median([np.inf if t is None else t for t in per_seed]))
            entry.update(
                trials_to_random_final_median_curve=trials_to(med * (hv_grid or 1.0),
                                                              final_random),
                trials_to_random_final_per_seed=per_seed,
                trials_to_random_final_seeds_median=med_seed if np.isfinite(med_seed) else None,
                seeds_reaching=sum(t is not None for t in per_seed))
        out["samplers"][s] = entry
    return out


# ---------------------------------------------------------------------------------------------
# compare: sampler configurations replayed as the sweep runs them

# cpu.yaml's warm starts on the grid's parameters (their decoding levers are not in it): dynamic
# int8 everywhere, and the bf16 encoder with an int8 decoder and head.
GRID_STARTS = (
    {"quant.enc_attn": "dynamic_int8", "quant.enc_mlp": "dynamic_int8",
     "quant.scheme": "dynamic_int8", "quant.dec_mlp": "inherit", "prune.rate": 0.0},
    {"quant.enc_attn": "bf16", "quant.enc_mlp": "bf16", "quant.scheme": "dynamic_int8",
     "quant.dec_mlp": "inherit", "prune.rate": 0.0})
# Scenarios: name -> (dead, warm starts). `dead` adds full.yaml's FFN shrinking to the grid
# (struct.ffn_rate 0-0.5 by 0.05, struct.stacks asked only when it shrinks). Whisper-base loops
# on every clip from a rate of 0.05 (see GRID), so every rate > 0 is a broken model that early
# stopping ends (pruned, WER 1): 10 of 11 rates are dead volume, as most of `full` is.
# On these 8 clips every feasible recipe has the baseline's WER, so the front is the fastest
# feasible recipe, and that is the bf16 start: with both starts told the front is found before
# sampling begins and nothing can be ranked. The int8 start alone (over the budget here) leaves
# the sampler to find it, as `full` needs (issue #19: sampled trials must beat the starts).
SCENARIOS = {"starts": (False, GRID_STARTS), "int8 start": (False, GRID_STARTS[:1]),
             "int8 start, dead": (True, GRID_STARTS[:1])}
FFN_RATE, STACKS = (0.0, 0.5, 0.05), ["encoder", "decoder", "both"]
MARKS = (5, 10, 15, 20, 30)  # sampled trials (after the baseline) the tables show
# The sweep's samplers before issue #19 (the comparison kept them); a Variant says what it
# changes.
BEFORE = {"n_startup_trials": 5, "multivariate": True, "group": True, "population_size": 8}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One sampler configuration, replayed as the sweep runs it."""
    name: str
    sampler: str = "tpe"
    tweaks: dict = dataclasses.field(default_factory=dict)  # SamplerOptions over BEFORE
    constraints: bool = True  # finished trials tell their constraint values (set_constraint)
    pruned_constraints: bool = False  # early-stopped trials tell theirs too (dWER so far)
    starts_told: bool = True  # baseline and warm starts enqueued: the study's first trials

    def options(self):
        from sweep.search.local import LocalOptions
        from sweep.search.sampler import SamplerOptions

        o = {**BEFORE, **self.tweaks}
        if isinstance(o.get("local"), dict):  # as dataclasses.asdict left it
            o["local"] = LocalOptions(**o["local"])
        return SamplerOptions(**o)


def variants() -> list[Variant]:
    """One change at a time from the sweep's samplers before #19, and the sweep's own now."""
    from sweep.search import sampler
    from sweep.search.local import LocalOptions

    out = [Variant("tpe startup 5, multivariate+group"),
           *(Variant(f"tpe startup {n}", tweaks={"n_startup_trials": n}) for n in (3, 10)),
           Variant("tpe multivariate, no group", tweaks={"group": False}),
           Variant("tpe independent", tweaks={"multivariate": False, "group": False}),
           Variant("tpe without constraints", constraints=False),
           Variant("tpe + constraints of stopped trials", pruned_constraints=True),
           Variant("tpe, starts not told", starts_told=False),
           *(Variant(f"nsga2 population {n}", "nsga2", {"population_size": n})
             for n in (4, 8, 16)),
           Variant("random", "random"),
           # mutations of the front's members (GSEMO), TPE as above for the rest
           *(Variant(f"local share {x:g}", "local", {"local": LocalOptions(share=x)})
             for x in (0.5, 0.75, 1.0)),
           *(Variant(f"local share 1, more {m:g}", "local",
                     {"local": LocalOptions(share=1.0, more=m)}) for m in (0.2, 0.4)),
           Variant("local share 1, no penalty", "local",
                   {"local": LocalOptions(share=1.0, penalty=0.0)}),
           *(Variant(f"local share 1, parent penalty {x:g}", "local",
                     {"local": LocalOptions(share=1.0, parent_penalty=x)}) for x in (1.0, 4.0))]
    # The sweep's defaults now, where no variant above is them (stopped trials are told as
    # PRUNED without constraint values: telling theirs gained nothing here).
    for name in ("local", "tpe", "nsga2"):
        if not any(v.sampler == name and is_default(v) for v in out):
            out.append(Variant(f"{name}: the sweep's defaults", name, dataclasses.asdict(
                sampler.SamplerOptions())))
    return out


def is_default(v: Variant) -> bool:
    """Whether the sweep runs `v`'s sampler as `v` does (SamplerOptions' defaults)."""
    from sweep.search.sampler import SamplerOptions

    tpe = ("n_startup_trials", "multivariate", "group")
    fields = {"tpe": tpe, "local": (*tpe, "local"),
              "nsga2": ("population_size",)}.get(v.sampler, ())
    return v.constraints and v.starts_told and not v.pruned_constraints and all(
        getattr(v.options(), f) == getattr(SamplerOptions(), f) for f in fields)


def _point(trial, grid: dict, dead: bool) -> dict:
    """The sweep's way of asking, plus the dead scenario's FFN shrinking first (as full.yaml
    orders it) with its conditional stacks."""
    out = {}
    if dead:
        lo, hi, step = FFN_RATE
        out["struct.ffn_rate"] = round(trial.suggest_float("struct.ffn_rate", lo, hi, step=step),
                                       2)
        if out["struct.ffn_rate"] > 0:
            out["struct.stacks"] = trial.suggest_categorical("struct.stacks", STACKS)
    return {**out, **_suggest(trial, grid)}


def _recipe(params: dict) -> str:
    """The local sampler's key on the grid: struct.stacks counts only when it acts."""
    return json.dumps({k: v for k, v in params.items()
                       if k != "struct.stacks" or params.get("struct.ffn_rate", 0) > 0},
                      sort_keys=True)


def replay_variant(pts: dict, base: dict, grid: dict, v: Variant, seed: int, num_samples: int,
                   max_dwer: float = MAX_DWER, scenario: str = "starts") -> tuple[list, list]:
    """One study as the sweep runs it: the baseline and the scenario's starts first (enqueued,
    or measured
    beside the study when `starts_told` is off), then `num_samples` in all (starts included,
    as --num-samples counts them). A point whose 95% dWER interval is above max_dwer is
    stopped early (pruned, as --early-stop does), as is every dead one. Returns the feasible
    hypervolume after each trial and the trials' rows (with `origin`)."""
    import optuna

    from sweep.results import pareto
    from sweep.search.sampler import make_sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # TPE's independent-sampling notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(directions=["minimize", "minimize"],
                                    sampler=make_sampler(v.sampler, seed, v.options(),
                                                         key=_recipe))
    dead, starts = SCENARIOS[scenario]
    fixed = [{**({"struct.ffn_rate": 0.0} if dead else {}),
              **{n: p.get(n, vals[0]) for n, vals in grid.items()}}
             for p in ({}, *starts)]  # the baseline, then the starts on the grid's parameters
    if bad := [p for p in fixed if any(p[n] not in vals for n, vals in grid.items())]:
        raise ValueError(f"warm starts must take the grid's values, got {bad} for {grid}")
    origins = {json.dumps(p, sort_keys=True): o for p, o in zip(
        fixed, ["baseline"] + ["start"] * len(starts))}
    ref = pareto.reference_point(base, max_dwer)
    rows, seen, curve = [], [], []
    S = optuna.trial.TrialState

    def measure(point: dict) -> dict:
        row = pts.get(key_of(point, grid)) or _nearest(point, pts, grid)
        r = {"trial_id": str(len(rows)), "recipe": point, "status": row.get("status", "ok"),
             "origin": origins.get(json.dumps(point, sort_keys=True), "sampled")}
        if point.get("struct.ffn_rate", 0) > 0:  # loops on every clip: stopped early
            return {**r, "status": "pruned", "wer": 1.0, "dwer": 1.0 / base["wer"] - 1,
                    "latency_median_s": row.get("latency_norm_s")}
        if r["status"] == "ok":
            r.update(wer=row["wer"], dwer=row["dwer"], latency_median_s=row["latency_norm_s"])
            if (row.get("dwer_ci95") or [-math.inf])[0] > max_dwer:
                r["status"] = "pruned"
        return r

    def record(r: dict) -> None:
        rows.append(r)
        if r["status"] == "ok" and r["dwer"] <= max_dwer:
            seen.append((r["wer"], r["latency_median_s"]))
        curve.append(pareto.hypervolume(seen, ref))

    for p in fixed:
        if v.starts_told:
            study.enqueue_trial(p)
        else:
            record(measure(p))
    while len(rows) < 1 + num_samples:
        trial = study.ask()
        r = measure(_point(trial, grid, dead))
        if r["status"] == "ok":
            if v.constraints:
                trial.set_constraint("max_dwer", r["dwer"] - max_dwer)
            study.tell(trial, [r["wer"], r["latency_median_s"]])
        elif r["status"] == "pruned":
            if v.pruned_constraints:
                trial.set_constraint("max_dwer", r["dwer"] - max_dwer)
            study.tell(trial, state=S.PRUNED)
        else:
            study.tell(trial, state=S.FAIL)
        record(r)
    return curve, rows


def compare(cache: dict, *, variants_: list[Variant] | None = None, seeds: int = 20,
            num_samples: int = 30, max_dwer: float = MAX_DWER, scenarios=tuple(SCENARIOS),
            log=print) -> dict:
    """Every variant x scenario x seed replayed; per variant and scenario the HV curve's
    median/IQR (fraction of the grid's HV) and, at the budget, the issue's figures (`earned`):
    HV over the starts' alone, seeds with a sampled trial on the front, sampled infeasible."""
    from sweep.results import pareto

    from .search_full import earned

    grid = cache["grid"]
    pts, base = points_of(cache)
    ref = pareto.reference_point(base, max_dwer)
    feas = [(r["wer"], r["latency_norm_s"]) for r in pts.values()
            if r.get("status", "ok") == "ok" and r["dwer"] <= max_dwer]
    hv_grid = pareto.hypervolume(feas, ref)
    objs = [("wer", "min"), ("latency_median_s", "min")]
    out = {"hv_grid": hv_grid, "max_dwer": max_dwer, "seeds": seeds, "num_samples": num_samples,
           "marks": [m for m in MARKS if m <= num_samples] + (
               [num_samples] if num_samples not in MARKS else []), "results": {}}
    t0 = time.perf_counter()
    for v in variants_ or variants():
        out["results"][v.name] = {"variant": dataclasses.asdict(v), "options": dataclasses.asdict(
            v.options())}
        for sc in scenarios:
            curves, accounts = [], []
            for seed in range(seeds):
                curve, rows = replay_variant(pts, base, grid, v, seed, num_samples, max_dwer, sc)
                curves.append(curve)
                accounts.append(earned(rows, base, objs, {"max_dwer": max_dwer}))
            a = np.asarray(curves, float) / (hv_grid or 1.0)
            q25, med, q75 = np.quantile(a, [0.25, 0.5, 0.75], axis=0)
            sampled = sum(x["sampled"] for x in accounts)
            ratios = [x["hv_ratio"] for x in accounts if x["hv_ratio"] is not None]
            out["results"][v.name][sc] = {
                "median": med.tolist(), "q25": q25.tolist(), "q75": q75.tolist(),
                "final_per_seed": a[:, -1].tolist(), "auc": float(a[:, 1:].mean()),
                "hv_ratio_median": float(np.median(ratios)) if ratios else None,
                "seeds_with_sampled_on_front": sum(x["front_from_sampling"] >= 1
                                                   for x in accounts),
                "sampled_infeasible_share": (sum(x["sampled_infeasible"] for x in accounts)
                                             / sampled if sampled else None),
                "hv_starts": accounts[0]["hv_starts"] / (hv_grid or 1.0)}
        log(f"  {v.name}: {len(scenarios)} scenarios x {seeds} seeds, "
            f"{time.perf_counter() - t0:.0f} s")
    out["ranking"] = rank(out)
    out["defaults"] = [v.name for v in variants_ or variants() if is_default(v)]
    return out


def rank(summary: dict, tie: float = 0.005) -> list[str]:
    """Variants best first: the median HV at the budget (mean over the scenarios whose starts
    alone leave something to find); within `tie` of each other, the lower quartile (spread:
    the bad seeds) and then the mean HV over the trials (how early it gets there) decide."""
    first = next(iter(summary["results"].values()))
    scs = [s for s in SCENARIOS if s in first and first[s]["hv_starts"] < 0.999] or [
        s for s in SCENARIOS if s in first]
    summary["ranked_on"] = scs

    def key(name):
        e = summary["results"][name]
        return (round(np.mean([e[s]["median"][-1] for s in scs]) / tie),
                np.mean([e[s]["q25"][-1] for s in scs]), np.mean([e[s]["auc"] for s in scs]))
    return sorted(summary["results"], key=key, reverse=True)


def write_compare(summary: dict, meta: dict, out: Path) -> dict[str, Path]:
    """search_samplers.json and .md: one table per scenario, the ranking and the choice."""
    out = Path(out)
    paths = {"json": common.write_json(out / "search_samplers.json", {**meta, **summary}),
             "md": out / "search_samplers.md"}
    marks, n = summary["marks"], summary["num_samples"]
    lines = [f"# Sampler configurations: replayed as the sweep runs them ({meta['date']})", "",
             f"- grid: {meta['grid']}; machine of the grid: {meta['grid_machine']}",
             f"- replay: {summary['seeds']} seeds per variant and scenario; the baseline and "
             f"{len(GRID_STARTS)} warm starts (cpu.yaml's, on the grid's parameters) first, "
             f"then sampled trials up to {n} after the baseline (--num-samples {n}); constraint "
             f"dwer <= {common.pct(summary['max_dwer'], False, 0)}; a point whose 95% dWER "
             "interval is above it is stopped early (pruned)",
             "- scenarios: `starts` (the grid as measured, both starts told: they hold its "
             "front, every feasible recipe having the baseline's WER on these clips); `int8 "
             "start` (only the int8 start, over the budget here: the sampler must find the "
             "front); `dead` (also struct.ffn_rate 0-0.5 by 0.05, struct.stacks when > 0; "
             "every rate > 0 loops and is stopped: 10 of 11 rates dead, like most of `full`)",
             "- HV @k: feasible hypervolume after k sampled trials as a fraction of the whole "
             "grid's, median [IQR] over seeds; HV/starts: the front's HV over that of the "
             "baseline and starts alone at the budget (median); on front: seeds with a sampled "
             "trial on the final feasible front; infeasible: share of sampled trials",
             f"- commit: {meta['commit']}; replay machine: {meta['machine_line']}; "
             f"{meta['seconds']:.0f} s; command: `{meta['command']}`", ""]
    for sc in SCENARIOS:
        if not all(sc in e for e in summary["results"].values()):
            continue
        e0 = next(iter(summary["results"].values()))[sc]
        lines += [f"## {sc} (starts alone: {e0['hv_starts']:.2f} of the grid's HV)", ""]
        body = []
        for name in summary["ranking"]:
            e = summary["results"][name][sc]
            r = e["hv_ratio_median"]
            shown = f"**{name}** (default)" if name in summary.get("defaults", ()) else name
            body.append((shown, *(f"{e['median'][m]:.2f} [{e['q25'][m]:.2f}–{e['q75'][m]:.2f}]"
                                 for m in marks), f"{e['auc']:.3f}",
                         # none, or about none, from the starts alone: no ratio to speak of
                         "—" if r is None or e["hv_starts"] < 0.01 else f"{r:.2f}x",
                         f"{e['seeds_with_sampled_on_front']}/{summary['seeds']}",
                         common.pct(e["sampled_infeasible_share"], False, 0)))
        lines += [common.md_table(("variant", *(f"HV @{m}" for m in marks), "mean HV",
                                   "HV/starts", "on front", "infeasible"), body), ""]
    on = " and ".join(f"`{s}`" for s in summary["ranked_on"])
    best = {}
    for n in summary["ranking"]:
        best.setdefault(summary["results"][n]["variant"]["sampler"], n)
    lines += [f"Ranking (median HV at the budget, mean over {on}; within 0.005: the lower "
              "quartile, then the mean HV over the trials): " + " > ".join(
                  f"{i + 1}. {n}" for i, n in enumerate(summary["ranking"][:5])), "",
              "Best per sampler: " + "; ".join(f"{k}: {v}" for k, v in best.items()), ""]
    paths["md"].write_text("\n".join(lines), encoding="utf-8")
    return paths


@refusing  # a bad cache or grid: one line and exit 2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(CACHE), help="the grid's figures (resumable)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop evaluating new blocks after this many seconds (then replay)")
    ap.add_argument("--clips", type=int, default=8, help="embedded clips per grid point")
    ap.add_argument("--block", type=int, default=6, help="recipes timed together per block")
    ap.add_argument("--threads", type=int, default=1, help="1: steadier on a shared machine; "
                    "the replay compares samplers, not absolute speed")
    ap.add_argument("--no-evaluate", action="store_true", help="only replay the cache")
    ap.add_argument("--no-replay", action="store_true", help="only evaluate the grid")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--trials", type=int, default=80)
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--max-dwer", type=float, default=MAX_DWER)
    ap.add_argument("--compare", action="store_true",
                    help="replay sampler configurations as the sweep runs them (search_samplers"
                         ".json/.md) instead of the samplers' curves")
    ap.add_argument("--num-samples", type=int, default=30,
                    help="--compare: trials after the baseline, warm starts included (the "
                         "sweep's --num-samples)")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)
    cache_path = Path(args.cache)
    if args.no_evaluate:
        cache = load_cache(cache_path)
        if not cache:
            raise ValueError(f"no grid cache at {cache_path}: run without --no-evaluate")
    else:
        cache = evaluate(cache_path, n_clips=args.clips, block=args.block,
                         budget_s=args.budget_s, threads=args.threads, log=log)
    if args.no_replay:
        return 0
    if args.compare:
        return _compare(args, cache, argv, log)
    n_grid = len(grid_points(cache["grid"]))
    if len(cache["rows"]) < n_grid:
        log(f"note: {len(cache['rows'])}/{n_grid} points cached; the others replay as the nearest")
    summary = run_replays(cache, samplers=args.samplers, seeds=args.seeds,
                          n_trials=args.trials, max_dwer=args.max_dwer, log=log)
    meta = {**common.stamp(cache.get("machine", {}).get("threads")), "grid_stamp": {
        k: cache.get(k) for k in ("date", "commit", "machine")}, "cached": len(cache["rows"]),
        "grid_size": n_grid, "n_clips": len(cache["clips"]), "seeds": args.seeds,
        "trials": args.trials, "command": "python -m bench.search " + " ".join(
            argv if argv is not None else sys.argv[1:])}
    paths = common.write_search(summary, meta, cache, Path(args.out))
    print(paths["md"].read_text(encoding="utf-8"))
    return 0


def _compare(args, cache: dict, argv, log) -> int:
    t0 = time.perf_counter()
    summary = compare(cache, seeds=args.seeds, num_samples=args.num_samples,
                      max_dwer=args.max_dwer, log=log)
    g = cache.get("machine", {})
    dims = ", ".join(f"{k}: {len(v)}" for k, v in cache["grid"].items())
    meta = {**common.stamp(1), "seconds": time.perf_counter() - t0,
            "grid": f"{len(cache['rows'])}/{len(grid_points(cache['grid']))} recipes of "
                    f"search_spaces/cpu.yaml ({dims}) measured once on {len(cache['clips'])} "
                    f"embedded clips on {cache.get('date')}",
            "grid_machine": common.describe_machine(g),
            "command": "python -m bench.search " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    meta["machine_line"] = common.describe_machine(meta["machine"])
    paths = write_compare(summary, meta, Path(args.out))
    print(paths["md"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
