"""What a VMM process carries: modules and C-heap policy that cost private memory.

A VMM's private memory counts against the guest (`memstats`, the scale bench's goal). The
modules a plain (`--insecure` or unix-socket) VMM never uses must not be loaded by the code a
`ptmig run` imports: `cryptography` (PSK channels) and `ssl` (TLS channels) load on first use.
Each role's modules load when the role starts: a VM that only runs carries neither the source
nor the destination, post-copy, shadowing, vhost-user, numpy or the front ends (click
included: `ptmig run` hands its parsed options to `ptmig.runvm` by exec); `migrate` loads the
source's, an incoming migration the destination's, `x-shadow-start` shadowing's.
Neither a running nor a migrating VMM loads OpenSSL's libcrypto through `hashlib`, `hmac` or
`secrets` (`ptmig.tokens`): not at import, and not for what it computes at run time (the
firmware's cache digest, migration ids and session tokens, a peer token's comparison).
Each check runs in a fresh interpreter, so what another test imported does not hide an import.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from vmmrig import dirty_config, migration_pair

from ptmig import memstats, tokens
from ptmig.lazyimport import lazy_module
from ptmig.migration import seal, transport
from ptmig.runvm import VmmOptions

# what the `ptmig run` process imports to run a VM, once its options are parsed (`runvm.run`)
RUN_PATH = ("ptmig.runvm", "ptmig.config", "ptmig.machine", "ptmig.memstats")
# what a migrating VMM (source or destination) imports before it knows which channel it uses
MIGRATING_PATH = (
    *RUN_PATH,
    "ptmig.migration.source",
    "ptmig.migration.destination",
    "ptmig.migration.transport",
    "ptmig.migration.channels",
)
# modules of the roles a VM that only runs does not have, and of the front ends
SOURCE_ROLE = ("ptmig.migration.source", "ptmig.migration.channels", "ptmig.migration.policy")
DESTINATION_ROLE = ("ptmig.migration.destination",)
MIGRATION_ROLES = (
    *SOURCE_ROLE,
    *DESTINATION_ROLE,
    "ptmig.migration.protocol",
    "ptmig.migration.transport",
    "ptmig.migration.fate",
    "ptmig.migration.recovery",
)
POSTCOPY_ROLE = ("ptmig.migration.postcopy", "ptmig.migration.postcopy_devices")
SHADOW_ROLE = ("ptmig.shadow.engine", "ptmig.shadow.tracking", "ptmig.shadow.native")
DEVICES_ROLE = ("ptmig.devices.attach", "ptmig.devices.handle", "ptmig.devices.vhost_user")
FRONT_ENDS = (
    "ptmig.cli",
    "ptmig.bench",
    "ptmig.report",
    "ptmig.demo",
    "ptmig.load",
    "click",
    "rich",
    "matplotlib",
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


def _of(loaded: set[str], packages: tuple[str, ...]) -> set[str]:
    """The modules of `loaded` that are one of `packages` or inside one."""
    return {m for m in loaded for p in packages if m == p or m.startswith(p + ".")}


def test_a_vm_that_only_runs_loads_no_role_it_does_not_have() -> None:
    loaded = _loaded_after(RUN_PATH)
    assert "ptmig.machine" in loaded and "ptmig.migration.control" in loaded  # QMP's commands
    roles = MIGRATION_ROLES + POSTCOPY_ROLE + SHADOW_ROLE + DEVICES_ROLE + FRONT_ENDS
    assert _of(loaded, roles) == set()
    # numpy (the biggest import) comes with dirty tracking: a migration or shadowing
    assert _of(loaded, ("numpy", "ptmig.bitmap")) == set()


# A machine as far as `migrate` and `x-shadow-start` look before they start their role: a
# guest that has shut down, so the command is refused once the role's modules are loaded.
_STOPPED_MACHINE = """
from types import SimpleNamespace
from ptmig.vm import RunState
vm = SimpleNamespace(state=RunState.SHUTDOWN, vcpu_thread_ids=lambda: [])
cfg = SimpleNamespace(migration=SimpleNamespace(psk_file=None, tls=False))
m = SimpleNamespace(
    cfg=cfg, vm=vm, shadowed_by_hand=lambda: False, measuring_dirty_log=lambda: False
)
"""


def test_migrate_loads_the_source_and_only_it() -> None:
    loaded = _loaded_after(
        RUN_PATH,
        _STOPPED_MACHINE + "from ptmig.migration.control import MigrationControl\n"
        "from ptmig.qmp.session import QmpError\n"
        "try:\n"
        "    MigrationControl(m).migrate('tcp:127.0.0.1:1')\n"
        "except QmpError as e:\n"
        "    assert 'shutdown' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('a stopped guest was migrated')\n",
    )
    assert _of(loaded, SOURCE_ROLE) == set(SOURCE_ROLE)
    assert "numpy" in loaded
    assert _of(loaded, DESTINATION_ROLE + SHADOW_ROLE + DEVICES_ROLE + FRONT_ENDS) == set()


def test_an_incoming_migration_loads_the_destination_without_the_source_or_shadowing() -> None:
    loaded = _loaded_after((*RUN_PATH, "ptmig.migration.destination"))  # `run --incoming`
    assert "ptmig.migration.postcopy" in loaded  # a destination may be switched to post-copy
    # (its devices are shadowed only once a post-copy starts, and only if it has devices)
    assert _of(loaded, SOURCE_ROLE + SHADOW_ROLE + FRONT_ENDS) == set()
    assert "ptmig.migration.postcopy_devices" not in loaded


def test_x_shadow_start_loads_shadowing() -> None:
    loaded = _loaded_after(
        RUN_PATH,
        _STOPPED_MACHINE + "from ptmig.machine import Machine\n"
        "from ptmig.qmp.session import QmpError\n"
        "from ptmig.shadow.pool import ShadowPool\n"
        "m.vm.state = RunState.RUNNING\n"
        "m.shadow = None\n"
        "m.migration = SimpleNamespace(busy=lambda: False)\n"
        "m.devices = []\n"
        "m.shadow_pool = ShadowPool(16, name='footprint-test')\n"
        "try:\n"
        "    Machine._qmp_shadow_start(m)\n"  # a guest without memory: entering fails
        "except QmpError as e:\n"
        "    assert 'entering shadow mode failed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('a guest without memory was shadowed')\n",
    )
    assert _of(loaded, ("ptmig.shadow.engine", "ptmig.shadow.tracking")) == {
        "ptmig.shadow.engine",
        "ptmig.shadow.tracking",
    }
    assert _of(loaded, SOURCE_ROLE + DESTINATION_ROLE + FRONT_ENDS) == set()


def test_a_vmm_that_runs_no_sealed_or_tls_channel_loads_neither_cryptography_nor_ssl() -> None:
    loaded = _loaded_after(MIGRATING_PATH)
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
    assert memstats.ARENA_MAX == 1


def test_threads_allocate_from_the_main_arena_under_the_c_heap_policy() -> None:
    """One arena: the modules a migration loads in its QMP and migration threads (numpy's,
    the source's) share the main heap with what the VMM loaded at start, instead of a second
    arena's heap of their own (0.2 MiB more of a 1 GiB pair's private memory, each side).
    glibc's malloc_info lists one <heap> per arena."""
    script = (
        "import ctypes, os, tempfile, threading\n"
        "from ptmig import memstats\n"
        "assert memstats.tune_malloc()\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.fopen.restype = ctypes.c_void_p\n"
        "libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]\n"
        "libc.fclose.argtypes = [ctypes.c_void_p]\n"
        "def allocate():\n"  # small blocks, as unmarshalled code objects are
        "    for _ in range(1000): libc.malloc(1000)\n"
        "threads = [threading.Thread(target=allocate) for _ in range(4)]\n"
        "for t in threads: t.start()\n"
        "for t in threads: t.join()\n"
        "path = os.path.join(tempfile.mkdtemp(), 'info.xml')\n"
        "f = libc.fopen(path.encode(), b'w')\n"
        "assert libc.malloc_info(0, f) == 0\n"
        "libc.fclose(f)\n"
        "print(open(path).read().count('<heap nr='))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert int(out.stdout.split()[-1]) == 1


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not glibc (musl has no malloc_trim): the policy says it did nothing, the trim is a no-op."""
    monkeypatch.setattr(memstats, "_glibc", lambda: None)
    assert memstats.tune_malloc() is False
    memstats.release_free_memory()  # nothing to call: no error


def test_run_options_cross_the_exec_unchanged() -> None:
    options = VmmOptions(
        "/cfg/vm.toml",
        qmp_path="/run/vm.qmp",
        console_file="/run/vm.console",
        incoming="tcp:127.0.0.1:4444",
        psk_file="/cfg/key",
        insecure=True,
        prefault=False,
        incoming_timeout=2.5,
        log_level=10,
    )
    assert VmmOptions.from_json(options.to_json()) == options


def test_the_vmm_entry_refuses_what_ptmig_run_did_not_pass() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ptmig.runvm", '{"config": "vm.toml", "memory": "1G"}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 125  # ptmig run's own failure, never a guest's code
    assert "usage: python -m ptmig.runvm" in out.stderr and "memory" in out.stderr


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.kvm
def test_a_running_vm_maps_numpy_only_once_it_migrates(tmp_path: Path) -> None:
    """Seen from outside, in the processes' own mappings: `ptmig run` became the VMM by exec
    (`ptmig.runvm`, no click), and a source whose guest only ran mapped no numpy (its C
    extension is a file mapping) until `migrate` started dirty tracking."""
    numpy_core = "_multiarray_umath"
    config = dirty_config(tmp_path, memory="128M", vcpus=1, ws="1M")
    with migration_pair(tmp_path, config) as (src, dst, port):
        cmdline = Path(f"/proc/{src.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"ptmig.runvm" in cmdline, cmdline
        assert numpy_core not in _maps(src.proc.pid)
        src.migrate(port, verify=False)
        assert src.wait_migration(120)["status"] == "completed"
        assert numpy_core in _maps(src.proc.pid)


def test_a_closed_channel_gives_back_its_receive_buffer() -> None:
    """A finished migration's channels stay referenced (query-migrate reports on them): a
    receive buffer kept past `close` was 3 MiB of a 1 GiB source's private memory."""
    a, b = socket.socketpair()
    channel = transport.Channel(a, 5.0, "peer")
    try:
        b.sendall(b"x" * 1000)
        assert channel.recv(1 << 20) == b"x" * 1000
        assert len(channel._scratch) == 1 << 20  # grown to the read asked for
    finally:
        channel.close()
        b.close()
    assert len(channel._scratch) == 0


# the modules that load OpenSSL's libcrypto into the interpreter (`_hashlib`) or exist to use it
OPENSSL_DIGESTS = ("_hashlib", "hashlib", "hmac", "secrets")


def test_a_running_or_migrating_vmm_loads_no_openssl_digest_module() -> None:
    """The tokens, the firmware's cache digest and a token comparison a VMM does when it runs
    and migrates, done in a fresh interpreter, leave `_hashlib` (libcrypto) unloaded."""
    work = (
        "from ptmig.firmware import build_firmware\n"
        "from ptmig.migration import fate, source, destination\n"
        "build_firmware()\n"
        "fate.new_migration_id()\n"
        "destination.compare_digest(b'a' * 16, b'b' * 16)\n"
    )
    loaded = _loaded_after(MIGRATING_PATH, work)
    assert {m for m in OPENSSL_DIGESTS if m in loaded} == set()


def test_tokens_match_what_the_standard_library_gives() -> None:
    import hashlib
    import hmac

    data = bytes(range(256)) * 40
    h = tokens.sha256()
    h.update(data[:1000])
    h.update(data[1000:])
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    token = tokens.token_hex(16)
    assert len(token) == 32 and int(token, 16) >= 0
    assert tokens.token_hex(16) != token
    for a, b in ((b"same", b"same"), (b"same", b"sama"), (b"short", b"longer")):
        assert tokens.compare_digest(a, b) == hmac.compare_digest(a, b)
    assert tokens.compare_digest("x", "x") == hmac.compare_digest("x", "x")


def test_a_closed_sealed_channel_gives_back_its_record_buffers() -> None:
    """A sealed channel holds about a record (1 MiB) each to seal, gather, receive and open:
    4 MiB a stream that a finished migration's channels would keep past `close`."""
    session = seal.Session.start(b"k" * 32, b"s" * 32, b"c" * 32)
    client = seal._stream_keys(session, 0, b"n" * 64, server=False)
    server = seal._stream_keys(session, 0, b"n" * 64, server=True)
    a, b = socket.socketpair()
    sender = transport.SealedChannel(a, 5.0, "peer", client)
    receiver = transport.SealedChannel(b, 5.0, "peer", server)
    try:
        sender.sendall(b"page" * 1024)
        got = bytearray()
        while len(got) < 4096:
            got += receiver.recv(4096 - len(got))
        assert got == b"page" * 1024
        held = (sender._out, sender._stage, receiver._body, receiver._plain_buf)
        assert min(len(buf) for buf in held) >= seal.MAX_RECORD
    finally:
        sender.close()
        receiver.close()
    for channel in (sender, receiver):
        held = (channel._out, channel._stage, channel._body, channel._plain_buf)
        assert [len(buf) for buf in held] == [0, 0, 0, 0]


def test_the_scale_bench_gives_its_vmms_ptmig_compiled_as_an_install_does() -> None:
    """A VMM that compiles ptmig from source at start keeps 0.35-0.7 MiB more private memory
    than one that loads bytecode (what an installed package has): after `compile_ptmig` each
    module a running or migrating VMM imports has bytecode its loader accepts (stamped with
    its source's mtime and size, or hash), whatever PYTHONDONTWRITEBYTECODE says."""
    import importlib
    import importlib.util
    import os
    import struct

    from ptmig.bench.harness import compile_ptmig

    assert compile_ptmig()
    for name in MIGRATING_PATH:
        source = importlib.import_module(name).__file__
        assert source is not None
        with open(importlib.util.cache_from_source(source), "rb") as f:
            header = f.read(16)
        assert header[:4] == importlib.util.MAGIC_NUMBER, name
        (flags,) = struct.unpack("<I", header[4:8])
        if flags == 0:  # stamped with the source's mtime and size
            st = os.stat(source)
            stamp = struct.pack("<II", int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
        else:  # stamped with the source's hash (SOURCE_DATE_EPOCH set)
            with open(source, "rb") as f:
                stamp = importlib.util.source_hash(f.read())
        assert header[8:] == stamp, name


def test_the_scale_bench_says_how_its_vmms_had_ptmig_with_their_memory() -> None:
    from ptmig.bench.scale import ScaleSample, results

    sample = ScaleSample(1 << 30, 1000.0, 3.0, 1 << 30, 100.0, [0.5], 10 << 20, 5 << 20)
    rows = {r.name: r for r in results({1 << 30: [sample]}, "compiled at each VMM's start")}
    for name in ("1G.src-vmm-memory", "1G.dst-vmm-memory", "1G.vmm-memory/ram"):
        assert rows[name].extra["bytecode"] == "compiled at each VMM's start"
    assert "bytecode" not in rows["1G.total"].extra


# A machine that runs with 8 MiB of guest RAM, for `x-debug-fill-ram`.
_FILLABLE_MACHINE = """
from types import SimpleNamespace
from ptmig.memory import GuestMemory
from ptmig.migration.control import MigrationControl
from ptmig.vm import RunState
cfg = SimpleNamespace(migration=SimpleNamespace(psk_file=None, tls=False))
vm = SimpleNamespace(state=RunState.RUNNING, memory=GuestMemory(8 << 20, name='fill-test'))
control = MigrationControl(SimpleNamespace(cfg=cfg, vm=vm))
"""


def test_the_fill_hook_loads_neither_numpy_random_nor_openssl() -> None:
    """`x-debug-fill-ram` runs in the benchmarks' sources before they migrate, so what it
    imports is counted in the source's memory: numpy.random (with hashlib and libcrypto) kept
    1.7 MiB of a 1 GiB source resident for nothing a VMM needs."""
    loaded = _loaded_after(
        RUN_PATH,
        _FILLABLE_MACHINE + "control._qmp_fill_ram(1 << 20, 4 << 20)\n"
        "assert any(vm.memory.read(1 << 20, 4096)), 'the fill wrote nothing'\n",
    )
    assert _of(loaded, ("numpy.random",)) == set()
    assert {m for m in OPENSSL_DIGESTS if m in loaded} == set()


def test_the_fill_hook_writes_one_seeds_bytes_wherever_the_fill_starts() -> None:
    from ptmig.memory import GuestMemory
    from ptmig.migration.control import MigrationControl, fill_bytes

    mem = GuestMemory(8 << 20, name="fill-test")
    cfg = SimpleNamespace(migration=SimpleNamespace(psk_file=None, tls=False))
    control = MigrationControl(SimpleNamespace(cfg=cfg, vm=SimpleNamespace(memory=mem)))  # type: ignore[arg-type]
    try:
        control._qmp_fill_ram(1 << 20, (6 << 20) - 3)  # not a whole page: every byte asked for
        filled = mem.read(1 << 20, 6 << 20)
        untouched = mem.read(0, 1 << 20) + mem.read(7 << 20, 1 << 20)
    finally:
        mem.close()
    assert filled[:-3] == bytes(fill_bytes(1, 1 << 20, (6 << 20) - 3)) and filled[-3:] == bytes(3)
    assert any(filled[-8:-3])
    # a fill that starts later puts the same bytes at the same addresses
    assert bytes(fill_bytes(1, 5 << 20, 4096)) == filled[4 << 20 : (4 << 20) + 4096]
    # nothing repeats from page to page or from seed to seed; the rest of RAM is untouched
    pages = {filled[i : i + 4096] for i in range(0, len(filled), 4096)}
    assert len(pages) == len(filled) // 4096
    assert bytes(fill_bytes(2, 1 << 20, 4096)) != filled[:4096]
    assert not any(untouched)


@pytest.mark.parametrize(
    ("gpa", "size"),
    [(100, 4096), (0, 0), (-4096, 8192), ((8 << 20) - 4096, 8192)],
    ids=["unaligned-start", "empty", "negative-start", "past-the-end"],
)
def test_the_fill_hook_refuses_a_range_it_cannot_fill_and_writes_nothing(
    gpa: int, size: int
) -> None:
    from ptmig.memory import GuestMemory
    from ptmig.migration.control import MigrationControl
    from ptmig.qmp.session import QmpError

    mem = GuestMemory(8 << 20, name="fill-refused")
    cfg = SimpleNamespace(migration=SimpleNamespace(psk_file=None, tls=False))
    control = MigrationControl(SimpleNamespace(cfg=cfg, vm=SimpleNamespace(memory=mem)))  # type: ignore[arg-type]
    try:
        with pytest.raises(QmpError, match="must start on a page boundary"):
            control._qmp_fill_ram(gpa, size)
        assert not any(mem.read(0, 8 << 20))
    finally:
        mem.close()
