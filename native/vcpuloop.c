/*
 * vcpuloop.c - a vCPU's KVM_RUN loop with the guest's halt hypercall served in C.
 *
 * A guest with nothing to do halts through its mailbox (HC_HALT: an OUT to the hypercall port
 * with the timeout in args[0]), and the VMM waits for a device interrupt (one of the VM's
 * wake eventfds), a kick, or the timeout. Served in Python, every wake-up takes the GIL twice
 * (to finish the OUT, then to enter KVM_RUN again), so while a migration thread holds the GIL
 * the guest's next request waits behind it; and since pre-copy threads run at a higher nice
 * value, behind a thread the scheduler is in no hurry to run. `vl_run` is called with the GIL
 * released (ctypes) and keeps it released across KVM_RUN, the halt's wait and the next
 * KVM_RUN: a halted guest that an interrupt wakes is back in guest mode without Python.
 *
 * It returns to Python for everything else:
 *   VL_EXIT   KVM_RUN returned an exit other than the halt hypercall; kvm_run holds it, as
 *             after a plain KVM_RUN (the caller dispatches it).
 *   VL_KICKED a halt was served and its wait ended on the kick eventfd (a pause, a stop, or a
 *             change of the wake sources), or immediate_exit was already set: the OUT is
 *             still to be completed by the next KVM_RUN, and the caller re-reads its state
 *             (pause request, wake sources) before it.
 *   -errno    KVM_RUN failed (EINTR / EAGAIN: a kick's signal or immediate_exit).
 *
 * The halt's reply (the mailbox's `ret`: 0 woken, 1 timed out) is a VMM write to guest RAM
 * that KVM's dirty log does not see; `mailbox_writes` counts them, and the VMM marks the
 * mailbox's page dirty whenever the count moved since its last harvest (a write after the
 * count was read is counted for the next harvest, and the last harvest runs with the vCPUs
 * paused). The timeout comes from the guest: any value is accepted (clamped to a day;
 * 0 = no timeout), none can make the loop fail.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kvm.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define VL_EXIT 0
#define VL_KICKED 1
#define VL_MAX_FDS 64

/* The guest ABI (ptmig/layout.py, guest/abi.h): mailbox = nr, args[6], ret (u64 each). */
#define MB_ARG0 8
#define MB_RET 56
#define MAX_TIMEOUT_US (86400ULL * 1000000ULL)

struct vl_vcpu {
	int32_t vcpu_fd;
	int32_t kick_fd;
	uint64_t run;            /* address of the mmap'd struct kvm_run */
	uint64_t mailbox;        /* host address of this vCPU's mailbox in guest RAM */
	uint32_t port;           /* the hypercall port */
	uint32_t halt_nr;        /* HC_HALT */
	uint64_t halts;          /* halts served here (the caller moves them to its counters) */
	uint64_t mailbox_writes; /* replies written into the mailbox, ever */
};

static int is_halt(const struct vl_vcpu *v, const struct kvm_run *run)
{
	uint32_t nr;

	if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
	    run->io.port != v->port || run->io.size != 4 || run->io.count != 1)
		return 0;
	memcpy(&nr, (const char *)run + run->io.data_offset, 4);
	return nr == v->halt_nr;
}

/* One read takes an eventfd's whole count; another vCPU may have taken it first, and a fd
 * that is not non-blocking must not block this one, so never a second read. */
static void drain(int fd)
{
	uint64_t value;
	ssize_t n = read(fd, &value, sizeof value);

	(void)n;
}

/* Wait for a wake fd, the kick fd or the timeout; 1 if the kick (or a signal) ended it. */
static int halt_wait(struct vl_vcpu *v, const int32_t *fds, int nfds, uint64_t timeout_us,
		     uint64_t *woken)
{
	struct pollfd p[VL_MAX_FDS + 1];
	struct timespec ts, *tsp = NULL;
	int i, n, kicked = 0;

	for (i = 0; i < nfds; i++) {
		p[i].fd = fds[i];
		p[i].events = POLLIN;
		p[i].revents = 0;
	}
	p[nfds].fd = v->kick_fd;
	p[nfds].events = POLLIN;
	p[nfds].revents = 0;
	if (timeout_us) {
		if (timeout_us > MAX_TIMEOUT_US)
			timeout_us = MAX_TIMEOUT_US;
		ts.tv_sec = (time_t)(timeout_us / 1000000);
		ts.tv_nsec = (long)(timeout_us % 1000000) * 1000;
		tsp = &ts;
	}
	n = ppoll(p, (nfds_t)nfds + 1, tsp, NULL);
	if (n < 0) {
		*woken = 0; /* a signal: as Python's wait, the kick it came with ends the halt */
		return 1;
	}
	for (i = 0; i <= nfds; i++) {
		if (p[i].revents & POLLIN)
			drain(p[i].fd);
	}
	kicked = (p[nfds].revents & POLLIN) != 0;
	*woken = n > 0;
	return kicked;
}

int vl_run(struct vl_vcpu *v, const int32_t *fds, int nfds)
{
	struct kvm_run *run = (struct kvm_run *)(uintptr_t)v->run;
	volatile uint64_t *ret = (volatile uint64_t *)(uintptr_t)(v->mailbox + MB_RET);
	uint64_t timeout_us, woken;
	int kicked;

	if (nfds < 0 || nfds > VL_MAX_FDS)
		return -EINVAL;
	for (;;) {
		if (ioctl(v->vcpu_fd, KVM_RUN, 0) < 0)
			return -errno;
		if (!is_halt(v, run))
			return VL_EXIT;
		v->halts++;
		memcpy(&timeout_us, (const char *)(uintptr_t)(v->mailbox + MB_ARG0), 8);
		if (__atomic_load_n(&run->immediate_exit, __ATOMIC_ACQUIRE)) {
			kicked = 1; /* a pause is waiting: do not sleep */
			woken = 1;
		} else {
			kicked = halt_wait(v, fds, nfds, timeout_us, &woken);
		}
		*ret = woken ? 0 : 1;
		__atomic_add_fetch(&v->mailbox_writes, 1, __ATOMIC_RELEASE);
		if (kicked)
			return VL_KICKED;
	}
}

/* The count of mailbox replies, read with the ordering the harvest needs. */
uint64_t vl_mailbox_writes(const struct vl_vcpu *v)
{
	return __atomic_load_n(&v->mailbox_writes, __ATOMIC_ACQUIRE);
}
