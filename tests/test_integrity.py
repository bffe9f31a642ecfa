"""A finished run is reused only while its outputs are the ones it wrote: a truncated predictions file, a deleted
adapter file or an edited results file is found by ``study verify`` and redone by a rerun, which says which file.

The mini study runs through the real runner (plan, execute_run, statuses, results.csv, analysis) with papermill
replaced by a fake that writes each notebook's output files, deterministically from the run's id."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import papermill
import pytest

from kd_utils import report, study
from kd_utils.params import load_study
from kd_utils.predictions import PREDICTION_KEYS


def fake_execute_notebook(input_path, output_path, parameters, **_kwargs) -> None:
    """What each notebook leaves in its run directory, its bytes a function of the run (its id)."""
    out = Path(parameters["output_dir"])
    seed = hashlib.sha256(out.name.encode()).digest()  # the run id: a redo writes the same bytes
    name = Path(input_path).name
    if name in ("finetune.ipynb", "distill.ipynb"):
        (out / "adapter").mkdir(parents=True, exist_ok=True)
        (out / "adapter" / "adapter_model.safetensors").write_bytes(seed * 64)
        (out / "adapter" / "adapter_config.json").write_text('{"r": 4}')
        (out / "checkpoints" / "epoch-1").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / "epoch-1" / "optimizer.bin").write_bytes(seed)  # resume state: not recorded
        (out / "train_summary.json").write_text('{"epochs": 1}')
    elif name == "evaluate.ipynb":
        (out / "predictions").mkdir(parents=True, exist_ok=True)
        rows = []
        for task in parameters["tasks"]:
            records = [{"id": i, "task": task, "prompt": f"q{i}", "output": f"The answer is {seed[i] % 3}.",
                        "prediction": str(seed[i] % 3), "answer": "1", "correct": seed[i] % 3 == 1} for i in range(4)]
            assert set(PREDICTION_KEYS) <= set(records[0])
            (out / "predictions" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            correct = sum(r["correct"] for r in records)
            rows.append({"task": task, "domain": "math", "n": 4, "correct": correct, "accuracy": 25.0 * correct,
                         "ci_low": 0.0, "ci_high": 100.0})
        pd.DataFrame(rows).to_csv(out / "metrics.csv", index=False)
    elif name == "analysis.ipynb":
        pd.DataFrame({"hypothesis": ["H1"], "pvalue": [0.5]}).to_csv(out / "verdicts.csv", index=False)
    Path(output_path).write_text("{}")


def fake_notebook_to_html(notebook, html) -> None:
    Path(html).write_text(f"<html>{Path(notebook).name}</html>")


@pytest.fixture
def fake_notebooks(monkeypatch):
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute_notebook)
    monkeypatch.setattr(report, "notebook_to_html", fake_notebook_to_html)


@pytest.fixture(scope="module")
def pristine(mini_params, tmp_path_factory) -> Path:
    """The mini study, finished by the runner with the fake notebooks: its output root (copied by each test)."""
    root = tmp_path_factory.mktemp("integrity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(papermill, "execute_notebook", fake_execute_notebook)
        mp.setattr(report, "notebook_to_html", fake_notebook_to_html)
        assert study.run_study(mini_params, output_root=root) == 0
    return root


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "root")
    return tmp_path / "root"


def by_stage(params: Path, root: Path, stage: str, role: str | None = None) -> Path:
    runs = [r for r in study.plan(load_study(params)) if r.stage == stage and (role is None or r.meta["role"] == role)]
    assert len(runs) == 1
    return root / "mini" / "runs" / runs[0].id


def started(root: Path) -> dict[str, float]:
    return {p.parent.name: json.loads(p.read_text())["started"] for p in (root / "mini" / "runs").glob("*/status.json")}


def verify(params: Path, root: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = study.main(["verify", str(params), "--output-root", str(root)])
    return code, capsys.readouterr().out


def test_finished_runs_record_their_outputs(copy, mini_params):
    student = by_stage(mini_params, copy, "student")
    outputs = json.loads((student / "status.json").read_text())["outputs"]
    assert {"adapter/adapter_model.safetensors", "train_summary.json", "params.json", "distill.ipynb",
            "distill.html"} <= set(outputs)
    assert not [k for k in outputs if k.startswith(("checkpoints/", ".")) or k == "status.json"]
    adapter = student / "adapter" / "adapter_model.safetensors"
    assert outputs["adapter/adapter_model.safetensors"] == {
        "size": adapter.stat().st_size, "sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()}


def test_an_untouched_study_verifies_clean_and_a_rerun_redoes_nothing(copy, mini_params, fake_notebooks, capsys):
    code, out = verify(mini_params, copy, capsys)
    assert code == 0, out
    assert "4 of 4 runs finished, 4 of them verified" in out and "problem" not in out
    before = started(copy)
    assert study.run_study(mini_params, output_root=copy) == 0
    assert "[redo]" not in capsys.readouterr().out
    assert started(copy) == before


def truncate_predictions(params: Path, root: Path) -> tuple[Path, str]:
    path = by_stage(params, root, "eval", "student") / "predictions" / "gsm8k.jsonl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, "predictions/gsm8k.jsonl changed (size"


def delete_adapter(params: Path, root: Path) -> tuple[Path, str]:
    path = by_stage(params, root, "student") / "adapter" / "adapter_model.safetensors"
    path.unlink()
    return path, "adapter/adapter_model.safetensors missing"


def edit_metrics(params: Path, root: Path) -> tuple[Path, str]:
    """The same size, one number changed: only the hash tells."""
    path = by_stage(params, root, "eval", "teacher") / "metrics.csv"
    text = path.read_text()
    path.write_text(text.replace(",4,", ",3,", 1))
    assert path.read_text() != text and len(path.read_text()) == len(text)
    return path, "metrics.csv changed (sha256"


@pytest.mark.parametrize("damage, redone_stages", [
    (truncate_predictions, {"eval"}),
    (delete_adapter, {"student", "eval"}),  # the student is retrained, and its evaluation made again from it
    (edit_metrics, {"eval"}),
], ids=["truncated-predictions", "deleted-adapter", "edited-metrics"])
def test_damaged_output_is_found_by_verify_and_redone_by_a_rerun(copy, mini_params, fake_notebooks, capsys, damage,
                                                                 redone_stages):
    original = {p: p.read_bytes() for p in (copy / "mini" / "runs").rglob("*") if p.is_file()}
    path, message = damage(mini_params, copy)
    damaged_run = path.relative_to(copy / "mini" / "runs").parts[0]
    code, out = verify(mini_params, copy, capsys)
    assert code == 1 and message in out and damaged_run in out, out
    assert "results.csv: differs" in out  # it holds what the damaged evaluation gave

    before = started(copy)
    if damaged_run.startswith("eval"):  # what the analysis reads: checked again right before it is read
        with pytest.raises(study.OutputsChanged, match=damaged_run):
            study.collect_results(load_study(mini_params), study.plan(load_study(mini_params)),
                                  {rid: study.read_status(copy / "mini" / "runs" / rid) for rid in before},
                                  copy / "mini")

    assert study.run_study(mini_params, output_root=copy) == 0
    out = capsys.readouterr().out
    redo_lines = [line for line in out.splitlines() if line.startswith("[redo]")]
    assert any(damaged_run in line and message in line for line in redo_lines), out
    after = started(copy)
    redone = {rid for rid in before if after[rid] != before[rid]}
    assert {rid.split("-")[0] for rid in redone} == redone_stages and damaged_run in redone
    assert len(redo_lines) == len(redone)
    assert path.read_bytes() == original[path]  # the fake is deterministic: the redo wrote the same file
    assert verify(mini_params, copy, capsys)[0] == 0


def test_an_edited_results_csv_and_report_are_found_and_rewritten(copy, mini_params, fake_notebooks, capsys):
    results, html = copy / "mini" / "results.csv", copy / "mini" / "report.html"
    original, original_html = results.read_text(), html.read_text()
    edited = pd.read_csv(results)
    edited.loc[0, "correct"] += 1
    edited.to_csv(results, index=False)
    assert results.read_text() != original
    code, out = verify(mini_params, copy, capsys)
    assert code == 1 and "results.csv: differs" in out, out
    results.write_text(original)
    html.write_text(original_html.replace("html", "HTML"))
    code, out = verify(mini_params, copy, capsys)
    assert code == 1 and "report.html: differs" in out and "results.csv" not in out, out
    results.write_bytes(original.replace("\n", "\r\n").encode())  # the same table in other bytes: found too
    assert "results.csv: differs" in verify(mini_params, copy, capsys)[1]
    before = started(copy)
    assert study.run_study(mini_params, output_root=copy) == 0
    assert started(copy) == before  # no run redone: the table and the report rewritten
    assert results.read_text() == original and html.read_text() == original_html
    assert verify(mini_params, copy, capsys)[0] == 0


def test_runs_finished_before_outputs_were_recorded_are_trusted_and_reported_once(copy, mini_params, fake_notebooks,
                                                                                   capsys):
    statuses = list((copy / "mini" / "runs").glob("*/status.json"))
    for path in statuses:  # as the runner wrote them before it recorded outputs
        status = json.loads(path.read_text())
        status.pop("outputs"), status.pop("hash_seconds")
        path.write_text(json.dumps(status, indent=1))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in statuses}
    code, out = verify(mini_params, copy, capsys)
    assert code == 0, out
    planned = len(study.plan(load_study(mini_params)))
    assert f"{planned} finished runs not verifiable: finished before output hashes were recorded" in out
    assert study.run_study(mini_params, output_root=copy) == 0
    out = capsys.readouterr().out
    assert out.count("not verifiable") == 1 and "[redo]" not in out
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in statuses} == before
