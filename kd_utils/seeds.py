"""Named random streams: each random stream of a run is seeded from (the run's seed, the stream's name).

Drawing more from one stream, or adding one, never shifts another, and no stream of seed 0 is a stream of
seed 1 (as ``seed + 1`` would make it). ``teacher_cache.example_generator`` seeds its per-example draws
the same way, from (seed, example id, purpose).
"""

from __future__ import annotations

import hashlib

TEACHER_NOISE = "teacher_noise"  # the online teacher's Gaussian logit noise (the noise ablation)
ON_POLICY = "on_policy"  # gkd: whether a micro batch is replaced by the student's own samples


def stream_seed(seed: int, *names: str) -> int:
    """A 63-bit seed for the stream ``names`` of a run seeded ``seed``."""
    digest = hashlib.sha256("\0".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
