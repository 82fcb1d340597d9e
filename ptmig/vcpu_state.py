"""Complete vCPU state: save from one VM, validate, restore into a fresh VM in another process.

`VcpuState` is plain data with a versioned, checksummed binary form. Saving reads every piece
KVM exposes (regs, sregs, xsave, xcrs, debug registers, vcpu events, mp state, MSRs from KVM's
own index list, cpuid); restoring writes them back in Firecracker's order (CPUID2, MP_STATE,
REGS, SREGS, XSAVE, XCRS, DEBUGREGS, MSRS, VCPU_EVENTS). The TSC is carried across: the value
saved at pause time is advanced by the wall-clock time the guest spent paused, so the guest's
clock never goes backwards and the guest itself can observe how long it was paused.
"""

from __future__ import annotations

import ctypes
import struct
import time
import zlib
from dataclasses import dataclass, field

from .errors import PtmigError
from .kvm import Ioctl, KvmError, VcpuFd
from .kvm import structs as s

MSR_IA32_TSC = 0x10
STATE_MAGIC = b"PTVCPU\x00\x01"
STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 20
XSAVE_SIZE = 4096

_FIELDS = ("regs", "sregs", "xsave", "xcrs", "debugregs", "events", "mp_state", "cpuid", "msrs")
_FIXED_SIZES = {
    "regs": ctypes.sizeof(s.KvmRegs),
    "sregs": ctypes.sizeof(s.KvmSregs),
    "xcrs": ctypes.sizeof(s.KvmXcrs),
    "debugregs": ctypes.sizeof(s.KvmDebugregs),
    "events": ctypes.sizeof(s.KvmVcpuEvents),
    "mp_state": ctypes.sizeof(s.KvmMpState),
}
_MSR = struct.Struct("<IQ")
_CPUID = ctypes.sizeof(s.KvmCpuidEntry2)
_U64 = (1 << 64) - 1


class VcpuStateError(PtmigError, ValueError):
    """A saved vCPU state that cannot be loaded (corrupt, wrong version, wrong sizes)."""


@dataclass(frozen=True)
class VcpuState:
    index: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    events: bytes
    mp_state: bytes
    cpuid: bytes
    msrs: tuple[tuple[int, int], ...]
    tsc: int
    tsc_khz: int
    saved_at_ns: int = field(default=0)

    # --- capture / restore -------------------------------------------------------------

    @classmethod
    def save(cls, fd: VcpuFd, msr_indices: list[int], tsc_khz: int) -> VcpuState:
        msrs = tuple(fd.get_msrs(msr_indices))
        tsc = next((v for i, v in msrs if i == MSR_IA32_TSC), 0)
        cpuid = fd.get_cpuid_raw()
        return cls(
            index=fd.index,
            regs=fd.get_blob(Ioctl.GET_REGS, _FIXED_SIZES["regs"]),
            sregs=fd.get_blob(Ioctl.GET_SREGS, _FIXED_SIZES["sregs"]),
            xsave=fd.get_blob(Ioctl.GET_XSAVE, XSAVE_SIZE),
            xcrs=fd.get_blob(Ioctl.GET_XCRS, _FIXED_SIZES["xcrs"]),
            debugregs=fd.get_blob(Ioctl.GET_DEBUGREGS, _FIXED_SIZES["debugregs"]),
            events=fd.get_blob(Ioctl.GET_VCPU_EVENTS, _FIXED_SIZES["events"]),
            mp_state=fd.get_blob(Ioctl.GET_MP_STATE, _FIXED_SIZES["mp_state"]),
            cpuid=cpuid,
            msrs=msrs,
            tsc=tsc,
            tsc_khz=tsc_khz,
            saved_at_ns=time.time_ns(),
        )

    def restore(self, fd: VcpuFd, *, advance_tsc: bool = True) -> None:
        """Load this state into a fresh vCPU (Firecracker's order). The CPUID is set unless
        KVM already reports exactly these entries for the vCPU (a destination on a host like
        the source's set the same ones when it created its vCPUs): setting them again would
        change nothing and cost the switchover's downtime ~0.1 ms per vCPU."""
        if fd.cpuid != self.cpuid:
            fd.set_cpuid_raw(self.cpuid)
        fd.set_blob(Ioctl.SET_MP_STATE, self.mp_state)
        fd.set_blob(Ioctl.SET_REGS, self.regs)
        fd.set_blob(Ioctl.SET_SREGS, self.sregs)
        fd.set_blob(Ioctl.SET_XSAVE, self.xsave)
        fd.set_blob(Ioctl.SET_XCRS, self.xcrs)
        fd.set_blob(Ioctl.SET_DEBUGREGS, self.debugregs)
        msrs = dict(self.msrs)
        if advance_tsc and self.tsc_khz:
            paused_ns = max(0, time.time_ns() - self.saved_at_ns)
            msrs[MSR_IA32_TSC] = (self.tsc + paused_ns * self.tsc_khz // 1_000_000) & _U64
        pairs = list(msrs.items())
        while pairs:
            written = fd.set_msrs(pairs)
            if written == len(pairs):
                break
            idx, val = pairs[written]
            if not (_is_unused_paravirt_msr(idx, val)):
                raise KvmError(
                    "SET_MSRS",
                    22,
                    f"MSR {idx:#x}={val:#x} (entry {written} of {len(pairs)}) rejected",
                )
            pairs = pairs[written + 1 :]
        fd.set_blob(Ioctl.SET_VCPU_EVENTS, self.events)

    # --- serialisation -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        body = bytearray()
        body += struct.pack(
            "<IIQQQ", STATE_VERSION, self.index, self.tsc, self.tsc_khz, self.saved_at_ns
        )
        for name in _FIELDS[:-1]:
            blob = getattr(self, name)
            body += struct.pack("<I", len(blob)) + blob
        body += struct.pack("<I", len(self.msrs))
        for idx, val in self.msrs:
            body += _MSR.pack(idx, val)
        return STATE_MAGIC + struct.pack("<II", len(body), zlib.crc32(body)) + bytes(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> VcpuState:
        """Parse and validate a saved state. Untrusted input: every length is checked."""
        if len(data) > MAX_STATE_BYTES:
            raise VcpuStateError(f"vCPU state of {len(data)} bytes exceeds {MAX_STATE_BYTES}")
        if len(data) < 16 or data[:8] != STATE_MAGIC:
            raise VcpuStateError("not a ptmig vCPU state (bad magic)")
        length, crc = struct.unpack_from("<II", data, 8)
        body = data[16:]
        if length != len(body):
            raise VcpuStateError(f"vCPU state body is {len(body)} bytes, header says {length}")
        if zlib.crc32(body) != crc:
            raise VcpuStateError("vCPU state checksum mismatch")
        try:
            version, index, tsc, tsc_khz, saved_at = struct.unpack_from("<IIQQQ", body, 0)
            if version != STATE_VERSION:
                raise VcpuStateError(f"vCPU state version {version}, expected {STATE_VERSION}")
            off = 32
            blobs: dict[str, bytes] = {}
            for name in _FIELDS[:-1]:
                (n,) = struct.unpack_from("<I", body, off)
                off += 4
                if off + n > len(body):
                    raise VcpuStateError(f"field {name} runs past the end of the state")
                blobs[name] = bytes(body[off : off + n])
                off += n
                want = _FIXED_SIZES.get(name)
                if want is not None and n != want:
                    raise VcpuStateError(f"field {name} is {n} bytes, expected {want}")
            if len(blobs["xsave"]) != XSAVE_SIZE:
                raise VcpuStateError(f"xsave is {len(blobs['xsave'])} bytes, expected {XSAVE_SIZE}")
            if len(blobs["cpuid"]) % _CPUID or len(blobs["cpuid"]) > 256 * _CPUID:
                raise VcpuStateError(f"cpuid blob of {len(blobs['cpuid'])} bytes is malformed")
            (nmsrs,) = struct.unpack_from("<I", body, off)
            off += 4
            if nmsrs > 4096 or off + nmsrs * _MSR.size != len(body):
                raise VcpuStateError(f"MSR list of {nmsrs} entries does not match the state size")
            msrs = tuple(_MSR.unpack_from(body, off + i * _MSR.size) for i in range(nmsrs))
        except struct.error as e:
            raise VcpuStateError(f"truncated vCPU state: {e}") from None
        return cls(index=index, tsc=tsc, tsc_khz=tsc_khz, saved_at_ns=saved_at, msrs=msrs, **blobs)

    @property
    def rip(self) -> int:
        return s.KvmRegs.from_buffer_copy(self.regs).rip


def _is_unused_paravirt_msr(index: int, value: int) -> bool:
    """KVM's paravirtual MSRs (0x4b564dxx) at 0 mean "feature not enabled by the guest"; KVM
    lists them as saveable but rejects writing 0 to some of them (async-PF interrupt vector)."""
    return 0x4B564D00 <= index <= 0x4B564DFF and value == 0


def saveable_msrs(fd: VcpuFd, candidates: list[int]) -> list[int]:
    """The subset of KVM's MSR index list this vCPU can actually read (KVM stops a batch at the
    first MSR it cannot read; skip that one and go on)."""
    out: list[int] = []
    rest = list(candidates)
    while rest:
        got = fd.get_msrs(rest)
        out.extend(i for i, _ in got)
        rest = rest[len(got) + 1 :]
    return out
