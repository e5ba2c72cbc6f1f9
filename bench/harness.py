"""The benchmarks' timing harness: a variant (a recipe applied to the HF model, or
faster-whisper in its own process), the timed pass that interleaves variants clip by clip, and
the rows it sums up to. bench.recipes, bench.window, bench.decode and bench.search time with it;
bench.longform runs faster-whisper through the same `Peer`."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Variant:
    """One thing to time: a recipe applied to the HF model, or faster-whisper at a precision."""

    name: str
    source: str  # baseline | hand | int8 | front | extra | peer
    recipe: str = ""  # Recipe.parse text (HF variants)
    compute_type: str = ""  # faster-whisper variants
    note: str = ""
    runner: object = field(default=None, repr=False)
    prepare_s: float = 0.0
    cpu_s: float | None = None  # CPU seconds of the last call, when not spent in this process
    kernels: dict | None = None  # layer type -> implementation that ran (HF variants)
    options: object = None  # decoding options of the applied recipe (HF variants)

    def prepare(self, loaded, threads: int) -> None:
        t0 = time.perf_counter()
        if self.compute_type:
            self.runner = Peer(self.compute_type, threads, fw_clip)
        else:
            from sweep.measure.compress import apply_recipe
            from sweep.inputs.data import calibration_set
            from sweep.measure.evaluate import calibrator
            from sweep.techniques.recipe import Recipe

            recipe = Recipe.parse(self.recipe)
            if recipe.is_baseline:
                self.runner = loaded.model
            else:  # static int8 calibrates on the embedded calibration clips, never timed here
                calib = recipe.calibrates and calibrator(
                    loaded.processor, calibration_set("embedded"))
                applied = apply_recipe(copy.deepcopy(loaded.model), recipe,
                                       calibrate=calib or None)
                self.runner, self.kernels = applied.model, applied.kernels
                self.options = applied.options
        self.prepare_s = time.perf_counter() - t0

    def run(self, processor, utt, lang: str):
        """(text, content token ids, cap reached, seconds incl. feature extraction)."""
        from sweep.measure import scoring
        from sweep.measure.evaluate import transcribe

        if not self.compute_type:
            return transcribe(self.runner, processor, utt, language=lang, options=self.options)
        cap = scoring.max_new_tokens_for(utt.duration_s)
        text, ids, secs, self.cpu_s = self.runner(utt.audio, lang, cap,
                                                  processor.tokenizer.eos_token_id)
        return text, ids, len(ids) >= cap, secs


class Peer:
    """faster-whisper in its own process. In ours, once CTranslate2's OpenMP threads have run,
    torch's decoder took 14 ms per token instead of 7 for the rest of the process (measured on
    this CPU): sharing a process would slow every HF variant, not faster-whisper. Each call is
    answered in the peer by `serve(model, *request)` (a module-level function); afterwards it
    waits for the peer's spinning threads to sleep, so they do not steal the next variant's
    cores."""

    SETTLE_S = 0.3  # > OpenMP's default spin time (KMP_BLOCKTIME 200 ms)

    def __init__(self, compute_type: str, threads: int, serve, what: str = ""):
        import multiprocessing as mp

        from sweep.inputs.models import embedded_ct2_dir

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, daemon=True, args=(
            child, str(embedded_ct2_dir()), compute_type, threads, serve))
        self.proc.start()
        status = self.conn.recv()
        if status != "ready":
            raise RuntimeError(f"faster-whisper {what or compute_type} did not start: {status}")

    def __call__(self, *request):
        self.conn.send(request)
        reply = self.conn.recv()
        time.sleep(self.SETTLE_S)
        if isinstance(reply, str):
            raise RuntimeError(f"faster-whisper failed: {reply}")
        return reply

    def close(self) -> None:
        """Hang up: the peer's `recv` ends and it exits on its own, releasing what its imports
        hold (killed, it left semaphores that Python's resource tracker warned of at exit);
        killed only if it does not within 10 s."""
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        self.conn.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        self.proc = None

    __del__ = close


def close_peers(variants) -> None:
    """Hang up every variant's faster-whisper peer (left to `__del__` at interpreter exit, the
    peers were killed late and the resource tracker warned of their semaphores)."""
    for v in variants:
        if isinstance(v.runner, Peer):
            v.runner.close()


def _peer_main(conn, ct2_dir: str, compute_type: str, threads: int, serve) -> None:
    try:
        from faster_whisper import WhisperModel

        model = WhisperModel(ct2_dir, device="cpu", compute_type=compute_type,
                             cpu_threads=threads)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        try:
            conn.send(serve(model, *request))
        except Exception as e:  # noqa: BLE001
            conn.send(f"{type(e).__name__}: {e}")


def fw_clip(model, audio, lang: str, cap: int, eos: int):
    """One clip, greedy, without timestamps, at most `cap` tokens: (text, content ids, wall s,
    CPU s of the peer process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    segments, _ = model.transcribe(
        audio, language=lang, task="transcribe", beam_size=1,
        without_timestamps=True, vad_filter=False, condition_on_previous_text=False,
        temperature=0, max_new_tokens=cap)
    segs = list(segments)  # a generator: decoding happens here
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    ids = [t for s in segs for t in s.tokens if t < eos]
    return "".join(s.text for s in segs).strip(), ids, secs, cpu


def timed_pass(variants, processor, clips, langs, repeats: int, progress=None) -> dict:
    """Per variant: hypotheses of repeat 0, ids, loop flags and (repeats x clips) arrays of wall
    and CPU seconds (process time: what a loaded shared machine does not inflate by making us
    wait). Variants rotate per clip and repeat so none always runs first or last."""
    out = {v.name: {"text": [], "ids": [], "cap": [], "lat": np.zeros((repeats, len(clips))),
                    "cpu": np.zeros((repeats, len(clips)))} for v in variants}
    for r in range(repeats):
        for i, (utt, lang) in enumerate(zip(clips, langs)):
            shift = (i + r) % len(variants)
            for v in variants[shift:] + variants[:shift]:
                c0 = time.process_time()
                text, ids, cap, secs = v.run(processor, utt, lang)
                cpu = time.process_time() - c0
                out[v.name]["cpu"][r, i] = cpu if v.cpu_s is None else v.cpu_s
                out[v.name]["lat"][r, i] = secs
                if r == 0:
                    out[v.name]["text"].append(text)
                    out[v.name]["ids"].append(ids)
                    out[v.name]["cap"].append(cap)
            if progress:
                progress(r * len(clips) + i + 1, repeats * len(clips))
    return out


def summarize(variants, timed: dict, clips, langs, numbers: str = "auto") -> list[dict]:
    """Rows (fractions and seconds) scored on the same references, ratios against the first
    variant (the baseline) per repeat; dwer interval by paired bootstrap over clips."""
    from sweep.measure import scoring

    refs = [scoring.normalize(u.text, lang, numbers) for u, lang in zip(clips, langs)]
    base = variants[0].name
    scores = {n: scoring.score(refs, [scoring.normalize(t, lang, numbers)
                                      for t, lang in zip(d["text"], langs)])
              for n, d in timed.items()}
    b_lat = np.median(timed[base]["lat"], axis=1)
    b_cpu = np.median(timed[base]["cpu"], axis=1)
    rows = []
    for v in variants:
        d, sc = timed[v.name], scores[v.name]
        per_rep, cpu = np.median(d["lat"], axis=1), np.median(d["cpu"], axis=1)
        ratio = b_lat / per_rep
        lo, hi = scoring.bootstrap_dwer(scores[base].per_utt, sc.per_utt)
        rows.append({
            "name": v.name, "source": v.source, "recipe": v.recipe,
            "compute_type": v.compute_type or None, "label": label(v), "note": v.note,
            "kernels": v.kernels,
            "wer": sc.wer, "cer": sc.cer,
            "dwer": scoring.relative(sc.wer, scores[base].wer),
            "dcer": scoring.relative(sc.cer, scores[base].cer), "dwer_ci95": [lo, hi],
            "latency_median_s": float(np.median(per_rep)),
            "latency_spread_s": [float(per_rep.min()), float(per_rep.max())],
            "latency_repeats_s": [float(x) for x in per_rep],
            "latency_mean_s": float(d["lat"].mean()),
            "speedup": float(np.median(ratio)), "speedup_repeats": [float(x) for x in ratio],
            "cpu_median_s": float(np.median(cpu)), "cpu_repeats_s": [float(x) for x in cpu],
            "speedup_cpu": float(np.median(b_cpu / cpu)),
            "rtf": float(d["lat"].sum(axis=1).mean() / sum(u.duration_s for u in clips)),
            "loops": int(sum(scoring.count_loop(i, c) for i, c in zip(d["ids"], d["cap"]))),
            "prepare_s": v.prepare_s,
        })
    return rows


def label(v: Variant) -> str:
    if v.compute_type:
        return f"faster-whisper {v.compute_type}"
    from sweep.techniques.recipe import Recipe

    return Recipe.parse(v.recipe).describe()


def named_recipes(items, flag: str) -> list[tuple[str, str]]:
    """`NAME=RECIPE` command-line items as (name, recipe text); ValueError naming `flag` for
    an item without a name or `=`, or a recipe that does not parse."""
    from sweep.techniques.recipe import Recipe, RecipeError

    out = []
    for item in items or ():
        name, eq, text = item.partition("=")
        if not eq or not name:
            raise ValueError(f"`{flag}` must be name=recipe-string, got {item!r}")
        try:
            Recipe.parse(text)
        except RecipeError as e:
            raise ValueError(f"`{flag}` {name}: {e}") from None
        out.append((name, text))
    return out


def warmup_clips(utts, langs, per_length: int = 2) -> list:
    """`per_length` clips (with their languages) of each length rounded up to whole seconds."""
    seen: dict[int, int] = {}
    out = []
    for u, lang in zip(utts, langs):
        n = math.ceil(u.duration_s)
        if seen.get(n, 0) < per_length:
            seen[n] = seen.get(n, 0) + 1
            out.append((u, lang))
    return out
