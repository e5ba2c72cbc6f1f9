"""The checks across parameters: parents before children (`parents_first`, the one order of the
condition graph), and which combinations of values a trial can actually reach. Pure.

A space may list a CUDA-only choice or two values the recipe refuses together as long as the
conditions keep them apart, so these checks walk the condition graph rather than the product of
all domains; only sampled values of each range are probed (`PROBE_VALUES`) to keep loading
fast."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...techniques.recipe import PARAMS, Recipe, RecipeError
from .vocabulary import Checker, Condition, Dim

PROBE_VALUES = 6  # values per parameter tried in the pairwise recipe check


def parents_first(names: Iterable[str], conds: Mapping[str, Condition]
                  ) -> tuple[list[str], list[list[str]]]:
    """`names` with every parent before its children (else in the given order), and each cycle
    the conditions form, as the path that closes it (`a -> b -> a`). The one topological sort:
    loading orders the space's params by it, and `_assignments` walks a trial in its order."""
    wanted = dict.fromkeys(names)  # in order, and `in` is cheap
    order: list[str] = []
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: placed

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycles.append(path[path.index(n):] + [n])
            return
        state[n] = 1
        if n in conds:
            visit(conds[n].parent, [*path, n])
        state[n] = 2
        order.append(n)

    for n in wanted:
        visit(n, [])
    return [n for n in order if n in wanted], cycles


def check_order(ck: Checker, dims: dict[str, Dim], conds: dict[str, Condition]
                ) -> list[str] | None:
    """The searched parameters in sampling order (parents first), or None when the conditions
    form a cycle (each one reported): the checks that walk the graph cannot run then."""
    order, cycles = parents_first(dims, conds)
    for cycle in cycles:
        ck.err(f"conditions.{cycle[0]}", "conditions form a cycle: " + " -> ".join(cycle))
    return None if cycles else order


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
    for name in parents_first(dims, conds)[0]:
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


def _values(dims: dict[str, Dim], conds: dict[str, Condition], name: str) -> list:
    """Values `name` can take in a trial: its domain sample, plus its `else` value."""
    vals = dims[name].domain(PROBE_VALUES, prefer=PARAMS[name].default) if name in dims else []
    cond = conds.get(name)
    if cond is not None and cond.has_else and cond.otherwise not in vals:
        vals.append(cond.otherwise)
    return vals


def check_requirements(ck: Checker, dims: dict[str, Dim], conds: dict[str, Condition],
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


def check_pairs(ck: Checker, dims: dict[str, Dim], conds: dict[str, Condition],
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
