/*
 * heap.c - bump allocator (see heap.h).  Only vCPU 0 allocates, during setup.
 */
#include "runtime/heap.h"

#include "runtime/console.h"
#include "runtime/string.h"

static uint64_t heap_start, heap_next, heap_end;

void heap_init(uint64_t start, uint64_t end)
{
    heap_start = heap_next = start;
    heap_end = end;
}

void *heap_alloc(size_t size, size_t align)
{
    uint64_t at = (heap_next + align - 1) & ~(uint64_t)(align - 1);
    if (at < heap_next || at > heap_end || size > heap_end - at) {
        printf("heap: out of memory: %lu bytes (align %lu) requested, %lu free\n",
               (unsigned long)size, (unsigned long)align, (unsigned long)heap_free());
        return NULL;
    }
    heap_next = at + size;
    void *p = (void *)(uintptr_t)at;
    memset(p, 0, size);
    return p;
}

uint64_t heap_used(void)
{
    return heap_next - heap_start;
}

uint64_t heap_free(void)
{
    return heap_end - heap_next;
}
