/*
 * kv_log.c - write-ahead log (see kv_log.h).
 *
 * A batch write rewrites the tail sector (whose bytes before `end` are already on disk,
 * unchanged) together with the sectors the staged records reach, in one write request: the
 * tail's bytes are copied just in front of the records (the sector reserved at the start of
 * each batch buffer), so the request is one contiguous buffer.  The log end moves only after
 * the device reported success (of the write, and of the FLUSH for a durable batch).  Each write
 * also zeroes the sector after its records (when the area has one), so whatever an earlier
 * pass over the area left there never looks like a continuation.  Replay reads the active area
 * through a 64-sector cache and stops at the first record that is not exactly what an append
 * writes.  Checkpoints (kv_log.h) reuse the batch path: records staged from the table, written
 * and flushed batch by batch into the other area, then the superblock is rewritten.
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
#define BATCH_BUF (SECTOR + KV_LOG_BATCH_BYTES + 2 * SECTOR)
#define WAIT_SPIN_US 50
#define WAIT_HALT_US 1000
/* A disk request not done after this much waiting is given up (kv_log_poll).  The wait is
 * counted poll by poll, each adding at most WAIT_POLL_MAX_US (the kv loop polls at least every
 * 10 ms), so that time the guest did not run (a migration's pause, a post-copy fault, a
 * paused VM) is not counted as the disk's. */
#define WAIT_GIVE_UP_US (20u * 1000 * 1000)
#define WAIT_POLL_MAX_US (20u * 1000)

struct superblock {
    uint64_t magic;
    uint32_t version;
    uint32_t sector_size;
    uint64_t log_start;  /* byte offset of area 0; area 1 follows it */
    uint64_t area_bytes; /* size of each area, a multiple of the sector size */
    uint64_t active;     /* the area to replay: 0 or 1 */
    uint64_t first_seq;  /* seq of its first record */
};

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Make [off, off+n) of the log readable from the cache; NULL on I/O error or past the area. */
static const uint8_t *view(struct kv_log *log, uint64_t off, uint64_t n, int *io_error)
{
    if (off >= log->chunk_start && off + n <= log->chunk_start + log->chunk_len)
        return log->chunk + (off - log->chunk_start);
    uint64_t sector = off / SECTOR, cap = log->area_end / SECTOR;
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
        return NULL; /* runs past the end of the area */
    return log->chunk + (off - log->chunk_start);
}

static void set_area(struct kv_log *log, uint64_t area)
{
    log->active = area;
    log->area_start = KV_LOG_START + area * log->area_bytes;
    log->area_end = log->area_start + log->area_bytes;
    log->chunk_len = 0; /* the replay cache held the other area */
}

/* Write the superblock naming the active area and its first seq, then FLUSH. */
static int write_superblock(struct kv_log *log, uint8_t *buf)
{
    struct superblock sb = {KV_LOG_SUPER_MAGIC, KV_LOG_VERSION, SECTOR, KV_LOG_START,
                            log->area_bytes, log->active, log->first_seq};
    memset(buf, 0, SECTOR);
    memcpy(buf, &sb, sizeof(sb));
    if (virtio_blk_write(log->blk, 0, buf, 1) != VIRTIO_BLK_S_OK ||
        virtio_blk_flush(log->blk) != VIRTIO_BLK_S_OK)
        return -1;
    return 0;
}

/* The log's size: `log_bytes` (0: all of the disk after the superblock), two equal areas. */
static int choose_areas(struct kv_log *log, uint64_t log_bytes)
{
    uint64_t room = (log->blk->capacity - 1) * SECTOR;
    if (log_bytes == 0)
        log_bytes = room;
    if (log_bytes > room || log_bytes / 2 < KV_LOG_AREA_MIN) {
        printf("kv: log=%lu must be at least %u bytes and at most the disk's %lu\n",
               (unsigned long)log_bytes, 2 * KV_LOG_AREA_MIN, (unsigned long)room);
        return -1;
    }
    log->area_bytes = log_bytes / 2 / SECTOR * SECTOR;
    return 0;
}

static int format(struct kv_log *log, uint64_t log_bytes)
{
    uint8_t *s = log->batch[0].buf;
    if (choose_areas(log, log_bytes))
        return -1;
    log->first_seq = 1;
    set_area(log, 0);
    /* area 0's first sector zeroed: replay of the fresh log stops at once, whatever was there */
    memset(s, 0, SECTOR);
    if (virtio_blk_write(log->blk, 1, s, 1) != VIRTIO_BLK_S_OK ||
        write_superblock(log, s)) {
        printf("kv: formatting the log failed\n");
        return -1;
    }
    return 0;
}

/* Check a superblock this firmware did not just write; take its areas. */
static int adopt(struct kv_log *log, const struct superblock *sb, uint64_t log_bytes)
{
    uint64_t disk = log->blk->capacity * SECTOR;
    if (sb->version != KV_LOG_VERSION || sb->sector_size != SECTOR ||
        sb->log_start != KV_LOG_START) {
        printf("kv: log superblock version %u sector size %u start %lu is not supported "
               "(version %u, %u, %u is)\n", sb->version, sb->sector_size,
               (unsigned long)sb->log_start, KV_LOG_VERSION, SECTOR, KV_LOG_START);
        return -1;
    }
    if (sb->area_bytes % SECTOR || sb->area_bytes < KV_LOG_AREA_MIN ||
        sb->area_bytes > (disk - KV_LOG_START) / 2 || sb->active > 1 || sb->first_seq == 0) {
        printf("kv: log superblock areas of %lu bytes, active %lu, first seq %lu do not fit a "
               "disk of %lu bytes\n", (unsigned long)sb->area_bytes, (unsigned long)sb->active,
               (unsigned long)sb->first_seq, (unsigned long)disk);
        return -1;
    }
    if (log_bytes && log_bytes / 2 / SECTOR * SECTOR != sb->area_bytes)
        printf("kv: log=%lu ignored: the disk's log has two areas of %lu bytes\n",
               (unsigned long)log_bytes, (unsigned long)sb->area_bytes);
    log->area_bytes = sb->area_bytes;
    log->first_seq = sb->first_seq;
    set_area(log, sb->active);
    return 0;
}

static void replay(struct kv_log *log, kv_log_apply apply, void *ctx, struct kv_replay *r)
{
    uint64_t off = log->area_start, seq = log->first_seq - 1;
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
    r->bytes = off - log->area_start;
    r->last_seq = seq;
    r->first_seq = log->first_seq;
    log->end = off;
    log->next_seq = seq + 1;
}

int kv_log_open(struct kv_log *log, struct virtio_blk *blk, uint64_t log_bytes,
                kv_log_apply apply, kv_log_live live, void *ctx, struct kv_replay *out)
{
    memset(log, 0, sizeof(*log));
    memset(out, 0, sizeof(*out));
    log->blk = blk;
    log->live = live;
    log->live_ctx = ctx;
    log->tail = heap_alloc(SECTOR, SECTOR);
    log->spare = heap_alloc(SECTOR, SECTOR);
    log->batch[0].buf = heap_alloc(BATCH_BUF, 4096);
    log->batch[1].buf = heap_alloc(BATCH_BUF, 4096);
    log->chunk = heap_alloc(CHUNK_SECTORS * SECTOR, 4096);
    if (!log->tail || !log->spare || !log->batch[0].buf || !log->batch[1].buf || !log->chunk)
        return -1;
    if (blk->capacity < 1 + 2 * KV_LOG_AREA_MIN / SECTOR) {
        printf("kv: disk of %lu sectors is too small for a log (at least %u)\n",
               (unsigned long)blk->capacity, 1 + 2 * KV_LOG_AREA_MIN / SECTOR);
        return -1;
    }
    if (virtio_blk_read(blk, 0, log->chunk, 1) != VIRTIO_BLK_S_OK) {
        printf("kv: reading the log superblock failed\n");
        return -1;
    }
    struct superblock sb;
    memcpy(&sb, log->chunk, sizeof(sb));
    if (sb.magic != KV_LOG_SUPER_MAGIC) {
        if (format(log, log_bytes))
            return -1;
        out->formatted = 1;
    } else if (adopt(log, &sb, log_bytes)) {
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

/* Room in the active area for everything in flight and staged plus `len` more bytes? */
static int fits(const struct kv_log *log, uint64_t len)
{
    uint64_t ahead = log->busy ? log->batch[!log->open].bytes : 0;
    uint64_t end = log->end + ahead + log->batch[log->open].bytes + len;
    return (end + SECTOR - 1) / SECTOR <= log->area_end / SECTOR;
}

/* kv_log_stage without checkpoints: KV_LOG_BATCH_FULL also when the area is full, or when the
 * batch holds `max_records` (requests: KV_LOG_BATCH_MAX, the ops a batch can answer; a
 * checkpoint's batches answer none and are bounded by their bytes alone). */
static int stage(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                 uint16_t vlen, int durable, uint32_t max_records, uint32_t *rec_off)
{
    struct kv_log_batch *b = &log->batch[log->open];
    uint32_t len = KV_LOG_RECORD_HEADER + klen + vlen + 4u;
    if (klen > 128 || vlen > 512)
        return KV_LOG_NO_ROOM;
    if (!fits(log, len) || b->records >= max_records || b->bytes + len > KV_LOG_BATCH_BYTES)
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

static int checkpoint(struct kv_log *log);

int kv_log_stage(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                 uint16_t vlen, int durable, uint32_t *rec_off)
{
    uint32_t len = KV_LOG_RECORD_HEADER + klen + vlen + 4u;
    if (klen > 128 || vlen > 512 || log->stuck)
        return KV_LOG_NO_ROOM;
    if (!fits(log, len)) {
        if (log->batch[log->open].records || log->busy)
            return KV_LOG_BATCH_FULL; /* the caller finishes those, then asks again */
        if (log->cannot_compact || checkpoint(log) || !fits(log, len))
            return KV_LOG_NO_ROOM;
    }
    return stage(log, key, klen, value, vlen, durable, KV_LOG_BATCH_MAX, rec_off);
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

/* A request went to the disk: its wait starts. */
static void start_waiting(struct kv_log *log)
{
    log->waited = 0;
    log->last_poll = rdtsc();
}

/* One more poll found the request not done: has the disk had it too long? */
static int waited_too_long(struct kv_log *log)
{
    uint64_t now = rdtsc(), pass = now - log->last_poll, pass_max = us_to_tsc(WAIT_POLL_MAX_US);
    log->last_poll = now;
    log->waited += pass < pass_max ? pass : pass_max;
    return log->waited >= us_to_tsc(WAIT_GIVE_UP_US);
}

/* The disk never completed the request in flight: abandon it.  The log takes no more records
 * (`stuck`: every later PUT is answered with an error), so the abandoned batch's buffer and
 * descriptors are never reused, and a completion arriving later is never read. */
static int give_up(struct kv_log *log)
{
    printf("kv: the disk did not complete log request %d (%s) within %u s: it is given up, "
           "every PUT from now on fails; GETs are still served\n",
           log->head, log->busy == KV_LOG_FLUSHING ? "flush" : "write",
           WAIT_GIVE_UP_US / 1000000);
    log->busy = 0;
    log->stuck = 1;
    return VIRTIO_BLK_S_IOERR;
}

int kv_log_submit(struct kv_log *log)
{
    struct kv_log_batch *b = &log->batch[log->open];
    if (log->busy)
        return VIRTIO_BLK_S_IOERR; /* a caller bug: one batch in flight at a time */
    if (b->records == 0)
        return KV_LOG_NOTHING;
    if (log->stuck) { /* staged before the log got stuck: the batch is dropped */
        batch_clear(b);
        return VIRTIO_BLK_S_IOERR;
    }
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
    /* the zero sector after the records, if the area has one */
    uint32_t write = b->nsectors + (b->sector + b->nsectors < log->area_end / SECTOR);
    memset(start + used, 0, (size_t)write * SECTOR - used);
    int head = virtio_blk_submit_write(log->blk, b->sector, start, write);
    log->open = !log->open;
    batch_clear(&log->batch[log->open]);
    if (head < 0) {
        batch_clear(&log->batch[!log->open]);
        return VIRTIO_BLK_S_IOERR;
    }
    log->busy = KV_LOG_WRITING;
    log->head = head;
    start_waiting(log);
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
    if (r == 0) {
        if (!waited_too_long(log))
            return 0;
        *status = give_up(log);
        return 1;
    }
    if (r < 0 || head != log->head)
        st = VIRTIO_BLK_S_IOERR; /* a completion we did not ask for: the device is broken */
    if (st == VIRTIO_BLK_S_OK && log->busy == KV_LOG_WRITING &&
        log->batch[!log->open].durable && virtio_blk_has_flush(log->blk)) {
        log->head = virtio_blk_submit_flush(log->blk);
        if (log->head >= 0) {
            log->busy = KV_LOG_FLUSHING;
            start_waiting(log);
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
        if (kv_log_poll(log, &status)) /* done, failed, or given up */
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

/* Submit the open batch (if it has records) and wait for it: VIRTIO_BLK_S_OK or an error. */
static int write_open_batch(struct kv_log *log)
{
    int r = kv_log_submit(log);
    if (r == KV_LOG_NOTHING)
        return VIRTIO_BLK_S_OK;
    if (r != KV_LOG_SUBMITTED)
        return VIRTIO_BLK_S_IOERR;
    return kv_log_wait(log);
}

/* Write every live record into the inactive area from its start, in batches as large as the
 * batch buffer, then one FLUSH: nothing points at that area until the superblock is rewritten
 * after it, so the batches need no FLUSH of their own.  (Batches of 512 records, each flushed,
 * made a 65,536-key checkpoint 128 synchronous write + FLUSH round trips long: 0.7-1.8 s on a
 * busy 2-core host, with the guest serving nothing.)  0, or -1 if they do not fit in an area or
 * the disk failed. */
static int write_live_records(struct kv_log *log)
{
    const uint8_t *key, *value;
    uint16_t klen, vlen;
    uint32_t cursor = 0, off;
    while (log->live(log->live_ctx, &cursor, &key, &klen, &value, &vlen)) {
        int r = stage(log, key, klen, value, vlen, 0, UINT32_MAX, &off);
        if (r == KV_LOG_BATCH_FULL && log->batch[log->open].records) {
            if (write_open_batch(log) != VIRTIO_BLK_S_OK)
                return -1;
            r = stage(log, key, klen, value, vlen, 0, UINT32_MAX, &off);
        }
        if (r != KV_LOG_STAGED)
            return -1; /* the live data does not fit in an area */
    }
    if (write_open_batch(log) != VIRTIO_BLK_S_OK)
        return -1;
    return virtio_blk_flush(log->blk) == VIRTIO_BLK_S_OK ? 0 : -1;
}

/* The checkpoint (kv_log.h); only when nothing is staged or in flight, so the table the live
 * records come from holds every record of the log.  On failure the log is as before. */
static int checkpoint(struct kv_log *log)
{
    uint64_t started = rdtsc();
    uint64_t end = log->end, next_seq = log->next_seq, appended = log->appended_bytes;
    uint64_t first_seq = log->first_seq, area = log->active;
    memcpy(log->spare, log->tail, SECTOR);
    set_area(log, !area);
    log->end = log->area_start;
    log->first_seq = log->next_seq;
    memset(log->tail, 0, SECTOR);
    uint8_t *zero = log->batch[log->open].buf; /* free: nothing is staged */
    memset(zero, 0, SECTOR);
    int ok = virtio_blk_write(log->blk, log->area_start / SECTOR, zero, 1) == VIRTIO_BLK_S_OK &&
             write_live_records(log) == 0;
    if (ok && write_superblock(log, log->batch[log->open].buf)) {
        /* the superblock may name either area now: appending to either could be lost */
        printf("kv: writing the log superblock failed: no more appends\n");
        log->stuck = 1;
        return -1;
    }
    if (!ok) {
        printf("kv: checkpoint into area %lu failed (%lu live record bytes so far, area %lu "
               "bytes): the log is full\n", (unsigned long)log->active,
               (unsigned long)(log->end - log->area_start), (unsigned long)log->area_bytes);
        set_area(log, area);
        log->end = end;
        log->next_seq = next_seq;
        log->first_seq = first_seq;
        memcpy(log->tail, log->spare, SECTOR);
        log->appended_bytes = appended;
        log->cannot_compact = 1;
        return -1;
    }
    log->checkpoints++;
    log->checkpoint_bytes += log->end - log->area_start;
    uint64_t took = tsc_to_us(rdtsc() - started);
    log->checkpoint_us += took;
    if (took > log->checkpoint_max_us)
        log->checkpoint_max_us = took;
    log->appended_bytes = appended; /* appended_bytes counts the records of requests only */
    return 0;
}
