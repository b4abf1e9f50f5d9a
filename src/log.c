/*
 * log.c - the log ring and its drain thread.
 *
 * DESIGN: any thread formats its line on its own stack, then takes the ring
 * lock (LOCK_RANK_LOG, below every other lock, so logging is legal while
 * holding any kvstash lock) only to copy it in. The logger thread swaps lines
 * out under the lock and writes them to stderr with no lock held. A full ring
 * drops the new line and counts it.
 *
 * Lock order (the tree is in lock.h): the log ring lock (LOCK_RANK_LOG) may
 * be taken under any lock and takes none.
 */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <unistd.h>

#include "lock.h"

#define LOG_LINE_MAX 512
#define LOG_RING_LINES 4096	/* 2 MiB: minutes of debug output at full rate */
#define LOG_DRAIN_WAIT_MS 200	/* logger wakes at least this often to see stop */

_Atomic int log_level = LOG_INFO;
static _Atomic int log_format = LOG_FORMAT_TEXT;
static _Atomic uint64_t log_dropped;

static struct {
	struct ks_mutex lock;	/* protects everything below */
	struct ks_cond nonempty;
	char lines[LOG_RING_LINES][LOG_LINE_MAX];
	unsigned head, count;
	bool running, stopping;
	pthread_t thread;
} ring;
static _Atomic bool ring_active;

static const char *const level_names[] = { "ERROR", "WARN", "INFO", "DEBUG" };

void log_set_level(enum log_level lvl)
{
	atomic_store_explicit(&log_level, (int)lvl, memory_order_relaxed);
}

void log_set_format(enum log_format fmt)
{
	atomic_store_explicit(&log_format, (int)fmt, memory_order_relaxed);
}

int log_level_parse(const char *s)
{
	static const char *const names[] = { "error", "warn", "info", "debug" };

	for (unsigned i = 0; i < KS_ARRAY_SIZE(names); i++)
		if (!strcasecmp(s, names[i]))
			return (int)i;
	return -EINVAL;
}

uint64_t log_dropped_total(void)
{
	return atomic_load_explicit(&log_dropped, memory_order_relaxed);
}

/* Escape @s into @out as a JSON string body (no quotes). */
static size_t json_escape(char *out, size_t cap, const char *s)
{
	size_t n = 0;

	for (; *s && n + 7 < cap; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			out[n++] = '\\';
			out[n++] = (char)c;
		} else if (c < 0x20) {
			n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
		} else {
			out[n++] = (char)c;
		}
	}
	out[n] = '\0';
	return n;
}

static void format_line(char *buf, size_t cap, enum log_level lvl, const char *file,
			int line, const char *msg)
{
	struct timeval tv;
	struct tm tm;
	char ts[64];
	const char *base = strrchr(file, '/');

	base = base ? base + 1 : file;
	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
		 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
		 (long)(tv.tv_usec / 1000));
	if (atomic_load_explicit(&log_format, memory_order_relaxed) == LOG_FORMAT_JSON) {
		char esc[LOG_LINE_MAX];

		json_escape(esc, sizeof(esc) - 64 > 0 ? sizeof(esc) - 64 : 1, msg);
		snprintf(buf, cap, "{\"ts\":\"%s\",\"level\":\"%s\",\"src\":\"%s:%d\",\"msg\":\"%s\"}\n",
			 ts, level_names[lvl], base, line, esc);
	} else {
		snprintf(buf, cap, "%s %-5s %s:%d: %s\n", ts, level_names[lvl], base, line, msg);
	}
	/* A truncated line still ends with a newline. */
	size_t n = strlen(buf);
	if (n == cap - 1 && buf[n - 1] != '\n')
		buf[n - 1] = '\n';
}

static void write_all(const char *s, size_t n)
{
	while (n) {
		ssize_t w = write(STDERR_FILENO, s, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		s += w;
		n -= (size_t)w;
	}
}

void log_emit(enum log_level lvl, const char *file, int line, const char *fmt, ...)
{
	char msg[LOG_LINE_MAX], buf[LOG_LINE_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	format_line(buf, sizeof(buf), lvl, file, line, msg);

	if (!atomic_load_explicit(&ring_active, memory_order_acquire)) {
		write_all(buf, strlen(buf));
		return;
	}
	if (ks_lock(&ring.lock)) {
		atomic_fetch_add_explicit(&log_dropped, 1, memory_order_relaxed);
		return;
	}
	if (ring.count == LOG_RING_LINES) {
		atomic_fetch_add_explicit(&log_dropped, 1, memory_order_relaxed);
	} else {
		memcpy(ring.lines[(ring.head + ring.count) % LOG_RING_LINES], buf, sizeof(buf));
		ring.count++;
		ks_cond_signal(&ring.nonempty);
	}
	ks_unlock(&ring.lock);
}

static void *logger_main(void *arg)
{
	static char batch[64][LOG_LINE_MAX];
	bool stop = false;

	(void)arg;
	while (!stop) {
		unsigned n = 0;

		if (ks_lock(&ring.lock))
			continue;
		if (ring.count == 0 && !ring.stopping)
			ks_cond_wait_ms(&ring.nonempty, &ring.lock, LOG_DRAIN_WAIT_MS);
		while (ring.count && n < KS_ARRAY_SIZE(batch)) {
			memcpy(batch[n++], ring.lines[ring.head], LOG_LINE_MAX);
			ring.head = (ring.head + 1) % LOG_RING_LINES;
			ring.count--;
		}
		stop = ring.stopping && ring.count == 0 && n == 0;
		ks_unlock(&ring.lock);
		for (unsigned i = 0; i < n; i++)
			write_all(batch[i], strlen(batch[i]));
	}
	return NULL;
}

int log_start(void)
{
	int rc;

	if (ring.running)
		return 0;
	rc = ks_mutex_init(&ring.lock, LOCK_RANK_LOG, "log ring");
	if (rc)
		return rc;
	rc = ks_cond_init(&ring.nonempty);
	if (rc)
		goto out_mutex;
	ring.head = ring.count = 0;
	ring.stopping = false;
	rc = -pthread_create(&ring.thread, NULL, logger_main, NULL);
	if (rc)
		goto out_cond;
	ring.running = true;
	atomic_store_explicit(&ring_active, true, memory_order_release);
	return 0;
out_cond:
	ks_cond_destroy(&ring.nonempty);
out_mutex:
	ks_mutex_destroy(&ring.lock);
	return rc;
}

void log_stop(void)
{
	if (!ring.running)
		return;
	if (ks_lock(&ring.lock) == 0) {
		ring.stopping = true;
		ks_cond_signal(&ring.nonempty);
		ks_unlock(&ring.lock);
	}
	pthread_join(ring.thread, NULL);
	atomic_store_explicit(&ring_active, false, memory_order_release);
	ring.running = false;
	ks_cond_destroy(&ring.nonempty);
	ks_mutex_destroy(&ring.lock);
}
