/*
 * virtq.h - what the native device paths (netpath.c, blkpath.c) share: DMA through the
 * IOMMU table, the device side of split virtqueues, and the thread that waits on a device's
 * doorbells.  ptmig/devices/nativepath.py is the Python side.
 *
 * The rules are those of ptmig/devices/virtio/queue.py (the reference parser) and
 * ptmig/iommu.py: avail idx at most `size` ahead, heads and next links below the size, chains
 * at most `size` long (no loops), known flags only, no INDIRECT, non-zero lengths, no buffer
 * past 2^64, at most 64 MiB per chain, readable before writable.  Every access, ring or
 * buffer, is translated page by page through the IOMMU table, read live: these paths keep no
 * IOTLB, so an invalidation is exact as soon as Python holds the lock.  A DMA touches nothing
 * unless every page of it is allowed.  A violation stops the device: `broken` is set with the
 * reason and Python is told through `event_fd`; it marks the device DEVICE_NEEDS_RESET.
 *
 * All state shared with Python lives in one int64 array Python owns (layout below, mirrored in
 * nativepath.py); one mutex guards it.  The thread holds it while it works, Python takes it
 * around every control command, so a command never sees a request half done.
 */
#ifndef PTMIG_VIRTQ_H
#define PTMIG_VIRTQ_H

#include <pthread.h>
#include <stdint.h>

#include "chain.h"
#include "worker.h"

#define VQ_PAGE_SHIFT 12
#define VQ_PAGE_SIZE (1ull << VQ_PAGE_SHIFT)
#define VQ_MAX_QUEUES 2
#define VQ_MAX_SIZE 32768
#define VQ_ERROR_LEN 256
#define VQ_PASS_LIMIT 64 /* chains per queue per pass (process.py BATCH); the lock is released
			  * between passes, so control commands are never starved */

/* The shared int64 array. */
enum {
	/* per queue q, at q * Q_STRIDE */
	Q_READY, Q_SIZE, Q_DESC, Q_AVAIL, Q_USED, Q_NEXT_AVAIL, Q_NEXT_USED, Q_STRIDE,
	/* flags Python sets */
	S_ENABLED = VQ_MAX_QUEUES * Q_STRIDE, /* driver ok, not quiesced, not broken */
	S_LOG_ON,      /* DMA write logging: mark written guest pages in the log bitmap */
	/* flags the thread sets */
	S_BROKEN,      /* a fault stopped the device (2: Python has reported it) */
	S_FAULT_QUEUE,
	S_FAULT_IOVA,  /* -1 when the fault broke a ring rule rather than the IOMMU's */
	S_FAULT_DMA,   /* 1: an IOMMU fault, 0: a ring or request rule */
	S_ISR,         /* InterruptStatus bits raised since Python last folded them in */
	/* counters every device keeps */
	C_REQUESTS, C_INTERRUPTS, C_DOORBELLS, C_DMA_FAULTS,
	C_DEVICE       /* the device's own counters start here */
};


struct vq_used {
	uint16_t head;
	uint32_t len;
};

struct vq_engine;

/* What a device adds to the engine: one pass of its work (under the lock; returns 1 when work
 * is left), and what to do when its own fd (if any) polls readable. */
struct vq_ops {
	int (*service)(struct vq_engine *e);
	void (*readable)(struct vq_engine *e);
};

struct vq_engine {
	const struct vq_ops *ops;
	uint8_t *guest;
	uint64_t guest_size;
	uint8_t *pool;
	uint64_t pool_size;
	const volatile uint64_t *iommu; /* one entry per IOVA page (ptmig/iommu.py's encoding) */
	uint64_t iova_pages;
	uint8_t *log;                   /* DMA write log: bit p%8 of byte p/8 = guest page p */
	int64_t *s;                     /* the shared array */
	char *error;                    /* [VQ_ERROR_LEN] */
	int nqueues;
	int doorbell_fd[VQ_MAX_QUEUES];
	int pending[VQ_MAX_QUEUES];     /* a doorbell rang (or Python poked): look at the ring */
	int irq_fd, event_fd, wake_fd, extra_fd, epfd;
	struct vq_desc *chain;          /* one chain being walked: room for the largest queue */
	struct vq_used done[VQ_PASS_LIMIT]; /* chains this pass finished, not yet returned */
	int ndone;
	struct worker worker;
	pthread_mutex_t lock;
};

#define VQ(e, q, field) ((e)->s[(q) * Q_STRIDE + (field)])

int vq_init(struct vq_engine *e, const struct vq_ops *ops, uint8_t *guest, uint64_t guest_size,
	    uint8_t *pool, uint64_t pool_size, const uint64_t *iommu, uint64_t iova_pages,
	    int64_t *shared, char *error, int nqueues, const int *doorbells, int irq_fd,
	    int event_fd, int wake_fd, int extra_fd);
void vq_destroy(struct vq_engine *e);
int vq_start(struct vq_engine *e);
void vq_stop(struct vq_engine *e);

int vq_fail(struct vq_engine *e, int q, int64_t iova, int dma, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));
int vq_vfail(struct vq_engine *e, int q, int64_t iova, int dma, const char *fmt, va_list ap)
	__attribute__((format(printf, 5, 0)));

int vq_dma_check(struct vq_engine *e, int q, uint64_t iova, uint64_t len, int write);
int vq_dma(struct vq_engine *e, int q, uint64_t iova, void *buf, uint64_t len, int write);
uint8_t *vq_translate(struct vq_engine *e, uint64_t iova, int write, const char **why);
void vq_log_written(struct vq_engine *e, const uint8_t *p, uint64_t len);

int vq_pop(struct vq_engine *e, int q, uint16_t *head);
int vq_walk(struct vq_engine *e, int q, uint16_t head, struct vq_desc *c);
void vq_complete(struct vq_engine *e, uint16_t head, uint32_t len);
int vq_layout(int what);
void vq_lock(struct vq_engine *e);
void vq_unlock(struct vq_engine *e);
void vq_set_log(struct vq_engine *e, uint8_t *log);
void vq_poke(struct vq_engine *e);
int vq_run_once(struct vq_engine *e);

int vq_service_queues(struct vq_engine *e, int (*pass)(struct vq_engine *, int q, int *more));

#endif
