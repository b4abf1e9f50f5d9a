/*
 * pinger.h - a watchdog client for load tests: PINGs a kvstashd every
 * period_ms on its own thread and own connection, records every round
 * trip, and summarises them (p50, p99, max, count over a limit).
 */
#ifndef KS_TEST_PINGER_H
#define KS_TEST_PINGER_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "helpers.h"
#include "kvstash.h"

#define T_PINGER_MAX 100000

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
	/* results, valid after t_pinger_stop */
	size_t n, over;
	uint64_t failures;
	double p50, p99, max;
	/* private */
	pthread_t th;
	_Atomic bool stop;
	double rtt[T_PINGER_MAX];
};

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

		if (kvstash_ping(c, &rtt)) {
			p->failures++;
			fprintf(stderr, "watchdog: PING failed: %s\n", kvstash_last_error());
		} else {
			p->rtt[p->n++] = rtt;
			if (rtt > p->slow_ms)
				fprintf(stderr, "watchdog: PING took %.1f ms\n", rtt);
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
}

static inline void t_pinger_stop(struct t_pinger *p)
{
	atomic_store(&p->stop, true);
	pthread_join(p->th, NULL);
	qsort(p->rtt, p->n, sizeof(double), t_pinger_cmp);
	p->over = 0;
	for (size_t i = 0; i < p->n; i++)
		p->over += p->rtt[i] > p->slow_ms;
	p->p50 = p->n ? p->rtt[p->n / 2] : 0;
	p->p99 = p->n ? p->rtt[p->n * 99 / 100] : 0;
	p->max = p->n ? p->rtt[p->n - 1] : 0;
}

#endif /* KS_TEST_PINGER_H */
