"""`python -m bench.window`: the encoder window's WER/speed curve by margin, on the real
whisper-base.

One recipe (--base, with the loop guard decode.no_repeat_ngram=4) decoded with the full 30 s
window and with `encoder.window=auto` at several margins (`encoder.margin_s`: silence encoded
beyond the speech's end) and paddings (`encoder.pad_s`: silence before it). The variants share
one prepared model (only the decoding window differs) and are interleaved per clip
(bench.recipes' timed pass); dWER [95% CI] and speed-ups are against the full window, so the
figures are the window's own cost. Writes bench/results/window.json, window.md, window.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np

from sweep.console import refusing

from . import common
from .harness import Variant, summarize, timed_pass

# The accurate mix of issue #16's table (bf16 encoder, int8 decoder and head, greedy loop) with
# the loop guard (no 4-gram twice): what a window start builds on. The step stays eager: a
# traced or compiled step would trace again for every new window length (1 s buckets make
# many), and the window's cost is the encoder's.
BASE = ("quant.enc_attn=bf16,quant.enc_mlp=bf16,quant.dec_self=dynamic_int8,"
        "quant.dec_cross=dynamic_int8,quant.dec_mlp=dynamic_int8,quant.head=dynamic_int8,"
        "decode.loop=greedy,decode.no_repeat_ngram=4")
# (name, bucket_s, margin_s, pad_s): today's auto window (5 s buckets, no margin), then 1 s
# buckets so that the margin alone sets the silence after the speech, then padding in front.
WINDOWS = (("auto5", 5, 0.0, 0.0),
           *((f"auto1-m{m:g}", 1, m, 0.0) for m in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)),
           ("auto1-m2-p1", 1, 2.0, 1.0), ("auto1-m8-p1", 1, 8.0, 1.0))


def variants(base: str, windows=WINDOWS) -> list[tuple[str, str, tuple]]:
    """(name, recipe text, (bucket, margin, pad) or None for the full window), full first."""
    out = [("full", base, None)]
    for name, bucket, margin, pad in windows:
        out.append((name, f"{base},encoder.window=auto,encoder.bucket_s={bucket},"
                          f"encoder.margin_s={margin:g},encoder.pad_s={pad:g}",
                    (bucket, margin, pad)))
    return out


def prepare(specs, loaded, threads: int) -> list[Variant]:
    """One applied model for all (the window is a decoding option, not a weight change): each
    variant gets it with its own decoding plan."""
    from sweep.measure.compress import apply_recipe
    from sweep.measure.decode import plan_for
    from sweep.techniques.recipe import Recipe

    applied = apply_recipe(copy.deepcopy(loaded.model), Recipe.parse(specs[0][1]))
    out = []
    for name, text, _ in specs:
        v = Variant(name, "baseline" if name == "full" else "extra", text)
        v.runner, v.kernels, v.options = applied.model, applied.kernels, plan_for(
            Recipe.parse(text))
        out.append(v)
    return out


def window_seconds(plan, durations) -> float:
    """Mean seconds of audio the encoder sees per clip under `plan`."""
    return float(np.mean([plan.window.frames(d, 3000) / 100 for d in durations]))


def markdown(rows: list[dict], meta: dict) -> str:
    body = []
    for r in rows:
        lo, hi = r["dwer_ci95"]
        w = r["window"]
        body.append((r["name"], "30 s" if w is None else f"auto, {w[0]} s buckets",
                     "—" if w is None else f"{w[1]:g}", "—" if w is None else f"{w[2]:g}",
                     f"{r['window_s_mean']:.1f}", f"{r['wer']:.3f}",
                     "—" if w is None else f"{common.pct(r['dwer'])} [{common.pct(lo, digits=0)}"
                                           f", {common.pct(hi, digits=0)}]",
                     r["loops"], f"{r['latency_median_s']:.3f}", f"{r['speedup']:.2f}x",
                     f"{r['speedup_cpu']:.2f}x"))
    table = common.md_table(("variant", "window", "margin s", "padding s", "mean window s",
                             "WER", "dWER vs full [95% CI]", "loops", "s per clip (median)",
                             "speed-up vs full", "speed-up (CPU s)"), body, "lllrrrrrrrr")
    lines = [f"# Encoder window: WER and speed by margin ({meta['date']})", "",
             f"- data: {meta['dataset']}, {meta['n_clips']} clips ({meta['audio_s']:.0f} s), "
             f"language {meta['language']}; {meta['repeats']} repeats, variants interleaved per "
             "clip, one prepared model (only the window differs)",
             f"- recipe: `{meta['base']}` (loop guard: no repeated 4-gram)",
             f"- machine: {common.describe_machine(meta['machine'])}",
             f"- commit: {meta['commit']}; command: `{meta['command']}`", "", table, "",
             "dWER and speed-ups are against the same recipe on the full 30 s window. Margin: "
             "silence encoded after the clip's end (`encoder.margin_s`); padding: silence "
             "before it (`encoder.pad_s`). The window is the padded clip plus the margin, "
             "rounded up to the bucket.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> Path:
    """dWER and speed-up against the margin (1 s buckets, no padding), today's auto/5 s and
    the padded variants as separate marks."""
    fig, ax = common.figure_axes(7.5, 4.5)
    curve = sorted((r for r in rows if r["window"] and r["window"][0] == 1 and not r["window"][2]),
                   key=lambda r: r["window"][1])
    xs = [r["window"][1] for r in curve]
    ax.errorbar(xs, [r["dwer"] for r in curve], yerr=[
        [r["dwer"] - r["dwer_ci95"][0] for r in curve],
        [r["dwer_ci95"][1] - r["dwer"] for r in curve]], fmt="o-", capsize=3, label="dWER")
    for r in rows:
        if r["window"] and (r["window"][0] != 1 or r["window"][2]):
            ax.plot([r["window"][1]], [r["dwer"]], "s", label=f"dWER, {r['name']}")
    ax.axhline(0, c="grey", lw=1)
    ax.set_xlabel("encoder.margin_s (s of silence after the speech)")
    ax.set_ylabel("dWER vs the full window")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["speedup"] for r in curve], "d--", c="#d62728", label="speed-up")
    ax2.set_ylabel("speed-up vs the full window")
    ax.set_title(f"Encoder window by margin, {meta['dataset']} ({meta['n_clips']} clips)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


@refusing
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.window", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--dataset", default="shared",
                    help="shared (the 19 Russian clips of ../shared/speech), embedded, or a "
                         "manifest path")
    ap.add_argument("--language", default="ru", help="language of the clips (and the filter)")
    ap.add_argument("--max-samples", type=int, default=None, help="at most this many clips")
    ap.add_argument("--model", default="embedded:whisper-base")
    ap.add_argument("--base", default=BASE, help="the recipe every window variant builds on")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the clips")
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--out", default=str(common.RESULTS), help="folder for window.json/md/png")
    args = ap.parse_args(argv)
    from sweep.inputs import cli
    from sweep.inputs.data import load_eval_set
    from sweep.inputs.models import load_model
    from sweep.measure.evaluate import set_threads
    from sweep.techniques.recipe import Recipe

    specs = variants(args.base)
    for _, text, _ in specs:  # a bad recipe is refused (exit 2) before the model loads
        Recipe.parse(text)
    ev = load_eval_set(args.dataset, language=args.language, max_samples=args.max_samples)
    langs = [args.language] * len(ev)
    threads = set_threads(args.threads or os.cpu_count())
    cli.quiet_transformers()
    meta = {**common.stamp(threads), "dataset": ev.name, "language": args.language,
            "n_clips": len(ev), "audio_s": ev.total_s, "repeats": args.repeats,
            "threads": threads, "model": args.model, "base": args.base,
            "command": "python -m bench.window " + " ".join(argv or sys.argv[1:])}
    loaded = load_model(args.model)
    vs = prepare(specs, loaded, threads)
    for v in vs:  # untimed: compile, allocator and caches warm on two clip lengths
        for u, lang in list(zip(ev, langs))[:2]:
            v.run(loaded.processor, u, lang)
    timed = timed_pass(vs, loaded.processor, ev.utterances, langs, args.repeats,
                       cli.progress("timing"))
    rows = summarize(vs, timed, ev.utterances, langs)
    durations = [u.duration_s for u in ev]
    for r, v, (_, _, w) in zip(rows, vs, specs):
        # every row says which window and which machine (ISA, oneDNN cap) it was measured on
        r.update(window=w, window_s_mean=window_seconds(v.options, durations),
                 machine=meta["machine"], commit=meta["commit"])
    out = Path(args.out)
    common.write_json(out / "window.json", {**meta, "rows": rows})
    (out / "window.md").write_text(markdown(rows, meta), encoding="utf-8")
    plot(rows, meta, out / "window.png")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
