"""Log-likelihood scoring of answer choices for the multiple-choice commonsense tasks.

The lm-evaluation-harness convention (EleutherAI/lm-evaluation-harness, ``lm_eval/tasks/*``):
each choice is a continuation of a context, scored by the summed log-probability of its tokens;
``acc`` picks the highest sum, ``acc_norm`` the highest sum divided by the continuation's
characters (``lm_eval/api/task.py``, ``process_results`` for ``multiple_choice``). Contexts per
task, from the harness's task files, built from what the LLM-Adapters test files hold:

- piqa, arc_e, arc_c: ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``;
- obqa: ``"{question}"`` + ``" {choice}"`` (openbookqa.yaml: doc_to_text is the question stem);
- siqa: ``"Q: {context and question}\\nA:"`` + ``" {choice}"`` (siqa.yaml; LLM-Adapters joins
  context and question in one string);
- boolq: ``"Question: {question}\\nAnswer:"`` + ``" yes"`` / ``" no"``. The harness prefixes the
  passage; the LLM-Adapters boolq file has no passage, so the question stands alone;
- winogrande: partial scoring (preprocess_winogrande.py): the context is the sentence up to the
  blank with each option filled in, the continuation the rest of the sentence, the same for both
  options, so ``acc_norm`` equals ``acc`` there;
- hellaswag: ``"{activity: context}"`` + ``" {ending}"`` (hellaswag utils.py's query).

The choices are parsed from the LLM-Adapters instruction text (``parse_item``); the gold index is
the position of the answer's label word in the task's labels. A prediction's ``prediction`` is the
chosen choice's label word, so agreement and error consistency compare loglik answers like generated ones.

Tokenisation follows the harness's ``_encode_pair``: trailing spaces of the context move to the
continuation, the joined text is tokenised once, and the continuation is what follows the
context's own token count. Each (item, choice) request is one row of a left-padded batch; only the
positions that predict continuation tokens get logits, and only the target tokens' log-probabilities
are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from kd_utils.constants import CHOICE_TASKS, DEFAULT_LOGLIK_METRIC, LOGLIK_METRICS, SCORINGS  # noqa: F401 (public here too)
from kd_utils.tasks import get_task

METRICS, DEFAULT_METRIC = LOGLIK_METRICS, DEFAULT_LOGLIK_METRIC


class ChoiceParseError(ValueError):
    """An instruction that does not hold the task's question and choices in the LLM-Adapters layout."""


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: a (context, continuation) request per choice, the gold index."""

    task: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choice_texts: tuple[str, ...]  # the options as written in the test file
    labels: tuple[str, ...]  # each choice's label word ("answer1", ...), from the item's answer format
    label: int

    @property
    def norm_lengths(self) -> tuple[int, ...]:
        """Characters that acc_norm divides by: the scored continuation's, without its leading delimiter."""
        return tuple(len(c.lstrip(" ")) for c in self.continuations)


_PREFIX = {
    "boolq": r"Please answer the following question with true or false, question: ",
    "piqa": r"Please choose the correct solution to the question: ",
    "siqa": r"Please choose the correct answer to the question: ",
    "arc_e": r"Please choose the correct answer to the question: ",
    "arc_c": r"Please choose the correct answer to the question: ",
    "obqa": r"Please choose the correct answer to the question: ",
    "winogrande": r"Please choose the correct answer to fill in the blank to complete the given sentence: ",
    "hellaswag": r"Please choose the correct ending to complete the given sentence: ",
}
_MARKER = {"piqa": "Solution", "siqa": "Answer", "arc_e": "Answer", "arc_c": "Answer", "obqa": "Answer",
           "winogrande": "Option", "hellaswag": "Ending"}
_FORMAT = re.compile(r"\s*Answer format: ([\w/]+)\s*$")


def _split_options(task_id: str, body: str, n: int) -> tuple[str, list[str]]:
    """(question, the n options) from "question\\n\\nMarker1: a Marker2: b ...", markers found in order."""
    marker = _MARKER[task_id]
    starts = []
    pos = 0
    for k in range(1, n + 1):
        at = body.find(f"{marker}{k}:", pos)
        if at < 0:
            raise ChoiceParseError(f"{task_id}: no '{marker}{k}:' in {body[:200]!r}")
        starts.append(at)
        pos = at + len(marker) + 2
    question = body[:starts[0]].strip()
    options = [body[s + len(f"{marker}{k}:"):e].strip()
               for k, s, e in zip(range(1, n + 1), starts, starts[1:] + [len(body)])]
    if not question or any(not o for o in options):
        raise ChoiceParseError(f"{task_id}: empty question or option in {body[:200]!r}")
    return question, options


def parse_item(task_id: str, instruction: str, answer: str) -> ChoiceItem:
    """The task's requests and gold index from an LLM-Adapters test record's instruction and answer."""
    task = get_task(task_id)
    if task_id not in CHOICE_TASKS:
        raise ChoiceParseError(f"{task_id}: not a multiple-choice task (loglik scores {', '.join(CHOICE_TASKS)})")
    prefix = _PREFIX[task_id]
    if not instruction.startswith(prefix):
        raise ChoiceParseError(f"{task_id}: instruction does not start with {prefix!r}: {instruction[:120]!r}")
    fmt = _FORMAT.search(instruction)
    if fmt is None:
        raise ChoiceParseError(f"{task_id}: no 'Answer format: ...' line in {instruction[-120:]!r}")
    labels = fmt.group(1).split("/")
    if labels != list(task.labels[:len(labels)]) or len(labels) < 2:  # the options are read as Marker1, Marker2, ...
        raise ChoiceParseError(f"{task_id}: answer format {fmt.group(1)!r} is not the first labels of {task.labels}")
    body = instruction[len(prefix):fmt.start()]
    answer = str(answer).strip()
    if answer not in labels:
        raise ChoiceParseError(f"{task_id}: answer {answer!r} is not one of the item's labels {labels}")
    label = labels.index(answer)
    if task_id == "boolq":
        question = body.strip()
        words = {"true": "yes", "false": "no"}  # the harness's choices, in the order of this item's labels
        return ChoiceItem(task_id, (f"Question: {question}\nAnswer:",) * 2, tuple(f" {words[w]}" for w in labels),
                          tuple(labels), tuple(labels), label)
    question, options = _split_options(task_id, body, len(labels))
    if task_id == "winogrande":
        if question.count("_") != 1:
            raise ChoiceParseError(f"winogrande: expected one blank '_' in {question!r}")
        before, after = question.split("_")
        rest = after.strip()
        if not rest:
            raise ChoiceParseError(f"winogrande: nothing after the blank in {question!r}")
        return ChoiceItem(task_id, tuple(before + o for o in options), (f" {rest}",) * len(options),
                          tuple(options), tuple(labels), label)
    context = {"siqa": f"Q: {question}\nA:", "obqa": question, "hellaswag": question}.get(
        task_id, f"Question: {question}\nAnswer:")
    return ChoiceItem(task_id, (context,) * len(options), tuple(f" {o}" for o in options), tuple(options),
                      tuple(labels), label)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's ``_encode_pair``: trailing spaces of the context move
    to the continuation, the whole is tokenised once and split after the context's own token count."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    if n_context >= len(whole):
        raise ValueError(f"no continuation tokens left for {continuation!r} after {context[-80:]!r}")
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16) -> np.ndarray:
    """Summed log-probability of each continuation given its context (float64 array, request order).

    Requests are sorted by length and left-padded, so every continuation ends at the last position
    and one ``logits_to_keep`` window covers all of a batch's continuations; position ids count real
    tokens only, so padding changes nothing. Log-probabilities are the target logits minus the
    logsumexp over the vocabulary, in float32 at least, for the kept positions only.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    order = sorted(range(len(encoded)), key=lambda i: -sum(map(len, encoded[i])))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = np.zeros(len(encoded), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [encoded[i][0] + encoded[i][1] for i in idx]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        keep = max(len(encoded[i][1]) for i in idx)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=keep + 1).logits[:, :-1]  # position t predicts token t + 1
        targets = ids[:, -keep:]
        wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 / fp16 logits: float32 for the sum
        logp = (logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(wide)
                - torch.logsumexp(logits.to(wide), dim=-1))
        for r, i in enumerate(idx):
            n = len(encoded[i][1])
            scores[i] = logp[r, keep - n:].double().sum().item()
    return scores


def choose(scores: np.ndarray, lengths: tuple[int, ...]) -> dict[str, int]:
    """The chosen index under acc (highest sum) and acc_norm (highest sum per character); ties: the first."""
    return {"acc": int(np.argmax(scores)), "acc_norm": int(np.argmax(scores / np.asarray(lengths, float)))}


def score_items(model, tokenizer, items: list[ChoiceItem], batch_size: int = 16) -> list[dict]:
    """Per item: the per-choice summed log-probs, the chosen index and correctness under both metrics."""
    requests = [(c, x) for item in items for c, x in zip(item.contexts, item.continuations)]
    flat = continuation_logprobs(model, tokenizer, requests, batch_size)
    out, at = [], 0
    for item in items:
        scores = flat[at:at + len(item.contexts)]
        at += len(item.contexts)
        chosen = choose(scores, item.norm_lengths)
        out.append({"scores": [float(s) for s in scores], "lengths": list(item.norm_lengths), "label": item.label,
                    **{f"choice_{m}": chosen[m] for m in METRICS},
                    **{f"correct_{m}": chosen[m] == item.label for m in METRICS}})
    return out


def score_examples(model, tokenizer, examples: list, batch_size: int = 16, metric: str = DEFAULT_METRIC
                   ) -> list[dict]:
    """Prediction records (the predictions JSONL contract plus the loglik fields) for data.Example items.

    ``prediction`` is the chosen choice's label word and ``correct`` its correctness under ``metric``
    (the headline); both metrics' choices and the per-choice scores are kept. ``output`` is None: nothing
    is generated, so no rationale measures (BLEU, embedding similarity) apply.
    """
    if metric not in METRICS:
        raise ValueError(f"loglik metric must be one of {', '.join(METRICS)}, got {metric!r}")
    items = [parse_item(ex.task, ex.instruction, ex.answer) for ex in examples]
    records = []
    for ex, item, scored in zip(examples, items, score_items(model, tokenizer, items, batch_size)):
        chosen = scored[f"choice_{metric}"]
        records.append({"id": ex.id, "task": ex.task, "prompt": item.contexts[chosen], "output": None,
                        "prediction": item.labels[chosen], "answer": ex.answer, "correct": scored[f"correct_{metric}"],
                        "scoring": "loglik", "metric": metric, "choice": chosen,
                        "choice_text": item.choice_texts[chosen], **scored})
    return records
