"""The sweep's self-contained HTML report (inline SVG and JS, nothing fetched). Pure."""

from __future__ import annotations

import html
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import figures
from .pareto import Objectives, _figure, _norm_objectives, _num, knee
from .report import (_fmt, axes, axis_label, baseline_row, beyond, describe_recipe, front_view,
                     recipe_string, resolution, verdict)

_SHOWN = ("wer", "dwer", "cer", "dcer", "latency_median_s", "speedup")  # in every point's hover
W, H, L, R, T, B = 760, 460, 70, 20, 20, 50  # the plot's size and margins, pixels

# Hover shows a point's recipe and figures; the log-scale box lays every point out again from
# its figures (data-x, data-y) on the ranges the report chose (`front_view`, in #views).
_HTML_JS = """
(function(){
  var tip=document.getElementById('tip');
  var V=JSON.parse(document.getElementById('views').textContent);
  var pts=document.querySelectorAll('svg .pt');
  pts.forEach(function(el){
    el.addEventListener('mouseenter',function(){tip.textContent=el.getAttribute('data-info');
      tip.style.display='block';});
    el.addEventListener('mousemove',function(e){tip.style.left=(e.pageX+14)+'px';
      tip.style.top=(e.pageY+10)+'px';});
    el.addEventListener('mouseleave',function(){tip.style.display='none';});
  });
  function t(v,r){return r[2]?Math.log10(v):v;}
  function px(v,r,a,b){var c=Math.max(r[0],Math.min(r[1],v));
    return a+(t(c,r)-t(r[0],r))/(t(r[1],r)-t(r[0],r))*(b-a);}
  function out(v,r){return v<r[0]||v>r[1];}
  function draw(mode){
    var v=V[mode], g=V.g, x0=g.L, x1=g.W-g.R, y0=g.H-g.B, y1=g.T;
    pts.forEach(function(el){
      var x=+el.dataset.x, y=+el.dataset.y, X=px(x,v.x,x0,x1), Y=px(y,v.y,y0,y1);
      if(el.tagName=='path'){el.setAttribute('transform','translate('+X+','+Y+')');}
      else{el.setAttribute('cx',X);el.setAttribute('cy',Y);}
      el.dataset.beyond=(out(x,v.x)||out(y,v.y))?'1':'0';
    });
    var st=document.getElementById('stairs');
    if(st){st.setAttribute('points',JSON.parse(st.dataset.xy).map(function(p){
      return px(p[0],v.x,x0,x1)+','+px(p[1],v.y,y0,y1);}).join(' '));}
    ['x','y'].forEach(function(k){
      document.querySelectorAll('.tick'+k).forEach(function(el,i){
        var r=v[k], u=t(r[0],r)+(t(r[1],r)-t(r[0],r))*i/5, val=r[2]?Math.pow(10,u):u;
        el.textContent=(+val.toPrecision(3)).toString();
        el.setAttribute(k, k=='x'?px(val,r,x0,x1):px(val,r,y0,y1)+4);
      });
    });
  }
  document.getElementById('logscale').addEventListener('change',function(e){
    draw(e.target.checked?'log':'lin');});
})();
"""


def _pixel(v: float, rng: tuple[float, float, bool], a: float, b: float) -> float:
    """Where `v` lands between pixels a (the range's low end) and b; beyond it: at the edge."""
    def t(x):
        return math.log10(x) if rng[2] else x

    return a + (t(beyond(v, rng)) - t(rng[0])) / (t(rng[1]) - t(rng[0])) * (b - a)


def _svg(pts, front_keys, baseline, view, ym, xm, links, info) -> tuple[str, int]:
    """The plot on `view`'s ranges, and how many points lie beyond them (drawn at the edge)."""
    def sx(x):
        return _pixel(x, view["x"], L, W - R)

    def sy(y):
        return _pixel(y, view["y"], H - B, T)

    svg = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">'),
           (f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" '
            f'stroke="#ccc"/>')]
    for i in range(6):
        xv, yv = (view[k][0] + (view[k][1] - view[k][0]) * i / 5 for k in ("x", "y"))
        svg.append(f'<text class="tickx" x="{sx(xv):.1f}" y="{H - B + 16}" '
                   f'text-anchor="middle">{xv:.3g}</text>')
        svg.append(f'<text class="ticky" x="{L - 6}" y="{sy(yv) + 4:.1f}" '
                   f'text-anchor="end">{yv:.3g}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">'
               f'{html.escape(axis_label(xm))}</text>')
    svg.append(f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">{html.escape(axis_label(ym))}</text>')
    fpts = sorted((r[xm], r[ym]) for r in pts if str(r.get("trial_id")) in front_keys)
    if len(fpts) > 1:
        steps = []
        for (xa, ya), (xb, _) in itertools.pairwise(fpts):
            steps += [(xa, ya), (xb, ya)]
        steps.append(fpts[-1])
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in steps)
        svg.append(f'<polyline id="stairs" points="{poly}" data-xy="{json.dumps(steps)}" '
                   f'fill="none" stroke="#d62728" stroke-width="1.5"/>')
    n_out = 0
    for r in sorted(pts, key=lambda r: str(r.get("trial_id")) in front_keys):
        on_front = str(r.get("trial_id")) in front_keys
        out = beyond(r[xm], view["x"]) != r[xm] or beyond(r[ym], view["y"]) != r[ym]
        n_out += out
        color, rad = ("#d62728", 5.5) if on_front else ("#9a9a9a", 4)
        circle = (f'<circle class="pt" data-front="{int(on_front)}" data-beyond="{int(out)}" '
                  f'data-x="{r[xm]!r}" data-y="{r[ym]!r}" cx="{sx(r[xm]):.1f}" '
                  f'cy="{sy(r[ym]):.1f}" r="{rad}" fill="{color}" stroke="{color}" '
                  f'data-info="{html.escape(info(r))}"><title>{html.escape(info(r))}</title>'
                  f'</circle>')
        url = links.get(str(r.get("trial_id")))
        if url:
            circle = f'<a href="{html.escape(url)}" target="_blank">{circle}</a>'
        svg.append(circle)
    if _num(baseline.get(xm)) is not None and _num(baseline.get(ym)) is not None:
        svg.append(f'<path class="pt" data-x="{baseline[xm]!r}" data-y="{baseline[ym]!r}" '
                   f'transform="translate({sx(baseline[xm]):.1f},{sy(baseline[ym]):.1f})" '
                   f'd="M0,-9 L8,6 L-8,6 Z" fill="#2ca02c" stroke="black" '
                   f'data-info="baseline\nWER {_fmt(baseline.get("wer"), ".4f")}\nlatency '
                   f'{_fmt(baseline.get("latency_median_s"), ".3f")} s"><title>baseline</title>'
                   f'</path>')
    svg.append("</svg>")
    return "".join(svg), n_out


def _screening_html(screening: Mapping | None) -> str:
    """Each dimension's values alone (dWER and speed-up from an anchor, on a few clips), and
    how the space was bounded by them."""
    if not screening:
        return ""
    trs = []
    for r in screening.get("rows", []):
        d, sp = _num(r.get("dwer")), _num(r.get("speedup"))
        trs.append(f"<tr><td>{html.escape(str(r.get('dim')))}</td>"
                   f"<td>{html.escape(str(r.get('value')))}</td>"
                   f"<td>{html.escape(str(r.get('anchor')))}</td>"
                   f"<td>{'—' if d is None else f'{d:+.3f}'}</td>"
                   f"<td>{'—' if sp is None else f'{sp:.2f}x'}</td>"
                   f"<td>{html.escape(str(r.get('status')))}"
                   f"{': ' + html.escape(str(r.get('reason'))[:90]) if r.get('reason') else ''}"
                   "</td></tr>")
    changes = "".join(f"<li>{html.escape(c)}</li>" for c in screening.get("changes", [])) or \
        "<li>nothing out of reach: the space was searched as written</li>"
    anchors = html.escape(", ".join(screening.get("anchors", {})))
    return (f"<h3>Screening: each change alone</h3><p>Measured on the first "
            f"{screening.get('clips')} clips from {anchors}"
            f", before the joint search. The space the sampler searched:</p><ul>{changes}</ul>"
            "<table><tr><th>parameter</th><th>value</th><th>from</th><th>dWER alone</th>"
            "<th>speed-up alone</th><th>status</th></tr>" + "".join(trs) + "</table>")


def write_report_html(rows: Sequence[Mapping], front: Sequence[Mapping], baseline: Mapping,
                      path: str | os.PathLike, run_links: Mapping[Any, str] | None = None, *,
                      title: str = "HYPER sweep", objectives: Objectives | None = None,
                      screening: Mapping | None = None) -> Path:
    """A self-contained HTML page (inline SVG and JS, nothing fetched): the first two
    objectives (WER vs latency by default) on ranges chosen for the front (a broken trial is a
    hollow point at the edge; a box switches to log axes holding every trial); hover a point
    for its recipe and figures, click it to open its MLflow run (`run_links` maps trial_id ->
    URL); the data's resolution (median dWER interval); then the front as a table, each recipe
    in the words of `Recipe.describe` (what differs from the baseline), the full recipe a click
    away. `screening`: the screening's saved table (`screen.json`), shown as its own section."""
    ym, xm = axes(objectives)
    more = [figures.BY_NAME[m] for m, _ in _norm_objectives(objectives)
            if m not in _SHOWN and m in figures.BY_NAME]  # objectives shown beside the study's
    # ... and every other figure meant for the report that the trials have (hallucination_rate)
    more += [f for f in figures.FIGURES if "report" in f.to and f.name not in _SHOWN
             and f not in more and any(_num(r.get(f.name)) is not None for r in rows)]
    links = {str(k): v for k, v in (run_links or {}).items()}
    front_keys = {str(r.get("trial_id")) for r in front}
    ok = [r for r in rows if r.get("status", "ok") == "ok" and _num(r.get(ym)) is not None
          and _num(r.get(xm)) is not None]
    extra = [r for r in front if id(r) not in {id(x) for x in ok}
             and _num(r.get(ym)) is not None and _num(r.get(xm)) is not None]
    pts = ok + extra
    own = baseline_row(front)

    def label(r):
        return "baseline" if r is own else describe_recipe(r.get("recipe"))

    def info(r):
        dwer, dcer = _figure(r, "dwer", baseline), _figure(r, "dcer", baseline)
        lines = [label(r), f"trial {r.get('trial_id')}  ({r.get('device', '?')})",
                 f"WER {_fmt(r.get('wer'), '.4f')}  dWER {_fmt(dwer, '+.4f')}",
                 f"CER {_fmt(r.get('cer'), '.4f')}  dCER {_fmt(dcer, '+.4f')}",
                 (f"latency {_fmt(r.get('latency_median_s'), '.3f')} s  "
                  f"speedup {_fmt(_figure(r, 'speedup', baseline), '.2f')}x")]
        lines += [f"{f.name} {_fmt(r.get(f.name), f.fmt)}" for f in more]
        lines += [f"{k} = {v}" for k, v in (r.get("recipe") or {}).items()]
        return "\n".join(lines)

    views = {"lin": front_view(front, baseline, objectives),
             "log": front_view(front, baseline, objectives, log=True, rows=pts),
             "g": {"W": W, "H": H, "L": L, "R": R, "T": T, "B": B}}
    svg, n_out = _svg(pts, front_keys, baseline, views["lin"], ym, xm, links, info)
    k = knee(front, objectives)
    trs = []
    for r in front:
        tid = str(r.get("trial_id"))
        cell = html.escape(tid)
        if tid in links:
            cell = f'<a href="{html.escape(links[tid])}" target="_blank">{cell}</a>'
        full = html.escape(recipe_string(r.get("recipe")))
        lo, hi = _num(r.get("dwer_ci95_lo")), _num(r.get("dwer_ci95_hi"))
        ci = "" if lo is None or hi is None else f" [{lo:+.3f}, {hi:+.3f}] {verdict(r)}"
        trs.append(
            f"<tr><td>{cell}{' ◆ knee' if k is r else ''}</td>"
            f'<td title="{full}"><details><summary>{html.escape(label(r))}</summary>'
            f"<code>{full}</code></details></td><td>{_fmt(r.get('wer'), '.4f')}</td>"
            f"<td>{_fmt(_figure(r, 'dwer', baseline), '+.4f')}{ci}</td>"
            f"<td>{_fmt(r.get('latency_median_s'), '.3f')}</td>"
            f"<td>{_fmt(_figure(r, 'speedup', baseline), '.2f')}x</td>"
            + "".join(f"<td>{_fmt(r.get(f.name), f.fmt)}</td>" for f in more)
            + f"<td>{html.escape(str(r.get('device', '')))}</td></tr>")
    table = ("<table><tr><th>trial</th><th>recipe (click for all of it)</th><th>WER</th>"
             "<th>dWER [95 percent interval]</th><th>latency s</th><th>speedup</th>"
             + "".join(f"<th>{f.name}</th>" for f in more)
             + "<th>device</th></tr>" + "".join(trs) + "</table>")
    res = resolution(rows, front)
    res_text = ("No trial has a dWER interval, so the data's resolution is unknown." if res is None
                else f"Resolution of this data: the 95 percent intervals of dWER have a median "
                f"half-width of {res[0]:.3f} over {res[1]} trials; recipes whose dWER differ by "
                "less than that are not told apart by it.")
    beyond_text = (f" The linear axes are chosen for the front: {n_out} trials beyond them are "
                   "drawn hollow at the edge (hover for their figures); the log scale shows "
                   "every trial." if n_out else "")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:20px;color:#222}}
#tip{{position:absolute;display:none;white-space:pre;background:#fff;border:1px solid #888;
padding:6px 8px;font:12px monospace;box-shadow:2px 2px 6px rgba(0,0,0,.2);pointer-events:none}}
.pt{{cursor:pointer}} [data-beyond="1"]{{fill-opacity:0;stroke-width:1.5}}
table{{border-collapse:collapse;margin-top:16px;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}} code{{font-size:12px}}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{len(ok)} trials ran, {len(front)} on the Pareto front (red). Baseline: WER
{_fmt(baseline.get('wer'), '.4f')}, {_fmt(baseline.get('latency_median_s'), '.3f')} s per audio.
dWER is the relative WER change (0.05: 5 percent worse). Hover a point for its recipe; click it to
open its MLflow run.{beyond_text}</p>
<p>{res_text}</p>
<label><input type="checkbox" id="logscale"> log scale</label><br>
{svg}
<script type="application/json" id="views">{json.dumps(views)}</script>
<div id="tip"></div>
<h3>Pareto front</h3>
{table}
{_screening_html(screening)}
<script>{_HTML_JS}</script>
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
