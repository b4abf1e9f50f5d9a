/*
 * core_bench.c - throughput of the chunk store core (index + pool), no I/O.
 *
 *   lookup: idx_lookup_lock of a 16-chunk prefix (1 read lock per key) and
 *           the 16 idx_release_read_locks that follow, over a populated index.
 *   store:  idx_reserve_write + idx_commit_write of new keys on a full pool,
 *           so every reservation goes through LRU eviction (low watermark 64).
 *
 * Keys are real: BLAKE3 rolling prefix hashes (src/chunk_key.h) of random token
 * sequences, 256 tokens per chunk. Each case runs with 1 and 2 threads.
 * Usage: core_bench [seconds per case, default 1]
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chunk_key.h"
#include "compiler.h"
#include "index.h"
#include "pool.h"

#define CHUNK_TOKENS 256
#define PREFIX_CHUNKS 16	/* chunks per lookup: a 4096-token prompt */
#define NREQUESTS 4096
#define NKEYS (NREQUESTS * PREFIX_CHUNKS)	/* 65536 distinct chunk keys */
#define OBJ_BYTES 4096u	/* the index does not touch slot memory: size is irrelevant */
#define STORE_SLOTS 4096u	/* 1/16 of the keys fit: the store case always evicts */
#define STORE_LOW_WM 64u

static struct ks_key *keys;	/* owns: NKEYS, chunk-major per request */
static double run_s = 1.0;

enum bench_kind { BENCH_LOOKUP, BENCH_STORE };

struct bench_thread {
	pthread_t tid;
	struct idx *ix;
	enum bench_kind kind;
	unsigned id;
	uint64_t ops;		/* lookups, or reserve+commit pairs */
	uint64_t keys_done;	/* keys looked up, or stored */
	uint64_t misses;	/* lookup: hits < PREFIX_CHUNKS; store: -EEXIST/-ENOSPC */
	int err;
};

static pthread_barrier_t start_barrier;
static _Atomic bool stop;

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static int make_keys(void)
{
	uint32_t *tokens = malloc(sizeof(uint32_t) * CHUNK_TOKENS * PREFIX_CHUNKS);
	uint8_t (*hashes)[KS_HASH_LEN] = malloc(sizeof(*hashes) * PREFIX_CHUNKS);
	uint8_t none[KS_HASH_LEN];
	uint64_t s = 0x2545f4914f6cdd1dull;
	int rc = 0;

	keys = calloc(NKEYS, sizeof(*keys));
	if (!tokens || !hashes || !keys) {
		rc = -ENOMEM;
		goto out;
	}
	ks_none_hash(none);
	for (unsigned r = 0; r < NREQUESTS && !rc; r++) {
		for (unsigned t = 0; t < CHUNK_TOKENS * PREFIX_CHUNKS; t++)
			tokens[t] = (uint32_t)(xorshift(&s) % 128256);	/* a Llama-3 vocabulary */
		ks_hash_chunks(none, tokens, 0, PREFIX_CHUNKS, CHUNK_TOKENS, hashes);
		for (unsigned c = 0; c < PREFIX_CHUNKS && !rc; c++)
			rc = ks_key_init(&keys[r * PREFIX_CHUNKS + c], hashes[c],
					 "meta-llama/Llama-3.1-8B-Instruct", 32, ks_kv_rank(1, 0));
	}
out:
	free(tokens);
	free(hashes);
	return rc;
}

static void *bench_main(void *arg)
{
	struct bench_thread *t = arg;
	uint64_t s = 0x9e3779b97f4a7c15ull * (t->id + 1);
	uint64_t next_key = t->id;	/* store: threads take disjoint key sequences */

	pthread_barrier_wait(&start_barrier);
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		if (t->kind == BENCH_LOOKUP) {
			const struct ks_key *run = &keys[(xorshift(&s) % NREQUESTS) * PREFIX_CHUNKS];
			size_t hits;

			t->err = idx_lookup_lock(t->ix, run, PREFIX_CHUNKS, 1, 1, &hits);
			if (t->err)
				break;
			for (size_t i = 0; i < hits; i++)
				idx_release_read_locks(t->ix, &run[i], 1);
			t->ops++;
			t->keys_done += hits;
			t->misses += hits < PREFIX_CHUNKS;
		} else {
			const struct ks_key *k = &keys[next_key % NKEYS];
			struct idx_entry *e;
			int rc;

			next_key += 2;	/* two threads at most: even and odd keys */
			rc = idx_reserve_write(t->ix, k, OBJ_BYTES, &e);
			t->ops++;
			if (rc == -EEXIST || rc == -ENOSPC) {
				t->misses++;
				continue;
			}
			if (rc) {
				t->err = rc;
				break;
			}
			rc = idx_commit_write(t->ix, e);
			if (rc) {
				t->err = rc;
				break;
			}
			t->keys_done++;
		}
	}
	return NULL;
}

static int run_case(enum bench_kind kind, unsigned nthreads)
{
	struct idx_config cfg = { 0 };
	struct bench_thread th[2] = { 0 };
	uint32_t nslots = kind == BENCH_LOOKUP ? NKEYS : STORE_SLOTS;
	struct idx_stats st;
	struct pool *pool;
	struct idx *ix;
	uint64_t t0, t1, ops = 0, done = 0, misses = 0;
	double secs;
	int rc;

	rc = pool_create((uint64_t)nslots * OBJ_BYTES, &pool);
	if (rc)
		return rc;
	rc = pool_configure_slots(pool, OBJ_BYTES);
	if (rc)
		goto out_pool;
	cfg.evict_low_watermark_slots = STORE_LOW_WM;
	rc = idx_create(&cfg, pool, &ix);
	if (rc)
		goto out_pool;
	/* Populate: every key READY for lookups; a full pool for the store churn. */
	for (uint32_t i = 0; i < nslots && !rc; i++) {
		struct idx_entry *e;

		rc = idx_reserve_write(ix, &keys[kind == BENCH_LOOKUP ? i : NKEYS - 1 - i],
				       OBJ_BYTES, &e);
		if (!rc)
			rc = idx_commit_write(ix, e);
	}
	if (rc)
		goto out_idx;

	atomic_store(&stop, false);
	pthread_barrier_init(&start_barrier, NULL, nthreads + 1);
	for (unsigned i = 0; i < nthreads; i++) {
		th[i] = (struct bench_thread){ .ix = ix, .kind = kind, .id = i };
		pthread_create(&th[i].tid, NULL, bench_main, &th[i]);
	}
	pthread_barrier_wait(&start_barrier);
	t0 = ks_now_ns();
	while (ks_now_ns() - t0 < (uint64_t)(run_s * 1e9)) {
		struct timespec ts = { 0, 5 * 1000000L };

		nanosleep(&ts, NULL);
	}
	atomic_store(&stop, true);
	for (unsigned i = 0; i < nthreads; i++) {
		pthread_join(th[i].tid, NULL);
		ops += th[i].ops;
		done += th[i].keys_done;
		misses += th[i].misses;
		if (th[i].err)
			rc = th[i].err;
	}
	t1 = ks_now_ns();
	pthread_barrier_destroy(&start_barrier);
	secs = (double)(t1 - t0) / 1e9;
	idx_get_stats(ix, &st);

	if (kind == BENCH_LOOKUP)
		printf("lookup  %u thread%s: %10.0f lookups/s (%2d keys each: %11.0f keys/s, "
		       "lock+release), %llu short\n",
		       nthreads, nthreads > 1 ? "s" : " ", (double)ops / secs, PREFIX_CHUNKS,
		       (double)done / secs, (unsigned long long)misses);
	else
		printf("store   %u thread%s: %10.0f store-index ops/s (reserve+commit on a full "
		       "pool), %.0f evictions/s, %llu skipped\n",
		       nthreads, nthreads > 1 ? "s" : " ", (double)done / secs,
		       (double)st.evictions / secs, (unsigned long long)misses);
	if (rc)
		fprintf(stderr, "core_bench: error %d (%s)\n", rc, strerror(-rc));
out_idx:
	idx_destroy(ix);
out_pool:
	pool_destroy(pool);
	return rc;
}

int main(int argc, char **argv)
{
	int rc;

	if (argc > 1)
		run_s = atof(argv[1]) > 0 ? atof(argv[1]) : 1.0;
	rc = make_keys();
	if (rc) {
		fprintf(stderr, "core_bench: keys: %s\n", strerror(-rc));
		return 1;
	}
	printf("core_bench: %d keys (%d-chunk prefixes of %d tokens), %.1f s per case\n", NKEYS,
	       PREFIX_CHUNKS, CHUNK_TOKENS, run_s);
	for (unsigned n = 1; n <= 2 && !rc; n++)
		rc = run_case(BENCH_LOOKUP, n);
	for (unsigned n = 1; n <= 2 && !rc; n++)
		rc = run_case(BENCH_STORE, n);
	free(keys);
	return rc ? 1 : 0;
}
