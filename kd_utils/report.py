"""The report a researcher reads: an executed notebook as self-contained HTML, and the CLI that renders it.

Rendering: :func:`render_report` runs a notebook with papermill and :func:`notebook_to_html` writes the
HTML (code hidden, images inline, no external scripts, the page title taken from the first heading, a
print stylesheet that keeps every column of a wide table). The blocks the analysis notebook shows live in
one module per job and are re-exported here (the notebook calls them as ``report.<name>``):
:mod:`kd_utils.report_blocks` (:func:`table`, :func:`fold`, :func:`improvement_summary`,
:func:`study_banner`, :func:`report_title`), :mod:`kd_utils.report_findings` (:func:`findings_block`, the
verdict table), :mod:`kd_utils.provenance` (:func:`provenance`, :func:`provenance_html`) and
:func:`~kd_utils.statistics.design.study_design` (the numbers behind the banner).
``python -m kd_utils.report paper`` renders the paper-mode report (``make paper``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kd_utils.constants import PROJECT_ROOT
from kd_utils.io import temp_path_beside, write_atomic
from kd_utils.provenance import (
    data_files,
    machine,
    model_identities,
    project_version,
    provenance,
    provenance_html,
    stage_times,
)
from kd_utils.report_blocks import SMALL_N, fold, improvement_summary, link, report_title, study_banner, table
from kd_utils.report_findings import VERDICT_COLUMNS, VERDICTS, findings_block
from kd_utils.statistics.design import study_design

__all__ = ["ANALYSIS_NOTEBOOK", "REPORT_CSS", "SMALL_N", "VERDICTS", "VERDICT_COLUMNS", "data_files",
           "findings_block", "first_heading", "fold", "improvement_summary", "link", "machine", "main",
           "model_identities", "notebook_to_html", "project_version", "provenance", "provenance_html",
           "render_paper_report", "render_report", "report_title", "stage_times", "study_banner", "study_design",
           "table"]

ANALYSIS_NOTEBOOK = PROJECT_ROOT / "notebooks" / "analysis.ipynb"

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
        pm.execute_notebook(str(notebook), tmp, parameters=dict(parameters), cwd=str(cwd or PROJECT_ROOT),
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
    through the data-directory lookup of :mod:`kd_utils.data_files`; writes ``<output_dir>/report.html`` and its
    CSVs."""
    from kd_utils.data_files import paper_results_dir

    output_dir = Path(output_dir).resolve()
    return render_report(ANALYSIS_NOTEBOOK, output_dir / "report.html",
                         {"results_source": "paper", "paper_results_dir": str(paper_results_dir(data_dir)),
                          "output_dir": str(output_dir)})


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
