"""Dynamic batching in `sweep.serve` and long uploads segmented as the recipe says (issue #28):
the pool's batching on real threads, then a real uvicorn server on a loopback port with a
tiny-Whisper checkpoint exported with a VAD recipe."""

import asyncio
import io
import threading

import numpy as np
import pytest
import requests
import soundfile as sf
from test_serve import one_thread, running  # noqa: F401 - one_thread: autouse, module-wide

from sweep import serve, transcribe
from sweep.inputs.data import load_eval_set
from sweep.inputs.longform import LongOptions, build
from sweep.ship.checkpoint import save_checkpoint
from sweep.techniques.recipe import Recipe

RECIPE = "segment.method=vad,segment.max_s=10,decode.loop=greedy,decode.batch=2"


def test_pool_batches_queued_jobs_of_one_key_in_order_and_loses_none():
    gate, batches = threading.Event(), []

    def batch_fn(ck, payloads, key):
        batches.append((key, list(payloads)))
        return [f"{key[0]}:{p}" for p in payloads]

    pool = serve.Pool(["ck"], queue_limit=16, max_batch=3, batch_wait_s=0.05,
                      batch_fn=batch_fn)

    async def main():
        assert all(pool.admit() for _ in range(8))  # as the server admits each request first
        block = pool.submit(lambda ck: gate.wait(30) and "first")  # holds the only worker
        await asyncio.sleep(0.05)
        jobs = [pool.submit(lambda ck, i=i: f"alone {i}", key=(lang, "transcribe"), payload=i)
                for i, lang in enumerate(["ru", "en", "ru", "ru", "en", "ru", "ru"])]
        assert pool.cancel(jobs[2])  # its client hung up: dropped, never decoded
        gate.set()
        done = await asyncio.gather(block.future, *[j.future for i, j in enumerate(jobs)
                                                    if i != 2])
        return done
    done = asyncio.run(main())
    pool.close()
    assert done == ["first", "ru:0", "en:1", "ru:3", "en:4", "ru:5", "alone 6"]
    # the first ru job took the next two queued ru ones; en kept its place before the rest
    assert batches == [(("ru", "transcribe"), [0, 3, 5]), (("en", "transcribe"), [1, 4])]
    assert pool.state()["batches"] == 2 and pool.state()["batched"] == 5
    assert pool.state()["admitted"] == 0 and pool.state()["queued"] == 0


def test_serve_options_check_the_batch_flags():
    with pytest.raises(ValueError, match=r"`max_batch` must be in \[1, 64\]"):
        serve.ServeOptions("ck", max_batch=0)
    with pytest.raises(ValueError, match="`batch_wait_ms` must be in"):
        serve.ServeOptions("ck", batch_wait_ms=-1)
    opts = serve.options(["--checkpoint", "ck", "--max-batch", "8", "--batch-wait-ms", "25"])
    assert (opts.max_batch, opts.batch_wait_ms) == (8, 25.0)


@pytest.fixture(scope="module")
def vad_checkpoint(tiny_checkpoint, tmp_path_factory):
    from sweep.inputs.models import load_model

    tiny = load_model(tiny_checkpoint)
    return save_checkpoint(tiny.model, tiny.processor, Recipe.parse(RECIPE),
                           tmp_path_factory.mktemp("serve-batch") / "ck",
                           metrics={"data": {"language": "ru"}})


def _wav(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_the_checkpoint_carries_its_segmentation_and_batch(vad_checkpoint):
    import sweep

    ck = sweep.load(vad_checkpoint)
    assert ck.options.segment.vad and ck.options.segment.max_s == 10.0
    assert ck.options.batch == 2 and ck.recipe == Recipe.parse(RECIPE)


def test_concurrent_requests_are_batched_and_a_long_upload_segmented(vad_checkpoint,
                                                                      tmp_path):
    import sweep

    clips = load_eval_set("embedded", max_samples=8).utterances
    (long,) = build(clips, LongOptions(n=1, min_s=35, max_s=35, stretch_s=(4, 5), seed=2))
    uploads = [_wav(c.audio) for c in clips[:3]] + [_wav(long.audio)]
    ck = sweep.load(vad_checkpoint)
    (tmp_path / "long.wav").write_bytes(uploads[-1])
    want = [transcribe.transcribe_audio(ck, c.audio, language="ru")["text"] for c in clips[:3]]
    (row,) = transcribe.transcribe_files(ck, [tmp_path / "long.wav"])
    want.append(row["text"])
    assert all(want) and row["duration_s"] > 30
    # several files share the recipe's stream (decode.batch=2): each its own text
    for i in range(3):
        (tmp_path / f"{i}.wav").write_bytes(uploads[i])
    rows = transcribe.transcribe_files(ck, [tmp_path / f"{i}.wav" for i in range(3)]
                                       + [tmp_path / "long.wav"])
    assert [r["text"] for r in rows] == want
    assert rows[0]["seconds"] == rows[1]["seconds"] != rows[2]["seconds"]  # groups of 2
    got = [None] * len(uploads)
    with running(serve.ServeOptions(str(vad_checkpoint), port=0, max_batch=4,
                                    batch_wait_ms=1000, queue=8)) as (url, _):
        def send(i):
            r = requests.post(f"{url}/v1/audio/transcriptions", timeout=300,
                              files={"file": (f"{i}.wav", uploads[i])})
            got[i] = (r.status_code, r.json().get("text"))
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(uploads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        snap = requests.get(f"{url}/metrics", params={"format": "json"}, timeout=30).json()
        health = requests.get(f"{url}/health", timeout=30).json()
    assert got == [(200, w) for w in want]  # the texts of one request at a time
    assert snap["batches"] >= 1 and snap["batched"] >= 2 and snap["max_batch"] == 4
    assert health["segment"].startswith("VAD") and health["max_batch"] == 4
    assert health["batch_invariant"]  # fp32: nothing scaled over the batch


def test_a_batching_server_says_when_dynamic_int8_couples_batchmates(tiny_checkpoint, tmp_path,
                                                                     capsys):
    from sweep.inputs.models import load_model

    tiny = load_model(tiny_checkpoint)
    recipe = Recipe.parse("quant.scheme=dynamic_int8,quant.enc_attn=int8_token,"
                          "quant.enc_mlp=int8_token,decode.loop=greedy")
    assert recipe.quant.batch_coupled == ["dec_cross", "dec_mlp", "dec_self", "head"]
    ck = save_checkpoint(tiny.model, tiny.processor, recipe, tmp_path / "ck",
                         metrics={"data": {"language": "ru"}})
    for max_batch, invariant in ((1, True), (4, False)):
        with running(serve.ServeOptions(str(ck), port=0, max_batch=max_batch)) as (url, _):
            health = requests.get(f"{url}/health", timeout=30).json()
        assert health["batch_invariant"] is invariant
    err = capsys.readouterr().err
    assert err.count("note: dec_cross, dec_mlp, dec_self, head run dynamic int8") == 1
    assert "--max-batch 4" in err
