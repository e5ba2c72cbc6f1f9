"""Search spaces as data: YAML files validated against `sweep.techniques.recipe.PARAMS`. Pure.

A space file (see `search_spaces/*.yaml`)::

    name: quick                       # optional, defaults to the file name
    description: ...                  # optional
    params:                           # dotted recipe name -> one of
      prune.rate: {float: [0.0, 0.3], step: 0.1}      # float range (step or log optional)
      struct.ffn_rate: {float: [0.0, 0.5], step: 0.25}
      some.int: {int: [1, 8], step: 1}                # int range (step or log optional)
      quant.scheme: {choice: [none, dynamic_int8]}     # categorical
      device: {value: cpu}                             # fixed value, never sampled
    conditions:                       # optional: child -> when it is sampled
      quant.enc_mlp: {param: quant.scheme, in: [dynamic_int8]}
      prune.rate: {param: prune.pattern, in: [unstructured], else: 0.5}
    objectives: {wer: min, latency_median_s: min}      # optional (this is the default)
    constraints: {max_dwer: 0.02}                      # optional
    confidence: 0.9                   # optional: judge max_dwer on dwer's one-sided 90% upper
                                      # bound instead of its point estimate
    starts:                           # optional: partial recipes measured first
      - {quant.scheme: dynamic_int8}
      - {quant.scheme: bf16, when: {encoder: bf16}}   # only where bf16 is the faster encoder

A conditioned parameter is sampled only when its parent's value is in `in`; otherwise it takes
its `else` value when one is given, else the recipe default (it is then left out of the
recipe). A condition that a technique's own `Requires` implies (decode.compile needs
decode.loop=greedy) need not be written: `implied_conditions` adds it. An inactive parent
counts with the value it then has. `load_space` checks everything (names, ranges against each
Param, choices, conditions, device requirements such as CUDA-only choices, pairs of values the
recipe refuses together, objectives, constraints) and raises one `SpaceError` listing every
problem. Imports neither Ray, MLflow nor torch; optuna is only
touched through the trial passed to `Space.sample`.

A package by its seams, in reading order: `vocabulary` (`Dim`, `Condition`, `SpaceError` and the
`Checker` that collects problems), `sections` (the checks of one section at a time), `reach`
(the checks across parameters, and `parents_first`, the one order of the condition graph),
`starts` (warm starts), `core` (the `Space` a sweep uses) and `load` (reading a file into a
`Space`). Everything a caller needs is re-exported here.
"""

from .core import Space
from .load import SPACES_DIR, TOP_KEYS, available_spaces, load_space, space_from_dict
from .reach import PROBE_VALUES, parents_first
from .sections import (CONDITION_KEYS, DEFAULT_OBJECTIVES, DIM_EXTRA, DIM_KINDS,
                       implied_conditions)
from .starts import WHEN_KEYS, check_starts, machine_fits, resolve
from .vocabulary import Condition, Dim, SpaceError

__all__ = ["CONDITION_KEYS", "Condition", "DEFAULT_OBJECTIVES", "DIM_EXTRA", "DIM_KINDS", "Dim",
           "PROBE_VALUES", "SPACES_DIR", "Space", "SpaceError", "TOP_KEYS", "WHEN_KEYS",
           "available_spaces", "check_starts", "implied_conditions", "load_space",
           "machine_fits", "parents_first", "resolve", "space_from_dict"]
