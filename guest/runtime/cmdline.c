/*
 * cmdline.c - parsing of the boot command line (see cmdline.h).
 */
#include "runtime/cmdline.h"

#include "runtime/string.h"

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Copy the word starting at s (up to a space or NUL) into dst; returns its length or -1. */
static int copy_word(char *dst, const char *s, size_t n)
{
    if (n >= CMDLINE_WORD_MAX)
        return -1;
    memcpy(dst, s, n);
    dst[n] = '\0';
    return (int)n;
}

int cmdline_parse(const char *s, size_t maxlen, struct cmdline *out, const char **where)
{
    memset(out, 0, sizeof(*out));
    if (where)
        *where = s;
    size_t total = 0;
    while (total < maxlen && s[total])
        total++;
    if (total == maxlen)
        return CMDLINE_UNTERMINATED;

    const char *p = s;
    int have_workload = 0;
    for (;;) {
        while (is_space(*p))
            p++;
        if (!*p)
            break;
        const char *word = p;
        while (*p && !is_space(*p))
            p++;
        size_t n = (size_t)(p - word);
        if (where)
            *where = word;
        if (!have_workload) {
            for (size_t i = 0; i < n; i++) {
                if (word[i] == '=')
                    return CMDLINE_EMPTY; /* the first word is the workload, not key=value */
            }
            if (copy_word(out->workload, word, n) < 0)
                return CMDLINE_TOO_LONG;
            have_workload = 1;
            continue;
        }
        const char *eq = word;
        while (eq < p && *eq != '=')
            eq++;
        if (eq == p || eq == word)
            return CMDLINE_NO_EQUALS;
        if (out->nargs == CMDLINE_MAX_ARGS)
            return CMDLINE_TOO_MANY;
        struct cmdline_arg *a = &out->args[out->nargs];
        if (copy_word(a->key, word, (size_t)(eq - word)) < 0 ||
            copy_word(a->value, eq + 1, (size_t)(p - eq - 1)) < 0)
            return CMDLINE_TOO_LONG;
        if (cmdline_get(out, a->key))
            return CMDLINE_DUPLICATE;
        out->nargs++;
    }
    if (!have_workload)
        return CMDLINE_EMPTY;
    if (where)
        *where = NULL;
    return CMDLINE_OK;
}

const char *cmdline_get(const struct cmdline *c, const char *key)
{
    for (unsigned i = 0; i < c->nargs; i++) {
        if (strcmp(c->args[i].key, key) == 0)
            return c->args[i].value;
    }
    return NULL;
}

int parse_u64(const char *s, uint64_t *out)
{
    uint64_t base = 10, v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    int digits = 0;
    for (;; s++) {
        unsigned d;
        char c = *s;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            break;
        if (v > (UINT64_MAX - d) / base)
            return CMDLINE_BAD_NUMBER;
        v = v * base + d;
        digits++;
    }
    if (!digits)
        return CMDLINE_BAD_NUMBER;
    unsigned shift = 0;
    switch (*s) {
    case 'k':
    case 'K':
        shift = 10;
        s++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        s++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        s++;
        break;
    default:
        break;
    }
    if (*s)
        return CMDLINE_BAD_NUMBER;
    if (shift && v > (UINT64_MAX >> shift))
        return CMDLINE_BAD_NUMBER;
    *out = v << shift;
    return CMDLINE_OK;
}

int parse_ipv4(const char *s, uint32_t *out)
{
    uint32_t addr = 0;
    for (int part = 0; part < 4; part++) {
        unsigned v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9') {
            v = v * 10 + (unsigned)(*s++ - '0');
            if (++digits > 3 || v > 255)
                return CMDLINE_BAD_ADDRESS;
        }
        if (!digits)
            return CMDLINE_BAD_ADDRESS;
        addr = (addr << 8) | v;
        if (part < 3 && *s++ != '.')
            return CMDLINE_BAD_ADDRESS;
    }
    if (*s)
        return CMDLINE_BAD_ADDRESS;
    *out = addr;
    return CMDLINE_OK;
}

int cmdline_get_u64(const struct cmdline *c, const char *key, uint64_t def, uint64_t *out)
{
    const char *v = cmdline_get(c, key);
    if (!v) {
        *out = def;
        return CMDLINE_OK;
    }
    return parse_u64(v, out);
}

int cmdline_get_ipv4(const struct cmdline *c, const char *key, uint32_t def, uint32_t *out)
{
    const char *v = cmdline_get(c, key);
    if (!v) {
        *out = def;
        return CMDLINE_OK;
    }
    return parse_ipv4(v, out);
}

int cmdline_check_keys(const struct cmdline *c, const char *const *allowed, const char **bad)
{
    for (unsigned i = 0; i < c->nargs; i++) {
        int ok = 0;
        for (const char *const *k = allowed; *k; k++) {
            if (strcmp(*k, c->args[i].key) == 0) {
                ok = 1;
                break;
            }
        }
        if (!ok) {
            if (bad)
                *bad = c->args[i].key;
            return CMDLINE_UNKNOWN_KEY;
        }
    }
    return CMDLINE_OK;
}

const char *cmdline_strerror(int err)
{
    switch (err) {
    case CMDLINE_OK:
        return "ok";
    case CMDLINE_EMPTY:
        return "no workload name (the command line must start with one)";
    case CMDLINE_TOO_MANY:
        return "too many key=value arguments (at most 16)";
    case CMDLINE_TOO_LONG:
        return "word too long (at most 63 characters)";
    case CMDLINE_NO_EQUALS:
        return "argument is not key=value";
    case CMDLINE_BAD_NUMBER:
        return "not a number (decimal or 0x hex, optional K/M/G suffix, at most 2^64-1)";
    case CMDLINE_UNKNOWN_KEY:
        return "unknown key for this workload";
    case CMDLINE_DUPLICATE:
        return "key given twice";
    case CMDLINE_UNTERMINATED:
        return "command line not NUL-terminated";
    case CMDLINE_BAD_ADDRESS:
        return "not an IPv4 address A.B.C.D";
    default:
        return "unknown error";
    }
}
