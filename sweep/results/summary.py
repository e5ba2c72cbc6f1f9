"""A finished sweep's figures about itself, from its trial rows: where each trial came from
(`origin`, `accounting`), what early stopping saved (`stop_costs`), how finely the data resolves
dWER (`resolution_warning`, `resolution_summary`), the rows the front cannot use (`screen_rows`)
and the trials a kill interrupted (`interrupted`). Pure: no Ray, MLflow or Optuna; the launcher
puts them into `summary.json`."""

from __future__ import annotations

import json
import math

from . import pareto, report

# A 95% dWER interval's half-width is about this over sqrt(clips) on whisper-base speech
# (measured: +-15-25% on 19 Russian clips, +-11-15% on 71): the clips a budget needs before a
# sweep has measured anything. The summary replaces it with this sweep's own intervals.
HALFWIDTH_SQRT_N = 1.0


def resolution_warning(space, n_clips: int) -> list[str]:
    """A warning when `n_clips` cannot resolve the space's `max_dwer`: the expected 95% interval
    half-width is wider than the budget. Says how many clips would."""
    budget = space.constraints.get("max_dwer")
    if budget is None or budget <= 0:
        return []
    half = HALFWIDTH_SQRT_N / n_clips ** 0.5
    if half <= budget:
        return []
    need = clips_to_resolve(half, n_clips, budget)
    return [f"warning: {n_clips} clips resolve dWER to about +-{half:.0%} (95% interval), "
            f"wider than the budget max_dwer {budget:+.0%}: feasibility is decided on noise; "
            f"about {need} clips would resolve it (--max-samples, or a larger --dataset)"]


def clips_to_resolve(half: float, n_clips: int, budget: float) -> int:
    """Clips for a half-width of `budget`, from `half` measured on `n_clips` (1/sqrt(n))."""
    return math.ceil(round(n_clips * (half / budget) ** 2, 6))


def origin(row: dict, space) -> str:
    """`baseline`, `start` (one of the space's warm starts) or `sampled` (the sampler's)."""
    from ..techniques.recipe import Recipe

    if pareto.is_baseline_recipe(row.get("recipe")):
        return "baseline"
    try:
        starts = [Recipe.from_flat(p).to_flat()
                  for p in space.start_points(frozenset({"cpu", "cuda"}))]
    except ValueError:
        starts = []
    return "start" if row.get("recipe") in starts else "sampled"


def accounting(trials: list[dict], front: list[dict], space, baseline: dict) -> dict:
    """Whether the search earned its place: front members by origin, and how many sampled
    trials were infeasible (failed, stopped, or over a constraint)."""
    def count(rows, what):
        return sum(origin(r, space) == what for r in rows)

    sampled = [r for r in trials if origin(r, space) == "sampled"]
    return {"front_from_starts": count(front, "start"),
            "front_from_sampling": count(front, "sampled"),
            # of those, mutations of a front member (--sampler local; the rest are TPE's)
            "front_from_mutation": sum(bool(r.get("parent_run")) for r in front),
            "sampled_by_mutation": sum(bool(r.get("parent_run")) for r in sampled),
            "front_from_baseline": count(front, "baseline"),
            "sampled": len(sampled),
            "sampled_infeasible": sum(not pareto.feasible(r, space.constraints or None, baseline)
                                      for r in sampled)}


def stop_costs(ok: list[dict], pruned: list[dict]) -> dict:
    """What early stopping saved: mean seconds of a stopped trial against a completed one (the
    baseline trial excluded: it re-uses the worker's measurement), and the clips it measured."""
    done = [float(r["trial_s"]) for r in ok if pareto._num(r.get("trial_s"))
            and not pareto.is_baseline_recipe(r.get("recipe"))]
    stopped = [float(r["trial_s"]) for r in pruned if pareto._num(r.get("trial_s"))]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"pruned_trial_s_mean": mean(stopped), "ok_trial_s_mean": mean(done),
            "pruned_clips_mean": mean([float(r["clips_measured"]) for r in pruned
                                       if pareto._num(r.get("clips_measured"))])}


def resolution_summary(rows: list[dict], front: list[dict], n_clips: int, space) -> dict:
    """The data's resolution in the summary: the median half-width of the trials' 95% dWER
    intervals and, against `max_dwer`, how many clips would resolve the budget."""
    res = report.resolution(rows, front)
    budget = space.constraints.get("max_dwer")
    out = {"dwer_ci_halfwidth_median": None if res is None else res[0], "clips_to_resolve": None}
    if res is not None and budget and budget > 0:
        out["clips_to_resolve"] = max(n_clips, clips_to_resolve(res[0], n_clips, budget))
    return out


def screen_rows(rows: list[dict], objectives) -> list[str]:
    """Mark rows the front cannot use and say why: an `ok` row missing a finite figure it is
    ranked or plotted on (the objectives, `report.axes`) becomes `unreadable`. Returns one
    warning per unusable row, naming its trial (failed and pruned trials are ordinary and not
    warned about)."""
    need = dict.fromkeys([m for m, _ in objectives] + list(report.axes(objectives)))
    for r in rows:
        if r["status"] == "ok":
            bad = [m for m in need if pareto._num(r.get(m)) is None]
            if bad:
                r.update(status="unreadable", error=f"no finite {', '.join(bad)} in its run")
    return [f"warning: trial {r.get('trial_id')} (MLflow run {r.get('run_id')}) skipped: "
            f"{r.get('error')}" for r in rows if r["status"] == "unreadable"]


def interrupted(rows: list[dict]) -> dict:
    """Trials whose attempt was killed mid-trial (the launcher or its node died). Re-run: a
    later attempt of the same trial, or of the same recipe, ended (Tune re-runs a trial its last
    saved state knew; one it did not know yet is asked of the searcher again, a warm start under
    a new id). Lost: neither (counted here, never measured)."""
    def key(r):
        return json.dumps(r.get("recipe"), sort_keys=True, default=str)

    killed = [r for r in rows if r["status"] == "killed"]
    ended = [r for r in rows if r["status"] != "killed"]
    ids, recipes = {r["trial_id"] for r in ended}, {key(r) for r in ended}
    trials = {r["trial_id"]: r["trial_id"] in ids or key(r) in recipes for r in killed}
    rerun = sum(trials.values())
    return {"interrupted": len(trials), "interrupted_rerun": rerun,
            "interrupted_lost": len(trials) - rerun}
