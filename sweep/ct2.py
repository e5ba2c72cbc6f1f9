"""Read a CTranslate2 Whisper `model.bin` and map it to transformers' Whisper names.

The layout is what `ctranslate2/specs/model_spec.py` `_serialize` writes (binary version 6):
version, spec name, revision, variable count, then per variable name, rank, shape, dtype id,
byte count and raw bytes; then the aliases. Implemented here because ctranslate2 is only a
test dependency: the runtime must convert without it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Type ids as ctranslate2 numbers them (`_dtype_to_type_id`); bfloat16 is kept as raw uint16.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
_BF16 = 5
SUPPORTED_VERSIONS = (5, 6)


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this reader understands."""


@dataclass
class CT2Model:
    spec: str
    revision: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # read-only memmap views
    scalars: dict[str, int | float] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


def read_model_bin(path: str | Path) -> CT2Model:
    """Parse `model.bin`; tensors are memmap views, so nothing is copied until used."""
    path = Path(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise CT2FormatError(f"{path}: truncated at byte {pos} (file has {len(buf)} bytes)")
        value = struct.unpack_from(fmt, buf, pos)
        pos += size
        return value[0]

    def string() -> str:
        nonlocal pos
        n = take("<H")  # length includes the trailing NUL
        raw = bytes(buf[pos : pos + n - 1])
        pos += n
        return raw.decode("utf-8")

    version = take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(
            f"{path}: binary version must be one of {SUPPORTED_VERSIONS}, got {version=}"
        )
    model = CT2Model(spec=string(), revision=take("<I"))
    for _ in range(take("<I")):
        name = string()
        shape = tuple(take("<I") for _ in range(take("<B")))
        type_id, nbytes = take("<B"), take("<I")
        if type_id not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        if pos + nbytes > len(buf):
            raise CT2FormatError(f"{path}: variable {name!r} runs past the end of the file")
        dtype = np.dtype(_DTYPES[type_id])
        if nbytes != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CT2FormatError(f"{path}: {name!r} has {nbytes} bytes for {shape=} {dtype}")
        arr = buf[pos : pos + nbytes].view(dtype).reshape(shape)
        if type_id == _BF16:  # numpy has no bfloat16: widen the bits into float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        pos += nbytes
        if shape:
            model.tensors[name] = arr
        else:  # flags like num_heads / pre_norm; newer writers add more, kept but unused
            model.scalars[name] = arr.item()
    for _ in range(take("<I")):
        alias = string()
        model.aliases[alias] = string()
    if pos != len(buf):
        raise CT2FormatError(f"{path}: {len(buf) - pos} unexpected trailing bytes")
    return model


# CTranslate2 name -> transformers name, per layer, for the parts that map one to one.
_LAYER_RENAMES = {
    "self_attention/linear_1": "self_attn.out_proj",
    "self_attention/layer_norm": "self_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
# Fused projections: CT2 stacks row blocks; HF's k_proj has no bias, so that slice must be 0.
_FUSED = {
    "self_attention/linear_0": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "attention/linear_1": ("encoder_attn", ("k_proj", "v_proj")),
}
_STACK_RENAMES = {
    "conv1/weight": "conv1.weight",
    "conv1/bias": "conv1.bias",
    "conv2/weight": "conv2.weight",
    "conv2/bias": "conv2.bias",
    "position_encodings/encodings": "embed_positions.weight",
    "layer_norm/gamma": "layer_norm.weight",
    "layer_norm/beta": "layer_norm.bias",
    "embeddings/weight": "embed_tokens.weight",
}
STACKS = ("encoder", "decoder")
_PARAM = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}
_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)/(gamma|beta|weight|bias)$")


def whisper_state_dict(model: CT2Model) -> dict[str, np.ndarray]:
    """Map every tensor to a `WhisperForConditionalGeneration` key; fail on anything unmapped."""
    if model.spec != "WhisperSpec":
        raise CT2FormatError(f"spec must be 'WhisperSpec', got {model.spec=}")
    out: dict[str, np.ndarray] = {}
    for name, arr in model.tensors.items():
        if m := _LAYER_RE.match(name):
            stack, idx, module, param = m.groups()
            prefix = f"model.{stack}.layers.{idx}."
            if module in _LAYER_RENAMES:
                out[prefix + _LAYER_RENAMES[module] + "." + _PARAM[param]] = arr
            elif module in _FUSED:
                attn, parts = _FUSED[module]
                for part, chunk in zip(parts, np.split(arr, len(parts), axis=0)):
                    if part == "k_proj" and param == "bias":
                        if np.any(chunk != 0):
                            raise CT2FormatError(f"{name}: k bias must be zero (HF has none)")
                        continue
                    out[f"{prefix}{attn}.{part}.{param}"] = chunk
            else:
                raise CT2FormatError(f"no transformers name for {name!r}")
        elif (parts := name.split("/", 1))[-1] in _STACK_RENAMES and parts[0] in STACKS:
            out[f"model.{parts[0]}.{_STACK_RENAMES[parts[1]]}"] = arr
        elif name == "decoder/projection/weight":
            # Stored (not aliased) by some writers: only tieable when equal to the embeddings.
            if not np.array_equal(arr, model.tensors["decoder/embeddings/weight"]):
                raise CT2FormatError("output projection differs from the embeddings; cannot tie")
        else:
            raise CT2FormatError(f"no transformers name for {name!r}")
    for alias, target in model.aliases.items():
        if (alias, target) != ("decoder/projection/weight", "decoder/embeddings/weight"):
            raise CT2FormatError(f"unexpected alias {alias!r} -> {target!r}")
    return out


def whisper_config_kwargs(model: CT2Model) -> dict:
    """`WhisperConfig` sizes read from tensor shapes and the spec's scalars."""
    t, s = model.tensors, model.scalars
    # The HF architecture is pre-norm, exact GELU; anything else would convert silently wrong.
    for key, want in (("activation", 3), ("pre_norm", 1)):
        for stack in ("encoder", "decoder"):
            got = s.get(f"{stack}/{key}", want)
            if got != want:
                raise CT2FormatError(f"{stack}/{key} must be {want} for Whisper, got {got}")

    def n_layers(stack: str) -> int:
        return len({m.group(2) for n in t if (m := _LAYER_RE.match(n)) and m.group(1) == stack})

    vocab, d_model = t["decoder/embeddings/weight"].shape
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "num_mel_bins": t["encoder/conv1/weight"].shape[1],
        "encoder_layers": n_layers("encoder"),
        "decoder_layers": n_layers("decoder"),
        "encoder_attention_heads": int(s["encoder/num_heads"]),
        "decoder_attention_heads": int(s["decoder/num_heads"]),
        "encoder_ffn_dim": t["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": t["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": t["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": t["decoder/position_encodings/encodings"].shape[0],
        "scale_embedding": bool(s.get("decoder/scale_embeddings", 0)),
    }
