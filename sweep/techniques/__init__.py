"""The techniques: one module each (its config, parameters, apply, export storage, decoding
options and description), registered on import in application order.

Plugins: `$HYPER_TECHNIQUES` lists more technique modules, comma-separated, as import paths
(`mypkg.mytech`) or file paths (`/abs/mytech.py`). They are imported right after the built-in
ones, in every process that imports this package: the launcher, Ray's workers (the local Ray
inherits the environment; `sweep.search.sampler.init_ray` passes the variable to a cluster's
workers), export and `sweep.load`. A plugin module defines a `@technique("prefix")` config
class; nothing else in HYPER needs an edit.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from . import struct, prune, lowrank, embed, quant, compile, encoder, decode, segment  # noqa: F401
from .base import (DEVICE, LAYER_TYPES, PARAMS, TARGETS, TECHNIQUES, Param, RecipeError, Requires,
                   Storage, Technique, technique)

PLUGINS_ENV = "HYPER_TECHNIQUES"
__all__ = ["DEVICE", "LAYER_TYPES", "PARAMS", "PLUGINS_ENV", "TARGETS", "TECHNIQUES", "Param",
           "RecipeError", "Requires", "Storage", "Technique", "load_plugins", "plugin_error",
           "technique"]


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the technique modules `spec` (default `$HYPER_TECHNIQUES`) names; returns them."""
    names = [s.strip() for s in (spec if spec is not None else os.environ.get(PLUGINS_ENV, ""))
             .split(",") if s.strip()]
    for name in names:
        if name.endswith(".py"):
            path = Path(name).expanduser().resolve()
            mod_name = f"hyper_plugin_{path.stem}"
            if mod_name in sys.modules:
                continue
            spec_ = importlib.util.spec_from_file_location(mod_name, path)
            if spec_ is None or not path.is_file():
                raise RecipeError(f"`{PLUGINS_ENV}` must list importable modules or .py files, "
                                  f"got {name!r} (no such file)")
            module = importlib.util.module_from_spec(spec_)
            sys.modules[mod_name] = module
            spec_.loader.exec_module(module)
        else:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise RecipeError(f"`{PLUGINS_ENV}` must list importable modules or .py files, "
                                  f"got {name!r}: {e}") from None
    return names


def plugin_error() -> RecipeError | None:
    """Why `$HYPER_TECHNIQUES` could not be loaded at import, if it could not."""
    return _failed[0] if _failed else None


# A bad variable must not be a traceback at import: it is raised where a recipe is first built,
# inside the commands' own error handling (one clear line, exit 2).
_failed: list[RecipeError] = []
try:
    load_plugins()
except RecipeError as e:
    _failed.append(e)
