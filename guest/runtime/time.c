/*
 * time.c - TSC frequency and conversions (see time.h).
 */
#include "runtime/time.h"

#include "runtime/io.h"

static uint64_t khz = TIME_DEFAULT_TSC_KHZ;

uint64_t time_init(uint64_t tsc_khz)
{
    khz = tsc_khz ? tsc_khz : TIME_DEFAULT_TSC_KHZ;
    return khz;
}

uint64_t time_tsc_khz(void)
{
    return khz;
}

/* a * b / c without overflowing the intermediate product (c != 0), saturating at 2^64-1. */
static uint64_t mul_div(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t q = a / c, r = a % c;
    /* a*b/c = q*b + r*b/c; r < c so r*b fits when b <= 2^64/c, true for our b (1e3, 1e6). */
    if (q && b > UINT64_MAX / q)
        return UINT64_MAX;
    uint64_t hi = q * b, lo = r * b / c;
    return hi > UINT64_MAX - lo ? UINT64_MAX : hi + lo;
}

uint64_t tsc_to_us(uint64_t ticks)
{
    return mul_div(ticks, 1000, khz);
}

uint64_t tsc_to_ms(uint64_t ticks)
{
    return ticks / khz;
}

uint64_t us_to_tsc(uint64_t us)
{
    return mul_div(us, khz, 1000);
}

uint64_t ms_to_tsc(uint64_t ms)
{
    return ms > UINT64_MAX / khz ? UINT64_MAX : ms * khz;
}

void delay_us(uint64_t us)
{
    uint64_t start = rdtsc(), ticks = us_to_tsc(us);
    while (rdtsc() - start < ticks)
        cpu_pause();
}
