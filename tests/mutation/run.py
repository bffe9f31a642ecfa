"""Mutation testing, one module at a time, each against the tests that judge it (``make mutation``).

    .venv/bin/python tests/mutation/run.py [MODULE ...] [--survivors | --estimate] [--max-children N]

MODULE is a file named in ``[tool.kd_study.mutation.modules]`` of pyproject.toml or its stem
(``tasks``, ``losses``); default: all of them. Each runs mutmut (``[tool.mutmut]``) in a scratch
copy of the project, ``outputs/mutation/<stem>/``, with ``only_mutate`` set to the module and the
test selection set to its tests. ``--survivors`` reuses the last run there and re-tests only the
mutants it did not detect (after adding tests); without it every mutant is tested afresh. When the
module's test list grew since that run, mutmut forgets every verdict; the mutants the last run
detected keep their verdict (more tests cannot let a detected mutant through), and a list that
lost a test is refused: run afresh then. Mutants of functions changed since that run are tested too.
``--estimate`` stops after mutmut has mapped the tests to the functions they call and prints
how long testing every mutant would take at most (each one running all the tests that call its
function, as if it survived; killed mutants stop at their first failing test).

The score of a module is the share of its mutants that its tests detect (killed, timed out or
crashed), leaving out the mutants listed as equivalent in ``tests/mutation/equivalent.txt``.
Each line there is ``name | mutated line | reason``; an entry whose mutant no longer shows that
line (the function changed) is reported as stale and not counted. Exit status 1 when a module
scores under ``fail_under``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("kd_utils", "tests", "notebooks", "params")
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}
PER_MUTANT_SECONDS = 0.8  # a forked pytest session per mutant, measured on tasks.py (122 mutants, 2 workers, 50 s)


@dataclass
class Equivalent:
    line: str
    reason: str


@dataclass
class ModuleScore:
    module: str
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    equivalent: int = 0
    undetected: list[tuple[str, str, str]] = field(default_factory=list)  # (name, status, mutated line)
    stale: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def detected(self) -> int:
        return sum(n for status, n in self.counts.items() if status in DETECTED)

    @property
    def score(self) -> float:
        scored = self.total - self.equivalent
        return 100.0 * self.detected / scored if scored else float("nan")


def read_settings() -> dict:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    return {"mutmut": settings["mutmut"], **settings["kd_study"]["mutation"]}


def read_equivalents(path: Path) -> dict[str, Equivalent]:
    """``name | mutated line | reason`` per line; blank lines and # comments are skipped."""
    found = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(" | ")
        code, _, reason = rest.rpartition(" | ")  # the code itself may hold " | "
        if not (name.strip() and code.strip() and reason.strip()):
            raise SystemExit(f"{path}:{number}: expected 'name | mutated line | reason', got {line!r}")
        found[name.strip()] = Equivalent(code.strip(), reason.strip())
    return found


def toml_value(value) -> str:
    return json.dumps(value)  # lists of strings, strings, booleans and numbers read the same in TOML


def prepare_scratch(module: str, tests: list[str], mutmut: dict, scratch: Path, fresh: bool) -> None:
    """A copy of the project whose [tool.mutmut] mutates only ``module`` and runs only ``tests``."""
    if fresh:
        shutil.rmtree(scratch / "mutants", ignore_errors=True)
    for name in COPIED:
        shutil.rmtree(scratch / name, ignore_errors=True)
        # copy2 keeps modification times: mutmut regenerates the mutants of a file only when it changed
        shutil.copytree(ROOT / name, scratch / name, copy_function=shutil.copy2,
                        ignore=shutil.ignore_patterns("__pycache__", "mutation"))
    config = {**mutmut, "only_mutate": [module], "pytest_add_cli_args_test_selection": tests}
    text = (ROOT / "pyproject.toml").read_text().split("\n[tool.mutmut]\n")[0]
    text += "\n[tool.mutmut]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in config.items())
    if not (scratch / "pyproject.toml").is_file() or (scratch / "pyproject.toml").read_text() != text:
        (scratch / "pyproject.toml").write_text(text)


def mutant_results(scratch: Path, module: str) -> dict[str, int | None]:
    meta = scratch / "mutants" / f"{module}.meta"
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}


def keep_detected_verdicts(scratch: Path, module: str, previous: dict[str, int | None]) -> None:
    """Restore the verdicts of mutants the last run detected where mutmut reset them (a longer test list)."""
    from mutmut.stats import status_by_exit_code

    meta = scratch / "mutants" / f"{module}.meta"
    if not previous or not meta.is_file():
        return
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    for name, code in previous.items():
        if codes.get(name) is None and status_by_exit_code[code] in DETECTED:
            codes[name] = code
    meta.write_text(json.dumps(data))


def mutated_line(scratch: Path, module: str, name: str) -> str:
    """The first line the mutant changes, as ``mutmut show`` prints it (without the '+')."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = Path.cwd()
    os.chdir(scratch)
    try:
        diff = get_diff_for_mutant(name, path=Path(module))
    finally:
        os.chdir(here)
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else "(the mutant removes lines)"


def run_module(module: str, tests: list[str], settings: dict, equivalents: dict[str, Equivalent],
               survivors_only: bool, max_children: int) -> ModuleScore:
    from mutmut.stats import status_by_exit_code

    scratch = ROOT / "outputs" / "mutation" / Path(module).stem
    scratch.mkdir(parents=True, exist_ok=True)
    previous = mutant_results(scratch, module) if survivors_only else {}
    rerun = [name for name, code in previous.items() if status_by_exit_code[code] not in DETECTED]
    if survivors_only and previous and not rerun:
        print(f"{module}: no undetected mutants from the last run to re-test")
    tests_file = scratch / "tests.json"  # the test list each verdict was reached with
    if survivors_only and tests_file.is_file():
        dropped = sorted(set(json.loads(tests_file.read_text())) - set(tests))
        if dropped:
            raise SystemExit(f"{module}: the test list lost {', '.join(dropped)} since the last run; "
                             "its verdicts may not hold: run without --survivors")
    prepare_scratch(module, tests, settings["mutmut"], scratch, fresh=not survivors_only)
    tests_file.write_text(json.dumps(tests))
    (scratch / "mutmut-run.log").unlink(missing_ok=True)
    print(f"{module}: mutmut against {' '.join(tests)} in {scratch.relative_to(ROOT)}", flush=True)
    start = time.perf_counter()
    run_mutmut(scratch, module, max_children, rerun)
    keep_detected_verdicts(scratch, module, previous)
    new = [name for name, code in mutant_results(scratch, module).items() if code is None]
    if survivors_only and previous and new:  # mutants of functions changed since the last run
        print(f"{module}: testing {len(new)} mutants of changed functions", flush=True)
        run_mutmut(scratch, module, max_children, new)
    seconds = time.perf_counter() - start
    result = ModuleScore(module, seconds)
    for name, code in sorted(mutant_results(scratch, module).items()):
        status = status_by_exit_code[code]
        if status == "not checked":
            raise SystemExit(f"{name} was not checked: the mutmut run did not finish "
                             f"(see {scratch / 'mutmut-run.log'})")
        result.counts[status] = result.counts.get(status, 0) + 1
        if status in DETECTED:
            continue
        line = mutated_line(scratch, module, name)
        listed = equivalents.get(name)
        if listed is not None and listed.line == line:
            result.equivalent += 1
        else:
            if listed is not None:
                result.stale.append(f"{name}: listed as '{listed.line}', now '{line}'")
            result.undetected.append((name, status, line))
    return result


def run_mutmut(scratch: Path, module: str, max_children: int, names: list[str]) -> None:
    """``mutmut run`` in the scratch copy (all mutants, or the named ones); its progress goes to mutmut-run.log."""
    log = scratch / "mutmut-run.log"
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
                              cwd=scratch, env=mutmut_env(), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"mutmut failed on {module} (exit {done.returncode}); its output is in {log}:\n"
                         + log.read_text(errors="replace")[-3000:])


def estimate_module(module: str, tests: list[str], settings: dict, max_children: int) -> None:
    """Run mutmut until its stats are written, stop it, and print the worst-case run time."""
    import signal

    from mutmut.utils.format_utils import mangled_name_from_mutant_name

    scratch = ROOT / "outputs" / "mutation" / f"{Path(module).stem}-estimate"
    prepare_scratch(module, tests, settings["mutmut"], scratch, fresh=True)
    stats_file = scratch / "mutants" / "mutmut-stats.json"
    start = time.perf_counter()
    with open(scratch / "mutmut-run.log", "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                                   cwd=scratch, env=mutmut_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        stats: dict = {}
        while process.poll() is None and not stats.get("tests_by_mangled_function_name"):
            time.sleep(2)
            try:
                stats = json.loads(stats_file.read_text())
            except (OSError, ValueError):
                stats = {}
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: mutmut and the workers it forked
        process.wait()
    if not stats.get("tests_by_mangled_function_name"):
        raise SystemExit(f"mutmut stopped before its stats on {module}: see {scratch / 'mutmut-run.log'}")
    durations, by_function = stats["duration_by_test"], stats["tests_by_mangled_function_name"]
    names = list(mutant_results(scratch, module))
    worst = [sum(durations.get(t, 0.0) for t in by_function.get(mangled_name_from_mutant_name(n), ())) for n in names]
    untested = sum(1 for w in worst if w == 0)
    overhead = PER_MUTANT_SECONDS * (len(names) - untested) / max_children / 60
    print(f"{module}: {len(names)} mutants ({untested} without tests), its tests take {sum(durations.values()):.0f} s "
          f"(stats took {time.perf_counter() - start:.0f} s); testing every mutant on {max_children} workers takes "
          f"{overhead:.0f} min of per-mutant overhead plus at most {sum(worst) / max_children / 60:.0f} min of tests")


def mutmut_env() -> dict[str, str]:
    # one thread per worker: nothing for a fork to inherit from torch's thread pool, no oversubscription
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def report(results: list[ModuleScore], fail_under: float) -> bool:
    print(f"\n{'module':<28}{'mutants':>8}{'detected':>9}{'equiv.':>7}{'undet.':>7}{'score':>8}{'minutes':>9}")
    for r in results:
        print(f"{r.module:<28}{r.total:>8}{r.detected:>9}{r.equivalent:>7}{len(r.undetected):>7}{r.score:>7.1f}%"
              f"{r.seconds / 60:>9.1f}")
    total, detected = sum(r.total - r.equivalent for r in results), sum(r.detected for r in results)
    if len(results) > 1 and total:
        print(f"{'total':<28}{sum(r.total for r in results):>8}{detected:>9}{sum(r.equivalent for r in results):>7}"
              f"{sum(len(r.undetected) for r in results):>7}{100 * detected / total:>7.1f}%"
              f"{sum(r.seconds for r in results) / 60:>9.1f}")
    for r in results:
        for name, status, line in r.undetected:
            print(f"  {status:<10} {name} | {line}")
        for entry in r.stale:
            print(f"  stale equivalent entry: {entry}")
    low = [r.module for r in results if not r.score >= fail_under]
    if low:
        print(f"\nunder {fail_under:g}%: {', '.join(low)} (kill the undetected mutants with tests, or list the "
              "equivalent ones in tests/mutation/equivalent.txt with a reason)")
    return not low


def main(argv: list[str] | None = None) -> int:
    settings = read_settings()
    modules: dict[str, list[str]] = settings["modules"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(Path(m).stem for m in modules)}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--survivors", action="store_true", help="re-test only the last run's undetected mutants")
    mode.add_argument("--estimate", action="store_true", help="print each module's worst-case run time, test nothing")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    by_stem = {Path(m).stem: m for m in modules}
    unknown = [m for m in args.modules if m not in modules and m not in by_stem]
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; known: {', '.join(by_stem)}")
    chosen = [by_stem.get(m, m) for m in args.modules] or list(modules)
    if args.estimate:
        for m in chosen:
            estimate_module(m, modules[m], settings, args.max_children)
        return 0
    equivalents = read_equivalents(ROOT / settings["equivalent"])
    results = [run_module(m, modules[m], settings, equivalents, args.survivors, args.max_children) for m in chosen]
    return 0 if report(results, settings["fail_under"]) else 1


if __name__ == "__main__":
    sys.exit(main())
