/*
 * storebw_host.c - host build of the storebw workload: `storebw_host SIZE PASSES` (SIZE with
 * an optional K/M/G suffix) runs storebw_loop.c natively and prints the same line as the
 * firmware: "storebw: <bytes> bytes in <ticks> ticks".
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "storebw_loop.h"

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s)
        return -1;
    unsigned shift = 0;
    if (*end == 'K' || *end == 'k')
        shift = 10;
    else if (*end == 'M' || *end == 'm')
        shift = 20;
    else if (*end == 'G' || *end == 'g')
        shift = 30;
    if (shift)
        end++;
    if (*end)
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t size, passes;
    if (argc != 3 || parse_size(argv[1], &size) || parse_size(argv[2], &passes) || size < 8) {
        fprintf(stderr, "usage: %s SIZE PASSES (SIZE >= 8, with optional K/M/G suffix)\n",
                argv[0]);
        return 2;
    }
    size &= ~(uint64_t)7;
    uint64_t *buf = aligned_alloc(4096, (size + 4095) & ~(uint64_t)4095);
    if (!buf) {
        fprintf(stderr, "storebw_host: cannot allocate %" PRIu64 " bytes\n", size);
        return 1;
    }
    uint64_t ticks = storebw_run(buf, size, passes);
    printf("storebw: %" PRIu64 " bytes in %" PRIu64 " ticks\n", size * passes, ticks);
    free(buf);
    return 0;
}
