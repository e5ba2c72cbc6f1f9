"""Exported checkpoints: `save_checkpoint` writes one, `load` gives back a model that transcribes
exactly as the trial did. torch + transformers only (no MLflow, no Ray): serving needs no more.

A checkpoint is the Hugging Face layout (safetensors weights, config, generation config,
processor) plus `recipe.json`, `metrics.json` and a model card `README.md`. Each technique's
`STORAGE` says how it survives export: baked into the weights (FFN shrinking, pruning), stored as
it runs (quantized and cast modules, the tied embedding: `sweep.measure.stored`, rebuilt from
their own tensors at load), or re-applied at load from `recipe.json` (compiled graphs, decoding
levers). The weights file is `model.safetensors` when plain transformers can read it (exactly or
with its weights upcast; torchao layers under `TorchAoConfig`), else `hyper.safetensors`, so
that `from_pretrained` refuses what it would otherwise fill with random weights.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
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

FORMAT_VERSION = 2  # 2: modules stored as they run (1: fp32 weights, quantized again at load)
KNOWN = (2,)  # recipe.json layouts this version reads
DESCRIPTIVE = ("recipe.json", "metrics.json", "README.md")  # not hashed: written after weights
_KEYS = {"format_version", "recipe", "baked", "reapplied", "dtype", "config_shapes", "weights",
         "modules", "tied", "kernels", "plain", "trial_kernels", "files", "digest"}
_SHAPES = ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
           "vocab_size", "num_mel_bins")
PLAIN_FILE, HYPER_FILE = "model.safetensors", "hyper.safetensors"  # see save_checkpoint


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
    """(recipe applied at export, recipe re-applied at load, their active techniques' names),
    by each technique's declared `STORAGE` (stored ones are applied at export)."""
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


def save_checkpoint(base_model: nn.Module, processor, recipe: Recipe, out_dir, *,
                    metrics: dict | None = None, calibrate: Callable | None = None,
                    trial_kernels: dict | None = None, overwrite: bool = False) -> Path:
    """Apply `recipe`'s baked and stored parts to a copy of the uncompressed `base_model` and
    write the checkpoint to `out_dir`, every module as it runs. `calibrate(model)` runs
    calibration audio (static int8 only); `metrics` (trial figures, baseline, data...) goes to
    metrics.json and the card; `overwrite` replaces an earlier checkpoint there (never another
    kind of folder)."""
    from safetensors.torch import save_file

    from ..measure import stored
    from ..measure.compress import apply_recipe

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / "recipe.json").is_file()):
            raise CheckpointError(f"`out_dir` {out} is not empty: choose a new folder (overwrite "
                                  "replaces only an earlier HYPER checkpoint)")
        shutil.rmtree(out)  # whole: stale shards would otherwise be listed as its files
    bake, _, baked, reapplied = split(recipe)
    if "static_int8" in bake.quant.by_layer_type().values() and calibrate is None:
        raise CheckpointError("static_int8 needs `calibrate` at export (the trial's calibration "
                              "audio): its scales are stored with its modules")
    applied = apply_recipe(copy.deepcopy(base_model), bake, calibrate=calibrate)
    model = applied.model
    _densify(model)
    try:
        tensors, modules, tied_keys = stored.collect(model)
    except stored.StoredError as e:
        raise CheckpointError(f"cannot store `{recipe.describe()}`: {e}") from None
    dtype = model.model.decoder.embed_positions.weight.dtype  # the model's own (its decoder's)
    plain, not_exact = stored.plain_status(modules, dtype)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    # the head has its own tensor unless it is stored as the embedding's
    config.tie_word_embeddings = tied_keys.get(stored.TIED_PAIR[1]) == stored.TIED_PAIR[0]
    if plain != "none":
        config.quantization_config = stored.torchao_quantization_config(modules)
    weights = PLAIN_FILE if plain != "none" else HYPER_FILE
    flat, meta = stored.flatten(tensors)
    out.mkdir(parents=True, exist_ok=True)
    save_file(flat, out / weights, metadata={**stored.metadata_json(meta), "format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"format_version": FORMAT_VERSION, "recipe": json.loads(recipe.to_json()),
            "baked": baked, "reapplied": reapplied, "dtype": stored.name_of(dtype),
            "config_shapes": {k: getattr(model.config, k) for k in _SHAPES},
            "weights": weights, "modules": modules, "tied": tied_keys,
            "kernels": {t: k for t, k in applied.kernels.items() if k != "fp32"},
            "plain": {"weights": plain, "not_exact": not_exact},
            "trial_kernels": trial_kernels,
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
                                 if newer else "; format 1 kept fp32 weights and quantized them "
                                 "again at load: export the trial again" if v == 1 else ""))
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
    if not isinstance(info["files"], dict) or info["weights"] not in info["files"]:
        raise CheckpointError(f"`recipe.json` files must list the weights {info['weights']!r}")
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
    """An exported checkpoint, validated: its stored modules rebuilt from their own tensors, the
    re-applied parts of its recipe applied again. Weights come from safetensors only (never
    pickle), never with remote code. `device`: default the recipe's; another one is allowed
    when the recipe is valid there."""
    from transformers import WhisperConfig, WhisperProcessor

    from ..measure.compress import apply_recipe

    path = Path(path).expanduser()
    info, recipe = read_info(path)
    check_files(path, info)
    if device is not None and device != recipe.device:
        try:
            recipe = recipe.replace(device=device)
        except RecipeError as e:
            raise CheckpointError(f"`device`={device!r} cannot run this recipe: {e}") from None
    config = WhisperConfig.from_pretrained(path, local_files_only=True)
    shapes = {k: getattr(config, k) for k in _SHAPES}
    if shapes != info["config_shapes"]:
        raise CheckpointError(f"config.json shapes {shapes} do not match recipe.json's "
                              f"{info['config_shapes']}")
    model = build(path, info, config, recipe)
    processor = WhisperProcessor.from_pretrained(path, local_files_only=True)
    _, again, _, _ = split(recipe)
    applied = apply_recipe(model.to(recipe.device), again, known_kernels=info["kernels"])
    notes = list(applied.notes)
    if any(getattr(m, "narrowed", False) for m in applied.model.modules()):
        notes.append("int8 activations had 8 bits over 8-bit weights on the exporting CPU "
                     "(VNNI); this CPU lacks VNNI, where fbgemm's int16 pair sums would "
                     "saturate, so they keep 7: transcripts may differ from the measured ones")
        warnings.warn(notes[-1], stacklevel=2)
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


def build(path: Path, info: dict, config, recipe: Recipe) -> nn.Module:
    """The model as exported: built empty (meta device) from `config`, then every weight taken
    from the safetensors file, stored modules rebuilt from their own tensors (by the forms of
    `recipe`'s stored techniques: `Storage.forms`, as export ran their `apply`)."""
    from safetensors import safe_open
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    from ..measure import stored

    for cfg in recipe.configs():
        if cfg.active:
            for module in cfg.STORAGE.forms:
                importlib.import_module(module)

    with safe_open(path / info["weights"], framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    try:
        model = stored.rebuild(model, stored.unflatten(tensors, metadata), info["modules"],
                               info["tied"])
    except stored.StoredError as e:
        raise CheckpointError(f"{info['weights']} cannot be loaded: {e}") from None
    model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model


def load_plain(path) -> tuple[nn.Module, object]:
    """What plain transformers makes of a checkpoint: `from_pretrained(dir)` and nothing else
    (for the card's comparison and the tests)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from ..inputs.models import _no_progress_bars

    with _no_progress_bars():
        model = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
    return model.eval(), WhisperProcessor.from_pretrained(path, local_files_only=True)
