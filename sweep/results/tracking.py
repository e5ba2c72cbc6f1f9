"""MLflow bookkeeping: one parent run per sweep, one idempotent child run per trial.

Only the sweep's driver and workers import this module; the evaluation core never does.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import time
import traceback
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ..inputs.machine import git_commit  # noqa: F401 - the launcher's parent-run tag
from . import figures, rows

EXPERIMENT = "hyper"
# Per-trial figures logged as MLflow metrics (fractions and seconds; sweep.results.figures
# decides).
METRICS = figures.keys("mlflow")
# Never logged, whatever the environment holds.
_SECRET_HINTS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL", "AUTH")


class TrackingError(ValueError):
    pass


def default_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def check_uri(uri: str) -> None:
    """Fail before any trial runs when the tracking store cannot be written."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            raise TrackingError(f"`--tracking-uri` must use an absolute sqlite path (Ray changes "
                                f"the working directory per trial), got {uri=}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(path).execute("CREATE TABLE IF NOT EXISTS _hyper_probe(x)").close()
        except (OSError, sqlite3.Error) as e:
            raise TrackingError(f"`--tracking-uri` {uri} cannot be written: {e}") from None
        return
    if uri.startswith(("http://", "https://", "databricks")):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure means the server is unusable
            raise TrackingError(f"`--tracking-uri` {uri} does not answer: {e}") from None
        return
    raise TrackingError(f"`--tracking-uri` must be sqlite:////abs/path.db or http(s)://host, "
                        f"got {uri=}")


def retry(fn, *args, attempts: int = 8, **kwargs):
    """Run an MLflow call, retrying while sqlite is locked by another trial's writer."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # mlflow wraps sqlite errors in several types
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.05 * 2 ** i)
    raise AssertionError("unreachable")


def ensure_experiment(uri: str, artifact_root: Path, name: str = EXPERIMENT) -> str:
    """The experiment's id, created if missing. Its artifacts go under `artifact_root` with a
    local sqlite store; a tracking server keeps its own (`mlflow server --serve-artifacts`):
    a local folder there would have each node write its runs' artifacts to its own disk."""
    client = MlflowClient(uri)
    exp = retry(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    local = artifact_root.resolve().as_uri() if uri.startswith("sqlite:") else None
    try:
        return retry(client.create_experiment, name, artifact_location=local)
    except Exception:  # noqa: BLE001 - created meanwhile by a concurrent launcher
        return client.get_experiment_by_name(name).experiment_id


def host_info() -> dict:
    """The launcher's machine (a parent run's `host.*` params): its CPU, ISA and oneDNN cap as
    `sweep.inputs.machine.info` gives them (every trial row records its worker's own)."""
    from ..inputs import machine

    return {"host": socket.gethostname(), **machine.info(), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchao", "transformers", "ray", "optuna", "mlflow", "jiwer"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def safe_argv(argv: list[str]) -> str:
    """The command line with values of secret-looking flags masked."""
    out, mask = [], False
    for a in argv:
        out.append("***" if mask else a)
        mask = a.startswith("--") and any(h in a.upper() for h in _SECRET_HINTS)
    return " ".join(out)


# Runs per search request. MLflow answers at most this many, newest first, with a token for
# the next page: one request alone silently dropped a long sweep's oldest runs (its baseline).
PAGE = 1000


def find_runs(client: MlflowClient, exp_id: str, **tags) -> list:
    """Every run of the experiment whose tags equal `tags`, page by page."""
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    out, token = [], None
    while True:
        page = retry(client.search_runs, [exp_id], filter_string=flt, max_results=PAGE,
                     page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def start_parent(uri: str, exp_id: str, sweep: str, params: dict, tags: dict) -> str:
    """The sweep's parent run; a resumed sweep gets its existing parent back."""
    client = MlflowClient(uri)
    found = [r for r in find_runs(client, exp_id, **{"hyper.sweep": sweep, "hyper.kind": "sweep"})]
    if found:
        run_id = found[0].info.run_id
        retry(client.update_run, run_id, status="RUNNING")
        return run_id
    run = retry(client.create_run, exp_id, run_name=sweep,
                tags={"hyper.sweep": sweep, "hyper.kind": "sweep", **tags})
    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow takes at most 100 params a request
        retry(client.log_batch, run.info.run_id, params=batch[i:i + 100])
    return run.info.run_id


def begin_trial(uri: str, exp_id: str, parent: str, sweep: str, key: str, recipe: dict,
                tags: dict) -> tuple[str, dict | None]:
    """Create the trial's child run: (run_id, None); or (run_id, its row, `rows.from_run`) when
    an earlier attempt of this trial already finished, so a resumed sweep neither re-runs nor
    re-logs it. `tags`: row fields (`rows.tags` encodes them) and any other plain values.

    A RUNNING run left by a killed attempt is marked KILLED, so nothing is counted twice.
    """
    client = MlflowClient(uri)
    for r in find_runs(client, exp_id, **{"hyper.sweep": sweep, "hyper.trial_key": key}):
        if r.info.status == "FINISHED":
            return r.info.run_id, rows.from_run(r)
        if r.info.status == "RUNNING":
            retry(client.set_terminated, r.info.run_id, status="KILLED")
    run = retry(client.create_run, exp_id, run_name=key, tags={
        "mlflow.parentRunId": parent, "hyper.sweep": sweep, "hyper.kind": "trial",
        "hyper.trial_key": key, "status": "running",
        **{k: str(v) for k, v in tags.items()}, **rows.tags(tags)})
    retry(client.log_batch, run.info.run_id,
          params=[Param(k, v) for k, v in rows.params(recipe).items()])
    return run.info.run_id, None


def finish_trial(uri: str, run_id: str, result: dict) -> None:
    """Log a finished trial's result (`rows.record`: figures, tags, transcripts) and end the
    run: FINISHED, or FAILED with status `pruned` for a trial stopped early."""
    log_record(uri, run_id, rows.record(result))


def log_record(uri: str, run_id: str, record: dict, again: bool = False) -> None:
    """Log a trial's `rows.record` to its run and end the run as the record says. `again`: the
    run may hold some of it from an attempt that failed midway (MLflow appends to a table
    logged twice: a table already there is kept as it is)."""
    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    retry(client.log_batch, run_id,
          metrics=[Metric(k, float(v), now, 0) for k, v in record["metrics"].items()],
          tags=[RunTag(k, v) for k, v in record["tags"].items()])
    there = {a.path for a in retry(client.list_artifacts, run_id)} if again else set()
    for name, table in record["tables"].items():
        if name not in there:
            retry(client.log_table, run_id, data=table, artifact_file=name)
    retry(client.set_terminated, run_id, status=record["end"])


def reconcile(uri: str, exp_id: str, records: list[dict]) -> tuple[int, list[str]]:
    """Log the journal's records (`sweep.results.journal`) that MLflow lacks: a record whose
    run has not ended as it says with its figures, unless another attempt of the same trial
    finished. Returns (records logged, a warning per record that still could not be)."""
    client = MlflowClient(uri)
    logged, problems = 0, []
    for sweep in sorted({r["sweep"] for r in records}):
        runs = find_runs(client, exp_id, **{"hyper.sweep": sweep, "hyper.kind": "trial"})
        by_id = {r.info.run_id: r for r in runs}
        for rec in (r for r in records if r["sweep"] == sweep):
            run = by_id.get(rec["run_id"])
            if run is None:
                problems.append(f"trial {rec['trial_key']}: its run {rec['run_id']} is not in "
                                f"{uri}, experiment {exp_id}")
                continue
            if (run.info.status == rec["end"] and set(rec["metrics"]) <= set(run.data.metrics)
                    or any(r.info.status == "FINISHED" and r.info.run_id != rec["run_id"]
                           and r.data.tags.get("hyper.trial_key") == rec["trial_key"]
                           for r in runs)):
                continue
            try:
                log_record(uri, rec["run_id"], rec, again=True)
                logged += 1
            except Exception as e:  # noqa: BLE001 - kept in the journal for the next try
                problems.append(f"trial {rec['trial_key']} (run {rec['run_id']}): "
                                f"{type(e).__name__}: {e}")
    return logged, problems


def fail_trial(uri: str, run_id: str, exc: BaseException, status: str = "failed",
               trial_s: float | None = None) -> str:
    """Record a failed (or pruned) trial: its error as a tag, the traceback as an artifact, and
    the seconds it took (so that the sweep's `trial_sum_s` counts them too)."""
    client = MlflowClient(uri)
    msg = f"{type(exc).__name__}: {exc}"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    metrics = [] if trial_s is None else [Metric("trial_s", float(trial_s),
                                                 int(time.time() * 1000), 0)]
    retry(client.log_batch, run_id, metrics=metrics,
          tags=[RunTag("status", status), RunTag("error", msg[:4000])])
    retry(client.log_text, run_id, tb, "traceback.txt")
    retry(client.set_terminated, run_id, status="FAILED")
    return msg


RUNG_TAG = "hyper.rung."  # + clip count: the trial's {"dwer", "speedup"} on its first clips


def log_rung(uri: str, run_id: str, n: int, figs: dict) -> None:
    """A trial's point figures at a rung (`--rungs`), for later trials to compare with."""
    retry(MlflowClient(uri).set_tag, run_id, f"{RUNG_TAG}{n}",
          json.dumps({k: float(figs[k]) for k in ("dwer", "speedup")}))


def rung_figures(uri: str, exp_id: str, sweep: str, n: int) -> list[dict]:
    """The rung-`n` figures of the sweep's trials that finished the whole set."""
    client = MlflowClient(uri)
    out = []
    for r in find_runs(client, exp_id, **{"hyper.sweep": sweep, "hyper.kind": "trial"}):
        tag = r.data.tags.get(f"{RUNG_TAG}{n}")
        if r.info.status == "FINISHED" and tag:
            out.append({**json.loads(tag), "trial_id": r.data.tags.get("hyper.trial_key")})
    return out


def sweep_rows(uri: str, exp_id: str, sweep: str) -> list[dict]:
    """Every trial of a sweep as a row, read back from MLflow: the record that survives a
    killed launcher, so the front covers all finished trials, resumed or not. A run that cannot
    be decoded (a recipe value no parameter allows, a broken tag) becomes a row with status
    `unreadable` and the reason in `error`, never an exception: one bad row must not take the
    end of the sweep down."""
    client = MlflowClient(uri)
    runs = find_runs(client, exp_id, **{"hyper.sweep": sweep, "hyper.kind": "trial"})
    return sorted((rows.from_run(r) for r in runs), key=lambda row: row["start_time"])


def end_attempt(uri: str, exp_id: str, sweep: str, key: str, status: str, error: str,
                death: str | None = None) -> list[str]:
    """The trial's runs still RUNNING (an attempt Tune saw end in an error: its worker died,
    or the trainable itself raised) end FAILED with `status` (`died`, `failed`), the error in
    a line and, for a death, Ray's whole report as `death`. Returns their run ids."""
    client = MlflowClient(uri)
    tags = [RunTag("status", status), RunTag("error", error[:4000])]
    tags += [RunTag("death", death[:5000])] if death else []
    ended = []
    for r in find_runs(client, exp_id, **{"hyper.sweep": sweep, "hyper.trial_key": key}):
        if r.info.status == "RUNNING":
            retry(client.log_batch, r.info.run_id, tags=tags)
            retry(client.set_terminated, r.info.run_id, status="FAILED")
            ended.append(r.info.run_id)
    return ended


def close_stale(uri: str, exp_id: str, sweep: str) -> int:
    """Mark trial runs still RUNNING after the sweep ended (a killed attempt) as KILLED."""
    client = MlflowClient(uri)
    stale = [r for r in find_runs(client, exp_id, **{"hyper.sweep": sweep,
                                                    "hyper.kind": "trial"})
             if r.info.status == "RUNNING"]
    for r in stale:
        retry(client.set_terminated, r.info.run_id, status="KILLED")
    return len(stale)


FRONT_TAGS = ("hyper.front", "hyper.knee")
FRONT_FILTER = 'tags.hyper.front = "true"'  # the runs `mark_front` tags, in the UI's search box
# Where `python -m sweep.ui` listens by default: the links the launcher prints point there.
UI_HOST, UI_PORT = "127.0.0.1", 5000


def ui_url(host: str = UI_HOST, port: int = UI_PORT) -> str:
    return f"http://{host}:{port}"


def run_url(exp_id: str, run_id: str, ui: str | None = None) -> str:
    """A run's page in the MLflow UI at `ui` (default: `sweep.ui`'s own address)."""
    return f"{ui or ui_url()}/#/experiments/{exp_id}/runs/{run_id}"


def front_url(exp_id: str, ui: str | None = None) -> str:
    """The MLflow UI's run list of the experiment, searched for the front's runs, fastest first
    (MLflow 3's UI opens GenAI pages unless told `workflowType=machine_learning`, and nests
    child runs under their parent when sorted by start time)."""
    from urllib.parse import quote

    return (f"{ui or ui_url()}/#/experiments/{exp_id}/runs?workflowType=machine_learning&"
            f"searchFilter={quote(FRONT_FILTER)}&orderByKey={quote('metrics.`latency_median_s`')}"
            "&orderByAsc=true")


def mark_front(uri: str, exp_id: str, sweep: str, front: list[str], knee: str | None) -> None:
    """Tag the front's trial runs `hyper.front=true` and the knee's `hyper.knee=true`, so that
    `tags.hyper.front = "true"` in the UI's search box lists them; a run a resumed sweep no
    longer counts on the front loses its tags."""
    client = MlflowClient(uri)
    want = {rid: {"hyper.front"} | ({"hyper.knee"} if rid == knee else set()) for rid in front}
    for key in FRONT_TAGS:
        for r in find_runs(client, exp_id, **{"hyper.sweep": sweep, key: "true"}):
            if key not in want.get(r.info.run_id, ()):
                retry(client.delete_tag, r.info.run_id, key)
    for rid, keys in want.items():
        retry(client.log_batch, rid, tags=[RunTag(k, "true") for k in sorted(keys)])


def log_profile(uri: str, run_id: str, prof: dict | None, error: str | None = None) -> None:
    """A trial's `--profile` (`sweep.measure.profile.top_operators`): the printed table as
    profile.txt and the rows (fractions and seconds) as profile.json; or why it failed."""
    client = MlflowClient(uri)
    if prof is None:
        retry(client.set_tag, run_id, "profile_error", str(error)[:4000])
        return
    retry(client.log_text, run_id, prof["table"] + "\n", "profile.txt")
    retry(client.log_dict, run_id, {k: v for k, v in prof.items() if k != "table"},
          "profile.json")
