/*
 * request_bench.c - the fixed cost of a STORE/RETRIEVE through kvstashd
 * with the copy taken out: a host registration of a tiny layout (one layer
 * of flash_attn [2, NB, 16, 1, 8] bf16: 32 bytes per token and plane), so
 * what a request costs is decoding, hashing, queueing, the reply and the
 * socket, not moving KV.
 *
 * For each request size it STOREs fresh prompts (each followed by an
 * untimed END_SESSION) and RETRIEVEs them, one request in flight, and prints
 * the client's time per request next to the server's phases over the same
 * requests (KS_STATS store_*_us / retrieve_*_us: accept, queue, prepare,
 * copy, finish, reply); "other" is the rest: the client's encoding and wait,
 * the request's and the reply's way through libzmq and the socket. That is
 * the part that grows with the token count here (the token ids' msgpack
 * bytes, up to 5 per token, cross the socket).
 *
 * Usage: request_bench [--endpoint EP] [--tokens N[,N...]] [--requests N]
 * Without --endpoint it starts ../kvstashd (next to this program's folder)
 * on a private ipc:// endpoint.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvstash.h"
#include "phase_stats.h"

#define BLOCK 16
#define CHUNK 256
#define MAX_TOKENS 16384
#define NB (2 * MAX_TOKENS / BLOCK)	/* a source and a target range */
#define INSTANCE 7

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Start ../kvstashd on a private endpoint; its pid, or -1. */
static pid_t start_daemon(const char *argv0, char *ep, size_t eplen)
{
	static char dir[] = "/tmp/kvstash-rbench-XXXXXX";
	char exe[1024], listen[700];
	const char *slash = strrchr(argv0, '/');
	pid_t pid;

	if (!mkdtemp(dir))
		return -1;
	snprintf(ep, eplen, "ipc://%s/sock", dir);
	snprintf(exe, sizeof(exe), "%.*s/../kvstashd", slash ? (int)(slash - argv0) : 1,
		 slash ? argv0 : ".");
	snprintf(listen, sizeof(listen), "--listen=%s", ep);
	pid = fork();
	if (pid == 0) {
		execl(exe, exe, listen, "--pool-size=1G", "--http-port=0", "--log-level=warn",
		      (char *)NULL);
		_exit(127);
	}
	return pid;
}

int main(int argc, char **argv)
{
	uint32_t sizes[8] = { 256, 4096, 16384 };
	int nsizes = 3, requests = 300, rc = 1;
	const char *endpoint = NULL;
	static char ep[700];
	pid_t daemon = 0;

	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--endpoint")) {
			endpoint = argv[i + 1];
		} else if (!strcmp(argv[i], "--requests")) {
			requests = atoi(argv[i + 1]);
		} else if (!strcmp(argv[i], "--tokens")) {
			nsizes = 0;
			for (char *t = strtok(argv[i + 1], ","); t && nsizes < 8; t = strtok(NULL, ","))
				sizes[nsizes++] = (uint32_t)atoi(t);
		} else {
			fprintf(stderr, "usage: %s [--endpoint EP] [--tokens N[,N...]] "
				"[--requests N]\n", argv[0]);
			return 2;
		}
	}
	for (int i = 0; i < nsizes; i++)
		if (!sizes[i] || sizes[i] % CHUNK || sizes[i] > MAX_TOKENS) {
			fprintf(stderr, "request_bench: --tokens: multiples of %d up to %d\n", CHUNK,
				MAX_TOKENS);
			return 2;
		}
	if (requests < 1) {
		fprintf(stderr, "request_bench: --requests must be at least 1\n");
		return 2;
	}
	if (!endpoint) {
		daemon = start_daemon(argv[0], ep, sizeof(ep));
		if (daemon < 0) {
			perror("request_bench: starting kvstashd");
			return 1;
		}
		endpoint = ep;
	}

	kvstash_client *c = NULL;
	struct kvstash_host_buffer buf = { 0 };
	const size_t layer_bytes = (size_t)2 * NB * BLOCK * 8 * 2;
	struct kvstash_kv_layout lay = { .layout = KVSTASH_LAYOUT_FLASH_ATTN, .dtype = "bfloat16",
					 .ndim = 5, .shape = { 2, NB, BLOCK, 1, 8 } };
	static int64_t src[MAX_TOKENS / BLOCK], dst[MAX_TOKENS / BLOCK];
	static uint32_t tok[MAX_TOKENS];
	double rtt = -1;

	if (kvstash_connect(endpoint, 5000, &c)) {
		fprintf(stderr, "request_bench: %s\n", kvstash_last_error());
		goto out;
	}
	for (int i = 0; i < 100 && kvstash_ping(c, &rtt); i++)
		usleep(50000);
	if (rtt < 0 || kvstash_host_buffer_create(&buf, layer_bytes, "request_bench")) {
		fprintf(stderr, "request_bench: no kvstashd at %s, or no buffer\n", endpoint);
		goto out;
	}
	struct kvstash_host_layer layer = { .path = buf.path, .offset = 0, .nbytes = buf.bytes };

	if (kvstash_register_host(c, INSTANCE, "request-bench", 1, &lay, &layer, 1)) {
		fprintf(stderr, "request_bench: register: %s\n", kvstash_last_error());
		goto out;
	}
	for (int b = 0; b < MAX_TOKENS / BLOCK; b++) {
		src[b] = 2 * b;
		dst[b] = 2 * b + 1;
	}
	printf("kvstashd at %s, host backend, 1-layer 8-wide bf16 layout (the copy taken out),\n"
	       "%d requests per size and op, one in flight; ms per request\n", endpoint, requests);
	printf("%8s %-8s %8s", "tokens", "op", "client");
	for (int p = 0; p < NPHASES; p++)
		printf(" %8s", phase_name[p]);
	printf(" %8s\n", "other");
	for (int si = 0; si < nsizes; si++) {
		const uint32_t n = sizes[si];
		struct phase_sums p0 = { 0 }, p1 = { 0 };
		double op_s[2] = { 0, 0 };
		char rid[32];

		if (kvstash_stats(c, phase_stat, &p0))
			goto fail;
		for (int r = 0; r < requests; r++) {
			for (uint32_t t = 0; t < n; t++)
				tok[t] = (uint32_t)(si * requests + r) << 17 ^ (t * 2654435761u) % 128000;
			snprintf(rid, sizeof(rid), "rb-%d-%d", si, r);
			struct kvstash_key key = { .model = "request-bench", .world_size = 1,
						   .worker_id = 0, .tokens = tok, .ntokens = n,
						   .start = 0, .end = n, .request_id = rid };
			double t0 = now_s();

			if (kvstash_store(c, &key, INSTANCE, src, n / BLOCK))
				goto fail;
			double t1 = now_s();

			if (kvstash_retrieve(c, &key, INSTANCE, dst, n / BLOCK, 0))
				goto fail;
			op_s[0] += t1 - t0;
			op_s[1] += now_s() - t1;
			kvstash_end_session(c, rid);
		}
		if (kvstash_stats(c, phase_stat, &p1))
			goto fail;
		for (int op = 0; op < 2; op++) {
			double timed = (double)(p1.timed[op] - p0.timed[op]);
			double client = op_s[op] * 1e3 / requests, rest = client;

			printf("%8u %-8s %8.3f", n, op ? "RETRIEVE" : "STORE", client);
			for (int p = 0; p < NPHASES; p++) {
				double v = timed > 0 ? (double)(p1.us[op][p] - p0.us[op][p]) / timed / 1e3
						     : 0;

				printf(" %8.3f", v);
				rest -= v;
			}
			printf(" %8.3f\n", rest);
		}
	}
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "request_bench: %s\n", kvstash_last_error());
out:
	if (c)
		kvstash_close(c);
	if (buf.ptr)
		kvstash_host_buffer_destroy(&buf);
	if (daemon > 0) {
		kill(daemon, SIGTERM);
		waitpid(daemon, NULL, 0);
	}
	return rc;
}
