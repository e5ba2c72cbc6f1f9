"""Low-rank factorisation from calibration activations (#16): the PCA rank rule, exact factors of
a layer whose outputs are low-rank, the technique on the tiny random Whisper, quantized factors."""

import copy

import pytest
import torch
from torch import nn

from sweep.measure import lowrank
from sweep.measure.compress import CompressError, apply_recipe, layer_type_of
from sweep.measure.modules import set_module
from sweep.techniques.recipe import Recipe, RecipeError

PROMPT = torch.tensor([[50258, 50259, 50359, 50363]])


@pytest.fixture(autouse=True)
def _fast(fast_kernel_choice):
    """Short kernel timings on tiny shapes (conftest's `fast_kernel_choice`)."""


def feats(seed=0):
    return torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(seed))


def calibrate(model):
    for seed in (1, 2):
        model.generate(feats(seed), decoder_input_ids=PROMPT, max_new_tokens=3)


def test_rank_for_energy():
    vals = torch.tensor([4.0, 3.0, 2.0, 1.0])  # shares 0.4, 0.7, 0.9, 1.0
    assert [lowrank.rank_for(vals, e) for e in (0.3, 0.4, 0.7, 0.71, 0.95, 1.0)] == [
        1, 1, 2, 3, 4, 4]
    assert lowrank.break_even(nn.Linear(512, 512)) == 255
    assert lowrank.break_even(nn.Linear(512, 2048)) == 409


def _moments(lin, x, speech=None):
    wrap = lowrank._Moments(lin, speech or {})
    with torch.inference_mode():
        wrap(x)
    mean = wrap.sum / wrap.weight
    return mean, wrap.gram / wrap.weight - torch.outer(mean, mean)


def test_speech_and_padding_weigh_half_each():
    audio = torch.zeros(2, 16000 * 30)
    audio[0, :16000 * 2] = torch.randn(16000 * 2)  # 2 s of speech, then the padding's zeros
    audio[1, :16000 * 10] = torch.randn(16000 * 10)
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    f = fe(list(audio.numpy()), sampling_rate=16000, return_tensors="pt").input_features
    got = [n - lowrank.MARGIN for n in lowrank.speech_positions(f)]  # 50 positions a second
    assert 100 <= got[0] <= 101 and 500 <= got[1] <= 501  # (the STFT's last window overlaps)
    # one clip: 10 speech rows at 1 and 90 padding rows at 0 -> the mean is halfway
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(1)
        lin.bias.zero_()
    x = torch.zeros(1, 100, 1)
    x[0, :10] = 1
    mean, _ = _moments(lin, x, {"n": [10]})
    assert mean.item() == pytest.approx(0.5)
    assert _moments(lin, x)[0].item() == pytest.approx(0.1)  # uniform without speech info


def test_outputs_of_rank_k_are_factored_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    with torch.no_grad():  # outputs vary in 6 directions only (plus the bias)
        lin.weight.copy_(torch.randn(80, 6) @ torch.randn(6, 96))
    x = torch.randn(500, 96)
    new, k = lowrank.factor(lin, *_moments(lin, x), energy=0.999)
    assert k == 6 and new.rank == 6 and (new.in_features, new.out_features) == (96, 80)
    with torch.inference_mode():
        assert torch.allclose(new(x), lin(x), atol=1e-4)
        assert torch.allclose(new.dense()(x), lin(x), atol=1e-4)


def test_full_rank_outputs_stay_dense_and_energy_trades_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(2000, 64) * torch.exp(-torch.arange(64) / 4)  # decaying spectrum
    moments = _moments(lin, x)
    assert lowrank.factor(lin, *moments, energy=1.0)[0] is None  # rank 64 > 31: no saving
    errs = []
    for energy in (0.9, 0.99):
        new, k = lowrank.factor(lin, *moments, energy=energy)
        with torch.inference_mode():
            y = lin(x)
            errs.append(((new(x) - y).norm() / (y - y.mean(0)).norm()).item())
        assert errs[-1] ** 2 <= 1 - energy + 1e-4  # the variance it drops is what it loses
    assert errs[0] > errs[1]


def test_bad_energy_refused():
    with pytest.raises(RecipeError, match=r"`lowrank.energy` must be .*\[0.5, 1\]"):
        Recipe.parse("lowrank.energy=0.2")
    with pytest.raises(RecipeError, match="lowrank.layers"):
        Recipe.parse("lowrank.energy=0.9,lowrank.layers=dec_mlp")
    assert Recipe.parse("lowrank.layers=enc_mlp").is_baseline  # nothing factored at 1.0


def test_lowrank_needs_calibration(tiny_model):
    with pytest.raises(CompressError, match="lowrank needs calibration data"):
        apply_recipe(tiny_model, Recipe.parse("lowrank.energy=0.9"))


@torch.inference_mode()
def _enc(model):
    return model.model.encoder(feats(0)).last_hidden_state


def test_lowrank_factors_the_chosen_encoder_layers(tiny_model):
    ref = _enc(tiny_model)
    loose = apply_recipe(copy.deepcopy(tiny_model), Recipe.parse(
        "lowrank.energy=0.6,lowrank.layers=enc_mlp"), calibrate=calibrate)
    kinds = {layer_type_of(n) for n, m in loose.model.named_modules()
             if isinstance(m, lowrank.LowRankLinear)}
    assert kinds == {"enc_mlp"}
    assert "4/4 layers factored" in loose.notes[-1] and "0.fc1 " in loose.notes[-1]
    tight = apply_recipe(copy.deepcopy(tiny_model), Recipe.parse(
        "lowrank.energy=0.99,lowrank.layers=enc_mlp"), calibrate=calibrate)

    def ranks(applied):  # "0.fc1 5/64, ..." -> {layer: rank}
        pairs = applied.notes[-1].split("rank/full: ")[1].split(", ")
        return {p.split()[0]: int(p.split()[1].split("/")[0]) for p in pairs}

    assert all(ranks(tight)[k] >= r for k, r in ranks(loose).items())
    assert ranks(tight) != ranks(loose)

    def err(m):
        return ((_enc(m) - ref).norm() / ref.norm()).item()

    assert err(tight.model) < err(loose.model) < 1.0


def test_factors_are_quantized_with_their_layer_type(tiny_model):
    applied = apply_recipe(tiny_model, Recipe.parse(
        "lowrank.energy=0.6,lowrank.layers=enc_mlp,quant.enc_mlp=int8_token"),
        calibrate=calibrate)
    fc1 = tiny_model.model.encoder.layers[0].fc1
    assert isinstance(fc1, lowrank.LowRankLinear)
    assert {type(fc1.down).__name__, type(fc1.up).__name__} <= {"TokenInt8Linear",
                                                                  "RowInt8Linear"}
    assert layer_type_of("model.encoder.layers.0.fc1.down") == "enc_mlp"
    # per shape, the faster here of int8_token's implementations
    assert set(applied.kernels["enc_mlp"].split("+")) <= {"torch._int_mm(per-token)",
                                                          "fbgemm(per-token rescaled)"}
    assert "low-rank 0.6 (enc_mlp), int8 tok (enc_mlp)" == Recipe.parse(
        "lowrank.energy=0.6,lowrank.layers=enc_mlp,quant.enc_mlp=int8_token").describe()


def test_dense_module_swaps_back(tiny_model):
    lin = tiny_model.model.encoder.layers[0].fc2
    x = torch.randn(30, lin.in_features)
    new, _ = lowrank.factor(lin, *_moments(lin, x), energy=0.7)
    set_module(tiny_model, "model.encoder.layers.0.fc2", new)
    with torch.inference_mode():
        assert torch.allclose(new.dense()(x), new(x), atol=1e-5)


def test_stored_round_trip_with_token_int8_and_fallback(tiny_checkpoint, tmp_path):
    """Factors, per-token int8 factors, the fallback's choice: exported as they ran (the
    calibration decides at export), loaded without audio, the same logits."""
    import json

    import sweep
    from sweep.inputs.data import calibration_set
    from sweep.inputs.models import load_model
    from sweep.measure import evaluate
    from sweep.ship.checkpoint import save_checkpoint

    tiny = load_model(tiny_checkpoint)
    clips = calibration_set("embedded", n=1)

    def calib(m):
        for u in clips:
            evaluate.transcribe(m, tiny.processor, u, language="ru")

    recipe = Recipe.parse("lowrank.energy=0.8,lowrank.layers=enc_mlp,quant.enc_mlp=int8_token,"
                          "quant.dec_mlp=dynamic_int8,quant.fallback_blocks=1")
    trial = apply_recipe(copy.deepcopy(tiny.model), recipe, calibrate=calib)
    save_checkpoint(tiny.model, tiny.processor, recipe, tmp_path / "ck", calibrate=calib,
                    trial_kernels=trial.kernels)
    info = json.loads((tmp_path / "ck" / "recipe.json").read_text())
    kinds = {s["kind"] for s in info["modules"].values()}
    assert "lowrank_linear" in kinds
    specs = json.dumps(info["modules"])  # factors' own specs nest inside theirs
    # per-token int8 (on _int_mm with VNNI, rescaled rows on fbgemm without), the bf16 fallback
    assert any(k in specs for k in ("token_int8_linear", "row_int8_linear"))
    assert "cast_linear" in specs
    assert info["baked"] == ["lowrank", "quant"] and info["reapplied"] == []
    ck = sweep.load(tmp_path / "ck")
    assert ck.kernels == trial.kernels
    for name, mod in trial.model.named_modules():
        assert type(ck.model.get_submodule(name)) is type(mod), name
    with torch.inference_mode():
        want = trial.model(input_features=feats(0), decoder_input_ids=PROMPT).logits
        got = ck.model(input_features=feats(0), decoder_input_ids=PROMPT).logits
    assert torch.equal(got, want)
