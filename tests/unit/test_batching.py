import numpy as np
import pytest

from sif_inference.batching import iter_batch, length_sorted_batches, padding_waste


def test_iter_batch_chunks_in_order():
    assert list(iter_batch(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        list(iter_batch([1], 0))


def test_length_sorted_batches_cover_every_index_once_within_limits():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 256, size=500)]
    batches = length_sorted_batches(lengths, max_items=32, max_tokens=4096)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        assert 1 <= len(b) <= 32
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 4096


def test_length_sorting_cuts_padding_waste():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(3, 200, size=1000)]
    sorted_batches = length_sorted_batches(lengths, max_items=32, max_tokens=10**9)
    naive = [np.arange(i, min(i + 32, 1000)) for i in range(0, 1000, 32)]
    assert padding_waste(lengths, sorted_batches) < 0.05
    assert padding_waste(lengths, naive) > 0.3


def test_an_item_longer_than_the_token_budget_gets_its_own_batch():
    batches = length_sorted_batches([5, 300, 6], max_items=8, max_tokens=100)
    assert [sorted(b.tolist()) for b in batches] == [[0, 2], [1]]
