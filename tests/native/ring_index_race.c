/*
 * ring_index_race.c - reads a ring index with native/virtq.c's rd16 while another thread keeps
 * advancing it, as a driver advances its avail idx while the device reads it.
 *
 * usage: ring_index_race READS
 * Prints the number of reads that returned a value the writer never wrote (a torn read: one
 * byte from before the writer crossed a multiple of 256, the other from after); exits 1 if there
 * was any.  The writer counts in 64 bits and stores the low 16 as the index, so a value read
 * must be the low 16 bits of a count between the one before the read and the one after it.
 */
#include "virtq.c"

#include <pthread.h>

static uint8_t ram[VQ_PAGE_SIZE] __attribute__((aligned(4096)));
static uint64_t table[1] = {ENTRY_VALID | ENTRY_READ | ENTRY_WRITE};
static volatile int stop;
static uint64_t count; /* the writer's; the index is its low 16 bits */

static uint16_t *idx(void) { return (uint16_t *)(ram + 2); }

static void *writer(void *arg)
{
	(void)arg;
	for (uint64_t n = 1; !stop; n++) {
		__atomic_store_n(&count, n, __ATOMIC_RELEASE);
		__atomic_store_n(idx(), (uint16_t)n, __ATOMIC_RELEASE);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	long reads = atol(argv[1]), torn = 0;
	struct vq_engine e;
	memset(&e, 0, sizeof e);
	e.guest = ram;
	e.guest_size = sizeof ram;
	e.iommu = table;
	e.iova_pages = 1;
	pthread_t t;
	if (pthread_create(&t, NULL, writer, NULL))
		return 2;
	for (long i = 0; i < reads; i++) {
		uint16_t v;
		uint64_t before = __atomic_load_n(&count, __ATOMIC_ACQUIRE);
		if (rd16(&e, 0, 2, &v))
			return 2;
		uint64_t after = __atomic_load_n(&count, __ATOMIC_ACQUIRE);
		/* the index lags the count by at most one store */
		uint64_t lo = before ? before - 1 : 0;
		if (after - lo < 0xFFFF && (uint16_t)(v - (uint16_t)lo) > after - lo)
			torn++;
	}
	stop = 1;
	pthread_join(t, NULL);
	printf("%ld\n", torn);
	return torn != 0;
}
