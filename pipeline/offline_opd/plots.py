"""Self-contained SVG pictures of the stages' CSV curves, so `dvc plots show` renders offline.

Why not DVC's own Vega plots: its HTML loads Vega from a CDN and is blank without network. An SVG is
an image plot to DVC (embedded as a file, no script), and writing one needs no plotting library.
`render_folder` turns every `<name>.csv` of a stage's --plots folder into `<name>.svg`: a line chart
when the first column is numeric (a training curve; the columns named like `*loss*` or `*accuracy*`
are drawn), a horizontal bar chart when it is text (one bar per row, e.g. accuracy per model).
"""

from __future__ import annotations

import csv
import math
from html import escape
from pathlib import Path

from offline_opd.atomic import write_text

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _frame(title: str, xlabel: str, ylabel: str, body: list[str]) -> str:
    y_mid = TOP + (HEIGHT - TOP - BOTTOM) / 2
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2}" y="{HEIGHT - 10}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="16" y="{y_mid}" text-anchor="middle" transform="rotate(-90 16 {y_mid})">{escape(ylabel)}</text>',
        *body, "</svg>\n"])


def line_chart(title: str, xlabel: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """Lines of (x, y) points on shared axes; an empty chart says so instead of drawing nothing."""
    points = [p for pts in series.values() for p in pts]
    ylabel = ", ".join(series)
    if not points:
        return _frame(title, xlabel, ylabel, [
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no rows: this run trained nothing</text>'])
    xt = _ticks(min(x for x, _ in points), max(x for x, _ in points))
    yt = _ticks(min(y for _, y in points), max(y for _, y in points))
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - xt[0]) / (xt[-1] - xt[0]) * w

    def sy(y: float) -> float:
        return TOP + h - (y - yt[0]) / (yt[-1] - yt[0]) * h

    body = [f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#888"/>']
    body += [f'<text x="{sx(t):.1f}" y="{TOP + h + 16}" text-anchor="middle">{t:g}</text>' for t in xt]
    body += [f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>' for t in yt]
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        body.append(f'<text x="{LEFT + w - 4}" y="{TOP + 14 + 14 * i}" text-anchor="end" fill="{colour}">'
                    f'{escape(name)}</text>')
    return _frame(title, xlabel, ylabel, body)


def bar_chart(title: str, label: str, bars: list[tuple[str, float]], errors: list[float] | None = None) -> str:
    """One horizontal bar per (name, value) from a zero line (negative values go left), the value printed
    past its end; `errors` (e.g. a standard deviation per bar) draws a ± whisker and prints "value ± error"."""
    errs = errors or [0.0] * len(bars)
    lo = min([0.0] + [v - e for (_, v), e in zip(bars, errs)])
    hi = max([1e-12] + [v + e for (_, v), e in zip(bars, errs)])
    w, h = WIDTH - LEFT - RIGHT - 90, HEIGHT - TOP - BOTTOM
    step = h / max(len(bars), 1)

    def x(value: float) -> float:
        return LEFT + 40 + (value - lo) / (hi - lo) * w

    body = []
    for i, ((name, value), err) in enumerate(zip(bars, errs)):
        y = TOP + i * step + step * 0.15
        body.append(f'<rect x="{min(x(0), x(value)):.1f}" y="{y:.1f}" width="{abs(x(value) - x(0)):.1f}" '
                    f'height="{step * 0.7:.1f}" fill="{COLOURS[0]}"/>')
        body.append(f'<text x="{LEFT + 34}" y="{y + step * 0.4:.1f}" text-anchor="end">{escape(name)}</text>')
        text, end = f"{value:.4g}", max(x(0), x(value))
        if errors:
            mid = y + step * 0.35
            body.append(f'<line x1="{x(value - err):.1f}" y1="{mid:.1f}" x2="{x(value + err):.1f}" y2="{mid:.1f}" '
                        f'stroke="black"/>')
            text, end = f"{value:.3f} ± {err:.3f}", max(end, x(value + err))
        body.append(f'<text x="{end + 4:.1f}" y="{y + step * 0.4:.1f}">{text}</text>')
    return _frame(title, label, "", body)


def render_csv(path: Path, title: str) -> str:
    """The SVG for one CSV whose first column is x (numeric: line chart) or a name (text: bar chart)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], [r for r in rows[1:] if r]
    if data and _number(data[0][0]) is None:
        return bar_chart(title, header[1], [(r[0], _number(r[1]) or 0.0) for r in data])
    wanted = [i for i, name in enumerate(header[1:], 1) if "loss" in name or "accuracy" in name] \
        or list(range(1, len(header)))
    series = {header[i]: [(x, y) for r in data if (x := _number(r[0])) is not None
                          and (y := _number(r[i])) is not None] for i in wanted}
    return line_chart(title, header[0], series)


def render_folder(folder: Path, stage: str) -> list[Path]:
    """Write `<name>.svg` next to each `<name>.csv` in `folder`; returns the SVG paths."""
    written = []
    for path in sorted(folder.glob("*.csv")):
        svg = path.with_suffix(".svg")
        write_text(svg, render_csv(path, f"{stage}: {path.stem.replace('_', ' ')}"))
        written.append(svg)
    return written


def merge_curves(curves: dict[str, Path]) -> str:
    """Several `step,value` CSVs as one, columns step,<name>... (blank where a curve has no such step): the
    `teacher` stage's loss.csv under multi-teacher OPD, one curve per domain teacher."""
    values = {}
    for name, path in curves.items():
        rows = path.read_text().splitlines()[1:]
        values[name] = dict(line.split(",", 1) for line in rows if line)
    steps = sorted({int(s) for v in values.values() for s in v})
    lines = ["step," + ",".join(values)] + [f"{s}," + ",".join(v.get(str(s), "") for v in values.values())
                                            for s in steps]
    return "\n".join(lines) + "\n"
