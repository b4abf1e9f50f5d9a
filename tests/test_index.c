/* Description: chunk index states, errors, read locks and TTLs, prefix lookup, LRU eviction, CLEAR. Labels: unit */
#include <errno.h>
#include <string.h>
#include <time.h>

#include "chunk_key.h"
#include "compiler.h"
#include "helpers.h"
#include "index.h"
#include "pool.h"

#define SLOT 4096u
#define OBJ 4000u	/* object bytes: smaller than the slot on purpose */

/* Key @i of rank @rank: a distinct chunk hash per i. */
static struct ks_key key(uint32_t i, uint32_t rank)
{
	uint8_t h[KS_HASH_LEN];
	struct ks_key k;

	for (unsigned b = 0; b < KS_HASH_LEN; b++)
		h[b] = (uint8_t)((i * 131u + b * 7u) ^ (i >> (b % 24)));
	memcpy(h, &i, sizeof(i));
	REQUIRE(ks_key_init(&k, h, "test-model", 10, rank) == 0);
	return k;
}

static uint64_t seed_of(const struct ks_key *k)
{
	return ks_key_hash64(k);
}

#define INV(ix)                                                                      \
	do {                                                                         \
		char _err[256];                                                      \
		int _rc = idx_check_invariants((ix), _err, sizeof(_err));            \
		if (_rc)                                                             \
			fprintf(stderr, "%s:%d: invariants: %s\n", __FILE__, __LINE__, _err); \
		CHECK_EQ(_rc, 0);                                                    \
	} while (0)

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static void setup(uint32_t nslots, const struct idx_config *cfg, struct pool **p, struct idx **ix)
{
	REQUIRE(pool_create((uint64_t)nslots * SLOT, p) == 0);
	REQUIRE(pool_configure_slots(*p, OBJ) == 0);
	REQUIRE(pool_nslots(*p) == nslots);
	REQUIRE(idx_create(cfg, *p, ix) == 0);
}

static void teardown(struct pool *p, struct idx *ix)
{
	idx_destroy(ix);
	CHECK_EQ(pool_free_slots(p), pool_nslots(p));	/* destroy returned every slot */
	pool_destroy(p);
}

/* Reserve, fill with the key's pattern, commit. */
static void store(struct idx *ix, const struct ks_key *k)
{
	struct idx_entry *e;

	REQUIRE(idx_reserve_write(ix, k, OBJ, &e) == 0);
	t_fill(idx_entry_data(ix, e), OBJ, seed_of(k));
	REQUIRE(idx_commit_write(ix, e) == 0);
}

static enum idx_state state_of(struct idx *ix, const struct ks_key *k)
{
	struct idx_entry_info in;

	return idx_key_info(ix, k, &in) ? IDX_FREE : in.state;
}

static uint32_t locks_of(struct idx *ix, const struct ks_key *k)
{
	struct idx_entry_info in;

	return idx_key_info(ix, k, &in) ? UINT32_MAX : in.read_locks;
}

static bool on_lru(struct idx *ix, const struct ks_key *k)
{
	struct idx_entry_info in;

	return idx_key_info(ix, k, &in) == 0 && in.on_lru;
}

static void test_create(void)
{
	struct pool *p;
	struct idx *ix;

	REQUIRE(pool_create(16 * SLOT, &p) == 0);
	CHECK_EQ(idx_create(&(struct idx_config){ .nshards = 3 }, p, &ix), -EINVAL);
	CHECK_EQ(idx_create(&(struct idx_config){ .nshards = 1u << 17 }, p, &ix), -EINVAL);
	CHECK_EQ(idx_create(NULL, NULL, &ix), -EINVAL);
	REQUIRE(idx_create(NULL, p, &ix) == 0);	/* defaults */

	/* Before the pool has slots: nothing can be reserved. */
	struct ks_key k = key(1, 0);
	struct idx_entry *e;

	CHECK_EQ(idx_reserve_write(ix, &k, OBJ, &e), -ENODEV);
	REQUIRE(pool_configure_slots(p, OBJ) == 0);
	CHECK_EQ(idx_reserve_write(ix, &k, OBJ, &e), 0);
	CHECK_EQ(state_of(ix, &k), IDX_WRITING);
	INV(ix);
	idx_destroy(ix);	/* with a reservation outstanding: freed, slot returned */
	CHECK_EQ(pool_free_slots(p), 16);
	pool_destroy(p);
}

static void test_store_states(void)
{
	struct idx_entry *e, *e2, *pe;
	struct idx_entry_info in;
	struct idx_stats st;
	struct pool *p;
	struct idx *ix;
	struct ks_key k = key(1, 0), k2 = key(2, 0), other_rank = key(1, 1);
	size_t hits;

	setup(8, &(struct idx_config){ .nshards = 4 }, &p, &ix);

	CHECK_EQ(idx_reserve_write(ix, &k, 0, &e), -EINVAL);
	CHECK_EQ(idx_reserve_write(ix, &k, SLOT + 1, &e), -E2BIG);
	CHECK_EQ(pool_free_slots(p), 8);	/* failures take no slot */

	/* FREE -> WRITING: invisible to lookups, pins and contains. */
	REQUIRE(idx_reserve_write(ix, &k, OBJ, &e) == 0);
	CHECK_EQ(pool_free_slots(p), 7);
	CHECK_EQ(state_of(ix, &k), IDX_WRITING);
	CHECK(!on_lru(ix, &k));
	CHECK(!idx_contains(ix, &k));
	CHECK_EQ(idx_pin(ix, &k, OBJ, &pe), -ENOENT);
	CHECK_EQ(idx_lookup_lock(ix, &k, 1, 1, 1, &hits), 0);
	CHECK_EQ(hits, 0);
	CHECK_EQ(idx_reserve_write(ix, &k, OBJ, &e2), -EEXIST);	/* WRITING */
	CHECK_EQ(pool_free_slots(p), 7);
	CHECK_EQ(idx_evict(ix, 10), 0);	/* WRITING is never evicted */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.entries, 1);
	CHECK_EQ(st.writing, 1);
	CHECK_EQ(st.ready, 0);
	INV(ix);

	/* WRITING -> READY */
	t_fill(idx_entry_data(ix, e), OBJ, seed_of(&k));
	CHECK(idx_entry_data(ix, e) == pool_slot_ptr(p, idx_entry_slot(e)));
	REQUIRE(idx_commit_write(ix, e) == 0);
	CHECK_EQ(state_of(ix, &k), IDX_READY);
	CHECK(on_lru(ix, &k));
	CHECK(idx_contains(ix, &k));
	CHECK(!idx_contains(ix, &other_rank));	/* the rank is part of the key */
	CHECK_EQ(idx_reserve_write(ix, &k, OBJ, &e2), -EEXIST);	/* READY */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.writing, 0);
	CHECK_EQ(st.ready, 1);
	INV(ix);

	/* READY -> READING by pins; -EMSGSIZE and -ENOENT pin nothing. */
	CHECK_EQ(idx_pin(ix, &k, OBJ - 1, &pe), -EMSGSIZE);
	CHECK_EQ(idx_pin(ix, &k2, OBJ, &pe), -ENOENT);
	CHECK_EQ(state_of(ix, &k), IDX_READY);
	REQUIRE(idx_pin(ix, &k, OBJ, &pe) == 0);
	CHECK_EQ(t_verify(idx_entry_data(ix, pe), OBJ, seed_of(&k)), (size_t)-1);
	REQUIRE(idx_key_info(ix, &k, &in) == 0);
	CHECK_EQ(in.state, IDX_READING);
	CHECK_EQ(in.pins, 1);
	CHECK_EQ(in.nbytes, OBJ);
	CHECK_EQ(in.slot, idx_entry_slot(pe));
	CHECK(!in.on_lru);
	CHECK(idx_contains(ix, &k));	/* READING counts as present */
	REQUIRE(idx_pin(ix, &k, OBJ, &e2) == 0);
	CHECK(e2 == pe);
	CHECK_EQ(idx_evict(ix, 10), 0);	/* pinned: never evicted */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.reading, 1);
	CHECK_EQ(st.pins, 2);
	INV(ix);
	idx_unpin(ix, e2);
	CHECK_EQ(state_of(ix, &k), IDX_READING);
	idx_unpin(ix, pe);
	CHECK_EQ(state_of(ix, &k), IDX_READY);
	CHECK(on_lru(ix, &k));
	idx_get_stats(ix, &st);
	CHECK_EQ(st.pins, 0);
	CHECK_EQ(st.ready, 1);
	INV(ix);

	/* READY -> READING by read locks, and back; saturation at 0; -ENOENT. */
	REQUIRE(idx_lookup_lock(ix, &k, 1, 1, 2, &hits) == 0);
	CHECK_EQ(hits, 1);
	CHECK_EQ(locks_of(ix, &k), 2);
	CHECK_EQ(state_of(ix, &k), IDX_READING);
	CHECK(!on_lru(ix, &k));
	CHECK_EQ(idx_evict(ix, 10), 0);	/* locked: never evicted */
	CHECK_EQ(idx_release_read_locks(ix, &k, 1), 0);
	CHECK_EQ(state_of(ix, &k), IDX_READING);
	CHECK_EQ(idx_release_read_locks(ix, &k, 5), 0);	/* saturates */
	CHECK_EQ(locks_of(ix, &k), 0);
	CHECK_EQ(state_of(ix, &k), IDX_READY);
	CHECK(on_lru(ix, &k));
	CHECK_EQ(idx_release_read_locks(ix, &k, 1), 0);	/* nothing to release: still 0 */
	CHECK_EQ(locks_of(ix, &k), 0);
	CHECK_EQ(idx_release_read_locks(ix, &k2, 1), -ENOENT);
	INV(ix);

	/* Lock and pin together: READING until both are gone. */
	REQUIRE(idx_lookup_lock(ix, &k, 1, 1, 1, &hits) == 0 && hits == 1);
	REQUIRE(idx_pin(ix, &k, OBJ, &pe) == 0);
	CHECK_EQ(idx_release_read_locks(ix, &k, 1), 0);
	CHECK_EQ(state_of(ix, &k), IDX_READING);
	CHECK(!on_lru(ix, &k));
	idx_unpin(ix, pe);
	CHECK_EQ(state_of(ix, &k), IDX_READY);
	CHECK(on_lru(ix, &k));

	/* WRITING -> FREE by abort: slot back, key storable again. */
	REQUIRE(idx_reserve_write(ix, &k2, OBJ, &e) == 0);
	CHECK_EQ(pool_free_slots(p), 6);
	idx_abort_write(ix, e);
	CHECK_EQ(pool_free_slots(p), 7);
	CHECK_EQ(state_of(ix, &k2), IDX_FREE);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.entries, 1);
	INV(ix);
	store(ix, &k2);
	CHECK_EQ(state_of(ix, &k2), IDX_READY);
	INV(ix);
	teardown(p, ix);
}

static void test_ttl(void)
{
	const struct idx_config cfg = { .nshards = 2, .read_ttl_ms = 50, .write_ttl_ms = 50 };
	struct idx_entry *w_old, *w_new, *pe;
	struct idx_entry_info in;
	struct idx_stats st;
	struct pool *p;
	struct idx *ix;
	struct ks_key a = key(10, 0), b = key(11, 0), c = key(12, 0);
	uint64_t t0;
	size_t hits;

	setup(8, &cfg, &p, &ix);
	store(ix, &a);
	store(ix, &c);

	/* Read locks: deadline = lock time + read_ttl; expiry is strictly after it. */
	t0 = ks_now_ms();
	REQUIRE(idx_lookup_lock(ix, &a, 1, 1, 3, &hits) == 0 && hits == 1);
	REQUIRE(idx_key_info(ix, &a, &in) == 0);
	CHECK(in.read_deadline_ms >= t0 + 50 && in.read_deadline_ms <= ks_now_ms() + 50);
	CHECK_EQ(idx_expire(ix, in.read_deadline_ms), 0);
	CHECK_EQ(locks_of(ix, &a), 3);
	/* Locks and a pin: the locks expire, the pin does not. */
	REQUIRE(idx_lookup_lock(ix, &c, 1, 1, 1, &hits) == 0 && hits == 1);
	REQUIRE(idx_pin(ix, &c, OBJ, &pe) == 0);

	sleep_ms(80);
	CHECK_EQ(idx_expire(ix, ks_now_ms()), 2);
	CHECK_EQ(locks_of(ix, &a), 0);
	CHECK_EQ(state_of(ix, &a), IDX_READY);
	CHECK(on_lru(ix, &a));
	CHECK_EQ(locks_of(ix, &c), 0);
	CHECK_EQ(state_of(ix, &c), IDX_READING);	/* still pinned */
	CHECK(!on_lru(ix, &c));
	CHECK_EQ(idx_expire(ix, ks_now_ms()), 0);	/* nothing left to expire */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.expired_read_locks, 2);
	CHECK_EQ(st.read_locks, 0);
	INV(ix);
	idx_unpin(ix, pe);
	CHECK(on_lru(ix, &c));
	CHECK_EQ(t_verify(pool_slot_ptr(p, in.slot), OBJ, seed_of(&a)), (size_t)-1);

	/* Taking a lock again resets the deadline (synthetic clock: deterministic). */
	REQUIRE(idx_lookup_lock(ix, &a, 1, 1, 1, &hits) == 0 && hits == 1);
	REQUIRE(idx_key_info(ix, &a, &in) == 0);
	t0 = in.read_deadline_ms;
	sleep_ms(5);
	REQUIRE(idx_lookup_lock(ix, &a, 1, 1, 1, &hits) == 0 && hits == 1);
	REQUIRE(idx_key_info(ix, &a, &in) == 0);
	CHECK(in.read_deadline_ms > t0);
	CHECK_EQ(idx_expire(ix, t0 + 1), 0);	/* the first deadline no longer counts */
	CHECK_EQ(locks_of(ix, &a), 2);
	CHECK_EQ(idx_expire(ix, in.read_deadline_ms + 1), 1);
	CHECK_EQ(locks_of(ix, &a), 0);
	INV(ix);

	/* Write reservations: expiry unlinks; the writer's commit then gets -ESTALE. */
	REQUIRE(idx_reserve_write(ix, &b, OBJ, &w_old) == 0);
	t_fill(idx_entry_data(ix, w_old), OBJ, 0xdead);
	CHECK_EQ(pool_free_slots(p), 5);
	sleep_ms(80);
	CHECK_EQ(idx_expire(ix, ks_now_ms()), 1);
	CHECK_EQ(state_of(ix, &b), IDX_FREE);
	CHECK_EQ(pool_free_slots(p), 5);	/* the writer still owns its slot */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.expired_writes, 1);
	CHECK_EQ(st.writing, 0);
	CHECK_EQ(st.unlinked_writing, 1);
	INV(ix);
	/* The key can be stored again meanwhile. */
	REQUIRE(idx_reserve_write(ix, &b, OBJ, &w_new) == 0);
	CHECK(idx_entry_slot(w_new) != idx_entry_slot(w_old));
	t_fill(idx_entry_data(ix, w_new), OBJ, seed_of(&b));
	CHECK_EQ(pool_free_slots(p), 4);
	CHECK_EQ(idx_commit_write(ix, w_old), -ESTALE);
	CHECK_EQ(pool_free_slots(p), 5);	/* freed at the commit */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.unlinked_writing, 0);
	CHECK_EQ(idx_commit_write(ix, w_new), 0);
	REQUIRE(idx_pin(ix, &b, OBJ, &pe) == 0);
	CHECK_EQ(t_verify(idx_entry_data(ix, pe), OBJ, seed_of(&b)), (size_t)-1);
	idx_unpin(ix, pe);
	INV(ix);

	/* An expired reservation that is aborted frees its slot too. */
	struct ks_key d = key(13, 0);

	REQUIRE(idx_reserve_write(ix, &d, OBJ, &w_old) == 0);
	REQUIRE(idx_key_info(ix, &d, &in) == 0);
	CHECK_EQ(idx_expire(ix, in.write_deadline_ms), 0);
	CHECK_EQ(idx_expire(ix, in.write_deadline_ms + 1), 1);
	CHECK_EQ(pool_free_slots(p), 4);
	idx_abort_write(ix, w_old);
	CHECK_EQ(pool_free_slots(p), 5);
	INV(ix);
	teardown(p, ix);
}

/*
 * Expiry pops deadline-ordered lists: it must expire exactly the entries
 * whose deadline is before "now", whatever the order they were locked or
 * re-locked in, and a budgeted call must leave the rest for the next one.
 */
static void test_expire_exact(void)
{
	enum { N = 600, BATCHES = 6, WRITERS = 40 };
	const struct idx_config cfg = { .nshards = 4, .read_ttl_ms = 10000, .write_ttl_ms = 20000 };
	static uint64_t deadline[N];
	static uint32_t locks[N];
	struct idx_entry *w[WRITERS];
	uint64_t wdeadline[WRITERS], cut, wcut;
	struct idx_entry_info in;
	struct idx_stats st;
	struct pool *p;
	struct idx *ix;
	size_t hits, due = 0, done = 0, calls = 0, n;
	bool more = true;

	setup(N + WRITERS, &cfg, &p, &ix);
	for (uint32_t i = 0; i < N; i++) {
		struct ks_key k = key(1000 + i, 0);

		store(ix, &k);
	}
	/* Lock the keys in batches a few ms apart, interleaved across shards,
	 * and re-lock some early keys later (their place must move). */
	for (uint32_t b = 0; b < BATCHES; b++) {
		for (uint32_t i = b; i < N; i += BATCHES) {
			struct ks_key k = key(1000 + i, 0);

			REQUIRE(idx_lookup_lock(ix, &k, 1, 1, 1, &hits) == 0 && hits == 1);
			locks[i]++;
		}
		if (b == BATCHES - 2)
			for (uint32_t i = 0; i < N; i += 7 * BATCHES) {
				struct ks_key k = key(1000 + i, 0);

				REQUIRE(idx_lookup_lock(ix, &k, 1, 1, 2, &hits) == 0 && hits == 1);
				locks[i] += 2;
			}
		sleep_ms(3);
	}
	for (uint32_t i = 0; i < N; i++) {
		struct ks_key k = key(1000 + i, 0);

		REQUIRE(idx_key_info(ix, &k, &in) == 0);
		deadline[i] = in.read_deadline_ms;
	}
	for (uint32_t i = 0; i < WRITERS; i++) {
		struct ks_key k = key(5000 + i, 0);

		REQUIRE(idx_reserve_write(ix, &k, OBJ, &w[i]) == 0);
		REQUIRE(idx_key_info(ix, &k, &in) == 0);
		wdeadline[i] = in.write_deadline_ms;
		if (i == WRITERS / 2)
			sleep_ms(3);
	}
	INV(ix);
	/* A cut in the middle of the lock batches (and of the writers). */
	cut = deadline[BATCHES / 2] ;
	wcut = wdeadline[WRITERS - 1];
	for (uint32_t i = 0; i < N; i++)
		due += deadline[i] < cut;
	REQUIRE(due > 0 && due < N);
	CHECK_EQ(idx_expire(ix, cut), due);
	for (uint32_t i = 0; i < N; i++) {
		struct ks_key k = key(1000 + i, 0);

		CHECK_EQ(locks_of(ix, &k), deadline[i] < cut ? 0 : locks[i]);
	}
	INV(ix);
	/* The rest of the read locks and the writers due before wcut, in calls of
	 * at most 7: every call within its budget, *more until the last. */
	due = 0;
	for (uint32_t i = 0; i < N; i++)
		due += deadline[i] >= cut && deadline[i] < wcut;
	for (uint32_t i = 0; i < WRITERS; i++)
		due += wdeadline[i] < wcut;
	while (more) {
		n = idx_expire_some(ix, wcut, 7, &more);
		CHECK(n <= 7);
		CHECK(more ? n == 7 : true);
		done += n;
		REQUIRE(++calls < 10000);
	}
	CHECK_EQ(done, due);
	CHECK_EQ(idx_expire(ix, wcut), 0);
	for (uint32_t i = 0; i < WRITERS; i++) {
		struct ks_key k = key(5000 + i, 0);

		CHECK_EQ(idx_key_info(ix, &k, &in) == 0, wdeadline[i] >= wcut);
	}
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 0);
	INV(ix);
	for (uint32_t i = 0; i < WRITERS; i++)
		CHECK_EQ(idx_commit_write(ix, w[i]), wdeadline[i] < wcut ? -ESTALE : 0);
	INV(ix);
	teardown(p, ix);
}

static void test_prefix_lookup(void)
{
	struct idx_stats st;
	struct pool *p;
	struct idx *ix;
	struct ks_key keys[12];
	size_t hits;

	setup(32, &(struct idx_config){ .nshards = 8 }, &p, &ix);

	/* group 1, hole at 5: the run stops there; keys after it are not locked. */
	for (uint32_t i = 0; i < 10; i++) {
		keys[i] = key(100 + i, 0);
		if (i != 5)
			store(ix, &keys[i]);
	}
	REQUIRE(idx_lookup_lock(ix, keys, 10, 1, 1, &hits) == 0);
	CHECK_EQ(hits, 5);
	for (uint32_t i = 0; i < 10; i++)
		if (i != 5)
			CHECK_EQ(locks_of(ix, &keys[i]), i < 5 ? 1 : 0);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 5);
	CHECK_EQ(st.reading, 5);
	INV(ix);
	for (uint32_t i = 0; i < 5; i++)
		CHECK_EQ(idx_release_read_locks(ix, &keys[i], 1), 0);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 0);

	/* A miss first: 0 hits, nothing locked. */
	REQUIRE(idx_lookup_lock(ix, &keys[5], 5, 1, 1, &hits) == 0);
	CHECK_EQ(hits, 0);
	CHECK_EQ(locks_of(ix, &keys[6]), 0);
	/* group 0 is taken as 1. */
	REQUIRE(idx_lookup_lock(ix, keys, 3, 0, 1, &hits) == 0);
	CHECK_EQ(hits, 3);
	for (uint32_t i = 0; i < 3; i++)
		CHECK_EQ(idx_release_read_locks(ix, &keys[i], 1), 0);
	/* locks_per_key 0 counts only. */
	REQUIRE(idx_lookup_lock(ix, keys, 10, 1, 0, &hits) == 0);
	CHECK_EQ(hits, 5);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 0);
	CHECK_EQ(st.reading, 0);
	INV(ix);
	idx_clear(ix);

	/* group 2 (two ranks, chunk-major): c0r0 c0r1 c1r0 c1r1 c2r0 [c2r1 missing]. */
	for (uint32_t c = 0; c < 3; c++)
		for (uint32_t r = 0; r < 2; r++)
			keys[c * 2 + r] = key(200 + c, ks_kv_rank(2, r));
	for (uint32_t i = 0; i < 5; i++)
		store(ix, &keys[i]);
	REQUIRE(idx_lookup_lock(ix, keys, 6, 2, 1, &hits) == 0);
	CHECK_EQ(hits, 5);	/* the present run ... */
	for (uint32_t i = 0; i < 5; i++)	/* ... but only (5/2)*2 = 4 locked */
		CHECK_EQ(locks_of(ix, &keys[i]), i < 4 ? 1 : 0);
	CHECK_EQ(state_of(ix, &keys[4]), IDX_READY);
	CHECK(on_lru(ix, &keys[4]));	/* the undo put it back on the LRU */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 4);
	INV(ix);
	for (uint32_t i = 0; i < 4; i++)
		CHECK_EQ(idx_release_read_locks(ix, &keys[i], 1), 0);

	/* group 4 over 5 hits: 4 locked; group 3: 3 locked; group 6: none. */
	REQUIRE(idx_lookup_lock(ix, keys, 6, 4, 1, &hits) == 0);
	CHECK_EQ(hits, 5);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 4);
	for (uint32_t i = 0; i < 4; i++)
		CHECK_EQ(idx_release_read_locks(ix, &keys[i], 1), 0);
	REQUIRE(idx_lookup_lock(ix, keys, 6, 6, 1, &hits) == 0);
	CHECK_EQ(hits, 5);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 0);
	INV(ix);

	/* A hole in chunk 1 (c1r1): 3 hits, 2 locked. */
	struct idx_entry *pe;

	REQUIRE(idx_pin(ix, &keys[3], OBJ, &pe) == 0);	/* pinned, cleared: gone from the table */
	idx_clear(ix);
	idx_unpin(ix, pe);
	for (uint32_t i = 0; i < 6; i++)
		if (i != 3)
			store(ix, &keys[i]);
	REQUIRE(idx_lookup_lock(ix, keys, 6, 2, 1, &hits) == 0);
	CHECK_EQ(hits, 3);
	for (uint32_t i = 0; i < 6; i++)
		if (i != 3)
			CHECK_EQ(locks_of(ix, &keys[i]), i < 2 ? 1 : 0);
	INV(ix);

	/* locks_per_key > 1 (MLA: 1 + extra_count), then one release per rank. */
	for (uint32_t i = 0; i < 2; i++)
		CHECK_EQ(idx_release_read_locks(ix, &keys[i], 1), 0);
	REQUIRE(idx_lookup_lock(ix, keys, 2, 2, 3, &hits) == 0);
	CHECK_EQ(hits, 2);
	for (uint32_t rel = 0; rel < 3; rel++) {
		CHECK_EQ(locks_of(ix, &keys[0]), 3 - rel);
		CHECK_EQ(state_of(ix, &keys[0]), IDX_READING);
		CHECK_EQ(idx_release_read_locks(ix, &keys[0], 1), 0);
		CHECK_EQ(idx_release_read_locks(ix, &keys[1], 1), 0);
	}
	CHECK_EQ(state_of(ix, &keys[0]), IDX_READY);
	CHECK_EQ(state_of(ix, &keys[1]), IDX_READY);
	CHECK(on_lru(ix, &keys[0]) && on_lru(ix, &keys[1]));
	idx_get_stats(ix, &st);
	CHECK_EQ(st.read_locks, 0);
	INV(ix);
	teardown(p, ix);
}

/* An eviction hook that only counts its calls (it runs with no index lock held). */
static int hook_calls;
static void count_hook(void *arg, const struct ks_key *k, const void *data, uint64_t nbytes)
{
	(void)arg, (void)k, (void)data, (void)nbytes;
	hook_calls++;
}

static void test_eviction(void)
{
	struct idx_entry *w7, *wn0, *pinned, *pe, *fill[4];
	struct idx_stats st;
	struct pool_stats ps;
	struct pool *p;
	struct idx *ix;
	struct ks_key k[8], n[6];
	size_t hits;

	setup(8, &(struct idx_config){ .nshards = 4 }, &p, &ix);
	for (uint32_t i = 0; i < 8; i++)
		k[i] = key(300 + i, 0);
	for (uint32_t i = 0; i < 6; i++)
		n[i] = key(400 + i, 0);
	for (uint32_t i = 0; i < 7; i++)
		store(ix, &k[i]);
	REQUIRE(idx_reserve_write(ix, &k[7], OBJ, &w7) == 0);	/* WRITING */
	CHECK_EQ(pool_free_slots(p), 0);

	/* Use k0 (to the MRU end), lock k1, pin k2. LRU: k3 k4 k5 k6 k0. */
	REQUIRE(idx_pin(ix, &k[0], OBJ, &pe) == 0);
	idx_unpin(ix, pe);
	REQUIRE(idx_lookup_lock(ix, &k[1], 1, 1, 1, &hits) == 0 && hits == 1);
	REQUIRE(idx_pin(ix, &k[2], OBJ, &pinned) == 0);
	INV(ix);

	CHECK_EQ(idx_evict(ix, 1), 1);
	CHECK_EQ(state_of(ix, &k[3]), IDX_FREE);
	CHECK_EQ(pool_free_slots(p), 1);
	for (uint32_t i = 0; i < 8; i++)
		if (i != 3)
			CHECK(state_of(ix, &k[i]) != IDX_FREE);

	/* A reservation takes the free slot; the next one evicts k4 (LRU first). */
	REQUIRE(idx_reserve_write(ix, &n[0], OBJ, &wn0) == 0);
	CHECK_EQ(pool_free_slots(p), 0);
	REQUIRE(idx_reserve_write(ix, &n[1], OBJ, &fill[0]) == 0);
	CHECK_EQ(state_of(ix, &k[4]), IDX_FREE);
	CHECK(state_of(ix, &k[5]) == IDX_READY);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.evictions, 2);
	INV(ix);

	/* Evict everything evictable: k5 k6 k0; never k1 (locked), k2 (pinned), writers. */
	CHECK_EQ(idx_evict(ix, 100), 3);
	CHECK_EQ(state_of(ix, &k[5]), IDX_FREE);
	CHECK_EQ(state_of(ix, &k[6]), IDX_FREE);
	CHECK_EQ(state_of(ix, &k[0]), IDX_FREE);
	CHECK_EQ(state_of(ix, &k[1]), IDX_READING);
	CHECK_EQ(state_of(ix, &k[2]), IDX_READING);
	CHECK_EQ(state_of(ix, &k[7]), IDX_WRITING);
	CHECK_EQ(state_of(ix, &n[0]), IDX_WRITING);
	CHECK_EQ(idx_evict(ix, 100), 0);
	CHECK_EQ(pool_free_slots(p), 3);
	/* The survivors' bytes are untouched. */
	CHECK_EQ(t_verify(idx_entry_data(ix, pinned), OBJ, seed_of(&k[2])), (size_t)-1);

	/* Fill the rest with reservations: then nothing can be evicted -> -ENOSPC. */
	for (uint32_t i = 1; i < 4; i++)
		REQUIRE(idx_reserve_write(ix, &n[i + 1], OBJ, &fill[i]) == 0);
	CHECK_EQ(pool_free_slots(p), 0);
	CHECK_EQ(idx_reserve_write(ix, &n[5], OBJ, &pe), -ENOSPC);
	CHECK_EQ(state_of(ix, &n[5]), IDX_FREE);
	pool_get_stats(p, &ps);
	CHECK(ps.alloc_failures >= 1);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.evictions, 5);
	CHECK_EQ(st.entries, 8);
	INV(ix);

	/* Releasing the lock makes k1 evictable again; the reservation then gets its slot. */
	CHECK_EQ(idx_release_read_locks(ix, &k[1], 1), 0);
	REQUIRE(idx_reserve_write(ix, &n[5], OBJ, &pe) == 0);
	CHECK_EQ(state_of(ix, &k[1]), IDX_FREE);
	idx_abort_write(ix, pe);
	for (uint32_t i = 0; i < 4; i++)
		idx_abort_write(ix, fill[i]);
	idx_abort_write(ix, wn0);
	idx_abort_write(ix, w7);
	idx_unpin(ix, pinned);
	INV(ix);
	teardown(p, ix);

	/* Low watermark: one reservation on a full pool evicts until 3 slots are free. */
	setup(8, &(struct idx_config){ .nshards = 2, .evict_low_watermark_slots = 3 }, &p, &ix);
	for (uint32_t i = 0; i < 8; i++)
		store(ix, &k[i]);
	REQUIRE(idx_reserve_write(ix, &n[0], OBJ, &wn0) == 0);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.evictions, 3);
	CHECK_EQ(pool_free_slots(p), 2);
	for (uint32_t i = 0; i < 8; i++)	/* the three oldest went */
		CHECK_EQ(state_of(ix, &k[i]) == IDX_FREE, i < 3);
	REQUIRE(idx_reserve_write(ix, &n[1], OBJ, &fill[0]) == 0);	/* no eviction needed */
	idx_get_stats(ix, &st);
	CHECK_EQ(st.evictions, 3);
	idx_abort_write(ix, wn0);
	idx_abort_write(ix, fill[0]);
	INV(ix);
	teardown(p, ix);

	/* With an eviction hook (demotion to L2) a slot frees only after the
	 * hook has read it: one reservation must still evict just what it
	 * needs, not a whole batch. */
	setup(8, &(struct idx_config){ .nshards = 2, .evict_low_watermark_slots = 1 }, &p, &ix);
	hook_calls = 0;
	idx_set_evict_hook(ix, count_hook, NULL);
	for (uint32_t i = 0; i < 8; i++)
		store(ix, &k[i]);
	REQUIRE(idx_reserve_write(ix, &n[0], OBJ, &wn0) == 0);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.evictions, 1);
	CHECK_EQ(hook_calls, 1);
	for (uint32_t i = 0; i < 8; i++)	/* only the oldest went */
		CHECK_EQ(state_of(ix, &k[i]) == IDX_FREE, i == 0);
	idx_abort_write(ix, wn0);
	INV(ix);
	teardown(p, ix);
}

static void test_clear(void)
{
	struct idx_entry *pinned, *writer, *pe;
	struct idx_stats st;
	struct pool *p;
	struct idx *ix;
	struct ks_key k[5];
	size_t hits;

	setup(8, &(struct idx_config){ .nshards = 4 }, &p, &ix);
	for (uint32_t i = 0; i < 5; i++)
		k[i] = key(500 + i, 0);
	for (uint32_t i = 0; i < 4; i++)
		store(ix, &k[i]);
	REQUIRE(idx_pin(ix, &k[1], OBJ, &pinned) == 0);
	REQUIRE(idx_lookup_lock(ix, &k[2], 1, 1, 1, &hits) == 0 && hits == 1);
	REQUIRE(idx_reserve_write(ix, &k[4], OBJ, &writer) == 0);
	CHECK_EQ(pool_free_slots(p), 3);

	CHECK_EQ(idx_clear(ix), 5);
	/* k0, k3 and the locked k2 are freed now; the pinned k1 and the writer wait. */
	CHECK_EQ(pool_free_slots(p), 6);
	for (uint32_t i = 0; i < 5; i++) {
		CHECK(!idx_contains(ix, &k[i]));
		CHECK_EQ(state_of(ix, &k[i]), IDX_FREE);
	}
	CHECK_EQ(idx_pin(ix, &k[1], OBJ, &pe), -ENOENT);
	CHECK_EQ(idx_release_read_locks(ix, &k[2], 1), -ENOENT);	/* locks are void */
	CHECK_EQ(idx_lookup_lock(ix, k, 4, 1, 1, &hits), 0);
	CHECK_EQ(hits, 0);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.entries, 0);
	CHECK_EQ(st.read_locks, 0);
	CHECK_EQ(st.pins, 1);
	CHECK_EQ(st.unlinked_pinned, 1);
	CHECK_EQ(st.unlinked_writing, 1);
	INV(ix);
	CHECK_EQ(idx_clear(ix), 0);	/* orphans are not linked: nothing more to unlink */

	/* The pinned copy's bytes stay valid until the unpin, which frees it. */
	CHECK_EQ(t_verify(idx_entry_data(ix, pinned), OBJ, seed_of(&k[1])), (size_t)-1);
	store(ix, &k[1]);	/* the key is free to be stored again meanwhile */
	CHECK_EQ(pool_free_slots(p), 5);
	idx_unpin(ix, pinned);
	CHECK_EQ(pool_free_slots(p), 6);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.unlinked_pinned, 0);
	CHECK_EQ(st.pins, 0);
	CHECK_EQ(state_of(ix, &k[1]), IDX_READY);	/* the new copy is unaffected */
	CHECK_EQ(idx_commit_write(ix, writer), -ESTALE);
	CHECK_EQ(pool_free_slots(p), 7);
	INV(ix);

	/* A pinned orphan left at destroy is freed there (ASan checks the leak). */
	REQUIRE(idx_pin(ix, &k[1], OBJ, &pinned) == 0);
	CHECK_EQ(idx_clear(ix), 1);
	CHECK_EQ(pool_free_slots(p), 7);
	INV(ix);
	teardown(p, ix);
}

/* Many entries in one shard: the table grows by rehashing and finds them all. */
static void test_growth(void)
{
	const uint32_t n = 1000;
	struct idx_stats st;
	struct pool *p;
	struct idx *ix;
	size_t hits;

	REQUIRE(pool_create((uint64_t)n * SLOT, &p) == 0);
	REQUIRE(idx_create(&(struct idx_config){ .nshards = 1 }, p, &ix) == 0);
	REQUIRE(pool_configure_slots(p, OBJ) == 0);	/* after idx_create: minimum tables */
	for (uint32_t i = 0; i < n; i++) {
		struct ks_key k = key(1000 + i, 0);

		store(ix, &k);
	}
	idx_get_stats(ix, &st);
	CHECK_EQ(st.entries, n);
	CHECK_EQ(st.ready, n);
	CHECK_EQ(pool_free_slots(p), 0);
	for (uint32_t i = 0; i < n; i++) {
		struct ks_key k = key(1000 + i, 0);
		struct idx_entry *e;

		CHECK_EQ(idx_lookup_lock(ix, &k, 1, 1, 0, &hits), 0);
		CHECK_EQ(hits, 1);
		if (idx_pin(ix, &k, OBJ, &e) == 0) {
			CHECK_EQ(t_verify(idx_entry_data(ix, e), OBJ, seed_of(&k)), (size_t)-1);
			idx_unpin(ix, e);
		} else {
			CHECK(0);
		}
	}
	INV(ix);
	CHECK_EQ(idx_clear(ix), n);
	CHECK_EQ(pool_free_slots(p), n);
	INV(ix);
	teardown(p, ix);
}

/* The checker itself must catch broken books: free an entry's slot behind its back. */
static void test_invariants_catch(void)
{
	struct pool *p;
	struct idx *ix;
	struct ks_key k = key(7, 0);
	struct idx_entry_info in;
	uint32_t slot;
	char err[256];

	setup(4, NULL, &p, &ix);
	store(ix, &k);
	INV(ix);
	REQUIRE(idx_key_info(ix, &k, &in) == 0);
	pool_free(p, in.slot);
	CHECK_EQ(idx_check_invariants(ix, err, sizeof(err)), -EUCLEAN);
	CHECK(strstr(err, "slots in use") != NULL);
	REQUIRE(pool_alloc(p, &slot) == 0);	/* LIFO: the same slot comes back */
	CHECK_EQ(slot, in.slot);
	INV(ix);
	teardown(p, ix);
}

int main(void)
{
	test_create();
	test_store_states();
	test_ttl();
	test_expire_exact();
	test_prefix_lookup();
	test_eviction();
	test_clear();
	test_growth();
	test_invariants_catch();
	return t_result("index");
}
