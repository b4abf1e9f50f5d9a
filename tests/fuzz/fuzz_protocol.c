/*
 * fuzz_protocol.c - libFuzzer target for the wire codec (src/protocol.c).
 *
 * Input format (what tests/fuzz/make_corpus.py writes):
 *   byte 0        flags: low 3 bits = frame count - 1 (1..8 frames); bits
 *                 3-4 the dialect decoded in (0 march, 1 auto, 2 current,
 *                 3 march); bit 7 shrinks the error buffer to 7 bytes
 *                 (reason truncation)
 *   then per frame  2-byte little-endian length, then that many bytes
 *                 (clipped to what is left; missing frames are empty)
 * Frame 0 is the type frame, the rest are argument frames, as the server
 * sees them after the ROUTER identity and the uid. Every frame is also fed
 * to proto_decode_uid/proto_decode_reply.
 *
 * Each frame is copied into its own exact-size heap buffer so ASan flags
 * any read past its end. Beyond "no crash", decoded values are checked for
 * internal consistency and re-encoded with the proto_encode_* functions and
 * decoded again: the second decode must succeed and give the same values
 * (encoder and decoder agree on everything the decoder can produce). Every
 * frame is also decoded as a key both ways (proto_decode_key_frame: token
 * ids read from the bytes, and the object-tree reference), which must agree.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_FRAMES 8

#define ASSERT(c)                         \
	do {                              \
		if (!(c))                 \
			__builtin_trap(); \
	} while (0)

static struct proto_buf own(const void *p, size_t n)
{
	uint8_t *b = malloc(n ? n : 1);

	ASSERT(b);
	if (n)
		memcpy(b, p, n);
	return (struct proto_buf){ b, n };
}

static struct proto_buf own_msg(int rc, struct proto_msg *m)
{
	struct proto_buf b;

	ASSERT(rc == 0);
	b = own(m->data, m->len);
	proto_msg_free(m);
	return b;
}

static void check_key(const struct proto_key *k)
{
	ASSERT(k->model_len <= KS_MODEL_MAX && strlen(k->model) == k->model_len);
	ASSERT(k->request_id_len <= PROTO_REQUEST_ID_MAX &&
	       strlen(k->request_id) == k->request_id_len);
	ASSERT(k->world_size >= 1 && k->worker_id >= -1);
	ASSERT(k->ntokens <= PROTO_MAX_TOKENS && (!k->ntokens || k->token_ids));
	ASSERT(k->start >= 0 && k->end >= 0);
}

static void same_key(const struct proto_key *a, const struct proto_key *b)
{
	ASSERT(a->model_len == b->model_len && !memcmp(a->model, b->model, a->model_len + 1));
	ASSERT(a->world_size == b->world_size && a->worker_id == b->worker_id);
	ASSERT(a->ntokens == b->ntokens);
	ASSERT(!a->ntokens || !memcmp(a->token_ids, b->token_ids, a->ntokens * sizeof(uint32_t)));
	ASSERT(a->start == b->start && a->end == b->end);
	ASSERT(a->request_id_len == b->request_id_len &&
	       !memcmp(a->request_id, b->request_id, a->request_id_len + 1));
}

static void same_desc(const struct proto_kv_desc *a, const struct proto_kv_desc *b)
{
	ASSERT(a->kind == b->kind && a->offset == b->offset && a->nbytes == b->nbytes);
	ASSERT(a->layout.kind == b->layout.kind && a->layout.dtype == b->layout.dtype);
	ASSERT(a->layout.elem_bytes == b->layout.elem_bytes && a->layout.ndim == b->layout.ndim);
	ASSERT(!memcmp(a->layout.shape, b->layout.shape, a->layout.ndim * sizeof(int64_t)));
	ASSERT(!memcmp(a->layout.stride, b->layout.stride, a->layout.ndim * sizeof(int64_t)));
	if (a->kind == PROTO_KV_CUDA_IPC) {
		ASSERT(!memcmp(a->mem_handle, b->mem_handle, PROTO_MEM_HANDLE_LEN));
		ASSERT(!strcmp(a->device_uuid, b->device_uuid));
	} else {
		ASSERT(a->path[0] == '/' && !strcmp(a->path, b->path));
	}
}

static void free_bufs(struct proto_buf *f, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free((void *)f[i].data);
}

/* Re-encode a decoded request the way a client would, decode it again, compare. */
static void round_trip(const struct proto_request *r)
{
	struct proto_buf f[6];
	struct proto_request r2;
	struct proto_msg m;
	char err[256];
	size_t n = 0;
	int rc;

	f[n++] = own_msg(proto_encode_int(&m, r->type), &m);
	switch (r->type) {
	case PROTO_REGISTER_KV_CACHE:
		f[n++] = own_msg(proto_encode_int(&m, r->instance_id), &m);
		f[n++] = own_msg(proto_encode_kv_descs(&m, r->layers, r->nlayers), &m);
		f[n++] = own_msg(proto_encode_str(&m, r->model), &m);
		f[n++] = own_msg(proto_encode_int(&m, r->world_size), &m);
		break;
	case PROTO_STORE:
	case PROTO_RETRIEVE:
		if (r->skip_first_n_tokens > INT64_MAX)
			goto out;	/* proto_encode_int is signed */
		f[n++] = own_msg(proto_encode_key(&m, &r->key), &m);
		f[n++] = own_msg(proto_encode_int(&m, r->instance_id), &m);
		f[n++] = own_msg(proto_encode_int_list(&m, r->block_ids, r->nblocks), &m);
		f[n++] = own_msg(proto_encode_bin(&m, r->event, r->event_len), &m);
		if (r->type == PROTO_RETRIEVE)
			f[n++] = own_msg(proto_encode_int(&m, (int64_t)r->skip_first_n_tokens), &m);
		break;
	case PROTO_LOOKUP:
	case PROTO_FREE_LOOKUP_LOCKS:
		f[n++] = own_msg(proto_encode_key(&m, &r->key), &m);
		f[n++] = own_msg(proto_encode_int(&m, r->tp_size), &m);
		break;
	case PROTO_UNREGISTER_KV_CACHE:
		f[n++] = own_msg(proto_encode_int(&m, r->instance_id), &m);
		break;
	case PROTO_QUERY_PREFETCH_STATUS:
	case PROTO_QUERY_PREFETCH_LOOKUP_HITS:
		f[n++] = own_msg(proto_encode_int(&m, r->job_id), &m);
		break;
	case PROTO_END_SESSION:
		f[n++] = own_msg(proto_encode_str(&m, r->request_id), &m);
		break;
	case PROTO_PING:
		if (r->has_instance_id)
			f[n++] = own_msg(proto_encode_int(&m, r->instance_id), &m);
		break;
	default:
		break;
	}
	rc = proto_decode_request(&f[0], &f[1], n - 1, &r2, err, sizeof(err));
	ASSERT(rc == 0);
	ASSERT(r2.type == r->type);
	switch (r->type) {
	case PROTO_REGISTER_KV_CACHE:
		ASSERT(r2.instance_id == r->instance_id && r2.nlayers == r->nlayers);
		ASSERT(r2.model_len == r->model_len && !strcmp(r2.model, r->model));
		ASSERT(r2.world_size == r->world_size);
		for (size_t i = 0; i < r->nlayers; i++)
			same_desc(&r->layers[i], &r2.layers[i]);
		break;
	case PROTO_STORE:
	case PROTO_RETRIEVE:
		same_key(&r->key, &r2.key);
		ASSERT(r2.instance_id == r->instance_id && r2.nblocks == r->nblocks);
		ASSERT(!r->nblocks ||
		       !memcmp(r->block_ids, r2.block_ids, r->nblocks * sizeof(int64_t)));
		ASSERT(r2.event_len == r->event_len && !memcmp(r2.event, r->event, r->event_len));
		ASSERT(r2.skip_first_n_tokens == r->skip_first_n_tokens);
		break;
	case PROTO_LOOKUP:
	case PROTO_FREE_LOOKUP_LOCKS:
		same_key(&r->key, &r2.key);
		ASSERT(r2.tp_size == r->tp_size);
		break;
	case PROTO_UNREGISTER_KV_CACHE:
	case PROTO_PING:
		ASSERT(r2.has_instance_id == r->has_instance_id);
		ASSERT(!r->has_instance_id || r2.instance_id == r->instance_id);
		break;
	case PROTO_QUERY_PREFETCH_STATUS:
	case PROTO_QUERY_PREFETCH_LOOKUP_HITS:
		ASSERT(r2.job_id == r->job_id);
		break;
	case PROTO_END_SESSION:
		ASSERT(r2.request_id_len == r->request_id_len &&
		       !strcmp(r2.request_id, r->request_id));
		break;
	default:
		break;
	}
	proto_request_free(&r2);
out:
	free_bufs(f, n);
}

static void check_request(const struct proto_request *r)
{
	if (r->type == PROTO_STORE || r->type == PROTO_RETRIEVE || r->type == PROTO_LOOKUP ||
	    r->type == PROTO_FREE_LOOKUP_LOCKS)
		check_key(&r->key);
	else
		ASSERT(r->key.token_ids == NULL);
	ASSERT(r->event_len == 0 || r->event_len == PROTO_EVENT_HANDLE_LEN);
	ASSERT(r->nblocks <= PROTO_MAX_BLOCKS && (!r->nblocks || r->block_ids));
	ASSERT(r->nlayers <= PROTO_MAX_LAYERS && (!r->nlayers || r->layers));
	ASSERT(r->type != PROTO_REGISTER_KV_CACHE || r->nlayers >= 1);
	ASSERT(strlen(r->model) == r->model_len && strlen(r->request_id) == r->request_id_len);
	for (size_t i = 0; i < r->nlayers; i++) {
		struct kv_layout l = r->layers[i].layout;
		char err[128];

		/* what the decoder accepted, the server's layout setup accepts too */
		l.num_layers = (uint32_t)r->nlayers;
		ASSERT(kv_layout_init(&l, err, sizeof(err)) == 0);
		ASSERT(r->layers[i].offset + l.extent_bytes >= r->layers[i].offset);
		ASSERT(r->layers[i].offset + l.extent_bytes <= r->layers[i].nbytes);
	}
}

/* Decode a frame as a reply; re-encode what came out and compare. */
static void reply_round_trip(const struct proto_buf *f)
{
	static struct proto_reply a, b;
	struct proto_msg m;
	struct proto_buf g;
	int rc = proto_decode_reply(f, &a);

	if (rc) {
		ASSERT(rc == -EPROTO || rc == -E2BIG || rc == -ENOMEM);
		return;
	}
	switch (a.kind) {
	case PROTO_REPLY_NIL: rc = proto_encode_nil(&m); break;
	case PROTO_REPLY_BOOL: rc = proto_encode_bool(&m, a.b); break;
	case PROTO_REPLY_INT: rc = proto_encode_int(&m, a.i); break;
	case PROTO_REPLY_STR:
		ASSERT(strlen(a.str) <= PROTO_REPLY_STR_MAX);
		rc = proto_encode_str(&m, a.str);
		break;
	case PROTO_REPLY_XFER:
		ASSERT(a.event_len == 0 || a.event_len == PROTO_EVENT_HANDLE_LEN);
		rc = proto_encode_xfer_reply(&m, a.event, a.event_len, a.b);
		break;
	case PROTO_REPLY_MAP: {
		const char *names[PROTO_REPLY_MAP_MAX];

		ASSERT(a.map_n <= PROTO_REPLY_MAP_MAX);
		for (size_t i = 0; i < a.map_n; i++)
			names[i] = a.map_keys[i];
		rc = proto_encode_stats(&m, names, a.map_vals, a.map_n);
		break;
	}
	default:
		__builtin_trap();
	}
	g = own_msg(rc, &m);
	rc = proto_decode_reply(&g, &b);
	free((void *)g.data);
	ASSERT(rc == 0 && a.kind == b.kind);
	switch (a.kind) {
	case PROTO_REPLY_BOOL: ASSERT(a.b == b.b); break;
	case PROTO_REPLY_INT: ASSERT(a.i == b.i); break;
	case PROTO_REPLY_STR: ASSERT(!strcmp(a.str, b.str)); break;
	case PROTO_REPLY_XFER:
		ASSERT(a.b == b.b && a.event_len == b.event_len &&
		       !memcmp(a.event, b.event, a.event_len));
		break;
	case PROTO_REPLY_MAP:
		ASSERT(a.map_n == b.map_n);
		for (size_t i = 0; i < a.map_n; i++)
			ASSERT(a.map_vals[i] == b.map_vals[i] &&
			       !strcmp(a.map_keys[i], b.map_keys[i]));
		break;
	default:
		break;
	}
}

/*
 * Frame @f as a key both ways: the fast path (token ids read from the bytes)
 * and the tree-only reference must agree on the result, the reason and
 * every field.
 */
static void key_paths_agree(const struct proto_buf *f, size_t errlen)
{
	struct proto_key a, b;
	char ea[256], eb[256];
	int ra = proto_decode_key_frame(f, &a, false, ea, errlen);
	int rb = proto_decode_key_frame(f, &b, true, eb, errlen);

	ASSERT(ra == rb);
	if (ra) {
		ASSERT(!strcmp(ea, eb));
		ASSERT(!a.token_ids && !a.null_chunk_mask && !b.token_ids && !b.null_chunk_mask);
		return;
	}
	same_key(&a, &b);
	ASSERT(a.has_current_fields == b.has_current_fields);
	ASSERT(a.cache_salt_len == b.cache_salt_len &&
	       !memcmp(a.cache_salt, b.cache_salt, a.cache_salt_len + 1));
	ASSERT(a.num_kv_readers == b.num_kv_readers);
	ASSERT(a.mask_groups == b.mask_groups && a.mask_chunks == b.mask_chunks);
	ASSERT(!a.null_chunk_mask == !b.null_chunk_mask);
	ASSERT(!a.null_chunk_mask || !memcmp(a.null_chunk_mask, b.null_chunk_mask,
					     (size_t)a.mask_groups * a.mask_chunks));
	free(a.token_ids);
	free(b.token_ids);
	free(a.null_chunk_mask);
	free(b.null_chunk_mask);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct proto_buf f[MAX_FRAMES];
	struct proto_request req;
	enum proto_type type;
	char err[256];
	size_t errlen, nframes, off = 1;
	uint64_t uid;
	int rc;

	if (size < 1)
		return 0;
	nframes = (size_t)(data[0] & 7) + 1;
	errlen = (data[0] & 0x80) ? 7 : sizeof(err);
	static const enum proto_dialect dialects[4] = {
		PROTO_DIALECT_MARCH, PROTO_DIALECT_AUTO, PROTO_DIALECT_CURRENT, PROTO_DIALECT_MARCH,
	};
	const enum proto_dialect dialect = dialects[(data[0] >> 3) & 3];
	for (size_t i = 0; i < nframes; i++) {
		size_t len = 0;

		if (size - off >= 2) {
			len = (size_t)data[off] | (size_t)data[off + 1] << 8;
			off += 2;
		} else {
			off = size;
		}
		if (len > size - off)
			len = size - off;
		f[i] = own(data + off, len);
		off += len;
	}

	(void)proto_decode_uid(&f[0], &uid);
	rc = proto_decode_type(&f[0], &type);
	ASSERT(rc == 0 || rc == -EPROTO || rc == -EBADMSG || rc == -ENOMEM || rc == -E2BIG);
	err[0] = 'x';
	rc = proto_decode_request_in(dialect, &f[0], &f[1], nframes - 1, &req, err, errlen);
	if (rc == 0) {
		ASSERT(dialect == PROTO_DIALECT_AUTO || req.dialect == dialect);
		ASSERT(req.type != PROTO_UNSUPPORTED || (req.op_name && req.op_name[0]));
		ASSERT(req.nblocks == 0 || req.nblock_lists > 0);
		/* the encoders write the March forms: re-encode only what March decoded */
		if (req.dialect == PROTO_DIALECT_MARCH && dialect == PROTO_DIALECT_MARCH) {
			check_request(&req);
			round_trip(&req);
		}
		if (req.type == PROTO_UNSUPPORTED && req.unsupported_reply != PROTO_UNSUP_NONE) {
			struct proto_msg m;

			ASSERT(proto_encode_unsupported(&m, req.unsupported_reply) == 0);
			proto_msg_free(&m);
		}
		proto_request_free(&req);
	} else {
		ASSERT(rc == -EBADMSG || rc == -EINVAL || rc == -EPROTO || rc == -E2BIG ||
		       rc == -ENOMEM);
		/* one line of reason, NUL-terminated within the buffer */
		ASSERT(memchr(err, '\0', errlen) && !strchr(err, '\n') && err[0] != '\0');
		ASSERT(!req.key.token_ids && !req.layers && !req.block_ids && !req.groups &&
		       !req.key.null_chunk_mask);
	}
	for (size_t i = 0; i < nframes; i++) {
		reply_round_trip(&f[i]);
		key_paths_agree(&f[i], errlen);
	}
	free_bufs(f, nframes);
	return 0;
}
