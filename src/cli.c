/*
 * cli.c - the kvstash command-line tool: ping, stats, top, store-test.
 *
 * The only file in src/ that prints with printf: everything else logs.
 */
#include <errno.h>
#include <stdbool.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvstash.h"

#define CLI_DEFAULT_TIMEOUT_MS 5000

struct cli_opts {
	const char *endpoint;
	int timeout_ms;
	int count;
	int interval_ms;
	bool count_set, interval_set;	/* top has its own defaults */
	bool json;
	int chunks;
	int layers;
	const char *layout;
	const char *dtype;
	const char *model;
	int heads, head_size, block_size;
};

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: kvstash COMMAND [OPTIONS]\n"
		"Talk to a running kvstashd.\n\n"
		"Commands:\n"
		"  ping         send PING and print the round-trip time\n"
		"  stats        print the server's counters as a table (--json: one JSON object)\n"
		"  top          refreshing view of request rates, GB/s, evictions and latency,\n"
		"               from consecutive stats snapshots (Ctrl-C stops)\n"
		"  store-test   register a synthetic paged KV buffer, STORE and RETRIEVE\n"
		"               chunks, and verify every byte came back\n\n"
		"Options:\n"
		"  -e, --endpoint=EP     server endpoint (default " KVSTASH_DEFAULT_ENDPOINT
		", or $KVSTASH_ENDPOINT)\n"
		"  -t, --timeout-ms=N    per-request timeout (default %d)\n"
		"  -c, --count=N         ping: number of pings (default 1);\n"
		"                        top: refreshes before exiting (default: until Ctrl-C)\n"
		"  -i, --interval-ms=N   ping: pause between pings (default 100);\n"
		"                        top: refresh interval (default 1000, at least 10)\n"
		"      --json            stats: print the counters as one JSON object\n"
		"      --chunks=N        store-test: chunks to store (default 8)\n"
		"      --layers=N        store-test: layers (default 4)\n"
		"      --layout=L        store-test: flash_attn | flashinfer | mla (default flash_attn)\n"
		"      --dtype=D         store-test: bfloat16 | float16 | float32 | uint8 (default bfloat16)\n"
		"      --heads=N         store-test: KV heads (default 8; MLA ignores it)\n"
		"      --head-size=N     store-test: head size (default 128; MLA: 576)\n"
		"      --block-size=N    store-test: tokens per block (default 16)\n"
		"      --model=NAME      store-test: model name (default kvstash-store-test)\n"
		"  -h, --help            this text\n",
		CLI_DEFAULT_TIMEOUT_MS);
}

static int connect_or_fail(const struct cli_opts *o, kvstash_client **c)
{
	int rc = kvstash_connect(o->endpoint, o->timeout_ms, c);

	if (rc)
		fprintf(stderr, "kvstash: %s\n", kvstash_last_error());
	return rc;
}

static int cmd_ping(const struct cli_opts *o)
{
	kvstash_client *c;
	int failures = 0;

	if (connect_or_fail(o, &c))
		return 1;
	for (int i = 0; i < o->count; i++) {
		double rtt;
		int rc = kvstash_ping(c, &rtt);

		if (rc) {
			printf("ping %s: %s\n", o->endpoint ? o->endpoint : KVSTASH_DEFAULT_ENDPOINT,
			       kvstash_last_error());
			failures++;
		} else {
			printf("pong from %s: time=%.3f ms\n",
			       o->endpoint ? o->endpoint : KVSTASH_DEFAULT_ENDPOINT, rtt);
		}
		fflush(stdout);
		if (i + 1 < o->count)
			usleep((useconds_t)o->interval_ms * 1000);
	}
	kvstash_close(c);
	return failures ? 1 : 0;
}

static int print_stat(const char *name, uint64_t value, void *arg)
{
	(void)arg;
	if (strstr(name, "bytes") && value >= (1ull << 20))
		printf("  %-24s %20" PRIu64 "  (%.1f MiB)\n", name, value, (double)value / (1 << 20));
	else
		printf("  %-24s %20" PRIu64 "\n", name, value);
	return 0;
}

static int cmd_stats(const struct cli_opts *o)
{
	kvstash_client *c;
	int rc;

	if (connect_or_fail(o, &c))
		return 1;
	printf("kvstashd at %s\n", o->endpoint ? o->endpoint : KVSTASH_DEFAULT_ENDPOINT);
	rc = kvstash_stats(c, print_stat, NULL);
	if (rc)
		fprintf(stderr, "kvstash stats: %s\n", kvstash_last_error());
	kvstash_close(c);
	return rc ? 1 : 0;
}

/* ---- top ---------------------------------------------------------------- */

#define TOP_MAX_STATS 256
#define TOP_MIN_INTERVAL_MS 10
#define TOP_DEFAULT_INTERVAL_MS 1000

/* One KS_STATS reply and when it arrived. */
struct top_snap {
	size_t n;
	char names[TOP_MAX_STATS][48];
	uint64_t vals[TOP_MAX_STATS];
	double t;		/* CLOCK_MONOTONIC seconds */
};

static double now_s(void);

static int top_collect(const char *name, uint64_t value, void *arg)
{
	struct top_snap *sn = arg;

	if (sn->n < TOP_MAX_STATS) {
		snprintf(sn->names[sn->n], sizeof(sn->names[0]), "%s", name);
		sn->vals[sn->n++] = value;
	}
	return 0;
}

static int top_snapshot(kvstash_client *c, struct top_snap *sn)
{
	int rc;

	sn->n = 0;
	rc = kvstash_stats(c, top_collect, sn);
	sn->t = now_s();
	return rc;
}

/* The value of @name, or -1 if the server does not report it. */
static double top_val(const struct top_snap *sn, const char *name)
{
	for (size_t i = 0; i < sn->n; i++)
		if (!strcmp(sn->names[i], name))
			return (double)sn->vals[i];
	return -1;
}

/* Per-second change of counter @name from @a to @b (0 if absent or reset). */
static double top_rate(const struct top_snap *a, const struct top_snap *b, const char *name)
{
	double va = top_val(a, name), vb = top_val(b, name), dt = b->t - a->t;

	if (va < 0 || vb < va || dt <= 0)
		return 0;
	return (vb - va) / dt;
}

/*
 * Mean server-side latency (ms) of @kind over the interval, from the
 * "latency_<kind>_sum_us" / "latency_<kind>_count" counters: "-" when the
 * server does not report them or nothing of that kind completed.
 */
static void top_latency(const struct top_snap *a, const struct top_snap *b, const char *kind,
			char *out, size_t len)
{
	char sn[64], cn[64];
	double s0, s1, c0, c1;

	snprintf(sn, sizeof(sn), "latency_%s_sum_us", kind);
	snprintf(cn, sizeof(cn), "latency_%s_count", kind);
	s0 = top_val(a, sn);
	s1 = top_val(b, sn);
	c0 = top_val(a, cn);
	c1 = top_val(b, cn);
	if (s0 < 0 || s1 < s0 || c0 < 0 || c1 <= c0)
		snprintf(out, len, "-");
	else
		snprintf(out, len, "%.3f", (s1 - s0) / (c1 - c0) / 1e3);
}

static void top_print(const struct cli_opts *o, const struct top_snap *a, const struct top_snap *b,
		      int refresh, double ping_ms, bool tty)
{
	static const char *const kinds[] = { "store", "retrieve", "lookup", "ping" };
	double req[4], total = 0;
	char lat[4][32];
	double used = top_val(b, "pool_used_bytes"), pool = top_val(b, "pool_bytes");

	for (int i = 0; i < 4; i++) {
		char name[32];

		snprintf(name, sizeof(name), "requests_%s", kinds[i]);
		req[i] = top_rate(a, b, name);
		total += req[i];
		top_latency(a, b, kinds[i], lat[i], sizeof(lat[i]));
	}
	if (tty)
		printf("\033[H\033[2J");	/* cursor home, clear screen */
	else if (refresh > 1)
		printf("\n");
	printf("kvstash top: %s  interval %.2f s  refresh %d\n",
	       o->endpoint ? o->endpoint : KVSTASH_DEFAULT_ENDPOINT, b->t - a->t, refresh);
	printf("%-12s %10s %10s %10s %10s %10s\n", "requests/s", "store", "retrieve", "lookup",
	       "ping", "total");
	printf("%-12s %10.1f %10.1f %10.1f %10.1f %10.1f\n", "", req[0], req[1], req[2], req[3],
	       total);
	printf("%-12s %10s %10s\n", "GB/s", "stored", "retrieved");
	printf("%-12s %10.3f %10.3f\n", "", top_rate(a, b, "bytes_stored") / 1e9,
	       top_rate(a, b, "bytes_retrieved") / 1e9);
	printf("%-12s %10s %10s %10s %10s\n", "chunks/s", "stored", "skipped", "no-space",
	       "evicted");
	printf("%-12s %10.1f %10.1f %10.1f %10.1f\n", "", top_rate(a, b, "store_chunks_stored"),
	       top_rate(a, b, "store_chunks_skipped"), top_rate(a, b, "store_chunks_nospace"),
	       top_rate(a, b, "evictions"));
	printf("%-12s %10s %10s %10s %10s %10s\n", "latency ms", "store", "retrieve", "lookup",
	       "ping", "rtt");
	printf("%-12s %10s %10s %10s %10s %10.3f\n", "", lat[0], lat[1], lat[2], lat[3], ping_ms);
	printf("%-12s %10s %10s %10s %10s %10s\n", "pool", "used MiB", "total MiB", "used %",
	       "objects", "pins");
	printf("%-12s %10.1f %10.1f %10.1f %10.0f %10.0f\n", "", used / (1 << 20), pool / (1 << 20),
	       pool > 0 ? 100.0 * used / pool : 0.0, top_val(b, "objects"), top_val(b, "pins"));
	printf("%-12s %10s %10s %10s %10s %10s\n", "transfers", "queued", "running", "workers",
	       "rejected/s", "errors/s");
	printf("%-12s %10.0f %10.0f %10.0f %10.1f %10.1f\n", "", top_val(b, "xfer_queued"),
	       top_val(b, "xfer_running"), top_val(b, "workers"),
	       top_rate(a, b, "xfer_rejected_full"),
	       top_rate(a, b, "semantic_errors") + top_rate(a, b, "frame_faults"));
	fflush(stdout);
}

/*
 * Each refresh: sleep the interval, PING (for the round trip, so top's own
 * PING counts in the ping rate: one per interval), snapshot, print the rates
 * since the previous snapshot over the measured time between them. Stops
 * after --count refreshes or on the first error.
 */
static int cmd_top(const struct cli_opts *o)
{
	struct top_snap *snap = calloc(2, sizeof(*snap));
	kvstash_client *c = NULL;
	int interval_ms = o->interval_set ? o->interval_ms : TOP_DEFAULT_INTERVAL_MS;
	int count = o->count_set ? o->count : 0, cur = 0, ret = 1;
	bool tty = isatty(STDOUT_FILENO);

	if (!snap) {
		fprintf(stderr, "kvstash top: out of memory\n");
		return 1;
	}
	if (interval_ms < TOP_MIN_INTERVAL_MS) {
		fprintf(stderr, "kvstash: --interval-ms: top needs at least %d\n", TOP_MIN_INTERVAL_MS);
		free(snap);
		return 2;
	}
	if (connect_or_fail(o, &c))
		goto out;
	if (top_snapshot(c, &snap[0])) {
		fprintf(stderr, "kvstash top: %s\n", kvstash_last_error());
		goto out;
	}
	for (int refresh = 1; !count || refresh <= count; refresh++) {
		double rtt = NAN;

		usleep((useconds_t)interval_ms * 1000);
		if (kvstash_ping(c, &rtt) || top_snapshot(c, &snap[cur ^ 1])) {
			fprintf(stderr, "kvstash top: %s\n", kvstash_last_error());
			goto out;
		}
		top_print(o, &snap[cur], &snap[cur ^ 1], refresh, rtt, tty);
		cur ^= 1;
	}
	ret = 0;
out:
	if (c)
		kvstash_close(c);
	free(snap);
	return ret;
}

/* The counters as one JSON object, in the server's order. */
static int cmd_stats_json(const struct cli_opts *o)
{
	struct top_snap *sn = calloc(1, sizeof(*sn));
	kvstash_client *c = NULL;
	int ret = 1;

	if (!sn) {
		fprintf(stderr, "kvstash stats: out of memory\n");
		return 1;
	}
	if (connect_or_fail(o, &c))
		goto out;
	if (top_snapshot(c, sn)) {
		fprintf(stderr, "kvstash stats: %s\n", kvstash_last_error());
		goto out;
	}
	/* Counter names are [a-z0-9_]: nothing to escape. */
	printf("{");
	for (size_t i = 0; i < sn->n; i++)
		printf("%s\n  \"%s\": %" PRIu64, i ? "," : "", sn->names[i], sn->vals[i]);
	printf("\n}\n");
	ret = 0;
out:
	if (c)
		kvstash_close(c);
	free(sn);
	return ret;
}

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int dtype_bytes(const char *d)
{
	if (!strcmp(d, "bfloat16") || !strcmp(d, "float16"))
		return 2;
	if (!strcmp(d, "float32"))
		return 4;
	if (!strcmp(d, "uint8") || !strcmp(d, "int8") || !strncmp(d, "float8", 6))
		return 1;
	return 0;
}

/*
 * Register one memfd holding every layer, fill the source blocks with a
 * pattern, STORE the chunks, zero the buffer, RETRIEVE into other blocks,
 * and compare every byte of every chunk.
 */
static int cmd_store_test(const struct cli_opts *o)
{
	struct kvstash_kv_layout lay = { 0 };
	struct kvstash_host_layer *layers = NULL;
	struct kvstash_host_buffer buf = { .fd = -1 };
	kvstash_client *c = NULL;
	uint32_t C;
	int eb = dtype_bytes(o->dtype), ret = 1;
	int64_t *src_blocks = NULL, *dst_blocks = NULL;
	uint32_t *tokens = NULL;
	size_t layer_bytes, block_bytes, nblocks, ntok, mismatches = 0;
	bool mla = !strcmp(o->layout, "mla");
	int head_size = o->head_size ? o->head_size : (mla ? 576 : 128);
	int heads = mla ? 1 : o->heads;
	char rid[64];
	double t0, t_store, t_retrieve;
	uint64_t seed = (uint64_t)time(NULL) ^ (uint64_t)getpid() << 20;

	if (!eb) {
		fprintf(stderr, "store-test: unknown dtype '%s'\n", o->dtype);
		return 2;
	}
	if (!mla && strcmp(o->layout, "flash_attn") && strcmp(o->layout, "flashinfer")) {
		fprintf(stderr, "store-test: unknown layout '%s' (flash_attn, flashinfer or mla)\n",
			o->layout);
		return 2;
	}
	if (connect_or_fail(o, &c))
		return 1;
	if (kvstash_get_chunk_size(c, &C)) {
		fprintf(stderr, "store-test: GET_CHUNK_SIZE: %s\n", kvstash_last_error());
		goto out;
	}
	if (C % (uint32_t)o->block_size) {
		fprintf(stderr, "store-test: chunk size %u is not a multiple of block size %d\n", C,
			o->block_size);
		goto out;
	}
	ntok = (size_t)o->chunks * C;
	/* Room for the stored blocks and, after them, as many blocks to retrieve into. */
	nblocks = 2 * ntok / (size_t)o->block_size;
	block_bytes = (size_t)o->block_size * (size_t)heads * (size_t)head_size * (size_t)eb;
	lay.dtype = o->dtype;
	if (mla) {
		lay.layout = KVSTASH_LAYOUT_MLA;
		lay.ndim = 3;
		lay.shape[0] = (int64_t)nblocks;
		lay.shape[1] = o->block_size;
		lay.shape[2] = head_size;
		layer_bytes = nblocks * block_bytes;
	} else if (!strcmp(o->layout, "flash_attn") || !strcmp(o->layout, "flashinfer")) {
		bool fa = !strcmp(o->layout, "flash_attn");

		lay.layout = fa ? KVSTASH_LAYOUT_FLASH_ATTN : KVSTASH_LAYOUT_FLASHINFER;
		lay.ndim = 5;
		lay.shape[0] = fa ? 2 : (int64_t)nblocks;
		lay.shape[1] = fa ? (int64_t)nblocks : 2;
		lay.shape[2] = o->block_size;
		lay.shape[3] = heads;
		lay.shape[4] = head_size;
		layer_bytes = 2 * nblocks * block_bytes;
	} else {
		fprintf(stderr, "store-test: unknown layout '%s'\n", o->layout);
		goto out;
	}
	if (kvstash_host_buffer_create(&buf, layer_bytes * (size_t)o->layers, "kvstash-store-test")) {
		fprintf(stderr, "store-test: %s\n", kvstash_last_error());
		goto out;
	}
	layers = calloc((size_t)o->layers, sizeof(*layers));
	src_blocks = calloc(nblocks / 2, sizeof(*src_blocks));
	dst_blocks = calloc(nblocks / 2, sizeof(*dst_blocks));
	tokens = calloc(ntok, sizeof(*tokens));
	if (!layers || !src_blocks || !dst_blocks || !tokens) {
		fprintf(stderr, "store-test: out of memory\n");
		goto out;
	}
	for (int l = 0; l < o->layers; l++) {
		layers[l].path = buf.path;
		layers[l].offset = (uint64_t)l * layer_bytes;
		layers[l].nbytes = buf.bytes;
	}
	/* Source blocks are the even ones, targets the odd ones, both reversed
	 * in order, so block ids are neither contiguous nor ascending. */
	for (size_t b = 0; b < nblocks / 2; b++) {
		src_blocks[b] = (int64_t)(nblocks - 2 - 2 * b);
		dst_blocks[b] = (int64_t)(nblocks - 1 - 2 * b);
	}
	for (size_t t = 0; t < ntok; t++)
		tokens[t] = (uint32_t)mix64(seed + t);
	for (size_t i = 0; i < buf.bytes / 8; i++) {
		uint64_t v = mix64(seed ^ (i * 0x9e37ull));

		memcpy((uint8_t *)buf.ptr + 8 * i, &v, 8);
	}
	int64_t instance = (int64_t)(seed & 0x7fffffff);
	if (kvstash_register_host(c, instance, o->model, 1, &lay, layers, (size_t)o->layers)) {
		fprintf(stderr, "store-test: REGISTER: %s\n", kvstash_last_error());
		goto out;
	}
	snprintf(rid, sizeof(rid), "store-test-%" PRIx64, seed);
	struct kvstash_key key = { .model = o->model, .world_size = 1, .worker_id = 0,
				   .tokens = tokens, .ntokens = ntok, .start = 0, .end = ntok,
				   .request_id = rid };
	t0 = now_s();
	if (kvstash_store(c, &key, instance, src_blocks, nblocks / 2)) {
		fprintf(stderr, "store-test: STORE: %s\n", kvstash_last_error());
		goto out_unregister;
	}
	t_store = now_s() - t0;
	int64_t hit = 0;
	key.worker_id = -1;
	if (kvstash_lookup_chunks(c, &key, 1, &hit)) {
		fprintf(stderr, "store-test: LOOKUP: %s\n", kvstash_last_error());
		goto out_unregister;
	}
	key.worker_id = 0;
	t0 = now_s();
	if (kvstash_retrieve(c, &key, instance, dst_blocks, nblocks / 2, 0)) {
		fprintf(stderr, "store-test: RETRIEVE: %s\n", kvstash_last_error());
		goto out_unregister;
	}
	t_retrieve = now_s() - t0;
	/* Compare every block pair of every plane of every layer. */
	size_t planes = mla ? 1 : 2;
	for (int l = 0; l < o->layers; l++) {
		uint8_t *lb = (uint8_t *)buf.ptr + (size_t)l * layer_bytes;

		for (size_t p = 0; p < planes; p++) {
			for (size_t b = 0; b < nblocks / 2; b++) {
				size_t so, doff;

				if (mla || !strcmp(o->layout, "flashinfer")) {
					so = ((size_t)src_blocks[b] * planes + p) * block_bytes;
					doff = ((size_t)dst_blocks[b] * planes + p) * block_bytes;
				} else {
					so = (p * nblocks + (size_t)src_blocks[b]) * block_bytes;
					doff = (p * nblocks + (size_t)dst_blocks[b]) * block_bytes;
				}
				if (memcmp(lb + so, lb + doff, block_bytes))
					mismatches++;
			}
		}
	}
	double bytes = (double)ntok * (double)planes * (double)o->layers *
		       (double)heads * (double)head_size * (double)eb;
	printf("store-test: %d chunk(s) of %u tokens, %d layers, %s %s, %.1f MiB\n", o->chunks, C,
	       o->layers, o->layout, o->dtype, bytes / (1 << 20));
	printf("  STORE     %8.3f ms  %7.2f GB/s\n", t_store * 1e3, bytes / t_store / 1e9);
	printf("  LOOKUP    %8" PRId64 " of %d chunk(s) cached\n", hit, o->chunks);
	printf("  RETRIEVE  %8.3f ms  %7.2f GB/s\n", t_retrieve * 1e3, bytes / t_retrieve / 1e9);
	printf("  verify    %s (%zu block(s) differ)\n", mismatches ? "FAILED" : "ok", mismatches);
	ret = mismatches || hit != o->chunks ? 1 : 0;
out_unregister:
	kvstash_end_session(c, rid);
	kvstash_unregister(c, instance);
out:
	if (buf.ptr)
		kvstash_host_buffer_destroy(&buf);
	free(layers);
	free(src_blocks);
	free(dst_blocks);
	free(tokens);
	kvstash_close(c);
	return ret;
}

static int parse_int(const char *s, const char *flag, int min, int max, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max) {
		fprintf(stderr, "kvstash: %s: '%s' is not an integer between %d and %d\n", flag, s,
			min, max);
		return -1;
	}
	*out = (int)v;
	return 0;
}

int main(int argc, char **argv)
{
	enum { OPT_CHUNKS = 256, OPT_LAYERS, OPT_LAYOUT, OPT_DTYPE, OPT_MODEL, OPT_HEADS,
	       OPT_HEAD_SIZE, OPT_BLOCK_SIZE, OPT_JSON };
	static const struct option long_opts[] = {
		{ "endpoint", required_argument, NULL, 'e' },
		{ "timeout-ms", required_argument, NULL, 't' },
		{ "count", required_argument, NULL, 'c' },
		{ "interval-ms", required_argument, NULL, 'i' },
		{ "chunks", required_argument, NULL, OPT_CHUNKS },
		{ "layers", required_argument, NULL, OPT_LAYERS },
		{ "layout", required_argument, NULL, OPT_LAYOUT },
		{ "dtype", required_argument, NULL, OPT_DTYPE },
		{ "model", required_argument, NULL, OPT_MODEL },
		{ "heads", required_argument, NULL, OPT_HEADS },
		{ "head-size", required_argument, NULL, OPT_HEAD_SIZE },
		{ "block-size", required_argument, NULL, OPT_BLOCK_SIZE },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = {
		.endpoint = getenv("KVSTASH_ENDPOINT"), .timeout_ms = CLI_DEFAULT_TIMEOUT_MS,
		.count = 1, .interval_ms = 100, .chunks = 8, .layers = 4, .layout = "flash_attn",
		.dtype = "bfloat16", .model = "kvstash-store-test", .heads = 8, .head_size = 0,
		.block_size = 16,
	};
	const char *cmd;
	int opt, bad = 0;

	if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	cmd = argv[1];
	optind = 2;
	while ((opt = getopt_long(argc, argv, "e:t:c:i:h", long_opts, NULL)) != -1) {
		switch (opt) {
		case 'e': o.endpoint = optarg; break;
		case 't': bad |= parse_int(optarg, "--timeout-ms", 1, 3600000, &o.timeout_ms); break;
		case 'c':
			bad |= parse_int(optarg, "--count", 1, 1000000, &o.count);
			o.count_set = true;
			break;
		case 'i':
			bad |= parse_int(optarg, "--interval-ms", 0, 3600000, &o.interval_ms);
			o.interval_set = true;
			break;
		case OPT_JSON: o.json = true; break;
		case OPT_CHUNKS: bad |= parse_int(optarg, "--chunks", 1, 4096, &o.chunks); break;
		case OPT_LAYERS: bad |= parse_int(optarg, "--layers", 1, 1024, &o.layers); break;
		case OPT_LAYOUT: o.layout = optarg; break;
		case OPT_DTYPE: o.dtype = optarg; break;
		case OPT_MODEL: o.model = optarg; break;
		case OPT_HEADS: bad |= parse_int(optarg, "--heads", 1, 1024, &o.heads); break;
		case OPT_HEAD_SIZE: bad |= parse_int(optarg, "--head-size", 1, 65536, &o.head_size); break;
		case OPT_BLOCK_SIZE: bad |= parse_int(optarg, "--block-size", 1, 4096, &o.block_size); break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (bad)
		return 2;
	if (optind < argc) {
		fprintf(stderr, "kvstash: unexpected argument '%s'\n", argv[optind]);
		return 2;
	}
	if (!strcmp(cmd, "ping"))
		return cmd_ping(&o);
	if (!strcmp(cmd, "stats"))
		return o.json ? cmd_stats_json(&o) : cmd_stats(&o);
	if (!strcmp(cmd, "top"))
		return cmd_top(&o);
	if (!strcmp(cmd, "store-test"))
		return cmd_store_test(&o);
	fprintf(stderr, "kvstash: unknown command '%s'\n\n", cmd);
	usage(stderr);
	return 2;
}
