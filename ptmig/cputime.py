"""CPU time a VMM process spent on a migration (Linux).

`sample(pid)` reads the process's user + system time (`/proc/PID/stat`, its live and ended
threads together) and each live thread's (`/proc/PID/task/TID/stat`), with the time the thread
spent running a guest (`guest_time`). A thread that ran a guest is a vCPU thread: its time is
the guest's work (and its exits), not the migration's. `migration_cpu_s(start, end)` is the
process's CPU between two samples less what its vCPU threads used in between: the sender or
receiver, dirty-log harvest, hashing, the shadow data plane, QMP, and whatever else the VMM
does meanwhile. Parsing is one pure function (`parse_stat`) so it is tested without /proc.

Those samples are an observer's, taken when it polls. The switchover is a moment only the
VMMs know: a small guest's verification after it can end before the next poll, and the
"to the switchover" sample is then missed. So each VMM also meters itself (`MigrationMeter`):
its process CPU clock less its vCPU threads', read at the migration's start and at the
switchover, and reported in `query-migrate` (`x-cpu-s`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
# Fields of /proc/PID/stat counted from the one after the command name: state is 0.
_UTIME, _STIME, _GUEST_TIME = 11, 12, 40


@dataclass(frozen=True)
class StatTimes:
    cpu_s: float  # user + system (user includes guest time)
    guest_s: float


@dataclass
class CpuSample:
    total_s: float
    threads: dict[int, StatTimes] = field(default_factory=dict)


def parse_stat(text: str) -> StatTimes:
    """user + system and guest seconds of one `/proc/.../stat` line; the command name (in
    parentheses, may contain spaces and parentheses) is skipped by its last ')'."""
    close = text.rfind(")")
    fields = text[close + 2 :].split() if close >= 0 else []
    if len(fields) <= _GUEST_TIME:
        raise ValueError(
            f"not a /proc stat line ({len(fields)} fields after the name): {text[:80]!r}"
        )
    return StatTimes(
        (int(fields[_UTIME]) + int(fields[_STIME])) * TICK_S, int(fields[_GUEST_TIME]) * TICK_S
    )


def _read(path: str) -> StatTimes | None:
    try:
        with open(path) as f:
            return parse_stat(f.read())
    except (OSError, ValueError):
        return None  # the thread ended between listing and reading


def sample(pid: int) -> CpuSample | None:
    """The process's and its threads' CPU times now; None if the process is gone."""
    whole = _read(f"/proc/{pid}/stat")
    if whole is None:
        return None
    threads: dict[int, StatTimes] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        times = _read(f"/proc/{pid}/task/{tid}/stat")
        if times is not None:
            threads[int(tid)] = times
    return CpuSample(whole.cpu_s, threads)


def migration_cpu_s(start: CpuSample, end: CpuSample) -> float:
    """CPU seconds between the samples, vCPU threads (any that ran a guest by `end`) left out."""
    vcpu = 0.0
    for tid, t in end.threads.items():
        if t.guest_s > 0:
            before = start.threads.get(tid)
            vcpu += t.cpu_s - (before.cpu_s if before is not None else 0.0)
    return max(0.0, end.total_s - start.total_s - vcpu)


def _thread_cpu_s(tid: int) -> float:
    """One thread of this process: its user + system seconds (0 if it has ended)."""
    times = _read(f"/proc/self/task/{tid}/stat")
    return times.cpu_s if times is not None else 0.0


def migration_clock(vcpu_tids: Iterable[int]) -> float:
    """This process's CPU seconds (every thread, ended ones included) less its vCPU threads'.

    Cheap (one clock read and one small /proc read per vCPU): the destination takes it inside
    the downtime. A vCPU thread that ended is no longer subtracted: its time stays counted.
    """
    total = time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)
    return total - sum(_thread_cpu_s(tid) for tid in vcpu_tids)


class MigrationMeter:
    """The CPU a migration costs this VMM, from `start()` to `stop()` (vCPU threads left out).

    `vcpu_tids` is asked at each reading, so vCPU threads started in between are counted too.
    """

    def __init__(
        self,
        vcpu_tids: Callable[[], Iterable[int]],
        clock: Callable[[Iterable[int]], float] = migration_clock,
    ) -> None:
        self._tids = vcpu_tids
        self._clock = clock
        self._start: float | None = None
        self.used_s: float | None = None  # set by stop()

    def start(self) -> None:
        self._start, self.used_s = self._clock(self._tids()), None

    def stop(self) -> float | None:
        """The CPU seconds since `start()` (None if it was never started)."""
        if self._start is not None:
            self.used_s = max(0.0, self._clock(self._tids()) - self._start)
        return self.used_s
