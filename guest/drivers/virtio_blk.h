/*
 * virtio_blk.h - poll-mode virtio-blk driver: one queue, IN/OUT/FLUSH/GET_ID requests,
 * capacity from the config space.  Requests are either synchronous (submit and wait) or
 * asynchronous (submit now, collect the completion later with virtio_blk_poll); each request
 * has its own header and status byte, so several can be in flight and complete in any order.
 */
#ifndef PTMIG_DRIVERS_VIRTIO_BLK_H
#define PTMIG_DRIVERS_VIRTIO_BLK_H

#include <stdint.h>

#include "abi.h"
#include "drivers/virtio.h"

#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_SECTOR 512
#define VIRTIO_BLK_ID_BYTES 20

/* request types */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

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
    } *hdr;            /* request headers, one per descriptor head, device-readable */
    uint8_t *status;   /* status bytes, one per descriptor head, device-writable */
    uint64_t reads, writes, flushes, errors;
};

int virtio_blk_init(struct virtio_blk *b, uint64_t base);

/* 1 if the device said its config space changed (a resized disk): the capacity is read
 * again; else 0.  One MMIO read when nothing changed, so call it now and then, not per
 * request. */
int virtio_blk_config_changed(struct virtio_blk *b);

/* Initialise the first virtio-blk device boot_info lists (the heap must be set up); -1 if
 * there is none (said on the console, after `who`) or it fails. */
int virtio_blk_open_first(struct virtio_blk *b, const struct boot_info *bi, const char *who);

/* Each returns VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, or -1. */
int virtio_blk_read(struct virtio_blk *b, uint64_t sector, void *buf, uint32_t nsectors);
int virtio_blk_write(struct virtio_blk *b, uint64_t sector, const void *buf, uint32_t nsectors);
int virtio_blk_flush(struct virtio_blk *b);
int virtio_blk_get_id(struct virtio_blk *b, char id[VIRTIO_BLK_ID_BYTES + 1]);

/* Any request type, without the driver's own range check (to see the device's answer to a
 * request it must refuse): header, then `len` data bytes (device-writable if data_writable),
 * then the status byte.  Returns the status the device wrote, or -1. */
int virtio_blk_raw(struct virtio_blk *b, uint32_t type, uint64_t sector, void *data,
                   uint32_t len, int data_writable);

/* Asynchronous requests: return the request's head (its id until it completes), or -1 if the
 * range is bad or the queue has no room.  The data must stay untouched until completion. */
int virtio_blk_submit_write(struct virtio_blk *b, uint64_t sector, const void *buf,
                            uint32_t nsectors);
int virtio_blk_submit_flush(struct virtio_blk *b); /* device without FLUSH: see has_flush */
int virtio_blk_has_flush(const struct virtio_blk *b);

/* Take one completed request: 1 with *head and *status set, 0 if none has completed, -1 if
 * the device returned a head that was not in flight (a broken device). */
int virtio_blk_poll(struct virtio_blk *b, int *head, int *status);

#endif
