/*
 * string.h - the memory and string helpers the firmware provides (gcc may also emit calls to
 * memcpy/memset/memmove/memcmp on its own).  The prototypes are the standard ones, so code
 * that uses them also builds on the host against the C library.
 */
#ifndef PTMIG_RUNTIME_STRING_H
#define PTMIG_RUNTIME_STRING_H

#include <stddef.h>

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);

#endif
