/*
 * blkverify.c - `blkverify blocks=N bufs=B`: vCPU 0 reads its disk continuously and checks
 * every block it reads against what it wrote, and checks the device's error completions.
 *
 * Setup writes blocks 4 KiB blocks from sector 0, each with a pattern of (block, generation).
 * Then each round, forever:
 *   1. rewrites a few blocks with the next generation (the expected generations live in RAM);
 *   2. reads bufs blocks into bufs separate buffers, and only then checks all of them (so a
 *      buffer a device wrote long ago is checked long after: a device write lost by a
 *      migration shows up as a stale buffer);
 *   3. between every 16 of those reads, checks three error completions, whose status byte
 *      sits after the data buffer:
 *      an IN past the end of the disk (status IOERR, the data buffer untouched), a request of
 *      an unsupported type (status UNSUPP, buffer untouched), and a GET_ID into a 512-byte
 *      buffer (status OK, the id as read at setup and its NUL, the rest of the 20 id bytes
 *      NUL or untouched, the other 492 bytes untouched).
 * Counters in vCPU 0's stats slot (read by x-query-guest-stats): iterations = rounds, and
 *   w[0] blocks checked, w[1] blocks that did not match, w[2] error completions checked,
 *   w[3] error completions that were wrong, w[4] blocks rewritten, w[5] requests that failed
 *   (a read or write whose status was not OK, or that never completed), w[6] the disk's
 *   capacity in sectors as the guest last read it, w[7] config changes the device announced.
 * Each round begins by asking the device whether its config changed (a resized disk): the new
 * capacity is read then, said on the console, and the next "read past the end" probe aims at
 * the new end, so a guest that missed a resize reports WRONG completions.
 * The first few mismatches are printed ("blkverify: MISMATCH ...").
 */
#include <stdint.h>

#include "drivers/virtio.h"
#include "drivers/virtio_blk.h"
#include "runtime/console.h"
#include "runtime/heap.h"
#include "runtime/io.h"
#include "runtime/string.h"
#include "workloads/workload.h"

#define BLOCK 4096u
#define SECTORS_PER_BLOCK (BLOCK / VIRTIO_BLK_SECTOR)
#define UNSUPPORTED_TYPE 99u /* not a virtio-blk request type at all */
#define GET_ID_BUF 512u
#define FILL 0x5a
#define REWRITES 4
#define MAX_PRINTS 16
#define ERROR_EVERY 16 /* error completions checked between every 16 reads */

enum { C_CHECKED, C_MISMATCH, C_ERR_CHECKED, C_ERR_WRONG, C_REWRITTEN, C_FAILED, C_CAPACITY,
       C_CONFIG_CHANGES };

static const char *const blkverify_keys[] = {"blocks", "bufs", NULL};

static struct {
    struct virtio_blk blk;
    uint64_t blocks, bufs;
    uint32_t *gen;      /* [blocks]: the generation last written to each block */
    uint32_t *slot;     /* [bufs]: which block each read buffer holds */
    uint8_t *buf;       /* [bufs][BLOCK] */
    uint8_t *scratch;   /* one block: writes, error probes */
    char id[VIRTIO_BLK_ID_BYTES + 1];
    uint64_t rng;
    unsigned prints;
} bv;

static uint64_t pattern(uint64_t block, uint32_t gen, uint64_t word)
{
    return ((block << 32) | gen) * 0x9e3779b97f4a7c15ull + word;
}

static void fill_block(uint8_t *p, uint64_t block, uint32_t gen)
{
    uint64_t *w = (uint64_t *)p;
    for (uint64_t i = 0; i < BLOCK / 8; i++)
        w[i] = pattern(block, gen, i);
}

static uint64_t next_random(void)
{
    bv.rng ^= bv.rng << 13;
    bv.rng ^= bv.rng >> 7;
    bv.rng ^= bv.rng << 17;
    return bv.rng;
}

static void count(unsigned which)
{
    stats_slot(0)->w[which]++;
}

static int write_block(uint64_t block)
{
    fill_block(bv.scratch, block, bv.gen[block]);
    if (virtio_blk_write(&bv.blk, block * SECTORS_PER_BLOCK, bv.scratch, SECTORS_PER_BLOCK) !=
        VIRTIO_BLK_S_OK) {
        count(C_FAILED);
        return -1;
    }
    return 0;
}

static int blkverify_setup(const struct boot_info *bi, const struct cmdline *c)
{
    if (cmdline_get_u64(c, "blocks", 1024, &bv.blocks) ||
        cmdline_get_u64(c, "bufs", 128, &bv.bufs)) {
        printf("blkverify: blocks/bufs must be numbers; usage: %s\n", workload_blkverify.usage);
        return EXIT_BAD_ARGS;
    }
    if (bv.blocks == 0 || bv.blocks > (1u << 20) || bv.bufs == 0 || bv.bufs > 4096) {
        printf("blkverify: blocks=%lu must be 1..1048576 and bufs=%lu 1..4096\n",
               (unsigned long)bv.blocks, (unsigned long)bv.bufs);
        return EXIT_BAD_ARGS;
    }
    heap_init(bi->heap_start, bi->mem_size);
    if (virtio_blk_open_first(&bv.blk, bi, "blkverify"))
        return EXIT_FAILED;
    if (bv.blocks * SECTORS_PER_BLOCK > bv.blk.capacity) {
        printf("blkverify: blocks=%lu is larger than the disk (%lu sectors)\n",
               (unsigned long)bv.blocks, (unsigned long)bv.blk.capacity);
        return EXIT_BAD_ARGS;
    }
    bv.gen = heap_alloc(bv.blocks * sizeof(*bv.gen), 8);
    bv.slot = heap_alloc(bv.bufs * sizeof(*bv.slot), 8);
    bv.buf = heap_alloc(bv.bufs * BLOCK, BLOCK);
    bv.scratch = heap_alloc(BLOCK, BLOCK);
    if (!bv.gen || !bv.slot || !bv.buf || !bv.scratch) {
        printf("blkverify: out of memory for blocks=%lu bufs=%lu\n", (unsigned long)bv.blocks,
               (unsigned long)bv.bufs);
        return EXIT_FAILED;
    }
    if (virtio_blk_get_id(&bv.blk, bv.id) != VIRTIO_BLK_S_OK) {
        printf("blkverify: GET_ID failed\n");
        return EXIT_FAILED;
    }
    bv.rng = 0x2545f4914f6cdd1dull;
    for (uint64_t b = 0; b < bv.blocks; b++) {
        bv.gen[b] = 1;
        if (write_block(b)) {
            printf("blkverify: writing block %lu failed\n", (unsigned long)b);
            return EXIT_FAILED;
        }
    }
    stats_slot(0)->w[C_CAPACITY] = bv.blk.capacity;
    printf("blkverify: %lu blocks written, %lu read buffers, id '%s'\n",
           (unsigned long)bv.blocks, (unsigned long)bv.bufs, bv.id);
    return EXIT_OK;
}

static void check_block(uint64_t j)
{
    uint64_t block = bv.slot[j];
    const uint64_t *w = (const uint64_t *)(bv.buf + j * BLOCK);
    count(C_CHECKED);
    for (uint64_t i = 0; i < BLOCK / 8; i++) {
        if (w[i] == pattern(block, bv.gen[block], i))
            continue;
        count(C_MISMATCH);
        if (bv.prints++ < MAX_PRINTS)
            printf("blkverify: MISMATCH block %lu gen %u word %lu: %lx\n", (unsigned long)block,
                   bv.gen[block], (unsigned long)i, (unsigned long)w[i]);
        return;
    }
}

static int untouched(const uint8_t *p, uint32_t from, uint32_t to)
{
    for (uint32_t i = from; i < to; i++)
        if (p[i] != FILL)
            return 0;
    return 1;
}

static void check_error(const char *what, int status, int want, int buffer_ok)
{
    count(C_ERR_CHECKED);
    if (status == want && buffer_ok)
        return;
    count(C_ERR_WRONG);
    if (bv.prints++ < MAX_PRINTS)
        printf("blkverify: WRONG %s: status %d (want %d), buffer %s\n", what, status, want,
               buffer_ok ? "as expected" : "changed");
}

static void check_errors(void)
{
    uint8_t *p = bv.scratch;
    memset(p, FILL, BLOCK);
    int st = virtio_blk_raw(&bv.blk, VIRTIO_BLK_T_IN, bv.blk.capacity, p, BLOCK, 1);
    check_error("read past the end", st, VIRTIO_BLK_S_IOERR, untouched(p, 0, BLOCK));
    memset(p, FILL, BLOCK);
    st = virtio_blk_raw(&bv.blk, UNSUPPORTED_TYPE, 0, p, VIRTIO_BLK_SECTOR, 1);
    check_error("unsupported type", st, VIRTIO_BLK_S_UNSUPP,
                untouched(p, 0, VIRTIO_BLK_SECTOR));
    memset(p, FILL, BLOCK);
    st = virtio_blk_raw(&bv.blk, VIRTIO_BLK_T_GET_ID, 0, p, GET_ID_BUF, 1);
    uint32_t len = (uint32_t)strlen(bv.id);
    int id_ok = memcmp(p, bv.id, len) == 0 && untouched(p, VIRTIO_BLK_ID_BYTES, GET_ID_BUF);
    if (len < VIRTIO_BLK_ID_BYTES)
        id_ok &= p[len] == 0; /* the terminator */
    /* The spec NUL-pads the rest of the 20 bytes; qemu-storage-daemon 7.2 writes only up to
     * the terminator and leaves the rest as the driver filled it. Either is the device's. */
    for (uint32_t i = len + 1; i < VIRTIO_BLK_ID_BYTES; i++)
        id_ok &= p[i] == 0 || p[i] == FILL;
    check_error("GET_ID into 512 bytes", st, VIRTIO_BLK_S_OK, id_ok);
}

static void check_config(void)
{
    if (!virtio_blk_config_changed(&bv.blk))
        return;
    count(C_CONFIG_CHANGES);
    stats_slot(0)->w[C_CAPACITY] = bv.blk.capacity;
    printf("blkverify: config changed, capacity now %lu sectors\n",
           (unsigned long)bv.blk.capacity);
}

static void round_once(void)
{
    check_config();
    for (int k = 0; k < REWRITES; k++) {
        uint64_t b = next_random() % bv.blocks;
        bv.gen[b]++;
        if (write_block(b) == 0)
            count(C_REWRITTEN);
    }
    for (uint64_t j = 0; j < bv.bufs; j++) {
        if (j % ERROR_EVERY == 0)
            check_errors();
        uint64_t b = next_random() % bv.blocks;
        bv.slot[j] = (uint32_t)b;
        if (virtio_blk_read(&bv.blk, b * SECTORS_PER_BLOCK, bv.buf + j * BLOCK,
                            SECTORS_PER_BLOCK) != VIRTIO_BLK_S_OK) {
            count(C_FAILED);
            bv.slot[j] = UINT32_MAX;
        }
    }
    for (uint64_t j = 0; j < bv.bufs; j++)
        if (bv.slot[j] != UINT32_MAX)
            check_block(j);
}

static int blkverify_run(unsigned cpu, const struct boot_info *bi)
{
    (void)bi;
    if (cpu != 0)
        return EXIT_OK;
    volatile struct vcpu_stats *s = stats_slot(0);
    for (;;) {
        round_once();
        s->iterations++;
    }
}

const struct workload workload_blkverify = {
    .name = "blkverify",
    .usage = "blkverify blocks=N bufs=N",
    .keys = blkverify_keys,
    .setup = blkverify_setup,
    .run = blkverify_run,
};
