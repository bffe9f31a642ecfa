"""The training signal pinned by hand on a hand-built batch (the default protocol).

Position t of a row predicts token t + 1. The batch covers a full row, a right-padded row, a
truncated row (no EOS), a prompt cut before its response, and a left-padded on-policy row; the
expected cross-entropy and KD positions are written out literally, and the losses are computed
here from their definitions in float64.
"""

import pytest
import torch

from kd_utils import training
from kd_utils.training import TrainConfig

P, R, E, PAD = 7, 3, 2, 0  # a prompt token, a response token, EOS, padding (their ids do not matter)
BATCH = {
    "input_ids": torch.tensor([
        [P, P, P, R, R, E],  # prompt 3, response 2 + EOS
        [P, P, R, E, PAD, PAD],  # right-padded
        [P, P, P, P, R, R],  # truncated inside its response: no EOS
        [P, P, P, P, P, PAD],  # a prompt cut before its response
        [PAD, P, P, R, E, PAD],  # on-policy: left-padded prompt, nothing kept after EOS
    ]),
    "attention_mask": torch.tensor([
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
    ]),
    "labels": torch.tensor([
        [-100, -100, -100, R, R, E],
        [-100, -100, R, E, -100, -100],
        [-100, -100, -100, -100, R, R],
        [-100, -100, -100, -100, -100, -100],
        [-100, -100, -100, R, E, -100],
    ]),
}
# (row, position) pairs whose next token is a labelled response token: the cross-entropy terms
RESPONSE_POSITIONS = [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (2, 3), (2, 4), (4, 2), (4, 3)]
# KD masks over the 5 next-token predictions of each row
PAPER_MASK = [  # fkl / rkl by default: every real position followed by a real token
    [1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1],
    [1, 1, 1, 1, 0],
    [0, 1, 1, 1, 0],
]
RESPONSE_MASK = [  # gkd, and distill_positions="response": the positions that predict a response token
    [0, 0, 1, 1, 1],
    [0, 1, 1, 0, 0],
    [0, 0, 0, 1, 1],
    [0, 0, 0, 0, 0],
    [0, 0, 1, 1, 0],
]


def logits(seed: int, vocab: int = 11) -> torch.Tensor:
    return 3 * torch.randn(5, 6, vocab, generator=torch.Generator().manual_seed(seed))


def test_lm_loss_is_the_next_token_cross_entropy_on_response_positions():
    x = logits(0)
    logp = torch.log_softmax(x.double(), -1)
    targets = BATCH["labels"]
    expected = -torch.stack([logp[b, t, targets[b, t + 1]] for b, t in RESPONSE_POSITIONS]).mean()
    assert training.lm_loss(x, targets).double() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("method, positions, expected", [
    ("fkl", "paper", PAPER_MASK),
    ("rkl", "paper", PAPER_MASK),
    ("fkl", "response", RESPONSE_MASK),
    ("rkl", "response", RESPONSE_MASK),
    ("gkd", "paper", RESPONSE_MASK),  # gkd distils the response whatever distill_positions says
    ("gkd", "response", RESPONSE_MASK),
])
def test_distill_mask_positions(method, positions, expected):
    mask = training.distill_mask(BATCH, TrainConfig(method=method, distill_positions=positions))
    assert mask.tolist() == [[bool(v) for v in row] for row in expected]


def reference_kd(method: str, s: torch.Tensor, t: torch.Tensor, mask: list[list[int]], tau: float,
                 beta: float = 0.5) -> float:
    """Losses from their definitions over the literal mask: per-sequence means (fkl, rkl, x tau^2)
    or a pooled token mean (gkd's generalized JSD)."""
    logq = torch.log_softmax(s[:, :-1].double() / tau, -1)
    logp = torch.log_softmax(t[:, :-1].double() / tau, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
    if method == "gkd":
        logm = torch.log(beta * logq.exp() + (1 - beta) * logp.exp())
        per_pos = beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)
        terms = [per_pos[b, i] for b, row in enumerate(mask) for i, m in enumerate(row) if m]
        return torch.stack(terms).mean().item()
    per_pos = kl(logp, logq) if method == "fkl" else kl(logq, logp)
    rows = [torch.stack([per_pos[b, i] for i, m in enumerate(row) if m]).mean() for b, row in enumerate(mask) if any(row)]
    return tau**2 * torch.stack(rows).mean().item()


@pytest.mark.parametrize("method, expected_mask", [("fkl", PAPER_MASK), ("rkl", PAPER_MASK), ("gkd", RESPONSE_MASK)])
def test_kd_loss_on_the_hand_built_batch(method, expected_mask):
    """The KD term of the training loss: the student's and teacher's next-token predictions at the
    literal positions, dropping the vocabulary rows beyond the tokenizer's (padding of the output layer)."""
    config = TrainConfig(method=method, temperature=2.0)
    s, t = logits(1, vocab=13), logits(2, vocab=13)
    loss = training.kd_loss(s, t, training.distill_mask(BATCH, config), config, vocab_size=11)
    expected = reference_kd(method, s[..., :11], t[..., :11], expected_mask, tau=2.0)
    assert loss.double().item() == pytest.approx(expected, rel=1e-5)
