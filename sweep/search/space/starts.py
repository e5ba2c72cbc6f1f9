"""Warm starts: recipes a space asks the sampler to measure first, right after the baseline, and
the machines each one is for. Pure.

Most random points of a large space break the model (a pruned decoder loops, fp16 on CPU
crawls), so a sweep that starts from random spends its first trials learning what the study
already knows. A space may list `starts:` (partial recipes over its own parameters, e.g. the
study's dynamic int8 and the bf16-encoder + int8-decoder mix); they are queued after the
baseline (Optuna `enqueue_trial` through Tune's `points_to_evaluate`), so the front is sensible
from the first trials and TPE models around good points. Every sampler gets the same starts.

A start is checked with the rest of the file: its keys must be parameters of the space, its
values inside their ranges, a conditioned parameter may only be set when its condition holds,
and the whole point must be a valid recipe. A start needing a device the cluster lacks is
skipped at sweep time, not refused (the same file serves CPU and GPU clusters).

The fastest mix depends on the CPU: bf16 matmuls beat int8 on AMX tiles and lose to it (about
2x) without them. A start may say which machines it is for with `when:` (see `machine_fits`):
`encoder: bf16` or `encoder: dynamic_int8` (the faster encoder scheme the launcher finds on the
running CPU, measured from the kernel table: `sweep.inputs.machine.encoder_scheme`), and/or
`isa: [flags]` (CPU flags all present, e.g. amx_bf16). The launcher queues the starts fitting
the machine; a start without `when:` fits every machine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...inputs import machine
from ...techniques.recipe import PARAMS, Recipe, RecipeError
from .vocabulary import Checker, Condition, Dim, near

WHEN_KEYS = {"encoder": machine.ENCODER_SCHEMES, "isa": machine.ISA_FLAGS}  # `when:` key -> values


def _check_when(ck: Checker, where: str, raw: Any) -> dict | None:
    """A start's `when:` as {key: allowed values}; None (errors recorded) when it is bad."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        ck.err(f"{where}.when", f"must be a mapping of {' and/or '.join(WHEN_KEYS)} -> value(s), "
                                f"got {raw!r}")
        return None
    out = {}
    for key, value in raw.items():
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if key not in WHEN_KEYS:
            ck.err(f"{where}.when.{key}", f"unknown{near(key, WHEN_KEYS)} (allowed: "
                                          f"{', '.join(WHEN_KEYS)})")
        elif not values or any(v not in WHEN_KEYS[key] for v in values):
            ck.err(f"{where}.when.{key}", f"must be one or more of "
                                          f"{', '.join(WHEN_KEYS[key])}, got {value!r}")
        else:
            out[key] = values
            continue
        return None
    return out


def machine_fits(when: Mapping, profile: Mapping | None) -> bool:
    """Whether a start's `when` fits the machine `profile` (`sweep.inputs.machine.profile`:
    `encoder`, `isa`); no profile (the machine unknown) fits every start."""
    if profile is None:
        return True
    return (("encoder" not in when or profile.get("encoder") in when["encoder"])
            and set(when.get("isa", ())) <= set(profile.get("isa") or ()))


def resolve(start: Mapping, params: Mapping[str, Dim | None],
            conditions: Mapping[str, Condition]) -> tuple[dict, list[tuple[str, str]]]:
    """The full point of a start (parameters in sampling order; unset ones as the unmodified
    model: recipe defaults, fixed values, inactive ones their `else`; the empty start is the
    baseline) and the problems found, as (key, message).
    A `None` dimension is one no available device can take: setting it is a problem."""
    point: dict[str, Any] = {}
    effective: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, dim in params.items():
        cond = conditions.get(name)
        parent = None if cond is None else effective.get(cond.parent,
                                                         PARAMS[cond.parent].default)
        if cond is not None and parent not in cond.values:
            if name in start:
                problems.append((name, f"set to {start[name]!r}, but the parameter is sampled "
                                       f"{cond.text()} (here {cond.parent}={parent!r})"))
            if cond.has_else:
                point[name] = effective[name] = cond.otherwise
            continue
        if name in start:
            if dim is None or not dim.contains(start[name]):
                problems.append((name, "needs a device this cluster does not have"))
                continue
            value = start[name]
        elif dim is None:
            continue
        elif dim.kind == "value":
            value = dim.value
        elif dim.kind == "choice" and not dim.contains(PARAMS[name].default):
            continue  # a choice without the default is left to the sampler
        else:  # the recipe default, even outside a searched range: the unmodified model
            value = PARAMS[name].default
        point[name] = effective[name] = value
    return point, problems


def check_starts(ck: Checker, raw: Any, params: Mapping[str, Dim],
                 conditions: Mapping[str, Condition]) -> list[tuple[dict, dict]]:
    """Validate the `starts:` section against the space's (ordered) params; record every
    problem on `ck` and return the starts that passed, each with its `when` ({}: any machine).
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        ck.err("starts", f"must be a list of partial recipes (mappings), got {raw!r}")
        return []
    out = []
    for i, start in enumerate(raw):
        where = f"starts[{i}]"
        if not isinstance(start, Mapping) or not start:
            ck.err(where, f"must be a non-empty mapping of parameter -> value, got {start!r}")
            continue
        start = dict(start)
        when = _check_when(ck, where, start.pop("when", None))
        if when is None:
            continue
        if not start:
            ck.err(where, "sets no parameter, only `when`")
            continue
        bad = False
        for key, value in start.items():
            if key not in params:
                bad = True
                ck.err(f"{where}.{key}", f"not a parameter of this space{near(key, params)}"
                                         " (a start sets searched parameters only)")
            elif not params[key].contains(value):
                bad = True
                ck.err(f"{where}.{key}", f"must be {params[key].text()}, got {value!r}")
        if bad:
            continue
        point, problems = resolve(start, params, conditions)
        for key, msg in problems:
            ck.err(f"{where}.{key}", msg)
        if problems:
            continue
        try:
            Recipe.from_flat(point)
        except (RecipeError, ValueError) as e:
            ck.err(where, f"is not a valid recipe: {e}")
            continue
        out.append((start, when))
    return out
