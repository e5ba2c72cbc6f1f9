"""sweep.measure.compress on a tiny random Whisper: each technique changes the right layers and
no others."""

import copy
import functools
import json
from collections import Counter

import pytest
import torch
from torch import nn

from sweep.measure import kernels, structured
from sweep.measure.compress import (LAYER_TYPES, CompressError, Observer, apply_recipe,
                                    layer_type_of, linear_sparsity, recompile_count)
from sweep.techniques.recipe import Recipe, RecipeError

PROMPT = torch.tensor([[50258, 50259, 50359, 50363]])  # sot, lang, transcribe, notimestamps


@pytest.fixture(autouse=True)
def _fast_kernel_choice(monkeypatch, tmp_path_factory):
    # One cache per session (each shape timed once), and short timings: shapes are tiny here.
    monkeypatch.setenv("HYPER_CACHE", str(tmp_path_factory.getbasetemp() / "hyper-cache"))
    monkeypatch.setattr(kernels, "time_calls", functools.partial(kernels.time_calls,
                                                                 budget_s=0.02))


def feats(seed=0):
    return torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def logits(model, seed=0):
    x = feats(seed).to(model.model.encoder.conv1.weight.dtype)
    return model(input_features=x, decoder_input_ids=PROMPT).logits.float()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_layer_types_cover_every_linear(tiny_model):
    types = Counter(layer_type_of(n) for n in linears(tiny_model))
    assert types == {"enc_attn": 8, "enc_mlp": 4, "dec_self": 8, "dec_cross": 8, "dec_mlp": 4,
                     "head": 1}
    assert layer_type_of("model.decoder.layers.1.encoder_attn.v_proj") == "dec_cross"
    assert layer_type_of("model.encoder._orig_mod.layers.0.fc2") == "enc_mlp"
    for other in ("model.encoder.conv1", "model.decoder.embed_tokens",
                  "model.encoder.layers.0.self_attn_layer_norm", "model.decoder.layers.0.fc3"):
        assert layer_type_of(other) is None


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_quant_changes_only_its_layer_type(tiny_model, layer_type):
    before = {n: (m, m.weight.detach().clone()) for n, m in linears(tiny_model).items()}
    applied = apply_recipe(tiny_model, Recipe.parse(f"quant.{layer_type}=dynamic_int8"))
    for name, (module, weight) in before.items():
        now = tiny_model.get_submodule(name)
        if layer_type_of(name) == layer_type:
            assert now is not module
        else:
            assert now is module and torch.equal(now.weight, weight)
    used = set(applied.kernels[layer_type].split("+"))  # cross-attn q vs k/v shapes may differ
    assert used <= {i.name for i in kernels.IMPLS["dynamic_int8"]}
    assert {t for t, k in applied.kernels.items() if k != "fp32"} == {layer_type}
    assert torch.isfinite(logits(tiny_model)).all()


@pytest.mark.parametrize("scheme, min_cos", [
    ("dynamic_int8", 0.99), ("int8_weight_only", 0.99), ("int8_act_int4_weight", 0.95),
    ("bf16", 0.99), ("fp16", 0.99), ("autocast_bf16", 0.99)])
def test_schemes_stay_close_to_fp32(tiny_model, scheme, min_cos):
    ref = logits(tiny_model)
    applied = apply_recipe(tiny_model, Recipe.parse(f"quant.scheme={scheme}"))
    out = logits(tiny_model)
    assert torch.isfinite(out).all() and cosine(out, ref) > min_cos
    assert "fp32" not in applied.kernels.values()
    assert any("vs fp32" in n for n in applied.notes)  # measured speed-ups are reported


@pytest.mark.parametrize("scheme", ["dynamic_int8", "bf16", "int8_weight_only"])
def test_head_quant_leaves_tied_embeddings_alone(tiny_model, scheme):
    emb, head = tiny_model.model.decoder.embed_tokens.weight, tiny_model.proj_out
    saved = emb.detach().clone()
    assert head.weight is emb
    apply_recipe(tiny_model, Recipe.parse(f"quant.head={scheme}"))
    assert tiny_model.proj_out is not head
    assert tiny_model.model.decoder.embed_tokens.weight is emb and torch.equal(emb, saved)
    assert emb.dtype == torch.float32 and type(emb) is nn.Parameter


def test_bf16_on_one_layer_type_casts_at_its_boundary(tiny_model):
    ref = logits(tiny_model)
    apply_recipe(tiny_model, Recipe.parse("quant.dec_mlp=bf16"))
    cast = [n for n, m in tiny_model.named_modules() if isinstance(m, kernels.CastLinear)]
    assert cast and {layer_type_of(n) for n in cast} == {"dec_mlp"}
    out = logits(tiny_model)
    assert out.dtype == torch.float32 and cosine(out, ref) > 0.999


@pytest.mark.parametrize("choice", ["stack", "per-linear"])
def test_bf16_encoder_stack_or_per_linear(tiny_model, monkeypatch, choice):
    entry = {"choice": choice, "speedup": {"per-linear": 1.0, "stack": 1.0}}
    real = kernels.choose_cached
    monkeypatch.setattr(kernels, "choose_cached", lambda key, *a, **k: (
        entry if key.startswith("encoder-cast") else real(key, *a, **k)))
    ref = logits(tiny_model)
    with torch.inference_mode():
        ids = tiny_model.generate(feats(), decoder_input_ids=PROMPT, max_new_tokens=3)
    applied = apply_recipe(tiny_model, Recipe.parse(
        "quant.enc_attn=bf16,quant.enc_mlp=bf16,quant.dec_mlp=dynamic_int8"))
    enc_dtype = tiny_model.model.encoder.conv1.weight.dtype
    assert enc_dtype == (torch.bfloat16 if choice == "stack" else torch.float32)
    assert ("stack" in applied.kernels["enc_mlp"]) == (choice == "stack")
    assert cosine(logits(tiny_model), ref) > 0.99
    with torch.inference_mode():  # fp32 features work too: the stack casts at its input
        out = tiny_model.generate(feats(), decoder_input_ids=PROMPT, max_new_tokens=3)
    assert out.shape == ids.shape


@pytest.mark.parametrize("norm, scope", [("l1", "layer"), ("l1", "global"), ("l2", "layer"),
                                         ("l2", "global")])
def test_pruned_fraction(tiny_model, norm, scope):
    rate, targets = 0.3, ("enc_attn", "enc_mlp", "dec_mlp")  # shapes 64x64, 128x64, 64x128
    before = {n: m.weight.detach().clone() for n, m in linears(tiny_model).items()}
    applied = apply_recipe(tiny_model, Recipe.parse(
        f"prune.rate={rate},prune.norm={norm},prune.scope={scope},"
        f"prune.targets={'+'.join(targets)}"))
    hit = {n: m.weight for n, m in linears(tiny_model).items() if layer_type_of(n) in targets}
    for name, m in linears(tiny_model).items():
        assert type(m.weight) is nn.Parameter and not hasattr(m, "weight_orig")  # permanent
        if layer_type_of(name) not in targets:
            assert torch.equal(m.weight, before[name]), name
    zeros = {n: int((w == 0).sum()) for n, w in hit.items()}
    rows = {n: int((w == 0).all(1).sum()) for n, w in hit.items()}
    if norm == "l2":  # whole output rows go
        assert all(zeros[n] == rows[n] * hit[n].shape[1] for n in hit)
    counted = rows if norm == "l2" else zeros
    size = {n: w.shape[0] if norm == "l2" else w.numel() for n, w in hit.items()}
    if scope == "layer":
        assert all(counted[n] == round(rate * size[n]) for n in hit)
    else:
        assert sum(counted.values()) == round(rate * sum(size.values()))
        assert len(set(counted[n] / size[n] for n in hit)) > 1  # one threshold, unequal shares
    total = sum(m.weight.numel() for m in linears(tiny_model).values())
    untouched = sum(int((w == 0).sum()) for n, w in before.items() if n not in hit)  # pad row
    assert applied.sparsity == pytest.approx((sum(zeros.values()) + untouched) / total)
    assert applied.sparsity == pytest.approx(linear_sparsity(tiny_model))


def test_pruning_the_head_keeps_it_tied(tiny_model):
    applied = apply_recipe(tiny_model, Recipe.parse("prune.rate=0.5,prune.targets=head"))
    emb = tiny_model.model.decoder.embed_tokens.weight
    assert tiny_model.proj_out.weight is emb
    assert (emb == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6)
    assert any("tied" in n for n in applied.notes)


def test_mask_2_4_keeps_two_largest_of_four():
    w = torch.randn(8, 16)
    mask = structured.mask_2_4(w)
    groups, kept = w.abs().reshape(8, 4, 4), mask.reshape(8, 4, 4)
    assert (kept.sum(-1) == 2).all()
    assert (groups[kept].reshape(8, 4, 2).min(-1).values
            >= groups[~kept].reshape(8, 4, 2).max(-1).values).all()


def test_cuda_only_choices_refused_on_cpu(tiny_model):
    with pytest.raises(RecipeError, match="`prune.pattern`=2:4 needs device=cuda"):
        Recipe.parse("prune.pattern=2:4,prune.rate=0.5")
    with pytest.raises(RecipeError, match="`quant.dec_mlp`=bnb_nf4 needs device=cuda"):
        Recipe.parse("quant.dec_mlp=bnb_nf4")
    with pytest.raises(kernels.KernelError, match="no implementation of bnb_int8 runs on cpu"):
        kernels.choose("bnb_int8", nn.Linear(8, 8), 1)
    with pytest.raises(CompressError, match="device='cuda' but the model is on 'cpu'"):
        apply_recipe(tiny_model, Recipe.parse("device=cuda,quant.scheme=bnb_int8"))


def test_unsupported_scheme_names_scheme_layer_and_why(tiny_model, monkeypatch):
    def broken(linear, stats):
        raise RuntimeError("no int8 kernel on this CPU")

    def garbage(linear, stats):  # runs, but wrong (as torchao int8 compiled at M=1 was here)
        return nn.Linear(linear.in_features, linear.out_features)

    monkeypatch.setitem(kernels.IMPLS, "int8_weight_only", [
        kernels.Impl("broken", broken), kernels.Impl("garbage", garbage)])
    with pytest.raises(CompressError) as e:
        apply_recipe(tiny_model, Recipe.parse("quant.enc_mlp=int8_weight_only"))
    assert str(e.value).startswith("`quant.enc_mlp`=int8_weight_only on cpu: no implementation")
    assert "broken: RuntimeError: no int8 kernel on this CPU" in str(e.value)
    assert "garbage: KernelError: relative error" in str(e.value)


def test_ffn_shrinking_saves_and_loads(tiny_model, tmp_path):
    from transformers import WhisperForConditionalGeneration

    layer = tiny_model.model.decoder.layers[1]
    score = structured.ffn_importance(layer.fc1, layer.fc2)
    old_fc1 = layer.fc1.weight.detach().clone()
    applied = apply_recipe(tiny_model, Recipe.parse("struct.ffn_rate=0.25"))
    keep = 128 - 32
    assert tiny_model.config.encoder_ffn_dim == keep and tiny_model.config.decoder_ffn_dim == keep
    for lay in [*tiny_model.model.encoder.layers, *tiny_model.model.decoder.layers]:
        assert lay.fc1.weight.shape == (keep, 64) and lay.fc1.bias.shape == (keep,)
        assert lay.fc2.weight.shape == (64, keep)
    kept_fc1 = tiny_model.model.decoder.layers[1].fc1.weight
    kept = [i for i in range(128) if any(torch.equal(old_fc1[i], r) for r in kept_fc1)]
    dropped = sorted(set(range(128)) - set(kept))
    assert len(kept) == keep and score[kept].min() >= score[dropped].max()
    out = logits(tiny_model)
    assert torch.isfinite(out).all() and applied.notes
    tiny_model.save_pretrained(tmp_path)
    loaded = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), out)


def test_static_int8_calibrates_then_converts(tiny_model):
    ref, seen = logits(tiny_model), []

    def calibrate(model):
        seen.append(sum(isinstance(m, Observer) for m in model.modules()))
        model(input_features=feats(seed=1), decoder_input_ids=PROMPT)  # not the eval input

    applied = apply_recipe(tiny_model, Recipe.parse(
        "quant.enc_mlp=static_int8,quant.dec_cross=static_int8"), calibrate=calibrate)
    assert seen == [4 + 8]  # every targeted layer observed, and calibrate ran once
    assert not any(isinstance(m, Observer) for m in tiny_model.modules())
    assert any("12 layers calibrated, 1-1 calls each" in n for n in applied.notes)
    assert applied.kernels["enc_mlp"] != "fp32" and applied.kernels["dec_cross"] != "fp32"
    assert cosine(logits(tiny_model), ref) > 0.99


def test_static_int8_needs_calibration_that_reaches_every_layer(tiny_model):
    recipe = Recipe.parse("quant.enc_mlp=static_int8,quant.dec_self=static_int8")
    with pytest.raises(CompressError, match="static_int8 needs calibration data"):
        apply_recipe(copy.deepcopy(tiny_model), recipe)
    with pytest.raises(CompressError, match="calibrate\\(\\) ran no data through dec_self"):
        apply_recipe(tiny_model, recipe, calibrate=lambda m: m.model.encoder(feats()))
    assert all(not isinstance(m, Observer) for m in tiny_model.modules())  # observers removed


@pytest.mark.parametrize("scheme, impl", [(s, i) for s, impls in kernels.IMPLS.items()
                                          for i in impls if "cpu" in i.devices],
                         ids=lambda x: getattr(x, "name", x))
def test_traceable_flag_is_what_torchscript_does(scheme, impl):
    """Impl.traceable decides which kernels a scripted decoding step may use: it must match
    what torch.jit.trace really does with the built module (and its output)."""
    import warnings

    torch.manual_seed(0)
    lin, x = nn.Linear(64, 64).eval(), torch.randn(1, 1, 64)
    try:
        mod = impl.build(lin, {"in_min": -3.0, "in_max": 3.0}).eval()
    except Exception as e:  # e.g. torchao's opaque packing without its C++ library
        pytest.skip(f"{impl.name} does not build here: {type(e).__name__}")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(nn.Sequential(mod), (x,), check_trace=False)
            ok = torch.equal(traced(x), mod(x))
        except RuntimeError:
            ok = False
    assert ok == impl.traceable


def test_scripted_step_uses_only_traceable_kernels(tiny_model):
    script = "decode.loop=greedy,decode.compile=script"
    with pytest.raises(CompressError, match="`quant.dec_self`=int8_act_int4_weight on cpu: no "
                       "implementation .* TorchScript can trace"):
        apply_recipe(copy.deepcopy(tiny_model), Recipe.parse(
            f"quant.dec_self=int8_act_int4_weight,{script}"))
    # the encoder is not traced: any kernel may serve it
    applied = apply_recipe(copy.deepcopy(tiny_model), Recipe.parse(
        f"quant.enc_mlp=int8_act_int4_weight,quant.dec_mlp=dynamic_int8,{script}"))
    names = {i.name: i for impls in kernels.IMPLS.values() for i in impls}
    assert names[applied.kernels["dec_mlp"]].traceable
    assert applied.kernels["enc_mlp"].startswith("torchao.Int8DynActInt4Weight")


def test_kernel_choice_cached_and_reused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPER_CACHE", str(tmp_path))
    recipe = Recipe.parse("quant.enc_mlp=dynamic_int8")
    first = apply_recipe(copy.deepcopy(tiny_model), recipe)
    (path,) = tmp_path.glob("kernels-*.json")
    assert path == kernels.cache_path()
    data = json.loads(path.read_text())
    key = f"dynamic_int8|64x128|t1500|th{torch.get_num_threads()}|cpu|eager"
    assert data[key]["choice"] in first.kernels["enc_mlp"] and "fp32" in data[key]["seconds"]
    names = sorted(i.name for i in kernels.IMPLS["dynamic_int8"])
    assert data[key]["tried"] == names and "torch.ao.dynamic(per-channel)" in names
    real_measure = kernels._measure
    monkeypatch.setattr(kernels, "_measure", lambda *a: pytest.fail("measured despite the cache"))
    assert apply_recipe(copy.deepcopy(tiny_model), recipe).kernels == first.kernels
    data[key]["tried"] = ["an older candidate"]  # stale: the candidates changed since
    path.write_text(json.dumps(data))
    calls = []
    monkeypatch.setattr(kernels, "_measure", lambda *a: calls.append(a) or real_measure(*a))
    apply_recipe(tiny_model, recipe)
    assert len(calls) == 1 and json.loads(path.read_text())[key]["tried"] == names


def test_compile_default_generates_identically(tiny_model):
    kw = {"decoder_input_ids": PROMPT, "max_new_tokens": 4, "do_sample": False}
    with torch.inference_mode():
        ref = tiny_model.generate(feats(), **kw)
    applied = apply_recipe(tiny_model, Recipe.parse("compile.mode=default"))
    assert applied.notes == ["compile: encoder and decoder, mode=default"]
    before = recompile_count()
    with torch.inference_mode():
        out = tiny_model.generate(feats(), **kw)
        warm = recompile_count()
        again = tiny_model.generate(feats(), **kw)
    assert warm > before and recompile_count() == warm  # compiled once, no recompiles after
    assert torch.equal(out, ref) and torch.equal(again, ref)


@pytest.mark.slow
def test_dynamic_int8_real_model_changes_encoder_output_slightly(real_model, speech_manifest):
    import soundfile

    clip = next(c for c in map(json.loads, speech_manifest.read_text().splitlines())
                if c["kind"] == "real" and c["lang"] == "ru")
    audio, sr = soundfile.read(speech_manifest.parent / clip["audio"], dtype="float32")
    x = real_model.processor.feature_extractor(audio, sampling_rate=sr, return_tensors="pt")
    x, model = x.input_features, real_model.model
    quant = apply_recipe(copy.deepcopy(model), Recipe.parse("quant.scheme=dynamic_int8")).model
    with torch.inference_mode():
        ref, out = (m.model.encoder(x).last_hidden_state for m in (model, quant))
        ref_logits, out_logits = (m(input_features=x, decoder_input_ids=PROMPT).logits
                                  for m in (model, quant))
    assert cosine(out, ref) > 0.99
    assert cosine(out_logits, ref_logits) > 0.99
