"""int8 that keeps accuracy (#16): per-token activation scales (`int8_token`), sensitivity per
block and the accuracy-aware fallback, on the tiny random Whisper; the fallback on the real
whisper-base in a slow test."""

import copy
import os
import functools

import pytest
import torch
from torch import nn

from sweep.inputs import machine
from sweep.measure import blocks, kernels
from sweep.measure.compress import CompressError, apply_recipe, layer_type_of
from sweep.measure import stored
from sweep.measure.int8 import RowInt8Linear, TokenInt8Linear
from sweep.techniques.recipe import Recipe, RecipeError

# TokenInt8Linear's product is oneDNN's int8 (torch._int_mm): without VNNI, or under
# ONEDNN_MAX_CPU_ISA=AVX2, it sums pairs in a saturating int16 and is wrong (#25)
needs_onednn_vnni = pytest.mark.skipif(
    not machine.onednn_vnni(), reason="torch._int_mm needs VNNI (oneDNN's int8 product), "
    "which this CPU or its ONEDNN_MAX_CPU_ISA cap lacks")
# fbgemm reads its cap once per process: one started under it stays capped whatever a test sets
FBGEMM_CAPPED_AT_START = bool(os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS"))
PROMPT = torch.tensor([[50258, 50259, 50359, 50363]])  # sot, lang, transcribe, notimestamps


@pytest.fixture(autouse=True)
def _fast(fast_kernel_choice):
    """Short kernel timings on tiny shapes (conftest's `fast_kernel_choice`)."""


def feats(seed=0):
    return torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(seed))


def calibrate(model, seeds=(1, 2)):  # as sweep.measure.evaluate.calibrator: generate per clip
    for seed in seeds:
        model.generate(feats(seed), decoder_input_ids=PROMPT, max_new_tokens=4)


@torch.inference_mode()
def logits(model, seed=0):
    return model(input_features=feats(seed), decoder_input_ids=PROMPT).logits.float()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# ---- per-token int8 ------------------------------------------------------------------------


@needs_onednn_vnni
def test_token_scales_keep_quiet_rows_that_one_scale_loses():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).eval()
    x = torch.randn(64, 256)
    x[0] *= 300  # one loud frame, the rest quiet (speech vs padding in a 30 s window)
    x[1] = 0  # an all-zero row stays exactly the bias
    with torch.inference_mode():
        ref = lin(x)
        tok, ao = TokenInt8Linear(lin)(x), kernels.AoInt8Linear(lin)(x)

    def quiet_err(y):
        return ((y[2:] - ref[2:]).norm() / ref[2:].norm()).item()

    assert tok.shape == ref.shape and tok.dtype == ref.dtype
    assert quiet_err(tok) < 0.02 < 0.2 < quiet_err(ao)
    assert torch.allclose(tok[1], lin.bias, atol=1e-6)
    assert ((tok[0] - ref[0]).norm() / ref[0].norm()).item() < 0.02


@needs_onednn_vnni
def test_token_linear_without_bias_3d_and_traced():
    lin = nn.Linear(64, 32, bias=False).eval()
    mod = TokenInt8Linear(lin)
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        y = mod(x)
        assert y.shape == (2, 5, 32) and cosine(y, lin(x)) > 0.999
        traced = torch.jit.trace(mod, (x,), check_trace=False)  # the scripted greedy step
        assert torch.allclose(traced(x), y, atol=1e-5)
    again = TokenInt8Linear.from_parts(mod.weight_int8, mod.weight_scale, None)
    with torch.inference_mode():
        assert torch.equal(again(x), y)


def test_int8_token_replaces_its_layer_type_and_stays_close(tiny_model):
    ref = logits(tiny_model)
    applied = apply_recipe(tiny_model, Recipe.parse("quant.enc_mlp=int8_token,"
                                                    "quant.enc_attn=int8_token"))
    kinds = {layer_type_of(n) for n, m in tiny_model.named_modules()
             if isinstance(m, (TokenInt8Linear, RowInt8Linear))}
    assert kinds == {"enc_attn", "enc_mlp"}
    # per shape, the faster here of its two implementations (_int_mm needs VNNI to be fast)
    assert set(applied.kernels["enc_mlp"].split("+")) <= {i.name for i in
                                                          kernels.IMPLS["int8_token"]}
    assert {i.name for i in kernels.IMPLS["int8_token"]} == {
        "torch._int_mm(per-token)", "fbgemm(per-token rescaled)"}
    assert applied.kernels["dec_mlp"] == "fp32"
    assert cosine(logits(tiny_model), ref) > 0.99
    assert Recipe.parse("quant.enc_mlp=int8_token").describe() == "int8 tok (enc_mlp)"


def test_rescaled_rows_on_fbgemm_keep_quiet_rows_that_one_scale_loses(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).eval()
    x = torch.randn(64, 256)
    x[0] *= 300  # one loud frame, the rest quiet
    x[1] = 0  # an all-zero row stays exactly the bias
    x[2] = x[2].abs() + 3  # a row far from zero (offset, not only scale)
    # uncapped first: fbgemm reads its cap once, at its first use in the process; set before
    # that, it would run without VNNI for the rest of it (and 8-bit rows would overflow there)
    for cap, bits in ((None, None), ("AVX2", (8, 7))):
        if cap is None and FBGEMM_CAPPED_AT_START:
            continue  # fbgemm is capped for this whole process: only the capped case is real
        if cap:  # fbgemm without VNNI sums pairs in int16: 8 + 7 bits, whatever this CPU has
            monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", cap)
        else:
            monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
        row = RowInt8Linear(lin)
        assert bits is None or (row.bits, row.weight_bits) == bits
        with torch.inference_mode():
            ref, y, ao = lin(x), row(x), kernels.AoInt8Linear(lin)(x)
        quiet = slice(3, None)
        err = ((y[quiet] - ref[quiet]).norm() / ref[quiet].norm()).item()
        assert err < 0.05 < 0.2 < ((ao[quiet] - ref[quiet]).norm() / ref[quiet].norm()).item()
        assert torch.allclose(y[1], lin.bias, atol=1e-5)
        for i in (0, 2):
            assert ((y[i] - ref[i]).norm() / ref[i].norm()).item() < 0.05


def test_rescaled_rows_are_exactly_per_token_int8_with_zero_on_the_grid(monkeypatch):
    """The rescaled rows must compute per-token int8 exactly: each row on its own grid through
    zero, times the quantized weights. fc2's inputs are GELU outputs, thousands of values near
    zero: a grid through each row's min and max moved them all by the same fraction of a step,
    and an offset taken with the float weights added their rounding times the row's zero; the
    weights' sums carried both into every output (whisper-base's encoder output came out 30%
    off, 2.9% since)."""
    torch.manual_seed(0)
    lin = nn.Linear(2048, 256).eval()
    with torch.no_grad():
        lin.weight += torch.randn(256, 1) * 0.02  # each output's weights lean one way
    x = nn.functional.gelu(torch.randn(64, 2048) - 2.0)
    x[:, :8] = torch.rand(64, 8) * 60 + 20
    x[1] = 0  # an all-zero row is exactly the bias
    for cap in (None, "AVX2"):
        if cap is None and FBGEMM_CAPPED_AT_START:
            continue
        if cap:
            monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", cap)
        else:
            monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
        row = RowInt8Linear(lin)
        # without VNNI the pair sum must fit an int16: 8-bit rows over 7-bit weights
        assert (row.bits, row.weight_bits) == ((8, 7) if cap else (8, 8 if machine.fbgemm_vnni()
                                                                   else 7))
        w = row.packed._weight_bias()[0].dequantize()
        assert w.abs().amax(1).div(lin.weight.detach().abs().amax(1)).sub(1).abs().max() < 1e-5
        assert w.sub(lin.weight.detach()).abs().amax(1).max() <= (
            lin.weight.detach().abs().amax(1) / (2 ** (row.weight_bits - 1) - 1)).max()
        lo, hi = x.aminmax(dim=1, keepdim=True)
        step = (hi.clamp(min=0) - lo.clamp(max=0)).clamp_min(1e-12) / (2 ** row.bits - 2)
        q = torch.round(x / step)
        assert (q - q.amin(1, keepdim=True)).max() <= 2 ** row.bits - 1  # fits the kernel
        with torch.inference_mode():
            y = row(x)
        assert torch.allclose(y, q * step @ w.t() + lin.bias, rtol=1e-4, atol=1e-3)
        assert torch.allclose(y[1], lin.bias, atol=1e-5)


def test_int_mm_is_never_a_candidate_without_vnni(monkeypatch, tmp_path):
    """Under oneDNN's AVX2 cap `_int_mm` sums pairs in a saturating int16 (wrong, and 25x slow on
    a real AVX2-only CPU): the kernel table leaves it out with the reason, and `int8_token`
    falls back to the rescaled rows on fbgemm."""
    monkeypatch.setattr(kernels.machine, "onednn_vnni", lambda *a, **k: False)
    monkeypatch.setenv("HYPER_CACHE", str(tmp_path))  # not the session's cache: other choices
    impl, entry = kernels.choose("int8_token", nn.Linear(64, 128), 16)
    assert impl.name == "fbgemm(per-token rescaled)"
    assert "needs VNNI" in entry["failed"]["torch._int_mm(per-token)"]
    gated = {i.name for impls in kernels.IMPLS.values() for i in impls if i.vnni}
    assert {"torch._int_mm(per-token)", "torchao.Int8DynamicActivationInt8Weight"} <= gated
    # what the launcher says in its kernels line (launch.kernel_fit)
    said = kernels.without_vnni(["int8_token", "dynamic_int8", "none"], 64, 128, 16)
    runs_on, never = said["int8_token"]
    assert runs_on == "fbgemm(per-token rescaled)" and "torch._int_mm(per-token)" in never
    assert set(said) == {"int8_token"}  # dynamic int8's own kernel (fbgemm) needs no VNNI


def test_the_launcher_names_the_kernels_it_never_runs_without_vnni(monkeypatch, tmp_path,
                                                                    capsys):
    from sweep import launch
    from sweep.search.space import load_space

    monkeypatch.setattr(kernels.machine, "onednn_vnni", lambda *a, **k: False)
    monkeypatch.setenv("HYPER_CACHE", str(tmp_path))
    space = load_space("quick")
    launch.kernel_fit(space, 1)
    err = capsys.readouterr().err
    assert "kernels: int8_token runs on fbgemm(per-token rescaled) here, never on" in err
    assert "torch._int_mm(per-token)" in err and "need VNNI" in err


def test_rescaled_rows_3d_traced_and_stored():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False).eval()
    mod = RowInt8Linear(lin)
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        y = mod(x)
        assert y.shape == (2, 5, 32) and cosine(y, lin(x)) > 0.999
        traced = torch.jit.trace(mod, (x,), check_trace=False)  # the scripted greedy step
        assert torch.allclose(traced(x), y, atol=1e-5)
    form = stored.FORMS[RowInt8Linear]
    own, spec = form.save(mod)
    assert own["weight_int8"].dtype == torch.int8 and spec == {"bits": mod.bits}
    again = form.load(own, spec, own)
    with torch.inference_mode():
        assert torch.equal(again(x), y)


def test_rescaled_rows_run_eager_inside_a_compiled_model():
    """torch.compile around the module (compile.mode) leaves its prologue eager: inductor's
    dynamic-shape code for it once corrupted the heap."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    net[0], net[2] = RowInt8Linear(net[0]), RowInt8Linear(net[2])
    compiled = torch.compile(net, dynamic=True)
    with torch.inference_mode():
        for n in (50, 37, 11):
            x = torch.randn(3, n, 64)
            assert torch.allclose(compiled(x), net(x), atol=1e-5)


# ---- SmoothQuant ---------------------------------------------------------------------------


def _outlier_channels(model):
    """Give the tiny model what real Whispers have: a few input channels 30x larger than the
    rest, the same for every frame (LayerNorm gains), where one activation scale fails."""
    with torch.no_grad():
        for layer in model.model.encoder.layers:
            for ln in (layer.self_attn_layer_norm, layer.final_layer_norm):
                ln.weight[:3] *= 30
    return model


def test_smoothing_leaves_fp32_unchanged(tiny_model):
    from sweep.measure import int8

    model = _outlier_channels(tiny_model)
    ref, ln = logits(model), model.model.encoder.layers[0].final_layer_norm.weight.clone()
    assert int8.smooth_encoder(model, ["enc_attn", "enc_mlp"], 0.5, calibrate) == 3 * 2
    assert not torch.equal(model.model.encoder.layers[0].final_layer_norm.weight, ln)
    assert torch.allclose(logits(model), ref, rtol=1e-3, atol=1e-3)


def test_smoothing_recovers_int8_on_outlier_channels(tiny_model):
    model = _outlier_channels(tiny_model)

    def encoded(m):
        with torch.inference_mode():
            return m.model.encoder(feats(0)).last_hidden_state

    ref, errs = encoded(model), {}
    for alpha in (0.0, 0.5):
        applied = apply_recipe(copy.deepcopy(model), Recipe.parse(
            f"quant.enc_attn=dynamic_int8,quant.enc_mlp=dynamic_int8,quant.smooth={alpha}"),
            calibrate=calibrate)
        errs[alpha] = ((encoded(applied.model) - ref).norm() / ref.norm()).item()
        assert any(n.startswith("SmoothQuant") for n in applied.notes) == bool(alpha)
    assert errs[0.5] < 0.7 * errs[0.0]


def test_smoothing_settings():
    assert Recipe.parse("quant.smooth=0.5").is_baseline  # nothing quantizes activations
    assert Recipe.parse("quant.enc_mlp=bf16,quant.smooth=0.5") == Recipe.parse(
        "quant.enc_mlp=bf16,quant.smooth=0.5") and not Recipe.parse(
        "quant.enc_mlp=bf16,quant.smooth=0.5").quant.calibrates
    r = Recipe.parse("quant.enc_mlp=int8_token,quant.smooth=0.5")
    assert r.quant.smoothed == ["enc_mlp"] and r.quant.calibrates
    assert r.describe() == "int8 tok (enc_mlp), smooth 0.5"
    with pytest.raises(RecipeError, match=r"`quant.smooth` must be .*\[0, 1\)"):
        Recipe.parse("quant.smooth=1.0")


def test_smoothing_needs_calibration(tiny_model):
    with pytest.raises(CompressError, match="`quant.smooth` needs calibration data"):
        apply_recipe(tiny_model, Recipe.parse("quant.enc_mlp=int8_token,quant.smooth=0.5"))


# ---- blocks, sensitivity, fallback ---------------------------------------------------------


def test_block_names():
    assert blocks.block_of("model.encoder.layers.3.fc2") == "enc3"
    assert blocks.block_of("model.decoder.layers.11.encoder_attn.k_proj") == "dec11"
    assert blocks.block_of("model.encoder._orig_mod.layers.0.fc1.down") == "enc0"
    assert blocks.block_of("proj_out") == "head"
    assert sorted(["head", "dec1", "enc10", "enc2"], key=blocks.order) == [
        "enc2", "enc10", "dec1", "head"]


def test_probe_records_the_calibration_clips(tiny_model):
    probe = blocks.Probe.capture(tiny_model, calibrate)
    assert len(probe.features) == 2 and [f.shape for f in probe.features] == [(1, 80, 3000)] * 2
    assert all(ids.shape[1] > PROMPT.shape[1] for ids in probe.ids) and probe.start == [3, 3]
    assert probe.kl(tiny_model) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(blocks.ProbeError, match="HF generate"):
        blocks.Probe.capture(tiny_model, lambda m: None)


@pytest.mark.parametrize("text, needle", [
    ("quant.scheme=dynamic_int8,quant.fallback_blocks=2,quant.fallback_budget=0.1",
     "must not both be set"),
    ("quant.fallback_budget=-0.1", "quant.fallback_budget` must be"),
    ("quant.fallback_blocks=65", "quant.fallback_blocks` must be"),
    ("quant.fallback=fp16", "quant.fallback` must be one of bf16, none"),
])
def test_bad_fallback_settings_refused(text, needle):
    with pytest.raises(RecipeError, match=needle):
        Recipe.parse(text)


def test_fallback_means_nothing_without_int8():
    assert Recipe.parse("quant.fallback_blocks=3").is_baseline
    assert Recipe.parse("quant.scheme=bf16,quant.fallback_blocks=3") == Recipe.parse(
        "quant.scheme=bf16") or Recipe.parse("quant.scheme=bf16,quant.fallback_blocks=3"
                                             ).quant.canonical() == Recipe.parse(
        "quant.scheme=bf16").quant.canonical()
    r = Recipe.parse("quant.scheme=dynamic_int8,quant.fallback_blocks=3")
    assert r.quant.calibrates and "bf16 fallback 3 blocks" in r.describe()


def test_fallback_needs_calibration(tiny_model):
    with pytest.raises(CompressError, match="need calibration data"):
        apply_recipe(tiny_model, Recipe.parse("quant.scheme=dynamic_int8,"
                                              "quant.fallback_blocks=1"))


def _notes(applied, head):
    return next(n for n in applied.notes if n.startswith(head))


def test_fallback_blocks_moves_the_most_sensitive_to_bf16(tiny_model):
    applied = apply_recipe(tiny_model, Recipe.parse(
        "quant.scheme=dynamic_int8,quant.fallback_blocks=2"), calibrate=calibrate)
    ranked = [b.split()[0] for b in _notes(applied, "int8 sensitivity").split(": ")[1].split(
        ", ")]
    assert sorted(ranked, key=blocks.order) == ["enc0", "enc1", "dec0", "dec1", "head"]
    moved = set(ranked[:2])
    assert _notes(applied, "fallback to bf16").endswith(", ".join(sorted(moved,
                                                                          key=blocks.order)))
    for name, mod in tiny_model.named_modules():
        if layer_type_of(name) is None:
            continue
        want = kernels.CastLinear if blocks.block_of(name) in moved else kernels.AoInt8Linear
        assert isinstance(mod, want) or (want is kernels.AoInt8Linear and isinstance(
            getattr(mod, "weight", None), torch.Tensor) and type(mod.weight) is not nn.Parameter
        ), (name, type(mod))
    assert any("(fallback)" in k for k in applied.kernels.values())


def test_fallback_budget_moves_blocks_until_it_holds(tiny_model, monkeypatch):
    other = functools.partial(calibrate, seeds=(3, 4))  # clips whose sensitivities are new
    calls = []
    real = blocks.sensitivity
    monkeypatch.setattr(blocks, "sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    loose = apply_recipe(copy.deepcopy(tiny_model), Recipe.parse(
        "quant.scheme=dynamic_int8,quant.fallback_budget=1.0"), calibrate=other)
    assert "no block" in _notes(loose, "fallback to bf16")
    # the same model, schemes and clips: the sensitivities come from the cache
    tight = apply_recipe(copy.deepcopy(tiny_model), Recipe.parse(
        "quant.scheme=dynamic_int8,quant.fallback_budget=1e-12"), calibrate=other)
    assert len(calls) == 1
    note = _notes(tight, "fallback to bf16")  # bf16 never reaches 1e-12: every block moves
    assert note.split(": ")[1].startswith("enc0, enc1, dec0, dec1, head")
    kl = float(note.split("(KL ")[1].split(",")[0])
    assert kl > 1e-12


def test_fallback_to_fp32_keeps_the_float_layers(tiny_model):
    applied = apply_recipe(tiny_model, Recipe.parse(
        "quant.enc_mlp=int8_token,quant.fallback_blocks=9,quant.fallback=none"),
        calibrate=calibrate)
    assert not any(isinstance(m, TokenInt8Linear) for m in tiny_model.modules())
    assert set(applied.kernels["enc_mlp"].split("+")) in (
        {"fp32 (fallback)", "torch._int_mm(per-token)"},
        {"fp32 (fallback)", "fbgemm(per-token rescaled)"})


@pytest.mark.slow
def test_fallback_meets_a_budget_int8_everywhere_misses_real(real_model):
    """whisper-base, per-tensor dynamic int8 on every Linear: its KL on the calibration clips
    is over the budget; the accuracy-aware fallback moves a few blocks to bf16 and holds it."""
    from sweep.inputs.data import calibration_set
    from sweep.measure.evaluate import calibrator

    budget = 0.01
    calib = calibrator(real_model.processor, calibration_set("embedded", n=4), "ru")
    probe = blocks.Probe.capture(real_model.model, calib)
    everywhere = apply_recipe(copy.deepcopy(real_model.model),
                              Recipe.parse("quant.scheme=dynamic_int8"))
    assert probe.kl(everywhere.model) > budget
    applied = apply_recipe(copy.deepcopy(real_model.model), Recipe.parse(
        f"quant.scheme=dynamic_int8,quant.fallback_budget={budget}"), calibrate=calib)
    note = _notes(applied, "fallback to bf16")
    moved = note.split(": ")[1].split(" (KL")[0].split(", ")
    assert 0 < len(moved) <= 4  # a few of the 13 blocks
    assert probe.kl(applied.model) <= budget
