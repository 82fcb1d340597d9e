"""Deferred re-arming of KVM's dirty log (`KvmDirtyLog.harvest(protect=False)` + `reprotect`),
against a model of KVM's manual-protect semantics: a harvest that only reads, each batch
re-armed right before it is read, and no write ever lost, whatever the interleaving."""

from __future__ import annotations

import ctypes

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig import bitmap
from ptmig.dirty import KvmDirtyLog
from ptmig.kvm.ioctls import KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE

# Two memslots with a gap between them, the second one not a multiple of 64 pages long.
SLOTS = [(0, 0, 100), (1, 128, 70)]
SPAN = 198
RAM_PAGES = [p for _, first, n in SLOTS for p in range(first, first + n)]
# Pages where mistakes show: words' edges, slots' ends, and the same offsets in both slots
EDGES = [0, 1, 2, 63, 64, 65, 69, 99, 128, 129, 130, 191, 192, 197]


def _words(addr: int, nbits: int) -> np.ndarray:
    n = (nbits + 63) // 64
    return np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(addr))


class KvmModel:
    """A VM fd's dirty log as KVM keeps it: per page a dirty bit and whether the guest may
    write without faulting. A write to a protected page faults, sets the bit and unprotects
    it. With manual protect, GET_DIRTY_LOG only reads and CLEAR_DIRTY_LOG clears and
    protects the pages of its mask that are set; without it, GET does both."""

    def __init__(self, manual: bool = True) -> None:
        self.manual = manual
        self.dirty = np.zeros(SPAN, dtype=bool)
        self.writable = np.zeros(SPAN, dtype=bool)
        self.faults = 0
        self.clears: list[tuple[int, int, int]] = []

    def check_extension(self, cap: int) -> int:
        return KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE if self.manual else 0

    def enable_cap(self, cap: int, arg: int) -> None:
        assert self.manual

    def guest_write(self, page: int) -> None:
        if not self.writable[page]:
            self.faults += 1
            self.writable[page] = True
            self.dirty[page] = True

    def _slot(self, slot: int) -> tuple[int, int]:
        _, first, n = SLOTS[slot]
        return first, n

    def get_dirty_log(self, slot: int, addr: int) -> None:
        first, n = self._slot(slot)
        _words(addr, n)[:] = bitmap.from_bool(self.dirty[first : first + n])
        if not self.manual:
            self.writable[first : first + n] &= ~self.dirty[first : first + n]
            self.dirty[first : first + n] = False

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, addr: int) -> None:
        first, n = self._slot(slot)
        # KVM's rules (EINVAL otherwise): an aligned start, whole words unless at the slot's end
        assert first_page % 64 == 0, first_page
        assert num_pages % 64 == 0 or first_page + num_pages == n, (first_page, num_pages)
        assert 0 < num_pages and first_page + num_pages <= n
        self.clears.append((slot, first_page, num_pages))
        mask = bitmap.to_bool(_words(addr, num_pages).copy(), num_pages)
        pages = first + first_page + np.flatnonzero(mask)
        hit = pages[self.dirty[pages]]
        self.dirty[hit] = False
        self.writable[hit] = False


def _log(model: KvmModel) -> KvmDirtyLog:
    return KvmDirtyLog(model, SLOTS, SPAN)  # type: ignore[arg-type]


def _pages(*numbers: int) -> np.ndarray:
    return np.array(numbers, dtype=np.int64)


def test_a_deferred_harvest_leaves_the_pages_writable_and_reports_them_until_rearmed() -> None:
    kvm = KvmModel()
    log = _log(kvm)
    for p in (3, 70, 150):
        kvm.guest_write(p)
    assert bitmap.pages(log.harvest(protect=False), SPAN).tolist() == [3, 70, 150]
    assert kvm.writable[[3, 70, 150]].all() and kvm.clears == []
    kvm.guest_write(3)  # written again before its batch: no fault
    assert kvm.faults == 3
    assert log.reprotect(_pages(3)) == 1
    assert not kvm.writable[3] and kvm.writable[70]
    # not re-armed: reported again by the next harvest; re-armed and not written: not
    assert bitmap.pages(log.harvest(protect=False), SPAN).tolist() == [70, 150]
    kvm.guest_write(3)  # written after its re-arming: a fault, and in the next harvest
    assert kvm.faults == 4
    assert bitmap.pages(log.harvest(protect=False), SPAN).tolist() == [3, 70, 150]


def test_rearming_touches_only_the_pages_given_not_their_words_neighbours() -> None:
    """A page already sent shares its 64-page word with pages still to send: re-arming it
    after its read would lose a write landing between the two."""
    kvm = KvmModel()
    log = _log(kvm)
    for p in (1, 2, 3, 63, 64):
        kvm.guest_write(p)
    log.harvest(protect=False)
    assert log.reprotect(_pages(2, 3)) == 2
    assert kvm.writable[[1, 63, 64]].all() and not kvm.writable[[2, 3]].any()
    assert log.reprotect(_pages(2, 3)) == 0  # nothing left to re-arm there: no ioctl
    assert len(kvm.clears) == 1


def test_rearming_across_the_gap_and_a_slots_odd_end_keeps_kvms_rules() -> None:
    kvm = KvmModel()
    log = _log(kvm)
    for p in (70, 99, 128, 197):
        kvm.guest_write(p)
    log.harvest(protect=False)
    # one call's pages run from the first slot over the gap to the second slot's last page
    assert log.reprotect(_pages(70, 99, 110, 128, 197)) == 4
    assert {(s, f) for s, f, _ in kvm.clears} == {(0, 64), (1, 0)}
    assert not kvm.writable.any()


def test_a_protecting_harvest_rearms_everything_including_what_was_deferred() -> None:
    kvm = KvmModel()
    log = _log(kvm)
    for p in (5, 130):
        kvm.guest_write(p)
    log.harvest(protect=False)
    kvm.guest_write(6)
    assert bitmap.pages(log.harvest(), SPAN).tolist() == [5, 6, 130]
    assert not kvm.writable.any()
    assert log.reprotect(_pages(5, 6)) == 0


def test_without_manual_protect_the_harvest_has_already_rearmed() -> None:
    kvm = KvmModel(manual=False)
    log = _log(kvm)
    kvm.guest_write(9)
    assert bitmap.pages(log.harvest(protect=False), SPAN).tolist() == [9]
    assert not kvm.writable[9]
    assert log.reprotect(_pages(9)) == 0 and kvm.clears == []


def test_a_page_rewritten_between_harvest_and_batch_costs_no_fault() -> None:
    """What deferring buys: pages the guest writes between a harvest and their batch fault
    only when they were re-armed before (by a batch), not once after every harvest. Here a
    working set written early in each round: the eager harvest re-arms it every round, so
    every round's writes fault; deferred, a round's writes fault only when the previous
    round's batch re-armed the pages, and land before this round's batch otherwise."""
    faults = {}
    for deferred in (False, True):
        kvm = KvmModel()
        log = _log(kvm)
        hot = range(0, 64)
        for p in hot:
            kvm.guest_write(p)
        start = kvm.faults
        for _ in range(4):  # rounds: harvest, the guest writes, the round's batch is sent
            batch = bitmap.pages(log.harvest(protect=not deferred), SPAN)
            for p in hot:
                kvm.guest_write(p)
            log.reprotect(batch)
        faults[deferred] = kvm.faults - start
    assert faults == {False: 4 * 64, True: 2 * 64}


Op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(EDGES) | st.sampled_from(RAM_PAGES)),
    st.tuples(st.just("send"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("harvest"), st.just(0)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(Op, max_size=120), st.booleans())
def test_no_write_is_lost_whatever_the_interleaving(
    ops: list[tuple[str, int]], manual: bool
) -> None:
    """The source's order against a guest writing at any moment: round 0 sends all RAM after
    a deferred reset, each round's pages go in batches of any of its pages (re-armed, then
    read; several channels send interleaved stripes), the next round
    is a deferred harvest; at the end the guest stops, the last harvest is read without
    re-arming and its pages sent. The destination then holds every page as the guest left it."""
    kvm = KvmModel(manual)
    log = _log(kvm)
    memory = np.zeros(SPAN, dtype=np.int64)
    dest = np.full(SPAN, -1, dtype=np.int64)
    version = 0

    def write(page: int) -> None:
        nonlocal version
        version += 1
        kvm.guest_write(page)
        memory[page] = version

    for p in RAM_PAGES[::7]:  # the guest ran before the migration
        write(p)
    log.harvest(protect=False)  # the reset
    todo = list(RAM_PAGES)  # round 0: all of RAM

    def send(batch: list[int]) -> None:
        log.reprotect(np.array(batch, dtype=np.int64))
        dest[batch] = memory[batch]

    for op, arg in ops:
        if op == "write":
            write(arg)
        elif op == "send":  # any part of the round: data channels send stripes at once
            rng = np.random.default_rng(arg)
            take = rng.random(len(todo)) < rng.random()
            send([p for p, t in zip(todo, take, strict=True) if t])
            todo = [p for p, t in zip(todo, take, strict=True) if not t]
        else:  # a round ends: what is left of it goes, then the next round's harvest
            send(todo)
            todo = bitmap.pages(log.harvest(protect=False), SPAN).tolist()
    pending = bitmap.from_pages(todo, SPAN)
    log.harvest_into(pending, protect=False)  # the stop-and-copy: the guest is stopped
    final = bitmap.pages(pending, SPAN)
    dest[final] = memory[final]
    ram = np.array(RAM_PAGES)
    assert (dest[ram] == memory[ram]).all()
