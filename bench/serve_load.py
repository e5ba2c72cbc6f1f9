"""`python -m bench.serve_load`: a bounded load test of `python -m sweep.serve` over loopback.

Starts the server (a subprocess, as users start it) on an exported checkpoint (default: the
embedded whisper-base exported with `--recipe`), checks one answer per clip against
`sweep.transcribe`'s transcript, then sends `--requests` requests from `--clients` concurrent
clients (short shared Russian clips, round robin) and reports latency p50/p95, throughput, and
failed / lost / mismatched requests (all must be 0). A second server with `--low-queue` waiting
slots gets the same load without retries: its 503s and their Retry-After are counted, and every
admitted request must still be answered right. Writes bench/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from . import common

ENV = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
       "MLFLOW_DISABLE_TELEMETRY": "true"}
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
       "amx_bf16")


def export(recipe: str, out: Path) -> Path:
    """The embedded whisper-base with `recipe`, exported as `python -m sweep.export` does."""
    from sweep.inputs.models import _no_progress_bars, load_model
    from sweep.ship.checkpoint import save_checkpoint
    from sweep.techniques.recipe import Recipe

    base = load_model("embedded:whisper-base")
    with _no_progress_bars():
        return save_checkpoint(base.model, base.processor, Recipe.parse(recipe), out,
                               metrics={"data": {"languages": ["ru"]}})


def short_clips(max_s: float) -> list[Path]:
    """The shared Russian clips up to `max_s` seconds."""
    from sweep.inputs.data import shared_dir

    root = shared_dir()
    if root is None:
        raise SystemExit("error: no shared data: set $HYPER_SHARED")
    rows = [json.loads(x) for x in (root / "speech" / "manifest.jsonl").read_text(
        encoding="utf-8").splitlines() if x.strip()]
    return [root / "speech" / r["audio"] for r in rows
            if r.get("lang") == "ru" and r["duration_s"] <= max_s]


@contextmanager
def server(ck: Path, *flags: str):
    """`python -m sweep.serve` on a free port; yields (url, seconds to ready)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sweep.serve", "--checkpoint", str(ck),
                             "--port", "0", *flags], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV}, cwd=common.REPO)
    try:
        line = proc.stdout.readline()
        if " at http" not in line:
            raise SystemExit(f"error: the server did not start (exit {proc.wait()})")
        yield line.split(" at ")[1].split("/v1/")[0], time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(120)


def load(url: str, clips: list[tuple[str, bytes]], want: list[str], n: int,
         clients: int) -> dict:
    """`n` requests from `clients` threads (each its own connection), no retries."""
    import requests

    results: list = [None] * n
    nxt = iter(range(n))
    lock = threading.Lock()
    done = [0]
    report = _progress(n)

    def client():
        with requests.Session() as s:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                name, data = clips[i % len(clips)]
                t0 = time.perf_counter()
                try:
                    r = s.post(f"{url}/v1/audio/transcriptions", timeout=600,
                               files={"file": (name, data)}, data={"model": "x"})
                    row = {"status": r.status_code, "retry_after": r.headers.get("Retry-After"),
                           "right": r.status_code == 200 and r.json()["text"] == want[
                               i % len(clips)]}
                except Exception as e:  # counted as failed, never dropped
                    row = {"status": None, "error": f"{type(e).__name__}: {e}"}
                row["latency_s"] = time.perf_counter() - t0
                results[i] = row
                with lock:
                    done[0] += 1
                    report(done[0])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r and r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    server_side = json.loads(_get(f"{url}/metrics?format=json"))
    served = {c["status"]: c["count"] for c in server_side["requests"]
              if c["route"] == "/v1/audio/transcriptions"}
    return {
        "requests": n, "clients": clients, "wall_s": wall,
        "ok": len(ok), "busy_503": sum(1 for r in results if r and r["status"] == 503),
        "failed": sum(1 for r in results if r and r["status"] not in (200, 503)),
        "lost": sum(1 for r in results if r is None),
        "mismatched": sum(1 for r in ok if not r["right"]),
        "latency_p50_s": _pct(lat, 0.5), "latency_p95_s": _pct(lat, 0.95),
        "throughput_rps": len(ok) / wall,
        "retry_after_s": sorted({int(r["retry_after"]) for r in results
                                 if r and r["status"] == 503}),
        "errors": sorted({r["error"] for r in results if r and "error" in r})[:5],
        "server": {"requests": served, "latency_s": server_side["latency_s"][
            "/v1/audio/transcriptions"]}}


def _pct(values, q):
    from sweep.serve import percentile

    return percentile(values, q)


def _get(url: str) -> str:
    import requests

    return requests.get(url, timeout=30).text


def _progress(total: int):
    """A callback(done) rewriting one status line, at most every half second."""
    state = {"t": 0.0, "t0": time.perf_counter()}

    def report(done: int) -> None:
        now = time.perf_counter()
        if done < total and now - state["t"] < 0.5:
            return
        state["t"] = now
        sys.stderr.write(f"\r  {done}/{total} requests, {now - state['t0']:.0f} s"
                         + ("\n" if done >= total else ""))
        sys.stderr.flush()
    return report


def markdown(res: dict) -> str:
    m, runs = res["machine"], res["runs"]
    rows = [[name, r["requests"], r["clients"], r["ok"], r["busy_503"], r["failed"], r["lost"],
             r["mismatched"], f"{r['latency_p50_s']:.3f}", f"{r['latency_p95_s']:.3f}",
             f"{r['throughput_rps']:.2f}", f"{r['wall_s']:.1f}"] for name, r in runs.items()]
    head = ["run", "requests", "clients", "200", "503", "failed", "lost", "wrong text",
            "p50 s", "p95 s", "req/s", "wall s"]
    return "\n".join([
        "# sweep.serve under load (loopback)", "",
        f"- date: {res['date']}; commit: {res['commit']}",
        f"- machine: {common.describe_machine(m)}",
        f"- ISA flags: {', '.join(res['isa_flags']) or 'none'}; kernels: {res['isa_note']}",
        f"- checkpoint: {res['checkpoint']} (recipe: {res['recipe']})",
        f"- clips: {res['clips']} shared Russian clips up to {res['max_clip_s']:g} s "
        f"(mean {res['mean_clip_s']:.2f} s), round robin; server startup "
        f"{res['startup_s']:.1f} s; server flags: {res['flags']}", "",
        common.md_table(head, rows), "",
        f"The `low-queue` run's server admits {res['low_queue_capacity']} requests at once "
        f"(1 decoding + {res['low_queue']} waiting), and its clients do not retry"
        + (f"; its 503s carried Retry-After {runs['low-queue']['retry_after_s']} s"
           if "low-queue" in runs else " (not run)")
        + ". Latency is per answered request, seen by the client (upload, decoding, queueing, "
        "transcription).", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None,
                    help="an exported checkpoint (default: export the embedded whisper-base "
                         "with --recipe to a temporary folder)")
    ap.add_argument("--recipe", default="quant.scheme=dynamic_int8",
                    help="recipe exported when no --checkpoint is given")
    ap.add_argument("--requests", type=int, default=200, help="requests per run")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--max-clip-s", type=float, default=3.0, help="longest clip sent")
    ap.add_argument("--workers", type=int, default=1, help="server --workers")
    ap.add_argument("--threads", type=int, default=None, help="server --threads")
    ap.add_argument("--low-queue", type=int, default=1, help="--queue of the low-queue run")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args(argv)

    from sweep import transcribe
    from sweep.measure import decode
    from sweep.measure.kernels import cpu_flags

    paths = short_clips(args.max_clip_s)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(args.checkpoint) if args.checkpoint else export(args.recipe, Path(tmp) / "ck")
        print(f"checkpoint {ck}; {len(paths)} clips", file=sys.stderr)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        rows = transcribe.transcribe_files(ck, paths)  # the transcripts a request must get
        want = [r["text"] for r in rows]
        clips = [(p.name, p.read_bytes()) for p in paths]
        flags = ["--workers", str(args.workers), "--queue", str(args.clients)]
        flags += ["--threads", str(args.threads)] if args.threads else []
        res = {"isa_flags": [f for f in ISA if f in cpu_flags()], "isa_note": decode.isa_note(),
               "checkpoint": str(args.checkpoint or "embedded whisper-base, exported"),
               "clips": len(clips), "max_clip_s": args.max_clip_s,
               "mean_clip_s": sum(r["duration_s"] for r in rows) / len(rows),
               "flags": " ".join(flags), "low_queue": args.low_queue,
               "low_queue_capacity": 1 + args.low_queue, "runs": {}}
        with server(ck, *flags) as (url, startup):
            health = json.loads(_get(f"{url}/health"))
            res.update(common.stamp(health["threads"]), recipe=health["recipe"],
                       startup_s=startup)
            # Untimed: one request per clip, each checked (the first calls pay one-time costs).
            warm = load(url, clips, want, len(clips), 1)
            if warm["ok"] != len(clips) or warm["mismatched"]:
                raise SystemExit(f"error: the server's answers differ from sweep.transcribe's: "
                                 f"{warm}")
            res["runs"]["load"] = load(url, clips, want, args.requests, args.clients)
        write(res, out)  # kept even if the second server fails
        low = ["--workers", "1", "--queue", str(args.low_queue)] + flags[4:]
        with server(ck, *low) as (url, _):
            res["runs"]["low-queue"] = load(url, clips, want, args.requests, args.clients)
    write(res, out)
    print(markdown(res))
    bad = sum(r["failed"] + r["lost"] + r["mismatched"] for r in res["runs"].values())
    return 1 if bad or not res["runs"]["low-queue"]["busy_503"] else 0


def write(res: dict, out: Path) -> None:
    common.write_json(out / "serve.json", res)
    (out / "serve.md").write_text(markdown(res), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
