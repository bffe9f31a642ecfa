"""The run dataclasses are the one source of the run parameters' defaults and checks.

The study defaults (params), the notebooks' parameters cells and the training entry points all read
them; a cell or a study default that disagrees fails here. Validating a study loads no model code.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kd_utils import config, params
from kd_utils.config import EvaluationConfig, TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
#: each notebook that runs one kind of run, and that run's dataclass
NOTEBOOK_CONFIGS = {"distill.ipynb": TrainingConfig, "finetune.ipynb": TrainingConfig,
                    "evaluate.ipynb": EvaluationConfig}
#: where a notebook's job sets a default of its own: distillation opens with a KD method, not sft
NOTEBOOK_OWN = {("distill.ipynb", "method"): "fkl"}


def parameters_cell(notebook: str) -> dict[str, object]:
    """The literal values the notebook's ``parameters`` cell assigns, read with ast (nothing is executed)."""
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    values = {}
    for node in ast.parse("".join(cell["source"])).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_CONFIGS))
def test_notebook_parameters_cells_hold_the_dataclass_defaults(notebook):
    cls = NOTEBOOK_CONFIGS[notebook]
    cell = parameters_cell(notebook)
    shared = [name for name in config.defaults(cls) if name in cell]
    assert len(shared) >= 10, shared  # the cell sets the run's settings, not a few of them
    expected = {name: NOTEBOOK_OWN.get((notebook, name), default) for name, default in config.defaults(cls).items()}
    differing = {name: (cell[name], expected[name]) for name in shared if cell[name] != expected[name]}
    assert differing == {}, f"{notebook}: parameters cell vs {cls.__name__} (cell, dataclass): {differing}"


def test_the_study_defaults_are_the_dataclass_defaults():
    training = config.defaults(TrainingConfig)
    for role in params.ROLES:
        assert params.DEFAULTS["training"][role] == {key: training[key] for key in params.TRAINING_KEYS}
    assert params.DEFAULTS["kd"] == {key: training[key] for key in params.KD_KEYS}
    evaluation = config.defaults(EvaluationConfig)
    for dotted, name in params.EVALUATION_KEYS.items():
        section = params.DEFAULTS["evaluation"]
        for part in dotted.split("."):
            section = section[part]
        assert section == evaluation[name], dotted
    assert params.DEFAULTS["evaluation"]["tasks"] == evaluation["tasks"]


@pytest.mark.parametrize("cls", [TrainingConfig, EvaluationConfig])
def test_every_field_has_help_and_its_default_passes_its_own_checks(cls):
    for f in dataclasses.fields(cls):
        assert len(f.metadata["help"]) > 10, f.name
        assert config.value_problems(cls, f.name, config.defaults(cls)[f.name]) == [], f.name
    if cls is TrainingConfig:
        assert TrainingConfig().validate() == TrainingConfig()


def test_validate_lists_every_problem_with_its_field():
    with pytest.raises(ValueError) as err:
        TrainingConfig(method="seqdk", beta=2, temperature=math.nan, lora="yes", batch_size=6).validate()
    assert str(err.value).split("; ") == [
        "method: expected one of sft, fkl, rkl, gkd, seqkd, got 'seqdk' (did you mean 'seqkd'?)",
        "lora: expected true or false, got 'yes'", "temperature: nan must be > 0", "beta: 2 must be in [0, 1]",
        "batch_size: 6 must be a multiple of micro_batch_size 4"]


def test_checks_name_the_key_path_types_and_what_none_means():
    assert config.value_problems(EvaluationConfig, "n_per_task", 0, "evaluation.n_per_task") == [
        "evaluation.n_per_task: 0 must be >= 1"]
    assert config.value_problems(EvaluationConfig, "do_sample", "yes", "evaluation.do_sample") == [
        "evaluation.do_sample: expected true, false or null (null: the protocol's, paper sampled and improved greedy), "
        "got 'yes'"]
    assert config.value_problems(TrainingConfig, "lr", True) == ["lr: expected a number, got True"]
    assert config.value_problems(TrainingConfig, "warmup_steps", None) == []
    assert config.bounds(TrainingConfig, "val_fraction") == "in [0, 1)"
    assert config.help_text(TrainingConfig, "val_examples").endswith(
        "(None: the protocol's, paper 500 and improved val_fraction)")


def test_study_files_get_the_same_checks(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study: x\nmodels: {students: [{name: s, layers: 1}]}\nkd: {beta: 1.5}\n"
                    "evaluation: {n_per_task: 0, max_new_tokens: {math: 0}}\ntraining: {student: {lora_r: 0}}\n")
    with pytest.raises(params.ParamsError) as err:
        params.load_study(path)
    assert sorted(err.value.problems) == ["evaluation.max_new_tokens.math: 0 must be >= 1",
                                          "evaluation.n_per_task: 0 must be >= 1", "kd.beta: 1.5 must be in [0, 1]",
                                          "training.student.lora_r: 0 must be >= 1"]


def test_field_values_picks_a_notebooks_parameters():
    namespace = {"epochs": 3, "method": "fkl", "model": "m", "In": []}
    assert config.field_values(TrainingConfig, namespace) == {"method": "fkl", "epochs": 3}


def test_validating_a_study_loads_no_model_code():
    code = ("import sys, kd_utils.params as p; p.load_study('params/default.yaml'); "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
