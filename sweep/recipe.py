"""Recipes: one frozen config per technique, each declaring its parameters once (pure, no torch).

A parameter has one dotted name everywhere (YAML search spaces, Optuna, MLflow, recipe.json). A
new dimension = a `@technique` config class + a `Recipe` field; the rest follows from PARAMS."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
from dataclasses import dataclass, field
from typing import ClassVar

from .params import DEVICE, TECHNIQUES, Param, RecipeError, Requires, Technique, technique

LAYER_TYPES = ("enc_attn", "enc_mlp", "dec_self", "dec_cross", "dec_mlp", "head")
# Every subset in canonical order, so that a search space may list any of them as a choice.
TARGETS = ("all",) + tuple("+".join(c) for n in range(1, len(LAYER_TYPES))
                           for c in itertools.combinations(LAYER_TYPES, n))
SCHEMES = ("none", "dynamic_int8", "static_int8", "int8_weight_only", "int8_act_int4_weight",
           "bf16", "fp16", "autocast_bf16", "autocast_fp16", "bnb_int8", "bnb_nf4")
SHORT = {"dynamic_int8": "int8 dyn", "static_int8": "int8 static", "int8_weight_only": "int8 wo",
         "int8_act_int4_weight": "int8a/int4w"}  # others: "_" -> " "


_BNB = Requires(("bnb_int8", "bnb_nf4"), why="bitsandbytes kernels are CUDA-only")


@technique("struct")
class StructConfig(Technique):
    PARAMS = {"struct.ffn_rate": Param("float", 0.0, 0.0, 0.9, help="share of FFN neurons removed "
                                       "per layer (lowest L2 of fc1 row + fc2 column)"),
              # whisper-base's decoder loops once 5% of its FFN goes, its encoder (88% of the
              # FLOPs) takes 10% well: let the search shrink the stacks apart
              "struct.stacks": Param("choice", "both", choices=("both", "encoder", "decoder"),
                                     help="which stacks lose FFN neurons")}

    active = property(lambda self: self.ffn_rate > 0)
    def describe(self) -> str:
        where = "" if self.stacks == "both" else f" ({self.stacks[:3]})"
        return f"ffn -{self.ffn_rate:.0%}{where}"


@technique("prune")
class PruneConfig(Technique):
    PARAMS = {
        "prune.rate": Param("float", 0.0, 0.0, 1.0, hi_open=True,
                            help="share of weights zeroed in the targeted layers; 0 = off"),
        # Single weights rank alike by |w| and w^2, so l2 means whole rows (torch ln_structured).
        "prune.norm": Param("choice", "l1", choices=("l1", "l2"), help="l1: single weights by "
                            "|w|; l2: whole output rows by L2 norm (ln_structured n=2, dim=0)"),
        "prune.scope": Param("choice", "layer", choices=("global", "layer"), help="layer: the "
                             "rate in each layer; global: one threshold (l2: rows by RMS)"),
        "prune.targets": Param("choice", "all", choices=TARGETS, help="all or a '+'-joined "
                               "subset of layer types; head is tied to the embeddings"),
        "prune.pattern": Param("choice", "unstructured", choices=("unstructured", "2:4"),
                               help="2:4 keeps the 2 largest of every 4 weights (rate 0.5)",
                               requires=(Requires(("2:4",), why="sparse kernels are CUDA-only"),)),
    }

    def _normalize(self):
        parts = set(self.targets.split("+")) if isinstance(self.targets, str) else set()
        if len(parts) > 1 and parts <= set(LAYER_TYPES):
            canon = "+".join(t for t in LAYER_TYPES if t in parts)
            object.__setattr__(self, "targets", "all" if canon == "+".join(LAYER_TYPES) else canon)

    def _check(self):
        got = (self.rate, self.norm, self.scope)
        if self.pattern == "2:4" and self.rate and got != (0.5, "l1", "layer"):
            raise RecipeError("`prune.rate`/`prune.norm`/`prune.scope` must be 0.5/l1/layer with "
                              f"prune.pattern='2:4' (2 of every 4 weights go), got {got}")

    active = property(lambda self: self.rate > 0)
    layer_types = property(lambda self: LAYER_TYPES if self.targets == "all"
                           else tuple(self.targets.split("+")))

    def describe(self) -> str:
        what = "2:4" if self.pattern == "2:4" else f"{self.norm} {self.rate:.2f}"
        return (f"prune {what}" + (" global" if self.scope == "global" else "")
                + ("" if self.targets == "all" else f" ({self.targets})"))


@technique("quant")
class QuantConfig(Technique):
    PARAMS = {"quant.scheme": Param("choice", "none", choices=SCHEMES, requires=(_BNB,),
                                    help="scheme of every Linear layer unless overridden")} | {
        f"quant.{t}": Param("choice", "inherit", choices=("inherit",) + SCHEMES, requires=(_BNB,),
                            help=f"scheme of the {t} Linear layers; inherit = quant.scheme")
        for t in LAYER_TYPES}

    def by_layer_type(self) -> dict[str, str]:  # `inherit` resolved
        return {t: self.scheme if getattr(self, t) == "inherit" else getattr(self, t)
                for t in LAYER_TYPES}

    active = property(lambda self: set(self.by_layer_type().values()) != {"none"})
    def describe(self) -> str:
        by = self.by_layer_type()
        return " + ".join(f"{SHORT.get(s, s.replace('_', ' '))} "
                          f"({_abbrev([t for t in by if by[t] == s])})"
                          for s in dict.fromkeys(by.values()) if s != "none")


def _abbrev(types: list[str]) -> str:
    if len(types) == len(LAYER_TYPES):
        return "all"
    out = []
    for short, group in (("enc", LAYER_TYPES[:2]), ("dec", LAYER_TYPES[2:5]), ("", ("head",))):
        got = [t for t in group if t in types]
        out += [short] if short and len(got) == len(group) else got
    return "+".join(out)


@technique("compile")
class CompileConfig(Technique):
    PARAMS = {"compile.mode": Param(
        "choice", "none", choices=("none", "default", "reduce-overhead", "max-autotune"),
        requires=(Requires(("reduce-overhead",), why="it means CUDA graphs"),),
        help="torch.compile mode of the encoder and decoder modules; none = eager")}

    active = property(lambda self: self.mode != "none")
    def describe(self) -> str:
        return f"compile {self.mode}"


@technique("encoder")
class EncoderConfig(Technique):
    PARAMS = {
        "encoder.window": Param("choice", "full", choices=("full", "auto"), help="mel window the "
                                "encoder sees: full = Whisper's 30 s; auto = the clip rounded up "
                                "to encoder.bucket_s (trimmed position embeddings; WER measured)"),
        "encoder.bucket_s": Param("int", 5, 1, 30, help="auto window step in seconds (few "
                                  "distinct shapes); unused with encoder.window=full"),
        # The encoder is 88% of whisper-base's FLOPs: in bf16 on AMX, eager spends a fifth of
        # its time in unfused copies, adds and GELUs around the matmuls.
        "encoder.compile": Param("choice", "none", choices=("none", "default", "freeze"),
                                 requires=(Requires(("default", "freeze"), key="compile.mode",
                                                    equals="none", why="compile.mode compiles "
                                                    "the encoder already"),),
                                 help="torch.compile of the encoder alone: default = inductor; "
                                 "freeze = inductor with freezing (weights become constants, "
                                 "prepacked for oneDNN; inference only); none = eager"),
    }

    active = property(lambda self: self.window != "full" or self.compile != "none")
    def describe(self) -> str:
        return ", ".join(filter(None, (
            self.window != "full" and f"window auto/{self.bucket_s}s",
            self.compile != "none" and f"encoder compiled ({self.compile})")))


def _greedy(*values, why: str = "generate() runs its own Python loop") -> Requires:
    return Requires(values, key="decode.loop", equals="greedy", why=why)


@technique("decode")
class DecodeConfig(Technique):
    PARAMS = {
        "decode.loop": Param("choice", "generate", choices=("generate", "greedy"), help="generate "
                             "= HF generate(); greedy = lean loop, static KV cache, same tokens"),
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
    }

    active = property(lambda self: self.loop != "generate" or self.no_repeat_ngram > 0)
    def describe(self) -> str:
        return ", ".join(filter(None, (
            f"{self.loop}" + {"step": " compiled", "script": " scripted"}.get(self.compile, ""),
            self.cross_kv != "model" and f"cross K/V {self.cross_kv}",
            self.no_repeat_ngram and f"no repeated {self.no_repeat_ngram}-gram")))


@dataclass(frozen=True)
class Recipe:
    """A point of the search space. Field order is the order compress applies techniques in."""

    device: str = "cpu"
    struct: StructConfig = field(default_factory=StructConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    FORMAT_VERSION: ClassVar[int] = 1

    def __post_init__(self):
        flat = self.to_flat()
        for name, value in flat.items():  # device, then cross-field rules (CUDA-only choices)
            if err := PARAMS[name].validate(value) or PARAMS[name].requirement_error(value, flat):
                raise RecipeError(err)

    def configs(self) -> list[Technique]:  # in application order
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device"]

    @classmethod
    def from_flat(cls, flat: dict) -> Recipe:
        """From dotted names; missing names take their defaults, unknown ones are refused."""
        for key in [k for k in flat if k not in PARAMS][:1]:
            near = difflib.get_close_matches(str(key), list(PARAMS), n=1, cutoff=0.5)
            raise RecipeError(f"unknown recipe key `{key}`" + (
                f"; did you mean `{near[0]}`?" if near else f"; known: {', '.join(PARAMS)}"))
        typed = {k: PARAMS[k].coerce(v) for k, v in flat.items()}
        parts = {p: tech(**{n.split(".", 1)[1]: v for n, v in typed.items()
                            if n.startswith(p + ".")}) for p, tech in TECHNIQUES.items()}
        return cls(device=typed.get("device", DEVICE.default), **parts)

    def to_flat(self) -> dict:  # every parameter under its dotted name
        return {"device": self.device} | {n: getattr(c, n.split(".", 1)[1])
                                          for c in self.configs() for n in c.PARAMS}

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """`"quant.scheme=dynamic_int8,prune.rate=0.3"` -> Recipe; values typed by their Param."""
        flat = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key in flat:
                raise RecipeError(f"recipe item {item!r}: expected key=value, each key once")
            flat[key] = value
        return cls.from_flat(flat)

    def to_json(self) -> str:
        return json.dumps({"format_version": self.FORMAT_VERSION, **self.to_flat()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        data = json.loads(text)
        if (version := data.pop("format_version", None)) != cls.FORMAT_VERSION:
            raise RecipeError(f"`format_version` must be {cls.FORMAT_VERSION}, got {version!r}")
        return cls.from_flat(data)

    # True when nothing changes the model.
    is_baseline = property(lambda self: not any(cfg.active for cfg in self.configs()))
    # torch.compile anywhere: the whole stacks, the encoder alone, or the greedy step
    compiles = property(lambda self: self.compile.active or self.encoder.compile != "none"
                        or self.decode.compile == "step")

    def describe(self) -> str:
        """Short text for tables and progress lines, e.g. "int8 dyn (enc+dec), prune l1 0.30"."""
        text = ", ".join(cfg.describe() for cfg in self.configs() if cfg.active) or "fp32"
        return text + ("" if self.device == "cpu" else f" [{self.device}]")


# Every parameter of every technique by dotted name: what search spaces validate against.
PARAMS: dict[str, Param] = {"device": DEVICE} | {
    k: p for tech in TECHNIQUES.values() for k, p in tech.PARAMS.items()}
