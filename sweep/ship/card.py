"""The model card (README.md) and metrics.json of an exported checkpoint, and the exporting
machine's description: what a reader of the checkpoint sees, apart from the weights."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ..inputs import machine
from ..results import figures
from ..techniques.recipe import TECHNIQUES, Recipe


def write_metrics(out, metrics: dict) -> None:
    """metrics.json and the model card (README.md) that shows them, rewritten together."""
    out = Path(out)
    info = json.loads((out / "recipe.json").read_text(encoding="utf-8"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False,
                                                 default=str) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(info, metrics), encoding="utf-8")


def environment() -> dict:
    """Hardware and library versions of the exporting machine (the figures hold for them)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "missing"

    return {**machine.info(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": {p: ver(p) for p in ("torch", "torchao", "transformers", "safetensors",
                                             "hyper-sweep")}}


# ---- model card ------------------------------------------------------------------------------

# The card's figures (`sweep.results.figures`, destination `card`): measured ones against the
# baseline,
# then relative ones against what the baseline scores on them (speed-up 1.00x).
CARD_FIGURES = [figures.BY_NAME[n] for n in figures.names("card")]
CARD = """# Whisper, {title} — exported by HYPER

Base model `{model}`; trial `{run_id}` of sweep `{sweep}`.

| figure | this checkpoint | baseline | change |
|---|---:|---:|---:|
{table}

Measured on `{dataset}` ({n} utterances, language {language}) with {threads} threads on {cpu};
{versions}.{verify}

## Recipe

{recipe}

Device: {device}. Full recipe: `recipe.json`; figures, data set, hardware and versions:
`metrics.json`.

## Load

```python
import sweep
from sweep.transcribe import transcribe_files

ck = sweep.load("path/to/this/dir")  # checks recipe.json and file hashes, re-applies the rest
print(transcribe_files(ck, ["audio.wav"])[0]["text"])  # also ck.model, ck.processor, ck.recipe
```

```bash
python -m sweep.transcribe --checkpoint path/to/this/dir audio.wav
```

### Plain transformers

{plain}
"""
PLAIN_CODE = """

```python
from transformers import WhisperForConditionalGeneration, WhisperProcessor

model = WhisperForConditionalGeneration.from_pretrained("path/to/this/dir")
processor = WhisperProcessor.from_pretrained("path/to/this/dir")
feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
ids = model.generate(feats.to(model.dtype), language="{language}", task="transcribe")
print(processor.batch_decode(ids, skip_special_tokens=True)[0])
```"""


def _num(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def model_card(info: dict, metrics: dict) -> str:
    """README.md: figures against the baseline (percent only here), the recipe, how to load."""
    recipe = Recipe.from_json(json.dumps(info["recipe"]))
    fig, base = metrics.get("figures") or {}, metrics.get("baseline") or {}
    data, env, v = metrics.get("data") or {}, metrics.get("environment") or {}, metrics.get(
        "verify")
    rows = [f"| {f.text} | {_num(fig.get(f.name), f.fmt)} | {_num(base.get(f.name), f.fmt)} | "
            + (f"{fig[f.name] / base[f.name] - 1:+.1%} |" if _num(fig.get(f.name), "") != "—"
               and _num(base.get(f.name), "") != "—" and base[f.name] else "— |")
            for f in CARD_FIGURES if not f.relative and (f.name in fig or f.name in base)]
    rows += [f"| {f.text} | {_num(fig[f.name], f.fmt)}{f.unit} | {_num(f.neutral, f.fmt)}{f.unit}"
             " | |" for f in CARD_FIGURES if f.relative and f.name in fig]
    lines = [f"- **{getattr(recipe, p).describe()}** — {cls.STORAGE.why}."
             for p, cls in TECHNIQUES.items() if getattr(recipe, p).active] or [
        "- none: the base model."]
    return CARD.format(
        title=recipe.describe(), model=(metrics.get("model") or {}).get("spec", "?"),
        run_id=(metrics.get("trial") or {}).get("run_id", "?"),
        sweep=(metrics.get("trial") or {}).get("sweep", "?"), table="\n".join(rows),
        dataset=data.get("dataset", "?"), n=data.get("n_utterances", "?"),
        language=data.get("language") or "per utterance",
        threads=_num(fig.get("threads"), ".0f").replace("—", "?"), cpu=env.get("cpu", "?"),
        versions=", ".join(f"{k} {x}" for k, x in (env.get("versions") or {}).items()),
        verify="" if not v else (
            f"\n\nRe-measured after export: WER {_num(v.get('wer'), '.3f')}, CER "
            f"{_num(v.get('cer'), '.3f')}, median latency {_num(v.get('latency_median_s'), '.3f')}"
            f" s: {'identical transcripts' if v.get('match') else 'DIFFERS from the trial'}."),
        recipe="\n".join(lines), device=recipe.device, plain=plain_text(info, recipe, v, data))


def plain_text(info: dict, recipe: Recipe, verify: dict | None, data: dict) -> str:
    """What `from_pretrained(dir)` alone gives of this checkpoint, what only `sweep.load` adds,
    and, when they differ, by how much (measured by `export --verify`)."""
    plain, odd = info["plain"]["weights"], info["plain"]["not_exact"]
    call = "`WhisperForConditionalGeneration.from_pretrained(dir)` alone"

    def listed(status):
        return "; ".join(f"{k['modules']} × {k['what']} (e.g. `{k['example']}`)" for k in odd
                         if k["plain"] == status)

    if plain == "none":
        return (f"{call} cannot load this checkpoint: {listed('none')} have no loader in "
                "transformers. Their weights are in `hyper.safetensors`, not "
                "`model.safetensors`, so `from_pretrained` finds no weights rather than building "
                "a wrong model: use `sweep.load`.")
    adds = [f"{t}: {getattr(recipe, t).describe()}" for t in info["reapplied"]]
    text = call + (" loads the measured weights and modules exactly" if plain == "exact" else
                   f" loads it only approximately: {listed('approximate')} run in "
                   "transformers' own modules, their weights upcast to the model's dtype")
    if any(s["kind"] == "torchao_linear" for s in info["modules"].values()):
        text += " (its torchao layers through transformers' `TorchAoConfig` in config.json)"
    if plain == "exact" and not adds:
        text += ": it is exactly the measured model."
    else:
        text += (f". Only `sweep.load` adds: {'; '.join(adds)}." if adds else ".")
        p = (verify or {}).get("plain")
        text += (f" With plain transformers' `generate`, on the same data (export --verify): WER "
                 f"{_num(p.get('wer'), '.3f')} against the checkpoint's "
                 f"{_num(verify.get('wer'), '.3f')}, CER {_num(p.get('cer'), '.3f')} against "
                 f"{_num(verify.get('cer'), '.3f')}; {p.get('differing_transcripts')} of "
                 f"{p.get('n_utterances')} transcripts differ." if p else
                 " The difference is measured by `python -m sweep.export ... --verify`.")
    langs = data.get("languages") or []
    return text + PLAIN_CODE.format(language=data.get("language") or (
        langs[0] if len(langs) == 1 else "ru"))
