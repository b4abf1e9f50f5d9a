/*
 * cli.c - the kvstash command-line tool: ping, stats, top, store-test, bench.
 *
 * The only file in src/ that prints with printf: everything else logs.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvstash.h"

#define CLI_DEFAULT_TIMEOUT_MS 5000
#define BENCH_MAX_SIZES 16	/* request sizes in one bench sweep */

struct cli_opts {
	const char *endpoint;
	int timeout_ms;
	int count;
	int interval_ms;
	bool count_set, interval_set;	/* top has its own defaults */
	bool json;
	bool quiet;		/* ping: only the summary */
	int chunks;
	int layers;
	const char *layout;
	const char *dtype;
	const char *model;
	int heads, head_size, block_size;
	int warmup;		/* store-test: untimed rounds before the timed one */
	bool endpoint_set, timeout_set;	/* -e / -t given (bench ignores $KVSTASH_ENDPOINT) */
	bool gpu, tiers;		/* bench: run bench/ programs instead of the sweep */
	const char *plot;		/* bench: PNG to draw the sweep into, or NULL */
	double seconds;			/* bench: per measurement */
	bool seconds_set;
	int sizes[BENCH_MAX_SIZES];	/* bench: chunks per request of each step */
	int nsizes;
};

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: kvstash [OPTIONS] COMMAND [OPTIONS]\n"
		"Talk to a running kvstashd.\n\n"
		"Commands:\n"
		"  ping         send PING and print the round-trip time\n"
		"  stats        print the server's counters as a table (--json: one JSON object)\n"
		"  top          refreshing view of request rates, GB/s, evictions and latency,\n"
		"               from consecutive stats snapshots (Ctrl-C stops)\n"
		"  store-test   register a synthetic paged KV buffer, STORE and RETRIEVE\n"
		"               chunks, and verify every byte came back\n"
		"  bench        STORE / RETRIEVE GB/s per request size next to memcpy, through\n"
		"               a kvstashd started for the run (or --endpoint's); a table on\n"
		"               stdout, progress on stderr. With --gpu / --tiers: run the GPU\n"
		"               or disk/Redis tier benchmarks of bench/ instead\n\n"
		"Options:\n"
		"  -e, --endpoint=EP     server endpoint (default " KVSTASH_DEFAULT_ENDPOINT
		", or $KVSTASH_ENDPOINT)\n"
		"  -t, --timeout-ms=N    per-request timeout (default %d)\n"
		"  -c, --count=N         ping: number of pings (default 1);\n"
		"                        top: refreshes before exiting (default: until Ctrl-C)\n"
		"  -i, --interval-ms=N   ping: pause between pings (default 100);\n"
		"                        top: refresh interval (default 1000, at least 10)\n"
		"  -q, --quiet           ping: print only the summary (min/avg/p99/max)\n"
		"      --json            stats: print the counters as one JSON object\n"
		"      --chunks=N        store-test: chunks to store (default 8)\n"
		"      --layers=N        store-test: layers (default 4)\n"
		"      --layout=L        store-test: flash_attn | flashinfer | mla (default flash_attn)\n"
		"      --dtype=D         store-test: bfloat16 | float16 | float32 | uint8 (default bfloat16)\n"
		"      --heads=N         store-test: KV heads (default 8; MLA ignores it)\n"
		"      --head-size=N     store-test: head size (default 128; MLA: 576)\n"
		"      --block-size=N    store-test: tokens per block (default 16)\n"
		"      --model=NAME      store-test: model name (default kvstash-store-test)\n"
		"      --warmup=N        store-test: untimed STORE+RETRIEVE rounds of other prompts\n"
		"                        through the same blocks first (default 1), so the timed round\n"
		"                        does not pay kvstashd's first touch of this buffer's pages\n"
		"      --seconds=S       bench: seconds per measurement (default 1)\n"
		"      --sizes=N,N,...   bench: chunks (32 MiB each) per request (default 1,2,4,8,16)\n"
		"      --plot=FILE.png   bench: also draw GB/s vs request size with gnuplot\n"
		"                        (apt-get install gnuplot-nox); writes FILE.dat and FILE.gp\n"
		"      --gpu             bench: run bench/gpu_bench and bench/gpu_server_bench\n"
		"      --tiers           bench: run bench/tier_bench (disk and Redis tiers)\n"
		"                        bench starts its own kvstashd unless -e is given, and\n"
		"                        ignores $KVSTASH_ENDPOINT; against a running server it\n"
		"                        evicts what is cached\n"
		"  -h, --help            this text\n"
		"      --print-man       print the kvstash(1) man page (roff)\n",
		CLI_DEFAULT_TIMEOUT_MS);
}

/* kvstash(1): the usage text above, in roff, so that both list the same options. */
static int print_man(void)
{
	char *text = NULL, *line, *next;
	size_t len = 0;
	FILE *mem = open_memstream(&text, &len);

	if (!mem)
		return 1;
	usage(mem);
	if (fclose(mem)) {
		free(text);
		return 1;
	}
	printf(".\\\" Generated by kvstash --print-man from its usage text.\n"
	       ".TH KVSTASH 1 \"\" \"kvstash %s\" \"User Commands\"\n"
	       ".SH NAME\n"
	       "kvstash \\- command\\-line client of the kvstashd KV\\-cache server\n"
	       ".SH SYNOPSIS\n"
	       ".B kvstash\n"
	       "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]\n"
	       ".SH DESCRIPTION\n"
	       ".nf\n", KVSTASH_VERSION);
	for (line = text; *line; line = next) {
		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		else
			next = line + strlen(line);
		if (!strncmp(line, "Usage:", 6))
			continue;
		if (*line == '.' || *line == '\'')
			fputs("\\&", stdout);
		for (const char *p = line; *p; p++) {
			if (*p == '\\')
				fputs("\\e", stdout);
			else if (*p == '-')
				fputs("\\-", stdout);
			else
				putchar(*p);
		}
		putchar('\n');
	}
	printf(".fi\n"
	       ".SH ENVIRONMENT\n"
	       ".TP\n.B KVSTASH_ENDPOINT\n"
	       "The server endpoint when \\fB\\-e\\fR is not given.\n"
	       ".SH SEE ALSO\n"
	       ".BR kvstashd (8)\n");
	free(text);
	return 0;
}

static int connect_or_fail(const struct cli_opts *o, kvstash_client **c)
{
	int rc = kvstash_connect(o->endpoint, o->timeout_ms, c);

	if (rc)
		fprintf(stderr, "kvstash: %s\n", kvstash_last_error());
	return rc;
}

/* Set by SIGINT/SIGTERM: ping and bench stop at the next request and clean up. */
static _Atomic int cli_stop;

static void cli_on_signal(int sig)
{
	atomic_store_explicit(&cli_stop, sig, memory_order_relaxed);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/*
 * ping -c N: one line per reply (none with --quiet), then, for N > 1, a
 * summary as ping(8) prints it, with the 99th percentile a heartbeat
 * budget is judged by.
 */
static int cmd_ping(const struct cli_opts *o)
{
	const char *ep = o->endpoint ? o->endpoint : KVSTASH_DEFAULT_ENDPOINT;
	double *rtts = calloc((size_t)o->count, sizeof(*rtts));
	double sum = 0;
	kvstash_client *c;
	int failures = 0, n = 0, sent = 0;
	struct sigaction sa = { .sa_handler = cli_on_signal }, old_int, old_term;

	if (!rtts) {
		fprintf(stderr, "kvstash: out of memory\n");
		return 1;
	}
	if (connect_or_fail(o, &c)) {
		free(rtts);
		return 1;
	}
	/* Ctrl-C ends the run early with the summary, as ping(8) does. */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	for (int i = 0; i < o->count && !atomic_load(&cli_stop); i++) {
		double rtt;
		int rc = kvstash_ping(c, &rtt);

		sent++;
		if (rc) {
			printf("ping %s: %s\n", ep, kvstash_last_error());
			failures++;
		} else {
			rtts[n++] = rtt;
			sum += rtt;
			if (!o->quiet)
				printf("pong from %s: time=%.3f ms\n", ep, rtt);
		}
		fflush(stdout);
		if (i + 1 < o->count && !atomic_load(&cli_stop))
			usleep((useconds_t)o->interval_ms * 1000);	/* a signal cuts it short */
	}
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	kvstash_close(c);
	if (o->count > 1) {
		printf("--- %s: %d sent, %d received", ep, sent, n);
		if (n) {
			qsort(rtts, (size_t)n, sizeof(*rtts), cmp_double);
			printf(", rtt min/avg/p99/max = %.3f/%.3f/%.3f/%.3f ms", rtts[0], sum / n,
			       rtts[(size_t)ceil(0.99 * n) - 1], rtts[n - 1]);
		}
		printf("\n");
	}
	free(rtts);
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
 * Mean ms per event over the interval from a microsecond sum counter
 * @sum_name and an event counter @count_name: "-" when the server does not
 * report them or nothing was counted in the interval.
 */
static void top_mean_ms(const struct top_snap *a, const struct top_snap *b, const char *sum_name,
			const char *count_name, char *out, size_t len)
{
	double s0 = top_val(a, sum_name), s1 = top_val(b, sum_name);
	double c0 = top_val(a, count_name), c1 = top_val(b, count_name);

	if (s0 < 0 || s1 < s0 || c0 < 0 || c1 <= c0)
		snprintf(out, len, "-");
	else
		snprintf(out, len, "%.3f", (s1 - s0) / (c1 - c0) / 1e3);
}

/* Mean server-side latency of @kind: "latency_<kind>_sum_us" / "latency_<kind>_count". */
static void top_latency(const struct top_snap *a, const struct top_snap *b, const char *kind,
			char *out, size_t len)
{
	char sn[64], cn[64];

	snprintf(sn, sizeof(sn), "latency_%s_sum_us", kind);
	snprintf(cn, sizeof(cn), "latency_%s_count", kind);
	top_mean_ms(a, b, sn, cn, out, len);
}

/* Mean ms of successful @op requests in @phase: "<op>_<phase>_us" / "<op>_timed". */
static void top_phase(const struct top_snap *a, const struct top_snap *b, const char *op,
		      const char *phase, char *out, size_t len)
{
	char sn[64], cn[64];

	snprintf(sn, sizeof(sn), "%s_%s_us", op, phase);
	snprintf(cn, sizeof(cn), "%s_timed", op);
	top_mean_ms(a, b, sn, cn, out, len);
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
	/* Where a STORE's / RETRIEVE's time went, receipt to reply (server side). */
	static const char *const phases[] = { "accept", "queue", "prepare", "copy", "finish",
					      "reply" };
	printf("%-12s", "phase ms");
	for (size_t p = 0; p < sizeof(phases) / sizeof(phases[0]); p++)
		printf(" %10s", phases[p]);
	printf("\n");
	for (int op = 0; op < 2; op++) {
		printf("%-12s", op ? "retrieve" : "store");
		for (size_t p = 0; p < sizeof(phases) / sizeof(phases[0]); p++) {
			char v[32];

			top_phase(a, b, op ? "retrieve" : "store", phases[p], v, sizeof(v));
			printf(" %10s", v);
		}
		printf("\n");
	}
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
	for (size_t i = 0; i < buf.bytes / 8; i++) {
		uint64_t v = mix64(seed ^ (i * 0x9e37ull));

		memcpy((uint8_t *)buf.ptr + 8 * i, &v, 8);
	}
	int64_t instance = (int64_t)(seed & 0x7fffffff);
	if (kvstash_register_host(c, instance, o->model, 1, &lay, layers, (size_t)o->layers)) {
		fprintf(stderr, "store-test: REGISTER: %s\n", kvstash_last_error());
		goto out;
	}
	/*
	 * Warm-up rounds: other prompts (their own tokens) through the same
	 * blocks, so kvstashd's own mapping of this buffer is faulted in before
	 * the timed round; a first touch costs more than the copy itself
	 * (0.2-0.3 GB/s on a VM against 10 GB/s warm). Pool slots never used
	 * before still fault in the timed STORE: a fresh kvstashd's first stores.
	 */
	for (int w = 0; w < o->warmup; w++) {
		for (size_t t = 0; t < ntok; t++)
			tokens[t] = (uint32_t)mix64(~seed - (uint64_t)w * ntok - t);
		snprintf(rid, sizeof(rid), "store-test-warmup-%" PRIx64 "-%d", seed, w);
		struct kvstash_key wk = { .model = o->model, .world_size = 1, .worker_id = 0,
					  .tokens = tokens, .ntokens = ntok, .start = 0, .end = ntok,
					  .request_id = rid };
		if (kvstash_store(c, &wk, instance, src_blocks, nblocks / 2) ||
		    kvstash_retrieve(c, &wk, instance, dst_blocks, nblocks / 2, 0)) {
			fprintf(stderr, "store-test: warm-up round %d: %s\n", w + 1,
				kvstash_last_error());
			kvstash_end_session(c, rid);
			goto out_unregister;
		}
		kvstash_end_session(c, rid);
	}
	for (size_t t = 0; t < ntok; t++)
		tokens[t] = (uint32_t)mix64(seed + t);
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
	if (o->warmup)
		printf("  (timed after %d untimed warm-up round(s); a STORE into pool slots never "
		       "used before\n   still includes kvstashd's first touch of them)\n",
		       o->warmup);
	else
		printf("  (no warm-up: the times include kvstashd's first touch of this buffer's "
		       "pages\n   and of new pool slots, which can cost more than the copy)\n");
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

/* ---- bench ---------------------------------------------------------------- */

/*
 * kvstash bench: the host sweep below, or (--gpu, --tiers) the benchmark
 * programs of bench/ next to this binary, run as they are.
 *
 * Host sweep: a Llama-3-8B-like paged KV buffer (32 layers of flash_attn
 * [2, NB, 16, 8, 128] bf16 in one memfd) is registered with a kvstashd (one
 * started for the run on a private ipc:// endpoint, unless --endpoint). One
 * untimed warm-up of STOREs first cycles the pool, so the timed ones do not
 * pay its first-touch page faults. Then, for each request size, for
 * --seconds each: memcpy of the request's bytes on one thread (same buffers
 * size, same run), STORE of fresh prompts (new token lists: no object is
 * ever skipped as present), RETRIEVE of the last prompt stored; then one
 * more RETRIEVE into zeroed blocks is checked byte for byte against the
 * blocks it was stored from. GB/s = request bytes x completed requests /
 * wall time of the phase (1 GB = 1e9 B). One thread, one request at a time:
 * the latency-bound figure an engine sees per request.
 */
#define BENCH_LAYERS 32
#define BENCH_BLOCK_TOKENS 16
#define BENCH_HEADS 8
#define BENCH_HEAD_SIZE 128
#define BENCH_ROW_BYTES ((size_t)BENCH_HEADS * BENCH_HEAD_SIZE * 2)	/* bf16 */
#define BENCH_MAX_CHUNKS 64	/* 2 GiB per request: past that the memfd outgrows most hosts */
#define BENCH_DEFAULT_SECONDS 1.0
#define BENCH_MAX_SECONDS 3600.0
/* A 16-chunk request moves 512 MiB: leave room for sanitizer builds. */
#define BENCH_TIMEOUT_MS 60000
#define BENCH_START_TIMEOUT_S 20.0	/* kvstashd answering PING after exec */
#define BENCH_STOP_TIMEOUT_S 10.0	/* kvstashd gone after SIGTERM, else SIGKILL */
/* Pool of the started kvstashd: room for the warm-up's prompts and more. */
#define BENCH_POOL_REQUESTS 3
#define BENCH_MIN_POOL_MIB 256
#define BENCH_WARMUP_REQUESTS 4	/* largest requests stored untimed into a running server */
#define BENCH_BAR_WIDTH 30
#define BENCH_MODEL "kvstash-bench"

static const int bench_default_sizes[] = { 1, 2, 4, 8, 16 };

struct bench_row {
	int chunks;
	double mib;
	double store_gbps, retrieve_gbps, memcpy_gbps;
};

/* Progress on stderr: a redrawn bar on a terminal, else one line per step. */
struct bench_progress {
	bool tty;
	bool drawn;		/* a bar is on the line now */
	int step, nsteps;
	double last_draw;
};

/* A kvstashd started for the run. */
struct bench_daemon {
	pid_t pid;		/* 0: none */
	char dir[96];		/* mkdtemp; holds the socket and the log */
	char endpoint[128];	/* ipc://<dir>/sock */
	char log[128];		/* <dir>/kvstashd.log: its stdout and stderr */
};

struct bench_ctx {
	const struct cli_opts *o;
	kvstash_client *c;	/* owns */
	struct kvstash_host_buffer buf;	/* the paged KV buffer, all layers */
	int64_t instance;
	bool registered;
	uint32_t chunk_tokens;
	size_t nb;		/* blocks per plane per layer */
	size_t block_bytes;	/* one block of one plane of one layer */
	size_t layer_bytes;
	size_t object_bytes;	/* one chunk, all layers, K and V */
	int64_t *src, *dst;	/* owns; nb / 2 block ids each, disjoint, shuffled */
	uint32_t *tokens;	/* owns; the last prompt stored */
	uint64_t seed, prompts;	/* prompts stored so far: each gets new tokens */
	uint8_t *mc_src, *mc_dst;	/* owns; memcpy baseline buffers of one request */
	struct bench_progress pg;
};

/* The directory holding this program (for kvstashd and bench/). */
static int bench_self_dir(const char *argv0, char *out, size_t len)
{
	char path[4096];
	ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
	char *slash;

	if (n > 0) {
		path[n] = '\0';
	} else if (argv0 && strchr(argv0, '/')) {
		snprintf(path, sizeof(path), "%s", argv0);
	} else {
		fprintf(stderr, "kvstash bench: cannot tell where this program is\n");
		return -1;
	}
	slash = strrchr(path, '/');
	if (slash == path)
		slash++;
	*slash = '\0';
	if ((size_t)snprintf(out, len, "%s", path) >= len) {
		fprintf(stderr, "kvstash bench: path too long: %s\n", path);
		return -1;
	}
	return 0;
}

/* An executable @name on $PATH into @out; false if there is none. */
static bool bench_find_in_path(const char *name, char *out, size_t len)
{
	const char *p = getenv("PATH");

	while (p && *p) {
		const char *end = strchr(p, ':');
		size_t n = end ? (size_t)(end - p) : strlen(p);

		if (n && (size_t)snprintf(out, len, "%.*s/%s", (int)n, p, name) < len &&
		    access(out, X_OK) == 0)
			return true;
		p = end ? end + 1 : NULL;
	}
	return false;
}

static void bench_draw(struct bench_progress *pg, double step_frac, const char *label,
		       double gbps)
{
	char bar[BENCH_BAR_WIDTH + 1];
	double t = now_s(), f;
	int fill;

	if (!pg->tty || (t - pg->last_draw < 0.1 && step_frac > 0))
		return;
	pg->last_draw = t;
	f = ((double)pg->step + fmin(fmax(step_frac, 0), 1)) / pg->nsteps;
	fill = (int)(f * BENCH_BAR_WIDTH + 0.5);
	for (int i = 0; i < BENCH_BAR_WIDTH; i++)
		bar[i] = i < fill ? '#' : '.';
	bar[BENCH_BAR_WIDTH] = '\0';
	fprintf(stderr, "\r\033[K[%s] %3.0f%%  %s", bar, 100 * f, label);
	pg->drawn = true;
	if (gbps > 0)
		fprintf(stderr, "  %.2f GB/s", gbps);
	fflush(stderr);
}

static void bench_step_done(struct bench_progress *pg, const char *label, double gbps)
{
	pg->step++;
	if (pg->tty) {
		pg->last_draw = 0;
		bench_draw(pg, 0, label, gbps);
	} else {
		fprintf(stderr, "kvstash bench: [%2d/%d] %-40s %8.2f GB/s\n", pg->step, pg->nsteps,
			label, gbps);
	}
}

static void bench_progress_end(struct bench_progress *pg)
{
	if (pg->drawn)
		fprintf(stderr, "\r\033[K");
	pg->drawn = false;
}

/* Remove what bench_daemon_start() made in its directory, then the directory. */
static void bench_daemon_rmdir(struct bench_daemon *d)
{
	char sock[160];

	snprintf(sock, sizeof(sock), "%s/sock", d->dir);
	unlink(sock);
	unlink(d->log);
	rmdir(d->dir);
}

static void bench_daemon_print_log(const struct bench_daemon *d)
{
	char line[512];
	FILE *f = fopen(d->log, "r");

	if (!f)
		return;
	fprintf(stderr, "kvstash bench: kvstashd's output:\n");
	while (fgets(line, sizeof(line), f))
		fprintf(stderr, "  %s", line);
	fclose(f);
}

/*
 * Start <bindir>/kvstashd on ipc://<mkdtemp dir>/sock with a pool of
 * @pool_mib and no HTTP endpoint, and wait (at most BENCH_START_TIMEOUT_S)
 * until it answers PING. 0, or -1 with the reason printed.
 */
static int bench_daemon_start(struct bench_daemon *d, const char *bindir, size_t pool_mib)
{
	const char *tmp = getenv("TMPDIR");
	char exe[4200], listen[160], pool[48];
	kvstash_client *probe = NULL;
	double deadline;
	int fd, status;

	/* ipc:// paths must fit sockaddr_un (108 bytes): fall back to /tmp. */
	if (!tmp || !*tmp || strlen(tmp) > 60)
		tmp = "/tmp";
	snprintf(exe, sizeof(exe), "%s/kvstashd", bindir);
	if (access(exe, X_OK)) {
		fprintf(stderr, "kvstash bench: no kvstashd next to this program (%s): %s\n", exe,
			strerror(errno));
		return -1;
	}
	snprintf(d->dir, sizeof(d->dir), "%s/kvstash-cli-bench-XXXXXX", tmp);
	if (!mkdtemp(d->dir)) {
		fprintf(stderr, "kvstash bench: mkdtemp %s: %s\n", d->dir, strerror(errno));
		return -1;
	}
	snprintf(d->endpoint, sizeof(d->endpoint), "ipc://%s/sock", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/kvstashd.log", d->dir);
	snprintf(listen, sizeof(listen), "--listen=%s", d->endpoint);
	snprintf(pool, sizeof(pool), "--pool-size=%zuM", pool_mib);
	fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(stderr, "kvstash bench: %s: %s\n", d->log, strerror(errno));
		rmdir(d->dir);
		return -1;
	}
	fflush(stdout);
	fflush(stderr);
	d->pid = fork();
	if (d->pid == 0) {
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		execl(exe, exe, listen, pool, "--http-port=0", "--cuda=off", "--log-level=warn",
		      (char *)NULL);
		dprintf(STDERR_FILENO, "cannot run %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	close(fd);
	if (d->pid < 0) {
		fprintf(stderr, "kvstash bench: fork: %s\n", strerror(errno));
		d->pid = 0;
		bench_daemon_rmdir(d);
		return -1;
	}
	/* Short per-PING timeout: ZMQ connects lazily, so early PINGs just time out. */
	if (kvstash_connect(d->endpoint, 200, &probe)) {
		fprintf(stderr, "kvstash bench: %s\n", kvstash_last_error());
		return -1;
	}
	deadline = now_s() + BENCH_START_TIMEOUT_S;
	while (kvstash_ping(probe, NULL)) {
		if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
			d->pid = 0;
			fprintf(stderr, "kvstash bench: kvstashd exited at start (status %d)\n",
				WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
			bench_daemon_print_log(d);
			kvstash_close(probe);
			return -1;
		}
		if (now_s() > deadline || atomic_load(&cli_stop)) {
			fprintf(stderr, "kvstash bench: kvstashd did not answer PING at %s in %.0f s\n",
				d->endpoint, BENCH_START_TIMEOUT_S);
			bench_daemon_print_log(d);
			kvstash_close(probe);
			return -1;
		}
	}
	kvstash_close(probe);
	return 0;
}

/*
 * SIGTERM the started kvstashd, wait BENCH_STOP_TIMEOUT_S for it (then
 * SIGKILL) and remove its directory. 0 if it exited with status 0, else -1
 * with its log printed: a benchmark whose server failed is not to be trusted.
 */
static int bench_daemon_stop(struct bench_daemon *d)
{
	double deadline = now_s() + BENCH_STOP_TIMEOUT_S;
	int status = 0, rc = 0;

	if (d->pid > 0) {
		kill(d->pid, SIGTERM);
		for (;;) {
			pid_t w = waitpid(d->pid, &status, WNOHANG);

			if (w == d->pid || (w < 0 && errno != EINTR))
				break;
			if (now_s() > deadline) {
				fprintf(stderr, "kvstash bench: kvstashd ignored SIGTERM for %.0f s; "
					"killing it\n", BENCH_STOP_TIMEOUT_S);
				kill(d->pid, SIGKILL);
				while (waitpid(d->pid, &status, 0) < 0 && errno == EINTR)
					;
				rc = -1;
				break;
			}
			usleep(10000);
		}
		if (!WIFEXITED(status) || WEXITSTATUS(status)) {
			fprintf(stderr, "kvstash bench: kvstashd ended with %s %d\n",
				WIFEXITED(status) ? "status" : "signal",
				WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
			bench_daemon_print_log(d);
			rc = -1;
		}
		d->pid = 0;
	}
	if (d->dir[0])
		bench_daemon_rmdir(d);
	return rc;
}

static void bench_shuffle(int64_t *v, size_t n, uint64_t *rng)
{
	for (size_t i = n - 1; i > 0; i--) {
		*rng = mix64(*rng);
		size_t j = (size_t)(*rng % (i + 1));
		int64_t t = v[i];

		v[i] = v[j];
		v[j] = t;
	}
}

/*
 * Connect, size the paged buffer for @max_chunks per request (as many blocks
 * again to retrieve into), fill it with a pattern unique per 8 bytes (every
 * page touched before timing), register it. 0 or -1 with the reason printed.
 */
static int bench_setup(struct bench_ctx *b, const char *endpoint, int max_chunks)
{
	int timeout = b->o->timeout_set ? b->o->timeout_ms : BENCH_TIMEOUT_MS;
	struct kvstash_host_layer layers[BENCH_LAYERS];
	struct kvstash_kv_layout lay = { .layout = KVSTASH_LAYOUT_FLASH_ATTN, .dtype = "bfloat16",
					 .ndim = 5 };
	size_t max_blocks;
	int64_t *all;
	uint64_t rng;

	if (kvstash_connect(endpoint, timeout, &b->c)) {
		fprintf(stderr, "kvstash bench: %s\n", kvstash_last_error());
		return -1;
	}
	if (kvstash_get_chunk_size(b->c, &b->chunk_tokens)) {
		fprintf(stderr, "kvstash bench: GET_CHUNK_SIZE at %s: %s\n", endpoint,
			kvstash_last_error());
		return -1;
	}
	if (!b->chunk_tokens || b->chunk_tokens % BENCH_BLOCK_TOKENS) {
		fprintf(stderr, "kvstash bench: chunk size %u is not a multiple of the %d-token "
			"block\n", b->chunk_tokens, BENCH_BLOCK_TOKENS);
		return -1;
	}
	max_blocks = (size_t)max_chunks * b->chunk_tokens / BENCH_BLOCK_TOKENS;
	b->nb = 2 * max_blocks;
	b->block_bytes = BENCH_BLOCK_TOKENS * BENCH_ROW_BYTES;
	b->layer_bytes = 2 * b->nb * b->block_bytes;
	b->object_bytes = 2 * (size_t)BENCH_LAYERS * b->chunk_tokens * BENCH_ROW_BYTES;
	if (kvstash_host_buffer_create(&b->buf, b->layer_bytes * BENCH_LAYERS, "kvstash-bench")) {
		fprintf(stderr, "kvstash bench: KV buffer of %zu MiB: %s\n",
			b->layer_bytes * BENCH_LAYERS >> 20, kvstash_last_error());
		return -1;
	}
	all = calloc(b->nb, sizeof(*all));
	b->src = calloc(max_blocks, sizeof(*b->src));
	b->dst = calloc(max_blocks, sizeof(*b->dst));
	b->tokens = calloc(max_blocks * BENCH_BLOCK_TOKENS, sizeof(*b->tokens));
	if (!all || !b->src || !b->dst || !b->tokens) {
		free(all);
		fprintf(stderr, "kvstash bench: out of memory\n");
		return -1;
	}
	/* Paged caches are fragmented: blocks in no particular order. */
	for (size_t i = 0; i < b->nb; i++)
		all[i] = (int64_t)i;
	rng = b->seed;
	bench_shuffle(all, b->nb, &rng);
	memcpy(b->src, all, max_blocks * sizeof(*all));
	memcpy(b->dst, all + max_blocks, max_blocks * sizeof(*all));
	free(all);
	for (size_t i = 0; i < b->buf.bytes / 8; i++) {
		uint64_t v = mix64(b->seed ^ (i * 0x9e3779b97f4a7c15ull));

		memcpy((uint8_t *)b->buf.ptr + 8 * i, &v, 8);
	}
	lay.shape[0] = 2;
	lay.shape[1] = (int64_t)b->nb;
	lay.shape[2] = BENCH_BLOCK_TOKENS;
	lay.shape[3] = BENCH_HEADS;
	lay.shape[4] = BENCH_HEAD_SIZE;
	for (int l = 0; l < BENCH_LAYERS; l++)
		layers[l] = (struct kvstash_host_layer){ .path = b->buf.path,
							 .offset = (uint64_t)l * b->layer_bytes,
							 .nbytes = b->buf.bytes };
	if (kvstash_register_host(b->c, b->instance, BENCH_MODEL, 1, &lay, layers, BENCH_LAYERS)) {
		fprintf(stderr, "kvstash bench: REGISTER: %s\n", kvstash_last_error());
		return -1;
	}
	b->registered = true;
	return 0;
}

static void bench_teardown(struct bench_ctx *b)
{
	if (b->registered)
		kvstash_unregister(b->c, b->instance);
	if (b->c)
		kvstash_close(b->c);
	if (b->buf.ptr)
		kvstash_host_buffer_destroy(&b->buf);
	free(b->src);
	free(b->dst);
	free(b->tokens);
	free(b->mc_src);
	free(b->mc_dst);
}

/* One request of @chunks; 0, or a negative errno with the reason printed. */
typedef int (*bench_op_fn)(struct bench_ctx *b, int chunks);

static struct kvstash_key bench_key(const struct bench_ctx *b, int chunks, const char *rid)
{
	size_t ntok = (size_t)chunks * b->chunk_tokens;

	return (struct kvstash_key){ .model = BENCH_MODEL, .world_size = 1, .worker_id = 0,
				     .tokens = b->tokens, .ntokens = ntok, .start = 0,
				     .end = ntok, .request_id = rid };
}

/* STORE a fresh prompt: new tokens from the first one, so every chunk is new. */
static int bench_store(struct bench_ctx *b, int chunks)
{
	size_t ntok = (size_t)chunks * b->chunk_tokens;
	uint64_t p = b->prompts++;
	char rid[64];
	int rc;

	for (size_t t = 0; t < ntok; t++)
		b->tokens[t] = (uint32_t)mix64(b->seed ^ (p << 32) ^ t);
	snprintf(rid, sizeof(rid), "kvstash-bench-%" PRIx64 "-%" PRIu64, b->seed, p);
	struct kvstash_key k = bench_key(b, chunks, rid);

	rc = kvstash_store(b->c, &k, b->instance, b->src, ntok / BENCH_BLOCK_TOKENS);
	if (rc) {
		bench_progress_end(&b->pg);
		fprintf(stderr, "kvstash bench: STORE of %d chunk(s): %s\n", chunks,
			kvstash_last_error());
		return rc;
	}
	kvstash_end_session(b->c, rid);
	return 0;
}

/* RETRIEVE the last prompt stored into the dst blocks. */
static int bench_retrieve(struct bench_ctx *b, int chunks)
{
	size_t ntok = (size_t)chunks * b->chunk_tokens;
	struct kvstash_key k = bench_key(b, chunks, "kvstash-bench-retrieve");
	int rc = kvstash_retrieve(b->c, &k, b->instance, b->dst, ntok / BENCH_BLOCK_TOKENS, 0);

	if (rc) {
		bench_progress_end(&b->pg);
		fprintf(stderr, "kvstash bench: RETRIEVE of %d chunk(s): %s\n", chunks,
			kvstash_last_error());
	}
	return rc;
}

static int bench_memcpy(struct bench_ctx *b, int chunks)
{
	memcpy(b->mc_dst, b->mc_src, (size_t)chunks * b->object_bytes);
	return 0;
}

/*
 * Run @op once untimed, then back to back for --seconds (at least once),
 * and put the request bytes per second into *gbps. 0, -EINTR on SIGINT/SIGTERM, or @op's error.
 */
static int bench_time(struct bench_ctx *b, int chunks, bench_op_fn op, const char *label,
		      double *gbps)
{
	double bytes = (double)chunks * (double)b->object_bytes, t0, t;
	uint64_t n = 0;
	int rc;

	*gbps = 0;
	bench_draw(&b->pg, 0, label, 0);
	/* One untimed request: the server maps the client's pages on first use. */
	if (atomic_load(&cli_stop))
		return -EINTR;
	rc = op(b, chunks);
	if (rc)
		return rc;
	t0 = now_s();
	do {
		if (atomic_load(&cli_stop))
			return -EINTR;
		rc = op(b, chunks);
		if (rc)
			return rc;
		n++;
		t = now_s() - t0;
		*gbps = (double)n * bytes / t / 1e9;
		bench_draw(&b->pg, t / b->o->seconds, label, *gbps);
	} while (t < b->o->seconds);
	bench_step_done(&b->pg, label, *gbps);
	return 0;
}

/*
 * Zero the dst blocks of a @chunks request, RETRIEVE into them once more and
 * compare each (layer, plane, block) with the src block it was stored from.
 * 0, -EIO on a mismatch, or the RETRIEVE's error.
 */
static int bench_verify(struct bench_ctx *b, int chunks)
{
	size_t nblk = (size_t)chunks * b->chunk_tokens / BENCH_BLOCK_TOKENS, bad = 0;
	uint8_t *base = b->buf.ptr;
	int rc;

	for (size_t l = 0; l < BENCH_LAYERS; l++)
		for (size_t p = 0; p < 2; p++)
			for (size_t i = 0; i < nblk; i++)
				memset(base + l * b->layer_bytes +
					       (p * b->nb + (size_t)b->dst[i]) * b->block_bytes,
				       0, b->block_bytes);
	rc = bench_retrieve(b, chunks);
	if (rc)
		return rc;
	for (size_t l = 0; l < BENCH_LAYERS; l++) {
		uint8_t *lb = base + l * b->layer_bytes;

		for (size_t p = 0; p < 2; p++)
			for (size_t i = 0; i < nblk; i++)
				bad += memcmp(lb + (p * b->nb + (size_t)b->src[i]) * b->block_bytes,
					      lb + (p * b->nb + (size_t)b->dst[i]) * b->block_bytes,
					      b->block_bytes) != 0;
	}
	if (bad) {
		bench_progress_end(&b->pg);
		fprintf(stderr, "kvstash bench: RETRIEVE of %d chunk(s) returned wrong bytes in "
			"%zu of %zu blocks\n", chunks, bad, nblk * 2 * BENCH_LAYERS);
		return -EIO;
	}
	return 0;
}

/*
 * STORE fresh prompts of @chunks, untimed, until @bytes went in: the pool of
 * a fresh kvstashd is touched on use, and the timed requests should measure
 * copies, not its page faults.
 */
static int bench_warmup(struct bench_ctx *b, int chunks, double bytes)
{
	double done = 0, req = (double)chunks * (double)b->object_bytes;
	char label[96];

	snprintf(label, sizeof(label), "warm-up: STORE %.0f MiB", bytes / (1 << 20));
	bench_draw(&b->pg, 0, label, 0);
	while (done < bytes) {
		int rc;

		if (atomic_load(&cli_stop))
			return -EINTR;
		rc = bench_store(b, chunks);
		if (rc)
			return rc;
		done += req;
		bench_draw(&b->pg, done / bytes, label, 0);
	}
	b->pg.step++;
	if (!b->pg.tty)
		fprintf(stderr, "kvstash bench: [%2d/%d] %s\n", b->pg.step, b->pg.nsteps, label);
	return 0;
}

/* One size: memcpy, STORE, RETRIEVE, verify. */
static int bench_one_size(struct bench_ctx *b, struct bench_row *r)
{
	char label[96];
	size_t bytes = (size_t)r->chunks * b->object_bytes;
	int rc;

	r->mib = (double)bytes / (1 << 20);
	/* Fresh buffers per size, touched before the clock starts. */
	free(b->mc_src);
	free(b->mc_dst);
	b->mc_src = malloc(bytes);
	b->mc_dst = malloc(bytes);
	if (!b->mc_src || !b->mc_dst) {
		fprintf(stderr, "kvstash bench: out of memory for the memcpy baseline\n");
		return -ENOMEM;
	}
	memset(b->mc_src, 0x5a, bytes);
	memset(b->mc_dst, 0, bytes);
	snprintf(label, sizeof(label), "%2d chunk(s) %5.0f MiB  memcpy", r->chunks, r->mib);
	rc = bench_time(b, r->chunks, bench_memcpy, label, &r->memcpy_gbps);
	free(b->mc_src);
	free(b->mc_dst);
	b->mc_src = b->mc_dst = NULL;
	if (rc)
		return rc;
	snprintf(label, sizeof(label), "%2d chunk(s) %5.0f MiB  STORE", r->chunks, r->mib);
	rc = bench_time(b, r->chunks, bench_store, label, &r->store_gbps);
	if (rc)
		return rc;
	snprintf(label, sizeof(label), "%2d chunk(s) %5.0f MiB  RETRIEVE", r->chunks, r->mib);
	rc = bench_time(b, r->chunks, bench_retrieve, label, &r->retrieve_gbps);
	if (rc)
		return rc;
	return bench_verify(b, r->chunks);
}

struct bench_stat {
	const char *name;
	uint64_t value;
	bool found;
};

static int bench_stat_cb(const char *name, uint64_t value, void *arg)
{
	struct bench_stat *s = arg;

	if (!strcmp(name, s->name)) {
		s->value = value;
		s->found = true;
		return 1;
	}
	return 0;
}

/* The server's counter @name into *out; false if it has none (or STATS failed). */
static bool bench_server_stat(kvstash_client *c, const char *name, uint64_t *out)
{
	struct bench_stat s = { .name = name };

	kvstash_stats(c, bench_stat_cb, &s);
	*out = s.value;
	return s.found;
}

static void bench_print_table(const struct bench_ctx *b, const char *endpoint, bool started,
			      const struct bench_row *rows, int n)
{
	uint64_t workers = 0;
	bool have_workers = bench_server_stat(b->c, "workers", &workers);

	printf("kvstash bench: kvstashd at %s (%s", endpoint,
	       started ? "started for this run" : "already running");
	if (have_workers)
		printf(", %" PRIu64 " transfer worker(s)", workers);
	printf(")\n");
	printf("Llama-3-8B-like layout: %d layers, flash_attn [2, NB, %d, %d, %d] bf16, "
	       "%u-token chunks of %.0f MiB\n", BENCH_LAYERS, BENCH_BLOCK_TOKENS, BENCH_HEADS,
	       BENCH_HEAD_SIZE, b->chunk_tokens, (double)b->object_bytes / (1 << 20));
	printf("one request at a time, %.3g s per figure; memcpy: one thread, same sizes, same run; "
	       "1 GB = 1e9 B\n\n", b->o->seconds);
	printf("%6s %8s %11s %14s %12s %13s %16s\n", "chunks", "MiB", "STORE GB/s",
	       "RETRIEVE GB/s", "memcpy GB/s", "STORE/memcpy", "RETRIEVE/memcpy");
	for (int i = 0; i < n; i++) {
		const struct bench_row *r = &rows[i];

		printf("%6d %8.0f %11.2f %14.2f %12.2f %13.2f %16.2f\n", r->chunks, r->mib,
		       r->store_gbps, r->retrieve_gbps, r->memcpy_gbps,
		       r->store_gbps / r->memcpy_gbps, r->retrieve_gbps / r->memcpy_gbps);
	}
	printf("\nevery size's RETRIEVE was checked byte for byte against the blocks it was "
	       "stored from\n");
}

/* @s in a gnuplot single-quoted string: ' doubles. */
static void bench_gp_str(FILE *f, const char *s)
{
	fputc('\'', f);
	for (; *s; s++) {
		if (*s == '\'')
			fputc('\'', f);
		fputc(*s, f);
	}
	fputc('\'', f);
}

/* FILE.png -> FILE.<ext>, else FILE + .<ext>. */
static void bench_sibling(const char *png, const char *ext, char *out, size_t len)
{
	size_t n = strlen(png);

	if (n > 4 && !strcasecmp(png + n - 4, ".png"))
		n -= 4;
	snprintf(out, len, "%.*s.%s", (int)n, png, ext);
}

/* Create the three --plot files now, so a bad path fails before the sweep. */
static int bench_plot_writable(const char *png)
{
	char path[4200];
	const char *ext[] = { NULL, "dat", "gp" };

	for (int i = 0; i < 3; i++) {
		FILE *f;

		if (ext[i])
			bench_sibling(png, ext[i], path, sizeof(path));
		else
			snprintf(path, sizeof(path), "%s", png);
		f = fopen(path, "w");
		if (!f) {
			fprintf(stderr, "kvstash bench: --plot: cannot write %s: %s\n", path,
				strerror(errno));
			return -1;
		}
		fclose(f);
	}
	return 0;
}

/*
 * Write the sweep to PLOT.dat, a gnuplot script to PLOT.gp, run gnuplot on
 * it and check PLOT starts with the PNG signature. 0 or -1 with the reason
 * printed.
 */
static int bench_plot(const struct bench_ctx *b, const char *gnuplot, const struct bench_row *rows,
		      int n)
{
	static const unsigned char png_sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
	const char *png = b->o->plot;
	char dat[4200], gp[4200];
	unsigned char sig[8];
	double lo = rows[0].mib, hi = rows[0].mib;
	uint64_t workers = 0;
	bool have_workers = bench_server_stat(b->c, "workers", &workers);
	FILE *f;
	int status;
	pid_t pid;

	bench_sibling(png, "dat", dat, sizeof(dat));
	bench_sibling(png, "gp", gp, sizeof(gp));
	f = fopen(dat, "w");
	if (!f) {
		fprintf(stderr, "kvstash bench: %s: %s\n", dat, strerror(errno));
		return -1;
	}
	fprintf(f, "# kvstash bench: host STORE/RETRIEVE through kvstashd, GB/s (1 GB = 1e9 B)\n");
	fprintf(f, "# chunks MiB store_gbps retrieve_gbps memcpy_gbps\n");
	for (int i = 0; i < n; i++) {
		fprintf(f, "%d %.0f %.4f %.4f %.4f\n", rows[i].chunks, rows[i].mib,
			rows[i].store_gbps, rows[i].retrieve_gbps, rows[i].memcpy_gbps);
		lo = fmin(lo, rows[i].mib);
		hi = fmax(hi, rows[i].mib);
	}
	if (fclose(f)) {
		fprintf(stderr, "kvstash bench: %s: %s\n", dat, strerror(errno));
		return -1;
	}
	f = fopen(gp, "w");
	if (!f) {
		fprintf(stderr, "kvstash bench: %s: %s\n", gp, strerror(errno));
		return -1;
	}
	fprintf(f, "# kvstash bench --plot: rerun with 'gnuplot %s' after editing\n", gp);
	fprintf(f, "set terminal pngcairo size 1000,620 noenhanced font 'sans,11'\n");
	fprintf(f, "set output ");
	bench_gp_str(f, png);
	fprintf(f, "\nset title \"kvstash host backend: STORE / RETRIEVE through kvstashd vs "
		"single-thread memcpy\\nLlama-3-8B-like layout (32 layers, 8 x 128 bf16, "
		"%u-token chunks of %.0f MiB)", b->chunk_tokens, (double)b->object_bytes / (1 << 20));
	if (have_workers)
		fprintf(f, ", %" PRIu64 " transfer worker(s)", workers);
	fprintf(f, ", one request at a time\"\n");
	fprintf(f, "set xlabel 'request size (MiB, log2 scale)'\n");
	fprintf(f, "set ylabel 'GB/s (1 GB = 1e9 bytes)'\n");
	fprintf(f, "set logscale x 2\n");
	fprintf(f, "set xrange [%g:%g]\n", lo / 1.5, hi * 1.5);
	fprintf(f, "set yrange [0:*]\n");
	fprintf(f, "set grid\n");
	fprintf(f, "set key outside below horizontal\n");
	fprintf(f, "set bmargin 5\n");
	fprintf(f, "set datafile commentschars '#'\n");
	fprintf(f, "plot ");
	bench_gp_str(f, dat);
	fprintf(f, " using 2:5:xtic(2) title 'memcpy, 1 thread' with linespoints "
		"dt 2 lw 2 pt 6 ps 1.2 lc rgb '#777777', \\\n     '' using 2:3 title 'STORE "
		"(paged -> pool)' with linespoints lw 2 pt 7 ps 1.2 lc rgb '#1f77b4', \\\n"
		"     '' using 2:4 title 'RETRIEVE (pool -> paged)' with linespoints lw 2 pt 5 "
		"ps 1.2 lc rgb '#d62728', \\\n"
		"     '' using 2:3:(sprintf('%%.1f', $3)) notitle with labels offset 0,-1 "
		"tc rgb '#1f77b4', \\\n"
		"     '' using 2:4:(sprintf('%%.1f', $4)) notitle with labels offset 0,1 "
		"tc rgb '#d62728'\n");
	if (fclose(f)) {
		fprintf(stderr, "kvstash bench: %s: %s\n", gp, strerror(errno));
		return -1;
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid == 0) {
		execl(gnuplot, "gnuplot", gp, (char *)NULL);
		dprintf(STDERR_FILENO, "kvstash bench: cannot run %s: %s\n", gnuplot,
			strerror(errno));
		_exit(127);
	}
	if (pid < 0) {
		fprintf(stderr, "kvstash bench: fork: %s\n", strerror(errno));
		return -1;
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "kvstash bench: gnuplot failed (%s %d) on %s; the data is in %s\n",
			WIFEXITED(status) ? "status" : "signal",
			WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), gp, dat);
		return -1;
	}
	f = fopen(png, "rb");
	if (!f || fread(sig, 1, sizeof(sig), f) != sizeof(sig) || memcmp(sig, png_sig, 8)) {
		fprintf(stderr, "kvstash bench: gnuplot did not write a PNG to %s\n", png);
		if (f)
			fclose(f);
		return -1;
	}
	fclose(f);
	printf("plot: %s (data %s, gnuplot script %s)\n", png, dat, gp);
	return 0;
}

/* The host sweep. 0, 1 (failure), 130 (interrupted). */
static int bench_host(const struct cli_opts *o, const char *bindir)
{
	struct bench_daemon d = { 0 };
	struct bench_ctx b = { .o = o, .buf = { .fd = -1 } };
	struct bench_row rows[BENCH_MAX_SIZES] = { { 0 } };
	const char *endpoint = o->endpoint, *gnuplot = NULL;
	char gnuplot_path[4200];
	int max_chunks = 0, rc = 0, ret = 1;
	struct sigaction sa = { .sa_handler = cli_on_signal }, old_int, old_term;

	/* Fail fast, before a sweep of minutes, if the picture cannot be drawn. */
	if (o->plot) {
		if (!bench_find_in_path("gnuplot", gnuplot_path, sizeof(gnuplot_path))) {
			fprintf(stderr, "kvstash bench: --plot needs gnuplot, which is not installed "
				"(Debian: apt-get install gnuplot-nox); nothing was measured\n");
			return 1;
		}
		gnuplot = gnuplot_path;
		if (bench_plot_writable(o->plot))
			return 1;
	}
	for (int i = 0; i < o->nsizes; i++) {
		rows[i].chunks = o->sizes[i];
		if (o->sizes[i] > max_chunks)
			max_chunks = o->sizes[i];
	}
	b.seed = mix64((uint64_t)time(NULL) ^ (uint64_t)getpid() << 20);
	b.instance = (int64_t)(b.seed & 0x7fffffff);
	b.pg.tty = isatty(STDERR_FILENO);
	b.pg.nsteps = 1 + 3 * o->nsizes;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	if (!endpoint) {
		/* Objects of the standard 256-token chunk: 32 MiB. */
		size_t req_mib = (size_t)max_chunks * 2 * BENCH_LAYERS * 256 * BENCH_ROW_BYTES >> 20;
		size_t pool_mib = BENCH_POOL_REQUESTS * req_mib;

		if (pool_mib < BENCH_MIN_POOL_MIB)
			pool_mib = BENCH_MIN_POOL_MIB;
		if (bench_daemon_start(&d, bindir, pool_mib))
			goto out;
		endpoint = d.endpoint;
	}
	if (bench_setup(&b, endpoint, max_chunks))
		goto out;
	{
		/*
		 * Fill our own kvstashd's pool and then some; of a running
		 * server's pool, only as much as a few requests use.
		 */
		double req = (double)max_chunks * (double)b.object_bytes;
		double warm = BENCH_WARMUP_REQUESTS * req;
		uint64_t pool = 0;

		if (bench_server_stat(b.c, "pool_bytes", &pool) && pool &&
		    (d.pid > 0 || (double)pool + req < warm))
			warm = (double)pool + req;
		rc = bench_warmup(&b, max_chunks, warm);
	}
	for (int i = 0; !rc && i < o->nsizes; i++)
		rc = bench_one_size(&b, &rows[i]);
	bench_progress_end(&b.pg);
	if (rc == -EINTR) {
		fprintf(stderr, "kvstash bench: interrupted\n");
		ret = 130;
		goto out;
	}
	if (rc)
		goto out;
	bench_print_table(&b, endpoint, d.pid > 0, rows, o->nsizes);
	fflush(stdout);
	ret = 0;
	if (o->plot && bench_plot(&b, gnuplot, rows, o->nsizes))
		ret = 1;
out:
	bench_progress_end(&b.pg);
	bench_teardown(&b);
	if (bench_daemon_stop(&d) && ret == 0)
		ret = 1;
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	return ret;
}

/*
 * Run <bindir>/bench/@name with @args, its output passed through. 0 if it
 * ran and passed, 1 if it failed, 77 if it skipped (exit 77) or is not built.
 */
static int bench_program(const char *bindir, const char *name, char *const args[], int nargs,
			 const char *skip_why)
{
	char exe[4200];
	char *argv[8];
	int status;
	pid_t pid;

	if (nargs > 6)
		return 1;

	snprintf(exe, sizeof(exe), "%s/bench/%s", bindir, name);
	if (access(exe, X_OK)) {
		printf("kvstash bench: %s: not built (%s): %s\n", name, exe, skip_why);
		return 77;
	}
	argv[0] = exe;
	for (int i = 0; i < nargs; i++)
		argv[i + 1] = args[i];
	argv[nargs + 1] = NULL;
	printf("== %s\n", name);
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid == 0) {
		execv(exe, argv);
		dprintf(STDERR_FILENO, "kvstash bench: cannot run %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	if (pid < 0) {
		fprintf(stderr, "kvstash bench: fork: %s\n", strerror(errno));
		return 1;
	}
	/* No deadline: the program is a benchmark of its own; Ctrl-C reaches it too. */
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return 1;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
		printf("kvstash bench: %s: skipped (exit 77): %s\n", name, skip_why);
		return 77;
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "kvstash bench: %s failed (%s %d)\n", name,
			WIFEXITED(status) ? "status" : "signal",
			WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
		return 1;
	}
	return 0;
}

static int cmd_bench(const struct cli_opts *o, const char *argv0)
{
	static const char no_gpu[] = "no GPU/CUDA";
	char bindir[4096], secs[32];
	int ran = 0, failed = 0, rc;

	if (bench_self_dir(argv0, bindir, sizeof(bindir)))
		return 1;
	if (!o->gpu && !o->tiers)
		return bench_host(o, bindir);
	snprintf(secs, sizeof(secs), "%g", o->seconds);
	if (o->gpu) {
		static char flag_seconds[] = "--seconds";
		char *sargs[] = { flag_seconds, secs };

		rc = bench_program(bindir, "gpu_bench", NULL, 0, no_gpu);
		ran += rc == 0;
		failed += rc == 1;
		rc = bench_program(bindir, "gpu_server_bench", sargs, o->seconds_set ? 2 : 0, no_gpu);
		ran += rc == 0;
		failed += rc == 1;
		if (!ran && !failed)
			printf("kvstash bench --gpu: no GPU on this machine or no CUDA in this build "
			       "(cmake -DKVSTASH_CUDA=ON on a host with a GPU): nothing measured\n");
	}
	if (o->tiers) {
		rc = bench_program(bindir, "tier_bench", NULL, 0, "the tier benchmark cannot run here");
		failed += rc == 1;
	}
	return failed ? 1 : 0;
}

/* --sizes 1,2,4: chunks per request, 1..BENCH_MAX_CHUNKS, at most BENCH_MAX_SIZES. */
static int parse_sizes(const char *s, struct cli_opts *o)
{
	const char *p = s;

	o->nsizes = 0;
	for (;;) {
		char *end;
		long v;

		errno = 0;
		v = strtol(p, &end, 10);
		if (errno || end == p || v < 1 || v > BENCH_MAX_CHUNKS || o->nsizes == BENCH_MAX_SIZES ||
		    (*end && *end != ',')) {
			fprintf(stderr, "kvstash: --sizes: '%s' is not a list of at most %d chunk "
				"counts between 1 and %d, like 1,2,4\n", s, BENCH_MAX_SIZES,
				BENCH_MAX_CHUNKS);
			return -1;
		}
		o->sizes[o->nsizes++] = (int)v;
		if (!*end)
			return 0;
		p = end + 1;
	}
}

static int parse_seconds(const char *s, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v > 0) || v > BENCH_MAX_SECONDS) {
		fprintf(stderr, "kvstash: --seconds: '%s' is not a number of seconds in (0, %.0f]\n", s,
			BENCH_MAX_SECONDS);
		return -1;
	}
	*out = v;
	return 0;
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
	       OPT_HEAD_SIZE, OPT_BLOCK_SIZE, OPT_JSON, OPT_SECONDS, OPT_SIZES, OPT_PLOT, OPT_GPU,
	       OPT_TIERS, OPT_PRINT_MAN, OPT_WARMUP };
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
		{ "warmup", required_argument, NULL, OPT_WARMUP },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "quiet", no_argument, NULL, 'q' },
		{ "seconds", required_argument, NULL, OPT_SECONDS },
		{ "sizes", required_argument, NULL, OPT_SIZES },
		{ "plot", required_argument, NULL, OPT_PLOT },
		{ "gpu", no_argument, NULL, OPT_GPU },
		{ "tiers", no_argument, NULL, OPT_TIERS },
		{ "help", no_argument, NULL, 'h' },
		{ "print-man", no_argument, NULL, OPT_PRINT_MAN },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = {
		.endpoint = getenv("KVSTASH_ENDPOINT"), .timeout_ms = CLI_DEFAULT_TIMEOUT_MS,
		.count = 1, .interval_ms = 100, .chunks = 8, .layers = 4, .layout = "flash_attn",
		.dtype = "bfloat16", .model = "kvstash-store-test", .heads = 8, .head_size = 0,
		.block_size = 16, .warmup = 1, .seconds = BENCH_DEFAULT_SECONDS,
	};
	const char *cmd;
	int opt, bad = 0;

	/* Options go before or after the command (kvstash -e EP ping == kvstash ping -e EP):
	 * getopt_long moves the operands to the end. */
	while ((opt = getopt_long(argc, argv, "e:t:c:i:qh", long_opts, NULL)) != -1) {
		switch (opt) {
		case 'e':
			o.endpoint = optarg;
			o.endpoint_set = true;
			break;
		case 't':
			bad |= parse_int(optarg, "--timeout-ms", 1, 3600000, &o.timeout_ms);
			o.timeout_set = true;
			break;
		case 'c':
			bad |= parse_int(optarg, "--count", 1, 1000000, &o.count);
			o.count_set = true;
			break;
		case 'i':
			bad |= parse_int(optarg, "--interval-ms", 0, 3600000, &o.interval_ms);
			o.interval_set = true;
			break;
		case OPT_JSON: o.json = true; break;
		case 'q': o.quiet = true; break;
		case OPT_SECONDS:
			bad |= parse_seconds(optarg, &o.seconds);
			o.seconds_set = true;
			break;
		case OPT_SIZES: bad |= parse_sizes(optarg, &o); break;
		case OPT_PLOT:
			if (!*optarg || strchr(optarg, '\n')) {
				fprintf(stderr, "kvstash: --plot: '%s' is not a file name\n", optarg);
				bad = -1;
			}
			o.plot = optarg;
			break;
		case OPT_GPU: o.gpu = true; break;
		case OPT_TIERS: o.tiers = true; break;
		case OPT_CHUNKS: bad |= parse_int(optarg, "--chunks", 1, 4096, &o.chunks); break;
		case OPT_LAYERS: bad |= parse_int(optarg, "--layers", 1, 1024, &o.layers); break;
		case OPT_WARMUP: bad |= parse_int(optarg, "--warmup", 0, 100, &o.warmup); break;
		case OPT_LAYOUT: o.layout = optarg; break;
		case OPT_DTYPE: o.dtype = optarg; break;
		case OPT_MODEL: o.model = optarg; break;
		case OPT_HEADS: bad |= parse_int(optarg, "--heads", 1, 1024, &o.heads); break;
		case OPT_HEAD_SIZE: bad |= parse_int(optarg, "--head-size", 1, 65536, &o.head_size); break;
		case OPT_BLOCK_SIZE: bad |= parse_int(optarg, "--block-size", 1, 4096, &o.block_size); break;
		case 'h': usage(stdout); return 0;
		case OPT_PRINT_MAN: return print_man();
		default: usage(stderr); return 2;
		}
	}
	if (bad)
		return 2;
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
	cmd = argv[optind++];
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
	if (!strcmp(cmd, "bench")) {
		if ((o.gpu || o.tiers) && (o.plot || o.endpoint_set || o.nsizes)) {
			fprintf(stderr, "kvstash bench: --plot, --sizes and --endpoint are for the "
				"host sweep; --gpu and --tiers run their own programs\n");
			return 2;
		}
		if (!o.endpoint_set)
			o.endpoint = NULL;
		if (!o.nsizes) {
			o.nsizes = (int)(sizeof(bench_default_sizes) / sizeof(bench_default_sizes[0]));
			memcpy(o.sizes, bench_default_sizes, sizeof(bench_default_sizes));
		}
		return cmd_bench(&o, argv[0]);
	}
	fprintf(stderr, "kvstash: unknown command '%s'\n\n", cmd);
	usage(stderr);
	return 2;
}
