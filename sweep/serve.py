"""`python -m sweep.serve --checkpoint DIR`: an OpenAI-compatible transcription server for an
exported checkpoint (FastAPI on uvicorn), so clients of other Whisper servers work unchanged.

Routes:
- `POST /v1/audio/transcriptions` (and `/v1/audio/translations`, to English): multipart fields
  - `file` (required): the audio, anything libsndfile reads (wav, flac, ogg/opus, mp3); averaged
    and resampled to 16 kHz mono like every evaluation set;
  - `model`: any value (clients always send one; this server has one model);
  - `language`: a code or name of the model's languages (`ru`, `russian`); absent: the language
    the checkpoint was measured in (metrics.json), else Whisper's language detection;
  - `response_format`: `json` (default, `{"text": ...}`), `text`, or `verbose_json` (task,
    language, duration, text and one segment spanning the clip with its tokens);
  - `temperature` only 0 and `prompt` only empty, `stream` only false, `timestamp_granularities[]`
    only `segment`: the checkpoint decodes greedily and unprompted, as its trial was measured, so
    any other value is a 400 that says so, never silently another decoding.
- `GET /health`; `GET /metrics` (Prometheus text, or JSON with `?format=json`): requests by route
  and status, latency p50/p95, queue depth, requests in flight.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 413 over
the upload limit (Content-Length first, then counted while reading), 415 for a body that is not
multipart or a file that is not audio, 400 for an empty or undecodable file or a wrong field, 503
with `Retry-After` when the queue is full. Audio is decoded before it is queued, so bad input
fails fast. A bounded pool of `--workers` threads decodes, each with its own copy of the model
(decoding state lives per model); SIGINT/SIGTERM stop accepting and finish every admitted request.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import queue
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.requests import Request  # module level: FastAPI reads the routes' annotations

FORMATS = ("json", "text", "verbose_json")
ROUTES = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}
FIELDS = {  # the form fields each route reads; any other is a 400 naming them
    "transcribe": ("file", "model", "language", "prompt", "response_format", "temperature",
                   "timestamp_granularities[]", "stream"),
    "translate": ("file", "model", "prompt", "response_format", "temperature"),
}
FORM_SLACK = 64 * 1024  # multipart boundaries and the small fields, on top of the file itself
WINDOW = 1024  # latencies kept per route for the percentiles
MIN_RATE, MAX_RATE = 4000, 384_000  # sample rates taken (1 Hz would resample 16000-fold)


class ApiError(Exception):
    """A request answered with `status` and OpenAI's error body; the message names the rule."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def body(self) -> dict:
        kind = ("invalid_request_error" if self.status < 500 else
                "server_overloaded" if self.status == 503 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True)
class ServeOptions:
    checkpoint: str  # an exported checkpoint directory (`python -m sweep.export`)
    host: str = "127.0.0.1"  # loopback only unless asked: no authentication here
    port: int = 8000  # 0: any free port (the ready line says which)
    workers: int = 1  # requests decoded at once, each worker with its own copy of the model
    queue: int = 8  # admitted requests waiting beyond the workers'; past it 503 + Retry-After
    max_upload_mb: float = 25.0  # request body limit (OpenAI's own file limit is 25 MB)
    max_audio_s: float = 1800.0  # longest audio taken: long files decode window by window
    threads: int | None = None  # torch CPU threads; default: the cores shared by the workers
    device: str | None = None  # default: the device the checkpoint's recipe was measured on
    warmup: bool = True  # decode 1 s of silence per worker before listening (first-call costs)
    verbose: bool = False  # uvicorn's info log and access log

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"`port` must be in [0, 65535], got {self.port=}")
        if self.workers < 1:
            raise ValueError(f"`workers` must be at least 1, got {self.workers=}")
        if self.queue < 0:
            raise ValueError(f"`queue` must be at least 0, got {self.queue=}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"`max_upload_mb` must be > 0, got {self.max_upload_mb=}")
        if not self.max_audio_s > 0:
            raise ValueError(f"`max_audio_s` must be > 0, got {self.max_audio_s=}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"`threads` must be at least 1, got {self.threads=}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


# ---- audio -----------------------------------------------------------------------------------


def decode_upload(data: bytes, name: str = "file", max_s: float | None = None) -> np.ndarray:
    """float32 16 kHz mono samples of an uploaded file, or an ApiError: 400 empty, undecodable,
    an odd sample rate or longer than `max_s` seconds (checked from the header, before
    decoding: a small mp3 can hold hours), 415 not a format libsndfile knows."""
    import soundfile as sf

    from .inputs.data import to_mono_16k

    if not data:
        raise ApiError(400, f"`file` ({name}) is empty: upload the audio bytes", "file")
    try:
        head = sf.info(io.BytesIO(data))
        if not MIN_RATE <= head.samplerate <= MAX_RATE:
            raise ApiError(400, f"`file` ({name}) sample rate must be in [{MIN_RATE}, {MAX_RATE}]"
                           f" Hz, got {head.samplerate}", "file")
        if max_s is not None and head.frames / head.samplerate > max_s:
            raise ApiError(400, f"`file` ({name}) must be at most {max_s:g} s of audio "
                           f"(--max-audio-s), got {head.frames / head.samplerate:.0f} s", "file")
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except ApiError:
        raise
    except Exception as e:  # LibsndfileError, RuntimeError, TypeError on odd headers...
        why = getattr(e, "error_string", "") or str(e)
        if "format not recognised" in why.lower():
            raise ApiError(415, f"`file` ({name}, {len(data)} bytes) is not audio this server "
                           "reads: send wav, flac, ogg/opus or mp3", "file") from None
        raise ApiError(400, f"`file` ({name}) cannot be decoded as audio: {why.strip()}",
                       "file") from None
    if not samples.shape[0]:
        raise ApiError(400, f"`file` ({name}) holds no samples", "file")
    if not np.isfinite(samples).all():
        raise ApiError(400, f"`file` ({name}) holds non-finite samples (NaN or inf)", "file")
    return to_mono_16k(samples, sr)


# ---- languages -------------------------------------------------------------------------------


def language_code(model, value: str | None) -> str | None:
    """A request's `language` as the model's code (`ru`), accepting names (`russian`); None when
    absent. English-only models take only English."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    code = TO_LANGUAGE_CODE.get(v, v)
    gc = model.generation_config
    known = sorted(t.strip("<|>") for t in (getattr(gc, "lang_to_id", None) or {}))
    if not getattr(gc, "is_multilingual", False):
        known = ["en"]
    if code not in known:
        raise ApiError(400, f"`language` must be a language of the model, as a code or name "
                       f"(e.g. {', '.join(known[:4])}; {len(known)} in all), got {value!r}",
                       "language")
    return code


def detect_language(ck, audio: np.ndarray) -> str:
    """Whisper's own language detection on the first 30 s (one decoder step)."""
    import torch

    from .inputs.data import SAMPLE_RATE
    from .transcribe import WINDOW_S, _input_dtype

    gc = ck.model.generation_config
    if not getattr(gc, "is_multilingual", False):
        return "en"
    feats = ck.processor.feature_extractor(audio[:int(WINDOW_S * SAMPLE_RATE)],
                                           sampling_rate=SAMPLE_RATE,
                                           return_tensors="pt").input_features
    device = next(ck.model.parameters()).device
    with torch.inference_mode():
        lang = int(ck.model.detect_language(
            input_features=feats.to(device=device, dtype=_input_dtype(ck.model)))[0])
    return {v: k for k, v in gc.lang_to_id.items()}[lang].strip("<|>")


def run(ck, audio: np.ndarray, language: str | None, default: str | None, task: str) -> dict:
    """One request's decoding on a worker: `language` as asked, else the checkpoint's, else
    detected; then the same transcription as `python -m sweep.transcribe`."""
    from .transcribe import transcribe_audio

    lang = language or default or detect_language(ck, audio)
    return transcribe_audio(ck, audio, language=lang, task=task)


# ---- the worker pool -------------------------------------------------------------------------


class Pool:
    """`len(checkpoints)` worker threads, each owning one loaded checkpoint, and admission of at
    most workers + `queue_limit` requests at once (from before their upload is read, so memory
    stays bounded too). An admitted request keeps its slot until its worker is done with it,
    whatever the client does meanwhile."""

    def __init__(self, checkpoints: list, queue_limit: int):
        self.checkpoints, self.queue_limit = checkpoints, queue_limit
        self.capacity = len(checkpoints) + queue_limit
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.admitted = self.queued = self.running = 0
        self.model_s: deque = deque(maxlen=WINDOW)  # seconds per job, for Retry-After
        self.threads = [threading.Thread(target=self._work, args=(ck,), daemon=True,
                                         name=f"hyper-serve-{i}")
                        for i, ck in enumerate(checkpoints)]
        for t in self.threads:
            t.start()

    def admit(self) -> bool:
        with self.lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        """An admitted request that ended before reaching a worker (bad input, disconnect)."""
        with self.lock:
            self.admitted -= 1

    def submit(self, fn: Callable) -> asyncio.Future:
        """`fn(checkpoint)` on the next free worker; its result (or error) in the future."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self.lock:
            self.queued += 1
        self.jobs.put((fn, fut, loop))
        return fut

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the work ahead at the median job time."""
        with self.lock:
            ahead, times = self.queued + self.running, sorted(self.model_s)
        median = times[len(times) // 2] if times else 1.0
        return max(1, math.ceil(median * max(ahead, 1) / len(self.checkpoints)))

    def _work(self, ck) -> None:
        while (item := self.jobs.get()) is not None:
            fn, fut, loop = item
            with self.lock:
                self.queued -= 1
                self.running += 1
            t0 = time.perf_counter()
            try:
                ok, out = True, fn(ck)
            except BaseException as e:  # the worker outlives any one request's failure
                ok, out = False, e
            with self.lock:
                self.running -= 1
                self.admitted -= 1
                self.model_s.append(time.perf_counter() - t0)
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, out)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                pass

    def close(self) -> None:
        """Finish every queued job, then stop the workers."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()

    def state(self) -> dict:
        with self.lock:
            return {"workers": len(self.checkpoints), "queue_limit": self.queue_limit,
                    "admitted": self.admitted, "queued": self.queued, "in_flight": self.running}


def _settle(fut: asyncio.Future, ok: bool, out) -> None:
    if not fut.done():
        fut.set_result(out) if ok else fut.set_exception(out)


# ---- metrics ---------------------------------------------------------------------------------


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of `values`, None when empty."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] if v else None


class Metrics:
    """Requests by route and status, and the latencies of the last answered requests."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.latency: dict[str, deque] = {r: deque(maxlen=WINDOW) for r in ROUTES}
        self.started = time.time()

    def record(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.counts[(route, status)] += 1
            if status == 200 and route in self.latency:
                self.latency[route].append(seconds)

    def snapshot(self, pool: Pool) -> dict:
        with self.lock:
            counts = [{"route": r, "status": s, "count": n}
                      for (r, s), n in sorted(self.counts.items())]
            lat = {r: list(d) for r, d in self.latency.items()}
        return {"uptime_s": time.time() - self.started, "requests": counts,
                "latency_s": {r: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95),
                                  "count": len(v)} for r, v in lat.items()},
                **pool.state()}


def prometheus(snap: dict) -> str:
    """The snapshot in Prometheus' text exposition format."""
    out = ["# HELP hyper_requests_total Requests answered, by route and HTTP status.",
           "# TYPE hyper_requests_total counter"]
    out += [f'hyper_requests_total{{route="{c["route"]}",status="{c["status"]}"}} {c["count"]}'
            for c in snap["requests"]]
    out += ["# HELP hyper_request_latency_seconds Latency of the last answered requests.",
            "# TYPE hyper_request_latency_seconds summary"]
    for route, lat in snap["latency_s"].items():
        for q in ("p50", "p95"):
            if lat[q] is not None:
                out.append(f'hyper_request_latency_seconds{{route="{route}",'
                           f'quantile="0.{q[1:]}"}} {lat[q]:.6f}')
        out.append(f'hyper_request_latency_seconds_count{{route="{route}"}} {lat["count"]}')
    for key, kind, text in (("queued", "gauge", "Requests waiting for a worker."),
                            ("in_flight", "gauge", "Requests being decoded."),
                            ("admitted", "gauge", "Requests admitted: uploading, queued or "
                                                  "decoding."),
                            ("workers", "gauge", "Worker threads (model copies)."),
                            ("queue_limit", "gauge", "Requests allowed to wait."),
                            ("uptime_s", "gauge", "Seconds since start.")):
        out += [f"# HELP hyper_{key} {text}", f"# TYPE hyper_{key} {kind}",
                f"hyper_{key} {snap[key]:g}"]
    return "\n".join(out) + "\n"


def _measured(app, metrics: Metrics):
    """ASGI middleware: every HTTP request's route, status and latency into `metrics`."""
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
        try:
            await app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            route = path if path in ROUTES or path in ("/health", "/metrics") else "other"
            metrics.record(route, status[0], time.perf_counter() - t0)
    return asgi


# ---- the application -------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_form(request, limit: int):
    """The multipart form, its body counted as it arrives: past `limit` bytes, a 413."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    seen = 0

    async def receive():
        nonlocal seen
        msg = await request.receive()
        seen += len(msg.get("body", b""))
        if seen > limit:
            raise _TooLarge
        return msg
    try:
        return await Request(request.scope, receive).form(max_files=4, max_fields=16,
                                                           max_part_size=FORM_SLACK)
    except _TooLarge:
        raise ApiError(413, f"the request body is over the upload limit of {limit} bytes "
                       f"(read {seen} before stopping)", "file") from None
    except HTTPException as e:  # python-multipart's parse errors, as Starlette reports them
        raise ApiError(400, f"the multipart body cannot be parsed: {e.detail}") from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the body was read") from None


def _one(form, key: str):
    values = form.getlist(key)
    if len(values) > 1:
        raise ApiError(400, f"`{key}` must be given once, got {len(values)} values", key)
    return values[0] if values else None


def _text(form, key: str) -> str | None:
    v = _one(form, key)
    if v is not None and not isinstance(v, str):
        raise ApiError(400, f"`{key}` must be a text field, got a file part", key)
    return v


def parse_fields(form, task: str) -> dict:
    """The request's fields, checked: the rule, what was given and what is allowed."""
    names = list(dict.fromkeys(form.keys()))
    upload = _one(form, "file")
    if upload is None:
        raise ApiError(400, f"`file` is required (the audio as a multipart file part); got "
                       f"fields {names}", "file")
    if isinstance(upload, str):
        raise ApiError(400, "`file` must be a file part (multipart with a filename), got a "
                       "text field", "file")
    if unknown := [n for n in names if n not in FIELDS[task]]:
        raise ApiError(400, f"unknown field(s) {unknown}; this route reads {list(FIELDS[task])}",
                       unknown[0])
    fmt = _text(form, "response_format") or "json"
    if fmt not in FORMATS:
        raise ApiError(400, f"`response_format` must be one of {FORMATS}, got {fmt!r}",
                       "response_format")
    temp = _text(form, "temperature")
    try:
        t = float(temp) if temp not in (None, "") else 0.0
    except ValueError:
        t = None
    if t != 0.0:
        raise ApiError(400, f"`temperature` must be 0 (the checkpoint decodes greedily, as its "
                       f"trial was measured), got {temp!r}", "temperature")
    if prompt := (_text(form, "prompt") or "").strip():
        raise ApiError(400, f"`prompt` must be empty (the checkpoint decodes unprompted, as its "
                       f"trial was measured), got {len(prompt)} characters", "prompt")
    if (stream := (_text(form, "stream") or "false").lower()) not in ("false", "0"):
        raise ApiError(400, f"`stream` must be false (whole responses only), got {stream!r}",
                       "stream")
    grains = [g for g in form.getlist("timestamp_granularities[]") if g != "segment"]
    if grains:
        raise ApiError(400, f"`timestamp_granularities[]` may only hold 'segment', got {grains}",
                       "timestamp_granularities[]")
    return {"upload": upload, "format": fmt, "language": _text(form, "language")}


def _reply(row: dict, fmt: str):
    from fastapi.responses import JSONResponse, PlainTextResponse
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    if fmt == "text":
        return PlainTextResponse(row["text"])
    if fmt == "json":
        return JSONResponse({"text": row["text"]})
    dur = round(row["duration_s"], 3)
    return JSONResponse({
        "task": row["task"], "language": LANGUAGES.get(row["language"], row["language"]),
        "duration": dur, "text": row["text"],
        "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": dur, "text": row["text"],
                      "tokens": row["tokens"], "temperature": 0.0}]})


def make_app(pool: Pool, opts: ServeOptions, about: dict):
    """The ASGI app over a started `pool`; `about` is what /health says of the checkpoint."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    ck = pool.checkpoints[0]
    default = about.get("language")
    limit = opts.max_upload_bytes + FORM_SLACK
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(pool.close)  # connections are done: drain what is queued

    app = FastAPI(title="HYPER transcription", lifespan=lifespan, docs_url=None,
                  redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request, e: Exception):  # a bug, not bad input: said, logged, survived
        import logging

        logging.getLogger("sweep.serve").exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()}").body(),
                            status_code=400)

    async def audio(request: Request, task: str):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            raise ApiError(413, f"the request body ({int(size)} bytes) is over the upload limit "
                           f"of {limit} bytes (--max-upload-mb {opts.max_upload_mb:g} and "
                           "the form's fields)", "file")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415, f"the body must be multipart/form-data with a `file` part, got "
                           f"content-type {ctype or 'none'!r}")
        if not pool.admit():
            raise ApiError(503, f"the server is busy: {pool.capacity} requests admitted "
                           f"({len(pool.checkpoints)} decoding, {pool.queue_limit} waiting); "
                           "retry later", headers={"Retry-After": str(pool.retry_after())})
        submitted, form = False, None
        try:
            form = await _read_form(request, limit)
            fields = parse_fields(form, task)
            lang = language_code(ck.model, fields["language"])
            name = fields["upload"].filename or "upload"
            data = await fields["upload"].read()
            samples = await asyncio.to_thread(decode_upload, data, name, opts.max_audio_s)
            fut = pool.submit(lambda c: run(c, samples, lang, default, task))
            submitted = True
            row = await asyncio.shield(fut)  # a cancelled handler leaves the work to finish
        finally:
            if not submitted:
                pool.leave()
            if form is not None:
                await form.close()
        return _reply(row, fields["format"])

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await audio(request, "translate")

    @app.get("/health")
    async def health():
        return {"status": "ok", **about, **pool.state()}

    @app.get("/metrics")
    async def metrics_route(format: str = "prometheus"):
        if format not in ("prometheus", "json"):
            raise ApiError(400, f"`format` must be prometheus or json, got {format!r}", "format")
        snap = metrics.snapshot(pool)
        if format == "json":
            return snap
        return PlainTextResponse(prometheus(snap), media_type="text/plain; version=0.0.4")

    return _measured(app, metrics)


# ---- the command -----------------------------------------------------------------------------


def start_pool(opts: ServeOptions) -> tuple[Pool, dict]:
    """Load one checkpoint per worker (each decodes with its own state) and warm each up."""
    import torch

    from .ship.checkpoint import load
    from .transcribe import default_language

    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // opts.workers))
    cks = [load(opts.checkpoint, device=opts.device) for _ in range(opts.workers)]
    lang = default_language(cks[0])
    if opts.warmup:
        silence = np.zeros(16000, dtype=np.float32)
        for ck in cks:
            run(ck, silence, None, lang or "en", "transcribe")
    about = {"checkpoint": str(Path(opts.checkpoint).resolve()),
             "recipe": cks[0].recipe.describe(), "language": lang,
             "device": cks[0].recipe.device, "threads": torch.get_num_threads()}
    return Pool(cks, opts.queue), about


def listen(host: str, port: int):
    """The bound socket, before the model loads: a taken port fails in a second, not after."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def build(opts: ServeOptions, ready: Callable[[str], None] | None = None):
    """(uvicorn server, its bound socket): the port first, then the model; `.run(sockets=[sock])`
    serves until SIGINT/SIGTERM or `should_exit`, calling `ready(url)` once listening."""
    import uvicorn

    sock = listen(opts.host, opts.port)
    try:
        pool, about = start_pool(opts)
    except BaseException:
        sock.close()
        raise
    app = make_app(pool, opts, about)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and ready:
                ready(url_of(sock))

    level = "info" if opts.verbose else "warning"
    config = uvicorn.Config(app, log_level=level, access_log=opts.verbose, lifespan="on",
                            timeout_graceful_shutdown=None)
    return Server(config), sock


def url_of(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(opts: ServeOptions, ready: Callable[[str], None] | None = None) -> None:
    """Load, listen, and serve until SIGINT/SIGTERM; `ready(url)` once listening."""
    server, sock = build(opts, ready)
    server.run(sockets=[sock])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweep.serve", description=(
        "Serve an exported checkpoint over HTTP with OpenAI's transcription API "
        "(POST /v1/audio/transcriptions), plus GET /health and GET /metrics."))
    ap.add_argument("--checkpoint", required=True, help="the exported checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback only: no authentication)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    ap.add_argument("--workers", type=int, default=1,
                    help="requests decoded at once; each worker loads its own model copy")
    ap.add_argument("--queue", type=int, default=8,
                    help="requests allowed to wait for a worker; beyond, 503 with Retry-After")
    ap.add_argument("--max-upload-mb", type=float, default=25.0,
                    help="largest audio upload in MB; a larger body gets 413")
    ap.add_argument("--max-audio-s", type=float, default=1800.0,
                    help="longest audio in seconds; longer gets 400 before decoding")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: the cores divided among the workers)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="default: the device the checkpoint's recipe was measured on")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip decoding 1 s of silence per worker before listening")
    ap.add_argument("--verbose", action="store_true", help="uvicorn's log and access log too")
    args = ap.parse_args(argv)
    if args.verbose:
        from . import console

        console.set_verbose()
    try:
        opts = ServeOptions(args.checkpoint, args.host, args.port, args.workers, args.queue,
                            args.max_upload_mb, args.max_audio_s, args.threads, args.device,
                            warmup=not args.no_warmup, verbose=args.verbose)
        serve(opts, ready=lambda url: print(
            f"HYPER serving {opts.checkpoint} at {url}/v1/audio/transcriptions ({opts.workers} "
            f"worker(s), queue {opts.queue}, upload limit {opts.max_upload_mb:g} MB); "
            "Ctrl-C stops after the requests in flight", flush=True))
    except ValueError as e:  # CheckpointError, RecipeError, options: clear messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, the address is not ours
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
