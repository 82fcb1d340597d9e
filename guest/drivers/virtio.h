/*
 * virtio.h - virtio 1.x over virtio-mmio v2 (spec 4.2.2) with split virtqueues (spec 2.7),
 * driver side, poll mode: the guest never takes interrupts; it polls used rings and halts
 * (HALT hypercall) when idle, which a device interrupt ends.
 *
 * All registers below 0x100 are accessed with 32-bit loads/stores, as the spec requires.
 */
#ifndef PTMIG_DRIVERS_VIRTIO_H
#define PTMIG_DRIVERS_VIRTIO_H

#include <stdint.h>

/* register offsets */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000 /* "virt" */
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_INT_CONFIG 2u /* InterruptStatus: the config space changed */
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976

#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

#define VIRTIO_F_VERSION_1 32

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_USED_F_NO_NOTIFY 1

#define VIRTQ_MAX 256 /* the driver never uses more descriptors than this per queue */

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[]; /* [size], then used_event */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[]; /* [size], then avail_event */
};

struct virtio_dev {
    uint64_t base;     /* GPA of the register window */
    uint32_t device_id;
    uint64_t features; /* negotiated */
};

struct virtq {
    struct virtio_dev *dev;
    uint16_t index;      /* queue number */
    uint16_t size;       /* entries (power of two, <= VIRTQ_MAX) */
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    uint16_t free_head;  /* first free descriptor (free list through .next) */
    uint16_t num_free;
    uint16_t avail_idx;  /* our copy of avail->idx */
    uint16_t last_used;  /* next used entry to consume */
    uint16_t chain_len[VIRTQ_MAX]; /* descriptors in the chain starting at each head */
};

/* One buffer of a chain: device-readable unless writable. */
struct vbuf {
    const void *addr;
    uint32_t len;
    int writable;
};

/* Read a 32-bit register / config bytes. */
uint32_t virtio_read32(const struct virtio_dev *d, uint32_t off);
void virtio_write32(const struct virtio_dev *d, uint32_t off, uint32_t value);
uint8_t virtio_config8(const struct virtio_dev *d, uint32_t off);
uint32_t virtio_config32(const struct virtio_dev *d, uint32_t off);
uint64_t virtio_config64(const struct virtio_dev *d, uint32_t off); /* generation-checked */

/*
 * Reset the device and negotiate features: accept VERSION_1 plus whichever of `wanted` the
 * device offers; set ACKNOWLEDGE, DRIVER, FEATURES_OK and check the device kept FEATURES_OK.
 * Returns 0, or -1 after printing why (and setting FAILED).
 */
int virtio_init(struct virtio_dev *d, uint64_t base, uint32_t device_id, uint64_t wanted);

/* Allocate and register queue `index` with at most max_size entries.  0 or -1 (printed). */
int virtq_setup(struct virtio_dev *d, struct virtq *q, uint16_t index, uint16_t max_size);

/* Set DRIVER_OK. */
void virtio_driver_ok(struct virtio_dev *d);

/* Acknowledge whatever interrupt status is pending (after a wake-up). */
void virtio_ack_interrupt(struct virtio_dev *d);

/* 1 if the device raised a config-change interrupt (which this acknowledges, and only it),
 * else 0: the driver then reads the config space again. */
int virtio_take_config_change(struct virtio_dev *d);

/* Is the device asking to be reset (DEVICE_NEEDS_RESET)? */
int virtio_needs_reset(const struct virtio_dev *d);

/* Add a chain (readable buffers first, then writable ones), publish it; returns the head or
 * -1 when the queue lacks free descriptors.  Does not notify: call virtq_kick(). */
int virtq_add(struct virtq *q, const struct vbuf *bufs, unsigned n);

/* Notify the device unless it asked not to be (used->flags NO_NOTIFY). */
void virtq_kick(struct virtq *q);

/* Take one used element: returns its head (and *len) or -1 if none; frees the chain. */
int virtq_get_used(struct virtq *q, uint32_t *len);

/* Are there used elements not yet taken? */
int virtq_has_used(const struct virtq *q);

#endif
