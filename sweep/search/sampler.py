"""Ray and Optuna plumbing: the cluster, the searcher that knows constraints and failures,
per-trial resources, and a quiet progress line."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from .. import console
from ..results.pareto import feasible, pareto_front
from .local import LocalOptions, LocalSearchSampler

# TPE's `multivariate`/`group` are Optuna "experimental" arguments we choose on purpose.
console.ignore_warning(optuna.exceptions.ExperimentalWarning)
SAMPLERS = ("local", "tpe", "nsga2", "random")
RAY_TMP = "/tmp/hyper-ray"  # short: Ray's unix socket paths must stay under 107 bytes


class ClusterError(ValueError):
    pass


def check_address(address: str) -> None:
    """Fail in seconds on a cluster that is not there (ray.init retries for minutes)."""
    import socket

    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            return
    except (OSError, ValueError) as e:
        raise ClusterError(f"`--address` must be host:port of a running Ray head "
                           f"(ray start --head), got {address!r}: {e}") from None


def init_ray(address: str | None, num_cpus: int | None = None) -> dict:
    """Join `address` or start a local Ray; returns the cluster's resources."""
    import ray

    from ..techniques import PLUGINS_ENV

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray.cluster_resources()
    # Workers must know the same techniques (and --verbose) as the driver, on every node too.
    env = {k: os.environ[k] for k in (PLUGINS_ENV, console.VERBOSE_ENV) if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    if address:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"`--address` {address} is not a running Ray cluster "
                               f"(start one with `ray start --head`): {e}") from None
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=RAY_TMP, log_to_driver=False, configure_logging=False,
                 runtime_env=runtime_env)
    return ray.cluster_resources()


@dataclass(frozen=True)
class SamplerOptions:
    """How the sweep's samplers are set up. Chosen by `python -m bench.search --compare`
    (bench/results/search_samplers.md: 40 seeds, --num-samples 30, replayed on the measured cpu
    grid from the int8 start alone, and with dead FFN shrinking; median HV at the budget as a
    fraction of the grid's, [IQR])."""
    # TPE: random picks until this many trials finished; the enqueued baseline and warm
    # starts count (told as completed trials). 5: 1.00 [1.00-1.00] and 0.76 [0.36-0.93] with
    # dead volume; 3: 0.59 there, 10: as 5 at the budget but later (mean HV 0.29 vs 0.31).
    n_startup_trials: int = 5
    # TPE: one joint density over the parameters (independent TPE: 0.97 and 0.33)...
    multivariate: bool = True
    # ... per group of parameters sampled together, so conditional ones (struct.stacks under
    # struct.ffn_rate) are modelled jointly too (no group: the same without conditional ones)
    group: bool = True
    # NSGA-II: trials per generation; 4: 0.95 [0.73-0.99] and 0.30 against 8's 0.94 and 0.27,
    # 16's 0.86 and 0.27 (30 trials are few generations; stopped trials never join one)
    population_size: int = 4
    # local: mutations of front members (sweep.search.local), TPE as above for the rest
    local: LocalOptions = LocalOptions()


def make_sampler(name: str, seed: int | None, options: SamplerOptions = SamplerOptions(),
                 key=None):
    """Optuna's sampler by name. Constraints reach TPE and NSGA-II as each trial's
    `set_constraint` values (optuna 5 reads `trial.constraints`; `constraints_func` is
    deprecated and only stores the same values), see HyperSearch. `key(params)`: which
    parameter sets are one recipe (the local sampler never proposes a measured one again)."""
    o = options
    if name == "local":
        return LocalSearchSampler(make_sampler("tpe", seed, options), seed=seed,
                                  options=o.local, key=key)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=o.multivariate,
                                          group=o.group and o.multivariate,
                                          n_startup_trials=o.n_startup_trials)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=o.population_size)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"`--sampler` must be one of {SAMPLERS}, got {name=}")


class HyperSearch(OptunaSearch):
    """OptunaSearch that tells Optuna about failed trials and constraint violations.

    Ray's OptunaSearch only reports objective values: a failed trial (reported without
    them) would stay RUNNING in the study, and a constrained sampler would never see the
    constraint. Here each finished trial gets its constraint values (`trial.set_constraint`,
    <= 0 feasible) before `tell`, which TPE and NSGA-II read back.
    """

    def __init__(self, *args, space_obj=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._space_obj = space_obj

    def on_trial_complete(self, trial_id, result=None, error=False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            # Told before the launcher was killed; Tune's older state re-ran it on resume.
            self._completed_trials.add(trial_id)
            return None
        if bool(result) and result.get("status") == "ok":
            mark_finished(ot_trial, self._space_obj, result)
            return super().on_trial_complete(trial_id, result, error)
        ot_trial.set_user_attr("error", str((result or {}).get("error", "error"))[:2000])
        if (result or {}).get("run_id"):  # so that trials.csv names a stopped mutation's parent
            ot_trial.set_user_attr("run_id", result["run_id"])
        # A pruned (too slow) trial tells TPE where not to look; a failed one is ignored.
        state = (optuna.trial.TrialState.PRUNED if (result or {}).get("status") == "pruned"
                 else optuna.trial.TrialState.FAIL)
        self._ot_study.tell(ot_trial, state=state)
        self._completed_trials.add(trial_id)


def mark_finished(ot_trial, space, row: dict) -> None:
    """What Optuna keeps of a finished trial besides its objectives: constraint values (<= 0
    feasible; TPE and NSGA-II read them back) and the trial's MLflow run and speed-up."""
    if space is not None and space.constraints:
        for key, value in zip(space.constraints,
                              space.violation(row, row.get("baseline") or {})):
            ot_trial.set_constraint(key, value)
    ot_trial.set_user_attr("run_id", row.get("run_id"))
    ot_trial.set_user_attr("speedup", row.get("speedup"))


class DefineByRun:
    """The space's define-by-run function; a class, since Tune pickles the searcher."""

    def __init__(self, space, devices: set[str]):
        self.space, self.devices = space, set(devices)

    def __call__(self, trial):
        return self.space.sample(trial, devices=self.devices)


class RecipeKey:
    """Which recipe a set of sampled parameters is (`screen.recipe_key` of the point they
    resolve to; ones a mutation left inactive are dropped). A class: Tune pickles it."""

    def __init__(self, space, devices: set[str]):
        self.space, self.devices = space, frozenset(devices)

    def __call__(self, params: dict):
        from .screen import recipe_key
        from .space import resolve

        doms = self.space.domains(self.devices)
        point, problems = resolve(params, doms, self.space.conditions)
        if problems:  # e.g. prune.norm once prune.pattern is 2:4: as the space would sample
            point, problems = resolve({k: v for k, v in params.items()
                                       if k not in dict(problems)}, doms, self.space.conditions)
        if problems:
            raise ValueError(problems[0][1])
        return recipe_key(point)


def make_searcher(space, *, sampler: str, seed: int | None, storage: str | None,
                  study_name: str, devices: set[str],
                  machine_profile: dict | None = None) -> HyperSearch:
    """The sweep's searcher: the baseline first, then the space's warm starts that fit the
    machine (`machine_profile`, `sweep.inputs.machine.profile`; None: all of them)."""
    metrics = [m for m, _ in space.objectives]
    modes = [d for _, d in space.objectives]
    ot_storage = optuna.storages.RDBStorage(storage) if storage else None
    return HyperSearch(
        space=DefineByRun(space, devices),
        metric=metrics, mode=modes,
        sampler=make_sampler(sampler, seed, key=RecipeKey(space, devices)),
        points_to_evaluate=[space.baseline(), *space.start_points(devices, machine_profile)],
        study_name=study_name, storage=ot_storage, space_obj=space)


def resources_for(cpus_per_trial: int):
    """CPU trials get N CPUs (torch threads follow); cuda trials one GPU and one CPU."""
    def fn(config):
        if config.get("device") == "cuda":
            return {"cpu": 1, "gpu": 1}
        return {"cpu": cpus_per_trial}
    return fn


class Progress(tune.Callback):
    """One line per finished trial: done/running/failed/pruned (stopped early as too slow), size
    of the front the sweep will report and best speed-up within the constraints (feasible rows
    only, as in the final table), time left. `store` (tracking URI, experiment id, sweep): a
    resumed sweep counts the trials measured before the kill, as its summary does."""

    def __init__(self, total: int, time_budget: float | None, objectives,
                 constraints: dict | None = None, label: str = "",
                 store: tuple[str, str, str] | None = None):
        # Plain data only: Tune pickles callbacks with its experiment state.
        self.total, self.budget, self.objectives = total, time_budget, list(objectives)
        self.constraints = dict(constraints or {})
        self.label = label  # a phase's name (screening) before the counts
        self.store = store
        self.t0, self.done, self.failed, self.pruned, self.before = time.time(), 0, 0, 0, 0
        self.rows: list[dict] = []
        self.seen: set[str] = set()  # trial ids counted

    def setup(self, **info):
        """At the start of every launch, a resumed one too (whose callback comes back as Tune
        pickled it when the sweep began): this launch's clock, and the sweep's trials already
        measured (each trial's last attempt, as the summary counts them)."""
        self.t0, self.before = time.time(), 0
        if not getattr(self, "store", None):
            return
        from ..results import tracking

        try:
            rows = tracking.sweep_rows(*self.store)
        except Exception as e:  # noqa: BLE001 - a count on the console is not worth a sweep
            print(f"warning: the trials measured before are not counted: {e}", file=sys.stderr)
            return
        self.done = self.failed = self.pruned = 0
        self.rows, self.seen = [], set()
        last = {r["trial_id"]: r for r in rows if r["status"] not in ("killed", "running")}
        for key, row in last.items():
            self._count(key, row)
        self.before, self.stored = self.done, set(last)

    def _count(self, key: str, row: dict) -> None:
        self.__dict__.setdefault("seen", set()).add(key)
        self.done += 1
        status = row.get("status")
        self.failed += status not in ("ok", "pruned")
        # getattr: a sweep resumed from before `pruned` was counted restores a callback without it
        self.pruned = getattr(self, "pruned", 0) + (status == "pruned")
        if status == "ok":
            self.rows.append(row)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        status = result.get("status")
        if trial.trial_id not in self.__dict__.get("seen", ()):  # a restored one: counted
            self._count(trial.trial_id, {**result, "recipe": dict(trial.config),
                                         "trial_id": trial.trial_id})
        running = sum(t.status == "RUNNING" for t in trials) - 1
        # trials measured before a kill that Tune's saved state did not know yet: its searcher
        # asks for others in their place, so the sweep measures them on top of its total
        total = self.total + len(getattr(self, "stored", set()) - {t.trial_id for t in trials})
        elapsed = time.time() - self.t0
        now = max(1, self.done - getattr(self, "before", 0))  # trials ended in this launch
        left = elapsed / now * max(0, total - self.done)
        if self.budget:
            left = min(left, max(0.0, self.budget - elapsed))
        what = (" ".join(_shown(result, m) for m in dict.fromkeys(
            [m for m, _ in self.objectives] + ["speedup"])) if status == "ok" else
                f"{'PRUNED' if status == 'pruned' else 'FAILED'} "
                f"{str(result.get('error', ''))[:80]}")
        base = result.get("baseline") or None
        best = max((r["speedup"] for r in self.rows if r.get("speedup") is not None
                    and feasible(r, self.constraints or None, base)), default=None)
        sys.stderr.write(
            f"[{getattr(self, 'label', '') + ' ' if getattr(self, 'label', '') else ''}"
            f"{self.done}/{total}] running {max(0, running)} failed {self.failed} "
            f"pruned {self.pruned} front {self._front_size(base)} best "
            f"{'—' if best is None else f'{best:.2f}x'} | {elapsed:.0f}s, ~{left:.0f}s left | "
            f"{trial.trial_id}: {what}\n")
        sys.stderr.flush()

    def _front_size(self, base) -> int:
        return len(pareto_front(self.rows, self.objectives,
                                constraints=self.constraints or None, baseline=base))


def _shown(result: dict, name: str) -> str:
    """`name value` in its figure's unit and format, for the progress line."""
    from ..results.figures import BY_NAME

    f, v = BY_NAME[name], result.get(name)
    return f"{name} {'?' if v is None else f.shown(v)}"
