/*
 * Description: a release whose lock wait times out is deferred, never lost, and counted in /metrics. Labels: unit tsan
 *
 * Fault points (src/fault.h) make the lock waits of the release paths time
 * out, the way a thread stuck holding the lock would:
 *   - idx.release_lock: idx_unpin and idx_abort_write cannot take the shard
 *     lock. The entry stays pinned (reserved), off the LRU, and
 *     deferred_releases counts it; the next holder of the shard lock
 *     (idx_expire here, the daemon's housekeeping) applies it: the pin goes,
 *     the entry is evictable again or its slot returns, invariants hold. Two
 *     deferred unpins of one entry, an unpin of an orphan (cleared while
 *     pinned) and an abort are each settled exactly once.
 *   - pool.free_lock: pool_free cannot take free_lock. The slot is counted
 *     in deferred_frees, stays used until the next pool_alloc/pool_free
 *     takes the lock, then is free again; a second free of a deferred slot
 *     is a bad free, not a second push.
 *   - kvstashd with KVSTASH_FAULTS=idx.release_lock=1: a RETRIEVE's unpin is
 *     deferred; `kvstash_l1_deferred_releases_total` (stats
 *     deferred_releases) is 1 and the pin is gone within a few housekeeping
 *     turns; every RETRIEVE after that works.
 * Skips (77) in a build without fault injection (Release).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "chunk_key.h"
#include "compiler.h"
#include "fault.h"
#include "helpers.h"
#include "index.h"
#include "pool.h"

#ifdef KS_FAULT_INJECTION

#include "kvstash.h"
#include "kvfix.h"

#define OBJ 4096u
#define NSLOTS 8u

static void arm(const char *spec)
{
	char err[256] = "";

	if (ks_fault_configure(spec, err, sizeof(err))) {
		fprintf(stderr, "ks_fault_configure(%s): %s\n", spec, err);
		REQUIRE(0);
	}
}

static struct ks_key key(uint32_t i)
{
	struct ks_key k;

	memset(&k, 0, sizeof(k));
	k.chunk_hash[0] = (uint8_t)i;
	k.chunk_hash[1] = (uint8_t)(i >> 8);
	k.chunk_hash[31] = 0x5a;
	k.model_len = (uint16_t)snprintf(k.model, sizeof(k.model), "deferred-test");
	return k;
}

/* One shard: every release below meets the deferred ones of the test. */
static void setup(struct pool **p, struct idx **ix)
{
	struct idx_config cfg = { .nshards = 1 };

	REQUIRE(pool_create((uint64_t)NSLOTS * OBJ, p) == 0);
	REQUIRE(pool_configure_slots(*p, OBJ) == 0);
	REQUIRE(idx_create(&cfg, *p, ix) == 0);
}

static void check_invariants(struct idx *ix)
{
	char err[512];

	if (idx_check_invariants(ix, err, sizeof(err))) {
		fprintf(stderr, "invariants: %s\n", err);
		CHECK(0);
	}
}

static struct idx_entry_info info_of(struct idx *ix, const struct ks_key *k)
{
	struct idx_entry_info in;

	memset(&in, 0, sizeof(in));
	in.state = IDX_FREE;
	if (idx_key_info(ix, k, &in))
		in.state = IDX_FREE;
	return in;
}

static uint64_t deferred_of(struct idx *ix)
{
	struct idx_stats st;

	idx_get_stats(ix, &st);
	return st.deferred_releases;
}

static void store(struct idx *ix, const struct ks_key *k)
{
	struct idx_entry *e;

	REQUIRE(idx_reserve_write(ix, k, OBJ, &e) == 0);
	memset(idx_entry_data(ix, e), 0x3c, OBJ);
	REQUIRE(idx_commit_write(ix, e) == 0);
}

static void test_unpin(void)
{
	struct pool *p;
	struct idx *ix;
	struct ks_key k = key(1);
	struct idx_entry *e1, *e2;
	struct idx_entry_info in;
	struct idx_stats st;

	setup(&p, &ix);
	store(ix, &k);
	REQUIRE(idx_pin(ix, &k, OBJ, &e1) == 0);
	REQUIRE(idx_pin(ix, &k, OBJ, &e2) == 0);
	REQUIRE(e1 == e2);

	arm("idx.release_lock=2");
	idx_unpin(ix, e1);
	idx_unpin(ix, e2);
	arm(NULL);
	in = info_of(ix, &k);
	CHECK_EQ(in.pins, 2);	/* both still held: deferred, not dropped */
	CHECK(!in.on_lru);
	CHECK_EQ(deferred_of(ix), 2);
	check_invariants(ix);

	/* Housekeeping holds the shard lock: it applies both, once each. */
	idx_expire(ix, ks_now_ms());
	in = info_of(ix, &k);
	CHECK_EQ(in.pins, 0);
	CHECK(in.on_lru);
	CHECK_EQ(in.state, IDX_READY);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.pins, 0);
	check_invariants(ix);
	idx_expire(ix, ks_now_ms());	/* nothing left owed: no second unpin */
	CHECK_EQ(info_of(ix, &k).pins, 0);
	CHECK_EQ(idx_evict(ix, 1), 1);	/* evictable again */
	check_invariants(ix);

	idx_destroy(ix);
	CHECK_EQ(pool_free_slots(p), NSLOTS);
	pool_destroy(p);
}

/* An entry cleared while pinned is an orphan: its deferred last unpin frees it. */
static void test_orphan_unpin(void)
{
	struct pool *p;
	struct idx *ix;
	struct ks_key k = key(2), other = key(3);
	struct idx_entry *e, *o;
	struct idx_stats st;

	setup(&p, &ix);
	store(ix, &k);
	REQUIRE(idx_pin(ix, &k, OBJ, &e) == 0);
	CHECK_EQ(idx_clear(ix), 1);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.unlinked_pinned, 1);

	arm("idx.release_lock=1");
	idx_unpin(ix, e);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.unlinked_pinned, 1);	/* still held */
	CHECK_EQ(pool_free_slots(p), NSLOTS - 1);

	/* Any later release that takes the lock settles it, here an abort
	 * (the fault fired once: this one gets the lock). */
	REQUIRE(idx_reserve_write(ix, &other, OBJ, &o) == 0);
	idx_abort_write(ix, o);
	idx_get_stats(ix, &st);
	CHECK_EQ(st.unlinked_pinned, 0);
	CHECK_EQ(st.pins, 0);
	CHECK_EQ(pool_free_slots(p), NSLOTS);
	CHECK_EQ(st.deferred_releases, 1);
	check_invariants(ix);
	arm(NULL);

	idx_destroy(ix);
	pool_destroy(p);
}

static void test_abort(void)
{
	struct pool *p;
	struct idx *ix;
	struct ks_key k = key(4);
	struct idx_entry *e;

	setup(&p, &ix);
	REQUIRE(idx_reserve_write(ix, &k, OBJ, &e) == 0);
	arm("idx.release_lock");	/* every release, until disarmed */
	idx_abort_write(ix, e);
	arm(NULL);
	CHECK_EQ(info_of(ix, &k).state, IDX_WRITING);	/* reservation still held */
	CHECK_EQ(pool_free_slots(p), NSLOTS - 1);
	CHECK_EQ(deferred_of(ix), 1);
	check_invariants(ix);

	idx_expire(ix, ks_now_ms());
	CHECK_EQ(info_of(ix, &k).state, IDX_FREE);
	CHECK_EQ(pool_free_slots(p), NSLOTS);
	check_invariants(ix);
	store(ix, &k);	/* the key can be stored again */
	CHECK_EQ(info_of(ix, &k).state, IDX_READY);

	idx_destroy(ix);
	pool_destroy(p);
}

static void test_pool(void)
{
	struct pool *p;
	struct pool_stats st;
	uint32_t a, b;

	REQUIRE(pool_create((uint64_t)NSLOTS * OBJ, &p) == 0);
	REQUIRE(pool_configure_slots(p, OBJ) == 0);
	REQUIRE(pool_alloc(p, &a) == 0);
	REQUIRE(pool_alloc(p, &b) == 0);

	arm("pool.free_lock=2");
	pool_free(p, a);
	pool_free(p, a);	/* a double free while deferred: counted, not pushed twice */
	arm(NULL);
	pool_get_stats(p, &st);
	CHECK_EQ(st.deferred_frees, 1);
	CHECK_EQ(st.bad_frees, 1);
	CHECK_EQ(st.free_slots, NSLOTS - 2);	/* a still counts as used */
	CHECK_EQ(st.used_bytes, 2ull * OBJ);

	/* The next holder of free_lock moves it to the free stack. */
	pool_free(p, b);
	pool_get_stats(p, &st);
	CHECK_EQ(st.free_slots, NSLOTS);
	CHECK_EQ(st.used_bytes, 0);
	CHECK_EQ(st.bad_frees, 1);

	/* ...and so does pool_alloc: every slot can be taken once, no more. */
	arm("pool.free_lock=1");
	REQUIRE(pool_alloc(p, &a) == 0);
	pool_free(p, a);
	arm(NULL);
	for (uint32_t i = 0; i < NSLOTS; i++)
		CHECK_EQ(pool_alloc(p, &b), 0);
	CHECK_EQ(pool_alloc(p, &b), -ENOSPC);
	pool_destroy(p);
}

static void test_config_errors(void)
{
	char err[256];

	CHECK_EQ(ks_fault_configure("no.such_point", err, sizeof(err)), -EINVAL);
	CHECK(strstr(err, "no.such_point") != NULL);
	CHECK_EQ(ks_fault_configure("probe.stall_ms", err, sizeof(err)), -EINVAL);
	CHECK(strstr(err, "needs a value") != NULL);
	CHECK_EQ(ks_fault_configure("idx.release_lock=x", err, sizeof(err)), -EINVAL);
	CHECK_EQ(ks_fault_configure("idx.release_lock=-1", err, sizeof(err)), -EINVAL);
	/* A bad item disarms the good ones before it. */
	CHECK_EQ(ks_fault_configure("pool.free_lock,bogus", err, sizeof(err)), -EINVAL);
	CHECK(!ks_fault_fire(KS_FAULT_POOL_FREE_LOCK));
	CHECK_EQ(ks_fault_configure("pool.free_lock=1,,probe.stall_ms=7", err, sizeof(err)), 0);
	CHECK(ks_fault_fire(KS_FAULT_POOL_FREE_LOCK));
	CHECK(!ks_fault_fire(KS_FAULT_POOL_FREE_LOCK));	/* =1: once */
	uint64_t v = 0;
	CHECK(ks_fault_value(KS_FAULT_PROBE_STALL_MS, &v) && v == 7);
	arm(NULL);
	CHECK(!ks_fault_value(KS_FAULT_PROBE_STALL_MS, &v));
}

/* kvstashd refuses a bad KVSTASH_FAULTS; with idx.release_lock=1 the first
 * RETRIEVE's unpin is deferred, counted, and settled by housekeeping. */
static void test_daemon(void)
{
	struct t_daemon *d;
	kvstash_client *c = NULL;
	char cmd[1200];
	uint64_t pins = UINT64_MAX, deferred = 0;
	int st;

	setenv(KS_FAULT_ENV, "bogus", 1);
	snprintf(cmd, sizeof(cmd), "%s --listen=ipc:///nonexistent-dir/x >/dev/null 2>&1",
		 t_build_path("kvstashd"));
	st = system(cmd);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 2);

	setenv(KS_FAULT_ENV, "idx.release_lock=1", 1);
	d = t_daemon_start("--pool-size=64M");
	unsetenv(KS_FAULT_ENV);
	REQUIRE(d);
	snprintf(cmd, sizeof(cmd), "%s store-test -e %s --chunks 4 >/dev/null",
		 t_build_path("kvstash"), d->endpoint);
	CHECK_EQ(system(cmd), 0);	/* STORE, RETRIEVE, verify */
	REQUIRE(kvstash_connect(d->endpoint, 5000, &c) == 0);
	for (int i = 0; i < 50 && pins; i++) {
		struct timespec ts = { 0, 100 * 1000 * 1000 };

		pins = t_stat(c, "pins");
		deferred = t_stat(c, "deferred_releases");
		if (pins)
			nanosleep(&ts, NULL);
	}
	CHECK_EQ(deferred, 1);
	CHECK_EQ(pins, 0);
	CHECK_EQ(t_stat(c, "deferred_frees"), 0);
	kvstash_close(c);
	CHECK_EQ(system(cmd), 0);	/* the chunks retrieve again */
	if (t_failures)
		t_daemon_dump_log(d);
	CHECK_EQ(t_daemon_stop(d), 0);
}

int main(void)
{
	test_config_errors();
	test_unpin();
	test_orphan_unpin();
	test_abort();
	test_pool();
	test_daemon();
	return t_result("deferred_release");
}

#else

int main(void)
{
	fprintf(stderr, "SKIP: this build has no fault injection (KVSTASH_FAULT_INJECTION=OFF)\n");
	return T_EXIT_SKIP;
}

#endif
