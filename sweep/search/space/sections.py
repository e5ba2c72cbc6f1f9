"""The checks of one section of a space file at a time: `params`, `conditions` (and the ones the
techniques' own `Requires` imply), `objectives`, `constraints`, `confidence`. Pure.

Each check reports to the shared `Checker` and drops what it refuses instead of raising, so
that one `SpaceError` can list every mistake in a file; the checks that need the whole space at
once (cycles, device requirements, refused pairs) are `reach`'s."""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping
from typing import Any

from ...results import pareto
from ...techniques import Param
from ...techniques.recipe import PARAMS
from .vocabulary import Checker, Condition, Dim, near

DEFAULT_OBJECTIVES = dict(pareto.DEFAULT_OBJECTIVES)  # the one default, from sweep.results.figures

DIM_KINDS = ("float", "int", "choice", "value")
DIM_EXTRA = {"float": ("step", "log"), "int": ("step", "log"), "choice": (), "value": ()}
CONDITION_KEYS = ("param", "in", "else")


def _number(x: Any) -> float | int | None:
    """YAML number (or number-looking text such as `1e-3`, which YAML 1.1 leaves a string)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return x if math.isfinite(x) else None
    if isinstance(x, str):
        try:
            v = float(x)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def _sexagesimal_hint(value: Any, choices) -> str:
    """YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124."""
    if isinstance(value, int) and not isinstance(value, bool):
        for c in choices or ():
            if isinstance(c, str) and ":" in c:
                parts = c.split(":")
                if all(p.isdigit() for p in parts):
                    n = 0
                    for p in parts:
                        n = n * 60 + int(p)
                    if n == value:
                        return f" (YAML read an unquoted {c} as {value}: write \"{c}\")"
    return ""


def check_params(ck: Checker, raw: Any) -> dict[str, Dim]:
    dims: dict[str, Dim] = {}
    if raw is None:
        ck.err("params", "missing: map dotted recipe names to {float: [lo, hi]}, "
                         "{int: [lo, hi]}, {choice: [...]} or {value: x}")
        return dims
    if not isinstance(raw, Mapping) or not raw:
        ck.err("params", f"must be a non-empty mapping, got {raw!r}")
        return dims
    for name, spec in raw.items():
        key = f"params.{name}"
        if name not in PARAMS:
            ck.err(key, f"unknown parameter{near(name, PARAMS)} "
                        f"(known: {', '.join(PARAMS)})")
            continue
        dim = _check_dim(ck, key, PARAMS[name], name, spec)
        if dim is not None:
            dims[name] = dim
    return dims


def _check_dim(ck: Checker, key: str, p: Param, name: str, spec: Any) -> Dim | None:
    if not isinstance(spec, Mapping):
        ck.err(key, f"must be one of {{float: [lo, hi]}}, {{int: [lo, hi]}}, {{choice: [...]}}, "
                    f"{{value: x}}; got {spec!r}")
        return None
    kinds = [k for k in DIM_KINDS if k in spec]
    if len(kinds) != 1:
        unknown = [k for k in spec if k not in DIM_KINDS + ("step", "log")]
        hint = near(unknown[0], DIM_KINDS) if unknown else ""
        ck.err(key, f"needs exactly one of {', '.join(DIM_KINDS)}, got keys "
                    f"{list(spec)}{hint}")
        return None
    kind = kinds[0]
    bad = False
    for k in spec:
        if k != kind and k not in DIM_EXTRA[kind]:
            allowed = ", ".join((kind, *DIM_EXTRA[kind]))
            ck.err(f"{key}.{k}", f"unknown key{near(k, (kind, *DIM_EXTRA[kind]))} for a "
                                 f"{kind} parameter (allowed: {allowed})")
            bad = True
    if kind == "value":
        value = _coerce(p, spec["value"])
        if msg := p.validate(value):
            ck.err(f"{key}.value", msg + _sexagesimal_hint(value, p.choices))
            return None
        return None if bad else Dim(name, "value", value=value)
    if kind == "choice":
        raw = spec["choice"]
        if not isinstance(raw, list) or not raw:
            ck.err(f"{key}.choice", f"must be a non-empty list, got {raw!r}")
            return None
        values = []
        for v in raw:
            v = _coerce(p, v)
            if msg := p.validate(v):
                ck.err(f"{key}.choice", msg + _sexagesimal_hint(v, p.choices))
                bad = True
            elif v in values:
                ck.err(f"{key}.choice", f"{v!r} is listed twice")
                bad = True
            else:
                values.append(v)
        return None if bad else Dim(name, "choice", choices=tuple(values))
    # float / int range
    if p.kind != kind:
        what = {"choice": "{choice: [...]}", "bool": "{choice: [true, false]}",
                "float": "{float: [lo, hi]}", "int": "{int: [lo, hi]}"}[p.kind]
        ck.err(f"{key}.{kind}", f"`{name}` is a {p.kind} parameter ({p.range_text()}); "
                                f"write {what} or {{value: x}}")
        return None
    rng = spec[kind]
    if not isinstance(rng, list) or len(rng) != 2:
        ck.err(f"{key}.{kind}", f"must be a list [lo, hi], got {rng!r}")
        return None
    lo, hi = (_number(x) for x in rng)
    if lo is None or hi is None:
        ck.err(f"{key}.{kind}", f"[lo, hi] must be two numbers, got {rng!r}")
        return None
    if kind == "int" and (lo != int(lo) or hi != int(hi)):
        ck.err(f"{key}.int", f"[lo, hi] must be integers, got {rng!r}")
        return None
    lo, hi = (int(lo), int(hi)) if kind == "int" else (float(lo), float(hi))
    if lo > hi:
        ck.err(f"{key}.{kind}", f"lo > hi in {rng!r}")
        bad = True
    for end, v in (("lo", lo), ("hi", hi)):
        if p.validate(v):
            ck.err(f"{key}.{kind}", f"{end}={v:g} is outside `{name}`'s range {p.range_text()}")
            bad = True
    log = spec.get("log", False)
    if not isinstance(log, bool):
        ck.err(f"{key}.log", f"must be true or false, got {log!r}")
        bad, log = True, False
    step = spec.get("step")
    if step is not None:
        s = _number(step)
        if s is None or s <= 0 or (kind == "int" and s != int(s)):
            ck.err(f"{key}.step", f"must be a positive {'integer' if kind == 'int' else 'number'}"
                                  f", got {step!r}")
            bad, step = True, None
        else:
            step = int(s) if kind == "int" else float(s)
    if log:
        if lo <= 0:
            ck.err(f"{key}.log", f"log scale needs lo > 0, got lo={lo:g}")
            bad = True
        if step is not None and not (kind == "int" and step == 1):
            ck.err(f"{key}.step", "step cannot be combined with log: true (Optuna refuses it)")
            bad = True
    if step is not None and not bad and lo <= hi:
        span = decimal.Decimal(str(hi)) - decimal.Decimal(str(lo))
        if span % decimal.Decimal(str(step)) != 0:
            ck.err(f"{key}.step", f"the range [{lo:g}, {hi:g}] is not a whole number of steps "
                                  f"of {step:g}")
            bad = True
    if bad:
        return None
    return Dim(name, kind, lo=lo, hi=hi, step=step, log=log)


def _coerce(p: Param, v: Any) -> Any:
    if p.kind == "float" and not isinstance(v, bool):
        n = _number(v)
        return float(n) if n is not None else v
    if p.kind == "int" and isinstance(v, float) and v == int(v):
        return int(v)
    return v


def check_conditions(ck: Checker, raw: Any, dims: dict[str, Dim]) -> dict[str, Condition]:
    out: dict[str, Condition] = {}
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        ck.err("conditions", f"must be a mapping child -> {{param: parent, in: [values]}}, "
                             f"got {raw!r}")
        return out
    for child, spec in raw.items():
        key = f"conditions.{child}"
        if child not in PARAMS:
            ck.err(key, f"unknown parameter{near(child, PARAMS)}")
            continue
        if child not in dims:
            ck.err(key, f"`{child}` is not under params (a condition decides when a searched "
                        "parameter is sampled)")
            continue
        if not isinstance(spec, Mapping):
            ck.err(key, f"must be {{param: parent, in: [values]}}, got {spec!r}")
            continue
        bad = False
        for k in spec:
            if k not in CONDITION_KEYS:
                ck.err(f"{key}.{k}", f"unknown key{near(k, CONDITION_KEYS)} "
                                     f"(allowed: {', '.join(CONDITION_KEYS)})")
                bad = True
        parent = spec.get("param")
        values = spec.get("in")
        if parent is None or values is None:
            ck.err(key, "needs `param` (the parent) and `in` (its values that enable "
                        f"`{child}`)")
            continue
        if parent not in PARAMS:
            ck.err(f"{key}.param", f"unknown parent parameter `{parent}`{near(parent, PARAMS)}")
            continue
        if parent == child:
            ck.err(f"{key}.param", f"`{child}` cannot depend on itself")
            continue
        if parent not in dims:
            ck.err(f"{key}.param", f"parent `{parent}` is not under params, so it never varies "
                                   f"(it stays {PARAMS[parent].default!r}); add it to params")
            continue
        if not isinstance(values, list) or not values:
            ck.err(f"{key}.in", f"must be a non-empty list of `{parent}` values, got {values!r}")
            continue
        pdim, pparam = dims[parent], PARAMS[parent]
        vals = []
        for v in values:
            v = _coerce(pparam, v)
            if not pdim.contains(v):
                ck.err(f"{key}.in", f"{v!r} is not a value parent `{parent}` can take here "
                                    f"({pdim.text()})"
                       + _sexagesimal_hint(v, pparam.choices))
                bad = True
            else:
                vals.append(v)
        otherwise = None
        if "else" in spec:
            otherwise = _coerce(PARAMS[child], spec["else"])
            if msg := PARAMS[child].validate(otherwise):
                ck.err(f"{key}.else", msg + _sexagesimal_hint(otherwise, PARAMS[child].choices))
                bad = True
        if not bad:
            out[child] = Condition(child, parent, tuple(vals), otherwise, "else" in spec)
    return out


def implied_conditions(dims: dict[str, Dim], given: dict[str, Condition]) -> dict[str, Condition]:
    """The conditions a space need not write: a searched parameter whose other values require a
    searched parent's value (`decode.compile`=step needs decode.loop=greedy) is sampled only
    when the parent has it, else left at its default, as the technique's own `Requires` says.
    Device requirements are not among them (choices the cluster cannot run are dropped)."""
    out = {}
    for name, dim in dims.items():
        reqs = {(r.key, r.equals) for r in PARAMS[name].requires if r.key != "device"}
        if name in given or dim.kind == "value" or len(reqs) != 1:
            continue
        (key, equals), = reqs
        parent = dims.get(key)
        if parent is not None and parent.kind != "value" and parent.contains(equals):
            out[name] = Condition(name, key, (equals,))
    return out


def check_objectives(ck: Checker, raw: Any) -> list[tuple[str, str]]:
    if not isinstance(raw, Mapping) or not raw:
        ck.err("objectives", f"must be a non-empty mapping metric -> min|max, got {raw!r}")
        return list(DEFAULT_OBJECTIVES.items())
    out = []
    for metric, direction in raw.items():
        if metric not in pareto.METRICS:
            ck.err(f"objectives.{metric}", f"unknown metric{near(metric, pareto.METRICS)} "
                                           f"(allowed: {', '.join(pareto.METRICS)})")
        elif direction not in pareto.DIRECTIONS:
            ck.err(f"objectives.{metric}", f"direction must be min or max, got {direction!r}")
        else:
            out.append((metric, direction))
    return out


def check_constraints(ck: Checker, raw: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        ck.err("constraints", f"must be a mapping such as {{max_dwer: 0.02}}, got {raw!r}")
        return out
    for key, value in raw.items():
        k = f"constraints.{key}"
        if key not in pareto.CONSTRAINTS:
            ck.err(k, f"unknown constraint{near(key, pareto.CONSTRAINTS)} "
                      f"(allowed: {', '.join(pareto.CONSTRAINTS)})")
            continue
        v = _number(value)
        if v is None:
            ck.err(k, f"must be a number, got {value!r}")
        elif err := pareto.CONSTRAINTS[key].refuses(v):  # the rule lives with the constraint
            ck.err(k, f"{err}, got {value!r}")
        else:
            out[key] = float(v)
    return out


def check_confidence(ck: Checker, raw: Any, constraints: dict) -> float | None:
    if raw is None:
        return None
    v = _number(raw)
    if v is None or not 0.5 < v < 1:
        ck.err("confidence", f"must be a number in (0.5, 1), e.g. 0.9, got {raw!r}")
        return None
    if "max_dwer" not in constraints:
        ck.err("confidence", "judges `max_dwer` on dwer's upper bound, but the space has no "
                             f"`constraints.max_dwer` (constraints: {dict(constraints)})")
    return float(v)
