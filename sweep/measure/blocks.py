"""Precision per block: which encoder/decoder layers int8 harms, and an accuracy-aware fallback.

A block is one encoder layer (`enc3`), one decoder layer (`dec2`) or the head. Its sensitivity is
what int8 on that block alone does to the model's next-token distributions on the calibration
clips: the mean KL divergence (nats per token) from the unquantized model's, teacher-forced on
that model's own transcripts. On whisper-base with per-tensor dynamic int8 it differs 100x
between blocks (dec2 0.06, enc3 0.012, most others < 0.001), so moving a few blocks to bf16
recovers most of the accuracy for little speed (`quant.fallback_blocks`,
`quant.fallback_budget`; NNCF's accuracy control and Intel Neural Compressor's fallback do the
same with a metric on a validation set).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .modules import run_calibration, set_module

_BLOCK = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.")


class ProbeError(RuntimeError):
    """Calibration ran no audio through the model as the probe needs it."""


def block_of(name: str) -> str:
    """`enc3`, `dec2` or `head` for a Linear's module name."""
    m = _BLOCK.search(name.replace("_orig_mod.", ""))
    return f"{m[1][:3]}{m[2]}" if m else "head"


def order(block: str) -> tuple:
    return ({"enc": 0, "dec": 1}.get(block[:3], 2), int(block[3:]) if block[3:].isdigit() else 0)


@dataclass
class Probe:
    """The calibration clips as the model saw them (log-mel features and decoder tokens, captured
    while `calibrate(model)` transcribed them) and the unquantized model's next-token
    log-probabilities on them."""
    features: list[torch.Tensor]
    ids: list[torch.Tensor]  # (batch, tokens): the prompt and the generated tokens fed back
    start: list[int]  # first position that predicts a generated token (the prompt's last)
    reference: list[torch.Tensor]

    @classmethod
    def capture(cls, model: nn.Module, calibrate) -> Probe:
        feats, ids, start = [], [], []

        def on_encoder(mod, args, kwargs):
            feats.append((args[0] if args else kwargs["input_features"]).detach().clone())

        def on_decoder(mod, args, kwargs):
            tok = kwargs.get("input_ids", args[0] if args else None)
            if tok is None:
                return
            if tok.shape[1] > 1 or not ids:  # a prompt: the next clip starts
                ids.append(tok.detach().clone())
                start.append(tok.shape[1] - 1)
            else:
                ids[-1] = torch.cat([ids[-1], tok.detach()], 1)

        run_calibration(model, calibrate, hooks=[
            model.model.encoder.register_forward_pre_hook(on_encoder, with_kwargs=True),
            model.model.decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)])
        if not feats or len(feats) != len(ids):
            raise ProbeError(f"calibration must run HF generate on each clip (the probe records "
                             f"its encoder inputs and decoder tokens), got {len(feats)} encoder "
                             f"and {len(ids)} decoder prompts")
        probe = cls(feats, ids, start, [])
        probe.reference = probe.logprobs(model)
        return probe

    @torch.inference_mode()
    def logprobs(self, model: nn.Module) -> list[torch.Tensor]:
        """Next-token log-probabilities at every generated position, the decoder fed as
        generate feeds it (the prompt, then one token per call with the cache): dynamic int8
        scales one row per token there, as when transcribing, not all tokens at once."""
        dtype = model.model.encoder.conv1.weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        out = []
        for f, ids, s in zip(self.features, self.ids, self.start):
            enc = (model.model.encoder(f.to(dtype)).last_hidden_state,)
            step = model(encoder_outputs=enc, decoder_input_ids=ids[:, :s + 1], use_cache=True)
            logits, cache = [step.logits[:, -1:]], step.cache
            for i in range(s + 1, ids.shape[1]):
                step = model(encoder_outputs=enc, decoder_input_ids=ids[:, i:i + 1],
                             cache=cache, use_cache=True)
                logits.append(step.logits)
                cache = step.cache
            out.append(torch.cat(logits, 1).float().log_softmax(-1))
        return out

    def kl(self, model: nn.Module) -> float:
        """Mean KL(reference || model) per generated token, in nats."""
        total, n = 0.0, 0
        for ref, got in zip(self.reference, self.logprobs(model)):
            total += (ref.exp() * (ref - got)).sum().item()
            n += ref.shape[0] * ref.shape[1]
        return total / max(n, 1)

    def digest(self) -> str:
        h = hashlib.sha1()
        for t in self.features + self.ids:
            h.update(t.float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def weights_digest(linears: dict[str, nn.Module]) -> str:
    h = hashlib.sha1()
    for name, lin in sorted(linears.items()):
        h.update(name.encode())
        h.update(lin.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _swap(model, names, modules) -> None:
    for n in names:
        set_module(model, n, modules[n])


def sensitivity(model: nn.Module, low: dict[str, nn.Module], high: dict[str, nn.Module],
                probe: Probe, progress=None) -> dict[str, float]:
    """Per block: the probe's KL with only that block's `low` (quantized) modules in place, the
    rest `high` (as they were). `model` holds `high` before and after."""
    by_block: dict[str, list[str]] = {}
    for n in low:
        by_block.setdefault(block_of(n), []).append(n)
    out = {}
    for i, (block, names) in enumerate(sorted(by_block.items(), key=lambda kv: order(kv[0]))):
        _swap(model, names, low)
        try:
            out[block] = probe.kl(model)
        finally:
            _swap(model, names, high)
        if progress:
            progress(i + 1, len(by_block))
    return out


def sensitivity_cached(model, low, high, probe, key: str, progress=None) -> dict[str, float]:
    """`sensitivity`, cached per machine (`kernels.cache_path`) under `key` plus the weights'
    and the probe's digests: a sweep measures it once per base model, schemes and kernels."""
    full = (f"sensitivity|{key}|w{weights_digest(high)}|p{probe.digest()}"
            f"|th{torch.get_num_threads()}")
    device = next(iter(high.values())).weight.device.type
    entry = kernels.choose_cached(full, lambda: {"kl": sensitivity(
        model, low, high, probe, progress)}, device=device)
    return entry["kl"]


def fallback(model: nn.Module, low: dict[str, nn.Module], fall: dict[str, nn.Module],
             probe: Probe, ranking: dict[str, float], *, count: int = 0,
             budget: float = 0.0) -> tuple[list[str], float | None]:
    """Install `low` everywhere but in the fallback blocks, which get `fall`. With `count`: the
    `count` blocks of highest sensitivity in `ranking`. With `budget`: the fewest most
    sensitive blocks for the probe's KL to hold within `budget` (all of them if it never
    does). Returns (fallback blocks, the probe's KL then; None when not measured)."""
    ranked = sorted(ranking, key=lambda b: (-ranking[b], order(b)))
    by_block: dict[str, list[str]] = {}
    for n in low:
        by_block.setdefault(block_of(n), []).append(n)

    def install(chosen: list[str]) -> None:
        for block, names in by_block.items():
            _swap(model, names, fall if block in chosen else low)

    if not budget:
        chosen = ranked[:count]
        install(chosen)
        return sorted(chosen, key=order), None
    for k in range(len(ranked) + 1):
        chosen = ranked[:k]
        install(chosen)
        kl = probe.kl(model)
        if kl <= budget:
            break
    return sorted(chosen, key=order), kl


def ranking_note(ranking: dict[str, float]) -> str:
    top = sorted(ranking.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{b} {v:.2g}" for b, v in top)


def dumps(ranking: dict[str, float]) -> str:
    return json.dumps({b: round(v, 6) for b, v in sorted(ranking.items(),
                                                         key=lambda kv: order(kv[0]))})
