/*
 * smp.c - release flag and counters shared by the vCPUs (see smp.h).  All accesses are
 * __atomic builtins: release/acquire on the flag, relaxed-enough counters.
 */
#include "runtime/smp.h"

#include "runtime/io.h"

static uint32_t release_flag;
static uint32_t online_count;
static uint32_t done_count;

void smp_release(void)
{
    __atomic_store_n(&release_flag, 1, __ATOMIC_RELEASE);
}

void smp_wait_for_release(void)
{
    while (!__atomic_load_n(&release_flag, __ATOMIC_ACQUIRE))
        cpu_pause();
    __atomic_add_fetch(&online_count, 1, __ATOMIC_ACQ_REL);
}

unsigned smp_online(void)
{
    return __atomic_load_n(&online_count, __ATOMIC_ACQUIRE);
}

void smp_mark_done(void)
{
    __atomic_add_fetch(&done_count, 1, __ATOMIC_ACQ_REL);
}

unsigned smp_done(void)
{
    return __atomic_load_n(&done_count, __ATOMIC_ACQUIRE);
}

int smp_wait_count(unsigned (*counter)(void), unsigned n, uint64_t timeout_tsc)
{
    uint64_t start = rdtsc();
    while (counter() < n) {
        if (rdtsc() - start > timeout_tsc)
            return 0;
        cpu_pause();
    }
    return 1;
}
