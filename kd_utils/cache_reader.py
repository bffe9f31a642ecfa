"""Reading a teacher cache for training: verify it, find the one that fits a run, serve padded batches of targets.

``open_for_training`` is what a student run calls: it refuses a cache made for another teacher, tokenizer,
data, temperature, noise, max_length, epochs or seed, naming each differing field. ``TeacherCache.targets``
is the teacher-source interface of ``kd_utils.teachers``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from kd_utils.cache_config import SPARSE_KD_METHODS, cacheable_methods
from kd_utils.cache_encoding import decode, unpack_ids
from kd_utils.cache_format import (
    CACHE_FORMAT_VERSION,
    MANIFEST,
    cache_key,
    field_differences,
    read_manifest,
    tokenizer_fingerprint,
)
from kd_utils.data import Example, mix_fingerprint
from kd_utils.io import sha256_file


class TeacherCache:
    """A verified cache in memory: per-example sparse teacher tensors, and padded batches of them."""

    def __init__(self, path: Path, manifest: dict, shards: list[dict[str, torch.Tensor]], shard_ids: list[list[str]]):
        self.path, self.manifest, self.fields = path, manifest, manifest["fields"]
        self.representation = self.fields["representation"]
        self._shards = shards
        self._index: dict[str, tuple[int, int, int, int]] = {}  # id -> (shard, token start, position start, length)
        for s, (tensors, ids) in enumerate(zip(shards, shard_ids)):
            token, position = 0, 0
            for example_id, length in zip(ids, tensors["lengths"].tolist()):
                self._index[example_id] = (s, token, position, length)
                token, position = token + length, position + length - 1

    @property
    def sets(self) -> int:
        """The draw sets stored (``stored_sets``): epoch e (from 1) reads set (e - 1) mod sets."""
        return int(next(t for name, t in self._shards[0].items() if name not in ("input_ids", "lengths")).shape[1])

    def example(self, example_id: str) -> dict[str, torch.Tensor]:
        """``input_ids`` [L] and the storage tensors [L - 1, sets, ...] of the L - 1 next-token positions."""
        if example_id not in self._index:
            raise ValueError(f"example {example_id!r} is not in the teacher cache {self.path}")
        s, token, position, length = self._index[example_id]
        tensors = self._shards[s]
        out = {name: t[position:position + length - 1] for name, t in tensors.items()
               if name not in ("input_ids", "lengths")}
        return {"input_ids": tensors["input_ids"][token:token + length].to(torch.int64), **unpack_ids(out, self.fields)}

    def batch(self, batch: dict, device: torch.device | str | None = None, epoch: int = 1) -> dict[str, torch.Tensor]:
        """The sparse losses' teacher arguments, [B, T - 1, width], for a right-padded collated batch,
        from the draw set of ``epoch`` (counted from 1).

        Position t predicts token t + 1, as ``student_logits[:, :-1]``. Padding positions hold a
        valid dummy distribution (they are outside every distill mask). Raises ValueError when a
        row's input ids differ from the cached ones.
        """
        chosen = (epoch - 1) % self.sets
        input_ids, attention = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
        B, T = input_ids.shape
        rows = [self.example(example_id) for example_id in batch["ids"]]
        out = {name: torch.zeros((B, max(T - 1, 0), *t.shape[2:]), dtype=t.dtype)
               for name, t in rows[0].items() if name != "input_ids"}
        out["ids"] = out["ids"].long()
        if "logprobs" in out:  # distinct top ids, uniform over them
            k = out["logprobs"].shape[-1]
            out["ids"][..., :k] = torch.arange(k)
            out["logprobs"].fill_(-math.log(k))
        for b, (example_id, cached) in enumerate(zip(batch["ids"], rows)):
            L = len(cached["input_ids"])
            if int(attention[b].sum()) != L or not torch.equal(input_ids[b, :L], cached["input_ids"]):
                raise ValueError(f"example {example_id!r}: the batch's input ids differ from those in the teacher "
                                 f"cache {self.path} (another tokenizer, max_length, prompt or rationale?)")
            for name in out:
                out[name][b, :L - 1] = cached[name][:, chosen].to(out[name].dtype)
        return {name: t.to(device) if device is not None else t for name, t in decode(out).items()}

    def targets(self, batch: dict, device=None, epoch: int = 1) -> dict[str, torch.Tensor]:
        """The teacher-source interface (``kd_utils.teachers``): this batch's sparse targets in ``epoch``."""
        return self.batch(batch, device, epoch)

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def rationales(self) -> dict[str, dict]:
        """The teacher's generations by example id: {"rationale": text, "complete": ended at EOS}
        (ValueError when the cache has none)."""
        record = self.manifest.get("rationales")
        if not record:
            raise ValueError(f"teacher cache {self.path} holds no rationales (run_teacher_cache(rationales=True))")
        path = self.path / record["file"]
        if sha256_file(path) != record["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the manifest's (corrupt file); regenerate the cache")
        return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


def open_cache(path: str | Path, expect: dict | None = None) -> TeacherCache:
    """Load a cache after checking it: format version, the ``expect``ed fields, every shard's sha256.

    ``path`` is a cache directory, or a ``run_teacher_cache`` output_dir holding several: the
    one matching ``expect`` is used (``find_cache``).

    ``expect`` maps manifest field names (tokenizer, temperature, noise_sigma, mix_fingerprint,
    max_length, representation, ...) to the values the student run uses; a ValueError names
    every field that differs, with both values.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() and any(path.glob(f"*/{MANIFEST}")):
        path = find_cache(path, expect or {})
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{path} is not a teacher cache: {MANIFEST} is missing (generation unfinished?)")
    manifest = read_manifest(path)
    fields = manifest["fields"]
    differences = field_differences(fields, {"format_version": CACHE_FORMAT_VERSION, **(expect or {})})
    if differences:
        raise ValueError(f"teacher cache {path} does not fit this run: " + "; ".join(differences))
    if cache_key(fields) != path.name:
        raise ValueError(f"teacher cache {path}: its fields hash to key {cache_key(fields)}, not the directory's "
                         f"name (manifest edited or the directory renamed); regenerate it with run_teacher_cache")
    shards, shard_ids = [], []
    for record in manifest["shards"]:
        shard = path / record["file"]
        data = shard.read_bytes() if shard.is_file() else b""
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["sha256"]:
            raise ValueError(f"{shard}: sha256 {digest[:12]}... differs from the manifest's {record['sha256'][:12]}... "
                             f"({len(data)} of {record['bytes']} bytes; corrupt or truncated): rerun "
                             "run_teacher_cache to regenerate it")
        shards.append(st_load(data))
        shard_ids.append(json.loads(_safetensors_metadata(data)["example_ids"]))
    return TeacherCache(path, manifest, shards, shard_ids)


def _safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__", {})


def open_for_training(path: str | Path, *, tokenizer, train_examples: list[Example], method: str, temperature: float,
                      noise_sigma: float, max_length: int, epochs: int, expect: dict | None = None) -> TeacherCache:
    """The cache at ``path`` after checking that it fits this training run (ValueError naming each differing field).

    The cache must be made for the run's ``epochs``: one draw set per epoch, none read twice.

    ``expect`` adds the fields the run knows beyond the data and the temperature: ``teacher_identity``
    and the seed from ``run_training``; representation, k or num_samples when the caller names them.
    """
    if method not in SPARSE_KD_METHODS:
        why = ("gkd's on-policy batches need the online teacher: pass teacher instead of teacher_cache"
               if method == "gkd" else "a teacher cache serves fkl and rkl only")
        raise ValueError(f"method {method!r} cannot train from teacher_cache: {why}")
    cache = open_cache(path, expect={
        "tokenizer": tokenizer_fingerprint(tokenizer), "temperature": temperature, "noise_sigma": noise_sigma,
        "mix_fingerprint": mix_fingerprint(train_examples), "max_length": max_length, "epochs": epochs,
        **(expect or {})})
    if method not in cacheable_methods(cache.representation):
        raise ValueError(f"method {method!r} needs a 'topk' teacher cache (the top-k + tail partition); "
                         f"{path} holds representation {cache.representation!r}")
    return cache


def cached_rationales(path: str | Path, examples: list[Example], max_new_tokens: int, *,
                      expect: dict | None = None) -> list[Example]:
    """seqkd's training set from the rationales stored in a cache (same contract as ``teachers.teacher_rationales``)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():  # a stage's caches (one per temperature, sigma) hold the same rationales
        matches, _ = _matching_caches(path, expect or {})
        path = matches[0] if matches else find_cache(path, expect or {})
    cache = open_cache(path, expect)
    record = cache.manifest.get("rationales") or {}
    differences = field_differences(
        {"max_new_tokens": record.get("max_new_tokens"), "mix_fingerprint": record.get("mix_fingerprint")},
        {"max_new_tokens": max_new_tokens, "mix_fingerprint": mix_fingerprint(examples)})
    if differences:
        raise ValueError(f"the rationales in teacher cache {path} do not fit this run: " + "; ".join(differences))
    generated = cache.rationales()
    return [Example(e.id, e.task, e.domain, e.instruction, e.input, e.answer, generated[e.id]["rationale"],
                    complete=generated[e.id]["complete"]) for e in examples]


def find_cache(root: str | Path, expect: dict) -> Path:
    """The one cache under ``root`` (a ``run_teacher_cache`` output_dir) whose fields match ``expect``.

    A study's cache run writes one cache per (temperature, sigma); each student run finds its own.
    """
    root = Path(root)
    matches, report = _matching_caches(root, expect)
    if len(matches) > 1:
        raise ValueError(f"{len(matches)} teacher caches under {root} fit this run, so which one to use is "
                         f"ambiguous: {', '.join(m.name for m in matches)}; name the fields that tell them apart "
                         f"({_distinguishing(matches)}) or pass one cache directory")
    if matches:
        return matches[0]
    raise ValueError(f"no teacher cache under {root} fits this run ({len(report)} found)"
                     + "".join(f"\n  {line}" for line in report))


def _matching_caches(root: Path, expect: dict) -> tuple[list[Path], list[str]]:
    """The caches under ``root`` whose fields match ``expect``, and why each other one does not."""
    candidates = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    matches, report = [], []
    for cache in candidates:
        try:
            fields = read_manifest(cache)["fields"]
        except ValueError as err:
            report.append(f"{cache.name}: unreadable ({err})")
            continue
        if fields.get("format_version") != CACHE_FORMAT_VERSION:  # an older cache lacks newer fields: say why
            report.append(f"{cache.name}: cache format {fields.get('format_version')}, this version reads "
                          f"{CACHE_FORMAT_VERSION} (regenerate it)")
            continue
        differences = field_differences(fields, expect)
        if differences:
            report.append(f"{cache.name}: " + "; ".join(differences))
        else:
            matches.append(cache)
    return matches, report


def _distinguishing(caches: list[Path]) -> str:
    fields = [read_manifest(c)["fields"] for c in caches]
    return ", ".join(sorted(name for name in fields[0] if any(f.get(name) != fields[0][name] for f in fields)))
