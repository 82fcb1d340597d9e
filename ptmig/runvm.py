"""The `ptmig run` process once its command line is parsed: the VMM itself.

`ptmig run` parses its options with click (`ptmig.cli`), then replaces its process image
with `python -m ptmig.runvm OPTIONS` (`exec_vmm`: the same process id, file descriptors and
environment), so the VMM -- which lives as long as its guest -- carries no command-line
framework: click and the command table cost a VMM about 1.5 MiB of private memory it would
never use again (`memstats`; the scale bench's goal counts it against the guest's RAM).

Here the VMM builds its machine and runs the guest or receives one, with `ptmig run`'s exit
statuses (`cliconv`): the guest's own code, 125 when the VMM itself failed (its message on
stderr as `Error: ...`, as click prints a usage error; a bug's traceback before it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .cliconv import VMM_FAILED
from .errors import PtmigError

if TYPE_CHECKING:
    from .machine import Machine


@dataclass(frozen=True)
class VmmOptions:
    """`ptmig run`'s options, checked by its parser (paths as strings: they cross an exec)."""

    config: str
    qmp_path: str | None = None
    console_file: str | None = None
    incoming: str | None = None
    psk_file: str | None = None
    insecure: bool = False
    prefault: bool = True
    incoming_timeout: float | None = None
    log_level: int = logging.WARNING

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VmmOptions:
        return cls(**json.loads(text))


def exec_vmm(options: VmmOptions) -> NoReturn:
    """Become the VMM: this process runs `python -m ptmig.runvm` with `options`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", __name__, options.to_json()])


class VmmFailed(Exception):
    """The VMM could not do what it was asked; the text says what and with which value."""


def main(argv: list[str]) -> NoReturn:
    try:
        (text,) = argv[1:]
        options = VmmOptions.from_json(text)
    except (ValueError, TypeError) as e:  # not `ptmig run`'s handover
        print(
            f"usage: python -m ptmig.runvm OPTIONS-JSON (what `ptmig run` passes): {e}",
            file=sys.stderr,
        )
        sys.exit(VMM_FAILED)
    logging.basicConfig(
        level=options.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        code = run(options)
    except VmmFailed as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(VMM_FAILED)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception:
        traceback.print_exc()
        print("ptmig run: internal error (above); exit status 125", file=sys.stderr)
        sys.exit(VMM_FAILED)
    sys.exit(code)


def run(options: VmmOptions) -> int:
    """Run the VM (or receive it) until the guest exits or `quit`; its exit status."""
    from .config import load_config
    from .machine import Machine
    from .memstats import release_free_memory, tune_malloc
    from .threadnames import install as name_threads

    try:
        cfg = load_config(Path(options.config))
    except PtmigError as e:
        raise VmmFailed(str(e)) from None
    tune_malloc()  # before the VMM's threads start
    name_threads()  # so per-thread tools (/proc/PID/task, perf, top -H) tell them apart
    console = open(options.console_file, "a", buffering=1) if options.console_file else sys.stdout
    psk_file = Path(options.psk_file) if options.psk_file else None
    try:
        machine = Machine(
            cfg,
            console=console,
            qmp_path=options.qmp_path,
            psk_file=psk_file,
            insecure=options.insecure,
        )
    except PtmigError as e:  # no KVM, guest RAM the host cannot give
        raise VmmFailed(str(e)) from None
    _handle_stop_signals(machine, incoming=options.incoming is not None)
    try:
        machine.start_qmp()
        if options.incoming is not None:
            from .migration.destination import run_incoming

            return run_incoming(
                machine,
                options.incoming,
                prefault=options.prefault,
                incoming_timeout=options.incoming_timeout,
            )
        try:
            machine.boot()
        # the firmware's build, a device process, a disk another VMM holds: ptmig's own
        # errors, each saying what failed (DeviceError's module loads with the devices)
        except PtmigError as e:
            raise VmmFailed(str(e)) from None
        # start-up's garbage (compiling the modules, building the firmware) goes back to the
        # host before the guest runs for its lifetime
        release_free_memory()
        return machine.run()
    finally:
        machine.close()


def _handle_stop_signals(machine: Machine, *, incoming: bool) -> None:
    """SIGTERM (and, on a destination, SIGINT) stop the VMM as QMP's `quit` does."""
    quit_asked = threading.Event()  # the stop request is QMP's `quit`: exit 0, as QEMU
    main_thread = threading.main_thread().ident or threading.get_ident()

    def _stop_waits(signum: int) -> bool:
        """An incoming migration has begun its commit point: the guest starts, then stops."""
        return machine.incoming is not None and machine.incoming.defer_stop(signum)

    def on_sigterm(signum: int, frame: object) -> None:
        if machine.vm.state.value in ("prelaunch", "inmigrate") and not _stop_waits(signum):
            # nothing runs yet: unwind (and clean up) at once
            raise SystemExit(0 if quit_asked.is_set() else 128 + signum)
        machine.request_quit()

    def quit_incoming() -> None:
        """QMP `quit` on a destination whose guest does not run yet: the main thread, which
        runs the incoming migration, gets the stop request SIGTERM would bring (before the
        commit point the source is told and resumes; after it the guest starts, then stops)."""
        if machine.vm.state.value in ("prelaunch", "inmigrate"):
            quit_asked.set()
            signal.pthread_kill(main_thread, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    if incoming:  # Ctrl-C on a destination: the same care about its commit point
        signal.signal(signal.SIGINT, on_sigterm)
        machine.on_quit = quit_incoming


if __name__ == "__main__":
    main(sys.argv)
