"""Everything kept between calls is bounded: a model that meets many sequence
lengths (generation with a growing prompt) keeps a fixed number of entries."""

import resource

import pytest
import torch

from dilated_attention_pytorch import BlockSparseRingDilatedAttention, ImprovedDilatedAttention
from dilated_attention_pytorch._cache import BoundedCache
from dilated_attention_pytorch.core import merge
from dilated_attention_pytorch.pattern import _calls
from dilated_attention_pytorch.sparse import block_mask
from dilated_attention_pytorch.sparse import modules as sparse_modules


def test_bounded_cache_keeps_the_most_recent():
    cache: BoundedCache[int] = BoundedCache(3)
    for i in range(5):
        assert cache.get(i, lambda i=i: i * 10) == i * 10
    assert len(cache) == 3 and list(cache.keys()) == [2, 3, 4]
    assert cache.get(2, lambda: -1) == 20  # a hit, now the most recent
    cache.put(5, 50)
    assert list(cache.keys()) == [4, 2, 5]
    with pytest.raises(ValueError, match="size must be >= 1"):
        BoundedCache(0)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_two_hundred_lengths_keep_every_cache_bounded():
    block_sparse = BlockSparseRingDilatedAttention([16, 32], [1, 2], block_size=8, sparsity=0.5)
    improved = ImprovedDilatedAttention([16, 32], [1, 2], head_mode="all")
    sizes = []
    start = None
    for n in range(40, 240):
        q = torch.randn(1, n, 2, 4)
        with torch.no_grad():
            block_sparse(q, q, q, is_causal=True)
            improved(q, q, q)
        if n == 140:
            start = _rss_mib()
        sizes.append(len(block_sparse._layouts))
    assert max(sizes) == sparse_modules.LAYOUT_CACHE_SIZE
    assert _calls.cache_info().currsize <= 256
    assert len(merge._BRANCH_META) <= merge._BRANCH_META.size
    assert len(block_mask.CACHE) <= block_mask.CACHE.size
    # the second hundred lengths add no memory that stays (peak RSS, so only a leak shows)
    assert start is not None and _rss_mib() - start < 50
