/*
 * log.h - leveled, timestamped, one-line-per-event logging.
 *
 * Lines go into a bounded ring drained by a logger thread (log_start), so a
 * stalled stderr never blocks the io thread; when the ring is full, lines are
 * dropped and counted. Before log_start() (unit tests, tools) lines are
 * written synchronously. Levels are checked before arguments are evaluated.
 */
#ifndef KS_LOG_H
#define KS_LOG_H

#include <stdatomic.h>
#include <stdint.h>

#include "compiler.h"

enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };
enum log_format { LOG_FORMAT_TEXT = 0, LOG_FORMAT_JSON = 1 };

extern _Atomic int log_level;

void log_set_level(enum log_level lvl);
void log_set_format(enum log_format fmt);
/* "error", "warn", "info", "debug" -> level; -EINVAL otherwise. */
int log_level_parse(const char *s);

/* Start / stop the logger thread. 0 or -errno. log_stop() flushes the ring. */
int log_start(void);
void log_stop(void);

/* Lines dropped because the ring was full. */
uint64_t log_dropped_total(void);

void log_emit(enum log_level lvl, const char *file, int line, const char *fmt, ...)
	KS_PRINTF(4, 5);

#define log_at(lvl, ...)                                                              \
	do {                                                                          \
		if (atomic_load_explicit(&log_level, memory_order_relaxed) >= (lvl)) \
			log_emit((lvl), __FILE__, __LINE__, __VA_ARGS__);           \
	} while (0)
#define log_error(...) log_at(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_at(LOG_DEBUG, __VA_ARGS__)

#endif /* KS_LOG_H */
