/*
 * tierwait.h - waiting for a tier's completion callback in tests.
 *
 * done_cb records the callback's arguments in a struct waiter; block_cb
 * holds the tier's worker inside the callback until the test sets
 * release (10 s at most), to fill queues; wait_done polls for done.
 */
#ifndef KS_TEST_TIERWAIT_H
#define KS_TEST_TIERWAIT_H

#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

struct waiter {
	_Atomic int done;
	int status;
	uint64_t tag;
	size_t n;
	_Atomic int entered;	/* block_cb: the callback is running */
	_Atomic int release;	/* block_cb: let it return */
};

static inline void done_cb(void *arg, int status, uint64_t tag, size_t n)
{
	struct waiter *w = arg;

	w->status = status;
	w->tag = tag;
	w->n = n;
	atomic_store_explicit(&w->done, 1, memory_order_release);
}

/* Holds the worker inside a callback until the test releases it (10 s at most). */
static inline void block_cb(void *arg, int status, uint64_t tag, size_t n)
{
	struct waiter *w = arg;

	atomic_store(&w->entered, 1);
	for (int i = 0; i < 10000 && !atomic_load(&w->release); i++)
		usleep(1000);
	done_cb(arg, status, tag, n);
}

/* Wait at most @timeout_ms for @w; returns its status, or -ETIME on timeout. */
static inline int wait_done_ms(struct waiter *w, unsigned timeout_ms)
{
	for (unsigned i = 0; i < timeout_ms * 10; i++) {
		if (atomic_load_explicit(&w->done, memory_order_acquire))
			return w->status;
		usleep(100);
	}
	fprintf(stderr, "callback never came\n");
	return -ETIME;
}

/*
 * The rest of a synchronous tier call: @submit_rc is what the submit
 * returned (its error is the result; no callback comes), else wait for the
 * callback and pass its tag and length out (either may be NULL).
 */
static inline int waiter_finish(struct waiter *w, int submit_rc, unsigned timeout_ms,
				uint64_t *tag, size_t *n)
{
	int rc;

	if (submit_rc)
		return submit_rc;
	rc = wait_done_ms(w, timeout_ms);
	if (tag)
		*tag = w->tag;
	if (n)
		*n = w->n;
	return rc;
}

#endif /* KS_TEST_TIERWAIT_H */
