"""Decoding plans: how `sweep.evaluate.transcribe` turns features into tokens.

A recipe's `decode.*` and `encoder.*` parameters become one frozen plan stored on the model
(`model.hyper_decode`, by `apply_plan`, the compress handler of both configs); `decode()`
dispatches on the plan's type through `RUNNERS`. A model without a plan decodes as before.

- `GeneratePlan`: HF `generate` (greedy, language and task given, no timestamps).
- `GreedyPlan`: a lean greedy loop with the same tokens: the encoder once, cross-attention
  keys/values once per clip, then per token only the decoder layers with a preallocated
  self-attention KV cache and HF's suppress / begin-suppress masks. Eager, it repeats HF's
  operations on HF's shapes (exact). `compiled`: the step is torch.compile'd with static
  shapes (cache padded to `max_target_positions`, position as a tensor), one graph for the
  prompt and one per token whatever the clip; CUDA graphs (`reduce-overhead`) on cuda.
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

import torch
from torch import nn

from . import window as win
from .window import Window

PLAN_ATTR = "hyper_decode"


@dataclass(frozen=True)
class Plan:
    window: Window = field(default_factory=Window)
    compiled: bool = False  # torch.compile of the decoding step (the greedy loop only)
    no_repeat: int = 0  # HF's no_repeat_ngram_size: no n-gram twice (0 = off)

    def describe(self) -> str:
        w = self.window
        return (type(self).__name__.removesuffix("Plan").lower()
                + (" compiled step" if self.compiled else "")
                + (f", no repeated {self.no_repeat}-gram" if self.no_repeat else "")
                + ("" if w.mode == "full" else f", encoder window {w.mode} ({w.bucket_s} s)"))


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
# plan type -> fn(plan, model, feats, language, task, cap) -> token ids per clip
RUNNERS: dict[type, Callable] = {}


def plan_for(recipe) -> Plan:
    """The plan of a Recipe (its `decode` and `encoder` configs)."""
    w = Window(recipe.encoder.window, recipe.encoder.bucket_s)
    d = recipe.decode
    return PLANS[d.loop](window=w, compiled=d.compile == "step", no_repeat=d.no_repeat_ngram)


def plan_of(model: nn.Module) -> Plan:
    return getattr(model, PLAN_ATTR, None) or GeneratePlan()


def apply_plan(model: nn.Module, cfg, ctx) -> None:
    """Compress handler of DecodeConfig and EncoderConfig: both store the recipe's one plan."""
    plan = plan_for(ctx.recipe)
    if plan.compiled:
        torch._dynamo.reset()  # no graphs of an earlier trial's model (guards on module ids)
    setattr(model, PLAN_ATTR, plan)
    if not any(n.startswith("decode: ") for n in ctx.notes):
        ctx.notes += [f"decode: {plan.describe()}", f"isa: {isa_note()}"]


def features(model, processor, audios, durations) -> torch.Tensor:
    """Log-mel features of clips, cut to the plan's encoder window (the longest clip's)."""
    full = win.full_frames(model)
    frames = max(plan_of(model).window.frames(d, full) for d in durations)
    return win.features(model, processor, audios, frames)


def decode(model, feats: torch.Tensor, *, language: str, task: str, cap: int) -> list[list[int]]:
    """Token ids per clip (prompt and end-of-text left out), by the model's plan."""
    plan = plan_of(model)
    with torch.inference_mode():
        return RUNNERS[type(plan)](plan, model, feats, language, task, cap)


def transcribe_batch(model, processor, utts, *, language: str, task: str = "transcribe",
                     cap: int) -> list[str]:
    """Texts of several clips decoded as one batch (throughput; a shared encoder window)."""
    feats = features(model, processor, [u.audio for u in utts], [u.duration_s for u in utts])
    ids = decode(model, feats, language=language, task=task, cap=cap)
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)


def prompt_ids(model: nn.Module, language: str, task: str) -> list[int]:
    """What generate starts the decoder with: <|startoftranscript|>, language and task
    (multilingual models), <|notimestamps|>."""
    gc = model.generation_config
    ids = [gc.decoder_start_token_id]
    if getattr(gc, "is_multilingual", False):
        tok = language if language.startswith("<|") else f"<|{language}|>"
        if tok not in gc.lang_to_id:
            raise ValueError(f"`language` must be a language code of the model (e.g. ru), "
                             f"got {language=}")
        if task not in gc.task_to_id:
            raise ValueError(f"`task` must be one of {tuple(gc.task_to_id)}, got {task=}")
        ids += [gc.lang_to_id[tok], gc.task_to_id[task]]
    return ids + [gc.no_timestamps_token_id]


def _cut(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos)] if eos in row else row


def _generate(plan, model, feats, language, task, cap):
    kwargs = dict(language=language, task=task, max_new_tokens=cap, num_beams=1, do_sample=False)
    if plan.no_repeat:
        kwargs["no_repeat_ngram_size"] = plan.no_repeat
    if feats.shape[-1] == win.full_frames(model):
        out = model.generate(feats, **kwargs)
    else:  # HF's encoder refuses other windows: hand generate the encoder output
        from transformers.modeling_outputs import BaseModelOutput

        enc = win.encode(model, feats)
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc), **kwargs)
    return [_cut(row, model.generation_config.eos_token_id) for row in out.tolist()]


@dataclass(frozen=True)
class Timing:
    """A greedy runtime's last batch: encoder + cross K/V seconds, decoding loop seconds (of
    which `first_s` the prompt step) and steps (generated tokens incl. end-of-text)."""
    encode_s: float
    decode_s: float
    first_s: float
    steps: int

    # per generated token after the prompt step
    ms_per_token = property(lambda self: 1000 * (self.decode_s - self.first_s)
                            / max(1, self.steps - 1))


def _greedy(plan, model, feats, language, task, cap):
    prompt = prompt_ids(model, language, task)
    cap = min(cap, model.config.max_target_positions - len(prompt))
    t0 = time.perf_counter()
    enc = win.encode(model, feats)
    rt = Greedy.of(model, enc.shape[0], plan.compiled)
    cross = rt.cross(enc)
    eos, t1 = model.generation_config.eos_token_id, time.perf_counter()
    ids = torch.tensor([prompt] * enc.shape[0], device=enc.device)
    done = torch.zeros(enc.shape[0], dtype=torch.bool, device=enc.device)
    out, pos, seqs = [], 0, [list(prompt) for _ in range(enc.shape[0])]
    for step in range(cap):
        mask = rt.masks[min(step, 1)]
        if plan.no_repeat:
            mask = _ban_repeats(mask, seqs, plan.no_repeat)
        nxt = rt.step(ids, pos, cross, mask).masked_fill(done, eos)
        out.append(nxt)  # finished rows are padded with eos, as generate pads them
        for row, tok in zip(seqs, nxt.tolist() if plan.no_repeat else ()):
            row.append(tok)
        done |= nxt == eos
        if step == 0:
            t2 = time.perf_counter()
        if bool(done.all()):
            break
        pos += ids.shape[1]
        ids = nxt[:, None]
    rows = torch.stack(out, 1).tolist()
    rt.last = Timing(t1 - t0, time.perf_counter() - t1, t2 - t1, len(out))
    return [_cut(row, eos) for row in rows]


def _ban_repeats(mask: torch.Tensor, seqs: list[list[int]], n: int) -> torch.Tensor:
    """`mask` plus, per row, the tokens that would repeat one of its n-grams (HF's
    NoRepeatNGramLogitsProcessor, prompt included)."""
    mask = mask.clone()
    for r, row in enumerate(seqs):
        if len(row) + 1 >= n:
            tail = row[len(row) - n + 1:]
            mask[r, [row[i + n - 1] for i in range(len(row) - n + 1)
                     if row[i:i + n - 1] == tail]] = True
    return mask


RUNNERS.update({GeneratePlan: _generate, GreedyPlan: _greedy})
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
        # One tensor per layer, updated in place: a compiled step then writes one position
        # (a slice of one stacked tensor is copied whole by functionalization).
        shape = (batch, self.heads, cfg.max_target_positions, self.head_dim)
        self.k = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in self.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)
        gc = model.generation_config
        sup = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=ref.device)
        sup[list(gc.suppress_tokens or [])] = True
        begin = sup.clone()
        begin[list(gc.begin_suppress_tokens or [])] = True
        # the first generated token, the others; per row (no_repeat bans differ by row)
        self.masks = tuple(m.expand(batch, -1).contiguous() for m in (begin, sup))
        self.last: Timing | None = None
        names = ("self_attn.q_proj", "self_attn.out_proj", "encoder_attn.q_proj",
                 "encoder_attn.out_proj", "fc1", "fc2")
        wrap = _opaque if compiled else (lambda m: m)
        # Per layer: the Linear-like modules the step calls (k/v projections below).
        self.proj = [{n: wrap(layer.get_submodule(n)) for n in names} for layer in self.layers]
        self.kv = [tuple(wrap(layer.self_attn.get_submodule(n)) for n in ("k_proj", "v_proj"))
                   for layer in self.layers]
        self.head = wrap(model.proj_out)
        self.step = self._eager_step
        if compiled:
            mode = "reduce-overhead" if ref.device.type == "cuda" else None
            fn = torch.compile(self._static_step, dynamic=False, fullgraph=True, mode=mode)
            self.step = lambda ids, pos, cross, mask: fn(
                ids, torch.tensor(pos, device=ids.device), cross, mask)

    def cross(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every layer, once per clip (as HF's first step)."""
        shape = (enc.shape[0], -1, self.heads, self.head_dim)
        out = []
        for layer in self.layers:
            a = layer.encoder_attn
            kv = tuple(p(enc).view(shape).transpose(1, 2).contiguous()
                       for p in (a.k_proj, a.v_proj))
            for t in kv:  # encoder windows differ between clips: not a new graph each
                torch._dynamo.maybe_mark_dynamic(t, 2)
            out.append(kv)
        return out

    def _embed(self, ids, positions):
        dec = self.model.model.decoder
        return dec.embed_tokens(ids) + dec.embed_positions.weight[positions]

    def _head(self, h, mask):
        logits = self.head(self.model.model.decoder.layer_norm(h))[:, -1].float()
        return logits.masked_fill(mask, -float("inf")).argmax(-1)

    def _eager_step(self, ids, pos: int, cross, mask):
        # HF's operations on HF's shapes: attention reads the cache up to the current token.
        n = pos + ids.shape[1]
        h = self._embed(ids, torch.arange(pos, n, device=ids.device))
        for i, layer in enumerate(self.layers):
            h = self._layer(layer, h, i, slice(pos, n), self.k[i][:, :, :n],
                            self.v[i][:, :, :n], cross[i], None)
        return self._head(h, mask)

    def _static_step(self, ids, pos: torch.Tensor, cross, mask):
        # Fixed shapes: the whole cache, positions after the current token masked out.
        positions = pos + torch.arange(ids.shape[1], device=ids.device)
        keep = torch.arange(self.k[0].shape[2], device=ids.device) <= positions[:, None]
        h = self._embed(ids, positions)
        for i, layer in enumerate(self.layers):
            h = self._layer(layer, h, i, positions, self.k[i], self.v[i], cross[i], keep)
        return self._head(h, mask)

    def _layer(self, layer, h, i, where, keys, values, cross, keep):
        b, t, _ = h.shape
        shape, p = (b, t, -1, self.head_dim), self.proj[i]
        x = layer.self_attn_layer_norm(h)
        q = (p["self_attn.q_proj"](x) * layer.self_attn.scaling).view(shape).transpose(1, 2)
        for cache, proj in zip((self.k, self.v), self.kv[i]):
            new = proj(x).view(shape).transpose(1, 2)
            if isinstance(where, slice):
                cache[i][:, :, where] = new
            else:
                cache[i].index_copy_(2, where, new)
        o = nn.functional.scaled_dot_product_attention(
            q.contiguous(), keys, values, attn_mask=keep, is_causal=keep is None and t > 1,
            scale=1.0)
        h = h + p["self_attn.out_proj"](o.transpose(1, 2).reshape(b, t, -1))
        x = layer.encoder_attn_layer_norm(h)
        q = (p["encoder_attn.q_proj"](x) * layer.encoder_attn.scaling).view(shape).transpose(1, 2)
        o = nn.functional.scaled_dot_product_attention(q.contiguous(), *cross, scale=1.0)
        h = h + p["encoder_attn.out_proj"](o.transpose(1, 2).reshape(b, t, -1))
        x = layer.final_layer_norm(h)
        return h + p["fc2"](layer.activation_fn(p["fc1"](x)))


# torch.ao's int8 modules hold TorchScript objects that dynamo cannot trace (a graph break per
# Linear): a compiled step calls them through one opaque custom op, by handle.
_OPAQUE: dict[int, tuple[weakref.ref, int]] = {}  # handle -> (module, out_features)


@torch.library.custom_op("hyper::opaque_linear", mutates_args=())
def _opaque_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _OPAQUE[handle][0]()(x)


@_opaque_linear.register_fake
def _(x, handle):
    return x.new_empty(*x.shape[:-1], _OPAQUE[handle][1])


class _Opaque(nn.Module):
    def __init__(self, handle: int):
        super().__init__()
        self.handle = handle

    def forward(self, x):
        return _opaque_linear(x, self.handle)


def _opaque(mod: nn.Module) -> nn.Module:
    from .kernels import AoInt8Linear

    if not isinstance(mod, AoInt8Linear):
        return mod
    handle = len(_OPAQUE)
    _OPAQUE[handle] = (weakref.ref(mod), mod.packed._weight_bias()[0].shape[0])
    return _Opaque(handle)


@functools.cache
def isa_note() -> str:
    """Instruction sets the kernels use here: ATen's vector level, the torch.ao int8 engine and
    oneDNN's bf16 matmul kernel (read from its verbose log, written to fd 1 below Python)."""
    from .kernels import cpu_flags

    dots = "+".join(sorted({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())) or "none"
    text = (f"aten {torch.backends.cpu.get_cpu_capability()}, int8 engine "
            f"{torch.backends.quantized.engine} (CPU int8 dot products: {dots})")
    x = torch.ones(64, 512, dtype=torch.bfloat16)  # small shapes skip oneDNN
    with tempfile.TemporaryFile() as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                nn.functional.linear(x, x)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        impl = re.findall(r"matmul,([^,]+),", f.read().decode(errors="replace"))
    return text + f", oneDNN bf16 matmul {impl[0] if impl else 'not logged'}"
