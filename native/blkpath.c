/*
 * blkpath.c - the virtio-blk request path of a blk device process, run by a native thread.
 *
 * Every PUT of the kv workload waits for a log write, so this device is on the latency path of
 * the VM's main workload: the interpreter's share of each request (ring parsing, IOMMU
 * translation, building the iovecs) was larger than the write itself.  This file does the
 * per-request part, on the core in virtq.c; ptmig/devices/process.py keeps the register file
 * and admin commands, ptmig/devices/blk.py the image, config space and features.
 *
 * Requests are parsed by byte offset across the chain, never by descriptor boundaries: the
 * 16-byte header {type u32, reserved u32, sector u64} at the start of the device-readable
 * bytes, the data (device-readable for OUT, device-writable for IN), and the status byte at
 * the very end of the device-writable bytes.  Data moves with preadv/pwritev straight between
 * the image and the translated guest pages; the whole request is translated before any byte
 * moves.  Impossible but well-formed requests (past the end, not whole sectors, a write to a
 * read-only disk) get IOERR; broken framing (short header, no status byte) breaks the device.
 *
 * Same behaviour as ptmig/devices/blk.py (the reference, and the path used without a C
 * compiler); tests/test_device_fuzz.py runs hostile rings through both and compares.
 */
#define _GNU_SOURCE
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "virtq.h"

#define HDR 16
#define SECTOR 512ull
#define ID_BYTES 20
#define MAX_IOV (((64ull << 20) >> VQ_PAGE_SHIFT) + 2 * 256) /* a 64 MiB chain, page by page */

enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8 };
enum { S_OK = 0, S_IOERR = 1, S_UNSUPP = 2 };

/* The blk device's counters in the shared array (mirrored in nativepath.py). */
enum {
	B_READS = C_DEVICE, B_WRITES, B_FLUSHES, B_GET_IDS, B_UNSUPPORTED, B_IOERRS, B_BYTES_READ,
	B_BYTES_WRITTEN, B_COUNT
};

struct bp_dev {
	struct vq_engine e; /* first: a device handle is also its engine's */
	int fd;
	uint64_t capacity;  /* bytes, a whole number of sectors */
	int readonly;
	uint8_t serial[ID_BYTES];
	struct iovec *iov;  /* [MAX_IOV] */
	struct vq_desc *pieces; /* [VQ_MAX_SIZE]: a byte range of one chain */
};

/* Bytes [off, off+len) of the chain's readable (writable=0) or writable descriptors, as
 * (address, length) pieces in `out`; their number. */
static int byte_range(const struct vq_desc *c, int n, int writable, uint64_t off, uint64_t len,
		      struct vq_desc *out)
{
	int k = 0;
	uint64_t pos = 0, end = off + len;
	for (int i = 0; i < n && pos < end; i++) {
		if (c[i].writable != writable)
			continue;
		uint64_t lo = pos > off ? pos : off, hi = pos + c[i].len < end ? pos + c[i].len : end;
		if (lo < hi)
			out[k++] = (struct vq_desc){c[i].addr + (lo - pos), (uint32_t)(hi - lo),
						    writable};
		pos += c[i].len;
	}
	return k;
}

/* Translate pieces into iovecs (merging contiguous pages); the iovec count, or -1 after a
 * fault.  Pages the device will write are logged now, as DmaView.segments does. */
static int translate_all(struct bp_dev *d, const struct vq_desc *p, int k, int write)
{
	struct vq_engine *e = &d->e;
	const char *why;
	int n = 0;
	for (int i = 0; i < k; i++)
		if (vq_dma_check(e, 0, p[i].addr, p[i].len, write))
			return -1;
	for (int i = 0; i < k; i++) {
		for (uint64_t done = 0; done < p[i].len;) {
			uint64_t at = p[i].addr + done;
			uint64_t len = VQ_PAGE_SIZE - (at & (VQ_PAGE_SIZE - 1));
			if (len > p[i].len - done)
				len = p[i].len - done;
			uint8_t *host = vq_translate(e, at, write, &why);
			if (!host)
				return vq_fail(e, 0, (int64_t)at, 1, "IOVA page %#llx changed during a "
					       "DMA", (unsigned long long)(at >> VQ_PAGE_SHIFT));
			if (write)
				vq_log_written(e, host, len);
			if (n && (uint8_t *)d->iov[n - 1].iov_base + d->iov[n - 1].iov_len == host)
				d->iov[n - 1].iov_len += len;
			else if (n < (int)MAX_IOV)
				d->iov[n++] = (struct iovec){host, len};
			else
				return vq_fail(e, 0, -1, 0, "request needs more than %llu iovecs",
					       (unsigned long long)MAX_IOV);
			done += len;
		}
	}
	return n;
}

/* The whole transfer, in IOV_MAX batches, resuming after short transfers. */
static int transfer(struct bp_dev *d, int n, uint64_t offset, int write)
{
	struct iovec *iov = d->iov;
	while (n) {
		int batch = n < IOV_MAX ? n : IOV_MAX;
		ssize_t r = write ? pwritev(d->fd, iov, batch, (off_t)offset)
				  : preadv(d->fd, iov, batch, (off_t)offset);
		if (r <= 0)
			return S_IOERR;
		offset += (uint64_t)r;
		while (n && (uint64_t)r >= iov->iov_len) {
			r -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n && r) {
			iov->iov_base = (uint8_t *)iov->iov_base + r;
			iov->iov_len -= (size_t)r;
		}
	}
	return S_OK;
}

static int check_range(struct bp_dev *d, uint64_t sector, uint64_t len)
{
	if (len % SECTOR || sector > d->capacity / SECTOR || sector * SECTOR + len > d->capacity)
		return S_IOERR;
	return S_OK;
}

/* One request; its used.len (bytes written into guest memory, status included), or -1. */
static int64_t execute(struct bp_dev *d, uint16_t head, const struct vq_desc *c, int n)
{
	struct vq_engine *e = &d->e;
	struct vq_desc *pieces = d->pieces;
	uint64_t readable = 0, writable = 0;
	for (int i = 0; i < n; i++)
		*(c[i].writable ? &writable : &readable) += c[i].len;
	if (readable < HDR)
		return vq_fail(e, 0, -1, 0, "virtio-blk request header needs %d readable bytes, "
			       "chain %u has %llu", HDR, head, (unsigned long long)readable);
	if (writable < 1)
		return vq_fail(e, 0, -1, 0, "virtio-blk request %u has no writable status byte",
			       head);
	uint8_t hdr[HDR];
	int k = byte_range(c, n, 0, 0, HDR, pieces);
	for (int i = 0, pos = 0; i < k; pos += (int)pieces[i++].len)
		if (vq_dma(e, 0, pieces[i].addr, hdr + pos, pieces[i].len, 0))
			return -1;
	uint32_t type;
	uint64_t sector;
	memcpy(&type, hdr, 4);
	memcpy(&sector, hdr + 8, 8);
	byte_range(c, n, 1, writable - 1, 1, pieces);
	uint64_t status_addr = pieces[0].addr;
	if (vq_dma_check(e, 0, status_addr, 1, 1))
		return -1;
	uint64_t out_len = readable - HDR, in_len = writable - 1, written = 0;
	uint8_t status;
	int64_t *s = e->s;
	if (type == T_IN) {
		status = (uint8_t)check_range(d, sector, in_len);
		if (status == S_OK) {
			int iovs = translate_all(d, pieces, byte_range(c, n, 1, 0, in_len, pieces), 1);
			if (iovs < 0)
				return -1;
			status = (uint8_t)transfer(d, iovs, sector * SECTOR, 0);
			if (status == S_OK) {
				written = in_len;
				s[B_READS]++;
				s[B_BYTES_READ] += (int64_t)in_len;
			}
		}
	} else if (type == T_OUT) {
		status = d->readonly ? S_IOERR : (uint8_t)check_range(d, sector, out_len);
		if (status == S_OK) {
			int iovs = translate_all(d, pieces, byte_range(c, n, 0, HDR, out_len, pieces),
						 0);
			if (iovs < 0)
				return -1;
			status = (uint8_t)transfer(d, iovs, sector * SECTOR, 1);
			if (status == S_OK) {
				s[B_WRITES]++;
				s[B_BYTES_WRITTEN] += (int64_t)out_len;
			}
		}
	} else if (type == T_FLUSH) {
		status = fdatasync(d->fd) ? S_IOERR : S_OK;
		if (status == S_OK)
			s[B_FLUSHES]++;
	} else if (type == T_GET_ID) {
		uint64_t len = in_len < ID_BYTES ? in_len : ID_BYTES, pos = 0;
		k = byte_range(c, n, 1, 0, len, pieces);
		for (int i = 0; i < k; pos += pieces[i++].len)
			if (vq_dma(e, 0, pieces[i].addr, d->serial + pos, pieces[i].len, 1))
				return -1;
		written = len;
		status = S_OK;
		s[B_GET_IDS]++;
	} else {
		status = S_UNSUPP;
		s[B_UNSUPPORTED]++;
	}
	if (status == S_IOERR)
		s[B_IOERRS]++;
	if (vq_dma(e, 0, status_addr, &status, 1, 1))
		return -1;
	return (int64_t)written + 1;
}

static int pass(struct vq_engine *e, int q, int *more)
{
	struct bp_dev *d = (struct bp_dev *)e;
	for (int done = 0; done < VQ_PASS_LIMIT; done++) {
		uint16_t head;
		int r = vq_pop(e, q, &head);
		if (r)
			return r < 0 ? -1 : 0;
		int n = vq_walk(e, q, head, e->chain);
		if (n < 0)
			return -1;
		int64_t used = execute(d, head, e->chain, n);
		if (used < 0)
			return -1;
		vq_complete(e, head, (uint32_t)used);
	}
	*more = 1;
	return 0;
}

static int service(struct vq_engine *e) { return vq_service_queues(e, pass); }

static void no_fd(struct vq_engine *e) { (void)e; }

static const struct vq_ops blk_ops = {.service = service, .readable = no_fd};

/* ---- the interface (ptmig/devices/nativepath.py) ------------------------------------------ */

struct bp_dev *bp_new(uint8_t *guest, uint64_t guest_size, uint8_t *pool, uint64_t pool_size,
		      const uint64_t *iommu, uint64_t iova_pages, int64_t *shared, char *error,
		      int doorbell, int irq_fd, int event_fd, int wake_fd, int image_fd,
		      uint64_t capacity, int readonly, const uint8_t *serial)
{
	struct bp_dev *d = calloc(1, sizeof(*d));
	if (!d || !(d->iov = calloc(MAX_IOV, sizeof(*d->iov))) ||
	    !(d->pieces = calloc(VQ_MAX_SIZE, sizeof(*d->pieces))) ||
	    vq_init(&d->e, &blk_ops, guest, guest_size, pool, pool_size, iommu, iova_pages,
		    shared, error, 1, &doorbell, irq_fd, event_fd, wake_fd, -1)) {
		if (d) {
			free(d->iov);
			free(d->pieces);
		}
		free(d);
		return NULL;
	}
	d->fd = image_fd;
	d->capacity = capacity;
	d->readonly = readonly;
	memcpy(d->serial, serial, ID_BYTES);
	return d;
}

int bp_start(struct bp_dev *d) { return vq_start(&d->e); }

/* The length of the shared array this device uses (Python checks its own). */
int bp_shared_len(void) { return B_COUNT; }

void bp_free(struct bp_dev *d)
{
	if (!d)
		return;
	vq_destroy(&d->e);
	free(d->iov);
	free(d->pieces);
	free(d);
}
