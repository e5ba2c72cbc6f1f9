"""Typed command options: one frozen dataclass per command, whose fields say everything about an
option once. A field's metadata (`option`) generates its command-line flag and help, checks its
value, and names it where it is recorded (the saved spec, an MLflow param), so adding an option
is adding one field.

    @dataclass(frozen=True)
    class Mine(Options):
        warmup: int = option(1, "untimed passes before timing", check=at_least(0))

`Mine.add_arguments(parser)` adds `--warmup`; `Mine.from_namespace(parsed).checked()` is the
value the command runs with. Pure: no Ray, MLflow or torch.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable

# argparse `type=` of a field whose annotation names one plain type besides None
_TYPES = {"int": int, "float": float, "str": str}


def option(default: Any, help: str, *, flag: str | None = None, choices=None,
           metavar: str | None = None, const: Any = None, type: Callable | None = None,
           check: Callable[[Any, str], Any] | None = None, cli: bool = True,
           saved: bool = True, param: str | None = None) -> Any:
    """A dataclass field that is an option.

    flag     its command-line flag (default `--name-with-dashes`; a True bool: `--no-name`)
    choices  the values allowed (a tuple, or a function returning one: read when the parser is
             built, so a module can name a heavy module's list without importing it)
    const    the value of the bare flag (`--profile` alone is `--profile 20`)
    type     argparse's converter (default: from the annotation, `str` when it names several)
    check    `check(value, flag) -> value`: raises ValueError naming the flag, the value and the
             rule; returns the value the command runs with (`--trial-timeout off` -> None)
    cli      False: not added by `add_arguments` (another function adds that flag)
    saved    False: how this one command runs, not what it is (never saved, never a param)
    param    its MLflow param's name (default: the field's name)
    """
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "const": const,
            "type": type, "check": check, "cli": cli, "saved": saved, "param": param}
    return dataclasses.field(default=default, metadata=meta)


def at_least(low: float, why: str = "") -> Callable[[Any, str], Any]:
    """A `check`: the value is >= `low` (`why` follows the rule in the message)."""
    def check(value, flag: str):
        if value < low:
            raise ValueError(f"`{flag}` must be >= {low:g}{why}, got {value}")
        return value
    return check


def flag_of(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    dashed = f.name.replace("_", "-")
    return f"--no-{dashed}" if f.default is True else f"--{dashed}"


def _type_of(f: dataclasses.Field):
    if f.metadata.get("type"):
        return f.metadata["type"]
    t = f.type  # text under `from __future__ import annotations`, else the type itself
    if not isinstance(t, str):
        t = " | ".join(getattr(a, "__name__", str(a)) for a in (typing.get_args(t) or (t,)))
    names = {p.strip() for p in t.split("|")} - {"None", "NoneType"}
    return _TYPES.get(names.pop(), str) if len(names) == 1 else str


@dataclass(frozen=True)
class Options:
    """What every command's options dataclass inherits: its parser, checks and records, all
    read off its fields."""

    @classmethod
    def option_fields(cls) -> tuple[dataclasses.Field, ...]:
        return tuple(f for f in dataclasses.fields(cls) if "help" in f.metadata)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The saved fields' names: what the spec holds (`saved=False` ones left out)."""
        return tuple(f.name for f in cls.option_fields() if f.metadata["saved"])

    @classmethod
    def flag(cls, name: str) -> str:
        return flag_of(next(f for f in cls.option_fields() if f.name == name))

    @classmethod
    def add_arguments(cls, ap) -> None:
        """One argparse argument per field with `cli`, in the fields' order."""
        for f in cls.option_fields():
            m = f.metadata
            if not m["cli"]:
                continue
            kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": m["help"]}
            if isinstance(f.default, bool):
                kw["action"] = "store_false" if f.default else "store_true"
            else:
                kw["type"] = _type_of(f)
                choices = m["choices"]
                if choices is not None:
                    kw["choices"] = tuple(choices() if callable(choices) else choices)
                if m["const"] is not None:
                    kw.update(nargs="?", const=m["const"])
                if m["metavar"]:
                    kw["metavar"] = m["metavar"]
            ap.add_argument(flag_of(f), **kw)

    @classmethod
    def from_namespace(cls, ns, **given):
        """The options of a parsed command line (`argparse.Namespace`, or any object with the
        fields as attributes: absent ones take their defaults), `given` overriding."""
        got = {f.name: getattr(ns, f.name) for f in cls.option_fields() if hasattr(ns, f.name)}
        return cls(**{**got, **given})

    def checked(self):
        """The options every field's `check` accepts, as it returns them (a ValueError naming
        the flag for the first that it refuses)."""
        new = {}
        for f in self.option_fields():
            check = f.metadata["check"]
            if check is not None:
                new[f.name] = check(getattr(self, f.name), flag_of(f))
        return dataclasses.replace(self, **new)

    def saved(self) -> dict[str, Any]:
        """The saved fields and their values, in the fields' order."""
        return {k: getattr(self, k) for k in self.fields()}

    def params(self) -> dict[str, Any]:
        """The saved fields as MLflow params (each under its `param` name, else its own)."""
        return {f.metadata["param"] or f.name: getattr(self, f.name)
                for f in self.option_fields() if f.metadata["saved"]}

    def to_json(self) -> str:
        return json.dumps(self.saved(), indent=1)
