"""The sweep's self-contained HTML report (inline SVG and JS, nothing fetched). Pure."""

from __future__ import annotations

import html
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import figures
from .pareto import Objectives, _figure, _norm_objectives, _num, knee
from .report import _fmt, axes, axis_label, recipe_string

_SHOWN = ("wer", "dwer", "cer", "dcer", "latency_median_s", "speedup")  # in every point's hover

_HTML_JS = """
(function(){
  var tip=document.getElementById('tip');
  document.querySelectorAll('svg .pt').forEach(function(el){
    el.addEventListener('mouseenter',function(){tip.textContent=el.getAttribute('data-info');
      tip.style.display='block';});
    el.addEventListener('mousemove',function(e){tip.style.left=(e.pageX+14)+'px';
      tip.style.top=(e.pageY+10)+'px';});
    el.addEventListener('mouseleave',function(){tip.style.display='none';});
  });
})();
"""


def write_report_html(rows: Sequence[Mapping], front: Sequence[Mapping], baseline: Mapping,
                      path: str | os.PathLike, run_links: Mapping[Any, str] | None = None, *,
                      title: str = "HYPER sweep", objectives: Objectives | None = None) -> Path:
    """A self-contained HTML page (inline SVG and JS, nothing fetched): the first two
    objectives (WER vs latency by default), hover a point for its recipe and figures, click it
    to open its MLflow run (`run_links` maps trial_id -> URL); then the front as a table."""
    ym, xm = axes(objectives)
    more = [figures.BY_NAME[m] for m, _ in _norm_objectives(objectives)
            if m not in _SHOWN and m in figures.BY_NAME]  # objectives shown beside the study's
    links = {str(k): v for k, v in (run_links or {}).items()}
    front_ids = {id(r) for r in front}
    front_keys = {str(r.get("trial_id")) for r in front}
    ok = [r for r in rows if r.get("status", "ok") == "ok" and _num(r.get(ym)) is not None
          and _num(r.get(xm)) is not None]
    extra = [r for r in front if id(r) not in {id(x) for x in ok}
             and _num(r.get(ym)) is not None and _num(r.get(xm)) is not None]
    pts = ok + extra
    W, H, L, R, T, B = 760, 460, 70, 20, 20, 50
    xs = [r[xm] for r in pts]
    ys = [r[ym] for r in pts]
    if _num(baseline.get(xm)) is not None and _num(baseline.get(ym)) is not None:
        xs.append(baseline[xm])
        ys.append(baseline[ym])
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    padx, pady = (x1 - x0) * 0.06 or 0.05, (y1 - y0) * 0.06 or 0.05
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady

    def sx(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def sy(y):
        return H - B - (y - y0) / (y1 - y0) * (H - T - B)

    def info(r):
        dwer, dcer = _figure(r, "dwer", baseline), _figure(r, "dcer", baseline)
        lines = [f"trial {r.get('trial_id')}  ({r.get('device', '?')})",
                 f"WER {_fmt(r.get('wer'), '.4f')}  dWER {_fmt(dwer, '+.4f')}",
                 f"CER {_fmt(r.get('cer'), '.4f')}  dCER {_fmt(dcer, '+.4f')}",
                 (f"latency {_fmt(r.get('latency_median_s'), '.3f')} s  "
                  f"speedup {_fmt(_figure(r, 'speedup', baseline), '.2f')}x")]
        lines += [f"{f.name} {_fmt(r.get(f.name), f.fmt)}" for f in more]
        lines += [f"{k} = {v}" for k, v in (r.get("recipe") or {}).items()]
        return "\n".join(lines)

    svg = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">'),
           (f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="#fafafa" '
            f'stroke="#ccc"/>')]
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        yv = y0 + (y1 - y0) * i / 5
        svg.append(f'<text x="{sx(xv):.1f}" y="{H - B + 16}" text-anchor="middle">{xv:.3f}</text>')
        svg.append(f'<text x="{L - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle">'
               f'{html.escape(axis_label(xm))}</text>')
    svg.append(f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">{html.escape(axis_label(ym))}</text>')
    fpts = sorted((r[xm], r[ym]) for r in front if r in pts)
    if len(fpts) > 1:
        steps = []
        for (xa, ya), (xb, _) in itertools.pairwise(fpts):
            steps += [(xa, ya), (xb, ya)]
        steps.append(fpts[-1])
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in steps)
        svg.append(f'<polyline points="{poly}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    for r in sorted(pts, key=lambda r: str(r.get("trial_id")) in front_keys):
        on_front = id(r) in front_ids or str(r.get("trial_id")) in front_keys
        color, rad = ("#d62728", 5.5) if on_front else ("#9a9a9a", 4)
        circle = (f'<circle class="pt" cx="{sx(r[xm]):.1f}" '
                  f'cy="{sy(r[ym]):.1f}" r="{rad}" fill="{color}" fill-opacity="0.85" '
                  f'data-info="{html.escape(info(r))}"><title>{html.escape(info(r))}</title>'
                  f'</circle>')
        url = links.get(str(r.get("trial_id")))
        if url:
            circle = f'<a href="{html.escape(url)}" target="_blank">{circle}</a>'
        svg.append(circle)
    if _num(baseline.get(xm)) is not None and _num(baseline.get(ym)) is not None:
        bx, by = sx(baseline[xm]), sy(baseline[ym])
        svg.append(f'<path class="pt" d="M{bx:.1f},{by - 9:.1f} L{bx + 8:.1f},{by + 6:.1f} '
                   f'L{bx - 8:.1f},{by + 6:.1f} Z" fill="#2ca02c" stroke="black" '
                   f'data-info="baseline\nWER {_fmt(baseline.get("wer"), ".4f")}\nlatency '
                   f'{_fmt(baseline.get("latency_median_s"), ".3f")} s"><title>baseline</title>'
                   f'</path>')
    svg.append("</svg>")

    k = knee(front, objectives)
    trs = []
    for r in front:
        tid = str(r.get("trial_id"))
        cell = html.escape(tid)
        if tid in links:
            cell = f'<a href="{html.escape(links[tid])}" target="_blank">{cell}</a>'
        mark = " ◆ knee" if k is r else ""
        trs.append(
            f"<tr><td>{cell}{mark}</td><td>{_fmt(r.get('wer'), '.4f')}</td>"
            f"<td>{_fmt(_figure(r, 'dwer', baseline), '+.4f')}</td>"
            f"<td>{_fmt(r.get('latency_median_s'), '.3f')}</td>"
            f"<td>{_fmt(_figure(r, 'speedup', baseline), '.2f')}x</td>"
            + "".join(f"<td>{_fmt(r.get(f.name), f.fmt)}</td>" for f in more)
            + f"<td>{html.escape(str(r.get('device', '')))}</td>"
            f"<td><code>{html.escape(recipe_string(r.get('recipe')))}</code></td></tr>")
    table = ("<table><tr><th>trial</th><th>WER</th><th>dWER</th><th>latency s</th>"
             "<th>speedup</th>" + "".join(f"<th>{f.name}</th>" for f in more)
             + "<th>device</th><th>recipe</th></tr>" + "".join(trs) + "</table>")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:20px;color:#222}}
#tip{{position:absolute;display:none;white-space:pre;background:#fff;border:1px solid #888;
padding:6px 8px;font:12px monospace;box-shadow:2px 2px 6px rgba(0,0,0,.2);pointer-events:none}}
.pt{{cursor:pointer}} table{{border-collapse:collapse;margin-top:16px;font-size:13px}}
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}} code{{font-size:12px}}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{len(ok)} trials ran, {len(front)} on the Pareto front (red). Baseline: WER
{_fmt(baseline.get('wer'), '.4f')}, {_fmt(baseline.get('latency_median_s'), '.3f')} s per audio.
dWER is the relative WER change (0.05: 5 percent worse). Hover a point for its recipe; click it to
open its MLflow run.</p>
{''.join(svg)}
<div id="tip"></div>
<h3>Pareto front</h3>
{table}
<script>{_HTML_JS}</script>
</body></html>
"""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
