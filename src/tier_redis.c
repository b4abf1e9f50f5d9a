/*
 * tier_redis.c - L3 Redis/Valkey tier: one hiredis connection and worker
 * thread per node, requests pipelined in batches.
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
 *
 * Lock ordering (full list in docs/architecture.md):
 *
 * ... caller's locks of lower rank
 *   tr_node->lock           (LOCK_RANK_TIER: the node's queue; a leaf)
 *     log ring
 *
 * Never held across a hiredis call, a callback or a wait (ks_cond_wait_ms
 * releases it).
 */
#include "tier_redis.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

struct tier_redis {
	struct tr_node *nodes;
	size_t nnodes;
	char prefix[128];
	unsigned ttl_s;
	unsigned queue_depth;
	unsigned connect_timeout_ms, io_timeout_ms;
	unsigned backoff_min_ms, backoff_max_ms;
	uint64_t pipeline_bytes;

	_Atomic uint64_t puts, put_errors, gets, hits, misses, corrupt, notconn, dropped_full,
		timeouts, reconnects, exists_keys, exists_hits, bytes_out, bytes_in;
};

#define cnt_add(tr, c, v) atomic_fetch_add_explicit(&(tr)->c, (v), memory_order_relaxed)
#define cnt_inc(tr, c) cnt_add(tr, c, 1)

/* ---- helpers ----------------------------------------------------------------- */

void tier_redis_key(const struct tier_redis *tr, const struct ks_key *key, char *out, size_t n)
{
	char name[KS_CHUNK_NAME_MAX];

	ks_chunk_name(key, name);
	snprintf(out, n, "%s%s", tr->prefix, name);
}

static struct tr_node *tr_node_of(struct tier_redis *tr, const char *rkey)
{
	return &tr->nodes[XXH64(rkey, strlen(rkey), 0) % tr->nnodes];
}

/* "redis://host:port", "host:port" or "host" (port 6379). */
static int tr_parse_url(const char *url, char *host, size_t hostlen, int *port)
{
	const char *p = url, *colon;
	char *end;
	long v = 6379;
	size_t hl;

	if (!strncmp(p, "redis://", 8))
		p += 8;
	colon = strrchr(p, ':');
	hl = colon ? (size_t)(colon - p) : strcspn(p, "/");
	if (!hl || hl >= hostlen)
		return -EINVAL;
	memcpy(host, p, hl);
	host[hl] = 0;
	if (colon) {
		v = strtol(colon + 1, &end, 10);
		if (end == colon + 1 || (*end && *end != '/') || v <= 0 || v > 65535)
			return -EINVAL;
	}
	*port = (int)v;
	return 0;
}

static struct timeval tv_ms(unsigned ms)
{
	return (struct timeval){ .tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000 };
}

/* Connect @n (worker, or open before the worker starts). No lock held. */
static int tr_connect(struct tr_node *n)
{
	struct tier_redis *tr = n->tr;
	redisContext *c;

	ks_assert_unlocked();
	c = redisConnectWithTimeout(n->host, n->port, tv_ms(tr->connect_timeout_ms));
	if (!c || c->err) {
		log_debug("tier_redis: connect %s:%d: %s", n->host, n->port,
			  c ? c->errstr : "out of memory");
		if (c)
			redisFree(c);
		return -ENOTCONN;
	}
	if (redisSetTimeout(c, tv_ms(tr->io_timeout_ms)) != REDIS_OK) {
		redisFree(c);
		return -ENOTCONN;
	}
	redisEnableKeepAlive(c);
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

/* Finish @r: callback with no lock held, then free. */
static void tr_complete(struct tr_node *n, struct tr_req *r, int status, uint64_t tag, size_t len)
{
	struct tier_redis *tr = n->tr;

	if (status == -ENOTCONN)
		cnt_inc(tr, notconn);
	if (r->op == TR_PUT && status)
		cnt_inc(tr, put_errors);
	if (ks_lock(&n->lock) == 0) {
		n->pending--;
		ks_unlock(&n->lock);
	}
	ks_assert_unlocked();
	if (r->op == TR_EXISTS)
		tr_exists_part_done(r, status);
	else if (r->done)
		r->done(r->arg, status, tag, len);
	tr_req_free(r);
}

/* ---- worker -------------------------------------------------------------------- */

/* Build the SET value of a put: header (with the payload checksum) + payload. */
static int tr_build_value(struct tr_req *r)
{
	if (!r->value) {
		r->value = malloc(KS_CHUNK_HDR_SIZE + r->nbytes);
		if (!r->value)
			return -ENOMEM;
		memcpy(r->value + KS_CHUNK_HDR_SIZE, r->data, r->nbytes);
	}
	ks_chunk_hdr_encode(r->value, &r->key, r->layout_tag, r->nbytes,
			    ks_chunk_sum(r->value + KS_CHUNK_HDR_SIZE, r->nbytes));
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

	switch (r->op) {
	case TR_PUT:
		rc = tr_build_value(r);
		if (rc)
			return rc;
		argv[0] = "SET";
		argv[1] = r->rkey;
		argv[2] = (const char *)r->value;
		argl[2] = KS_CHUNK_HDR_SIZE + r->nbytes;
		argv[3] = "EX";
		snprintf(ttl, sizeof(ttl), "%u", tr->ttl_s);
		argv[4] = ttl;
		for (int i = 0; i < 5; i++)
			if (i != 2)
				argl[i] = strlen(argv[i]);
		rc = redisAppendCommandArgv(n->c, tr->ttl_s ? 5 : 3, argv, argl);
		/* NOTE: hiredis copied the value into its output buffer; ours can go. */
		free(r->value);
		r->value = NULL;
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
	struct ks_chunk_meta m;

	if (rep->type == REDIS_REPLY_NIL) {
		cnt_inc(tr, misses);
		return -ENOENT;
	}
	if (rep->type != REDIS_REPLY_STRING)
		return tr_reply_error(rep);
	cnt_add(tr, bytes_in, rep->len);
	if (rep->len < KS_CHUNK_HDR_SIZE || ks_chunk_hdr_decode((const uint8_t *)rep->str, &m))
		goto corrupt;
	if (m.payload_len > r->nbytes && (size_t)rep->len == KS_CHUNK_HDR_SIZE + m.payload_len)
		return -EMSGSIZE;
	if ((uint64_t)rep->len != KS_CHUNK_HDR_SIZE + m.payload_len ||
	    ks_chunk_verify(&m, &r->key, rep->str + KS_CHUNK_HDR_SIZE, (size_t)m.payload_len))
		goto corrupt;
	memcpy(r->dst, rep->str + KS_CHUNK_HDR_SIZE, (size_t)m.payload_len);
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

/*
 * Read @r's replies. Returns 0 when the connection is still good (the
 * request is completed), or the -errno that broke it (@r not completed).
 */
static int tr_read_replies(struct tr_node *n, struct tr_req *r)
{
	struct tier_redis *tr = n->tr;
	redisReply *rep = NULL;
	uint64_t tag = 0;
	size_t len = 0;
	int status = 0;

	if (r->op == TR_EXISTS) {
		for (size_t i = 0; i < r->ex_n; i++) {
			if (redisGetReply(n->c, (void **)&rep) != REDIS_OK)
				return tr_io_err(n);
			if (rep->type == REDIS_REPLY_INTEGER) {
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
	switch (r->op) {
	case TR_PUT:
		if (rep->type == REDIS_REPLY_STATUS) {
			cnt_inc(tr, puts);
			cnt_add(tr, bytes_out, KS_CHUNK_HDR_SIZE + r->nbytes);
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
		bool connected = n->c != NULL, stop;
		uint64_t bytes = 0;
		unsigned count = 0;

		if (ks_lock(&n->lock))
			continue;	/* logged; the lock holder only queues */
		while (!n->stopping && !n->qhead) {
			uint64_t wait = TR_IDLE_WAIT_MS, now = ks_now_ms();

			if (!connected) {
				if (now >= n->next_try_ms)
					break;
				wait = KS_MIN(wait, n->next_try_ms - now);
			}
			ks_cond_wait_ms(&n->cond, &n->lock, wait);
		}
		stop = n->stopping;
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
			if (ks_now_ms() >= n->next_try_ms && tr_connect(n)) {
				n->next_try_ms = ks_now_ms() + n->backoff_ms;
				n->backoff_ms = KS_MIN(n->backoff_ms * 2, tr->backoff_max_ms);
			}
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
	free(tr->nodes);
	free(tr);
}

int tier_redis_open(const struct tier_redis_config *cfg, struct tier_redis **out)
{
	struct tier_redis *tr;
	size_t i;
	int rc;

	if (!cfg || !cfg->urls || !cfg->nurls || cfg->nurls > TIER_REDIS_MAX_NODES)
		return -EINVAL;
	if (cfg->key_prefix && strlen(cfg->key_prefix) >= sizeof(tr->prefix))
		return -EINVAL;
	tr = calloc(1, sizeof(*tr));
	if (!tr)
		return -ENOMEM;
	snprintf(tr->prefix, sizeof(tr->prefix), "%s", cfg->key_prefix ? cfg->key_prefix : "kvstash:");
	tr->ttl_s = cfg->ttl_s;
	tr->queue_depth = cfg->queue_depth ? cfg->queue_depth : TR_DEFAULT_QUEUE_DEPTH;
	tr->connect_timeout_ms = cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 1000;
	tr->io_timeout_ms = cfg->io_timeout_ms ? cfg->io_timeout_ms : 5000;
	tr->backoff_min_ms = cfg->backoff_min_ms ? cfg->backoff_min_ms : 50;
	tr->backoff_max_ms = KS_MAX(cfg->backoff_max_ms ? cfg->backoff_max_ms : 2000,
				    tr->backoff_min_ms);
	tr->pipeline_bytes = cfg->pipeline_bytes ? cfg->pipeline_bytes : (64ull << 20);
	tr->nnodes = cfg->nurls;
	tr->nodes = calloc(tr->nnodes, sizeof(*tr->nodes));
	if (!tr->nodes) {
		free(tr);
		return -ENOMEM;
	}
	for (i = 0; i < tr->nnodes; i++) {
		struct tr_node *n = &tr->nodes[i];

		n->tr = tr;
		rc = tr_parse_url(cfg->urls[i], n->host, sizeof(n->host), &n->port);
		if (rc) {
			log_error("tier_redis: bad URL '%s' (want redis://host:port)", cfg->urls[i]);
			goto out_nodes;
		}
		rc = ks_mutex_init(&n->lock, LOCK_RANK_TIER, "tier_redis_node");
		if (rc)
			goto out_nodes;
		rc = ks_cond_init(&n->cond);
		if (rc) {
			ks_mutex_destroy(&n->lock);
			goto out_nodes;
		}
		if (cfg->lock_timeout_ms)
			n->lock.timeout_ms = cfg->lock_timeout_ms;
		n->backoff_ms = tr->backoff_min_ms;
	}
	/* First connect here, so requests right after open find the node up. */
	for (i = 0; i < tr->nnodes; i++) {
		struct tr_node *n = &tr->nodes[i];

		if (tr_connect(n)) {
			log_warn("tier_redis: %s:%d: not reachable; retrying in the background",
				 n->host, n->port);
			n->next_try_ms = ks_now_ms() + n->backoff_ms;
		}
	}
	for (i = 0; i < tr->nnodes; i++) {
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
	log_info("tier_redis: %zu node(s), prefix '%s', ttl %u s", tr->nnodes, tr->prefix,
		 tr->ttl_s);
	*out = tr;
	return 0;

out_nodes:
	tr_free_nodes(tr, i);
	return rc;
}

void tier_redis_close(struct tier_redis *tr)
{
	if (!tr)
		return;
	for (size_t i = 0; i < tr->nnodes; i++) {
		struct tr_node *n = &tr->nodes[i];

		while (ks_lock(&n->lock))
			log_warn("tier_redis: close: retrying the node lock");
		n->stopping = true;
		ks_cond_broadcast(&n->cond);
		ks_unlock(&n->lock);
	}
	/* Bounded: a worker's longest call is one hiredis timeout. */
	for (size_t i = 0; i < tr->nnodes; i++)
		if (tr->nodes[i].thread_started)
			pthread_join(tr->nodes[i].thread, NULL);
	tr_free_nodes(tr, tr->nnodes);
}

/* Queue @r on @n. Returns 0 or a synchronous error (then @r is not queued). */
static int tr_submit(struct tier_redis *tr, struct tr_node *n, struct tr_req *r, bool fail_fast)
{
	int rc;

	if (fail_fast && !atomic_load_explicit(&n->up, memory_order_acquire)) {
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

	if (!atomic_load_explicit(&n->up, memory_order_acquire)) {
		cnt_inc(tr, notconn);
		free(r);
		return -ENOTCONN;	/* before copying 32 MiB for nothing */
	}
	if (flags & TIER_REDIS_PUT_COPY) {
		/* The header is filled in by the worker, with the checksum. */
		r->value = malloc(KS_CHUNK_HDR_SIZE + nbytes);
		if (!r->value) {
			free(r);
			return -ENOMEM;
		}
		memcpy(r->value + KS_CHUNK_HDR_SIZE, data, nbytes);
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
	size_t nparts = 0;
	int rc = -ENOMEM;

	if (!n || !done)
		return -EINVAL;
	parts = calloc(tr->nnodes, sizeof(*parts));
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

		tier_redis_key(tr, &keys[i], rkey, sizeof(rkey));
		ni = (size_t)(tr_node_of(tr, rkey) - tr->nodes);
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
	atomic_store(&ex->parts_left, (unsigned)nparts);
	/* From here on, @done is called: each part either queues or completes. */
	for (size_t ni = 0; ni < tr->nnodes; ni++) {
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
	return 0;

out_parts:
	for (size_t ni = 0; ni < tr->nnodes; ni++)
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
#undef LD
	out->nodes = (unsigned)tr->nnodes;
	for (size_t i = 0; i < tr->nnodes; i++)
		out->nodes_up += atomic_load_explicit(&tr->nodes[i].up, memory_order_relaxed);
}
