"""Would Hugging Face `datasets` make the training data shorter or faster? Today against `datasets`, same output.

Per domain (math: GSM8K train; commonsense: the rebuilt commonsense_15k), two steps a training run does:
load + mix (``kd_utils.data.build_training_mix``: read the train and test files, decontaminate, sample) and
tokenize (``kd_utils.batches.tokenize_example`` per row, the embedded SmolLM2 tokenizer, max_length 256).

- ``today``: as the project does it (plain JSON reads and lists).
- ``datasets_cold``: the files read by ``datasets.load_dataset("json")`` (an Arrow cache built from scratch in an
  empty cache directory), the same mixing logic on its rows, tokenization by ``Dataset.map`` writing its cache.
- ``datasets_warm``: the same with both caches filled (what a second run on the same data would pay).

The ``datasets`` variant is a lower bound on the code it would take: its tokenization cache is keyed by the
mix's content only, where a real one must also key the tokenizer, max_length and protocol.
Each variant must give the same token rows as ``today`` (checked every round). Rounds interleave the variants
(order rotating); the load average is recorded beside every timing, the machine being shared.

    pip install datasets  # not a dependency of the project (this measurement is why)
    PYTHONPATH=. OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python benchmarks/datasets_check.py \
        --rounds 3 --output benchmarks/results/datasets_check.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import datasets

from kd_utils import data
from kd_utils.batches import tokenize_example
from kd_utils.io import write_atomic
from kd_utils.models import EMBEDDED_MODEL, load_tokenizer

MAX_LENGTH = 256
VARIANTS = ("today", "datasets_cold", "datasets_warm")


def today(domain: str, tokenizer) -> tuple[list[dict], dict[str, float]]:
    start = time.perf_counter()
    mix, _ = data.build_training_mix(domain)
    loaded = time.perf_counter()
    rows = [tokenize_example(tokenizer, ex, MAX_LENGTH) for ex in mix]
    return rows, {"load_mix_s": loaded - start, "tokenize_s": time.perf_counter() - loaded}


def read_json_with_datasets(path: Path, cache: Path) -> list[dict]:
    """data.read_json through datasets' JSON loader (Arrow cache under ``cache``)."""
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache)).to_list()


def tokenize_with_datasets(mix: list[data.Example], tokenizer, cache: Path) -> datasets.Dataset:
    """Dataset.map over the mix, its result cached on disk under the mix's content hash."""
    table = datasets.Dataset.from_list([asdict(ex) for ex in mix])
    return table.map(lambda row: tokenize_example(tokenizer, data.Example(**row), MAX_LENGTH),
                     remove_columns=table.column_names,
                     cache_file_name=str(cache / f"tokens-{data.mix_fingerprint(mix)}.arrow"))


def with_datasets(domain: str, tokenizer, cache: Path) -> tuple[list[dict], dict[str, float]]:
    start = time.perf_counter()
    with mock.patch.object(data, "read_json", lambda path: read_json_with_datasets(path, cache)):
        mix, _ = data.build_training_mix(domain)
    loaded = time.perf_counter()
    table = tokenize_with_datasets(mix, tokenizer, cache)
    tokenized = time.perf_counter()
    rows = table.to_list()  # what training consumes (collate takes lists of dicts)
    return rows, {"load_mix_s": loaded - start, "tokenize_s": tokenized - loaded,
                  "to_list_s": time.perf_counter() - tokenized}


def source_lines(*functions) -> int:
    return sum(len(inspect.getsource(f).splitlines()) for f in functions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--domains", nargs="+", default=["math", "commonsense"])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/datasets_check.json"))
    args = parser.parse_args()
    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    result = {"command": "benchmarks/datasets_check.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                          "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")},
              "versions": {"datasets": datasets.__version__},
              "lines": {"today_read_json": source_lines(data.read_json),
                        "datasets_read_json": source_lines(read_json_with_datasets),
                        "today_tokenize": 1,  # the list comprehension in training.py
                        "datasets_tokenize": source_lines(tokenize_with_datasets)},
              "timings": []}
    for round_no in range(args.rounds):
        for domain in args.domains:
            cache = Path(tempfile.mkdtemp(prefix="datasets-check-"))
            order = VARIANTS[round_no % 2:] + VARIANTS[:round_no % 2]  # today first or last; warm after its cold
            reference = None
            try:
                for variant in order:
                    load_before = os.getloadavg()[0]
                    start = time.perf_counter()
                    rows, parts = (today(domain, tokenizer) if variant == "today"
                                   else with_datasets(domain, tokenizer, cache))
                    total = time.perf_counter() - start
                    rows = [{k: list(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
                    if reference is None:
                        reference = rows
                    entry = {"round": round_no, "domain": domain, "variant": variant, "rows": len(rows),
                             "total_s": round(total, 3), **{k: round(v, 3) for k, v in parts.items()},
                             "same_rows_as_first": rows == reference,
                             "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
                    result["timings"].append(entry)
                    print(json.dumps(entry), flush=True)
                    write_atomic(args.output, json.dumps(result, indent=1))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    summary = {}
    for domain in args.domains:
        for variant in VARIANTS:
            runs = [t for t in result["timings"] if t["domain"] == domain and t["variant"] == variant]
            summary[f"{domain}/{variant}"] = {k: round(statistics.median(t[k] for t in runs), 3)
                                              for k in ("total_s", "load_mix_s", "tokenize_s") if runs}
    result["median"] = summary
    result["all_rows_equal"] = all(t["same_rows_as_first"] for t in result["timings"])
    write_atomic(args.output, json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
