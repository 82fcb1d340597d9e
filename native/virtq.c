/*
 * virtq.c - DMA through the IOMMU, the device side of split virtqueues, and the device thread
 * (see virtq.h for the rules and the shared state).
 */
#define _GNU_SOURCE
#include "virtq.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define ENTRY_VALID 1ull
#define ENTRY_READ 2ull
#define ENTRY_WRITE 4ull
#define ENTRY_POOL 8ull

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define DESC_F_KNOWN (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT)
#define MAX_CHAIN_BYTES (64ull << 20) /* queue.py DEFAULT_MAX_TOTAL_LEN */

/* Stop the device: the guest broke a rule.  The first reason is kept; Python reports it. */
int vq_fail(struct vq_engine *e, int q, int64_t iova, int dma, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vq_vfail(e, q, iova, dma, fmt, ap);
	va_end(ap);
	return -1;
}

int vq_vfail(struct vq_engine *e, int q, int64_t iova, int dma, const char *fmt, va_list ap)
{
	if (!e->s[S_BROKEN]) {
		vsnprintf(e->error, VQ_ERROR_LEN, fmt, ap);
		e->s[S_BROKEN] = 1;
		e->s[S_FAULT_QUEUE] = q;
		e->s[S_FAULT_IOVA] = iova;
		e->s[S_FAULT_DMA] = dma;
		if (dma)
			e->s[C_DMA_FAULTS]++;
		fd_signal(e->event_fd);
	}
	return -1;
}

/* ---- DMA through the IOMMU ------------------------------------------------------------------ */

/* Where the byte at `iova` lives, if the access may touch its page; NULL (and why) if not. */
uint8_t *vq_translate(struct vq_engine *e, uint64_t iova, int write, const char **why)
{
	uint64_t pfn = iova >> VQ_PAGE_SHIFT;
	if (pfn >= e->iova_pages) {
		*why = "runs past the IOVA limit";
		return NULL;
	}
	uint64_t entry = e->iommu[pfn];
	if (!(entry & ENTRY_VALID)) {
		*why = "is not mapped";
		return NULL;
	}
	if (!(entry & (write ? ENTRY_WRITE : ENTRY_READ))) {
		*why = write ? "is not writable" : "is not readable";
		return NULL;
	}
	uint64_t off = (entry >> VQ_PAGE_SHIFT) << VQ_PAGE_SHIFT;
	uint8_t *base = (entry & ENTRY_POOL) ? e->pool : e->guest;
	uint64_t size = (entry & ENTRY_POOL) ? e->pool_size : e->guest_size;
	if (!base || off >= size || size - off < VQ_PAGE_SIZE) {
		*why = "maps outside its target memory";
		return NULL;
	}
	return base + off + (iova & (VQ_PAGE_SIZE - 1));
}

/* May the device access every page of [iova, iova+len)?  0, or -1 after vq_fail(). */
int vq_dma_check(struct vq_engine *e, int q, uint64_t iova, uint64_t len, int write)
{
	const char *why = NULL;
	if (len == 0)
		return 0;
	if (iova + len < iova)
		return vq_fail(e, q, (int64_t)iova, 1, "DMA at IOVA %#llx+%llu wraps the address "
			       "space", (unsigned long long)iova, (unsigned long long)len);
	for (uint64_t pos = iova & ~(VQ_PAGE_SIZE - 1); pos < iova + len; pos += VQ_PAGE_SIZE) {
		if (!vq_translate(e, pos < iova ? iova : pos, write, &why))
			return vq_fail(e, q, (int64_t)iova, 1, "DMA %s IOVA %#llx (+%llu): page %#llx "
				       "%s", write ? "to" : "from", (unsigned long long)iova,
				       (unsigned long long)len,
				       (unsigned long long)(pos >> VQ_PAGE_SHIFT), why);
	}
	return 0;
}

/* Mark the guest pages of a host range written (pool pages are not guest pages). */
void vq_log_written(struct vq_engine *e, const uint8_t *p, uint64_t len)
{
	if (!e->log || !e->s[S_LOG_ON] || !len || p < e->guest || p >= e->guest + e->guest_size)
		return;
	uint64_t first = (uint64_t)(p - e->guest) >> VQ_PAGE_SHIFT;
	uint64_t last = ((uint64_t)(p - e->guest) + len - 1) >> VQ_PAGE_SHIFT;
	for (uint64_t page = first; page <= last; page++)
		__atomic_fetch_or(&e->log[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
}

/* Check every page first, then copy page by page: a fault touches nothing.  An access within
 * one page (ring fields, most frames) is translated once. */
int vq_dma(struct vq_engine *e, int q, uint64_t iova, void *buf, uint64_t len, int write)
{
	const char *why = NULL;
	uint8_t *b = buf;
	if (len && (iova & (VQ_PAGE_SIZE - 1)) + len <= VQ_PAGE_SIZE) {
		uint8_t *p = vq_translate(e, iova, write, &why);
		if (!p)
			return vq_dma_check(e, q, iova, len, write); /* fails, saying why */
		if (write) {
			memcpy(p, b, len);
			vq_log_written(e, p, len);
		} else {
			memcpy(b, p, len);
		}
		return 0;
	}
	if (vq_dma_check(e, q, iova, len, write))
		return -1;
	for (uint64_t done = 0; done < len;) {
		uint64_t at = iova + done;
		uint64_t n = VQ_PAGE_SIZE - (at & (VQ_PAGE_SIZE - 1));
		if (n > len - done)
			n = len - done;
		uint8_t *p = vq_translate(e, at, write, &why);
		if (!p) /* the owner unmapped it under us without waiting for an invalidation */
			return vq_fail(e, q, (int64_t)at, 1, "IOVA page %#llx changed during a DMA",
				       (unsigned long long)(at >> VQ_PAGE_SHIFT));
		if (write) {
			memcpy(p, b + done, n);
			vq_log_written(e, p, n);
		} else {
			memcpy(b + done, p, n);
		}
		done += n;
	}
	return 0;
}

/* A ring index the driver may be writing while we read it (avail idx): one 16-bit load.  A
 * copy through memcpy() may read its two bytes apart (glibc's 2-byte copy loads the last byte
 * on its own), and a device thread preempted between them while the driver crossed a multiple
 * of 256 read an index 165 entries past the driver's, took it for a hostile ring and broke the
 * queue.  Rings are 2-byte aligned (virtio 1.x 2.7); an odd address gets the plain copy. */
static int rd16(struct vq_engine *e, int q, uint64_t iova, uint16_t *v)
{
	const char *why = NULL;
	uint8_t *p = (iova & 1) ? NULL : vq_translate(e, iova, 0, &why);
	if (p) {
		*v = __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
		return 0;
	}
	uint8_t b[2];
	if (vq_dma(e, q, iova, b, 2, 0))
		return -1;
	*v = (uint16_t)(b[0] | b[1] << 8);
	return 0;
}

/* A ring index the driver may be reading while we write it (used idx): one 16-bit store. */
static int wr16(struct vq_engine *e, int q, uint64_t iova, uint16_t v)
{
	const char *why = NULL;
	uint8_t *p = (iova & 1) ? NULL : vq_translate(e, iova, 1, &why);
	if (p) {
		__atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
		vq_log_written(e, p, 2);
		return 0;
	}
	uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
	return vq_dma(e, q, iova, b, 2, 1);
}

/* ---- the split ring ------------------------------------------------------------------------- */

/* The next avail head: 0, 1 when there is none, -1 on a fault. */
int vq_pop(struct vq_engine *e, int q, uint16_t *head)
{
	uint32_t size = (uint32_t)VQ(e, q, Q_SIZE);
	uint16_t next = (uint16_t)VQ(e, q, Q_NEXT_AVAIL), idx, h;
	if (rd16(e, q, (uint64_t)VQ(e, q, Q_AVAIL) + 2, &idx))
		return -1;
	uint16_t ahead = (uint16_t)(idx - next);
	if (ahead == 0)
		return 1;
	if (ahead > size)
		return vq_fail(e, q, -1, 0, "avail idx %u is %u entries ahead of next_avail %u, more "
			       "than the queue size %u", idx, ahead, next, size);
	__atomic_thread_fence(__ATOMIC_ACQUIRE); /* the entry after the idx that covers it */
	if (rd16(e, q, (uint64_t)VQ(e, q, Q_AVAIL) + 4 + 2ull * (next % size), &h))
		return -1;
	VQ(e, q, Q_NEXT_AVAIL) = (uint16_t)(next + 1); /* consumed even if its chain is bad */
	if (h >= size)
		return vq_fail(e, q, -1, 0, "avail ring entry %u (avail index %u) has head %u, out "
			       "of range for queue size %u", next % size, next, h, size);
	*head = h;
	return 0;
}

static int walk_fail(const struct chain_walker *w, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static int walk_fail(const struct chain_walker *w, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	w->fail(w->ctx, fmt, ap);
	va_end(ap);
	return -1;
}

int vq_walk_chain(const struct chain_walker *w, uint16_t head, struct vq_desc *c)
{
	uint64_t total = 0;
	uint32_t n = 0;
	int seen_writable = 0;
	uint32_t index = head;
	for (;;) {
		if (n >= w->size)
			return walk_fail(w, "chain at head %u is longer than %u descriptors (a loop in "
					 "the next links?)", head, w->size);
		uint8_t raw[16];
		if (w->read_desc(w->ctx, index, raw))
			return -1;
		uint64_t addr;
		uint32_t len;
		uint16_t flags, nxt;
		memcpy(&addr, raw, 8);
		memcpy(&len, raw + 8, 4);
		memcpy(&flags, raw + 12, 2);
		memcpy(&nxt, raw + 14, 2);
		if (flags & ~DESC_F_KNOWN)
			return walk_fail(w, "descriptor %u (chain head %u) flags=%#x has reserved bits "
					 "set", index, head, flags);
		if (flags & DESC_F_INDIRECT)
			return walk_fail(w, "descriptor %u (chain head %u) is INDIRECT but "
					 "VIRTIO_F_INDIRECT_DESC was not negotiated", index, head);
		if (len == 0)
			return walk_fail(w, "descriptor %u (chain head %u) has length 0", index, head);
		if (addr > (uint64_t)0 - len) /* ends past 2^64 (ending exactly there is fine) */
			return walk_fail(w, "descriptor %u (chain head %u) buffer %#llx+%u wraps the "
					 "address space", index, head, (unsigned long long)addr, len);
		total += len;
		if (total > MAX_CHAIN_BYTES)
			return walk_fail(w, "chain at head %u describes more than %llu bytes", head,
					 (unsigned long long)MAX_CHAIN_BYTES);
		int writable = !!(flags & DESC_F_WRITE);
		if (seen_writable && !writable)
			return walk_fail(w, "descriptor %u (chain head %u) is device-readable after a "
					 "device-writable descriptor", index, head);
		seen_writable |= writable;
		c[n] = (struct vq_desc){addr, len, writable};
		if (w->accept && w->accept(w->ctx, head, n, index, &c[n]))
			return -1;
		n++;
		if (!(flags & DESC_F_NEXT))
			return (int)n;
		if (nxt >= w->size)
			return walk_fail(w, "descriptor %u next=%u out of range for queue size %u "
					 "(chain head %u)", index, nxt, w->size, head);
		index = nxt;
	}
}

/* The device side: descriptors read through the IOMMU (a fault fails the device there). */
struct iova_walk {
	struct vq_engine *e;
	int q;
	uint64_t table;
};

static int iova_read_desc(void *ctx, uint32_t index, uint8_t raw[16])
{
	struct iova_walk *w = ctx;
	return vq_dma(w->e, w->q, w->table + 16ull * index, raw, 16, 0);
}

static int iova_walk_fail(void *ctx, const char *fmt, va_list ap)
{
	struct iova_walk *w = ctx;
	return vq_vfail(w->e, w->q, -1, 0, fmt, ap);
}

/* Walk and validate the chain at `head` into c[] (room for the queue size); its length. */
int vq_walk(struct vq_engine *e, int q, uint16_t head, struct vq_desc *c)
{
	struct iova_walk ctx = {e, q, (uint64_t)VQ(e, q, Q_DESC)};
	struct chain_walker w = {.ctx = &ctx, .size = (uint32_t)VQ(e, q, Q_SIZE),
				 .read_desc = iova_read_desc, .fail = iova_walk_fail};
	return vq_walk_chain(&w, head, c);
}

/* A chain this pass finished (at most VQ_PASS_LIMIT per pass); vq_service_queues returns it. */
void vq_complete(struct vq_engine *e, uint16_t head, uint32_t len)
{
	e->done[e->ndone++] = (struct vq_used){head, len};
}

/* Return the pass's finished chains: every used element, then the used idx once.  If an
 * element cannot be written, none is published (as SplitQueue.push_used_many).  The number
 * returned, or -1 after vq_fail(). */
static int publish(struct vq_engine *e, int q)
{
	uint32_t size = (uint32_t)VQ(e, q, Q_SIZE);
	uint16_t next = (uint16_t)VQ(e, q, Q_NEXT_USED);
	int n = e->ndone;
	e->ndone = 0;
	for (int i = 0; i < n; i++) {
		uint8_t elem[8];
		uint32_t id = e->done[i].head, len = e->done[i].len;
		memcpy(elem, &id, 4);
		memcpy(elem + 4, &len, 4);
		uint64_t at = (uint64_t)VQ(e, q, Q_USED) + 4 + 8ull * ((uint16_t)(next + i) % size);
		if (vq_dma(e, q, at, elem, 8, 1))
			return -1;
	}
	uint16_t idx = (uint16_t)(next + n);
	__atomic_thread_fence(__ATOMIC_RELEASE); /* elements before the idx that covers them */
	if (wr16(e, q, (uint64_t)VQ(e, q, Q_USED) + 2, idx))
		return -1;
	VQ(e, q, Q_NEXT_USED) = idx;
	return n;
}

/* Run `pass` on every pending ready queue, return what it finished (even when it faulted:
 * requests finished before a fault are still returned to the driver) and raise one interrupt.
 * A queue stays pending only when its pass says work is left.  Returns 1 when work is left. */
int vq_service_queues(struct vq_engine *e, int (*pass)(struct vq_engine *, int q, int *more))
{
	int more = 0, completed = 0;
	if (!e->s[S_ENABLED] || e->s[S_BROKEN])
		return 0;
	for (int q = 0; q < e->nqueues; q++) {
		if (!e->pending[q] || !VQ(e, q, Q_READY))
			continue;
		int m = 0;
		e->ndone = 0;
		int r = pass(e, q, &m);
		int done = e->ndone ? publish(e, q) : 0;
		if (done < 0)
			r = -1;
		else
			completed += done;
		if (r < 0)
			break;
		e->pending[q] = m;
		more |= m;
	}
	if (completed) {
		e->s[C_REQUESTS] += completed;
		e->s[S_ISR] |= 1;
		e->s[C_INTERRUPTS]++;
		fd_signal(e->irq_fd);
	}
	return more && !e->s[S_BROKEN];
}

/* ---- the thread ------------------------------------------------------------------------------ */

enum { TAG_WAKE = VQ_MAX_QUEUES, TAG_EXTRA };

static void *run(void *arg)
{
	struct vq_engine *e = arg;
	struct epoll_event ev[8];
	int more = 0;
	for (;;) {
		int n = epoll_wait(e->epfd, ev, 8, more ? 0 : -1);
		if (n < 0 && errno != EINTR) { /* cannot wait: the device can do nothing */
			int err = errno;
			pthread_mutex_lock(&e->lock);
			vq_fail(e, -1, -1, 0, "the device thread stopped: epoll_wait: %s",
				strerror(err));
			pthread_mutex_unlock(&e->lock);
			break;
		}
		pthread_mutex_lock(&e->lock);
		if (e->worker.stop) {
			pthread_mutex_unlock(&e->lock);
			break;
		}
		for (int i = 0; i < n; i++) {
			uint32_t tag = ev[i].data.u32;
			if (tag < VQ_MAX_QUEUES) {
				fd_drain(e->doorbell_fd[tag]);
				e->pending[tag] = 1;
				e->s[C_DOORBELLS]++;
			} else if (tag == TAG_EXTRA) {
				e->ops->readable(e);
			} else {
				fd_drain(e->wake_fd);
				for (int q = 0; q < e->nqueues; q++) /* Python changed something */
					e->pending[q] = 1;
			}
		}
		more = e->ops->service(e);
		pthread_mutex_unlock(&e->lock);
	}
	return NULL;
}

int vq_init(struct vq_engine *e, const struct vq_ops *ops, uint8_t *guest, uint64_t guest_size,
	    uint8_t *pool, uint64_t pool_size, const uint64_t *iommu, uint64_t iova_pages,
	    int64_t *shared, char *error, int nqueues, const int *doorbells, int irq_fd,
	    int event_fd, int wake_fd, int extra_fd)
{
	if (nqueues < 1 || nqueues > VQ_MAX_QUEUES)
		return -1;
	*e = (struct vq_engine){.ops = ops, .guest = guest, .guest_size = guest_size, .pool = pool,
				.pool_size = pool_size, .iommu = iommu, .iova_pages = iova_pages,
				.s = shared, .error = error, .nqueues = nqueues, .irq_fd = irq_fd,
				.event_fd = event_fd, .wake_fd = wake_fd, .extra_fd = extra_fd};
	e->chain = calloc(VQ_MAX_SIZE, sizeof(*e->chain));
	e->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (!e->chain || e->epfd < 0 || pthread_mutex_init(&e->lock, NULL))
		goto fail;
	for (int q = 0; q < nqueues; q++)
		e->doorbell_fd[q] = doorbells[q];
	for (uint32_t tag = 0; tag <= TAG_EXTRA; tag++) {
		int fd = tag < VQ_MAX_QUEUES ? (tag < (uint32_t)nqueues ? doorbells[tag] : -1)
					     : tag == TAG_WAKE ? wake_fd : extra_fd;
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = tag};
		if (fd >= 0 && epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev))
			goto fail_locked;
	}
	return 0;
fail_locked:
	pthread_mutex_destroy(&e->lock);
fail:
	if (e->epfd >= 0)
		close(e->epfd);
	free(e->chain);
	return -1;
}

int vq_start(struct vq_engine *e) { return worker_start(&e->worker, run, e, "ptmig-device"); }

void vq_stop(struct vq_engine *e) { worker_stop(&e->worker, &e->lock, e->wake_fd); }

void vq_destroy(struct vq_engine *e)
{
	vq_stop(e);
	free(e->chain);
	close(e->epfd);
	pthread_mutex_destroy(&e->lock);
}

/* ---- the interface every device library exports (ptmig/devices/nativepath.py) ------------- */

/* The shared array's layout as compiled: Python checks it against its own copy. */
int vq_layout(int what)
{
	switch (what) {
	case 0: return Q_STRIDE;
	case 1: return VQ_MAX_QUEUES;
	case 2: return S_ENABLED;
	case 3: return C_DEVICE;
	default: return -1;
	}
}

void vq_lock(struct vq_engine *e) { pthread_mutex_lock(&e->lock); }
void vq_unlock(struct vq_engine *e) { pthread_mutex_unlock(&e->lock); }

/* Under the lock: the DMA write log bitmap (NULL while logging is off). */
void vq_set_log(struct vq_engine *e, uint8_t *log) { e->log = log; }

/* Under the lock: the thread re-reads every ring after Python changed the state. */
void vq_poke(struct vq_engine *e) { fd_signal(e->wake_fd); }

/* Under the lock, with the thread not started: one pass on the caller's thread, as if every
 * doorbell had rung and the device's own fd were readable (tests drive a device step by
 * step).  Returns 1 when work is left. */
int vq_run_once(struct vq_engine *e)
{
	for (int q = 0; q < e->nqueues; q++)
		e->pending[q] = 1;
	if (e->extra_fd >= 0)
		e->ops->readable(e);
	return e->ops->service(e);
}
