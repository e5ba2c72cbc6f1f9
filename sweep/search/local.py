"""Local search around the front: the sampler that makes the joint search pay on large spaces.
Pure Optuna: no Ray, MLflow or torch.

Why: on `full` (25 parameters, most categorical) a multivariate TPE with the handful of good
trials a sweep has keeps each parameter of a good trial with a probability near 1/3 (its
categorical kernel gives the prior `1/(n+1)` of the weight, spread over up to 11 choices), so
a sampled trial is in effect random, and a random point of `full` is a destroyed model (issue
#19: 22 of 25 sampled trials looped). What is fast and accurate sits next to what is already
fast and accurate: one more margin second on the clip's window, one layer type in another
scheme. So most trials here are a mutation of a member of the feasible front (GSEMO, the
global simple evolutionary multi-objective optimiser: a parent drawn uniformly from the
non-dominated archive, a few of its parameters re-drawn), and the rest are the base sampler's
(TPE), which keeps exploring the whole space.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.samplers import BaseSampler
from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
from optuna.trial import FrozenTrial, TrialState

PARENT_ATTR = "local:parent"  # trial system attribute: the parent's number and what changed


@dataclass(frozen=True)
class LocalOptions:
    """How trials are made by mutation. Chosen by `python -m bench.search --compare`
    (bench/results/search_samplers.md, 40 seeds, 30 trials; mean HV over the trials as a
    fraction of the grid's, from the int8 start alone / with dead FFN shrinking): share 1.0
    with single changes 0.779 / 0.752, against TPE's 0.766 / 0.314. Two runs of the same
    variant differ by up to 0.07 (other random streams): smaller gaps are noise."""
    # share of sampled trials made by mutating a front member; the rest are the base sampler's
    # (0.75: 0.781 / 0.684, 0.5: 0.805 / 0.528). At 1.0 the base sampler only runs while the
    # front is empty: on `full` a quarter of TPE's trials would be a quarter of near-random
    # draws, most of them broken models (issue #19 counts them against the search)
    share: float = 1.0
    # parameters re-drawn per mutation: 1, plus one more with this probability, repeatedly
    # (0: single changes, the safest on a space of mostly broken models; 0.2: 0.742 / 0.695;
    # a parameter made active by a change, e.g. the window's margin, is drawn as well)
    more: float = 0.0
    # a numeric parameter moves one grid step up or down with this probability, else anywhere
    step_share: float = 0.5
    # draws tried for a mutation that is no recipe measured yet, before leaving it to the base
    tries: int = 40
    # a value that broke a mutation (stopped, failed or infeasible; shared among the values
    # changed together) is drawn 1 / (1 + penalty x breaks) as often, until it works once:
    # every mutation is a screening point, so a broken choice is not paid for twice
    penalty: float = 4.0
    # a front member whose mutations broke the model is drawn as a parent 1 / (1 + this x
    # broken children) as often: a recipe on a knife edge (the clip's window with a small
    # margin, where a neutral change makes one clip loop) is a poor place to search from.
    # Issue #19's seed 1 on `full` (AMX Xeon): 6 of the 8 children of the window start at
    # dWER +9.5% (budget +10%) were over budget, 12 of the 26 sampled trials in all
    parent_penalty: float = 4.0
    # a front member is drawn as a parent in proportion to Phi(slack / this): the chance that
    # a neutral change keeps it feasible, with slack its distance inside the tightest
    # constraint (-max of its constraint values; dWER fractions for max_dwer) and this the
    # spread of a child's value around its parent's (a neutral change moves dWER by about
    # +-6% on 59 clips: one clip more or less in error). A member on the edge is drawn half
    # as often as one well inside, before any child of it has broken. 0: every member alike
    slack_scale: float = 0.06

    def __post_init__(self):
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"`local.share` must be in [0, 1], got share={self.share}")
        if not 0.0 <= self.more < 1.0:
            raise ValueError(f"`local.more` must be in [0, 1), got more={self.more}")
        if not 0.0 <= self.step_share <= 1.0:
            raise ValueError(f"`local.step_share` must be in [0, 1], got "
                             f"step_share={self.step_share}")
        if self.tries < 1:
            raise ValueError(f"`local.tries` must be >= 1, got tries={self.tries}")
        if self.penalty < 0:
            raise ValueError(f"`local.penalty` must be >= 0, got penalty={self.penalty}")
        if self.parent_penalty < 0:
            raise ValueError(f"`local.parent_penalty` must be >= 0, got "
                             f"parent_penalty={self.parent_penalty}")
        if self.slack_scale < 0:
            raise ValueError(f"`local.slack_scale` must be >= 0, got "
                             f"slack_scale={self.slack_scale}")


def feasible_front(trials: list[FrozenTrial], directions) -> list[FrozenTrial]:
    """The non-dominated trials among the finished, feasible ones (constraints <= 0): Optuna's
    own Pareto front (what `study.best_trials` returns), on a list already fetched."""
    return _get_pareto_front_trials_by_trials(trials, directions, consider_constraint=True)


class LocalSearchSampler(BaseSampler):
    """`options.share` of the trials: a front member's parameters with a few re-drawn;
    the rest, and every trial before the front has a member, `base`'s.

    `key(params) -> hashable` (optional) says which parameter sets are the same recipe: a
    mutation equal to a measured trial or its parent (a no-op, e.g. the pruning norm at rate 0)
    is drawn again; it gets every parameter the study knows and drops the inactive ones
    (without it, parameter sets are compared as they are). Parameters the parent did not have
    (made active by a mutation) are drawn uniformly."""

    def __init__(self, base: BaseSampler, seed: int | None = None,
                 options: LocalOptions = LocalOptions(),
                 key: Callable[[dict], Hashable] | None = None):
        self.base, self.options, self.key = base, options, key
        self._rng = np.random.default_rng(seed)
        self._plans: dict[int, dict[str, Any]] = {}  # trial number -> the mutated values
        self._breaks: dict[tuple[str, str], float] = {}  # broken_values of the last trials

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self.base.reseed_rng()

    # -- the plan, made once per trial before any parameter is asked for
    def before_trial(self, study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)
        if trial.system_attrs.get("fixed_params") or self._rng.random() >= self.options.share:
            return  # an enqueued start, or the base sampler's turn
        trials = study._get_trials(deepcopy=False, use_cache=True)
        front = feasible_front(trials, study.directions)
        if not front:
            return
        seen = {self._key(t.params) for t in trials if t.params}
        self._breaks = broken_values(trials)
        known = {n: d for t in trials for n, d in t.distributions.items()}
        w = parent_weights(front, broken_children(trials), self.options)
        for _ in range(self.options.tries):
            parent = front[self._rng.choice(len(front), p=w / w.sum())]
            changed = self._mutate(parent)
            if changed is None:
                continue
            # drawn now for the parameters a mutation may make active, so that the key sees
            # the whole trial; `key` drops the ones that stay inactive
            extra = {n: self._uniform(d) for n, d in known.items() if n not in parent.params}
            plan = {**parent.params, **extra, **changed}
            k = self._key(plan)
            if k is not None and k not in seen:
                self._plans[trial.number] = plan
                study._storage.set_trial_system_attr(
                    trial._trial_id, PARENT_ATTR,
                    {"parent": parent.number, "changed": sorted(changed)})
                return

    def _key(self, params: Mapping) -> Hashable | None:
        if self.key is None:
            return tuple(sorted((k, repr(v)) for k, v in params.items()))
        try:
            return self.key(dict(params))
        except ValueError:  # a combination the recipe refuses: never proposed
            return None

    def _mutate(self, parent: FrozenTrial) -> dict[str, Any] | None:
        names = [n for n, d in parent.distributions.items() if _size(d) > 1]
        if not names:
            return None
        k = 1
        while k < len(names) and self._rng.random() < self.options.more:
            k += 1
        picked = self._rng.choice(len(names), size=k, replace=False)
        return {names[i]: self._other(names[i], parent.distributions[names[i]],
                                      parent.params[names[i]]) for i in picked}

    def _other(self, name: str, dist: BaseDistribution, value: Any) -> Any:
        """A value of `dist` other than `value`: a neighbour or anywhere, the ones that broke
        earlier mutations less often."""
        if isinstance(dist, CategoricalDistribution):
            return self._pick(name, [c for c in dist.choices if c != value])
        grid = _grid(dist)
        if grid is None:  # continuous: anywhere else in the range
            return float(self._rng.uniform(dist.low, dist.high))
        i = int(np.argmin([abs(g - value) for g in grid]))
        if self._rng.random() < self.options.step_share:
            return self._pick(name, [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)])
        return self._pick(name, [g for j, g in enumerate(grid) if j != i])

    def _pick(self, name: str, values: list) -> Any:
        w = np.array([1.0 / (1.0 + self.options.penalty * self._breaks.get((name, repr(v)), 0))
                      for v in values])
        return values[self._rng.choice(len(values), p=w / w.sum())]

    # -- Optuna's sampling interface
    def infer_relative_search_space(self, study, trial: FrozenTrial):
        if trial.number in self._plans:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial: FrozenTrial, search_space):
        if trial.number in self._plans:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial: FrozenTrial, name: str,
                           dist: BaseDistribution) -> Any:
        plan = self._plans.get(trial.number)  # the parent's parameters, mutated
        if plan is None:
            return self.base.sample_independent(study, trial, name, dist)
        if name in plan and _contains(dist, plan[name]):
            return plan[name]
        return self._uniform(dist)  # made active by the mutation, or out of today's range

    def _uniform(self, dist: BaseDistribution) -> Any:
        if isinstance(dist, CategoricalDistribution):
            return dist.choices[self._rng.integers(len(dist.choices))]
        grid = _grid(dist)
        if grid is None:
            return float(self._rng.uniform(dist.low, dist.high))
        return grid[self._rng.integers(len(grid))]

    def after_trial(self, study, trial: FrozenTrial, state: TrialState, values) -> None:
        self._plans.pop(trial.number, None)
        self.base.after_trial(study, trial, state, values)


def lineage(trials: list[FrozenTrial], key: str = "run_id") -> dict[Any, dict]:
    """Each mutation's parent and what changed, keyed by the user attribute `key` of the
    trials (the sweep's MLflow run id): {child: {"parent": parent's key, "changed": [...]}}."""
    by_number = {t.number: t.user_attrs.get(key) for t in trials}
    out = {}
    for t in trials:
        info = t.system_attrs.get(PARENT_ATTR)
        if info and t.user_attrs.get(key) is not None:
            out[t.user_attrs[key]] = {"parent": by_number.get(info["parent"]),
                                      "changed": list(info["changed"])}
    return out


def _broke(t: FrozenTrial) -> bool:
    """Finished and not a feasible completion: stopped, failed or over a constraint."""
    return not (t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values()))


def slack(trial: FrozenTrial) -> float | None:
    """How far inside its tightest constraint a trial is (-max of its constraint values, as
    `trial.set_constraint` stores them or the older list); None without constraints."""
    values = trial.constraints
    return -max(values.values()) if values else None


def parent_weights(front: list[FrozenTrial], broke: Mapping[int, int],
                   options: LocalOptions) -> np.ndarray:
    """Each front member's weight as a parent (`LocalOptions.parent_penalty`, `slack_scale`):
    its chance that a neutral change stays feasible, over 1 + penalty x its broken children."""
    out = []
    for t in front:
        w = 1.0 / (1.0 + options.parent_penalty * broke.get(t.number, 0))
        s = slack(t)
        if options.slack_scale > 0 and s is not None and math.isfinite(s):
            w *= 0.5 * math.erfc(-s / (options.slack_scale * math.sqrt(2)))  # Phi(s / scale)
        out.append(w)
    w = np.array(out)
    return w if w.sum() > 0 else np.ones(len(front))


def broken_children(trials: list[FrozenTrial]) -> dict[int, int]:
    """Parent trial number -> how many of its mutations broke the model."""
    out: dict[int, int] = {}
    for t in trials:
        info = t.system_attrs.get(PARENT_ATTR)
        if info and t.state.is_finished() and _broke(t):
            out[info["parent"]] = out.get(info["parent"], 0) + 1
    return out


def broken_values(trials: list[FrozenTrial]) -> dict[tuple[str, str], float]:
    """(parameter, repr(value)) -> how often a mutation to it broke the model: stopped early,
    failed or infeasible, shared among the values changed together; 0 once one worked."""
    out: dict[tuple[str, str], float] = {}
    worked: set[tuple[str, str]] = set()
    for t in trials:
        info = t.system_attrs.get(PARENT_ATTR)
        if not info or not t.state.is_finished():
            continue
        changed = [(n, repr(t.params[n])) for n in info["changed"] if n in t.params]
        ok = not _broke(t)
        for k in changed:
            if ok:
                worked.add(k)
            else:
                out[k] = out.get(k, 0.0) + 1.0 / len(changed)
    return {k: v for k, v in out.items() if k not in worked}


def _contains(dist: BaseDistribution, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):  # not one of a categorical's choices
        return False


def _grid(dist: BaseDistribution) -> list | None:
    """The values of a stepped or integer distribution (log ones as integers), else None."""
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step))
        return [float(round(dist.low + i * dist.step, 12)) for i in range(n + 1)]
    return None


def _size(dist: BaseDistribution) -> int | float:
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices)
    grid = _grid(dist)
    return math.inf if grid is None else len(grid)
