import json
import math
from pathlib import Path

import pytest
import torch

from kd_utils import (
    batches,
    cache_encoding,
    cache_writer,
    id_codes,
    losses,
    models,
    objectives,
    teacher_cache,
    teachers,
    training,
)
from kd_utils.data import mix_fingerprint
from kd_utils.models import ModelError

# at least the tiny tokenizer's vocabulary (k is capped at it): top-k must then reproduce the dense losses
VOCAB = 512
COMMON = dict(max_length=96, val_fraction=0.25, seed=0)
WRITE_SHARD = cache_writer.write_shard


def select(data_dir, n_train: int | None = None) -> teacher_cache.Selection:
    """The rows a math run with COMMON's seed and val_fraction trains on."""
    return teacher_cache.select_examples("math", n_train=n_train, include_mawps=False, data_dir=data_dir, seed=0,
                                         val_fraction=0.25)


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    """Keep the weight-hash memo of these tests out of the user's cache."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def make_cache(tiny_model_dir, data_dir, out: Path, **overrides) -> dict:
    params = dict(representation="topk", k=VOCAB, shard_size=2, batch_size=2, **COMMON)
    return teacher_cache.run_teacher_cache(str(tiny_model_dir), out, data_dir=data_dir, **{**params, **overrides})


def only_cache(summary: dict) -> Path:
    (path,) = summary["caches"].values()
    return Path(path)


class Killed(Exception):
    pass


def count_writes(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Record the shard indices written; raise after ``fail_after`` writes (a killed run)."""
    written = []

    def wrapper(cache, index, tensors, *, example_ids):
        if fail_after is not None and len(written) == fail_after:
            raise Killed()
        written.append(index)
        return WRITE_SHARD(cache, index, tensors, example_ids=example_ids)

    monkeypatch.setattr(cache_writer, "write_shard", wrapper)
    return written


def test_topk_round_trip_equals_dense_losses_when_k_is_the_vocabulary(tiny_model_dir, data_dir, tmp_path):
    summary = make_cache(tiny_model_dir, data_dir, tmp_path / "cache", temperatures=(2.0,))
    cache = teacher_cache.open_cache(only_cache(summary))
    teacher, tok = models.load_model(tiny_model_dir)
    selection = select(data_dir)
    rows = [batches.tokenize_example(tok, e, 96) for e in selection.train[:3]]
    batch = batches.collate(rows, tok.pad_token_id)
    with torch.no_grad():
        t_logits = batches.forward(teacher, batch)[:, :-1]
    sparse = cache.batch(batch)
    assert sparse["topk_ids"].shape == (3, batch["input_ids"].shape[1] - 1, len(tok.get_vocab()))
    mask = objectives.distill_mask(batch, training.TrainConfig(method="fkl"))
    student = torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pairs = [(losses.forward_kl, losses.forward_kl_topk), (losses.reverse_kl, losses.reverse_kl_topk)]
    for dense_fn, sparse_fn in pairs:
        dense = dense_fn(student, t_logits, mask, 2.0)
        (g_dense,) = torch.autograd.grad(dense, student)
        cached = sparse_fn(student, sparse["topk_ids"], sparse["topk_logprobs"], mask, 2.0)
        (g_cached,) = torch.autograd.grad(cached, student)
        # float16 log-probs: equal up to storage rounding
        assert float(cached.detach()) == pytest.approx(float(dense.detach()), rel=2e-3)
        assert torch.allclose(g_cached, g_dense, atol=2e-4, rtol=1e-2)
    assert summary["positions"] == sum(len(r["input_ids"]) - 1 for r in
                                       (batches.tokenize_example(tok, e, 96) for e in selection.train))


@pytest.mark.parametrize("fields", [{"representation": "sampled", "num_samples": 12},
                                    {"representation": "topk_sampled", "k": 4, "num_samples": 6}])
def test_sampled_estimator_is_unbiased(fields):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 50, generator=gen) * 2
    student = torch.randn(1, 6, 50, generator=gen, requires_grad=True)
    fields = {**fields, "temperature": 1.5}
    dense = losses.forward_kl(student, teacher[None], torch.ones(1, 6, dtype=torch.bool), 1.5)
    (g_dense,) = torch.autograd.grad(dense, student)
    # 12 groups of 150 independent draws, each group one batch of 200 sequences (its loss is their mean)
    draws, means, grads = 150, [], []
    for _ in range(12):
        stored = teacher_cache.encode(teacher.repeat(draws, 1), fields, gen)
        assert stored["ids"].dtype == torch.uint16
        args = {k: v.view(draws, 6, *v.shape[1:]) for k, v in teacher_cache.decode(stored).items()}
        loss = losses.forward_kl_sampled(student.expand(draws, 6, 50), **args,
                                         mask=torch.ones(draws, 6, dtype=torch.bool), temperature=1.5)
        means.append(float(loss.detach()))
        grads.append(torch.autograd.grad(loss, student)[0])
    means = torch.tensor(means)
    assert abs(means.mean() - float(dense.detach())) < 4 * means.std() / len(means) ** 0.5
    # unbiased: the error of the mean is its standard error (summed over the 300 logits), not more
    grads = torch.stack(grads)
    standard_error = (grads.std(0) / len(grads) ** 0.5).norm()
    assert (grads.mean(0) - g_dense).norm() < 2 * standard_error < 0.1 * g_dense.norm()


def test_cache_key_changes_when_any_input_changes(tiny_model_dir, tiny_corpus, data_dir, tmp_path):
    base = dict(teacher_hash="t", adapter_hash=None, task_aware_teacher=True, tokenizer_fp="v", mix_fp="m",
                max_length=256, representation="topk", k=8, num_samples=12, temperature=1.0, noise_sigma=0.0, seed=0,
                epochs=1, id_coding="fixed", vocab_size=512)
    key = teacher_cache.cache_key(teacher_cache.cache_fields(**base))
    assert key == teacher_cache.cache_key(teacher_cache.cache_fields(**base))
    changes = dict(teacher_hash="t2", adapter_hash="a", task_aware_teacher=False, tokenizer_fp="v2", mix_fp="m2",
                   max_length=128, k=16,
                   temperature=2.0, noise_sigma=1.0, seed=1, epochs=2)
    keys = {teacher_cache.cache_key(teacher_cache.cache_fields(**{**base, name: value}))
            for name, value in changes.items()}
    sampled = dict(base, representation="sampled")
    keys |= {teacher_cache.cache_key(teacher_cache.cache_fields(**sampled)),
             teacher_cache.cache_key(teacher_cache.cache_fields(**{**sampled, "num_samples": 24})),
             teacher_cache.cache_key(teacher_cache.cache_fields(**{**base, "representation": "topk_sampled"}))}
    assert key not in keys and len(keys) == len(changes) + 3
    fields = teacher_cache.cache_fields(**base)
    bumped = teacher_cache.cache_key({**fields, "format_version": teacher_cache.CACHE_FORMAT_VERSION + 1})
    assert bumped != key
    # the inputs the key is computed from
    other = models.tiny_llama_dir(tmp_path / "other", tiny_corpus, seed=1)
    assert teacher_cache.weights_hash(other) != teacher_cache.weights_hash(tiny_model_dir)
    assert teacher_cache.weights_hash(tiny_model_dir) == teacher_cache.weights_hash(tiny_model_dir)
    reversed_tok = models.tiny_tokenizer([t[::-1] for t in tiny_corpus], 300)
    assert teacher_cache.tokenizer_fingerprint(reversed_tok) != teacher_cache.tokenizer_fingerprint(
        models.load_tokenizer(tiny_model_dir))
    a = select(data_dir).train
    b = select(data_dir, n_train=5).train
    assert mix_fingerprint(a) != mix_fingerprint(b)
    # end to end: a changed setting is a new cache, an unchanged one is not recomputed
    first = make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4)
    again = make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4)
    changed = make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4, max_length=64)
    assert again["generated"] == [] and only_cache(again) == only_cache(first)
    assert changed["generated"] and only_cache(changed) != only_cache(first)


def test_killed_generation_resumes_without_recomputing_finished_shards(tiny_model_dir, data_dir, tmp_path,
                                                                      monkeypatch):
    count_writes(monkeypatch, fail_after=1)
    with pytest.raises(Killed):
        make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4, temperatures=(1.0, 2.0))
    (first,) = [p for p in (tmp_path / "c").iterdir() if (p / "shard-00000.json").is_file()]
    assert not (first / teacher_cache.MANIFEST).exists()
    stamp = (first / "shard-00000.safetensors").stat().st_mtime_ns
    written = count_writes(monkeypatch)
    summary = make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4, temperatures=(1.0, 2.0))
    n_shards = summary["per_cache"][0]["shards"]
    assert n_shards == 3
    # 3 shards for each of 2 caches, minus the one finished before the kill
    assert len(written) == 2 * n_shards - 1 and written.count(0) == 1
    assert (first / "shard-00000.safetensors").stat().st_mtime_ns == stamp
    for path in summary["caches"].values():
        assert len(teacher_cache.open_cache(path)._index) == summary["train_examples"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_is_refused_then_regenerated(tiny_model_dir, data_dir, tmp_path, monkeypatch, damage):
    # noisy and sampled: the regenerated shard must repeat the same seeded draws
    params = dict(k=4, representation="sampled", num_samples=6, noise_sigmas=(0.5,))
    path = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "c", **params))
    shard = path / "shard-00001.safetensors"
    good = shard.read_bytes()
    data = bytearray(good)
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[-10:]
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: sha256 .* corrupt or truncated"):
        teacher_cache.open_cache(path)
    written = count_writes(monkeypatch)
    make_cache(tiny_model_dir, data_dir, tmp_path / "c", **params)
    assert written == [1] and shard.read_bytes() == good
    teacher_cache.open_cache(path)


# k = V (top-k), or k = V - 1 and a one-token tail that every draw hits (topk_sampled): exact up to float16
@pytest.mark.parametrize("representation", ["topk", "topk_sampled"])
def test_student_from_cache_matches_online_student(tiny_model_dir, data_dir, tmp_path, representation):
    caches = make_cache(tiny_model_dir, data_dir, tmp_path / "cache", temperatures=(2.0,), num_samples=4,
                        representation=representation, epochs=2)["caches"]
    common = dict(method="fkl", student_layers=1, teacher=str(tiny_model_dir), data_dir=data_dir, epochs=2,
                  batch_size=2, micro_batch_size=2, lr=3e-3, lora=False, temperature=2.0, loss_chunk_size=64,
                  **COMMON)
    online = training.run_training(str(tiny_model_dir), tmp_path / "online", **common)
    cached = training.run_training(str(tiny_model_dir), tmp_path / "cached", teacher_cache=caches[2.0, 0.0], **common)
    assert cached["final_val_loss"] == pytest.approx(online["final_val_loss"], rel=1e-3)
    for a, b in zip(online["history"][1:], cached["history"][1:]):
        # float16 log-probs shift a KL by ~1e-5 in absolute terms: large against this near-zero KL
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], abs=5e-5)


def test_mismatched_cache_is_refused_naming_the_field(tiny_model_dir, tiny_corpus, data_dir, tmp_path):
    summary = make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4, representation="sampled")
    path = only_cache(summary)
    student, tok = models.load_model(tiny_model_dir)
    examples = select(data_dir).train
    config = training.TrainConfig(method="fkl", epochs=1, batch_size=2, micro_batch_size=2, max_length=96, lora=False)

    def refused(config, examples=examples, tokenizer=tok):
        with pytest.raises(ValueError) as err:
            training.train(student, tokenizer, examples, config, tmp_path / "out", val_examples=[],
                           teacher=teachers.CachedTeacher(path))
        assert not (tmp_path / "out").exists()
        return str(err.value)

    message = refused(training.TrainConfig(**{**vars(config), "temperature": 2.0}))
    assert "temperature: cache has 1.0, run expects 2.0" in message and "noise_sigma" not in message
    assert "mix_fingerprint: cache has" in refused(config, examples=examples[:-1])
    other_tok = models.tiny_tokenizer([t[::-1] for t in tiny_corpus], 300)
    assert "tokenizer: cache has" in refused(config, tokenizer=other_tok)
    both = refused(training.TrainConfig(**{**vars(config), "noise_sigma": 1.0, "max_length": 64}))
    assert "noise_sigma: cache has 0.0, run expects 1.0" in both and "max_length: cache has 96, run expects 64" in both
    assert "epochs: cache has 1, run expects 2" in refused(training.TrainConfig(**{**vars(config), "epochs": 2}))
    assert "needs a 'topk' teacher cache" in refused(training.TrainConfig(**{**vars(config), "method": "rkl"}))
    assert "need the online teacher" in refused(training.TrainConfig(**{**vars(config), "method": "gkd"}))
    with pytest.raises(ValueError, match="representation: cache has 'sampled', run expects 'topk'"):
        teacher_cache.open_cache(path, {"representation": "topk"})
    # a batch whose tokens differ from the cached ones is refused too
    cache = teacher_cache.open_cache(path)
    row = batches.tokenize_example(tok, examples[0], 96)
    row["input_ids"] = row["input_ids"][:-2] + [row["input_ids"][-1]] * 2
    with pytest.raises(ValueError, match="input ids differ"):
        cache.batch(batches.collate([row], tok.pad_token_id))


@pytest.mark.parametrize("overrides, message", [
    (dict(representation="dense"), "representation='dense' is not one of"),
    (dict(k=0), "k must be an int >= 1"),
    (dict(temperatures=(1.0, 0.0)), "temperature must be > 0"),
    (dict(noise_sigmas=(-1.0,)), "noise sigma must be >= 0"),
    (dict(representation="sampled", num_samples=0), "num_samples must be an int >= 1"),
    (dict(epochs=0), "epochs must be an int >= 1"),
    (dict(id_coding="varint"), "id_coding='varint' is not one of fixed, elias_fano"),
])
def test_bad_input_fails_before_any_work(tiny_model_dir, data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_cache(tiny_model_dir, data_dir, tmp_path / "c", **overrides)
    with pytest.raises(ModelError, match="adapter directory"):
        make_cache(tiny_model_dir, data_dir, tmp_path / "c", teacher_adapter=str(tmp_path / "missing"))
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_teacher_cache_then_distill_notebooks(tiny_model_dir, data_dir, tmp_path):
    import papermill as pm

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    data = {"data_dir": str(data_dir), "seed": 0, "max_length": 96, "val_fraction": 0.25}
    pm.execute_notebook(str(notebooks / "teacher_cache.ipynb"), str(tmp_path / "tc.ipynb"), progress_bar=False,
                        parameters={**data, "teacher": str(tiny_model_dir), "output_dir": str(tmp_path / "cache"),
                                    "representation": "topk", "k": 16, "temperatures": [2.0], "rationales": True,
                                    "rationale_max_new_tokens": 4, "shard_size": 4})
    (cache,) = (tmp_path / "cache").iterdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["fields"]["temperature"] == 2.0 and manifest["fields"]["k"] == 16
    assert manifest["rationales"]["max_new_tokens"] == 4 and len(manifest["shards"]) == 2
    pm.execute_notebook(str(notebooks / "distill.ipynb"), str(tmp_path / "kd.ipynb"), progress_bar=False,
                        parameters={**data, "model": str(tiny_model_dir), "student_layers": 1, "method": "rkl",
                                    "teacher": None, "teacher_cache": str(cache), "temperature": 2.0, "epochs": 1,
                                    "batch_size": 2, "micro_batch_size": 2, "lora_r": 4,
                                    "output_dir": str(tmp_path / "student")})
    summary = json.loads((tmp_path / "student" / "train_summary.json").read_text())
    assert summary["method"] == "rkl" and summary["history"][-1]["kd_loss"] > 0
    # seqkd takes the teacher's generations from the cache
    examples = select(data_dir).mix
    with_rationales = teacher_cache.cached_rationales(cache, examples, 4)
    teacher, tok = models.load_model(tiny_model_dir)
    online = teachers.teacher_rationales(teacher, tok, examples, max_new_tokens=4)
    assert [e.rationale for e in with_rationales] == [e.rationale for e in online]
    with pytest.raises(ValueError, match="max_new_tokens: cache has 4, run expects 8"):
        teacher_cache.cached_rationales(cache, examples, 8)


def test_a_run_finds_its_cache_among_a_stage_output_dirs(tiny_model_dir, data_dir, tmp_path):
    """A study's cache run writes one cache per temperature; each student run is given the stage's directory."""
    summary = make_cache(tiny_model_dir, data_dir, tmp_path / "stage", k=8, temperatures=(1.0, 2.0))
    examples = select(data_dir).train
    tok = models.load_tokenizer(tiny_model_dir)
    expect = {"tokenizer": teacher_cache.tokenizer_fingerprint(tok), "mix_fingerprint": mix_fingerprint(examples),
              "max_length": 96, "noise_sigma": 0.0}
    for tau in (1.0, 2.0):
        cache = teacher_cache.open_cache(tmp_path / "stage", {**expect, "temperature": tau})
        assert cache.path == Path(summary["caches"][tau, 0.0])
    with pytest.raises(ValueError) as err:
        teacher_cache.open_cache(tmp_path / "stage", {**expect, "temperature": 5.0})
    assert "no teacher cache under" in str(err.value) and str(err.value).count("run expects 5.0") == 2


def test_unbiased_variance_floor():
    V, n = 50, 8
    uniform = torch.full((1, V), 1 / V, dtype=torch.float64)
    # every id kept with probability n / V, estimated as 1 / n: variance (1/V)(1/n - 1/V) each
    assert float(teacher_cache.unbiased_variance_floor(uniform, n)) == pytest.approx(1 / n - 1 / V)
    peaked = torch.tensor([[0.6, 0.3] + [0.1 / 10] * 10], dtype=torch.float64)
    # the two large ones are kept exactly; the 10 small ones share the 6 other entries
    assert float(teacher_cache.unbiased_variance_floor(peaked, n)) == pytest.approx(10 * 0.01 * (0.1 / 6 - 0.01))
    assert float(teacher_cache.unbiased_variance_floor(peaked, 12)) == 0
    # no unbiased scheme beats it: the stored draws of sampled / topk_sampled stay above it
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, V, generator=gen, dtype=torch.float64) * 2
    p = torch.softmax(logits, -1)
    floor = float(teacher_cache.unbiased_variance_floor(p, n))
    for fields in ({"representation": "sampled", "num_samples": n},
                   {"representation": "topk_sampled", "k": 2, "num_samples": n - 2}):
        stored = teacher_cache.encode(logits.repeat(4000, 1), {**fields, "temperature": 1.0}, gen)
        args = teacher_cache.decode(stored)
        w = args["sample_counts"].double()
        estimate = torch.zeros(4000, V, dtype=torch.float64).scatter_add_(1, args["sample_ids"], w / w.sum(-1, True))
        variance = float(((estimate - p) ** 2).sum(-1).mean())
        assert floor <= variance


@pytest.mark.parametrize("k", [1, 4, 49])
def test_topk_sampled_entropy_is_the_teachers(k):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 50, generator=gen) * 3
    logits[0, 10:] = -math.inf  # a position whose tail is mostly impossible tokens
    stored = teacher_cache.encode(logits, {"representation": "topk_sampled", "k": k, "num_samples": 5,
                                           "temperature": 1.5}, gen)
    logp = (logits.double() / 1.5).log_softmax(-1)
    dense = -torch.where(logp.isinf(), 0.0, logp.exp() * logp).sum(-1)
    torch.testing.assert_close(stored["entropy"].double(), dense, rtol=1e-5, atol=1e-6)


def fake_adapter(path: Path, content: bytes) -> Path:
    """Enough of an adapter directory to be hashed (its identity is all these tests need)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(content)
    return path


def training_expect(tiny_model_dir, data_dir) -> dict:
    examples = select(data_dir).train
    tok = models.load_tokenizer(tiny_model_dir)
    return dict(tokenizer=tok, train_examples=examples, method="fkl", temperature=1.0, noise_sigma=0.0, max_length=96,
                epochs=1)


def test_a_cache_of_another_teacher_adapter_or_awareness_is_refused(tiny_model_dir, tiny_corpus, data_dir, tmp_path):
    path = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4))
    run = training_expect(tiny_model_dir, data_dir)
    own = {**teacher_cache.teacher_identity(tiny_model_dir), "seed": 0}
    assert teacher_cache.open_for_training(path, **run, expect=own).path == path

    def refused(expect: dict) -> str:
        with pytest.raises(ValueError, match="does not fit this run") as err:
            teacher_cache.open_for_training(path, **run, expect=expect)
        return str(err.value)

    other = models.tiny_llama_dir(tmp_path / "other", tiny_corpus, seed=1)
    message = refused(teacher_cache.teacher_identity(other))
    assert "teacher: cache has" in message and "adapter" not in message
    adapter = fake_adapter(tmp_path / "adapter", b"re-fine-tuned")
    message = refused(teacher_cache.teacher_identity(tiny_model_dir, adapter))
    assert "adapter: cache has None, run expects '" in message and "teacher:" not in message
    message = refused({**teacher_cache.teacher_identity(tiny_model_dir, adapter, task_aware_teacher=False), "seed": 3})
    assert "task_aware_teacher: cache has True, run expects False" in message
    assert "seed: cache has 0, run expects 3" in message
    # the student run passes its teacher's identity: the wiring, end to end
    with pytest.raises(ValueError, match="teacher: cache has"):
        training.run_training(str(tiny_model_dir), tmp_path / "student", method="fkl", teacher=str(other),
                              teacher_cache=str(path), data_dir=data_dir, epochs=1, batch_size=2, micro_batch_size=2,
                              lora=False, **COMMON)


def test_two_adapters_hash_apart(tmp_path):
    a = teacher_cache.weights_hash(fake_adapter(tmp_path / "a", b"first fine-tune"))
    assert a != teacher_cache.weights_hash(fake_adapter(tmp_path / "b", b"second fine-tune"))


def test_two_matching_caches_are_an_error_naming_both(tiny_model_dir, data_dir, tmp_path):
    """Caches of two representations in one folder: a run that does not say which gets neither."""
    topk = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "stage", k=4))
    sampled = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "stage", representation="sampled",
                                    num_samples=4))
    run = training_expect(tiny_model_dir, data_dir)
    with pytest.raises(ValueError, match="2 teacher caches .* ambiguous") as err:
        teacher_cache.open_for_training(tmp_path / "stage", **run)
    assert topk.name in str(err.value) and sampled.name in str(err.value) and "representation" in str(err.value)
    chosen = teacher_cache.open_for_training(tmp_path / "stage", **run, expect={"representation": "sampled"})
    assert chosen.path == sampled
    with pytest.raises(ValueError, match="representation: cache has 'topk', run expects 'topk_sampled'"):
        teacher_cache.open_for_training(tmp_path / "stage", **run, expect={"representation": "topk_sampled"})


def test_a_cache_whose_key_is_not_its_directory_is_refused(tiny_model_dir, data_dir, tmp_path):
    path = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4))
    manifest = json.loads((path / teacher_cache.MANIFEST).read_text())
    manifest["fields"]["temperature"] = 2.0  # an edited manifest now claims another setting
    (path / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="hash to key .*, not the directory's name"):
        teacher_cache.open_cache(path)
    renamed = path.rename(tmp_path / "c" / "renamed")
    manifest["fields"]["temperature"] = 1.0
    (renamed / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the directory's name"):
        teacher_cache.open_cache(renamed)


@pytest.mark.parametrize("damaged", ["manifest.json", "shard-00001.json"])
def test_truncated_manifest_or_record_is_detected_and_regenerated(tiny_model_dir, data_dir, tmp_path, monkeypatch,
                                                                  damaged):
    path = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4))
    good = teacher_cache.open_cache(path).example
    file = path / damaged
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    if damaged == "manifest.json":
        with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
            teacher_cache.open_cache(path)
        with pytest.raises(ValueError, match="unreadable"):
            teacher_cache.open_cache(tmp_path / "c", {"temperature": 1.0})
    written = count_writes(monkeypatch)
    summary = make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4)
    # a truncated record marks its shard unfinished; a truncated manifest alone is rewritten from the records
    assert written == ([1] if damaged != "manifest.json" else []) and summary["generated"] == [str(path)]
    cache = teacher_cache.open_cache(path)
    for example_id in cache._index:
        new, old = cache.example(example_id), good(example_id)
        assert new.keys() == old.keys() and all(torch.equal(new[name], old[name]) for name in new), example_id


@pytest.mark.parametrize("representation", ["topk", "topk_sampled"])
def test_float16_log_probs_keep_a_small_tail(representation):
    """A tail of ~1e-6 is below float16's resolution next to log p = 0: rounded to nearest it would vanish."""
    logits = torch.tensor([[14.0, 13.5, 0.0, -1.0, -2.0, -3.0]], dtype=torch.float64).repeat(64, 1)
    logits[:, 1] += torch.linspace(0, 0.5, 64, dtype=torch.float64)  # rows whose rounding errs either way
    fields = dict(representation=representation, k=2, num_samples=3, temperature=1.0)
    stored = teacher_cache.encode(logits, fields, torch.Generator().manual_seed(0))
    true_tail = 1 - logits.softmax(-1)[:, :2].sum(-1)
    nearest_tail = cache_encoding._tail(losses.teacher_topk(logits[None], 2, 1.0)[1][0].to(torch.float16))
    assert (nearest_tail < 0.5 * true_tail).any()  # the case the guard is for
    kept_tail = cache_encoding._tail(stored["logprobs"])
    assert (kept_tail >= 0.5 * true_tail).all() and (kept_tail < 1e-2).all()
    if representation == "topk_sampled":  # the draws carry that tail as their weight
        counts = teacher_cache.decode(stored)["sample_counts"].double()
        assert torch.allclose(counts[:, 2:].sum(-1), kept_tail, rtol=1e-5)
        assert torch.allclose(counts.sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("overrides, sets", [
    (dict(representation="sampled", num_samples=4), 2),
    (dict(representation="topk_sampled", k=4, num_samples=4), 2),
    (dict(representation="topk", k=4, noise_sigmas=(1.0,)), 2),  # the noise is drawn again for each epoch
    (dict(representation="topk", k=4), 1),  # nothing random: one set serves every epoch
], ids=["sampled", "topk_sampled", "topk-noise", "topk"])
def test_each_epoch_reads_its_own_draw_set(tiny_model_dir, data_dir, tmp_path, overrides, sets):
    summary = make_cache(tiny_model_dir, data_dir, tmp_path / "c", epochs=2, **overrides)
    one_epoch = make_cache(tiny_model_dir, data_dir, tmp_path / "c1", epochs=1, **overrides)
    cache = teacher_cache.open_cache(only_cache(summary))
    assert cache.sets == sets and summary["per_cache"][0]["epoch_sets"] == sets
    assert summary["bytes_per_token_per_set"] == pytest.approx(summary["bytes_per_token"] / sets, abs=0.01)
    # byte-honest: each further set costs its stored tensors per position (ids, log-probs, entropy), nothing more
    payload = sum(t.element_size() * t[0, 0].numel() for name, t in cache._shards[0].items()
                  if name not in ("input_ids", "lengths"))
    extra = summary["bytes_per_token"] - one_epoch["bytes_per_token"]
    assert extra == pytest.approx((sets - 1) * payload, abs=0.2)
    tok = models.load_tokenizer(tiny_model_dir)
    selection = select(data_dir)
    batch = batches.collate([batches.tokenize_example(tok, e, 96) for e in selection.train[:3]], tok.pad_token_id)
    real = batch["attention_mask"][:, 1:].bool()
    first, second, third = (cache.batch(batch, epoch=epoch) for epoch in (1, 2, 3))
    if sets == 1:
        assert all(torch.equal(first[name], second[name]) for name in first)
    else:
        ids = "topk_ids" if "topk_ids" in first else "sample_ids"
        assert not torch.equal(first[ids][real], second[ids][real])
    assert all(torch.equal(first[name], third[name]) for name in first)  # epoch 3 of a 2-epoch cache: set 1 again
    # the first set is the one a 1-epoch cache stores
    alone = teacher_cache.open_cache(only_cache(one_epoch)).batch(batch)
    assert all(torch.equal(first[name], alone[name]) for name in first)


@pytest.mark.parametrize("fields", [{"representation": "sampled", "num_samples": 12},
                                    {"representation": "topk_sampled", "k": 4, "num_samples": 6}])
def test_every_draw_set_is_unbiased(fields):
    """Each epoch's set on its own is an unbiased sample of forward KL and its gradient."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 50, generator=gen) * 2
    student = torch.randn(1, 6, 50, generator=gen, requires_grad=True)
    fields = {**fields, "temperature": 1.5, "noise_sigma": 0.0, "seed": 0, "epochs": 3, "id_coding": "fixed",
              "vocab_size": 50}
    dense = losses.forward_kl(student, teacher[None], torch.ones(1, 6, dtype=torch.bool), 1.5)
    (g_dense,) = torch.autograd.grad(dense, student)
    draws, grads = 150, []  # 12 "examples" of 150 copies of the 6 positions, each a batch of 150 sequences
    for example in range(12):
        stored = teacher_cache.encode_sets(teacher.repeat(draws, 1), fields, f"example-{example}")
        assert stored["ids"].shape[:2] == (draws * 6, 3)
        per_set = []
        for s in range(3):
            args = {k: v.view(draws, 6, *v.shape[1:])
                    for k, v in teacher_cache.decode({name: t[:, s] for name, t in stored.items()}).items()}
            loss = losses.forward_kl_sampled(student.expand(draws, 6, 50), **args,
                                             mask=torch.ones(draws, 6, dtype=torch.bool), temperature=1.5)
            per_set.append(torch.autograd.grad(loss, student)[0])
        assert not torch.equal(stored["ids"][:, 0], stored["ids"][:, 1])  # the sets are drawn apart
        grads.append(torch.stack(per_set))
    grads = torch.stack(grads)  # [example, set, 1, 6, 50]
    for s in range(3):
        standard_error = (grads[:, s].std(0) / len(grads) ** 0.5).norm()
        assert (grads[:, s].mean(0) - g_dense).norm() < 2.5 * standard_error < 0.1 * g_dense.norm()


class KilledAfterEpochOne(Exception):
    pass


def test_a_resumed_run_reads_the_draw_set_an_uninterrupted_one_reads(tiny_model_dir, data_dir, tmp_path,
                                                                       monkeypatch):
    path = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "c", representation="sampled",
                                 num_samples=4, epochs=2))
    selection = select(data_dir)
    config = training.TrainConfig(method="fkl", epochs=2, batch_size=2, micro_batch_size=2, lr=3e-3, lora=False,
                                  loss_chunk_size=64, max_length=96, seed=0)
    read = []  # the set each batch was read from
    batch_of = teacher_cache.TeacherCache.batch

    def spy(self, batch, device=None, epoch=1):
        read.append((epoch - 1) % self.sets)
        return batch_of(self, batch, device, epoch)

    monkeypatch.setattr(teacher_cache.TeacherCache, "batch", spy)

    def run(name: str, **kwargs) -> dict:
        student, tok = models.load_model(tiny_model_dir)
        return training.train(student, tok, selection.train, config, tmp_path / name, val_examples=selection.val,
                              teacher=teachers.CachedTeacher(path), **kwargs)

    def kill(epoch: int) -> None:
        raise KilledAfterEpochOne()

    full = run("full")
    uninterrupted, read[:] = list(read), []
    with pytest.raises(KilledAfterEpochOne):
        run("resumed", on_epoch_end=kill)
    before_kill, read[:] = list(read), []
    resumed = run("resumed")
    half = len(uninterrupted) // 2
    assert uninterrupted == [0] * half + [1] * half and before_kill == [0] * half and read == [1] * half
    assert resumed["history"] == full["history"]


def test_cached_rationales_get_eos_only_when_the_generation_finished(tiny_model_dir, data_dir, tmp_path,
                                                                     monkeypatch):
    """As online (``teachers.teacher_rationales``): a generation cut at max_new_tokens ends its row without EOS."""
    def generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, return_finished, precision):
        assert return_finished
        finished = [i % 2 == 0 for i in range(len(prompts))]
        return [f"step {i} so the answer is {i}" for i in range(len(prompts))], finished

    monkeypatch.setattr(teachers, "generate", generate)
    path = only_cache(make_cache(tiny_model_dir, data_dir, tmp_path / "c", k=4, rationales=True,
                                 rationale_max_new_tokens=4))
    mix = select(data_dir).mix
    cached = teacher_cache.cached_rationales(path, mix, 4)
    teacher, tok = models.load_model(tiny_model_dir)
    online = teachers.teacher_rationales(teacher, tok, mix, max_new_tokens=4)
    assert [(e.rationale, e.complete) for e in cached] == [(e.rationale, e.complete) for e in online]
    assert [e.complete for e in cached] == [i % 2 == 0 for i in range(len(mix))]
    for example in cached:
        row = batches.tokenize_example(tok, example, 10_000)  # long enough that nothing is truncated
        assert (row["input_ids"][-1] == tok.eos_token_id) == example.complete, example.id


@pytest.mark.parametrize("overrides", [dict(representation="sampled", num_samples=12),
                                       dict(representation="topk_sampled", k=4, num_samples=12, noise_sigmas=(1.0,))],
                         ids=["sampled", "topk_sampled-noise"])
def test_elias_fano_coded_ids_give_the_same_targets_in_fewer_bytes(tiny_model_dir, data_dir, tmp_path, overrides):
    fixed = make_cache(tiny_model_dir, data_dir, tmp_path / "fixed", epochs=2, **overrides)
    coded = make_cache(tiny_model_dir, data_dir, tmp_path / "coded", epochs=2, id_coding="elias_fano", **overrides)
    a, b = (teacher_cache.open_cache(only_cache(summary)) for summary in (fixed, coded))
    assert "draw_codes" in b._shards[0] and "draw_codes" not in a._shards[0]
    tok = models.load_tokenizer(tiny_model_dir)
    vocab = len(tok.get_vocab())
    # per position and set: 12 ids of 2 bytes, or their Elias-Fano code
    saved = 12 * 2 - id_codes.code_bytes(12, vocab)
    # (within a byte: the shard headers name other tensors)
    assert saved > 0 and fixed["bytes_per_token"] - coded["bytes_per_token"] == pytest.approx(2 * saved, abs=1.0)
    selection = select(data_dir)
    batch = batches.collate([batches.tokenize_example(tok, e, 96) for e in selection.train[:3]], tok.pad_token_id)
    for epoch in (1, 2):
        x, y = a.batch(batch, epoch=epoch), b.batch(batch, epoch=epoch)
        assert x.keys() == y.keys() and all(torch.equal(x[name], y[name]) for name in x)
