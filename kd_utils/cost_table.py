"""The cost table: measured tokens/s of each kind of work on one device kind, and how it is measured.

Calibration (``python -m kd_utils.costs calibrate``) measures tokens/s of three kinds of work on this machine's
device (``cpu`` or the CUDA device name) for layer subsets of the embedded model (so several model sizes) and a
few batch sizes: ``train`` (forward + backward of a LoRA model, non-pad tokens), ``forward`` (no-grad forward:
teacher targets, the teacher cache, validation, evaluation prompts) and ``generate`` (new tokens of greedy
decoding with the KV cache, all sequences of a batch counted), each in the precision ``auto`` gives on that device
(recorded with the table). It also times the fixed cost of one run as the local runner pays it: papermill
executing, in a kernel started ahead (whose imports overlap the run before), a notebook that imports the package
and loads the model, then the HTML export. The table is cached as JSON, one entry per device kind, at
``KD_COST_TABLE`` or ``outputs/cost_table.json``. Rates are interpolated linearly in log(parameters) and
log(batch) between measured points.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kd_utils.constants import PROJECT_ROOT
from kd_utils.io import write_atomic

KINDS = ("train", "forward", "generate")


def default_table_path() -> Path:
    return Path(os.environ.get("KD_COST_TABLE", PROJECT_ROOT / "outputs" / "cost_table.json"))


def device_kind() -> str:
    """'cpu' or the CUDA device's name: cost tables are per device kind."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ---- the cost table -----------------------------------------------------------------------

def _interpolate(points: list[tuple[float, float]], x: float, slope_out: float) -> float:
    """log-log linear interpolation of y(x) through ``points``; beyond them y scales as x**slope_out."""
    points = sorted(points)
    lx = math.log(x)
    logs = [(math.log(px), math.log(py)) for px, py in points]
    if lx <= logs[0][0]:
        return math.exp(logs[0][1] + slope_out * (lx - logs[0][0]))
    if lx >= logs[-1][0]:
        return math.exp(logs[-1][1] + slope_out * (lx - logs[-1][0]))
    for (x0, y0), (x1, y1) in zip(logs, logs[1:]):
        if x0 <= lx <= x1:
            return math.exp(y0 + (y1 - y0) * (lx - x0) / (x1 - x0))
    raise AssertionError("unreachable")


@dataclass
class CostTable:
    """Measured tokens/s per (kind, parameters, batch) on one device kind, and the fixed cost of one run."""

    device: str
    entries: list[dict]  # {"kind", "n_params", "batch", "tokens_per_s"}
    run_overhead_s: float
    derived: bool = False  # rates derived from other measurements, not calibrated on the device
    loadavg: tuple[float, float] | None = None  # 1-minute load average when calibration started and ended

    def rate(self, kind: str, n_params: int, batch: int) -> float:
        """tokens/s, interpolated in log size then log batch.

        Outside the measured sizes the rate scales as 1/parameters (compute-bound); below the smallest measured
        batch it scales with the batch (decoding is bound by reading the weights once per step), above the largest
        it stays flat (the device is saturated).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; expected one of {', '.join(KINDS)}")
        by_batch = defaultdict(list)
        for e in self.entries:
            if e["kind"] == kind:
                by_batch[e["batch"]].append((e["n_params"], e["tokens_per_s"]))
        if not by_batch:
            raise ValueError(f"the cost table for {self.device!r} has no {kind!r} measurements")
        at_batch = [(b, _interpolate(pts, n_params, -1.0)) for b, pts in by_batch.items()]
        largest = max(b for b, _ in at_batch)
        if batch >= largest:
            return dict(at_batch)[largest]
        return _interpolate(at_batch, batch, 1.0)

    def seconds(self, kind: str, n_params: int, batch: int, tokens: float) -> float:
        return tokens / self.rate(kind, n_params, batch) if tokens else 0.0


def table_device() -> str:
    """The device kind a dry-run prices: ``KD_COST_DEVICE`` (e.g. "NVIDIA H200", to price a GPU study from a
    CPU machine) or this machine's."""
    return os.environ.get("KD_COST_DEVICE") or device_kind()


def load_table(path: str | Path | None = None, device: str | None = None) -> CostTable | None:
    """The table of ``device`` (default :func:`table_device`) from the JSON at ``path``; None when there is none."""
    path = Path(path) if path is not None else default_table_path()
    if not path.is_file():
        return None
    try:
        tables = json.loads(path.read_text())["devices"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a cost table ({err}); "
                         "remake it with python -m kd_utils.costs calibrate") from None
    device = device or table_device()
    if device not in tables:
        return None
    t = tables[device]
    load = (t["loadavg_start"][0], t["loadavg_end"][0]) if "loadavg_start" in t and "loadavg_end" in t else None
    return CostTable(device, t["entries"], t["run_overhead_s"], bool(t.get("derived")), load)


def save_table(table: CostTable, path: str | Path | None = None, extra: dict | None = None) -> Path:
    """Add or replace this device kind's table in the JSON at ``path`` (other devices' tables are kept)."""
    path = Path(path) if path is not None else default_table_path()
    content = json.loads(path.read_text()) if path.is_file() else {"devices": {}}
    content["devices"][table.device] = {"entries": table.entries, "run_overhead_s": table.run_overhead_s,
                                        **(extra or {})}
    write_atomic(path, json.dumps(content, indent=1) + "\n")
    return path



@cache
def model_parameters(model: str, layers: int | None = None) -> int:
    """Parameters of a model (or of its first-``layers`` subset) from its config alone, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_utils.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in net.parameters())  # tied embeddings are one parameter


# ---- calibration ----------------------------------------------------------------------------

def _timed(fn, rounds: int) -> float:
    """Median seconds of ``fn`` over ``rounds`` runs after one warm-up (CUDA synchronised)."""
    import torch

    times = []
    for i in range(rounds + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(layers: list[int], train_batches: list[int], generate_batches: list[int], seq_len: int,
              new_tokens: int, rounds: int) -> tuple[CostTable, dict]:
    """Measure the table on this device for layer subsets of the embedded model."""
    import torch

    from kd_utils import models, precision
    from kd_utils.training import TrainConfig, wrap_lora

    device = models.default_device()
    dtype = models.default_dtype()
    resolved = precision.resolve("auto", device)  # what runs use by default on this device

    def autocast():
        return precision.autocast(resolved, device)
    base, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    total_layers = base.config.num_hidden_layers
    entries = []
    gen = torch.Generator().manual_seed(0)
    for keep in layers:
        n_params = model_parameters(models.EMBEDDED_MODEL, keep)
        net = models.make_student(base, keep) if keep < total_layers else base
        net = net.to(device=device, dtype=dtype).eval()
        for batch in train_batches:
            ids = torch.randint(0, len(tokenizer), (batch, seq_len), generator=gen).to(device)
            with torch.no_grad(), autocast():
                secs = _timed(lambda: net(input_ids=ids).logits, rounds)
            entries.append({"kind": "forward", "n_params": n_params, "batch": batch,
                            "tokens_per_s": ids.numel() / secs})
        lora = wrap_lora(models.make_student(base, keep).to(device), TrainConfig()).train()  # fp32 weights, as training
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
        for batch in train_batches:
            ids = torch.randint(0, len(tokenizer), (batch, seq_len), generator=gen).to(device)

            def step():
                with autocast():
                    loss = torch.nn.functional.cross_entropy(lora(input_ids=ids).logits.flatten(0, 1).float(),
                                                             ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
            secs = _timed(step, rounds)
            entries.append({"kind": "train", "n_params": n_params, "batch": batch, "tokens_per_s": ids.numel() / secs})
        lora = opt = None  # freed before the generation measurements
        for batch in generate_batches:
            ids = torch.randint(0, len(tokenizer), (batch, 64), generator=gen).to(device)
            kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                      "pad_token_id": tokenizer.pad_token_id, "use_cache": True}
            with torch.no_grad(), autocast():
                secs = _timed(lambda: net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs),
                              rounds)
            entries.append({"kind": "generate", "n_params": n_params, "batch": batch,
                            "tokens_per_s": batch * new_tokens / secs})
        print(f"  {keep} layers ({n_params / 1e6:.0f}M): " + ", ".join(
            f"{e['kind']}@{e['batch']} {e['tokens_per_s']:,.0f}/s" for e in entries if e["n_params"] == n_params),
            flush=True)
    overhead = run_overhead_seconds(rounds)
    return CostTable(device_kind(), entries, overhead), {"seq_len": seq_len, "new_tokens": new_tokens,
                                                        "rounds": rounds, "torch": torch.__version__,
                                                        "precision": resolved, "threads": torch.get_num_threads()}


def run_overhead_seconds(rounds: int = 1) -> float:
    """What every run of a study pays besides its tokens, as the local runner pays it: papermill executing, in a
    kernel started while the run before it executed, a notebook that imports training and loads the embedded
    model, then the executed notebook's HTML export. The kernel's start-up imports are not counted (they overlap
    the run before; the next run's kernel imports during this one, as in a study). Median seconds over ``rounds``
    runs."""
    import tempfile

    import nbformat
    import papermill as pm

    from kd_utils.executors import KERNEL_READY_TIMEOUT_S, notebook_kernels
    from kd_utils.report import notebook_to_html

    code = ("import pandas as pd\n"
            "from kd_utils import evaluation, models, plots, teacher_cache, training\n"
            "model, tokenizer = models.load_model(models.EMBEDDED_MODEL)\n"
            "model = model.to(models.default_device())\n"
            "pd.DataFrame({'step': [1, 2], 'loss': [2.0, 1.0]}).plot(x='step', y='loss');")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Fixed cost of a run"),
                                               nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    times = []
    kernels = notebook_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        source, executed = Path(tmp, "overhead.ipynb"), Path(tmp, "executed.ipynb")
        nbformat.write(notebook, str(source))
        try:
            for _ in range(rounds):
                kernel = kernels.take()
                try:
                    kernel.wait_ready(KERNEL_READY_TIMEOUT_S)
                    start = time.perf_counter()
                    pm.execute_notebook(str(source), str(executed), parameters={}, cwd=str(PROJECT_ROOT),
                                        progress_bar=False, kernel_name="python3", km=kernel)
                    notebook_to_html(executed, executed.with_suffix(".html"))
                    times.append(time.perf_counter() - start)
                finally:
                    kernel.close()
        finally:
            kernels.close()
    return statistics.median(times)
