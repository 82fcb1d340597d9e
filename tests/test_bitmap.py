"""Page bitmaps (pure numpy, KVM's layout)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ptmig import bitmap


@given(
    st.integers(1, 3000).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=200))
    )
)
def test_pages_roundtrip_and_runs_cover_exactly(case) -> None:
    npages, pages = case
    bm = bitmap.from_pages(sorted(pages), npages)
    assert bitmap.count(bm) == len(pages)
    assert bitmap.pages(bm, npages).tolist() == sorted(pages)
    covered = [p for start, n in bitmap.iter_runs(bm, npages) for p in range(start, start + n)]
    assert covered == sorted(pages)


def test_kvm_word_layout() -> None:
    bm = bitmap.from_pages([0, 63, 64, 130], 200)
    assert bm.dtype == np.uint64
    assert int(bm[0]) == (1 | 1 << 63) and int(bm[1]) == 1 and int(bm[2]) == 1 << 2


def test_set_range_and_full_trim() -> None:
    bm = bitmap.empty(100)
    bitmap.set_range(bm, 60, 10)
    assert bitmap.pages(bm, 100).tolist() == list(range(60, 70))
    assert bitmap.count(bitmap.full(100)) == 100
