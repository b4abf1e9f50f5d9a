/*
 * client.c - libkvstash: the client side of the LMCache MP protocol.
 *
 * DESIGN: a client keeps a stack of idle DEALER connections. A call pops
 * one (creating it if the stack is empty), runs its request/reply exchange
 * with no lock held, and pushes the connection back, so calls from several
 * threads run in parallel and none waits on another's network I/O. Each
 * connection numbers its requests (the uid frame); a reply whose uid does
 * not match the outstanding request (a late answer to a call that timed
 * out) is discarded. Failures leave a message in a thread-local buffer.
 *
 * Lock order (the tree is in lock.h): kvstash_client->idle_lock
 * (LOCK_RANK_CLIENT) guards only the idle stack; nothing else is taken
 * under it and it is never held across a ZMQ call.
 */
#include "kvstash.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zmq.h>

#include "compiler.h"
#include "layout.h"
#include "lock.h"
#include "protocol.h"

#define CLIENT_MAX_FRAMES 8
/* Instances one client keeps a dedicated connection for (its engine workers). */
#define CLIENT_MAX_INSTANCES 64
#define CLIENT_ERR_MAX 512

struct client_conn {
	void *sock;
	uint64_t next_uid;
	struct client_conn *next;	/* idle stack link */
};

struct kvstash_client {
	void *zctx;
	char endpoint[512];
	int timeout_ms;
	struct ks_mutex idle_lock;	/* protects idle */
	struct client_conn *idle;
	/*
	 * kvstashd lets only the connection that registered an instance use it
	 * (--owner-check): each registered instance keeps its own connection,
	 * used by one call at a time. Guarded by idle_lock.
	 */
	struct {
		int64_t instance;
		struct client_conn *cn;
		bool busy;
	} owned[CLIENT_MAX_INSTANCES];
	size_t nowned;
	struct ks_cond owned_free;	/* an owned connection became free */
	bool curve;			/* set before the first call, read-only after */
	char curve_server[41], curve_public[41], curve_secret[41];
};

static _Thread_local char last_error[CLIENT_ERR_MAX];
static _Atomic(kvstash_log_fn) log_fn;
static void *_Atomic log_arg;

void kvstash_set_log_fn(kvstash_log_fn fn, void *arg)
{
	atomic_store(&log_arg, arg);
	atomic_store(&log_fn, fn);
}

const char *kvstash_last_error(void)
{
	return last_error;
}

/* Record the failure message of this call and pass it to the log hook. */
static int KS_PRINTF(2, 3) fail(int rc, const char *fmt, ...)
{
	kvstash_log_fn fn = atomic_load(&log_fn);
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	if (fn)
		fn(KVSTASH_LOG_WARN, last_error, atomic_load(&log_arg));
	return rc;
}

int kvstash_connect(const char *endpoint, int timeout_ms, kvstash_client **out)
{
	kvstash_client *c;
	int rc;

	if (!endpoint)
		endpoint = KVSTASH_DEFAULT_ENDPOINT;
	if (strlen(endpoint) >= sizeof(c->endpoint) || !out)
		return fail(-EINVAL, "endpoint too long");
	c = calloc(1, sizeof(*c));
	if (!c)
		return fail(-ENOMEM, "out of memory");
	snprintf(c->endpoint, sizeof(c->endpoint), "%s", endpoint);
	c->timeout_ms = timeout_ms > 0 ? timeout_ms : KVSTASH_DEFAULT_TIMEOUT_MS;
	rc = ks_mutex_init(&c->idle_lock, LOCK_RANK_CLIENT, "client idle connections");
	if (rc) {
		free(c);
		return fail(rc, "mutex: %s", strerror(-rc));
	}
	rc = ks_cond_init(&c->owned_free);
	if (rc) {
		ks_mutex_destroy(&c->idle_lock);
		free(c);
		return fail(rc, "condition: %s", strerror(-rc));
	}
	c->zctx = zmq_ctx_new();
	if (!c->zctx) {
		ks_mutex_destroy(&c->idle_lock);
		free(c);
		return fail(-ENOMEM, "zmq_ctx_new failed");
	}
	*out = c;
	return 0;
}

static void conn_close(struct client_conn *cn)
{
	zmq_close(cn->sock);
	free(cn);
}

void kvstash_close(kvstash_client *c)
{
	if (!c)
		return;
	while (c->idle) {
		struct client_conn *cn = c->idle;

		c->idle = cn->next;
		conn_close(cn);
	}
	for (size_t i = 0; i < c->nowned; i++)
		conn_close(c->owned[i].cn);
	zmq_ctx_term(c->zctx);
	ks_cond_destroy(&c->owned_free);
	ks_mutex_destroy(&c->idle_lock);
	free(c);
}

static int conn_get(kvstash_client *c, struct client_conn **out)
{
	struct client_conn *cn = NULL;
	int linger = 0;

	if (ks_lock(&c->idle_lock) == 0) {
		cn = c->idle;
		if (cn)
			c->idle = cn->next;
		ks_unlock(&c->idle_lock);
	}
	if (cn) {
		*out = cn;
		return 0;
	}
	cn = calloc(1, sizeof(*cn));
	if (!cn)
		return fail(-ENOMEM, "out of memory");
	cn->sock = zmq_socket(c->zctx, ZMQ_DEALER);
	if (!cn->sock) {
		free(cn);
		return fail(-EMFILE, "zmq_socket: %s", zmq_strerror(zmq_errno()));
	}
	zmq_setsockopt(cn->sock, ZMQ_LINGER, &linger, sizeof(linger));
	if (c->curve &&
	    (zmq_setsockopt(cn->sock, ZMQ_CURVE_SERVERKEY, c->curve_server, 40) < 0 ||
	     zmq_setsockopt(cn->sock, ZMQ_CURVE_PUBLICKEY, c->curve_public, 40) < 0 ||
	     zmq_setsockopt(cn->sock, ZMQ_CURVE_SECRETKEY, c->curve_secret, 40) < 0)) {
		int e = zmq_errno();

		conn_close(cn);
		return fail(-EINVAL, "CURVE keys: %s", zmq_strerror(e));
	}
	if (zmq_connect(cn->sock, c->endpoint) < 0) {
		int e = zmq_errno();

		conn_close(cn);
		return fail(-EINVAL, "connect %s: %s", c->endpoint, zmq_strerror(e));
	}
	*out = cn;
	return 0;
}

static void conn_put(kvstash_client *c, struct client_conn *cn)
{
	if (ks_lock(&c->idle_lock)) {
		conn_close(cn);
		return;
	}
	cn->next = c->idle;
	c->idle = cn;
	ks_unlock(&c->idle_lock);
}

/* Encode an unsigned int as a msgpack document in @buf (the uid/type frames). */
static size_t encode_uint(uint8_t *buf, uint64_t v)
{
	if (v < 128) {
		buf[0] = (uint8_t)v;
		return 1;
	}
	if (v <= 0xff) {
		buf[0] = 0xcc;
		buf[1] = (uint8_t)v;
		return 2;
	}
	if (v <= 0xffff) {
		buf[0] = 0xcd;
		buf[1] = (uint8_t)(v >> 8);
		buf[2] = (uint8_t)v;
		return 3;
	}
	if (v <= 0xffffffffu) {
		buf[0] = 0xce;
		for (int i = 0; i < 4; i++)
			buf[1 + i] = (uint8_t)(v >> (24 - 8 * i));
		return 5;
	}
	buf[0] = 0xcf;
	for (int i = 0; i < 8; i++)
		buf[1 + i] = (uint8_t)(v >> (56 - 8 * i));
	return 9;
}

/*
 * One exchange on @cn: send [uid, type, args...], wait for the reply with
 * the same uid. A reply without a response frame decodes as nil (the pinned
 * Python server's None). Returns 0 or -ETIMEDOUT/-EPROTO/-EIO.
 */
static int conn_call(kvstash_client *c, struct client_conn *cn, enum proto_type type,
		     const struct proto_msg *args, size_t nargs, struct proto_reply *reply)
{
	uint8_t uidbuf[9], typebuf[9];
	uint64_t uid = cn->next_uid++;
	size_t uidlen = encode_uint(uidbuf, uid), typelen = encode_uint(typebuf, (uint64_t)type);
	uint64_t deadline = ks_now_ms() + (uint64_t)c->timeout_ms;

	if (zmq_send(cn->sock, uidbuf, uidlen, ZMQ_SNDMORE) < 0 ||
	    zmq_send(cn->sock, typebuf, typelen, nargs ? ZMQ_SNDMORE : 0) < 0)
		return fail(-EIO, "%s: send: %s", proto_type_name(type), zmq_strerror(zmq_errno()));
	for (size_t i = 0; i < nargs; i++)
		if (zmq_send(cn->sock, args[i].data, args[i].len, i + 1 < nargs ? ZMQ_SNDMORE : 0) < 0)
			return fail(-EIO, "%s: send: %s", proto_type_name(type),
				    zmq_strerror(zmq_errno()));

	for (;;) {
		zmq_pollitem_t it = { .socket = cn->sock, .events = ZMQ_POLLIN };
		uint64_t now = ks_now_ms();
		zmq_msg_t frames[CLIENT_MAX_FRAMES];
		size_t n = 0;
		int more = 1, rc;

		if (now >= deadline)
			return fail(-ETIMEDOUT, "%s: no reply from %s within %d ms",
				    proto_type_name(type), c->endpoint, c->timeout_ms);
		rc = zmq_poll(&it, 1, (long)(deadline - now));
		if (rc < 0 && zmq_errno() != EINTR)
			return fail(-EIO, "poll: %s", zmq_strerror(zmq_errno()));
		if (rc <= 0)
			continue;
		while (more) {
			zmq_msg_t *f = &frames[n < CLIENT_MAX_FRAMES ? n : CLIENT_MAX_FRAMES - 1];

			if (n >= CLIENT_MAX_FRAMES)
				zmq_msg_close(f);
			zmq_msg_init(f);
			if (zmq_msg_recv(f, cn->sock, 0) < 0) {
				zmq_msg_close(f);
				break;
			}
			more = zmq_msg_more(f);
			if (n < CLIENT_MAX_FRAMES)
				n++;
		}
		rc = 1;	/* 1 = not ours, keep waiting */
		if (n >= 2 && zmq_msg_size(&frames[0]) == uidlen &&
		    !memcmp(zmq_msg_data(&frames[0]), uidbuf, uidlen)) {
			if (n == 2) {
				memset(reply, 0, sizeof(*reply));
				reply->kind = PROTO_REPLY_NIL;
				rc = 0;
			} else {
				struct proto_buf b = { zmq_msg_data(&frames[2]), zmq_msg_size(&frames[2]) };

				rc = proto_decode_reply(&b, reply) ? -EPROTO : 0;
			}
		}
		for (size_t i = 0; i < n; i++)
			zmq_msg_close(&frames[i]);
		if (rc == -EPROTO)
			return fail(-EPROTO, "%s: undecodable reply", proto_type_name(type));
		if (rc == 0)
			return 0;
	}
}

/* Ask the server why the last request on @cn failed (read-once message). */
static void fetch_server_error(kvstash_client *c, struct client_conn *cn, const char *what)
{
	struct proto_reply r;

	if (conn_call(c, cn, PROTO_KS_LAST_ERROR, NULL, 0, &r) == 0 && r.kind == PROTO_REPLY_STR &&
	    r.str[0])
		fail(0, "%s", r.str);
	else
		fail(0, "%s failed (server gave no reason)", what);
}

/*
 * A whole call: connection from the pool, exchange, connection back. A
 * connection that timed out is closed rather than reused (its late reply
 * would only be discarded, but a dead server should not pile them up).
 */
static int call(kvstash_client *c, enum proto_type type, const struct proto_msg *args,
		size_t nargs, struct proto_reply *reply, struct client_conn **keep)
{
	struct client_conn *cn = NULL;
	int rc = conn_get(c, &cn);

	if (rc)
		return rc;
	rc = conn_call(c, cn, type, args, nargs, reply);
	if (rc == -ETIMEDOUT || rc == -EIO) {
		conn_close(cn);
		return rc;
	}
	if (keep && rc == 0) {
		*keep = cn;
		return 0;
	}
	conn_put(c, cn);
	return rc;
}

/*
 * The connection that registered @instance, waiting (bounded by the
 * client's timeout) while another thread uses it. Without one: with
 * @create, a connection that becomes @instance's; else any connection.
 */
static int inst_conn_get(kvstash_client *c, int64_t instance, bool create,
			 struct client_conn **out)
{
	uint64_t deadline = ks_now_ms() + (uint64_t)c->timeout_ms;
	struct client_conn *cn = NULL;
	int rc;

	if (ks_lock(&c->idle_lock))
		return fail(-ETIMEDOUT, "client lock timed out");
	for (size_t i = 0; i < c->nowned; i++) {
		if (c->owned[i].instance != instance)
			continue;
		while (c->owned[i].busy) {
			uint64_t now = ks_now_ms();

			if (now >= deadline) {
				ks_unlock(&c->idle_lock);
				return fail(-ETIMEDOUT, "instance %lld: its connection stayed busy "
					    "for %d ms", (long long)instance, c->timeout_ms);
			}
			ks_cond_wait_ms(&c->owned_free, &c->idle_lock, deadline - now);
		}
		c->owned[i].busy = true;
		*out = c->owned[i].cn;
		ks_unlock(&c->idle_lock);
		return 0;
	}
	ks_unlock(&c->idle_lock);
	rc = conn_get(c, &cn);
	if (rc || !create) {
		*out = cn;
		return rc;
	}
	if (ks_lock(&c->idle_lock) == 0) {
		if (c->nowned < CLIENT_MAX_INSTANCES) {
			c->owned[c->nowned].instance = instance;
			c->owned[c->nowned].cn = cn;
			c->owned[c->nowned].busy = true;
			c->nowned++;
		}
		ks_unlock(&c->idle_lock);
	}
	*out = cn;
	return 0;
}

/* Give back a connection from inst_conn_get(); @forget drops the binding. */
static void inst_conn_put(kvstash_client *c, struct client_conn *cn, bool forget)
{
	if (ks_lock(&c->idle_lock) == 0) {
		for (size_t i = 0; i < c->nowned; i++) {
			if (c->owned[i].cn != cn)
				continue;
			if (forget) {
				c->owned[i] = c->owned[--c->nowned];
				break;	/* back to the idle pool below */
			}
			c->owned[i].busy = false;
			ks_cond_broadcast(&c->owned_free);
			ks_unlock(&c->idle_lock);
			return;
		}
		ks_unlock(&c->idle_lock);
	}
	conn_put(c, cn);
}

/* call() on @instance's own connection (see inst_conn_get). */
static int call_inst(kvstash_client *c, int64_t instance, bool create, enum proto_type type,
		     const struct proto_msg *args, size_t nargs, struct proto_reply *reply,
		     struct client_conn **keep)
{
	struct client_conn *cn = NULL;
	int rc = inst_conn_get(c, instance, create, &cn);

	if (rc)
		return rc;
	/* A timed-out owned connection is kept: its identity is the instance's
	 * and a late reply is discarded by uid. */
	rc = conn_call(c, cn, type, args, nargs, reply);
	if (keep && rc == 0) {
		*keep = cn;
		return 0;
	}
	inst_conn_put(c, cn, false);
	return rc;
}

static void free_msgs(struct proto_msg *m, size_t n)
{
	for (size_t i = 0; i < n; i++)
		proto_msg_free(&m[i]);
}

static int expect(const struct proto_reply *r, enum proto_reply_kind kind, enum proto_type type)
{
	if (r->kind != kind)
		return fail(-EPROTO, "%s: unexpected reply kind %d", proto_type_name(type),
			    (int)r->kind);
	return 0;
}

static bool z85_key_ok(const char *k)
{
	uint8_t raw[32];

	return k && strlen(k) == 40 && zmq_z85_decode(raw, k) != NULL;
}

int kvstash_set_curve(kvstash_client *c, const char *server_public, const char *client_public,
		      const char *client_secret)
{
	if (!zmq_has("curve"))
		return fail(-ENOTSUP, "this libzmq has no CURVE support");
	if (!z85_key_ok(server_public) || !z85_key_ok(client_public) || !z85_key_ok(client_secret))
		return fail(-EINVAL, "CURVE keys must be 40-character Z85 strings");
	memcpy(c->curve_server, server_public, 41);
	memcpy(c->curve_public, client_public, 41);
	memcpy(c->curve_secret, client_secret, 41);
	c->curve = true;
	return 0;
}

int kvstash_curve_keypair(char public_key[41], char secret_key[41])
{
	if (zmq_curve_keypair(public_key, secret_key) < 0)
		return fail(-ENOTSUP, "zmq_curve_keypair: %s", zmq_strerror(zmq_errno()));
	return 0;
}

int kvstash_ping(kvstash_client *c, double *rtt_ms)
{
	struct proto_reply r;
	uint64_t t0 = ks_now_ns();
	int rc = call(c, PROTO_PING, NULL, 0, &r, NULL);

	if (rc)
		return rc;
	if (r.kind != PROTO_REPLY_BOOL || !r.b)
		return fail(-EPROTO, "PING: reply is not true");
	if (rtt_ms)
		*rtt_ms = (double)(ks_now_ns() - t0) / 1e6;
	return 0;
}

int kvstash_get_chunk_size(kvstash_client *c, uint32_t *chunk_tokens)
{
	struct proto_reply r;
	int rc = call(c, PROTO_GET_CHUNK_SIZE, NULL, 0, &r, NULL);

	if (!rc)
		rc = expect(&r, PROTO_REPLY_INT, PROTO_GET_CHUNK_SIZE);
	if (!rc)
		*chunk_tokens = (uint32_t)r.i;
	return rc;
}

/* Copy a public key into the protocol's struct (borrowing the tokens). */
static int key_to_proto(const struct kvstash_key *k, struct proto_key *pk)
{
	size_t ml = k->model ? strlen(k->model) : 0;
	size_t rl = k->request_id ? strlen(k->request_id) : 0;

	if (ml > KS_MODEL_MAX || rl > PROTO_REQUEST_ID_MAX)
		return fail(-ENAMETOOLONG, "model name or request id too long");
	if (k->start > INT64_MAX || k->end > INT64_MAX)
		return fail(-EINVAL, "token range out of range");
	memset(pk, 0, sizeof(*pk));
	memcpy(pk->model, k->model ? k->model : "", ml);
	pk->model_len = (uint16_t)ml;
	pk->world_size = k->world_size;
	pk->worker_id = k->worker_id;
	pk->token_ids = (uint32_t *)k->tokens;
	pk->ntokens = k->ntokens;
	pk->start = (int64_t)k->start;
	pk->end = (int64_t)k->end;
	memcpy(pk->request_id, k->request_id ? k->request_id : "", rl);
	pk->request_id_len = (uint16_t)rl;
	return 0;
}

/*
 * REGISTER_KV_CACHE of @nlayers layers: host files (@host) or CUDA IPC
 * allocations (@cuda on @device_uuid); exactly one of them is non-NULL.
 */
static int register_layers(kvstash_client *c, int64_t instance_id, const char *model,
			   uint32_t world_size, const struct kvstash_kv_layout *layout,
			   const struct kvstash_host_layer *host, const char *device_uuid,
			   const struct kvstash_cuda_layer *cuda, size_t nlayers)
{
	struct proto_msg args[4] = { 0 };
	struct proto_kv_desc *d;
	struct proto_reply r;
	struct client_conn *cn = NULL;
	enum kv_dtype dt;
	int rc;

	if (!layout || (!host && !cuda) || !nlayers || !model || layout->ndim == 0 ||
	    layout->ndim > 5 || (cuda && (!device_uuid || strlen(device_uuid) > PROTO_UUID_MAX)))
		return fail(-EINVAL, "register: bad arguments");
	if (!layout->dtype || kv_dtype_parse(layout->dtype, strlen(layout->dtype), &dt))
		return fail(-EINVAL, "register: unknown dtype '%s'",
			    layout->dtype ? layout->dtype : "(null)");
	d = calloc(nlayers, sizeof(*d));
	if (!d)
		return fail(-ENOMEM, "out of memory");
	for (size_t l = 0; l < nlayers; l++) {
		bool dense = true;

		d[l].kind = host ? PROTO_KV_HOST_SHM : PROTO_KV_CUDA_IPC;
		d[l].layout.kind = (enum kv_layout_kind)layout->layout;
		d[l].layout.dtype = dt;
		d[l].layout.elem_bytes = kv_dtype_bytes(dt);
		d[l].layout.ndim = layout->ndim;
		for (uint32_t i = 0; i < layout->ndim; i++) {
			d[l].layout.shape[i] = layout->shape[i];
			d[l].layout.stride[i] = layout->stride[i];
			dense = dense && layout->stride[i] == 0;
		}
		if (dense) {
			int64_t s = 1;

			for (int i = (int)layout->ndim - 1; i >= 0; i--) {
				d[l].layout.stride[i] = s;
				s *= layout->shape[i];
			}
		}
		if (cuda) {
			d[l].offset = cuda[l].offset;
			d[l].nbytes = cuda[l].nbytes;
			memcpy(d[l].mem_handle, cuda[l].mem_handle, PROTO_MEM_HANDLE_LEN);
			snprintf(d[l].device_uuid, sizeof(d[l].device_uuid), "%s", device_uuid);
			continue;
		}
		d[l].offset = host[l].offset;
		d[l].nbytes = host[l].nbytes;
		if (!host[l].path || strlen(host[l].path) > PROTO_PATH_MAX) {
			free(d);
			return fail(-EINVAL, "register: layer %zu: bad path", l);
		}
		snprintf(d[l].path, sizeof(d[l].path), "%s", host[l].path);
	}
	/* Check here what the server would refuse: it drops a malformed REGISTER
	 * without a reply (protocol.md §3 Errors rule 1), which would cost the
	 * caller a whole timeout and no reason. */
	{
		struct kv_layout chk = d[0].layout;
		char why[256];

		chk.num_layers = (uint32_t)nlayers;
		if (kv_layout_init(&chk, why, sizeof(why))) {
			free(d);
			return fail(-EINVAL, "register: %s", why);
		}
		for (size_t l = 0; l < nlayers; l++)
			if (d[l].offset > d[l].nbytes ||
			    chk.extent_bytes > d[l].nbytes - d[l].offset) {
				rc = fail(-EINVAL, "register: layer %zu: offset %llu + extent %llu "
					  "exceeds nbytes %llu", l, (unsigned long long)d[l].offset,
					  (unsigned long long)chk.extent_bytes,
					  (unsigned long long)d[l].nbytes);
				free(d);
				return rc;
			}
	}
	rc = proto_encode_int(&args[0], instance_id);
	if (!rc)
		rc = proto_encode_kv_descs(&args[1], d, nlayers);
	if (!rc)
		rc = proto_encode_str(&args[2], model);
	if (!rc)
		rc = proto_encode_int(&args[3], world_size);
	free(d);
	if (rc) {
		free_msgs(args, 4);
		return fail(rc, "register: encoding failed");
	}
	rc = call_inst(c, instance_id, true, PROTO_REGISTER_KV_CACHE, args, 4, &r, &cn);
	free_msgs(args, 4);
	if (rc)
		return rc;
	/* The pinned protocol replies None either way: ask whether it was refused. */
	rc = conn_call(c, cn, PROTO_KS_LAST_ERROR, NULL, 0, &r);
	if (rc == 0 && r.kind == PROTO_REPLY_STR && !strncmp(r.str, "REGISTER_KV_CACHE", 17))
		rc = fail(-EINVAL, "%s", r.str);
	inst_conn_put(c, cn, rc == -EINVAL);
	return rc;
}

int kvstash_register_host(kvstash_client *c, int64_t instance_id, const char *model,
			  uint32_t world_size, const struct kvstash_kv_layout *layout,
			  const struct kvstash_host_layer *layers, size_t nlayers)
{
	if (!layers)
		return fail(-EINVAL, "register: no layers");
	return register_layers(c, instance_id, model, world_size, layout, layers, NULL, NULL,
			       nlayers);
}

int kvstash_register_cuda(kvstash_client *c, int64_t instance_id, const char *model,
			  uint32_t world_size, const struct kvstash_kv_layout *layout,
			  const char *device_uuid, const struct kvstash_cuda_layer *layers,
			  size_t nlayers)
{
	if (!layers)
		return fail(-EINVAL, "register: no layers");
	return register_layers(c, instance_id, model, world_size, layout, NULL, device_uuid,
			       layers, nlayers);
}

int kvstash_heartbeat(kvstash_client *c, int64_t instance_id)
{
	struct proto_msg a = { 0 };
	struct proto_reply r;
	int rc = proto_encode_int(&a, instance_id);

	if (!rc)
		rc = call_inst(c, instance_id, false, PROTO_PING, &a, 1, &r, NULL);
	proto_msg_free(&a);
	if (!rc && (r.kind != PROTO_REPLY_BOOL || !r.b))
		rc = fail(-EPROTO, "PING: reply is not true");
	return rc;
}

int kvstash_unregister(kvstash_client *c, int64_t instance_id)
{
	struct proto_msg a = { 0 };
	struct proto_reply r;
	struct client_conn *cn = NULL;
	int rc = proto_encode_int(&a, instance_id);

	if (!rc)
		rc = call_inst(c, instance_id, false, PROTO_UNREGISTER_KV_CACHE, &a, 1, &r, &cn);
	if (rc == 0)
		inst_conn_put(c, cn, true);	/* the instance is gone: a plain connection again */
	proto_msg_free(&a);
	return rc;
}

static int xfer(kvstash_client *c, enum proto_type type, const struct kvstash_key *key,
		int64_t instance_id, const int64_t *block_ids, size_t nblocks, uint64_t skip,
		const void *wait_event, void *done_event)
{
	struct proto_msg args[5] = { 0 };
	struct proto_key pk;
	struct proto_reply r;
	struct client_conn *cn = NULL;
	size_t nargs = type == PROTO_RETRIEVE ? 5 : 4;
	int rc = key_to_proto(key, &pk);

	if (rc)
		return rc;
	if (skip > INT64_MAX)
		return fail(-EINVAL, "skip_first_n_tokens out of range");
	rc = proto_encode_key(&args[0], &pk);
	if (!rc)
		rc = proto_encode_int(&args[1], instance_id);
	if (!rc)
		rc = proto_encode_int_list(&args[2], block_ids, nblocks);
	if (!rc)
		rc = proto_encode_bin(&args[3], wait_event, wait_event ? PROTO_EVENT_HANDLE_LEN : 0);
	if (!rc && nargs == 5)
		rc = proto_encode_int(&args[4], (int64_t)skip);
	if (rc) {
		free_msgs(args, nargs);
		return fail(rc, "%s: encoding failed", proto_type_name(type));
	}
	rc = call_inst(c, instance_id, false, type, args, nargs, &r, &cn);
	free_msgs(args, nargs);
	if (rc)
		return rc;
	if (r.kind != PROTO_REPLY_XFER) {
		rc = fail(-EPROTO, "%s: reply is not [bin, bool]", proto_type_name(type));
	} else if (!r.b) {
		fetch_server_error(c, cn, proto_type_name(type));
		rc = type == PROTO_STORE ? -EIO : -ENOENT;
	} else if (done_event) {
		if (r.event_len == PROTO_EVENT_HANDLE_LEN)
			memcpy(done_event, r.event, PROTO_EVENT_HANDLE_LEN);
		else
			memset(done_event, 0, PROTO_EVENT_HANDLE_LEN);	/* nothing was copied */
	}
	inst_conn_put(c, cn, false);
	return rc;
}

int kvstash_store(kvstash_client *c, const struct kvstash_key *key, int64_t instance_id,
		  const int64_t *block_ids, size_t nblocks)
{
	return xfer(c, PROTO_STORE, key, instance_id, block_ids, nblocks, 0, NULL, NULL);
}

int kvstash_store_event(kvstash_client *c, const struct kvstash_key *key, int64_t instance_id,
			const int64_t *block_ids, size_t nblocks, const void *wait_event,
			void *done_event)
{
	return xfer(c, PROTO_STORE, key, instance_id, block_ids, nblocks, 0, wait_event,
		    done_event);
}

int kvstash_retrieve_event(kvstash_client *c, const struct kvstash_key *key,
			   int64_t instance_id, const int64_t *block_ids, size_t nblocks,
			   uint64_t skip_first_n_tokens, const void *wait_event, void *done_event)
{
	return xfer(c, PROTO_RETRIEVE, key, instance_id, block_ids, nblocks, skip_first_n_tokens,
		    wait_event, done_event);
}

int kvstash_retrieve(kvstash_client *c, const struct kvstash_key *key, int64_t instance_id,
		     const int64_t *block_ids, size_t nblocks, uint64_t skip_first_n_tokens)
{
	return xfer(c, PROTO_RETRIEVE, key, instance_id, block_ids, nblocks,
		    skip_first_n_tokens, NULL, NULL);
}

/* Requests whose arguments are (key, tp_size). */
static int key_tp_call(kvstash_client *c, enum proto_type type, const struct kvstash_key *key,
		       uint32_t tp_size, struct proto_reply *r)
{
	struct proto_msg args[2] = { 0 };
	struct proto_key pk;
	int rc = key_to_proto(key, &pk);

	if (rc)
		return rc;
	rc = proto_encode_key(&args[0], &pk);
	if (!rc)
		rc = proto_encode_int(&args[1], tp_size);
	if (!rc)
		rc = call(c, type, args, 2, r, NULL);
	else
		rc = fail(rc, "%s: encoding failed", proto_type_name(type));
	free_msgs(args, 2);
	return rc;
}

int kvstash_lookup(kvstash_client *c, const struct kvstash_key *key, uint32_t tp_size,
		   int64_t *job_id)
{
	struct proto_reply r;
	int rc = key_tp_call(c, PROTO_LOOKUP, key, tp_size, &r);

	if (!rc)
		rc = expect(&r, PROTO_REPLY_INT, PROTO_LOOKUP);
	if (!rc)
		*job_id = r.i;
	return rc;
}

int kvstash_free_lookup_locks(kvstash_client *c, const struct kvstash_key *key,
			      uint32_t tp_size)
{
	struct proto_reply r;

	return key_tp_call(c, PROTO_FREE_LOOKUP_LOCKS, key, tp_size, &r);
}

static int query(kvstash_client *c, enum proto_type type, int64_t job_id, int64_t *chunks)
{
	struct proto_msg a = { 0 };
	struct proto_reply r;
	int rc = proto_encode_int(&a, job_id);

	if (!rc)
		rc = call(c, type, &a, 1, &r, NULL);
	proto_msg_free(&a);
	if (rc)
		return rc;
	if (r.kind == PROTO_REPLY_NIL)
		return fail(-ENOENT, "%s: job %lld unknown or consumed", proto_type_name(type),
			    (long long)job_id);
	rc = expect(&r, PROTO_REPLY_INT, type);
	if (!rc)
		*chunks = r.i;
	return rc;
}

int kvstash_query_prefetch_status(kvstash_client *c, int64_t job_id, int64_t *chunks)
{
	return query(c, PROTO_QUERY_PREFETCH_STATUS, job_id, chunks);
}

int kvstash_query_lookup_hits(kvstash_client *c, int64_t job_id, int64_t *chunks)
{
	return query(c, PROTO_QUERY_PREFETCH_LOOKUP_HITS, job_id, chunks);
}

int kvstash_lookup_chunks(kvstash_client *c, const struct kvstash_key *key, uint32_t tp_size,
			  int64_t *chunks)
{
	int64_t job;
	int rc = kvstash_lookup(c, key, tp_size, &job);

	return rc ? rc : kvstash_query_prefetch_status(c, job, chunks);
}

int kvstash_end_session(kvstash_client *c, const char *request_id)
{
	struct proto_msg a = { 0 };
	struct proto_reply r;
	int rc;

	if (!request_id)
		return fail(-EINVAL, "END_SESSION: request id is NULL");
	rc = proto_encode_str(&a, request_id);
	if (!rc)
		rc = call(c, PROTO_END_SESSION, &a, 1, &r, NULL);
	proto_msg_free(&a);
	return rc;
}

int kvstash_clear(kvstash_client *c)
{
	struct proto_reply r;

	return call(c, PROTO_CLEAR, NULL, 0, &r, NULL);
}

int kvstash_stats(kvstash_client *c, int (*fn)(const char *name, uint64_t value, void *arg),
		  void *arg)
{
	struct proto_reply *r = malloc(sizeof(*r));
	int rc;

	if (!r)
		return fail(-ENOMEM, "out of memory");
	rc = call(c, PROTO_KS_STATS, NULL, 0, r, NULL);
	if (!rc)
		rc = expect(r, PROTO_REPLY_MAP, PROTO_KS_STATS);
	for (size_t i = 0; !rc && i < r->map_n; i++)
		if (fn(r->map_keys[i], r->map_vals[i], arg))
			break;
	free(r);
	return rc;
}

int kvstash_host_buffer_create(struct kvstash_host_buffer *b, size_t bytes, const char *name)
{
	int rc;

	memset(b, 0, sizeof(*b));
	b->fd = memfd_create(name ? name : "kvstash-kv", MFD_CLOEXEC);
	if (b->fd < 0)
		return fail(-errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(b->fd, (off_t)bytes) < 0) {
		rc = -errno;
		close(b->fd);
		return fail(rc, "ftruncate %zu: %s", bytes, strerror(-rc));
	}
	b->ptr = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, b->fd, 0);
	if (b->ptr == MAP_FAILED) {
		rc = -errno;
		close(b->fd);
		b->ptr = NULL;
		return fail(rc, "mmap %zu: %s", bytes, strerror(-rc));
	}
	b->bytes = bytes;
	snprintf(b->path, sizeof(b->path), "/proc/%d/fd/%d", (int)getpid(), b->fd);
	return 0;
}

void kvstash_host_buffer_destroy(struct kvstash_host_buffer *b)
{
	if (b->ptr)
		munmap(b->ptr, b->bytes);
	if (b->fd >= 0)
		close(b->fd);
	memset(b, 0, sizeof(*b));
	b->fd = -1;
}
