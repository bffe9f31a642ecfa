"""The notebooks are kept as text: each notebooks/<name>.ipynb is paired by jupytext with a percent-format
script notebooks/<name>.py holding the same cells. The .py is what one edits and reviews; the .ipynb is what
papermill executes (it needs the `parameters` tag) and what JupyterLab opens. Cells stay thin: computations
live in kd_utils.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb"))
FORMATS = "ipynb,py:percent"
# jupytext --sync alone takes each pair's more recently modified file as the source, which after a merge or a
# checkout need not be the edited one: these name the source.
SYNC = ("after editing a .py run: .venv/bin/jupytext --update --to ipynb notebooks/*.py ; after editing or "
        "merging a .ipynb run: .venv/bin/jupytext --to py:percent notebooks/*.ipynb && "
        ".venv/bin/jupytext --sync notebooks/*.ipynb")


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str, dict]]:
    """What a pair must agree on: each cell's type, source and metadata (tags, among them `parameters`)."""
    return [(cell.cell_type, cell.source, dict(cell.metadata)) for cell in notebook.cells]


def test_every_notebook_and_script_is_paired():
    scripts = sorted(path.stem for path in NOTEBOOKS.glob("*.py"))
    assert {"analysis", "distill", "evaluate", "finetune", "teacher_cache"} <= set(NAMES)
    assert scripts == NAMES, f"notebooks/ holds notebooks {NAMES} and scripts {scripts}: each .ipynb needs its " \
                             f".py pair and nothing else; to pair a new notebook: .venv/bin/jupytext " \
                             f"--set-formats {FORMATS} notebooks/NAME.ipynb"


@pytest.mark.parametrize("name", NAMES)
def test_pair_holds_the_same_cells(name):
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    in_script, in_notebook = cells(script), cells(notebook)
    first = next((i for i, (a, b) in enumerate(zip(in_script, in_notebook)) if a != b),
                 min(len(in_script), len(in_notebook)))
    assert in_script == in_notebook, (
        f"notebooks/{name}.py and {name}.ipynb are out of sync ({len(in_script)} and {len(in_notebook)} cells, "
        f"first difference at cell {first}); {SYNC}")
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{name}: papermill needs one `parameters` cell"


@pytest.mark.parametrize("name", NAMES)
def test_pairing_metadata(name):
    script = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # the .ipynb carries the pairing and nothing version-dependent, so no jupytext release rewrites it
    assert notebook.metadata.get("jupytext") == {"formats": FORMATS}, f"{name}.ipynb: {SYNC}"
    assert script.metadata["jupytext"]["formats"] == FORMATS, f"{name}.py: {SYNC}"
    assert script.metadata["kernelspec"] == notebook.metadata["kernelspec"], f"{name}: {SYNC}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_what_jupyter_writes(name):
    # JupyterLab saves with nbformat.write: a committed file in any other form shows up as a diff once saved
    path = NOTEBOOKS / f"{name}.ipynb"
    text = path.read_text(encoding="utf-8")
    notebook = nbformat.reads(text, as_version=nbformat.NO_CONVERT)
    written = io.StringIO()
    nbformat.write(notebook, written)
    assert written.getvalue() == text, f"{name}.ipynb is not in nbformat's own layout; {SYNC}"
    assert (notebook.nbformat, notebook.nbformat_minor) == (4, 5)  # cell ids
    ids = [cell.get("id") for cell in notebook.cells]
    assert all(ids) and len(set(ids)) == len(ids), f"{name}.ipynb: missing or repeated cell ids"
    # templates: papermill writes the outputs into the executed copy, never into these
    assert all(not cell.outputs and cell.execution_count is None for cell in notebook.cells
               if cell.cell_type == "code"), f"{name}.ipynb has outputs: clear them before committing"


def test_opening_and_saving_through_jupyter_changes_nothing(tmp_path):
    """JupyterLab's server side (jupyter_server with jupytext's pairing) reads a pair and writes back the same bytes.

    Out of scope: once a kernel starts, JupyterLab's front end replaces `language_info` with the kernel's
    (which names its Python version), as for any notebook committed from another machine.
    """
    from nbformat.sign import NotebookNotary

    for name in NAMES:
        for suffix in (".ipynb", ".py"):
            shutil.copy(NOTEBOOKS / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    manager = jupytext.TextFileContentsManager(root_dir=str(tmp_path))
    manager.notary = NotebookNotary(db_file=":memory:")  # no trust database in the user's home
    for name in NAMES:
        manager.save(manager.get(f"{name}.ipynb"), f"{name}.ipynb")
        for suffix in (".ipynb", ".py"):
            saved = (tmp_path / f"{name}{suffix}").read_bytes()
            assert saved == (NOTEBOOKS / f"{name}{suffix}").read_bytes(), f"saving {name}{suffix} changed it; {SYNC}"
