"""The KVM API: ioctl numbers, uapi structures and per-fd wrappers (system, VM, vCPU)."""

from .errors import KvmError, KvmUnavailable
from .ioctls import Cap, Exit, Ioctl
from .system import Kvm, VcpuFd, VmFd

__all__ = ["Cap", "Exit", "Ioctl", "Kvm", "KvmError", "KvmUnavailable", "VcpuFd", "VmFd"]
