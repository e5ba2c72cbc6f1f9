"""One trial, measured honestly: transcribe an evaluation set, score it, time it.

`measure` times one model; `run_trial` applies a recipe to a copy of the base model and
measures it next to the base model's own figures taken in the same process with the same
threads, so `speedup`, `dwer` and `dcer` are ratios that survive a noisy machine.
Imports neither Ray nor MLflow (it also runs on a bare GPU machine).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..inputs import machine
from ..results import figures
from . import scoring
from .stopping import EarlyStop, Stopped, Stopper, TooSlow
from ..inputs.data import EvalSet, Utterance

TASKS = ("transcribe", "translate")
FIGURES = figures.names("baseline")  # the keys copied under `baseline` in results
__all__ = ["TooSlow", "Stopped", "EarlyStop", "MeasureOptions", "measure", "run_trial"]


@dataclass
class Measurement:
    """Figures of one model on one set (fractions and seconds), plus per-utterance detail.
    `stopped`: why measuring ended before the last clip (the figures cover the clips measured)."""

    figures: dict
    utterances: list[dict]
    errors: list[scoring.UttErrors] = field(repr=False, default_factory=list)
    stopped: Stopped | None = None
    probes: list[dict] = field(default_factory=list)  # {id, hypothesis} of each probe heard


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _input_dtype(model) -> torch.dtype:
    # Casting recipes change the conv front-end's dtype; features must follow it.
    from .window import input_dtype

    return input_dtype(model)


def transcribe(model, processor, utt: Utterance, *, language: str, task: str = "transcribe",
               options=None):
    """Decode one utterance greedily as the decoding `options` say (a `sweep.measure.decode.Plan`,
    the `options` of an applied recipe; default HF generate over the 30 s window, and Whisper's
    sequential long-form decoding beyond 30 s); its segmentation (`segment.*`) included.
    Returns (text, content token ids, cap_reached, seconds)."""
    from . import batch

    heard, seconds = batch.timed(model, processor, [utt.audio], options, language=language,
                                 task=task)
    return heard[0].text, heard[0].ids, heard[0].cap_reached, seconds


def calibrator(processor, clips, language: str | None = None, task: str = "transcribe"):
    """Static int8's `calibrate(model)`: transcribe the calibration clips (never evaluated)
    with `model`, so that its observers see real activations."""
    def calibrate(model) -> None:
        for u in clips:
            transcribe(model, processor, u, language=_lang_of(u, language), task=task)
    return calibrate


def _lang_of(utt: Utterance, language: str | None) -> str:
    lang = language or utt.lang
    if not lang:
        raise ValueError(f"utterance {utt.id!r} has no `lang` and no `language` was given: "
                         "pass --language (e.g. ru, en) so generate() gets language= and task=")
    return lang


def model_sizes(model) -> tuple[float, float]:
    """(serialized state_dict MB, in-memory parameter+buffer MB); packed int8 counted as stored."""
    buf = io.BytesIO()
    try:
        torch.save(model.state_dict(), buf)
        disk = buf.tell() / 1e6
    except Exception:  # noqa: BLE001 - some tensor subclasses refuse pickling; size is optional
        disk = float("nan")
    tensors = list(model.parameters()) + list(model.buffers())
    mem = sum(t.numel() * t.element_size() for t in tensors)
    return disk, mem / 1e6


def zero_share(model) -> float:
    """Share of exactly-zero weights in the Linear layers that are still plain float tensors."""
    zeros = total = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        # Quantized tensor subclasses (torchao) do not support `== 0`; they hold no pruning.
        plain = type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_floating_point()
        if isinstance(mod, torch.nn.Linear) and plain:
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def measure(model, processor, evalset: EvalSet, *, language: str | None = None,
            task: str = "transcribe", warmup: int = 1, numbers: str = "auto",
            progress=None, on_warmed=None, check=None, options=None,
            probes: list[Utterance] | None = None) -> Measurement:
    """Transcribe every utterance once, timed after `warmup` untimed passes over the first;
    `options`: the decoding options (sweep.measure.decode.Plan) the model is measured with.
    `check(rows)` runs after each clip and may raise `Stopped`: measuring ends there and the
    figures cover the clips measured. `probes`: non-speech clips transcribed after the set (not
    after a stop, never timed) for `hallucination_rate`."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task=}")
    if not len(evalset):
        raise ValueError(f"evaluation set {evalset.name!r} is empty: nothing to measure")
    langs = [_lang_of(u, language) for u in evalset]  # fail before any decoding
    from . import batch
    from .decode import streams

    stream = options is not None and streams(options)
    groups = batch.groups([u.duration_s for u in evalset], langs,
                          options.batch if options is not None else 1, stream=stream)

    def run(group: list[int]):
        return batch.timed(model, processor, [evalset.utterances[i].audio for i in group],
                           options, language=langs[group[0]], task=task)

    # (a stream's group may be several long recordings: its first is warm-up enough, and
    # `batch.warm` below traces every row count the stream will run)
    warm = [run(groups[0][:1] if stream else groups[0])[1] for _ in range(max(0, warmup))]
    t0 = time.perf_counter()
    windows = warm_shapes(model, processor, evalset, langs, task=task,
                          options=options) if warmup > 0 else 0
    if warmup > 0 and options is not None and options.batch > 1:  # every batch's shape
        windows += batch.warm(model, processor,
                              [[evalset.utterances[i].audio for i in g] for g in groups],
                              [langs[g[0]] for g in groups], options, task=task)
    windows_s = time.perf_counter() - t0
    if on_warmed:
        on_warmed()
    rows, stopped = [], None
    for group in groups:
        heard, secs = run(group)
        for i, h in zip(group, heard):
            utt, lang = evalset.utterances[i], langs[i]
            ref = scoring.normalize(utt.text, lang, numbers)
            hyp = scoring.normalize(h.text, lang, numbers)
            # latency: what each clip of a batch waits (the batch); wall_s: its share of the
            # wall time (throughput, and the too-slow test's sums)
            rows.append({"id": utt.id, "lang": lang, "reference": utt.text,
                         "hypothesis": h.text, "ref_norm": ref, "hyp_norm": hyp,
                         "latency_s": secs, "wall_s": secs / len(group), "tokens": len(h.ids),
                         "duration_s": utt.duration_s, "pieces": h.pieces,
                         "loop": scoring.count_loop(h.ids, h.cap_reached)})
        if progress:
            progress(len(rows), len(evalset))
        if check:
            try:
                check(rows)
            except Stopped as e:
                stopped = e
                break
    sc = scoring.score([r["ref_norm"] for r in rows], [r["hyp_norm"] for r in rows])
    lat = np.array([r["latency_s"] for r in rows])
    wall, audio_s = sum(r["wall_s"] for r in rows), sum(r["duration_s"] for r in rows)
    disk_mb, mem_mb = model_sizes(model)
    figures = {
        "wer": sc.wer, "cer": sc.cer,
        "latency_mean_s": float(lat.mean()), "latency_median_s": float(np.median(lat)),
        "latency_p90_s": float(np.quantile(lat, 0.9)),
        "rtf": float(wall / audio_s),
        "throughput": float(audio_s / wall) if wall > 0 else float("inf"),
        "loops": int(sum(r["loop"] for r in rows)),
        "model_size_mb": disk_mb, "param_mb": mem_mb, "sparsity": zero_share(model),
        "warmup_s": float(warm[0]) if warm else 0.0,
        "warm_windows": windows, "warm_windows_s": windows_s,
        "n_utterances": len(rows), "dropped_empty_refs": sc.dropped_empty_refs,
        "clips_measured": len(rows),
        "numbers": sorted({scoring.number_mode(lang, numbers) for lang in langs}),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    heard = []
    if probes and stopped is None:
        # in each language of the set: whisper-base hears words in every probe in Russian and
        # far fewer in English, so a rate says something only next to the baseline's own in
        # the same language (`hallucination_excess`)
        by_lang = {}
        for lang in dict.fromkeys(langs):
            by_lang[lang], texts = hallucinations(model, processor, probes, language=lang,
                                                  task=task, options=options)
            tag = "" if len(set(langs)) == 1 else f"@{lang}"
            heard += [{"id": p.id + tag, "hypothesis": t} for p, t in zip(probes, texts)]
        figures["hallucination_rate"] = float(np.mean(list(by_lang.values())))
        figures["hallucination_by_lang"] = by_lang
    # Empty references are dropped from scoring; keep the error list aligned with scored rows.
    return Measurement(figures=figures, utterances=rows, errors=sc.per_utt, stopped=stopped,
                       probes=heard)


WARM_TOKENS = 3  # tokens per shape warm-up: the prompt step and the next-token step both run
WARM_PASSES = 2  # TorchScript optimises a trace at its second call (profiling executor)


def warm_shapes(model, processor, evalset: EvalSet, langs: list[str], *, task: str,
                options=None) -> int:
    """Untimed passes, `WARM_TOKENS` tokens each, over one clip of every encoder window the set
    will use beyond the first clip's; returns how many windows were warmed.

    Why: the auto window (`encoder.window=auto`) gives clips of different lengths different
    encoder shapes, and a compiled encoder (dynamo compiles again at the second shape, then
    once for all) or a scripted decoding step (one trace per shape) pays that at the first clip
    of each shape. Timing it charged a recipe its compilation: `encoder.compile=freeze` on the
    window measured about 6x slower on its first clips and was stopped as hopeless (issue #19).
    A server warms its buckets once at start-up; this warms the ones the set uses."""
    from . import decode
    from .window import full_frames

    plan = options or decode.Plan.default()
    full = full_frames(model)
    seen = {plan.window.frames(evalset.utterances[0].duration_s, full)}
    short = dataclasses.replace(plan, max_new_tokens=WARM_TOKENS)
    warmed = 0
    for utt, lang in zip(evalset, langs):
        frames = plan.window.frames(utt.duration_s, full)
        if frames in seen:
            continue
        seen.add(frames)
        for _ in range(WARM_PASSES):
            transcribe(model, processor, utt, language=lang, task=task, options=short)
        warmed += 1
    return warmed


# A probe asks one thing: is any word heard? The first tokens answer it; decoding a looping
# hallucination to the clip's cap (64 tokens for 4 s) only costs wall time: 10 probes were most
# of a tiny-model trial's 18 s in the test suite, and a real model that hallucinates loops too.
PROBE_TOKENS = 16  # at most this many tokens per probe (its logged transcript is their text)


def hallucinations(model, processor, probes: list[Utterance], *, language: str,
                   task: str = "transcribe", options=None) -> tuple[float, list[str]]:
    """(share of the non-speech `probes` transcribed with any word in their first
    `PROBE_TOKENS` tokens, those transcripts). Untimed: probe time is not latency."""
    from . import decode

    plan = dataclasses.replace(options or decode.Plan.default(), max_new_tokens=PROBE_TOKENS)
    heard = [transcribe(model, processor, p, language=language, task=task, options=plan)[0]
             for p in probes]
    words = [bool(scoring.normalize(h, language, "none")) for h in heard]
    return sum(words) / len(probes), heard


def head(m: Measurement, n: int) -> Measurement:
    """The measurement restricted to its first `n` clips (the baseline on the clips a stopped
    trial measured, so the two compare pair by pair)."""
    rows = m.utterances[:n]
    sc = scoring.score([r["ref_norm"] for r in rows], [r["hyp_norm"] for r in rows])
    return Measurement(figures={**m.figures, "wer": sc.wer, "cer": sc.cer,
                                "latency_median_s": float(np.median(
                                    [r["latency_s"] for r in rows]))},
                       utterances=rows, errors=sc.per_utt)


def compare(trial: Measurement, base: Measurement, confidence: float | None = None) -> dict:
    """Ratios of a trial against the baseline measured in the same process (on the same clips:
    a stopped trial is compared with the baseline's first clips). `confidence`: also the
    one-sided upper bound of dwer at that level (`dwer_upper`), which feasibility is then
    judged on."""
    t = trial.figures
    if len(trial.utterances) < len(base.utterances):
        base = head(base, len(trial.utterances))
    b = base.figures
    lo, hi = scoring.bootstrap_dwer(base.errors, trial.errors)
    out = {
        "dwer": scoring.relative(t["wer"], b["wer"]),
        "dcer": scoring.relative(t["cer"], b["cer"]),
        "dwer_ci95": [lo, hi],
        "speedup": scoring.speedup(base.utterances, trial.utterances),
    }
    if confidence is not None:
        out["dwer_upper"] = scoring.bootstrap_dwer(base.errors, trial.errors,
                                                   level=2 * confidence - 1)[1]
    mine, own = t.get("hallucination_by_lang"), b.get("hallucination_by_lang")
    if mine and own:  # the worst language's probe rate over the baseline's own there
        out["hallucination_excess"] = max(mine[k] - own.get(k, 0.0) for k in mine)
    return out


AGREEMENT = "agreement with the baseline's own transcripts (no references)"


def placeholder(evalset: EvalSet) -> EvalSet:
    """An unlabelled set with a stand-in reference per clip, so that the baseline can be
    measured (and timed) as any set is; `agree` then scores it against its own transcripts."""
    return dataclasses.replace(evalset, utterances=[dataclasses.replace(u, text="x")
                                                    for u in evalset])


def agree(evalset: EvalSet, base: Measurement, numbers: str = "auto"
          ) -> tuple[EvalSet, Measurement]:
    """The set with the baseline's transcripts as its references, and the baseline scored
    against them (WER 0): what a recipe's agreement WER is measured on. A clip the baseline
    heard nothing in has no reference (dropped from scoring, counted)."""
    utts = [dataclasses.replace(u, text=r["hypothesis"].strip())
            for u, r in zip(evalset, base.utterances)]
    rows = [{**r, "reference": r["hypothesis"], "ref_norm": r["hyp_norm"]}
            for r in base.utterances]
    sc = scoring.score([r["ref_norm"] for r in rows], [r["hyp_norm"] for r in rows])
    figs = {**base.figures, "wer": sc.wer, "cer": sc.cer,
            "dropped_empty_refs": sc.dropped_empty_refs}
    return (dataclasses.replace(evalset, name=f"{evalset.name} (references: the baseline's "
                                "transcripts)", utterances=utts),
            dataclasses.replace(base, figures=figs, utterances=rows, errors=sc.per_utt))


AGREEMENT_KEYS = {"wer": "agreement_wer", "cer": "agreement_cer"}
NOT_FOR_AGREEMENT = ("dwer", "dcer", "dwer_ci95", "dwer_upper")  # changes from 0: the same


def as_agreement(out: dict) -> dict:
    """A result scored against the baseline's transcripts, its figures named as such:
    `agreement_wer`, `agreement_cer` (never `wer`, `cer`); the changes against the baseline's
    0 are left out (they are the agreement figures themselves)."""
    def rename(d: dict) -> dict:
        return {AGREEMENT_KEYS.get(k, k): v for k, v in d.items() if k not in NOT_FOR_AGREEMENT}

    res = rename(out)
    res["baseline"] = rename(out.get("baseline") or {})
    res["utterances"] = [{("baseline_transcript" if k == "reference" else k): v
                          for k, v in r.items() if k != "ref_norm"}
                         for r in out.get("utterances", [])]
    res["scored_against"] = AGREEMENT
    return res


def set_threads(threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"`threads` must be >= 1, got {threads=}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class MeasureOptions:
    """How `run_trial` measures a recipe, passed whole (the sweep's worker builds it from the
    sweep's options, `sweep.evaluate` from its command line). A new setting is one field."""

    language: str | None = None  # generate()'s language (None: each utterance's own `lang`)
    task: str = "transcribe"
    threads: int | None = None  # torch CPU threads (None: torch's own choice)
    warmup: int = 1  # untimed passes before timing
    numbers: str = "auto"  # number normalisation before scoring (`scoring.normalize`)
    max_slowdown: float | None = None  # stop a trial this many times slower than the baseline
    early_stop: EarlyStop | None = None  # stop a trial that clearly cannot be feasible
    confidence: float | None = None  # also dwer's one-sided upper bound at this level
    rungs: tuple[float, ...] = ()  # shares of the set after which `rung_judge` may stop it


def run_trial(model, processor, evalset: EvalSet, recipe, opts: MeasureOptions | None = None, *,
              baseline: Measurement | None = None, calibration: EvalSet | None = None,
              progress=None, probes: list[Utterance] | None = None,
              rung_judge=None) -> tuple[dict, Measurement]:
    """Apply `recipe` to a copy of `model`, measure it and the baseline as `opts` says; returns
    (result, base). `rung_judge(n, figures)` may stop the trial at `opts.rungs`
    (`sweep.measure.stopping.Stopper`).

    Pass the returned baseline Measurement back in to reuse it across trials of one worker.
    A trial stopped early (`max_slowdown`, `early_stop`) returns `status` "pruned", its
    `stop_reason` and the figures of the `clips_measured` first clips; otherwise "ok".
    """
    from .compress import Applied, apply_recipe, recompile_count

    o = opts or MeasureOptions()
    n_threads = set_threads(o.threads)
    if baseline is None:
        baseline = measure(model, processor, evalset, language=o.language, task=o.task,
                           warmup=o.warmup, numbers=o.numbers, probes=probes)
    if recipe.is_baseline:
        # The baseline trial is the measurement every other trial is compared with: measuring
        # the same unchanged model again would only cost a full pass over the data.
        applied = Applied(model=model, kernels={}, sparsity=None,
                          notes=["baseline: the measurement every trial compares with"])
        return _result(recipe, applied, baseline, baseline, 0.0, {}, n_threads,
                       o.confidence), baseline
    early_stop = o.early_stop
    cheap = recipe.cheap() if early_stop is not None and early_stop.enabled else None
    if cheap is not None and len(evalset) <= early_stop.min_clips:
        cheap = None  # no look before the last clip: nothing to save
    stopper = Stopper(baseline.utterances, len(evalset), early_stop, o.max_slowdown,
                      rungs=o.rungs, judge=rung_judge, first_look=cheap is not None)
    if cheap is not None:
        looked = _first_look(model, processor, evalset, recipe, cheap, stopper, baseline,
                             language=o.language, task=o.task, numbers=o.numbers,
                             confidence=o.confidence, n_threads=n_threads)
        if looked is not None:
            return looked, baseline
    calibrate = None if calibration is None else calibrator(processor, calibration,
                                                             o.language, o.task)
    t0 = time.perf_counter()
    applied = apply_recipe(copy.deepcopy(model), recipe, calibrate=calibrate)
    prepare_s = time.perf_counter() - t0
    graphs = {}
    trial = measure(applied.model, processor, evalset, language=o.language, task=o.task,
                    warmup=o.warmup, numbers=o.numbers, progress=progress,
                    on_warmed=lambda: graphs.setdefault("warm", recompile_count()),
                    check=stopper.check, options=applied.options, probes=probes)
    return _result(recipe, applied, trial, baseline, prepare_s, graphs, n_threads,
                   o.confidence), baseline


def _first_look(model, processor, evalset: EvalSet, recipe, cheap, stopper: Stopper,
                baseline: Measurement, *, language, task, numbers, confidence,
                n_threads: int) -> dict | None:
    """A recipe that compiles or calibrates pays for that before its first clip: its cheap
    part (`Recipe.cheap`: the same pruning, shrinking, casts and decoding, eager, without the
    calibrated layers) is measured on the first `min_clips` clips first, with the accuracy
    tests of one look. A model its pruning alone already breaks (loops, or a dWER bound over
    the budget) is stopped there: the costly part only adds error. Returns that pruned
    trial's result, or None to measure the recipe itself."""
    from .compress import apply_recipe

    t0 = time.perf_counter()
    applied = apply_recipe(copy.deepcopy(model), cheap)
    prepare_s = time.perf_counter() - t0
    head_set = dataclasses.replace(evalset, utterances=evalset.utterances[:stopper.rule.min_clips])
    look = measure(applied.model, processor, head_set, language=language, task=task, warmup=0,
                   numbers=numbers, check=stopper.first_look().check, options=applied.options)
    if look.stopped is None:
        return None
    why = (f"first look, before compiling or calibrating: its cheap part "
           f"({cheap.describe()}) alone {look.stopped.reason}")
    look.stopped = type(look.stopped)(why)
    applied.notes.append(why)
    return _result(recipe, applied, look, baseline, prepare_s, {}, n_threads, confidence)


def _result(recipe, applied, trial: Measurement, baseline: Measurement, prepare_s: float,
            graphs: dict, n_threads: int, confidence: float | None = None) -> dict:
    from .compress import recompile_count

    steady = trial.utterances[0]["latency_s"]
    compiled = recipe.compiles  # its first (warm-up) pass paid for the compilation
    return {
        **{k: v for k, v in trial.figures.items()},
        **compare(trial, baseline, confidence),
        "status": "ok" if trial.stopped is None else "pruned",
        **({} if trial.stopped is None else {"stop_reason": trial.stopped.reason,
                                             "stop_kind": trial.stopped.kind}),
        "sparsity": applied.sparsity if applied.sparsity is not None else trial.figures["sparsity"],
        "prepare_s": prepare_s,
        "compile_s": max(0.0, trial.figures["warmup_s"] - steady) if compiled else 0.0,
        # The warm-up pass compiles; any graph built while timing means shapes were not stable.
        "recompiles": recompile_count() - graphs.get("warm", recompile_count()),
        "threads": n_threads,
        "device": str(_device_of(applied.model).type),
        **machine.info(),  # cpu, isa, isa_cap: the speed-ups hold for this machine's kernels
        "kernels": dict(applied.kernels),
        "notes": list(applied.notes),
        "recipe": recipe.to_flat(),
        "baseline": {k: baseline.figures[k] for k in FIGURES if k in baseline.figures},
        "utterances": trial.utterances,
        "probes": trial.probes,
    }
