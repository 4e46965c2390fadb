"""Charts drawn on the server as inline SVG: no script, no request to any other site. Colours
come from CSS classes (chatproxy/admin.css), so they follow the admin's light and dark themes;
each chart has a title for screen readers, and the page sets a text table beside it."""

from __future__ import annotations

from collections.abc import Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

WIDTH, HEIGHT, PAD, LABEL = 640, 220, 28, 150


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.4g}"


def _at(coordinate: float) -> str:
    return f"{coordinate:.1f}"


def columns(title: str, points: Sequence[tuple[str, float]], *, alt: bool = False) -> SafeString:
    """A column per point (a day, in order), with the largest value marked on the axis."""
    top = max((v for _, v in points), default=0) or 1
    step = (WIDTH - PAD * 2) / max(len(points), 1)
    bars = format_html_join(
        "",
        '<rect class="{}" x="{}" y="{}" width="{}" height="{}"><title>{}: {}</title></rect>',
        (
            (
                "bar-alt" if alt else "bar",
                _at(PAD + i * step + step * 0.1),
                _at(HEIGHT - PAD - (value / top) * (HEIGHT - PAD * 2)),
                _at(step * 0.8),
                _at((value / top) * (HEIGHT - PAD * 2)),
                label,
                _number(value),
            )
            for i, (label, value) in enumerate(points)
        ),
    )
    ends = ""
    if points:
        ends = format_html(
            '<text x="{}" y="{}">{}</text><text x="{}" y="{}" text-anchor="end">{}</text>',
            PAD,
            HEIGHT - 8,
            points[0][0],
            WIDTH - PAD,
            HEIGHT - 8,
            points[-1][0],
        )
    return _svg(
        title,
        format_html(
            '<line class="axis" x1="{p}" y1="{b}" x2="{r}" y2="{b}"/>'
            '<text x="{p}" y="{t}">{top}</text>{bars}{ends}',
            p=PAD,
            b=HEIGHT - PAD,
            r=WIDTH - PAD,
            t=PAD - 8,
            top=_number(top),
            bars=bars,
            ends=ends,
        ),
        HEIGHT,
    )


def rows(title: str, points: Sequence[tuple[str, float]]) -> SafeString:
    """A horizontal bar per point (a model, an error code, a user), largest first."""
    top = max((v for _, v in points), default=0) or 1
    line = 22
    height = max(len(points), 1) * line + PAD
    width = WIDTH - LABEL - PAD - 60
    bars = format_html_join(
        "",
        '<text x="{}" y="{}" text-anchor="end">{}</text>'
        '<rect class="bar" x="{}" y="{}" width="{}" height="14"><title>{}: {}</title></rect>'
        '<text x="{}" y="{}">{}</text>',
        (
            (
                LABEL - 6,
                _at(PAD / 2 + i * line + 11),
                label[:24],
                LABEL,
                _at(PAD / 2 + i * line),
                _at(max(value / top * width, 1)),
                label,
                _number(value),
                _at(LABEL + max(value / top * width, 1) + 4),
                _at(PAD / 2 + i * line + 11),
                _number(value),
            )
            for i, (label, value) in enumerate(points)
        ),
    )
    return _svg(title, bars, height)


def _svg(title: str, body: SafeString, height: int) -> SafeString:
    return format_html(
        '<svg viewBox="0 0 {w} {h}" role="img" aria-label="{t}" xmlns="http://www.w3.org/2000/svg">'
        "<title>{t}</title>{body}</svg>",
        w=WIDTH,
        h=height,
        t=title,
        body=body,
    )
