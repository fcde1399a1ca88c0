"""`gigatron report RUN_DIR`: one self-contained HTML page on a run (no network, no CDN).

Plots are inline SVG drawn here: loss, throughput (tokens/s), MFU (TFLOP/s per device where MFU
is null, on CPU), peak memory, a heat map of per-rank step times (each cell the rank's compute
time over that step's median: stragglers show as hot cells), and the pipeline timeline when one
was recorded (one row per pipeline rank, forward and backward actions as bars). The status screen
sits on top. A few lines of inline script count the plots and report them on the console, so a
headless browser can confirm the page rendered.
"""

from __future__ import annotations

import html
import math
import os
from statistics import median

from gigatron.cluster.monitor import run_dir as rd
from gigatron.cluster.monitor.status import build_status, format_status, series
from gigatron.cluster.monitor.stragglers import per_rank_times

WIDTH, HEIGHT, PAD = 560, 220, 56


def _ticks(low: float, high: float, n: int = 4) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / n for i in range(n + 1)]


def _label(value: float, spacing: float = 0.0) -> str:
    """A tick label with enough digits to tell ticks `spacing` apart."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6 or magnitude < 1e-2:
        digits = 2 if not spacing else max(2, min(6, int(math.ceil(math.log10(magnitude / spacing))) + 1))
        mantissa, exponent = f"{value:.{digits}e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    decimals = 0 if magnitude >= 100 else 2
    if spacing:
        decimals = max(0, min(8, int(math.ceil(-math.log10(spacing))) + 1)) if spacing < 1 else 0
    return f"{value:,.{decimals}f}"


def line_plot(title: str, points: list[tuple[float, float]], unit: str = "", color: str = "#1f77b4") -> str:
    """An SVG line chart of (step, value) points, or a note when there are none."""
    head = f'<figure><figcaption>{html.escape(title)}</figcaption>'
    if not points:
        return head + f'<p class="empty">{html.escape(title)}: not logged by this run</p></figure>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.05 or 1), y1 + (abs(y1) * 0.05 or 1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    sx = lambda x: PAD + (x - x0) / (x1 - x0) * (WIDTH - 1.5 * PAD)  # noqa: E731
    sy = lambda y: HEIGHT - PAD + (y0 - y) / (y1 - y0) * (HEIGHT - 1.6 * PAD)  # noqa: E731
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts = [f'<svg class="plot" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>']
    for y in _ticks(y0, y1):
        parts.append(f'<line x1="{PAD}" x2="{WIDTH - PAD / 2}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                     f'<text x="{PAD - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">'
                     f'{_label(y, (y1 - y0) / 4)}</text>')
    for x in _ticks(x0, x1):
        parts.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle" class="tick">'
                     f'{_label(round(x))}</text>')
    parts.append(f'<line x1="{PAD}" x2="{PAD}" y1="{PAD * 0.5}" y2="{HEIGHT - PAD}" stroke="#888"/>'
                 f'<line x1="{PAD}" x2="{WIDTH - PAD / 2}" y1="{HEIGHT - PAD}" y2="{HEIGHT - PAD}" stroke="#888"/>')
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}"/>')
    if len(points) <= 400:
        for x, y in points:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="1.8" fill="{color}">'
                         f'<title>step {x:g}: {y:.6g} {html.escape(unit)}</title></circle>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle" class="axis">step</text></svg>')
    return head + "".join(parts) + "</figure>"


def _heat_color(ratio: float) -> str:
    """1.0 (the median) white, slower red, faster blue; saturated at +-30%."""
    x = max(-1.0, min(1.0, (ratio - 1) / 0.3))
    if x >= 0:
        return f"rgb(255,{int(255 * (1 - x))},{int(255 * (1 - x))})"
    return f"rgb({int(255 * (1 + x))},{int(255 * (1 + x))},255)"


def heat_map(records: list[dict], stragglers: set[int] | None = None, max_columns: int = 120) -> str:
    head = "<figure><figcaption>Per-rank step time (compute seconds / the step's median)</figcaption>"
    rows = [(int(r["step"]), per_rank_times(r)[0]) for r in records if per_rank_times(r) is not None]
    if not rows:
        return head + '<p class="empty">per-rank step times: not logged by this run</p></figure>'
    rows = rows[-max_columns:]
    ranks = max(len(t) for _, t in rows)
    cell_w = max(3, min(24, (WIDTH * 1.6 - 2 * PAD) // len(rows)))
    cell_h = max(3, min(18, 480 // ranks))
    width, height = PAD + cell_w * len(rows) + 10, PAD + cell_h * ranks + 30
    parts = [f'<svg class="plot heatmap" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>']
    for col, (step, times) in enumerate(rows):
        finite = [t for t in times if isinstance(t, (int, float)) and math.isfinite(t)]
        middle = median(finite) if finite else 0
        for rank, t in enumerate(times):
            if not isinstance(t, (int, float)) or not math.isfinite(t) or middle <= 0:
                continue
            ratio = t / middle
            parts.append(f'<rect x="{PAD + col * cell_w}" y="{20 + rank * cell_h}" width="{cell_w}" '
                         f'height="{cell_h}" fill="{_heat_color(ratio)}"><title>step {step}, rank {rank}: '
                         f'{t:.4g} s ({ratio:.2f}x median)</title></rect>')
    label_every = max(1, ranks // 16)
    for rank in range(0, ranks, label_every):
        parts.append(f'<text x="{PAD - 4}" y="{20 + rank * cell_h + cell_h * 0.8}" text-anchor="end" class="tick">'
                     f'{rank}</text>')
    parts.append(f'<text x="{PAD}" y="{height - 8}" class="tick">steps {rows[0][0]}-{rows[-1][0]}; '
                 f'rows: ranks; white = median, red = slower (+30% saturates), blue = faster</text></svg>')
    flagged = f"<p>Flagged as stragglers in this run: {', '.join(map(str, sorted(stragglers)))}</p>" \
        if stragglers else ""
    return head + "".join(parts) + flagged + "</figure>"


def pipeline_plot(timeline: dict | None) -> str:
    head = "<figure><figcaption>Pipeline timeline (recorded step)</figcaption>"
    per_rank = (timeline or {}).get("events")
    if not isinstance(per_rank, list) or not per_rank:
        return head + '<p class="empty">pipeline timeline: not recorded (parallel.pp_timeline_step)</p></figure>'
    spans = [(r, e) for r, events in enumerate(per_rank) if isinstance(events, list) for e in events
             if isinstance(e, dict) and isinstance(e.get("start"), (int, float)) and isinstance(e.get("end"), (int, float))]
    if not spans:
        return head + '<p class="empty">pipeline timeline: no timed actions</p></figure>'
    t0 = min(e["start"] for _, e in spans)
    t1 = max(e["end"] for _, e in spans) or t0 + 1
    width, row = WIDTH * 1.6, 22
    height = 30 + row * len(per_rank) + 30
    scale = (width - PAD - 10) / max(t1 - t0, 1e-9)
    colors = {"F": "#4c9be8", "B": "#f28e2b", "W": "#59a14f", "I": "#e15759"}
    parts = [f'<svg class="plot timeline" width="{width:.0f}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<rect width="{width:.0f}" height="{height}" fill="#fff"/>']
    for r, e in spans:
        x = PAD + (e["start"] - t0) * scale
        w = max(0.8, (e["end"] - e["start"]) * scale)
        kind = str(e.get("kind", "?"))
        parts.append(f'<rect x="{x:.1f}" y="{24 + r * row}" width="{w:.1f}" height="{row - 4}" '
                     f'fill="{colors.get(kind[:1], "#999")}"><title>rank {r} {html.escape(kind)} stage '
                     f'{e.get("stage")} micro-batch {e.get("mb")}: {e["end"] - e["start"]:.4g} s</title></rect>')
    for r in range(len(per_rank)):
        parts.append(f'<text x="{PAD - 4}" y="{24 + r * row + row * 0.65}" text-anchor="end" class="tick">{r}</text>')
    stats = (timeline or {}).get("stats") or {}
    bubble = stats.get("bubble_wall")
    note = f"bubble {bubble:.1%} (wall)" if isinstance(bubble, (int, float)) else ""
    parts.append(f'<text x="{PAD}" y="{height - 8}" class="tick">{t1 - t0:.3g} s; blue forward, orange backward; '
                 f'{note}</text></svg>')
    return head + "".join(parts) + "</figure>"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
pre{background:#fff;border:1px solid #ddd;padding:12px;overflow-x:auto;font-size:12px}
figure{display:inline-block;margin:8px;vertical-align:top;background:#fff;border:1px solid #ddd;padding:6px}
figcaption{font-weight:600;margin-bottom:4px}.tick{font-size:10px;fill:#555}.axis{font-size:11px;fill:#333}
.empty{color:#888;width:520px;height:60px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px}"""

SCRIPT = """(function(){var n=document.querySelectorAll('svg.plot').length;
document.getElementById('plot-count').textContent=n+' plots';
console.log('gigatron-report: '+n+' plots rendered');})();"""


def build_report(run_dir: str, gpu: str = "h100-sxm", threshold: float | None = None) -> str:
    status = build_status(run_dir, gpu=gpu, threshold=threshold)
    records = rd.metrics(run_dir).records
    mfu = series(records, "mfu")
    efficiency = line_plot("MFU (%)", [(s, 100 * v) for s, v in mfu], "%", "#2ca02c") if mfu else \
        line_plot("TFLOP/s per device (MFU n/a: not a GPU run)", series(records, "tflops_per_device"), "TFLOP/s",
                  "#2ca02c")
    flagged = set(status["stragglers"]["history"])
    events = rd.events(run_dir)
    event_rows = "".join(f"<tr><td>{html.escape(str(e.get('time')))}</td><td>{html.escape(str(e.get('kind')))}</td>"
                         f"<td>{html.escape(str(e.get('attempt')))}</td><td>{html.escape(str(e.get('detail'))[:200])}"
                         f"</td></tr>" for e in events[-50:])
    events_html = (f"<h2>Restarts and requeues</h2><table><tr><th>time</th><th>kind</th><th>attempt</th>"
                   f"<th>detail</th></tr>{event_rows}</table>") if events else ""
    title = f"gigatron report: {os.path.basename(os.path.abspath(run_dir))}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        f'<p id="plot-count"></p><pre>{html.escape(format_status(status))}</pre>',
        line_plot("Loss", series(records, "loss"), "", "#1f77b4"),
        line_plot("Throughput (tokens/s)", series(records, "tokens_per_s"), "tokens/s", "#ff7f0e"),
        efficiency,
        line_plot("Peak memory (GB)", series(records, "peak_memory_gb"), "GB", "#9467bd"),
        line_plot("Step time (s)", series(records, "step_time_s"), "s", "#8c564b"),
        heat_map(records, flagged),
        pipeline_plot(rd.pipeline_timeline(run_dir)),
        events_html,
        f"<script>{SCRIPT}</script>", "</body></html>"])


def write_report(run_dir: str, out: str | None = None, **kwargs) -> str:
    """Write the page (default RUN_DIR/report.html) and return its path."""
    out = out or os.path.join(run_dir, "report.html")
    page = build_report(run_dir, **kwargs)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    return out
