/*
 * cmdline.h - the boot command line: "workload key=value key=value ...".
 *
 * Pure logic (no hypercalls), also built on the host by the tests.  Numbers are decimal or
 * 0x-hexadecimal with an optional binary suffix K, M or G (x1024, x1024^2, x1024^3).
 */
#ifndef PTMIG_RUNTIME_CMDLINE_H
#define PTMIG_RUNTIME_CMDLINE_H

#include <stddef.h>
#include <stdint.h>

#define CMDLINE_MAX_ARGS 16
#define CMDLINE_WORD_MAX 64 /* longest word, key or value, NUL included */

enum cmdline_error {
    CMDLINE_OK = 0,
    CMDLINE_EMPTY = -1,        /* no workload name */
    CMDLINE_TOO_MANY = -2,     /* more than CMDLINE_MAX_ARGS key=value pairs */
    CMDLINE_TOO_LONG = -3,     /* a word longer than CMDLINE_WORD_MAX - 1 */
    CMDLINE_NO_EQUALS = -4,    /* an argument that is not key=value */
    CMDLINE_BAD_NUMBER = -5,   /* a value that is not a number (or overflows 64 bits) */
    CMDLINE_UNKNOWN_KEY = -6,  /* a key the workload does not accept */
    CMDLINE_DUPLICATE = -7,    /* the same key twice */
    CMDLINE_UNTERMINATED = -8, /* no NUL within the buffer */
    CMDLINE_BAD_ADDRESS = -9,  /* a value that is not a dotted IPv4 address */
};

struct cmdline_arg {
    char key[CMDLINE_WORD_MAX];
    char value[CMDLINE_WORD_MAX];
};

struct cmdline {
    char workload[CMDLINE_WORD_MAX];
    unsigned nargs;
    struct cmdline_arg args[CMDLINE_MAX_ARGS];
};

/* Parse at most maxlen bytes of s (which must hold a NUL within them).  On error, *where (if
 * not NULL) points at the offending word in s. */
int cmdline_parse(const char *s, size_t maxlen, struct cmdline *out, const char **where);

/* The value of key, or NULL. */
const char *cmdline_get(const struct cmdline *c, const char *key);

/* *out = value of key parsed as a number, or def when absent.  Returns CMDLINE_OK or
 * CMDLINE_BAD_NUMBER. */
int cmdline_get_u64(const struct cmdline *c, const char *key, uint64_t def, uint64_t *out);

/* *out = value of key parsed as A.B.C.D (host order: A is the top byte), or def when absent. */
int cmdline_get_ipv4(const struct cmdline *c, const char *key, uint32_t def, uint32_t *out);

/* Every key must be in allowed (a NULL-terminated list); else CMDLINE_UNKNOWN_KEY and *bad is
 * the first unknown key. */
int cmdline_check_keys(const struct cmdline *c, const char *const *allowed, const char **bad);

/* Number parsing used above. */
int parse_u64(const char *s, uint64_t *out);
int parse_ipv4(const char *s, uint32_t *out);

/* A short English description of an error code. */
const char *cmdline_strerror(int err);

#endif
