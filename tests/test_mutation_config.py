"""`make mutation` stays runnable: its modules, test lists and hand-made mutants match the code.

The mutation runs themselves are too slow for `make test`; these checks are what keeps them from
going stale silently when a module or a test is renamed.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "mutation" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_configured_modules_and_their_tests_exist():
    settings = load("run").read_settings()
    assert settings["fail_under"] >= 85
    assert {"kd_utils/losses.py", "kd_utils/training.py", "kd_utils/tasks.py",
            "kd_utils/teacher_cache.py"} <= set(settings["modules"])
    for module, tests in settings["modules"].items():
        assert (ROOT / module).is_file(), module
        assert tests and all((ROOT / t).is_file() for t in tests), (module, tests)


def test_equivalent_mutants_are_listed_with_a_line_and_a_reason():
    run = load("run")
    listed = run.read_equivalents(ROOT / run.read_settings()["equivalent"])
    modules = {m[:-3].replace("/", ".") for m in run.read_settings()["modules"]}
    for name, entry in listed.items():
        assert any(name.startswith(m + ".") for m in modules), name
        assert entry.line and len(entry.reason) > 10, name


def test_a_malformed_equivalent_line_is_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "equivalent.txt"
    path.write_text("# comment\nkd_utils.tasks.x_f__mutmut_1 | no reason here\n")
    with pytest.raises(SystemExit, match=r"equivalent.txt:2: expected 'name \| mutated line \| reason'"):
        load("run").read_equivalents(path)


@pytest.mark.parametrize("mutant", load("issue_mutants").MUTANTS, ids=lambda m: m.name)
def test_each_hand_made_mutant_still_applies_and_names_a_collected_test(mutant, tmp_path):
    source = (ROOT / mutant.file).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.file} no longer holds {mutant.old!r}: update issue_mutants.py"
    mutated = tmp_path / mutant.file
    mutated.parent.mkdir(parents=True)
    mutated.write_text(source)
    load("issue_mutants").apply(mutant, tmp_path)
    assert mutated.read_text() != source
    for test in mutant.tests:
        path, _, name = test.partition("::")
        function = name.split("[")[0]
        assert f"def {function}(" in (ROOT / path).read_text(), test
