"""Verification after the switchover: digests of the source's frozen RAM follow the ack, the
destination answers with a VerifyReport; nothing of it is part of the downtime."""

from __future__ import annotations

import numpy as np
import pytest
from test_migration_protocol import PAGES, drain, handshake, random_ram, source_stream, src_dst

from ptmig.migration import (
    Abort,
    ConnectionClosed,
    LocalProtocolError,
    RemoteProtocolError,
    State,
    SwitchoverAck,
    VerifyDigests,
    VerifyReport,
)
from ptmig.migration.frames import FrameType, encode_frame
from ptmig.migration.verify import compare_digests, digests_to_bytes, page_digests


def switched_over() -> tuple:
    src, dst = src_dst()
    handshake(src, dst)
    ram = random_ram(7)
    dest = bytearray(len(ram))
    drain(dst, source_stream(src, ram, [np.full(PAGES // 8, 0xFF, np.uint8)]), dest)
    assert drain(src, dst.send(SwitchoverAck(True))) == [SwitchoverAck(True)]
    return src, dst, ram, dest


def test_digests_after_the_ack_and_a_report_back() -> None:
    src, dst, ram, dest = switched_over()
    dest[5 * 4096] ^= 1  # a page the destination got wrong
    d = digests_to_bytes(page_digests(ram))
    events = drain(dst, src.send(VerifyDigests(0, d[:80])) + src.send(VerifyDigests(10, d[80:])))
    assert [type(e) for e in events] == [VerifyDigests, VerifyDigests]
    res = compare_digests(page_digests(ram), page_digests(dest))
    report = VerifyReport(res.pages, res.mismatched, tuple(int(p) for p in res.first_mismatched))
    assert drain(src, dst.send(report)) == [report]
    assert report.mismatched == 1 and report.first_mismatched == (5,)
    assert src.state is dst.state is State.VERIFIED
    src.receive_data(b"")
    assert src.next_event() == ConnectionClosed()


def test_closing_right_after_the_ack_is_still_clean() -> None:
    src, dst, _, _ = switched_over()
    dst.receive_data(b"")
    assert dst.next_event() == ConnectionClosed()


def test_report_before_every_digest_is_rejected() -> None:
    src, dst, ram, _ = switched_over()
    d = digests_to_bytes(page_digests(ram))
    drain(dst, src.send(VerifyDigests(0, d[:80])))
    with pytest.raises(LocalProtocolError, match="VerifyReport after digests of 10 pages"):
        dst.send(VerifyReport(PAGES, 0))


def test_no_abort_after_the_switchover() -> None:
    src, dst, _, _ = switched_over()
    with pytest.raises(LocalProtocolError):
        src.send(Abort("too late"))


def test_malformed_report_is_a_remote_error() -> None:
    src, dst, ram, _ = switched_over()
    d = digests_to_bytes(page_digests(ram))
    drain(dst, src.send(VerifyDigests(0, d)))
    bogus = encode_frame(
        FrameType.VERIFY_REPORT,
        (10).to_bytes(8, "little") + (99).to_bytes(8, "little") + (0).to_bytes(4, "little"),
    )
    src.receive_data(bogus)
    with pytest.raises(RemoteProtocolError, match="99 mismatched of 10"):
        src.next_event()
