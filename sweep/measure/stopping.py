"""Stopping a trial before its last clip: when it clearly cannot be feasible, or is far slower
than the baseline. Pure (numpy and `scoring`): the evaluation core calls `Stopper.check` after
every clip with the rows measured so far and the baseline's rows on the same clips.

The accuracy test is paired and sequential. At each look (after `min_clips` clips, then at
doubling counts) it bounds the relative WER change on the clips measured so far from below,
pairing each clip's errors with the baseline's on that clip, and stops when the bound is above
the budget. The bound is the ratio estimator's (dWER = sum of trial errors / sum of baseline
errors - 1) with its linearised standard error and Student's t quantile on n - 1 degrees of
freedom: a percentile bootstrap on 4 to 8 clips is too narrow and stopped 7% of within-budget
trials in the simulation test at alpha 5%. The looks share the error rate `alpha` equally
(Bonferroni alpha spending): the chance that a trial whose true dWER is within budget gets
stopped at *any* look is at most about `alpha`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from . import scoring

ON_OFF = ("auto", "on", "off")


class Stopped(RuntimeError):
    """A trial stopped before its last clip; `reason` says why, in a line."""

    kind = "stopped"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TooSlow(Stopped):
    """Already far slower than the baseline on the same clips: not worth finishing."""

    kind = "too_slow"


class Infeasible(Stopped):
    """Its dWER interval's lower bound is above the budget: it cannot be feasible."""

    kind = "over_budget"


class Loops(Stopped):
    """It loops (runs to the token cap) or transcribes nothing on most clips where the
    baseline does neither: a broken model, whatever the budget."""

    kind = "loops"


class Dominated(Stopped):
    """At a rung, a trial that finished the whole set did better on both accuracy and speed
    on the same clips, or the point estimate is over the budget (`--rungs`)."""

    kind = "rung"


@dataclass(frozen=True)
class EarlyStop:
    """When a trial is stopped early for accuracy. `enabled=False`: never (slowness aside)."""

    enabled: bool = True
    max_dwer: float | None = None  # the budget (relative WER); None: the loop test alone
    min_clips: int = 4  # the first look; later looks at 2x, 4x, ... as many clips
    alpha: float = 0.05  # chance of stopping a trial that is within budget, over all looks
    loop_share: float = 0.5  # stop when it loops on this share of the clips measured (beyond
    #                          the baseline's loops on them): a loop costs the whole token cap
    loop_run: int = 2  # ... and, before the first look, once each of its first loop_run clips
    #                    loops where the baseline does not (a broken model's clip costs the cap,
    #                    several times a good one's); 0 = only at the looks

    def __post_init__(self):
        if self.min_clips < 1:
            raise ValueError(f"`early_stop.min_clips` must be >= 1, got {self.min_clips=}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"`early_stop.alpha` must be in (0, 1), got {self.alpha=}")
        if not 0 < self.loop_share <= 1:
            raise ValueError(f"`early_stop.loop_share` must be in (0, 1], got {self.loop_share=}")
        if self.loop_run < 0:
            raise ValueError(f"`early_stop.loop_run` must be >= 0, got {self.loop_run=}")
        if self.max_dwer is not None and not math.isfinite(self.max_dwer):
            raise ValueError(f"`early_stop.max_dwer` must be finite, got {self.max_dwer=}")

    def looks(self, n_total: int) -> list[int]:
        """Clip counts at which the trial is checked (the last clip is not a look: the trial
        is then complete and judged on its full figures)."""
        out, n = [], self.min_clips
        while n < n_total:
            out.append(n)
            n *= 2
        return out


def parse_rungs(text: str | None) -> tuple[float, ...]:
    """`--rungs 0.25,0.5`: the shares of the set after which a trial must earn going on."""
    if not text:
        return ()
    try:
        shares = tuple(sorted({float(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        shares = (math.nan,)
    if not shares or not all(0 < x < 1 for x in shares):
        raise ValueError(f"`--rungs` must be shares of the set in (0, 1) separated by commas, "
                         f"e.g. 0.25,0.5, got {text!r}")
    return shares


def rung_points(shares: tuple[float, ...], n_total: int) -> list[int]:
    """Clip counts of the rungs on a set of `n_total` clips (at least 2 clips each, never the
    last clip: the whole set is the last rung)."""
    return sorted(p for p in {max(2, math.ceil(round(x * n_total, 9))) for x in shares}
                  if p < n_total)


def rung_verdict(mine: dict, others: list[dict], max_dwer: float | None) -> str | None:
    """Why a trial stops at a rung (None: it goes on). `mine` and each of `others` (trials that
    finished the whole set, at the same rung) hold `dwer` and `speedup` on the same clips."""
    if max_dwer is not None and mine["dwer"] > max_dwer:
        return f"dWER {mine['dwer']:+.1%} over the budget max_dwer {max_dwer:+.1%}"
    for o in others:
        if (o["dwer"] <= mine["dwer"] and o["speedup"] >= mine["speedup"]
                and (o["dwer"] < mine["dwer"] or o["speedup"] > mine["speedup"])):
            return (f"dominated by trial {o.get('trial_id')} (dWER {o['dwer']:+.1%}, "
                    f"{o['speedup']:.2f}x against {mine['dwer']:+.1%}, {mine['speedup']:.2f}x)")
    return None


def resolve(mode: str, max_dwer: float | None, min_clips: int) -> EarlyStop:
    """The sweep's early stopping from `--early-stop` (auto: on when the space has an accuracy
    budget) and the space's `max_dwer`."""
    if mode not in ON_OFF:
        raise ValueError(f"`--early-stop` must be one of {', '.join(ON_OFF)}, got {mode=}")
    on = mode == "on" or (mode == "auto" and max_dwer is not None)
    return EarlyStop(enabled=on, max_dwer=max_dwer, min_clips=min_clips)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy's; a Cornish-Fisher expansion where scipy is missing, as on a
    bare GPU machine: within 2% for df >= 3 at the levels used here)."""
    try:
        from scipy.stats import t

        return float(t.ppf(p, df))
    except ImportError:
        z, v = NormalDist().inv_cdf(p), float(df)
        return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
                + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def dwer_lower_bound(base: list[scoring.UttErrors], trial: list[scoring.UttErrors],
                     alpha: float) -> float:
    """One-sided (1 - alpha) lower bound of the relative WER change of `trial` over `base`
    (paired clips). Where the baseline made no error on them, the change is absolute (as
    `scoring.relative`): the bound of the trial's WER itself."""
    n = len(base)
    t = np.array([u.word_errors for u in trial], float)
    b = np.array([u.word_errors for u in base], float)
    words = max(1.0, float(sum(u.words for u in base)))
    q = t_quantile(1 - alpha, n - 1)
    if b.sum() == 0:
        return (t.sum() - q * t.std(ddof=1) * math.sqrt(n)) / words
    r = t.sum() / b.sum()
    se = (t - r * b).std(ddof=1) / (b.mean() * math.sqrt(n))
    return r - 1.0 - q * se


def _broken(row: dict, base: dict) -> bool:
    """The clip loops, or comes out empty, where the baseline's did neither (a pruned model
    that has lost speech says nothing on every clip: WER 1.0 without a loop)."""
    def bad(r):
        return bool(r["loop"]) or (not r["hyp_norm"].strip() and bool(r["ref_norm"].strip()))
    return bad(row) and not bad(base)


def _errors(rows: list[dict]) -> list[scoring.UttErrors | None]:
    """Per-clip edit counts (None for a clip without a reference: it is not scored)."""
    return [scoring.utt_errors(r["ref_norm"], r["hyp_norm"]) if r["ref_norm"].strip() else None
            for r in rows]


class Stopper:
    """`check(rows)` after each clip: raises a `Stopped` when the trial should end now."""

    def __init__(self, baseline_rows: list[dict], n_total: int, rule: EarlyStop | None = None,
                 max_slowdown: float | None = None, slow_after: int = 2,
                 rungs: tuple[float, ...] = (), judge=None, first_look: bool = False):
        """`judge(n, figures)` at each rung (`rung_points`): `figures` the trial's `dwer` and
        `speedup` on its first n clips; it raises `Dominated` to stop the trial.
        `first_look`: the trial had (True) or is (`first_look()`) one look more, at its first
        `min_clips` clips on the recipe's cheap part: the looks share alpha with it."""
        self.base_rows, self.rule = baseline_rows, rule or EarlyStop(enabled=False)
        self.rungs = set(rung_points(rungs, n_total)) if judge else set()
        self.judge = judge
        self.max_slowdown, self.slow_after = max_slowdown, slow_after
        self.looks = set(self.rule.looks(n_total)) if self.rule.enabled else set()
        # Each look gets an equal share of alpha, one-sided (only "worse" stops a trial).
        self.alpha_each = self.rule.alpha / max(1, len(self.looks) + first_look)
        self._base_err: list | None = None

    def first_look(self) -> Stopper:
        """The one look at the first `min_clips` clips of a recipe's cheap part (without
        compiling or calibrating, `Recipe.cheap`), with this stopper's share of alpha: the
        accuracy tests only (its speed is not the trial's)."""
        s = Stopper(self.base_rows, 0, self.rule)
        s.looks, s.alpha_each = {self.rule.min_clips}, self.alpha_each
        return s

    def check(self, rows: list[dict]) -> None:
        n = len(rows)
        if self.max_slowdown and n >= self.slow_after:
            # wall_s: a clip's share of its batch's time (latency_s is the whole batch's)
            ratio = (sum(r.get("wall_s", r["latency_s"]) for r in rows)
                     / sum(r.get("wall_s", r["latency_s"]) for r in self.base_rows[:n]))
            if ratio > self.max_slowdown:
                raise TooSlow(f"{ratio:.1f}x slower than the baseline on the first {n} clips "
                              f"(limit --max-slowdown {self.max_slowdown:g})")
        if self.looks and n == self.rule.loop_run < min(self.looks):
            if all(map(_broken, rows, self.base_rows[:n])):
                raise Loops(f"loops or transcribes nothing on each of its first {n} clips where "
                            "the baseline does neither")
        if n in self.looks:
            self._look(rows)
        if n in self.rungs:
            self.judge(n, self.partial(rows))

    def partial(self, rows: list[dict]) -> dict:
        """The trial's point figures against the baseline on its first clips."""
        base = self.base_rows[:len(rows)]
        per = [(b, t) for b, t in zip(_errors(base), _errors(rows)) if b is not None]
        be = sum(b.word_errors for b, _ in per)
        te = sum(t.word_errors for _, t in per)
        words = max(1, sum(b.words for b, _ in per))
        return {"dwer": scoring.relative(te / words, be / words),
                "speedup": scoring.speedup(base, rows)}

    def _look(self, rows: list[dict]) -> None:
        n, base = len(rows), self.base_rows[:len(rows)]
        extra = sum(map(_broken, rows, base))
        if extra >= self.rule.loop_share * n:
            raise Loops(f"loops or transcribes nothing on {extra} of the first {n} clips where "
                        f"the baseline does neither (stops at {self.rule.loop_share:.0%})")
        if self.rule.max_dwer is None:
            return
        if self._base_err is None or len(self._base_err) < n:
            self._base_err = _errors(self.base_rows)
        pairs = [(b, t) for b, t in zip(self._base_err[:n], _errors(rows)) if b is not None]
        if len(pairs) < 2:
            return
        b, t = zip(*pairs)
        lo = dwer_lower_bound(list(b), list(t), self.alpha_each)
        if lo > self.rule.max_dwer:
            raise Infeasible(
                f"dWER >= {lo:+.1%} (one-sided {1 - self.alpha_each:.1%} bound) on the first "
                f"{n} clips, over the budget max_dwer {self.rule.max_dwer:+.1%}")
