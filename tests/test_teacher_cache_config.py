"""The teacher-cache run's settings: one dataclass, and the notebook, the study defaults and the stage derive from it.

Fast: no model is loaded.
"""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd_utils import cache_config, params, teacher_cache
from kd_utils.cache_config import TeacherCacheConfig

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "teacher_cache.ipynb"


def parameters_cell(notebook: Path) -> dict:
    """name -> literal value of the notebook's cell tagged ``parameters`` (what papermill overrides)."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{notebook}: {len(cells)} cells tagged parameters"
    tree = ast.parse("".join(cells[0]["source"]))
    assert all(isinstance(node, ast.Assign) and len(node.targets) == 1 for node in tree.body)
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}


def test_the_notebooks_parameters_are_the_config_and_its_defaults():
    """Every field, and only those, in the cell; each at the dataclass's default (same type; a tuple as a list)."""
    declared = parameters_cell(NOTEBOOK)
    assert set(declared) == {f.name for f in dataclasses.fields(TeacherCacheConfig)}
    defaults = cache_config.defaults()
    assert set(declared) - set(defaults) == {"teacher", "output_dir"}  # no default: the notebook's own
    for name, default in defaults.items():
        expected = list(default) if isinstance(default, tuple) else default
        assert (type(declared[name]), declared[name]) == (type(expected), expected), name


def test_the_study_defaults_are_the_config_defaults():
    defaults = cache_config.defaults()
    assert {key: params.DEFAULTS["teacher_cache"][key] for key in cache_config.STUDY_FIELDS} == \
        {key: defaults[key] for key in cache_config.STUDY_FIELDS}
    assert (defaults["representation"], defaults["k"], defaults["num_samples"]) == (
        teacher_cache.DEFAULT_REPRESENTATION, teacher_cache.DEFAULT_K, teacher_cache.DEFAULT_NUM_SAMPLES)


def test_every_field_has_one_line_of_help_and_its_allowed_values_where_checked():
    for f in dataclasses.fields(TeacherCacheConfig):
        assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name
    allowed = {f.name: {k: v for k, v in f.metadata.items() if k != "help"}
               for f in dataclasses.fields(TeacherCacheConfig)}
    assert {name: a for name, a in allowed.items() if a} == {
        "domain": {"choices": ("math", "commonsense")}, "max_length": {"min": 8},
        "representation": {"choices": ("topk", "sampled", "topk_sampled")}, "k": {"min": 1}, "num_samples": {"min": 1},
        "epochs": {"min": 1}, "id_coding": {"choices": ("fixed", "elias_fano")}, "batch_size": {"min": 1},
        "shard_size": {"min": 1}}


def test_a_config_holds_its_temperatures_and_sigmas_as_tuples_of_floats():
    config = TeacherCacheConfig(teacher="t", output_dir="o", temperatures=[1, 2.5], noise_sigmas=[0])
    assert (config.temperatures, config.noise_sigmas) == ((1.0, 2.5), (0.0,))
    assert all(isinstance(v, float) for v in config.temperatures + config.noise_sigmas)
    assert config.validate() is config


@pytest.mark.parametrize("values, problems", [
    ({"representation": "dense", "k": 4, "num_samples": 20, "id_coding": "fixed"},
     ["x.representation: expected one of topk, sampled, topk_sampled, got 'dense'"]),
    ({"representation": "topk", "k": 0, "num_samples": -1, "id_coding": "golomb"},
     ["x.k: must be >= 1, got 0", "x.num_samples: must be >= 1, got -1",
      "x.id_coding: expected one of fixed, elias_fano, got 'golomb'"]),
    ({"k": "four", "num_samples": 1.0}, []),  # a wrong type is the caller's type check
    (cache_config.defaults(), []),
])
def test_setting_problems_name_the_key_path_and_the_allowed_values(values, problems):
    assert cache_config.setting_problems(values, "x") == problems


def test_the_stage_refuses_an_unknown_setting_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_k'"):
        teacher_cache.run_teacher_cache("no-such-model", tmp_path / "c", top_k=4)
    assert not (tmp_path / "c").exists()


def test_the_config_module_does_not_load_torch():
    code = "import sys, kd_utils.cache_config; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
