"""Scoring against hand-computed figures: normalisation, numbers, empty references, loops."""

import pytest

from sweep.measure import scoring


def test_normalize_russian_rules():
    assert scoring.normalize("Ёлка, ЁЖ и «ещё»!  Да?", "ru", "none") == "елка еж и еще да"


def test_numbers_to_words_russian():
    got = scoring.normalize("Поставь будильник на 7 утра", "ru")
    assert got == "поставь будильник на семь утра"
    assert scoring.normalize("в 2024 году", "ru", "none") == "в 2024 году"
    assert scoring.number_mode("ru", "auto") == "words"
    assert scoring.number_mode(None, "auto") == "none"


def test_numbers_mode_errors():
    with pytest.raises(ValueError, match="`numbers` must be one of"):
        scoring.number_mode("ru", "digits")
    with pytest.raises(ValueError, match="num2words knows"):
        scoring.number_mode("xx", "words")


def test_wer_cer_hand_computed():
    # ref 5 words; hyp: 1 substitution (кот->кит), 1 deletion (на), 1 insertion (да) -> 3/5.
    refs = ["мама мыла кота на кухне"]
    hyps = ["мама мыла кита кухне да"]
    sc = scoring.score(refs, hyps)
    assert sc.wer == pytest.approx(3 / 5)
    # chars: "ab" vs "ac": 1 sub / 2 chars
    assert scoring.score(["ab"], ["ac"]).cer == pytest.approx(0.5)


def test_corpus_wer_weights_by_words_and_drops_empty_refs():
    sc = scoring.score(["a b c d", "", "e"], ["a b c d", "anything", "x"])
    assert sc.dropped_empty_refs == 1
    assert sc.wer == pytest.approx(1 / 5)  # one error over five reference words
    with pytest.raises(ValueError, match="no reference is non-empty"):
        scoring.score([""], ["x"])


def test_empty_hypothesis_is_all_deletions():
    assert scoring.score(["раз два три"], [""]).wer == pytest.approx(1.0)


@pytest.mark.parametrize("tokens,cap,expected", [
    ([1, 2, 3, 4, 5], False, False),
    ([1, 2, 3, 4, 5], True, True),
    ([9, 7, 7, 7, 7, 8], False, True),
    ([9, 7, 7, 7, 8], False, False),
    ([1] + [5, 6, 7] * 4 + [2], False, True),
    ([1] + [5, 6, 7] * 3 + [2], False, False),
])
def test_loop_detection(tokens, cap, expected):
    assert scoring.count_loop(tokens, cap) is expected


def test_token_cap_grows_with_duration_and_is_bounded():
    assert scoring.max_new_tokens_for(1.0) < scoring.max_new_tokens_for(5.0)
    assert scoring.max_new_tokens_for(3600) == 440


def test_relative_and_bootstrap():
    assert scoring.relative(0.11, 0.10) == pytest.approx(0.1)
    assert scoring.relative(0.1, 0.0) == pytest.approx(0.1)
    base = [scoring.UttErrors(1, 10, 2, 40) for _ in range(20)]
    same = scoring.bootstrap_dwer(base, base)
    assert same == (0.0, 0.0)
    worse = [scoring.UttErrors(2, 10, 4, 40) for _ in range(20)]
    lo, hi = scoring.bootstrap_dwer(base, worse)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    mixed = [scoring.UttErrors(i % 3, 10, 0, 40) for i in range(20)]
    lo, hi = scoring.bootstrap_dwer(base, mixed)
    assert lo < scoring.relative(sum(i % 3 for i in range(20)) / 200, 0.1) < hi
