/*
 * virtio_net.c - virtio-net driver (see virtio_net.h).
 */
#include "drivers/virtio_net.h"

#include "runtime/console.h"
#include "runtime/heap.h"
#include "runtime/string.h"

#define NET_BUF_SIZE 2048
#define NET_QUEUE_MAX 256

static void post_rx(struct virtio_net *n, uint16_t buf)
{
    struct vbuf b = {n->rx_bufs + (size_t)buf * NET_BUF_SIZE, NET_BUF_SIZE, 1};
    int head = virtq_add(&n->rx, &b, 1); /* cannot fail: one descriptor per buffer */
    if (head >= 0)
        n->rx_buf_of_head[head] = buf;
}

int virtio_net_init(struct virtio_net *n, uint64_t base)
{
    memset(n, 0, sizeof(*n));
    if (virtio_init(&n->dev, base, VIRTIO_ID_NET, 1ull << VIRTIO_NET_F_MAC))
        return -1;
    if (virtq_setup(&n->dev, &n->rx, 0, NET_QUEUE_MAX) ||
        virtq_setup(&n->dev, &n->tx, 1, NET_QUEUE_MAX))
        return -1;
    if (n->dev.features & (1ull << VIRTIO_NET_F_MAC)) {
        for (unsigned i = 0; i < 6; i++)
            n->mac[i] = virtio_config8(&n->dev, i);
    } else { /* locally administered address from the MMIO base */
        uint8_t mac[6] = {0x52, 0x54, 0x00, 0x00, (uint8_t)(base >> 20), (uint8_t)(base >> 12)};
        memcpy(n->mac, mac, 6);
    }
    n->rx_bufs = heap_alloc((size_t)n->rx.size * NET_BUF_SIZE, 4096);
    n->tx_bufs = heap_alloc((size_t)n->tx.size * NET_BUF_SIZE, 4096);
    if (!n->rx_bufs || !n->tx_bufs)
        return -1;
    for (uint16_t i = 0; i < n->tx.size; i++)
        n->tx_free[n->tx_free_count++] = i;
    virtio_driver_ok(&n->dev);
    for (uint16_t i = 0; i < n->rx.size; i++)
        post_rx(n, i);
    virtq_kick(&n->rx);
    return 0;
}

void virtio_net_reclaim_tx(struct virtio_net *n)
{
    int head;
    while ((head = virtq_get_used(&n->tx, NULL)) >= 0)
        n->tx_free[n->tx_free_count++] = n->tx_buf_of_head[head];
}

int virtio_net_send(struct virtio_net *n, const void *frame, size_t len)
{
    if (len > NET_FRAME_MAX) {
        n->tx_dropped++;
        return -1;
    }
    if (n->tx_free_count == 0) {
        virtio_net_flush_tx(n); /* the device may still have frames it was not told about */
        virtio_net_reclaim_tx(n);
    }
    if (n->tx_free_count == 0) {
        n->tx_dropped++;
        return -1;
    }
    uint16_t buf = n->tx_free[--n->tx_free_count];
    uint8_t *p = n->tx_bufs + (size_t)buf * NET_BUF_SIZE;
    memset(p, 0, VIRTIO_NET_HDR_SIZE); /* no offloads: an all-zero virtio_net_hdr_v1 */
    memcpy(p + VIRTIO_NET_HDR_SIZE, frame, len);
    struct vbuf b = {p, (uint32_t)(VIRTIO_NET_HDR_SIZE + len), 0};
    int head = virtq_add(&n->tx, &b, 1);
    if (head < 0) {
        n->tx_free[n->tx_free_count++] = buf;
        n->tx_dropped++;
        return -1;
    }
    n->tx_buf_of_head[head] = buf;
    n->tx_frames++;
    n->tx_unkicked++;
    if (!n->tx_hold)
        virtio_net_flush_tx(n);
    return 0;
}

void virtio_net_hold_tx(struct virtio_net *n, int hold)
{
    n->tx_hold = hold;
    if (!hold)
        virtio_net_flush_tx(n);
}

void virtio_net_flush_tx(struct virtio_net *n)
{
    if (n->tx_unkicked) {
        n->tx_unkicked = 0;
        virtq_kick(&n->tx);
    }
}

unsigned virtio_net_poll(struct virtio_net *n, unsigned budget,
                         void (*rx)(void *ctx, const uint8_t *frame, size_t len), void *ctx)
{
    unsigned done = 0;
    uint32_t len;
    int head;
    while (done < budget && (head = virtq_get_used(&n->rx, &len)) >= 0) {
        uint16_t buf = n->rx_buf_of_head[head];
        const uint8_t *p = n->rx_bufs + (size_t)buf * NET_BUF_SIZE;
        if (len > VIRTIO_NET_HDR_SIZE && len <= NET_BUF_SIZE) {
            n->rx_frames++;
            rx(ctx, p + VIRTIO_NET_HDR_SIZE, len - VIRTIO_NET_HDR_SIZE);
        } else {
            n->rx_dropped++;
        }
        post_rx(n, buf);
        done++;
    }
    if (done)
        virtq_kick(&n->rx);
    virtio_net_reclaim_tx(n);
    return done;
}
