"""The words every part of a space speaks: a searched dimension (`Dim`), a condition on it
(`Condition`), and how a check reports a problem (`Checker`, `near`) so that one `SpaceError`
lists every mistake in a file. Pure."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any


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


def near(word: str, options) -> str:
    """The "; did you mean `x`?" an error appends when `word` is close to one of `options`."""
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"; did you mean `{near[0]}`?" if near else ""


class Checker:
    """Collects every problem a check finds in one space file (key: message), so that loading
    raises one `SpaceError` with all of them instead of stopping at the first."""

    def __init__(self, source: str):
        self.source = source
        self.errors: list[str] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append(f"{self.source}: {key}: {msg}" if self.source else f"{key}: {msg}")
