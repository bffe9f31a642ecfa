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


def loss_curves(history: list[dict], title: str = "", output_dir: str | Path | None = None) -> plt.Figure:
    """Training losses per epoch and validation loss (epoch 0 = before training)."""
    df = pd.DataFrame(history)
    long = df.melt(id_vars="epoch", value_vars=[c for c in ("train_loss", "ce_loss", "kd_loss", "val_loss")
                                                if c in df and df[c].notna().any()], var_name="loss")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.lineplot(long.dropna(), x="epoch", y="value", hue="loss", marker="o", ax=ax)
    ax.set(ylabel="loss", title=title)
    sns.despine(fig)
    save_figure(fig, output_dir, "losses")
    return fig
