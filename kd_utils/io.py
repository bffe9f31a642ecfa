"""Small file helpers every stage shares: atomic writes, JSON reading, params files for entry points.

Writes go to a temporary file beside the target, are flushed to disk (file, then directory),
and renamed into place, so a reader (or a rerun after a crash) sees the old file or the new
one, never half of one. New files get the permissions the umask gives any new file (0644
under the usual umask), not mkstemp's 0600, so collaborators on a shared cluster can read them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_path_beside(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new empty file in ``path``'s directory, with the umask's permissions (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return Path(tmp)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """Rename a fully written temporary file over ``path`` and flush the directory."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def sha256_file(path: str | Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to ``path`` via a temporary file in the same directory, fsynced, then renamed."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def standard_json(value: Any, **dumps_kwargs) -> str:
    """JSON that every reader parses: NaN and infinities written as null (json.dumps would write the
    non-standard ``NaN``, which jq, JavaScript and strict parsers reject)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **dumps_kwargs)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, truncated or unparsable file is a ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON (truncated or corrupt?): {err}") from None


def run_from_params_file(function: Callable[..., dict], argv: list[str] | None, prog: str) -> dict:
    """Call ``function(**params)`` with the arguments in a JSON / YAML file (the command-line
    entry points that ``accelerate launch`` starts on every process).

    PARAMS is a mapping of ``function``'s arguments, or a study run's ``params.json`` (its
    ``resolved`` parameters are used); ``--output-dir`` overrides the output directory.
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog=prog, description=(function.__doc__ or "").split("\n\n")[0])
    parser.add_argument("params", type=Path, help=f"JSON/YAML file of {function.__name__} arguments, "
                                                  "or a run's params.json")
    parser.add_argument("--output-dir", default=None, help="override the params' output_dir")
    args = parser.parse_args(argv)
    if not args.params.is_file():
        parser.error(f"params file {args.params} does not exist")
    params = yaml.safe_load(args.params.read_text())  # YAML is a superset of JSON
    if not isinstance(params, dict):
        parser.error(f"{args.params} must hold a mapping of {function.__name__} arguments")
    params = dict(params.get("resolved", params))
    if args.output_dir:
        params["output_dir"] = args.output_dir
    if "output_dir" not in params:
        parser.error(f"{args.params} has no output_dir (or pass --output-dir)")
    return function(**params)


def replace_dir(target: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Write a directory with ``fill(tmp)`` into ``.<name>.tmp`` beside ``target``, then swap it in.

    A reader sees the old directory or the new one, never half of one (between the two, briefly, none);
    an interrupted write's temporary directory is cleared by the next write.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
