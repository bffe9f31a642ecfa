"""Study parameters: one YAML file per study, validated in full before any compute.

``load_study(path)`` merges the file over ``DEFAULTS`` and checks every key; all problems
are reported at once, each with its key path (``training.student.lr: expected a number``).
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from kd_utils.choice_scoring import CHOICE_TASKS, METRICS, SCORINGS
from kd_utils.data import DEFAULT_MIX, MIXES
from kd_utils.protocols import DEFAULT_PROTOCOL, KD_POSITIONS, get_protocol
from kd_utils.statistics.verdicts import CLAIMS
from kd_utils.tasks import TASKS, tasks_for
from kd_utils import cache_config
from kd_utils.cache_config import cacheable_methods
from kd_utils.constants import METHODS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

TRAINING_DEFAULTS = {
    "epochs": 1, "n_train": None, "batch_size": 16, "micro_batch_size": 4, "lr": 3e-4, "max_length": 256,
    "lora": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "warmup_ratio": 0.0, "val_fraction": 0.1,
    "warmup_steps": None, "val_examples": None,  # None: the protocol's
    "max_steps": None, "include_mawps": False,
    "mix": DEFAULT_MIX,  # kd_utils.data.MIXES: "llm_adapters" (the authors' data, rebuilt) or "design"
}
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
    "kd": {"kd_weight": 1.0, "beta": 0.5, "lmbda": 0.5, "gkd_max_new_tokens": 128, "distill_positions": None,
           "seqkd_max_new_tokens": 128},
    "teacher_cache": {"enabled": False, "methods": ["fkl"],
                      **{key: cache_config.defaults()[key] for key in cache_config.STUDY_FIELDS}},
    "training": {"teacher": dict(TRAINING_DEFAULTS), "student": dict(TRAINING_DEFAULTS)},
    "evaluation": {"tasks": "all", "n_per_task": 20, "batch_size": 16,
                   "max_new_tokens": {"math": None, "commonsense": None}, "do_sample": None, "eval_base": True,
                   # "loglik": log-likelihood of the answer choices (multiple-choice tasks only), headline metric
                   # acc or acc_norm (kd_utils.choice_scoring)
                   "scoring": "generate", "loglik_metric": "acc_norm"},
    # primary_hypotheses: the pre-registered primary family (null: the paper's claims), Holm-adjusted together
    "analysis": {"embeddings": True, "n_bootstrap": 2000, "bootstrap_seed": 0, "primary_hypotheses": None},
    "execution": {"executor": "local", "parallel": 1,
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
NUMBER, INT, BOOL, STR = (int, float), (int,), (bool,), (str,)
TYPES: dict[str, tuple[tuple, str]] = {
    "study": (STR, "a string"), "description": (STR, "a string"), "output_dir": (STR, "a path string"),
    "data_dir": (STR + (type(None),), "a path string or null"),
    "models.teacher": (STR, "a model id or directory"),
    "kd.kd_weight": (NUMBER, "a number"), "kd.beta": (NUMBER, "a number"), "kd.lmbda": (NUMBER, "a number"),
    "kd.gkd_max_new_tokens": (INT, "an integer"), "kd.distill_positions": (STR + (type(None),), "a string or null"),
    "kd.seqkd_max_new_tokens": (INT, "an integer"),
    "teacher_cache.enabled": (BOOL, "true or false"), "teacher_cache.representation": (STR, "a string"),
    "teacher_cache.k": (INT, "an integer"), "teacher_cache.num_samples": (INT, "an integer"),
    "teacher_cache.id_coding": (STR, "a string"),
    "evaluation.n_per_task": (INT + (type(None),), "an integer or null"), "evaluation.batch_size": (INT, "an integer"),
    "evaluation.max_new_tokens.math": (INT + (type(None),), "an integer or null (the protocol's)"),
    "evaluation.max_new_tokens.commonsense": (INT + (type(None),), "an integer or null (the protocol's)"),
    "evaluation.do_sample": (BOOL + (type(None),), "true, false or null (the protocol's)"), "evaluation.eval_base": (BOOL, "true or false"),
    "evaluation.scoring": (STR, "'generate' or 'loglik'"), "evaluation.loglik_metric": (STR, "'acc' or 'acc_norm'"),
    "analysis.embeddings": (BOOL, "true or false"), "analysis.n_bootstrap": (INT, "an integer"),
    "analysis.bootstrap_seed": (INT, "an integer"),
    "execution.executor": (STR, "'local' or 'slurm'"), "execution.parallel": (INT, "an integer"),
    **{f"execution.slurm_resources.{stage}.{key}": (INT, "an integer")
       for stage in DEFAULTS["execution"]["slurm_resources"] for key in SLURM_RESOURCE_KEYS},
}
for _role in ("teacher", "student"):
    for _key, _default in TRAINING_DEFAULTS.items():
        _types = {bool: (BOOL, "true or false"), int: (INT, "an integer"), float: (NUMBER, "a number"),
                  str: (STR, "a string")}.get(
            type(_default), (INT + (type(None),), "an integer or null"))
        TYPES[f"training.{_role}.{_key}"] = _types


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
    from kd_utils.models import EMBEDDED_MODEL

    if not isinstance(name, str):
        return False
    return name == EMBEDDED_MODEL or Path(name).expanduser().is_dir() or (
        bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~")))


def _number_list(params: dict, key: str, problems: list[str], check, rule: str) -> None:
    values = params[key]
    if not isinstance(values, list) or not values:
        problems.append(f"{key}: expected a non-empty list")
        return
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not check(v):
            problems.append(f"{key}[{i}]: {v!r} must be {rule}")


def validate(params: dict) -> list[str]:
    """All problems in merged params (an empty list means valid)."""
    problems: list[str] = []
    for dotted, (types, what) in TYPES.items():
        value = _leaf(params, dotted)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            problems.append(f"{dotted}: expected {what}, got {value!r}")
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
    for key, allowed in (("methods", METHODS), ("domains", ("math", "commonsense")), ("teacher_expertise", EXPERTISE)):
        values = params[key]
        if not isinstance(values, list) or not values:
            problems.append(f"{key}: expected a non-empty list (an empty grid runs nothing)")
            continue
        for i, v in enumerate(values):
            if v not in allowed:
                close = difflib.get_close_matches(str(v), allowed, n=1)
                problems.append(f"{key}[{i}]: unknown {key[:-1].replace('_', ' ')} {v!r}; expected one of "
                                f"{', '.join(allowed)}" + (f" (did you mean '{close[0]}'?)" if close else ""))
    _number_list(params, "temperatures", problems, lambda v: v > 0, "> 0 (tau <= 0 is undefined)")
    _number_list(params, "noise_sigmas", problems, lambda v: v >= 0, ">= 0")
    _number_list(params, "seeds", problems, lambda v: isinstance(v, int) and v >= 0, "a non-negative integer")
    tasks = params["evaluation"]["tasks"]
    try:
        tasks_for(tasks)
    except (KeyError, TypeError):
        bad = [t for t in (tasks if isinstance(tasks, list) else [tasks]) if t not in TASKS]
        problems.append(f"evaluation.tasks: unknown task id(s) {bad}; expected 'all', 'core', 'math', 'commonsense' "
                        f"or ids from {', '.join(TASKS)}")
    problems += _scoring_problems(params["evaluation"])
    kd = params["kd"]
    for key in ("kd_weight", "beta", "lmbda"):
        if isinstance(kd[key], (int, float)) and not 0 <= kd[key] <= 1:
            problems.append(f"kd.{key}: must be in [0, 1], got {kd[key]}")
    if kd["distill_positions"] not in (None, *KD_POSITIONS):
        problems.append(f"kd.distill_positions: expected one of {', '.join(KD_POSITIONS)} or null, "
                        f"got {kd['distill_positions']!r}")
    try:
        protocol = get_protocol(params["protocol"]).name
    except ValueError as err:
        problems.append(str(err))
    else:
        if protocol != DEFAULT_PROTOCOL and params["teacher_cache"]["enabled"]:
            problems.append(f"teacher_cache.enabled: the teacher cache stores {DEFAULT_PROTOCOL}-protocol rows; "
                            f"protocol {protocol!r} trains from the online teacher (set enabled: false)")
    if params["execution"]["executor"] not in ("local", "slurm"):
        problems.append(f"execution.executor: expected 'local' or 'slurm', got {params['execution']['executor']!r}")
    for key in params["execution"]["slurm"]:
        if key in SLURM_RESOURCE_KEYS:
            problems.append(f"execution.slurm.{key}: resources are set per stage, under "
                            f"execution.slurm_resources.<stage>.{key} (stages: {', '.join(DEFAULTS['execution']['slurm_resources'])})")
        elif key not in ("partition", "account"):
            problems.append(f"execution.slurm.{key}: unknown key (expected partition or account)")
    cache = params["teacher_cache"]
    # choices and minimums from kd_utils.cache_config.TeacherCacheConfig
    problems += cache_config.setting_problems({key: cache[key] for key in cache_config.STUDY_FIELDS}, "teacher_cache")
    primaries = params["analysis"]["primary_hypotheses"]
    if primaries is not None and (not isinstance(primaries, list) or not primaries
                                  or any(h not in CLAIMS for h in primaries)):
        problems.append(f"analysis.primary_hypotheses: expected null or a non-empty list of {', '.join(CLAIMS)}, "
                        f"got {primaries!r}")
    cacheable = cacheable_methods(cache["representation"])
    if not isinstance(cache["methods"], list) or any(m not in cacheable for m in cache["methods"]):
        problems.append(f"teacher_cache.methods: expected a list of {' or '.join(cacheable)} (what a "
                        f"{cache['representation']} cache can train; gkd's on-policy part needs the online teacher), "
                        f"got {cache['methods']!r}")
    if cache["enabled"] and params["training"]["student"]["val_examples"] is not None:
        problems.append("training.student.val_examples: the teacher cache selects its rows by val_fraction; "
                        "set val_examples: null or teacher_cache.enabled: false")
    for role in ("teacher", "student"):
        problems += _batch_problems(f"training.{role}", params["training"][role])
        if isinstance(params["training"][role]["mix"], str) and params["training"][role]["mix"] not in MIXES:
            problems.append(f"training.{role}.mix: expected one of {', '.join(MIXES)}, "
                            f"got {params['training'][role]['mix']!r}")
    if cache["enabled"] and params["training"]["student"]["mix"] != DEFAULT_MIX:
        problems.append(f"training.student.mix: the teacher cache is built from the {DEFAULT_MIX!r} mix; "
                        "set mix: llm_adapters or teacher_cache.enabled: false")
    return problems


def _scoring_problems(ev: dict) -> list[str]:
    """evaluation.scoring / loglik_metric: known values; loglik only over multiple-choice tasks."""
    problems = []
    if ev["scoring"] not in SCORINGS:
        problems.append(f"evaluation.scoring: expected one of {', '.join(SCORINGS)}, got {ev['scoring']!r}")
    if ev["loglik_metric"] not in METRICS:
        problems.append(f"evaluation.loglik_metric: expected one of {', '.join(METRICS)}, got {ev['loglik_metric']!r}")
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
    if isinstance(t["batch_size"], int) and isinstance(t["micro_batch_size"], int) and (
            t["micro_batch_size"] < 1 or t["batch_size"] % t["micro_batch_size"]):
        return [f"{where}.batch_size: {t['batch_size']} must be a multiple of micro_batch_size {t['micro_batch_size']}"]
    return []


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
                types, what = TYPES[f"training.teacher.{key}"]
                if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                    problems.append(f"{where}.training.{key}: expected {what}, got {value!r}")
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
        for role in ("teacher", "student"):
            if params["training"][role]["mix"] == DEFAULT_MIX:
                del params["training"][role]["mix"]
    return params
