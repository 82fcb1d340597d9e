/*
 * heap.h - a bump allocator over guest RAM from boot_info.heap_start to mem_size.  Memory is
 * never freed (drivers and workloads allocate once at start).  Returned memory is zeroed.
 */
#ifndef PTMIG_RUNTIME_HEAP_H
#define PTMIG_RUNTIME_HEAP_H

#include <stddef.h>
#include <stdint.h>

void heap_init(uint64_t start, uint64_t end);

/* align must be a power of two; returns NULL (after printing why) when RAM runs out. */
void *heap_alloc(size_t size, size_t align);

uint64_t heap_used(void);
uint64_t heap_free(void);

#endif
