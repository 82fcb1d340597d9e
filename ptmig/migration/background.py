"""The migration's own threads run below the guest's: a CPU priority for pre-copy work.

On a host with few cores the source's pre-copy threads (the migration thread's harvest and
zero scan, the data channels' senders) and the destination's data-channel receivers compete
for the CPU with the threads that serve the guest: its vCPUs, the device processes, the switch.
A request the guest is serving then waits behind a page copy, and the client sees it as
latency. Pre-copy has no deadline of its own (the policy ends it when the remainder fits the
downtime limit, however long it took), so its threads run at a higher nice value
(`MIGRATION_NICE`): when a core is free they use it at full speed, when the guest needs it
the guest wins. The stop-and-copy round, which the guest waits for, runs at the priority the
thread had before (`restored` puts it back where the process may; an unprivileged process may
not lower a nice value, and then the round keeps the lower priority, which is said in the log).

Linux's `setpriority(PRIO_PROCESS, tid)` applies to one thread; elsewhere this is a no-op.

Measured (kv at half load, 1 GiB guest, 100 MiB/s, 6 interleaved runs each on a 2-core host
at load 4-9): kv p99 latency during pre-copy ÷ before went from 2.47 to 1.32 (shadow) and from
2.98 to 1.81 (device-log), kv ops/s served during pre-copy from 0.50-0.55 to 0.67-0.85 of the
offered load; migration time and downtime did not change beyond the noise. A lowered thread
that is preempted while it holds the GIL delays a vCPU exit the VMM handles in Python until it
runs again; the measurement says the CPU handed to the guest's path (its device processes, the
switch, the client) outweighs that. The exit a loaded guest takes most, its halt, no longer
needs the GIL at all (`ptmig.vcpuloop`). A shorter GIL switch interval during pre-copy (0.5 ms)
was tried too and measured no better than none (p99 ratio 2.97 / 2.45 over 3 runs).

Where the kernel groups tasks by session (autogroups, `/proc/sys/kernel/sched_autogroup_enabled`)
a nice value weighs only against the threads of its own session. The VMMs, the switch and the
client each run in a session of their own, so the destination's lowered receivers still take a
whole session's share of the CPU from the source's guest; only the source's own threads are
really below the guest. Lowering the destination's whole session during pre-copy (nice +10 on
`/proc/self/autogroup`) was tried and reverted: on a host loaded by other work (load 7-9) the
receivers starved and a 1 GiB migration took 27-32 s instead of 3-4 s (77 s once with
`device-log`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

MIGRATION_NICE = 10  # CFS weight 110 against the guest threads' 1024 when they compete


def _tid() -> int:
    return threading.get_native_id()


def lower_this_thread(by: int = MIGRATION_NICE) -> int | None:
    """Raise the calling thread's nice value by `by`; its previous nice value, or None when
    the platform cannot (nothing changed)."""
    if by <= 0 or not hasattr(os, "setpriority"):
        return None
    try:
        before = os.getpriority(os.PRIO_PROCESS, _tid())
        os.setpriority(os.PRIO_PROCESS, _tid(), min(19, before + by))
    except OSError as e:
        log.debug("cannot lower the migration thread's priority: %s", e)
        return None
    return before


def restore_this_thread(before: int | None) -> None:
    """Put the calling thread's nice value back to `before` (None: nothing to do)."""
    if before is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, _tid(), before)
    except OSError as e:
        log.info("the migration thread stays at a lower priority (nice not restored: %s)", e)


@contextmanager
def background() -> Iterator[None]:
    """The calling thread at the migration's lower priority inside the block."""
    before = lower_this_thread()
    try:
        yield
    finally:
        restore_this_thread(before)
