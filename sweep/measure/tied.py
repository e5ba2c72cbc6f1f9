"""The tied token embedding in int8 or bf16 (`embed.dtype`), the output head run from the same
tensor, and their stored forms: the matrix is saved once whatever runs from it."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, stored

EMBEDDING = "model.decoder.embed_tokens"  # the head's source, by module name


class Int8Embedding(nn.Module):
    """Token embedding as per-row int8 with float32 scales (torch.ao's per-channel weight
    quantization, the head's): a lookup dequantizes its rows to `out_dtype`."""

    def __init__(self, parts: dict, out_dtype: torch.dtype):
        super().__init__()
        for k in ("weight_int8", "weight_scale", "weight_zero_point"):
            self.register_buffer(k, parts[k])
        self.out_dtype = out_dtype

    def forward(self, ids):
        q = self.weight_int8[ids].float() - self.weight_zero_point[ids, None].float()
        return (q * self.weight_scale[ids, None]).to(self.out_dtype)


class CastEmbedding(nn.Module):
    """Token embedding kept in its weight's dtype (bf16), lookups cast to `out_dtype`."""

    def __init__(self, weight: nn.Parameter, out_dtype: torch.dtype):
        super().__init__()
        self.weight, self.out_dtype = weight, out_dtype

    def forward(self, ids):
        return nn.functional.embedding(ids, self.weight).to(self.out_dtype)


class TiedInt8Head(kernels.AoInt8Linear):
    """The head as a torch.ao int8 Linear packed from the int8 embedding's own tensor."""


def apply(model, dtype: str, ctx) -> None:
    """Run the embedding and the head tied to it in `dtype` (fp32: nothing to do)."""
    dec = model.model.decoder
    if dtype == "bf16":
        if set(ctx.recipe.quant.by_layer_type().values()) == {"bf16"}:
            model.to(torch.bfloat16)  # every matrix bf16: the model is a bf16 model
            ctx.notes.append("embed bf16 with every Linear bf16: the whole model runs in bf16")
        weight = nn.Parameter(dec.embed_tokens.weight.detach().to(torch.bfloat16),
                              requires_grad=False)
        dec.embed_tokens = CastEmbedding(weight, dec.embed_positions.weight.dtype)
        head = kernels.CastLinear.__new__(kernels.CastLinear)
        nn.Module.__init__(head)
        head.dtype, head.autocast = torch.bfloat16, False
        head.linear = stored.meta_linear(weight, None)  # the very same tensor: stored once
        model.proj_out = head
        ctx.kernels["head"] = "cast-bf16 (tied embedding)"
    elif dtype == "int8":
        w = dec.embed_tokens.weight
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = w
        ao = kernels.AoInt8Linear(lin, weight_bits=8)  # the embedding's rows keep 8 bits
        qweight, _ = ao.packed._weight_bias()
        dec.embed_tokens = Int8Embedding(stored.int8_parts(qweight),
                                         dec.embed_positions.weight.dtype)
        model.proj_out = stored.ao_int8_module(TiedInt8Head, ao.packed, {
            "reduce_range": ao.reduce_range, "scale": None, "zero_point": 0})
        ctx.kernels["head"] = "torch.ao.dynamic(per-channel) (tied int8 embedding)"
    if dtype != "fp32":
        ctx.notes.append(f"embed {dtype}: token embedding and head share one {dtype} tensor")


# ---- stored forms ---------------------------------------------------------------------------

stored.register(
    Int8Embedding, "int8_embedding",
    lambda m: ({k: getattr(m, k) for k in ("weight_int8", "weight_scale", "weight_zero_point")},
               {"out_dtype": stored.name_of(m.out_dtype)}),
    lambda own, spec, every: Int8Embedding(own, stored.DTYPES[spec["out_dtype"]]),
    lambda spec, dtype: "none", "int8 token embedding")
stored.register(
    CastEmbedding, "cast_embedding",
    lambda m: ({"weight": m.weight}, {"out_dtype": stored.name_of(m.out_dtype)}),
    lambda own, spec, every: CastEmbedding(stored.frozen(own["weight"]),
                                           stored.DTYPES[spec["out_dtype"]]),
    # plain transformers upcasts the weight: the same rows, looked up in its dtype
    lambda spec, dtype: "exact" if stored.DTYPES[spec["out_dtype"]] == dtype else "approximate",
    "bf16 token embedding")


def _head_load(own, spec, every):
    parts = {k: every[f"{spec['embedding']}.{k}"]
             for k in ("weight_int8", "weight_scale", "weight_zero_point")}
    return stored.ao_int8_module(TiedInt8Head, stored.packed_int8(stored.int8_weight(parts), None),
                                 spec)


stored.register(
    TiedInt8Head, "tied_int8_head",
    lambda m: ({}, {"embedding": EMBEDDING, "reduce_range": m.reduce_range, "scale": m.scale,
                    "zero_point": m.zero_point}),
    _head_load, lambda spec, dtype: "none", "int8 head on the int8 embedding's tensor")
