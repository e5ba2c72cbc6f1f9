"""A sweep's local journal of measured trials, `<root>/sweeps/<name>/rows/<run id>.json`: each
trial's MLflow record (`rows.record`, with its run id, trial key and sweep) is written here
before it is logged, so a measurement outlives a tracking store that fails (a full disk, an
sqlite lock outlasting the retries, a server down). `tracking.reconcile` logs what MLflow lacks
at the end of the sweep and on `--resume`. Pure: the standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DIR = "rows"  # under the sweep's folder


def plain(value):
    """numpy scalars (a transcript's latency) as Python numbers; anything else as text."""
    return value.item() if hasattr(value, "item") else str(value)


def save(folder, record: dict) -> Path:
    """Write `record` (keys `run_id`, `trial_key`, `sweep` and `rows.record`'s) whole or not at
    all: a reader never sees half a file."""
    path = Path(folder) / f"{record['run_id']}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, default=plain), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load(folder) -> tuple[list[dict], list[str]]:
    """The folder's records, and one problem per file that is not one (never raises)."""
    records, problems = [], []
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            missing = {"run_id", "trial_key", "sweep", "metrics", "tags", "tables", "end"} - set(
                rec)
            if missing:
                raise ValueError(f"no {', '.join(sorted(missing))}")
            records.append(rec)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {type(e).__name__}: {e}")
    return records, problems
