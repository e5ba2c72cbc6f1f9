"""Pareto fronts, hypervolume, knee and constraints over trial rows. Pure.

A *row* is a plain dict for one trial with at least `trial_id`, `wer`, `cer`, `dwer`, `dcer`,
`latency_median_s`, `speedup`, `device`, `status` and `recipe` (the flat recipe dict). Rows whose
`status` is not "ok" (failed, timed out, looped...) never reach a front.

The front says only what the data resolves: a trial's accuracy gain over the baseline counts only
where its paired 95% dWER interval excludes 0 (`verdict`); inside it, speed and the other
objectives decide (`front_split`).

Units: fractions everywhere (`dwer` 0.05 = 5% relatively worse than the baseline, as
`sweep.measure.scoring.relative` computes it); percentages appear only in
`sweep.results.report`'s printed tables.

Imports neither Ray, MLflow nor torch. Tables, files and plots are in `sweep.results.report`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .figures import BY_NAME, names
from .figures import DEFAULT_OBJECTIVES as DEFAULT_OBJECTIVES  # the one default, re-exported

# Metrics a search may optimise (the constraint keys are `CONSTRAINTS`, below).
METRICS = names("objective")
DIRECTIONS = ("min", "max")
# Reference point's relative WER allowance when no `max_dwer` constraint is given.
DEFAULT_REF_DWER = 0.5

Row = dict[str, Any]
Objectives = Sequence[tuple[str, str]]


# ---------------------------------------------------------------------------------------------
# constraints (shared with `sweep.search.space.Space.violation`)


def _relative(value: float, base: float) -> float:
    """Same definition as `sweep.measure.scoring.relative`: relative change, absolute when base
    is 0."""
    return value / base - 1.0 if base > 0 else value - base


def _num(x: Any) -> float | None:
    """A finite float, or None."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _figure(row: Mapping, key: str, baseline: Mapping | None) -> float | None:
    """A figure from the row; a relative one (`dwer`, `dcer`, `speedup`: measured against the
    baseline of the same process) missing there is derived from its absolute figure (`of`) and
    `baseline`: a ratio base / trial when higher is better (speed-up), else a relative change."""
    v = _num(row.get(key))
    fig = BY_NAME.get(key)
    if v is not None or fig is None or fig.of is None:
        return v
    base = baseline or row.get("baseline") or {}
    t, b = _num(row.get(fig.of)), _num(base.get(fig.of))
    if t is None or b is None:
        return None
    if fig.better == "max":
        return b / t if t else None
    return _relative(t, b)


@dataclass(frozen=True)
class Constraint:
    """A bound a space may put on one figure (`constraints: {max_dwer: 0.02}`): an upper bound
    (`max_*`) or a lower one (`min_*`) on `figure`, a relative figure derived from the
    baseline when the row lacks it (`_figure`). The one table of constraints: spaces validate
    against it, `constraint_values` judges rows by it."""
    name: str
    figure: str
    upper: str | None = None  # judged on this figure instead where the row has it
    lo: float = 0.0  # a limit must be above lo (at or above it when `hi` is finite)...
    hi: float = math.inf  # ...and at most hi
    what: str = ""  # what the limit is, in words, for its error
    at_baseline: bool = True  # False: the unchanged model misses it by definition

    def __post_init__(self):
        if self.name[:4] not in ("max_", "min_") or self.figure not in BY_NAME:
            raise ValueError(f"constraint `{self.name}`: name must start max_/min_ and figure "
                             f"must be one of FIGURES, got {self.figure!r}")

    @property
    def side(self) -> str:  # "max": the figure must stay at or under the limit
        return self.name[:3]

    def refuses(self, limit: float) -> str | None:
        """Why `limit` is no limit for this constraint (None: it is one)."""
        closed = math.isfinite(self.hi)
        if (self.lo <= limit <= self.hi) if closed else limit > self.lo:
            return None
        rule = f"must be in [{self.lo:g}, {self.hi:g}]" if closed else f"must be > {self.lo:g}"
        return f"{self.what} and {rule}" if self.what else rule

    def value(self, row: Mapping, limit: float, baseline: Mapping | None = None) -> float:
        """Optuna-style: <= 0 is met; a missing figure (failed trial) gives +inf."""
        v = _num(row.get(self.upper)) if self.upper else None
        v = _figure(row, self.figure, baseline) if v is None else v
        fig = BY_NAME[self.figure]
        if v is None and row is baseline and fig.relative and fig.of is None:
            v = fig.neutral  # the baseline against itself, on a figure not derived from another
        if v is None:
            return math.inf
        return float(v - limit if self.side == "max" else limit - v)


_SHARE = "is a share of the probes"
_RELATIVE = "is a relative change (0.02 = 2% worse)"
CONSTRAINTS: dict[str, Constraint] = {c.name: c for c in (
    # `dwer_upper`: the space asked for feasibility at a confidence, and every trial of it
    # carries the one-sided bound
    Constraint("max_dwer", "dwer", upper="dwer_upper", lo=-1.0, what=_RELATIVE),
    Constraint("max_dcer", "dcer", lo=-1.0, what=_RELATIVE),
    Constraint("max_latency_s", "latency_median_s"),
    Constraint("min_speedup", "speedup", at_baseline=False),
    Constraint("max_hallucination", "hallucination_rate", hi=1.0, what=_SHARE),
    # the probe rate judged against the baseline's own in each language: 0 = no worse than
    # the unchanged model anywhere
    Constraint("max_extra_hallucination", "hallucination_excess", hi=1.0, what=_SHARE),
)}


def constraint_values(row: Mapping, constraints: Mapping[str, float] | None,
                      baseline: Mapping | None = None) -> list[float]:
    """Optuna-style constraint values, one per constraint in `constraints`' order: <= 0 is
    feasible (`Constraint.value`: figure - limit for max_*, limit - figure for min_*). A
    figure that is missing (failed trial) gives +inf."""
    out = []
    for key, limit in (constraints or {}).items():
        if key not in CONSTRAINTS:
            raise ValueError(f"unknown constraint `{key}`; allowed: {', '.join(CONSTRAINTS)}")
        out.append(CONSTRAINTS[key].value(row, limit, baseline))
    return out


def feasible(row: Mapping, constraints: Mapping[str, float] | None,
             baseline: Mapping | None = None) -> bool:
    """True when the row ran (`status == "ok"`) and meets every constraint."""
    if row.get("status", "ok") != "ok":
        return False
    return all(v <= 0 for v in constraint_values(row, constraints, baseline))


def over_at_baseline(baseline: Mapping, constraints: Mapping[str, float] | None
                     ) -> dict[str, float]:
    """The constraints the unchanged model's own figures break, by how much (constraint_values's
    sign: > 0 is over; relative figures are taken against themselves: dWER 0, 1.0x).
    `min_speedup` is left out: the baseline misses it by definition. The rest say something
    about the budget: Russian whisper-base hears words in every silence probe, so
    `max_hallucination` 0.2 leaves feasible only trials that hallucinate less than it does."""
    limits = {k: v for k, v in (constraints or {}).items()
              if k not in CONSTRAINTS or CONSTRAINTS[k].at_baseline}
    values = constraint_values(baseline, limits, baseline)
    return {k: v for k, v in zip(limits, values) if v > 0 and math.isfinite(v)}


# ---------------------------------------------------------------------------------------------
# fronts


def _norm_objectives(objectives: Objectives | Mapping[str, str] | None) -> list[tuple[str, str]]:
    if objectives is None:
        return list(DEFAULT_OBJECTIVES)
    items = list(objectives.items()) if isinstance(objectives, Mapping) else list(objectives)
    out = []
    for metric, direction in items:
        if direction not in DIRECTIONS:
            raise ValueError(f"objective `{metric}`: direction {direction!r} is not min or max")
        out.append((str(metric), str(direction)))
    if not out:
        raise ValueError("at least one objective is needed")
    return out


def loss_vector(row: Mapping, objectives: Objectives | None = None) -> list[float] | None:
    """The row's objective values, all to be minimised (max objectives negated); None when a
    value is missing or not finite."""
    out = []
    for metric, direction in _norm_objectives(objectives):
        v = _num(row.get(metric))
        if v is None:
            return None
        out.append(-v if direction == "max" else v)
    return out


# ---------------------------------------------------------------------------------------------
# resolution: what the data tells apart
#
# A trial's dWER comes with a paired bootstrap 95% interval against the baseline, measured on the
# same clips (`sweep.measure.scoring.bootstrap_dwer`). Where it holds 0 the data says "no
# measurable change": against the baseline such a trial counts as no more accurate (its gain is
# read as none; a loss stays what it measured), so speed decides. A trial 2.3x slower than the
# baseline with dWER -11% [-25%, +3%] is dominated by the baseline; one 1.4x faster with +3%
# [-4%, +8%] is on the front beside it, as before. The baseline is the reference the intervals
# are measured against, so it keeps its place as it was. Between two trials the rows hold no
# paired test (each has only its own against the baseline), so their point estimates decide;
# overlapping marginal intervals would be a far stricter test than the paired one (on 69 clips,
# +-15%: nearly every pair "tied", a measurably worse trial driving one with no measurable change
# off the front because it is faster).

NO_CHANGE = "no measurable change"
# Objectives judged with the dWER interval (dWER is the WER relative to the baseline).
RESOLVED = ("wer",)


def dwer_interval(row: Mapping) -> tuple[float, float] | None:
    """The row's 95% dWER interval (`dwer_ci95_lo`, `dwer_ci95_hi`, or a `dwer_ci95` pair as
    bench rows keep it), else None."""
    lo, hi = _num(row.get("dwer_ci95_lo")), _num(row.get("dwer_ci95_hi"))
    pair = row.get("dwer_ci95")
    if (lo is None or hi is None) and isinstance(pair, (list, tuple)) and len(pair) == 2:
        lo, hi = _num(pair[0]), _num(pair[1])
    return None if lo is None or hi is None else (lo, hi)


def verdict(row: Mapping) -> str | None:
    """What the data says of a trial's accuracy against the baseline, from its paired 95% dWER
    interval: "worse" or "better" only where the interval excludes 0, else NO_CHANGE; None
    without an interval. The one definition: the front's ties and the tables' words."""
    iv = dwer_interval(row)
    if iv is None:
        return None
    return "worse" if iv[0] > 0 else "better" if iv[1] < 0 else NO_CHANGE


def _is_baseline(row: Mapping) -> bool:
    """A row measuring the unchanged model: its recipe says so, or its `origin` (trials.csv's,
    whose recipe is text). A row without either is not known to be."""
    return row.get("origin") == "baseline" or (
        isinstance(row.get("recipe"), Mapping) and is_baseline_recipe(row["recipe"]))


def _baseline_point(baseline: Mapping | None, objectives, constraints) -> Row | None:
    """The baseline as a point that may dominate (never listed): its figures, the neutral value
    of each relative one (dWER 0 [0, 0], speed-up 1.0). None without a figure of every
    objective, or when it breaks a constraint (an infeasible point dominates nothing)."""
    if not baseline:
        return None
    point: Row = {k: v for k, v in baseline.items() if k != "utterances"}
    point.update({f.name: f.neutral for f in BY_NAME.values() if f.relative
                  and f.neutral is not None})
    point.update(dwer_ci95_lo=0.0, dwer_ci95_hi=0.0, status="ok")
    if loss_vector(point, objectives) is None or (
            constraints and not feasible(point, constraints, baseline)):
        return None
    return point


def _candidates(rows: Iterable[Mapping], objectives, constraints, baseline):
    keep, losses = [], []
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        if constraints and not feasible(row, constraints, baseline):
            continue
        vec = loss_vector(row, objectives)
        if vec is None:
            continue
        keep.append(row)
        losses.append(vec)
    if not keep:  # nothing feasible: an empty front, not a reshape error
        return keep, np.zeros((0, len(_norm_objectives(objectives))))
    return keep, np.asarray(losses, dtype=float).reshape(len(keep), -1)


def _nondominated_mask(losses: np.ndarray, no_gain: np.ndarray | None = None,
                       acc: int | None = None) -> np.ndarray:
    """True for rows no other row dominates (<= everywhere and < somewhere). Equal points do
    not dominate each other, so ties all stay. Where `no_gain[t, b]`, row t counts as no more
    accurate than row b in column `acc`: b is <= t there, and t is not < b."""
    le = losses[:, None, :] <= losses[None, :, :]  # [j, i, c]: j at least as good as i in c
    lt = losses[:, None, :] < losses[None, :, :]
    if no_gain is not None and acc is not None:
        le[:, :, acc] |= no_gain.T
        lt[:, :, acc] &= ~no_gain
    return ~np.any(le.all(axis=2) & lt.any(axis=2), axis=0)


def front_split(rows: Iterable[Mapping], objectives: Objectives | None = None, *,
                constraints: Mapping[str, float] | None = None,
                baseline: Mapping | None = None) -> tuple[list[Row], list[Row]]:
    """(front, unresolved), each sorted by the first objective, then the rest.

    Candidates: rows that ran (`status == "ok"`), have every objective and (when `constraints`
    is given) are feasible. The baseline takes part as its trial, or, where no candidate
    measures it, as `baseline`'s figures (dominating, never listed). Against a baseline, a
    trial whose `verdict` is NO_CHANGE counts as no more accurate (see above); every other
    pair is compared on its point estimates. `unresolved`: candidates the point estimates leave
    undominated but that are dominated once that counts: their advantage is inside the data's
    resolution. They stay in the tables, marked, but export and the knee choose from `front`
    alone. (It also keeps on the front a baseline as fast as a trial with an unresolved gain:
    a tie.)"""
    objs = _norm_objectives(objectives)
    keep, losses = _candidates(rows, objs, constraints, baseline)
    if not keep:
        return [], []
    base = [_is_baseline(r) for r in keep]
    pseudo = None if any(base) else _baseline_point(baseline, objs, constraints)
    if pseudo is not None:  # the last row: may dominate, is never listed
        keep, base = [*keep, pseudo], [*base, True]
        losses = np.vstack([losses, loss_vector(pseudo, objs)])
    points = _nondominated_mask(losses)
    acc = next((i for i, (m, _) in enumerate(objs) if m in RESOLVED), None)
    resolved = points
    if acc is not None:
        base_a = np.array(base)
        same = np.array([not b and verdict(r) == NO_CHANGE for r, b in zip(keep, base)])
        resolved = _nondominated_mask(losses, np.outer(same, base_a), acc)
    n = len(keep) - (pseudo is not None)

    def listed(mask):
        idx = sorted((i for i in range(n) if mask[i]), key=lambda i: tuple(losses[i]))
        return [keep[i] for i in idx]

    return listed(resolved), listed(points & ~resolved)


def pareto_front(rows: Iterable[Mapping], objectives: Objectives | None = None, *,
                 constraints: Mapping[str, float] | None = None,
                 baseline: Mapping | None = None) -> list[Row]:
    """The front export and the knee choose from (`front_split`'s first part): the
    non-dominated rows among those that ran, have every objective and meet the constraints,
    an accuracy difference against the baseline counting only where the data resolves it.
    Sorted by the first objective, then the rest."""
    return front_split(rows, objectives, constraints=constraints, baseline=baseline)[0]


def unresolved(rows: Iterable[Mapping], objectives: Objectives | None = None, *,
               constraints: Mapping[str, float] | None = None,
               baseline: Mapping | None = None) -> list[Row]:
    """Rows the point estimates would put on the front but whose advantage is inside the
    data's resolution (`front_split`'s second part): shown marked, never chosen."""
    return front_split(rows, objectives, constraints=constraints, baseline=baseline)[1]


def _group_value(row: Mapping, key: str) -> Any:
    if key in row:
        return row[key]
    return (row.get("recipe") or {}).get(key)


def fronts_by(rows: Iterable[Mapping], key: str = "device", objectives: Objectives | None = None,
              *, constraints: Mapping[str, float] | None = None,
              baseline: Mapping | None = None) -> dict[Any, list[Row]]:
    """One front per value of `key` (a row key, else a recipe key), e.g. one per device."""
    groups: dict[Any, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(_group_value(row, key), []).append(row)
    out = {}
    for value, group in groups.items():
        front = pareto_front(group, objectives, constraints=constraints, baseline=baseline)
        if front:
            out[value] = front
    return out


# ---------------------------------------------------------------------------------------------
# hypervolume, reference point, knee


def _hv2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume by a sweep over x (points strictly inside the reference box)."""
    pts = points[np.lexsort((points[:, 1], points[:, 0]))]
    hv, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            hv += (ref[0] - x) * (best_y - y)
            best_y = y
    return float(hv)


def _hv_slices(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume in any dimension by slicing along the last objective (HSO); fine for
    the small sets a sweep makes. Fallback when optuna's WFG is not importable."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    if points.shape[1] == 2:
        return _hv2d(points, ref)
    pts = points[np.argsort(points[:, -1], kind="stable")]
    hv = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        depth = upper - pts[i, -1]
        if depth > 0:
            hv += depth * _hv_slices(pts[: i + 1, :-1], ref[:-1])
    return float(hv)


def hypervolume(points: Iterable[Sequence[float]], ref: Sequence[float]) -> float:
    """Volume (all objectives minimised) dominated by `points` and bounded by `ref`. Points not
    strictly better than `ref` in every objective add nothing. Exact: a sweep for 2 objectives,
    optuna's WFG (`optuna._hypervolume.compute_hypervolume`) for more, else slicing."""
    ref_arr = np.asarray(ref, dtype=float).reshape(-1)
    pts = np.asarray(list(points), dtype=float).reshape(-1, len(ref_arr))
    if not np.all(np.isfinite(ref_arr)):
        raise ValueError(f"reference point must be finite, got {list(ref_arr)}")
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    pts = pts[np.all(pts < ref_arr, axis=1)]
    if len(pts) == 0:
        return 0.0
    d = len(ref_arr)
    if d == 1:
        return float(ref_arr[0] - pts[:, 0].min())
    if d == 2:
        return _hv2d(pts, ref_arr)
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # private helper moved: keep working
        return _hv_slices(pts, ref_arr)
    return float(compute_hypervolume(pts, ref_arr))


def reference_point(baseline: Mapping, max_dwer: float | None = None,
                    objectives: Objectives | None = None, *,
                    constraints: Mapping[str, float] | None = None) -> tuple[float, ...]:
    """The point bounding the hypervolume, one value per objective (as `loss_vector`): the
    baseline's figure, an accuracy figure allowed to grow by its constraint (`max_dwer` for
    wer, `max_dcer` for cer; DEFAULT_REF_DWER when none). Default objectives: (wer,
    latency_median_s). KeyError when the baseline lacks an objective's figure."""
    limits = dict(constraints or {})
    if max_dwer is not None:
        limits["max_dwer"] = max_dwer
    out = []
    for metric, direction in _norm_objectives(objectives):
        fig = BY_NAME.get(metric)
        slack = 0.0 if fig is None or fig.allowance is None else float(
            limits.get(fig.allowance, DEFAULT_REF_DWER))
        v = float(baseline[metric]) * (1.0 + slack)
        out.append(-v if direction == "max" else v)
    return tuple(out)


def front_hypervolume(front: Iterable[Mapping], baseline: Mapping,
                      max_dwer: float | None = None, objectives: Objectives | None = None, *,
                      constraints: Mapping[str, float] | None = None) -> float:
    """Hypervolume of rows in the objectives against `reference_point`."""
    pts = [v for v in (loss_vector(r, objectives) for r in front) if v is not None]
    return hypervolume(pts, reference_point(baseline, max_dwer, objectives,
                                            constraints=constraints))


def is_baseline_recipe(recipe: Mapping | None) -> bool:
    """The recipe changes nothing (`Recipe.is_baseline`); False when it is no valid recipe."""
    try:
        from ..techniques.recipe import Recipe

        return Recipe.from_flat(dict(recipe or {})).is_baseline
    except (ImportError, TypeError, ValueError):
        return False


def _speed_objective(objs: list[tuple[str, str]]) -> tuple[str, str]:
    """The objective that measures speed (a latency in seconds, or the speed-up); else the
    last one."""
    for m, d in objs:
        fig = BY_NAME.get(m)
        if fig is not None and (fig.unit == "s" or m == "speedup"):
            return m, d
    return objs[-1]


def knee(front: Sequence[Mapping], objectives: Objectives | None = None) -> Row | None:
    """The trial to ship from a front: never the baseline (shipping the uncompressed model is
    not a choice the search made). Among the other front points: on one or two, the fastest;
    on more, the point farthest from the line between the two extremes, in coordinates
    normalised to [0, 1] per objective (first two objectives); a straight front gives the
    point closest to the ideal (0, 0) corner."""
    objs = _norm_objectives(objectives)
    rows = [r for r in front if loss_vector(r, objs[:2]) is not None
            and not is_baseline_recipe(r.get("recipe"))]
    if not rows:
        return None
    if len(objs) == 1:
        return min(rows, key=lambda r: loss_vector(r, objs)[0])
    if len(rows) <= 2:
        speed = [_speed_objective(objs)]
        return min(rows, key=lambda r: loss_vector(r, speed)[0])
    objs = objs[:2]
    pts = np.array([loss_vector(r, objs) for r in rows], dtype=float)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (pts - lo) / span
    order = np.lexsort((z[:, 1], z[:, 0]))
    a, b = z[order[0]], z[order[-1]]  # best in objective 1, worst in objective 1
    direction = b - a
    length = float(np.hypot(*direction))
    ideal = np.hypot(z[:, 0], z[:, 1])
    if length == 0:
        return rows[int(np.argmin(ideal))]
    dist = np.abs(direction[0] * (z[:, 1] - a[1]) - direction[1] * (z[:, 0] - a[0])) / length
    if float(dist.max()) <= 1e-12:
        return rows[int(np.argmin(ideal))]
    best = max(range(len(rows)), key=lambda i: (round(float(dist[i]), 12), -ideal[i]))
    return rows[best]
