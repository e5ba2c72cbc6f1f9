"""`python -m sweep.evaluate`: measure one recipe next to its baseline, measured in the same
process, and print (or write as JSON) both figures. The measuring itself is
`sweep.measure.evaluate`'s; this is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import console
from .inputs import cli, machine
from .measure.evaluate import (AGREEMENT, FIGURES, MeasureOptions, agree, as_agreement,
                               calibrator, measure, placeholder, run_trial, set_threads)
from .techniques.recipe import Recipe


@console.refusing  # every bad input is a ValueError subclass with a clear message: exit 2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.evaluate", description=(
        "Measure WER, CER and latency of a Whisper model, optionally compressed by a recipe, "
        "next to its baseline measured in the same process."))
    cli.add_model_data_args(ap)
    ap.add_argument("--recipe", default=None,
                    help="recipe as dotted key=value pairs, e.g. quant.scheme=dynamic_int8,"
                         "prune.rate=0.3 (omit to evaluate the base model alone)")
    ap.add_argument("--json", default=None, help="write the figures as JSON to this file")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes before timing")
    ap.add_argument("--profile", type=int, nargs="?", const=20, default=0, metavar="TOP",
                    help="after measuring, profile the recipe's transcription (torch.profiler) "
                         "and print the TOP operators by self CPU time (TOP default 20; with "
                         "--json also written beside it, <json>.profile.txt, and in the JSON)")
    ap.add_argument("--profile-clips", type=int, default=3,
                    help="clips --profile records (the first ones, after one warm-up clip)")
    args = ap.parse_args(argv)
    from .measure.profile import ProfileOptions

    prof_opts = ProfileOptions(args.profile, args.profile_clips) if args.profile else None
    recipe = Recipe.parse(args.recipe or "")
    if args.recipe is None and args.device != "cpu":
        recipe = Recipe.parse(f"device={args.device}")
    loaded, evalset, calib = cli.load_model_data(args, recipe)
    threads = set_threads(args.threads)
    print(f"evaluating {loaded.spec} on {evalset.name} ({len(evalset)} utterances, "
          f"{evalset.skipped} skipped, {threads} threads)", file=sys.stderr)
    agreement = not evalset.labelled  # no references: scored against the baseline's texts
    if agreement:
        print(f"{evalset.name} has no references: the recipe is scored by its {AGREEMENT} "
              "(agreement WER, never WER)", file=sys.stderr)
        evalset = placeholder(evalset)
    base = measure(loaded.model, loaded.processor, evalset, language=args.language,
                   warmup=args.warmup, numbers=args.numbers, progress=cli.progress("baseline"))
    if agreement:
        evalset, base = agree(evalset, base, args.numbers)
    out = {**base.figures, "dwer": 0.0, "dcer": 0.0, "dwer_ci95": [0.0, 0.0], "speedup": 1.0,
           "kernels": {}, "recipe": recipe.to_flat(), "compile_s": 0.0, "recompiles": 0,
           "threads": threads, "utterances": base.utterances, **machine.info()}
    rows = []  # format_table adds the baseline row itself
    if not recipe.is_baseline:
        how = MeasureOptions(language=args.language, threads=args.threads, warmup=args.warmup,
                             numbers=args.numbers)
        out, _ = run_trial(loaded.model, loaded.processor, evalset, recipe, how, baseline=base,
                           calibration=calib, progress=cli.progress(recipe.describe()))
        rows.append({"name": recipe.describe(), **out})
    out["baseline"] = {k: base.figures[k] for k in FIGURES if k in base.figures}
    out.update(model=loaded.spec, dataset=evalset.name, skipped=evalset.skipped,
               skipped_reasons=evalset.skipped_reasons)
    from .results.report import format_table

    if agreement:
        out = as_agreement(out)
        print(f"scored by {AGREEMENT}:")
        for name, f in (("baseline", out["baseline"]), (recipe.describe(), out)):
            print(f"  {name}: agreement WER {100 * f['agreement_wer']:.1f}%, agreement CER "
                  f"{100 * f['agreement_cer']:.1f}%, median latency "
                  f"{f['latency_median_s']:.3f} s, throughput {f['throughput']:.1f}x")
    else:
        print(format_table(rows, base.figures))
    if out.get("kernels"):
        print("kernels: " + ", ".join(f"{k}={v}" for k, v in out["kernels"].items()))
    if prof_opts:
        from .measure.profile import profile_recipe

        prof = profile_recipe(loaded.model, loaded.processor, evalset, recipe,
                              language=args.language, opts=prof_opts, calibrate=None if calib
                              is None else calibrator(loaded.processor, calib, args.language))
        print(prof["table"])
        out["profile"] = {k: v for k, v in prof.items() if k != "table"}
        if args.json:
            path = Path(args.json).with_suffix(".profile.txt")
            path.write_text(prof["table"] + "\n", encoding="utf-8")
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
