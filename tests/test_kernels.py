"""Warm kernels: started ahead of their run, they import at start-up, leave the notebook's namespace clean, run it
as papermill would, and nothing of them outlives the run or the study."""

from __future__ import annotations

import threading

import nbformat
import papermill as pm
import pytest
from jupyter_core.utils import run_sync

from kd_utils import executors
from kd_utils.kernels import WarmKernels, notebook_modules, preload_lines
from kd_utils.plan import Run


def write_notebook(path, *sources: str, parameters: str = "x = 1") -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, str(path))
    return str(path)


def test_notebook_modules_lists_the_modules_its_cells_import(tmp_path):
    path = write_notebook(tmp_path / "n.ipynb", "import json\nimport pandas as pd",
                          "from kd_utils import io, constants\nfrom IPython.display import Markdown",
                          "%matplotlib inline", "def f():\n    import csv")
    assert notebook_modules([path]) == ("json", "pandas", "kd_utils", "kd_utils.io", "kd_utils.constants",
                                        "IPython.display", "csv")


def test_preload_lines_import_skip_what_fails_and_leave_no_name():
    import sys

    sys.modules.pop("colorsys", None)
    namespace: dict = {}
    for line in preload_lines(["json", "no_such_module_kd", "colorsys"]):
        exec(line, namespace)  # noqa: S102 - the lines IPython runs at start-up
    assert set(namespace) == {"__builtins__"}
    assert "colorsys" in sys.modules and "no_such_module_kd" not in sys.modules


def test_a_warm_kernel_runs_the_notebook_as_papermill_would(tmp_path):
    source = write_notebook(
        tmp_path / "in.ipynb",
        "import sys\nprint('colorsys' in sys.modules, '_kd_module' in dir(), x)",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2]);")
    kernels = WarmKernels(["no_such_module_kd", "colorsys"], tmp_path)
    kernel = kernels.take()
    assert len(kernels.ready) == 1  # the next run's kernel is already starting
    try:
        pm.execute_notebook(source, str(tmp_path / "out.ipynb"), parameters={"x": 5}, km=kernel,
                            kernel_name="python3", progress_bar=False, start_timeout=300)
    finally:
        kernel.close()
        kernels.close()
    out = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    code = [c for c in out.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3, 4]  # start-up lines take no execution count
    assert code[2].outputs[0]["text"] == "True False 5\n"  # preloaded; no helper name; parameter injected
    assert any("image/png" in o.get("data", {}) for o in code[3].outputs)  # the inline backend draws
    assert not run_sync(kernel.is_alive)() and not kernel.clients
    assert not [t for t in threading.enumerate() if type(t).__name__ == "HBChannel" and t.is_alive()]  # clients closed


def test_a_spare_that_died_is_replaced_and_close_ends_the_spares(tmp_path):
    kernels = WarmKernels([], tmp_path)
    first = kernels.take()
    spare = kernels.ready[0]
    run_sync(spare.shutdown_kernel)(now=True)  # dies while it waits for its run
    second = kernels.take()
    assert second is not spare and run_sync(second.is_alive)()
    third_spare = kernels.ready[0]
    for km in (first, second):
        km.close(now=True)
    kernels.close()
    assert not run_sync(third_spare.is_alive)() and not kernels.ready
    with pytest.raises(RuntimeError, match="closed"):
        kernels.take()


def test_a_kernel_that_cannot_start_fails_the_run_with_a_status(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "NOTEBOOKS", tmp_path)
    write_notebook(tmp_path / "n.ipynb", "print(x)")
    kernels = WarmKernels([], tmp_path, kernel_name="no-such-kernel")
    status = executors.execute_run(Run("eval", "n.ipynb", {"x": 1}, label="eval"), tmp_path / "study", kernels)
    assert status["state"] == "failed" and "no-such-kernel" in status["error"]
    kernels.close()


def test_the_local_executor_runs_each_run_in_a_warm_kernel_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "NOTEBOOKS", tmp_path)
    write_notebook(tmp_path / "n.ipynb", "import os\nprint(os.getpid(), os.environ['OMP_NUM_THREADS'])")
    executor = executors.LocalExecutor(parallel=1, threads_per_run=1)
    executor.kernels.lines = preload_lines(["json"])  # what the notebook above imports
    printed = []
    try:
        for i in range(2):
            run = Run("eval", "n.ipynb", {"x": i}, label=f"eval {i}")
            status = executor.result(executor.submit(run, tmp_path / "study", []))
            assert status["state"] == "done", status.get("traceback")
            assert status["kernel_env"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            out = nbformat.read(str(tmp_path / "study" / "runs" / run.id / "n.ipynb"), as_version=4)
            printed.append(out.cells[-1].outputs[0]["text"].split())
        spare = executor.kernels.ready[0]
    finally:
        executor.close()
    assert printed[0][0] != printed[1][0]  # a fresh kernel process per run
    assert printed[0][1] == printed[1][1] == "1"  # the threads it was given
    assert not run_sync(spare.is_alive)()  # the study's end shuts down the kernel no run took


@pytest.mark.parametrize(("configured", "env", "torch_threads", "parallel", "expected"), [
    (3, "2", 8, 2, 3),  # the params file's value first
    (None, "2", 8, 1, 2),  # then $OMP_NUM_THREADS
    (None, None, 8, 3, 2),  # else torch's default shared out among the parallel runs
    (None, None, 8, 1, None),  # one run at a time: torch's default, nothing set
    (None, "0", 2, 4, 1),  # never fewer than one; a zero or non-number in the environment is ignored
    (None, "many", 16, 2, 8),
])
def test_run_threads(monkeypatch, configured, env, torch_threads, parallel, expected):
    import torch

    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
    assert executors.run_threads(parallel, configured) == expected


def test_one_run_at_a_time_keeps_the_environment_as_it_is(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    executor = executors.LocalExecutor(parallel=1)
    try:
        assert executor.threads is None and executor.kernels.env is None
    finally:
        executor.close()
