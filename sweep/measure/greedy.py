"""The greedy loop's decoding step: the decoder as a function of (tokens, position).

The encoder runs once and cross-attention keys/values once per clip; per token only the
decoder layers run, with a preallocated self-attention KV cache and HF's suppress /
begin-suppress masks. Eager, the step repeats HF's operations on HF's shapes (exact tokens).
Compiled, it is torch.compile'd with static shapes (cache padded to `max_target_positions`,
position as a tensor): one graph for the prompt and one per token whatever the clip, CUDA
graphs (`reduce-overhead`) on cuda; or traced by TorchScript (`_Scripted`). Compiled fp32
gives the same tokens; with dynamic int8, the static step (whole cache, masked) and fused ops
change the activations by ulps, so the per-tensor scale may round differently and a near-tie
token can flip (the sweep measures WER for every recipe anyway). The traced step fuses
nothing: it runs the eager static step's ops.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn


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


_RUNTIMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def timestamp_begin(gc) -> int:
    """The first timestamp token, <|0.00|>: the one after <|notimestamps|> (HF's reading; every
    token from it on is a timestamp, 0.02 s apart)."""
    return gc.no_timestamps_token_id + 1


class Greedy:
    """The decoder as a step function of (tokens, position) for one model and batch size:
    preallocated self-attention cache, suppress masks, eager or compiled step."""

    @classmethod
    def of(cls, model, batch: int, compiled: bool, scripted: bool = False,
           cross_dtype: torch.dtype | None = None, timestamps: bool = False) -> Greedy:
        per_model = _RUNTIMES.setdefault(model, {})
        key = (batch, compiled, scripted, cross_dtype, timestamps)
        if key not in per_model:
            per_model[key] = cls(model, batch, compiled, scripted, cross_dtype, timestamps)
        return per_model[key]

    def __init__(self, model, batch: int, compiled: bool, scripted: bool = False,
                 cross_dtype: torch.dtype | None = None, timestamps: bool = False):
        cfg, dec = model.config, model.model.decoder
        # Cross-attention keys/values in another dtype (bf16: half the bytes read per token);
        # None keeps the encoder output's.
        self.cross_dtype = cross_dtype
        # Submodules only: a reference to `model` would keep it (the weak key) alive forever.
        self.dec, self.layers = dec, list(dec.layers)
        self.heads = cfg.decoder_attention_heads
        self.head_dim = cfg.d_model // self.heads
        ref = dec.embed_positions.weight  # the decoder's dtype (tokens may be int8)
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
        # Decoding with timestamps: the text tokens (below the first timestamp), which the step
        # masks when the timestamps' summed probability beats every text token's (HF's
        # WhisperTimeStampLogitsProcessor; its rules on the tokens so far are the caller's).
        self.text = None
        if timestamps:
            self.text = torch.arange(cfg.vocab_size, device=ref.device) < timestamp_begin(gc)
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
        elif scripted:
            self.step = _Scripted(self)
        # `decode.stream`'s step, a position per row: traced when scripted, else the static
        # step run eagerly (a compiled step is one static graph: it decodes fixed batches)
        self.row_step = self.step if scripted and not compiled else self._static_step

    def cross(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every layer, once per clip (as HF's first step)."""
        shape = (enc.shape[0], -1, self.heads, self.head_dim)
        out = []
        for layer in self.layers:
            a = layer.encoder_attn
            kv = tuple(p(enc).view(shape).transpose(1, 2).to(self.cross_dtype or enc.dtype)
                       .contiguous() for p in (a.k_proj, a.v_proj))
            for t in kv:  # encoder windows differ between clips: not a new graph each
                torch._dynamo.maybe_mark_dynamic(t, 2)
            out.append(kv)
        return out

    def _embed(self, ids, positions):
        dec = self.dec
        return dec.embed_tokens(ids) + dec.embed_positions.weight[positions]

    def _head(self, h, mask):
        logits = self.head(self.dec.layer_norm(h))[:, -1].float()
        logits = logits.masked_fill(mask, -float("inf"))
        if self.text is not None:
            logp = logits.log_softmax(-1)
            stamp = logp.masked_fill(self.text, -float("inf")).logsumexp(-1)
            word = logp.masked_fill(~self.text, -float("inf")).amax(-1)
            logits = logits.masked_fill((stamp > word)[:, None] & self.text, -float("inf"))
        return logits.argmax(-1)

    def _eager_step(self, ids, pos: int, cross, mask):
        # HF's operations on HF's shapes: attention reads the cache up to the current token.
        n = pos + ids.shape[1]
        h = self._embed(ids, torch.arange(pos, n, device=ids.device))
        for i, layer in enumerate(self.layers):
            h = self._layer(layer, h, i, slice(pos, n), self.k[i][:, :, :n],
                            self.v[i][:, :, :n], cross[i], None)
        return self._head(h, mask)

    def _static_step(self, ids, pos: torch.Tensor, cross, mask):
        # Fixed shapes: the whole cache, positions after the current token masked out. `pos`:
        # the batch's position (0-d), or each row's ((batch,), `stream`: rows at their own
        # place in their own clips, each with its own window's cross K/V).
        positions = pos.reshape(-1, 1) + torch.arange(ids.shape[1], device=ids.device)
        keep = (torch.arange(self.k[0].shape[2], device=ids.device)
                <= positions[..., None])[:, None]  # (1 or batch, 1, tokens, cache)
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
            elif where.shape[0] == 1:  # one position for the batch
                cache[i].index_copy_(2, where[0], new)
            else:  # each row at its own
                rows = torch.arange(b, device=h.device)[:, None]
                cache[i].transpose(1, 2).index_put_((rows, where), new.transpose(1, 2))
        o = nn.functional.scaled_dot_product_attention(
            q.contiguous(), keys, values, attn_mask=keep, is_causal=keep is None and t > 1,
            scale=1.0)
        h = h + p["self_attn.out_proj"](o.transpose(1, 2).reshape(b, t, -1))
        x = layer.encoder_attn_layer_norm(h)
        q = (p["encoder_attn.q_proj"](x) * layer.encoder_attn.scaling).view(shape).transpose(1, 2)
        if isinstance(cross, list):  # a (K, V) per row, each on its own window
            o = torch.cat([_attend(q[r:r + 1], *kv) for r, kv in enumerate(cross)])
        else:
            o = _attend(q, *cross)
        h = h + p["encoder_attn.out_proj"](o.transpose(1, 2).reshape(b, t, -1))
        x = layer.final_layer_norm(h)
        return h + p["fc2"](layer.activation_fn(p["fc1"](x)))


def _attend(q, k, v):
    """Cross-attention of queries `q` on keys/values in their own dtype."""
    if k.dtype == q.dtype:
        return nn.functional.scaled_dot_product_attention(q.contiguous(), k, v, scale=1.0)
    return nn.functional.scaled_dot_product_attention(
        q.to(k.dtype).contiguous(), k, v, scale=1.0).to(q.dtype)


class _Scripted:
    """The static step traced by TorchScript, one trace per token shape (the prompt, the
    following tokens). The encoder window's length stays a traced dimension: no Python value
    of the step depends on it (the cross-attention reads it from the K/V tensors), so the trace
    made on one window runs every other one with the same result to the bit, and a new window
    (every 1 s bucket of `encoder.window=auto`, in a server too) pays no trace of its own
    (tests/test_decode.py). It runs the same aten ops as the eager static step,
    but from TorchScript's interpreter instead of Python, and torch.ao's int8 Linears are
    native there (their packed weights are TorchScript objects). TorchScript is deprecated in
    torch; this stays a recipe choice the sweep measures, next to torch.compile."""

    def __init__(self, rt: Greedy):
        self.traces: dict = {}
        # The traced module must own every tensor the step reads or writes: the decoder and
        # head (weights, packed int8 params) and the KV caches (updated in place each token).
        self.holder = nn.Module()
        self.holder.dec, self.holder.head = rt.dec, rt.head
        for i, (k, v) in enumerate(zip(rt.k, rt.v)):
            self.holder.register_buffer(f"k{i}", k, persistent=False)
            self.holder.register_buffer(f"v{i}", v, persistent=False)
        self.holder.forward = rt._static_step

    def __call__(self, ids, pos, cross, mask):
        pos_t = pos if isinstance(pos, torch.Tensor) else torch.tensor(pos, device=ids.device)
        # not the window (see above); per-row cross K/V and positions are a trace of their own
        key = (tuple(ids.shape), tuple(mask.shape), tuple(pos_t.shape))
        fn = self.traces.get(key)
        if fn is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = torch.jit.trace(self.holder, (ids, pos_t, cross, mask), check_trace=False)
            # (tracing ran the step once; the call below writes the same cache slots again)
            self.traces[key] = fn
        return fn(ids, pos_t, cross, mask)


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


