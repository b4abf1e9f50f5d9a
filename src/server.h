/*
 * server.h - kvstashd's io thread and request handlers.
 */
#ifndef KS_SERVER_H
#define KS_SERVER_H

#include "config.h"

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

/* The endpoint actually bound (e.g. with the port the kernel chose). */
const char *srv_endpoint(const struct srv *s);

#endif /* KS_SERVER_H */
