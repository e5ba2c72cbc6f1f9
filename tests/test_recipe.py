"""sweep.techniques.recipe: parameters declared once, round trips, and every refusal naming its
key."""

import dataclasses
import json
import subprocess
import sys

import pytest

from sweep.techniques import LAYER_TYPES, Param
from sweep.techniques.compile import CompileConfig
from sweep.techniques.decode import DecodeConfig
from sweep.techniques.encoder import EncoderConfig
from sweep.techniques.prune import PruneConfig
from sweep.techniques.quant import SCHEMES, QuantConfig
from sweep.techniques.recipe import PARAMS, TECHNIQUES, Recipe, RecipeError
from sweep.techniques.struct import StructConfig

EXAMPLES = [
    "",
    "quant.scheme=dynamic_int8,prune.rate=0.3",
    "quant.enc_attn=bf16,quant.enc_mlp=bf16,quant.scheme=dynamic_int8,quant.head=none",
    "struct.ffn_rate=0.25,prune.rate=0.2,prune.norm=l2,prune.scope=global,"
    "prune.targets=enc_mlp+dec_mlp,compile.mode=default",
    "device=cuda,prune.pattern=2:4,prune.rate=0.5,quant.scheme=bnb_nf4,"
    "compile.mode=reduce-overhead",
    "quant.scheme=static_int8,quant.dec_cross=int8_act_int4_weight,compile.mode=max-autotune",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_round_trips(text):
    r = Recipe.parse(text)
    flat = r.to_flat()
    assert list(flat) == list(PARAMS)  # every parameter, dotted, in one order
    assert Recipe.from_flat(flat) == r
    assert Recipe.from_json(r.to_json()) == r
    assert json.loads(r.to_json())["format_version"] == 1
    assert Recipe.parse(",".join(f"{k}={v}" for k, v in flat.items())) == r
    assert Recipe.from_flat({k: str(v) for k, v in flat.items()}) == r  # MLflow gives text


def test_parse_types_values_by_param():
    r = Recipe.parse(" quant.scheme = dynamic_int8 , prune.rate=0.3, struct.ffn_rate=0 ")
    assert r.prune.rate == 0.3 and isinstance(r.struct.ffn_rate, float)
    assert r.quant.scheme == "dynamic_int8"
    assert PruneConfig(rate=0).rate == 0.0 and type(PruneConfig(rate=0).rate) is float


@pytest.mark.parametrize("text, key", [
    ("prune.rate=1", "`prune.rate` must be in [0, 1), got rate=1.0"),
    ("prune.rate=-0.1", "`prune.rate`"),
    ("prune.rate=nan", "`prune.rate`"),
    ("prune.rate=abc", "`prune.rate` must be float"),
    ("prune.norm=l3", "`prune.norm` must be one of l1, l2"),
    ("prune.scope=local", "`prune.scope`"),
    ("prune.targets=enc", "`prune.targets`"),
    ("prune.targets=enc_mlp+mlp", "`prune.targets`"),
    ("prune.pattern=4:8", "`prune.pattern`"),
    ("struct.ffn_rate=0.95", "`struct.ffn_rate` must be in [0, 0.9]"),
    ("quant.scheme=int3", "`quant.scheme`"),
    ("quant.scheme=inherit", "`quant.scheme`"),
    *((f"quant.{t}=int3", f"`quant.{t}`") for t in LAYER_TYPES),
    ("compile.mode=fast", "`compile.mode`"),
    ("device=tpu", "`device` must be one of cpu, cuda"),
])
def test_invalid_values_name_the_key(text, key):
    with pytest.raises(RecipeError) as e:
        Recipe.parse(text)
    assert key in str(e.value)


@pytest.mark.parametrize("text, msg", [
    ("quant.scheme=bnb_int8",
     "`quant.scheme`=bnb_int8 needs device=cuda, got device='cpu'"),
    ("quant.scheme=bnb_nf4", "`quant.scheme`=bnb_nf4 needs device=cuda"),
    *((f"quant.{t}=bnb_int8", f"`quant.{t}`=bnb_int8 needs device=cuda") for t in LAYER_TYPES),
    ("prune.pattern=2:4,prune.rate=0.5", "`prune.pattern`=2:4 needs device=cuda"),
    ("compile.mode=reduce-overhead", "`compile.mode`=reduce-overhead needs device=cuda"),
    ("device=cuda,prune.pattern=2:4,prune.rate=0.3", "`prune.rate`/`prune.norm`/`prune.scope`"),
    ("device=cuda,prune.pattern=2:4,prune.rate=0.5,prune.norm=l2", "must be 0.5/l1/layer"),
    ("device=cuda,prune.pattern=2:4,prune.rate=0.5,prune.scope=global", "must be 0.5/l1/layer"),
])
def test_invalid_combinations_refused(text, msg):
    with pytest.raises(RecipeError) as e:
        Recipe.parse(text)
    assert msg in str(e.value)


def test_cuda_choices_accepted_on_cuda():
    r = Recipe.parse("device=cuda,quant.scheme=bnb_int8,compile.mode=reduce-overhead")
    assert r.describe() == "bnb int8 (all), compile reduce-overhead [cuda]"


@pytest.mark.parametrize("key, near", [
    ("prune.rat", "prune.rate"), ("quant.enc_atn", "quant.enc_attn"), ("compile", "compile.mode"),
    ("devise", "device")])
def test_unknown_key_names_closest(key, near):
    with pytest.raises(RecipeError, match=rf"unknown recipe key `{key}`; did you mean `{near}`"):
        Recipe.from_flat({key: 1})


@pytest.mark.parametrize("text", ["prune.rate", "prune.rate=0.1,prune.rate=0.2"])
def test_parse_syntax_errors(text):
    with pytest.raises(RecipeError, match="expected key=value"):
        Recipe.parse(text)


def test_json_format_version_checked():
    data = json.loads(Recipe().to_json())
    data["format_version"] = 2
    with pytest.raises(RecipeError, match="`format_version` must be 1, got 2"):
        Recipe.from_json(json.dumps(data))


def test_params_complete_and_consistent_with_dataclasses():
    assert {StructConfig, PruneConfig, QuantConfig, CompileConfig, DecodeConfig,
            EncoderConfig} <= set(TECHNIQUES.values())
    # every technique module of the package registered its config, and nothing else is there
    import importlib
    import pkgutil

    import sweep.techniques as pkg
    from sweep.techniques.base import Technique

    defined = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"sweep.techniques.{m.name}")
        defined |= {c for c in vars(mod).values() if isinstance(c, type)
                    and issubclass(c, Technique) and c is not Technique
                    and c.__module__ == mod.__name__}
    assert defined == set(TECHNIQUES.values())
    # application order = registration order
    assert [c.PREFIX for c in Recipe().configs()] == list(TECHNIQUES)
    names = ["device"]
    for prefix, tech in TECHNIQUES.items():
        fields = {f.name: f.default for f in dataclasses.fields(tech)}
        assert {n: p.default for n, p in tech.PARAMS.items()} == {
            f"{prefix}.{k}": v for k, v in fields.items()}
        names += list(tech.PARAMS)
    assert names == list(PARAMS)
    for name, p in PARAMS.items():
        assert p.name == name and p.help and p.kind in ("float", "int", "choice", "bool")
        assert p.validate(p.default) is None
        if p.kind == "choice":
            assert p.default in p.choices and len(set(p.choices)) == len(p.choices)
        if p.kind in ("float", "int"):
            assert p.lo is not None and p.hi is not None
        for req in p.requires:
            assert set(req.values) <= set(p.choices) and req.key in PARAMS
    assert set(PARAMS["quant.scheme"].choices) == set(SCHEMES)
    assert Recipe().is_baseline and Recipe().to_flat() == {n: p.default for n, p in PARAMS.items()}


def test_param_validate_and_coerce():
    p = dataclasses.replace(PARAMS["prune.rate"])
    assert p.validate(0.0) is None and p.validate(0) is None
    assert "got rate=True" in p.validate(True)
    assert "a number" in p.validate("0.3")
    assert p.coerce("0.25") == 0.25
    b = Param("bool", False, name="x.flag", help="h")
    assert b.validate(True) is None and b.validate(1) is not None
    assert b.coerce("yes") is True and b.coerce("0") is False
    with pytest.raises(RecipeError, match="`x.flag`"):
        b.coerce("maybe")
    i = Param("int", 2, 1, 8, name="x.n", help="h")
    assert i.validate(3) is None and "an integer" in i.validate(2.5) and i.validate(9)
    assert Param("float", 1.0, 0, 1, lo_open=True, name="x.f").validate(0) is not None


def test_targets_any_order_is_canonical():
    assert PruneConfig(targets="dec_mlp+enc_attn").targets == "enc_attn+dec_mlp"
    assert PruneConfig(targets="+".join(reversed(LAYER_TYPES))).targets == "all"
    assert PruneConfig(targets="head").layer_types == ("head",)
    assert PruneConfig().layer_types == LAYER_TYPES


@pytest.mark.parametrize("text, want", [
    ("", "fp32"),
    ("quant.scheme=dynamic_int8,prune.rate=0.3", "prune l1 0.30, int8 dyn (all)"),
    ("quant.scheme=dynamic_int8,quant.head=none", "int8 dyn (enc+dec)"),
    ("quant.enc_attn=bf16,quant.enc_mlp=bf16,quant.scheme=dynamic_int8",
     "bf16 (enc) + int8 dyn (dec+head)"),
    ("struct.ffn_rate=0.25,prune.rate=0.1,prune.scope=global,prune.targets=enc_mlp,"
     "compile.mode=default", "ffn -25%, prune l1 0.10 global (enc_mlp), compile default"),
])
def test_describe(text, want):
    assert Recipe.parse(text).describe() == want


def test_is_baseline():
    assert Recipe.parse("prune.norm=l2,quant.enc_mlp=inherit").is_baseline
    off = ",".join(f"quant.{t}=none" for t in LAYER_TYPES)
    assert Recipe.parse("quant.scheme=dynamic_int8," + off).is_baseline
    for text in ("prune.rate=0.1", "struct.ffn_rate=0.1", "quant.head=bf16",
                 "compile.mode=default"):
        assert not Recipe.parse(text).is_baseline


def test_recipe_module_is_pure():
    code = ("import sys, sweep.techniques.recipe; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
