"""The teacher side of distillation: tokenizer checks, the online teacher, teacher generations.

Training consumes a *teacher source*, an object with ``targets(batch, device, epoch)`` (the teacher's
output for a batch of epoch ``epoch``, counted from 1, in the form ``training.kd_loss`` takes) and ``state()`` /
``load_state(state)`` (what a resumed run must restore). Two exist: :class:`OnlineTeacher`
here (dense logits from the model on every batch) and ``teacher_cache.TeacherCache`` (sparse
targets read from disk).
"""

from __future__ import annotations

import torch

from kd_utils.batches import forward
from kd_utils.data import Example
from kd_utils.evaluation import generate
from kd_utils.protocols import DEFAULT_PROTOCOL, get_protocol
from kd_utils.tasks import build_prompt


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> int:
    """Teacher and student must share a vocabulary; returns its size (embedding rows beyond it are padding)."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab != t_vocab:
        only_s, only_t = len(s_vocab.keys() - t_vocab.keys()), len(t_vocab.keys() - s_vocab.keys())
        raise ValueError(f"teacher and student tokenizers differ (student {len(s_vocab)} tokens, teacher "
                         f"{len(t_vocab)}; {only_s} only in the student, {only_t} only in the teacher, or ids "
                         "differ). KD needs a shared tokenizer: pick models of the same family.")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(student_tokenizer, name) != getattr(teacher_tokenizer, name):
            raise ValueError(f"teacher and student tokenizers differ in {name}")
    return len(s_vocab)


def teacher_signal(teacher_logits: torch.Tensor, noise_sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """The teacher's logits, with fresh Gaussian noise of std ``noise_sigma`` (the noise ablation)."""
    if noise_sigma == 0:
        return teacher_logits
    # drawn where the logits live: a [B, T, V] tensor from the CPU at every step would cost a copy each time
    noise = torch.randn(teacher_logits.shape, generator=generator, device=teacher_logits.device,
                        dtype=teacher_logits.dtype)
    return teacher_logits + noise_sigma * noise


class OnlineTeacher:
    """The teacher model run on every batch; with ``noise_sigma`` > 0, fresh noise on its logits at every step."""

    def __init__(self, model, noise_sigma: float = 0.0, seed: int = 0, device=None):
        self.model = (model.to(device) if device is not None else model).eval()
        self.noise_sigma = noise_sigma
        self.generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed + 1)

    @torch.no_grad()
    def targets(self, batch: dict, device=None, epoch: int = 1) -> torch.Tensor:
        """Dense teacher logits [B, T, V] for the batch (noise added; fresh at every step, so ``epoch`` plays no part)."""
        # fp32 logits (and noise) whatever precision the forward pass ran in
        return teacher_signal(forward(self.model, batch).float(), self.noise_sigma, self.generator)

    def state(self) -> dict:
        return {"noise_gen": self.generator.get_state().tolist()}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["noise_gen"], dtype=torch.uint8))  # a CPU ByteTensor on any device


def teacher_rationales(teacher, tokenizer, examples: list[Example], max_new_tokens: int = 256,
                       batch_size: int = 16, protocol: str = DEFAULT_PROTOCOL, precision: str = "fp32") -> list[Example]:
    """seqkd's training set: the same prompts with the teacher's greedy generations as rationales.

    A generation cut at ``max_new_tokens`` is marked incomplete, so its training row gets no EOS
    (the student must not learn to stop mid-rationale).
    """
    template = get_protocol(protocol).train_template  # the prompt the teacher was fine-tuned on
    prompts = [build_prompt(e.instruction, e.input, template) for e in examples]
    outputs, finished = generate(teacher, tokenizer, prompts, max_new_tokens, batch_size, desc="teacher rationales",
                                 return_finished=True, precision=precision)
    return [Example(e.id, e.task, e.domain, e.instruction, e.input, e.answer, out, complete=done)
            for e, out, done in zip(examples, outputs, finished)]
