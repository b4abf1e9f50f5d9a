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
 * Shapes (--shape):
 *   bulk    the above: a STORE phase, then a RETRIEVE phase (2 clients,
 *           4 chunks per request by default).
 *   mixed   8 clients at once, each looping STORE of a fresh prompt, LOOKUP
 *           of a recent one, RETRIEVE of it, FREE_LOOKUP_LOCKS (1 chunk per
 *           request by default): the host-backend load beside a heartbeat.
 *   tables  a big index and many sessions: --objects (100,000) 4 KiB
 *           objects stored one chunk per prompt, the first --sessions
 *           (65,536) of them under their own request id (each a live hash
 *           session), read locks with a 2 s TTL; then --clients (2)
 *           clients LOOKUP those prompts again under their session ids for
 *           --seconds, so sessions stay live and locks keep expiring. What
 *           counts here is the io loop's longest turn, not GB/s.
 * In every shape a pinger in a process of its own PINGs every 5 ms during
 * the timed phases; the report gives its p50/p99/max next to the server's
 * longest io loop turn in the same window (io_turn_max_recent_us, sampled)
 * and the server's own PING handling time, so a slow heartbeat can be told
 * apart: the io loop's turn, or the sockets and thread wake-ups.
 *
 * Usage: server_bench [--endpoint EP | --workers N] [--shape bulk|mixed|tables]
 *                     [--clients N] [--chunks-per-request N] [--seconds S]
 *                     [--pool-size SIZE] [--objects N] [--sessions N]
 *                     [--daemon-arg ARG]... (up to 8, appended to kvstashd's)
 *                     [--pinger-priority normal|realtime]
 * --pinger-priority realtime runs the pinger's process (and its libzmq I/O
 * thread) at SCHED_FIFO 2 (needs CAP_SYS_NICE): what is left of a round trip
 * is then kvstashd's and the socket's, without the pinger's own waits for a
 * core (the default, normal, is what an engine's heartbeat thread gets).
 * Without --endpoint it starts ../kvstashd (next to this program's folder)
 * on a private ipc:// endpoint with --workers (default 2) and --pool-size
 * (default 3G; 512M for tables, which also gets --read-ttl-s=2).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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
#define PING_PERIOD_US 5000
/* tables: 1 layer of [2, NB, 16, 1, 4] bf16, so an object is 2 x 256 x 8 B = 4 KiB */
#define T_HEAD_SIZE 4
#define T_ROW_BYTES (T_HEAD_SIZE * 2)
#define T_OBJECT_BYTES ((size_t)2 * CHUNK_TOKENS * T_ROW_BYTES)
#define T_MODEL "bench-tables"

enum shape { SHAPE_BULK, SHAPE_MIXED, SHAPE_TABLES };

static struct {
	const char *endpoint;
	enum shape shape;
	int clients, chunks, workers;
	double seconds;
	const char *pool_size;
	long objects, sessions;
	const char *daemon_args[8];	/* --daemon-arg: appended to kvstashd's arguments */
	int ndaemon_args;
	bool pinger_rt;		/* --pinger-priority realtime */
} opt = { NULL, SHAPE_BULK, 0, 0, 2, 8.0, NULL, 100000, 65536, { NULL }, 0, false };

static _Atomic int phase;	/* 0 setup, 1 store / mixed / tables, 2 retrieve, 3 stop */
static _Atomic uint64_t bytes_done[3];
static _Atomic uint64_t mixed_bytes[2];	/* mixed: [0] stored, [1] retrieved */
static _Atomic uint64_t ops_done;
static _Atomic uint64_t failures;

/* Shared with the pinger process (MAP_SHARED before the fork). */
struct pinger_shm {
	_Atomic int go;		/* 1: connect and ping; 2: stop pinging and exit */
	_Atomic int done;
	char endpoint[700];
	_Atomic uint64_t failures;
	size_t n, nwake;
	double rtt_ms[MAX_PINGS];
	/* How late the pinger woke from each sleep between PINGs: the wait for a
	 * core that any wake-up in that process pays, replies included. */
	double wake_late_ms[MAX_PINGS];
};
static struct pinger_shm *pshm;

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

/*
 * mixed: STORE a fresh prompt, LOOKUP (and so lock) a recent one, RETRIEVE
 * it, give the locks back; all clients at once.
 */
static void *mixed_main(void *arg)
{
	struct client *cl = arg;
	char rid[64];

	while (atomic_load(&phase) == 0)
		usleep(1000);
	while (atomic_load(&phase) == 1) {
		uint32_t *tok = cl->tokens[cl->stored % RECENT];
		int64_t chunks = -1;

		for (size_t t = 0; t < cl->ntok; t++)
			tok[t] = (uint32_t)(cl->id << 24) ^ (cl->stored * 7919u) ^ (uint32_t)t;
		snprintf(rid, sizeof(rid), "m%d-%u", cl->id, cl->stored);
		struct kvstash_key k = { .model = "bench-llama3-8b", .world_size = 1, .worker_id = 0,
					 .tokens = tok, .ntokens = cl->ntok, .start = 0,
					 .end = cl->ntok, .request_id = rid };
		if (kvstash_store(cl->c, &k, 100 + cl->id, cl->src, cl->ntok / BLOCK_SIZE)) {
			atomic_fetch_add(&failures, 1);
			continue;
		}
		cl->stored++;
		if (atomic_load(&phase) == 1)
			atomic_fetch_add(&mixed_bytes[0], (uint64_t)opt.chunks * OBJECT_BYTES);
		/* The one before this, stored a round ago (or this one, the first time). */
		k.tokens = cl->tokens[(cl->stored + RECENT - 2) % RECENT];
		if (cl->stored == 1)
			k.tokens = tok;
		if (kvstash_lookup_chunks(cl->c, &k, 1, &chunks) || chunks != opt.chunks) {
			atomic_fetch_add(&failures, 1);
			continue;
		}
		if (kvstash_retrieve(cl->c, &k, 100 + cl->id, cl->dst, cl->ntok / BLOCK_SIZE, 0))
			atomic_fetch_add(&failures, 1);
		else if (atomic_load(&phase) == 1)
			atomic_fetch_add(&mixed_bytes[1], (uint64_t)opt.chunks * OBJECT_BYTES);
		if (kvstash_free_lookup_locks(cl->c, &k, 1) || kvstash_end_session(cl->c, rid))
			atomic_fetch_add(&failures, 1);
		atomic_fetch_add(&ops_done, 4);
	}
	return NULL;
}

/* tables: one client's share of the prompts, [first, end) of --objects. */
struct tables_client {
	int id;
	pthread_t th;
	kvstash_client *c;
	long first, end;
	struct kvstash_host_buffer *buf;	/* shared: registered once, by client 0 */
	int64_t blocks[CHUNK_TOKENS / BLOCK_SIZE];
};

/* Prompt @p: one chunk of tokens no other prompt starts with. */
static void tables_tokens(long p, uint32_t *tok)
{
	for (unsigned t = 0; t < CHUNK_TOKENS; t++)
		tok[t] = (uint32_t)p * 2654435761u ^ (uint32_t)t ^ ((uint32_t)t << 17);
}

static void tables_rid(long p, char *rid, size_t len)
{
	snprintf(rid, len, "t%ld", p);
}

/* Store this client's prompts: the first --sessions under their own request id. */
static void *tables_fill_main(void *arg)
{
	struct tables_client *tc = arg;
	uint32_t tok[CHUNK_TOKENS];
	char rid[32];

	for (long p = tc->first; p < tc->end; p++) {
		tables_tokens(p, tok);
		tables_rid(p, rid, sizeof(rid));
		struct kvstash_key k = { .model = T_MODEL, .world_size = 1, .worker_id = 0,
					 .tokens = tok, .ntokens = CHUNK_TOKENS, .start = 0,
					 .end = CHUNK_TOKENS, .request_id = p < opt.sessions ? rid : "fill" };
		if (kvstash_store(tc->c, &k, 1 + tc->id, tc->blocks, CHUNK_TOKENS / BLOCK_SIZE))
			atomic_fetch_add(&failures, 1);
	}
	return NULL;
}

/* The timed phase: LOOKUP the session prompts again, in turn, under their ids. */
static void *tables_load_main(void *arg)
{
	struct tables_client *tc = arg;
	uint32_t tok[CHUNK_TOKENS];
	char rid[32];
	long nsess = opt.sessions < opt.objects ? opt.sessions : opt.objects;
	long p = tc->id;

	while (atomic_load(&phase) == 0)
		usleep(1000);
	while (atomic_load(&phase) == 1) {
		int64_t chunks = -1;

		tables_tokens(p, tok);
		tables_rid(p, rid, sizeof(rid));
		struct kvstash_key k = { .model = T_MODEL, .world_size = 1, .worker_id = 0,
					 .tokens = tok, .ntokens = CHUNK_TOKENS, .start = 0,
					 .end = CHUNK_TOKENS, .request_id = rid };
		if (kvstash_lookup_chunks(tc->c, &k, 1, &chunks) || chunks != 1)
			atomic_fetch_add(&failures, 1);
		atomic_fetch_add(&ops_done, 1);
		p = (p + opt.clients) % nsess;
	}
	return NULL;
}

struct server_view {
	uint64_t io_turn_max_us, ping_sum_us, ping_count, io_turn_recent_us, sessions, objects,
		 read_locks, expired_read_locks;
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
	else if (!strcmp(name, "io_turn_max_recent_us"))
		v->io_turn_recent_us = value;
	else if (!strcmp(name, "sessions"))
		v->sessions = value;
	else if (!strcmp(name, "objects"))
		v->objects = value;
	else if (!strcmp(name, "read_locks"))
		v->read_locks = value;
	else if (!strcmp(name, "expired_read_locks"))
		v->expired_read_locks = value;
	return 0;
}

static int server_view_get(kvstash_client *c, struct server_view *v)
{
	memset(v, 0, sizeof(*v));
	return kvstash_stats(c, server_stat, v);
}

/*
 * The pinger's process, forked before this one starts any thread: it waits
 * for go, then PINGs every PING_PERIOD_US until told to stop, recording each
 * round trip in the shared page. Its own process, so its wake-ups compete
 * for the CPU as an engine's heartbeat thread would, not inside our threads.
 */
static void pinger_process(void)
{
	kvstash_client *c;

	if (opt.pinger_rt) {
		/* before the client (and its libzmq I/O thread, which inherits it) exists */
		struct sched_param sp = { .sched_priority = 2 };

		if (sched_setscheduler(0, SCHED_FIFO, &sp))
			fprintf(stderr, "server_bench: --pinger-priority realtime: %s\n",
				strerror(errno));
	}
	while (atomic_load(&pshm->go) == 0)
		usleep(1000);
	if (atomic_load(&pshm->go) == 1 && kvstash_connect(pshm->endpoint, 5000, &c) == 0) {
		while (atomic_load(&pshm->go) == 1) {
			double rtt;

			if (kvstash_ping(c, &rtt) == 0) {
				if (pshm->n < MAX_PINGS)
					pshm->rtt_ms[pshm->n++] = rtt;
			} else {
				atomic_fetch_add(&pshm->failures, 1);
			}
			double t0 = now_s(), late;

			usleep(PING_PERIOD_US);
			late = (now_s() - t0) * 1e3 - PING_PERIOD_US / 1e3;
			if (pshm->nwake < MAX_PINGS)
				pshm->wake_late_ms[pshm->nwake++] = late > 0 ? late : 0;
		}
		kvstash_close(c);
	}
	atomic_store(&pshm->done, 1);
	_exit(0);
}

/* Sample the server's recent longest io turn while the timed phases run. */
static void *sampler_main(void *arg)
{
	uint64_t *max_us = arg;
	kvstash_client *c;

	if (kvstash_connect(opt.endpoint, 5000, &c))
		return NULL;
	while (atomic_load(&phase) == 0)
		usleep(1000);
	while (atomic_load(&phase) < 3) {
		struct server_view v;

		if (server_view_get(c, &v) == 0 && v.io_turn_recent_us > *max_us)
			*max_us = v.io_turn_recent_us;
		usleep(500000);
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
	const char *ttl = opt.shape == SHAPE_TABLES ? "--read-ttl-s=2" : "--log-level=warn";
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
		const char *argv[8 + 8] = { exe, listen, workers, pool, "--log-level=warn", ttl };
		int n = 6;

		for (int i = 0; i < opt.ndaemon_args; i++)
			argv[n++] = opt.daemon_args[i];
		argv[n] = NULL;
		execv(exe, (char *const *)argv);
		fprintf(stderr, "server_bench: cannot run %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	return pid;
}

static void print_pings(void)
{
	size_t n = pshm->n;

	qsort(pshm->rtt_ms, n, sizeof(double), cmp_double);
	if (n)
		printf("  PING (own process%s, every %d ms): %zu pings, p50 %.3f ms, p99 %.3f ms, "
		       "max %.3f ms\n", opt.pinger_rt ? " at SCHED_FIFO 2" : "",
		       PING_PERIOD_US / 1000, n, pshm->rtt_ms[n / 2],
		       pshm->rtt_ms[n * 99 / 100], pshm->rtt_ms[n - 1]);
	else
		printf("  PING: no answers\n");
	n = pshm->nwake;
	qsort(pshm->wake_late_ms, n, sizeof(double), cmp_double);
	if (n)
		printf("  the pinger's own wake-up after a sleep, late by: p50 %.3f ms, p99 %.3f ms, "
		       "max %.3f ms (the client side's share)\n", pshm->wake_late_ms[n / 2],
		       pshm->wake_late_ms[n * 99 / 100], pshm->wake_late_ms[n - 1]);
}

/* The server's side: its io loop turns and how long a PING took inside it. */
static void print_server(uint64_t window_turn_us)
{
	struct server_view v;
	kvstash_client *c;

	if (kvstash_connect(opt.endpoint, 5000, &c))
		return;
	if (server_view_get(c, &v) == 0 && v.ping_count) {
		printf("  server side: longest io loop turn %.3f ms in the timed phases (%.3f ms "
		       "since start), PING handled in %.1f us on average\n",
		       (double)window_turn_us / 1e3, (double)v.io_turn_max_us / 1e3,
		       (double)v.ping_sum_us / (double)v.ping_count);
		if (opt.shape == SHAPE_TABLES)
			printf("  server tables at the end: %" PRIu64 " objects, %" PRIu64
			       " sessions, %" PRIu64 " read locks held, %" PRIu64
			       " read locks expired so far\n", v.objects, v.sessions, v.read_locks,
			       v.expired_read_locks);
	}
	kvstash_close(c);
}

/* bulk and mixed: clients with 32 MiB-chunk buffers. */
static int run_transfers(void)
{
	static struct client cl[MAX_CLIENTS];
	double gb[3] = { 0 }, memcpy_rate, t_mixed = 0;
	pthread_t sampler;
	uint64_t window_turn_us = 0;
	int nphases = opt.shape == SHAPE_BULK ? 2 : 1;

	memcpy_rate = memcpy_gbps(opt.workers);
	for (int i = 0; i < opt.clients; i++) {
		memset(&cl[i], 0, sizeof(cl[i]));
		cl[i].id = i;
		if (client_setup(&cl[i])) {
			fprintf(stderr, "server_bench: client %d setup failed: %s\n", i,
				kvstash_last_error());
			return -1;
		}
		pthread_create(&cl[i].th, NULL, opt.shape == SHAPE_BULK ? client_main : mixed_main,
			       &cl[i]);
	}
	pthread_create(&sampler, NULL, sampler_main, &window_turn_us);
	atomic_store(&pshm->go, 1);
	for (int p = 1; p <= nphases; p++) {
		double t0 = now_s();

		atomic_store(&phase, p);
		usleep((useconds_t)(opt.seconds * 1e6));
		gb[p] = (double)atomic_load(&bytes_done[p]) / (now_s() - t0) / 1e9;
		t_mixed = now_s() - t0;
	}
	atomic_store(&pshm->go, 2);
	atomic_store(&phase, 3);
	pthread_join(sampler, NULL);
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
	while (!atomic_load(&pshm->done))
		usleep(1000);

	printf("kvstashd host backend, Llama-3-8B-like layout (32 layers, 8x128 bf16, block 16),\n"
	       "shape %s: %d client(s), %d chunk(s) of 32 MiB per request, %d transfer worker(s), "
	       "%.0f s/phase\n", opt.shape == SHAPE_BULK ? "bulk" : "mixed", opt.clients,
	       opt.chunks, opt.workers, opt.seconds);
	printf("  %-26s %8.2f GB/s\n", "memcpy (same run)", memcpy_rate);
	if (opt.shape == SHAPE_BULK) {
		printf("  %-26s %8.2f GB/s   ratio %.2f\n", "STORE  (paged -> pool)", gb[1],
		       gb[1] / memcpy_rate);
		printf("  %-26s %8.2f GB/s   ratio %.2f\n", "RETRIEVE (pool -> paged)", gb[2],
		       gb[2] / memcpy_rate);
	} else {
		double st = (double)atomic_load(&mixed_bytes[0]) / t_mixed / 1e9;
		double rt = (double)atomic_load(&mixed_bytes[1]) / t_mixed / 1e9;

		printf("  %-26s %8.2f GB/s\n", "STORE  (paged -> pool)", st);
		printf("  %-26s %8.2f GB/s\n", "RETRIEVE (pool -> paged)", rt);
		printf("  %-26s %8.2f GB/s   ratio %.2f   (%.0f requests/s)\n", "both", st + rt,
		       (st + rt) / memcpy_rate, (double)atomic_load(&ops_done) / t_mixed);
	}
	print_pings();
	print_server(window_turn_us);
	return 0;
}

/* tables: --objects 4 KiB objects, --sessions live sessions, lookups keep them busy. */
static int run_tables(void)
{
	static struct tables_client tc[MAX_CLIENTS];
	struct kvstash_host_buffer buf;
	struct kvstash_kv_layout lay = { .layout = KVSTASH_LAYOUT_FLASH_ATTN, .dtype = "bfloat16",
					 .ndim = 5,
					 .shape = { 2, CHUNK_TOKENS / BLOCK_SIZE, BLOCK_SIZE, 1,
						    T_HEAD_SIZE } };
	struct kvstash_host_layer layer;
	pthread_t sampler;
	uint64_t window_turn_us = 0;
	double t0, t_fill;
	long per;

	if (kvstash_host_buffer_create(&buf, 2 * CHUNK_TOKENS * (size_t)T_ROW_BYTES,
				       "server-bench-tables"))
		return -1;
	memset(buf.ptr, 0x5a, buf.bytes);
	layer = (struct kvstash_host_layer){ buf.path, 0, buf.bytes };
	per = (opt.objects + opt.clients - 1) / opt.clients;
	for (int i = 0; i < opt.clients; i++) {
		tc[i].id = i;
		tc[i].first = i * per;
		tc[i].end = (i + 1) * per < opt.objects ? (i + 1) * per : opt.objects;
		for (int b = 0; b < CHUNK_TOKENS / BLOCK_SIZE; b++)
			tc[i].blocks[b] = b;
		if (kvstash_connect(opt.endpoint, 60000, &tc[i].c) ||
		    kvstash_register_host(tc[i].c, 1 + i, T_MODEL, 1, &lay, &layer, 1)) {
			fprintf(stderr, "server_bench: tables client %d: %s\n", i, kvstash_last_error());
			return -1;
		}
	}
	t0 = now_s();
	for (int i = 0; i < opt.clients; i++)
		pthread_create(&tc[i].th, NULL, tables_fill_main, &tc[i]);
	for (int i = 0; i < opt.clients; i++)
		pthread_join(tc[i].th, NULL);
	t_fill = now_s() - t0;
	for (int i = 0; i < opt.clients; i++)
		pthread_create(&tc[i].th, NULL, tables_load_main, &tc[i]);
	pthread_create(&sampler, NULL, sampler_main, &window_turn_us);
	atomic_store(&pshm->go, 1);
	atomic_store(&phase, 1);
	t0 = now_s();
	usleep((useconds_t)(opt.seconds * 1e6));
	atomic_store(&pshm->go, 2);
	atomic_store(&phase, 3);
	t0 = now_s() - t0;
	pthread_join(sampler, NULL);
	for (int i = 0; i < opt.clients; i++)
		pthread_join(tc[i].th, NULL);
	while (!atomic_load(&pshm->done))
		usleep(1000);
	printf("kvstashd host backend, shape tables: %ld objects of 4 KiB (stored in %.1f s), "
	       "%ld sessions, read-lock TTL 2 s,\n%d client(s) LOOKUP-ing under their session "
	       "ids for %.0f s (%.0f LOOKUPs/s), %d transfer worker(s)\n", opt.objects, t_fill,
	       opt.sessions, opt.clients, opt.seconds, (double)atomic_load(&ops_done) / t0,
	       opt.workers);
	print_pings();
	print_server(window_turn_us);
	for (int i = 0; i < opt.clients; i++) {
		kvstash_unregister(tc[i].c, 1 + i);
		kvstash_close(tc[i].c);
	}
	kvstash_host_buffer_destroy(&buf);
	return 0;
}

static void usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [--endpoint EP | --workers N] [--shape bulk|mixed|tables] "
		"[--clients N] [--chunks-per-request N] [--seconds S] [--pool-size SIZE] "
		"[--objects N] [--sessions N] [--daemon-arg ARG]... "
		"[--pinger-priority normal|realtime]\n", argv0);
}

int main(int argc, char **argv)
{
	static char endpoint[700];
	pid_t daemon = 0, pinger;
	int rc = 1;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(a, "--endpoint") && v)
			opt.endpoint = v, i++;
		else if (!strcmp(a, "--shape") && v && !strcmp(v, "bulk"))
			opt.shape = SHAPE_BULK, i++;
		else if (!strcmp(a, "--shape") && v && !strcmp(v, "mixed"))
			opt.shape = SHAPE_MIXED, i++;
		else if (!strcmp(a, "--shape") && v && !strcmp(v, "tables"))
			opt.shape = SHAPE_TABLES, i++;
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
		else if (!strcmp(a, "--objects") && v)
			opt.objects = atol(v), i++;
		else if (!strcmp(a, "--sessions") && v)
			opt.sessions = atol(v), i++;
		else if (!strcmp(a, "--daemon-arg") && v && opt.ndaemon_args < 8)
			opt.daemon_args[opt.ndaemon_args++] = v, i++;
		else if (!strcmp(a, "--pinger-priority") && v &&
			 (!strcmp(v, "normal") || !strcmp(v, "realtime")))
			opt.pinger_rt = !strcmp(v, "realtime"), i++;
		else {
			usage(argv[0]);
			return 2;
		}
	}
	if (!opt.clients)
		opt.clients = opt.shape == SHAPE_MIXED ? 8 : 2;
	if (!opt.chunks)
		opt.chunks = opt.shape == SHAPE_BULK ? 4 : 1;
	if (!opt.pool_size)
		opt.pool_size = opt.shape == SHAPE_TABLES ? "512M" : "3G";
	if (opt.clients < 1 || opt.clients > MAX_CLIENTS || opt.chunks < 1 || opt.seconds <= 0 ||
	    opt.workers < 1 || opt.workers > MAX_CLIENTS || opt.objects < 1 || opt.sessions < 0) {
		fprintf(stderr, "server_bench: bad arguments\n");
		usage(argv[0]);
		return 2;
	}
	/* The pinger first, while this process has no thread and no ZMQ context. */
	pshm = mmap(NULL, sizeof(*pshm), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (pshm == MAP_FAILED) {
		perror("server_bench: mmap");
		return 1;
	}
	pinger = fork();
	if (pinger < 0) {
		perror("server_bench: fork");
		return 1;
	}
	if (pinger == 0)
		pinger_process();
	if (!opt.endpoint) {
		daemon = spawn_daemon(argv[0], endpoint, sizeof(endpoint));
		if (daemon < 0)
			goto out;
		opt.endpoint = endpoint;
	}
	snprintf(pshm->endpoint, sizeof(pshm->endpoint), "%s", opt.endpoint);
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
	rc = opt.shape == SHAPE_TABLES ? run_tables() : run_transfers();
	printf("  failed requests: %" PRIu64 ", failed PINGs: %" PRIu64 "\n",
	       atomic_load(&failures), atomic_load(&pshm->failures));
	if (atomic_load(&failures) || atomic_load(&pshm->failures))
		rc = 1;
out:
	atomic_store(&pshm->go, 2);
	waitpid(pinger, NULL, 0);
	if (daemon > 0) {
		kill(daemon, SIGTERM);
		waitpid(daemon, NULL, 0);
	}
	return rc ? 1 : 0;
}
