"""int8 with per-token activation scales (`quant.*=int8_token`): activations quantized per row
at run time, weights per output channel, the product on `torch._int_mm` (int8 x int8 -> int32,
oneDNN's VNNI/AMX kernels on CPU).

torch.ao's dynamic int8 (fbgemm) scales a whole (1500 x d) activation by one number, so the
frames of a 30 s window that carry speech share 8 bits with the padding's and with the outlier
channels: on whisper-base that cost the encoder output 12.5% relative error, against 5.4% per
token (8 calibration clips). Activations are asymmetric (a zero point per row): the fc2 inputs
are GELU outputs, nearly all positive, and would lose a bit to a symmetric range.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..inputs import machine
from . import kernels, stored
from .modules import run_calibration


class TokenInt8Linear(nn.Module):
    """y = x W^T + b with x quantized per token (asymmetric int8) and W per output channel
    (symmetric int8): y = s_x * s_w * (q_x q_W^T - z_x * sum_k q_W) + b."""

    def __init__(self, linear: nn.Linear, stats: dict | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127)
        # (in, out): _int_mm's right operand; float copies of what the epilogue multiplies by
        self.register_buffer("weight_int8", q.to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        # zero-point correction per output channel: sum_k q_W[n, k] * s_w[n]
        self.register_buffer("weight_sum", q.sum(1) * scale)
        # always a tensor (zeros without one): one compiled graph for every layer
        self.register_buffer("bias", torch.zeros(self.out_features, device=w.device)
                             if linear.bias is None else linear.bias.detach().float().clone())

    @classmethod
    def from_parts(cls, weight_int8, weight_scale, bias) -> TokenInt8Linear:
        """Rebuilt from its own tensors (a stored checkpoint), without quantizing again."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = weight_int8.shape
        m.register_buffer("weight_int8", weight_int8)
        m.register_buffer("weight_scale", weight_scale)
        m.register_buffer("weight_sum", weight_int8.t().float().sum(1) * weight_scale)
        m.register_buffer("bias", bias if bias is not None else torch.zeros(
            m.out_features, device=weight_scale.device))
        return m

    def forward(self, x):
        shape = x.shape
        fn = _token_linear if torch.jit.is_tracing() or torch.compiler.is_compiling() \
            else _compiled()
        y = fn(x.reshape(-1, self.in_features), self.weight_int8, self.weight_scale,
               self.weight_sum, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per-token"


def _token_linear(x, weight_int8, weight_scale, weight_sum, bias):
    """The per-token product on (rows, in) `x`, in `x`'s dtype. Eager it makes ~10 passes over
    the activations; compiled (inductor) the quantization is one kernel and the epilogue another,
    and it runs as fast as fbgemm's per-tensor kernel (whisper-base's shapes, measured)."""
    x2 = x.float()
    lo = x2.amin(1, keepdim=True).clamp(max=0)  # zero stays exact (the padding's silence)
    hi = x2.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp_min(1e-8) / 255
    zero = torch.round(-lo / scale) - 128  # q = round(x / scale) + zero in [-128, 127]
    q = torch.clamp(torch.round(x2 / scale) + zero, -128, 127).to(torch.int8)
    y = (torch._int_mm(q, weight_int8) * weight_scale - zero * weight_sum) * scale + bias
    return y.to(x.dtype)


@functools.cache
def _compiled():
    # One graph for every shape (dynamic): the encoder's window and the layers' widths vary;
    # dynamo adds one for a single row (decoding) and one outside inference mode.
    return torch.compile(_token_linear, dynamic=True)


kernels.impl("int8_token", "torch._int_mm(per-token)", vnni=True)(TokenInt8Linear)


class RowInt8Linear(nn.Module):
    """Per-token int8 on fbgemm's per-tensor kernel, for CPUs where `torch._int_mm` has no fast
    kernel (no VNNI: it ran 25x slower than fp32 on an AVX2-only EPYC, issue #25).

    Each row x gets its own step s and integer zero z, so that q = round(x / s) + z spans the
    kernel's whole range and x = 0 stays exact; fbgemm is handed u = x / s + z with one fixed
    scale (1) and zero point (0), so that its quantization is q = round(u), and then
    y = s * (q W_q^T) - s * z * sum_k W_q[:, k] + b: the row's step and zero come back as one
    rank-2 update (offset and bias) by the BLAS, with the sum taken over the *quantized* weights.

    Both details matter on whisper-base's encoder (6 held-out clips, all MLP Linears, under the
    AVX2 caps): a grid centred on the row's range instead of on zero shifts the ~2,000 near-zero
    GELU outputs of an fc2 row by up to half a step each, all the same way, and an offset taken
    with the float weights adds the weights' rounding times z. Together they made the encoder
    output 30% off (relative); fixed, 2.9%, against 2.1% for `torch._int_mm` per token.

    Without VNNI fbgemm sums pairs of u8 x s8 products in a saturating int16: 2 * 255 * 128
    overflows it. Activations keep 8 bits and weights 7 (2 * 255 * 63 fits): measured on the
    same clips, the encoder output was 6.2% off with every Linear so, against 8.2% for 7-bit
    activations over 8-bit weights. With VNNI both keep 8."""

    def __init__(self, linear: nn.Linear, stats: dict | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        bias = torch.zeros(w.shape[0]) if linear.bias is None else linear.bias.detach().float()
        qweight = stored.quantize_int8(w, 8 if machine.fbgemm_vnni() else 7)
        self._build(stored.packed_int8(qweight, torch.zeros_like(bias)), bias, 8)

    def _build(self, packed: nn.Module, bias: torch.Tensor, bits: int) -> None:
        qweight, _ = packed._weight_bias()
        self.packed = packed  # a module, so that deepcopy/pickle work
        self.out_features, self.in_features = qweight.shape
        self.weight_bits = stored.weight_bits(qweight)
        # a checkpoint written where fbgemm has VNNI (8-bit weights) keeps its activations to 7
        # bits where it has not: the pair sum must fit an int16
        self.bits = min(bits, machine.fbgemm_act_bits(self.weight_bits))
        self.levels = 2 ** self.bits - 1
        # (2, out): each output's quantized weight sum (times -s * z) and its bias (times 1)
        self.register_buffer("offset_bias", torch.stack([qweight.dequantize().sum(1).float(),
                                                         bias.float()]))

    @classmethod
    def from_parts(cls, packed: nn.Module, bias: torch.Tensor, bits: int) -> RowInt8Linear:
        """Rebuilt from its own tensors (a stored checkpoint), without quantizing again."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._build(packed, bias, int(bits))
        return m

    # Never compiled: inductor's C++ for this prologue (row min/max, dynamic shapes, torch 2.13)
    # read and wrote out of bounds (wrong values, then heap corruption); eager it is three
    # passes, and fbgemm's kernel is opaque to inductor anyway.
    @torch.compiler.disable
    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        # two passes: aminmax over rows was 6x slower than amax and amin (1500 x 2048, 2 threads,
        # torch 2.13), and addcmul 1.5x slower than mul and add_
        lo, hi = x2.amin(1, keepdim=True).clamp_max_(0), x2.amax(1, keepdim=True).clamp_min_(0)
        # levels - 1 steps: round(x / s) + z then stays in [0, levels] (round half to even)
        step = (hi - lo).div_(self.levels - 1).clamp_min_(1e-12)
        zero = torch.round(lo / step).neg_()
        # in place where it can: each temporary of a 1500 x 2048 window costs page faults
        u = (x2 * step.reciprocal()).add_(zero)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            u, 1.0, 0, self.packed._packed_params)
        y = y.mul_(step).addmm_(torch.cat([-step * zero, torch.ones_like(step)], 1),
                                self.offset_bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, per-token "
                f"on fbgemm, {self.bits}-bit activations, {self.weight_bits}-bit weights")


kernels.impl("int8_token", "fbgemm(per-token rescaled)", ("cpu",))(RowInt8Linear)


# ---- SmoothQuant (`quant.smooth`) -----------------------------------------------------------
# Activation outliers sit in a few channels, the same for every token: per-token scales cannot
# help them. Dividing those channels by s and multiplying the consumer's weight columns by s
# leaves the fp32 model unchanged and moves the outliers into the weights (quantized per output
# channel). s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (Xiao et al., 2023). Folded where the
# division is free: into the LayerNorm before q/k/v and before fc1, and into v_proj's rows for
# out_proj (each attention output channel is a mix of one v channel over the frames).
# Measured on whisper-base's encoder (KL on the calibration clips): per-tensor dynamic int8
# 0.0151 -> 0.0016 (alpha 0.5), per-token 0.00078 -> 0.00052.

SMOOTHED = {"enc_attn": ("self_attn.q_proj", "self_attn.out_proj"), "enc_mlp": ("fc1",)}


def input_absmax(model: nn.Module, names: list[str], calibrate) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |x| each named Linear saw while `calibrate(model)` ran."""
    stats, hooks = {}, []
    for n in names:
        def hook(mod, args, n=n):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[n] = torch.maximum(stats[n], a) if n in stats else a
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    run_calibration(model, calibrate, hooks=hooks)
    if missing := [n for n in names if n not in stats]:
        raise RuntimeError(f"quant.smooth: calibration ran no data through {missing[0]}")
    return stats


@torch.no_grad()
def smooth_encoder(model: nn.Module, layer_types, alpha: float, calibrate) -> int:
    """Fold SmoothQuant scales into the encoder's layers of `layer_types` (enc_attn, enc_mlp);
    returns how many input groups were smoothed."""
    enc = model.model.encoder
    where = [(i, n) for i in range(len(enc.layers)) for t in layer_types
             for n in SMOOTHED.get(t, ())]
    stats = input_absmax(model, [f"model.encoder.layers.{i}.{n}" for i, n in where], calibrate)

    def scale(xmax, weights):
        wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).float()
        return (xmax.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp(
            1e-5, 1e5)

    for i, n in where:
        layer = enc.layers[i]
        s = scale(stats[f"model.encoder.layers.{i}.{n}"], [
            _side(layer.get_submodule(c), "down").weight for c in _CONSUMERS[n]])
        if n == "self_attn.out_proj":
            v = _side(layer.self_attn.v_proj, "up")
            v.weight.div_(s[:, None].to(v.weight.dtype))
            if v.bias is not None:
                v.bias.div_(s.to(v.bias.dtype))
        else:
            ln = layer.self_attn_layer_norm if n == "self_attn.q_proj" else layer.final_layer_norm
            ln.weight.div_(s.to(ln.weight.dtype))
            ln.bias.div_(s.to(ln.bias.dtype))
        for c in _CONSUMERS[n]:
            w = _side(layer.get_submodule(c), "down").weight
            w.mul_(s.to(w.dtype))
    return len(where)


def _side(mod: nn.Module, side: str) -> nn.Module:
    """The Linear that takes the input (`down`) or makes the output (`up`): itself, or that
    factor of a low-rank pair."""
    return getattr(mod, side) if hasattr(mod, "down") and hasattr(mod, "up") else mod


_CONSUMERS = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attn.out_proj": ("self_attn.out_proj",), "fc1": ("fc1",)}


# ---- stored forms (sweep.measure.stored) ----------------------------------------------------

stored.register(
    TokenInt8Linear, "token_int8_linear",
    lambda m: ({"weight_int8": m.weight_int8, "weight_scale": m.weight_scale, "bias": m.bias},
               {}),
    lambda own, spec, every: TokenInt8Linear.from_parts(own["weight_int8"], own["weight_scale"],
                                                        own.get("bias")),
    lambda spec, dtype: "none", "int8 Linear with per-token activation scales")


def _row_save(m: RowInt8Linear):
    qweight, _ = m.packed._weight_bias()  # packed with a zero bias: `offset_bias` holds it
    return stored.int8_parts(qweight) | {"bias": m.offset_bias[1].clone()}, {"bits": m.bits}


stored.register(
    RowInt8Linear, "row_int8_linear", _row_save,
    lambda own, spec, every: RowInt8Linear.from_parts(
        stored.packed_int8(stored.int8_weight(own), torch.zeros(own["weight_int8"].shape[0])),
        # checkpoints before 2026-12-07 stored (weight sum, bias) as `offset_bias`
        own["bias"] if "bias" in own else own["offset_bias"][1], spec["bits"]),
    lambda spec, dtype: "none", "int8 Linear with per-token activation ranges on fbgemm's kernel")
