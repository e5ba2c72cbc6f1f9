"""What a technique is: its dotted parameters (kind, default, range or choices, requirements on
other parameters), how it is applied, stored at export and what it changes at decoding time,
all declared on one frozen config class registered by `@technique`. Pure (no torch): a
technique's `apply` imports what it runs lazily."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

# Whisper's Linear layers by role (sweep.measure.compress.layer_type_of maps module names to these).
LAYER_TYPES = ("enc_attn", "enc_mlp", "dec_self", "dec_cross", "dec_mlp", "head")
# Every subset in canonical order, so that a search space may list any of them as a choice.
TARGETS = ("all",) + tuple("+".join(c) for n in range(1, len(LAYER_TYPES))
                           for c in itertools.combinations(LAYER_TYPES, n))
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class RecipeError(ValueError):
    """A recipe value, combination or key that is not allowed; the message names the key."""


@dataclass(frozen=True)
class Requires:
    """`values` of a parameter are only valid when parameter `key` equals `equals`."""
    values: tuple  # the values that need it
    key: str = "device"  # the other parameter (a space derives a condition on it when searched)
    equals: Any = "cuda"  # the value it must have
    why: str = ""  # said in the refusal


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
        if self.kind == "bool" and not self.choices:  # as the recipe text writes it
            return "one of true, false"
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
            kind = "" if self.kind == "bool" else f"{self.kind} "  # "one of true, false" says it
            raise RecipeError(f"`{self.name}` must be {kind}{self.range_text()}, "
                              f"got {value!r}") from None

    def requirement_error(self, value, flat: dict) -> str | None:
        for req in self.requires:
            if value in req.values and flat.get(req.key) != req.equals:
                return (f"`{self.name}`={value} needs {req.key}={req.equals}, got "
                        f"{req.key}={flat.get(req.key)!r}" + (f" ({req.why})" if req.why else ""))
        return None


DEVICE = Param("choice", "cpu", choices=("cpu", "cuda"), help="device to run on", name="device")
# The registries everything else derives from: prefix -> config class in application order, and
# every parameter by dotted name (what spaces, Optuna, MLflow and recipe.json use). Filled by
# @technique as modules are imported, plugins included (sweep.techniques.load_plugins).
TECHNIQUES: dict[str, type] = {}
PARAMS: dict[str, Param] = {"device": DEVICE}


@dataclass(frozen=True)
class Storage:
    """How a technique survives export: `baked` into the saved weights, and/or `reapplied` at
    load from recipe.json (a predicate on its config), and why (the model card says it).
    `stored`: the modules it installs are saved as they run, each in its stored form (the
    tensors it computes with: int8 with its scales and zero points, bf16...;
    `sweep.measure.stored`), and rebuilt from those at load, never from fp32 weights.
    `forms`: the modules defining those module classes, each registering its classes' stored
    forms beside them; loading a checkpoint imports them before rebuilding its modules."""
    baked: bool = False
    reapplied: Callable[[Any], bool] = lambda cfg: True
    why: str = "re-applied at load from recipe.json"
    stored: bool = False  # implies baked: applied at export, its modules saved as they run
    forms: tuple[str, ...] = ()  # import paths, e.g. ("sweep.measure.tied",)

    def __post_init__(self):
        if self.stored and not self.baked:
            raise TypeError("Storage(stored=True) needs baked=True: stored modules are made at "
                            "export")
        if self.forms and not self.stored:
            raise TypeError(f"Storage(forms={self.forms}) needs stored=True: only stored modules "
                            "have forms")


def technique(prefix: str):
    """Make `cls` a frozen dataclass whose fields (and defaults) are its PARAMS `prefix.*`, and
    register it: recipes, spaces, compress, export and decoding then know it, nothing else to
    edit. Registration order is application order."""

    def deco(cls):
        if prefix in TECHNIQUES and TECHNIQUES[prefix].__qualname__ != cls.__qualname__:
            raise TypeError(f"technique prefix `{prefix}` is taken by {TECHNIQUES[prefix]}")
        cls.PARAMS = {name: dataclasses.replace(p, name=name) for name, p in cls.PARAMS.items()}
        cls.__annotations__ = dict(cls.__dict__.get("__annotations__", {}))  # not the base's
        for name, p in cls.PARAMS.items():
            head, _, short = name.partition(".")
            if head != prefix or p.validate(p.default):
                raise TypeError(f"{cls.__name__}: `{name}` is not {prefix}.* or its default is bad")
            cls.__annotations__[short] = {"choice": "str"}.get(p.kind, p.kind)
            setattr(cls, short, p.default)
        cls.PREFIX, TECHNIQUES[prefix] = prefix, cls
        PARAMS.update(cls.PARAMS)
        return dataclass(frozen=True)(cls)

    return deco


class Technique:
    """One technique's frozen config. Validates every field against PARAMS. Subclasses override
    what applies to them: `apply` (change the model), `decoding` (options handed to
    transcription), `STORAGE`, `canonical` (what counts as "no change"), `compiles`, `describe`.
    """

    PARAMS: ClassVar[dict[str, Param]] = {}  # @technique adds PREFIX
    STORAGE: ClassVar[Storage] = Storage()

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

    def canonical(self) -> Any:
        """This config with settings that change nothing reset to their defaults (e.g. a norm
        while the rate is 0). Default: itself, so any non-default value counts as a change."""
        return self

    @property
    def active(self) -> bool:
        """Changes the model or its decoding: derived from the defaults, never a hand list."""
        return self.canonical() != type(self)().canonical()

    # torch.compile somewhere (the recipe then starts from a clean dynamo cache)
    compiles = property(lambda self: False)

    def cheap(self) -> Technique | None:
        """This config without what costs much before a trial's first clip (compiling, or
        calibrating on audio), for a first look at the recipe's accuracy; None: nothing cheap
        is left of it. Default: itself when it neither compiles nor calibrates; a technique
        whose compilation is one field of several overrides it to keep the rest."""
        return None if self.compiles or getattr(self, "calibrates", False) else self

    def apply(self, model, ctx) -> None:
        """Change `model` in place (`ctx`: sweep.measure.compress.Context, the recipe, kernels
        chosen,
        notes). Called in registration order, only when active."""

    def decoding(self) -> dict:
        """Fields of the decoding options (sweep.measure.decode.Plan) it sets when active."""
        return {}

    def describe(self) -> str:
        return ", ".join(f"{n.split('.', 1)[1]}={getattr(self, n.split('.', 1)[1])}"
                         for n in self.PARAMS)
