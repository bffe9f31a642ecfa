"""kd_utils.losses at its edges: exact error messages, the reduction over a single sequence,
tokens that neither model can produce, zero-probability top-k buckets, lossy top-k
probabilities, the sparse-teacher dispatch and default arguments.

Reference values come from the float64 definitions in test_losses.py or are worked out by hand.
"""

import math
import re
from functools import partial

import pytest
import torch
from test_losses import F64, assert_grad_close, grads, make_inputs, ref_jsd, ref_kl, ref_logp, ref_topk

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
    sparse_kd_loss,
    teacher_samples,
    teacher_topk,
)

NEG_INF = float("-inf")


def raises_exactly(message: str):
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


# ---------------------------------------------------------------- messages


def test_shape_messages_name_the_argument_and_the_expected_shape():
    s, t, mask = make_inputs()
    with raises_exactly("mask must have shape [B, T] with [B, T] = (3, 5) from student_logits (3, 5, 11), got (3, 4)"):
        forward_kl(s, t, mask[:, :4])
    ids, logprobs = teacher_topk(t, 3)
    with raises_exactly("topk_ids must have shape [B, T, n] with [B, T] = (3, 5) from student_logits (3, 5, 11), "
                        "got (3, 4, 3)"):
        forward_kl_topk(s, ids[:, :4], logprobs[:, :4], mask)
    with raises_exactly("teacher_logits shape (2, 5, 11) does not match student_logits shape (3, 5, 11)"):
        forward_kl(s, t[:2], mask)  # no vocabulary hint when [B, T] differ
    with raises_exactly("teacher_logits shape (3, 5, 12) does not match student_logits shape (3, 5, 11) "
                        "(vocabulary mismatch: slice both with align_vocab)"):
        reverse_kl(s, torch.randn(3, 5, 12), mask)
    with raises_exactly("mask must be bool or hold only 0 and 1"):
        forward_kl(s, t, mask.long() * 2)
    with raises_exactly("student_logits must be a floating [B, T, V] tensor, "
                        "got shape (3, 5, 11) and dtype torch.int64"):
        forward_kl(s.long(), t, mask)  # three dimensions, but not floating


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_ids_must_be_integers(dtype):
    s, t, mask = make_inputs()
    ids, logprobs = teacher_topk(t, 3)
    with raises_exactly(f"topk_ids must be an integer tensor, got {dtype}"):
        forward_kl_topk(s, ids.to(dtype), logprobs, mask)


def test_ids_must_lie_in_the_vocabulary():
    s, t, mask = make_inputs()
    ids, logprobs = teacher_topk(t, 3)
    ids[0, 0, 0] = 11  # one past the last id
    with raises_exactly("topk_ids must lie in [0, 11) (the student's vocabulary)"):
        reverse_kl_topk(s, ids, logprobs, mask)
    with raises_exactly("sample_ids must lie in [0, 11) (the student's vocabulary)"):
        forward_kl_sampled(s, ids, torch.ones_like(ids), torch.zeros(3, 5), mask)
    ids[0, 0, 0] = 10  # the last id is fine
    reverse_kl_topk(s, ids, logprobs, mask)


def test_sampled_messages():
    s, t, mask = make_inputs()
    ids, counts, entropy = teacher_samples(t, 4)
    with raises_exactly("sample_counts shape (3, 5, 3) differs from sample_ids shape (3, 5, 4)"):
        forward_kl_sampled(s, ids, counts[..., :3], entropy, mask)
    with raises_exactly("teacher_entropy must have shape [B, T] with [B, T] = (3, 5) from student_logits (3, 5, 11), "
                        "got (3, 2)"):
        forward_kl_sampled(s, ids, counts, entropy[:, :2], mask)
    counts[0, 0, 0] = -1
    with raises_exactly("sample_counts must be >= 0"):
        forward_kl_sampled(s, ids, counts, entropy, mask)
    with raises_exactly("sample_counts must have a positive total at every mask position"):
        forward_kl_sampled(s, ids, counts.clamp(min=0) * 0, entropy, mask)


def test_align_vocab_messages_and_an_exact_fit():
    s, t, _ = make_inputs(V=11)
    with raises_exactly("student_logits has 11 vocabulary entries, fewer than vocab_size=12"):
        align_vocab(s, t, 12)
    with raises_exactly("teacher_logits has 10 vocabulary entries, fewer than vocab_size=11"):
        align_vocab(s, t[..., :10], 11)
    s_al, t_al = align_vocab(s, t, 11)  # exactly vocab_size entries: nothing to drop
    assert torch.equal(s_al, s) and torch.equal(t_al, t)


def test_automatic_chunk_size_bounds():
    assert auto_chunk_size(1) == CHUNK_ELEMENTS
    assert auto_chunk_size(CHUNK_ELEMENTS * 2) == 1  # a vocabulary beyond the budget still gets one row


# ---------------------------------------------------------------- reductions and defaults


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl])
def test_one_sequence_with_mask_positions_is_its_own_mean(loss):
    """Sequences without mask positions do not count: the loss is the one real sequence's mean."""
    s, t, _ = make_inputs(B=2)
    mask = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    logq, logp = ref_logp(s, 3.0), ref_logp(t, 3.0)
    per_pos = ref_kl(logp, logq) if loss is forward_kl else ref_kl(logq, logp)
    expected = 9.0 * per_pos[1, [0, 2, 3]].mean()
    assert loss(s, t, mask, temperature=3.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_default_temperatures_are_one():
    s, t, mask = make_inputs()
    ids, logprobs = teacher_topk(t, 3)
    assert forward_kl_topk(s, ids, logprobs, mask).item() == pytest.approx(
        ref_topk(s, ids, logprobs, mask, 1.0, reverse=False).item(), rel=1e-5)
    ids, counts, entropy = teacher_samples(t, 4, generator=torch.Generator().manual_seed(0))
    assert forward_kl_sampled(s, ids, counts, entropy, mask).item() == pytest.approx(
        forward_kl_sampled(s, ids, counts, entropy, mask, temperature=1.0).item(), rel=1e-7)
    assert sparse_kd_loss("fkl", s, {"topk_ids": ids, "topk_logprobs": torch.log_softmax(t, -1).gather(-1, ids)},
                          mask).item() == pytest.approx(
        forward_kl_topk(s, ids, torch.log_softmax(t, -1).gather(-1, ids), mask, temperature=1.0).item(), rel=1e-7)


def test_sampled_scale_is_tau_squared_and_one_draw_suffices():
    s, t, mask = make_inputs()
    ids, counts, entropy = teacher_samples(t, 1, temperature=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.all(counts.sum(-1) == 1)  # a total of one draw is a positive total
    loss = forward_kl_sampled(s, ids, counts, entropy, mask, temperature=3.0)
    logq = ref_logp(s, 3.0).gather(-1, ids)[..., 0]
    per_pos = -entropy.to(F64) - logq
    m = mask.to(F64)
    rows = m.sum(1) > 0
    expected = 9.0 * ((per_pos * m).sum(1)[rows] / m.sum(1)[rows]).mean()  # tau^2 = 9, not 2 tau = 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- the sparse-teacher dispatch


def test_sparse_kd_loss_dispatches_on_method_and_representation():
    s, t, mask = make_inputs()
    topk = dict(zip(("topk_ids", "topk_logprobs"), teacher_topk(t, 3, temperature=2.0)))
    draws = dict(zip(("sample_ids", "sample_counts", "teacher_entropy"),
                     teacher_samples(t, 4, temperature=2.0, generator=torch.Generator().manual_seed(0))))
    cases = [("fkl", topk, forward_kl_topk), ("rkl", topk, reverse_kl_topk), ("fkl", draws, forward_kl_sampled)]
    for method, teacher, loss in cases:
        got, grad = grads(partial(sparse_kd_loss, method), s, teacher, mask, temperature=2.0, chunk_size=2)
        want, want_grad = grads(lambda x: loss(x, **teacher, mask=mask, temperature=2.0), s)
        assert got.item() == pytest.approx(want.item(), rel=1e-6), method
        torch.testing.assert_close(grad, want_grad)
    with raises_exactly("no sparse 'rkl' loss for a teacher of ['sample_counts', 'sample_ids', 'teacher_entropy']: "
                        "fkl takes top-k or draws, rkl only top-k"):
        sparse_kd_loss("rkl", s, draws, mask)
    with raises_exactly("no sparse 'gkd' loss for a teacher of ['topk_ids', 'topk_logprobs']: "
                        "fkl takes top-k or draws, rkl only top-k"):
        sparse_kd_loss("gkd", s, topk, mask)


# ---------------------------------------------------------------- impossible tokens and empty buckets


def test_jsd_with_tokens_neither_model_can_produce():
    """Ids at -inf in both models drop out: the loss is that of the other ids, their gradient 0."""
    s, t, mask = make_inputs()
    s[..., [2, 7]] = NEG_INF
    t[..., [2, 7]] = NEG_INF
    keep = [i for i in range(11) if i not in (2, 7)]
    for beta in (0.3, 0.5):
        loss, grad = grads(generalized_jsd, s, t, mask, beta=beta, chunk_size=4)
        ref, ref_grad = grads(partial(ref_jsd, beta=beta), s[..., keep].to(F64), t[..., keep].to(F64), mask, tau=1.0)
        torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
        assert_grad_close(grad[..., keep], ref_grad, torch.float32)
        assert torch.equal(grad[..., [2, 7]], torch.zeros(3, 5, 2))


def test_jsd_gradient_with_tokens_only_the_student_cannot_produce():
    s, t, mask = make_inputs()
    s[..., :3] = NEG_INF
    loss, grad = grads(generalized_jsd, s, t, mask, chunk_size=4)
    assert torch.isfinite(grad).all() and torch.equal(grad[..., :3], torch.zeros(3, 5, 3))
    # the gradient in the other logits: finite differences of the loss in float64
    s64 = s.to(F64)
    eps = 1e-6
    for b, pos, v in [(0, 0, 5), (2, 3, 10), (0, 0, 3)]:
        if not mask[b, pos]:
            continue
        up, down = s64.clone(), s64.clone()
        up[b, pos, v] += eps
        down[b, pos, v] -= eps
        numeric = (ref_jsd(up, t.to(F64), mask, 1.0, 0.5) - ref_jsd(down, t.to(F64), mask, 1.0, 0.5)) / (2 * eps)
        assert grad[b, pos, v].item() == pytest.approx(numeric.item(), rel=1e-3, abs=1e-7)


def test_topk_buckets_without_teacher_mass():
    """Top-k ids the teacher gives probability 0 (ids in any order, as a cache may store them):
    a zero bucket in the middle, then every top-k bucket at zero (the tail holds all the mass)."""
    s, t, mask = make_inputs()
    t[..., 4] = NEG_INF
    order = torch.tensor([0, 4]).expand(3, 5, 2)  # a real id, then one with p = 0
    for ids in (order, torch.tensor([4]).expand(3, 5, 1)):
        logprobs = torch.log_softmax(t, -1).gather(-1, ids)
        loss, grad = grads(forward_kl_topk, s, ids, logprobs, mask, chunk_size=4)
        ref, ref_grad = grads(partial(ref_topk, reverse=False), s.to(F64), ids, logprobs, mask, tau=1.0)
        torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
        assert_grad_close(grad, ref_grad, torch.float32)


def test_topk_with_probabilities_summing_past_one():
    """A lossy cache can store top-k probabilities whose sum exceeds 1 (the tail is clamped to 0):
    the loss and gradient still follow the bucket definition with those masses."""
    s, _, mask = make_inputs()
    ids = torch.tensor([1, 6]).expand(3, 5, 2)
    logprobs = torch.tensor([0.7, 0.6]).log().expand(3, 5, 2)
    for reverse, fn in ((False, forward_kl_topk), (True, reverse_kl_topk)):
        loss, grad = grads(fn, s, ids, logprobs, mask, chunk_size=4)
        if reverse:  # the teacher's tail is 0 where the student's is not: +inf, as documented
            assert loss.item() == math.inf
            continue
        ref, ref_grad = grads(partial(ref_topk, reverse=False), s.to(F64), ids, logprobs, mask, tau=1.0)
        torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-6)
        assert_grad_close(grad, ref_grad, torch.float32)


def test_reverse_topk_with_a_one_hot_student():
    """Student mass 1 on a top-k id b: the loss is -log P_b and the gradient q_j (log Q_b - log P_b - KL)
    is exactly 0 (q_j = 0 off b, and log Q_b - log P_b = KL on b)."""
    s = torch.full((1, 2, 6), NEG_INF)
    s[0, :, 3] = 0.0
    ids = torch.tensor([[[3, 1], [1, 3]]])
    logprobs = torch.tensor([[[0.5, 0.2], [0.6, 0.25]]]).log()
    loss, grad = grads(reverse_kl_topk, s, ids, logprobs, torch.ones(1, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2, rel=1e-6)
    assert torch.equal(grad, torch.zeros_like(grad))
