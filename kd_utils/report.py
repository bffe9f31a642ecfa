"""Execute a parameterised notebook with papermill and render it to a self-contained HTML report."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kd_utils.io import temp_path_beside, write_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]


# JupyterLab's HTML template minus the CDN scripts (require.js, MathJax, Mermaid) the
# report does not use, so the page loads nothing from the network
_TEMPLATE = """{%- extends "index.html.j2" -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def notebook_to_html(notebook: str | Path, html_path: str | Path) -> Path:
    """Render an executed notebook to self-contained HTML: code cells hidden, images inline, no external scripts."""
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="kd_report.html.j2",
                            extra_loaders=[DictLoader({"kd_report.html.j2": _TEMPLATE})],
                            exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
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
