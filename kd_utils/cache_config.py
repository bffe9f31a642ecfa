"""The teacher-cache run's settings: ``TeacherCacheConfig``, its defaults and allowed values.

A light module (standard library only): ``params`` validates a study's ``teacher_cache`` section from it
without loading torch. Each field's metadata holds one line of help and, where the run checks it, the
allowed ``choices`` or ``min``imum.

Defaults, from ``benchmarks/teacher_cache_tradeoff.py`` (embedded SmolLM2-135M teacher, a
10-layer LoRA student cut from it, the math mix, max_length 128; tables, with each figure's
scope, in benchmarks/README.md). The figures are narrow: the format-4 rerun (2-core CPU, load
0.3-1.9) rests on 3 seeds and 3 timing rounds of 8 training and 8 held-out rows, 2 epochs.

- ``topk_sampled`` with k = 4 and 20 tail draws per epoch set: 62 bytes per distilled token and
  set (uint16 ids, float16 log-probs, float32 entropy, the input id). Kept as the default at
  tau = 1 and 2: unbiased; its students ended within 0.07% of the online student's held-out KL
  on every seed at both temperatures; its per-position gradient error is the lowest measured at
  tau = 1 (3.5%, ``sampled`` 28 draws 7.1%; the floor for 29 stored ids,
  ``unbiased_variance_floor``, is 2.5%), and at tau = 2 ``sampled`` is lower by about a point
  (50.9% against 52.1%; floor 45.5%), too little to carry a per-temperature default. The error
  is independent between positions and shrinks where they add up (1.1% at the output layer at
  tau = 1). An epoch from it ran 1.48-1.68x as fast as online at this tiny size; with generation
  counted it paid off after 2.0-2.7 epochs. Elias-Fano coded ids (``id_coding``) fit 4 + 26
  draws in 64 bytes, with 13-17% less gradient error (one batch; no student distilled from it yet).
- ``topk`` fits 64 bytes up to k = 14 (58 bytes). It is biased: fkl is 9-13% low at tau = 1
  and 55-59% low at tau = 2 in the format-3 run (3-4% and 39-43% in the rerun), and
  top-k + tail reverse KL misses most of the loss of a student
  far from the teacher (format-3 run: its student ended 20% above the online student's
  held-out KL at tau = 2). rkl needs it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from kd_utils.constants import MIN_MAX_LENGTH
from kd_utils.tasks import DOMAINS

REPRESENTATIONS = ("topk", "sampled", "topk_sampled")
ID_CODINGS = ("fixed", "elias_fano")  # the draws' ids as uint16 / int32, or sorted and Elias-Fano coded
# unbiased fkl with the smallest gradient error within the 64-byte budget; see the module docstring
DEFAULT_REPRESENTATION = "topk_sampled"
DEFAULT_K = 4
DEFAULT_NUM_SAMPLES = 20
SPARSE_KD_METHODS = ("fkl", "rkl")  # the methods that can train from a cache
#: the fields a study file sets in its ``teacher_cache`` section (the rest come from the study's runs)
STUDY_FIELDS = ("representation", "k", "num_samples", "id_coding")


def cacheable_methods(representation: str) -> tuple[str, ...]:
    """The methods a teacher cache of ``representation`` can train: rkl needs the top-k + tail partition."""
    return SPARSE_KD_METHODS if representation == "topk" else ("fkl",)


def validate_settings(representation: str, *, k: int, num_samples: int, temperatures, noise_sigmas,
                      epochs: int = 1, id_coding: str = "fixed") -> None:
    """Raise ValueError naming the first bad argument, before any work."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation={representation!r} is not one of {', '.join(REPRESENTATIONS)}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if id_coding not in ID_CODINGS:
        raise ValueError(f"id_coding={id_coding!r} is not one of {', '.join(ID_CODINGS)}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not list(temperatures) or not list(noise_sigmas):
        raise ValueError("temperatures and noise_sigmas must each hold at least one value")
    for tau in temperatures:
        if not tau > 0:
            raise ValueError(f"temperature must be > 0, got {tau}")
    for sigma in noise_sigmas:
        if not sigma >= 0:
            raise ValueError(f"noise sigma must be >= 0, got {sigma}")


def _setting(default: Any, help: str, **allowed: Any) -> Any:
    """A field with its default, one line of help and what the run allows (``choices``, ``min``)."""
    return field(default=default, metadata={"help": help, **allowed})


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Everything one teacher-cache run (``teacher_cache.run_teacher_cache``) takes.

    The data fields (domain, n_train, include_mawps, data_dir, seed, max_length, val_fraction) select the
    training rows exactly as ``training.run_training`` does with the same values; ``epochs`` is the students'.
    One cache is written per (temperature, noise sigma).
    """

    teacher: str = field(metadata={"help": "the teacher's base model (hub id or directory)"})
    output_dir: str = field(metadata={"help": "where the caches go, one directory per (temperature, sigma)"})
    teacher_adapter: str | None = _setting(None, "the teacher's fine-tuned LoRA adapter (task expert), merged")
    task_aware_teacher: bool = _setting(True, "False: the bare base model as teacher (expertise ablation)")
    domain: str = _setting("math", "the training mix's domain", choices=DOMAINS)
    n_train: int | None = _setting(None, "training examples sampled from the mix (None: all)")
    include_mawps: bool = _setting(False, "add MAWPS train to the math mix")
    data_dir: str | None = _setting(None, "the data directory (None: KD_DATA_DIR, then ../shared/data)")
    seed: int = _setting(0, "the students' seed: fixes the rows' split, the noise and the draws")
    max_length: int = _setting(256, "tokens per training row", min=MIN_MAX_LENGTH)
    val_fraction: float = _setting(0.1, "the held-out share of the mix, left out of the cache")
    representation: str = _setting(DEFAULT_REPRESENTATION, "topk (what rkl needs), sampled or topk_sampled",
                                   choices=REPRESENTATIONS)
    k: int = _setting(DEFAULT_K, "top-k ids per position (topk, topk_sampled)", min=1)
    num_samples: int = _setting(DEFAULT_NUM_SAMPLES, "systematic draws per position (sampled) or from the tail "
                                                     "(topk_sampled)", min=1)
    temperatures: tuple[float, ...] = _setting((1.0,), "the temperatures tau, one cache each (> 0)")
    noise_sigmas: tuple[float, ...] = _setting((0.0,), "the sigmas of Gaussian noise on the teacher logits, one "
                                                       "cache each (>= 0)")
    epochs: int = _setting(1, "the students' epochs: each reads its own set of draws and noise", min=1)
    id_coding: str = _setting("fixed", "the draws' ids: fixed (uint16 / int32) or elias_fano (sorted, coded, "
                                       "fewer bytes)", choices=ID_CODINGS)
    rationales: bool = _setting(False, "also store the teacher's greedy generations (seqkd, fidelity)")
    rationale_max_new_tokens: int = _setting(128, "the rationales' generation budget in tokens")
    batch_size: int = _setting(8, "rows per teacher forward pass", min=1)
    shard_size: int = _setting(256, "rows per shard file", min=1)
    precision: str = _setting("auto", "the teacher's forward passes: auto (bf16 where the hardware has it), fp32, "
                                      "bf16 or fp16 (kd_utils.precision)")

    def __post_init__(self) -> None:
        # any sequence of numbers (YAML and papermill give lists): stored as tuples of floats, as the cache key has them
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        object.__setattr__(self, "noise_sigmas", tuple(float(s) for s in self.noise_sigmas))

    def validate(self) -> TeacherCacheConfig:
        """Raise ValueError naming the first bad setting (before any work); returns self."""
        validate_settings(self.representation, k=self.k, num_samples=self.num_samples,
                          temperatures=self.temperatures, noise_sigmas=self.noise_sigmas, epochs=self.epochs,
                          id_coding=self.id_coding)
        if not all(isinstance(n, int) and n >= 1 for n in (self.shard_size, self.batch_size)):
            raise ValueError(f"shard_size and batch_size must be ints >= 1, got {self.shard_size!r}, "
                             f"{self.batch_size!r}")
        if self.max_length < MIN_MAX_LENGTH:
            raise ValueError(f"max_length must be >= {MIN_MAX_LENGTH}, got {self.max_length}")
        return self


def defaults() -> dict[str, Any]:
    """Every ``TeacherCacheConfig`` field that has a default, with it (the notebook's parameters cell agrees)."""
    return {f.name: f.default for f in fields(TeacherCacheConfig) if f.default is not MISSING}


def setting_problems(values: dict[str, Any], prefix: str) -> list[str]:
    """'prefix.name: ...' for each value outside its field's ``choices`` or below its ``min`` (values of the wrong
    type are left to the caller's type check)."""
    allowed = {f.name: f.metadata for f in fields(TeacherCacheConfig)}
    problems = []
    for name, value in values.items():
        choices, least = allowed[name].get("choices"), allowed[name].get("min")
        if choices is not None and value not in choices:
            problems.append(f"{prefix}.{name}: expected one of {', '.join(choices)}, got {value!r}")
        if least is not None and isinstance(value, int) and value < least:
            problems.append(f"{prefix}.{name}: must be >= {least}, got {value}")
    return problems
