"""The multi-node recipe of docs/cluster.md for real: a sweep on a two-node Ray cluster logs
through a real `mlflow server` (sqlite backend, artifacts served from a folder only the server
writes), and `sweep.export` reads the winner back through it. No shared disk is needed for
MLflow: a node that could not reach the server would show here as a missing metric, param or
transcript."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep import export, launch  # noqa: E402

SPACE = """
params:
  quant.scheme: {choice: [none, dynamic_int8, bf16]}
  prune.rate: {float: [0.0, 0.5], step: 0.25}
"""


@pytest.fixture()
def mlflow_server(tmp_path):
    """A tracking server on a free port of 127.0.0.1: (its URI, the folder its artifacts go
    to). MLflow 3's job runner is off: it starts a dozen worker processes none of this uses."""
    where = tmp_path / "server"
    where.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(where / "log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{where / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(where / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (where / "log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert time.time() - t0 < 180, "the mlflow server did not answer in 180 s"
                time.sleep(0.5)
        yield uri, where / "artifacts"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its uvicorn
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_two_node_sweep_logs_everything_through_a_tracking_server(
        tmp_path, tiny_checkpoint, small_manifest, mlflow_server):
    from ray.cluster_utils import Cluster

    uri, served = mlflow_server
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    root = tmp_path / "root"
    Path("/tmp/ray").mkdir(exist_ok=True)  # Cluster writes the head's address there
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": "/tmp/hyper-ray-m", "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        assert launch.main([
            "--space", str(space), "--model", tiny_checkpoint, "--dataset", small_manifest,
            "--root", str(root), "--name", "m", "--seed", "1", "--num-samples", "2",
            "--tracking-uri", uri, "--address", cluster.address, "--max-concurrent", "2",
            "--cpus-per-trial", "1", "--max-slowdown", "0", "--no-probes"]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hyper")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("hyper.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("hyper.kind") == "trial"]
    assert parent.info.status == "FINISHED" and len(trials) == 3
    assert len({r.data.tags["node_id"] for r in trials}) == 2  # both nodes logged
    for r in trials:
        assert r.info.status == "FINISHED"
        assert {"wer", "cer", "dwer", "latency_median_s", "speedup"} <= set(r.data.metrics)
        assert {"quant.scheme", "prune.rate"} <= set(r.data.params)
        got = json.loads(Path(client.download_artifacts(r.info.run_id, "transcripts.json",
                                                        str(tmp_path))).read_text())
        assert len(got["data"]) == 3 and "hypothesis" in got["columns"]
    # Every artifact went through the server: in its folder, none beside the launcher's root
    assert len(list(served.rglob("transcripts.json"))) == 3
    assert list(served.rglob("front/pareto.json")) and not (root / "artifacts").exists()

    # export picks through the server (the front file, the trials), re-measures against the
    # trial's transcripts (--verify) and logs the checkpoint back through it
    out = tmp_path / "best"
    assert export.main(["--tracking-uri", uri, "--sweep", "m", "--max-dwer", "100",
                        "--out", str(out), "--verify"]) == 0
    picked = json.loads((out / "metrics.json").read_text())
    assert picked["verify"]["match"] and picked["verify"]["differing_transcripts"] == 0
    run = client.get_run(picked["trial"]["run_id"])
    assert run.data.tags["hyper.export"].startswith("hyper-m/")
    assert list(served.rglob("export/recipe.json"))
