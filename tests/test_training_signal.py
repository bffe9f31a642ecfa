"""The training signal pinned by hand on hand-built batches, for each method and each protocol.

Position t of a row predicts token t + 1. The batches cover a full row, a right-padded row, a
truncated row (no EOS), a prompt cut before its response, and a left-padded on-policy row; the
expected labels, cross-entropy and KD positions are written out literally, and the losses are
computed here from their definitions in float64.
"""

import pytest
import torch

from kd_utils import objectives
from kd_utils.training import TrainConfig

P, R, E, PAD = 7, 3, 2, 0  # a prompt token, a response token, EOS, padding (their ids do not matter)
_ = -100
INPUT_IDS = torch.tensor([
    [P, P, P, R, R, E],  # prompt 3, response 2 + EOS
    [P, P, R, E, PAD, PAD],  # right-padded
    [P, P, P, P, R, R],  # truncated inside its response: no EOS
    [P, P, P, P, P, PAD],  # a prompt cut before its response
    [PAD, P, P, R, E, PAD],  # on-policy: left-padded prompt, nothing kept after EOS
])
ATTENTION = torch.tensor([
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 1, 0],
])
RESPONSE = torch.tensor([
    [0, 0, 0, 1, 1, 1],
    [0, 0, 1, 1, 0, 0],
    [0, 0, 0, 0, 1, 1],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 0],
]).bool()
LABELS = {
    "improved": torch.tensor([  # response only (train_on_inputs=False)
        [_, _, _, R, R, E],
        [_, _, R, E, _, _],
        [_, _, _, _, R, R],
        [_, _, _, _, _, _],
        [_, _, _, R, E, _],
    ]),
    "paper": torch.tensor([  # train_on_inputs=True: every real token, the prompt too (finetune.py)
        [P, P, P, R, R, E],
        [P, P, R, E, _, _],
        [P, P, P, P, R, R],
        [P, P, P, P, P, _],
        [_, P, P, R, E, _],
    ]),
}
BATCHES = {name: {"input_ids": INPUT_IDS, "attention_mask": ATTENTION, "labels": labels, "response_mask": RESPONSE}
           for name, labels in LABELS.items()}
# (row, position) pairs whose next token is labelled: the cross-entropy terms
CE_POSITIONS = {
    "improved": [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (2, 3), (2, 4), (4, 2), (4, 3)],
    # as in HF's shifted loss, the on-policy row's left pad (4, 0) predicts its first, labelled, prompt token
    "paper": [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4),
              (3, 0), (3, 1), (3, 2), (3, 3), (4, 0), (4, 1), (4, 2), (4, 3)],
}
# fkl / rkl under paper: every attention-mask position, the last real one too (kd_trainer.py passes
# inputs["attention_mask"] as pad_mask), over all 6 positions
PAPER_KD_MASK = ATTENTION.tolist()
# KD masks over the 5 next-token predictions of each row
NEXT_TOKEN_MASK = [  # kd_positions="next_token": every real position followed by a real token
    [1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0],
    [0, 1, 1, 1, 0],
]
RESPONSE_MASK = [  # improved (and distill_positions="response"): the positions that predict a response token
    [0, 0, 1, 1, 1],
    [0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0],
]
PAPER_GKD_MASK = [  # gkd under paper: labels != -100 over all 6 positions, unshifted (kd_trainer.py)
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 0],
    [0, 1, 1, 1, 1, 0],
]
KD_MASKS = {("fkl", "paper"): PAPER_KD_MASK, ("rkl", "paper"): PAPER_KD_MASK, ("gkd", "paper"): PAPER_GKD_MASK,
            ("fkl", "improved"): RESPONSE_MASK, ("rkl", "improved"): RESPONSE_MASK, ("gkd", "improved"): RESPONSE_MASK}


def logits(seed: int, vocab: int = 11) -> torch.Tensor:
    return 3 * torch.randn(5, 6, vocab, generator=torch.Generator().manual_seed(seed))


def reference_ce(x: torch.Tensor, labels: torch.Tensor, positions: list[tuple[int, int]]) -> float:
    logp = torch.log_softmax(x.double(), -1)
    return -torch.stack([logp[b, t, labels[b, t + 1]] for b, t in positions]).mean().item()


@pytest.mark.parametrize("protocol", ["improved", "paper"])
def test_lm_loss_is_the_next_token_cross_entropy_on_the_literal_positions(protocol):
    x = logits(0)
    expected = reference_ce(x, LABELS[protocol], CE_POSITIONS[protocol])
    assert objectives.lm_loss(x, LABELS[protocol]).double() == pytest.approx(expected, rel=1e-6)


def test_lm_loss_without_any_labelled_token_is_zero_not_nan():
    x = logits(0).requires_grad_()
    loss = objectives.lm_loss(x, torch.full((5, 6), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all() and not x.grad.any()


@pytest.mark.parametrize("method, protocol", sorted(KD_MASKS))
def test_distill_mask_of_each_method_and_protocol(method, protocol):
    mask = objectives.distill_mask(BATCHES[protocol], TrainConfig(method=method, protocol=protocol))
    assert mask.tolist() == [[bool(v) for v in row] for row in KD_MASKS[method, protocol]]


@pytest.mark.parametrize("method, positions, expected", [
    ("fkl", "next_token", NEXT_TOKEN_MASK), ("rkl", "response", RESPONSE_MASK), ("rkl", "paper", PAPER_KD_MASK)])
def test_distill_positions_overrides_the_protocol_for_fkl_rkl(method, positions, expected):
    for protocol in ("paper", "improved"):
        config = TrainConfig(method=method, protocol=protocol, distill_positions=positions)
        assert objectives.distill_mask(BATCHES[protocol], config).tolist() == [[bool(v) for v in r] for r in expected]


def reference_kd(method: str, s: torch.Tensor, t: torch.Tensor, mask: list[list[int]], tau: float,
                 beta: float = 0.5) -> float:
    """Losses from their definitions over the literal mask (its width says which positions' logits):
    per-sequence means (fkl, rkl, x tau^2) or a pooled token mean (gkd's generalized JSD)."""
    width = len(mask[0])
    logq = torch.log_softmax(s[:, :width].double() / tau, -1)
    logp = torch.log_softmax(t[:, :width].double() / tau, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
    if method == "gkd":
        logm = torch.log(beta * logq.exp() + (1 - beta) * logp.exp())
        per_pos = beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)
        terms = [per_pos[b, i] for b, row in enumerate(mask) for i, m in enumerate(row) if m]
        return torch.stack(terms).mean().item()
    per_pos = kl(logp, logq) if method == "fkl" else kl(logq, logp)
    rows = [torch.stack([per_pos[b, i] for i, m in enumerate(row) if m]).mean()
            for b, row in enumerate(mask) if any(row)]
    return tau**2 * torch.stack(rows).mean().item()


# the tau each method's KD term uses at temperature 2: the paper's GKD takes none (kd_trainer.py)
KD_TAU = {("fkl", "paper"): 2.0, ("rkl", "paper"): 2.0, ("gkd", "paper"): 1.0,
          ("fkl", "improved"): 2.0, ("rkl", "improved"): 2.0, ("gkd", "improved"): 2.0}


@pytest.mark.parametrize("method, protocol", sorted(KD_MASKS))
def test_training_loss_is_ce_plus_kd_computed_by_hand(method, protocol):
    """The training loss of a micro-batch: (1 - w) CE + w KD, the KD term at the literal positions,
    dropping the vocabulary rows beyond the tokenizer's (padding of the output layer)."""
    config = TrainConfig(method=method, protocol=protocol, temperature=2.0, kd_weight=0.25)
    s, t = logits(1, vocab=13), logits(2, vocab=13)
    loss, ce, kd = objectives.training_loss(s, BATCHES[protocol], t, config=config, vocab_size=11)
    expected_kd = reference_kd(method, s[..., :11], t[..., :11], KD_MASKS[method, protocol],
                               tau=KD_TAU[method, protocol])
    expected_ce = reference_ce(s, LABELS[protocol], CE_POSITIONS[protocol])
    assert kd.double().item() == pytest.approx(expected_kd, rel=1e-5)
    assert ce.double().item() == pytest.approx(expected_ce, rel=1e-6)
    assert loss.double().item() == pytest.approx(0.75 * expected_ce + 0.25 * expected_kd, rel=1e-5)


@pytest.mark.parametrize("method", ["sft", "seqkd"])
@pytest.mark.parametrize("protocol", ["improved", "paper"])
def test_sft_and_seqkd_train_on_the_cross_entropy_alone(method, protocol):
    s = logits(1)
    loss, ce, kd = objectives.training_loss(s, BATCHES[protocol], None,
                                            config=TrainConfig(method=method, protocol=protocol), vocab_size=11)
    assert loss.item() == ce.item() == pytest.approx(reference_ce(s, LABELS[protocol], CE_POSITIONS[protocol]),
                                                     rel=1e-6)
    assert kd.item() == 0.0


def authors_generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.5, temperature=1.0):
    """kd_trainer.py's generalized_jsd_loss (reduction "batchmean"), re-implemented here in float64."""
    logq = torch.log_softmax(student_logits.double() / temperature, -1)
    logp = torch.log_softmax(teacher_logits.double() / temperature, -1)
    b = torch.tensor(beta, dtype=torch.float64)
    logm = torch.logsumexp(torch.stack([logq + torch.log(b), logp + torch.log(1 - b)]), dim=0)
    kl_teacher = torch.nn.functional.kl_div(logm, logp, reduction="none", log_target=True)  # sum: KL(p_T || M)
    kl_student = torch.nn.functional.kl_div(logm, logq, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def authors_sequence_kl(student_logits, teacher_logits, temperature, pad_mask, reverse=False, epsilon=1e-9):
    """kd_trainer.py's sequence_kl_divergence / sequence_reverse_kl_divergence, re-implemented here in float64:
    KL per position (epsilon added to the probabilities), times the mask, summed per sequence over the mask's
    count, mean over the batch, times tau^2."""
    s = student_logits.double() / temperature
    t = teacher_logits.double() / temperature
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if reverse:
        per_pos = ((logq.exp() + epsilon) * (logq - logp)).sum(-1)
    else:  # F.kl_div(log q, p + eps) = (p + eps) (log(p + eps) - log q)
        p = logp.exp() + epsilon
        per_pos = (p * (p.log() - logq)).sum(-1)
    mask = pad_mask.double()
    return ((per_pos * mask).sum(-1) / mask.sum(-1)).mean() * temperature ** 2


@pytest.mark.parametrize("method", ["fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_paper_fkl_rkl_equal_the_authors_losses_with_the_last_position(method, temperature):
    """Under paper, fkl / rkl are kd_trainer.py's losses on inputs["attention_mask"]: the last real position of
    each row (whose logits predict past the row) counts, and a left-padded row is averaged over its real tokens."""
    for seed in range(3):
        s, t = logits(30 + seed), logits(40 + seed)
        config = TrainConfig(method=method, protocol="paper", temperature=temperature)
        ours = objectives.kd_loss(s, t, objectives.distill_mask(BATCHES["paper"], config), config=config, vocab_size=11)
        theirs = authors_sequence_kl(s, t, temperature, ATTENTION, reverse=method == "rkl")
        assert ours.double().item() == pytest.approx(theirs.item(), rel=1e-6)
        # the last position matters: dropping it (next_token) gives another value
        dropped = TrainConfig(method=method, protocol="paper[kd_positions=next_token]", temperature=temperature)
        other = objectives.kd_loss(s, t, objectives.distill_mask(BATCHES["paper"], dropped), config=dropped,
                                   vocab_size=11)
        assert other.double().item() != pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_paper_gkd_equals_the_authors_generalized_jsd_loss_without_temperature(temperature):
    """kd_trainer.py calls generalized_jsd_loss(student_logits, teacher_logits, labels, beta) with no
    temperature, so every tau of the grid gives the same objective."""
    for seed in range(3):
        s, t = logits(10 + seed), logits(20 + seed)
        config = TrainConfig(method="gkd", protocol="paper", temperature=temperature)
        ours = objectives.kd_loss(s, t, objectives.distill_mask(BATCHES["paper"], config), config=config, vocab_size=11)
        theirs = authors_generalized_jsd_loss(s, t, LABELS["paper"])
        assert ours.double().item() == pytest.approx(theirs.item(), rel=1e-5)


def test_lm_loss_with_one_labelled_token_is_that_tokens_cross_entropy():
    x = logits(0)
    labels = torch.full((5, 6), -100)
    labels[1, 3] = R  # predicted at position 2
    expected = -torch.log_softmax(x[1, 2].double(), -1)[R].item()
    assert objectives.lm_loss(x, labels).double().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["fkl", "rkl"])
def test_kd_loss_against_a_cache_covering_the_whole_vocabulary_is_the_dense_loss(method):
    """A cache's top-k targets with k = V leave no tail: the KD value is the dense loss's, over the tokenizer's
    11 entries of the student's 13 logits, at the literal positions, at temperature 2."""
    config = TrainConfig(method=method, protocol="paper", temperature=2.0, loss_chunk_size=3)
    s, t = logits(1, vocab=13), logits(2, vocab=11)
    logprobs, ids = torch.log_softmax(t[:, :5].double() / 2.0, -1).sort(-1, descending=True)
    teacher = {"topk_ids": ids, "topk_logprobs": logprobs.float()}
    loss = objectives.kd_loss(s, teacher, torch.tensor(NEXT_TOKEN_MASK).bool(), config=config, vocab_size=11)
    expected = reference_kd(method, s[..., :11], t, NEXT_TOKEN_MASK, tau=2.0)
    assert loss.double().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method, sparse", [("fkl", False), ("rkl", False), ("gkd", False), ("fkl", True),
                                            ("rkl", True)])  # a cache serves fkl and rkl only
def test_kd_loss_passes_the_configured_chunk_size_to_the_loss(method, sparse):
    """The loss sees loss_chunk_size: one it cannot use is refused there (an unvalidated config), not replaced."""
    config = TrainConfig(method=method, loss_chunk_size=0)
    s, t = logits(1), logits(2)
    logprobs, ids = torch.log_softmax(t[:, :5], -1).topk(3, -1)
    teacher = {"topk_ids": ids, "topk_logprobs": logprobs} if sparse else t
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
        objectives.kd_loss(s, teacher, torch.tensor(NEXT_TOKEN_MASK).bool(), config=config, vocab_size=11)
