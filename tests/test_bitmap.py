"""Page bitmaps (pure numpy, KVM's layout)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ptmig import bitmap
from ptmig.memory import DirtyWords


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


def test_count_counts_words_and_bytes_alike() -> None:
    bm = bitmap.from_pages([0, 63, 64, 130, 199], 200)
    assert bitmap.count(bm) == 5
    assert bitmap.count(bm.view(np.uint8)) == 5
    assert bitmap.count(bitmap.full(64 * 1000 + 3)) == 64 * 1000 + 3


def test_set_range_and_full_trim() -> None:
    bm = bitmap.empty(100)
    bitmap.set_range(bm, 60, 10)
    assert bitmap.pages(bm, 100).tolist() == list(range(60, 70))
    assert bitmap.count(bitmap.full(100)) == 100


@given(
    st.integers(1, 1500).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.integers(0, n - 1).flatmap(
                    lambda f: st.tuples(st.just(f), st.integers(0, n - f))
                ),
                max_size=6,
            ),
            st.sets(st.integers(0, n - 1), max_size=50),
        )
    )
)
def test_the_vmm_bitmap_marks_what_bitmap_marks_without_numpy(case) -> None:
    """`memory.DirtyWords` (marked with plain integers, so a VM that never migrates never loads
    numpy) holds KVM's layout: its ranges and a merged bitmap come out as `bitmap` makes them,
    and taking them clears it."""
    npages, ranges, merged = case
    words, expected = DirtyWords(npages), bitmap.empty(npages)
    for first, count in ranges:
        words.set_range(first, count)
        bitmap.set_range(expected, first, count)
    other = bitmap.from_pages(sorted(merged), npages)
    words.merge(other)
    taken = words.take()
    assert taken.dtype == np.uint64
    assert taken.tolist() == (expected | other).tolist()
    assert not words.take().any()
    # taken into a bitmap kept elsewhere: added to what it holds, and cleared here
    words.merge(other)
    kept = bitmap.from_pages([npages - 1], npages)
    words.take_into(kept)
    assert kept.tolist() == (other | bitmap.from_pages([npages - 1], npages)).tolist()
    assert not words.take().any()
