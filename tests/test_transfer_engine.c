/*
 * Description: the transfer engine's queue, workers and completion eventfd, with and without busy polling. Labels: unit tsan
 *
 * src/transfer.c on its own (no server): jobs run once each and come back
 * through xfer_reap() after the completion eventfd turns readable; a full
 * queue and a stopped engine refuse jobs; stop hands back queued jobs as
 * cancelled. Busy polling (--busy-poll, transfer.h):
 *   - a worker polling after a job still takes jobs submitted inside and
 *     after its window, and a stop ends a polling worker promptly;
 *   - xfer_job_near_done() makes the eventfd readable while the job is
 *     still running (a reap then returns nothing), counts the job in
 *     xfer_completions_imminent() exactly once however often it is called,
 *     and the count drops back to 0 once the job is on the completion list.
 */
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "compiler.h"
#include "helpers.h"
#include "transfer.h"

struct test_job {
	struct xfer_job base;	/* first: the engine hands back this pointer */
	struct xfer_engine *e;
	_Atomic int runs;
	_Atomic int release;	/* a blocking job waits for this */
	_Atomic int started;
	bool block, announce;
};

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_us(long us)
{
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };

	nanosleep(&ts, NULL);
}

static void run_job(struct xfer_job *base, unsigned worker)
{
	struct test_job *t = (struct test_job *)base;

	(void)worker;
	atomic_fetch_add(&t->runs, 1);
	atomic_store(&t->started, 1);
	if (t->announce) {
		xfer_job_near_done(t->e, base);
		xfer_job_near_done(t->e, base);	/* once per job, however often */
	}
	if (t->block) {
		uint64_t until = mono_ms() + 10000;

		while (!atomic_load(&t->release) && mono_ms() < until)
			sleep_us(200);
	}
}

static void job_init(struct test_job *t, struct xfer_engine *e)
{
	memset(t, 0, sizeof(*t));
	t->base.run = run_job;
	t->e = e;
}

/* Wait up to @ms for the completion fd; 1 readable, 0 not. */
static int fd_ready(struct xfer_engine *e, int ms)
{
	struct pollfd p = { .fd = xfer_completion_fd(e), .events = POLLIN };

	return poll(&p, 1, ms) == 1;
}

/* Reap until @want jobs came back or 5 s passed; returns how many. */
static size_t reap_n(struct xfer_engine *e, struct xfer_job **out, size_t want)
{
	uint64_t until = mono_ms() + 5000;
	size_t n = 0;

	while (n < want && mono_ms() < until)
		if (fd_ready(e, 100))
			n += xfer_reap(e, out + n, want - n);
	return n;
}

/* Submit @t as a job that holds its worker until released; wait until it runs. */
static void start_blocking(struct xfer_engine *e, struct test_job *t)
{
	job_init(t, e);
	t->block = true;
	REQUIRE(xfer_submit(e, &t->base) == 0);
	while (!atomic_load(&t->started))
		sleep_us(100);
}

static void test_basic(void)
{
	struct xfer_engine *e;
	struct test_job t[3];
	struct xfer_job *out[4];

	CHECK_EQ(xfer_engine_create("t", 0, 4, &e), -EINVAL);
	CHECK_EQ(xfer_engine_create("t", 1, 0, &e), -EINVAL);
	REQUIRE(xfer_engine_create("t", 1, 2, &e) == 0);
	/* one job blocks the worker: the queue (2) fills, the third is refused */
	start_blocking(e, &t[0]);
	job_init(&t[1], e);
	job_init(&t[2], e);
	struct test_job extra;

	job_init(&extra, e);
	CHECK_EQ(xfer_submit(e, &t[1].base), 0);
	CHECK_EQ(xfer_submit(e, &t[2].base), 0);
	CHECK_EQ(xfer_submit(e, &extra.base), -EAGAIN);
	atomic_store(&t[0].release, 1);
	CHECK_EQ(reap_n(e, out, 3), 3);
	for (int i = 0; i < 3; i++) {
		CHECK_EQ(atomic_load(&t[i].runs), 1);
		CHECK(!xfer_job_cancelled(&t[i].base));
		CHECK(t[i].base.end_ns >= t[i].base.start_ns);
	}
	CHECK_EQ(atomic_load(&extra.runs), 0);
	CHECK_EQ(xfer_completions_imminent(e), 0);
	/* stop with a job queued behind a blocking one: it comes back cancelled */
	start_blocking(e, &t[0]);
	job_init(&t[1], e);
	REQUIRE(xfer_submit(e, &t[1].base) == 0);
	atomic_store(&t[0].release, 1);
	xfer_engine_stop(e, 0);
	CHECK_EQ(xfer_submit(e, &extra.base), -ESHUTDOWN);
	size_t n = xfer_reap(e, out, 4);

	CHECK_EQ(n, 2);
	CHECK_EQ(atomic_load(&t[0].runs), 1);
	CHECK(atomic_load(&t[1].runs) == 0 ? xfer_job_cancelled(&t[1].base) :
					     !xfer_job_cancelled(&t[1].base));
	xfer_engine_destroy(e);
}

/* An engine of @nworkers whose workers poll 300 us after each job. */
static struct xfer_engine *polling_engine(unsigned nworkers)
{
	struct xfer_engine *e;

	REQUIRE(xfer_engine_create("t", nworkers, 8, &e) == 0);
	xfer_engine_set_busy_poll(e, 300 * 1000);
	return e;
}

/* Submit @t (freshly initialised, not blocking) and reap it. */
static void run_one(struct xfer_engine *e, struct test_job *t)
{
	struct xfer_job *out[1];

	job_init(t, e);
	REQUIRE(xfer_submit(e, &t->base) == 0);
	REQUIRE(reap_n(e, out, 1) == 1);
	CHECK(out[0] == &t->base);
	CHECK_EQ(atomic_load(&t->runs), 1);
}

static void test_busy_poll(void)
{
	struct xfer_engine *e = polling_engine(2);
	struct test_job t;

	/* back to back inside the polling window, then after it */
	for (int i = 0; i < 20; i++) {
		run_one(e, &t);
		sleep_us(i % 2 ? 50 : 2000);
	}
	/* a stop while the workers poll ends them promptly */
	run_one(e, &t);
	uint64_t t0 = mono_ms();

	xfer_engine_stop(e, 1000);
	CHECK(mono_ms() - t0 < 500);
	xfer_engine_destroy(e);
}

static void test_near_done(void)
{
	struct xfer_engine *e = polling_engine(1);
	struct test_job t;
	struct xfer_job *out[2];

	for (int round = 0; round < 3; round++) {
		job_init(&t, e);
		t.block = true;
		t.announce = true;
		REQUIRE(xfer_submit(e, &t.base) == 0);
		/* announced while running: the fd wakes the io thread ahead */
		CHECK(fd_ready(e, 5000));
		CHECK_EQ(xfer_completions_imminent(e), 1);
		CHECK_EQ(xfer_reap(e, out, 2), 0);
		CHECK(!fd_ready(e, 0));
		CHECK_EQ(xfer_completions_imminent(e), 1);
		atomic_store(&t.release, 1);
		CHECK_EQ(reap_n(e, out, 1), 1);
		CHECK(out[0] == &t.base);
		/* the count is dropped right after the job is pushed */
		uint64_t until = mono_ms() + 2000;

		while (xfer_completions_imminent(e) && mono_ms() < until)
			sleep_us(100);
		CHECK_EQ(xfer_completions_imminent(e), 0);
		CHECK_EQ(atomic_load(&t.runs), 1);
	}
	/* a job that never announces leaves the count alone */
	run_one(e, &t);
	CHECK_EQ(xfer_completions_imminent(e), 0);
	xfer_engine_stop(e, 1000);
	xfer_engine_destroy(e);
}

int main(void)
{
	test_basic();
	test_busy_poll();
	test_near_done();
	return t_result("transfer_engine");
}
