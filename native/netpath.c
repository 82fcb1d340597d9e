/*
 * netpath.c - the virtio-net frame path of a net device process, run by a native thread.
 *
 * A net device moves every frame of the VM: at the kv benchmark's rate that is tens of
 * thousands of frames a second, and the interpreter's share of each (ring parsing, IOMMU
 * translation, copies, wake-ups) made the Python device the busiest process on the host.  This
 * file does the per-frame part, on the core in virtq.c; ptmig/devices/process.py keeps the
 * rest: the register file, feature negotiation, queue setup, admin commands (reset, quiesce,
 * state, IOTLB, DMA write log) and backend keepalives.
 *
 *   TX (queue 1):  gather the device-readable bytes after the 12-byte virtio_net_hdr_v1 and
 *                  write the frame to the backend fd (one frame per write).
 *   RX (queue 0):  read frames from the backend fd into a bounded backlog (beyond it they are
 *                  dropped and counted, as a NIC drops on a full FIFO); place the oldest into
 *                  the next posted buffer behind a header with num_buffers = 1.  A frame too
 *                  big for its buffer is dropped and the buffer returned with used.len 0.
 *
 * Same behaviour as ptmig/devices/net.py (the reference, and the path used without a C
 * compiler); tests/test_device_fuzz.py runs hostile rings through both and compares.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "virtq.h"

#define NET_HDR 12
#define MAX_FRAME 65535  /* net.py MAX_FRAME */
#define RX_BACKLOG 256   /* net.py RX_BACKLOG */

enum { RXQ = 0, TXQ = 1 };

/* The net device's counters in the shared array (mirrored in nativepath.py). */
enum {
	N_LINK_DOWN = C_DEVICE, /* the backend hung up */
	N_TX_FRAMES, N_TX_BYTES, N_TX_DROPPED, N_RX_FRAMES, N_RX_BYTES, N_RX_DROPPED_NO_BUFFER,
	N_RX_DROPPED_TOO_BIG, N_RX_CONTROL, N_RX_BACKLOG, N_COUNT
};

struct frame {
	uint8_t *data; /* MAX_FRAME + 1 bytes, allocated the first time the slot is used */
	uint32_t len;
};

struct np_dev {
	struct vq_engine e; /* first: a device handle is also its engine's */
	int backend_fd;
	int eof_on_empty;   /* a 0-byte read is the peer hanging up, not an empty datagram */
	uint32_t rx_min, tx_min, tx_max;
	struct frame backlog[RX_BACKLOG];
	uint32_t bl_head, bl_count;
	uint8_t *staging;   /* one TX frame */
};

/* ---- TX ------------------------------------------------------------------------------------ */

static void send_frame(struct np_dev *d, const uint8_t *f, uint32_t len)
{
	int64_t *s = d->e.s;
	if (len == 0 || len < d->tx_min || len > d->tx_max ||
	    write(d->backend_fd, f, len) != (ssize_t)len) {
		s[N_TX_DROPPED]++; /* a full or dead link drops the frame, as a NIC would */
		return;
	}
	s[N_TX_FRAMES]++;
	s[N_TX_BYTES] += len;
}

/* The frame: the readable bytes after the header (which is not read: no offload was
 * offered), every buffer checked before the first byte is copied. */
static int gather(struct np_dev *d, const struct vq_desc *c, int readable)
{
	uint64_t pos = 0, skip = NET_HDR;
	for (int pass = 0; pass < 2; pass++) {
		pos = 0;
		skip = NET_HDR;
		for (int i = 0; i < readable; i++) {
			uint64_t off = skip < c[i].len ? skip : c[i].len;
			uint64_t n = c[i].len - off;
			skip -= off;
			if (!n)
				continue;
			if (pass == 0 ? vq_dma_check(&d->e, TXQ, c[i].addr + off, n, 0)
				      : vq_dma(&d->e, TXQ, c[i].addr + off, d->staging + pos, n, 0))
				return -1;
			pos += n;
		}
	}
	return 0;
}

static int tx_pass(struct np_dev *d, int *more)
{
	struct vq_engine *e = &d->e;
	struct vq_desc *c = e->chain;
	for (int done = 0; done < VQ_PASS_LIMIT; done++) {
		uint16_t head;
		int r = vq_pop(e, TXQ, &head);
		if (r)
			return r < 0 ? -1 : 0;
		int n = vq_walk(e, TXQ, head, c);
		if (n < 0)
			return -1;
		uint64_t total = 0;
		int readable = 0;
		while (readable < n && !c[readable].writable)
			total += c[readable++].len;
		if (total < NET_HDR)
			return vq_fail(e, TXQ, -1, 0, "virtio-net TX chain %u has %llu readable bytes, "
				       "less than the %d-byte header", head,
				       (unsigned long long)total, NET_HDR);
		if (total - NET_HDR > MAX_FRAME) {
			e->s[N_TX_DROPPED]++;
		} else if (gather(d, c, readable) == 0) {
			send_frame(d, d->staging, (uint32_t)(total - NET_HDR));
		} else {
			return -1;
		}
		vq_complete(e, head, 0);
	}
	*more = 1;
	return 0;
}

/* ---- RX ------------------------------------------------------------------------------------ */

/* Read what the backend has into the backlog, dropping what does not fit. */
static void fill_backlog(struct vq_engine *e)
{
	struct np_dev *d = (struct np_dev *)e;
	for (int reads = 0; reads < 4 * RX_BACKLOG; reads++) {
		struct frame *f = NULL;
		uint8_t scratch[64];
		if (d->bl_count < RX_BACKLOG) {
			f = &d->backlog[(d->bl_head + d->bl_count) % RX_BACKLOG];
			if (!f->data && !(f->data = malloc(MAX_FRAME + 1)))
				f = NULL; /* no memory for the slot: dropped, as without room */
		}
		/* without room only the size matters: the frame is dropped either way */
		ssize_t n = f ? read(d->backend_fd, f->data, MAX_FRAME + 1)
			      : read(d->backend_fd, scratch, sizeof(scratch));
		if (n < 0) {
			if (errno == EINTR || errno == ECONNREFUSED)
				continue; /* ICMP unreachable after an earlier send: not a frame */
			break;            /* EAGAIN: drained */
		}
		if (n == 0 && d->eof_on_empty) {
			e->s[N_LINK_DOWN] = 1; /* for good: stop polling it, tell Python */
			epoll_ctl(e->epfd, EPOLL_CTL_DEL, d->backend_fd, NULL);
			e->extra_fd = -1;
			fd_signal(e->event_fd);
			break;
		}
		if (n == 0 || (uint32_t)n < d->rx_min) { /* a switch control message */
			e->s[N_RX_CONTROL]++;
			continue;
		}
		if (!f) {
			e->s[N_RX_DROPPED_NO_BUFFER]++;
			continue;
		}
		f->len = (uint32_t)n;
		d->bl_count++;
	}
	e->pending[RXQ] = 1;
	e->s[N_RX_BACKLOG] = d->bl_count;
}

/* Write the header and the frame across the chain's writable buffers, every buffer checked
 * before the first byte moves. */
static int place(struct vq_engine *e, const struct vq_desc *c, int n, const struct frame *f)
{
	static const uint8_t hdr[NET_HDR] = {[10] = 1}; /* num_buffers = 1, no offloads */
	uint64_t need = NET_HDR + (uint64_t)f->len, pos = 0;
	for (int i = 0; i < n && pos < need; i++) {
		if (!c[i].writable)
			continue;
		uint64_t take = c[i].len < need - pos ? c[i].len : need - pos;
		if (vq_dma_check(e, RXQ, c[i].addr, take, 1))
			return -1;
		pos += take;
	}
	pos = 0;
	for (int i = 0; i < n && pos < need; i++) {
		if (!c[i].writable)
			continue;
		uint64_t at = c[i].addr, left = c[i].len < need - pos ? c[i].len : need - pos;
		if (pos < NET_HDR) {
			uint64_t h = NET_HDR - pos < left ? NET_HDR - pos : left;
			if (vq_dma(e, RXQ, at, (void *)(hdr + pos), h, 1))
				return -1;
			at += h;
			left -= h;
			pos += h;
		}
		if (left && vq_dma(e, RXQ, at, f->data + (pos - NET_HDR), left, 1))
			return -1;
		pos += left;
	}
	return 0;
}

static int rx_pass(struct np_dev *d, int *more)
{
	struct vq_engine *e = &d->e;
	struct vq_desc *c = e->chain;
	for (int done = 0; done < VQ_PASS_LIMIT; done++) {
		uint16_t head;
		if (!d->bl_count)
			return 0; /* the next frame makes the queue pending again */
		int r = vq_pop(e, RXQ, &head);
		if (r)
			return r < 0 ? -1 : 0; /* out of buffers: wait for the driver's RX notify */
		int n = vq_walk(e, RXQ, head, c);
		if (n < 0)
			return -1;
		struct frame *f = &d->backlog[d->bl_head];
		d->bl_head = (d->bl_head + 1) % RX_BACKLOG;
		d->bl_count--;
		uint64_t room = 0;
		for (int i = 0; i < n; i++)
			room += c[i].writable ? c[i].len : 0;
		uint32_t used_len = 0;
		if (NET_HDR + (uint64_t)f->len > room) {
			e->s[N_RX_DROPPED_TOO_BIG]++;
		} else {
			if (place(e, c, n, f))
				return -1;
			used_len = NET_HDR + f->len;
			e->s[N_RX_FRAMES]++;
			e->s[N_RX_BYTES] += f->len;
		}
		vq_complete(e, head, used_len);
	}
	*more = d->bl_count > 0;
	return 0;
}

static int pass(struct vq_engine *e, int q, int *more)
{
	struct np_dev *d = (struct np_dev *)e;
	return q == TXQ ? tx_pass(d, more) : rx_pass(d, more);
}

static int service(struct vq_engine *e)
{
	int more = vq_service_queues(e, pass);
	e->s[N_RX_BACKLOG] = ((struct np_dev *)e)->bl_count;
	return more;
}

static const struct vq_ops net_ops = {.service = service, .readable = fill_backlog};

/* ---- the interface (ptmig/devices/nativepath.py) ------------------------------------------ */

struct np_dev *np_new(uint8_t *guest, uint64_t guest_size, uint8_t *pool, uint64_t pool_size,
		      const uint64_t *iommu, uint64_t iova_pages, int64_t *shared, char *error,
		      int rx_doorbell, int tx_doorbell, int irq_fd, int event_fd, int wake_fd,
		      int backend_fd, int eof_on_empty, uint32_t rx_min, uint32_t tx_min,
		      uint32_t tx_max)
{
	struct np_dev *d = calloc(1, sizeof(*d));
	int doorbells[2] = {rx_doorbell, tx_doorbell};
	if (!d || !(d->staging = malloc(MAX_FRAME + NET_HDR)) ||
	    vq_init(&d->e, &net_ops, guest, guest_size, pool, pool_size, iommu, iova_pages, shared,
		    error, 2, doorbells, irq_fd, event_fd, wake_fd, backend_fd)) {
		if (d)
			free(d->staging);
		free(d);
		return NULL;
	}
	d->backend_fd = backend_fd;
	d->eof_on_empty = eof_on_empty;
	d->rx_min = rx_min;
	d->tx_min = tx_min;
	d->tx_max = tx_max;
	return d;
}

/* Under the lock: forget the frames waiting for RX buffers (device reset). */
void np_clear_backlog(struct np_dev *d)
{
	d->bl_head = d->bl_count = 0;
	d->e.s[N_RX_BACKLOG] = 0;
}

int np_start(struct np_dev *d) { return vq_start(&d->e); }

/* The length of the shared array this device uses (Python checks its own). */
int np_shared_len(void) { return N_COUNT; }

void np_free(struct np_dev *d)
{
	if (!d)
		return;
	vq_destroy(&d->e);
	for (int i = 0; i < RX_BACKLOG; i++)
		free(d->backlog[i].data);
	free(d->staging);
	free(d);
}
