"""Small PNG charts for Dagster metadata (rendered inline in the asset page as markdown).
matplotlib is imported by the first chart, with the Agg backend (no display on servers): not at
import, which every process loading the Dagster definitions pays."""

from __future__ import annotations

import base64
import functools
import io


@functools.cache
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve_png(losses: list[tuple[int, float]], title: str,
                   validation: list[tuple[int, float]] | None = None) -> bytes:
    fig, ax = _pyplot().subplots(figsize=(6, 3.2), dpi=100)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, marker="o" if len(steps) < 60 else None, markersize=3, label="train")
    if validation:
        steps, values = zip(*validation)
        ax.plot(steps, values, marker="s", markersize=3, label="validation (held-out train rows)")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)" if validation else "train loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


def bar_chart_png(labels: list[str], values: list[float], title: str, ylabel: str) -> bytes:
    fig, ax = _pyplot().subplots(figsize=(max(4, 0.7 * len(labels) + 2), 3.2), dpi=100)
    ax.bar(labels, values, color="#4f6bed")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def calibration_png(bins: list[dict], title: str) -> bytes:
    """Reliability diagram: per confidence bin, how often the call was right against the mean
    predicted probability (the diagonal is perfect calibration); empty bins are left out."""
    fig, ax = _pyplot().subplots(figsize=(4.2, 3.6), dpi=100)
    shown = [b for b in bins if b["pairs"]]
    ax.plot([0.5, 1.0], [0.5, 1.0], linestyle="--", color="grey", label="perfect")
    if shown:
        ax.plot([b["predicted"] for b in shown], [b["observed"] for b in shown], marker="o", label="model")
        for b in shown:
            ax.annotate(str(b["pairs"]), (b["predicted"], b["observed"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("predicted P(chosen wins)")
    ax.set_ylabel("observed accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()
