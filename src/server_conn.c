/*
 * server_conn.c - what the io thread remembers of each connection (ROUTER
 * identity): the LMCache wire dialect it is latched to (docs/protocol.md
 * §11.2), and which unsupported operations were already logged for it.
 *
 * The two dialects give several op ids different meanings, so a connection
 * is latched to one by its first request that tells them apart and never
 * switches after that. ZMQ does not tell a ROUTER when a peer goes away, so
 * the table is bounded: past SRV_CONN_MAX the connection seen least recently
 * is forgotten, and latches again on its next telling request (until then it
 * gets only the answers that are right in both dialects).
 *
 * Threads: io thread only. Lock ordering: none of its own and none taken.
 */
#include "server_priv.h"

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
	struct srv_conn **pp =
		&s->conns[identity_hash(c->identity, c->identity_len) % SRV_CONN_BUCKETS];

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
struct srv_conn *conn_get(struct srv *s, const uint8_t *identity, size_t len)
{
	struct srv_conn **bucket = &s->conns[identity_hash(identity, len) % SRV_CONN_BUCKETS];
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
	c->dialect = s->pinned_dialect;
	c->next = *bucket;
	*bucket = c;
	lru_push_front(s, c);
	s->nconns++;
	count_dialect(s, c->dialect, 1);
	return c;
}

/* Latch an unlatched connection to @d (MARCH or CURRENT), once. */
void conn_latch(struct srv *s, struct srv_conn *c, enum proto_dialect d)
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

void conns_free(struct srv *s)
{
	while (s->conn_lru_head)
		conn_drop(s, s->conn_lru_head);
	free(s->conns);
	s->conns = NULL;
}
