/* Description: L3 tier on a real 3-master, 3-replica Redis Cluster: sharing between two instances, resharding under load (no failed request, no wrong byte), a master killed (fail fast, then traffic follows the failover), AUTH (requirepass, ACL user) on the cluster and a single node, kvstashd with --redis-user/--redis-password-file (wrong ones refused at start, no password in logs or /metrics), uncovered slots, bad URLs, a seed that is not a cluster, CRC16 slots. Labels: unit tsan */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chunk_key.h"
#include "compiler.h"
#include "helpers.h"
#include "kvfix.h"
#include "redis_fixture.h"
#include "tier_chunk.h"
#include "tier_node.h"
#include "tier_redis.h"
#include "tierwait.h"

extern char **environ;

#define WAIT_MS 20000
#define NSRV 6
#define VAL 20000	/* bytes per chunk: small, the test is about routing */

static char *tmpdir;
/* Once the test turns AUTH on in the cluster, its own connections use it. */
static const char *auth_pw;
#define CLUSTER_PW "cl-Secret-9f3"

/* The test's own connections; AUTH once the test turned it on. */
static redisContext *rconn(int port)
{
	return t_redis_connect(port, auth_pw);
}

static const char *rcmd(int port, const char *cmd)
{
	static char out[8192];
	redisContext *c = rconn(port);
	redisReply *r;

	out[0] = 0;
	if (!c)
		return out;
	r = redisCommand(c, cmd);
	if (r && (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS ||
		  r->type == REDIS_REPLY_ERROR))
		snprintf(out, sizeof(out), "%s", r->str);
	freeReplyObject(r);
	redisFree(c);
	return out;
}

/* Makes the node at @port forget every slot it knows a master of (CLUSTER
 * DELSLOTSRANGE per range of its CLUSTER SLOTS); returns how many ranges it
 * knew, -1 when the node does not answer. */
static int forget_known_slots(int port)
{
	redisContext *c = rconn(port);
	redisReply *r = c ? redisCommand(c, "CLUSTER SLOTS") : NULL;
	int ranges = -1;

	if (r && r->type == REDIS_REPLY_ARRAY) {
		ranges = (int)r->elements;
		for (size_t i = 0; i < r->elements; i++) {
			redisReply *e = r->element[i];

			if (e->type == REDIS_REPLY_ARRAY && e->elements >= 2)
				freeReplyObject(redisCommand(c, "CLUSTER DELSLOTSRANGE %lld %lld",
							     e->element[0]->integer,
							     e->element[1]->integer));
		}
	}
	freeReplyObject(r);
	if (c)
		redisFree(c);
	return ranges;
}

static int spawn_wait(char *const argv[], bool quiet)
{
	posix_spawn_file_actions_t fa;
	pid_t pid;
	int st = -1;

	posix_spawn_file_actions_init(&fa);
	if (quiet) {
		posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
		posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	}
	if (posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ)) {
		posix_spawn_file_actions_destroy(&fa);
		return -1;
	}
	posix_spawn_file_actions_destroy(&fa);
	waitpid(pid, &st, 0);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A server of the test: its files in tmpdir, ready for the test's AUTH. */
static int rsrv_start(struct t_redis *s, bool cluster, const char *extra_flag,
		      const char *extra_value)
{
	const struct t_redis_opts o = { .dir = tmpdir, .cluster = cluster, .extra_flag = extra_flag,
					.extra_value = extra_value, .password = auth_pw };

	return t_redis_start(s, &o);
}

static struct ks_key mkkey(unsigned i)
{
	struct ks_key k;
	uint8_t h[KS_HASH_LEN];

	/* @i itself in the first bytes: distinct keys for distinct @i */
	for (unsigned b = 0; b < KS_HASH_LEN; b++)
		h[b] = b < 4 ? (uint8_t)(i >> (8 * b)) : (uint8_t)(i * 37 + b * 11);
	ks_key_init(&k, h, "cluster-m", 9, 0);
	return k;
}

static struct tier_redis *open_url(const char *url, const char *user, const char *pass, int *rc)
{
	const char *urls[TIER_REDIS_MAX_NODES];
	char buf[1024];
	size_t n = 0;
	struct tier_redis_config cfg = { .key_prefix = "tc:", .ttl_s = 600, .queue_depth = 256,
					 .connect_timeout_ms = 1000, .io_timeout_ms = 3000,
					 .backoff_min_ms = 20, .backoff_max_ms = 300,
					 .user = user, .password = pass };
	struct tier_redis *tr = NULL;

	snprintf(buf, sizeof(buf), "%s", url);
	for (char *save = NULL, *u = strtok_r(buf, ",", &save); u; u = strtok_r(NULL, ",", &save))
		urls[n++] = u;
	cfg.urls = urls;
	cfg.nurls = n;
	*rc = tier_redis_open(&cfg, &tr);
	return tr;
}

static int put_sync(struct tier_redis *tr, unsigned i, const uint8_t *v)
{
	struct waiter w = { 0 };
	struct ks_key k = mkkey(i);

	return waiter_finish(&w, tier_redis_put(tr, &k, VAL, v, VAL, TIER_REDIS_PUT_COPY, done_cb,
						&w), WAIT_MS, NULL, NULL);
}

/* 0 and byte-exact, -ENOENT, another -errno, or 1 for wrong bytes. */
static int get_check(struct tier_redis *tr, unsigned i)
{
	struct waiter w = { 0 };
	struct ks_key k = mkkey(i);
	uint8_t *dst = calloc(1, VAL);
	size_t n = 0;
	int rc = waiter_finish(&w, tier_redis_get(tr, &k, dst, VAL, done_cb, &w), WAIT_MS, NULL, &n);

	if (!rc && (n != VAL || t_verify(dst, VAL, i) != (size_t)-1))
		rc = 1;
	free(dst);
	return rc;
}

/* ---- kvstashd on the cluster -------------------------------------------------- */

/* Two kvstashd sharing chunks through the cluster (tests/tier_node.h). */
#define NODE_LAYERS 2

static void test_daemons_share(int seed)
{
	char args[600];
	struct tier_node a, b;

	snprintf(args, sizeof(args), "--pool-size=64M --redis-prefix=tc: "
		 "--redis-url=redis+cluster://127.0.0.1:%d", seed);
	tier_node_start(&a, args, 10, NODE_LAYERS);
	tier_node_start(&b, args, 20, NODE_LAYERS);
	for (int p = 0; p < 3; p++) {
		CHECK_EQ(tier_store_prompt(&a, 60 + p, TIER_PROMPT), 0);
		CHECK(tier_wait_stat(&a, "l3_written", (uint64_t)(p + 1) * TIER_PROMPT) >=
		      (uint64_t)(p + 1) * TIER_PROMPT);
	}
	for (int p = 0; p < 3; p++) {
		CHECK_EQ(tier_lookup_prompt(&b, 60 + p), TIER_PROMPT);
		CHECK_EQ(tier_retrieve_check(&b, 60 + p, TIER_PROMPT), 0);
	}
	CHECK(t_stat(b.c, "l3_promoted") >= 3 * TIER_PROMPT);
	CHECK_EQ(t_stat(b.c, "l3_corrupt"), 0);
	if (t_failures) {
		t_daemon_dump_log(a.d);
		t_daemon_dump_log(b.d);
	}
	CHECK_EQ(tier_node_stop(&a), 0);
	CHECK_EQ(tier_node_stop(&b), 0);
}


/* GET @path from 127.0.0.1:@port into @out (NUL-terminated). 0 or -1. */
static int http_get(int port, const char *path, char *out, size_t n)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
				 .sin_port = htons((uint16_t)port) };
	struct timeval tv = { 5, 0 };
	int s = socket(AF_INET, SOCK_STREAM, 0);
	size_t got = 0;
	char req[256];

	if (s < 0)
		return -1;
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (connect(s, (struct sockaddr *)&a, sizeof(a))) {
		close(s);
		return -1;
	}
	snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
	if (write(s, req, strlen(req)) != (ssize_t)strlen(req)) {
		close(s);
		return -1;
	}
	for (;;) {
		ssize_t r = read(s, out + got, n - 1 - got);

		if (r <= 0)
			break;
		got += (size_t)r;
		if (got + 1 >= n)
			break;
	}
	out[got] = 0;
	close(s);
	return got ? 0 : -1;
}

/* Whether the file at @path contains @needle. */
static bool file_has(const char *path, const char *needle)
{
	FILE *f = fopen(path, "r");
	static char buf[1 << 20];
	size_t n;

	if (!f)
		return false;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = 0;
	fclose(f);
	return strstr(buf, needle) != NULL;
}

/*
 * kvstashd with @args, expected to refuse to start: its exit status (-1 if
 * it is still running after 15 s: then killed). Its output goes to @log.
 */
static int daemon_must_fail(const char *args, const char *log)
{
	char buf[1024], *argv[32];
	int argc = 0, st = -1;
	posix_spawn_file_actions_t fa;
	pid_t pid;

	snprintf(buf, sizeof(buf), "%s", args);
	argv[argc++] = (char *)t_build_path("kvstashd");
	for (char *save = NULL, *t = strtok_r(buf, " ", &save); t && argc < 31;
	     t = strtok_r(NULL, " ", &save))
		argv[argc++] = t;
	argv[argc] = NULL;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	posix_spawn_file_actions_adddup2(&fa, 1, 2);
	if (posix_spawn(&pid, argv[0], &fa, NULL, argv, environ)) {
		posix_spawn_file_actions_destroy(&fa);
		return -1;
	}
	posix_spawn_file_actions_destroy(&fa);
	for (int i = 0; i < 1500; i++) {
		if (waitpid(pid, &st, WNOHANG) == pid)
			return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
		usleep(10000);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return -1;
}

/* AUTH on the running cluster (@s, live nodes have pid > 0): library and kvstashd. */
static void test_cluster_auth(struct t_redis *s, int seed)
{
	char url[512], args[1200], pwfile[600], badfile[600], log[600];
	struct tier_redis *tr;
	uint8_t *v = malloc(VAL);
	int rc;
	FILE *f;

	/* masterauth first, so replicas keep replicating; then requirepass */
	for (int i = 0; i < NSRV; i++)
		if (s[i].pid) {
			CHECK_EQ(strcmp(rcmd(s[i].port, "CONFIG SET masterauth " CLUSTER_PW), "OK"), 0);
			CHECK_EQ(strcmp(rcmd(s[i].port, "CONFIG SET requirepass " CLUSTER_PW), "OK"), 0);
		}
	auth_pw = CLUSTER_PW;
	for (int i = 0; i < NSRV; i++)
		if (s[i].pid)
			CHECK_EQ(strcmp(rcmd(s[i].port, "ACL SETUSER kvc on >kvc-pw ~tc:* +@all"),
					"OK"), 0);
	snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d", seed);
	tr = open_url(url, NULL, NULL, &rc);
	CHECK_EQ(rc, -EACCES);	/* NOAUTH: said at start */
	CHECK(!tr);
	tr = open_url(url, NULL, "wrong-pw", &rc);
	CHECK_EQ(rc, -EACCES);
	tr = open_url(url, "kvc", "wrong-pw", &rc);
	CHECK_EQ(rc, -EACCES);
	tr = open_url(url, NULL, CLUSTER_PW, &rc);
	CHECK_EQ(rc, 0);
	if (tr) {
		for (unsigned i = 7000; i < 7030; i++) {
			t_fill(v, VAL, i);
			CHECK_EQ(put_sync(tr, i, v), 0);
		}
		tier_redis_close(tr);
	}
	/* an ACL user, credentials in the URL; another instance reads byte-exact */
	snprintf(url, sizeof(url), "redis+cluster://kvc:kvc-pw@127.0.0.1:%d", seed);
	tr = open_url(url, NULL, NULL, &rc);
	CHECK_EQ(rc, 0);
	if (tr) {
		for (unsigned i = 7000; i < 7030; i++)
			CHECK_EQ(get_check(tr, i), 0);
		tier_redis_close(tr);
	}

	/* kvstashd: --redis-password-file and --redis-user; right credentials start */
	snprintf(pwfile, sizeof(pwfile), "%s/cluster-pw", tmpdir);
	snprintf(badfile, sizeof(badfile), "%s/cluster-bad-pw", tmpdir);
	snprintf(log, sizeof(log), "%s/kvstashd-bad.log", tmpdir);
	f = fopen(pwfile, "w");
	REQUIRE(f);
	fputs("kvc-pw\n", f);
	fclose(f);
	f = fopen(badfile, "w");
	REQUIRE(f);
	fputs("not-" CLUSTER_PW "\n", f);
	fclose(f);
	{
		int hport = t_redis_free_port();
		struct t_daemon *d;
		static char metrics[1 << 16];

		snprintf(args, sizeof(args),
			 "--pool-size=64M --redis-url=redis+cluster://127.0.0.1:%d --redis-user=kvc "
			 "--redis-password-file=%s --redis-prefix=tc: --http-port=%d", seed, pwfile,
			 hport);
		d = t_daemon_start(args);
		CHECK(d != NULL);
		if (d) {
			CHECK_EQ(http_get(hport, "/metrics", metrics, sizeof(metrics)), 0);
			CHECK(strstr(metrics, "kvstash_l3_node_up{node=\"127.0.0.1:") != NULL);
			CHECK(strstr(metrics, "kvstash_l3_map_refreshes_total") != NULL);
			CHECK(strstr(metrics, "kvstash_l3_slots_uncovered 0") != NULL);
			CHECK(!strstr(metrics, "kvc-pw"));
			CHECK(!file_has(d->log_path, "kvc-pw"));
			CHECK(file_has(d->log_path, "redis tier: cluster"));
			if (t_failures)
				t_daemon_dump_log(d);
			CHECK_EQ(t_daemon_stop(d), 0);
		}
		/* the password in the URL is shown redacted in the config line */
		snprintf(args, sizeof(args),
			 "--pool-size=64M --redis-url=redis+cluster://kvc:kvc-pw@127.0.0.1:%d "
			 "--redis-prefix=tc:", seed);
		d = t_daemon_start(args);
		CHECK(d != NULL);
		if (d) {
			CHECK(!file_has(d->log_path, "kvc-pw"));
			CHECK(file_has(d->log_path, "kvc:***@"));
			CHECK_EQ(t_daemon_stop(d), 0);
		}
	}
	/* wrong credentials: kvstashd refuses to start, says why, never prints them */
	snprintf(args, sizeof(args),
		 "--listen=ipc://%s/bad-sock --http-port=0 --pool-size=64M "
		 "--redis-url=redis+cluster://127.0.0.1:%d --redis-password-file=%s", tmpdir, seed,
		 badfile);
	CHECK(daemon_must_fail(args, log) > 0);
	CHECK(file_has(log, "authentication failed"));
	CHECK(!file_has(log, CLUSTER_PW));
	snprintf(args, sizeof(args),
		 "--listen=ipc://%s/bad-sock --http-port=0 --pool-size=64M "
		 "--redis-url=redis+cluster://127.0.0.1:%d", tmpdir, seed);
	CHECK(daemon_must_fail(args, log) > 0);
	CHECK(file_has(log, "NOAUTH"));
	snprintf(args, sizeof(args),
		 "--listen=ipc://%s/bad-sock --http-port=0 --pool-size=64M "
		 "--redis-url=redis+cluster://127.0.0.1:%d --redis-password-file=%s/none", tmpdir,
		 seed, tmpdir);
	CHECK(daemon_must_fail(args, log) > 0);
	CHECK(file_has(log, "--redis-password-file"));
	free(v);
}

/* ---- load while resharding ---------------------------------------------------- */

struct load {
	struct tier_redis *tr;
	unsigned base;
	_Atomic int *stop;
	unsigned ops, failed, wrong;
};

static void *load_thread(void *p)
{
	struct load *l = p;
	uint8_t *v = malloc(VAL);

	for (unsigned i = 0; !atomic_load(l->stop) || i < 50; i++) {
		unsigned key = l->base + i % 400;
		int rc;

		t_fill(v, VAL, key);
		rc = put_sync(l->tr, key, v);
		l->failed += rc != 0;
		if (rc)
			fprintf(stderr, "load put %u: %d\n", key, rc);
		rc = get_check(l->tr, key);
		l->failed += rc < 0;
		l->wrong += rc == 1;
		if (rc)
			fprintf(stderr, "load get %u: %d\n", key, rc);
		l->ops += 2;
		if (i > 100000)
			break;
	}
	free(v);
	return NULL;
}

static void test_cluster(void)
{
	struct t_redis s[NSRV] = { 0 };
	char url[512], addrs[NSRV][32], ids[3][64];
	char *argv[NSRV + 8];
	int a = 0, rc;
	struct tier_redis *t1, *t2;
	struct tier_redis_stats st;
	uint8_t *v = malloc(VAL);

	for (int i = 0; i < NSRV; i++)
		REQUIRE(rsrv_start(&s[i], true, NULL, NULL) == 0);
	argv[a++] = "redis-cli";
	argv[a++] = "--cluster";
	argv[a++] = "create";
	for (int i = 0; i < NSRV; i++) {
		snprintf(addrs[i], sizeof(addrs[i]), "127.0.0.1:%d", s[i].port);
		argv[a++] = addrs[i];
	}
	argv[a++] = "--cluster-replicas";
	argv[a++] = "1";
	argv[a++] = "--cluster-yes";
	argv[a] = NULL;
	REQUIRE(spawn_wait(argv, true) == 0);
	/* every node agrees the cluster is up (bounded) */
	for (int i = 0, ok = 0; i < 1000 && !ok; i++) {
		ok = 1;
		for (int j = 0; j < NSRV; j++) {
			redisContext *c = rconn(s[j].port);
			redisReply *r = c ? redisCommand(c, "CLUSTER INFO") : NULL;

			ok &= r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok");
			freeReplyObject(r);
			if (c)
				redisFree(c);
		}
		if (!ok)
			usleep(20000);
	}
	for (int i = 0; i < 3; i++)
		snprintf(ids[i], sizeof(ids[i]), "%.40s", rcmd(s[i].port, "CLUSTER MYID"));

	/* one seed is enough; the others are found */
	snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d", s[1].port);
	t1 = open_url(url, NULL, NULL, &rc);
	REQUIRE(rc == 0);
	snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d,127.0.0.1:%d", t_redis_free_port(),
		 s[2].port);	/* a dead seed first */
	t2 = open_url(url, NULL, NULL, &rc);
	REQUIRE(rc == 0);
	tier_redis_get_stats(t1, &st);
	CHECK(st.cluster);
	CHECK_EQ(st.nodes, 3);
	CHECK_EQ(st.nodes_up, 3);
	CHECK_EQ(st.slots_uncovered, 0);

	/* what one instance stores the other reads byte-exact; keys on every master */
	for (unsigned i = 0; i < 60; i++) {
		t_fill(v, VAL, i);
		CHECK_EQ(put_sync(t1, i, v), 0);
	}
	for (unsigned i = 0; i < 60; i++)
		CHECK_EQ(get_check(t2, i), 0);
	for (int i = 0; i < 3; i++) {
		redisContext *c = rconn(s[i].port);
		redisReply *r = redisCommand(c, "DBSIZE");

		CHECK(r && r->type == REDIS_REPLY_INTEGER && r->integer > 5);
		freeReplyObject(r);
		redisFree(c);
	}
	{
		struct ks_key keys[61];
		bool present[61];

		for (unsigned i = 0; i < 61; i++)
			keys[i] = mkkey(i == 60 ? 99999 : i);
		CHECK_EQ(tier_redis_exists_wait(t2, keys, 61, present, 5000), 60);
		CHECK(!present[60]);
	}

	/* the same between two kvstashd processes */
	test_daemons_share(s[0].port);

	/* reshard 2000 slots from master 0 to master 1 while both store and read */
	{
		_Atomic int stop = 0;
		struct load l1 = { .tr = t1, .base = 1000, .stop = &stop };
		struct load l2 = { .tr = t2, .base = 1000, .stop = &stop };
		pthread_t th1, th2;
		char *rargv[] = { "redis-cli", "--cluster", "reshard", addrs[0], "--cluster-from",
				  ids[0], "--cluster-to", ids[1], "--cluster-slots", "2000",
				  "--cluster-yes", NULL };
		uint64_t moved0, asked0;

		tier_redis_get_stats(t1, &st);
		moved0 = st.moved;
		asked0 = st.asked;
		REQUIRE(pthread_create(&th1, NULL, load_thread, &l1) == 0);
		REQUIRE(pthread_create(&th2, NULL, load_thread, &l2) == 0);
		usleep(200000);
		CHECK_EQ(spawn_wait(rargv, true), 0);
		atomic_store(&stop, 1);
		pthread_join(th1, NULL);
		pthread_join(th2, NULL);
		fprintf(stderr, "reshard: %u + %u ops, %u failed, %u wrong\n", l1.ops, l2.ops,
			l1.failed + l2.failed, l1.wrong + l2.wrong);
		CHECK_EQ(l1.failed + l2.failed, 0);
		CHECK_EQ(l1.wrong + l2.wrong, 0);
		CHECK(l1.ops > 100 && l2.ops > 100);
		tier_redis_get_stats(t1, &st);
		fprintf(stderr, "reshard: moved %llu, asked %llu, refreshes %llu\n",
			(unsigned long long)(st.moved - moved0), (unsigned long long)(st.asked - asked0),
			(unsigned long long)st.map_refreshes);
		/* every chunk stored before is still there, byte-exact */
		for (unsigned i = 0; i < 60; i++)
			CHECK_EQ(get_check(t1, i), 0);
		for (unsigned i = 1000; i < 1400; i++)
			CHECK_EQ(get_check(t2, i), 0);
	}

	/* one slot migrated by hand: ASK while it moves, MOVED once it has */
	{
		unsigned ka = 0, kb = 0, slot = 0;
		char rk[512], cmd[700];
		uint64_t asked0, moved0;

		/* a key on master 0, and another key of the same slot */
		for (unsigned i = 8000; i < 9000 && !ka; i++) {
			struct ks_key k = mkkey(i);

			tier_redis_key(t1, &k, rk, sizeof(rk));
			snprintf(cmd, sizeof(cmd), "EXISTS %s", rk);
			if (strncmp(rcmd(s[0].port, cmd), "MOVED", 5)) {
				ka = i;
				slot = tier_redis_key_slot(rk, strlen(rk));
			}
		}
		REQUIRE(ka);
		for (unsigned i = 10000; i < 2000000 && !kb; i++) {
			struct ks_key k = mkkey(i);

			tier_redis_key(t1, &k, rk, sizeof(rk));
			if (tier_redis_key_slot(rk, strlen(rk)) == slot)
				kb = i;
		}
		REQUIRE(kb);
		t_fill(v, VAL, ka);
		CHECK_EQ(put_sync(t1, ka, v), 0);
		snprintf(cmd, sizeof(cmd), "CLUSTER SETSLOT %u IMPORTING %s", slot, ids[0]);
		CHECK_EQ(strcmp(rcmd(s[1].port, cmd), "OK"), 0);
		snprintf(cmd, sizeof(cmd), "CLUSTER SETSLOT %u MIGRATING %s", slot, ids[1]);
		CHECK_EQ(strcmp(rcmd(s[0].port, cmd), "OK"), 0);
		tier_redis_get_stats(t2, &st);
		asked0 = st.asked;
		/* a new key of the migrating slot: ASK to the importing master */
		t_fill(v, VAL, kb);
		CHECK_EQ(put_sync(t2, kb, v), 0);
		CHECK_EQ(get_check(t1, kb), 0);
		CHECK_EQ(get_check(t2, ka), 0);	/* not moved yet: the old master */
		tier_redis_get_stats(t2, &st);
		CHECK(st.asked > asked0);
		/* move the old key, then the slot */
		{
			struct ks_key k = mkkey(ka);
			redisContext *c = rconn(s[0].port);
			redisReply *r;

			REQUIRE(c);
			tier_redis_key(t1, &k, rk, sizeof(rk));
			r = redisCommand(c, "MIGRATE 127.0.0.1 %d %s 0 5000 KEYS %s", s[1].port, "", rk);
			CHECK(r && r->type == REDIS_REPLY_STATUS);
			freeReplyObject(r);
			redisFree(c);
		}
		CHECK_EQ(get_check(t2, ka), 0);	/* ASK: on the new master now */
		snprintf(cmd, sizeof(cmd), "CLUSTER SETSLOT %u NODE %s", slot, ids[1]);
		CHECK_EQ(strcmp(rcmd(s[1].port, cmd), "OK"), 0);
		CHECK_EQ(strcmp(rcmd(s[0].port, cmd), "OK"), 0);
		tier_redis_get_stats(t1, &st);
		moved0 = st.moved;
		CHECK_EQ(get_check(t1, ka), 0);	/* MOVED */
		CHECK_EQ(get_check(t1, kb), 0);
		tier_redis_get_stats(t1, &st);
		CHECK(st.moved > moved0);
		CHECK_EQ(st.corrupt, 0);
	}

	/* kill master 2: its slots fail fast; after its replica takes over, traffic follows */
	{
		int victim = 2, replica = -1;
		unsigned key = 0, ok = 0, fast_fail = 0;
		uint64_t t0;
		int r = -1;

		/* its replica: the node whose CLUSTER NODES line says "slave <id>" of it */
		for (int j = 3; j < NSRV && replica < 0; j++) {
			redisContext *c = rconn(s[j].port);
			redisReply *rr = redisCommand(c, "CLUSTER NODES");

			if (rr && rr->type == REDIS_REPLY_STRING) {
				char needle[128];

				snprintf(needle, sizeof(needle), "myself,slave %s", ids[victim]);
				if (strstr(rr->str, needle))
					replica = j;
			}
			freeReplyObject(rr);
			redisFree(c);
		}
		REQUIRE(replica >= 0);
		/* a key on the victim */
		for (unsigned i = 0; i < 60; i++) {
			char rk[512];
			struct ks_key k = mkkey(i);
			redisContext *c = rconn(s[victim].port);
			redisReply *rr;

			tier_redis_key(t1, &k, rk, sizeof(rk));
			rr = redisCommand(c, "EXISTS %s", rk);
			if (rr && rr->type == REDIS_REPLY_INTEGER && rr->integer == 1) {
				key = i;
				r = 0;
			}
			freeReplyObject(rr);
			redisFree(c);
			if (!r)
				break;
		}
		REQUIRE(r == 0);
		/* written again now, so the WAIT below covers this very value (it
		 * was first written before the reshard and the other kills) */
		t_fill(v, VAL, key);
		CHECK_EQ(put_sync(t1, key, v), 0);
		/* the replica must hold the key before the kill: replication is
		 * asynchronous, and WAIT returns once a replica acknowledged every
		 * write so far. A replica still in its first full sync on a loaded
		 * machine acknowledges nothing yet: ask again, for up to 30 s. */
		{
			redisContext *c = rconn(s[victim].port);
			long long acked = 0;

			for (int i = 0; c && i < 15 && acked < 1; i++) {
				redisReply *rr = redisCommand(c, "WAIT 1 2000");

				acked = rr && rr->type == REDIS_REPLY_INTEGER ? rr->integer : 0;
				freeReplyObject(rr);
			}
			if (acked < 1)
				fprintf(stderr, "failover: the replica on :%d acknowledged nothing in 30 s:\n%s\n",
					s[replica].port, rcmd(s[replica].port, "INFO replication"));
			CHECK(acked >= 1);
			if (c)
				redisFree(c);
		}
		t_redis_kill(&s[victim]);
		for (int i = 0; i < 10; i++) {
			t0 = ks_now_ms();
			r = get_check(t1, key);
			CHECK(r == -ENOTCONN || r == -ETIMEDOUT);
			CHECK(ks_now_ms() - t0 < 4000);
			fast_fail += ks_now_ms() - t0 < 1000;
		}
		CHECK(fast_fail >= 8);
		tier_redis_get_stats(t1, &st);
		CHECK(st.notconn >= 8);
		{
			const char *takeover = rcmd(s[replica].port, "CLUSTER FAILOVER TAKEOVER");

			/* a replica still loading its copy of the master's data answers
			 * LOADING: retry for up to 10 s */
			for (int i = 0; i < 100 && !strncmp(takeover, "LOADING", 7); i++) {
				usleep(100000);
				takeover = rcmd(s[replica].port, "CLUSTER FAILOVER TAKEOVER");
			}

			if (strcmp(takeover, "OK"))
				fprintf(stderr, "failover: CLUSTER FAILOVER TAKEOVER on :%d answered '%s'\n",
					s[replica].port, takeover);
			CHECK_EQ(strcmp(takeover, "OK"), 0);
		}
		/* traffic follows, no restart: bounded wait */
		for (int i = 0; i < 300 && !ok; i++) {
			r = get_check(t1, key);
			if (!r)
				r = get_check(t2, key);
			ok = r == 0;
			if (!ok)
				usleep(50000);
		}
		if (!ok)
			fprintf(stderr, "failover: key %u still fails (%d) 15 s after the takeover\n",
				key, r);
		CHECK(ok);
		t_fill(v, VAL, 5555);
		CHECK_EQ(put_sync(t2, 5555, v), 0);
		CHECK_EQ(get_check(t1, 5555), 0);
		tier_redis_get_stats(t1, &st);
		CHECK_EQ(st.nodes, 4);	/* the promoted replica was added */
		CHECK_EQ(st.corrupt, 0);
	}
	tier_redis_close(t1);
	tier_redis_close(t2);
	test_cluster_auth(s, s[0].port);
	/* a cluster with uncovered slots: opens, those keys fail fast, the rest work */
	{
		unsigned bad = 0, good = 0;

		for (int i = 0; i < NSRV; i++)
			if (s[i].pid && i != 2)
				rcmd(s[i].port, "CONFIG SET cluster-require-full-coverage no");
		/* every node forgets every slot: none is served (a half-built cluster).
		 * Gossip from a node not yet emptied can teach an emptied one a slot
		 * again, so repeat until no node knows any (bounded). */
		{
			bool empty = false;

			for (int round = 0; round < 50 && !empty; round++) {
				empty = true;
				for (int i = 0; i < NSRV; i++)
					if (s[i].pid && forget_known_slots(s[i].port) > 0)
						empty = false;
				if (!empty)
					usleep(100000);
			}
			CHECK(empty);
		}
		snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d", s[0].port);
		t1 = open_url(url, NULL, auth_pw, &rc);
		CHECK_EQ(rc, 0);
		if (t1) {
			tier_redis_get_stats(t1, &st);
			CHECK_EQ(st.slots_uncovered, 16384);
			for (unsigned i = 0; i < 20; i++) {
				uint64_t t0 = ks_now_ms();

				t_fill(v, VAL, i);
				rc = put_sync(t1, i, v);
				bad += rc == -ENOTCONN && ks_now_ms() - t0 < 1000;
				good += rc == 0;
			}
			CHECK_EQ(bad, 20);
			CHECK_EQ(good, 0);
			tier_redis_close(t1);
		}
	}
	for (int i = 0; i < NSRV; i++)
		t_redis_kill(&s[i]);
	free(v);
}

/* AUTH on a single node (requirepass, then an ACL user); a seed that is not a cluster. */
static void test_auth_and_bad_input(void)
{
	struct t_redis s = { 0 };
	char url[512];
	int rc;
	struct tier_redis *tr;
	uint8_t *v = malloc(VAL);

	{
		const struct t_redis_opts o = { .dir = tmpdir, .extra_flag = "--requirepass",
						.extra_value = "s3cret-pw", .password = "s3cret-pw" };

		REQUIRE(t_redis_start(&s, &o) == 0);
	}
	snprintf(url, sizeof(url), "redis://127.0.0.1:%d", s.port);
	tr = open_url(url, NULL, NULL, &rc);
	CHECK_EQ(rc, -EACCES);	/* NOAUTH: refused at start */
	CHECK(!tr);
	tr = open_url(url, NULL, "wrong", &rc);
	CHECK_EQ(rc, -EACCES);
	tr = open_url(url, NULL, "s3cret-pw", &rc);
	CHECK_EQ(rc, 0);
	if (tr) {
		t_fill(v, VAL, 7);
		CHECK_EQ(put_sync(tr, 7, v), 0);
		CHECK_EQ(get_check(tr, 7), 0);
		tier_redis_close(tr);
	}
	/* the password in the URL (percent-encoded) */
	snprintf(url, sizeof(url), "redis://:s3cret%%2Dpw@127.0.0.1:%d", s.port);
	tr = open_url(url, NULL, NULL, &rc);
	CHECK_EQ(rc, 0);
	tier_redis_close(tr);
	/* an ACL user */
	{
		redisContext *c = rconn(s.port);

		REQUIRE(c);
		freeReplyObject(redisCommand(c, "AUTH s3cret-pw"));
		freeReplyObject(redisCommand(c, "ACL SETUSER kv on >kv-pw ~tc:* +@all"));
		redisFree(c);
	}
	snprintf(url, sizeof(url), "redis://kv:kv-pw@127.0.0.1:%d", s.port);
	tr = open_url(url, NULL, NULL, &rc);
	CHECK_EQ(rc, 0);
	if (tr) {
		CHECK_EQ(get_check(tr, 7), 0);
		tier_redis_close(tr);
	}
	snprintf(url, sizeof(url), "redis://127.0.0.1:%d", s.port);
	tr = open_url(url, "kv", "bad-pw", &rc);
	CHECK_EQ(rc, -EACCES);
	tr = open_url(url, "kv", NULL, &rc);	/* a user without a password */
	CHECK_EQ(rc, -EINVAL);
	/* both in the URL and the config: ambiguous */
	snprintf(url, sizeof(url), "redis://kv:kv-pw@127.0.0.1:%d", s.port);
	tr = open_url(url, NULL, "kv-pw", &rc);
	CHECK_EQ(rc, -EINVAL);
	/* a seed that is not a cluster */
	snprintf(url, sizeof(url), "redis+cluster://127.0.0.1:%d", s.port);
	tr = open_url(url, NULL, "s3cret-pw", &rc);
	CHECK_EQ(rc, -EINVAL);
	t_redis_kill(&s);

	/* malformed URLs */
	{
		static const char *const bad[] = {
			"redis+cluster://", "redis://:99999", "redis://h:0", "rediss://h:6379",
			"http://h:1", "redis://user:@h:1", "redis://h:1x", "redis://::1:6379",
			"redis://[::1:6379", "redis+cluster://h:1,redis://h:2",
			"redis://h:1,redis+cluster://h:2", "redis://a:b@h:1,redis://a:c@h:2",
			"redis://:p%zz@h:1", "redis://h 1:2",
		};

		for (size_t i = 0; i < KS_ARRAY_SIZE(bad); i++) {
			tr = open_url(bad[i], NULL, NULL, &rc);
			if (rc != -EINVAL)
				fprintf(stderr, "URL %s: %d\n", bad[i], rc);
			CHECK_EQ(rc, -EINVAL);
			CHECK(!tr);
		}
	}
	/* redaction: the password never reaches a log line */
	{
		char out[256];

		tier_redis_redact_url("redis+cluster://u:p%40ss@h:1,h2:2", out, sizeof(out));
		CHECK_EQ(strcmp(out, "redis+cluster://u:***@h:1,h2:2"), 0);
		tier_redis_redact_url("redis://:pw@h:1,redis://:pw@h:2", out, sizeof(out));
		CHECK_EQ(strcmp(out, "redis://:***@h:1,redis://:***@h:2"), 0);
		tier_redis_redact_url("redis://h:1", out, sizeof(out));
		CHECK_EQ(strcmp(out, "redis://h:1"), 0);
	}
	/* password files */
	{
		char path[600], pw[64];
		FILE *f;

		snprintf(path, sizeof(path), "%s/pw", tmpdir);
		f = fopen(path, "w");
		REQUIRE(f);
		fputs("top-secret\n", f);
		fclose(f);
		CHECK_EQ(tier_redis_read_password_file(path, pw, sizeof(pw)), 0);
		CHECK_EQ(strcmp(pw, "top-secret"), 0);
		CHECK_EQ(tier_redis_read_password_file(path, pw, 5), -ENAMETOOLONG);
		f = fopen(path, "w");
		fclose(f);
		CHECK_EQ(tier_redis_read_password_file(path, pw, sizeof(pw)), -ENODATA);
		CHECK_EQ(tier_redis_read_password_file("/nonexistent/pw", pw, sizeof(pw)), -ENOENT);
	}
	/* slots: CRC16 vectors of Redis's cluster spec, hash tags */
	CHECK_EQ(tier_redis_key_slot("123456789", 9), 0x31C3 & 16383);
	CHECK_EQ(tier_redis_key_slot("foo", 3), 12182);
	CHECK_EQ(tier_redis_key_slot("{user1000}.following", 20),
		 tier_redis_key_slot("user1000", 8));
	CHECK_EQ(tier_redis_key_slot("foo{}{bar}", 10), tier_redis_key_slot("foo{}{bar}", 10));
	CHECK(tier_redis_key_slot("foo{}{bar}", 10) != tier_redis_key_slot("bar", 3));
	free(v);
}

int main(void)
{
	if (system("command -v redis-server >/dev/null 2>&1 && "
		   "command -v redis-cli >/dev/null 2>&1")) {
		fprintf(stderr, "tier_redis_cluster: redis-server/redis-cli not installed; skipped\n");
		return T_EXIT_SKIP;
	}
	signal(SIGPIPE, SIG_IGN);
	tmpdir = t_mkdtemp("rcluster");
	REQUIRE(tmpdir);
	test_auth_and_bad_input();
	test_cluster();
	t_rmtree(tmpdir);
	free(tmpdir);
	return t_result("tier_redis_cluster");
}
