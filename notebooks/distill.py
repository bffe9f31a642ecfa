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
# # Distillation
# A student trained against a teacher: `fkl` (paper "SeqKD", token-level KL(p_T || p_S)), `rkl` ("RevKD"),
# `gkd` (generalized JSD with on-policy student samples), `seqkd` (cross-entropy on the teacher's greedy
# generations), or `sft` (no teacher). Loss = (1 - kd_weight) * CE + kd_weight * KD, scaled by tau^2 for fkl/rkl.

# %% tags=["parameters"]
model = "smollm2-135m-instruct"  # the student's base model
student_layers = None  # keep this many layers of `model`
teacher = "smollm2-135m-instruct"  # the teacher's base model
teacher_adapter = None  # the teacher's fine-tuned LoRA adapter (task expert)
task_aware_teacher = True  # False: the bare base model as teacher (expertise ablation)
teacher_cache = None  # a teacher_cache.ipynb cache directory: fkl / rkl (and seqkd rationales) without the teacher
method = "fkl"
temperature = 1.0
noise_sigma = 0.0
kd_weight = 1.0
beta = 0.5
lmbda = 0.5
gkd_max_new_tokens = 128
seqkd_max_new_tokens = 128  # length of the teacher generations seqkd trains on
# fkl / rkl: "paper" (every real position, the last too), "next_token" or "response"; None: the protocol's
distill_positions = None
domain = "math"
include_mawps = False
mix = "llm_adapters"  # "llm_adapters": the authors' training data rebuilt (kd_utils.data); "design": the older mix
n_train = None
data_dir = None
output_dir = "outputs/distill"
epochs = 1  # paper: 4 (math) / 3 (commonsense)
batch_size = 16
micro_batch_size = 4
lr = 3e-4
warmup_ratio = 0.0
warmup_steps = None  # None: the protocol's (paper: 100; improved: warmup_ratio)
max_length = 256
lora = True
lora_r = 8
lora_alpha = 16
lora_dropout = 0.05
val_fraction = 0.1
val_examples = None  # None: the protocol's (paper: 500; improved: val_fraction)
max_steps = None
seed = 0
protocol = "improved"  # "paper": the authors' code where it can be followed (kd_utils.protocols lists what it cannot)
num_processes = 1  # > 1: data parallel over this many GPUs (accelerate's notebook_launcher)

# %%
from kd_utils import config, plots, training

# the parameters cell's values of every TrainingConfig field it sets (method, temperature, epochs, lr, ...)
settings = config.field_values(config.TrainingConfig, globals())
summary = training.launch_training(
    num_processes, model=model, output_dir=output_dir, domain=domain, student_layers=student_layers, teacher=teacher,
    teacher_adapter=teacher_adapter, task_aware_teacher=task_aware_teacher, teacher_cache=teacher_cache,
    data_dir=data_dir, **settings)

# %% [markdown]
# ## Losses

# %%
import pandas as pd

pd.DataFrame(summary["history"]).round(4)

# %%
plots.loss_curves(summary["history"], title=f"{training.PAPER_METHOD_NAMES[method]} ({method}), tau={temperature}",
                  output_dir=output_dir);
