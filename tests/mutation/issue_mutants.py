"""Apply each hand-made mutant of issue 16 to a scratch copy of the project and run the test
named to catch it; the mutant must make that test fail.

    .venv/bin/python tests/mutation/issue_mutants.py [NAME ...]

Exit status 1 when a mutant survives its test or no longer applies (its source line changed:
update the table). mutmut's generated mutants are scored by ``tests/mutation/run.py``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("kd_utils", "tests", "notebooks", "params", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("is_correct relative tolerance", "kd_utils/tasks.py",
           "return abs(float(answer) - pred) <= 0.001",
           "return abs(float(answer) - pred) <= 0.001 * abs(float(answer))",
           ("tests/test_scoring.py::test_verdicts",)),
    Mutant("distill_mask labels[:, :-1] (response path)", "kd_utils/objectives.py",
           'target = batch["response_mask"][:, 1:] if positions',
           'target = batch["response_mask"][:, :-1] if positions',
           ("tests/test_training_signal.py::test_distill_mask_of_each_method_and_protocol",)),
    Mutant("distill_mask attention_mask[:, :-1] (attention-mask path)", "kd_utils/objectives.py",
           'positions == "response" else real[:, 1:]', 'positions == "response" else real[:, :-1]',
           ("tests/test_training_signal.py::test_distill_mask_of_each_method_and_protocol",)),
    Mutant("lm_loss without the next-token shift", "kd_utils/objectives.py",
           "targets = labels[:, 1:].flatten()\n    summed = torch.nn.functional.cross_entropy(logits[:, :-1]",
           "targets = labels.flatten()\n    summed = torch.nn.functional.cross_entropy(logits",
           ("tests/test_training_signal.py::test_lm_loss_is_the_next_token_cross_entropy_on_the_literal_positions",)),
    Mutant("holm_adjust family without method", "kd_utils/statistics/multiple_testing.py",
           'family: Sequence[str] = ("domain", "hypothesis", "method")',
           'family: Sequence[str] = ("domain", "hypothesis")',
           ("tests/test_multiple_testing.py::test_holm_families_are_domain_hypothesis_and_method",)),
    Mutant("noise RNG state not restored on resume", "kd_utils/teachers.py",
           'self.generator.set_state(torch.tensor(state["noise_gen"], dtype=torch.uint8))', "pass",
           ("tests/test_resume.py::test_killed_and_resumed_run_equals_an_uninterrupted_one[fkl-noise]",)),
    Mutant("teacher source state not loaded on resume", "kd_utils/training.py",
           'source.load_state(saved["teacher_source"])', "pass",
           ("tests/test_resume.py::test_killed_and_resumed_run_equals_an_uninterrupted_one[fkl-noise]",)),
    Mutant("gkd's on-policy RNG not restored on resume", "kd_utils/training.py",
           'policy_rng.setstate(random_state(saved["policy_rng"]))', "pass",
           ("tests/test_resume.py::test_killed_and_resumed_run_equals_an_uninterrupted_one[gkd-on-policy]",)),
    Mutant("torch's RNG (student samples, dropout) not restored on resume", "kd_utils/training.py",
           'accelerator.load_state(str(path / "state"), strict=False)',
           'accelerator.load_state(str(path / "state"), strict=False); torch.manual_seed(1)',
           ("tests/test_resume.py::test_killed_and_resumed_run_equals_an_uninterrupted_one[gkd-on-policy]",)),
    Mutant("download check by size only", "kd_utils/data_files.py",
           "if tmp.stat().st_size != size or sha256_file(tmp) != sha:", "if tmp.stat().st_size != size:",
           ("tests/test_data.py::test_tampered_download_of_the_right_size_is_refused",)),
]


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.file
    source = path.read_text()
    if source.count(mutant.old) != 1:
        raise LookupError(f"{mutant.file}: expected one occurrence of {mutant.old!r}, found {source.count(mutant.old)}")
    path.write_text(source.replace(mutant.old, mutant.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=root, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="substrings of mutant names (default: all)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    failures = 0
    for mutant in chosen:
        with tempfile.TemporaryDirectory(prefix="kd-mutant-") as tmp:
            root = Path(tmp)
            for name in COPIED:
                src = ROOT / name
                (shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
                 if src.is_dir() else shutil.copy2(src, root / name))
            start = time.perf_counter()
            try:
                apply(mutant, root)
            except LookupError as err:
                print(f"STALE     {mutant.name}: {err}")
                failures += 1
                continue
            done = run_tests(root, mutant.tests)
            seconds = time.perf_counter() - start
            caught = done.returncode == 1  # 1: tests failed; other codes are errors, not a catch
            failures += not caught
            print(f"{'caught  ' if caught else 'SURVIVED'}  {mutant.name}  ({seconds:.0f} s, {' '.join(mutant.tests)})")
            if done.returncode not in (0, 1):
                print(done.stdout[-2000:], done.stderr[-2000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
