"""`python -m bench.gpu`: every CUDA path of HYPER on one GPU, in one prepared run (#17).

The one command for the device machine (after `python -m bench.gpu_prepare` here):

    python -m bench.gpu --device cuda --carry gpu_carry --out $OUT --time-budget 480

(run it with a device timeout of ~540 s; JSON and markdown are rewritten after every row, so a
killed run still leaves what it measured). A CPU dry run of the same code, on tiny shapes:

    python -m bench.gpu --device cpu --tiny --carry gpu_carry

It runs HYPER's evaluation core (`sweep.inputs.models`, `sweep.measure.compress.apply_recipe`,
`sweep.measure.decode`, `sweep.measure.evaluate.measure/run_trial`), on each recipe value
of the `gpu` search
space (one change at a time on top of the fp32 eager baseline), its warm starts, and the
greedy loop with its compiled step (CUDA graphs on cuda) and the study's pruning 0.81:

- accuracy: the carried real checkpoint (int8 in the carry, dequantized to fp32 as the
  baseline), WER/CER on the carried clips and dWER against that baseline;
- latency: `random:large-v3` (real shapes), batch 1 and 16, end-of-text suppressed so that
  every run decodes exactly `--tokens` tokens; a second pass decoding one token gives the time
  per 30 s window (features, encoder, prompt step), the difference the time per token.

One more row runs a trial the way a sweep's GPU worker does (`sweep.search.worker.run_one`: the
recipe checked, the device checked, model + clips + baseline prepared once, the trial timed and
logged), with MLflow's log replaced by a local JSON file (`<stem>-worker-trial.json`): the
carried model saved in the Hugging Face layout and loaded by `sweep.inputs.models`, the clips
read through `sweep.inputs.data` (stdlib WAV without soundfile), the first warm start of the
space as the recipe.

Rows run cheapest first (eager, then compiled step, compile default, reduce-overhead,
max-autotune; the small model before large-v3); a row that cannot run is recorded with its
reason: needs cuda, package missing, device time, not selected, error.
The GPU machine has no Ray, MLflow, jiwer or soundfile: nothing here imports Ray or MLflow,
scoring falls back to its own edit distance, clips are WAV read with `wave`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import wave
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The study's GPU figures, reproduced or contradicted on large-v3 (#17; docs/benchmarks/gpu.md).
STUDY = {"baseline_s_per_audio": 0.84, "prune_0.81_time_change": -0.27,
         "bnb_time_change": 2.59}
# Recipes beyond one-value-at-a-time changes of the space: the greedy loop and its compiled
# step (CUDA graphs on cuda), and the study's magnitude pruning.
EXTRAS = ("decode.loop=greedy", "decode.loop=greedy,decode.compile=step",
          "quant.scheme=fp16,decode.loop=greedy", "quant.scheme=fp16,decode.loop=greedy,"
          "decode.compile=step", "prune.rate=0.81")
PACKAGES = {"int8_weight_only": "torchao", "int8_act_int4_weight": "torchao",
            "bnb_int8": "bitsandbytes", "bnb_nf4": "bitsandbytes"}
COMPILE_COST = {"none": 0, "default": 2, "reduce-overhead": 3, "max-autotune": 4}
# Seconds a task needs left before it starts, by cost class (small model, large-v3).
RESERVE_S = {0: (3, 10), 1: (20, 60), 2: (30, 90), 3: (30, 120), 4: (60, 240)}


@dataclass(frozen=True)
class Options:
    device: str = "cuda"
    carry: Path = REPO / "gpu_carry"
    out: Path | None = None  # default $OUT, else a new temp folder
    model_large: str = "random:large-v3"
    batches: tuple[int, ...] = (1, 16)
    tokens: int = 32
    repeats: int = 2
    clips: int = 0  # accuracy clips (0 = all carried)
    time_budget: float = 480.0
    row_timeout: float = 180.0
    # sweep.measure.kernels' timing per shape (1.5 s there; cuda has one candidate per scheme)
    kernel_budget_s: float = 0.2
    only: tuple[str, ...] = ()
    space: str = "gpu"


TINY = {"model_large": "random:tiny", "batches": (1, 2), "tokens": 4, "repeats": 1, "clips": 1}


@dataclass(frozen=True)
class Variant:
    name: str
    flat: dict  # recipe keys changed from the defaults (device added at run time)
    source: str  # baseline | space | start | extra

    @property
    def cost(self) -> int:
        return COMPILE_COST[self.flat.get("compile.mode", "none")] or int(
            self.flat.get("decode.compile") == "step")


@dataclass
class Task:
    variant: Variant
    part: str  # accuracy | latency | worker
    rows: list[dict] = field(default_factory=list)


class DeviceTime(Exception):
    """The time budget ran out in the middle of a row."""


def variants(space_name: str) -> list[Variant]:
    """The baseline, each value of each searched parameter alone, the warm starts, EXTRAS."""
    from sweep.techniques.recipe import PARAMS, Recipe
    from sweep.search.space import load_space

    space = load_space(space_name)
    with_fixed = functools.partial(_with_fixed, space)
    out = [Variant("baseline", {}, "baseline")]
    for name, dim in space.params.items():
        if dim.kind != "value":
            out += [Variant(f"{name}={v}", with_fixed({name: v}), "space")
                    for v in dim.domain() if v != PARAMS[name].default]
    out += [Variant("start: " + ",".join(f"{k}={v}" for k, v in s.items()), with_fixed(dict(s)),
                    "start") for s in space.starts]
    out += [Variant(e, {k: PARAMS[k].coerce(v) for k, v in Recipe.parse(e).to_flat().items()
                        if k != "device" and v != PARAMS[k].default}, "extra") for e in EXTRAS]
    seen, unique = set(), []
    for v in out:  # a start equal to a one-value change is measured once
        key = tuple(sorted(v.flat.items()))
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def _with_fixed(space, flat: dict) -> dict:
    """A fixed value of the space joins the variants of its own technique only."""
    heads = {k.split(".")[0] for k in flat}
    return {**{n: d.value for n, d in space.params.items() if d.kind == "value"
               and n != "device" and n.split(".")[0] in heads}, **flat}


def worker_variant(vs: list[Variant], space_name: str) -> Variant | None:
    """The variant the worker-path trial runs: the space's first warm start (which `variants`
    may have merged with the equal one-value change), else none."""
    from sweep.search.space import load_space

    space = load_space(space_name)
    if not space.starts:
        return None
    flat = _with_fixed(space, dict(space.starts[0]))
    return next((v for v in vs if v.flat == flat), None)


def plan(vs: list[Variant], worker: Variant | None = None) -> list[Task]:
    """Cheap first: by compile cost, the small model's accuracy before large-v3's latency; the
    worker-path trial on the first warm start (its accuracy row's twin, through a sweep's
    worker code) with its cost class."""
    tasks = [Task(v, p) for v in vs for p in ("accuracy", "latency")]
    tasks += [Task(worker, "worker")] if worker is not None else []
    return sorted(tasks, key=lambda t: (t.variant.cost, t.part != "accuracy"))


def why_not(task: Task, opts: Options) -> tuple[str, str] | None:
    """(category, reason) when the task cannot run here, before spending any time on it."""
    from sweep.techniques.recipe import Recipe, RecipeError

    v = task.variant
    try:
        Recipe.from_flat({"device": opts.device, **v.flat})
    except RecipeError as e:
        return ("needs cuda" if "device=cuda" in str(e) else "recipe error"), f"{e}"
    for key, value in v.flat.items():
        pkg = PACKAGES.get(value) if key.startswith("quant.") else None
        if pkg and importlib.util.find_spec(pkg) is None:
            return "package missing", (f"package missing: {pkg} (not importable on this "
                                       f"machine; `{key}`={value} needs it)")
    if opts.only and v.name not in opts.only:
        return "not selected", "not selected (--only)"
    return None


def out_of_time(task: Task, remaining: float, tiny: bool) -> str | None:
    need = 0 if tiny else RESERVE_S[task.variant.cost][task.part != "accuracy"]
    if remaining < need:
        return (f"device time: {max(0.0, remaining):.0f} s of --time-budget left, this row "
                f"needs ~{need} s (cost class {task.variant.cost})")
    return None


# ---- the machine ------------------------------------------------------------------------

def _smi(args: list[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"


SMI_FIELDS = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
              "memory.total,memory.used,power.draw,power.limit,temperature.gpu,pstate")


def gpu_info(device: str) -> dict:
    import torch

    info: dict = {"device": device, "cuda_available": torch.cuda.is_available()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info |= {"name": p.name, "capability": f"{p.major}.{p.minor}",
                 "total_memory_mib": round(p.total_memory / 2**20),
                 "sm_count": p.multi_processor_count,
                 "l2_cache_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                 "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    q = _smi([f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"])
    if q and "," in q:
        info["smi"] = dict(zip(SMI_FIELDS.split(","), (s.strip() for s in q.splitlines()[0]
                                                      .split(","))))
    info["driver"] = info.get("smi", {}).get("driver_version", "unknown (no nvidia-smi)")
    info["nvidia_smi"] = _smi([]) or "nvidia-smi not found"
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "accelerate",
                "triton", "torchao", "bitsandbytes", "jiwer", "soundfile", "num2words", "ray",
                "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


# ---- models and clips -------------------------------------------------------------------

def load_carried(carry: Path, device: str):
    """The carried checkpoint, int8 dequantized to fp32 (the accuracy baseline)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor)

    from sweep.inputs import ct2

    meta = json.loads((carry / "model" / "hyper.json").read_text("utf-8"))
    raw = load_file(str(carry / "model" / "weights.safetensors"))
    state = {k: torch.from_numpy(v.astype(np.float32) * raw.get(k + ".__scale", 1.0))
             for k, v in raw.items() if not k.endswith(".__scale")}
    ids = meta["ids"]
    config = WhisperConfig(**meta["sizes"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
                           pad_token_id=ids["eot"], decoder_start_token_id=ids["sot"],
                           suppress_tokens=meta["suppress_tokens"],
                           begin_suppress_tokens=meta["begin_suppress_tokens"])
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != {"proj_out.weight"} or unexpected:
        raise ValueError(f"carried weights must match Whisper's, got {missing=} {unexpected=}")
    model.tie_weights()
    tok = ct2.build_tokenizer(carry / "model" / "tokenizer.json")
    if meta["english_only"]:
        model.generation_config = GenerationConfig(
            decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
            pad_token_id=ids["eot"], no_timestamps_token_id=ids["no_timestamps"],
            prev_sot_token_id=ids["prev_sot"], suppress_tokens=meta["suppress_tokens"],
            begin_suppress_tokens=meta["begin_suppress_tokens"],
            alignment_heads=meta["alignment_heads"], max_length=config.max_target_positions,
            is_multilingual=False, return_timestamps=False)
    else:
        model.generation_config = ct2.generation_config(tok, config, meta["alignment_heads"])
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return model.to(device).eval(), WhisperProcessor(fe, tok), meta


@contextmanager
def carried_tokenizer_data(carry: Path):
    """`random:<size>` builds its tokenizer from the embedded whisper-base's package data,
    absent on the GPU machine: point sweep.inputs.models at the carried copy (here too, so that the
    dry run takes the device's path)."""
    from sweep.inputs import models

    saved = models._embedded_sources
    models._embedded_sources = lambda: ([], carry / "embedded_data")
    try:
        yield
    finally:
        models._embedded_sources = saved


def load_clips(carry: Path, limit: int = 0):
    from sweep.inputs.data import EvalSet, Utterance

    utts = []
    for line in (carry / "clips" / "manifest.jsonl").read_text("utf-8").splitlines():
        c = json.loads(line)
        with wave.open(str(carry / "clips" / c["file"]), "rb") as w:
            if (w.getframerate(), w.getsampwidth(), w.getnchannels()) != (16000, 2, 1):
                raise ValueError(f"carried clip {c['file']} must be 16 kHz 16-bit mono")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        audio = (pcm.astype(np.float32) / 32768.0)
        utts.append(Utterance(c["id"], audio, c["text"], c["lang"], audio.size / 16000))
    return EvalSet("carry:" + utts[0].lang, utts[:limit] if limit else utts)


# ---- measuring --------------------------------------------------------------------------

def _peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _recipe(v: Variant, device: str):
    from sweep.techniques.recipe import Recipe

    return Recipe.from_flat({"device": device, **v.flat})


def accuracy(model, processor, evalset, base, v: Variant, device: str) -> dict:
    from sweep.measure import evaluate

    recipe = _recipe(v, device)
    _peak_reset(device)
    res, _ = evaluate.run_trial(model, processor, evalset, recipe,
                                evaluate.MeasureOptions(language="en", numbers="none"),
                                baseline=base)
    keep = ("wer", "cer", "dwer", "dcer", "dwer_ci95", "latency_median_s", "speedup", "loops",
            "compile_s", "recompiles", "prepare_s", "kernels", "notes", "sparsity")
    return {**{k: res.get(k) for k in keep}, "peak_mem_mib": _peak_mib(device),
            "hypotheses": [u["hypothesis"] for u in res["utterances"]]}


def latency(model, plan, processor, clips, batch: int, opts: Options) -> dict:
    """Seconds for `batch` clips (features + HYPER's decode) decoding exactly opts.tokens
    tokens, and decoding one: per audio, per 30 s window, per token."""
    import torch

    from sweep.measure.modules import sync

    utts = [clips.utterances[i % len(clips)] for i in range(batch)]

    def once(cap: int):
        sync(torch.device(opts.device))
        t0 = time.perf_counter()
        ids = decode_ids(model, plan, processor, utts, cap)
        sync(torch.device(opts.device))
        return time.perf_counter() - t0, ids

    _peak_reset(opts.device)
    t0 = time.perf_counter()
    once(1), once(opts.tokens)  # warm-up: compilation, CUDA graphs, allocator
    warm = time.perf_counter() - t0
    t1s, tns, lens = [], [], set()
    for _ in range(opts.repeats):
        t1s.append(once(1)[0])
        tn, ids = once(opts.tokens)
        tns.append(tn)
        lens |= {len(x) for x in ids}
    t1, tn = float(np.median(t1s)), float(np.median(tns))
    step = (tn - t1) / max(1, opts.tokens - 1)
    row = {"s_per_batch": tn, "s_per_audio": tn / batch, "s_per_window": t1 / batch,
           "ms_per_token": 1000 * step, "tokens_per_s": batch / step if step > 0 else None,
           "tokens": opts.tokens, "tokens_decoded": sorted(lens), "warmup_s": warm,
           "repeats": opts.repeats, "peak_mem_mib": _peak_mib(opts.device)}
    rt = greedy_runtime(model, plan, batch)
    if rt is not None and rt.last is not None:  # the greedy loop times its own phases
        row["greedy_last"] = asdict(rt.last) | {"ms_per_token": rt.last.ms_per_token}
    if lens != {opts.tokens}:
        row["note"] = f"decoded {sorted(lens)} tokens, not {opts.tokens}"
    return row


def decode_ids(model, plan, processor, utts, cap: int) -> list[list[int]]:
    """Token ids per clip from HYPER's own features + decode, by the recipe's plan."""
    from sweep.measure import decode

    audios, secs = [u.audio for u in utts], [u.duration_s for u in utts]
    plan = plan or decode.Plan.default()
    feats = decode.features(model, processor, audios, secs, plan)
    return decode.decode(model, feats, plan, language="en", task="transcribe", cap=cap)


def greedy_runtime(model, plan, batch: int):
    """The greedy loop's runtime (its last Timing) when the plan is the greedy loop."""
    from sweep.measure import decode

    if not isinstance(plan, decode.GreedyPlan):
        return None
    return decode.runtime(model, plan, batch)


def fixed_length(model) -> None:
    """Suppress end-of-text: every decode then runs exactly its cap (random weights stop at
    random places otherwise, and runs would not compare)."""
    gcfg = model.generation_config
    gcfg.suppress_tokens = sorted(set(gcfg.suppress_tokens or []) | {gcfg.eos_token_id})


@contextmanager
def deadline(seconds: float):
    """Raise DeviceTime in this (main) thread after `seconds`."""
    def fire(signum, frame):
        raise DeviceTime(f"device time: stopped after {seconds:.0f} s (row limit or budget)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- a sweep's worker path -------------------------------------------------------------

class JsonLog:
    """`sweep.search.worker.run_one`'s log where MLflow is missing: the trial's record (the tags,
    params, metrics and transcripts MLflow would get, by the same `sweep.results.rows` codec) in
    one JSON file, rewritten at each step."""

    def __init__(self, path: Path):
        self.path, self.doc = path, {}

    def _write(self) -> None:
        from bench import common

        common.write_json(self.path, self.doc)

    def begin(self, slot, flat: dict, tags: dict):
        from sweep.results import rows

        self.doc = {"run_id": f"local-{slot.key}", "trial_key": slot.key, "status": "RUNNING",
                    "tags": {k: str(v) for k, v in tags.items()} | rows.tags(tags),
                    "params": rows.params(flat)}
        self._write()
        return self.doc["run_id"], None  # never a finished earlier attempt: a fresh file

    def finish(self, run_id: str, result: dict) -> None:
        from sweep.results import rows

        metrics, tags = rows.to_mlflow(result)
        self.doc |= {"status": "FINISHED" if result.get("status", "ok") == "ok" else "FAILED",
                     "metrics": metrics, "tags": self.doc["tags"] | tags,
                     "transcripts": result.get("utterances") or [],
                     "probes": [{"id": p.get("id"), "hypothesis": p.get("hypothesis")}
                                for p in result.get("probes") or []]}
        self._write()

    def fail(self, run_id: str, exc: BaseException, status: str, trial_s: float) -> str:
        msg = f"{type(exc).__name__}: {exc}"
        self.doc |= {"status": "FAILED", "metrics": {"trial_s": trial_s},
                     "tags": self.doc.get("tags", {}) | {"status": status, "error": msg[:4000]},
                     "traceback": "".join(traceback.format_exception(exc))[-4000:]}
        self._write()
        return msg

    def rung(self, run_id: str, n: int, figs: dict) -> None:
        self.doc.setdefault("rungs", {})[str(n)] = {k: float(figs[k]) for k in ("dwer", "speedup")}

    def rung_figures(self, n: int) -> list[dict]:
        return []  # one trial: nothing to compare with

    def profile(self, run_id: str, prof: dict | None, error: str | None = None) -> None:
        self.doc["profile"] = prof or {"error": error}
        self._write()


def worker_inputs(carry: Path, model, processor, where: Path, clips: int) -> tuple[str, dict]:
    """The carried model saved in the Hugging Face layout (what `--model DIR` loads) and a
    manifest of the carried clips in HYPER's format: the model spec and data options of a
    sweep whose worker reads them."""
    model_dir = where / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    manifest = where / "clips.jsonl"
    lines = [json.dumps({"id": c["id"], "audio": str((carry / "clips" / c["file"]).resolve()),
                         "text": c["text"], "lang": c["lang"]})
             for c in map(json.loads, (carry / "clips" / "manifest.jsonl").read_text("utf-8")
                          .splitlines())]
    manifest.write_text("\n".join(lines) + "\n", "utf-8")
    return str(model_dir), {"dataset": str(manifest), "max_samples": clips or None,
                            "config": None, "split": "test", "audio_column": "audio",
                            "text_column": "text", "language": "en"}


# ---- the run ----------------------------------------------------------------------------

class Run:
    def __init__(self, opts: Options, out: Path, command: str):
        self.opts, self.out, self.t0 = opts, out, time.perf_counter()
        self.small = self.large = self.base = self.clips = None
        self.doc: dict = {"issue": 17, "kind": "gpu" if opts.device == "cuda" else
                          "cpu dry run (not GPU figures)", "command": command,
                          "options": {k: str(v) if isinstance(v, Path) else v
                                      for k, v in asdict(opts).items()},
                          "study": STUDY, "rows": []}

    def remaining(self) -> float:
        return self.opts.time_budget - (time.perf_counter() - self.t0)

    def setup(self) -> None:
        from bench import common
        from sweep.measure import kernels

        # One implementation per scheme on cuda: its 1.5 s timing per shape buys nothing.
        orig = kernels.time_calls
        kernels.time_calls = lambda fns, **kw: orig(fns, **({"budget_s": self.opts.kernel_budget_s,
                                                              "rounds": (3, 50)} | kw))
        stamp = common.stamp()
        gpu = gpu_info(self.opts.device)
        carry = json.loads((self.opts.carry / "CARRY.json").read_text("utf-8"))
        self.doc |= {"date": stamp["date"], "commit": stamp["commit"], "gpu": gpu,
                     "driver": gpu["driver"], "versions": versions(), "machine": stamp["machine"],
                     "carry": carry}

    def accuracy_task(self, task: Task) -> list[dict]:
        from sweep.measure import evaluate

        if self.small is None:
            model, proc, meta = load_carried(self.opts.carry, self.opts.device)
            self.clips = load_clips(self.opts.carry, self.opts.clips)
            self.base = evaluate.measure(model, proc, self.clips, language="en", numbers="none")
            self.small = (model, proc)
            self.doc["models"] = {"accuracy": {
                "source": meta["source"], "english_only": meta["english_only"],
                "attention": model.config._attn_implementation, "clips": len(self.clips),
                "audio_s": self.clips.total_s, "baseline_wer": self.base.figures["wer"],
                "baseline_cer": self.base.figures["cer"]}}
        model, proc = self.small
        if task.variant.name == "baseline":
            f = self.base.figures
            return [{"wer": f["wer"], "cer": f["cer"], "dwer": 0.0,
                     "latency_median_s": f["latency_median_s"], "loops": f["loops"],
                     "hypotheses": [u["hypothesis"] for u in self.base.utterances]}]
        return [accuracy(model, proc, self.clips, self.base, task.variant, self.opts.device)]

    def latency_rows(self, task: Task) -> list[dict]:
        from sweep.inputs import models
        from sweep.measure.compress import apply_recipe

        if self.large is None:
            with carried_tokenizer_data(self.opts.carry):
                loaded = models.load_model(self.opts.model_large, device=self.opts.device)
            fixed_length(loaded.model)
            self.large = loaded
            self.doc.setdefault("models", {})["latency"] = {
                "spec": loaded.spec, "source": loaded.source,
                "params_m": round(sum(p.numel() for p in loaded.model.parameters()) / 1e6, 1),
                "attention": loaded.model.config._attn_implementation}
        if self.clips is None:
            self.clips = load_clips(self.opts.carry, self.opts.clips)
        recipe, model, plan = _recipe(task.variant, self.opts.device), self.large.model, None
        if not recipe.is_baseline:
            applied = apply_recipe(copy.deepcopy(model), recipe)
            model, plan = applied.model, getattr(applied, "options", None)
        rows = []
        for b in self.opts.batches:
            if why := out_of_time(task, self.remaining(), "tiny" in self.opts.model_large):
                rows.append({"batch": b, "status": "skipped", "why": "device time",
                             "reason": why})
                continue
            rows.append({"batch": b, **latency(model, plan, self.large.processor, self.clips,
                                               b, self.opts)})
        return rows

    def worker_task(self, task: Task) -> list[dict]:
        """One trial through `sweep.search.worker.run_one`, logged to a JSON file."""
        import socket

        import torch

        from sweep.search import worker

        if self.small is None:
            self.accuracy_task(Task(Variant("baseline", {}, "baseline"), "accuracy"))
        where = Path(tempfile.mkdtemp(prefix="hyper-gpu-worker-"))
        try:
            model_spec, data = worker_inputs(self.opts.carry, *self.small, where,
                                             self.opts.clips)
            ctx = worker.SweepContext(sweep="gpu-worker", model=model_spec, data=data,
                                      language="en", numbers="none", tracking_uri="local-json",
                                      experiment_id="-", parent_run_id="-",
                                      cpus_per_trial=torch.get_num_threads())
            slot = worker.Slot("gpu-worker-1", torch.get_num_threads(),
                               ["0"] if self.opts.device == "cuda" else [], socket.gethostname())
            stem = "gpu" if self.opts.device == "cuda" else "gpu-dryrun-cpu"
            log = JsonLog(self.out / f"{stem}-worker-trial.json")
            got = worker.run_one({"device": self.opts.device, **task.variant.flat}, ctx, slot,
                                 log)
        finally:
            shutil.rmtree(where, ignore_errors=True)
            worker._CACHE.clear()  # the worker's model: not kept beside this run's own
        if got["status"] != worker.STATUS_OK and str(got.get("error")).startswith("DeviceTime"):
            raise DeviceTime(got["error"].removeprefix("DeviceTime: "))  # the row's deadline
        if got["status"] != worker.STATUS_OK:
            raise RuntimeError(f"the worker's trial ended {got['status']}: {got.get('error')}")
        keep = ("wer", "cer", "dwer", "latency_median_s", "speedup", "loops", "trial_s",
                "worker_prepare_s", "hallucination_rate")
        return [{**{k: got.get(k) for k in keep}, "log": log.path.name,
                 "logged_status": log.doc["status"], "logged_metrics": len(log.doc["metrics"]),
                 "transcripts": len(log.doc["transcripts"])}]

    def run_task(self, task: Task) -> None:
        v, opts = task.variant, self.opts
        head = {"variant": v.name, "recipe": v.flat, "source": v.source, "part": task.part,
                "model": opts.model_large if task.part == "latency" else "carried"}
        batches = list(opts.batches) if task.part == "latency" else [1]
        skip = why_not(task, opts)
        if skip is None and (late := out_of_time(task, self.remaining(),
                                                 "tiny" in opts.model_large)):
            skip = ("device time", late)
        if skip:
            task.rows = [{**head, "batch": b, "status": "skipped", "why": skip[0],
                          "reason": skip[1]} for b in batches]
            return
        t0 = time.perf_counter()
        try:
            with deadline(min(opts.row_timeout, self.remaining())):
                got = {"accuracy": self.accuracy_task, "latency": self.latency_rows,
                       "worker": self.worker_task}[task.part](task)
            task.rows = [{**head, "batch": 1, "status": "ok", **r} if "status" not in r
                         else {**head, **r} for r in got]
            for r in task.rows:
                r.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 - a row that fails says why; the run goes on
            cat = "device time" if isinstance(e, DeviceTime) else "error"
            msg = str(e) if isinstance(e, DeviceTime) else f"error: {type(e).__name__}: {e}"
            task.rows = [{**head, "batch": b, "status": "skipped", "why": cat,
                          "reason": " ".join(msg.split())[:600],
                          "traceback": traceback.format_exc()[-1500:]} for b in batches]
        for r in task.rows:
            r["row_s"] = round(time.perf_counter() - t0, 2)
        _free(opts.device)

    def go(self, tasks: list[Task]) -> dict:
        self.setup()
        for i, task in enumerate(tasks, 1):
            self.run_task(task)
            for r in task.rows:
                print(f"[{i}/{len(tasks)} {time.perf_counter() - self.t0:5.0f}s] {r['part']:8} "
                      f"b{r['batch']:<2} {r['variant']}: {r['status']}"
                      + (f" ({r['reason'][:100]})" if r["status"] != "ok" else ""),
                      file=sys.stderr, flush=True)
            self.doc["rows"] = [r for t in tasks for r in t.rows]
            self.doc["wall_s"] = round(time.perf_counter() - self.t0, 1)
            self.write()  # after every task: a killed run keeps what it measured
        return self.doc

    def write(self) -> None:
        from bench import common

        self.doc["study_comparison"] = study_comparison(self.doc["rows"])
        stem = "gpu" if self.opts.device == "cuda" else "gpu-dryrun-cpu"
        common.write_json(self.out / f"{stem}.json", self.doc)
        (self.out / f"{stem}.md").write_text(markdown(self.doc), "utf-8")


# ---- report -----------------------------------------------------------------------------

def _find(rows, variant, part="latency", batch=1):
    return next((r for r in rows if r["variant"] == variant and r["part"] == part
                 and r["batch"] == batch), None)


def study_comparison(rows: list[dict]) -> list[dict]:
    """The study's three GPU rows next to this run's figures (batch 1, fixed token count)."""
    base = _find(rows, "baseline")
    ok = base is not None and base["status"] == "ok"
    out = [{"what": "base whisper-large-v3, s per audio", "study": STUDY["baseline_s_per_audio"],
            "here": base["s_per_audio"] if ok else None}]
    for label, variant, key in (("magnitude pruning 0.81, time change", "prune.rate=0.81",
                                 "prune_0.81_time_change"),
                                ("bitsandbytes int8, time change", "quant.scheme=bnb_int8",
                                 "bnb_time_change")):
        r = _find(rows, variant)
        here = r["s_per_audio"] / base["s_per_audio"] - 1 if ok and r and r["status"] == "ok" \
            else None
        out.append({"what": label, "study": STUDY[key], "here": here,
                    "reason": None if here is not None else (r or {}).get("reason")})
    return out


def markdown(doc: dict) -> str:
    from bench.common import md_table, pct

    def f(x, spec=".3f"):
        return "—" if x is None else format(x, spec)

    g, rows = doc.get("gpu", {}), doc["rows"]
    lines = [f"# GPU check (#17): {doc['kind']} ({doc.get('date', '?')})", "",
             f"- GPU: {g.get('name', 'none')}, {g.get('total_memory_mib', '?')} MiB, "
             f"driver {doc.get('driver', '?')}, clocks (SM/mem, MHz now/max): "
             + "/".join(g.get("smi", {}).get(k, "?") for k in ("clocks.sm", "clocks.max.sm",
                                                               "clocks.mem", "clocks.max.mem")),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items()
                                        if v != "missing") + "; missing: " + ", ".join(
                 k for k, v in doc.get("versions", {}).items() if v == "missing"),
             f"- commit {doc.get('commit', '?')}; command `{doc['command']}`; "
             f"wall {doc.get('wall_s', '?')} s", ""]
    acc = [r for r in rows if r["part"] == "accuracy" and r["status"] == "ok"]
    m = doc.get("models", {})
    if acc:
        a = m.get("accuracy", {})
        lines += [f"## Accuracy: {a.get('source', '?')} (int8 carried, dequantized fp32 "
                  f"baseline), {a.get('clips')} clips, {f(a.get('audio_s'), '.1f')} s", "",
                  md_table(("variant", "WER", "dWER", "CER", "s per clip", "loops", "kernels"),
                           [(r["variant"], f(r["wer"]), pct(r.get("dwer")), f(r.get("cer")),
                             f(r.get("latency_median_s")), r.get("loops", "—"),
                             ", ".join(sorted(set((r.get("kernels") or {}).values()))) or "—")
                            for r in acc]), ""]
    lat = [r for r in rows if r["part"] == "latency" and r["status"] == "ok"]
    if lat:
        s = m.get("latency", {})
        lines += [f"## Latency: {s.get('spec')} ({s.get('params_m')} M parameters, random "
                  f"weights), {lat[0]['tokens']} tokens per clip", "",
                  md_table(("variant", "batch", "s per audio", "s per 30 s window",
                            "ms per token (batch step)", "tokens/s", "peak MiB", "warm-up s"),
                           [(r["variant"], r["batch"], f(r["s_per_audio"], ".4f"),
                             f(r["s_per_window"], ".4f"), f(r["ms_per_token"], ".2f"),
                             f(r.get("tokens_per_s"), ".0f"), f(r.get("peak_mem_mib"), ".0f"),
                             f(r["warmup_s"], ".1f")) for r in lat]), ""]
    wrk = [r for r in rows if r["part"] == "worker" and r["status"] == "ok"]
    if wrk:
        lines += ["## A sweep's worker path (`sweep.search.worker.run_one`, log to JSON)", "",
                  md_table(("recipe", "WER", "dWER", "speed-up", "trial s", "prepare s",
                            "logged", "log file"),
                           [(r["variant"], f(r["wer"]), pct(r.get("dwer")), f(r.get("speedup"),
                                                                             ".2f"),
                             f(r.get("trial_s"), ".1f"), f(r.get("worker_prepare_s"), ".1f"),
                             f"{r['logged_status']}, {r['logged_metrics']} metrics, "
                             f"{r['transcripts']} transcripts", r["log"]) for r in wrk]), ""]
    lines += ["## The study's GPU rows", "", md_table(("what", "study", "here", "why not"), [
        (c["what"], f(c["study"], ".2f"), f(c["here"], ".3f"), c.get("reason") or "")
        for c in doc.get("study_comparison", [])]), ""]
    left = [r for r in rows if r["status"] != "ok"]
    if left:
        lines += ["## Left out", "", md_table(("variant", "part", "batch", "why", "reason"), [
            (r["variant"], r["part"], r["batch"], r["why"], r["reason"][:160]) for r in left],
            "lllll"), ""]
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------

def out_dir(opts: Options) -> Path:
    out = opts.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    out = Path(out or tempfile.mkdtemp(prefix="hyper-gpu-"))
    if opts.device != "cuda" and out.resolve() == RESULTS.resolve():
        raise SystemExit(f"error: `--out` {RESULTS} holds the GPU's results: a --device "
                         f"{opts.device} dry run never writes there; pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def parse(argv=None) -> Options:
    d = Options()
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=d.device,
                    help="cuda: the real check; cpu: a dry run of the same code")
    ap.add_argument("--carry", type=Path, default=d.carry,
                    help="folder made by python -m bench.gpu_prepare (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default $OUT, else a new temp folder)")
    ap.add_argument("--model-large", default=None,
                    help=f"latency model (default {d.model_large}; random:tiny with --tiny)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes for a quick run: " + ", ".join(f"{k}={v}"
                                                                     for k, v in TINY.items()))
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,16)")
    ap.add_argument("--tokens", type=int, default=None, help=f"decoded per clip ({d.tokens})")
    ap.add_argument("--repeats", type=int, default=None, help=f"timed passes ({d.repeats})")
    ap.add_argument("--clips", type=int, default=None, help="accuracy clips (0 = all)")
    ap.add_argument("--time-budget", type=float, default=d.time_budget,
                    help="seconds for the whole run; rows that do not fit are recorded as "
                         "left out for device time (default %(default)s)")
    ap.add_argument("--row-timeout", type=float, default=d.row_timeout,
                    help="seconds for one row (default %(default)s)")
    ap.add_argument("--only", action="append", default=[],
                    help="run only this variant (repeatable; others are recorded as not "
                         "selected), e.g. baseline, quant.scheme=fp16")
    a = ap.parse_args(argv)
    given = {"model_large": a.model_large, "tokens": a.tokens, "repeats": a.repeats,
             "clips": a.clips,
             "batches": a.batches and tuple(int(x) for x in a.batches.split(","))}
    base = TINY if a.tiny else {}
    opts = replace(d, device=a.device, carry=a.carry, out=a.out, time_budget=a.time_budget,
                   row_timeout=a.row_timeout, only=tuple(a.only),
                   **{**base, **{k: v for k, v in given.items() if v is not None}})
    if opts.tokens < 2:
        ap.error(f"--tokens must be >= 2 (one-token passes are subtracted), got {opts.tokens}")
    if not (opts.carry / "CARRY.json").is_file():
        ap.error(f"--carry must be a folder made by `python -m bench.gpu_prepare`, got "
                 f"{opts.carry} (no CARRY.json)")
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
    out = out_dir(opts)
    known = {v.name for v in variants(opts.space)}
    if bad := [n for n in opts.only if n not in known]:
        print(f"error: --only must name variants ({', '.join(sorted(known))}), got {bad}",
              file=sys.stderr)
        return 2
    run = Run(opts, out, "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None
                                                          else argv))
    vs = variants(opts.space)
    doc = run.go(plan(vs, worker_variant(vs, opts.space)))
    ok = sum(r["status"] == "ok" for r in doc["rows"])
    print(f"{ok}/{len(doc['rows'])} rows ok in {doc['wall_s']} s; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
