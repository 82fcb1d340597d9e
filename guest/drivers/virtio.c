/*
 * virtio.c - virtio-mmio v2 transport and split virtqueues, driver side (see virtio.h).
 *
 * Ordering: x86 keeps stores in order and the MMIO helpers are compiler barriers, so "write
 * descriptors, then ring entry, then avail->idx, then notify" only needs compiler barriers
 * (plus __atomic release/acquire on the indices, which are shared with the device process).
 */
#include "drivers/virtio.h"

#include "runtime/console.h"
#include "runtime/heap.h"
#include "runtime/io.h"
#include "runtime/string.h"

uint32_t virtio_read32(const struct virtio_dev *d, uint32_t off)
{
    return mmio_read32(d->base + off);
}

void virtio_write32(const struct virtio_dev *d, uint32_t off, uint32_t value)
{
    mmio_write32(d->base + off, value);
}

uint8_t virtio_config8(const struct virtio_dev *d, uint32_t off)
{
    return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint32_t virtio_config32(const struct virtio_dev *d, uint32_t off)
{
    return mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint64_t virtio_config64(const struct virtio_dev *d, uint32_t off)
{
    uint32_t gen, lo, hi;
    do { /* spec 4.2.2.2: re-read if the config changed between the two halves */
        gen = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
        lo = virtio_config32(d, off);
        hi = virtio_config32(d, off + 4);
    } while (gen != virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION));
    return ((uint64_t)hi << 32) | lo;
}

static void set_status(struct virtio_dev *d, uint32_t bits)
{
    virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_read32(d, VIRTIO_MMIO_STATUS) | bits);
}

static int fail(struct virtio_dev *d, const char *why, uint64_t value)
{
    printf("virtio@0x%lx: %s (0x%lx)\n", (unsigned long)d->base, why, (unsigned long)value);
    set_status(d, VIRTIO_STATUS_FAILED);
    return -1;
}

int virtio_init(struct virtio_dev *d, uint64_t base, uint32_t device_id, uint64_t wanted)
{
    d->base = base;
    d->device_id = device_id;
    d->features = 0;
    uint32_t magic = virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE);
    if (magic != VIRTIO_MMIO_MAGIC)
        return fail(d, "bad magic value, expected 0x74726976", magic);
    uint32_t version = virtio_read32(d, VIRTIO_MMIO_VERSION);
    if (version != 2)
        return fail(d, "virtio-mmio version is not 2", version);
    uint32_t id = virtio_read32(d, VIRTIO_MMIO_DEVICE_ID);
    if (id != device_id)
        return fail(d, "unexpected device id", id);

    virtio_write32(d, VIRTIO_MMIO_STATUS, 0); /* reset */
    set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(d, VIRTIO_STATUS_DRIVER);

    uint64_t offered = 0;
    for (uint32_t sel = 0; sel < 2; sel++) {
        virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        offered |= (uint64_t)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel);
    }
    if (!(offered & (1ull << VIRTIO_F_VERSION_1)))
        return fail(d, "device does not offer VIRTIO_F_VERSION_1; features", offered);
    uint64_t accept = offered & (wanted | (1ull << VIRTIO_F_VERSION_1));
    for (uint32_t sel = 0; sel < 2; sel++) {
        virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accept >> (32 * sel)));
    }
    set_status(d, VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_read32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK))
        return fail(d, "device refused FEATURES_OK for features", accept);
    d->features = accept;
    return 0;
}

int virtq_setup(struct virtio_dev *d, struct virtq *q, uint16_t index, uint16_t max_size)
{
    memset(q, 0, sizeof(*q));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
    if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY))
        return fail(d, "queue already ready before setup; queue", index);
    uint32_t num_max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (num_max == 0)
        return fail(d, "queue does not exist; queue", index);
    uint16_t size = 1;
    while ((uint32_t)size * 2 <= num_max && size * 2 <= max_size && size * 2 <= VIRTQ_MAX)
        size *= 2;

    q->dev = d;
    q->index = index;
    q->size = size;
    q->desc = heap_alloc(16u * size, 4096);
    q->avail = heap_alloc(6u + 2u * size, 4096);
    q->used = heap_alloc(6u + 8u * size, 4096);
    if (!q->desc || !q->avail || !q->used)
        return fail(d, "no memory for queue", index);
    for (uint16_t i = 0; i < size; i++)
        q->desc[i].next = (uint16_t)(i + 1);
    q->free_head = 0;
    q->num_free = size;

    virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
    uint64_t desc = (uintptr_t)q->desc, avail = (uintptr_t)q->avail, used = (uintptr_t)q->used;
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    virtio_write32(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
    if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) != 1)
        return fail(d, "device did not accept the queue", index);
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    set_status(d, VIRTIO_STATUS_DRIVER_OK);
}

void virtio_ack_interrupt(struct virtio_dev *d)
{
    uint32_t pending = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (pending)
        virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, pending);
}

int virtio_take_config_change(struct virtio_dev *d)
{
    if (!(virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG))
        return 0;
    virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    return 1;
}

int virtio_needs_reset(const struct virtio_dev *d)
{
    return (virtio_read32(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_NEEDS_RESET) != 0;
}

int virtq_add(struct virtq *q, const struct vbuf *bufs, unsigned n)
{
    if (n == 0 || n > q->num_free)
        return -1;
    uint16_t head = q->free_head, i = head, last = head;
    for (unsigned k = 0; k < n; k++) {
        struct virtq_desc *d = &q->desc[i];
        d->addr = (uint64_t)(uintptr_t)bufs[k].addr;
        d->len = bufs[k].len;
        d->flags = (uint16_t)((bufs[k].writable ? VIRTQ_DESC_F_WRITE : 0) |
                              (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        last = i;
        i = d->next;
    }
    q->free_head = q->desc[last].next; /* the chain keeps its .next links for freeing */
    q->num_free = (uint16_t)(q->num_free - n);
    q->chain_len[head] = (uint16_t)n;

    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
    __atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
    return head;
}

void virtq_kick(struct virtq *q)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* avail->idx visible before reading used->flags */
    if (!(__atomic_load_n(&q->used->flags, __ATOMIC_ACQUIRE) & VIRTQ_USED_F_NO_NOTIFY))
        virtio_write32(q->dev, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_has_used(const struct virtq *q)
{
    return __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) != q->last_used;
}

int virtq_get_used(struct virtq *q, uint32_t *len)
{
    if (!virtq_has_used(q))
        return -1;
    struct virtq_used_elem e = q->used->ring[q->last_used & (q->size - 1)];
    q->last_used++;
    if (e.id >= q->size || q->chain_len[e.id] == 0) {
        printf("virtio@0x%lx: queue %u: device returned bad head %u\n",
               (unsigned long)q->dev->base, q->index, e.id);
        return -1;
    }
    /* free the chain: walk to its tail, splice it onto the free list */
    uint16_t n = q->chain_len[e.id], tail = (uint16_t)e.id;
    for (uint16_t k = 1; k < n; k++)
        tail = q->desc[tail].next;
    q->desc[tail].next = q->free_head;
    q->free_head = (uint16_t)e.id;
    q->num_free = (uint16_t)(q->num_free + n);
    q->chain_len[e.id] = 0;
    if (len)
        *len = e.len;
    return (int)e.id;
}
