"""The GPU machine's limits, checked before and after a session (the plan, what travels, what comes back).

The device tool (its README's Limits table) returns at most 8 files of at most 16 MiB each (64 MiB together)
from ``$OUT``, no deeper than two folders (``$OUT/a/b/file`` comes back, ``$OUT/a/b/c/file`` does not), each
file and folder named in letters, digits, '.', '_' and '-' alone, and plain files only; anything else is left
behind, silently from the session's point of view. A call carries at most 64 MiB (the tracked and untracked
not-ignored tree plus its carried paths), names at most 8 carried paths, and runs at most 600 s.

    python benchmarks/gpu_limits.py returned DIR        # what would come back from DIR? exit 1 naming each broken limit
    python benchmarks/gpu_limits.py plan                # the session plan (benchmarks/gpu_plan.json) against the budget
    python benchmarks/gpu_limits.py plan --sizes        # ... and each call's travelling size (after gpu_pack.sh)
    python benchmarks/gpu_limits.py plan --markdown     # the plan as the table docs/gpu.md shows
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
MAX_FILES = 8
MAX_FILE_BYTES = 16 * MiB
MAX_TOTAL_BYTES = 64 * MiB
MAX_FOLDERS_DEEP = 2
MAX_TRAVEL_BYTES = 64 * MiB
MAX_CARRY_PATHS = 8
MAX_COMMAND_CHARS = 2000
MAX_CALL_SECONDS = 600
SESSION_SECONDS = 900  # device time of a session, every start, idle wait and close included
PLAN_LIMIT_SECONDS = 660  # the plan's own ceiling: 11 of the 15 minutes, so that one retry fits
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "gpu_plan.json"


def returned_problems(out_dir: str | Path) -> list[str]:
    """Every way the contents of ``out_dir`` break the return limits (empty: everything would come back)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return [f"{out_dir}: not a directory"]
    problems, files, total = [], [], 0
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        bad = [part for part in rel.parts if not NAME.match(part)]
        if bad:
            problems.append(f"bad name: {rel} ({bad[0]!r} has characters other than letters, digits, '.', '_', '-')")
        if path.is_symlink():
            problems.append(f"not a plain file: {rel} is a symbolic link")
            continue
        if path.is_dir():
            continue
        if not path.is_file():
            problems.append(f"not a plain file: {rel}")
            continue
        folders = len(rel.parts) - 1
        if folders > MAX_FOLDERS_DEEP:
            problems.append(f"too deep: {rel} is {folders} folders down (at most {MAX_FOLDERS_DEEP})")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            problems.append(f"file too large: {rel} is {size / MiB:.1f} MiB (at most {MAX_FILE_BYTES // MiB} MiB)")
        files.append(rel)
        total += size
    if len(files) > MAX_FILES:
        problems.append(f"too many files: {len(files)} (at most {MAX_FILES}): {', '.join(map(str, files))}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"too much altogether: {total / MiB:.1f} MiB (at most {MAX_TOTAL_BYTES // MiB} MiB)")
    return problems


def travelling_files(repo: Path, carry: list[str]) -> list[Path]:
    """What a call sends: tracked and untracked-not-ignored files, plus the carried paths."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = [repo / f for f in listed if f and (repo / f).is_file()]
    for c in carry:
        path = repo / c
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return files


def load_plan(path: Path = PLAN) -> dict:
    return json.loads(path.read_text())


def plan_seconds(plan: dict) -> int:
    """Device time the plan spends: a machine start, every call at its full limit, the idle wait after the last."""
    return plan["start_allowance_s"] + sum(c["timeout_s"] for c in plan["calls"]) + plan["idle_after_s"]


def plan_problems(plan: dict, repo: Path | None = None) -> list[str]:
    """The plan against the device tool's limits; with ``repo``, also each call's travelling size."""
    problems = []
    for call in plan["calls"]:
        name = call["name"]
        if not call.get("kind"):
            problems.append(f"{name}: names no kind (a call without one gets whatever the last call had)")
        if not 1 <= call["timeout_s"] <= MAX_CALL_SECONDS:
            problems.append(f"{name}: timeout_s {call['timeout_s']} outside 1..{MAX_CALL_SECONDS}")
        if len(call["command"]) > MAX_COMMAND_CHARS:
            problems.append(f"{name}: command of {len(call['command'])} characters (at most {MAX_COMMAND_CHARS})")
        if len(call["carry"]) > MAX_CARRY_PATHS:
            problems.append(f"{name}: {len(call['carry'])} carried paths (at most {MAX_CARRY_PATHS})")
        if repo is not None:
            missing = [c for c in call["carry"] if not (repo / c).exists()]
            if missing:
                problems.append(f"{name}: carried paths missing here: {', '.join(missing)} "
                                "(run benchmarks/gpu_pack.sh)")
            size = sum(p.stat().st_size for p in travelling_files(repo, call["carry"]))
            if size > MAX_TRAVEL_BYTES:
                problems.append(f"{name}: {size / MiB:.1f} MiB would travel (at most {MAX_TRAVEL_BYTES // MiB} MiB)")
    total = plan_seconds(plan)
    if total > PLAN_LIMIT_SECONDS:
        problems.append(f"plan: {total} s of device time (at most {PLAN_LIMIT_SECONDS} s, so that one retry fits)")
    return problems


def plan_markdown(plan: dict, repo: Path | None = None) -> str:
    lines = ["| step | kind | timeout_s | carry | command |", "|---|---|---|---|---|",
             f"| machine start | | {plan['start_allowance_s']} (allowance) | | |"]
    for call in plan["calls"]:
        carry = ", ".join(f"`{c}`" for c in call["carry"])
        size = ""
        if repo is not None:
            size = f" ({sum(p.stat().st_size for p in travelling_files(repo, call['carry'])) / MiB:.1f} MiB travel)"
        lines.append(f"| {call['name']} | `{call['kind']}` | {call['timeout_s']} | {carry}{size} "
                     f"| `{call['command']}` |")
    lines.append(f"| idle, then given back | | {plan['idle_after_s']} | | |")
    total = plan_seconds(plan)
    lines.append(f"| **total** | | **{total} s = {total / 60:.1f} min** of {SESSION_SECONDS // 60}; "
                 f"{(SESSION_SECONDS - total) // 60:.0f} min {(SESSION_SECONDS - total) % 60} s "
                 "left for one retry | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ret = sub.add_parser("returned", help="check a directory against the return limits")
    ret.add_argument("dir", type=Path)
    pl = sub.add_parser("plan", help="check benchmarks/gpu_plan.json")
    pl.add_argument("--sizes", action="store_true",
                    help="also each call's travelling size (needs gpu_pack.sh's output)")
    pl.add_argument("--markdown", action="store_true", help="print the plan as a table")
    args = parser.parse_args(argv)
    if args.command == "returned":
        problems = returned_problems(args.dir)
        for p in problems:
            print(f"RETURN LIMIT BROKEN: {p}", file=sys.stderr)
        if not problems:
            n = sum(1 for p in args.dir.rglob("*") if p.is_file())
            print(f"{args.dir}: {n} files, all within the return limits")
        return 1 if problems else 0
    plan = load_plan()
    repo = ROOT if args.sizes else None
    if args.markdown:
        print(plan_markdown(plan, repo))
    problems = plan_problems(plan, repo)
    for p in problems:
        print(f"PLAN LIMIT BROKEN: {p}", file=sys.stderr)
    if not problems:
        print(f"plan: {plan_seconds(plan)} s of device time, within {PLAN_LIMIT_SECONDS} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
