"""Stored forms of the modules that techniques with `Storage(stored=True)` install: what a
checkpoint saves of each (the tensors it computes with, under its module's name, plus a small
JSON spec) and how loading rebuilds it from them, never from fp32 weights. So a loaded model
runs the trial's very tensors with the trial's kernels, and its weight file is as small as what
runs (int8 tensors with their per-channel scales and zero points, bf16 tensors...).

A module class registers its form with `register` beside the class (kernels, int8, lowrank,
tied); a technique's `Storage.forms` names those modules, and loading a checkpoint imports the
ones its recipe's techniques name. Each form also says what plain transformers
(`from_pretrained(dir)` alone) makes of it: `exact` (the same computation: plain keys in the
model's dtype, or torchao tensors under transformers' `TorchAoConfig`), `approximate` (plain keys
in another dtype, which transformers upcasts) or `none` (tensors transformers cannot read).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .modules import set_module

PLAIN = ("exact", "approximate", "none")  # best first
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Whisper's tied weights, as transformers names them (config.json's tie_word_embeddings)
TIED_PAIR = ("model.decoder.embed_tokens.weight", "proj_out.weight")
STACK_ATTR = "_hyper_cast_stack"  # (dtype, out_dtype) names on a module cast as a whole


class StoredError(RuntimeError):
    """A module that cannot be saved or rebuilt; the message names it and why."""


@dataclass(frozen=True)
class Form:
    kind: str
    save: Callable[[nn.Module], tuple[dict, dict]]  # module -> (tensors by suffix, JSON spec)
    load: Callable[[dict, dict, dict], nn.Module]  # (own tensors, spec, all tensors) -> module
    plain: Callable[[dict, torch.dtype], str]  # (spec, model dtype) -> one of PLAIN
    text: str = ""  # what such a module is, in words (the model card)


FORMS: dict[type, Form] = {}  # module class -> its form
KINDS: dict[str, Form] = {}  # kind (recipe.json `modules`) -> form


def register(cls: type | None, kind: str, save, load, plain, text: str) -> Form:
    """Give modules of exactly `cls` a stored form (`cls` None: matched another way)."""
    f = Form(kind, save, load, plain, text)
    KINDS[kind] = f
    if cls is not None:
        FORMS[cls] = f
    return f


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_torchao(mod) -> bool:
    w = getattr(mod, "weight", None)
    return type(mod) is nn.Linear and w is not None and type(w) not in (nn.Parameter, torch.Tensor)


def form_of(mod: nn.Module) -> Form | None:
    return KINDS["torchao_linear"] if _is_torchao(mod) else FORMS.get(type(mod))


def _plain_module(mod: nn.Module) -> bool:
    """torch's and transformers' own modules with plain tensors save as they are."""
    return type(mod).__module__.startswith(("torch.nn.", "transformers.")) and not any(
        type(t) not in (nn.Parameter, torch.Tensor)
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)))


# ---- the whole model ------------------------------------------------------------------------


def collect(model: nn.Module) -> tuple[dict, dict, dict]:
    """(tensors by key, module specs by name, tied aliases key -> key) of `model` as it runs.
    A tensor shared by two modules is saved once, under its first name; so is the head's own
    copy of the embedding when it holds the same values (transformers ties the two)."""
    tensors, specs, tied, alike = {}, {}, {}, {}

    def add(key, t):
        t = t.detach()
        if type(t) is torch.Tensor:
            same = alike.setdefault((t.dtype, tuple(t.shape)), [])
            first = next((k for k in same if tensors[k].data_ptr() == t.data_ptr() or (
                (k, key) == TIED_PAIR and torch.equal(tensors[k], t))), None)
            if first is not None:
                tied[key] = first
                return
            same.append(key)
        tensors[key] = t if type(t) is not torch.Tensor else t.contiguous()

    def visit(prefix, mod):
        f = form_of(mod)
        if f is not None:
            own, spec = f.save(mod)
            specs[prefix] = {"kind": f.kind, **spec}
            for k, t in own.items():
                add(f"{prefix}.{k}", t)
            return
        if not _plain_module(mod):
            raise StoredError(f"module `{prefix}` ({type(mod).__module__}."
                              f"{type(mod).__qualname__}) has no stored form: register one in "
                              "sweep.measure.stored")
        if hasattr(mod, STACK_ATTR):
            dtype, out = getattr(mod, STACK_ATTR)
            specs[prefix] = {"kind": "cast_stack", "dtype": dtype, "out_dtype": out}
        skip = getattr(mod, "_non_persistent_buffers_set", set())  # not in a state dict
        for n, t in list(mod.named_parameters(recurse=False)) + [
                (n, b) for n, b in mod.named_buffers(recurse=False) if n not in skip]:
            add(f"{prefix}.{n}".lstrip("."), t)
        for n, child in mod.named_children():
            visit(f"{prefix}.{n}".lstrip("."), child)

    visit("", model)
    return tensors, specs, tied


def plain_status(specs: dict, dtype: torch.dtype) -> tuple[str, list[dict]]:
    """What plain transformers gives of these stored modules: the worst of their forms, and the
    kinds that are not exact (what, exact|approximate|none, how many, one module's name)."""
    each = {n: KINDS[s["kind"]].plain(s, dtype) for n, s in specs.items()}
    worst = max(each.values(), key=PLAIN.index, default="exact")
    kinds: dict[tuple, list] = {}
    for n, p in each.items():
        if p != "exact":
            kinds.setdefault((KINDS[specs[n]["kind"]].text, p), []).append(n)
    return worst, [{"what": what, "plain": p, "modules": len(names), "example": names[0]}
                   for (what, p), names in kinds.items()]


def rebuild(model: nn.Module, tensors: dict, specs: dict, tied: dict) -> nn.Module:
    """Fill `model` (built from its config on the meta device) with `tensors`: stored modules
    rebuilt from their own, the rest assigned as they are. Returns it, in eval mode."""
    tensors = dict(tensors)
    for alias, src in tied.items():
        tensors[alias] = tensors[src]
    every = dict(tensors)
    for name, spec in sorted(specs.items(), key=lambda kv: kv[0].count(".")):
        if spec["kind"] == "cast_stack":
            continue
        if spec["kind"] not in KINDS:
            raise StoredError(f"module `{name}` is stored as {spec['kind']!r}, which this "
                              f"version cannot build (known: {', '.join(KINDS)})")
        own = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors)
               if k.startswith(name + ".")}
        try:
            set_module(model, name, KINDS[spec["kind"]].load(own, spec, every))
        except (KeyError, RuntimeError, ValueError) as e:
            raise StoredError(f"module `{name}` ({spec['kind']}) cannot be rebuilt from its "
                              f"stored tensors: {type(e).__name__}: {e}") from None
    unexpected = []
    for key, t in tensors.items():  # assigned as they are (load_state_dict would visit the
        mod_name, _, attr = key.rpartition(".")  # rebuilt modules' own loaders too)
        mod = model.get_submodule(mod_name) if mod_name else model
        if attr in mod._parameters:  # as transformers loads them (compiled graphs see it)
            mod._parameters[attr] = nn.Parameter(t, requires_grad=t.is_floating_point())
        elif attr in mod._buffers:
            mod._buffers[attr] = t
        else:
            unexpected.append(key)
    if unexpected:
        raise StoredError(f"stored tensors fit no module: {unexpected[:5]}")
    empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_meta]
    if empty:
        raise StoredError(f"no stored tensor for {len(empty)} weight(s), e.g. {empty[:3]}")
    for name, spec in specs.items():
        if spec["kind"] == "cast_stack":
            cast_stack(model.get_submodule(name), DTYPES[spec["dtype"]],
                       DTYPES[spec["out_dtype"]])
    return model.eval()


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def meta_linear(weight: torch.Tensor, bias: torch.Tensor | None, out_in=None) -> nn.Linear:
    out_f, in_f = out_in or weight.shape
    lin = nn.Linear(in_f, out_f, bias is not None, device="meta")
    lin.weight = frozen(weight)
    if bias is not None:
        lin.bias = frozen(bias)
    return lin


# ---- a stack cast as a whole (compress.cast_encoder_stack) ---------------------------------


def cast_stack(module: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """Run `module` in `dtype`: its weights cast, its inputs cast on the way in, its output
    cast back to `out_dtype`. Marked, so that a checkpoint records it and loading redoes it."""
    module.to(dtype)
    module.register_forward_pre_hook(lambda m, args, kw: (
        tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kw.items()}),
        with_kwargs=True)
    module.register_forward_hook(lambda m, args, out: cast_output(out, out_dtype))
    setattr(module, STACK_ATTR, (name_of(dtype), name_of(out_dtype)))


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def cast_output(out, dtype):
    if isinstance(out, tuple):
        return (_cast(out[0], dtype),) + out[1:]
    out["last_hidden_state"] = _cast(out["last_hidden_state"], dtype)
    return out


register(None, "cast_stack", None, None,
         lambda spec, dtype: "exact" if DTYPES[spec["dtype"]] == dtype else "approximate",
         "stack cast as a whole to bf16/fp16")


# ---- int8 weights, as kernels.AoInt8Linear and tied's int8 modules hold them -------------


def int8_parts(qweight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A torch.ao per-channel qint8 weight as plain tensors: int8 values, float32 scales, int8
    zero points (checked to hold them exactly: torch keeps them as float64 and int64)."""
    if qweight.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or (
            qweight.q_per_channel_axis() != 0):
        raise StoredError(f"expected a per-output-channel int8 weight, got {qweight.qscheme()}")
    scale, zp = qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points()
    parts = {"weight_int8": qweight.int_repr(), "weight_scale": scale.float(),
             "weight_zero_point": zp.to(torch.int8)}
    if not (torch.equal(parts["weight_scale"].double(), scale)
            and torch.equal(parts["weight_zero_point"].long(), zp)):
        raise StoredError("int8 scales or zero points do not fit float32/int8 exactly")
    return parts


def int8_weight(parts: dict) -> torch.Tensor:
    """The per-channel qint8 tensor `int8_parts` took apart."""
    return torch._make_per_channel_quantized_tensor(
        parts["weight_int8"], parts["weight_scale"].double(),
        parts["weight_zero_point"].long(), 0)


def quantize_int8(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """`w` (out, in) as a per-output-channel symmetric qint8 tensor using `bits` bits (7 where
    fbgemm has no VNNI and the activations keep 8: `machine.fbgemm_act_bits`)."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-8) / (2 ** (bits - 1) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.quantize_per_channel is deprecated
        return torch.quantize_per_channel(w, scale.double(), torch.zeros(
            w.shape[0], dtype=torch.long), 0, torch.qint8)


def weight_bits(qweight: torch.Tensor) -> int:
    """How many bits a symmetric qint8 weight uses (7: every value within [-63, 63])."""
    return int(qweight.int_repr().abs().max()).bit_length() + 1


def packed_int8(qweight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    packed = LinearPackedParams(dtype=torch.qint8)
    packed.set_weight_bias(qweight, bias)
    return packed


def ao_int8_module(cls: type, packed: nn.Module, spec: dict) -> nn.Module:
    """A `kernels.AoInt8Linear` (or subclass) around ready packed weights, with the stored
    activation settings: the very module the trial ran, without quantizing anything again."""
    from ..inputs import machine

    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m.packed, m.reduce_range = packed, bool(spec["reduce_range"])
    m.scale, m.zero_point = spec["scale"], int(spec["zero_point"])
    # 8-bit activations over 8-bit weights (exported where fbgemm has VNNI) would saturate
    # fbgemm's int16 pair sums here: the activations keep 7 bits over the same range
    m.narrowed = not m.reduce_range and machine.fbgemm_act_bits(m.weight_bits) < 8
    if m.narrowed:
        m.reduce_range = True
        if m.scale is not None:
            m.scale, m.zero_point = m.scale * 255 / 127, round(m.zero_point * 127 / 255)
    return m


# ---- a module's parts, each in its own form (lowrank.LowRankLinear's factors) -------------


def save_part(m: nn.Module) -> tuple[dict, dict]:
    """A part's own tensors and spec (a low-rank factor): a plain Linear as it is, else by its
    own form."""
    f = form_of(m)
    if f is None:
        if type(m) is not nn.Linear:
            raise StoredError(f"low-rank factor {type(m).__qualname__} has no stored form")
        return {"weight": m.weight} | ({"bias": m.bias} if m.bias is not None else {}), {
            "kind": "linear"}
    own, spec = f.save(m)
    return own, {"kind": f.kind, **spec}


def load_part(own: dict, spec: dict, every: dict) -> nn.Module:
    """The part `save_part` saved."""
    if spec["kind"] == "linear":
        return meta_linear(own["weight"], own.get("bias"))
    return KINDS[spec["kind"]].load(own, spec, every)


# ---- torchao's quantized tensors (nn.Linear with a tensor-subclass weight) -------------------


def torchao_config(weight) -> dict | None:
    """The torchao config (as transformers' TorchAoConfig serializes it) that makes `weight`'s
    kind of tensor, or None when there is no such config to name."""
    import torchao.quantization as tq
    from torchao.core.config import config_to_dict

    kind, act = type(weight).__name__, getattr(weight, "act_quant_kwargs", None)
    if kind == "Int8Tensor" and act is None:
        cfg = tq.Int8WeightOnlyConfig(set_inductor_config=False)
    elif kind == "Int8Tensor" and isinstance(getattr(act, "granularity", None), tq.PerRow):
        cfg = tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    elif kind == "IntxUnpackedToInt8Tensor":
        cfg = tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight.target_dtype, weight_granularity=tq.PerGroup(weight.block_size[-1]))
    else:
        return None
    return config_to_dict(cfg)


def _torchao_save(m: nn.Linear):
    own = {"weight": m.weight.detach()} | ({"bias": m.bias} if m.bias is not None else {})
    return own, {"config": torchao_config(m.weight)}


register(None, "torchao_linear", _torchao_save,
         lambda own, spec, every: meta_linear(own["weight"], own.get("bias")),
         lambda spec, dtype: "exact" if spec["config"] else "none", "torchao-quantized Linear")


def torchao_quantization_config(specs: dict):
    """transformers' TorchAoConfig (one torchao config per module name) for config.json, so that
    plain `from_pretrained` rebuilds the torchao modules among `specs`; None when there are
    none."""
    fqn = {n: s["config"] for n, s in specs.items() if s["kind"] == "torchao_linear"}
    if not fqn:
        return None
    from torchao.core.config import config_from_dict
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=FqnToConfig({n: config_from_dict(c)
                                                 for n, c in fqn.items()}))


def flatten(tensors: dict) -> tuple[dict, dict]:
    """Plain tensors and safetensors metadata (torchao's layout, as transformers writes it)."""
    if all(type(t) is torch.Tensor for t in tensors.values()):
        return tensors, {}
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    return flatten_tensor_state_dict(tensors)


def unflatten(tensors: dict, metadata: dict) -> dict:
    if "tensor_names" not in (metadata or {}):
        return tensors
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    done, rest = unflatten_tensor_state_dict(tensors, metadata)
    return {**rest, **done}


def metadata_json(metadata: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
