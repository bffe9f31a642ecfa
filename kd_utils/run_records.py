"""What a run directory records about itself: its ``status.json``, and the size and sha256 of every file the
run produced, so that a finished run is reused only while its outputs are the ones it wrote.

``status.json`` holds the run's state (pending, queued, running, done, failed, skipped), its label, times,
Slurm job id or error, and, once done, ``outputs``: ``{path relative to the run directory: {"size", "sha256"}}``.
A run's outputs are every file under its directory when it finished except ``status.json`` itself, hidden files
(the partial notebook, the temporary files of atomic writes) and ``checkpoints/``: training's resume state,
which nothing reads once the run has finished (deleting it to save space damages no result).
Runs finished before outputs were recorded have no ``outputs``: they cannot be verified, and are trusted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kd_utils.io import sha256_file, write_atomic

STATUS_FILE = "status.json"
NOT_RECORDED = "checkpoints"  # a top-level directory of resume state, not an output
UNVERIFIABLE = "not verifiable: finished before output hashes were recorded"


def read_status(run_dir: Path) -> dict:
    """The run's status; ``{"state": "pending"}`` for a run that has none (or a torn one)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"state": "pending"}


def write_status(run_dir: Path, **status) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / STATUS_FILE, json.dumps(status, indent=1))


def output_files(run_dir: Path) -> list[str]:
    """The run's outputs on disk now, as sorted paths relative to ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    out = []
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir)
        if (path.is_file() and rel.parts[0] not in (STATUS_FILE, NOT_RECORDED)
                and not any(part.startswith(".") for part in rel.parts)):
            out.append(rel.as_posix())
    return sorted(out)


def record_outputs(run_dir: Path) -> dict[str, dict]:
    """``{path: {"size", "sha256"}}`` of every output of a finished run, for its status."""
    run_dir = Path(run_dir)
    return {rel: {"size": (run_dir / rel).stat().st_size, "sha256": sha256_file(run_dir / rel)}
            for rel in output_files(run_dir)}


def output_problems(run_dir: Path, status: dict) -> list[str] | None:
    """What no longer matches a finished run's recorded outputs, e.g. ``"predictions/gsm8k.jsonl changed (sha256
    1f0e..., recorded 9a3c...)"``; [] when every output verifies; None when the run recorded none (see
    :data:`UNVERIFIABLE`). Sizes are compared first, so a truncated file costs no hashing."""
    recorded = status.get("outputs")
    if recorded is None:
        return None
    run_dir = Path(run_dir)
    problems = []
    for rel, want in sorted(recorded.items()):
        path = run_dir / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{rel} changed (size {size:,} bytes, recorded {want['size']:,})")
        elif (digest := sha256_file(path)) != want["sha256"]:
            problems.append(f"{rel} changed (sha256 {digest[:12]}..., recorded {want['sha256'][:12]}...)")
    return problems


def clear_run_dir(run_dir: Path) -> None:
    """Remove a run's directory before it is redone because its outputs changed: the redo starts from nothing
    it cannot verify (not from its checkpoints)."""
    shutil.rmtree(run_dir, ignore_errors=True)
