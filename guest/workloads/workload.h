/*
 * workload.h - what a workload provides, and the table main.c chooses from by the first word
 * of the command line.
 *
 * setup() runs on vCPU 0 before the APs are released (parse arguments, lay out memory, write
 * the workload report); run() then runs on every vCPU.  vCPU 0's run() return value is the
 * VM's exit code; an AP's return value is ignored and the AP halts forever.
 */
#ifndef PTMIG_WORKLOADS_WORKLOAD_H
#define PTMIG_WORKLOADS_WORKLOAD_H

#include "abi.h"
#include "runtime/cmdline.h"

/* Exit codes used by every workload. */
#define EXIT_OK 0
#define EXIT_FAILED 1    /* the workload ran and found something wrong */
#define EXIT_BAD_ARGS 2  /* bad command line */
#define EXIT_BAD_BOOT 3  /* bad boot_info from the VMM */

struct workload {
    const char *name;
    const char *usage;          /* "name key=value ..." shown on errors */
    const char *const *keys;    /* NULL-terminated list of accepted keys */
    int (*setup)(const struct boot_info *bi, const struct cmdline *c); /* may be NULL */
    int (*run)(unsigned cpu, const struct boot_info *bi);
};

extern const struct workload workload_hello;
extern const struct workload workload_dirty;
extern const struct workload workload_storebw;
extern const struct workload workload_kv;
extern const struct workload workload_blkbench;
extern const struct workload workload_blkverify;

#endif
