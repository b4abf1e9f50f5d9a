/*
 * pinger.h - a watchdog client for load tests: PINGs a kvstashd every
 * period_ms on its own thread and own connection, records every round
 * trip, and summarises them (p50, p99, max, count over a limit).
 *
 * With stall_watch, a second thread at SCHED_FIFO 2 (above every thread of
 * kvstashd and of the test) sleeps 1 ms at a time and records each wake-up
 * more than T_STALL_MIN_MS late: then nothing on the machine ran, kvstashd
 * included (a hypervisor stealing the VM's CPUs, a kernel stall). A PING
 * over the limit that such a stall explains (the stall overlaps the PING
 * and the PING minus the stall is within the limit) is counted in
 * over_stalled rather than over. Without SCHED_FIFO the watch is off.
 */
#ifndef KS_TEST_PINGER_H
#define KS_TEST_PINGER_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "helpers.h"
#include "kvstash.h"

#define T_PINGER_MAX 100000
#define T_PINGER_SLOW_MAX 256	/* slow PINGs and stalls remembered */
#define T_STALL_MIN_MS 20.0

struct t_interval {
	uint64_t begin_ns, end_ns;
};

struct t_pinger {
	/* set before t_pinger_start */
	const char *endpoint;
	unsigned period_ms, timeout_ms;
	double slow_ms;		/* PINGs above this are logged and counted in over */
	/* Run the PINGing thread (and the ZMQ I/O thread its connection starts,
	 * which inherits the policy) at SCHED_FIFO 1 where the test may: an
	 * engine's heartbeat thread has a core to itself, while on a 2-core test
	 * machine it competes with the load it is meant to watch. */
	bool realtime;
	bool stall_watch;	/* see the top of the file */
	/* results, valid after t_pinger_stop */
	size_t n, over;
	size_t over_stalled;	/* over the limit, explained by a machine stall */
	bool stall_watch_on;	/* the watch thread got SCHED_FIFO 2 */
	double longest_stall_ms;
	uint64_t failures;
	double p50, p99, max;
	/* private */
	pthread_t th, stall_th;
	_Atomic bool stop;
	double rtt[T_PINGER_MAX];
	struct t_interval slow[T_PINGER_SLOW_MAX];	/* PINGs over slow_ms */
	size_t nslow;
	struct t_interval stalls[T_PINGER_SLOW_MAX];	/* machine stalls */
	size_t nstalls;
};

static inline uint64_t t_pinger_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void *t_stall_main(void *arg)
{
	struct t_pinger *p = arg;
	struct sched_param sp = { .sched_priority = 2 };

	if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp)) {
		fprintf(stderr, "watchdog: stall watch off (SCHED_FIFO 2 refused)\n");
		return NULL;
	}
	p->stall_watch_on = true;
	while (!atomic_load(&p->stop)) {
		uint64_t t0 = t_pinger_now_ns(), t1;
		double late_ms;

		usleep(1000);
		t1 = t_pinger_now_ns();
		late_ms = (double)(t1 - t0) / 1e6 - 1.0;
		if (late_ms > p->longest_stall_ms)
			p->longest_stall_ms = late_ms;
		if (late_ms > T_STALL_MIN_MS && p->nstalls < T_PINGER_SLOW_MAX)
			p->stalls[p->nstalls++] = (struct t_interval){ t0, t1 };
	}
	return NULL;
}

static inline void *t_pinger_main(void *arg)
{
	struct t_pinger *p = arg;
	kvstash_client *c;

	if (p->realtime) {
		struct sched_param sp = { .sched_priority = 1 };
		int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);

		fprintf(stderr, "watchdog: %s\n", rc ? "at normal priority (SCHED_FIFO refused)"
						      : "at SCHED_FIFO 1");
	}
	REQUIRE(kvstash_connect(p->endpoint, (int)p->timeout_ms, &c) == 0);
	while (!atomic_load(&p->stop) && p->n < T_PINGER_MAX) {
		double rtt;
		uint64_t t0 = t_pinger_now_ns();

		if (kvstash_ping(c, &rtt)) {
			p->failures++;
			fprintf(stderr, "watchdog: PING failed: %s\n", kvstash_last_error());
		} else {
			p->rtt[p->n++] = rtt;
			if (rtt > p->slow_ms) {
				fprintf(stderr, "watchdog: PING took %.1f ms\n", rtt);
				if (p->nslow < T_PINGER_SLOW_MAX)
					p->slow[p->nslow++] =
						(struct t_interval){ t0, t_pinger_now_ns() };
			}
		}
		usleep(p->period_ms * 1000);
	}
	kvstash_close(c);
	return NULL;
}

static inline int t_pinger_cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* @p is large (the samples): allocate it statically or on the heap. */
static inline void t_pinger_start(struct t_pinger *p)
{
	REQUIRE(pthread_create(&p->th, NULL, t_pinger_main, p) == 0);
	if (p->stall_watch)
		REQUIRE(pthread_create(&p->stall_th, NULL, t_stall_main, p) == 0);
}

/* The longest machine stall overlapping @iv, in ms (0: none). */
static inline double t_pinger_stall_within(const struct t_pinger *p, struct t_interval iv)
{
	double longest = 0;

	for (size_t i = 0; i < p->nstalls; i++) {
		const struct t_interval *st = &p->stalls[i];

		if (st->begin_ns < iv.end_ns && st->end_ns > iv.begin_ns) {
			double ms = (double)(st->end_ns - st->begin_ns) / 1e6 - 1.0;

			if (ms > longest)
				longest = ms;
		}
	}
	return longest;
}

static inline void t_pinger_stop(struct t_pinger *p)
{
	atomic_store(&p->stop, true);
	pthread_join(p->th, NULL);
	if (p->stall_watch)
		pthread_join(p->stall_th, NULL);
	qsort(p->rtt, p->n, sizeof(double), t_pinger_cmp);
	p->over = 0;
	for (size_t i = 0; i < p->n; i++)
		p->over += p->rtt[i] > p->slow_ms;
	p->over_stalled = 0;
	for (size_t i = 0; i < p->nslow && p->over; i++) {
		double rtt = (double)(p->slow[i].end_ns - p->slow[i].begin_ns) / 1e6;
		double stall = t_pinger_stall_within(p, p->slow[i]);

		if (stall > 0 && rtt - stall <= p->slow_ms) {
			fprintf(stderr, "watchdog: the %.1f ms PING overlapped a %.1f ms stall of the "
				"whole machine (a SCHED_FIFO 2 thread woke that late): not kvstashd's\n",
				rtt, stall);
			p->over_stalled++;
			p->over--;
		}
	}
	p->p50 = p->n ? p->rtt[p->n / 2] : 0;
	p->p99 = p->n ? p->rtt[p->n * 99 / 100] : 0;
	p->max = p->n ? p->rtt[p->n - 1] : 0;
}

#endif /* KS_TEST_PINGER_H */
