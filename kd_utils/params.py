"""Study parameters: one YAML file per study, validated in full before any compute.

``load_study(path)`` merges the file over ``DEFAULTS`` and checks every key; all problems
are reported at once, each with its key path (``training.student.lr: expected a number``).
The training, kd and evaluation sections are fields of the run dataclasses (kd_utils.config): their
defaults, types and allowed values come from there. A light module: validating a study loads no model code.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from kd_utils import cache_config
from kd_utils.cache_config import cacheable_methods
from kd_utils.config import EvaluationConfig, TrainingConfig, batch_problems, defaults, value_problems
from kd_utils.constants import CHOICE_TASKS, DEFAULT_MIX, EMBEDDED_MODEL, METHODS
from kd_utils.protocols import DEFAULT_PROTOCOL, get_protocol
from kd_utils.tasks import DOMAINS, TASKS, tasks_for

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ROLES = ("teacher", "student")
#: the TrainingConfig fields a study sets per role (training.teacher / training.student) and for every KD run (kd)
TRAINING_KEYS = ("epochs", "n_train", "batch_size", "micro_batch_size", "lr", "max_length", "lora", "lora_r",
                 "lora_alpha", "lora_dropout", "warmup_ratio", "val_fraction", "warmup_steps", "val_examples",
                 "max_steps", "include_mawps", "mix")
KD_KEYS = ("kd_weight", "beta", "lmbda", "gkd_max_new_tokens", "distill_positions", "seqkd_max_new_tokens")
#: the evaluation section's keys and the EvaluationConfig fields they set (tasks is checked by tasks_for)
EVALUATION_KEYS = {"n_per_task": "n_per_task", "batch_size": "batch_size", "max_new_tokens.math": "max_new_tokens_math",
                   "max_new_tokens.commonsense": "max_new_tokens_commonsense", "do_sample": "do_sample",
                   "scoring": "scoring", "loglik_metric": "loglik_metric"}
TRAINING_DEFAULTS = defaults(TrainingConfig, TRAINING_KEYS)
_EVALUATION = defaults(EvaluationConfig)
DEFAULTS: dict[str, Any] = {
    "study": None,
    "description": "",
    "output_dir": "outputs",
    "data_dir": None,
    "seeds": [0],
    # "paper" or "improved" (kd_utils.protocols), or a mapping {name: improved, train_on_inputs: true, ...}
    # that switches single fields; runs and results.csv record its canonical name, improved[train_on_inputs=true]
    "protocol": DEFAULT_PROTOCOL,
    # teachers: null (one teacher, models.teacher) or a list of teachers of different fine-tuning budgets
    "models": {"teacher": "smollm2-135m-instruct", "teachers": None, "students": []},
    "domains": ["math"],
    "methods": ["sft", "fkl", "rkl", "gkd"],
    "temperatures": [1.0],
    "noise_sigmas": [0.0],
    "teacher_expertise": ["task_aware"],
    "kd": defaults(TrainingConfig, KD_KEYS),
    "teacher_cache": {"enabled": False, "methods": ["fkl"],
                      **{key: cache_config.defaults()[key] for key in cache_config.STUDY_FIELDS}},
    "training": {role: dict(TRAINING_DEFAULTS) for role in ROLES},
    "evaluation": {"tasks": _EVALUATION["tasks"], "n_per_task": _EVALUATION["n_per_task"],
                   "batch_size": _EVALUATION["batch_size"],
                   "max_new_tokens": {"math": _EVALUATION["max_new_tokens_math"],
                                      "commonsense": _EVALUATION["max_new_tokens_commonsense"]},
                   "do_sample": _EVALUATION["do_sample"], "eval_base": True,
                   # "loglik": log-likelihood of the answer choices (multiple-choice tasks only), headline metric
                   # acc or acc_norm (kd_utils.choice_scoring)
                   "scoring": _EVALUATION["scoring"], "loglik_metric": _EVALUATION["loglik_metric"]},
    # primary_hypotheses: the pre-registered primary family (null: the paper's claims), Holm-adjusted together
    "analysis": {"embeddings": True, "n_bootstrap": 2000, "bootstrap_seed": 0, "primary_hypotheses": None},
    # threads_per_run (local executor): torch threads of each run's kernel; null: $OMP_NUM_THREADS when set,
    # else torch's default shared out among the parallel runs (one run at a time: torch's default)
    "execution": {"executor": "local", "parallel": 1, "threads_per_run": None,
                  # partition, account, and resources for every stage (below the per-stage ones)
                  "slurm": {"partition": None, "account": None},
                  "slurm_resources": {
                      "teacher": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 720},
                      "cache": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 240},
                      "student": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 480},
                      "eval": {"gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "timeout_min": 240},
                      "analysis": {"gpus_per_node": 0, "cpus_per_task": 4, "mem_gb": 16, "timeout_min": 60}}},
}
SLURM_RESOURCE_KEYS = ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
STUDENT_KEYS = {"name", "model", "layers"}
TEACHER_KEYS = {"name", "model", "training"}
EXPERTISE = ("task_aware", "task_unaware")

# leaf type checks: key path pattern -> (python types, description)
INT, BOOL, STR = (int,), (bool,), (str,)
TYPES: dict[str, tuple[tuple, str]] = {
    "study": (STR, "a string"), "description": (STR, "a string"), "output_dir": (STR, "a path string"),
    "data_dir": (STR + (type(None),), "a path string or null"),
    "models.teacher": (STR, "a model id or directory"),
    "teacher_cache.enabled": (BOOL, "true or false"), "teacher_cache.representation": (STR, "a string"),
    "teacher_cache.k": (INT, "an integer"), "teacher_cache.num_samples": (INT, "an integer"),
    "teacher_cache.id_coding": (STR, "a string"),
    "evaluation.eval_base": (BOOL, "true or false"),
    "analysis.embeddings": (BOOL, "true or false"), "analysis.n_bootstrap": (INT, "an integer"),
    "analysis.bootstrap_seed": (INT, "an integer"),
    "execution.executor": (STR, "'local' or 'slurm'"), "execution.parallel": (INT, "an integer"),
    "execution.threads_per_run": (INT + (type(None),), "an integer or null"),
    **{f"execution.slurm_resources.{stage}.{key}": (INT, "an integer")
       for stage in DEFAULTS["execution"]["slurm_resources"] for key in SLURM_RESOURCE_KEYS},
}
#: leaf checks by a run dataclass's field (type, bounds, choices): key path -> (dataclass, field)
FIELDS: dict[str, tuple[type, str]] = {
    **{f"training.{role}.{key}": (TrainingConfig, key) for role in ROLES for key in TRAINING_KEYS},
    **{f"kd.{key}": (TrainingConfig, key) for key in KD_KEYS},
    **{f"evaluation.{key}": (EvaluationConfig, name) for key, name in EVALUATION_KEYS.items()},
}


class ParamsError(ValueError):
    """Every problem found in a study file, one per line with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


def _merge(base: dict, override: dict, path: str, problems: list[str]) -> dict:
    """Defaults overridden by the file; unknown keys reported with a close match when there is one."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            close = difflib.get_close_matches(str(key), list(base), n=1)
            problems.append(f"{where}: unknown key" + (f" (did you mean '{path}{close[0]}'?)" if close else ""))
        elif isinstance(base[key], dict) and key != "slurm":
            if isinstance(value, dict):
                out[key] = _merge(base[key], value, f"{where}.", problems)
            else:
                problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
        else:
            out[key] = value
    return out


def _leaf(params: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        params = params[part]
    return params


def plausible_model(name: Any) -> bool:
    """A local model directory, the embedded model, or something shaped like a hub id."""
    if not isinstance(name, str):
        return False
    return name == EMBEDDED_MODEL or Path(name).expanduser().is_dir() or (
        bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~")))


def _grid_values(params: dict, key: str, name: str, problems: list[str]) -> None:
    """A grid axis (temperatures, noise_sigmas, seeds): a non-empty list of allowed values of TrainingConfig.name."""
    values = params[key]
    if not isinstance(values, list) or not values:
        problems.append(f"{key}: expected a non-empty list")
        return
    for i, v in enumerate(values):
        problems += value_problems(TrainingConfig, name, v, f"{key}[{i}]")


def validate(params: dict) -> list[str]:
    """All problems in merged params (an empty list means valid)."""
    problems: list[str] = []
    for dotted, (types, what) in TYPES.items():
        value = _leaf(params, dotted)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            problems.append(f"{dotted}: expected {what}, got {value!r}")
    for dotted, (cls, name) in FIELDS.items():
        problems += value_problems(cls, name, _leaf(params, dotted), dotted)
    if not params["study"] or not re.match(r"^[\w.-]+$", str(params["study"])):
        problems.append("study: a name of letters, digits, '.', '_' or '-' is required")
    if isinstance(params["models"]["teacher"], str) and not plausible_model(params["models"]["teacher"]):
        problems.append(f"models.teacher: {params['models']['teacher']!r} is neither a local model directory nor a "
                        "plausible hub id like 'org/name'")
    problems += _validate_teachers(params)
    students = params["models"]["students"]
    if not isinstance(students, list) or not students:
        problems.append("models.students: expected a non-empty list of students")
        students = []
    names = []
    for i, student in enumerate(students):
        where = f"models.students[{i}]"
        if not isinstance(student, dict):
            problems.append(f"{where}: expected a mapping with name and model or layers")
            continue
        problems += _unknown_keys(where, student, STUDENT_KEYS)
        if not isinstance(student.get("name"), str) or not re.match(r"^[\w.-]+$", student.get("name") or ""):
            problems.append(f"{where}.name: a name of letters, digits, '.', '_' or '-' is required")
        names.append(student.get("name"))
        if ("model" in student) == ("layers" in student):
            problems.append(f"{where}: give exactly one of 'model' (an id or directory) or 'layers' (keep N of the "
                            "teacher's layers)")
        elif "model" in student and not plausible_model(student["model"]):
            problems.append(f"{where}.model: {student['model']!r} is neither a local model directory nor a plausible "
                            "hub id")
        elif "layers" in student and (isinstance(student["layers"], bool) or not isinstance(student["layers"], int)
                                      or student["layers"] < 1):
            problems.append(f"{where}.layers: expected a positive integer, got {student['layers']!r}")
    if len(set(names)) != len(names):
        problems.append("models.students: student names must be unique")
    for key, allowed in (("methods", METHODS), ("domains", DOMAINS), ("teacher_expertise", EXPERTISE)):
        values = params[key]
        if not isinstance(values, list) or not values:
            problems.append(f"{key}: expected a non-empty list (an empty grid runs nothing)")
            continue
        for i, v in enumerate(values):
            if v not in allowed:
                close = difflib.get_close_matches(str(v), allowed, n=1)
                problems.append(f"{key}[{i}]: unknown {key[:-1].replace('_', ' ')} {v!r}; expected one of "
                                f"{', '.join(allowed)}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    _grid_values(params, "temperatures", "temperature", problems)
    _grid_values(params, "noise_sigmas", "noise_sigma", problems)
    _grid_values(params, "seeds", "seed", problems)
    tasks = params["evaluation"]["tasks"]
    try:
        tasks_for(tasks)
    except (KeyError, TypeError):
        bad = [t for t in (tasks if isinstance(tasks, list) else [tasks]) if t not in TASKS]
        problems.append(f"evaluation.tasks: unknown task id(s) {bad}; expected 'all', 'core', 'math', 'commonsense' "
                        f"or ids from {', '.join(TASKS)}")
    problems += _scoring_problems(params["evaluation"])
    try:
        protocol = get_protocol(params["protocol"]).name
    except ValueError as err:
        problems.append(str(err))
    else:
        if protocol != DEFAULT_PROTOCOL and params["teacher_cache"]["enabled"]:
            problems.append(f"teacher_cache.enabled: the teacher cache stores {DEFAULT_PROTOCOL}-protocol rows; "
                            f"protocol {protocol!r} trains from the online teacher (set enabled: false)")
    for key in ("parallel", "threads_per_run"):
        value = params["execution"][key]
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"execution.{key}: expected at least 1, got {value}")
    if params["execution"]["executor"] not in ("local", "slurm"):
        problems.append(f"execution.executor: expected 'local' or 'slurm', got {params['execution']['executor']!r}")
    for key in params["execution"]["slurm"]:
        if key in SLURM_RESOURCE_KEYS:
            problems.append(f"execution.slurm.{key}: resources are set per stage, under "
                            f"execution.slurm_resources.<stage>.{key} "
                            f"(stages: {', '.join(DEFAULTS['execution']['slurm_resources'])})")
        elif key not in ("partition", "account"):
            problems.append(f"execution.slurm.{key}: unknown key (expected partition or account)")
    cache = params["teacher_cache"]
    # choices and minimums from kd_utils.cache_config.TeacherCacheConfig
    problems += cache_config.setting_problems({key: cache[key] for key in cache_config.STUDY_FIELDS}, "teacher_cache")
    problems += _primary_problems(params["analysis"]["primary_hypotheses"])
    cacheable = cacheable_methods(cache["representation"])
    if not isinstance(cache["methods"], list) or any(m not in cacheable for m in cache["methods"]):
        problems.append(f"teacher_cache.methods: expected a list of {' or '.join(cacheable)} (what a "
                        f"{cache['representation']} cache can train; gkd's on-policy part needs the online teacher), "
                        f"got {cache['methods']!r}")
    if cache["enabled"] and params["training"]["student"]["val_examples"] is not None:
        problems.append("training.student.val_examples: the teacher cache selects its rows by val_fraction; "
                        "set val_examples: null or teacher_cache.enabled: false")
    for role in ROLES:
        problems += _batch_problems(f"training.{role}", params["training"][role])
    if cache["enabled"] and params["training"]["student"]["mix"] != DEFAULT_MIX:
        problems.append(f"training.student.mix: the teacher cache is built from the {DEFAULT_MIX!r} mix; "
                        "set mix: llm_adapters or teacher_cache.enabled: false")
    return problems


def _primary_problems(primaries: Any) -> list[str]:
    """analysis.primary_hypotheses: null or a non-empty list of the report's hypothesis ids."""
    if primaries is None:
        return []
    from kd_utils.statistics.verdicts import CLAIMS  # the statistics stack, only when a study names primaries

    if not isinstance(primaries, list) or not primaries or any(h not in CLAIMS for h in primaries):
        return [f"analysis.primary_hypotheses: expected null or a non-empty list of {', '.join(CLAIMS)}, "
                f"got {primaries!r}"]
    return []


def _scoring_problems(ev: dict) -> list[str]:
    """evaluation.scoring: loglik only over multiple-choice tasks (the values themselves are checked as fields)."""
    problems = []
    if ev["scoring"] == "loglik":
        try:
            other = [t.id for t in tasks_for(ev["tasks"]) if t.id not in CHOICE_TASKS]
        except (KeyError, TypeError):
            other = []  # reported under evaluation.tasks
        if other:
            problems.append(f"evaluation.scoring: loglik scores the multiple-choice tasks ({', '.join(CHOICE_TASKS)}); "
                            f"evaluation.tasks also holds {', '.join(other)}")
    return problems


def _batch_problems(where: str, t: dict) -> list[str]:
    return batch_problems(t["batch_size"], t["micro_batch_size"], f"{where}.")


def _unknown_keys(where: str, given, allowed) -> list[str]:
    out = []
    for key in sorted(set(given) - set(allowed), key=str):
        close = difflib.get_close_matches(str(key), list(allowed), n=1)
        out.append(f"{where}.{key}: unknown key" + (f" (did you mean '{where}.{close[0]}'?)" if close else ""))
    return out


def _validate_teachers(params: dict) -> list[str]:
    """models.teachers: null, or a non-empty list of {name, model?, training?} with distinct names and runs."""
    teachers = params["models"]["teachers"]
    if teachers is None:
        return []
    if not isinstance(teachers, list) or not teachers:
        return ["models.teachers: expected null (one teacher, models.teacher) or a non-empty list of teachers "
                "({name, model, training})"]
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, teacher in enumerate(teachers):
        where = f"models.teachers[{i}]"
        if not isinstance(teacher, dict):
            problems.append(f"{where}: expected a mapping with name, and optionally model and training")
            continue
        problems += _unknown_keys(where, teacher, TEACHER_KEYS)
        name = teacher.get("name")
        if not isinstance(name, str) or not re.match(r"^[\w.-]+$", name):
            problems.append(f"{where}.name: a name of letters, digits, '.', '_' or '-' is required")
        elif name in seen:
            problems.append(f"{where}.name: {name!r} is already models.teachers[{seen[name]}].name; "
                            "names must be unique")
        else:
            seen[name] = i
        if "model" in teacher and not plausible_model(teacher["model"]):
            problems.append(f"{where}.model: {teacher['model']!r} is neither a local model directory nor a plausible "
                            "hub id")
        training = teacher.get("training", {})
        if not isinstance(training, dict):
            problems.append(f"{where}.training: expected a mapping of training.teacher keys, got "
                            f"{type(training).__name__}")
            continue
        problems += _unknown_keys(f"{where}.training", training, TRAINING_DEFAULTS)
        for key, value in training.items():
            if key in TRAINING_DEFAULTS:
                problems += value_problems(TrainingConfig, key, value, f"{where}.training.{key}")
    if problems:
        return problems
    specs = teacher_specs(params)
    for i, spec in enumerate(specs):  # the same model and budget would be the same run twice
        twin = next((j for j in range(i)
                     if (specs[j]["model"], specs[j]["training"]) == (spec["model"], spec["training"])), None)
        if twin is not None:
            problems.append(f"models.teachers[{i}]: same model and training as models.teachers[{twin}] "
                            f"({specs[twin]['name']!r}); give it a different budget")
        problems += _batch_problems(f"models.teachers[{i}].training", spec["training"])
    if isinstance(params["teacher_expertise"], list) and "task_unaware" in params["teacher_expertise"]:
        # every teacher's task-unaware twin is the same base model: the ablation would repeat per teacher
        problems.append("teacher_expertise: task_unaware with models.teachers would repeat the base-teacher runs "
                        "once per teacher; run the expertise ablation with models.teacher")
    return problems


def teacher_specs(params: dict) -> list[dict]:
    """The study's teachers as {name, model, training}: ``models.teachers`` with each teacher's training over
    ``training.teacher`` and its model defaulting to ``models.teacher``; or, without it, the one
    ``models.teacher`` (name None: its results and labels keep the model's name)."""
    base = params["models"]["teacher"]
    if params["models"]["teachers"] is None:
        return [{"name": None, "model": base, "training": params["training"]["teacher"]}]
    return [{"name": t["name"], "model": t.get("model", base),
             "training": {**params["training"]["teacher"], **t.get("training", {})}}
            for t in params["models"]["teachers"]]


def load_study(path: str | Path, overrides: dict | None = None) -> dict:
    """Read, merge over the defaults and validate a study file; raise ParamsError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(str(path), [f"no such params file: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(str(path), [f"not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ParamsError(str(path), ["the file must hold a mapping of keys"])
    problems: list[str] = []
    params = _merge(DEFAULTS, {**raw, **(overrides or {})}, "", problems)
    if params["study"] is None:
        params["study"] = path.stem
    problems += validate(params)
    if problems:
        raise ParamsError(str(path), problems)
    params["protocol"] = get_protocol(params["protocol"]).name  # one canonical name: equal protocols, equal run ids
    if set(params["domains"]) == {"math"}:
        # the math mix is the one planned before the key existed: leaving it out keeps those run ids (the
        # commonsense mix changed, so commonsense runs record it and get new ids)
        for role in ROLES:
            if params["training"][role]["mix"] == DEFAULT_MIX:
                del params["training"][role]["mix"]
    return params
