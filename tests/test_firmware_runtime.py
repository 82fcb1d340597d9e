"""The firmware's pure C logic (printf engine, command-line parser) built natively and driven
through ctypes: the printf engine is checked against the C library's snprintf."""

from __future__ import annotations

import ctypes
import re
import subprocess
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptmig.firmware import GUEST_DIR, find_compiler

CMDLINE_OK = 0
CMDLINE_EMPTY = -1
CMDLINE_TOO_MANY = -2
CMDLINE_TOO_LONG = -3
CMDLINE_NO_EQUALS = -4
CMDLINE_BAD_NUMBER = -5
CMDLINE_UNKNOWN_KEY = -6
CMDLINE_DUPLICATE = -7
CMDLINE_UNTERMINATED = -8
CMDLINE_BAD_ADDRESS = -9


class CmdlineArg(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char * 64), ("value", ctypes.c_char * 64)]


class Cmdline(ctypes.Structure):
    _fields_ = [
        ("workload", ctypes.c_char * 64),
        ("nargs", ctypes.c_uint),
        ("args", CmdlineArg * 16),
    ]


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    out = tmp_path_factory.mktemp("guestrt") / "libguestrt.so"
    sources = [
        GUEST_DIR / "runtime" / "format.c",
        GUEST_DIR / "runtime" / "cmdline.c",
        GUEST_DIR / "runtime" / "crc32.c",
        GUEST_DIR / "workloads" / "kv_table.c",
    ]
    subprocess.run(
        [
            find_compiler(),
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Werror",
            "-I",
            str(GUEST_DIR),
            *map(str, sources),
            "-o",
            str(out),
        ],
        check=True,
    )
    lib = ctypes.CDLL(str(out))
    lib.fmt_snprintf.restype = ctypes.c_size_t
    lib.cmdline_parse.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.POINTER(Cmdline),
        ctypes.POINTER(ctypes.c_char_p),
    ]
    lib.cmdline_get.restype = ctypes.c_char_p
    lib.cmdline_get.argtypes = [ctypes.POINTER(Cmdline), ctypes.c_char_p]
    lib.cmdline_get_u64.argtypes = [
        ctypes.POINTER(Cmdline),
        ctypes.c_char_p,
        ctypes.c_uint64,
        ctypes.POINTER(ctypes.c_uint64),
    ]
    lib.parse_u64.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64)]
    lib.parse_ipv4.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.cmdline_strerror.restype = ctypes.c_char_p
    lib.crc32.restype = ctypes.c_uint32
    lib.crc32.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    lib.kv_table_bytes.restype = ctypes.c_size_t
    lib.kv_table_bytes.argtypes = [ctypes.c_uint32]
    lib.kv_table_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    lib.kv_table_get.restype = ctypes.c_void_p
    lib.kv_table_get.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.kv_table_can_put.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.kv_table_put.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    return lib


_libc = ctypes.CDLL(None)


def _fmt(lib: ctypes.CDLL, fmt: str, *args: object, size: int = 256) -> tuple[bytes, int]:
    buf = ctypes.create_string_buffer(size)
    n = lib.fmt_snprintf(buf, ctypes.c_size_t(size), fmt.encode(), *args)
    return buf.value, n


def _libc_fmt(fmt: str, *args: object) -> bytes:
    buf = ctypes.create_string_buffer(256)
    _libc.snprintf(buf, ctypes.c_size_t(256), fmt.encode(), *args)
    return buf.value


# ---- printf engine -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "args", "expected"),
    [
        ("%d", (ctypes.c_int(-42),), b"-42"),
        ("%u", (ctypes.c_uint(4000000000),), b"4000000000"),
        ("%x", (ctypes.c_uint(0xBEEF),), b"beef"),
        ("%lx", (ctypes.c_ulong(0x31494247494D5450),), b"31494247494d5450"),
        ("%s and %c", (b"str", ctypes.c_int(ord("!"))), b"str and !"),
        ("%p", (ctypes.c_void_p(0x8000),), b"0x8000"),
        (
            "%08lx|%-5d|%5s",
            (ctypes.c_ulong(0xABC), ctypes.c_int(7), b"ab"),
            b"00000abc|7    |   ab",
        ),
        ("%lu MiB", (ctypes.c_ulong(18446744073709551615),), b"18446744073709551615 MiB"),
        ("%ld", (ctypes.c_long(-9223372036854775808),), b"-9223372036854775808"),
        ("%%", (), b"%"),
        ("%s", (None,), b"(null)"),
        ("%q", (), b"%q"),
    ],
)
def test_format_examples(
    rt: ctypes.CDLL, fmt: str, args: tuple[object, ...], expected: bytes
) -> None:
    out, n = _fmt(rt, fmt, *args)
    assert out == expected
    assert n == len(expected)


def test_format_truncates_and_returns_full_length(rt: ctypes.CDLL) -> None:
    out, n = _fmt(rt, "hello %d", ctypes.c_int(12345), size=8)
    assert out == b"hello 1"
    assert n == len("hello 12345")


_flags = st.text(alphabet="-0+ ", max_size=3)
_width = st.one_of(st.just(""), st.integers(1, 24).map(str))
_precision = st.one_of(st.just(""), st.integers(0, 22).map(lambda p: f".{p}"))


@settings(max_examples=400, deadline=None)
@given(
    flags=_flags,
    width=_width,
    precision=_precision,
    conv=st.sampled_from("diuxXo"),
    length=st.sampled_from(["", "l", "ll", "h", "hh"]),
    value=st.integers(-(2**63), 2**64 - 1),
)
def test_format_integers_match_libc(
    rt: ctypes.CDLL, flags: str, width: str, precision: str, conv: str, length: str, value: int
) -> None:
    fmt = f"[%{flags}{width}{precision}{length}{conv}]"
    if length in ("l", "ll"):
        arg: object = (
            ctypes.c_longlong(value)
            if conv in "di" and value < 2**63
            else ctypes.c_ulonglong(value % 2**64)
        )
    else:
        arg = ctypes.c_int(((value + 2**31) % 2**32) - 2**31)
    assert _fmt(rt, fmt, arg)[0] == _libc_fmt(fmt, arg)


@settings(max_examples=200, deadline=None)
@given(
    flags=st.text(alphabet="-", max_size=1),
    width=_width,
    precision=_precision,
    s=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
)
def test_format_strings_match_libc(
    rt: ctypes.CDLL, flags: str, width: str, precision: str, s: str
) -> None:
    fmt = f"<%{flags}{width}{precision}s>"
    assert _fmt(rt, fmt, s.encode())[0] == _libc_fmt(fmt, s.encode())


# ---- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("4096", 4096),
        ("64M", 64 << 20),
        ("2G", 2 << 30),
        ("4k", 4096),
        ("0x10", 16),
        ("0x1M", 1 << 20),
        ("18446744073709551615", 2**64 - 1),
        ("16777215G", 16777215 << 30),
    ],
)
def test_parse_u64_accepts(rt: ctypes.CDLL, text: str, value: int) -> None:
    out = ctypes.c_uint64()
    assert rt.parse_u64(text.encode(), ctypes.byref(out)) == CMDLINE_OK
    assert out.value == value


@pytest.mark.parametrize(
    "text",
    ["", "M", "12Q", "12MB", "-1", "0x", "18446744073709551616", "17179869184G", "1 2", "0xG"],
)
def test_parse_u64_rejects(rt: ctypes.CDLL, text: str) -> None:
    assert rt.parse_u64(text.encode(), ctypes.byref(ctypes.c_uint64())) == CMDLINE_BAD_NUMBER


@given(st.integers(0, 2**64 - 1))
def test_parse_u64_round_trips(rt: ctypes.CDLL, value: int) -> None:
    out = ctypes.c_uint64()
    for text in (str(value), hex(value)):
        assert rt.parse_u64(text.encode(), ctypes.byref(out)) == CMDLINE_OK
        assert out.value == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("10.0.0.2", 0x0A000002), ("255.255.255.0", 0xFFFFFF00), ("0.0.0.0", 0)],
)
def test_parse_ipv4_accepts(rt: ctypes.CDLL, text: str, value: int) -> None:
    out = ctypes.c_uint32()
    assert rt.parse_ipv4(text.encode(), ctypes.byref(out)) == CMDLINE_OK
    assert out.value == value


@pytest.mark.parametrize(
    "text", ["10.0.0", "10.0.0.256", "1.2.3.4.5", "a.b.c.d", "1..2.3", "1.2.3.4 ", "0001.2.3.4"]
)
def test_parse_ipv4_rejects(rt: ctypes.CDLL, text: str) -> None:
    assert rt.parse_ipv4(text.encode(), ctypes.byref(ctypes.c_uint32())) == CMDLINE_BAD_ADDRESS


# ---- the command line -------------------------------------------------------------------------


def _parse(rt: ctypes.CDLL, text: bytes, maxlen: int = 1024) -> tuple[int, Cmdline, bytes | None]:
    c = Cmdline()
    where = ctypes.c_char_p()
    buf = ctypes.create_string_buffer(text, max(len(text) + 1, maxlen))
    rc = rt.cmdline_parse(buf, maxlen, ctypes.byref(c), ctypes.byref(where))
    return rc, c, where.value


def test_cmdline_parses_workload_and_arguments(rt: ctypes.CDLL) -> None:
    rc, c, _ = _parse(rt, b"  dirty ws=64M\trate=100  seconds=0x10 \n")
    assert rc == CMDLINE_OK
    assert c.workload == b"dirty"
    assert [(c.args[i].key, c.args[i].value) for i in range(c.nargs)] == [
        (b"ws", b"64M"),
        (b"rate", b"100"),
        (b"seconds", b"0x10"),
    ]
    out = ctypes.c_uint64()
    assert rt.cmdline_get_u64(ctypes.byref(c), b"ws", 1, ctypes.byref(out)) == CMDLINE_OK
    assert out.value == 64 << 20
    assert rt.cmdline_get_u64(ctypes.byref(c), b"absent", 77, ctypes.byref(out)) == CMDLINE_OK
    assert out.value == 77
    assert rt.cmdline_get(ctypes.byref(c), b"rate") == b"100"
    assert rt.cmdline_get(ctypes.byref(c), b"rat") is None


def test_cmdline_value_may_be_empty_or_contain_equals(rt: ctypes.CDLL) -> None:
    rc, c, _ = _parse(rt, b"kv a= b=x=y")
    assert rc == CMDLINE_OK
    assert (c.args[0].value, c.args[1].value) == (b"", b"x=y")


@pytest.mark.parametrize(
    ("text", "err", "where"),
    [
        (b"", CMDLINE_EMPTY, None),
        (b"   ", CMDLINE_EMPTY, None),
        (b"ws=1 dirty", CMDLINE_EMPTY, b"ws=1 dirty"),
        (b"dirty ws", CMDLINE_NO_EQUALS, b"ws"),
        (b"dirty =5", CMDLINE_NO_EQUALS, b"=5"),
        (b"dirty ws=1 ws=2", CMDLINE_DUPLICATE, b"ws=2"),
        (b"dirty " + b"k=" + b"v" * 64, CMDLINE_TOO_LONG, b"k=" + b"v" * 64),
        (b"w" * 64, CMDLINE_TOO_LONG, b"w" * 64),
        (b"dirty " + b" ".join(b"k%d=1" % i for i in range(17)), CMDLINE_TOO_MANY, b"k16=1"),
    ],
)
def test_cmdline_errors(rt: ctypes.CDLL, text: bytes, err: int, where: bytes | None) -> None:
    rc, _, at = _parse(rt, text)
    assert rc == err
    if where is not None:
        assert at == where
    assert rt.cmdline_strerror(rc) not in (b"ok", b"unknown error")


def test_cmdline_must_be_terminated_within_maxlen(rt: ctypes.CDLL) -> None:
    rc, _, _ = _parse(rt, b"hello world=1", maxlen=5)
    assert rc == CMDLINE_UNTERMINATED


def test_cmdline_check_keys(rt: ctypes.CDLL) -> None:
    rc, c, _ = _parse(rt, b"dirty ws=1 rate=2 colour=blue")
    assert rc == CMDLINE_OK
    allowed = (ctypes.c_char_p * 4)(b"ws", b"rate", b"seconds", None)
    bad = ctypes.c_char_p()
    assert rt.cmdline_check_keys(ctypes.byref(c), allowed, ctypes.byref(bad)) == CMDLINE_UNKNOWN_KEY
    assert bad.value == b"colour"
    rc, c, _ = _parse(rt, b"dirty ws=1 seconds=2")
    assert rt.cmdline_check_keys(ctypes.byref(c), allowed, ctypes.byref(bad)) == CMDLINE_OK


@given(st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=300))
def test_cmdline_never_crashes_and_reports_consistently(rt: ctypes.CDLL, text: str) -> None:
    raw = text.encode("latin-1")
    rc, c, _ = _parse(rt, raw)
    assert rc in range(-9, 1)
    if rc == CMDLINE_OK:
        words = [w for w in re.split(rb"[ \t\r\n]+", raw) if w]  # the parser's whitespace
        assert c.workload == words[0]
        assert c.nargs == len(words) - 1


# ---- crc32 and the kv table ------------------------------------------------------------------


@given(st.binary(max_size=2000), st.integers(0, 2000))
def test_crc32_matches_zlib(rt: ctypes.CDLL, data: bytes, split: int) -> None:
    assert rt.crc32(0, data, len(data)) == zlib.crc32(data)
    head, tail = data[:split], data[split:]
    assert rt.crc32(rt.crc32(0, head, len(head)), tail, len(tail)) == zlib.crc32(data)


class KvTable(ctypes.Structure):
    _fields_ = [
        ("slots", ctypes.c_void_p),
        ("capacity", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("limit", ctypes.c_uint32),
    ]


# struct kv_slot: hash u32, klen u16, vlen u16, used u32, key[128], value[512], pad[4]
_SLOT_VLEN, _SLOT_VALUE = 6, 12 + 128


def _table(rt: ctypes.CDLL, capacity: int) -> tuple[KvTable, ctypes.Array[ctypes.c_char]]:
    mem = ctypes.create_string_buffer(rt.kv_table_bytes(capacity))
    t = KvTable()
    assert rt.kv_table_init(ctypes.byref(t), mem, capacity) == 0
    return t, mem


def _get(rt: ctypes.CDLL, t: KvTable, key: bytes) -> bytes | None:
    slot = rt.kv_table_get(ctypes.byref(t), key, len(key))
    if not slot:
        return None
    vlen = ctypes.c_uint16.from_address(slot + _SLOT_VLEN).value
    return ctypes.string_at(slot + _SLOT_VALUE, vlen)


def test_kv_table_rejects_bad_capacity(rt: ctypes.CDLL) -> None:
    mem = ctypes.create_string_buffer(rt.kv_table_bytes(16))
    for capacity in (0, 4, 12):
        assert rt.kv_table_init(ctypes.byref(KvTable()), mem, capacity) == -1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=128), st.binary(max_size=512)), max_size=60))
def test_kv_table_behaves_like_a_dict(rt: ctypes.CDLL, ops: list[tuple[bytes, bytes]]) -> None:
    t, _mem = _table(rt, 64)  # limit 56 keys
    model: dict[bytes, bytes] = {}
    for key, value in ops:
        fits = key in model or len(model) < 56
        assert rt.kv_table_can_put(ctypes.byref(t), key, len(key)) == int(fits)
        rc = rt.kv_table_put(ctypes.byref(t), key, len(key), value, len(value))
        assert rc == (0 if fits else -1)
        if fits:
            model[key] = value
        assert t.count == len(model)
    for key, value in model.items():
        assert _get(rt, t, key) == value
    assert _get(rt, t, b"\xff" * 129) is None


def test_kv_table_refuses_oversize_entries(rt: ctypes.CDLL) -> None:
    t, _mem = _table(rt, 8)
    assert rt.kv_table_put(ctypes.byref(t), b"k" * 129, 129, b"", 0) == -1
    assert rt.kv_table_put(ctypes.byref(t), b"k", 1, b"v" * 513, 513) == -1
    assert t.count == 0
