"""Implementations of each quantization scheme for one Linear, and a chooser that times them.

The fastest implementation depends on the CPU (VNNI, AMX, avx512_bf16), threads and shape: it is
measured once per machine and cached in `$HYPER_CACHE` (default ~/.cache/hyper)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..inputs import machine
from ..inputs.machine import cpu_flags
from . import stored

METHOD = 4  # bump when timing changes, so that choices measured the old way are not reused
# Relative L2 from fp32 (random data) beyond which a candidate is broken: the sound ones measure
# at most 0.067 (int4 weights), int8 summed in a saturating int16 0.12-1.0 (issue #25).
MAX_REL_ERR = 0.1
_FLAGS = ("avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


class KernelError(RuntimeError):
    """No implementation of a scheme works here for a shape."""


@dataclass(frozen=True)
class Impl:
    """One way to run a scheme: `build(linear, stats)` returns a module replacing `linear`."""
    name: str
    build: Callable[[nn.Linear, dict | None], nn.Module]
    devices: tuple[str, ...] = ("cpu", "cuda")
    # torch.jit.trace can record it (decode.compile=script); torchao's activation-quantizing
    # tensor subclasses hit an internal assert of the tracer (torch 2.13, torchao 0.18)
    traceable: bool = True
    # its int8 x int8 product is oneDNN's (`torch._int_mm`): wrong and slow without VNNI
    # (`machine.onednn_vnni`), so never a candidate there, whatever a timing on random data says
    vnni: bool = False


IMPLS: dict[str, list[Impl]] = {}  # scheme -> candidates


def impl(scheme: str, name: str, devices: tuple[str, ...] = ("cpu", "cuda"),
         traceable: bool = True, vnni: bool = False):
    def deco(build):
        IMPLS.setdefault(scheme, []).append(Impl(name, build, devices, traceable, vnni))
        return build
    return deco


def onednn_log(fn: Callable[[], object]) -> str:
    """oneDNN's verbose log of `fn()`'s primitives (the kernel each ran: `exec,cpu,<primitive>,
    <implementation>,...` lines). oneDNN writes it to fd 1 below Python: captured for the call,
    never on the console."""
    from .. import console

    with console.captured(1) as log, torch.backends.mkldnn.verbose(
            torch.backends.mkldnn.VERBOSE_ON):
        fn()
    return log.text


def fresh(linear: nn.Linear, dtype: torch.dtype | None = None) -> nn.Linear:
    """A private copy, so that a weight shared with another module (head = embeddings) stays."""
    new = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, "meta")
    dtype = dtype or linear.weight.dtype
    for name in ("weight", "bias"):
        if (t := getattr(linear, name)) is not None:
            setattr(new, name, nn.Parameter(t.detach().to(dtype, copy=True), requires_grad=False))
    return new


class CastLinear(nn.Module):
    """Runs the Linear in `dtype`; activations are cast at its boundary, output back to input's."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, autocast: bool = False):
        super().__init__()
        self.dtype, self.autocast = dtype, autocast
        # Autocast casts the fp32 weight on every call; casting keeps a copy in `dtype`.
        self.linear = fresh(linear) if autocast else fresh(linear, dtype)

    def forward(self, x):
        if self.autocast:
            with torch.autocast(x.device.type, dtype=self.dtype):
                return self.linear(x).to(x.dtype)
        return self.linear(x.to(self.dtype)).to(x.dtype)


for _dt, _dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    impl(_dt, f"cast-{_dt}")(lambda lin, stats, d=_dtype: CastLinear(lin, d))
    impl(f"autocast_{_dt}", f"autocast-{_dt}")(lambda lin, st, d=_dtype: CastLinear(lin, d, True))


class AoInt8Linear(nn.Module):
    """torch.ao int8 (deprecated, still the fastest here): per-channel int8 weights, activations
    quantized per call (dynamic) or with a calibrated scale (static: `stats`), fp32 out.

    Without VNNI (`machine.fbgemm_vnni`: its FBGEMM_ENABLE_INSTRUCTIONS cap counts) fbgemm sums
    pairs of u8 x s8 products in a saturating int16, so 8-bit activations need 7-bit weights
    (2 * 255 * 63 fits). torch.ao's own answer, `reduce_range`, keeps the weights at 8 bits and
    the activations at 7; on whisper-base's Linears (4 held-out clips, greedy decoding, AVX2
    caps) 8-bit activations over 7-bit weights were closer to fp32: relative error 0.016 against
    0.021 in the decoder, 0.015 against 0.022 in the encoder. `weight_bits=8` where a tensor is
    shared with a lookup (the tied int8 embedding) keeps `reduce_range` instead. With VNNI both
    keep 8 bits (reduce_range cut the encoder-output cosine from 0.99 to 0.98)."""

    def __init__(self, linear: nn.Linear, stats: dict | None = None,
                 weight_bits: int | None = None):
        super().__init__()
        bits = weight_bits or (8 if machine.fbgemm_vnni() else 7)
        bias = None if linear.bias is None else linear.bias.detach().float()
        # a module: deepcopy/pickle work
        self.packed = stored.packed_int8(stored.quantize_int8(linear.weight, bits), bias)
        self.reduce_range = machine.fbgemm_act_bits(bits) < 8
        self.scale, self.zero_point = _affine(stats, 127 if self.reduce_range else 255)

    @property
    def weight_bits(self) -> int:
        return stored.weight_bits(self.packed._weight_bias()[0])

    def forward(self, x):
        if self.scale is None:
            return torch.ops.quantized.linear_dynamic(x, self.packed._packed_params,
                                                      reduce_range=self.reduce_range)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self.scale, self.zero_point, self.packed._packed_params)


def _affine(stats: dict | None, levels: int) -> tuple[float | None, int]:
    if stats is None:  # dynamic
        return None, 0
    lo, hi = min(stats["in_min"], 0.0), max(stats["in_max"], 0.0)  # zero stays exact
    scale = max(hi - lo, 1e-8) / levels
    return scale, int(round(-lo / scale))


impl("dynamic_int8", "torch.ao.dynamic(per-channel)", ("cpu",))(lambda lin, st: AoInt8Linear(lin))
impl("static_int8", "torch.ao.static(per-channel)", ("cpu",))(AoInt8Linear)


def _torchao(config: str, kwargs: Callable = lambda tq: {}):
    """A builder applying torchao `config` (kwargs made once torchao is imported) to a copy."""
    def build(linear, stats):
        import torchao.quantization as tq

        new = fresh(linear)
        tq.quantize_(new, getattr(tq, config)(**kwargs(tq)))
        return new
    return build


# set_inductor_config=False: it would change global inductor settings for later trials.
impl("dynamic_int8", "torchao.Int8DynamicActivationInt8Weight", traceable=False,
     vnni=True)(_torchao("Int8DynamicActivationInt8WeightConfig",
                         lambda tq: {"set_inductor_config": False}))
impl("int8_weight_only", "torchao.Int8WeightOnly")(_torchao(
    "Int8WeightOnlyConfig", lambda tq: {"set_inductor_config": False}))
for _packing in ("UNPACKED_TO_INT8", "OPAQUE_TORCHAO_AUTO"):  # the opaque one needs its C++ lib
    impl("int8_act_int4_weight", f"torchao.Int8DynActInt4Weight(g32,{_packing.lower()})",
         traceable=False)(
        _torchao("Int8DynamicActivationIntxWeightConfig", lambda tq, p=_packing: {
            "weight_dtype": torch.int4, "weight_granularity": tq.PerGroup(32),
            "intx_packing_format": getattr(tq.quant_api.IntxPackingFormat, p)}))


def _torchao_static(linear, stats):
    amax = max(abs(stats["in_min"]), abs(stats["in_max"]), 1e-8)
    # torchao wants the scale to have the activation's rank; Whisper's are (batch, time, dim).
    scale = torch.full((1, 1, 1), amax / 127, device=linear.weight.device)
    return _torchao("Int8StaticActivationInt8WeightConfig", lambda tq: {
        "act_quant_scale": scale, "granularity": [tq.PerTensor(), tq.PerRow()],
        "set_inductor_config": False})(linear, stats)


impl("static_int8", "torchao.Int8StaticActivationInt8Weight", traceable=False,
     vnni=True)(_torchao_static)


def _bnb(linear, nf4: bool):
    import bitsandbytes as bnb

    w, has_bias = linear.weight.detach().cpu().clone(), linear.bias is not None
    if nf4:
        new = bnb.nn.Linear4bit(*w.shape[::-1], has_bias, torch.bfloat16, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        new = bnb.nn.Linear8bitLt(*w.shape[::-1], has_bias, False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
    return new.to(linear.weight.device)  # bitsandbytes quantizes while moving to the GPU


impl("bnb_int8", "bitsandbytes.Linear8bitLt", ("cuda",))(lambda lin, st: _bnb(lin, False))
impl("bnb_nf4", "bitsandbytes.Linear4bit(nf4)", ("cuda",))(lambda lin, st: _bnb(lin, True))


def fingerprint(device: str = "cpu") -> str:
    """What a timing holds for: CPU model and ISA flags (or the GPU), the ISA caps when any is
    set (`machine.caps`: they change the kernels), torch/torchao versions."""
    cap = ""
    if device == "cuda":
        name, flags = torch.cuda.get_device_name(), [torch.cuda.get_device_capability()]
    else:
        name, flags = machine.cpu_model(), [f for f in _FLAGS if f in cpu_flags()]
        cap = f"|cap={machine.caps()}" if machine.caps() else ""  # uncapped: key as before
    ao = importlib.util.find_spec("torchao") and importlib.metadata.version("torchao")
    digest = hashlib.sha1(f"{METHOD}|{name}|{flags}|{torch.__version__}|{ao}{cap}".encode())
    return f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')[:40]}-{digest.hexdigest()[:10]}"


def cache_path(device: str = "cpu") -> Path:
    root = Path(os.environ.get("HYPER_CACHE") or Path.home() / ".cache" / "hyper")
    return root / f"kernels-{fingerprint(device)}.json"


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, entry: dict) -> None:
    # Several trial workers may measure at once: merge with what is there, replace atomically.
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _load(path) | {key: entry}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def time_calls(fns: dict[str, Callable[[], object]], *, budget_s: float = 1.5,
               rounds: tuple[int, int] = (10, 200), sample_s: float = 5e-3) -> dict[str, float]:
    """Seconds per call: the best of interleaved rounds, as other processes on a shared CPU only
    ever add time (medians still moved 10x). Fast calls repeat within one sample (>= sample_s)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def once(fn, reps=1):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return sync() or (time.perf_counter() - t0) / reps

    with torch.inference_mode():
        reps = {}
        for k, fn in fns.items():
            once(fn)  # warm-up: packing, compilation, caches
            reps[k] = max(1, min(1000, int(sample_s / max(once(fn), 1e-7))))
        samples: dict[str, list[float]] = {k: [] for k in fns}
        stop = time.perf_counter() + budget_s
        for r in range(rounds[1]):
            for k, fn in fns.items():
                samples[k].append(once(fn, reps[k]))
            if r + 1 >= rounds[0] and time.perf_counter() > stop:
                break
    return {k: min(v) for k, v in samples.items()}


def choose_cached(key: str, measure: Callable[[], dict], *, device: str = "cpu",
                  valid: Callable[[dict], bool] = lambda entry: True) -> dict:
    """The cache entry under `key`, measuring (and storing) it first when missing or stale."""
    path = cache_path(device)
    entry = _load(path).get(key)
    if entry is None or not valid(entry):
        entry = measure()
        _store(path, key, entry)
    return entry


def choose(scheme: str, linear: nn.Linear, tokens: int, *, compiled: bool = False,
           traced: bool = False) -> tuple[Impl, dict]:
    """The fastest working implementation of `scheme` for `linear`'s shape on `tokens` rows
    (`traced`: among those TorchScript can trace), and its cache entry (seconds and speed-ups
    vs fp32 of every candidate, failures)."""
    device = linear.weight.device.type
    cands = {i.name: i for i in IMPLS.get(scheme, []) if device in i.devices
             and (i.traceable or not traced)}
    if not cands:
        raise KernelError(f"no implementation of {scheme} runs on {device}" + (
            " that TorchScript can trace (decode.compile=script)" if traced else ""))
    key = (f"{scheme}|{linear.in_features}x{linear.out_features}|t{tokens}"
           f"|th{torch.get_num_threads()}|{device}|{'compiled' if compiled else 'eager'}"
           + ("|traced" if traced else ""))
    entry = choose_cached(key, lambda: _measure(cands, linear, tokens, compiled), device=device,
                          valid=lambda e: set(e.get("tried", ())) == set(cands))  # same candidates
    if entry["choice"] is None:
        raise KernelError(f"no implementation of {scheme} works here: "
                          + "; ".join(f"{k}: {v}" for k, v in entry["failed"].items()))
    return cands[entry["choice"]], entry


def _measure(cands: dict[str, Impl], linear: nn.Linear, tokens: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    ref = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device).eval()
    x = torch.randn(1, tokens, linear.in_features, device=ref.weight.device)
    with torch.inference_mode():
        y = ref(x)
    stats = {"in_min": x.min().item(), "in_max": x.max().item(),
             "out_min": y.min().item(), "out_max": y.max().item()}
    fns, failed = {}, {}
    for name, cand in cands.items():
        if cand.vnni and linear.weight.device.type == "cpu" and not machine.onednn_vnni():
            failed[name] = ("needs VNNI for oneDNN's int8 product, which this CPU or its "
                            f"ONEDNN_MAX_CPU_ISA={machine.isa_cap()} lacks")
            continue
        try:
            mod = cand.build(ref, stats).eval()
            fn = torch.compile(mod, dynamic=False) if compiled else mod
            with torch.inference_mode():
                err = ((fn(x).float() - y).norm() / y.norm()).item()
            if not err <= MAX_REL_ERR:
                raise KernelError(f"relative error {err:.3g} > {MAX_REL_ERR}")
            fns[name] = functools.partial(fn, x)
        except Exception as e:  # any failure just rules the candidate out, with its reason
            failed[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    fns["fp32"] = functools.partial(torch.compile(ref, dynamic=False) if compiled else ref, x)
    secs = time_calls(fns) if len(fns) > 1 else {}
    ok = [k for k in secs if k != "fp32"]
    return {"choice": min(ok, key=secs.get) if ok else None, "seconds": secs,
            "speedup": {k: secs["fp32"] / secs[k] for k in ok}, "failed": failed,
            "tried": sorted(cands)}


# A scheme whose fastest kernel here runs the encoder's matmuls at under this share of fp32's
# speed is not searched (the launcher says so): on an AVX2-only EPYC bf16 measured 0.11x (no
# bf16 instructions) and int8_token on torch._int_mm 0.04x (no VNNI), issue #25.
SLOW_SPEEDUP = 0.5


def scheme_speedups(schemes, d_model: int = 512, ffn: int = 2048,
                    tokens: int = 1500) -> dict[str, float | None]:
    """Speed-up over fp32 of each scheme, with its fastest implementation here, on an encoder
    layer's MLP matmuls (`d_model` -> `ffn` -> `d_model` on `tokens` rows; whisper-base's by
    default); None for a scheme with no working kernel. The kernel table's entries (the keys a
    recipe's encoder uses, so measured once per machine and threads, and cached)."""
    out: dict[str, float | None] = {}
    for scheme in schemes:
        fp32 = secs = 0.0
        try:
            for i, o in ((d_model, ffn), (ffn, d_model)):
                impl, entry = choose(scheme, nn.Linear(i, o), tokens)
                fp32, secs = fp32 + entry["seconds"]["fp32"], secs + entry["seconds"][impl.name]
        except KernelError:
            out[scheme] = None
            continue
        out[scheme] = fp32 / secs
    return out


def without_vnni(schemes, d_model: int = 512, ffn: int = 2048,
                 tokens: int = 1500) -> dict[str, tuple[str | None, list[str]]]:
    """Per scheme whose own CPU kernel (its first implementation) needs VNNI where this CPU
    (or its oneDNN cap) has none, so that it runs on a fallback (int8_token: fbgemm's rescaled
    rows instead of torch._int_mm): that fallback (on an encoder MLP matmul; None when none
    works) and the implementations never tried. A scheme that merely has a VNNI alternative
    (dynamic int8's torchao) is not named. Empty where oneDNN has VNNI."""
    if machine.onednn_vnni():
        return {}
    out: dict[str, tuple[str | None, list[str]]] = {}
    for scheme in schemes:
        cpu = [i for i in IMPLS.get(scheme, []) if "cpu" in i.devices]
        if not cpu or not cpu[0].vnni:
            continue
        gated = [i.name for i in cpu if i.vnni]
        try:
            out[scheme] = (choose(scheme, nn.Linear(d_model, ffn), tokens)[0].name, gated)
        except KernelError:
            out[scheme] = (None, gated)
    return out


def encoder_speedups(d_model: int = 512, ffn: int = 2048, tokens: int = 1500) -> dict[str, float]:
    """`scheme_speedups` of the encoder schemes a machine-aware start chooses between
    (`sweep.inputs.machine.ENCODER_SCHEMES`: bf16, dynamic int8); a scheme with no working
    kernel is left out."""
    got = scheme_speedups(machine.ENCODER_SCHEMES, d_model, ffn, tokens)
    return {s: v for s, v in got.items() if v}


# ---- stored forms (sweep.measure.stored): what a checkpoint saves of these modules ---------


def _cast_save(m: CastLinear):
    own = {"weight": m.linear.weight} | ({"bias": m.linear.bias} if m.linear.bias is not None
                                         else {})
    return own, {"dtype": stored.name_of(m.dtype), "autocast": m.autocast}


def _cast_load(own, spec, every):
    m = CastLinear.__new__(CastLinear)
    nn.Module.__init__(m)
    m.dtype, m.autocast = stored.DTYPES[spec["dtype"]], bool(spec["autocast"])
    m.linear = stored.meta_linear(own["weight"], own.get("bias"))
    return m


stored.register(
    CastLinear, "cast_linear", _cast_save, _cast_load,
    lambda spec, dtype: "exact" if not spec["autocast"] and stored.DTYPES[spec["dtype"]] == dtype
    else "approximate", "Linear cast to bf16/fp16 (or autocast)")


def _ao_save(m: AoInt8Linear):
    qweight, bias = m.packed._weight_bias()
    own = stored.int8_parts(qweight) | ({"bias": bias} if bias is not None else {})
    # reduce_range: 7-bit activations, chosen by the exporting CPU (no VNNI, 8-bit weights);
    # static: the calibrated activation scale and zero point
    return own, {"reduce_range": m.reduce_range, "scale": m.scale, "zero_point": m.zero_point}


stored.register(
    AoInt8Linear, "ao_int8_linear", _ao_save,
    lambda own, spec, every: stored.ao_int8_module(
        AoInt8Linear, stored.packed_int8(stored.int8_weight(own), own.get("bias")), spec),
    lambda spec, dtype: "none", "torch.ao int8 Linear (packed int8 weights)")
