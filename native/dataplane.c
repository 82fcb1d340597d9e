/*
 * The shadow data plane: the per-request work of shadow mode, run by a native thread.
 *
 * While a migration shadows DMA, every request the guest makes available is forwarded from
 * the guest's ring (vCPU buffers) to a shadow ring in device buffers, and every completion is
 * synced back.  ptmig/shadow/ decides everything else -- which guest page is shadowed by which
 * pool page, the IOMMU, IOTLB invalidations, entering and leaving -- in Python.  This file does
 * only the part that runs for every request, without the interpreter:
 *
 *   forward:  read the guest's avail ring, walk and validate each chain (the walker the
 *             device paths use, virtq.c / chain.h, reading descriptors by guest-physical
 *             address: bounded length, no loops, known flags, no INDIRECT, non-zero lengths,
 *             readable before writable; and here: inside one RAM region -- never the gap
 *             between regions --, no descriptor of a request still in flight), keep a
 *             private record of it, re-encode it into the
 *             shadow table, copy every byte of the chain into the device buffers (readable
 *             bytes for the device, writable ones so the device starts from what the guest's
 *             buffer holds), publish the head, kick the device.
 *   complete: read the shadow used ring; check each element against the private record (a
 *             head in flight, used.len no larger than its writable bytes), copy the chain's
 *             whole device-writable area back -- only the pieces whose bytes differ, each
 *             guest page written marked in the DMA dirty bitmap -- write the used element
 *             with the device's len unchanged, then the used idx, wake the guest.
 *
 * Why the whole writable area: used.len is not a map of what the device wrote (the virtio 1.x
 * used-ring rules: the device writes at least len bytes from the first writable buffer and
 * may write more; the driver must not assume anything beyond the first len bytes), and
 * virtio-blk writes its status byte at the *end* of the writable bytes.  A device buffer that starts as a copy of the guest's bytes and is copied
 * back whole leaves the guest with exactly what direct DMA would: the bytes the device wrote,
 * and the guest's own bytes everywhere else.
 *
 * Nothing is read back from memory the device can write except the used ring's (id, len)
 * pairs, which are checked against the record: the shadow descriptor table and avail ring
 * are the device's to scribble on, the record (`rec`, indexed like the descriptor table) is
 * the VMM's.  A completion that does not match it -- an id not in flight, completed twice,
 * a len larger than the writable area, more completions than requests -- marks the device
 * broken, and guest memory outside the request's own buffers and its used element is never
 * written.
 *
 * Intercept mode (a device added with `intercept`, x-dma-tracking intercept): only the rings
 * have device buffers; the data buffers stay mapped to guest RAM and the device DMAs into them
 * directly.  Forwarding is the same but copies nothing except pieces of buffers that lie on a
 * ring page (those have a device buffer, and are handled as in shadow mode), and never stalls;
 * a completion copies nothing back and instead marks every page of every device-writable
 * buffer of the request dirty -- the whole writable area, for the same used.len reason as
 * above -- before the used element and idx are published to the guest.  No page references
 * are taken for data pages (they have no device buffer).  The switchover's extra step (mark
 * the writable pages of requests still in flight) is Python's (ptmig/shadow/engine.py).
 *
 * A request touching a guest page that has no device buffer yet stops its queue ("stalled"):
 * the thread signals `slow_fd`, Python maps the pages (and flushes the device's IOTLB), then
 * pokes the thread to go on.  Requests are forwarded strictly in avail order, so the k-th
 * request the guest made available is the k-th the device sees.
 *
 * All state lives in arrays owned by the Python side (numpy); this file keeps pointers to them.
 * One mutex guards everything: the thread holds it while it works, Python takes it through
 * dp_lock() before it reads or changes any of it.
 *
 * On a post-copy destination (a `present` function set with dp_set_presence: the fault
 * server's uffd_fetch) guest RAM may still lack pages that only the source has.  Before this
 * thread reads a queue's rings, and before it copies a request's buffers into device buffers,
 * it asks for every page of them and waits until they are all present (ST_FETCHED counts the
 * pages that were not): a missing page is requested from the source like a vCPU fault, with
 * priority over the background push.  Completions only write pages made present at
 * forwarding (a page never goes missing again).  The wait is bounded; a queue whose pages did
 * not come in time is left as it is (nothing forwarded, nothing failed) and retried on the
 * next pass.  Why this cannot deadlock: the thread never holds the GIL, and the pages come
 * from the fault server's own native thread, the fetcher and the page receiver, none of
 * which takes this lock; Python code waiting for this lock does so in a ctypes call, with the
 * GIL released.  (Touching a missing page without asking would still be served -- this
 * thread's fault blocks in the fault server like a vCPU's -- but one page at a time.)
 *
 * The guest is an adversary: every value read from its memory is checked before use, and a
 * violation marks the device broken (reason in `error`) -- it never touches memory outside
 * guest RAM and the device buffers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "chain.h"
#include "worker.h"

#define PAGE_SHIFT 12
#define PAGE_SIZE (1u << PAGE_SHIFT)

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u

#define MAX_DEVICES 16
#define MAX_QUEUES 8
#define ERROR_LEN 256
#define POLL_MS 50 /* safety net: look at the used rings even without an interrupt */

/* Per-device counters (a Python-owned uint64 array; indices mirrored in ptmig/shadow/native.py). */
enum {
	ST_FORWARDED,
	ST_COMPLETED,
	ST_BYTES_TO_DEVICE,
	ST_BYTES_TO_GUEST,
	ST_DOORBELLS,  /* trapped guest doorbells the thread woke for */
	ST_INTERRUPTS, /* device interrupts the thread woke for */
	ST_ACTIVE,   /* guest pages with a device buffer referenced by a request (or a ring) */
	ST_IDLE,     /* guest pages with a device buffer nobody references (kept for reuse) */
	ST_REUSED,   /* idle device buffers taken back into use (no new mapping needed) */
	ST_PEAK,     /* highest ST_ACTIVE */
	ST_STALLS,   /* requests that waited for Python to map a page */
	ST_CLOCK,    /* LRU clock: ticks each time a page becomes idle */
	ST_MARKED,   /* intercept: guest page pieces marked dirty for a device's direct writes */
	ST_FETCHED,  /* post-copy: guest pages this device's requests or rings found missing */
	ST_FETCH_WAITS, /* post-copy: waits for such pages (one per ring or request) */
	ST_WAKEUPS,  /* passes of the thread this device's doorbells or interrupts started */
	ST_KICKS,    /* doorbells rung on the device (eventfd writes) */
	ST_GUEST_IRQS, /* passes that synced this device's completions (the guest's wake-up is
			* one eventfd write per pass for every device together) */
	ST_COUNT
};

/* Per-queue positions (a Python-owned int64 array). */
enum { Q_NEXT_AVAIL, Q_NEXT_USED, Q_STALLED, Q_INFLIGHT, Q_COUNT };

/* The private record of one forwarded descriptor (a Python-owned array indexed like the
 * descriptor table; layout mirrored in ptmig/shadow/native.py REC_DTYPE, checked at load). */
struct rec {
	uint64_t addr;
	uint32_t len;
	uint16_t flags; /* DESC_F_WRITE | DESC_F_NEXT, as forwarded */
	uint16_t next;
	int32_t owner;  /* head of the in-flight chain this descriptor belongs to, or -1 */
	uint32_t wlen;  /* at a head: the chain's device-writable bytes */
};

struct dp_queue {
	struct dp_dev *dev;
	int qindex;
	uint32_t size;
	uint64_t desc_addr, avail_addr, used_addr;
	int64_t *pos;          /* Q_* */
	int32_t *head_avail;   /* [size]: avail index of the in-flight request with this head, or -1 */
	struct rec *rec;       /* [size]: every in-flight chain as forwarded (never device memory) */
	struct vq_desc *scratch;  /* [size]: one chain being forwarded or completed */
	uint16_t *scratch_index;  /* [size]: the descriptor index of each (links are our own) */
	int doorbell_fd;       /* the VMM's eventfd bound to the guest's QueueNotify */
	int kick_fd;           /* the device's doorbell */
	int pending;           /* a doorbell arrived: look at the avail ring */
	int fetching;          /* post-copy: waiting for guest pages, retried on the next pass */
};

struct dp_dev {
	struct dp_engine *eng;
	int32_t *slot;    /* [npages]: pool page shadowing this guest page, or -1 */
	int32_t *refs;    /* [npages]: requests (and rings) referencing it */
	uint32_t *stamp;  /* [npages]: when it last became idle (LRU for reclaiming) */
	uint64_t *stats;  /* ST_* */
	char *error;      /* [ERROR_LEN]: why shadowing stopped, "" while healthy */
	int irq_fd;       /* the device's interrupt eventfd */
	int intercept;    /* data buffers stay in guest RAM: only the rings are shadowed */
	int woken;        /* this pass of the thread was started by one of its fds */
	int nqueues;
	struct dp_queue queues[MAX_QUEUES];
};

struct dp_region {
	uint64_t start, end; /* guest-physical [start, end) */
};

/* The post-copy fault server's fetch (uffd.c uffd_fetch): make guest pages [pfn, +n) present;
 * how many were not, or -errno (-ETIMEDOUT: not within timeout_ms). */
typedef int64_t (*dp_present_fn)(void *ctx, uint64_t pfn, uint64_t n, int64_t timeout_ms);
/* (timeout_ms < 0: only ask for the missing pages, and return how many there were) */

struct dp_engine {
	uint8_t *guest;
	uint64_t guest_size;
	const struct dp_region *regions; /* guest RAM, ascending; the gaps between are not RAM */
	int nregions;
	uint64_t npages;
	uint8_t *pool;
	uint64_t pool_pages;
	uint64_t *dirty;  /* the DMA dirty bitmap, KVM layout: bit n%64 of word n/64 = page n */
	int guest_wake_fd;
	int slow_fd;      /* tells Python: a queue stalled, a device broke, or idle buffers piled up */
	int wake_fd;      /* tells the thread: retry stalled queues, or stop */
	int epfd;
	uint32_t idle_limit;
	dp_present_fn present; /* NULL: every page of guest RAM is here */
	void *present_ctx;
	int64_t present_timeout_ms;
	struct worker worker;
	pthread_mutex_t lock;
	int ndevs;
	struct dp_dev *devs[MAX_DEVICES];
};

/* ---- small helpers -------------------------------------------------------------------------- */

static void dev_fail(struct dp_dev *d, const char *fmt, ...)
{
	if (d->error[0])
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(d->error, ERROR_LEN, fmt, ap);
	va_end(ap);
	if (!d->error[0])
		snprintf(d->error, ERROR_LEN, "shadowing failed");
	fd_signal(d->eng->slow_fd);
}

/* Guest RAM [gpa, gpa+len), or NULL unless all of it lies in one RAM region (the gaps
 * between regions -- the MMIO window below 4 GiB -- are not RAM, though the mapping spans them). */
static uint8_t *guest_ptr(struct dp_engine *e, uint64_t gpa, uint64_t len)
{
	for (int i = 0; i < e->nregions; i++) {
		const struct dp_region *r = &e->regions[i];
		if (gpa >= r->start && gpa <= r->end && len <= r->end - gpa)
			return r->end <= e->guest_size ? e->guest + gpa : NULL;
	}
	return NULL;
}

static void mark_dirty(struct dp_engine *e, uint64_t gpa, uint64_t len)
{
	if (len == 0)
		return;
	for (uint64_t pfn = gpa >> PAGE_SHIFT; pfn <= (gpa + len - 1) >> PAGE_SHIFT; pfn++)
		e->dirty[pfn >> 6] |= 1ull << (pfn & 63);
}

/* The device buffer byte for IOVA `iova` (= GPA), or NULL if its page is not shadowed. */
static uint8_t *devbuf_ptr(struct dp_dev *d, uint64_t iova)
{
	uint64_t pfn = iova >> PAGE_SHIFT;
	if (pfn >= d->eng->npages)
		return NULL;
	int32_t s = d->slot[pfn];
	if (s < 0 || (uint64_t)s >= d->eng->pool_pages)
		return NULL;
	return d->eng->pool + ((uint64_t)s << PAGE_SHIFT) + (iova & (PAGE_SIZE - 1));
}

/* Copy between guest RAM and device buffers, page piece by page piece. */
static int devbuf_copy(struct dp_dev *d, uint64_t iova, uint8_t *mem, uint64_t len, int to_dev)
{
	while (len) {
		uint64_t off = iova & (PAGE_SIZE - 1);
		uint64_t n = PAGE_SIZE - off < len ? PAGE_SIZE - off : len;
		uint8_t *p = devbuf_ptr(d, iova);
		if (!p)
			return -1;
		if (to_dev)
			memcpy(p, mem, n);
		else
			memcpy(mem, p, n);
		iova += n;
		mem += n;
		len -= n;
	}
	return 0;
}

/* Copy guest bytes [gpa, +len) into the device buffers of their pages.  Shadow mode: every page
 * has one (-1 otherwise).  Intercept: a page without one is left alone -- the device reaches it
 * in guest RAM (identity) -- and only pieces on a ring page are copied.  Returns bytes copied. */
static int64_t copy_in(struct dp_dev *d, uint64_t gpa, uint64_t len)
{
	struct dp_engine *e = d->eng;
	int64_t copied = 0;
	while (len) {
		uint64_t n = PAGE_SIZE - (gpa & (PAGE_SIZE - 1));
		if (n > len)
			n = len;
		uint8_t *p = devbuf_ptr(d, gpa);
		if (p) {
			memcpy(p, e->guest + gpa, n);
			copied += (int64_t)n;
		} else if (!d->intercept) {
			return -1;
		}
		gpa += n;
		len -= n;
	}
	return copied;
}

static int devbuf_u16(struct dp_dev *d, uint64_t iova, uint16_t *out)
{
	return devbuf_copy(d, iova, (uint8_t *)out, 2, 0);
}

/* Post-copy: one range of guest bytes [gpa, +len) through the fault server.  `timeout_ms` < 0
 * only asks for its missing pages and returns how many there were; otherwise waits for all of
 * them (-ETIMEDOUT if they did not come in time).  A range the server refuses (cannot happen
 * for one checked against guest RAM) breaks the device: never loop on it. */
static int64_t fetch_range(struct dp_dev *d, uint64_t gpa, uint64_t len, int64_t timeout_ms)
{
	struct dp_engine *e = d->eng;
	if (len == 0)
		return 0;
	uint64_t first = gpa >> PAGE_SHIFT, last = (gpa + len - 1) >> PAGE_SHIFT;
	int64_t r = e->present(e->present_ctx, first, last - first + 1, timeout_ms);
	if (r < 0 && r != -ETIMEDOUT)
		dev_fail(d, "guest pages %llu..%llu cannot be fetched: %s", (unsigned long long)first,
			 (unsigned long long)last, strerror((int)-r));
	return r;
}

/* Post-copy: make the `n` ranges present before the thread touches them -- all asked for at
 * once, then waited for.  1 when they are (or no fault server is set), 0 if they did not
 * come in time (retry later) or cannot come (the device is then broken). */
static int fetch_ranges(struct dp_dev *d, const struct vq_desc *c, int n)
{
	if (!d->eng->present)
		return 1;
	int64_t absent = 0;
	for (int i = 0; i < n; i++) {
		int64_t r = fetch_range(d, c[i].addr, c[i].len, -1);
		if (r < 0)
			return 0;
		absent += r;
	}
	if (absent == 0)
		return 1;
	for (int i = 0; i < n; i++)
		if (fetch_range(d, c[i].addr, c[i].len, d->eng->present_timeout_ms) < 0)
			return 0;
	d->stats[ST_FETCHED] += (uint64_t)absent;
	d->stats[ST_FETCH_WAITS]++;
	return 1;
}

/* The queue's three rings present (post-copy); 0 if not yet. */
static int fetch_rings(struct dp_queue *q)
{
	const struct vq_desc rings[3] = {
		{.addr = q->desc_addr, .len = 16u * q->size},
		{.addr = q->avail_addr, .len = 6u + 2u * q->size},
		{.addr = q->used_addr, .len = 6u + 8u * q->size},
	};
	return fetch_ranges(q->dev, rings, 3);
}

/* ---- page references -------------------------------------------------------------------- */

static void page_get(struct dp_dev *d, uint64_t pfn)
{
	if (d->refs[pfn]++ == 0) {
		d->stats[ST_IDLE]--;
		if (d->stamp[pfn]) /* 0: mapped for this request, never used before */
			d->stats[ST_REUSED]++;
		if (++d->stats[ST_ACTIVE] > d->stats[ST_PEAK])
			d->stats[ST_PEAK] = d->stats[ST_ACTIVE];
	}
}

static void page_put(struct dp_dev *d, uint64_t pfn)
{
	if (d->refs[pfn] <= 0)
		return; /* cannot happen: every put matches a get */
	if (--d->refs[pfn] == 0) {
		d->stats[ST_ACTIVE]--;
		d->stats[ST_IDLE]++;
		d->stamp[pfn] = (uint32_t)++d->stats[ST_CLOCK];
	}
}

/* Apply `fn` to every guest page the descriptors touch. */
static void chain_pages(struct dp_dev *d, const struct vq_desc *c, int n,
			void (*fn)(struct dp_dev *, uint64_t))
{
	for (int i = 0; i < n; i++)
		for (uint64_t p = c[i].addr >> PAGE_SHIFT;
		     p <= (c[i].addr + c[i].len - 1) >> PAGE_SHIFT; p++)
			fn(d, p);
}

/* ---- forwarding ------------------------------------------------------------------------- */

/* The guest's chain at `head`, read by guest-physical address (the shared walker, chain.h,
 * applies the common rules): every descriptor and buffer inside one RAM region, and no
 * descriptor of a request still in flight. */
static int gpa_read_desc(void *ctx, uint32_t index, uint8_t raw[16])
{
	struct dp_queue *q = ctx;
	uint64_t gpa = q->desc_addr + 16ull * index;
	uint8_t *p = guest_ptr(q->dev->eng, gpa, 16);
	if (!p) {
		dev_fail(q->dev, "queue %d: descriptor %u at %#llx is outside guest RAM", q->qindex,
			 index, (unsigned long long)gpa);
		return -1;
	}
	memcpy(raw, p, 16);
	return 0;
}

static int gpa_accept(void *ctx, uint16_t head, uint32_t n, uint32_t index,
		      const struct vq_desc *d)
{
	struct dp_queue *q = ctx;
	if (!guest_ptr(q->dev->eng, d->addr, d->len)) {
		dev_fail(q->dev, "queue %d: descriptor %u (chain head %u) buffer %#llx+%u is outside "
			 "guest RAM", q->qindex, index, head, (unsigned long long)d->addr, d->len);
		return -1;
	}
	if (q->rec[index].owner >= 0) {
		dev_fail(q->dev, "queue %d: descriptor %u (chain head %u) belongs to the request at "
			 "head %d, still in flight", q->qindex, index, head, q->rec[index].owner);
		return -1;
	}
	q->scratch_index[n] = (uint16_t)index;
	return 0;
}

static int gpa_walk_fail(void *ctx, const char *fmt, va_list ap)
{
	struct dp_queue *q = ctx;
	char why[ERROR_LEN];
	vsnprintf(why, sizeof(why), fmt, ap);
	dev_fail(q->dev, "queue %d: %s", q->qindex, why);
	return -1;
}

/* Walk and validate the guest's chain at `head` into q->scratch. Returns its length, or -1
 * (device marked broken). */
static int walk_guest_chain(struct dp_queue *q, uint32_t head)
{
	struct chain_walker w = {.ctx = q, .size = q->size, .read_desc = gpa_read_desc,
				 .accept = gpa_accept, .fail = gpa_walk_fail};
	return vq_walk_chain(&w, (uint16_t)head, q->scratch);
}

static int chain_is_shadowed(struct dp_dev *d, const struct vq_desc *c, int n)
{
	for (int i = 0; i < n; i++)
		for (uint64_t p = c[i].addr >> PAGE_SHIFT;
		     p <= (c[i].addr + c[i].len - 1) >> PAGE_SHIFT; p++)
			if (d->slot[p] < 0)
				return 0;
	return 1;
}

/* Forward one validated chain (every page shadowed): record it, re-encode it into the shadow
 * table, copy all its bytes into the device buffers.  Returns 0, or -1 (device broken). */
static int forward_chain(struct dp_queue *q, uint32_t head, int n, uint16_t avail_index)
{
	struct dp_dev *d = q->dev;
	const struct vq_desc *c = q->scratch;
	const uint16_t *ix = q->scratch_index;
	uint64_t wlen = 0;
	if (!d->intercept)
		chain_pages(d, c, n, page_get);
	for (int i = 0; i < n; i++) {
		uint8_t raw[16];
		int last = i == n - 1;
		uint16_t flags = (uint16_t)((last ? 0 : DESC_F_NEXT) | (c[i].writable ? DESC_F_WRITE : 0));
		uint16_t next = last ? 0 : ix[i + 1];
		memcpy(raw, &c[i].addr, 8);
		memcpy(raw + 8, &c[i].len, 4);
		memcpy(raw + 12, &flags, 2);
		memcpy(raw + 14, &next, 2);
		if (devbuf_copy(d, q->desc_addr + 16ull * ix[i], raw, 16, 1) < 0)
			goto unmapped;
		/* Readable bytes for the device; writable ones as the guest's buffer holds them, so
		 * that copying the whole area back leaves unwritten bytes as they were. */
		int64_t copied = copy_in(d, c[i].addr, c[i].len);
		if (copied < 0)
			goto unmapped;
		if (c[i].writable)
			wlen += c[i].len;
		else
			d->stats[ST_BYTES_TO_DEVICE] += (uint64_t)copied;
		q->rec[ix[i]] = (struct rec){c[i].addr, c[i].len, flags, next, (int32_t)head, 0};
	}
	q->rec[head].wlen = (uint32_t)wlen; /* <= MAX_CHAIN_BYTES */
	uint16_t h = (uint16_t)head;
	if (devbuf_copy(d, q->avail_addr + 4 + 2ull * (avail_index % q->size), (uint8_t *)&h, 2, 1) < 0)
		goto unmapped;
	q->head_avail[head] = avail_index;
	q->pos[Q_INFLIGHT]++;
	d->stats[ST_FORWARDED]++;
	return 0;
unmapped:
	for (int i = 0; i < n; i++)
		q->rec[ix[i]].owner = -1;
	if (!d->intercept)
		chain_pages(d, c, n, page_put);
	dev_fail(d, "queue %d: the shadow ring is not in device buffers", q->qindex);
	return -1;
}

/* Forward every request the guest made available on `q`. Returns how many, or -1 (broken).
 * Stops early, leaving Q_STALLED set, at a request with a page that has no device buffer. */
static int forward_queue(struct dp_queue *q)
{
	struct dp_dev *d = q->dev;
	struct dp_engine *e = d->eng;
	if (d->error[0])
		return -1;
	if (q->pos[Q_STALLED])
		return 0;
	q->fetching = 0;
	if (!fetch_rings(q)) {
		q->fetching = 1;
		return 0;
	}
	uint8_t *idxp = guest_ptr(e, q->avail_addr + 2, 2);
	if (!idxp) {
		dev_fail(d, "queue %d: avail ring %#llx is outside guest RAM", q->qindex,
			 (unsigned long long)q->avail_addr);
		return -1;
	}
	uint16_t avail_idx = __atomic_load_n((uint16_t *)idxp, __ATOMIC_ACQUIRE);
	uint16_t next = (uint16_t)q->pos[Q_NEXT_AVAIL];
	uint32_t pending = (uint16_t)(avail_idx - next);
	if (pending > q->size) {
		dev_fail(d, "queue %d: avail idx %u is %u entries ahead of next_avail %u, more than "
			 "the queue size %u", q->qindex, avail_idx, pending, next, q->size);
		return -1;
	}
	int done = 0;
	for (; pending; pending--, next++) {
		uint8_t *entry = guest_ptr(e, q->avail_addr + 4 + 2ull * (next % q->size), 2);
		if (!entry) {
			dev_fail(d, "queue %d: avail ring entry outside guest RAM", q->qindex);
			return -1;
		}
		uint16_t head;
		memcpy(&head, entry, 2);
		if (head >= q->size) {
			dev_fail(d, "queue %d: avail ring entry %u (avail index %u) has head %u, out of "
				 "range for queue size %u", q->qindex, next % q->size, next, head, q->size);
			return -1;
		}
		if (q->head_avail[head] >= 0) {
			dev_fail(d, "queue %d: head %u made available again while still in flight",
				 q->qindex, head);
			return -1;
		}
		int n = walk_guest_chain(q, head);
		if (n < 0)
			return -1;
		if (!fetch_ranges(d, q->scratch, n)) {
			q->fetching = 1;
			break;
		}
		if (!d->intercept && !chain_is_shadowed(d, q->scratch, n)) {
			q->pos[Q_STALLED] = 1;
			d->stats[ST_STALLS]++;
			fd_signal(e->slow_fd);
			break;
		}
		if (forward_chain(q, head, n, next) < 0)
			return -1;
		done++;
	}
	if (done) {
		uint16_t idx = next;
		uint8_t *p = devbuf_ptr(d, q->avail_addr + 2);
		if (!p || ((q->avail_addr + 2) & (PAGE_SIZE - 1)) > PAGE_SIZE - 2) {
			dev_fail(d, "queue %d: the shadow avail ring is not in device buffers", q->qindex);
			return -1;
		}
		__atomic_store_n((uint16_t *)p, idx, __ATOMIC_RELEASE);
		q->pos[Q_NEXT_AVAIL] = next;
	}
	return done;
}

/* ---- completion ------------------------------------------------------------------------- */

/* The recorded chain at `head` into q->scratch (from the record only).  Returns its length.
 * The links were validated at forwarding (in range, no loop); the bound is only a guard. */
static int recorded_chain(struct dp_queue *q, uint32_t head)
{
	uint32_t index = head;
	for (uint32_t n = 0; n < q->size; n++) {
		const struct rec *r = &q->rec[index];
		q->scratch[n] = (struct vq_desc){r->addr, r->len, (r->flags & DESC_F_WRITE) != 0};
		q->scratch_index[n] = (uint16_t)index;
		if (!(r->flags & DESC_F_NEXT) || r->next >= q->size)
			return (int)n + 1;
		index = r->next;
	}
	return (int)q->size;
}

/* Copy a writable descriptor's device buffer back into guest RAM, only the page pieces whose
 * bytes differ; each piece copied marks its page dirty.  Intercept: a piece with no device
 * buffer was the device's to write in guest RAM directly, so its page is marked dirty whole,
 * whatever used.len says.  Returns bytes copied, or -1. */
static int64_t sync_back(struct dp_dev *d, uint64_t gpa, uint64_t len)
{
	struct dp_engine *e = d->eng;
	int64_t copied = 0;
	while (len) {
		uint64_t n = PAGE_SIZE - (gpa & (PAGE_SIZE - 1));
		if (n > len)
			n = len;
		uint8_t *src = devbuf_ptr(d, gpa);
		if (!src && !d->intercept)
			return -1;
		if (!src) {
			mark_dirty(e, gpa, n);
			d->stats[ST_MARKED]++;
		} else if (memcmp(e->guest + gpa, src, n)) {
			memcpy(e->guest + gpa, src, n);
			mark_dirty(e, gpa, n);
			copied += (int64_t)n;
		}
		gpa += n;
		len -= n;
	}
	return copied;
}

/* Sync one completion (id and len as the device reported them) from the record.  Returns 0,
 * or -1 (device broken: an element that does not match the record writes nothing). */
static int complete_one(struct dp_queue *q, uint16_t at, uint32_t head, uint32_t len)
{
	struct dp_dev *d = q->dev;
	struct dp_engine *e = d->eng;
	if (head >= q->size || q->head_avail[head] < 0) {
		dev_fail(d, "device completed head %u on queue %d, which is not in flight (unknown "
			 "or completed twice)", head, q->qindex);
		return -1;
	}
	if (len > q->rec[head].wlen) {
		dev_fail(d, "device reports used.len %u for head %u on queue %d, which has only %u "
			 "device-writable bytes", len, head, q->qindex, q->rec[head].wlen);
		return -1;
	}
	uint64_t elem_gpa = q->used_addr + 4 + 8ull * (at % q->size);
	uint8_t *g = guest_ptr(e, elem_gpa, 8);
	if (!g) {
		dev_fail(d, "queue %d: used ring %#llx is outside guest RAM", q->qindex,
			 (unsigned long long)q->used_addr);
		return -1;
	}
	int n = recorded_chain(q, head);
	for (int k = 0; k < n; k++) {
		if (!q->scratch[k].writable)
			continue;
		int64_t m = sync_back(d, q->scratch[k].addr, q->scratch[k].len);
		if (m < 0) {
			dev_fail(d, "queue %d: a completed buffer has no device buffer", q->qindex);
			return -1;
		}
		d->stats[ST_BYTES_TO_GUEST] += (uint64_t)m;
	}
	uint32_t out[2] = {head, len};
	memcpy(g, out, 8);
	mark_dirty(e, elem_gpa, 8);
	if (!d->intercept)
		chain_pages(d, q->scratch, n, page_put);
	for (int k = 0; k < n; k++)
		q->rec[q->scratch_index[k]].owner = -1;
	q->head_avail[head] = -1;
	q->pos[Q_INFLIGHT]--;
	return 0;
}

static int complete_queue(struct dp_queue *q)
{
	struct dp_dev *d = q->dev;
	struct dp_engine *e = d->eng;
	uint16_t used_idx;
	if (devbuf_u16(d, q->used_addr + 2, &used_idx) < 0) {
		dev_fail(d, "queue %d: the shadow used ring is not in device buffers", q->qindex);
		return -1;
	}
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	uint16_t next_used = (uint16_t)q->pos[Q_NEXT_USED];
	uint32_t count = (uint16_t)(used_idx - next_used);
	if (count == 0)
		return 0;
	if (count > (uint32_t)q->pos[Q_INFLIGHT]) {
		dev_fail(d, "device reports %u completions on queue %d with %lld requests in flight",
			 count, q->qindex, (long long)q->pos[Q_INFLIGHT]);
		return -1;
	}
	if (!fetch_rings(q))
		return 0; /* (forwarding fetched them already; a guard) */
	uint64_t used_ring = q->used_addr + 4;
	for (uint32_t i = 0; i < count; i++) {
		uint16_t at = (uint16_t)(next_used + i);
		uint32_t elem[2];
		if (devbuf_copy(d, used_ring + 8ull * (at % q->size), (uint8_t *)elem, 8, 0) < 0) {
			dev_fail(d, "queue %d: the shadow used ring is not in device buffers", q->qindex);
			return -1;
		}
		if (complete_one(q, at, elem[0], elem[1]) < 0)
			return -1;
	}
	uint8_t *idxp = guest_ptr(e, q->used_addr + 2, 2);
	if (!idxp) {
		dev_fail(d, "queue %d: used ring %#llx is outside guest RAM", q->qindex,
			 (unsigned long long)q->used_addr);
		return -1;
	}
	next_used = (uint16_t)(next_used + count);
	__atomic_store_n((uint16_t *)idxp, next_used, __ATOMIC_RELEASE);
	mark_dirty(e, q->used_addr + 2, 2);
	q->pos[Q_NEXT_USED] = next_used;
	d->stats[ST_COMPLETED] += count;
	return (int)count;
}

static int complete_dev(struct dp_dev *d)
{
	if (d->error[0])
		return -1;
	int done = 0;
	for (int i = 0; i < d->nqueues; i++) {
		int r = complete_queue(&d->queues[i]);
		if (r < 0)
			return -1;
		done += r;
	}
	if (d->stats[ST_IDLE] > d->eng->idle_limit)
		fd_signal(d->eng->slow_fd);
	return done;
}

/* ---- the thread ------------------------------------------------------------------------- */

#define TAG_WAKE 0
#define TAG_QUEUE 1
#define TAG_DEV 2

static uint64_t tag(void *p, int kind)
{
	return (uint64_t)(uintptr_t)p | (uint64_t)kind;
}

static void service(struct dp_engine *e, int poll_all)
{
	int synced = 0;
	for (int i = 0; i < e->ndevs; i++) {
		struct dp_dev *d = e->devs[i];
		for (int k = 0; k < d->nqueues; k++) {
			struct dp_queue *q = &d->queues[k];
			if (!q->pending && !poll_all)
				continue;
			if (forward_queue(q) > 0 && q->kick_fd >= 0) {
				fd_signal(q->kick_fd);
				d->stats[ST_KICKS]++;
			}
			/* retried when Python pokes, or on the next pass while pages are fetched */
			q->pending = q->pos[Q_STALLED] != 0 || q->fetching;
		}
		int r = complete_dev(d);
		if (r > 0) {
			synced += r;
			d->stats[ST_GUEST_IRQS]++;
		}
	}
	if (synced)
		fd_signal(e->guest_wake_fd);
}

static void *run(void *arg)
{
	struct dp_engine *e = arg;
	struct epoll_event ev[32];
	/*
	 * SCHED_BATCH, as every other task on the frame path (ptmig/net/sched.py): woken by a
	 * doorbell or a device's interrupt, this thread does not preempt the vCPU or device
	 * thread that woke it, so what they post in a burst is served in one wake-up rather than
	 * one wake-up per request.  Measured (shadow, 1 GiB kv guest at half load, 100 MiB/s,
	 * 7 pairs): the source VMM's CPU per GiB 1.68 -> 1.42, its kv p99 during pre-copy the
	 * same (9.3 / 9.4 ms).  Needs no privilege; where the policy is missing the default stays.
	 */
	struct sched_param sp = {0};
	(void)sched_setscheduler(0, SCHED_BATCH, &sp);
	for (;;) {
		int n = epoll_wait(e->epfd, ev, 32, POLL_MS);
		if (n < 0 && errno != EINTR) { /* cannot wait any more: nobody would be serviced */
			int err = errno;
			pthread_mutex_lock(&e->lock);
			for (int i = 0; i < e->ndevs; i++)
				dev_fail(e->devs[i], "the data plane thread stopped: epoll_wait: %s",
					 strerror(err));
			pthread_mutex_unlock(&e->lock);
			break;
		}
		pthread_mutex_lock(&e->lock);
		if (e->worker.stop) {
			pthread_mutex_unlock(&e->lock);
			break;
		}
		int poll_all = n <= 0;
		for (int i = 0; i < e->ndevs; i++)
			e->devs[i]->woken = 0;
		for (int i = 0; i < n; i++) {
			uint64_t t = ev[i].data.u64;
			void *p = (void *)(uintptr_t)(t & ~3ull);
			switch (t & 3) {
			case TAG_QUEUE: {
				struct dp_queue *q = p;
				fd_drain(q->doorbell_fd);
				q->pending = 1;
				q->dev->stats[ST_DOORBELLS]++;
				q->dev->stats[ST_WAKEUPS] += !q->dev->woken;
				q->dev->woken = 1;
				break;
			}
			case TAG_DEV: {
				struct dp_dev *d = p;
				fd_drain(d->irq_fd);
				d->stats[ST_INTERRUPTS]++;
				d->stats[ST_WAKEUPS] += !d->woken;
				d->woken = 1;
				break;
			}
			default:
				fd_drain(e->wake_fd);
				poll_all = 1; /* Python mapped pages for stalled queues */
				break;
			}
		}
		service(e, poll_all);
		pthread_mutex_unlock(&e->lock);
	}
	return NULL;
}

/* ---- the interface (ptmig/shadow/native.py) --------------------------------------------- */

struct dp_engine *dp_engine_new(uint8_t *guest, uint64_t guest_size,
				const struct dp_region *regions, int nregions, uint8_t *pool,
				uint64_t pool_pages, uint64_t *dirty, int guest_wake_fd, int slow_fd,
				uint32_t idle_limit)
{
	if (nregions <= 0)
		return NULL;
	struct dp_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->guest = guest;
	e->guest_size = guest_size;
	e->regions = regions;
	e->nregions = nregions;
	e->npages = guest_size >> PAGE_SHIFT;
	e->pool = pool;
	e->pool_pages = pool_pages;
	e->dirty = dirty;
	e->guest_wake_fd = guest_wake_fd;
	e->slow_fd = slow_fd;
	e->idle_limit = idle_limit;
	e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	e->epfd = epoll_create1(EPOLL_CLOEXEC);
	pthread_mutex_init(&e->lock, NULL);
	if (e->wake_fd < 0 || e->epfd < 0)
		goto fail;
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(e, TAG_WAKE)};
	if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wake_fd, &ev) < 0)
		goto fail;
	return e;
fail:
	if (e->wake_fd >= 0)
		close(e->wake_fd);
	if (e->epfd >= 0)
		close(e->epfd);
	free(e);
	return NULL;
}

struct dp_dev *dp_dev_add(struct dp_engine *e, int32_t *slot, int32_t *refs, uint32_t *stamp,
			  uint64_t *stats, char *error, int irq_fd, int intercept)
{
	if (e->ndevs >= MAX_DEVICES)
		return NULL;
	struct dp_dev *d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	*d = (struct dp_dev){.eng = e, .slot = slot, .refs = refs, .stamp = stamp, .stats = stats,
			     .error = error, .irq_fd = irq_fd, .intercept = intercept != 0};
	if (irq_fd >= 0) {
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(d, TAG_DEV)};
		if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, irq_fd, &ev) < 0) {
			free(d);
			return NULL;
		}
	}
	e->devs[e->ndevs++] = d;
	return d;
}

int dp_queue_add(struct dp_dev *d, int qindex, uint32_t size, uint64_t desc_addr,
		 uint64_t avail_addr, uint64_t used_addr, int64_t *pos, int32_t *head_avail,
		 struct rec *rec, int doorbell_fd, int kick_fd)
{
	if (d->nqueues >= MAX_QUEUES || size == 0 || (size & (size - 1)) || size > 32768)
		return -EINVAL;
	struct dp_queue *q = &d->queues[d->nqueues];
	*q = (struct dp_queue){.dev = d, .qindex = qindex, .size = size, .desc_addr = desc_addr,
			       .avail_addr = avail_addr, .used_addr = used_addr, .pos = pos,
			       .head_avail = head_avail, .rec = rec, .doorbell_fd = doorbell_fd,
			       .kick_fd = kick_fd};
	q->scratch = calloc(size, sizeof(struct vq_desc));
	q->scratch_index = calloc(size, sizeof(uint16_t));
	if (!q->scratch || !q->scratch_index) {
		free(q->scratch);
		free(q->scratch_index);
		return -ENOMEM;
	}
	if (doorbell_fd >= 0) {
		struct epoll_event ev = {.events = EPOLLIN, .data.u64 = tag(q, TAG_QUEUE)};
		if (epoll_ctl(d->eng->epfd, EPOLL_CTL_ADD, doorbell_fd, &ev) < 0) {
			int err = -errno;
			free(q->scratch);
			free(q->scratch_index);
			return err;
		}
	}
	d->nqueues++;
	return 0;
}

static struct dp_queue *find_queue(struct dp_dev *d, int qindex)
{
	for (int i = 0; i < d->nqueues; i++)
		if (d->queues[i].qindex == qindex)
			return &d->queues[i];
	return NULL;
}

/* The record's layout as compiled: its size, then the offsets of owner and wlen (Python
 * checks them against REC_DTYPE). */
int dp_rec_layout(int what)
{
	switch (what) {
	case 0:
		return (int)sizeof(struct rec);
	case 1:
		return (int)offsetof(struct rec, owner);
	case 2:
		return (int)offsetof(struct rec, wlen);
	default:
		return -1;
	}
}

/* Callers hold the lock (dp_lock) for these three. */
int dp_forward(struct dp_dev *d, int qindex)
{
	struct dp_queue *q = find_queue(d, qindex);
	return q ? forward_queue(q) : -EINVAL;
}

int dp_complete(struct dp_dev *d)
{
	return complete_dev(d);
}

void dp_fail(struct dp_dev *d, const char *reason)
{
	dev_fail(d, "%s", reason);
}

void dp_lock(struct dp_engine *e)
{
	pthread_mutex_lock(&e->lock);
}

void dp_unlock(struct dp_engine *e)
{
	pthread_mutex_unlock(&e->lock);
}

/* Post-copy: fetch guest pages through `fn` (uffd_fetch, `ctx` its server) before touching
 * them, waiting at most `timeout_ms` per range; NULL: every page is here.  Caller holds the lock. */
void dp_set_presence(struct dp_engine *e, void *fn, void *ctx, int64_t timeout_ms)
{
	e->present = (dp_present_fn)fn;
	e->present_ctx = ctx;
	e->present_timeout_ms = timeout_ms;
}

/* Retry stalled queues (after Python shadowed their pages). */
void dp_poke(struct dp_engine *e)
{
	fd_signal(e->wake_fd);
}

int dp_start(struct dp_engine *e)
{
	return worker_start(&e->worker, run, e, "shadow-dplane");
}

void dp_stop(struct dp_engine *e) { worker_stop(&e->worker, &e->lock, e->wake_fd); }

void dp_engine_free(struct dp_engine *e)
{
	if (!e)
		return;
	dp_stop(e);
	for (int i = 0; i < e->ndevs; i++) {
		for (int k = 0; k < e->devs[i]->nqueues; k++) {
			free(e->devs[i]->queues[k].scratch);
			free(e->devs[i]->queues[k].scratch_index);
		}
		free(e->devs[i]);
	}
	close(e->wake_fd);
	close(e->epfd);
	pthread_mutex_destroy(&e->lock);
	free(e);
}
