"""Decoding plans: how `sweep.evaluate.transcribe` turns audio into tokens.

The recipe's `decode.*` and `encoder.*` parameters become a frozen plan stored on the model
(`model.hyper_decode`, set by `apply_plan`, the compress handler of both configs); `decode()`
dispatches on the plan's type through `RUNNERS`. A model without a plan decodes as before.

- `GeneratePlan`: HF `generate` (greedy, language and task given, no timestamps).
- `GreedyPlan`: a lean greedy loop producing the same tokens: the encoder once, cross-attention
  keys/values once per clip, then per token only the decoder layers, with a preallocated
  self-attention KV cache and HF's suppress / begin-suppress masks. With `compiled`, the step
  runs torch.compile'd with static shapes (cache padded to `max_target_positions`, position as
  a tensor) so that one graph per prompt/step length serves every clip; on CUDA it is captured
  as CUDA graphs (`reduce-overhead`). Eager, the loop is exact: it repeats HF's operations on
  the same shapes. Compiled, it computes the same functions with fused kernels.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import window as win
from .window import Window

PLAN_ATTR = "hyper_decode"


@dataclass(frozen=True)
class Plan:
    window: Window = field(default_factory=Window)
    compiled: bool = False  # torch.compile of the decoding step (the greedy loop only)

    def describe(self) -> str:
        return (f"{type(self).__name__.removesuffix('Plan').lower()}"
                + (" compiled step" if self.compiled else "")
                + ("" if self.window.mode == "full" else
                   f", encoder window {self.window.mode} ({self.window.bucket_s} s buckets)"))


@dataclass(frozen=True)
class GeneratePlan(Plan):
    def __post_init__(self):
        if self.compiled:
            raise ValueError("`decode.compile`=step needs decode.loop=greedy: generate() runs "
                             "its own Python loop")


@dataclass(frozen=True)
class GreedyPlan(Plan):
    pass


PLANS: dict[str, type[Plan]] = {"generate": GeneratePlan, "greedy": GreedyPlan}
RUNNERS: dict[type, Callable] = {}  # plan type -> fn(plan, model, feats, prompt, cap) -> ids


def runner(plan_type: type):
    def deco(fn):
        RUNNERS[plan_type] = fn
        return fn
    return deco


def plan_for(recipe) -> Plan:
    """The plan of a Recipe (its `decode` and `encoder` configs)."""
    w = Window(recipe.encoder.window, recipe.encoder.bucket_s)
    return PLANS[recipe.decode.loop](window=w, compiled=recipe.decode.compile == "step")


def plan_of(model: nn.Module) -> Plan:
    return getattr(model, PLAN_ATTR, None) or GeneratePlan()


def apply_plan(model: nn.Module, cfg, ctx) -> None:
    """Compress handler of DecodeConfig and EncoderConfig: both store the recipe's one plan."""
    plan = plan_for(ctx.recipe)
    if plan.compiled:
        torch._dynamo.reset()  # no graphs of an earlier trial's model (guards on module ids)
    setattr(model, PLAN_ATTR, plan)
    note = f"decode: {plan.describe()}"
    if note not in ctx.notes:
        ctx.notes.append(note)
        ctx.notes.append(f"isa: {isa_note()}")


@functools.cache
def isa_note() -> str:
    """Instruction sets the kernels use here: ATen's vector level, oneDNN's (bf16 matmuls: read
    from its verbose log of one tiny bf16 matmul) and the torch.ao int8 engine."""
    from .kernels import cpu_flags

    if not torch.backends.mkldnn.is_available():
        return f"aten {torch.backends.cpu.get_cpu_capability()}, no oneDNN"
    x = torch.ones(64, 512, dtype=torch.bfloat16)  # small shapes skip oneDNN
    log = _stdout_of(lambda: torch.nn.functional.linear(x, x))
    impl = re.findall(r"matmul,([^,]+),", log)
    vnni = sorted({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
    return (f"aten {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 matmul "
            f"{impl[0] if impl else 'not logged'}, int8 engine {torch.backends.quantized.engine}"
            f" (CPU int8 dot products: {'+'.join(vnni) or 'none'})")


def _stdout_of(fn) -> str:
    """What `fn` writes to file descriptor 1 (oneDNN logs there, below Python) under oneDNN's
    verbose mode."""
    with tempfile.TemporaryFile() as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return f.read().decode(errors="replace")


def prompt_ids(model: nn.Module, language: str, task: str) -> list[int]:
    """What HF generate starts the decoder with: <|startoftranscript|>, the language and the
    task (multilingual models), <|notimestamps|>."""
    gc = model.generation_config
    ids = [gc.decoder_start_token_id]
    if getattr(gc, "is_multilingual", False):
        tok = language if language.startswith("<|") else f"<|{language}|>"
        if tok not in gc.lang_to_id:
            raise ValueError(f"`language` must be a code the model knows (e.g. ru, en), "
                             f"got {language=}")
        if task not in gc.task_to_id:
            raise ValueError(f"`task` must be one of {tuple(gc.task_to_id)}, got {task=}")
        ids += [gc.lang_to_id[tok], gc.task_to_id[task]]
    return ids + [gc.no_timestamps_token_id]


def features(model, processor, audios: list[np.ndarray], durations: list[float]) -> torch.Tensor:
    """Log-mel features of a batch, cut to the plan's encoder window (the longest clip's)."""
    plan, full = plan_of(model), win.full_frames(model)
    frames = max(plan.window.frames(d, full) for d in durations)
    feats = processor.feature_extractor(audios, sampling_rate=16000,
                                        return_tensors="pt").input_features[..., :frames]
    return feats.to(device=model.model.encoder.conv1.weight.device, dtype=input_dtype(model))


def input_dtype(model) -> torch.dtype:
    """Casting recipes change the conv front-end's dtype; features must follow it."""
    w = model.model.encoder.conv1.weight
    return w.dtype if w.is_floating_point() else torch.float32


def decode(model, feats: torch.Tensor, *, language: str, task: str, cap: int) -> list[list[int]]:
    """Token ids per clip (prompt and end-of-text left out), by the model's plan."""
    plan = plan_of(model)
    with torch.inference_mode():
        return RUNNERS[type(plan)](plan, model, feats, language, task, cap)


def transcribe_batch(model, processor, utts, *, language: str, task: str = "transcribe",
                     cap: int) -> list[str]:
    """Texts of several utterances decoded together (throughput; one shared encoder window)."""
    feats = features(model, processor, [u.audio for u in utts], [u.duration_s for u in utts])
    ids = decode(model, feats, language=language, task=task, cap=cap)
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)


@runner(GeneratePlan)
def _generate(plan, model, feats, language, task, cap):
    kwargs = dict(language=language, task=task, max_new_tokens=cap, num_beams=1, do_sample=False)
    if feats.shape[-1] == win.full_frames(model):
        out = model.generate(feats, **kwargs)
    else:  # HF's encoder refuses other windows: hand generate the encoder output
        from transformers.modeling_outputs import BaseModelOutput

        enc = win.encode(model, feats)
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc), **kwargs)
    eos = model.generation_config.eos_token_id
    return [_cut(row, eos) for row in out.tolist()]


def _cut(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos)] if eos in row else row


@runner(GreedyPlan)
def _greedy(plan, model, feats, language, task, cap):
    prompt = prompt_ids(model, language, task)
    cap = min(cap, model.config.max_target_positions - len(prompt))
    t0 = time.perf_counter()
    enc = win.encode(model, feats)
    rt = Greedy.of(model, enc.shape[0], plan.compiled)
    cross = rt.cross(enc)
    t1 = time.perf_counter()
    eos = model.generation_config.eos_token_id
    ids = torch.tensor([prompt] * enc.shape[0], device=enc.device)
    done = torch.zeros(enc.shape[0], dtype=torch.bool, device=enc.device)
    out, pos = [], 0
    for step in range(cap):
        nxt = rt.step(ids, pos, cross, rt.masks[min(step, 1)])
        nxt = nxt.masked_fill(done, eos)  # finished rows are padded, as generate does
        out.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        pos += ids.shape[1]
        ids = nxt[:, None]
    rows = torch.stack(out, 1).tolist()
    rt.last = Timing(t1 - t0, time.perf_counter() - t1, len(out))
    return [_cut(row, eos) for row in rows]


@dataclass(frozen=True)
class Timing:
    """The last clip of a greedy runtime: encoder (+ cross K/V) seconds, decoder loop seconds
    and decoder steps (generated tokens incl. end-of-text)."""
    encode_s: float
    decode_s: float
    steps: int

    ms_per_token = property(lambda self: 1000 * self.decode_s / max(1, self.steps))


_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Greedy:
    """The decoder as a step function of (tokens, position) for one model and batch size:
    preallocated self-attention cache, suppress masks, eager or compiled step."""

    @classmethod
    def of(cls, model, batch: int, compiled: bool) -> Greedy:
        per_model = _RUNTIMES.setdefault(model, {})
        if (batch, compiled) not in per_model:
            per_model[batch, compiled] = cls(model, batch, compiled)
        return per_model[batch, compiled]

    def __init__(self, model, batch: int, compiled: bool):
        cfg, dec = model.config, model.model.decoder
        self.model, self.layers = model, list(dec.layers)
        self.heads = cfg.decoder_attention_heads
        self.head_dim = cfg.d_model // self.heads
        ref = dec.embed_tokens.weight
        shape = (len(self.layers), batch, self.heads, cfg.max_target_positions, self.head_dim)
        self.k = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        self.v = torch.zeros_like(self.k)
        gc = model.generation_config
        sup = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=ref.device)
        sup[list(gc.suppress_tokens or [])] = True
        begin = sup.clone()
        begin[list(gc.begin_suppress_tokens or [])] = True
        self.masks = (begin, sup)  # first generated token, the others
        self.last: Timing | None = None
        self.step = self._eager_step
        if compiled:
            # One graph per token count (prompt, then 1), whatever the clip: positions are a
            # tensor, the cache has a fixed length; only the encoder window may vary.
            mode = "reduce-overhead" if ref.device.type == "cuda" else None
            compiled_step = torch.compile(self._static_step, dynamic=False, mode=mode)
            self.step = lambda ids, pos, cross, mask: compiled_step(
                ids, torch.tensor(pos, device=ids.device), cross, mask)

    def cross(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every layer, once per clip (as HF's first step)."""
        shape = (enc.shape[0], -1, self.heads, self.head_dim)
        out = []
        for layer in self.layers:
            a = layer.encoder_attn
            kv = tuple(p(enc).view(shape).transpose(1, 2).contiguous()
                       for p in (a.k_proj, a.v_proj))
            for t in kv:  # the window's length may change between clips: not a new graph
                torch._dynamo.maybe_mark_dynamic(t, 2)
            out.append(kv)
        return out

    def _embed(self, ids, positions):
        dec = self.model.model.decoder
        return dec.embed_tokens(ids) + dec.embed_positions.weight[positions]

    def _head(self, h, mask):
        logits = self.model.proj_out(self.model.model.decoder.layer_norm(h))[:, -1].float()
        return logits.masked_fill(mask, -float("inf")).argmax(-1)

    def _eager_step(self, ids, pos: int, cross, mask):
        # HF's operations on HF's shapes: attention reads the cache up to the current token.
        n = pos + ids.shape[1]
        h = self._embed(ids, torch.arange(pos, n, device=ids.device))
        for i, layer in enumerate(self.layers):
            h = self._layer(layer, h, i, slice(pos, n), self.k[i, :, :, :n], self.v[i, :, :, :n],
                            cross[i], None)
        return self._head(h, mask)

    def _static_step(self, ids, pos: torch.Tensor, cross, mask):
        # Fixed shapes: the whole cache, unused positions masked out.
        positions = pos + torch.arange(ids.shape[1], device=ids.device)
        keep = torch.arange(self.k.shape[3], device=ids.device) <= positions[:, None]
        h = self._embed(ids, positions)
        for i, layer in enumerate(self.layers):
            h = self._layer(layer, h, i, positions, self.k[i], self.v[i], cross[i], keep)
        return self._head(h, mask)

    def _layer(self, layer, h, i, where, keys, values, cross, keep):
        b, t, _ = h.shape
        shape = (b, t, -1, self.head_dim)
        x = layer.self_attn_layer_norm(h)
        a = layer.self_attn
        q = (a.q_proj(x) * a.scaling).view(shape).transpose(1, 2).contiguous()
        for cache, proj in ((self.k, a.k_proj), (self.v, a.v_proj)):
            new = proj(x).view(shape).transpose(1, 2)
            if isinstance(where, slice):
                cache[i, :, :, where] = new
            else:
                cache[i].index_copy_(2, where, new)
        o = nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=keep, is_causal=keep is None and t > 1, scale=1.0)
        h = h + a.out_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = layer.encoder_attn_layer_norm(h)
        a = layer.encoder_attn
        q = (a.q_proj(x) * a.scaling).view(shape).transpose(1, 2).contiguous()
        o = nn.functional.scaled_dot_product_attention(q, *cross, scale=1.0)
        h = h + a.out_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = layer.final_layer_norm(h)
        return h + layer.fc2(layer.activation_fn(layer.fc1(x)))
