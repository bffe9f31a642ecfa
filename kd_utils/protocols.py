"""The two protocols a study can run: ``paper`` (the authors' code, as far as it can be followed) and ``improved``.

Each known point where the authors' code (LCS2-IIITD/KD_generalization, ``generative/``) and our
considered choice differ is one field here; training and evaluation read these fields and
nothing else decides them. docs/protocols.md argues each ``improved`` choice.

What ``paper`` cannot match: the authors' training files (LLM-Adapters' math_10k / commonsense_15k are
rebuilt from public train splits, ``kd_utils.data.build_training_mix``: AQuA train, HellaSwag train and
the ChatGPT rationales of math_10k are not available), their random streams (data order, LoRA init,
sampling), their hardware (fp16 on their GPUs; a CPU has no fast fp16, so ``paper`` runs in fp32 there), and
their GKD validation loss, which is computed on on-policy samples about half the time
(kd_trainer.py ``compute_loss`` samples during evaluation too); ours is the cross-entropy of the held-out rows.

Each field is switchable on its own: ``"improved[train_on_inputs=true]"`` is the improved protocol
with the paper's train-on-inputs, and that string is the protocol's name wherever a run records it
(params, results.csv). Study files may write it as a mapping, ``{name: improved, train_on_inputs: true}``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace

from kd_utils.constants import PRECISIONS
from kd_utils.tasks import PROMPT_TEMPLATES


@dataclass(frozen=True)
class Protocol:
    name: str
    # training
    train_on_inputs: bool  # prompt tokens in the cross-entropy (labels = input ids)
    warmup_steps: int | None  # linear warmup in optimizer steps; None: TrainConfig.warmup_ratio decides
    val_examples: int | None  # held-out examples; None: TrainConfig.val_fraction decides
    best_checkpoint: bool  # reload the epoch with the lowest validation loss at the end
    kd_positions: str  # fkl / rkl: "paper" (every attention-mask position, the last included), "next_token"
    #                    (the predictions of real next tokens: the last position dropped) or "response"
    gkd_uses_tau: bool  # divide both logits by tau inside the generalized JSD
    gkd_positions: str  # "labels": every position with a label (prompt too under train_on_inputs); "response"
    joint_tokenization: bool  # tokenize prompt + response as one string (prompt length from the prompt alone)
    train_template: str  # prompt template id (kd_utils.tasks.PROMPT_TEMPLATES)
    max_grad_norm: float | None  # clip the gradient norm at every optimizer step; None: no clipping
    # validation loss every N optimizer steps, the candidates of best_checkpoint; None: per epoch
    eval_steps: int | None
    # gkd on-policy prompt: "joint" (the row's first prompt_len tokens) or "prompt" (tokenized alone)
    policy_prompt: str
    policy_retokenize: bool  # decode the samples (special tokens, EOS too, dropped) and tokenize the text again
    precision: str  # "auto", "fp32", "bf16" (autocast on fp32 weights) or "fp16" (fp16 base weights + autocast on a
    #                 GPU); kd_utils.precision.resolve says what runs on this machine, and runs record that
    # evaluation
    eval_template: str
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eval_seed: int | None = None  # the sampling seed of evaluation; None: the run's seed
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
    # kd_trainer.py L262/L266: sequence_(reverse_)kl_divergence(..., inputs["attention_mask"]): every real
    # position, the last one (whose logits predict past the sequence) included; per-sequence mean, batch mean (L50-51)
    kd_positions="paper",
    # kd_trainer.py: generalized_jsd_loss(student_logits, teacher_logits, ...) with no temperature argument
    gkd_uses_tau=False,
    # kd_trainer.py: the JSD mask is labels != -100, which includes the prompt when train_on_inputs
    gkd_positions="labels",
    # finetune.py: tokenize(generate_prompt(data_point)) on the whole text; user_prompt_len from the prompt alone
    joint_tokenization=True,
    # finetune.py: generate_prompt (indented, trailing spaces)
    train_template="paper_train",
    # finetune.py L419: TrainingArguments(...) sets no max_grad_norm: the Trainer's default, 1.0
    max_grad_norm=1.0,
    # finetune.py L63 eval_step=200, L428-434: evaluation_strategy="steps", eval_steps, load_best_model_at_end
    eval_steps=200,
    # kd_trainer.py L181-185: the prompt is masked_select(input_ids, prompt_attention_mask), i.e. the first
    # user_prompt_len tokens of the joint prompt + response tokenization (finetune.py L271-275)
    policy_prompt="joint",
    # kd_trainer.py L216-221: batch_decode(skip_special_tokens=True), tokenizer(seqs, padding=True), pads -> -100
    policy_retokenize=True,
    # finetune.py L207-211 torch_dtype=torch.float16, L425 fp16=True (LoRA weights and logits stay fp32:
    # peft's prepare_model_for_int8_training casts the lm_head output to float32)
    precision="fp16",
    # evaluate.py / commonsense_evaluate.py: generate_prompt (indented, differs from finetune.py's)
    eval_template="paper_eval",
    # eval_args.json: "do-sample": true, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_beams": 1
    do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    # eval_args.json: "seed": 6 (evaluate.py L39-42: set_seed(args.seed))
    eval_seed=6,
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
    # no clipping: under Adam a constant loss scale (tau^2) does not change the step; kept as the runs
    # before this field were trained (benchmarks/protocol_ablation.py measures clipping)
    max_grad_norm=None,
    eval_steps=None,
    policy_prompt="prompt",  # the prompt as evaluation tokenizes it (equal to "joint" under separate tokenization)
    policy_retokenize=False,  # the sampled tokens themselves, EOS included: no decode / encode round trip
    # bf16 autocast on fp32 weights where the hardware has bf16 (GPUs, CPUs with native bf16), fp32 elsewhere;
    # benchmarks/precision_parity.py measures what it changes
    precision="auto",
    eval_template="clean",  # one template for training and evaluation
    do_sample=False, temperature=1.0, top_k=0, top_p=1.0,  # greedy: no sampling noise in accuracy differences
    max_new_tokens={"math": 256, "commonsense": 32},  # a label word needs few tokens
    cut_at_second_response=False,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PAPER, IMPROVED)}
DEFAULT_PROTOCOL = "improved"

# the values a switched field may take (max_new_tokens is switched per domain by evaluation.max_new_tokens)
KD_POSITIONS = ("paper", "next_token", "response")
_CHOICES = {"kd_positions": KD_POSITIONS, "gkd_positions": ("labels", "response"),
            "policy_prompt": ("joint", "prompt"), "precision": PRECISIONS,
            "train_template": tuple(PROMPT_TEMPLATES), "eval_template": tuple(PROMPT_TEMPLATES)}
_KINDS = {f.name: f.type for f in fields(Protocol) if f.name not in ("name", "max_new_tokens")}
_SPEC = re.compile(r"^(?P<base>[a-z_]+)(?:\[(?P<overrides>[^\]]*)\])?$")


def _parse_value(key: str, raw: object) -> object:
    kind, text = _KINDS[key], str(raw).strip()
    low = text.lower()
    if kind == "bool":
        if low not in ("true", "false"):
            raise ValueError(f"protocol: {key} must be true or false, got {raw!r}")
        return low == "true"
    if "None" in kind and low in ("none", "null"):
        return None
    if kind.startswith("int"):
        if isinstance(raw, bool) or not re.fullmatch(r"-?\d+", text):
            raise ValueError(f"protocol: {key} must be an integer{' or null' if 'None' in kind else ''}, got {raw!r}")
        if key == "eval_steps" and int(text) < 1:
            raise ValueError(f"protocol: eval_steps must be >= 1 or null, got {raw!r}")
        return int(text)
    if kind.startswith("float"):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"protocol: {key} must be a number{' or null' if 'None' in kind else ''}, "
                             f"got {raw!r}") from None
        if key == "max_grad_norm" and not value > 0:
            raise ValueError(f"protocol: max_grad_norm must be > 0 or null, got {raw!r}")
        return value
    if text not in _CHOICES[key]:
        raise ValueError(f"protocol: {key} must be one of {', '.join(_CHOICES[key])}, got {raw!r}")
    return text


def protocol_spec(base: str, overrides: dict | None = None) -> str:
    """The canonical name of ``base`` with some fields switched: ``improved[gkd_uses_tau=false,...]``.

    Fields are sorted and values normalised, so equal protocols get equal names (and equal run ids);
    a field switched to the base's own value is dropped.
    """
    if base not in PROTOCOLS:
        raise ValueError(f"protocol: unknown protocol {base!r}; expected one of {', '.join(PROTOCOLS)}")
    parsed = {}
    for key, raw in (overrides or {}).items():
        if key not in _KINDS:
            raise ValueError(f"protocol: {key!r} is not a switchable protocol field; "
                             f"expected one of {', '.join(_KINDS)}"
                             + (" (token budgets: evaluation.max_new_tokens)" if key == "max_new_tokens" else ""))
        value = _parse_value(key, raw)
        if value != getattr(PROTOCOLS[base], key):
            parsed[key] = value
    if not parsed:
        return base
    text = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) or v is None else v}"
                    for k, v in sorted(parsed.items()))
    return f"{base}[{text}]"


def get_protocol(name: str | dict | Protocol) -> Protocol:
    """The protocol ``name`` (``paper``, ``improved``, or either with switched fields, see ``protocol_spec``).

    A mapping ``{name: base, field: value, ...}`` is accepted too. Clear errors name the allowed values.
    """
    if isinstance(name, Protocol):
        return name
    if isinstance(name, dict):
        rest = {k: v for k, v in name.items() if k != "name"}
        name = protocol_spec(name.get("name", DEFAULT_PROTOCOL), rest)
    match = _SPEC.match(name) if isinstance(name, str) else None
    if match is None or match["base"] not in PROTOCOLS:
        raise ValueError(f"protocol: unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}, "
                         f"optionally with switched fields, e.g. improved[train_on_inputs=true]")
    overrides = {}
    for item in filter(None, (match["overrides"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"protocol: {item!r} in {name!r} is not field=value")
        overrides[key.strip()] = value.strip()
    canonical = protocol_spec(match["base"], overrides)
    return replace(PROTOCOLS[match["base"]], name=canonical, **{
        k: _parse_value(k, v) for k, v in overrides.items()})
