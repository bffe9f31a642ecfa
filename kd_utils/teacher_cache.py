"""Teacher-logit cache: the teacher runs once over the training rows, students distill from disk.

For one (temperature tau, noise sigma) setting the cache stores, per training example and per
next-token position, a sparse form of the teacher's distribution: ``topk`` (k ids + log-probs,
tail mass implied; what rkl needs), ``sampled`` (systematic draws + the entropy, unbiased for
forward KL) or ``topk_sampled`` (the top k exactly + draws from the tail; the default), one set
of draws and noise per student epoch. Caches are content-addressed: an unchanged input is never
recomputed, a changed one never reused.

This module is the stage (``run_teacher_cache``) and the package's one name for the cache; the
parts live by job, and every name below stays importable from here:

- ``cache_config``: ``TeacherCacheConfig``, the run's settings, defaults and allowed values (no torch);
- ``cache_format``: the key and fields, file names, manifest and shard records, and their checks;
- ``cache_encoding``: distributions to arrays and back (top-k, systematic draws, Elias-Fano ids);
- ``cache_writer``: running the teacher and writing shards, manifest and rationales;
- ``cache_reader``: verifying a cache, finding the one that fits a run, serving training batches.

Under ``accelerate launch -m kd_utils.teacher_cache PARAMS`` (``--cpu`` on CPUs), shard i is written by
rank i % world_size and the main process writes the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_utils import precision as precisions
from kd_utils.batches import split_train_val
from kd_utils.cache_config import (
    DEFAULT_K,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_REPRESENTATION,
    ID_CODINGS,
    REPRESENTATIONS,
    SPARSE_KD_METHODS,
    TeacherCacheConfig,
    cacheable_methods,
    validate_settings,
)
from kd_utils.cache_encoding import (
    decode,
    encode,
    encode_sets,
    example_generator,
    id_dtype,
    pack_ids,
    quantize_logprobs,
    unbiased_variance_floor,
    unpack_ids,
)
from kd_utils.cache_format import (
    CACHE_FORMAT_VERSION,
    LOGPROB_DTYPE,
    MANIFEST,
    RATIONALES,
    WEIGHT_SUFFIXES,
    cache_complete,
    cache_fields,
    cache_key,
    field_differences,
    model_dir,
    rationales_missing,
    read_manifest,
    stored_sets,
    teacher_identity,
    tokenizer_fingerprint,
    weights_hash,
)
from kd_utils.cache_reader import TeacherCache, cached_rationales, find_cache, open_cache, open_for_training
from kd_utils.cache_writer import generate_cache, write_rationales
from kd_utils.data import Example, build_training_mix, mix_fingerprint
from kd_utils.evaluation import sample_examples
from kd_utils.io import run_from_params_file
from kd_utils.models import check_adapter_dir, load_model, load_tokenizer

__all__ = [
    "CACHE_FORMAT_VERSION", "DEFAULT_K", "DEFAULT_NUM_SAMPLES", "DEFAULT_REPRESENTATION", "ID_CODINGS",
    "LOGPROB_DTYPE", "MANIFEST", "RATIONALES", "REPRESENTATIONS", "SPARSE_KD_METHODS", "WEIGHT_SUFFIXES",
    "Selection", "TeacherCache", "TeacherCacheConfig", "cache_fields", "cache_key", "cacheable_methods",
    "cached_rationales", "decode", "encode", "encode_sets", "example_generator", "field_differences", "find_cache",
    "generate_cache", "id_dtype", "model_dir", "open_cache", "open_for_training", "pack_ids", "quantize_logprobs",
    "run_stage", "run_teacher_cache", "select_examples", "stored_sets", "teacher_identity", "tokenizer_fingerprint",
    "unbiased_variance_floor", "unpack_ids", "validate_settings", "weights_hash", "write_rationales",
]


@dataclass(frozen=True)
class Selection:
    """The examples a training run with these parameters uses (run_training + train's split)."""

    mix: list[Example]
    train: list[Example]
    val: list[Example]


def select_examples(domain: str, *, n_train: int | None, include_mawps: bool, data_dir, seed: int,
                    val_fraction: float) -> Selection:
    mix, _ = build_training_mix(domain, data_dir, include_mawps=include_mawps)
    mix = sample_examples(mix, n_train, seed)
    train, val = split_train_val(mix, val_fraction, seed)
    return Selection(mix, train, val)


def run_teacher_cache(teacher: str | Path, output_dir: str | Path, **settings: Any) -> dict:
    """The teacher-logit stage from plain parameters (what the notebook and ``python -m`` call).

    ``settings`` are the other ``TeacherCacheConfig`` fields, by keyword (an unknown one is a TypeError);
    see ``run_stage``.
    """
    return run_stage(TeacherCacheConfig(teacher=str(teacher), output_dir=str(output_dir), **settings))


def run_stage(config: TeacherCacheConfig) -> dict:
    """The teacher-logit stage: one cache per (temperature, sigma) under ``config.output_dir``.

    Selects the training rows exactly as ``training.run_training`` with the same domain, n_train,
    include_mawps, data_dir, seed, max_length and val_fraction; complete caches are reused
    without loading the teacher. ``epochs``: the students' epochs (``TrainConfig.epochs``, 1 by
    default); each gets its own set of draws and noise. ``id_coding="elias_fano"`` stores the draws'
    ids sorted and Elias-Fano coded (``kd_utils.id_codes``: ~13 bits each for SmolLM2, exact). ``precision``
    (``kd_utils.precision``; ``auto``: bf16 autocast where the hardware has bf16) is recorded, resolved, in the
    summary and in each manifest's ``info``. Returns a summary with ``caches``: {(temperature, sigma): dir}.
    """
    c = config.validate()
    adapter = c.teacher_adapter if c.task_aware_teacher else None
    if adapter is not None:
        check_adapter_dir(adapter)
    started = time.perf_counter()
    resolved = precisions.resolve(c.precision)
    selected = select_examples(c.domain, n_train=c.n_train, include_mawps=c.include_mawps, data_dir=c.data_dir,
                               seed=c.seed, val_fraction=c.val_fraction)
    if not selected.train:
        raise ValueError("the selection holds no training examples")
    tokenizer = load_tokenizer(c.teacher)
    identity = teacher_identity(c.teacher, c.teacher_adapter, c.task_aware_teacher)
    base = dict(teacher_hash=identity["teacher"], adapter_hash=identity["adapter"],
                task_aware_teacher=identity["task_aware_teacher"], tokenizer_fp=tokenizer_fingerprint(tokenizer),
                mix_fp=mix_fingerprint(selected.train), max_length=c.max_length, representation=c.representation,
                k=c.k, num_samples=c.num_samples, seed=c.seed, epochs=c.epochs, id_coding=c.id_coding,
                vocab_size=len(tokenizer.get_vocab()))
    settings = [(t, s) for t in c.temperatures for s in c.noise_sigmas]
    targets = {}
    for t, s in settings:
        fields = cache_fields(**base, temperature=t, noise_sigma=s)
        targets[Path(c.output_dir) / cache_key(fields)] = fields
    need_rationales = c.rationales and any(rationales_missing(d, c.rationale_max_new_tokens, selected.mix)
                                           for d in targets)
    todo = {d: f for d, f in targets.items() if not cache_complete(d, f)}
    if todo or need_rationales:
        model, tokenizer = load_model(c.teacher, adapter=adapter, merge_adapter=True)
        info = {"precision": resolved, "teacher": c.teacher, "teacher_adapter": str(adapter) if adapter else None,
                "domain": c.domain, "n_train": c.n_train, "include_mawps": c.include_mawps,
                "val_fraction": c.val_fraction, "train_examples": len(selected.train)}
        if todo:
            generate_cache(model, tokenizer, selected.train, targets=todo, batch_size=c.batch_size,
                           shard_size=c.shard_size, info=info, precision=resolved)
        if need_rationales:
            from kd_utils.teachers import teacher_rationales

            generated = teacher_rationales(model, tokenizer, selected.mix, c.rationale_max_new_tokens, c.batch_size,
                                           precision=resolved)
            write_rationales(list(targets), selected.mix, generated, max_new_tokens=c.rationale_max_new_tokens)
    manifests = {d: read_manifest(d) for d in targets}
    first_fields = next(iter(targets.values()))
    per_cache = [{"temperature": t, "noise_sigma": s, "cache_dir": str(d), "positions": m["positions"],
                  "shards": len(m["shards"]), "bytes": m["bytes"], "epoch_sets": m["epoch_sets"],
                  "bytes_per_token": round(m["bytes_per_position"], 2),
                  "bytes_per_token_per_set": round(m["bytes_per_position_per_set"], 2)}
                 for (t, s), (d, m) in zip(settings, manifests.items())]
    return {"caches": {setting: str(d) for setting, d in zip(settings, targets)}, "per_cache": per_cache,
            "representation": c.representation, "k": first_fields["k"], "num_samples": first_fields["num_samples"],
            "train_examples": len(selected.train), "positions": per_cache[0]["positions"],
            "bytes_per_token": per_cache[0]["bytes_per_token"],
            "bytes_per_token_per_set": per_cache[0]["bytes_per_token_per_set"], "generated": [str(d) for d in todo],
            "rationales": bool(c.rationales),
            # what generated the caches (one made before precision was recorded: fp32)
            "precision": manifests[next(iter(targets))]["info"].get("precision", "fp32"),
            "seconds": round(time.perf_counter() - started, 2)}


def main(argv: list[str] | None = None) -> None:
    """Script entry point for ``accelerate launch`` (each process writes its own shards):

        accelerate launch --num_processes 4 -m kd_utils.teacher_cache outputs/<study>/runs/<cache run>/params.json
    """
    run_from_params_file(run_teacher_cache, argv, "python -m kd_utils.teacher_cache")


if __name__ == "__main__":
    main()
