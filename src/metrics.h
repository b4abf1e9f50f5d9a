/*
 * metrics.h - lock-free latency histograms and a Prometheus text writer.
 *
 * Histograms are arrays of _Atomic counters: any thread observes, any
 * thread renders, nobody takes a lock (metrics are leaves of the lock
 * order). The writer appends to a growable buffer owned by the caller.
 */
#ifndef KS_METRICS_H
#define KS_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Bucket upper bounds in seconds: 50 us ... 10 s, then +Inf. */
#define METRICS_HIST_BOUNDS 17
struct metrics_hist {
	_Atomic uint64_t buckets[METRICS_HIST_BOUNDS + 1];	/* not cumulative; last = +Inf */
	_Atomic uint64_t count;
	_Atomic uint64_t sum_ns;
};

/* The bucket bounds, in seconds (METRICS_HIST_BOUNDS of them). */
extern const double metrics_hist_bounds_s[METRICS_HIST_BOUNDS];

void metrics_hist_observe(struct metrics_hist *h, uint64_t ns);
/* Approximate quantile (0..1) in seconds from the buckets; 0 when empty. */
double metrics_hist_quantile(const struct metrics_hist *h, double q);

/* A growable text buffer; starts zeroed. 'failed' is set on -ENOMEM and sticks. */
struct metrics_buf {
	char *data;
	size_t len, cap;
	int failed;
};
void metrics_buf_free(struct metrics_buf *b);
void metrics_printf(struct metrics_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Prometheus text exposition (version 0.0.4). @labels is NULL or the inside
 * of the braces, e.g. "device=\"host\"". HELP/TYPE lines are written only
 * when @help is non-NULL, so a family with several label sets writes them
 * once (pass NULL for the later ones).
 */
void metrics_counter(struct metrics_buf *b, const char *name, const char *help,
		     const char *labels, uint64_t value);
void metrics_gauge(struct metrics_buf *b, const char *name, const char *help,
		   const char *labels, double value);
/* A counter with a fractional value (a total of seconds). */
void metrics_counter_f(struct metrics_buf *b, const char *name, const char *help,
		       const char *labels, double value);
void metrics_histogram(struct metrics_buf *b, const char *name, const char *help,
		       const char *labels, const struct metrics_hist *h);

#endif /* KS_METRICS_H */
