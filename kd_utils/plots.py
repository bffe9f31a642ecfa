"""Seaborn figures of the analysis; every figure is saved as PNG and PDF.

Each function takes the tidy tables of :mod:`kd_utils.statistics` /
:mod:`kd_utils.fidelity`, returns the matplotlib Figure and, given ``output_dir``,
saves ``<output_dir>/<name>.png`` and ``.pdf``. Methods are labelled with the
paper's names next to our ids.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from kd_utils.statistics import method_label

_IMPROVEMENT = "improvement over SFT (percentage points)"
# axis labels, with units, of the columns the figures plot
AXIS_LABELS = {
    "improvement": _IMPROVEMENT,
    "student_size": "student size (parameters, log scale)",
    "agreement": "teacher-student answer agreement (% of examples)",
    "agreement_teacher_correct": "agreement where the teacher is right (% of examples)",
    "bleu": "rationale BLEU vs teacher (0-100)",
    "embedding_similarity": "rationale embedding similarity (cosine)",
    "teacher_accuracy": "teacher accuracy (%)",
    "sft_accuracy": "student SFT accuracy (%)",
    "accuracy": "accuracy (%)",
    "temperature": "distillation temperature tau",
    "noise_sigma": "teacher-logit noise sigma (logit units)",
    "expertise": "teacher",
}


def axis_label(column: str) -> str:
    return AXIS_LABELS.get(column, column.replace("_", " "))


def size_labels(billions: Sequence[float]) -> list[str]:
    """Parameter counts in billions as tick labels, with two significant digits or as many more as it takes
    to tell them apart: [0.0637, 1.5] -> ['0.064 B', '1.5 B']; [0.1274, 0.1310] -> ['0.127 B', '0.131 B']."""
    for digits in range(2, 10):
        labels = [f"{b:.{digits}g} B" for b in billions]
        if len(set(labels)) == len(set(billions)):
            return labels
    return [f"{b} B" for b in billions]


def pair_title(teacher: str, student: str, width: int = 40) -> str:
    """A teacher -> student panel title on two lines, long names wrapped, so neighbouring titles do not collide."""
    return "\n".join(textwrap.wrap(teacher, width) + textwrap.wrap(f"-> {student}", width))


def save_figure(fig: plt.Figure, output_dir: str | Path | None, name: str) -> list[Path]:
    """Save a figure as <name>.png (150 dpi) and <name>.pdf; returns the paths (none without output_dir)."""
    if output_dir is None:
        return []
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"{name}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _summary_task(table: pd.DataFrame, value_columns: list[str], keys: list[str]) -> pd.DataFrame:
    """The ``average`` task rows if the table has them, else the mean over tasks per ``keys``."""
    if (table["task"] == "average").any():
        return table[table["task"] == "average"]
    return table.groupby(keys, dropna=False)[value_columns].mean().reset_index()


def _labelled(table: pd.DataFrame, what: str) -> pd.DataFrame:
    """Method ids with the paper's names; an empty table is an error naming the figure."""
    if table.empty:
        raise ValueError(f"no rows to plot for {what}")
    return table.assign(method=table["method"].map(method_label))


def improvement_vs_size(improvements: pd.DataFrame, output_dir: str | Path | None = None) -> plt.Figure:
    """Average improvement against student size (log scale), one line per method, a panel per domain."""
    data = _summary_task(improvements, ["improvement", "student_size"],
                         ["domain", "teacher", "student", "method"]).dropna(subset=["student_size"])
    data = _labelled(data, "improvement vs student size (no student sizes known)")
    grid = sns.relplot(data=data, x="student_size", y="improvement", hue="method", col="domain",
                       kind="line", marker="o", errorbar=None, height=3.5, aspect=1.2)
    grid.map_dataframe(sns.scatterplot, x="student_size", y="improvement", hue="method", alpha=0.4, legend=False)
    sizes = sorted(data["student_size"].unique())
    grid.set(xscale="log", xticks=sizes, xticklabels=size_labels(sizes))
    for ax in grid.axes.flat:
        ax.minorticks_off()
    grid.set_axis_labels(axis_label("student_size"), _IMPROVEMENT)
    grid.refline(y=0, color="grey", linestyle=":")
    grid.figure.suptitle("KD improvement vs student size (lines: mean over teachers)", y=1.03)
    save_figure(grid.figure, output_dir, "improvement_vs_size")
    return grid.figure


def task_differences(improvements: pd.DataFrame, domain: str, output_dir: str | Path | None = None) -> plt.Figure:
    """Per-task KD - SFT difference of each teacher -> student pair (a panel each) and method, with the
    bootstrap intervals (``ci_low``/``ci_high``) where the table has them."""
    table = improvements[(improvements["domain"] == domain) & (improvements["task"] != "average")]
    table = _labelled(table.assign(pair=[pair_title(t, s) for t, s in zip(table["teacher"], table["student"])]),
                      f"{domain} task differences")
    tasks = list(dict.fromkeys(table["task"]))
    methods = list(dict.fromkeys(table["method"]))
    pairs = list(dict.fromkeys(table["pair"]))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    has_ci = {"ci_low", "ci_high"} <= set(table.columns) and table["ci_low"].notna().any()
    # plain subplots, not a FacetGrid: its repeated tight_layout passes cost seconds with a dozen panels
    ncols = min(4, len(pairs))
    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.4 * nrows), squeeze=False, layout="constrained")
    for ax, pair in zip(axes.flat, pairs):
        for i, method in enumerate(methods):
            rows = table[(table["pair"] == pair) & (table["method"] == method)]
            x = np.array([tasks.index(t) for t in rows["task"]]) + (i - (len(methods) - 1) / 2) * 0.2
            err = (np.vstack([rows["improvement"] - rows["ci_low"], rows["ci_high"] - rows["improvement"]])
                   if has_ci else None)
            ax.errorbar(x, rows["improvement"], yerr=err, fmt="o", color=palette[method], label=method,
                        capsize=2, markersize=4)
        ax.axhline(0, color="grey", linestyle=":")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_title(pair, fontsize=9)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(_IMPROVEMENT)
    sns.despine(fig)
    # constrained layout keeps panels, their titles, the legend and the suptitle apart
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right center", frameon=False)
    note = " with bootstrap 95% intervals" if has_ci else ""
    fig.suptitle(f"{domain}: per-task KD - SFT accuracy{note}")
    save_figure(fig, output_dir, f"task_differences_{domain}")
    return fig


def average_differences(improvements: pd.DataFrame, pairs: pd.DataFrame, domain: str,
                        output_dir: str | Path | None = None) -> plt.Figure:
    """KD - SFT averaged over the tasks, per teacher -> student pair (students by size) and method: the
    estimate with its bootstrap 95% interval over test examples (filled), and each training seed's own
    difference (hollow: the run-to-run spread the interval does not cover).

    ``pairs``: the per-run improvements (:func:`kd_utils.statistics.main_pairs`); a seed's point is the
    mean over its temperatures, as the estimate is.
    """
    table = _labelled(improvements[(improvements["domain"] == domain) & (improvements["task"] == "average")],
                      f"{domain} average differences (no average-task rows)")
    seeds = pairs[(pairs["domain"] == domain) & (pairs["task"] == "average")]
    seeds = (seeds.groupby(["teacher", "student", "method", "seed"], as_index=False)["improvement"].mean()
             .assign(method=lambda d: d["method"].map(method_label)))
    order = list(dict.fromkeys(table.sort_values(["student_size", "student", "teacher"], kind="stable")[
        ["teacher", "student"]].itertuples(index=False, name=None)))
    position = {pair: i for i, pair in enumerate(order)}
    one_teacher = len({teacher for teacher, _ in order}) == 1
    methods = list(dict.fromkeys(table["method"]))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    has_ci = {"ci_low", "ci_high"} <= set(table.columns) and table["ci_low"].notna().any()
    known = np.array([pair in position for pair in zip(seeds["teacher"], seeds["student"])], dtype=bool)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(order) + 2.0), 3.8), layout="constrained")
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * 0.2
        rows = table[table["method"] == method]
        x = np.array([position[pair] for pair in zip(rows["teacher"], rows["student"])]) + offset
        err = (np.vstack([rows["improvement"] - rows["ci_low"], rows["ci_high"] - rows["improvement"]])
               if has_ci else None)
        ax.errorbar(x, rows["improvement"], yerr=err, fmt="o", color=palette[method], label=method, capsize=2,
                    markersize=5)
        dots = seeds[(seeds["method"] == method).to_numpy() & known]
        ax.scatter([position[pair] + offset for pair in zip(dots["teacher"], dots["student"])], dots["improvement"],
                   facecolors="none", edgecolors=[palette[method]], s=22, linewidths=0.9)
    seed_marker = ax.scatter([], [], facecolors="none", edgecolors="grey", s=22)
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xticks(range(len(order)), [student if one_teacher else pair_title(teacher, student)
                                      for teacher, student in order], rotation=30, ha="right")
    ax.set_ylabel(_IMPROVEMENT)
    sns.despine(fig)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend([*handles, seed_marker], [*labels, "one training seed"], loc="outside right center", frameon=False)
    note = "\nwith bootstrap 95% intervals over test examples" if has_ci else ""
    teacher = f" from {order[0][0]}" if one_teacher and order else ""
    fig.suptitle(f"{domain}: KD - SFT averaged over tasks{teacher}{note}", fontsize=10)
    save_figure(fig, output_dir, f"average_differences_{domain}")
    return fig


def ablation_curve(table: pd.DataFrame, factor: str, output_dir: str | Path | None = None) -> plt.Figure:
    """Average improvement as the ablation factor varies (see statistics.ablation_table), a line per
    teacher -> student pair and method (and temperature, for the other factors), a panel per domain."""
    keys = ["domain", "teacher", "student", "method", "temperature", "noise_sigma", "expertise"]
    data = _labelled(_summary_task(table, ["improvement", "accuracy"], keys), f"{factor} ablation")
    label = data["teacher"] + " -> " + data["student"] + ", " + data["method"]
    if factor != "temperature" and data["temperature"].nunique() > 1:
        label += ", tau=" + data["temperature"].map("{:g}".format)
    data = data.assign(run=label)
    if factor == "expertise":
        grid = sns.catplot(data=data, x="expertise", y="improvement", hue="run", col="domain", kind="point",
                           errorbar=None, height=3.5, aspect=1.2)
    else:
        grid = sns.relplot(data=data, x=factor, y="improvement", hue="run", col="domain",
                           kind="line", marker="o", errorbar=None, height=3.5, aspect=1.2)
    grid.refline(y=0, color="grey", linestyle=":")
    grid.set_axis_labels(axis_label(factor), _IMPROVEMENT)
    grid.figure.suptitle(f"{factor} ablation (average over tasks)", y=1.03)
    save_figure(grid.figure, output_dir, f"ablation_{factor}")
    return grid.figure


def scatter(table: pd.DataFrame, x: str, y: str, name: str, output_dir: str | Path | None = None) -> plt.Figure:
    """Scatter of two columns coloured by method, a panel per domain (e.g. agreement against improvement)."""
    data = _labelled(table.dropna(subset=[x, y]), f"{y} vs {x}")
    grid = sns.relplot(data=data, x=x, y=y, hue="method", col="domain", height=3.5, aspect=1.2)
    grid.set_axis_labels(axis_label(x), axis_label(y))
    grid.figure.suptitle(f"{axis_label(y)} vs {axis_label(x)}", y=1.03)
    save_figure(grid.figure, output_dir, name)
    return grid.figure


def _figures(output_dir: str | Path | None) -> Path | None:
    """A stage's figures go to <output_dir>/figures."""
    return None if output_dir is None else Path(output_dir) / "figures"


def accuracy_bars(metrics: pd.DataFrame, title: str = "", output_dir: str | Path | None = None) -> plt.Figure:
    """Accuracy per task with 95% Wilson intervals, coloured by domain."""
    df = metrics.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(df)), 3.5), layout="constrained")
    palette = dict(zip(sorted(df["domain"].unique()), sns.color_palette("deep")))
    ax.bar(df["task"], df["accuracy"], color=[palette[d] for d in df["domain"]])
    ax.errorbar(df["task"], df["accuracy"], yerr=[df["accuracy"] - df["ci_low"], df["ci_high"] - df["accuracy"]],
                fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set(ylabel=axis_label("accuracy"), ylim=(0, 100), title=title)
    ax.tick_params(axis="x", rotation=45)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax.legend(handles, palette.keys(), frameon=False)
    sns.despine(fig)
    save_figure(fig, _figures(output_dir), "accuracy")
    return fig


def loss_curves(history: list[dict], title: str = "", output_dir: str | Path | None = None) -> plt.Figure:
    """Training losses per epoch and validation loss (epoch 0 = before training)."""
    df = pd.DataFrame(history)
    long = df.melt(id_vars="epoch", value_vars=[c for c in ("train_loss", "ce_loss", "kd_loss", "val_loss")
                                                if c in df and df[c].notna().any()], var_name="loss")
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    sns.lineplot(long.dropna(), x="epoch", y="value", hue="loss", marker="o", ax=ax)
    ax.set(ylabel="loss", title=title)
    sns.despine(fig)
    save_figure(fig, _figures(output_dir), "losses")
    return fig
