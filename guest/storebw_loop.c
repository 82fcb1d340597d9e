/*
 * storebw_loop.c - the store-bandwidth loop (see storebw_loop.h).  No dependencies beyond
 * <stdint.h>: it is compiled both into the firmware and natively on the host, with the same
 * -O2 -mgeneral-regs-only flags so both sides run 64-bit scalar stores.
 */
#include "storebw_loop.h"

uint64_t storebw_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

void storebw_pass(uint64_t *buf, uint64_t words, uint64_t seed)
{
    for (uint64_t i = 0; i < words; i++)
        buf[i] = seed + i;
    __asm__ volatile("" : : : "memory"); /* every pass's stores happen */
}

uint64_t storebw_run(uint64_t *buf, uint64_t size, uint64_t passes)
{
    uint64_t words = size / 8;
    storebw_pass(buf, words, 0); /* fault the pages in: measure stores, not first touches */
    uint64_t t0 = storebw_rdtsc();
    for (uint64_t p = 1; p <= passes; p++)
        storebw_pass(buf, words, p << 32);
    return storebw_rdtsc() - t0;
}
