"""`python -m sweep.export`: turn a sweep's trial into a self-contained checkpoint.

    python -m sweep.export --sweep latest --knee --out best/ --verify
    python -m sweep.export --sweep quick-20260101-1200 --max-dwer 0.01 --out best/
    python -m sweep.export --run <trial run id> --out best/

The trial comes from MLflow (the parent run of a sweep and its finished child runs): by run id,
or from the sweep's results by rule. Its recipe is rebuilt from the run's params and applied to
the base model named by the parent run; the checkpoint (`sweep.ship.checkpoint`) is logged back as
artifacts of the trial's run and as a version of the registered model `hyper-<sweep>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

from . import console
from .inputs import cli
from .results import figures, rows
from .ship.pick import RULES, ExportError, describe_row, pick
from .techniques.recipe import Recipe
from .search.sweepspec import DATA_KEYS, SweepSpec, check_name

# The sweep's data options recorded in metrics.json (beside `dataset` and `n_utterances`).
DATA_OUT = (*DATA_KEYS[1:], "numbers", "warmup")
# What --verify measures again: the card's measured figures (not those relative to a baseline).
VERIFIED = [f for f in figures.FIGURES if "card" in f.to and not f.relative]


# ---- MLflow -----------------------------------------------------------------------------------


def _client(args):
    from mlflow.tracking import MlflowClient

    from .results import tracking

    root = Path(args.root).resolve()
    if args.tracking_uri is None and not (root / "mlflow.db").is_file():
        raise ExportError(f"no tracking store at {root / 'mlflow.db'}: pass --root or "
                          "--tracking-uri of the sweep")
    client = MlflowClient(args.tracking_uri or tracking.default_uri(root))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        raise ExportError(f"the tracking store has no `{tracking.EXPERIMENT}` experiment")
    return client, exp.experiment_id


def find_sweep(client, exp_id: str, sweep: str):
    """The parent run: `latest` (by start time), a sweep name, or a parent run id."""
    from .results import tracking

    kind = "tags.`hyper.kind` = 'sweep'"
    if sweep == "latest":
        found = client.search_runs([exp_id], kind, order_by=["attributes.start_time DESC"],
                                   max_results=1)
    elif re.fullmatch(r"[0-9a-f]{32}", sweep):
        found = [r for r in tracking.find_runs(client, exp_id, **{"hyper.kind": "sweep"})
                 if r.info.run_id == sweep] or tracking.find_runs(
            client, exp_id, **{"hyper.kind": "sweep", "hyper.sweep": sweep})
    else:  # a name goes into MLflow's filter string: the launcher's rule first
        found = tracking.find_runs(client, exp_id, **{"hyper.kind": "sweep",
                                                      "hyper.sweep": check_name(sweep,
                                                                                "--sweep")})
    if not found:
        names = sorted({r.data.tags.get("hyper.sweep") for r in tracking.find_runs(
            client, exp_id, **{"hyper.kind": "sweep"})} - {None})
        raise ExportError(f"`--sweep` must be latest, a sweep name or a parent run id, got "
                          f"{sweep!r}; sweeps here: {names or 'none'}")
    return found[0]


def trial_rows(client, exp_id: str, parent_id: str) -> list[dict]:
    """The sweep's finished, successful trials as rows (`rows.from_run`, as the sweep read
    them); `pick` skips those lacking a figure its rule ranks on."""
    from .results import tracking

    runs = tracking.find_runs(client, exp_id, **{"mlflow.parentRunId": parent_id,
                                                 "hyper.kind": "trial"})
    return [row for row in map(rows.from_run, runs) if row["status"] == "ok"]


def front_settings(client, parent) -> tuple:
    """(objectives, constraints, baseline) of the sweep's own front file, else the defaults."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            got = client.download_artifacts(parent.info.run_id, "front/pareto.json", tmp)
            data = json.loads(Path(got).read_text(encoding="utf-8"))
        return ([tuple(o) for o in data["objectives"]], data.get("constraints") or None,
                data.get("baseline") or None)
    except Exception:  # noqa: BLE001 - an unfinished sweep has no front file yet
        return None, None, None


def log_export(client, run, out: Path, sweep: str, recipe: Recipe) -> str:
    """Artifacts on the trial's run, and a version of registered model `hyper-<sweep>`."""
    from mlflow.exceptions import MlflowException

    from .results.tracking import retry

    run_id = run.info.run_id
    retry(client.log_artifacts, run_id, str(out), "export")
    name = "hyper-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", sweep)
    try:
        retry(client.create_registered_model, name, tags={"hyper.sweep": sweep},
              description=f"Checkpoints exported from HYPER sweep {sweep}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = retry(client.create_model_version, name, f"{run.info.artifact_uri}/export",
               run_id=run_id, description=recipe.describe(),
               tags={"hyper.recipe": recipe.describe(), "hyper.sweep": sweep})
    retry(client.set_tag, run_id, "hyper.export", f"{name}/{mv.version}")
    return f"{name} version {mv.version}"


# ---- export -----------------------------------------------------------------------------------


def _trial_hypotheses(client, run_id: str) -> dict | None:
    """id -> hypothesis the trial logged (transcripts.json), to compare utterance by utterance."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = json.loads(Path(client.download_artifacts(run_id, "transcripts.json", tmp))
                              .read_text(encoding="utf-8"))
        cols = data["columns"]
        return {row[cols.index("id")]: row[cols.index("hypothesis")] for row in data["data"]}
    except Exception:  # noqa: BLE001 - older or restored trials may lack the table
        return None


def verify(ck, row: dict, ns: SweepSpec, evalset, logged: dict | None) -> dict:
    """Re-measure the loaded checkpoint on the sweep's data; print it next to the trial. When
    plain transformers loads it but not as measured (approximately, or without what only
    `sweep.load` re-applies), measure that too, for the card. One progress line for both."""
    from .inputs.probes import probes
    from .measure.evaluate import measure
    from .ship.checkpoint import load_plain

    plain = ck.info["plain"]["weights"]
    plain = plain != "none" and (plain != "exact" or bool(ck.info["reapplied"]))
    n, report = len(evalset), cli.progress("verify", sys.stderr)
    total = n * (2 if plain else 1)
    m = measure(ck.model, ck.processor, evalset, options=ck.options, language=ns.language,
                warmup=ns.warmup, numbers=ns.numbers, progress=lambda d, _: report(d, total),
                probes=probes() if row.get("hallucination_rate") is not None else None)
    f = m.figures
    differ = None if logged is None else sum(
        logged.get(u["id"]) != u["hypothesis"] for u in m.utterances)
    match = f["wer"] == row["wer"] and f["cer"] == row["cer"] and not differ
    shown = [fig for fig in VERIFIED if fig.name in f]  # hallucination_rate: if it had probes
    out = {**{fig.name: f[fig.name] for fig in shown}, "n_utterances": f["n_utterances"],
           "differing_transcripts": differ, "match": match}
    if plain:
        model, processor = load_plain(ck.path)
        p = measure(model.to(ck.recipe.device), processor, evalset, language=ns.language,
                    warmup=0, numbers=ns.numbers, progress=lambda d, _: report(n + d, total))
        out["plain"] = {"wer": p.figures["wer"], "cer": p.figures["cer"],
                        "n_utterances": len(p.utterances),
                        "differing_transcripts": sum(a["hypothesis"] != b["hypothesis"] for a, b
                                                     in zip(p.utterances, m.utterances))}
    print(f"{'':22}{'trial':>10}{'checkpoint':>12}")
    for fig in shown:
        t = row.get(fig.name)
        print(f"{fig.text:22}{'—' if t is None else format(t, fig.fmt):>10}"
              f"{f[fig.name]:>12{fig.fmt}}")
    if differ is not None:
        print(f"transcripts differing from the trial's: {differ} of {len(m.utterances)}")
    print("verify: " + ("WER and CER equal the trial's" if match else
                        "MISMATCH: the checkpoint does not reproduce the trial"))
    if plain:
        p = out["plain"]
        print(f"plain transformers (from_pretrained alone): WER {p['wer']:.3f}, CER "
              f"{p['cer']:.3f}; {p['differing_transcripts']} of {p['n_utterances']} transcripts "
              "differ from the checkpoint's (the model card says so)")
    return out


def export(args) -> int:
    from mlflow.exceptions import MlflowException

    from .ship.card import write_metrics
    from .ship.checkpoint import save_checkpoint, split
    from .measure.evaluate import calibrator, set_threads
    from .inputs.models import load_model

    client, exp_id = _client(args)
    console.no_progress_bars()
    objectives = None  # the sweep's, from its front file, when picking by rule
    rule = next((k for k in RULES if getattr(args, k) not in (None, False)), None)
    if args.run:
        try:
            run = client.get_run(args.run)
        except MlflowException:
            raise ExportError(f"`--run` {args.run} is not a run of this tracking store") from None
        if run.data.tags.get("hyper.kind") != "trial":
            raise ExportError(f"`--run` must be a trial run (tag hyper.kind=trial), got "
                              f"{run.data.tags.get('hyper.kind')!r}")
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        if args.sweep not in (None, "latest", parent.info.run_id, parent.data.tags["hyper.sweep"]):
            raise ExportError(f"`--run` {args.run} is not a trial of sweep {args.sweep!r}")
        row = next((r for r in trial_rows(client, exp_id, parent.info.run_id)
                    if r["run_id"] == args.run), None)
        if row is None:
            raise ExportError(f"`--run` {args.run} did not finish ok (status "
                              f"{run.data.tags.get('status')!r}): nothing measured to export")
        how = "by run id"
    else:
        parent = find_sweep(client, exp_id, args.sweep or "latest")
        objectives, constraints, baseline = front_settings(client, parent)
        row = pick(trial_rows(client, exp_id, parent.info.run_id), rule,
                   getattr(args, rule) if rule != "knee" else None,
                   objectives=objectives, constraints=constraints, baseline=baseline)
        run = client.get_run(row["run_id"])
        how = RULES[rule].text.format(limit=getattr(args, rule))
    sweep, params = parent.data.tags.get("hyper.sweep", "?"), dict(parent.data.params)
    recipe, ns = Recipe.from_flat(row["recipe"]), SweepSpec.from_params(params, sweep)
    print(f"picked {describe_row(row, objectives)}\n  ({how}; sweep {sweep})", file=sys.stderr)
    # Kernels are chosen per thread count: use the trial's so the same ones run.
    threads = set_threads(int(row["threads"]) if row.get("threads") else None)
    evalset = cli.load_data(ns) if args.verify or not ns.language else None
    if evalset is not None and str(len(evalset)) != params.get("n_utterances", str(len(evalset))):
        raise ExportError(f"the sweep's data set {ns.dataset!r} has {len(evalset)} utterances "
                          f"here, the sweep measured {params['n_utterances']}: not the same data")
    loaded = load_model(ns.model, device=recipe.device)
    calibrate = None
    if recipe.calibrates:  # as the trial was calibrated
        calibrate = calibrator(loaded.processor, cli.load_calibration(ns), ns.language)
    langs = sorted({u.lang for u in evalset if u.lang}) if evalset else [ns.language]
    metrics = {
        "trial": {"run_id": row["run_id"], "trial_key": row["trial_id"], "sweep": sweep,
                  "parent_run_id": parent.info.run_id, "picked": how},
        "figures": figures.flatten(row),
        "baseline": row["baseline"], "model": {"spec": ns.model, "source": loaded.source},
        "data": {"dataset": ns.dataset, "n_utterances": int(params.get("n_utterances", 0)) or
                 None, **{k: getattr(ns, k) for k in DATA_OUT}, "languages": langs},
        "sweep_host": {k[5:]: v for k, v in params.items() if k.startswith("host.")},
        "sweep_versions": {k[8:]: v for k, v in params.items() if k.startswith("version.")},
    }
    out = save_checkpoint(loaded.model, loaded.processor, recipe, args.out, metrics=metrics,
                          calibrate=calibrate, trial_kernels=row.get("kernels") or None,
                          overwrite=args.force)
    del loaded
    _, _, baked, again = split(recipe)
    info = json.loads((out / "recipe.json").read_text(encoding="utf-8"))
    size = (out / info["weights"]).stat().st_size / 1e6
    print(f"exported {out} ({info['weights']} {size:.0f} MB, {threads} threads): applied at "
          f"export: {', '.join(baked) or 'nothing'}; re-applied at load: "
          f"{', '.join(again) or 'nothing'}; plain transformers loads it: "
          f"{info['plain']['weights']}")
    code = 0
    if args.verify:
        from .ship.checkpoint import load

        ck = load(out)
        metrics["verify"] = verify(ck, row, ns, evalset, _trial_hypotheses(client, run.info.run_id))
        write_metrics(out, json.loads((out / "metrics.json").read_text()) | metrics)
        code = 0 if metrics["verify"]["match"] else 4
    if not args.no_log:
        where = log_export(client, run, out, sweep, recipe)
        print(f"logged to MLflow: artifacts export/ of run {run.info.run_id}; registered "
              f"model {where}")
    return code


def parse_args(argv=None) -> Namespace:
    ap = argparse.ArgumentParser(prog="python -m sweep.export", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=None,
                    help="latest (default), a sweep name or its parent run id")
    pickers = ap.add_mutually_exclusive_group(required=True)
    pickers.add_argument("--run", default=None, help="the trial's MLflow run id")
    pickers.add_argument("--max-dwer", type=float, default=None,
                         help="the fastest trial whose relative WER change is <= this fraction")
    pickers.add_argument("--knee", action="store_true", help="the knee of the sweep's front")
    pickers.add_argument("--max-latency", type=float, default=None,
                         help="the most accurate trial with median latency <= this (seconds)")
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    ap.add_argument("--verify", action="store_true",
                    help="re-measure the checkpoint on the sweep's data; exit 4 if WER differs")
    ap.add_argument("--no-log", action="store_true", help="do not log the export to MLflow")
    ap.add_argument("--root", default="mlruns", help="the sweep root holding mlflow.db")
    ap.add_argument("--tracking-uri", default=None, help="default sqlite:///<root>/mlflow.db")
    ap.add_argument("--verbose", action="store_true",
                    help="show third-party output HYPER filters as known noise")
    return ap.parse_args(argv)


@console.refusing  # RecipeError, CheckpointError, DataError, ModelSpecError: exit 2
def main(argv=None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = parse_args(argv)
    if args.verbose:
        console.set_verbose()
    try:
        return export(args)
    except ExportError as e:
        if "closest" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)  # no trial meets the rule: exit 3
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
