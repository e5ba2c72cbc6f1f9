"""`python -m sweep.inputs.longform --dataset SET --out DIR`: long recordings built from any
utterance set (`sweep.inputs.longform.build`), written as WAV files and a manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ... import console
from ..data import load_eval_set
from . import KINDS, LongOptions, build, write


@console.refusing  # DataError, LongformError: one line, exit 2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.inputs.longform", description=(
        "Build long recordings from an utterance set: utterances joined with pauses and "
        "stretches of silence or noise, the reference the whole text (WAV + manifest.jsonl)."))
    ap.add_argument("--dataset", default="embedded",
                    help="the utterances: anything --dataset takes (embedded, shared, a JSONL "
                         "manifest, several joined by +)")
    ap.add_argument("--out", required=True, help="folder for the WAV files and manifest.jsonl")
    d = LongOptions()
    ap.add_argument("--n", type=int, default=d.n, help="recordings")
    ap.add_argument("--min-s", type=float, default=d.min_s, help="shortest recording (s)")
    ap.add_argument("--max-s", type=float, default=d.max_s, help="longest recording (s)")
    ap.add_argument("--pause-s", type=float, nargs=2, default=d.pause_s, metavar=("LO", "HI"),
                    help="pause between utterances (s)")
    ap.add_argument("--stretch-every", type=float, default=d.stretch_every,
                    help="a non-speech stretch after about every N utterances (0: none)")
    ap.add_argument("--stretch-s", type=float, nargs=2, default=d.stretch_s,
                    metavar=("LO", "HI"), help="length of a stretch (s)")
    ap.add_argument("--kinds", default=",".join(d.kinds),
                    help=f"what stretches hold, some of {','.join(KINDS)}")
    ap.add_argument("--level-dbfs", type=float, default=d.level_dbfs,
                    help="RMS level of noise and hum stretches")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--name", default=d.name, help="recording ids: NAME_01, ...")
    a = ap.parse_args(argv)
    opts = LongOptions(a.n, a.min_s, a.max_s, tuple(a.pause_s), a.stretch_every,
                       tuple(a.stretch_s), tuple(k.strip() for k in a.kinds.split(",")),
                       a.level_dbfs, a.seed, a.name)
    clips = load_eval_set(a.dataset).utterances
    manifest = write(build(clips, opts), Path(a.out), opts, a.dataset)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    print(f"wrote {len(rows)} recordings ({sum(r['duration_s'] for r in rows):.0f} s, "
          f"{sum(len(r['stretches']) for r in rows)} stretches) and {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
