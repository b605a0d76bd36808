"""Plotly figures: training curves and codebook usage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def curves_figure(records: Sequence[dict], panels: dict[str, Sequence[str]], title: str) -> go.Figure:
    """One panel per entry of ``panels`` (panel title -> record keys), epoch on the x axis."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(panels))
    for col, keys in enumerate(panels.values(), start=1):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=key), row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(title=title, height=420, template="plotly_white")
    return fig


def write_curves(records: Sequence[dict], panels: dict[str, Sequence[str]], title: str, path: Path) -> None:
    """Write the curves as a self-contained HTML file (plotly.js inlined: viewable offline)."""
    curves_figure(records, panels, title).write_html(str(path), include_plotlyjs=True)


# Colours readable on Gradio's light and dark themes alike: transparent backgrounds, mid-grey
# text and grid, a bar colour with contrast on white and on near-black.
NEUTRAL_TEXT = "#8a8f98"
NEUTRAL_GRID = "rgba(138, 143, 152, 0.3)"
BAR_COLOUR = "#f97316"


def theme_neutral(fig: go.Figure) -> go.Figure:
    """Let a figure sit on either theme's background."""
    fig.update_layout(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)", font_color=NEUTRAL_TEXT)
    fig.update_xaxes(gridcolor=NEUTRAL_GRID, zerolinecolor=NEUTRAL_GRID, linecolor=NEUTRAL_GRID)
    fig.update_yaxes(gridcolor=NEUTRAL_GRID, zerolinecolor=NEUTRAL_GRID, linecolor=NEUTRAL_GRID)
    return fig


def codebook_usage_figure(counts: Sequence[int], title: str = "Codebook usage") -> go.Figure:
    """Sorted usage histogram of the codes (most used first), with the code id on hover."""
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    fig = go.Figure(
        go.Bar(
            x=list(range(len(order))),
            y=[counts[i] for i in order],
            customdata=order,
            hovertemplate="code %{customdata}<br>count %{y}<extra></extra>",
            marker_color=BAR_COLOUR,
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="codes, sorted by usage",
        yaxis_title="occurrences",
        yaxis_type="log",
        template="plotly_white",
        height=380,
    )
    return theme_neutral(fig)
