"""One saved sweep spec: the options a sweep was launched with, written once at launch (as
`<root>/sweeps/<name>/hyper.json` and as the parent run's `spec` param), read back by
`--resume` and by `sweep.export`. Pure: no Ray, MLflow or torch.

Sweeps saved before the spec existed still read: their `hyper.json` (the launcher's options as
a plain dict) loads as a spec, and `export` rebuilds the fields it needs from the parent run's
`data.<key>`, `model`, `numbers` and `warmup` params.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = "hyper.json"  # beside Tune's experiment state
DATA_KEYS = ("dataset", "config", "split", "audio_column", "text_column", "max_samples",
             "language")
# A sweep's name becomes a folder (<root>/sweeps/<name>), an Optuna study and a value in MLflow
# filter strings: letters, digits and . _ - only (a quote broke the filters, a slash the path)
NAME_RULE = "1 to 100 of the characters A-Z a-z 0-9 . _ -, not starting with . or -"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def check_name(value: str, flag: str) -> str:
    """`value` of `--name` or `--resume` (`flag`) if it is a safe sweep name, else a ValueError
    naming the flag, the value and the rule."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"`{flag}` must be {NAME_RULE}, got {value!r}")
    return value


def default_name(space: str, stamp: str) -> str:
    """`<space>-<stamp>` from a space's name or file, its other characters made `-`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(space).stem).lstrip(".-") or "sweep"
    return f"{stem[:80]}-{stamp}"


@dataclass(frozen=True)
class SweepSpec:
    """`python -m sweep.launch`'s options (defaults as its CLI's: a test keeps them equal)."""

    name: str
    space: str = "quick"
    model: str = "embedded:whisper-base"
    dataset: str = "embedded"
    config: str | None = None
    split: str = "test"
    audio_column: str = "audio"
    text_column: str = "text"
    max_samples: int | None = None
    language: str | None = None
    numbers: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    num_samples: int = 8
    time_budget: float | None = None
    max_concurrent: int = 1
    cpus_per_trial: int | None = None
    sampler: str = "local"
    seed: int = 0
    root: str = "mlruns"
    tracking_uri: str | None = None
    address: str | None = None
    eval_dataset: str | None = None
    out: str | None = None
    profile: int = 0  # --profile: each trial's top operators by self time in MLflow (0: off)
    warmup: int = 1
    trial_timeout: float | str | None = "auto"  # seconds, auto, or None (off)
    max_slowdown: float | None = 3.0
    early_stop: str = "auto"
    early_stop_min_clips: int = 4
    rungs: str | None = None
    screen: str = "auto"
    screen_clips: int = 8
    screen_from: str | None = None  # an earlier sweep's screening, read instead of measured
    probes: bool = True

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        """Keys it does not know are left out (an old `hyper.json` holds `resume`, `inject`);
        missing ones take their defaults."""
        if not d.get("name"):
            raise ValueError(f"a sweep spec needs its `name`, got {d.get('name')!r}")
        return cls(**{k: d[k] for k in cls.fields() if k in d})

    @classmethod
    def from_args(cls, args, name: str) -> SweepSpec:
        return cls.from_dict({**vars(args), "name": name})

    def data(self) -> dict[str, Any]:
        """The data options (`cli.load_data`'s namespace)."""
        return {k: getattr(self, k) for k in DATA_KEYS}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, sweep_dir: Path) -> Path:
        path = Path(sweep_dir) / FILE
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepSpec:
        """The spec saved in a sweep's folder; the folder's name when an old file lacks one."""
        path = Path(sweep_dir) / FILE
        return cls.from_dict({**json.loads(path.read_text(encoding="utf-8")),
                              "name": Path(sweep_dir).name})

    @classmethod
    def from_params(cls, params: dict[str, str], name: str) -> SweepSpec:
        """The spec of a sweep's parent run: its `spec` param; for a sweep logged before
        there was one, the options its params hold (MLflow keeps text: coerced by field)."""
        if "spec" in params:
            return cls.from_dict({**json.loads(params["spec"]), "name": name})
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        got = {}
        for key in (*DATA_KEYS, "model", "numbers", "warmup"):
            text = next((params[n] for n in (f"data.{key}", key) if n in params), None)
            if text is not None:
                got[key] = None if text == "None" else (
                    int(text) if types[key].startswith("int") else text)
        return cls.from_dict({**got, "name": name})
