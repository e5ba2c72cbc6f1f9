"""Search spaces as data: YAML files validated against `sweep.recipe.PARAMS`. Pure.

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
    starts:                           # optional: partial recipes measured first
      - {quant.scheme: dynamic_int8}

A conditioned parameter is sampled only when its parent's value is in `in`; otherwise it takes
its `else` value when one is given, else the recipe default (it is then left out of the
recipe). An inactive parent counts with the value it then has. `load_space` checks everything
(names, ranges against each Param, choices, conditions, device requirements such as CUDA-only
choices, pairs of values the recipe refuses together, objectives, constraints) and raises one
`SpaceError` listing every problem. Imports neither Ray, MLflow nor torch; optuna is only
touched through the trial passed to `Space.sample`.

The file is spread over four modules, each small enough to read at once: `space_dims` (the
types), `space_schema` (one section at a time), `space_graph` (checks across parameters) and
this one (the `Space` a sweep uses, and loading). Every public name stays importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import pareto
from .recipe import PARAMS
from .space_dims import DEFAULT_OBJECTIVES, Condition, Dim, SpaceError, _Checker, _near
from .space_graph import _check_pairs, _check_requirements, _order
from .space_starts import check_starts, resolve
from .space_schema import (_check_conditions, _check_constraints, _check_objectives,
                           _check_params)

# defined here before the split; callers keep importing them from sweep.space
from .space_graph import PROBE_VALUES as PROBE_VALUES
from .space_schema import CONDITION_KEYS as CONDITION_KEYS, DIM_EXTRA as DIM_EXTRA
from .space_schema import DIM_KINDS as DIM_KINDS

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
TOP_KEYS = ("name", "description", "params", "conditions", "objectives", "constraints",
            "starts")


@dataclass(frozen=True)
class Space:
    """A validated search space. `params` is in sampling order (parents first)."""

    name: str
    description: str
    params: dict[str, Dim]
    conditions: dict[str, Condition] = field(default_factory=dict)
    objectives: tuple[tuple[str, str], ...] = tuple(DEFAULT_OBJECTIVES.items())
    constraints: dict[str, float] = field(default_factory=dict)
    source: str = ""
    starts: tuple[dict, ...] = ()  # partial recipes measured first (sweep.space_starts)

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

    def start_points(self, devices: set[str] | frozenset[str] = frozenset({"cpu"})) -> list:
        """The full points of the warm starts this cluster can run (see `sweep.space_starts`)."""
        doms = self.domains(frozenset(devices))
        points = [resolve(s, doms, self.conditions) for s in self.starts]
        return [point for point, problems in points if not problems]

    # -- figures ---------------------------------------------------------------------------

    def violation(self, metrics: Mapping, baseline: Mapping | None = None) -> list[float]:
        """Optuna-style constraint values (<= 0 feasible), one per constraint in file order;
        see `sweep.pareto.constraint_values`."""
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
                                                      for k, v in self.constraints.items()))
        lines += [f"  start: {', '.join(f'{k}={v}' for k, v in st.items())}" for st in self.starts]
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
    objectives = _check_objectives(ck, data.get("objectives", DEFAULT_OBJECTIVES))
    constraints = _check_constraints(ck, data.get("constraints"))
    n_before = len(ck.errors)
    order = _order(ck, dims, conditions)
    cyclic = len(ck.errors) > n_before
    # entries that failed their own checks: later checks skip them instead of piling on
    raw_params = data.get("params") if isinstance(data.get("params"), Mapping) else {}
    raw_conds = data.get("conditions") if isinstance(data.get("conditions"), Mapping) else {}
    broken = {n for n in raw_params if n not in dims} | \
             {n for n in raw_conds if n not in conditions}
    starts: list[dict] = []
    if not cyclic:
        flagged = _check_requirements(ck, dims, conditions, broken)
        _check_pairs(ck, dims, conditions, broken | flagged)
        starts = check_starts(ck, data.get("starts"), {n: dims[n] for n in order}, conditions)
    if ck.errors:
        raise SpaceError(ck.errors, source)
    return Space(name=name, description=description,
                 params={n: dims[n] for n in order},
                 conditions={n: conditions[n] for n in order if n in conditions},
                 objectives=tuple(objectives), constraints=constraints, source=source,
                 starts=tuple(starts))
