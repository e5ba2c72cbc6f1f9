"""Decoding options: how `sweep.measure.evaluate.transcribe` turns features into tokens.

The techniques' `decoding()` fields make one frozen `Plan` (`plan_for(recipe)`), handed
explicitly to transcription next to the model, as whisper's DecodingOptions are: nothing is
stored on the model. `decode()` dispatches on the plan's type through `RUNNERS`.

- `GeneratePlan`: HF `generate` (greedy, language and task given, no timestamps).
- `GreedyPlan`: a lean greedy loop with generate's tokens (its step: `sweep.measure.greedy`): the
  encoder once, then per token only the decoder layers; optionally a compiled or a
  TorchScript-traced step.

Both take `segment` (how a recording is cut into pieces: `sweep.measure.segment`) and `batch`
(pieces or clips encoded and decoded together: `sweep.measure.batch`).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import window as win
from .greedy import Greedy, Timing, timestamp_begin
from .segment import Segmenting
from .window import Window

CROSS_DTYPES = {"model": None, "bf16": torch.bfloat16}  # decode.cross_kv -> dtype (None: same)


@dataclass(frozen=True)
class Plan:
    window: Window = field(default_factory=Window)
    compiled: bool = False  # torch.compile of the decoding step (the greedy loop only)
    scripted: bool = False  # the same static step traced by TorchScript (the greedy loop only)
    no_repeat: int = 0  # HF's no_repeat_ngram_size: no n-gram twice (0 = off)
    cross_kv: str = "model"  # dtype of the cached cross-attention K/V (the greedy loop only)
    max_new_tokens: int = 0  # at most this many tokens per clip (0: the caller's cap)
    segment: Segmenting = field(default_factory=Segmenting)  # pieces of a recording
    batch: int = 1  # pieces or clips encoded and decoded together
    timestamps: bool = False  # timestamp tokens and Whisper's rules for them (text keeps none)

    def __post_init__(self):
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"`decode.batch` must be an integer >= 1, got batch={self.batch!r}")

    @staticmethod
    def default() -> Plan:
        """What an unchanged model decodes with: HF generate over the 30 s window."""
        return GeneratePlan()

    def describe(self) -> str:
        w = self.window
        return (type(self).__name__.removesuffix("Plan").lower()
                + (" compiled step" if self.compiled else "")
                + (" scripted step" if self.scripted else "")
                + (f", cross K/V {self.cross_kv}" if self.cross_kv != "model" else "")
                + (f", no repeated {self.no_repeat}-gram" if self.no_repeat else "")
                + (", timestamps" if self.timestamps else "")
                + (f", at most {self.max_new_tokens} tokens" if self.max_new_tokens else "")
                + ("" if w.mode == "full" else f", encoder window {w.mode} ({w.bucket_s} s"
                   + (f", margin {w.margin_s:g} s" if w.margin_s else "")
                   + (f", padding {w.pad_s:g} s" if w.pad_s else "")
                   + (f", at least {w.min_s:g} s" if w.min_s else "") + ")")
                + ("" if not self.segment.vad else f", segments by {self.segment.describe()}")
                + (f", batch {self.batch}" if self.batch > 1 else ""))


@dataclass(frozen=True)
class GeneratePlan(Plan):
    def __post_init__(self):
        super().__post_init__()
        if self.compiled or self.scripted:
            raise ValueError("`decode.compile`=step|script needs decode.loop=greedy: generate() "
                             "runs its own Python loop")
        if self.cross_kv != "model":
            raise ValueError(f"`decode.cross_kv`={self.cross_kv} needs decode.loop=greedy: "
                             "generate() keeps HF's own cache")


@dataclass(frozen=True)
class GreedyPlan(Plan):
    pass


PLANS: dict[str, type[Plan]] = {"generate": GeneratePlan, "greedy": GreedyPlan}
# plan type -> fn(plan, model, feats, language, task, cap) -> token ids per clip
RUNNERS: dict[type, Callable] = {}


def plan_for(recipe) -> Plan:
    """The decoding options of a Recipe: the `decoding()` fields of its active techniques. Two
    techniques setting one field to different values is a recipe error."""
    from ..techniques.base import RecipeError

    fields, by = {}, {}
    for cfg in recipe.configs():
        for key, value in (cfg.decoding() if cfg.active else {}).items():
            if key in fields and fields[key] != value:
                raise RecipeError(f"decoding option `{key}` is set by both {by[key]} "
                                  f"({fields[key]!r}) and {cfg.PREFIX} ({value!r})")
            fields[key], by[key] = value, cfg.PREFIX
    return PLANS[fields.pop("loop", "generate")](**fields)


def features(model, processor, audios, durations, plan: Plan) -> torch.Tensor:
    """Log-mel features of clips, cut to the plan's encoder window (the longest clip's)."""
    full, w = win.full_frames(model), plan.window
    frames = max(w.frames(d, full) for d in durations)
    return win.features(model, processor, [w.padded(a, d) for a, d in zip(audios, durations)],
                        frames)


def decode(model, feats: torch.Tensor, plan: Plan, *, language: str, task: str,
           cap: int, keep_timestamps: bool = False) -> list[list[int]]:
    """Token ids per clip (prompt and end-of-text left out), decoded as `plan` says; with
    timestamps, the text's alone unless `keep_timestamps`."""
    cap = min(cap, plan.max_new_tokens) if plan.max_new_tokens else cap
    with torch.inference_mode():
        rows = RUNNERS[type(plan)](plan, model, feats, language, task, cap)
    if plan.timestamps and not keep_timestamps:  # timestamps only guided the decoding
        first = timestamp_begin(model.generation_config)
        rows = [[t for t in row if t < first] for row in rows]
    return rows


def transcribe_batch(model, processor, utts, plan: Plan, *, language: str,
                     task: str = "transcribe", cap: int) -> list[str]:
    """Texts of several clips decoded as one batch (throughput; a shared encoder window)."""
    feats = features(model, processor, [u.audio for u in utts], [u.duration_s for u in utts],
                     plan)
    ids = decode(model, feats, plan, language=language, task=task, cap=cap)
    # stripped as one clip's text is (measure.batch): Whisper's first token carries a space
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def prompt_ids(model: nn.Module, language: str, task: str, timestamps: bool = False) -> list[int]:
    """What generate starts the decoder with: <|startoftranscript|>, language and task
    (multilingual models), <|notimestamps|> unless decoding with timestamps."""
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
    return ids if timestamps else ids + [gc.no_timestamps_token_id]


def _cut(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos)] if eos in row else row


def _generate(plan, model, feats, language, task, cap):
    # Whisper's generate counts `max_length` after its prompt: `cap` new tokens, as
    # max_new_tokens would give, without the per-clip notice that the model's generation config
    # (max_length=448) is overridden
    kwargs = dict(max_length=cap, num_beams=1, do_sample=False)
    if getattr(model.generation_config, "is_multilingual", True):
        # always told, never detected; an English-only model's generate refuses both
        kwargs.update(language=language, task=task)
    if plan.no_repeat:
        kwargs["no_repeat_ngram_size"] = plan.no_repeat
    if plan.timestamps:
        kwargs["return_timestamps"] = True
    if feats.shape[-1] == win.full_frames(model):
        out = model.generate(feats, **kwargs)
    else:  # HF's encoder refuses other windows: hand generate the encoder output
        from transformers.modeling_outputs import BaseModelOutput

        enc = win.encode(model, feats)
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc), **kwargs)
    out = out["sequences"] if isinstance(out, dict) else out
    return [_cut(row, model.generation_config.eos_token_id) for row in out.tolist()]


def _greedy(plan, model, feats, language, task, cap):
    prompt = prompt_ids(model, language, task, plan.timestamps)
    cap = min(cap, model.config.max_target_positions - len(prompt))
    t0 = time.perf_counter()
    enc = win.encode(model, feats)
    rt = runtime(model, plan, enc.shape[0])
    cross = rt.cross(enc)
    eos, t1 = model.generation_config.eos_token_id, time.perf_counter()
    ids = torch.tensor([prompt] * enc.shape[0], device=enc.device)
    done = torch.zeros(enc.shape[0], dtype=torch.bool, device=enc.device)
    out, pos, seqs = [], 0, [list(prompt) for _ in range(enc.shape[0])]
    for step in range(cap):
        mask = rt.masks[min(step, 1)]
        if plan.no_repeat:
            mask = _ban_repeats(mask, seqs, plan.no_repeat)
        if plan.timestamps:  # the rules that read the tokens so far; the step adds the last
            mask = _timestamp_rules(mask, seqs, len(prompt), model.generation_config)
        nxt = rt.step(ids, pos, cross, mask).masked_fill(done, eos)
        out.append(nxt)  # finished rows are padded with eos, as generate pads them
        for row, tok in zip(seqs, nxt.tolist() if plan.no_repeat or plan.timestamps else ()):
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


def streams(plan: Plan) -> bool:
    """Whether `plan` decodes several clips as a `stream` (greedy, batch > 1, not compiled: a
    compiled step is one static graph, which decodes fixed batches)."""
    return isinstance(plan, GreedyPlan) and plan.batch > 1 and not plan.compiled


def stream(model, processor, audios, durations, plan: Plan, *, language: str, task: str,
           caps: list[int], then: Callable | None = None) -> list[list[int]]:
    """Token ids of each clip (timestamps kept; its own `caps` new tokens at most), decoded by
    the greedy loop `plan.batch` rows at a time as a stream: a row whose clip ended takes the
    next clip at the next step, each clip encoded alone on its own window, each row at its own
    position (a new clip's prompt is fed a token per step). A fixed batch waits for its longest
    row and pads every row to the longest window; on a long-form set's pieces that decoded
    2.2x the row-steps its pieces needed (issue #28). `then(k, row)`, called as clip k ends,
    may return one more clip to decode, (audio, duration, cap): it joins the stream as clip
    `len(audios)`, and the lists grow with it."""
    prompt = prompt_ids(model, language, task, plan.timestamps)
    gc, n = model.generation_config, min(plan.batch, len(audios))
    eos, room = gc.eos_token_id, model.config.max_target_positions - len(prompt)
    rt = runtime(model, plan, n)
    ref = next(model.parameters())
    idle = rt.cross(torch.zeros(1, 1, model.config.d_model, dtype=win.input_dtype(model),
                                device=ref.device))  # an empty row's: one frame
    cross = [[kv] * n for kv in idle]  # per layer, per row
    clip: list[int | None] = [None] * n  # per row: the clip it decodes
    seqs, fed = [list(prompt) for _ in range(n)], [0] * n  # per row: its tokens, how many were fed
    out: list[list[int]] = [[] for _ in audios]
    nxt_clip, steps, enc_s, t0 = 0, 0, 0.0, time.perf_counter()
    with torch.inference_mode():
        while True:
            for r in range(n):
                if clip[r] is None and nxt_clip < len(audios):
                    k, nxt_clip = nxt_clip, nxt_clip + 1
                    t = time.perf_counter()
                    feats = features(model, processor, [audios[k]], [durations[k]], plan)
                    for per, kv in zip(cross, rt.cross(win.encode(model, feats))):
                        per[r] = kv
                    enc_s += time.perf_counter() - t
                    clip[r], seqs[r], fed[r] = k, list(prompt), 0
            if all(k is None for k in clip):
                break
            ids = torch.tensor([[s[f] if k is not None else eos] for s, f, k in
                                zip(seqs, fed, clip)], device=ref.device)
            pos = torch.tensor([f if k is not None else 0 for f, k in zip(fed, clip)],
                               device=ref.device)
            first = torch.tensor([f == len(prompt) - 1 for f in fed], device=ref.device)
            mask = torch.where(first[:, None], rt.masks[0], rt.masks[1])
            if plan.no_repeat:
                mask = _ban_repeats(mask, seqs, plan.no_repeat)
            if plan.timestamps:
                mask = _timestamp_rules(mask, seqs, len(prompt), gc)
            nxt = rt.row_step(ids, pos, cross, mask).tolist()
            steps += 1
            for r, k in enumerate(clip):
                if k is None:
                    continue
                fed[r] += 1
                if fed[r] < len(seqs[r]):  # still reading its prompt
                    continue
                seqs[r].append(nxt[r])
                new = seqs[r][len(prompt):]
                if nxt[r] == eos or len(new) >= min(caps[k], room):
                    out[k], clip[r] = _cut(new, eos), None
                    for per, kv in zip(cross, idle):  # its window's K/V freed
                        per[r] = kv
                    if then is not None and (more := then(k, out[k])) is not None:
                        for items, x in zip((audios, durations, caps, out), (*more, [])):
                            items.append(x)
    rt.last = Timing(enc_s, time.perf_counter() - t0 - enc_s, 0.0, steps)
    return out


def runtime(model, plan: Plan, batch: int = 1) -> Greedy:
    """The greedy runtime `plan` decodes a batch of `model` with (its `last` Timing)."""
    return Greedy.of(model, batch, plan.compiled, plan.scripted, CROSS_DTYPES[plan.cross_kv],
                     plan.timestamps)


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


def _timestamp_rules(mask: torch.Tensor, seqs: list[list[int]], start: int, gc) -> torch.Tensor:
    """`mask` plus HF's WhisperTimeStampLogitsProcessor rules that depend on the tokens so far
    (`start`: the prompt's length): never <|notimestamps|>; timestamps in pairs, text after a
    pair, a timestamp or the end after a lone one; timestamps never going back; the first token
    a timestamp of at most `max_initial_timestamp_index`. Its last rule, a timestamp whenever
    their summed probability beats every text token's, needs the logits: the step applies it
    (`Greedy(timestamps=True)`)."""
    mask = mask.clone()
    first, eos = timestamp_begin(gc), gc.eos_token_id
    mask[:, gc.no_timestamps_token_id] = True
    for r, row in enumerate(seqs):
        seq = row[start:]
        last = len(seq) >= 1 and seq[-1] >= first
        penultimate = len(seq) < 2 or seq[-2] >= first
        if last:
            if penultimate:
                mask[r, first:] = True
            else:
                mask[r, :eos] = True
        stamps = [t for t in seq if t >= first]
        if stamps:
            mask[r, first:stamps[-1] + (0 if last and not penultimate else 1)] = True
        if not seq:
            mask[r, :first] = True
            top = getattr(gc, "max_initial_timestamp_index", None)
            if top is not None:
                mask[r, first + top + 1:] = True
    return mask


RUNNERS.update({GeneratePlan: _generate, GreedyPlan: _greedy})


@functools.cache
def isa_note() -> str:
    """Instruction sets the kernels use here: ATen's vector level, the torch.ao int8 engine and
    oneDNN's bf16 matmul kernel (read from its verbose log, written to fd 1 below Python)."""
    from ..inputs import machine
    from .kernels import cpu_flags, onednn_log

    dots = "+".join(sorted({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())) or "none"
    # what the kernels may use, their caps counted (the CPU's flags alone said avx512_vnni
    # under FBGEMM_ENABLE_INSTRUCTIONS=AVX2)
    used = ", ".join(f"{lib} {'with' if ok else 'without'} VNNI" for lib, ok in (
        ("fbgemm", machine.fbgemm_vnni()), ("oneDNN", machine.onednn_vnni())))
    text = (f"aten {torch.backends.cpu.get_cpu_capability()}, int8 engine "
            f"{torch.backends.quantized.engine} (CPU int8 dot products: {dots}; {used})")
    x = torch.ones(64, 512, dtype=torch.bfloat16)  # small shapes skip oneDNN
    impl = re.findall(r"matmul,([^,]+),", onednn_log(lambda: nn.functional.linear(x, x)))
    return text + f", oneDNN bf16 matmul {impl[0] if impl else 'not logged'}"
