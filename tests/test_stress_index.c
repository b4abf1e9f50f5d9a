/* Description: 8 threads race every index operation on a tiny pool; bytes verified on every pin, books balanced at the end. Labels: unit tsan */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>

#include "chunk_key.h"
#include "compiler.h"
#include "helpers.h"
#include "index.h"
#include "pool.h"

#define NTHREADS 8
#define NKEYS 64	/* over 2x the slots: reservations keep forcing eviction */
#define NSLOTS 24
#define SLOT 4096u
#define MAX_PINS 3
#define MAX_RESV 2
#define MAX_LOCKS 24
#define LOOKUP_MAX 6
#define CLEAR_EVERY_MS 100

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define KS_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define KS_SANITIZED 1
#endif
#endif
#ifdef KS_SANITIZED
#define DEFAULT_RUN_MS 1500	/* sanitizers run 5-15x slower; keep the test under 10 s */
#else
#define DEFAULT_RUN_MS 3000
#endif

static struct idx *ix;
static struct pool *pool;
static struct ks_key keys[NKEYS];
static _Atomic bool stop;
static _Atomic int failures;
static _Atomic uint64_t last_clear_ms;

/* Counters, to prove the interesting paths ran. */
static _Atomic uint64_t n_commits, n_stale, n_pins, n_enospc, n_lookups, n_hits, n_clears,
	n_msgsize;

#define TFAIL(...)                                                                   \
	do {                                                                         \
		if (atomic_fetch_add(&failures, 1) < 10)                             \
			fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__),          \
				fprintf(stderr, __VA_ARGS__), fputc('\n', stderr);   \
	} while (0)

/* Object size of key @id: differs per key so a slot mix-up also shows in the size. */
static uint64_t nbytes_of(uint32_t id)
{
	return SLOT - 8u * (id % 4);
}

static uint64_t seed_of(uint32_t id)
{
	return 0x5eed000000ull + id;
}

struct rng {
	uint64_t s;
};

static uint32_t rnd(struct rng *r, uint32_t n)
{
	r->s ^= r->s << 13;
	r->s ^= r->s >> 7;
	r->s ^= r->s << 17;
	return (uint32_t)((r->s >> 16) % n);
}

struct held_pin {
	struct idx_entry *e;
	uint32_t id;
};
struct held_resv {
	struct idx_entry *e;
	uint32_t id;
	uint64_t done_ms;	/* not finished before: some outlive write_ttl_ms */
};
struct held_lock {
	uint32_t id;
	uint32_t count;
};

struct worker {
	struct rng rng;
	struct held_pin pins[MAX_PINS];
	struct held_resv resv[MAX_RESV];
	struct held_lock locks[MAX_LOCKS];
	unsigned npins, nresv, nlocks;
};

static void verify(const struct idx_entry *e, uint32_t id, const char *when)
{
	size_t bad = t_verify(idx_entry_data(ix, e), nbytes_of(id), seed_of(id));

	if (bad != (size_t)-1)
		TFAIL("key %u slot %u: byte %zu corrupted (%s)", id, idx_entry_slot(e), bad, when);
}

static void op_reserve(struct worker *w)
{
	uint32_t id = rnd(&w->rng, NKEYS);
	uint64_t nb = nbytes_of(id);
	struct idx_entry *e;
	uint8_t *data;
	int rc;

	if (w->nresv == MAX_RESV)
		return;
	rc = idx_reserve_write(ix, &keys[id], nb, &e);
	if (rc == -EEXIST)
		return;
	if (rc == -ENOSPC) {
		atomic_fetch_add_explicit(&n_enospc, 1, memory_order_relaxed);
		return;
	}
	if (rc) {
		TFAIL("reserve: %d", rc);
		return;
	}
	/* Write in two halves with a yield between: a wider window for a slot mix-up. */
	data = idx_entry_data(ix, e);
	t_fill(data, nb, seed_of(id));
	memset(data, 0, nb / 2);
	sched_yield();
	t_fill(data, nb, seed_of(id));
	/* One copy in 16 is slow: up to 45 ms, past write_ttl_ms (30). */
	w->resv[w->nresv++] = (struct held_resv){
		e, id, ks_now_ms() + (rnd(&w->rng, 16) == 0 ? rnd(&w->rng, 45) : 0) };
}

static void finish_resv(struct worker *w, unsigned i, bool commit)
{
	struct held_resv r = w->resv[i];
	int rc;

	if (!atomic_load_explicit(&stop, memory_order_relaxed) && ks_now_ms() < r.done_ms)
		return;	/* a slow copy: still running */
	w->resv[i] = w->resv[--w->nresv];
	verify(r.e, r.id, "before commit");
	if (!commit) {
		idx_abort_write(ix, r.e);
		return;
	}
	rc = idx_commit_write(ix, r.e);
	if (rc == 0)
		atomic_fetch_add_explicit(&n_commits, 1, memory_order_relaxed);
	else if (rc == -ESTALE)
		atomic_fetch_add_explicit(&n_stale, 1, memory_order_relaxed);
	else
		TFAIL("commit: %d", rc);
}

static void op_pin(struct worker *w)
{
	uint32_t id = rnd(&w->rng, NKEYS);
	bool wrong = rnd(&w->rng, 16) == 0;
	struct idx_entry *e;
	int rc;

	if (w->npins == MAX_PINS)
		return;
	rc = idx_pin(ix, &keys[id], nbytes_of(id) + (wrong ? 8 : 0), &e);
	if (rc == -ENOENT)
		return;
	if (wrong) {
		if (rc == -EMSGSIZE)
			atomic_fetch_add_explicit(&n_msgsize, 1, memory_order_relaxed);
		else
			TFAIL("pin with the wrong size: %d", rc);
		if (rc == 0)
			idx_unpin(ix, e);
		return;
	}
	if (rc) {
		TFAIL("pin: %d", rc);
		return;
	}
	atomic_fetch_add_explicit(&n_pins, 1, memory_order_relaxed);
	verify(e, id, "at pin");
	w->pins[w->npins++] = (struct held_pin){ e, id };
}

static void unpin_one(struct worker *w, unsigned i)
{
	struct held_pin h = w->pins[i];

	w->pins[i] = w->pins[--w->npins];
	verify(h.e, h.id, "at unpin");	/* the slot stayed ours for the whole pin */
	idx_unpin(ix, h.e);
}

static void op_lookup(struct worker *w)
{
	uint32_t first = rnd(&w->rng, NKEYS), n = 1 + rnd(&w->rng, LOOKUP_MAX);
	uint32_t group = 1 + rnd(&w->rng, 2), per_key = 1 + rnd(&w->rng, 2);
	struct ks_key run[LOOKUP_MAX];
	size_t hits, locked;
	int rc;

	if (w->nlocks + LOOKUP_MAX > MAX_LOCKS)
		return;
	for (uint32_t i = 0; i < n; i++)
		run[i] = keys[(first + i) % NKEYS];
	rc = idx_lookup_lock(ix, run, n, group, per_key, &hits);
	if (rc) {
		TFAIL("lookup: %d", rc);
		return;
	}
	if (hits > n)
		TFAIL("lookup: %zu hits of %u keys", hits, n);
	atomic_fetch_add_explicit(&n_lookups, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&n_hits, hits, memory_order_relaxed);
	locked = hits / group * group;
	if (rnd(&w->rng, 8) == 0)
		return;	/* an engine that never retrieves: these locks must expire by TTL */
	for (size_t i = 0; i < locked; i++)
		w->locks[w->nlocks++] = (struct held_lock){ (first + (uint32_t)i) % NKEYS, per_key };
}

static void release_one(struct worker *w, unsigned i)
{
	struct held_lock l = w->locks[i];
	int rc;

	w->locks[i] = w->locks[--w->nlocks];
	rc = idx_release_read_locks(ix, &keys[l.id], l.count);
	if (rc && rc != -ENOENT)	/* -ENOENT: cleared meanwhile, locks void */
		TFAIL("release: %d", rc);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		uint32_t op = rnd(&w->rng, 1000);

		if (op < 250) {
			op_reserve(w);
		} else if (op < 400) {
			if (w->nresv)
				finish_resv(w, rnd(&w->rng, w->nresv), rnd(&w->rng, 8) != 0);
		} else if (op < 550) {
			op_pin(w);
		} else if (op < 680) {
			if (w->npins)
				unpin_one(w, rnd(&w->rng, w->npins));
		} else if (op < 800) {
			op_lookup(w);
		} else if (op < 920) {
			if (w->nlocks)
				release_one(w, rnd(&w->rng, w->nlocks));
		} else if (op < 950) {
			idx_evict(ix, 1 + rnd(&w->rng, 3));
		} else if (op < 980) {
			idx_expire(ix, ks_now_ms());
		} else if (op < 999) {
			struct idx_stats st;

			idx_get_stats(ix, &st);
			(void)idx_contains(ix, &keys[rnd(&w->rng, NKEYS)]);
		} else {
			/* CLEAR by time, not by op count: often enough to race everything,
			 * rarely enough that stored objects live to be pinned. */
			uint64_t now = ks_now_ms(), last = atomic_load(&last_clear_ms);

			if (now >= last + CLEAR_EVERY_MS &&
			    atomic_compare_exchange_strong(&last_clear_ms, &last, now)) {
				idx_clear(ix);
				atomic_fetch_add_explicit(&n_clears, 1, memory_order_relaxed);
			}
		}
	}
	while (w->npins)
		unpin_one(w, 0);
	while (w->nresv)
		finish_resv(w, 0, true);
	while (w->nlocks)
		release_one(w, 0);
	return NULL;
}

static unsigned run_ms(void)
{
	const char *s = getenv("KVSTASH_STRESS_MS");

	return s && atoi(s) > 0 ? (unsigned)atoi(s) : DEFAULT_RUN_MS;
}

int main(void)
{
	const struct idx_config cfg = { .nshards = 4, .read_ttl_ms = 3, .write_ttl_ms = 30,
					.evict_low_watermark_slots = 2 };
	static struct worker workers[NTHREADS];
	pthread_t tid[NTHREADS];
	struct pool_stats ps;
	struct idx_stats st;
	char err[256];
	uint64_t t_end;
	uint32_t ready = 0;

	REQUIRE(pool_create(NSLOTS * SLOT, &pool) == 0);
	REQUIRE(pool_configure_slots(pool, SLOT) == 0);
	REQUIRE(idx_create(&cfg, pool, &ix) == 0);
	for (uint32_t i = 0; i < NKEYS; i++) {
		uint8_t h[KS_HASH_LEN] = { 0 };

		memcpy(h, &i, sizeof(i));
		h[31] = 0xa5;
		REQUIRE(ks_key_init(&keys[i], h, "stress", 6, ks_kv_rank(1, 0)) == 0);
	}

	atomic_store(&stop, false);
	for (int i = 0; i < NTHREADS; i++) {
		workers[i].rng.s = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
		REQUIRE(pthread_create(&tid[i], NULL, worker_main, &workers[i]) == 0);
	}
	t_end = ks_now_ms() + run_ms();
	while (ks_now_ms() < t_end) {
		struct timespec ts = { 0, 10 * 1000000L };

		nanosleep(&ts, NULL);
	}
	atomic_store(&stop, true);
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(tid[i], NULL);

	CHECK_EQ(atomic_load(&failures), 0);

	/* Abandoned lookup locks go by TTL; every pin, reservation and other lock was
	 * given back by its thread: the books must balance. */
	{
		struct timespec ts = { 0, (cfg.read_ttl_ms + 5) * 1000000L };

		nanosleep(&ts, NULL);
		idx_expire(ix, ks_now_ms());
	}
	idx_get_stats(ix, &st);
	CHECK_EQ(st.pins, 0);
	CHECK_EQ(st.unlinked_pinned, 0);
	CHECK_EQ(st.unlinked_writing, 0);
	CHECK_EQ(st.writing, 0);
	CHECK_EQ(st.read_locks, 0);
	CHECK_EQ(st.reading, 0);
	CHECK_EQ(st.lock_timeouts, 0);
	CHECK(st.evictions > 0);
	CHECK(st.expired_read_locks + st.expired_writes > 0);
	CHECK(idx_check_invariants(ix, err, sizeof(err)) == 0);
	if (err[0])
		fprintf(stderr, "invariants: %s\n", err);
	pool_get_stats(pool, &ps);
	CHECK_EQ(ps.free_slots + ps.used_bytes / ps.slot_bytes, ps.nslots);
	CHECK_EQ(ps.nslots - ps.free_slots, st.entries);
	CHECK_EQ(ps.bad_frees, 0);
	CHECK_EQ(ps.deferred_frees, 0);

	/* Every object that survived holds its key's bytes. */
	for (uint32_t i = 0; i < NKEYS; i++) {
		struct idx_entry *e;

		if (idx_pin(ix, &keys[i], nbytes_of(i), &e) == 0) {
			verify(e, i, "at the end");
			idx_unpin(ix, e);
			ready++;
		}
	}
	CHECK_EQ(ready, st.ready);
	CHECK_EQ(atomic_load(&failures), 0);

	CHECK_EQ(idx_clear(ix), st.entries);
	CHECK_EQ(pool_free_slots(pool), NSLOTS);	/* no slot leaked */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.entries, 0);
	CHECK(idx_check_invariants(ix, err, sizeof(err)) == 0);

	fprintf(stderr,
		"stress_index: %u ms, commits %llu stale %llu pins %llu enospc %llu lookups %llu "
		"(hits %llu) clears %llu msgsize %llu evictions %llu expired %llu/%llu\n",
		run_ms(), (unsigned long long)n_commits, (unsigned long long)n_stale,
		(unsigned long long)n_pins, (unsigned long long)n_enospc,
		(unsigned long long)n_lookups, (unsigned long long)n_hits,
		(unsigned long long)n_clears, (unsigned long long)n_msgsize,
		(unsigned long long)st.evictions, (unsigned long long)st.expired_read_locks,
		(unsigned long long)st.expired_writes);
	CHECK(n_commits > 0 && n_pins > 0 && n_hits > 0);

	idx_destroy(ix);
	pool_destroy(pool);
	return t_result("stress_index");
}
