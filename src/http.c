/*
 * http.c - the HTTP endpoint (http.h): GET /metrics, /healthz, /stats.
 *
 * DESIGN: libmicrohttpd runs one internal polling thread
 * (MHD_USE_INTERNAL_POLLING_THREAD) that accepts, reads and answers every
 * connection; nothing else calls in except http_start()/http_stop() from
 * main(). A handler renders into a fresh buffer with srv_render_metrics(),
 * srv_render_stats_json() or srv_health(), which read atomics and the
 * subsystems' stats calls only: those take their own leaf locks briefly (an
 * index shard, a transfer queue, the disk tier's index, one at a time, as
 * any thread may) and this thread holds none of them across anything, and
 * it never waits on the io thread: a wedged io loop still gets a 503 out of
 * /healthz. Waits are bounded by MHD: idle connections close after
 * HTTP_TIMEOUT_S, at most HTTP_CONNECTION_LIMIT are open (HTTP_PER_IP_LIMIT
 * from one address); excess connections are refused at accept.
 *
 * We create, bind and listen on the socket ourselves and hand it to MHD
 * (MHD_OPTION_LISTEN_SOCKET): MHD_start_daemon() reports no errno, and an
 * operator needs "address in use" rather than "could not start".
 */
#include "http.h"

#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lock.h"
#include "log.h"
#include "metrics.h"
#include "server.h"

#define HTTP_LISTEN_BACKLOG 64

struct http {
	struct MHD_Daemon *mhd;	/* owns the listening socket once started */
	struct srv *srv;	/* borrowed until http_stop() */
	uint16_t port;
};

/* MHD's error messages go to our log, not to stderr. */
static void http_log(void *cls, const char *fmt, va_list ap)
{
	char msg[256];
	size_t n;

	(void)cls;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	n = strlen(msg);
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	log_warn("http: %s", msg);
}

/* Queue @len bytes of @body (malloc'd; MHD frees it, also on failure). */
static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *type,
			     char *body, size_t len)
{
	struct MHD_Response *r;
	enum MHD_Result ret;

	r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
	if (!r) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
	MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	ret = MHD_queue_response(conn, status, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result reply_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
	char *body = strdup(text);

	if (!body)
		return MHD_NO;
	return reply(conn, status, "text/plain; charset=utf-8", body, strlen(body));
}

/* Reply with a rendered buffer, or 500 if rendering ran out of memory. */
static enum MHD_Result reply_buf(struct MHD_Connection *conn, const char *type,
				 struct metrics_buf *b)
{
	char *body;
	size_t len;

	if (b->failed) {
		metrics_buf_free(b);
		return reply_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "render failed: out of memory\n");
	}
	body = b->data;
	len = b->len;
	b->data = NULL;		/* ownership passes to MHD */
	return reply(conn, MHD_HTTP_OK, type, body, len);
}

static enum MHD_Result http_handle(void *cls, struct MHD_Connection *conn, const char *url,
				   const char *method, const char *version,
				   const char *upload_data, size_t *upload_data_size,
				   void **con_cls)
{
	struct http *h = cls;
	struct metrics_buf b = { 0 };

	(void)version;
	(void)upload_data;
	(void)con_cls;
	ks_assert_unlocked();	/* debug: this thread never holds a ks_mutex */
	if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD)) {
		/* Drop any body unread; the reply closes the exchange. */
		*upload_data_size = 0;
		return reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n");
	}
	if (!strcmp(url, "/metrics")) {
		srv_render_metrics(h->srv, &b);
		return reply_buf(conn, "text/plain; version=0.0.4; charset=utf-8", &b);
	}
	if (!strcmp(url, "/stats")) {
		srv_render_stats_json(h->srv, &b);
		return reply_buf(conn, "application/json", &b);
	}
	if (!strcmp(url, "/healthz")) {
		char why[256], text[300];

		if (srv_health(h->srv, why, sizeof(why)) == 0)
			return reply_text(conn, MHD_HTTP_OK, "ok\n");
		snprintf(text, sizeof(text), "unhealthy: %s\n", why);
		return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, text);
	}
	return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found; try /metrics, /healthz or /stats\n");
}

/*
 * Bind and listen on the first address @host resolves to that accepts.
 * Returns the socket, or -errno of the last failure (-EINVAL: no address).
 */
static int listen_on(const char *host, uint16_t port, uint16_t *bound)
{
	struct addrinfo hints = { 0 }, *res = NULL, *ai;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char portstr[8];
	int fd = -1, rc, one = 1;

	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	snprintf(portstr, sizeof(portstr), "%u", (unsigned)port);
	rc = getaddrinfo(host && *host ? host : NULL, portstr, &hints, &res);
	if (rc) {
		log_error("http: cannot resolve '%s': %s", host, gai_strerror(rc));
		return -EINVAL;
	}
	rc = -EINVAL;
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
			    ai->ai_protocol);
		if (fd < 0) {
			rc = -errno;
			continue;
		}
		/* Restart right after a stop; a live listener still gets EADDRINUSE. */
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
		    listen(fd, HTTP_LISTEN_BACKLOG) == 0)
			break;
		rc = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return rc;
	*bound = port;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
		bool loopback;

		if (ss.ss_family == AF_INET6) {
			const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)&ss;

			*bound = ntohs(a6->sin6_port);
			loopback = IN6_IS_ADDR_LOOPBACK(&a6->sin6_addr);
		} else {
			const struct sockaddr_in *a4 = (const struct sockaddr_in *)&ss;

			*bound = ntohs(a4->sin_port);
			loopback = (ntohl(a4->sin_addr.s_addr) >> 24) == 127;
		}
		if (!loopback)
			log_warn("http: listening on '%s', not loopback: /metrics and /stats "
				 "have no authentication", host);
	}
	return fd;
}

int http_start(const char *host, uint16_t port, struct srv *s, struct http **out)
{
	struct http *h;
	int fd;

	if (!s || !out)
		return -EINVAL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->srv = s;
	fd = listen_on(host, port, &h->port);
	if (fd < 0) {
		free(h);
		return fd;
	}
	h->mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO |
				  MHD_USE_ERROR_LOG,
				  0, NULL, NULL, http_handle, h,
				  /* first, so that MHD logs nothing to stderr itself */
				  MHD_OPTION_EXTERNAL_LOGGER, http_log, NULL,
				  MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
				  MHD_OPTION_CONNECTION_LIMIT, (unsigned int)HTTP_CONNECTION_LIMIT,
				  MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned int)HTTP_PER_IP_LIMIT,
				  MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)HTTP_TIMEOUT_S,
				  MHD_OPTION_END);
	if (!h->mhd) {
		/*
		 * NOTE: the socket is left open (leaked) here: whether MHD
		 * already closed it on this path depends on its version, and a
		 * double close could hit an fd another thread just opened.
		 */
		free(h);
		return -EIO;
	}
	*out = h;
	return 0;
}

uint16_t http_port(const struct http *h)
{
	return h->port;
}

void http_stop(struct http *h)
{
	if (!h)
		return;
	MHD_stop_daemon(h->mhd);	/* joins the thread, closes the listening socket */
	free(h);
}
