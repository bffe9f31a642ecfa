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
# # Fine-tuning (teacher task expert, or a student's SFT baseline)
# LoRA (or full) fine-tuning on the decontaminated training mix with the protocol's Alpaca prompt;
# prompt tokens are in the loss under `paper` (the authors' train_on_inputs), not under `improved`.
# A checkpoint is written after every epoch and a re-run resumes.

# %% tags=["parameters"]
model = "smollm2-135m-instruct"  # hub id, local directory, or the embedded default
student_layers = None  # keep this many layers of `model` (a smaller student of the same family)
domain = "math"  # training mix: "math" or "commonsense"
include_mawps = False
mix = "llm_adapters"  # "llm_adapters": the authors' training data rebuilt (kd_utils.data); "design": the older mix
n_train = None  # subsample the mix with a fixed seed (None: all of it)
data_dir = None
output_dir = "outputs/finetune"
epochs = 1  # paper: 4 (math) / 3 (commonsense)
batch_size = 16
micro_batch_size = 4
lr = 3e-4
max_length = 256
lora = True
lora_r = 8
lora_alpha = 16
lora_dropout = 0.05
lora_target_modules = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
warmup_ratio = 0.0
warmup_steps = None  # None: the protocol's (paper: 100; improved: warmup_ratio)
val_fraction = 0.1
val_examples = None  # None: the protocol's (paper: 500; improved: val_fraction)
max_steps = None
seed = 0
protocol = "improved"  # "paper": the authors' code where it can be followed (kd_utils.protocols lists what it cannot)
num_processes = 1  # > 1: data parallel over this many GPUs (accelerate's notebook_launcher)

# %%
from kd_utils import plots, training

summary = training.launch_training(
    num_processes, model=model, output_dir=output_dir, method="sft", domain=domain, student_layers=student_layers,
    n_train=n_train, include_mawps=include_mawps, mix=mix, data_dir=data_dir, epochs=epochs, batch_size=batch_size,
    micro_batch_size=micro_batch_size, lr=lr, max_length=max_length, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
    lora_dropout=lora_dropout, lora_target_modules=lora_target_modules, warmup_ratio=warmup_ratio,
    val_fraction=val_fraction, max_steps=max_steps, seed=seed, protocol=protocol, warmup_steps=warmup_steps,
    val_examples=val_examples)

# %% [markdown]
# ## Losses

# %%
import pandas as pd

pd.DataFrame(summary["history"]).round(4)

# %%
plots.loss_curves(summary["history"], title=f"SFT of {model}", output_dir=output_dir);
