/*
 * server.h - kvstashd's io thread and request handlers.
 */
#ifndef KS_SERVER_H
#define KS_SERVER_H

#include "config.h"

struct metrics_buf;

struct srv;

/*
 * Build the server from @cfg: pool, index, transfer engine, ROUTER socket
 * bound to the configured endpoint. Returns 0, or -errno with a log line
 * saying what failed (bind errors included).
 */
int srv_create(const struct srv_config *cfg, struct srv **out);
/*
 * Run the io loop on the calling thread until srv_request_stop(). Then
 * in-flight transfers are finished (or failed) and answered. Returns 0.
 */
int srv_run(struct srv *s);
/* Ask srv_run to return. Async-signal-safe (one write to an eventfd). */
void srv_request_stop(struct srv *s);
void srv_destroy(struct srv *s);

/* Prometheus text of every metric (any thread; takes no io-thread state). */
void srv_render_metrics(struct srv *s, struct metrics_buf *out);
/* The same counters, health and latency quantiles as one JSON object (any thread). */
void srv_render_stats_json(struct srv *s, struct metrics_buf *out);
/*
 * 0 when the io loop turned within 2 s and the last data-path probe
 * crossed the transfer queue within 2 s; otherwise -EAGAIN with the
 * unhealthy part named in @why (any thread).
 */
int srv_health(struct srv *s, char *why, size_t len);

/* The endpoint actually bound (e.g. with the port the kernel chose). */
const char *srv_endpoint(const struct srv *s);

#endif /* KS_SERVER_H */
