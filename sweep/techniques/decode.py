"""Decoding levers: HF generate or the lean greedy loop (compiled or scripted step), the cross
K/V dtype, and a repeated-n-gram ban. They only change the options handed to transcription."""

from __future__ import annotations

import dataclasses

from .base import Param, Requires, Technique, technique


def _greedy(*values, why: str = "generate() runs its own Python loop") -> Requires:
    return Requires(values, key="decode.loop", equals="greedy", why=why)


@technique("decode")
class DecodeConfig(Technique):
    PARAMS = {
        "decode.loop": Param("choice", "generate", choices=("generate", "greedy"), help="generate "
                             "= HF generate(); greedy = lean loop, static KV cache, same tokens"),
        # `script` rests on torch.jit.trace, deprecated in torch 2.13; it stays while it measures
        # faster than `step` (torch.compile of the same step): 0.544 s per clip against 0.590,
        # eager 0.620 (int8, 16 clips interleaved, AMD EPYC with VNNI, loaded machine,
        # bench/results/decode-script-vs-step.md). Drop it once `step` catches up.
        "decode.compile": Param("choice", "none", choices=("none", "step", "script"),
                                requires=(_greedy("step", "script"),),
                                help="step = torch.compile of the greedy decoding step with "
                                "static shapes (CUDA graphs on cuda); script = the same step "
                                "traced by TorchScript (int8 modules run natively in it); "
                                "none = eager"),
        "decode.no_repeat_ngram": Param("int", 0, 0, 16, help="no n-gram of this many tokens "
                                        "twice (HF no_repeat_ngram_size; stops repetition "
                                        "loops); 0 = off"),
        # Per token the 6 layers' cross-attention reads 1500 encoder positions of keys and
        # values: 1.0 ms in fp32, 0.34 ms in bf16 on this CPU (of ~5 ms per token).
        "decode.cross_kv": Param("choice", "model", choices=("model", "bf16"),
                                 requires=(_greedy("bf16", why="generate() keeps HF's own cache"),),
                                 help="dtype of the greedy loop's cached cross-attention keys "
                                 "and values: model = the decoder's own; bf16 halves what each "
                                 "token reads (queries cast, output cast back)"),
        # On long recordings whisper-base, decoding a VAD piece of several utterances without
        # timestamps, skipped some of them (docs/longform.md); with timestamp tokens it
        # decodes segment by segment, as it was trained to on long audio.
        "decode.timestamps": Param("bool", False, help="decode with Whisper's timestamp tokens "
                                   "and rules (HF WhisperTimeStampLogitsProcessor's; the text "
                                   "keeps none of them); false = <|notimestamps|>"),
        # Throughput, not latency (issue #28). Fixed batches wait for their longest row and
        # pad to their longest window: the greedy loop streams instead (decode.stream), 1.21x
        # batch 1 on a long-form set whose recordings share the stream (2-core AVX-512 EPYC,
        # no AMX, commit 93801c9; docs/longform.md).
        "decode.batch": Param("int", 1, 1, 64, help="segments or clips decoded together: the "
                              "greedy loop (not compiled) streams them, a row taking the next "
                              "piece as its own ends, each piece encoded alone; generate and "
                              "the compiled step decode fixed batches; 1 = one at a time"),
    }

    compiles = property(lambda self: self.compile == "step")

    def cheap(self):  # the same greedy tokens, eager
        return dataclasses.replace(self, compile="none") if self.compiles else self

    def decoding(self) -> dict:
        return {"loop": self.loop, "compiled": self.compile == "step",
                "scripted": self.compile == "script", "no_repeat": self.no_repeat_ngram,
                "cross_kv": self.cross_kv, "batch": self.batch, "timestamps": self.timestamps}

    def describe(self) -> str:
        return ", ".join(filter(None, (
            f"{self.loop}" + {"step": " compiled", "script": " scripted"}.get(self.compile, ""),
            self.cross_kv != "model" and f"cross K/V {self.cross_kv}",
            self.no_repeat_ngram and f"no repeated {self.no_repeat_ngram}-gram",
            self.timestamps and "timestamps",
            self.batch > 1 and f"batch {self.batch}")))
