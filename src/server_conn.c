/*
 * server_conn.c - what the io thread remembers of each connection (ROUTER
 * identity): the LMCache wire dialect it is latched to (docs/protocol.md
 * §11.2), and which unsupported operations were already logged for it.
 *
 * The two dialects give several op ids different meanings, so a connection
 * is latched to one by its first request that tells them apart and never
 * switches after that. The table is bounded: past SRV_CONN_MAX the
 * connection seen least recently is forgotten, and latches again on its next
 * telling request (until then it gets only the answers that are right in
 * both dialects).
 *
 * Connection state (docs/architecture.md, "Reconnects"): a ROUTER does not
 * say when a peer goes away (ZMQ_ROUTER_NOTIFY is a draft API that Debian's
 * libzmq does not build), so the ROUTER's socket monitor reports ACCEPTED and
 * DISCONNECTED with the socket's fd, and each message carries the fd it came
 * from (ZMQ_SRCFD). libzmq emits DISCONNECTED(fd) before it closes the fd,
 * and ACCEPTED(fd) before the connection's first message is queued, both on
 * one monitor pipe in order; so a connection is bound to its fd at its first
 * message after the monitor is drained, and then a DISCONNECTED for that fd
 * is its own. A closed connection is forgotten (its identity never comes
 * back: a reconnecting DEALER gets a new one), and the instances it owned
 * are marked as having lost their connection. The peer (its process on
 * ipc://, its CURVE key or address on tcp://) is read from the message's
 * metadata at the same time.
 *
 * Threads: io thread only. Lock ordering: none of its own and none taken.
 */
#include "server_priv.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

static void lru_unlink(struct srv *s, struct srv_conn *c)
{
	if (c->lru_prev)
		c->lru_prev->lru_next = c->lru_next;
	else
		s->conn_lru_head = c->lru_next;
	if (c->lru_next)
		c->lru_next->lru_prev = c->lru_prev;
	else
		s->conn_lru_tail = c->lru_prev;
	c->lru_prev = c->lru_next = NULL;
}

static void lru_push_front(struct srv *s, struct srv_conn *c)
{
	c->lru_prev = NULL;
	c->lru_next = s->conn_lru_head;
	if (s->conn_lru_head)
		s->conn_lru_head->lru_prev = c;
	s->conn_lru_head = c;
	if (!s->conn_lru_tail)
		s->conn_lru_tail = c;
}

static void count_dialect(struct srv *s, enum proto_dialect d, int delta)
{
	if ((unsigned)d < KS_ARRAY_SIZE(s->conns_by_dialect))
		atomic_fetch_add_explicit(&s->conns_by_dialect[d], (uint64_t)(int64_t)delta,
					  memory_order_relaxed);
}

/* Forget @c: unlink it from its bucket and the LRU list, and free it. */
static void conn_drop(struct srv *s, struct srv_conn *c)
{
	if (c->fd >= 0 && (size_t)c->fd < s->nfds && s->fds[c->fd].conn == c)
		s->fds[c->fd].conn = NULL;
	if (s->cur_conn == c)
		s->cur_conn = NULL;
	struct srv_conn **pp =
		&s->conns[srv_identity_hash(c->identity, c->identity_len) % SRV_CONN_BUCKETS];

	for (; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	lru_unlink(s, c);
	count_dialect(s, c->dialect, -1);
	s->nconns--;
	free(c);
}

/*
 * The connection of @identity, created if new (AUTO, or the --protocol
 * dialect), and made the most recently seen. NULL only when out of memory:
 * the caller then treats the request as unlatched.
 */
struct srv_conn *srv_conn_get(struct srv *s, const uint8_t *identity, size_t len)
{
	struct srv_conn **bucket = &s->conns[srv_identity_hash(identity, len) % SRV_CONN_BUCKETS];
	struct srv_conn *c;

	for (c = *bucket; c; c = c->next)
		if (c->identity_len == len && !memcmp(c->identity, identity, len)) {
			if (s->conn_lru_head != c) {
				lru_unlink(s, c);
				lru_push_front(s, c);
			}
			return c;
		}
	if (s->nconns >= SRV_CONN_MAX && s->conn_lru_tail)
		conn_drop(s, s->conn_lru_tail);
	c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	memcpy(c->identity, identity, len);
	c->identity_len = len;
	c->fd = -1;
	c->dialect = s->pinned_dialect;
	c->next = *bucket;
	*bucket = c;
	lru_push_front(s, c);
	s->nconns++;
	count_dialect(s, c->dialect, 1);
	return c;
}

/* Latch an unlatched connection to @d (MARCH or CURRENT), once. */
void srv_conn_latch(struct srv *s, struct srv_conn *c, enum proto_dialect d)
{
	char who[2 * 16 + 1];
	size_t n = 0;

	if (!c || c->dialect != PROTO_DIALECT_AUTO || d == PROTO_DIALECT_AUTO)
		return;
	count_dialect(s, c->dialect, -1);
	c->dialect = d;
	count_dialect(s, d, 1);
	for (size_t i = 0; i < c->identity_len && i < 16; i++)
		n += (size_t)snprintf(who + n, sizeof(who) - n, "%02x", c->identity[i]);
	who[n] = '\0';
	log_info("client %s speaks LMCache's %s MP protocol", who,
		 d == PROTO_DIALECT_MARCH ? "March 2026" : "current (frozen-id)");
}

void srv_conns_free(struct srv *s)
{
	while (s->conn_lru_head)
		conn_drop(s, s->conn_lru_head);
	free(s->conns);
	s->conns = NULL;
	free(s->fds);
	s->fds = NULL;
	s->nfds = 0;
}

/* ------------------------------------------------------------------------ */
/* Connection state: the socket monitor                                     */

#define SRV_MONITOR_EP "inproc://kvstashd-router-monitor"
/* Highest fd tracked; a connection on a higher one is "state unknown". */
#define SRV_FD_MAX (1u << 20)

/*
 * Start the ROUTER's socket monitor. Without it (-errno) connection state is
 * unknown: instances are then kept or reaped by PINGs alone and never change
 * owner.
 */
int srv_conn_monitor_open(struct srv *s)
{
	int linger = 0, unlimited = 0;

	if (zmq_socket_monitor(s->sock, SRV_MONITOR_EP,
			       ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) < 0)
		return -zmq_errno();
	s->monitor = zmq_socket(s->zctx, ZMQ_PAIR);
	if (!s->monitor)
		return -zmq_errno();
	zmq_setsockopt(s->monitor, ZMQ_LINGER, &linger, sizeof(linger));
	/* libzmq's I/O thread blocks on a full monitor pipe (4.3 sends its
	 * events without ZMQ_DONTWAIT); a zero receive HWM on the connecting
	 * end makes the inproc pipe unbounded, so a burst of connections while
	 * the io thread is busy cannot stall every connection. The io thread
	 * drains it every turn. Called before the ROUTER binds, so no event is
	 * sent before this end is connected. */
	zmq_setsockopt(s->monitor, ZMQ_RCVHWM, &unlimited, sizeof(unlimited));
	if (zmq_connect(s->monitor, SRV_MONITOR_EP) < 0) {
		int rc = -zmq_errno();

		zmq_close(s->monitor);
		s->monitor = NULL;
		return rc;
	}
	return 0;
}

static struct srv_fd_slot *fd_slot(struct srv *s, int fd)
{
	if (fd < 0 || (unsigned)fd >= SRV_FD_MAX)
		return NULL;
	if ((size_t)fd >= s->nfds) {
		size_t n = s->nfds ? s->nfds : 256;
		struct srv_fd_slot *p;

		while (n <= (size_t)fd)
			n *= 2;
		p = realloc(s->fds, n * sizeof(*p));
		if (!p)
			return NULL;
		memset(p + s->nfds, 0, (n - s->nfds) * sizeof(*p));
		s->fds = p;
		s->nfds = n;
	}
	return &s->fds[fd];
}

/* @c's socket closed: forget it, and tell the instances it owned. */
static void conn_closed(struct srv *s, struct srv_conn *c)
{
	c->fd = -1;
	srv_instances_owner_closed(s, c);
	conn_drop(s, c);
}

/* Apply every event the monitor has queued (never blocks). */
void srv_conn_monitor_drain(struct srv *s)
{
	if (!s->monitor)
		return;
	for (;;) {
		zmq_msg_t ev, addr;
		uint16_t event;
		uint32_t value;
		struct srv_fd_slot *f;

		zmq_msg_init(&ev);
		if (zmq_msg_recv(&ev, s->monitor, ZMQ_DONTWAIT) < 0) {
			zmq_msg_close(&ev);
			return;
		}
		/* [u16 event, u32 value] then the endpoint */
		if (zmq_msg_size(&ev) >= 6) {
			memcpy(&event, zmq_msg_data(&ev), 2);
			memcpy(&value, (uint8_t *)zmq_msg_data(&ev) + 2, 4);
		} else {
			event = 0;
			value = 0;
		}
		while (zmq_msg_more(&ev)) {
			zmq_msg_init(&addr);
			if (zmq_msg_recv(&addr, s->monitor, ZMQ_DONTWAIT) < 0) {
				zmq_msg_close(&addr);
				break;
			}
			int more = zmq_msg_more(&addr);

			zmq_msg_close(&addr);
			if (!more)
				break;
		}
		zmq_msg_close(&ev);
		f = fd_slot(s, (int)value);
		if (!f)
			continue;
		if (event == ZMQ_EVENT_ACCEPTED) {
			srv_ctr_add(&s->ctr.conn_opened, 1);
			if (f->conn)	/* missed its close: it cannot be open now */
				conn_closed(s, f->conn);
			f->open = true;
			f->conn = NULL;
		} else if (event == ZMQ_EVENT_DISCONNECTED) {
			srv_ctr_add(&s->ctr.conn_closed, 1);
			if (f->conn)
				conn_closed(s, f->conn);
			f->open = false;
			f->conn = NULL;
		}
	}
}

/* Parse libzmq's "Peer-Address" of an ipc:// peer: "...:uid:gid:pid". */
static bool parse_ucred(const char *pa, uint32_t *uid, uint32_t *pid)
{
	const char *p3 = strrchr(pa, ':'), *p2, *p1;
	char *end;
	unsigned long u, pd;

	if (!p3 || p3 == pa)
		return false;
	for (p2 = p3 - 1; p2 > pa && *p2 != ':'; p2--)
		;
	if (*p2 != ':' || p2 == pa)
		return false;
	for (p1 = p2 - 1; p1 > pa && *p1 != ':'; p1--)
		;
	if (*p1 != ':')
		return false;
	errno = 0;
	u = strtoul(p1 + 1, &end, 10);
	if (errno || end != p2)
		return false;
	pd = strtoul(p3 + 1, &end, 10);
	if (errno || *end || pd == 0 || pd > UINT32_MAX || u > UINT32_MAX)
		return false;
	*uid = (uint32_t)u;
	*pid = (uint32_t)pd;
	return true;
}

/*
 * At @c's first message (@frame: any frame of it): the fd it came from and
 * who the peer is. The monitor is drained first, so the fd's slot describes
 * this connection (see the top of the file).
 */
void srv_conn_bind(struct srv *s, struct srv_conn *c, zmq_msg_t *frame)
{
	const char *uid = zmq_msg_gets(frame, "User-Id");
	const char *pa = zmq_msg_gets(frame, "Peer-Address");
	int fd = zmq_msg_get(frame, ZMQ_SRCFD);
	struct srv_fd_slot *f;

	c->bound = true;
	memset(&c->peer, 0, sizeof(c->peer));
	if (!strncmp(s->endpoint, "ipc://", 6)) {
		if (pa && parse_ucred(pa, &c->peer.uid, &c->peer.pid))
			c->peer.kind = SRV_PEER_PROCESS;
	} else if (uid && *uid) {
		c->peer.kind = SRV_PEER_CURVE_KEY;
		snprintf(c->peer.addr, sizeof(c->peer.addr), "%s", uid);
	} else if (pa && *pa && !strncmp(s->endpoint, "tcp://", 6)) {
		c->peer.kind = SRV_PEER_HOST;
		snprintf(c->peer.addr, sizeof(c->peer.addr), "%s", pa);
	}
	{
		char who[96];

		log_debug("connection fd %d: %s (Peer-Address '%s')", fd,
			  srv_peer_name(&c->peer, who, sizeof(who)), pa ? pa : "");
	}
	if (!s->monitor || fd < 0)
		return;
	srv_conn_monitor_drain(s);
	f = fd_slot(s, fd);
	if (!f || !f->open)
		return;		/* closed already, or untracked */
	if (f->conn && f->conn != c)
		conn_closed(s, f->conn);
	f->conn = c;
	c->fd = fd;
}

/* True if a connection of the process @p (ipc://) is known to be open now. */
bool srv_process_connected(struct srv *s, const struct srv_peer *p)
{
	if (p->kind != SRV_PEER_PROCESS)
		return false;
	for (struct srv_conn *c = s->conn_lru_head; c; c = c->lru_next)
		if (c->fd >= 0 && srv_peer_same(&c->peer, p))
			return true;
	return false;
}

/* True if the connection of @identity is known to be open now. */
bool srv_conn_up(struct srv *s, const uint8_t *identity, size_t len)
{
	struct srv_conn *c = s->conns[srv_identity_hash(identity, len) % SRV_CONN_BUCKETS];

	for (; c; c = c->next)
		if (c->identity_len == len && !memcmp(c->identity, identity, len))
			return c->fd >= 0;
	return false;
}

bool srv_peer_same(const struct srv_peer *a, const struct srv_peer *b)
{
	if (a->kind != b->kind || a->kind == SRV_PEER_NONE)
		return false;
	if (a->kind == SRV_PEER_PROCESS)
		return a->pid == b->pid && a->uid == b->uid;
	return !strcmp(a->addr, b->addr);
}

const char *srv_peer_name(const struct srv_peer *p, char *buf, size_t len)
{
	switch (p->kind) {
	case SRV_PEER_PROCESS:
		snprintf(buf, len, "pid %u (uid %u)", p->pid, p->uid);
		break;
	case SRV_PEER_CURVE_KEY:
		snprintf(buf, len, "CURVE key %.12s...", p->addr);
		break;
	case SRV_PEER_HOST:
		snprintf(buf, len, "host %s", p->addr);
		break;
	default:
		snprintf(buf, len, "an unidentified peer");
		break;
	}
	return buf;
}
