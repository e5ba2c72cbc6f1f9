"""Printed tables, front files (CSV/JSON), the front plot and the HTML report of a sweep. Pure.

Percentages appear only in printed tables; files hold fractions. matplotlib is imported lazily
inside `plot_front`. Imports neither Ray, MLflow nor torch.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import figures
from .pareto import (Objectives, _figure, _norm_objectives, _num, front_hypervolume,
                     front_split, is_baseline_recipe, knee, reference_point)
from .pareto import verdict as pareto_verdict


def _recipe_defaults() -> dict[str, Any]:
    try:
        from ..techniques.recipe import PARAMS
    except ImportError:  # recipe not importable: show every key
        return {}
    return {name: p.default for name, p in PARAMS.items()}


def describe_recipe(recipe: Mapping | None, base_recipe: Mapping | None = None) -> str:
    """Short label: `Recipe.describe()` (e.g. "int8 dyn (all), prune l1 0.30 [cuda]") when
    the flat dict makes a valid recipe, else the keys that differ from `base_recipe` (or the
    recipe defaults)."""
    recipe = dict(recipe or {})
    try:
        from ..techniques.recipe import Recipe, RecipeError
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


_STUDY = ("wer", "dwer", "cer", "dcer", "latency_median_s")  # the study's own table columns


def _extra(objectives: Objectives | None) -> list[figures.Figure]:
    """Objectives the study's table does not show already: a column each."""
    return [figures.BY_NAME[m] for m, _ in _norm_objectives(objectives)
            if m not in _STUDY and m in figures.BY_NAME]


def _cell(fig: figures.Figure, v) -> str:
    return "—" if _num(v) is None else fig.shown(_num(v))


def baseline_row(rows: Iterable[Mapping]) -> Mapping | None:
    """The finished trial that measured the unmodified model, if `rows` hold one: shown as the
    baseline, never a second time under its recipe's name ("fp32")."""
    return next((r for r in rows if r.get("status", "ok") == "ok"
                 and is_baseline_recipe(r.get("recipe"))), None)


def verdict(row: Mapping) -> str:
    """What the data says of a trial's accuracy, from its 95% dWER interval: "worse" or
    "better" only when the interval excludes 0, else "no measurable change" (`pareto.verdict`,
    which the front's ties use too); "—" without an interval."""
    return pareto_verdict(row) or "—"


UNRESOLVED = "unresolved, off the front"
UNRESOLVED_NOTE = (f"({UNRESOLVED}): its WER gain over the baseline is inside its 95% interval "
                   "(no measurable change); without it, the baseline dominates it")


def format_table(rows: Iterable[Mapping], baseline: Mapping, *,
                 base_recipe: Mapping | None = None,
                 objectives: Objectives | None = None,
                 unresolved: Iterable[Mapping] = ()) -> str:
    """A fixed-width table like the study's, the baseline first: Configuration, WER, dWER, CER,
    dCER, time per audio, delta, then one column per objective not among them. dWER/dCER are
    relative changes and delta the relative latency change, printed in percent (the only place
    percentages appear). A row measuring the baseline itself (on the front) is that first line,
    labelled so, not a row of its own. `unresolved` (`pareto.unresolved`): rows listed after
    the others, marked, with a line saying why they are not on the front."""
    extra = _extra(objectives)
    head = ("Configuration", "WER", "dWER", "CER", "dCER", "time per audio", "delta",
            *(f.name for f in extra), "accuracy")
    base_recipe = base_recipe if base_recipe is not None else baseline.get("recipe")
    base_lat = _num(baseline.get("latency_median_s"))

    def cells(label, row, relative=True):
        lat = _num(row.get("latency_median_s"))
        delta = None if lat is None or not base_lat else lat / base_lat - 1.0
        rel = _pct if relative else (lambda x: "—")
        return (label, _fmt(row.get("wer"), ".3f"), rel(_figure(row, "dwer", baseline)),
                _fmt(row.get("cer"), ".3f"), rel(_figure(row, "dcer", baseline)),
                "—" if lat is None else f"{lat:.3f} s", rel(delta),
                *(_cell(f, row.get(f.name)) for f in extra),
                verdict(row) if relative else "—")

    rows = list(rows)
    own = baseline_row(rows)
    body = [cells("baseline", baseline, relative=False) if own is None else
            cells("baseline (on the front)", own)]
    marked = list(unresolved)  # trials only: a baseline is never taken off by a gain of its own
    for row in [*rows, *marked]:
        if row is own:
            continue
        label = describe_recipe(row.get("recipe"), base_recipe)
        status = row.get("status", "ok")
        label += f" ({UNRESOLVED})" if any(row is m for m in marked) else (
            "" if status == "ok" else f" ({status})")
        body.append(cells(label, row))
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), sep, *(line(r) for r in body),
                      *([UNRESOLVED_NOTE] if marked else [])])


def front_columns(front: Sequence[Mapping], baseline: Mapping,
                  knee_row: Mapping | None = None) -> dict[str, list]:
    """The front as columns (MLflow's `log_table`): each recipe in `describe`'s words and in
    full, the knee marked, figures as fractions."""
    own = baseline_row(front)
    cols = {"trial_id": [], "recipe": [], "knee": [], "wer": [], "dwer": [], "dwer_ci95_lo": [],
            "dwer_ci95_hi": [], "latency_median_s": [], "speedup": [], "device": [],
            "run_id": [], "full_recipe": []}
    for r in front:
        for k, v in (("trial_id", str(r.get("trial_id"))), ("recipe", "baseline" if r is own
                     else describe_recipe(r.get("recipe"))), ("knee", r is knee_row),
                     ("dwer", _figure(r, "dwer", baseline)),
                     ("speedup", _figure(r, "speedup", baseline)),
                     ("full_recipe", recipe_string(r.get("recipe")))):
            cols[k].append(v)
        for k in ("wer", "dwer_ci95_lo", "dwer_ci95_hi", "latency_median_s", "device", "run_id"):
            cols[k].append(r.get(k))
    return cols


def resolution(rows: Iterable[Mapping], front: Iterable[Mapping] = ()) -> tuple[float, int] | None:
    """(median half-width of the 95% dWER intervals, how many trials): two recipes whose dWER
    differ by less are not told apart by this data. Over the front's trials besides the
    baseline (a relative interval widens with the change, so broken trials would overstate
    it), else over every finished trial; None without intervals."""
    def halves(rs):
        return sorted((hi - lo) / 2 for r in rs if r.get("status", "ok") == "ok"
                      and not is_baseline_recipe(r.get("recipe"))
                      and (lo := _num(r.get("dwer_ci95_lo"))) is not None
                      and (hi := _num(r.get("dwer_ci95_hi"))) is not None)

    half = halves(front) or halves(rows)
    if not half:
        return None
    n = len(half)
    return (half[n // 2] if n % 2 else (half[n // 2 - 1] + half[n // 2]) / 2), n


# After the objectives, the reported figures (`sweep.results.figures`, destination `report`),
# then these.
_ROW_FIELDS = ("device", "status", "front", "stop_reason", "trial_id")


def recipe_string(recipe: Mapping | None) -> str:
    """`k=v,k=v` as `Recipe.parse` reads it."""
    return ",".join(f"{k}={f'{v:.10g}' if isinstance(v, float) else v}"
                    for k, v in (recipe or {}).items())


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(jsonable(v), ensure_ascii=False, sort_keys=True)
    if v is None:
        return ""
    return v


def _columns(rows: Sequence[Mapping], objectives: Objectives | None) -> list[str]:
    cols = list(dict.fromkeys(m for m, _ in _norm_objectives(objectives)))
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    cols += [c for c in (*figures.keys("report"), *_ROW_FIELDS) if c in present and c not in cols]
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


def jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, numpy/torch scalars plain numbers,
    other objects their str() (shared with bench/, which writes the same kind of rows)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if f.is_integer() and type(x).__name__.startswith(("int", "uint")):
        return int(f)
    return f if math.isfinite(f) else None


def write_front(rows: Sequence[Mapping], baseline: Mapping, out_dir: str | os.PathLike,
                objectives: Objectives | None = None, *,
                constraints: Mapping[str, float] | None = None) -> dict[str, Path]:
    """Write `pareto.csv` (front rows; the objectives first: `wer`, `latency_median_s` by
    default), `trials.csv` (every row, its `front` column "member", "unresolved" (on the front
    by point estimates only: `pareto.front_split`) or empty) and `pareto.json` (objectives,
    constraints, baseline, reference point, hypervolume, knee, front, the unresolved trials'
    ids). Returns the paths by name. Per-utterance details are left out."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    objs = _norm_objectives(objectives)
    front, unresolved = front_split(rows, objs, constraints=constraints, baseline=baseline)
    paths = {"pareto_csv": out / "pareto.csv", "trials_csv": out / "trials.csv",
             "pareto_json": out / "pareto.json"}
    _write_csv(paths["pareto_csv"], front, objs)
    marks = {**{id(r): "unresolved" for r in unresolved}, **{id(r): "member" for r in front}}
    _write_csv(paths["trials_csv"], [{**r, "front": marks.get(id(r), "")} for r in rows], objs)
    k = knee(front, objs)
    summary = {
        "objectives": [list(o) for o in objs],
        "constraints": dict(constraints or {}),
        "baseline": {k_: v for k_, v in baseline.items() if k_ != "utterances"},
        "n_trials": len(rows),
        "n_ok": sum(1 for r in rows if r.get("status", "ok") == "ok"),
        "front": [{k_: v for k_, v in r.items() if k_ != "utterances"} for r in front],
        "knee": None if k is None else k.get("trial_id"),
        "unresolved": [r.get("trial_id") for r in unresolved],
    }
    if all(_num(baseline.get(m)) for m, _ in objs):  # a baseline on every objective
        summary["reference_point"] = list(reference_point(baseline, None, objs,
                                                          constraints=constraints))
        summary["hypervolume"] = front_hypervolume(front, baseline, None, objs,
                                                   constraints=constraints)
    paths["pareto_json"].write_text(
        json.dumps(jsonable(summary), indent=2, ensure_ascii=False), encoding="utf-8")
    return paths


def axes(objectives: Objectives | None = None) -> tuple[str, str]:
    """(y, x) of the front's plots: the first two objectives, a single one paired with a
    default objective (y = wer, x = latency_median_s by default)."""
    ms = list(dict.fromkeys([m for m, _ in _norm_objectives(objectives)]
                            + [m for m, _ in figures.DEFAULT_OBJECTIVES]))
    return ms[0], ms[1]


def axis_label(metric: str) -> str:
    fig = figures.BY_NAME.get(metric)
    if metric in ("wer", "cer") or fig is None:
        return metric.upper() if fig else metric
    return f"{metric} ({fig.unit} per audio)" if fig.unit == "s" else (
        f"{metric} ({fig.unit})" if fig.unit else metric)


# Share of an axis' span left free on each side of what it is chosen for.
PAD = 0.12


def axis_range(values: Iterable[Any], log: bool = False) -> tuple[float, float, bool]:
    """(lo, hi, log) of one axis chosen for `values` (the front and the baseline): their span
    padded by PAD on each side, in log10 when asked and every value is positive (else linear).
    A single value gets +-10% of itself around it."""
    vs = [v for v in map(_num, values) if v is not None]
    log = log and bool(vs) and min(vs) > 0
    ts = [math.log10(v) for v in vs] if log else vs
    lo, hi = (min(ts), max(ts)) if ts else (0.0, 1.0)
    span = (hi - lo) or (0.04 if log else abs(hi) * 0.2) or 0.1
    lo, hi = lo - span * PAD, hi + span * PAD
    return (10 ** lo, 10 ** hi, True) if log else (lo, hi, False)


def front_view(front: Sequence[Mapping], baseline: Mapping, objectives: Objectives | None = None,
               log: bool = False, rows: Sequence[Mapping] = ()) -> dict[str, tuple]:
    """The plots' axes: {"y": (lo, hi, log), "x": ...} of `axes(objectives)`. Linear: chosen for
    the front, spanning the front and the baseline only, so that a broken trial (WER 1.5)
    cannot squash the front into a line; points beyond are drawn at the edge, marked. Log
    (the option): every finished trial of `rows` too, on log10 axes that keep the front
    apart from them."""
    ym, xm = axes(objectives)
    shown = [*front, baseline, *(r for r in rows if log and r.get("status", "ok") == "ok")]
    return {k: axis_range([r.get(m) for r in shown], log) for k, m in (("y", ym), ("x", xm))}


def beyond(v: Any, rng: tuple[float, float, bool]) -> float:
    """`v` moved onto the axis' range (a point beyond it is drawn at its edge)."""
    return min(max(float(v), rng[0]), rng[1])


def plot_front(rows: Sequence[Mapping], front: Sequence[Mapping], baseline: Mapping,
               path: str | os.PathLike, *, title: str | None = None,
               objectives: Objectives | None = None, log: bool = False) -> Path:
    """PNG: every ok trial grey, the front highlighted and connected as a staircase, the
    baseline a star, the knee circled. y, x = the first two objectives (`axes`): wer and
    latency_median_s by default, their ranges chosen for the front (`front_view`; with `log`,
    every trial on log10 axes); trials beyond them are hollow triangles at the edge. The ranges
    are in the PNG's `HYPER axes` text (JSON)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy; Agg, no display
    from matplotlib.figure import Figure

    ym, xm = axes(objectives)
    view = front_view(front, baseline, objectives, log, rows)
    fig = Figure(figsize=(7.5, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def drawn(rs):  # rows with both plotted figures (a 1-objective front may lack one)
        return [r for r in rs if r.get("status", "ok") == "ok" and _num(r.get(ym)) is not None
                and _num(r.get(xm)) is not None]

    def inside(r):
        return beyond(r[xm], view["x"]) == r[xm] and beyond(r[ym], view["y"]) == r[ym]

    pts = [(r[xm], r[ym]) for r in drawn(rows) if inside(r)]
    out = [(beyond(r[xm], view["x"]), beyond(r[ym], view["y"])) for r in drawn(rows)
           if not inside(r)]
    if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=18, c="#b0b0b0", label=f"trials ({len(drawn(rows))})", zorder=2)
    if out:
        xs, ys = zip(*out)
        ax.scatter(xs, ys, s=44, marker="^", facecolors="none", edgecolors="#555", zorder=2,
                   clip_on=False, label=f"beyond the axes, at the edge ({len(out)})")
    fpts = sorted((r[xm], r[ym]) for r in drawn(front))
    if fpts:
        fx, fy = zip(*fpts)
        ax.step(fx, fy, where="post", c="#d62728", lw=1.3, zorder=3)
        ax.scatter(fx, fy, s=36, c="#d62728", label=f"Pareto front ({len(fpts)})", zorder=4)
        k = knee(front, objectives)
        if k is not None and drawn([k]):
            ax.scatter([k[xm]], [k[ym]], s=160, facecolors="none",
                       edgecolors="#1f77b4", linewidths=1.8, label="knee", zorder=5)
    if _num(baseline.get(ym)) is not None and _num(baseline.get(xm)):
        ax.scatter([baseline[xm]], [baseline[ym]], marker="*", s=220,
                   c="#2ca02c", edgecolors="black", label="baseline", zorder=6)
    for k, setlim, setscale in (("x", ax.set_xlim, ax.set_xscale),
                                ("y", ax.set_ylim, ax.set_yscale)):
        setscale("log" if view[k][2] else "linear")
        setlim(view[k][0], view[k][1])
    ax.set_xlabel(axis_label(xm))
    ax.set_ylabel(axis_label(ym))
    ax.set_title(title or f"HYPER: {axis_label(ym)} vs {xm}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"HYPER axes": json.dumps(
        {"y": [ym, *view["y"]], "x": [xm, *view["x"]]})})
    return path


SCREEN_COLUMNS = ("dim", "value", "anchor", "status", "dwer", "speedup", "clips_measured",
                  "reason")


def write_screening(rows: Sequence[Mapping], path: Path) -> Path:
    """The screening table (`sweep.search.screen.table`) as CSV: one row per single change."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(SCREEN_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in SCREEN_COLUMNS})
    return path


def format_screening(rows: Sequence[Mapping]) -> str:
    """The screening table for the console: each change alone, dWER and speed-up in percent."""
    lines = [f"{'change':<44} {'from':<10} {'dWER':>8} {'speed-up':>9}  status"]
    for r in rows:
        d, sp = _num(r.get("dwer")), _num(r.get("speedup"))
        lines.append(f"{str(r['dim']) + '=' + str(r['value']):<44} {r['anchor']:<10} "
                     f"{'—' if d is None else format(d, '+.1%'):>8} "
                     f"{'—' if sp is None else format(sp, '.2f') + 'x':>9}  "
                     f"{r['status']}{': ' + str(r['reason'])[:60] if r.get('reason') else ''}")
    return "\n".join(lines)
