"""`--space long` end to end on a long-form set (issue #28), with a tiny random Whisper: trials
in MLflow with `throughput`, a front on {wer, throughput}, and an export that transcribes a
long file through `sweep.transcribe` and `sweep.serve` with its segmentation."""

import json

import requests
from mlflow.tracking import MlflowClient

from sweep import export, launch, serve, transcribe
from sweep.inputs.data import load_eval_set
from sweep.inputs.longform import LongOptions, build, write


def test_long_space_sweeps_exports_and_serves_a_long_recording(tmp_path, tiny_checkpoint):
    import sweep

    clips = load_eval_set("embedded", max_samples=12).utterances
    recs = build(clips, LongOptions(n=1, min_s=33, max_s=33, stretch_s=(4, 5), seed=4))
    manifest = write(recs, tmp_path / "long")
    root = tmp_path / "root"
    assert launch.main(["--space", "long", "--model", tiny_checkpoint, "--dataset",
                        str(manifest), "--root", str(root), "--name", "long", "--seed", "1",
                        "--max-slowdown", "0", "--num-samples", "2", "--warmup", "0",
                        "--screen", "off"]) == 0
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hyper")
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("hyper.kind") == "trial" and r.info.status == "FINISHED"]
    assert len(trials) == 3  # the baseline and the space's two starts
    assert all(r.data.metrics["throughput"] > 0 for r in trials)
    assert {r.data.params["segment.method"] for r in trials} == {"sequential", "vad"}
    out = root / "sweeps" / "long" / "results"
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert front and (out / "pareto.csv").read_text().startswith("wer,throughput")
    # random weights break WER, not the probes: the VAD hears no speech in any of them
    assert all(r.data.metrics["hallucination_excess"] <= 0 for r in trials)
    assert {r.data.metrics["hallucination_rate"] for r in trials
            if r.data.params["segment.method"] == "vad"} == {0.0}
    vad = next(r for r in trials if r.data.params["segment.method"] == "vad")
    assert export.main(["--root", str(root), "--sweep", "long", "--run", vad.info.run_id,
                        "--out", str(tmp_path / "ck")]) == 0
    ck = sweep.load(tmp_path / "ck")
    assert ck.options.segment.vad and ck.options.batch == 8
    wav = tmp_path / "long" / f"{recs[0].id}.wav"
    (row,) = transcribe.transcribe_files(ck, [wav], language="ru")
    assert row["duration_s"] > 30 and row["text"]
    opts = serve.ServeOptions(str(tmp_path / "ck"), port=0, warmup=False, threads=1,
                              max_batch=2)
    import threading
    import time

    server, sock = serve.build(opts)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        r = requests.post(f"{serve.url_of(sock)}/v1/audio/transcriptions", timeout=300,
                          files={"file": ("long.wav", wav.read_bytes())},
                          data={"language": "ru"})
    finally:
        server.should_exit = True
        thread.join(60)
    assert r.status_code == 200 and r.json()["text"] == row["text"]
