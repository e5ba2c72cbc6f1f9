"""What every benchmark records beside its figures: date, commit, machine; and JSON/markdown
helpers. Results are only comparable within one run on one machine, so each results file
says which run and which machine it came from.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sweep.inputs.machine import describe as describe_isa
from sweep.inputs.machine import git_commit as _git_commit
from sweep.inputs.machine import info as isa_info
from sweep.results.report import jsonable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def git_commit() -> str:
    """HEAD, with `-dirty` when tracked files differ (the figures then are not HEAD's)."""
    return _git_commit(dirty=True)


def _versions(packages: Sequence[str]) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def machine(threads: int | None = None) -> dict:
    """The machine in words and figures. The load average is recorded because these machines
    are shared: a loaded machine makes every variant slower, ratios less so."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    # cpu, isa (the flags that decide the fast kernels), isa_cap (oneDNN's cap, or None)
    info = {**isa_info(), "cores": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1_5_15": load,
            "versions": _versions(("torch", "transformers", "ctranslate2", "faster-whisper",
                                   "optuna", "ray", "mlflow"))}
    if threads is not None:
        info["threads"] = threads
    return info


def describe_machine(m: Mapping) -> str:
    """One line for tables: CPU and its ISA, cores, threads, GPU, load."""
    parts = [describe_isa(m) if "isa" in m else f"{m.get('cpu', '?')}",
             f"{m.get('cores', '?')} cores"]
    if "threads" in m:
        parts.append(f"{m['threads']} threads")
    parts.append(f"GPU: {m.get('gpu', 'none')}")
    if m.get("load_avg_1_5_15"):
        parts.append("load avg " + "/".join(f"{x:g}" for x in m["load_avg_1_5_15"]))
    v = m.get("versions", {})
    if v:
        parts.append(", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "ctranslate2")
                               if k in v))
    return "; ".join(parts)


def stamp(threads: int | None = None) -> dict:
    """Date (UTC), commit and machine: the header of every results file."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(),
            "machine": machine(threads)}


def write_json(path: Path, data) -> Path:
    """Atomic write: a killed benchmark never leaves half a results file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=1, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    return path


def pct(x: float | None, signed: bool = True, digits: int = 1) -> str:
    """Percent for printed tables only (JSON keeps fractions)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x * 100:+.{digits}f}%" if signed else f"{x * 100:.{digits}f}%"


def md_table(head: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one letter per column (l or r), default l then r."""
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, head)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def figure_axes(width: float = 7.5, height: float = 5.0):
    """A matplotlib figure and axes on the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


# ---- the recipes benchmark's report (kept here so bench/recipes.py stays small) ---------

def write_recipes(rows: list[dict], meta: dict, head: dict, out: Path,
                  stem: str = "recipes") -> dict[str, Path]:
    """STEM.json (list of rows, each with the run's metadata), STEM.md, STEM.png."""
    out = Path(out)
    paths = {"json": write_json(out / f"{stem}.json", [{**r, **meta} for r in rows]),
             "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["md"].write_text(recipes_markdown(rows, meta, head), encoding="utf-8")
    plot_recipes(rows, meta, paths["png"])
    return paths


def recipes_markdown(rows: list[dict], meta: dict, head: dict) -> str:
    """The results table (STEM.md, quoted in docs/benchmarks/): percent only here."""
    body = []
    for r in rows:
        lo, hi = r["dwer_ci95"]
        spread = "–".join(f"{x:.3f}" for x in r["latency_spread_s"])
        body.append((r["name"], r["label"], f"{r['wer']:.3f}",
                     "—" if r["source"] == "baseline" else
                     f"{pct(r['dwer'])} [{pct(lo, digits=0)}, {pct(hi, digits=0)}]",
                     f"{r['cer']:.3f}", f"{r['latency_median_s']:.3f} ({spread})",
                     f"{r['speedup']:.2f}x", f"{r['cpu_median_s']:.3f}",
                     f"{r['speedup_cpu']:.2f}x", r["loops"]))
    table = md_table(("variant", "what", "WER", "dWER [95% CI]", "CER",
                      "s per audio, median (min–max over repeats)", "speedup",
                      "CPU s per audio", "speedup (CPU s)", "loops"), body, "llrrrrrrrr")
    lines = [f"# Recipes vs hand-made configurations and faster-whisper ({meta['date']})", "",
             f"- data: {meta['dataset']}, {meta['n_clips']} clips ({meta['audio_s']:.0f} s), "
             f"language {meta['language'] or 'per clip'}; {meta['repeats']} repeats, variants "
             "interleaved per clip",
             f"- machine: {describe_machine(meta['machine'])}",
             f"- commit: {meta['commit']}; command: `{meta['command']}`", "", table, ""]
    if head.get("best"):
        bound = ("" if head.get("max_dwer_upper") is None else
                 f" (95% upper bound within +{pct(head['max_dwer_upper'], False, 0)})")
        line = (f"Best recipe within {pct(head['max_dwer'], False, 0)} dWER{bound}: "
                f"**{head['best']}**, {head['speedup_vs_baseline']:.2f}x the HF fp32 baseline")
        if head.get("speedup_vs_faster_whisper_int8") is not None:
            line += f", {head['speedup_vs_faster_whisper_int8']:.2f}x faster-whisper int8"
        if head.get("speedup_cpu_vs_faster_whisper_int8") is not None:
            line += (f" (by CPU seconds: {head['speedup_cpu_vs_baseline']:.2f}x and "
                     f"{head['speedup_cpu_vs_faster_whisper_int8']:.2f}x)")
        lines.append(line + ".")
    else:
        upper = head.get("max_dwer_upper")
        lines.append(f"No recipe stayed within {pct(head['max_dwer'], False, 0)} dWER" + (
            "" if upper is None else f" with its 95% upper bound within +{pct(upper, False, 0)}")
            + ".")
    picks = [r for r in rows if r["source"] == "front" and r.get("note")]
    lines += ["", *(f"- {r['name']}: {r['note']}" for r in picks)]
    kern = [r for r in rows if r.get("kernels")]
    if kern:  # which implementation ran per layer type (chosen by measurement on this CPU)
        lines += ["", "## Kernels", "", *(f"- {r['name']}: " + ", ".join(
            f"{k}={v}" for k, v in r["kernels"].items()) for r in kern)]
    return "\n".join(lines) + "\n"


def plot_recipes(rows: list[dict], meta: dict, path: Path) -> Path:
    """WER vs seconds per audio, bars spanning the repeats' min and max; points numbered,
    names listed beside the axes (close points would print their names over each other)."""
    fig, ax = figure_axes(10, 5.5)
    colors = {"baseline": "#2ca02c", "hand": "#7f7f7f", "int8": "#ff7f0e", "front": "#d62728",
              "extra": "#9467bd", "peer": "#1f77b4"}
    for i, r in enumerate(rows, 1):
        lo, hi = r["latency_spread_s"]
        x = r["latency_median_s"]
        ax.errorbar([x], [r["wer"]], xerr=[[x - lo], [hi - x]], fmt="o", ms=7, capsize=3,
                    color=colors.get(r["source"], "black"))
        ax.annotate(str(i), (x, r["wer"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8, weight="bold")
    for src, c in colors.items():
        if any(r["source"] == src for r in rows):
            ax.scatter([], [], color=c, label=src)
    names = "\n".join(f"{i}  {r['name']}" for i, r in enumerate(rows, 1))
    fig.text(0.74, 0.5, names, fontsize=8, va="center", family="monospace")
    ax.set_xlabel("latency_median_s (s per audio)")
    ax.set_ylabel("WER")
    ax.set_title(f"WER vs latency, {meta['dataset']} ({meta['n_clips']} clips), "
                 f"{meta['date'][:10]}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    fig.savefig(path, format="png")
    return Path(path)



# ---- the search benchmark's report -------------------------------------------------------

CHECKPOINTS = (10, 20, 30, 40, 60, 80, 100)


def _iqr_text(entry: dict, t: int) -> str:
    i = t - 1
    return f"{entry['median'][i]:.2f} [{entry['q25'][i]:.2f}–{entry['q75'][i]:.2f}]"


def write_search(summary: dict, meta: dict, cache: dict, out: Path) -> dict[str, Path]:
    """search.json (curves, fractions of the grid's hypervolume), search.md, search.png."""
    out = Path(out)
    paths = {"json": write_json(out / "search.json", {**meta, **summary}),
             "md": out / "search.md", "png": out / "search.png"}
    n = meta["trials"]
    marks = [t for t in CHECKPOINTS if t <= n] + ([n] if n not in CHECKPOINTS else [])
    body = []
    for s, e in summary["samplers"].items():
        tt = e.get("trials_to_random_final_median_curve")
        ts = e.get("trials_to_random_final_seeds_median")
        body.append((s, *(_iqr_text(e, t) for t in marks),
                     "never" if tt is None else tt,
                     f"{'never' if ts is None else f'{ts:g}'} ({e.get('seeds_reaching', 0)}"
                     f"/{len(e['per_seed'])} seeds)"))
    table = md_table(("sampler", *(f"HV @{t}" for t in marks),
                      "trials to random's final HV (median curve)", "per seed, median"),
                     body)
    g = meta["grid_stamp"]
    lines = [f"# Search efficiency: hypervolume vs trials ({meta['date']})", "",
             f"- grid: {meta['cached']}/{meta['grid_size']} recipes of search_spaces/cpu.yaml "
             f"({', '.join(f'{k}: {len(v)}' for k, v in cache['grid'].items())}), each "
             f"measured once on {meta['n_clips']} embedded clips on {g.get('date')} "
             f"(commit {str(g.get('commit'))[:12]}; {describe_machine(g.get('machine') or {})})",
             f"- replay: {meta['seeds']} seeds x {meta['trials']} trials per sampler (the "
             f"sweep's samplers; baseline enqueued first; constraint dwer <= "
             f"{pct(summary['max_dwer'], False, 0)})",
             "- HV: hypervolume of (WER, latency) against the baseline's WER "
             f"+{pct(summary['max_dwer'], False, 0)} and latency, as a fraction of the whole "
             "grid's; median [IQR] over seeds",
             f"- commit: {meta['commit']}; command: `{meta['command']}`", "", table, ""]
    paths["md"].write_text("\n".join(lines), encoding="utf-8")
    fig, ax = figure_axes()
    for s, e in summary["samplers"].items():
        x = np.arange(1, len(e["median"]) + 1)
        ax.plot(x, e["median"], label=s)
        ax.fill_between(x, e["q25"], e["q75"], alpha=0.2)
    if summary.get("random_final_hv") is not None and summary["hv_grid"]:
        ax.axhline(summary["random_final_hv"] / summary["hv_grid"], ls="--", c="grey", lw=1,
                   label="random's final HV")
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume / grid's hypervolume")
    ax.set_title(f"HV vs trials, median and IQR over {meta['seeds']} seeds", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["png"], format="png")
    return paths
