"""The shared disk image: two VMMs (a migration's source and destination) create it at once."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from ptmig.devices.blk import BlkConfig, open_image

SIZE = 1 << 20


def _open(path: str, q: mp.Queue) -> None:
    try:
        fd, size = open_image(BlkConfig(path, SIZE))
        os.close(fd)
        q.put(size)
    except Exception as e:  # reported to the test, which fails on it
        q.put(repr(e))


def test_concurrent_creation_never_fails_nor_sees_a_half_made_image(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for i in range(20):
        path = str(tmp_path / f"disk{i}.img")
        q = ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, q)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results = [q.get() for _ in procs]
        assert results == [SIZE] * 4, results
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".new")], "temporary files left"
