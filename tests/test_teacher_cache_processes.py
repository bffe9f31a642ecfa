"""The teacher cache across processes: two ranks writing shards, a SIGKILLed writer.

Apart from tests/test_teacher_cache.py because each starts Python afresh: ~20 s together,
which every mutant of the cache modules would pay again. Its mutation run (pyproject.toml) leaves
them out; what they exercise beyond the in-process tests is mostly generate_cache's rank loop, which
mutmut does not mutate (a decorated function), and the atomic writes of kd_utils/io.py (tests/test_io.py).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from kd_utils import teacher_cache

COMMON = dict(max_length=96, val_fraction=0.25, seed=0)


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    """Keep the weight-hash memo of these tests out of the user's cache."""
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


def only_cache(summary: dict) -> Path:
    (path,) = summary["caches"].values()
    return Path(path)


def test_two_processes_write_the_cache_one_process_writes(tiny_model_dir, data_dir, tmp_path):
    """2 CPU processes as ``accelerate launch --cpu`` starts them: each rank writes its own shards."""
    import subprocess
    import sys

    params = dict(representation="topk_sampled", k=4, num_samples=6, temperatures=(1.0, 2.0), noise_sigmas=(0.0, 0.5))
    script = tmp_path / "generate.py"
    script.write_text(
        "import json, sys\nfrom accelerate import PartialState\nfrom kd_utils import cache_writer, teacher_cache\n"
        "write = cache_writer.write_shard\n"
        "def logged(cache, index, *args, **kwargs):\n"
        "    state = PartialState()\n"
        "    with open(sys.argv[4], 'a') as log:\n"
        "        log.write(json.dumps([state.process_index, state.num_processes, index]) + '\\n')\n"
        "    return write(cache, index, *args, **kwargs)\n"
        "cache_writer.write_shard = logged\n"
        f"teacher_cache.run_teacher_cache(sys.argv[1], sys.argv[2], data_dir=sys.argv[3], shard_size=2, batch_size=2,"
        f" max_length=96, val_fraction=0.25, seed=0, **{params!r})\n")
    log = tmp_path / "writes.jsonl"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_model_dir), str(tmp_path / "two"), str(data_dir), str(log)],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    writes = [json.loads(line) for line in log.read_text().splitlines()]
    assert {world for _, world, _ in writes} == {2}
    assert all(index % 2 == rank for rank, _, index in writes)  # shard i is rank i % 2's
    assert {rank for rank, _, _ in writes} == {0, 1}

    # one process, through the script entry point and a params file
    arguments = dict(teacher=str(tiny_model_dir), output_dir=str(tmp_path / "one"), data_dir=str(data_dir),
                     shard_size=2, batch_size=2, max_length=96, val_fraction=0.25, seed=0, **params)
    (tmp_path / "params.json").write_text(json.dumps({"resolved": arguments}))
    done = subprocess.run([sys.executable, "-m", "kd_utils.teacher_cache", str(tmp_path / "params.json")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    caches = sorted((tmp_path / "one").iterdir())
    assert [c.name for c in caches] == sorted(c.name for c in (tmp_path / "two").iterdir())  # same keys
    shards = len(json.loads((caches[0] / teacher_cache.MANIFEST).read_text())["shards"])
    assert len(caches) == 4 and len(writes) == 4 * shards
    for path in caches:
        other = tmp_path / "two" / path.name
        manifest = json.loads((other / teacher_cache.MANIFEST).read_text())
        assert manifest["shards"] == json.loads((path / teacher_cache.MANIFEST).read_text())["shards"]
        assert len(manifest["shards"]) >= 3
        for record in manifest["shards"]:
            assert (other / record["file"]).read_bytes() == (path / record["file"]).read_bytes()
        teacher_cache.open_cache(other)


def test_a_killed_writer_leaves_a_cache_that_regenerates_cleanly(tiny_model_dir, data_dir, tmp_path):
    """A writer SIGKILLed inside a write (data in the temporary file, not yet renamed): the rerun completes it."""
    import signal
    import subprocess
    import sys

    params = dict(representation="topk", k=4, shard_size=2, batch_size=2, data_dir=str(data_dir), **COMMON)
    script = tmp_path / "killed.py"
    script.write_text(
        "import json, os, signal, sys\nfrom kd_utils import io, teacher_cache\n"
        "real_fsync = os.fsync\n"
        "def fsync(fd):  # die inside shard 1's write: its bytes in the temporary file, not yet renamed\n"
        "    if '.shard-00001.safetensors.' in os.readlink(f'/proc/self/fd/{fd}'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real_fsync(fd)\n"
        "os.fsync = fsync\n"
        "teacher_cache.run_teacher_cache(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))\n")
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "kd-cache")}
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "c"), json.dumps(params)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (path,) = (tmp_path / "c").iterdir()
    assert not (path / teacher_cache.MANIFEST).exists() and not (path / "shard-00001.safetensors").exists()
    assert (path / "shard-00000.json").is_file()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        teacher_cache.open_cache(path)
    summary = teacher_cache.run_teacher_cache(str(tiny_model_dir), tmp_path / "c", **{**params, "data_dir": data_dir})
    cache = teacher_cache.open_cache(only_cache(summary))
    clean = teacher_cache.open_cache(only_cache(teacher_cache.run_teacher_cache(
        str(tiny_model_dir), tmp_path / "clean", **{**params, "data_dir": data_dir})))
    assert cache.path == path and cache._index.keys() == clean._index.keys()
    for example_id in clean._index:
        new, old = cache.example(example_id), clean.example(example_id)
        assert new.keys() == old.keys(), example_id
        for name in new:
            assert torch.equal(new[name], old[name]), (example_id, name, new[name], old[name])
