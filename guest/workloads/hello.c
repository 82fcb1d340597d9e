/*
 * hello.c - the smallest workload: vCPU 0 prints one greeting line and exits 0; the APs halt.
 */
#include "runtime/console.h"
#include "runtime/smp.h"
#include "runtime/time.h"
#include "workloads/workload.h"

static const char *const hello_keys[] = {NULL};

static int hello_run(unsigned cpu, const struct boot_info *bi)
{
    if (cpu != 0)
        return EXIT_OK;
    /* give the APs a moment to come online so the line can report them (not required) */
    smp_wait_count(smp_online, bi->nr_vcpus - 1, ms_to_tsc(100));
    printf("hello from ptmig guest: %u vCPUs, %lu MiB\n", bi->nr_vcpus,
           (unsigned long)(bi->mem_size >> 20));
    return EXIT_OK;
}

const struct workload workload_hello = {
    .name = "hello",
    .usage = "hello",
    .keys = hello_keys,
    .setup = NULL,
    .run = hello_run,
};
