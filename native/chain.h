/*
 * chain.h - the one walker of split-virtqueue descriptor chains (virtq.c), shared by the
 * device paths (netpath.c, blkpath.c: descriptors read through the IOMMU table, by IOVA) and
 * the shadow data plane (dataplane.c: read from guest RAM, by guest-physical address, checked
 * against the RAM regions).
 *
 * The walker applies the rules every reader of a chain shares (those of
 * ptmig/devices/virtio/queue.py): at most `size` descriptors (no loops), next links below the
 * size, known flags only, no INDIRECT, non-zero lengths, no buffer past 2^64, at most 64 MiB
 * per chain, readable before writable.  The caller supplies how a descriptor is read (its
 * address translation), what more a buffer must satisfy, and how a violation is reported.
 */
#ifndef PTMIG_CHAIN_H
#define PTMIG_CHAIN_H

#include <stdarg.h>
#include <stdint.h>

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	int writable;
};

struct chain_walker {
	void *ctx;
	uint32_t size; /* the queue size */
	/* Read descriptor `index` (16 bytes as in the ring): 0, or -1 once it has failed. */
	int (*read_desc)(void *ctx, uint32_t index, uint8_t raw[16]);
	/* Optional: descriptor `index`, the n-th of the chain at `head`, passed every common
	 * rule; 0 to go on, or -1 once it has failed. */
	int (*accept)(void *ctx, uint16_t head, uint32_t n, uint32_t index, const struct vq_desc *d);
	/* Report a violation (the text names the descriptor and the rule); returns -1. */
	int (*fail)(void *ctx, const char *fmt, va_list ap);
};

/* Walk and validate the chain at `head` into c[] (room for `size` entries): its length, or
 * -1 after w->fail (or a callback) reported why. */
int vq_walk_chain(const struct chain_walker *w, uint16_t head, struct vq_desc *c);

#endif
