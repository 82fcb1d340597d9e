"""The firmware build (cache, rebuilds, errors), the image header checks, and guest/abi.h."""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from ptmig import firmware, layout
from ptmig.firmware import (
    FW_HEADER_SIZE,
    GUEST_DIR,
    FirmwareBuildError,
    FirmwareImageError,
    build_firmware,
    build_host_storebw,
    find_compiler,
    load_firmware_image,
    parse_firmware_image,
    read_abi_header,
)

# Every number the ABI names, with the value docs/GUEST_ABI.md gives it.
ABI_CONSTANTS = {
    "ABI_PML4_GPA": 0x1000,
    "ABI_BOOT_INFO_GPA": 0x8000,
    "ABI_MAILBOX_GPA": 0x9000,
    "ABI_MAILBOX_SIZE": 256,
    "ABI_STATS_GPA": 0xA000,
    "ABI_STATS_SLOT_SIZE": 128,
    "ABI_WORKLOAD_STATS_GPA": 0xA800,
    "ABI_FW_LOAD_GPA": 0x200000,
    "ABI_FW_MAX_SIZE": 0x200000,
    "ABI_STACK_BASE_GPA": 0x400000,
    "ABI_STACK_SIZE": 0x10000,
    "ABI_HEAP_START_GPA": 0x600000,
    "ABI_MMIO_BASE_GPA": 0xD0000000,
    "ABI_MMIO_STRIDE": 0x1000,
    "ABI_MAX_VCPUS": 16,
    "ABI_MAX_DEVICES": 8,
    "ABI_PORT_CONSOLE": 0x3F8,
    "ABI_PORT_HYPERCALL": 0x500,
    "HC_EXIT": 1,
    "HC_HALT": 2,
    "HC_CONSOLE": 3,
    "HC_HEARTBEAT": 4,
    "BOOT_INFO_MAGIC": int.from_bytes(b"PTMIGBI1", "little"),
    "FW_HEADER_MAGIC": int.from_bytes(b"PTMIGFW1", "little"),
    "VCPU_STATS_MAGIC": 0x5354415453555043,
}

_HEADER = struct.Struct("<QIIQQQQ")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_firmware(tmp_path_factory.mktemp("fwcache"))


def _copy_tree(tmp_path: Path) -> Path:
    src = tmp_path / "guest"
    shutil.copytree(GUEST_DIR, src, ignore=shutil.ignore_patterns("*.o", "*.bin", "*.elf"))
    return src


def _image(**fields: int) -> bytearray:
    """A minimal valid image (header + 4 KiB of code), with header fields overridden."""
    base = layout.ABI_FW_LOAD_GPA
    values = {
        "magic": layout.FW_HEADER_MAGIC,
        "version": 1,
        "header_size": FW_HEADER_SIZE,
        "load_gpa": base,
        "entry": base + 0x100,
        "entry_ap": base + 0x200,
        "image_end": base + 0x2000,
    }
    values.update(fields)
    data = bytearray(0x1000)
    _HEADER.pack_into(data, 0, *values.values())
    return data


# ---- the build ------------------------------------------------------------------------------


def test_build_produces_a_valid_image_with_sane_header(built: Path) -> None:
    img = load_firmware_image(built)
    assert img.load_gpa == layout.ABI_FW_LOAD_GPA
    assert img.data[:8] == b"PTMIGFW1"
    end_of_file = img.load_gpa + len(img.data)
    assert img.load_gpa + FW_HEADER_SIZE <= img.entry < end_of_file
    assert img.load_gpa + FW_HEADER_SIZE <= img.entry_ap < end_of_file
    assert img.entry != img.entry_ap
    assert end_of_file <= img.image_end <= img.load_gpa + layout.ABI_FW_MAX_SIZE
    assert img.bss_size > 0  # per-vCPU console buffers live in .bss
    assert built.with_suffix(".elf").is_file()


def test_entry_points_are_the_start_symbols(built: Path) -> None:
    img = load_firmware_image(built)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed: cannot read the ELF's symbols")
    out = subprocess.run(
        [nm, str(built.with_suffix(".elf"))], capture_output=True, text=True, check=True
    ).stdout
    symbols = {
        line.split()[2]: int(line.split()[0], 16)
        for line in out.splitlines()
        if len(line.split()) == 3
    }
    assert symbols["_start"] == img.entry
    assert symbols["_start_ap"] == img.entry_ap
    assert symbols["__image_end"] == img.image_end


def test_second_build_is_a_cache_hit(tmp_path: Path) -> None:
    first = build_firmware(tmp_path)
    before = first.stat()
    second = build_firmware(tmp_path)
    after = second.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(list(tmp_path.glob("firmware-*.bin"))) == 1


def test_source_change_rebuilds(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    cache = tmp_path / "cache"
    first = build_firmware(cache, source_dir=src)
    hello = src / "workloads" / "hello.c"
    hello.write_text(hello.read_text().replace("hello from ptmig guest", "hullo from ptmig guest"))
    second = build_firmware(cache, source_dir=src)
    assert second != first
    assert b"hullo from ptmig guest" in second.read_bytes()
    assert b"hello from ptmig guest" in first.read_bytes()


def test_header_change_rebuilds(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    cache = tmp_path / "cache"
    first = build_firmware(cache, source_dir=src)
    abi = src / "abi.h"
    abi.write_text(abi.read_text() + "\n/* a comment changes the hash */\n")
    assert build_firmware(cache, source_dir=src) != first


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_firmware(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    load_firmware_image(results[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]


def test_compile_error_names_the_file(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path)
    (src / "workloads" / "broken.c").write_text("int broken(void) { return nope; }\n")
    with pytest.raises(FirmwareBuildError, match=r"compiling workloads/broken\.c failed"):
        build_firmware(tmp_path / "cache", source_dir=src)
    assert not list((tmp_path / "cache").glob("firmware-*"))


def test_missing_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(FirmwareBuildError, match=r"no C compiler found: looked for 'cc', 'gcc'"):
        build_firmware(tmp_path)
    with pytest.raises(FirmwareBuildError, match="no C compiler found"):
        build_host_storebw(tmp_path)


def test_cc_environment_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "definitely-not-a-compiler-xyz")
    with pytest.raises(FirmwareBuildError, match="'definitely-not-a-compiler-xyz'"):
        find_compiler()


def test_not_a_source_tree(tmp_path: Path) -> None:
    with pytest.raises(FirmwareBuildError, match="no link.ld"):
        build_firmware(tmp_path / "cache", source_dir=tmp_path)


def test_default_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert firmware.default_cache_dir() == tmp_path / "ptmig" / "firmware"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert firmware.default_cache_dir() == tmp_path / "home" / ".cache" / "ptmig" / "firmware"


def test_host_storebw_runs_and_prints_the_guest_line(tmp_path: Path) -> None:
    exe = build_host_storebw(tmp_path)
    assert build_host_storebw(tmp_path) == exe
    out = subprocess.run([str(exe), "64K", "3"], capture_output=True, text=True, check=True)
    words = out.stdout.split()
    assert words[:2] == ["storebw:", str(64 * 1024 * 3)] and words[2:4] == ["bytes", "in"]
    assert int(words[4]) > 0 and words[5] == "ticks"
    bad = subprocess.run([str(exe), "lots", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


# ---- header validation ------------------------------------------------------------------------


def test_parse_accepts_the_minimal_image() -> None:
    img = parse_firmware_image(bytes(_image()))
    assert (img.entry, img.entry_ap) == (0x200100, 0x200200)
    assert img.bss_size == 0x1000


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": 0x1122334455667788}, "magic is 0x1122334455667788"),
        ({"version": 2}, "version is 2"),
        ({"header_size": 8}, "header_size is 8"),
        ({"header_size": 0x2000}, "header_size is 8192"),
        ({"load_gpa": 0x100000}, "load_gpa is 0x100000"),
        ({"entry": 0x200000}, "entry 0x200000 is outside"),
        ({"entry": 0x201000}, "entry 0x201000 is outside"),
        ({"entry_ap": 0x100}, "entry_ap 0x100 is outside"),
        ({"image_end": 0x200800}, "image_end 0x200800 is outside"),
        ({"image_end": 0x400001}, "image_end 0x400001 is outside"),
    ],
)
def test_parse_rejects_bad_headers(fields: dict[str, int], message: str) -> None:
    with pytest.raises(FirmwareImageError, match=message):
        parse_firmware_image(bytes(_image(**fields)))


def test_parse_rejects_truncated_image() -> None:
    with pytest.raises(FirmwareImageError, match="20 bytes, shorter than its 48-byte header"):
        parse_firmware_image(bytes(_image())[:20])


def test_load_rejects_oversize_image(tmp_path: Path) -> None:
    big = _image(image_end=layout.ABI_FW_LOAD_GPA + layout.ABI_FW_MAX_SIZE)
    big += bytes(layout.ABI_FW_MAX_SIZE)  # now longer than the ABI allows
    path = tmp_path / "big.bin"
    path.write_bytes(big)
    with pytest.raises(FirmwareImageError, match="more than ABI_FW_MAX_SIZE"):
        load_firmware_image(path)
    with pytest.raises(FirmwareImageError, match="more than ABI_FW_MAX_SIZE"):
        parse_firmware_image(bytes(big))


def test_load_names_the_file_in_errors(tmp_path: Path, built: Path) -> None:
    corrupt = bytearray(built.read_bytes())
    corrupt[0] ^= 0xFF
    path = tmp_path / "corrupt.bin"
    path.write_bytes(corrupt)
    with pytest.raises(FirmwareImageError, match=rf"{path.name}: firmware header magic"):
        load_firmware_image(path)


# ---- guest/abi.h ------------------------------------------------------------------------------


def test_abi_header_defines_every_constant() -> None:
    defined = read_abi_header()
    missing = sorted(set(ABI_CONSTANTS) - set(defined))
    assert not missing, f"guest/abi.h lacks {missing}"
    wrong = {k: (hex(defined[k]), hex(v)) for k, v in ABI_CONSTANTS.items() if defined[k] != v}
    assert not wrong, f"guest/abi.h values differ from the ABI: {wrong}"


def test_abi_header_agrees_with_layout() -> None:
    defined = read_abi_header()
    shared = [n for n in defined if hasattr(layout, n)]
    assert set(ABI_CONSTANTS) <= set(shared)
    wrong = {
        n: (hex(defined[n]), hex(getattr(layout, n)))
        for n in shared
        if defined[n] != getattr(layout, n)
    }
    assert not wrong, f"guest/abi.h and ptmig/layout.py disagree: {wrong}"


def test_abi_struct_layout_matches_the_vmm(tmp_path: Path) -> None:
    """Compile the real structures on the host and compare offsets with what the VMM packs."""
    prog = tmp_path / "offsets.c"
    prog.write_text(
        '#include <stddef.h>\n#include <stdio.h>\n#include "abi.h"\n'
        "int main(void) {\n"
        '  printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\\n",\n'
        "    sizeof(struct fw_header), sizeof(struct boot_info),\n"
        "    offsetof(struct boot_info, devices), offsetof(struct boot_info, cmdline),\n"
        "    offsetof(struct boot_info, ram),\n"
        "    sizeof(struct hc_mailbox), offsetof(struct hc_mailbox, ret),\n"
        "    sizeof(struct vcpu_stats), offsetof(struct vcpu_stats, w),\n"
        "    sizeof(struct dirty_report));\n"
        "  return 0;\n}\n"
    )
    exe = tmp_path / "offsets"
    subprocess.run([find_compiler(), "-I", str(GUEST_DIR), str(prog), "-o", str(exe)], check=True)
    values = [
        int(v)
        for v in subprocess.run(
            [str(exe)], capture_output=True, text=True, check=True
        ).stdout.split()
    ]
    fw, bi, bi_dev, bi_cmd, bi_ram, mb, mb_ret, st, st_w, dr = values
    assert fw == FW_HEADER_SIZE
    assert bi_cmd == layout.BOOT_INFO_CMDLINE_OFFSET and bi_dev == 48
    assert bi_ram == layout.BOOT_INFO_REGIONS_OFFSET
    assert bi == layout.BOOT_INFO_REGIONS_OFFSET + 16 * layout.ABI_MAX_RAM_REGIONS
    assert (mb, mb_ret) == (layout.ABI_MAILBOX_SIZE, 7 * 8)
    assert (st, st_w) == (layout.ABI_STATS_SLOT_SIZE, 6 * 8)
    assert dr == 6 * 8
