"""Shared fixtures: the read-only shared data, a tiny random Whisper, the real embedded model."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The suite runs on two workers (`make test`: pytest-xdist), each with sweeps whose trials use
# every core: OpenMP threads that spin at barriers then fight over two cores (a tiny-model
# trial took 8 min instead of seconds, its threads spinning in libgomp). Passive waiting
# sleeps instead. Read when torch loads OpenMP, so set before any test imports torch; Ray
# workers and sweep processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Inductor's kernels go to one cache per run, shared by its workers and the processes they
# start, not to /tmp/torchinductor_root, which every process on the machine shares: a kernel
# left there by another run aborted a test that passed with a fresh cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hyper-inductor-")

REPO = Path(__file__).resolve().parents[1]


def find_shared() -> Path | None:
    for cand in (os.environ.get("HYPER_SHARED"), REPO.parent / "shared"):
        if cand and (Path(cand) / "speech" / "manifest.jsonl").is_file():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared()
    if path is None:
        pytest.skip("no shared data: set $HYPER_SHARED or place shared/ beside the checkout")
    return path


@pytest.fixture(scope="session")
def speech_manifest(shared_dir) -> Path:
    return shared_dir / "speech" / "manifest.jsonl"


@pytest.fixture()
def tiny_model():
    """A random-init Whisper with the real vocabulary layout but tiny widths (fast on 2 cores)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257,
        bos_token_id=50257,
    )
    return WhisperForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="session")
def real_model():
    """The real embedded whisper-base (converted once, cached) and its processor."""
    from sweep.inputs.models import load_model

    return load_model("embedded:whisper-base")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny random Whisper saved as a local checkpoint (real processor): fast sweeps."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from sweep.inputs.models import load_model

    proc = load_model("random:tiny").processor
    torch.manual_seed(0)
    cfg = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=50258, eos_token_id=50257, pad_token_id=50257, bos_token_id=50257,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = load_model("random:base").model.generation_config
    out = tmp_path_factory.mktemp("tiny-whisper")
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory) -> str:
    """Three clips of the embedded set as a manifest (absolute audio paths)."""
    import json

    src = REPO / "sweep" / "inputs" / "embedded" / "manifest.jsonl"
    lines = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()[:3]]
    out = tmp_path_factory.mktemp("manifest") / "small.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for rec in lines:
            rec["audio"] = str(src.parent / rec["audio"])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return str(out)


@pytest.fixture()
def every_scheme_searched(monkeypatch):
    """The launcher keeps every scheme its space names, slow here or not: tests of the
    launcher's mechanics count trials of spaces naming bf16, which `launch.kernel_fit` rightly
    drops on a CPU without bf16 instructions (AVX2-only, or under the AVX2 caps: #25)."""
    from sweep.measure import kernels

    monkeypatch.setattr(kernels, "SLOW_SPEEDUP", 0.0)


@pytest.fixture()
def fast_kernel_choice(monkeypatch, tmp_path_factory):
    """One kernel cache per session (each shape timed once) and short timings: the shapes of
    the tiny models are small, and a full timing budget per layer would dominate the tests."""
    import functools

    from sweep.measure import kernels

    monkeypatch.setenv("HYPER_CACHE", str(tmp_path_factory.getbasetemp() / "hyper-cache"))
    monkeypatch.setattr(kernels, "time_calls", functools.partial(
        kernels.time_calls, budget_s=0.02, rounds=(2, 20), sample_s=1e-3))


@pytest.fixture(autouse=True)
def _ray_down():
    """The launcher leaves its local Ray up (a driver's, as a user's process would keep it):
    shut down after every test, so that no later test (on this xdist worker, in whatever order
    files are dealt) starts with a Ray it did not start. Ray is not imported for this."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def _console_state(monkeypatch):
    """A test that runs a CLI in-process with --verbose turns HYPER's console verbose for the
    whole process (by design: workers started after inherit it); restored after each test so
    the next test's console is the default one."""
    from sweep import console

    monkeypatch.setitem(console._state, "verbose", console._state["verbose"])
    if console.VERBOSE_ENV in os.environ:
        monkeypatch.setenv(console.VERBOSE_ENV, os.environ[console.VERBOSE_ENV])
    else:
        monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
