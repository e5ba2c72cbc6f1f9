"""sweep.search.sampler's samplers read the constraint values HyperSearch tells them."""

import optuna
import pytest

from sweep.search.sampler import SamplerOptions, make_sampler

# TPE's `group` is experimental in Optuna; the sweep uses it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# `a` has the best objectives but breaks the constraint; `b` is the best feasible choice.
FIGURES = {"a": (0.1, 0.1), "b": (0.5, 0.5), "c": (0.9, 0.9)}


def picks(name: str, constrained: bool, n: int = 40) -> list[str]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(
        name, 0, SamplerOptions(n_startup_trials=3, population_size=4)))
    out = []
    for _ in range(n):
        trial = study.ask()
        x = trial.suggest_categorical("x", list(FIGURES))
        for k in range(3):  # NSGA-II mutates 1/params of the genes: with x alone it is random
            trial.suggest_categorical(f"y{k}", ["p", "q"])
        if constrained:  # optuna 5: set_constraint, as HyperSearch (constraints_func deprecated)
            trial.set_constraint("max_dwer", 1.0 if x == "a" else -1.0)
        study.tell(trial, FIGURES[x])
        out.append(x)
    return out[n // 2:]


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_samplers_avoid_what_set_constraint_marks_infeasible(name):
    free, held = picks(name, False), picks(name, True)
    assert free.count("a") > free.count("b")  # unconstrained: the best objectives
    assert held.count("b") > held.count("a") and held.count("a") * 2 < free.count("a")


def test_options_reach_the_samplers():
    tpe = make_sampler("tpe", 0, SamplerOptions(n_startup_trials=7, multivariate=False))
    assert tpe._n_startup_trials == 7 and tpe._multivariate is False and not tpe._group
    assert make_sampler("nsga2", 0, SamplerOptions(population_size=6))._population_size == 6
    with pytest.raises(ValueError, match="`--sampler` must be one of"):
        make_sampler("cmaes", 0)
