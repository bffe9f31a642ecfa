"""kd_utils.statistics.results: every validation error word for word (column, value, row and file line),
names and ids read verbatim, and the canonical sort order."""

import re

import pandas as pd
import pytest

from kd_utils.statistics.results import (
    RESULTS_COLUMNS,
    load_model_sizes,
    load_results,
    method_label,
    sort_rows,
    validate_results,
)


def table(**changes) -> pd.DataFrame:
    """Four rows as results.csv holds them (strings, blanks for missing values); ``changes``: column -> {row: value}."""
    rows = [
        dict(run_id="T", role="teacher", model="teach", teacher="", method="sft", temperature=""),
        dict(run_id="B", role="base", model="teach", teacher="", method="", temperature=""),
        dict(run_id="S", role="student", model="stu", teacher="", method="sft", temperature=""),
        dict(run_id="K", role="student", model="stu", teacher="teach", method="fkl", temperature="2"),
    ]
    df = pd.DataFrame([{"study": "s", "noise_sigma": "", "seed": "0", "task": "gsm8k", "domain": "math", "n": "10",
                        "correct": "", "accuracy": str(10 * (i + 1)), "ci_low": "", "ci_high": "", **r}
                       for i, r in enumerate(rows)])[list(RESULTS_COLUMNS)]
    for column, values in changes.items():
        for row, value in values.items():
            df.loc[row, column] = value
    return df


def fails(message: str, df: pd.DataFrame, source: str = "t"):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate_results(df, source)


def test_a_valid_table_comes_back_with_floats_and_sigma_0_where_blank():
    out = validate_results(table(noise_sigma={3: "1"}))
    assert out["accuracy"].tolist() == [10.0, 20.0, 30.0, 40.0] and out["accuracy"].dtype == float
    assert out["noise_sigma"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert out["temperature"].isna().tolist() == [True, True, True, False] and out["temperature"].iloc[3] == 2.0
    assert out["run_id"].tolist() == ["T", "B", "S", "K"]


def test_missing_columns_name_the_source():
    with pytest.raises(ValueError, match=r"^results is missing required column\(s\): seed, task$"):
        validate_results(table().drop(columns=["task", "seed"]))


def test_missing_or_non_numeric_numbers_name_column_and_row():
    fails("t: column 'accuracy' is missing in row 2 (file line 3)", table(accuracy={1: " "}))
    fails("t: column 'accuracy' has non-numeric value 'x' in row 2 (file line 3)", table(accuracy={1: "x"}))
    fails("t: column 'seed' has non-numeric value 'n/a' in row 3 (file line 4)", table(seed={2: "n/a"}))
    # optional numbers may be blank
    assert validate_results(table(seed={2: ""}))["seed"].isna().tolist() == [False, False, True, False]


@pytest.mark.parametrize("column", ["run_id", "role", "model", "task", "domain"])
def test_blank_ids_are_errors(column):
    fails(f"t: column {column!r} is missing in row 2 (file line 3)", table(**{column: {1: ""}}))
    fails(f"t: column {column!r} is missing in row 4 (file line 5)", table(**{column: {3: "  "}}))


def test_only_kd_students_need_a_teacher():
    fails("t: column 'teacher' is missing in row 4 (file line 5)", table(teacher={3: ""}))
    # the teacher, the base model and the SFT student have none: valid
    assert validate_results(table())["teacher"].tolist() == ["", "", "", "teach"]


def test_unknown_roles_and_student_methods():
    fails("t: column 'role' has unknown value 'judge' in row 2 (file line 3); expected one of teacher, student, base",
          table(role={1: "judge"}))
    fails("t: column 'method' has unknown value 'kd' in row 3 (file line 4); expected one of sft, fkl, rkl, gkd, "
          "seqkd", table(method={2: "kd"}))
    # only students' methods are checked
    assert validate_results(table(method={0: "anything"}))["method"].iloc[0] == "anything"


def test_duplicate_run_and_task_even_with_other_values():
    df = table(run_id={3: "S"}, method={3: "sft"}, teacher={3: ""}, accuracy={3: "55"})
    fails("t: duplicate (run_id, task) = ('S', 'gsm8k') in row 4 (file line 5)", df)
    assert len(validate_results(table(run_id={3: "S"}, task={3: "svamp"}, method={3: "sft"}))) == 4


def test_load_results_reads_cells_verbatim(tmp_path):
    path = tmp_path / "results.csv"
    table(run_id={0: "007"}, model={1: "NA"}).to_csv(path, index=False)
    out = load_results(path)
    assert out["run_id"].iloc[0] == "007" and out["model"].iloc[1] == "NA"
    table(run_id={0: "01", 1: "02", 2: "03", 3: "04"}).to_csv(path, index=False)  # digits only: still ids
    assert load_results(path)["run_id"].tolist() == ["01", "02", "03", "04"]
    missing = tmp_path / "no.csv"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(f'results file not found: {missing}')}$"):
        load_results(missing)


def test_model_sizes_in_billions_with_names_verbatim(tmp_path):
    path = tmp_path / "models.csv"
    path.write_text("model,n_params\n007,500000000\nNA,1000000000\n")
    assert load_model_sizes(path) == {"007": 0.5, "NA": 1.0}
    path.write_text("model\nstu\n")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path} is missing required column(s): n_params')}$"):
        load_model_sizes(path)
    path.write_text("name,size\nstu,1\n")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path} is missing required column(s): model, n_params')}$"):
        load_model_sizes(path)
    path.write_text("model,n_params\n007,500000000\n")  # a column of digits only stays text too
    assert load_model_sizes(path) == {"007": 0.5}
    path.write_text("model,n_params\nstu,\n")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: column ')}'n_params' is missing in row 1 "):
        load_model_sizes(path)
    path.write_text("model,n_params\nstu,1000\nbig,lots\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: column 'n_params' has non-numeric value 'lots' in row 2")):
        load_model_sizes(path)


def test_method_labels():
    assert method_label("all") == "all (pooled)"
    assert method_label("fkl") == "fkl (SeqKD)"
    assert method_label("seqkd") == "seqkd (sequence-level KD (Kim & Rush))"
    assert method_label("other") == "other"


def test_sort_rows_in_the_canonical_order_and_stable():
    df = pd.DataFrame({"task": ["average", "svamp", "boolq", "gsm8k", "zzz", "aqua"], "x": range(6)})
    out = sort_rows(df, ["task"])
    assert out["task"].tolist() == ["gsm8k", "svamp", "aqua", "boolq", "average", "zzz"]  # unknown ids last
    assert list(out.columns) == ["task", "x"] and out.index.tolist() == list(range(6))
    methods = pd.DataFrame({"method": ["gkd", "all", "sft", "fkl"], "domain": ["commonsense", "math", "math", "math"]})
    assert sort_rows(methods, ["domain", "method"])["method"].tolist() == ["all", "sft", "fkl", "gkd"]
    # ties keep their order, also past the size where numpy's quicksort stops being an insertion sort
    many = pd.DataFrame({"task": ["svamp", "gsm8k", "boolq"] * 100, "x": range(300)})
    out = sort_rows(many, ["task"])
    assert out["task"].tolist() == ["gsm8k"] * 100 + ["svamp"] * 100 + ["boolq"] * 100
    assert out["x"].tolist() == list(range(1, 300, 3)) + list(range(0, 300, 3)) + list(range(2, 300, 3))
    # numbers go through numpy's argsort, where the sort kind matters
    numeric = pd.DataFrame({"temperature": [2.0, 1.0, 5.0] * 100, "x": range(300)})
    assert sort_rows(numeric, ["temperature"])["x"].tolist() == (
        list(range(1, 300, 3)) + list(range(0, 300, 3)) + list(range(2, 300, 3)))
    plain = pd.DataFrame({"model": ["b", "a", "c"]})  # no canonical order: as it sorts
    assert sort_rows(plain, ["model"])["model"].tolist() == ["a", "b", "c"]
