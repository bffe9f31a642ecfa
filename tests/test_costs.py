"""The dry-run cost model: interpolation of a measured table, and the token counts of a planned study."""

import math
import random
from pathlib import Path

import pytest

from kd_utils import costs, dry_run, study
from kd_utils.batches import split_train_val, tokenize_example
from kd_utils.data import available_tasks, build_training_mix, load_task
from kd_utils.evaluation import sample_examples
from kd_utils.models import load_tokenizer
from kd_utils.params import load_study
from kd_utils.tasks import build_prompt, get_task, tasks_for

PARAMS = Path(__file__).resolve().parents[1] / "params"


def fake_table() -> costs.CostTable:
    """Rates in round numbers: 1e6-parameter model twice as fast as 4e6 (log-log slope -1/2), batch 8 four times 2."""
    entries = []
    for n, scale in ((1e6, 2.0), (4e6, 1.0)):
        for kind, base in (("train", 100.0), ("forward", 300.0), ("generate", 50.0)):
            entries += [{"kind": kind, "n_params": n, "batch": 2, "tokens_per_s": base * scale},
                        {"kind": kind, "n_params": n, "batch": 8, "tokens_per_s": 4 * base * scale}]
    return costs.CostTable("fake", entries, run_overhead_s=5.0)


def test_rates_at_measured_points_and_between_them():
    table = fake_table()
    assert table.rate("train", 1e6, 2) == pytest.approx(200.0)
    assert table.rate("generate", 4e6, 8) == pytest.approx(200.0)
    # halfway in log size (2e6) the rate is halfway in log rate: 100 * sqrt(2)
    assert table.rate("train", 2e6, 2) == pytest.approx(100 * math.sqrt(2))
    # halfway in log batch (4) between 2 and 8: 2x the batch-2 rate
    assert table.rate("forward", 4e6, 4) == pytest.approx(600.0)
    # beyond the sizes: 1/parameters; beyond the largest batch: flat; below the smallest: proportional
    assert table.rate("train", 8e6, 2) == pytest.approx(50.0)
    assert table.rate("train", 4e6, 64) == pytest.approx(400.0)
    assert table.rate("generate", 4e6, 1) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="unknown cost kind 'backward'"):
        table.rate("backward", 1e6, 2)


def test_known_tokens_give_known_seconds():
    table = fake_table()
    work = [costs.Work("student", "a", "train", int(1e6), 2, 2000.0),   # 2000 / 200 = 10 s
            costs.Work("student", "a", "forward", int(4e6), 8, 2400.0),  # 2400 / 1200 = 2 s
            costs.Work("eval", "b", "generate", int(4e6), 8, 1000.0)]   # 1000 / 200 = 5 s
    est = costs.estimate(work, table, {"student": 1, "eval": 2})
    assert est["student"]["seconds"] == pytest.approx(10 + 2 + 5)
    assert est["eval"]["seconds"] == pytest.approx(5 + 2 * 5)
    assert est["student"]["tokens"]["train"] == 2000


def test_table_round_trip_keeps_other_devices(tmp_path):
    path = tmp_path / "table.json"
    costs.save_table(fake_table(), path)
    other = costs.CostTable("other", [{"kind": "train", "n_params": 1, "batch": 1, "tokens_per_s": 1.0}], 1.0)
    costs.save_table(other, path)
    assert costs.load_table(path, "fake").entries == fake_table().entries
    assert costs.load_table(path, "other").run_overhead_s == 1.0
    assert costs.load_table(path, "missing") is None
    assert costs.load_table(tmp_path / "absent.json") is None
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a cost table"):
        costs.load_table(path, "fake")


def _default_params():
    params = load_study(PARAMS / "default.yaml")
    return params, study.plan(params)


def _expected_training_tokens(tok, examples, t: dict, seed: int) -> int:
    """What training.train steps on, recomputed here: whole accumulation groups of each epoch's shuffle."""
    train, _ = split_train_val(examples, t["val_fraction"], seed)
    lengths = [len(tokenize_example(tok, e, t["max_length"])["input_ids"]) for e in train]
    accumulation = t["batch_size"] // t["micro_batch_size"]
    steps = math.ceil(len(lengths) / t["micro_batch_size"]) // accumulation
    total = 0
    for epoch in range(1, t["epochs"] + 1):
        order = list(range(len(lengths)))
        random.Random(seed * 100003 + epoch).shuffle(order)
        total += sum(lengths[i] for i in order[:steps * accumulation * t["micro_batch_size"]])
    return total


def test_default_study_token_counts_match_what_the_runs_process():
    params, runs = _default_params()
    work = costs.study_work(params, runs)
    tok = load_tokenizer(params["models"]["teacher"])
    seed = params["seeds"][0]
    mix = build_training_mix("math", params["data_dir"], include_mawps=True)[0]

    def tokens(stage, kind):
        return sum(w.tokens for w in work if w.stage == stage and w.kind == kind)

    t = params["training"]["teacher"]
    teacher_examples = sample_examples(mix, t["n_train"], seed)
    assert tokens("teacher", "train") == _expected_training_tokens(tok, teacher_examples, t, seed)
    s = params["training"]["student"]
    student_examples = sample_examples(mix, s["n_train"], seed)
    per_student = _expected_training_tokens(tok, student_examples, s, seed)
    n_students = sum(r.stage == "student" for r in runs)
    assert tokens("student", "train") == n_students * per_student
    # the cache: one teacher forward over the training split
    train, _ = split_train_val(student_examples, s["val_fraction"], seed)
    assert tokens("cache", "forward") == sum(len(tokenize_example(tok, e, s["max_length"])["input_ids"]) for e in train)
    # rkl (online teacher) adds a teacher forward over its training tokens; gkd samples gkd_max_new_tokens on policy
    online = [r for r in runs if r.stage == "student" and r.parameters["method"] in ("rkl", "gkd")]
    val = split_train_val(student_examples, s["val_fraction"], seed)[1]
    val_tokens = sum(len(tokenize_example(tok, e, s["max_length"])["input_ids"]) for e in val) * (s["epochs"] + 1)
    assert tokens("student", "forward") == len(online) * per_student + n_students * val_tokens
    assert tokens("student", "generate") % params["kd"]["gkd_max_new_tokens"] == 0
    # evaluation: every eval run's prompts and at most max_new_tokens per example
    ev = params["evaluation"]
    ready, _ = available_tasks([t.id for t in tasks_for(ev["tasks"])],
                               params["data_dir"])
    prompts = generated = 0
    for task_id in ready:
        examples = sample_examples(load_task(task_id, "test", params["data_dir"]), ev["n_per_task"], seed)
        prompts += sum(len(tok(build_prompt(e.instruction, e.input))["input_ids"]) for e in examples)
        generated += ev["max_new_tokens"][get_task(task_id).domain] * len(examples)
    n_evals = sum(r.stage == "eval" for r in runs)
    assert tokens("eval", "forward") == n_evals * prompts
    assert tokens("eval", "generate") == n_evals * generated


def test_dry_run_prints_stage_times_or_how_to_make_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KD_COST_TABLE", str(tmp_path / "none.json"))
    assert study.main(["run", str(PARAMS / "default.yaml"), "--dry-run", "--output-root", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "python -m kd_utils.costs calibrate" in out and "teacher" in out
    table = fake_table()
    table.device = costs.device_kind()
    costs.save_table(table, tmp_path / "t.json")
    monkeypatch.setenv("KD_COST_TABLE", str(tmp_path / "t.json"))
    assert study.main(["run", str(PARAMS / "default.yaml"), "--dry-run", "--output-root", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    params, runs = _default_params()
    n_runs = {s: sum(r.stage == s for r in runs) for s in study.STAGES}
    n_runs["analysis"] = 1
    total = sum(v["seconds"] for v in costs.estimate(costs.study_work(params, runs), table, n_runs).values())
    assert f"{dry_run._duration(total)}" in out.split("total")[1].splitlines()[0]
    assert not (tmp_path / "o").exists()


def test_longest_chain_follows_dependencies():
    """teacher -> student -> eval is the longest chain; the analysis' fixed cost comes after it."""
    table = fake_table()  # 5 s fixed cost per run
    runs = [study.Run("teacher", "n", {}, id="t"), study.Run("student", "n", {}, ["t"], id="s1"),
            study.Run("student", "n", {}, ["t"], id="s2"), study.Run("eval", "n", {}, ["s1"], id="e1")]
    work = [costs.Work("teacher", "t", "train", int(1e6), 2, 2000.0),   # 10 s
            costs.Work("student", "s1", "train", int(1e6), 2, 400.0),   # 2 s
            costs.Work("student", "s2", "train", int(1e6), 2, 4000.0),  # 20 s, but nothing waits for it
            costs.Work("eval", "e1", "generate", int(4e6), 8, 1000.0)]  # 5 s
    assert costs.longest_chain(work, table, runs) == pytest.approx(max(10 + 2 + 5 + 3 * 5, 10 + 20 + 2 * 5) + 5)


def test_the_fixed_cost_of_a_run_is_a_notebook_run_and_its_html_export(monkeypatch):
    """As study.execute_run pays it: papermill in the python3 kernel from the project root (the notebook imports
    the package and loads the embedded model without error), then notebook_to_html, once per round."""
    import nbformat
    import papermill

    from kd_utils import report

    executed, exported = [], []
    real_execute, real_export = papermill.execute_notebook, report.notebook_to_html

    def execute(source, target, **kwargs):
        executed.append(kwargs)
        return real_execute(source, target, **kwargs)

    def export(notebook, html_path):
        nb = nbformat.read(str(notebook), as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not any(o.output_type == "error" for o in outputs)
        assert any(o.output_type == "display_data" for o in outputs)  # the figure a run notebook draws
        exported.append(real_export(notebook, html_path).read_text(encoding="utf-8"))
        return Path(html_path)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(report, "notebook_to_html", export)
    assert 0 < costs.run_overhead_seconds(rounds=1) < math.inf  # one round: each is a kernel start (~8 s)
    assert [k["kernel_name"] for k in executed] == ["python3"]
    assert executed[0]["cwd"] == str(costs.PROJECT_ROOT) and executed[0]["parameters"] == {}
    assert len(exported) == 1 and "Fixed cost of a run" in exported[0]
