/*
 * kv_log.c - write-ahead log (see kv_log.h).
 *
 * A batch write rewrites the tail sector (whose bytes before `end` are already on disk,
 * unchanged) together with the sectors the staged records reach, in one write request: the
 * tail's bytes are copied just in front of the records (the sector reserved at the start of
 * each batch buffer), so the request is one contiguous buffer.  The log end moves only after
 * the device reported success (of the write, and of the FLUSH for a durable batch).  Replay reads the log through a 64-sector cache
 * and stops at the first record that is not exactly what an append writes.
 */
#include "workloads/kv_log.h"

#include "abi.h"
#include "runtime/console.h"
#include "runtime/crc32.h"
#include "runtime/heap.h"
#include "runtime/hypercall.h"
#include "runtime/io.h"
#include "runtime/string.h"
#include "runtime/time.h"

#define SECTOR VIRTIO_BLK_SECTOR
#define CHUNK_SECTORS 64
#define BATCH_BUF (SECTOR + KV_LOG_BATCH_BYTES + SECTOR)
#define WAIT_SPIN_US 50
#define WAIT_HALT_US 1000

struct superblock {
    uint64_t magic;
    uint32_t version;
    uint32_t sector_size;
    uint64_t log_start; /* byte offset of the first record */
};

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Make [off, off+n) of the log readable from the cache; NULL on I/O error or past the disk. */
static const uint8_t *view(struct kv_log *log, uint64_t off, uint64_t n, int *io_error)
{
    if (off >= log->chunk_start && off + n <= log->chunk_start + log->chunk_len)
        return log->chunk + (off - log->chunk_start);
    uint64_t sector = off / SECTOR, cap = log->blk->capacity;
    if (sector >= cap)
        return NULL;
    uint64_t count = cap - sector < CHUNK_SECTORS ? cap - sector : CHUNK_SECTORS;
    if (virtio_blk_read(log->blk, sector, log->chunk, (uint32_t)count) != VIRTIO_BLK_S_OK) {
        *io_error = 1;
        log->chunk_len = 0;
        return NULL;
    }
    log->chunk_start = sector * SECTOR;
    log->chunk_len = count * SECTOR;
    if (off + n > log->chunk_start + log->chunk_len)
        return NULL; /* runs past the end of the disk */
    return log->chunk + (off - log->chunk_start);
}

static int format(struct kv_log *log)
{
    uint8_t *s = log->batch[0].buf;
    memset(s, 0, 2 * SECTOR);
    struct superblock sb = {KV_LOG_SUPER_MAGIC, KV_LOG_VERSION, SECTOR, KV_LOG_START};
    memcpy(s, &sb, sizeof(sb));
    /* sector 1 zeroed too: replay of the fresh log stops at once, whatever was there */
    if (virtio_blk_write(log->blk, 0, s, 2) != VIRTIO_BLK_S_OK ||
        virtio_blk_flush(log->blk) != VIRTIO_BLK_S_OK) {
        printf("kv: formatting the log failed\n");
        return -1;
    }
    return 0;
}

static void replay(struct kv_log *log, kv_log_apply apply, void *ctx, struct kv_replay *r)
{
    uint64_t off = KV_LOG_START, seq = 0;
    int io_error = 0;
    for (;;) {
        const uint8_t *h = view(log, off, KV_LOG_RECORD_HEADER, &io_error);
        if (!h) {
            r->stop = io_error ? KV_REPLAY_IO_ERROR : KV_REPLAY_DISK_END;
            break;
        }
        uint32_t magic = get32(h), len = get32(h + 4);
        uint16_t klen = get16(h + 16), vlen = get16(h + 18);
        if (magic != KV_LOG_RECORD_MAGIC) {
            static const uint8_t zero[KV_LOG_RECORD_HEADER];
            r->stop = memcmp(h, zero, sizeof(zero)) == 0 ? KV_REPLAY_END : KV_REPLAY_BAD_MAGIC;
            break;
        }
        if (klen > 128 || vlen > 512 || len != KV_LOG_RECORD_HEADER + klen + vlen + 4u) {
            r->stop = KV_REPLAY_BAD_LEN;
            break;
        }
        const uint8_t *rec = view(log, off, len, &io_error);
        if (!rec) {
            r->stop = io_error ? KV_REPLAY_IO_ERROR : KV_REPLAY_DISK_END;
            break;
        }
        if (crc32(0, rec, len - 4) != get32(rec + len - 4)) {
            r->stop = KV_REPLAY_BAD_CRC;
            break;
        }
        if (get64(rec + 8) != seq + 1) {
            r->stop = KV_REPLAY_BAD_SEQ;
            break;
        }
        if (apply(ctx, rec + KV_LOG_RECORD_HEADER, klen, rec + KV_LOG_RECORD_HEADER + klen,
                  vlen)) {
            r->stop = KV_REPLAY_TABLE_FULL;
            break;
        }
        seq++;
        off += len;
        r->records++;
    }
    r->bytes = off - KV_LOG_START;
    r->last_seq = seq;
    log->end = off;
    log->next_seq = seq + 1;
}

int kv_log_open(struct kv_log *log, struct virtio_blk *blk, kv_log_apply apply, void *ctx,
                struct kv_replay *out)
{
    memset(log, 0, sizeof(*log));
    memset(out, 0, sizeof(*out));
    log->blk = blk;
    log->tail = heap_alloc(SECTOR, SECTOR);
    log->batch[0].buf = heap_alloc(BATCH_BUF, 4096);
    log->batch[1].buf = heap_alloc(BATCH_BUF, 4096);
    log->chunk = heap_alloc(CHUNK_SECTORS * SECTOR, 4096);
    if (!log->tail || !log->batch[0].buf || !log->batch[1].buf || !log->chunk)
        return -1;
    if (blk->capacity < 3) {
        printf("kv: disk of %lu sectors is too small for a log (at least 3)\n",
               (unsigned long)blk->capacity);
        return -1;
    }
    if (virtio_blk_read(blk, 0, log->chunk, 1) != VIRTIO_BLK_S_OK) {
        printf("kv: reading the log superblock failed\n");
        return -1;
    }
    struct superblock sb;
    memcpy(&sb, log->chunk, sizeof(sb));
    if (sb.magic != KV_LOG_SUPER_MAGIC) {
        if (format(log))
            return -1;
        out->formatted = 1;
    } else if (sb.version != KV_LOG_VERSION || sb.sector_size != SECTOR ||
               sb.log_start != KV_LOG_START) {
        printf("kv: log superblock version %u sector size %u start %lu is not supported\n",
               sb.version, sb.sector_size, (unsigned long)sb.log_start);
        return -1;
    }
    replay(log, apply, ctx, out);

    /* the tail sector: on-disk bytes up to end, zero after (a torn record is overwritten) */
    uint64_t in_sector = log->end % SECTOR;
    memset(log->tail, 0, SECTOR);
    if (in_sector) {
        if (virtio_blk_read(blk, log->end / SECTOR, log->tail, 1) != VIRTIO_BLK_S_OK) {
            printf("kv: reading the log tail failed\n");
            return -1;
        }
        memset(log->tail + in_sector, 0, SECTOR - in_sector);
    }
    return 0;
}

int kv_log_stage(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                 uint16_t vlen, int durable, uint32_t *rec_off)
{
    struct kv_log_batch *b = &log->batch[log->open];
    uint32_t len = KV_LOG_RECORD_HEADER + klen + vlen + 4u;
    if (klen > 128 || vlen > 512)
        return KV_LOG_NO_ROOM;
    /* the disk must hold everything in flight and staged, plus this record */
    uint64_t ahead = log->busy ? log->batch[!log->open].bytes : 0;
    uint64_t end = log->end + ahead + b->bytes + len;
    if ((end + SECTOR - 1) / SECTOR > log->blk->capacity)
        return b->records || log->busy ? KV_LOG_BATCH_FULL : KV_LOG_NO_ROOM; /* log full */
    if (b->records >= KV_LOG_BATCH_MAX || b->bytes + len > KV_LOG_BATCH_BYTES)
        return KV_LOG_BATCH_FULL;
    uint8_t *rec = b->buf + SECTOR + b->bytes;
    put32(rec, KV_LOG_RECORD_MAGIC);
    put32(rec + 4, len);
    put16(rec + 16, klen);
    put16(rec + 18, vlen);
    memcpy(rec + KV_LOG_RECORD_HEADER, key, klen);
    memcpy(rec + KV_LOG_RECORD_HEADER + klen, value, vlen);
    *rec_off = b->bytes;
    b->records++;
    b->bytes += len;
    b->durable |= durable;
    return KV_LOG_STAGED;
}

const uint8_t *kv_log_record(const struct kv_log *log, int open_batch, uint32_t rec_off)
{
    unsigned which = open_batch ? log->open : !log->open;
    return log->batch[which].buf + SECTOR + rec_off;
}

static void batch_clear(struct kv_log_batch *b)
{
    b->records = 0;
    b->bytes = 0;
    b->durable = 0;
    b->nsectors = 0;
}

int kv_log_submit(struct kv_log *log)
{
    struct kv_log_batch *b = &log->batch[log->open];
    if (log->busy)
        return VIRTIO_BLK_S_IOERR; /* a caller bug: one batch in flight at a time */
    if (b->records == 0)
        return KV_LOG_NOTHING;
    /* seq numbers and CRCs now that the batch's place in the log is known */
    uint8_t *rec = b->buf + SECTOR;
    for (uint32_t i = 0; i < b->records; i++) {
        uint32_t len = get32(rec + 4);
        put64(rec + 8, log->next_seq + i);
        put32(rec + len - 4, crc32(0, rec, len - 4));
        rec += len;
    }
    uint32_t in_sector = (uint32_t)(log->end % SECTOR);
    uint8_t *start = b->buf + SECTOR - in_sector; /* the tail's bytes right before the records */
    memcpy(start, log->tail, in_sector);
    uint32_t used = in_sector + b->bytes;
    b->nsectors = (used + SECTOR - 1) / SECTOR;
    b->sector = log->end / SECTOR;
    memset(start + used, 0, (size_t)b->nsectors * SECTOR - used); /* rest of the last sector */
    int head = virtio_blk_submit_write(log->blk, b->sector, start, b->nsectors);
    log->open = !log->open;
    batch_clear(&log->batch[log->open]);
    if (head < 0) {
        batch_clear(&log->batch[!log->open]);
        return VIRTIO_BLK_S_IOERR;
    }
    log->busy = KV_LOG_WRITING;
    log->head = head;
    return KV_LOG_SUBMITTED;
}

/* The batch in flight succeeded: move the log end past it, keep its last sector as the tail. */
static void batch_done(struct kv_log *log)
{
    struct kv_log_batch *b = &log->batch[!log->open];
    uint32_t in_sector = (uint32_t)(log->end % SECTOR);
    const uint8_t *start = b->buf + SECTOR - in_sector;
    log->end += b->bytes;
    log->next_seq += b->records;
    log->appended_bytes += b->bytes;
    uint32_t new_in_sector = (uint32_t)(log->end % SECTOR);
    memset(log->tail, 0, SECTOR);
    if (new_in_sector) /* the last written sector is the new tail */
        memcpy(log->tail, start + (size_t)(b->nsectors - 1) * SECTOR, new_in_sector);
}

int kv_log_poll(struct kv_log *log, int *status)
{
    int head, st;
    if (!log->busy)
        return 0;
    int r = virtio_blk_poll(log->blk, &head, &st);
    if (r == 0)
        return 0;
    if (r < 0 || head != log->head)
        st = VIRTIO_BLK_S_IOERR; /* a completion we did not ask for: the device is broken */
    if (st == VIRTIO_BLK_S_OK && log->busy == KV_LOG_WRITING &&
        log->batch[!log->open].durable && virtio_blk_has_flush(log->blk)) {
        log->head = virtio_blk_submit_flush(log->blk);
        if (log->head >= 0) {
            log->busy = KV_LOG_FLUSHING;
            return 0;
        }
        st = VIRTIO_BLK_S_IOERR;
    }
    log->busy = 0;
    if (st == VIRTIO_BLK_S_OK)
        batch_done(log);
    *status = st;
    return 1;
}

int kv_log_wait(struct kv_log *log)
{
    uint64_t start = rdtsc(), spin = us_to_tsc(WAIT_SPIN_US);
    int status = VIRTIO_BLK_S_OK;
    while (log->busy) {
        if (kv_log_poll(log, &status))
            break;
        if (rdtsc() - start < spin)
            cpu_pause();
        else
            hc_halt(WAIT_HALT_US); /* the disk's interrupt ends it */
    }
    return status;
}

int kv_log_append(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                  uint16_t vlen, int durable)
{
    uint32_t off;
    if (log->busy || log->batch[log->open].records)
        return VIRTIO_BLK_S_IOERR;
    if (kv_log_stage(log, key, klen, value, vlen, durable, &off) != KV_LOG_STAGED)
        return VIRTIO_BLK_S_IOERR; /* the log is full */
    int r = kv_log_submit(log);
    if (r != KV_LOG_SUBMITTED)
        return VIRTIO_BLK_S_IOERR;
    return kv_log_wait(log);
}
