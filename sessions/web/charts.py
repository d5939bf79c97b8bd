"""Geometry for the usage page's server-rendered SVG charts; the templates only draw what is computed here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

WIDTH = 960  # about the card's width on a laptop: labels render near their nominal 11-12 px
ROW = 28  # height of one row in horizontal charts
LABEL_WIDTH = 190
VALUE_ROOM = 110  # right of the longest bar, for its total


@dataclass
class Segment:
    x: float
    width: float
    color: str
    title: str


@dataclass
class Row:
    label: str
    y: float
    height: float
    total: str
    end: float  # x where the bar ends; the total is written after it
    segments: list[Segment] = field(default_factory=list)

    @property
    def text_y(self) -> float:
        return self.y + self.height / 2 + 4


@dataclass
class Column:
    label: str
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass
class Chart:
    width: int
    height: int
    rows: list[Row] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)
    top: str = ""
    empty: bool = True
    label_width: int = LABEL_WIDTH


def column_chart(
    points: Sequence[tuple[str, float]], fmt: Callable[[float], str], height: int = 190, label_every: int = 1
) -> Chart:
    """Vertical bars over time (one per day), a label under every ``label_every``-th one."""
    top = max((v for _, v in points), default=0)
    plot = height - 22
    step = WIDTH / max(len(points), 1)
    chart = Chart(WIDTH, height, top=fmt(top), empty=not top)
    for i, (label, value) in enumerate(points):
        h = (value / top) * (plot - 8) if top else 0
        x = i * step
        chart.columns.append(
            Column(label, x + step * 0.12, plot - h, step * 0.76, h, f"{label}: {fmt(value)}")
        )
        if i % label_every == 0:
            chart.ticks.append((x + step / 2, label))
    return chart


def bar_chart(
    rows: Sequence[tuple[str, Sequence[float]]],
    fmt: Callable[[float], str],
    colors: Sequence[str] = ("c1",),
    names: Sequence[str] = ("",),
) -> Chart:
    """Horizontal bars, optionally stacked: ``rows`` are (label, [part, ...]) with one colour per part."""
    top = max((sum(parts) for _, parts in rows), default=0)
    room = WIDTH - LABEL_WIDTH - VALUE_ROOM
    chart = Chart(WIDTH, max(len(rows), 1) * ROW + 4, top=fmt(top), empty=not top)
    for i, (label, parts) in enumerate(rows):
        row = Row(label, i * ROW + 4, ROW - 8, fmt(sum(parts)), LABEL_WIDTH)
        for part, color, name in zip(parts, colors, names, strict=False):
            width = (part / top) * room if top else 0
            title = f"{label}: {fmt(part)}" + (f" {name}" if name else "")
            row.segments.append(Segment(row.end, width, color, title))
            row.end += width
        chart.rows.append(row)
    return chart
