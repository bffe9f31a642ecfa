"""Figures for the notebooks and the report; each is also saved as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def save_figure(fig: plt.Figure, output_dir: str | Path | None, name: str) -> None:
    if output_dir is None:
        return
    out = Path(output_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", bbox_inches="tight", dpi=150)


def accuracy_bars(metrics: pd.DataFrame, title: str = "", output_dir: str | Path | None = None) -> plt.Figure:
    """Accuracy per task with 95% Wilson intervals, coloured by domain."""
    df = metrics.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(df)), 3.5))
    palette = dict(zip(sorted(df["domain"].unique()), sns.color_palette("deep")))
    ax.bar(df["task"], df["accuracy"], color=[palette[d] for d in df["domain"]])
    ax.errorbar(df["task"], df["accuracy"], yerr=[df["accuracy"] - df["ci_low"], df["ci_high"] - df["accuracy"]],
                fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.tick_params(axis="x", rotation=45)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax.legend(handles, palette.keys(), frameon=False)
    sns.despine(fig)
    save_figure(fig, output_dir, "accuracy")
    return fig
