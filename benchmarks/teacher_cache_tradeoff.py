"""Teacher-logit cache trade-off on the embedded teacher and the math mix.

For several top-k sizes and sample counts: bytes stored per distilled token; the relative
error of the cached KD loss and of its gradient w.r.t. the student logits against the
full-logit loss (fkl, and rkl for top-k); the student a cache distils against the one the
online teacher distils; and the wall time of one distillation epoch from the cache versus
with the online teacher (the fastest of --repeats interleaved rounds: the CPU may be shared).

The student is a layer subset of the teacher (``models.build_student_dir``), LoRA-trained as
in the default study. Errors are measured on one batch of training rows, for the untrained
student and for the one distilled online. Gradient errors are relative Frobenius norms: of
d loss / d student logits [B, T, V] ("logit-grad", every position on its own), and of the
output layer's weight gradient, where the batch's positions add up as they do in every
parameter's gradient ("head-grad"). For stochastic caches an error is that of one stored
draw, averaged over ``--draws`` draws; "of the draw mean" is the error of the gradient
averaged over those draws (it shrinks toward 0 for an unbiased estimator). Distillation: the
same student, seed, rows and order, trained for --train-epochs online and from each cache,
scored by forward KL to the full teacher on held-out rows.
Prints markdown tables and writes benchmarks/results/teacher_cache_tradeoff.json.

    .venv/bin/python benchmarks/teacher_cache_tradeoff.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kd_utils import batches, losses, models, teacher_cache, training
from kd_utils.io import write_atomic

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
               vocab_size, student: str, dtypes: bool) -> list[dict]:
    dense = {name: loss_and_grad(fn, student_logits, teacher_logits, mask, temperature)
             for name, fn in (("fkl", losses.forward_kl), ("rkl", losses.reverse_kl))}
    dense_head = {name: head_grad(g, hidden) for name, (_, g) in dense.items()}
    rows = []
    storage = [(teacher_cache.LOGPROB_DTYPE, "")]
    if dtypes:
        storage += [(torch.bfloat16, "_bf16"), (torch.float32, "_fp32")]
    for k in ks:
        row = {"student": student, "representation": "topk", "size": str(k), "temperature": temperature}
        for dtype, suffix in storage:
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
        rows.append({"student": student, "representation": representation, "size": size, "temperature": temperature,
                     "bytes_per_token": bytes_per_token(enc, vocab_size),
                     "fkl_loss_err": sum(e[0] for e in errs) / draws, "fkl_grad_err": sum(e[1] for e in errs) / draws,
                     "fkl_head_grad_err": sum(e[2] for e in errs) / draws,
                     "fkl_loss_bias": abs(float(mean_loss - dense["fkl"][0])) / float(dense["fkl"][0]),
                     "fkl_grad_err_of_mean": rel(torch.stack(grads).mean(0), dense["fkl"][1])})
    return rows


def unbiased_floor(teacher_logits, student_logits, mask, temperature: float, entries: int) -> float:
    """The least fkl logit-grad error (relative, as in the table) of any unbiased cache storing
    ``entries`` nonzero probabilities per position (``teacher_cache.unbiased_variance_floor``)."""
    m = mask.bool()
    weight = (1 / m.sum(1, keepdim=True)).expand_as(m)[m].double() ** 2  # the loss's per-sequence mean
    p = (teacher_logits[m].double() / temperature).softmax(-1)
    q = (student_logits[m].double() / temperature).softmax(-1)
    floor = teacher_cache.unbiased_variance_floor(p, entries)
    return float(((weight * floor).sum() / (weight * (q - p).pow(2).sum(-1)).sum()).sqrt())


def student_outputs(student, batch: dict, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits [B, T-1, V] and last hidden states [B, T-1, d], float32."""
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batches.position_ids(batch["attention_mask"]), output_hidden_states=True)
    return out.logits[:, :-1, :vocab_size].float(), out.hidden_states[-1][:, :-1].float()


@torch.no_grad()
def held_out_fkl(student, teacher, rows: list[dict], temperature: float, pad_id: int, batch_size: int) -> float:
    """forward_kl (tau^2-scaled, per-sequence mean) against the full teacher on held-out rows."""
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch = batches.collate(rows[start:start + batch_size], pad_id)
        mask = training.distill_mask(batch, training.TrainConfig(method="fkl"))
        s, t = batches.forward(student, batch)[:, :-1], batches.forward(teacher, batch)[:, :-1]
        s, t = losses.align_vocab(s, t, min(s.shape[-1], t.shape[-1]))
        total += float(losses.forward_kl(s.float(), t.float(), mask, temperature)) * len(batch["input_ids"])
    return total / len(rows)


def train_student(student_dir: Path, tokenizer, selection, config: training.TrainConfig, out: Path, **source):
    """(seconds, trained student with its LoRA adapter, history)."""
    student, _ = models.load_model(student_dir)
    start = time.perf_counter()
    result = training.train(student, tokenizer, selection.train, config, out, val_examples=selection.val, **source)
    seconds = time.perf_counter() - start
    trained, _ = models.load_model(student_dir, adapter=result["saved_to"])
    return seconds, trained, result["history"]


def epoch_seconds(student_dir: Path, tokenizer, examples, config: training.TrainConfig, **source) -> float:
    student, _ = models.load_model(student_dir)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        training.train(student, tokenizer, examples, config, out, val_examples=[], **source)
        return time.perf_counter() - start


def cache_specs(specs: list[str]) -> list[tuple[str, str, int, int]]:
    """'topk_sampled:4+20' -> (spec, representation, k, num_samples)."""
    out = []
    for spec in specs:
        representation, size = spec.split(":")
        k, n = parse_size(size)
        out.append((spec, representation, k, n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=80, help="rows selected; --val-fraction of them held out")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="as in the default study")
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--error-rows", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 14, 32])
    parser.add_argument("--sample-counts", type=int, nargs="+", default=[12, 28])
    parser.add_argument("--hybrids", nargs="+", default=["4+20", "6+16", "8+12", "8+6"],
                        help="topk_sampled sizes, k+draws")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--floor-entries", type=int, default=29,
                        help="entries per position for the unbiased floor (29 ids of 2 bytes fit 64 bytes with the "
                             "input id and the float32 entropy)")
    parser.add_argument("--trained", nargs="+", default=["topk:14", "sampled:28", "topk_sampled:4+20"],
                        help="caches a student is distilled from, against the online teacher")
    parser.add_argument("--timed", nargs="+", default=["topk:14", "sampled:28", "topk_sampled:4+20"],
                        help="caches whose one-epoch time is measured against the online teacher")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    vocab_size, pad_id = len(tokenizer.get_vocab()), tokenizer.pad_token_id
    selection = teacher_cache.select_examples("math", args.n_train, False, args.data_dir, 0, args.val_fraction)
    val_rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in selection.val]
    rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in selection.train[:args.error_rows]]
    error_batch = batches.collate(rows, pad_id)
    mask = training.distill_mask(error_batch, training.TrainConfig(method="fkl"))
    with torch.no_grad():
        t_logits = batches.forward(teacher, error_batch)[:, :-1, :vocab_size].float()
    errors, floors, distilled, timings = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student_dir = models.build_student_dir(models.EMBEDDED_MODEL, args.student_layers, tmp / "student")
        caches = {}
        for spec, representation, k, n in cache_specs(sorted(set(args.trained + args.timed))):
            started = time.perf_counter()
            summary = teacher_cache.run_teacher_cache(
                models.EMBEDDED_MODEL, tmp / "caches", n_train=args.n_train, data_dir=args.data_dir, seed=0,
                max_length=args.max_length, val_fraction=args.val_fraction, representation=representation, k=k,
                num_samples=n, temperatures=args.temperatures, batch_size=args.batch_size)
            caches[spec] = summary
            timings[f"cache {spec}"] = {"source": f"cache {spec}",
                                        "cache_generation_seconds": round(time.perf_counter() - started, 2),
                                        "cache_bytes_per_token": summary["bytes_per_token"],
                                        "positions": summary["positions"]}

        for tau in args.temperatures:
            # distil the same student (seed, rows, order) online and from each cache; score every result
            # by its forward KL to the full teacher on the held-out rows
            config = training.TrainConfig(method="fkl", epochs=args.train_epochs, batch_size=args.batch_size,
                                          micro_batch_size=args.batch_size, max_length=args.max_length,
                                          lr=args.lr, val_fraction=0, temperature=tau, seed=0)
            untrained, _ = models.load_model(student_dir)
            start_fkl = held_out_fkl(untrained, teacher, val_rows, tau, pad_id, args.batch_size)
            sources = {"online teacher": {"teacher": teacher, "teacher_tokenizer": tokenizer}}
            sources |= {f"cache {spec}": {"teacher_cache": caches[spec]["caches"][tau, 0.0]} for spec in args.trained}
            online = None
            for name, source in sources.items():
                seconds, trained, history = train_student(student_dir, tokenizer, selection, config,
                                                          tmp / "runs" / f"{tau}-{name}", **source)
                fkl = held_out_fkl(trained, teacher, val_rows, tau, pad_id, args.batch_size)
                online = online or {"fkl": fkl, "ce": history[-1]["val_loss"], "student": trained}
                distilled.append({"source": name, "temperature": tau, "epochs": args.train_epochs,
                                  "train_seconds": round(seconds, 2), "held_out_fkl_start": start_fkl,
                                  "held_out_fkl": fkl, "held_out_ce": history[-1]["val_loss"],
                                  "fkl_vs_online": fkl / online["fkl"] - 1,
                                  "share_of_online_gain": (start_fkl - fkl) / (start_fkl - online["fkl"])})
                print(distilled[-1], flush=True)

            # errors on one batch of training rows, for the untrained student and the online-distilled one
            for label, student in (("untrained", untrained), ("distilled", online["student"])):
                s_logits, hidden = student_outputs(student, error_batch, vocab_size)
                errors += error_rows(t_logits, s_logits, hidden, mask, tau, args.ks, args.sample_counts,
                                     args.hybrids, args.draws, vocab_size, label, dtypes=label == "untrained")
                floors.append({"student": label, "temperature": tau, "entries": args.floor_entries,
                               "fkl_grad_err_floor": unbiased_floor(t_logits, s_logits, mask, tau,
                                                                    args.floor_entries)})
                print(markdown({"errors": errors[-len(args.ks) - len(args.sample_counts) - len(args.hybrids):],
                                "unbiased_floors": floors[-1:], "distilled": [], "timings": []}), flush=True)

        # one distillation epoch: online teacher vs cache (LoRA student, as in the study). The CPU may be
        # shared, so the sources are timed in turns, --repeats rounds, and each keeps its fastest epoch.
        timed_tau = args.temperatures[0]
        config = training.TrainConfig(method="fkl", epochs=1, batch_size=args.batch_size,
                                      micro_batch_size=args.batch_size, max_length=args.max_length, val_fraction=0,
                                      temperature=timed_tau, seed=0)
        sources = {"online teacher": {"teacher": teacher, "teacher_tokenizer": tokenizer}}
        sources |= {f"cache {spec}": {"teacher_cache": caches[spec]["caches"][timed_tau, 0.0]} for spec in args.timed}
        timings = {"online teacher": {"source": "online teacher"}} | {
            name: timings[name] for name in sources if name != "online teacher"}
        for _ in range(args.repeats):
            for name, source in sources.items():
                seconds = epoch_seconds(student_dir, tokenizer, selection.train, config, **source)
                timings[name].setdefault("all_epoch_seconds", []).append(round(seconds, 2))
        for t in timings.values():
            t["epoch_seconds"] = min(t["all_epoch_seconds"])
            t["speedup_vs_online"] = round(timings["online teacher"]["epoch_seconds"] / t["epoch_seconds"], 2)
        timings = list(timings.values())

    result = {"model": models.EMBEDDED_MODEL, "student_layers": args.student_layers, "n_train": len(selection.train),
              "n_held_out": len(selection.val), "max_length": args.max_length, "batch_size": args.batch_size,
              "lr": args.lr, "train_epochs": args.train_epochs, "error_rows": args.error_rows,
              "distilled_positions_in_error_batch": int(mask.sum()), "draws": args.draws,
              "logprob_dtype": str(teacher_cache.LOGPROB_DTYPE), "torch_threads": torch.get_num_threads(),
              "errors": errors, "unbiased_floors": floors, "distilled": distilled, "timings": timings}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS, json.dumps(result, indent=1))
    print(markdown(result))


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines of a table (nothing for no rows), after a blank line."""
    if not rows:
        return []
    return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown(result: dict) -> str:
    pct = lambda x: "" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = table(
        ["student", "repr", "k / n", "tau", "bytes/token", "fkl loss err", "fkl logit-grad err",
         "fkl logit-grad err of the draw mean", "fkl head-grad err", "rkl loss err", "rkl logit-grad err"],
        [[r["student"], r["representation"], r["size"], f"{r['temperature']:g}", r["bytes_per_token"],
          pct(r["fkl_loss_err"]), pct(r["fkl_grad_err"]), pct(r.get("fkl_grad_err_of_mean")),
          pct(r["fkl_head_grad_err"]), pct(r.get("rkl_loss_err")), pct(r.get("rkl_grad_err"))]
         for r in result["errors"]])
    lines += table(
        ["top-k", "tau", "fkl loss err fp16 / bf16 / fp32", "rkl loss err fp16 / bf16 / fp32"],
        [[r["size"], f"{r['temperature']:g}"] + [" / ".join(pct(r[f"{name}_loss_err{x}"]) for x in ("", "_bf16", "_fp32"))
                                                  for name in ("fkl", "rkl")]
         for r in result["errors"] if "fkl_loss_err_bf16" in r])
    lines += table(
        ["student", "tau", "least fkl logit-grad err of any unbiased cache with n entries"],
        [[f["student"], f"{f['temperature']:g}", f"n = {f['entries']}: {pct(f['fkl_grad_err_floor'])}"]
         for f in result["unbiased_floors"]])
    lines += table(
        ["source", "tau", "held-out fkl before", "held-out fkl after", "vs online", "share of online's gain",
         "held-out CE", "train s"],
        [[d["source"], f"{d['temperature']:g}", f"{d['held_out_fkl_start']:.3f}", f"{d['held_out_fkl']:.3f}",
          f"{100 * d['fkl_vs_online']:+.1f}%", f"{100 * d['share_of_online_gain']:.1f}%", f"{d['held_out_ce']:.3f}",
          d["train_seconds"]] for d in result["distilled"]])
    lines += table(
        ["source", "epoch s (fastest)", "all epochs s", "speedup", "cache generation s", "bytes/token"],
        [[t["source"], t["epoch_seconds"], t["all_epoch_seconds"], t["speedup_vs_online"],
          t.get("cache_generation_seconds", ""), t.get("cache_bytes_per_token", "")] for t in result["timings"]])
    return "\n".join(lines).lstrip("\n")


if __name__ == "__main__":
    main()
