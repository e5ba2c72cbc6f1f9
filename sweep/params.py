"""Parameters and techniques: how a technique declares its dotted parameters once (kind,
default, range or choices, requirements on other parameters) and validates them (pure)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class RecipeError(ValueError):
    """A recipe value, combination or key that is not allowed; the message names the key."""


@dataclass(frozen=True)
class Requires:
    """`values` of a parameter are only valid when parameter `key` equals `equals`."""
    values: tuple
    key: str = "device"
    equals: Any = "cuda"
    why: str = ""


@dataclass(frozen=True)
class Param:
    """One searchable parameter: kind (float|int|choice|bool), default, range or choices."""
    kind: str
    default: Any
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    help: str = ""
    requires: tuple[Requires, ...] = ()
    name: str = ""  # the dotted name, filled in by @technique

    def range_text(self) -> str:
        if self.kind in ("choice", "bool"):
            shown = self.choices or (True, False)
            return "one of " + ", ".join(map(str, shown[:12])) + (
                f", ... ({len(shown)} in all)" if len(shown) > 12 else "")
        lo, hi = -math.inf if self.lo is None else self.lo, math.inf if self.hi is None else self.hi
        return f"in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"

    def validate(self, value) -> str | None:
        """None when `value` is allowed, else a message naming the parameter."""
        bad = f"`{self.name}` must be {{}}, got {self.name.rsplit('.', 1)[-1]}={value!r}"
        if self.kind in ("choice", "bool"):
            ok = value in self.choices if self.choices else isinstance(value, bool)
            return None if ok else bad.format(self.range_text())
        types = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, types) or math.isnan(value):
            return bad.format(f"{'an integer' if types == (int,) else 'a number'} "
                              + self.range_text())
        lo_bad = self.lo is not None and (value < self.lo or self.lo_open and value == self.lo)
        hi_bad = self.hi is not None and (value > self.hi or self.hi_open and value == self.hi)
        return bad.format(self.range_text()) if lo_bad or hi_bad else None

    def coerce(self, value):
        """Text (Recipe.parse, CLI, MLflow) to this parameter's type; other values unchanged."""
        if not isinstance(value, str) or self.kind == "choice":
            return value
        try:
            return {"bool": lambda s: _BOOLS[s.lower()], "int": int, "float": float}[self.kind](
                value.strip())
        except (KeyError, ValueError):
            raise RecipeError(f"`{self.name}` must be {self.kind} {self.range_text()}, "
                              f"got {value!r}") from None

    def requirement_error(self, value, flat: dict) -> str | None:
        for req in self.requires:
            if value in req.values and flat.get(req.key) != req.equals:
                return (f"`{self.name}`={value} needs {req.key}={req.equals}, got "
                        f"{req.key}={flat.get(req.key)!r}" + (f" ({req.why})" if req.why else ""))
        return None


DEVICE = Param("choice", "cpu", choices=("cpu", "cuda"), help="device to run on", name="device")
TECHNIQUES: dict[str, type] = {}  # prefix -> config class, in registration order


def technique(prefix: str, *, stage: str = "compress"):
    """Make `cls` a frozen dataclass whose fields (and defaults) are its PARAMS `prefix.*`, and
    register it. `stage`: who applies it ("compress" needs a handler in sweep.compress)."""

    def deco(cls):
        cls.PARAMS = {name: dataclasses.replace(p, name=name) for name, p in cls.PARAMS.items()}
        cls.__annotations__ = dict(cls.__dict__.get("__annotations__", {}))  # not the base's
        for name, p in cls.PARAMS.items():
            head, _, short = name.partition(".")
            if head != prefix or p.validate(p.default):
                raise TypeError(f"{cls.__name__}: `{name}` is not {prefix}.* or its default is bad")
            cls.__annotations__[short] = {"choice": "str"}.get(p.kind, p.kind)
            setattr(cls, short, p.default)
        cls.PREFIX, cls.STAGE, TECHNIQUES[prefix] = prefix, stage, cls
        return dataclass(frozen=True)(cls)

    return deco


class Technique:
    """Validates every field against PARAMS; subclasses define `active` and `describe()`."""

    PARAMS: ClassVar[dict[str, Param]] = {}  # @technique adds PREFIX and STAGE

    def __post_init__(self):
        self._normalize()
        for name, p in self.PARAMS.items():
            short = name.split(".", 1)[1]
            if p.kind == "float" and type(getattr(self, short)) is int:  # 0 and 0.0 alike
                object.__setattr__(self, short, float(getattr(self, short)))
            if err := p.validate(getattr(self, short)):
                raise RecipeError(err)
        self._check()

    _normalize = _check = lambda self: None  # hooks: canonical spelling; own-field combinations
