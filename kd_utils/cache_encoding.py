"""How the teacher's next-token distributions become the cache's arrays, and back into the sparse losses' inputs.

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
"""

from __future__ import annotations

import hashlib
import math

import torch

from kd_utils import id_codes, losses
from kd_utils.cache_format import LOGPROB_DTYPE, stored_sets


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
