/* Description: kvstashd survives malformed and invalid requests with the documented reply (or none) and keeps its data. Labels: unit
 *
 * A raw ZMQ DEALER sends hand-built frames to a real kvstashd
 * (protocol.md §1-§5): frame-level faults (fewer than 2 frames, non-int
 * uid or type, unknown type 99, wrong frame counts for several types,
 * too many frames, empty/truncated msgpack, trailing bytes, wrong field
 * types in the key, tokens -1 and 2^32, a token list over
 * PROTO_MAX_TOKENS, bad REGISTER descriptors: nbytes below the extent, last
 * stride != 1, layers that differ, the LMCache ext-1 pickle) must get NO
 * reply within 200 ms (§3 Errors rule 1); semantic failures (REGISTER of a
 * nonexistent path or of a layout bigger than the pool slot, STORE before
 * REGISTER, block id out of range, range not chunk aligned or beyond the
 * tokens, worker_id nil, world_size or model mismatch, RETRIEVE of a
 * missing chunk) must get the exact reply bytes ([c4 00, false] = 92 c4 00
 * c2, or nil = c0), and RETRIEVE of a missing chunk must write nothing.
 * A non-empty event handle on a host registration is a frame-level fault
 * (§5.3). Every case must leave a non-empty message behind
 * PROTO_KS_LAST_ERROR on the same socket and move exactly one of the
 * counters frame_faults / semantic_errors / retrieve_miss by exactly one.
 * A single frame larger than --max-message-mb must make ZMQ drop that
 * connection without the server ever seeing it. A second connection speaks
 * LMCache's current dialect (protocol.md §11): a cache_salt with '/', an
 * 81-byte event handle of version 2, an unknown op id, a string op over 64
 * bytes or with a NUL are dropped; a LOOKUP whose key has num_kv_readers 0
 * is refused without a reply (as LMCache refuses it) and counted as a
 * semantic error; two block lists for a one-group registration, a
 * null_chunk_mask of the wrong group count and a device event on a host
 * registration get [b"", false] (never silence: LMCache's client waits on
 * STORE with no timeout); an unknown string op is answered None (no
 * response frame, its op echoed) and counted as unsupported. Afterwards PING answers, a
 * chunk stored at the start comes back byte-exact, and the totals match.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "helpers.h"
#include "kvstash.h"
#include "layout.h"
#include "protocol.h"

/* Geometry: flash_attn [2, NB, BS, NH, HS] bfloat16, NL layers, chunk C. */
#define C 16
#define NB 8
#define BS 16
#define NH 2
#define HS 8
#define NL 2
#define EB 2
#define BLOCK_BYTES ((size_t)BS * NH * HS * EB)
#define LAYER_BYTES ((size_t)2 * NB * BLOCK_BYTES)
#define INSTANCE 1
#define MODEL "badinput-model"
#define NO_REPLY_MS 200
#define MAX_MESSAGE_MB 8	/* room for a real PROTO_MAX_TOKENS+1 list (~4 MiB) */

/* ---- a tiny msgpack writer for frames no encoder would produce ---------- */

struct mp {
	uint8_t *p;
	size_t n, cap;
};

static void mp_raw(struct mp *m, const void *b, size_t n)
{
	if (m->n + n > m->cap) {
		m->cap = (m->n + n) * 2 + 64;
		m->p = realloc(m->p, m->cap);
		REQUIRE(m->p);
	}
	memcpy(m->p + m->n, b, n);
	m->n += n;
}

static void mp_byte(struct mp *m, uint8_t b)
{
	mp_raw(m, &b, 1);
}

static void mp_be(struct mp *m, uint64_t v, int bytes)
{
	for (int i = bytes - 1; i >= 0; i--)
		mp_byte(m, (uint8_t)(v >> (8 * i)));
}

static void mp_uint(struct mp *m, uint64_t v)
{
	if (v < 128) {
		mp_byte(m, (uint8_t)v);
	} else if (v <= 0xffff) {
		mp_byte(m, 0xcd), mp_be(m, v, 2);
	} else if (v <= 0xffffffffull) {
		mp_byte(m, 0xce), mp_be(m, v, 4);
	} else {
		mp_byte(m, 0xcf), mp_be(m, v, 8);
	}
}

static void mp_str(struct mp *m, const char *s)
{
	size_t n = strlen(s);

	if (n < 32)
		mp_byte(m, (uint8_t)(0xa0 | n));
	else
		mp_byte(m, 0xd9), mp_be(m, n, 1);
	mp_raw(m, s, n);
}

static void mp_arr(struct mp *m, uint32_t n)
{
	if (n < 16)
		mp_byte(m, (uint8_t)(0x90 | n));
	else if (n <= 0xffff)
		mp_byte(m, 0xdc), mp_be(m, n, 2);
	else
		mp_byte(m, 0xdd), mp_be(m, n, 4);
}

static void mp_map(struct mp *m, uint32_t n)
{
	REQUIRE(n < 16);
	mp_byte(m, (uint8_t)(0x80 | n));
}

static void mp_free(struct mp *m)
{
	free(m->p);
	memset(m, 0, sizeof(*m));
}

/*
 * A key map with the 7 fields; @skip names a field left out, and a field
 * named in @bad_field gets @bad (raw msgpack) instead of its value.
 */
struct key_spec {
	const char *model;
	int64_t world_size;
	int64_t worker_id;	/* -1 = nil */
	const uint32_t *tokens;
	size_t ntokens;
	int64_t start, end;
	const char *request_id;
	const char *skip;
	const char *bad_field;
	const uint8_t *bad;
	size_t bad_len;
};

static void mp_key(struct mp *m, const struct key_spec *k)
{
	static const char *const f[] = { "model_name", "world_size", "worker_id", "token_ids",
					 "start", "end", "request_id" };

	mp_map(m, k->skip ? 6 : 7);
	for (size_t i = 0; i < 7; i++) {
		if (k->skip && !strcmp(k->skip, f[i]))
			continue;
		mp_str(m, f[i]);
		if (k->bad_field && !strcmp(k->bad_field, f[i])) {
			mp_raw(m, k->bad, k->bad_len);
			continue;
		}
		switch (i) {
		case 0: mp_str(m, k->model); break;
		case 1: mp_uint(m, (uint64_t)k->world_size); break;
		case 2:
			if (k->worker_id < 0)
				mp_byte(m, 0xc0);
			else
				mp_uint(m, (uint64_t)k->worker_id);
			break;
		case 3:
			mp_arr(m, (uint32_t)k->ntokens);
			for (size_t t = 0; t < k->ntokens; t++)
				mp_uint(m, k->tokens[t]);
			break;
		case 4: mp_uint(m, (uint64_t)k->start); break;
		case 5: mp_uint(m, (uint64_t)k->end); break;
		case 6: mp_str(m, k->request_id); break;
		}
	}
}

/* ---- the raw DEALER ------------------------------------------------------ */

struct frame {
	const void *p;
	size_t n;
};

struct reply {
	size_t nframes;
	uint8_t *f[8];
	size_t len[8];
};

struct raw {
	void *ctx, *sock;
	uint64_t uid;
};

static void raw_open(struct raw *r, const char *endpoint)
{
	int linger = 0;

	r->ctx = zmq_ctx_new();
	REQUIRE(r->ctx);
	r->sock = zmq_socket(r->ctx, ZMQ_DEALER);
	REQUIRE(r->sock);
	zmq_setsockopt(r->sock, ZMQ_LINGER, &linger, sizeof(linger));
	REQUIRE(zmq_connect(r->sock, endpoint) == 0);
	r->uid = 0;
}

static void raw_close(struct raw *r)
{
	zmq_close(r->sock);
	zmq_ctx_term(r->ctx);
}

static void reply_free(struct reply *rp)
{
	for (size_t i = 0; i < rp->nframes && i < 8; i++)
		free(rp->f[i]);
	memset(rp, 0, sizeof(*rp));
}

static void raw_send(struct raw *r, const struct frame *f, size_t n)
{
	for (size_t i = 0; i < n; i++)
		REQUIRE(zmq_send(r->sock, f[i].p, f[i].n, i + 1 < n ? ZMQ_SNDMORE : 0) ==
			(int)f[i].n);
}

/* One whole message within @timeout_ms: 1, or 0 if none came. */
static int raw_recv(struct raw *r, int timeout_ms, struct reply *rp)
{
	zmq_pollitem_t it = { .socket = r->sock, .events = ZMQ_POLLIN };
	int more = 1;

	memset(rp, 0, sizeof(*rp));
	if (zmq_poll(&it, 1, timeout_ms) <= 0)
		return 0;
	while (more) {
		zmq_msg_t m;
		size_t sz = sizeof(more);

		zmq_msg_init(&m);
		REQUIRE(zmq_msg_recv(&m, r->sock, 0) >= 0);
		if (rp->nframes < 8) {
			rp->len[rp->nframes] = zmq_msg_size(&m);
			rp->f[rp->nframes] = malloc(rp->len[rp->nframes] + 1);
			REQUIRE(rp->f[rp->nframes]);
			memcpy(rp->f[rp->nframes], zmq_msg_data(&m), rp->len[rp->nframes]);
		}
		rp->nframes++;
		zmq_msg_close(&m);
		zmq_getsockopt(r->sock, ZMQ_RCVMORE, &more, &sz);
	}
	return 1;
}

/*
 * Send [uid, type, args...] with a fresh uid and wait for its reply; the
 * response frame goes to @resp (malloc'd, caller frees). Checks that uid and
 * type are echoed byte for byte. 1 = replied, 0 = no reply in @timeout_ms.
 */
static int raw_call(struct raw *r, int type, const struct frame *args, size_t nargs,
		    uint8_t **resp, size_t *resp_len, int timeout_ms)
{
	struct proto_msg u = { 0 }, t = { 0 };
	struct frame f[24];
	struct reply rp;
	int got;

	REQUIRE(nargs + 2 <= 24);
	REQUIRE(proto_encode_int(&u, (int64_t)r->uid++) == 0);
	REQUIRE(proto_encode_int(&t, type) == 0);
	f[0] = (struct frame){ u.data, u.len };
	f[1] = (struct frame){ t.data, t.len };
	for (size_t i = 0; i < nargs; i++)
		f[2 + i] = args[i];
	raw_send(r, f, nargs + 2);
	got = raw_recv(r, timeout_ms, &rp);
	if (got) {
		CHECK_EQ(rp.nframes, 3);
		CHECK(rp.nframes >= 2 && rp.len[0] == u.len && !memcmp(rp.f[0], u.data, u.len));
		CHECK(rp.nframes >= 2 && rp.len[1] == t.len && !memcmp(rp.f[1], t.data, t.len));
		if (rp.nframes == 3 && resp) {
			*resp = rp.f[2];
			*resp_len = rp.len[2];
			rp.f[2] = NULL;
		}
	}
	reply_free(&rp);
	proto_msg_free(&u);
	proto_msg_free(&t);
	return got;
}

/* PROTO_KS_LAST_ERROR on this socket: the string (static), "" if none. */
static const char *last_error(struct raw *r)
{
	static char msg[PROTO_REPLY_STR_MAX + 1];
	static struct proto_reply rep;
	uint8_t *resp = NULL;
	size_t len = 0;

	msg[0] = '\0';
	if (!raw_call(r, PROTO_KS_LAST_ERROR, NULL, 0, &resp, &len, 5000) || !resp) {
		CHECK(!"PROTO_KS_LAST_ERROR answered");
		free(resp);
		return msg;
	}
	struct proto_buf b = { resp, len };
	if (proto_decode_reply(&b, &rep) == 0 && rep.kind == PROTO_REPLY_STR)
		snprintf(msg, sizeof(msg), "%s", rep.str);
	else
		CHECK(!"PROTO_KS_LAST_ERROR replied a str");
	free(resp);
	return msg;
}

struct counters {
	uint64_t frame_faults, semantic_errors, retrieve_miss, retrieve_ok, pins, read_locks;
	uint64_t objects, objects_writing, slots_total, slots_free, copy_faults;
	uint64_t store_chunks_stored, unsupported_ops, connections_current, connections_march;
};

static void stats(struct raw *r, struct counters *c)
{
	static struct proto_reply rep;
	uint8_t *resp = NULL;
	size_t len = 0;

	memset(c, 0, sizeof(*c));
	REQUIRE(raw_call(r, PROTO_KS_STATS, NULL, 0, &resp, &len, 5000) && resp);
	struct proto_buf b = { resp, len };
	REQUIRE(proto_decode_reply(&b, &rep) == 0 && rep.kind == PROTO_REPLY_MAP);
	free(resp);
	int found = 0;
	for (size_t i = 0; i < rep.map_n; i++) {
#define GET(name)                                             \
		if (!strcmp(rep.map_keys[i], #name)) {        \
			c->name = rep.map_vals[i];            \
			found++;                              \
		}
		GET(frame_faults) GET(semantic_errors) GET(retrieve_miss) GET(retrieve_ok)
		GET(pins) GET(read_locks) GET(objects) GET(objects_writing) GET(slots_total)
		GET(slots_free) GET(copy_faults) GET(store_chunks_stored) GET(unsupported_ops)
		GET(connections_current) GET(connections_march)
#undef GET
	}
	REQUIRE(found == 15);
}

/* ---- expectations -------------------------------------------------------- */

static struct raw R;		/* the socket every case uses */
static uint64_t want_faults, want_semantic, want_miss;
static int ncases;

enum outcome { FRAME_FAULT, SEMANTIC, MISS };

static void check_case(const char *what, const struct counters *before, enum outcome o)
{
	struct counters after;
	const char *msg = last_error(&R);

	if (!*msg)
		fprintf(stderr, "FAIL case '%s': PROTO_KS_LAST_ERROR is empty\n", what);
	CHECK(*msg);
	stats(&R, &after);
	uint64_t df = after.frame_faults - before->frame_faults;
	uint64_t ds = after.semantic_errors - before->semantic_errors;
	uint64_t dm = after.retrieve_miss - before->retrieve_miss;
	if (df != (o == FRAME_FAULT) || ds != (o == SEMANTIC) || dm != (o == MISS))
		fprintf(stderr, "FAIL case '%s': frame_faults +%llu semantic_errors +%llu "
			"retrieve_miss +%llu, expected the %s counter +1 only\n", what,
			(unsigned long long)df, (unsigned long long)ds, (unsigned long long)dm,
			o == FRAME_FAULT ? "frame_faults" : o == SEMANTIC ? "semantic_errors" :
			"retrieve_miss");
	CHECK_EQ(df, o == FRAME_FAULT);
	CHECK_EQ(ds, o == SEMANTIC);
	CHECK_EQ(dm, o == MISS);
	want_faults += o == FRAME_FAULT;
	want_semantic += o == SEMANTIC;
	want_miss += o == MISS;
	ncases++;
	fprintf(stderr, "  case %-44s -> %s\n", what, msg);
}

/* Raw frames (uid and type included) that must get no reply. */
static void expect_dropped_raw(const char *what, const struct frame *f, size_t n)
{
	struct counters before;
	struct reply rp;

	stats(&R, &before);
	raw_send(&R, f, n);
	if (raw_recv(&R, NO_REPLY_MS, &rp)) {
		fprintf(stderr, "FAIL case '%s': got a %zu-frame reply to a frame-level fault\n",
			what, rp.nframes);
		CHECK(!"frame-level fault gets no reply");
		reply_free(&rp);
	}
	check_case(what, &before, FRAME_FAULT);
}

/* A request of @type with @args that must get no reply. */
static void expect_dropped(const char *what, int type, const struct frame *args, size_t nargs)
{
	struct proto_msg u = { 0 }, t = { 0 };
	struct frame f[24];

	REQUIRE(nargs + 2 <= 24);
	REQUIRE(proto_encode_int(&u, (int64_t)R.uid++) == 0);
	REQUIRE(proto_encode_int(&t, type) == 0);
	f[0] = (struct frame){ u.data, u.len };
	f[1] = (struct frame){ t.data, t.len };
	for (size_t i = 0; i < nargs; i++)
		f[2 + i] = args[i];
	expect_dropped_raw(what, f, nargs + 2);
	proto_msg_free(&u);
	proto_msg_free(&t);
}

/* A request that must get exactly the response bytes @want. */
static void expect_reply(const char *what, int type, const struct frame *args, size_t nargs,
			 const uint8_t *want, size_t want_len, enum outcome o)
{
	struct counters before;
	uint8_t *resp = NULL;
	size_t len = 0;

	stats(&R, &before);
	if (!raw_call(&R, type, args, nargs, &resp, &len, 5000)) {
		fprintf(stderr, "FAIL case '%s': no reply within 5 s\n", what);
		CHECK(!"semantic failure gets a reply");
	} else if (!resp || len != want_len || memcmp(resp, want, len)) {
		fprintf(stderr, "FAIL case '%s': reply", what);
		for (size_t i = 0; resp && i < len && i < 16; i++)
			fprintf(stderr, " %02x", resp[i]);
		fprintf(stderr, ", expected");
		for (size_t i = 0; i < want_len; i++)
			fprintf(stderr, " %02x", want[i]);
		fprintf(stderr, "\n");
		CHECK(!"reply bytes as documented");
	}
	free(resp);
	check_case(what, &before, o);
}


/* ---- the current dialect (protocol.md §11) ------------------------------ */

/*
 * A current-dialect key (IPCCacheServerKey): the March fields, then
 * cache_salt, request_configs, num_kv_readers and null_chunk_mask, each
 * given as raw msgpack.
 */
static struct proto_msg enc_key_current(const uint32_t *tok, size_t ntok, int64_t start,
					int64_t end, int64_t worker, const uint8_t *salt_mp,
					size_t salt_len, uint8_t readers, const uint8_t *mask_mp,
					size_t mask_len)
{
	struct key_spec k = { .model = MODEL, .world_size = 1, .worker_id = worker,
			      .tokens = tok, .ntokens = ntok, .start = start, .end = end,
			      .request_id = "req-current" };
	struct mp m = { 0 };
	struct proto_msg out;

	mp_key(&m, &k);
	m.p[0] = 0x80 | 11;	/* 7 fields -> 11 */
	mp_str(&m, "cache_salt");
	mp_raw(&m, salt_mp, salt_len);
	mp_str(&m, "request_configs");
	mp_byte(&m, 0xc0);
	mp_str(&m, "num_kv_readers");
	mp_byte(&m, readers);
	mp_str(&m, "null_chunk_mask");
	mp_raw(&m, mask_mp, mask_len);
	out.data = m.p;
	out.len = m.n;
	return out;
}

/* Frames [uid, op, args...] with a raw op frame (an int, or a str name). */
static size_t op_frames(struct frame *f, struct proto_msg *u, const void *op, size_t op_len,
			const struct frame *args, size_t nargs)
{
	REQUIRE(nargs + 2 <= 24);
	REQUIRE(proto_encode_int(u, (int64_t)R.uid++) == 0);
	f[0] = (struct frame){ u->data, u->len };
	f[1] = (struct frame){ op, op_len };
	for (size_t i = 0; i < nargs; i++)
		f[2 + i] = args[i];
	return nargs + 2;
}

/*
 * A request that must get no reply and move counter @o: a frame-level fault,
 * or a LOOKUP refused as LMCache refuses it (semantic, unanswered).
 */
static void expect_silent(const char *what, const void *op, size_t op_len,
			  const struct frame *args, size_t nargs, enum outcome o)
{
	struct proto_msg u = { 0 };
	struct frame f[24];
	struct counters before;
	struct reply rp;
	size_t n = op_frames(f, &u, op, op_len, args, nargs);

	stats(&R, &before);
	raw_send(&R, f, n);
	if (raw_recv(&R, NO_REPLY_MS, &rp)) {
		fprintf(stderr, "FAIL case '%s': got a %zu-frame reply\n", what, rp.nframes);
		CHECK(!"no reply");
		reply_free(&rp);
	}
	check_case(what, &before, o);
	proto_msg_free(&u);
}

static struct t_daemon *the_daemon;

/* A REQUIRE failure exits: take the daemon down too. */
static void kill_daemon_at_exit(void)
{
	if (the_daemon && the_daemon->pid > 0)
		kill(the_daemon->pid, SIGKILL);
}

static const uint8_t XFER_FALSE[] = { 0x92, 0xc4, 0x00, 0xc2 };
static const uint8_t XFER_TRUE[] = { 0x92, 0xc4, 0x00, 0xc3 };
static const uint8_t NIL[] = { 0xc0 };

/* ---- frame builders ------------------------------------------------------ */

static struct proto_msg enc_int(int64_t v)
{
	struct proto_msg m = { 0 };

	REQUIRE(proto_encode_int(&m, v) == 0);
	return m;
}

static struct proto_msg enc_blocks(const int64_t *b, size_t n)
{
	struct proto_msg m = { 0 };

	REQUIRE(proto_encode_int_list(&m, b, n) == 0);
	return m;
}

static struct proto_msg enc_key(const char *model, uint32_t world, int32_t worker,
				const uint32_t *tok, size_t ntok, int64_t start, int64_t end)
{
	struct proto_key k;
	struct proto_msg m = { 0 };

	memset(&k, 0, sizeof(k));
	snprintf(k.model, sizeof(k.model), "%s", model);
	k.model_len = (uint16_t)strlen(model);
	k.world_size = world;
	k.worker_id = worker;
	k.token_ids = (uint32_t *)tok;
	k.ntokens = ntok;
	k.start = start;
	k.end = end;
	snprintf(k.request_id, sizeof(k.request_id), "req-badinput");
	k.request_id_len = (uint16_t)strlen(k.request_id);
	REQUIRE(proto_encode_key(&m, &k) == 0);
	return m;
}

static void fill_desc(struct proto_kv_desc *d, const char *path, int64_t hs, uint64_t offset)
{
	memset(d, 0, sizeof(*d));
	d->kind = PROTO_KV_HOST_SHM;
	d->layout.kind = KV_LAYOUT_FLASH_ATTN;
	d->layout.dtype = KV_DTYPE_BFLOAT16;
	d->layout.ndim = 5;
	int64_t shape[5] = { 2, NB, BS, NH, hs };
	int64_t s = 1;
	for (int i = 4; i >= 0; i--) {
		d->layout.shape[i] = shape[i];
		d->layout.stride[i] = s;
		s *= shape[i];
	}
	d->offset = offset;
	d->nbytes = offset + (uint64_t)s * EB;
	snprintf(d->path, sizeof(d->path), "%s", path);
}

static struct proto_msg enc_descs(const struct proto_kv_desc *d, size_t n)
{
	struct proto_msg m = { 0 };

	REQUIRE(proto_encode_kv_descs(&m, d, n) == 0);
	return m;
}

/* Byte offset of (layer, plane, block) in the registered buffer. */
static size_t blk_off(int layer, int plane, int64_t block)
{
	return (size_t)layer * LAYER_BYTES + ((size_t)plane * NB + (size_t)block) * BLOCK_BYTES;
}

/*
 * What the sections share: the daemon, the registered host buffer, the
 * frames of the setup's REGISTER and STORE, and the counters after setup.
 * setup() fills it; teardown() frees it.
 */
static struct {
	struct t_daemon *d;
	struct kvstash_host_buffer buf;
	struct counters s0;	/* after setup */
	uint32_t tok[3 * C];
	struct proto_msg m_key, m_inst, m_blocks, m_ev, m_ev64, m_skip, m_tp;
	struct proto_msg m_descs, m_model, m_ws;
	struct frame store_args[4];	/* key, instance, blocks 0 and 1, no event */
	struct frame reg_args[4];
	struct proto_kv_desc descs[NL];
	uint8_t *want_blocks;	/* the buffer as the setup STORE saw it */
	uint8_t *resp;		/* a reply read by raw_call */
	size_t rlen;
} fx = { .buf = { .fd = -1 } };

/* A daemon, STORE before REGISTER (refused), REGISTER and a good STORE. */
static void setup(void)
{
	static uint8_t ev64[64];
	static const int64_t src_blocks[2] = { 0, 1 };
	char args[256];
	const char *le;

	snprintf(args, sizeof(args), "--chunk-size=%d --pool-size=64M --max-message-mb=%d",
		 C, MAX_MESSAGE_MB);
	fx.d = t_daemon_start(args);
	REQUIRE(fx.d);
	the_daemon = fx.d;
	atexit(kill_daemon_at_exit);
	REQUIRE(kvstash_host_buffer_create(&fx.buf, NL * LAYER_BYTES, "badinput") == 0);
	raw_open(&R, fx.d->endpoint);
	for (size_t i = 0; i < 3 * C; i++)
		fx.tok[i] = (uint32_t)(1000 + 7 * i);
	memset(ev64, 0xab, sizeof(ev64));

	fx.m_key = enc_key(MODEL, 1, 0, fx.tok, 2 * C, 0, 2 * C);
	fx.m_inst = enc_int(INSTANCE);
	fx.m_blocks = enc_blocks(src_blocks, 2);
	REQUIRE(proto_encode_bin(&fx.m_ev, NULL, 0) == 0);
	REQUIRE(proto_encode_bin(&fx.m_ev64, ev64, sizeof(ev64)) == 0);
	fx.m_skip = enc_int(0);
	fx.m_tp = enc_int(1);
	fx.store_args[0] = (struct frame){ fx.m_key.data, fx.m_key.len };
	fx.store_args[1] = (struct frame){ fx.m_inst.data, fx.m_inst.len };
	fx.store_args[2] = (struct frame){ fx.m_blocks.data, fx.m_blocks.len };
	fx.store_args[3] = (struct frame){ fx.m_ev.data, fx.m_ev.len };

	expect_reply("STORE before REGISTER", PROTO_STORE, fx.store_args, 4, XFER_FALSE, 4,
		     SEMANTIC);

	for (int l = 0; l < NL; l++)
		fill_desc(&fx.descs[l], fx.buf.path, HS, (uint64_t)l * LAYER_BYTES);
	for (int l = 0; l < NL; l++)
		fx.descs[l].nbytes = NL * LAYER_BYTES;
	fx.m_descs = enc_descs(fx.descs, NL);
	fx.m_ws = enc_int(1);
	REQUIRE(proto_encode_str(&fx.m_model, MODEL) == 0);
	fx.reg_args[0] = (struct frame){ fx.m_inst.data, fx.m_inst.len };
	fx.reg_args[1] = (struct frame){ fx.m_descs.data, fx.m_descs.len };
	fx.reg_args[2] = (struct frame){ fx.m_model.data, fx.m_model.len };
	fx.reg_args[3] = (struct frame){ fx.m_ws.data, fx.m_ws.len };
	REQUIRE(raw_call(&R, PROTO_REGISTER_KV_CACHE, fx.reg_args, 4, &fx.resp, &fx.rlen, 5000));
	CHECK(fx.resp && fx.rlen == 1 && fx.resp[0] == 0xc0);
	free(fx.resp);
	fx.resp = NULL;
	le = last_error(&R);
	if (*le)
		fprintf(stderr, "REGISTER refused: %s\n", le);
	REQUIRE(!*le);	/* read-once: the STORE-before-REGISTER message was consumed */

	t_fill(fx.buf.ptr, fx.buf.bytes, 42);
	REQUIRE(raw_call(&R, PROTO_STORE, fx.store_args, 4, &fx.resp, &fx.rlen, 5000));
	CHECK(fx.resp && fx.rlen == 4 && !memcmp(fx.resp, XFER_TRUE, 4));
	free(fx.resp);
	fx.resp = NULL;
	stats(&R, &fx.s0);
	CHECK_EQ(fx.s0.store_chunks_stored, 2);
	CHECK_EQ(fx.s0.objects, 2);
	/* Keep a copy of what the two source blocks held. */
	fx.want_blocks = malloc(fx.buf.bytes);
	REQUIRE(fx.want_blocks);
	memcpy(fx.want_blocks, fx.buf.ptr, fx.buf.bytes);
	want_faults = fx.s0.frame_faults;
	want_semantic = fx.s0.semantic_errors;
	want_miss = fx.s0.retrieve_miss;
	CHECK_EQ(fx.s0.semantic_errors, 1);
	CHECK_EQ(fx.s0.frame_faults, 0);
}

/* Frame-level faults in the envelope (uid, type, frame counts): no reply. */
static void test_frame_envelope(void)
{
	uint8_t u0 = 0x00, t_ping = 0x0c;
	struct frame one[1] = { { &u0, 1 } };
	expect_dropped_raw("one frame (uid only)", one, 1);

	uint8_t empty = 0;
	struct frame emp[1] = { { &empty, 0 } };
	expect_dropped_raw("one empty frame", emp, 1);

	static const uint8_t uid_str[] = { 0xa1, 'x' };
	struct frame f1[2] = { { uid_str, 2 }, { &t_ping, 1 } };
	expect_dropped_raw("uid is a str", f1, 2);

	static const uint8_t uid_neg[] = { 0xff };	/* -1 */
	struct frame f1b[2] = { { uid_neg, 1 }, { &t_ping, 1 } };
	expect_dropped_raw("uid is -1", f1b, 2);

	static const uint8_t uid_trail[] = { 0x01, 0x00 };
	struct frame f1c[2] = { { uid_trail, 2 }, { &t_ping, 1 } };
	expect_dropped_raw("uid frame with a trailing byte", f1c, 2);

	static const uint8_t type_str[] = { 0xa4, 'P', 'I', 'N', 'G' };
	struct frame f2[2] = { { &u0, 1 }, { type_str, 5 } };
	expect_dropped_raw("type is a str", f2, 2);

	static const uint8_t type_nil[] = { 0xc0 };
	struct frame f2b[2] = { { &u0, 1 }, { type_nil, 1 } };
	expect_dropped_raw("type is nil", f2b, 2);

	struct frame f2c[2] = { { &u0, 1 }, { &empty, 0 } };
	expect_dropped_raw("type frame empty", f2c, 2);

	static const uint8_t type_trunc[] = { 0xcd, 0x00 };	/* uint16 cut short */
	struct frame f2d[2] = { { &u0, 1 }, { type_trunc, 2 } };
	expect_dropped_raw("type frame truncated", f2d, 2);

	static const uint8_t big_uid[40] = { 0xc4, 38 };	/* 40-byte uid frame */
	struct frame f2e[2] = { { big_uid, 40 }, { &t_ping, 1 } };
	expect_dropped_raw("40-byte uid frame", f2e, 2);

	expect_dropped("unknown type 99", 99, NULL, 0);
	expect_dropped("unknown type 0", 0, NULL, 0);
	expect_dropped("unknown type 14 (CB_*)", 14, NULL, 0);

	struct frame x[20];
	for (int i = 0; i < 20; i++)
		x[i] = (struct frame){ fx.m_tp.data, fx.m_tp.len };
	expect_dropped("PING with 2 args", PROTO_PING, x, 2);
	expect_dropped("NOOP with 1 arg", PROTO_NOOP, x, 1);
	expect_dropped("GET_CHUNK_SIZE with 1 arg", PROTO_GET_CHUNK_SIZE, x, 1);
	expect_dropped("CLEAR with 1 arg", PROTO_CLEAR, x, 1);
	expect_dropped("QUERY_PREFETCH_STATUS with 0 args", PROTO_QUERY_PREFETCH_STATUS,
		       NULL, 0);
	expect_dropped("UNREGISTER with 2 args", PROTO_UNREGISTER_KV_CACHE, x, 2);
	expect_dropped("STORE with 3 args", PROTO_STORE, fx.store_args, 3);
	struct frame store5[5] = { fx.store_args[0], fx.store_args[1], fx.store_args[2],
				   fx.store_args[3], { fx.m_skip.data, fx.m_skip.len } };
	expect_dropped("STORE with 5 args", PROTO_STORE, store5, 5);
	expect_dropped("RETRIEVE with 4 args", PROTO_RETRIEVE, fx.store_args, 4);
	struct frame lk1[1] = { { fx.m_key.data, fx.m_key.len } };
	expect_dropped("LOOKUP with 1 arg", PROTO_LOOKUP, lk1, 1);
	expect_dropped("REGISTER with 3 args", PROTO_REGISTER_KV_CACHE, fx.reg_args, 3);
	expect_dropped("KS_STATS with 1 arg", PROTO_KS_STATS, x, 1);
	expect_dropped("20 argument frames", PROTO_PING, x, 20);

}

/* Frame-level faults in the arguments (bytes, field types, sizes): no reply. */
static void test_frame_arguments(void)
{
	/* Truncated / trailing bytes in an argument frame. */
	struct frame lk[2] = { { fx.m_key.data, fx.m_key.len - 1 }, { fx.m_tp.data, fx.m_tp.len } };
	expect_dropped("LOOKUP key truncated by 1 byte", PROTO_LOOKUP, lk, 2);
	lk[0].n = fx.m_key.len / 2;
	expect_dropped("LOOKUP key truncated to half", PROTO_LOOKUP, lk, 2);
	uint8_t *trail = malloc(fx.m_key.len + 1);
	REQUIRE(trail);
	memcpy(trail, fx.m_key.data, fx.m_key.len);
	trail[fx.m_key.len] = 0xc0;
	lk[0] = (struct frame){ trail, fx.m_key.len + 1 };
	expect_dropped("LOOKUP key with a trailing byte", PROTO_LOOKUP, lk, 2);
	free(trail);
	static const uint8_t tp_trail[] = { 0x01, 0x01 };
	struct frame lk2[2] = { { fx.m_key.data, fx.m_key.len }, { tp_trail, 2 } };
	expect_dropped("LOOKUP tp_size with a trailing byte", PROTO_LOOKUP, lk2, 2);
	static const uint8_t c1[] = { 0xc1 };
	lk2[1] = (struct frame){ c1, 1 };
	expect_dropped("LOOKUP tp_size is byte c1", PROTO_LOOKUP, lk2, 2);
	struct frame store_trunc[4] = { fx.store_args[0], fx.store_args[1],
					{ fx.m_blocks.data, fx.m_blocks.len - 1 }, fx.store_args[3] };
	expect_dropped("STORE block list truncated", PROTO_STORE, store_trunc, 4);

	/* Wrong field types in the key (LOOKUP and STORE). */
	struct key_spec ks = { .model = MODEL, .world_size = 1, .worker_id = -1,
			       .tokens = fx.tok, .ntokens = 2 * C, .start = 0, .end = 2 * C,
			       .request_id = "r" };
	static const uint8_t v_int[] = { 0x05 }, v_str[] = { 0xa1, 'x' },
			     v_nil[] = { 0xc0 }, v_arr[] = { 0x91, 0x01 },
			     v_float[] = { 0xca, 0x3f, 0x80, 0x00, 0x00 },
			     v_neg[] = { 0xff }, v_map[] = { 0x80 };
	struct {
		const char *what, *field;
		const uint8_t *v;
		size_t n;
	} bad_fields[] = {
		{ "key.model_name is an int", "model_name", v_int, 1 },
		{ "key.model_name is nil", "model_name", v_nil, 1 },
		{ "key.world_size is a str", "world_size", v_str, 2 },
		{ "key.world_size is 0", "world_size", (const uint8_t[]){ 0x00 }, 1 },
		{ "key.worker_id is a str", "worker_id", v_str, 2 },
		{ "key.worker_id is -1", "worker_id", v_neg, 1 },
		{ "key.token_ids is a str", "token_ids", v_str, 2 },
		{ "key.token_ids is a map", "token_ids", v_map, 1 },
		{ "key.start is a float", "start", v_float, 5 },
		{ "key.end is an array", "end", v_arr, 2 },
		{ "key.end is -1", "end", v_neg, 1 },
		{ "key.request_id is an int", "request_id", v_int, 1 },
	};
	for (size_t i = 0; i < sizeof(bad_fields) / sizeof(bad_fields[0]); i++) {
		struct mp m = { 0 };
		struct key_spec k = ks;

		k.bad_field = bad_fields[i].field;
		k.bad = bad_fields[i].v;
		k.bad_len = bad_fields[i].n;
		mp_key(&m, &k);
		struct frame a[2] = { { m.p, m.n }, { fx.m_tp.data, fx.m_tp.len } };
		expect_dropped(bad_fields[i].what, PROTO_LOOKUP, a, 2);
		mp_free(&m);
	}
	{
		struct mp m = { 0 };
		struct key_spec k = ks;

		k.skip = "request_id";
		mp_key(&m, &k);
		struct frame a[2] = { { m.p, m.n }, { fx.m_tp.data, fx.m_tp.len } };
		expect_dropped("key without request_id", PROTO_LOOKUP, a, 2);
		mp_free(&m);
		/* a map key that is not a str */
		m = (struct mp){ 0 };
		mp_map(&m, 1);
		mp_uint(&m, 1);
		mp_uint(&m, 2);
		a[0] = (struct frame){ m.p, m.n };
		expect_dropped("key map with an int key", PROTO_LOOKUP, a, 2);
		mp_free(&m);
		m = (struct mp){ 0 };
		mp_arr(&m, 3);
		mp_str(&m, MODEL);
		mp_uint(&m, 1);
		mp_byte(&m, 0xc0);
		a[0] = (struct frame){ m.p, m.n };
		expect_dropped("key as a 3-field array", PROTO_LOOKUP, a, 2);
		mp_free(&m);
		a[0] = (struct frame){ v_int, 1 };
		expect_dropped("key is an int", PROTO_LOOKUP, a, 2);
		/* STORE with a wrong key field type */
		k = ks;
		k.worker_id = 0;
		k.bad_field = "token_ids";
		k.bad = v_str;
		k.bad_len = 2;
		m = (struct mp){ 0 };
		mp_key(&m, &k);
		struct frame sa[4] = { { m.p, m.n }, fx.store_args[1], fx.store_args[2],
				       fx.store_args[3] };
		expect_dropped("STORE key.token_ids is a str", PROTO_STORE, sa, 4);
		mp_free(&m);
		/* instance_id a str, block ids negative, event an int */
		sa[0] = fx.store_args[0];
		sa[1] = (struct frame){ v_str, 2 };
		expect_dropped("STORE instance_id is a str", PROTO_STORE, sa, 4);
		sa[1] = fx.store_args[1];
		static const uint8_t neg_blocks[] = { 0x92, 0x00, 0xff };
		sa[2] = (struct frame){ neg_blocks, 3 };
		expect_dropped("STORE block id -1", PROTO_STORE, sa, 4);
		sa[2] = fx.store_args[2];
		sa[3] = (struct frame){ v_int, 1 };
		expect_dropped("STORE event is an int", PROTO_STORE, sa, 4);
		static const uint8_t ev5[] = { 0xc4, 5, 1, 2, 3, 4, 5 };
		sa[3] = (struct frame){ ev5, 7 };
		expect_dropped("STORE event of 5 bytes", PROTO_STORE, sa, 4);
		/* §5.3: a non-empty handle on a host registration is a frame fault */
		sa[3] = (struct frame){ fx.m_ev64.data, fx.m_ev64.len };
		expect_dropped("STORE 64-byte event on a host instance", PROTO_STORE, sa,
			       4);
		struct frame ra[5] = { sa[0], sa[1], sa[2], sa[3],
				       { fx.m_skip.data, fx.m_skip.len } };
		expect_dropped("RETRIEVE 64-byte event on a host instance",
			       PROTO_RETRIEVE, ra, 5);
		ra[3] = fx.store_args[3];
		ra[4] = (struct frame){ v_neg, 1 };
		expect_dropped("RETRIEVE skip_first_n_tokens -1", PROTO_RETRIEVE, ra, 5);
	}

	/* Tokens outside [0, 2^32). */
	static const uint8_t t_m1[] = { 0x92, 0x01, 0xff };
	static const uint8_t t_2p32[] = { 0x92, 0x01, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0 };
	static const uint8_t t_max[] = { 0x92, 0x01, 0xce, 0xff, 0xff, 0xff, 0xff };
	struct {
		const char *what;
		const uint8_t *v;
		size_t n;
	} bad_tok[] = { { "token -1", t_m1, sizeof(t_m1) },
			{ "token 2^32", t_2p32, sizeof(t_2p32) } };
	for (size_t i = 0; i < 2; i++) {
		struct mp m = { 0 };
		struct key_spec k = ks;

		k.bad_field = "token_ids";
		k.bad = bad_tok[i].v;
		k.bad_len = bad_tok[i].n;
		mp_key(&m, &k);
		struct frame a[2] = { { m.p, m.n }, { fx.m_tp.data, fx.m_tp.len } };
		expect_dropped(bad_tok[i].what, PROTO_LOOKUP, a, 2);
		mp_free(&m);
	}
	{
		/* 2^32 - 1 is a valid token: the server must answer (a job id). */
		struct mp m = { 0 };
		struct key_spec k = ks;

		k.bad_field = "token_ids";
		k.bad = t_max;
		k.bad_len = sizeof(t_max);
		mp_key(&m, &k);
		struct frame a[2] = { { m.p, m.n }, { fx.m_tp.data, fx.m_tp.len } };
		fx.resp = NULL;
		CHECK(raw_call(&R, PROTO_LOOKUP, a, 2, &fx.resp, &fx.rlen, 5000));
		CHECK(fx.resp && fx.rlen >= 1 && fx.resp[0] <= 0x7f);	/* an int job id */
		free(fx.resp);
		fx.resp = NULL;
		mp_free(&m);
	}

	/* A real token list one over PROTO_MAX_TOKENS (about 4 MiB). */
	{
		size_t n = (size_t)PROTO_MAX_TOKENS + 1;
		struct mp tl = { 0 }, m = { 0 };
		struct key_spec k = ks;

		mp_arr(&tl, (uint32_t)n);
		for (size_t i = 0; i < n; i++)
			mp_byte(&tl, (uint8_t)(i & 0x7f));
		k.bad_field = "token_ids";
		k.bad = tl.p;
		k.bad_len = tl.n;
		mp_key(&m, &k);
		struct frame a[2] = { { m.p, m.n }, { fx.m_tp.data, fx.m_tp.len } };
		expect_dropped("token list of PROTO_MAX_TOKENS+1", PROTO_LOOKUP, a, 2);
		/* and a block list over PROTO_MAX_BLOCKS in a STORE */
		struct frame sa[4] = { fx.store_args[0], fx.store_args[1], { tl.p, tl.n },
				       fx.store_args[3] };
		expect_dropped("block list of PROTO_MAX_BLOCKS+1", PROTO_STORE, sa, 4);
		mp_free(&m);
		mp_free(&tl);
	}
	/* A 5-byte array header claiming 2^32-1 entries. */
	static const uint8_t huge_hdr[] = { 0xdd, 0xff, 0xff, 0xff, 0xff };
	struct frame hh[2] = { { huge_hdr, 5 }, { fx.m_tp.data, fx.m_tp.len } };
	expect_dropped("array header of 2^32-1 entries", PROTO_LOOKUP, hh, 2);

}

/* REGISTER with bad descriptors (decoded as frame-level faults): no reply. */
static void test_register_descriptors(void)
{
	static const uint8_t v_str[] = { 0xa1, 'x' };	/* a str where an int belongs */
	struct proto_kv_desc bad[NL];
	struct proto_msg bm;
	struct frame ra[4] = { { fx.m_inst.data, fx.m_inst.len }, { NULL, 0 },
			       { fx.m_model.data, fx.m_model.len }, { fx.m_ws.data, fx.m_ws.len } };
	int64_t reg_inst = 5;
	struct proto_msg m_inst5 = enc_int(reg_inst);
	ra[0] = (struct frame){ m_inst5.data, m_inst5.len };

	memcpy(bad, fx.descs, sizeof(bad));
	bad[0].nbytes = LAYER_BYTES - 1;
	bad[1].nbytes = 2 * LAYER_BYTES - 1;
	bm = enc_descs(bad, NL);
	ra[1] = (struct frame){ bm.data, bm.len };
	expect_dropped("REGISTER nbytes below the extent", PROTO_REGISTER_KV_CACHE, ra, 4);
	proto_msg_free(&bm);

	memcpy(bad, fx.descs, sizeof(bad));
	for (int l = 0; l < NL; l++)
		bad[l].layout.stride[4] = 2;
	bm = enc_descs(bad, NL);
	ra[1] = (struct frame){ bm.data, bm.len };
	expect_dropped("REGISTER last stride 2", PROTO_REGISTER_KV_CACHE, ra, 4);
	proto_msg_free(&bm);

	memcpy(bad, fx.descs, sizeof(bad));
	fill_desc(&bad[1], fx.buf.path, HS / 2, LAYER_BYTES);	/* shape differs */
	bad[1].nbytes = NL * LAYER_BYTES;
	bm = enc_descs(bad, NL);
	ra[1] = (struct frame){ bm.data, bm.len };
	expect_dropped("REGISTER layers with different shapes", PROTO_REGISTER_KV_CACHE,
		       ra, 4);
	proto_msg_free(&bm);

	memcpy(bad, fx.descs, sizeof(bad));
	bad[1].layout.dtype = KV_DTYPE_FLOAT16;
	bm = enc_descs(bad, NL);
	ra[1] = (struct frame){ bm.data, bm.len };
	expect_dropped("REGISTER layers with different dtypes", PROTO_REGISTER_KV_CACHE,
		       ra, 4);
	proto_msg_free(&bm);

	/* LMCache's CudaIPCWrapper: [ext 1 <pickle>] (protocol.md §5.1). */
	static const uint8_t pickle[] = { 0x91, 0xc7, 12, 0x01, 0x80, 0x04, 0x95, 0x05,
					  0, 0, 0, 0, 0, 0, 0, 0x2e };
	ra[1] = (struct frame){ pickle, sizeof(pickle) };
	expect_dropped("REGISTER LMCache ext-1 pickle element", PROTO_REGISTER_KV_CACHE,
		       ra, 4);
	static const uint8_t no_layers[] = { 0x90 };
	ra[1] = (struct frame){ no_layers, 1 };
	expect_dropped("REGISTER with no layers", PROTO_REGISTER_KV_CACHE, ra, 4);
	ra[1] = (struct frame){ fx.m_descs.data, fx.m_descs.len };
	ra[3] = (struct frame){ v_str, 2 };
	expect_dropped("REGISTER world_size is a str", PROTO_REGISTER_KV_CACHE, ra, 4);
	proto_msg_free(&m_inst5);
}

/* Semantic failures: exact replies. */
static void test_semantic_errors(void)
{
	uint8_t *snap;

	struct proto_msg m2 = enc_int(2), m3 = enc_int(3);
	struct proto_kv_desc dd[NL];
	struct proto_msg dm;

	/* REGISTER of a nonexistent path: nil, and STOREs to it fail. */
	memcpy(dd, fx.descs, sizeof(dd));
	for (int l = 0; l < NL; l++)
		snprintf(dd[l].path, sizeof(dd[l].path), "/nonexistent-kvstash-dir/buf");
	dm = enc_descs(dd, NL);
	struct frame ra[4] = { { m2.data, m2.len }, { dm.data, dm.len },
			       { fx.m_model.data, fx.m_model.len }, { fx.m_ws.data, fx.m_ws.len } };
	expect_reply("REGISTER nonexistent path", PROTO_REGISTER_KV_CACHE, ra, 4, NIL, 1,
		     SEMANTIC);
	proto_msg_free(&dm);
	for (int l = 0; l < NL; l++)
		snprintf(dd[l].path, sizeof(dd[l].path), "/kvstash-no-such-shm-object");
	dm = enc_descs(dd, NL);
	ra[1] = (struct frame){ dm.data, dm.len };
	expect_reply("REGISTER nonexistent shm name", PROTO_REGISTER_KV_CACHE, ra, 4, NIL,
		     1, SEMANTIC);
	proto_msg_free(&dm);
	struct frame sa[4] = { fx.store_args[0], { m2.data, m2.len }, fx.store_args[2],
			       fx.store_args[3] };
	expect_reply("STORE to the refused instance 2", PROTO_STORE, sa, 4, XFER_FALSE, 4,
		     SEMANTIC);

	/* Layout mismatch: objects 8x the pool's slot (set by instance 1). */
	size_t big_layer = LAYER_BYTES * 8;
	struct kvstash_host_buffer big = { .fd = -1 };
	REQUIRE(kvstash_host_buffer_create(&big, NL * big_layer, "badinput-big") == 0);
	for (int l = 0; l < NL; l++) {
		fill_desc(&dd[l], big.path, HS * 8, (uint64_t)l * big_layer);
		dd[l].nbytes = big.bytes;
	}
	dm = enc_descs(dd, NL);
	ra[0] = (struct frame){ m3.data, m3.len };
	ra[1] = (struct frame){ dm.data, dm.len };
	expect_reply("REGISTER layout bigger than the pool slot", PROTO_REGISTER_KV_CACHE,
		     ra, 4, NIL, 1, SEMANTIC);
	proto_msg_free(&dm);
	sa[1] = (struct frame){ m3.data, m3.len };
	expect_reply("STORE to the refused instance 3", PROTO_STORE, sa, 4, XFER_FALSE, 4,
		     SEMANTIC);
	kvstash_host_buffer_destroy(&big);
	proto_msg_free(&m2);
	proto_msg_free(&m3);

	/* STORE / RETRIEVE validation against instance 1. */
	int64_t oob[2] = { 0, NB };
	struct proto_msg b_oob = enc_blocks(oob, 2);
	struct frame s_oob[4] = { fx.store_args[0], fx.store_args[1], { b_oob.data, b_oob.len },
				  fx.store_args[3] };
	expect_reply("STORE block id == NB", PROTO_STORE, s_oob, 4, XFER_FALSE, 4,
		     SEMANTIC);
	struct frame r_oob[5] = { s_oob[0], s_oob[1], s_oob[2], s_oob[3],
				  { fx.m_skip.data, fx.m_skip.len } };
	expect_reply("RETRIEVE block id == NB", PROTO_RETRIEVE, r_oob, 5, XFER_FALSE, 4,
		     SEMANTIC);
	proto_msg_free(&b_oob);
	int64_t one_blk[1] = { 0 };
	struct proto_msg b_one = enc_blocks(one_blk, 1);
	struct frame s_few[4] = { fx.store_args[0], fx.store_args[1], { b_one.data, b_one.len },
				  fx.store_args[3] };
	expect_reply("STORE with too few block ids", PROTO_STORE, s_few, 4, XFER_FALSE, 4,
		     SEMANTIC);
	proto_msg_free(&b_one);

	struct {
		const char *what;
		const char *model;
		uint32_t world;
		int32_t worker;
		size_t ntok;
		int64_t start, end;
	} bad_keys[] = {
		{ "STORE range [0, C/2) not chunk aligned", MODEL, 1, 0, 2 * C, 0, C / 2 },
		{ "STORE range [C/2, 2C) not chunk aligned", MODEL, 1, 0, 2 * C, C / 2,
		  2 * C },
		{ "STORE range beyond the tokens", MODEL, 1, 0, 2 * C, 0, 3 * C },
		{ "STORE start > end", MODEL, 1, 0, 2 * C, 2 * C, C },
		{ "STORE worker_id nil", MODEL, 1, -1, 2 * C, 0, 2 * C },
		{ "STORE world_size 2 (registered 1)", MODEL, 2, 0, 2 * C, 0, 2 * C },
		{ "STORE worker_id 1 >= world_size 1", MODEL, 1, 1, 2 * C, 0, 2 * C },
		{ "STORE model differs", "other-model", 1, 0, 2 * C, 0, 2 * C },
	};
	for (size_t i = 0; i < sizeof(bad_keys) / sizeof(bad_keys[0]); i++) {
		struct proto_msg k = enc_key(bad_keys[i].model, bad_keys[i].world,
					     bad_keys[i].worker, fx.tok, bad_keys[i].ntok,
					     bad_keys[i].start, bad_keys[i].end);
		struct frame a[4] = { { k.data, k.len }, fx.store_args[1], fx.store_args[2],
				      fx.store_args[3] };
		expect_reply(bad_keys[i].what, PROTO_STORE, a, 4, XFER_FALSE, 4, SEMANTIC);
		proto_msg_free(&k);
	}
	{
		struct proto_msg k = enc_key(MODEL, 1, -1, fx.tok, 2 * C, 0, 2 * C);
		struct frame a[5] = { { k.data, k.len }, fx.store_args[1], fx.store_args[2],
				      fx.store_args[3], { fx.m_skip.data, fx.m_skip.len } };
		expect_reply("RETRIEVE worker_id nil", PROTO_RETRIEVE, a, 5, XFER_FALSE, 4,
			     SEMANTIC);
		proto_msg_free(&k);
	}

	/* RETRIEVE of a missing chunk: false, and no byte of the buffer written.
	 * Chunk 0 of this key is cached (the setup STORE), chunk 1 is not. */
	uint32_t tok2[2 * C];
	memcpy(tok2, fx.tok, sizeof(tok2));
	for (size_t i = C; i < 2 * C; i++)
		tok2[i] = 5000000 + (uint32_t)i;
	int64_t dst[2] = { 4, 5 };
	struct proto_msg k = enc_key(MODEL, 1, 0, tok2, 2 * C, 0, 2 * C),
			 b_dst = enc_blocks(dst, 2);
	struct frame a[5] = { { k.data, k.len }, fx.store_args[1], { b_dst.data, b_dst.len },
			      fx.store_args[3], { fx.m_skip.data, fx.m_skip.len } };
	snap = malloc(fx.buf.bytes);
	REQUIRE(snap);
	t_fill((uint8_t *)fx.buf.ptr + blk_off(0, 0, 2), BLOCK_BYTES * 6, 777);
	memcpy(snap, fx.buf.ptr, fx.buf.bytes);
	expect_reply("RETRIEVE with chunk 1 missing", PROTO_RETRIEVE, a, 5, XFER_FALSE, 4,
		     MISS);
	CHECK(!memcmp(snap, fx.buf.ptr, fx.buf.bytes));
	proto_msg_free(&k);
	k = enc_key(MODEL, 1, 0, tok2 + C, C, 0, C);	/* one unknown chunk */
	a[0] = (struct frame){ k.data, k.len };
	expect_reply("RETRIEVE of an unknown chunk", PROTO_RETRIEVE, a, 5, XFER_FALSE, 4,
		     MISS);
	CHECK(!memcmp(snap, fx.buf.ptr, fx.buf.bytes));
	proto_msg_free(&k);
	proto_msg_free(&b_dst);
	free(snap);
}

/* A frame over --max-message-mb: ZMQ drops that connection. */
static void test_oversize_frame(void)
{
	struct raw big;
	size_t n = ((size_t)MAX_MESSAGE_MB + 2) << 20;
	uint8_t *p = calloc(1, n);
	uint8_t u0 = 0, t_ping = 0x0c;
	struct reply rp;

	REQUIRE(p);
	/* A bin of n-5 bytes: were it delivered, PING with a bin argument
	 * would be a frame fault and show in the counter checked below. */
	p[0] = 0xc6;
	p[1] = (uint8_t)((n - 5) >> 24), p[2] = (uint8_t)((n - 5) >> 16);
	p[3] = (uint8_t)((n - 5) >> 8), p[4] = (uint8_t)(n - 5);
	raw_open(&big, fx.d->endpoint);
	struct frame f[3] = { { &u0, 1 }, { &t_ping, 1 }, { p, n } };
	raw_send(&big, f, 3);
	CHECK(!raw_recv(&big, 500, &rp));
	raw_close(&big);
	free(p);
}

/*
 * The current dialect: a second connection, latched by its first telling
 * request (GET_EXPERIMENTAL), with its own registration.
 */
static void test_current_dialect(void)
{
	struct raw march = R;
	static const uint8_t OP_EXPERIMENTAL = 0x20, OP_REGISTER = 0x01, OP_STORE = 0x06,
			     OP_RETRIEVE = 0x07, OP_LOOKUP = 0x08;
	static const uint8_t EMPTY_LIST[] = { 0x90 }, NO_SALT[] = { 0xa0 },
			     NIL_MASK[] = { 0xc0 };
	struct counters before, after;

	raw_open(&R, fx.d->endpoint);
	{
		struct proto_msg u = { 0 };
		struct frame f[24];
		struct reply rp;
		size_t n = op_frames(f, &u, &OP_EXPERIMENTAL, 1, NULL, 0);

		raw_send(&R, f, n);
		CHECK(raw_recv(&R, 5000, &rp));
		CHECK(rp.nframes == 3 && rp.len[2] == 1 && !memcmp(rp.f[2], EMPTY_LIST, 1));
		reply_free(&rp);
		proto_msg_free(&u);
	}
	/* REGISTER, 7 frames: one group of both layers (same buffer, instance 2) */
	struct proto_msg m_inst2 = enc_int(2), m_et = { 0 };
	REQUIRE(proto_encode_str(&m_et, "vllm") == 0);
	static const uint8_t HINTS[] = { 0x80 };
	static const uint8_t GROUPS[] = {
		0x91, 0x82, 0xaf, 'e', 'n', 'g', 'i', 'n', 'e', '_', 'g', 'r', 'o', 'u', 'p',
		'_', 'i', 'd', 0x00, 0xad, 'l', 'a', 'y', 'e', 'r', '_', 'i', 'n', 'd', 'i',
		'c', 'e', 's', 0x92, 0x00, 0x01,
	};
	struct frame reg7[7] = { { m_inst2.data, m_inst2.len }, { fx.m_descs.data, fx.m_descs.len },
				 { fx.m_model.data, fx.m_model.len }, { fx.m_ws.data, fx.m_ws.len },
				 { m_et.data, m_et.len }, { HINTS, 1 },
				 { GROUPS, sizeof(GROUPS) } };
	{
		struct proto_msg u = { 0 };
		struct frame f[24];
		struct reply rp;
		size_t n = op_frames(f, &u, &OP_REGISTER, 1, reg7, 7);

		raw_send(&R, f, n);
		CHECK(raw_recv(&R, 5000, &rp));
		CHECK_EQ(rp.nframes, 2);	/* None: no response frame */
		reply_free(&rp);
		proto_msg_free(&u);
		CHECK(!*last_error(&R));
	}
	struct proto_msg k_ok = enc_key_current(fx.tok, 2 * C, 0, 2 * C, 0, NO_SALT, 1, 1,
						NIL_MASK, 1);
	static const uint8_t SLASH_SALT[] = { 0xa3, 'a', '/', 'b' };
	struct proto_msg k_slash = enc_key_current(fx.tok, 2 * C, 0, 2 * C, 0, SLASH_SALT,
						   sizeof(SLASH_SALT), 1, NIL_MASK, 1);
	static const uint8_t MASK2[] = { 0x92, 0x91, 0xc2, 0x91, 0xc2 };
	struct proto_msg k_mask2 = enc_key_current(fx.tok, 2 * C, 0, 2 * C, 0, NO_SALT, 1, 1,
						   MASK2, sizeof(MASK2));
	struct proto_msg k_lookup0 = enc_key_current(fx.tok, 2 * C, 0, 2 * C, -1, NO_SALT, 1,
						     0, NIL_MASK, 1);
	static const uint8_t BLOCKS1[] = { 0x91, 0x92, 0x02, 0x03 };
	static const uint8_t BLOCKS2[] = { 0x92, 0x92, 0x02, 0x03, 0x92, 0x04, 0x05 };
	uint8_t sem[2 + 81];
	sem[0] = 0xc4, sem[1] = 81;
	memset(sem + 2, 0x5a, 81);
	sem[2] = 2;	/* version 2: unknown */
	struct frame a_slash[4] = { { k_slash.data, k_slash.len }, { m_inst2.data, m_inst2.len },
				    { BLOCKS1, sizeof(BLOCKS1) }, { fx.m_ev.data, fx.m_ev.len } };
	expect_silent("current: cache_salt with '/'", &OP_STORE, 1, a_slash, 4, FRAME_FAULT);
	struct frame a_sem[5] = { { k_ok.data, k_ok.len }, { m_inst2.data, m_inst2.len },
				  { BLOCKS1, sizeof(BLOCKS1) }, { sem, sizeof(sem) },
				  { fx.m_skip.data, fx.m_skip.len } };
	expect_silent("current: 81-byte handle, version 2", &OP_RETRIEVE, 1, a_sem, 5,
		      FRAME_FAULT);
	static const uint8_t OP_99 = 99;
	expect_silent("current: unknown op id 99", &OP_99, 1, NULL, 0, FRAME_FAULT);
	uint8_t big_op[2 + 65];
	big_op[0] = 0xd9, big_op[1] = 65;
	memset(big_op + 2, 'x', 65);
	expect_silent("current: 65-byte string op", big_op, sizeof(big_op), NULL, 0,
		      FRAME_FAULT);
	static const uint8_t NAME_NUL[] = { 0xa3, 'a', 0x00, 'b' };
	expect_silent("current: string op with a NUL", NAME_NUL, sizeof(NAME_NUL), NULL, 0,
		      FRAME_FAULT);
	struct frame a_look0[2] = { { k_lookup0.data, k_lookup0.len }, { fx.m_tp.data, fx.m_tp.len } };
	expect_silent("current: LOOKUP with num_kv_readers 0", &OP_LOOKUP, 1, a_look0, 2,
		      SEMANTIC);

	/* semantic failures get [b"", false], never silence (STORE has no timeout) */
	static const uint8_t EV64[] = { 0xc4, 64 };
	uint8_t ev_frame[2 + 64];
	memcpy(ev_frame, EV64, 2);
	memset(ev_frame + 2, 0xab, 64);
	struct frame cases[3][4] = {
		{ { k_ok.data, k_ok.len }, { m_inst2.data, m_inst2.len },
		  { BLOCKS2, sizeof(BLOCKS2) }, { fx.m_ev.data, fx.m_ev.len } },
		{ { k_mask2.data, k_mask2.len }, { m_inst2.data, m_inst2.len },
		  { BLOCKS1, sizeof(BLOCKS1) }, { fx.m_ev.data, fx.m_ev.len } },
		{ { k_ok.data, k_ok.len }, { m_inst2.data, m_inst2.len },
		  { BLOCKS1, sizeof(BLOCKS1) }, { ev_frame, sizeof(ev_frame) } },
	};
	static const char *const names[3] = {
		"current: 2 block lists, 1 group registered",
		"current: null_chunk_mask of 2 groups, 1 registered",
		"current: 64-byte event on a host registration",
	};
	for (int c = 0; c < 3; c++) {
		struct proto_msg u = { 0 };
		struct frame f[24];
		struct reply rp;
		size_t n = op_frames(f, &u, &OP_STORE, 1, cases[c], 4);

		stats(&R, &before);
		raw_send(&R, f, n);
		CHECK(raw_recv(&R, 5000, &rp));
		if (rp.nframes != 3 || rp.len[2] != 4 || memcmp(rp.f[2], XFER_FALSE, 4))
			fprintf(stderr, "FAIL case '%s': not [b\"\", false]\n", names[c]);
		CHECK(rp.nframes == 3 && rp.len[2] == 4 && !memcmp(rp.f[2], XFER_FALSE, 4));
		reply_free(&rp);
		proto_msg_free(&u);
		check_case(names[c], &before, SEMANTIC);
	}
	/* an unknown string op: answered None (no response frame), counted, not a fault */
	{
		static const uint8_t NAME[] = { 0xb7, 's', 't', 'o', 'r', 'e', '_', 'w', 'i', 't',
						'h', '_', 'c', 'h', 'u', 'n', 'k', '_', 'e', 'v',
						'e', 'n', 't', 's' };
		struct proto_msg u = { 0 };
		struct frame f[24];
		struct reply rp;
		size_t n = op_frames(f, &u, NAME, sizeof(NAME), NULL, 0);
		stats(&R, &before);
		raw_send(&R, f, n);
		CHECK(raw_recv(&R, 5000, &rp));
		CHECK_EQ(rp.nframes, 2);
		CHECK(rp.nframes >= 2 && rp.len[1] == sizeof(NAME) &&
		      !memcmp(rp.f[1], NAME, sizeof(NAME)));	/* the op echoed */
		reply_free(&rp);
		proto_msg_free(&u);
		stats(&R, &after);
		CHECK_EQ(after.frame_faults, before.frame_faults);
		CHECK_EQ(after.semantic_errors, before.semantic_errors);
		CHECK_EQ(after.unsupported_ops, before.unsupported_ops + 1);
		/* this connection speaks the current dialect, R's the March one */
		CHECK(after.connections_current >= 1 && after.connections_march >= 1);
		CHECK(strstr(last_error(&R), "store_with_chunk_events") != NULL);
	}
	/* after all that, a good STORE still works on this connection */
	{
		struct frame good[4] = { { k_ok.data, k_ok.len }, { m_inst2.data, m_inst2.len },
					 { BLOCKS1, sizeof(BLOCKS1) }, { fx.m_ev.data, fx.m_ev.len } };
		struct proto_msg u = { 0 };
		struct frame f[24];
		struct reply rp;
		size_t n = op_frames(f, &u, &OP_STORE, 1, good, 4);

		raw_send(&R, f, n);
		CHECK(raw_recv(&R, 5000, &rp));
		CHECK(rp.nframes == 3 && rp.len[2] == 4 && !memcmp(rp.f[2], XFER_TRUE, 4));
		reply_free(&rp);
		proto_msg_free(&u);
	}
	proto_msg_free(&k_ok);
	proto_msg_free(&k_slash);
	proto_msg_free(&k_mask2);
	proto_msg_free(&k_lookup0);
	proto_msg_free(&m_inst2);
	proto_msg_free(&m_et);
	raw_close(&R);
	R = march;
}

/* Afterwards: PING, the stored chunk, the counters. */
static void test_afterwards(void)
{
	struct counters s1;

	static const uint8_t TRUE_[] = { 0xc3 };
	uint8_t *r = NULL;
	size_t len = 0;

	CHECK(raw_call(&R, PROTO_PING, NULL, 0, &r, &len, 5000));
	CHECK(r && len == 1 && !memcmp(r, TRUE_, 1));
	free(r);
	r = NULL;
	/* A second connection is served too. */
	kvstash_client *cl = NULL;
	REQUIRE(kvstash_connect(fx.d->endpoint, 5000, &cl) == 0);
	CHECK_EQ(kvstash_ping(cl, NULL), 0);

	/* RETRIEVE the setup chunks into blocks 6, 7 and compare with 0, 1. */
	int64_t dst[2] = { 6, 7 };
	struct proto_msg b_dst = enc_blocks(dst, 2);
	struct frame a[5] = { fx.store_args[0], fx.store_args[1], { b_dst.data, b_dst.len },
			      fx.store_args[3], { fx.m_skip.data, fx.m_skip.len } };
	for (int l = 0; l < NL; l++)
		for (int p = 0; p < 2; p++)
			memset((uint8_t *)fx.buf.ptr + blk_off(l, p, 6), 0, 2 * BLOCK_BYTES);
	CHECK(raw_call(&R, PROTO_RETRIEVE, a, 5, &r, &len, 5000));
	CHECK(r && len == 4 && !memcmp(r, XFER_TRUE, 4));
	free(r);
	proto_msg_free(&b_dst);
	for (int l = 0; l < NL; l++)
		for (int p = 0; p < 2; p++)
			CHECK(!memcmp((uint8_t *)fx.buf.ptr + blk_off(l, p, 6),
				      fx.want_blocks + blk_off(l, p, 0), 2 * BLOCK_BYTES));

	stats(&R, &s1);
	CHECK_EQ(s1.frame_faults, want_faults);
	CHECK_EQ(s1.semantic_errors, want_semantic);
	CHECK_EQ(s1.retrieve_miss, want_miss);
	CHECK_EQ(s1.retrieve_miss - fx.s0.retrieve_miss, 2);
	CHECK_EQ(s1.retrieve_ok, fx.s0.retrieve_ok + 1);
	CHECK_EQ(s1.pins, 0);
	CHECK_EQ(s1.objects, 2);
	CHECK_EQ(s1.objects_writing, 0);
	CHECK_EQ(s1.store_chunks_stored, 2);
	CHECK_EQ(s1.slots_free + s1.objects, s1.slots_total);
	/* The last error was read: a fresh read gives "". */
	CHECK(!*last_error(&R));
	kvstash_close(cl);
	fprintf(stderr, "%d cases: frame_faults +%llu, semantic_errors +%llu, "
		"retrieve_miss +%llu\n", ncases,
		(unsigned long long)(s1.frame_faults - fx.s0.frame_faults),
		(unsigned long long)(s1.semantic_errors - fx.s0.semantic_errors),
		(unsigned long long)(s1.retrieve_miss - fx.s0.retrieve_miss));
}

/* Frees the fixture; the daemon must exit cleanly. */
static void teardown(void)
{
	int st;

	raw_close(&R);
	proto_msg_free(&fx.m_key);
	proto_msg_free(&fx.m_inst);
	proto_msg_free(&fx.m_blocks);
	proto_msg_free(&fx.m_ev);
	proto_msg_free(&fx.m_ev64);
	proto_msg_free(&fx.m_skip);
	proto_msg_free(&fx.m_tp);
	proto_msg_free(&fx.m_descs);
	proto_msg_free(&fx.m_model);
	proto_msg_free(&fx.m_ws);
	free(fx.want_blocks);
	kvstash_host_buffer_destroy(&fx.buf);
	st = t_daemon_stop(fx.d);
	the_daemon = NULL;
	CHECK_EQ(st, 0);	/* a clean exit (and, under ASan, no leak report) */
}

/*
 * The sections run in order on one daemon and socket R; every case adds its
 * counter move to want_*, which test_afterwards checks against the server.
 */
int main(void)
{
	setup();
	test_frame_envelope();
	test_frame_arguments();
	test_register_descriptors();
	test_semantic_errors();
	test_oversize_frame();
	test_current_dialect();
	test_afterwards();
	teardown();
	return t_result("server_badinput");
}
