/*
 * tier_bench.c - put/get GB/s of the disk (L2) and Redis (L3) tiers next to
 * the raw device figures measured in the same run:
 *   disk:  sequential O_DIRECT writes (+fsync) and reads of one plain file
 *          in the same directory, 32 MiB per call;
 *   redis: plain SET/GET of values of the same size on one hiredis
 *          connection against the same server.
 * Tier puts are timed to the last callback (page cache for the disk tier)
 * and, for disk, again including syncfs(); disk gets are timed cold (pages
 * dropped with fadvise after the sync) and warm.
 *
 *   cluster: the Redis tier again through a 3-master Redis Cluster
 *          (redis+cluster://) on loopback, next to the single node.
 *
 * usage: tier_bench [--dir DIR] [--size-mib N] [--count N] [--reps N] [--redis URL | --no-redis]
 *                   [--no-disk] [--no-cluster]
 * Without --redis, a redis-server from PATH is started on a free loopback port, then
 * (unless --no-cluster) three cluster-enabled ones joined with redis-cli --cluster create.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chunk_key.h"
#include "compiler.h"
#include "redis_fixture.h"
#include "tier_chunk.h"
#include "tier_disk.h"
#include "tier_redis.h"

extern char **environ;

static _Atomic unsigned n_done;
static _Atomic int n_err;

static void done_cb(void *arg, int status, uint64_t tag, size_t n)
{
	(void)arg;
	(void)tag;
	(void)n;
	if (status)
		atomic_store(&n_err, status);
	atomic_fetch_add(&n_done, 1);
}

static int wait_all(unsigned want, unsigned timeout_s)
{
	uint64_t dl = ks_now_ms() + timeout_s * 1000ull;

	while (atomic_load(&n_done) < want && ks_now_ms() < dl)
		usleep(50);
	return atomic_load(&n_done) == want ? atomic_load(&n_err) : -ETIMEDOUT;
}

static double gbps(uint64_t bytes, uint64_t ns)
{
	return ns ? (double)bytes / (double)ns : 0;	/* bytes/ns == GB/s */
}

static struct ks_key bkey(unsigned i)
{
	struct ks_key k;
	uint8_t h[KS_HASH_LEN];

	for (unsigned b = 0; b < KS_HASH_LEN; b++)
		h[b] = (uint8_t)(i * 29 + b * 3 + 1);
	ks_key_init(&k, h, "bench", 5, 0);
	return k;
}

static void row(const char *what, uint64_t bytes, uint64_t ns)
{
	printf("  %-46s %8.2f GB/s  (%.1f ms)\n", what, gbps(bytes, ns), (double)ns / 1e6);
}

/* ---- disk ---------------------------------------------------------------- */

/* Tier rows are the best of @reps runs: this VM's first run after the raw
 * writes was up to 5x slower in either mode (write-back of the raw file). */
static void bench_disk(const char *dir, uint8_t *buf, size_t sz, unsigned count, unsigned reps)
{
	uint64_t best[2][4] = { { 0 } };
	char path[4096];
	uint64_t total = (uint64_t)sz * count, t0;
	int fd, direct = 1;

	mkdir(dir, 0700);
	printf("disk: %s, %u x %zu MiB\n", dir, count, sz >> 20);
	/* raw device: one plain file, O_DIRECT (buffered + fsync where refused) */
	snprintf(path, sizeof(path), "%s/raw.bin", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0600);
	if (fd < 0) {
		direct = 0;
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	}
	if (fd < 0) {
		perror(path);
		return;
	}
	t0 = ks_now_ns();
	for (unsigned i = 0; i < count; i++)
		if (pwrite(fd, buf, sz, (off_t)i * sz) != (ssize_t)sz) {
			perror("raw write");
			break;
		}
	fsync(fd);
	row(direct ? "raw write (O_DIRECT, fsync)" : "raw write (buffered, fsync)", total,
	    ks_now_ns() - t0);
	close(fd);
	fd = open(path, O_RDONLY | (direct ? O_DIRECT : 0));
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	t0 = ks_now_ns();
	for (unsigned i = 0; i < count; i++)
		if (pread(fd, buf, sz, (off_t)i * sz) != (ssize_t)sz) {
			perror("raw read");
			break;
		}
	row(direct ? "raw read (O_DIRECT)" : "raw read (buffered, dropped)", total,
	    ks_now_ns() - t0);
	close(fd);
	unlink(path);

	for (int pw = 0; pw < 2; pw++)
	for (unsigned rep = 0; rep < reps; rep++) {
		char tdir[4096];
		struct tier_disk_config cfg = { .path = tdir, .capacity_bytes = total * 2,
						.queue_depth = count + 1, .force_pwrite = pw };
		struct tier_disk *td;
		struct tier_disk_stats st;
		int rc, dfd;
		uint64_t tput;

		snprintf(tdir, sizeof(tdir), "%s/tier-%d", dir, pw);
		rc = tier_disk_open(&cfg, &td);
		if (rc) {
			fprintf(stderr, "tier_disk_open: %s\n", strerror(-rc));
			return;
		}
		tier_disk_get_stats(td, &st);
		const char *mode = st.uring ? "io_uring" : "pwrite";
		char label[128];

		atomic_store(&n_done, 0);
		t0 = ks_now_ns();
		for (unsigned i = 0; i < count; i++) {
			struct ks_key k = bkey(i);

			rc = tier_disk_put(td, &k, 1, buf, sz, 0, done_cb, NULL);
			if (rc)
				fprintf(stderr, "put: %s\n", strerror(-rc));
		}
		rc = wait_all(count, 600);
		tput = ks_now_ns() - t0;
		if (rc)
			fprintf(stderr, "put errors: %s\n", strerror(-rc));
		best[pw][0] = rep ? KS_MIN(best[pw][0], tput) : tput;
		dfd = open(tdir, O_RDONLY | O_DIRECTORY);
		syncfs(dfd);
		tput = ks_now_ns() - t0;
		best[pw][1] = rep ? KS_MIN(best[pw][1], tput) : tput;
		/* cold: the files' pages are clean after syncfs; drop them */
		for (unsigned i = 0; i < count; i++) {
			struct ks_key k = bkey(i);
			char name[TIER_CHUNK_NAME_MAX + 8];
			char cn[TIER_CHUNK_NAME_MAX];
			int f;

			tier_chunk_name(&k, cn);
			snprintf(name, sizeof(name), "%s.kvc", cn);
			f = openat(dfd, name, O_RDONLY);
			if (f >= 0) {
				posix_fadvise(f, 0, 0, POSIX_FADV_DONTNEED);
				close(f);
			}
		}
		close(dfd);
		for (int warm = 0; warm < 2; warm++) {
			uint8_t **dst = calloc(count, sizeof(*dst));

			for (unsigned i = 0; i < count; i++)
				dst[i] = malloc(sz);
			atomic_store(&n_done, 0);
			t0 = ks_now_ns();
			for (unsigned i = 0; i < count; i++) {
				struct ks_key k = bkey(i);

				rc = tier_disk_get(td, &k, dst[i], sz, done_cb, NULL);
				if (rc)
					fprintf(stderr, "get: %s\n", strerror(-rc));
			}
			rc = wait_all(count, 600);
			tput = ks_now_ns() - t0;
			best[pw][2 + warm] = rep ? KS_MIN(best[pw][2 + warm], tput) : tput;
			if (rc)
				fprintf(stderr, "get errors: %s\n", strerror(-rc));
			for (unsigned i = 0; i < count; i++)
				free(dst[i]);
			free(dst);
		}
		tier_disk_close(td);
		for (unsigned i = 0; i < count; i++) {
			char cn[TIER_CHUNK_NAME_MAX], p[8192];
			struct ks_key k = bkey(i);

			tier_chunk_name(&k, cn);
			snprintf(p, sizeof(p), "%s/%s.kvc", tdir, cn);
			unlink(p);
		}
		snprintf(path, sizeof(path), "%s/.lock", tdir);
		unlink(path);
		rmdir(tdir);
		if (rep + 1 < reps)
			continue;
		snprintf(label, sizeof(label), "tier_disk put (%s, page cache)", mode);
		row(label, total, best[pw][0]);
		snprintf(label, sizeof(label), "tier_disk put + syncfs (%s)", mode);
		row(label, total, best[pw][1]);
		snprintf(label, sizeof(label), "tier_disk get (%s, cold, verified)", mode);
		row(label, total, best[pw][2]);
		snprintf(label, sizeof(label), "tier_disk get (%s, page cache, verified)", mode);
		row(label, total, best[pw][3]);
	}
}

/* ---- redis --------------------------------------------------------------- */

static void bench_tier(const char *url, const char *what, uint8_t *buf, size_t sz, unsigned count);

static void bench_redis(const char *url, uint8_t *buf, size_t sz, unsigned count)
{
	uint64_t total = (uint64_t)sz * count, t0;
	char host[256];
	int port = 0;
	redisContext *c;

	if (sscanf(url, "redis://%255[^:]:%d", host, &port) != 2) {
		fprintf(stderr, "bad url %s\n", url);
		return;
	}
	printf("redis: %s, %u x %zu MiB\n", url, count, sz >> 20);
	c = redisConnectWithTimeout(host, port, (struct timeval){ 5, 0 });
	if (!c || c->err) {
		fprintf(stderr, "connect %s failed\n", url);
		return;
	}
	redisSetTimeout(c, (struct timeval){ 30, 0 });
	t0 = ks_now_ns();
	for (unsigned i = 0; i < count; i++)
		freeReplyObject(redisCommand(c, "SET raw:%u %b", i, buf, sz));
	row("raw SET (hiredis, 1 connection)", total, ks_now_ns() - t0);
	t0 = ks_now_ns();
	for (unsigned i = 0; i < count; i++) {
		redisReply *r = redisCommand(c, "GET raw:%u", i);

		if (r && r->type == REDIS_REPLY_STRING)
			memcpy(buf, r->str, KS_MIN((size_t)r->len, sz));
		freeReplyObject(r);
	}
	row("raw GET (hiredis, 1 connection)", total, ks_now_ns() - t0);
	for (unsigned i = 0; i < count; i++)
		freeReplyObject(redisCommand(c, "DEL raw:%u", i));
	redisFree(c);
	bench_tier(url, "", buf, sz, count);
}

/* tier_redis put/get through @url (one node or a cluster), @what in the row labels. */
static void bench_tier(const char *url, const char *what, uint8_t *buf, size_t sz, unsigned count)
{
	const char *urls[] = { url };
	struct tier_redis_config cfg = { .urls = urls, .nurls = 1, .ttl_s = 600,
					 .queue_depth = count + 1, .key_prefix = "bench:" };
	struct tier_redis *tr;
	uint64_t total = (uint64_t)sz * count, t0;
	char label[128];
	int rc;

	rc = tier_redis_open(&cfg, &tr);
	if (rc) {
		fprintf(stderr, "tier_redis_open: %s\n", strerror(-rc));
		return;
	}
	atomic_store(&n_done, 0);
	t0 = ks_now_ns();
	for (unsigned i = 0; i < count; i++) {
		struct ks_key k = bkey(i);

		tier_redis_put(tr, &k, 1, buf, sz, 0, done_cb, NULL);
	}
	rc = wait_all(count, 600);
	snprintf(label, sizeof(label), "tier_redis put%s (pipelined, checksummed)", what);
	row(label, total, ks_now_ns() - t0);
	if (rc)
		fprintf(stderr, "put errors: %s\n", strerror(-rc));
	uint8_t **dst = calloc(count, sizeof(*dst));

	for (unsigned i = 0; i < count; i++)
		dst[i] = malloc(sz);
	atomic_store(&n_done, 0);
	t0 = ks_now_ns();
	for (unsigned i = 0; i < count; i++) {
		struct ks_key k = bkey(i);

		tier_redis_get(tr, &k, dst[i], sz, done_cb, NULL);
	}
	rc = wait_all(count, 600);
	snprintf(label, sizeof(label), "tier_redis get%s (pipelined, verified)", what);
	row(label, total, ks_now_ns() - t0);
	if (rc)
		fprintf(stderr, "get errors: %s\n", strerror(-rc));
	for (unsigned i = 0; i < count; i++) {
		struct ks_key k = bkey(i);

		tier_redis_remove(tr, &k);
		free(dst[i]);
	}
	free(dst);
	usleep(200000);
	tier_redis_close(tr);
}

static bool cluster_ok(int port)
{
	redisContext *c = redisConnectWithTimeout("127.0.0.1", port, (struct timeval){ 1, 0 });
	redisReply *r = c && !c->err ? redisCommand(c, "CLUSTER INFO") : NULL;
	bool ok = r && r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_state:ok");

	freeReplyObject(r);
	if (c)
		redisFree(c);
	return ok;
}

/* A 3-master Redis Cluster on loopback (no replicas), the tier through it, then torn down. */
static void bench_cluster(uint8_t *buf, size_t sz, unsigned count)
{
	char dir[] = "/tmp/tier-bench-cluster.XXXXXX", conf[600], addr[3][32], url[64];
	struct t_redis node[3] = { 0 };
	int st = -1;
	bool ok = false;

	if (!mkdtemp(dir))
		return;
	for (int i = 0; i < 3; i++) {
		const struct t_redis_opts o = { .dir = dir, .cluster = true };

		if (t_redis_start(&node[i], &o))
			goto out;
		snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", node[i].port);
	}
	{
		char *argv[] = { "redis-cli", "--cluster", "create", addr[0], addr[1], addr[2],
				 "--cluster-replicas", "0", "--cluster-yes", NULL };
		posix_spawn_file_actions_t fa;
		pid_t cli;

		posix_spawn_file_actions_init(&fa);
		posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
		if (posix_spawnp(&cli, "redis-cli", &fa, NULL, argv, environ) == 0)
			waitpid(cli, &st, 0);
		posix_spawn_file_actions_destroy(&fa);
	}
	for (int t = 0; t < 500 && !ok && st == 0; t++) {
		ok = cluster_ok(node[0].port) && cluster_ok(node[1].port) && cluster_ok(node[2].port);
		if (!ok)
			usleep(20000);
	}
	if (!ok) {
		fprintf(stderr, "redis cluster: could not be created; skipped\n");
		goto out;
	}
	printf("redis cluster: 3 masters on loopback, %u x %zu MiB\n", count, sz >> 20);
	snprintf(url, sizeof(url), "redis+cluster://%s", addr[0]);
	bench_tier(url, ", cluster x3", buf, sz, count);
out:
	for (int i = 0; i < 3; i++) {
		t_redis_kill(&node[i]);
		snprintf(conf, sizeof(conf), "%s/nodes-%d.conf", dir, node[i].port);
		unlink(conf);
	}
	rmdir(dir);
}

int main(int argc, char **argv)
{
	const char *dir = "./tier-bench.d", *url = NULL;
	size_t sz = 32u << 20;
	unsigned count = 16, reps = 3;
	bool disk = true, redis = true, cluster = true;
	struct t_redis local = { 0 };	/* a redis-server started here, when no --url */

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--dir") && i + 1 < argc)
			dir = argv[++i];
		else if (!strcmp(argv[i], "--size-mib") && i + 1 < argc)
			sz = (size_t)strtoul(argv[++i], NULL, 0) << 20;
		else if (!strcmp(argv[i], "--count") && i + 1 < argc)
			count = (unsigned)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
			reps = (unsigned)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--redis") && i + 1 < argc)
			url = argv[++i];
		else if (!strcmp(argv[i], "--no-redis"))
			redis = false;
		else if (!strcmp(argv[i], "--no-disk"))
			disk = false;
		else if (!strcmp(argv[i], "--no-cluster"))
			cluster = false;
		else {
			fprintf(stderr, "usage: %s [--dir DIR] [--size-mib N] [--count N] [--reps N] "
					"[--redis URL | --no-redis] [--no-disk] [--no-cluster]\n", argv[0]);
			return 2;
		}
	}
	if (!sz || !count || !reps)
		return 2;
	signal(SIGPIPE, SIG_IGN);
	uint8_t *buf = aligned_alloc(4096, sz);

	if (!buf)
		return 1;
	for (size_t i = 0; i < sz; i += 8) {
		uint64_t v = (i * 0x9e3779b97f4a7c15ull) ^ (i >> 7);

		memcpy(buf + i, &v, KS_MIN((size_t)8, sz - i));
	}
	{
		uint64_t t0 = ks_now_ns(), s = 0;

		for (int r = 0; r < 4; r++)
			s ^= tier_chunk_sum(buf, sz);
		printf("reference: XXH3_64bits %.2f GB/s (sum %llx)\n",
		       gbps(4ull * sz, ks_now_ns() - t0), (unsigned long long)s);
	}
	if (disk)
		bench_disk(dir, buf, sz, count, reps);
	if (redis) {
		if (!url) {
			if (t_redis_start(&local, NULL)) {
				fprintf(stderr, "redis: no redis-server to start; skipped\n");
				redis = false;
			}
			url = local.url;
		}
		if (redis)
			bench_redis(url, buf, sz, count);
		/* the same through a cluster, when the single node was started here too */
		if (redis && cluster && url == local.url)
			bench_cluster(buf, sz, count);
	}
	t_redis_kill(&local);
	if (disk)
		rmdir(dir);
	free(buf);
	return 0;
}
