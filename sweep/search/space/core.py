"""The `Space` a sweep uses: a validated search space that samples a trial define-by-run, gives
the baseline and the warm starts a cluster and machine can run, judges constraints and
describes itself. Pure: optuna is only touched through the trial passed to `Space.sample`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ...results import pareto
from ...techniques.recipe import PARAMS
from .sections import DEFAULT_OBJECTIVES
from .starts import machine_fits, resolve
from .vocabulary import Condition, Dim, SpaceError


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
