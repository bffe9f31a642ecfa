"""kd_utils.losses against float64 references written here from the definitions.

Tolerances: float32 inputs, loss rtol 1e-5 and gradient rtol 1e-4 (float32 compute).
bfloat16 inputs: the reference is fed the same bf16-rounded logits, so the loss
(computed in float32) keeps rtol 1e-5; the gradient comes back in bfloat16
(8-bit mantissa), so it is compared with rtol 1e-2 and atol 1e-2 * max|grad|.
"""

import math
from functools import partial

import pytest
import torch

from kd_utils.losses import (
    CHUNK_ELEMENTS,
    align_vocab,
    auto_chunk_size,
    forward_kl,
    forward_kl_sampled,
    forward_kl_topk,
    generalized_jsd,
    reverse_kl,
    reverse_kl_topk,
    teacher_samples,
    teacher_topk,
)

F64 = torch.float64


# ---------------------------------------------------------------- references


def ref_logp(logits, tau):
    return torch.log_softmax(logits.to(F64) / tau, -1)


def ref_kl(logp, logq):
    """Per-position KL(p || q) from log-probs, 0 * log 0 = 0."""
    p = logp.exp()
    return torch.where(p == 0, 0.0, p * (logp - logq)).sum(-1)


def ref_per_sequence(per_pos, mask, tau):
    """tau^2 * mean over sequences with a mask position of their mask-mean."""
    m = mask.to(F64)
    lengths = m.sum(1)
    valid = lengths > 0
    if not valid.any():
        return per_pos.sum() * 0
    return ((per_pos * m).sum(1)[valid] / lengths[valid]).mean() * tau**2


def ref_pooled(per_pos, mask):
    m = mask.to(F64)
    return (per_pos * m).sum() / m.sum() if m.sum() > 0 else per_pos.sum() * 0


def ref_fkl(s, t, mask, tau):
    return ref_per_sequence(ref_kl(ref_logp(t, tau), ref_logp(s, tau)), mask, tau)


def ref_rkl(s, t, mask, tau):
    return ref_per_sequence(ref_kl(ref_logp(s, tau), ref_logp(t, tau)), mask, tau)


def ref_jsd(s, t, mask, tau, beta):
    logq, logp = ref_logp(s, tau), ref_logp(t, tau)
    logm = torch.log(beta * logq.exp() + (1 - beta) * logp.exp())
    return ref_pooled(beta * ref_kl(logp, logm) + (1 - beta) * ref_kl(logq, logm), mask)


def ref_topk(s, ids, logprobs, mask, tau, reverse):
    """Bucket KL over {id_1}, ..., {id_k}, tail, with tails 1 - sum."""
    q = torch.softmax(s.to(F64) / tau, -1)
    q_k = q.gather(-1, ids)
    p_k = logprobs.to(F64).exp()
    Q = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    P = torch.cat([p_k, (1 - p_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    P, Q = (Q, P) if reverse else (P, Q)
    per_pos = torch.where(P == 0, 0.0, P * (P.log() - Q.log())).sum(-1)
    return ref_per_sequence(per_pos, mask, tau)


def ref_sampled_per_pos(s, ids, counts, entropy, tau):
    logq = ref_logp(s, tau)
    w = counts.to(F64) / counts.sum(-1, keepdim=True)
    return -entropy.to(F64) - (w * logq.gather(-1, ids)).sum(-1)


DENSE = {
    "fkl": (forward_kl, ref_fkl),
    "rkl": (reverse_kl, ref_rkl),
    "jsd": (partial(generalized_jsd, beta=0.5), partial(ref_jsd, beta=0.5)),
}


def make_inputs(dtype=torch.float32, B=3, T=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    t = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0] = True
    mask[1] = False  # a sequence with no mask position
    return s, t, mask


def grads(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, *args, **kw)
    loss.backward()
    return loss, s.grad


def assert_grad_close(grad, ref, dtype):
    assert grad.dtype == dtype
    if dtype == torch.bfloat16:
        atol = 1e-2 * ref.abs().max().item()
        torch.testing.assert_close(grad.to(F64), ref, rtol=1e-2, atol=atol)
    else:
        torch.testing.assert_close(grad.to(F64), ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- dense losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("name", DENSE)
def test_dense_matches_float64_reference(name, tau, chunk_size, dtype):
    fn, ref_fn = DENSE[name]
    s, t, mask = make_inputs(dtype)
    loss, grad = grads(fn, s, t, mask, temperature=tau, chunk_size=chunk_size)
    ref, ref_grad = grads(ref_fn, s.to(F64), t.to(F64), mask, tau=tau)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_beta_and_endpoints(beta):
    s, t, mask = make_inputs()
    loss, grad = grads(generalized_jsd, s, t, mask, beta=beta, temperature=2.0, chunk_size=3)
    ref, ref_grad = grads(partial(ref_jsd, beta=beta), s.to(F64), t.to(F64), mask, tau=2.0)
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, torch.float32)
    if beta in (0.0, 1.0):  # beta = 0: KL(p_S || p_T); beta = 1: KL(p_T || p_S), token-pooled
        logq, logp = ref_logp(s, 2.0), ref_logp(t, 2.0)
        per_pos = ref_kl(logq, logp) if beta == 0 else ref_kl(logp, logq)
        torch.testing.assert_close(loss.to(F64), ref_pooled(per_pos, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DENSE)
def test_all_zero_mask_gives_connected_zero(name):
    s, t, _ = make_inputs()
    s.requires_grad_()
    loss = DENSE[name][0](s, t, torch.zeros(3, 5, dtype=torch.long))
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_identical_distributions_give_zero():
    s, _, mask = make_inputs()
    assert forward_kl(s, s, mask, temperature=2.0).item() == 0
    assert reverse_kl(s, s, mask, temperature=2.0).item() == 0
    assert abs(generalized_jsd(s, s, mask, beta=0.3).item()) < 1e-6


def test_divergence_bounds():
    for seed in range(5):
        s, t, mask = make_inputs(seed=seed)
        assert forward_kl(s, t, mask).item() >= 0
        assert reverse_kl(s, t, mask).item() >= 0
        assert 0 <= generalized_jsd(s, t, mask).item() <= math.log(2)
    # disjoint peaks push the beta = 0.5 JSD to its supremum ln 2
    s, t = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    s[..., 0], t[..., 1] = 40.0, 40.0
    jsd = generalized_jsd(s, t, torch.ones(1, 1)).item()
    assert math.log(2) - 1e-5 < jsd <= math.log(2) + 1e-6


def test_minus_inf_teacher_logits():
    s, t, mask = make_inputs()
    t[..., :3] = float("-inf")
    for fn, ref_fn in (DENSE["fkl"], DENSE["jsd"]):
        loss, grad = grads(fn, s, t, mask, chunk_size=2)
        ref, ref_grad = grads(ref_fn, s.to(F64), t.to(F64), mask, tau=1.0)
        torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
        assert_grad_close(grad, ref_grad, torch.float32)
    assert reverse_kl(s, t, mask).item() == math.inf  # the student has mass where the teacher has none


def test_align_vocab():
    s, t, mask = make_inputs(V=13)
    s_al, t_al = align_vocab(s, t[..., :12], 11)
    assert s_al.shape == t_al.shape == (3, 5, 11)
    s.requires_grad_()
    forward_kl(*align_vocab(s, t, 11), mask).backward()
    assert s.grad[..., 11:].abs().max() == 0 and s.grad[..., :11].abs().max() > 0
    with pytest.raises(ValueError, match="teacher_logits"):
        align_vocab(s, t[..., :10], 11)


def test_bad_inputs():
    s, t, mask = make_inputs()
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, mask, temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl(s, t, mask, temperature=-1.0)
    for beta in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, mask, beta=beta)
    with pytest.raises(ValueError,
                       match=r"teacher_logits shape \(3, 5, 12\).*student_logits shape \(3, 5, 11\).*align_vocab"):
        forward_kl(s, torch.randn(3, 5, 12), mask)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        forward_kl(s, t[:2], mask)
    with pytest.raises(ValueError, match="student_logits"):
        forward_kl(s[0], t[0], mask)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(s, t, mask[:, :4])
    with pytest.raises(ValueError, match="mask"):
        forward_kl(s, t, mask.float() * 0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(s, t, mask, chunk_size=0)
    ids, logprobs = teacher_topk(t, 3)
    with pytest.raises(ValueError, match="topk_logprobs"):
        forward_kl_topk(s, ids, logprobs[..., :2], mask)
    with pytest.raises(ValueError, match="topk_ids"):
        forward_kl_topk(s, ids + 11, logprobs, mask)
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl_topk(s, ids, logprobs, mask, temperature=0.0)
    ids, counts, entropy = teacher_samples(t, 4)
    with pytest.raises(ValueError, match="sample_counts"):
        forward_kl_sampled(s, ids, counts * 0, entropy, mask)
    with pytest.raises(ValueError, match="teacher_entropy"):
        forward_kl_sampled(s, ids, counts, entropy[:, :2], mask)
    with pytest.raises(ValueError, match="k must"):
        teacher_topk(t, 12)
    with pytest.raises(ValueError, match="num_samples"):
        teacher_samples(t, 0)


# ---------------------------------------------------------------- gradcheck


def test_gradcheck_every_loss():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, dtype=F64, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=F64, generator=g)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    ids, logprobs = teacher_topk(t, 2, temperature=2.0)
    s_ids, counts, entropy = teacher_samples(t, 3, temperature=2.0, generator=g)
    losses = [
        partial(forward_kl, teacher_logits=t, temperature=2.0),
        partial(reverse_kl, teacher_logits=t, temperature=2.0),
        *(partial(generalized_jsd, teacher_logits=t, beta=b, temperature=2.0) for b in (0.0, 0.3, 1.0)),
        partial(forward_kl_topk, topk_ids=ids, topk_logprobs=logprobs, temperature=2.0),
        partial(reverse_kl_topk, topk_ids=ids, topk_logprobs=logprobs, temperature=2.0),
        partial(forward_kl_sampled, sample_ids=s_ids, sample_counts=counts, teacher_entropy=entropy,
                temperature=2.0),
    ]
    for fn in losses:
        assert torch.autograd.gradcheck(lambda x: fn(x, mask=mask, chunk_size=2), (s,))


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("reverse", [False, True])
def test_topk_with_full_vocab_equals_dense(reverse, tau):
    s, t, mask = make_inputs()
    ids, logprobs = teacher_topk(t, 11, temperature=tau)
    sparse, dense = (reverse_kl_topk, reverse_kl) if reverse else (forward_kl_topk, forward_kl)
    loss, grad = grads(sparse, s, ids, logprobs, mask, temperature=tau, chunk_size=4)
    ref, ref_grad = grads(dense, s, t, mask, temperature=tau)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_topk_matches_float64_reference(reverse, dtype):
    s, t, mask = make_inputs(dtype)
    ids, logprobs = teacher_topk(t, 3, temperature=2.0)
    fn = reverse_kl_topk if reverse else forward_kl_topk
    loss, grad = grads(fn, s, ids, logprobs, mask, temperature=2.0, chunk_size=3)
    ref, ref_grad = grads(partial(ref_topk, reverse=reverse), s.to(F64), ids, logprobs, mask, tau=2.0)
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("reverse", [False, True])
def test_topk_error_shrinks_with_k(reverse):
    g = torch.Generator().manual_seed(2)
    V = 64
    ranks = torch.stack([torch.randperm(V, generator=g) + 1 for _ in range(8)]).view(2, 4, V)
    t = -3 * ranks.float().log()  # Zipf-like peaked teacher
    s = torch.randn(2, 4, V, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    sparse, dense = (reverse_kl_topk, reverse_kl) if reverse else (forward_kl_topk, forward_kl)
    exact = dense(s, t, mask).item()
    errors = [exact - sparse(s, *teacher_topk(t, k), mask).item() for k in (1, 2, 4, 8, 16, 32, V)]
    assert errors[0] > 0.01
    assert all(e >= -1e-5 for e in errors)  # merging buckets never increases a KL
    assert all(a >= b - 1e-5 for a, b in zip(errors, errors[1:]))
    assert abs(errors[-1]) < 1e-5


def test_teacher_topk():
    _, t, _ = make_inputs()
    ids, logprobs = teacher_topk(t, 4, temperature=2.0, chunk_size=2)
    assert ids.shape == logprobs.shape == (3, 5, 4) and ids.dtype == torch.int64
    ref = torch.log_softmax(t / 2.0, -1)
    torch.testing.assert_close(logprobs, ref.gather(-1, ids))
    assert torch.equal(logprobs, ref.topk(4, -1).values)


# ---------------------------------------------------------------- sampled


def test_teacher_samples():
    _, t, _ = make_inputs()
    ids, counts, entropy = teacher_samples(t, 6, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert ids.shape == counts.shape == (3, 5, 6) and entropy.shape == (3, 5)
    assert ids.dtype == counts.dtype == torch.int64
    assert torch.all(counts.sum(-1) == 6) and torch.all(counts >= 0)
    for i, c in zip(ids.view(-1, 6), counts.view(-1, 6)):
        kept = i[c > 0]
        assert len(kept.unique()) == len(kept)  # duplicates merged
        assert torch.all(c[: len(kept)] > 0) and torch.all(i[c == 0] == 0)  # padding last, id 0
    logp = ref_logp(t, 2.0)
    torch.testing.assert_close(entropy.to(F64), -(logp.exp() * logp).sum(-1), rtol=1e-5, atol=1e-6)
    again = teacher_samples(t, 6, temperature=2.0, generator=torch.Generator().manual_seed(0), chunk_size=1)
    assert all(torch.equal(a, b) for a, b in zip((ids, counts, entropy), again))


def test_teacher_samples_follow_the_distribution():
    t = torch.tensor([[[2.0, 0.0, -1.0, float("-inf"), 1.0]]])
    n = 200_000
    ids, counts, _ = teacher_samples(t, n, temperature=2.0, generator=torch.Generator().manual_seed(3))
    freq = torch.zeros(5, dtype=F64).scatter_add_(0, ids.view(-1), counts.view(-1).to(F64)) / n
    p = torch.softmax(t.view(-1).to(F64) / 2.0, -1)
    assert freq[3] == 0
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12)


def test_systematic_draws_hit_each_id_floor_or_ceil_of_n_p_times():
    t = torch.tensor([[[2.0, 0.0, -1.0, float("-inf"), 1.0, 0.5]]]).expand(500, 1, 6)
    n = 7
    ids, counts, _ = teacher_samples(t, n, generator=torch.Generator().manual_seed(2), systematic=True, merge=False)
    assert torch.all(counts == 1) and torch.all(ids[..., 1:] >= ids[..., :-1])  # unmerged, sorted
    hits = torch.zeros(500, 6).scatter_add_(1, ids.view(500, n), torch.ones(500, n))
    expected = n * torch.softmax(t[0, 0].to(F64), -1)
    assert torch.all(hits >= expected.floor()) and torch.all(hits <= expected.ceil())
    assert torch.all(hits[:, 3] == 0)
    # unbiased: the mean count over positions (independent offsets) is n p
    assert torch.all((hits.to(F64).mean(0) - expected).abs() < 0.1)
    merged = teacher_samples(t, n, generator=torch.Generator().manual_seed(2), systematic=True)
    again = torch.zeros(500, 6).scatter_add_(1, merged[0].view(500, n), merged[1].view(500, n).float())
    assert torch.equal(hits, again)


def test_sampled_matches_formula():
    s, t, mask = make_inputs()
    ids, counts, entropy = teacher_samples(t, 5, temperature=2.0, generator=torch.Generator().manual_seed(4))
    fn = partial(forward_kl_sampled, temperature=2.0, chunk_size=2)
    loss, grad = grads(fn, s, ids, counts, entropy, mask)
    ref_fn = lambda x: ref_per_sequence(ref_sampled_per_pos(x, ids, counts, entropy, 2.0), mask, 2.0)  # noqa: E731
    ref, ref_grad = grads(ref_fn, s.to(F64))
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("systematic", [False, True])
def test_sampled_is_unbiased(systematic):
    """Average over R independent draws of a [1, T, V] problem, laid out as R sequences."""
    R, T, V, S, tau = 20_000, 3, 8, 4, 2.0
    g = torch.Generator().manual_seed(5)
    s0 = torch.randn(1, T, V, generator=g, requires_grad=True)
    t0 = 2 * torch.randn(1, T, V, generator=g)
    ids, counts, entropy = teacher_samples(t0.expand(R, T, V), S, temperature=tau, generator=g, systematic=systematic)
    mask = torch.ones(R, T, dtype=torch.bool)
    loss = forward_kl_sampled(s0.expand(R, T, V), ids, counts, entropy, mask, temperature=tau)
    loss.backward()
    dense, dense_grad = grads(ref_fkl, s0.to(F64), t0.to(F64), mask[:1], tau=tau)

    per_replica = ref_sampled_per_pos(s0.detach().expand(R, T, V), ids, counts, entropy, tau).mean(1) * tau**2
    torch.testing.assert_close(loss.to(F64), per_replica.mean(), rtol=1e-5, atol=1e-6)
    se = per_replica.std() / math.sqrt(R)
    assert abs(loss.item() - dense.item()) < 5 * se

    # per element, the sampled gradient is tau/T * (q - c/S), and c/S has variance p(1-p)/S
    # (at most: systematic draws vary less)
    p = torch.softmax(t0.to(F64) / tau, -1)
    grad_se = tau / T * (p * (1 - p) / (S * R)).sqrt()
    assert torch.all((s0.grad.to(F64) - dense_grad).abs() <= 5 * grad_se + 1e-6)


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", DENSE)
def test_automatic_chunks_and_inputs_untouched(name, dtype):
    """chunk_size=None (CHUNK_ELEMENTS // V rows) gives the same loss and gradient as explicit
    chunks, and the in-place chunk arithmetic never writes into the caller's logits."""
    fn, _ = DENSE[name]
    s, t, mask = make_inputs(dtype, T=7, V=17)
    s0, t0 = s.clone(), t.clone()
    loss, grad = grads(fn, s, t, mask, temperature=2.0)
    loss1, grad1 = grads(fn, s, t, mask, temperature=2.0, chunk_size=1)
    assert auto_chunk_size(151936) == 110 and auto_chunk_size(17) == CHUNK_ELEMENTS // 17
    torch.testing.assert_close(loss, loss1)
    torch.testing.assert_close(grad, grad1)
    assert torch.equal(s, s0) and torch.equal(t, t0)
