/*
 * kv_table.h - the kv workload's in-memory table: open addressing with linear probing over a
 * power-of-two array of fixed-size slots, FNV-1a hashes, no deletion.  Pure logic (no I/O),
 * also built on the host by the tests.
 */
#ifndef PTMIG_WORKLOADS_KV_TABLE_H
#define PTMIG_WORKLOADS_KV_TABLE_H

#include <stddef.h>
#include <stdint.h>

#define KV_MAX_KEY 128
#define KV_MAX_VALUE 512

struct kv_slot {
    uint32_t hash;
    uint16_t klen;
    uint16_t vlen;
    uint32_t used;
    uint8_t key[KV_MAX_KEY];
    uint8_t value[KV_MAX_VALUE];
    uint8_t pad[4];
};

struct kv_table {
    struct kv_slot *slots;
    uint32_t capacity; /* power of two */
    uint32_t count;
    uint32_t limit;    /* at most this many keys (7/8 of capacity): probes stay short */
};

/* Bytes of slot memory a table of `capacity` slots needs. */
size_t kv_table_bytes(uint32_t capacity);

/* slots must be zeroed memory of kv_table_bytes(capacity); capacity a power of two >= 8. */
int kv_table_init(struct kv_table *t, struct kv_slot *slots, uint32_t capacity);

uint32_t kv_hash(const uint8_t *key, size_t klen);

/* The slot holding key, or NULL. */
const struct kv_slot *kv_table_get(const struct kv_table *t, const uint8_t *key, size_t klen);

/* Would a put of key succeed (present already, or room for one more)? */
int kv_table_can_put(const struct kv_table *t, const uint8_t *key, size_t klen);

/* Insert or replace.  0, or -1 if the table is full or a length is too big. */
int kv_table_put(struct kv_table *t, const uint8_t *key, size_t klen, const uint8_t *value,
                 size_t vlen);

#endif
