"""`python -m sweep.ui`: the MLflow UI for HYPER's tracking store, on loopback by default
(`tracking.UI_HOST`, `UI_PORT`: the address the launcher's links point to)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .results.tracking import UI_HOST, UI_PORT, default_uri, ui_url


def command(root: Path, host: str, port: int, uri: str | None = None) -> list[str]:
    uri = uri or default_uri(root)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", (root / "artifacts").resolve().as_uri(),
            "--host", host, "--port", str(port), "--workers", "1"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.ui", description=__doc__)
    ap.add_argument("--root", default="mlruns", help="the sweep root holding mlflow.db")
    ap.add_argument("--tracking-uri", default=None,
                    help="backend store (default: <root>/mlflow.db)")
    ap.add_argument("--host", default=UI_HOST,
                    help="interface to listen on; 0.0.0.0 exposes every run to the network")
    ap.add_argument("--port", type=int, default=UI_PORT, help="port")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    if args.tracking_uri is None and not (root / "mlflow.db").is_file():
        print(f"error: no tracking store at {root / 'mlflow.db'}: run a sweep first "
              "(python -m sweep.launch) or pass --root/--tracking-uri", file=sys.stderr)
        return 2
    cmd = command(root, args.host, args.port, args.tracking_uri)
    print(f"MLflow UI on {ui_url(args.host, args.port)} (Ctrl-C stops it)", file=sys.stderr)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    raise SystemExit(main())
