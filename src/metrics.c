/*
 * metrics.c - histograms and the Prometheus text writer (metrics.h).
 */
#include "metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double metrics_hist_bounds_s[METRICS_HIST_BOUNDS] = {
	50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
	50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
};

void metrics_hist_observe(struct metrics_hist *h, uint64_t ns)
{
	double s = (double)ns / 1e9;
	unsigned i = 0;

	while (i < METRICS_HIST_BOUNDS && s > metrics_hist_bounds_s[i])
		i++;
	atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&h->count, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&h->sum_ns, ns, memory_order_relaxed);
}

double metrics_hist_quantile(const struct metrics_hist *h, double q)
{
	uint64_t counts[METRICS_HIST_BOUNDS + 1], total = 0, seen = 0, rank;

	for (unsigned i = 0; i <= METRICS_HIST_BOUNDS; i++) {
		counts[i] = atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
		total += counts[i];
	}
	if (!total)
		return 0;
	rank = (uint64_t)(q * (double)total);
	if (rank >= total)
		rank = total - 1;
	for (unsigned i = 0; i <= METRICS_HIST_BOUNDS; i++) {
		if (seen + counts[i] > rank) {
			/* Linear interpolation inside the bucket, as Prometheus does. */
			double lo = i ? metrics_hist_bounds_s[i - 1] : 0;
			double hi = i < METRICS_HIST_BOUNDS ? metrics_hist_bounds_s[i] : lo * 2;

			return lo + (hi - lo) * ((double)(rank - seen) + 0.5) / (double)counts[i];
		}
		seen += counts[i];
	}
	return metrics_hist_bounds_s[METRICS_HIST_BOUNDS - 1];
}

void metrics_buf_free(struct metrics_buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

void metrics_printf(struct metrics_buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->failed)
		return;
	for (;;) {
		size_t room = b->cap - b->len;

		va_start(ap, fmt);
		n = vsnprintf(b->data ? b->data + b->len : NULL, room, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->failed = -EINVAL;
			return;
		}
		if ((size_t)n < room) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = b->cap ? b->cap * 2 : 4096;

		while (cap - b->len <= (size_t)n)
			cap *= 2;
		char *p = realloc(b->data, cap);

		if (!p) {
			b->failed = -ENOMEM;
			return;
		}
		b->data = p;
		b->cap = cap;
	}
}

static void family(struct metrics_buf *b, const char *name, const char *help, const char *type)
{
	if (help)
		metrics_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metrics_counter(struct metrics_buf *b, const char *name, const char *help,
		     const char *labels, uint64_t value)
{
	family(b, name, help, "counter");
	if (labels)
		metrics_printf(b, "%s{%s} %" PRIu64 "\n", name, labels, value);
	else
		metrics_printf(b, "%s %" PRIu64 "\n", name, value);
}

static void sample_f(struct metrics_buf *b, const char *name, const char *help, const char *type,
		     const char *labels, double value)
{
	family(b, name, help, type);
	if (labels)
		metrics_printf(b, "%s{%s} %.17g\n", name, labels, value);
	else
		metrics_printf(b, "%s %.17g\n", name, value);
}

void metrics_gauge(struct metrics_buf *b, const char *name, const char *help,
		   const char *labels, double value)
{
	sample_f(b, name, help, "gauge", labels, value);
}

void metrics_counter_f(struct metrics_buf *b, const char *name, const char *help,
		       const char *labels, double value)
{
	sample_f(b, name, help, "counter", labels, value);
}

void metrics_histogram(struct metrics_buf *b, const char *name, const char *help,
		       const char *labels, const struct metrics_hist *h)
{
	uint64_t cum = 0;
	const char *sep = labels && *labels ? "," : "";
	const char *lb, *rb;

	family(b, name, help, "histogram");
	if (!labels)
		labels = "";
	for (unsigned i = 0; i <= METRICS_HIST_BOUNDS; i++) {
		cum += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
		if (i < METRICS_HIST_BOUNDS)
			metrics_printf(b, "%s_bucket{%s%sle=\"%g\"} %" PRIu64 "\n", name, labels, sep,
				       metrics_hist_bounds_s[i], cum);
		else
			metrics_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %" PRIu64 "\n", name, labels,
				       sep, cum);
	}
	/* No labels: "name_sum 1.5", never "name_sum{} 1.5". */
	lb = *labels ? "{" : "";
	rb = *labels ? "}" : "";
	metrics_printf(b, "%s_sum%s%s%s %.9f\n", name, lb, labels, rb,
		       (double)atomic_load_explicit(&h->sum_ns, memory_order_relaxed) / 1e9);
	metrics_printf(b, "%s_count%s%s%s %" PRIu64 "\n", name, lb, labels, rb, cum);
}
