"""Per-page digests of guest RAM for verified migrations, and their comparison.

The digest of a page is a 64-bit hash computed with numpy over the page's uint64 words: each word
is XORed with a per-position key, multiplied by an odd constant and xorshifted (all three steps
are bijections on 64-bit words, so changing any bits of one word always changes its term), the
terms are summed mod 2**64 and the sum is finalised with another bijective mixer. Hence a single
flipped bit, or any change confined to one word, is always detected; words moved within a page
change their keys; pages swapped with each other show up at both page numbers. It is a
corruption detector, not a cryptographic MAC.

The numpy code here is the digest's definition (the reference): it works in chunks of pages
that fit the cache, five passes over each. The same digest in C (`native/pagescan.c`, built
at first use like the other native code: `pages.native_library`) reads each word once,
outside the GIL; it is what `page_digests` and `page_digests_at` use, with the numpy code
where no compiler can build it (`native=False` asks for the reference).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ptmig.migration.pages import (
    PAGE_SIZE,
    check_page_numbers,
    native_library,
    outside_memory,
    page_rows,
)

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_CHUNK_PAGES = 64  # 256 KiB of RAM per step: the temporaries stay in L2


def splitmix_keys(n: int, seed: int = 0x5054_4D49_4721) -> np.ndarray:
    """n well-mixed 64-bit keys (splitmix64 of seed + i*golden), vectorised."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


_KEYS: dict[int, np.ndarray] = {}


def _keys(words: int) -> np.ndarray:
    keys = _KEYS.get(words)
    if keys is None:
        keys = _KEYS[words] = splitmix_keys(words)
    return keys


def _native_digests(
    rows: np.ndarray, idx: np.ndarray | None, first: int, count: int
) -> np.ndarray | None:
    """The digests of `count` pages of `rows` (page idx[j], or first + j) in C; None where the
    C code cannot take these rows (not built, or not one contiguous array)."""
    if not rows.flags.c_contiguous or rows.dtype != np.uint64:
        return None
    lib = native_library()
    if lib is None:
        return None
    keys = _keys(rows.shape[1])
    out = np.empty(count, dtype=np.uint64)
    if count:
        rc = lib.page_digests(
            rows.ctypes.data,
            rows.shape[0],
            rows.shape[1],
            keys.ctypes.data,
            None if idx is None else idx.ctypes.data,
            first,
            count,
            out.ctypes.data,
        )
        if rc != 0:
            raise outside_memory(rows)
    return out


def page_digests(
    mem: Any,
    page_size: int = PAGE_SIZE,
    first_page: int = 0,
    npages: int | None = None,
    *,
    allocated: np.ndarray | None = None,
    native: bool = True,
) -> np.ndarray:
    """uint64 digest of each page of `mem` (bytes-like or numpy), pages [first, first+npages).

    `allocated` (one bool per page of `mem`) marks pages that may hold data; the others are
    known to be zero (holes in a memfd) and get the zero page's digest without being read.
    `native=False`: the numpy reference (the same digests)."""
    if allocated is not None:
        return _digests_sparse(mem, page_size, allocated, native)
    rows = page_rows(mem, page_size)
    end = rows.shape[0] if npages is None else first_page + npages
    if not 0 <= first_page <= end <= rows.shape[0]:
        raise ValueError(
            f"pages {first_page}..{end - 1} are outside the {rows.shape[0]} pages of memory"
        )
    if native:
        out = _native_digests(rows, None, first_page, end - first_page)
        if out is not None:
            return out
    return _digest(
        rows, end - first_page, lambda p, k, _buf: rows[first_page + p : first_page + p + k]
    )


def page_digests_at(
    mem: Any, pages: np.ndarray, page_size: int = PAGE_SIZE, *, native: bool = True
) -> np.ndarray:
    """The digests of the pages numbered in `pages` (any order), like `page_digests` gives
    them. In C each page is hashed where it lies. In numpy (`native=False`, the reference):
    scattered pages (a later pre-copy round) are gathered a chunk at a time, so their cost is
    the hashing, not one numpy call per page; a chunk of consecutive pages (a long run, as
    most of a first round's) is hashed where it lies, without the gather."""
    rows = page_rows(mem, page_size)
    idx = np.ascontiguousarray(pages, dtype=np.int64)
    check_page_numbers(idx, rows)
    if native:
        out = _native_digests(rows, idx, 0, idx.size)
        if out is not None:
            return out

    def chunk(p: int, k: int, buf: np.ndarray) -> np.ndarray:
        sel = idx[p : p + k]
        first = int(sel[0])
        if int(sel[-1]) == first + k - 1 and (k == 1 or bool((np.diff(sel) == 1).all())):
            return rows[first : first + k]  # consecutive pages (a run): read in place
        # (the indices are checked above: "clip" spares numpy the bounds check, and with it
        # the buffering of `out` that "raise" does)
        return np.take(rows, sel, axis=0, out=buf, mode="clip")

    return _digest(rows, idx.size, chunk)


def scatter_pages(mem: Any, pages: np.ndarray, src: Any, *, native: bool = True) -> np.ndarray:
    """Copy the pages packed in `src` (page j of it) to the pages numbered in `pages` of `mem`
    (writable), and return their digests, as `page_digests_at(mem, pages)` would give them
    after the copy. In C each digest is taken from `src` as it is copied (its bytes in the
    cache), not from `mem` afterwards; in numpy (`native=False`) the copy, then the digests."""
    rows = page_rows(mem)
    idx = np.ascontiguousarray(pages, dtype=np.int64)
    src_rows = page_rows(src)
    if src_rows.shape[0] != idx.size:
        raise ValueError(f"{src_rows.shape[0]} pages to place at {idx.size} page numbers")
    check_page_numbers(idx, rows)
    lib = native_library() if native else None
    if lib is not None and rows.flags.c_contiguous and src_rows.flags.c_contiguous:
        out = np.empty(idx.size, dtype=np.uint64)
        if idx.size:
            rc = lib.pages_scatter(
                rows.ctypes.data,
                rows.shape[0],
                rows.shape[1],
                _keys(rows.shape[1]).ctypes.data,
                src_rows.ctypes.data,
                idx.ctypes.data,
                idx.size,
                out.ctypes.data,
            )
            if rc != 0:
                raise outside_memory(rows)
        return out
    rows[idx] = src_rows
    return page_digests_at(mem, idx, native=native)


def _digest(rows: np.ndarray, count: int, chunk: Any) -> np.ndarray:
    """Digests of `count` pages; `chunk(p, k, buf)` gives the rows of pages p..p+k-1 (a view,
    or gathered into `buf`)."""
    words = rows.shape[1]
    keys = _keys(words)
    out = np.empty(count, dtype=np.uint64)
    step = max(1, min(_CHUNK_PAGES, count))
    x = np.empty((step, words), dtype=np.uint64)  # sized to the work: one page is 2 x 4 KiB
    t = np.empty_like(x)
    g = np.empty_like(x)
    s31 = np.uint64(31)
    with np.errstate(over="ignore"):
        for p in range(0, count, step):
            k = min(step, count - p)
            xv, tv = x[:k], t[:k]
            np.bitwise_xor(chunk(p, k, g[:k]), keys, out=xv)
            np.multiply(xv, _M1, out=xv)
            np.right_shift(xv, s31, out=tv)
            np.bitwise_xor(xv, tv, out=xv)
            np.sum(xv, axis=1, dtype=np.uint64, out=out[p : p + k])
        h = out
        h ^= h >> np.uint64(33)
        h *= _M2
        h ^= h >> np.uint64(29)
        h *= _M3
        h ^= h >> np.uint64(32)
    return out


def _digests_sparse(
    mem: Any, page_size: int, allocated: np.ndarray, native: bool = True
) -> np.ndarray:
    rows = page_rows(mem, page_size)
    if allocated.shape != (rows.shape[0],):
        raise ValueError(
            f"allocated mask has shape {allocated.shape}, memory has {rows.shape[0]} pages"
        )
    zero = (
        ZERO_PAGE_DIGEST
        if page_size == PAGE_SIZE
        else page_digests(np.zeros(page_size, dtype=np.uint8), page_size, native=False)[0]
    )
    out = np.full(rows.shape[0], zero, dtype=np.uint64)
    idx = np.flatnonzero(allocated)
    if idx.size:
        out[idx] = page_digests_at(mem, idx, page_size, native=native)
    return out


#: The digest of an all-zero page (every page of a hole in guest memory).
ZERO_PAGE_DIGEST = page_digests(np.zeros(PAGE_SIZE, dtype=np.uint8), native=False)[0]


class VerifyResult(NamedTuple):
    pages: int
    mismatched: int
    first_mismatched: list[int]

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def describe(self) -> str:
        if self.ok:
            return f"verify: all {self.pages} pages match"
        return f"verify: {self.mismatched} of {self.pages} pages differ, first: " + ", ".join(
            str(p) for p in self.first_mismatched
        )


def compare_digests(source: np.ndarray, destination: np.ndarray) -> VerifyResult:
    """Compare two digest arrays page by page (vectorised)."""
    if source.shape != destination.shape:
        raise ValueError(
            f"digest arrays differ in length: source {source.shape}, "
            f"destination {destination.shape}"
        )
    bad = np.flatnonzero(source != destination)
    return VerifyResult(int(source.size), int(bad.size), bad[:16].tolist())


def digests_to_bytes(digests: np.ndarray) -> bytes:
    return digests.astype("<u8", copy=False).tobytes()


def digests_from_bytes(data: bytes) -> np.ndarray:
    if len(data) % 8:
        raise ValueError(f"digest bytes length {len(data)} is not a multiple of 8")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)
