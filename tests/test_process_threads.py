"""A ptmig process starts no threads of its own libraries' making: numpy's OpenBLAS would start
one worker per core in every VMM and in the bench driver, for linear algebra ptmig never does."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import os, ptmig.cli; "
    "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
)


def _probe(env: dict[str, str]) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    threads, setting = out.stdout.split()
    return int(threads), setting


def test_importing_ptmig_starts_no_openblas_workers() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    assert _probe(env) == (1, "1")


def test_a_users_own_openblas_setting_is_kept() -> None:
    assert _probe({**os.environ, "OPENBLAS_NUM_THREADS": "2"})[1] == "2"
