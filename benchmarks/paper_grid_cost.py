"""The paper's grid priced: random-initialised Qwen2.5 shapes, one training step per pair, generation, GPU-hours.

Models are built from ``Qwen2Config`` with the published shapes of Qwen2.5-0.5B / 1.5B / 3B
(vocabulary 151,936; random weights: cost does not depend on them). Per model: tokens/s of a LoRA
training step (the project's: r=8, alpha=16 on q,k,v,up,down; fp32 weights under bf16 autocast on
GPUs) at micro batch 4 and 16 x 256 tokens, of a no-grad forward (the online teacher), and of greedy
generation with the KV cache at the paper yaml's evaluation batch; plus the authors' loop (batch 1,
no cache: each new token re-runs the whole sequence, timed as one forward of the mean sequence length).
Per teacher-student pair at batch 16 x 256: peak memory and tokens/s of one step with the online teacher
(teacher forward + student forward/backward + chunked forward KL) and with the teacher cache (the student
step alone; the loss over the cache's 24 entries per position is approximated by cross-entropy, which
does the same log-softmax over the vocabulary).

These rates become a cost table for ``kd_utils.costs``, which counts the tokens of
``params/paper_math.yaml`` and ``params/paper_commonsense.yaml`` (with the embedded tokenizer, as the
Qwen tokenizer is not available offline; the 7B teacher's rates are extrapolated as 1/parameters from the
3B measurement); GPU-hours are printed with this project's evaluation and with the authors' loop.
Fixed per-run costs (process start, downloading and loading weights) are not included.

    PYTHONPATH=. python benchmarks/paper_grid_cost.py            # GPU
    PYTHONPATH=. python benchmarks/paper_grid_cost.py --tiny     # CPU check: tiny shapes, batch 2 x 32
    PYTHONPATH=. python benchmarks/paper_grid_cost.py --no-price ...; ... --price-from RESULT.json   # price later

The JSON is rewritten after every model and pair (``complete`` false until the end), so a run cut short by a
time limit keeps what it measured; ``--price-from`` prices whatever it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from kd_utils import costs, losses, study
from kd_utils.io import write_atomic
from kd_utils.models import EMBEDDED_MODEL
from kd_utils.params import load_study
from kd_utils.training import TrainConfig, wrap_lora

VOCAB = 151_936
# hidden, layers, attention heads, kv heads, intermediate (config.json of Qwen/Qwen2.5-*)
SHAPES = {"Qwen/Qwen2.5-0.5B": (896, 24, 14, 2, 4864), "Qwen/Qwen2.5-1.5B": (1536, 28, 12, 2, 8960),
          "Qwen/Qwen2.5-3B": (2048, 36, 16, 2, 11008)}
TINY = {"Qwen/Qwen2.5-0.5B": (32, 1, 2, 1, 64), "Qwen/Qwen2.5-1.5B": (48, 2, 2, 1, 96),
        "Qwen/Qwen2.5-3B": (64, 3, 2, 1, 128)}
PAPER_7B = 7_615_616_512  # Qwen2.5-7B parameters (model card); priced by extrapolation


def build(shape: tuple, device: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers, heads, kv, inter = shape
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device)


def parameter_count(shape: tuple) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(shape, "meta").parameters())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, rounds: int) -> tuple[float, list[float]]:
    times = []
    for i in range(rounds + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_mb(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--no-price", action="store_true",
                        help="measure only; price the grid later with --price-from (saves device time)")
    parser.add_argument("--price-from", type=Path, default=None,
                        help="price the grid from an earlier run's JSON (complete or cut short) instead of measuring")
    args = parser.parse_args()
    if args.price_from is not None:
        result = json.loads(args.price_from.read_text())
        price(result)
        write_atomic(args.output or args.price_from, json.dumps(result, indent=1) + "\n")
        print(result["table_markdown"])
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = TINY if args.tiny else SHAPES
    batch, length = (2, 32) if args.tiny else (16, 256)
    micro = 2 if args.tiny else 4
    gen_batch, new_tokens, prompt_len = (2, 4, 16) if args.tiny else (32, 64, 128)
    output = args.output or Path("benchmarks/results") / ("paper_grid_cost_tiny.json" if args.tiny else
                                                          "paper_grid_cost.json")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.autocast("cpu", enabled=False))
    entries, per_model, models, pairs = [], {}, {}, []
    result = {"benchmark": "paper_grid_cost", "tiny": args.tiny, "device": costs.device_kind(),
              "torch": torch.__version__, "batch": batch, "length": length, "micro_batch": micro,
              "generation": {"batch": gen_batch, "new_tokens": new_tokens, "prompt_len": prompt_len},
              "models": per_model, "entries": entries, "pairs": pairs, "loadavg_start": os.getloadavg()}

    def save(complete: bool) -> None:
        """Everything measured so far: a run cut short by its time limit still leaves its numbers."""
        result.update(complete=complete, loadavg_end=os.getloadavg())
        write_atomic(output, json.dumps(result, indent=1) + "\n")

    for name, shape in shapes.items():
        net = build(shape, device).eval()
        n = sum(p.numel() for p in net.parameters())
        rec = {"n_params": n}
        for b in sorted({micro, batch}):
            ids = torch.randint(0, VOCAB, (b, length), device=device)
            with torch.no_grad(), autocast:
                secs, _ = median_seconds(lambda: net(input_ids=ids).logits, args.rounds)
            entries.append({"kind": "forward", "n_params": n, "batch": b, "tokens_per_s": b * length / secs})
        gen_ids = torch.randint(0, VOCAB, (gen_batch, prompt_len), device=device)
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad(), autocast:
            secs, _ = median_seconds(lambda: net.generate(input_ids=gen_ids, attention_mask=torch.ones_like(gen_ids),
                                                          **kwargs), args.rounds)
        entries.append({"kind": "generate", "n_params": n, "batch": gen_batch,
                        "tokens_per_s": gen_batch * new_tokens / secs})
        one = torch.randint(0, VOCAB, (1, prompt_len + new_tokens // 2), device=device)
        with torch.no_grad(), autocast:
            secs, _ = median_seconds(lambda: net(input_ids=one, use_cache=False).logits, args.rounds)
        rec["paper_loop_tokens_per_s"] = 1 / secs
        lora = wrap_lora(net, TrainConfig()).train()
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
        for b in sorted({micro, batch}):
            ids = torch.randint(0, VOCAB, (b, length), device=device)

            def step():
                with autocast:
                    logits = lora(input_ids=ids).logits
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
            secs, _ = median_seconds(step, args.rounds)
            entries.append({"kind": "train", "n_params": n, "batch": b, "tokens_per_s": b * length / secs})
        per_model[name] = rec
        models[name] = lora
        print(f"{name}: {n / 1e9:.2f}B " + ", ".join(f"{e['kind']}@{e['batch']} {e['tokens_per_s']:,.0f}/s"
                                                  for e in entries if e["n_params"] == n), flush=True)
        save(complete=False)

    names = list(shapes)
    ids = torch.randint(0, VOCAB, (batch, length), device=device)
    mask = torch.ones(batch, length - 1, dtype=torch.bool, device=device)
    for ti, teacher in enumerate(names):
        for student in names[:ti]:
            t_net, s_net = models[teacher], models[student]
            opt = torch.optim.AdamW([p for p in s_net.parameters() if p.requires_grad], lr=1e-4)

            def online():
                with autocast:
                    with torch.no_grad():
                        t_logits = t_net(input_ids=ids).logits
                    loss = losses.forward_kl(s_net(input_ids=ids).logits[:, :-1], t_logits[:, :-1], mask, 2.0)
                loss.backward()
                opt.step()
                opt.zero_grad()

            def cached():
                with autocast:
                    loss = torch.nn.functional.cross_entropy(s_net(input_ids=ids).logits.flatten(0, 1).float(),
                                                             ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
            row = {"teacher": teacher, "student": student}
            for label, fn in (("online", online), ("cache", cached)):
                secs, times = median_seconds(fn, args.rounds)
                row[f"{label}_tokens_per_s"] = batch * length / secs
                row[f"{label}_peak_mb"] = peak_mb(fn)
            pairs.append(row)
            print(row, flush=True)
            save(complete=False)
    result["complete"] = True
    if not args.no_price:
        price(result)
        print(result["table_markdown"])
    save(complete=True)
    print(f"wrote {output}")


def price(result: dict) -> None:
    """GPU-hours of the paper's grids from the measured rates (``result`` gains sizes, grid, table_markdown)."""
    entries, per_model, pairs = result["entries"], result["models"], result["pairs"]
    if not per_model:
        raise SystemExit("no model was measured completely: nothing to price")
    # a model the run did not reach is priced by extrapolation from its parameter count
    sizes = {name: per_model[name]["n_params"] if name in per_model else parameter_count(shape)
             for name, shape in (TINY if result["tiny"] else SHAPES).items()}
    # 7B teacher (paper_math's): forward rate extrapolated as 1/parameters from the largest measured model
    sizes["Qwen/Qwen2.5-7B"] = PAPER_7B if not result["tiny"] else 2 * max(sizes.values())
    table = costs.CostTable(f"paper-grid on {result['device']}", entries, 0.0)
    # the authors' loop as a table of its own: batch 1, interpolated in log size like the rest
    authors = costs.CostTable("authors' loop", [{"kind": "generate", "n_params": r["n_params"], "batch": 1,
                                                 "tokens_per_s": r["paper_loop_tokens_per_s"]}
                                                for r in per_model.values()], 0.0)
    grid = {}
    for yaml_name in ("paper_math", "paper_commonsense"):
        params = load_study(Path("params") / f"{yaml_name}.yaml")
        runs = study.plan(params)
        work = costs.study_work(params, runs, sizes_by_model=sizes, tokenizer_model=EMBEDDED_MODEL)
        ours = sum(table.seconds(w.kind, w.n_params, w.batch, w.tokens) for w in work)
        paper = sum(authors.seconds("generate", w.n_params, 1, w.tokens) if w.stage == "eval" and w.kind == "generate"
                    else 0.0 if w.stage == "eval" else table.seconds(w.kind, w.n_params, w.batch, w.tokens)
                    for w in work)
        eval_ours = sum(table.seconds(w.kind, w.n_params, w.batch, w.tokens) for w in work if w.stage == "eval")
        grid[yaml_name] = {"runs": len(runs), "gpu_hours_project": ours / 3600, "gpu_hours_authors_eval": paper / 3600,
                           "eval_hours_project": eval_ours / 3600, "teacher": params["models"]["teacher"]}
    lines = ["| teacher | student | online tokens/s | online peak MB | cache tokens/s | cache peak MB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p['teacher']} | {p['student']} | {p['online_tokens_per_s']:,.0f} | {p['online_peak_mb'] or '-'} | "
              f"{p['cache_tokens_per_s']:,.0f} | {p['cache_peak_mb'] or '-'} |" for p in pairs]
    lines += ["", "| params | runs | GPU-hours (this project) | of which evaluation | "
              "GPU-hours with the authors' loop |",
              "|---|---|---|---|---|"]
    lines += [f"| {k} ({g['teacher']}) | {g['runs']} | {g['gpu_hours_project']:.2f} | {g['eval_hours_project']:.2f} | "
              f"{g['gpu_hours_authors_eval']:.2f} |" for k, g in grid.items()]
    if not result.get("complete", True) or len(pairs) < len(per_model) * (len(per_model) - 1) // 2:
        lines += ["", "(incomplete: the measuring run ended before every model and pair was measured)"]
    result.update(sizes=sizes, grid=grid, table_markdown="\n".join(lines))


if __name__ == "__main__":
    main()
