"""Elias-Fano coded draw ids: how many more draws fit a byte budget, and what they buy in gradient error.

Same teacher, rows and error batch as ``teacher_cache_tradeoff.py`` (its defaults), untrained
student only. For each form: bytes per distilled token and epoch set with the draws' ids as
uint16 and Elias-Fano coded (``kd_utils.id_codes``; the coding is exact, so a form's errors do
not depend on it), and the fkl errors of ``teacher_cache_tradeoff.error_rows``. Writes
benchmarks/results/teacher_cache_id_coding.json.

    .venv/bin/python benchmarks/teacher_cache_id_coding.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import teacher_cache_tradeoff as tradeoff
import torch

from kd_utils import batches, id_codes, models, objectives, teacher_cache, training
from kd_utils.io import write_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_cache_id_coding.json"
SAMPLE_COUNTS = [28, 36]  # 28: the uint16 form within 64 bytes; 36: the coded one
HYBRIDS = ["4+20", "4+26"]  # 4+20: the default; 4+26: the most tail draws the coded form fits in 64 bytes


def main() -> None:
    torch.manual_seed(0)
    load_before, started = tradeoff.load(), time.perf_counter()
    teacher, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    vocab_size, pad_id = len(tokenizer.get_vocab()), tokenizer.pad_token_id
    selection = teacher_cache.select_examples("math", n_train=16, include_mawps=False, data_dir=None, seed=0,
                                              val_fraction=0.5)
    rows = [batches.tokenize_example(tokenizer, e, 128) for e in selection.train[:4]]
    error_batch = batches.collate(rows, pad_id)
    mask = objectives.distill_mask(error_batch, training.TrainConfig(method="fkl"))
    with torch.no_grad():
        t_logits = batches.forward(teacher, error_batch)[:, :-1, :vocab_size].float()
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        student, _ = models.load_model(models.build_student_dir(models.EMBEDDED_MODEL, 10, Path(tmp) / "student"))
        s_logits, hidden = tradeoff.student_outputs(student, error_batch, vocab_size)
        for tau in (1.0, 2.0):
            errors += tradeoff.error_rows(t_logits, s_logits, hidden, mask, tau, [], SAMPLE_COUNTS, HYBRIDS, 6,
                                          vocab_size, "untrained", dtypes=False)
    for row in errors:
        n = tradeoff.parse_size(row["size"])[1]
        row["bytes_per_token_elias_fano"] = row["bytes_per_token"] - 2 * n + id_codes.code_bytes(n, vocab_size)
    result = {"model": models.EMBEDDED_MODEL, "vocab_size": vocab_size, "error_rows": 4, "max_length": 128,
              "distilled_positions_in_error_batch": int(mask.sum()), "draws": 6, "cpu_count": os.cpu_count(),
              "load_before": load_before, "load_after": tradeoff.load(),
              "wall_seconds": round(time.perf_counter() - started, 1), "errors": errors}
    write_atomic(RESULTS, json.dumps(result, indent=1))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    print("\n".join(tradeoff.table(
        ["repr", "k / n", "tau", "bytes/token uint16", "bytes/token Elias-Fano", "fkl logit-grad err",
         "fkl head-grad err"],
        [[r["representation"], r["size"], f"{r['temperature']:g}", r["bytes_per_token"],
          r["bytes_per_token_elias_fano"], pct(r["fkl_grad_err"]), pct(r["fkl_head_grad_err"])] for r in errors])))


if __name__ == "__main__":
    main()
