/*
 * time.h - TSC-based time, converted with boot_info.tsc_khz.
 */
#ifndef PTMIG_RUNTIME_TIME_H
#define PTMIG_RUNTIME_TIME_H

#include <stdint.h>

#define TIME_DEFAULT_TSC_KHZ 1000000 /* assumed when the VMM reports 0 */

/* Record the TSC frequency; returns the frequency in use (tsc_khz or the default). */
uint64_t time_init(uint64_t tsc_khz);
uint64_t time_tsc_khz(void);

/* Conversions that do not overflow for any 64-bit input (results saturate). */
uint64_t tsc_to_us(uint64_t ticks);
uint64_t tsc_to_ms(uint64_t ticks);
uint64_t us_to_tsc(uint64_t us);
uint64_t ms_to_tsc(uint64_t ms);

/* Busy-wait (never halts: keeps gap measurements honest). */
void delay_us(uint64_t us);

#endif
