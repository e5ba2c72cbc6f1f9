"""Loading: a space by name (a file of `search_spaces/`) or path, validated section by section
and across parameters into one `Space`, or one `SpaceError` listing every problem. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .core import Space
from .reach import check_order, check_pairs, check_requirements
from .sections import (DEFAULT_OBJECTIVES, check_conditions, check_confidence, check_constraints,
                       check_objectives, check_params, implied_conditions)
from .starts import check_starts
from .vocabulary import Checker, SpaceError, near

SPACES_DIR = Path(__file__).resolve().parents[3] / "search_spaces"
TOP_KEYS = ("name", "description", "params", "conditions", "objectives", "constraints",
            "confidence", "starts")


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
    ck = Checker(source)
    if not isinstance(data, Mapping):
        ck.err("(top level)", f"must be a mapping with keys {', '.join(TOP_KEYS)}, "
                              f"got {type(data).__name__}")
        raise SpaceError(ck.errors, source)
    for key in data:
        if key not in TOP_KEYS:
            ck.err(str(key), f"unknown top-level key{near(key, TOP_KEYS)} "
                             f"(allowed: {', '.join(TOP_KEYS)})")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        ck.err("name", f"must be a non-empty string, got {name!r}")
        name = default_name
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        ck.err("description", f"must be a string, got {description!r}")
        description = ""

    dims = check_params(ck, data.get("params"))
    conditions = check_conditions(ck, data.get("conditions"), dims)
    conditions = {**implied_conditions(dims, conditions), **conditions}
    objectives = check_objectives(ck, data.get("objectives", DEFAULT_OBJECTIVES))
    constraints = check_constraints(ck, data.get("constraints"))
    confidence = check_confidence(ck, data.get("confidence"), constraints)
    order = check_order(ck, dims, conditions)  # None: a cycle, reported
    # entries that failed their own checks: later checks skip them instead of piling on
    raw_params = data.get("params") if isinstance(data.get("params"), Mapping) else {}
    raw_conds = data.get("conditions") if isinstance(data.get("conditions"), Mapping) else {}
    broken = {n for n in raw_params if n not in dims} | \
             {n for n in raw_conds if n not in conditions}
    starts: list[tuple[dict, dict]] = []
    if order is not None:
        flagged = check_requirements(ck, dims, conditions, broken)
        check_pairs(ck, dims, conditions, broken | flagged)
        starts = check_starts(ck, data.get("starts"), {n: dims[n] for n in order}, conditions)
    if ck.errors:
        raise SpaceError(ck.errors, source)
    return Space(name=name, description=description,
                 params={n: dims[n] for n in order},
                 conditions={n: conditions[n] for n in order if n in conditions},
                 objectives=tuple(objectives), constraints=constraints,
                 confidence=confidence, source=source,
                 starts=tuple(s for s, _ in starts), start_when=tuple(w for _, w in starts))
