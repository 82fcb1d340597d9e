"""A pre-copy round in chunks without the pages written again (`ptmig.migration.redirty`): no
KVM here, the log is a bitmap the test writes as the guest would."""

from __future__ import annotations

import numpy as np
import pytest

from ptmig import bitmap
from ptmig.migration.redirty import RoundChunks

NPAGES = 1 << 12


def chunks_of(chunks: RoundChunks) -> list[list[int]]:
    return [bitmap.pages(part, NPAGES).tolist() for part in chunks]


def test_without_a_log_the_round_is_its_pages_in_order_in_chunks() -> None:
    dirty = bitmap.from_pages([5, 1, 700, 64, 65, 4000], NPAGES)
    chunks = RoundChunks(dirty, NPAGES, 2, None)
    assert chunks_of(chunks) == [[1, 5], [64, 65], [700, 4000]]
    assert chunks.skipped == 0


def test_a_page_written_again_before_its_chunk_is_left_out_and_counted() -> None:
    dirty = bitmap.from_pages(range(0, 100), NPAGES)
    written: list[int] = []  # what the "guest" wrote since the round's harvest

    def peek(out: bitmap.Bitmap) -> bool:
        out[:] = bitmap.from_pages(written, NPAGES) if written else bitmap.empty(NPAGES)
        return True

    chunks = RoundChunks(dirty, NPAGES, 40, peek)
    got = []
    for part in chunks:
        got.append(bitmap.pages(part, NPAGES).tolist())
        written.extend([10, 45, 90, 3000])  # 10 was sent already; 3000 is not in the round
    assert got[0] == list(range(0, 40))
    assert got[1] == [p for p in range(40, 80) if p != 45]
    assert got[2] == [p for p in range(80, 100) if p != 90]
    assert chunks.skipped == 2


def test_a_log_that_cannot_be_read_without_clearing_sends_everything() -> None:
    calls = []

    def peek(out: bitmap.Bitmap) -> bool:
        calls.append(1)
        return False

    chunks = RoundChunks(bitmap.from_pages(range(10), NPAGES), NPAGES, 3, peek)
    assert sum(len(c) for c in chunks_of(chunks)) == 10 and chunks.skipped == 0
    assert calls == [1]  # asked once, then not again


def test_every_page_written_again_leaves_empty_chunks_out() -> None:
    def peek(out: bitmap.Bitmap) -> bool:
        out[:] = np.uint64(2**64 - 1)
        return True

    chunks = RoundChunks(bitmap.from_pages(range(50), NPAGES), NPAGES, 16, peek)
    assert chunks_of(chunks) == [] and chunks.skipped == 50
    with pytest.raises(ValueError, match="at least 1 page"):
        RoundChunks(bitmap.empty(NPAGES), NPAGES, 0, None)
