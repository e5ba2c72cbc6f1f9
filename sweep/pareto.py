"""Pareto fronts, hypervolume, knee, constraints and reports over trial rows. Pure.

A *row* is a plain dict for one trial with at least `trial_id`, `wer`, `cer`, `dwer`, `dcer`,
`latency_median_s`, `speedup`, `device`, `status` and `recipe` (the flat recipe dict). Rows whose
`status` is not "ok" (failed, timed out, looped...) never reach a front.

Units: fractions everywhere (`dwer` 0.05 = 5% relatively worse than the baseline, as
`sweep.scoring.relative` computes it); percentages appear only in `format_table`'s printed text.

Imports neither Ray, MLflow nor torch; matplotlib is imported lazily inside `plot_front`.
"""

from __future__ import annotations

import csv
import html
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Metrics a search may optimise, and the constraint keys (`Space` validates against these).
METRICS = ("wer", "cer", "latency_median_s", "latency_mean_s", "latency_p90_s", "model_size_mb")
DIRECTIONS = ("min", "max")
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (("wer", "min"), ("latency_median_s", "min"))
CONSTRAINTS = ("max_dwer", "max_dcer", "max_latency_s", "min_speedup")
# Reference point's relative WER allowance when no `max_dwer` constraint is given.
DEFAULT_REF_DWER = 0.5

Row = dict[str, Any]
Objectives = Sequence[tuple[str, str]]


# ---------------------------------------------------------------------------------------------
# constraints (shared with `sweep.space.Space.violation`)


def _relative(value: float, base: float) -> float:
    """Same definition as `sweep.scoring.relative`: relative change, absolute when base is 0."""
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
    """`dwer`, `dcer`, `speedup` from the row (measured against the baseline of the same
    process), else derived from the absolute figures and `baseline`."""
    v = _num(row.get(key))
    if v is not None:
        return v
    base = baseline or row.get("baseline") or {}
    if key in ("dwer", "dcer"):
        metric = key[1:]
        t, b = _num(row.get(metric)), _num(base.get(metric))
        return None if t is None or b is None else _relative(t, b)
    if key == "speedup":
        t, b = _num(row.get("latency_median_s")), _num(base.get("latency_median_s"))
        return None if not t or b is None else b / t
    return None


def constraint_values(row: Mapping, constraints: Mapping[str, float] | None,
                      baseline: Mapping | None = None) -> list[float]:
    """Optuna-style constraint values, one per constraint in `constraints`' order: <= 0 is
    feasible. A figure that is missing (failed trial) gives +inf.

    max_dwer: dwer - max_dwer; max_dcer: dcer - max_dcer;
    max_latency_s: latency_median_s - max_latency_s; min_speedup: min_speedup - speedup.
    """
    out = []
    for key, limit in (constraints or {}).items():
        if key == "max_dwer":
            v = _figure(row, "dwer", baseline)
            out.append(math.inf if v is None else v - limit)
        elif key == "max_dcer":
            v = _figure(row, "dcer", baseline)
            out.append(math.inf if v is None else v - limit)
        elif key == "max_latency_s":
            v = _num(row.get("latency_median_s"))
            out.append(math.inf if v is None else v - limit)
        elif key == "min_speedup":
            v = _figure(row, "speedup", baseline)
            out.append(math.inf if v is None else limit - v)
        else:
            raise ValueError(f"unknown constraint `{key}`; allowed: {', '.join(CONSTRAINTS)}")
    return [float(v) for v in out]


def feasible(row: Mapping, constraints: Mapping[str, float] | None,
             baseline: Mapping | None = None) -> bool:
    """True when the row ran (`status == "ok"`) and meets every constraint."""
    if row.get("status", "ok") != "ok":
        return False
    return all(v <= 0 for v in constraint_values(row, constraints, baseline))


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


def _nondominated_mask(losses: np.ndarray) -> np.ndarray:
    """True for rows no other row dominates (<= everywhere and < somewhere). Equal points do
    not dominate each other, so ties all stay."""
    n = len(losses)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        le = np.all(losses <= losses[i], axis=1)
        lt = np.any(losses < losses[i], axis=1)
        if np.any(le & lt):
            mask[i] = False
    return mask


def pareto_front(rows: Iterable[Mapping], objectives: Objectives | None = None, *,
                 constraints: Mapping[str, float] | None = None,
                 baseline: Mapping | None = None) -> list[Row]:
    """The non-dominated rows among those that ran (`status == "ok"`), have every objective, and
    (when `constraints` is given) are feasible. Sorted by the first objective, then the rest."""
    keep, losses = _candidates(rows, objectives, constraints, baseline)
    if not keep:
        return []
    mask = _nondominated_mask(losses)
    idx = [i for i in range(len(keep)) if mask[i]]
    idx.sort(key=lambda i: tuple(losses[i]))
    return [keep[i] for i in idx]


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


def reference_point(baseline: Mapping, max_dwer: float | None = None) -> tuple[float, float]:
    """(wer, latency_median_s) bounding the hypervolume: the baseline's WER allowed to grow by
    `max_dwer` (relative; DEFAULT_REF_DWER when None) and the baseline's latency."""
    allowance = DEFAULT_REF_DWER if max_dwer is None else float(max_dwer)
    return (float(baseline["wer"]) * (1.0 + allowance), float(baseline["latency_median_s"]))


def front_hypervolume(front: Iterable[Mapping], baseline: Mapping,
                      max_dwer: float | None = None) -> float:
    """Hypervolume of rows in (wer, latency_median_s) against `reference_point`."""
    pts = [(r["wer"], r["latency_median_s"]) for r in front
           if _num(r.get("wer")) is not None and _num(r.get("latency_median_s")) is not None]
    return hypervolume(pts, reference_point(baseline, max_dwer))


def knee(front: Sequence[Mapping], objectives: Objectives | None = None) -> Row | None:
    """The front point farthest from the line between the front's two extremes, in
    coordinates normalised to [0, 1] per objective (first two objectives). A front of one or
    two points, or a straight one, gives the point closest to the ideal (0, 0) corner."""
    objs = _norm_objectives(objectives)[:2]
    rows = [r for r in front if loss_vector(r, objs) is not None]
    if not rows:
        return None
    if len(objs) == 1:
        return min(rows, key=lambda r: loss_vector(r, objs)[0])
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


# ---------------------------------------------------------------------------------------------
# printing and files


def _recipe_defaults() -> dict[str, Any]:
    try:
        from .recipe import PARAMS
    except ImportError:  # recipe not importable: show every key
        return {}
    return {name: p.default for name, p in PARAMS.items()}


def describe_recipe(recipe: Mapping | None, base_recipe: Mapping | None = None) -> str:
    """Short label: `Recipe.describe()` (e.g. "int8 dyn (all), prune l1 0.30 [cuda]") when
    the flat dict makes a valid recipe, else the keys that differ from `base_recipe` (or the
    recipe defaults)."""
    recipe = dict(recipe or {})
    try:
        from .recipe import Recipe, RecipeError
    except ImportError:
        pass
    else:
        try:
            return Recipe.from_flat(recipe).describe()
        except (RecipeError, TypeError, ValueError):
            pass
    base = dict(base_recipe) if base_recipe else _recipe_defaults()
    parts = [f"{k}={_short(v)}" for k, v in recipe.items()
             if k != "device" and (k not in base or base[k] != v)]
    label = " ".join(parts) or "baseline"
    if "device" in recipe:
        label += f" [{recipe['device']}]"
    return label


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "—"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def _fmt(x: Any, spec: str) -> str:
    v = _num(x)
    return "—" if v is None else format(v, spec)


def format_table(rows: Iterable[Mapping], baseline: Mapping, *,
                 base_recipe: Mapping | None = None) -> str:
    """A fixed-width table like the study's, the baseline first: Configuration, WER, dWER, CER,
    dCER, time per audio, delta. dWER/dCER are relative changes and delta the relative latency
    change, printed in percent (the only place percentages appear)."""
    head = ("Configuration", "WER", "dWER", "CER", "dCER", "time per audio", "delta")
    base_recipe = base_recipe if base_recipe is not None else baseline.get("recipe")
    body = [("baseline", _fmt(baseline.get("wer"), ".3f"), "—", _fmt(baseline.get("cer"), ".3f"),
             "—", _fmt(baseline.get("latency_median_s"), ".3f") + " s", "—")]
    base_lat = _num(baseline.get("latency_median_s"))
    for row in rows:
        label = describe_recipe(row.get("recipe"), base_recipe)
        status = row.get("status", "ok")
        if status != "ok":
            label += f" ({status})"
        lat = _num(row.get("latency_median_s"))
        delta = None if lat is None or not base_lat else lat / base_lat - 1.0
        body.append((
            label,
            _fmt(row.get("wer"), ".3f"), _pct(_figure(row, "dwer", baseline)),
            _fmt(row.get("cer"), ".3f"), _pct(_figure(row, "dcer", baseline)),
            "—" if lat is None else f"{lat:.3f} s", _pct(delta),
        ))
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(r) for r in body)])


FRONT_FIRST = ("wer", "latency_median_s")
_ROW_ORDER = ("cer", "dwer", "dcer", "speedup", "latency_mean_s", "latency_p90_s",
              "model_size_mb", "device", "status", "trial_id")


def recipe_string(recipe: Mapping | None) -> str:
    """`k=v,k=v` as `Recipe.parse` reads it."""
    return ",".join(f"{k}={f'{v:.10g}' if isinstance(v, float) else v}"
                    for k, v in (recipe or {}).items())


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(_jsonable(v), ensure_ascii=False, sort_keys=True)
    if v is None:
        return ""
    return v


def _columns(rows: Sequence[Mapping], objectives: Objectives | None) -> list[str]:
    cols = list(FRONT_FIRST)
    for metric, _ in _norm_objectives(objectives):
        if metric not in cols:
            cols.append(metric)
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    cols += [c for c in _ROW_ORDER if c in present and c not in cols]
    cols += sorted(k for k in present if k not in cols and k not in ("recipe", "utterances"))
    cols.append("recipe")
    rkeys: list[str] = []
    for r in rows:
        for k in r.get("recipe") or {}:
            if k not in rkeys and k not in cols:
                rkeys.append(k)
    return cols + rkeys


def _csv_rows(rows: Sequence[Mapping], cols: list[str]) -> list[dict]:
    out = []
    for r in rows:
        recipe = r.get("recipe") or {}
        d = {}
        for c in cols:
            if c == "recipe":
                d[c] = recipe_string(recipe)
            elif c in r:
                d[c] = _csv_value(r[c])
            else:
                d[c] = _csv_value(recipe.get(c))
        out.append(d)
    return out


def _write_csv(path: Path, rows: Sequence[Mapping], objectives) -> None:
    cols = _columns(rows, objectives)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(_csv_rows(rows, cols))


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, unknown objects their str()."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return str(x)


def write_front(rows: Sequence[Mapping], baseline: Mapping, out_dir: str | os.PathLike,
                objectives: Objectives | None = None, *,
                constraints: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Write `pareto.csv` (front rows; `wer`, `latency_median_s` first), `trials.csv` (every
    row) and `pareto.json` (objectives, constraints, baseline, reference point, hypervolume,
    knee, front). Returns the paths by name. Per-utterance details are left out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    objs = _norm_objectives(objectives)
    front = pareto_front(rows, objs, constraints=constraints, baseline=baseline)
    paths = {"pareto_csv": out / "pareto.csv", "trials_csv": out / "trials.csv",
             "pareto_json": out / "pareto.json"}
    _write_csv(paths["pareto_csv"], front, objs)
    _write_csv(paths["trials_csv"], rows, objs)
    k = knee(front, objs)
    summary = {
        "objectives": [list(o) for o in objs],
        "constraints": dict(constraints or {}),
        "baseline": {k_: v for k_, v in baseline.items() if k_ != "utterances"},
        "n_trials": len(rows),
        "n_ok": sum(1 for r in rows if r.get("status", "ok") == "ok"),
        "front": [{k_: v for k_, v in r.items() if k_ != "utterances"} for r in front],
        "knee": None if k is None else k.get("trial_id"),
    }
    if _num(baseline.get("wer")) is not None and _num(baseline.get("latency_median_s")):
        max_dwer = (constraints or {}).get("max_dwer")
        summary["reference_point"] = list(reference_point(baseline, max_dwer))
        summary["hypervolume"] = front_hypervolume(front, baseline, max_dwer)
    paths["pareto_json"].write_text(
        json.dumps(_jsonable(summary), indent=2, ensure_ascii=False), encoding="utf-8")
    return paths


def plot_front(rows: Sequence[Mapping], front: Sequence[Mapping], baseline: Mapping,
               path: str | os.PathLike, *, title: str | None = None) -> Path:
    """PNG: every ok trial grey, the front highlighted and connected as a staircase, the
    baseline a star, the knee circled. x = latency_median_s, y = wer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy; Agg, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(r["latency_median_s"], r["wer"]) for r in rows
           if r.get("status", "ok") == "ok" and _num(r.get("wer")) is not None
           and _num(r.get("latency_median_s")) is not None]
    if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=18, c="#b0b0b0", label=f"trials ({len(pts)})", zorder=2)
    fpts = sorted((r["latency_median_s"], r["wer"]) for r in front)
    if fpts:
        fx, fy = zip(*fpts)
        ax.step(fx, fy, where="post", c="#d62728", lw=1.3, zorder=3)
        ax.scatter(fx, fy, s=36, c="#d62728", label=f"Pareto front ({len(fpts)})", zorder=4)
        k = knee(front)
        if k is not None:
            ax.scatter([k["latency_median_s"]], [k["wer"]], s=160, facecolors="none",
                       edgecolors="#1f77b4", linewidths=1.8, label="knee", zorder=5)
    if _num(baseline.get("wer")) is not None and _num(baseline.get("latency_median_s")):
        ax.scatter([baseline["latency_median_s"]], [baseline["wer"]], marker="*", s=220,
                   c="#2ca02c", edgecolors="black", label="baseline", zorder=6)
    ax.set_xlabel("latency_median_s (s per audio)")
    ax.set_ylabel("WER")
    ax.set_title(title or "HYPER: WER vs latency")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


_HTML_JS = """
(function(){
  var tip=document.getElementById('tip');
  document.querySelectorAll('svg .pt').forEach(function(el){
    el.addEventListener('mouseenter',function(){tip.textContent=el.getAttribute('data-info');
      tip.style.display='block';});
    el.addEventListener('mousemove',function(e){tip.style.left=(e.pageX+14)+'px';
      tip.style.top=(e.pageY+10)+'px';});
    el.addEventListener('mouseleave',function(){tip.style.display='none';});
  });
})();
"""


def write_report_html(rows: Sequence[Mapping], front: Sequence[Mapping], baseline: Mapping,
                      path: str | os.PathLike, run_links: Mapping[Any, str] | None = None, *,
                      title: str = "HYPER sweep") -> Path:
    """A self-contained HTML page (inline SVG and JS, nothing fetched): WER vs latency, hover a
    point for its recipe and figures, click it to open its MLflow run (`run_links` maps
    trial_id -> URL); then the front as a table."""
    links = {str(k): v for k, v in (run_links or {}).items()}
    front_ids = {id(r) for r in front}
    front_keys = {str(r.get("trial_id")) for r in front}
    ok = [r for r in rows if r.get("status", "ok") == "ok" and _num(r.get("wer")) is not None
          and _num(r.get("latency_median_s")) is not None]
    extra = [r for r in front if id(r) not in {id(x) for x in ok}]
    pts = ok + extra
    W, H, L, R, T, B = 760, 460, 70, 20, 20, 50
    xs = [r["latency_median_s"] for r in pts]
    ys = [r["wer"] for r in pts]
    if _num(baseline.get("latency_median_s")) is not None and _num(baseline.get("wer")) is not None:
        xs.append(baseline["latency_median_s"])
        ys.append(baseline["wer"])
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    padx, pady = (x1 - x0) * 0.06 or 0.05, (y1 - y0) * 0.06 or 0.05
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady

    def sx(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def sy(y):
        return H - B - (y - y0) / (y1 - y0) * (H - T - B)

    def info(r):
        dwer, dcer = _figure(r, "dwer", baseline), _figure(r, "dcer", baseline)
        lines = [f"trial {r.get('trial_id')}  ({r.get('device', '?')})",
                 f"WER {_fmt(r.get('wer'), '.4f')}  dWER {_fmt(dwer, '+.4f')}",
                 f"CER {_fmt(r.get('cer'), '.4f')}  dCER {_fmt(dcer, '+.4f')}",
                 (f"latency {_fmt(r.get('latency_median_s'), '.3f')} s  "
                  f"speedup {_fmt(_figure(r, 'speedup', baseline), '.2f')}x")]
        lines += [f"{k} = {v}" for k, v in (r.get("recipe") or {}).items()]
        return "\n".join(lines)

    svg = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">'),
           (f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" '
            f'stroke="#ccc"/>')]
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        yv = y0 + (y1 - y0) * i / 5
        svg.append(f'<text x="{sx(xv):.1f}" y="{H - B + 16}" text-anchor="middle">{xv:.3f}</text>')
        svg.append(f'<text x="{L - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">'
               f'latency_median_s (s per audio)</text>')
    svg.append(f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">WER</text>')
    fpts = sorted((r["latency_median_s"], r["wer"]) for r in front)
    if len(fpts) > 1:
        steps = []
        for (xa, ya), (xb, _) in itertools.pairwise(fpts):
            steps += [(xa, ya), (xb, ya)]
        steps.append(fpts[-1])
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in steps)
        svg.append(f'<polyline points="{poly}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    for r in sorted(pts, key=lambda r: str(r.get("trial_id")) in front_keys):
        on_front = id(r) in front_ids or str(r.get("trial_id")) in front_keys
        color, rad = ("#d62728", 5.5) if on_front else ("#9a9a9a", 4)
        circle = (f'<circle class="pt" cx="{sx(r["latency_median_s"]):.1f}" '
                  f'cy="{sy(r["wer"]):.1f}" r="{rad}" fill="{color}" fill-opacity="0.85" '
                  f'data-info="{html.escape(info(r))}"><title>{html.escape(info(r))}</title>'
                  f'</circle>')
        url = links.get(str(r.get("trial_id")))
        if url:
            circle = f'<a href="{html.escape(url)}" target="_blank">{circle}</a>'
        svg.append(circle)
    if _num(baseline.get("latency_median_s")) is not None and _num(baseline.get("wer")) is not None:
        bx, by = sx(baseline["latency_median_s"]), sy(baseline["wer"])
        svg.append(f'<path class="pt" d="M{bx:.1f},{by - 9:.1f} L{bx + 8:.1f},{by + 6:.1f} '
                   f'L{bx - 8:.1f},{by + 6:.1f} Z" fill="#2ca02c" stroke="black" '
                   f'data-info="baseline\nWER {_fmt(baseline.get("wer"), ".4f")}\nlatency '
                   f'{_fmt(baseline.get("latency_median_s"), ".3f")} s"><title>baseline</title>'
                   f'</path>')
    svg.append("</svg>")

    k = knee(front)
    trs = []
    for r in front:
        tid = str(r.get("trial_id"))
        cell = html.escape(tid)
        if tid in links:
            cell = f'<a href="{html.escape(links[tid])}" target="_blank">{cell}</a>'
        mark = " ◆ knee" if k is r else ""
        trs.append(
            f"<tr><td>{cell}{mark}</td><td>{_fmt(r.get('wer'), '.4f')}</td>"
            f"<td>{_fmt(_figure(r, 'dwer', baseline), '+.4f')}</td>"
            f"<td>{_fmt(r.get('latency_median_s'), '.3f')}</td>"
            f"<td>{_fmt(_figure(r, 'speedup', baseline), '.2f')}x</td>"
            f"<td>{html.escape(str(r.get('device', '')))}</td>"
            f"<td><code>{html.escape(recipe_string(r.get('recipe')))}</code></td></tr>")
    table = ("<table><tr><th>trial</th><th>WER</th><th>dWER</th><th>latency s</th>"
             "<th>speedup</th><th>device</th><th>recipe</th></tr>" + "".join(trs) + "</table>")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:20px;color:#222}}
#tip{{position:absolute;display:none;white-space:pre;background:#fff;border:1px solid #888;
padding:6px 8px;font:12px monospace;box-shadow:2px 2px 6px rgba(0,0,0,.2);pointer-events:none}}
.pt{{cursor:pointer}} table{{border-collapse:collapse;margin-top:16px;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}} code{{font-size:12px}}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{len(ok)} trials ran, {len(front)} on the Pareto front (red). Baseline: WER
{_fmt(baseline.get('wer'), '.4f')}, {_fmt(baseline.get('latency_median_s'), '.3f')} s per audio.
dWER is the relative WER change (0.05: 5 percent worse). Hover a point for its recipe; click it to
open its MLflow run.</p>
{''.join(svg)}
<div id="tip"></div>
<h3>Pareto front</h3>
{table}
<script>{_HTML_JS}</script>
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
