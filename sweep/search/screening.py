"""Screening run through Tune (`--screen`): the warm starts, then each dimension's values alone,
measured by the sweep's own workers and logged as its trials; the space comes back bounded by
what they found. The plan, the table and the bounds themselves are `sweep.search.screen`'s;
this module only runs them (Ray, MLflow) and saves the table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import console
from ..measure import stopping
from ..results import report, tracking
from . import worker
from .sweepspec import SCREEN_DIMS, SCREEN_SAMPLES  # --screen auto's rule, beside its help


def screen_wanted(args, space) -> bool:
    if getattr(args, "screen_from", None):
        return True
    if args.screen == "auto":
        searched = [d for d in space.params.values() if d.kind != "value"]
        return len(searched) > SCREEN_DIMS and args.num_samples >= SCREEN_SAMPLES
    return args.screen == "on"


def _run_points(args, ctx, trainable_of, points: list[dict], where: Path, label: str,
                space) -> list[dict | None]:
    """Measure fixed points through Tune (the same workers and logging as the search); their
    results in `points` order (None for a point without one)."""
    from ray import tune

    from . import callbacks, sampler as search

    if not points:
        return []
    tuner = tune.Tuner(trainable_of(ctx), param_space={
        "point": tune.grid_search([dict(p) for p in points])},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=label, storage_path=str(where), verbose=0, callbacks=[
            search.Progress(len(points), None, space.objectives, space.constraints,
                            label=label), callbacks.Journal(ctx.journal),
            callbacks.Deaths(ctx.tracking_uri, ctx.experiment_id, ctx.sweep)]))
    with console.quiet_tune():
        grid = tuner.fit()
    got = {json.dumps(r.config["point"], sort_keys=True, default=str): r.metrics for r in grid}
    return [got.get(json.dumps(p, sort_keys=True, default=str)) for p in points]


def run_screening(args, space, ctx, sweep_path: Path, devices, per_trial: int, uri: str,
                  parent: str, machine: dict | None = None):
    """Screening (`sweep.search.screen`): the warm starts, then each dimension's values alone
    from the baseline and the best start, on the first --screen-clips clips with early
    stopping; returns the space bounded by it. Its table is `screen/screen.json` (kept: a
    resumed sweep reads it instead of screening again) and an artifact of the parent run."""
    import dataclasses

    from ray import tune

    from . import sampler as search, screen

    out = sweep_path / "screen"
    saved = out / "screen.json"
    if saved.is_file():
        narrowed, _ = screen.narrow(space, json.loads(saved.read_text())["rows"])
        return narrowed
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, "screen_from", None):
        return _screened_before(args, space, out, uri, parent)
    sctx = dataclasses.replace(
        ctx, sweep=f"{ctx.sweep}/screen", probes=False, rungs=(),
        timeout_min_s=worker.SCREEN_TIMEOUT_MIN_S,
        data={**ctx.data, "max_samples": args.screen_clips},
        early_stop=stopping.EarlyStop(max_dwer=space.constraints.get("max_dwer"),
                                      # the first look (and its stop of a model that
                                      # loops on each clip) must come before the last clip
                                      min_clips=min(4, max(2, args.screen_clips // 2))))

    def trainable_of(c):
        return tune.with_resources(tune.with_parameters(worker.trainable_point, ctx=c),
                                   lambda config: search.resources_for(per_trial)(
                                       config["point"]))

    t0 = time.time()
    starts = space.fitting_starts(frozenset(devices), machine)  # as the joint search's
    print(f"screening: {len(starts)} warm starts on {args.screen_clips} clips", file=sys.stderr)
    found = _run_points(args, sctx, trainable_of, [p for _, p in starts], out, "starts", space)
    best = screen.best_start(space, found)
    anchors = {"baseline": {}}
    if best is not None:
        i = starts[best][0]
        anchors[f"start {i + 1}"] = space.starts[i]
    points = screen.plan(space, anchors, frozenset(devices))
    print(f"screening: {len(points)} single changes from {', '.join(anchors)}", file=sys.stderr)
    results = _run_points(args, sctx, trainable_of, [p.point for p in points], out, "points",
                          space)
    rows = screen.table(points, results)
    return _screened(space, {"anchors": anchors, "clips": args.screen_clips, "rows": rows,
                             "seconds": time.time() - t0}, out, uri, parent)


def _screened_before(args, space, out: Path, uri: str, parent: str):
    """--screen-from: an earlier sweep's table, kept and logged as this sweep's own."""
    from . import screen

    saved = screen.read_saved(args.screen_from, space)
    print(f"screening: read from {saved['from']} ({len(saved['rows'])} points, measured "
          "there)", file=sys.stderr)
    return _screened(space, {k: v for k, v in saved.items() if k != "changes"}, out, uri, parent)


def _screened(space, table: dict, out: Path, uri: str, parent: str):
    """The space bounded by a screening `table`; the table saved in `out` (screen.json, read
    again on resume, and screen.csv), logged to the parent run and printed."""
    from mlflow.tracking import MlflowClient

    from . import screen

    narrowed, changes = screen.narrow(space, table["rows"])
    saved = out / "screen.json"
    saved.write_text(json.dumps({**table, "changes": changes}, indent=1, default=str))
    report.write_screening(table["rows"], out / "screen.csv")
    client = MlflowClient(uri)
    for f in (saved, out / "screen.csv"):
        tracking.retry(client.log_artifact, parent, str(f), "screen")
    print(report.format_screening(table["rows"]), file=sys.stderr)
    for line in changes or ["nothing out of reach: the space is searched as written"]:
        print(f"screening: {line}", file=sys.stderr)
    return narrowed
