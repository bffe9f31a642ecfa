"""kd_utils.id_codes: Elias-Fano codes of sorted ids are exact, of the stated size, and refuse bad input."""

import pytest
import torch

from kd_utils import id_codes

QWEN, SMOL = 151_936, 49_152  # vocabulary sizes of Qwen2.5 and SmolLM2


def round_trip(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    codes = id_codes.encode(ids, vocab_size)
    assert codes.dtype == torch.uint8 and codes.shape == (ids.shape[0], id_codes.code_bytes(ids.shape[1], vocab_size))
    return id_codes.decode(codes, ids.shape[1], vocab_size)


@pytest.mark.parametrize("vocab_size", [QWEN, SMOL, 50, 1])
@pytest.mark.parametrize("n", [1, 2, 20, 28, 64])
def test_decode_of_encode_is_the_ids_including_edge_cases(vocab_size, n):
    top = vocab_size - 1
    rows = [torch.zeros(n), torch.full((n,), top), torch.full((n,), min(7, top))]  # id 0, the max id, all equal
    rows.append(torch.tensor([0] * (n // 2) + [top] * (n - n // 2)))  # duplicates at both ends, the widest gap
    gen = torch.Generator().manual_seed(n)
    rows += list(torch.randint(0, vocab_size, (200, n), generator=gen).sort(-1).values)  # random, with duplicates
    ids = torch.stack([r.long() for r in rows])
    assert torch.equal(round_trip(ids, vocab_size), ids)


def test_code_sizes():
    # ~2 + log2(V / n) bits per id: 20 ids of SmolLM2 in 33 bytes (uint16: 40); of Qwen2.5 in 38 (int32: 80)
    assert id_codes.code_bytes(20, SMOL) == 33 and id_codes.code_bytes(20, QWEN) == 38
    for n, vocab_size in [(1, 1), (3, 50), (20, SMOL), (26, SMOL), (20, QWEN), (100, QWEN)]:
        low = id_codes.low_bits(n, vocab_size)
        assert 2 ** low <= vocab_size / n < 2 ** (low + 1)  # l = floor(log2(V / n))
        assert id_codes.code_bits(n, vocab_size) == n * (low + 1) + ((vocab_size - 1) >> low) + 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sorted"):
        id_codes.encode(torch.tensor([[5, 3]]), 10)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        id_codes.encode(torch.tensor([[3, 10]]), 10)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        id_codes.encode(torch.tensor([[-1, 3]]), 10)
    codes = id_codes.encode(torch.tensor([[1, 2, 3]]), 100)
    with pytest.raises(ValueError, match="codes must be uint8"):
        id_codes.decode(codes[:, :-1], 3, 100)
    with pytest.raises(ValueError, match="corrupt code"):
        id_codes.decode(torch.zeros_like(codes), 3, 100)
