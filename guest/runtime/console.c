/*
 * console.c - per-vCPU line-buffered printf over the CONSOLE hypercall.
 */
#include "runtime/console.h"

#include <stdint.h>

#include "abi.h"
#include "runtime/format.h"
#include "runtime/hypercall.h"
#include "runtime/io.h"

#define LINE_SIZE 256

struct line {
    char buf[LINE_SIZE];
    unsigned len;
};

static struct line lines[ABI_MAX_VCPUS];

static struct line *my_line(void)
{
    unsigned cpu = this_cpu();
    return &lines[cpu < ABI_MAX_VCPUS ? cpu : 0];
}

static void line_flush(struct line *l)
{
    if (l->len) {
        hc_console(l->buf, l->len);
        l->len = 0;
    }
}

static void line_put(void *ctx, char c)
{
    struct line *l = ctx;
    l->buf[l->len++] = c;
    if (c == '\n' || l->len == LINE_SIZE)
        line_flush(l);
}

int vprintf(const char *fmt, va_list ap)
{
    return (int)fmt_vformat(line_put, my_line(), fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int puts(const char *s)
{
    return printf("%s\n", s);
}

void console_flush(void)
{
    line_flush(my_line());
}
