/*
 * lock.c - timed mutexes, monotonic condition variables and the lock-order
 * checker (lockdep).
 *
 * This is the only file that calls pthread_mutex_lock-family functions or
 * pthread_cond_wait (tests/banned.sh checks). See lock.h for the lock order.
 */
#include "lock.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "compiler.h"
#include "log.h"

/* TSan does not intercept pthread_mutex_clocklock(): it would miss the
 * acquire and report every contended lock as a race. Under TSan the slow
 * path uses pthread_mutex_timedlock() with the same length of deadline. */
#if defined(__SANITIZE_THREAD__)
#define KS_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KS_TSAN 1
#endif
#endif

static _Atomic uint64_t lock_timeouts;
static _Atomic unsigned default_timeout_ms = KS_LOCK_TIMEOUT_MS_DEFAULT;

void ks_lock_set_default_timeout_ms(unsigned ms)
{
	atomic_store(&default_timeout_ms, ms ? ms : KS_LOCK_TIMEOUT_MS_DEFAULT);
}

#ifdef KS_LOCKDEP
/* Locks held by this thread, in the order taken. Deeper nesting is a bug. */
#define LOCKDEP_MAX_HELD 16
static _Thread_local const struct ks_mutex *held[LOCKDEP_MAX_HELD];
static _Thread_local int nheld;

static void lockdep_acquire_check(const struct ks_mutex *m)
{
	for (int i = 0; i < nheld; i++) {
		if (held[i]->rank >= m->rank) {
			/* stderr directly: the log ring is itself a ranked lock. */
			fprintf(stderr,
				"kvstash lockdep: lock order violation: taking '%s' (rank %d) "
				"while holding '%s' (rank %d)\n",
				m->name, (int)m->rank, held[i]->name, (int)held[i]->rank);
			abort();
		}
	}
}

static void lockdep_push(const struct ks_mutex *m)
{
	if (nheld >= LOCKDEP_MAX_HELD) {
		fprintf(stderr, "kvstash lockdep: more than %d locks held taking '%s'\n",
			LOCKDEP_MAX_HELD, m->name);
		abort();
	}
	held[nheld++] = m;
}

static void lockdep_pop(const struct ks_mutex *m)
{
	for (int i = nheld - 1; i >= 0; i--) {
		if (held[i] == m) {
			for (int j = i; j < nheld - 1; j++)
				held[j] = held[j + 1];
			nheld--;
			return;
		}
	}
	fprintf(stderr, "kvstash lockdep: releasing '%s' which this thread does not hold\n",
		m->name);
	abort();
}

void ks_assert_unlocked_at(const char *file, int line)
{
	if (nheld == 0)
		return;
	fprintf(stderr, "kvstash lockdep: %s:%d: blocking call while holding '%s'\n",
		file, line, held[nheld - 1]->name);
	abort();
}

int ks_locks_held(void)
{
	return nheld;
}
#else
#define lockdep_acquire_check(m) ((void)(m))
#define lockdep_push(m) ((void)(m))
#define lockdep_pop(m) ((void)(m))
int ks_locks_held(void)
{
	return 0;
}
#endif

int ks_mutex_init(struct ks_mutex *m, enum lock_rank rank, const char *name)
{
	pthread_mutexattr_t attr;
	int rc;

	m->rank = rank;
	m->name = name;
	m->timeout_ms = atomic_load(&default_timeout_ms);
	rc = pthread_mutexattr_init(&attr);
	if (rc)
		return -rc;
#ifdef KS_LOCKDEP
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
#else
	/* Critical sections are a few pointer moves: spin briefly before sleeping. */
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
#endif
	rc = pthread_mutex_init(&m->mu, &attr);
	pthread_mutexattr_destroy(&attr);
	return -rc;
}

void ks_mutex_destroy(struct ks_mutex *m)
{
	pthread_mutex_destroy(&m->mu);
}

int ks_lock(struct ks_mutex *m) NO_THREAD_SAFETY_ANALYSIS
{
	struct timespec dl;
	int rc;

	lockdep_acquire_check(m);
	rc = pthread_mutex_trylock(&m->mu);
	if (rc == EBUSY) {
#ifdef KS_TSAN
		clock_gettime(CLOCK_REALTIME, &dl);
		dl.tv_sec += m->timeout_ms / 1000;
		dl.tv_nsec += (long)(m->timeout_ms % 1000) * 1000000L;
		if (dl.tv_nsec >= 1000000000L) {
			dl.tv_sec++;
			dl.tv_nsec -= 1000000000L;
		}
		rc = pthread_mutex_timedlock(&m->mu, &dl);
#else
		dl = ks_deadline_ms(m->timeout_ms);
		rc = pthread_mutex_clocklock(&m->mu, CLOCK_MONOTONIC, &dl);
#endif
	}
	if (rc == 0) {
		lockdep_push(m);
		return 0;
	}
	if (rc == ETIMEDOUT) {
		atomic_fetch_add_explicit(&lock_timeouts, 1, memory_order_relaxed);
		/* The log ring ranks below every other lock, so logging here is legal. */
		if (m->rank < LOCK_RANK_LOG)
			log_warn("lock %s: not acquired in %u ms", m->name, m->timeout_ms);
		return -ETIMEDOUT;
	}
	return -rc;
}

int ks_trylock(struct ks_mutex *m) NO_THREAD_SAFETY_ANALYSIS
{
	int rc = pthread_mutex_trylock(&m->mu);

	if (rc)
		return -rc;
	lockdep_push(m);
	return 0;
}

void ks_unlock(struct ks_mutex *m) NO_THREAD_SAFETY_ANALYSIS
{
	lockdep_pop(m);
	pthread_mutex_unlock(&m->mu);
}

int ks_cond_init(struct ks_cond *c)
{
	pthread_condattr_t attr;
	int rc;

	rc = pthread_condattr_init(&attr);
	if (rc)
		return -rc;
	rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	if (!rc)
		rc = pthread_cond_init(&c->cv, &attr);
	pthread_condattr_destroy(&attr);
	return -rc;
}

void ks_cond_destroy(struct ks_cond *c)
{
	pthread_cond_destroy(&c->cv);
}

int ks_cond_wait_ms(struct ks_cond *c, struct ks_mutex *m, uint64_t timeout_ms)
{
	struct timespec dl = ks_deadline_ms(timeout_ms);
	int rc;

	/* The mutex is released while waiting: the rank stack stays as it is. */
	rc = pthread_cond_timedwait(&c->cv, &m->mu, &dl);
	return rc == ETIMEDOUT ? -ETIMEDOUT : -rc;
}

void ks_cond_signal(struct ks_cond *c)
{
	pthread_cond_signal(&c->cv);
}

void ks_cond_broadcast(struct ks_cond *c)
{
	pthread_cond_broadcast(&c->cv);
}

uint64_t ks_lock_timeouts_total(void)
{
	return atomic_load_explicit(&lock_timeouts, memory_order_relaxed);
}
