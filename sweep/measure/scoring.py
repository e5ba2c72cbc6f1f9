"""Scoring: text normalisation, WER/CER, repetition loops and a paired bootstrap for dWER.

Pure logic (numpy, num2words; jiwer when installed, else an edit distance here giving the same
counts): no torch, Ray or MLflow.

Normalisation (applied to references and hypotheses alike), documented in docs/recipes.md (scoring):
  1. Unicode NFKC, lower case, ``ё`` -> ``е``;
  2. numbers -> words with ``num2words`` in the utterance's language (``numbers="words"``), since
     Golos-style references spell numbers out while Whisper writes digits; ``numbers="none"``
     keeps digits; ``"auto"`` uses words where num2words knows the language;
  3. punctuation and symbols removed (apostrophes and hyphens inside words become spaces),
     runs of white space collapsed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

NUMBER_MODES = ("auto", "words", "none")
# Whisper's repetition loops: the same n-gram (n <= LOOP_MAX_N tokens) at least LOOP_REPEATS
# times in a row, or generation stopped by the token cap instead of end-of-text.
LOOP_REPEATS = 4
LOOP_MAX_N = 12

_NUM = re.compile(r"\d+(?:[.,]\d+)?")
_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_SPACE = re.compile(r"\s+")


def _num2words_langs() -> frozenset[str]:
    from num2words import CONVERTER_CLASSES

    return frozenset(CONVERTER_CLASSES)


def _spell_numbers(text: str, lang: str) -> str:
    from num2words import num2words

    def spell(m: re.Match) -> str:
        raw = m.group(0).replace(",", ".")
        try:
            value = float(raw) if "." in raw else int(raw)
            return f" {num2words(value, lang=lang)} "
        except (NotImplementedError, OverflowError, ValueError):
            return m.group(0)

    return _NUM.sub(spell, text)


def number_mode(lang: str | None, numbers: str = "auto") -> str:
    """Which number normalisation really runs for `lang` (recorded with every result)."""
    if numbers not in NUMBER_MODES:
        raise ValueError(f"`numbers` must be one of {NUMBER_MODES}, got {numbers=}")
    if numbers == "none" or lang is None:
        return "none"
    known = lang in _num2words_langs()
    if numbers == "words" and not known:
        raise ValueError(f"`numbers`='words' needs a language num2words knows, got {lang=}")
    return "words" if known else "none"


def normalize(text: str, lang: str | None = None, numbers: str = "auto") -> str:
    text = unicodedata.normalize("NFKC", text).lower().replace("ё", "е")
    if number_mode(lang, numbers) == "words":
        text = _spell_numbers(text, lang).lower().replace("ё", "е")
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class UttErrors:
    """Edit counts of one utterance: what corpus WER/CER and the bootstrap are built from."""

    word_errors: int
    words: int
    char_errors: int
    chars: int


@dataclass(frozen=True)
class Scores:
    wer: float
    cer: float
    per_utt: list[UttErrors] = field(repr=False)
    dropped_empty_refs: int = 0


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance of two sequences (substitutions + deletions + insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def utt_errors(ref: str, hyp: str) -> UttErrors:
    """Counts for one normalised pair; `ref` must be non-empty (empty ones are dropped earlier).
    Without jiwer (a bare GPU machine) the same counts come from `edit_distance`."""
    try:
        import jiwer
    except ImportError:
        words, chars = ref.split(), ref.strip()
        return UttErrors(edit_distance(words, hyp.split()), len(words),
                         edit_distance(chars, hyp.strip()), len(chars))
    w = jiwer.process_words(ref, hyp)
    c = jiwer.process_characters(ref, hyp)
    return UttErrors(
        word_errors=w.substitutions + w.deletions + w.insertions,
        words=w.substitutions + w.deletions + w.hits,
        char_errors=c.substitutions + c.deletions + c.insertions,
        chars=c.substitutions + c.deletions + c.hits,
    )


def score(refs: list[str], hyps: list[str]) -> Scores:
    """Corpus WER/CER over normalised pairs; pairs whose reference is empty are dropped."""
    if len(refs) != len(hyps):
        raise ValueError(f"refs and hyps must pair up, got {len(refs)=} and {len(hyps)=}")
    per = [utt_errors(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not per:
        raise ValueError("no reference is non-empty: WER is undefined on an empty set")
    return Scores(
        wer=_ratio(per, "word_errors", "words"),
        cer=_ratio(per, "char_errors", "chars"),
        per_utt=per,
        dropped_empty_refs=len(refs) - len(per),
    )


def _ratio(per: list[UttErrors], num: str, den: str) -> float:
    return sum(getattr(u, num) for u in per) / max(1, sum(getattr(u, den) for u in per))


def relative(value: float, base: float) -> float:
    """Relative change (0.05 = 5% worse); absolute difference when the base is 0."""
    return value / base - 1.0 if base > 0 else value - base


def speedup(base_rows: list[dict], rows: list[dict]) -> float:
    """How much faster a trial's clips (`rows`, evaluate's per-clip rows) went than the
    baseline's on the same clips: the baseline's median `latency_s` over the trial's; on a
    long-form set (a row longer than Whisper's window) the trial's throughput over the
    baseline's, i.e. their summed `wall_s`. Recordings decoded as one stream each wait for
    their group, so a recording's latency there says how the group was timed, not how fast."""
    from .segment import is_long

    if any(is_long(r["duration_s"]) for r in rows):
        return sum(r["wall_s"] for r in base_rows) / sum(r["wall_s"] for r in rows)
    return float(np.median([r["latency_s"] for r in base_rows])
                 / np.median([r["latency_s"] for r in rows]))


def count_loop(tokens: list, cap_reached: bool) -> bool:
    """True when decoding looped: the cap was hit or an n-gram repeats LOOP_REPEATS times."""
    if cap_reached:
        return True
    n_tok = len(tokens)
    for n in range(1, LOOP_MAX_N + 1):
        span = n * LOOP_REPEATS
        for start in range(n_tok - span + 1):
            gram = tokens[start:start + n]
            if all(tokens[start + k * n:start + (k + 1) * n] == gram
                   for k in range(1, LOOP_REPEATS)):
                return True
    return False


def max_new_tokens_for(duration_s: float, limit: int = 440) -> int:
    """Token cap by clip length: ~12 tokens/s covers dense Russian speech with a margin."""
    return int(min(limit, 16 + 12 * max(0.0, duration_s)))


def bootstrap_dwer(base: list[UttErrors], trial: list[UttErrors], *, n: int = 2000,
                   seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Interval of relative dWER, resampling utterances in pairs (same clips for both sides)."""
    if len(base) != len(trial) or not base:
        raise ValueError("paired bootstrap needs equal non-empty lists, "
                         f"got {len(base)} and {len(trial)}")
    rng = np.random.default_rng(seed)
    b_err = np.array([u.word_errors for u in base], float)
    t_err = np.array([u.word_errors for u in trial], float)
    words = np.array([u.words for u in base], float)
    idx = rng.integers(0, len(base), size=(n, len(base)))
    b_wer = b_err[idx].sum(1) / np.maximum(words[idx].sum(1), 1)
    t_wer = t_err[idx].sum(1) / np.maximum(words[idx].sum(1), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(b_wer > 0, t_wer / b_wer - 1.0, t_wer - b_wer)
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
