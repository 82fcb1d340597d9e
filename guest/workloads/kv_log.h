/*
 * kv_log.h - the kv workload's write-ahead log on a virtio-blk disk (format in
 * docs/KV_PROTOCOL.md): a superblock in sector 0, then two equal areas; records are packed
 * back to back in the active area, each {u32 magic, u32 len, u64 seq, u16 klen, u16 vlen, key,
 * value, u32 crc32}.
 *
 * The log is compacted, so it never fills while the live data fits: when the active area has
 * no room for a record, a checkpoint -- one record per live key, as the table holds it -- is
 * written into the other area, flushed, and only then does the superblock name that area (and
 * the checkpoint's first seq) as the one to replay.  A crash before the superblock write
 * replays the old area, intact; after it, the checkpoint and what followed it.
 *
 * Appends are pipelined group commits.  Records are staged in memory (kv_log_stage) in the
 * open batch; kv_log_submit() starts writing it -- the tail sector it continues plus the
 * records, one multi-sector write, then one FLUSH if a record asked for durability -- and the
 * next batch stages meanwhile.  At most one batch is in flight, so writes never overlap on
 * the disk and each batch's FLUSH follows its own write; kv_log_poll() reports when the
 * batch in flight is done.  The on-disk format does not depend on how records were batched.
 */
#ifndef PTMIG_WORKLOADS_KV_LOG_H
#define PTMIG_WORKLOADS_KV_LOG_H

#include <stdint.h>

#include "drivers/virtio_blk.h"

#define KV_LOG_SUPER_MAGIC 0x31474f4c564b4d50ull /* "PMKVLOG1" */
#define KV_LOG_VERSION 2
#define KV_LOG_RECORD_MAGIC 0x4352564bu /* "KVRC" */
#define KV_LOG_RECORD_HEADER 20
#define KV_LOG_RECORD_MAX (KV_LOG_RECORD_HEADER + 128 + 512 + 4)
#define KV_LOG_START 512 /* byte offset of area 0 (sector 1) */
#define KV_LOG_AREA_MIN 2048 /* an area holds at least one record of any size */
#define KV_LOG_BATCH_BYTES (128 * 1024) /* record bytes per batch */
#define KV_LOG_BATCH_MAX 512             /* records per batch */

/* One batch: a sector reserved for the tail-sector prefix, then the staged records. */
struct kv_log_batch {
    uint8_t *buf;      /* SECTOR + KV_LOG_BATCH_BYTES + 2 * SECTOR bytes */
    uint32_t records;  /* staged records */
    uint32_t bytes;    /* their bytes, from buf + SECTOR */
    int durable;       /* a record asked for a FLUSH */
    uint32_t nsectors; /* once submitted: sectors of records, from sector `sector` (a zero
                        * sector follows them in the same write if the area has room) */
    uint64_t sector;
};

/* The live records a checkpoint writes: each call yields the next one (returns 1) or says
 * there are no more (0); *cursor starts at 0. */
typedef int (*kv_log_live)(void *ctx, uint32_t *cursor, const uint8_t **key, uint16_t *klen,
                           const uint8_t **value, uint16_t *vlen);

struct kv_log {
    struct virtio_blk *blk;
    kv_log_live live;
    void *live_ctx;
    uint64_t area_bytes; /* size of each area */
    uint64_t active;     /* the area appended to (0 or 1) */
    uint64_t first_seq;  /* seq of the active area's first record */
    uint64_t area_start, area_end; /* byte offsets of the active area */
    uint64_t checkpoints;       /* written since open */
    uint64_t checkpoint_bytes;  /* their record bytes */
    uint64_t checkpoint_us;     /* their time (the guest serves nothing meanwhile) */
    uint64_t checkpoint_max_us; /* the longest one's */
    int cannot_compact;         /* a checkpoint failed: the log stays full */
    int stuck;                  /* a superblock write failed or a request never completed
                                 * (given up: kv_log_poll): no more appends */
    uint8_t *spare;    /* a sector: the tail kept while a checkpoint runs */
    uint64_t end;      /* byte offset just past the last record on disk */
    uint64_t next_seq; /* seq of the next record written */
    uint64_t appended_bytes;
    uint8_t *tail;     /* the sector holding `end`, as on disk up to `end`, zero after */
    struct kv_log_batch batch[2];
    unsigned open;     /* batch[open] stages; batch[!open] is in flight when busy */
    int busy;          /* 0 idle, KV_LOG_WRITING or KV_LOG_FLUSHING */
    int head;          /* the blk request in flight */
    uint64_t waited;   /* TSC ticks it has been waited for (capped per poll: kv_log.c) */
    uint64_t last_poll;
    uint8_t *chunk;    /* replay read cache */
    uint64_t chunk_start, chunk_len;
};
#define KV_LOG_WRITING 1
#define KV_LOG_FLUSHING 2

struct kv_replay {
    uint64_t records, bytes, last_seq, stop; /* stop: KV_REPLAY_* (abi.h) */
    uint64_t first_seq;                      /* of the area replayed */
    int formatted;
};

/* Called for each valid record during replay; return nonzero to stop (KV_REPLAY_TABLE_FULL). */
typedef int (*kv_log_apply)(void *ctx, const uint8_t *key, uint16_t klen, const uint8_t *value,
                            uint16_t vlen);

/* Open the log (formatting an unformatted disk with `log_bytes` of log, 0: all of the disk)
 * and replay it; `live` later yields the records a checkpoint writes (the table, which replay
 * filled through `apply`).  0, or -1 (printed) if the disk cannot hold a log or fails at the
 * superblock. */
int kv_log_open(struct kv_log *log, struct virtio_blk *blk, uint64_t log_bytes,
                kv_log_apply apply, kv_log_live live, void *ctx, struct kv_replay *out);

/* Stage one record in the open batch; durable: its batch FLUSHes after the write.  Returns
 * KV_LOG_STAGED with *rec_off = the record's offset in the batch (kv_log_record() finds it
 * until the batch is done), KV_LOG_BATCH_FULL (submit the batch, then stage again), or
 * KV_LOG_NO_ROOM (the record can never fit: bad lengths, or the live data fills an area).
 * When the active area is full and nothing is staged or in flight -- so the table holds
 * every record -- it writes a checkpoint first (synchronously).  The record's seq and CRC are
 * filled in when its batch is submitted. */
#define KV_LOG_STAGED 0
#define KV_LOG_BATCH_FULL 1
#define KV_LOG_NO_ROOM (-1)
int kv_log_stage(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                 uint16_t vlen, int durable, uint32_t *rec_off);

/* Start writing the open batch (only when no batch is in flight).  Returns 0 (in flight now;
 * the open batch is a fresh empty one), 1 (the open batch had no records: nothing to do), or
 * nonzero status (the request could not be submitted: the batch is dropped). */
#define KV_LOG_SUBMITTED 0
#define KV_LOG_NOTHING 1
int kv_log_submit(struct kv_log *log);

/* Advance the batch in flight.  Returns 1 when it is done, with *status VIRTIO_BLK_S_OK (the
 * log end moved past its records) or an error (nothing was appended, the log end did not
 * move); its records stay readable with kv_log_record() until the next submit.  0 otherwise.
 * A request the disk has not completed after 20 s of polling is given up: a console message,
 * an error status, and the log is stuck (no more appends; kv_log.c give_up). */
int kv_log_poll(struct kv_log *log, int *status);

/* Wait (spin, then halt) until the batch in flight is done (or given up, as in kv_log_poll);
 * its status, or OK when idle. */
int kv_log_wait(struct kv_log *log);

/* The record at rec_off of the batch in flight (done or not) or of the open batch. */
const uint8_t *kv_log_record(const struct kv_log *log, int open_batch, uint32_t rec_off);

/* Stage, submit and wait for one record (a batch of one; nothing may be in flight). */
int kv_log_append(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                  uint16_t vlen, int durable);

#endif
