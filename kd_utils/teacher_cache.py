"""Teacher-logit cache: the teacher runs once over the training rows, students distill from disk.

What is stored, per training example and per next-token position of its tokenized row
(``batches.tokenize_example``, so every position that fkl / rkl may distill), for one
(temperature tau, noise sigma) setting:

- ``topk``: the k most likely ids of p_T = softmax((logits + noise) / tau) and their
  log-probs; the tail mass is implied, 1 - sum exp(log-probs) (``losses.forward_kl_topk`` /
  ``reverse_kl_topk`` treat it as one extra bucket). Log-probs are stored in float16,
  rounded to nearest, except rows whose tail would shrink below half (then toward -inf:
  a tail rounded to 0 would make reverse KL infinite).
- ``sampled``: the ids of ``num_samples`` systematic draws from p_T (one uniform offset per
  position, draws at evenly spaced points of the CDF; one uint16 id per draw) and the
  teacher's entropy (float32); ``losses.forward_kl_sampled`` is then an unbiased estimate
  of forward KL and of its gradient (Anshumann et al., ACL 2025), with less variance than
  independent draws.
- ``topk_sampled``: the k most likely ids with their log-probs (float16, with ``topk``'s tail guard), plus the ids of
  ``num_samples`` systematic draws from the tail (p_T without those k), each weighted
  tail mass / num_samples, and the entropy. Still unbiased for forward KL
  (``forward_kl_sampled`` with the weights as counts), with only the tail's variance.

Ids are uint16 when the vocabulary fits (SmolLM2, Llama), int32 otherwise; with
``id_coding="elias_fano"`` the draws' ids are stored sorted and Elias-Fano coded
(``kd_utils.id_codes``, exact, ~2 + log2(V / n) bits each), so more draws fit the same bytes.

Per epoch: a cache is made for the students' number of epochs E (``epochs``, in the key) and
stores E draw sets; epoch e (from 1) reads set (e - 1) mod E, so no epoch refits the sample an
earlier one saw, and a resumed run reads the set an uninterrupted one reads. Each set has its
own tail draws (``sampled``, ``topk_sampled``) and, with sigma > 0, its own Gaussian noise on
the teacher logits (added before tempering), from generators seeded by (seed, example id, set):
each set is on its own an unbiased sample of the objective. Within an epoch the noise is fixed
per position, where the online teacher draws it afresh at every step (the same within one pass
over the data). A cache with nothing random (``topk``, sigma = 0) stores one set. Every set
costs its full bytes (only the input ids are shared): the manifest gives bytes per distilled
token in all and per set.

Layout: ``<output_dir>/<key>/`` with ``shard-NNNNN.safetensors`` (flat arrays + per-example
lengths + the cached input ids, example ids in the metadata), a ``shard-NNNNN.json``
record (sha256, size, example ids hash) written after each shard, ``manifest.json`` and
optionally ``rationales.jsonl`` (the teacher's greedy generations, for seqkd / fidelity).
The key is the sha256 of the canonical JSON of every input that changes the content
(``cache_fields``); the manifest stores those fields in clear. Every file is written to a
temporary name and renamed. A rerun skips shards whose record and checksum match, and
regenerates missing, truncated or corrupt ones. Under ``accelerate launch -m kd_utils.teacher_cache
PARAMS`` (``--cpu`` on CPUs), shard i is written by rank i % world_size and the main process
writes the manifest.

Defaults, from ``benchmarks/teacher_cache_tradeoff.py`` (embedded SmolLM2-135M teacher, a
10-layer LoRA student cut from it, the math mix, max_length 128; tables, with each figure's
scope, in benchmarks/README.md). The figures are narrow: the format-4 rerun (2-core CPU, load
0.3-1.9) rests on 3 seeds and 3 timing rounds of 8 training and 8 held-out rows, 2 epochs.

- ``topk_sampled`` with k = 4 and 20 tail draws per epoch set: 62 bytes per distilled token and
  set (uint16 ids, float16 log-probs, float32 entropy, the input id). Kept as the default at
  tau = 1 and 2: unbiased; its students ended within 0.07% of the online student's held-out KL
  on every seed at both temperatures; its per-position gradient error is the lowest measured at
  tau = 1 (3.5%, ``sampled`` 28 draws 7.1%; the floor for 29 stored ids,
  ``unbiased_variance_floor``, is 2.5%), and at tau = 2 ``sampled`` is lower by about a point
  (50.9% against 52.1%; floor 45.5%), too little to carry a per-temperature default. The error
  is independent between positions and shrinks where they add up (1.1% at the output layer at
  tau = 1). An epoch from it ran 1.48-1.68x as fast as online at this tiny size; with generation
  counted it paid off after 2.0-2.7 epochs. Elias-Fano coded ids (``id_coding``) fit 4 + 26
  draws in 64 bytes, with 13-17% less gradient error (one batch; no student distilled from it yet).
- ``topk`` fits 64 bytes up to k = 14 (58 bytes). It is biased: fkl is 9-13% low at tau = 1
  and 55-59% low at tau = 2 in the format-3 run (3-4% and 39-43% in the rerun), and
  top-k + tail reverse KL misses most of the loss of a student
  far from the teacher (format-3 run: its student ended 20% above the online student's
  held-out KL at tau = 2). rkl needs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from kd_utils import id_codes, losses, precision as precisions
from kd_utils.constants import (CACHE_ID_CODINGS, CACHE_REPRESENTATIONS, DEFAULT_CACHE_K, DEFAULT_CACHE_NUM_SAMPLES,
                                DEFAULT_CACHE_REPRESENTATION, MIN_MAX_LENGTH, SPARSE_KD_METHODS, cacheable_methods)
from kd_utils.batches import collate, forward, split_train_val, tokenize_example
from kd_utils.data import Example, build_training_mix, cache_dir, mix_fingerprint
from kd_utils.evaluation import sample_examples
from kd_utils.io import read_json, sha256_file, run_from_params_file, write_atomic
from kd_utils.models import check_adapter_dir, load_model, load_tokenizer, resolve_model_path

CACHE_FORMAT_VERSION = 4  # 4: one draw set per epoch; rationales record whether each generation finished
# the settings a study file validates without this module (kd_utils.constants); the representation's choice
# is argued in the module docstring
REPRESENTATIONS, ID_CODINGS = CACHE_REPRESENTATIONS, CACHE_ID_CODINGS
DEFAULT_REPRESENTATION, DEFAULT_K, DEFAULT_NUM_SAMPLES = (DEFAULT_CACHE_REPRESENTATION, DEFAULT_CACHE_K,
                                                          DEFAULT_CACHE_NUM_SAMPLES)
LOGPROB_DTYPE = torch.float16
MANIFEST = "manifest.json"
RATIONALES = "rationales.jsonl"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


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


def cache_fields(teacher_hash: str, adapter_hash: str | None, task_aware_teacher: bool, tokenizer_fp: str,
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


def validate_settings(representation: str, k: int, num_samples: int, temperatures, noise_sigmas,
                      epochs: int = 1, id_coding: str = "fixed") -> None:
    """Raise ValueError naming the first bad argument, before any work."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation={representation!r} is not one of {', '.join(REPRESENTATIONS)}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if id_coding not in ID_CODINGS:
        raise ValueError(f"id_coding={id_coding!r} is not one of {', '.join(ID_CODINGS)}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not list(temperatures) or not list(noise_sigmas):
        raise ValueError("temperatures and noise_sigmas must each hold at least one value")
    for tau in temperatures:
        if not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
    for sigma in noise_sigmas:
        if not sigma >= 0:
            raise ValueError(f"noise sigma must be >= 0, got {sigma}")


# ---- encoding --------------------------------------------------------------------------------

def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


def _tail(logprobs: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(logprobs.double().logsumexp(-1))


def quantize_logprobs(logprobs: torch.Tensor, dtype: torch.dtype, covers_vocab: bool) -> torch.Tensor:
    """Top-k log-probs [n, k] in ``dtype``, rounded to nearest (unbiased).

    A row whose implied tail 1 - sum exp would fall below half the true one (a tiny tail can
    round to 0, and reverse KL is then infinite) is rounded toward -inf instead, which can
    only enlarge the tail.
    """
    nearest = logprobs.to(dtype)
    if dtype == logprobs.dtype or covers_vocab:
        return nearest
    low = _tail(nearest) < 0.5 * _tail(logprobs)
    if not low.any():
        return nearest
    down = torch.where(nearest.to(logprobs.dtype) > logprobs,
                       torch.nextafter(nearest, torch.full_like(nearest, -math.inf)), nearest)
    return torch.where(low[:, None], down, nearest)


def encode(logits: torch.Tensor, fields: dict, generator: torch.Generator | None = None,
           logprob_dtype: torch.dtype = LOGPROB_DTYPE) -> dict[str, torch.Tensor]:
    """Sparse storage tensors for teacher ``logits`` [n, V] (noise already added) at ``fields``' setting."""
    tau, ids_as = fields["temperature"], id_dtype(logits.shape[-1])
    if fields["representation"] == "topk":
        k = min(fields["k"], logits.shape[-1])
        ids, logprobs = losses.teacher_topk(logits[None], k, tau)
        return {"ids": ids[0].to(ids_as),
                "logprobs": quantize_logprobs(logprobs[0], logprob_dtype, covers_vocab=k == logits.shape[-1])}
    draw = dict(generator=generator, systematic=True, merge=False)
    if fields["representation"] == "sampled":
        ids, _, entropy = losses.teacher_samples(logits[None], fields["num_samples"], tau, **draw)
        return {"ids": ids[0].to(ids_as), "entropy": entropy[0].float()}
    # topk_sampled: the k largest probabilities exactly, then draws from the tail (p_T without them)
    top_ids, top_logprobs = losses.teacher_topk(logits[None], min(fields["k"], logits.shape[-1] - 1), tau)
    tail_ids, _, tail_entropy = losses.teacher_samples(logits.scatter(1, top_ids[0], -math.inf)[None],
                                                       fields["num_samples"], tau, **draw)
    # H(p) = -sum_top p log p + m H(tail) - m log m, m the tail mass: no third pass over the vocabulary
    top = top_logprobs[0].double()
    tail = _tail(top).clamp(min=0)
    # (a tail of only impossible tokens has mass 0 and no distribution: its entropy is nan)
    tail_part = torch.where(tail > 0, tail * tail_entropy[0].double(), 0.0)
    entropy = -torch.xlogy(top.exp(), top.exp()).sum(-1) + tail_part - torch.xlogy(tail, tail)
    return {"ids": torch.cat([top_ids[0], tail_ids[0]], 1).to(ids_as),
            "logprobs": quantize_logprobs(top_logprobs[0], logprob_dtype, covers_vocab=False),
            "entropy": entropy.float()}


def unbiased_variance_floor(p: torch.Tensor, n: int) -> torch.Tensor:
    """Per row of probabilities p [m, V]: the least total variance sum_v Var(p_hat_v) of any
    unbiased estimate p_hat of p with at most n nonzero entries (on average).

    If entry v is nonzero with probability pi_v, unbiasedness and Cauchy-Schwarz give
    E[p_hat_v^2] >= p_v^2 / pi_v; minimising sum_v p_v^2 / pi_v - p_v^2 under sum_v pi_v <= n,
    pi_v <= 1 gives pi_v = min(1, p_v / t) with sum_v min(1, p_v / t) = n (threshold sampling,
    Duffield, Lund & Thorup 2005), so the floor is sum over p_v < t of p_v (t - p_v). The
    forward-KL gradient of a sparse teacher estimate errs by exactly p_hat - p per position.
    """
    if n >= p.shape[-1]:
        return torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
    ps = p.sort(-1, descending=True).values
    tail = ps.flip(-1).cumsum(-1).flip(-1)  # tail[:, j] = sum of all but the j largest
    tail_sq = (ps * ps).flip(-1).cumsum(-1).flip(-1)
    kept = torch.arange(n, device=p.device)
    threshold = tail[:, :n] / (n - kept)  # when the j largest are kept exactly
    # the fewest exact entries whose threshold lies above the next probability (j = n - 1 always does)
    j = (ps[:, :n] <= threshold).float().argmax(-1, keepdim=True)
    return (threshold.gather(1, j) * tail.gather(1, j) - tail_sq.gather(1, j))[:, 0].clamp(min=0)


def decode(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Storage tensors -> the keyword arguments of the sparse losses (compute dtypes).

    topk: ids + log-probs. sampled: draw ids (weight 1 each) + entropy. topk_sampled: the k
    top ids weighted by their probabilities, then the draws, each weighted tail / num_draws.
    """
    ids = stored["ids"].to(torch.int64)
    if "entropy" not in stored:
        return {"topk_ids": ids, "topk_logprobs": stored["logprobs"].float()}
    weights = torch.ones(ids.shape)
    if "logprobs" in stored:
        k = stored["logprobs"].shape[-1]
        tail = _tail(stored["logprobs"]).clamp(min=0).float()
        weights[..., :k] = stored["logprobs"].float().exp()
        weights[..., k:] = tail[..., None] / (ids.shape[-1] - k)
    return {"sample_ids": ids, "sample_counts": weights, "teacher_entropy": stored["entropy"].float()}


def example_generator(seed: int, example_id: str, purpose: str) -> torch.Generator:
    """A generator fixed by (seed, example, purpose): draws do not depend on batching or sharding."""
    digest = hashlib.sha256(f"{seed}\0{example_id}\0{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def pack_ids(stored: dict[str, torch.Tensor], fields: dict) -> dict[str, torch.Tensor]:
    """Storage tensors with the draws' ids Elias-Fano coded into ``draw_codes`` when ``fields["id_coding"]`` says
    so (``kd_utils.id_codes``; the draws come sorted); ``ids`` keeps the top-k ids, if any. Exact: ``unpack_ids``."""
    if fields["id_coding"] == "fixed":
        return stored
    n = fields["num_samples"]
    packed = {name: t for name, t in stored.items() if name != "ids"}
    if stored["ids"].shape[-1] > n:
        packed["ids"] = stored["ids"][..., :-n]
    return {**packed, "draw_codes": id_codes.encode(stored["ids"][..., -n:].long(), fields["vocab_size"])}


def unpack_ids(stored: dict[str, torch.Tensor], fields: dict) -> dict[str, torch.Tensor]:
    """``pack_ids`` undone: storage tensors [..., width] with the draws' ids back in ``ids``."""
    if "draw_codes" not in stored:
        return stored
    codes = stored["draw_codes"]
    draws = id_codes.decode(codes.reshape(-1, codes.shape[-1]), fields["num_samples"], fields["vocab_size"])
    draws = draws.view(*codes.shape[:-1], -1).to(id_dtype(fields["vocab_size"]))
    head = [stored["ids"]] if "ids" in stored else []
    return {**{name: t for name, t in stored.items() if name != "draw_codes"}, "ids": torch.cat([*head, draws], -1)}


def encode_sets(logits: torch.Tensor, fields: dict, example_id: str) -> dict[str, torch.Tensor]:
    """Storage tensors [n, S, ...] of one example's n positions (teacher ``logits`` [n, V], no noise yet).

    Set s (S = ``stored_sets(fields)``) adds its own Gaussian noise and makes its own draws, from
    generators fixed by (seed, example, s): every set is an independent sample of the objective,
    the same whichever sigma, batch or shard it is written with.
    """
    sets = []
    for s in range(stored_sets(fields)):
        noisy = logits
        if fields["noise_sigma"]:
            noise = torch.randn(logits.shape, generator=example_generator(fields["seed"], example_id, f"noise-{s}"))
            noisy = logits + fields["noise_sigma"] * noise
        sets.append(pack_ids(encode(noisy, fields, example_generator(fields["seed"], example_id, f"samples-{s}")),
                             fields))
    return {name: torch.stack([encoded[name] for encoded in sets], 1) for name in sets[0]}


# ---- generation ---------------------------------------------------------------------------------

def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _ids_hash(example_ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(example_ids).encode()).hexdigest()


def _write_shard(cache: Path, index: int, tensors: dict[str, torch.Tensor], example_ids: list[str]) -> dict:
    """One shard file, then its record (the record's presence marks the shard complete)."""
    data = st_save(tensors, metadata={"example_ids": json.dumps(example_ids)})
    write_atomic(cache / _shard_name(index), data)
    record = {"file": _shard_name(index), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
              "examples": len(example_ids), "positions": int((tensors["lengths"] - 1).sum()),
              "example_ids_sha256": _ids_hash(example_ids)}
    write_atomic(cache / f"shard-{index:05d}.json", json.dumps(record))
    return record


def _shard_done(cache: Path, index: int, example_ids: list[str]) -> bool:
    """A complete, uncorrupted shard holding exactly these examples."""
    record_path, shard = cache / f"shard-{index:05d}.json", cache / _shard_name(index)
    if not (record_path.is_file() and shard.is_file()):
        return False
    try:
        record = read_json(record_path)
        return (record["example_ids_sha256"] == _ids_hash(example_ids) and shard.stat().st_size == record["bytes"]
                and sha256_file(shard) == record["sha256"])
    except (ValueError, KeyError, TypeError):  # a truncated or unparsable record: regenerate the shard
        return False


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


@torch.no_grad()
def generate_cache(teacher, tokenizer, examples: list[Example], targets: dict[str | Path, dict],
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
        todo = [cache for cache in targets if not _shard_done(cache, index, ids)]
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
            _write_shard(cache, index, {**_concat(parts[cache]), "input_ids": input_ids, "lengths": lengths}, ids)
    state.wait_for_everyone()
    manifests = {}
    for cache, fields in targets.items():
        records = [read_json(cache / f"shard-{i:05d}.json") for i in range(n_shards)]
        positions = sum(r["positions"] for r in records)
        total = sum(r["bytes"] for r in records)
        sets = stored_sets(fields)
        manifest = {"key": cache.name, "fields": fields, "info": info or {}, "examples": len(rows),
                    "positions": positions, "bytes": total, "bytes_per_position": total / max(positions, 1),
                    "epoch_sets": sets, "bytes_per_position_per_set": total / max(positions, 1) / sets,
                    "shards": records}
        try:  # keep rationales written by an earlier run
            manifest["rationales"] = _read_manifest(cache).get("rationales")
        except ValueError:
            pass
        if state.is_main_process:
            write_atomic(cache / MANIFEST, json.dumps(manifest, indent=1))
        manifests[cache] = manifest
    state.wait_for_everyone()
    return manifests


def write_rationales(caches: list[Path], mix: list[Example], generated: list[Example], max_new_tokens: int) -> None:
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
        manifest = _read_manifest(cache)
        write_atomic(cache / MANIFEST, json.dumps({**manifest, "rationales": record}, indent=1))


# ---- consumption ----------------------------------------------------------------------------------

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


def field_differences(fields: dict, expect: dict) -> list[str]:
    """'name: cache has X, run expects Y' for every expected field that differs."""
    unknown = sorted(set(expect) - set(fields))
    if unknown:
        raise ValueError(f"unknown cache fields {unknown}; known: {sorted(fields)}")
    # Python's == already takes 2 and 2.0 as equal (temperatures come as ints from YAML / papermill) and, unlike
    # float(), keeps ints above 2**53 apart (a seed)
    return [f"{name}: cache has {fields[name]!r}, run expects {value!r}"
            for name, value in expect.items() if fields[name] != value]


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
            fields = _read_manifest(cache)["fields"]
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
    fields = [_read_manifest(c)["fields"] for c in caches]
    return ", ".join(sorted(name for name in fields[0] if any(f.get(name) != fields[0][name] for f in fields)))


def _read_manifest(cache: Path) -> dict:
    """The manifest of ``cache``, a ValueError naming the file when it is truncated, unparsable or lacks fields."""
    manifest = read_json(cache / MANIFEST)
    if not (isinstance(manifest, dict) and isinstance(manifest.get("fields"), dict)
            and isinstance(manifest.get("shards"), list)):
        raise ValueError(f"{cache / MANIFEST}: not a teacher cache manifest (no fields / shards)")
    return manifest


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
    manifest = _read_manifest(path)
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


def open_for_training(path: str | Path, tokenizer, train_examples: list[Example], method: str, temperature: float,
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


def cached_rationales(path: str | Path, examples: list[Example], max_new_tokens: int,
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


# ---- the stage ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """The examples a training run with these parameters uses (run_training + train's split)."""

    mix: list[Example]
    train: list[Example]
    val: list[Example]


def select_examples(domain: str, n_train: int | None, include_mawps: bool, data_dir, seed: int,
                    val_fraction: float) -> Selection:
    mix, _ = build_training_mix(domain, data_dir, include_mawps=include_mawps)
    mix = sample_examples(mix, n_train, seed)
    train, val = split_train_val(mix, val_fraction, seed)
    return Selection(mix, train, val)


def run_teacher_cache(teacher: str, output_dir, teacher_adapter: str | None = None, task_aware_teacher: bool = True,
                      domain: str = "math", n_train: int | None = None, include_mawps: bool = False, data_dir=None,
                      seed: int = 0, max_length: int = 256, val_fraction: float = 0.1,
                      representation: str = DEFAULT_REPRESENTATION, k: int = DEFAULT_K,
                      num_samples: int = DEFAULT_NUM_SAMPLES, temperatures=(1.0,), noise_sigmas=(0.0,),
                      epochs: int = 1, id_coding: str = "fixed", rationales: bool = False, rationale_max_new_tokens: int = 128, batch_size: int = 8,
                      shard_size: int = 256, precision: str = "auto") -> dict:
    """The teacher-logit stage from plain parameters: one cache per (temperature, sigma) under output_dir.

    Selects the training rows exactly as ``training.run_training`` with the same domain, n_train,
    include_mawps, data_dir, seed, max_length and val_fraction; complete caches are reused
    without loading the teacher. ``epochs``: the students' epochs (``TrainConfig.epochs``, 1 by
    default); each gets its own set of draws and noise. ``id_coding="elias_fano"`` stores the draws'
    ids sorted and Elias-Fano coded (``kd_utils.id_codes``: ~13 bits each for SmolLM2, exact). ``precision``
    (``kd_utils.precision``; ``auto``: bf16 autocast where the hardware has bf16) is recorded, resolved, in the
    summary and in each manifest's ``info``. Returns a summary with ``caches``: {(temperature, sigma): dir}.
    """
    temperatures, noise_sigmas = [float(t) for t in temperatures], [float(s) for s in noise_sigmas]
    validate_settings(representation, k, num_samples, temperatures, noise_sigmas, epochs, id_coding)
    if not (isinstance(shard_size, int) and shard_size >= 1 and isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"shard_size and batch_size must be ints >= 1, got {shard_size!r}, {batch_size!r}")
    if max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be >= {MIN_MAX_LENGTH}, got {max_length}")
    adapter = teacher_adapter if task_aware_teacher else None
    if adapter is not None:
        check_adapter_dir(adapter)
    started = time.perf_counter()
    resolved = precisions.resolve(precision)
    selected = select_examples(domain, n_train, include_mawps, data_dir, seed, val_fraction)
    if not selected.train:
        raise ValueError("the selection holds no training examples")
    tokenizer = load_tokenizer(teacher)
    identity = teacher_identity(teacher, teacher_adapter, task_aware_teacher)
    base = dict(teacher_hash=identity["teacher"], adapter_hash=identity["adapter"],
                task_aware_teacher=identity["task_aware_teacher"], tokenizer_fp=tokenizer_fingerprint(tokenizer), mix_fp=mix_fingerprint(selected.train),
                max_length=max_length, representation=representation, k=k, num_samples=num_samples, seed=seed,
                epochs=epochs, id_coding=id_coding, vocab_size=len(tokenizer.get_vocab()))
    settings = [(t, s) for t in temperatures for s in noise_sigmas]
    targets = {}
    for t, s in settings:
        fields = cache_fields(**base, temperature=t, noise_sigma=s)
        targets[Path(output_dir) / cache_key(fields)] = fields
    need_rationales = rationales and any(_rationales_missing(d, rationale_max_new_tokens, selected.mix)
                                         for d in targets)
    todo = {d: f for d, f in targets.items() if not _complete(d, f)}
    if todo or need_rationales:
        model, tokenizer = load_model(teacher, adapter=adapter, merge_adapter=True)
        info = {"precision": resolved, "teacher": str(teacher), "teacher_adapter": str(adapter) if adapter else None,
                "domain": domain,
                "n_train": n_train, "include_mawps": include_mawps, "val_fraction": val_fraction,
                "train_examples": len(selected.train)}
        if todo:
            generate_cache(model, tokenizer, selected.train, todo, batch_size, shard_size, info, resolved)
        if need_rationales:
            from kd_utils.teachers import teacher_rationales

            generated = teacher_rationales(model, tokenizer, selected.mix, rationale_max_new_tokens, batch_size,
                                           precision=resolved)
            write_rationales(list(targets), selected.mix, generated, rationale_max_new_tokens)
    manifests = {d: _read_manifest(d) for d in targets}
    first_fields = next(iter(targets.values()))
    per_cache = [{"temperature": t, "noise_sigma": s, "cache_dir": str(d), "positions": m["positions"],
                  "shards": len(m["shards"]), "bytes": m["bytes"], "epoch_sets": m["epoch_sets"],
                  "bytes_per_token": round(m["bytes_per_position"], 2),
                  "bytes_per_token_per_set": round(m["bytes_per_position_per_set"], 2)}
                 for (t, s), (d, m) in zip(settings, manifests.items())]
    return {"caches": {setting: str(d) for setting, d in zip(settings, targets)}, "per_cache": per_cache,
            "representation": representation, "k": first_fields["k"], "num_samples": first_fields["num_samples"],
            "train_examples": len(selected.train), "positions": per_cache[0]["positions"],
            "bytes_per_token": per_cache[0]["bytes_per_token"],
            "bytes_per_token_per_set": per_cache[0]["bytes_per_token_per_set"], "generated": [str(d) for d in todo],
            "rationales": bool(rationales),
            # what generated the caches (one made before precision was recorded: fp32)
            "precision": manifests[next(iter(targets))]["info"].get("precision", "fp32"), "seconds": round(time.perf_counter() - started, 2)}


def _complete(cache: Path, fields: dict) -> bool:
    """A manifest with these fields whose shards and shard records all check out."""
    try:
        manifest = _read_manifest(cache)
        # the per-shard records too: a later partial regeneration trusts them
        return manifest["fields"] == fields and all(
            (cache / r["file"]).is_file() and sha256_file(cache / r["file"]) == r["sha256"]
            and read_json(cache / r["file"].replace(".safetensors", ".json")) == r for r in manifest["shards"])
    except (ValueError, KeyError, TypeError):  # absent, truncated or malformed: regenerate
        return False


def _rationales_missing(cache: Path, max_new_tokens: int, mix: list[Example]) -> bool:
    try:
        record = _read_manifest(cache).get("rationales")
    except ValueError:
        return True
    return not (record and record["max_new_tokens"] == max_new_tokens
                and record["mix_fingerprint"] == mix_fingerprint(mix) and (cache / RATIONALES).is_file()
                and sha256_file(cache / RATIONALES) == record["sha256"])


def main(argv: list[str] | None = None) -> None:
    """Script entry point for ``accelerate launch`` (each process writes its own shards):

        accelerate launch --num_processes 4 -m kd_utils.teacher_cache outputs/<study>/runs/<cache run>/params.json
    """
    run_from_params_file(run_teacher_cache, argv, "python -m kd_utils.teacher_cache")


if __name__ == "__main__":
    main()
