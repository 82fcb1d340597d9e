/*
 * format.h - printf-style formatting with no dependencies (pure: also built on the host by the
 * tests and compared with the C library's snprintf).
 *
 * Conversions: %d %i %u %x %X %o %p %s %c %%, with flags '-' '0' ' ' '+', a width (or '*'),
 * a precision for %s and integers, and the length modifiers hh h l ll z t j.
 */
#ifndef PTMIG_RUNTIME_FORMAT_H
#define PTMIG_RUNTIME_FORMAT_H

#include <stdarg.h>
#include <stddef.h>

/* Calls put(ctx, c) for every output character; returns the number of characters. */
size_t fmt_vformat(void (*put)(void *ctx, char c), void *ctx, const char *fmt, va_list ap);

/* Like C's vsnprintf/snprintf: always NUL-terminates when size > 0, returns the full length. */
size_t fmt_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
size_t fmt_snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
