"""Page bitmaps as numpy arrays, in KVM's layout.

A bitmap covers `npages` pages with one bit per page, stored as little-endian 64-bit words
(`np.uint64`), bit `i % 64` of word `i // 64` for page `i` — the layout `KVM_GET_DIRTY_LOG`
fills, so a KVM log and a VMM bitmap combine with one `np.bitwise_or`. Everything here is
vectorised: no Python loop over pages.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

Bitmap = npt.NDArray[np.uint64]


def words_for(npages: int) -> int:
    return (npages + 63) // 64


def empty(npages: int) -> Bitmap:
    return np.zeros(words_for(npages), dtype=np.uint64)


def full(npages: int) -> Bitmap:
    bm = np.full(words_for(npages), np.uint64(0xFFFF_FFFF_FFFF_FFFF), dtype=np.uint64)
    _trim(bm, npages)
    return bm


def _trim(bm: Bitmap, npages: int) -> None:
    tail = npages % 64
    if tail:
        bm[-1] &= np.uint64((1 << tail) - 1)


def to_bool(bm: Bitmap, npages: int) -> npt.NDArray[np.bool_]:
    """One bool per page."""
    bits = np.unpackbits(bm.view(np.uint8), bitorder="little")
    return bits[:npages].astype(bool)


def from_bool(flags: npt.NDArray[np.bool_]) -> Bitmap:
    npages = len(flags)
    packed = np.packbits(flags.astype(np.uint8), bitorder="little")
    out = np.zeros(words_for(npages) * 8, dtype=np.uint8)
    out[: len(packed)] = packed
    return out.view(np.uint64)


def from_pages(pages: npt.ArrayLike, npages: int) -> Bitmap:
    flags = np.zeros(npages, dtype=bool)
    flags[np.asarray(pages, dtype=np.int64)] = True
    return from_bool(flags)


def set_range(bm: Bitmap, first: int, count: int) -> None:
    """Set bits [first, first+count)."""
    if count <= 0:
        return
    u8 = bm.view(np.uint8)
    flags = np.unpackbits(u8, bitorder="little")
    flags[first : first + count] = 1
    u8[:] = np.packbits(flags, bitorder="little")


def count(bm: Bitmap) -> int:
    return int(np.unpackbits(bm.view(np.uint8)).sum()) if bm.size else 0


def pages(bm: Bitmap, npages: int) -> npt.NDArray[np.int64]:
    """Page numbers of the set bits, ascending."""
    return np.flatnonzero(to_bool(bm, npages))


def runs(bm: Bitmap, npages: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Runs of consecutive set pages as two arrays: starts and lengths."""
    flags = to_bool(bm, npages).astype(np.int8)
    edges = np.diff(np.concatenate(([0], flags, [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return starts, ends - starts


def iter_runs(bm: Bitmap, npages: int) -> Iterator[tuple[int, int]]:
    """(first_page, npages) for each run of set bits, ascending."""
    starts, lengths = runs(bm, npages)
    yield from zip(starts.tolist(), lengths.tolist(), strict=True)
