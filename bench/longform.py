"""`python -m bench.longform`: long recordings, HYPER's recipes against HF and faster-whisper.

The recordings are built (`sweep.inputs.longform`) from clips that are not in the embedded set
(default: the shared Russian clips, ../shared/speech), utterances joined with pauses and
stretches of silence, noise and hum, the reference the whole text. Compared, in one run:

- `hf-fp32-seq`: the unchanged HF whisper-base, fp32, sequential long-form `generate` (its own
  30 s windows, seeking on timestamps): the baseline every ratio is taken against;
- HYPER recipes (`--recipe NAME=RECIPE`, repeatable; default: the best measured, VAD pieces
  of up to 30 s and of up to 20 s decoded with timestamps by the per-token int8 recipe on each
  piece's window, streamed 16 and 8 rows at a time);
- faster-whisper (the same weights, CTranslate2, in its own process): int8 and fp32 sequential
  (`WhisperModel.transcribe`, greedy, no VAD), and int8 `BatchedInferencePipeline` (batch 8,
  its VAD on, as its README benchmarks it).

Every variant is prepared once; then for each group of `--group` recordings every variant
transcribes it in turn, the order rotating per group (interleaved: machine drift hits all
alike). A recipe that streams (greedy, `decode.batch` > 1) decodes a group as one stream, as
`sweep.transcribe` does with several files; the others one recording at a time. Per variant: WER
and CER on the whole recordings, dWER against hf-fp32-seq with its paired bootstrap 95%
interval over recordings, and throughput (audio seconds per wall second, the whole set), with
its ratio to hf-fp32-seq and to faster-whisper batched int8. The verdict (issue #28): a recipe
within 2% dWER (95% upper bound within +10%) at >= 4x hf-fp32-seq's throughput and >= 1.5x
faster-whisper batched int8's. Writes longform-<tag>.json and .md under --out.

Smoke: `python -m bench.longform --n 1 --min-s 35 --max-s 40 --out /tmp/lf`.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sweep.console import refusing

from . import common
from .harness import Peer, close_peers, named_recipes

_ACCURATE = ("segment.method=vad,segment.threshold=0.25,segment.max_s=30,decode.timestamps=true,"
             "decode.loop=greedy,decode.compile=script,quant.scheme=dynamic_int8,"
             "quant.enc_attn=int8_token,quant.enc_mlp=int8_token,encoder.window=auto,"
             "encoder.bucket_s=1,encoder.margin_s=2,encoder.min_s=10,decode.no_repeat_ngram=4")
RECIPES = (  # the best measured (docs/longform.md, "Streams"): 30 s pieces, and 20 s
    ("ts-rest-stream16", _ACCURATE + ",decode.batch=16"),
    ("ts20-rest-stream8", _ACCURATE.replace("segment.max_s=30", "segment.max_s=20")
     + ",decode.batch=8"),
)
PEERS = (("fw-int8-seq", "int8", "sequential"), ("fw-int8-batched8-vad", "int8", "batched"),
         ("fw-fp32-seq", "float32", "sequential"))
BASELINE = "hf-fp32-seq"
MAX_DWER, MAX_DWER_UPPER = 0.02, 0.10  # "as accurate" (issue #16's rule)
MIN_GAIN_HF, MIN_GAIN_FW = 4.0, 1.5  # issue #28's throughput bars


@dataclass
class Variant:
    name: str
    recipe: str = ""  # Recipe.parse text (HF variants; "" = the unchanged model)
    compute_type: str = ""  # faster-whisper variants
    mode: str = ""  # faster-whisper: sequential | batched
    batch: int = 0  # faster-whisper batched: its batch size (set by prepare)
    runner: object = field(default=None, repr=False)
    options: object = None
    prepare_s: float = 0.0

    def prepare(self, loaded, threads: int, batch: int) -> None:
        t0 = time.perf_counter()
        if self.compute_type:
            self.batch = batch
            self.runner = Peer(self.compute_type, threads, fw_long,
                               f"{self.compute_type} {self.mode}")
        else:
            from sweep.measure.compress import apply_recipe
            from sweep.measure.decode import Plan
            from sweep.techniques.recipe import Recipe

            recipe = Recipe.parse(self.recipe)
            if recipe.is_baseline:
                self.runner, self.options = loaded.model, Plan.default()
            else:
                applied = apply_recipe(copy.deepcopy(loaded.model), recipe)
                self.runner, self.options = applied.model, applied.options
        self.prepare_s = time.perf_counter() - t0

    def run(self, processor, audios: list[np.ndarray], lang: str) -> tuple[list[str], float]:
        """(texts, wall seconds, features and segmentation included) of recordings of one
        language: together when the recipe streams (`decode.streams`), else one by one."""
        from sweep.measure.batch import timed
        from sweep.measure.decode import streams

        if self.compute_type:
            got = [self.runner(a, lang, self.mode, self.batch) for a in audios]
            return [text for text, _ in got], sum(secs for _, secs in got)
        texts, total = [], 0.0
        for chunk in [audios] if streams(self.options) else [[a] for a in audios]:
            heard, secs = timed(self.runner, processor, chunk, self.options, language=lang)
            texts += [h.text for h in heard]
            total += secs
        return texts, total


def fw_long(model, audio, lang: str, mode: str, batch: int):
    """One whole recording in the faster-whisper peer (`harness.Peer`): (text, wall s)."""
    from faster_whisper import BatchedInferencePipeline

    pipe = BatchedInferencePipeline(model) if mode == "batched" else None
    t0 = time.perf_counter()
    if pipe is not None:  # its defaults: VAD on, no timestamps, 30 s chunks
        segments, _ = pipe.transcribe(audio, language=lang, task="transcribe", beam_size=1,
                                      batch_size=batch, temperature=0)
    else:  # Whisper's sequential long-form decoding, greedy, like HF generate's
        segments, _ = model.transcribe(audio, language=lang, task="transcribe", beam_size=1,
                                       vad_filter=False, temperature=0,
                                       condition_on_previous_text=False)
    text = " ".join(s.text.strip() for s in segments)  # decoding happens here
    return text.strip(), time.perf_counter() - t0


def recordings(args):
    """The long-form set and its manifest: built from `--dataset` (cached under $HYPER_CACHE),
    or a manifest."""
    from sweep.inputs.data import load_eval_set
    from sweep.inputs.longform import LongOptions, cached

    if args.manifest:
        return load_eval_set(args.manifest), Path(args.manifest)
    clips = load_eval_set(args.dataset, language=args.language).utterances
    embedded = {u.text for u in load_eval_set("embedded")}
    clips = [u for u in clips if u.text not in embedded]  # none of the embedded set's clips
    opts = LongOptions(n=args.n, min_s=args.min_s, max_s=args.max_s, seed=args.seed,
                       name="bench_" + re.sub(r"[^A-Za-z0-9_-]+", "_", args.dataset))
    manifest = cached(clips, opts, args.dataset)
    return load_eval_set(str(manifest)), manifest


def units(ev, group: int) -> list[list[int]]:
    """The recordings timed together: `group` consecutive ones of one language (a recipe that
    streams decodes them as one stream, every other variant one by one)."""
    from sweep.measure.batch import groups

    return groups([u.duration_s for u in ev], [u.lang or "ru" for u in ev], group, stream=True)


def measure(variants: list[Variant], loaded, ev, repeats: int, group: int = 1) -> dict:
    """Per variant and repeat: texts per recording and seconds per unit (`units`),
    interleaved per unit."""
    parts = units(ev, group)
    out = {v.name: {"texts": [None] * len(ev), "seconds": [[] for _ in parts]}
           for v in variants}
    for rep in range(repeats):
        for j, unit in enumerate(parts):
            k = (j + rep) % len(variants)
            utts = [ev.utterances[i] for i in unit]
            for v in variants[k:] + variants[:k]:
                texts, secs = v.run(loaded.processor, [u.audio for u in utts],
                                    utts[0].lang or "ru")
                for i, text in zip(unit, texts):
                    out[v.name]["texts"][i] = text
                out[v.name]["seconds"][j].append(secs)
                ids = utts[0].id + (f" .. {utts[-1].id}" if len(utts) > 1 else "")
                print(f"  {ids} ({sum(u.duration_s for u in utts):.0f} s) {v.name}: "
                      f"{secs:.1f} s", file=sys.stderr)
    return out


def summarize(variants: list[Variant], ev, raw: dict) -> list[dict]:
    from sweep.measure import scoring

    refs = [scoring.normalize(u.text, u.lang) for u in ev]
    audio_s = ev.total_s
    rows, errs = [], {}
    for v in variants:
        r = raw[v.name]
        sc = scoring.score(refs, [scoring.normalize(t, u.lang) for t, u in zip(r["texts"], ev)])
        errs[v.name] = sc.per_utt
        wall = sum(float(np.median(s)) for s in r["seconds"])
        rows.append({"name": v.name, "recipe": v.recipe, "faster_whisper": (
            f"{v.compute_type} {v.mode}" if v.compute_type else None), "wer": sc.wer,
            "cer": sc.cer, "throughput": audio_s / wall, "wall_s": wall,
            "prepare_s": v.prepare_s, "texts": r["texts"], "seconds": r["seconds"]})
    by = {r["name"]: r for r in rows}
    base, fw = by[BASELINE], by.get("fw-int8-batched8-vad")
    for r in rows:
        r["dwer"] = scoring.relative(r["wer"], base["wer"])
        r["dwer_ci95"] = list(scoring.bootstrap_dwer(errs[BASELINE], errs[r["name"]]))
        r["x_hf_fp32_seq"] = r["throughput"] / base["throughput"]
        r["x_fw_int8_batched"] = r["throughput"] / fw["throughput"] if fw else None
        r["meets_28"] = bool(not r["faster_whisper"] and r["name"] != BASELINE
                             and r["dwer"] <= MAX_DWER and r["dwer_ci95"][1] <= MAX_DWER_UPPER
                             and r["x_hf_fp32_seq"] >= MIN_GAIN_HF
                             and (r["x_fw_int8_batched"] or 0) >= MIN_GAIN_FW)
    return rows


def resolution(rows: list[dict], recordings: int) -> dict | None:
    """How finely this set tells dWER apart (`report.resolution`, as a sweep says it: the
    median half-width of the HYPER recipes' 95% intervals), and the dWER a recipe would need
    for its upper bound to keep within the bar's +10% (about that much below it). None without
    recipes or with one recording (resampled over recordings, its interval is a point: it says
    nothing of the spread)."""
    from sweep.results import report
    from sweep.techniques.recipe import Recipe

    got = recordings >= 2 and report.resolution([
        {"recipe": Recipe.parse(r["recipe"]).to_flat(), "dwer_ci95_lo": r["dwer_ci95"][0],
         "dwer_ci95_hi": r["dwer_ci95"][1]} for r in rows if not r["faster_whisper"]])
    if not got:
        return None
    half, n = got
    return {"dwer_half_width": half, "recipes": n, "dwer_needed": MAX_DWER_UPPER - half}


def resolution_line(res: dict | None) -> str:
    if res is None:
        return ""
    return (f"This set resolves dWER to about ±{res['dwer_half_width']:.0%} (median half-width "
            f"of {res['recipes']} recipes' 95% intervals): smaller differences between rows are "
            f"noise, and a recipe's upper bound keeps within +{MAX_DWER_UPPER:.0%} only at a "
            f"dWER of about {res['dwer_needed']:+.0%} or less.")


def uses_line(s: dict) -> list[str]:
    """How the recordings use their clips: a clip in several recordings ties their errors, so
    the interval, resampled over recordings, is narrower than the speech resolves."""
    if not s.get("clips"):
        return []
    most = s["most_uses"]
    return [f"- clips: {s['clips']} distinct, {s['clip_uses']} uses, "
            + ("none repeated" if most == 1 else f"one used up to {most} times")]


def markdown(res: dict) -> str:
    head = ["variant", "WER", "CER", "dWER", "dWER 95% CI", "audio s/s", "x HF fp32 seq",
            "x fw int8 batched", "meets #28"]
    rows = [[r["name"], common.pct(r["wer"], False), common.pct(r["cer"], False),
             common.pct(r["dwer"]), f"[{common.pct(r['dwer_ci95'][0])}, "
             f"{common.pct(r['dwer_ci95'][1])}]", f"{r['throughput']:.1f}",
             f"{r['x_hf_fp32_seq']:.2f}", "-" if r["x_fw_int8_batched"] is None
             else f"{r['x_fw_int8_batched']:.2f}", "yes" if r["meets_28"] else "no"]
            for r in res["rows"]]
    recipes = [f"- `{r['name']}`: `{r['recipe'] or 'fp32, unchanged'}`" for r in res["rows"]
               if not r["faster_whisper"]]
    return "\n".join([
        "# Long-form: HYPER recipes against HF and faster-whisper", "",
        f"- date: {res['date']}; commit: {res['commit']}",
        f"- machine: {common.describe_machine(res['machine'])}",
        f"- kernels: {res['isa_note']}",
        f"- set: {res['set']['recordings']} recordings, {res['set']['audio_s']:.0f} s "
        f"({res['set']['source']}); {res['repeats']} repeat(s), interleaved per "
        + ("recording" if res.get("group", 1) == 1 else f"group of {res['group']} recordings "
           "(a recipe that streams decodes a group as one stream; the others one by one)")
        + "; throughput = audio seconds / median wall seconds per "
        + ("recording" if res.get("group", 1) == 1 else "group") + ", summed",
        *uses_line(res["set"]), "",
        common.md_table(head, rows), "", *recipes, "",
        f"meets #28: dWER <= {MAX_DWER:.0%} with its 95% upper bound <= {MAX_DWER_UPPER:.0%}, "
        f">= {MIN_GAIN_HF:g}x hf-fp32-seq's throughput and >= {MIN_GAIN_FW:g}x "
        "fw-int8-batched8-vad's.", "", resolution_line(res.get("resolution")), ""])


@refusing
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.longform", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="shared",
                    help="the clips the recordings are built from (embedded-set clips left out)")
    ap.add_argument("--language", default="ru")
    ap.add_argument("--manifest", default=None, help="a long-form manifest instead")
    ap.add_argument("--n", type=int, default=6, help="recordings built")
    ap.add_argument("--min-s", type=float, default=45.0)
    ap.add_argument("--max-s", type=float, default=116.0)
    ap.add_argument("--seed", type=int, default=28)
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=RECIPE",
                    help="a HYPER recipe to compare (repeatable; default: the built-in two)")
    ap.add_argument("--no-peers", action="store_true", help="skip faster-whisper")
    ap.add_argument("--batch", type=int, default=8, help="faster-whisper's batch size")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--group", type=int, default=9, help="recordings timed together: a recipe "
                    "that streams (greedy, decode.batch > 1) decodes them as one stream; 1 = "
                    "one recording at a time")
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--tag", default="cpu", help="results: longform-<tag>.json and .md")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)

    import os

    import torch

    from sweep.inputs.cli import quiet_transformers
    from sweep.inputs.longform import clip_uses
    from sweep.inputs.models import load_model
    from sweep.measure.decode import isa_note, streams

    # bad input: refused (exit 2) before the recordings are built or any model loads
    recipes = named_recipes(args.recipe, "--recipe") or list(RECIPES)
    if args.group < 1:
        ap.error(f"`--group` must be at least 1, got {args.group}")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    quiet_transformers()
    ev, manifest = recordings(args)
    uses = clip_uses(manifest)
    variants = [Variant(BASELINE)] + [Variant(n, recipe=r) for n, r in recipes]
    if not args.no_peers:
        variants += [Variant(n, compute_type=c, mode=m) for n, c, m in PEERS]
    loaded = load_model("embedded:whisper-base")
    for v in variants:
        print(f"preparing {v.name}", file=sys.stderr)
        v.prepare(loaded, threads, args.batch)
    print(f"{len(ev)} recordings, {ev.total_s:.0f} s, {len(variants)} variants",
          file=sys.stderr)
    from sweep.measure.batch import warm

    parts = units(ev, args.group)
    for v in variants:  # untimed: first-call costs (traces, caches) on the first recording
        v.run(loaded.processor, [ev.utterances[0].audio[:16000 * 35]], ev.utterances[0].lang
              or "ru")
        if v.options is not None and v.options.batch > 1:  # and every batch shape of the set
            together = streams(v.options)
            warm(v.runner, loaded.processor, [[ev.utterances[i].audio for i in u] for u in parts]
                 if together else [[u.audio] for u in ev],
                 [ev.utterances[u[0]].lang or "ru" for u in parts] if together
                 else [u.lang or "ru" for u in ev], v.options)
    try:
        raw = measure(variants, loaded, ev, args.repeats, args.group)
    finally:
        close_peers(variants)
    res = {**common.stamp(threads), "isa_note": isa_note(), "repeats": args.repeats,
           "group": args.group,
           "set": {"recordings": len(ev), "audio_s": ev.total_s, "source": (
               args.manifest or f"{args.dataset} ({args.language}) clips, seed {args.seed}"),
               "ids": [u.id for u in ev], "durations_s": [u.duration_s for u in ev],
               "clips": len(uses), "clip_uses": sum(uses.values()),
               "most_uses": max(uses.values(), default=0)},
           "rows": summarize(variants, ev, raw)}
    res["resolution"] = resolution(res["rows"], len(ev))
    out = Path(args.out)
    common.write_json(out / f"longform-{args.tag}.json", res)
    (out / f"longform-{args.tag}.md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
