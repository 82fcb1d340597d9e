"""The native device reads the driver's avail idx in one load while the driver advances it.

A copy of the two bytes through memcpy() can take them at different moments (glibc's 2-byte copy
loads the last byte on its own); a device thread preempted between the two while the driver
crossed a multiple of 256 read an index up to 255 entries past the driver's, took the ring for
a hostile one and broke the NIC for good (seen once in a demo, after the switchover). The harness
tests/native/ring_index_race.c reads the index with native/virtq.c's rd16 while a thread advances
it as fast as it can, and counts the values the writer never wrote; with the memcpy() read it
counted hundreds in 20 million reads on a 2-core host.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ptmig.firmware import find_compiler
from ptmig.nativelib import NATIVE_DIR

HARNESS = Path(__file__).parent / "native" / "ring_index_race.c"
READS = 50_000_000


def test_the_avail_idx_is_never_read_torn_while_the_driver_advances_it(tmp_path: Path) -> None:
    exe = tmp_path / "ring_index_race"
    subprocess.run(
        [find_compiler(), "-std=gnu11", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror"]
        + ["-I", str(NATIVE_DIR), str(HARNESS), "-o", str(exe)],
        check=True,
    )
    run = subprocess.run([str(exe), str(READS)], capture_output=True, text=True, timeout=120)
    torn = (run.returncode, run.stdout.strip())
    assert torn == (0, "0"), (torn, run.stderr)
