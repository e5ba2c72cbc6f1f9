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
- `GET /health` (no paths; open without the API key); `GET /metrics` (Prometheus text, or JSON
  with `?format=json`): requests by route and status, latency p50/p95, queue depth, requests in
  flight, decodes started, requests cancelled (client gone) and bodies timed out.

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 413 over
the upload limit (Content-Length first, then counted while reading) or for audio whose header
declares more samples than `--max-audio-s` of 48 kHz stereo (a compressed bomb, refused before
decoding), 408 for a body not received within `--read-timeout-s` (one deadline for the whole
body), 415 for a body that is not multipart or a file that is not audio, 400 for an empty or
undecodable file or a wrong field, 401 without the API key when one is set, 403 for a Host or
Origin header that is not this server's (DNS rebinding, web pages posting to localhost), 503 with
`Retry-After` when the queue is full or memory ran out, 500 for a bug (logged; its text is never
sent). Audio is decoded before it is queued, so bad input fails fast. A bounded pool of
`--workers` threads decodes, each with its own copy of the model (decoding state lives per
model); queued work whose client hung up is dropped (`cancelled` in /metrics). Dynamic
batching (`--max-batch N`, `--batch-wait-ms W`): a worker that takes a request waits up to W ms
for more of the same language and task, up to N, and decodes them as one batch; every upload
is segmented as its recipe says (a long one into 30 s windows or VAD speech pieces) and the
pieces of all of them are batched (`sweep.measure.batch`). SIGINT/SIGTERM
stop accepting and finish every admitted request, for at most `--shutdown-timeout-s`.
See docs/serve.md for what is and is not protected.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import io
import ipaddress
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.requests import Request  # module level: FastAPI reads the routes' annotations

from . import console

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
# Samples per second of audio a decode may hold, frames x channels: 48 kHz stereo. A few KB of
# FLAC can declare 8 channels at 384 kHz (32x this), which would be decoded before being resampled.
ORDINARY_RATE = 48_000 * 2
BLOCK = 1 << 16  # frames decoded at a time: the multichannel buffer stays small
READ_S_PER_MB, MIN_READ_S = 3.0, 10.0  # default body deadline: 3 s per MB of the limit, >= 10 s
LOOPBACK = ("localhost", "127.0.0.1", "::1")
MAX_BATCH, MAX_WAIT_MS = 64, 10_000  # --max-batch, --batch-wait-ms ranges
OPEN_PATHS = ("/health",)  # answered without the API key: orchestrators' liveness probes
log = logging.getLogger("sweep.serve")


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
    host: str = "127.0.0.1"  # loopback only unless asked
    port: int = 8000  # 0: any free port (the ready line says which)
    workers: int = 1  # requests decoded at once, each worker with its own copy of the model
    queue: int = 8  # admitted requests waiting beyond the workers'; past it 503 + Retry-After
    max_upload_mb: float = 25.0  # request body limit (OpenAI's own file limit is 25 MB)
    max_audio_s: float = 1800.0  # longest audio taken: long files decode window by window
    threads: int | None = None  # torch CPU threads; default: the cores shared by the workers
    device: str | None = None  # default: the device the checkpoint's recipe was measured on
    warmup: bool = True  # decode 1 s of silence per worker before listening (first-call costs)
    verbose: bool = False  # uvicorn's info log and access log
    # One deadline for the whole body (not an idle timeout: a byte a second would reset that),
    # so a trickling client frees its slot; None: READ_S_PER_MB per MB of the limit.
    read_timeout_s: float | None = None
    shutdown_timeout_s: float = 30.0  # SIGTERM: requests still running after this are cut off
    allowed_hosts: tuple[str, ...] = ()  # Host names taken besides loopback's and --host's
    api_key: str | None = field(default=None, repr=False)  # `Authorization: Bearer KEY`
    max_batch: int = 1  # requests decoded together (1: one at a time)
    batch_wait_ms: float = 10.0  # how long a worker waits for a batch to fill

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"`port` must be in [0, 65535], got {self.port=}")
        if self.workers < 1:
            raise ValueError(f"`workers` must be at least 1, got {self.workers=}")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ValueError(f"`max_batch` must be in [1, {MAX_BATCH}], got {self.max_batch=}")
        if not 0 <= self.batch_wait_ms <= MAX_WAIT_MS:
            raise ValueError(f"`batch_wait_ms` must be in [0, {MAX_WAIT_MS}] ms, got "
                             f"{self.batch_wait_ms=}")
        if self.queue < 0:
            raise ValueError(f"`queue` must be at least 0, got {self.queue=}")
        if not self.max_upload_mb > 0:
            raise ValueError(f"`max_upload_mb` must be > 0, got {self.max_upload_mb=}")
        if not self.max_audio_s > 0:
            raise ValueError(f"`max_audio_s` must be > 0, got {self.max_audio_s=}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"`threads` must be at least 1, got {self.threads=}")
        if self.read_timeout_s is not None and not 0 < self.read_timeout_s < math.inf:
            raise ValueError(f"`read_timeout_s` must be > 0 seconds, got {self.read_timeout_s=}")
        if not 0 <= self.shutdown_timeout_s < math.inf:
            raise ValueError(f"`shutdown_timeout_s` must be >= 0 seconds, got "
                             f"{self.shutdown_timeout_s=}")
        hosts = tuple(h.strip().lower().strip("[]") for h in self.allowed_hosts)
        for h in hosts:
            if not re.fullmatch(r"\*|[a-z0-9_.-]+|[0-9a-f:.]+", h):
                raise ValueError("`allowed_hosts` entries must be a host name or IP address "
                                 f"(no scheme, port or path) or '*', got {h!r}")
        object.__setattr__(self, "allowed_hosts", hosts)
        key = self.api_key
        if key is not None and (len(key) < 16 or not re.fullmatch(r"[\x21-\x7e]+", key)):
            # the key itself is never printed: it is a secret
            raise ValueError(f"`api_key` must be at least 16 visible ASCII characters without "
                             f"spaces (e.g. `python -c 'import secrets; print(secrets."
                             f"token_urlsafe())'`), got {len(key)} characters")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def body_timeout_s(self) -> float:
        return self.read_timeout_s or max(MIN_READ_S, READ_S_PER_MB * self.max_upload_mb)

    @property
    def max_samples(self) -> int:
        """Decoded samples (frames x channels) an upload may hold: `max_audio_s` of 48 kHz
        stereo."""
        return int(self.max_audio_s * ORDINARY_RATE)

    def hosts(self) -> frozenset[str] | None:
        """Host header names answered (None: any, with `*`): loopback's, --host's unless a
        wildcard, and --allowed-host's."""
        if "*" in self.allowed_hosts:
            return None
        own = () if _wildcard(self.host) else (self.host.lower().strip("[]"),)
        return frozenset((*LOOPBACK, *own, *self.allowed_hosts))

    def warnings(self) -> list[str]:
        if _loopback(self.host) or self.api_key:
            return []
        return [f"listening on {self.host} without an API key: anyone who can reach this port "
                "can transcribe. Set HYPER_API_KEY (or --api-key), and put a TLS reverse proxy "
                "in front (docs/serve.md)"]


def _wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


def _loopback(host: str) -> bool:
    h = host.lower().strip("[]")
    try:
        return h == "localhost" or ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# ---- audio -----------------------------------------------------------------------------------


def audio_header(data: bytes, name: str = "file", max_s: float | None = None):
    """The upload's soundfile header, checked before a sample is decoded: an ApiError 400 for
    an empty file, an odd sample rate or more than `max_s` seconds (a small mp3 can hold hours),
    413 for more samples (frames x channels) than `max_s` of 48 kHz stereo (a few KB of FLAC
    can declare 8 channels at 384 kHz), 415 for a format libsndfile does not know."""
    import soundfile as sf

    if not data:
        raise ApiError(400, f"`file` ({name}) is empty: upload the audio bytes", "file")
    try:
        head = sf.info(io.BytesIO(data))
    except Exception as e:  # LibsndfileError, RuntimeError, TypeError on odd headers...
        raise _undecodable(e, name, len(data)) from None
    if not MIN_RATE <= head.samplerate <= MAX_RATE:
        raise ApiError(400, f"`file` ({name}) sample rate must be in [{MIN_RATE}, {MAX_RATE}]"
                       f" Hz, got {head.samplerate}", "file")
    if max_s is not None and head.frames / head.samplerate > max_s:
        raise ApiError(400, f"`file` ({name}) must be at most {max_s:g} s of audio "
                       f"(--max-audio-s), got {head.frames / head.samplerate:.0f} s", "file")
    if max_s is not None and head.frames * head.channels > (cap := int(max_s * ORDINARY_RATE)):
        raise ApiError(413, f"`file` ({name}) declares {head.frames} frames x {head.channels} "
                       f"channels at {head.samplerate} Hz = {head.frames * head.channels} samples "
                       f"to decode; at most {cap} are taken ({max_s:g} s of 48 kHz stereo, "
                       "--max-audio-s)", "file")
    return head


def decode_audio(data: bytes, name: str = "file", max_samples: int | None = None) -> np.ndarray:
    """float32 16 kHz mono samples, decoded block by block: only BLOCK frames of every channel
    are held at once, averaged into one mono buffer (float64 only when it is resampled, as
    `to_mono_16k` does: the samples equal `sweep.transcribe`'s). More than `max_samples`
    decoded (a header that lies) is a 413; running out of memory a 503, never "undecodable"."""
    import soundfile as sf

    from .inputs.data import SAMPLE_RATE, to_mono_16k

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, ch = f.samplerate, f.channels
            room = f.frames if max_samples is None else min(f.frames, max_samples // ch)
            mono = np.empty(max(room, 0), np.float32 if sr == SAMPLE_RATE else np.float64)
            extra, n = [], 0  # frames past the header's count (an estimate for some formats)
            while len(block := f.read(BLOCK, dtype="float32", always_2d=True)):
                if max_samples is not None and (n + len(block)) * ch > max_samples:
                    raise ApiError(413, f"`file` ({name}) decodes to more than its header "
                                   f"declared, past {max_samples} samples (--max-audio-s)",
                                   "file")
                if not np.isfinite(block).all():
                    raise ApiError(400, f"`file` ({name}) holds non-finite samples (NaN or "
                                   "inf)", "file")
                # to_mono_16k's mean (float64), row by row: the same values, a block at a time
                part = block[:, 0] if ch == 1 else block.astype(np.float64).mean(axis=1)
                fit = max(0, min(len(part), len(mono) - n))
                mono[n:n + fit] = part[:fit]
                if fit < len(part):
                    extra.append(part[fit:].astype(mono.dtype))
                n += len(part)
        mono = np.concatenate([mono, *extra]) if extra else mono[:n]
        if not n:
            raise ApiError(400, f"`file` ({name}) holds no samples", "file")
        return mono if sr == SAMPLE_RATE else to_mono_16k(mono, sr)
    except ApiError:
        raise
    except MemoryError:
        raise ApiError(503, f"`file` ({name}) could not be decoded now: the server is out of "
                       "memory; retry later, or send shorter audio", "file",
                       headers={"Retry-After": "5"}) from None
    except Exception as e:
        raise _undecodable(e, name, len(data)) from None


def decode_upload(data: bytes, name: str = "file", max_s: float | None = None) -> np.ndarray:
    """float32 16 kHz mono samples of an uploaded file: its header checked (`audio_header`),
    then decoded within `max_s` of 48 kHz stereo (`decode_audio`)."""
    audio_header(data, name, max_s)
    return decode_audio(data, name, None if max_s is None else int(max_s * ORDINARY_RATE))


def _undecodable(e: Exception, name: str, size: int) -> ApiError:
    if isinstance(e, MemoryError):  # not the file's fault: said as it is
        return ApiError(503, f"`file` ({name}) could not be read now: the server is out of "
                        "memory; retry later", "file", headers={"Retry-After": "5"})
    why = getattr(e, "error_string", "") or str(e)
    if "format not recognised" in why.lower():
        return ApiError(415, f"`file` ({name}, {size} bytes) is not audio this server "
                        "reads: send wav, flac, ogg/opus or mp3", "file")
    return ApiError(400, f"`file` ({name}) cannot be decoded as audio: {why.strip()}", "file")


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


def run_many(ck, audios: list[np.ndarray], key: tuple[str, str]) -> list[dict]:
    """Several requests of one (language, task) decoded together:
    `sweep.transcribe.transcribe_together`."""
    from .transcribe import transcribe_together

    lang, task = key
    return transcribe_together(ck, audios, language=lang, task=task)


# ---- the worker pool -------------------------------------------------------------------------


class Job:
    """One request's work: `fn(checkpoint)`, settled into `future` on the request's loop. With
    a `key` (language, task) it may be decoded in a batch with others of the same key, its
    `payload` (the samples) handed to the pool's `batch_fn`."""

    __slots__ = ("fn", "future", "loop", "state", "key", "payload")

    def __init__(self, fn: Callable, future: asyncio.Future, loop, key=None, payload=None):
        self.fn, self.future, self.loop, self.state = fn, future, loop, "queued"
        self.key, self.payload = key, payload


class Pool:
    """`len(checkpoints)` worker threads, each owning one loaded checkpoint, and admission of at
    most workers + `queue_limit` requests at once (from before their upload is read, so memory
    stays bounded too). An admitted request keeps its slot until its worker is done with it, its
    upload failed or timed out, or its client hung up before the work started (`cancel`).
    `max_batch` > 1: a worker that takes a job with a key waits up to `batch_wait_s` for more
    queued jobs of that key, up to `max_batch`, and runs them as one `batch_fn(checkpoint,
    payloads, key)`; jobs of other keys keep their place in the queue."""

    def __init__(self, checkpoints: list, queue_limit: int, max_batch: int = 1,
                 batch_wait_s: float = 0.0, batch_fn: Callable | None = None):
        self.checkpoints, self.queue_limit = checkpoints, queue_limit
        self.capacity = len(checkpoints) + queue_limit
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.batch_fn = batch_fn or (lambda ck, payloads, key: run_many(ck, payloads, key))
        self.jobs: deque = deque()  # Jobs in arrival order; None: a worker's stop signal
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.admitted = self.queued = self.running = 0
        self.batches = self.batched = 0  # batches of several jobs, and the jobs in them
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

    def submit(self, fn: Callable, key=None, payload=None) -> Job:
        """`fn(checkpoint)` on the next free worker, or in a batch of its `key` (see the class);
        its result (or error) in `job.future`."""
        loop = asyncio.get_running_loop()
        job = Job(fn, loop.create_future(), loop, key, payload)
        with self.ready:
            self.queued += 1
            self.jobs.append(job)
            self.ready.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop `job` if no worker has started it (its client is gone): True when dropped, and
        its slot is free; a job already running finishes (a decode cannot be interrupted)."""
        with self.lock:
            if job.state != "queued":
                return False
            job.state = "cancelled"
            self.queued -= 1
            self.admitted -= 1
            return True

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the work ahead at the median job time."""
        with self.lock:
            ahead, times = self.queued + self.running, sorted(self.model_s)
        median = times[len(times) // 2] if times else 1.0
        return max(1, math.ceil(median * max(ahead, 1) / len(self.checkpoints)))

    def _take(self) -> list[Job] | None:
        """The next job and, batching, the queued ones of its key it waited for; None: stop."""
        with self.ready:
            while True:
                while not self.jobs:
                    self.ready.wait()
                job = self.jobs.popleft()
                if job is None:
                    return None
                if job.state == "queued":  # a cancelled one was counted out by `cancel`
                    break
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while job.key is not None and len(batch) < self.max_batch:
                keep: deque = deque()  # the others, in their order (cancelled ones dropped)
                for j in self.jobs:
                    if (j is not None and j.key == job.key and j.state == "queued"
                            and len(batch) < self.max_batch):
                        batch.append(j)
                    elif j is None or j.state == "queued":
                        keep.append(j)
                self.jobs = keep
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or None in self.jobs:
                    break
                self.ready.wait(left)
            for j in batch:
                j.state = "running"
            self.queued -= len(batch)
            self.running += len(batch)
            if len(batch) > 1:
                self.batches += 1
                self.batched += len(batch)
            return batch

    def _work(self, ck) -> None:
        while (batch := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                if len(batch) == 1:
                    outs = [(True, batch[0].fn(ck))]
                else:
                    rows = self.batch_fn(ck, [j.payload for j in batch], batch[0].key)
                    outs = [(True, r) for r in rows]
            except BaseException as e:  # the worker outlives any one batch's failure
                outs = [(False, e)] * len(batch)
            with self.lock:
                self.running -= len(batch)
                self.admitted -= len(batch)
                for j in batch:
                    j.state = "done"
                    self.model_s.append((time.perf_counter() - t0) / len(batch))
            for job, (ok, out) in zip(batch, outs):
                try:
                    job.loop.call_soon_threadsafe(_settle, job.future, ok, out)
                except RuntimeError:  # the loop is gone: nobody is waiting any more
                    pass

    def close(self) -> None:
        """Finish every queued job, then stop the workers."""
        with self.ready:
            self.jobs.extend([None] * len(self.threads))
            self.ready.notify_all()
        for t in self.threads:
            t.join()

    def state(self) -> dict:
        with self.lock:
            return {"workers": len(self.checkpoints), "queue_limit": self.queue_limit,
                    "admitted": self.admitted, "queued": self.queued, "in_flight": self.running,
                    "max_batch": self.max_batch, "batches": self.batches,
                    "batched": self.batched}


def _settle(fut: asyncio.Future, ok: bool, out) -> None:
    if not fut.done():
        fut.set_result(out) if ok else fut.set_exception(out)


# ---- metrics ---------------------------------------------------------------------------------


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]) of `values`, None when empty."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] if v else None


EVENTS = {  # counters beside the requests', for /metrics
    "decodes": "Uploads whose audio decoding started (after their header was checked).",
    "cancelled": "Requests dropped before their transcription started: the client hung up.",
    "timeouts": "Request bodies not received within --read-timeout-s (answered 408).",
}


class Metrics:
    """Requests by route and status, the latencies of the last answered requests, and EVENTS."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.events: Counter = Counter({k: 0 for k in EVENTS})
        self.latency: dict[str, deque] = {r: deque(maxlen=WINDOW) for r in ROUTES}
        self.started = time.time()

    def record(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.counts[(route, status)] += 1
            if status == 200 and route in self.latency:
                self.latency[route].append(seconds)

    def count(self, event: str) -> None:
        with self.lock:
            self.events[event] += 1

    def snapshot(self, pool: Pool) -> dict:
        with self.lock:
            counts = [{"route": r, "status": s, "count": n}
                      for (r, s), n in sorted(self.counts.items())]
            lat = {r: list(d) for r, d in self.latency.items()}
            events = dict(self.events)
        return {"uptime_s": time.time() - self.started, "requests": counts, **events,
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
    for key, text in EVENTS.items():
        out += [f"# HELP hyper_{key}_total {text}", f"# TYPE hyper_{key}_total counter",
                f"hyper_{key}_total {snap[key]}"]
    for key, kind, text in (("queued", "gauge", "Requests waiting for a worker."),
                            ("in_flight", "gauge", "Requests being decoded."),
                            ("admitted", "gauge", "Requests admitted: uploading, queued or "
                                                  "decoding."),
                            ("workers", "gauge", "Worker threads (model copies)."),
                            ("queue_limit", "gauge", "Requests allowed to wait."),
                            ("max_batch", "gauge", "Requests decoded together at most."),
                            ("batches", "counter", "Batches of several requests decoded."),
                            ("batched", "counter", "Requests decoded in those batches."),
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


# ---- who may ask -----------------------------------------------------------------------------


def host_name(value: str) -> str:
    """A Host header's name without its port: `[::1]:8000` -> `::1`, `Example.org.:80` ->
    `example.org`."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return (v.rsplit(":", 1)[0] if v.count(":") == 1 else v).rstrip(".")


def _guard(app, opts: ServeOptions):
    """ASGI middleware on every route, /health included: the Host header must name this server
    (a web page whose DNS name is rebound to 127.0.0.1 would read the answers), a browser's
    Origin too (a multipart POST needs no CORS preflight: any page could make a local server
    work), then the API key when one is set (`Authorization: Bearer`), except on OPEN_PATHS."""
    from urllib.parse import urlsplit

    from fastapi.responses import JSONResponse

    allowed, any_ip = opts.hosts(), _wildcard(opts.host)
    key = opts.api_key.encode() if opts.api_key else None
    named = "any host" if allowed is None else (
        ", ".join(sorted(allowed)) + (" or an IP address" if any_ip else ""))

    def ours(name: str) -> bool:
        if allowed is None or name in allowed:
            return True
        try:  # a wildcard bind answers to its addresses; DNS rebinding needs a name
            return any_ip and bool(ipaddress.ip_address(name))
        except ValueError:
            return False

    def refusal(headers: dict, path: str) -> ApiError | None:
        host = headers.get("host")
        if host is None:
            return ApiError(403, "the Host header is required")
        if not ours(host_name(host)):
            return ApiError(403, f"Host {host!r} is not a name of this server (it answers to "
                            f"{named}; add one with --allowed-host)")
        origin = headers.get("origin")
        if origin is not None:
            try:
                name = urlsplit(origin).hostname or ""
            except ValueError:
                name = ""
            if not ours(name):
                return ApiError(403, f"Origin {origin!r} is not this server's: web pages "
                                f"elsewhere may not call it (it answers to {named}; add one "
                                "with --allowed-host)")
        if key is None or path in OPEN_PATHS:
            return None
        scheme, _, given = headers.get("authorization", "").strip().partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not given.strip():
            return ApiError(401, "this server needs its API key: send `Authorization: Bearer "
                            "KEY` (the key set with --api-key or HYPER_API_KEY)",
                            headers=challenge)
        if not hmac.compare_digest(given.strip().encode("latin-1"), key):  # constant time
            return ApiError(401, "the API key is wrong (`Authorization: Bearer KEY`)",
                            headers=challenge)
        return None

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (err := refusal(headers, scope.get("path", ""))) is None:
            return await app(scope, receive, send)
        await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(
            scope, receive, send)
    return asgi


# ---- the application -------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    """The client hung up before its transcription started."""


async def _read_form(request, limit: int, timeout_s: float):
    """The multipart form, its body counted as it arrives: past `limit` bytes a 413; not all of
    it within `timeout_s` (one deadline for the whole body, however steadily it trickles) a 408;
    the client gone, _Gone."""
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
    close = {"Connection": "close"}  # the rest of the body is not read: end the connection
    try:
        async with asyncio.timeout(timeout_s):
            return await Request(request.scope, receive).form(max_files=4, max_fields=16,
                                                               max_part_size=FORM_SLACK)
    except _TooLarge:
        raise ApiError(413, f"the request body is over the upload limit of {limit} bytes "
                       f"(read {seen} before stopping)", "file", headers=close) from None
    except TimeoutError:
        size = request.headers.get("content-length")
        raise ApiError(408, f"the request body must arrive within {timeout_s:g} s "
                       f"(--read-timeout-s); {seen} of {size or 'an undeclared number of'} "
                       "bytes came", headers=close) from None
    except HTTPException as e:  # python-multipart's parse errors, as Starlette reports them
        raise ApiError(400, f"the multipart body cannot be parsed: {e.detail}") from None
    except ClientDisconnect:
        raise _Gone from None


async def _hung_up(request) -> None:
    """Returns when the client disconnects. Once the body is read, uvicorn's `receive` waits
    for the disconnect (or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    # Audio decodes at once: one per worker (more would not finish sooner on these cores), so
    # admitted uploads decode one after another and memory holds `workers` decodes at most.
    decoding = asyncio.Semaphore(len(pool.checkpoints))

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
    async def failed(request, e: Exception):  # a bug, not bad input: logged, survived
        ref = uuid.uuid4().hex[:12]
        log.error("request %s to %s failed", ref, request.url.path, exc_info=e)
        # The text stays in the log: an exception can name paths, settings or other requests.
        return JSONResponse(ApiError(500, f"internal error (reference {ref} in the server's "
                                          "log)").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()}").body(),
                            status_code=400)

    def decode(data: bytes, name: str) -> np.ndarray:
        audio_header(data, name, opts.max_audio_s)  # refused here, nothing is decoded
        metrics.count("decodes")
        return decode_audio(data, name, opts.max_samples)

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
        job = watch = form = None
        try:
            try:
                form = await _read_form(request, limit, opts.body_timeout_s)
            except ApiError as e:
                if e.status == 408:
                    metrics.count("timeouts")
                raise
            fields = parse_fields(form, task)
            lang = language_code(ck.model, fields["language"])
            name = fields["upload"].filename or "upload"
            data = await fields["upload"].read()
            watch = asyncio.ensure_future(_hung_up(request))
            async with decoding:
                if watch.done():
                    raise _Gone
                samples = await asyncio.to_thread(decode, data, name)
            if watch.done():
                raise _Gone
            known = lang or default  # batched only with a language: detection is per clip
            job = pool.submit(lambda c: run(c, samples, lang, default, task),
                              key=(known, task) if known else None, payload=samples)
            await asyncio.wait((job.future, watch), return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done() and pool.cancel(job):  # gone before a worker took it
                raise _Gone
            row = await asyncio.shield(job.future)  # running: it finishes whatever happens
        except _Gone:
            metrics.count("cancelled")
            raise ApiError(499, "the client closed the connection before its transcription "
                           "started") from None
        except asyncio.CancelledError:  # --shutdown-timeout-s passed: drop what is queued
            if job is not None:
                pool.cancel(job)
            raise
        except MemoryError:
            raise ApiError(503, "the server ran out of memory for this request; retry later",
                           headers={"Retry-After": "5"}) from None
        finally:
            if job is None:
                pool.leave()
            if watch is not None:
                watch.cancel()
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

    return _measured(_guard(app, opts), metrics)


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
            if opts.max_batch > 1:  # the greedy loop's cache and traces per batch size
                run_many(ck, [silence] * opts.max_batch, (lang or "en", "transcribe"))
    coupled = cks[0].recipe.quant.batch_coupled
    if coupled and opts.max_batch > 1:
        print(f"note: {', '.join(coupled)} run dynamic int8, whose scale covers a whole batch: "
              f"with --max-batch {opts.max_batch} a request's text can depend on the requests "
              "decoded with it (int8_token scales each row and does not)", file=sys.stderr)
    # The folder's name and the recipe's digest, not its path: /health answers without a key.
    about = {"checkpoint": Path(opts.checkpoint).resolve().name,
             "digest": cks[0].info.get("digest"),
             "recipe": cks[0].recipe.describe(), "language": lang,
             "device": cks[0].recipe.device, "threads": torch.get_num_threads(),
             "segment": cks[0].options.segment.describe(), "batch_wait_ms": opts.batch_wait_ms,
             # whether a request's text is the same whatever is batched with it
             "batch_invariant": opts.max_batch == 1 or not coupled}
    return Pool(cks, opts.queue, opts.max_batch, opts.batch_wait_ms / 1000), about


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

    for w in opts.warnings():
        print(f"warning: {w}", file=sys.stderr, flush=True)
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
    # Past the shutdown timeout uvicorn cancels the requests still open: queued work is
    # dropped, a decode already running finishes (the pool's workers are joined).
    config = uvicorn.Config(app, log_level=level, access_log=opts.verbose, lifespan="on",
                            timeout_graceful_shutdown=opts.shutdown_timeout_s)
    return Server(config), sock


def url_of(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(opts: ServeOptions, ready: Callable[[str], None] | None = None) -> None:
    """Load, listen, and serve until SIGINT/SIGTERM; `ready(url)` once listening."""
    server, sock = build(opts, ready)
    server.run(sockets=[sock])


def options(argv=None) -> ServeOptions:
    """The command line as ServeOptions (its checks are the options'); the API key from
    --api-key, else $HYPER_API_KEY (the environment keeps it out of `ps`)."""
    ap = argparse.ArgumentParser(prog="python -m sweep.serve", description=(
        "Serve an exported checkpoint over HTTP with OpenAI's transcription API "
        "(POST /v1/audio/transcriptions), plus GET /health and GET /metrics. "
        "What is and is not protected: docs/serve.md."))
    ap.add_argument("--checkpoint", required=True, help="the exported checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback only); elsewhere set an API key")
    ap.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    ap.add_argument("--workers", type=int, default=1,
                    help="requests decoded at once; each worker loads its own model copy")
    ap.add_argument("--queue", type=int, default=8,
                    help="requests allowed to wait for a worker; beyond, 503 with Retry-After")
    ap.add_argument("--max-upload-mb", type=float, default=25.0,
                    help="largest audio upload in MB; a larger body gets 413")
    ap.add_argument("--max-audio-s", type=float, default=1800.0,
                    help="longest audio in seconds; longer gets 400 before decoding, and more "
                         "samples than this long at 48 kHz stereo 413")
    ap.add_argument("--read-timeout-s", type=float, default=None,
                    help=f"deadline for a whole request body, answered 408 (default "
                         f"{READ_S_PER_MB:g} s per MB of --max-upload-mb, at least "
                         f"{MIN_READ_S:g} s)")
    ap.add_argument("--shutdown-timeout-s", type=float, default=30.0,
                    help="on SIGINT/SIGTERM, requests still open after this are cut off")
    ap.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                    help="a Host name clients use besides localhost and --host (repeatable; "
                         "'*' turns the Host check off)")
    ap.add_argument("--api-key", default=None,
                    help="require `Authorization: Bearer KEY` (default $HYPER_API_KEY; none: "
                         "no key)")
    ap.add_argument("--max-batch", type=int, default=1,
                    help="requests of one language decoded together as one batch (their "
                         "segments batched); 1: one at a time")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0,
                    help="how long a worker holding a request waits for more to fill its "
                         "batch (--max-batch > 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: the cores divided among the workers)")
    ap.add_argument("--device", default=None, choices=("cpu", "cuda"),
                    help="default: the device the checkpoint's recipe was measured on")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip decoding 1 s of silence per worker before listening")
    ap.add_argument("--verbose", action="store_true", help="uvicorn's log and access log too")
    a = ap.parse_args(argv)
    return ServeOptions(a.checkpoint, a.host, a.port, a.workers, a.queue, a.max_upload_mb,
                        a.max_audio_s, a.threads, a.device, warmup=not a.no_warmup,
                        verbose=a.verbose, read_timeout_s=a.read_timeout_s,
                        shutdown_timeout_s=a.shutdown_timeout_s,
                        allowed_hosts=tuple(a.allowed_host),
                        api_key=a.api_key or os.environ.get("HYPER_API_KEY") or None,
                        max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms)


@console.refusing  # CheckpointError, RecipeError, options: one line, exit 2
def main(argv=None) -> int:
    opts = options(argv)
    host, port = opts.host, opts.port
    try:
        if opts.verbose:
            console.set_verbose()
        serve(opts, ready=lambda url: print(
            f"HYPER serving {opts.checkpoint} at {url}/v1/audio/transcriptions ({opts.workers} "
            f"worker(s), queue {opts.queue}, "
            + (f"batches of up to {opts.max_batch} within {opts.batch_wait_ms:g} ms, "
               if opts.max_batch > 1 else "")
            + f"upload limit {opts.max_upload_mb:g} MB, "
            f"{'API key required' if opts.api_key else 'no API key'}); "
            "Ctrl-C stops after the requests in flight", flush=True))
    except OSError as e:  # the port is taken, the address is not ours
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
