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
# # Teacher logits
# The teacher (base model + task adapter, or the bare base model for the expertise ablation) runs once over
# the training rows that `distill.ipynb` will use, and stores a sparse form of its next-token distributions per
# (temperature, noise sigma): `topk` (k ids + log-probs, tail mass implied; the form rkl needs), `sampled`
# (the ids of `num_samples` systematic draws + the teacher entropy, an unbiased forward-KL estimate) or
# `topk_sampled` (the top k exactly + draws from the tail: unbiased, lower variance; the default, k = 4 + 20 draws,
# 62 bytes per token). Students then train fkl / rkl
# from the cache without the teacher: pass a cache directory below as `teacher_cache` to `distill.ipynb` with the
# same data parameters, seed, max_length, val_fraction, temperature, noise_sigma and epochs
# (each epoch reads its own set of draws and noise).
# Caches are content-addressed: an unchanged input is never recomputed, a changed one never reused.

# %% tags=["parameters"]
teacher = "smollm2-135m-instruct"  # the teacher's base model
teacher_adapter = None  # the teacher's fine-tuned LoRA adapter (task expert)
task_aware_teacher = True  # False: the bare base model as teacher (expertise ablation)
domain = "math"
n_train = None
include_mawps = False
data_dir = None
seed = 0
max_length = 256
val_fraction = 0.1
representation = "topk_sampled"  # or "sampled", or "topk" (the one rkl can use)
k = 4  # top-k ids per position (topk, topk_sampled)
num_samples = 20  # systematic draws per position (sampled) or from the tail (topk_sampled)
temperatures = [1.0]
noise_sigmas = [0.0]
epochs = 1  # the students' epochs: each reads its own draws and noise
id_coding = "fixed"  # the draws' ids: "fixed" (uint16 / int32) or "elias_fano" (sorted, coded, fewer bytes)
rationales = False  # also store the teacher's greedy generations (seqkd, fidelity)
rationale_max_new_tokens = 128
batch_size = 8
shard_size = 256
precision = "auto"  # the teacher's forward passes: auto (bf16 where the hardware has it), fp32, bf16, fp16
output_dir = "outputs/teacher_cache"

# %%
from kd_utils import teacher_cache

summary = teacher_cache.run_teacher_cache(
    teacher, output_dir, teacher_adapter=teacher_adapter, task_aware_teacher=task_aware_teacher, domain=domain,
    n_train=n_train, include_mawps=include_mawps, data_dir=data_dir, seed=seed, max_length=max_length,
    val_fraction=val_fraction, representation=representation, k=k, num_samples=num_samples,
    temperatures=temperatures, noise_sigmas=noise_sigmas, epochs=epochs, id_coding=id_coding,
    rationales=rationales,
    rationale_max_new_tokens=rationale_max_new_tokens, batch_size=batch_size, shard_size=shard_size,
    precision=precision)

# %% [markdown]
# ## Caches
# One row per (temperature, sigma): where it is, how many next-token positions it covers, and the bytes stored
# per distilled token (ids, log-probs or counts, and the input ids kept to check alignment).

# %%
import pandas as pd

print(f"{summary['train_examples']} training examples, {summary['seconds']} s, precision {summary['precision']}, "
      f"generated now: {len(summary['generated'])} of {len(summary['per_cache'])}")
pd.DataFrame(summary["per_cache"])
