"""`sweep.serve` against hostile or careless clients (#27): a compressed bomb, a trickling
upload, a client that hangs up, a foreign Host or Origin, a missing or wrong API key, a bug's
text. Real uvicorn servers on loopback ports, real clients (`requests`, `openai`, raw sockets),
the tiny-Whisper checkpoints of test_serve."""

import contextlib
import io
import logging
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import soundfile as sf
from test_serve import MB, _post, _wait_for, one_thread, running  # noqa: F401 - autouse

from sweep import serve
from sweep.inputs import data
from sweep.ship.checkpoint import save_checkpoint
from sweep.techniques.recipe import Recipe

KEY = "hyper-test-key-0123456789"


@pytest.fixture(scope="module")
def clips(shared_dir):
    speech = shared_dir / "speech"
    return {"real": (speech / "golos/001ce26c07c20eaa0d666b824c6c6924.flac").read_bytes(),
            "short": (speech / "piper_speech_to_phrase_ru/ru_piper_s2p_03.flac").read_bytes()}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """test_serve's pruned tiny model, measured on Russian."""
    from sweep.inputs.models import load_model

    tiny = load_model(tiny_checkpoint)
    root = tmp_path_factory.mktemp("serve-guard")
    return {"ru": save_checkpoint(tiny.model, tiny.processor, Recipe.parse("prune.rate=0.3"),
                                  root / "ru", metrics={"data": {"language": "ru"}})}


@pytest.fixture(scope="module")
def plain(checkpoints):
    """No key, loopback only: 1 MB uploads, 15 s of audio."""
    with running(serve.ServeOptions(str(checkpoints["ru"]), port=0, max_upload_mb=1,
                                    max_audio_s=15, queue=4)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def keyed(checkpoints):
    """An API key, and one more Host name clients may use."""
    with running(serve.ServeOptions(str(checkpoints["ru"]), port=0, api_key=KEY,
                                    allowed_hosts=("Hyper.Internal",))) as (url, _):
        yield url


@pytest.fixture(scope="module")
def short_text(checkpoints, clips):
    import sweep
    from sweep import transcribe

    ck = sweep.load(checkpoints["ru"])
    return transcribe.transcribe_audio(ck, serve.decode_upload(clips["short"]), language="ru")[
        "text"]


def _metrics(url, **kw) -> dict:
    return requests.get(f"{url}/metrics", params={"format": "json"}, timeout=10, **kw).json()


def _flac(channels: int, rate: int, seconds: int) -> bytes:
    """Silence: FLAC stores it in a few bytes a frame, whatever the channels and rate declared."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        second = np.zeros((rate, channels), np.int16)
        for _ in range(seconds):
            f.write(second)
    return buf.getvalue()


def _raw_request(url: str, files: dict, host: str | None = None) -> tuple[bytes, bytes]:
    """(head, body) of the multipart POST `requests` would send, for a raw socket."""
    req = requests.Request("POST", f"{url}/v1/audio/transcriptions", files=files).prepare()
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\n"
            f"Host: {host or url.removeprefix('http://')}\r\n"
            f"Content-Type: {req.headers['Content-Type']}\r\n"
            f"Content-Length: {len(req.body)}\r\n\r\n")
    return head.encode(), req.body


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


# ---- the decompression bomb ------------------------------------------------------------------


def test_a_flac_bomb_is_refused_from_its_header_before_decoding(plain, clips, short_text):
    """46 KB of FLAC declaring 14 s of 8 channels at 384 kHz (43 M samples: 170 MB as float32,
    more as float64): within --max-audio-s 15 in seconds, over 15 s of 48 kHz stereo in
    samples. Refused with 413 from its header: /metrics' decode count does not move."""
    bomb = _flac(8, 384_000, 14)
    assert len(bomb) < MB
    before = _metrics(plain)["decodes"]
    r = _post(plain, {"file": ("bomb.flac", bomb)})
    assert r.status_code == 413, r.text
    msg = r.json()["error"]["message"]
    assert (f"declares {14 * 384_000} frames x 8 channels at 384000 Hz = {14 * 384_000 * 8} "
            f"samples" in msg and f"at most {15 * 96_000}" in msg and "48 kHz stereo" in msg
            and "--max-audio-s" in msg), msg
    assert _metrics(plain)["decodes"] == before  # the decoder never ran
    ok = _post(plain, {"file": ("short.flac", clips["short"])})
    assert ok.status_code == 200 and ok.json() == {"text": short_text}
    assert _metrics(plain)["decodes"] == before + 1  # the counter counts real decodes


def test_ordinary_audio_decodes_block_by_block_as_the_evaluation_does():
    """The blockwise decode gives the very samples `sweep.inputs.data` gives (mono,
    multichannel, resampled, several blocks); 48 kHz stereo up to --max-audio-s is taken, one
    more channel is not."""
    rng = np.random.default_rng(0)
    for channels, rate, seconds in ((1, 16_000, 1), (2, 16_000, 2), (3, 44_100, 2),
                                    (2, 48_000, 3)):
        buf = io.BytesIO()
        sf.write(buf, 0.1 * rng.standard_normal((rate * seconds, channels)), rate,
                 format="FLAC")
        raw = buf.getvalue()
        got = serve.decode_upload(raw, "noise.flac", max_s=10)
        assert got.dtype == np.float32 and np.array_equal(got, data._decode(raw)), (channels,
                                                                                     rate)
    assert len(serve.decode_upload(_flac(2, 48_000, 3), "two.flac", max_s=3)) == 3 * 16_000
    with pytest.raises(serve.ApiError) as e:  # one channel more than stereo is over the limit
        serve.decode_upload(_flac(3, 48_000, 3), "three.flac", max_s=3)
    assert e.value.status == 413


OUT_OF_MEMORY = """
import io, resource, sys
import numpy as np, soundfile as sf
import sweep.inputs.data
from sweep import serve

buf = io.BytesIO()  # 30 min of 48 kHz mono silence: within every limit of the default server
with sf.SoundFile(buf, "w", 48000, 1, format="FLAC", subtype="PCM_16") as f:
    minute = np.zeros((48000 * 60, 1), np.int16)
    for _ in range(30):
        f.write(minute)
vm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + 256 * 2**20, resource.RLIM_INFINITY))
try:
    serve.decode_upload(buf.getvalue(), "long.flac", max_s=1800)
    print("decoded")
except serve.ApiError as e:
    print(e.status, e.message)
"""


def test_running_out_of_memory_is_a_503_not_an_undecodable_file():
    """A process with 256 MB of address space to spare decodes 30 min of 48 kHz audio (660 MB
    as float64): the MemoryError is said as such, never "cannot be decoded"."""
    out = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("503 ") and "out of memory" in out.stdout, out.stdout
    assert "cannot be decoded" not in out.stdout


# ---- slow uploads and shutdown ---------------------------------------------------------------


def test_a_trickling_upload_gets_408_and_frees_its_slot(checkpoints, clips, short_text):
    """One slot (1 worker, no queue), read deadline 3 s. A raw client sends a byte every 0.1 s
    (an idle timeout would never fire): while it holds the slot a normal request gets 503; at
    the deadline it gets 408, and the normal request is served."""
    opts = serve.ServeOptions(str(checkpoints["ru"]), port=0, workers=1, queue=0,
                              read_timeout_s=3.0)
    with running(opts) as (url, _):
        head, body = _raw_request(url, {"file": ("short.flac", clips["short"])})
        reply, sent = b"", 0
        with socket.create_connection(_address(url), timeout=30) as s:
            s.sendall(head + body[:200])
            _wait_for(url, "admitted", 1)
            busy = _post(url, {"file": ("short.flac", clips["short"])})
            assert busy.status_code == 503, busy.text
            t0 = time.monotonic()
            while b"\r\n\r\n" not in reply and time.monotonic() - t0 < 20:
                if select.select([s], [], [], 0.1)[0]:
                    try:
                        reply += s.recv(65536) or b"EOF"
                    except ConnectionResetError:
                        break
                    continue
                try:
                    s.send(body[200 + sent:201 + sent])
                    sent += 1
                except OSError:  # the server closed after answering: read what it said
                    break
            s.settimeout(5)
            with contextlib.suppress(OSError):  # the rest of the answer, up to the close
                while chunk := s.recv(65536):
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"--read-timeout-s" in reply and f"of {len(body)} bytes came".encode() in reply
        assert sent >= 5  # it kept sending until the deadline
        ok = _post(url, {"file": ("short.flac", clips["short"])})
        assert ok.status_code == 200 and ok.json() == {"text": short_text}
        snap = _metrics(url)
        assert snap["timeouts"] == 1 and snap["admitted"] == 0


def test_shutdown_cuts_off_a_stalled_upload_after_its_timeout(checkpoints, clips):
    """SIGTERM's wait is bounded: a client that stopped sending mid-body (read deadline 60 s)
    does not keep the server from exiting past --shutdown-timeout-s 0.5."""
    opts = serve.ServeOptions(str(checkpoints["ru"]), port=0, read_timeout_s=60,
                              shutdown_timeout_s=0.5, warmup=False, threads=1)
    server, sock = serve.build(opts)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = serve.url_of(sock)
    head, body = _raw_request(url, {"file": ("short.flac", clips["short"])})
    with socket.create_connection(_address(url), timeout=30) as s:
        s.sendall(head + body[:100])
        _wait_for(url, "admitted", 1)
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "the server still waits on the stalled upload"


# ---- a client that hangs up ------------------------------------------------------------------


def test_a_client_that_hangs_up_is_dropped_from_the_queue(checkpoints, clips, short_text,
                                                          monkeypatch):
    """The worker is held (its decode waits on a gate); a raw client's request queues behind
    it, then the client closes its socket. The queued work is dropped: the model never runs it,
    /metrics counts it cancelled, and its slot is free again."""
    gate, ran = threading.Event(), []
    real = serve.run

    def gated(ck, audio, *args):
        ran.append(len(audio))
        gate.wait(60)
        return real(ck, audio, *args)
    monkeypatch.setattr(serve, "run", gated)
    opts = serve.ServeOptions(str(checkpoints["ru"]), port=0, workers=1, queue=2)
    result = {}
    with running(opts) as (url, _):
        first = threading.Thread(target=lambda: result.update(r=_post(
            url, {"file": ("short.flac", clips["short"])})))
        first.start()
        _wait_for(url, "in_flight", 1)
        head, body = _raw_request(url, {"file": ("real.flac", clips["real"])})
        with socket.create_connection(_address(url), timeout=30) as s:
            s.sendall(head + body)
            _wait_for(url, "queued", 1)
        deadline = time.monotonic() + 30
        while (snap := _metrics(url))["cancelled"] != 1:
            assert time.monotonic() < deadline, f"never cancelled: {snap}"
            time.sleep(0.05)
        assert (snap["queued"], snap["in_flight"], snap["admitted"]) == (0, 1, 1)
        gate.set()
        first.join(120)
        again = _post(url, {"file": ("short.flac", clips["short"])})
        snap = _metrics(url)
        prom = requests.get(f"{url}/metrics", timeout=10).text
    assert result["r"].status_code == 200 and result["r"].json() == {"text": short_text}
    assert again.status_code == 200 and again.json() == {"text": short_text}
    real_len = len(serve.decode_upload(clips["real"]))
    assert len(ran) == 2 and real_len not in ran  # the hung-up request never reached the model
    assert snap["cancelled"] == 1 and snap["admitted"] == 0
    assert "hyper_cancelled_total 1" in prom
    statuses = {c["status"]: c["count"] for c in snap["requests"]
                if c["route"] == "/v1/audio/transcriptions"}
    assert statuses == {200: 2, 499: 1}


# ---- Host, Origin, API key -------------------------------------------------------------------


ROUTES = [("GET", "/health"), ("GET", "/metrics"), ("POST", "/v1/audio/transcriptions"),
          ("POST", "/v1/audio/translations"), ("GET", "/nowhere")]


def test_a_foreign_host_or_origin_is_refused_on_every_route(plain, clips, checkpoints):
    """DNS rebinding: a page at http://rebound.example:PORT whose name now resolves to
    127.0.0.1 sends `Host: rebound.example:PORT`. Every route refuses it (403), /health too;
    a page elsewhere posting to 127.0.0.1 sends its Origin, also refused. Loopback names and a
    same-origin page are served."""
    host, port = _address(plain)
    files = {"file": ("short.flac", clips["short"])}
    for method, path in ROUTES:
        r = requests.request(method, f"{plain}{path}", timeout=30, files=files if method ==
                             "POST" else None, headers={"Host": f"rebound.example:{port}"})
        assert r.status_code == 403, (path, r.text)
        msg = r.json()["error"]["message"]
        assert "rebound.example" in msg and "--allowed-host" in msg and "127.0.0.1" in msg
    r = _post(plain, files, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "Origin 'https://evil.example'" in r.json()["error"][
        "message"]
    assert _post(plain, files, headers={"Origin": "null"}).status_code == 403
    for name in (f"localhost:{port}", f"[::1]:{port}", "LOCALHOST."):
        assert requests.get(f"{plain}/health", headers={"Host": name}, timeout=10).ok, name
    assert _post(plain, files, headers={"Origin": f"http://{host}:{port}"}).status_code == 200
    snap = _metrics(plain)
    assert {(c["route"], c["status"]) for c in snap["requests"]} >= {
        ("/health", 403), ("/metrics", 403), ("other", 403)}


def test_health_names_no_absolute_path(plain, checkpoints):
    h = requests.get(f"{plain}/health", timeout=10).json()
    folder = checkpoints["ru"]
    assert h["checkpoint"] == folder.name and len(h["digest"]) == 64
    assert str(folder.parent) not in str(h) and not any(
        isinstance(v, str) and v.startswith("/") for v in h.values()), h


def test_api_key_is_required_except_on_health(keyed, clips, short_text):
    """`Authorization: Bearer KEY`: missing or wrong is a 401 (never echoing the key sent) on
    the transcription routes and /metrics; /health stays open for liveness probes. An extra
    --allowed-host name is taken."""
    files = {"file": ("short.flac", clips["short"])}
    h = requests.get(f"{keyed}/health", timeout=10, headers={"Host": "hyper.internal:80"})
    assert h.status_code == 200 and h.json()["status"] == "ok"
    for auth, words in ((None, "needs its API key"), ("Bearer nope-" + "x" * 20, "is wrong"),
                        (f"Basic {KEY}", "needs its API key"), ("Bearer", "needs its API key")):
        headers = {"Authorization": auth} if auth else {}
        for r in (_post(keyed, files, headers=headers),
                  requests.get(f"{keyed}/metrics", headers=headers, timeout=10)):
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
            assert words in r.json()["error"]["message"] and "nope" not in r.text
    r = _post(keyed, files, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"text": short_text}
    assert requests.get(f"{keyed}/metrics", headers={"Authorization": f"bearer {KEY}"},
                        timeout=10).ok


def test_openai_client_with_the_api_key(keyed, clips, short_text):
    import openai

    audio = ("short.flac", clips["short"])
    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0)
    assert client.audio.transcriptions.create(model="whisper-1", file=audio).text == short_text
    wrong = openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong-key-" + "y" * 20,
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.audio.transcriptions.create(model="whisper-1", file=audio)


def test_cli_key_from_the_environment_and_a_warning_off_loopback(checkpoints, capsys,
                                                                 monkeypatch):
    ck = str(checkpoints["ru"])
    monkeypatch.setenv("HYPER_API_KEY", KEY)
    opts = serve.options(["--checkpoint", ck, "--host", "0.0.0.0"])
    assert opts.api_key == KEY and not opts.warnings() and KEY not in repr(opts)
    assert serve.options(["--checkpoint", ck, "--api-key", "k" * 16]).api_key == "k" * 16
    monkeypatch.delenv("HYPER_API_KEY")
    with socket.socket() as taken:  # the warning comes before the bind, which then fails
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--checkpoint", ck, "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0 without an API key" in err and "cannot listen" in err
    for flags, words in ((["--api-key", "short-secret"], "`api_key` must be at least 16"),
                         (["--read-timeout-s", "0"], "`read_timeout_s` must be > 0"),
                         (["--shutdown-timeout-s", "-1"], "`shutdown_timeout_s` must be >= 0"),
                         (["--allowed-host", "http://x.org/"], "`allowed_hosts` entries must")):
        assert serve.main(["--checkpoint", ck, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "short-secret" not in err, err


# ---- a bug -----------------------------------------------------------------------------------


def test_a_500_never_echoes_the_exception(plain, clips, short_text, monkeypatch, caplog):
    """The transcription raises (a HYPER function made to fail in this process, where the
    server runs): the client gets a 500 with a reference, not the exception's text; the log
    has it."""
    from sweep import transcribe

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail: /srv/models/private/weights.bin")
    monkeypatch.setattr(transcribe, "transcribe_audio", broken)
    with caplog.at_level(logging.ERROR, logger="sweep.serve"):
        r = _post(plain, {"file": ("short.flac", clips["short"])})
    assert r.status_code == 500, r.text
    msg = r.json()["error"]["message"]
    assert "secret" not in r.text and "/srv" not in r.text and "RuntimeError" not in r.text
    ref = msg.split("reference ")[1].split()[0]
    logged = [x for x in caplog.records if x.name == "sweep.serve" and ref in x.getMessage()]
    assert logged and "secret detail" in str(logged[0].exc_info[1])
    monkeypatch.undo()
    ok = _post(plain, {"file": ("short.flac", clips["short"])})
    assert ok.status_code == 200 and ok.json() == {"text": short_text}
