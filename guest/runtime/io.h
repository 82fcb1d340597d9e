/*
 * io.h - the few instructions the firmware needs that C cannot express: port I/O, MMIO
 * accesses the VMM can decode, rdtsc, pause, and the current vCPU index.
 *
 * MMIO accessors use one plain `mov` each so that an access to a virtio-mmio window exits to
 * the VMM as a single, simply-decoded KVM_EXIT_MMIO of the right width.
 */
#ifndef PTMIG_RUNTIME_IO_H
#define PTMIG_RUNTIME_IO_H

#include <stdint.h>

#include "abi.h"

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

static inline uint8_t mmio_read8(uint64_t addr)
{
    uint8_t value;
    __asm__ volatile("movb (%1), %0" : "=q"(value) : "r"(addr) : "memory");
    return value;
}

static inline uint16_t mmio_read16(uint64_t addr)
{
    uint16_t value;
    __asm__ volatile("movw (%1), %0" : "=r"(value) : "r"(addr) : "memory");
    return value;
}

static inline uint32_t mmio_read32(uint64_t addr)
{
    uint32_t value;
    __asm__ volatile("movl (%1), %0" : "=r"(value) : "r"(addr) : "memory");
    return value;
}

static inline void mmio_write8(uint64_t addr, uint8_t value)
{
    __asm__ volatile("movb %0, (%1)" : : "q"(value), "r"(addr) : "memory");
}

static inline void mmio_write16(uint64_t addr, uint16_t value)
{
    __asm__ volatile("movw %0, (%1)" : : "r"(value), "r"(addr) : "memory");
}

static inline void mmio_write32(uint64_t addr, uint32_t value)
{
    __asm__ volatile("movl %0, (%1)" : : "r"(value), "r"(addr) : "memory");
}

/* Read the time-stamp counter (usable at CPL 3: the VMM leaves CR4.TSD clear). */
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Spin-loop hint; also a compiler barrier. */
static inline void cpu_pause(void)
{
    __asm__ volatile("pause" : : : "memory");
}

/* Compiler-only barrier. */
static inline void barrier(void)
{
    __asm__ volatile("" : : : "memory");
}

/*
 * The index of the running vCPU, derived from the stack pointer: vCPU n runs on
 * [ABI_STACK_BASE_GPA + n*ABI_STACK_SIZE, ABI_STACK_BASE_GPA + (n+1)*ABI_STACK_SIZE).
 */
static inline unsigned this_cpu(void)
{
    uint64_t sp;
    __asm__ volatile("movq %%rsp, %0" : "=r"(sp));
    return (unsigned)((sp - ABI_STACK_BASE_GPA) / ABI_STACK_SIZE);
}

/* This vCPU's statistics slot (struct vcpu_stats) in the statistics page. */
static inline volatile struct vcpu_stats *stats_slot(unsigned cpu)
{
    return (volatile struct vcpu_stats *)(uintptr_t)(ABI_STATS_GPA +
                                                     (uint64_t)cpu * ABI_STATS_SLOT_SIZE);
}

/* The workload area (2 KiB after the per-vCPU slots). */
static inline void *workload_area(void)
{
    return (void *)(uintptr_t)ABI_WORKLOAD_STATS_GPA;
}

#endif
