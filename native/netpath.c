/*
 * The virtio-net frame path of a net device process, run by a native thread.
 *
 * A net device moves every frame of the VM: at the kv benchmark's rate that is tens of
 * thousands of frames a second, and the interpreter's share of each (ring parsing, IOMMU
 * translation, copies, wake-ups) made the Python device the busiest process on the host.  This
 * file does the per-frame part; ptmig/devices/process.py keeps everything else: the register
 * file, feature negotiation, queue setup, admin commands (reset, quiesce, state, IOTLB, DMA
 * write log), backend keepalives.  ptmig/devices/netnative.py is its Python side.
 *
 *   TX (queue 1):  walk and validate the chain, gather the device-readable bytes after the
 *                  12-byte virtio_net_hdr_v1, write the frame to the backend fd.
 *   RX (queue 0):  read frames from the backend fd into a bounded backlog; place the oldest
 *                  into the next posted buffer behind a header with num_buffers = 1.
 *
 * The rules are those of ptmig/devices/virtio/queue.py (the reference parser) and
 * ptmig/devices/net.py: avail idx at most `size` ahead, heads and next links below the size,
 * chains at most `size` long (no loops), known flags only, no INDIRECT, non-zero lengths, no
 * wrap of the address space, at most 64 MiB per chain, readable before writable, a TX chain of
 * at least the header.  Every access, ring or buffer, is translated page by page through the
 * IOMMU table (read live: this device keeps no IOTLB, so an invalidation is exact as soon as
 * Python holds the lock), and a write touches nothing unless every page of it may be written.
 * A violation stops the device: `broken` is set with the reason, Python is told through
 * `event_fd`, marks the device DEVICE_NEEDS_RESET and reports it.  Nothing the guest or the
 * network sends can make this code touch memory the IOMMU does not allow.
 *
 * All state shared with Python (queue geometry and positions, counters, flags) lives in one
 * int64 array Python owns; one mutex guards it and the backlog.  The thread holds it while it
 * works, Python takes it (np_lock) around every control command, so a command never sees a
 * frame half done.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define PAGE_SHIFT 12
#define PAGE_SIZE (1ull << PAGE_SHIFT)

#define ENTRY_VALID 1ull
#define ENTRY_READ 2ull
#define ENTRY_WRITE 4ull
#define ENTRY_POOL 8ull

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define DESC_F_KNOWN (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT)
#define MAX_CHAIN_BYTES (64ull << 20) /* queue.py DEFAULT_MAX_TOTAL_LEN */
#define MAX_QUEUE_SIZE 32768

#define NET_HDR 12
#define MAX_FRAME 65535   /* net.py MAX_FRAME */
#define RX_BACKLOG 256    /* net.py RX_BACKLOG */
#define PASS_LIMIT 256    /* frames per queue per pass: the lock is released between passes */
#define ERROR_LEN 256

enum { RXQ = 0, TXQ = 1, NQ = 2 };

/* The shared int64 array (indices mirrored in ptmig/devices/netnative.py). */
enum {
	/* per queue q, at QBASE + q * QSTRIDE */
	Q_READY, Q_SIZE, Q_DESC, Q_AVAIL, Q_USED, Q_NEXT_AVAIL, Q_NEXT_USED, QSTRIDE,
	QBASE = 0,
	/* flags Python sets */
	S_ENABLED = QBASE + NQ * QSTRIDE, /* driver ok, not quiesced, not broken */
	S_LOG_ON,         /* DMA write logging: mark written guest pages in the log bitmap */
	/* flags the thread sets */
	S_BROKEN,         /* a fault stopped the device; the reason is in `error` */
	S_FAULT_QUEUE,
	S_FAULT_IOVA,     /* -1 when the fault was a ring rule, not a DMA */
	S_FAULT_DMA,      /* 1: an IOMMU fault, 0: a ring rule */
	S_ISR,            /* InterruptStatus bits raised since Python last folded them in */
	S_LINK_DOWN,      /* the backend hung up */
	/* counters */
	C_TX_FRAMES, C_TX_BYTES, C_TX_DROPPED, C_RX_FRAMES, C_RX_BYTES,
	C_RX_DROPPED_NO_BUFFER, C_RX_DROPPED_TOO_BIG, C_RX_CONTROL,
	C_REQUESTS, C_INTERRUPTS, C_DOORBELLS, C_DMA_FAULTS, C_RX_BACKLOG,
	S_COUNT
};

struct desc {
	uint64_t addr;
	uint32_t len;
	int writable;
};

struct frame {
	uint8_t *data;
	uint32_t len, cap;
};

struct np_dev {
	uint8_t *guest;
	uint64_t guest_size;
	uint8_t *pool;
	uint64_t pool_size;
	const volatile uint64_t *iommu; /* the IOMMU entries, one per IOVA page */
	uint64_t iova_pages;
	uint8_t *log;                   /* DMA write log: bit p%8 of byte p/8 = guest page p */
	int64_t *s;                     /* the shared array */
	char *error;                    /* [ERROR_LEN] */
	int backend_fd, seqpacket;      /* seqpacket: a 0-byte read is the peer hanging up */
	uint32_t rx_min, tx_min, tx_max;
	int doorbell_fd[NQ], irq_fd, event_fd, wake_fd, epfd;
	int pending[NQ];
	int backend_ready;  /* the backend fd polled readable */
	struct frame backlog[RX_BACKLOG];
	uint32_t bl_head, bl_count;
	uint8_t *staging;               /* one TX frame (header included) */
	struct desc *chain;             /* one chain being walked: room for the largest queue */
	int stop, running;
	pthread_t thread;
	pthread_mutex_t lock;
};

/* ---- small helpers ------------------------------------------------------------------------- */

static void signal_fd(int fd)
{
	uint64_t one = 1;
	ssize_t r = write(fd, &one, sizeof(one));
	(void)r; /* a full eventfd is already signalled */
}

static void drain_fd(int fd)
{
	uint64_t v;
	ssize_t r = read(fd, &v, sizeof(v));
	(void)r;
}

/* Stop the device: the guest (or its ring) broke a rule.  Python reports it. */
static int fail(struct np_dev *d, int q, int64_t iova, int dma, const char *fmt, ...)
{
	if (!d->s[S_BROKEN]) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(d->error, ERROR_LEN, fmt, ap);
		va_end(ap);
		d->s[S_BROKEN] = 1;
		d->s[S_FAULT_QUEUE] = q;
		d->s[S_FAULT_IOVA] = iova;
		d->s[S_FAULT_DMA] = dma;
		if (dma)
			d->s[C_DMA_FAULTS]++;
		signal_fd(d->event_fd);
	}
	return -1;
}

/* ---- DMA through the IOMMU ------------------------------------------------------------------ */

/* Where the page of `iova` lives, if the access may touch it; NULL (and why) if not. */
static uint8_t *translate(struct np_dev *d, uint64_t iova, int write, const char **why)
{
	uint64_t pfn = iova >> PAGE_SHIFT;
	if (pfn >= d->iova_pages) {
		*why = "runs past the IOVA limit";
		return NULL;
	}
	uint64_t e = d->iommu[pfn];
	if (!(e & ENTRY_VALID)) {
		*why = "is not mapped";
		return NULL;
	}
	if (!(e & (write ? ENTRY_WRITE : ENTRY_READ))) {
		*why = write ? "is not writable" : "is not readable";
		return NULL;
	}
	uint64_t off = (e >> PAGE_SHIFT) << PAGE_SHIFT;
	uint8_t *base = (e & ENTRY_POOL) ? d->pool : d->guest;
	uint64_t size = (e & ENTRY_POOL) ? d->pool_size : d->guest_size;
	if (!base || off >= size || size - off < PAGE_SIZE) {
		*why = "maps outside its target memory";
		return NULL;
	}
	return base + off + (iova & (PAGE_SIZE - 1));
}

/* May the device access every page of [iova, iova+len)?  0, or -1 after fail(). */
static int dma_check(struct np_dev *d, int q, uint64_t iova, uint64_t len, int write)
{
	const char *why = NULL;
	if (len == 0)
		return 0;
	if (iova + len < iova)
		return fail(d, q, (int64_t)iova, 1, "DMA at IOVA %#llx+%llu wraps the address space",
			    (unsigned long long)iova, (unsigned long long)len);
	for (uint64_t pos = iova & ~(PAGE_SIZE - 1); pos < iova + len; pos += PAGE_SIZE) {
		if (!translate(d, pos < iova ? iova : pos, write, &why))
			return fail(d, q, (int64_t)iova, 1, "DMA %s IOVA %#llx (+%llu): page %#llx %s",
				    write ? "to" : "from", (unsigned long long)iova,
				    (unsigned long long)len, (unsigned long long)(pos >> PAGE_SHIFT),
				    why);
	}
	return 0;
}

/* Check every page first, then copy: a fault touches nothing. */
static int dma(struct np_dev *d, int q, uint64_t iova, uint8_t *buf, uint64_t len, int write)
{
	const char *why = NULL;
	if (dma_check(d, q, iova, len, write))
		return -1;
	uint64_t done = 0;
	while (done < len) {
		uint64_t at = iova + done;
		uint64_t n = PAGE_SIZE - (at & (PAGE_SIZE - 1));
		if (n > len - done)
			n = len - done;
		uint8_t *p = translate(d, at, write, &why);
		if (!p) /* remapped under us: Python changed the table without the lock */
			return fail(d, q, (int64_t)at, 1, "IOVA page %#llx changed during a DMA",
				    (unsigned long long)(at >> PAGE_SHIFT));
		if (write) {
			memcpy(p, buf + done, n);
			if (d->log && d->s[S_LOG_ON] && p >= d->guest && p < d->guest + d->guest_size) {
				uint64_t page = (uint64_t)(p - d->guest) >> PAGE_SHIFT;
				__atomic_fetch_or(&d->log[page >> 3], (uint8_t)(1u << (page & 7)),
						  __ATOMIC_RELAXED);
			}
		} else {
			memcpy(buf + done, p, n);
		}
		done += n;
	}
	return 0;
}

static int rd16(struct np_dev *d, int q, uint64_t iova, uint16_t *v)
{
	uint8_t b[2];
	if (dma(d, q, iova, b, 2, 0))
		return -1;
	*v = (uint16_t)(b[0] | b[1] << 8);
	return 0;
}

/* ---- the split ring ------------------------------------------------------------------------- */

#define QS(d, q, field) ((d)->s[QBASE + (q) * QSTRIDE + (field)])

/* The next avail head, or 1 when there is none; -1 on a fault. */
static int pop_head(struct np_dev *d, int q, uint16_t *head)
{
	uint32_t size = (uint32_t)QS(d, q, Q_SIZE);
	uint16_t next = (uint16_t)QS(d, q, Q_NEXT_AVAIL), idx;
	if (rd16(d, q, (uint64_t)QS(d, q, Q_AVAIL) + 2, &idx))
		return -1;
	uint16_t ahead = (uint16_t)(idx - next);
	if (ahead == 0)
		return 1;
	if (ahead > size)
		return fail(d, q, -1, 0, "avail idx %u is %u entries ahead of next_avail %u, more "
			    "than the queue size %u", idx, ahead, next, size);
	__atomic_thread_fence(__ATOMIC_ACQUIRE); /* the entry after the idx that covers it */
	uint16_t h;
	if (rd16(d, q, (uint64_t)QS(d, q, Q_AVAIL) + 4 + 2ull * (next % size), &h))
		return -1;
	QS(d, q, Q_NEXT_AVAIL) = (uint16_t)(next + 1); /* consumed even if its chain is bad */
	if (h >= size)
		return fail(d, q, -1, 0, "avail ring entry %u (avail index %u) has head %u, out of "
			    "range for queue size %u", next % size, next, h, size);
	*head = h;
	return 0;
}

/* Walk and validate the chain at `head` into c[] (room for the queue size); its length. */
static int walk(struct np_dev *d, int q, uint16_t head, struct desc *c)
{
	uint32_t size = (uint32_t)QS(d, q, Q_SIZE);
	uint64_t table = (uint64_t)QS(d, q, Q_DESC), total = 0;
	int n = 0, seen_writable = 0;
	uint32_t index = head;
	for (;;) {
		if ((uint32_t)n >= size)
			return fail(d, q, -1, 0, "chain at head %u is longer than %u descriptors (a "
				    "loop in the next links?)", head, size);
		uint8_t raw[16];
		if (dma(d, q, table + 16ull * index, raw, 16, 0))
			return -1;
		uint64_t addr;
		uint32_t len;
		uint16_t flags, nxt;
		memcpy(&addr, raw, 8);
		memcpy(&len, raw + 8, 4);
		memcpy(&flags, raw + 12, 2);
		memcpy(&nxt, raw + 14, 2);
		if (flags & ~DESC_F_KNOWN)
			return fail(d, q, -1, 0, "descriptor %u (chain head %u) flags=%#x has reserved "
				    "bits set", index, head, flags);
		if (flags & DESC_F_INDIRECT)
			return fail(d, q, -1, 0, "descriptor %u (chain head %u) is INDIRECT but "
				    "VIRTIO_F_INDIRECT_DESC was not negotiated", index, head);
		if (len == 0)
			return fail(d, q, -1, 0, "descriptor %u (chain head %u) has length 0", index,
				    head);
		if (addr > (uint64_t)0 - len) /* ends past 2^64 (ending exactly there is fine) */
			return fail(d, q, -1, 0, "descriptor %u (chain head %u) buffer %#llx+%u wraps "
				    "the address space", index, head, (unsigned long long)addr, len);
		total += len;
		if (total > MAX_CHAIN_BYTES)
			return fail(d, q, -1, 0, "chain at head %u describes more than %llu bytes", head,
				    (unsigned long long)MAX_CHAIN_BYTES);
		int writable = !!(flags & DESC_F_WRITE);
		if (seen_writable && !writable)
			return fail(d, q, -1, 0, "descriptor %u (chain head %u) is device-readable "
				    "after a device-writable descriptor", index, head);
		seen_writable |= writable;
		c[n++] = (struct desc){addr, len, writable};
		if (!(flags & DESC_F_NEXT))
			return n;
		if (nxt >= size)
			return fail(d, q, -1, 0, "descriptor %u next=%u out of range for queue size %u "
				    "(chain head %u)", index, nxt, size, head);
		index = nxt;
	}
}

/* Used element at next_used; the idx is published by push_idx. */
static int push_used(struct np_dev *d, int q, uint16_t head, uint32_t len)
{
	uint32_t size = (uint32_t)QS(d, q, Q_SIZE);
	uint16_t next = (uint16_t)QS(d, q, Q_NEXT_USED);
	uint8_t elem[8];
	uint32_t id = head;
	memcpy(elem, &id, 4);
	memcpy(elem + 4, &len, 4);
	if (dma(d, q, (uint64_t)QS(d, q, Q_USED) + 4 + 8ull * (next % size), elem, 8, 1))
		return -1;
	QS(d, q, Q_NEXT_USED) = (uint16_t)(next + 1);
	return 0;
}

static int push_idx(struct np_dev *d, int q)
{
	uint16_t idx = (uint16_t)QS(d, q, Q_NEXT_USED);
	uint8_t b[2] = {(uint8_t)idx, (uint8_t)(idx >> 8)};
	__atomic_thread_fence(__ATOMIC_RELEASE); /* elements before the idx that covers them */
	return dma(d, q, (uint64_t)QS(d, q, Q_USED) + 2, b, 2, 1);
}

/* ---- TX ------------------------------------------------------------------------------------ */

static void send_frame(struct np_dev *d, const uint8_t *f, uint32_t len)
{
	if (len == 0 || len < d->tx_min || len > d->tx_max) {
		d->s[C_TX_DROPPED]++;
		return;
	}
	ssize_t w = write(d->backend_fd, f, len);
	if (w != (ssize_t)len) { /* a full or dead link drops the frame, as a NIC would */
		d->s[C_TX_DROPPED]++;
		return;
	}
	d->s[C_TX_FRAMES]++;
	d->s[C_TX_BYTES] += len;
}

/* Up to PASS_LIMIT TX chains; the number completed, or -1 on a fault. */
static int tx_pass(struct np_dev *d, struct desc *c, int *more)
{
	int done = 0;
	*more = 0;
	for (; done < PASS_LIMIT; done++) {
		uint16_t head;
		int r = pop_head(d, TXQ, &head);
		if (r)
			return r < 0 ? -1 : done;
		int n = walk(d, TXQ, head, c);
		if (n < 0)
			return -1;
		uint64_t total = 0;
		int readable = 0;
		while (readable < n && !c[readable].writable)
			total += c[readable++].len;
		if (total < NET_HDR)
			return fail(d, TXQ, -1, 0, "virtio-net TX chain %u has %llu readable bytes, less "
				    "than the %d-byte header", head, (unsigned long long)total, NET_HDR);
		if (total - NET_HDR > MAX_FRAME) {
			d->s[C_TX_DROPPED]++;
		} else {
			uint64_t pos = 0;
			for (int i = 0; i < readable; i++) {
				if (dma(d, TXQ, c[i].addr, d->staging + pos, c[i].len, 0))
					return -1;
				pos += c[i].len;
			}
			send_frame(d, d->staging + NET_HDR, (uint32_t)(total - NET_HDR));
		}
		if (push_used(d, TXQ, head, 0))
			return -1;
	}
	*more = 1;
	return done;
}

/* ---- RX ------------------------------------------------------------------------------------ */

/* Read what the backend has into the backlog (dropping beyond it, as a NIC with a full FIFO). */
static void fill_backlog(struct np_dev *d)
{
	for (int reads = 0; reads < 4 * RX_BACKLOG; reads++) {
		struct frame *f = NULL;
		uint8_t scratch[64];
		if (d->bl_count < RX_BACKLOG) {
			f = &d->backlog[(d->bl_head + d->bl_count) % RX_BACKLOG];
			if (!f->data) {
				f->data = malloc(MAX_FRAME + 1);
				if (!f->data)
					return;
				f->cap = MAX_FRAME + 1;
			}
		}
		/* without room, peek at the size only: the frame is dropped either way */
		ssize_t n = f ? read(d->backend_fd, f->data, f->cap)
			      : read(d->backend_fd, scratch, sizeof(scratch));
		if (n < 0) {
			if (errno == EINTR || errno == ECONNREFUSED)
				continue; /* ICMP unreachable from an earlier send: not a frame */
			return;   /* EAGAIN: drained */
		}
		if (n == 0 && d->seqpacket) { /* the peer hung up: the link is down for good */
			d->s[S_LINK_DOWN] = 1;
			epoll_ctl(d->epfd, EPOLL_CTL_DEL, d->backend_fd, NULL);
			signal_fd(d->event_fd); /* Python logs it */
			return;
		}
		if ((uint32_t)n < d->rx_min || n == 0) { /* a switch control message, not a frame */
			d->s[C_RX_CONTROL]++;
			continue;
		}
		if (!f) {
			d->s[C_RX_DROPPED_NO_BUFFER]++;
			continue;
		}
		f->len = (uint32_t)n;
		d->bl_count++;
	}
}

static int rx_pass(struct np_dev *d, struct desc *c, int *more)
{
	static const uint8_t hdr[NET_HDR] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0}; /* num_buffers 1 */
	int done = 0;
	*more = 0;
	for (; done < PASS_LIMIT && d->bl_count; done++) {
		uint16_t head;
		int r = pop_head(d, RXQ, &head);
		if (r)
			return r < 0 ? -1 : done;
		int n = walk(d, RXQ, head, c);
		if (n < 0)
			return -1;
		struct frame *f = &d->backlog[d->bl_head];
		d->bl_head = (d->bl_head + 1) % RX_BACKLOG;
		d->bl_count--;
		uint64_t room = 0, need = NET_HDR + (uint64_t)f->len;
		for (int i = 0; i < n; i++)
			room += c[i].writable ? c[i].len : 0;
		uint32_t used_len = 0;
		if (need > room) {
			d->s[C_RX_DROPPED_TOO_BIG]++;
		} else {
			/* the header and the frame, across the writable buffers in order, every
			 * buffer checked before the first byte is written */
			uint64_t pos = 0;
			for (int i = 0; i < n && pos < need; i++) {
				if (!c[i].writable)
					continue;
				uint64_t take = c[i].len < need - pos ? c[i].len : need - pos;
				if (dma_check(d, RXQ, c[i].addr, take, 1))
					return -1;
				pos += take;
			}
			pos = 0;
			for (int i = 0; i < n && pos < need; i++) {
				if (!c[i].writable)
					continue;
				uint64_t take = c[i].len < need - pos ? c[i].len : need - pos;
				uint64_t at = c[i].addr, left = take;
				if (pos < NET_HDR) {
					uint64_t h = NET_HDR - pos < left ? NET_HDR - pos : left;
					if (dma(d, RXQ, at, (uint8_t *)hdr + pos, h, 1))
						return -1;
					at += h;
					left -= h;
					pos += h;
				}
				if (left && dma(d, RXQ, at, f->data + (pos - NET_HDR), left, 1))
					return -1;
				pos += left;
			}
			used_len = (uint32_t)need;
			d->s[C_RX_FRAMES]++;
			d->s[C_RX_BYTES] += f->len;
		}
		if (push_used(d, RXQ, head, used_len))
			return -1;
	}
	*more = done == PASS_LIMIT && d->bl_count;
	return done;
}

/* ---- the thread ------------------------------------------------------------------------------ */

/* One pass over what is pending; returns 1 when more work is left (poll again at once).
 * A queue stays pending only when its pass hit PASS_LIMIT: TX with nothing posted, and RX with
 * no frame or no posted buffer, wait for the next doorbell or frame. */
static int service(struct np_dev *d)
{
	struct desc *c = d->chain;
	int more = 0, completed = 0;
	if (d->backend_ready) {
		d->backend_ready = 0;
		fill_backlog(d);
		d->s[C_RX_BACKLOG] = d->bl_count;
	}
	if (!d->s[S_ENABLED] || d->s[S_BROKEN])
		return 0;
	for (int q = 0; q < NQ; q++) {
		if (!d->pending[q] || !QS(d, q, Q_READY))
			continue;
		int m = 0;
		uint16_t before = (uint16_t)QS(d, q, Q_NEXT_USED);
		int r = q == TXQ ? tx_pass(d, c, &m) : rx_pass(d, c, &m);
		/* chains finished before a fault are still returned to the driver */
		uint16_t done = (uint16_t)((uint16_t)QS(d, q, Q_NEXT_USED) - before);
		if (done && push_idx(d, q))
			r = -1;
		completed += done;
		if (r < 0)
			break;
		d->pending[q] = m;
		more |= m;
	}
	d->s[C_RX_BACKLOG] = d->bl_count;
	if (completed) {
		d->s[C_REQUESTS] += completed;
		d->s[S_ISR] |= 1;
		d->s[C_INTERRUPTS]++;
		signal_fd(d->irq_fd);
	}
	return more && !d->s[S_BROKEN];
}

enum { TAG_RX = 0, TAG_TX = 1, TAG_BACKEND = 2, TAG_WAKE = 3 };

static void *run(void *arg)
{
	struct np_dev *d = arg;
	struct epoll_event ev[8];
	int more = 0;
	for (;;) {
		int n = epoll_wait(d->epfd, ev, 8, more ? 0 : -1);
		if (n < 0 && errno != EINTR) { /* cannot wait: the device can do nothing */
			int err = errno;
			pthread_mutex_lock(&d->lock);
			fail(d, -1, -1, 0, "the frame path thread stopped: epoll_wait: %s", strerror(err));
			pthread_mutex_unlock(&d->lock);
			break;
		}
		pthread_mutex_lock(&d->lock);
		if (d->stop) {
			pthread_mutex_unlock(&d->lock);
			break;
		}
		for (int i = 0; i < n; i++) {
			switch (ev[i].data.u32) {
			case TAG_RX:
			case TAG_TX:
				drain_fd(d->doorbell_fd[ev[i].data.u32]);
				d->pending[ev[i].data.u32] = 1;
				d->s[C_DOORBELLS]++;
				break;
			case TAG_BACKEND:
				d->backend_ready = 1;
				d->pending[RXQ] = 1;
				break;
			default:
				drain_fd(d->wake_fd);
				d->pending[RXQ] = d->pending[TXQ] = 1; /* Python changed something */
				break;
			}
		}
		more = service(d);
		pthread_mutex_unlock(&d->lock);
	}
	return NULL;
}

/* ---- the interface (ptmig/devices/netnative.py) ------------------------------------------- */

struct np_dev *np_new(uint8_t *guest, uint64_t guest_size, uint8_t *pool, uint64_t pool_size,
		      const uint64_t *iommu, uint64_t iova_pages, int64_t *shared, char *error,
		      int backend_fd, int seqpacket, uint32_t rx_min, uint32_t tx_min,
		      uint32_t tx_max, int rx_doorbell, int tx_doorbell, int irq_fd, int event_fd,
		      int wake_fd)
{
	struct np_dev *d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	*d = (struct np_dev){.guest = guest, .guest_size = guest_size, .pool = pool,
			     .pool_size = pool_size, .iommu = iommu, .iova_pages = iova_pages,
			     .s = shared, .error = error, .backend_fd = backend_fd,
			     .seqpacket = seqpacket, .rx_min = rx_min, .tx_min = tx_min,
			     .tx_max = tx_max, .doorbell_fd = {rx_doorbell, tx_doorbell},
			     .irq_fd = irq_fd, .event_fd = event_fd, .wake_fd = wake_fd};
	d->staging = malloc(MAX_FRAME + NET_HDR);
	d->chain = calloc(MAX_QUEUE_SIZE, sizeof(*d->chain));
	d->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (!d->staging || !d->chain || d->epfd < 0 || pthread_mutex_init(&d->lock, NULL)) {
		free(d->staging);
		free(d->chain);
		if (d->epfd >= 0)
			close(d->epfd);
		free(d);
		return NULL;
	}
	struct {
		int fd;
		uint32_t tag;
	} fds[] = {{rx_doorbell, TAG_RX}, {tx_doorbell, TAG_TX}, {backend_fd, TAG_BACKEND},
		   {wake_fd, TAG_WAKE}};
	for (unsigned i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
		struct epoll_event e = {.events = EPOLLIN, .data.u32 = fds[i].tag};
		if (fds[i].fd >= 0 && epoll_ctl(d->epfd, EPOLL_CTL_ADD, fds[i].fd, &e)) {
			close(d->epfd);
			pthread_mutex_destroy(&d->lock);
			free(d->staging);
			free(d->chain);
			free(d);
			return NULL;
		}
	}
	return d;
}

int np_start(struct np_dev *d)
{
	if (d->running)
		return 0;
	d->stop = 0;
	if (pthread_create(&d->thread, NULL, run, d))
		return -1;
	d->running = 1;
	return 0;
}

void np_stop(struct np_dev *d)
{
	if (!d->running)
		return;
	pthread_mutex_lock(&d->lock);
	d->stop = 1;
	pthread_mutex_unlock(&d->lock);
	signal_fd(d->wake_fd);
	pthread_join(d->thread, NULL);
	d->running = 0;
}

void np_lock(struct np_dev *d) { pthread_mutex_lock(&d->lock); }
void np_unlock(struct np_dev *d) { pthread_mutex_unlock(&d->lock); }

/* Under the lock: the log bitmap (NULL while logging is off). */
void np_set_log(struct np_dev *d, uint8_t *log) { d->log = log; }

/* Under the lock: forget the frames waiting for RX buffers (device reset). */
void np_clear_backlog(struct np_dev *d)
{
	d->bl_head = d->bl_count = 0;
	d->s[C_RX_BACKLOG] = 0;
}

/* Under the lock, with the thread not started: one pass on the caller's thread, as if both
 * doorbells had rung and the backend were readable (tests drive the path step by step).
 * Returns 1 when more work is left. */
int np_run_once(struct np_dev *d)
{
	d->pending[RXQ] = d->pending[TXQ] = 1;
	d->backend_ready = 1;
	return service(d);
}

/* Under the lock: the thread re-reads both rings after Python changed the state. */
void np_poke(struct np_dev *d) { signal_fd(d->wake_fd); }

void np_free(struct np_dev *d)
{
	if (!d)
		return;
	np_stop(d);
	for (int i = 0; i < RX_BACKLOG; i++)
		free(d->backlog[i].data);
	free(d->staging);
	free(d->chain);
	close(d->epfd);
	pthread_mutex_destroy(&d->lock);
	free(d);
}
