"""Regenerate sweep/inputs/embedded/: short Russian voice commands synthesized with festival.

Needs Debian's `festival` and `festvox-ru` (voice msu_ru_nsh_clunits); CI neither has them nor
runs this: the FLAC files and manifests it writes are committed. Re-running it rewrites them.

    apt-get install festival festvox-ru && .venv/bin/python scripts/make_embedded_set.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sweep.inputs.data import EMBEDDED_DIR, SAMPLE_RATE, to_mono_16k  # noqa: E402

VOICE = "msu_ru_nsh_clunits"
SOURCE = f"festival festvox-ru ({VOICE})"
LICENSE = ("synthetic speech made for HYPER with festival + festvox-ru (msu_ru_nsh_clunits, "
           "free licence: Debian main, see /usr/share/doc/festvox-ru/copyright); sentences "
           "written for this repo, MIT")

# Written as spoken: numbers already in words, so festival's digit reader (often wrong
# case endings) is never used and the reference is exactly what was said.
EVAL = [
    "Повтори ещё раз.",
    "Сколько стоит хлеб?",
    "Какая сегодня дата?",
    "Закажи пиццу на ужин.",
    "Позвони папе на работу.",
    "Прочитай мне сказку.",
    "Включи свет на кухне.",
    "Открой дверь на балкон.",
    "Поставь таймер на десять минут.",
    "Какой сегодня курс евро?",
    "Включи свет в прихожей.",
    "Переключи на второй канал.",
    "Сколько километров до Казани?",
    "Какая музыка сейчас играет?",
    "Вызови такси к подъезду.",
    "Выключи радио в гостиной.",
    "Найди ближайшую аптеку.",
    "Прочитай последние новости.",
    "Какая температура на улице?",
    "Поставь следующую песню.",
    "Сколько будет два плюс два?",
    "Какая погода на выходных?",
    "Выключи все лампы в доме.",
    "Напомни про цветы в среду.",
    "Позвони в службу поддержки.",
    "Где ближайшая заправка?",
    "Включи мой любимый плейлист.",
    "Разбуди меня через полчаса.",
    "Поставь будильник на семь утра.",
    "Включи вентилятор в спальне.",
    "Выключи компьютер через час.",
    "Включи новости на первом канале.",
    "Установи таймер на двадцать пять минут.",
    "Напомни про встречу в три часа.",
    "Какая завтра будет погода в Москве?",
    "Добавь яйца в список покупок.",
    "Сколько шагов я прошёл сегодня?",
    "Позвони бабушке вечером.",
    "Убавь температуру до двадцати двух градусов.",
    "Забронируй столик на четверых на восемь вечера.",
]
# Never the same sentence as EVAL (checked in main), so calibration cannot leak into the WER.
CALIBRATION = [
    "Включи свет в ванной.",
    "Открой окно на кухне.",
    "Прибавь яркость экрана.",
    "Какой сегодня день недели?",
    "Сколько стоит билет до Самары?",
    "Поставь будильник на шесть тридцать.",
    "Отмени все напоминания на завтра.",
    "Включи спокойную музыку для сна.",
]
# Sentences festival rendered badly (embedded whisper-base got most words wrong) were replaced:
# e.g. "Выключи телевизор", "Закажи такси до вокзала", "Останови воспроизведение".


def normalize(text: str) -> str:
    """Golos style: lower case, ё -> е, punctuation removed, single spaces."""
    text = text.lower().replace("ё", "е")
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def synthesize(texts: list[str], out_dir: Path) -> list[Path]:
    """One festival run for all sentences (startup dominates); UTF-8 is what the voice reads."""
    wavs = [out_dir / f"{i:03d}.wav" for i in range(len(texts))]
    lines = [f"(voice_{VOICE})"]
    for text, wav in zip(texts, wavs):
        assert '"' not in text and "\\" not in text
        lines.append(f'(set! u (utt.synth (Utterance Text "{text}")))'
                     f'(utt.save.wave u "{wav}" \'riff)')
    script = out_dir / "gen.scm"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    subprocess.run(["festival", "-b", str(script)], check=True, capture_output=True)
    return wavs


def trim(x: np.ndarray, pad_s: float = 0.1) -> np.ndarray:
    """Cut festival's leading/trailing silence to a short pad (keeps the set small)."""
    loud = np.flatnonzero(np.abs(x) > 0.02 * np.abs(x).max())
    pad = int(pad_s * SAMPLE_RATE)
    return x[max(loud[0] - pad, 0): loud[-1] + pad]


def check(x: np.ndarray, text: str) -> None:
    """Refuse silent, clipped or implausibly short/long renderings."""
    words, dur = len(normalize(text).split()), x.size / SAMPLE_RATE
    rms, peak = float(np.sqrt(np.mean(x**2))), float(np.abs(x).max())
    if not (0.15 * words <= dur <= 0.9 * words + 1.0) or rms < 0.01 or peak >= 0.999:
        raise SystemExit(f"bad rendering of {text!r}: {dur:.2f} s, rms {rms:.3f}, peak {peak}")


def build(prefix: str, texts: list[str], tmp: Path) -> list[dict]:
    rows = []
    for i, (text, wav) in enumerate(zip(texts, synthesize(texts, tmp))):
        data, sr = sf.read(wav, dtype="float32", always_2d=True)
        x = trim(to_mono_16k(data, sr))
        check(x, text)
        name = f"{prefix}_{i + 1:03d}.flac"
        sf.write(EMBEDDED_DIR / name, x, SAMPLE_RATE, format="FLAC", subtype="PCM_16",
                 compression_level=1.0)
        rows.append({"audio": name, "text": normalize(text), "text_display": text, "lang": "ru",
                     "duration_s": round(x.size / SAMPLE_RATE, 3), "kind": "synthetic",
                     "source": SOURCE, "license": LICENSE})
    return rows


def main() -> None:
    if shutil.which("festival") is None:
        raise SystemExit("festival not found: apt-get install festival festvox-ru")
    assert not set(map(normalize, EVAL)) & set(map(normalize, CALIBRATION))
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    for old in EMBEDDED_DIR.glob("*.flac"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for manifest, prefix, texts in (("manifest.jsonl", "ru", EVAL),
                                        ("calibration.jsonl", "cal", CALIBRATION)):
            rows = build(prefix, texts, Path(tmp))
            with open(EMBEDDED_DIR / manifest, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            total = sum(r["duration_s"] for r in rows)
            size = sum((EMBEDDED_DIR / r["audio"]).stat().st_size for r in rows)
            print(f"{manifest}: {len(rows)} clips, {total:.1f} s, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
