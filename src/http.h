/*
 * http.h - the HTTP endpoint of kvstashd: /metrics, /healthz, /stats.
 *
 * Served by libmicrohttpd on its own thread; handlers call only the
 * thread-safe srv_render_*() / srv_health() and take no kvstash lock.
 */
#ifndef KS_HTTP_H
#define KS_HTTP_H

#include <stdint.h>

struct srv;
struct http;

/* Limits of the endpoint: it serves scrapers, not the public. */
#define HTTP_CONNECTION_LIMIT 32	/* concurrent connections, all clients */
#define HTTP_PER_IP_LIMIT 8		/* concurrent connections from one address */
#define HTTP_TIMEOUT_S 10		/* idle connection is closed after this */

/*
 * Listen on @host:@port (numeric address or name; @port 0 = a port the
 * kernel chooses, see http_port()) and serve @s until http_stop(). @s is
 * borrowed until http_stop() returns. Returns 0 with *out set, -EINVAL for
 * a bad @host, -EADDRINUSE / -EACCES / -EADDRNOTAVAIL / other -errno from
 * socket(), bind() or listen(), -ENOMEM, or -EIO if libmicrohttpd could not
 * start its thread.
 */
int http_start(const char *host, uint16_t port, struct srv *s, struct http **out);
/* The port actually bound. */
uint16_t http_port(const struct http *h);
/* Stop the thread, close every connection and the listening socket; NULL is a no-op. */
void http_stop(struct http *h);

#endif /* KS_HTTP_H */
