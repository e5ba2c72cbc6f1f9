"""The machine every figure is measured on: CPU model, ISA flags, oneDNN's cap, read by one pure
helper (sweep.inputs.machine) into trial rows and benchmark rows; and the machine-aware choice
of the encoder's scheme."""

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
