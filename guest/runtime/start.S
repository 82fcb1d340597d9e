/*
 * start.S - the firmware header and the vCPU entry points.
 *
 * The VMM enters every vCPU at CPL 3 in long mode with rdi = vCPU index, rsi = GPA of the
 * boot-info page and rsp = that vCPU's stack top (docs/GUEST_ABI.md).  vCPU 0 enters at
 * _start, zeroes .bss and calls main(cpu, boot_info); its return value becomes the EXIT
 * hypercall's code.  The others enter at _start_ap and call ap_main(cpu, boot_info); when it
 * returns they halt forever (there is no hlt at CPL 3: they loop on the HALT hypercall).
 */
#include "abi.h"

    .section .fw_header, "a"
    .balign 8
    .globl fw_header
fw_header:
    .quad FW_HEADER_MAGIC
    .long FW_HEADER_VERSION
    .long FW_HEADER_SIZE
    .quad __image_start
    .quad _start
    .quad _start_ap
    .quad __image_end

    .text
    .globl _start
    .type _start, @function
_start:
    xorl %ebp, %ebp
    andq $-16, %rsp
    movq %rdi, %r12             /* callee-saved: cpu */
    movq %rsi, %r13             /* callee-saved: boot_info */
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    cld
    rep stosb                   /* .bss is zero in fresh RAM; make it so whatever the VMM did */
    movq %r12, %rdi
    movq %r13, %rsi
    call main
    movl %eax, %edi
    call hc_exit                /* does not return */
1:  jmp 1b
    .size _start, . - _start

    .globl _start_ap
    .type _start_ap, @function
_start_ap:
    xorl %ebp, %ebp
    andq $-16, %rsp
    call ap_main
2:  xorl %edi, %edi
    call hc_halt
    jmp 2b
    .size _start_ap, . - _start_ap

    .section .note.GNU-stack, "", @progbits
