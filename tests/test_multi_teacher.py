"""Several teachers in one study (models.teachers): validation, the plan, the cost model, and the analysis.

Teachers of one model differ by fine-tuning budget (issue 15's H2 design); every student is distilled from
every teacher, its SFT runs shared by all of them, and results name each student's teacher.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kd_utils import costs, params, study
from kd_utils.analysis import study_analysis
from kd_utils.io import write_atomic
from kd_utils.tasks import accuracy_summary

PARAMS = Path(__file__).resolve().parents[1] / "params"

# params/default.yaml's plan: models.teachers left every id as at commit 1ec95bc; cache format 4 (a cache made
# for the students' epochs, one draw set each) changed only the cache run and the fkl students trained from it
# (a format-3 cache is refused anyway). Run ids must not change otherwise, or every finished study redoes its runs.
DEFAULT_PLAN = [
    "eval-1ac03c84a1ad", "teacher-1e07b800e2d7", "eval-2d5a3906389f", "student-ced88a4def2d", "eval-b0c8cf40b5d0",
    "cache-36d4c0fa9b24", "student-3caeef52b000", "eval-951b25d4bd23", "student-7e9abcc26b6e", "eval-95da489862e9",
    "student-b00cf4f4634b", "eval-da82a53dfd44", "student-0e03c60273c1", "eval-61b386522548", "student-1a7e06011175",
    "eval-1df3dd3a1a2a", "student-33264e7975f9", "eval-f164f53f1ad4", "student-5d8dc2110ddc", "eval-b30d31f2547d",
]


def write(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def study_content(teachers: list[dict], students: int = 2, **overrides) -> dict:
    return {"study": "multi", "models": {"teacher": "smollm2-135m-instruct", "teachers": teachers,
                                         "students": [{"name": f"s{k}", "layers": k} for k in range(1, students + 1)]},
            "methods": ["sft", "fkl", "rkl"], "temperatures": [1.0, 2.0], "seeds": [0, 1],
            "teacher_cache": {"enabled": True, "methods": ["fkl"]},
            "training": {"teacher": {"epochs": 3, "n_train": 64}, "student": {"n_train": 32}},
            "evaluation": {"tasks": ["gsm8k", "svamp"], "n_per_task": 4}, **overrides}


TWO_TEACHERS = [{"name": "t-e1", "training": {"epochs": 1}}, {"name": "t-e2", "training": {"n_train": 128}}]


def test_default_plan_is_unchanged():
    assert [r.id for r in study.plan(params.load_study(PARAMS / "default.yaml"))] == DEFAULT_PLAN


def test_two_teacher_plan(tmp_path):
    p = params.load_study(write(tmp_path, study_content(TWO_TEACHERS)))
    runs = study.plan(p)
    by_id = {r.id: r for r in runs}
    teachers = [r for r in runs if r.stage == "teacher"]
    # each teacher's budget over training.teacher; everything else as training.teacher
    assert [(t.parameters["epochs"], t.parameters["n_train"]) for t in teachers] == [(1, 64), (3, 128)]
    assert teachers[0].parameters | {"epochs": 3} == teachers[1].parameters | {"n_train": 64}
    assert [t.label for t in teachers] == ["fine-tune teacher t-e1 (smollm2-135m-instruct, epochs=1) on math",
                                           "fine-tune teacher t-e2 (smollm2-135m-instruct, n_train=128) on math"]
    name_of = {t.id: n for t, n in zip(teachers, ["t-e1:math-expert", "t-e2:math-expert"])}
    evals = {r.deps[0] if r.deps else None: r for r in runs if r.stage == "eval"}
    assert [evals[t.id].meta["model"] for t in teachers] == ["t-e1:math-expert", "t-e2:math-expert"]
    assert all(evals[t.id].meta["role"] == "teacher" for t in teachers)

    students = [r for r in runs if r.stage == "student"]
    sft = [r for r in students if r.parameters["method"] == "sft"]
    kd = [r for r in students if r.parameters["method"] != "sft"]
    assert len(sft) == 2 * 2  # one per (student, seed), shared by both teachers
    assert all(not r.deps and evals[r.id].meta["teacher"] == "" for r in sft)
    assert len(kd) == 2 * 2 * 2 * 2 * 2  # students x seeds x (fkl, rkl) x temperatures x teachers
    caches = [r for r in runs if r.stage == "cache"]
    assert len(caches) == 2 * 2  # one per (teacher, seed)
    for r in kd:
        teacher_id = by_id[r.deps[0]].deps[0] if r.parameters["method"] == "fkl" else r.deps[0]
        assert r.parameters["teacher_adapter"] == f"@study/runs/{teacher_id}/adapter"
        assert evals[r.id].meta["teacher"] == name_of[teacher_id]
        assert f"from {name_of[teacher_id].split(':')[0]} " in r.label
        if r.parameters["method"] == "fkl":  # its own teacher's cache, of its seed
            cache = by_id[r.deps[0]]
            assert r.parameters["teacher_cache"] == f"@study/runs/{cache.id}"
            assert cache.parameters["teacher_adapter"] == r.parameters["teacher_adapter"]
            assert cache.parameters["seed"] == r.parameters["seed"]
    # every (student, method, tau, seed) is distilled from both teachers
    combos = pd.DataFrame([{k: r.parameters[k] for k in ("student_layers", "method", "temperature", "seed")}
                           | {"teacher": r.parameters["teacher_adapter"]} for r in kd])
    assert (combos.groupby(["student_layers", "method", "temperature", "seed"])["teacher"].nunique() == 2).all()
    assert len({r.id for r in runs}) == len(runs)


@pytest.mark.parametrize("teachers, expected", [
    ([{"name": "a"}, {"name": "a", "training": {"epochs": 1}}],
     "models.teachers[1].name: 'a' is already models.teachers[0].name; names must be unique"),
    ([{"name": "a", "trainig": {"epochs": 1}}],
     "models.teachers[0].trainig: unknown key (did you mean 'models.teachers[0].training'?)"),
    ([{"name": "a", "training": {"epoch": 1}}],
     "models.teachers[0].training.epoch: unknown key (did you mean 'models.teachers[0].training.epochs'?)"),
    ([{"name": "a", "training": {"lr": "fast"}}], "models.teachers[0].training.lr: expected a number, got 'fast'"),
    ([{"name": "a", "training": {"epochs": 2}}, {"name": "b", "training": {"epochs": 2}}],
     "models.teachers[1]: same model and training as models.teachers[0] ('a'); give it a different budget"),
    ([{"name": "a", "training": {"batch_size": 6, "micro_batch_size": 4}}],
     "models.teachers[0].training.batch_size: 6 must be a multiple of micro_batch_size 4"),
    ([{"model": "./no/such/dir"}], "models.teachers[0].name: a name of letters, digits"),
    ([{"name": "a", "model": "./no/such/dir"}], "models.teachers[0].model: './no/such/dir' is neither"),
    ([], "models.teachers: expected null (one teacher, models.teacher) or a non-empty list"),
    (["a"], "models.teachers[0]: expected a mapping with name"),
])
def test_teacher_list_problems_name_their_key(tmp_path, teachers, expected):
    with pytest.raises(params.ParamsError) as err:
        params.load_study(write(tmp_path, study_content(teachers)))
    assert expected in str(err.value)


def test_several_teachers_reject_the_expertise_ablation(tmp_path):
    with pytest.raises(params.ParamsError, match="teacher_expertise: task_unaware with models.teachers"):
        params.load_study(write(tmp_path, study_content(TWO_TEACHERS,
                                                        teacher_expertise=["task_aware", "task_unaware"])))


def test_each_teacher_costs_its_own_budget(tmp_path):
    """A teacher of a list processes the tokens of a single-teacher study with that budget."""
    multi = params.load_study(write(tmp_path, study_content(TWO_TEACHERS, methods=["sft", "rkl"], seeds=[0])))
    work = costs.study_work(multi, study.plan(multi))
    for spec in params.teacher_specs(multi):
        content = study_content(None, methods=["sft", "rkl"], seeds=[0])
        content["training"]["teacher"] = {k: spec["training"][k] for k in ("epochs", "n_train")}
        single = params.load_study(write(tmp_path, content))
        single_runs = study.plan(single)
        expected = [(w.kind, w.tokens) for w in costs.study_work(single, single_runs) if w.stage == "teacher"]
        teacher_id = next(r.id for r in single_runs if r.stage == "teacher")  # same parameters, same id
        assert [(w.kind, w.tokens) for w in work if w.run_id == teacher_id] == expected
    # every rkl run (2 students x 2 temperatures x 2 teachers) forwards its online teacher
    teacher_size = costs.model_parameters("smollm2-135m-instruct")
    online = [w for w in work if w.stage == "student" and w.kind == "forward" and w.n_params == teacher_size]
    assert len(online) == 2 * 2 * 2 and len({w.tokens for w in online}) == 1


def test_dry_run_prints_the_h2_design(tmp_path, monkeypatch, capsys):
    teachers = [{"name": f"t-e{e}", "training": {"epochs": e}} for e in (1, 2, 3)]
    path = write(tmp_path, study_content(teachers, students=3, methods=["sft", "rkl"], temperatures=[2.0]))
    monkeypatch.setenv("KD_COST_TABLE", str(tmp_path / "none.json"))
    assert study.main(["run", str(path), "--dry-run", "--output-root", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    # the teachers are H2's units: 3 teachers allow 3! = 6 relabellings, smallest p 1/6, and the dry run says so
    assert "H2_teacher_performance (math): 3 teachers shared by students, smallest p 0.167: NOT testable; needs 4 or " \
           "more teachers" in out
    assert "H1_improvement_ttest (math): 3 students, smallest p 0.125: NOT testable; needs 5 or more students" in out
    assert "H1 math: 3 students (each 6 KD - 2 SFT runs), 2 tasks" in out


def test_the_analysis_sees_every_teacher(tmp_path):
    """results.csv from a 3-teacher plan: improvements per (teacher, student), and H2 with the teachers as units.

    Accuracies are written so that the gain grows with the teacher's accuracy for every student. The teachers
    are shared by every student, so they are H2's units: 3 teachers allow 3! relabellings, a smallest p of
    1/6, and H2 is "not testable" (needing 4 teachers) however perfect the correlation.
    """
    teachers = [{"name": f"t-e{e}", "training": {"epochs": e}} for e in (1, 2, 3)]
    p = params.load_study(write(tmp_path, study_content(teachers, students=3, methods=["sft", "rkl"],
                                                        temperatures=[2.0], seeds=[0])))
    runs = study.plan(p)
    teacher_accuracy = {"t-e1:math-expert": 20, "t-e2:math-expert": 30, "t-e3:math-expert": 40}
    study_dir = tmp_path / "out"
    for r in runs:
        if r.stage != "eval":
            continue
        meta = r.meta
        if meta["role"] == "teacher":
            correct = teacher_accuracy[meta["model"]] * 3
        elif meta["role"] == "student":
            sft = 30 + 15 * int(meta["model"][1:])  # s1, s2, s3 at 15%, 20%, 25% of 300
            correct = sft + (teacher_accuracy[meta["teacher"]] // 10) * 3 if meta["method"] == "rkl" else sft
        else:
            correct = 30
        rows = [{"task": t, "domain": "math", **accuracy_summary(correct, 300), "protocol": r.parameters["protocol"]}
                for t in ("gsm8k", "svamp")]
        write_atomic(study_dir / "runs" / r.id / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))
    results = study.collect_results(p, runs, {r.id: {"state": "done"} for r in runs}, study_dir)
    assert set(results.loc[results["role"] == "student", "teacher"]) == {""} | set(teacher_accuracy)
    analysis = study_analysis(results, n_bootstrap=50, n_permutations=999, mixed_model=False)
    imp = analysis.improvements[analysis.improvements["task"] == "average"]
    assert len(imp) == 9 and set(imp["teacher"]) == set(teacher_accuracy)
    assert (imp["teacher_accuracy"] == imp["teacher"].map(teacher_accuracy)).all()
    assert (imp["improvement"].round(6) == (imp["teacher_accuracy"] / 10 * 3 / 3).round(6)).all()
    h2 = analysis.tests[(analysis.tests["hypothesis"] == "H2_teacher_performance") & (analysis.tests["method"] == "all")
                        & (analysis.tests["task"] == "average")].iloc[0]
    assert h2["n"] == 9 and h2["min_pvalue"] == pytest.approx(1 / 6) and math.isnan(h2["pvalue"])
    assert h2["note"].startswith("not testable: 3 teachers allow 6 teacher relabelling(s)")
    assert "needs 4 or more teachers" in h2["note"]
