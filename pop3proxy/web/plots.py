"""Server-side SVG charts: no script, no external resource, so the page works offline."""

from __future__ import annotations

from xml.sax.saxutils import escape

WIDTH, HEIGHT, PAD = 640, 220, 40


def bar_chart(title: str, labels: list[str], series: list[tuple[str, str, list[float]]]) -> str:
    """Bars per label; several series are drawn side by side. ``series``: (name, colour, values)."""
    peak = max([v for _, _, values in series for v in values] + [1])
    slot = (WIDTH - 2 * PAD) / max(1, len(labels))
    bar = max(1.0, slot * 0.8 / max(1, len(series)))
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="10">'
        ),
        f"<title>{escape(title)}</title>",
        f'<text x="{PAD}" y="16" font-size="13">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#666"/>',
        f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end">{escape(_short(peak))}</text>',
        f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end">0</text>',
    ]
    for s, (name, colour, values) in enumerate(series):
        parts.append(
            f'<rect x="{WIDTH - PAD - 90}" y="{8 + 12 * s}" width="8" height="8" fill="{colour}"/>'
            f'<text x="{WIDTH - PAD - 78}" y="{16 + 12 * s}">{escape(name)}</text>'
        )
        for i, value in enumerate(values):
            h = (HEIGHT - 2 * PAD) * value / peak
            x = PAD + i * slot + slot * 0.1 + s * bar
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(labels[i])}: {escape(_short(value))} {escape(name)}</title></rect>'
            )
    step = max(1, len(labels) // 8)
    for i in range(0, len(labels), step):
        x = PAD + i * slot + slot / 2
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle">{escape(labels[i])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _short(value: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(value) < 1000:
            return f"{value:g}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}T"


def charts(data: dict) -> dict[str, str]:
    """The console's three charts from `data.plot_data`."""
    return {
        "daily": bar_chart(
            "Messages received and spam tagged per day (last 30 days)",
            data["days"],
            [("received", "#3b7dd8", data["received"]), ("spam", "#d8573b", data["spam"])],
        ),
        "scores": bar_chart(
            "Spam score distribution",
            [str(b) for b in data["scores"]["buckets"]],
            [("messages", "#7a5bd8", data["scores"]["counts"])],
        ),
        "cache": bar_chart(
            "Cache size by day (octets)", data["days"], [("cached", "#3ba86b", data["cache_octets"])]
        ),
    }
