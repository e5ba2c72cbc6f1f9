"""Which trial `python -m sweep.export` picks: by rule (--max-dwer, --max-latency, --knee)
from a sweep's trial rows (pure: no MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import pareto, report
from ..results.figures import BY_NAME

SHOWN = 3  # closest trials listed when none meets the rule
_DESCRIBED = ("wer", "dwer", "latency_median_s", "speedup")  # always in `describe_row`


class ExportError(ValueError):
    """Nothing to export as asked; the message says why (and lists the closest trials)."""


@dataclass(frozen=True)
class Rule:
    """How to pick a trial: its CLI flag, the figure the limit bounds, what is best inside."""
    flag: str
    bounded: str | None  # figure that must be <= the limit (None: the knee of the front)
    best: tuple[str, str]  # minimised within the bound, then the other objective
    text: str


RULES = {
    "max_dwer": Rule("--max-dwer", "dwer", ("latency_median_s", "wer"),
                     "the fastest trial with dWER <= {limit:.1%}"),
    "max_latency": Rule("--max-latency", "latency_median_s", ("wer", "latency_median_s"),
                        "the most accurate trial with median latency <= {limit:g} s"),
    "knee": Rule("--knee", None, ("wer", "latency_median_s"), "the knee of the sweep's front"),
}


def describe_row(r: dict, objectives=None) -> str:
    """One line: run id, recipe, the study's figures and any other objective of the sweep."""
    figs = (f"WER {r.get('wer', float('nan')):.3f} (dWER {r.get('dwer', float('nan')):+.1%}), "
            f"median latency {r.get('latency_median_s', float('nan')):.3f} s, speed-up "
            f"{r.get('speedup', float('nan')):.2f}x")
    figs += "".join(f", {m} {report._fmt(r.get(m), BY_NAME[m].fmt)}"
                    for m, _ in objectives or () if m in BY_NAME and m not in _DESCRIBED)
    return f"{r['run_id']}  {report.describe_recipe(r['recipe'])}: {figs}"


def pick(rows: list[dict], rule: str, limit: float | None = None, *, objectives=None,
         constraints=None, baseline=None) -> dict:
    """The trial row `rule` picks; ExportError listing the closest trials when none fits."""
    r = RULES[rule]
    if not rows:
        raise ExportError("the sweep has no finished trial with figures")
    if r.bounded is None:
        front, unresolved = pareto.front_split(rows, objectives, constraints=constraints,
                                               baseline=baseline)
        chosen = pareto.knee(front, objectives)
        if chosen is not None:
            return chosen
        if front or unresolved:  # the knee is never the baseline, and it alone is on the front
            names = ", ".join(m for m, _ in pareto._norm_objectives(objectives))
            inside = (f"; {len(unresolved)} beat it only inside the data's resolution (a dWER "
                      "interval holding 0), marked `unresolved` in trials.csv"
                      if unresolved else "")
            raise ExportError(f"`--knee` found only the baseline on the sweep's front ({names}): "
                              f"no trial beats the uncompressed model{inside}, so there is "
                              "nothing to export; pick a trial anyway with --run RUN_ID or "
                              "--max-dwer")
        over = lambda row: sum(max(0.0, v) for v in pareto.constraint_values(  # noqa: E731
            row, constraints, baseline))
        why = (f"no trial meets the sweep's constraints {constraints}" if constraints else
               "no finished trial has the figures of the sweep's objectives")
        shown = "violation"
    else:
        ranked = [x for x in rows if all(pareto._num(x.get(k)) is not None for k in r.best)]
        inside = [x for x in ranked if x.get(r.bounded, float("inf")) <= limit]
        if inside:
            return min(inside, key=lambda x: tuple(x[k] for k in r.best))
        over = lambda row: row.get(r.bounded, float("inf")) - limit  # noqa: E731
        why = f"no trial meets {r.flag} {limit:g} ({r.text.format(limit=limit)})"
        shown = r.bounded
    closest = sorted(rows, key=over)[:SHOWN]
    raise ExportError(f"{why}; the closest ({shown} over the limit):\n" + "\n".join(
        f"  +{over(x):.4g}  {describe_row(x, objectives)}" for x in closest))
