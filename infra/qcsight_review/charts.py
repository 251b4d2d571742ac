"""Small server-side SVG line charts for the fleet dashboard (no charting library, nothing from a CDN).

Only presentation attributes (stroke, fill), never ``style=``: the app's CSP allows no inline styles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 560, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 120, 24, 28
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]  # (x: epoch seconds, y)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def line_chart(title: str, series: Sequence[Series], *, y_label: str = "", y_min: float | None = 0.0,
               marks: Mapping[float, str] | None = None) -> str:
    """An SVG chart of the series against time; ``marks`` are labelled vertical lines (model changes)."""
    points = [p for s in series for p in s.points]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{escape(title)}"><text x="{_LEFT}" y="16" font-size="13" font-weight="bold">'
            f'{escape(title)}</text>')
    if not points:
        empty = f'<text x="{_LEFT}" y="{HEIGHT // 2}" font-size="12" fill="#777">no data in this period</text>'
        return head + empty + "</svg>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0 = min(ys) if y_min is None else min(y_min, min(ys))
    y1 = max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return _TOP + plot_h - (y - y0) / (y1 - y0) * plot_h

    parts = [head,
             f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
             f'<text x="4" y="{_TOP + 10}" font-size="10">{_fmt(y1)}</text>',
             f'<text x="4" y="{_TOP + plot_h}" font-size="10">{_fmt(y0)}</text>',
             f'<text x="4" y="{HEIGHT - 4}" font-size="10" fill="#555">{escape(y_label)}</text>']
    for x, label in sorted((marks or {}).items()):
        if x0 <= x <= x1:
            parts.append(f'<line x1="{sx(x):.1f}" y1="{_TOP}" x2="{sx(x):.1f}" y2="{_TOP + plot_h}" '
                         f'stroke="#999" stroke-dasharray="3,3"/><text x="{sx(x) + 2:.1f}" y="{_TOP + 10}" '
                         f'font-size="9" fill="#555">{escape(label)}</text>')
    for index, item in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(item.points))
        if len(item.points) == 1:
            x, y = item.points[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>')
        else:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.append(f'<text x="{WIDTH - _RIGHT + 6}" y="{_TOP + 12 + 14 * index}" font-size="11" '
                     f'fill="{color}">{escape(item.name)}</text>')
    return "".join(parts) + "</svg>"
