/*
 * Description: through a real kvstashd, LOOKUP read locks and hash sessions expire after their TTL (and only idle ones), a few thousand sessions expiring at once are all dropped, and the server keeps answering meanwhile. Labels: unit tsan
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "helpers.h"
#include "kvfix.h"

#define NL 1
#define NB 64
#define BS 16
#define NH 1
#define HS 8
#define C 256
#define NCHUNKS 4
#define MANY 3000	/* sessions created at once, then left to expire */

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* Poll counter @name until it equals @want or @timeout_ms passes; its last value. */
static uint64_t wait_stat(kvstash_client *c, const char *name, uint64_t want, unsigned timeout_ms)
{
	uint64_t end = now_ms() + timeout_ms, v;

	while ((v = t_stat(c, name)) != want && now_ms() < end)
		sleep_ms(50);
	return v;
}

int main(void)
{
	/* TTLs of 1 s (the minimum), so the test takes seconds. */
	struct t_daemon *d = t_daemon_start("--pool-size=64M --workers=1 --read-ttl-s=1 "
					    "--session-ttl-s=1");
	kvstash_client *c = NULL;
	uint32_t tokens[NCHUNKS * C];
	int64_t blocks[NCHUNKS * C / BS], chunks = -1;
	char rid[32];
	struct t_kv kv;
	uint64_t t0, keep_until;

	REQUIRE(d);
	REQUIRE(kvstash_connect(d->endpoint, 10000, &c) == 0);
	REQUIRE(t_kv_create(&kv, KVSTASH_LAYOUT_FLASH_ATTN, "bfloat16", NL, NB, BS, NH, HS) == 0);
	REQUIRE(t_kv_register(&kv, c, 1, "m", 1) == 0);
	for (size_t t = 0; t < NCHUNKS * C; t++)
		tokens[t] = (uint32_t)(t * 2654435761u);
	for (size_t b = 0; b < NCHUNKS * C / BS; b++)
		blocks[b] = (int64_t)b;

	struct kvstash_key k = { .model = "m", .world_size = 1, .worker_id = 0, .tokens = tokens,
				 .ntokens = NCHUNKS * C, .start = 0, .end = NCHUNKS * C,
				 .request_id = "store" };

	REQUIRE(kvstash_store(c, &k, 1, blocks, NCHUNKS * C / BS) == 0);
	/* The STORE's session stays (an END_SESSION before the connection's
	 * dialect is known is answered nil and left to the TTL): it is idle. */
	uint64_t idle0 = t_stat(c, "sessions");

	CHECK(idle0 <= 1);

	/* Ten sessions lock the whole prefix; "keep" locks chunk 0 only and
	 * stays in use: only its session and its lock may outlive the TTL. */
	for (int i = 0; i < 10; i++) {
		snprintf(rid, sizeof(rid), "r%d", i);
		k.request_id = rid;
		REQUIRE(kvstash_lookup_chunks(c, &k, 1, &chunks) == 0);
		CHECK_EQ(chunks, NCHUNKS);
	}
	struct kvstash_key keep = k;

	keep.request_id = "keep";
	keep.ntokens = C;
	keep.end = C;
	REQUIRE(kvstash_lookup_chunks(c, &keep, 1, &chunks) == 0);
	CHECK_EQ(chunks, 1);
	CHECK_EQ(t_stat(c, "sessions"), idle0 + 11);
	CHECK_EQ(t_stat(c, "objects_reading"), NCHUNKS);
	t0 = now_ms();
	keep_until = t0 + 2600;
	while (now_ms() < keep_until) {
		REQUIRE(kvstash_lookup_chunks(c, &keep, 1, &chunks) == 0);
		sleep_ms(200);
	}
	/* Past two TTLs (and housekeeping ticks): the idle ones are gone. */
	CHECK_EQ(t_stat(c, "sessions"), 1);
	CHECK_EQ(t_stat(c, "objects_reading"), 1);	/* chunk 0: "keep" re-locked it */
	CHECK(t_stat(c, "expired_read_locks") >= NCHUNKS - 1);
	/* Then "keep" goes idle too. */
	CHECK_EQ(wait_stat(c, "sessions", 0, 3000), 0);
	CHECK_EQ(wait_stat(c, "read_locks", 0, 3000), 0);
	CHECK_EQ(t_stat(c, "objects_reading"), 0);

	/* Many sessions at once: all expire (the server works the backlog off in
	 * bounded steps) and PINGs are answered throughout. */
	t0 = now_ms();
	for (int i = 0; i < MANY; i++) {
		snprintf(rid, sizeof(rid), "many%d", i);
		k.request_id = rid;
		k.ntokens = C;
		k.end = C;
		REQUIRE(kvstash_lookup_chunks(c, &k, 1, &chunks) == 0);
	}
	/* All live unless creating them took longer than the TTL (sanitizers,
	 * a loaded machine): then the earliest may have expired already. */
	if (now_ms() - t0 < 900) {
		CHECK_EQ(t_stat(c, "sessions"), MANY);
		CHECK_EQ(t_stat(c, "read_locks"), MANY);
	} else {
		CHECK(t_stat(c, "sessions") > 0);
		fprintf(stderr, "expiry: creating %d sessions took %" PRIu64 " ms, over the TTL\n",
			MANY, now_ms() - t0);
	}
	t0 = now_ms();
	while (now_ms() - t0 < 1500) {
		double rtt;

		CHECK_EQ(kvstash_ping(c, &rtt), 0);
		sleep_ms(20);
	}
	CHECK_EQ(wait_stat(c, "sessions", 0, 5000), 0);
	CHECK_EQ(wait_stat(c, "read_locks", 0, 5000), 0);
	/* The data is still there and readable: expiry dropped locks, not objects. */
	k.request_id = "after";
	k.ntokens = NCHUNKS * C;
	k.end = NCHUNKS * C;
	REQUIRE(kvstash_lookup_chunks(c, &k, 1, &chunks) == 0);
	CHECK_EQ(chunks, NCHUNKS);
	REQUIRE(kvstash_free_lookup_locks(c, &k, 1) == 0);

	kvstash_unregister(c, 1);
	kvstash_close(c);
	t_kv_destroy(&kv);
	if (t_failures)
		t_daemon_dump_log(d);
	CHECK_EQ(t_daemon_stop(d), 0);
	return t_result("expiry");
}
