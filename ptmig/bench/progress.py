"""The live status line of `ptmig bench`: which section, which cell, run k of n, time elapsed.

`run_bench` opens one `BenchProgress` for the whole bench and tells it each section as it
starts; a section's measuring loop reports where it is with `step("shadow 1G", run=2, runs=3)`
(a module-level function: sections need no handle, and a step with no bench running is a
no-op). On a terminal the line is drawn with `rich.live` below whatever the sections print;
elsewhere (a log file, a test) nothing extra is printed, since the sections' own lines and
tables already say what ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.text import Text

_current: BenchProgress | None = None


def _clock_text(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


@dataclass
class _State:
    section: str = ""
    section_no: int = 0
    sections: int = 0
    section_started: float = 0.0
    cell: str = ""
    run: int | None = None
    runs: int | None = None


class BenchProgress:
    def __init__(
        self,
        console: Console,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.clock = clock
        self.started = clock()
        self._state = _State()
        self._lock = threading.Lock()
        self._use_live = console.is_terminal if live is None else live
        self._live: Live | None = None

    def section(self, name: str, number: int, count: int) -> None:
        with self._lock:
            self._state = _State(name, number, count, self.clock())

    def step(self, cell: str, run: int | None = None, runs: int | None = None) -> None:
        with self._lock:
            self._state.cell, self._state.run, self._state.runs = cell, run, runs

    def text(self) -> str:
        """The status line: section i/n, cell, run k/n, elapsed in the section and in all."""
        now = self.clock()
        with self._lock:
            st = self._state
            parts = [f"bench {st.section or '–'} ({st.section_no}/{st.sections})"]
            if st.cell:
                parts.append(st.cell)
            if st.run is not None:
                parts.append(f"run {st.run}/{st.runs}" if st.runs else f"run {st.run}")
            section_s = now - st.section_started if st.section else 0.0
        parts.append(
            f"{_clock_text(section_s)} in this section, {_clock_text(now - self.started)} in all"
        )
        return " │ ".join(parts)

    def _render(self) -> Text:
        return Text(self.text(), style="cyan")

    def __enter__(self) -> BenchProgress:
        global _current
        _current = self
        if self._use_live:
            self._live = Live(
                self._render(),
                console=self.console,
                refresh_per_second=2,
                get_renderable=self._render,
                transient=True,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        global _current
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
        if _current is self:
            _current = None


def step(cell: str, run: int | None = None, runs: int | None = None) -> None:
    """Where the running section is now (nothing happens outside `ptmig bench`)."""
    if _current is not None:
        _current.step(cell, run, runs)
