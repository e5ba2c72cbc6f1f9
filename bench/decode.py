"""`python -m bench.decode`: the decoding levers on the real whisper-base, in one process.

Variants (recipes, plus faster-whisper int8) transcribe every clip in turn (bench.recipes'
interleaved timed pass), then: decoder milliseconds per token after the prompt step (generate:
forward hooks on the encoder and decoder; the greedy loop: its own clock), the encoder
window's WER cost (same recipe with and without `encoder.window=auto`, paired bootstrap), and
throughput at batch N (time per audio, separate from single-clip latency).
Writes bench/results/decode.md and decode.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

from sweep import console

from . import common
from .recipes import Variant, headline, named_recipes, summarize, timed_pass

# bf16 (AMX) encoder, int8 (VNNI) decoder and head: the precision mix of this CPU.
MIX = ("quant.enc_attn=bf16,quant.enc_mlp=bf16,quant.dec_self=dynamic_int8,"
       "quant.dec_cross=dynamic_int8,quant.dec_mlp=dynamic_int8,quant.head=dynamic_int8")
GREEDY, STEP, SCRIPT = "decode.loop=greedy", "decode.compile=step", "decode.compile=script"
WINDOW, NR4 = "encoder.window=auto", "decode.no_repeat_ngram=4"
XBF16, FREEZE = "decode.cross_kv=bf16", "encoder.compile=freeze"
VARIANTS = (
    ("baseline", "baseline", ""),
    ("fp32-greedy", "loop", GREEDY),
    ("fp32-greedy-step", "loop", f"{GREEDY},{STEP}"),
    ("int8", "hand", "quant.scheme=dynamic_int8"),
    ("int8-greedy-step", "loop", f"quant.scheme=dynamic_int8,{GREEDY},{STEP}"),
    ("int8-greedy-script", "loop", f"quant.scheme=dynamic_int8,{GREEDY},{SCRIPT}"),
    ("mix-greedy", "mix", f"{MIX},{GREEDY}"),
    ("mix-greedy-step", "mix", f"{MIX},{GREEDY},{STEP}"),
    ("mix-greedy-script", "mix", f"{MIX},{GREEDY},{SCRIPT}"),
    ("mix-greedy-script-xbf16", "mix", f"{MIX},{GREEDY},{SCRIPT},{XBF16}"),
    ("mix-greedy-script-xbf16-freeze", "mix", f"{MIX},{GREEDY},{SCRIPT},{XBF16},{FREEZE}"),
    ("mix-greedy-step-nr4", "mix", f"{MIX},{GREEDY},{STEP},{NR4}"),
    ("mix-greedy-step-window", "window", f"{MIX},{GREEDY},{STEP},{WINDOW}"),
    ("mix-greedy-step-window-nr4", "window", f"{MIX},{GREEDY},{STEP},{WINDOW},{NR4}"),
    ("mix-fast-window-nr4", "window",
     f"{MIX},{GREEDY},{SCRIPT},{XBF16},{FREEZE},{WINDOW},{NR4}"),
)
WINDOW_PAIRS = (("mix-greedy-step", "mix-greedy-step-window"),
                ("mix-greedy-step-nr4", "mix-greedy-step-window-nr4"))
# fast-window-nr4 has no full-window twin with nr4; its WER cost shows against the baseline
THROUGHPUT = ("mix-greedy-step", "mix-greedy-step-window-nr4")


def prepare(v: Variant, loaded, threads: int) -> None:
    """bench.recipes' preparation, keeping the kernels map and notes of HF variants."""
    if v.compute_type:
        return v.prepare(loaded, threads)
    from sweep.measure.compress import apply_recipe
    from sweep.techniques.recipe import Recipe

    t0 = time.perf_counter()
    applied = apply_recipe(copy.deepcopy(loaded.model), Recipe.parse(v.recipe))
    v.runner, v.prepare_s, v.options = applied.model, time.perf_counter() - t0, applied.options
    v.kernels, v.notes = applied.kernels, applied.notes


def decoder_ms_per_token(v: Variant, processor, clips, lang: str) -> dict:
    """Median over clips of decoder ms per generated token after the prompt step, and of
    encoder seconds (incl. cross-attention K/V for the greedy loop)."""
    from sweep.measure import decode
    from sweep.measure.evaluate import transcribe

    model, plan, per_tok, enc = v.runner, v.options or decode.Plan.default(), [], []
    prompt, steps, other = [], [], []
    for u in clips:
        if isinstance(plan, decode.GreedyPlan):
            secs = transcribe(model, processor, u, language=lang, options=plan)[3]
            t = decode.runtime(model, plan).last
            per_tok.append(t.ms_per_token)
            enc.append(t.encode_s)
            prompt.append(1000 * t.first_s)
            steps.append(t.steps)
            other.append(1000 * (secs - t.encode_s - t.decode_s))  # features, text, Python
            continue
        marks, end = _timed_generate(model, lambda u=u: transcribe(
            model, processor, u, language=lang, options=plan))
        per_tok.append(1000 * (end - marks["dec1"][0]) / max(1, len(marks["dec1"]) - 1))
        enc.append(marks["enc1"][0] - marks["enc0"][0] if "enc1" in marks else float("nan"))
    out = {"ms_per_token": float(np.median(per_tok)), "encoder_s": float(np.nanmedian(enc))}
    if steps:  # the greedy loop's own clock: where a clip's time goes
        out.update(prompt_ms=float(np.median(prompt)), tokens=float(np.median(steps)),
                   features_other_ms=float(np.median(other)))
    return out


def _timed_generate(model, run) -> tuple[dict, float]:
    """Times of the encoder's and decoder's forward calls (pre: key0, post: key1) during
    `run()`, and when it returned."""
    marks: dict[str, list[float]] = {}
    hooks = []
    for key, mod in (("enc", model.model.encoder), ("dec", model.model.decoder)):
        for end, reg in (("0", mod.register_forward_pre_hook), ("1", mod.register_forward_hook)):
            hooks.append(reg(lambda *a, k=key + end: marks.setdefault(k, []).append(
                time.perf_counter())))
    try:
        run()
        return marks, time.perf_counter()
    finally:
        for h in hooks:
            h.remove()


def throughput(v: Variant, processor, clips, lang: str, batch: int) -> float:
    """Seconds per audio decoding `clips` in batches of `batch` (sorted by length so a batch
    shares a window); the texts are not scored here (see the tests: same as one by one)."""
    from sweep.measure import decode, scoring

    plan = v.options or decode.Plan.default()
    order = sorted(clips, key=lambda u: u.duration_s)
    groups = [order[i:i + batch] for i in range(0, len(order), batch)]
    for g in {len(g): g for g in groups}.values():  # warm: a compiled step per batch size
        decode.transcribe_batch(v.runner, processor, g, plan, language=lang, cap=8)
    t0 = time.perf_counter()
    for g in groups:
        cap = max(scoring.max_new_tokens_for(u.duration_s) for u in g)
        decode.transcribe_batch(v.runner, processor, g, plan, language=lang, cap=cap)
    return (time.perf_counter() - t0) / len(clips)


def window_costs(rows: list[dict], timed: dict, clips, lang: str) -> list[dict]:
    """WER of each recipe with the auto window against itself on the full window."""
    from sweep.measure import scoring

    refs = [scoring.normalize(u.text, lang) for u in clips]
    out = []
    for full, auto in WINDOW_PAIRS:
        sc = {n: scoring.score(refs, [scoring.normalize(t, lang) for t in timed[n]["text"]])
              for n in (full, auto)}
        lo, hi = scoring.bootstrap_dwer(sc[full].per_utt, sc[auto].per_utt)
        out.append({"full": full, "auto": auto, "wer_full": sc[full].wer,
                    "wer_auto": sc[auto].wer, "dwer": scoring.relative(sc[auto].wer,
                                                                        sc[full].wer),
                    "dwer_ci95": [lo, hi]})
    return out


def markdown(rows, extra: dict, meta: dict, head: dict) -> str:
    pct = common.pct
    body = [(r["name"], r["label"], f"{r['wer']:.3f}", "—" if r["source"] == "baseline" else
             f"{pct(r['dwer'])} [{pct(r['dwer_ci95'][0], digits=0)}, "
             f"{pct(r['dwer_ci95'][1], digits=0)}]",
             f"{r['latency_median_s']:.3f}", f"{r['speedup']:.2f}x",
             f"{r['ms_per_token']:.1f}" if r.get("ms_per_token") else "—",
             f"{r['encoder_s']:.3f}" if r.get("encoder_s") else "—", r["loops"]) for r in rows]
    lines = [f"# Decoding levers on whisper-base ({meta['date']})", "",
             f"- data: {meta['dataset']}, {meta['n_clips']} clips ({meta['audio_s']:.0f} s), "
             f"language ru; {meta['repeats']} repeat(s), variants interleaved per clip",
             f"- machine: {common.describe_machine(meta['machine'])}",
             f"- ISA: {meta['isa']}", f"- commit: {meta['commit']}", "",
             common.md_table(("variant", "recipe", "WER", "dWER [95% CI]", "s per clip (median)",
                              "speedup", "decoder ms/token", "encoder s", "loops"), body,
                             "llrrrrrrr"), ""]
    if head.get("best"):
        lines.append(f"Fastest within {pct(head['max_dwer'], False, 0)} dWER: **{head['best']}**"
                     f", {head['speedup_vs_baseline']:.2f}x the fp32 baseline"
                     + (f", {head['speedup_vs_faster_whisper_int8']:.2f}x faster-whisper int8"
                        if head.get("speedup_vs_faster_whisper_int8") else "") + ".")
    split = [r for r in rows if r.get("tokens")]
    if split:  # the greedy loop's own clock, medians over the clips it timed
        lines += ["", "## Where a clip's time goes (greedy loop, medians)", "",
                  common.md_table(("variant", "features and rest ms", "encoder + cross K/V s",
                                   "prompt step ms", "tokens", "ms per token"),
                                  [(r["name"], f"{r['features_other_ms']:.1f}",
                                    f"{r['encoder_s']:.3f}", f"{r['prompt_ms']:.1f}",
                                    f"{r['tokens']:.0f}", f"{r['ms_per_token']:.1f}")
                                   for r in split], "lrrrrr")]
    if extra["window"]:
        lines += ["", "## Encoder window: WER cost (auto vs full, same recipe)", ""]
        lines += [f"- {w['auto']} vs {w['full']}: WER {w['wer_auto']:.3f} vs {w['wer_full']:.3f}, "
                  f"dWER {pct(w['dwer'])} [{pct(w['dwer_ci95'][0])}, "
                  f"{pct(w['dwer_ci95'][1])}]" for w in extra["window"]]
    lines += ["", "## Throughput (seconds per audio, batches sorted by length)", ""]
    lines += [f"- {t['variant']}, batch {t['batch']}: {t['s_per_audio']:.3f} s per audio"
              for t in extra["throughput"]]
    lines += ["", "## Kernels", ""]
    lines += [f"- {r['name']}: " + ", ".join(f"{k}={v}" for k, v in r["kernels"].items())
              for r in rows if r.get("kernels")]
    return "\n".join(lines) + "\n"


@console.refusing
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__)
    ap.add_argument("--max-samples", type=int, default=None, help="per data set")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    ap.add_argument("--no-peers", action="store_true", help="skip faster-whisper int8")
    ap.add_argument("--variant", action="append", metavar="NAME=RECIPE",
                    help="measure these recipes (and the baseline) instead of VARIANTS")
    ap.add_argument("--stem", default="decode",
                    help="results file names under --out: STEM.json, STEM.md")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)
    # a bad item is refused before any model loads
    chosen = [VARIANTS[0], *((n, "extra", t) for n, t in named_recipes(args.variant,
                                                                     "--variant"))]
    if len({c[0] for c in chosen}) != len(chosen):
        raise ValueError(f"`--variant` names must be new and unique, got {args.variant}")
    chosen = chosen if args.variant else VARIANTS
    import torch

    from sweep.inputs import cli
    from sweep.measure import decode
    from sweep.inputs.data import EvalSet, load_eval_set
    from sweep.measure.evaluate import set_threads
    from sweep.inputs.models import load_model

    sets = [load_eval_set("shared", language="ru", max_samples=args.max_samples),
            load_eval_set("embedded", language="ru", max_samples=args.max_samples)]
    ev = EvalSet("shared-ru+embedded", [u for s in sets for u in s], 0, [])
    clips, langs = ev.utterances, ["ru"] * len(ev)
    threads = set_threads(args.threads or os.cpu_count())
    cli.quiet_transformers()
    torch._dynamo.config.recompile_limit = 64  # one compiled step per variant, same code
    variants = [Variant(n, s, r) for n, s, r in chosen]
    variants += [] if args.no_peers else [Variant("faster-whisper-int8", "peer",
                                                  compute_type="int8")]
    loaded = load_model("embedded:whisper-base")
    for v in variants:
        print(f"preparing {v.name}", file=sys.stderr)
        prepare(v, loaded, threads)
    for v in variants:  # untimed: compile, caches, two clip lengths
        for u in (clips[0], clips[-1]):
            v.run(loaded.processor, u, "ru")
    timed = timed_pass(variants, loaded.processor, clips, langs, args.repeats,
                       cli.progress("timing"))
    rows = summarize(variants, timed, clips, langs)
    for v, r in zip(variants, rows):
        if not v.compute_type:
            print(f"decoder timing {v.name}", file=sys.stderr)
            r.update(decoder_ms_per_token(v, loaded.processor, clips[:12], "ru"),
                     kernels=v.kernels, notes=v.notes)
    tput = [{"variant": v.name, "batch": b,
             "s_per_audio": throughput(v, loaded.processor, clips, "ru", b)}
            for v in variants if v.name in THROUGHPUT for b in (1, args.batch)]
    extra = {"window": window_costs(rows, timed, clips, "ru") if not args.variant else [],
             "throughput": tput}
    head = headline(rows)
    meta = {**common.stamp(threads), "dataset": ev.name, "n_clips": len(ev),
            "audio_s": ev.total_s, "repeats": args.repeats, "isa": decode.isa_note(),
            "command": "python -m bench.decode " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    common.write_json(out / f"{args.stem}.json", {"meta": meta, "headline": head, **extra,
                                                  "rows": rows})
    (out / f"{args.stem}.md").write_text(markdown(rows, extra, meta, head), encoding="utf-8")
    print((out / f"{args.stem}.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
