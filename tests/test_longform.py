"""Long-form sets (issue #28): recordings built from utterances with pauses and stretches of
silence or noise, the embedded long set loading offline, and the builder's command."""

import json

import numpy as np
import pytest

from sweep.inputs import longform
from sweep.inputs.data import Utterance, calibration_set, load_eval_set
from sweep.inputs.longform import LongformError, LongOptions, build

SR = 16000


def _utts(n=5):
    """Tones of different pitch and length stand in for speech: each is recognisable."""
    out = []
    for i in range(n):
        d = 1.0 + 0.5 * i
        t = np.arange(int(d * SR)) / SR
        out.append(Utterance(f"u{i}", (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t))
                             .astype(np.float32), f"word{i} w{i}", "ru", d))
    return out


def test_build_joins_utterances_with_pauses_and_stretches_where_it_says():
    utts = {u.id: u for u in _utts()}
    opts = LongOptions(n=3, min_s=20, max_s=30, stretch_every=2, stretch_s=(3, 4), seed=5)
    recs = build(list(utts.values()), opts)
    assert [r.id for r in recs] == ["long_01", "long_02", "long_03"]
    assert sorted(round(r.duration_s) for r in recs) == sorted(
        round(r.duration_s) for r in build(list(utts.values()), opts))  # seeded
    for r in recs:
        assert 20 <= r.duration_s <= 30 + 5.0  # a last pause and utterance may pass it
        assert r.text == " ".join(utts[p[2]].text for p in r.parts)  # the whole text
        spans = sorted([(a, b) for a, b, _ in r.parts] + [(a, b) for a, b, _ in r.stretches])
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # no overlap
        assert r.stretches and all(3 <= b - a <= 4 for a, b, _ in r.stretches)
        for a, _, uid in r.parts:  # the utterance's own samples, where the part says
            got = r.audio[int(round(a * SR)):int(round(a * SR)) + utts[uid].audio.size]
            assert np.allclose(got, utts[uid].audio, atol=1e-6)
        for a, b, kind in r.stretches:
            x = r.audio[int(a * SR) + 10:int(b * SR) - 10].astype(np.float64)
            rms = np.sqrt(np.mean(x ** 2))
            assert rms == 0 if kind == "silence" else abs(20 * np.log10(rms) + 45) < 1.0
    other = build(list(utts.values()), LongOptions(n=3, min_s=20, max_s=30, seed=6))
    assert [r.text for r in other] != [r.text for r in recs]


def test_no_clip_repeats_across_recordings_until_every_clip_was_used(tmp_path):
    """Recordings sharing clips would be scored as independent: the builder uses each clip once
    before any twice, across the whole set, and `clip_uses` counts it from the manifest."""
    utts = _utts(8)
    recs = build(utts, LongOptions(n=4, min_s=6, max_s=9, stretch_every=0, seed=3))
    used = [p[2] for r in recs for p in r.parts]
    assert len(used) > len(utts)  # the pool ran out once: reuse starts only after that
    assert len(set(used[:len(utts)])) == len(utts)
    assert len(set(used[len(utts):2 * len(utts)])) == len(used[len(utts):2 * len(utts)])
    manifest = longform.write(recs, tmp_path)
    uses = longform.clip_uses(manifest)
    assert sum(uses.values()) == len(used) and set(uses) == {u.id for u in utts}
    assert max(uses.values()) == 2


@pytest.mark.parametrize("kw, rule", [
    ({"n": 0}, "`n` must be an integer >= 1"),
    ({"min_s": 50, "max_s": 40}, "min_s <= max_s"),
    ({"pause_s": (2.0, 1.0)}, "`pause_s` must be a range"),
    ({"kinds": ("music",)}, "`kinds` must be some of"),
])
def test_options_are_checked_naming_the_rule(kw, rule):
    with pytest.raises(LongformError, match=rule):
        LongOptions(**kw)
    with pytest.raises(LongformError, match="need utterances with audio and text"):
        build([Utterance("a", np.zeros(0, np.float32), "x", "ru", 0.0)])


def test_embedded_long_loads_offline_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ev = load_eval_set("embedded-long")
    assert ev.name == "embedded-long" and len(ev) == 6 and not ev.skipped
    assert all(45 <= u.duration_s <= 120 for u in ev) and ev.total_s > 400
    (manifest,) = tmp_path.glob("longform/*/manifest.jsonl")
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    for u, row in zip(ev, rows):  # one row per recording, its reference the whole text
        assert u.text == row["text"] and len(u.text.split()) > 20 and u.lang == "ru"
        assert row["stretches"] and row["parts"]
    assert sum(len(r["stretches"]) for r in rows) >= 10
    stamp = manifest.stat().st_mtime_ns
    again = load_eval_set("embedded-long")
    assert manifest.stat().st_mtime_ns == stamp and again.fingerprint == ev.fingerprint
    assert np.array_equal(again.utterances[0].audio, ev.utterances[0].audio)
    # nothing of the evaluation set is calibrated on
    assert calibration_set("embedded-long").name == "embedded:calibration"
    assert longform.silence_spans(manifest)[ev.utterances[0].id] == [
        tuple(s) for s in rows[0]["stretches"]]


def test_command_builds_recordings_any_set_reads(small_manifest, tmp_path, capsys):
    from sweep.inputs.longform.__main__ import main

    assert main(["--dataset", small_manifest, "--out", str(tmp_path), "--n", "2",
                 "--min-s", "12", "--max-s", "15", "--stretch-every", "1"]) == 0
    assert "wrote 2 recordings" in capsys.readouterr().out
    ev = load_eval_set(str(tmp_path / "manifest.jsonl"))
    assert len(ev) == 2 and all(u.duration_s >= 12 for u in ev)
    assert main(["--dataset", small_manifest, "--out", str(tmp_path), "--min-s", "9",
                 "--max-s", "3"]) == 2
    assert "min_s <= max_s" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_vad_recipe_of_the_long_space_hears_nothing_on_the_stretches(real_model,
                                                                                tmp_path,
                                                                                monkeypatch):
    """The `long` space's VAD start, against sequential decoding (the baseline), on the
    silence, noise and hum stretches of embedded-long, each transcribed where it is, alone:
    the baseline makes words up on them (as on the probes), the VAD recipe decodes nothing.
    (Within the whole recordings whisper-base's timestamped long-form decoding stays quiet on
    these stretches: docs/longform.md gives the measured figures.)"""
    import copy

    from sweep.inputs.data import embedded_long
    from sweep.measure import batch, scoring
    from sweep.measure.compress import apply_recipe
    from sweep.measure.decode import Plan
    from sweep.search.space import load_space
    from sweep.techniques.recipe import Recipe

    monkeypatch.setenv("HYPER_CACHE", str(tmp_path))  # built here, offline, from the clips
    ev = {u.id: u for u in load_eval_set("embedded-long")}
    spans = longform.silence_spans(embedded_long())
    stretches = [ev[rid].audio[int(a * SR):int(b * SR)] for rid, ss in spans.items()
                 for a, b, _ in ss]
    assert len(stretches) >= 10
    start = next(p for p in load_space("long").start_points()
                 if p.get("segment.method") == "vad" and p.get("encoder.window") == "full")
    applied = apply_recipe(copy.deepcopy(real_model.model), Recipe.from_flat(start))

    def words(model, plan) -> list[int]:
        heard = batch.transcribe_many(model, real_model.processor, stretches, plan,
                                      language="ru")
        return [len(scoring.normalize(h.text, "ru", "none").split()) for h in heard]

    seq, vad = words(real_model.model, Plan.default()), words(applied.model, applied.options)
    print(f"\n{len(stretches)} stretches: sequential hears {sum(seq)} words on "
          f"{sum(map(bool, seq))} of them; {Recipe.from_flat(start).describe()}: {sum(vad)}")
    assert sum(vad) < sum(seq) and sum(vad) == 0


def _unlabelled(small_manifest, tmp_path):
    rows = [json.loads(x) for x in open(small_manifest, encoding="utf-8")]
    path = tmp_path / "nolabels.jsonl"
    path.write_text("".join(json.dumps({"id": f"n{i}", "audio": r["audio"], "lang": "ru"})
                            + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return path


def test_a_set_without_references_is_scored_by_agreement_never_as_wer(
        tiny_checkpoint, small_manifest, tmp_path, capsys):
    from sweep import launch
    from sweep.inputs.data import DataError
    from sweep.evaluate import main as evaluate_main
    from sweep.measure import evaluate

    path = _unlabelled(small_manifest, tmp_path)
    ev = load_eval_set(str(path))
    assert not ev.labelled and len(ev) == 3 and {u.text for u in ev} == {""}
    with pytest.raises(DataError, match="never mixed"):
        load_eval_set(f"{path}+{small_manifest}")
    out = tmp_path / "out.json"
    assert evaluate_main(["--model", tiny_checkpoint, "--dataset", str(path), "--recipe",
                          "decode.loop=greedy,decode.batch=3", "--json", str(out),
                          "--threads", "1", "--warmup", "0"]) == 0
    d = json.loads(out.read_text())
    assert "agreement WER" in capsys.readouterr().out
    assert not {"wer", "cer", "dwer"} & set(d) and not {"wer", "cer"} & set(d["baseline"])
    assert d["baseline"]["agreement_wer"] == 0.0 and d["agreement_wer"] >= 0.0
    assert d["scored_against"] == evaluate.AGREEMENT
    assert all("baseline_transcript" in r and "reference" not in r for r in d["utterances"])
    assert launch.main(["--space", "quick", "--model", tiny_checkpoint, "--dataset", str(path),
                        "--root", str(tmp_path / "root")]) == 2
    assert "has no references" in capsys.readouterr().err
