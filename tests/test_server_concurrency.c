/*
 * Description: 32 clients store, look up and retrieve concurrently through
 * one kvstashd while a watchdog client PINGs every 10 ms: no reply is lost,
 * every retrieved byte is right, and the ping latency stays low (p50/p99/max
 * printed; load clients run at nice 5, the watchdog at 0). 30 s in the plain build, 8 s under sanitizers (or
 * KVSTASH_TEST_SECONDS). Labels: tsan long
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "compiler.h"
#include "helpers.h"
#include "kvfix.h"
#include "pinger.h"

#define NCLIENTS_DEFAULT 32
#define NL 4
#define NB 64
#define BS 16
#define NH 4
#define HS 64
#define C 256
#define NPROMPTS 24	/* shared by all clients: the same prompt -> the same bytes */
#define PROMPT_CHUNKS 2
#define PING_PERIOD_MS 10
#define PING_P99_LIMIT_MS 100.0
#define CLIENT_NICE 5

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define DEFAULT_SECONDS 8
#else
#define DEFAULT_SECONDS 30
#endif

static const char *endpoint;
static _Atomic bool stop;
static _Atomic uint64_t n_store, n_retrieve, n_lookup, n_miss, n_lost, n_corrupt, n_other;
static struct t_pinger pinger;

static uint64_t prompt_seed(int p)
{
	return 0xc0ffee00ull + (uint64_t)p * 0x10001ull;
}

static void prompt_tokens(int p, uint32_t *tok)
{
	/* Prompts share chunk 0 in pairs, so LOOKUP sees partial prefixes too. */
	for (size_t t = 0; t < PROMPT_CHUNKS * C; t++)
		tok[t] = t < C ? (uint32_t)(p / 2) * 100000u + (uint32_t)t :
				 (uint32_t)p * 100000u + (uint32_t)t + 7u;
}

/* Row bytes depend only on the chunk content: the tokens up to it. */
static uint64_t content_seed(int p, size_t t)
{
	return t < C ? prompt_seed(p / 2 * 2) : prompt_seed(p);
}

static void account(int rc)
{
	if (rc == -ETIMEDOUT || rc == -EIO)
		atomic_fetch_add(&n_lost, 1);
	else if (rc && rc != -ENOENT)
		atomic_fetch_add(&n_other, 1);
}

static void *client_main(void *arg)
{
	int id = (int)(intptr_t)arg;
	kvstash_client *c;
	struct t_kv kv;
	uint32_t tok[PROMPT_CHUNKS * C];
	int64_t src[PROMPT_CHUNKS * C / BS], dst[PROMPT_CHUNKS * C / BS];
	const size_t nblk = PROMPT_CHUNKS * C / BS;
	uint64_t rng = 0x9e3779b97f4a7c15ull * (uint64_t)(id + 1);
	char rid[32];

	/* The engines this models run on their own cores; on a 2-core test machine
	 * their fill/verify loops would otherwise measure the scheduler, not us. */
	setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), CLIENT_NICE);
	REQUIRE(kvstash_connect(endpoint, 10000, &c) == 0);
	REQUIRE(t_kv_create(&kv, KVSTASH_LAYOUT_FLASH_ATTN, "bfloat16", NL, NB, BS, NH, HS) == 0);
	REQUIRE(t_kv_register(&kv, c, 1000 + id, "m-conc", 1) == 0);
	for (size_t b = 0; b < nblk; b++) {
		src[b] = (int64_t)(2 * b);	/* even blocks */
		dst[b] = (int64_t)(NB - 1 - 2 * b);	/* odd blocks, reversed */
	}
	for (uint64_t iter = 0; !atomic_load(&stop); iter++) {
		int p;
		int64_t chunks = 0;
		int rc;

		rng = rng * 6364136223846793005ull + 1442695040888963407ull;
		p = (int)((rng >> 33) % NPROMPTS);
		prompt_tokens(p, tok);
		snprintf(rid, sizeof(rid), "c%d-%" PRIu64, id, iter);
		struct kvstash_key key = { .model = "m-conc", .world_size = 1, .worker_id = 0,
					   .tokens = tok, .ntokens = PROMPT_CHUNKS * C,
					   .start = 0, .end = PROMPT_CHUNKS * C, .request_id = rid };

		if ((rng >> 20) & 1) {
			for (size_t t = 0; t < PROMPT_CHUNKS * C; t++)
				t_kv_fill_token(&kv, t_kv_slot(&kv, src, t), content_seed(p, t), t);
			rc = kvstash_store(c, &key, 1000 + id, src, nblk);
			account(rc);
			atomic_fetch_add(&n_store, 1);
		}
		key.worker_id = -1;
		rc = kvstash_lookup_chunks(c, &key, 1, &chunks);
		account(rc);
		atomic_fetch_add(&n_lookup, 1);
		key.worker_id = 0;
		if (rc || chunks <= 0) {
			atomic_fetch_add(&n_miss, 1);
			continue;
		}
		key.end = (uint64_t)chunks * C;
		for (size_t t = 0; t < key.end; t++)
			for (int l = 0; l < NL; l++)
				for (int pl = 0; pl < 2; pl++)
					memset(t_kv_row(&kv, l, pl, t_kv_slot(&kv, dst, t)), 0xee,
					       kv.row_bytes);
		rc = kvstash_retrieve(c, &key, 1000 + id, dst, (size_t)key.end / BS, 0);
		account(rc);
		atomic_fetch_add(&n_retrieve, 1);
		if (rc == -ENOENT) {
			/* Evicted between LOOKUP and RETRIEVE is impossible: LOOKUP locked it. */
			fprintf(stderr, "client %d: RETRIEVE of a locked prefix failed: %s\n", id,
				kvstash_last_error());
			atomic_fetch_add(&n_corrupt, 1);
			continue;
		}
		if (rc)
			continue;
		for (size_t t = 0; t < key.end; t++)
			if (!t_kv_check_token(&kv, t_kv_slot(&kv, dst, t), content_seed(p, t), t)) {
				atomic_fetch_add(&n_corrupt, 1);
				fprintf(stderr, "client %d: prompt %d token %zu corrupted\n", id, p, t);
				break;
			}
		if ((iter & 7) == 0)
			kvstash_end_session(c, rid);
	}
	kvstash_unregister(c, 1000 + id);
	kvstash_close(c);
	t_kv_destroy(&kv);
	return NULL;
}

int main(void)
{
	pthread_t th[256];
	const char *nenv = getenv("KVSTASH_TEST_CLIENTS");
	int nclients = nenv ? atoi(nenv) : NCLIENTS_DEFAULT;
	const char *env = getenv("KVSTASH_TEST_SECONDS");
	int seconds = env ? atoi(env) : DEFAULT_SECONDS;
	struct t_daemon *d = t_daemon_start("--pool-size=192M --workers=2");

	REQUIRE(d);
	endpoint = d->endpoint;
	pinger = (struct t_pinger){ .endpoint = endpoint, .period_ms = PING_PERIOD_MS,
				    .timeout_ms = 2000, .slow_ms = PING_P99_LIMIT_MS };
	t_pinger_start(&pinger);
	for (int i = 0; i < nclients; i++)
		REQUIRE(pthread_create(&th[i], NULL, client_main, (void *)(intptr_t)i) == 0);
	sleep((unsigned)(seconds > 0 ? seconds : 1));
	atomic_store(&stop, true);
	for (int i = 0; i < nclients; i++)
		pthread_join(th[i], NULL);
	t_pinger_stop(&pinger);
	fprintf(stderr,
		"%d s, %d clients: %" PRIu64 " stores, %" PRIu64 " lookups, %" PRIu64
		" retrieves, %" PRIu64 " lookup misses; lost %" PRIu64 ", corrupt %" PRIu64
		", other errors %" PRIu64 "\n",
		seconds, nclients, atomic_load(&n_store), atomic_load(&n_lookup),
		atomic_load(&n_retrieve), atomic_load(&n_miss), atomic_load(&n_lost),
		atomic_load(&n_corrupt), atomic_load(&n_other));
	fprintf(stderr, "ping under load: %zu pings, p50 %.3f ms, p99 %.3f ms, max %.3f ms\n",
		pinger.n, pinger.p50, pinger.p99, pinger.max);
	CHECK_EQ(atomic_load(&n_lost), 0);
	CHECK_EQ(atomic_load(&n_corrupt), 0);
	CHECK_EQ(atomic_load(&n_other), 0);
	CHECK_EQ(pinger.failures, 0);
	CHECK(pinger.n > (size_t)seconds * 20);	/* the pinger really ran */
	CHECK(atomic_load(&n_retrieve) > 0);
	CHECK(pinger.p99 < PING_P99_LIMIT_MS);

	/* Everything released: no pins, no read locks beyond what LOOKUPs left
	 * (each retrieved prefix released its locks; misses locked nothing). */
	kvstash_client *c;
	REQUIRE(kvstash_connect(d->endpoint, 5000, &c) == 0);
	CHECK_EQ(t_stat(c, "pins"), 0);
	CHECK_EQ(t_stat(c, "read_locks"), 0);
	kvstash_close(c);
	CHECK_EQ(t_daemon_stop(d), 0);
	return t_result("server_concurrency");
}
