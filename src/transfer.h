/*
 * transfer.h - the transfer engine: a bounded job queue per device, its
 * worker threads, and a completion queue the io thread drains.
 *
 * A job is opaque to the engine: the submitter fills in run(), which a
 * worker calls with no kvstash lock held; the job then goes to the
 * completion queue and the engine's eventfd becomes readable. The io
 * thread reaps completed jobs and sends the replies (ZMQ sockets are
 * single-threaded; protocol.md §1).
 */
#ifndef KS_TRANSFER_H
#define KS_TRANSFER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct xfer_engine;

struct xfer_job {
	struct xfer_job *next;		/* engine-owned queue link */
	/* Runs on a worker thread, no kvstash lock held; sets its own result. */
	void (*run)(struct xfer_job *job, unsigned worker_index);
	uint64_t submit_ns;		/* set by xfer_submit (CLOCK_MONOTONIC) */
	uint64_t start_ns, end_ns;	/* set by the worker around run() */
	bool near_done;			/* run() called xfer_job_near_done() */
};

struct xfer_stats {
	uint64_t submitted, completed, rejected_full;
	uint32_t queued;		/* waiting for a worker now */
	uint32_t running;		/* inside run() now */
	uint32_t nworkers;
	uint64_t last_progress_ms;	/* CLOCK_MONOTONIC ms of the last job start/end */
};

/*
 * Start @nworkers threads named "@name/N" serving one queue of at most
 * @max_queued jobs. Returns 0, -EINVAL, -ENOMEM or -errno from
 * pthread_create/eventfd.
 */
int xfer_engine_create(const char *name, unsigned nworkers, unsigned max_queued,
		       struct xfer_engine **out);
/*
 * Stop accepting jobs, let workers finish the queue (at most @drain_ms),
 * join them and free the engine. Jobs still queued after the deadline are
 * handed back through xfer_reap() with run() not called: reap before
 * destroying with xfer_engine_destroy().
 */
void xfer_engine_stop(struct xfer_engine *e, uint64_t drain_ms);
void xfer_engine_destroy(struct xfer_engine *e);

/*
 * Queue @job; never blocks. 0, -EAGAIN when the queue is full, -ESHUTDOWN
 * after stop, -ETIMEDOUT if the queue lock timed out.
 */
int xfer_submit(struct xfer_engine *e, struct xfer_job *job);

/* The eventfd that becomes readable when completed jobs are waiting. */
int xfer_completion_fd(const struct xfer_engine *e);
/*
 * Take up to @max completed jobs (io thread). Clears the eventfd first, so
 * a completion racing with the call is never lost. Returns how many.
 */
size_t xfer_reap(struct xfer_engine *e, struct xfer_job **out, size_t max);
/* True if a job's run() was skipped because the engine stopped first. */
bool xfer_job_cancelled(const struct xfer_job *job);

void xfer_get_stats(struct xfer_engine *e, struct xfer_stats *st);

/*
 * Busy polling (both 0 = off, the default): a job's fixed cost includes two
 * thread wake-ups, the worker's when it is queued and the io thread's when it
 * completes, each 10-50 us on a virtual machine whose idle CPUs halt.
 *
 * xfer_engine_set_busy_poll(): after a job, a worker polls the queue for the
 * next one for up to @ns before it sleeps on the condition variable (an
 * engine with one request in flight sends the next a fraction of a
 * millisecond after the reply). Costs up to @ns of one CPU per job.
 *
 * xfer_job_near_done(): called by @job's run() on its worker, holding no
 * lock, when its end is expected within tens of microseconds (a GPU copy's
 * completion poll stops sleeping). Once per job; it writes the completion
 * eventfd ahead of time, so the io thread's wake-up overlaps the end of the
 * copy, and xfer_completions_imminent() counts the job until it completes:
 * the io thread polls instead of sleeping meanwhile (bounded by its own
 * window). A wake-up with nothing to reap is harmless: xfer_reap() returns 0.
 */
void xfer_engine_set_busy_poll(struct xfer_engine *e, uint64_t ns);
void xfer_job_near_done(struct xfer_engine *e, struct xfer_job *job);
unsigned xfer_completions_imminent(const struct xfer_engine *e);

#endif /* KS_TRANSFER_H */
