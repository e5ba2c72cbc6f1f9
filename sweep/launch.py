"""`python -m sweep.launch --space full`: search recipes with Ray Tune + Optuna, log every trial
to MLflow, end with the Pareto front (table, CSV/JSON, plot, HTML report).

Every input is checked before Ray starts or a model loads; every finished trial is in MLflow
the moment it ends, so nothing measured is lost when the launcher dies (see `--resume`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

from . import console
from .inputs import cli
from .results import figures, journal, pareto, report, report_html, tracking
from .results.summary import (accounting, interrupted, origin, resolution_summary,
                              resolution_warning, screen_rows, stop_costs)
from .search import local, lock, worker
from .search.screening import run_screening, screen_wanted
from .search.study import mark_stale_optuna, searcher_study, write_importances
from .search.sweepspec import FILE, SweepOptions, check_name, default_name
from .techniques.recipe import space_calibrates


def build_parser(options: type[SweepOptions] | None = None) -> argparse.ArgumentParser:
    """`python -m sweep.launch`'s parser: one flag per field of `options` (default
    `SweepOptions`, read now), then the model and data flags (`cli.add_model_data_args`). The
    docs' flags table is generated from it."""
    ap = argparse.ArgumentParser(prog="python -m sweep.launch", description=(
        "Search pruning x quantization x compile for the fastest Whisper that is still "
        "accurate enough."))
    (options or SweepOptions).add_arguments(ap)
    cli.add_model_data_args(ap)
    return ap


def parse_args(argv=None) -> Namespace:
    """The command line as parsed; `run` makes it `SweepOptions`. `inject` (fault injection for
    the failure tests, Python API only) is no option: it is never saved or logged."""
    args = build_parser().parse_args(argv)
    args.inject = {}
    return args


def validate(opts: SweepOptions) -> tuple:
    """All cheap checks, before Ray or a model: space, each option's own rule, data, model
    spec, tracking store. Returns the options as checked (a relative manifest made absolute,
    `--trial-timeout` parsed) with the space, data, root and tracking URI."""
    from .search.space import load_space

    space = load_space(opts.space)
    opts = opts.checked()  # raises naming the flag, the value and the rule
    if opts.screen_from:
        from .search.screen import read_saved

        read_saved(opts.screen_from, space)  # raises naming the rule
    evalset = cli.load_data(opts)  # raises DataError naming the problem
    cli.require_references(evalset)  # a sweep ranks by WER; agreement WER: sweep.evaluate
    from .inputs.models import check_spec

    check_spec(opts.model)
    if opts.address:
        from .search.sampler import check_address

        check_address(opts.address)
    root = Path(opts.root).resolve()
    uri = opts.tracking_uri or tracking.default_uri(root)
    tracking.check_uri(uri)
    return opts, space, evalset, root, uri


class SweepFailed(RuntimeError):
    """Every trial failed: nothing to build a front from (the errors are in MLflow)."""


def _restore_args(opts) -> SweepOptions:
    """The original command's options for `--resume NAME` (`opts`: this command's options or
    parsed command line), from its saved spec (only --time-budget and --verbose may change)."""
    sweep_dir = Path(opts.root).resolve() / "sweeps" / opts.resume
    if not (sweep_dir / FILE).is_file():
        raise ValueError(f"`--resume` must name a sweep under {sweep_dir.parent}, got "
                         f"{opts.resume!r} (no {FILE} there)")
    spec = SweepOptions.load(sweep_dir)
    return dataclasses.replace(spec, resume=opts.resume, verbose=opts.verbose,
                               time_budget=opts.time_budget or spec.time_budget)


@contextmanager
def _parent_ends(uri: str, parent: str):
    """Whatever breaks once the parent run began (a crash, Ctrl-C), it ends FAILED, never left
    RUNNING; `--resume` sets it RUNNING again."""
    try:
        yield
    except BaseException:
        from mlflow.tracking import MlflowClient

        tracking.retry(MlflowClient(uri).set_terminated, parent, status="FAILED")
        raise


def machine_profile(space, threads: int) -> dict:
    """The running CPU as the warm starts' `when:` sees it (`sweep.inputs.machine.profile`):
    its ISA, and the faster encoder scheme, measured from the kernel table at the trials'
    thread count when a start depends on it (cached per machine: seconds, once), else from the
    ISA. Printed with the starts it keeps. The launcher's CPU stands for the cluster's."""
    from .inputs import machine
    from .search.space import machine_fits

    speedups = None
    if any("encoder" in w for w in space.start_when):
        import torch

        from .measure.kernels import encoder_speedups

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            speedups = encoder_speedups()
        finally:
            torch.set_num_threads(before)
    prof = machine.profile(machine.cpu_flags(), machine.isa_cap(), speedups)
    if any(space.start_when):  # said only when the starts depend on the machine
        fit = sum(machine_fits(w, prof) for w in space.start_when)
        print(f"machine: {machine.describe(machine.info())}; faster encoder here: "
              f"{prof['encoder']} ({prof['encoder_why']}); {fit} of {len(space.starts)} warm "
              "starts fit it", file=sys.stderr)
    return prof


def kernel_fit(space, threads: int, devices=frozenset({"cpu"})):
    """The space without the CPU schemes (and the warm starts using them) whose fastest kernel
    here runs the encoder's matmuls several times slower than fp32 (`kernels.SLOW_SPEEDUP`) or
    has no working kernel, measured from the kernel table at the trials' thread count (cached
    per machine) and said in one line with the ratios: on an AVX2-only CPU bf16 is dropped
    before any trial pays for it. A space whose trials may run on the cluster's GPU is left as
    it is (those kernels are the GPU's)."""
    from .techniques.quant import SCHEMES

    if "cuda" in devices and "cuda" in (d.domain() if (d := space.params.get("device")) else ()):
        return space
    used = {v for d in space.params.values() if d.kind in ("choice", "value")
            for v in d.domain()} | {v for st in space.starts for v in st.values()}
    schemes = sorted(v for v in used if isinstance(v, str) and v in SCHEMES and v != "none"
                     and not v.startswith("bnb_"))
    if not schemes:
        return space
    import torch

    from .inputs import machine
    from .measure import int8  # noqa: F401 - registers int8_token's implementations
    from .measure.kernels import SLOW_SPEEDUP, scheme_speedups, without_vnni

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        speed = scheme_speedups(schemes)
        gated = without_vnni(schemes)
    finally:
        torch.set_num_threads(before)
    cap = machine.isa_cap()
    for s, (runs_on, never) in gated.items():  # e.g. int8_token never on torch._int_mm
        print(f"kernels: {s} runs on {runs_on or 'no working kernel'} here, never on "
              f"{', '.join(never)}: they need VNNI for oneDNN's int8 product, which this CPU "
              + (f"under ONEDNN_MAX_CPU_ISA={cap} " if cap else "") + "lacks", file=sys.stderr)
    slow = {s: v for s, v in speed.items() if v is None or v < SLOW_SPEEDUP}
    if not slow:
        return space
    fitted = space.without_values(slow)
    print("kernels: not searched here: " + ", ".join(
        f"{s} ({'no working kernel' if v is None else f'{v:.2f}x fp32'})"
        for s, v in slow.items()) + f" on the encoder's matmuls at {threads} threads (under "
        f"{SLOW_SPEEDUP:g}x: its fastest kernel on this CPU is several times slower than "
        f"fp32); {len(space.starts) - len(fitted.starts)} of {len(space.starts)} warm starts "
        "dropped with them", file=sys.stderr)
    return fitted


def run(args) -> dict:
    """Run a sweep. `args`: `SweepOptions`, or the parsed command line (`parse_args`), whose
    `inject` (fault injection, the failure tests') reaches the workers."""
    # A failed trial reports no objectives; HyperSearch tells Optuna it failed.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    inject = dict(getattr(args, "inject", None) or {})
    opts = args if isinstance(args, SweepOptions) else SweepOptions.from_namespace(args)
    for flag, value in (("--resume", opts.resume), ("--name", opts.name)):
        if value is not None:  # names become paths and MLflow filter strings
            check_name(value, flag)
    if opts.resume:
        opts = _restore_args(opts)
    opts, space, evalset, root, uri = validate(opts)
    name = opts.resume or opts.name or default_name(opts.space, time.strftime("%Y%m%d-%H%M%S"))
    here = root / "sweeps" / name
    with lock.hold(here, name):  # one launcher per sweep, before Ray or MLflow is touched
        if not opts.resume and any(p.name != lock.FILE for p in here.iterdir()):
            raise ValueError(f"`--name` must be new, got {name!r}: {here} exists "
                             f"(continue it with --resume {name})")
        return _sweep(opts, space, evalset, root, uri, name, inject)


def _sweep(opts: SweepOptions, space, evalset, root: Path, uri: str, name: str,
           inject: dict) -> dict:
    """The sweep itself, under its lock: Ray, the parent run, Tune, then `finish`."""
    import ray
    from ray import tune

    from .search import callbacks, sampler as search

    sweep_dir = root / "sweeps"
    resources = search.init_ray(opts.address)
    cpus = int(resources.get("CPU", 1))
    per_trial = opts.cpus_per_trial or max(1, cpus // opts.max_concurrent)
    devices = {"cpu"} | ({"cuda"} if resources.get("GPU", 0) > 0 else set())
    if not opts.resume:  # a resumed sweep's searcher keeps the space it was given
        space = kernel_fit(space, per_trial, devices)
    machine = None if opts.resume else machine_profile(space, per_trial)  # picks the starts
    if opts.address and uri.startswith("sqlite") and len(ray.nodes()) > 1:
        print(f"note: {uri} is a local file; trials on other machines cannot write it: pass "
              "--tracking-uri http://<server> (ignore this on a one-machine cluster)",
              file=sys.stderr)
    if "cuda" not in devices and space.mentions("cuda"):
        print("note: the cluster has no GPU, so cuda points are not searched", file=sys.stderr)
    exp_id = tracking.ensure_experiment(uri, root / "artifacts")
    rows_dir = sweep_dir / name / journal.DIR  # each measured trial's record, before MLflow
    if opts.resume:  # what the killed launcher measured but never got into MLflow
        reconcile(uri, exp_id, rows_dir)
    spec = opts.spec(name)  # what --resume and export read back
    parent = tracking.start_parent(uri, exp_id, name, parent_params(spec, evalset, per_trial,
                                                                    machine),
                                   {"git_commit": tracking.git_commit()})
    for line in resolution_warning(space, len(evalset)):
        print(line, file=sys.stderr)
    if evalset.skipped:
        print(f"note: {evalset.skipped} utterances skipped: {evalset.skipped_reasons[:3]}",
              file=sys.stderr)
    ctx = worker.SweepContext.for_sweep(
        opts, space, sweep=name, tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent,
        cpus_per_trial=per_trial, needs_calibration=space_calibrates(space),
        inject=inject, journal=str(rows_dir))
    trainable = tune.with_resources(tune.with_parameters(worker.trainable, ctx=ctx),
                                    search.resources_for(per_trial))
    total = opts.num_samples + 1
    print(f"sweep {name}: {total} trials ({opts.num_samples} + baseline) of space "
          f"{opts.space} on {cpus} CPUs, {per_trial} per trial; MLflow {uri}", file=sys.stderr)
    with _parent_ends(uri, parent):
        t0 = time.time()
        (sweep_dir / name).mkdir(parents=True, exist_ok=True)
        spec.save(sweep_dir / name)
        rows_dir.mkdir(exist_ok=True)  # after the spec: a folder without one is a new name
        if screen_wanted(opts, space):
            space = run_screening(opts, space, ctx, sweep_dir / name, devices, per_trial, uri,
                                  parent, machine)
        if opts.resume and tune.Tuner.can_restore(str(sweep_dir / name)):
            tuner = tune.Tuner.restore(str(sweep_dir / name), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            searcher = search.make_searcher(space, sampler=opts.sampler, seed=opts.seed,
                                            storage=f"sqlite:///{root / 'optuna.db'}",
                                            study_name=name, devices=devices,
                                            machine_profile=machine)
            tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=total, max_concurrent_trials=opts.max_concurrent,
                time_budget_s=opts.time_budget, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(sweep_dir), verbose=0,
                    callbacks=[search.Progress(total, opts.time_budget, space.objectives,
                                               space.constraints, store=(uri, exp_id, name)),
                               callbacks.Journal(ctx.journal),
                               callbacks.Deaths(uri, exp_id, name)],
                    # A lost node's trial runs again elsewhere; a recipe's own failure does not
                    # raise (it is reported as a failed trial), so it is never retried.
                    failure_config=tune.FailureConfig(max_failures=2)))
        with console.quiet_tune():
            tuner.fit()
        return finish(opts, space, name, time.time() - t0, uri, exp_id, parent, root,
                      evalset)


def parent_params(spec: SweepOptions, evalset, per_trial: int, machine: dict | None) -> dict:
    """The sweep's parent run's params: each saved option (`SweepOptions.params`), the whole
    spec as `spec`, and what the launch found: the data set's name and size, the CPUs each trial
    got, the command, versions, host and machine."""
    return {**spec.params(), "dataset": evalset.name,
            "n_utterances": len(evalset), "skipped_utterances": evalset.skipped,
            "skipped_reasons": "; ".join(evalset.skipped_reasons)[:5000],
            "cpus_per_trial": per_trial,
            "command": tracking.safe_argv(sys.argv), "spec": spec.to_json(),
            **{f"version.{k}": v for k, v in tracking.versions().items()},
            **{f"host.{k}": v for k, v in tracking.host_info().items()},
            **{f"machine.{k}": v for k, v in (machine or {}).items() if k != "isa"}}


def reconcile(uri: str, exp_id: str, folder: Path) -> int:
    """Trials measured but not in MLflow (logging them failed) logged from the sweep's journal
    (`tracking.reconcile`); a record that still cannot be logged stays there for the next
    --resume, with a warning. Returns how many were logged."""
    records, problems = journal.load(folder)
    try:
        n, failed = tracking.reconcile(uri, exp_id, records)
    except Exception as e:  # noqa: BLE001 - the store itself fails: the journal keeps them
        n, failed = 0, [f"{type(e).__name__}: {e}"]
    for line in problems + failed:
        print(f"warning: journal: {line} (kept in {folder}; --resume tries again)",
              file=sys.stderr)
    if n:
        print(f"note: {n} measured trials whose logging had failed were logged to MLflow from "
              f"{folder}", file=sys.stderr)
    return n


def _guarded(what: str, fn, *args, **kwargs) -> None:
    """One output file that cannot be made must not cost the others (or the summary)."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, the remaining files still get written
        print(f"warning: could not write {what}: {type(e).__name__}: {e}", file=sys.stderr)


def finish(opts, space, name, wall, uri, exp_id, parent, root, evalset) -> dict:
    from mlflow.tracking import MlflowClient

    from .techniques.recipe import Recipe

    reconciled = reconcile(uri, exp_id, root / "sweeps" / name / journal.DIR)
    killed = tracking.close_stale(uri, exp_id, name)
    rows = tracking.sweep_rows(uri, exp_id, name)  # MLflow holds every finished trial
    for line in screen_rows(rows, space.objectives):
        print(line, file=sys.stderr)
    recovered_ot, failed_ot = mark_stale_optuna(root, name, rows, space)
    family = {}
    _guarded("the sampler's lineage", lambda: family.update(
        local.lineage(searcher_study(root, name).get_trials(deepcopy=False))))
    for r in rows:  # a mutation of a front member (--sampler local): its parent, what changed
        if r.get("run_id") in family:
            r["parent_run"] = family[r["run_id"]]["parent"]
            r["changed"] = "+".join(family[r["run_id"]]["changed"])
    ok = [r for r in rows if r["status"] == "ok"]
    # A killed attempt is not a trial of its own: its trial is counted once, by its last word.
    trials = {r["trial_id"]: r for r in rows if r["status"] != "killed"}
    trials.update({r["trial_id"]: r for r in rows if r["trial_id"] not in trials})
    if not ok:
        tracking.retry(MlflowClient(uri).set_terminated, parent, status="FAILED")
        errors = sorted({str(r["error"]) for r in rows})
        raise SweepFailed(f"sweep {name}: none of its {len(trials)} trials finished; "
                          f"{len(errors)} distinct errors, first: {errors[:2]} "
                          f"(tracebacks in MLflow, run `python -m sweep.ui`)")
    baseline = next((r for r in ok if Recipe.from_flat(r["recipe"]).is_baseline), None)
    base_figs = dict(ok[0]["baseline"])
    objs, constraints = space.objectives, space.constraints
    if baseline is not None:  # the baseline trial's own measurement of the baseline figures
        base_figs.update({k: baseline[k] for k in [*base_figs, *(m for m, _ in objs)]
                          if k in baseline})
    # unresolved: off the front, kept in the table (a WER gain inside its own interval)
    front, unresolved = pareto.front_split(ok, objs, constraints=constraints, baseline=base_figs)
    out = Path(opts.out) if opts.out else root / "sweeps" / name / "results"
    links = {r["trial_id"]: tracking.run_url(exp_id, r["run_id"]) for r in ok}
    for r in rows:  # where each trial came from: trials.csv and the accounting say it
        r["origin"] = origin(r, space)
    report.write_front(rows, base_figs, out, objs, constraints=constraints)
    _guarded("pareto.png", report.plot_front, ok, front, base_figs, out / "pareto.png",
             title=f"HYPER sweep {name}", objectives=objs)
    screened = root / "sweeps" / name / "screen" / "screen.json"
    screening = json.loads(screened.read_text()) if screened.is_file() else None
    _guarded("report.html", report_html.write_report_html, rows, front, base_figs,
             out / "report.html", links, title=f"HYPER sweep {name}", objectives=objs,
             screening=screening)
    _guarded("importances.json",
             lambda: write_importances(searcher_study(root, name), out, objs))
    hv = pareto.front_hypervolume(front, base_figs, None, objs, constraints=constraints)
    trial_sum = sum(float(r.get("trial_s") or 0) for r in rows)
    pruned = [r for r in trials.values() if r.get("status") == "pruned"]
    summary = {"sweep": name, "trials": len(trials), "ok": len(ok), "pruned": len(pruned),
               "failed": len(trials) - len(ok) - len(pruned), "front": len(front),
               "hypervolume": hv, "unresolved": len(unresolved), **stop_costs(ok, pruned),
               **resolution_summary(rows, front, len(evalset), space),
               "wall_s": wall, "trial_sum_s": trial_sum, "out": str(out),
               "unreadable": sum(r["status"] == "unreadable" for r in rows),
               **interrupted(rows), "stale_runs_killed": killed, "reconciled": reconciled,
               # attempts whose worker died (retried, or the trial's last word)
               "worker_deaths": sum(r["status"] == "died" for r in rows),
               "stale_optuna_failed": failed_ot, "stale_optuna_recovered": recovered_ot,
               **accounting(list(trials.values()), front, space, base_figs),
               "knee": (pareto.knee(front, objs) or {}).get("trial_id")}
    if opts.eval_dataset and front:
        summary["eval"] = remeasure(opts, front, out, objs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    client = MlflowClient(uri)
    for k in ("hypervolume", "wall_s", "trial_sum_s", "front", "ok", "failed"):
        tracking.retry(client.log_metric, parent, k, float(summary[k]))
    for f in Path(out).iterdir():
        tracking.retry(client.log_artifact, parent, str(f), "front")
    _guarded("the front to MLflow", log_front, client, uri, exp_id, name, parent, front,
             base_figs, objs, out)
    tracking.retry(client.set_terminated, parent, status="FINISHED")
    print(report.format_table(front, base_figs, objectives=objs, unresolved=unresolved))
    if not front:
        print(f"no finished trial meets the constraints {dict(space.constraints)}; "
              f"see {out / 'trials.csv'} for all {len(ok)} of them")
    over = pareto.over_at_baseline(base_figs, constraints)
    if over:  # a budget the unchanged model misses: say so, not only "nothing feasible"
        print("warning: the baseline itself is over " + ", ".join(
            f"{k} {constraints[k]:g} (by {v:g})" for k, v in over.items())
            + ": a trial is feasible only where it does better than the model it compresses",
            file=sys.stderr)
    lost = (f"; {summary['interrupted']} interrupted by a kill ({summary['interrupted_rerun']} "
            f"re-run, {summary['interrupted_lost']} lost)" if summary["interrupted"] else "")
    if pruned:
        cost = ("" if summary["pruned_trial_s_mean"] is None or not summary["ok_trial_s_mean"]
                else f", {summary['pruned_trial_s_mean'] / summary['ok_trial_s_mean']:.0%} of a "
                     "completed trial's seconds each")
        lost += f"; {len(pruned)} stopped early{cost}"
    if summary["worker_deaths"]:
        lost += (f"; {summary['worker_deaths']} attempts lost their worker (each run's `death` "
                 "tag says why)")
    print(f"\n{len(ok)}/{len(trials)} trials ok{lost}, front of {len(front)}, hypervolume "
          f"{hv:.4f}; wall {wall:.0f}s for {trial_sum:.0f}s of trials. Files: {out}")
    if (res := report.resolution(rows, front)) is not None:
        need = summary["clips_to_resolve"]
        print(f"dWER resolution of this data: +-{res[0]:.3f} (median half-width of the 95% "
              f"intervals of {res[1]} trials); smaller differences are noise"
              + (f"; about {need} clips would resolve max_dwer "
                 f"{space.constraints['max_dwer']:g}" if need and need > len(evalset) else ""))
    print(f"The front in MLflow: python -m sweep.ui --root {root}, then open "
          f"{tracking.front_url(exp_id)}")

    return summary


def log_front(client, uri, exp_id, name, parent, front, base_figs, objs, out: Path) -> None:
    """The front inside MLflow: its trial runs tagged (`hyper.front`, `hyper.knee`), the parent
    run's `report.html` at its top (the UI previews it) and the front as an MLflow table."""
    k = pareto.knee(front, objs)
    tracking.mark_front(uri, exp_id, name, [r["run_id"] for r in front if r.get("run_id")],
                        (k or {}).get("run_id"))
    tracking.retry(client.log_table, parent, data=report.front_columns(front, base_figs, k),
                   artifact_file="front_table.json")
    if (out / "report.html").is_file():
        tracking.retry(client.log_artifact, parent, str(out / "report.html"))


def remeasure(opts: SweepOptions, front: list[dict], out: Path, objectives=None) -> list[dict]:
    """The front's recipes measured again on `--eval-dataset`, so the front is not judged only
    on the data it was searched on."""
    from .measure.evaluate import MeasureOptions, measure, run_trial
    from .inputs.models import load_model
    from .techniques.recipe import Recipe

    cli.quiet_transformers()
    ev = cli.load_data(dataclasses.replace(opts, dataset=opts.eval_dataset))
    lm = load_model(opts.model, device=opts.device)
    base = measure(lm.model, lm.processor, ev, language=opts.language, numbers=opts.numbers)
    rows = []
    for r in front:
        res, _ = run_trial(lm.model, lm.processor, ev, Recipe.from_flat(r["recipe"]),
                           MeasureOptions(language=opts.language, numbers=opts.numbers),
                           baseline=base)
        rows.append({"trial_id": r["trial_id"], "recipe": r["recipe"], "status": "ok",
                     **figures.flatten(res)})
    print(f"\nthe front re-measured on {ev.name} ({len(ev)} utterances):")
    print(report.format_table(rows, base.figures, objectives=objectives))
    (out / "front_eval.json").write_text(json.dumps(
        {"dataset": ev.name, "baseline": base.figures, "rows": rows}, indent=1, default=str))
    return rows


@console.refusing  # bad input of any kind: one clear message, exit 2, nothing ran
def main(argv=None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = parse_args(argv)
    if args.verbose:
        console.set_verbose()
    try:
        run(args)
    except SweepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
