"""The teacher side of distillation: tokenizer checks, the teachers a run distils from, teacher generations.

``training.train`` takes one *teacher*: :class:`OnlineTeacher` (the model run on every batch) or
:class:`CachedTeacher` (a teacher cache directory). ``open(...)`` binds it to a run (its tokenizer, training
rows, config and device) and returns the *teacher source* the loop reads: an object with
``targets(batch, device, epoch)`` (the teacher's output for a batch of epoch ``epoch``, counted from 1, in the
form ``objectives.kd_loss`` takes) and ``state()`` / ``load_state(state)`` (what a resumed run must restore):
the online teacher itself (dense logits), or ``teacher_cache.TeacherCache`` (sparse targets read from disk).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kd_utils.batches import forward
from kd_utils.cache_reader import open_for_training
from kd_utils.config import TrainingConfig
from kd_utils.data import Example
from kd_utils.evaluation import generate
from kd_utils.protocols import DEFAULT_PROTOCOL, get_protocol
from kd_utils.seeds import TEACHER_NOISE, stream_seed
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
    """The teacher model run on every batch; with ``noise_sigma`` > 0, fresh noise on its logits at every step.

    ``tokenizer``: the teacher's, checked against the student's (None: the student's own).
    """

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.noise_sigma, self.generator = 0.0, None

    def open(self, *, tokenizer, train_examples: list[Example], config: TrainingConfig, device=None) -> OnlineTeacher:
        """Bound to a run: the shared vocabulary checked, the model on ``device``, the noise stream seeded."""
        check_same_tokenizer(tokenizer, self.tokenizer or tokenizer)
        self.model = (self.model.to(device) if device is not None else self.model).eval()
        self.noise_sigma = config.noise_sigma
        self.generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(
            stream_seed(config.seed, TEACHER_NOISE))
        return self

    @torch.no_grad()
    def targets(self, batch: dict, device=None, epoch: int = 1) -> torch.Tensor:
        """Dense teacher logits [B, T, V] for the batch, noise added (fresh at every step: ``epoch`` plays no part)."""
        # fp32 logits (and noise) whatever precision the forward pass ran in
        return teacher_signal(forward(self.model, batch).float(), self.noise_sigma, self.generator)

    def state(self) -> dict:
        return {"noise_gen": self.generator.get_state().tolist()}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["noise_gen"], dtype=torch.uint8))  # a CPU ByteTensor on any device


class CachedTeacher:
    """A teacher cache directory (``teacher_cache.run_teacher_cache``) in place of the teacher: fkl and rkl.

    ``expect``: further cache fields it must match (``teacher_cache.open_for_training``), such as the
    teacher's identity and the seed.
    """

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path, self.expect = path, expect

    def open(self, *, tokenizer, train_examples: list[Example], config: TrainingConfig, device=None):
        """The cache after checking that it was made for this run (ValueError naming each differing field)."""
        return open_for_training(self.path, tokenizer=tokenizer, train_examples=train_examples,
                                             method=config.method, temperature=config.temperature,
                                             noise_sigma=config.noise_sigma, max_length=config.max_length,
                                             epochs=config.epochs, expect=self.expect)


def teacher_rationales(teacher, tokenizer, examples: list[Example], max_new_tokens: int = 256,
                       batch_size: int = 16, protocol: str = DEFAULT_PROTOCOL,
                       precision: str = "fp32") -> list[Example]:
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
