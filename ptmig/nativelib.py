"""Loading the host-side C libraries in `native/`: built at first use, cached, loaded once.

Each library is compiled with the system C compiler by `ptmig.firmware.build_host_program`
(cached by the hash of its source, the flags and the compiler, like the guest firmware) and
loaded with ctypes, which releases the GIL around every call: the libraries run threads of
their own and their calls may block on a mutex.

`PTMIG_NATIVE_SANITIZE=address,undefined` (any list `-fsanitize=` takes) builds every library
with those sanitizers instead (`-O1 -g`, a separate cache entry, every finding fatal). Python
itself is not instrumented, so the ASan runtime must be loaded first: `make sanitize` sets
`LD_PRELOAD` and the options and runs the native code's differential and fuzz tests that way.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import PtmigError
from .firmware import FirmwareBuildError, build_host_program

NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
CFLAGS: tuple[str, ...] = (
    "-std=gnu11",
    "-O2",
    "-fPIC",
    "-shared",
    "-pthread",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fvisibility=default",
)

SANITIZE_ENV = "PTMIG_NATIVE_SANITIZE"

Signatures = dict[str, tuple[object, list[object]]]


def build_flags(sanitize: str | None = None) -> tuple[str, ...]:
    """The compiler flags for the native libraries; with `sanitize` (e.g. "address,undefined"),
    an instrumented debug build that stops at the first finding."""
    if not sanitize:
        return CFLAGS
    if not all(part.isidentifier() for part in sanitize.split(",")):
        raise NativeLibraryError(f"{SANITIZE_ENV}={sanitize!r} is not a list of sanitizer names")
    plain = tuple(f for f in CFLAGS if f != "-O2")
    return (
        *plain,
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        f"-fsanitize={sanitize}",
        "-fno-sanitize-recover=all",
    )


class NativeLibraryError(PtmigError, RuntimeError):
    """A native library could not be built or loaded."""


_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def build_library(
    sources: Sequence[str],
    headers: Sequence[str] = (),
    *,
    cache_dir: Path | None = None,
    source_dir: Path | None = None,
) -> Path:
    """Build (or find in the cache) `native/<sources>` as one shared library, named after the
    first source; returns its path."""
    name = Path(sources[0]).with_suffix(".so").name
    flags = build_flags(os.environ.get(SANITIZE_ENV))
    return build_host_program(
        name,
        source_dir or NATIVE_DIR,
        tuple(sources),
        flags,
        headers=tuple(headers),
        cache_dir=cache_dir,
    )


def load_library(
    sources: Sequence[str], signatures: Signatures, headers: Sequence[str] = ()
) -> ctypes.CDLL:
    """The library built from `native/<sources>`, with the argument and result types of its
    functions declared from `signatures` (name -> (restype, argtypes)); loaded once."""
    key = ",".join(sources)
    with _lock:
        lib = _loaded.get(key)
        if lib is None:
            try:
                lib = ctypes.CDLL(str(build_library(sources, headers)))
                for name, (restype, argtypes) in signatures.items():
                    fn = getattr(lib, name)
                    fn.restype = restype
                    fn.argtypes = argtypes
            except (OSError, AttributeError, FirmwareBuildError) as e:
                raise NativeLibraryError(f"native/{sources[0]} is unavailable: {e}") from e
            _loaded[key] = lib
        return lib
