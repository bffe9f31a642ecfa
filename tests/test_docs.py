"""The README and the docs/ pages: every relative link resolves, and every command they show is sound.

Commands are read from fenced ```bash / ```sh / ```shell / ```console blocks (console: the lines after "$ ").
Each command is either RUN here, in this process, or CHECKED (what it names exists), by this list:

RUN (cheap):
  - `python -m kd_utils.X --help` for every kd_utils module a command names, and `--help` of the subcommand
    it calls; every `--option` the command passes must appear in that help;
  - `python -m kd_utils.study run P --dry-run` for P in DRY_RUN (test_dry_run_commands_run);
  - every params/ file a command names (`kd_utils.study run P`, `make study STUDY=P`) is loaded and validated
    (`kd_utils.params.load_study`), which is the runner's first step; its dry run is not executed where it is
    outside DRY_RUN (the paper grids' dry runs ask the hub for tokenizers, the larger studies take ~10 s to
    count tokens).
CHECKED only (too costly here, or they need a GPU, a cluster or the network):
  - `make TARGET`: the target is in the Makefile (make study / test / paper / mutation / setup / gpu-rehearsal);
  - `kd_utils.study run` without --dry-run, `kd_utils.costs calibrate`, `kd_utils.report paper`,
    `accelerate launch -m kd_utils.X`: the module and subcommand exist (their --help is run, as above);
  - `python benchmarks/X.py`, `bash X.sh`, `tests/slurm/cluster.sh`, `python -m pytest`: the files exist;
  - every file path a command names exists (placeholders such as DIR, <run_id> and outputs/ are skipped).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 15_000

SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
PREFIXES = {"nice", "time", "/usr/bin/time"}
OPERATORS = {"&&", "||", ";", "|"}
# Dry runs executed by test_dry_run_commands_run (the embedded model's tokenizer counts the tokens; ~6 s).
DRY_RUN = {"params/default.yaml"}
# Paths that a command names but that are made by running something, not part of the checkout.
GENERATED = ("outputs/", ".venv/", ".gpu_carry/", "tests/slurm/logs/")
PLACEHOLDER = re.compile(r"[<>*{}$]|\b(DIR|PARAMS|STAGE|TARGET)\b")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _fences(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip().split(" ")[0], number + 1, []
            else:
                blocks.append((lang, start, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"unclosed ``` block from line {start - 1}"
    return blocks


def _prose(text: str) -> str:
    """The text outside fenced blocks and inline code spans."""
    kept, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            kept.append("")
        else:
            kept.append("" if inside else re.sub(r"`[^`]*`", "``", line))
    return "\n".join(kept)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    inside = False
    for line in _text(page).splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        match = None if inside else re.match(r"#{1,6}\s+(.*)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links() -> list[tuple[Path, str]]:
    return [
        (page, target) for page in PAGES for target in LINK.findall(_prose(_text(page)))
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = []
    for target in LINK.findall(_prose(_text(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(
                f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(
                f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}"
            )
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_readme_is_short() -> None:
    size = len(_text(ROOT / "README.md"))
    assert size < README_LIMIT, (
        f"README.md has {size} characters; the limit is {README_LIMIT}: move detail to docs/"
    )


def test_every_docs_page_is_linked() -> None:
    linked = {
        (page.parent / target.partition("#")[0]).resolve() for page, target in _links()
    }
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages no page links to: {unlinked}"


def test_no_words_about_how_the_project_was_made() -> None:
    banned = re.compile(
        r"#\d+\b|\bissues?\b|\bengineers?\b|\bthis session\b|\bhelpers?\b",
        re.IGNORECASE,
    )
    found = [
        f"{page.relative_to(ROOT)}:{number}: {match.group(0)!r}"
        for page in PAGES
        for number, line in enumerate(_prose(_text(page)).splitlines(), 1)
        for match in banned.finditer(line)
    ]
    assert not found, (
        "the docs speak of the project, not of how it was made: " + "; ".join(found)
    )


def _commands() -> list[tuple[str, list[str]]]:
    """(where, tokens) of every simple command in the shell blocks, prefixes (VAR=value, nice) dropped."""
    found = []
    for page in PAGES:
        for lang, start, body in _fences(_text(page)):
            if lang not in SHELL_LANGS:
                continue
            lines = body.splitlines()
            if lang == "console":
                lines = [line[2:] for line in lines if line.startswith("$ ")]
            joined = "\n".join(lines).replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                tokens = shlex.split(line, comments=True)
                simple: list[str] = []
                for token in [*tokens, ";"]:
                    if token not in OPERATORS:
                        simple.append(token)
                        continue
                    while simple and (
                        re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", simple[0])
                        or simple[0] in PREFIXES
                    ):
                        simple = (
                            simple[2:]
                            if simple[:2] == ["/usr/bin/time", "-v"]
                            else simple[1:]
                        )
                    if simple:
                        found.append(
                            (f"{page.relative_to(ROOT)}:{start + offset}", simple)
                        )
                    simple = []
    return found


COMMANDS = _commands()


def _help(module: str, *sub: str) -> str:
    """`python -m MODULE [SUB] --help`, run in this process; '' when MODULE has no command line."""
    mod = importlib.import_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        if hasattr(mod, "main"):
            mod.main([*sub, "--help"])
        else:  # a package with __main__.py, or a module whose entry point has another name: run it as -m does
            with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", RuntimeWarning
                )  # runpy: the module is already imported
                patch.setattr(sys, "argv", [module, *sub, "--help"])
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    return out.getvalue()


def _subcommands(module: str) -> set[str]:
    match = re.search(r"\{([\w,-]+)\}", _help(module))
    return set(match.group(1).split(",")) if match else set()


def _paths(tokens: list[str]) -> list[str]:
    """The tokens that name files of the checkout (options' values included, placeholders skipped)."""
    paths = []
    for i, token in enumerate(tokens):
        value = token.split("=", 1)[1] if re.fullmatch(r"[A-Z_]+=.*", token) else token
        if (
            value.startswith("-")
            or PLACEHOLDER.search(value)
            or value.startswith(GENERATED)
        ):
            continue
        if i and tokens[i - 1].startswith("--output"):  # a file the command writes
            continue
        if "/" in value or re.search(r"\.(py|ya?ml|sh|json|ipynb|md)$", value):
            paths.append(value)
    return paths


def _make_targets() -> set[str]:
    return set(
        re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE)
    )


def _check_module_command(module: str, args: list[str], where: str) -> list[str]:
    if importlib.util.find_spec(module) is None:
        return [f"{where}: no module {module}"]
    if not module.startswith("kd_utils"):
        return []
    if "usage:" not in _help(module):
        return [
            f"{where}: python -m {module} --help prints no usage: the module has no command line"
        ]
    subs = _subcommands(module)
    problems, sub = [], []
    if subs:
        if not args or args[0] not in subs:
            return [
                f"{where}: python -m {module} has no subcommand {args[:1]} (it has {sorted(subs)})"
            ]
        sub = args[:1]
    usage = _help(module, *sub)
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        if option not in usage:
            problems.append(
                f"{where}: python -m {module} {' '.join(sub)} has no option {option}"
            )
    return problems


def _invalid_study(path: str, where: str) -> str:
    """'' when the study file validates as the runner's first step does, else the problems it names."""
    from kd_utils.params import ParamsError, load_study

    try:
        load_study(ROOT / path)
    except ParamsError as err:
        return f"{where}: {path} does not validate: {err}"
    return ""


def test_commands_name_what_exists() -> None:
    assert COMMANDS, "no commands found in the docs' shell blocks"
    targets = _make_targets()
    problems = []
    for where, tokens in COMMANDS:
        program, args = tokens[0], tokens[1:]
        missing = [p for p in _paths(tokens) if not (ROOT / p).exists()]
        problems += [f"{where}: no file {p}" for p in missing]
        problems += [
            _invalid_study(p, where)
            for p in _paths(tokens)
            if p.startswith("params/") and p not in missing
        ]
        if program == "make":
            problems += [
                f"{where}: no make target {t}"
                for t in args
                if "=" not in t and t not in targets
            ]
        elif program in PYTHONS or program == "accelerate":
            if "-m" in args:
                i = args.index("-m")
                problems += _check_module_command(args[i + 1], args[i + 2 :], where)
            elif program == "accelerate" or not args or not args[0].endswith(".py"):
                problems.append(
                    f"{where}: neither `-m MODULE` nor a script: {shlex.join(tokens)}"
                )
        elif program == "bash" or "/" in program:
            pass  # the script's path is among the checked paths
        else:
            problems.append(
                f"{where}: {program!r} is in neither list of tests/test_docs.py: {shlex.join(tokens)}"
            )
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


@pytest.mark.embedded
def test_dry_run_commands_run(
    embedded_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dry runs in DRY_RUN, as the docs show them: the plan, the cost estimate and the design's power."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KD_DATA_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    from kd_utils import study

    shown = {
        tuple(tokens[tokens.index("run") + 1 :])
        for _, tokens in COMMANDS
        if "kd_utils.study" in tokens and "run" in tokens and "--dry-run" in tokens
    }
    ran = 0
    for args in sorted(shown):
        params = args[0]
        if params not in DRY_RUN:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = study.main(["run", *args])
        assert code == 0, (
            f"python -m kd_utils.study run {' '.join(args)} exited with {code}"
        )
        printed = out.getvalue()
        assert re.search(r"^\s+(pending|done)\s+teacher-", printed, re.MULTILINE), (
            f"no teacher run in the plan:\n{printed}"
        )
        assert "design power" in printed, (
            f"no design power in the dry run's output:\n{printed}"
        )
        ran += 1
    assert ran, f"no shown dry run is in DRY_RUN {sorted(DRY_RUN)}"

