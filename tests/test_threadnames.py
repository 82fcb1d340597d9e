"""The VMM's threads carry their Python names as OS names (`ptmig.threadnames`)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from ptmig.threadnames import COMM_LEN, install, os_name

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="thread names are Linux's")


def _comm_of(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n")


def test_os_name_takes_a_default_names_target_and_cuts_to_what_the_kernel_keeps() -> None:
    assert os_name("Thread-12 (receiver)") == "receiver"
    assert os_name("migration-source") == "migration-sourc"
    assert len(os_name("é" * 20).encode()) <= COMM_LEN
    assert os_name("Thread-3") == "Thread-3"


def test_a_thread_started_after_install_names_itself_and_runs_unprofiled() -> None:
    seen: list[tuple[str, object]] = []

    def body() -> None:
        seen.append((_comm_of(threading.get_native_id()), sys.getprofile()))

    def run(name: str | None) -> None:
        t = threading.Thread(target=body, name=name)
        t.start()
        t.join()

    install()
    try:
        run("incoming-data-7")
        run(None)  # a default name: its target's
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    run("incoming-data-7")  # no longer installed: the process's name stays
    assert seen[:2] == [("incoming-data-7", None), ("body", None)]
    assert seen[2][0] != "incoming-data-7"
