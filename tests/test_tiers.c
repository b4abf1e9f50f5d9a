/*
 * Description: storage tiers through real kvstashd processes, a real
 * directory and a real redis-server: L1 evictions are demoted to disk and a
 * LOOKUP brings them back byte-exact; a restarted kvstashd finds them; a
 * corrupted chunk file shortens the hit instead of serving wrong bytes; two
 * kvstashd share chunks through Redis; one prefix spans L1 + L2 + L3; Redis
 * killed mid-run fails fast (counted) and is used again once restarted.
 * Labels: unit
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "kvfix.h"

#define NL 4
#define NB 192
#define BS 16
#define NH 8
#define HS 128	/* row 2 KiB: objects of 2 * 4 * 256 * 2048 = 4 MiB */
#define C 256
#define PROMPT 4	/* chunks per prompt */
#define POOL "--pool-size=64M"	/* 16 slots: a few prompts evict the first */

static const char *redis_bin = "/usr/bin/redis-server";

struct node {
	struct t_daemon *d;
	kvstash_client *c;
	struct t_kv kv;
	int64_t inst;
	bool disk;	/* started with --disk-path: every eviction is demoted */
};

static void node_start(struct node *n, const char *args, int64_t inst)
{
	memset(n, 0, sizeof(*n));
	n->d = t_daemon_start(args);
	REQUIRE(n->d);
	REQUIRE(kvstash_connect(n->d->endpoint, 10000, &n->c) == 0);
	REQUIRE(t_kv_create(&n->kv, KVSTASH_LAYOUT_FLASH_ATTN, "bfloat16", NL, NB, BS, NH, HS) == 0);
	n->inst = inst;
	n->disk = strstr(args, "--disk-path") != NULL;
	REQUIRE(t_kv_register(&n->kv, n->c, inst, "m-tier", 1) == 0);
}

static int node_stop(struct node *n)
{
	kvstash_close(n->c);
	t_kv_destroy(&n->kv);
	return t_daemon_stop(n->d);
}

static void prompt_tokens(int p, uint32_t *tok)
{
	for (size_t t = 0; t < PROMPT * C; t++)
		tok[t] = (uint32_t)p * 7919u + (uint32_t)t * 3u + 1u;
}

static uint64_t seed_of(int p)
{
	return 0x7ee0000ull + (uint64_t)p;
}

static const int64_t src_blocks[PROMPT * C / BS] = { 5, 3, 9, 1, 0, 2, 4, 6, 8, 7, 10, 12, 11, 14, 13,
						       15, 17, 16, 19, 18, 21, 20, 23, 22, 25, 24, 27,
						       26, 29, 28, 31, 30, 33, 32, 35, 34, 37, 36, 39,
						       38, 41, 40, 43, 42, 45, 44, 47, 46, 49, 48, 51,
						       50, 53, 52, 55, 54, 57, 56, 59, 58, 61, 60, 63,
						       62 };

/* STORE chunks [0, nchunks) of prompt @p. */
static int store_prompt(struct node *n, int p, int nchunks)
{
	uint32_t tok[PROMPT * C];
	char rid[32];

	prompt_tokens(p, tok);
	for (size_t t = 0; t < (size_t)nchunks * C; t++)
		t_kv_fill_token(&n->kv, t_kv_slot(&n->kv, src_blocks, t), seed_of(p), t);
	snprintf(rid, sizeof(rid), "p%d", p);
	struct kvstash_key k = { .model = "m-tier", .world_size = 1, .worker_id = 0, .tokens = tok,
				 .ntokens = PROMPT * C, .start = 0, .end = (uint64_t)nchunks * C,
				 .request_id = rid };
	return kvstash_store(n->c, &k, n->inst, src_blocks, (size_t)nchunks * C / BS);
}

/* LOOKUP prompt @p and wait for the prefetch: the chunk count, or -1. */
static int64_t lookup_prompt(struct node *n, int p)
{
	uint32_t tok[PROMPT * C];
	int64_t job, chunks = -1;

	prompt_tokens(p, tok);
	struct kvstash_key k = { .model = "m-tier", .world_size = 1, .worker_id = -1, .tokens = tok,
				 .ntokens = PROMPT * C, .start = 0, .end = PROMPT * C,
				 .request_id = "lookup" };
	if (kvstash_lookup(n->c, &k, 1, &job))
		return -1;
	/* QUERY_PREFETCH_LOOKUP_HITS is nil while loading; then the count. */
	for (int i = 0; i < 200; i++) {
		if (kvstash_query_lookup_hits(n->c, job, &chunks) == 0)
			break;
		usleep(20000);
	}
	if (kvstash_query_prefetch_status(n->c, job, &chunks))
		return -1;
	return chunks;
}

/* RETRIEVE chunks [0, nchunks) of prompt @p into other blocks; rows wrong, or -1. */
static long retrieve_check(struct node *n, int p, int nchunks)
{
	uint32_t tok[PROMPT * C];
	int64_t dst[PROMPT * C / BS];
	long bad = 0;

	prompt_tokens(p, tok);
	for (size_t b = 0; b < PROMPT * C / BS; b++)
		dst[b] = 100 + (int64_t)b;
	for (size_t t = 0; t < (size_t)nchunks * C; t++)
		for (int l = 0; l < NL; l++)
			for (int pl = 0; pl < 2; pl++)
				memset(t_kv_row(&n->kv, l, pl, t_kv_slot(&n->kv, dst, t)), 0, n->kv.row_bytes);
	struct kvstash_key k = { .model = "m-tier", .world_size = 1, .worker_id = 0, .tokens = tok,
				 .ntokens = PROMPT * C, .start = 0, .end = (uint64_t)nchunks * C,
				 .request_id = "retrieve" };
	if (kvstash_retrieve(n->c, &k, n->inst, dst, (size_t)nchunks * C / BS, 0)) {
		fprintf(stderr, "retrieve prompt %d: %s\n", p, kvstash_last_error());
		return -1;
	}
	for (size_t t = 0; t < (size_t)nchunks * C; t++)
		bad += !t_kv_check_token(&n->kv, t_kv_slot(&n->kv, dst, t), seed_of(p), t);
	return bad;
}

static uint64_t t_stat_n(struct node *n, const char *name)
{
	return t_stat(n->c, name);
}

/* Wait until @name reaches @want (async tier writes). */
static uint64_t wait_stat(struct node *n, const char *name, uint64_t want)
{
	uint64_t v = 0;

	for (int i = 0; i < 250 && (v = t_stat(n->c, name)) < want; i++)
		usleep(20000);
	return v;
}

/*
 * With a disk tier every eviction ends as exactly one of demoted, dropped
 * (staging full) or failed: wait until all of them have, so that which
 * chunks reached the disk does not depend on how fast this machine is.
 */
static void settle_demotions(struct node *n)
{
	for (int i = 0; i < 250; i++) {
		uint64_t ev = t_stat(n->c, "evictions");
		uint64_t done = t_stat(n->c, "l2_demoted") + t_stat(n->c, "l2_demote_dropped") +
				t_stat(n->c, "l2_demote_failed");

		if (done >= ev)
			return;
		usleep(20000);
	}
	CHECK(!"demotions settled within 5 s");
}

/*
 * Every chunk a STORE committed is written through to L3 and ends as exactly
 * one of written, dropped or failed: wait until all of them have. A node's
 * EXISTS queues behind its own pending SETs (4 MiB each) on the Redis
 * connection, so a LOOKUP made while they drain can exceed the EXISTS bound
 * (SRV_L3_EXISTS_TIMEOUT_MS) on a loaded machine and get a shorter hit.
 */
static void settle_write_through(struct node *n)
{
	for (int i = 0; i < 500; i++) {
		uint64_t stored = t_stat(n->c, "store_chunks_stored");
		uint64_t done = t_stat(n->c, "l3_written") + t_stat(n->c, "l3_dropped") +
				t_stat(n->c, "l3_failed");

		if (done >= stored)
			return;
		usleep(20000);
	}
	CHECK(!"write-through settled within 10 s");
}

/*
 * Fill L1 with other prompts so the earlier ones are evicted (and demoted),
 * one prompt at a time, each one's demotions done before the next: a burst
 * could overflow the disk tier's staging and drop the chunks a test wants.
 */
static void push_out(struct node *n, int first, int count)
{
	for (int p = first; p < first + count; p++) {
		CHECK_EQ(store_prompt(n, p, PROMPT), 0);
		if (n->disk)
			settle_demotions(n);
	}
}

static void test_disk(const char *dir)
{
	char args[800];
	struct node n;

	snprintf(args, sizeof(args), POOL " --disk-path=%s --disk-size-gb=1", dir);
	node_start(&n, args, 1);
	CHECK_EQ(store_prompt(&n, 0, PROMPT), 0);
	CHECK_EQ(store_prompt(&n, 1, PROMPT), 0);
	CHECK_EQ(store_prompt(&n, 2, PROMPT), 0);
	push_out(&n, 10, 5);	/* 20 chunks more through 16 slots */
	CHECK(wait_stat(&n, "l2_demoted", 12) >= 12);
	CHECK_EQ(t_stat_n(&n, "l2_demote_failed"), 0);

	/* Demoted and promoted back: byte-exact. */
	CHECK_EQ(lookup_prompt(&n, 0), PROMPT);
	CHECK(t_stat_n(&n, "l2_promoted") >= PROMPT);
	CHECK_EQ(retrieve_check(&n, 0, PROMPT), 0);
	CHECK_EQ(node_stop(&n), 0);

	/* Restart: a new kvstashd finds prompt 1 on disk. */
	node_start(&n, args, 2);
	CHECK_EQ(lookup_prompt(&n, 1), PROMPT);
	CHECK_EQ(retrieve_check(&n, 1, PROMPT), 0);
	CHECK_EQ(node_stop(&n), 0);

	/* A corrupted file: flip one payload byte of every chunk file that holds
	 * prompt 2's chunk 2 or later is hard to aim at; instead corrupt every
	 * file but count only what prompt 2 sees: its prefix stops at the first
	 * bad chunk, and nothing wrong is returned. */
	DIR *dd = opendir(dir);
	struct dirent *de;
	int corrupted = 0;

	REQUIRE(dd);
	while ((de = readdir(dd))) {
		char path[1200];
		int fd;

		if (!strstr(de->d_name, ".kvc"))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		fd = open(path, O_RDWR);
		if (fd < 0)
			continue;
		unsigned char b;
		off_t off = 4096 + 777;	/* past the 512-byte header: payload */
		if (pread(fd, &b, 1, off) == 1) {
			b ^= 0x5a;
			if (pwrite(fd, &b, 1, off) == 1)
				corrupted++;
		}
		close(fd);
	}
	closedir(dd);
	CHECK(corrupted > 0);
	node_start(&n, args, 3);
	int64_t hit = lookup_prompt(&n, 2);
	CHECK_EQ(hit, 0);	/* chunk 0's file is corrupt: no prefix, no wrong bytes */
	CHECK(t_stat_n(&n, "l2_corrupt") >= 1);
	CHECK(t_stat_n(&n, "promote_failed") >= 1);
	CHECK_EQ(node_stop(&n), 0);
}

static int free_port(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;

	if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&a, &len) == 0)
		port = ntohs(a.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

static pid_t redis_start(int port)
{
	char portbuf[16];
	pid_t pid;

	snprintf(portbuf, sizeof(portbuf), "%d", port);
	pid = fork();
	if (pid == 0) {
		int fd = open("/dev/null", O_WRONLY);

		dup2(fd, 1);
		dup2(fd, 2);
		execl(redis_bin, redis_bin, "--port", portbuf, "--bind", "127.0.0.1", "--save", "",
		      "--appendonly", "no", "--daemonize", "no", (char *)NULL);
		_exit(127);
	}
	usleep(300000);	/* redis-server listens within a few ms; margin for a loaded CI */
	return pid;
}

static void redis_stop(pid_t pid)
{
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

static void test_redis(const char *dir)
{
	int port = free_port();
	pid_t rpid = redis_start(port);
	char a_args[800], b_args[800];
	struct node a, b;

	snprintf(a_args, sizeof(a_args), POOL " --redis-url=redis://127.0.0.1:%d", port);
	snprintf(b_args, sizeof(b_args), POOL " --redis-url=redis://127.0.0.1:%d --disk-path=%s "
		 "--disk-size-gb=1", port, dir);
	node_start(&a, a_args, 10);
	node_start(&b, b_args, 20);

	/* What A stores, B retrieves through Redis. */
	CHECK_EQ(store_prompt(&a, 30, PROMPT), 0);
	CHECK(wait_stat(&a, "l3_written", PROMPT) >= PROMPT);
	CHECK_EQ(lookup_prompt(&b, 30), PROMPT);
	CHECK(t_stat_n(&b, "l3_promoted") >= PROMPT);
	CHECK_EQ(retrieve_check(&b, 30, PROMPT), 0);

	/* One prefix over three tiers on B: chunk 0 in L1, chunk 1 in L2, chunks
	 * 2-3 only in Redis. */
	CHECK_EQ(store_prompt(&b, 31, 2), 0);	/* chunks 0-1: L1 (+ Redis) */
	uint64_t dropped_before = t_stat_n(&b, "l2_demote_dropped");
	push_out(&b, 40, 5);			/* evict them: demoted to L2 */
	CHECK(wait_stat(&b, "l2_demoted", 2) >= 2);
	CHECK_EQ(t_stat_n(&b, "l2_demote_dropped"), dropped_before);
	CHECK_EQ(store_prompt(&b, 31, 1), 0);	/* chunk 0 back into L1 */
	CHECK_EQ(store_prompt(&a, 31, PROMPT), 0);	/* all 4 into Redis via A */
	CHECK(wait_stat(&a, "l3_written", 2 * PROMPT) >= 2 * PROMPT);
	settle_write_through(&b);	/* B's own SETs must not delay its EXISTS */
	uint64_t l2_before = t_stat_n(&b, "l2_promoted"), l3_before = t_stat_n(&b, "l3_promoted");
	CHECK_EQ(lookup_prompt(&b, 31), PROMPT);
	CHECK(t_stat_n(&b, "l2_promoted") > l2_before);
	CHECK(t_stat_n(&b, "l3_promoted") > l3_before);
	CHECK_EQ(retrieve_check(&b, 31, PROMPT), 0);

	/* Redis killed mid-run: requests keep being answered; failures counted. */
	redis_stop(rpid);
	CHECK_EQ(store_prompt(&a, 50, PROMPT), 0);	/* L1 works; write-through fails */
	CHECK_EQ(lookup_prompt(&a, 50), PROMPT);
	CHECK_EQ(retrieve_check(&a, 50, PROMPT), 0);
	CHECK_EQ(lookup_prompt(&b, 50), 0);		/* only in A's L1: B cannot see it */
	double rtt;
	CHECK_EQ(kvstash_ping(b.c, &rtt), 0);
	CHECK(t_stat_n(&a, "l3_notconn") + t_stat_n(&a, "l3_dropped") + t_stat_n(&a, "l3_failed") > 0);

	/* Restarted on the same port: the tier reconnects and sharing works again. */
	rpid = redis_start(port);
	uint64_t w0 = t_stat_n(&a, "l3_written");
	/* Both nodes reconnect on their own backoff: wait for each, not just A. */
	for (int i = 0; i < 200 && (t_stat_n(&a, "l3_nodes_up") != 1 ||
				    t_stat_n(&b, "l3_nodes_up") != 1); i++)
		usleep(50000);
	CHECK_EQ(store_prompt(&a, 60, PROMPT), 0);
	CHECK(wait_stat(&a, "l3_written", w0 + PROMPT) >= w0 + PROMPT);
	CHECK_EQ(lookup_prompt(&b, 60), PROMPT);
	CHECK_EQ(retrieve_check(&b, 60, PROMPT), 0);

	CHECK_EQ(node_stop(&a), 0);
	CHECK_EQ(node_stop(&b), 0);
	redis_stop(rpid);
}

int main(void)
{
	char *dir = t_mkdtemp("tiers");
	char disk1[600], disk2[600];

	REQUIRE(dir);
	snprintf(disk1, sizeof(disk1), "%s/l2a", dir);
	snprintf(disk2, sizeof(disk2), "%s/l2b", dir);
	test_disk(disk1);
	if (access(redis_bin, X_OK) == 0)
		test_redis(disk2);
	else {
		fprintf(stderr, "redis-server missing (apt-get install redis-server)\n");
		t_rmtree(dir);
		free(dir);
		return T_EXIT_SKIP;
	}
	t_rmtree(dir);
	free(dir);
	return t_result("tiers");
}
