"""`python -m bench.isa_cap`: does oneDNN's ISA cap (`ONEDNN_MAX_CPU_ISA`) really switch the
kernels? Matmul throughput of fp32, bf16 and int8 linears under each cap, one subprocess per cap
(oneDNN reads the variable once, at its first use).

In each subprocess, on one encoder-sized matmul (1500 tokens x 512 -> 2048, whisper-base's fc1),
interleaved: fp32 `F.linear` (MKL), bf16 `F.linear` (oneDNN), dynamic int8 through torch.ao with
the default quantized engine (x86: fbgemm for dynamic linears) and with the `onednn` engine. The
kernel oneDNN picked for bf16 and int8 is read from its verbose log, so a cap that changes
nothing shows as the same kernel name, not only as equal timings. Settings run in rounds
(default, cap, cap, ..., default, ...) and each keeps its best round: the machine is shared.
Writes bench/results/isa_cap.json and isa_cap.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import common

CAPS = ("default", "AVX512_CORE_AMX", "AVX512_CORE_BF16", "AVX512_CORE_VNNI", "AVX512_CORE",
        "AVX2")
# A setting that is not a oneDNN value: every library capped at once (sweep.inputs.machine's
# EMULATE_AVX2: oneDNN, ATen, fbgemm, MKL), the stand-in for an AVX2-only CPU (issue #25).
AVX2_CLASS = "avx2-class"
SHAPE = (1500, 512, 2048)  # tokens, in, out: whisper-base's encoder fc1 on a 30 s window
KERNELS = ("fp32", "bf16", "int8_fbgemm", "int8_onednn", "int8_token_intmm", "int8_rowscaled",
           "gelu")
WHAT = {"fp32": "fp32 F.linear (MKL sgemm, not oneDNN)",
        "bf16": "bf16 F.linear (oneDNN matmul)",
        "int8_fbgemm": "dynamic int8, torch.ao, engine x86 (fbgemm)",
        "int8_onednn": "dynamic int8, torch.ao, engine onednn",
        "int8_token_intmm": "int8_token on torch._int_mm",
        "int8_rowscaled": "int8_token on fbgemm, rows rescaled",
        "gelu": "GELU on the fc1 output (ATen, GOP/s = elements/s)"}


def child(threads: int, budget_s: float) -> dict:
    """This process's figures: seconds per call and GOP/s of each kernel, oneDNN's kernels."""
    import torch
    from torch import nn

    from sweep.measure.kernels import time_calls

    torch.set_num_threads(threads)
    m, k, n = SHAPE
    torch.manual_seed(0)
    lin = nn.Linear(k, n).eval()
    x = torch.randn(1, m, k)
    xb, wb, bb = x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()
    fns = {"fp32": lambda: nn.functional.linear(x, lin.weight, lin.bias),
           "bf16": lambda: nn.functional.linear(xb, wb, bb)}
    for name, engine in (("int8_fbgemm", None), ("int8_onednn", "onednn")):
        fns[name] = _int8(lin, engine, x)
    from sweep.inputs import machine
    from sweep.measure.int8 import RowInt8Linear, TokenInt8Linear

    tok, row = TokenInt8Linear(lin), RowInt8Linear(lin)
    h = lin(x)
    fns |= {"int8_token_intmm": lambda: tok(x), "int8_rowscaled": lambda: row(x),
            "gelu": lambda: nn.functional.gelu(h)}
    verbose = {name: _onednn_kernel(fns[name])
               for name in ("bf16", "int8_onednn", "int8_fbgemm", "int8_token_intmm")}
    secs = time_calls(fns, budget_s=budget_s)
    flops = 2 * m * k * n
    gops = {kk: flops / s / 1e9 for kk, s in secs.items()}
    gops["gelu"] = m * n / secs["gelu"] / 1e9
    return {"seconds": secs, "gops": gops, "onednn_kernel": verbose, "threads": threads,
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "default_engine": torch.backends.quantized.engine,
            "rowscaled_bits": [row.bits, row.weight_bits], "caps": machine.caps(), "fbgemm_vnni":
            machine.fbgemm_vnni()}


def _int8(lin, engine: str | None, x):
    """torch.ao's dynamic int8 linear, packed and run under `engine` (None: the default)."""
    import warnings

    import torch
    from torch import nn

    default = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        torch.backends.quantized.engine = engine or default
        q = quantize_dynamic(nn.Sequential(lin), {nn.Linear: per_channel_dynamic_qconfig},
                             torch.qint8)[0]
    torch.backends.quantized.engine = default

    def run():
        torch.backends.quantized.engine = engine or default
        try:
            return q(x)
        finally:
            torch.backends.quantized.engine = default
    return run


def _onednn_kernel(fn) -> str:
    """The implementation oneDNN logs for `fn`'s primitives ("not oneDNN" when none runs).
    The log goes to fd 1 below Python: redirected to a file for the call."""
    from sweep.measure.kernels import onednn_log

    found = re.findall(r"onednn_verbose,.*?exec,cpu,(\w+),([^,]+),", onednn_log(fn))
    return "; ".join(dict.fromkeys(f"{p}:{impl}" for p, impl in found)) or "not oneDNN"


def run_setting(cap: str, threads: int, budget_s: float) -> dict:
    from sweep.inputs import machine

    every = ("DNNL_MAX_CPU_ISA", *machine.EMULATE_AVX2)
    env = {k: v for k, v in os.environ.items() if k not in every}
    if cap == AVX2_CLASS:
        env |= machine.EMULATE_AVX2
    elif cap != "default":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    out = subprocess.run([sys.executable, "-m", "bench.isa_cap", "--child", "--threads",
                          str(threads), "--budget", str(budget_s)], env=env, cwd=common.REPO,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        return {"cap": cap, "error": out.stderr.strip().splitlines()[-1:]}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"cap": cap, **got}


def best_of(runs: list[dict]) -> dict:
    """One setting over its rounds: the fastest round per kernel (others only add time)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    secs = {k: min(r["seconds"][k] for r in ok) for k in KERNELS}
    flops = 2 * SHAPE[0] * SHAPE[1] * SHAPE[2]
    return {**ok[0], "seconds": secs, "gops": {k: flops / s / 1e9 for k, s in secs.items()},
            "rounds": len(ok)}


def noise(rows: list[dict], base: dict | None) -> str:
    """The spread, across caps, of the kernels no cap can touch (fp32, fbgemm int8): how far
    this run's figures move by the machine alone (a shared machine's load)."""
    ok = [r for r in rows if "gops" in r]
    if base is None or len(ok) < 2:
        return ""
    ratios = [r["gops"][k] / base["gops"][k] for r in ok for k in ("fp32", "int8_fbgemm")]
    return (f" The kernels the cap cannot reach (fp32, fbgemm) moved {min(ratios):.2f}x to "
            f"{max(ratios):.2f}x between settings: this run's noise; a change within it is "
            "none, the kernel names say what switched.")


def markdown(rows: list[dict], meta: dict) -> str:
    base = next((r for r in rows if r["cap"] == "default" and "seconds" in r), None)
    body = []
    for r in rows:
        if "error" in r:
            body.append((r["cap"], "", *["failed"] * len(KERNELS), "", "", "", r["error"]))
            continue
        g = r["gops"]
        rel = [f"{g[k]:.0f} ({g[k] / base['gops'][k]:.2f}x)" if base else f"{g[k]:.0f}"
               for k in KERNELS]
        body.append((r["cap"], r.get("aten_capability", "?"), *rel, r["onednn_kernel"]["bf16"],
                     r["onednn_kernel"]["int8_onednn"], r["onednn_kernel"]["int8_fbgemm"],
                     r["onednn_kernel"].get("int8_token_intmm", "?")))
    m, k, n = SHAPE
    lines = [f"# oneDNN's ISA cap: which kernels it switches ({meta['date']})", "",
             f"- matmul {m}x{k} -> {n} (whisper-base's encoder fc1, 30 s window), "
             f"{meta['threads']} threads; GOP/s (multiply-adds x2), best of {meta['rounds']} "
             "rounds, the kernels interleaved in each; one subprocess per cap and round",
             f"- machine: {common.describe_machine(meta['machine'])}",
             f"- commit: {meta['commit']}; command: `{meta['command']}`", "",
             common.md_table(("ONEDNN_MAX_CPU_ISA", "ATen", *(WHAT[x] for x in KERNELS),
                              "oneDNN kernel, bf16", "oneDNN kernel, int8 (onednn engine)",
                              "oneDNN kernel, int8 (fbgemm engine)",
                              "oneDNN kernel, torch._int_mm"), body,
                             "ll" + "r" * len(KERNELS) + "llll"), "",
             "In parentheses: against the same kernel without a cap." + noise(rows, base), "",
             f"`{AVX2_CLASS}` sets every cap at once, as `sweep.inputs.machine.EMULATE_AVX2` "
             "says: " + ", ".join(f"`{k}={v}`" for k, v in _emulate().items()) + ". ATen's "
             "column is what torch reports it runs; fbgemm and MKL name no kernel, so only "
             "their timings say whether their cap took hold.", "",
             "What the cap does not cover:",
             "- fp32 `F.linear` is MKL's sgemm, and torch.ao's dynamic int8 linear on the "
             "default `x86` engine is fbgemm's: neither goes through oneDNN, so the cap leaves "
             "them alone (their oneDNN kernel column says `not oneDNN`). An AMX machine capped "
             "below AMX still runs them with its own AVX-512/VNNI code, as a machine without "
             "AMX would: fine for fbgemm (it has no AMX path), but no emulation of an older "
             "CPU.",
             "- ATen's own vectorized kernels (GELU, softmax, layer norm, copies) follow "
             "`ATEN_CPU_CAPABILITY`, not the cap; torchao's int8 and inductor's generated C++ "
             "likewise.", ""]
    return "\n".join(lines)


def _emulate() -> dict:
    from sweep.inputs import machine

    return machine.EMULATE_AVX2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.isa_cap", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--caps", default=",".join(CAPS),
                    help="ONEDNN_MAX_CPU_ISA values to run, comma-separated (`default`: unset; "
                         f"`{AVX2_CLASS}`: every library capped at AVX2)")
    ap.add_argument("--stem", default="isa_cap", help="file names: STEM.json and STEM.md")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every setting, interleaved")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--budget", type=float, default=2.0,
                    help="seconds of timing per kernel and round")
    ap.add_argument("--out", default=str(common.RESULTS), help="folder for isa_cap.json/.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.threads, args.budget)))
        return 0
    caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    runs: dict[str, list[dict]] = {c: [] for c in caps}
    for i in range(args.rounds):
        for cap in caps:
            runs[cap].append(run_setting(cap, args.threads, args.budget))
            print(f"round {i + 1}/{args.rounds} {cap}: " + (
                str(runs[cap][-1]["error"]) if "error" in runs[cap][-1] else ", ".join(
                    f"{k} {v:.0f}" for k, v in runs[cap][-1]["gops"].items()) + " GOP/s"),
                file=sys.stderr)
    rows = []
    for cap in caps:
        row = best_of(runs[cap])
        # every row says which machine and which cap it ran under
        row["machine"] = {**common.machine(args.threads), "isa_cap": row.get("caps") or (
            None if cap == "default" else cap)}
        rows.append(row)
    meta = {**common.stamp(args.threads), "threads": args.threads, "rounds": args.rounds,
            "shape": SHAPE, "command": "python -m bench.isa_cap " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    common.write_json(out / f"{args.stem}.json", {**meta, "rows": rows})
    (out / f"{args.stem}.md").write_text(markdown(rows, meta), encoding="utf-8")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
