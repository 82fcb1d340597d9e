/*
 * kv_log.h - the kv workload's write-ahead log on a virtio-blk disk (format in
 * docs/KV_PROTOCOL.md): a superblock in sector 0, then records packed back to back from
 * sector 1, each {u32 magic, u32 len, u64 seq, u16 klen, u16 vlen, key, value, u32 crc32}.
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

struct kv_log {
    struct virtio_blk *blk;
    uint64_t end;      /* byte offset just past the last record */
    uint64_t next_seq; /* seq of the next record */
    uint64_t appended_bytes;
    uint8_t *tail;     /* the sector holding `end`, as on disk up to `end`, zero after */
    uint8_t *stage;    /* staging area for appends (3 sectors) */
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

/* Append one record; durable: FLUSH after the write.  Returns VIRTIO_BLK_S_OK, or nonzero
 * (nothing appended: the log end does not move). */
int kv_log_append(struct kv_log *log, const uint8_t *key, uint16_t klen, const uint8_t *value,
                  uint16_t vlen, int durable);

#endif
