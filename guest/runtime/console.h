/*
 * console.h - printf to the VM console.  Output is buffered per vCPU and sent with one CONSOLE
 * hypercall per line (or when the 256-byte line buffer fills).
 */
#ifndef PTMIG_RUNTIME_CONSOLE_H
#define PTMIG_RUNTIME_CONSOLE_H

#include <stdarg.h>

int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int puts(const char *s);

/* Send whatever the calling vCPU has buffered, even without a newline. */
void console_flush(void);

#endif
