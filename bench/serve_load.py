"""`python -m bench.serve_load`: a bounded load test of `python -m sweep.serve` over loopback.

Starts the server (a subprocess, as users start it) on an exported checkpoint (default: the
embedded whisper-base exported with `--recipe`), checks one answer per clip against
`sweep.transcribe`'s transcript, then sends `--requests` requests from `--clients` concurrent
clients (short shared Russian clips, round robin) and reports latency p50/p95, throughput, and
failed / lost / mismatched requests (all must be 0). A second server with `--low-queue` waiting
slots gets the same load without retries: its 503s and their Retry-After are counted, and every
admitted request must still be answered right. Writes bench/results/serve.json and serve.md.

`--batching N` (issue #28) compares instead a batch-1 server (`--max-batch 1`) with a batching
one (`--max-batch N --batch-wait-ms W`) at each `--concurrency` (default 1, 4, 16), the two
servers running side by side and loaded in turn at each level (interleaved): throughput
(requests and audio seconds per second) and p95 latency, every request answered 200 or 503
(none failed, lost or answered with another text). Writes serve-batching.json and .md.
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


def batching(ck: Path, clips, want, args, flags: list[str], durations: list[float]) -> dict:
    """The batch-1 and the batching server at each concurrency, loaded in turn."""
    kinds = {"batch-1": ["--max-batch", "1"],
             f"batch-{args.batching}": ["--max-batch", str(args.batching), "--batch-wait-ms",
                                        f"{args.batch_wait_ms:g}"]}
    most = max(args.concurrency)
    base = flags + ["--queue", str(max(most, args.clients))]
    runs: dict = {k: {} for k in kinds}
    mean_s = sum(durations) / len(durations)
    with server(ck, *base, *kinds["batch-1"]) as (one, startup), \
            server(ck, *base, *list(kinds.values())[1]) as (many, _):
        health = json.loads(_get(f"{one}/health"))
        for url in (one, many):  # untimed: one-time costs, and every answer checked
            warm = load(url, clips, want, len(clips), 1)
            if warm["ok"] != len(clips) or warm["mismatched"]:
                raise SystemExit(f"error: the server's answers differ from sweep.transcribe's: "
                                 f"{warm}")
        for c in args.concurrency:
            for kind, url in zip(kinds, (one, many)):
                print(f"{kind}, {c} concurrent clients", file=sys.stderr)
                r = load(url, clips, want, max(args.requests, c), c)
                r["audio_s_per_s"] = r["throughput_rps"] * mean_s  # clips sent round robin
                runs[kind][str(c)] = r
    top, (k1, kn) = str(most), list(kinds)
    gain = runs[kn][top]["throughput_rps"] / max(runs[k1][top]["throughput_rps"], 1e-9)
    return {"health": health, "startup_s": startup,
            "kinds": {k: " ".join(v) for k, v in kinds.items()}, "runs": runs,
            "concurrency": args.concurrency, f"gain_at_{top}": gain,
            "p95_no_worse_at_" + top: runs[kn][top]["latency_p95_s"]
            <= runs[k1][top]["latency_p95_s"],
            "all_answered": all(r["lost"] == 0 and r["failed"] == 0
                                for v in runs.values() for r in v.values()),
            # batch-1 answers are sweep.transcribe's exactly; a batch may differ from them
            # where a kernel's numbers depend on the batch (per-tensor dynamic int8 scales its
            # activations by the whole batch's range)
            "batch1_right": all(r["mismatched"] == 0 for r in runs[k1].values()),
            "batched_differ": sum(r["mismatched"] for r in runs[kn].values())}


def batching_markdown(res: dict) -> str:
    b, m = res["batching"], res["machine"]
    head = ["server", "clients", "requests", "200", "503", "failed", "lost", "text differs",
            "p50 s", "p95 s", "req/s", "audio s/s"]
    rows = [[k, c, r["requests"], r["ok"], r["busy_503"], r["failed"], r["lost"],
             r["mismatched"], f"{r['latency_p50_s']:.3f}", f"{r['latency_p95_s']:.3f}",
             f"{r['throughput_rps']:.2f}", f"{r['audio_s_per_s']:.1f}"]
            for c in map(str, b["concurrency"]) for k, v in b["runs"].items() for r in [v[c]]]
    top = str(max(b["concurrency"]))
    return "\n".join([
        "# sweep.serve: batch-1 against dynamic batching (loopback)", "",
        f"- date: {res['date']}; commit: {res['commit']}",
        f"- machine: {common.describe_machine(m)}",
        f"- ISA flags: {', '.join(res['isa_flags']) or 'none'}; kernels: {res['isa_note']}",
        f"- checkpoint: {res['checkpoint']} (recipe: {res['recipe']})",
        f"- clips: {res['clips']} shared Russian clips up to {res['max_clip_s']:g} s "
        f"(mean {res['mean_clip_s']:.2f} s), round robin; servers: "
        + "; ".join(f"{k}: {v}" for k, v in b["kinds"].items()) + f"; flags {res['flags']}",
        "", common.md_table(head, rows), "",
        f"At {top} clients the batching server's throughput is {b['gain_at_' + top]:.2f}x the "
        f"batch-1 server's, p95 {'no worse' if b['p95_no_worse_at_' + top] else 'worse'}; "
        f"every request answered 200 or 503 (none failed or lost): {b['all_answered']}; the "
        f"batch-1 server's texts are sweep.transcribe's: {b['batch1_right']}; the batching "
        f"server's differ from them in {b['batched_differ']} answers (a batch changes the "
        "numbers of kernels that scale by the whole batch, e.g. per-tensor dynamic int8). "
        "Both servers run side by side, loaded in turn at each level.", ""])


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
    ap.add_argument("--batching", type=int, default=0, metavar="N",
                    help="compare a batch-1 server with one batching up to N requests at each "
                         "--concurrency (instead of the load and low-queue runs)")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0,
                    help="--batch-wait-ms of the batching server")
    ap.add_argument("--concurrency", default="1,4,16",
                    type=lambda v: [int(x) for x in v.split(",")],
                    help="concurrent clients of the --batching comparison, comma-separated")
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
        if args.batching:
            flags = flags[:2] + flags[4:]  # each server's queue holds the most clients
        res = {"isa_flags": [f for f in ISA if f in cpu_flags()], "isa_note": decode.isa_note(),
               "checkpoint": str(args.checkpoint or "embedded whisper-base, exported"),
               "clips": len(clips), "max_clip_s": args.max_clip_s,
               "mean_clip_s": sum(r["duration_s"] for r in rows) / len(rows),
               "flags": " ".join(flags), "low_queue": args.low_queue,
               "low_queue_capacity": 1 + args.low_queue, "runs": {}}
        if args.batching:
            res["batching"] = batching(ck, clips, want, args, flags,
                                       [r["duration_s"] for r in rows])
            health = res["batching"].pop("health")
            res.update(common.stamp(health["threads"]), recipe=health["recipe"],
                       startup_s=res["batching"].pop("startup_s"))
            common.write_json(out / "serve-batching.json", res)
            (out / "serve-batching.md").write_text(batching_markdown(res), encoding="utf-8")
            print(batching_markdown(res))
            ok = res["batching"]["all_answered"] and res["batching"]["batch1_right"]
            return 0 if ok else 1
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
