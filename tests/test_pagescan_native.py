"""The page scans in C (`native/pagescan.c`) against their numpy references: the page digest
of `ptmig.migration.verify` (the same 64-bit digest for every page, so the verification stream
and a peer hashing with the reference see no difference) and the zero-page scan of
`ptmig.migration.pages` (the same pages sent as ZERO)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ptmig.migration import pages, verify
from ptmig.migration.pages import nonzero_pages, page_rows, pages_to_runs, split_zero_runs
from ptmig.migration.verify import ZERO_PAGE_DIGEST, page_digests, page_digests_at

PS = 4096


@pytest.fixture(scope="module", autouse=True)
def _native_built() -> None:
    """These tests are about the C code: it must build here (a compiler is a test dependency,
    as for the other native code), not fall back to numpy unseen."""
    assert pages.native_library() is not None


def _ram(data: bytes, page_size: int, offset: int) -> np.ndarray:
    """`data` cut to whole pages, placed `offset` bytes into a buffer (0: as aligned as numpy
    makes it; else unaligned 64-bit words, as a test's buffer may have)."""
    n = len(data) // page_size * page_size
    buf = np.zeros(n + offset, dtype=np.uint8)
    buf[offset:] = np.frombuffer(data[:n], dtype=np.uint8)
    return buf[offset:]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=8, max_size=6 * PS),
    words=st.sampled_from([1, 3, 4, 5, 8, 13, PS // 8]),
    offset=st.integers(0, 7),
    picks=st.lists(st.integers(0, 10_000), max_size=40),
)
def test_native_digests_equal_the_reference_byte_for_byte(
    data: bytes, words: int, offset: int, picks: list[int]
) -> None:
    page_size = 8 * words
    if len(data) < page_size:
        data = data * (page_size // len(data) + 1)
    ram = _ram(data, page_size, offset)
    npages = ram.size // page_size
    ref = page_digests(ram, page_size, native=False)
    got = page_digests(ram, page_size)
    assert got.dtype == np.uint64 and got.tolist() == ref.tolist()
    pages = np.array([p % npages for p in picks], dtype=np.int64)  # any order, repeats
    at = page_digests_at(ram, pages, page_size)
    assert at.tolist() == page_digests_at(ram, pages, page_size, native=False).tolist()
    assert at.tolist() == ref[pages].tolist()
    first = picks[0] % npages if picks else 0
    part = page_digests(ram, page_size, first, npages - first)
    assert part.tolist() == ref[first:].tolist()


def test_pinned_digests_keep_the_stream_compatible() -> None:
    """Digests that cross the wire (VerifyDigests) as numbers, pinned: a change to either
    implementation that changes them breaks migrations to and from older peers."""
    ram = np.zeros(3 * PS, dtype=np.uint8)
    ram[PS : 2 * PS] = np.arange(PS) % 256
    ram[2 * PS : 3 * PS] = 0xFF
    want = [
        int(ZERO_PAGE_DIGEST),
        int(page_digests(ram, native=False)[1]),
        int(page_digests(ram, native=False)[2]),
    ]
    assert page_digests(ram).tolist() == want
    assert want == [0x39A7244F76F9F09C, 0xF9AB54992089B31B, 0xEB317A1D13025424]


def test_the_c_code_refuses_a_page_outside_the_memory() -> None:
    """Checked again below Python's own check: a page number past the memory (or negative)
    fails the whole call before anything is read."""
    rows = np.zeros((4, PS // 8), dtype=np.uint64)
    for bad in ([0, 4], [-1], [3, 2, 1 << 40]):
        with pytest.raises(ValueError, match="outside"):
            verify._native_digests(rows, np.array(bad, dtype=np.int64), 0, len(bad))
    with pytest.raises(ValueError, match="outside"):
        verify._native_digests(rows, None, 3, 2)
    with pytest.raises(ValueError, match="outside"):
        page_digests_at(bytearray(4 * PS), np.array([4]))


def test_without_the_c_code_the_reference_hashes_to_the_same_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(7)
    ram = rng.integers(0, 256, size=5 * PS, dtype=np.uint8)
    native = page_digests(ram)
    monkeypatch.setattr(pages, "_native_lib", [None])  # as if it could not be built
    assert verify._native_digests(verify.page_rows(ram), None, 0, 5) is None
    assert page_digests(ram).tolist() == native.tolist()
    assert page_digests_at(ram, np.array([4, 0])).tolist() == native[[4, 0]].tolist()


@settings(max_examples=200, deadline=None)
@given(
    npages=st.integers(1, 12),
    words=st.sampled_from([1, 3, 7, 8, 9, 16, 17, PS // 8]),
    offset=st.integers(0, 7),
    marks=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 1 << 16), st.integers(1, 255))),
    picks=st.lists(st.integers(0, 10_000), max_size=30),
)
# pages spanning exactly as many page numbers as they count, yet not in order: the numpy
# reference once read them as one contiguous block (found by this test in a full run)
@example(npages=5, words=1, offset=0, marks=[(0, 0, 1)], picks=[0, 0, 0, 0, 4])
@example(npages=4, words=1, offset=0, marks=[(2, 0, 1)], picks=[0, 2, 1, 3])
def test_native_zero_scan_equals_the_reference(
    npages: int, words: int, offset: int, marks: list[tuple[int, int, int]], picks: list[int]
) -> None:
    """Pages zero but for one byte anywhere (its first, its last, any cache line), whole zero
    pages, pages in any order and repeated: the C scan finds the same non-zero pages."""
    page_size = 8 * words
    ram = _ram(bytes(npages * page_size), page_size, offset)
    for page, pos, value in marks:
        ram[(page % npages) * page_size + pos % page_size] = value
    rows = page_rows(ram, page_size)
    chosen = np.array([p % npages for p in picks], dtype=np.int64)
    runs = np.zeros(len(chosen), dtype=pages.RUN_DTYPE)
    runs["start"], runs["npages"], runs["kind"] = chosen, 1, pages.RunKind.DATA
    whole = pages_to_runs(np.arange(npages, dtype=np.int64))
    for r in (runs, whole):
        ref = nonzero_pages(rows, r, native=False)
        assert nonzero_pages(rows, r).tolist() == ref.tolist()
    expect = [any(ram[p * page_size : (p + 1) * page_size]) for p in range(npages)]
    assert nonzero_pages(rows, whole).tolist() == expect


def test_the_zero_scan_refuses_a_page_outside_the_memory() -> None:
    rows = np.zeros((4, PS // 8), dtype=np.uint64)
    runs = np.zeros(1, dtype=pages.RUN_DTYPE)
    runs["start"], runs["npages"] = 4, 1
    with pytest.raises(ValueError, match="outside"):
        nonzero_pages(rows, runs)


def test_without_the_c_code_the_zero_scan_splits_the_same_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(11)
    ram = np.zeros(64 * PS, dtype=np.uint8)
    for p in rng.choice(64, 20, replace=False):
        ram[p * PS + int(rng.integers(PS))] = 1
    whole = pages_to_runs(np.arange(64, dtype=np.int64))
    native = split_zero_runs(ram, whole)
    monkeypatch.setattr(pages, "_native_lib", [None])
    assert split_zero_runs(ram, whole).tolist() == native.tolist()


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    npages=st.integers(1, 24),
    picks=st.lists(st.integers(0, 10_000), min_size=0, max_size=24, unique=True),
)
def test_the_scatter_places_pages_and_digests_them_as_the_reference(
    seed: int, npages: int, picks: list[int]
) -> None:
    """The destination's scatter of a gathered batch: the same RAM afterwards as numpy's copy,
    and for each placed page the digest `page_digests_at` gives of it in RAM."""
    rng = np.random.default_rng(seed)
    chosen = np.array(sorted({p % npages for p in picks}), dtype=np.int64)
    src = rng.integers(0, 256, size=chosen.size * PS, dtype=np.uint8)
    before = rng.integers(0, 256, size=npages * PS, dtype=np.uint8)
    ram, ref = before.copy(), before.copy()
    got = verify.scatter_pages(ram, chosen, src)
    want = verify.scatter_pages(ref, chosen, src, native=False)
    assert ram.tobytes() == ref.tobytes()
    assert got.tolist() == want.tolist() == page_digests_at(ram, chosen, native=False).tolist()
    untouched = np.setdiff1d(np.arange(npages), chosen)
    rows, old = ram.reshape(-1, PS), before.reshape(-1, PS)
    assert (rows[untouched] == old[untouched]).all()


def test_the_scatter_refuses_a_page_outside_the_memory_and_writes_nothing() -> None:
    ram = np.zeros(4 * PS, dtype=np.uint8)
    src = np.ones(2 * PS, dtype=np.uint8)
    with pytest.raises(ValueError, match="outside"):
        verify.scatter_pages(ram, np.array([1, 4]), src)
    with pytest.raises(ValueError, match="2 pages to place at 1"):
        verify.scatter_pages(ram, np.array([1]), src)
    lib = pages.native_library()
    assert lib is not None
    idx = np.array([0, 7], dtype=np.int64)  # below Python's check: the C code's own
    keys = verify._keys(PS // 8)
    rc = lib.pages_scatter(
        ram.ctypes.data, 4, PS // 8, keys.ctypes.data, src.ctypes.data, idx.ctypes.data, 2, None
    )
    assert rc == -1 and not ram.any()
