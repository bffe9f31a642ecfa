"""Warm kernels for a study's runs: the next run's kernel starts, and imports what the notebooks import, while the
current run executes, so a run no longer waits for torch, transformers and the package to import.

Every run still gets a fresh kernel process of its own (papermill's model: nothing carries over between runs).
The imports run as the kernel's ``exec_lines`` (IPython's start-up lines: no execution count, no history) and
leave nothing in the notebook's namespace, so a notebook that forgets an import fails here as it would in
JupyterLab.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import nbformat
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

# kd_utils imports these inside the functions that load a model; a notebook that imports torch will load one
LAZY_WITH_TORCH = ("transformers", "peft")


def notebook_modules(notebooks: Iterable[str | Path]) -> tuple[str, ...]:
    """The modules the notebooks' code cells import (``from kd_utils import plots`` counts kd_utils.plots), in
    first-seen order. Only names that are modules: ``from IPython.display import Markdown`` gives IPython.display."""
    modules: dict[str, None] = {}
    for path in notebooks:
        nb = nbformat.read(str(path), as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:  # IPython magics: nothing to preload from this cell
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules.update(dict.fromkeys(alias.name for alias in node.names))
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules[node.module] = None
                    for alias in node.names:
                        name = f"{node.module}.{alias.name}"
                        if is_module(name):
                            modules[name] = None
    return tuple(modules)


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError, ValueError):  # the parent is a module, not a package
        return False


def preload_lines(modules: Iterable[str]) -> list[str]:
    """IPython start-up lines that import ``modules`` (and transformers / peft once torch is in) and leave no
    name behind. A module that fails to import is skipped: the notebook's own import then reports the error."""
    names = tuple(modules)
    each = "\n    try:\n        __import__(_kd_module)\n    except Exception:\n        pass"
    return [f"for _kd_module in {names!r}:{each}",
            f"for _kd_module in {LAZY_WITH_TORCH!r} if 'torch' in __import__('sys').modules else ():{each}",
            "_kd_module = None",  # defined whatever ran above, so the del below cannot fail
            "del _kd_module"]


class WarmKernel(AsyncKernelManager):
    """A kernel manager that remembers the clients made for it: nbclient leaves the clients of a kernel it did not
    start open, so :meth:`close` stops them along with the kernel."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clients: list = []

    def client(self, **kwargs):
        kc = super().client(**kwargs)
        self.clients.append(kc)
        return kc

    def wait_ready(self, timeout: float) -> None:
        """Block until the kernel answers, that is, until its start-up imports are done."""
        kc = self.client()
        kc.start_channels()
        run_sync(kc.wait_for_ready)(timeout=timeout)

    def close(self, now: bool = False) -> None:
        for kc in self.clients:
            kc.stop_channels()
        self.clients.clear()
        if self.has_kernel:
            run_sync(self.shutdown_kernel)(now=now)


class WarmKernels:
    """Kernels started ahead of the runs that take them: :meth:`take` hands out the spare kernel (or starts one)
    and starts the next spare at once, which imports ``modules`` while the taken one runs its notebook.

    Starting a kernel only launches its process; :meth:`close` shuts down the spares that no run took.
    """

    def __init__(self, modules: Iterable[str], cwd: str | Path, kernel_name: str = "python3", spares: int = 1,
                 env: dict[str, str] | None = None):
        self.lines = preload_lines(modules)
        self.cwd, self.kernel_name, self.spares = str(cwd), kernel_name, spares
        self.env = env  # added to this process's environment for every kernel (read when the kernel starts)
        self.ready: list[WarmKernel] = []
        self.lock = threading.Lock()
        self.closed = False

    def start(self) -> WarmKernel:
        km = WarmKernel(kernel_name=self.kernel_name)
        run_sync(km.start_kernel)(cwd=self.cwd, env={**os.environ, **(self.env or {})},
                                  extra_arguments=[f"--IPKernelApp.exec_lines={line}" for line in self.lines])
        return km

    def take(self) -> WarmKernel:
        with self.lock:
            if self.closed:
                raise RuntimeError("these warm kernels were closed")
            while self.ready:
                km = self.ready.pop(0)
                if run_sync(km.is_alive)():
                    break
                km.close(now=True)  # died while it waited: start another
            else:
                km = self.start()
            while len(self.ready) < self.spares:
                self.ready.append(self.start())
            return km

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for km in self.ready:
                km.close(now=True)
            self.ready.clear()
