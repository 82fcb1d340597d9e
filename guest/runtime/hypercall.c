/*
 * hypercall.c - the hypercall wrappers (see docs/GUEST_ABI.md, "Ports").
 *
 * A hypercall fills the calling vCPU's struct hc_mailbox, then writes the number to port
 * ABI_PORT_HYPERCALL.  The `out` exits to the VMM, which handles it synchronously and writes
 * mailbox.ret before the vCPU resumes, so ret can be read straight after the `out`.
 */
#include "runtime/hypercall.h"

#include "abi.h"
#include "runtime/io.h"

static volatile struct hc_mailbox *my_mailbox(void)
{
    return (volatile struct hc_mailbox *)(uintptr_t)(ABI_MAILBOX_GPA +
                                                     (uint64_t)this_cpu() * ABI_MAILBOX_SIZE);
}

uint64_t hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2)
{
    volatile struct hc_mailbox *mb = my_mailbox();
    mb->nr = nr;
    mb->args[0] = a0;
    mb->args[1] = a1;
    mb->args[2] = a2;
    mb->ret = UINT64_MAX;
    outl(ABI_PORT_HYPERCALL, (uint32_t)nr); /* "memory" clobber: the stores above are done */
    return mb->ret;
}

void hc_exit(uint64_t code)
{
    for (;;)
        hypercall(HC_EXIT, code, 0, 0);
}

uint64_t hc_halt(uint64_t timeout_us)
{
    return hypercall(HC_HALT, timeout_us, 0, 0);
}

uint64_t hc_console(const void *buf, size_t len)
{
    return hypercall(HC_CONSOLE, (uint64_t)(uintptr_t)buf, len, 0);
}

uint64_t hc_heartbeat(uint64_t counter)
{
    stats_slot(this_cpu())->hb = counter;
    return hypercall(HC_HEARTBEAT, counter, 0, 0);
}

void halt_forever(void)
{
    for (;;)
        hc_halt(0);
}
