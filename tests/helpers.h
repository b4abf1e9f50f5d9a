/*
 * helpers.h - shared test helpers (liburing test/helpers.h style):
 * helpers_pure.c (libc only) and helpers_daemon.c (kvstashd processes).
 *
 * Exit codes: T_EXIT_PASS 0, T_EXIT_FAIL 1, T_EXIT_SKIP 77.
 * CHECK(cond) prints the failing expression with file:line and makes the
 * test fail at the end (t_result()), without stopping it, so one run shows
 * every broken check. REQUIRE(cond) stops the test at once.
 */
#ifndef KS_TEST_HELPERS_H
#define KS_TEST_HELPERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>

#define T_EXIT_PASS 0
#define T_EXIT_FAIL 1
#define T_EXIT_SKIP 77

extern int t_failures;

#define CHECK(cond)                                                              \
	do {                                                                     \
		if (!(cond)) {                                                   \
			fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
			t_failures++;                                            \
		}                                                                \
	} while (0)

#define CHECK_EQ(a, b)                                                           \
	do {                                                                     \
		long long _a = (long long)(a), _b = (long long)(b);              \
		if (_a != _b) {                                                  \
			fprintf(stderr, "FAIL %s:%d: %s == %s (%lld != %lld)\n", __FILE__, \
				__LINE__, #a, #b, _a, _b);                      \
			t_failures++;                                            \
		}                                                                \
	} while (0)

#define REQUIRE(cond)                                                            \
	do {                                                                     \
		if (!(cond)) {                                                   \
			fprintf(stderr, "FATAL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
			exit(T_EXIT_FAIL);                                       \
		}                                                                \
	} while (0)

/* Prints a summary and returns the exit code for main(). */
int t_result(const char *test_name);

/* Deterministic fill/check of test buffers: byte i of stream @seed. */
void t_fill(void *buf, size_t n, uint64_t seed);
/* Index of the first byte that differs from t_fill(@seed), or (size_t)-1. */
size_t t_verify(const void *buf, size_t n, uint64_t seed);

/* mkdtemp() under $TMPDIR or /tmp; the caller frees. Removed by t_rmtree. */
char *t_mkdtemp(const char *tag);
void t_rmtree(const char *path);

/* Path of a built program (KVSTASH_BUILD_DIR/@rel), static buffer. */
const char *t_build_path(const char *rel);

/*
 * A real kvstashd, started on ipc://<tmpdir>/sock (or the --listen=EP that
 * @args names) with the extra arguments @args (space-separated, may be NULL). Waits until it answers a
 * PING (10 s at most). Its log goes to <tmpdir>/kvstashd.log.
 */
struct t_daemon {
	pid_t pid;
	char *dir;
	char endpoint[512];
	char log_path[512];
};
struct t_daemon *t_daemon_start(const char *args);
/* SIGTERM, wait 10 s, then SIGKILL. Returns the exit status (or -1). */
int t_daemon_stop(struct t_daemon *d);
/* Print the daemon's log to stderr (on failure). */
void t_daemon_dump_log(const struct t_daemon *d);

#endif /* KS_TEST_HELPERS_H */
