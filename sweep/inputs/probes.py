"""Hallucination probes: short non-speech clips any transcript of which is a hallucination.

Whisper (and compressed Whispers more) writes text for silence and noise. Every trial
transcribes these after its clips; `hallucination_rate` is the share with any word. They are
generated here, deterministically (seeded), so nothing binary lives in the repo:
`python -m sweep.inputs.probes --out DIR` writes them as WAV files to listen to.
"""

from __future__ import annotations

import numpy as np

from .data import Utterance

SR = 16_000
SECONDS = 4.0  # long enough for Whisper to "hear" something, short enough to stay cheap
SEED = 1234


def _db(level_dbfs: float) -> float:
    return 10 ** (level_dbfs / 20)


def _white(n: int, rng) -> np.ndarray:
    return rng.standard_normal(n)


def _pink(n: int, rng) -> np.ndarray:
    """1/f noise by shaping white noise's spectrum (room tone, fans)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=float)
    f[0] = 1.0
    return np.fft.irfft(spec / np.sqrt(f), n)


def _tone(n: int, *freqs: float) -> np.ndarray:
    t = np.arange(n) / SR
    return sum(np.sin(2 * np.pi * f * t) for f in freqs)


def _hum(n: int, mains: float) -> np.ndarray:
    """Mains hum: the fundamental and decaying odd/even harmonics."""
    t = np.arange(n) / SR
    return sum(np.sin(2 * np.pi * mains * k * t) / k for k in range(1, 6))


def _rms(x: np.ndarray, level_dbfs: float) -> np.ndarray:
    r = float(np.sqrt(np.mean(x ** 2)))
    return x * (_db(level_dbfs) / r) if r > 0 else x


# name -> how it is made (n samples, rng) at its RMS level in dBFS
PROBES = {
    "silence": lambda n, rng: np.zeros(n),
    "white-60dB": lambda n, rng: _rms(_white(n, rng), -60),
    "white-40dB": lambda n, rng: _rms(_white(n, rng), -40),
    "white-20dB": lambda n, rng: _rms(_white(n, rng), -20),
    "pink-30dB": lambda n, rng: _rms(_pink(n, rng), -30),
    "hum50-30dB": lambda n, rng: _rms(_hum(n, 50.0), -30),
    "hum60-30dB": lambda n, rng: _rms(_hum(n, 60.0), -30),
    "tone440-20dB": lambda n, rng: _rms(_tone(n, 440.0), -20),
    "tone1k-20dB": lambda n, rng: _rms(_tone(n, 1000.0), -20),
    "dialtone-25dB": lambda n, rng: _rms(_tone(n, 350.0, 440.0), -25),
}


def probes(seconds: float = SECONDS, seed: int = SEED) -> list[Utterance]:
    """The probes as utterances (empty reference, no language: the trial's is used)."""
    if seconds <= 0:
        raise ValueError(f"probe `seconds` must be > 0, got {seconds=}")
    n = int(seconds * SR)
    out = []
    for i, (name, make) in enumerate(PROBES.items()):
        audio = np.clip(make(n, np.random.default_rng(seed + i)), -1.0, 1.0).astype(np.float32)
        out.append(Utterance(id=f"probe:{name}", audio=audio, text="", lang=None,
                             duration_s=n / SR))
    return out


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    import soundfile as sf

    ap = argparse.ArgumentParser(prog="python -m sweep.inputs.probes",
                                 description="Write HYPER's hallucination probes as WAV files.")
    ap.add_argument("--out", required=True, help="folder to write <name>.wav into")
    ap.add_argument("--seconds", type=float, default=SECONDS, help="length of each probe")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in probes(args.seconds):
        sf.write(out / f"{p.id.split(':', 1)[1]}.wav", p.audio, SR)
    print(f"wrote {len(PROBES)} probes to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
