/*
 * Description: metrics.c histograms (bucket edges, quantiles) and the Prometheus
 * text writer, checked against golden text. Labels: unit
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "helpers.h"
#include "metrics.h"

#define US 1000ull
#define MS 1000000ull

static uint64_t bucket(const struct metrics_hist *h, unsigned i)
{
	return atomic_load(&h->buckets[i]);
}

/* An observation on a bound goes into that bucket (le = "less or equal"). */
static void test_buckets(void)
{
	struct metrics_hist h = { 0 };

	metrics_hist_observe(&h, 0);		/* bucket 0: le 50us */
	metrics_hist_observe(&h, 50 * US);	/* on the bound: still bucket 0 */
	metrics_hist_observe(&h, 50 * US + 1);	/* just above: bucket 1 (le 100us) */
	metrics_hist_observe(&h, 1 * MS);	/* bucket 4 (le 1ms) */
	metrics_hist_observe(&h, 10000 * MS);	/* 10 s: last finite bucket (16) */
	metrics_hist_observe(&h, 10000 * MS + 1); /* +Inf (17) */
	metrics_hist_observe(&h, 3600000 * MS);	/* +Inf */
	CHECK_EQ(bucket(&h, 0), 2);
	CHECK_EQ(bucket(&h, 1), 1);
	CHECK_EQ(bucket(&h, 2), 0);
	CHECK_EQ(bucket(&h, 4), 1);
	CHECK_EQ(bucket(&h, 16), 1);
	CHECK_EQ(bucket(&h, METRICS_HIST_BOUNDS), 2);
	CHECK_EQ(atomic_load(&h.count), 7);
	CHECK_EQ(atomic_load(&h.sum_ns), 0 + 50 * US + 50 * US + 1 + 1 * MS + 10000 * MS +
		 10000 * MS + 1 + 3600000 * MS);
	uint64_t total = 0;
	for (unsigned i = 0; i <= METRICS_HIST_BOUNDS; i++)
		total += bucket(&h, i);
	CHECK_EQ(total, 7);
}

static int near(double a, double b)
{
	return fabs(a - b) <= 1e-12 + 1e-9 * fabs(b);
}

static void test_quantiles(void)
{
	struct metrics_hist h = { 0 };
	double q;

	CHECK(metrics_hist_quantile(&h, 0.5) == 0);	/* empty */

	/* 100 observations of 1 ms: all in (500us, 1ms]; interpolated inside it. */
	for (int i = 0; i < 100; i++)
		metrics_hist_observe(&h, 1 * MS);
	q = metrics_hist_quantile(&h, 0.5);
	CHECK(near(q, 500e-6 + 500e-6 * (50 + 0.5) / 100));
	q = metrics_hist_quantile(&h, 0.0);
	CHECK(near(q, 500e-6 + 500e-6 * 0.5 / 100));
	q = metrics_hist_quantile(&h, 1.0);	/* rank clamps to the last observation */
	CHECK(near(q, 500e-6 + 500e-6 * 99.5 / 100));

	/* 90 fast (20 us) and 10 slow (200 ms): p50 is fast, p99 is slow. */
	struct metrics_hist m = { 0 };
	for (int i = 0; i < 90; i++)
		metrics_hist_observe(&m, 20 * US);
	for (int i = 0; i < 10; i++)
		metrics_hist_observe(&m, 200 * MS);
	q = metrics_hist_quantile(&m, 0.5);
	CHECK(q > 0 && q <= 50e-6);
	q = metrics_hist_quantile(&m, 0.99);
	CHECK(q > 100e-3 && q <= 250e-3);
	q = metrics_hist_quantile(&m, 0.89);	/* rank 89: the last fast one */
	CHECK(q <= 50e-6);
	q = metrics_hist_quantile(&m, 0.90);	/* rank 90: the first slow one */
	CHECK(q > 100e-3);

	/* Quantiles never decrease with q. */
	double prev = 0;
	for (int i = 0; i <= 100; i++) {
		q = metrics_hist_quantile(&m, i / 100.0);
		CHECK(q >= prev);
		prev = q;
	}
}

static const char golden_hist_nolabels[] =
	"# HELP t_seconds Test latency.\n"
	"# TYPE t_seconds histogram\n"
	"t_seconds_bucket{le=\"5e-05\"} 1\n"
	"t_seconds_bucket{le=\"0.0001\"} 1\n"
	"t_seconds_bucket{le=\"0.00025\"} 1\n"
	"t_seconds_bucket{le=\"0.0005\"} 1\n"
	"t_seconds_bucket{le=\"0.001\"} 3\n"
	"t_seconds_bucket{le=\"0.0025\"} 3\n"
	"t_seconds_bucket{le=\"0.005\"} 3\n"
	"t_seconds_bucket{le=\"0.01\"} 3\n"
	"t_seconds_bucket{le=\"0.025\"} 3\n"
	"t_seconds_bucket{le=\"0.05\"} 3\n"
	"t_seconds_bucket{le=\"0.1\"} 3\n"
	"t_seconds_bucket{le=\"0.25\"} 3\n"
	"t_seconds_bucket{le=\"0.5\"} 3\n"
	"t_seconds_bucket{le=\"1\"} 3\n"
	"t_seconds_bucket{le=\"2.5\"} 3\n"
	"t_seconds_bucket{le=\"5\"} 3\n"
	"t_seconds_bucket{le=\"10\"} 3\n"
	"t_seconds_bucket{le=\"+Inf\"} 4\n"
	"t_seconds_sum 12.002010010\n"
	"t_seconds_count 4\n";

static const char golden_hist_labels[] =
	"t_seconds_bucket{request=\"store\",le=\"5e-05\"} 0\n"
	"t_seconds_bucket{request=\"store\",le=\"0.0001\"} 0\n"
	"t_seconds_bucket{request=\"store\",le=\"0.00025\"} 0\n"
	"t_seconds_bucket{request=\"store\",le=\"0.0005\"} 0\n"
	"t_seconds_bucket{request=\"store\",le=\"0.001\"} 0\n"
	"t_seconds_bucket{request=\"store\",le=\"0.0025\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.005\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.01\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.025\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.05\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.1\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.25\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"0.5\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"1\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"2.5\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"5\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"10\"} 1\n"
	"t_seconds_bucket{request=\"store\",le=\"+Inf\"} 1\n"
	"t_seconds_sum{request=\"store\"} 0.002000000\n"
	"t_seconds_count{request=\"store\"} 1\n";

/* Compare with a golden text; on a mismatch print both from the first difference. */
static void check_text(const char *what, const struct metrics_buf *b, const char *want)
{
	size_t i = 0, wl = strlen(want);

	CHECK(!b->failed);
	if (b->len == wl && b->data && !memcmp(b->data, want, wl))
		return;
	while (i < b->len && i < wl && b->data[i] == want[i])
		i++;
	fprintf(stderr, "FAIL %s: text differs at byte %zu\n--- got:\n%.*s\n--- want:\n%s\n", what,
		i, (int)(b->len - i), b->data ? b->data + i : "", want + i);
	t_failures++;
}

static void test_text(void)
{
	struct metrics_buf b = { 0 };
	struct metrics_hist h = { 0 }, s = { 0 };

	metrics_counter(&b, "t_total", "Things done.", NULL, 42);
	metrics_counter(&b, "t_total", NULL, "kind=\"a\"", 7);
	metrics_gauge(&b, "t_bytes", "Bytes held.", NULL, 1.5);
	metrics_gauge(&b, "t_bytes", NULL, "tier=\"l1\"", 1099511627776.0);
	check_text("counters and gauges", &b,
		   "# HELP t_total Things done.\n"
		   "# TYPE t_total counter\n"
		   "t_total 42\n"
		   "t_total{kind=\"a\"} 7\n"
		   "# HELP t_bytes Bytes held.\n"
		   "# TYPE t_bytes gauge\n"
		   "t_bytes 1.5\n"
		   "t_bytes{tier=\"l1\"} 1099511627776\n");
	metrics_buf_free(&b);
	CHECK(b.data == NULL && b.len == 0 && b.cap == 0);

	metrics_hist_observe(&h, 10 * US);
	metrics_hist_observe(&h, 1 * MS);
	metrics_hist_observe(&h, 1 * MS);
	metrics_hist_observe(&h, 12000 * MS + 10);
	metrics_histogram(&b, "t_seconds", "Test latency.", NULL, &h);
	check_text("histogram without labels", &b, golden_hist_nolabels);
	CHECK(!strstr(b.data ? b.data : "", "{}"));
	metrics_buf_free(&b);

	/* "" labels are the same as NULL: no empty braces anywhere. */
	metrics_histogram(&b, "t_seconds", "Test latency.", "", &h);
	check_text("histogram with empty labels", &b, golden_hist_nolabels);
	metrics_buf_free(&b);

	metrics_hist_observe(&s, 2 * MS);
	metrics_histogram(&b, "t_seconds", NULL, "request=\"store\"", &s);
	check_text("histogram with labels, no HELP", &b, golden_hist_labels);
	metrics_buf_free(&b);
}

/* The buffer grows past its first 4 KiB, and a line longer than that fits too. */
static void test_buf_growth(void)
{
	struct metrics_buf b = { 0 };
	char big[10000];
	size_t want = 0;

	for (int i = 0; i < 1000; i++) {
		metrics_printf(&b, "line %04d\n", i);
		want += 10;
	}
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	metrics_printf(&b, "%s\n", big);
	want += sizeof(big);
	CHECK(!b.failed);
	CHECK_EQ(b.len, want);
	CHECK(b.cap > b.len);
	CHECK(b.data && !memcmp(b.data, "line 0000\nline 0001\n", 20));
	CHECK(b.data && !memcmp(b.data + 9990, "line 0999\nxxx", 13));
	CHECK(b.data && b.data[b.len - 1] == '\n' && b.data[b.len] == '\0');
	metrics_buf_free(&b);
}

int main(void)
{
	test_buckets();
	test_quantiles();
	test_text();
	test_buf_growth();
	return t_result("metrics");
}
