"""The source's sparse dirty-page listing (`bitmap.sparse_pages`) agrees with the general
bitmap → runs path, and gives up past its limit."""

from __future__ import annotations

import numpy as np
import pytest

from ptmig import bitmap
from ptmig.migration import pages


@pytest.mark.parametrize("seed", range(30))
def test_sparse_pages_matches_bitmap_to_runs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    npages = int(rng.integers(1, 5000)) if seed % 3 else 262144
    flags = np.zeros(npages, dtype=bool)
    flags[rng.integers(0, npages, int(rng.integers(0, 300)))] = True
    if seed % 5 == 0:  # a long run across word boundaries, and the very last page
        flags[npages // 3 : npages // 3 + 200] = True
        flags[-1] = True
    bm = bitmap.from_bool(flags)
    got = bitmap.sparse_pages(bm, npages, npages)
    assert got is not None
    assert np.array_equal(got, np.flatnonzero(flags))
    runs = pages.pages_to_runs(got)
    ref = list(pages.bitmap_to_runs(bm, pages.DEFAULT_BATCH_PAGES, npages))
    if flags.any():
        assert np.array_equal(runs["start"], ref[0]["start"])
        assert np.array_equal(runs["npages"], ref[0]["npages"])
    else:
        assert ref == [] and runs.size == 0


@pytest.mark.parametrize("npages", [64, 100, 5000])
def test_sparse_pages_gives_up_past_its_limit(npages: int) -> None:
    bm = bitmap.from_pages([0, 1, 2, npages - 1], npages)  # four pages in one or two words
    got = bitmap.sparse_pages(bm, npages, 4)
    assert got is not None and got.tolist() == [0, 1, 2, npages - 1]
    assert bitmap.sparse_pages(bm, npages, 3) is None
    empty = bitmap.sparse_pages(bitmap.empty(npages), npages, 0)
    assert empty is not None and empty.size == 0


def test_sparse_pages_ignores_the_last_words_padding() -> None:
    bm = bitmap.from_pages([3, 99], 100)
    bm[-1] |= np.uint64(0xFFFF_FFFF_FFFF_FFFF) << np.uint64(100 % 64)  # bits of no page
    got = bitmap.sparse_pages(bm, 100, 2)
    assert got is not None and got.tolist() == [3, 99]
