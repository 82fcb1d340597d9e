"""Page runs: dirty bitmap → run batches, zero-page detection, and run validation.

A run is (start_page, npages, kind) in a `RUN_DTYPE` array. Nothing here loops over pages in
Python: bitmaps are unpacked and diffed with numpy, zero pages are found in C
(`native/pagescan.c`, built at first use; `native_library`) or, where it cannot be built, with
`.any(axis=1)` on a copy-free uint64 view of guest memory (the reference), and run lists are
expanded with `np.repeat`. Loops that remain are per batch or per run (a scatter list needs one
buffer per run anyway).

`validate_runs` is the one place where run numbers from the peer are checked against guest RAM;
`data_slices` / `zero_fill` are the only places where checked runs become memory addresses.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from ptmig import bitmap as _bitmap
from ptmig.migration.events import RUN_DTYPE, RemoteProtocolError, RunKind, make_runs
from ptmig.migration.frames import MAX_BATCH_PAYLOAD, MAX_RUNS_PER_BATCH

PAGE_SIZE = 4096
DEFAULT_BATCH_PAGES = MAX_BATCH_PAYLOAD // PAGE_SIZE  # 16384 pages = 64 MiB
_ZERO_SCAN_CHUNK = 1024  # pages per numpy call when scanning for zero pages (4 MiB)

log = logging.getLogger(__name__)

_P, _U64 = ctypes.c_void_p, ctypes.c_uint64
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "pages_nonzero": (ctypes.c_int, [_P, _U64, _U64, _P, _U64, _P]),
    "page_digests": (ctypes.c_int, [_P, _U64, _U64, _P, _P, _U64, _U64, _P]),
    "pages_scatter": (ctypes.c_int, [_P, _U64, _U64, _P, _P, _P, _U64, _P]),
}
_native_lib: list[ctypes.CDLL | None] = []  # [] until tried once; [None] if unavailable
_native_lock = threading.Lock()


def native_library() -> ctypes.CDLL | None:
    """`native/pagescan.c` (zero pages here, digests and the scatter in `verify`), built and
    loaded at the first call; None (once logged) if it cannot be: the numpy references run
    then, to the same results."""
    with _native_lock:
        if not _native_lib:
            from ptmig.nativelib import NativeLibraryError, load_library

            try:
                _native_lib.append(load_library(("pagescan.c",), _SIGNATURES))
            except NativeLibraryError as e:
                log.warning("zero-page scan and page digests in numpy (slower): %s", e)
                _native_lib.append(None)
        return _native_lib[0]


def bitmap_to_bits(bitmap: np.ndarray, npages: int | None = None) -> np.ndarray:
    """One uint8 0/1 per page. `bitmap` is uint8 bytes or uint64 words (KVM's layout: bit i of
    word j is page 64*j + i, little-endian); `npages` truncates the padding of the last word."""
    return _bitmap.to_bits(bitmap, npages)


def count_dirty(bitmap: np.ndarray, npages: int | None = None) -> int:
    """Number of set bits (dirty pages) in a bitmap."""
    if npages is None:
        return _bitmap.count(bitmap)
    # Whole words are counted with popcount (O(words), not one byte per page); only the last
    # word's bits past `npages` need masking.
    words = _as_words(bitmap)
    full, tail = divmod(npages, 64)
    n = _bitmap.count(words[:full])
    if tail and full < words.size:
        n += bin(int(words[full]) & ((1 << tail) - 1)).count("1")
    return n


def _as_words(bitmap: np.ndarray) -> np.ndarray:
    """The bitmap as uint64 words (uint8 bytes are zero-padded to a whole word)."""
    raw = np.ascontiguousarray(bitmap)
    if raw.dtype == np.uint64:
        return raw
    u8 = raw.view(np.uint8)
    if u8.size % 8:
        u8 = np.concatenate([u8, np.zeros(8 - u8.size % 8, dtype=np.uint8)])
    return u8.view(np.uint64)


def set_runs(bitmap: np.ndarray, npages: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(starts, counts) of the runs of set bits, ascending, in O(non-zero words): only the words
    holding a set bit are expanded to bits, and a run continues from one of them into the next
    only where the two words are adjacent in the bitmap. Bits at or past `npages` are ignored."""
    words = _as_words(bitmap)
    if npages is not None:
        words = words[: -(-npages // 64)]
    idx = np.flatnonzero(words)
    vals = words[idx]
    if npages is not None and idx.size and npages % 64 and idx[-1] == npages // 64:
        vals[-1] &= np.uint64((1 << (npages % 64)) - 1)
        if not vals[-1]:
            idx, vals = idx[:-1], vals[:-1]
    if idx.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(vals.view(np.uint8), bitorder="little").reshape(-1, 64).astype(bool)
    adjacent = np.zeros(idx.size + 1, dtype=bool)  # word k follows word k-1 directly
    adjacent[1:-1] = idx[1:] == idx[:-1] + 1
    prev = np.empty_like(bits)
    prev[:, 1:] = bits[:, :-1]
    prev[0, 0] = False
    prev[1:, 0] = bits[:-1, 63] & adjacent[1:-1]
    nxt = np.empty_like(bits)
    nxt[:, :-1] = bits[:, 1:]
    nxt[-1, 63] = False
    nxt[:-1, 63] = bits[1:, 0] & adjacent[1:-1]
    base = idx.astype(np.int64) * 64
    first = np.flatnonzero((bits & ~prev).ravel())
    last = np.flatnonzero((bits & ~nxt).ravel())
    starts = base[first // 64] + first % 64
    ends = base[last // 64] + last % 64 + 1
    return starts.astype(np.uint64), ends - starts


def bits_to_runs(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, counts) of the runs of 1s in a 0/1 array, found with np.diff."""
    starts, counts = _bitmap.bit_runs(bits)
    return starts.astype(np.uint64), counts


def bitmap_to_runs(
    bitmap: np.ndarray, max_pages_per_batch: int = DEFAULT_BATCH_PAGES, npages: int | None = None
) -> Iterator[np.ndarray]:
    """Yield DATA run arrays covering the set bits, each batch holding ≤ max_pages_per_batch
    pages (a run crossing a batch limit is split). Loops once per batch, never per page."""
    if not 1 <= max_pages_per_batch <= MAX_RUNS_PER_BATCH:
        raise ValueError(
            f"max_pages_per_batch must be 1..{MAX_RUNS_PER_BATCH}, not {max_pages_per_batch}"
        )
    starts, counts = set_runs(bitmap, npages)
    if starts.size == 0:
        return
    seq_end = np.cumsum(counts)
    seq_start = seq_end - counts
    total = int(seq_end[-1])
    pos = 0
    while pos < total:
        end = min(pos + max_pages_per_batch, total)
        i0 = int(np.searchsorted(seq_end, pos, side="right"))
        i1 = int(np.searchsorted(seq_start, end, side="left"))
        s = starts[i0:i1].copy()
        c = counts[i0:i1].copy()
        head = pos - int(seq_start[i0])
        s[0] += np.uint64(head)
        c[0] -= head
        c[-1] -= int(seq_end[i1 - 1]) - end
        yield make_runs(s, c, RunKind.DATA)
        pos = end


def expand_runs(runs: np.ndarray) -> np.ndarray:
    """Page numbers (int64) of every page in `runs`, in run order, without a Python loop."""
    counts = runs["npages"].astype(np.int64)
    seq_start = np.cumsum(counts) - counts
    offsets = runs["start"].astype(np.int64) - seq_start
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(offsets, counts)


def page_rows(mem: memoryview | bytearray | np.ndarray, page_size: int = PAGE_SIZE) -> np.ndarray:
    """Guest memory as a (pages, page_size/8) uint64 array: a view, never a copy."""
    arr = np.frombuffer(mem, dtype=np.uint8) if not isinstance(mem, np.ndarray) else mem
    arr = arr.reshape(-1)
    if arr.size % page_size:
        raise ValueError(f"guest memory size {arr.size} is not a multiple of {page_size}")
    return arr.view(np.uint64).reshape(-1, page_size // 8)


def outside_memory(rows: np.ndarray) -> ValueError:
    """The error for page numbers beyond `rows` (a C scan's non-zero return, or a check)."""
    return ValueError(f"pages outside the {rows.shape[0]} pages of memory")


def check_page_numbers(idx: np.ndarray, rows: np.ndarray) -> None:
    """ValueError unless every page number in `idx` is a row of `rows`."""
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= rows.shape[0]):
        raise outside_memory(rows)


def nonzero_pages(rows: np.ndarray, runs: np.ndarray, *, native: bool = True) -> np.ndarray:
    """bool per page of `runs` (run order): True where the page has a non-zero byte.

    In C (`native_library`), each page is read until its first non-zero cache line. In numpy
    (`native=False`, the reference, or where the C code cannot be built): most pages that hold
    data have a non-zero first word, and reading one word per page costs one cache line
    instead of 64: only the pages whose first word is zero are scanned in full (on RAM full of
    data, 1/64 of the bytes). A chunk where most first words are zero (zeroed RAM) is scanned
    whole, in place if its pages are contiguous, rather than gathered page by page."""
    idx = expand_runs(runs)
    out = np.empty(idx.size, dtype=bool)
    lib = native_library() if native and rows.flags.c_contiguous else None
    if lib is not None and rows.dtype == np.uint64 and rows.ndim == 2:
        if idx.size:
            rc = lib.pages_nonzero(
                rows.ctypes.data,
                rows.shape[0],
                rows.shape[1],
                idx.ctypes.data,
                idx.size,
                out.ctypes.data,
            )
            if rc != 0:
                raise outside_memory(rows)
        return out
    for off in range(0, idx.size, _ZERO_SCAN_CHUNK):
        sel = idx[off : off + _ZERO_SCAN_CHUNK]
        part = out[off : off + sel.size]
        first = int(sel[0])
        # Contiguous pages (the common case: long runs) are read in place, never gathered.
        # (The span test alone would take pages out of order or repeated, e.g. 0, 2, 1, 3, for
        # contiguous ones.)
        contiguous = int(sel[-1]) - first + 1 == sel.size and bool(np.all(np.diff(sel) == 1))
        block = rows[first : first + sel.size] if contiguous else None
        np.not_equal(rows[sel, 0] if block is None else block[:, 0], 0, out=part)
        doubtful = np.flatnonzero(~part)
        if doubtful.size * 4 > sel.size:
            (rows[sel] if block is None else block).any(axis=1, out=part)
        elif doubtful.size:
            part[doubtful] = rows[sel[doubtful]].any(axis=1)
    return out


def pages_to_runs(page_numbers: np.ndarray) -> np.ndarray:
    """DATA runs covering ascending page numbers."""
    if page_numbers.size == 0:
        return make_runs(np.empty(0, np.int64), np.empty(0, np.int64), RunKind.DATA)
    brk = np.empty(page_numbers.size, dtype=bool)
    brk[0] = True
    brk[1:] = np.diff(page_numbers) != 1
    first = np.flatnonzero(brk)
    counts = np.diff(np.append(first, page_numbers.size))
    return make_runs(page_numbers[first], counts, RunKind.DATA)


def split_zero_runs(
    mem: memoryview | bytearray | np.ndarray,
    runs: np.ndarray,
    page_size: int = PAGE_SIZE,
    allocated: np.ndarray | None = None,
) -> np.ndarray:
    """Re-split `runs` into DATA and ZERO runs according to the current memory contents.

    `allocated` (one bool per guest page, e.g. `GuestMemory.allocated()`) marks pages that
    can hold data; the others are holes, known to be zero, and are not read at all."""
    rows = page_rows(mem, page_size)
    if runs.size == 0:
        return runs.copy()
    pages = expand_runs(runs)
    if allocated is None:
        nonzero = nonzero_pages(rows, runs)
    else:
        alloc = allocated[pages]
        nonzero = np.zeros(pages.size, dtype=bool)
        if alloc.any():
            nonzero[alloc] = nonzero_pages(rows, pages_to_runs(pages[alloc]))
    kinds = np.where(nonzero, RunKind.DATA, RunKind.ZERO).astype(np.int8)
    brk = np.empty(pages.size, dtype=bool)
    brk[0] = True
    brk[1:] = (np.diff(pages) != 1) | (np.diff(kinds) != 0)
    first = np.flatnonzero(brk)
    counts = np.diff(np.append(first, pages.size))
    return make_runs(pages[first], counts, kinds[first])


def split_by_data(runs: np.ndarray, max_data_pages: int) -> list[np.ndarray]:
    """`runs` cut, in order, into pieces that each carry at most `max_data_pages` DATA pages
    (a DATA run is split where a piece fills up; ZERO runs carry no payload and ride along).
    For pacing: a rate-limited sender sends one piece, then waits what it cost."""
    if max_data_pages <= 0:
        raise ValueError(f"max_data_pages must be positive, not {max_data_pages}")
    if data_pages(runs) <= max_data_pages:
        return [runs]
    pages = expand_runs(runs)
    kinds = np.repeat(runs["kind"], runs["npages"].astype(np.int64))
    is_data = (kinds == RunKind.DATA).astype(np.int64)
    piece = (np.cumsum(is_data) - is_data) // max_data_pages  # by the DATA pages before it
    brk = np.empty(pages.size, dtype=bool)
    brk[0] = True
    brk[1:] = (np.diff(pages) != 1) | (np.diff(kinds) != 0) | (np.diff(piece) != 0)
    first = np.flatnonzero(brk)
    counts = np.diff(np.append(first, pages.size))
    pieces = make_runs(pages[first], counts, kinds[first])
    return np.split(pieces, np.flatnonzero(np.diff(piece[first])) + 1)


def data_pages(runs: np.ndarray) -> int:
    """Number of pages carried as payload (DATA runs)."""
    return int(runs["npages"][runs["kind"] == RunKind.DATA].sum(dtype=np.uint64))


def validate_runs(
    runs: np.ndarray,
    guest_pages: int,
    page_size: int = PAGE_SIZE,
    *,
    holes: Sequence[tuple[int, int]] = (),
) -> int:
    """Check a run list from the peer; return its payload size in bytes.

    Rejects (RemoteProtocolError): no runs, too many runs, empty runs, unknown kinds, runs
    reaching outside guest RAM or into one of its `holes` ((first_page, npages) ranges that
    are not RAM), runs not sorted or overlapping, payload over the batch cap.
    """
    n = runs.size
    if n == 0:
        raise RemoteProtocolError("PAGE_RUNS frame with no runs")
    if n > MAX_RUNS_PER_BATCH:
        raise RemoteProtocolError(f"PAGE_RUNS frame with {n} runs, more than {MAX_RUNS_PER_BATCH}")
    starts = runs["start"]
    counts = runs["npages"].astype(np.uint64)
    kinds = runs["kind"]
    bad = np.flatnonzero(counts == 0)
    if bad.size:
        raise RemoteProtocolError(f"run {bad[0]} (start page {starts[bad[0]]}) has 0 pages")
    bad = np.flatnonzero(kinds > RunKind.ZERO)
    if bad.size:
        raise RemoteProtocolError(f"run {bad[0]} has unknown kind {kinds[bad[0]]}")
    limit = np.uint64(guest_pages)
    bad = np.flatnonzero((starts >= limit) | (counts > limit - np.minimum(starts, limit)))
    if bad.size:
        i = bad[0]
        raise RemoteProtocolError(
            f"run {i} covers pages {starts[i]}..{int(starts[i]) + int(counts[i]) - 1}, "
            f"outside guest RAM of {guest_pages} pages"
        )
    ends = starts + counts  # no overflow: both are ≤ guest_pages now
    for first, n in holes:
        bad = np.flatnonzero((starts < np.uint64(first + n)) & (ends > np.uint64(first)))
        if bad.size:
            i = bad[0]
            raise RemoteProtocolError(
                f"run {i} covers pages {starts[i]}..{ends[i] - 1}, which reach into the "
                f"non-RAM pages {first}..{first + n - 1} (the MMIO gap)"
            )
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if bad.size:
        i = bad[0]
        raise RemoteProtocolError(
            f"runs {i} and {i + 1} overlap or are out of order: pages "
            f"{starts[i]}..{ends[i] - 1} then {starts[i + 1]}..{ends[i + 1] - 1}"
        )
    payload = int(counts[kinds == RunKind.DATA].sum(dtype=np.uint64)) * page_size
    if payload > MAX_BATCH_PAYLOAD:
        raise RemoteProtocolError(
            f"PAGE_RUNS payload of {payload} bytes exceeds the {MAX_BATCH_PAYLOAD}-byte batch cap"
        )
    return payload


def data_slices(mem: memoryview, runs: np.ndarray, page_size: int = PAGE_SIZE) -> list[memoryview]:
    """One memoryview of `mem` per DATA run, in run order (runs must be validated)."""
    sel = runs[runs["kind"] == RunKind.DATA]
    first = sel["start"].astype(np.uint64)
    last = first + sel["npages"].astype(np.uint64)  # exclusive
    if sel.size and (int(last.max()) * page_size > mem.nbytes or (last <= first).any()):
        raise ValueError(f"runs reach past the {mem.nbytes}-byte memory: validate them first")
    starts = (first.astype(np.int64) * page_size).tolist()
    ends = (last.astype(np.int64) * page_size).tolist()
    return [mem[a:b] for a, b in zip(starts, ends, strict=True)]


def zero_fill(mem: memoryview, runs: np.ndarray, page_size: int = PAGE_SIZE) -> None:
    """Zero the pages of the ZERO runs in `mem` (runs must be validated)."""
    sel = runs[runs["kind"] == RunKind.ZERO]
    if sel.size == 0:
        return
    rows = page_rows(mem, page_size)
    if sel.size <= 64:
        for start, n in zip(sel["start"].tolist(), sel["npages"].tolist(), strict=True):
            rows[start : start + n] = 0
    else:
        rows[expand_runs(sel)] = 0


def runs_to_bits(runs: np.ndarray, npages: int) -> np.ndarray:
    """Inverse of bits_to_runs for tests and accounting: a 0/1 uint8 array of `npages`."""
    bits = np.zeros(npages, dtype=np.uint8)
    bits[expand_runs(runs)] = 1
    return bits


__all__ = [
    "DEFAULT_BATCH_PAGES",
    "PAGE_SIZE",
    "RUN_DTYPE",
    "bitmap_to_bits",
    "bitmap_to_runs",
    "bits_to_runs",
    "check_page_numbers",
    "count_dirty",
    "data_pages",
    "data_slices",
    "expand_runs",
    "native_library",
    "nonzero_pages",
    "outside_memory",
    "page_rows",
    "runs_to_bits",
    "split_zero_runs",
    "validate_runs",
    "zero_fill",
]
