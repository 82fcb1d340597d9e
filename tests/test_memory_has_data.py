"""`GuestMemory.has_data`: whether a page range holds allocated pages, without reading them
(the post-copy sender asks it per frame to send holes as zero pages)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.layout import PAGE_SIZE
from ptmig.memory import GuestMemory, GuestMemoryError

PAGES = 256


@pytest.fixture(scope="module")
def mem() -> GuestMemory:
    return GuestMemory(PAGES * PAGE_SIZE, name="has-data-test")


@settings(max_examples=60, deadline=None)
@given(
    st.sets(st.integers(0, PAGES - 1), max_size=20),
    st.integers(0, PAGES - 1),
    st.integers(1, 64),
)
def test_a_range_has_data_exactly_when_one_of_its_pages_was_written(
    mem: GuestMemory, written: set[int], first: int, npages: int
) -> None:
    npages = min(npages, PAGES - first)
    mem.punch_zero(0, PAGES)
    for p in written:
        mem.write(p * PAGE_SIZE, b"\x01")
    expect = any(first <= p < first + npages for p in written)
    assert mem.has_data(first, npages) is expect


def test_a_range_outside_guest_ram_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError):
        mem.has_data(PAGES - 1, 2)


@pytest.mark.parametrize("gpa", [0x4000, 0x4001, 0x4FFF])
def test_two_byte_reads_are_the_bytes_there_aligned_or_not(mem: GuestMemory, gpa: int) -> None:
    """`read` of 2 aligned bytes is one 16-bit load (ring indices); its bytes are the same."""
    mem.write(gpa, b"\xcd\xab")
    assert mem.read(gpa, 2) == b"\xcd\xab"
    assert mem.read_u16(gpa) == 0xABCD
