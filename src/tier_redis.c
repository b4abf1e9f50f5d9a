/*
 * tier_redis.c - L3 Redis/Valkey tier: one hiredis connection and worker
 * thread per node, requests pipelined in batches; a single server, a list
 * of independent servers (keys sharded by XXH64), or a Redis Cluster.
 *
 * DESIGN: callers only take a node's lock to queue a request and signal
 * the node's condition variable. The node's worker is the only user of its
 * redisContext: it takes a batch off the queue (at most pipeline_bytes of
 * values), appends every command, then reads the replies in order and calls
 * each request's callback with no lock held. Every hiredis call is bounded
 * (redisConnectWithTimeout, redisSetTimeout on the socket). A failed read or
 * write drops the connection: the request whose reply was lost gets
 * -ETIMEDOUT or -ENOTCONN, the rest of the batch -ENOTCONN, and the node is
 * marked down (an _Atomic flag that submitters read without the lock, so
 * they fail fast). While down, the worker fails whatever is queued with
 * -ENOTCONN and retries the connect after a backoff doubling from
 * backoff_min_ms to backoff_max_ms; its sleeps are ks_cond_wait_ms bounded
 * by the next retry and TR_IDLE_WAIT_MS. Worker threads block all signals:
 * a write to a closed socket gives EPIPE, not a process-killing SIGPIPE.
 * Every connection authenticates (AUTH [user] password) when a password is
 * configured, then PINGs, so a server that wants a password and has none,
 * or refuses the one given, is an -EACCES at open with the server's reason
 * (which never contains the password), not a stream of NOAUTH errors later.
 *
 * CLUSTER MODE (redis+cluster://): the nodes are the cluster's masters, found
 * by the map thread (tr_map_worker) with CLUSTER SLOTS. Keys go to the
 * master of their CRC16 hash slot (slot_owner[], _Atomic bytes read without
 * a lock by submitters, written by the map thread and, for MOVED, by the
 * worker that saw it). A worker that reads MOVED or ASK hands the request to
 * the named master's queue (ASK: with a one-shot ASKING first); if that
 * master is not known yet, the request is parked until the map thread has
 * read the new map and connected it. Lost connections, redirects,
 * CLUSTERDOWN and uncovered slots ask for a new map; while a mapped master
 * is down or a slot is uncovered the map is re-read every
 * TR_MAP_DEGRADED_MS, else every TR_MAP_PERIOD_MS. Only the map thread (and
 * open, before the map thread starts) adds nodes; a node is published by a
 * release store of nnodes and never removed before close, so readers index
 * nodes[] without a lock. A PUT keeps its value until its reply, so a
 * redirected SET can be sent again.
 *
 * Lock order (the tree is in lock.h), each taken with no lock held:
 *
 *   tr_node->lock           (LOCK_RANK_TIER: the node's queue; a leaf)
 *   tier_redis->map_lock    (LOCK_RANK_TIER: the cluster map thread's stop
 *                            flag and parked redirects; a leaf, never held
 *                            with a node lock)
 *   tr_waiter->lock         (LOCK_RANK_TIER: one tier_redis_exists_wait()
 *                            call's answer; a leaf)
 *     log ring
 *
 * Never held across a hiredis call, a callback or a wait (ks_cond_wait_ms
 * releases it).
 */
#include "tier_redis.h"

#include <ctype.h>
#include <errno.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <xxhash.h>

#include "compiler.h"
#include "lock.h"
#include "log.h"

/* Longest sleep of an idle worker: bounds how late a stop flag is seen. */
#define TR_IDLE_WAIT_MS 100
#define TR_DEFAULT_QUEUE_DEPTH 64
#define TR_KEY_MAX 512
/* Requests per pipelined batch, whatever their size (EXISTS parts count once). */
#define TR_BATCH_MAX 128
#define TR_SLOTS 16384
/* A request redirected more often than this fails (-EIO): a map that flaps. */
#define TR_MAX_REDIRECTS 5
/* Cluster map: re-read at least this often; more often while degraded. */
#define TR_MAP_PERIOD_MS 5000
#define TR_MAP_DEGRADED_MS 200
/* ... but not more often than this, however many redirects ask for it. */
#define TR_MAP_GAP_MS 50

enum tr_op { TR_PUT, TR_GET, TR_EXISTS, TR_DEL };

/* One tier_redis_exists() call, split over nodes; freed by the last part. */
struct tr_exists {
	_Atomic unsigned parts_left;
	_Atomic int status;
	bool *present;			/* [n], written by disjoint parts */
	size_t n;
	tier_redis_exists_fn done;
	void *arg;
};

struct tr_req {
	struct tr_req *next;
	enum tr_op op;
	char rkey[TR_KEY_MAX];
	struct ks_key key;
	uint64_t layout_tag;
	const uint8_t *data;		/* put: borrowed payload, or NULL if value is pre-built */
	uint8_t *value;			/* put: owned header+payload (copy mode: built at submit) */
	size_t nbytes;			/* put: payload length; get: capacity of dst */
	uint8_t *dst;			/* get: borrowed until done */
	ks_tier_done_fn done;
	void *arg;
	/* exists part: keys ex_idx[0..ex_n) of ex, names in ex_keys */
	struct tr_exists *ex;
	size_t *ex_idx;
	char (*ex_keys)[TR_KEY_MAX];
	size_t ex_n;
	bool corrupt;			/* get: DEL the key after the batch */
	bool asking;			/* cluster: send ASKING first (one ASK redirect) */
	unsigned redirects;		/* MOVED/ASK followed so far */
	char thost[256];		/* parked: the master named by the redirect */
	int tport;
};

struct tr_node {
	struct tier_redis *tr;
	/* Protects the queue, pending and stopping. */
	struct ks_mutex lock;
	struct ks_cond cond;
	struct tr_req *qhead, *qtail;
	unsigned pending;		/* queued + in the current batch */
	bool stopping;
	_Atomic bool up;		/* connected, per the worker; read lock-free */
	_Atomic unsigned slots;		/* cluster: hash slots it owns in the current map */

	char host[256];
	int port;
	pthread_t thread;
	bool thread_started;

	/* worker-only */
	redisContext *c;
	unsigned backoff_ms;
	uint64_t next_try_ms;
	bool ever_up;
};

struct tr_addr {
	char host[256];
	int port;
};

struct tier_redis {
	struct tr_node *nodes;		/* [cap]; [0, nnodes) published */
	_Atomic size_t nnodes;
	size_t cap;
	bool cluster;
	char user[256], password[512];	/* password[0] == 0: no AUTH */
	char prefix[128];
	unsigned ttl_s;
	unsigned queue_depth;
	unsigned connect_timeout_ms, io_timeout_ms;
	unsigned backoff_min_ms, backoff_max_ms;
	uint64_t pipeline_bytes;

	_Atomic uint64_t puts, put_errors, gets, hits, misses, corrupt, notconn, dropped_full,
		timeouts, reconnects, exists_keys, exists_hits, bytes_out, bytes_in;

	/* cluster mode */
	struct tr_addr seeds[TIER_REDIS_MAX_NODES];
	size_t nseeds;
	_Atomic uint8_t slot_owner[TR_SLOTS];	/* node index + 1; 0 = uncovered */
	_Atomic bool map_want;			/* a refresh was asked for */
	/* Protects map_stopping and parked. */
	struct ks_mutex map_lock;
	struct ks_cond map_cond;
	bool map_stopping;
	struct tr_req *parked;			/* redirected to a master not known yet */
	pthread_t map_thread;
	bool map_started, map_lock_init;
	unsigned map_rr;			/* map thread only: whom to ask first */
	_Atomic uint64_t moved, asked, map_refreshes, map_errors;
	_Atomic unsigned slots_uncovered;
	_Atomic bool degraded;			/* a mapped master down or a slot uncovered */
};

#define cnt_add(tr, c, v) atomic_fetch_add_explicit(&(tr)->c, (v), memory_order_relaxed)
#define cnt_inc(tr, c) cnt_add(tr, c, 1)

/* ---- helpers ----------------------------------------------------------------- */

void tier_redis_key(const struct tier_redis *tr, const struct ks_key *key, char *out, size_t n)
{
	char name[TIER_CHUNK_NAME_MAX];

	tier_chunk_name(key, name);
	snprintf(out, n, "%s%s", tr->prefix, name);
}

static size_t tr_nnodes(const struct tier_redis *tr)
{
	/* acquire: a published node's fields are visible */
	return atomic_load_explicit(&((struct tier_redis *)tr)->nnodes, memory_order_acquire);
}

/* CRC16-CCITT (XModem), the hash of Redis Cluster's key slots. */
static uint16_t tr_crc16(const char *p, size_t n)
{
	uint16_t crc = 0;

	while (n--) {
		crc ^= (uint16_t)((uint8_t)*p++ << 8);
		for (int i = 0; i < 8; i++)
			crc = crc & 0x8000 ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
	}
	return crc;
}

/* The cluster slot of @key: only the first non-empty {hash tag} is hashed, as Redis does. */
unsigned tier_redis_key_slot(const char *key, size_t len)
{
	const char *open = memchr(key, '{', len);

	if (open) {
		size_t rest = len - (size_t)(open - key) - 1;
		const char *close = memchr(open + 1, '}', rest);

		if (close && close > open + 1)
			return tr_crc16(open + 1, (size_t)(close - open - 1)) & (TR_SLOTS - 1);
	}
	return tr_crc16(key, len) & (TR_SLOTS - 1);
}

static void tr_want_map(struct tier_redis *tr);

/* The node for @rkey, or NULL (cluster: slot not covered by the map; a new map is asked for). */
static struct tr_node *tr_node_of(struct tier_redis *tr, const char *rkey)
{
	unsigned o;

	if (!tr->cluster)
		return &tr->nodes[XXH64(rkey, strlen(rkey), 0) % tr_nnodes(tr)];
	/* acquire: pairs with the release store that named the node, published before */
	o = atomic_load_explicit(&tr->slot_owner[tier_redis_key_slot(rkey, strlen(rkey))],
				 memory_order_acquire);
	if (!o) {
		tr_want_map(tr);
		return NULL;
	}
	return &tr->nodes[o - 1];
}

static struct tr_node *tr_node_find(struct tier_redis *tr, const char *host, int port)
{
	size_t nn = tr_nnodes(tr);

	for (size_t i = 0; i < nn; i++)
		if (tr->nodes[i].port == port && !strcmp(tr->nodes[i].host, host))
			return &tr->nodes[i];
	return NULL;
}

/* ---- URLs and credentials ---------------------------------------------------- */

struct tr_url {
	int scheme;			/* 0: none, 1: redis://, 2: redis+cluster:// */
	char host[256];
	int port;
	char user[256], password[512];
	bool has_userinfo;
};

/* Percent-decode @n bytes of @in into @out (@cap). -EINVAL on a bad escape or overflow. */
static int tr_pct_decode(const char *in, size_t n, char *out, size_t cap)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		char c = in[i];

		if (c == '%') {
			char hex[3];
			unsigned v;

			if (i + 2 >= n || !isxdigit((unsigned char)in[i + 1]) ||
			    !isxdigit((unsigned char)in[i + 2]))
				return -EINVAL;
			memcpy(hex, in + i + 1, 2);
			hex[2] = 0;
			v = (unsigned)strtoul(hex, NULL, 16);
			if (!v)
				return -EINVAL;	/* a NUL would cut the string */
			c = (char)v;
			i += 2;
		}
		if (o + 1 >= cap)
			return -EINVAL;
		out[o++] = c;
	}
	out[o] = 0;
	return 0;
}

/*
 * [redis://|redis+cluster://][user[:password]@]host[:port][/...] with host a
 * name, an IPv4 address or [IPv6]; port 6379 when absent. User and password
 * may be percent-encoded (%40 for '@', %3A for ':', %2C for ',').
 */
static int tr_parse_url(const char *url, struct tr_url *u)
{
	const char *p = url, *at, *hend, *colon = NULL, *end;
	size_t hl;
	long v = 6379;

	memset(u, 0, sizeof(*u));
	if (!strncmp(p, "redis://", 8)) {
		u->scheme = 1;
		p += 8;
	} else if (!strncmp(p, "redis+cluster://", 16)) {
		u->scheme = 2;
		p += 16;
	} else if (strstr(p, "://")) {
		return -EINVAL;	/* rediss:// (TLS), valkey://, http://...: not spoken here */
	}
	end = p + strcspn(p, "/");
	at = memchr(p, '@', (size_t)(end - p));
	if (at) {
		/* the last '@' before the host: passwords may hold unencoded '@' */
		for (const char *q = at; q && q < end; q = memchr(q + 1, '@', (size_t)(end - q - 1)))
			at = q;
		const char *uc = memchr(p, ':', (size_t)(at - p));

		if (uc) {
			if (tr_pct_decode(p, (size_t)(uc - p), u->user, sizeof(u->user)) ||
			    tr_pct_decode(uc + 1, (size_t)(at - uc - 1), u->password,
					  sizeof(u->password)))
				return -EINVAL;
		} else if (tr_pct_decode(p, (size_t)(at - p), u->user, sizeof(u->user))) {
			return -EINVAL;
		}
		if (uc && uc + 1 == at)
			return -EINVAL;	/* "user:@": an empty password is a typo */
		u->has_userinfo = true;
		p = at + 1;
	}
	if (*p == '[') {
		hend = memchr(p, ']', (size_t)(end - p));
		if (!hend)
			return -EINVAL;
		p++;
		hl = (size_t)(hend - p);
		if (hend + 1 < end) {
			if (hend[1] != ':')
				return -EINVAL;
			colon = hend + 1;
		}
	} else {
		colon = memchr(p, ':', (size_t)(end - p));
		hl = colon ? (size_t)(colon - p) : (size_t)(end - p);
		if (colon && memchr(colon + 1, ':', (size_t)(end - colon - 1)))
			return -EINVAL;	/* a bare IPv6 address: needs [brackets] */
	}
	if (!hl || hl >= sizeof(u->host))
		return -EINVAL;
	memcpy(u->host, p, hl);
	u->host[hl] = 0;
	if (strpbrk(u->host, " ,@"))
		return -EINVAL;
	if (colon) {
		char *e;

		v = strtol(colon + 1, &e, 10);
		if (e == colon + 1 || e != end || v <= 0 || v > 65535)
			return -EINVAL;
	}
	u->port = (int)v;
	return 0;
}

void tier_redis_redact_url(const char *url, char *out, size_t n)
{
	/* Everything between "://" (or the start) and the last '@' of each
	 * comma-separated part is userinfo: keep the user, hide the password. */
	size_t o = 0;

	if (!n)
		return;
	while (*url && o + 1 < n) {
		const char *part_end = url + strcspn(url, ",");
		const char *sch = strstr(url, "://"), *at = NULL, *colon;

		if (sch && sch < part_end)
			sch += 3;
		else
			sch = url;
		for (const char *q = sch; q < part_end; q++)
			if (*q == '@')
				at = q;
		if (at) {
			colon = memchr(sch, ':', (size_t)(at - sch));
			o += (size_t)snprintf(out + o, n - o, "%.*s%s", (int)((colon ? colon : at) - url),
					      url, colon ? ":***" : "");
			if (o >= n)
				break;
			url = at;
		}
		o += (size_t)snprintf(out + o, n - o, "%.*s", (int)(part_end - url), url);
		if (o >= n)
			break;
		url = part_end;
		if (*url == ',') {
			o += (size_t)snprintf(out + o, n - o, ",");
			url++;
		}
	}
	out[KS_MIN(o, n - 1)] = 0;
}

int tier_redis_read_password_file(const char *path, char *out, size_t n)
{
	FILE *f = fopen(path, "re");
	size_t len;
	int rc = 0;

	if (!f)
		return -errno;
	if (!fgets(out, (int)n, f)) {
		rc = ferror(f) ? -EIO : -ENODATA;
	} else {
		len = strcspn(out, "\r\n");
		/* no line end in a full buffer and more to read: not silently cut */
		if (!out[len] && len + 1 == n && fgetc(f) != EOF)
			rc = -ENAMETOOLONG;
		out[len] = 0;
		if (!rc && !len)
			rc = -ENODATA;
	}
	fclose(f);
	if (rc)
		explicit_bzero(out, n);
	return rc;
}

static struct timeval tv_ms(unsigned ms)
{
	return (struct timeval){ .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
}

/*
 * A bounded connection to @host:@port, authenticated when a password is
 * configured and checked with a PING. Returns 0 with *@out, -ENOTCONN
 * (unreachable, timed out), or -EACCES (the server refused the credentials
 * or wants some: the reason is logged, without the password). No lock held.
 */
static int tr_open_conn(struct tier_redis *tr, const char *host, int port, redisContext **out)
{
	redisContext *c;
	redisReply *rep;
	int rc = 0;

	ks_assert_unlocked();
	*out = NULL;
	c = redisConnectWithTimeout(host, port, tv_ms(tr->connect_timeout_ms));
	if (!c || c->err) {
		log_debug("tier_redis: connect %s:%d: %s", host, port, c ? c->errstr : "out of memory");
		if (c)
			redisFree(c);
		return -ENOTCONN;
	}
	if (redisSetTimeout(c, tv_ms(tr->io_timeout_ms)) != REDIS_OK) {
		redisFree(c);
		return -ENOTCONN;
	}
	redisEnableKeepAlive(c);
	if (tr->password[0]) {
		const char *argv[3] = { "AUTH", tr->user, tr->password };
		size_t argl[3] = { 4, strlen(tr->user), strlen(tr->password) };

		if (tr->user[0])
			rep = redisCommandArgv(c, 3, argv, argl);
		else
			rep = redisCommandArgv(c, 2, (const char *[]){ "AUTH", tr->password },
					       (size_t[]){ 4, argl[2] });
		if (!rep) {
			rc = -ENOTCONN;
		} else if (rep->type == REDIS_REPLY_ERROR) {
			/* WRONGPASS / "ERR ... without any password configured": never echoes it */
			log_error("tier_redis: %s:%d: authentication%s%s failed: %.*s", host, port,
				  tr->user[0] ? " as user " : "", tr->user, (int)rep->len, rep->str);
			rc = -EACCES;
		}
		freeReplyObject(rep);
	}
	if (!rc) {
		rep = redisCommand(c, "PING");
		if (!rep) {
			rc = -ENOTCONN;
		} else if (rep->type == REDIS_REPLY_ERROR) {
			if (!strncmp(rep->str, "NOAUTH", 6))
				log_error("tier_redis: %s:%d requires a password (NOAUTH): give "
					  "--redis-password-file (and --redis-user for an ACL user)",
					  host, port);
			else
				log_error("tier_redis: %s:%d: PING refused: %.*s", host, port,
					  (int)rep->len, rep->str);
			rc = -EACCES;
		}
		freeReplyObject(rep);
	}
	if (rc) {
		redisFree(c);
		return rc;
	}
	*out = c;
	return 0;
}

/* Connect @n (worker, map thread before publishing it, or open). No lock held. */
static int tr_connect(struct tr_node *n)
{
	struct tier_redis *tr = n->tr;
	redisContext *c;
	int rc = tr_open_conn(tr, n->host, n->port, &c);

	if (rc)
		return rc;
	n->c = c;
	n->backoff_ms = tr->backoff_min_ms;
	if (n->ever_up) {
		cnt_inc(tr, reconnects);
		log_info("tier_redis: %s:%d: reconnected", n->host, n->port);
	}
	n->ever_up = true;
	atomic_store_explicit(&n->up, true, memory_order_release);
	return 0;
}

static void tr_disconnect(struct tr_node *n, const char *why)
{
	struct tier_redis *tr = n->tr;

	log_warn("tier_redis: %s:%d: connection lost (%s); retrying in %u ms", n->host, n->port,
		 why, n->backoff_ms);
	atomic_store_explicit(&n->up, false, memory_order_release);
	redisFree(n->c);
	n->c = NULL;
	n->next_try_ms = ks_now_ms() + n->backoff_ms;
	n->backoff_ms = KS_MIN(n->backoff_ms * 2, tr->backoff_max_ms);
	if (tr->cluster)
		tr_want_map(tr);	/* a failover may be under way: follow it */
}

/* ---- completion ------------------------------------------------------------ */

static void tr_exists_part_done(struct tr_req *r, int status)
{
	struct tr_exists *ex = r->ex;
	int zero = 0;

	if (status)
		atomic_compare_exchange_strong(&ex->status, &zero, status);
	/* acq_rel: the last part sees every part's present[] writes. */
	if (atomic_fetch_sub_explicit(&ex->parts_left, 1, memory_order_acq_rel) == 1) {
		ex->done(ex->arg, atomic_load(&ex->status), ex->present, ex->n);
		free(ex->present);
		free(ex);
	}
}

static void tr_req_free(struct tr_req *r)
{
	free(r->value);
	free(r->ex_idx);
	free(r->ex_keys);
	free(r);
}

/* Finish @r (counted on no node's queue): callback with no lock held, then free. */
static void tr_finish(struct tier_redis *tr, struct tr_req *r, int status, uint64_t tag,
		      size_t len)
{
	if (status == -ENOTCONN)
		cnt_inc(tr, notconn);
	if (r->op == TR_PUT && status)
		cnt_inc(tr, put_errors);
	ks_assert_unlocked();
	if (r->op == TR_EXISTS)
		tr_exists_part_done(r, status);
	else if (r->done)
		r->done(r->arg, status, tag, len);
	tr_req_free(r);
}

/* @r leaves @n's queue accounting (completed, or handed to another node). */
static void tr_unpend(struct tr_node *n)
{
	if (ks_lock(&n->lock) == 0) {
		n->pending--;
		ks_unlock(&n->lock);
	}
}

/* Finish @r, taken off @n's queue. */
static void tr_complete(struct tr_node *n, struct tr_req *r, int status, uint64_t tag, size_t len)
{
	tr_unpend(n);
	tr_finish(n->tr, r, status, tag, len);
}

/* ---- worker -------------------------------------------------------------------- */

/* Build the SET value of a put: header (with the payload checksum) + payload. */
static int tr_build_value(struct tr_req *r)
{
	if (!r->value) {
		r->value = malloc(TIER_CHUNK_HDR_SIZE + r->nbytes);
		if (!r->value)
			return -ENOMEM;
		memcpy(r->value + TIER_CHUNK_HDR_SIZE, r->data, r->nbytes);
	}
	tier_chunk_hdr_encode(r->value, &r->key, r->layout_tag, r->nbytes,
			      tier_chunk_sum(r->value + TIER_CHUNK_HDR_SIZE, r->nbytes));
	return 0;
}

/* Append @r's commands to the output buffer. Returns the number of replies to expect, or -errno. */
static int tr_append(struct tr_node *n, struct tr_req *r)
{
	struct tier_redis *tr = n->tr;
	char ttl[24];
	const char *argv[5];
	size_t argl[5];
	int rc;

	/* A one-shot ASKING before the command: its +OK is read in tr_read_replies. */
	if (r->asking && redisAppendCommand(n->c, "ASKING") != REDIS_OK)
		return -ENOMEM;
	switch (r->op) {
	case TR_PUT:
		rc = tr_build_value(r);
		if (rc)
			return rc;
		argv[0] = "SET";
		argv[1] = r->rkey;
		argv[2] = (const char *)r->value;
		argl[2] = TIER_CHUNK_HDR_SIZE + r->nbytes;
		argv[3] = "EX";
		snprintf(ttl, sizeof(ttl), "%u", tr->ttl_s);
		argv[4] = ttl;
		for (int i = 0; i < 5; i++)
			if (i != 2)
				argl[i] = strlen(argv[i]);
		rc = redisAppendCommandArgv(n->c, tr->ttl_s ? 5 : 3, argv, argl);
		/* NOTE: hiredis copied the value into its output buffer; ours can go,
		 * unless a cluster redirect may need it sent again elsewhere. */
		if (!tr->cluster) {
			free(r->value);
			r->value = NULL;
		}
		return rc == REDIS_OK ? 1 : -ENOMEM;
	case TR_GET:
		return redisAppendCommand(n->c, "GET %s", r->rkey) == REDIS_OK ? 1 : -ENOMEM;
	case TR_DEL:
		return redisAppendCommand(n->c, "DEL %s", r->rkey) == REDIS_OK ? 1 : -ENOMEM;
	case TR_EXISTS:
		for (size_t i = 0; i < r->ex_n; i++)
			if (redisAppendCommand(n->c, "EXISTS %s", r->ex_keys[i]) != REDIS_OK)
				return -ENOMEM;
		return (int)r->ex_n;
	}
	return -EINVAL;
}

/* The error for a request whose reply could not be read. */
static int tr_io_err(struct tr_node *n)
{
	if (n->c->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK)) {
		cnt_inc(n->tr, timeouts);
		return -ETIMEDOUT;
	}
	return -ENOTCONN;
}

static int tr_reply_error(const redisReply *rep)
{
	if (rep->type != REDIS_REPLY_ERROR)
		return -EIO;
	log_warn("tier_redis: server error: %.*s", (int)rep->len, rep->str);
	return !strncmp(rep->str, "OOM", 3) ? -ENOSPC : -EIO;
}

/* Check a GET value and copy its payload out. Returns 0, -ENOENT, -EBADMSG, -EMSGSIZE, -EIO. */
static int tr_get_value(struct tr_node *n, struct tr_req *r, const redisReply *rep,
			uint64_t *tag, size_t *len)
{
	struct tier_redis *tr = n->tr;
	struct tier_chunk_meta m;

	if (rep->type == REDIS_REPLY_NIL) {
		cnt_inc(tr, misses);
		return -ENOENT;
	}
	if (rep->type != REDIS_REPLY_STRING)
		return tr_reply_error(rep);
	cnt_add(tr, bytes_in, rep->len);
	if (rep->len < TIER_CHUNK_HDR_SIZE || tier_chunk_hdr_decode((const uint8_t *)rep->str, &m))
		goto corrupt;
	if (m.payload_len > r->nbytes && (size_t)rep->len == TIER_CHUNK_HDR_SIZE + m.payload_len)
		return -EMSGSIZE;
	if ((uint64_t)rep->len != TIER_CHUNK_HDR_SIZE + m.payload_len ||
	    tier_chunk_verify(&m, &r->key, rep->str + TIER_CHUNK_HDR_SIZE, (size_t)m.payload_len))
		goto corrupt;
	memcpy(r->dst, rep->str + TIER_CHUNK_HDR_SIZE, (size_t)m.payload_len);
	cnt_inc(tr, hits);
	*tag = m.layout_tag;
	*len = (size_t)m.payload_len;
	return 0;
corrupt:
	log_warn("tier_redis: %s:%d: %s: corrupt value (%zu bytes); deleting", n->host, n->port,
		 r->rkey, (size_t)rep->len);
	cnt_inc(tr, corrupt);
	r->corrupt = true;
	return -EBADMSG;
}

/* ---- cluster redirects --------------------------------------------------------- */

static int tr_submit(struct tier_redis *tr, struct tr_node *n, struct tr_req *r, bool fail_fast);

static bool tr_is_redirect(const redisReply *rep)
{
	return rep->type == REDIS_REPLY_ERROR &&
	       (!strncmp(rep->str, "MOVED ", 6) || !strncmp(rep->str, "ASK ", 4));
}

/* The cluster cannot serve now (failover, slot not served, loading): like a node down. */
static bool tr_is_unavailable(const redisReply *rep)
{
	return rep->type == REDIS_REPLY_ERROR &&
	       (!strncmp(rep->str, "CLUSTERDOWN", 11) || !strncmp(rep->str, "TRYAGAIN", 8) ||
		!strncmp(rep->str, "LOADING", 7) || !strncmp(rep->str, "MASTERDOWN", 10));
}

/* "MOVED 3999 127.0.0.1:6381" or "ASK 3999 :6381" (empty host: the node that said it). */
static bool tr_parse_redirect(const redisReply *rep, bool *ask, unsigned *slot, char *host,
			      size_t hl, int *port)
{
	const char *p, *colon;
	char *e;
	unsigned long sl;
	long po;

	if (!tr_is_redirect(rep))
		return false;
	*ask = rep->str[0] == 'A';
	p = rep->str + (*ask ? 4 : 6);
	sl = strtoul(p, &e, 10);
	if (e == p || *e != ' ' || sl >= TR_SLOTS)
		return false;
	p = e + 1;
	colon = strrchr(p, ':');
	if (!colon || (size_t)(colon - p) >= hl)
		return false;
	memcpy(host, p, (size_t)(colon - p));
	host[colon - p] = 0;
	po = strtol(colon + 1, &e, 10);
	if (e == colon + 1 || *e || po <= 0 || po > 65535)
		return false;
	*slot = (unsigned)sl;
	*port = (int)po;
	return true;
}

/* Send @r to the master at @host:@port: its queue, or parked until a new map knows it. */
static void tr_handoff(struct tier_redis *tr, struct tr_req *r, const char *host, int port)
{
	struct tr_node *t = tr_node_find(tr, host, port);
	int rc;

	if (t) {
		rc = tr_submit(tr, t, r, false);
		if (rc)
			tr_finish(tr, r, rc, 0, 0);
		return;
	}
	snprintf(r->thost, sizeof(r->thost), "%s", host);
	r->tport = port;
	rc = ks_lock(&tr->map_lock);
	if (rc) {
		tr_finish(tr, r, rc, 0, 0);
		return;
	}
	if (tr->map_stopping) {
		rc = -ECANCELED;
	} else {
		r->next = tr->parked;
		tr->parked = r;
	}
	ks_unlock(&tr->map_lock);
	if (rc)
		tr_finish(tr, r, rc, 0, 0);
	else
		tr_want_map(tr);
}

/*
 * If @rep redirects @r (cluster mode), follow it and return true: @r now
 * belongs to another node's queue or the parked list (@queued: it was
 * counted in @n's pending). False: not a redirect, or one too many.
 */
static bool tr_follow(struct tr_node *n, struct tr_req *r, const redisReply *rep, bool queued)
{
	struct tier_redis *tr = n->tr;
	char host[256];
	unsigned slot;
	bool ask;
	int port;

	if (!tr->cluster || !tr_parse_redirect(rep, &ask, &slot, host, sizeof(host), &port))
		return false;
	if (!host[0])
		snprintf(host, sizeof(host), "%s", n->host);
	if (++r->redirects > TR_MAX_REDIRECTS) {
		log_warn("tier_redis: %s: redirected %u times (last: %s); giving up", r->rkey,
			 r->redirects - 1, rep->str);
		return false;
	}
	r->asking = ask;
	if (ask) {
		cnt_inc(tr, asked);
	} else {
		struct tr_node *t = tr_node_find(tr, host, port);

		cnt_inc(tr, moved);
		/* The slot moved for good: route its next keys there at once; the
		 * map thread re-reads the whole map for the slots moved with it. */
		if (t)
			atomic_store_explicit(&tr->slot_owner[slot], (uint8_t)(t - tr->nodes + 1),
					      memory_order_release);
		tr_want_map(tr);
	}
	if (queued)
		tr_unpend(n);
	tr_handoff(tr, r, host, port);
	return true;
}

/* EXISTS key @i of part @r was redirected: ask the named master for it in a part of its own. */
static bool tr_exists_follow(struct tr_node *n, struct tr_req *r, size_t i, const redisReply *rep)
{
	struct tr_req *s;

	if (!n->tr->cluster || !tr_is_redirect(rep))
		return false;
	s = calloc(1, sizeof(*s));
	if (!s)
		return false;
	s->ex_idx = malloc(sizeof(*s->ex_idx));
	s->ex_keys = malloc(sizeof(*s->ex_keys));
	if (!s->ex_idx || !s->ex_keys) {
		tr_req_free(s);
		return false;
	}
	s->op = TR_EXISTS;
	s->ex = r->ex;
	s->ex_n = 1;
	s->ex_idx[0] = r->ex_idx[i];
	memcpy(s->ex_keys[0], r->ex_keys[i], TR_KEY_MAX);
	memcpy(s->rkey, r->ex_keys[i], TR_KEY_MAX);
	s->redirects = r->redirects;
	/* @r still holds its own part, so the call cannot finish under us. */
	atomic_fetch_add_explicit(&r->ex->parts_left, 1, memory_order_relaxed);
	if (!tr_follow(n, s, rep, false)) {
		tr_exists_part_done(s, -EIO);
		tr_req_free(s);
	}
	return true;
}

/*
 * Read @r's replies. Returns 0 when the connection is still good (the
 * request is completed or handed on), or the -errno that broke it (@r not
 * completed).
 */
static int tr_read_replies(struct tr_node *n, struct tr_req *r)
{
	struct tier_redis *tr = n->tr;
	redisReply *rep = NULL;
	uint64_t tag = 0;
	size_t len = 0;
	int status = 0;

	if (r->asking) {
		/* ASKING's +OK; an error there shows again in the command's reply */
		if (redisGetReply(n->c, (void **)&rep) != REDIS_OK)
			return tr_io_err(n);
		freeReplyObject(rep);
		rep = NULL;
		r->asking = false;
	}
	if (r->op == TR_EXISTS) {
		for (size_t i = 0; i < r->ex_n; i++) {
			if (redisGetReply(n->c, (void **)&rep) != REDIS_OK)
				return tr_io_err(n);
			if (tr_exists_follow(n, r, i, rep)) {
				/* answered by the part sent on */
			} else if (tr->cluster && tr_is_unavailable(rep)) {
				if (!status)
					status = -ENOTCONN;
				tr_want_map(tr);
			} else if (rep->type == REDIS_REPLY_INTEGER) {
				bool hit = rep->integer > 0;

				r->ex->present[r->ex_idx[i]] = hit;
				if (hit)
					cnt_inc(tr, exists_hits);
			} else if (!status) {
				status = tr_reply_error(rep);
			}
			freeReplyObject(rep);
		}
		cnt_add(tr, exists_keys, r->ex_n);
		tr_complete(n, r, status, 0, 0);
		return 0;
	}
	if (redisGetReply(n->c, (void **)&rep) != REDIS_OK)
		return tr_io_err(n);
	if (tr_follow(n, r, rep, true)) {
		freeReplyObject(rep);
		return 0;
	}
	if (tr->cluster && tr_is_unavailable(rep)) {
		log_debug("tier_redis: %s:%d: %s", n->host, n->port, rep->str);
		freeReplyObject(rep);
		tr_want_map(tr);
		tr_complete(n, r, -ENOTCONN, 0, 0);
		return 0;
	}
	switch (r->op) {
	case TR_PUT:
		if (rep->type == REDIS_REPLY_STATUS) {
			cnt_inc(tr, puts);
			cnt_add(tr, bytes_out, TIER_CHUNK_HDR_SIZE + r->nbytes);
		} else {
			status = tr_reply_error(rep);
		}
		break;
	case TR_GET:
		cnt_inc(tr, gets);
		status = tr_get_value(n, r, rep, &tag, &len);
		break;
	default:
		status = rep->type == REDIS_REPLY_ERROR ? tr_reply_error(rep) : 0;
		break;
	}
	freeReplyObject(rep);
	if (r->corrupt) {
		/* The pipeline is drained up to here, but later replies are queued:
		 * delete through a DEL request at the head of our own queue. */
		struct tr_req *d = calloc(1, sizeof(*d));

		if (d && ks_lock(&n->lock) == 0) {
			d->op = TR_DEL;
			memcpy(d->rkey, r->rkey, sizeof(d->rkey));
			d->next = n->qhead;
			n->qhead = d;
			if (!n->qtail)
				n->qtail = d;
			n->pending++;
			ks_unlock(&n->lock);
		} else {
			free(d);
		}
	}
	tr_complete(n, r, status, tag, len);
	return 0;
}

static void tr_fail_list(struct tr_node *n, struct tr_req *r, int status)
{
	while (r) {
		struct tr_req *nx = r->next;

		tr_complete(n, r, status, 0, 0);
		r = nx;
	}
}

/* Run one batch on a live connection; a broken connection fails the rest. */
static void tr_run_batch(struct tr_node *n, struct tr_req *batch)
{
	struct tr_req *r, *appended = NULL, **atail = &appended;
	int rc = 0;

	/* Append everything; a request that cannot be built fails alone. */
	for (r = batch; r;) {
		struct tr_req *nx = r->next;

		r->next = NULL;
		rc = tr_append(n, r);
		if (rc < 0) {
			tr_complete(n, r, rc, 0, 0);
		} else {
			*atail = r;
			atail = &r->next;
		}
		r = nx;
	}
	/* redisGetReply flushes the output buffer before the first read. */
	for (r = appended; r;) {
		struct tr_req *nx = r->next;

		rc = tr_read_replies(n, r);
		if (rc) {
			const char *why = n->c->errstr[0] ? n->c->errstr : "i/o error";
			char whybuf[128];

			snprintf(whybuf, sizeof(whybuf), "%s", why);
			tr_disconnect(n, whybuf);
			tr_complete(n, r, rc, 0, 0);
			tr_fail_list(n, nx, -ENOTCONN);
			return;
		}
		r = nx;
	}
}

static void *tr_worker(void *p)
{
	struct tr_node *n = p;
	struct tier_redis *tr = n->tr;
	sigset_t all;

	/* A write to a dead socket must give EPIPE here, not kill the process. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (;;) {
		struct tr_req *batch = NULL, **tail = &batch;
		bool connected, stop, retry = false;
		uint64_t bytes = 0;
		unsigned count = 0;

		/* Connect before taking requests, so that what was queued to a node
		 * not yet (or no longer) connected is sent once it is. */
		if (!n->c && ks_now_ms() >= n->next_try_ms && tr_connect(n)) {
			n->next_try_ms = ks_now_ms() + n->backoff_ms;
			n->backoff_ms = KS_MIN(n->backoff_ms * 2, tr->backoff_max_ms);
		}
		connected = n->c != NULL;
		if (ks_lock(&n->lock))
			continue;	/* logged; the lock holder only queues */
		while (!n->stopping && !n->qhead) {
			uint64_t wait = TR_IDLE_WAIT_MS, now = ks_now_ms();

			if (!connected) {
				if (now >= n->next_try_ms) {
					retry = true;
					break;
				}
				wait = KS_MIN(wait, n->next_try_ms - now);
			}
			ks_cond_wait_ms(&n->cond, &n->lock, wait);
		}
		stop = n->stopping;
		if (retry && !stop) {
			ks_unlock(&n->lock);
			continue;
		}
		/* Down or stopping: take everything (to fail it); else one batch. */
		while (n->qhead && (stop || !connected ||
				    (count < TR_BATCH_MAX &&
				     (!count || bytes + n->qhead->nbytes <= tr->pipeline_bytes)))) {
			struct tr_req *r = n->qhead;

			n->qhead = r->next;
			if (!n->qhead)
				n->qtail = NULL;
			r->next = NULL;
			*tail = r;
			tail = &r->next;
			count++;
			bytes += r->nbytes;	/* put: value sent; get: reply buffer */
		}
		ks_unlock(&n->lock);

		if (stop) {
			tr_fail_list(n, batch, -ECANCELED);
			break;
		}
		if (!connected) {
			tr_fail_list(n, batch, -ENOTCONN);
			continue;
		}
		tr_run_batch(n, batch);
	}
	if (n->c) {
		redisFree(n->c);
		n->c = NULL;
	}
	return NULL;
}

/* ---- public API -------------------------------------------------------------- */

static void tr_free_nodes(struct tier_redis *tr, size_t ninit)
{
	for (size_t i = 0; i < ninit; i++) {
		struct tr_node *n = &tr->nodes[i];

		if (n->c)
			redisFree(n->c);
		ks_cond_destroy(&n->cond);
		ks_mutex_destroy(&n->lock);
	}
	if (tr->map_lock_init) {
		ks_cond_destroy(&tr->map_cond);
		ks_mutex_destroy(&tr->map_lock);
	}
	explicit_bzero(tr->password, sizeof(tr->password));
	free(tr->nodes);
	free(tr);
}

static int tr_node_init(struct tier_redis *tr, struct tr_node *n, const char *host, int port,
			unsigned lock_timeout_ms)
{
	int rc;

	n->tr = tr;
	snprintf(n->host, sizeof(n->host), "%s", host);
	n->port = port;
	rc = ks_mutex_init(&n->lock, LOCK_RANK_TIER, "tier_redis_node");
	if (rc)
		return rc;
	rc = ks_cond_init(&n->cond);
	if (rc) {
		ks_mutex_destroy(&n->lock);
		return rc;
	}
	if (lock_timeout_ms)
		n->lock.timeout_ms = lock_timeout_ms;
	n->backoff_ms = tr->backoff_min_ms;
	return 0;
}

/*
 * Cluster: a node for the master @host:@port, connected (bounded) and its
 * worker started, then published. Map thread or open only (one adder).
 */
static struct tr_node *tr_node_add(struct tier_redis *tr, const char *host, int port)
{
	size_t i = tr_nnodes(tr);
	struct tr_node *n = &tr->nodes[i];
	int rc;

	if (i >= tr->cap) {
		log_error("tier_redis: more than %zu cluster masters: %s:%d not used", tr->cap, host,
			  port);
		return NULL;
	}
	memset(n, 0, sizeof(*n));
	if (tr_node_init(tr, n, host, port, tr->map_lock.timeout_ms))
		return NULL;
	if (tr_connect(n)) {
		log_warn("tier_redis: %s:%d: not reachable; retrying in the background", host, port);
		n->next_try_ms = ks_now_ms() + n->backoff_ms;
	}
	rc = pthread_create(&n->thread, NULL, tr_worker, n);
	if (rc) {
		if (n->c)
			redisFree(n->c);
		ks_cond_destroy(&n->cond);
		ks_mutex_destroy(&n->lock);
		return NULL;
	}
	n->thread_started = true;
	log_info("tier_redis: cluster master %s:%d added", host, port);
	atomic_store_explicit(&tr->nnodes, i + 1, memory_order_release);
	return n;
}

static void tr_want_map(struct tier_redis *tr)
{
	/* Only the first asker wakes the map thread; it polls every 100 ms anyway. */
	if (!tr->cluster || atomic_exchange(&tr->map_want, true))
		return;
	if (ks_lock(&tr->map_lock) == 0) {
		ks_cond_signal(&tr->map_cond);
		ks_unlock(&tr->map_lock);
	}
}

/* Apply a CLUSTER SLOTS reply got from @host. 0, or -EBADMSG (malformed: nothing changed). */
static int tr_map_apply(struct tier_redis *tr, const redisReply *rep, const char *host)
{
	uint8_t *owner = calloc(TR_SLOTS, 1);
	unsigned counts[TIER_REDIS_MAX_NODES + 1] = { 0 }, uncovered = 0;
	bool changed = false, degraded = false;
	size_t nn;

	if (!owner)
		return -ENOMEM;
	if (rep->type != REDIS_REPLY_ARRAY)
		goto bad;
	for (size_t i = 0; i < rep->elements; i++) {
		const redisReply *r = rep->element[i], *m;
		char mhost[256];
		struct tr_node *node;
		long long lo, hi;

		if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
		    r->element[0]->type != REDIS_REPLY_INTEGER ||
		    r->element[1]->type != REDIS_REPLY_INTEGER)
			goto bad;
		lo = r->element[0]->integer;
		hi = r->element[1]->integer;
		m = r->element[2];
		if (lo < 0 || hi >= TR_SLOTS || lo > hi || m->type != REDIS_REPLY_ARRAY ||
		    m->elements < 2 || m->element[0]->type != REDIS_REPLY_STRING ||
		    m->element[1]->type != REDIS_REPLY_INTEGER || m->element[1]->integer <= 0 ||
		    m->element[1]->integer > 65535 || m->element[0]->len >= sizeof(mhost))
			goto bad;
		/* an empty (or "?") address means the node we asked */
		snprintf(mhost, sizeof(mhost), "%s",
			 m->element[0]->len && strcmp(m->element[0]->str, "?") ? m->element[0]->str :
										   host);
		node = tr_node_find(tr, mhost, (int)m->element[1]->integer);
		if (!node)
			node = tr_node_add(tr, mhost, (int)m->element[1]->integer);
		if (!node)
			continue;	/* logged; its slots stay uncovered */
		for (long long sl = lo; sl <= hi; sl++)
			owner[sl] = (uint8_t)(node - tr->nodes + 1);
	}
	for (unsigned sl = 0; sl < TR_SLOTS; sl++) {
		if (atomic_load_explicit(&tr->slot_owner[sl], memory_order_relaxed) != owner[sl]) {
			changed = true;
			atomic_store_explicit(&tr->slot_owner[sl], owner[sl], memory_order_release);
		}
		counts[owner[sl]]++;
	}
	uncovered = counts[0];
	nn = tr_nnodes(tr);
	for (size_t i = 0; i < nn; i++) {
		atomic_store(&tr->nodes[i].slots, counts[i + 1]);
		if (counts[i + 1] && !atomic_load(&tr->nodes[i].up))
			degraded = true;
	}
	if (changed || uncovered != atomic_load(&tr->slots_uncovered)) {
		unsigned masters = 0;

		for (size_t i = 0; i < nn; i++)
			masters += counts[i + 1] > 0;
		if (uncovered)
			log_warn("tier_redis: cluster map: %u master(s), %u of %u slots not covered "
				 "(their chunks fail fast until they are)", masters, uncovered,
				 TR_SLOTS);
		else
			log_info("tier_redis: cluster map: %u master(s), all slots covered", masters);
	}
	atomic_store(&tr->slots_uncovered, uncovered);
	atomic_store(&tr->degraded, degraded || uncovered);
	cnt_inc(tr, map_refreshes);
	free(owner);
	return 0;
bad:
	free(owner);
	cnt_inc(tr, map_errors);
	log_warn("tier_redis: %s: malformed CLUSTER SLOTS reply; map unchanged", host);
	return -EBADMSG;
}

/* Ask @host:@port for the map. 0, -ENOTCONN, -EACCES, -EINVAL (not a cluster), -EBADMSG. */
static int tr_map_from(struct tier_redis *tr, const char *host, int port)
{
	redisContext *c;
	redisReply *rep;
	int rc = tr_open_conn(tr, host, port, &c);

	if (rc)
		return rc;
	rep = redisCommand(c, "CLUSTER SLOTS");
	if (!rep) {
		rc = -ENOTCONN;
	} else if (rep->type == REDIS_REPLY_ERROR) {
		if (strstr(rep->str, "cluster support disabled") || strstr(rep->str, "unknown command"))
			log_error("tier_redis: %s:%d is not a Redis Cluster node (%s); use redis:// "
				  "for a single server", host, port, rep->str);
		else
			log_warn("tier_redis: %s:%d: CLUSTER SLOTS: %s", host, port, rep->str);
		rc = -EINVAL;
	} else {
		rc = tr_map_apply(tr, rep, host);
	}
	freeReplyObject(rep);
	redisFree(c);
	return rc;
}

/*
 * Read the map from the first node that answers: connected masters first
 * (rotating), then the seeds, then every other node known. Map thread or
 * open. Returns 0 or the last error.
 */
static int tr_map_refresh(struct tier_redis *tr, bool at_open)
{
	size_t nn = tr_nnodes(tr);
	int rc = -ENOTCONN;

	for (int pass = 0; pass < 3; pass++) {
		size_t cnt = pass == 1 ? tr->nseeds : nn;

		for (size_t k = 0; k < cnt; k++) {
			const char *host;
			int port;

			if (pass == 1) {
				host = tr->seeds[k].host;
				port = tr->seeds[k].port;
			} else {
				struct tr_node *n = &tr->nodes[(k + tr->map_rr) % nn];
				bool good = atomic_load(&n->up) && atomic_load(&n->slots);

				if (good != (pass == 0))
					continue;
				host = n->host;
				port = n->port;
			}
			rc = tr_map_from(tr, host, port);
			if (!rc) {
				tr->map_rr++;
				return 0;
			}
			if (at_open && (rc == -EACCES || rc == -EINVAL))
				return rc;	/* wrong credentials or not a cluster: say so at start */
		}
	}
	cnt_inc(tr, map_errors);
	return rc;
}

/* Hand the parked redirects to the masters the new map knows; fail the rest. */
static void tr_drain_parked(struct tier_redis *tr, int fail_status)
{
	struct tr_req *r;

	if (ks_lock(&tr->map_lock))
		return;	/* logged; retried after the next refresh */
	r = tr->parked;
	tr->parked = NULL;
	ks_unlock(&tr->map_lock);
	while (r) {
		struct tr_req *nx = r->next;
		struct tr_node *t = fail_status ? NULL : tr_node_find(tr, r->thost, r->tport);
		int rc = fail_status ? fail_status : -ENOTCONN;

		r->next = NULL;
		if (t)
			rc = tr_submit(tr, t, r, false);
		if (rc)
			tr_finish(tr, r, rc, 0, 0);
		r = nx;
	}
}

static void *tr_map_worker(void *p)
{
	struct tier_redis *tr = p;
	uint64_t last = ks_now_ms();
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (;;) {
		bool stop;

		if (ks_lock(&tr->map_lock))
			continue;	/* logged; the holders only flag or park */
		for (;;) {
			uint64_t now = ks_now_ms(), period = atomic_load(&tr->degraded) ?
							     TR_MAP_DEGRADED_MS : TR_MAP_PERIOD_MS;

			if (tr->map_stopping || now >= last + period ||
			    (atomic_load(&tr->map_want) && now >= last + TR_MAP_GAP_MS))
				break;
			ks_cond_wait_ms(&tr->map_cond, &tr->map_lock, TR_IDLE_WAIT_MS);
		}
		stop = tr->map_stopping;
		ks_unlock(&tr->map_lock);
		if (stop)
			break;
		atomic_store(&tr->map_want, false);
		if (tr_map_refresh(tr, false))
			atomic_store(&tr->degraded, true);	/* nobody answered: keep asking */
		last = ks_now_ms();
		tr_drain_parked(tr, 0);
	}
	tr_drain_parked(tr, -ECANCELED);
	return NULL;
}

/* Credentials from the URLs (all the same where given) or the config. */
static int tr_set_credentials(struct tier_redis *tr, const struct tier_redis_config *cfg,
			      const struct tr_url *u, bool *seen)
{
	if (u->has_userinfo) {
		if (*seen && (strcmp(tr->user, u->user) || strcmp(tr->password, u->password))) {
			log_error("tier_redis: the URLs carry different credentials");
			return -EINVAL;
		}
		if ((cfg->password && cfg->password[0]) || (cfg->user && cfg->user[0])) {
			log_error("tier_redis: credentials given both in the URL and by "
				  "--redis-user/--redis-password-file: give them once");
			return -EINVAL;
		}
		snprintf(tr->user, sizeof(tr->user), "%s", u->user);
		snprintf(tr->password, sizeof(tr->password), "%s", u->password);
		*seen = true;
	}
	return 0;
}

int tier_redis_open(const struct tier_redis_config *cfg, struct tier_redis **out)
{
	struct tier_redis *tr;
	struct tr_url u;
	bool seen_cred = false;
	size_t i, nurls;
	int rc;

	if (!cfg || !cfg->urls || !cfg->nurls || cfg->nurls > TIER_REDIS_MAX_NODES)
		return -EINVAL;
	if (cfg->key_prefix && strlen(cfg->key_prefix) >= sizeof(tr->prefix))
		return -EINVAL;
	if ((cfg->user && strlen(cfg->user) >= sizeof(tr->user)) ||
	    (cfg->password && strlen(cfg->password) >= sizeof(tr->password)))
		return -EINVAL;
	tr = calloc(1, sizeof(*tr));
	if (!tr)
		return -ENOMEM;
	snprintf(tr->prefix, sizeof(tr->prefix), "%s", cfg->key_prefix ? cfg->key_prefix : "kvstash:");
	snprintf(tr->user, sizeof(tr->user), "%s", cfg->user ? cfg->user : "");
	snprintf(tr->password, sizeof(tr->password), "%s", cfg->password ? cfg->password : "");
	tr->ttl_s = cfg->ttl_s;
	tr->queue_depth = cfg->queue_depth ? cfg->queue_depth : TR_DEFAULT_QUEUE_DEPTH;
	tr->connect_timeout_ms = cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 1000;
	tr->io_timeout_ms = cfg->io_timeout_ms ? cfg->io_timeout_ms : 5000;
	tr->backoff_min_ms = cfg->backoff_min_ms ? cfg->backoff_min_ms : 50;
	tr->backoff_max_ms = KS_MAX(cfg->backoff_max_ms ? cfg->backoff_max_ms : 2000,
				    tr->backoff_min_ms);
	tr->pipeline_bytes = cfg->pipeline_bytes ? cfg->pipeline_bytes : (64ull << 20);
	nurls = cfg->nurls;
	/* Parse everything first: a bad URL is reported before anything connects. */
	for (i = 0; i < nurls; i++) {
		char shown[1100];

		rc = tr_parse_url(cfg->urls[i], &u);
		if (!rc && i == 0)
			tr->cluster = u.scheme == 2;
		if (!rc && (tr->cluster ? u.scheme == 1 : u.scheme == 2))
			rc = -EINVAL;	/* redis:// and redis+cluster:// mixed */
		if (!rc)
			rc = tr_set_credentials(tr, cfg, &u, &seen_cred);
		if (rc) {
			tier_redis_redact_url(cfg->urls[i], shown, sizeof(shown));
			log_error("tier_redis: bad URL '%s' (want redis://[user:password@]host:port "
				  "or redis+cluster://[user:password@]host:port[,host:port...])",
				  shown);
			goto out_free;
		}
		if (tr->cluster) {
			snprintf(tr->seeds[i].host, sizeof(tr->seeds[i].host), "%s", u.host);
			tr->seeds[i].port = u.port;
			tr->nseeds++;
		}
	}
	if (tr->user[0] && !tr->password[0]) {
		log_error("tier_redis: a Redis user (%s) needs a password", tr->user);
		rc = -EINVAL;
		goto out_free;
	}
	tr->cap = tr->cluster ? TIER_REDIS_MAX_NODES : nurls;
	tr->nodes = calloc(tr->cap, sizeof(*tr->nodes));
	if (!tr->nodes) {
		rc = -ENOMEM;
		goto out_free;
	}
	if (tr->cluster) {
		rc = ks_mutex_init(&tr->map_lock, LOCK_RANK_TIER, "tier_redis_map");
		if (rc)
			goto out_free;
		rc = ks_cond_init(&tr->map_cond);
		if (rc) {
			ks_mutex_destroy(&tr->map_lock);
			goto out_free;
		}
		if (cfg->lock_timeout_ms)
			tr->map_lock.timeout_ms = cfg->lock_timeout_ms;
		tr->map_lock_init = true;
		/* The first map here (connecting its masters), so requests right after
		 * open find them; unreachable seeds are retried in the background. */
		rc = tr_map_refresh(tr, true);
		if (rc == -EACCES || rc == -EINVAL) {
			tier_redis_close(tr);
			return rc;
		}
		if (rc)
			log_warn("tier_redis: no cluster seed answered; retrying in the background");
		rc = -pthread_create(&tr->map_thread, NULL, tr_map_worker, tr);
		if (rc) {
			tier_redis_close(tr);
			return rc;
		}
		tr->map_started = true;
		log_info("tier_redis: cluster, %zu seed(s), %zu master(s), prefix '%s', ttl %u s",
			 tr->nseeds, tr_nnodes(tr), tr->prefix, tr->ttl_s);
		*out = tr;
		return 0;
	}
	for (i = 0; i < nurls; i++) {
		tr_parse_url(cfg->urls[i], &u);	/* checked above */
		rc = tr_node_init(tr, &tr->nodes[i], u.host, u.port, cfg->lock_timeout_ms);
		if (rc)
			goto out_nodes;
	}
	atomic_store(&tr->nnodes, nurls);
	/* First connect here, so requests right after open find the node up. */
	for (i = 0; i < nurls; i++) {
		struct tr_node *n = &tr->nodes[i];

		rc = tr_connect(n);
		if (rc == -EACCES) {
			tr_free_nodes(tr, nurls);
			return rc;
		}
		if (rc) {
			log_warn("tier_redis: %s:%d: not reachable; retrying in the background",
				 n->host, n->port);
			n->next_try_ms = ks_now_ms() + n->backoff_ms;
		}
	}
	rc = 0;
	for (i = 0; i < nurls; i++) {
		rc = -pthread_create(&tr->nodes[i].thread, NULL, tr_worker, &tr->nodes[i]);
		if (rc)
			break;
		tr->nodes[i].thread_started = true;
	}
	if (rc) {
		*out = NULL;
		tier_redis_close(tr);
		return rc;
	}
	log_info("tier_redis: %zu node(s), prefix '%s', ttl %u s%s", nurls, tr->prefix, tr->ttl_s,
		 tr->password[0] ? ", authenticated" : "");
	*out = tr;
	return 0;

out_nodes:
	tr_free_nodes(tr, i);
	return rc;
out_free:
	tr_free_nodes(tr, 0);
	return rc;
}

void tier_redis_close(struct tier_redis *tr)
{
	size_t nn;

	if (!tr)
		return;
	/* The map thread first: after it, no node is added and nothing is parked. */
	if (tr->map_lock_init) {
		while (ks_lock(&tr->map_lock))
			log_warn("tier_redis: close: retrying the map lock");
		tr->map_stopping = true;
		ks_cond_broadcast(&tr->map_cond);
		ks_unlock(&tr->map_lock);
		if (tr->map_started)
			pthread_join(tr->map_thread, NULL);
	}
	nn = tr_nnodes(tr);
	for (size_t i = 0; i < nn; i++) {
		struct tr_node *n = &tr->nodes[i];

		while (ks_lock(&n->lock))
			log_warn("tier_redis: close: retrying the node lock");
		n->stopping = true;
		ks_cond_broadcast(&n->cond);
		ks_unlock(&n->lock);
	}
	/* Bounded: a worker's longest call is one hiredis timeout. */
	for (size_t i = 0; i < nn; i++)
		if (tr->nodes[i].thread_started)
			pthread_join(tr->nodes[i].thread, NULL);
	/* A worker's redirect may have parked a request after the map thread left. */
	if (tr->map_lock_init)
		tr_drain_parked(tr, -ECANCELED);
	tr_free_nodes(tr, nn);
}

/* Queue @r on @n. Returns 0 or a synchronous error (then @r is not queued). */
static int tr_submit(struct tier_redis *tr, struct tr_node *n, struct tr_req *r, bool fail_fast)
{
	int rc;

	if (!n || (fail_fast && !atomic_load_explicit(&n->up, memory_order_acquire))) {
		cnt_inc(tr, notconn);
		return -ENOTCONN;
	}
	rc = ks_lock(&n->lock);
	if (rc)
		return rc;
	if (n->stopping) {
		rc = -ECANCELED;
	} else if (n->pending >= tr->queue_depth) {
		rc = -EAGAIN;
	} else {
		n->pending++;
		r->next = NULL;
		if (n->qtail)
			n->qtail->next = r;
		else
			n->qhead = r;
		n->qtail = r;
		ks_cond_signal(&n->cond);
	}
	ks_unlock(&n->lock);
	if (rc == -EAGAIN)
		cnt_inc(tr, dropped_full);
	return rc;
}

int tier_redis_put(struct tier_redis *tr, const struct ks_key *key, uint64_t layout_tag,
		   const void *data, size_t nbytes, unsigned flags, ks_tier_done_fn done,
		   void *arg)
{
	struct tr_req *r;
	int rc;

	if (!data || !nbytes)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->op = TR_PUT;
	r->key = *key;
	tier_redis_key(tr, key, r->rkey, sizeof(r->rkey));
	r->layout_tag = layout_tag;
	r->data = data;
	r->nbytes = nbytes;
	r->done = done;
	r->arg = arg;
	struct tr_node *n = tr_node_of(tr, r->rkey);

	if (!n || !atomic_load_explicit(&n->up, memory_order_acquire)) {
		cnt_inc(tr, notconn);
		free(r);
		return -ENOTCONN;	/* before copying 32 MiB for nothing */
	}
	if (flags & TIER_REDIS_PUT_COPY) {
		/* The header is filled in by the worker, with the checksum. */
		r->value = malloc(TIER_CHUNK_HDR_SIZE + nbytes);
		if (!r->value) {
			free(r);
			return -ENOMEM;
		}
		memcpy(r->value + TIER_CHUNK_HDR_SIZE, data, nbytes);
		r->data = NULL;
	}
	rc = tr_submit(tr, n, r, true);
	if (rc)
		tr_req_free(r);
	return rc;
}

int tier_redis_get(struct tier_redis *tr, const struct ks_key *key, void *dst, size_t cap,
		   ks_tier_done_fn done, void *arg)
{
	struct tr_req *r;
	int rc;

	if (!dst)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->op = TR_GET;
	r->key = *key;
	tier_redis_key(tr, key, r->rkey, sizeof(r->rkey));
	r->dst = dst;
	r->nbytes = cap;
	r->done = done;
	r->arg = arg;
	rc = tr_submit(tr, tr_node_of(tr, r->rkey), r, true);
	if (rc)
		tr_req_free(r);
	return rc;
}

int tier_redis_remove(struct tier_redis *tr, const struct ks_key *key)
{
	struct tr_req *r = calloc(1, sizeof(*r));
	int rc;

	if (!r)
		return -ENOMEM;
	r->op = TR_DEL;
	tier_redis_key(tr, key, r->rkey, sizeof(r->rkey));
	rc = tr_submit(tr, tr_node_of(tr, r->rkey), r, true);
	if (rc)
		free(r);
	return rc;
}

int tier_redis_exists(struct tier_redis *tr, const struct ks_key *keys, size_t n,
		      tier_redis_exists_fn done, void *arg)
{
	struct tr_req **parts;
	struct tr_exists *ex;
	char rkey[TR_KEY_MAX];
	size_t nparts = 0, routed = 0;
	int rc = -ENOMEM;

	if (!n || !done)
		return -EINVAL;
	parts = calloc(tr->cap, sizeof(*parts));
	ex = calloc(1, sizeof(*ex));
	if (!parts || !ex)
		goto out_free;
	ex->present = calloc(n, sizeof(*ex->present));
	if (!ex->present)
		goto out_free;
	ex->n = n;
	ex->done = done;
	ex->arg = arg;
	/* One request per node that owns any of the keys. */
	for (size_t i = 0; i < n; i++) {
		size_t ni;
		struct tr_req *r;

		struct tr_node *node;

		tier_redis_key(tr, &keys[i], rkey, sizeof(rkey));
		node = tr_node_of(tr, rkey);
		if (!node)
			continue;	/* slot not covered: reads as absent */
		ni = (size_t)(node - tr->nodes);
		routed++;
		r = parts[ni];
		if (!r) {
			r = parts[ni] = calloc(1, sizeof(*r));
			if (!r)
				goto out_parts;
			r->op = TR_EXISTS;
			r->ex = ex;
			r->ex_idx = malloc(n * sizeof(*r->ex_idx));
			r->ex_keys = malloc(n * sizeof(*r->ex_keys));
			if (!r->ex_idx || !r->ex_keys)
				goto out_parts;
			nparts++;
		}
		r->ex_idx[r->ex_n] = i;
		memcpy(r->ex_keys[r->ex_n++], rkey, TR_KEY_MAX);
	}
	/* One extra part held by this call, so that @done runs once even when
	 * no node owns any key (uncovered slots) or every part fails at once. */
	atomic_store(&ex->parts_left, (unsigned)nparts + 1);
	/* From here on, @done is called: each part either queues or completes. */
	for (size_t ni = 0; ni < tr->cap; ni++) {
		struct tr_req *r = parts[ni];

		if (!r)
			continue;
		/* A down node's worker answers -ENOTCONN at once; no fail-fast here so
		 * that the batch still completes through @done. */
		rc = tr_submit(tr, &tr->nodes[ni], r, false);
		if (rc) {
			tr_exists_part_done(r, rc);
			tr_req_free(r);
		}
	}
	free(parts);
	{
		struct tr_req self = { .op = TR_EXISTS, .ex = ex };

		if (routed != n) {
			cnt_inc(tr, notconn);
			tr_want_map(tr);
		}
		tr_exists_part_done(&self, routed != n ? -ENOTCONN : 0);
	}
	return 0;

out_parts:
	for (size_t ni = 0; ni < tr->cap; ni++)
		if (parts[ni])
			tr_req_free(parts[ni]);
out_free:
	if (ex)
		free(ex->present);
	free(ex);
	free(parts);
	return rc;
}

/* ---- synchronous exists ------------------------------------------------------ */

/* Shared by the waiter and the callback; the last of the two frees it. */
struct tr_waiter {
	struct ks_mutex lock;
	struct ks_cond cond;
	_Atomic int refs;
	bool done;
	int status;
	bool *present;		/* owned, [n] */
	size_t n;
};

static void tr_waiter_put(struct tr_waiter *w)
{
	if (atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) == 1) {
		ks_cond_destroy(&w->cond);
		ks_mutex_destroy(&w->lock);
		free(w->present);
		free(w);
	}
}

static void tr_waiter_done(void *arg, int status, const bool *present, size_t n)
{
	struct tr_waiter *w = arg;

	if (ks_lock(&w->lock) == 0) {
		memcpy(w->present, present, n * sizeof(*present));
		w->status = status;
		w->done = true;
		ks_cond_signal(&w->cond);
		ks_unlock(&w->lock);
	}
	tr_waiter_put(w);
}

long tier_redis_exists_wait(struct tier_redis *tr, const struct ks_key *keys, size_t n,
			    bool *present, unsigned timeout_ms)
{
	struct tr_waiter *w;
	uint64_t deadline = ks_now_ms() + timeout_ms;
	long rc;

	ks_assert_unlocked();
	memset(present, 0, n * sizeof(*present));
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->present = calloc(n ? n : 1, sizeof(*w->present));
	if (!w->present || ks_mutex_init(&w->lock, LOCK_RANK_TIER, "tier_redis_wait") ||
	    ks_cond_init(&w->cond)) {
		/* NOTE: init failures of a mutex/cond are not expected on Linux. */
		free(w->present);
		free(w);
		return -ENOMEM;
	}
	w->n = n;
	atomic_store(&w->refs, 2);
	rc = tier_redis_exists(tr, keys, n, tr_waiter_done, w);
	if (rc) {
		atomic_store(&w->refs, 1);
		tr_waiter_put(w);
		return rc;
	}
	rc = ks_lock(&w->lock);
	if (rc) {
		tr_waiter_put(w);
		return rc;
	}
	while (!w->done) {
		uint64_t now = ks_now_ms();

		if (now >= deadline)
			break;
		ks_cond_wait_ms(&w->cond, &w->lock, deadline - now);
	}
	if (!w->done) {
		rc = -ETIMEDOUT;
	} else if (w->status && w->status != -ENOTCONN) {
		rc = w->status;
	} else {
		/* Keys on a down node read as absent: the prefix just gets shorter. */
		memcpy(present, w->present, n * sizeof(*present));
		rc = 0;
		while ((size_t)rc < n && present[rc])
			rc++;
	}
	ks_unlock(&w->lock);
	tr_waiter_put(w);
	return rc;
}

void tier_redis_get_stats(struct tier_redis *tr, struct tier_redis_stats *out)
{
	memset(out, 0, sizeof(*out));
#define LD(c) out->c = atomic_load_explicit(&tr->c, memory_order_relaxed)
	LD(puts);
	LD(put_errors);
	LD(gets);
	LD(hits);
	LD(misses);
	LD(corrupt);
	LD(notconn);
	LD(dropped_full);
	LD(timeouts);
	LD(reconnects);
	LD(exists_keys);
	LD(exists_hits);
	LD(bytes_out);
	LD(bytes_in);
	LD(moved);
	LD(asked);
	LD(map_refreshes);
	LD(map_errors);
#undef LD
	out->cluster = tr->cluster;
	out->slots_uncovered = tr->cluster ? atomic_load(&tr->slots_uncovered) : 0;
	out->nodes = (unsigned)tr_nnodes(tr);
	for (size_t i = 0; i < out->nodes; i++)
		out->nodes_up += atomic_load_explicit(&tr->nodes[i].up, memory_order_relaxed);
}

size_t tier_redis_nodes(struct tier_redis *tr, struct tier_redis_node_info *out, size_t max)
{
	size_t nn = KS_MIN(tr_nnodes(tr), max);

	for (size_t i = 0; i < nn; i++) {
		const struct tr_node *n = &tr->nodes[i];

		snprintf(out[i].addr, sizeof(out[i].addr), "%s:%d", n->host, n->port);
		out[i].up = atomic_load_explicit(&n->up, memory_order_relaxed);
		out[i].slots = tr->cluster ? atomic_load(&n->slots) : 0;
	}
	return nn;
}
