"""The encoder window's margin, padding and floor (encoder.margin_s, encoder.pad_s,
encoder.min_s): validated with clear errors, a larger margin encodes a longer window, padding
puts silence before the speech, the floor lengthens short windows only, all reach the decoding
plan and the spaces, and mean nothing on the full window."""

import numpy as np
import pytest
import torch

from sweep.inputs.data import load_eval_set
from sweep.measure import decode, evaluate
from sweep.measure.compress import apply_recipe
from sweep.measure.window import Window
from sweep.techniques.recipe import Recipe, RecipeError


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, small_manifest):
    from sweep.inputs.models import load_model

    lm = load_model(tiny_checkpoint)
    return lm.model, lm.processor, load_eval_set(small_manifest, max_samples=1).utterances[0]


@pytest.mark.parametrize("text, rule", [
    ("encoder.window=auto,encoder.margin_s=-1", "`encoder.margin_s` must be in [0, 30], got "
                                                 "margin_s=-1.0"),
    ("encoder.window=auto,encoder.pad_s=31", "`encoder.pad_s` must be in [0, 30], got "
                                             "pad_s=31.0"),
    ("encoder.margin_s=soon", "`encoder.margin_s` must be float in [0, 30], got 'soon'"),
    ("encoder.window=auto,encoder.min_s=40", "`encoder.min_s` must be in [0, 30], got "
                                             "min_s=40.0"),
])
def test_margin_and_padding_refused_with_the_rule(text, rule):
    with pytest.raises(RecipeError) as e:
        Recipe.parse(text)
    assert str(e.value) == rule


def test_window_refuses_bad_seconds():
    with pytest.raises(ValueError, match=r"`encoder.margin_s` must be seconds in \[0, 30\], "
                                         r"got margin_s=-0.5"):
        Window("auto", 5, margin_s=-0.5)
    with pytest.raises(ValueError, match="`encoder.pad_s` must be seconds"):
        Window("auto", 5, pad_s=True)
    with pytest.raises(ValueError, match=r"`encoder.min_s` must be seconds in \[0, 30\], "
                                         r"got min_s=-1"):
        Window("auto", 5, min_s=-1)


def test_the_floor_lengthens_short_windows_only():
    floor = Window("auto", 1, margin_s=2.0, min_s=10.0)
    assert floor.frames(2.0, 3000) == 1000  # 4 s of clip and margin -> 10 s
    assert floor.frames(9.5, 3000) == 1200  # 11.5 s: over the floor, the margin decides
    assert floor.frames(29.0, 3000) == 3000
    assert Window("auto", 1, margin_s=2.0).frames(2.0, 3000) == 400
    assert Window(min_s=10.0).frames(2.0, 3000) == 3000  # the full window ignores it


def test_a_larger_margin_gives_a_longer_window():
    frames = [Window("auto", 1, margin_s=m).frames(2.0, 3000) for m in (0, 0.5, 1.0, 1.5, 4.0)]
    assert frames == [200, 300, 300, 400, 600]
    assert Window("auto", 5, margin_s=1.0).frames(4.5, 3000) == 1000  # 5.5 s -> 10 s bucket
    assert Window("auto", 5, margin_s=29.0).frames(4.5, 3000) == 3000  # never past 30 s
    assert Window(margin_s=3.0).frames(2.0, 3000) == 3000  # the full window ignores it
    # padding counts towards the window, unless the clip would no longer fit in 30 s
    assert Window("auto", 1, pad_s=1.0).frames(2.0, 3000) == 300
    assert Window("auto", 1, pad_s=2.0).lead_s(29.0) == 0.0


def test_margin_and_padding_reach_the_features_tiny(tiny):
    model, proc, utt = tiny
    plan = lambda **kw: decode.GreedyPlan(Window("auto", 1, **kw))  # noqa: E731
    lens = [decode.features(model, proc, [utt.audio], [utt.duration_s], plan(margin_s=m))
            .shape[-1] for m in (0.0, 1.0, 3.0)]
    assert lens[0] < lens[1] < lens[2] and lens[2] - lens[0] == 300
    bare = decode.features(model, proc, [utt.audio], [utt.duration_s], plan())
    padded = decode.features(model, proc, [utt.audio], [utt.duration_s], plan(pad_s=1.0))
    assert padded.shape[-1] == bare.shape[-1] + 100
    # the clip's frames come 1 s (100 frames) later; before them, silence (all equal)
    n = bare.shape[-1] - 10
    assert torch.allclose(padded[..., 105:100 + n], bare[..., 5:n], atol=1e-4)
    assert torch.allclose(padded[..., 10:90], padded[..., 10:11].expand(-1, -1, 80))


def test_recipe_to_plan_and_back_tiny(tiny):
    model, proc, utt = tiny
    r = Recipe.parse("encoder.window=auto,encoder.bucket_s=1,encoder.margin_s=1.5,"
                     "encoder.pad_s=0.5,encoder.min_s=8,decode.loop=greedy,"
                     "decode.no_repeat_ngram=4")
    assert Recipe.from_flat(r.to_flat()) == r
    assert "window auto/1s +1.5s pad 0.5s >=8s" in r.describe()
    applied = apply_recipe(model, r)
    w = applied.options.window
    assert (w.margin_s, w.pad_s, w.min_s, applied.options.no_repeat) == (1.5, 0.5, 8.0, 4)
    assert "margin 1.5 s, padding 0.5 s, at least 8 s" in applied.options.describe()
    text, ids, _, secs = evaluate.transcribe(model, proc, utt, language="ru",
                                             options=applied.options)
    assert isinstance(text, str) and secs > 0
    # on the full window margin and padding change nothing: the unmodified model
    assert Recipe.parse("encoder.margin_s=2,encoder.pad_s=1,encoder.min_s=5").is_baseline
    assert np.isclose(Recipe.parse("encoder.window=auto,encoder.margin_s=2").encoder.margin_s, 2)


@pytest.mark.parametrize("name", ["cpu", "full"])
def test_cpu_and_full_spaces_search_margin_and_padding(name):
    from sweep.search.space import load_space

    space = load_space(name)
    for p in ("encoder.margin_s", "encoder.pad_s"):
        assert p in space.params
        assert space.conditions[p].parent == "encoder.window"
        assert space.conditions[p].values == ("auto",) or list(
            space.conditions[p].values) == ["auto"]
    windowed = [p for p in space.start_points({"cpu"}) if p.get("encoder.window") == "auto"]
    assert windowed and all(p["encoder.margin_s"] > 0 and p["decode.no_repeat_ngram"] > 0
                            for p in windowed)  # the margin, and the loop guard kept
