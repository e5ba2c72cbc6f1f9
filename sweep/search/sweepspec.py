"""The sweep's options (`SweepOptions`: one field per option of `python -m sweep.launch`) and
its saved spec: the options a sweep was launched with, written once at launch (as
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

from ..options import Options, at_least, option
from . import worker

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


# --screen auto: screening costs about as much as a dozen trials, worth it on a large space
# with a long search, not on a short one
SCREEN_DIMS, SCREEN_SAMPLES = 12, 20


def _samplers() -> tuple[str, ...]:
    from .sampler import SAMPLERS  # Optuna and Ray: read only when a parser is built

    return SAMPLERS


def _timeout(value, flag: str):
    return worker.parse_timeout(value)  # raises naming --trial-timeout and what it allows


def _rungs(value, flag: str):
    from ..measure.stopping import parse_rungs

    parse_rungs(value)  # raises naming the rule; the spec keeps the text the command was given
    return value


def _absolute(value, flag: str):
    from ..inputs.data import absolute

    return absolute(value)  # Ray workers run in other directories: no relative manifest path


def _data(key: str, default, help: str = "", **kw):
    """A model or data option: its flag is `cli.add_model_data_args`'s (shared with
    `sweep.evaluate`), its param `data.<key>` for the data keys."""
    return option(default, help or f"see `{key}` in sweep.inputs.cli", cli=False,
                  param=f"data.{key}" if key in DATA_KEYS else None, **kw)


@dataclass(frozen=True)
class SweepOptions(Options):
    """`python -m sweep.launch`'s options, one field each: the field generates the flag and its
    help, checks the value, is saved in the spec (`hyper.json`, the `spec` param), reaches the
    workers (`SweepContext.options`) and is one of the parent run's params. The saved spec is
    these options with `name` resolved (`SweepSpec`)."""

    space: str = option("quick", "search space: a name in search_spaces/ (quick, cpu, gpu, "
                        "full) or a path to your own YAML")
    num_samples: int = option(8, "trials to sample, plus the baseline which always runs first",
                              check=at_least(0))
    time_budget: float | None = option(None, "stop starting trials after this many seconds")
    max_concurrent: int = option(1, "trials measured at once (each gets --cpus-per-trial CPUs)",
                                 check=at_least(1))
    cpus_per_trial: int | None = option(None, "CPUs (= torch threads) per CPU trial (default: "
                                        "all CPUs / --max-concurrent)")
    sampler: str = option("local", "Optuna sampler: local (mostly single changes to members of "
                          "the feasible front, TPE for the rest), multi-objective TPE, NSGA-II "
                          "or random search", choices=_samplers)
    seed: int = option(0, "sampler seed")
    name: str | None = option(None, "sweep name (default: <space>-<time>)")
    root: str = option("mlruns", "where the tracking store, Optuna study and sweep folders live")
    tracking_uri: str | None = option(None, "MLflow tracking URI (default "
                                      "sqlite:///<root>/mlflow.db; a shared server is required "
                                      "on a multi-node cluster)")
    address: str | None = option(None, "join this Ray cluster (ray start --head) instead of a "
                                 "local Ray")
    eval_dataset: str | None = option(None, "re-measure the front on this second data set at "
                                      "the end")
    out: str | None = option(None, "folder for the front's files (default "
                             "<root>/sweeps/<name>/results)")
    warmup: int = option(1, "untimed passes before timing")
    profile: int = option(0, "after each trial, profile its transcription of a few clips "
                          "(torch.profiler) and log the TOP operators by self CPU time as the "
                          "run's profile.txt/profile.json in MLflow (TOP default 20; 0: off)",
                          const=20, metavar="TOP", check=at_least(0, " operators (0: off)"))
    trial_timeout: float | str | None = option(
        "auto", "seconds after which a trial is stopped and recorded as failed; auto: "
        f"{worker.AUTO_TIMEOUT_FACTOR:g}x the baseline's seconds for the set, at least "
        f"{worker.AUTO_TIMEOUT_MIN_S:g} s; off: never", type=str, check=_timeout)
    max_slowdown: float | None = option(3.0, "stop (prune) a trial whose first clips take this "
                                        "many times the baseline's; 0 measures every trial to "
                                        "the end")
    early_stop: str = option("auto", "stop a trial once it clearly cannot be feasible (its dWER "
                             "interval is above the space's max_dwer, or it loops on most "
                             "clips); auto: on when the space has max_dwer",
                             choices=("auto", "on", "off"))
    early_stop_min_clips: int = option(4, "clips measured before the first early-stop check "
                                       "(then at 2x, 4x, ...)", check=at_least(1))
    rungs: str | None = option(None, "successive halving inside each trial: after these shares "
                               "of the set (e.g. 0.25,0.5) a trial goes on only if no trial "
                               "that measured the whole set beats it on both dWER and speed-up "
                               "there, and its dWER is within max_dwer; stopped ones are pruned "
                               "(default: off)", metavar="SHARES", check=_rungs)
    screen: str = option("auto", "before the joint search, measure each dimension's values "
                         "alone (from the baseline and the best warm start, on --screen-clips "
                         "clips) and drop what is out of reach of the budget; auto: on for "
                         f"spaces of more than {SCREEN_DIMS} searched parameters when "
                         f"--num-samples >= {SCREEN_SAMPLES}", choices=("auto", "on", "off"))
    screen_from: str | None = option(None, "use an earlier sweep's screening (its folder or "
                                     "screen/screen.json, same space, machine and data) instead "
                                     "of screening again; implies --screen on", metavar="PATH")
    screen_clips: int = option(8, "clips each screening point is measured on (the first ones)",
                               check=at_least(2, " (a paired test needs two)"))
    probes: bool = option(True, "skip the non-speech hallucination probes after each trial's "
                          "clips")
    # how this launch runs, not what the sweep is: a --resume may choose them again
    resume: str | None = option(None, "continue a killed sweep by name: finished trials are "
                                "kept, unfinished ones run again", metavar="SWEEP", saved=False)
    verbose: bool = option(False, "show third-party output HYPER filters as known noise "
                           "(torchao, torch, Optuna, Tune's console) on this machine and in the "
                           "workers", saved=False)
    # the model and data (defaults as `cli.add_model_data_args`'s: a test keeps them equal)
    model: str = _data("model", "embedded:whisper-base")
    dataset: str = _data("dataset", "embedded", check=_absolute)
    config: str | None = _data("config", None)
    split: str = _data("split", "test")
    audio_column: str = _data("audio_column", "audio")
    text_column: str = _data("text_column", "text")
    max_samples: int | None = _data("max_samples", None)
    language: str | None = _data("language", None)
    numbers: str = _data("numbers", "auto")
    device: str = _data("device", "cpu")
    threads: int | None = _data("threads", None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        """Keys it does not know are left out (an old `hyper.json` holds `resume`, `inject`);
        missing ones take their defaults."""
        if not d.get("name"):
            raise ValueError(f"a sweep spec needs its `name`, got {d.get('name')!r}")
        return cls(**{k: d[k] for k in cls.fields() if k in d})

    @classmethod
    def from_args(cls, args, name: str) -> SweepSpec:
        """The spec of a parsed command line (or options), named `name`."""
        return cls.from_dict({**{k: getattr(args, k) for k in cls.fields() if hasattr(args, k)},
                              "name": name})

    def spec(self, name: str) -> SweepSpec:
        """What is saved of these options, `name` resolved (the per-launch fields at their
        defaults, as `load` reads them back)."""
        return self.from_args(self, name)

    def data(self) -> dict[str, Any]:
        """The data options (`cli.load_data`'s namespace)."""
        return {k: getattr(self, k) for k in DATA_KEYS}

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


# The saved spec is the options themselves, `name` resolved: never a twin kept equal by hand.
SweepSpec = SweepOptions
