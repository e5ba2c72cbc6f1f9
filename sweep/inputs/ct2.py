"""Convert CTranslate2 Whisper data (model.bin, config.json, tokenizer.json) to transformers.

The layout is what `ctranslate2/specs/model_spec.py` `_serialize` writes (binary version 6):
version, spec name, revision, variable count, then per variable name, rank, shape, dtype id,
byte count and raw bytes; then the aliases. Implemented here because ctranslate2 is only a
test dependency: the runtime must convert without it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AddedToken,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

# Type ids as ctranslate2 numbers them (`_dtype_to_type_id`); bfloat16 is kept as raw uint16.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
_BF16 = 5
SUPPORTED_VERSIONS = (5, 6)
EOT, SOT = 50257, 50258  # GPT-2 BPE ends at 50256; Whisper's specials follow
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps


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


# ---- transformers objects ------------------------------------------------------------------


def convert(ct2_dir: Path, out: Path) -> None:
    """Write a transformers Whisper folder (safetensors + processor) into `out`."""
    src = read_model_bin(ct2_dir / "model.bin")
    ct2_cfg = json.loads((ct2_dir / "config.json").read_text("utf-8"))
    tokenizer = build_tokenizer(ct2_dir / "tokenizer.json")
    check_vocabulary(tokenizer, ct2_dir / "vocabulary.txt")
    kwargs = whisper_config_kwargs(src)
    if kwargs["vocab_size"] != len(tokenizer):
        raise CT2FormatError(f"vocab {kwargs['vocab_size']} != tokenizer {len(tokenizer)}")
    config = whisper_config(kwargs, ct2_cfg["suppress_ids"], ct2_cfg["suppress_ids_begin"])
    state = {k: torch.tensor(v) for k, v in whisper_state_dict(src).items()}
    with torch.device("meta"):  # no random init of 74M weights that are overwritten anyway
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != {"proj_out.weight"} or unexpected:
        raise CT2FormatError(f"state dict mismatch: {missing=} {unexpected=}")
    model.tie_weights()  # proj_out is an alias of the decoder embeddings in the CT2 file
    if model.proj_out.weight is not model.model.decoder.embed_tokens.weight:
        raise CT2FormatError("proj_out did not tie to the decoder embeddings")
    model.generation_config = generation_config(tokenizer, config, ct2_cfg["alignment_heads"])
    # fp16 as shipped: lossless, half the disk; load_model upcasts to the requested dtype.
    model.save_pretrained(out)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    processor = WhisperProcessor(features, tokenizer)
    processor.save_pretrained(out)
    processor.feature_extractor.to_json_file(out / "preprocessor_config.json")


def check_vocabulary(tokenizer: WhisperTokenizer, vocabulary: Path) -> None:
    tokens = vocabulary.read_text("utf-8").split("\n")
    tokens = tokens[:-1] if tokens[-1] == "" else tokens
    ids = tokenizer.convert_tokens_to_ids(tokens)
    bad = [(i, t, j) for i, (t, j) in enumerate(zip(tokens, ids)) if i != j]
    if bad or len(tokens) != len(tokenizer):
        raise CT2FormatError(f"tokenizer ids differ from {vocabulary}: first {bad[:3]}")


def build_tokenizer(tokenizer_json: Path, *, extra_language: str | None = None):
    """Whisper tokenizer with its specials registered and the timestamp tokens added.

    The Systran tokenizer.json lists the specials as plain added tokens and has no timestamps;
    transformers derives the first timestamp id from the last special id, so both are needed.
    """
    from tokenizers import Tokenizer

    data = json.loads(tokenizer_json.read_text("utf-8"))
    specials = [t["content"] for t in sorted(data["added_tokens"], key=lambda t: t["id"])]
    specials = [s for s in specials if s != "<|endoftext|>"]  # part of the BPE vocab
    if extra_language:  # large-v3 adds one language before the task tokens, shifting them
        specials.insert(specials.index("<|translate|>"), extra_language)
    # Re-add the specials in order so their ids follow the BPE vocab (same ids as shipped).
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] == "<|endoftext|>"]
    data["post_processor"] = None  # WhisperTokenizer sets its own prefix tokens
    tok = WhisperTokenizer(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        extra_special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
    )
    stamps = ["<|%.2f|>" % (i * 0.02) for i in range(N_TIMESTAMPS)]
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in stamps])
    return tok


def whisper_config(sizes: dict, suppress: list[int], begin_suppress: list[int]) -> WhisperConfig:
    # WhisperConfig defaults are the English-only ids (50256): wrong for multilingual vocabs.
    return WhisperConfig(
        **sizes, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
        decoder_start_token_id=SOT, suppress_tokens=suppress, begin_suppress_tokens=begin_suppress,
    )


def generation_config(tok, config: WhisperConfig, alignment_heads) -> GenerationConfig:
    ids = tok.convert_tokens_to_ids
    specials = tok.convert_ids_to_tokens(list(range(SOT + 1, ids("<|translate|>"))))
    return GenerationConfig(
        lang_to_id={s: ids(s) for s in specials},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=alignment_heads,
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
        max_length=config.max_target_positions, max_initial_timestamp_index=50,
        is_multilingual=True, return_timestamps=False,
    )
