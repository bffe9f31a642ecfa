"""Teacher-logit cache trade-off on the embedded teacher and the math mix.

For several top-k sizes and sample counts: bytes stored per distilled token; the relative
error of the cached KD loss and of its gradient w.r.t. the student logits against the
full-logit loss (fkl, and rkl for top-k); the student a cache distils against the one the
online teacher distils, over several training seeds; and the wall time of a distillation epoch
from the cache versus with the online teacher, with the cache's generation time and the
break-even in epochs.

The student is a layer subset of the teacher (``models.build_student_dir``), LoRA-trained as
in the default study. Errors are measured on one batch of training rows, for the untrained
student and for the one distilled online (first seed). Gradient errors are relative Frobenius norms: of
d loss / d student logits [B, T, V] ("logit-grad", every position on its own), and of the
output layer's weight gradient, where the batch's positions add up as they do in every
parameter's gradient ("head-grad"). For stochastic caches an error is that of one stored
draw, averaged over ``--draws`` draws; "of the draw mean" is the error of the gradient
averaged over those draws (it shrinks toward 0 for an unbiased estimator).

Distillation: per seed, the same student, rows and order, trained for --train-epochs online and
from each cache (made for that many epochs: one draw set per epoch), scored by forward KL to
the full teacher on held-out rows; figures are the median and range over seeds, each paired
with the online student of its seed. Timing: each seed is one round, sources in alternating
order, the load average recorded before and after; an epoch's time is that of the epochs after
the first (one pass, its held-out pass and checkpoint). Each cache is generated once per
temperature and timed (load recorded); break-even = generation s / (online - cache epoch s).
Prints markdown tables and writes benchmarks/results/teacher_cache_tradeoff.json.

    .venv/bin/python benchmarks/teacher_cache_tradeoff.py
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kd_utils import batches, losses, models, objectives, teacher_cache, teachers, training
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
        mask = objectives.distill_mask(batch, training.TrainConfig(method="fkl"))
        s, t = batches.forward(student, batch)[:, :-1], batches.forward(teacher, batch)[:, :-1]
        s, t = losses.align_vocab(s, t, min(s.shape[-1], t.shape[-1]))
        total += float(losses.forward_kl(s.float(), t.float(), mask, temperature)) * len(batch["input_ids"])
    return total / len(rows)


def train_student(student_dir: Path, tokenizer, selection, config: training.TrainConfig, out: Path, **source):
    """(total seconds, seconds of each epoch after the first, trained student with its LoRA adapter, history).

    The first epoch also pays loading and the starting held-out pass; every later epoch is one
    pass over the rows, its held-out pass and its checkpoint, the same work for every source.
    """
    student, _ = models.load_model(student_dir)
    ends = []
    start = time.perf_counter()
    result = training.train(student, tokenizer, selection.train, config, out, val_examples=selection.val,
                            on_epoch_end=lambda epoch: ends.append(time.perf_counter()), **source)
    seconds = time.perf_counter() - start
    trained, _ = models.load_model(student_dir, adapter=result["saved_to"])
    return seconds, [b - a for a, b in zip(ends, ends[1:])], trained, result["history"]


def cache_specs(specs: list[str]) -> list[tuple[str, str, int, int]]:
    """'topk_sampled:4+20' -> (spec, representation, k, num_samples)."""
    out = []
    for spec in specs:
        representation, size = spec.split(":")
        k, n = parse_size(size)
        out.append((spec, representation, k, n))
    return out


def load() -> list[float]:
    """The 1-, 5- and 15-minute load averages (the CPU is shared: every timing is read against them)."""
    return [round(x, 2) for x in os.getloadavg()]


def spread(values: list[float]) -> dict:
    """Median and range (not the best value): what a figure over seeds or rounds is reported with."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(distilled: list[dict], generation: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per (source, tau): parity with the online student over seeds, and the epoch time over rounds, paired
    within a seed / round; for each cache its speedup and break-even in epochs, generation included."""
    parity, timing = [], []
    by = {(d["source"], d["temperature"], d["seed"]): d for d in distilled}
    for source, tau in dict.fromkeys((d["source"], d["temperature"]) for d in distilled):
        runs = [d for d in distilled if (d["source"], d["temperature"]) == (source, tau)]
        online = [by["online teacher", tau, d["seed"]] for d in runs]
        parity.append({"source": source, "temperature": tau, "seeds": [d["seed"] for d in runs],
                       "held_out_fkl": spread([d["held_out_fkl"] for d in runs]),
                       "fkl_vs_online": spread([d["held_out_fkl"] / o["held_out_fkl"] - 1
                                                for d, o in zip(runs, online)]),
                       "share_of_online_gain": spread([(d["held_out_fkl_start"] - d["held_out_fkl"])
                                                       / (o["held_out_fkl_start"] - o["held_out_fkl"])
                                                       for d, o in zip(runs, online)])})
        epoch = [statistics.mean(d["later_epoch_seconds"]) for d in runs]
        online_epoch = [statistics.mean(o["later_epoch_seconds"]) for o in online]
        row = {"source": source, "temperature": tau, "rounds": len(runs), "epoch_seconds": spread(epoch),
               "all_epoch_seconds": [round(e, 2) for e in epoch],
               "speedup_vs_online": spread([o / e for o, e in zip(online_epoch, epoch)])}
        made = [g for g in generation if (f"cache {g['spec']}", g["temperature"]) == (source, tau)]
        if made:
            saved = statistics.median([o - e for o, e in zip(online_epoch, epoch)])  # per epoch, paired in a round
            row |= {"cache_generation_seconds": made[0]["seconds"], "bytes_per_token": made[0]["bytes_per_token"],
                    "bytes_per_token_per_set": made[0]["bytes_per_token_per_set"],
                    # epochs after which generation + N cache epochs cost less than N online epochs
                    "break_even_epochs": made[0]["seconds"] / saved if saved > 0 else None}
        timing.append(row)
    return parity, timing


def from_log(args) -> None:
    """Results from the records an interrupted run printed: its generations and completed rounds (no error table)."""
    records = [ast.literal_eval(re.sub(r"\bnan\b", "None", line)) for line in args.from_log.read_text().splitlines()
               if line.startswith(("{'spec'", "{'source'", "{'round'"))]
    rounds = [r for r in records if "order" in r]
    done = {r["round"] for r in rounds}
    generation = [r for r in records if "spec" in r]
    distilled = [r for r in records if "source" in r and r["round"] in done]
    parity, timings = summarize(distilled, generation)
    result = {"model": models.EMBEDDED_MODEL, "complete": False, "rounds_completed": len(done),
              "stopped": "before its remaining rounds and the error table", "student_layers": args.student_layers,
              "n_rows_selected": args.n_train, "val_fraction": args.val_fraction, "max_length": args.max_length,
              "batch_size": args.batch_size, "lr": args.lr, "train_epochs": args.train_epochs,
              "seeds": sorted({d["seed"] for d in distilled}), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "errors": [], "unbiased_floors": [], "generation": generation,
              "rounds": rounds, "distilled": distilled, "parity": parity, "timings": timings}
    write_atomic(RESULTS, json.dumps(result, indent=1))
    print(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=16, help="rows selected; --val-fraction of them held out")
    parser.add_argument("--val-fraction", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="as in the default study")
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="also the epochs (draw sets) the caches are made for")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (LoRA init, batch order, dropout); one timing round each")
    parser.add_argument("--error-rows", type=int, default=4)
    parser.add_argument("--ks", type=int, nargs="+", default=[14])
    parser.add_argument("--sample-counts", type=int, nargs="+", default=[28])
    parser.add_argument("--hybrids", nargs="+", default=["4+20", "8+12", "8+6"],
                        help="topk_sampled sizes, k+draws")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--floor-entries", type=int, default=29,
                        help="entries per position for the unbiased floor (29 ids of 2 bytes fit 64 bytes with the "
                             "input id and the float32 entropy)")
    parser.add_argument("--trained", nargs="+", default=["sampled:28", "topk_sampled:4+20"],
                        help="caches a student is distilled from (and timed), against the online teacher "
                             "(the biased topk:14 is in the error table; add it here to train from it too)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--from-log", type=Path, default=None,
                        help="summarize the records a run stopped early printed (its completed rounds) instead")
    args = parser.parse_args()
    if args.from_log:
        return from_log(args)
    torch.manual_seed(0)
    started = time.perf_counter()
    teacher, tokenizer = models.load_model(models.EMBEDDED_MODEL)
    vocab_size, pad_id = len(tokenizer.get_vocab()), tokenizer.pad_token_id
    selection = teacher_cache.select_examples("math", n_train=args.n_train, include_mawps=False, data_dir=args.data_dir,
                                              seed=0, val_fraction=args.val_fraction)
    val_rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in selection.val]
    rows = [batches.tokenize_example(tokenizer, e, args.max_length) for e in selection.train[:args.error_rows]]
    error_batch = batches.collate(rows, pad_id)
    mask = objectives.distill_mask(error_batch, training.TrainConfig(method="fkl"))
    with torch.no_grad():
        t_logits = batches.forward(teacher, error_batch)[:, :-1, :vocab_size].float()
    errors, floors, distilled, generation, rounds = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student_dir = models.build_student_dir(models.EMBEDDED_MODEL, args.student_layers, tmp / "student")
        caches = {}  # (spec, tau) -> cache directory; one generation per temperature, so each is timed on its own
        for spec, representation, k, n in cache_specs(args.trained):
            for tau in args.temperatures:
                before, start = load(), time.perf_counter()
                summary = teacher_cache.run_teacher_cache(
                    models.EMBEDDED_MODEL, tmp / "caches", n_train=args.n_train, data_dir=args.data_dir, seed=0,
                    max_length=args.max_length, val_fraction=args.val_fraction, representation=representation, k=k,
                    num_samples=n, temperatures=[tau], epochs=args.train_epochs, batch_size=args.batch_size)
                caches[spec, tau] = summary["caches"][tau, 0.0]
                generation.append({"spec": spec, "temperature": tau, "seconds": round(time.perf_counter() - start, 2),
                                   "epoch_sets": summary["per_cache"][0]["epoch_sets"],
                                   "bytes_per_token": summary["bytes_per_token"],
                                   "bytes_per_token_per_set": summary["bytes_per_token_per_set"],
                                   "positions": summary["positions"], "load_before": before, "load_after": load()})
                print(generation[-1], flush=True)

        # distil the same student (seed, rows, order) online and from each cache; score every result by its
        # forward KL to the full teacher on the held-out rows. One round per seed, sources in alternating order
        # (the CPU is shared: a trend in its load must not favour whoever runs first)
        names = ["online teacher"] + [f"cache {spec}" for spec in args.trained]
        starts, online_students = {}, {}
        for index, seed in enumerate(args.seeds):
            order = names if index % 2 == 0 else names[::-1]
            rounds.append({"round": index, "seed": seed, "order": order, "load_before": load()})
            for tau in args.temperatures:
                config = training.TrainConfig(method="fkl", epochs=args.train_epochs, batch_size=args.batch_size,
                                              micro_batch_size=args.batch_size, max_length=args.max_length,
                                              lr=args.lr, val_fraction=0, temperature=tau, seed=seed)
                if (seed, tau) not in starts:
                    untrained, _ = models.load_model(student_dir)
                    starts[seed, tau] = held_out_fkl(untrained, teacher, val_rows, tau, pad_id, args.batch_size)
                for name in order:
                    source = {"teacher": teachers.OnlineTeacher(teacher, tokenizer) if name == "online teacher" else
                              teachers.CachedTeacher(caches[name.removeprefix("cache "), tau])}
                    seconds, later, trained, history = train_student(
                        student_dir, tokenizer, selection, config, tmp / "runs" / f"{seed}-{tau}-{name}", **source)
                    distilled.append({"source": name, "temperature": tau, "seed": seed, "round": index,
                                      "epochs": args.train_epochs, "train_seconds": round(seconds, 2),
                                      "later_epoch_seconds": [round(x, 2) for x in later],
                                      "held_out_fkl_start": starts[seed, tau],
                                      "held_out_fkl": held_out_fkl(trained, teacher, val_rows, tau, pad_id,
                                                                   args.batch_size),
                                      "held_out_ce": history[-1]["val_loss"]})
                    print(distilled[-1], flush=True)
                    if name == "online teacher" and seed == args.seeds[0]:
                        online_students[tau] = trained  # the error table's distilled student
            rounds[-1]["load_after"] = load()
            print(rounds[-1], flush=True)

        # errors on one batch of training rows, for the untrained student and the one distilled online (first seed)
        for tau in args.temperatures:
            untrained, _ = models.load_model(student_dir)
            for label, student in (("untrained", untrained), ("distilled", online_students[tau])):
                s_logits, hidden = student_outputs(student, error_batch, vocab_size)
                errors += error_rows(t_logits, s_logits, hidden, mask, tau, args.ks, args.sample_counts,
                                     args.hybrids, args.draws, vocab_size, label, dtypes=label == "untrained")
                floors.append({"student": label, "temperature": tau, "entries": args.floor_entries,
                               "fkl_grad_err_floor": unbiased_floor(t_logits, s_logits, mask, tau,
                                                                    args.floor_entries)})

    parity, timings = summarize(distilled, generation)
    result = {"model": models.EMBEDDED_MODEL, "student_layers": args.student_layers, "n_train": len(selection.train),
              "n_held_out": len(selection.val), "max_length": args.max_length, "batch_size": args.batch_size,
              "lr": args.lr, "train_epochs": args.train_epochs, "seeds": args.seeds, "error_rows": args.error_rows,
              "distilled_positions_in_error_batch": int(mask.sum()), "draws": args.draws,
              "logprob_dtype": str(teacher_cache.LOGPROB_DTYPE), "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "wall_seconds": round(time.perf_counter() - started, 1),
              "errors": errors, "unbiased_floors": floors, "generation": generation, "rounds": rounds,
              "distilled": distilled, "parity": parity, "timings": timings}
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
    ranged = lambda x, f: f"{f(x['median'])} ({f(x['min'])} to {f(x['max'])})"  # noqa: E731
    lines = table(
        ["student", "repr", "k / n", "tau", "bytes/token", "fkl loss err", "fkl logit-grad err",
         "fkl logit-grad err of the draw mean", "fkl head-grad err", "rkl loss err", "rkl logit-grad err"],
        [[r["student"], r["representation"], r["size"], f"{r['temperature']:g}", r["bytes_per_token"],
          pct(r["fkl_loss_err"]), pct(r["fkl_grad_err"]), pct(r.get("fkl_grad_err_of_mean")),
          pct(r["fkl_head_grad_err"]), pct(r.get("rkl_loss_err")), pct(r.get("rkl_grad_err"))]
         for r in result["errors"]])
    lines += table(
        ["top-k", "tau", "fkl loss err fp16 / bf16 / fp32", "rkl loss err fp16 / bf16 / fp32"],
        [[r["size"], f"{r['temperature']:g}"]
         + [" / ".join(pct(r[f"{name}_loss_err{x}"]) for x in ("", "_bf16", "_fp32")) for name in ("fkl", "rkl")]
         for r in result["errors"] if "fkl_loss_err_bf16" in r])
    lines += table(
        ["student", "tau", "least fkl logit-grad err of any unbiased cache with n entries"],
        [[f["student"], f"{f['temperature']:g}", f"n = {f['entries']}: {pct(f['fkl_grad_err_floor'])}"]
         for f in result["unbiased_floors"]])
    lines += table(
        ["source", "tau", "held-out fkl, median (range)", "vs online, median (range)",
         "share of online's gain, median (range)", "seeds"],
        [[p["source"], f"{p['temperature']:g}", ranged(p["held_out_fkl"], lambda x: f"{x:.3f}"),
          ranged(p["fkl_vs_online"], lambda x: f"{100 * x:+.2f}%"),
          ranged(p["share_of_online_gain"], lambda x: f"{100 * x:.1f}%"), len(p["seeds"])]
         for p in result["parity"]])
    lines += table(
        ["source", "tau", "epoch s, median (range)", "speedup, median (range)", "cache generation s",
         "break-even epochs", "bytes/token (per epoch set)"],
        [[t["source"], f"{t['temperature']:g}", ranged(t["epoch_seconds"], lambda x: f"{x:.1f}"),
          ranged(t["speedup_vs_online"], lambda x: f"{x:.2f}x"), t.get("cache_generation_seconds", ""),
          "" if t.get("break_even_epochs") is None else f"{t['break_even_epochs']:.1f}",
          f"{t['bytes_per_token']} ({t['bytes_per_token_per_set']})" if "bytes_per_token" in t else ""]
         for t in result["timings"]])
    lines += table(
        ["round", "seed", "order", "load before (1/5/15 min)", "load after"],
        [[r["round"], r["seed"], ", ".join(r["order"]), r["load_before"], r["load_after"]] for r in result["rounds"]])
    return "\n".join(lines).lstrip("\n")


if __name__ == "__main__":
    main()
