"""Running the teacher over the training rows and writing the cache's shards, manifest and rationales.

Shard i of a cache is written by process i % world_size (``accelerate launch``); the main process writes
the manifest. Every file goes to a temporary name and is renamed; a shard's record, written after it, marks
it complete, so a killed run resumes at the first shard without one (``cache_format.shard_done``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from kd_utils import precision as precisions
from kd_utils.batches import collate, forward, tokenize_example
from kd_utils.cache_encoding import encode_sets, id_dtype
from kd_utils.cache_format import (
    MANIFEST,
    RATIONALES,
    ids_hash,
    read_manifest,
    record_name,
    shard_done,
    shard_name,
    stored_sets,
)
from kd_utils.data import Example, mix_fingerprint
from kd_utils.io import read_json, write_atomic


def write_shard(cache: Path, index: int, tensors: dict[str, torch.Tensor], *, example_ids: list[str]) -> dict:
    """One shard file, then its record (the record's presence marks the shard complete)."""
    data = st_save(tensors, metadata={"example_ids": json.dumps(example_ids)})
    name = shard_name(index)
    write_atomic(cache / name, data)
    record = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
              "examples": len(example_ids), "positions": int((tensors["lengths"] - 1).sum()),
              "example_ids_sha256": ids_hash(example_ids)}
    write_atomic(cache / record_name(name), json.dumps(record))
    return record


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@torch.no_grad()
def generate_cache(teacher, tokenizer, examples: list[Example], *, targets: dict[str | Path, dict],
                   batch_size: int = 8, shard_size: int = 256, info: dict | None = None,
                   precision: str = "fp32") -> dict[Path, dict]:
    """Write (or complete) one cache per target directory; returns each one's manifest.

    ``targets`` maps a directory to its ``cache_fields``; all must share max_length (one teacher
    forward pass serves every setting). Rows are ``tokenize_example`` of
    ``examples`` with that max_length, in order; shard i holds rows [i*shard_size, (i+1)*shard_size).
    The teacher's forward passes run under ``precision``'s autocast (a resolved precision, ``kd_utils.precision``).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    targets = {Path(d): f for d, f in targets.items()}
    shared = {f["max_length"] for f in targets.values()}
    if len(shared) != 1:
        raise ValueError(f"targets must share max_length, got {sorted(shared)}")
    (max_length,) = shared
    # PartialState, not Accelerator: no mixed-precision setting to clash with a later train() in this process.
    # It reads `accelerate launch --cpu` (ACCELERATE_USE_CPU) only when told, as Accelerator does itself.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    teacher = teacher.to(state.device).eval()
    vocab_size = len(tokenizer.get_vocab())
    if any(f["vocab_size"] != vocab_size for f in targets.values()):
        raise ValueError(f"targets' vocab_size must be the tokenizer's ({vocab_size}), got "
                         f"{sorted({f['vocab_size'] for f in targets.values()})}")
    rows = [tokenize_example(tokenizer, e, max_length) for e in examples]
    n_shards = math.ceil(len(rows) / shard_size)
    for cache in targets:
        cache.mkdir(parents=True, exist_ok=True)
    mine = range(state.process_index, n_shards, state.num_processes)
    for index in tqdm(mine, desc="teacher cache shards", disable=not state.is_local_main_process):
        shard_rows = rows[index * shard_size:(index + 1) * shard_size]
        ids = [r["id"] for r in shard_rows]
        todo = [cache for cache in targets if not shard_done(cache, index, ids)]
        if not todo:
            continue
        parts: dict[Path, list[dict]] = {cache: [] for cache in todo}
        for start in range(0, len(shard_rows), batch_size):
            micro = shard_rows[start:start + batch_size]
            batch = {k: v.to(state.device) if torch.is_tensor(v) else v
                     for k, v in collate(micro, tokenizer.pad_token_id).items()}
            with precisions.autocast(precision, state.device):
                logits = forward(teacher, batch)
            logits = logits.float()[..., :vocab_size].cpu()
            for b, row in enumerate(micro):
                n = len(row["input_ids"]) - 1  # next-token positions of this row
                for cache in todo:
                    parts[cache].append(encode_sets(logits[b, :n], targets[cache], row["id"]))
        input_ids = torch.tensor([t for r in shard_rows for t in r["input_ids"]]).to(id_dtype(vocab_size))
        lengths = torch.tensor([len(r["input_ids"]) for r in shard_rows], dtype=torch.int32)
        for cache in todo:
            tensors = {**_concat(parts[cache]), "input_ids": input_ids, "lengths": lengths}
            write_shard(cache, index, tensors, example_ids=ids)
    state.wait_for_everyone()
    manifests = {}
    for cache, fields in targets.items():
        records = [read_json(cache / record_name(shard_name(i))) for i in range(n_shards)]
        positions = sum(r["positions"] for r in records)
        total = sum(r["bytes"] for r in records)
        sets = stored_sets(fields)
        manifest = {"key": cache.name, "fields": fields, "info": info or {}, "examples": len(rows),
                    "positions": positions, "bytes": total, "bytes_per_position": total / max(positions, 1),
                    "epoch_sets": sets, "bytes_per_position_per_set": total / max(positions, 1) / sets,
                    "shards": records}
        try:  # keep rationales written by an earlier run
            manifest["rationales"] = read_manifest(cache).get("rationales")
        except ValueError:
            pass
        if state.is_main_process:
            write_atomic(cache / MANIFEST, json.dumps(manifest, indent=1))
        manifests[cache] = manifest
    state.wait_for_everyone()
    return manifests


def write_rationales(caches: list[Path], mix: list[Example], generated: list[Example], *,
                     max_new_tokens: int) -> None:
    """The teacher's generations on ``mix`` (``teachers.teacher_rationales``) as JSONL in each cache, recorded in
    its manifest.

    Each line keeps whether the generation finished (ended at EOS): a cut one must get no EOS in training.
    """
    text = "".join(json.dumps({"id": e.id, "rationale": e.rationale, "complete": e.complete}, ensure_ascii=False)
                   + "\n" for e in generated)
    record = {"file": RATIONALES, "sha256": hashlib.sha256(text.encode()).hexdigest(),
              "max_new_tokens": max_new_tokens, "mix_fingerprint": mix_fingerprint(mix), "examples": len(generated)}
    for cache in caches:
        write_atomic(cache / RATIONALES, text)
        manifest = read_manifest(cache)
        write_atomic(cache / MANIFEST, json.dumps({**manifest, "rationales": record}, indent=1))
