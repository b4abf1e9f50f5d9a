/*
 * cli.h - what the kvstash tool's files share: the parsed options, the stop
 * flag set by SIGINT/SIGTERM, and the bench command (cli_bench.c).
 */
#ifndef KS_CLI_H
#define KS_CLI_H

#include <stdbool.h>
#include <stdint.h>

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

#define BENCH_MAX_CHUNKS 64	/* 2 GiB per request: past that the memfd outgrows most hosts */
#define BENCH_DEFAULT_SECONDS 1.0
#define BENCH_MAX_SECONDS 3600.0

/* Set by SIGINT/SIGTERM (cli_on_signal): ping and bench stop at the next
 * request and clean up. */
extern _Atomic int cli_stop;
void cli_on_signal(int sig);
/* CLOCK_MONOTONIC in seconds. */
double cli_now_s(void);
/* splitmix64's finaliser: token ids and shuffles that differ per seed. */
uint64_t cli_mix64(uint64_t x);

/* kvstash bench: the host sweep, or the bench/ programs (--gpu, --tiers).
 * Exit status: 0, 1 (a failure) or 2 (usage). */
int cli_bench(const struct cli_opts *o, const char *argv0);

#endif
