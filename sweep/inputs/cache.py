"""Converted models cached on disk (`$HYPER_CACHE`, default ~/.cache/hyper): directories
built aside and renamed into place, valid only with their manifest, shared read-only."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from sweep import __version__

logger = logging.getLogger(__name__)
MANIFEST = "hyper-cache.json"  # written last: a cache dir without it is partial


def root(cache_dir) -> Path:
    root = cache_dir or os.environ.get("HYPER_CACHE") or Path.home() / ".cache" / "hyper"
    return Path(root).expanduser()


@contextmanager
def atomic_dir(final: Path):
    """Build in a temp dir beside `final`, then rename: a killed build never looks complete."""
    if final.exists() and not valid(final):
        discard(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.tmp-*"):  # left by killed builds; an hour
        if time.time() - old.stat().st_mtime > 3600:  # old, so no live build still owns it
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files, "hyper": __version__}))
        for p in tmp.iterdir():  # save_pretrained writes 0600; caches are shared read-only
            p.chmod(0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(final)
        except OSError:  # a concurrent process won the race; its copy is as good as ours
            if not valid(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def valid(path: Path) -> bool:
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        return all((path / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def discard(path: Path) -> None:
    # Rename first so a concurrent reader never sees a half-deleted directory.
    trash = path.with_name(f".{path.name}.bad-{os.getpid()}-{time.monotonic_ns()}")
    try:
        path.rename(trash)
    except OSError:
        return
    logger.warning("discarded invalid cache %s", path)
    shutil.rmtree(trash, ignore_errors=True)
