/*
 * kv_log.c - write-ahead log (see kv_log.h).
 *
 * A commit rewrites the tail sector (whose bytes before `end` are already on disk, unchanged)
 * together with the sectors the staged records reach, in one write request; the log end moves
 * only after the device reported success.  Replay reads the log through a 64-sector cache
 * and stops at the first record that is not exactly what an append writes.
 */
#include "workloads/kv_log.h"

#include "abi.h"
#include "runtime/console.h"
#include "runtime/crc32.h"
#include "runtime/heap.h"
#include "runtime/string.h"

#define SECTOR VIRTIO_BLK_SECTOR
#define CHUNK_SECTORS 64

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
    uint8_t *s = log->stage;
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
    log->stage = heap_alloc(KV_LOG_STAGE_SECTORS * SECTOR, 4096);
    log->chunk = heap_alloc(CHUNK_SECTORS * SECTOR, 4096);
    if (!log->tail || !log->stage || !log->chunk)
        return -1;
    if (blk->capacity < 3) {
        printf("kv: disk of %lu sectors is too small for a log (at least 3)\n",
               (unsigned long)blk->capacity);
        return -1;
    }
    if (virtio_blk_read(blk, 0, log->stage, 1) != VIRTIO_BLK_S_OK) {
        printf("kv: reading the log superblock failed\n");
        return -1;
    }
    struct superblock sb;
    memcpy(&sb, log->stage, sizeof(sb));
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
    uint32_t len = KV_LOG_RECORD_HEADER + klen + vlen + 4u;
    uint64_t in_sector = log->end % SECTOR;
    uint64_t used = in_sector + log->staged_bytes + len;
    uint64_t nsectors = (used + SECTOR - 1) / SECTOR;
    if (klen > 128 || vlen > 512)
        return KV_LOG_NO_ROOM;
    if (log->end / SECTOR + nsectors > log->blk->capacity)
        return log->staged ? KV_LOG_BATCH_FULL : KV_LOG_NO_ROOM; /* the log is full */
    if (log->staged >= KV_LOG_BATCH_MAX || nsectors > KV_LOG_STAGE_SECTORS)
        return KV_LOG_BATCH_FULL;
    if (log->staged == 0) /* the batch continues the on-disk tail sector */
        memcpy(log->stage, log->tail, in_sector);
    uint8_t *rec = log->stage + in_sector + log->staged_bytes;
    put32(rec, KV_LOG_RECORD_MAGIC);
    put32(rec + 4, len);
    put64(rec + 8, log->next_seq + log->staged);
    put16(rec + 16, klen);
    put16(rec + 18, vlen);
    memcpy(rec + KV_LOG_RECORD_HEADER, key, klen);
    memcpy(rec + KV_LOG_RECORD_HEADER + klen, value, vlen);
    put32(rec + len - 4, crc32(0, rec, len - 4));
    *rec_off = (uint32_t)(rec - log->stage);
    log->staged++;
    log->staged_bytes += len;
    log->staged_durable |= durable;
    return KV_LOG_STAGED;
}

int kv_log_commit(struct kv_log *log)
{
    if (log->staged == 0)
        return VIRTIO_BLK_S_OK;
    uint64_t sector = log->end / SECTOR, in_sector = log->end % SECTOR;
    uint64_t used = in_sector + log->staged_bytes;
    uint32_t nsectors = (uint32_t)((used + SECTOR - 1) / SECTOR);
    uint8_t *s = log->stage;
    memset(s + used, 0, (size_t)nsectors * SECTOR - used); /* the rest of the last sector */
    int st = virtio_blk_write(log->blk, sector, s, nsectors);
    if (st == VIRTIO_BLK_S_OK && log->staged_durable)
        st = virtio_blk_flush(log->blk);
    uint32_t records = log->staged, bytes = log->staged_bytes;
    log->staged = 0;
    log->staged_bytes = 0;
    log->staged_durable = 0;
    if (st != VIRTIO_BLK_S_OK)
        return st ? st : VIRTIO_BLK_S_IOERR;
    log->end += bytes;
    log->next_seq += records;
    log->appended_bytes += bytes;
    uint64_t new_in_sector = log->end % SECTOR;
    memset(log->tail, 0, SECTOR);
    if (new_in_sector) /* the last staged sector is the new tail */
        memcpy(log->tail, s + (size_t)(nsectors - 1) * SECTOR, new_in_sector);
    return VIRTIO_BLK_S_OK;
}

int kv_log_append(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                  uint16_t vlen, int durable)
{
    uint32_t off;
    if (log->staged && kv_log_commit(log) != VIRTIO_BLK_S_OK)
        return VIRTIO_BLK_S_IOERR;
    if (kv_log_stage(log, key, klen, value, vlen, durable, &off) != KV_LOG_STAGED)
        return VIRTIO_BLK_S_IOERR; /* the log is full */
    return kv_log_commit(log);
}
