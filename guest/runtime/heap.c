/*
 * heap.c - bump allocator over one or more RAM ranges (see heap.h).  Only vCPU 0 allocates,
 * during setup.
 */
#include "runtime/heap.h"

#include "runtime/console.h"
#include "runtime/string.h"

static struct heap_range {
    uint64_t start, next, end;
} ranges[ABI_MAX_RAM_REGIONS];
static unsigned nr_ranges;

void heap_init(uint64_t start, uint64_t end)
{
    ranges[0] = (struct heap_range){start, start, end > start ? end : start};
    nr_ranges = 1;
}

void heap_init_boot(const struct boot_info *bi)
{
    heap_init(bi->heap_start, bi->mem_size);
    for (unsigned i = 1; i < bi->nr_ram && i < ABI_MAX_RAM_REGIONS; i++) {
        uint64_t gpa = bi->ram[i].gpa, end = gpa + bi->ram[i].size;
        if (end > gpa)
            ranges[nr_ranges++] = (struct heap_range){gpa, gpa, end};
    }
}

static void *range_alloc(struct heap_range *r, size_t size, size_t align)
{
    uint64_t at = (r->next + align - 1) & ~(uint64_t)(align - 1);
    if (at < r->next || at > r->end || size > r->end - at)
        return NULL;
    r->next = at + size;
    void *p = (void *)(uintptr_t)at;
    memset(p, 0, size);
    return p;
}

void *heap_alloc(size_t size, size_t align)
{
    for (unsigned i = nr_ranges; i-- > 0;) { /* RAM above 4 GiB first, where there is some */
        void *p = range_alloc(&ranges[i], size, align);
        if (p)
            return p;
    }
    printf("heap: out of memory: %lu bytes (align %lu) requested, at most %lu free in one "
           "region\n",
           (unsigned long)size, (unsigned long)align, (unsigned long)heap_free());
    return NULL;
}

uint64_t heap_used(void)
{
    uint64_t used = 0;
    for (unsigned i = 0; i < nr_ranges; i++)
        used += ranges[i].next - ranges[i].start;
    return used;
}

uint64_t heap_free(void)
{
    uint64_t best = 0;
    for (unsigned i = 0; i < nr_ranges; i++)
        if (ranges[i].end - ranges[i].next > best)
            best = ranges[i].end - ranges[i].next;
    return best;
}
