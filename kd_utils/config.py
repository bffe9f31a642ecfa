"""Run parameters: one dataclass per kind of run, each field with its default, type, allowed values and help.

As TRL's ``GKDConfig``: every field is ``option(default, help, ...)``, a ``dataclasses.field`` whose
metadata holds one line of help and the allowed values (``choices``, or bounds ``ge`` / ``gt`` / ``le`` /
``lt``; ``null`` says what None means where None is allowed). ``params`` builds the study file's defaults
and checks from these fields, the training entry points build a ``TrainingConfig`` from their keyword
arguments, and a test holds the notebooks' parameters cells to the same defaults.

A light module (the standard library and kd_utils' light modules): validating a study file loads no model code.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Any

from kd_utils.constants import (
    DEFAULT_LOGLIK_METRIC,
    DEFAULT_MIX,
    LOGLIK_METRICS,
    METHODS,
    MIN_MAX_LENGTH,
    MIXES,
    SCORINGS,
)
from kd_utils.protocols import DEFAULT_PROTOCOL, KD_POSITIONS, Protocol, get_protocol

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the paper's LoRA projections


def option(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, null: str | None = None):
    """A dataclass field with its default and, in its metadata, its help and allowed values."""
    metadata = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "null": null}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainingConfig:
    """A training run (teacher fine-tuning or student distillation): the loop's settings and the data it reads.

    The protocol (kd_utils.protocols) fills the fields left None where it names a value.
    """

    method: str = option("sft", "sft, or the KD method (fkl is the paper's SeqKD, rkl its RevKD, gkd, seqkd)",
                         choices=METHODS)
    epochs: int = option(1, "passes over the training mix (the paper: 4 for math, 3 for commonsense)", ge=1)
    batch_size: int = option(16, "effective batch: micro batch x gradient accumulation x processes", ge=1)
    micro_batch_size: int = option(4, "rows per forward pass", ge=1)
    lr: float = option(3e-4, "peak learning rate of AdamW", gt=0)
    lr_scheduler: str = option("linear", "transformers' scheduler name (get_scheduler)")
    warmup_ratio: float = option(0.0, "warmup as a share of all steps, where warmup_steps and the protocol name none",
                                 ge=0, le=1)
    warmup_steps: int | None = option(None, "linear warmup in optimizer steps", ge=0,
                                      null="the protocol's, paper 100 and improved warmup_ratio")
    weight_decay: float = option(0.0, "AdamW's weight decay", ge=0)
    max_length: int = option(256, "tokens per training row (prompt and response), longer rows cut",
                             ge=MIN_MAX_LENGTH)
    lora: bool = option(True, "train LoRA adapters (false: every weight)")
    lora_r: int = option(8, "LoRA rank r of the adapter matrices", ge=1)
    lora_alpha: int = option(16, "LoRA scaling numerator (scale alpha / r)", ge=1)
    lora_dropout: float = option(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lora_target_modules: list[str] = option(list(LORA_TARGET_MODULES), "module names LoRA wraps")
    temperature: float = option(1.0, "KD temperature tau (losses scaled by tau^2)", gt=0)
    noise_sigma: float = option(0.0, "std of Gaussian noise on the teacher's logits (the noise ablation)", ge=0)
    kd_weight: float = option(1.0, "alpha in (1 - alpha) * CE + alpha * KD", ge=0, le=1)
    beta: float = option(0.5, "gkd: the JSD's mixture weight", ge=0, le=1)
    lmbda: float = option(0.5, "gkd: probability of an on-policy (student-sampled) batch", ge=0, le=1)
    gkd_max_new_tokens: int = option(128, "gkd: most tokens a student sample adds", ge=1)
    seqkd_max_new_tokens: int = option(128, "seqkd: most tokens of the teacher generations it trains on", ge=1)
    protocol: str = option(DEFAULT_PROTOCOL, "'paper' or 'improved', with switched fields: 'improved[precision=fp32]'")
    distill_positions: str | None = option(None, "fkl / rkl: which positions' logits are distilled",
                                           choices=KD_POSITIONS, null="the protocol's")
    loss_chunk_size: int | None = option(None, "positions per KD-loss chunk (memory)", ge=1,
                                         null="about 64 MiB of fp32 per chunk buffer")
    val_fraction: float = option(0.1, "held-out share of the mix, where val_examples and the protocol name none",
                                 ge=0, lt=1)
    val_examples: int | None = option(None, "held-out examples", ge=0,
                                      null="the protocol's, paper 500 and improved val_fraction")
    max_steps: int | None = option(None, "cap on optimizer steps per epoch (smoke runs)", ge=0, null="no cap")
    n_train: int | None = option(None, "examples sampled from the mix with the seed", ge=1, null="the whole mix")
    include_mawps: bool = option(False, "math: add MAWPS train (decontaminated against every test set)")
    mix: str = option(DEFAULT_MIX, "training data: the authors' rebuilt (llm_adapters) or the older design mix",
                      choices=MIXES)
    seed: int = option(0, "data order, split, LoRA init, sampling and noise streams", ge=0)

    def validate(self) -> TrainingConfig:
        """Raise ValueError listing every bad field, before any work; the protocol's name made canonical."""
        problems = [p for f in dataclasses.fields(self) for p in value_problems(type(self), f.name,
                                                                                getattr(self, f.name))]
        problems += batch_problems(self.batch_size, self.micro_batch_size)
        try:
            self.protocol = get_protocol(self.protocol).name
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def rules(self) -> Protocol:
        return get_protocol(self.protocol)


@dataclass
class EvaluationConfig:
    """A zero-shot evaluation run: which tasks, how many examples, how answers are produced and scored."""

    tasks: str | list[str] = option("all", "'all', 'core', 'math', 'commonsense', or a list of task ids")
    n_per_task: int | None = option(20, "test examples per task, a fixed-seed sample", ge=1, null="the full test sets")
    batch_size: int = option(16, "prompts per generation batch", ge=1)
    max_new_tokens_math: int | None = option(None, "token budget of a math answer", ge=1, null="the protocol's")
    max_new_tokens_commonsense: int | None = option(None, "token budget of a commonsense answer", ge=1,
                                                    null="the protocol's")
    do_sample: bool | None = option(None, "sample (true) or decode greedily (false)",
                                    null="the protocol's, paper sampled and improved greedy")
    temperature: float | None = option(None, "sampling temperature", gt=0, null="the protocol's")
    top_k: int | None = option(None, "sampling top-k (0: the whole vocabulary)", ge=0, null="the protocol's")
    seed: int = option(0, "picks the n_per_task sample, and the sampling seed where the protocol names none", ge=0)
    protocol: str = option(DEFAULT_PROTOCOL, "prompt template, decoding, budgets and output cut (kd_utils.protocols)")
    scoring: str = option("generate", "generated answers, or the log-likelihood of the answer choices",
                          choices=SCORINGS)
    loglik_metric: str = option(DEFAULT_LOGLIK_METRIC, "loglik: the headline accuracy (acc_norm: per character)",
                                choices=LOGLIK_METRICS)
    dtype: str | None = option(None, "the evaluated model's weight dtype (a torch dtype name)",
                               null="bfloat16 on GPUs that support it, float32 otherwise")


def defaults(cls: type, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The fields' defaults (fresh copies of lists), all of them or ``names`` in that order."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return {name: _default(by_name[name]) for name in (names or by_name)}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def help_text(cls: type, name: str) -> str:
    """A field's help line, with what None means where None is allowed."""
    meta = _field(cls, name).metadata
    return meta["help"] + (f" (None: {meta['null']})" if meta["null"] else "")


_KINDS: dict[Any, tuple[tuple[type, ...], tuple[str, ...]]] = {
    bool: ((bool,), ("true", "false")), int: ((int,), ("an integer",)), float: ((int, float), ("a number",)),
    str: ((str,), ("a string",)), list: ((list,), ("a list",)), type(None): ((type(None),), ("null",))}


def accepted_types(cls: type, name: str) -> tuple[tuple[type, ...], str]:
    """The Python types a field accepts and how a message names them ("an integer or null")."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [typing.get_origin(arg) or arg for arg in (typing.get_args(hint) if typing.get_origin(hint) in
                                                        (typing.Union, UnionType) else (hint,))]
    types = tuple(t for kind in kinds for t in _KINDS[kind][0])
    words = [word for kind in kinds for word in _KINDS[kind][1]]
    said = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    null = _field(cls, name).metadata["null"]
    return types, said + (f" (null: {null})" if null and type(None) in types else "")



def value_problems(cls: type, name: str, value: Any, path: str | None = None) -> list[str]:
    """What is wrong with ``value`` for field ``name`` of ``cls`` (type, bounds, choices), each message
    starting with the key path ``path`` (default: the field's name); empty when it is allowed."""
    path = path or name
    types, words = accepted_types(cls, name)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        return [f"{path}: expected {words}, got {value!r}"]
    meta = _field(cls, name).metadata
    if value is None or isinstance(value, (bool, list)):
        return []
    if meta["choices"] is not None and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"]) + (" or null" if type(None) in types else "")
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return [f"{path}: expected one of {allowed}, got {value!r}{hint}"]
    rule = bounds(cls, name)
    if rule and not _within(value, meta):
        return [f"{path}: {value!r} must be {rule}"]
    return []


def bounds(cls: type, name: str) -> str:
    """A field's numeric bounds in words ("in [0, 1)", ">= 1"), "" when it has none."""
    meta = _field(cls, name).metadata
    low = ("[", meta["ge"]) if meta["ge"] is not None else ("(", meta["gt"]) if meta["gt"] is not None else None
    high = ("]", meta["le"]) if meta["le"] is not None else (")", meta["lt"]) if meta["lt"] is not None else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
    return ""


def _within(value: float, meta: Mapping) -> bool:
    # written so that nan is outside every bound
    return all(ok for ok in (meta["ge"] is None or value >= meta["ge"], meta["gt"] is None or value > meta["gt"],
                             meta["le"] is None or value <= meta["le"], meta["lt"] is None or value < meta["lt"]))


def batch_problems(batch_size: Any, micro_batch_size: Any, where: str = "") -> list[str]:
    """The effective batch must be whole micro batches (checked when both are positive integers)."""
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (batch_size, micro_batch_size)) \
            and batch_size % micro_batch_size:
        return [f"{where}batch_size: {batch_size} must be a multiple of micro_batch_size {micro_batch_size}"]
    return []


def _field(cls: type, name: str) -> dataclasses.Field:
    return cls.__dataclass_fields__[name]


def field_values(cls: type, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``cls``'s fields that ``namespace`` holds (a notebook's parameters: ``globals()``)."""
    return {f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.name in namespace}
