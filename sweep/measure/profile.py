"""A profile on request (`--profile`): where a recipe's time goes, operator by operator.

torch.profiler records the transcription of a few clips with the recipe applied (after one
untimed warm-up clip, so that packing and compilation are not counted), and the top operators by
self CPU time make a table: the one printed by `sweep.evaluate --profile` and logged as the
trial's `profile.txt` / `profile.json` in MLflow by a sweep with `--profile`. Profiling slows the
operators it records, so these figures explain a trial's latency; they never replace it (the
trial's own timing runs without the profiler).
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProfileOptions:
    """What `--profile` records."""
    top: int = 20  # operators listed, by self CPU time
    clips: int = 3  # clips of the evaluation set transcribed under the profiler (the first ones)

    def __post_init__(self):
        for name in ("top", "clips"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"`--profile` {name} must be an integer >= 1, got "
                                 f"{name}={getattr(self, name)!r}")


def profile_recipe(model, processor, evalset, recipe, *, language: str | None = None,
                   task: str = "transcribe", calibrate=None,
                   opts: ProfileOptions = ProfileOptions()) -> dict:
    """Apply `recipe` to a copy of `model` (the model itself for the baseline; `calibrate`:
    static int8's, `sweep.measure.evaluate.calibrator`) and profile the transcription of the
    first `opts.clips` clips; see `top_operators` for what it returns."""
    from .compress import apply_recipe
    from .decode import Plan

    options = Plan.default()
    clips = evalset.utterances[:opts.clips]
    langs = [language or u.lang for u in clips]
    if not all(langs):
        raise ValueError("`--profile` needs a language: pass --language (e.g. ru, en)")
    if not recipe.is_baseline:
        applied = apply_recipe(copy.deepcopy(model), recipe, calibrate=calibrate)
        model, options = applied.model, applied.options
    return top_operators(model, processor, clips, langs, task=task, options=options, top=opts.top)


def top_operators(model, processor, clips, langs, *, task: str = "transcribe", options=None,
                  top: int = 20) -> dict:
    """Profile `clips` (one warm-up pass over the first, unrecorded): `rows` (the `top`
    operators by self CPU time: name, calls, self and total seconds, self share of the recorded
    CPU time as a fraction), `total_self_s`, `clips`, and `table` (the rows as printed text)."""
    from torch.profiler import ProfilerActivity, profile

    from . import decode, scoring

    def transcribe(u, lang):  # what sweep.measure.evaluate.transcribe times, untimed
        feats = decode.features(model, processor, [u.audio], [u.duration_s], options)
        decode.decode(model, feats, options, language=lang, task=task,
                      cap=scoring.max_new_tokens_for(u.duration_s))

    if not clips:
        raise ValueError("`--profile` needs at least one clip to profile, got none")
    options = options or decode.Plan.default()
    transcribe(clips[0], langs[0])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     and next(model.parameters()).is_cuda else [])
    with _quiet_profiler(), profile(activities=acts) as prof:
        for u, lang in zip(clips, langs):
            transcribe(u, lang)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"name": e.key, "calls": int(e.count), "self_cpu_s": e.self_cpu_time_total / 1e6,
             "cpu_total_s": e.cpu_time_total / 1e6,
             "self_share": e.self_cpu_time_total / 1e6 / total if total else 0.0}
            for e in events[:top]]
    out = {"rows": rows, "total_self_s": total, "clips": len(clips), "top": top}
    return {**out, "table": format_profile(out)}


# What libkineto writes to fd 2 below Python around every profile (torch 2.13; its log level
# does not silence these lines): known noise, kept from HYPER's console unless --verbose.
KINETO_NOISE = re.compile(r"^(USDT|STAGE):\S+ \S+ \d+:\d+ \w+\.cpp:\d+\] ")


@contextlib.contextmanager
def _quiet_profiler():
    """fd 2 into a file while profiling; then every line but libkineto's known ones back."""
    from .. import console

    if console.verbose():
        yield
        return
    log = console.Captured()
    try:
        with console.captured(2) as log:
            yield
    finally:
        sys.stderr.write("".join(ln for ln in log.text.splitlines(keepends=True)
                                 if not KINETO_NOISE.match(ln)))


def format_profile(prof: dict) -> str:
    """The printed table: percent here only (the JSON keeps fractions)."""
    width = max([len("operator")] + [len(r["name"]) for r in prof["rows"]])
    width = min(width, 60)
    lines = [f"top {len(prof['rows'])} operators by self CPU time over {prof['clips']} clips "
             f"({prof['total_self_s']:.3f} s recorded, under the profiler)",
             f"{'operator':<{width}}  {'self s':>8}  {'self %':>6}  {'total s':>8}  {'calls':>7}"]
    lines += [f"{r['name'][:width]:<{width}}  {r['self_cpu_s']:8.4f}  {r['self_share']:6.1%}  "
              f"{r['cpu_total_s']:8.4f}  {r['calls']:7d}" for r in prof["rows"]]
    return "\n".join(lines)
