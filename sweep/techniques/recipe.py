"""Recipes: a point of the search space, one frozen config per registered technique (pure).

A parameter has one dotted name everywhere (YAML search spaces, Optuna, MLflow, recipe.json). A
new technique is one module in `sweep.techniques` (or a plugin): Recipe holds whatever the
registry holds, so nothing here names a technique."""

from __future__ import annotations

import difflib
import json
from typing import ClassVar

from . import DEVICE, PARAMS, TECHNIQUES, RecipeError, Technique, plugin_error

__all__ = ["PARAMS", "TECHNIQUES", "Recipe", "RecipeError", "space_calibrates"]


class Recipe:
    """A point of the search space: the device and one config per registered technique, by
    prefix (`recipe.quant`), in application order. Immutable; equal when all parts are."""

    __slots__ = ("device", "_parts")
    FORMAT_VERSION: ClassVar[int] = 1

    def __init__(self, device: str = DEVICE.default, **parts: Technique):
        if err := plugin_error():
            raise err
        for key in [k for k in parts if k not in TECHNIQUES][:1]:
            raise RecipeError(f"unknown technique `{key}`; known: {', '.join(TECHNIQUES)}")
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "_parts", {p: parts.get(p) or cls()
                                            for p, cls in TECHNIQUES.items()})
        flat = self.to_flat()
        for name, value in flat.items():  # device, then cross-field rules (CUDA-only choices)
            if err := PARAMS[name].validate(value) or PARAMS[name].requirement_error(value, flat):
                raise RecipeError(err)

    def __getattr__(self, prefix: str) -> Technique:
        try:
            return object.__getattribute__(self, "_parts")[prefix]
        except KeyError:
            raise AttributeError(f"Recipe has no technique `{prefix}` (registered: "
                                 f"{', '.join(TECHNIQUES)})") from None

    def __setattr__(self, name, value):
        raise AttributeError("Recipe is immutable: use recipe.replace(...)")

    def __eq__(self, other):
        return isinstance(other, Recipe) and (self.device, self._parts) == (other.device,
                                                                             other._parts)

    def __hash__(self):
        return hash((self.device, tuple(self._parts.values())))

    def __reduce__(self):  # pickles by its flat form: plain data across processes
        return Recipe.from_flat, (self.to_flat(),)

    def __repr__(self):
        changed = ", ".join(f"{k}={v!r}" for k, v in self.to_flat().items()
                            if v != PARAMS[k].default)
        return f"Recipe({changed})"

    def replace(self, device: str | None = None, **parts: Technique) -> Recipe:
        return Recipe(device or self.device, **{**self._parts, **parts})

    def configs(self) -> list[Technique]:  # in application order
        return list(self._parts.values())

    @classmethod
    def from_flat(cls, flat: dict) -> Recipe:
        """From dotted names; missing names take their defaults, unknown ones are refused."""
        for key in [k for k in flat if k not in PARAMS][:1]:
            near = difflib.get_close_matches(str(key), list(PARAMS), n=1, cutoff=0.5)
            raise RecipeError(f"unknown recipe key `{key}`" + (
                f"; did you mean `{near[0]}`?" if near else f"; known: {', '.join(PARAMS)}"))
        typed = {k: PARAMS[k].coerce(v) for k, v in flat.items()}
        parts = {p: tech(**{n.split(".", 1)[1]: v for n, v in typed.items()
                            if n.startswith(p + ".")}) for p, tech in TECHNIQUES.items()}
        return cls(device=typed.get("device", DEVICE.default), **parts)

    def to_flat(self) -> dict:  # every parameter under its dotted name
        return {"device": self.device} | {n: getattr(c, n.split(".", 1)[1])
                                          for c in self.configs() for n in c.PARAMS}

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """`"quant.scheme=dynamic_int8,prune.rate=0.3"` -> Recipe; values typed by their Param."""
        flat = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key in flat:
                raise RecipeError(f"recipe item {item!r}: expected key=value, each key once")
            flat[key] = value
        return cls.from_flat(flat)

    def to_json(self) -> str:
        return json.dumps({"format_version": self.FORMAT_VERSION, **self.to_flat()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        data = json.loads(text)
        if (version := data.pop("format_version", None)) != cls.FORMAT_VERSION:
            raise RecipeError(f"`format_version` must be {cls.FORMAT_VERSION}, got {version!r}")
        return cls.from_flat(data)

    # True when nothing changes the model or its decoding.
    is_baseline = property(lambda self: not any(cfg.active for cfg in self.configs()))
    # torch.compile anywhere (each technique says whether it compiles)
    compiles = property(lambda self: any(c.active and c.compiles for c in self.configs()))
    # Some active technique learns from calibration audio (static int8 scales, the int8
    # fallback's sensitivities, low-rank bases): each technique's `calibrates`.
    calibrates = property(lambda self: any(c.active and getattr(c, "calibrates", False)
                                           for c in self.configs()))

    def cheap(self) -> Recipe | None:
        """The recipe without its costly preparation (each technique's `cheap`: no compiling,
        no calibrating): what a first look at a trial's accuracy measures before paying for
        it. None when that leaves nothing to look at (the baseline) or nothing was costly."""
        try:
            out = Recipe(self.device, **{p: cfg.cheap() or type(cfg)() if cfg.active else cfg
                                         for p, cfg in self._parts.items()})
        except RecipeError:  # a cross-field rule needs the costly part: no first look
            return None
        return None if out == self or out.is_baseline else out

    def describe(self) -> str:
        """Short text for tables and progress lines, e.g. "int8 dyn (enc+dec), prune l1 0.30"."""
        text = ", ".join(cfg.describe() for cfg in self.configs() if cfg.active) or "fp32"
        return text + ("" if self.device == "cpu" else f" [{self.device}]")


def space_calibrates(space) -> bool:
    """Some recipe of `space` (anything with `mentions(name_or_value)`, a `Space`) may need
    calibration audio: it can choose static int8 or searches a parameter a technique declares
    `CALIBRATED`. The launcher loads a calibration set for its workers only then."""
    return space.mentions("static_int8") or any(
        space.mentions(p) for cls in TECHNIQUES.values() for p in getattr(cls, "CALIBRATED", ()))
