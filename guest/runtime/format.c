/*
 * format.c - a small printf engine (see format.h).  No floating point: the firmware is built
 * with -mgeneral-regs-only.
 */
#include "runtime/format.h"

#include <stdint.h>

struct spec {
    int left;      /* '-' */
    int zero;      /* '0' */
    int plus;      /* '+' */
    int space;     /* ' ' */
    int width;     /* minimum field width */
    int precision; /* -1: none */
};

struct out {
    void (*put)(void *ctx, char c);
    void *ctx;
    size_t count;
};

static void emit(struct out *o, char c)
{
    o->put(o->ctx, c);
    o->count++;
}

static void emit_pad(struct out *o, char c, int n)
{
    for (int i = 0; i < n; i++)
        emit(o, c);
}

static void emit_string(struct out *o, const struct spec *sp, const char *s)
{
    if (!s)
        s = "(null)";
    int len = 0;
    while (s[len] && (sp->precision < 0 || len < sp->precision))
        len++;
    int pad = sp->width > len ? sp->width - len : 0;
    if (!sp->left)
        emit_pad(o, ' ', pad);
    for (int i = 0; i < len; i++)
        emit(o, s[i]);
    if (sp->left)
        emit_pad(o, ' ', pad);
}

/* prefix: "-", "+", " ", "0x" or "" */
static void emit_number(struct out *o, const struct spec *sp, uint64_t value, unsigned base,
                        int upper, const char *prefix)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int n = 0;
    if (value == 0 && sp->precision != 0)
        tmp[n++] = '0';
    while (value) {
        tmp[n++] = digits[value % base];
        value /= base;
    }
    int prefix_len = 0;
    while (prefix[prefix_len])
        prefix_len++;
    int zeros = sp->precision > n ? sp->precision - n : 0;
    int body = prefix_len + zeros + n;
    int pad = sp->width > body ? sp->width - body : 0;
    if (sp->zero && !sp->left && sp->precision < 0) {
        zeros += pad;
        pad = 0;
    }
    if (!sp->left)
        emit_pad(o, ' ', pad);
    for (int i = 0; i < prefix_len; i++)
        emit(o, prefix[i]);
    emit_pad(o, '0', zeros);
    while (n)
        emit(o, tmp[--n]);
    if (sp->left)
        emit_pad(o, ' ', pad);
}

size_t fmt_vformat(void (*put)(void *ctx, char c), void *ctx, const char *fmt, va_list ap)
{
    struct out o = {put, ctx, 0};
    while (*fmt) {
        if (*fmt != '%') {
            emit(&o, *fmt++);
            continue;
        }
        fmt++;
        struct spec sp = {0, 0, 0, 0, 0, -1};
        for (;; fmt++) {
            if (*fmt == '-')
                sp.left = 1;
            else if (*fmt == '0')
                sp.zero = 1;
            else if (*fmt == '+')
                sp.plus = 1;
            else if (*fmt == ' ')
                sp.space = 1;
            else
                break;
        }
        if (*fmt == '*') {
            sp.width = va_arg(ap, int);
            if (sp.width < 0) {
                sp.left = 1;
                sp.width = -sp.width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                sp.width = sp.width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            sp.precision = 0;
            if (*fmt == '*') {
                sp.precision = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    sp.precision = sp.precision * 10 + (*fmt++ - '0');
            }
        }
        int len = 0; /* 0 int, 1 long, 2 long long / 64-bit, -1 short, -2 char */
        for (;; fmt++) {
            if (*fmt == 'l')
                len = len >= 1 ? 2 : 1;
            else if (*fmt == 'z' || *fmt == 't' || *fmt == 'j')
                len = 2;
            else if (*fmt == 'h')
                len = len <= -1 ? -2 : -1;
            else
                break;
        }
        char conv = *fmt;
        if (!conv)
            break;
        fmt++;
        switch (conv) {
        case 'd':
        case 'i': {
            int64_t v = len >= 1 ? va_arg(ap, long long) : va_arg(ap, int);
            if (len == -1)
                v = (short)v;
            else if (len == -2)
                v = (signed char)v;
            uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            const char *prefix = v < 0 ? "-" : sp.plus ? "+" : sp.space ? " " : "";
            emit_number(&o, &sp, mag, 10, 0, prefix);
            break;
        }
        case 'u':
        case 'x':
        case 'X':
        case 'o': {
            uint64_t v = len >= 1 ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned int);
            if (len == -1)
                v = (unsigned short)v;
            else if (len == -2)
                v = (unsigned char)v;
            unsigned base = conv == 'u' ? 10 : conv == 'o' ? 8 : 16;
            emit_number(&o, &sp, v, base, conv == 'X', "");
            break;
        }
        case 'p': {
            uint64_t v = (uint64_t)(uintptr_t)va_arg(ap, void *);
            emit_number(&o, &sp, v, 16, 0, "0x");
            break;
        }
        case 's':
            emit_string(&o, &sp, va_arg(ap, const char *));
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            int pad = sp.width > 1 ? sp.width - 1 : 0;
            if (!sp.left)
                emit_pad(&o, ' ', pad);
            emit(&o, c);
            if (sp.left)
                emit_pad(&o, ' ', pad);
            break;
        }
        case '%':
            emit(&o, '%');
            break;
        default: /* unknown conversion: print it verbatim so the mistake is visible */
            emit(&o, '%');
            emit(&o, conv);
            break;
        }
    }
    return o.count;
}

struct buf_ctx {
    char *buf;
    size_t size;
    size_t pos;
};

static void buf_put(void *ctx, char c)
{
    struct buf_ctx *b = ctx;
    if (b->pos + 1 < b->size)
        b->buf[b->pos] = c;
    b->pos++;
}

size_t fmt_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct buf_ctx b = {buf, size, 0};
    size_t n = fmt_vformat(buf_put, &b, fmt, ap);
    if (size > 0)
        buf[b.pos < size ? b.pos : size - 1] = '\0';
    return n;
}

size_t fmt_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t n = fmt_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}
