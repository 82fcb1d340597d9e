"""Page-run helpers and RAM digests: bitmaps → runs, zero pages, validation, verification."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.migration import RemoteProtocolError, RunKind, make_runs
from ptmig.migration.pages import (
    bitmap_to_runs,
    count_dirty,
    expand_runs,
    runs_to_bits,
    split_zero_runs,
    validate_runs,
    zero_fill,
)
from ptmig.migration.verify import compare_digests, page_digests, page_digests_at

PS = 4096


def test_bitmap_words_follow_kvm_bit_order() -> None:
    words = np.array([0b1011, 1 << 63], dtype=np.uint64)  # pages 0,1,3 and 127
    [runs] = list(bitmap_to_runs(words, 100))
    assert runs["start"].tolist() == [0, 3, 127]
    assert runs["npages"].tolist() == [2, 1, 1]
    assert count_dirty(words) == 4


def test_runs_split_at_batch_limit() -> None:
    bits = np.zeros(100, np.uint8)
    bits[5:45] = 1
    bits[50:53] = 1
    batches = list(bitmap_to_runs(np.packbits(bits, bitorder="little"), 16, 100))
    assert [int(b["npages"].sum()) for b in batches] == [16, 16, 11]
    assert batches[0]["start"].tolist() == [5] and batches[2]["start"].tolist() == [37, 50]
    assert np.array_equal(runs_to_bits(np.concatenate(batches), 100), bits)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=600), st.integers(1, 70))
def test_bitmap_to_runs_covers_exactly_the_set_bits(flags: list[bool], batch: int) -> None:
    bits = np.array(flags, np.uint8)
    batches = list(bitmap_to_runs(np.packbits(bits, bitorder="little"), batch, bits.size))
    assert all(0 < int(b["npages"].sum()) <= batch for b in batches)
    allruns = np.concatenate(batches) if batches else make_runs([], [])
    assert np.array_equal(runs_to_bits(allruns, bits.size), bits)
    for b in batches:
        validate_runs(b, bits.size)


def test_split_zero_runs_marks_zero_pages() -> None:
    ram = bytearray(16 * PS)
    for p in (1, 2, 5, 9):
        ram[p * PS + 4095] = 1  # last byte only: the whole page must be scanned
    runs = split_zero_runs(ram, make_runs([0, 8], [7, 4]))
    assert [(int(r["start"]), int(r["npages"]), int(r["kind"])) for r in runs] == [
        (0, 1, RunKind.ZERO),
        (1, 2, RunKind.DATA),
        (3, 2, RunKind.ZERO),
        (5, 1, RunKind.DATA),
        (6, 1, RunKind.ZERO),
        (8, 1, RunKind.ZERO),
        (9, 1, RunKind.DATA),
        (10, 2, RunKind.ZERO),
    ]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.booleans(), min_size=40, max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_split_zero_runs_short_and_long_paths_agree(dirty: list[bool], data: list[bool]) -> None:
    ram = bytearray(40 * PS)
    view = np.frombuffer(ram, np.uint8).reshape(40, PS)
    view[np.array(data), 17] = 9
    bits = np.array(dirty, np.uint8)
    runs = np.concatenate(
        list(bitmap_to_runs(np.packbits(bits, bitorder="little"), 40, 40)) or [make_runs([], [])]
    )
    out = split_zero_runs(ram, runs)
    pages = expand_runs(out)
    assert np.array_equal(pages, np.flatnonzero(bits))
    kinds = np.repeat(out["kind"], out["npages"].astype(np.int64))
    assert np.array_equal(kinds == RunKind.DATA, np.array(data)[pages])


def test_zero_fill_only_touches_zero_runs() -> None:
    ram = bytearray(b"\x07" * 8 * PS)
    zero_fill(memoryview(ram), make_runs([1, 4], [2, 1], [RunKind.ZERO, RunKind.DATA]))
    assert ram == b"\x07" * PS + bytes(2 * PS) + b"\x07" * 5 * PS


def test_validate_runs_rejects_with_values_in_the_message() -> None:
    with pytest.raises(RemoteProtocolError, match=r"run 1 covers pages 9..10, outside guest RAM"):
        validate_runs(make_runs([0, 9], [1, 2]), 10)
    with pytest.raises(RemoteProtocolError, match="no runs"):
        validate_runs(make_runs([], []), 10)
    assert validate_runs(make_runs([0, 3], [2, 7], [RunKind.DATA, RunKind.ZERO]), 10) == 2 * PS


def test_zero_detection_of_a_large_region() -> None:
    """Its speed is the bench's `migration` result `pages.zero_scan`."""
    ram = bytearray(64 << 20)  # 64 MiB, every 3rd page non-zero
    np.frombuffer(ram, np.uint8).reshape(-1, PS)[::3, 100] = 1
    runs = make_runs([0], [len(ram) // PS])
    out = split_zero_runs(ram, runs)
    npages = len(ram) // PS  # runs alternate: one DATA page, two ZERO pages
    assert int(out["npages"][out["kind"] == RunKind.DATA].sum()) == (npages + 2) // 3
    assert out.size == 2 * ((npages + 2) // 3) - 1


# ---- verification digests -------------------------------------------------------------------


def random_pages(n: int, seed: int = 0) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, n * PS, np.uint8).tobytes())


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 8 * PS * 8 - 1))
def test_every_single_bit_flip_is_detected(bit: int) -> None:
    ram = random_pages(8, 1)
    before = page_digests(ram)
    ram[bit // 8] ^= 1 << (bit % 8)
    res = compare_digests(before, page_digests(ram))
    assert res.mismatched == 1 and res.first_mismatched == [bit // 8 // PS]


def test_swapped_pages_and_swapped_words_are_detected() -> None:
    ram = random_pages(8, 2)
    before = page_digests(ram)
    view = np.frombuffer(ram, np.uint8).reshape(8, PS)
    view[[2, 5]] = view[[5, 2]]
    res = compare_digests(before, page_digests(ram))
    assert (res.pages, res.mismatched, res.first_mismatched) == (8, 2, [2, 5])
    ram2 = random_pages(1, 3)
    w = np.frombuffer(ram2, np.uint64)
    d0 = page_digests(ram2)
    w[[0, 1]] = w[[1, 0]]
    assert page_digests(ram2)[0] != d0[0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 199), max_size=300))
def test_digests_of_scattered_pages_are_those_of_the_whole_ram(pages: list[int]) -> None:
    """What a destination computes per received batch (any pages, any order, repeats) equals
    what the whole-RAM digest says of the same pages; and a single page costs no more than it
    needs (its digest is still the same)."""
    ram = random_pages(200, 4)
    whole = page_digests(ram)
    assert (page_digests_at(ram, np.array(pages, dtype=np.int64)) == whole[pages]).all()
    assert page_digests(ram, first_page=7, npages=1)[0] == whole[7]
    with pytest.raises(ValueError, match="outside"):
        page_digests_at(ram, np.array([200]))


def _swapped(first: int, n: int, i: int, j: int) -> list[int]:
    pages = list(range(first, first + n))
    pages[i], pages[j] = pages[j], pages[i]
    return pages


@pytest.mark.parametrize(
    "pages",
    [
        list(range(200)),  # consecutive: whole chunks hashed in place
        list(range(3, 200)),  # consecutive, chunks not aligned to the start
        list(range(10, 60)) + list(range(100, 190)),  # two runs, one chunk spans both
        _swapped(0, 64, 5, 6),  # a chunk from 0 to 63 that is not in order
        _swapped(64, 128, 0, 127),  # first and last swapped: 127 .. 64
        [7] * 64 + [8],  # repeats
    ],
)
def test_digests_of_runs_hashed_in_place_are_those_of_the_whole_ram(pages: list[int]) -> None:
    ram = random_pages(200, 5)
    whole = page_digests(ram)
    assert (page_digests_at(ram, np.array(pages, dtype=np.int64)) == whole[pages]).all()


def test_zero_pages_and_equal_pages_have_equal_digests() -> None:
    ram = bytearray(4 * PS)
    ram[2 * PS : 3 * PS] = ram[3 * PS :] = b"\x01" * PS
    d = page_digests(ram)
    assert d[0] == d[1] and d[2] == d[3] and d[0] != d[2]
    assert compare_digests(d, d).describe() == "verify: all 4 pages match"


def test_digest_of_1gib() -> None:
    """Its speed is the bench's `migration` result `verify.digest`."""
    ram = np.ones(1 << 30, dtype=np.uint8)
    d = page_digests(ram)
    assert d.size == (1 << 30) // PS
    assert (d == d[0]).all()  # identical pages, identical digests
