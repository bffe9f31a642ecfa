# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Zero-shot evaluation
# Greedy (improved) or sampled (paper) generation with the protocol's Alpaca prompt and LLM-Adapters answer extraction,
# on each task's test set (a fixed-seed sample of `n_per_task` examples). Accuracy with 95% Wilson intervals.
# With `scoring="loglik"` the multiple-choice tasks are scored by the log-likelihood of each answer choice
# (lm-evaluation-harness contexts; `loglik_metric` picks acc or acc_norm as the accuracy) and nothing is generated.

# %% tags=["parameters"]
model = "smollm2-135m-instruct"  # hub id, local directory, or the embedded default
adapter = None  # optional peft LoRA adapter directory
tasks = "all"  # "all", "core", "math", "commonsense", or a list of task ids
n_per_task = 20  # None for the full test sets
batch_size = 16
max_new_tokens_math = None  # None: the protocol's (256)
max_new_tokens_commonsense = None  # None: the protocol's (paper 256, improved 32)
do_sample = None  # None: the protocol's (paper: sampled, temperature 1, top_k 0; improved: greedy)
temperature = None
top_k = None
seed = 0  # also the sampling seed
protocol = "improved"  # prompt template, decoding, budgets, output cut (kd_utils.protocols)
# "generate", or "loglik": log-likelihood of the answer choices (multiple-choice tasks, kd_utils.choice_scoring)
scoring = "generate"
loglik_metric = "acc_norm"  # loglik: the headline accuracy, "acc" (summed log-prob) or "acc_norm" (per character)
dtype = None  # None: bfloat16 on GPUs that support it, float32 otherwise
data_dir = None
output_dir = "outputs/eval"

# %%
from kd_utils import evaluation, models, plots
from kd_utils import tasks as task_registry

task_ids = [t.id for t in task_registry.tasks_for(tasks)]
model_, tokenizer = models.load_model(model, adapter=adapter, dtype=dtype or models.default_dtype(),
                                      device=models.default_device())
metrics = evaluation.evaluate_tasks(
    model_, tokenizer, task_ids, n_per_task=n_per_task, data_dir=data_dir, output_dir=output_dir,
    batch_size=batch_size, max_new_tokens={"math": max_new_tokens_math, "commonsense": max_new_tokens_commonsense},
    do_sample=do_sample, temperature=temperature, top_k=top_k, seed=seed, protocol=protocol,
    scoring=scoring, loglik_metric=loglik_metric)

# %% [markdown]
# ## Accuracy per task

# %%
metrics.round(2)

# %%
plots.accuracy_bars(metrics, title=f"{model}" + (f" + {adapter}" if adapter else ""), output_dir=output_dir);

# %% [markdown]
# Tasks without a readable test file (hellaswag's test set is not available offline):

# %%
metrics.attrs["skipped"] or "none"
