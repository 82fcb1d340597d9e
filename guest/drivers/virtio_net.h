/*
 * virtio_net.h - poll-mode virtio-net driver: RX queue 0, TX queue 1, 12-byte
 * virtio_net_hdr_v1 in front of every frame, MAC from the config space, no offloads.
 */
#ifndef PTMIG_DRIVERS_VIRTIO_NET_H
#define PTMIG_DRIVERS_VIRTIO_NET_H

#include <stddef.h>
#include <stdint.h>

#include "drivers/virtio.h"

#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_HDR_SIZE 12
#define NET_FRAME_MAX 1514 /* Ethernet header + 1500-byte MTU, no FCS */

struct virtio_net {
    struct virtio_dev dev;
    struct virtq rx, tx;
    uint8_t mac[6];
    uint8_t *rx_bufs; /* rx.size buffers of NET_BUF_SIZE */
    uint8_t *tx_bufs; /* tx.size buffers of NET_BUF_SIZE */
    uint16_t tx_free[VIRTQ_MAX]; /* stack of free TX buffer indices */
    uint16_t tx_free_count;
    uint16_t tx_buf_of_head[VIRTQ_MAX];
    uint16_t rx_buf_of_head[VIRTQ_MAX];
    uint64_t rx_frames, tx_frames, rx_dropped, tx_dropped;
    int tx_hold;          /* queue frames without notifying until virtio_net_flush_tx() */
    uint16_t tx_unkicked; /* frames queued since the last notification */
};

/* Initialise the device at base; 0 or -1 (printed). */
int virtio_net_init(struct virtio_net *n, uint64_t base);

/* Send one Ethernet frame (copied; len <= NET_FRAME_MAX).  0, or -1 if dropped. */
int virtio_net_send(struct virtio_net *n, const void *frame, size_t len);

/* Hand up to budget received frames to rx(ctx, frame, len) and repost their buffers;
 * returns the number of frames handled. */
unsigned virtio_net_poll(struct virtio_net *n, unsigned budget,
                         void (*rx)(void *ctx, const uint8_t *frame, size_t len), void *ctx);

/* hold != 0: virtio_net_send() queues frames without notifying the device (as a NIC driver
 * batches doorbells); virtio_net_flush_tx() then notifies once for all of them. */
void virtio_net_hold_tx(struct virtio_net *n, int hold);
void virtio_net_flush_tx(struct virtio_net *n);

/* Reclaim completed TX buffers. */
void virtio_net_reclaim_tx(struct virtio_net *n);

#endif
