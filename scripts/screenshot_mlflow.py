"""Screenshots of the MLflow UI showing a sweep's front, taken by headless Chromium. Run by hand
(not in CI); needs Debian's `chromium` (apt-get install chromium).

    .venv/bin/python scripts/screenshot_mlflow.py --root mlruns --out /tmp/shots

Starts `python -m sweep.ui` (loopback only) on the store under --root and writes two PNGs:
front.png, the experiment's run list searched with `tags.hyper.front = "true"` (the front's trial
runs), and report.png, the latest sweep's parent run with its report.html artifact previewed.
Without --root it first runs a small real sweep (quick space, embedded whisper-base, 4 clips).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep.results.tracking import front_url, run_url, ui_url  # noqa: E402


def small_sweep(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "sweep.launch", "--space", "quick", "--num-samples", "3",
                    "--max-samples", "4", "--root", str(root)], cwd=REPO, check=True)


def wait_for(url: str, seconds: float = 90) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the MLflow UI did not answer at {url} within {seconds:.0f} s")


def shoot(browser: str, url: str, png: Path, wait_ms: int) -> None:
    """One screenshot; the UI is a single-page app, so Chromium's virtual clock runs `wait_ms`
    of its scripts and network first."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        "--window-size=1900,1000", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={png}", url], check=True, capture_output=True,
                       timeout=180)
    print(f"{png}: {url}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="sweep root with mlflow.db (default: a new "
                                                 "small sweep in a temporary folder)")
    ap.add_argument("--out", default="/tmp/hyper-shots", help="folder for the PNGs")
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument("--wait-ms", type=int, default=15000, help="virtual time per page")
    args = ap.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs Debian's chromium: apt-get install -y chromium")
    root = Path(args.root or tempfile.mkdtemp(prefix="hyper-shots-")).resolve()
    if not (root / "mlflow.db").is_file():
        small_sweep(root)
    from mlflow.tracking import MlflowClient

    from sweep.results import tracking

    client = MlflowClient(tracking.default_uri(root))
    exp = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    parent = client.search_runs([exp], "tags.`hyper.kind` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = ui_url(port=args.port)
    ui = subprocess.Popen([sys.executable, "-m", "sweep.ui", "--root", str(root), "--port",
                           str(args.port)], cwd=REPO, start_new_session=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_for(host)
        shoot(browser, front_url(exp, host), out / "front.png", args.wait_ms)
        shoot(browser, run_url(exp, parent.info.run_id, host) + "/artifacts/report.html?"
              "workflowType=machine_learning", out / "report.png", args.wait_ms)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # the UI we started and its workers, nothing else
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
