"""Exported checkpoints: `save_checkpoint` writes one, `load` gives back a model that transcribes
exactly as the trial did. torch + transformers only (no MLflow, no Ray): serving needs no more.

A checkpoint is the Hugging Face layout (safetensors weights, config, generation config,
processor) plus `recipe.json`, `metrics.json` and a model card `README.md`. What changes weights
(FFN shrinking, pruning) is baked into them; what cannot be saved as plain weights (quantized
modules, compiled graphs) is re-applied at load from `recipe.json` by `sweep.measure.compress`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .card import environment, write_metrics
from ..measure.decode import plan_for
from ..techniques.recipe import TECHNIQUES, Recipe, RecipeError

FORMAT_VERSION = 1
KNOWN = (1,)  # recipe.json layouts this version reads
DESCRIPTIVE = ("recipe.json", "metrics.json", "README.md")  # not hashed: written after weights
_KEYS = {"format_version", "recipe", "baked", "reapplied", "dtype", "config_shapes",
         "calibration", "trial_kernels", "files", "digest"}
_SHAPES = ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
           "vocab_size", "num_mel_bins")
_STATS = ("in_min", "in_max", "out_min", "out_max", "calls")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded as it is; the message says what and why."""


@dataclass(frozen=True)
class Checkpoint:
    """What `load` returns; `model`/`processor` like `sweep.inputs.models.LoadedModel`."""
    model: nn.Module
    processor: object
    recipe: Recipe
    path: Path
    kernels: dict = field(default_factory=dict)  # layer type -> implementation, here
    notes: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # recipe.json
    metrics: dict = field(default_factory=dict)  # metrics.json
    spec: str = ""
    source: str = ""

    @property
    def options(self):
        """The recipe's decoding options (a Plan), to hand to transcription with the model."""
        return plan_for(self.recipe)


def split(recipe: Recipe) -> tuple[Recipe, Recipe, list[str], list[str]]:
    """(recipe of the baked parts, recipe re-applied at load, baked names, re-applied names),
    by each technique's declared `STORAGE`."""
    baked, again, bake_parts, load_parts = [], [], {}, {}
    for prefix, cls in TECHNIQUES.items():
        cfg, how = getattr(recipe, prefix), cls.STORAGE
        baked += [prefix] if cfg.active and how.baked else []
        again += [prefix] if cfg.active and how.reapplied(cfg) else []
        bake_parts[prefix] = cfg if how.baked else cls()
        load_parts[prefix] = cfg if cfg.active and how.reapplied(cfg) else cls()
    return (Recipe(recipe.device, **bake_parts), Recipe(recipe.device, **load_parts), baked,
            again)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(info: dict) -> str:
    # Integrity against edits and mix-ups, not a signature: anyone may recompute it.
    body = {k: v for k, v in info.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _densify(model: nn.Module) -> None:
    """Semi-structured sparse weights (2:4 on CUDA) back to dense tensors for safetensors."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and type(w.data) is not torch.Tensor and hasattr(
                w, "to_dense"):
            mod.weight = nn.Parameter(w.to_dense(), requires_grad=False)


def _capture_calibration(model, recipe: Recipe, calibrate) -> dict:
    """Run calibration once (as the trial did) and keep every observed layer's min/max, so
    loading needs no audio and gets the very same static int8 scales."""
    from ..measure.compress import Observer, apply_recipe

    stats = {}

    def observe(m):
        calibrate(m)
        stats.update({n: {k: o.calls if k == "calls" else o.stats[k] for k in _STATS}
                      for n, o in m.named_modules() if isinstance(o, Observer)})

    apply_recipe(copy.deepcopy(model), recipe.replace(compile=type(recipe.compile)()),
                 calibrate=observe)
    return stats


def _replay(stats: dict):
    def calibrate(model):
        from ..measure.compress import Observer

        for name, obs in model.named_modules():
            if isinstance(obs, Observer):
                if name not in stats:
                    raise CheckpointError(f"`recipe.json` calibration has no scales for {name}")
                obs.stats.update({k: stats[name][k] for k in _STATS if k != "calls"})
                obs.calls = int(stats[name]["calls"])
    return calibrate


def save_checkpoint(base_model: nn.Module, processor, recipe: Recipe, out_dir, *,
                    metrics: dict | None = None, calibrate: Callable | None = None,
                    trial_kernels: dict | None = None, overwrite: bool = False) -> Path:
    """Bake `recipe`'s weight-changing parts into a copy of the uncompressed `base_model` and
    write the checkpoint to `out_dir`. `calibrate(model)` runs calibration audio (static int8
    only); `metrics` (trial figures, baseline, data...) goes to metrics.json and the card;
    `overwrite` replaces an earlier checkpoint there (never another kind of folder)."""
    from ..measure.compress import apply_recipe

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / "recipe.json").is_file()):
            raise CheckpointError(f"`out_dir` {out} is not empty: choose a new folder (overwrite "
                                  "replaces only an earlier HYPER checkpoint)")
        shutil.rmtree(out)  # whole: stale shards would otherwise be listed as its files
    bake, again, baked, reapplied = split(recipe)
    model = apply_recipe(copy.deepcopy(base_model), bake).model
    _densify(model)
    stats = None
    if "static_int8" in again.quant.by_layer_type().values():
        if calibrate is None:
            raise CheckpointError("static_int8 needs `calibrate` at export (the trial's "
                                  "calibration audio): its scales are stored in recipe.json")
        stats = _capture_calibration(model, again, calibrate)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    info = {"format_version": FORMAT_VERSION, "recipe": json.loads(recipe.to_json()),
            "baked": baked, "reapplied": reapplied,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "config_shapes": {k: getattr(model.config, k) for k in _SHAPES},
            "calibration": stats, "trial_kernels": trial_kernels,
            "files": {p.name: sha256(p) for p in sorted(out.iterdir())
                      if p.is_file() and p.name not in DESCRIPTIVE}}
    info["digest"] = _digest(info)
    (out / "recipe.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    write_metrics(out, {**(metrics or {}), "environment": environment(),
                        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return out


# ---- loading ---------------------------------------------------------------------------------


def read_info(path) -> tuple[dict, Recipe]:
    """recipe.json checked against the schema: version, keys, recipe values, baked parts, and
    its digest (an edited recipe no longer describes what was measured)."""
    f = Path(path) / "recipe.json"
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path} is not a HYPER checkpoint: no readable recipe.json "
                              f"({e.strerror})") from None
    except ValueError as e:
        raise CheckpointError(f"`recipe.json` is not valid JSON: {e}") from None
    v = info.get("format_version") if isinstance(info, dict) else None
    if v not in KNOWN or isinstance(v, bool):
        newer = isinstance(v, int) and v > max(KNOWN)
        raise CheckpointError(f"`recipe.json` format_version must be one of {KNOWN}, got {v=}"
                              + ("; written by a newer HYPER: upgrade hyper-sweep to load it"
                                 if newer else ""))
    if unknown := sorted(set(info) - _KEYS):
        raise CheckpointError(f"`recipe.json` has unknown key(s) {unknown}; known: "
                              f"{sorted(_KEYS)}")
    if missing := sorted(_KEYS - set(info)):
        raise CheckpointError(f"`recipe.json` lacks key(s) {missing}")
    try:
        recipe = Recipe.from_json(json.dumps(info["recipe"]))
    except (RecipeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"`recipe.json` holds an invalid recipe: {e}") from None
    _, _, baked, again = split(recipe)
    if [info["baked"], info["reapplied"]] != [baked, again]:
        raise CheckpointError(f"`recipe.json` baked={info['baked']} reapplied="
                              f"{info['reapplied']} do not match its recipe ({baked}, {again})")
    if not isinstance(info["files"], dict) or not any(
            str(n).endswith(".safetensors") for n in info["files"]):
        raise CheckpointError("`recipe.json` files must list the *.safetensors weights")
    if not isinstance(getattr(torch, str(info["dtype"]), None), torch.dtype):
        raise CheckpointError(f"`recipe.json` dtype must name a torch dtype, got {info['dtype']!r}")
    if info["digest"] != _digest(info):
        raise CheckpointError("`recipe.json` was edited after export (its digest does not match "
                              "its content), so it no longer describes what was measured: "
                              "export the trial again")
    return info, recipe


def check_files(path: Path, info: dict) -> None:
    for name, digest in info["files"].items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint file `{name}` is missing from {path}")
        if sha256(p) != digest:
            raise CheckpointError(f"`{name}` changed after export (its sha256 is not the one in "
                                  "recipe.json): it no longer matches the measured recipe")


def load(path, device: str | None = None) -> Checkpoint:
    """An exported checkpoint, validated, with the non-baked parts of its recipe re-applied.
    Weights come from safetensors only (never pickle), never with remote code. `device`:
    default the recipe's; another one is allowed when the recipe is valid there."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from ..measure.compress import apply_recipe
    from ..inputs.models import _no_progress_bars

    path = Path(path).expanduser()
    info, recipe = read_info(path)
    check_files(path, info)
    if device is not None and device != recipe.device:
        try:
            recipe = recipe.replace(device=device)
        except RecipeError as e:
            raise CheckpointError(f"`device`={device!r} cannot run this recipe: {e}") from None
    with _no_progress_bars():
        model = WhisperForConditionalGeneration.from_pretrained(
            path, use_safetensors=True, trust_remote_code=False, local_files_only=True,
            dtype=getattr(torch, info["dtype"]))
        processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
    shapes = {k: getattr(model.config, k) for k in _SHAPES}
    if shapes != info["config_shapes"]:
        raise CheckpointError(f"config.json shapes {shapes} do not match recipe.json's "
                              f"{info['config_shapes']}")
    _, again, _, _ = split(recipe)
    calibrate = _replay(info["calibration"]) if info["calibration"] else None
    applied = apply_recipe(model.to(recipe.device).eval(), again, calibrate=calibrate)
    notes = list(applied.notes)
    if info["trial_kernels"] and applied.kernels != info["trial_kernels"]:
        differ = {t: (k, applied.kernels.get(t)) for t, k in info["trial_kernels"].items()
                  if applied.kernels.get(t) != k}
        notes.append(f"kernels differ from the trial's (trial, here): {differ}; transcripts "
                     "may differ slightly from the measured ones")
        warnings.warn(notes[-1], stacklevel=2)
    mfile = path / "metrics.json"
    metrics = json.loads(mfile.read_text(encoding="utf-8")) if mfile.is_file() else {}
    return Checkpoint(applied.model, processor, recipe, path, dict(applied.kernels), notes, info,
                      metrics, spec=str(path), source=f"HYPER checkpoint {path.resolve()}")
