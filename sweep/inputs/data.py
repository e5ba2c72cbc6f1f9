"""Evaluation and calibration speech sets: the embedded set, JSONL manifests, HF datasets.

Every utterance comes back as float32 16 kHz mono, the only input Whisper's feature extractor
takes. Unreadable clips and empty references are skipped but always counted with a reason, so a
WER is never silently computed on fewer clips than the user thinks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED_MANIFEST = EMBEDDED_DIR / "manifest.jsonl"
EMBEDDED_CALIBRATION = EMBEDDED_DIR / "calibration.jsonl"
EMBEDDED_LONG = "embedded-long"  # long recordings built from the embedded clips (cached)
# Other splits tried, in order, when a HF dataset's calibration needs one.
_OTHER_SPLITS = ("validation", "dev", "train", "test")


class DataError(ValueError):
    """A data set cannot be loaded as asked; the message says which input and what is allowed."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: np.ndarray  # float32, 16 kHz, mono
    text: str
    lang: str | None
    duration_s: float


@dataclass
class EvalSet:
    name: str
    utterances: list[Utterance]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    # False: a manifest without any `text`: scored against the baseline's own transcripts
    # (agreement WER, `sweep.measure.evaluate.agree`), never against references
    labelled: bool = True

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances)

    @property
    def fingerprint(self) -> str:
        """Stable across machines and paths (ids and texts only), so usable as a cache key."""
        h = hashlib.sha256()
        for u in self.utterances:
            h.update(f"{u.id}\x00{u.text}\x01".encode())
        return h.hexdigest()[:16]

    @property
    def total_s(self) -> float:
        return float(sum(u.duration_s for u in self.utterances))


def shared_dir() -> Path | None:
    """The read-only shared data folder: $HYPER_SHARED, else `shared/` beside the checkout."""
    for cand in (os.environ.get("HYPER_SHARED"), Path(__file__).resolve().parents[3] / "shared"):
        if cand and (Path(cand) / "speech" / "manifest.jsonl").is_file():
            return Path(cand)
    return None


def to_mono_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    """Average channels, then polyphase-resample (anti-aliased) to 16 kHz float32."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:  # soundfile's layout: (frames, channels)
        x = x.mean(axis=1)
    if sr != SAMPLE_RATE and x.size:
        # scipy comes with the project's pinned stack (mlflow, scikit-learn need it).
        from scipy.signal import resample_poly

        g = gcd(int(sr), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(sr) // g)
    return np.ascontiguousarray(x, dtype=np.float32)


def _decode(source: str | Path | bytes) -> np.ndarray:
    try:
        import soundfile as sf
    except ImportError:  # a bare machine (the lent GPU's) has no libsndfile: PCM WAV still reads
        data, sr = _read_wav(source)
    else:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                           dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("no samples")
    return to_mono_16k(data, sr)


def _read_wav(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV with the standard library: (frames, channels) float32 and the rate."""
    import wave

    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"without soundfile only 16-bit PCM WAV reads, got "
                                 f"{8 * w.getsampwidth()}-bit")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            return (pcm.astype(np.float32) / 32768).reshape(-1, w.getnchannels()), \
                w.getframerate()
    except wave.Error as exc:
        raise ValueError(f"soundfile is not installed and this is not a PCM WAV ({exc})") \
            from exc


# A record is (id, text, lang, audio source) before any audio is decoded; text None: the set
# has no references.
Record = tuple[str, "str | None", "str | None", "str | Path | bytes | None"]


def _read_manifest(path: Path, language: str | None) -> list[Record]:
    """Parse and validate every line first: a typo on line 900 must fail before decoding 899."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"`dataset` manifest {path} cannot be read: {exc}") from exc
    objs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"`dataset` line {n} of {path} is not JSON ({exc.msg}): every line "
                            "needs a JSON object with `audio` and `text`") from exc
        if not isinstance(obj, dict):
            raise DataError(f"`dataset` line {n} of {path} is not a JSON object: every line "
                            "needs `audio` and `text`")
        objs.append((n, obj))
    # a manifest none of whose lines has a `text` is unlabelled (scored by agreement with the
    # baseline's transcripts); otherwise every line needs one
    unlabelled = bool(objs) and not any("text" in obj for _, obj in objs)
    records = []
    for n, obj in objs:
        if unlabelled:
            obj["text"] = None
        for key in ("audio",) if unlabelled else ("audio", "text"):
            if key not in obj:
                raise DataError(f"`dataset` line {n} of {path} lacks `{key}`: every line needs "
                                "`audio` and `text` (and optionally `lang`), or no line a "
                                "`text` (scored against the baseline's transcripts)")
            if not isinstance(obj[key], str):
                raise DataError(f"`dataset` line {n} of {path}: `{key}` must be a string, "
                                f"not {type(obj[key]).__name__}")
        lang = obj.get("lang")
        if language and lang and lang != language:
            continue
        records.append((str(obj.get("id") or obj["audio"]), obj["text"], lang or language,
                        path.parent / obj["audio"]))
    return records


def _hf_dataset(spec: str, config: str | None, split: str):
    """A HF split: from a `save_to_disk` folder (tests, offline) or via `load_dataset`."""
    import datasets

    if Path(spec).is_dir():
        try:
            ds = datasets.load_from_disk(spec)
        except Exception as exc:  # datasets raises many types; report them all the same way
            raise DataError(f"`dataset` {spec} is a folder but not a saved HF dataset: "
                            f"{exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"`split` {split!r} is not in dataset {spec}; available "
                                f"splits: {sorted(ds)}")
            return ds[split], sorted(ds)
        return ds, None  # a single saved split: `split` does not apply
    try:
        return datasets.load_dataset(spec, config, split=split), None
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"`split` {split!r} is not in dataset {spec!r} "
                            f"(config {config!r}): {exc}") from exc
        raise DataError(f"`dataset` {spec!r} (config {config!r}) cannot be loaded: "
                        f"{exc}") from exc
    except Exception as exc:  # hub/network/not-found errors vary by version
        raise DataError(f"`dataset` {spec!r} (config {config!r}, split {split!r}) cannot be "
                        f"loaded: {type(exc).__name__}: {exc}") from exc


def _hf_records(spec, config, split, audio_column, text_column, language) -> Iterator[Record]:
    from datasets import Audio

    ds, _ = _hf_dataset(spec, config, split)
    for what, col in (("audio_column", audio_column), ("text_column", text_column)):
        if col not in ds.column_names:
            raise DataError(f"`{what}` {col!r} is not a column of {spec!r} split {split!r}; "
                            f"columns: {ds.column_names}")
    # decode=False: datasets 5 decodes through torchcodec, which needs ffmpeg; soundfile does not.
    ds = ds.cast_column(audio_column, Audio(decode=False))
    has_lang = "lang" in ds.column_names

    def rows() -> Iterator[Record]:  # lazy: `max_samples` must not read a whole 10 h split
        for i in range(len(ds)):
            row = ds[i]
            lang = row["lang"] if has_lang else None
            text, audio = row[text_column], row[audio_column] or {}
            if language and lang and lang != language:
                continue
            yield (f"{split}/{i}", text if isinstance(text, str) else "", lang or language,
                   audio.get("bytes") or audio.get("path"))

    return rows()


JOIN = "+"  # `embedded+shared`: several manifest sets as one, in the order given


def _parts(spec: str) -> list[str] | None:
    """The manifest sets a joined spec names (None: not a joined spec). An existing path is
    never split: a file or folder may have `+` in its name."""
    if JOIN not in spec or Path(spec).exists():
        return None
    parts = spec.split(JOIN)
    for p in parts:
        if not (p in ("embedded", EMBEDDED_LONG, "shared") or p.endswith(".jsonl")
                or Path(p).is_file()):
            raise DataError(f"`dataset` {spec!r}: every part joined by {JOIN!r} must be "
                            f"embedded, shared or a JSONL manifest, got {p!r}")
    return parts


def absolute(spec: str) -> str:
    """`spec` with its local paths made absolute, each part of a joined one too (Ray workers
    run in other directories)."""
    if Path(spec).exists():
        return str(Path(spec).resolve())
    if JOIN not in spec:
        return spec
    return JOIN.join(str(Path(p).resolve()) if Path(p).exists() else p
                     for p in spec.split(JOIN))


def _joined(spec: str, parts: list[str], language) -> list[Record]:
    records = [r for p in parts for r in _records(p, None, "test", "audio", "text", language)]
    seen: set[str] = set()
    twice = sorted({r[0] for r in records if r[0] in seen or seen.add(r[0])})
    if twice:
        raise DataError(f"`dataset` {spec!r}: utterance ids must be unique across the joined "
                        f"sets, got {len(twice)} repeated, e.g. {twice[:3]}")
    return records


def _records(spec, config, split, audio_column, text_column, language) -> Iterable[Record]:
    if (parts := _parts(spec)) is not None:
        return _joined(spec, parts, language)
    if spec == "embedded":
        return _read_manifest(EMBEDDED_MANIFEST, language)
    if spec == EMBEDDED_LONG:
        return _read_manifest(embedded_long(), language)
    if spec == "shared":  # convenience: the shared speech set beside the checkout
        root = shared_dir()
        if root is None:
            raise DataError("`dataset` 'shared' needs $HYPER_SHARED or shared/ beside the "
                            "checkout holding speech/manifest.jsonl")
        return _read_manifest(root / "speech" / "manifest.jsonl", language)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        if not Path(spec).is_file():
            raise DataError(f"`dataset` manifest {spec} does not exist")
        return _read_manifest(Path(spec), language)
    return _hf_records(spec, config, split, audio_column, text_column, language)


def embedded_long(cache_dir=None) -> Path:
    """The manifest of `embedded-long`: six recordings of 45-120 s built from the embedded
    clips (`sweep.inputs.longform`, seeded), written once under `$HYPER_CACHE/longform/`."""
    from .longform import LongOptions, cached

    clips = _materialize("embedded", _read_manifest(EMBEDDED_MANIFEST, None), None).utterances
    return cached(clips, LongOptions(name="embedded_long"), "embedded", cache_dir)


def _materialize(name: str, records: Iterable[Record], max_samples: int | None,
                 exclude_ids: Iterable[str] = ()) -> EvalSet:
    """Decode in order until `max_samples` usable utterances; count every skip with a reason."""
    excluded = set(exclude_ids)
    out = EvalSet(name, [])
    for uid, text, lang, src in records:
        if max_samples is not None and len(out) >= max_samples:
            break
        if uid in excluded:
            continue
        reason = None
        if text is None:  # no reference at all: kept (agreement WER)
            if any(u.text for u in out.utterances):
                raise DataError(f"`dataset` {name!r} joins sets with and without references "
                                f"({uid} has none): agreement WER and WER are never mixed")
            out.labelled, text = False, ""
        elif not out.labelled:
            raise DataError(f"`dataset` {name!r} joins sets with and without references "
                            f"({uid} has one): agreement WER and WER are never mixed")
        if out.labelled and not text.strip():
            reason = "empty reference"
        elif src is None:
            reason = "no audio"
        else:
            try:
                audio = _decode(src)
            except Exception as exc:  # noqa: BLE001 - any decoder failure means: skip, counted
                reason = f"unreadable audio ({type(exc).__name__}: {str(exc)[:120]})"
        if reason:
            out.skipped += 1
            out.skipped_reasons.append(f"{uid}: {reason}")
            continue
        out.utterances.append(Utterance(uid, audio, text.strip(), lang, audio.size / SAMPLE_RATE))
    if not out.utterances:
        detail = f"; skipped: {out.skipped_reasons[:5]}" if out.skipped else ""
        raise DataError(f"`dataset` {name!r} gave no usable utterance{detail}")
    return out


def load_eval_set(spec: str = "embedded", *, max_samples: int | None = None,
                  config: str | None = None, split: str = "test", audio_column: str = "audio",
                  text_column: str = "text", language: str | None = None,
                  exclude_ids: Iterable[str] = ()) -> EvalSet:
    """Load `embedded`, `embedded-long`, `shared`, a `.jsonl` manifest, a `save_to_disk` folder or
    a HF id;
    manifest sets joined by `+` (`shared+embedded`) are one set, in that order.

    Ids: a manifest line's `id`, else its `audio` path; `{split}/{row}` for HF datasets.

    `max_samples` keeps the first N usable utterances in file order (deterministic);
    `language` keeps utterances of that language (those without a language are kept and tagged).
    """
    if max_samples is not None and max_samples < 1:
        raise DataError(f"`max_samples` must be >= 1 or None, not {max_samples}")
    records = _records(spec, config, split, audio_column, text_column, language)
    return _materialize(spec, records, max_samples, exclude_ids)


def calibration_set(eval_set_spec: str = "embedded", n: int = 8, *,
                    eval_max_samples: int | None = None, config: str | None = None,
                    split: str = "test", calibration_split: str | None = None,
                    audio_column: str = "audio", text_column: str = "text",
                    language: str | None = None) -> EvalSet:
    """Utterances never in the evaluation set, for static int8 calibration. The rule:

    - `embedded`: the first `n` of `sweep/inputs/embedded/calibration.jsonl` (other sentences);
    - `calibration_split` given: its first `n` utterances;
    - else, when the evaluation uses `eval_max_samples`: the `n` usable utterances after them;
    - else (evaluation takes everything) a HF dataset uses its first other split among
      validation/dev/train/test; a manifest has nothing left and raises `DataError`.
    """
    kw = {"audio_column": audio_column, "text_column": text_column, "language": language}
    if eval_set_spec in ("embedded", EMBEDDED_LONG):  # other sentences than either holds
        return _materialize("embedded:calibration",
                            _read_manifest(EMBEDDED_CALIBRATION, language), n)
    if calibration_split:
        return load_eval_set(eval_set_spec, max_samples=n, config=config,
                             split=calibration_split, **kw)
    if eval_max_samples is not None:
        ev = load_eval_set(eval_set_spec, max_samples=eval_max_samples, config=config,
                           split=split, **kw)
        return load_eval_set(eval_set_spec, max_samples=n, config=config, split=split,
                             exclude_ids=[u.id for u in ev], **kw)
    is_manifest = eval_set_spec == "shared" or eval_set_spec.endswith(".jsonl") or (
        Path(eval_set_spec).is_file()) or _parts(eval_set_spec) is not None
    if not is_manifest:
        splits = None
        if Path(eval_set_spec).is_dir():
            splits = _hf_dataset(eval_set_spec, config, split)[1]
        else:
            try:
                import datasets

                splits = datasets.get_dataset_split_names(eval_set_spec, config)
            except Exception:  # noqa: BLE001 - offline/unknown: fall through to the error
                splits = None
        for other in _OTHER_SPLITS:
            if splits and other in splits and other != split:
                return load_eval_set(eval_set_spec, max_samples=n, config=config, split=other,
                                     **kw)
    raise DataError(f"no calibration data for {eval_set_spec!r}: the evaluation uses all of "
                    f"split {split!r}; pass `eval_max_samples` or `calibration_split`")
