"""Conventions every `ptmig` subcommand follows: exit statuses, `--json FILE|-`, bandwidths.

This module owns the table of exit statuses (shown by `ptmig --help` and the README), the
one way a command writes its JSON document (to a file, or to stdout for `-`, in which case the
command's human-readable output goes to stderr), and the parser of `--max-bandwidth` values
(bytes per second as QEMU's `max-bandwidth`, with K/M/G suffixes in powers of 1024). It does
not import click: the VMM (`ptmig.runvm`) uses its exit statuses without the command line's
framework.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

OK = 0
FAILED = 1  # what the command checks did not hold
USAGE = 2  # bad options or arguments (click's own status)
CANNOT_RUN = 3  # the command could not do its job at all
MISMATCH = 4  # a migration completed, but verification found pages that differ
UNRESOLVED = 5  # the switchover's answer was lost: the guest waits paused for x-migrate-resolve
VMM_FAILED = 125  # `ptmig run` itself failed (not the guest), as `docker run` reports it

EXIT_STATUS_TEXT = """\b
Exit status:
  0    success
  1    what the command checks did not hold: the migration failed or was
       cancelled (the guest runs on the source), an acknowledged value was
       lost or wrong (load, demo), a bench section crashed
  2    usage error: bad options or arguments
  3    the command could not do its job: the VMM was unreachable or refused
       (migrate), the demo could not run, the load proved nothing
  4    the migration completed but verification found differing pages
  5    the switchover is unresolved: the guest is paused on the source until
       x-migrate-resolve names the side that keeps it (migrate)
  run  the guest's own exit code; 125 when ptmig run itself failed
"""

STDOUT = "-"


def json_to_stdout(path: Path | str | None) -> bool:
    """`--json -`: the document goes to stdout (and the human-readable output to stderr)."""
    return path is not None and str(path) == STDOUT


def write_json(doc: Any, path: Path | str, *, indent: int = 1) -> None:
    """Write `doc` to `path` (parents created), or to stdout for `-`."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False) + "\n"
    if json_to_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MIN_BANDWIDTH = 4096  # a page a second; below it a number was surely meant in other units


def parse_bandwidth(text: str) -> int:
    """`--max-bandwidth`: bytes/s, `0` unlimited; `100M` is 100 MiB/s. ValueError says why."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(
            f"max-bandwidth must be bytes/s with an optional K, M or G suffix "
            f"(like 100M), got {text!r}"
        )
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if 0 < value < MIN_BANDWIDTH:
        raise ValueError(
            f"max-bandwidth {text!r} is {value} bytes/s, less than a page a "
            f"second; the unit is bytes/s, so 100 MiB/s is 100M"
        )
    return value
