/*
 * main.c - firmware entry in C: checks boot_info, parses the command line, picks the workload
 * and runs the SMP start protocol (vCPU 0 sets up, then releases the APs).
 */
#include <stdint.h>

#include "abi.h"
#include "runtime/cmdline.h"
#include "runtime/console.h"
#include "runtime/hypercall.h"
#include "runtime/io.h"
#include "runtime/smp.h"
#include "runtime/string.h"
#include "runtime/time.h"
#include "workloads/workload.h"

int main(unsigned cpu, const struct boot_info *bi);
void ap_main(unsigned cpu, const struct boot_info *bi);

static const struct workload *const workloads[] = {
    &workload_hello,
    &workload_dirty,
    &workload_storebw,
    &workload_kv,
    &workload_blkbench,
    &workload_blkverify,
};

#define NR_WORKLOADS (sizeof(workloads) / sizeof(workloads[0]))

/* Set by vCPU 0 before smp_release(); read by the APs after it. */
static const struct workload *chosen;
static struct cmdline cmdline;

static void stats_init(unsigned cpu)
{
    volatile struct vcpu_stats *s = stats_slot(cpu);
    s->iterations = 0;
    s->max_gap_tsc = 0;
    s->last_tsc = rdtsc();
    s->pages_written = 0;
    s->hb = 0;
    for (unsigned i = 0; i < 10; i++)
        s->w[i] = 0;
    __atomic_store_n(&s->magic, VCPU_STATS_MAGIC, __ATOMIC_RELEASE);
}

static int check_boot_info(const struct boot_info *bi)
{
    if (bi->magic != BOOT_INFO_MAGIC) {
        printf("ptmig guest: boot_info magic is 0x%lx, expected 0x%lx\n",
               (unsigned long)bi->magic, (unsigned long)BOOT_INFO_MAGIC);
        return -1;
    }
    if (bi->version != BOOT_INFO_VERSION) {
        printf("ptmig guest: boot_info version %u, expected %u\n", bi->version,
               BOOT_INFO_VERSION);
        return -1;
    }
    if (bi->nr_vcpus == 0 || bi->nr_vcpus > ABI_MAX_VCPUS) {
        printf("ptmig guest: boot_info nr_vcpus %u, expected 1..%u\n", bi->nr_vcpus,
               ABI_MAX_VCPUS);
        return -1;
    }
    if (bi->nr_devices > ABI_MAX_DEVICES) {
        printf("ptmig guest: boot_info nr_devices %u, expected at most %u\n", bi->nr_devices,
               ABI_MAX_DEVICES);
        return -1;
    }
    if (bi->nr_ram == 0 || bi->nr_ram > ABI_MAX_RAM_REGIONS || bi->ram[0].gpa != 0 ||
        bi->ram[0].size != bi->mem_size) {
        printf("ptmig guest: boot_info nr_ram %u (expected 1..%u) or ram[0] [0x%lx, +0x%lx) is "
               "not [0, mem_size 0x%lx)\n", bi->nr_ram, ABI_MAX_RAM_REGIONS,
               (unsigned long)bi->ram[0].gpa, (unsigned long)bi->ram[0].size,
               (unsigned long)bi->mem_size);
        return -1;
    }
    for (unsigned i = 1; i < bi->nr_ram; i++) {
        if (bi->ram[i].gpa < bi->ram[i - 1].gpa + bi->ram[i - 1].size ||
            bi->ram[i].gpa + bi->ram[i].size < bi->ram[i].gpa) {
            printf("ptmig guest: boot_info ram[%u] [0x%lx, +0x%lx) overlaps or wraps\n", i,
                   (unsigned long)bi->ram[i].gpa, (unsigned long)bi->ram[i].size);
            return -1;
        }
    }
    if (bi->heap_start < ABI_HEAP_START_GPA || bi->heap_start > bi->mem_size) {
        printf("ptmig guest: boot_info heap_start 0x%lx outside [0x%x, mem_size 0x%lx]\n",
               (unsigned long)bi->heap_start, ABI_HEAP_START_GPA, (unsigned long)bi->mem_size);
        return -1;
    }
    return 0;
}

static const struct workload *find_workload(const char *name)
{
    for (unsigned i = 0; i < NR_WORKLOADS; i++) {
        if (strcmp(workloads[i]->name, name) == 0)
            return workloads[i];
    }
    return NULL;
}

static int choose(const struct boot_info *bi)
{
    const char *where = NULL;
    int err = cmdline_parse(bi->cmdline, sizeof(bi->cmdline), &cmdline, &where);
    if (err) {
        printf("ptmig guest: bad command line: %s", cmdline_strerror(err));
        if (where)
            printf(" at \"%.40s\"", where);
        printf("\n");
        return EXIT_BAD_ARGS;
    }
    const struct workload *w = find_workload(cmdline.workload);
    if (!w) {
        printf("ptmig guest: unknown workload \"%s\"; known:", cmdline.workload);
        for (unsigned i = 0; i < NR_WORKLOADS; i++)
            printf(" %s", workloads[i]->name);
        printf("\n");
        return EXIT_BAD_ARGS;
    }
    const char *bad = NULL;
    if (cmdline_check_keys(&cmdline, w->keys, &bad)) {
        printf("ptmig guest: %s: unknown key \"%s\"; usage: %s\n", w->name, bad, w->usage);
        return EXIT_BAD_ARGS;
    }
    if (w->setup) {
        int rc = w->setup(bi, &cmdline);
        if (rc)
            return rc;
    }
    chosen = w;
    return EXIT_OK;
}

int main(unsigned cpu, const struct boot_info *bi)
{
    stats_init(cpu);
    if (check_boot_info(bi))
        return EXIT_BAD_BOOT;
    time_init(bi->tsc_khz);
    int rc = choose(bi);
    if (rc)
        return rc; /* APs stay parked: exiting ends the VM */
    smp_release();
    return chosen->run(cpu, bi);
}

void ap_main(unsigned cpu, const struct boot_info *bi)
{
    stats_init(cpu);
    smp_wait_for_release();
    time_init(bi->tsc_khz);
    chosen->run(cpu, bi);
}
