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
 *
 * Then the io thread's CPU work per STORE/RETRIEVE key, one thread, for
 * 256, 4096 and 16384 tokens: decoding the key frame as kvstashd does
 * (token ids read straight from the bytes), the same through msgpack-c's
 * object tree (the reference decoder, and how it was done before), and the
 * BLAKE3 chunk hashes of the tokens.
 * Usage: core_bench [seconds per case, default 1]
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chunk_key.h"
#include "compiler.h"
#include "index.h"
#include "pool.h"
#include "protocol.h"

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

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Microseconds per call of the key decode (@tree_only: msgpack-c's tree). */
static double decode_us(const struct proto_buf *f, size_t ntok, bool tree_only)
{
	double t0 = now_s(), t;
	uint64_t n = 0;
	char err[128];

	do {
		for (int i = 0; i < 64; i++, n++) {
			struct proto_key k;

			if (proto_decode_key_frame(f, &k, tree_only, err, sizeof(err)) ||
			    k.ntokens != ntok) {
				fprintf(stderr, "core_bench: decode: %s\n", err);
				return -1;
			}
			free(k.token_ids);
			free(k.null_chunk_mask);
		}
		t = now_s() - t0;
	} while (t < run_s / 4);
	return t / (double)n * 1e6;
}

static int run_decode(void)
{
	static const uint32_t sizes[] = { 256, 4096, 16384 };
	uint64_t s = 0x853c49e6748fea9bull;
	uint8_t none[KS_HASH_LEN];

	ks_none_hash(none);
	printf("io thread per request key, us: %8s %14s %16s %10s\n", "tokens", "decode (fast)",
	       "decode (tree)", "hash");
	for (size_t i = 0; i < KS_ARRAY_SIZE(sizes); i++) {
		const uint32_t n = sizes[i], nchunks = n / CHUNK_TOKENS;
		uint32_t *tok = malloc(n * sizeof(*tok));
		uint8_t (*h)[KS_HASH_LEN] = malloc(nchunks * sizeof(*h));
		struct proto_key k = { .model = "meta-llama/Llama-3.1-8B-Instruct", .model_len = 32,
				       .world_size = 1, .worker_id = 0, .ntokens = n, .end = n,
				       .request_id = "cmpl-1", .request_id_len = 6 };
		struct proto_msg m = { 0 };
		double fast, tree, hash, t0, t;
		uint64_t reps = 0;

		if (!tok || !h) {
			free(tok);
			free(h);
			return -ENOMEM;
		}
		for (uint32_t t2 = 0; t2 < n; t2++)
			tok[t2] = (uint32_t)(xorshift(&s) % 128256);
		k.token_ids = tok;
		if (proto_encode_key(&m, &k)) {
			free(tok);
			free(h);
			return -ENOMEM;
		}
		struct proto_buf f = { m.data, m.len };

		fast = decode_us(&f, n, false);
		tree = decode_us(&f, n, true);
		t0 = now_s();
		do {
			ks_hash_chunks(none, tok, 0, nchunks, CHUNK_TOKENS, h);
			reps++;
			t = now_s() - t0;
		} while (t < run_s / 4);
		hash = t / (double)reps * 1e6;
		printf("%30s %8u %14.1f %16.1f %10.1f\n", "", n, fast, tree, hash);
		proto_msg_free(&m);
		free(tok);
		free(h);
		if (fast < 0 || tree < 0)
			return -EPROTO;
	}
	return 0;
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
	if (!rc)
		rc = run_decode();
	free(keys);
	return rc ? 1 : 0;
}
