/*
 * dirty.c - the dirty-page workload: `dirty ws=SIZE at=GPA rate=MIB_PER_S seconds=N`.
 *
 * The working set is ws bytes (default 64M) of RAM from GPA at (default: the first page after
 * the ground-truth bitmap), continuing in the next RAM region where one ends (so `at` below
 * the MMIO windows and a large ws cover RAM on both sides of 4 GiB).
 * Every vCPU dirties its own share of the working set, one 8-byte
 * store per page per pass (value = pass + page index, so every pass changes every page), in
 * page order, or with scatter=1 in a scattered order (each page once per pass: a
 * full-period LCG over the next power of two, values past the share skipped), at
 * rate MiB/s in total (0: as fast as possible), for seconds seconds (0: until the VM is
 * stopped). Pacing busy-waits on the TSC; with halt=1 a vCPU that is ahead of its schedule by
 * more than HALT_MIN_US sleeps in the halt hypercall instead, so a slow writer leaves its CPU
 * to the host (a near-idle guest); only a wake-up later than asked counts as a pause then.
 *
 * Ground truth: a bitmap at boot_info.heap_start with one bit per 4 KiB page of guest RAM,
 * set (atomically: the vCPUs share it) for every page the workload writes; struct
 * dirty_report in the workload area says where it and the working set are.
 *
 * Per-vCPU stats slot: iterations and pages_written (pages written), max_gap_tsc (longest
 * TSC gap between two consecutive loop iterations, pacing spins included, so it is the
 * guest-observed pause), last_tsc; w[0] passes done, w[1] first page of this vCPU's share,
 * w[2] pages in the share.
 */
#include <stdint.h>

#include "runtime/console.h"
#include "runtime/hypercall.h"
#include "runtime/io.h"
#include "runtime/smp.h"
#include "runtime/string.h"
#include "runtime/time.h"
#include "workloads/workload.h"

#define DEFAULT_WS (64ull << 20)
#define PAGE_SHIFT 12
#define CATCH_UP_LIMIT_MS 10 /* after a longer stall, pacing restarts instead of bursting */
#define HALT_MIN_US 200      /* halt=1: shorter waits spin (a halt costs a VM exit) */

static const char *const dirty_keys[] = {"ws", "at", "rate", "seconds", "halt", "scatter", NULL};

/* The working set as up to one piece per RAM region: pages [first, first + pages) of the set
 * are at GPA gpa onwards. */
struct ws_piece {
    uint64_t first, pages, gpa;
};

static struct {
    uint64_t *bitmap;
    uint64_t ws_gpa;
    uint64_t ws_pages;
    struct ws_piece piece[ABI_MAX_RAM_REGIONS];
    unsigned nr_pieces;
    uint64_t rate_mib;
    uint64_t seconds;
    uint64_t halt;
    uint64_t scatter;
    unsigned nr_vcpus;
} cfg;

/* RAM pages from GPA `at` to the end of RAM (0 if `at` is not in RAM). */
static uint64_t ram_pages_from(const struct boot_info *bi, uint64_t at)
{
    uint64_t pages = 0;
    for (unsigned i = 0; i < bi->nr_ram; i++) {
        uint64_t start = bi->ram[i].gpa, end = start + bi->ram[i].size;
        if (at >= end)
            continue;
        if (at > start)
            start = at;
        else if (pages == 0)
            return 0; /* `at` falls in a gap between regions */
        pages += (end - start) >> PAGE_SHIFT;
    }
    return pages;
}

/* Lay the working set's pages over RAM from `at`, region after region. */
static void place_ws(const struct boot_info *bi, uint64_t at, uint64_t pages)
{
    uint64_t done = 0;
    cfg.nr_pieces = 0;
    for (unsigned i = 0; i < bi->nr_ram && done < pages; i++) {
        uint64_t start = bi->ram[i].gpa, end = start + bi->ram[i].size;
        if (at >= end)
            continue;
        if (at > start)
            start = at;
        uint64_t n = (end - start) >> PAGE_SHIFT;
        if (n > pages - done)
            n = pages - done;
        cfg.piece[cfg.nr_pieces++] = (struct ws_piece){done, n, start};
        done += n;
    }
}

static inline uint64_t ws_page_gpa(uint64_t page)
{
    unsigned i = 0;
    while (i + 1 < cfg.nr_pieces && page >= cfg.piece[i + 1].first)
        i++;
    return cfg.piece[i].gpa + ((page - cfg.piece[i].first) << PAGE_SHIFT);
}

static int dirty_setup(const struct boot_info *bi, const struct cmdline *c)
{
    uint64_t ws, at;
    const char *bad = NULL;
    const struct ram_region *last = &bi->ram[bi->nr_ram - 1];
    uint64_t ram_pages = (last->gpa + last->size) >> PAGE_SHIFT; /* the span, gaps included */
    uint64_t bitmap_bytes = ((ram_pages + 63) / 64) * 8;
    uint64_t first_free = (bi->heap_start + bitmap_bytes + ABI_PAGE_SIZE - 1) &
                          ~(uint64_t)(ABI_PAGE_SIZE - 1);
    if (cmdline_get_u64(c, "ws", DEFAULT_WS, &ws))
        bad = "ws";
    else if (cmdline_get_u64(c, "at", first_free, &at) || at % ABI_PAGE_SIZE ||
             at < first_free || ram_pages_from(bi, at) == 0)
        bad = "at";
    else if (cmdline_get_u64(c, "rate", 0, &cfg.rate_mib))
        bad = "rate";
    else if (cmdline_get_u64(c, "seconds", 0, &cfg.seconds))
        bad = "seconds";
    else if (cmdline_get_u64(c, "halt", 0, &cfg.halt) || cfg.halt > 1)
        bad = "halt";
    else if (cmdline_get_u64(c, "scatter", 0, &cfg.scatter) || cfg.scatter > 1)
        bad = "scatter";
    if (bad) {
        printf("dirty: %s=%s is not valid (at: a page-aligned RAM GPA from 0x%lx); usage: %s\n",
               bad, cmdline_get(c, bad), (unsigned long)first_free, workload_dirty.usage);
        return EXIT_BAD_ARGS;
    }
    uint64_t avail = ram_pages_from(bi, at) << PAGE_SHIFT;
    if (ws > avail) {
        if (cmdline_get(c, "ws")) {
            printf("dirty: ws=%lu bytes does not fit: %lu bytes of RAM from 0x%lx "
                   "(mem_size %lu)\n",
                   (unsigned long)ws, (unsigned long)avail, (unsigned long)at,
                   (unsigned long)bi->mem_size);
            return EXIT_BAD_ARGS;
        }
        ws = avail; /* the default shrinks to fit a small VM */
    }
    cfg.ws_pages = ws >> PAGE_SHIFT;
    if (cfg.ws_pages == 0) {
        printf("dirty: working set of %lu bytes holds no whole page\n", (unsigned long)ws);
        return EXIT_BAD_ARGS;
    }
    cfg.bitmap = (uint64_t *)(uintptr_t)bi->heap_start;
    cfg.ws_gpa = at;
    place_ws(bi, at, cfg.ws_pages);
    cfg.nr_vcpus = bi->nr_vcpus;
    memset(cfg.bitmap, 0, bitmap_bytes);

    volatile struct dirty_report *r = workload_area();
    r->bitmap_gpa = bi->heap_start;
    r->bitmap_bytes = bitmap_bytes;
    r->ws_gpa = at;
    r->ws_pages = cfg.ws_pages;
    r->pass = 0;
    __atomic_store_n(&r->magic, DIRTY_REPORT_MAGIC, __ATOMIC_RELEASE);
    printf("dirty: %u vCPUs, ws %lu pages at 0x%lx in %u region(s)%s, rate %lu MiB/s%s, "
           "seconds %lu%s\n",
           cfg.nr_vcpus, (unsigned long)cfg.ws_pages, (unsigned long)at, cfg.nr_pieces,
           cfg.scatter ? " scattered" : "", (unsigned long)cfg.rate_mib,
           cfg.rate_mib ? "" : " (unlimited)", (unsigned long)cfg.seconds,
           cfg.seconds ? "" : " (until stopped)");
    return EXIT_OK;
}

/* Loop-iteration bookkeeping: the gap since the previous iteration. */
struct gap_meter {
    volatile struct vcpu_stats *stats;
    uint64_t prev;
    uint64_t max;
};

static inline uint64_t gap_tick(struct gap_meter *m)
{
    uint64_t now = rdtsc();
    uint64_t gap = now - m->prev;
    if (gap > m->max) {
        m->max = gap;
        m->stats->max_gap_tsc = gap;
    }
    m->prev = now;
    return now;
}

static inline void mark_page(uint64_t gpa)
{
    uint64_t pfn = gpa >> PAGE_SHIFT;
    uint64_t *word = &cfg.bitmap[pfn / 64];
    uint64_t bit = 1ull << (pfn % 64);
    if (!(__atomic_load_n(word, __ATOMIC_RELAXED) & bit))
        __atomic_fetch_or(word, bit, __ATOMIC_RELAXED);
}

static int dirty_summary(const struct boot_info *bi, uint64_t elapsed)
{
    /* the APs stop within one iteration of the deadline; wait (bounded) for their counts */
    if (!smp_wait_count(smp_done, bi->nr_vcpus, ms_to_tsc(2000)))
        printf("dirty: only %u of %u vCPUs finished in time\n", smp_done(), bi->nr_vcpus);
    uint64_t pages = 0, max_gap = 0;
    for (unsigned i = 0; i < bi->nr_vcpus; i++) {
        pages += stats_slot(i)->pages_written;
        if (stats_slot(i)->max_gap_tsc > max_gap)
            max_gap = stats_slot(i)->max_gap_tsc;
    }
    printf("dirty: %lu pages written (%lu MiB) in %lu ms by %u vCPUs, %lu passes, "
           "max gap %lu us\n",
           (unsigned long)pages, (unsigned long)(pages >> 8), (unsigned long)tsc_to_ms(elapsed),
           bi->nr_vcpus, (unsigned long)stats_slot(0)->w[0], (unsigned long)tsc_to_us(max_gap));
    return EXIT_OK;
}

/* The next page of a scattered pass over `n` pages: x walks 0..mask (mask + 1 a power of two
 * >= n) in a full-period LCG order (multiplier 1 mod 4, odd increment); values >= n are
 * skipped, so each of the n pages comes once per mask + 1 steps. */
static inline uint64_t scatter_next(uint64_t *x, uint64_t mask, uint64_t n)
{
    do
        *x = (*x * 5 + 0x9e3779b97f4a7c15ull) & mask;
    while (*x >= n);
    return *x;
}

static int dirty_run(unsigned cpu, const struct boot_info *bi)
{
    uint64_t first = cfg.ws_pages * cpu / cfg.nr_vcpus;
    uint64_t last = cfg.ws_pages * (cpu + 1) / cfg.nr_vcpus;
    volatile struct vcpu_stats *stats = stats_slot(cpu);
    volatile struct dirty_report *report = workload_area();
    stats->w[1] = first;
    stats->w[2] = last - first;

    uint64_t hz = time_tsc_khz() * 1000;
    /* pacing: this vCPU's pages per second, and the TSC step per page (with remainder) */
    uint64_t pps = cfg.rate_mib ? (cfg.rate_mib << 8) / cfg.nr_vcpus : 0;
    if (cfg.rate_mib && pps == 0)
        pps = 1;
    uint64_t step = pps ? hz / pps : 0, step_rem = pps ? hz % pps : 0, acc = 0;
    uint64_t catch_up = ms_to_tsc(CATCH_UP_LIMIT_MS);
    uint64_t halt_min = us_to_tsc(HALT_MIN_US);

    struct gap_meter m = {stats, rdtsc(), 0};
    uint64_t start = m.prev, deadline = start;
    uint64_t end = cfg.seconds ? start + (cfg.seconds > UINT64_MAX / hz - 1 ? UINT64_MAX / 2
                                                                             : cfg.seconds * hz)
                               : UINT64_MAX;
    uint64_t pages = 0, pass = 0;
    uint64_t mask = 1, x = 0;
    while (mask < last - first)
        mask <<= 1;
    mask--;

    if (first == last) { /* more vCPUs than pages: nothing to do but keep time */
        while (rdtsc() < end)
            gap_tick(&m);
        goto done;
    }
    for (;;) {
        for (uint64_t page = first; page < last; page++) {
            uint64_t now = gap_tick(&m);
            if (now >= end)
                goto done;
            if (pps) {
                deadline += step;
                acc += step_rem;
                if (acc >= pps) {
                    acc -= pps;
                    deadline++;
                }
                if (now > deadline + catch_up)
                    deadline = now; /* stalled (e.g. paused for migration): don't burst */
                if (cfg.halt && deadline > now + halt_min) {
                    hc_halt(tsc_to_us(deadline - now));
                    /* the asked-for sleep is not a pause: count only a late wake-up */
                    uint64_t woke = rdtsc();
                    m.prev = woke < deadline ? woke : deadline;
                    now = gap_tick(&m);
                }
                while (now < deadline)
                    now = gap_tick(&m);
            }
            uint64_t p = cfg.scatter ? first + scatter_next(&x, mask, last - first) : page;
            uint64_t gpa = ws_page_gpa(p);
            *(volatile uint64_t *)(uintptr_t)gpa = pass + p;
            mark_page(gpa);
            pages++;
            stats->iterations = pages;
            stats->pages_written = pages;
            stats->last_tsc = now;
        }
        pass++;
        stats->w[0] = pass;
        if (cpu == 0)
            report->pass = pass;
    }
done:
    smp_mark_done();
    if (cpu != 0)
        return EXIT_OK;
    return dirty_summary(bi, rdtsc() - start);
}

const struct workload workload_dirty = {
    .name = "dirty",
    .usage = "dirty ws=SIZE at=GPA rate=MIB_PER_S seconds=N halt=0|1 scatter=0|1",
    .keys = dirty_keys,
    .setup = dirty_setup,
    .run = dirty_run,
};
