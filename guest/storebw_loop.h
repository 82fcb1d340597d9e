/*
 * storebw_loop.h - the store-bandwidth loop, shared by the firmware (workload storebw) and the
 * host harness (storebw_host.c) so the benchmark compares the very same code.
 */
#ifndef PTMIG_STOREBW_LOOP_H
#define PTMIG_STOREBW_LOOP_H

#include <stdint.h>

/* Read the TSC. */
uint64_t storebw_rdtsc(void);

/* One pass: buf[i] = seed + i for i in [0, words). */
void storebw_pass(uint64_t *buf, uint64_t words, uint64_t seed);

/* One untimed warm-up pass, then `passes` timed passes over size bytes (rounded down to a
 * multiple of 8); returns the TSC ticks of the timed passes. */
uint64_t storebw_run(uint64_t *buf, uint64_t size, uint64_t passes);

#endif
