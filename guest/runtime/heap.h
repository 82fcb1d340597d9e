/*
 * heap.h - a bump allocator over guest RAM: from boot_info.heap_start to mem_size, then every
 * further RAM region (boot_info.ram[], e.g. RAM from 4 GiB up).  An allocation comes from the
 * highest region with room for it, so on a guest with RAM above 4 GiB the drivers' rings and
 * DMA buffers live there (devices must handle 64-bit addresses, as the virtio spec requires).  Memory is never freed (drivers and workloads allocate once
 * at start).  Returned memory is zeroed.
 */
#ifndef PTMIG_RUNTIME_HEAP_H
#define PTMIG_RUNTIME_HEAP_H

#include <stddef.h>
#include <stdint.h>

#include "abi.h"

/* One range [start, end): for tests and small tools. */
void heap_init(uint64_t start, uint64_t end);

/* All RAM the boot information describes, from heap_start on. */
void heap_init_boot(const struct boot_info *bi);

/* align must be a power of two; returns NULL (after printing why) when RAM runs out. */
void *heap_alloc(size_t size, size_t align);

uint64_t heap_used(void);
/* The largest allocation that can still succeed (the most room left in one region). */
uint64_t heap_free(void);

#endif
