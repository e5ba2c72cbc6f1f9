"""The Ray Tune trainable: one trial = one recipe measured by the evaluation core.

The base model, the evaluation set and the baseline measurement are loaded once per worker
process and reused by every trial that lands there (Tune's actor reuse), never re-read per trial.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from ..results import journal, rows

# Per worker process: (model, data, threads, device) -> (loaded, evalset, calibration, baseline).
_CACHE: dict = {}
STATUS_OK, STATUS_FAILED, STATUS_PRUNED = "ok", "failed", "pruned"


# --trial-timeout auto: a trial that transcribes more than max_slowdown x the baseline is
# stopped on its first clips, so what runs far longer is its preparation (a static int8 +
# int4 + fallback + frozen-compile recipe ran 17 min at 8.6 GB without a clip, issue #19).
AUTO_TIMEOUT_FACTOR = 10.0  # x the baseline's seconds for the whole set
AUTO_TIMEOUT_MIN_S = 300.0  # and never less (compiling alone takes a minute or two)
# screening measures a single change on a few clips: one whose preparation alone runs past
# this (the calibrated bf16 fallback's block probe took 120-200 s) is out of reach as a step
SCREEN_TIMEOUT_MIN_S = 120.0


@dataclass(frozen=True)
class SweepContext:
    """Everything a worker needs besides the sampled recipe (pickled to every worker)."""

    sweep: str
    model: str
    data: dict  # keyword arguments of cli.load_data's namespace
    language: str | None
    numbers: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus_per_trial: int
    warmup: int = 1
    trial_timeout: float | str | None = "auto"  # seconds, "auto" (timeout_s) or None: off
    timeout_min_s: float = AUTO_TIMEOUT_MIN_S  # the least an "auto" timeout gives a trial
    max_slowdown: float | None = None
    early_stop: object = None  # sweep.measure.stopping.EarlyStop, or None: never for accuracy
    confidence: float | None = None  # the space's: trials get `dwer_upper` at this level
    rungs: tuple = ()  # --rungs: shares of the set after which a trial must earn going on
    probes: bool = True  # transcribe the non-speech probes after the clips (hallucination_rate)
    needs_calibration: bool = False
    inject: dict = field(default_factory=dict)  # test hooks: recipe key=value -> fault
    profile: int = 0  # --profile: top operators by self time logged per trial (0: none)
    journal: str | None = None  # the sweep's journal folder (sweep.results.journal), if any
    # the sweep's options whole (`sweep.search.sweepspec.SweepOptions`): an option added there
    # reaches every worker with no field here; None outside a sweep (bench.gpu's worker row)
    options: object = None

    @classmethod
    def for_sweep(cls, opts, space, **run) -> SweepContext:
        """The context of a sweep's trials: its options `opts` (checked), what its `space`
        decides (early stopping against `max_dwer`, the confidence of `dwer_upper`) and `run`:
        where it logs (sweep, tracking_uri, experiment_id, parent_run_id), cpus_per_trial,
        needs_calibration, inject and journal."""
        from ..measure import stopping

        return cls(model=opts.model, data=opts.data(), language=opts.language,
                   numbers=opts.numbers, warmup=opts.warmup, trial_timeout=opts.trial_timeout,
                   max_slowdown=opts.max_slowdown, probes=opts.probes, profile=opts.profile,
                   early_stop=stopping.resolve(opts.early_stop,
                                               space.constraints.get("max_dwer"),
                                               opts.early_stop_min_clips),
                   confidence=space.confidence, rungs=stopping.parse_rungs(opts.rungs),
                   options=opts, **run)

    def measure_options(self, threads: int):
        """How each trial is measured (`run_trial`'s options), on `threads` CPU threads."""
        from ..measure.evaluate import MeasureOptions

        return MeasureOptions(language=self.language, threads=threads, warmup=self.warmup,
                              numbers=self.numbers, max_slowdown=self.max_slowdown,
                              early_stop=self.early_stop, confidence=self.confidence,
                              rungs=self.rungs)


@dataclass(frozen=True)
class Slot:
    """Where one trial runs: its key (Tune's trial id, the MLflow run's `hyper.trial_key`), the
    CPUs and GPU ids it was given and the node. A Ray trial's comes from `ray_slot`; a trial run
    outside Ray (bench.gpu's worker-path row, on a machine without Ray) passes its own."""

    key: str
    cpus: int
    gpus: list
    node_id: str


def ray_slot() -> Slot:
    from ray import tune

    cpus, gpus = _assigned()
    return Slot(tune.get_context().get_trial_id(), cpus, gpus, _node_id())


class MlflowLog:
    """A trial's record in the sweep's MLflow store (`sweep.results.tracking`, imported on first
    use: the worker path itself runs without MLflow). Anything else with these methods can stand
    in for it (bench.gpu's JSON file on the GPU machine, which has no MLflow)."""

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx

    def begin(self, slot: Slot, flat: dict, tags: dict) -> tuple[str, dict | None]:
        from ..results import tracking

        c = self.ctx
        return tracking.begin_trial(c.tracking_uri, c.experiment_id, c.parent_run_id, c.sweep,
                                    slot.key, flat, tags)

    def finish(self, run_id: str, result: dict) -> None:
        from ..results import tracking

        tracking.finish_trial(self.ctx.tracking_uri, run_id, result)

    def fail(self, run_id: str, exc: BaseException, status: str, trial_s: float) -> str:
        from ..results import tracking

        return tracking.fail_trial(self.ctx.tracking_uri, run_id, exc, status=status,
                                   trial_s=trial_s)

    def rung(self, run_id: str, n: int, figs: dict) -> None:
        from ..results import tracking

        tracking.log_rung(self.ctx.tracking_uri, run_id, n, figs)

    def rung_figures(self, n: int) -> list[dict]:
        from ..results import tracking

        c = self.ctx
        return tracking.rung_figures(c.tracking_uri, c.experiment_id, c.sweep, n)

    def profile(self, run_id: str, prof: dict | None, error: str | None = None) -> None:
        from ..results import tracking

        tracking.log_profile(self.ctx.tracking_uri, run_id, prof, error)


class InjectedFault(RuntimeError):
    pass


class TrialTimeout(Exception):
    """Raised inside a trial that ran past `--trial-timeout`."""


def timeout_s(setting, base: dict, minimum: float = AUTO_TIMEOUT_MIN_S) -> float | None:
    # base: the baseline's figures (Measurement.figures), from this worker
    """Seconds a trial may run: `setting` seconds, None (off), or "auto" (from the baseline
    this worker measured: AUTO_TIMEOUT_FACTOR x its seconds for the set, at least `minimum`)."""
    if setting == "auto":
        return max(minimum, AUTO_TIMEOUT_FACTOR * base["latency_mean_s"] * base["n_utterances"])
    return float(setting) if setting else None


def parse_timeout(text) -> float | str | None:
    """--trial-timeout's value: auto, off, or seconds > 0."""
    if text in (None, "off"):
        return None
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not value > 0:
        raise ValueError(f"`--trial-timeout` must be auto, off or seconds > 0, got {text!r}")
    return value


class _Watchdog:
    """Raises TrialTimeout in the trial's thread once `seconds` pass.

    The exception lands at the next Python bytecode, which a decoding loop reaches every token;
    Tune runs the trial in its own thread, so signals cannot be used.
    """

    def __init__(self, seconds: float | None):
        self.seconds, self.done = seconds, threading.Event()
        self.target = threading.get_ident()

    def __enter__(self):
        if self.seconds:
            threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self):
        if not self.done.wait(self.seconds):
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target),
                                                       ctypes.py_object(TrialTimeout))

    def __exit__(self, *exc):
        self.done.set()
        return False


def _assigned() -> tuple[int, list]:
    """CPU count and GPU ids Ray really gave this trial (not what was hoped for)."""
    import ray

    res = ray.get_runtime_context().get_assigned_resources()
    return max(1, int(res.get("CPU", 1))), [str(g) for g in ray.get_gpu_ids()]


def _prepare(ctx: SweepContext, device: str, threads: int):
    """Load model, data and baseline once per worker; returns the cache entry and its cost."""
    from argparse import Namespace

    from ..inputs import cli
    from ..measure.evaluate import measure, set_threads
    from ..inputs.models import load_model

    key = (ctx.model, tuple(sorted(ctx.data.items())), threads, device, ctx.probes)
    if key in _CACHE:
        return _CACHE[key], 0.0
    t0 = time.perf_counter()
    cli.quiet_transformers()
    set_threads(threads)
    args = Namespace(**ctx.data)
    evalset = cli.load_data(args)
    calib = cli.load_calibration(args) if ctx.needs_calibration else None
    loaded = load_model(ctx.model, device=device)
    from ..inputs.probes import probes

    heard = probes() if ctx.probes else None
    base = measure(loaded.model, loaded.processor, evalset, language=ctx.language,
                   warmup=ctx.warmup, numbers=ctx.numbers, probes=heard)
    _CACHE.clear()  # one base model per worker: a new key replaces the old (memory)
    _CACHE[key] = (loaded, evalset, calib, base, heard)
    return _CACHE[key], time.perf_counter() - t0


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _check_device(device: str, gpus: list) -> None:
    if device != "cuda":
        return
    import torch

    if not gpus:
        raise RuntimeError("a cuda trial was scheduled without a GPU from Ray")
    if not torch.cuda.is_available():
        raise RuntimeError(f"Ray gave this trial GPU ids {gpus}, but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def _inject(ctx: SweepContext, flat: dict) -> None:
    """Faults for the failure tests: a recipe value mapped to `raise`, `hang:<seconds>` or
    `kill` (the worker SIGKILLs itself, as the OOM killer would)."""
    for cond, fault in ctx.inject.items():
        k, _, v = cond.partition("=")
        if str(flat.get(k)) == v:
            if fault == "raise":
                raise InjectedFault(f"injected failure for {cond}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.startswith("hang:"):  # busy in Python, like a decoding loop that never ends
                end = time.time() + float(fault[5:])
                while time.time() < end:
                    time.sleep(0.05)


def _rung_judge(ctx: SweepContext, run_id: str, log: MlflowLog):
    """`--rungs`: at each rung the trial records its figures and goes on only when no trial
    that finished the whole set beat it on both dWER and speed on the same clips, and its dWER
    is within the budget. Every front member therefore measured the whole set."""
    if not ctx.rungs:
        return None
    from ..measure.stopping import Dominated, rung_verdict

    budget = getattr(ctx.early_stop, "max_dwer", None)

    def judge(n: int, figs: dict) -> None:
        log.rung(run_id, n, figs)
        others = log.rung_figures(n)
        # the unchanged model is on every rung too: what it beats cannot reach the front
        others.append({"dwer": 0.0, "speedup": 1.0, "trial_id": "baseline"})
        why = rung_verdict(figs, others, budget)
        if why:
            raise Dominated(f"at the rung of {n} clips: {why}")
    return judge


def run_one(config: dict, ctx: SweepContext, slot: Slot | None = None,
            log: MlflowLog | None = None) -> dict:
    """Measure one recipe and log it; returns the figures Tune and Optuna see. `slot` and `log`:
    by default the Ray trial's and the sweep's MLflow store."""
    from ..measure.evaluate import run_trial
    from ..techniques.recipe import Recipe

    t0 = time.perf_counter()
    flat = {k: v for k, v in config.items()}
    slot, log = slot or ray_slot(), log or MlflowLog(ctx)
    trial_key, cpus, gpus = slot.key, slot.cpus, slot.gpus
    device = flat.get("device", "cpu")
    run_id, done = log.begin(slot, flat, {"device": device, "node": os.uname().nodename,
                                          "node_id": slot.node_id, "gpu_ids": gpus,
                                          "cpus": cpus})
    if done is not None:  # finished by an earlier attempt: its row as logged, not run twice
        return {**reported(done, run_id, trial_key), "restored": True}
    try:
        recipe = Recipe.from_flat(flat)
        _check_device(device, gpus)
        (loaded, evalset, calib, base, heard), load_s = _prepare(ctx, device, cpus)
        limit = timeout_s(ctx.trial_timeout, base.figures, ctx.timeout_min_s)
        with _Watchdog(limit):
            try:
                _inject(ctx, flat)
                result, _ = run_trial(loaded.model, loaded.processor, evalset, recipe,
                                      ctx.measure_options(cpus), baseline=base,
                                      calibration=calib, probes=heard,
                                      rung_judge=_rung_judge(ctx, run_id, log))
            except TrialTimeout:
                raise TrialTimeout(f"trial ran past --trial-timeout {limit:.0f} s"
                                   f"{' (auto)' if ctx.trial_timeout == 'auto' else ''} "
                                   f"(recipe {flat})") from None
        result.update(trial_s=time.perf_counter() - t0, worker_prepare_s=load_s,
                      node=os.uname().nodename, node_id=slot.node_id, gpu_ids=gpus)
    except Exception as e:  # noqa: BLE001 - a recipe's failure is a failed trial, not a dead sweep
        trial_s = time.perf_counter() - t0
        msg = log.fail(run_id, e, STATUS_FAILED, trial_s)
        return {"status": STATUS_FAILED, "error": msg, "run_id": run_id,
                "trial_key": trial_key, "trial_s": trial_s}
    unlogged = _keep(ctx, slot, run_id, result, log)
    if ctx.profile and not unlogged:
        try:
            _profile(ctx, loaded, evalset, calib, recipe, run_id, log)
        except Exception as e:  # noqa: BLE001 - logging the profile failed: the trial stands
            print(f"warning: trial {trial_key}: its profile was not logged: {e}", file=sys.stderr)
    return {**reported(rows.from_result(result), run_id, trial_key), **unlogged}


def _keep(ctx: SweepContext, slot: Slot, run_id: str, result: dict, log) -> dict:
    """A measured trial's record (`rows.record`): into the sweep's journal first, then to its
    log. A log that fails costs nothing measured: the trial stays measured (Tune and Optuna get
    its figures), its record goes to the launcher with them (a node without the launcher's
    disk has no journal folder), and the launcher logs it from the journal at the end of the
    sweep or on --resume (`tracking.reconcile`). Returns what the trial's result adds: nothing,
    or why logging failed (`unlogged`) and the record as JSON (`journal`)."""
    record = {**rows.record(result), "run_id": run_id, "trial_key": slot.key,
              "sweep": ctx.sweep}
    if ctx.journal and os.path.isdir(ctx.journal):
        try:
            journal.save(ctx.journal, record)
        except OSError as e:
            print(f"warning: trial {slot.key}: not written to {ctx.journal}: {e}",
                  file=sys.stderr)
    try:
        log.finish(run_id, result)
    except Exception as e:  # noqa: BLE001 - whatever failed, the measurement is kept
        why = f"{type(e).__name__}: {e}"
        print(f"warning: trial {slot.key} was measured but logging it failed ({why}); the "
              "launcher logs it from the sweep's journal", file=sys.stderr)
        return {"unlogged": why[:2000], "journal": json.dumps(record, default=journal.plain)}
    return {}


def reported(row: dict, run_id: str, trial_key: str) -> dict:
    """What Tune and Optuna get of a finished or stopped trial's row: the same whether it was
    measured now or restored from MLflow after a kill (`rows.from_result` == `rows.from_run`).
    A stopped trial (`pruned`) carries its partial figures and its `stop_reason` as `error`."""
    status = row.get("status") or STATUS_OK
    extra = {"error": row.get("stop_reason")} if status == STATUS_PRUNED else {}
    return {**rows.tune_row(row), "status": status, "run_id": run_id, "trial_key": trial_key,
            **extra}


def trainable(config: dict, ctx: SweepContext) -> None:
    from ray import tune

    tune.report(run_one(config, ctx))


def _profile(ctx: SweepContext, loaded, evalset, calib, recipe, run_id: str,
             log: MlflowLog) -> None:
    """`--profile`: the finished trial's top operators by self time (torch.profiler, a few
    clips, untimed) as its MLflow artifacts profile.txt and profile.json. A profile that fails
    costs the trial nothing: its error becomes the run's `profile_error` tag."""
    from ..measure.evaluate import calibrator
    from ..measure.profile import ProfileOptions, profile_recipe

    try:
        prof = profile_recipe(loaded.model, loaded.processor, evalset, recipe,
                              language=ctx.language, opts=ProfileOptions(top=ctx.profile),
                              calibrate=None if calib is None else calibrator(
                                  loaded.processor, calib, ctx.language))
    except Exception as e:  # noqa: BLE001 - the trial's figures are logged already
        log.profile(run_id, None, f"{type(e).__name__}: {e}")
        return
    log.profile(run_id, prof)


def trainable_point(config: dict, ctx: SweepContext) -> None:
    """A fixed point (screening: Tune's grid over whole recipes, under `point`)."""
    from ray import tune

    tune.report(run_one(config["point"], ctx))
