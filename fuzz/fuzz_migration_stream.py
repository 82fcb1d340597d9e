"""Fuzz the destination side of the migration protocol with untrusted byte streams.

With atheris installed (optional, not a dependency): `python fuzz/fuzz_migration_stream.py`
runs coverage-guided fuzzing. Without it, the same target runs over random mutations of a valid
stream for `--iterations` rounds. The invariant: feeding any bytes to a destination Connection
raises nothing but RemoteProtocolError, and guest RAM outside the runs it accepted is untouched.
"""

from __future__ import annotations

import argparse
import random
import sys
import zlib

import numpy as np

from ptmig.migration import (
    NEED_DATA,
    Connection,
    HelloAck,
    PageRunsHeader,
    RemoteProtocolError,
    Role,
    RoundEnd,
    RoundStart,
    RunKind,
    frames,
    hello,
    make_runs,
)
from ptmig.migration.pages import expand_runs

PAGES = 16
PS = 4096
FILL = 0x5A


def seed_stream() -> bytes:
    runs = make_runs([0, 3, 9], [2, 4, 1], [RunKind.DATA, RunKind.ZERO, RunKind.DATA])
    payload = bytes(range(256)) * 16 * 3
    return (
        frames.encode_event(RoundStart(0, 7))
        + frames.encode_page_runs(runs, zlib.crc32(payload))
        + payload
        + frames.encode_event(RoundEnd(0))
    )


def target(data: bytes) -> None:
    dst = Connection(Role.DESTINATION, guest_pages=PAGES)
    dst.receive_data(frames.MAGIC + frames.encode_event(hello({"mem_size": PAGES * PS})))
    dst.next_event()
    dst.send(HelloAck(True))
    ram = bytearray([FILL]) * (PAGES * PS)
    allowed = np.zeros(PAGES, dtype=bool)
    try:
        dst.receive_data(data)
        while (ev := dst.next_event()) is not NEED_DATA:
            if isinstance(ev, PageRunsHeader):
                allowed[expand_runs(ev.runs)] = True
                dst.payload_targets(ram)
        dst.receive_data(b"")
        dst.next_event()
    except RemoteProtocolError:
        pass
    rows = np.frombuffer(ram, np.uint8).reshape(PAGES, PS)
    if len(ram) != PAGES * PS or not (rows[~allowed] == FILL).all():
        raise AssertionError("destination wrote guest RAM outside the runs it accepted")


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del buf[pos:]
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf)


def main() -> None:
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is not None and "--no-atheris" not in sys.argv:
        atheris.Setup(sys.argv, lambda b: target(bytes(b)))
        atheris.Fuzz()
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-atheris", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seed = seed_stream()
    for _ in range(args.iterations):
        target(mutate(rng, seed) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 512)))
    print(f"{args.iterations} streams, no invariant broken")


if __name__ == "__main__":
    main()
