/*
 * blkbench.c - `blkbench size=SIZE req=SIZE`: vCPU 0 writes size bytes (default 64M) to the
 * first virtio-blk disk sequentially from sector 0, in requests of req bytes (default 64K, a
 * multiple of 512), one request at a time, then FLUSHes; prints
 * "blkbench: <bytes> bytes in <ticks> ticks, <requests> requests, tsc_khz <khz>" and exits 0
 * (1 if a request failed).  The data is a counter pattern, so a read-back can check it.
 */
#include <stdint.h>

#include "drivers/virtio.h"
#include "drivers/virtio_blk.h"
#include "runtime/console.h"
#include "runtime/heap.h"
#include "runtime/io.h"
#include "runtime/time.h"
#include "workloads/workload.h"

static const char *const blkbench_keys[] = {"size", "req", NULL};

static struct {
    struct virtio_blk blk;
    uint64_t size, req;
    uint8_t *buf;
} bb;

static int blkbench_setup(const struct boot_info *bi, const struct cmdline *c)
{
    if (cmdline_get_u64(c, "size", 64ull << 20, &bb.size) ||
        cmdline_get_u64(c, "req", 64ull << 10, &bb.req)) {
        printf("blkbench: size/req must be numbers; usage: %s\n", workload_blkbench.usage);
        return EXIT_BAD_ARGS;
    }
    if (bb.req == 0 || bb.req % VIRTIO_BLK_SECTOR || bb.req > (1u << 20) || bb.size < bb.req ||
        bb.size % bb.req) {
        printf("blkbench: req=%lu must be a multiple of 512 up to 1M and size=%lu a multiple "
               "of req\n", (unsigned long)bb.req, (unsigned long)bb.size);
        return EXIT_BAD_ARGS;
    }
    heap_init_boot(bi);
    if (virtio_blk_open_first(&bb.blk, bi, "blkbench"))
        return EXIT_FAILED;
    if (bb.size / VIRTIO_BLK_SECTOR > bb.blk.capacity) {
        printf("blkbench: size=%lu is larger than the disk (%lu sectors)\n",
               (unsigned long)bb.size, (unsigned long)bb.blk.capacity);
        return EXIT_BAD_ARGS;
    }
    bb.buf = heap_alloc(bb.req, 4096);
    if (!bb.buf)
        return EXIT_FAILED;
    return EXIT_OK;
}

static int blkbench_run(unsigned cpu, const struct boot_info *bi)
{
    (void)bi;
    if (cpu != 0)
        return EXIT_OK;
    uint32_t sectors = (uint32_t)(bb.req / VIRTIO_BLK_SECTOR);
    uint64_t requests = bb.size / bb.req, start = rdtsc();
    for (uint64_t r = 0; r < requests; r++) {
        uint64_t *words = (uint64_t *)bb.buf;
        for (uint64_t w = 0; w < bb.req / 8; w++)
            words[w] = r * (bb.req / 8) + w;
        if (virtio_blk_write(&bb.blk, r * sectors, bb.buf, sectors) != VIRTIO_BLK_S_OK) {
            printf("blkbench: write of request %lu failed\n", (unsigned long)r);
            return EXIT_FAILED;
        }
    }
    if (virtio_blk_flush(&bb.blk) != VIRTIO_BLK_S_OK) {
        printf("blkbench: flush failed\n");
        return EXIT_FAILED;
    }
    uint64_t ticks = rdtsc() - start;
    stats_slot(0)->iterations = requests;
    printf("blkbench: %lu bytes in %lu ticks, %lu requests, tsc_khz %lu\n",
           (unsigned long)bb.size, (unsigned long)ticks, (unsigned long)requests,
           (unsigned long)time_tsc_khz());
    return EXIT_OK;
}

const struct workload workload_blkbench = {
    .name = "blkbench",
    .usage = "blkbench size=SIZE req=SIZE",
    .keys = blkbench_keys,
    .setup = blkbench_setup,
    .run = blkbench_run,
};
