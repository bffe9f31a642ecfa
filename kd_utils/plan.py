"""A study's plan: the params grid expanded into a graph of runs, each named by a content hash.

Run ids are content hashes of a run's resolved parameters (upstream runs enter by id), so a re-run
finds the runs it has done before, and a changed parameter makes a new run. Parameters that point into
the study directory start with ``@study/`` and are resolved when a run executes (:func:`resolve`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kd_utils.params import teacher_specs
from kd_utils.protocols import get_protocol
from kd_utils.tasks import tasks_for

if TYPE_CHECKING:
    import pandas as pd

STUDY_PREFIX = "@study/"  # parameters that point into the study directory (resolved at execution)


@dataclass
class Run:
    """One notebook execution of a study: its stage, parameters and upstream runs; ``id`` hashes them."""

    stage: str
    notebook: str
    parameters: dict
    deps: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # the results.csv columns this run contributes
    label: str = ""
    id: str = ""

    def __post_init__(self):
        if not self.id:
            payload = json.dumps([self.stage, self.notebook, self.parameters, sorted(self.deps)], sort_keys=True)
            self.id = f"{self.stage}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _training_params(params: dict, role: str) -> dict:
    return {**params["training"][role], "protocol": params["protocol"]}


@dataclass
class TeacherRun:
    """One fine-tuned teacher of a domain: its run, how students load it, its name in results and labels."""

    run: Run
    model: str
    adapter: str | None
    name: str  # results.csv's teacher column of its students, and its own eval's model
    label: str  # how run labels name it ("" for a study's only teacher: labels as before)


def _teachers(params: dict, domain: str, seed0: int) -> list[TeacherRun]:
    """The domain's teacher runs: one per ``models.teachers`` entry (each with its own training budget), or
    the one ``models.teacher`` (whose run parameters and names are those of single-teacher studies)."""
    out = []
    for spec in teacher_specs(params):
        run = Run("teacher", "finetune.ipynb", {"model": spec["model"], "domain": domain, "seed": seed0,
                                                "data_dir": params["data_dir"], **spec["training"],
                                                "protocol": params["protocol"]})
        name, detail = spec["name"] or spec["model"], ""
        if spec["name"]:  # the label says what sets this teacher apart: its model and budget
            budget = [f"{k}={v}" for k, v in spec["training"].items() if params["training"]["teacher"][k] != v]
            detail = f" ({', '.join([spec['model']] + budget)})"
        run.label = f"fine-tune teacher {name}{detail} on {domain}"
        adapter = f"{STUDY_PREFIX}runs/{run.id}/adapter" if spec["training"]["lora"] else None
        model = f"{STUDY_PREFIX}runs/{run.id}/model" if adapter is None else spec["model"]
        out.append(TeacherRun(run, model, adapter, f"{name}:{domain}-expert", spec["name"] or ""))
    return out


def plan(params: dict) -> list[Run]:
    """Expand a validated study into runs, in dependency order.

    Every student is distilled from every teacher; its SFT runs (no teacher) are shared by all of them.
    """
    teacher_base = params["models"]["teacher"]  # also the base that layer-subset students are cut from
    ev = params["evaluation"]
    task_ids = [t.id for t in tasks_for(ev["tasks"])]
    eval_common = {"tasks": task_ids, "n_per_task": ev["n_per_task"], "batch_size": ev["batch_size"],
                   "max_new_tokens_math": ev["max_new_tokens"]["math"],
                   "max_new_tokens_commonsense": ev["max_new_tokens"]["commonsense"], "do_sample": ev["do_sample"],
                   "data_dir": params["data_dir"], "protocol": params["protocol"]}
    if ev["scoring"] != "generate":  # left out at the default: the run ids of generate-scored studies stay the same
        eval_common |= {"scoring": ev["scoring"], "loglik_metric": ev["loglik_metric"]}
    seed0 = params["seeds"][0]
    cached_methods = params["teacher_cache"]["methods"] if params["teacher_cache"]["enabled"] else []
    runs: list[Run] = []

    def evaluate(model: str, adapter: str | None, upstream: Run | None, meta: dict, label: str) -> None:
        runs.append(Run("eval", "evaluate.ipynb", {**eval_common, "model": model, "adapter": adapter, "seed": seed0},
                        [upstream.id] if upstream else [], meta, f"eval {label}"))

    if ev["eval_base"]:
        evaluate(teacher_base, None, None, {"role": "base", "model": teacher_base, "teacher": "", "method": "",
                                            "seed": seed0}, teacher_base)
    multi_domain = len(params["domains"]) > 1
    for domain in params["domains"]:
        teachers = _teachers(params, domain, seed0)
        for t in teachers:
            runs.append(t.run)
            evaluate(t.model, t.adapter, t.run, {"role": "teacher", "model": t.name, "teacher": "",
                                                 "method": "sft", "seed": seed0}, t.name)
        caches: dict[tuple, Run] = {}  # (teacher, seed, task-aware) -> the cache run students of that seed share
        for student in params["models"]["students"]:
            name = f"{student['name']}@{domain}" if multi_domain else student["name"]
            if "layers" in student:
                base_args = {"model": teacher_base, "student_layers": student["layers"]}
                student_base = f"{STUDY_PREFIX}runs/student-{Path(teacher_base).name}-L{student['layers']}"
            else:
                base_args, student_base = {"model": student["model"], "student_layers": None}, student["model"]
            for seed in params["seeds"]:
                for method, tau, sigma, expertise in _grid(params):
                    aware = expertise == "task_aware"
                    for t in teachers[:1] if method == "sft" else teachers:  # sft has no teacher: one run
                        run_params = {**base_args, "method": method, "domain": domain, "seed": seed,
                                      "data_dir": params["data_dir"], **_training_params(params, "student")}
                        deps, source = [], ""
                        if method != "sft":
                            run_params.update({"teacher": t.model, "teacher_adapter": t.adapter,
                                               "task_aware_teacher": aware, "temperature": tau, "noise_sigma": sigma,
                                               **params["kd"]})
                            deps = [t.run.id]
                        if method in cached_methods:
                            key = (t.run.id, seed, aware)
                            if key not in caches:
                                caches[key] = cache_run(params, domain, t, aware, seed)
                                runs.append(caches[key])
                            run_params["teacher_cache"] = f"{STUDY_PREFIX}runs/{caches[key].id}"
                            deps, source = [caches[key].id], " (teacher cache)"
                        who = f"{name} from {t.label}" if t.label and method != "sft" else name
                        train = Run("student", "distill.ipynb", run_params, deps,
                                    label=f"{method}{source} {who} tau={tau} sigma={sigma} {expertise} seed={seed}")
                        runs.append(train)
                        student_adapter = f"{STUDY_PREFIX}runs/{train.id}/adapter" if run_params["lora"] else None
                        student_model = student_base if student_adapter else f"{STUDY_PREFIX}runs/{train.id}/model"
                        t_name = "" if method == "sft" else (t.name if aware else f"{teacher_base}:base")
                        evaluate(student_model, student_adapter, train,
                                 {"role": "student", "model": name, "teacher": t_name, "method": method,
                                  "temperature": tau if method != "sft" else None,
                                  "noise_sigma": sigma if method != "sft" else 0.0, "seed": seed},
                                 f"{method} {who} tau={tau} sigma={sigma} {expertise}")
    return runs


def cache_run(params: dict, domain: str, teacher: TeacherRun, aware: bool, seed: int) -> Run:
    """Teacher logit generation over the students' training mix, for every temperature and sigma at once."""
    student = params["training"]["student"]
    cache = params["teacher_cache"]
    return Run("cache", "teacher_cache.ipynb", {
        "teacher": teacher.model, "teacher_adapter": teacher.adapter, "task_aware_teacher": aware, "domain": domain,
        "n_train": student["n_train"], "include_mawps": student["include_mawps"], "data_dir": params["data_dir"],
        "seed": seed, "max_length": student["max_length"], "val_fraction": student["val_fraction"],
        "representation": cache["representation"], "k": cache["k"], "num_samples": cache["num_samples"],
        "temperatures": list(params["temperatures"]), "noise_sigmas": list(params["noise_sigmas"]),
        "epochs": student["epochs"],
        # at its default the key is left out, so the run ids of studies planned before it existed stay the same
        **({"id_coding": cache["id_coding"]} if cache["id_coding"] != "fixed" else {}),
        # the protocol's precision when it is not auto (the teacher cache has no protocol of its own)
        **({"precision": precision} if (precision := get_protocol(params["protocol"]).precision) != "auto" else {})},
        [teacher.run.id], label=f"teacher cache {teacher.label or teacher.model} on {domain} "
                                f"({cache['representation']}) seed={seed}" + ("" if aware else " task-unaware"))


def _grid(params: dict):
    """(method, tau, sigma, expertise) combinations; sft has no teacher, seqkd no temperature or noise."""
    seen = set()
    for method in params["methods"]:
        for tau in params["temperatures"]:
            for sigma in params["noise_sigmas"]:
                for expertise in params["teacher_expertise"]:
                    combo = ((method, 1.0, 0.0, "task_aware") if method == "sft" else
                             (method, 1.0, 0.0, expertise) if method == "seqkd" else (method, tau, sigma, expertise))
                    if combo not in seen:
                        seen.add(combo)
                        yield combo


def resolve(value, study_dir: Path):
    """A parameter value with its ``@study/`` prefix replaced by the study directory."""
    if isinstance(value, str) and value.startswith(STUDY_PREFIX):
        return str(study_dir / value[len(STUDY_PREFIX):])
    return value


def analysis_run(params: dict, results: pd.DataFrame) -> Run:
    """The analysis notebook over results.csv; its id changes whenever the results do."""
    parameters = {"results_source": "study", "results_path": f"{STUDY_PREFIX}results.csv",
                  "runs_dir": f"{STUDY_PREFIX}runs", "models_path": f"{STUDY_PREFIX}models.csv",
                  "report_dir": STUDY_PREFIX, **params["analysis"]}  # report.html is read from the study directory
    digest = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode() + results.to_csv(index=False).encode())
    return Run("analysis", "analysis.ipynb", parameters, label="analysis and report",
               id=f"analysis-{digest.hexdigest()[:12]}")
