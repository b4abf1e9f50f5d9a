/*
 * gpu_server_bench.c - STORE / RETRIEVE GB/s through a real kvstashd on a
 * GPU (CUDA IPC registration, IPC events, the server's transfer workers),
 * next to plain pinned cudaMemcpy measured in the same run.
 *
 * Layout: Llama-3-8B-like, 32 layers of flash_attn [2, NB, 16, 8, 128] bf16
 * in one device allocation per client; chunks of 256 tokens (32 MiB objects).
 * For each request size it times STORE of fresh prompts, RETRIEVE of stored
 * ones (one client, one request in flight: every request's fixed cost is
 * exposed; GB/s over the time inside the STORE/RETRIEVE calls, the
 * END_SESSION each STORE is followed by is timed apart), the same with two clients at once (two requests in flight, as
 * an engine's tensor-parallel workers or overlapping requests give: one
 * request's fixed cost hides behind the other's copy), and STORE and
 * RETRIEVE at the same time, so both PCIe directions are busy. Two clients
 * RETRIEVing write the same target blocks of their own allocations; no data
 * is checked here (tests/test_cuda_server does that).
 *
 * A second table splits each request's time, as the client saw it, into
 * the server's phases (KS_STATS store_*_us / retrieve_*_us, summed over the
 * same requests): accept (io thread: decode, hash, validate), queue,
 * prepare (reserve / pin), copy, finish (commit / unpin), reply (completion
 * hop to the io thread and the reply). What is left is the client side and
 * the socket.
 *
 * Usage: gpu_server_bench [--tokens N[,N...]] [--seconds S] [--pool-size SIZE]
 *                         [--daemon-arg ARG]... (up to 8, appended to kvstashd's,
 *                         e.g. --daemon-arg --busy-poll=off)
 * It starts ../kvstashd (next to this program's folder) on a private ipc://
 * endpoint. Without a GPU (or built without CUDA) it says so and exits 77.
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
#include "phase_stats.h"

#ifndef KVSTASH_HAVE_CUDA
int main(void)
{
	fprintf(stderr, "gpu_server_bench: built without CUDA\n");
	return 77;
}
#else
#include <cuda_runtime.h>

#define NL 32
#define BS 16
#define NH 8
#define HS 128
#define ROW (NH * HS * 2)
#define C 256
#define OBJ ((double)2 * NL * C * ROW)
#define MAX_TOKENS 16384
#define NB (2 * MAX_TOKENS / BS)	/* room for a source and a target range */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char uuid[48];
static const char *endpoint;

struct cl {
	int id;
	kvstash_client *c;
	void *dev;
	uint32_t *tok[4];	/* the last stored prompts, for RETRIEVE */
	unsigned stored;
	int64_t src[MAX_TOKENS / BS], dst[MAX_TOKENS / BS];
};

static int cl_setup(struct cl *k)
{
	size_t layer = (size_t)2 * NB * BS * ROW;
	struct kvstash_kv_layout lay = { .layout = KVSTASH_LAYOUT_FLASH_ATTN, .dtype = "bfloat16",
					 .ndim = 5, .shape = { 2, NB, BS, NH, HS } };
	struct kvstash_cuda_layer layers[NL];
	cudaIpcMemHandle_t h;

	if (kvstash_connect(endpoint, 120000, &k->c) || cudaMalloc(&k->dev, layer * NL) ||
	    cudaMemset(k->dev, k->id + 1, layer * NL) || cudaIpcGetMemHandle(&h, k->dev))
		return -1;
	for (int l = 0; l < NL; l++) {
		memcpy(layers[l].mem_handle, &h, 64);
		layers[l].offset = (uint64_t)l * layer;
		layers[l].nbytes = layer * NL;
	}
	if (kvstash_register_cuda(k->c, 10 + k->id, "bench-gpu", 1, &lay, uuid, layers, NL)) {
		fprintf(stderr, "register: %s\n", kvstash_last_error());
		return -1;
	}
	for (int b = 0; b < MAX_TOKENS / BS; b++) {
		k->src[b] = (int64_t)((b * 7919) % (NB / 2)) * 2;	/* shuffled even blocks */
		k->dst[b] = (int64_t)((b * 104729) % (NB / 2)) * 2 + 1;	/* shuffled odd blocks */
	}
	for (int i = 0; i < 4; i++)
		if (!(k->tok[i] = malloc(MAX_TOKENS * sizeof(uint32_t))))
			return -1;
	return 0;
}

/*
 * STORE a fresh prompt, then END_SESSION its request id (an engine sends
 * that once a request finishes, not as part of the STORE): *@op_s gets the
 * STORE's own time, *@end_s the END_SESSION's.
 */
static int do_store(struct cl *k, uint32_t ntok, double *op_s, double *end_s)
{
	uint32_t *t = k->tok[k->stored % 4];

	for (uint32_t i = 0; i < ntok; i++)
		t[i] = (uint32_t)k->id << 28 ^ k->stored << 14 ^ i;
	struct kvstash_key key = { .model = "bench-gpu", .world_size = 1, .worker_id = 0,
				   .tokens = t, .ntokens = ntok, .start = 0, .end = ntok,
				   .request_id = "b" };
	double t0 = now_s();
	int rc = kvstash_store_event(k->c, &key, 10 + k->id, k->src, ntok / BS, NULL, NULL);
	double t1 = now_s();

	if (!rc)
		k->stored++;
	kvstash_end_session(k->c, "b");
	*op_s += t1 - t0;
	*end_s += now_s() - t1;
	return rc;
}

static int do_retrieve(struct cl *k, uint32_t ntok, unsigned i, double *op_s)
{
	/* The last 2 prompts: two clients' fit the pool at 16384 tokens (4 x 2 GiB). */
	unsigned n = k->stored < 2 ? k->stored : 2;
	struct kvstash_key key = { .model = "bench-gpu", .world_size = 1, .worker_id = 0,
				   .tokens = k->tok[(k->stored - 1 - i % n) % 4], .ntokens = ntok,
				   .start = 0, .end = ntok, .request_id = "r" };

	double t0 = now_s();
	int rc = kvstash_retrieve_event(k->c, &key, 10 + k->id, k->dst, ntok / BS, 0, NULL, NULL);

	*op_s += now_s() - t0;
	return rc;
}

struct phase_arg {
	struct cl *k;
	uint32_t ntok;
	int op;		/* 0 store, 1 retrieve */
	double seconds, bytes;
	int errors;
	unsigned requests;
	double op_s, end_s;	/* time inside the STORE/RETRIEVE calls; in END_SESSION */
};

static void phase_snapshot(struct cl *k, struct phase_sums *ps)
{
	memset(ps, 0, sizeof(*ps));
	if (kvstash_stats(k->c, phase_stat, ps))
		fprintf(stderr, "gpu_server_bench: KS_STATS: %s\n", kvstash_last_error());
}

static void *phase_main(void *p)
{
	struct phase_arg *a = p;
	double t0 = now_s();

	for (unsigned i = 0; now_s() - t0 < a->seconds; i++) {
		int rc = a->op ? do_retrieve(a->k, a->ntok, i, &a->op_s) :
				 do_store(a->k, a->ntok, &a->op_s, &a->end_s);

		if (rc)
			a->errors++;
		else
			a->bytes += (double)a->ntok / C * OBJ;
		a->requests++;
	}
	a->seconds = now_s() - t0;
	return NULL;
}

/* Run two phases at once on two threads; their combined GB/s over the longer one's time. */
static double run_two(struct phase_arg a[2])
{
	pthread_t th[2];
	double wall;

	for (int i = 0; i < 2; i++)	/* RETRIEVE needs something stored by each client */
		if (a[i].op && a[i].k->stored == 0)
			do_store(a[i].k, a[i].ntok, &a[i].op_s, &a[i].end_s);
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, phase_main, &a[i]);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	wall = a[0].seconds > a[1].seconds ? a[0].seconds : a[1].seconds;
	return (a[0].bytes + a[1].bytes) / wall / 1e9;
}

static double memcpy_gbps(enum cudaMemcpyKind kind, size_t bytes)
{
	void *h, *d;
	cudaEvent_t a, b;
	float ms = 0;

	if (cudaMallocHost(&h, bytes) || cudaMalloc(&d, bytes))
		return 0;
	memset(h, 1, bytes);
	cudaEventCreate(&a);
	cudaEventCreate(&b);
	for (int warm = 0; warm < 2; warm++)
		cudaMemcpy(kind == cudaMemcpyHostToDevice ? d : h, kind == cudaMemcpyHostToDevice ? h : d,
			   bytes, kind);
	cudaEventRecord(a, 0);
	for (int i = 0; i < 5; i++)
		cudaMemcpyAsync(kind == cudaMemcpyHostToDevice ? d : h,
				kind == cudaMemcpyHostToDevice ? h : d, bytes, kind, 0);
	cudaEventRecord(b, 0);
	cudaEventSynchronize(b);
	cudaEventElapsedTime(&ms, a, b);
	cudaFreeHost(h);
	cudaFree(d);
	return 5.0 * (double)bytes / (ms / 1e3) / 1e9;
}

int main(int argc, char **argv)
{
	uint32_t sizes[8] = { 256, 4096, 16384 };
	int nsizes = 3;
	double seconds = 3;
	const char *pool = "16G";
	static char ep[600];
	char dir[] = "/tmp/kvstash-gbench-XXXXXX", exe[1024];
	struct cudaDeviceProp prop;
	int n = 0;
	pid_t pid;

	const char *daemon_args[8];
	int ndaemon_args = 0;

	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--daemon-arg") && ndaemon_args < 8)
			daemon_args[ndaemon_args++] = argv[i + 1];
		else if (!strcmp(argv[i], "--seconds"))
			seconds = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--pool-size"))
			pool = argv[i + 1];
		else if (!strcmp(argv[i], "--tokens")) {
			nsizes = 0;
			for (char *t = strtok(argv[i + 1], ","); t && nsizes < 8; t = strtok(NULL, ","))
				sizes[nsizes++] = (uint32_t)atoi(t);
		}
	}
	for (int i = 0; i < nsizes; i++)
		if (sizes[i] == 0 || sizes[i] % C || sizes[i] > MAX_TOKENS) {
			fprintf(stderr, "--tokens: multiples of %d up to %d\n", C, MAX_TOKENS);
			return 2;
		}
	/* The daemon first: a fork after CUDA is initialised is not allowed. */
	if (!mkdtemp(dir))
		return 1;
	snprintf(ep, sizeof(ep), "ipc://%s/sock", dir);
	const char *slash = strrchr(argv[0], '/');
	snprintf(exe, sizeof(exe), "%.*s/../kvstashd", slash ? (int)(slash - argv[0]) : 1,
		 slash ? argv[0] : ".");
	pid = fork();
	if (pid == 0) {
		char l[700], p[64];

		const char *av[6 + 8 + 1] = { exe, l, p, "--workers=2", "--http-port=0",
					      "--log-level=warn" };
		int ac = 6;

		snprintf(l, sizeof(l), "--listen=%s", ep);
		snprintf(p, sizeof(p), "--pool-size=%s", pool);
		for (int i = 0; i < ndaemon_args; i++)
			av[ac++] = daemon_args[i];
		av[ac] = NULL;
		execv(exe, (char *const *)av);
		_exit(127);
	}
	endpoint = ep;
	if (cudaGetDeviceCount(&n) || !n || cudaGetDeviceProperties(&prop, 0)) {
		fprintf(stderr, "gpu_server_bench: no CUDA device\n");
		kill(pid, SIGTERM);
		return 77;
	}
	const unsigned char *u = (const unsigned char *)prop.uuid.bytes;
	snprintf(uuid, sizeof(uuid), "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
		 u[14], u[15]);
	/* Wait for the daemon (pinning the pool takes a while). */
	kvstash_client *probe;
	double rtt = -1;
	kvstash_connect(ep, 500, &probe);
	for (int i = 0; i < 120 && kvstash_ping(probe, &rtt); i++)
		;
	kvstash_close(probe);
	if (rtt < 0) {
		fprintf(stderr, "gpu_server_bench: kvstashd did not start\n");
		kill(pid, SIGTERM);
		return 1;
	}
	struct cl k[2] = { { .id = 0 }, { .id = 1 } };
	if (cl_setup(&k[0]) || cl_setup(&k[1])) {
		fprintf(stderr, "gpu_server_bench: setup failed: %s\n", kvstash_last_error());
		kill(pid, SIGTERM);
		return 1;
	}
	double d2h = memcpy_gbps(cudaMemcpyDeviceToHost, 512u << 20);
	double h2d = memcpy_gbps(cudaMemcpyHostToDevice, 512u << 20);

	printf("kvstashd end to end on %s: Llama-3-8B-like (32 layers, 8x128 bf16, block 16),\n"
	       "CUDA IPC registration, 2 transfer workers, %.0f s per cell\n", prop.name, seconds);
	printf("contiguous pinned cudaMemcpy: D2H %.1f GB/s, H2D %.1f GB/s\n", d2h, h2d);
	printf("%8s %14s %16s %16s %16s %12s %7s\n", "", "1 in flight", "", "2 in flight", "",
	       "both ways", "");
	printf("%8s %14s %16s %16s %16s %12s %7s\n", "tokens", "STORE GB/s", "RETRIEVE GB/s",
	       "STORE GB/s", "RETRIEVE GB/s", "STORE+RETR", "errors");
	/* Per size and op: ms per request seen by the client, then the server's phases. */
	double split[8][2][1 + NPHASES] = { { { 0 } } }, end_ms[8] = { 0 };
	for (int si = 0; si < nsizes; si++) {
		struct phase_sums p0, p1;

		struct phase_arg st = { &k[0], sizes[si], 0, seconds, 0, 0 };
		struct phase_arg rt = { &k[0], sizes[si], 1, seconds, 0, 0 };
		struct phase_arg both[2] = { { &k[1], sizes[si], 0, seconds, 0, 0 },
					     { &k[0], sizes[si], 1, seconds, 0, 0 } };
		struct phase_arg st2[2] = { { &k[0], sizes[si], 0, seconds, 0, 0 },
					    { &k[1], sizes[si], 0, seconds, 0, 0 } };
		struct phase_arg rt2[2] = { { &k[0], sizes[si], 1, seconds, 0, 0 },
					    { &k[1], sizes[si], 1, seconds, 0, 0 } };

		phase_snapshot(&k[0], &p0);
		phase_main(&st);
		phase_main(&rt);
		phase_snapshot(&k[0], &p1);
		for (int op = 0; op < 2; op++) {
			const struct phase_arg *pa = op ? &rt : &st;
			double timed = (double)(p1.timed[op] - p0.timed[op]);

			split[si][op][0] = pa->requests ? pa->op_s * 1e3 / pa->requests : 0;
			if (!op)
				end_ms[si] = pa->requests ? pa->end_s * 1e3 / pa->requests : 0;
			for (int p = 0; p < NPHASES && timed > 0; p++)
				split[si][op][1 + p] = (double)(p1.us[op][p] - p0.us[op][p]) / timed / 1e3;
		}
		/* one in flight: over the requests' own time (END_SESSION excluded) */
		double sg = st.bytes / st.op_s / 1e9, rg = rt.bytes / rt.op_s / 1e9;
		double s2 = run_two(st2), r2 = run_two(rt2), bg = run_two(both);
		printf("%8u %8.1f (%.2fx) %10.1f (%.2fx) %10.1f (%.2fx) %10.1f (%.2fx) %12.1f %7d\n",
		       sizes[si], sg, sg / d2h, rg, rg / h2d, s2, s2 / d2h, r2, r2 / h2d, bg,
		       st.errors + rt.errors + st2[0].errors + st2[1].errors + rt2[0].errors +
		       rt2[1].errors + both[0].errors + both[1].errors);
	}
	printf("\nms per request (one client, synchronous): as the client saw it, then the server's "
	       "phases\n%8s %-8s %8s", "tokens", "op", "client");
	for (int p = 0; p < NPHASES; p++)
		printf(" %8s", phase_name[p]);
	printf(" %8s\n", "other");
	for (int si = 0; si < nsizes; si++)
		for (int op = 0; op < 2; op++) {
			double rest = split[si][op][0];

			printf("%8u %-8s %8.3f", sizes[si], op ? "RETRIEVE" : "STORE", split[si][op][0]);
			for (int p = 0; p < NPHASES; p++) {
				printf(" %8.3f", split[si][op][1 + p]);
				rest -= split[si][op][1 + p];
			}
			printf(" %8.3f\n", rest);
		}
	printf("END_SESSION after each STORE (not in the STORE figures above; an engine sends it\n"
	       "when a request finishes), ms:");
	for (int si = 0; si < nsizes; si++)
		printf(" %u tokens %.3f%s", sizes[si], end_ms[si], si + 1 < nsizes ? "," : "\n");
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
	return 0;
}
#endif
