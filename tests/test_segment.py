"""Segmentation and batching (issue #28): the VAD keeps speech and drops silence, long
recordings are cut into windows at quiet points, pieces batched give the texts of pieces
decoded one by one, a long recording is scored whole, throughput is the set's audio over its
wall time, and the probes go through the same segmentation."""

import dataclasses

import numpy as np
import pytest
import torch

from sweep.evaluate import main as evaluate_main
from sweep.inputs.data import EvalSet, Utterance, load_eval_set
from sweep.inputs.longform import LongOptions, build
from sweep.inputs.probes import probes
from sweep.measure import batch, decode, evaluate, segment
from sweep.measure.decode import plan_for
from sweep.measure.segment import Segmenting
from sweep.techniques.recipe import Recipe, RecipeError

SR = 16000


@pytest.fixture(scope="module")
def clips():
    return load_eval_set("embedded", max_samples=4).utterances


@pytest.fixture(scope="module")
def tiny():
    """A narrow random Whisper (init_std 0.3: its tokens depend on the audio) and the real
    processor."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from sweep.inputs.models import load_model

    lm = load_model("random:tiny")
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448, init_std=0.3,
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = lm.model.generation_config
    return model, lm.processor


def _plan(text: str, tokens: int = 6):
    """The recipe's decoding options, at most `tokens` per piece (random weights never stop)."""
    return dataclasses.replace(plan_for(Recipe.parse(text)), max_new_tokens=tokens)


def _gap(s: float):
    return np.zeros(int(s * SR), np.float32)


def test_vad_keeps_the_speech_drops_the_silence_and_joins_up_to_max_s(clips):
    a, b = clips[0].audio, clips[1].audio
    audio = np.concatenate([_gap(1), a, _gap(10), b, _gap(0.5)])
    vad = Segmenting("vad", join="speech")
    chunks = segment.speech(audio, vad)
    assert len(chunks) == 2
    (s0, e0), (s1, e1) = chunks  # each utterance inside its chunk, padding around it
    assert s0 <= SR < SR + a.size <= e0 and s1 <= SR + a.size + 10 * SR < e1
    joined = segment.pieces(audio, vad, windowed=True)
    assert len(joined) == 1 and joined[0].duration_s < 6 < audio.size / SR
    assert np.array_equal(joined[0].audio, np.concatenate([audio[s:e] for s, e in chunks]))
    apart = segment.pieces(audio, Segmenting("vad", max_s=3.0, pad_s=0.2, join="speech"),
                           windowed=True)
    assert len(apart) == 2 and all(p.duration_s <= 3.0 for p in apart)
    assert segment.pieces(_gap(40), vad, windowed=True) == []  # nothing to decode


def test_span_keeps_the_pauses_between_speech_and_ends_a_piece_at_a_long_one(clips):
    """`segment.join=span` (the default): a piece is the recording itself from its first chunk's
    start to its last chunk's end, pauses kept, at most max_s long; a pause over max_gap_s (or
    a chunk that would make the piece too long) starts the next piece, and is never decoded."""
    a, b, c = (u.audio for u in clips[:3])
    audio = np.concatenate([_gap(1), a, _gap(1.5), b, _gap(8), c, _gap(1)])
    chunks = segment.speech(audio, Segmenting("vad"))
    assert len(chunks) == 3
    one = segment.pieces(audio, Segmenting("vad"), windowed=True)  # every pause under 10 s
    assert len(one) == 1 and one[0].spans == ((chunks[0][0], chunks[2][1]),)
    assert np.array_equal(one[0].audio, audio[chunks[0][0]:chunks[2][1]])  # pauses kept
    two = segment.pieces(audio, Segmenting("vad", max_gap_s=5.0), windowed=True)
    assert [p.spans for p in two] == [((chunks[0][0], chunks[1][1]),),
                                      ((chunks[2][0], chunks[2][1]),)]
    short = segment.pieces(audio, Segmenting("vad", max_s=a.size / SR + 1.5), windowed=True)
    assert len(short) == 3 and all(p.duration_s <= a.size / SR + 1.5 for p in short)
    glued = segment.pieces(audio, Segmenting("vad", join="speech"), windowed=True)
    assert len(glued) == 1 and glued[0].audio.size == sum(e - s for s, e in chunks)


def test_the_vad_hears_no_speech_in_the_hallucination_probes():
    assert all(segment.speech(p.audio, Segmenting("vad")) == [] for p in probes())


def test_sequential_windows_are_cut_at_the_quietest_moment():
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(70 * SR)).astype(np.float32)
    for quiet in (27.2, 54.0):
        audio[int(quiet * SR):int((quiet + 0.3) * SR)] *= 0.01
    cuts = segment.quiet_cuts(audio)
    assert cuts[0][0] == 0 and cuts[-1][1] == audio.size
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(cuts, cuts[1:]))  # no gap, no overlap
    assert all(e - s <= 30 * SR for s, e in cuts) and len(cuts) == 3
    assert 27.2 < cuts[0][1] / SR < 27.5 and 54.0 < cuts[1][1] / SR < 54.3  # in the quiet
    one = segment.pieces(audio[:20 * SR], Segmenting(), windowed=True)
    assert len(one) == 1 and one[0].audio.size == 20 * SR
    assert len(segment.pieces(audio, Segmenting(), windowed=False)) == 1  # HF seeks itself


def test_segment_and_batch_recipes_are_checked_and_planned():
    with pytest.raises(RecipeError, match=r"`segment.threshold` must be in \(0, 1\)"):
        Recipe.parse("segment.method=vad,segment.threshold=1.0")
    with pytest.raises(RecipeError, match="`segment.pad_s` must leave room"):
        Recipe.parse("segment.method=vad,segment.max_s=2,segment.pad_s=1")
    with pytest.raises(RecipeError, match=r"`decode.batch` must be in \[1, 64\]"):
        Recipe.parse("decode.batch=0")
    with pytest.raises(RecipeError, match="`segment.method` must be one of"):
        Recipe.parse("segment.method=energy")
    with pytest.raises(RecipeError, match="`segment.join` must be one of"):
        Recipe.parse("segment.method=vad,segment.join=overlap")
    with pytest.raises(RecipeError, match=r"`segment.max_gap_s` must be in \[0, 30\]"):
        Recipe.parse("segment.method=vad,segment.max_gap_s=-1")
    # the gap rule means nothing to glued speech: the same plan, measured once
    glued = Recipe.parse("segment.method=vad,segment.join=speech")
    assert (plan_for(Recipe.parse("segment.method=vad,segment.join=speech,segment.max_gap_s=3"))
            == plan_for(glued))
    assert [c.canonical() for c in glued.configs()] == [
        c.canonical() for c in Recipe.parse("segment.method=vad,segment.join=speech,"
                                            "segment.max_gap_s=3").configs()]
    assert "pauses <= 10 s kept" in Recipe.parse("segment.method=vad").describe()
    assert Recipe.parse("segment.threshold=0.3,segment.max_s=10").is_baseline  # sequential
    r = Recipe.parse("segment.method=vad,segment.max_s=12,segment.pad_s=0.1,decode.batch=4")
    assert not r.is_baseline and "VAD segments <= 12 s" in r.describe()
    plan = plan_for(r)
    assert plan.segment == Segmenting("vad", 12.0, 0.5, 0.16, 0.1) and plan.batch == 4
    assert "batch 4" in plan.describe() and plan_for(Recipe()).batch == 1
    with pytest.raises(ValueError, match="`segment.max_s` must be in"):
        Segmenting("vad", max_s=31)


def test_groups_keep_a_long_recording_alone_and_batch_short_clips_of_one_language():
    durs = [2, 3, 40, 1, 1, 1, 2, 2]
    langs = ["ru"] * 6 + ["en", "en"]
    assert batch.groups(durs, langs, 3) == [[0, 1], [2], [3, 4, 5], [6, 7]]
    assert batch.groups(durs, langs, 1) == [[i] for i in range(8)]
    # a stream: recordings share it, `batch` at a time, one language each
    assert batch.groups(durs, langs, 3, stream=True) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert batch.groups([40, 50, 60, 2], ["ru"] * 4, 2, stream=True) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("recipe", ["decode.loop=greedy", "segment.method=vad"])
def test_batched_pieces_give_the_texts_of_pieces_decoded_one_by_one(tiny, clips, recipe):
    model, proc = tiny
    audios = [np.concatenate([c.audio, _gap(2.0), clips[-1 - i].audio]) for i, c in
              enumerate(clips[:3])]
    one = batch.transcribe_many(model, proc, audios, _plan(recipe), language="ru")
    many = batch.transcribe_many(model, proc, audios, _plan(recipe + ",decode.batch=4"),
                                 language="ru")
    assert [h.text for h in many] == [h.text for h in one] and all(h.text for h in one)
    assert [h.ids for h in many] == [h.ids for h in one]
    # the shapes warmed before timing. Fixed batches (generate): 3 pieces or more in batches
    # of 4, then 1 each. A stream (greedy): one per row count (4 or fewer pieces) and window.
    pieces = sum(h.pieces for h in one)
    plan = _plan(recipe + ",decode.batch=4")
    shapes = batch.warm(model, proc, [audios, [audios[0]]], ["ru", "ru"], plan)
    if decode.streams(plan):
        assert shapes == len({min(4, pieces), min(4, one[0].pieces)})
    else:
        assert shapes == len({min(4, pieces - 4 * b) for b in range(-(-pieces // 4))} | {
            one[0].pieces})


@pytest.mark.parametrize("recipe", [
    "decode.loop=greedy,decode.timestamps=true,decode.no_repeat_ngram=2,encoder.window=auto",
    "decode.loop=greedy,decode.compile=script,decode.timestamps=true,encoder.window=auto"])
def test_a_stream_gives_each_clip_the_tokens_it_gets_alone(tiny, clips, recipe):
    """`decode.stream`: 2 rows for 5 clips and one that follows clip 1 (`then`), each row
    refilled when its clip ends (own caps), each clip on its own window, each row at its own
    position: every clip gets the tokens of its decoding alone, timestamps included, in fewer
    steps than one row at a time."""
    model, proc = tiny
    audios = [c.audio for c in clips] + [clips[0].audio[:SR]]
    durs, caps = [a.size / SR for a in audios], [3, 8, 5, 2, 6]
    plan = plan_for(Recipe.parse(recipe + ",decode.batch=2"))
    assert decode.streams(plan)
    ended = []

    def then(k, row):  # after clip 1: one more, 1.5 s of clip 2, 4 tokens
        ended.append((k, list(row)))
        return (audios[2][:3 * SR // 2], 1.5, 4) if k == 1 else None

    got = decode.stream(model, proc, audios, durs, plan, language="ru", task="transcribe",
                        caps=caps, then=then)
    steps = decode.runtime(model, plan, 2).last.steps
    assert len(got) == len(audios) == 6 and sorted(ended) == list(enumerate(got))
    one = dataclasses.replace(plan, batch=1)
    for a, d, cap, row in zip(audios, durs, caps, got):
        feats = decode.features(model, proc, [a], [d], one)
        assert row == decode.decode(model, feats, one, language="ru", task="transcribe",
                                    cap=cap, keep_timestamps=True)[0]
    assert len({a.size for a in audios}) == 6 and [len(r) for r in got] == caps
    prompt = len(decode.prompt_ids(model, "ru", "transcribe", True))
    assert steps < sum(caps) + len(caps) * prompt  # the rows ran side by side


def test_speedup_is_latency_on_clips_and_throughput_on_recordings_that_share_a_stream():
    from sweep.measure import scoring

    def rows(lat, wall, dur):
        return [{"latency_s": a, "wall_s": w, "duration_s": d} for a, w, d in zip(lat, wall, dur)]
    clips = rows([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [3, 4, 5])
    batched = rows([1.5, 1.5, 1.5], [0.5, 0.5, 0.5], [3, 4, 5])  # one batch of 3
    assert scoring.speedup(clips, batched) == pytest.approx(2.0 / 1.5)  # what each waits
    base = rows([8.0, 9.0, 10.0], [8.0, 9.0, 10.0], [60, 70, 80])
    stream = rows([6.0, 6.0, 6.0], [2.0, 2.0, 2.0], [60, 70, 80])  # one stream of 3: 6 s
    assert scoring.speedup(base, stream) == pytest.approx(27.0 / 6.0)  # not 9 / 6


def test_the_rest_after_an_early_last_timestamp_is_decoded_again():
    """`batch.rest`: a piece whose timestamped decoding ended on its own more than REST_MIN_S
    before the piece's end gives the audio after its last timestamp, placed where it is in the
    recording; a decoding that reached the end, hit its cap or has no timestamp gives none."""
    first = 50364
    piece = segment.Piece(np.arange(10 * SR, dtype=np.float32), ((5 * SR, 15 * SR),))
    row = [first, 10, 11, first + 100, first + 100, 12, first + 150]  # ... 2.0 s, then 3.0 s
    got = batch.rest(piece, row, first, capped=False)
    assert got.spans == ((8 * SR, 15 * SR),) and got.audio[0] == 3 * SR
    assert got.audio.size == 7 * SR
    assert batch.rest(piece, row, first, capped=True) is None  # cut off: not an ending
    assert batch.rest(piece, [10, 11], first, capped=False) is None
    assert batch.rest(piece, [first, 10, first + 460], first, capped=False) is None  # 9.2 s
    assert batch.rest(piece, [first], first, capped=False) is None  # no progress


def test_timestamped_vad_pieces_give_text_only_and_every_piece(tiny, clips):
    model, proc = tiny
    audios = [np.concatenate([c.audio, _gap(2.0), clips[-1 - i].audio]) for i, c in
              enumerate(clips[:2])]
    plain = batch.transcribe_many(model, proc, audios, _plan("segment.method=vad,"
                                  "decode.loop=greedy"), language="ru")
    ts = batch.transcribe_many(model, proc, audios, _plan("segment.method=vad,"
                               "decode.loop=greedy,decode.timestamps=true"), language="ru")
    first = model.generation_config.no_timestamps_token_id + 1
    for a, b in zip(plain, ts):
        assert b.pieces >= a.pieces and all(t < first for t in b.ids) and "<|" not in b.text


def test_a_long_recording_is_decoded_and_scored_whole(tiny, clips):
    model, proc = tiny
    (rec,) = build(clips, LongOptions(n=1, min_s=40, max_s=40, stretch_s=(5, 6), seed=1))
    ev = EvalSet("long", [Utterance(rec.id, rec.audio, rec.text, "ru", rec.duration_s)])
    base = evaluate.measure(model, proc, ev, warmup=0, options=_plan(""))
    greedy = evaluate.measure(model, proc, ev, warmup=0, options=_plan("decode.loop=greedy"))
    vad = evaluate.measure(model, proc, ev, warmup=0,
                           options=_plan("segment.method=vad,segment.max_s=10"))
    for m in (base, greedy, vad):
        (row,) = m.utterances
        assert row["duration_s"] > 30 and row["reference"] == rec.text and row["hypothesis"]
        assert m.figures["n_utterances"] == 1 and m.figures["wer"] > 0
    # HF generate's own long-form decoding (one call), windows for the greedy loop, and
    # speech pieces of at most 10 s for the VAD
    assert [m.utterances[0]["pieces"] for m in (base, greedy)] == [1, 2]
    assert vad.utterances[0]["pieces"] >= 40 * 0.6 / 10


def test_throughput_is_the_sets_audio_over_its_wall_time(tiny, clips):
    model, proc = tiny
    ev = EvalSet("four", list(clips))
    m = evaluate.measure(model, proc, ev, warmup=0, options=_plan("decode.batch=2"))
    rows, f = m.utterances, m.figures
    assert [r["latency_s"] for r in rows[::2]] == [r["latency_s"] for r in rows[1::2]]
    assert all(r["wall_s"] == pytest.approx(r["latency_s"] / 2) for r in rows)
    wall, audio = sum(r["wall_s"] for r in rows), sum(u.duration_s for u in clips)
    assert f["throughput"] == pytest.approx(audio / wall) and f["rtf"] == pytest.approx(
        wall / audio)
    one = evaluate.measure(model, proc, ev, warmup=0, options=_plan(""))
    assert one.figures["throughput"] == pytest.approx(
        audio / sum(r["latency_s"] for r in one.utterances))
    assert [r["hypothesis"] for r in rows] == [r["hypothesis"] for r in one.utterances]


def test_probes_go_through_the_segmentation(tiny):
    model, proc = tiny
    heard, texts = evaluate.hallucinations(model, proc, probes(), language="ru",
                                           options=_plan(""))
    assert heard > 0.5  # random weights make words up for anything
    none, texts = evaluate.hallucinations(model, proc, probes(), language="ru",
                                          options=_plan("segment.method=vad"))
    assert none == 0 and texts == [""] * len(probes())  # no speech: nothing decoded


def test_evaluate_json_reports_throughput_for_recipe_and_baseline(tiny_checkpoint,
                                                                   small_manifest, tmp_path):
    import json

    out = tmp_path / "out.json"
    assert evaluate_main(["--model", tiny_checkpoint, "--dataset", small_manifest, "--recipe",
                          "segment.method=vad,decode.batch=3", "--json", str(out),
                          "--threads", "1", "--warmup", "0"]) == 0
    d = json.loads(out.read_text())
    assert d["throughput"] > 0 and d["baseline"]["throughput"] > 0
    assert d["throughput"] == pytest.approx(
        sum(r["duration_s"] for r in d["utterances"]) / sum(r["wall_s"] for r in d["utterances"]))
    assert len({r["latency_s"] for r in d["utterances"]}) == 1  # one batch of three


def test_probe_rate_is_judged_against_the_baselines_own_per_language(tiny, clips):
    from sweep.results import pareto

    model, proc = tiny
    mixed = [dataclasses.replace(c, lang="en" if i % 2 else "ru") for i, c in enumerate(clips)]
    ev = EvalSet("two languages", mixed)
    few = probes()[:3]
    base = evaluate.measure(model, proc, ev, warmup=0, options=_plan(""), probes=few)
    vad = evaluate.measure(model, proc, ev, warmup=0, options=_plan("segment.method=vad"),
                           probes=few)
    assert set(base.figures["hallucination_by_lang"]) == {"ru", "en"}
    assert len(base.probes) == 6 and {p["id"].rsplit("@", 1)[1] for p in base.probes} == {
        "ru", "en"}
    assert vad.figures["hallucination_by_lang"] == {"ru": 0.0, "en": 0.0}
    worse = evaluate.compare(base, vad)["hallucination_excess"]
    better = evaluate.compare(vad, base)["hallucination_excess"]
    assert better == -min(base.figures["hallucination_by_lang"].values()) < 0 < worse
    rule = {"max_extra_hallucination": 0.0}
    assert pareto.feasible({"hallucination_excess": better}, rule)
    assert not pareto.feasible({"hallucination_excess": worse}, rule)
    assert not pareto.feasible({}, rule)  # not measured: not judged feasible
