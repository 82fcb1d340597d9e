/*
 * hypercall.h - calls into the VMM through the per-vCPU mailbox and port ABI_PORT_HYPERCALL.
 */
#ifndef PTMIG_RUNTIME_HYPERCALL_H
#define PTMIG_RUNTIME_HYPERCALL_H

#include <stddef.h>
#include <stdint.h>

/* Generic hypercall: fills this vCPU's mailbox, writes nr to the port, returns mailbox.ret. */
uint64_t hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2);

/* End the VM with an exit code (vCPU 0's main() return value goes here). */
__attribute__((noreturn)) void hc_exit(uint64_t code);

/* Sleep until a device interrupt, a VMM wake-up or timeout_us (0: no timeout).
 * Returns 0 when woken, 1 on timeout. */
uint64_t hc_halt(uint64_t timeout_us);

/* Write len bytes at buf (an identity-mapped GPA) to the VM console; returns bytes written. */
uint64_t hc_console(const void *buf, size_t len);

/* Liveness ping; also recorded in this vCPU's stats slot (hb). */
uint64_t hc_heartbeat(uint64_t counter);

/* Halt forever (what APs do when they have nothing to run). */
__attribute__((noreturn)) void halt_forever(void);

#endif
