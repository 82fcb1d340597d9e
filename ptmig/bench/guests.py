"""Hand-assembled micro-guests for the VMM-core benchmarks.

Each function returns flat x86-64 machine code to be loaded at the firmware GPA and entered at
CPL 3 (see docs/GUEST_ABI.md: `rdi` = vCPU index). They are tiny on purpose: the benchmark
must measure the VMM's exit path, not the firmware. Encodings were checked against GNU as;
the assembly is in the comments.
"""

from __future__ import annotations

import struct

from ..layout import ABI_MMIO_BASE_GPA, ABI_MMIO_STRIDE, ABI_PORT_HYPERCALL, HC_EXIT, HC_HALT

UNUSED_PORT = 0x510  # no device, not the console, not the hypercall port
# Device window 0 at offset 0xF00: the benchmark VMs attach no device, so nothing backs it and
# the VM counts the access and carries on.
UNBACKED_MMIO_GPA = ABI_MMIO_BASE_GPA + 0xF00
_MAX_ITERATIONS = 0xFFFF_FFFF

# Tail shared by the loop guests: exit(0) through vCPU 0's hypercall mailbox.
_EXIT_ZERO = (
    bytes.fromhex("48C704250890000000000000")  # mov qword [0x9008], 0   (args[0] = 0)
    + b"\xba"
    + struct.pack("<I", ABI_PORT_HYPERCALL)  # mov edx, 0x500
    + b"\xb8"
    + struct.pack("<I", HC_EXIT)  # mov eax, HC_EXIT
    + bytes.fromhex("EF")  # out dx, eax
    + bytes.fromhex("EBFE")  # jmp $
)


def _check_iterations(n: int) -> None:
    if not 0 <= n <= _MAX_ITERATIONS:
        raise ValueError(f"iterations={n} must be in [0, {_MAX_ITERATIONS:#x}] (a 32-bit count)")


def port_io_loop(iterations: int, port: int = UNUSED_PORT) -> bytes:
    """`iterations` one-byte `out` instructions to `port`, then exit(0).

    Every `out` is a KVM_EXIT_IO handled in Python; with 0 iterations only the exit remains.
    """
    _check_iterations(iterations)
    if not 0 <= port <= 0xFFFF or port == ABI_PORT_HYPERCALL:
        raise ValueError(f"port {port:#x} must be a 16-bit port other than the hypercall port")
    return (
        b"\xb9"
        + struct.pack("<I", iterations)  # mov ecx, iterations
        + b"\xba"
        + struct.pack("<I", port)  # mov edx, port
        + bytes.fromhex("31C0")  # xor eax, eax
        + bytes.fromhex("85C9")  # test ecx, ecx
        + bytes.fromhex("7405")  # jz done
        + bytes.fromhex("EE")  # loop: out dx, al
        + bytes.fromhex("FFC9")  # dec ecx
        + bytes.fromhex("75FB")  # jnz loop
        + _EXIT_ZERO  # done:
    )


def mmio_store_loop(iterations: int, gpa: int = UNBACKED_MMIO_GPA) -> bytes:
    """`iterations` 4-byte stores to the unbacked `gpa`, then exit(0).

    Every store is a KVM_EXIT_MMIO handled in Python.
    """
    _check_iterations(iterations)
    if not ABI_MMIO_BASE_GPA <= gpa < ABI_MMIO_BASE_GPA + 8 * ABI_MMIO_STRIDE or gpa % 4:
        raise ValueError(f"gpa {gpa:#x} must be a 4-byte aligned address in the MMIO windows")
    return (
        b"\xb9"
        + struct.pack("<I", iterations)  # mov ecx, iterations
        + b"\xbe"
        + struct.pack("<I", gpa)  # mov esi, gpa   (zero-extends into rsi)
        + bytes.fromhex("31C0")  # xor eax, eax
        + bytes.fromhex("85C9")  # test ecx, ecx
        + bytes.fromhex("7406")  # jz done
        + bytes.fromhex("8906")  # loop: mov [rsi], eax
        + bytes.fromhex("FFC9")  # dec ecx
        + bytes.fromhex("75FA")  # jnz loop
        + _EXIT_ZERO  # done:
    )


def halt_forever() -> bytes:
    """Every vCPU makes the HALT hypercall with no timeout, again each time it is woken."""
    return (
        bytes.fromhex("4889FB")  # mov rbx, rdi        (vCPU index)
        + bytes.fromhex("48C1E308")  # shl rbx, 8     (256-byte mailboxes)
        + bytes.fromhex("48C7830890000000000000")  # mov qword [rbx+0x9008], 0  (no timeout)
        + b"\xba"
        + struct.pack("<I", ABI_PORT_HYPERCALL)  # again: mov edx, 0x500
        + b"\xb8"
        + struct.pack("<I", HC_HALT)  # mov eax, HC_HALT
        + bytes.fromhex("EF")  # out dx, eax
        + bytes.fromhex("EBF3")  # jmp again
    )
