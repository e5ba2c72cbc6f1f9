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

One module, in reading order: the vocabulary (`Dim`, `Condition`, `SpaceError`), the checks of
one section at a time, the checks across parameters, warm starts, then the `Space` a sweep uses
and loading.
"""

from __future__ import annotations

import decimal
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..inputs import machine
from ..results import pareto
from ..techniques.recipe import PARAMS, Recipe, RecipeError
from ..techniques import Param

DEFAULT_OBJECTIVES = dict(pareto.DEFAULT_OBJECTIVES)  # the one default, from sweep.results.figures


class SpaceError(ValueError):
    """A search space that cannot be used; `errors` lists every problem found."""

    def __init__(self, errors: list[str], source: str = ""):
        self.errors = list(errors)
        self.source = source
        head = (f"{len(self.errors)} problem(s) in search space {source}:" if source
                else f"{len(self.errors)} problem(s) in search space:")
        super().__init__("\n".join([head, *(f"  - {e}" for e in self.errors)]))


@dataclass(frozen=True)
class Dim:
    """One searched parameter: a float/int range, a choice, or a fixed value."""

    name: str
    kind: str  # float | int | choice | value
    lo: float | int | None = None
    hi: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple = ()
    value: Any = None

    def domain(self, limit: int | None = None, prefer: Any = None) -> list:
        """The values this dimension can take (a sample of them for continuous ranges, at most
        `limit`, keeping `prefer` when it belongs)."""
        if self.kind == "value":
            return [self.value]
        if self.kind == "choice":
            vals = list(self.choices)
        else:
            vals = self._grid(max(limit or 1000, 2))
        if limit == 1:
            return vals[:1]
        if limit and len(vals) > limit:
            idx = sorted({round(i * (len(vals) - 1) / (limit - 1)) for i in range(limit)})
            picked = [vals[i] for i in idx]
            if prefer is not None and prefer in vals and prefer not in picked:
                picked[-2 if len(picked) > 1 else 0] = prefer
            vals = picked
        return vals

    def _grid(self, limit: int) -> list:
        lo, hi = self.lo, self.hi
        if self.step:
            n = int(round((hi - lo) / self.step))
            if n + 1 <= limit:
                vals = [lo + i * self.step for i in range(n + 1)]
                return [int(v) if self.kind == "int" else round(v, 12) for v in vals]
        if self.kind == "int" and hi - lo + 1 <= limit:
            return list(range(int(lo), int(hi) + 1))
        if self.log:
            vals = [math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (limit - 1))
                    for i in range(limit)]
        else:
            vals = [lo + i * (hi - lo) / (limit - 1) for i in range(limit)]
        if self.kind == "int":
            return sorted({int(round(v)) for v in vals})
        if self.step:  # snap to the grid
            vals = [round(lo + round((v - lo) / self.step) * self.step, 12) for v in vals]
        return sorted(set(vals))

    def contains(self, v: Any) -> bool:
        if self.kind == "value":
            return v == self.value and type(v) is type(self.value)
        if self.kind == "choice":
            return any(v == c and isinstance(v, bool) == isinstance(c, bool)
                       for c in self.choices)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if not self.lo <= v <= self.hi:
            return False
        if self.kind == "int" and v != int(v):
            return False
        if self.step:
            k = (v - self.lo) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def text(self) -> str:
        if self.kind == "value":
            return f"= {self.value!r}"
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        extra = (f" step {self.step:g}" if self.step else "") + (" log" if self.log else "")
        return f"{self.kind} [{self.lo:g}, {self.hi:g}]{extra}"


@dataclass(frozen=True)
class Condition:
    """`child` is sampled only when `parent`'s value is in `values`; else it is `otherwise`
    when `has_else` (the YAML gave `else:`), or left to the recipe default.

    "No else" is a plain flag, not an identity sentinel: a condition crosses pickles (Tune saves
    the searcher, Ray ships it) and a sentinel compared with `is` does not survive them."""

    child: str
    parent: str
    values: tuple
    otherwise: Any = None  # the child's value while inactive; read only when has_else
    has_else: bool = False

    def text(self) -> str:
        tail = f", else {self.otherwise!r}" if self.has_else else ""
        return f"only when {self.parent} in {list(self.values)}{tail}"


def _near(word: str, options) -> str:
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean `{near[0]}`?" if near else ""


class _Checker:
    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.source}: {key}: {msg}" if self.source else f"{key}: {msg}")


# ---------------------------------------------------------------------------------------------
# one section of a space file at a time: `params`, `conditions`, `objectives`, `constraints`
#
# Each check reports to the shared `_Checker` and drops what it refuses instead of raising, so
# that one `SpaceError` can list every mistake in a file; the checks that need the whole space
# at once (cycles, device requirements, refused pairs) follow in the next section.

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


def _check_params(ck: _Checker, raw: Any) -> dict[str, Dim]:
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
            ck.err(key, f"unknown parameter{_near(name, PARAMS)} "
                        f"(known: {', '.join(PARAMS)})")
            continue
        dim = _check_dim(ck, key, PARAMS[name], name, spec)
        if dim is not None:
            dims[name] = dim
    return dims


def _check_dim(ck: _Checker, key: str, p: Param, name: str, spec: Any) -> Dim | None:
    if not isinstance(spec, Mapping):
        ck.err(key, f"must be one of {{float: [lo, hi]}}, {{int: [lo, hi]}}, {{choice: [...]}}, "
                    f"{{value: x}}; got {spec!r}")
        return None
    kinds = [k for k in DIM_KINDS if k in spec]
    if len(kinds) != 1:
        unknown = [k for k in spec if k not in DIM_KINDS + ("step", "log")]
        hint = _near(unknown[0], DIM_KINDS) if unknown else ""
        ck.err(key, f"needs exactly one of {', '.join(DIM_KINDS)}, got keys "
                    f"{list(spec)}{hint}")
        return None
    kind = kinds[0]
    bad = False
    for k in spec:
        if k != kind and k not in DIM_EXTRA[kind]:
            allowed = ", ".join((kind, *DIM_EXTRA[kind]))
            ck.err(f"{key}.{k}", f"unknown key{_near(k, (kind, *DIM_EXTRA[kind]))} for a "
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


def _check_conditions(ck: _Checker, raw: Any, dims: dict[str, Dim]) -> dict[str, Condition]:
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
            ck.err(key, f"unknown parameter{_near(child, PARAMS)}")
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
                ck.err(f"{key}.{k}", f"unknown key{_near(k, CONDITION_KEYS)} "
                                     f"(allowed: {', '.join(CONDITION_KEYS)})")
                bad = True
        parent = spec.get("param")
        values = spec.get("in")
        if parent is None or values is None:
            ck.err(key, "needs `param` (the parent) and `in` (its values that enable "
                        f"`{child}`)")
            continue
        if parent not in PARAMS:
            ck.err(f"{key}.param", f"unknown parent parameter `{parent}`{_near(parent, PARAMS)}")
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


def _check_objectives(ck: _Checker, raw: Any) -> list[tuple[str, str]]:
    if not isinstance(raw, Mapping) or not raw:
        ck.err("objectives", f"must be a non-empty mapping metric -> min|max, got {raw!r}")
        return list(DEFAULT_OBJECTIVES.items())
    out = []
    for metric, direction in raw.items():
        if metric not in pareto.METRICS:
            ck.err(f"objectives.{metric}", f"unknown metric{_near(metric, pareto.METRICS)} "
                                           f"(allowed: {', '.join(pareto.METRICS)})")
        elif direction not in pareto.DIRECTIONS:
            ck.err(f"objectives.{metric}", f"direction must be min or max, got {direction!r}")
        else:
            out.append((metric, direction))
    return out


def _check_constraints(ck: _Checker, raw: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if raw is None:
        return out
    if not isinstance(raw, Mapping):
        ck.err("constraints", f"must be a mapping such as {{max_dwer: 0.02}}, got {raw!r}")
        return out
    for key, value in raw.items():
        k = f"constraints.{key}"
        if key not in pareto.CONSTRAINTS:
            ck.err(k, f"unknown constraint{_near(key, pareto.CONSTRAINTS)} "
                      f"(allowed: {', '.join(pareto.CONSTRAINTS)})")
            continue
        v = _number(value)
        if v is None:
            ck.err(k, f"must be a number, got {value!r}")
        elif key in ("max_latency_s", "min_speedup") and v <= 0:
            ck.err(k, f"must be > 0, got {value!r}")
        elif key in ("max_hallucination", "max_extra_hallucination") and not 0 <= v <= 1:
            ck.err(k, f"is a share of the probes and must be in [0, 1], got {value!r}")
        elif key in ("max_dwer", "max_dcer") and v <= -1:
            ck.err(k, f"is a relative change (0.02 = 2% worse) and must be > -1, got {value!r}")
        else:
            out[key] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# checks across parameters: parents before children, and which combinations of values a trial
# can actually reach
#
# A space may list a CUDA-only choice or two values the recipe refuses together as long as the
# conditions keep them apart, so these checks walk the condition graph rather than the product
# of all domains; only sampled values of each range are probed (`PROBE_VALUES`) to keep
# loading fast.

PROBE_VALUES = 6  # values per parameter tried in the pairwise recipe check


def _order(ck: _Checker, dims: dict[str, Dim], conds: dict[str, Condition]) -> list[str]:
    """Parameters with every parent before its children; reports cycles."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = path[path.index(n):] + [n]
            ck.err(f"conditions.{n}", "conditions form a cycle: " + " -> ".join(cyc))
            return
        state[n] = 1
        if n in conds:
            visit(conds[n].parent, [*path, n])
        state[n] = 2
        order.append(n)

    for n in dims:
        visit(n, [])
    return [n for n in order if n in dims]


# -- reachability: which combinations of values can a trial actually see? ----------------------


def _assignments(dims: dict[str, Dim], conds: dict[str, Condition],
                 fixed: dict[str, Any]) -> dict[str, Any] | None:
    """A complete flat dict a trial could produce in which every key of `fixed` is active with
    that value, or None when the conditions make that impossible. Other parameters take their
    default when it is in their domain (else their first value) or, when inactive, their
    `else` value."""
    need = dict(fixed)
    # walk up each fixed parameter's chain of parents, choosing parent values that enable it
    todo = list(fixed)
    while todo:
        child = todo.pop()
        cond = conds.get(child)
        if cond is None:
            continue
        if cond.parent in need:
            if need[cond.parent] not in cond.values:
                return None
            continue
        default = PARAMS[cond.parent].default
        options = [v for v in cond.values if dims[cond.parent].contains(v)]
        if not options:
            return None
        need[cond.parent] = default if default in options else options[0]
        todo.append(cond.parent)
    flat: dict[str, Any] = {}
    for name in _topo(dims, conds):
        dim, cond = dims[name], conds.get(name)
        active = cond is None or flat.get(cond.parent, PARAMS[cond.parent].default) in cond.values
        if name in need:
            if not active:
                return None
            flat[name] = need[name]
        elif not active:
            if cond.has_else:
                flat[name] = cond.otherwise
        else:
            default = PARAMS[name].default
            flat[name] = default if dim.contains(default) else dim.domain(1)[0]
    return flat


def _topo(dims: dict[str, Dim], conds: dict[str, Condition]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        if n in conds:
            visit(conds[n].parent)
        order.append(n)

    for n in dims:
        visit(n)
    return order


def _values(dims: dict[str, Dim], conds: dict[str, Condition], name: str) -> list:
    """Values `name` can take in a trial: its domain sample, plus its `else` value."""
    vals = dims[name].domain(PROBE_VALUES, prefer=PARAMS[name].default) if name in dims else []
    cond = conds.get(name)
    if cond is not None and cond.has_else and cond.otherwise not in vals:
        vals.append(cond.otherwise)
    return vals


def _check_requirements(ck: _Checker, dims: dict[str, Dim], conds: dict[str, Condition],
                        broken: set[str]) -> set[str]:
    """A choice whose Param requires another parameter's value (CUDA-only schemes, 2:4,
    reduce-overhead need device=cuda) must be unreachable without that value. Returns the
    parameters it reported."""
    flagged: set[str] = set()
    for name, dim in dims.items():
        p = PARAMS[name]
        if name in broken:
            continue
        for req in p.requires:
            if req.key in broken:
                continue
            offending = [v for v in dim.domain() if v in req.values]
            others = [w for w in (_values(dims, conds, req.key) if req.key in dims
                                  else [PARAMS[req.key].default]) if w != req.equals]
            bad, seen_w = [], None
            for v in offending:
                for w in others:
                    fixed = {name: v, **({req.key: w} if req.key in dims else {})}
                    if _assignments(dims, conds, fixed) is not None:
                        bad.append(v)
                        seen_w = w
                        break
            if bad:
                why = f" ({req.why})" if req.why else ""
                if req.key not in dims:
                    where = f"{req.key} is not searched and stays {seen_w!r}"
                elif dims[req.key].kind == "value":
                    where = f"{req.key} is fixed to {seen_w!r}"
                else:
                    where = f"{req.key} may be {seen_w!r} with it"
                shown = ", ".join(map(repr, bad))
                ck.err(f"params.{name}",
                       f"{shown} need{'s' if len(bad) == 1 else ''} {req.key}={req.equals!r}"
                       f"{why}, but {where}: add `conditions: {{{name}: {{param: {req.key}, "
                       f"in: [{req.equals}]}}}}`, fix {req.key} to {req.equals!r}, or drop "
                       f"{shown}")
                flagged.add(name)
    return flagged


def _check_pairs(ck: _Checker, dims: dict[str, Dim], conds: dict[str, Condition],
                 skip: set[str]):
    """Every pair of values two parameters can take together (ranges sampled) must make a
    recipe that `Recipe.from_flat` accepts, so no trial fails on a refused combination."""
    def involved(n: str) -> bool:  # n or one of its parents failed an earlier check
        seen = set()
        while n not in seen:
            if n in skip:
                return True
            seen.add(n)
            if n not in conds:
                return False
            n = conds[n].parent
        return False

    names = [n for n in dims if not involved(n)]
    seen_pairs: set[tuple[str, str]] = set()
    vals = {n: dims[n].domain(PROBE_VALUES, prefer=PARAMS[n].default) for n in names}
    singles_ok: dict[tuple[str, Any], bool] = {}

    def probe(fixed: dict) -> str | None:
        flat = _assignments(dims, conds, fixed)
        if flat is None:
            return None
        try:
            Recipe.from_flat(flat)
        except RecipeError as e:
            return str(e)
        return None

    for n in names:
        for v in vals[n]:
            msg = probe({n: v})
            singles_ok[(n, repr(v))] = msg is None
            if msg:
                ck.err(f"params.{n}", f"{n}={v!r} makes a recipe the recipe refuses: {msg}")
                break
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if (a, b) in seen_pairs:
                continue
            for va in vals[a]:
                if not singles_ok.get((a, repr(va)), True):
                    continue
                hit = None
                for vb in vals[b]:
                    if not singles_ok.get((b, repr(vb)), True):
                        continue
                    msg = probe({a: va, b: vb})
                    if msg:
                        hit = (vb, msg)
                        break
                if hit:
                    ck.err(f"params.{a}", f"{a}={va!r} with {b}={hit[0]!r} is refused by the "
                                          f"recipe ({hit[1]}); add a condition so they are "
                                          "never sampled together")
                    seen_pairs.add((a, b))
                    break


# ---------------------------------------------------------------------------------------------
# warm starts: recipes a space asks the sampler to measure first, right after the baseline
#
# Most random points of a large space break the model (a pruned decoder loops, fp16 on CPU
# crawls), so a sweep that starts from random spends its first trials learning what the study
# already knows. A space may list `starts:` (partial recipes over its own parameters, e.g. the
# study's dynamic int8 and the bf16-encoder + int8-decoder mix); they are queued after the
# baseline (Optuna `enqueue_trial` through Tune's `points_to_evaluate`), so the front is sensible
# from the first trials and TPE models around good points. Every sampler gets the same starts.
#
# A start is checked with the rest of the file: its keys must be parameters of the space, its
# values inside their ranges, a conditioned parameter may only be set when its condition holds,
# and the whole point must be a valid recipe. A start needing a device the cluster lacks is
# skipped at sweep time, not refused (the same file serves CPU and GPU clusters).
#
# The fastest mix depends on the CPU: bf16 matmuls beat int8 on AMX tiles and lose to it (about
# 2x) without them. A start may say which machines it is for with `when:` (see
# `machine_fits`): `encoder: bf16` or `encoder: dynamic_int8` (the faster encoder scheme the
# launcher finds on the running CPU, measured from the kernel table: `sweep.inputs.machine.
# encoder_scheme`), and/or `isa: [flags]` (CPU flags all present, e.g. amx_bf16). The launcher
# queues the starts fitting the machine; a start without `when:` fits every machine.
WHEN_KEYS = {"encoder": machine.ENCODER_SCHEMES, "isa": machine.ISA_FLAGS}


def _check_when(ck: _Checker, where: str, raw: Any) -> dict | None:
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
            ck.err(f"{where}.when.{key}", f"unknown{_near(key, WHEN_KEYS)} (allowed: "
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


def check_starts(ck: _Checker, raw: Any, params: Mapping[str, Dim],
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
                ck.err(f"{where}.{key}", f"not a parameter of this space{_near(key, params)}"
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


def _check_confidence(ck: _Checker, raw: Any, constraints: dict) -> float | None:
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


SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
TOP_KEYS = ("name", "description", "params", "conditions", "objectives", "constraints",
            "confidence", "starts")


@dataclass(frozen=True)
class Space:
    """A validated search space. `params` is in sampling order (parents first)."""

    name: str
    description: str
    params: dict[str, Dim]
    conditions: dict[str, Condition] = field(default_factory=dict)
    objectives: tuple[tuple[str, str], ...] = tuple(DEFAULT_OBJECTIVES.items())
    constraints: dict[str, float] = field(default_factory=dict)
    # None: `max_dwer` is judged on the point estimate; else on dwer's one-sided upper bound at
    # this confidence (a trial is feasible when the data says so with this confidence)
    confidence: float | None = None
    source: str = ""
    starts: tuple[dict, ...] = ()  # partial recipes measured first (see `resolve`)
    # each start's `when` (same order; {}: every machine), see `machine_fits`
    start_when: tuple[dict, ...] = ()

    # -- sampling --------------------------------------------------------------------------

    def domains(self, devices: set[str] | frozenset[str] | None = None) -> dict[str, Dim | None]:
        """Each dimension restricted to `devices` (None = no restriction): `device` choices not
        available and choices whose Param requires an unavailable device are dropped. A
        dimension left without values maps to None (never sampled). Depends only on `devices`,
        so every trial of a study sees the same Optuna distributions."""
        out: dict[str, Dim | None] = {}
        for name, dim in self.params.items():
            if devices is None:
                out[name] = dim
                continue
            vals = [v for v in dim.domain() if _device_ok(name, v, devices)] \
                if dim.kind in ("choice", "value") else None
            if vals is None:
                out[name] = dim
            elif not vals:
                out[name] = None
            elif dim.kind == "value" or len(vals) == 1:
                out[name] = Dim(name, "value", value=vals[0])
            else:
                out[name] = Dim(name, "choice", choices=tuple(vals))
        return out

    def sample(self, trial, *, devices: set[str] | frozenset[str] = frozenset({"cpu"})) -> dict:
        """Define-by-run: suggest every active parameter on `trial` (an `optuna.Trial`, or
        Ray's wrapper of one) under its dotted name and return the flat recipe dict (sampled
        and fixed values, plus `else` values of inactive ones; the rest are recipe defaults).
        Choices needing a device outside `devices` are never asked for."""
        devices = frozenset(devices)
        doms = self.domains(devices)
        if "device" in doms and doms["device"] is None:
            raise SpaceError([f"params.device: the space needs device "
                              f"{self.params['device'].text()}, but only "
                              f"{sorted(devices)} are available"], self.source)
        out: dict[str, Any] = {}
        effective: dict[str, Any] = {}
        for name in self.params:
            cond = self.conditions.get(name)
            active = doms[name] is not None and (
                cond is None or self._effective(cond.parent, effective) in cond.values)
            if not active:
                if cond is not None and cond.has_else:
                    out[name] = effective[name] = cond.otherwise
                continue
            d = doms[name]
            if d.kind == "value":
                value = d.value
            elif d.kind == "choice":
                value = trial.suggest_categorical(name, list(d.choices))
            elif d.kind == "float":
                value = trial.suggest_float(name, float(d.lo), float(d.hi),
                                            step=None if d.step is None else float(d.step),
                                            log=d.log)
                if d.step:  # 0.30000000000000004 -> 0.3
                    value = float(round(value, 12))
            else:
                value = trial.suggest_int(name, int(d.lo), int(d.hi), step=int(d.step or 1),
                                          log=d.log)
            out[name] = effective[name] = value
        return out

    def _effective(self, name: str, effective: Mapping) -> Any:
        if name in effective:
            return effective[name]
        return PARAMS[name].default

    def baseline(self) -> dict:
        """The flat dict of the unmodified model as this space samples it (for Optuna's
        `points_to_evaluate`): recipe defaults for searched parameters, fixed values as fixed,
        the device the default one when the space allows it. A choice that excludes its
        default is left out (Optuna then samples it)."""
        return resolve({}, self.params, self.conditions)[0]  # the empty warm start

    def start_points(self, devices: set[str] | frozenset[str] = frozenset({"cpu"}),
                     machine_profile: Mapping | None = None) -> list:
        """The full points of the warm starts this cluster can run (see `resolve`) that fit
        the machine (`sweep.inputs.machine.profile`; None: every start)."""
        return [point for _, point in self.fitting_starts(devices, machine_profile)]

    def fitting_starts(self, devices: set[str] | frozenset[str] = frozenset({"cpu"}),
                       machine_profile: Mapping | None = None) -> list[tuple[int, dict]]:
        """`start_points` with each one's index in `starts`."""
        doms = self.domains(frozenset(devices))
        whens = self.start_when or ({},) * len(self.starts)
        out = []
        for i, (s, w) in enumerate(zip(self.starts, whens)):
            if machine_fits(w, machine_profile):
                point, problems = resolve(s, doms, self.conditions)
                if not problems:
                    out.append((i, point))
        return out

    def without_values(self, drop: Iterable) -> Space:
        """This space with the values `drop` taken out of every searched choice (a choice left
        with one value becomes that value), and the warm starts setting any of them removed
        (the kernel table found no fast kernel for them here: `sweep.launch.kernel_fit`).
        Fixed values (`value:`) stay: the space asked for exactly them."""
        drop = set(drop)

        def gone(v):
            return isinstance(v, str) and v in drop

        params = {}
        for name, dim in self.params.items():
            vals = [c for c in dim.choices if not gone(c)] if dim.kind == "choice" else None
            params[name] = (dim if vals is None or len(vals) == len(dim.choices) or not vals
                            else Dim(name, "value", value=vals[0]) if len(vals) == 1
                            else replace(dim, choices=tuple(vals)))
        whens = self.start_when or ({},) * len(self.starts)
        kept = [(st, w) for st, w in zip(self.starts, whens)
                if not any(gone(v) for v in st.values())]
        return replace(self, params=params, starts=tuple(st for st, _ in kept),
                       start_when=tuple(w for _, w in kept) if self.start_when else ())

    # -- figures ---------------------------------------------------------------------------

    def violation(self, metrics: Mapping, baseline: Mapping | None = None) -> list[float]:
        """Optuna-style constraint values (<= 0 feasible), one per constraint in file order;
        see `sweep.results.pareto.constraint_values`."""
        return pareto.constraint_values(metrics, self.constraints, baseline)

    def feasible(self, metrics: Mapping, baseline: Mapping | None = None) -> bool:
        return pareto.feasible(metrics, self.constraints, baseline)

    # -- introspection ---------------------------------------------------------------------

    def mentions(self, value: Any) -> bool:
        """True when `value` is a searched parameter name or a value some parameter can take
        (e.g. `mentions("cuda")`, `mentions("static_int8")`)."""
        if value in self.params:
            return True
        for name, dim in self.params.items():
            if dim.kind in ("choice", "value") and dim.contains(value):
                return True
            cond = self.conditions.get(name)
            if cond is not None and cond.has_else and cond.otherwise == value \
                    and type(cond.otherwise) is type(value):
                return True
        return False

    def describe(self) -> str:
        lines = [f"search space `{self.name}`" + (f" ({self.source})" if self.source else "")]
        if self.description:
            lines.append("  " + " ".join(self.description.split()))
        width = max((len(n) for n in self.params), default=0)
        for name, dim in self.params.items():
            cond = self.conditions.get(name)
            lines.append(f"  {name.ljust(width)}  {dim.text()}"
                         + (f"  ({cond.text()})" if cond else ""))
        lines.append("  objectives: " + ", ".join(f"{m} {d}" for m, d in self.objectives))
        if self.constraints:
            lines.append("  constraints: " + ", ".join(f"{k}={v:g}"
                                                      for k, v in self.constraints.items())
                         + (f" (max_dwer judged at {self.confidence:.0%} confidence)"
                            if self.confidence else ""))
        whens = self.start_when or ({},) * len(self.starts)
        lines += [f"  start: {', '.join(f'{k}={v}' for k, v in st.items())}" + (
            f" (when {', '.join(k + '=' + '|'.join(v) for k, v in w.items())})" if w else "")
            for st, w in zip(self.starts, whens)]
        return "\n".join(lines)


def _device_ok(name: str, value: Any, devices: frozenset[str]) -> bool:
    if name == "device":
        return value in devices
    for req in PARAMS[name].requires:
        if req.key == "device" and value in req.values and req.equals not in devices:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# loading and validation


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path) -> Space:
    """A space by name (a file of `search_spaces/`, e.g. "quick") or by path to a YAML file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        stem = text[:-5] if text.endswith(".yaml") else text
        cand = SPACES_DIR / f"{stem}.yaml"
        if "/" not in stem and cand.is_file():
            path = cand
        else:
            raise SpaceError([f"no search space `{text}`: not a file, and not a name in "
                              f"{_show(SPACES_DIR)}/ (available: "
                              f"{', '.join(available_spaces()) or 'none'})"])
    source = _show(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpaceError([f"{source}: not valid YAML: {e}"], source) from None
    return space_from_dict(data, source=source, default_name=path.stem)


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        try:
            return str(path.resolve().relative_to(SPACES_DIR.parent))
        except ValueError:
            return str(path)


def space_from_dict(data: Any, *, source: str = "", default_name: str = "space") -> Space:
    """Validate a parsed YAML document and build the Space; one SpaceError lists every
    problem."""
    ck = _Checker(source)
    if not isinstance(data, Mapping):
        ck.err("(top level)", f"must be a mapping with keys {', '.join(TOP_KEYS)}, "
                              f"got {type(data).__name__}")
        raise SpaceError(ck.errors, source)
    for key in data:
        if key not in TOP_KEYS:
            ck.err(str(key), f"unknown top-level key{_near(key, TOP_KEYS)} "
                             f"(allowed: {', '.join(TOP_KEYS)})")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        ck.err("name", f"must be a non-empty string, got {name!r}")
        name = default_name
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        ck.err("description", f"must be a string, got {description!r}")
        description = ""

    dims = _check_params(ck, data.get("params"))
    conditions = _check_conditions(ck, data.get("conditions"), dims)
    conditions = {**implied_conditions(dims, conditions), **conditions}
    objectives = _check_objectives(ck, data.get("objectives", DEFAULT_OBJECTIVES))
    constraints = _check_constraints(ck, data.get("constraints"))
    confidence = _check_confidence(ck, data.get("confidence"), constraints)
    n_before = len(ck.errors)
    order = _order(ck, dims, conditions)
    cyclic = len(ck.errors) > n_before
    # entries that failed their own checks: later checks skip them instead of piling on
    raw_params = data.get("params") if isinstance(data.get("params"), Mapping) else {}
    raw_conds = data.get("conditions") if isinstance(data.get("conditions"), Mapping) else {}
    broken = {n for n in raw_params if n not in dims} | \
             {n for n in raw_conds if n not in conditions}
    starts: list[tuple[dict, dict]] = []
    if not cyclic:
        flagged = _check_requirements(ck, dims, conditions, broken)
        _check_pairs(ck, dims, conditions, broken | flagged)
        starts = check_starts(ck, data.get("starts"), {n: dims[n] for n in order}, conditions)
    if ck.errors:
        raise SpaceError(ck.errors, source)
    return Space(name=name, description=description,
                 params={n: dims[n] for n in order},
                 conditions={n: conditions[n] for n in order if n in conditions},
                 objectives=tuple(objectives), constraints=constraints,
                 confidence=confidence, source=source,
                 starts=tuple(s for s, _ in starts), start_when=tuple(w for _, w in starts))
