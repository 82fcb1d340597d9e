"""The source's sparse dirty-page listing agrees with the general bitmap → runs path."""

from __future__ import annotations

import numpy as np
import pytest

from ptmig import bitmap
from ptmig.migration import pages
from ptmig.migration.source import dirty_pages


@pytest.mark.parametrize("seed", range(30))
def test_dirty_pages_matches_bitmap_to_runs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    npages = int(rng.integers(1, 5000)) if seed % 3 else 262144
    flags = np.zeros(npages, dtype=bool)
    flags[rng.integers(0, npages, int(rng.integers(0, 300)))] = True
    if seed % 5 == 0:  # a long run across word boundaries, and the very last page
        flags[npages // 3 : npages // 3 + 200] = True
        flags[-1] = True
    bm = bitmap.from_bool(flags)
    got = dirty_pages(bm, npages)
    assert np.array_equal(got, np.flatnonzero(flags))
    runs = pages.pages_to_runs(got)
    ref = list(pages.bitmap_to_runs(bm, pages.DEFAULT_BATCH_PAGES, npages))
    if flags.any():
        assert np.array_equal(runs["start"], ref[0]["start"])
        assert np.array_equal(runs["npages"], ref[0]["npages"])
    else:
        assert ref == [] and runs.size == 0
