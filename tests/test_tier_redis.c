/* Description: L3 Redis tier against real redis-server processes: round trip, sharing, sharding, outage and reconnect, TTL, corruption, queue full. Labels: unit tsan */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chunk_key.h"
#include "compiler.h"
#include "helpers.h"
#include "redis_fixture.h"
#include "tier_chunk.h"
#include "tier_redis.h"
#include "tierwait.h"

/* A request to a lost node fails well within the tier's timeout; sanitizer
 * builds on two cores take longer to notice the loss (seen: just over 1 s).
 * Both bounds stay under io_timeout_ms (2000): an answer is never a timeout. */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define FAST_FAIL_MS 1900	/* still under io_timeout_ms: not a timeout */
#else
#define FAST_FAIL_MS 1000
#endif

extern char **environ;

/* Wait (20 s at most) for @w; returns its status, or -ETIME on timeout. */
#define WAIT_MS 20000	/* the longest a tier callback may take here */

static int wait_done(struct waiter *w)
{
	return wait_done_ms(w, WAIT_MS);
}

/* ---- a real redis-server on a free loopback port (tests/redis_fixture.h) */

static redisContext *rconn(int port)
{
	return t_redis_connect(port, NULL);
}

static long long rcmd_int(int port, const char *fmt, const char *arg)
{
	redisContext *c = rconn(port);
	redisReply *r;
	long long v = -999;

	if (!c)
		return v;
	r = redisCommand(c, fmt, arg);
	if (r && r->type == REDIS_REPLY_INTEGER)
		v = r->integer;
	freeReplyObject(r);
	redisFree(c);
	return v;
}

/* ---- tests ------------------------------------------------------------------ */

static struct ks_key mkkey(unsigned i, const char *model)
{
	struct ks_key k;
	uint8_t h[KS_HASH_LEN];

	for (unsigned b = 0; b < KS_HASH_LEN; b++)
		h[b] = (uint8_t)(i * 37 + b * 11 + (i >> 8));
	ks_key_init(&k, h, model, strlen(model), ks_kv_rank(4, i & 3));
	return k;
}

static struct tier_redis *open_tr(const char *const *urls, size_t n, unsigned ttl,
				  unsigned depth, const char *prefix)
{
	struct tier_redis_config cfg = { .urls = urls, .nurls = n, .ttl_s = ttl,
					 .queue_depth = depth, .key_prefix = prefix,
					 .connect_timeout_ms = 500, .io_timeout_ms = 2000,
					 .backoff_min_ms = 20, .backoff_max_ms = 400 };
	struct tier_redis *tr = NULL;

	REQUIRE(tier_redis_open(&cfg, &tr) == 0 && tr);
	return tr;
}

static int put_sync(struct tier_redis *tr, const struct ks_key *k, uint64_t tag, const void *d,
		    size_t n, unsigned flags)
{
	struct waiter w = { 0 };

	return waiter_finish(&w, tier_redis_put(tr, k, tag, d, n, flags, done_cb, &w), WAIT_MS, NULL, NULL);
}

static int get_sync(struct tier_redis *tr, const struct ks_key *k, void *dst, size_t cap,
		    uint64_t *tag, size_t *n)
{
	struct waiter w = { 0 };

	return waiter_finish(&w, tier_redis_get(tr, k, dst, cap, done_cb, &w), WAIT_MS, tag, n);
}

static const size_t sizes[] = { 1, 4096, (1u << 20) + 3, 8u << 20 };
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))

/* Round trip; a second instance (another kvstashd) sees the same chunks; exists. */
static void test_roundtrip_shared(struct t_redis *a, struct t_redis *b)
{
	const char *urls[] = { a->url, b->url };
	struct tier_redis *tr1 = open_tr(urls, 2, 600, 64, "t1:");
	struct tier_redis *tr2 = open_tr(urls, 2, 600, 64, "t1:");
	struct tier_redis_stats st;
	struct waiter w[NSIZES] = { 0 };
	struct ks_key keys[NSIZES + 1];
	uint8_t *src[NSIZES], *dst = malloc(8u << 20);
	bool present[NSIZES + 1];

	for (size_t i = 0; i < NSIZES; i++) {
		keys[i] = mkkey((unsigned)i, "qwen2-7b");
		src[i] = malloc(sizes[i]);
		t_fill(src[i], sizes[i], 77 + i);
		CHECK_EQ(tier_redis_put(tr1, &keys[i], 0xc0de + i, src[i], sizes[i],
					i & 1 ? TIER_REDIS_PUT_COPY : 0, done_cb, &w[i]), 0);
	}
	for (size_t i = 0; i < NSIZES; i++)
		CHECK_EQ(wait_done(&w[i]), 0);
	keys[NSIZES] = mkkey(999, "qwen2-7b");
	for (int inst = 0; inst < 2; inst++) {
		struct tier_redis *tr = inst ? tr2 : tr1;

		for (size_t i = 0; i < NSIZES; i++) {
			uint64_t tag = 0;
			size_t n = 0;

			memset(dst, 0, 8u << 20);
			CHECK_EQ(get_sync(tr, &keys[i], dst, 8u << 20, &tag, &n), 0);
			CHECK_EQ(n, sizes[i]);
			CHECK_EQ(tag, 0xc0de + i);
			CHECK_EQ(t_verify(dst, sizes[i], 77 + i), (size_t)-1);
		}
		CHECK_EQ(get_sync(tr, &keys[NSIZES], dst, 8u << 20, NULL, NULL), -ENOENT);
		CHECK_EQ(tier_redis_exists_wait(tr, keys, NSIZES + 1, present, 2000), NSIZES);
		CHECK(!present[NSIZES]);
	}
	/* a too-small buffer is refused, not overrun */
	CHECK_EQ(get_sync(tr2, &keys[NSIZES - 1], dst, 4096, NULL, NULL), -EMSGSIZE);
	/* keys are spread over both servers */
	CHECK(rcmd_int(a->port, "DBSIZE", NULL) > 0 || rcmd_int(b->port, "DBSIZE", NULL) > 0);
	{
		long long da = 0, db = 0;

		for (unsigned i = 0; i < 32; i++) {
			struct ks_key k = mkkey(1000 + i, "m");
			uint8_t v = (uint8_t)i;

			CHECK_EQ(put_sync(tr2, &k, i, &v, 1, TIER_REDIS_PUT_COPY), 0);
		}
		da = rcmd_int(a->port, "DBSIZE", NULL);
		db = rcmd_int(b->port, "DBSIZE", NULL);
		CHECK(da > 4 && db > 4);
		CHECK_EQ(da + db, 32 + NSIZES);
	}
	/* the same chunk hash under another model or rank is another key */
	struct ks_key other = keys[0];

	other.kv_rank ^= 1;
	CHECK_EQ(get_sync(tr1, &other, dst, 8u << 20, NULL, NULL), -ENOENT);
	tier_redis_get_stats(tr1, &st);
	CHECK_EQ(st.puts, NSIZES);
	CHECK_EQ(st.hits, NSIZES);
	CHECK_EQ(st.misses, 2);
	CHECK_EQ(st.nodes_up, 2);
	CHECK_EQ(st.notconn, 0);
	CHECK_EQ(st.corrupt, 0);
	CHECK_EQ(st.exists_hits, NSIZES);
	tier_redis_get_stats(tr2, &st);
	CHECK_EQ(st.hits, NSIZES);
	CHECK_EQ(st.puts, 32);
	CHECK_EQ(tier_redis_remove(tr2, &keys[0]), 0);
	{
		int rc = 0;

		/* the DEL is asynchronous: seen by the other instance within 2 s */
		for (int i = 0; i < 200 && rc != -ENOENT; i++) {
			rc = get_sync(tr1, &keys[0], dst, 8u << 20, NULL, NULL);
			if (rc != -ENOENT)
				usleep(10000);
		}
		CHECK_EQ(rc, -ENOENT);
	}
	tier_redis_close(tr2);
	tier_redis_close(tr1);
	for (size_t i = 0; i < NSIZES; i++)
		free(src[i]);
	free(dst);
}

/* A value changed in Redis (payload, header, length) is -EBADMSG, counted, deleted. */
static void test_corruption(struct t_redis *a)
{
	const char *urls[] = { a->url };
	struct tier_redis *tr = open_tr(urls, 1, 600, 64, "t2:");
	struct tier_redis_stats st;
	size_t n = 100000;
	uint8_t *buf = malloc(n);
	char rk[512];
	redisContext *c = rconn(a->port);
	struct ks_key k[3];

	REQUIRE(c);
	t_fill(buf, n, 5);
	for (unsigned i = 0; i < 3; i++) {
		k[i] = mkkey(50 + i, "llama");
		CHECK_EQ(put_sync(tr, &k[i], 1, buf, n, 0), 0);
	}
	tier_redis_key(tr, &k[0], rk, sizeof(rk));
	freeReplyObject(redisCommand(c, "SETRANGE %s %d Z", rk, TIER_CHUNK_HDR_SIZE + 1234));
	tier_redis_key(tr, &k[1], rk, sizeof(rk));
	freeReplyObject(redisCommand(c, "SETRANGE %s %d Z", rk, 40));
	tier_redis_key(tr, &k[2], rk, sizeof(rk));
	freeReplyObject(redisCommand(c, "APPEND %s tail", rk));
	for (unsigned i = 0; i < 3; i++) {
		memset(buf, 0, n);
		CHECK_EQ(get_sync(tr, &k[i], buf, n, NULL, NULL), -EBADMSG);
	}
	tier_redis_get_stats(tr, &st);
	CHECK_EQ(st.corrupt, 3);
	CHECK_EQ(st.hits, 0);
	/* the bad values are deleted by the worker */
	long long left = -1;

	for (int i = 0; i < 200 && left != 0; i++) {
		left = 0;
		for (unsigned j = 0; j < 3; j++) {
			redisReply *r;

			tier_redis_key(tr, &k[j], rk, sizeof(rk));
			r = redisCommand(c, "EXISTS %s", rk);
			left += r && r->type == REDIS_REPLY_INTEGER ? r->integer : 1;
			freeReplyObject(r);
		}
		if (left)
			usleep(10000);
	}
	CHECK_EQ(left, 0);
	redisFree(c);
	tier_redis_close(tr);
	free(buf);
}

/* SET ... EX ttl: the key carries the TTL and is gone after it. */
static void test_ttl(struct t_redis *a)
{
	const char *urls[] = { a->url };
	struct tier_redis *tr = open_tr(urls, 1, 1, 64, "t3:");
	struct ks_key k = mkkey(7, "ttl");
	char rk[512];
	uint8_t buf[64];
	long long ttl;

	t_fill(buf, sizeof(buf), 1);
	CHECK_EQ(put_sync(tr, &k, 0, buf, sizeof(buf), 0), 0);
	tier_redis_key(tr, &k, rk, sizeof(rk));
	ttl = rcmd_int(a->port, "PTTL %s", rk);
	CHECK(ttl > 0 && ttl <= 1000);
	CHECK_EQ(get_sync(tr, &k, buf, sizeof(buf), NULL, NULL), 0);
	usleep(1500 * 1000);
	CHECK_EQ(get_sync(tr, &k, buf, sizeof(buf), NULL, NULL), -ENOENT);
	tier_redis_close(tr);
	/* ttl 0: no expiry */
	tr = open_tr(urls, 1, 0, 64, "t3:");
	CHECK_EQ(put_sync(tr, &k, 0, buf, sizeof(buf), 0), 0);
	CHECK_EQ(rcmd_int(a->port, "TTL %s", rk), -1);
	tier_redis_close(tr);
}

/* A full node queue refuses at once with -EAGAIN, counted. */
static void test_queue_full(struct t_redis *a)
{
	const char *urls[] = { a->url };
	struct tier_redis *tr = open_tr(urls, 1, 60, 2, "t4:");
	struct tier_redis_stats st;
	struct waiter w[4] = { 0 };
	uint8_t buf[100];
	struct ks_key k[4];

	t_fill(buf, sizeof(buf), 2);
	for (unsigned i = 0; i < 4; i++)
		k[i] = mkkey(60 + i, "q");
	CHECK_EQ(tier_redis_put(tr, &k[0], 0, buf, sizeof(buf), 0, block_cb, &w[0]), 0);
	for (int i = 0; i < 10000 && !atomic_load(&w[0].entered); i++)
		usleep(1000);
	REQUIRE(atomic_load(&w[0].entered));
	CHECK_EQ(tier_redis_put(tr, &k[1], 0, buf, sizeof(buf), 0, done_cb, &w[1]), 0);
	CHECK_EQ(tier_redis_get(tr, &k[0], buf, sizeof(buf), done_cb, &w[2]), 0);
	CHECK_EQ(tier_redis_put(tr, &k[3], 0, buf, sizeof(buf), 0, done_cb, &w[3]), -EAGAIN);
	tier_redis_get_stats(tr, &st);
	CHECK_EQ(st.dropped_full, 1);
	atomic_store(&w[0].release, 1);
	CHECK_EQ(wait_done(&w[0]), 0);
	CHECK_EQ(wait_done(&w[1]), 0);
	CHECK_EQ(wait_done(&w[2]), 0);
	CHECK_EQ(t_verify(buf, sizeof(buf), 2), (size_t)-1);
	tier_redis_close(tr);
}

/* Kill redis-server mid-run: fast -ENOTCONN, counted; restart it: the tier reconnects. */
static void test_outage(struct t_redis *a)
{
	const char *urls[] = { a->url };
	struct tier_redis *tr = open_tr(urls, 1, 600, 64, "t5:");
	struct tier_redis_stats st;
	size_t n = 1 << 20;
	uint8_t *buf = malloc(n), *dst = malloc(n);
	struct ks_key k = mkkey(70, "outage"), k2 = mkkey(71, "outage");
	bool present[2];
	unsigned failed = 0;

	t_fill(buf, n, 70);
	CHECK_EQ(put_sync(tr, &k, 0, buf, n, 0), 0);
	/* a hung server: the request times out (io_timeout_ms), the connection is
	 * dropped and made again once the server answers */
	{
		uint64_t t0 = ks_now_ms();

		kill(a->pid, SIGSTOP);
		CHECK_EQ(get_sync(tr, &k, dst, n, NULL, NULL), -ETIMEDOUT);
		CHECK(ks_now_ms() - t0 < 4000);
		kill(a->pid, SIGCONT);
		tier_redis_get_stats(tr, &st);
		CHECK_EQ(st.timeouts, 1);
		for (int i = 0; i < 500 && st.nodes_up != 1; i++) {
			usleep(10000);
			tier_redis_get_stats(tr, &st);
		}
		CHECK_EQ(st.nodes_up, 1);
		CHECK_EQ(get_sync(tr, &k, dst, n, NULL, NULL), 0);
		CHECK_EQ(t_verify(dst, n, 70), (size_t)-1);
	}
	t_redis_kill(a);
	/* in flight or queued when the loss is seen: -ENOTCONN via the callback,
	 * then -ENOTCONN at once while down; each answer comes fast */
	for (int i = 0; i < 20; i++) {
		uint64_t t0 = ks_now_ms();
		int rc = i & 1 ? get_sync(tr, &k, dst, n, NULL, NULL) :
				 put_sync(tr, &k2, 0, buf, n, 0);

		CHECK_EQ(rc, -ENOTCONN);
		CHECK(ks_now_ms() - t0 < FAST_FAIL_MS);
		failed += rc == -ENOTCONN;
	}
	{
		uint64_t t0 = ks_now_ms();

		CHECK_EQ(tier_redis_exists_wait(tr, &k, 1, present, 2000), 0);
		CHECK(!present[0]);
		CHECK(ks_now_ms() - t0 < 1000);
	}
	tier_redis_get_stats(tr, &st);
	CHECK_EQ(st.nodes_up, 0);
	CHECK(st.notconn >= failed + 1);	/* + the exists part */
	CHECK_EQ(failed, 20);
	/* back on the same port: reconnect within the capped backoff */
	REQUIRE(t_redis_start(a, NULL) == 0);
	for (int i = 0; i < 500; i++) {
		tier_redis_get_stats(tr, &st);
		if (st.nodes_up == 1)
			break;
		usleep(10000);
	}
	CHECK_EQ(st.nodes_up, 1);
	CHECK(st.reconnects >= 1);
	/* the restarted server is empty; the tier works again */
	CHECK_EQ(get_sync(tr, &k, dst, n, NULL, NULL), -ENOENT);
	CHECK_EQ(put_sync(tr, &k, 9, buf, n, 0), 0);
	CHECK_EQ(get_sync(tr, &k, dst, n, NULL, NULL), 0);
	CHECK_EQ(t_verify(dst, n, 70), (size_t)-1);
	tier_redis_close(tr);
	free(buf);
	free(dst);
}

int main(void)
{
	struct t_redis a = { 0 }, b = { 0 };

	if (!t_redis_available()) {
		fprintf(stderr, "tier_redis: redis-server not installed; skipped\n");
		return T_EXIT_SKIP;
	}
	signal(SIGPIPE, SIG_IGN);	/* the test's own hiredis connections */
	if (t_redis_start(&a, NULL) || t_redis_start(&b, NULL)) {
		fprintf(stderr, "tier_redis: could not start redis-server\n");
		t_redis_kill(&a);
		t_redis_kill(&b);
		return T_EXIT_FAIL;
	}
	test_roundtrip_shared(&a, &b);
	test_corruption(&a);
	test_ttl(&a);
	test_queue_full(&a);
	test_outage(&a);
	/* a URL that is not a URL */
	{
		const char *bad[] = { "redis://:99999" };
		struct tier_redis_config cfg = { .urls = bad, .nurls = 1 };
		struct tier_redis *tr = NULL;

		CHECK_EQ(tier_redis_open(&cfg, &tr), -EINVAL);
	}
	t_redis_kill(&a);
	t_redis_kill(&b);
	return t_result("tier_redis");
}
