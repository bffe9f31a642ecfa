"""The two protocols a study can run: ``paper`` (what the authors' code does) and ``improved`` (ours).

Every point where the authors' code (LCS2-IIITD/KD_generalization, ``generative/``) and our
considered choice differ is one field here; training and evaluation read these fields and
nothing else decides them. The README's "Protocols" section argues each ``improved`` choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Protocol:
    name: str
    # training
    train_on_inputs: bool  # prompt tokens in the cross-entropy (labels = input ids)
    warmup_steps: int | None  # linear warmup in optimizer steps; None: TrainConfig.warmup_ratio decides
    val_examples: int | None  # held-out examples; None: TrainConfig.val_fraction decides
    best_checkpoint: bool  # reload the epoch with the lowest validation loss at the end
    kd_positions: str  # fkl / rkl: "paper" (every real token, as kd_trainer.py's pad_mask) or "response"
    gkd_uses_tau: bool  # divide both logits by tau inside the generalized JSD
    gkd_positions: str  # "labels": every position with a label (prompt too under train_on_inputs); "response"
    joint_tokenization: bool  # tokenize prompt + response as one string (prompt length from the prompt alone)
    train_template: str  # prompt template id (kd_utils.tasks.PROMPT_TEMPLATES)
    # evaluation
    eval_template: str
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # per domain
    cut_at_second_response: bool = False  # keep the text before a second "### Response:"

    def as_dict(self) -> dict:
        return asdict(self)


PAPER = Protocol(
    name="paper",
    # finetune.py: train(..., train_on_inputs=True); train_args.json does not override it
    train_on_inputs=True,
    # finetune.py: TrainingArguments(warmup_steps=100, ...)
    warmup_steps=100,
    # train_args.json: "val_set_size": 500 (finetune.py: train_test_split(test_size=val_set_size))
    val_examples=500,
    # finetune.py: load_best_model_at_end=True, metric = eval_loss (the Trainer's default)
    best_checkpoint=True,
    # kd_trainer.py: sequence_kl_divergence / sequence_reverse_kl_divergence(..., pad_mask): every real token
    kd_positions="paper",
    # kd_trainer.py: generalized_jsd_loss(student_logits, teacher_logits, ...) with no temperature argument
    gkd_uses_tau=False,
    # kd_trainer.py: the JSD mask is labels != -100, which includes the prompt when train_on_inputs
    gkd_positions="labels",
    # finetune.py: tokenize(generate_prompt(data_point)) on the whole text; user_prompt_len from the prompt alone
    joint_tokenization=True,
    # finetune.py: generate_prompt (indented, trailing spaces)
    train_template="paper_train",
    # evaluate.py / commonsense_evaluate.py: generate_prompt (indented, differs from finetune.py's)
    eval_template="paper_eval",
    # eval_args.json: "do-sample": true, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_beams": 1
    do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    # eval_args.json: "max_new_tokens": 256; commonsense_evaluate.py: --max_new_tokens default 256
    max_new_tokens={"math": 256, "commonsense": 256},
    # evaluate.py: output.split("### Response:")[1].strip() on prompt + generation
    cut_at_second_response=True,
)

IMPROVED = Protocol(
    name="improved",
    train_on_inputs=False,  # SFT and KD learn the same (response) positions: a fair KD-minus-SFT
    warmup_steps=None,
    val_examples=None,
    best_checkpoint=False,  # small validation sets make the best epoch a noisy pick
    kd_positions="response",
    gkd_uses_tau=True,
    gkd_positions="response",  # Agarwal et al. / TRL's GKD distil the response only
    joint_tokenization=False,
    train_template="clean",
    eval_template="clean",  # one template for training and evaluation
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0,  # greedy: no sampling noise in accuracy differences
    max_new_tokens={"math": 256, "commonsense": 32},  # a label word needs few tokens
    cut_at_second_response=False,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PAPER, IMPROVED)}
DEFAULT_PROTOCOL = "improved"


def get_protocol(name: str | Protocol) -> Protocol:
    """The protocol called ``name``; a clear error naming the allowed values otherwise."""
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"protocol: unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}") from None
