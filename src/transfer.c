/*
 * transfer.c - job queues and transfer workers.
 *
 * DESIGN: one engine per device (the host backend is one "device"). N
 * workers share its bounded FIFO; the io thread submits with xfer_submit()
 * and never waits. A worker pops a job under xfer_queue->lock, drops the lock,
 * runs the job (gather/scatter, CUDA calls, index updates) holding no lock,
 * then pushes it onto the completion list and writes the eventfd (Redis
 * bio.c job_comp_pipe). The io thread polls the eventfd and reaps.
 * Optional busy polling (transfer.h) trades CPU for the two wake-ups a job
 * costs: workers poll the queue for a while after a job, and a job may
 * announce its end ahead so the io thread is awake when it comes.
 *
 * Lock order (the tree is in lock.h):
 *   xfer_queue->lock (LOCK_RANK_QUEUE) is a leaf: nothing is taken under it but
 *   the log ring. It is never held across run(), a write() or a wait other
 *   than ks_cond_wait_ms on its own condition.
 */
#include "transfer.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "compiler.h"
#include "lock.h"
#include "log.h"

/* Workers wake at least this often to notice stop; bounded waits everywhere. */
#define XFER_IDLE_WAIT_MS 100
#define XFER_JOB_CANCELLED ((uint64_t)1)	/* start_ns value of a never-run job */

struct xfer_queue {
	struct ks_mutex lock;	/* protects head/tail/count and the completion list */
	struct ks_cond nonempty;
	struct xfer_job *head, *tail;
	unsigned count, max;
	struct xfer_job *done_head, *done_tail;
	bool stopping;
};

struct xfer_engine {
	char name[32];
	struct xfer_queue q;
	int efd;			/* completion eventfd, owned */
	unsigned nworkers;
	pthread_t *threads;
	_Atomic uint64_t submitted, completed, rejected_full;
	_Atomic uint32_t running;
	_Atomic uint64_t last_progress_ms;
	/* Busy polling (transfer.h): the window, q.count as workers polling
	 * outside the lock see it (written under it), and jobs announced near
	 * their end. */
	_Atomic uint64_t busy_poll_ns;
	_Atomic uint32_t queued_hint;
	_Atomic uint32_t imminent;
};

struct worker_arg {
	struct xfer_engine *e;
	unsigned index;
};

static void push_done(struct xfer_engine *e, struct xfer_job *job)
{
	uint64_t one = 1;
	bool queued = false;
	/* read now: once on the completion list the job may be reaped and freed */
	const bool announced = job->near_done;

	job->next = NULL;
	/* The completion list shares the queue lock; a timeout here would lose
	 * the job, so retry: the lock is only ever held for a few pointer moves. */
	while (!queued) {
		if (ks_lock(&e->q.lock))
			continue;
		if (e->q.done_tail)
			e->q.done_tail->next = job;
		else
			e->q.done_head = job;
		e->q.done_tail = job;
		ks_unlock(&e->q.lock);
		queued = true;
	}
	atomic_fetch_add_explicit(&e->completed, 1, memory_order_relaxed);
	ks_assert_unlocked();
	if (write(e->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_error("%s: completion eventfd write: %s", e->name, strerror(errno));
	/* after the write: the io thread keeps polling until it can reap */
	if (announced)
		atomic_fetch_sub_explicit(&e->imminent, 1, memory_order_release);
}

/*
 * Busy-poll the queue until a job may be there or @deadline_ns passes (no
 * lock held: the hint is written under it; a stop is seen once the window,
 * a fraction of a millisecond, has passed).
 */
static void poll_for_job(struct xfer_engine *e, uint64_t deadline_ns)
{
	while (!atomic_load_explicit(&e->queued_hint, memory_order_acquire) &&
	       ks_now_ns() < deadline_ns)
		for (int i = 0; i < 32; i++)
			ks_cpu_relax();
}

static void *worker_main(void *p)
{
	struct worker_arg *wa = p;
	struct xfer_engine *e = wa->e;
	unsigned index = wa->index;
	char tname[16];

	free(wa);
	snprintf(tname, sizeof(tname), "%.10s/%u", e->name, index);
	pthread_setname_np(pthread_self(), tname);
	/*
	 * Copies are bulk work: under SCHED_BATCH a worker woken by a new job
	 * does not preempt the thread that queued it (the io thread, which
	 * the scheduler likes to share a CPU with the wakee), so PINGs are not
	 * held up for a scheduling slice behind a copy. The worker's share of
	 * CPU is unchanged, and no privilege is needed.
	 */
	{
		struct sched_param sp = { .sched_priority = 0 };
		int rc = pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);

		if (rc)
			log_info("%s: stays SCHED_OTHER (%s)", tname, strerror(rc));
	}
	uint64_t last_end_ns = 0;	/* when this worker's last job ended */

	for (;;) {
		struct xfer_job *job = NULL;
		bool stop = false;
		uint64_t poll_ns;

		if (ks_lock(&e->q.lock))
			continue;
		if (!e->q.head && !e->q.stopping) {
			poll_ns = atomic_load_explicit(&e->busy_poll_ns, memory_order_relaxed);
			if (poll_ns && last_end_ns && ks_now_ns() - last_end_ns < poll_ns) {
				/* busy polling: look again without sleeping */
				ks_unlock(&e->q.lock);
				poll_for_job(e, last_end_ns + poll_ns);
				continue;
			}
			ks_cond_wait_ms(&e->q.nonempty, &e->q.lock, XFER_IDLE_WAIT_MS);
		}
		if (e->q.head) {
			job = e->q.head;
			e->q.head = job->next;
			if (!e->q.head)
				e->q.tail = NULL;
			e->q.count--;
			atomic_store_explicit(&e->queued_hint, e->q.count, memory_order_release);
		} else {
			stop = e->q.stopping;
		}
		ks_unlock(&e->q.lock);
		if (stop)
			break;
		if (!job)
			continue;

		ks_assert_unlocked();
		atomic_fetch_add_explicit(&e->running, 1, memory_order_relaxed);
		job->start_ns = ks_now_ns();
		atomic_store_explicit(&e->last_progress_ms, job->start_ns / 1000000,
				      memory_order_relaxed);
		job->run(job, index);
		job->end_ns = ks_now_ns();
		atomic_store_explicit(&e->last_progress_ms, job->end_ns / 1000000,
				      memory_order_relaxed);
		atomic_fetch_sub_explicit(&e->running, 1, memory_order_relaxed);
		push_done(e, job);
		last_end_ns = ks_now_ns();
	}
	return NULL;
}

int xfer_engine_create(const char *name, unsigned nworkers, unsigned max_queued,
		       struct xfer_engine **out)
{
	struct xfer_engine *e;
	int rc;

	if (!nworkers || !max_queued)
		return -EINVAL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	snprintf(e->name, sizeof(e->name), "%s", name);
	e->q.max = max_queued;
	e->nworkers = nworkers;
	atomic_store(&e->last_progress_ms, ks_now_ms());
	rc = ks_mutex_init(&e->q.lock, LOCK_RANK_QUEUE, "xfer queue");
	if (rc)
		goto out_free;
	rc = ks_cond_init(&e->q.nonempty);
	if (rc)
		goto out_mutex;
	e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (e->efd < 0) {
		rc = -errno;
		goto out_cond;
	}
	e->threads = calloc(nworkers, sizeof(*e->threads));
	if (!e->threads) {
		rc = -ENOMEM;
		goto out_efd;
	}
	for (unsigned i = 0; i < nworkers; i++) {
		struct worker_arg *wa = malloc(sizeof(*wa));

		if (!wa) {
			rc = -ENOMEM;
			e->nworkers = i;
			goto out_stop;
		}
		wa->e = e;
		wa->index = i;
		rc = -pthread_create(&e->threads[i], NULL, worker_main, wa);
		if (rc) {
			free(wa);
			e->nworkers = i;
			goto out_stop;
		}
	}
	*out = e;
	return 0;
out_stop:
	xfer_engine_stop(e, 0);
	xfer_engine_destroy(e);
	return rc;
out_efd:
	close(e->efd);
out_cond:
	ks_cond_destroy(&e->q.nonempty);
out_mutex:
	ks_mutex_destroy(&e->q.lock);
out_free:
	free(e);
	return rc;
}

int xfer_submit(struct xfer_engine *e, struct xfer_job *job)
{
	int rc = ks_lock(&e->q.lock);

	if (rc)
		return rc;
	if (e->q.stopping) {
		rc = -ESHUTDOWN;
	} else if (e->q.count >= e->q.max) {
		rc = -EAGAIN;
		atomic_fetch_add_explicit(&e->rejected_full, 1, memory_order_relaxed);
	} else {
		job->next = NULL;
		job->submit_ns = ks_now_ns();
		job->start_ns = job->end_ns = 0;
		job->near_done = false;
		if (e->q.tail)
			e->q.tail->next = job;
		else
			e->q.head = job;
		e->q.tail = job;
		e->q.count++;
		atomic_store_explicit(&e->queued_hint, e->q.count, memory_order_release);
		atomic_fetch_add_explicit(&e->submitted, 1, memory_order_relaxed);
		ks_cond_signal(&e->q.nonempty);
	}
	ks_unlock(&e->q.lock);
	return rc;
}

void xfer_engine_stop(struct xfer_engine *e, uint64_t drain_ms)
{
	uint64_t deadline = ks_now_ms() + drain_ms;
	struct xfer_job *left = NULL;

	/* Let the workers drain the queue for a while, then cancel the rest. */
	for (;;) {
		unsigned count = 0;

		if (ks_lock(&e->q.lock) == 0) {
			count = e->q.count;
			if (!count || ks_now_ms() >= deadline) {
				e->q.stopping = true;
				left = e->q.head;
				e->q.head = e->q.tail = NULL;
				e->q.count = 0;
				atomic_store_explicit(&e->queued_hint, 0, memory_order_release);
				ks_cond_broadcast(&e->q.nonempty);
				ks_unlock(&e->q.lock);
				break;
			}
			ks_unlock(&e->q.lock);
		}
		usleep(1000);
	}
	for (unsigned i = 0; i < e->nworkers; i++)
		pthread_join(e->threads[i], NULL);
	e->nworkers = 0;
	while (left) {
		struct xfer_job *next = left->next;

		left->start_ns = XFER_JOB_CANCELLED;
		left->end_ns = 0;
		push_done(e, left);
		left = next;
	}
}

bool xfer_job_cancelled(const struct xfer_job *job)
{
	return job->start_ns == XFER_JOB_CANCELLED && job->end_ns == 0;
}

void xfer_engine_destroy(struct xfer_engine *e)
{
	if (!e)
		return;
	free(e->threads);
	close(e->efd);
	ks_cond_destroy(&e->q.nonempty);
	ks_mutex_destroy(&e->q.lock);
	free(e);
}

int xfer_completion_fd(const struct xfer_engine *e)
{
	return e->efd;
}

size_t xfer_reap(struct xfer_engine *e, struct xfer_job **out, size_t max)
{
	uint64_t v;
	size_t n = 0;

	/* Clear the counter before taking jobs: a push after this read writes
	 * the eventfd again, so no completion is left without a wake-up. */
	if (read(e->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		log_error("%s: completion eventfd read: %s", e->name, strerror(errno));
	if (ks_lock(&e->q.lock)) {
		/* Retry on the next poll round: make sure there is one. */
		v = 1;
		if (write(e->efd, &v, sizeof(v)) < 0)
			log_error("%s: eventfd re-arm: %s", e->name, strerror(errno));
		return 0;
	}
	while (e->q.done_head && n < max) {
		struct xfer_job *job = e->q.done_head;

		e->q.done_head = job->next;
		if (!e->q.done_head)
			e->q.done_tail = NULL;
		job->next = NULL;
		out[n++] = job;
	}
	bool more = e->q.done_head != NULL;
	ks_unlock(&e->q.lock);
	if (more) {
		v = 1;
		if (write(e->efd, &v, sizeof(v)) < 0)
			log_error("%s: eventfd re-arm: %s", e->name, strerror(errno));
	}
	return n;
}

void xfer_engine_set_busy_poll(struct xfer_engine *e, uint64_t ns)
{
	atomic_store_explicit(&e->busy_poll_ns, ns, memory_order_relaxed);
}

void xfer_job_near_done(struct xfer_engine *e, struct xfer_job *job)
{
	uint64_t one = 1;

	if (job->near_done)
		return;
	job->near_done = true;
	atomic_fetch_add_explicit(&e->imminent, 1, memory_order_relaxed);
	if (write(e->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_error("%s: completion eventfd write: %s", e->name, strerror(errno));
}

unsigned xfer_completions_imminent(const struct xfer_engine *e)
{
	return atomic_load_explicit(&e->imminent, memory_order_acquire);
}

void xfer_get_stats(struct xfer_engine *e, struct xfer_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->submitted = atomic_load_explicit(&e->submitted, memory_order_relaxed);
	st->completed = atomic_load_explicit(&e->completed, memory_order_relaxed);
	st->rejected_full = atomic_load_explicit(&e->rejected_full, memory_order_relaxed);
	st->running = atomic_load_explicit(&e->running, memory_order_relaxed);
	st->nworkers = e->nworkers;
	st->last_progress_ms = atomic_load_explicit(&e->last_progress_ms, memory_order_relaxed);
	if (ks_lock(&e->q.lock) == 0) {
		st->queued = e->q.count;
		ks_unlock(&e->q.lock);
	}
}
