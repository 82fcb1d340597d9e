/*
 * kv_table.c - open-addressed hash table (see kv_table.h).
 */
#include "workloads/kv_table.h"

#include "runtime/string.h"

size_t kv_table_bytes(uint32_t capacity)
{
    return (size_t)capacity * sizeof(struct kv_slot);
}

int kv_table_init(struct kv_table *t, struct kv_slot *slots, uint32_t capacity)
{
    if (capacity < 8 || (capacity & (capacity - 1)))
        return -1;
    t->slots = slots;
    t->capacity = capacity;
    t->count = 0;
    t->limit = capacity - capacity / 8;
    return 0;
}

uint32_t kv_hash(const uint8_t *key, size_t klen)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < klen; i++) {
        h ^= key[i];
        h *= 16777619u;
    }
    return h;
}

/* The slot of key, or the empty slot where it would go. */
static struct kv_slot *probe(const struct kv_table *t, const uint8_t *key, size_t klen,
                             uint32_t h)
{
    uint32_t mask = t->capacity - 1;
    for (uint32_t i = h & mask;; i = (i + 1) & mask) {
        struct kv_slot *s = &t->slots[i];
        if (!s->used)
            return s;
        if (s->hash == h && s->klen == klen && memcmp(s->key, key, klen) == 0)
            return s;
    }
}

const struct kv_slot *kv_table_get(const struct kv_table *t, const uint8_t *key, size_t klen)
{
    if (klen > KV_MAX_KEY)
        return NULL;
    const struct kv_slot *s = probe(t, key, klen, kv_hash(key, klen));
    return s->used ? s : NULL;
}

int kv_table_can_put(const struct kv_table *t, const uint8_t *key, size_t klen)
{
    if (klen > KV_MAX_KEY)
        return 0;
    return t->count < t->limit || probe(t, key, klen, kv_hash(key, klen))->used;
}

int kv_table_put(struct kv_table *t, const uint8_t *key, size_t klen, const uint8_t *value,
                 size_t vlen)
{
    if (klen > KV_MAX_KEY || vlen > KV_MAX_VALUE)
        return -1;
    uint32_t h = kv_hash(key, klen);
    struct kv_slot *s = probe(t, key, klen, h);
    if (!s->used) {
        if (t->count >= t->limit)
            return -1;
        s->used = 1;
        s->hash = h;
        s->klen = (uint16_t)klen;
        memcpy(s->key, key, klen);
        t->count++;
    }
    s->vlen = (uint16_t)vlen;
    memcpy(s->value, value, vlen);
    return 0;
}
