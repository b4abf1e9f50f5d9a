/*
 * server_bench.c - end-to-end STORE/RETRIEVE bandwidth through kvstashd on
 * the host backend, next to plain memcpy measured in the same run, with the
 * PING latency seen by a watchdog client under that load.
 *
 * Layout: Llama-3-8B-like, one rank: 32 layers of flash_attn
 * [2, NB, 16, 8, 128] bf16 (a 2 KiB row), chunks of 256 tokens, so one object
 * is [2, 32, 256, 1024] bf16 = 32 MiB. Each client owns a memfd holding its
 * paged buffer, registers it, and loops: STORE --chunks-per-request chunks of
 * a fresh prompt (shuffled blocks), and in the second phase RETRIEVE recently
 * stored prompts into other blocks. GB/s = object bytes / wall time of the
 * phase (1 GB = 1e9 B). The memcpy baseline copies 32 MiB buffers with as
 * many threads as the server has transfer workers.
 *
 * Usage: server_bench [--endpoint EP | --workers N] [--clients N]
 *                     [--chunks-per-request N] [--seconds S] [--pool-size SIZE]
 * Without --endpoint it starts ../kvstashd (next to this program's folder)
 * on a private ipc:// endpoint with --workers (default 2) and --pool-size
 * (default 3G).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvstash.h"

#define NUM_LAYERS 32
#define BLOCK_SIZE 16
#define NUM_HEADS 8
#define HEAD_SIZE 128
#define ROW_BYTES (NUM_HEADS * HEAD_SIZE * 2)
#define CHUNK_TOKENS 256
#define OBJECT_BYTES ((size_t)2 * NUM_LAYERS * CHUNK_TOKENS * ROW_BYTES)
#define RECENT 2	/* prompts per client kept for the retrieve phase */
#define MAX_CLIENTS 64
#define MAX_PINGS 200000
#define PING_PERIOD_US 10000

static struct {
	const char *endpoint;
	int clients, chunks, workers;
	double seconds;
	const char *pool_size;
} opt = { NULL, 2, 4, 2, 8.0, "3G" };

static _Atomic int phase;	/* 0 setup, 1 store, 2 retrieve, 3 stop */
static _Atomic uint64_t bytes_done[3];
static _Atomic uint64_t failures;
static double pings[MAX_PINGS];
static size_t npings;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct client {
	int id;
	pthread_t th;
	kvstash_client *c;
	struct kvstash_host_buffer buf;
	int64_t *src, *dst;	/* block ids of one request */
	uint32_t *tokens[RECENT];
	size_t ntok;
	unsigned stored;	/* prompts stored so far */
};

static void shuffle(int64_t *v, size_t n, uint64_t *rng)
{
	for (size_t i = n - 1; i > 0; i--) {
		*rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
		size_t j = (size_t)(*rng >> 33) % (i + 1);
		int64_t t = v[i];

		v[i] = v[j];
		v[j] = t;
	}
}

static int client_setup(struct client *cl)
{
	size_t nblk_req = (size_t)opt.chunks * CHUNK_TOKENS / BLOCK_SIZE, nb = 2 * nblk_req;
	size_t layer_bytes = 2 * nb * BLOCK_SIZE * (size_t)ROW_BYTES;
	struct kvstash_kv_layout lay = { .layout = KVSTASH_LAYOUT_FLASH_ATTN, .dtype = "bfloat16",
					 .ndim = 5,
					 .shape = { 2, (int64_t)nb, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE } };
	struct kvstash_host_layer layers[NUM_LAYERS];
	uint64_t rng = 0x1234567ull * (uint64_t)(cl->id + 1);
	int64_t *all;

	if (kvstash_connect(opt.endpoint, 60000, &cl->c) ||
	    kvstash_host_buffer_create(&cl->buf, layer_bytes * NUM_LAYERS, "server-bench"))
		return -1;
	/* Touch every page now, so the timed phases measure copies, not faults. */
	for (size_t i = 0; i < cl->buf.bytes; i += 4096)
		((volatile uint8_t *)cl->buf.ptr)[i] = (uint8_t)(i >> 12);
	for (int l = 0; l < NUM_LAYERS; l++)
		layers[l] = (struct kvstash_host_layer){ cl->buf.path, (uint64_t)l * layer_bytes,
							 cl->buf.bytes };
	if (kvstash_register_host(cl->c, 100 + cl->id, "bench-llama3-8b", 1, &lay, layers,
				  NUM_LAYERS)) {
		fprintf(stderr, "client %d: register: %s\n", cl->id, kvstash_last_error());
		return -1;
	}
	all = malloc(nb * sizeof(*all));
	cl->src = malloc(nblk_req * sizeof(*cl->src));
	cl->dst = malloc(nblk_req * sizeof(*cl->dst));
	cl->ntok = (size_t)opt.chunks * CHUNK_TOKENS;
	if (!all || !cl->src || !cl->dst)
		return -1;
	for (size_t i = 0; i < nb; i++)
		all[i] = (int64_t)i;
	shuffle(all, nb, &rng);
	memcpy(cl->src, all, nblk_req * sizeof(*all));
	memcpy(cl->dst, all + nblk_req, nblk_req * sizeof(*all));
	free(all);
	for (int r = 0; r < RECENT; r++) {
		cl->tokens[r] = malloc(cl->ntok * sizeof(uint32_t));
		if (!cl->tokens[r])
			return -1;
	}
	return 0;
}

static void *client_main(void *arg)
{
	struct client *cl = arg;
	char rid[64];

	while (atomic_load(&phase) == 0)
		usleep(1000);
	while (atomic_load(&phase) == 1) {
		uint32_t *tok = cl->tokens[cl->stored % RECENT];

		for (size_t t = 0; t < cl->ntok; t++)
			tok[t] = (uint32_t)(cl->id << 24) ^ (cl->stored * 7919u) ^ (uint32_t)t;
		snprintf(rid, sizeof(rid), "b%d-%u", cl->id, cl->stored);
		struct kvstash_key k = { .model = "bench-llama3-8b", .world_size = 1, .worker_id = 0,
					 .tokens = tok, .ntokens = cl->ntok, .start = 0,
					 .end = cl->ntok, .request_id = rid };
		if (kvstash_store(cl->c, &k, 100 + cl->id, cl->src,
				  cl->ntok / BLOCK_SIZE)) {
			atomic_fetch_add(&failures, 1);
			continue;
		}
		kvstash_end_session(cl->c, rid);
		cl->stored++;
		if (atomic_load(&phase) == 1)
			atomic_fetch_add(&bytes_done[1], (uint64_t)opt.chunks * OBJECT_BYTES);
	}
	for (unsigned i = 0; atomic_load(&phase) == 2; i++) {
		unsigned n = cl->stored < RECENT ? cl->stored : RECENT;

		if (!n)
			break;
		struct kvstash_key k = { .model = "bench-llama3-8b", .world_size = 1, .worker_id = 0,
					 .tokens = cl->tokens[(cl->stored - 1 - i % n) % RECENT],
					 .ntokens = cl->ntok, .start = 0, .end = cl->ntok,
					 .request_id = "retrieve" };
		if (kvstash_retrieve(cl->c, &k, 100 + cl->id, cl->dst, cl->ntok / BLOCK_SIZE, 0)) {
			atomic_fetch_add(&failures, 1);
			continue;
		}
		if (atomic_load(&phase) == 2)
			atomic_fetch_add(&bytes_done[2], (uint64_t)opt.chunks * OBJECT_BYTES);
	}
	return NULL;
}

struct server_view {
	uint64_t io_turn_max_us, ping_sum_us, ping_count;
};

static int server_stat(const char *name, uint64_t value, void *arg)
{
	struct server_view *v = arg;

	if (!strcmp(name, "io_turn_max_us"))
		v->io_turn_max_us = value;
	else if (!strcmp(name, "latency_ping_sum_us"))
		v->ping_sum_us = value;
	else if (!strcmp(name, "latency_ping_count"))
		v->ping_count = value;
	return 0;
}

static void *pinger_main(void *arg)
{
	kvstash_client *c;

	(void)arg;
	if (kvstash_connect(opt.endpoint, 5000, &c))
		return NULL;
	while (atomic_load(&phase) < 3 && npings < MAX_PINGS) {
		double rtt;

		if (atomic_load(&phase) >= 1) {
			if (kvstash_ping(c, &rtt) == 0)
				pings[npings++] = rtt;
			else
				atomic_fetch_add(&failures, 1);
		}
		usleep(PING_PERIOD_US);
	}
	kvstash_close(c);
	return NULL;
}

struct memcpy_arg {
	uint8_t *src, *dst;
	size_t n, rounds;
};

static void *memcpy_main(void *p)
{
	struct memcpy_arg *a = p;

	for (size_t r = 0; r < a->rounds; r++)
		memcpy(a->dst + (r % 4) * OBJECT_BYTES, a->src + (r % 4) * OBJECT_BYTES, OBJECT_BYTES);
	return NULL;
}

/* memcpy GB/s of 32 MiB copies with @threads threads, buffers beyond the LLC. */
static double memcpy_gbps(int threads)
{
	struct memcpy_arg a[MAX_CLIENTS];
	pthread_t th[MAX_CLIENTS];
	const size_t rounds = 24;
	double t0, t;

	for (int i = 0; i < threads; i++) {
		a[i].src = malloc(4 * OBJECT_BYTES);
		a[i].dst = malloc(4 * OBJECT_BYTES);
		a[i].rounds = rounds;
		if (!a[i].src || !a[i].dst)
			return 0;
		memset(a[i].src, i + 1, 4 * OBJECT_BYTES);
		memset(a[i].dst, 0, 4 * OBJECT_BYTES);
	}
	t0 = now_s();
	for (int i = 0; i < threads; i++)
		pthread_create(&th[i], NULL, memcpy_main, &a[i]);
	for (int i = 0; i < threads; i++)
		pthread_join(th[i], NULL);
	t = now_s() - t0;
	for (int i = 0; i < threads; i++) {
		free(a[i].src);
		free(a[i].dst);
	}
	return (double)threads * rounds * OBJECT_BYTES / t / 1e9;
}

static int cmp_double(const void *x, const void *y)
{
	double a = *(const double *)x, b = *(const double *)y;

	return a < b ? -1 : a > b;
}

static pid_t spawn_daemon(const char *self, char *endpoint, size_t len)
{
	char dir[] = "/tmp/kvstash-bench-XXXXXX", exe[1024], listen[600], workers[32], pool[64];
	const char *slash = strrchr(self, '/');
	pid_t pid;

	if (!mkdtemp(dir))
		return -1;
	snprintf(exe, sizeof(exe), "%.*s/../kvstashd", slash ? (int)(slash - self) : 1,
		 slash ? self : ".");
	snprintf(endpoint, len, "ipc://%s/sock", dir);
	snprintf(listen, sizeof(listen), "--listen=%s", endpoint);
	snprintf(workers, sizeof(workers), "--workers=%d", opt.workers);
	snprintf(pool, sizeof(pool), "--pool-size=%s", opt.pool_size);
	pid = fork();
	if (pid == 0) {
		execl(exe, exe, listen, workers, pool, "--log-level=warn", (char *)NULL);
		fprintf(stderr, "server_bench: cannot run %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	return pid;
}

int main(int argc, char **argv)
{
	static char endpoint[700];
	struct client cl[MAX_CLIENTS];
	pthread_t pinger;
	pid_t daemon = 0;
	double gb[3], memcpy_rate;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--endpoint") && v)
			opt.endpoint = v, i++;
		else if (!strcmp(a, "--clients") && v)
			opt.clients = atoi(v), i++;
		else if (!strcmp(a, "--chunks-per-request") && v)
			opt.chunks = atoi(v), i++;
		else if (!strcmp(a, "--seconds") && v)
			opt.seconds = atof(v), i++;
		else if (!strcmp(a, "--workers") && v)
			opt.workers = atoi(v), i++;
		else if (!strcmp(a, "--pool-size") && v)
			opt.pool_size = v, i++;
		else {
			fprintf(stderr, "usage: %s [--endpoint EP | --workers N] [--clients N] "
				"[--chunks-per-request N] [--seconds S] [--pool-size SIZE]\n", argv[0]);
			return 2;
		}
	}
	if (opt.clients < 1 || opt.clients > MAX_CLIENTS || opt.chunks < 1 || opt.seconds <= 0 ||
	    opt.workers < 1 || opt.workers > MAX_CLIENTS) {
		fprintf(stderr, "server_bench: bad arguments\n");
		return 2;
	}
	if (!opt.endpoint) {
		daemon = spawn_daemon(argv[0], endpoint, sizeof(endpoint));
		if (daemon < 0)
			return 1;
		opt.endpoint = endpoint;
	}
	kvstash_client *probe;
	double rtt = -1;
	if (kvstash_connect(opt.endpoint, 200, &probe) == 0) {
		for (int i = 0; i < 50 && kvstash_ping(probe, &rtt); i++)
			;
		kvstash_close(probe);
	}
	if (rtt < 0) {
		fprintf(stderr, "server_bench: no kvstashd answers at %s\n", opt.endpoint);
		goto out;
	}

	memcpy_rate = memcpy_gbps(opt.workers);
	for (int i = 0; i < opt.clients; i++) {
		memset(&cl[i], 0, sizeof(cl[i]));
		cl[i].id = i;
		if (client_setup(&cl[i])) {
			fprintf(stderr, "server_bench: client %d setup failed: %s\n", i,
				kvstash_last_error());
			goto out;
		}
		pthread_create(&cl[i].th, NULL, client_main, &cl[i]);
	}
	pthread_create(&pinger, NULL, pinger_main, NULL);
	for (int p = 1; p <= 2; p++) {
		double t0 = now_s();

		atomic_store(&phase, p);
		usleep((useconds_t)(opt.seconds * 1e6));
		gb[p] = (double)atomic_load(&bytes_done[p]) / (now_s() - t0) / 1e9;
	}
	atomic_store(&phase, 3);
	for (int i = 0; i < opt.clients; i++) {
		pthread_join(cl[i].th, NULL);
		kvstash_unregister(cl[i].c, 100 + cl[i].id);
		kvstash_close(cl[i].c);
		kvstash_host_buffer_destroy(&cl[i].buf);
		free(cl[i].src);
		free(cl[i].dst);
		for (int r = 0; r < RECENT; r++)
			free(cl[i].tokens[r]);
	}
	pthread_join(pinger, NULL);
	qsort(pings, npings, sizeof(double), cmp_double);

	printf("kvstashd host backend, Llama-3-8B-like layout (32 layers, 8x128 bf16, block 16),\n"
	       "%d client(s), %d chunk(s) of 32 MiB per request, %d transfer worker(s), %.0f s/phase\n",
	       opt.clients, opt.chunks, opt.workers, opt.seconds);
	printf("  %-26s %8.2f GB/s\n", "memcpy (same run)", memcpy_rate);
	printf("  %-26s %8.2f GB/s   ratio %.2f\n", "STORE  (paged -> pool)", gb[1], gb[1] / memcpy_rate);
	printf("  %-26s %8.2f GB/s   ratio %.2f\n", "RETRIEVE (pool -> paged)", gb[2],
	       gb[2] / memcpy_rate);
	if (npings)
		printf("  PING under load: %zu pings, p50 %.3f ms, p99 %.3f ms, max %.3f ms\n", npings,
		       pings[npings / 2], pings[npings * 99 / 100], pings[npings - 1]);
	{
		/* The server's side of the heartbeat: what the io loop made a PING wait
		 * (its longest turn) and how long handling one took. The rest of a
		 * round trip is the sockets and waking the threads on both sides. */
		struct server_view v = { 0 };
		kvstash_client *c;

		if (kvstash_connect(opt.endpoint, 5000, &c) == 0) {
			if (kvstash_stats(c, server_stat, &v) == 0 && v.ping_count)
				printf("  server side: longest io loop turn %.3f ms, PING handled in "
				       "%.1f us on average\n", (double)v.io_turn_max_us / 1e3,
				       (double)v.ping_sum_us / (double)v.ping_count);
			kvstash_close(c);
		}
	}
	printf("  failed requests: %" PRIu64 "\n", atomic_load(&failures));
out:
	if (daemon > 0) {
		kill(daemon, SIGTERM);
		waitpid(daemon, NULL, 0);
	}
	return atomic_load(&failures) ? 1 : 0;
}
