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
