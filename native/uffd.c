/*
 * uffd.c - the destination's post-copy fault server: guest RAM registered with userfaultfd
 * (MISSING mode), one native thread reading the faults, and the installs (UFFDIO_COPY).
 *
 * Every page of the range is in one of four states:
 *   MISSING    not here yet; the first fault queues a request for it (once)
 *   REQUESTED  queued or asked for; the fault waits for the install
 *   ZERO       known to be a zero page (the source sent it as a hole): the fault thread
 *              installs it itself with UFFDIO_ZEROPAGE, nothing is requested
 *   PRESENT    installed (or received before the range was registered)
 *
 * Why this cannot deadlock on the GIL: the fault thread is a pthread that never calls into
 * Python, so it reads faults, serves ZERO pages and queues requests while any Python thread
 * holds the GIL, even one blocked on a missing page.  Installs (`uffd_install`) and waits
 * (`uffd_wait_present`) are ctypes calls, which release the GIL for their whole duration.
 * The Python part of the loop receives the pages (and, on an encrypted link, is the fetcher
 * that reads the request queue): it needs the GIL, so VMM code must never touch a MISSING
 * page with the GIL held; it asks for the range with `uffd_wait_present` first (GIL
 * released meanwhile).  vCPUs fault inside KVM_RUN, which runs with the GIL released.
 *
 * The request sender (`uffd_start_sender`, on a plain socket): a second native thread that
 * takes the queue as soon as the fault thread signals it and writes the PageRequest frames
 * onto the return path itself, so a remote fault's request never waits for the GIL.  It
 * only writes (the Python receiver owns the reading side).  A write that fails (the link
 * broke) ends it with the errno kept (`uffd_sender_error`); the pages it had taken stay
 * REQUESTED, and a resumed link asks for every REQUESTED page again.
 *
 * A COPY that finds the page already there (EEXIST: another install won the race) counts as
 * installed and wakes the range, since a failed COPY wakes no one.  A fault on a PRESENT page
 * (its install finished between the fault and our read of it) is answered with UFFDIO_WAKE.
 * Latency of a remote fault: from the fault thread reading it to the install that served it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>

#include "worker.h"

#define PAGE 4096ULL
#define MSGS 64
#define SEND_BATCH 512      /* requests the sender takes at a time */
#define FRAME_PAGE_REQUEST 15 /* frames.FrameType.PAGE_REQUEST */
#define REQUEST_FRAME 24    /* 8-byte header, crc32, <Q first_page, I npages> */

enum { MISSING = 0, REQUESTED = 1, ZERO = 2, PRESENT = 3 };

struct uffd_stats {
	uint64_t faults;      /* fault events read */
	uint64_t requests;    /* pages queued for the fetcher */
	uint64_t zero_served; /* faults the thread served itself (known zero pages) */
	uint64_t installed;   /* pages made present by uffd_install / zero serving */
	uint64_t eexist;      /* installs that found the page already there */
	uint64_t missing;     /* pages only the source has (MISSING or REQUESTED) */
	uint64_t blocktime_us; /* sum of remote fault latencies */
	uint64_t samples;     /* latencies recorded (see uffd_latencies) */
};

struct uffd_server {
	int uffd, wake_fd, request_fd;
	uint64_t base, npages;
	uint8_t *state;
	uint64_t *fault_ns; /* when the first fault on a page was read; 0: none pending */
	uint64_t *queue;    /* requests not yet taken, a ring */
	uint64_t qhead, qlen;
	uint32_t *lat_us;
	uint64_t lat_cap;
	struct uffd_stats st;
	pthread_mutex_t lock;
	pthread_cond_t present;
	struct worker worker;
	int error; /* the fault thread's fatal errno, 0 while it works */
	/* the request sender: its socket, how many pages a frame may ask for, its thread */
	int send_fd, send_wake_fd;
	uint64_t send_max_pages;
	struct worker sender;
	int send_error; /* the sender's fatal errno (0 while it works or never ran) */
	uint64_t frames_sent;
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int wake_range(struct uffd_server *s, uint64_t pfn, uint64_t n)
{
	struct uffdio_range r = { .start = s->base + pfn * PAGE, .len = n * PAGE };
	return ioctl(s->uffd, UFFDIO_WAKE, &r) ? -errno : 0;
}

/* Under the lock: pages [pfn, pfn+n) became present; record the faults they served. */
static void mark_present(struct uffd_server *s, uint64_t pfn, uint64_t n)
{
	uint64_t t = now_ns();
	for (uint64_t p = pfn; p < pfn + n; p++) {
		if (s->state[p] == PRESENT)
			continue;
		if (s->state[p] != ZERO)
			s->st.missing--;
		s->state[p] = PRESENT;
		s->st.installed++;
		if (s->fault_ns[p]) {
			uint64_t us = (t - s->fault_ns[p]) / 1000;
			s->st.blocktime_us += us;
			if (s->st.samples < s->lat_cap)
				s->lat_us[s->st.samples] = (uint32_t)(us > UINT32_MAX ? UINT32_MAX : us);
			s->st.samples++;
			s->fault_ns[p] = 0;
		}
	}
	pthread_cond_broadcast(&s->present);
}

/* Under the lock: queue `pfn` for the fetcher unless it is asked for already. */
static int request_page(struct uffd_server *s, uint64_t pfn)
{
	if (s->state[pfn] != MISSING)
		return 0;
	s->state[pfn] = REQUESTED;
	s->queue[(s->qhead + s->qlen) % s->npages] = pfn;
	s->qlen++;
	s->st.requests++;
	return 1;
}

static void serve_zero(struct uffd_server *s, uint64_t pfn)
{
	struct uffdio_zeropage z = { .range = { .start = s->base + pfn * PAGE, .len = PAGE } };
	if (ioctl(s->uffd, UFFDIO_ZEROPAGE, &z) && errno == EEXIST)
		wake_range(s, pfn, 1);
	pthread_mutex_lock(&s->lock);
	s->st.zero_served += s->state[pfn] != PRESENT; /* once, whoever served it */
	mark_present(s, pfn, 1);
	pthread_mutex_unlock(&s->lock);
}

static void handle_fault(struct uffd_server *s, uint64_t addr)
{
	if (addr < s->base || addr >= s->base + s->npages * PAGE)
		return; /* not ours: cannot happen for a registered range */
	uint64_t pfn = (addr - s->base) / PAGE;
	int queued = 0, st;
	pthread_mutex_lock(&s->lock);
	s->st.faults++;
	if (!s->fault_ns[pfn] && s->state[pfn] != PRESENT)
		s->fault_ns[pfn] = now_ns();
	st = s->state[pfn];
	if (st == MISSING)
		queued = request_page(s, pfn);
	pthread_mutex_unlock(&s->lock);
	if (st == PRESENT)
		wake_range(s, pfn, 1);
	else if (st == ZERO)
		serve_zero(s, pfn);
	if (queued)
		fd_signal(s->request_fd);
}

/* A native thread's wait: until `fd` is ready for `events` or `wake_fd` (its stop) is
 * readable.  1 if woken through wake_fd, 0 otherwise, -errno if poll failed. */
static int wait_or_wake(int fd, short events, int wake_fd)
{
	struct pollfd fds[2] = { { .fd = fd, .events = events },
				 { .fd = wake_fd, .events = POLLIN } };
	if (poll(fds, 2, -1) < 0)
		return errno == EINTR ? 0 : -errno;
	return fds[1].revents != 0;
}

static int stopping(struct uffd_server *s, struct worker *w)
{
	pthread_mutex_lock(&s->lock);
	int stop = w->stop;
	pthread_mutex_unlock(&s->lock);
	return stop;
}

static void *fault_thread(void *arg)
{
	struct uffd_server *s = arg;
	struct uffd_msg msgs[MSGS];
	for (;;) {
		int w = wait_or_wake(s->uffd, POLLIN, s->wake_fd);
		if (w < 0) {
			s->error = -w;
			return NULL;
		}
		if (stopping(s, &s->worker))
			return NULL;
		ssize_t r = read(s->uffd, msgs, sizeof(msgs));
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			s->error = errno;
			return NULL;
		}
		for (ssize_t i = 0; i < r / (ssize_t)sizeof(msgs[0]); i++)
			if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
				handle_fault(s, msgs[i].arg.pagefault.address & ~(PAGE - 1));
	}
}

void uffd_close(struct uffd_server *s);

/* Register [base, base + npages pages) and take the initial state of every page (`state`,
 * one byte per page: MISSING, ZERO or PRESENT).  NULL with *err = errno on failure. */
struct uffd_server *uffd_open(uint64_t base, uint64_t npages, const uint8_t *state,
			      uint64_t latency_samples, int *err)
{
	struct uffd_server *s = calloc(1, sizeof(*s));
	if (!s) {
		*err = ENOMEM;
		return NULL;
	}
	s->uffd = s->wake_fd = s->request_fd = s->send_fd = s->send_wake_fd = -1;
	s->base = base;
	s->npages = npages;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->present, NULL);
	s->state = malloc(npages);
	s->fault_ns = calloc(npages, sizeof(uint64_t));
	s->queue = calloc(npages, sizeof(uint64_t));
	s->lat_cap = latency_samples;
	s->lat_us = calloc(latency_samples ? latency_samples : 1, sizeof(uint32_t));
	if (!s->state || !s->fault_ns || !s->queue || !s->lat_us) {
		*err = ENOMEM;
		goto fail;
	}
	for (uint64_t p = 0; p < npages; p++) {
		if (state[p] != MISSING && state[p] != ZERO && state[p] != PRESENT) {
			*err = EINVAL;
			goto fail;
		}
		s->state[p] = state[p];
		s->st.missing += state[p] == MISSING;
	}
	s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s->request_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	/* not UFFD_USER_MODE_ONLY: KVM's own accesses to guest RAM must fault too */
	s->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (s->wake_fd < 0 || s->request_fd < 0 || s->uffd < 0) {
		*err = errno;
		goto fail;
	}
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	struct uffdio_register reg = { .range = { .start = base, .len = npages * PAGE },
				       .mode = UFFDIO_REGISTER_MODE_MISSING };
	if (ioctl(s->uffd, UFFDIO_API, &api) || ioctl(s->uffd, UFFDIO_REGISTER, &reg)) {
		*err = errno;
		goto fail;
	}
	int e = worker_start(&s->worker, fault_thread, s, "ptmig-uffd");
	if (e) {
		*err = -e;
		goto fail;
	}
	return s;
fail:
	uffd_close(s);
	return NULL;
}

/* Install `n` pages at `pfn` from `data` (UFFDIO_COPY, which wakes their waiters).  0 or
 * -errno; pages already there count as installed (their waiters are woken). */
int uffd_install(struct uffd_server *s, uint64_t pfn, uint64_t n, const void *data)
{
	if (pfn > s->npages || n > s->npages - pfn)
		return -ERANGE;
	uint64_t done = 0;
	while (done < n) {
		struct uffdio_copy c = { .dst = s->base + (pfn + done) * PAGE,
					 .src = (uint64_t)(uintptr_t)data + done * PAGE,
					 .len = (n - done) * PAGE };
		if (ioctl(s->uffd, UFFDIO_COPY, &c) == 0) {
			done = n;
			break;
		}
		if (errno == EEXIST) {
			/* nothing was copied: the range's first page is there already (an
			 * earlier install); wake its waiters and go on after it */
			pthread_mutex_lock(&s->lock);
			s->st.eexist++;
			pthread_mutex_unlock(&s->lock);
			wake_range(s, pfn + done, 1);
			done++;
			continue;
		}
		if (errno == EAGAIN && c.copy > 0) {
			done += (uint64_t)c.copy / PAGE;
			continue;
		}
		return -errno;
	}
	pthread_mutex_lock(&s->lock);
	mark_present(s, pfn, n);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* Pages [pfn, pfn+n) are to come from the source after all (the server was opened before
 * the source's last pages were known: the caller punches these out of the memfd right after,
 * before anything can touch them).  PRESENT and ZERO pages become MISSING; MISSING and
 * REQUESTED ones stay as they are.  Returns how many changed, or -ERANGE. */
int64_t uffd_mark_missing(struct uffd_server *s, uint64_t pfn, uint64_t n)
{
	if (pfn > s->npages || n > s->npages - pfn)
		return -ERANGE;
	int64_t changed = 0;
	pthread_mutex_lock(&s->lock);
	for (uint64_t p = pfn; p < pfn + n; p++) {
		if (s->state[p] != PRESENT && s->state[p] != ZERO)
			continue;
		s->state[p] = MISSING;
		s->st.missing++;
		changed++;
	}
	pthread_mutex_unlock(&s->lock);
	return changed;
}

/* Take up to `max` queued requests into `out`; returns how many. */
uint64_t uffd_take_requests(struct uffd_server *s, uint64_t *out, uint64_t max)
{
	fd_drain(s->request_fd);
	pthread_mutex_lock(&s->lock);
	uint64_t n = 0;
	while (n < max && s->qlen) {
		out[n++] = s->queue[s->qhead];
		s->qhead = (s->qhead + 1) % s->npages;
		s->qlen--;
	}
	if (s->qlen)
		fd_signal(s->request_fd);
	pthread_mutex_unlock(&s->lock);
	return n;
}

/* zlib's CRC-32 (the frames' checksum), bit by bit: a request frame has 20 bytes to cover. */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
	crc = ~crc;
	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xEDB88320U & (0U - (crc & 1U)));
	}
	return ~crc;
}

static void put_le(uint8_t *p, uint64_t v, int bytes)
{
	for (int i = 0; i < bytes; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* One PageRequest frame for [first, first + n) into `out` (REQUEST_FRAME bytes), as
 * frames.encode_event writes it. */
static void encode_request(uint8_t *out, uint64_t first, uint32_t n)
{
	uint8_t *head = out, *meta = out + 12;
	head[0] = FRAME_PAGE_REQUEST;
	head[1] = 0;		       /* flags */
	put_le(head + 2, 0, 2);	       /* reserved */
	put_le(head + 4, 12, 4);       /* metadata length */
	put_le(meta, first, 8);
	put_le(meta + 8, n, 4);
	put_le(out + 8, crc32_update(crc32_update(0, head, 8), meta, 12), 4);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The taken page numbers as frames of consecutive pages (each at most `max_pages`); returns
 * the bytes written into `out` (room for one frame per page). */
static size_t encode_requests(uint64_t *pfns, uint64_t n, uint64_t max_pages, uint8_t *out)
{
	size_t len = 0;
	qsort(pfns, n, sizeof(pfns[0]), cmp_u64);
	for (uint64_t i = 0; i < n;) {
		uint64_t first = pfns[i], run = 1;
		while (i + run < n && run < max_pages && pfns[i + run] == first + run)
			run++;
		encode_request(out + len, first, (uint32_t)run);
		len += REQUEST_FRAME;
		i += run;
		while (i < n && pfns[i] < first + run) /* a page taken twice cannot be, but */
			i++;
	}
	return len;
}

/* Every byte onto the (non-blocking) socket; 0, -ECANCELED when asked to stop, or -errno. */
static int send_all(struct uffd_server *s, const uint8_t *buf, size_t len)
{
	while (len) {
		ssize_t n = send(s->send_fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n == 0)
			return -EPIPE;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		int w = wait_or_wake(s->send_fd, POLLOUT, s->send_wake_fd);
		if (w)
			return w < 0 ? w : -ECANCELED;
	}
	return 0;
}

static void *sender_thread(void *arg)
{
	struct uffd_server *s = arg;
	uint64_t pfns[SEND_BATCH];
	uint8_t frames[SEND_BATCH * REQUEST_FRAME];
	for (;;) {
		int w = wait_or_wake(s->request_fd, POLLIN, s->send_wake_fd);
		if (w < 0) {
			s->send_error = -w;
			return NULL;
		}
		if (stopping(s, &s->sender))
			return NULL;
		uint64_t n = uffd_take_requests(s, pfns, SEND_BATCH);
		if (!n)
			continue;
		size_t len = encode_requests(pfns, n, s->send_max_pages, frames);
		int r = send_all(s, frames, len);
		if (r == -ECANCELED)
			return NULL;
		if (r) {
			s->send_error = -r; /* the pages stay REQUESTED: a resumed link asks again */
			return NULL;
		}
		pthread_mutex_lock(&s->lock);
		s->frames_sent += len / REQUEST_FRAME;
		pthread_mutex_unlock(&s->lock);
	}
}

/* Write the requests onto socket `fd` from a native thread from now on (instead of the
 * fetcher taking them): frames of at most `max_pages` pages.  The thread writes on its own
 * duplicate of `fd` (closed by uffd_stop_sender), so a caller that closes its socket first
 * can never have requests written into whatever reuses the number.  0, -EBUSY if it runs
 * already, -EINVAL, or -errno. */
int uffd_start_sender(struct uffd_server *s, int fd, uint64_t max_pages)
{
	if (fd < 0 || max_pages == 0 || max_pages > UINT32_MAX)
		return -EINVAL;
	if (s->sender.running)
		return -EBUSY;
	if (s->send_wake_fd < 0) {
		s->send_wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (s->send_wake_fd < 0)
			return -errno;
	}
	fd_drain(s->send_wake_fd);
	s->send_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (s->send_fd < 0)
		return -errno;
	s->send_max_pages = max_pages;
	s->send_error = 0;
	int e = worker_start(&s->sender, sender_thread, s, "ptmig-uffd-req");
	if (e) {
		close(s->send_fd);
		s->send_fd = -1;
	}
	return e;
}

/* Stop the sender (before its socket is closed); requests queue for a fetcher again. */
void uffd_stop_sender(struct uffd_server *s)
{
	worker_stop(&s->sender, &s->lock, s->send_wake_fd);
	if (s->send_fd >= 0)
		close(s->send_fd);
	s->send_fd = -1;
	if (s->send_wake_fd >= 0)
		fd_drain(s->send_wake_fd);
}

/* The sender's fatal errno (0 while it works, or if it never ran); `*frames`: the request
 * frames it wrote so far. */
int uffd_sender_error(struct uffd_server *s, uint64_t *frames)
{
	pthread_mutex_lock(&s->lock);
	*frames = s->frames_sent;
	pthread_mutex_unlock(&s->lock);
	return s->send_error;
}

/* The VMM's own access: request what is missing of [pfn, pfn+n), serve known zero pages, and
 * wait until all are present.  1 when they are, 0 after `timeout_ms`, -ERANGE. */
int uffd_wait_present(struct uffd_server *s, uint64_t pfn, uint64_t n, int64_t timeout_ms)
{
	if (pfn > s->npages || n > s->npages - pfn)
		return -ERANGE;
	int queued = 0;
	pthread_mutex_lock(&s->lock);
	for (uint64_t p = pfn; p < pfn + n; p++)
		queued |= request_page(s, p);
	pthread_mutex_unlock(&s->lock);
	if (queued)
		fd_signal(s->request_fd);
	for (uint64_t p = pfn; p < pfn + n; p++) {
		pthread_mutex_lock(&s->lock);
		int st = s->state[p];
		pthread_mutex_unlock(&s->lock);
		if (st == ZERO)
			serve_zero(s, p);
	}
	struct timespec deadline;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += timeout_ms / 1000;
	deadline.tv_nsec += (timeout_ms % 1000) * 1000000;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&s->lock);
	uint64_t p = pfn;
	int ok = 1;
	while (p < pfn + n) {
		if (s->state[p] == PRESENT) {
			p++;
			continue;
		}
		if (pthread_cond_timedwait(&s->present, &s->lock, &deadline) == ETIMEDOUT) {
			ok = 0;
			break;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return ok;
}

/* The shadow data plane's access (native/dataplane.c, before it touches a device request's
 * pages on a post-copy destination): uffd_wait_present, returning how many of the pages were
 * still on the source when asked (0..n) once all are present, -ETIMEDOUT after
 * `timeout_ms`, or -ERANGE.  `timeout_ms` < 0: only ask for the missing ones (and serve
 * known zero pages), and return how many there were without waiting.  Its signature is the
 * data plane's dp_present_fn. */
int64_t uffd_fetch(struct uffd_server *s, uint64_t pfn, uint64_t n, int64_t timeout_ms)
{
	if (pfn > s->npages || n > s->npages - pfn)
		return -ERANGE;
	int64_t absent = 0, here = 0;
	pthread_mutex_lock(&s->lock);
	for (uint64_t p = pfn; p < pfn + n; p++) {
		absent += s->state[p] == MISSING || s->state[p] == REQUESTED;
		here += s->state[p] == PRESENT;
	}
	pthread_mutex_unlock(&s->lock);
	if ((uint64_t)here == n)
		return 0;
	int r = uffd_wait_present(s, pfn, n, timeout_ms < 0 ? 0 : timeout_ms);
	if (timeout_ms < 0)
		return r < 0 ? r : absent;
	return r == 1 ? absent : r == 0 ? -ETIMEDOUT : r;
}

/* Copy the page states (one byte each) into `out`. */
void uffd_states(struct uffd_server *s, uint8_t *out)
{
	pthread_mutex_lock(&s->lock);
	memcpy(out, s->state, s->npages);
	pthread_mutex_unlock(&s->lock);
}

/* The counters; returns the fault thread's fatal errno (0 while it works). */
int uffd_get_stats(struct uffd_server *s, struct uffd_stats *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->st;
	pthread_mutex_unlock(&s->lock);
	return s->error;
}

/* Copy up to `max` recorded remote fault latencies (us), oldest first; returns how many. */
uint64_t uffd_latencies(struct uffd_server *s, uint32_t *out, uint64_t max)
{
	pthread_mutex_lock(&s->lock);
	uint64_t n = s->st.samples < s->lat_cap ? s->st.samples : s->lat_cap;
	if (n > max)
		n = max;
	memcpy(out, s->lat_us, n * sizeof(uint32_t));
	pthread_mutex_unlock(&s->lock);
	return n;
}

int uffd_request_fd(struct uffd_server *s)
{
	return s->request_fd;
}

/* Stop the thread, unregister the range (a later access allocates as usual), free. */
void uffd_close(struct uffd_server *s)
{
	if (!s)
		return;
	uffd_stop_sender(s);
	worker_stop(&s->worker, &s->lock, s->wake_fd);
	if (s->uffd >= 0) {
		struct uffdio_range r = { .start = s->base, .len = s->npages * PAGE };
		ioctl(s->uffd, UFFDIO_UNREGISTER, &r);
		close(s->uffd);
	}
	if (s->wake_fd >= 0)
		close(s->wake_fd);
	if (s->request_fd >= 0)
		close(s->request_fd);
	if (s->send_wake_fd >= 0)
		close(s->send_wake_fd);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->present);
	free(s->state);
	free(s->fault_ns);
	free(s->queue);
	free(s->lat_us);
	free(s);
}
