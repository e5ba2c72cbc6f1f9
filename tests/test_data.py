"""sweep.inputs.data: manifests, HF datasets on disk, resampling, skips, embedded and shared
sets."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sweep.inputs import data
from sweep.inputs.data import DataError, calibration_set, load_eval_set


def tone(path: Path, seconds=1.0, sr=16000, freq=440.0, channels=1) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr)
    return path


def write_manifest(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_manifest_loads_relative_paths_in_order(tmp_path):
    for i in range(3):
        tone(tmp_path / f"a{i}.flac", seconds=0.5 + i / 4)
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio": f"a{i}.flac", "text": f"раз {i}", "lang": "ru", "extra": 1} for i in range(3)])
    es = load_eval_set(str(m))
    assert [u.id for u in es] == ["a0.flac", "a1.flac", "a2.flac"] and len(es) == 3
    assert es.skipped == 0 and es.utterances[1].text == "раз 1"
    assert es.utterances[2].duration_s == pytest.approx(1.0)
    assert all(u.audio.dtype == np.float32 and u.audio.ndim == 1 for u in es)
    assert [u.id for u in load_eval_set(str(m), max_samples=2)] == ["a0.flac", "a1.flac"]
    assert [u.id for u in load_eval_set(str(m), exclude_ids={"a1.flac"})] == ["a0.flac", "a2.flac"]
    assert load_eval_set(str(m)).fingerprint == es.fingerprint
    assert load_eval_set(str(m), max_samples=2).fingerprint != es.fingerprint


def test_manifest_key_error_comes_before_any_audio_read(tmp_path, monkeypatch):
    tone(tmp_path / "ok.flac")
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio": "ok.flac", "text": "да"},
        {"audio": "does-not-exist.flac", "text": "нет"},  # would be skipped if audio were read
        "",
        {"audio": "ok.flac", "txt": "typo"},
    ])
    read = []
    import soundfile  # sweep.data imports it where audio is decoded

    monkeypatch.setattr(soundfile, "read", lambda *a, **k: read.append(a) or (_ for _ in ()).throw(
        AssertionError("audio read before validation")))
    with pytest.raises(DataError) as e:
        load_eval_set(str(m))
    msg = str(e.value)
    assert "line 4" in msg and str(m) in msg and "`text`" in msg and "`audio`" in msg
    assert read == []


def test_manifest_bad_json_and_missing_file(tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", ['{"audio": "a.flac", "text": "x"}', "{not json"])
    with pytest.raises(DataError, match="line 2"):
        load_eval_set(str(m))
    with pytest.raises(DataError, match="does not exist"):
        load_eval_set(str(tmp_path / "nope.jsonl"))


def test_bad_audio_and_empty_text_are_skipped_and_counted(tmp_path):
    tone(tmp_path / "good.flac")
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio": "corrupt.flac", "text": "битый файл"},
        {"audio": "missing.flac", "text": "нет файла"},
        {"audio": "good.flac", "text": "  "},
        {"audio": "good.flac", "text": "хороший"},
    ])
    es = load_eval_set(str(m))
    assert [u.text for u in es] == ["хороший"]
    assert es.skipped == 3 and len(es.skipped_reasons) == 3
    assert "corrupt.flac: unreadable audio" in es.skipped_reasons[0]
    assert "missing.flac" in es.skipped_reasons[1] and "empty reference" in es.skipped_reasons[2]


def test_empty_set_raises(tmp_path):
    (tmp_path / "bad.flac").write_bytes(b"junk")
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "bad.flac", "text": "x"}])
    with pytest.raises(DataError, match="no usable utterance"):
        load_eval_set(str(m))
    with pytest.raises(DataError, match="no usable utterance"):
        load_eval_set("embedded", language="en")  # the embedded set is all Russian


def test_resampled_to_16k_mono_with_right_duration_and_frequency(tmp_path):
    tone(tmp_path / "s.wav", seconds=1.5, sr=44100, freq=1000.0, channels=2)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "s.wav", "text": "тон"}])
    (u,) = load_eval_set(str(m)).utterances
    assert u.audio.dtype == np.float32 and u.audio.ndim == 1
    assert u.audio.size == 24000 and u.duration_s == pytest.approx(1.5)
    spectrum = np.abs(np.fft.rfft(u.audio))
    assert np.fft.rfftfreq(u.audio.size, 1 / 16000)[spectrum.argmax()] == pytest.approx(1000, abs=2)
    assert np.abs(u.audio[2000:-2000]).max() == pytest.approx(0.3, abs=0.01)  # no gain change


def test_language_filter_on_manifest(tmp_path):
    tone(tmp_path / "a.flac")
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio": "a.flac", "text": "привет", "lang": "ru"},
        {"audio": "a.flac", "text": "hello", "lang": "en"},
        {"audio": "a.flac", "text": "без языка"}])
    es = load_eval_set(str(m), language="ru")
    assert [(u.text, u.lang) for u in es] == [("привет", "ru"), ("без языка", "ru")]


@pytest.fixture()
def hf_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    clips = [str(tone(tmp_path / f"c{i}.wav", seconds=0.5, sr=22050)) for i in range(5)]
    texts = ["один", "два", "", "четыре", "пять"]
    test = datasets.Dataset.from_dict({"audio": clips[:3], "sentence": texts[:3]})
    train = datasets.Dataset.from_dict({"audio": clips[3:], "sentence": texts[3:]})
    # Bytes embedded in the first split, plain paths in the other: both must decode.
    test = test.cast_column("audio", datasets.Audio(decode=False)).map(
        lambda r: {"audio": {"bytes": Path(r["audio"]["path"]).read_bytes(), "path": None}})
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(tmp_path / "ds")
    return str(tmp_path / "ds")


def test_hf_dataset_from_disk(hf_dir):
    es = load_eval_set(hf_dir, text_column="sentence", language="ru")
    assert [u.text for u in es] == ["один", "два"] and es.skipped == 1
    assert [u.id for u in es] == ["test/0", "test/1"] and es.utterances[0].lang == "ru"
    assert es.utterances[0].audio.size == 8000
    train = load_eval_set(hf_dir, split="train", text_column="sentence", max_samples=1)
    assert [u.text for u in train] == ["четыре"]


def test_hf_dataset_errors_name_what_exists(hf_dir, tmp_path):
    with pytest.raises(DataError, match=r"split.*'validation'.*\['test', 'train'\]"):
        load_eval_set(hf_dir, split="validation", text_column="sentence")
    with pytest.raises(DataError, match=r"`text_column` 'text'.*sentence"):
        load_eval_set(hf_dir)
    with pytest.raises(DataError, match=r"`audio_column` 'speech'.*\['audio', 'sentence'\]"):
        load_eval_set(hf_dir, audio_column="speech", text_column="sentence")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a saved HF dataset"):
        load_eval_set(str(tmp_path / "plain"))


def test_hf_calibration_is_disjoint(hf_dir):
    cal = calibration_set(hf_dir, n=1, text_column="sentence", eval_max_samples=1)
    assert [u.text for u in cal] == ["два"]
    other = calibration_set(hf_dir, n=8, text_column="sentence")  # eval takes all of `test`
    assert [u.id for u in other] == ["train/0", "train/1"]


def test_embedded_set():
    es = load_eval_set()
    assert 35 <= len(es) <= 45 and es.skipped == 0
    assert all(u.text.strip() and u.lang == "ru" for u in es)
    assert all(u.text == u.text.lower() and "ё" not in u.text for u in es)
    assert all(u.audio.dtype == np.float32 and 0.8 < u.duration_s < 6 for u in es)
    assert all(np.sqrt(np.mean(u.audio**2)) > 0.01 for u in es)  # not silent
    assert len({u.text for u in es}) == len(es)
    assert sum(p.stat().st_size for p in data.EMBEDDED_DIR.iterdir()) < 2_000_000
    assert len(load_eval_set(max_samples=5)) == 5


def test_embedded_calibration_is_disjoint():
    ev, cal = load_eval_set(), calibration_set(n=8)
    assert len(cal) == 8
    assert not {u.text for u in ev} & {u.text for u in cal}
    assert not {u.id for u in ev} & {u.id for u in cal}


def test_manifest_calibration_takes_the_following_utterances(tmp_path):
    tone(tmp_path / "a.flac")
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": "a.flac", "text": f"т{i}", "id": f"u{i}"}
                                             for i in range(6)])
    cal = calibration_set(str(m), n=2, eval_max_samples=3)
    assert [u.id for u in cal] == ["u3", "u4"]
    with pytest.raises(DataError, match="eval_max_samples"):
        calibration_set(str(m))


def test_shared_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPER_SHARED", str(tmp_path))
    (tmp_path / "speech").mkdir()
    write_manifest(tmp_path / "speech" / "manifest.jsonl", [])
    assert data.shared_dir() == tmp_path


def test_shared_manifest(speech_manifest):
    es = load_eval_set(str(speech_manifest))
    assert len(es) == 29 and es.skipped == 0
    ru = load_eval_set(str(speech_manifest), language="ru")
    assert len(ru) == 19 and {u.lang for u in ru} == {"ru"}
    assert abs(sum(u.duration_s for u in es) - 131) < 2


def test_unknown_hub_dataset_is_a_data_error():
    with pytest.raises(DataError, match="hyper-tests/no-such-dataset"):
        load_eval_set("hyper-tests/no-such-dataset")


def test_joined_manifest_sets_are_one_set(tmp_path, monkeypatch):
    for i in range(2):
        tone(tmp_path / f"j{i}.flac", seconds=0.5)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio": f"j{i}.flac", "text": f"слово {i}",
                                               "lang": "ru"} for i in range(2)])
    es = load_eval_set(f"{m}+embedded", language="ru")
    emb = load_eval_set("embedded", language="ru")
    assert [u.id for u in es] == ["j0.flac", "j1.flac", *(u.id for u in emb)]
    assert es.name == f"{m}+embedded"
    monkeypatch.chdir(tmp_path)  # relative parts become absolute for the Ray workers
    assert data.absolute("m.jsonl+embedded") == f"{m.resolve()}+embedded"
    assert data.absolute("embedded") == "embedded"
    with pytest.raises(DataError, match="unique across the joined sets"):
        load_eval_set(f"{m}+{m}")
    with pytest.raises(DataError, match="must be embedded, shared or a JSONL manifest"):
        load_eval_set("embedded+someone/hub-set")
    with pytest.raises(DataError, match="no calibration data"):  # the evaluation takes all
        calibration_set(f"{m}+embedded")
    cal = calibration_set(f"{m}+embedded", n=2, eval_max_samples=3)
    assert [u.id for u in cal] == [u.id for u in emb.utterances[1:3]]
