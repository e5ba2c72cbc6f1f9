"""Long recordings built from an utterance set: utterances joined with pauses of varied length
and, now and then, a stretch of silence or noise between them, the reference the whole text.

Meetings, calls and lectures are long and hold stretches where nobody speaks; Whisper invents
text on those (issue #28). A built recording says where its stretches are (`stretches`:
[start_s, end_s, kind]) and where each utterance is (`parts`: [start_s, end_s, id]), so a
transcript's words can be set against them.

`embedded-long` (`load_eval_set("embedded-long")`, `--dataset embedded-long`: EMBEDDED_LONG_OPTIONS
on the embedded Russian clips, in `sweep.inputs.data`): six recordings of 45 to 120 s, seeded,
so the same on every machine; written once as 16-bit WAV under `$HYPER_CACHE/longform/`
(nothing binary in the repo) and read back as an ordinary manifest. Offline.

Pure (numpy): utterances are anything with `id`, `audio`, `text`, `lang`, `duration_s`.

    python -m sweep.inputs.longform --dataset shared --out /tmp/long --n 2 --seed 1
writes recordings of any set `load_eval_set` reads, with their `manifest.jsonl` (`__main__`).
"""

from __future__ import annotations

import hashlib
import json
import math
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
VERSION = 2  # of the builder: a change here makes a new cache folder (2: no clip repeats
# across recordings before every clip of the language was used; 1 drew each recording anew)
EMBEDDED_LONG = "embedded-long"
KINDS = ("silence", "noise", "hum")  # what a stretch holds


class LongformError(ValueError):
    """Options or utterances long recordings cannot be built from; the message says which."""


@dataclass(frozen=True)
class LongOptions:
    """How recordings are built. Lengths are drawn evenly from [min_s, max_s] (one per
    recording, shuffled); pauses and stretches uniformly from their ranges."""
    n: int = 6  # recordings
    min_s: float = 45.0
    max_s: float = 116.0  # the last utterance may end up to one utterance later
    pause_s: tuple[float, float] = (0.3, 2.0)  # silence between two utterances
    stretch_every: float = 4.0  # a stretch after every ~this many utterances (0: none)
    stretch_s: tuple[float, float] = (4.0, 15.0)
    kinds: tuple[str, ...] = KINDS
    level_dbfs: float = -45.0  # RMS of noise and hum stretches
    seed: int = 0
    name: str = "long"  # recording ids: <name>_01, ...

    def __post_init__(self):
        bad = []
        if not (isinstance(self.n, int) and self.n >= 1):
            bad.append(f"`n` must be an integer >= 1, got n={self.n!r}")
        if not 0 < self.min_s <= self.max_s < math.inf:
            bad.append(f"`min_s`, `max_s` must satisfy 0 < min_s <= max_s, got "
                       f"min_s={self.min_s!r}, max_s={self.max_s!r}")
        for name in ("pause_s", "stretch_s"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi < math.inf:
                bad.append(f"`{name}` must be a range 0 <= lo <= hi, got {name}={(lo, hi)!r}")
        if not 0 <= self.stretch_every < math.inf:
            bad.append(f"`stretch_every` must be >= 0 (0: no stretches), got "
                       f"{self.stretch_every!r}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            bad.append(f"`kinds` must be some of {KINDS}, got {self.kinds!r}")
        if not -120 <= self.level_dbfs <= 0:
            bad.append(f"`level_dbfs` must be in [-120, 0], got {self.level_dbfs!r}")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            bad.append(f"`name` must be letters, digits, - or _, got {self.name!r}")
        if bad:
            raise LongformError("; ".join(bad))


@dataclass
class Recording:
    id: str
    audio: np.ndarray
    text: str
    lang: str | None
    parts: list[list] = field(default_factory=list)  # [start_s, end_s, utterance id]
    stretches: list[list] = field(default_factory=list)  # [start_s, end_s, kind]

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


def _stretch(kind: str, n: int, level_dbfs: float, rng) -> np.ndarray:
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "noise":  # pink: room tone, fans (white noise's spectrum shaped by 1/sqrt(f))
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.arange(len(spec), dtype=float)
        f[0] = 1.0
        x = np.fft.irfft(spec / np.sqrt(f), n)
    else:  # mains hum, 50 Hz and harmonics
        t = np.arange(n) / SAMPLE_RATE
        x = sum(np.sin(2 * np.pi * 50.0 * k * t) / k for k in range(1, 6))
    rms = float(np.sqrt(np.mean(x ** 2))) or 1.0
    return (x * (10 ** (level_dbfs / 20) / rms)).astype(np.float32)


def build(utterances: list, opts: LongOptions = LongOptions()) -> list[Recording]:
    """`opts.n` recordings from `utterances` (each recording in one language; utterances are
    taken in a shuffled order and reused only once all of that language were taken, across the
    whole set: recordings that shared clips would be scored as if independent, and the set's
    interval would claim more than its speech resolves)."""
    pool = [u for u in utterances if u.audio.size and u.text.strip()]
    if not pool:
        raise LongformError("long-form recordings need utterances with audio and text, got none")
    rng = np.random.default_rng(opts.seed)
    langs = sorted({u.lang or "" for u in pool})
    targets = np.linspace(opts.min_s, opts.max_s, opts.n)
    rng.shuffle(targets)
    out, orders = [], {lang: [] for lang in langs}
    for r, target in enumerate(targets):
        lang = langs[r % len(langs)]
        mine = [u for u in pool if (u.lang or "") == lang]
        order = orders[lang]
        chunks, texts, parts, stretches, t, since = [], [], [], [], 0.0, 0
        next_stretch = rng.uniform(0.5, 1.5) * opts.stretch_every
        while True:
            if not order:
                order += [mine[i] for i in rng.permutation(len(mine))]
            u = order.pop()
            parts.append([round(t, 5), round(t + u.duration_s, 5), u.id])
            chunks.append(u.audio.astype(np.float32))
            texts.append(u.text.strip())
            t += u.duration_s
            since += 1
            if t >= target:
                break
            n = int(rng.uniform(*opts.stretch_s) * SAMPLE_RATE)  # drawn either way: seeded
            if opts.stretch_every and since >= next_stretch and t + n / SAMPLE_RATE < target:
                kind = opts.kinds[int(rng.integers(len(opts.kinds)))]
                stretches.append([round(t, 5), round(t + n / SAMPLE_RATE, 5), kind])
                chunks.append(_stretch(kind, n, opts.level_dbfs, rng))
                since, next_stretch = 0, rng.uniform(0.5, 1.5) * opts.stretch_every
            else:
                n = int(rng.uniform(*opts.pause_s) * SAMPLE_RATE)
                chunks.append(np.zeros(n, np.float32))
            t += n / SAMPLE_RATE
        out.append(Recording(f"{opts.name}_{r + 1:02d}", np.concatenate(chunks),
                             " ".join(texts), lang or None, parts, stretches))
    return out


def _write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def write(recordings: list[Recording], out: Path, opts: LongOptions | None = None,
          source: str = "") -> Path:
    """Each recording as 16-bit WAV in `out`, and `out/manifest.jsonl` (any row length is a
    manifest row; `stretches` and `parts` are read by whoever needs them)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for rec in recordings:
            _write_wav(out / f"{rec.id}.wav", rec.audio)
            row = {"id": rec.id, "audio": f"{rec.id}.wav", "text": rec.text, "lang": rec.lang,
                   "duration_s": round(rec.duration_s, 3), "kind": "long-form",
                   "parts": rec.parts, "stretches": rec.stretches,
                   "source": f"sweep.inputs.longform v{VERSION} from {source}".strip(),
                   **({"options": _jsonable(opts)} if opts else {})}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out / "manifest.jsonl"


def _jsonable(opts: LongOptions) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()}


def cached(utterances: list, opts: LongOptions, source: str,
           cache_dir=None) -> Path:
    """The manifest of `build(utterances, opts)` under `$HYPER_CACHE/longform/`, built the
    first time (aside, then renamed into place: a killed build never looks complete)."""
    from .. import cache

    h = hashlib.sha256(json.dumps([VERSION, _jsonable(opts), source], sort_keys=True).encode())
    for u in utterances:
        h.update(f"{u.id}\x00{u.text}\x00{u.audio.size}\x01".encode())
        h.update(np.ascontiguousarray(u.audio[:: max(1, u.audio.size // 64)]).tobytes())
    final = cache.root(cache_dir) / "longform" / f"{opts.name}-{h.hexdigest()[:16]}"
    if not cache.valid(final):
        with cache.atomic_dir(final) as tmp:
            write(build(utterances, opts), tmp, opts, source)
    return final / "manifest.jsonl"


def silence_spans(manifest: Path) -> dict[str, list[tuple[float, float, str]]]:
    """Recording id -> its stretches (start_s, end_s, kind), from a built manifest."""
    out = {}
    for line in Path(manifest).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row.get("id") or row["audio"]] = [tuple(s) for s in row.get("stretches", [])]
    return out


def clip_uses(manifest: Path) -> dict[str, int]:
    """Utterance id -> how many times the recordings of a built manifest use it (a set whose
    recordings repeat clips resolves less than its recording count suggests)."""
    uses: dict[str, int] = {}
    for line in Path(manifest).read_text(encoding="utf-8").splitlines():
        for part in json.loads(line).get("parts", []) if line.strip() else []:
            uses[part[2]] = uses.get(part[2], 0) + 1
    return uses
