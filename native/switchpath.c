/*
 * The learning switch's fast path: known unicast frames, forwarded by a native thread.
 *
 * ptmig/net/switch.py decides everything a learning switch decides -- learning, moves,
 * flooding, aging, counters, control replies -- in Python, through ptmig/net/fdb.py.  For the
 * frames that make up nearly all of the traffic none of that is needed: a unicast frame whose
 * destination is known and whose source is already learned behind the very endpoint it came
 * from changes nothing in the forwarding database; it only has to be sent on.  This file does
 * that part without the interpreter:
 *
 *   receive:  recvmmsg() on the switch's own (non-blocking) UDP socket, a batch at a time;
 *   forward:  a datagram of >= 14 bytes, unicast destination in the cache, source MAC in the
 *             cache behind exactly the sending endpoint, destination behind another endpoint:
 *             sendmmsg() it to the destination's endpoint and mark the source "heard";
 *   hand over: anything else goes, unchanged and with its source address, into the slow
 *             queue that Python drains (switch.py handles it exactly as without this file).
 *
 * Ordering: once a datagram is handed to Python, every later one is handed over too until
 * Python reports it done with all of them (`outstanding` back to 0), and the fast frames of a
 * batch are sent before the lock that Python needs to take the queue is released.  So frames
 * leave the switch in the order they arrived, whichever path they took.
 *
 * Nothing is dropped here: when the slow queue is full the thread sends what it has, waits for
 * Python to drain the queue, and leaves further datagrams in the socket's receive buffer (where
 * the kernel drops on overflow, exactly as it does for the pure-Python switch).  Send failures
 * are counted, as switch.py counts its own.
 *
 * The cache (MAC -> endpoint) is a copy of part of the forwarding database and never more:
 * Python adds an entry after the database learned it and removes it before the database
 * forgets or moves it.  Aging: the thread forwards only until `valid_until`, a deadline Python
 * renews at every sync after evicting the entries that could expire before the next one; the
 * "heard" flags it collects are folded back into the database so that MACs talking only through
 * this path stay alive.
 *
 * One mutex guards all of it; the thread holds it from a receive to the end of the sends.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_HEADER_LEN 14
#define MAC_LEN 6
#define BATCH 64                 /* datagrams per recvmmsg() */
#define DGRAM_MAX 65536          /* what switch.py passes to recvfrom() */
#define TABLE_SLOTS 1024         /* power of two: open addressing, linear probing */
#define TABLE_MAX (TABLE_SLOTS / 2)
#define SLOW_BYTES (4u << 20)    /* the slow queue; mirrored as SLOW_BYTES in switchnative.py */
#define USED_BIT (1ull << 48)    /* marks a used table slot (a MAC has 48 bits) */

/* Counters (indices mirrored in ptmig/net/switchnative.py). */
enum {
	C_FORWARDED,   /* frames taken by the fast path (each a known unicast) */
	C_SENT,        /* of those, sent */
	C_SEND_ERRORS, /* of those, refused by sendmmsg() */
	C_HANDED,      /* datagrams handed to Python */
	C_RECV_ERRORS, /* recvmmsg()/poll() failures other than "nothing pending" */
	C_BATCHES,     /* receive passes completed: Python's "has the thread done anything" */
	C_STALLS,      /* times the thread waited for Python to drain the slow queue */
	C_COUNT
};

/* What a Python thread blocked in sp_wait() wants to be woken for. */
enum { WAIT_NONE, WAIT_SLOW, WAIT_ANY };

union addr {
	struct sockaddr sa;
	struct sockaddr_in v4;
	struct sockaddr_in6 v6;
};

struct entry {
	uint64_t key;     /* 0: free; else USED_BIT | the MAC */
	union addr ep;
	uint8_t heard;    /* a frame from this MAC took the fast path since Python last asked */
};

/* One datagram in the slow queue: this header, then `len` bytes (struct SLOW_HEADER in
 * switchnative.py).  Port and flowinfo in host order, as Python's socket addresses have them. */
struct slow_header {
	uint32_t len;
	uint16_t family;
	uint16_t port;
	uint32_t flowinfo;
	uint32_t scope_id;
	uint8_t addr[16];
};

struct switchpath {
	int sock;
	int stop_fd;
	pthread_mutex_t lock;
	pthread_cond_t python_cond;  /* Python waits here for slow datagrams or progress */
	pthread_cond_t space_cond;   /* the thread waits here for room in the slow queue */
	int stopping;
	int python_wait;             /* WAIT_* */
	uint64_t valid_until;        /* CLOCK_MONOTONIC ns: no fast path after it until renewed */
	uint32_t outstanding;        /* handed to Python and not yet reported done */
	uint64_t counters[C_COUNT];
	unsigned entries;
	struct entry table[TABLE_SLOTS];
	uint8_t *slow;               /* [SLOW_BYTES]: records, oldest first */
	size_t slow_len;
	uint8_t *bufs;               /* [BATCH][DGRAM_MAX] */
	struct mmsghdr rx[BATCH];
	struct iovec rx_iov[BATCH];
	union addr rx_addr[BATCH];
	struct mmsghdr tx[BATCH];
	struct iovec tx_iov[BATCH];
	union addr tx_addr[BATCH];
};

/* ---- helpers --------------------------------------------------------------------------------- */

static uint64_t monotonic_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t mac_key(const uint8_t *mac)
{
	uint64_t key = 0;
	for (int i = 0; i < MAC_LEN; i++)
		key = key << 8 | mac[i];
	return key | USED_BIT;
}

static socklen_t addr_len(const union addr *a)
{
	return a->sa.sa_family == AF_INET6 ? sizeof(a->v6) : sizeof(a->v4);
}

/* The same endpoint as Python's address tuples compare: (host, port) for IPv4,
 * (host, port, flowinfo, scope_id) for IPv6. */
static int same_endpoint(const union addr *a, const union addr *b)
{
	if (a->sa.sa_family != b->sa.sa_family)
		return 0;
	if (a->sa.sa_family == AF_INET)
		return a->v4.sin_port == b->v4.sin_port &&
		       a->v4.sin_addr.s_addr == b->v4.sin_addr.s_addr;
	if (a->sa.sa_family == AF_INET6)
		return a->v6.sin6_port == b->v6.sin6_port &&
		       a->v6.sin6_flowinfo == b->v6.sin6_flowinfo &&
		       a->v6.sin6_scope_id == b->v6.sin6_scope_id &&
		       memcmp(&a->v6.sin6_addr, &b->v6.sin6_addr, sizeof(b->v6.sin6_addr)) == 0;
	return 0;
}

static int readable(int fd)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	return poll(&p, 1, 0) > 0;
}

/* ---- the cache: open addressing, linear probing, backward-shift deletion -------------------- */

static unsigned home_slot(uint64_t key)
{
	return (unsigned)((key * 0x9E3779B97F4A7C15ull) >> 54) & (TABLE_SLOTS - 1);
}

static int find_slot(const struct switchpath *sp, uint64_t key)
{
	for (unsigned i = home_slot(key), n = 0; n < TABLE_SLOTS; i = (i + 1) & (TABLE_SLOTS - 1), n++) {
		if (sp->table[i].key == key)
			return (int)i;
		if (sp->table[i].key == 0)
			return -1;
	}
	return -1;
}

static struct entry *find(struct switchpath *sp, const uint8_t *mac)
{
	int slot = find_slot(sp, mac_key(mac));
	return slot < 0 ? NULL : &sp->table[slot];
}

/* Empty slot `hole` and pull later entries of its probe run back so lookups still find them. */
static void remove_slot(struct switchpath *sp, unsigned hole)
{
	const unsigned mask = TABLE_SLOTS - 1;
	sp->table[hole].key = 0;
	for (unsigned j = (hole + 1) & mask; sp->table[j].key; j = (j + 1) & mask) {
		unsigned want = home_slot(sp->table[j].key);
		/* The entry at j may fill the hole unless its home lies cyclically in (hole, j]. */
		int stays = hole < j ? (want > hole && want <= j) : (want > hole || want <= j);
		if (!stays) {
			sp->table[hole] = sp->table[j];
			sp->table[j].key = 0;
			hole = j;
		}
	}
	sp->entries--;
}

/* ---- the slow queue --------------------------------------------------------------------------- */

static void fill_header(struct slow_header *h, const union addr *from, uint32_t len)
{
	memset(h, 0, sizeof(*h));
	h->len = len;
	h->family = from->sa.sa_family;
	if (from->sa.sa_family == AF_INET) {
		h->port = ntohs(from->v4.sin_port);
		memcpy(h->addr, &from->v4.sin_addr, sizeof(from->v4.sin_addr));
	} else if (from->sa.sa_family == AF_INET6) {
		h->port = ntohs(from->v6.sin6_port);
		h->flowinfo = ntohl(from->v6.sin6_flowinfo);
		h->scope_id = from->v6.sin6_scope_id;
		memcpy(h->addr, &from->v6.sin6_addr, sizeof(from->v6.sin6_addr));
	}
}

static void wake_python(struct switchpath *sp)
{
	if (sp->python_wait == WAIT_ANY || (sp->python_wait == WAIT_SLOW && sp->slow_len))
		pthread_cond_signal(&sp->python_cond);
}

/* Send the batch's fast frames; a refused one is counted and skipped, the rest still go. */
static void flush(struct switchpath *sp, unsigned *ntx)
{
	unsigned off = 0;
	while (off < *ntx) {
		int sent = sendmmsg(sp->sock, sp->tx + off, *ntx - off, MSG_DONTWAIT);
		if (sent > 0) {
			sp->counters[C_SENT] += (unsigned)sent;
			off += (unsigned)sent;
		} else if (sent < 0 && errno == EINTR) {
			continue;
		} else {
			sp->counters[C_SEND_ERRORS]++;
			off++;
		}
	}
	*ntx = 0;
}

/* Queue datagram i for Python. When the queue is full, send the fast frames received before it
 * (they go first either way) and wait for Python to make room. Returns 0 if stopping. */
static int hand_over(struct switchpath *sp, unsigned i, unsigned *ntx)
{
	uint32_t len = sp->rx[i].msg_len;
	size_t need = sizeof(struct slow_header) + len;
	if (sp->slow_len + need > SLOW_BYTES) {
		flush(sp, ntx);
		sp->counters[C_STALLS]++;
		while (sp->slow_len + need > SLOW_BYTES && !sp->stopping) {
			pthread_cond_signal(&sp->python_cond);
			pthread_cond_wait(&sp->space_cond, &sp->lock);
		}
		if (sp->stopping)
			return 0;
	}
	struct slow_header h;
	fill_header(&h, &sp->rx_addr[i], len);
	memcpy(sp->slow + sp->slow_len, &h, sizeof(h));
	memcpy(sp->slow + sp->slow_len + sizeof(h), sp->rx_iov[i].iov_base, len);
	sp->slow_len += need;
	sp->outstanding++;
	sp->counters[C_HANDED]++;
	return 1;
}

/* ---- the fast path ---------------------------------------------------------------------------- */

/* The cache entry of the endpoint datagram i goes to, or NULL if Python must look at it. */
static const struct entry *fast_target(struct switchpath *sp, unsigned i)
{
	const uint8_t *frame = sp->rx_iov[i].iov_base;
	if (sp->rx[i].msg_len < ETH_HEADER_LEN || (sp->rx[i].msg_hdr.msg_flags & MSG_TRUNC))
		return NULL;
	if (frame[0] & 1)  /* broadcast or multicast: flooded by Python */
		return NULL;
	const struct entry *dst = find(sp, frame);
	if (!dst)
		return NULL;
	struct entry *src = find(sp, frame + MAC_LEN);
	const union addr *from = &sp->rx_addr[i];
	if (!src || !same_endpoint(from, &src->ep))  /* Python learns or moves it */
		return NULL;
	if (same_endpoint(from, &dst->ep))  /* hairpin: Python drops and counts it */
		return NULL;
	src->heard = 1;
	return dst;
}

static void serve_batch(struct switchpath *sp, unsigned n)
{
	int fast_ok = monotonic_ns() <= sp->valid_until;
	unsigned ntx = 0;
	for (unsigned i = 0; i < n; i++) {
		const struct entry *dst = NULL;
		if (fast_ok && sp->outstanding == 0)
			dst = fast_target(sp, i);
		if (!dst) {
			if (!hand_over(sp, i, &ntx))
				return;
			continue;
		}
		sp->tx_addr[ntx] = dst->ep;
		sp->tx_iov[ntx].iov_base = sp->rx_iov[i].iov_base;
		sp->tx_iov[ntx].iov_len = sp->rx[i].msg_len;
		sp->tx[ntx].msg_hdr.msg_namelen = addr_len(&dst->ep);
		sp->counters[C_FORWARDED]++;
		ntx++;
	}
	flush(sp, &ntx);
}

/* One receive pass under the lock. Returns how many datagrams it took. */
static int receive_pass(struct switchpath *sp)
{
	for (unsigned i = 0; i < BATCH; i++) {
		sp->rx[i].msg_hdr.msg_namelen = sizeof(sp->rx_addr[i]);
		sp->rx[i].msg_hdr.msg_flags = 0;
	}
	int n = recvmmsg(sp->sock, sp->rx, BATCH, MSG_DONTWAIT, NULL);
	if (n > 0)
		serve_batch(sp, (unsigned)n);
	else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
		sp->counters[C_RECV_ERRORS]++;  /* e.g. an ICMP error reported on the socket */
	sp->counters[C_BATCHES]++;
	wake_python(sp);
	return n;
}

/* ---- the API (ptmig/net/switchnative.py) ------------------------------------------------------ */

struct switchpath *sp_new(int sock)
{
	struct switchpath *sp = calloc(1, sizeof(*sp));
	if (!sp)
		return NULL;
	sp->sock = sock;
	sp->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	sp->slow = malloc(SLOW_BYTES);
	sp->bufs = malloc((size_t)BATCH * DGRAM_MAX);
	pthread_condattr_t attr;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	if (sp->stop_fd < 0 || !sp->slow || !sp->bufs ||
	    pthread_cond_init(&sp->python_cond, &attr) || pthread_cond_init(&sp->space_cond, &attr)) {
		if (sp->stop_fd >= 0)
			close(sp->stop_fd);
		free(sp->slow);
		free(sp->bufs);
		free(sp);
		pthread_condattr_destroy(&attr);
		return NULL;
	}
	pthread_condattr_destroy(&attr);
	pthread_mutex_init(&sp->lock, NULL);
	for (unsigned i = 0; i < BATCH; i++) {
		sp->rx_iov[i].iov_base = sp->bufs + (size_t)i * DGRAM_MAX;
		sp->rx_iov[i].iov_len = DGRAM_MAX;
		sp->rx[i].msg_hdr.msg_name = &sp->rx_addr[i];
		sp->rx[i].msg_hdr.msg_iov = &sp->rx_iov[i];
		sp->rx[i].msg_hdr.msg_iovlen = 1;
		sp->tx[i].msg_hdr.msg_name = &sp->tx_addr[i];
		sp->tx[i].msg_hdr.msg_iov = &sp->tx_iov[i];
		sp->tx[i].msg_hdr.msg_iovlen = 1;
	}
	return sp;
}

void sp_free(struct switchpath *sp)
{
	pthread_cond_destroy(&sp->python_cond);
	pthread_cond_destroy(&sp->space_cond);
	pthread_mutex_destroy(&sp->lock);
	close(sp->stop_fd);
	free(sp->slow);
	free(sp->bufs);
	free(sp);
}

/* The thread's loop, called from a Python thread (ctypes released the GIL); returns after
 * sp_stop(). Signals are blocked here so that the interpreter's main thread receives them. */
int sp_run(struct switchpath *sp)
{
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	struct pollfd fds[2] = {{.fd = sp->sock, .events = POLLIN}, {.fd = sp->stop_fd, .events = POLLIN}};
	int more = 0;
	for (;;) {
		int failed = !more && poll(fds, 2, -1) < 0 && errno != EINTR;
		if (failed)
			usleep(1000);  /* e.g. ENOMEM: try again shortly (a receive pass is harmless) */
		pthread_mutex_lock(&sp->lock);
		if (sp->stopping) {
			pthread_mutex_unlock(&sp->lock);
			return 0;
		}
		sp->counters[C_RECV_ERRORS] += (uint64_t)failed;
		more = receive_pass(sp) == BATCH;  /* a full batch: more is probably waiting */
		pthread_mutex_unlock(&sp->lock);
	}
}

void sp_stop(struct switchpath *sp)
{
	uint64_t one = 1;
	pthread_mutex_lock(&sp->lock);
	sp->stopping = 1;
	pthread_cond_broadcast(&sp->python_cond);
	pthread_cond_broadcast(&sp->space_cond);
	pthread_mutex_unlock(&sp->lock);
	ssize_t r = write(sp->stop_fd, &one, sizeof(one));
	(void)r;  /* EAGAIN: the counter is already non-zero, the thread wakes anyway */
}

/* Wait up to timeout_ms. Returns 1 when slow datagrams are queued; with `any`, 2 once receive
 * passes went past `seen` and nothing is left unread on the socket; 0 on timeout or stop. */
int sp_wait(struct switchpath *sp, int any, uint64_t seen, int timeout_ms)
{
	uint64_t deadline = monotonic_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull;
	struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ull),
			      .tv_nsec = (long)(deadline % 1000000000ull)};
	int status = 0;
	pthread_mutex_lock(&sp->lock);
	while (!sp->stopping) {
		if (sp->slow_len) {
			status = 1;
			break;
		}
		if (any && sp->counters[C_BATCHES] != seen && !readable(sp->sock)) {
			status = 2;
			break;
		}
		sp->python_wait = any ? WAIT_ANY : WAIT_SLOW;
		if (pthread_cond_timedwait(&sp->python_cond, &sp->lock, &ts) == ETIMEDOUT)
			break;
	}
	sp->python_wait = WAIT_NONE;
	pthread_mutex_unlock(&sp->lock);
	return status;
}

/* Move whole queued records (oldest first) into buf; returns the bytes moved. Python reports
 * the datagrams done with sp_done() once it has handled them. */
size_t sp_take(struct switchpath *sp, uint8_t *buf, size_t cap)
{
	pthread_mutex_lock(&sp->lock);
	size_t n = 0;
	while (n < sp->slow_len) {
		/* Records are packed back to back, so a header may sit at any offset: copy it out
		 * rather than dereference a misaligned pointer. */
		struct slow_header h;
		memcpy(&h, sp->slow + n, sizeof(h));
		size_t size = sizeof(h) + h.len;
		if (n + size > cap)
			break;
		n += size;
	}
	memcpy(buf, sp->slow, n);
	memmove(sp->slow, sp->slow + n, sp->slow_len - n);
	sp->slow_len -= n;
	if (n)
		pthread_cond_signal(&sp->space_cond);
	pthread_mutex_unlock(&sp->lock);
	return n;
}

void sp_done(struct switchpath *sp, uint32_t count)
{
	pthread_mutex_lock(&sp->lock);
	sp->outstanding -= count < sp->outstanding ? count : sp->outstanding;
	pthread_mutex_unlock(&sp->lock);
}

/* Cache `mac` behind an endpoint. Returns 0, -ENOSPC when the cache is full (the MAC then just
 * takes the slow path), -EAFNOSUPPORT for an unknown family. */
int sp_put(struct switchpath *sp, const uint8_t *mac, int family, int port, const uint8_t *addr,
	   uint32_t flowinfo, uint32_t scope_id)
{
	union addr ep;
	memset(&ep, 0, sizeof(ep));
	if (family == AF_INET) {
		ep.v4.sin_family = AF_INET;
		ep.v4.sin_port = htons((uint16_t)port);
		memcpy(&ep.v4.sin_addr, addr, sizeof(ep.v4.sin_addr));
	} else if (family == AF_INET6) {
		ep.v6.sin6_family = AF_INET6;
		ep.v6.sin6_port = htons((uint16_t)port);
		ep.v6.sin6_flowinfo = htonl(flowinfo);
		ep.v6.sin6_scope_id = scope_id;
		memcpy(&ep.v6.sin6_addr, addr, sizeof(ep.v6.sin6_addr));
	} else {
		return -EAFNOSUPPORT;
	}
	uint64_t key = mac_key(mac);
	int err = 0;
	pthread_mutex_lock(&sp->lock);
	int slot = find_slot(sp, key);
	if (slot >= 0) {
		sp->table[slot].ep = ep;
	} else if (sp->entries >= TABLE_MAX) {
		err = -ENOSPC;
	} else {
		unsigned i = home_slot(key);
		while (sp->table[i].key)
			i = (i + 1) & (TABLE_SLOTS - 1);
		sp->table[i] = (struct entry){.key = key, .ep = ep};
		sp->entries++;
	}
	pthread_mutex_unlock(&sp->lock);
	return err;
}

/* Forget `mac`; once this returns the thread will not forward with it. 1 if it was cached. */
int sp_drop(struct switchpath *sp, const uint8_t *mac)
{
	pthread_mutex_lock(&sp->lock);
	int slot = find_slot(sp, mac_key(mac));
	if (slot >= 0)
		remove_slot(sp, (unsigned)slot);
	pthread_mutex_unlock(&sp->lock);
	return slot >= 0;
}

/* Copy up to `max` MACs heard since the last call into out (6 bytes each) and clear their flags. */
int sp_take_heard(struct switchpath *sp, uint8_t *out, int max)
{
	int n = 0;
	pthread_mutex_lock(&sp->lock);
	for (unsigned i = 0; i < TABLE_SLOTS && n < max; i++) {
		struct entry *e = &sp->table[i];
		if (!e->key || !e->heard)
			continue;
		for (int b = 0; b < MAC_LEN; b++)
			out[n * MAC_LEN + b] = (uint8_t)(e->key >> (8 * (MAC_LEN - 1 - b)));
		e->heard = 0;
		n++;
	}
	pthread_mutex_unlock(&sp->lock);
	return n;
}

/* Allow the fast path for `horizon_ns` from now (Python evicted what could expire sooner). */
void sp_renew(struct switchpath *sp, uint64_t horizon_ns)
{
	pthread_mutex_lock(&sp->lock);
	sp->valid_until = monotonic_ns() + horizon_ns;
	pthread_mutex_unlock(&sp->lock);
}

void sp_counters(struct switchpath *sp, uint64_t *out)
{
	pthread_mutex_lock(&sp->lock);
	memcpy(out, sp->counters, sizeof(sp->counters));
	pthread_mutex_unlock(&sp->lock);
}
