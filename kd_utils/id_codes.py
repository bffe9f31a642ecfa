"""Elias-Fano codes for sorted token ids: exact, fixed size, about 2 + log2(V / n) bits per id.

n sorted ids (duplicates allowed) from a vocabulary of V are split into l = floor(log2(V / n))
low bits, stored as they are, and a high part h = id >> l, stored in unary: bit h_i + i of an
n + (V - 1) // 2^l + 1 bit vector is set for the i-th id. Every row of a batch takes the same
number of bytes (``code_bytes``), so codes stack into one uint8 tensor. For V = 49,152
(SmolLM2) 20 ids take 33 bytes where uint16 ids take 40; for V = 151,936 (Qwen2.5) 20 ids
take 38 bytes where int32 ids take 80.
"""

from __future__ import annotations

import torch


def low_bits(n: int, vocab_size: int) -> int:
    """l = floor(log2(vocab_size / n)), 0 when n >= vocab_size."""
    return max(0, (vocab_size // n).bit_length() - 1)


def code_bits(n: int, vocab_size: int) -> int:
    low = low_bits(n, vocab_size)
    return n * low + n + ((vocab_size - 1) >> low) + 1


def code_bytes(n: int, vocab_size: int) -> int:
    """Bytes of the code of n ids from a vocabulary of vocab_size."""
    return -(-code_bits(n, vocab_size) // 8)


def _check(n: int, vocab_size: int) -> None:
    if not (isinstance(n, int) and n >= 1 and isinstance(vocab_size, int) and vocab_size >= 1):
        raise ValueError(f"need n >= 1 ids and vocab_size >= 1, got n={n!r}, vocab_size={vocab_size!r}")


def encode(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sorted ids [P, n] (each row non-decreasing, in [0, vocab_size)) -> uint8 codes [P, code_bytes(n, vocab_size)]."""
    ids = ids.long()
    P, n = ids.shape
    _check(n, vocab_size)
    if ((ids < 0) | (ids >= vocab_size)).any():
        raise ValueError(f"ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
    if (ids.diff(dim=1) < 0).any():
        raise ValueError("ids must be sorted (non-decreasing) within each row")
    low = low_bits(n, vocab_size)
    shifts = torch.arange(low)
    low_part = ((ids[..., None] >> shifts) & 1).flatten(1)  # [P, n * low], least significant bit first
    upper = torch.zeros(P, code_bits(n, vocab_size) - n * low, dtype=torch.long)
    upper.scatter_(1, (ids >> low) + torch.arange(n), 1)  # strictly increasing positions: one bit per id
    bits = torch.cat([low_part, upper], 1)
    bits = torch.nn.functional.pad(bits, (0, code_bytes(n, vocab_size) * 8 - bits.shape[1]))
    return (bits.view(P, -1, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def decode(codes: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """uint8 codes [P, code_bytes(n, vocab_size)] -> the sorted ids [P, n] (int64) they encode."""
    _check(n, vocab_size)
    P = codes.shape[0]
    if codes.dtype != torch.uint8 or codes.shape[1:] != (code_bytes(n, vocab_size),):
        raise ValueError(f"codes must be uint8 [P, {code_bytes(n, vocab_size)}] for {n} ids of a vocabulary of "
                         f"{vocab_size}, got {codes.dtype} {tuple(codes.shape)}")
    low = low_bits(n, vocab_size)
    bits = ((codes.long()[..., None] >> torch.arange(8)) & 1).flatten(1)
    low_part = (bits[:, :n * low].view(P, n, low) << torch.arange(low)).sum(-1)
    upper = bits[:, n * low:code_bits(n, vocab_size)]
    rows, positions = upper.nonzero(as_tuple=True)
    if not torch.equal(torch.bincount(rows, minlength=P), torch.full((P,), n)):
        raise ValueError(f"corrupt code: a row's high part does not hold exactly {n} ids")
    high = positions.view(P, n) - torch.arange(n)
    return (high << low) | low_part
