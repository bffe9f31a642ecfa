"""The benchmark files: where they are, downloading and checking them, and reading a task's examples.

The data directory is resolved as: an explicit argument, then ``KD_DATA_DIR``, then
``../shared/data`` beside the project root, and otherwise the upstream files are
downloaded (checksummed against :data:`MANIFEST`) into ``$KD_CACHE_DIR/data`` (default
``~/.cache/kd-study``). Every test set and training source is read into one record type, :class:`Example`.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kd_utils.constants import PROJECT_ROOT
from kd_utils.io import sha256_file
from kd_utils.tasks import TASKS, get_task

LLM_ADAPTERS_URL = "https://raw.githubusercontent.com/LCS2-IIITD/KD_generalization/main/generative/dataset"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
PAPER_RESULTS_URL = "https://raw.githubusercontent.com/LCS2-IIITD/KD_generalization/main/results"
HELLASWAG_FILE = "llm-adapters/hellaswag/test.json"

# relative path -> (size in bytes, sha256); None where upstream publishes no fixed copy we could hash.
MANIFEST: dict[str, tuple[int, str] | None] = {
    "gsm8k/test.jsonl": (749738, "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "gsm8k/train.jsonl": (4166206, "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "kd-paper-results/BLEU.csv": (3629, "c391034c126bca03e6839f598d97d3ff7ab325d2cd78a7104f3742b563be985a"),
    "kd-paper-results/BLEU2.csv": (3691, "ef2052e3793db1b86f8d2cda6d0d0018e173580f3a350a394d8e37a8e9221e58"),
    "kd-paper-results/EM1.csv": (3275, "389ae4fc196e654e4de803371126e1a167be5eb912cceaa20d17decd5c90f73a"),
    "kd-paper-results/EM1_cs.csv": (4228, "748e0ba4ab83411396802d75d10d87f4d9acabb737558122f888ceaefe16a709"),
    "kd-paper-results/EM2.csv": (3275, "c40d109b45e51a2e317c951ece469c3fa0331560f4776dc391fe5ab834ab2b83"),
    "kd-paper-results/EM2_cs.csv": (4267, "e669ff492d5a52c51ebeb0c7ab1b59840c0b04c64e868c9d4b678297161f818f"),
    "kd-paper-results/cs_results_main.csv": (5987, "6bec3505cbf71e5e41162accdc6b82f42f61b2203690da0ded8f7e66a4b134ed"),
    "kd-paper-results/llama_cs_results.csv": (1152, "8ac66d3ada5ac24e68d74796f7991757f2e7eab8863822820d7f857844979e7e"),
    "kd-paper-results/llama_math_results.csv":
        (980, "7247b92659f581b7122d6cb2855a09532a540b4b3b51a7bd7986232c173f6357"),
    "kd-paper-results/math_results_main.csv":
        (5240, "375c370b37297f572841851e46d6b54986126a27f0b7d1cc58bd65760a17183a"),
    "llm-adapters/AQuA/test.json": (152063, "de677f5f0139340009eb01f17c0db781b4161912cd1f4efa77292f2fcf3478ee"),
    "llm-adapters/ARC-Challenge/test.json":
        (622510, "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7"),
    "llm-adapters/ARC-Challenge/train.json":
        (585556, "a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb"),
    "llm-adapters/ARC-Easy/test.json": (1157216, "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc"),
    "llm-adapters/ARC-Easy/train.json": (1092324, "6a06cece3dec32f4fb1c1b0fc29dab14be7cf3053b417290dbc6cd845359f5ff"),
    "llm-adapters/AddSub/test.json": (170411, "62a8662b1ad40879953c4df0e61883a749d03aa3fc5e71f1cdb842b816e139ff"),
    "llm-adapters/MultiArith/test.json": (275458, "a40f426807c8a563802c2a5b66bda3bcd1eba9c099038fd1199f0dd57de5fd28"),
    "llm-adapters/SVAMP/test.json": (459713, "ffed015784f738f317c5603177861d044c4fc94e09211d78b25e96d46c656e2c"),
    "llm-adapters/SingleEq/test.json": (212001, "712b15edb851c97aab42a5de106d94008f94d917366c92537ed5400a8aacb207"),
    "llm-adapters/boolq/test.json": (899151, "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9"),
    "llm-adapters/boolq/train.json": (2599507, "5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83"),
    "llm-adapters/gsm8k/test.json": (824475, "2cc616a1e0b23ea1df29370476365cde71c4e0aa823fb06cc194c5a8a9381abe"),
    "llm-adapters/mathqa/test.json": (1018708, "58715cb7aaccc7f3f2994586073800a57a3e44f77d22e62bee7fd7ff8315172c"),
    "llm-adapters/mawps/test.json": (60202, "c1a708979cbf2b3df9ac4020baacf3e8e73fcf089e1de7dd1b305b810bfaa15f"),
    "llm-adapters/mawps/trainset.json": (833527, "42e631004e46e71f5e050bfd6f0af2e27c9d76315cee66cc6412d66a19b47c1a"),
    "llm-adapters/openbookqa/test.json": (202545, "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e"),
    "llm-adapters/openbookqa/train.json": (1987446, "a1e094eeea01f70c0baa880f37497b26700ae99b243927b9c529984de9b1fe90"),
    "llm-adapters/piqa/test.json": (913157, "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141"),
    "llm-adapters/social_i_qa/test.json": (843748, "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d"),
    "llm-adapters/winogrande/test.json": (497409, "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9"),
    HELLASWAG_FILE: None,
}


class DataError(RuntimeError):
    """A data file is missing, unavailable offline, or malformed."""


@dataclass
class Example:
    id: str
    task: str
    domain: str
    instruction: str
    input: str
    answer: str
    rationale: str | None = None
    complete: bool = True  # False: a generated rationale cut at its token budget (its row gets no EOS)


def upstream_url(rel_path: str, mirror: str | None = None) -> str:
    """Where a manifest file lives upstream (or under ``mirror``, same layout)."""
    if mirror:
        return f"{mirror.rstrip('/')}/{rel_path}"
    top, rest = rel_path.split("/", 1)
    base = {"llm-adapters": LLM_ADAPTERS_URL, "gsm8k": GSM8K_URL, "kd-paper-results": PAPER_RESULTS_URL}[top]
    return f"{base}/{rest}"


def cache_dir() -> Path:
    return Path(os.environ.get("KD_CACHE_DIR", Path.home() / ".cache" / "kd-study"))


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory to read: argument, then $KD_DATA_DIR, then ../shared/data, else the cache.

    The cache directory is returned even if still empty; files are downloaded on first use.
    """
    for candidate, source in ((data_dir, "data_dir"), (os.environ.get("KD_DATA_DIR"), "KD_DATA_DIR")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise DataError(f"{source}={str(candidate)!r} is not a directory")
            return path
    shared = PROJECT_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return cache_dir() / "data"


def download_file(rel_path: str, dest_dir: Path, mirror: str | None = None,
                  manifest: dict[str, tuple[int, str] | None] = MANIFEST) -> Path:
    """Download one manifest file into dest_dir atomically, verifying size and sha256."""
    if rel_path not in manifest:
        raise DataError(f"{rel_path!r} is not a known data file")
    url, target = upstream_url(rel_path, mirror), dest_dir / rel_path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=rel_path, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
        expected = manifest[rel_path]
        if expected is not None:
            size, sha = expected
            if tmp.stat().st_size != size or sha256_file(tmp) != sha:
                raise DataError(f"download of {url} failed its checksum (expected {size} bytes, sha256 {sha[:12]}...)")
        os.replace(tmp, target)
    except OSError as err:
        raise DataError(f"could not download {url}: {err}. Set KD_DATA_DIR to a directory holding {rel_path}.") from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


def data_file(rel_path: str, data_dir: str | Path | None = None, mirror: str | None = None) -> Path:
    """Path to a data file, downloading it into the cache when the cache is the data directory."""
    root = resolve_data_dir(data_dir)
    path = root / rel_path
    if path.is_file():
        return path
    if rel_path not in MANIFEST:  # the upstream PIQA / Social IQa / WinoGrande train splits: no single-file source
        raise DataError(f"missing data file {path}. It has no automatic download: put the upstream file "
                        f"{rel_path} into the data directory (KD_DATA_DIR or data_dir), see the data README, "
                        f"or train with mix: design.")
    if root == cache_dir() / "data" and (mirror or os.environ.get("KD_DATA_OFFLINE") != "1"):
        return download_file(rel_path, root, mirror or os.environ.get("KD_DATA_MIRROR"))
    raise DataError(f"missing data file {path}. Point KD_DATA_DIR (or data_dir) at a directory holding "
                    f"{rel_path}, or unset it to download from {upstream_url(rel_path)}.")


def paper_results_dir(data_dir: str | Path | None = None) -> Path:
    """The directory of the paper's published result CSVs, every one present (downloaded into the cache if needed)."""
    files = [data_file(rel, data_dir) for rel in MANIFEST if rel.startswith("kd-paper-results/")]
    return files[0].parent


def read_json(path: Path) -> list[dict]:
    """Read a .json list or a .jsonl file, naming the file and line on malformed input."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"malformed JSON in {path} line {line_no}: {err.msg}") from None
            return rows
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON in {path} (line {err.lineno}): {err.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} should hold a JSON list of records, found {type(rows).__name__}")
    return rows


def require_keys(row: dict, keys: tuple[str, ...], path: Path, index: int) -> None:
    """Raise a DataError naming the file, the record and the keys it lacks."""
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{path} record {index} lacks {', '.join(missing)}")


def task_file(task_id: str, split: str = "test") -> str:
    """A task split's file, relative to the data directory (LLM-Adapters layout)."""
    return f"llm-adapters/{get_task(task_id).data_name}/{split}.json"


def load_task(task_id: str, split: str = "test", data_dir: str | Path | None = None) -> list[Example]:
    """All examples of a task's split in one record type (LLM-Adapters format on disk)."""
    task = get_task(task_id)
    rel = task_file(task_id, split)
    if task_id == "hellaswag" and split == "test":
        try:
            path = data_file(rel, data_dir)
        except DataError as err:
            raise DataError(f"hellaswag is not available offline ({err})") from None
    else:
        path = data_file(rel, data_dir)
    examples = []
    for i, row in enumerate(read_json(path)):
        require_keys(row, ("instruction", "answer"), path, i)
        examples.append(Example(
            id=f"{task_id}-{split}-{i}", task=task_id, domain=task.domain,
            instruction=row["instruction"], input=row.get("input") or "",
            answer=str(row["answer"]).strip(), rationale=row.get("output") or None,
        ))
    return examples


def available_tasks(task_ids: list[str], data_dir: str | Path | None = None) -> tuple[list[str], dict[str, str]]:
    """Split task ids into those whose test file can be read and those that cannot (with why)."""
    ok, missing = [], {}
    for task_id in task_ids:
        try:
            data_file(task_file(task_id), data_dir)
            ok.append(task_id)
        except DataError as err:
            missing[task_id] = str(err)
    return ok, missing


def load_all_tests(data_dir: str | Path | None = None) -> dict[str, list[Example]]:
    """Every test set that can be read (hellaswag offline is skipped): what the training mixes are decontaminated
    against."""
    ok, _ = available_tasks(list(TASKS), data_dir)
    return {t: load_task(t, "test", data_dir) for t in ok}
