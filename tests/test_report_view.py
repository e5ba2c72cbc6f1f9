"""The front explains itself: the baseline once, recipes in `Recipe.describe`'s words, axes chosen
for the front (a broken trial at the edge, marked), the data's resolution stated."""

import json
import re

import pytest

from sweep.results import figures, pareto, report, report_html

BASE = {"wer": 0.29, "cer": 0.1, "latency_median_s": 1.0}


def row(tid, wer, lat, recipe, lo=-0.05, hi=0.05):
    return {"trial_id": tid, "run_id": f"run{tid}", "status": "ok", "device": "cpu",
            "wer": wer, "cer": 0.1, "dwer": wer / BASE["wer"] - 1, "dcer": 0.0,
            "latency_median_s": lat, "speedup": 1.0 / lat, "dwer_ci95_lo": lo,
            "dwer_ci95_hi": hi, "recipe": {"device": "cpu", **recipe}}


ROWS = [row("b", 0.29, 1.0, {}, 0.0, 0.0),  # the baseline trial: on the front
        row("i", 0.30, 0.6, {"quant.scheme": "dynamic_int8"}, -0.04, 0.08),
        row("m", 0.31, 0.4, {"quant.scheme": "dynamic_int8", "quant.enc_mlp": "bf16"}, -0.1, 0.1),
        row("p", 1.55, 0.3, {"prune.rate": 0.4}, 3.0, 5.0)]  # broken: over every constraint
CONSTRAINTS = {"max_dwer": 0.25}


@pytest.fixture()
def front():
    f = pareto.pareto_front(ROWS, constraints=CONSTRAINTS, baseline=BASE)
    assert [r["trial_id"] for r in f] == ["b", "i", "m"]
    return f


def test_the_table_shows_the_baseline_once_and_recipes_by_what_differs(front):
    text = report.format_table(front, BASE)
    assert text.count("baseline") == 1 and "fp32" not in text
    lines = text.splitlines()
    assert lines[2].startswith("baseline (on the front)") and "+0.0%" in lines[2]
    assert [ln.split("  ")[0] for ln in lines[3:]] == [
        "int8 dyn (all)", "int8 dyn (enc_attn+dec+head) + bf16 (enc_mlp)"]


def _points(page: str) -> list[dict]:
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', m))
            for m in re.findall(r"<circle [^>]*>", page)]


def test_html_axes_fit_the_front_and_mark_the_broken_trial(tmp_path, front):
    page = report_html.write_report_html(ROWS, front, BASE, tmp_path / "r.html",
                                         objectives=pareto.DEFAULT_OBJECTIVES).read_text()
    pts = _points(page)
    height = report_html.H - report_html.T - report_html.B
    fy = [float(p["cy"]) for p in pts if p["data-front"] == "1"]
    assert (max(fy) - min(fy)) / height > 0.7  # the front spans most of the plot's height
    broken = next(p for p in pts if p["data-y"] == "1.55")
    assert broken["data-beyond"] == "1" and float(broken["cy"]) == report_html.T  # top edge
    assert "chosen for the front: 1 trials beyond them are drawn hollow at the edge" in page
    views = json.loads(re.search(r'id="views">(.*?)</script>', page).group(1))
    assert views["log"]["y"][2] is True and 'id="logscale"' in page  # the log-scale option
    # the table: recipes in describe's words, the whole recipe one click away, baseline once
    table = page[page.index("<table>"):]
    assert "<summary>int8 dyn (all)</summary>" in table and "quant.scheme=dynamic_int8" in table
    assert table.count("<summary>baseline</summary>") == 1 and "fp32" not in table
    # resolution: median half-width of the front's dWER intervals (0.06, 0.1 -> 0.08), not
    # widened by the broken trial's (1.0)
    assert "median half-width of 0.080 over 2 trials" in page
    assert report.resolution(ROWS) == (pytest.approx(0.1), 3)  # no front: every trial
    assert "%" not in page.replace("%;", "")


@pytest.mark.parametrize("log", [False, True])
def test_png_axes_fit_the_front(tmp_path, front, log):
    from PIL import Image

    png = report.plot_front(ROWS, front, BASE, tmp_path / "f.png", log=log)
    axes = json.loads(Image.open(png).text["HYPER axes"])
    name, lo, hi, is_log = axes["y"]
    assert name == "wer" and is_log is log
    if log:  # the option: every trial on log axes
        assert lo < 0.29 and hi > 1.55
    else:  # chosen for the front: it spans most of the height, the broken trial at the edge
        assert hi < 1.55 and (0.31 - 0.29) / (hi - lo) > 0.7


def test_html_shows_the_hallucination_rate_of_the_front(tmp_path, front):
    rows = [{**r, "hallucination_rate": 0.1 * i} for i, r in enumerate(ROWS)]
    front = [next(x for x in rows if x["trial_id"] == r["trial_id"]) for r in front]
    page = report_html.write_report_html(rows, front, BASE, tmp_path / "r.html",
                                         objectives=pareto.DEFAULT_OBJECTIVES).read_text()
    table = page[page.index("<table>"):]
    assert "<th>hallucination_rate</th>" in table
    fmt = figures.BY_NAME["hallucination_rate"].fmt
    for r in front:  # each front row's own rate, in its row
        rate = report_html._fmt(r["hallucination_rate"], fmt)
        assert re.search(rf"<tr><td>{r['trial_id']}.*?<td>{re.escape(rate)}</td><td>cpu</td>",
                         table), (r["trial_id"], rate)
    assert f"hallucination_rate {report_html._fmt(0.1, fmt)}" in page  # in the hover too
    # a sweep without probes has no such column
    plain = report_html.write_report_html(ROWS, front, BASE, tmp_path / "p.html").read_text()
    assert "hallucination_rate" not in plain
