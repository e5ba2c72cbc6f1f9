"""sweep.search.space: shipped spaces load, bad spaces are refused with every error, sampling obeys
conditions and the available devices, baseline and constraint values."""

import math
import textwrap

import optuna
import pytest
import yaml

from sweep.search import space as sp
from sweep.techniques.recipe import PARAMS, Recipe
from sweep.search.space import SpaceError, load_space, space_from_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)
SHIPPED = sp.available_spaces()
CUDA_ONLY = {(name, v) for name, p in PARAMS.items() for req in p.requires
             if req.key == "device" and req.equals == "cuda" for v in req.values}


def from_yaml(text: str, source="bad.yaml"):
    return space_from_dict(yaml.safe_load(textwrap.dedent(text)), source=source)


def refused(text: str) -> list[str]:
    with pytest.raises(SpaceError) as info:
        from_yaml(text)
    assert str(info.value).count("\n  - ") == len(info.value.errors)
    return info.value.errors


def run_study(space, devices, n=40, sampler=None):
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        flat = space.sample(trial, devices=devices)
        out.append((flat, dict(trial.params)))
        study.tell(trial, [0.5 + 0.01 * len(out) % 7, 1.0 / len(out)])
    return out


def test_shipped_spaces_are_there():
    assert {"quick", "cpu", "gpu", "full"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_loads_and_samples_valid_recipes(name):
    space = load_space(name)
    assert space.name == name and space.source.endswith(f"search_spaces/{name}.yaml")
    assert space.objectives == (("wer", "min"), ("throughput", "max") if name == "long" else (
        "latency_median_s", "min"))
    assert Recipe.from_flat(space.baseline()).is_baseline
    assert name in space.describe()
    for devices in ({"cpu"}, {"cpu", "cuda"}):
        if space.params.get("device") and not any(
                space.params["device"].contains(d) for d in devices):
            continue
        for flat, _ in run_study(space, devices, n=25):
            recipe = Recipe.from_flat(flat)  # the recipe accepts every sampled point
            assert recipe.device in devices


def test_max_autotune_only_where_it_belongs():
    for name in ("quick", "cpu"):
        assert not load_space(name).mentions("max-autotune")
        assert not load_space(name).mentions("cuda")
    for name in ("gpu", "full"):
        assert load_space(name).mentions("max-autotune")
        assert load_space(name).mentions("cuda")
    assert load_space("cpu").mentions("static_int8")
    assert not load_space("quick").mentions("static_int8")
    assert load_space("quick").mentions("prune.rate")
    # the levers that paid on every CPU class (#25)
    quick = load_space("quick")
    assert quick.mentions("int8_token") and quick.mentions("script") and quick.mentions("auto")


def test_four_mistakes_four_messages():
    errors = refused("""
        params:
          prune.rtae: {float: [0.0, 0.5]}
          struct.ffn_rate: {float: [0.6, 0.2]}
          quant.scheme: {choice: [none, int4]}
          compile.mode: {choice: [none, default]}
        objectives: {wer: min, latency_median_s: min}
        constrains: {max_dwer: 0.02}
        """)
    assert len(errors) == 4, errors
    text = "\n".join(errors)
    assert all(e.startswith("bad.yaml: ") for e in errors)
    assert "params.prune.rtae: unknown parameter; did you mean `prune.rate`?" in text
    assert "params.struct.ffn_rate.float: lo > hi in [0.6, 0.2]" in text
    assert "params.quant.scheme.choice" in text and "'int4'" in text and "bnb_nf4" in text
    assert "constrains: unknown top-level key; did you mean `constraints`?" in text


@pytest.mark.parametrize("body, needle", [
    ("params: {prune.rate: {float: [0.0, 1.5]}}", "hi=1.5 is outside `prune.rate`'s range"),
    ("params: {prune.rate: {float: [0.0, 1.0]}}", "hi=1 is outside"),  # hi is open
    ("params: {prune.rate: {float: [0.0, 0.5], log: true}}", "log scale needs lo > 0"),
    ("params: {prune.rate: {float: [0.1, 0.5], step: 0.1, log: true}}", "step cannot be"),
    ("params: {prune.rate: {float: [0.0, 0.5], step: 0.2}}", "not a whole number of steps"),
    ("params: {prune.rate: {float: [0.0, 0.5], stepp: 0.1}}", "did you mean `step`?"),
    ("params: {prune.rate: {int: [0, 1]}}", "is a float parameter"),
    ("params: {quant.scheme: {float: [0, 1]}}", "is a choice parameter"),
    ("params: {prune.rate: {range: [0, 1]}}", "needs exactly one of float, int, choice, value"),
    ("params: {prune.rate: 0.3}", "must be one of {float: [lo, hi]}"),
    ("params: {quant.scheme: {choice: [none, none]}}", "listed twice"),
    ("params: {quant.scheme: {value: int3}}", "params.quant.scheme.value"),
    ("params: {prune.pattern: {choice: [unstructured, 2:4]}, device: {value: cuda}}",
     'YAML read an unquoted 2:4 as 124: write "2:4"'),
    ("params: {}", "must be a non-empty mapping"),
    ("description: x", "params: missing"),
    ("params: {prune.rate: {value: 0.1}}\nobjectives: {wer: min, speed: max}",
     "objectives.speed: unknown metric"),
    ("params: {prune.rate: {value: 0.1}}\nobjectives: {wer: down}", "min or max"),
    ("params: {prune.rate: {value: 0.1}}\nconstraints: {max_wer: 0.1}",
     "did you mean `max_dwer`?"),
    ("params: {prune.rate: {value: 0.1}}\nconstraints: {min_speedup: fast}", "must be a number"),
    # conditions
    ("params: {quant.enc_mlp: {choice: [inherit, bf16]}}\n"
     "conditions: {quant.enc_mlp: {param: quant.shceme, in: [bf16]}}",
     "unknown parent parameter `quant.shceme`; did you mean `quant.scheme`?"),
    ("params: {quant.enc_mlp: {choice: [inherit, bf16]}, quant.scheme: {choice: [none, bf16]}}\n"
     "conditions: {quant.enc_mlp: {param: quant.scheme, in: [dynamic_int8]}}",
     "'dynamic_int8' is not a value parent `quant.scheme` can take here"),
    ("params: {quant.enc_mlp: {choice: [inherit, bf16]}}\n"
     "conditions: {quant.enc_mlp: {param: quant.scheme, in: [bf16]}}",
     "parent `quant.scheme` is not under params"),
    ("params: {quant.enc_mlp: {choice: [inherit, bf16]}, quant.scheme: {choice: [none, bf16]}}\n"
     "conditions: {quant.enc_mlp: {param: quant.scheme, in: [bf16], when: 1}}",
     "conditions.quant.enc_mlp.when: unknown key"),
    ("params: {quant.enc_mlp: {choice: [inherit, bf16]}, quant.scheme: {choice: [none, bf16]}}\n"
     "conditions: {quant.enc_mlp: {param: quant.scheme, in: [bf16]},\n"
     "             quant.scheme: {param: quant.enc_mlp, in: [bf16]}}",
     "conditions form a cycle"),
    ("params: {prune.rate: {float: [0.0, 0.5]}, quant.scheme: {choice: [none, bf16]}}\n"
     "conditions: {prune.rate: {param: quant.scheme, in: [bf16], else: 2}}",
     "conditions.prune.rate.else"),
    # CUDA-only choices where device may (or must) be cpu
    ("params: {quant.scheme: {choice: [none, bnb_int8, bnb_nf4]}}",
     "'bnb_int8', 'bnb_nf4' need device='cuda' (bitsandbytes kernels are CUDA-only), "
     "but device is not searched and stays 'cpu'"),
    ("params: {device: {choice: [cpu, cuda]}, compile.mode: {choice: [none, reduce-overhead]}}",
     "add `conditions: {compile.mode: {param: device, in: [cuda]}}`"),
    ("params: {device: {value: cpu}, prune.pattern: {choice: [unstructured, '2:4']}}",
     "device is fixed to 'cpu'"),
    # a pair of values the recipe refuses together
    ("params: {device: {value: cuda}, prune.pattern: {choice: [unstructured, '2:4']},\n"
     "         prune.rate: {float: [0.0, 0.6], step: 0.1}}",
     "prune.pattern='2:4' with prune.rate=0.1 is refused by the recipe"),
])
def test_bad_space_refused(body, needle):
    errors = refused(body)
    assert any(needle in e for e in errors), errors


def test_parents_first_is_the_one_order_of_the_condition_graph():
    """Loading and the reachability checks order parameters by one topological sort: parents
    before children, else the given order, and each cycle named by the path that closes it."""
    cond = sp.Condition
    chain = {"b": cond("b", "c", (1,)), "c": cond("c", "d", (1,))}
    assert sp.parents_first(["a", "b", "c", "d"], chain) == (["a", "d", "c", "b"], [])
    loop = {"a": cond("a", "b", (1,)), "b": cond("b", "a", (1,))}
    assert sp.parents_first(["a", "b", "x"], loop) == (["b", "a", "x"], [["a", "b", "a"]])


def test_condition_on_a_cuda_parent_is_accepted():
    space = from_yaml("""
        params:
          device: {choice: [cpu, cuda]}
          quant.scheme: {choice: [none, bf16, bnb_int8]}
          quant.head: {choice: [inherit, bnb_nf4]}
          prune.pattern: {choice: [unstructured, "2:4"]}
          prune.rate: {float: [0.0, 0.3], step: 0.1}
        conditions:
          quant.scheme: {param: device, in: [cuda]}
          quant.head: {param: quant.scheme, in: [bnb_int8]}
          prune.pattern: {param: device, in: [cuda]}
          prune.rate: {param: prune.pattern, in: [unstructured], else: 0.5}
        """)
    assert list(space.params)[0] == "device"  # parents first
    assert space.conditions["prune.rate"].otherwise == 0.5


def test_load_space_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("params:\n  prune.rate: {float: [0.0, 0.2], step: 0.1}\n")
    space = load_space(str(path))
    assert space.name == "mine" and list(space.params) == ["prune.rate"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  prune.rtae: {float: [0.0, 0.2]}\n")
    with pytest.raises(SpaceError, match=r"bad\.yaml: params\.prune\.rtae: unknown parameter"):
        load_space(bad)
    with pytest.raises(SpaceError) as info:
        load_space("quik")
    assert "quick" in str(info.value) and "full" in str(info.value)
    assert load_space("quick.yaml").name == "quick"


def test_sample_cpu_only_never_asks_for_cuda():
    space = load_space("full")
    for flat, params in run_study(space, {"cpu"}, n=60):
        assert flat["device"] == "cpu" and "device" not in params  # one choice left: fixed
        for name, value in flat.items():
            assert (name, value) not in CUDA_ONLY, flat
        assert not {"quant.scheme", "compile.mode", "prune.pattern"} & set(flat)
        assert set(params) <= set(flat)
        assert flat["prune.rate"] == pytest.approx(params["prune.rate"])
        assert flat["prune.rate"] == round(flat["prune.rate"], 2)  # 0.15, not 0.15000000000000002
        Recipe.from_flat(flat)


def test_sample_conditions_and_else_with_cuda():
    space = load_space("full")
    rows = run_study(space, {"cpu", "cuda"}, n=120)
    devices = {flat["device"] for flat, _ in rows}
    assert devices == {"cpu", "cuda"}
    two_four = 0
    for flat, params in rows:
        if flat["device"] == "cpu":
            assert "quant.scheme" not in params and "prune.pattern" not in params
        else:
            assert {"quant.scheme", "compile.mode", "prune.pattern"} <= set(params)
        if flat.get("prune.pattern") == "2:4":
            two_four += 1
            assert flat["prune.rate"] == 0.5 and "prune.rate" not in params  # the else value
            assert "prune.norm" not in flat and "prune.scope" not in flat
        else:
            assert "prune.rate" in params and "prune.norm" in params
        assert all(math.isclose(flat[k], round(flat[k], 2)) for k in ("struct.ffn_rate",))
    assert two_four > 0
    # the quick space: overrides only on top of int8, the step only in the greedy loop
    for flat, params in run_study(load_space("quick"), {"cpu"}, n=40):
        assert ("quant.enc_mlp" in params) == (flat["quant.scheme"] == "dynamic_int8")
        assert ("decode.compile" in params) == (flat["decode.loop"] == "greedy")
        assert ("encoder.margin_s" in params) == (flat["encoder.window"] == "auto")
        assert flat["compile.mode"] == "none" and flat["device"] == "cpu"
        assert flat["prune.rate"] in (0.0, 0.1, 0.2, 0.3)


def test_sample_with_tpe_and_constraints_like_the_searcher():
    space = load_space("cpu")
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        sampler = optuna.samplers.TPESampler(seed=1, multivariate=True, group=True,
                                             n_startup_trials=5)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.enqueue_trial(space.baseline())
    for i in range(15):
        trial = study.ask()
        flat = space.sample(trial, devices={"cpu"})
        if i == 0:
            assert flat == space.baseline()
        fake = {"wer": 0.5 + flat["prune.rate"], "dwer": 2 * flat["prune.rate"],
                "latency_median_s": 1.0 - flat["struct.ffn_rate"], "status": "ok"}
        for key, value in zip(space.constraints, space.violation(fake, {"wer": 0.5})):
            trial.set_constraint(key, value)  # optuna 5's replacement for constraints_func
        study.tell(trial, [fake["wer"], fake["latency_median_s"]])
    assert len(study.trials) == 15
    assert study.trials[0].system_attrs  # constraint values stored with the trial


def test_gpu_space_on_a_cpu_cluster_is_refused_at_sample():
    space = load_space("gpu")
    study = optuna.create_study(directions=["minimize", "minimize"])
    with pytest.raises(SpaceError, match="only \\['cpu'\\] are available"):
        space.sample(study.ask(), devices={"cpu"})
    flat = space.sample(study.ask(), devices={"cpu", "cuda"})
    assert flat["device"] == "cuda" and flat["prune.pattern"] == "2:4"
    Recipe.from_flat(flat)


def test_baseline():
    assert load_space("quick").baseline() == {
        "device": "cpu", "quant.scheme": "none", "prune.rate": 0.0, "struct.ffn_rate": 0.0,
        "struct.stacks": "encoder", "compile.mode": "none", "decode.loop": "generate",
        "encoder.window": "full", "decode.no_repeat_ngram": 0}
    gpu = load_space("gpu").baseline()
    assert gpu["device"] == "cuda" and gpu["prune.rate"] == 0.0
    full = load_space("full").baseline()
    assert full["device"] == "cpu" and "quant.scheme" not in full
    # a choice without the default is left for Optuna to sample
    space = from_yaml("params: {quant.scheme: {choice: [dynamic_int8, bf16]}, "
                      "prune.rate: {float: [0.1, 0.3]}}")
    assert space.baseline() == {"prune.rate": 0.0}


def test_violation_values():
    space = from_yaml("""
        params: {prune.rate: {float: [0.0, 0.3]}}
        constraints: {max_dwer: 0.02, max_dcer: 0.05, max_latency_s: 0.5, min_speedup: 1.5}
        """)
    assert list(space.constraints) == ["max_dwer", "max_dcer", "max_latency_s", "min_speedup"]
    metrics = {"wer": 0.55, "cer": 0.2, "dwer": 0.1, "dcer": 0.0, "latency_median_s": 0.4,
               "speedup": 2.0, "status": "ok"}
    assert space.violation(metrics, {"wer": 0.5}) == pytest.approx([0.08, -0.05, -0.1, -0.5])
    assert not space.feasible(metrics, {})
    # dwer/speedup derived from the baseline figures when the row lacks them
    bare = {"wer": 0.5, "cer": 0.2, "latency_median_s": 0.5}
    base = {"wer": 0.5, "cer": 0.2, "latency_median_s": 1.0}
    assert space.violation(bare, base) == pytest.approx([-0.02, -0.05, 0.0, -0.5])
    assert space.feasible(bare, base)
    assert load_space("quick").violation({"dwer": 0.3}) == pytest.approx([0.05])
    assert from_yaml("params: {prune.rate: {value: 0.1}}").violation(metrics) == []



STARTS = """
    params:
      device: {choice: [cpu, cuda]}
      quant.scheme: {choice: [none, bnb_int8]}
      quant.enc_mlp: {choice: [inherit, none, dynamic_int8, bf16]}
      decode.loop: {choice: [generate, greedy]}
      decode.compile: {choice: [none, step]}
      prune.rate: {float: [0.0, 0.5], step: 0.1}
    conditions:
      quant.scheme: {param: device, in: [cuda]}
      decode.compile: {param: decode.loop, in: [greedy]}
"""


def test_starts_fill_the_rest_from_the_baseline_and_skip_missing_devices():
    space = from_yaml(STARTS + """
    starts:
      - {quant.enc_mlp: dynamic_int8, decode.loop: greedy}
      - {device: cuda, quant.scheme: bnb_int8}
    """)
    cpu = space.start_points({"cpu"})
    assert cpu == [{"device": "cpu", "quant.enc_mlp": "dynamic_int8", "decode.loop": "greedy",
                    "decode.compile": "none", "prune.rate": 0.0}]
    both = space.start_points({"cpu", "cuda"})
    assert len(both) == 2 and both[1]["quant.scheme"] == "bnb_int8"
    assert both[1]["quant.enc_mlp"] == "inherit" and "decode.compile" not in both[1]
    for point in both:
        Recipe.from_flat(point)
    # Optuna takes the points as enqueued trials: the sampled recipe is the start
    study = optuna.create_study(directions=["minimize", "minimize"])
    for point in both:
        study.enqueue_trial(point)
    got = [space.sample(study.ask(), devices={"cpu", "cuda"}) for _ in both]
    assert got == both
    assert "start: quant.enc_mlp=dynamic_int8, decode.loop=greedy" in space.describe()


def test_bad_starts_refused_with_every_error():
    errors = refused(STARTS + """
    starts:
      - {quant.enc_mpl: dynamic_int8}
      - {prune.rate: 0.55}
      - {decode.compile: step}
      - {quant.scheme: bnb_int8}
      - []
    """)
    text = "\n".join(errors)
    assert len(errors) == 5, text
    assert "starts[0].quant.enc_mpl: not a parameter of this space; did you mean" in text
    assert "starts[1].prune.rate: must be float [0, 0.5] step 0.1, got 0.55" in text
    assert ("starts[2].decode.compile: set to 'step', but the parameter is sampled only when "
            "decode.loop in ['greedy'] (here decode.loop='generate')") in text
    assert "starts[3].quant.scheme: set to 'bnb_int8', but" in text and "device='cpu'" in text
    assert "starts[4]: must be a non-empty mapping" in text
    assert refused("params: {prune.rate: {float: [0, 0.5]}}\nstarts: {prune.rate: 0.1}") == [
        "bad.yaml: starts: must be a list of partial recipes (mappings), got {'prune.rate': 0.1}"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_starts_are_valid_recipes(name):
    space = load_space(name)
    devices = {"cuda"} if name == "gpu" else {"cpu"}
    points = space.start_points(devices)
    assert len(points) == len(space.starts) >= 1
    for point in points:
        assert Recipe.from_flat(point).device in devices


def test_conditions_the_requires_imply_need_not_be_written():
    """decode.compile/cross_kv need the greedy loop and encoder.compile needs compile.mode=none
    (their Requires): a space listing them without conditions samples them only then, and
    never a recipe the techniques refuse."""
    space = space_from_dict({"params": {
        "decode.loop": {"choice": ["generate", "greedy"]},
        "decode.compile": {"choice": ["none", "step", "script"]},
        "decode.cross_kv": {"choice": ["model", "bf16"]},
        "compile.mode": {"choice": ["none", "default"]},
        "encoder.compile": {"choice": ["none", "freeze"]}}})
    assert {k: (c.parent, c.values) for k, c in space.conditions.items()} == {
        "decode.compile": ("decode.loop", ("greedy",)),
        "decode.cross_kv": ("decode.loop", ("greedy",)),
        "encoder.compile": ("compile.mode", ("none",))}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        flat = space.sample(study.ask())
        Recipe.from_flat(flat)  # valid
        seen.add((flat["decode.loop"], flat.get("decode.compile", "none")))
    assert ("greedy", "script") in seen and ("generate", "none") in seen
    assert not any(loop == "generate" and c != "none" for loop, c in seen)
    # written conditions still win
    own = space_from_dict({"params": {"decode.loop": {"choice": ["generate", "greedy"]},
                                      "decode.compile": {"choice": ["none", "step"]}},
                           "conditions": {"decode.compile": {"param": "decode.loop",
                                                             "in": ["greedy"], "else": "none"}}})
    assert own.conditions["decode.compile"].has_else


def test_slow_schemes_leave_the_space_and_its_starts(monkeypatch, capsys):
    """Kernel-aware narrowing (#25): a scheme the kernel table measured several times slower
    than fp32 here leaves every choice and the warm starts using it, said in one line."""
    from sweep import launch
    from sweep.measure import kernels

    space = load_space("full")
    assert space.mentions("bf16") and any("bf16" in st.values() for st in space.starts)
    speeds = {"bf16": 0.11, "int8_token": None}  # AVX2-only: no bf16 instructions
    asked = []

    def table(schemes, *a, **k):
        asked.append(sorted(schemes))
        return {s: speeds.get(s, 1.7) for s in schemes}

    monkeypatch.setattr(kernels, "scheme_speedups", table)
    fitted = launch.kernel_fit(space, threads=2)
    assert "dynamic_int8" in asked[0] and "bf16" in asked[0] and "bnb_int8" not in asked[0]
    assert not fitted.mentions("bf16") and not fitted.mentions("int8_token")
    assert fitted.mentions("dynamic_int8") and fitted.objectives == space.objectives
    kept = [st for st in space.starts if not {"bf16", "int8_token"} & set(st.values())]
    assert list(fitted.starts) == kept and len(fitted.start_when) == len(kept) < len(space.starts)
    err = capsys.readouterr().err
    assert "not searched here: bf16 (0.11x fp32), int8_token (no working kernel)" in err
    assert f"{len(space.starts) - len(kept)} of {len(space.starts)} warm starts dropped" in err
    for point in fitted.start_points():  # what is left still resolves to valid recipes
        Recipe.from_flat(point)
    trial = optuna.create_study().ask()
    assert "bf16" not in fitted.sample(trial).values()
    speeds.update(bf16=0.9, int8_token=1.2)  # nothing slow: the space as it was
    assert launch.kernel_fit(space, threads=2) is space
    gpu = load_space("gpu")  # its trials run on the GPU when the cluster has one
    assert launch.kernel_fit(space, threads=2, devices={"cpu", "cuda"}) is space
    assert launch.kernel_fit(gpu, threads=2, devices={"cpu", "cuda"}) is gpu


def test_kernel_fit_measures_every_scheme_it_names(tmp_path):
    """Unmocked, in a fresh process: int8_token's implementations are registered by the time the
    kernel table is asked (it once came back 'no working kernel' and was dropped)."""
    import os
    import subprocess
    import sys

    code = ("from sweep import launch; from sweep.search.space import space_from_dict; "
            "s = space_from_dict({'params': {'quant.enc_mlp': {'choice': "
            "['inherit', 'int8_token']}}}); f = launch.kernel_fit(s, threads=1); "
            "print('kept' if f.mentions('int8_token') else 'dropped')")
    env = {**os.environ, "HYPER_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # measured (kept, or dropped for its speed on a slow class), never "no working kernel"
    assert "int8_token (no working kernel)" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "kept" or "int8_token (0." in out.stderr
