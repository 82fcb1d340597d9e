"""What the demo shows while it runs: phase, pre-copy round, MiB remaining, kv ops/s.

`Progress` is the state (updated from the demo's threads, read by the view); `LiveView` draws
it with `rich.live` on a terminal, and prints one plain line per change of phase elsewhere (a
log file, a test), so the output stays readable in both.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass
class Progress:
    phase: str = "starting"
    round: int | None = None
    remaining_mib: float | None = None
    transferred_mib: float | None = None
    ops_per_s: float | None = None
    ops: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: tuple[float, int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_phase(self, phase: str) -> None:
        with self.lock:
            self.phase = phase

    def load_progress(self, when: float, ops: int) -> None:
        """A progress line of the load client: ops completed at CLOCK_MONOTONIC `when`."""
        with self.lock:
            if self._last is not None and when > self._last[0]:
                self.ops_per_s = (ops - self._last[1]) / (when - self._last[0])
            self._last = (when, ops)
            self.ops = ops

    def migration(self, info: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        with self.lock:
            if ram:
                self.remaining_mib = ram.get("remaining", 0) / (1 << 20)
                self.transferred_mib = ram.get("transferred", 0) / (1 << 20)
            rounds = info.get("x-rounds")
            if isinstance(rounds, list):
                self.round = len(rounds)


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


class LiveView:
    def __init__(self, console: Console, *, live: bool) -> None:
        self.console = console
        self.progress = Progress()
        self._live: Live | None = None
        self._use_live = live and console.is_terminal
        self._printed_phase = ""

    def table(self) -> Table:
        p = self.progress
        with p.lock:
            t = Table(title="ptmig demo", title_justify="left", show_edge=False)
            for col in ("elapsed", "phase", "round", "remaining", "sent", "kv ops/s"):
                t.add_column(col, justify="right" if col != "phase" else "left")
            t.add_row(
                f"{time.monotonic() - p.started:5.1f} s",
                p.phase,
                "–" if p.round is None else str(p.round),
                f"{_fmt(p.remaining_mib, '.1f')} MiB",
                f"{_fmt(p.transferred_mib, '.1f')} MiB",
                _fmt(p.ops_per_s, ",.0f"),
            )
        return t

    def __enter__(self) -> LiveView:
        if self._use_live:
            self._live = Live(
                self.table(),
                console=self.console,
                refresh_per_second=8,
                get_renderable=self.table,
                transient=False,
            )
            self._live.__enter__()
        return self

    def update(self) -> None:
        """Called by the demo loop: refreshes the view or prints a line on a new phase."""
        if self._live is not None:
            return  # `get_renderable` redraws it
        p = self.progress
        if p.phase != self._printed_phase:
            self._printed_phase = p.phase
            with p.lock:
                ops = _fmt(p.ops_per_s, ",.0f")
                rem = _fmt(p.remaining_mib, ".1f")
            self.console.print(
                f"[{time.monotonic() - p.started:5.1f} s] {p.phase} "
                f"(kv {ops} ops/s, {rem} MiB remaining)",
                highlight=False,
                soft_wrap=True,
            )

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
