"""What a VMM process carries: modules and C-heap policy that cost private memory.

A VMM's private memory counts against the guest (`memstats`, the scale bench's goal). The
modules a plain (`--insecure` or unix-socket) VMM never uses must not be loaded by the code a
`ptmig run` imports: `cryptography` (PSK channels) and `ssl` (TLS channels) load on first use.
Each check runs in a fresh interpreter, so what another test imported does not hide an import.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys

import pytest

from ptmig import memstats
from ptmig.lazyimport import lazy_module
from ptmig.migration import transport

# what `ptmig run` (source or destination) imports before it knows which channel it will use
RUN_PATH = (
    "ptmig.cli",
    "ptmig.machine",
    "ptmig.migration.source",
    "ptmig.migration.destination",
    "ptmig.migration.transport",
    "ptmig.migration.channels",
)


def _loaded_after(imports: tuple[str, ...], code: str = "") -> set[str]:
    script = (
        "import importlib, json, sys\n"
        f"for m in {list(imports)!r}: importlib.import_module(m)\n"
        f"{code}\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_a_vmm_that_runs_no_sealed_or_tls_channel_loads_neither_cryptography_nor_ssl() -> None:
    loaded = _loaded_after(RUN_PATH)
    assert not {m for m in loaded if m.split(".")[0] == "cryptography"}
    assert "_ssl" not in loaded  # `ssl` itself is the lazy placeholder until first use


def test_a_psk_key_derivation_loads_cryptography_when_it_is_used() -> None:
    loaded = _loaded_after(
        ("ptmig.migration.seal",),
        "from ptmig.migration import seal; seal.Session.start(b'k' * 32, b'n' * 32, b'c' * 32)",
    )
    assert "cryptography.hazmat.primitives.kdf.hkdf" in loaded


def test_a_tls_context_loads_ssl_when_it_is_used() -> None:
    loaded = _loaded_after(
        ("ptmig.migration.transport",),
        "from ptmig.migration import transport; transport.ssl.SSLContext",
    )
    assert "_ssl" in loaded


def test_a_lazy_module_runs_on_first_attribute_and_is_the_real_module_afterwards() -> None:
    loaded = _loaded_after(
        ("ptmig.lazyimport",),
        "from ptmig.lazyimport import lazy_module\n"
        "m = lazy_module('colorsys')\n"
        "assert 'colorsys' in sys.modules\n"
        "assert m.rgb_to_hsv(1.0, 0.0, 0.0)[0] == 0.0",
    )
    assert "colorsys" in loaded
    assert lazy_module("json") is json  # already imported: the module itself


def test_an_unknown_lazy_module_is_refused_at_once() -> None:
    try:
        lazy_module("ptmig_no_such_module")
    except ImportError as e:
        assert "ptmig_no_such_module" in str(e)
    else:
        raise AssertionError("lazy_module accepted a module that does not exist")


def test_tls_is_told_from_the_socket_class_without_loading_ssl() -> None:
    plain = socket.socket()
    wrapped = ssl.create_default_context().wrap_socket(
        socket.socket(), server_hostname="peer", do_handshake_on_connect=False
    )
    try:
        assert transport._is_tls(plain) is False
        assert transport._is_tls(wrapped) is True
    finally:
        plain.close()
        wrapped.close()


def test_the_c_heap_policy_is_applied_and_trimming_returns_freed_pages() -> None:
    script = (
        "import ctypes, sys\n"
        "from ptmig import memstats\n"
        "def anon():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('RssAnon:'): return int(line.split()[1])\n"
        "assert memstats.tune_malloc()\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        # blocks under the mmap threshold, touched, then freed but the last: the live one on
        # top keeps the heap from shrinking by itself, so only a trim gives the pages back
        "blocks = [libc.malloc(200_000) for _ in range(200)]\n"
        "for b in blocks: ctypes.memset(b, 1, 200_000)\n"
        "for b in blocks[:-1]: libc.free(b)\n"
        "before = anon()\n"
        "memstats.release_free_memory()\n"
        "print(before, anon())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    before, after = map(int, out.stdout.split())
    assert before - after >= 20_000, (before, after)  # KiB: most of the 39 MiB went back
    assert memstats.ARENA_MAX >= 1


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not glibc (musl has no malloc_trim): the policy says it did nothing, the trim is a no-op."""
    monkeypatch.setattr(memstats, "_glibc", lambda: None)
    assert memstats.tune_malloc() is False
    memstats.release_free_memory()  # nothing to call: no error
