/*
 * protocol.h - the LMCache MP wire format (docs/protocol.md): msgpack
 * frames <-> C structs, in both dialects kvstashd serves: "march" (LMCache's
 * MP wire of March 2026, docs/protocol.md §3) and "current" (LMCache's frozen
 * id table and string op names since September 2026, docs/protocol.md §11).
 *
 * Server side: proto_decode_uid/proto_decode_request turn the frames after
 * the ROUTER identity into a struct proto_request; proto_encode_* build the
 * single response frame. Client side (libkvstash): proto_encode_key and
 * proto_encode_kv_descs build argument frames, proto_decode_reply reads the
 * response frame.
 *
 * Every byte here is untrusted: decoders check types, lengths and ranges
 * and return an error with a message, never assert. This file logs nothing
 * and takes no lock (it is shared with libkvstash, which never prints).
 */
#ifndef KS_PROTOCOL_H
#define KS_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunk_key.h"
#include "layout.h"

/*
 * The two wire dialects. A request's op frame means different things in
 * each (op 8 is FREE_LOOKUP_LOCKS in one and LOOKUP in the other), so the
 * server latches each connection to one (docs/protocol.md §11.2). AUTO is
 * "not latched yet": proto_decode_request_in() then works out the dialect
 * from the request's shape, or finds it neutral or ambiguous.
 */
enum proto_dialect {
	PROTO_DIALECT_AUTO = 0,
	PROTO_DIALECT_MARCH = 1,
	PROTO_DIALECT_CURRENT = 2,
};
const char *proto_dialect_name(enum proto_dialect d);	/* "auto", "march", "current" */

/*
 * Operations, as the server handles them. Values 1..13 are also the March
 * dialect's wire ids (protocol.md §3), so a March request's op frame is its
 * proto_type; the current dialect maps its ids and names onto these
 * (protocol.md §11.3). Values 14.. exist only in the current dialect.
 */
enum proto_type {
	PROTO_REGISTER_KV_CACHE = 1,
	PROTO_UNREGISTER_KV_CACHE = 2,
	PROTO_STORE = 3,
	PROTO_RETRIEVE = 4,
	PROTO_LOOKUP = 5,
	PROTO_QUERY_PREFETCH_STATUS = 6,
	PROTO_QUERY_PREFETCH_LOOKUP_HITS = 7,
	PROTO_FREE_LOOKUP_LOCKS = 8,
	PROTO_END_SESSION = 9,
	PROTO_CLEAR = 10,
	PROTO_GET_CHUNK_SIZE = 11,
	PROTO_PING = 12,
	PROTO_NOOP = 13,
	PROTO_WAIT_PREFETCH_STATUS = 14,	/* current: (request_id, timeout) -> int|None */
	PROTO_REPORT_BLOCK_ALLOCATION = 15,	/* current: accepted, counted -> None */
	PROTO_GET_EXPERIMENTAL = 16,		/* current: () -> [] (no experimental features) */
	PROTO_UNSUPPORTED = 17,	/* current: an operation kvstash does not implement;
				 * answered with req->unsupported_reply */
	PROTO_AMBIGUOUS = 18,	/* unlatched op 9 [str]: END_SESSION (march) or
				 * QUERY_PREFETCH_STATUS (current); answered nil */
	PROTO_OP_COUNT = 19,	/* size of per-operation tables */
	/* kvstash extensions (docs/protocol.md §kvstash extensions): numbers far
	 * above LMCache's range; an LMCache client never sends them. */
	PROTO_KS_LAST_ERROR = 200,	/* () -> str: last error for this client */
	PROTO_KS_STATS = 201,		/* () -> map: server counters */
};

/* Limits on untrusted input; larger is a frame-level fault (-E2BIG). */
#define PROTO_MAX_TOKENS (1u << 22)	/* 4M tokens per key */
#define PROTO_MAX_BLOCKS (1u << 22)
#define PROTO_MAX_LAYERS 1024u
#define PROTO_REQUEST_ID_MAX 255u
#define PROTO_PATH_MAX 1023u
#define PROTO_UUID_MAX 63u
#define PROTO_EVENT_HANDLE_LEN 64u	/* cudaIpcEventHandle_t */
#define PROTO_SEMAPHORE_HANDLE_LEN 81u	/* isolated IPC: "!B64sQQ" (protocol.md §11.6) */
#define PROTO_EVENT_MAX PROTO_SEMAPHORE_HANDLE_LEN
#define PROTO_CPU_STUB_EVENT "stub_ipc_handle"	/* what a CPU LMCache worker sends */
#define PROTO_SALT_MAX 128u		/* cache_salt characters (LMCache's limit) */
#define PROTO_MAX_GROUPS 32u		/* KV cache groups of one registration */
#define PROTO_OP_NAME_MAX 64u		/* a string op frame's name */
#define PROTO_MEM_HANDLE_LEN 64u
/*
 * Structural limits checked on every frame before msgpack-c unpacks it
 * (msgpack-c allocates an array from its header count, and stops at 32
 * nested containers with an out-of-memory error): containers nested deeper
 * than PROTO_MAX_DEPTH are -EPROTO, one with more than PROTO_MAX_ELEMS
 * entries is -E2BIG. No valid argument comes near either.
 */
#define PROTO_MAX_DEPTH 24u
#define PROTO_MAX_ELEMS PROTO_MAX_TOKENS

/* One received frame (borrowed bytes). */
struct proto_buf {
	const uint8_t *data;
	size_t len;
};

/* IPCCacheEngineKey (protocol.md §4.1) / IPCCacheServerKey (§11.4). */
struct proto_key {
	char model[KS_MODEL_MAX + 1];
	uint16_t model_len;
	uint32_t world_size;
	int32_t worker_id;	/* -1 = nil */
	uint32_t *token_ids;	/* owned (malloc); freed by proto_request_free */
	size_t ntokens;
	int64_t start, end;
	char request_id[PROTO_REQUEST_ID_MAX + 1];
	uint16_t request_id_len;
	/* Current-dialect fields (§11.4); zero/absent in a March key. */
	bool has_current_fields;	/* any of the four below was present */
	char cache_salt[PROTO_SALT_MAX + 1];	/* part of the cache identity */
	uint16_t cache_salt_len;
	uint32_t num_kv_readers;	/* read locks per object a LOOKUP takes */
	/* null_chunk_mask[g][c]: chunk c of the range is skipped in group g.
	 * Flattened [mask_groups][mask_chunks], missing entries false; NULL = nil. */
	bool *null_chunk_mask;	/* owned */
	uint32_t mask_groups, mask_chunks;
};

enum proto_kv_kind { PROTO_KV_HOST_SHM = 0, PROTO_KV_CUDA_IPC = 1 };

/*
 * One element of REGISTER_KV_CACHE's kv_caches: a native descriptor map
 * (protocol.md §5.2), or LMCache's CudaIPCWrapper (§5.1: ext 1 holding a
 * pickle, decoded by pickle.c into a PROTO_KV_CUDA_IPC descriptor; the forms
 * accepted are in docs/pytorch-ipc.md).
 */
struct proto_kv_desc {
	enum proto_kv_kind kind;
	/* kind, dtype, elem_bytes, ndim, shape, stride are filled (layout
	 * inferred when absent); derived fields are not: the server calls
	 * kv_layout_init() once num_layers is known. */
	struct kv_layout layout;
	uint64_t offset;	/* bytes from the mapped base to element 0 */
	uint64_t nbytes;	/* bytes the server may map/touch from the base */
	uint8_t mem_handle[PROTO_MEM_HANDLE_LEN];	/* cuda_ipc */
	char device_uuid[PROTO_UUID_MAX + 1];		/* cuda_ipc, as sent */
	char path[PROTO_PATH_MAX + 1];			/* host_shm */
};

/*
 * One KV cache group of a current-dialect REGISTER (EngineGroupInfo): the
 * registered layers whose blocks STORE/RETRIEVE's block_ids[g] names.
 */
struct proto_group {
	int64_t engine_group_id;
	uint32_t *layers;	/* owned, [nlayers] indices into kv_caches */
	uint32_t nlayers;
	uint32_t tokens_per_block;	/* 0: as the registered tensors say */
	int64_t sw_size_tokens;		/* -1: full attention */
};

/* What kvstashd answers to an operation it does not implement (§11.7). */
enum proto_unsupported_reply {
	PROTO_UNSUP_NONE = 0,		/* None: no response frame */
	PROTO_UNSUP_XFER_FAIL,		/* [b"", false] */
	PROTO_UNSUP_FALSE,		/* false */
	PROTO_UNSUP_ZERO,		/* 0 */
	PROTO_UNSUP_EMPTY_LIST,		/* [] */
	PROTO_UNSUP_ED_REGISTER,	/* {shm_name:"", pool_size:0, ..., error:str} */
	PROTO_UNSUP_PREPARE_STORE,	/* {context:{}} */
	PROTO_UNSUP_PREPARE_RETRIEVE,	/* {success:false, data:b"", context:{}} */
	PROTO_UNSUP_CB_LOOKUP,		/* {prefix_coverage_tokens:0, non_prefix_segments:[], ...} */
	PROTO_UNSUP_HANDSHAKE,		/* [0, false] */
};

/* The kind of event_ipc_handle a STORE/RETRIEVE carries (§5.3, §11.6). */
enum proto_event_kind {
	PROTO_EVENT_NONE = 0,		/* empty: host path */
	PROTO_EVENT_CUDA,		/* 64-byte cudaIpcEventHandle_t */
	PROTO_EVENT_SEMAPHORE,		/* 81 bytes: version 1, mem handle, slot offset, seq */
	PROTO_EVENT_CPU_STUB,		/* b"stub_ipc_handle": a CPU worker, nothing to wait for */
};

struct proto_request {
	enum proto_type type;
	enum proto_dialect dialect;	/* the request's dialect; AUTO = neutral */
	/* PROTO_UNSUPPORTED: the operation's name and the answer it gets */
	const char *op_name;		/* static, or op_name_buf */
	char op_name_buf[PROTO_OP_NAME_MAX + 1];
	enum proto_unsupported_reply unsupported_reply;
	/* REGISTER, UNREGISTER, STORE, RETRIEVE; PING when has_instance_id */
	int64_t instance_id;
	bool has_instance_id;
	/* STORE, RETRIEVE, LOOKUP, FREE_LOOKUP_LOCKS */
	struct proto_key key;
	/* REGISTER */
	struct proto_kv_desc *layers;	/* owned, [nlayers] */
	size_t nlayers;
	char model[KS_MODEL_MAX + 1];
	uint16_t model_len;
	uint32_t world_size;
	/* REGISTER (current dialect): KV cache groups; 0 = one group, every layer */
	struct proto_group *groups;	/* owned, [ngroups] */
	size_t ngroups;
	/* STORE, RETRIEVE: block ids, one list per group, concatenated:
	 * list g is block_ids[block_list_off[g] .. + block_list_len[g]). */
	int64_t *block_ids;	/* owned, [nblocks] */
	size_t nblocks;
	uint32_t nblock_lists;	/* 1 in the March dialect and for a flat list */
	size_t block_list_off[PROTO_MAX_GROUPS];
	size_t block_list_len[PROTO_MAX_GROUPS];
	uint8_t event[PROTO_EVENT_MAX];
	size_t event_len;	/* 0, 64, 81, or the CPU stub's 15 */
	enum proto_event_kind event_kind;
	uint64_t skip_first_n_tokens;	/* RETRIEVE */
	/* LOOKUP, FREE_LOOKUP_LOCKS */
	uint32_t tp_size;
	/* QUERY_PREFETCH_STATUS, QUERY_PREFETCH_LOOKUP_HITS (March: a job id) */
	int64_t job_id;
	/* END_SESSION; current QUERY_* and WAIT_PREFETCH_STATUS (a request id) */
	char request_id[PROTO_REQUEST_ID_MAX + 1];
	uint16_t request_id_len;
	double wait_timeout_s;	/* WAIT_PREFETCH_STATUS, >= 0 */
	bool force;		/* CLEAR (current) */
};

/* Name of a request type ("STORE"), or "UNKNOWN". */
const char *proto_type_name(int type);

/* Decode the uid frame: any msgpack integer >= 0. 0 or -EPROTO. */
int proto_decode_uid(const struct proto_buf *f, uint64_t *uid);
/* Decode the type frame: a msgpack int naming a known type. 0, -EPROTO, -EBADMSG (unknown).
 * (Like every decoder here, also -ENOMEM if msgpack-c cannot allocate.) */
int proto_decode_type(const struct proto_buf *f, enum proto_type *type);

/*
 * Decode a whole request of dialect @dialect: the op frame and its @nargs
 * argument frames. With PROTO_DIALECT_AUTO the dialect is worked out from the
 * request's shape (docs/protocol.md §11.2) and left in req->dialect:
 * MARCH or CURRENT when the request tells them apart, AUTO when it means the
 * same in both (UNREGISTER, the kvstash extensions) or is ambiguous
 * (req->type PROTO_AMBIGUOUS). Otherwise req->dialect = @dialect.
 * Returns 0 with @req filled (free with proto_request_free), or:
 *   -EBADMSG  unknown type
 *   -EINVAL   wrong number of argument frames
 *   -EPROTO   bad msgpack, wrong types, missing/invalid fields, token out
 *             of [0, 2^32), trailing bytes after a document
 *   -E2BIG    a list or string over the limits above
 *   -ENOMEM
 * with a one-line reason in @err in every error case. On error @req holds
 * nothing that needs freeing.
 */
int proto_decode_request_in(enum proto_dialect dialect, const struct proto_buf *type_frame,
			    const struct proto_buf *args, size_t nargs, struct proto_request *req,
			    char *err, size_t errlen);
/* proto_decode_request_in(PROTO_DIALECT_MARCH, ...): the March dialect. */
/*
 * The key of a STORE/RETRIEVE/LOOKUP/FREE_LOOKUP_LOCKS frame, as
 * proto_decode_request decodes it (token ids read straight from the bytes).
 * @tree_only: every field through msgpack-c's object tree instead, the
 * reference the fuzzer compares the fast path with. Same results, same
 * errors; free k->token_ids and k->null_chunk_mask after a success.
 */
int proto_decode_key_frame(const struct proto_buf *f, struct proto_key *k, bool tree_only,
			   char *err, size_t errlen);
int proto_decode_request(const struct proto_buf *type_frame, const struct proto_buf *args,
			 size_t nargs, struct proto_request *req, char *err, size_t errlen);
void proto_request_free(struct proto_request *req);

/*
 * Check that @f is exactly one well-formed msgpack document within the
 * structural limits above, without allocating. Every decoder runs this
 * first. 0, -EPROTO (empty, truncated, trailing bytes, byte c1, too deep),
 * -E2BIG (container over PROTO_MAX_ELEMS) or -EINVAL (no frame), with a
 * reason in @err (may be NULL).
 */
int proto_check_frame(const struct proto_buf *f, char *err, size_t errlen);

/* A malloc'd encoded msgpack document. Free with proto_msg_free. */
struct proto_msg {
	uint8_t *data;
	size_t len;
};
void proto_msg_free(struct proto_msg *m);

/* Response frames. Each returns 0 or -ENOMEM. */
int proto_encode_nil(struct proto_msg *m);
int proto_encode_bool(struct proto_msg *m, bool v);
int proto_encode_int(struct proto_msg *m, int64_t v);
int proto_encode_str(struct proto_msg *m, const char *s);
/* The answer to an unsupported operation (§11.7); -EINVAL for PROTO_UNSUP_NONE. */
int proto_encode_unsupported(struct proto_msg *m, enum proto_unsupported_reply r);
/* An empty array (GET_EXPERIMENTAL). */
int proto_encode_empty_list(struct proto_msg *m);
/* [bin event, bool ok]: exactly a 2-element array (protocol.md §1). */
int proto_encode_xfer_reply(struct proto_msg *m, const uint8_t *event, size_t event_len, bool ok);
/* A map of string keys to unsigned counters (PROTO_KS_STATS). */
int proto_encode_stats(struct proto_msg *m, const char *const *names, const uint64_t *values,
		       size_t n);

/* Argument frames, as the pinned LMCache client encodes them. 0 or -ENOMEM/-EINVAL. */
int proto_encode_key(struct proto_msg *m, const struct proto_key *k);	/* 7-entry map */
int proto_encode_kv_descs(struct proto_msg *m, const struct proto_kv_desc *d, size_t n);
int proto_encode_int_list(struct proto_msg *m, const int64_t *v, size_t n);
int proto_encode_bin(struct proto_msg *m, const uint8_t *b, size_t n);

/* A decoded response frame (client side). */
enum proto_reply_kind {
	PROTO_REPLY_NIL = 0,
	PROTO_REPLY_BOOL,
	PROTO_REPLY_INT,
	PROTO_REPLY_STR,
	PROTO_REPLY_XFER,	/* [bin, bool] */
	PROTO_REPLY_MAP,	/* string -> uint map (stats); entries in map_* */
};
#define PROTO_REPLY_STR_MAX 1023u
#define PROTO_REPLY_MAP_MAX 256u
struct proto_reply {
	enum proto_reply_kind kind;
	bool b;			/* BOOL; XFER ok */
	int64_t i;		/* INT */
	char str[PROTO_REPLY_STR_MAX + 1];	/* STR (truncated if longer) */
	uint8_t event[PROTO_EVENT_HANDLE_LEN];	/* XFER */
	size_t event_len;
	size_t map_n;
	char map_keys[PROTO_REPLY_MAP_MAX][64];
	uint64_t map_vals[PROTO_REPLY_MAP_MAX];
};
/* 0, or -EPROTO for anything else than the kinds above (or -ENOMEM). XFER's ok
 * may also arrive as the int 0/1; its event is 0 or 64 bytes. MAP keys are at
 * most 63 bytes, values non-negative ints. STR is cut at PROTO_REPLY_STR_MAX. */
int proto_decode_reply(const struct proto_buf *f, struct proto_reply *out);

#endif /* KS_PROTOCOL_H */
