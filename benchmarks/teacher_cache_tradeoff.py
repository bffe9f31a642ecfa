"""Teacher-logit cache trade-off on the embedded teacher and the math mix.

For several top-k sizes and sample counts: bytes stored per distilled token, relative error
of the cached KD loss and of its gradient w.r.t. the student logits against the full-logit
loss (fkl, and rkl for top-k), and the wall time of one distillation epoch from the cache
versus with the online teacher (the fastest of --repeats interleaved rounds: the CPU may be
shared). The student is a layer subset of the teacher (``models.make_student``); errors are
measured on one batch of training rows. Gradient
errors are relative Frobenius norms: of d loss / d student logits [B, T, V] ("logit-grad",
every position on its own), and of the output layer's weight gradient, where the batch's
positions add up as they do in every parameter's gradient ("head-grad"). For sampled
caches the error is that of one stored draw, averaged over ``--draws`` draws ("mean"), and
the error of the draw-averaged loss ("bias", near 0 for an unbiased estimator).
Prints a markdown table and writes benchmarks/results/teacher_cache_tradeoff.json.

    .venv/bin/python benchmarks/teacher_cache_tradeoff.py --n-train 32 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kd_utils import losses, models, teacher_cache, training

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_cache_tradeoff.json"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loss_and_grad(fn, student: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    s = student.detach().requires_grad_(True)
    loss = fn(s, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def head_grad(grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's weight gradient [V, d]: the logit gradients summed over the batch's positions."""
    return torch.einsum("btv,btd->vd", grad, hidden)


def stored(teacher_logits: torch.Tensor, fields: dict, generator=None, dtype=teacher_cache.LOGPROB_DTYPE):
    """Encode every position of [B, T, V] logits; (loss kwargs [B, T, w], storage bytes)."""
    B, T, V = teacher_logits.shape
    enc = teacher_cache.encode(teacher_logits.flatten(0, 1), fields, generator, logprob_dtype=dtype)
    args = {name: t.view(B, T, *t.shape[1:]) for name, t in teacher_cache.decode(enc).items()}
    return args, enc


def bytes_per_token(enc: dict, vocab_size: int) -> int:
    """Stored bytes per position: the sparse tensors plus the cached input id (file headers left out)."""
    id_bytes = torch.empty(0, dtype=teacher_cache.id_dtype(vocab_size)).element_size()
    return sum(t.element_size() * t[0].numel() for t in enc.values()) + id_bytes


def parse_size(spec: str) -> tuple[int, int]:
    """'12' -> (12, 12) (k or draws), '8+6' -> (8, 6) (topk_sampled: k + tail draws)."""
    k, _, n = spec.partition("+")
    return int(k), int(n or k)


def error_rows(teacher_logits, student_logits, hidden, mask, temperature, ks, sample_counts, hybrids, draws,
               vocab_size) -> list[dict]:
    dense = {name: loss_and_grad(fn, student_logits, teacher_logits, mask, temperature)
             for name, fn in (("fkl", losses.forward_kl), ("rkl", losses.reverse_kl))}
    dense_head = {name: head_grad(g, hidden) for name, (_, g) in dense.items()}
    rows = []
    for k in ks:
        row = {"representation": "topk", "size": k, "temperature": temperature}
        for dtype, suffix in ((teacher_cache.LOGPROB_DTYPE, ""), (torch.bfloat16, "_bf16"), (torch.float32, "_fp32")):
            args, enc = stored(teacher_logits, {"representation": "topk", "k": k, "temperature": temperature},
                               dtype=dtype)
            for name, fn in (("fkl", losses.forward_kl_topk), ("rkl", losses.reverse_kl_topk)):
                loss, grad = loss_and_grad(fn, student_logits, **args, mask=mask, temperature=temperature)
                row[f"{name}_loss_err{suffix}"] = abs(float(loss - dense[name][0])) / float(dense[name][0])
                row[f"{name}_grad_err{suffix}"] = rel(grad, dense[name][1])
                row[f"{name}_head_grad_err{suffix}"] = rel(head_grad(grad, hidden), dense_head[name])
            if suffix == "":
                row["bytes_per_token"] = bytes_per_token(enc, vocab_size)
        rows.append(row)
    stochastic = [("sampled", str(n), {"num_samples": n}) for n in sample_counts]
    stochastic += [("topk_sampled", spec, dict(zip(("k", "num_samples"), parse_size(spec)))) for spec in hybrids]
    for representation, size, sizes in stochastic:
        fields = {"representation": representation, "temperature": temperature, **sizes}
        gen = torch.Generator().manual_seed(0)
        losses_, errs, grads = [], [], []
        for _ in range(draws):
            args, enc = stored(teacher_logits, fields, gen)
            loss, grad = loss_and_grad(losses.forward_kl_sampled, student_logits, **args, mask=mask,
                                       temperature=temperature)
            losses_.append(loss)
            errs.append((abs(float(loss - dense["fkl"][0])) / float(dense["fkl"][0]), rel(grad, dense["fkl"][1]),
                         rel(head_grad(grad, hidden), dense_head["fkl"])))
            grads.append(grad)
        mean_loss = torch.stack(losses_).mean()
        rows.append({"representation": representation, "size": size, "temperature": temperature,
                     "bytes_per_token": bytes_per_token(enc, vocab_size),
                     "fkl_loss_err": sum(e[0] for e in errs) / draws, "fkl_grad_err": sum(e[1] for e in errs) / draws,
                     "fkl_head_grad_err": sum(e[2] for e in errs) / draws,
                     "fkl_loss_bias": abs(float(mean_loss - dense["fkl"][0])) / float(dense["fkl"][0]),
                     "fkl_grad_err_of_mean": rel(torch.stack(grads).mean(0), dense["fkl"][1])})
    return rows


def epoch_seconds(student_dir: Path, tokenizer, examples, config: training.TrainConfig, **source) -> float:
    student, _ = models.load_model(student_dir)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        training.train(student, tokenizer, examples, config, out, val_examples=[], **source)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--error-rows", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12, 16, 32])
    parser.add_argument("--sample-counts", type=int, nargs="+", default=[8, 12, 24])
    parser.add_argument("--hybrids", nargs="+", default=["4+8", "6+8", "8+6"],
                        help="topk_sampled sizes, k+draws")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--timed", nargs="+", default=["topk:12", "sampled:12", "topk_sampled:8+6"],
                        help="caches whose training epoch is timed against the online teacher")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    vocab_size = len(tokenizer.get_vocab())
    selection = teacher_cache.select_examples("math", args.n_train, False, args.data_dir, 0, 0.0)
    student = models.make_student(teacher, args.student_layers).eval()

    # errors on one batch of training rows
    rows = [training.tokenize_example(tokenizer, e, args.max_length) for e in selection.train[:args.error_rows]]
    batch = training.collate(rows, tokenizer.pad_token_id)
    mask = training.distill_mask(batch, training.TrainConfig(method="fkl"))
    with torch.no_grad():
        t_logits = training.forward(teacher, batch)[:, :-1, :vocab_size].float()
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=training.position_ids(batch["attention_mask"]), output_hidden_states=True)
        s_logits, hidden = out.logits[:, :-1, :vocab_size].float(), out.hidden_states[-1][:, :-1].float()
    del student, out
    errors = []
    for tau in args.temperatures:
        rows = error_rows(t_logits, s_logits, hidden, mask, tau, args.ks, args.sample_counts, args.hybrids,
                          args.draws, vocab_size)
        print(markdown({"errors": rows, "timings": []}), flush=True)
        errors += rows
    del t_logits, s_logits, hidden

    # one distillation epoch: online teacher vs cache (LoRA student, as in the study). The CPU is
    # shared, so the sources are timed in turns, --repeats rounds, and each keeps its fastest epoch.
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = models.build_student_dir(models.EMBEDDED_MODEL, args.student_layers, Path(tmp) / "student")
        config = training.TrainConfig(method="fkl", epochs=1, batch_size=args.batch_size,
                                      micro_batch_size=args.batch_size, max_length=args.max_length, val_fraction=0,
                                      temperature=1.0, seed=0)
        sources = {"online teacher": {"teacher": teacher, "teacher_tokenizer": tokenizer}}
        timings = {"online teacher": {"source": "online teacher"}}
        for spec in args.timed:
            representation, size = spec.split(":")
            k, n = parse_size(size)
            started = time.perf_counter()
            summary = teacher_cache.run_teacher_cache(
                models.EMBEDDED_MODEL, Path(tmp) / "caches", n_train=args.n_train, data_dir=args.data_dir, seed=0,
                max_length=args.max_length, val_fraction=0.0, representation=representation, k=k,
                num_samples=n, batch_size=args.batch_size)
            sources[f"cache {spec}"] = {"teacher_cache": summary["caches"][1.0, 0.0]}
            timings[f"cache {spec}"] = {"source": f"cache {spec}",
                                        "cache_generation_seconds": round(time.perf_counter() - started, 2),
                                        "cache_bytes_per_token": summary["bytes_per_token"],
                                        "positions": summary["positions"]}
        for _ in range(args.repeats):
            for name, source in sources.items():
                seconds = epoch_seconds(student_dir, tokenizer, selection.train, config, **source)
                timings[name].setdefault("all_epoch_seconds", []).append(round(seconds, 2))
        for t in timings.values():
            t["epoch_seconds"] = min(t["all_epoch_seconds"])
            t["speedup_vs_online"] = round(timings["online teacher"]["epoch_seconds"] / t["epoch_seconds"], 2)
        timings = list(timings.values())

    result = {"model": models.EMBEDDED_MODEL, "student_layers": args.student_layers, "n_train": args.n_train,
              "max_length": args.max_length, "batch_size": args.batch_size, "error_rows": args.error_rows,
              "distilled_positions_in_error_batch": int(mask.sum()), "draws": args.draws,
              "logprob_dtype": str(teacher_cache.LOGPROB_DTYPE), "torch_threads": torch.get_num_threads(),
              "errors": errors, "timings": timings}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(markdown(result))


def markdown(result: dict) -> str:
    pct = lambda x: "" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    lines = ["| repr | k / n | tau | bytes/token | fkl loss err | fkl logit-grad err | fkl head-grad err "
             "| rkl loss err | rkl logit-grad err | rkl head-grad err "
             "| fkl loss err bf16 / fp32 | rkl loss err bf16 / fp32 | sampled bias (loss) |", "|" + "---|" * 13]
    for r in result["errors"]:
        lines.append(f"| {r['representation']} | {r['size']} | {r['temperature']:g} | {r['bytes_per_token']} "
                     f"| {pct(r['fkl_loss_err'])} | {pct(r['fkl_grad_err'])} | {pct(r['fkl_head_grad_err'])} "
                     f"| {pct(r.get('rkl_loss_err'))} | {pct(r.get('rkl_grad_err'))} "
                     f"| {pct(r.get('rkl_head_grad_err'))} "
                     f"| {pct(r.get('fkl_loss_err_bf16'))} / {pct(r.get('fkl_loss_err_fp32'))} "
                     f"| {pct(r.get('rkl_loss_err_bf16'))} / {pct(r.get('rkl_loss_err_fp32'))} "
                     f"| {pct(r.get('fkl_loss_bias'))} |")
    lines += ["", "| source | epoch s (fastest) | all epochs s | speedup | cache generation s | bytes/token |",
              "|---|---|---|---|---|---|"]
    for t in result["timings"]:
        lines.append(f"| {t['source']} | {t['epoch_seconds']} | {t['all_epoch_seconds']} | {t['speedup_vs_online']} "
                     f"| {t.get('cache_generation_seconds', '')} | {t.get('cache_bytes_per_token', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
