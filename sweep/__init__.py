"""HYPER: find the fastest Whisper that is still accurate enough.

The evaluation core (models, data, recipe, compress, scoring, evaluate) imports neither Ray nor
MLflow, so it runs on a bare GPU machine with only torch and transformers.
"""

import os

from . import console
from .inputs import machine

__version__ = "0.1.0"
console.install()  # before torch, transformers or torchao load, in every process (Ray's too)
# torch.compile's cache per CPU and ISA caps (inherited by Ray's workers and subprocesses):
# the shared default mixed kernels compiled under other caps, which corrupted the heap
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(machine.inductor_cache_dir()))


def load(path, device=None):
    """An exported checkpoint (`python -m sweep.export`): `.model`, `.processor`, `.recipe`.
    Lazy, so `import sweep` stays light; see `sweep.ship.checkpoint.load`."""
    from .ship.checkpoint import load as _load

    return _load(path, device=device)
