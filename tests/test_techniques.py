"""The technique registry: every technique is one module, `active` is derived (a recipe that
changes something is never measured as the baseline), and a technique defined outside HYPER
flows through the whole pipeline with no other file edited."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from sweep.measure import decode
from sweep.measure.compress import Context, apply_recipe
from sweep.techniques.recipe import PARAMS, Recipe, RecipeError
from sweep.techniques import TECHNIQUES, load_plugins

TOY = Path(__file__).with_name("toy_technique.py")


def _non_defaults(p) -> list:
    """A few values of a parameter other than its default."""
    if p.kind in ("choice", "bool"):
        vals = list(p.choices or (True, False))
    else:
        lo = p.lo if p.lo is not None else p.default - 1
        hi = p.hi if p.hi is not None else p.default + 1
        vals = [lo, (lo + hi) / 2, hi] if p.kind == "float" else [int(lo), int((lo + hi) // 2),
                                                                  int(hi)]
        vals = [v for v in vals if p.validate(v) is None]
    return [v for v in vals if v != p.default][:8]


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_non_default_value_is_never_measured_as_the_baseline(tiny_model):
    """For every registered technique and parameter: a recipe setting that one value is either
    not the baseline, or really changes nothing. The technique's own `apply` (run even though it
    reports inactive) leaves every weight as it was, and its decoding options are the default
    ones. So a lever whose technique forgets to say it is on can no longer be measured as the
    baseline."""
    base_state, checked, inert = _state(tiny_model), 0, []
    for name, p in PARAMS.items():
        if name == "device":
            continue
        prefix = name.split(".", 1)[0]
        for value in _non_defaults(p):
            try:
                recipe = Recipe.from_flat({name: value})
            except RecipeError:  # needs another value too (cuda, the greedy loop...)
                continue
            checked += 1
            cfg = getattr(recipe, prefix)
            if not recipe.is_baseline:
                assert cfg.active and recipe.describe() != "fp32", (name, value)
                continue
            inert.append(f"{name}={value}")
            model = copy.deepcopy(tiny_model)
            cfg.apply(model, Context(recipe, calibrate=None))
            after = _state(model)
            assert after.keys() == base_state.keys(), (name, value)
            assert all(torch.equal(after[k], base_state[k]) for k in after), (name, value)
            fields = cfg.decoding()
            default = decode.Plan.default()
            assert all(getattr(default, k) == v for k, v in fields.items()
                       if k != "loop") and fields.get("loop", "generate") == "generate", (
                name, value, fields)
    assert checked > 40
    # the inert settings are refinements of an off technique, nothing else
    assert inert and all(i.split(".")[0] in ("prune", "struct", "quant", "encoder",
                                                    "lowrank", "segment")
                         for i in inert), inert


@pytest.fixture()
def toy(monkeypatch):
    """The toy technique registered as a user would: by $HYPER_TECHNIQUES (Ray's workers read
    it too); unregistered afterwards so other tests see the built-in registry."""
    monkeypatch.setenv("HYPER_TECHNIQUES", str(TOY))
    load_plugins()
    yield TECHNIQUES["toy"]
    cls = TECHNIQUES.pop("toy")
    for name in cls.PARAMS:
        PARAMS.pop(name, None)
    sys.modules.pop("hyper_plugin_toy_technique", None)


def test_plugin_errors_name_the_variable(tmp_path):
    with pytest.raises(RecipeError, match="HYPER_TECHNIQUES.*no such file"):
        load_plugins(str(tmp_path / "missing.py"))
    with pytest.raises(RecipeError, match="HYPER_TECHNIQUES.*nosuch_module_xyz"):
        load_plugins("nosuch_module_xyz")


def test_toy_technique_flows_through_the_whole_pipeline(toy, tmp_path, tiny_checkpoint,
                                                        small_manifest, capsys):
    """YAML validation, Optuna sampling, the trial in a Ray worker, MLflow params, the front,
    export (baked weights, decoding option) and sweep.load, with no HYPER file edited."""
    import ray
    from mlflow.tracking import MlflowClient

    import sweep
    from sweep import export, launch
    from sweep.results import tracking
    from sweep.search.space import SpaceError, space_from_dict

    with pytest.raises(SpaceError, match="toy.scale"):  # validated like any parameter
        space_from_dict({"params": {"toy.scale": {"float": [0.5, 9.0]}}})
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  toy.scale: {choice: [1.0, 2.0]}\n"
                     "  toy.max_tokens: {choice: [0, 3]}\n"
                     "starts:\n  - {toy.scale: 2.0, toy.max_tokens: 3}\n")
    root = tmp_path / "root"
    ray.shutdown()
    try:
        assert launch.main(["--space", str(space), "--model", tiny_checkpoint, "--dataset",
                            small_manifest, "--root", str(root), "--name", "toy",
                            "--num-samples", "3", "--max-slowdown", "0", "--seed", "0"]) == 0
    finally:
        ray.shutdown()
    uri = tracking.default_uri(root)
    runs = [r for r in MlflowClient(uri).search_runs(
        [tracking.ensure_experiment(uri, root / "artifacts")])
        if r.data.tags.get("hyper.kind") == "trial"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs), [
        r.data.tags.get("error") for r in runs]
    assert all({"toy.scale", "toy.max_tokens"} <= set(r.data.params) for r in runs)
    start = next(r for r in runs if r.data.params["toy.max_tokens"] == "3"
                 and r.data.params["toy.scale"] == "2.0")
    # the decoding option reached the worker's transcription: at most 3 tokens per clip
    table = json.loads((Path(start.info.artifact_uri.removeprefix("file://"))
                        / "transcripts.json").read_text())
    tokens = table["data"][0][table["columns"].index("tokens")] if "data" in table else None
    assert tokens is not None and tokens <= 3, table
    out = root / "sweeps" / "toy" / "results"
    assert "toy.scale" in (out / "trials.csv").read_text().splitlines()[0]
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert front and all("toy.scale" in r["recipe"] for r in front)

    capsys.readouterr()
    ck_dir = tmp_path / "ck"
    assert export.main(["--root", str(root), "--run", start.info.run_id, "--out", str(ck_dir),
                        "--verify", "--no-log"]) == 0, capsys.readouterr()
    assert "differing from the trial's: 0 of" in capsys.readouterr().out
    info = json.loads((ck_dir / "recipe.json").read_text())
    assert info["baked"] == ["toy"] and info["reapplied"] == []
    ck = sweep.load(ck_dir)
    assert ck.recipe.toy == toy(scale=2.0, max_tokens=3)
    assert ck.options.max_new_tokens == 3
    from sweep.inputs.models import load_model

    base = load_model(tiny_checkpoint).model.model.decoder.layer_norm.weight
    assert torch.allclose(ck.model.model.decoder.layer_norm.weight, 2 * base)
    assert "toy x2" in (ck_dir / "README.md").read_text()


def test_toy_apply_and_options_without_a_sweep(toy, tiny_model):
    applied = apply_recipe(copy.deepcopy(tiny_model), Recipe.parse("toy.max_tokens=5"))
    assert applied.options.max_new_tokens == 5 and "at most 5 tokens" in applied.options.describe()
    assert not Recipe.parse("toy.max_tokens=5").is_baseline  # no `canonical`: any change counts
    with pytest.raises(RecipeError, match="decoding option `max_new_tokens` is set by both"):
        decode.plan_for(_Both())


class _Both:
    """Two techniques setting one decoding option apart."""

    def configs(self):
        a, b = TECHNIQUES["toy"](max_tokens=3), TECHNIQUES["toy"](max_tokens=4)
        return [a, b]


@pytest.mark.parametrize("command", [["sweep.evaluate", "--recipe", "quant.scheme=bf16"],
                                     ["sweep.launch", "--space", "quick"]])
def test_bad_plugin_variable_is_one_clear_error_not_a_traceback(command, tmp_path):
    import os
    import subprocess

    env = {**os.environ, "HYPER_TECHNIQUES": str(tmp_path / "missing.py")}
    proc = subprocess.run([sys.executable, "-m", *command, "--root", str(tmp_path)]
                          if command[0] == "sweep.launch" else [sys.executable, "-m", *command],
                          env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "`HYPER_TECHNIQUES` must list importable modules or .py files" in proc.stderr
