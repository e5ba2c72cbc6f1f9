"""`sweep.serve`: a real uvicorn server on a loopback port, driven by real HTTP clients (the
official `openai` client, `requests`, a raw socket), on exported tiny-Whisper checkpoints."""

import contextlib
import dataclasses
import io
import socket
import threading
import time
import uuid

import numpy as np
import pytest
import requests
import soundfile as sf

from sweep import serve, transcribe
from sweep.ship.checkpoint import save_checkpoint
from sweep.techniques.recipe import Recipe

MB = 1024 * 1024


def _clip(shared_dir, name: str) -> bytes:
    return (shared_dir / "speech" / name).read_bytes()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for servers and references alike: on a loaded 2-core machine OpenMP's
    second thread spins against other processes (a tiny decode took 19 s with 2, 0.8 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips(shared_dir):
    """A real Russian recording, a short synthetic phrase, and a long tone (20 s: its token cap
    keeps the tiny random model busy for a second or more)."""
    long = io.BytesIO()
    t = np.arange(20 * 16000) / 16000
    sf.write(long, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    return {"real": _clip(shared_dir, "golos/001ce26c07c20eaa0d666b824c6c6924.flac"),
            "short": _clip(shared_dir, "piper_speech_to_phrase_ru/ru_piper_s2p_03.flac"),
            "long": long.getvalue()}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """The same pruned tiny model exported twice: measured on Russian, and with no language."""
    from sweep.inputs.models import load_model

    tiny = load_model(tiny_checkpoint)
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for name, metrics in (("ru", {"data": {"language": "ru"}}), ("none", {})):
        out[name] = save_checkpoint(tiny.model, tiny.processor, Recipe.parse("prune.rate=0.3"),
                                    root / name, metrics=metrics)
    return out


@contextlib.contextmanager
def running(opts: serve.ServeOptions):
    """A real uvicorn server in a thread (no warm-up: test time); yields (url, server)."""
    server, sock = serve.build(dataclasses.replace(opts, warmup=False, threads=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield serve.url_of(sock), server
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def ru_server(checkpoints):
    with running(serve.ServeOptions(str(checkpoints["ru"]), port=0, max_upload_mb=1,
                                    max_audio_s=15, queue=4)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def loaded(checkpoints):
    import sweep

    return sweep.load(checkpoints["ru"])


@pytest.fixture(scope="module")
def want(loaded, clips, tmp_path_factory):
    """What `sweep.load` + `python -m sweep.transcribe`'s path give for each clip."""
    folder = tmp_path_factory.mktemp("clips")
    paths = {}
    for name, data in clips.items():
        paths[name] = folder / f"{name}.{'wav' if name == 'long' else 'flac'}"
        paths[name].write_bytes(data)
    rows = transcribe.transcribe_files(loaded, [paths["real"], paths["short"]])
    return {"real": rows[0]["text"], "short": rows[1]["text"], "paths": paths}


def _post(url, files, data=None, **kw):
    return requests.post(f"{url}/v1/audio/transcriptions", files=files, data=data or {},
                         timeout=120, **kw)


def test_openai_client_gets_the_checkpoints_transcript(ru_server, clips, want, loaded):
    from openai import OpenAI

    client = OpenAI(base_url=f"{ru_server}/v1", api_key="unused", max_retries=0)
    audio = ("clip.flac", clips["real"])
    assert want["real"]  # the tiny random model says something, deterministically
    got = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert got.text == want["real"]
    text = client.audio.transcriptions.create(model="x", file=audio, language="ru",
                                              response_format="text")
    assert text == want["real"]
    verbose = client.audio.transcriptions.create(model="x", file=audio, language="russian",
                                                 response_format="verbose_json")
    assert (verbose.language, verbose.duration, verbose.text) == ("russian", 4.0, want["real"])
    assert verbose.segments[0].end == 4.0 and verbose.segments[0].text == want["real"]
    # /v1/audio/translations: the client's method is deprecated, the route is OpenAI's.
    (translated,) = transcribe.transcribe_files(loaded, [want["paths"]["short"]],
                                                task="translate")
    r = requests.post(f"{ru_server}/v1/audio/translations", timeout=120,
                      files={"file": ("short.flac", clips["short"])})
    assert r.json() == {"text": translated["text"]} and translated["text"] != want["short"]


def _chunked_body(boundary: str, size: int):
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
    for _ in range(size // MB):
        yield b"\0" * MB
    yield f"\r\n--{boundary}--\r\n".encode()


def _wav(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.float32), rate, format="WAV")
    return buf.getvalue()


def _big_declared(url) -> requests.Response:
    return _post(url, {"file": ("big.wav", b"\0" * (100 * MB))})


def _big_chunked(url) -> requests.Response:
    """100 MB without a Content-Length: the limit is enforced while reading."""
    b = uuid.uuid4().hex
    return requests.post(f"{url}/v1/audio/transcriptions", data=_chunked_body(b, 100 * MB),
                         headers={"Content-Type": f"multipart/form-data; boundary={b}"},
                         timeout=120)


BAD = {  # case -> (request, status, words of the message)
    "empty file": (lambda url, c: _post(url, {"file": ("a.wav", b"")}), 400, "is empty"),
    "text file": (lambda url, c: _post(url, {"file": ("notes.txt", b"hello\n" * 50)}), 415,
                  "is not audio"),
    "truncated flac": (lambda url, c: _post(url, {"file": ("a.flac", c["real"][:30000])}), 400,
                       "cannot be decoded as audio"),
    "100 MB declared": (lambda url, c: _big_declared(url), 413, "over the upload limit"),
    "100 MB chunked": (lambda url, c: _big_chunked(url), 413, "over the upload limit"),
    "over --max-audio-s": (lambda url, c: _post(url, {"file": ("long.wav", c["long"])}), 400,
                           "must be at most 15 s of audio"),
    "1 Hz sample rate": (lambda url, c: _post(url, {"file": ("a.wav", _wav(60, 1))}), 400,
                         "sample rate must be in"),
    "wrong field name": (lambda url, c: _post(url, {"audio": ("a.flac", c["short"])}), 400,
                         "`file` is required"),
    "unknown response_format": (lambda url, c: _post(url, {"file": ("a.flac", c["short"])},
                                                     {"response_format": "srt"}), 400,
                                "`response_format` must be one of"),
    "temperature": (lambda url, c: _post(url, {"file": ("a.flac", c["short"])},
                                         {"temperature": "0.4"}), 400, "`temperature` must be 0"),
    "unknown language": (lambda url, c: _post(url, {"file": ("a.flac", c["short"])},
                                              {"language": "klingon"}), 400, "`language` must"),
    "not multipart": (lambda url, c: requests.post(f"{url}/v1/audio/transcriptions",
                                                   json={"file": "x"}, timeout=30), 415,
                      "multipart/form-data"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_upload_gets_its_4xx_then_the_next_request_is_served(ru_server, clips, want, case):
    send, status, words = BAD[case]
    r = send(ru_server, clips)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["code"] == status
    ok = _post(ru_server, {"file": ("short.flac", clips["short"])})
    assert ok.status_code == 200 and ok.json() == {"text": want["short"]}


def test_declared_size_is_refused_before_the_body_is_read(ru_server):
    """A raw client announcing 100 MB gets 413 without sending a byte of it."""
    host, port = ru_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Content-Type: multipart/form-data; boundary=b\r\n"
                  "Content-Length: 104857600\r\n\r\n".encode())
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413"), head


def _wait_for(url, key, value, timeout=60):
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/health", timeout=10).json()[key] != value:
        assert time.monotonic() < deadline, f"/health never had {key}={value}"
        time.sleep(0.02)


def test_full_queue_answers_503_with_retry_after_and_loses_nothing(checkpoints, clips, loaded):
    """1 worker + 1 waiting: while a long clip decodes, one more is admitted, the rest get 503;
    every admitted request is answered with its transcript. Language: detected."""
    opts = serve.ServeOptions(str(checkpoints["none"]), port=0, workers=1, queue=1)
    results = {}

    def send(key, name):
        results[key] = _post(url, {"file": (name, clips[name])},
                             {"response_format": "verbose_json"})

    with running(opts) as (url, _):
        first = threading.Thread(target=send, args=("long", "long"))
        first.start()
        _wait_for(url, "in_flight", 1)
        more = [threading.Thread(target=send, args=(i, "short")) for i in range(6)]
        for t in more:
            t.start()
        for t in [first, *more]:
            t.join(120)
        snap = requests.get(f"{url}/metrics", params={"format": "json"}, timeout=10).json()
        prom = requests.get(f"{url}/metrics", timeout=10).text
    codes = sorted(r.status_code for r in results.values())
    assert len(codes) == 7 and set(codes) == {200, 503} and codes.count(200) >= 2, codes
    busy = [r for r in results.values() if r.status_code == 503]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in busy)
    assert "the server is busy" in busy[0].json()["error"]["message"]
    # No recorded language: Whisper's detection decides, and the text is that language's.
    short = serve.decode_upload(clips["short"])  # the same weights as "none"'s
    lang = serve.detect_language(loaded, short)
    text = transcribe.transcribe_audio(loaded, short, language=lang)["text"]
    served = [r.json() for r in results.values() if r.status_code == 200 and
              r.json()["duration"] < 10]
    assert served and all(s["text"] == text for s in served)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    assert {s["language"] for s in served} == {LANGUAGES[lang]}
    counts = {(c["status"]): c["count"] for c in snap["requests"]
              if c["route"] == "/v1/audio/transcriptions"}
    assert counts == {200: codes.count(200), 503: codes.count(503)}
    lat = snap["latency_s"]["/v1/audio/transcriptions"]
    assert lat["count"] == codes.count(200) and 0 < lat["p50"] <= lat["p95"]
    assert (snap["queued"], snap["in_flight"], snap["admitted"]) == (0, 0, 0)
    assert (f'hyper_requests_total{{route="/v1/audio/transcriptions",status="503"}} '
            f'{codes.count(503)}') in prom
    assert 'hyper_request_latency_seconds{route="/v1/audio/transcriptions",quantile="0.95"}' \
        in prom


def test_shutdown_finishes_the_request_in_flight(checkpoints, clips, want):
    """What SIGINT/SIGTERM do (uvicorn's `should_exit`): stop listening, finish what was
    admitted; the answer in flight still arrives whole."""
    result = {}
    with running(serve.ServeOptions(str(checkpoints["ru"]), port=0)) as (url, server):
        t = threading.Thread(target=lambda: result.update(r=_post(
            url, {"file": ("real.flac", clips["real"])})))
        t.start()
        _wait_for(url, "in_flight", 1)
        server.should_exit = True
        t.join(120)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=10)
    assert result["r"].status_code == 200 and result["r"].json() == {"text": want["real"]}


def test_health_and_routes_answer_in_openais_shape(ru_server):
    h = requests.get(f"{ru_server}/health", timeout=10).json()
    assert (h["status"], h["language"], h["recipe"], h["workers"]) == ("ok", "ru",
                                                                       "prune l1 0.30", 1)
    r = requests.get(f"{ru_server}/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = requests.get(f"{ru_server}/metrics", params={"format": "xml"}, timeout=10)
    assert r.status_code == 400 and "`format` must be" in r.json()["error"]["message"]


def test_cli_refuses_bad_options_and_a_taken_port(checkpoints, capsys):
    ck = str(checkpoints["ru"])
    assert serve.main(["--checkpoint", ck, "--workers", "0"]) == 2
    assert "`workers` must be at least 1" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--checkpoint", ck, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert serve.main(["--checkpoint", ck + "-missing", "--port", "0"]) == 2
    assert "not a HYPER checkpoint" in capsys.readouterr().err


# ---- the real embedded whisper-base ----------------------------------------------------------


@pytest.mark.slow
def test_real_model_served_by_the_cli_and_stopped_by_sigterm(real_model, shared_dir, tmp_path):
    """`python -m sweep.serve` on an exported int8 whisper-base: the openai client hears the
    shared Russian clips as `sweep.transcribe` does; SIGTERM lets the request in flight finish."""
    import os
    import signal
    import subprocess
    import sys

    from openai import OpenAI

    ck = save_checkpoint(real_model.model, real_model.processor,
                         Recipe.parse("quant.scheme=dynamic_int8"), tmp_path / "ck",
                         metrics={"data": {"languages": ["ru"]}})
    names = ["golos/001ce26c07c20eaa0d666b824c6c6924.flac", "gigaam/example.flac"]
    paths = [shared_dir / "speech" / n for n in names]
    want = [r["text"] for r in transcribe.transcribe_files(ck, paths)]
    proc = subprocess.Popen([sys.executable, "-m", "sweep.serve", "--checkpoint", str(ck),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split("/v1/")[0]
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = [client.audio.transcriptions.create(model="x", file=p).text for p in paths]
        assert got == want and "тысяч" in got[0] and "лукомор" in got[1].lower(), got
        result = {}
        t = threading.Thread(target=lambda: result.update(text=client.audio.transcriptions.create(
            model="x", file=paths[1]).text))
        t.start()
        _wait_for(url, "in_flight", 1)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        # uvicorn re-raises the signal once every admitted request is answered
        assert result["text"] == want[1] and proc.wait(60) == -signal.SIGTERM
        assert "Traceback" not in proc.stderr.read()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=5)
    finally:
        proc.kill() if proc.poll() is None else None
