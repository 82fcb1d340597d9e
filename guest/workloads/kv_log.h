/*
 * kv_log.h - the kv workload's write-ahead log on a virtio-blk disk (format in
 * docs/KV_PROTOCOL.md): a superblock in sector 0, then records packed back to back from
 * sector 1, each {u32 magic, u32 len, u64 seq, u16 klen, u16 vlen, key, value, u32 crc32}.
 *
 * Appends are group commits: records are staged in memory (kv_log_stage) and written together,
 * with the tail sector they continue, in one multi-sector write followed by at most one FLUSH
 * (kv_log_commit).  The on-disk format does not depend on how records were batched.
 */
#ifndef PTMIG_WORKLOADS_KV_LOG_H
#define PTMIG_WORKLOADS_KV_LOG_H

#include <stdint.h>

#include "drivers/virtio_blk.h"

#define KV_LOG_SUPER_MAGIC 0x31474f4c564b4d50ull /* "PMKVLOG1" */
#define KV_LOG_VERSION 1
#define KV_LOG_RECORD_MAGIC 0x4352564bu /* "KVRC" */
#define KV_LOG_RECORD_HEADER 20
#define KV_LOG_RECORD_MAX (KV_LOG_RECORD_HEADER + 128 + 512 + 4)
#define KV_LOG_START 512 /* byte offset of the first record (sector 1) */
#define KV_LOG_STAGE_SECTORS 130 /* one batch: 64 KiB of records plus the tail sector */
#define KV_LOG_BATCH_MAX 64     /* records per batch */

struct kv_log {
    struct virtio_blk *blk;
    uint64_t end;      /* byte offset just past the last record */
    uint64_t next_seq; /* seq of the next record */
    uint64_t appended_bytes;
    uint8_t *tail;     /* the sector holding `end`, as on disk up to `end`, zero after */
    uint8_t *stage;    /* the batch: tail sector bytes, then staged records */
    uint32_t staged;   /* records staged (not yet on disk) */
    uint32_t staged_bytes; /* their bytes, starting at stage + end % SECTOR */
    int staged_durable;    /* a staged record asked for a FLUSH */
    uint8_t *chunk;    /* replay read cache */
    uint64_t chunk_start, chunk_len;
};

struct kv_replay {
    uint64_t records, bytes, last_seq, stop; /* stop: KV_REPLAY_* (abi.h) */
    int formatted;
};

/* Called for each valid record during replay; return nonzero to stop (KV_REPLAY_TABLE_FULL). */
typedef int (*kv_log_apply)(void *ctx, const uint8_t *key, uint16_t klen, const uint8_t *value,
                            uint16_t vlen);

/* Open the log (formatting an unformatted disk) and replay it.  0, or -1 (printed) if the disk
 * cannot hold a log or fails at the superblock. */
int kv_log_open(struct kv_log *log, struct virtio_blk *blk, kv_log_apply apply, void *ctx,
                struct kv_replay *out);

/* Stage one record for the next commit; durable: the commit FLUSHes after its write.
 * Returns KV_LOG_STAGED with *rec_off = the record's offset in log->stage (it stays there
 * until the commit), KV_LOG_BATCH_FULL (commit, then stage again), or KV_LOG_NO_ROOM (the
 * record can never fit: bad lengths, or the disk is full even for a batch of one). */
#define KV_LOG_STAGED 0
#define KV_LOG_BATCH_FULL 1
#define KV_LOG_NO_ROOM (-1)
int kv_log_stage(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                 uint16_t vlen, int durable, uint32_t *rec_off);

/* Write every staged record in one request (and FLUSH if one of them was durable).  Returns
 * VIRTIO_BLK_S_OK (the log end moved past them), or nonzero: nothing was appended, the batch
 * is dropped and the log end does not move.  Committing an empty batch does nothing. */
int kv_log_commit(struct kv_log *log);

/* Stage and commit one record (a batch of one). */
int kv_log_append(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                  uint16_t vlen, int durable);

#endif
