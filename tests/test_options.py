"""A sweep option is one field of `SweepOptions`: its flag, help, check, saved spec, the workers'
context and the parent run's params all follow from it. And `MeasureOptions` is what
`run_trial` is told, whole."""

import json
from dataclasses import dataclass

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from sweep import launch  # noqa: E402
from sweep.options import at_least, option  # noqa: E402
from sweep.results import tracking  # noqa: E402
from sweep.search.sweepspec import FILE, SweepOptions  # noqa: E402


@dataclass(frozen=True)
class Knobbed(SweepOptions):
    """The sweep's options and one more: nothing else is written for it."""

    knob_level: int = option(3, "a knob only this test has", check=at_least(1))


class _Stop(Exception):
    """Raised where Tune would start: everything the launcher does before it has happened."""


SPACE = "params:\n  prune.rate: {float: [0.0, 0.5], step: 0.25}\n"


def test_a_new_field_is_a_flag_a_check_a_saved_option_a_worker_setting_and_a_param(
        tmp_path, tiny_checkpoint, small_manifest, monkeypatch, capsys):
    from ray import tune

    from sweep.search import sampler

    monkeypatch.setattr(launch, "SweepOptions", Knobbed)
    text = launch.build_parser().format_help()
    assert "--knob-level KNOB_LEVEL" in text and "a knob only this test has" in text

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    root = tmp_path / "root"
    argv = ["--space", str(space), "--model", tiny_checkpoint, "--dataset", small_manifest,
            "--root", str(root), "--name", "k", "--num-samples", "0", "--screen", "off",
            "--knob-level", "7"]
    # its check runs with the others, before anything starts
    assert launch.main([*argv[:-1], "0"]) == 2
    assert "`--knob-level` must be >= 1, got 0" in capsys.readouterr().err
    assert not root.exists()

    seen = {}
    monkeypatch.setattr(sampler, "init_ray", lambda address: {"CPU": 2})  # no Ray needed
    monkeypatch.setattr(tune, "with_parameters", lambda fn, ctx: seen.setdefault("ctx", ctx))
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)

    def tuner(*a, **k):
        raise _Stop

    monkeypatch.setattr(tune, "Tuner", tuner)
    with pytest.raises(_Stop):
        launch.run(launch.parse_args(argv))

    saved = json.loads((root / "sweeps" / "k" / FILE).read_text())
    assert saved["knob_level"] == 7
    assert Knobbed.load(root / "sweeps" / "k").knob_level == 7  # what --resume reads back
    assert seen["ctx"].options.knob_level == 7  # what every worker is given
    client = MlflowClient(tracking.default_uri(root))
    exp = client.get_experiment_by_name("hyper").experiment_id
    (parent,) = [r for r in client.search_runs([exp]) if r.data.tags.get("hyper.kind") == "sweep"]
    assert parent.data.params["knob_level"] == "7"
    assert json.loads(parent.data.params["spec"])["knob_level"] == 7
    assert parent.info.status == "FAILED"  # what broke after the parent began ended it


def test_options_checked_return_new_values_and_leave_the_given_ones():
    opts = SweepOptions(trial_timeout="off", dataset="embedded")
    checked = opts.checked()
    assert checked.trial_timeout is None and opts.trial_timeout == "off"
    with pytest.raises(ValueError, match=r"`--screen-clips` must be >= 2 \(a paired test needs "
                                         r"two\), got 1"):
        SweepOptions(screen_clips=1).checked()
    with pytest.raises(ValueError, match="`--trial-timeout` must be auto, off or seconds > 0"):
        SweepOptions(trial_timeout="soon").checked()


def test_the_spec_holds_the_saved_fields_and_the_params_name_the_data_keys():
    spec = SweepOptions(resume="old", verbose=True, max_samples=5).spec("s")
    assert (spec.name, spec.resume, spec.verbose) == ("s", None, False)  # per launch: not saved
    assert "resume" not in json.loads(spec.to_json()) and "verbose" not in spec.params()
    params = spec.params()
    assert params["data.max_samples"] == 5 and "max_samples" not in params
    assert params["warmup"] == 1 and params["model"] == spec.model


def test_worker_measures_with_the_sweeps_options():
    from sweep.measure.evaluate import MeasureOptions
    from sweep.search import worker
    from sweep.search.space import space_from_dict

    space = space_from_dict({"params": {"prune.rate": {"float": [0.0, 0.5]}},
                             "constraints": {"max_dwer": 0.1}})
    opts = SweepOptions(warmup=0, language="ru", numbers="words", max_slowdown=2.0,
                        rungs="0.5", early_stop="on").checked()
    ctx = worker.SweepContext.for_sweep(opts, space, sweep="s", tracking_uri="u",
                                        experiment_id="e", parent_run_id="p", cpus_per_trial=2)
    how = ctx.measure_options(2)
    assert isinstance(how, MeasureOptions)
    assert (how.language, how.numbers, how.warmup, how.threads, how.max_slowdown, how.rungs) == (
        "ru", "words", 0, 2, 2.0, (0.5,))
    assert how.early_stop.max_dwer == 0.1 and ctx.options is opts
    assert ctx.data == opts.data()
