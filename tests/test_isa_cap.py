"""bench/isa_cap.py on this machine, with tiny budgets: every setting runs in its own process
under its cap, the cap reaches oneDNN (its bf16 matmul kernel changes), fbgemm's int8 never
goes through oneDNN, and the report says what the cap does not cover. No timing asserted."""

from bench import isa_cap
from sweep.inputs import machine


def test_each_cap_runs_in_its_own_process_and_switches_onednn():
    rows = [isa_cap.best_of([isa_cap.run_setting(cap, 1, 0.05)]) for cap in ("default", "AVX2")]
    for r in rows:
        assert "error" not in r, r
        assert set(r["gops"]) == set(isa_cap.KERNELS) and all(v > 0 for v in r["gops"].values())
        assert r["onednn_kernel"]["int8_fbgemm"] == "not oneDNN"
    default, avx2 = (r["onednn_kernel"] for r in rows)
    assert "avx512" not in avx2["bf16"] and "avx512" not in avx2["int8_onednn"]
    # Uncapped, oneDNN's bf16 matmul takes the best bf16 ISA here: AMX tiles where usable
    # (`avx10_1_512_amx` on a Xeon with AMX), else avx512_bf16 (`avx512_core_bf16`).
    if machine.amx_usable(machine.cpu_flags(), machine.isa_cap()):
        assert "amx" in default["bf16"]
    elif "avx512_bf16" in machine.isa():
        assert "avx512_core_bf16" in default["bf16"]
    for r, cap in zip(rows, ("default", "AVX2")):
        r["machine"] = {"cpu": "x", "isa": [], "isa_cap": None if cap == "default" else cap}
    meta = {"date": "d", "threads": 1, "rounds": 1, "machine": rows[0]["machine"],
            "commit": "c", "command": "python -m bench.isa_cap"}
    text = isa_cap.markdown(rows, meta)
    assert "| AVX2 |" in text and "fbgemm" in text and "not oneDNN" in text


def test_the_avx2_class_caps_every_library_in_its_process():
    """`avx2-class` (machine.EMULATE_AVX2): ATen runs its AVX2 kernels, fbgemm's int8 is
    treated as without VNNI (8-bit activations over 7-bit weights), oneDNN leaves AVX-512, and
    the row records every cap in force."""
    default, cls = (isa_cap.best_of([isa_cap.run_setting(c, 1, 0.05)])
                    for c in ("default", isa_cap.AVX2_CLASS))
    for r in (default, cls):
        assert "error" not in r, r
    assert default["caps"] is None and cls["aten_capability"] == "AVX2"
    assert cls["caps"] == ("AVX2; ATen=avx2; fbgemm=AVX2; MKL=AVX2; CTranslate2=AVX2")
    assert cls["rowscaled_bits"] == [8, 7] and cls["fbgemm_vnni"] is False
    assert default["rowscaled_bits"] == [8, 8 if machine.fbgemm_vnni(env={}) else 7]  # uncapped
    assert "avx512" not in cls["onednn_kernel"]["bf16"]
    if "avx512f" in machine.isa():  # uncapped, ATen takes this CPU's wider vectors
        assert default["aten_capability"].startswith("AVX512")
