/*
 * storebw.c - `storebw size=SIZE passes=N`: vCPU 0 writes size bytes (default 64M) with 64-bit
 * stores, passes times (default 10), after one untimed warm-up pass; prints
 * "storebw: <bytes> bytes in <ticks> ticks" and fills struct storebw_report in the workload
 * area.  The loop itself is storebw_loop.c, which the benchmark also runs natively.
 */
#include <stdint.h>

#include "runtime/console.h"
#include "runtime/io.h"
#include "runtime/time.h"
#include "storebw_loop.h"
#include "workloads/workload.h"

static const char *const storebw_keys[] = {"size", "passes", NULL};

static uint64_t size, passes;

static int storebw_setup(const struct boot_info *bi, const struct cmdline *c)
{
    if (cmdline_get_u64(c, "size", 64ull << 20, &size) ||
        cmdline_get_u64(c, "passes", 10, &passes)) {
        printf("storebw: size/passes must be numbers; usage: %s\n", workload_storebw.usage);
        return EXIT_BAD_ARGS;
    }
    size &= ~(uint64_t)7;
    uint64_t avail = bi->mem_size - bi->heap_start;
    if (size == 0 || size > avail) {
        printf("storebw: size=%lu must be in [8, %lu] (RAM free after heap_start 0x%lx)\n",
               (unsigned long)size, (unsigned long)avail, (unsigned long)bi->heap_start);
        return EXIT_BAD_ARGS;
    }
    return EXIT_OK;
}

static int storebw_workload_run(unsigned cpu, const struct boot_info *bi)
{
    if (cpu != 0)
        return EXIT_OK;
    uint64_t *buf = (uint64_t *)(uintptr_t)bi->heap_start;
    uint64_t ticks = storebw_run(buf, size, passes);
    volatile struct storebw_report *r = workload_area();
    r->size = size;
    r->passes = passes;
    r->bytes = size * passes;
    r->ticks = ticks;
    r->tsc_khz = time_tsc_khz();
    __atomic_store_n(&r->magic, STOREBW_REPORT_MAGIC, __ATOMIC_RELEASE);
    stats_slot(0)->iterations = passes;
    printf("storebw: %lu bytes in %lu ticks\n", (unsigned long)(size * passes),
           (unsigned long)ticks);
    return EXIT_OK;
}

const struct workload workload_storebw = {
    .name = "storebw",
    .usage = "storebw size=SIZE passes=N",
    .keys = storebw_keys,
    .setup = storebw_setup,
    .run = storebw_workload_run,
};
