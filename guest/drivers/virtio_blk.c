/*
 * virtio_blk.c - virtio-blk driver (see virtio_blk.h).  A request is a three-descriptor chain:
 * header (readable), data (readable for OUT, writable for IN/GET_ID), status (writable); the
 * header and status live in per-head slots, so requests in flight never share them.  A
 * synchronous request waits by polling the used ring, spinning briefly and then halting with
 * a timeout so that an idle wait costs no CPU.
 */
#include "drivers/virtio_blk.h"

#include "runtime/console.h"
#include "runtime/heap.h"
#include "runtime/hypercall.h"
#include "runtime/io.h"
#include "runtime/string.h"
#include "runtime/time.h"

#define SPIN_US 50          /* poll this long before halting */
#define HALT_US 1000        /* then halt in slices of this */
#define TIMEOUT_MS 30000    /* a request that takes longer means a broken device */
#define QUEUE_SIZE 64

int virtio_blk_init(struct virtio_blk *b, uint64_t base)
{
    memset(b, 0, sizeof(*b));
    if (virtio_init(&b->dev, base, VIRTIO_ID_BLOCK, 1ull << VIRTIO_BLK_F_FLUSH))
        return -1;
    if (virtq_setup(&b->dev, &b->q, 0, QUEUE_SIZE))
        return -1;
    b->hdr = heap_alloc(sizeof(*b->hdr) * b->q.size, 16);
    b->status = heap_alloc(b->q.size, 16);
    if (!b->hdr || !b->status)
        return -1;
    b->capacity = virtio_config64(&b->dev, 0);
    virtio_driver_ok(&b->dev);
    return 0;
}

int virtio_blk_config_changed(struct virtio_blk *b)
{
    if (!virtio_take_config_change(&b->dev))
        return 0;
    b->capacity = virtio_config64(&b->dev, 0);
    return 1;
}

int virtio_blk_open_first(struct virtio_blk *b, const struct boot_info *bi, const char *who)
{
    for (uint32_t i = 0; i < bi->nr_devices; i++)
        if (bi->devices[i].virtio_device_id == VIRTIO_ID_BLOCK)
            return virtio_blk_init(b, bi->devices[i].mmio_gpa);
    printf("%s: needs a virtio-blk device; boot_info lists %u devices\n", who, bi->nr_devices);
    return -1;
}

static int submit(struct virtio_blk *b, uint32_t type, uint64_t sector, void *data,
                  uint32_t len, int data_writable)
{
    unsigned n = len ? 3 : 2;
    if (b->q.num_free < n)
        return -1;
    uint16_t head = b->q.free_head; /* virtq_add takes the chain from the free list's head */
    b->hdr[head].type = type;
    b->hdr[head].reserved = 0;
    b->hdr[head].sector = sector;
    b->status[head] = 0xff;
    struct vbuf bufs[3] = {{&b->hdr[head], sizeof(*b->hdr), 0}};
    n = 1;
    if (len)
        bufs[n++] = (struct vbuf){data, len, data_writable};
    bufs[n++] = (struct vbuf){&b->status[head], 1, 1};
    int got = virtq_add(&b->q, bufs, n);
    if (got < 0)
        return -1;
    virtq_kick(&b->q);
    return got;
}

int virtio_blk_poll(struct virtio_blk *b, int *head, int *status)
{
    if (!virtq_has_used(&b->q))
        return 0;
    int got = virtq_get_used(&b->q, NULL);
    if (got < 0)
        return -1;
    *head = got;
    *status = __atomic_load_n(&b->status[got], __ATOMIC_ACQUIRE);
    if (*status != VIRTIO_BLK_S_OK)
        b->errors++;
    return 1;
}

static int wait_done(struct virtio_blk *b, int head)
{
    uint64_t start = rdtsc(), spin = us_to_tsc(SPIN_US), limit = ms_to_tsc(TIMEOUT_MS);
    for (;;) {
        int got, status;
        int r = virtio_blk_poll(b, &got, &status);
        if (r > 0 && got == head)
            return status;
        if (r != 0) {
            printf("virtio-blk: completion for head %d while waiting for %d\n", got, head);
            return -1;
        }
        uint64_t waited = rdtsc() - start;
        if (waited > limit) {
            printf("virtio-blk: request not completed after %u ms\n", TIMEOUT_MS);
            return -1;
        }
        if (waited < spin) {
            cpu_pause();
        } else {
            hc_halt(HALT_US); /* poll mode: the used ring, not InterruptStatus, says it's done */
        }
    }
}

static int request(struct virtio_blk *b, uint32_t type, uint64_t sector, void *data,
                   uint32_t len, int data_writable)
{
    int head = submit(b, type, sector, data, len, data_writable);
    if (head < 0)
        return -1;
    return wait_done(b, head);
}

static int check_range(struct virtio_blk *b, uint64_t sector, uint32_t nsectors)
{
    if (sector > b->capacity || nsectors > b->capacity - sector) {
        b->errors++;
        return VIRTIO_BLK_S_IOERR;
    }
    return VIRTIO_BLK_S_OK;
}

int virtio_blk_read(struct virtio_blk *b, uint64_t sector, void *buf, uint32_t nsectors)
{
    if (check_range(b, sector, nsectors))
        return VIRTIO_BLK_S_IOERR;
    b->reads++;
    return request(b, VIRTIO_BLK_T_IN, sector, buf, nsectors * VIRTIO_BLK_SECTOR, 1);
}

int virtio_blk_write(struct virtio_blk *b, uint64_t sector, const void *buf, uint32_t nsectors)
{
    if (check_range(b, sector, nsectors))
        return VIRTIO_BLK_S_IOERR;
    b->writes++;
    return request(b, VIRTIO_BLK_T_OUT, sector, (void *)buf, nsectors * VIRTIO_BLK_SECTOR, 0);
}

int virtio_blk_flush(struct virtio_blk *b)
{
    if (!(b->dev.features & (1ull << VIRTIO_BLK_F_FLUSH)))
        return VIRTIO_BLK_S_OK; /* no FLUSH feature: the device writes through */
    b->flushes++;
    return request(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0);
}

int virtio_blk_get_id(struct virtio_blk *b, char id[VIRTIO_BLK_ID_BYTES + 1])
{
    memset(id, 0, VIRTIO_BLK_ID_BYTES + 1);
    return request(b, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES, 1);
}

int virtio_blk_raw(struct virtio_blk *b, uint32_t type, uint64_t sector, void *data,
                   uint32_t len, int data_writable)
{
    return request(b, type, sector, data, len, data_writable);
}

int virtio_blk_submit_write(struct virtio_blk *b, uint64_t sector, const void *buf,
                            uint32_t nsectors)
{
    if (check_range(b, sector, nsectors))
        return -1;
    b->writes++;
    return submit(b, VIRTIO_BLK_T_OUT, sector, (void *)buf, nsectors * VIRTIO_BLK_SECTOR, 0);
}

int virtio_blk_has_flush(const struct virtio_blk *b)
{
    return (b->dev.features & (1ull << VIRTIO_BLK_F_FLUSH)) != 0;
}

int virtio_blk_submit_flush(struct virtio_blk *b)
{
    b->flushes++;
    return submit(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0);
}
