/*
 * virtio_blk.h - poll-mode virtio-blk driver: one queue, synchronous IN/OUT/FLUSH/GET_ID
 * requests (one at a time), capacity from the config space.
 */
#ifndef PTMIG_DRIVERS_VIRTIO_BLK_H
#define PTMIG_DRIVERS_VIRTIO_BLK_H

#include <stdint.h>

#include "drivers/virtio.h"

#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_SECTOR 512
#define VIRTIO_BLK_ID_BYTES 20

/* request status (and -1 for "the device never answered or broke") */
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

struct virtio_blk {
    struct virtio_dev dev;
    struct virtq q;
    uint64_t capacity; /* in 512-byte sectors */
    struct {
        uint32_t type;
        uint32_t reserved;
        uint64_t sector;
    } *hdr;            /* request header, device-readable */
    uint8_t *status;   /* status byte, device-writable */
    uint64_t reads, writes, flushes, errors;
};

int virtio_blk_init(struct virtio_blk *b, uint64_t base);

/* Each returns VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, or -1. */
int virtio_blk_read(struct virtio_blk *b, uint64_t sector, void *buf, uint32_t nsectors);
int virtio_blk_write(struct virtio_blk *b, uint64_t sector, const void *buf, uint32_t nsectors);
int virtio_blk_flush(struct virtio_blk *b);
int virtio_blk_get_id(struct virtio_blk *b, char id[VIRTIO_BLK_ID_BYTES + 1]);

#endif
