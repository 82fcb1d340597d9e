"""The migration's own threads run below the guest's: a CPU priority for pre-copy work.

On a host with few cores the source's pre-copy threads (the migration thread's harvest and
zero scan, the data channels' senders) and the destination's data-channel receivers compete
for the CPU with the threads that serve the guest: its vCPUs, the device processes, the switch.
A request the guest is serving then waits behind a page copy, and the client sees it as
latency. Pre-copy has no deadline of its own (the policy ends it when the remainder fits the
downtime limit, however long it took), so its threads run below the guest's: SCHED_IDLE where
the platform has it (a thread of that policy is preempted at once by any normal or batch task
woken on its CPU, and weighs 3 against a normal thread's 1024), else a higher nice value
(`MIGRATION_NICE`). When a core is free they use it at full speed, when the guest needs it the
guest wins. The stop-and-copy round, which the guest waits for, runs at the priority the thread
had before (`restored` puts it back). The source's setup up to the strategy's start is lowered
too: the `migrate` command's loading of the source's modules (~0.15 s of CPU, once per VMM:
numpy, the protocol, the transport), the connect and the handshakes; measured at normal
priority, the module loading alone held kv requests 4-10 ms for ~100 ms (p50 0.8 -> 3-10 ms).
The strategy's start is not lowered: shadowing quiesces each device while its rings move, and
the guest's I/O on it waits for that. A process without CAP_SYS_NICE (or an RLIMIT_NICE that
covers it) may not leave SCHED_IDLE nor lower a nice value: `idle_is_reversible` tries it once,
and where it fails SCHED_IDLE is not used (the round would stay idle) and the nice
value that is used stays raised for the round, which is said in the log.

Why not only nice: the frame path's processes run under SCHED_BATCH (`ptmig.net.sched`), and a
woken batch task never preempts a running normal one, however high its nice value: it waits for
the CPU's next tick (4 ms at HZ=250), at every hop of a request that finds a migration thread on
its CPU. A SCHED_IDLE thread is the one exception the scheduler makes. Measured (shadow, 1 GiB,
kv at 20,429 ops/s, 100 MiB/s, 4 alternating runs each on an idle 2-core host, all processes in
one session): kv p99 during pre-copy 7.4 / 9.4 / 8.8 / 9.4 ms with nice +10, 3.8 / 5.9 / 5.9 /
6.5 ms with SCHED_IDLE (p99 before 1.9-4.5 ms in both); migration time and downtime unchanged,
source CPU 1.42-1.46 -> 1.48-1.73 s per GiB of RAM. Sending in smaller paced pieces (10 ms of
the link instead of 250 ms) was measured too and not kept: it raised both sides' CPU
(destination 0.8 -> 1.1-1.3 s per GiB) without a clear latency gain.

The cost of SCHED_IDLE is starvation when normal threads keep every core busy (a guest that
never halts on one core and anything else on the other): pre-copy then advances only as fast
as the 3/1027 share allows, and a migration without auto-converge need never end. So a
watchdog (`StarvationGuard`, a normal thread that sleeps between looks) checks the idle threads
every `STARVED_S`: one that was runnable at both looks without a tick of CPU in between is
starved, and is moved to the normal policy at nice +`MIGRATION_NICE` for the rest of its block,
where it gets its weighted share (found when two migrations of spinning guests ran on a 2-core
host at once: both stood still for 60 s). The stop-and-copy round is never idle where the
thread may come back.

Linux's `setpriority(PRIO_PROCESS, tid)` and `sched_setscheduler(tid)` apply to one thread;
elsewhere this is a no-op.

Nice +10 against no lowering, measured earlier (kv at half load, 1 GiB guest, 100 MiB/s, 6
interleaved runs each on a 2-core host at load 4-9): kv p99 latency during pre-copy ÷ before
went from 2.47 to 1.32 (shadow) and from 2.98 to 1.81 (device-log), kv ops/s served during
pre-copy from 0.50-0.55 to 0.67-0.85 of the offered load; migration time and downtime did not
change beyond the noise. A lowered thread that is preempted while it holds the GIL delays a vCPU
exit the VMM handles in Python until it runs again; the measurement says the CPU handed to the
guest's path (its device processes, the switch, the client) outweighs that. The exit a loaded
guest takes most, its halt, no longer needs the GIL at all (`ptmig.vcpuloop`). A shorter GIL
switch interval during pre-copy (0.5 ms) was tried too and measured no better than none (p99
ratio 2.97 / 2.45 over 3 runs).

Where the kernel groups tasks by session (autogroups,
`/proc/sys/kernel/sched_autogroup_enabled`) a nice value or SCHED_IDLE weighs only against the
threads of its own session, and a woken task preempts an idle one at once only within it. The
demo therefore starts its VMMs, switch and client in its own session (`ptmig.demo.procs`).
Lowering the destination's whole session during pre-copy (nice +10 on `/proc/self/autogroup`)
was tried and reverted: on a host loaded by other work (load 7-9) the receivers starved and a 1
GiB migration took 27-32 s instead of 3-4 s (77 s once with `device-log`)."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATION_NICE = 10  # CFS weight 110 against the guest threads' 1024 (where SCHED_IDLE is not used)


@dataclass(frozen=True)
class Priority:
    """A thread's scheduling before it was lowered: policy and nice value."""

    policy: int
    nice: int


def _tid() -> int:
    return threading.get_native_id()


STARVED_S = 0.5  # how long an idle thread may stay runnable without CPU before it is demoted


def _task_stat(tid: int) -> tuple[str, int] | None:
    """A thread of this process: its state letter and user + system ticks (None if gone)."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 13:
        return None
    return fields[0], int(fields[11]) + int(fields[12])


def starved(before: tuple[str, int] | None, now: tuple[str, int] | None) -> bool:
    """Runnable at both looks (`R`) and not one tick of CPU in between."""
    return (
        before is not None
        and now is not None
        and before[0] == now[0] == "R"
        and now[1] == before[1]
    )


class StarvationGuard:
    """Demotes the lowered threads that starve under SCHED_IDLE to the normal policy at a
    raised nice value (see the module docstring). `watch` before a thread goes idle (the
    watchdog thread, started there, inherits the caller's policy: it must not be idle itself),
    `forget` when its block ends; the watchdog ends when it has nothing to watch."""

    def __init__(
        self,
        period_s: float = STARVED_S,
        stat: Callable[[int], tuple[str, int] | None] = _task_stat,
    ) -> None:
        self.period_s = period_s
        self._stat = stat
        self._lock = threading.Lock()
        self._nice: dict[int, int] = {}  # tid -> the nice value it gets if demoted
        self._last: dict[int, tuple[str, int] | None] = {}
        self._thread: threading.Thread | None = None
        self.demoted: list[int] = []

    def watch(self, tid: int, nice: int) -> None:
        with self._lock:
            self._nice[tid] = nice
            self._last[tid] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="precopy-guard", daemon=True)
                self._thread.start()

    def forget(self, tid: int) -> None:
        with self._lock:
            self._nice.pop(tid, None)
            self._last.pop(tid, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.period_s)
            with self._lock:
                if not self._nice:
                    self._thread = None
                    return
                for tid, nice in list(self._nice.items()):
                    now = self._stat(tid)
                    if starved(self._last.get(tid), now):
                        self._demote(tid, nice)
                        del self._nice[tid], self._last[tid]
                    else:
                        self._last[tid] = now

    def _demote(self, tid: int, nice: int) -> None:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError as e:
            log.info("a starved pre-copy thread (%d) stays idle: %s", tid, e)
            return
        self.demoted.append(tid)
        log.info(
            "pre-copy thread %d starved under SCHED_IDLE (every core busy): nice %+d instead",
            tid,
            nice,
        )


GUARD = StarvationGuard()


@functools.cache
def idle_is_reversible() -> bool:
    """Whether a thread of this process may switch from SCHED_IDLE back to its normal policy.
    The kernel allows it with CAP_SYS_NICE or where RLIMIT_NICE covers the thread's nice value,
    and a root process in a container often lacks the capability, so this is tried once, on a
    throwaway thread, rather than guessed; a thread that could not come back would run the
    stop-and-copy round idle."""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is None:
        return False
    result: list[bool] = []

    def probe() -> None:
        tid = _tid()
        try:
            policy = os.sched_getscheduler(tid)
            os.sched_setscheduler(tid, idle, os.sched_param(0))
        except OSError:
            result.append(False)
            return
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:
            result.append(False)  # (the thread ends here, idle)
            return
        result.append(True)

    t = threading.Thread(target=probe, name="sched-idle-probe")
    t.start()
    t.join()
    return bool(result and result[0])


def lower_this_thread(by: int = MIGRATION_NICE) -> Priority | None:
    """Lower the calling thread below the guest's threads: SCHED_IDLE where the platform has
    it and the thread may come back from it, else its nice value raised by `by`. Returns what
    it was (for `restore_this_thread`), or None when nothing changed."""
    if by <= 0 or not hasattr(os, "setpriority"):
        return None
    tid = _tid()
    try:
        before = Priority(os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
    except (OSError, AttributeError) as e:
        log.debug("cannot read the migration thread's priority: %s", e)
        return None
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None and before.policy != idle and idle_is_reversible():
        GUARD.watch(tid, min(19, before.nice + by))  # (its watchdog must not start idle)
        try:
            os.sched_setscheduler(tid, idle, os.sched_param(0))
            return before
        except OSError as e:
            GUARD.forget(tid)
            log.debug("SCHED_IDLE refused for the migration thread (%s); nice instead", e)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before.nice + by))
    except OSError as e:
        log.debug("cannot lower the migration thread's priority: %s", e)
        return None
    return before


def restore_this_thread(before: Priority | None) -> None:
    """Put the calling thread's policy and nice value back to `before` (None: nothing to do)."""
    if before is None:
        return
    tid = _tid()
    GUARD.forget(tid)
    try:
        if os.sched_getscheduler(tid) != before.policy:
            os.sched_setscheduler(tid, before.policy, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, before.nice)
    except OSError as e:
        log.info("the migration thread stays at a lower priority (not restored: %s)", e)


@contextmanager
def background(*, only_if_reversible: bool = False) -> Iterator[None]:
    """The calling thread at the migration's lower priority inside the block.

    `only_if_reversible`: lower it only where it is sure to come back (SCHED_IDLE may be left,
    see `idle_is_reversible`); elsewhere the block runs at the thread's priority. For a block
    followed by work the guest waits for on the same thread (a raised nice value that cannot
    be lowered again would stay for that work)."""
    if only_if_reversible and not idle_is_reversible():
        yield
        return
    before = lower_this_thread()
    try:
        yield
    finally:
        restore_this_thread(before)


def run_lowered(fn: Callable[[], T]) -> T:
    """`fn()` on a short-lived thread of its own at the migration's lower priority: its result,
    or its exception raised here. The calling thread's priority is never touched, so it cannot
    be left lowered where the process may not raise it again (and no thread it starts later
    inherits a lowered one)."""
    out: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with background():
                out.append(fn())
        except BaseException as e:  # handed to the caller
            failed.append(e)

    t = threading.Thread(target=run, name="migration-load")
    t.start()
    t.join()
    if failed:
        raise failed[0]
    return out[0]
