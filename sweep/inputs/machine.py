"""The machine a figure was measured on: CPU model, the instruction sets that decide which kernels
are fast (AMX, AVX-512 bf16, VNNI), and the ISA cap oneDNN runs under. Pure (no torch): every
trial row, every benchmark's `machine`, the kernel cache's fingerprint and the machine-aware warm
starts read it from here.

The ISA facts decide the speed-ups: with AMX, bf16 matmuls run on tiles and beat int8 (VNNI);
without it int8 has about twice bf16's throughput. `ONEDNN_MAX_CPU_ISA` caps what oneDNN (bf16
matmuls, PT2E int8) may use, so an AMX machine can emulate one without AMX for those kernels (not
for fbgemm's dynamic int8, which does not go through oneDNN: bench/isa_cap.py measures it).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

# CPU flags (as /proc/cpuinfo spells them) that change which kernel is fastest, in the order
# recorded: matrix units, then AVX-512 and its bf16/int8 dot products, then AVX2-class ones.
ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "avx512f", "avx512_bf16",
             "avx512_fp16", "avx512_vnni", "avx_vnni", "avx2")
# The environment variables oneDNN reads for its cap (the DNNL_ spelling is the older one).
CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# The other libraries' caps, each read once by its library at first use: ATen's vectorised
# kernels (elementwise, reductions, softmax), fbgemm's (torch.ao dynamic int8) and MKL's (fp32
# sgemm, F.linear's) and CTranslate2's own kernels (faster-whisper; its int8 GEMM is oneDNN's).
# Together with oneDNN's they make a machine run as a lower class.
OTHER_CAPS = {"ATEN_CPU_CAPABILITY": "ATen", "FBGEMM_ENABLE_INSTRUCTIONS": "fbgemm",
              "MKL_ENABLE_INSTRUCTIONS": "MKL", "CT2_FORCE_CPU_ISA": "CTranslate2"}
# What to set to run an AVX-512 or AMX machine as the AVX2-only class (AMD Zen 2/3, laptops):
# bench.isa_cap checks that each takes effect, by timing and by the kernels' names.
EMULATE_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "CT2_FORCE_CPU_ISA": "AVX2"}
# fbgemm's instruction levels with VNNI (int8 dot products without int16 saturation)
_FBGEMM_VNNI = ("AVX512_E1", "AVX512_VNNI")
# The encoder schemes a machine-aware start chooses between (sweep.search.space `when:`).
ENCODER_SCHEMES = ("bf16", "dynamic_int8")


def git_commit(dirty: bool = False) -> str:
    """The checkout's HEAD ("unknown" outside one); `dirty`: with `-dirty` when tracked files
    differ from it (a benchmark's figures then are not HEAD's)."""
    repo = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=repo, timeout=10).stdout.strip()
        changed = dirty and subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, cwd=repo, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if changed else "")


@functools.cache
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (`model name` of /proc/cpuinfo), else what Python knows."""
    found = re.findall(r"model name\s*:\s*(.*)", _proc_cpuinfo() if cpuinfo is None else cpuinfo)
    return found[0].strip() if found else (platform.processor() or platform.machine()
                                           or "unknown")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Every flag of the first CPU in /proc/cpuinfo (`cpuinfo`: its text, for tests)."""
    found = re.findall(r"flags\s*:\s*(.*)", _proc_cpuinfo() if cpuinfo is None else cpuinfo)
    return set(found[0].split()) if found else set()


def isa(flags: Iterable[str] | None = None) -> list[str]:
    """The flags of ISA_FLAGS present (`flags`: a set of CPU flags; default this machine's)."""
    have = cpu_flags() if flags is None else set(flags)
    return [f for f in ISA_FLAGS if f in have]


def isa_cap(env: Mapping[str, str] | None = None) -> str | None:
    """The `ONEDNN_MAX_CPU_ISA` value in force (upper case, as oneDNN reads it), else None."""
    env = os.environ if env is None else env
    return next((env[v].strip().upper() for v in CAP_VARS if env.get(v, "").strip()), None)


def caps(env: Mapping[str, str] | None = None) -> str | None:
    """Every ISA cap in force, as one text: oneDNN's value (`isa_cap`), then `ATen=avx2`,
    `fbgemm=AVX2`, `MKL=AVX2` for the others set; None when nothing is capped. oneDNN's alone
    reads as before (`AVX2`), so rows recorded before the other caps existed keep their
    meaning."""
    env = os.environ if env is None else env
    parts = [isa_cap(env) or ""] + [f"{lib}={env[v].strip()}" for v, lib in OTHER_CAPS.items()
                                     if env.get(v, "").strip()]
    text = "; ".join(parts).strip("; ")
    return text or None


def info(cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> dict:
    """`cpu` (model name), `isa` (relevant flags present) and `isa_cap` (every cap in force,
    `caps`, or None): the three fields every trial row and every benchmark's `machine` record."""
    return {"cpu": cpu_model(cpuinfo), "isa": isa(cpu_flags(cpuinfo)), "isa_cap": caps(env)}


def describe(m: Mapping) -> str:
    """`AMD EPYC (avx512_bf16, avx512_vnni, ...; capped at AVX2)` for printed lines."""
    cap = f"; capped at {m['isa_cap']}" if m.get("isa_cap") else ""
    return f"{m.get('cpu', '?')} ({', '.join(m.get('isa') or ()) or 'no listed ISA'}{cap})"


def fbgemm_vnni(flags: Iterable[str] | None = None,
                env: Mapping[str, str] | None = None) -> bool:
    """Whether fbgemm's int8 kernels (torch.ao dynamic int8) have VNNI here: the flag present and
    `FBGEMM_ENABLE_INSTRUCTIONS` not capping it away. Without it fbgemm's u8 x s8 product sums
    pairs in a saturating int16, so activations must keep to 7 bits (`reduce_range`)."""
    env = os.environ if env is None else env
    have = cpu_flags() if flags is None else set(flags)
    cap = env.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    return bool({"avx512_vnni", "amx_int8"} & set(have)) and (not cap or cap in _FBGEMM_VNNI)


def fbgemm_act_bits(weight_bits: int, flags: Iterable[str] | None = None,
                    env: Mapping[str, str] | None = None) -> int:
    """The activation bits fbgemm's int8 product takes over `weight_bits`-bit weights here: 8
    with VNNI; without, pairs of u8 x s8 products must fit a saturating int16
    (2 * 255 * 63 and 2 * 127 * 127 do, 2 * 255 * 127 does not)."""
    return 8 if fbgemm_vnni(flags, env) else min(8, 15 - weight_bits)


def onednn_vnni(flags: Iterable[str] | None = None, cap: str | None = None) -> bool:
    """Whether oneDNN's int8 x int8 product (`torch._int_mm`, torchao's int8 activations) has
    VNNI (or AMX) here: the flag present and `cap` (oneDNN's, default the one in force) keeping
    it. Without it oneDNN sums pairs of products in a saturating int16: under
    `ONEDNN_MAX_CPU_ISA=AVX2` `_int_mm` of full-range int8 was 18% off, per-token int8 Linears
    100% off, and on a real AVX2-only EPYC it ran 25x slower than fp32 (issue #25)."""
    have = cpu_flags() if flags is None else set(flags)
    cap = isa_cap() if cap is None else cap.strip().upper()
    present = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & have)
    return present and (cap is None or cap in ("DEFAULT", "ALL")
                        or any(k in cap for k in ("VNNI", "BF16", "FP16", "AMX", "AVX10")))


def inductor_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where torch.compile's kernels go: one folder per CPU model and caps in force, under
    `$HYPER_CACHE` (default ~/.cache/hyper). Inductor's own key leaves out ATen's cap: a kernel
    compiled under `ATEN_CPU_CAPABILITY=avx2` and loaded uncapped from the shared
    /tmp/torchinductor_root freed memory twice and aborted the process (per-token int8, torch
    2.13, issue #25)."""
    from .cache import root  # HYPER's one cache root (`import sweep` has run: no cycle)

    env = os.environ if env is None else env
    key = re.sub(r"[^a-z0-9]+", "-", f"{cpu_model()} {caps(env) or 'uncapped'}".lower())
    return root(env.get("HYPER_CACHE")) / "inductor" / key.strip("-")[:120]


def amx_usable(flags: Iterable[str], cap: str | None = None) -> bool:
    """AMX tiles present and not capped away: oneDNN's caps that keep AMX name it (AVX512_CORE_AMX,
    AVX10_1_512_AMX...), DEFAULT and ALL keep everything."""
    present = {"amx_tile", "amx_bf16"} <= set(flags)
    return present and (cap is None or "AMX" in cap or cap in ("DEFAULT", "ALL"))


def encoder_scheme(flags: Iterable[str], cap: str | None = None,
                   speedups: Mapping[str, float] | None = None) -> tuple[str, str]:
    """The faster encoder scheme here, bf16 or dynamic int8, and why.

    Measured first: `speedups` (scheme -> speed-up over fp32 on the encoder's matmul shapes,
    `sweep.measure.kernels.encoder_speedups`) picks the larger. Without a measurement, the ISA
    decides: bf16 where AMX tiles run it (the study's Intel Xeon: bf16 encoder + int8 decoder
    3.44x HF fp32), int8 elsewhere (VNNI int8 has about twice bf16's throughput without AMX; on
    an AMD EPYC the scripted greedy step with an int8 encoder measured 2.50x, with a bf16 one
    2.33x, issue #16)."""
    got = {s: v for s, v in (speedups or {}).items() if s in ENCODER_SCHEMES and v}
    if len(got) == len(ENCODER_SCHEMES):
        best = max(ENCODER_SCHEMES, key=got.get)
        return best, "measured: " + ", ".join(f"{s} {got[s]:.2f}x" for s in ENCODER_SCHEMES) \
            + " over fp32 on the encoder's matmuls"
    if amx_usable(flags, cap):
        return "bf16", "ISA: AMX bf16 tiles"
    return "dynamic_int8", "ISA: no usable AMX" + (f" (oneDNN capped at {cap})" if cap else "")


def profile(flags: Iterable[str], cap: str | None,
            speedups: Mapping[str, float] | None = None) -> dict:
    """What a warm start's `when:` is matched against (`flags`: CPU flags, `cap`: oneDNN's cap,
    both passed explicitly; `isa(), isa_cap()` for this machine): `isa` (relevant flags present),
    `isa_cap`, `encoder` (the faster encoder scheme, `encoder_scheme`) and `encoder_why`."""
    present = isa(flags)
    scheme, why = encoder_scheme(present, cap, speedups)
    return {"isa": present, "isa_cap": cap, "encoder": scheme, "encoder_why": why}
