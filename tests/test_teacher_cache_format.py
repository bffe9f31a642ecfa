"""The teacher cache's format, pinned against values worked out by hand: fields and key, the encoding of each
representation, shards and their records, a cache written by hand and read back, and what is refused.

Fast (no teacher model except in the last tests): these are the tests that judge the cache modules
(kd_utils/teacher_cache.py and kd_utils/cache_*.py) in their mutation run, beside tests/test_teacher_cache.py.
"""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from kd_utils import (
    batches,
    cache_encoding,
    cache_format,
    cache_reader,
    cache_writer,
    id_codes,
    losses,
    models,
    teacher_cache,
)
from kd_utils.data import Example, build_training_mix, mix_fingerprint
from kd_utils.evaluation import sample_examples


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    """Keep the weight-hash memo of these tests out of the user's cache."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def fields_of(representation: str = "topk", **overrides) -> dict:
    base = dict(teacher_hash="t", adapter_hash=None, task_aware_teacher=True, tokenizer_fp="tok", mix_fp="mix",
                max_length=64, representation=representation, k=2, num_samples=3, temperature=1.0, noise_sigma=0.0,
                seed=0, epochs=1, id_coding="fixed", vocab_size=10)
    return teacher_cache.cache_fields(**{**base, **overrides})


# ---- fields, key, settings ---------------------------------------------------------------------


def test_cache_fields_name_every_input_in_clear():
    common = {"format_version": 4, "teacher": "t", "adapter": "a", "task_aware_teacher": False, "tokenizer": "tok",
              "mix_fingerprint": "mix", "max_length": 64, "temperature": 2.0, "noise_sigma": 0.5, "seed": 3,
              "epochs": 2, "logprob_dtype": "float16", "vocab_size": 10}
    args = dict(teacher_hash="t", adapter_hash="a", task_aware_teacher=0, tokenizer_fp="tok", mix_fp="mix",
                max_length=64.0, k=2.0, num_samples=3.0, temperature=2, noise_sigma=0.5, seed=3.0, epochs=2.0,
                id_coding="elias_fano", vocab_size=10.0)
    got = {r: teacher_cache.cache_fields(**args, representation=r) for r in teacher_cache.REPRESENTATIONS}
    # k only where top-k ids are stored, num_samples only where draws are; a topk cache has no draws to code
    assert got["topk"] == {**common, "representation": "topk", "k": 2, "num_samples": None, "id_coding": "fixed"}
    assert got["sampled"] == {**common, "representation": "sampled", "k": None, "num_samples": 3,
                              "id_coding": "elias_fano"}
    assert got["topk_sampled"] == {**common, "representation": "topk_sampled", "k": 2, "num_samples": 3,
                                   "id_coding": "elias_fano"}
    assert [type(got["topk"][name]) for name in ("max_length", "k", "temperature", "seed", "epochs", "vocab_size")] \
        == [int, int, float, int, int, int]


@pytest.mark.parametrize("representation, sigma, epochs, sets", [
    ("topk", 0.0, 3, 1), ("topk", 0.5, 3, 3), ("sampled", 0.0, 3, 3), ("topk_sampled", 0.0, 2, 2),
    ("sampled", 0.0, 1, 1),
])
def test_stored_sets_one_per_epoch_unless_nothing_is_random(representation, sigma, epochs, sets):
    assert teacher_cache.stored_sets({"representation": representation, "noise_sigma": sigma, "epochs": epochs}) \
        == sets


def test_cache_key_is_the_sha256_of_the_canonical_json():
    fields = {"b": 1, "a": [1.5, None], "c": "x"}
    canonical = b'{"a":[1.5,null],"b":1,"c":"x"}'
    assert teacher_cache.cache_key(fields) == hashlib.sha256(canonical).hexdigest()[:24]


@pytest.mark.parametrize("kwargs", [
    dict(k=1, num_samples=1, epochs=1, temperatures=[1e-3], noise_sigmas=[0.0]),
    dict(k=5, num_samples=7, epochs=3, temperatures=[0.5, 2.0], noise_sigmas=[0.0, 0.5], id_coding="elias_fano"),
])
def test_valid_settings_pass(kwargs):
    assert teacher_cache.validate_settings("topk", **kwargs) is None


@pytest.mark.parametrize("overrides, message", [
    (dict(representation="dense"), r"^representation='dense' is not one of topk, sampled, topk_sampled$"),
    (dict(k=0), r"^k must be an int >= 1, got 0$"),
    (dict(k=2.0), r"^k must be an int >= 1, got 2\.0$"),
    (dict(num_samples=0), r"^num_samples must be an int >= 1, got 0$"),
    (dict(num_samples=1.0), r"^num_samples must be an int >= 1, got 1\.0$"),
    (dict(id_coding="varint"), r"^id_coding='varint' is not one of fixed, elias_fano$"),
    (dict(epochs=0), r"^epochs must be an int >= 1, got 0$"),
    (dict(epochs=1.0), r"^epochs must be an int >= 1, got 1\.0$"),
    (dict(temperatures=[]), r"^temperatures and noise_sigmas must each hold at least one value$"),
    (dict(noise_sigmas=[]), r"^temperatures and noise_sigmas must each hold at least one value$"),
    (dict(temperatures=[1.0, 0.0]), r"^temperature must be > 0, got 0\.0$"),
    (dict(noise_sigmas=[0.0, -0.5]), r"^noise sigma must be >= 0, got -0\.5$"),
    (dict(noise_sigmas=[math.nan]), r"^noise sigma must be >= 0, got nan$"),
])
def test_bad_settings_are_refused_naming_the_value(overrides, message):
    kwargs = {**dict(representation="topk", k=1, num_samples=1, temperatures=[1.0], noise_sigmas=[0.0], epochs=1,
                     id_coding="fixed"), **overrides}
    with pytest.raises(ValueError, match=message):
        teacher_cache.validate_settings(**kwargs)


def test_validate_settings_defaults_are_valid():
    # no epochs / id_coding given
    assert teacher_cache.validate_settings("topk", k=1, num_samples=1, temperatures=[1.0], noise_sigmas=[0.0]) is None


@pytest.mark.parametrize("vocab, dtype", [(10, torch.uint16), (65536, torch.uint16), (65537, torch.int32),
                                          (131072, torch.int32)])
def test_ids_are_uint16_while_the_vocabulary_fits(vocab, dtype):
    assert teacher_cache.id_dtype(vocab) == dtype


@pytest.mark.parametrize("representation, methods", [("topk", ("fkl", "rkl")), ("sampled", ("fkl",)),
                                                     ("topk_sampled", ("fkl",))])
def test_only_a_topk_cache_serves_reverse_kl(representation, methods):
    assert teacher_cache.cacheable_methods(representation) == methods


# ---- encoding --------------------------------------------------------------------------------------


def test_tail_is_one_minus_the_stored_mass_per_row():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.9), math.log(0.1)]])
    assert torch.allclose(cache_encoding._tail(logprobs), torch.tensor([0.25, 0.0], dtype=torch.float64), atol=1e-7)
    assert cache_encoding._tail(logprobs).dtype == torch.float64


def test_quantize_rounds_to_nearest_unless_the_tail_would_shrink_below_half():
    # row 0: tail 0.4, rounding cannot halve it; row 1: tail 8e-7, which nearest rounding turns negative
    logprobs = torch.tensor([[math.log(0.3), math.log(0.3)], [-0.4801001352147964, -0.9642271193417806]],
                            dtype=torch.float64)
    nearest = logprobs.to(torch.float16)
    assert cache_encoding._tail(nearest)[1] < 0.5 * cache_encoding._tail(logprobs)[1]
    stored = teacher_cache.quantize_logprobs(logprobs, torch.float16, covers_vocab=False)
    assert stored.dtype == torch.float16 and torch.equal(stored[0], nearest[0])
    # toward -inf: never above the true value, within one float16 step of it
    assert (stored[1].double() <= logprobs[1]).all()
    below = torch.nextafter(nearest[1], torch.full_like(nearest[1], -math.inf))
    assert all(s in (n, b) for s, n, b in zip(stored[1].tolist(), nearest[1].tolist(), below.tolist()))
    assert cache_encoding._tail(stored)[1] >= 0.5 * cache_encoding._tail(logprobs)[1]
    # an exactly representable value is already rounded toward -inf: it stays
    exact = torch.tensor([[-0.5, math.log(1 - math.exp(-0.5) - 1e-7)]], dtype=torch.float64)
    assert teacher_cache.quantize_logprobs(exact, torch.float16, covers_vocab=False)[0, 0] == -0.5
    # k = V (no tail to keep) or the same dtype: nearest, whatever the tail
    assert torch.equal(teacher_cache.quantize_logprobs(logprobs, torch.float16, covers_vocab=True), nearest)
    assert torch.equal(teacher_cache.quantize_logprobs(logprobs, torch.float64, covers_vocab=False), logprobs)


def test_encode_topk_stores_the_k_largest_log_probs_in_float16():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.0, 4.0, 1.0]])
    stored = teacher_cache.encode(logits, {"representation": "topk", "k": 2, "temperature": 2.0})
    logp = (logits.double() / 2).log_softmax(-1)
    assert stored.keys() == {"ids", "logprobs"} and stored["ids"].dtype == torch.uint16
    assert stored["ids"].tolist() == [[1, 2], [2, 3]]
    assert torch.equal(stored["logprobs"], logp.gather(1, torch.tensor([[1, 2], [2, 3]])).to(torch.float16))
    # k above V is capped at V: every id, nearest rounding (no tail to guard)
    whole = teacher_cache.encode(logits, {"representation": "topk", "k": 9, "temperature": 2.0})
    assert whole["ids"].tolist() == [[1, 2, 0, 3], [2, 3, 0, 1]]
    assert torch.equal(whole["logprobs"], logp.gather(1, whole["ids"].long()).to(torch.float16))


def test_encode_topk_keeps_nearest_rounding_when_k_is_the_vocabulary():
    # rows whose nearest float16 log-probs sum above 1: no tail is stored, so nothing is rounded down
    logits = torch.tensor([[0.0, -9.0, -9.2, -9.4]]).repeat(8, 1) + torch.linspace(0, 0.07, 8)[:, None] * \
        torch.tensor([1.0, 0.0, 0.0, 0.0])
    stored = teacher_cache.encode(logits, {"representation": "topk", "k": 4, "temperature": 1.0})
    logp = logits.double().log_softmax(-1)
    assert (cache_encoding._tail(logp.to(torch.float16)) < 0).any()  # the case: a guard would round these down
    assert torch.equal(stored["logprobs"], logp.gather(1, stored["ids"].long()).to(torch.float16))


def test_encode_sampled_draws_systematically_and_stores_the_entropy():
    uniform = torch.zeros(64, 4)
    stored = teacher_cache.encode(uniform, {"representation": "sampled", "num_samples": 4, "temperature": 1.0},
                                  torch.Generator().manual_seed(0))
    assert stored.keys() == {"ids", "entropy"} and stored["ids"].dtype == torch.uint16
    # one draw in each quarter of the CDF: every id exactly once, the draws sorted
    assert stored["ids"].tolist() == [[0, 1, 2, 3]] * 64
    assert stored["entropy"].dtype == torch.float32
    assert torch.allclose(stored["entropy"], torch.full((64,), math.log(4)))
    # a point mass: every draw is its id (not merged into one entry with a count)
    point = torch.full((2, 5), -math.inf)
    point[:, 3] = 0.0
    stored = teacher_cache.encode(point, {"representation": "sampled", "num_samples": 3, "temperature": 1.0},
                                  torch.Generator().manual_seed(0))
    assert stored["ids"].tolist() == [[3, 3, 3]] * 2 and stored["entropy"].tolist() == [0.0, 0.0]


def test_encode_sampled_draws_come_from_the_given_generator():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    stored = teacher_cache.encode(logits, {"representation": "sampled", "num_samples": 6, "temperature": 1.5},
                                  torch.Generator().manual_seed(7))
    ids, _, entropy = losses.teacher_samples(logits[None], 6, 1.5, generator=torch.Generator().manual_seed(7),
                                             systematic=True, merge=False)
    assert torch.equal(stored["ids"].long(), ids[0]) and torch.equal(stored["entropy"], entropy[0])


def test_ids_of_a_large_vocabulary_are_int32():
    logits = torch.zeros(1, 65537)
    logits[0, 65536] = 30.0
    for fields in ({"representation": "topk", "k": 1}, {"representation": "sampled", "num_samples": 2},
                   {"representation": "topk_sampled", "k": 1, "num_samples": 2}):
        stored = teacher_cache.encode(logits, {**fields, "temperature": 1.0}, torch.Generator().manual_seed(0))
        assert stored["ids"].dtype == torch.int32 and stored["ids"][0, 0] == 65536


def test_encode_topk_sampled_draws_only_from_the_tail():
    logits = torch.tensor([[5.0, 4.0, 1.0, 1.0, -math.inf]]).repeat(32, 1)
    stored = teacher_cache.encode(logits, {"representation": "topk_sampled", "k": 2, "num_samples": 4,
                                           "temperature": 1.0}, torch.Generator().manual_seed(0))
    logp = logits.double().log_softmax(-1)
    assert stored["ids"][:, :2].tolist() == [[0, 1]] * 32
    assert torch.equal(stored["logprobs"], logp[:, :2].to(torch.float16))
    # the tail is ids 2 and 3, equally likely: systematic draws take each twice
    assert stored["ids"][:, 2:].tolist() == [[2, 2, 3, 3]] * 32
    # k is capped at V - 1 so that a tail remains
    capped = teacher_cache.encode(logits[:, :4], {"representation": "topk_sampled", "k": 9, "num_samples": 2,
                                                  "temperature": 1.0}, torch.Generator().manual_seed(0))
    assert capped["logprobs"].shape == (32, 3) and capped["ids"][:, 3:].tolist() == [[capped["ids"][0, 3]] * 2] * 32
    assert set(capped["ids"][0].tolist()) == {0, 1, 2, 3}


def test_decode_gives_the_sparse_losses_their_arguments():
    ids = torch.tensor([[4, 1, 7, 7]], dtype=torch.uint16)
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float16)
    entropy = torch.tensor([1.25])
    topk = teacher_cache.decode({"ids": ids[:, :2], "logprobs": logprobs})
    assert topk.keys() == {"topk_ids", "topk_logprobs"} and topk["topk_ids"].dtype == torch.int64
    assert topk["topk_ids"].tolist() == [[4, 1]] and topk["topk_logprobs"].dtype == torch.float32
    assert torch.equal(topk["topk_logprobs"], logprobs.float())
    sampled = teacher_cache.decode({"ids": ids, "entropy": entropy})
    assert sampled["sample_ids"].tolist() == [[4, 1, 7, 7]] and sampled["sample_counts"].tolist() == [[1.0] * 4]
    assert sampled["teacher_entropy"].tolist() == [1.25]
    # top-k weighted by p, each of the 2 draws by the tail 0.25 / 2
    both = teacher_cache.decode({"ids": ids, "logprobs": logprobs, "entropy": entropy})
    assert both.keys() == {"sample_ids", "sample_counts", "teacher_entropy"}
    assert both["sample_ids"].dtype == torch.int64 and both["sample_ids"].tolist() == [[4, 1, 7, 7]]
    assert both["sample_counts"].tolist() == [pytest.approx([0.5, 0.25, 0.125, 0.125], abs=2e-4)]
    # batched [B, T, width] rows, and a stored mass above 1 (float16 rounding): the draws weigh 0, not less
    over = torch.tensor([[[math.log(0.75), math.log(0.375)]]], dtype=torch.float16)
    counts = teacher_cache.decode({"ids": ids[None], "logprobs": over, "entropy": entropy[None]})["sample_counts"]
    assert counts.tolist() == [[pytest.approx([0.75, 0.375, 0.0, 0.0], abs=2e-4)]]


def test_each_example_draws_from_its_own_seeded_generator():
    digest = hashlib.sha256(b"3\0ex-1\0samples-0").digest()
    generator = teacher_cache.example_generator(3, "ex-1", "samples-0")
    assert generator.initial_seed() == int.from_bytes(digest[:8], "little") >> 1


def test_elias_fano_packing_codes_only_the_draws():
    ids = torch.tensor([[9, 2, 1, 3, 3], [0, 5, 6, 6, 9]], dtype=torch.uint16)  # 2 positions: k = 2, then 3 draws
    stored = {"ids": ids, "logprobs": torch.zeros(2, 2, dtype=torch.float16), "entropy": torch.ones(2)}
    fields = {"id_coding": "elias_fano", "num_samples": 3, "vocab_size": 10}
    assert teacher_cache.pack_ids(stored, {**fields, "id_coding": "fixed"}) is stored
    packed = teacher_cache.pack_ids(stored, fields)
    assert packed.keys() == {"ids", "logprobs", "entropy", "draw_codes"}
    assert torch.equal(packed["ids"], ids[:, :2])
    assert torch.equal(packed["draw_codes"], id_codes.encode(torch.tensor([[1, 3, 3], [6, 6, 9]]), 10))
    # read back as a shard stores them, [positions, sets, width]
    unpacked = teacher_cache.unpack_ids({name: t[:, None] for name, t in packed.items()}, fields)
    assert unpacked.keys() == stored.keys() and unpacked["ids"].dtype == torch.uint16
    assert all(torch.equal(unpacked[name], stored[name][:, None]) for name in stored)
    # sampled: every id is a draw, no ids tensor is kept
    draws = {"ids": ids[:, 2:], "entropy": torch.ones(2)}
    packed = teacher_cache.pack_ids(draws, fields)
    assert packed.keys() == {"entropy", "draw_codes"}
    unpacked = teacher_cache.unpack_ids(packed, fields)
    assert unpacked.keys() == {"entropy", "ids"} and torch.equal(unpacked["ids"], ids[:, 2:])
    assert teacher_cache.unpack_ids(draws, fields) is draws  # nothing coded: as stored


def test_encode_sets_seed_each_set_by_seed_example_and_set():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    fields = {**fields_of("topk_sampled", noise_sigma=0.7, epochs=2, seed=5, vocab_size=12), "k": 2}
    stored = teacher_cache.encode_sets(logits, fields, "ex-9")
    assert stored.keys() == {"ids", "logprobs", "entropy"} and stored["ids"].shape == (3, 2, 5)
    for s in range(2):
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"5\0ex-9\0noise-{s}".encode()).digest()[:8], "little") >> 1))
        draws = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"5\0ex-9\0samples-{s}".encode()).digest()[:8], "little") >> 1)
        alone = teacher_cache.encode(logits + 0.7 * noise, fields, draws)
        assert all(torch.equal(stored[name][:, s], alone[name]) for name in alone), s
    # no noise: the logits as given; one set when nothing is random
    plain = teacher_cache.encode_sets(logits, fields_of("topk", k=3, epochs=4, vocab_size=12), "ex-9")
    assert plain["ids"].shape == (3, 1, 3)
    assert torch.equal(plain["logprobs"][:, 0], logits.double().log_softmax(-1).topk(3).values.to(torch.float16))


# ---- shards ------------------------------------------------------------------------------------------


def shard_tensors(lengths: list[int], width: int = 2, sets: int = 1, offset: int = 0) -> dict[str, torch.Tensor]:
    """Storage tensors of examples with these token counts: at position p, set s holds ids p + offset + 100 s + i
    (i < width); token t of the shard is t + offset."""
    positions = sum(n - 1 for n in lengths)
    ids = (torch.arange(positions)[:, None, None] + offset + torch.arange(sets)[None, :, None] * 100
           + torch.arange(width)).to(torch.uint16)  # built in int64: uint16 tensors have no addition
    logprobs = torch.full((positions, sets, width), -math.log(width + 1), dtype=torch.float16)
    tokens = (torch.arange(sum(lengths)) + offset).to(torch.uint16)
    return {"ids": ids, "logprobs": logprobs, "input_ids": tokens, "lengths": torch.tensor(lengths, dtype=torch.int32)}


def test_a_shard_and_its_record(tmp_path):
    tensors = shard_tensors([3, 5])
    record = cache_writer.write_shard(tmp_path, 7, tensors, example_ids=["a", "b"])
    data = (tmp_path / "shard-00007.safetensors").read_bytes()
    assert record == {"file": "shard-00007.safetensors", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                      "examples": 2, "positions": 6, "example_ids_sha256": hashlib.sha256(b'["a", "b"]').hexdigest()}
    assert json.loads((tmp_path / "shard-00007.json").read_text()) == record
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {"example_ids": '["a", "b"]'}
    assert cache_reader._safetensors_metadata(data) == {"example_ids": '["a", "b"]'}
    assert cache_reader._safetensors_metadata(st_save({"x": torch.zeros(2)})) == {}
    assert cache_format.shard_done(tmp_path, 7, ["a", "b"])
    assert not cache_format.shard_done(tmp_path, 7, ["a", "c"])  # other examples
    assert not cache_format.shard_done(tmp_path, 6, ["a", "b"])  # no such shard


@pytest.mark.parametrize("damage", ["record-missing", "shard-missing", "record-key", "record-truncated", "size",
                                    "same-size-flip"])
def test_a_damaged_shard_is_not_done(tmp_path, damage):
    cache_writer.write_shard(tmp_path, 0, shard_tensors([3, 5]), example_ids=["a", "b"])
    shard, record = tmp_path / "shard-00000.safetensors", tmp_path / "shard-00000.json"
    if damage == "record-missing":
        record.unlink()
    elif damage == "shard-missing":
        shard.unlink()
    elif damage == "record-key":
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "bytes"}))
    elif damage == "record-truncated":
        record.write_text(record.read_text()[:20])
    elif damage == "size":
        shard.write_bytes(shard.read_bytes() + b" ")
    else:
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    assert not cache_format.shard_done(tmp_path, 0, ["a", "b"])


def test_a_shard_whose_record_names_another_digest_is_not_done(tmp_path):
    cache_writer.write_shard(tmp_path, 0, shard_tensors([3, 5]), example_ids=["a", "b"])
    record = json.loads((tmp_path / "shard-00000.json").read_text())
    (tmp_path / "shard-00000.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert not cache_format.shard_done(tmp_path, 0, ["a", "b"])


# ---- a cache written by hand ------------------------------------------------------------------------


def write_cache(root: Path, shards: list[tuple[list[str], list[int]]], fields: dict, width: int = 2,
                rationales: dict | None = None) -> Path:
    """A complete cache of these shards (example ids, token counts) in the documented layout, by hand."""
    sets = teacher_cache.stored_sets(fields)
    path = root / teacher_cache.cache_key(fields)
    path.mkdir(parents=True)
    records, offset = [], 0
    for index, (ids, lengths) in enumerate(shards):
        tensors = shard_tensors(lengths, width, sets, offset)
        offset += 1000
        data = st_save(tensors, metadata={"example_ids": json.dumps(ids)})
        name = f"shard-{index:05d}.safetensors"
        (path / name).write_bytes(data)
        record = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "examples": len(ids),
                  "positions": sum(n - 1 for n in lengths),
                  "example_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}
        (path / name.replace(".safetensors", ".json")).write_text(json.dumps(record))
        records.append(record)
    manifest = {"key": path.name, "fields": fields, "info": {}, "shards": records}
    if rationales is not None:
        manifest["rationales"] = rationales
    (path / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    return path


SHARDS = [(["a", "b"], [3, 4]), (["c"], [2])]


def test_a_cache_reads_back_each_example(tmp_path):
    path = write_cache(tmp_path, SHARDS, fields_of("topk", noise_sigma=0.5, epochs=2))
    cache = teacher_cache.open_cache(path)
    assert cache.path == path and cache.representation == "topk" and cache.sets == 2
    assert cache.fields == fields_of("topk", noise_sigma=0.5, epochs=2)
    assert cache._index == {"a": (0, 0, 0, 3), "b": (0, 3, 2, 4), "c": (1, 0, 0, 2)}
    b = cache.example("b")
    assert b.keys() == {"input_ids", "ids", "logprobs"} and b["input_ids"].dtype == torch.int64
    assert b["input_ids"].tolist() == [3, 4, 5, 6]  # the tokens after a's 3
    # b's 3 positions are shard positions 2..4, each with 2 sets of 2 ids
    assert b["ids"].tolist() == [[[p, p + 1], [p + 100, p + 101]] for p in (2, 3, 4)]
    c = cache.example("c")
    assert c["input_ids"].tolist() == [1000, 1001] and c["ids"].tolist() == [[[1000, 1001], [1100, 1101]]]
    with pytest.raises(ValueError, match=rf"^example 'z' is not in the teacher cache {path}$"):
        cache.example("z")


def test_a_batch_reads_the_epochs_set_and_pads_with_a_valid_distribution(tmp_path):
    path = write_cache(tmp_path, SHARDS, fields_of("topk", noise_sigma=0.5, epochs=3))
    cache = teacher_cache.open_cache(path)
    batch = {"ids": ["c", "b"], "input_ids": torch.tensor([[1000, 1001, 0, 0], [3, 4, 5, 6]]),
             "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}
    for epoch, s in ((1, 0), (2, 1), (3, 2), (4, 0), (5, 1)):  # epoch e reads set (e - 1) mod 3
        got = cache.batch(batch, epoch=epoch)
        assert got.keys() == {"topk_ids", "topk_logprobs"}
        ids = got["topk_ids"]
        assert ids.dtype == torch.int64 and ids.shape == (2, 3, 2)
        assert ids[0].tolist() == [[1000 + 100 * s, 1001 + 100 * s], [0, 1], [0, 1]], epoch  # c, then padding
        assert ids[1].tolist() == [[p + 100 * s, p + 1 + 100 * s] for p in (2, 3, 4)], epoch
        assert torch.equal(got["topk_logprobs"][1], torch.full((3, 2), -math.log(3), dtype=torch.float16).float())
        # padding: distinct ids 0..k-1, uniform
        assert torch.equal(got["topk_logprobs"][0, 1:], torch.full((2, 2), -math.log(2), dtype=torch.float16).float())
    assert cache.batch(batch)["topk_ids"][0, 0].tolist() == [1000, 1001]  # epoch 1 by default
    assert cache.targets(batch, epoch=2)["topk_ids"][0, 0].tolist() == [1100, 1101]
    assert cache.targets(batch)["topk_ids"][0, 0].tolist() == [1000, 1001]
    assert cache.targets(batch, "meta")["topk_ids"].device.type == "meta"
    assert cache.batch(batch, device="meta")["topk_ids"].device.type == "meta"
    assert cache.state() == {} and cache.load_state({"anything": 1}) is None


def test_a_batch_of_single_tokens_has_no_positions(tmp_path):
    cache = teacher_cache.open_cache(write_cache(tmp_path, [(["a", "b"], [1, 3])], fields_of("topk")))
    assert cache.example("a")["ids"].shape == (0, 1, 2) and cache.example("b")["input_ids"].tolist() == [1, 2, 3]
    got = cache.batch({"ids": ["a"], "input_ids": torch.tensor([[0]]), "attention_mask": torch.tensor([[1]])})
    assert got["topk_ids"].shape == (1, 0, 2) and got["topk_logprobs"].shape == (1, 0, 2)


def test_a_batch_whose_tokens_differ_from_the_cache_is_refused(tmp_path):
    path = write_cache(tmp_path, SHARDS, fields_of("topk"))
    cache = teacher_cache.open_cache(path)
    message = (rf"^example 'b': the batch's input ids differ from those in the teacher cache {path} "
               r"\(another tokenizer, max_length, prompt or rationale\?\)$")
    for tokens, mask in (([3, 4, 5, 7], [1, 1, 1, 1]), ([3, 4, 5, 6, 0], [1, 1, 1, 1, 1]), ([3, 4, 5], [1, 1, 1])):
        with pytest.raises(ValueError, match=message):
            cache.batch({"ids": ["b"], "input_ids": torch.tensor([tokens]), "attention_mask": torch.tensor([mask])})


def test_a_sampled_cache_batch_decodes_draws(tmp_path):
    fields = fields_of("sampled", num_samples=2, epochs=1)
    path = write_cache(tmp_path, [(["a"], [3])], fields)
    # the hand-made shard has ids and log-probs; a sampled one has ids and entropy
    shard = path / "shard-00000.safetensors"
    tensors = {"ids": torch.tensor([[[1, 2]], [[3, 3]]], dtype=torch.uint16), "entropy": torch.tensor([[0.5], [0.25]]),
               "input_ids": torch.tensor([7, 8, 9], dtype=torch.uint16),
               "lengths": torch.tensor([3], dtype=torch.int32)}
    data = st_save(tensors, metadata={"example_ids": '["a"]'})
    shard.write_bytes(data)
    manifest = json.loads((path / teacher_cache.MANIFEST).read_text())
    manifest["shards"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (path / teacher_cache.MANIFEST).write_text(json.dumps(manifest))
    got = teacher_cache.open_cache(path).batch({"ids": ["a"], "input_ids": torch.tensor([[7, 8, 9, 0]]),
                                                "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert got["sample_ids"].tolist() == [[[1, 2], [3, 3], [0, 0]]]
    assert got["sample_counts"].tolist() == [[[1.0, 1.0]] * 3] and got["teacher_entropy"].tolist() == [[0.5, 0.25, 0.0]]


def test_open_cache_refuses_a_missing_manifest_corrupt_shard_or_edited_fields(tmp_path):
    fields = fields_of("topk")
    path = write_cache(tmp_path, SHARDS, fields)
    shard = path / "shard-00001.safetensors"
    good = shard.read_bytes()
    record = json.loads((path / "shard-00001.json").read_text())
    shard.write_bytes(good[:-4])
    digest = hashlib.sha256(good[:-4]).hexdigest()
    with pytest.raises(ValueError, match=rf"^{shard}: sha256 {digest[:12]}\.\.\. differs from the manifest's "
                                         rf"{record['sha256'][:12]}\.\.\. \({len(good) - 4} of {len(good)} bytes; "
                                         r"corrupt or truncated\): rerun run_teacher_cache to regenerate it$"):
        teacher_cache.open_cache(path)
    shard.unlink()
    with pytest.raises(ValueError, match=rf"\(0 of {len(good)} bytes; corrupt or truncated\)"):
        teacher_cache.open_cache(path)
    shard.write_bytes(good)
    teacher_cache.open_cache(path)
    manifest = json.loads((path / teacher_cache.MANIFEST).read_text())
    edited = {**manifest, "fields": {**fields, "seed": 1}}
    (path / teacher_cache.MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=rf"^teacher cache {path}: its fields hash to key "
                                         rf"{teacher_cache.cache_key(edited['fields'])}, not the directory's name "
                                         r"\(manifest edited or the directory renamed\); regenerate it with "
                                         r"run_teacher_cache$"):
        teacher_cache.open_cache(path)
    (path / teacher_cache.MANIFEST).write_text(json.dumps({**manifest, "fields": {**fields, "format_version": 3}}))
    with pytest.raises(ValueError, match=rf"^teacher cache {path} does not fit this run: format_version: cache has 3, "
                                         r"run expects 4$"):
        teacher_cache.open_cache(path)
    (path / teacher_cache.MANIFEST).write_text(json.dumps({"fields": fields}))
    with pytest.raises(ValueError, match=rf"^{path / 'manifest.json'}: not a teacher cache manifest "
                                         r"\(no fields / shards\)$"):
        teacher_cache.open_cache(path)
    for bad in ([], {"fields": [], "shards": []}, {"fields": fields, "shards": {}}):
        (path / teacher_cache.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="not a teacher cache manifest"):
            teacher_cache.open_cache(path)
    (path / teacher_cache.MANIFEST).unlink()
    with pytest.raises(ValueError, match=rf"^{path} is not a teacher cache: manifest.json is missing "
                                         r"\(generation unfinished\?\)$"):
        teacher_cache.open_cache(path)


def test_field_differences_name_each_field_with_both_values():
    fields = {"temperature": 1.0, "seed": 0, "tokenizer": "abc", "adapter": None, "task_aware_teacher": True}
    assert teacher_cache.field_differences(fields, {"temperature": 1, "seed": 0.0, "tokenizer": "abc"}) == []
    assert teacher_cache.field_differences(fields, {"temperature": 2, "tokenizer": "abd", "adapter": "x"}) == [
        "temperature: cache has 1.0, run expects 2", "tokenizer: cache has 'abc', run expects 'abd'",
        "adapter: cache has None, run expects 'x'"]
    # integers compare exactly, also beyond float64's 2**53 (a seed is any int)
    assert teacher_cache.field_differences({"seed": 2**53}, {"seed": 2**53 + 1}) == [
        f"seed: cache has {2**53}, run expects {2**53 + 1}"]
    with pytest.raises(ValueError, match=r"^unknown cache fields \['colour', 'size'\]; known: \['adapter', 'seed', "
                                         r"'task_aware_teacher', 'temperature', 'tokenizer'\]$"):
        teacher_cache.field_differences(fields, {"size": 1, "colour": 2, "seed": 0})


def test_a_stage_directory_finds_the_one_cache_that_fits(tmp_path):
    one = write_cache(tmp_path, SHARDS, fields_of("topk", temperature=1.0))
    two = write_cache(tmp_path, SHARDS, fields_of("topk", temperature=2.0, seed=1))
    (tmp_path / "not-a-cache").mkdir()
    assert teacher_cache.find_cache(tmp_path, {"temperature": 2}) == two
    assert teacher_cache.open_cache(tmp_path, {"temperature": 1.0}).path == one
    first, second = sorted([one, two])
    with pytest.raises(ValueError, match=rf"^2 teacher caches under {tmp_path} fit this run, so which one to use is "
                                         rf"ambiguous: {first.name}, {second.name}; name the fields that tell them "
                                         r"apart \(seed, temperature\) or pass one cache directory$"):
        teacher_cache.find_cache(tmp_path, {"k": 2})
    (first / teacher_cache.MANIFEST).write_text("{")
    tau = json.loads((second / teacher_cache.MANIFEST).read_text())["fields"]["temperature"]
    with pytest.raises(ValueError) as err:
        teacher_cache.find_cache(tmp_path, {"temperature": 5, "k": 3})
    lines = str(err.value).split("\n")
    assert lines[0] == f"no teacher cache under {tmp_path} fits this run (2 found)" and len(lines) == 3
    assert lines[1].startswith(f"  {first.name}: unreadable ({first / 'manifest.json'}: not valid JSON")
    assert lines[1].endswith(")")
    assert lines[2] == f"  {second.name}: temperature: cache has {tau}, run expects 5; k: cache has 2, run expects 3"


def test_a_cache_of_an_older_format_beside_a_fitting_one_is_skipped_and_named(tmp_path):
    fits = write_cache(tmp_path, SHARDS, fields_of("topk", temperature=2.0))

    def older(seed: int) -> dict:
        fields = {name: value for name, value in fields_of("topk", seed=seed).items() if name != "epochs"}
        return {**fields, "format_version": 3}

    # an older cache that sorts before the fitting one: the search must go on past it
    seed = next(s for s in range(1, 50) if teacher_cache.cache_key(older(s)) < fits.name)
    old = write_cache(tmp_path, SHARDS, older(seed))
    assert teacher_cache.find_cache(tmp_path, {"temperature": 2.0, "epochs": 1}) == fits
    shutil.rmtree(fits)
    with pytest.raises(ValueError) as err:
        teacher_cache.find_cache(tmp_path, {"temperature": 2.0, "epochs": 1})
    assert str(err.value).split("\n") == [f"no teacher cache under {tmp_path} fits this run (1 found)",
                                          f"  {old.name}: cache format 3, this version reads 4 (regenerate it)"]


# ---- rationales -------------------------------------------------------------------------------------


def example(i: int, rationale: str | None = None, complete: bool = True) -> Example:
    return Example(f"ex-{i}", "gsm8k", "math", f"question {i}", "", str(i), rationale, complete)


def test_rationales_are_stored_as_jsonl_and_recorded_in_the_manifest(tmp_path):
    paths = [write_cache(tmp_path, SHARDS, fields_of("topk", temperature=t)) for t in (1.0, 2.0)]
    mix = [example(0), example(1)]
    generated = [example(1, "cut", False), example(0, "2 + 2 é 4", True)]
    teacher_cache.write_rationales(paths, mix, generated, max_new_tokens=16)
    text = ('{"id": "ex-1", "rationale": "cut", "complete": false}\n'
            '{"id": "ex-0", "rationale": "2 + 2 é 4", "complete": true}\n')
    for path in paths:
        assert (path / "rationales.jsonl").read_bytes() == text.encode()
        manifest_text = (path / teacher_cache.MANIFEST).read_text()
        manifest = json.loads(manifest_text)
        assert manifest["rationales"] == {"file": "rationales.jsonl",
                                          "sha256": hashlib.sha256(text.encode()).hexdigest(), "max_new_tokens": 16,
                                          "mix_fingerprint": mix_fingerprint(mix), "examples": 2}
        assert manifest_text.startswith('{\n "key": ')  # indented by one, as the generator writes it
        assert not cache_format.rationales_missing(path, 16, mix)
        assert teacher_cache.open_cache(path).rationales() == {
            "ex-0": {"id": "ex-0", "rationale": "2 + 2 é 4", "complete": True},
            "ex-1": {"id": "ex-1", "rationale": "cut", "complete": False}}
    cached = teacher_cache.cached_rationales(tmp_path, mix, 16, expect={"temperature": 2.0})
    assert cached == [Example("ex-0", "gsm8k", "math", "question 0", "", "0", "2 + 2 é 4", True),
                      Example("ex-1", "gsm8k", "math", "question 1", "", "1", "cut", False)]
    with pytest.raises(ValueError, match=rf"^no teacher cache under {tmp_path} fits this run \(2 found\)"):
        teacher_cache.cached_rationales(tmp_path, mix, 16, expect={"temperature": 3.0})
    # a cache directory named directly is checked against expect too
    with pytest.raises(ValueError, match=rf"^teacher cache {paths[0]} does not fit this run: temperature: cache has "
                                         r"1\.0, run expects 3\.0$"):
        teacher_cache.cached_rationales(paths[0], mix, 16, expect={"temperature": 3.0})
    # a stage's caches hold the same rationales: with no fields to tell them apart, the first is read
    assert [e.rationale for e in teacher_cache.cached_rationales(tmp_path, mix, 16)] == ["2 + 2 é 4", "cut"]


def test_missing_stale_or_corrupt_rationales_are_detected(tmp_path):
    path = write_cache(tmp_path, SHARDS, fields_of("topk"))
    mix = [example(0)]
    assert cache_format.rationales_missing(path, 16, mix)  # none recorded
    assert cache_format.rationales_missing(tmp_path / "absent", 16, mix)
    with pytest.raises(ValueError, match=rf"^teacher cache {path} holds no rationales "
                                         r"\(run_teacher_cache\(rationales=True\)\)$"):
        teacher_cache.open_cache(path).rationales()
    teacher_cache.write_rationales([path], mix, [example(0, "r")], max_new_tokens=16)
    assert not cache_format.rationales_missing(path, 16, mix)
    assert cache_format.rationales_missing(path, 8, mix)  # another budget
    assert cache_format.rationales_missing(path, 16, [example(1)])  # another mix
    with pytest.raises(ValueError, match=rf"^the rationales in teacher cache {path} do not fit this run: "
                                         r"max_new_tokens: cache has 16, run expects 8$"):
        teacher_cache.cached_rationales(path, mix, 8)
    with pytest.raises(ValueError, match=rf"do not fit this run: mix_fingerprint: cache has '{mix_fingerprint(mix)}', "
                                         rf"run expects '{mix_fingerprint([example(1)])}'$"):
        teacher_cache.cached_rationales(path, [example(1)], 16)
    with pytest.raises(ValueError, match=r"do not fit this run: max_new_tokens: cache has 16, run expects 8; "
                                         r"mix_fingerprint: cache has '[0-9a-f]{16}', run expects '[0-9a-f]{16}'$"):
        teacher_cache.cached_rationales(path, [example(1)], 8)
    (path / "rationales.jsonl").write_text('{"id": "ex-0", "rationale": "R", "complete": true}\n')
    assert cache_format.rationales_missing(path, 16, mix)
    with pytest.raises(ValueError, match=rf"^{path / 'rationales.jsonl'}: sha256 differs from the manifest's "
                                         r"\(corrupt file\); regenerate the cache$"):
        teacher_cache.open_cache(path).rationales()
    (path / "rationales.jsonl").unlink()
    assert cache_format.rationales_missing(path, 16, mix)


# ---- identity -----------------------------------------------------------------------------------------


def test_weights_hash_covers_configs_and_weights_only(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    files = {"config.json": b"{}", "adapter_config.json": b"{1}", "model.safetensors": b"w1", "extra.bin": b"w2",
             "a.pt": b"w3", "b.gguf": b"w4"}
    for name, content in files.items():
        (model / name).write_bytes(content)
    (model / "README.md").write_text("not hashed")
    (model / "tokenizer.json").write_text("not hashed")
    (model / "sub.safetensors").mkdir()  # a directory, not a weight file
    parts = [[name, hashlib.sha256(files[name]).hexdigest()] for name in sorted(files)]
    expected = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    assert teacher_cache.weights_hash(model) == expected
    # each file's digest is memoised under path, size and mtime
    memo_path = tmp_path / "kd-cache" / "weight-hashes.json"
    memo = json.loads(memo_path.read_text())
    assert memo_path.read_text().startswith('{\n"')  # indent=0: one entry per line
    stat = (model / "extra.bin").stat()
    key = f"{(model / 'extra.bin').resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    assert memo[key] == hashlib.sha256(b"w2").hexdigest() and len(memo) == len(files)
    # a memoised digest is trusted, not recomputed (the memo is the point: a model is read once)
    memo[key] = "f" * 64
    memo_path.write_text(json.dumps(memo))
    parts[[p[0] for p in parts].index("extra.bin")][1] = "f" * 64
    assert teacher_cache.weights_hash(model) == hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    assert json.loads(memo_path.read_text())[key] == "f" * 64
    # a damaged memo only costs rehashing
    memo_path.write_text("{")
    assert teacher_cache.weights_hash(model) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^{empty} holds no weight files \(\.safetensors, \.bin, \.pt, \.gguf\)$"):
        teacher_cache.weights_hash(empty)


def test_an_unchanged_memo_is_not_rewritten(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    teacher_cache.weights_hash(model)
    memo_path = tmp_path / "kd-cache" / "weight-hashes.json"
    memo_path.write_text(memo_path.read_text() + " ")  # marks the file: a rewrite would drop the space
    teacher_cache.weights_hash(model)
    assert memo_path.read_text().endswith("} ")


def test_teacher_identity_hashes_the_adapter_only_for_a_task_aware_teacher(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    teacher = teacher_cache.weights_hash(tiny_model_dir)
    assert teacher_cache.teacher_identity(tiny_model_dir, adapter) == {
        "teacher": teacher, "adapter": teacher_cache.weights_hash(adapter), "task_aware_teacher": True}
    assert teacher_cache.teacher_identity(tiny_model_dir, adapter, task_aware_teacher=False) == {
        "teacher": teacher, "adapter": None, "task_aware_teacher": False}
    assert teacher_cache.teacher_identity(tiny_model_dir) == {"teacher": teacher, "adapter": None,
                                                              "task_aware_teacher": True}


# ---- the stage, on the tiny model ---------------------------------------------------------------------


def test_the_stage_defaults_summary_and_manifest(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Plain parameters, every default: what is selected, generated, recorded and summarised."""
    calls = []
    generate = teacher_cache.generate_cache

    def spy(model, tokenizer, examples, **kwargs):
        calls.append((kwargs["batch_size"], kwargs["shard_size"]))
        return generate(model, tokenizer, examples, **kwargs)

    clock = iter([100.0, 102.345678])
    monkeypatch.setattr(teacher_cache, "generate_cache", spy)
    monkeypatch.setattr(teacher_cache.time, "perf_counter", lambda: next(clock))
    summary = teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", data_dir=data_dir)
    # the rows run_training selects with the same defaults: the math mix, all of it, 10% held out with seed 0
    mix, _ = build_training_mix("math", data_dir, include_mawps=False)
    train, _ = batches.split_train_val(sample_examples(mix, None, 0), 0.1, 0)
    tok = models.load_tokenizer(tiny_model_dir)
    fields = {"format_version": 4, "teacher": teacher_cache.weights_hash(tiny_model_dir), "adapter": None,
              "task_aware_teacher": True, "tokenizer": teacher_cache.tokenizer_fingerprint(tok),
              "mix_fingerprint": mix_fingerprint(train), "max_length": 256, "representation": "topk_sampled", "k": 4,
              "num_samples": 20, "temperature": 1.0, "noise_sigma": 0.0, "seed": 0, "epochs": 1,
              "logprob_dtype": "float16", "id_coding": "fixed", "vocab_size": len(tok.get_vocab())}
    path = tmp_path / "c" / teacher_cache.cache_key(fields)
    positions = sum(len(batches.tokenize_example(tok, e, 256)["input_ids"]) - 1 for e in train)
    size = (path / "shard-00000.safetensors").stat().st_size
    manifest = json.loads((path / teacher_cache.MANIFEST).read_text())
    assert manifest["fields"] == fields and "rationales" not in manifest and len(manifest["shards"]) == 1
    assert manifest["info"] == {"precision": "fp32", "teacher": str(tiny_model_dir), "teacher_adapter": None,
                                "domain": "math", "n_train": None, "include_mawps": False, "val_fraction": 0.1,
                                "train_examples": len(train)}
    assert calls == [(8, 256)]
    per_token = round(size / positions, 2)
    assert summary == {
        "caches": {(1.0, 0.0): str(path)},
        "per_cache": [{"temperature": 1.0, "noise_sigma": 0.0, "cache_dir": str(path), "positions": positions,
                       "shards": 1, "bytes": size, "epoch_sets": 1, "bytes_per_token": per_token,
                       "bytes_per_token_per_set": per_token}],
        "representation": "topk_sampled", "k": 4, "num_samples": 20, "train_examples": len(train),
        "positions": positions, "bytes_per_token": per_token, "bytes_per_token_per_set": per_token,
        "generated": [str(path)], "rationales": False, "seconds": 2.35, "precision": "fp32"}
    assert not (path / teacher_cache.RATIONALES).exists()


def test_the_stage_writes_one_cache_per_setting_and_reuses_complete_ones(tiny_model_dir, data_dir, tmp_path,
                                                                         monkeypatch):
    params = dict(data_dir=data_dir, representation="topk", k=3, temperatures=(1, 2), noise_sigmas=(0, 0.5), epochs=2,
                  max_length=8, shard_size=1, batch_size=1, val_fraction=0.25, n_train=3, seed=1, include_mawps=True,
                  teacher_adapter=str(tmp_path / "ignored"), task_aware_teacher=False)  # the base: no adapter
    summary = teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", **params)
    # 3 of the mix with MAWPS drawn with seed 1, a quarter of them held out
    mix, _ = build_training_mix("math", data_dir, include_mawps=True)
    train, _ = batches.split_train_val(sample_examples(mix, 3, 1), 0.25, 1)
    assert [e.id for e in train] == ["gsm8k-train-1", "mawps-train-0"]
    settings = [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (2.0, 0.5)]
    assert list(summary["caches"]) == settings and summary["generated"] == list(summary["caches"].values())
    assert summary["train_examples"] == 2 and summary["k"] == 3 and summary["num_samples"] is None
    for (tau, sigma), row in zip(settings, summary["per_cache"]):
        path = Path(summary["caches"][tau, sigma])
        manifest = json.loads((path / teacher_cache.MANIFEST).read_text())
        assert (manifest["fields"]["temperature"], manifest["fields"]["noise_sigma"]) == (tau, sigma)
        assert manifest["fields"]["mix_fingerprint"] == mix_fingerprint(train) and manifest["fields"]["seed"] == 1
        assert manifest["info"]["include_mawps"] is True and manifest["info"]["n_train"] == 3
        assert teacher_cache.open_cache(path)._index.keys() == {"gsm8k-train-1", "mawps-train-0"}
        assert manifest["fields"]["adapter"] is None and manifest["info"]["teacher_adapter"] is None
        size = sum((path / r["file"]).stat().st_size for r in manifest["shards"])
        sets = 2 if sigma else 1  # topk: only noise makes a set per epoch
        assert row == {"temperature": tau, "noise_sigma": sigma, "cache_dir": str(path),
                       "positions": manifest["positions"], "shards": 2, "bytes": size, "epoch_sets": sets,
                       "bytes_per_token": round(size / manifest["positions"], 2),
                       "bytes_per_token_per_set": round(size / manifest["positions"] / sets, 2)}
    # the summary's own figures are the first setting's (one set; the noisy ones store two)
    first = summary["per_cache"][0]
    assert summary["bytes_per_token"] == first["bytes_per_token"] != summary["per_cache"][1]["bytes_per_token"]
    assert summary["bytes_per_token_per_set"] == first["bytes_per_token_per_set"]
    assert summary["positions"] == first["positions"]

    def no_teacher(*args, **kwargs):
        raise AssertionError("a complete cache needs no teacher")

    monkeypatch.setattr(teacher_cache, "load_model", no_teacher)
    again = teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", **params)
    assert again["generated"] == [] and again["caches"] == summary["caches"]


@pytest.mark.parametrize("overrides, message", [
    (dict(shard_size=0), r"^shard_size and batch_size must be ints >= 1, got 0, 8$"),
    (dict(batch_size=0), r"^shard_size and batch_size must be ints >= 1, got 256, 0$"),
    (dict(shard_size=2.0), r"^shard_size and batch_size must be ints >= 1, got 2\.0, 8$"),
    (dict(batch_size=2.0), r"^shard_size and batch_size must be ints >= 1, got 256, 2\.0$"),
    (dict(max_length=7), r"^max_length must be >= 8, got 7$"),
    (dict(k=0), r"^k must be an int >= 1, got 0$"),
    (dict(num_samples=0), r"^num_samples must be an int >= 1, got 0$"),
    (dict(temperatures=[]), r"^temperatures and noise_sigmas must each hold at least one value$"),
    (dict(noise_sigmas=[]), r"^temperatures and noise_sigmas must each hold at least one value$"),
    (dict(epochs=0), r"^epochs must be an int >= 1, got 0$"),
    (dict(id_coding="varint"), r"^id_coding='varint' is not one of fixed, elias_fano$"),
    (dict(representation="dense"), r"^representation='dense' is not one of topk, sampled, topk_sampled$"),
    (dict(n_train=0), r"^the selection holds no training examples$"),
])
def test_the_stage_refuses_bad_parameters_before_any_work(tiny_model_dir, data_dir, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", data_dir=data_dir, **overrides)
    assert not (tmp_path / "c").exists()


def test_the_stage_stores_the_teachers_rationales_once(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from kd_utils import teachers

    calls = []
    vocab = models.load_tokenizer(tiny_model_dir).get_vocab()

    def rationales(model, tokenizer, examples, max_new_tokens, batch_size, precision):
        # the teacher and its tokenizer generate
        assert model.config.vocab_size >= len(vocab) and tokenizer.get_vocab() == vocab
        calls.append((len(examples), max_new_tokens, batch_size))
        return [Example(e.id, e.task, e.domain, e.instruction, e.input, e.answer, f"r{e.id}", True) for e in examples]

    monkeypatch.setattr(teachers, "teacher_rationales", rationales)
    params = dict(data_dir=data_dir, representation="topk", k=2, max_length=16, val_fraction=0.25, batch_size=3)
    teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", **params)
    assert calls == []  # not asked for
    summary = teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", rationales=True, **params)
    mix = teacher_cache.select_examples("math", n_train=None, include_mawps=False, data_dir=data_dir, seed=0,
                                           val_fraction=0.25).mix
    assert calls == [(len(mix), 128, 3)] and summary["generated"] == [] and summary["rationales"] is True
    path = only_cache(summary)
    record = json.loads((path / teacher_cache.MANIFEST).read_text())["rationales"]
    assert record["max_new_tokens"] == 128 and record["mix_fingerprint"] == mix_fingerprint(mix)
    teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", rationales=True, **params)
    assert len(calls) == 1  # stored and intact: not generated again
    teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", rationales=True,
                                    rationale_max_new_tokens=4, **params)
    assert calls[-1] == (len(mix), 4, 3)


def only_cache(summary: dict) -> Path:
    (path,) = summary["caches"].values()
    return Path(path)


def test_training_refuses_a_method_a_cache_cannot_serve(tiny_model_dir, data_dir, tmp_path):
    path = only_cache(teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", data_dir=data_dir,
                                                      representation="sampled", num_samples=2, max_length=16,
                                                      val_fraction=0.25))
    examples = teacher_cache.select_examples("math", n_train=None, include_mawps=False, data_dir=data_dir, seed=0,
                                           val_fraction=0.25).train
    run = dict(tokenizer=models.load_tokenizer(tiny_model_dir), train_examples=examples, temperature=1.0,
               noise_sigma=0.0, max_length=16, epochs=1)
    assert teacher_cache.open_for_training(path, method="fkl", **run).path == path
    topk = only_cache(teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", data_dir=data_dir,
                                                      representation="topk", k=2, max_length=16, val_fraction=0.25))
    assert teacher_cache.open_for_training(topk, method="rkl", **run).path == topk
    with pytest.raises(ValueError, match=rf"^method 'rkl' needs a 'topk' teacher cache \(the top-k \+ tail "
                                         rf"partition\); {path} holds representation 'sampled'$"):
        teacher_cache.open_for_training(path, method="rkl", **run)
    with pytest.raises(ValueError, match=r"^method 'gkd' cannot train from teacher_cache: gkd's on-policy batches "
                                         r"need the online teacher: pass teacher instead of teacher_cache$"):
        teacher_cache.open_for_training(path, method="gkd", **run)
    with pytest.raises(ValueError, match=r"^method 'seqkd' cannot train from teacher_cache: a teacher cache serves "
                                         r"fkl and rkl only$"):
        teacher_cache.open_for_training(path, method="seqkd", **run)
    with pytest.raises(ValueError, match=r"does not fit this run: max_length: cache has 16, run expects 8; "
                                         r"epochs: cache has 1, run expects 2; seed: cache has 0, run expects 1$"):
        teacher_cache.open_for_training(path, method="fkl", **{**run, "max_length": 8, "epochs": 2},
                                        expect={"seed": 1})


def test_the_script_entry_point_runs_the_stage_from_a_params_file(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(teacher_cache, "run_teacher_cache", lambda **params: calls.append(params))
    (tmp_path / "params.json").write_text(json.dumps({"resolved": {"teacher": "t", "output_dir": "o", "k": 2}}))
    teacher_cache.main([str(tmp_path / "params.json"), "--output-dir", str(tmp_path / "out")])
    assert calls == [{"teacher": "t", "output_dir": str(tmp_path / "out"), "k": 2}]
    with pytest.raises(SystemExit):
        teacher_cache.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m kd_utils.teacher_cache [-h]")


def test_unbiased_variance_floor_by_hand():
    """Threshold t with sum_v min(1, p_v / t) = n; floor = sum over p_v < t of p_v (t - p_v)."""
    p = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.1],  # t = 1/2: nothing kept exactly; 0.5 - 0.28
                      [0.7, 0.1, 0.1, 0.05, 0.05],  # 0.7 kept, t = 0.3 for the rest: 0.09 - 0.025
                      [0.05, 0.1, 0.7, 0.05, 0.1],  # the same, unsorted
                      [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)  # 0.5 - 0.2
    floor = teacher_cache.unbiased_variance_floor(p, 2)
    assert floor.dtype == torch.float64 and floor.tolist() == pytest.approx([0.22, 0.065, 0.065, 0.3], abs=1e-12)
    # n = 3: 0.6 and 0.25 kept exactly, t = 0.15 for the rest: 0.15 * 0.15 - (0.01 + 0.0025)
    three = teacher_cache.unbiased_variance_floor(torch.tensor([[0.6, 0.25, 0.1, 0.05, 0.0]], dtype=torch.float64), 3)
    assert three.tolist() == pytest.approx([0.01], abs=1e-12)
    # n >= V: every id is kept exactly
    assert teacher_cache.unbiased_variance_floor(p, 5).tolist() == [0.0] * 4
    uniform = torch.full((1, 50), 1 / 50, dtype=torch.float64)
    assert teacher_cache.unbiased_variance_floor(uniform, 50).tolist() == [0.0]  # exactly: no rounding of sums
    assert teacher_cache.unbiased_variance_floor(p, 9).dtype == torch.float64
    # on p's device (meta: shapes only), whichever branch
    for n in (2, 5):
        on_meta = teacher_cache.unbiased_variance_floor(p.to("meta"), n)
        assert on_meta.device.type == "meta" and on_meta.shape == (4,)


def test_select_examples_is_run_trainings_selection(data_dir):
    mix, _ = build_training_mix("math", data_dir, include_mawps=True)
    sampled = sample_examples(mix, 4, 2)
    train, val = batches.split_train_val(sampled, 0.25, 2)
    selection = teacher_cache.select_examples("math", n_train=4, include_mawps=True, data_dir=data_dir, seed=2,
                                              val_fraction=0.25)
    assert (selection.mix, selection.train, selection.val) == (sampled, train, val)
    assert [e.id for e in selection.val] == ["gsm8k-train-1"]


class FakeTokenizer:
    eos_token_id, pad_token_id = 2, 0

    def get_vocab(self) -> dict[str, int]:
        return {"b": 1, "a": 0, "é": 2}


def test_the_tokenizer_fingerprint_covers_vocabulary_and_special_ids():
    content = '{"vocab": [["a", 0], ["b", 1], ["é", 2]], "eos": 2, "pad": 0}'
    assert teacher_cache.tokenizer_fingerprint(FakeTokenizer()) == hashlib.sha256(content.encode()).hexdigest()[:20]


def test_a_task_aware_cache_holds_the_adapted_teachers_distributions(tiny_model_dir, data_dir, tmp_path):
    """The teacher's LoRA adapter is merged before the forward passes: the stored log-probs are the adapted model's."""
    from peft import LoraConfig, get_peft_model

    base, tok = models.load_model(tiny_model_dir)
    torch.manual_seed(0)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    vocab = len(tok.get_vocab())
    params = dict(data_dir=data_dir, representation="topk", k=vocab, max_length=16, val_fraction=0.25, n_train=2)
    path = only_cache(teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c",
                                                      teacher_adapter=str(tmp_path / "adapter"), **params))
    cache = teacher_cache.open_cache(path)
    assert cache.fields["adapter"] == teacher_cache.weights_hash(tmp_path / "adapter")
    assert cache.manifest["info"]["teacher_adapter"] == str(tmp_path / "adapter")
    stored = cache.example(next(iter(cache._index)))
    with torch.no_grad():
        logits = adapted(input_ids=stored["input_ids"][None]).logits[0, :-1, :vocab]
    expected = logits.double().log_softmax(-1).gather(1, stored["ids"][:, 0].long())
    assert torch.allclose(stored["logprobs"][:, 0].double(), expected, atol=2e-3)
    with torch.no_grad():
        plain = adapted.get_base_model()  # the adapter's effect is large enough to tell the two apart
        with adapted.disable_adapter():
            unadapted = plain(input_ids=stored["input_ids"][None]).logits[0, :-1, :vocab]
    assert not torch.allclose(unadapted.double().log_softmax(-1).gather(1, stored["ids"][:, 0].long()), expected,
                              atol=2e-2)


def test_a_hub_model_is_hashed_in_its_local_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", {"org/model": str(snapshot)}.__getitem__)
    assert teacher_cache.model_dir("org/model") == snapshot
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text("{}")
    assert teacher_cache.model_dir(tmp_path / "local") == tmp_path / "local"
