"""Virtio numbers shared by the transport, the queues and the device models.

Owns: device ids, feature bit numbers, device status bits, interrupt status bits, descriptor
flags, the virtio-mmio v2 register offsets, and the config-space layouts of virtio-net and
virtio-blk (virtio 1.x spec, sections 2.1, 2.4, 2.7, 4.2.2, 5.1 and 5.2). Numbers only: no logic.
"""

from __future__ import annotations

import struct
from typing import Final

# -- device ids (spec 5) ---------------------------------------------------------------------
VIRTIO_ID_NET: Final = 1
VIRTIO_ID_BLOCK: Final = 2

# -- device-independent feature bits (spec 6) ------------------------------------------------
VIRTIO_F_INDIRECT_DESC: Final = 28
VIRTIO_F_EVENT_IDX: Final = 29
VIRTIO_F_VERSION_1: Final = 32
VIRTIO_F_ACCESS_PLATFORM: Final = 33
VIRTIO_F_RING_PACKED: Final = 34
VIRTIO_F_IN_ORDER: Final = 35


def feature_mask(*bits: int) -> int:
    """The 64-bit feature word with exactly the given bit numbers set."""
    mask = 0
    for bit in bits:
        if not 0 <= bit < 64:
            raise ValueError(f"feature bit {bit} is outside 0..63")
        mask |= 1 << bit
    return mask


# -- device status (spec 2.1) ----------------------------------------------------------------
STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8
STATUS_DEVICE_NEEDS_RESET: Final = 64
STATUS_FAILED: Final = 128

# -- interrupt status bits of virtio-mmio (spec 4.2.2) ---------------------------------------
INTERRUPT_USED_BUFFER: Final = 1
INTERRUPT_CONFIG_CHANGE: Final = 2

# -- split virtqueue layout (spec 2.7) -------------------------------------------------------
VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_DESC_KNOWN_FLAGS: Final = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_INDIRECT
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1
VIRTQ_MAX_SIZE: Final = 32768
DESC_SIZE: Final = 16  # {addr u64, len u32, flags u16, next u16}
USED_ELEM_SIZE: Final = 8  # {id u32, len u32}
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4

# -- virtio-mmio v2 registers (spec 4.2.2) ---------------------------------------------------
MMIO_MAGIC: Final = 0x74726976  # "virt", little-endian
MMIO_VERSION: Final = 2
MMIO_WINDOW_SIZE: Final = 0x1000

REG_MAGIC_VALUE: Final = 0x000
REG_VERSION: Final = 0x004
REG_DEVICE_ID: Final = 0x008
REG_VENDOR_ID: Final = 0x00C
REG_DEVICE_FEATURES: Final = 0x010
REG_DEVICE_FEATURES_SEL: Final = 0x014
REG_DRIVER_FEATURES: Final = 0x020
REG_DRIVER_FEATURES_SEL: Final = 0x024
REG_QUEUE_SEL: Final = 0x030
REG_QUEUE_NUM_MAX: Final = 0x034
REG_QUEUE_NUM: Final = 0x038
REG_QUEUE_READY: Final = 0x044
REG_QUEUE_NOTIFY: Final = 0x050
REG_INTERRUPT_STATUS: Final = 0x060
REG_INTERRUPT_ACK: Final = 0x064
REG_STATUS: Final = 0x070
REG_QUEUE_DESC_LOW: Final = 0x080
REG_QUEUE_DESC_HIGH: Final = 0x084
REG_QUEUE_DRIVER_LOW: Final = 0x090
REG_QUEUE_DRIVER_HIGH: Final = 0x094
REG_QUEUE_DEVICE_LOW: Final = 0x0A0
REG_QUEUE_DEVICE_HIGH: Final = 0x0A4
REG_CONFIG_GENERATION: Final = 0x0FC
REG_CONFIG: Final = 0x100

# -- virtio-net (spec 5.1) -------------------------------------------------------------------
VIRTIO_NET_F_CSUM: Final = 0
VIRTIO_NET_F_GUEST_CSUM: Final = 1
VIRTIO_NET_F_MTU: Final = 3
VIRTIO_NET_F_MAC: Final = 5
VIRTIO_NET_F_MRG_RXBUF: Final = 15
VIRTIO_NET_F_STATUS: Final = 16

VIRTIO_NET_S_LINK_UP: Final = 1
NET_QUEUE_RX: Final = 0
NET_QUEUE_TX: Final = 1

#: struct virtio_net_hdr_v1: flags u8, gso_type u8, hdr_len u16, gso_size u16,
#: csum_start u16, csum_offset u16, num_buffers u16 -- 12 bytes.
NET_HDR_FORMAT: Final = "<BBHHHHH"
NET_HDR_SIZE: Final = 12

#: struct virtio_net_config: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
NET_CONFIG_FORMAT: Final = "<6sHHH"
NET_CONFIG_SIZE: Final = 12
NET_CONFIG_MAC: Final = 0
NET_CONFIG_STATUS: Final = 6
NET_CONFIG_MAX_VQ_PAIRS: Final = 8
NET_CONFIG_MTU: Final = 10

# -- virtio-blk (spec 5.2) -------------------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX: Final = 1
VIRTIO_BLK_F_SEG_MAX: Final = 2
VIRTIO_BLK_F_GEOMETRY: Final = 4
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_BLK_SIZE: Final = 6
VIRTIO_BLK_F_FLUSH: Final = 9

VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2
VIRTIO_BLK_ID_BYTES: Final = 20
BLK_SECTOR_SIZE: Final = 512

#: struct virtio_blk_req header: type u32, reserved u32, sector u64 -- 16 bytes;
#: the request ends with one status byte in a device-writable descriptor.
BLK_REQ_HDR_FORMAT: Final = "<IIQ"
BLK_REQ_HDR_SIZE: Final = 16

#: struct virtio_blk_config, the leading fields ptmig fills: capacity u64 (in 512-byte
#: sectors), size_max u32, seg_max u32, geometry {cylinders u16, heads u8, sectors u8},
#: blk_size u32 -- 24 bytes.
BLK_CONFIG_FORMAT: Final = "<QIIHBBI"
BLK_CONFIG_SIZE: Final = 24
BLK_CONFIG_CAPACITY: Final = 0
BLK_CONFIG_SIZE_MAX: Final = 8
BLK_CONFIG_SEG_MAX: Final = 12
BLK_CONFIG_BLK_SIZE: Final = 20


def net_config(mac: bytes, status: int = VIRTIO_NET_S_LINK_UP, mtu: int = 1500) -> bytearray:
    """A virtio-net config space: MAC, link status, one queue pair, MTU."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}: {mac!r}")
    return bytearray(struct.pack(NET_CONFIG_FORMAT, bytes(mac), status, 1, mtu))


def blk_config(
    capacity_sectors: int, size_max: int = 1 << 20, seg_max: int = 128, blk_size: int = 512
) -> bytearray:
    """A virtio-blk config space: capacity in 512-byte sectors, segment limits, block size."""
    if capacity_sectors < 0:
        raise ValueError(f"capacity must be non-negative, got {capacity_sectors} sectors")
    return bytearray(
        struct.pack(BLK_CONFIG_FORMAT, capacity_sectors, size_max, seg_max, 0, 0, 0, blk_size)
    )
