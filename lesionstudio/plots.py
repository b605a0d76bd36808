"""Charts and renderings: training curves, codebook usage, code maps and error heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
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


def palette(num_codes: int) -> np.ndarray:
    """A fixed, well-spread colour per code (golden-ratio hues), uint8 [K, 3]."""
    hues = (np.arange(num_codes) * 0.618033988749895) % 1.0
    sat = 0.55 + 0.45 * ((np.arange(num_codes) * 7) % 3) / 2
    val = 0.65 + 0.35 * ((np.arange(num_codes) * 5) % 2)
    rgb = np.array(Image.fromarray((np.stack([hues, sat, val], 1)[None] * 255).astype(np.uint8), "HSV").convert("RGB"))
    return rgb[0]


def code_map_image(codes: torch.Tensor, num_codes: int, size: int = 256) -> Image.Image:
    """Codes [h, w] as colours, scaled up without smoothing."""
    rgb = palette(num_codes)[codes.cpu().numpy()]
    return Image.fromarray(rgb.astype(np.uint8)).resize((size, size), Image.NEAREST)


def error_heatmap(recon: torch.Tensor, target: torch.Tensor, vmax: float = 0.25) -> Image.Image:
    """Mean absolute error per pixel, black (0) -> red -> yellow -> white (>= vmax)."""
    err = (recon - target).abs().mean(0).clamp(0, vmax).cpu().numpy() / vmax
    stops = np.array([[0, 0, 0], [170, 20, 20], [250, 200, 40], [255, 255, 255]], dtype=np.float32)
    pos = err * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    return Image.fromarray(rgb.astype(np.uint8))


def downstream_figure(result: dict, title: str = "Benign/malignant AUC on held-out real images") -> go.Figure:
    """AUC against the training-set size N (log axis), one line per kind of training set, each
    point with its 95% interval, from ``lesionstudio.downstream``'s JSON. "All" real images sit
    at their count."""
    all_real = sum(result["images"]["train"].values())
    lines: dict[str, list[dict]] = {}
    for arm in result["arms"]:
        if arm["kind"] == "augmented":
            key = f"N real + {arm['synthetic'] // arm['real']}N synthetic"
        else:
            key = {"TRTR": "N real (TRTR)", "TSTR": "N synthetic (TSTR)"}[arm["kind"]]
        n = arm["synthetic"] if arm["kind"] == "TSTR" else (arm["real"] or all_real)
        lines.setdefault(key, []).append({"n": n, **arm["auc"]})
    fig = go.Figure()
    for i, (key, points) in enumerate(lines.items()):
        points.sort(key=lambda p: p["n"])
        dodge = 1.03 ** (i - (len(lines) - 1) / 2)  # lines side by side, so that no interval hides another
        fig.add_trace(
            go.Scatter(
                x=[p["n"] * dodge for p in points],
                customdata=[p["n"] for p in points],
                hovertemplate="N = %{customdata}: AUC %{y:.3f}",
                y=[p["estimate"] for p in points],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [p["high"] - p["estimate"] for p in points],
                    "arrayminus": [p["estimate"] - p["low"] for p in points],
                },
                mode="lines+markers",
                name=key,
            )
        )
    fig.update_xaxes(type="log", title_text="N, training images of the arm's kind (class-balanced)")
    fig.update_yaxes(title_text="AUC (mean over training seeds, 95% interval)")
    fig.update_layout(title=title, height=460, width=760, template="plotly_white")
    return fig
