"""The teacher cache on disk: its key and fields, file names, manifest, shard records and their checks.

Layout: ``<output_dir>/<key>/`` with ``shard-NNNNN.safetensors`` (flat arrays + per-example
lengths + the cached input ids, example ids in the metadata), a ``shard-NNNNN.json``
record (sha256, size, example ids hash) written after each shard, ``manifest.json`` and
optionally ``rationales.jsonl`` (the teacher's greedy generations, for seqkd / fidelity).
The key is the sha256 of the canonical JSON of every input that changes the content
(``cache_fields``); the manifest stores those fields in clear. Every file is written to a
temporary name and renamed (``cache_writer``). A rerun skips shards whose record and checksum
match (``shard_done``), and regenerates missing, truncated or corrupt ones. What the arrays hold:
``cache_encoding``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kd_utils.data import Example, cache_dir, mix_fingerprint
from kd_utils.io import read_json, sha256_file, write_atomic
from kd_utils.models import resolve_model_path

CACHE_FORMAT_VERSION = 4  # 4: one draw set per epoch; rationales record whether each generation finished
LOGPROB_DTYPE = torch.float16
MANIFEST = "manifest.json"
RATIONALES = "rationales.jsonl"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
SHARD_SUFFIX, RECORD_SUFFIX = ".safetensors", ".json"


# ---- identity ------------------------------------------------------------------------------

def _memo_file() -> Path:
    return cache_dir() / "weight-hashes.json"


def weights_hash(directory: str | Path) -> str:
    """sha256 over config files + weight files of a model / adapter directory.

    Each weight file's sha256 is memoised in ``$KD_CACHE_DIR/weight-hashes.json`` under
    path + size + mtime, so a model is read in full once, not on every run.
    """
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.suffix in WEIGHT_SUFFIXES or p.name in ("config.json", "adapter_config.json")))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ValueError(f"{directory} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    memo_path = _memo_file()
    try:  # a missing or damaged memo only costs rehashing
        memo = read_json(memo_path)
    except ValueError:
        memo = {}
    parts, changed = [], False
    for path in files:
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key], changed = sha256_file(path), True
        parts.append([path.name, memo[memo_key]])
    if changed:
        write_atomic(memo_path, json.dumps(memo, indent=0))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def model_dir(name_or_path: str | Path) -> Path:
    """The local directory holding a model's files (hub ids: the local snapshot)."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special ids the loop relies on."""
    content = {"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token_id,
               "pad": tokenizer.pad_token_id}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:20]


def cache_fields(*, teacher_hash: str, adapter_hash: str | None, task_aware_teacher: bool, tokenizer_fp: str,
                 mix_fp: str, max_length: int, representation: str, k: int, num_samples: int, temperature: float,
                 noise_sigma: float, seed: int, epochs: int, id_coding: str, vocab_size: int) -> dict:
    """Every input that changes the cache's content (the manifest's ``fields``)."""
    return {"format_version": CACHE_FORMAT_VERSION, "teacher": teacher_hash, "adapter": adapter_hash,
            "task_aware_teacher": bool(task_aware_teacher),
            "tokenizer": tokenizer_fp, "mix_fingerprint": mix_fp, "max_length": int(max_length),
            "representation": representation, "k": int(k) if representation != "sampled" else None,
            "num_samples": int(num_samples) if representation != "topk" else None,
            "temperature": float(temperature), "noise_sigma": float(noise_sigma),
            # seed fixes the noise and sample draws; epochs, how many sets of them (``stored_sets``)
            "seed": int(seed), "epochs": int(epochs), "logprob_dtype": str(LOGPROB_DTYPE).removeprefix("torch."),
            "id_coding": id_coding if representation != "topk" else "fixed", "vocab_size": int(vocab_size)}


def stored_sets(fields: dict) -> int:
    """Draw sets a cache stores: one per epoch it is made for; one when nothing in it is random (topk, no noise)."""
    random = fields["representation"] != "topk" or fields["noise_sigma"] > 0
    return fields["epochs"] if random else 1


def cache_key(fields: dict) -> str:
    """Content address: sha256 of the canonical JSON of ``fields``."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:24]


def teacher_identity(teacher: str | Path, teacher_adapter: str | Path | None = None,
                     task_aware_teacher: bool = True) -> dict:
    """The cache fields that name the teacher: weight hashes of the model and the adapter it merges, task-awareness.

    A student run passes these (with its seed) to ``open_for_training`` so a cache of another
    teacher, a re-fine-tuned adapter or the task-unaware base is refused, not used.
    """
    adapter = teacher_adapter if task_aware_teacher else None
    return {"teacher": weights_hash(model_dir(teacher)), "adapter": weights_hash(adapter) if adapter else None,
            "task_aware_teacher": bool(task_aware_teacher)}


# ---- files --------------------------------------------------------------------------------------

def shard_name(index: int) -> str:
    """Shard ``index``'s file name: ``shard-NNNNN.safetensors``."""
    return f"shard-{index:05d}{SHARD_SUFFIX}"


def record_name(shard_file: str) -> str:
    """The name of the record written beside a shard file (``shard-NNNNN.json``)."""
    return shard_file.removesuffix(SHARD_SUFFIX) + RECORD_SUFFIX


def ids_hash(example_ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(example_ids).encode()).hexdigest()


def read_manifest(cache: Path) -> dict:
    """The manifest of ``cache``, a ValueError naming the file when it is truncated, unparsable or lacks fields."""
    manifest = read_json(cache / MANIFEST)
    if not (isinstance(manifest, dict) and isinstance(manifest.get("fields"), dict)
            and isinstance(manifest.get("shards"), list)):
        raise ValueError(f"{cache / MANIFEST}: not a teacher cache manifest (no fields / shards)")
    return manifest


# ---- checks -------------------------------------------------------------------------------------

def shard_done(cache: Path, index: int, example_ids: list[str]) -> bool:
    """A complete, uncorrupted shard holding exactly these examples."""
    shard = cache / shard_name(index)
    record_path = cache / record_name(shard.name)
    if not (record_path.is_file() and shard.is_file()):
        return False
    try:
        record = read_json(record_path)
        return (record["example_ids_sha256"] == ids_hash(example_ids) and shard.stat().st_size == record["bytes"]
                and sha256_file(shard) == record["sha256"])
    except (ValueError, KeyError, TypeError):  # a truncated or unparsable record: regenerate the shard
        return False


def cache_complete(cache: Path, fields: dict) -> bool:
    """A manifest with these fields whose shards and shard records all check out."""
    try:
        manifest = read_manifest(cache)
        # the per-shard records too: a later partial regeneration trusts them
        return manifest["fields"] == fields and all(
            (cache / r["file"]).is_file() and sha256_file(cache / r["file"]) == r["sha256"]
            and read_json(cache / record_name(r["file"])) == r for r in manifest["shards"])
    except (ValueError, KeyError, TypeError):  # absent, truncated or malformed: regenerate
        return False


def rationales_missing(cache: Path, max_new_tokens: int, mix: list[Example]) -> bool:
    """True unless ``cache`` holds intact rationales of ``mix`` generated with ``max_new_tokens``."""
    try:
        record = read_manifest(cache).get("rationales")
    except ValueError:
        return True
    return not (record and record["max_new_tokens"] == max_new_tokens
                and record["mix_fingerprint"] == mix_fingerprint(mix) and (cache / RATIONALES).is_file()
                and sha256_file(cache / RATIONALES) == record["sha256"])


def field_differences(fields: dict, expect: dict) -> list[str]:
    """'name: cache has X, run expects Y' for every expected field that differs."""
    unknown = sorted(set(expect) - set(fields))
    if unknown:
        raise ValueError(f"unknown cache fields {unknown}; known: {sorted(fields)}")
    # Python's == already takes 2 and 2.0 as equal (temperatures come as ints from YAML / papermill) and, unlike
    # float(), keeps ints above 2**53 apart (a seed)
    return [f"{name}: cache has {fields[name]!r}, run expects {value!r}"
            for name, value in expect.items() if fields[name] != value]
