"""Training throughput (tokens/s) of SFT vs fkl with the online teacher on the embedded model.

Both train the same layer-subset student with LoRA on the same sample of the math mix,
for the same number of optimizer steps; fkl also runs the teacher forward and the chunked
KD loss. Tokens counted are the non-pad input tokens the student processes. Prints JSON.

    .venv/bin/python benchmarks/train_throughput.py --n-train 64 --student-layers 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kd_utils import models, training
from kd_utils.data import build_training_mix
from kd_utils.evaluation import sample_examples


def measure(method: str, student_dir: Path, teacher, tokenizer, examples, args) -> dict:
    student, _ = models.load_model(student_dir)
    config = training.TrainConfig(method=method, epochs=1, batch_size=args.batch_size,
                                  micro_batch_size=args.batch_size, max_length=args.max_length, val_fraction=0,
                                  temperature=2.0, seed=0)
    rows = [training.tokenize_example(tokenizer, e, args.max_length) for e in examples]
    tokens = sum(len(r["input_ids"]) for r in rows)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        training.train(student, tokenizer, examples, config, out, teacher=teacher if method != "sft" else None,
                       teacher_tokenizer=tokenizer, val_examples=[])
        seconds = time.perf_counter() - start
    return {"method": method, "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    teacher, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    mix, _ = build_training_mix("math", include_mawps=True)
    examples = sample_examples(mix, args.n_train, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = models.build_student_dir(models.EMBEDDED_MODEL, args.student_layers, Path(tmp) / "student")
        results = [measure(m, student_dir, teacher, tokenizer, examples, args) for m in ("sft", "fkl")]
    print(json.dumps({"model": models.EMBEDDED_MODEL, "student_layers": args.student_layers, "n_train": args.n_train,
                      "batch_size": args.batch_size, "max_length": args.max_length,
                      "torch_threads": torch.get_num_threads(), "results": results,
                      "fkl_over_sft_time": round(results[1]["seconds"] / results[0]["seconds"], 2)}, indent=1))


if __name__ == "__main__":
    main()
