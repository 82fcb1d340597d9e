"""Shared fixtures. KVM tests are marked `kvm` and skip (with the reason) where /dev/kvm is not
usable; everything else runs anywhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent


# Property tests judge behaviour, not speed: a loaded CI host must not fail an example for
# taking longer than hypothesis' default 200 ms deadline, or for generating slowly.
settings.register_profile(
    "ptmig", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ptmig")


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    return None


def _available_gib() -> float:
    from ptmig.memory import host_available_memory

    return (host_available_memory() or 0) / (1 << 30)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = _kvm_problem()
    for item in items:
        if problem and "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"needs KVM: {problem}"))
        big = item.get_closest_marker("bigmem")
        if big is not None and (have := _available_gib()) < big.args[0]:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs {big.args[0]} GiB of host memory, {have:.1f} GiB available"
                )
            )
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root (CAP_NET_ADMIN, namespaces)"))


@pytest.fixture(scope="session")
def firmware():
    from ptmig.firmware import build_firmware, load_firmware_image

    return load_firmware_image(build_firmware())


@pytest.fixture
def python() -> str:
    return sys.executable


# Every process this test session starts inherits this marker; teardown ends only the switches
# that carry it, so two test sessions on one machine never end each other's switches.
SESSION_MARK = f"PTMIG_TEST_SESSION={os.getpid()}-{os.urandom(4).hex()}"
os.environ["PTMIG_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]


def _switch_pids_of_this_session() -> set[int]:
    """Running `ptmig.net.switch` processes (and vhost-user `qemu-storage-daemon`s, which
    outlive a VMM that was killed) started under this session (a VMM started with
    switch = "auto" starts one detached, on purpose: it outlives the VMM, other VMs may share
    it; it ends itself a minute after the last datagram, but a test session should not leave
    them behind)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if b"ptmig.net.switch" not in cmdline and b"qemu-storage-daemon" not in cmdline:
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if SESSION_MARK.encode() in environ:
                pids.add(int(entry.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def _end_the_switches_tests_started():
    """Switches and storage daemons the tests' VMMs started end with the session."""
    yield
    import signal

    for pid in _switch_pids_of_this_session():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
