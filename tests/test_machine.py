"""The machine every figure is measured on: CPU model, ISA flags, oneDNN's cap, read by one pure
helper (sweep.inputs.machine) into trial rows and benchmark rows; and the machine-aware choice
of the encoder's scheme."""

import os
from types import SimpleNamespace

import pytest

from sweep.inputs import machine
from sweep.results import rows

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
EPYC = """processor\t: 0
model name\t: AMD EPYC 9R45
flags\t\t: fpu sse avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni avx512vl
"""
OLD = "model name\t: Intel(R) Xeon(R) CPU E5-2680 v2\nflags\t\t: fpu sse sse4_2 avx\n"


def test_info_reads_model_flags_and_cap_from_what_it_is_given():
    assert machine.info(XEON, {}) == {
        "cpu": "Intel(R) Xeon(R) Platinum 8480+",
        "isa": ["amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni",
                "avx_vnni", "avx2"], "isa_cap": None}
    assert machine.info(EPYC, {"ONEDNN_MAX_CPU_ISA": "avx2 "}) == {
        "cpu": "AMD EPYC 9R45", "isa": ["avx512f", "avx512_bf16", "avx512_vnni", "avx2"],
        "isa_cap": "AVX2"}
    assert machine.info(OLD, {"DNNL_MAX_CPU_ISA": "SSE41"})["isa"] == []
    assert machine.isa_cap({"DNNL_MAX_CPU_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) \
        == "AVX512_CORE"  # the current spelling first, as oneDNN reads it
    assert machine.isa_cap({"ONEDNN_MAX_CPU_ISA": ""}) is None
    here = machine.info()  # this machine: what /proc/cpuinfo says
    assert here["cpu"] and set(here["isa"]) <= set(machine.ISA_FLAGS)
    assert "AVX2" in machine.describe(machine.info(EPYC, {"ONEDNN_MAX_CPU_ISA": "AVX2"}))


def test_amx_counts_only_when_present_and_not_capped_away():
    xeon = machine.cpu_flags(XEON)
    assert machine.amx_usable(xeon) and machine.amx_usable(xeon, "AVX512_CORE_AMX")
    assert machine.amx_usable(xeon, "DEFAULT")
    assert not machine.amx_usable(xeon, "AVX512_CORE_BF16")
    assert not machine.amx_usable(machine.cpu_flags(EPYC))


def test_onednn_int8_needs_vnni_present_and_not_capped_away():
    xeon, epyc = machine.cpu_flags(XEON), machine.cpu_flags(EPYC)
    assert machine.onednn_vnni(xeon, "DEFAULT") and machine.onednn_vnni(epyc, "AVX512_CORE_VNNI")
    assert machine.onednn_vnni(epyc, "AVX512_CORE_BF16") and machine.onednn_vnni(xeon, "ALL")
    for cap in ("AVX2", "AVX512_CORE", "SSE41"):
        assert not machine.onednn_vnni(xeon, cap), cap
    assert not machine.onednn_vnni({"avx2", "fma"}, "DEFAULT")


def test_encoder_scheme_by_isa_and_by_measurement():
    xeon, epyc = machine.cpu_flags(XEON), machine.cpu_flags(EPYC)
    assert machine.encoder_scheme(xeon)[0] == "bf16"
    assert machine.encoder_scheme(epyc)[0] == "dynamic_int8"
    scheme, why = machine.encoder_scheme(xeon, "AVX512_CORE_BF16")
    assert scheme == "dynamic_int8" and "capped at AVX512_CORE_BF16" in why
    # a measurement overrides the ISA rule, both ways
    scheme, why = machine.encoder_scheme(xeon, None, {"bf16": 2.0, "dynamic_int8": 5.5})
    assert scheme == "dynamic_int8" and why.startswith("measured: bf16 2.00x, dynamic_int8 5.50x")
    assert machine.encoder_scheme(epyc, None, {"bf16": 4.0, "dynamic_int8": 3.0})[0] == "bf16"
    # half a measurement is no measurement
    assert machine.encoder_scheme(xeon, None, {"dynamic_int8": 9.0})[0] == "bf16"
    prof = machine.profile(epyc, "AVX2")
    assert prof == {"isa": ["avx512f", "avx512_bf16", "avx512_vnni", "avx2"], "isa_cap": "AVX2",
                    "encoder": "dynamic_int8", "encoder_why": "ISA: no usable AMX (oneDNN "
                    "capped at AVX2)"}


@pytest.mark.parametrize("cap", [None, "AVX512_CORE_BF16"])
def test_a_rows_machine_survives_mlflow(cap):
    """What a trial logs (tags) reads back as the row measured in the process, null cap kept."""
    result = {"wer": 0.2, "device": "cpu", **machine.info(EPYC, {"ONEDNN_MAX_CPU_ISA": cap or ""})}
    metrics, tags = rows.to_mlflow(result)
    assert tags["isa"] == "avx512f,avx512_bf16,avx512_vnni,avx2"
    assert tags["isa_cap"] == (cap or "")
    run = SimpleNamespace(status="FINISHED", run_id="r", start_time=0)
    back = rows.from_mlflow(run, metrics, tags, {})
    here = rows.from_result(result)
    for key in ("cpu", "isa", "isa_cap"):
        assert back[key] == here[key] == result[key]
    assert "isa_cap" in back and "isa_cap" in rows.tune_row(here)


def test_bench_rows_record_the_isa():
    from bench import common

    m = common.machine(threads=1)
    assert {k: m[k] for k in ("cpu", "isa", "isa_cap")} == machine.info()
    assert machine.describe(m) in common.describe_machine(m)


# ---- machine-aware warm starts -------------------------------------------------------------

STARTS = """
params:
  quant.enc_attn: {choice: [inherit, none, dynamic_int8, bf16]}
  quant.enc_mlp: {choice: [inherit, none, dynamic_int8, bf16]}
  decode.loop: {choice: [generate, greedy]}
  decode.cross_kv: {choice: [model, bf16]}
starts:
  - {quant.enc_attn: dynamic_int8}
  - {when: {encoder: bf16}, quant.enc_attn: bf16, quant.enc_mlp: bf16}
  - {when: {encoder: dynamic_int8}, quant.enc_attn: dynamic_int8, quant.enc_mlp: dynamic_int8,
     decode.loop: greedy}
  - {when: {isa: [amx_bf16, amx_tile]}, decode.loop: greedy, decode.cross_kv: bf16}
"""
AMX = machine.profile(machine.cpu_flags(XEON), None)
NO_AMX = machine.profile(machine.cpu_flags(EPYC), None)


def _space(text):
    import yaml

    from sweep.search.space import space_from_dict

    return space_from_dict(yaml.safe_load(text))


def test_starts_follow_the_machine_both_ways():
    space = _space(STARTS)
    assert space.start_when == ({}, {"encoder": ("bf16",)}, {"encoder": ("dynamic_int8",)},
                                {"isa": ("amx_bf16", "amx_tile")})
    amx = space.start_points({"cpu"}, AMX)
    no_amx = space.start_points({"cpu"}, NO_AMX)
    assert [p.get("quant.enc_mlp") for p in amx] == ["inherit", "bf16", "inherit"]
    assert amx[-1]["decode.cross_kv"] == "bf16"
    assert [(p["quant.enc_attn"], p["quant.enc_mlp"], p["decode.loop"]) for p in no_amx] == [
        ("dynamic_int8", "inherit", "generate"), ("dynamic_int8", "dynamic_int8", "greedy")]
    # measured speeds overrule the ISA: an AMX machine measuring int8 faster gets int8's starts
    measured = machine.profile(machine.cpu_flags(XEON), None, {"bf16": 2.0, "dynamic_int8": 3.0})
    assert [p.get("quant.enc_mlp") for p in space.start_points({"cpu"}, measured)] == [
        "inherit", "dynamic_int8", "inherit"]
    assert len(space.start_points({"cpu"})) == 4  # machine unknown: every start
    # screening measures the same starts, and knows which of the space's each one is
    assert [i for i, _ in space.fitting_starts({"cpu"}, NO_AMX)] == [0, 2]
    assert [p for _, p in space.fitting_starts({"cpu"}, AMX)] == amx
    assert "(when encoder=bf16)" in space.describe()
    assert "(when isa=amx_bf16|amx_tile)" in space.describe()


def test_bad_when_refused_with_every_error():
    from sweep.search.space import SpaceError

    with pytest.raises(SpaceError) as e:
        _space("""
params:
  quant.enc_attn: {choice: [inherit, bf16]}
starts:
  - {when: {encoders: bf16}, quant.enc_attn: bf16}
  - {when: {encoder: fp8}, quant.enc_attn: bf16}
  - {when: {isa: [amx_bf17]}, quant.enc_attn: bf16}
  - {when: {encoder: bf16}}
  - {when: bf16, quant.enc_attn: bf16}
""")
    text = "\n".join(e.value.errors)
    assert len(e.value.errors) == 5, text
    assert "starts[0].when.encoders: unknown; did you mean `encoder`? (allowed: encoder, isa)" \
        in text
    assert "starts[1].when.encoder: must be one or more of bf16, dynamic_int8, got 'fp8'" in text
    assert "starts[2].when.isa: must be one or more of amx_tile" in text
    assert "starts[3]: sets no parameter, only `when`" in text
    assert "starts[4].when: must be a mapping of encoder and/or isa -> value(s), got 'bf16'" \
        in text


@pytest.mark.parametrize("name", ["cpu", "full"])
def test_shipped_starts_without_amx_skip_the_amx_levers(name):
    """The cpu and full spaces: on AMX, the bf16 mix at full speed (frozen compiled encoder,
    bf16 cross K/V); without, per-token int8 on the encoder (the accurate int8, #25) with the
    scripted step, never those levers."""
    from sweep.search.space import load_space
    from sweep.techniques.recipe import Recipe

    space = load_space(name)
    amx = [Recipe.from_flat(p) for p in space.start_points({"cpu"}, AMX)]
    no_amx = [Recipe.from_flat(p) for p in space.start_points({"cpu"}, NO_AMX)]
    assert any(r.encoder.compile == "freeze" and r.decode.cross_kv == "bf16" for r in amx)
    assert not any(r.encoder.compile == "freeze" or r.decode.cross_kv == "bf16"
                   for r in no_amx)
    assert any(r.quant.by_layer_type()["enc_mlp"] == "int8_token"
               and r.decode.compile == "script" for r in no_amx)
    assert len(amx) < len(space.starts) and len(no_amx) < len(space.starts)


def test_quick_queues_the_machines_real_answer():
    """`quick` (the README's first command) is machine-aware (#25): where int8 is the faster
    encoder, the per-token int8 mix with the scripted step, on the full window and on the
    clip's window; where bf16 is, the bf16 mix, never per-token; on every machine the fp32
    encoder on the clip's window with the int8 decoder (AVX2-only CPUs' accurate recipe)."""
    from sweep.search.space import load_space
    from sweep.techniques.recipe import Recipe

    space = load_space("quick")
    amx = [Recipe.from_flat(p) for p in space.start_points({"cpu"}, AMX)]
    no_amx = [Recipe.from_flat(p) for p in space.start_points({"cpu"}, NO_AMX)]
    enc = lambda r: r.quant.by_layer_type()["enc_mlp"]  # noqa: E731
    for starts in (amx, no_amx):
        assert any(enc(r) == "none" and r.quant.by_layer_type()["dec_mlp"] == "dynamic_int8"
                   and r.encoder.window == "auto" and r.decode.compile == "script"
                   for r in starts)
    assert {enc(r) for r in no_amx if r.encoder.window == "auto"} == {"int8_token", "none"}
    assert any(enc(r) == "int8_token" and r.encoder.window == "full" for r in no_amx)
    assert "bf16" not in {enc(r) for r in no_amx}
    assert "bf16" in {enc(r) for r in amx} and "int8_token" not in {enc(r) for r in amx}


def test_the_searcher_queues_the_starts_that_fit(tmp_path):
    pytest.importorskip("ray")
    from sweep.search.sampler import make_searcher

    space = _space(STARTS)
    kw = dict(sampler="random", seed=0, storage=None, study_name="s", devices={"cpu"})
    for prof, n in ((AMX, 3), (NO_AMX, 2), (None, 4)):
        searcher = make_searcher(space, machine_profile=prof, **kw)
        assert len(searcher._points_to_evaluate) == 1 + n  # the baseline, then the starts


def test_encoder_speedups_measured_here_decide(tmp_path, monkeypatch):
    """The kernel table's measurement (tiny shapes, a short budget) makes the profile."""
    import functools

    from sweep.measure import kernels

    monkeypatch.setenv("HYPER_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "time_calls", functools.partial(kernels.time_calls,
                                                                 budget_s=0.05))
    got = kernels.encoder_speedups(64, 128, 50)
    assert set(got) == set(machine.ENCODER_SCHEMES) and all(v > 0 for v in got.values())
    prof = machine.profile(machine.cpu_flags(), None, got)
    assert prof["encoder"] == max(got, key=got.get)
    assert prof["encoder_why"].startswith("measured: ")
    assert list(tmp_path.glob("kernels-*.json"))  # cached for the trials


def test_launcher_profile_says_which_starts_fit(capsys):
    from sweep.launch import machine_profile

    space = _space(STARTS.replace("encoder: bf16", "isa: [avx2]").replace(
        "encoder: dynamic_int8", "isa: [avx2]"))  # no encoder condition: nothing to measure
    prof = machine_profile(space, threads=1)
    assert prof["encoder_why"].startswith("ISA")
    assert prof["isa"] == machine.isa() and prof["isa_cap"] == machine.isa_cap()
    err = capsys.readouterr().err
    fit = sum(1 for w in space.start_when if set(w.get("isa", ())) <= set(machine.isa()))
    assert f"{fit} of 4 warm starts fit it" in err and machine.cpu_model() in err


def test_compiled_kernels_are_kept_apart_per_cap(tmp_path):
    """A kernel torch.compile built under ATen's AVX2 cap, loaded uncapped from a shared cache,
    corrupted the heap (issue #25): `import sweep` gives each CPU and cap its own cache."""
    import subprocess
    import sys

    code = ("import sweep, torch\n"  # sweep first: it picks the cache before inductor runs
            "from sweep.measure import int8\n"
            "f = torch.compile(int8._token_linear, dynamic=True)\n"
            "w = torch.randint(-127, 127, (64, 32), dtype=torch.int8)\n"
            "for rows in (1, 40, 7):\n"
            "    f(torch.randn(rows, 64), w, torch.ones(32), w.float().sum(0), torch.zeros(32))\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR",
                                                           *machine.EMULATE_AVX2)}
    env["HYPER_CACHE"] = str(tmp_path)
    for cap in ({"ATEN_CPU_CAPABILITY": "avx2"}, {}):
        run = subprocess.run([sys.executable, "-c", code], env=env | cap, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
    assert {p.name for p in (tmp_path / "inductor").iterdir()} == {
        machine.inductor_cache_dir(env | {"ATEN_CPU_CAPABILITY": "avx2"}).name,
        machine.inductor_cache_dir(env).name}
