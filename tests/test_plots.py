"""Figures: axis labels with units, readable size ticks, panels and titles that do not overlap."""

from __future__ import annotations

import itertools
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from kd_utils import plots  # noqa: E402

TEACHER = "smollm2-135m-instruct:math-expert"
STUDENTS = {"smollm2-L20-0.10B": 0.0995, "smollm2-L10-0.06B": 0.0637131, "smollm2-L5-0.03B": 0.0319,
            "smollm2-L25-0.12B": 0.117, "smollm2-L15-0.08B": 0.0811}


def _improvements() -> pd.DataFrame:
    rows = []
    for s, (student, size) in enumerate(STUDENTS.items()):
        for m, method in enumerate(("fkl", "rkl", "gkd")):
            for t, task in enumerate(("gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua", "average")):
                rows.append({"domain": "math", "teacher": TEACHER, "student": student, "method": method, "task": task,
                             "improvement": (s - m + t) % 5 - 2.0, "student_size": size, "agreement": 40.0 + s + t,
                             "ci_low": -10.0, "ci_high": 8.0})
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _extents(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists if a.get_visible() and a.get_text()]


def test_size_axis_in_billions_with_readable_ticks():
    fig = plots.improvement_vs_size(_improvements())
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0.032 B", "0.064 B", "0.081 B", "0.1 B", "0.12 B"]
    assert ax.get_xlabel() == "student size (parameters, log scale)"
    assert ax.get_ylabel() == "improvement over SFT (percentage points)"


def test_task_difference_panels_and_titles_do_not_overlap():
    fig = plots.task_differences(_improvements(), "math")
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(STUDENTS)
    titles = _extents(fig, [ax.title for ax in axes])
    assert all("\n" in ax.get_title() for ax in axes)  # teacher and student on their own lines
    for a, b in itertools.combinations(titles, 2):
        assert not a.overlaps(b)
    panels = [ax.get_window_extent() for ax in axes]
    for a, b in itertools.combinations(panels, 2):
        assert not a.overlaps(b)
    for title, panel in itertools.product(titles, panels):
        assert not title.overlaps(panel)  # a title sits above its panel, clear of every panel
    suptitle = _extents(fig, [fig._suptitle])[0]
    assert not any(suptitle.overlaps(t) for t in titles)
    assert all(fig.bbox.contains(t.x0, t.y0) and fig.bbox.contains(t.x1, t.y1) for t in titles)


def test_scatter_and_ablation_labels_carry_units():
    fig = plots.scatter(_improvements(), "agreement", "improvement", "agreement_vs_improvement")
    assert fig.axes[0].get_xlabel() == "teacher-student answer agreement (% of examples)"
    assert fig.axes[0].get_ylabel() == "improvement over SFT (percentage points)"
    assert plots.axis_label("noise_sigma") == "teacher-logit noise sigma (logit units)"
    assert plots.axis_label("some_new_column") == "some new column"
    assert plots.size_labels([1.5, 14.0]) == ["1.5 B", "14 B"]
    # close sizes (layer-pruned students) get the digits that tell them apart
    assert plots.size_labels([0.12743, 0.13097, 0.1342]) == ["0.127 B", "0.131 B", "0.134 B"]


def _seed_pairs(improvements: pd.DataFrame) -> pd.DataFrame:
    """Two seeds per KD row, one above and one below the row's improvement (as main_pairs gives them)."""
    rows = improvements[["domain", "teacher", "student", "method", "task", "improvement"]]
    return pd.concat([rows.assign(seed=0, improvement=rows["improvement"] + 1),
                      rows.assign(seed=1, improvement=rows["improvement"] - 1)], ignore_index=True)


def test_average_differences_orders_students_by_size_and_shows_every_seed():
    improvements = _improvements()
    fig = plots.average_differences(improvements, _seed_pairs(improvements), "math")
    ax = fig.axes[0]
    fig.canvas.draw()
    by_size = sorted(STUDENTS, key=STUDENTS.get)
    assert [t.get_text() for t in ax.get_xticklabels()] == by_size
    # the slanted labels are parallel lines of text: apart when the ticks' distance across them exceeds a line
    ticks = ax.get_xticklabels()
    spacing = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
    line = ticks[0].get_fontsize() * fig.dpi / 72 * 1.2
    assert spacing * math.sin(math.radians(ticks[0].get_rotation())) > line
    hollow = [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)
              and len(c.get_facecolors()) == 0]
    points = [xy for c in hollow for xy in c.get_offsets()]
    assert len(points) == len(STUDENTS) * 3 * 2  # students x methods x seeds
    # a seed's point sits above or below its estimate at the same x, 1 point away
    average = improvements[improvements["task"] == "average"].set_index(["student", "method"])["improvement"]
    estimates = {(round(float(x), 6), float(y)) for line in ax.lines for x, y in line.get_xydata()}
    for x, y in points:
        assert (round(float(x), 6), float(y) - 1) in estimates or (round(float(x), 6), float(y) + 1) in estimates
    assert len(estimates) >= len(average)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[-1] == "one training seed" and len(labels) == 4
    assert ax.get_ylabel() == "improvement over SFT (percentage points)"


def test_average_differences_names_pairs_with_two_teachers():
    improvements = pd.concat([_improvements(), _improvements().assign(teacher="other-teacher")], ignore_index=True)
    fig = plots.average_differences(improvements, _seed_pairs(improvements), "math")
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(ticks) == 2 * len(STUDENTS) and all("\n-> " in t for t in ticks)
    with pytest.raises(ValueError, match="no rows to plot for commonsense average differences"):
        plots.average_differences(improvements, _seed_pairs(improvements), "commonsense")
