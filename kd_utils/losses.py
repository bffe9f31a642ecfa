"""Token-level distillation losses, computed in chunks of positions.

Notation: p_T = softmax(teacher_logits / tau), p_S = softmax(student_logits / tau),
KL(p || q) = sum_v p_v (log p_v - log q_v), taken as 0 where p_v = 0.

Reductions (fixed by the project contract):
- forward_kl, reverse_kl and their top-k / sampled variants: mean over the mask
  positions of each sequence, then mean over the sequences that have at least one
  mask position (all-masked-out sequences are excluded), times tau**2.
- generalized_jsd: mean over all mask positions of the batch, pooled; no tau**2.
An all-zero mask gives 0 that is still connected to student_logits in the graph.

Memory: the masked positions are processed `chunk_size` rows at a time inside one
autograd Function that saves only its inputs and recomputes each chunk in
backward, so the only buffer that grows with B*T*V is the returned gradient, in
the student's dtype, preallocated once and written chunk by chunk. Each chunk is
computed in float32 (float64 for float64 inputs) with in-place operations, so at
most four [chunk_size, V] buffers of that dtype are alive at once (forward_kl and
reverse_kl: three). The default chunk_size (None) takes CHUNK_ELEMENTS // V rows
(110 rows, 64 MiB per float32 buffer, for a 151936-token vocabulary). The loss is
returned in the compute dtype, the gradient in the student's. Teacher-side tensors
are detached: no gradient ever flows to the teacher.
"""

import math
from functools import partial

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows per chunk when chunk_size is None: CHUNK_ELEMENTS // V, i.e. 64 MiB per float32
# [chunk, V] temporary whatever the vocabulary (110 rows of Qwen's 151936 tokens, 341 of
# SmolLM2's 49152): small against the logits themselves, large enough that the Python
# loop costs nothing.
CHUNK_ELEMENTS = 2**24
DEFAULT_CHUNK_SIZE = None


def auto_chunk_size(vocab_size: int) -> int:
    """Rows per chunk for chunk_size=None: CHUNK_ELEMENTS // vocab_size, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------
# per-chunk divergences: (log p_S rows [n, V], teacher rows..., need_grad) ->
# (divergence per row [n], d divergence / d (student_logits / tau) [n, V] or None)


def _xlogratio(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """p * (log p - log q), with 0 where p == 0 so that -inf logits are allowed (NaN stays NaN)."""
    return torch.where(p == 0, 0.0, p * (logp - logq))


def _xlogratio_(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    """_xlogratio written into logp's buffer (logp is consumed)."""
    return logp.sub_(logq).mul_(p).masked_fill_(p == 0, 0.0)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else NEG_INF


def _tempered_log_softmax(logits: Tensor, temperature: float, dtype: torch.dtype, owned: bool = False) -> Tensor:
    """log_softmax(logits / tau) in dtype; owned=True: logits is a scratch copy that may be overwritten."""
    x = logits.to(dtype)
    if temperature != 1:
        x = x.div_(temperature) if owned or x is not logits else x / temperature
    return x.log_softmax(-1)


# The dense divergences get the student's log-probs `logq` and the teacher's rows as
# scratch copies that they may overwrite (the chunk loop keeps no other reference).


def _fkl(logq, teacher, need_grad, temperature):
    logp = _tempered_log_softmax(teacher, temperature, logq.dtype, owned=True)
    del teacher
    p = logp.exp()
    if need_grad:  # backward: only the gradient q - p is used
        del logp
        return None, logq.exp_().sub_(p)
    return _xlogratio_(p, logp, logq).sum(-1), None


def _rkl(logq, teacher, need_grad, temperature):
    logp = _tempered_log_softmax(teacher, temperature, logq.dtype, owned=True)
    del teacher
    q = logq.exp()
    terms = _xlogratio_(q, logq, logp)  # in logq's buffer
    loss = terms.sum(-1)
    # d/ds_j = q_j (log q_j - log p_j - KL)
    return loss, (terms.sub_(q.mul_(loss[:, None])) if need_grad else None)


def _jsd(logq, teacher, need_grad, temperature, beta):
    logp = _tempered_log_softmax(teacher, temperature, logq.dtype, owned=True)
    del teacher
    log_b, log_1mb = _log(beta), _log(1 - beta)  # -inf at the ends keeps beta = 0, 1 exact
    logm = logq + log_b
    torch.logaddexp(logm, logp + log_1mb, out=logm)
    if not need_grad:
        p = logp.exp()
        p_terms = _xlogratio_(p, logp, logm).sum(-1)
        del p, logp
        q = logq.exp()
        return beta * p_terms + (1 - beta) * _xlogratio_(q, logq, logm).sum(-1), None
    # dJSD/dq_j = (1-beta)(log q_j - log m_j + 1) - beta r_j / m_j, r = beta p + (1-beta) q;
    # the constant drops out through the softmax. q_j beta r_j / m_j <= r_j is taken in
    # log space so that it cannot overflow.
    logr = logp.add_(log_b)  # consumes logp
    torch.logaddexp(logr, logq + log_1mb, out=logr)
    cross = (logq + log_b).add_(logr).sub_(logm).exp_()
    del logr
    q = logq.exp()
    cross.masked_fill_(q == 0, 0.0)
    qg = _xlogratio_(q, logq, logm).mul_(1 - beta).sub_(cross)  # in logq's buffer
    del cross, logm
    return None, qg.sub_(q.mul_(qg.sum(-1, keepdim=True)))


def _topk_buckets(logq: Tensor, ids: Tensor, logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Student and teacher log-masses [n, k+1] of the buckets: the k ids, then the tail."""
    in_k = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, ids, True)
    has_tail = ~in_k.all(-1)
    logq_tail = logq.masked_fill(in_k, NEG_INF).logsumexp(-1)
    # teacher tail 1 - sum exp(logprobs) as -expm1(logsumexp) in float64: a tiny tail
    # survives instead of cancelling; a position whose ids cover the vocabulary has none
    p_tail = (-torch.expm1(logprobs.double().logsumexp(-1))).clamp(min=0)
    logp_tail = torch.where(has_tail, p_tail.log(), NEG_INF).to(logq.dtype)
    logQ = torch.cat([logq.gather(1, ids), logq_tail[:, None]], 1)
    logP = torch.cat([logprobs.to(logq.dtype), logp_tail[:, None]], 1)
    return logQ, logP


def _fkl_topk(logq, ids, logprobs, need_grad):
    ids = ids.long()
    logQ, logP = _topk_buckets(logq, ids, logprobs)
    P = logP.exp()
    loss = _xlogratio(P, logP, logQ).sum(-1)
    if not need_grad:
        return loss, None
    # d/ds_j = q_j sum_b P_b - P_b q_j / Q_b for j in bucket b
    total = P.sum(-1, keepdim=True)
    shift = torch.where(P[:, -1] == 0, NEG_INF, logP[:, -1] - logQ[:, -1])
    grad = logq.exp() * total - torch.exp(logq + shift[:, None])
    return loss, grad.scatter_(1, ids, logQ[:, :-1].exp() * total - P[:, :-1])


def _rkl_topk(logq, ids, logprobs, need_grad):
    ids = ids.long()
    logQ, logP = _topk_buckets(logq, ids, logprobs)
    Q = logQ.exp()
    loss = _xlogratio(Q, logQ, logP).sum(-1)
    if not need_grad:
        return loss, None
    # d/ds_j = q_j (log Q_b - log P_b - KL) for j in bucket b
    f = torch.where(Q == 0, 0.0, logQ - logP) - loss[:, None]
    grad = logq.exp() * f[:, -1:]
    return loss, grad.scatter_(1, ids, Q[:, :-1] * f[:, :-1])


def _fkl_sampled(logq, ids, counts, entropy, need_grad):
    ids = ids.long()
    w = counts.to(logq.dtype)
    w = w / w.sum(-1, keepdim=True)
    loss = -entropy.to(logq.dtype) - torch.where(w == 0, 0.0, w * logq.gather(1, ids)).sum(-1)
    # d/ds_j = q_j - sum_{i: id_i = j} w_i
    return loss, (logq.exp().scatter_add_(1, ids, -w) if need_grad else None)


# ----------------------------------------------------------------------------
# the chunked core


class _ChunkedDivergence(torch.autograd.Function):
    """sum_r weights[r] * divergence(student[rows[r]] / tau, teacher[rows[r]]...)."""

    @staticmethod
    def forward(ctx, student, rows, weights, divergence, temperature, chunk_size, *teacher):
        ctx.save_for_backward(student, rows, weights, *teacher)
        ctx.divergence, ctx.temperature, ctx.chunk_size = divergence, temperature, chunk_size
        dtype = torch.promote_types(student.dtype, torch.float32)
        total = weights.new_zeros(())
        for idx, w in zip(rows.split(chunk_size), weights.split(chunk_size)):
            loss, _ = divergence(_student_rows(student, idx, temperature, dtype),
                                 *(t.index_select(0, idx) for t in teacher), need_grad=False)
            total += (loss.double() * w).sum()
        return total.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        student, rows, weights, *teacher = ctx.saved_tensors
        dtype = torch.promote_types(student.dtype, torch.float32)
        grad = torch.zeros_like(student)  # the one full-size buffer, in the student's dtype
        scale = grad_output.double() / ctx.temperature
        for idx, w in zip(rows.split(ctx.chunk_size), weights.split(ctx.chunk_size)):
            _, g = ctx.divergence(_student_rows(student, idx, ctx.temperature, dtype),
                                  *(t.index_select(0, idx) for t in teacher), need_grad=True)
            grad.index_copy_(0, idx, g.mul_((w * scale).to(dtype)[:, None]).to(grad.dtype))
            del g
        return grad, None, None, None, None, None, *(None for _ in teacher)


def _student_rows(student: Tensor, idx: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    return _tempered_log_softmax(student.index_select(0, idx), temperature, dtype, owned=True)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def _check_student(student_logits: Tensor) -> None:
    if student_logits.dim() != 3 or not student_logits.is_floating_point():
        raise ValueError(
            f"student_logits must be a floating [B, T, V] tensor, got shape "
            f"{tuple(student_logits.shape)} and dtype {student_logits.dtype}"
        )


def _check_positions(name: str, x: Tensor, student_logits: Tensor, ndim: int) -> None:
    if x.dim() != ndim or x.shape[:2] != student_logits.shape[:2]:
        want = "[B, T]" if ndim == 2 else "[B, T, n]"
        raise ValueError(
            f"{name} must have shape {want} with [B, T] = {tuple(student_logits.shape[:2])} "
            f"from student_logits {tuple(student_logits.shape)}, got {tuple(x.shape)}"
        )


def _check_ids(name: str, ids: Tensor, student_logits: Tensor) -> None:
    _check_positions(name, ids, student_logits, 3)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    V = student_logits.shape[-1]
    if ids.numel() and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"{name} must lie in [0, {V}) (the student's vocabulary)")


def _mask_bool(mask: Tensor, student_logits: Tensor) -> Tensor:
    _check_positions("mask", mask, student_logits, 2)
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be bool or hold only 0 and 1")
    return mask.bool()


def _row_weights(mask: Tensor, per_sequence: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Flat indices of the mask positions and each one's float64 weight in the reduction."""
    rows = mask.flatten().nonzero().squeeze(1)
    if not per_sequence:
        return rows, torch.full(rows.shape, scale / max(len(rows), 1), dtype=torch.float64)
    lengths = mask.sum(1, dtype=torch.float64)
    n_seq = (lengths > 0).sum().clamp(min=1)
    per_seq = scale / (lengths.clamp(min=1) * n_seq)
    return rows, per_seq[:, None].expand(mask.shape).flatten()[rows]


def _chunked(divergence, student_logits, teacher, mask, temperature, chunk_size, per_sequence, scale):
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    rows, weights = _row_weights(_mask_bool(mask, student_logits), per_sequence, scale)
    flat = [t.detach().flatten(0, 1) for t in teacher]
    if chunk_size is None:
        chunk_size = auto_chunk_size(student_logits.shape[-1])
    return _ChunkedDivergence.apply(
        student_logits.flatten(0, 1), rows.to(student_logits.device),
        weights.to(student_logits.device), divergence, float(temperature), chunk_size, *flat,
    )


def _dense(divergence, student_logits, teacher_logits, mask, temperature, chunk_size, per_sequence, scale):
    _check_student(student_logits)
    if teacher_logits.shape != student_logits.shape:
        s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
        hint = " (vocabulary mismatch: slice both with align_vocab)" if s[:2] == t[:2] and len(t) == 3 else ""
        raise ValueError(f"teacher_logits shape {t} does not match student_logits shape {s}{hint}")
    return _chunked(divergence, student_logits, [teacher_logits], mask, temperature, chunk_size, per_sequence, scale)


# ----------------------------------------------------------------------------
# dense losses


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
    temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """tau^2 * mean_seq mean_{t in mask} KL(p_T || p_S); [B, T, V] logits, [B, T] mask."""
    fn = partial(_fkl, temperature=temperature)
    return _dense(fn, student_logits, teacher_logits, mask, temperature, chunk_size, True, temperature**2)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
    temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """tau^2 * mean_seq mean_{t in mask} KL(p_S || p_T); [B, T, V] logits, [B, T] mask."""
    fn = partial(_rkl, temperature=temperature)
    return _dense(fn, student_logits, teacher_logits, mask, temperature, chunk_size, True, temperature**2)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float = 0.5,
    temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """mean_{(b, t) in mask} [beta KL(p_T || M) + (1 - beta) KL(p_S || M)], M = beta p_S + (1 - beta) p_T.

    Pooled token mean over the batch and no tau^2 factor, as in TRL's GKD loss. The
    ends are exact: beta = 0 gives KL(p_S || p_T) (reverse KL), beta = 1 gives
    KL(p_T || p_S) (forward KL), both token-pooled. TRL writes the mixture as
    (1 - beta) p_S + beta p_T and special-cases beta = 0 / 1 as forward / reverse KL;
    the two conventions agree at the paper's beta = 0.5.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    fn = partial(_jsd, temperature=temperature, beta=float(beta))
    return _dense(fn, student_logits, teacher_logits, mask, temperature, chunk_size, False, 1.0)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Both logits sliced to [..., :vocab_size], dropping padding rows of the output layer."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.shape[-1] < vocab_size:
            raise ValueError(f"{name} has {x.shape[-1]} vocabulary entries, fewer than vocab_size={vocab_size}")
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


# ----------------------------------------------------------------------------
# sparse-teacher losses (teacher-logit cache)


def _check_topk(student_logits, topk_ids, topk_logprobs):
    _check_student(student_logits)
    _check_ids("topk_ids", topk_ids, student_logits)
    if topk_logprobs.shape != topk_ids.shape or not topk_logprobs.is_floating_point():
        raise ValueError(
            f"topk_logprobs must be floating with the shape of topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_logprobs.shape)} {topk_logprobs.dtype}"
        )


def forward_kl_topk(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor,
    temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """forward_kl over the k+1 buckets {id_1}, ..., {id_k}, tail = the other tokens.

    topk_ids [B, T, k] must be distinct per position; topk_logprobs are the
    teacher's tempered log-probs there. Teacher tail = 1 - sum(exp(topk_logprobs)),
    clamped at 0 (and 0 where the ids cover the vocabulary); student tail =
    log-sum-exp of p_S over the other ids. Equals forward_kl when k = V and never
    exceeds it (a partition cannot increase a KL).
    """
    _check_topk(student_logits, topk_ids, topk_logprobs)
    return _chunked(_fkl_topk, student_logits, [topk_ids, topk_logprobs], mask,
                    temperature, chunk_size, True, temperature**2)


def reverse_kl_topk(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor,
    temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """reverse_kl over the same k+1 buckets as forward_kl_topk.

    +inf where the implied teacher tail is 0 but the student's is not (as the
    definition says): keep topk_logprobs in float32 so that small tails survive.
    """
    _check_topk(student_logits, topk_ids, topk_logprobs)
    return _chunked(_rkl_topk, student_logits, [topk_ids, topk_logprobs], mask,
                    temperature, chunk_size, True, temperature**2)


def forward_kl_sampled(
    student_logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, teacher_entropy: Tensor,
    mask: Tensor, temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """forward_kl estimated from teacher samples (Anshumann et al., 2025).

    Per position KL_est = -H_T - sum_i (c_i / sum_j c_j) log p_S(id_i), with c the
    sample_counts (0 for padding) and H_T the tempered teacher entropy; same
    reduction and tau^2 as forward_kl. With ids drawn from p_T its value and its
    gradient in student_logits are unbiased for forward_kl's.
    """
    _check_student(student_logits)
    _check_ids("sample_ids", sample_ids, student_logits)
    if sample_counts.shape != sample_ids.shape:
        raise ValueError(f"sample_counts shape {tuple(sample_counts.shape)} differs from sample_ids "
                         f"shape {tuple(sample_ids.shape)}")
    _check_positions("teacher_entropy", teacher_entropy, student_logits, 2)
    if (sample_counts < 0).any():
        raise ValueError("sample_counts must be >= 0")
    if (sample_counts.sum(-1)[_mask_bool(mask, student_logits)] <= 0).any():
        raise ValueError("sample_counts must have a positive total at every mask position")
    return _chunked(_fkl_sampled, student_logits, [sample_ids, sample_counts, teacher_entropy], mask,
                    temperature, chunk_size, True, temperature**2)


def sparse_kd_loss(method: str, student_logits: Tensor, teacher: dict[str, Tensor], mask: Tensor,
                   temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> Tensor:
    """fkl / rkl against a sparse teacher: ``teacher`` holds topk_ids + topk_logprobs (the top-k +
    tail partition; fkl and rkl) or sample_ids + sample_counts + teacher_entropy (draws; fkl only)."""
    topk = "topk_ids" in teacher
    if method == "fkl":
        loss = forward_kl_topk if topk else forward_kl_sampled
    elif method == "rkl" and topk:
        loss = reverse_kl_topk
    else:
        raise ValueError(f"no sparse {method!r} loss for a teacher of {sorted(teacher)}: fkl takes top-k or draws, "
                         "rkl only top-k")
    return loss(student_logits, **teacher, mask=mask, temperature=temperature, chunk_size=chunk_size)


# ----------------------------------------------------------------------------
# teacher-side helpers for the cache


@torch.no_grad()
def teacher_topk(
    teacher_logits: Tensor, k: int, temperature: float = 1.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """(ids int64 [B, T, k], log softmax(teacher_logits / tau) at ids), largest first.

    Log-probs are float32 (float64 for float64 logits).
    """
    _check_student(teacher_logits)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    V = teacher_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must lie in [1, {V}], got {k}")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    chunk_size = chunk_size or auto_chunk_size(V)
    flat = teacher_logits.flatten(0, 1)
    ids = torch.empty(len(flat), k, dtype=torch.long, device=flat.device)
    logprobs = torch.empty(len(flat), k, dtype=dtype, device=flat.device)
    for i in range(0, len(flat), chunk_size):
        logprobs[i:i + chunk_size], ids[i:i + chunk_size] = (
            _tempered_log_softmax(flat[i:i + chunk_size], temperature, dtype).topk(k, -1)
        )
    return ids.view(*teacher_logits.shape[:2], k), logprobs.view(*teacher_logits.shape[:2], k)


@torch.no_grad()
def teacher_samples(
    teacher_logits: Tensor, num_samples: int, temperature: float = 1.0,
    generator: torch.Generator | None = None, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    systematic: bool = False, merge: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, counts) [B, T, num_samples] int64 and the entropy of p_T [B, T].

    num_samples draws from p_T = softmax(teacher_logits / tau) per position, as
    inverse-CDF lookups of float64 uniforms taken from `generator` up front (so they
    do not depend on chunk_size). Independent draws by default; ``systematic`` takes
    one uniform u per position and draws at (u + i) / num_samples, i = 0..n-1: every id
    is still expected num_samples * p times (unbiased), but an id with p >= 1/n is
    drawn floor(n p) or ceil(n p) times, so the estimate varies less. With ``merge``,
    equal ids become one entry with their count, distinct ids first (ascending), then
    padding (id 0, count 0); without, the draws come sorted with count 1 each.
    Entropy is float32 (float64 for float64 logits).
    """
    _check_student(teacher_logits)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    flat = teacher_logits.flatten(0, 1)
    n, V = flat.shape
    chunk_size = chunk_size or auto_chunk_size(V)
    u = torch.rand(n, 1 if systematic else num_samples, generator=generator, dtype=torch.float64, device=flat.device)
    if systematic:
        u = (u + torch.arange(num_samples, dtype=torch.float64, device=flat.device)) / num_samples
    draws = torch.empty(n, num_samples, dtype=torch.long, device=flat.device)
    entropy = torch.empty(n, dtype=dtype, device=flat.device)
    for i in range(0, n, chunk_size):
        logp = _tempered_log_softmax(flat[i:i + chunk_size], temperature, dtype)
        p = logp.exp()
        entropy[i:i + chunk_size] = -torch.where(p == 0, 0.0, p * logp).sum(-1)
        cdf = p.double().cumsum(-1)
        # right=True never picks a zero-probability id (its cdf equals its predecessor's)
        draws[i:i + chunk_size] = torch.searchsorted(cdf, u[i:i + chunk_size] * cdf[:, -1:],
                                                     right=True).clamp_(max=V - 1)
    draws = draws.sort(-1).values
    shape = (*teacher_logits.shape[:2], num_samples)
    if not merge:
        return draws.view(shape), torch.ones_like(draws).view(shape), entropy.view(teacher_logits.shape[:2])
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.cumsum(-1) - 1
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    return ids.view(shape), counts.view(shape), entropy.view(teacher_logits.shape[:2])
