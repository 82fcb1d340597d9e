/*
 * worker.h - what the native threads share (virtq.c's device threads, dataplane.c's shadow
 * data plane): eventfd signalling, and the life of a thread that sleeps in epoll_wait and is
 * stopped through its wake eventfd.  Header-only: each library is built on its own.
 */
#ifndef PTMIG_WORKER_H
#define PTMIG_WORKER_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pthread_setname_np */
#endif
#include <pthread.h>
#include <stdint.h>
#include <unistd.h>

/* Signal an eventfd (none when fd < 0). */
static inline void fd_signal(int fd)
{
	uint64_t one = 1;
	if (fd < 0)
		return;
	ssize_t r = write(fd, &one, sizeof(one));
	(void)r; /* a full eventfd is already signalled */
}

static inline void fd_drain(int fd)
{
	uint64_t v;
	ssize_t r = read(fd, &v, sizeof(v));
	(void)r;
}

/* A thread's state.  `stop` is read by the thread under the owner's lock. */
struct worker {
	pthread_t thread;
	int stop, running;
};

/* Start `fn(arg)` unless it runs already; 0, or -errno. */
static inline int worker_start(struct worker *w, void *(*fn)(void *), void *arg,
			       const char *name)
{
	if (w->running)
		return 0;
	w->stop = 0;
	int err = pthread_create(&w->thread, NULL, fn, arg);
	if (err)
		return -err;
	pthread_setname_np(w->thread, name); /* ERANGE (and no name) past 15 bytes */
	w->running = 1;
	return 0;
}

/* Ask the thread to stop (under `lock`), wake it through `wake_fd`, and wait for it. */
static inline void worker_stop(struct worker *w, pthread_mutex_t *lock, int wake_fd)
{
	if (!w->running)
		return;
	pthread_mutex_lock(lock);
	w->stop = 1;
	pthread_mutex_unlock(lock);
	fd_signal(wake_fd);
	pthread_join(w->thread, NULL);
	w->running = 0;
}

#endif
