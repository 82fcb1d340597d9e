"""A pre-copy round sent in chunks, leaving out the pages the guest wrote again meanwhile.

A round sends the pages its harvest found dirty, in address order, over as long as the
bandwidth makes it take (at 100 MiB/s a round of a kv guest at half load is 0.3-2 s). A page
the guest writes again before the round reaches it would be sent now and again in the next
round, which has to send it anyway: its bytes now are wasted, and the closer the bandwidth is
to the guest's dirty rate, the more of a round they are (the pages are what makes the guest's
hot set). So a round is sent as several protocol rounds ("chunks", each RoundStart .. RoundEnd
with its exact page count, so the destination and the protocol see nothing new), and before
each chunk KVM's dirty log is read without clearing it (`KvmDirtyLog.peek_into`: with
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 a GET_DIRTY_LOG reads, only CLEAR_DIRTY_LOG re-protects).
A page the log shows written since the round's harvest leaves the chunk.

Why nothing is lost: the log's bit of a page is set by a write after the page's last CLEAR,
and stays set until the next harvest reports and clears it. The round's harvest cleared every
page it reported, so a set bit at a peek means a write after that harvest, and the next
harvest (the next round's, or the stop-and-copy's, which sends everything it finds) reports
the page. Only KVM's log is peeked: pages dirtied by the VMM or a DMA strategy are always sent.
Without manual protection a read of the log would clear it, so there is no peek and no skip.
Round 0 (every page of RAM) is chunked too: its "harvest" is the reset at the migration's
start, which cleared the log the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .. import bitmap
from ..bitmap import Bitmap

Peek = Callable[[Bitmap], bool]  # fills a span bitmap with the log's pages; False: cannot


class RoundChunks:
    """The pages of `dirty` in address order, in chunks of at most `chunk` pages, each as a
    span bitmap and without the pages `peek` reports written since the round's harvest.
    `skipped` counts the pages left out so far."""

    def __init__(self, dirty: Bitmap, npages: int, chunk: int, peek: Peek | None) -> None:
        if chunk < 1:
            raise ValueError(f"chunk={chunk} must be at least 1 page")
        self.pending = bitmap.pages(dirty, npages)
        self.npages = npages
        self.chunk = chunk
        self.skipped = 0
        self._peek = peek
        self._log: Bitmap | None = None

    def __iter__(self) -> Iterator[Bitmap]:
        pos = 0
        while pos < self.pending.size:
            candidates = self.pending[pos : pos + self.chunk]
            pos += candidates.size
            keep = self._not_written_again(candidates)
            self.skipped += candidates.size - keep.size
            if keep.size:
                yield bitmap.from_pages(keep, self.npages)

    def _not_written_again(self, candidates: np.ndarray) -> np.ndarray:
        if self._peek is None:
            return candidates
        if self._log is None:
            self._log = bitmap.empty(self.npages)  # the holes' words stay 0: never read
        if not self._peek(self._log):
            self._peek = None  # (the log cannot be read without clearing it)
            return candidates
        words = self._log[candidates >> 6]
        again = (words >> (candidates & 63).astype(np.uint64)) & np.uint64(1)
        return candidates[again == 0]


__all__ = ["Peek", "RoundChunks"]
