"""Screening before the joint search: each dimension's effect alone, then a space bounded by it.
Pure: no Ray, MLflow or torch (the launcher measures the points).

On a large space most of the volume is destroyed models (FFN shrinking of 30% on both stacks,
pruning at 45%, int4 on the decoder): a sampler spends its first dozens of trials learning what
one measurement per value would have said. So, on a small subset of the clips:

1. `plan`: one point per (dimension, value), each changing only that dimension from an anchor:
   the baseline and the best warm start (measured first, on the same subset). Ranges are
   screened at a few grid values, choices at every value.
2. `table`: the points' figures: dWER and speed-up of the change alone, or how it was stopped.
3. `narrow`: the space the sampler searches: choices that break the model from every anchor are
   dropped, ranges end at the largest screened value still within reach of the budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..techniques.recipe import PARAMS
from .space import Dim, Space, resolve

# A screened change is "within reach" when its dWER alone is at most this many times the
# budget: combined with others it may still pay, and the screening subset is noisy.
REACH = 3.0
MIN_REACH = 0.25  # and never tighter than this (a 2% budget would otherwise drop everything)


@dataclass(frozen=True)
class Point:
    """One screening measurement: `dim` set to `value` on top of `anchor`'s point."""

    dim: str
    value: Any
    anchor: str  # "baseline" or "start <i>"
    point: dict  # the full flat point, as the space samples it


def _values(dim: Dim, per_range: int) -> list:
    return list(dim.choices) if dim.kind == "choice" else dim.domain(limit=per_range)


def recipe_key(point: dict) -> Any:
    """What makes two full points the same recipe (a no-op parameter does not count);
    ValueError for a combination the recipe refuses."""
    from ..techniques.recipe import Recipe

    r = Recipe.from_flat(point)
    return r.device, tuple(str(c.canonical()) for c in r.configs())


def plan(space: Space, anchors: dict[str, dict], devices=frozenset({"cpu"}),
         per_range: int = 4) -> list[Point]:
    """The screening points: for each anchor (name -> partial recipe, `{}` the baseline), each
    searched dimension active there and each of its values that changes the recipe."""
    doms = space.domains(frozenset(devices))
    out, bases = [], {}
    for name, partial in anchors.items():
        base, problems = resolve(partial, doms, space.conditions)
        try:
            if not problems:
                bases[name] = (partial, base, recipe_key(base))
        except ValueError:
            pass
    seen = {key for _, _, key in bases.values()}  # the anchors themselves are measured already
    for name, (partial, base, base_key) in bases.items():
        for dim_name, dim in doms.items():
            if dim is None or dim.kind == "value" or dim_name == "device":
                continue
            cond = space.conditions.get(dim_name)
            if cond is not None and base.get(
                    cond.parent, PARAMS[cond.parent].default) not in cond.values:
                continue  # inactive at this anchor: its effect alone is nothing
            for v in _values(dim, per_range):
                if v == base.get(dim_name):
                    continue
                point, problems = resolve({**partial, dim_name: v}, doms, space.conditions)
                if problems:
                    continue
                try:
                    key = recipe_key(point)
                except ValueError:  # a pair of values the recipe refuses together
                    continue
                if key == base_key or key in seen:
                    continue  # a no-op here (e.g. pruning targets at rate 0), or measured
                seen.add(key)
                out.append(Point(dim_name, v, name, point))
    return out


def reach(space: Space) -> float:
    budget = space.constraints.get("max_dwer")
    return max(MIN_REACH, REACH * budget) if budget is not None else math.inf


def table(points: list[Point], results: list[dict | None]) -> list[dict]:
    """One row per screened point: dimension, value, anchor, dWER and speed-up alone, status
    (ok, pruned with its stop reason, failed) and clips measured."""
    rows = []
    for p, r in zip(points, results):
        r = r or {"status": "failed", "error": "no result"}
        rows.append({"dim": p.dim, "value": p.value, "anchor": p.anchor,
                     "status": r.get("status", "failed"), "dwer": r.get("dwer"),
                     "speedup": r.get("speedup"), "clips_measured": r.get("clips_measured"),
                     "reason": r.get("stop_reason") or r.get("error")})
    return rows


def _broken(row: dict, limit: float) -> bool:
    """Out of reach: failed, stopped early as over budget or looping, or dWER beyond `limit`.
    A trial stopped only for being slow is slow, not broken."""
    if row["status"] == "ok":
        return row["dwer"] is None or row["dwer"] > limit
    return "slower than the baseline" not in str(row.get("reason") or "")


def narrow(space: Space, rows: list[dict]) -> tuple[Space, list[str]]:
    """The space without what screening showed out of reach from every anchor; the changes as
    lines. A value a warm start uses, and each dimension's default, are always kept."""
    limit = reach(space)
    keep_always: dict[str, set] = {}
    for s in space.starts:
        for k, v in s.items():
            keep_always.setdefault(k, set()).add(v)
    by_dim: dict[str, dict[Any, bool]] = {}
    for r in rows:
        ok = not _broken(r, limit)
        vals = by_dim.setdefault(r["dim"], {})
        vals[r["value"]] = vals.get(r["value"], False) or ok
    params, changes = dict(space.params), []
    for name, vals in by_dim.items():
        dim, default = params[name], PARAMS[name].default
        keep = keep_always.get(name, set()) | {default}
        if dim.kind == "choice":
            bad = [c for c in dim.choices if vals.get(c) is False and c not in keep]
            left = tuple(c for c in dim.choices if c not in bad)
            if bad and left:
                params[name] = replace(dim, choices=left)
                changes.append(f"{name}: dropped {', '.join(map(str, bad))} (out of reach alone)")
        elif dim.kind in ("float", "int"):
            good = [v for v, ok in vals.items() if ok] + [v for v in keep
                                                         if isinstance(v, (int, float))]
            bad = [v for v, ok in vals.items() if not ok]
            top = max([v for v in good if v < min(bad, default=math.inf)] + [dim.lo])
            if bad and top < dim.hi:
                if top <= dim.lo:
                    params[name] = Dim(name, "value", value=dim.lo)
                    changes.append(f"{name}: fixed at {dim.lo:g} ({min(bad):g} already out of "
                                   "reach alone)")
                else:
                    params[name] = replace(dim, hi=top)
                    changes.append(f"{name}: [{dim.lo:g}, {dim.hi:g}] -> [{dim.lo:g}, {top:g}] "
                                   f"({min(bad):g} out of reach alone)")
    return replace(space, params=params), changes


def best_start(space: Space, results: list[dict | None]) -> int | None:
    """Index in `results` (one per start measured, in order) of the fastest warm start within
    the budget."""
    ok = [(r.get("speedup") or 0.0, i) for i, r in enumerate(results)
          if r and r.get("status") == "ok" and space.feasible(r, r.get("baseline") or {})]
    return max(ok)[1] if ok else None


def read_saved(path: str | Path, space: Space) -> dict:
    """An earlier sweep's screening (its `screen/screen.json`, or the sweep's folder) for
    `--screen-from`: screening is the same measurement for every seed of a space on one
    machine and data set, so several sweeps may share it. Refused, naming the rule, when it
    is not readable or screened parameters this space does not search."""
    p = Path(path)
    if p.is_dir():
        p = next((q for q in (p / "screen" / "screen.json", p / "screen.json") if q.is_file()),
                 p / "screen" / "screen.json")
    try:
        saved = json.loads(p.read_text(encoding="utf-8"))
        rows = saved["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"`--screen-from` must be a sweep's screen/screen.json or its folder, "
                         f"got {str(path)!r}: {e}") from None
    other = sorted({r.get("dim") for r in rows} - set(space.params))
    if other:
        raise ValueError(f"`--screen-from` must be a screening of space {space.name!r}'s "
                         f"parameters, got {str(path)!r}, which screened {', '.join(other)}")
    return {**saved, "from": str(p.resolve())}
