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


def to_bits(bm: npt.NDArray[np.uint8] | Bitmap, npages: int | None = None) -> npt.NDArray[np.uint8]:
    """One 0/1 byte per page. `bm` is uint64 words or the same bytes as uint8; `npages`
    drops the padding of the last word."""
    if bm.dtype not in (np.uint8, np.uint64):
        raise ValueError(f"bitmap must be uint8 or uint64, not {bm.dtype}")
    bits = np.unpackbits(np.ascontiguousarray(bm).view(np.uint8), bitorder="little")
    if npages is not None:
        if npages > bits.size:
            raise ValueError(f"npages {npages} exceeds the bitmap's {bits.size} bits")
        bits = bits[:npages]
    return bits


def to_bool(bm: Bitmap, npages: int) -> npt.NDArray[np.bool_]:
    """One bool per page."""
    return to_bits(bm, npages).astype(bool)


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
    end = first + count
    lo, hi = first >> 6, (end - 1) >> 6
    head = np.uint64((0xFFFF_FFFF_FFFF_FFFF << (first & 63)) & 0xFFFF_FFFF_FFFF_FFFF)
    tail = np.uint64(0xFFFF_FFFF_FFFF_FFFF >> (63 - ((end - 1) & 63)))
    if lo == hi:
        bm[lo] |= head & tail
        return
    bm[lo] |= head
    bm[lo + 1 : hi] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
    bm[hi] |= tail


def count(bm: Bitmap | npt.NDArray[np.uint8]) -> int:
    """Number of set bits. Words are counted as words: a popcount per byte makes a temporary
    of 8 bytes per word (at 8 GiB a 288 KiB array, a fresh mmap in the VMM) and sums 8 times
    as many counts."""
    arr = np.ascontiguousarray(bm)
    if arr.dtype != np.uint64:
        arr = arr.view(np.uint8)
    return int(np.bitwise_count(arr).sum())


def pages(bm: Bitmap, npages: int) -> npt.NDArray[np.int64]:
    """Page numbers of the set bits, ascending."""
    return np.flatnonzero(to_bool(bm, npages))


def sparse_pages(bm: Bitmap, npages: int, limit: int) -> npt.NDArray[np.int64] | None:
    """Page numbers of the set bits below `npages`, ascending, if there are at most `limit`
    of them; else None. One pass over the words finds the non-zero ones; the rest is
    O(non-zero words), so listing the few pages of a stop-and-copy round costs little more
    than finding them, even in the bitmap of a large guest. (numpy finds the non-zero
    entries of a bool mask several times faster than those of uint64 words.)"""
    nz = bm[: words_for(npages)] != 0
    if np.count_nonzero(nz) > limit:  # each non-zero word holds a page at least
        return None
    words = np.flatnonzero(nz)
    vals = bm[words]
    tail = npages % 64
    if tail and words.size and words[-1] == npages // 64:
        vals[-1] &= np.uint64((1 << tail) - 1)
    if int(np.bitwise_count(vals).sum()) > limit:
        return None
    row, col = np.nonzero(np.unpackbits(vals.view(np.uint8), bitorder="little").reshape(-1, 64))
    return words[row] * 64 + col


def bit_runs(
    bits: npt.NDArray[np.uint8] | npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Runs of 1s in a 0/1 (or bool) array, one per page: (starts, lengths), via np.diff."""
    edges = np.diff(np.concatenate(([0], bits.astype(np.int8, copy=False), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return starts, ends - starts


def runs(bm: Bitmap, npages: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Runs of consecutive set pages as two arrays: starts and lengths."""
    return bit_runs(to_bits(bm, npages))


def iter_runs(bm: Bitmap, npages: int) -> Iterator[tuple[int, int]]:
    """(first_page, npages) for each run of set bits, ascending."""
    starts, lengths = runs(bm, npages)
    yield from zip(starts.tolist(), lengths.tolist(), strict=True)
