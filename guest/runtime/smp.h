/*
 * smp.h - the start protocol: vCPU 0 initialises, then releases the APs through a flag in
 * memory; the APs spin (with pause) until it does.  Also a "done" count for workloads that
 * end and want every vCPU's counters final before vCPU 0 reports.
 */
#ifndef PTMIG_RUNTIME_SMP_H
#define PTMIG_RUNTIME_SMP_H

#include <stdint.h>

void smp_release(void);          /* vCPU 0: let the APs go */
void smp_wait_for_release(void); /* APs: spin until released, then count themselves online */
unsigned smp_online(void);       /* APs that passed smp_wait_for_release() */

void smp_mark_done(void);        /* any vCPU: this vCPU has finished its share */
unsigned smp_done(void);         /* how many vCPUs have called smp_mark_done() */

/* Spin until counter() >= n or timeout_tsc ticks pass; returns 1 if reached, 0 on timeout. */
int smp_wait_count(unsigned (*counter)(void), unsigned n, uint64_t timeout_tsc);

#endif
