"""Encoder window: run Whisper's encoder on fewer than 30 s of mel frames.

Whisper pads every clip to 30 s (3000 mel frames, 1500 encoder positions) and the HF encoder
refuses anything else, so a short command pays for 30 s of encoder work and the decoder's
cross-attention reads 1500 keys per token. `encode` runs the same modules on a shorter window
(the first positions of `embed_positions`), which the model never saw in training: its WER cost
is measured by the sweep, not assumed. Windows are rounded up to buckets so that few distinct
shapes occur (caches, compiled graphs).

A window cut at the clip's end gives the model no silence after the speech, which it always had
in training (Whisper pads to 30 s): `margin_s` encodes that many seconds of the padding beyond
the speech's end, `pad_s` puts that much silence before it (whisper.cpp users add ~1.3 s to
`audio_ctx`, and pad very short clips in front), and `min_s` encodes at least that many seconds
whatever the clip (a window of a few seconds is where whisper-base loses most: on 2 s VAD pieces
between long pauses it repeated one command to its token cap, issue #28). The speech's end is
the clip's end (evaluation clips are utterances; their trailing silence counts as speech).
bench/window.py measures the WER/speed curve.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the recipe's Window is pure (techniques.encoder)
    import torch
    from torch import nn

WINDOWS = ("full", "auto")
HOP_S = 0.01  # one mel frame per 10 ms (16 kHz, hop 160)
RATE = 16000  # Whisper's sampling rate
FULL_S = 30.0  # Whisper's own window
SECONDS = ("margin_s", "pad_s", "min_s")  # Window's settings in seconds, each in [0, FULL_S]


@dataclass(frozen=True)
class Window:
    """`full`: always the model's window (30 s); `auto`: `pad_s` of silence, the clip, then
    `margin_s` of silence, at least `min_s`, rounded up to a multiple of `bucket_s` seconds (at
    most the full window)."""
    mode: str = "full"
    bucket_s: int = 5
    margin_s: float = 0.0  # silence encoded beyond the speech's end (auto only)
    pad_s: float = 0.0  # silence put before the speech (auto only)
    min_s: float = 0.0  # the window is at least this long, silence after the speech (auto only)

    def __post_init__(self):
        if self.mode not in WINDOWS:
            raise ValueError(f"`encoder.window` must be one of {WINDOWS}, got window={self.mode!r}")
        if not (isinstance(self.bucket_s, int) and self.bucket_s >= 1):
            raise ValueError(f"`encoder.bucket_s` must be an integer >= 1, got {self.bucket_s=}")
        for name in SECONDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= FULL_S:
                raise ValueError(f"`encoder.{name}` must be seconds in [0, {FULL_S:g}], got "
                                 f"{name}={v!r}")

    def lead_s(self, duration_s: float) -> float:
        """Silence put before a clip of `duration_s` seconds: `pad_s` when the padded clip still
        fits Whisper's 30 s (padding never pushes speech out of the window), else none."""
        pad = self.pad_s if self.mode == "auto" else 0.0
        return pad if pad + duration_s <= FULL_S else 0.0

    def frames(self, duration_s: float, full_frames: int) -> int:
        """Mel frames to encode for a clip of `duration_s` seconds (even: conv2 has stride 2)."""
        if self.mode == "full":
            return full_frames
        speech = round(max(self.lead_s(duration_s) + duration_s + self.margin_s, self.min_s), 3)
        seconds = self.bucket_s * max(1, math.ceil(speech / self.bucket_s))
        frames = int(round(seconds / HOP_S))
        return min(full_frames, frames + frames % 2)

    def padded(self, audio: np.ndarray, duration_s: float) -> np.ndarray:
        """`audio` (16 kHz) with this window's leading silence."""
        lead = int(round(self.lead_s(duration_s) * RATE))
        return np.concatenate([np.zeros(lead, dtype=audio.dtype), audio]) if lead else audio


def full_frames(model: nn.Module) -> int:
    """Mel frames of the model's own window (3000 for every Whisper)."""
    enc = model.model.encoder
    return enc.config.max_source_positions * enc.conv1.stride[0] * enc.conv2.stride[0]


def encode(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Encoder output for `feats` (batch, mels, frames), any even number of frames up to the
    full window. The full window goes through the HF module itself (its hooks, a compiled
    encoder); a shorter one through the same layers with the first position embeddings."""
    if feats.shape[-1] == full_frames(model):
        return model.model.encoder(feats).last_hidden_state
    if feats.shape[-1] % 2 or feats.shape[-1] > full_frames(model):
        raise ValueError(f"encoder window must be an even number of mel frames <= "
                         f"{full_frames(model)}, got {feats.shape[-1]} frames")
    return _encode_window(model, feats)


def _encode_window(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    enc = model.model.encoder
    fn = getattr(enc, COMPILED_WINDOW, None) or _window_layers
    return fn(enc, feats).to(model.model.decoder.embed_positions.weight.dtype)


def _window_layers(enc: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """The encoder's layers on any window, position embeddings cut to its length, in the
    encoder's dtype (what the module's cast hooks do for a bf16 encoder stack)."""
    from torch.nn.functional import gelu

    x = feats.to(enc.conv1.weight.dtype)
    x = gelu(enc.conv1(x))
    x = gelu(enc.conv2(x)).permute(0, 2, 1)
    x = x + enc.embed_positions.weight[: x.shape[1]]
    for layer in enc.layers:
        x = layer(x, None)
    return enc.layer_norm(x)


COMPILED_WINDOW = "hyper_compiled_window"


def compile_encoder(model: nn.Module, freeze: bool) -> None:
    """torch.compile the encoder (`encoder.compile`): the full window through HF's module
    (cast hooks included), shorter windows through `_window_layers`. With `freeze`, inductor
    folds the weights in as constants and prepacks them for oneDNN (inference only). Dynamo's
    automatic dynamic shapes give shorter windows one graph for all sizes after the second."""
    import torch

    wrap = _frozen if freeze else (lambda fn: fn)
    enc = model.model.encoder
    enc.compile()
    enc._compiled_call_impl = wrap(enc._compiled_call_impl)  # what Module.__call__ runs
    setattr(enc, COMPILED_WINDOW, wrap(torch.compile(_window_layers)))


def _frozen(fn):
    # Inductor reads `freezing` from its global config when a graph compiles, lazily at a call
    # (torch.compile's `options` did not reach it: measured, same code as without): patch it
    # around every call, so that no other compile in this process is frozen.
    import torch._inductor.config

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True):
            return fn(*args, **kwargs)
    return call


def input_dtype(model: nn.Module) -> torch.dtype:
    """Casting recipes change the conv front-end's dtype; features must follow it."""
    import torch

    w = model.model.encoder.conv1.weight
    return w.dtype if w.is_floating_point() else torch.float32


def features(model: nn.Module, processor, audios: list[np.ndarray], frames: int) -> torch.Tensor:
    """Log-mel features of a batch (padded to 30 s as always, so the window's frames are the
    very frames the full window starts with), cut to `frames`."""
    feats = processor.feature_extractor(audios, sampling_rate=16000,
                                        return_tensors="pt").input_features[..., :frames]
    return feats.to(device=model.model.encoder.conv1.weight.device, dtype=input_dtype(model))
