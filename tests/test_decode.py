"""sweep.measure.decode / sweep.measure.window: the greedy loop and its compiled step give
generate's tokens,
the encoder window runs on trimmed positions (and is the HF encoder on the full window), the
recipe dimensions validate, batches give the texts of clip-by-clip decoding."""

import copy
import functools
from typing import NamedTuple

import numpy as np
import pytest
import torch

from sweep.measure import decode, evaluate, kernels, window
from sweep.measure.compress import apply_recipe, recompile_count
from sweep.inputs.data import Utterance, load_eval_set
from sweep.measure.decode import GeneratePlan, GreedyPlan
from sweep.techniques.recipe import PARAMS, Recipe, RecipeError
from sweep.measure.window import Window


@pytest.fixture(autouse=True)
def _fast_kernel_choice(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HYPER_CACHE", str(tmp_path_factory.getbasetemp() / "hyper-cache"))
    monkeypatch.setattr(kernels, "time_calls", functools.partial(kernels.time_calls,
                                                                 budget_s=0.02))


@pytest.fixture(scope="module")
def tiny():
    """A narrow random Whisper (conftest's tiny_model) with a multilingual generation config;
    init_std 0.3 so that tokens depend on the audio (at 0.02 one token repeats for any input)."""
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


def _clips(n, seed=0):
    """Noise clips of different lengths (random weights make up tokens for any audio)."""
    rng = np.random.default_rng(seed)
    return [Utterance(f"c{i}", (0.1 * rng.standard_normal(int(16000 * d))).astype("float32"),
                      "", "ru", d) for i, d in enumerate([1.2, 3.7, 6.1, 2.4][:n])]


class M(NamedTuple):
    """A model and the decoding options it is run with, as `apply_recipe` hands them over."""
    model: torch.nn.Module
    options: decode.Plan


def _with_plan(model, plan) -> M:
    return M(copy.deepcopy(model), plan)


def _pair(m) -> M:  # a bare model decodes with the default options
    return M(m.model, m.options) if hasattr(m, "options") else M(m, decode.Plan.default())


def _ids(m, processor, clips, cap=12):
    model, plan = _pair(m)
    out = []
    for u in clips:
        feats = decode.features(model, processor, [u.audio], [u.duration_s], plan)
        out += decode.decode(model, feats, plan, language="ru", task="transcribe", cap=cap)
    return out


# ---- recipe dimensions ------------------------------------------------------------------------

def test_recipe_params_validate_and_round_trip():
    r = Recipe.parse("decode.loop=greedy,decode.compile=step,encoder.window=auto,"
                     "encoder.bucket_s=10,decode.no_repeat_ngram=4")
    flat = r.to_flat()
    assert flat["decode.loop"] == "greedy" and flat["encoder.bucket_s"] == 10
    assert Recipe.from_flat(flat) == r == Recipe.from_json(r.to_json())
    assert not r.is_baseline and Recipe().is_baseline
    assert decode.plan_for(r) == GreedyPlan(Window("auto", 10), compiled=True, no_repeat=4)
    assert decode.plan_for(Recipe()) == GeneratePlan()
    assert {"decode.loop", "decode.compile", "decode.no_repeat_ngram", "encoder.window",
            "encoder.bucket_s"} <= set(PARAMS)
    with pytest.raises(RecipeError, match="decode.loop=greedy"):
        Recipe.parse("decode.compile=step")
    with pytest.raises(RecipeError, match="`encoder.window` must be one of"):
        Recipe.parse("encoder.window=7")
    with pytest.raises(RecipeError, match="did you mean `decode.loop`"):
        Recipe.parse("decode.lop=greedy")


@pytest.mark.parametrize("text, rule", [
    ("decode.compile=script", "`decode.compile`=script needs decode.loop=greedy"),
    ("decode.cross_kv=bf16", "`decode.cross_kv`=bf16 needs decode.loop=greedy"),
    ("decode.loop=greedy,decode.cross_kv=fp8", "`decode.cross_kv` must be one of model, bf16"),
    ("encoder.compile=freeze,compile.mode=default",
     "`encoder.compile`=freeze needs compile.mode=none.*compiles the encoder already"),
    ("encoder.compile=max", "`encoder.compile` must be one of none, default, freeze"),
    ("decode.timestamps=maybe", "`decode.timestamps` must be one of true, false, got 'maybe'"),
])
def test_speed_dimensions_refuse_bad_combinations_early(text, rule):
    with pytest.raises(RecipeError, match=rule):
        Recipe.parse(text)


def test_speed_dimensions_reach_the_plan_and_the_description():
    r = Recipe.parse("decode.loop=greedy,decode.compile=script,decode.cross_kv=bf16,"
                     "encoder.compile=freeze")
    assert decode.plan_for(r) == GreedyPlan(scripted=True, cross_kv="bf16")
    assert Recipe.from_json(r.to_json()) == r and r.encoder.active
    assert "cross K/V bf16" in r.decode.describe()
    assert "encoder compiled (freeze)" in r.encoder.describe()
    with pytest.raises(ValueError, match="cross_kv"):
        GeneratePlan(cross_kv="bf16")


@pytest.mark.parametrize("name", ["full", "cpu"])
def test_spaces_search_the_new_dimensions(name):
    from sweep.search.space import load_space

    space = load_space(name)
    assert {"decode.loop", "decode.compile", "decode.no_repeat_ngram", "encoder.window",
            "encoder.bucket_s", "decode.cross_kv", "encoder.compile"} <= set(space.params)
    assert Recipe.from_flat(space.baseline()).is_baseline
    # the fastest known mix is measured first, as a warm start
    assert any(Recipe.from_flat(p).decode.cross_kv == "bf16"
               and Recipe.from_flat(p).encoder.compile == "freeze"
               for p in space.start_points({"cpu"}))


def test_window_frames_and_refusals():
    assert Window().frames(2.0, 3000) == 3000
    auto = Window("auto", 5)
    assert [auto.frames(d, 3000) for d in (0.3, 2.0, 5.0, 5.01, 12.0, 40.0)] == [
        500, 500, 500, 1000, 1500, 3000]
    with pytest.raises(ValueError, match="`encoder.window` must be one of"):
        Window("short")
    with pytest.raises(ValueError, match="bucket_s"):
        Window("auto", 0)


# ---- tiny model ---------------------------------------------------------------------------------

def test_greedy_equals_generate_tiny(tiny):
    model, proc = tiny
    clips = _clips(3)
    ref = _ids(model, proc, clips)
    assert all(len(r) == 12 for r in ref)  # random weights run to the cap
    assert _ids(_with_plan(model, GreedyPlan()), proc, clips) == ref
    # an explicit GeneratePlan is the default path
    assert _ids(_with_plan(model, GeneratePlan()), proc, clips) == ref


@pytest.mark.parametrize("n", [1, 2])
def test_no_repeat_ngram_greedy_equals_generate_tiny(tiny, n):
    model, proc = tiny
    clips = _clips(3)
    plain = _ids(_with_plan(model, GreedyPlan()), proc, clips, cap=20)
    ref = _ids(_with_plan(model, GeneratePlan(no_repeat=n)), proc, clips, cap=20)
    assert _ids(_with_plan(model, GreedyPlan(no_repeat=n)), proc, clips, cap=20) == ref
    if n == 1:  # random weights repeat tokens: the ban changes the output
        assert ref != plain and all(len(set(row)) == len(row) for row in ref)


def _raw_ids(m, processor, clips, cap):
    """Token ids with the timestamps the decoding chose (decode() keeps only the text's)."""
    model, plan = m
    out = []
    for u in clips:
        feats = decode.features(model, processor, [u.audio], [u.duration_s], plan)
        with torch.inference_mode():
            out += decode.RUNNERS[type(plan)](plan, model, feats, "ru", "transcribe", cap)
    return out


def _hf_timestamped(model, processor, clips, cap, no_repeat=0):
    """HF's greedy search with its WhisperTimeStampLogitsProcessor (and the generation config's
    suppressions): the rules alone. (Whisper's own generate(return_timestamps=True) also
    re-decodes after a lone last timestamp, which random weights reach; on real clips it gives
    the same tokens: test_timestamps_greedy_equals_generate_real.)"""
    from transformers import GenerationMixin, LogitsProcessorList
    from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

    prompt = decode.prompt_ids(model, "ru", "transcribe", timestamps=True)
    rules = WhisperTimeStampLogitsProcessor(model.generation_config, begin_index=len(prompt))
    out = []
    for u in clips:
        feats = decode.features(model, processor, [u.audio], [u.duration_s], GreedyPlan())
        with torch.inference_mode():
            row = GenerationMixin.generate(
                model, input_features=feats, decoder_input_ids=torch.tensor([prompt]),
                max_new_tokens=cap, do_sample=False, num_beams=1, no_repeat_ngram_size=no_repeat
                or None, logits_processor=LogitsProcessorList([rules]))[0].tolist()
        out.append(decode._cut(row[len(prompt):], model.generation_config.eos_token_id))
    return out


@pytest.mark.parametrize("plan", [GreedyPlan(timestamps=True),
                                  GreedyPlan(timestamps=True, scripted=True),
                                  GreedyPlan(timestamps=True, no_repeat=2)])
def test_timestamps_greedy_follows_hf_rules_tiny(tiny, plan):
    """The greedy loop with timestamps picks HF's timestamp rules' tokens, the timestamps
    included, and decode() hands over only the text's tokens."""
    model, proc = tiny
    clips = _clips(3)
    ref = _hf_timestamped(model, proc, clips, 24, plan.no_repeat)
    first = model.generation_config.no_timestamps_token_id + 1
    assert all(r[0] >= first for r in ref)  # the rules: a timestamp first ...
    assert any(t < first for r in ref for t in r)  # ... and text between them
    assert _raw_ids(_with_plan(model, plan), proc, clips, cap=24) == ref
    text = _ids(_with_plan(model, plan), proc, clips, cap=24)
    assert text == [[t for t in r if t < first] for r in ref]
    assert text != _ids(_with_plan(model, GreedyPlan()), proc, clips, cap=24)


def test_window_full_is_the_hf_encoder_and_trims_positions(tiny):
    model, proc = tiny
    feats = decode.features(model, proc, [_clips(1)[0].audio], [1.2], decode.Plan.default())
    with torch.inference_mode():
        hf = model.model.encoder(feats).last_hidden_state
        assert torch.equal(window.encode(model, feats), hf)
        # the own forward path (used for shorter windows) on the full window: the same
        assert torch.equal(window._encode_window(model, feats), hf)
        short = window.encode(model, feats[..., :500])
        assert short.shape == (1, 250, model.config.d_model)
        with pytest.raises(ValueError, match="even number of mel frames"):
            window.encode(model, feats[..., :501])


def test_window_auto_generate_equals_greedy_tiny(tiny):
    model, proc = tiny
    clips = _clips(3)
    auto = Window("auto", 5)
    gen = _ids(_with_plan(model, GeneratePlan(auto)), proc, clips)
    assert _ids(_with_plan(model, GreedyPlan(auto)), proc, clips) == gen
    assert gen != _ids(model, proc, clips)  # the window changes what the encoder sees


def test_compiled_step_identical_without_recompiles_tiny(tiny):
    model, proc = tiny
    clips = _clips(4)
    ref = _ids(model, proc, clips)
    torch._dynamo.reset()
    comp = _with_plan(model, GreedyPlan(compiled=True))
    got = _ids(comp, proc, clips[:1])
    graphs = recompile_count()
    got += _ids(comp, proc, clips[1:])
    assert got == ref
    assert recompile_count() == graphs  # clips of other lengths: no new graph
    t = decode.runtime(*comp).last
    assert t.steps == 12 and t.ms_per_token > 0


def test_scripted_step_identical_for_every_window_tiny(tiny):
    model, proc = tiny
    clips = _clips(4)
    for w in (Window(), Window("auto", 5)):
        ref = _ids(_with_plan(model, GreedyPlan(w)), proc, clips)
        scripted = _with_plan(model, GreedyPlan(w, scripted=True))
        assert _ids(scripted, proc, clips) == ref, w
        rt = decode.runtime(*scripted)
        # one trace for the prompt and one for the next tokens, whatever the encoder window
        assert len(rt.step.traces) == 2
        assert rt.last.steps == 12


def test_scripted_step_traced_on_one_window_runs_others_to_the_bit_tiny(tiny):
    """A trace made on one encoder window, run on others, gives what a trace made on each
    gives (logits' argmax every step): the window is not baked into the trace."""
    from sweep.measure.greedy import Greedy

    model, _ = tiny
    cfg = model.config

    def tokens(rt, frames, seed):
        enc = torch.randn(2, frames, cfg.d_model, generator=torch.Generator().manual_seed(seed))
        cross = rt.cross(enc)
        prompt = torch.tensor([decode.prompt_ids(model, "ru", "transcribe")] * 2)
        out = [rt.step(prompt, 0, cross, rt.masks[0])]
        for pos in range(prompt.shape[1], prompt.shape[1] + 6):
            out.append(rt.step(out[-1][:, None], pos, cross, rt.masks[1]))
        return torch.stack(out).tolist()

    with torch.inference_mode():
        shared = Greedy(model, 2, compiled=False, scripted=True)
        tokens(shared, 40, 0)
        for frames in (25, 60, cfg.max_source_positions):
            fresh = Greedy(model, 2, compiled=False, scripted=True)
            assert tokens(shared, frames, frames) == tokens(fresh, frames, frames), frames
        assert len(shared.step.traces) == 2


def test_bf16_cross_kv_is_stored_in_bf16_and_scripted_alike_tiny(tiny):
    model, proc = tiny
    clips = _clips(3)
    enc = torch.randn(1, 1500, 64)
    with torch.inference_mode():
        ref_kv = decode.runtime(model, GreedyPlan()).cross(enc)
    for w in (Window(), Window("auto", 5)):
        eager = _with_plan(model, GreedyPlan(w, cross_kv="bf16"))
        got = _ids(eager, proc, clips)
        rt = decode.runtime(*eager)
        assert rt.cross_dtype is torch.bfloat16 and rt.last.steps == 12
        with torch.inference_mode():
            kv = rt.cross(enc)
        for pair, ref_pair in zip(kv, ref_kv):
            for t, r in zip(pair, ref_pair):
                assert t.dtype == torch.bfloat16 and r.dtype == torch.float32
                torch.testing.assert_close(t.float(), r, rtol=1e-2, atol=1e-2)
        # the traced step runs the eager step's ops: the same tokens (the random tiny model
        # has near ties everywhere, so tokens against fp32 K/V are the real model's test)
        assert _ids(_with_plan(model, GreedyPlan(w, scripted=True, cross_kv="bf16")), proc,
                    clips) == got, w


@pytest.mark.parametrize("how", ["default", "freeze"])
def test_compiled_encoder_close_for_full_and_short_windows_tiny(tiny, how):
    import torch._inductor.config as inductor

    model, proc = tiny
    eager = _with_plan(model, GreedyPlan(Window("auto", 5)))
    comp = apply_recipe(copy.deepcopy(model), Recipe.parse(
        f"decode.loop=greedy,encoder.window=auto,encoder.compile={how}"))
    assert comp.options == eager.options
    feats = torch.randn(1, 80, 3000)
    with torch.inference_mode():
        for frames in (3000, 500, 1000):
            ref = window.encode(eager.model, feats[..., :frames])
            got = window.encode(comp.model, feats[..., :frames])
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert inductor.freezing is False  # patched around the encoder's calls only
    assert _ids(comp, proc, _clips(2)) == _ids(eager, proc, _clips(2))


def test_compiled_step_one_graph_for_every_window_tiny(tiny):
    model, proc = tiny
    clips = _clips(4)  # 1.2 .. 6.1 s: windows of 5 and 10 s
    auto = Window("auto", 5)
    ref = _ids(_with_plan(model, GreedyPlan(auto)), proc, clips)
    torch._dynamo.reset()
    comp = _with_plan(model, GreedyPlan(auto, compiled=True))
    got = _ids(comp, proc, clips[:1])
    graphs = recompile_count()
    assert _ids(comp, proc, clips[1:]) == ref[1:] and got == ref[:1]
    assert recompile_count() - graphs <= 1  # at most the cross length turning symbolic


def test_batch_gives_clip_by_clip_texts_tiny(tiny):
    model, proc = tiny
    clips = _clips(3)
    greedy = _with_plan(model, GreedyPlan())
    one = [proc.tokenizer.decode(i, skip_special_tokens=True).strip()  # as one clip's text
           for i in _ids(greedy, proc, clips)]
    assert decode.transcribe_batch(greedy.model, proc, clips, greedy.options, language="ru",
                                   cap=12) == one


def test_recipe_hands_over_its_decoding_options_and_notes_isa(tiny):
    """The options travel with the applied recipe, explicitly: nothing is set on the model."""
    model, _ = tiny
    before = set(vars(model))
    applied = apply_recipe(copy.deepcopy(model), Recipe.parse(
        "decode.loop=greedy,encoder.window=auto"))
    assert applied.options == GreedyPlan(Window("auto", 5))
    assert set(vars(applied.model)) == before
    assert any(n.startswith("isa: aten") for n in applied.notes)
    assert apply_recipe(copy.deepcopy(model), Recipe()).options == GeneratePlan()


# ---- real model (slow) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_clips(shared_dir):
    return load_eval_set("shared", language="ru").utterances[:6]


def _content(m, processor, clips):
    model, plan = _pair(m)
    return [evaluate.transcribe(model, processor, u, language="ru", options=plan)[1]
            for u in clips]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["", "quant.scheme=dynamic_int8"])
def test_greedy_and_compiled_step_equal_generate_real(real_model, real_clips, recipe):
    base = apply_recipe(copy.deepcopy(real_model.model), Recipe.parse(recipe)).model
    ref = _content(base, real_model.processor, real_clips)  # generate
    for plan in (GreedyPlan(), GreedyPlan(compiled=True), GreedyPlan(scripted=True)):
        torch._dynamo.reset()
        got = _content(_with_plan(base, plan), real_model.processor, real_clips)
        if recipe and (plan.compiled or plan.scripted):
            # The static step attends over the whole masked cache and inductor fuses ops, so a
            # dynamic-int8 Linear's input differs by ulps;
            # the per-tensor activation scale then rounds differently and a near-tie can flip
            # a token (seen on one clip of six on CI). Exact in fp32, close in int8.
            assert _token_error_rate(ref, got) <= 0.1, (plan, ref, got)
            assert sum(g == r for g, r in zip(got, ref)) >= len(ref) - 2, (plan, ref, got)
        else:
            assert got == ref, plan


def test_timestamps_greedy_equals_generate_real(real_model, real_clips):
    """On real speech the greedy loop with timestamps, eager and scripted, gives HF
    generate(return_timestamps=True)'s text tokens, which differ from decoding without."""
    model, proc = real_model.model, real_model.processor
    ref = _content(_with_plan(model, GeneratePlan(timestamps=True)), proc, real_clips)
    for plan in (GreedyPlan(timestamps=True), GreedyPlan(timestamps=True, scripted=True)):
        assert _content(_with_plan(model, plan), proc, real_clips) == ref, plan
    assert ref != _content(model, proc, real_clips)


def _token_error_rate(ref: list[list[int]], got: list[list[int]]) -> float:
    import jiwer

    def words(ids):
        return " ".join(map(str, ids)) or "<empty>"
    return jiwer.wer([words(r) for r in ref], [words(g) for g in got])


@pytest.mark.slow
def test_fast_mix_close_to_its_eager_self_real(real_model, real_clips):
    """The fastest mix's numerics-changing levers (bf16 cross K/V, frozen compiled bf16
    encoder) keep the eager mix's tokens on real speech, up to near ties."""
    mix = ("quant.enc_attn=bf16,quant.enc_mlp=bf16,quant.dec_self=dynamic_int8,"
           "quant.dec_cross=dynamic_int8,quant.dec_mlp=dynamic_int8,quant.head=dynamic_int8,"
           "decode.loop=greedy")
    proc = real_model.processor
    ref = _content(apply_recipe(copy.deepcopy(real_model.model), Recipe.parse(mix)), proc,
                   real_clips)
    for extra in ("decode.cross_kv=bf16", "decode.compile=script,decode.cross_kv=bf16,"
                  "encoder.compile=freeze"):
        fast = apply_recipe(copy.deepcopy(real_model.model), Recipe.parse(f"{mix},{extra}"))
        got = _content(fast, proc, real_clips)
        ter, same = _token_error_rate(ref, got), sum(g == r for g, r in zip(got, ref))
        assert ter <= 0.1, (extra, ter, ref, got)
        # Without AMX (avx512_bf16 kernels) bf16 K/V flips a near tie in up to half the clips
        # (3 of 6 on an AMD EPYC, token error rate within the bound); 4 of 6 kept on AMX.
        assert same >= len(ref) // 2, (extra, ter, same, ref, got)


@pytest.mark.slow
def test_batch_texts_real(real_model, real_clips):
    m = _with_plan(real_model.model, GreedyPlan())
    proc = real_model.processor
    one = [evaluate.transcribe(m.model, proc, u, language="ru", options=m.options)[0]
           for u in real_clips[:4]]
    assert decode.transcribe_batch(m.model, proc, real_clips[:4], m.options, language="ru",
                                   cap=120) == one


def test_isa_note_says_what_the_capped_kernels_have(monkeypatch):
    """Under the AVX2 caps the note says fbgemm and oneDNN run without VNNI, whatever the CPU's
    flags (benchmark rows carry it)."""
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    decode.isa_note.cache_clear()
    try:
        note = decode.isa_note()
    finally:
        decode.isa_note.cache_clear()
    assert "fbgemm without VNNI" in note and "oneDNN without VNNI" in note
