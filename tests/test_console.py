"""HYPER's own lines: the launcher's and export's real console (a subprocess each, so stderr is
what a user sees) holds no known third-party noise, and `--verbose` brings it back."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
# What a user must not see by default (issue #18), by its source.
NOISE = {
    "torchao": re.compile(r"Failed to load .*torchao"),
    "_pytree": re.compile(r"_pytree"),
    "optuna experimental": re.compile(r"ExperimentalWarning"),
    "optuna importance": re.compile(r"PedAnova|importances will be equal|Some regimes for "
                                    r"parameter|too small to compute importances"),
    "tune box": re.compile(r"Configuration for experiment|Search algorithm +\w+"),
    "tensorboard": re.compile(r"(?i)tensorboard"),
    "max_new_tokens": re.compile(r"Both `max_new_tokens`"),
}
SPACE = """
name: console
params:
  quant.scheme: {choice: [none, dynamic_int8]}
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HYPER_VERBOSE", "RAY_AIR_NEW_OUTPUT")}
    return {**env, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def _run(args, **env):
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(**env), capture_output=True,
                       timeout=900)
    # bytes decoded by hand: text mode would turn a progress line's in-place \r into lines
    p.stdout, p.stderr = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _noise(text: str) -> dict[str, list[str]]:
    return {k: [ln for ln in text.splitlines() if rx.search(ln)] for k, rx in NOISE.items()
            if any(rx.search(ln) for ln in text.splitlines())}


def _launch(tmp: Path, tiny_checkpoint, small_manifest, name, *extra):
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    return _run(["-m", "sweep.launch", "--space", str(space), "--model", tiny_checkpoint,
                 "--dataset", small_manifest, "--root", str(tmp / "root"), "--name", name,
                 "--max-slowdown", "0", *extra])


@pytest.fixture(scope="module")
def quiet_sweep(tmp_path_factory, tiny_checkpoint, small_manifest):
    tmp = tmp_path_factory.mktemp("console")
    return tmp, _launch(tmp, tiny_checkpoint, small_manifest, "q", "--num-samples", "1")


def test_launcher_prints_hyper_lines_only(quiet_sweep):
    _, p = quiet_sweep
    assert _noise(p.stderr + p.stdout) == {}
    # What stays: HYPER's header, one progress line per trial (with the best feasible speed-up
    # and the trials stopped early), the front's table.
    lines = p.stderr.splitlines()
    assert lines[0].startswith("sweep q: 2 trials"), lines
    progress = [ln for ln in lines if ln.startswith("[")]
    assert len(progress) == 2 and all(" pruned 0 " in ln and " best " in ln for ln in progress)
    assert len(lines) == 3, lines
    assert "Configuration" in p.stdout and p.stdout.count("baseline") == 1


def _torchao_noise() -> dict:
    """What importing torchao prints here (nothing where its extensions load)."""
    try:
        p = subprocess.run([sys.executable, "-c", "import torchao"], env=_env(),
                           capture_output=True, text=True, timeout=300)
    except OSError:
        return {}
    return {k: v for k, v in _noise(p.stderr).items() if k in ("torchao", "_pytree")}


def test_verbose_brings_the_noise_back(tmp_path, tiny_checkpoint, small_manifest):
    p = _launch(tmp_path, tiny_checkpoint, small_manifest, "v", "--num-samples", "0",
                "--verbose")
    shown = _noise(p.stderr + p.stdout)
    assert {"optuna experimental", "tune box", "tensorboard", *_torchao_noise()} <= set(shown), \
        shown


def test_export_verify_prints_one_progress_line_and_its_table(quiet_sweep):
    import csv

    tmp, _ = quiet_sweep
    # By run id: on the tiny model int8 is as often slower than fp32 as not, and a front of the
    # baseline alone has no knee to export.
    with open(tmp / "root" / "sweeps" / "q" / "results" / "trials.csv", newline="") as fh:
        (run,) = [r["run_id"] for r in csv.DictReader(fh) if "dynamic_int8" in r["recipe"]]
    p = _run(["-m", "sweep.export", "--root", str(tmp / "root"), "--run", run,
              "--out", str(tmp / "ck"), "--verify", "--no-log"])
    assert _noise(p.stderr + p.stdout) == {}
    # picked <recipe>, (how), then the one progress line (rewritten in place with \r)
    err = [ln for ln in p.stderr.split("\n") if ln.strip()]
    assert len(err) == 3 and err[0].startswith("picked") and "verify: 3/3" in err[2], err
    table = p.stdout.splitlines()
    head = next(i for i, ln in enumerate(table) if "checkpoint" in ln and "trial" in ln)
    assert table[-1].startswith("verify: ") and head < len(table) - 2, table


IMPORTANCES = """
import json, sys
import optuna
from pathlib import Path
from sweep.search.study import write_importances
study = optuna.create_study(directions=["minimize", "maximize"])
for i in range(8):  # few trials, one parameter only sampled under a condition: coarse notes
    t = study.ask()
    x, y = t.suggest_float("x", 0, 1), t.suggest_categorical("y", ["a", "b"])
    z = t.suggest_int("z", 0, 3) if y == "a" else 0
    study.tell(t, [x + (y == "a") + z, 1 - x])
write_importances(study, Path(sys.argv[1]), [("wer", "min"), ("speedup", "max")])
print(json.dumps(json.loads((Path(sys.argv[1]) / "importances.json").read_text())))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_importances_warn_only_when_verbose(tmp_path, verbose):
    p = _run(["-c", IMPORTANCES, str(tmp_path)], **({"HYPER_VERBOSE": "1"} if verbose else {}))
    imp = json.loads(p.stdout)
    assert set(imp) == {"wer", "speedup"} and imp["speedup"]["x"] > 0.5
    assert ("optuna importance" in _noise(p.stderr)) is verbose, p.stderr


def test_the_front_is_tagged_in_mlflow(quiet_sweep):
    from mlflow.tracking import MlflowClient

    from sweep.results import tracking

    tmp, p = quiet_sweep
    uri = tracking.default_uri(tmp / "root")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hyper").experiment_id
    front = json.loads((tmp / "root" / "sweeps" / "q" / "results" / "pareto.json").read_text())
    tagged = client.search_runs([exp], tracking.FRONT_FILTER)  # what the UI's search box runs
    assert {r.info.run_id for r in tagged} == {r["run_id"] for r in front["front"]}
    knee = client.search_runs([exp], 'tags.hyper.knee = "true"')
    # None where the baseline alone is on the front (the knee is never the baseline)
    assert [r.data.tags["hyper.trial_key"] for r in knee] == [front["knee"]] * bool(front["knee"])
    assert tracking.front_url(exp) in p.stdout
    parent = client.search_runs([exp], "tags.`hyper.kind` = 'sweep'")[0].info.run_id
    top = {a.path for a in client.list_artifacts(parent)}
    assert {"report.html", "front_table.json", "front"} <= top, top
    table = json.loads(Path(client.download_artifacts(parent, "front_table.json", str(tmp)))
                       .read_text())
    assert len(table["data"]) == len(front["front"]) and "full_recipe" in table["columns"]
    # a resumed sweep whose front changed: the old members lose their tags
    tracking.mark_front(uri, exp, "q", [], None)
    assert client.search_runs([exp], tracking.FRONT_FILTER) == []
