"""Guest firmware: building it from `guest/` with the system C compiler, and loading the image.

This module owns:

- `build_firmware()`: compiles every C and assembly source under `guest/` (except the host-only
  `*_host.c` programs) into a flat binary laid out by `guest/link.ld`, cached by the SHA-256 of
  the sources, the flags and the compiler's identity.  Builds happen in a private temporary
  directory and are published with an atomic rename, so concurrent builders are safe.
- `load_firmware_image()` / `parse_firmware_image()`: reading a flat image and validating its
  `struct fw_header` (see `guest/abi.h`) into a `FirmwareImage`.
- `build_host_program()`: host-side C (the store-bandwidth loop for the benchmark, the shadow
  data plane library), built and cached the same way.
- `read_abi_header()`: the `#define NAME value` constants of `guest/abi.h`, for cross-checks.

The flat image comes from a second link with `-Wl,--oformat=binary`, so `objcopy` is not
needed: the C compiler (and the linker it drives) is the only build tool.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import PtmigError
from .layout import ABI_FW_LOAD_GPA, ABI_FW_MAX_SIZE, FW_HEADER_MAGIC
from .tokens import sha256

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"

FW_HEADER_VERSION = 1  # struct fw_header.version this loader understands

# struct fw_header: magic, version, header_size, load_gpa, entry, entry_ap, image_end
_FW_HEADER = struct.Struct("<QIIQQQQ")
FW_HEADER_SIZE = _FW_HEADER.size  # 48

COMPILER_NAMES = ("cc", "gcc")

FIRMWARE_CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-O2",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-stack-protector",
    "-fno-pic",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-tree-loop-distribute-patterns",  # never turn a loop into a call to memset/memcpy
    "-fno-omit-frame-pointer",  # readable backtraces from a vCPU register dump
    "-Wall",
    "-Wextra",
    "-Werror",
)
FIRMWARE_LDFLAGS: tuple[str, ...] = (
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
)
HOST_STOREBW_CFLAGS: tuple[str, ...] = ("-std=gnu11", "-O2", "-mgeneral-regs-only", "-Wall")
HOST_STOREBW_SOURCES = ("storebw_loop.c", "storebw_host.c")

FIRMWARE_BIN_PREFIX = "firmware-"


class FirmwareBuildError(PtmigError, RuntimeError):
    """The firmware (or a host helper) could not be built."""


class FirmwareImageError(PtmigError, ValueError):
    """A firmware image is malformed: its header does not describe a loadable image."""


@dataclass(frozen=True)
class FirmwareImage:
    """A validated flat firmware image, ready to be copied to guest RAM at `load_gpa`."""

    data: bytes
    load_gpa: int
    entry: int
    entry_ap: int
    image_end: int

    @property
    def bss_size(self) -> int:
        """Bytes after the file's end (up to image_end) that the VMM leaves zero."""
        return self.image_end - self.load_gpa - len(self.data)


# ---- compiler discovery ---------------------------------------------------------------------


def find_compiler() -> str:
    """Path of the system C compiler (`$CC` if set, else `cc`, else `gcc`)."""
    env_cc = os.environ.get("CC")
    candidates = [env_cc] if env_cc else list(COMPILER_NAMES)
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise FirmwareBuildError(
        f"no C compiler found: looked for {', '.join(repr(c) for c in candidates)} "
        f"on PATH={os.environ.get('PATH', '')!r}; install gcc (the firmware is built from "
        f"source with the system compiler) or set CC"
    )


def compiler_identity(compiler: str) -> str:
    """The compiler's `--version` text (part of the cache key)."""
    try:
        out = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirmwareBuildError(f"C compiler {compiler!r} does not run: {exc}") from exc
    return out.stdout


# ---- sources and cache ----------------------------------------------------------------------


def firmware_sources(source_dir: Path) -> list[Path]:
    """Every file that goes into the firmware build (compiled or included), sorted."""
    if not (source_dir / "link.ld").is_file():
        raise FirmwareBuildError(f"{source_dir} is not a firmware source tree: no link.ld")
    files = [
        p
        for p in source_dir.rglob("*")
        if p.is_file() and p.suffix in (".c", ".S", ".h", ".ld") and not _is_host_only(p)
    ]
    return sorted(files)


def _is_host_only(path: Path) -> bool:
    return path.name.endswith("_host.c")


def _digest(source_dir: Path, files: Sequence[Path], flags: Sequence[str], identity: str) -> str:
    h = sha256()
    h.update(b"ptmig-firmware-v1\0")
    h.update(identity.encode() + b"\0")
    h.update("\0".join(flags).encode() + b"\0")
    for f in files:
        rel = f.relative_to(source_dir).as_posix().encode()
        data = f.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel)
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ptmig/firmware`, or `~/.cache/ptmig/firmware`."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "ptmig" / "firmware"


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FirmwareBuildError(f"{what}: could not run {cmd[0]!r}: {exc}") from exc
    if proc.returncode != 0:
        raise FirmwareBuildError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move tmp to final (a concurrent builder may win the race: same content)."""
    os.replace(tmp, final)


# ---- the firmware build ---------------------------------------------------------------------


def build_firmware(cache_dir: Path | None = None, *, source_dir: Path | None = None) -> Path:
    """Build (or find in the cache) the flat firmware image; returns its path.

    The ELF with symbols sits beside it (same name, `.elf`) for debugging.
    """
    src = (source_dir or GUEST_DIR).resolve()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    compiler = find_compiler()
    identity = compiler + "\n" + compiler_identity(compiler)
    files = firmware_sources(src)
    flags = FIRMWARE_CFLAGS + FIRMWARE_LDFLAGS
    digest = _digest(src, files, flags, identity)
    final_bin = cache / f"{FIRMWARE_BIN_PREFIX}{digest[:24]}.bin"
    if final_bin.is_file():
        return final_bin

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        units = [f for f in files if f.suffix in (".c", ".S")]
        objects = [tmp / (f.relative_to(src).as_posix().replace("/", "__") + ".o") for f in units]

        def compile_one(pair: tuple[Path, Path]) -> None:
            unit, obj = pair
            cmd = [compiler, *FIRMWARE_CFLAGS, "-I", str(src), "-c", str(unit), "-o", str(obj)]
            _run(cmd, tmp, f"compiling {unit.relative_to(src)}")

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, zip(units, objects, strict=True)))

        link = [compiler, *FIRMWARE_CFLAGS, *FIRMWARE_LDFLAGS, "-T", str(src / "link.ld")]
        elf, flat = tmp / "firmware.elf", tmp / "firmware.bin"
        _run([*link, "-o", str(elf), *map(str, objects)], tmp, "linking the firmware ELF")
        _run(
            [*link, "-Wl,--oformat=binary", "-o", str(flat), *map(str, objects)],
            tmp,
            "linking the flat firmware image",
        )
        parse_firmware_image(flat.read_bytes())  # never publish an image the loader rejects
        _publish(elf, final_bin.with_suffix(".elf"))
        _publish(flat, final_bin)
    return final_bin


# ---- the image ------------------------------------------------------------------------------


def parse_firmware_image(data: bytes) -> FirmwareImage:
    """Validate the `struct fw_header` at the start of a flat image."""
    if len(data) < FW_HEADER_SIZE:
        raise FirmwareImageError(
            f"firmware image is {len(data)} bytes, shorter than its {FW_HEADER_SIZE}-byte header"
        )
    magic, version, header_size, load_gpa, entry, entry_ap, image_end = _FW_HEADER.unpack_from(data)
    if magic != FW_HEADER_MAGIC:
        raise FirmwareImageError(
            f"firmware header magic is {magic:#018x}, expected {FW_HEADER_MAGIC:#018x} "
            f'("PTMIGFW1"): not a ptmig firmware image'
        )
    if version != FW_HEADER_VERSION:
        raise FirmwareImageError(
            f"firmware header version is {version}, this VMM supports {FW_HEADER_VERSION}"
        )
    if header_size < FW_HEADER_SIZE or header_size > len(data):
        raise FirmwareImageError(
            f"firmware header_size is {header_size}, expected at least {FW_HEADER_SIZE} and at "
            f"most the image size {len(data)}"
        )
    if load_gpa != ABI_FW_LOAD_GPA:
        raise FirmwareImageError(
            f"firmware load_gpa is {load_gpa:#x}, the ABI loads firmware at {ABI_FW_LOAD_GPA:#x}"
        )
    if len(data) > ABI_FW_MAX_SIZE:
        raise FirmwareImageError(
            f"firmware image is {len(data)} bytes, more than ABI_FW_MAX_SIZE {ABI_FW_MAX_SIZE:#x}"
        )
    file_end = load_gpa + len(data)
    if not file_end <= image_end <= load_gpa + ABI_FW_MAX_SIZE:
        raise FirmwareImageError(
            f"firmware image_end {image_end:#x} is outside [{file_end:#x} (end of file data), "
            f"{load_gpa + ABI_FW_MAX_SIZE:#x} (load_gpa + ABI_FW_MAX_SIZE)]"
        )
    code_start = load_gpa + header_size
    for name, value in (("entry", entry), ("entry_ap", entry_ap)):
        if not code_start <= value < file_end:
            raise FirmwareImageError(
                f"firmware {name} {value:#x} is outside the image's code "
                f"[{code_start:#x}, {file_end:#x})"
            )
    return FirmwareImage(
        data=bytes(data), load_gpa=load_gpa, entry=entry, entry_ap=entry_ap, image_end=image_end
    )


def load_firmware_image(path: Path) -> FirmwareImage:
    """Read and validate a flat firmware image file."""
    path = Path(path)
    size = path.stat().st_size
    if size > ABI_FW_MAX_SIZE:
        raise FirmwareImageError(
            f"firmware image {path} is {size} bytes, more than ABI_FW_MAX_SIZE {ABI_FW_MAX_SIZE:#x}"
        )
    try:
        return parse_firmware_image(path.read_bytes())
    except FirmwareImageError as exc:
        raise FirmwareImageError(f"{path}: {exc}") from None


# ---- host helpers ---------------------------------------------------------------------------


def build_host_program(
    name: str,
    source_dir: Path,
    sources: Sequence[str],
    flags: Sequence[str],
    *,
    headers: Sequence[str] = (),
    cache_dir: Path | None = None,
) -> Path:
    """Build (or find in the cache) a host program or shared library (`-shared` in `flags`)
    from C `sources` under `source_dir`; returns its path. Cached like the firmware: by the
    hash of the sources, `headers`, the flags and the compiler."""
    src = source_dir.resolve()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    compiler = find_compiler()
    identity = compiler + "\n" + compiler_identity(compiler)
    files = [src / n for n in (*sources, *headers)]
    for f in files:
        if not f.is_file():
            raise FirmwareBuildError(f"{name} source {f} is missing")
    digest = _digest(src, files, flags, identity)
    stem, dot, ext = name.partition(".")
    final = cache / f"{stem}-{digest[:24]}{dot}{ext}"  # "dataplane.so" -> "dataplane-<hash>.so"
    if final.is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / name
        cmd = [compiler, *flags, "-I", str(src), *(str(src / s) for s in sources), "-o", str(out)]
        _run(cmd, tmp, f"compiling {name}")
        _publish(out, final)
    return final


def build_host_storebw(cache_dir: Path | None = None, *, source_dir: Path | None = None) -> Path:
    """Build (or find in the cache) the native `storebw_host` program; returns its path.

    Run it as `storebw_host SIZE PASSES`; it prints "storebw: <bytes> bytes in <ticks> ticks".
    """
    return build_host_program(
        "storebw_host",
        source_dir or GUEST_DIR,
        HOST_STOREBW_SOURCES,
        HOST_STOREBW_CFLAGS,
        headers=("storebw_loop.h",),
        cache_dir=cache_dir,
    )


# ---- abi.h ----------------------------------------------------------------------------------

_DEFINE = re.compile(r"^\s*#define\s+([A-Z][A-Z0-9_]*)\s+(0[xX][0-9a-fA-F]+|\d+)\b", re.M)


def read_abi_header(path: Path | None = None) -> dict[str, int]:
    """The integer `#define NAME value` constants of guest/abi.h."""
    text = (path or GUEST_DIR / "abi.h").read_text()
    return {name: int(value, 0) for name, value in _DEFINE.findall(text)}
