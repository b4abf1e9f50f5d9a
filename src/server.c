/*
 * server.c - the io thread: the ROUTER socket, request dispatch, the inline
 * request handlers, housekeeping, and the server's life cycle
 * (srv_create/srv_run/srv_request_stop/srv_destroy). The rest of the server:
 * server_registry.c (instances, hash sessions), server_xfer.c
 * (STORE/RETRIEVE and the workers' jobs), server_tiers.c (L2/L3 demotion,
 * write-through, prefetch) and server_stats.c (KS_STATS, /metrics, /stats,
 * health); server_priv.h holds the types they share.
 *
 * DESIGN: one io thread owns the ZMQ socket (ZMQ sockets are not
 * thread-safe) and everything only it touches: the instance registry, the
 * session hash cache, the lookup job table and the per-client last-error
 * table, so none of them has a lock. It answers PING, NOOP,
 * GET_CHUNK_SIZE, LOOKUP, the QUERY_* calls, FREE_LOOKUP_LOCKS,
 * END_SESSION, CLEAR, REGISTER and UNREGISTER inline; these touch only
 * the index (shard, LRU and pool locks, each briefly) and never wait on a
 * transfer. STORE and RETRIEVE are validated and hashed here, then queued
 * to the transfer engine; workers reserve or pin their index entries, copy
 * with no lock held and commit/unpin, and the io thread sends the reply
 * when the job comes back through the completion eventfd.
 *
 * Instances are shared with workers by reference count: a queued job holds
 * a reference, so UNREGISTER or the reaper never unmaps memory under a
 * running copy; the last reference unmaps.
 *
 * Threads: srv_run and all it calls run on the io thread; srv_create and
 * srv_destroy on the thread that calls them, before and after srv_run;
 * srv_request_stop on any thread, signal handlers included.
 *
 * Lock ordering (full list in docs/architecture.md): the server files
 * (server*.c) define no lock and take none of their own. Every lock they
 * cause is taken and dropped inside one call: idx_* (shard > LRU > pool),
 * pool_* (pool), tier_disk_* and tier_redis_* (tier), xfer_* (queue, a leaf)
 * and log_* (log ring). So they call these one at a time, never nested,
 * and hold no lock across zmq calls, CUDA calls or waits.
 */
#include "server.h"
#include "server_priv.h"
#include "fault.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zmq.h>

#include "auth.h"
#include "chunk_key.h"
#include "compiler.h"
#include "index.h"
#include "lock.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "protocol.h"
#include "tier_disk.h"
#include "tier_redis.h"
#include "transfer.h"
#include "transfer_cuda.h"

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static void count_request(struct srv *s, enum proto_type t)
{
	if ((unsigned)t < PROTO_OP_COUNT)
		atomic_fetch_add_explicit(&s->ctr.requests[t], 1, memory_order_relaxed);
}

uint64_t srv_identity_hash(const uint8_t *id, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < len; i++)
		h = (h ^ id[i]) * 0x100000001b3ull;
	return h;
}

static void identity_hex(const struct srv_reply_addr *a, char *out, size_t cap)
{
	size_t n = 0;

	for (size_t i = 0; i < a->identity_len && n + 3 < cap && i < 16; i++)
		n += (size_t)snprintf(out + n, cap - n, "%02x", a->identity[i]);
	out[n] = '\0';
}

/* Remember @msg as @addr's last error (PROTO_KS_LAST_ERROR) and log it. */
void KS_PRINTF(3, 4) srv_set_last_error(struct srv *s, const struct srv_reply_addr *addr,
					const char *fmt, ...)
{
	struct srv_last_error *le =
		&s->last_errors[srv_identity_hash(addr->identity, addr->identity_len) %
				SRV_LAST_ERROR_SLOTS];
	char who[40];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(le->msg, sizeof(le->msg), fmt, ap);
	va_end(ap);
	memcpy(le->identity, addr->identity, addr->identity_len);
	le->identity_len = addr->identity_len;
	identity_hex(addr, who, sizeof(who));
	log_warn("client %s: %s", who, le->msg);
}

static char *get_last_error(struct srv *s, const struct srv_reply_addr *addr)
{
	struct srv_last_error *le =
		&s->last_errors[srv_identity_hash(addr->identity, addr->identity_len) %
				SRV_LAST_ERROR_SLOTS];

	if (le->identity_len == addr->identity_len &&
	    !memcmp(le->identity, addr->identity, addr->identity_len))
		return le->msg;
	static char none[1];
	none[0] = '\0';
	return none;
}

/* Send [identity, uid, type, response]. Never blocks: a full peer drops it. */
static void send_reply(struct srv *s, const struct srv_reply_addr *a, const struct proto_msg *m)
{
	ks_assert_unlocked();
	if (zmq_send(s->sock, a->identity, a->identity_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
	    zmq_send(s->sock, a->uid, a->uid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
	    zmq_send(s->sock, a->type, a->type_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
	    zmq_send(s->sock, m->data, m->len, ZMQ_DONTWAIT) < 0) {
		srv_ctr_add(&s->ctr.replies_dropped, 1);
		log_debug("reply dropped: %s", zmq_strerror(zmq_errno()));
	}
}

/*
 * Send [identity, uid, type] with no response frame: how LMCache's current
 * server answers None (its client maps a missing frame to None for every
 * reply type, where c0 would fail to decode as, say, an int).
 */
static void send_reply_none(struct srv *s, const struct srv_reply_addr *a)
{
	ks_assert_unlocked();
	if (zmq_send(s->sock, a->identity, a->identity_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
	    zmq_send(s->sock, a->uid, a->uid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
	    zmq_send(s->sock, a->type, a->type_len, ZMQ_DONTWAIT) < 0) {
		srv_ctr_add(&s->ctr.replies_dropped, 1);
		log_debug("reply dropped: %s", zmq_strerror(zmq_errno()));
	}
}

/* Send an encoded response frame (@rc: the encoder's result) and free it. */
void srv_send_encoded(struct srv *s, const struct srv_reply_addr *a, int rc,
		      struct proto_msg *m)
{
	if (rc == 0)
		send_reply(s, a, m);
	proto_msg_free(m);
}

/* None: c0 in the March dialect (protocol.md §1), no frame in the current one. */
void srv_reply_nil(struct srv *s, const struct srv_reply_addr *a)
{
	struct proto_msg m = { 0 };

	if (a->dialect == PROTO_DIALECT_CURRENT) {
		send_reply_none(s, a);
		return;
	}
	srv_send_encoded(s, a, proto_encode_nil(&m), &m);
}

static void reply_bool(struct srv *s, const struct srv_reply_addr *a, bool v)
{
	struct proto_msg m = { 0 };

	srv_send_encoded(s, a, proto_encode_bool(&m, v), &m);
}

void srv_reply_int(struct srv *s, const struct srv_reply_addr *a, int64_t v)
{
	struct proto_msg m = { 0 };

	srv_send_encoded(s, a, proto_encode_int(&m, v), &m);
}

static void reply_str(struct srv *s, const struct srv_reply_addr *a, const char *v)
{
	struct proto_msg m = { 0 };

	srv_send_encoded(s, a, proto_encode_str(&m, v), &m);
}

/* [bin event, ok]: 64 bytes on the GPU path, c4 00 on the host path (protocol.md §5.3). */
void srv_reply_xfer_event(struct srv *s, const struct srv_reply_addr *a,
			  const uint8_t *event, size_t event_len, bool ok)
{
	struct proto_msg m = { 0 };

	srv_send_encoded(s, a, proto_encode_xfer_reply(&m, event, event_len, ok), &m);
}

void srv_reply_xfer(struct srv *s, const struct srv_reply_addr *a, bool ok)
{
	srv_reply_xfer_event(s, a, NULL, 0, ok);
}

/* ------------------------------------------------------------------------ */
/* Inline handlers                                                          */

static void handle_register(struct srv *s, const struct srv_reply_addr *a,
			    const struct proto_request *rq)
{
	struct srv_instance *in = NULL;
	char err[SRV_ERR_MAX];
	int rc;

	rc = srv_instance_build(s, rq, &in, err, sizeof(err));
	if (rc) {
		srv_ctr_add(&s->ctr.semantic_errors, 1);
		srv_set_last_error(s, a, "REGISTER_KV_CACHE instance %" PRId64 ": %s",
				   rq->instance_id, err);
		/* The pinned protocol has no error reply here; STOREs to it will fail. */
		srv_reply_nil(s, a);
		return;
	}
	srv_instance_set_owner(s, in, a);
	in->owner_pid = srv_registry_owner_pid(rq);
	if (s->warm && s->cur_type_frame &&
	    srv_registry_keep_frames(in, rq->dialect, s->cur_type_frame, s->cur_args, s->cur_nargs))
		log_warn("instance %" PRId64 ": out of memory keeping its registration: it will "
			 "not survive a restart", in->id);
	if (in->device >= 0) {
		/* IPC handles are opened by the device's workers; the reply waits for it. */
		rc = srv_registry_submit_cuda(s, in, rq, a);
		if (rc) {
			srv_set_last_error(s, a, "REGISTER_KV_CACHE instance %" PRId64 ": %s",
					   rq->instance_id, rc == -ENOMEM ? "out of memory" :
					   strerror(-rc));
			srv_reply_nil(s, a);
		}
		return;
	}
	srv_registry_insert(s, in);
	srv_reply_nil(s, a);
}

static void handle_unregister(struct srv *s, const struct srv_reply_addr *a,
			      const struct proto_request *rq)
{
	struct srv_instance *in = srv_instance_find(s, rq->instance_id);

	if (in && !srv_instance_owned_by(s, in, a)) {
		srv_ctr_add(&s->ctr.semantic_errors, 1);
		srv_set_last_error(s, a, "UNREGISTER_KV_CACHE: instance %" PRId64 " was registered "
				   "by another connection", rq->instance_id);
		srv_reply_nil(s, a);
		return;
	}
	if (srv_instance_remove(s, rq->instance_id))
		log_info("instance %" PRId64 ": unregistered", rq->instance_id);
	else
		log_info("UNREGISTER_KV_CACHE of unknown instance %" PRId64, rq->instance_id);
	srv_reply_nil(s, a);
}

/*
 * Read locks a LOOKUP takes per key, and FREE_LOOKUP_LOCKS releases: March,
 * 1 + extra_count (protocol.md §4.4); current, the key's num_kv_readers
 * (§11.4), which must be at least 1 (0 if not: the request is refused).
 */
static uint32_t locks_per_key(const struct proto_request *rq)
{
	if (rq->dialect == PROTO_DIALECT_CURRENT)
		return rq->key.num_kv_readers;
	return 1 + srv_extra_lock_count(rq->tp_size, rq->key.world_size);
}

/*
 * LMCache refuses a current key without num_kv_readers (an exception in its
 * handler: no reply) when there is something to lock; so does kvstashd,
 * logging and counting it.
 */
static void refuse_no_readers(struct srv *s, const struct srv_reply_addr *a,
			      const struct proto_request *rq)
{
	srv_ctr_add(&s->ctr.lookup_refused, 1);
	srv_ctr_add(&s->ctr.semantic_errors, 1);
	srv_set_last_error(s, a, "%s refused: key.num_kv_readers is 0 (clients before LMCache's "
			   "num_kv_readers field send none; LMCache refuses them too)",
			   proto_type_name(rq->type));
}

static void handle_lookup(struct srv *s, const struct srv_reply_addr *a,
			  const struct proto_request *rq)
{
	const struct proto_key *k = &rq->key;
	const bool current = rq->dialect == PROTO_DIALECT_CURRENT;
	/* March hashes every full chunk; the current client says where to stop */
	size_t ntok = current ? (size_t)KS_MIN((uint64_t)k->end, (uint64_t)k->ntokens) : k->ntokens;
	size_t nchunks = ntok / s->cfg.chunk_tokens, hits = 0;
	const uint32_t nlocks = locks_per_key(rq);
	int64_t chunks = 0;
	struct srv_lookup_job *job;
	struct srv_instance *in = NULL;
	struct srv_xfer_job *pf = NULL;

	if (k->world_size == 0 || k->world_size > 255) {
		srv_set_last_error(s, a, "LOOKUP: world_size %u out of range 1..255", k->world_size);
	} else if ((in = srv_model_instance(s, k->model, k->model_len, k->world_size)) && nchunks &&
		   nlocks == 0) {
		refuse_no_readers(s, a, rq);
		return;
	} else if (in && nchunks) {
		const uint8_t(*h)[KS_HASH_LEN] = srv_chunk_hashes(s, k, nchunks);
		ssize_t nk = h ? srv_expand_keys(s, k, h, 0, nchunks) : -ENOMEM;

		if (nk < 0) {
			srv_set_last_error(s, a, "LOOKUP: %s", strerror((int)-nk));
		} else {
			int rc = idx_lookup_lock(s->idx, s->key_buf, (size_t)nk, k->world_size, nlocks,
						 &hits);
			if (rc)
				srv_set_last_error(s, a, "LOOKUP: index: %s", strerror(-rc));
			else
				chunks = (int64_t)(hits / k->world_size);
			if (!rc && hits < (size_t)nk && (s->l2 || s->l3))
				pf = srv_prefetch_job(s, s->key_buf, (size_t)nk, hits, k->world_size,
						      nlocks, in->object_bytes, k->token_ids);
		}
	}
	job = &s->jobs[(uint64_t)s->next_job_id % SRV_JOB_SLOTS];
	job->id = s->next_job_id;
	job->chunks = chunks;
	if (pf) {
		/* The rest of the prefix may be in L2/L3: QUERY_* answer nil until loaded. */
		pf->lookup_job = job->id;
		if (srv_submit_job(s, 0, pf) == 0) {
			job->chunks = -1;
			chunks = 0;
		} else {
			srv_xfer_job_free(pf);
		}
	}
	srv_ctr_add(&s->ctr.lookup_hit_chunks, (uint64_t)chunks);
	log_debug("LOOKUP model '%s' %zu tokens: %" PRId64 " chunk(s) hit, job %" PRId64,
		  k->model, k->ntokens, chunks, job->id);
	if (current) {
		/* asked for by request_id (server_lookup.c); LOOKUP itself replies None */
		srv_rid_job_put(s, k->request_id, k->request_id_len, s->next_job_id++);
		srv_reply_nil(s, a);
		return;
	}
	srv_reply_int(s, a, s->next_job_id++);
}

static void handle_query(struct srv *s, const struct srv_reply_addr *a,
			 const struct proto_request *rq, bool consume)
{
	struct srv_lookup_job *job;

	if (rq->job_id < 0) {
		srv_reply_nil(s, a);
		return;
	}
	job = &s->jobs[(uint64_t)rq->job_id % SRV_JOB_SLOTS];
	if (job->id != rq->job_id || job->chunks < 0) {
		srv_reply_nil(s, a);	/* unknown, consumed, too old, or still loading */
		return;
	}
	srv_reply_int(s, a, job->chunks);
	if (consume)
		job->id = -1;
}

static void handle_free_lookup_locks(struct srv *s, const struct srv_reply_addr *a,
				     const struct proto_request *rq)
{
	const struct proto_key *k = &rq->key;
	uint32_t C = s->cfg.chunk_tokens;
	size_t nchunks = k->ntokens / C;
	size_t first = k->start > 0 ? (size_t)k->start / C : 0;
	size_t last = k->end > 0 ? KS_MIN((size_t)k->end / C, nchunks) : 0;

	if (k->world_size == 0 || k->world_size > 255) {
		srv_set_last_error(s, a, "FREE_LOOKUP_LOCKS: world_size %u out of range",
				   k->world_size);
	} else if (first < last && locks_per_key(rq) == 0) {
		refuse_no_readers(s, a, rq);
		return;
	} else if (first < last) {
		const uint8_t(*h)[KS_HASH_LEN] = srv_chunk_hashes(s, k, last);
		ssize_t nk = h ? srv_expand_keys(s, k, h, first, last - first) : -ENOMEM;
		uint32_t n = locks_per_key(rq);

		for (ssize_t i = 0; i < nk; i++)
			idx_release_read_locks(s->idx, &s->key_buf[i], n);
	}
	srv_reply_nil(s, a);
}

static void handle_clear(struct srv *s, const struct srv_reply_addr *a)
{
	size_t n = idx_clear(s->idx);

	kve_cleared(s->kve);

	log_info("CLEAR: %zu object(s) dropped", n);
	srv_reply_nil(s, a);
}

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                 */

void srv_frame_fault(struct srv *s, const struct srv_reply_addr *a, int rc, const char *why)
{
	srv_ctr_add(&s->ctr.frame_faults, 1);
	/* protocol.md §3 Errors rule 1: log, count, drop (no reply). The message
	 * stays available to kvstash clients through PROTO_KS_LAST_ERROR. */
	srv_set_last_error(s, a, "dropped malformed request (%s): %s", strerror(-rc), why);
}

/*
 * An operation kvstashd does not implement (current dialect, protocol.md
 * §11.7): answered the way that lets LMCache's client go on (a failed
 * transfer, an empty result, None), logged once per connection, counted.
 */
static void handle_unsupported(struct srv *s, struct srv_conn *c, const struct srv_reply_addr *a,
			       const struct proto_request *rq)
{
	struct proto_msg m = { 0 };
	/* one bit per named operation; every unknown name shares the last */
	unsigned bit = rq->op_name == rq->op_name_buf ? 63 :
		       (unsigned)(srv_identity_hash((const uint8_t *)rq->op_name,
						    strlen(rq->op_name)) % 63);

	srv_ctr_add(&s->ctr.unsupported_ops, 1);
	if (!c || !(c->unsupported_logged & (1ull << bit))) {
		if (c)
			c->unsupported_logged |= 1ull << bit;
		srv_set_last_error(s, a, "operation '%s' is not implemented by kvstash: answered %s "
				   "(logged once per connection)", rq->op_name,
				   rq->unsupported_reply == PROTO_UNSUP_NONE ? "None" : "as a refusal");
	}
	if (rq->unsupported_reply == PROTO_UNSUP_NONE) {
		srv_reply_nil(s, a);
		return;
	}
	srv_send_encoded(s, a, proto_encode_unsupported(&m, rq->unsupported_reply), &m);
}

static void dispatch(struct srv *s, zmq_msg_t *frames, size_t nframes)
{
	struct srv_reply_addr a;
	struct proto_buf type_frame, args[SRV_MAX_FRAMES];
	struct proto_request rq;
	struct srv_conn *conn;
	enum proto_dialect dialect;
	char err[SRV_ERR_MAX];
	uint64_t uid;
	int rc;

	/* Receipt: before decoding, so latencies and the accept phase include it. */
	s->cur_recv_ns = ks_now_ns();
	memset(&a, 0, sizeof(a));
	a.identity_len = KS_MIN(zmq_msg_size(&frames[0]), sizeof(a.identity));
	memcpy(a.identity, zmq_msg_data(&frames[0]), a.identity_len);
	if (nframes < 3) {
		srv_frame_fault(s, &a, -EINVAL, "fewer than 2 frames after the identity");
		return;
	}
	if (zmq_msg_size(&frames[1]) > SRV_SMALL_FRAME_MAX) {
		srv_frame_fault(s, &a, -EPROTO, "uid frame is not a msgpack int");
		return;
	}
	if (zmq_msg_size(&frames[2]) > SRV_OP_FRAME_MAX) {
		srv_frame_fault(s, &a, -E2BIG, "type frame is neither a msgpack int nor an operation "
				"name of at most 64 bytes");
		return;
	}
	a.uid_len = zmq_msg_size(&frames[1]);
	memcpy(a.uid, zmq_msg_data(&frames[1]), a.uid_len);
	a.type_len = zmq_msg_size(&frames[2]);
	memcpy(a.type, zmq_msg_data(&frames[2]), a.type_len);
	struct proto_buf uid_frame = { a.uid, a.uid_len };
	if (proto_decode_uid(&uid_frame, &uid)) {
		srv_frame_fault(s, &a, -EPROTO, "uid frame is not a msgpack int >= 0");
		return;
	}
	type_frame.data = a.type;
	type_frame.len = a.type_len;
	for (size_t i = 3; i < nframes; i++) {
		args[i - 3].data = zmq_msg_data(&frames[i]);
		args[i - 3].len = zmq_msg_size(&frames[i]);
	}
	s->cur_type_frame = &type_frame;
	s->cur_args = args;
	s->cur_nargs = nframes - 3;
	memset(&rq, 0, sizeof(rq));
	conn = srv_conn_get(s, a.identity, a.identity_len);
	if (conn && !conn->bound)	/* the wire frames carry the metadata, not the identity */
		srv_conn_bind(s, conn, &frames[1]);
	s->cur_conn = conn;
	dialect = conn ? conn->dialect : s->pinned_dialect;
	rc = proto_decode_request_in(dialect, &type_frame, args, nframes - 3, &rq, err,
				     sizeof(err));
	if (rc) {
		srv_frame_fault(s, &a, rc, err);
		return;
	}
	/* The first request that tells the dialects apart latches the connection. */
	srv_conn_latch(s, conn, rq.dialect);
	a.dialect = rq.dialect;
	count_request(s, rq.type);
	switch (rq.type) {
	case PROTO_PING:
		if (rq.has_instance_id) {
			struct srv_instance *in = srv_instance_find(s, rq.instance_id);

			if (in && srv_instance_owned_by(s, in, &a))
				in->last_ping_ms = ks_now_ms();
		}
		reply_bool(s, &a, true);
		break;
	case PROTO_NOOP:
		reply_str(s, &a, "OK");
		break;
	case PROTO_GET_CHUNK_SIZE:
		srv_reply_int(s, &a, s->cfg.chunk_tokens);
		break;
	case PROTO_REGISTER_KV_CACHE:
		handle_register(s, &a, &rq);
		break;
	case PROTO_UNREGISTER_KV_CACHE:
		handle_unregister(s, &a, &rq);
		break;
	case PROTO_STORE:
	case PROTO_RETRIEVE:
		srv_handle_xfer(s, &a, &rq);
		break;
	case PROTO_LOOKUP:
		handle_lookup(s, &a, &rq);
		break;
	case PROTO_QUERY_PREFETCH_STATUS:
	case PROTO_QUERY_PREFETCH_LOOKUP_HITS:
		if (rq.dialect == PROTO_DIALECT_CURRENT)
			srv_handle_query_current(s, &a, &rq, rq.type == PROTO_QUERY_PREFETCH_STATUS);
		else
			handle_query(s, &a, &rq, rq.type == PROTO_QUERY_PREFETCH_STATUS);
		break;
	case PROTO_WAIT_PREFETCH_STATUS:
		srv_handle_wait(s, &a, &rq);
		break;
	case PROTO_REPORT_BLOCK_ALLOCATION:
		/* vLLM's block allocation deltas: kvstash has no use for them */
		srv_reply_nil(s, &a);
		break;
	case PROTO_GET_EXPERIMENTAL: {
		/* No experimental features: the client then sends no Q-cache or
		 * KV-event operations (an empty list, never None: None fails its startup). */
		struct proto_msg m = { 0 };

		srv_send_encoded(s, &a, proto_encode_empty_list(&m), &m);
		break;
	}
	case PROTO_UNSUPPORTED:
		handle_unsupported(s, conn, &a, &rq);
		break;
	case PROTO_AMBIGUOUS:
		/* END_SESSION (nil) or QUERY_PREFETCH_STATUS (nil = "still loading, ask
		 * again"): nil is right in both, and the session expires by its TTL. */
		srv_ctr_add(&s->ctr.ambiguous_requests, 1);
		srv_reply_nil(s, &a);
		break;
	case PROTO_OP_COUNT:
		break;
	case PROTO_FREE_LOOKUP_LOCKS:
		handle_free_lookup_locks(s, &a, &rq);
		break;
	case PROTO_END_SESSION:
		srv_session_unlink(s, rq.request_id, rq.request_id_len);
		srv_reply_nil(s, &a);
		break;
	case PROTO_CLEAR:
		/* force: kvstash's CLEAR already drops all but objects in a copy */
		handle_clear(s, &a);
		break;
	case PROTO_KS_LAST_ERROR: {
		/* Read once: a message is reported to its client one time. */
		char *msg = get_last_error(s, &a);

		reply_str(s, &a, msg);
		msg[0] = '\0';
		break;
	}
	case PROTO_KS_STATS:
		srv_handle_stats(s, &a);
		break;
	}
	if (rq.type == PROTO_PING)
		metrics_hist_observe(&s->lat_ping, ks_now_ns() - s->cur_recv_ns);
	else if (rq.type == PROTO_LOOKUP)
		metrics_hist_observe(&s->lat_lookup, ks_now_ns() - s->cur_recv_ns);
	s->cur_conn = NULL;
	proto_request_free(&rq);
}

/* Receive and dispatch up to SRV_RECV_BATCH messages without blocking. */
static void drain_socket(struct srv *s)
{
	for (int m = 0; m < SRV_RECV_BATCH; m++) {
		zmq_msg_t frames[SRV_MAX_FRAMES];
		size_t n = 0;
		int more = 1;
		bool overflow = false;

		while (more) {
			zmq_msg_t *f = n < SRV_MAX_FRAMES ? &frames[n] : &frames[SRV_MAX_FRAMES - 1];

			if (n >= SRV_MAX_FRAMES) {
				/* Too many frames: keep reading the rest into the last slot. */
				zmq_msg_close(f);
				overflow = true;
			}
			zmq_msg_init(f);
			if (zmq_msg_recv(f, s->sock, ZMQ_DONTWAIT) < 0) {
				zmq_msg_close(f);
				if (n == 0 && zmq_errno() == EAGAIN)
					return;
				if (n == 0)
					log_warn("zmq recv: %s", zmq_strerror(zmq_errno()));
				more = 0;
				break;
			}
			more = zmq_msg_more(f);
			if (n < SRV_MAX_FRAMES)
				n++;
		}
		if (overflow) {
			struct srv_reply_addr a = { .identity_len = KS_MIN(zmq_msg_size(&frames[0]),
									    SRV_IDENTITY_MAX) };

			memcpy(a.identity, zmq_msg_data(&frames[0]), a.identity_len);
			srv_frame_fault(s, &a, -E2BIG, "more frames than any request has");
		} else if (n) {
			dispatch(s, frames, n);
		}
		for (size_t i = 0; i < n; i++)
			zmq_msg_close(&frames[i]);
	}
}

/* ------------------------------------------------------------------------ */
/* Housekeeping                                                             */

static void reap_instances(struct srv *s, uint64_t now)
{
	uint64_t timeout = (uint64_t)s->cfg.client_timeout_s * 1000;
	uint64_t grace = (uint64_t)s->cfg.registration_grace_s * 1000;
	bool reaped = false;

	for (struct srv_instance **pp = &s->instances; *pp;) {
		struct srv_instance *in = *pp;
		/* Never while its connection is open (on ipc://, any connection of
		 * its process): an idle engine is alive. The process test walks
		 * every connection, so it comes last, for the timed-out few. */
		bool dead = !in->owner_up &&
			    (in->last_ping_ms ? now - in->last_ping_ms > timeout :
						grace && now - in->registered_ms > grace) &&
			    !srv_process_connected(s, &in->owner_peer);

		if (!dead) {
			pp = &in->next;
			continue;
		}
		log_warn("instance %" PRId64 ": reaped, %s and its connection is closed", in->id,
			 in->last_ping_ms ? "no PING within --client-timeout-s" :
					    "never pinged within --registration-grace-s");
		srv_ctr_add(&s->ctr.instances_reaped, 1);
		atomic_fetch_sub_explicit(&s->ninstances, 1, memory_order_relaxed);
		*pp = in->next;
		in->next = NULL;
		srv_instance_put(in);
		reaped = true;
	}
	if (reaped)
		srv_registry_persist(s, false);
}

/* True when a housekeeping tick is due (parked WAITs check their deadlines then). */
static bool now_ms_due(const struct srv *s)
{
	return ks_now_ms() - s->last_tick_ms >= SRV_TICK_MS;
}

/*
 * Timers, every SRV_TICK_MS: the reaper, the probes and expiry. Expiry pops
 * deadline-ordered lists (index deadlines, idle sessions) and does at most a
 * budget of each per turn, so a turn costs the same with 100 objects or
 * 100,000; while a backlog is left, the loop comes back every
 * SRV_EXPIRE_BACKLOG_POLL_MS instead of waiting for the next tick.
 */
static void housekeeping(struct srv *s)
{
	uint64_t now = ks_now_ms();
	bool tick = now - s->last_tick_ms >= SRV_TICK_MS, more_idx = false;

	if (!tick && !s->expiry_backlog)
		return;
	s->expired_unlogged += idx_expire_some(s->idx, now, SRV_EXPIRE_BUDGET, &more_idx);
	s->expiry_backlog = srv_sessions_expire(s, now, SRV_SESSION_EXPIRE_BUDGET) | more_idx;
	if (!tick)
		return;
	s->last_tick_ms = now;
	if (s->expired_unlogged) {
		log_info("expired the locks or reservations of %" PRIu64 " object(s)",
			 s->expired_unlogged);
		s->expired_unlogged = 0;
	}
	reap_instances(s, now);
	srv_maybe_probe(s, now);
}

/* ------------------------------------------------------------------------ */
/* Life cycle                                                               */

static bool is_loopback_endpoint(const char *ep)
{
	return strncmp(ep, "tcp://", 6) != 0 || !strncmp(ep, "tcp://127.", 10) ||
	       !strncmp(ep, "tcp://localhost:", 16) || !strncmp(ep, "tcp://[::1]:", 12);
}

/*
 * Start the KV event publisher if --kv-events-endpoint names one, and tell
 * consumers that this kvstashd starts empty (a restart drops the pool).
 */
static int events_open(struct srv *s)
{
	struct kve_config ec = {
		.endpoint = s->cfg.kv_events_endpoint,
		.replay_endpoint = s->cfg.kv_events_replay_endpoint,
		.topic = s->cfg.kv_events_topic,
		.buffer_batches = s->cfg.kv_events_buffer,
		.array_form = !strcmp(s->cfg.kv_events_format, "array"),
	};
	uint64_t queue_events;
	char err[512];
	int rc;

	if (!s->cfg.kv_events_endpoint[0]) {
		if (!s->cfg.kv_events_replay_endpoint[0])
			return 0;
		log_error("--kv-events-replay-endpoint needs --kv-events-endpoint");
		return -EINVAL;
	}
	if (ks_fault_value(KS_FAULT_KV_EVENTS_QUEUE, &queue_events))
		ec.queue_events = (uint32_t)KS_MIN(queue_events, UINT32_MAX);
	if (ks_fault_value(KS_FAULT_KV_EVENTS_STALL_MS, &ec.stall_ms))
		log_warn("fault point: the KV event publisher stalls %" PRIu64 " ms on its first batch",
			 ec.stall_ms);
	rc = kve_create(&ec, &s->kve, err, sizeof(err));
	if (rc) {
		log_error("%s", err);
		return rc;
	}
	log_info("KV cache events on %s%s%s (topic '%s', %u batches kept)",
		 s->cfg.kv_events_endpoint, s->cfg.kv_events_replay_endpoint[0] ? ", replay on " : "",
		 s->cfg.kv_events_replay_endpoint, s->cfg.kv_events_topic, s->cfg.kv_events_buffer);
	/* A warm restart keeps what consumers were told; a cold start drops it all. */
	if (!s->warm_found.resumed)
		kve_cleared(s->kve);
	return 0;
}

/* Open the L2 disk and L3 Redis tiers that the configuration names. */
static int tiers_open(struct srv *s)
{
	int rc;

	if (s->cfg.disk_path[0]) {
		struct tier_disk_config dc = {
			.path = s->cfg.disk_path,
			.capacity_bytes = (uint64_t)s->cfg.disk_size_gb << 30,
			.lock_timeout_ms = s->cfg.lock_timeout_ms,
			.evicted_fn = s->kve ? srv_disk_evicted : NULL,
			.evicted_arg = s,
		};
		struct tier_disk_stats st;

		rc = tier_disk_open(&dc, &s->l2);
		if (rc) {
			log_error("disk tier at %s: %s", s->cfg.disk_path, strerror(-rc));
			return rc;
		}
		tier_disk_get_stats(s->l2, &st);
		log_info("disk tier %s: %" PRIu64 " chunk(s) found (%" PRIu64 " bad removed), "
			 "capacity %u GiB, %s", s->cfg.disk_path, st.scan_found, st.scan_bad,
			 s->cfg.disk_size_gb, st.uring ? "io_uring" : "pread/pwrite");
		idx_set_evict_hook(s->idx, srv_demote_hook, s);
	}
	if (s->cfg.redis_url[0]) {
		char urls_buf[sizeof(s->cfg.redis_url)], shown[sizeof(s->cfg.redis_url) + 256];
		char password[512] = "";
		const char *urls[TIER_REDIS_MAX_NODES];
		size_t n = 0;

		tier_redis_redact_url(s->cfg.redis_url, shown, sizeof(shown));
		if (s->cfg.redis_password_file[0]) {
			rc = tier_redis_read_password_file(s->cfg.redis_password_file, password,
							   sizeof(password));
			if (rc) {
				log_error("--redis-password-file %s: %s", s->cfg.redis_password_file,
					  rc == -ENODATA ? "empty" : strerror(-rc));
				return rc;
			}
		}
		snprintf(urls_buf, sizeof(urls_buf), "%s", s->cfg.redis_url);
		for (char *save = NULL, *u = strtok_r(urls_buf, ",", &save);
		     u && n < TIER_REDIS_MAX_NODES; u = strtok_r(NULL, ",", &save))
			urls[n++] = u;
		struct tier_redis_config rcfg = {
			.urls = urls, .nurls = n, .key_prefix = s->cfg.redis_prefix,
			.ttl_s = s->cfg.redis_ttl_s, .lock_timeout_ms = s->cfg.lock_timeout_ms,
			.user = s->cfg.redis_user, .password = password,
		};
		rc = tier_redis_open(&rcfg, &s->l3);
		explicit_bzero(password, sizeof(password));	/* tier_redis keeps its copy */
		explicit_bzero(urls_buf, sizeof(urls_buf));
		if (rc) {
			log_error("redis tier %s: %s%s", shown, strerror(-rc),
				  rc == -EACCES ? " (wrong or missing credentials: see "
						  "--redis-user, --redis-password-file)" : "");
			return rc;
		}
		log_info("redis tier: %s (%s), key prefix '%s', ttl %u s",
			 strncmp(s->cfg.redis_url, "redis+cluster://", 16) ? "nodes" : "cluster",
			 shown, s->cfg.redis_prefix, s->cfg.redis_ttl_s);
	}
	return 0;
}

/*
 * With --cuda=auto and a visible GPU: have the pool pinned for every device
 * (cudaHostRegister touches every page, about 0.35 s per GiB on an H200
 * host: a thread does it, server_pin.c), learn each device's UUID, and
 * start one engine per device.
 */
static int cuda_setup(struct srv *s)
{
	int n = 0, rc;

	if (strcmp(s->cfg.cuda, "auto") || xfer_cuda_device_count(&n) || n <= 0)
		return 0;
	if (n > SRV_MAX_DEVICES) {
		log_warn("%d CUDA devices: serving the first %d", n, SRV_MAX_DEVICES);
		n = SRV_MAX_DEVICES;
	}
	if (s->cfg.workers > SRV_MAX_WORKERS) {
		log_error("--workers %u: at most %d with CUDA", s->cfg.workers, SRV_MAX_WORKERS);
		return -EINVAL;
	}
	/* Pinned in the background (server_pin.c): serving starts at once. */
	s->pin_step = xfer_cuda_host_register;
	{
		long cpus = sysconf(_SC_NPROCESSORS_ONLN);

		s->busy_poll = !strcmp(s->cfg.busy_poll, "on") ||
			       (!strcmp(s->cfg.busy_poll, "auto") && cpus >= SRV_BUSY_POLL_MIN_CPUS);
		log_info("busy polling for GPU transfers: %s (--busy-poll %s, %ld CPUs)",
			 s->busy_poll ? "on" : "off", s->cfg.busy_poll, cpus);
	}
	for (int d = 0; d < n; d++) {
		char name[32], gpu[128] = "?";

		rc = xfer_cuda_device_uuid(d, s->cuda_uuid[d]);
		if (rc)
			return rc;
		snprintf(name, sizeof(name), "cuda%d-xfer", d);
		rc = xfer_engine_create(name, s->cfg.workers, s->cfg.queue_depth,
					&s->engines[1 + d]);
		if (rc) {
			log_error("transfer workers for cuda:%d: %s", d, strerror(-rc));
			return rc;
		}
		s->nengines = 2 + (unsigned)d;
		s->ncuda = d + 1;
		if (s->busy_poll)
			xfer_engine_set_busy_poll(s->engines[1 + d], SRV_BUSY_POLL_WORKER_NS);
		xfer_cuda_device_name(d, gpu, sizeof(gpu));
		log_info("cuda:%d %s (GPU-%s): %u transfer worker(s)", d, gpu, s->cuda_uuid[d],
			 s->cfg.workers);
	}
	return 0;
}

/*
 * The host pool: anonymous memory, or with --state-dir the pool file there
 * (a matching state resumed, anything else set aside: warm.c).
 */
static int pool_open(struct srv *s)
{
	const struct srv_config *cfg = &s->cfg;
	char err[512];
	size_t map_bytes = 0;
	void *region = NULL;
	int rc;

	if (!cfg->state_dir[0]) {
		rc = pool_create(cfg->pool_bytes, &s->pool);
		if (rc)
			log_error("host pool of %" PRIu64 " bytes: %s", cfg->pool_bytes,
				  strerror(-rc));
		return rc;
	}
	rc = warm_open(cfg->state_dir, cfg->pool_bytes, cfg->chunk_tokens, &s->warm, &region,
		       &map_bytes, &s->warm_found, err, sizeof(err));
	if (rc) {
		log_error("--state-dir %s: %s", cfg->state_dir, err);
		return rc;
	}
	if (s->warm_found.refused)
		log_warn("--state-dir %s: previous state refused: %s; moved its index to %s/rejected, "
			 "starting empty", cfg->state_dir, s->warm_found.why, cfg->state_dir);
	rc = pool_create_mapped(cfg->pool_bytes, region, map_bytes, &s->pool);
	if (rc) {
		munmap(region, map_bytes);
		log_error("host pool of %" PRIu64 " bytes: %s", cfg->pool_bytes, strerror(-rc));
		return rc;
	}
	log_info("pool: %" PRIu64 " bytes in %s/pool (shared file, %s)", cfg->pool_bytes,
		 cfg->state_dir, s->warm_found.resumed ? "resumed" : "new");
	return 0;
}

/*
 * --state-dir, after the engines exist: the resumed index and registrations.
 * Nothing here fails the start: what cannot be resumed is dropped, logged.
 */
static void warm_start(struct srv *s)
{
	struct warm_restored r = { 0 };
	struct idx_journal j;
	unsigned resumed = 0, dropped = 0;
	uint64_t t0 = ks_now_ms();
	int rc;

	if (s->warm_found.slot_bytes) {
		rc = pool_configure_slots(s->pool, s->warm_found.slot_bytes);
		if (rc == 0)
			idx_set_low_watermark(s->idx, (uint32_t)((uint64_t)pool_nslots(s->pool) *
								 s->cfg.evict_watermark_pct / 100));
		else
			log_error("state dir: cannot cut the pool into %" PRIu64 "-byte slots: %s",
				  s->warm_found.slot_bytes, strerror(-rc));
	}
	rc = warm_restore(s->warm, s->pool, s->idx, &r);
	if (rc)
		log_error("state dir: the resumed index was not restored: %s", strerror(-rc));
	warm_journal(s->warm, &j);
	idx_set_journal(s->idx, &j);
	srv_registry_restore(s, &resumed, &dropped);
	/* CUDA registrations: their handles are opened by the device's workers. */
	while (s->restore_pending && ks_now_ms() - t0 < SRV_RESTORE_WAIT_MS) {
		srv_drain_completions(s);
		if (s->restore_pending)
			usleep(1000);
	}
	if (s->restore_pending)
		log_warn("state dir: %u CUDA registration(s) still opening after %d ms: they join "
			 "the registry when done", s->restore_pending, SRV_RESTORE_WAIT_MS);
	resumed -= s->restore_failed;
	dropped += s->restore_failed;
	srv_registry_persist(s, false);
	if (!s->warm_found.resumed) {
		log_info("state dir %s: no state to resume, starting empty", s->cfg.state_dir);
		return;
	}
	log_info("warm restart from %s (%s): %" PRIu64 " chunk(s) resumed, %" PRIu64 " dropped "
		 "(%" PRIu64 " not READY at the exit, %" PRIu64 " checksum mismatch, %" PRIu64
		 " bad record or duplicate), %u registration(s) resumed, %u dropped; %.1f MiB "
		 "checksummed in %.3f s", s->cfg.state_dir,
		 s->warm_found.clean ? "clean shutdown" : "after a crash: no snapshot at exit",
		 r.chunks, r.dropped_writing + r.dropped_checksum + r.dropped_record,
		 r.dropped_writing, r.dropped_checksum, r.dropped_record, resumed, dropped,
		 (double)r.verified_bytes / (1 << 20), r.verify_s);
}

/*
 * Raise the calling thread to --io-priority: SCHED_FIFO, else nice -10, else
 * nothing, each step down when not permitted. Returns what it got (a
 * string for the log) and sets *why to the refusal that made it step down.
 *
 * Why realtime: on a loaded machine a PING's round trip is mostly the time
 * its threads wait for a core. Measured on 2 cores with 8 clients and 2
 * workers copying (server_bench --shape mixed): the io thread's slow turns
 * were nearly all spent off the CPU (involuntary switches, ~0.1 ms on the
 * CPU in a 5-20 ms turn); nice -10 does not make the scheduler (EEVDF)
 * preempt the running copy when the io thread wakes. A SCHED_FIFO thread
 * runs at once. It is safe here because what these threads do per wake-up
 * is short and bounded (the expiry budget, SRV_RECV_BATCH messages, no
 * blocking I/O), and the kernel's RT throttling bounds it anyway.
 */
static const char *raise_io_priority(const struct srv *s, int *why)
{
	const id_t tid = (id_t)syscall(SYS_gettid);

	*why = 0;
	if (!strcmp(s->cfg.io_priority, "realtime")) {
		struct sched_param sp = { .sched_priority = SRV_IO_RT_PRIORITY };
		int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);

		if (rc == 0)
			return "realtime (SCHED_FIFO 1)";
		*why = rc;
	}
	if (strcmp(s->cfg.io_priority, "normal")) {
		if (setpriority(PRIO_PROCESS, tid, SRV_IO_NICE) == 0)
			return "nice -10";
		if (!*why)
			*why = errno;
	}
	return "normal";
}

/* Put the calling thread back to SCHED_OTHER at nice @nice. */
static void restore_priority(int nice)
{
	struct sched_param sp = { .sched_priority = 0 };
	int rc = pthread_setschedparam(pthread_self(), SCHED_OTHER, &sp);

	if (rc)
		log_warn("cannot restore the starting thread's scheduling policy: %s", strerror(rc));
	if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice) < 0)
		log_warn("cannot restore nice %d of the starting thread: %s", nice, strerror(errno));
}

/*
 * Create the context's first socket with this thread at --io-priority:
 * libzmq starts its I/O thread there, and that thread inherits the
 * caller's policy and nice value. Every PING crosses it (socket -> pipe ->
 * io thread and back), so it gets the io thread's CPU priority rather than
 * the workers'. This thread's own priority is put back. Without
 * CAP_SYS_NICE both stay as they are (logged once by srv_run).
 */
static void *zmq_socket_at_io_priority(struct srv *s, int type)
{
	int old, why;
	void *sock;

	errno = 0;
	old = getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
	if (errno)
		old = 0;
	const char *got = raise_io_priority(s, &why);

	sock = zmq_socket(s->zctx, type);
	if (strcmp(got, "normal"))
		restore_priority(old);
	return sock;
}

int srv_create(const struct srv_config *cfg, struct srv **out)
{
	struct srv *s = calloc(1, sizeof(*s));
	struct idx_config icfg = { 0 };
	int64_t maxmsg;
	int linger = 0, rc;
	uint32_t shards = 1;
	size_t ep_len;

	if (!s)
		return -ENOMEM;
	s->cfg = *cfg;
	s->stop_fd = -1;
	s->pin_stop_fd = -1;
	ks_none_hash(s->none_hash);
	s->jobs = calloc(SRV_JOB_SLOTS, sizeof(*s->jobs));
	s->sessions = calloc(SRV_SESSION_BUCKETS, sizeof(*s->sessions));
	s->last_errors = calloc(SRV_LAST_ERROR_SLOTS, sizeof(*s->last_errors));
	s->rid_jobs = calloc(SRV_RID_BUCKETS, sizeof(*s->rid_jobs));
	s->rid_ring = calloc(SRV_RID_MAX, sizeof(*s->rid_ring));
	s->conns = calloc(SRV_CONN_BUCKETS, sizeof(*s->conns));
	s->pinned_dialect = !strcmp(cfg->protocol, "march")   ? PROTO_DIALECT_MARCH :
			    !strcmp(cfg->protocol, "current") ? PROTO_DIALECT_CURRENT :
								PROTO_DIALECT_AUTO;
	if (!s->jobs || !s->sessions || !s->last_errors || !s->rid_jobs || !s->rid_ring ||
	    !s->conns) {
		rc = -ENOMEM;
		goto out_destroy;
	}
	for (size_t i = 0; i < SRV_JOB_SLOTS; i++)
		s->jobs[i].id = -1;

	rc = pool_open(s);
	if (rc)
		goto out_destroy;
	while (shards < cfg->shards)
		shards <<= 1;
	icfg.nshards = shards;
	icfg.read_ttl_ms = (uint64_t)cfg->read_ttl_s * 1000;
	icfg.write_ttl_ms = (uint64_t)cfg->write_ttl_s * 1000;
	icfg.evict_low_watermark_slots = 1;
	rc = idx_create(&icfg, s->pool, &s->idx);
	if (rc) {
		log_error("index: %s", strerror(-rc));
		goto out_destroy;
	}
	rc = xfer_engine_create("host-xfer", cfg->workers, cfg->queue_depth, &s->host_xfer);
	if (rc) {
		log_error("transfer workers: %s", strerror(-rc));
		goto out_destroy;
	}
	s->engines[0] = s->host_xfer;
	s->nengines = 1;
	rc = events_open(s);
	if (rc)
		goto out_destroy;
	rc = tiers_open(s);
	if (rc)
		goto out_destroy;
	if (s->kve && !s->l2)
		idx_set_evict_hook(s->idx, srv_demote_hook, s);	/* BlockRemoved on eviction */
	rc = cuda_setup(s);
	if (rc)
		goto out_destroy;
	if (s->warm)
		warm_start(s);
	s->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (s->stop_fd < 0) {
		rc = -errno;
		goto out_destroy;
	}

	s->zctx = zmq_ctx_new();
	if (!s->zctx) {
		rc = -errno;
		goto out_destroy;
	}
	s->sock = zmq_socket_at_io_priority(s, ZMQ_ROUTER);
	if (!s->sock) {
		rc = -zmq_errno();
		goto out_destroy;
	}
	maxmsg = (int64_t)cfg->max_message_mb << 20;
	zmq_setsockopt(s->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof(maxmsg));
	zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof(linger));
	rc = srv_conn_monitor_open(s);
	if (rc)
		log_warn("no socket monitor (%s): connection state unknown, so instances are kept "
			 "or reaped by their PINGs only and stay with the connection that "
			 "registered them", zmq_strerror(-rc));
	{
		char err[512];

		rc = auth_setup(s->zctx, s->sock, cfg->curve_secret_key_file,
				cfg->curve_allowed_clients, &s->auth, err, sizeof(err));
		if (rc) {
			log_error("CURVE: %s", err);
			goto out_destroy;
		}
	}
	cfg_endpoint(cfg, s->endpoint, sizeof(s->endpoint));
	if (zmq_bind(s->sock, s->endpoint) < 0) {
		rc = -zmq_errno();
		log_error("cannot bind %s: %s", s->endpoint, zmq_strerror(zmq_errno()));
		goto out_destroy;
	}
	ep_len = sizeof(s->endpoint);
	zmq_getsockopt(s->sock, ZMQ_LAST_ENDPOINT, s->endpoint, &ep_len);
	if (s->auth)
		log_info("CURVE on: server public key %s%s", auth_server_public(s->auth),
			 cfg->curve_allowed_clients[0] ? ", clients limited to the allowed list" : "");
	else if (!is_loopback_endpoint(s->endpoint))
		log_warn("listening on %s, which is not loopback, without CURVE: any host that "
			 "can reach it can read and write this cache", s->endpoint);
	rc = srv_pin_start(s);
	if (rc) {
		log_error("cannot start pinning the pool: %s", strerror(-rc));
		goto out_destroy;
	}
	srv_install_sigbus_guard();
	s->last_tick_ms = ks_now_ms();
	atomic_store(&s->io_alive_ms, s->last_tick_ms);
	for (unsigned e = 0; e < SRV_MAX_ENGINES; e++)
		atomic_store(&s->probe_done_ms[e], s->last_tick_ms);
	if (ks_fault_value(KS_FAULT_PROBE_STALL_MS, &s->probe_stall_ms))
		log_warn("fault point: data-path probes stall %" PRIu64 " ms", s->probe_stall_ms);
	if (ks_fault_value(KS_FAULT_STORE_STALL_MS, &s->store_stall_ms))
		log_warn("fault point: each host STORE chunk waits %" PRIu64 " ms before its commit",
			 s->store_stall_ms);
	*out = s;
	return 0;
out_destroy:
	srv_destroy(s);
	return rc;
}

const char *srv_endpoint(const struct srv *s)
{
	return s->endpoint;
}

void srv_request_stop(struct srv *s)
{
	uint64_t one = 1;

	if (write(s->stop_fd, &one, sizeof(one)) < 0) {
		/* Only EAGAIN (counter saturated) is possible: a stop is pending anyway. */
	}
}

/* CPU time of the calling thread: a turn much longer than this was preempted. */
static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Account one io loop turn that started at @t0 (completions until @t1,
 * requests until @t2, then housekeeping) with the thread's CPU clock at
 * @cpu0: a PING arriving during the turn waited up to its length. A slow
 * turn is logged with the split and its time on the CPU (the rest is time
 * the thread was runnable but preempted, or waited for a lock), at most once
 * a second.
 */
static void io_turn_done(struct srv *s, uint64_t t0, uint64_t t1, uint64_t t2, uint64_t cpu0)
{
	const uint64_t t3 = ks_now_ns(), busy = t3 - t0;
	uint64_t max = atomic_load_explicit(&s->io_busy_max_ns, memory_order_relaxed);

	metrics_hist_observe(&s->io_busy, busy);
	if (busy > max)
		atomic_store_explicit(&s->io_busy_max_ns, busy, memory_order_relaxed);
	if (t3 / 1000000000ull != s->io_win_s) {
		uint64_t last = atomic_load_explicit(&s->io_busy_win_ns, memory_order_relaxed);

		atomic_store_explicit(&s->io_busy_prev_win_ns,
				      t3 / 1000000000ull == s->io_win_s + 1 ? last : 0,
				      memory_order_relaxed);
		atomic_store_explicit(&s->io_busy_win_ns, 0, memory_order_relaxed);
		s->io_win_s = t3 / 1000000000ull;
	}
	if (busy > atomic_load_explicit(&s->io_busy_win_ns, memory_order_relaxed))
		atomic_store_explicit(&s->io_busy_win_ns, busy, memory_order_relaxed);
	if (busy >= SRV_IO_SLOW_NS && t3 / 1000000 - s->io_slow_logged_ms >= 1000) {
		s->io_slow_logged_ms = t3 / 1000000;
		log_warn("io loop turn took %.2f ms (completions %.2f, requests %.2f, "
			 "housekeeping %.2f; on the CPU %.2f): PINGs waited that long",
			 (double)busy / 1e6, (double)(t1 - t0) / 1e6, (double)(t2 - t1) / 1e6,
			 (double)(t3 - t2) / 1e6, (double)(thread_cpu_ns() - cpu0) / 1e6);
	}
}

/*
 * How long the next zmq_poll may sleep: 0 while a GPU copy announced near
 * its end is still running (--busy-poll; at most SRV_BUSY_POLL_IO_NS from
 * the announcement on, so a late copy costs a bounded spin), 1 ms with an
 * expiry backlog, else a housekeeping tick.
 */
static long io_poll_timeout_ms(struct srv *s)
{
	if (s->busy_poll) {
		unsigned imminent = 0;

		for (int d = 0; d < s->ncuda; d++)
			imminent += xfer_completions_imminent(s->engines[1 + d]);
		if (!imminent) {
			s->busy_poll_until_ns = 0;
		} else {
			uint64_t now = ks_now_ns();

			if (!s->busy_poll_until_ns)
				s->busy_poll_until_ns = now + SRV_BUSY_POLL_IO_NS;
			if (now < s->busy_poll_until_ns)
				return 0;
		}
	}
	return s->expiry_backlog ? SRV_EXPIRE_BACKLOG_POLL_MS : SRV_TICK_MS;
}

int srv_run(struct srv *s)
{
	/* [0] socket, [1] stop, [2 + e] completions of engine e, then the monitor */
	zmq_pollitem_t items[3 + SRV_MAX_ENGINES] = {
		{ .socket = s->sock, .events = ZMQ_POLLIN },
		{ .fd = s->stop_fd, .events = ZMQ_POLLIN },
	};
	int nitems = 2 + (int)s->nengines;

	for (unsigned e = 0; e < s->nengines; e++) {
		items[2 + e].fd = xfer_completion_fd(s->engines[e]);
		items[2 + e].events = ZMQ_POLLIN;
	}
	if (s->monitor) {
		items[nitems].socket = s->monitor;
		items[nitems].events = ZMQ_POLLIN;
		nitems++;
	}
	s->io_thread = pthread_self();
	s->io_running = true;
	struct pool_stats ps;

	/* The heartbeat outranks the bulk path for CPU: where permitted, this
	 * thread runs realtime (or below nice 0), the transfer workers at 0. */
	{
		int why;
		const char *got = raise_io_priority(s, &why);

		if (why)
			log_info("io thread priority: %s (--io-priority %s not permitted: %s): PING "
				 "latency then depends more on the load of other processes", got,
				 s->cfg.io_priority, strerror(why));
		else
			log_info("io thread priority: %s", got);
	}
	pool_get_stats(s->pool, &ps);
	log_info("kvstashd %s listening on %s: pool %" PRIu64 " MiB%s, %u transfer worker(s), "
		 "chunk %u tokens", KVSTASH_VERSION, s->endpoint, ps.region_bytes >> 20,
		 ps.hugepages ? " (hugepages)" : "", s->cfg.workers, s->cfg.chunk_tokens);
	for (;;) {
		int n = zmq_poll(items, nitems, io_poll_timeout_ms(s));
		bool completions = false;
		uint64_t t0 = ks_now_ns(), cpu0 = thread_cpu_ns(), t1, t2;

		atomic_store_explicit(&s->io_alive_ms, t0 / 1000000, memory_order_relaxed);

		if (n < 0 && zmq_errno() != EINTR) {
			log_error("zmq_poll: %s", zmq_strerror(zmq_errno()));
			break;
		}
		if (items[1].revents & ZMQ_POLLIN)
			break;
		for (int i = 2; i < 2 + (int)s->nengines; i++)
			completions |= (items[i].revents & ZMQ_POLLIN) != 0;
		/* Connections opened and closed: before their requests. */
		srv_conn_monitor_drain(s);
		/* Completions first: they free pins and slots other requests may need. */
		if (completions)
			srv_drain_completions(s);
		/* Parked WAIT_PREFETCH_STATUS calls: a prefetch may just have landed. */
		if (s->waits && (completions || now_ms_due(s)))
			srv_waits_poll(s, ks_now_ms());
		t1 = ks_now_ns();
		if (items[0].revents & ZMQ_POLLIN)
			drain_socket(s);
		t2 = ks_now_ns();
		housekeeping(s);
		io_turn_done(s, t0, t1, t2, cpu0);
	}
	log_info("stopping: finishing queued transfers (at most %d ms)", SRV_DRAIN_MS);
	for (unsigned e = 0; e < s->nengines; e++)
		xfer_engine_stop(s->engines[e], SRV_DRAIN_MS);
	srv_drain_completions(s);
	s->io_running = false;
	if (s->warm) {
		/* Every transfer drained: the slot table names exactly what is READY. */
		uint64_t t0 = ks_now_ns();

		srv_registry_persist(s, true);
		log_info("state saved in %s: %" PRIu64 " chunk(s) READY, %" PRIu64 " registration(s), "
			 "%.1f ms", s->cfg.state_dir, warm_ready_count(s->warm),
			 atomic_load(&s->ninstances), (double)(ks_now_ns() - t0) / 1e6);
	}
	log_info("stopped");
	return 0;
}

void srv_destroy(struct srv *s)
{
	if (!s)
		return;
	s->io_running = false;	/* from here CUDA instances are unmapped inline */
	srv_pin_stop(s);		/* before the workers: it may be inside cudaHostRegister */
	for (unsigned e = 0; e < s->nengines; e++)
		xfer_engine_stop(s->engines[e], 0);
	srv_drain_completions(s);
	for (unsigned e = 0; e < s->nengines; e++)
		xfer_engine_destroy(s->engines[e]);
	/* After the workers: their prefetches wait on tier reads. Queued tier
	 * requests are cancelled; their callbacks only touch counters of @s. */
	if (s->l2)
		tier_disk_close(s->l2);
	if (s->l3)
		tier_redis_close(s->l3);
	kve_destroy(s->kve);	/* after every thread that reports */
	for (int d = 0; d < s->ncuda; d++)
		for (unsigned w = 0; w < SRV_MAX_WORKERS; w++)
			xfer_cuda_ctx_destroy(s->cuda_ctx[d][w]);
	while (s->instances) {
		struct srv_instance *in = s->instances;

		s->instances = in->next;
		srv_instance_put(in);
	}
	if (s->sessions) {
		for (size_t b = 0; b < SRV_SESSION_BUCKETS; b++)
			while (s->sessions[b]) {
				struct srv_session *ss = s->sessions[b];

				s->sessions[b] = ss->next;
				srv_session_free(ss);
			}
	}
	if (s->monitor) {
		zmq_socket_monitor(s->sock, NULL, 0);
		zmq_close(s->monitor);
	}
	if (s->sock)
		zmq_close(s->sock);
	auth_stop(s->auth);
	if (s->zctx)
		zmq_ctx_term(s->zctx);
	if (s->idx) {
		/* Tearing the index down frees no object: the slot table keeps them. */
		idx_set_journal(s->idx, NULL);
		idx_destroy(s->idx);
	}
	for (size_t i = 0; i < s->npin_pieces; i++)
		xfer_cuda_host_unregister(s->pin_pieces[i]);
	free(s->pin_pieces);
	if (s->pool)
		pool_destroy(s->pool);
	warm_close(s->warm);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	srv_waits_free(s);
	srv_rid_jobs_free(s);
	srv_conns_free(s);
	free(s->jobs);
	free(s->sessions);
	free(s->last_errors);
	free(s->hash_buf);
	free(s->key_buf);
	free(s);
}
