/*
 * kvstash.h - libkvstash, the client library of kvstashd.
 *
 * Speaks the LMCache multiprocess protocol (docs/protocol.md) over ZMQ.
 * Every function returns 0 or a negative errno; on failure,
 * kvstash_last_error() gives a one-line message for the calling thread
 * (the server's own reason where it sent one). Every call is bounded by the
 * client's timeout. A client is thread-safe: concurrent calls from several
 * threads run in parallel over separate connections. The library never
 * prints; set a hook with kvstash_set_log_fn() to see its messages.
 */
#ifndef KVSTASH_H
#define KVSTASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVSTASH_DEFAULT_ENDPOINT "tcp://127.0.0.1:5555"
#define KVSTASH_DEFAULT_TIMEOUT_MS 10000

typedef struct kvstash_client kvstash_client;

/*
 * Create a client for @endpoint (NULL = KVSTASH_DEFAULT_ENDPOINT); every
 * call waits at most @timeout_ms (<= 0: KVSTASH_DEFAULT_TIMEOUT_MS) for its
 * reply. Connecting is lazy (ZMQ): a dead server shows up as -ETIMEDOUT on
 * the first call. Returns 0, -EINVAL, -ENOMEM.
 */
int kvstash_connect(const char *endpoint, int timeout_ms, kvstash_client **out);
void kvstash_close(kvstash_client *c);

/*
 * Use CURVE (encryption + authentication) for every connection this client
 * opens from now on; call it before the first request. Keys are 40-character
 * Z85 strings: the server's public key and this client's key pair. Returns 0,
 * -EINVAL for a malformed key, -ENOTSUP if libzmq lacks CURVE.
 */
int kvstash_set_curve(kvstash_client *c, const char *server_public, const char *client_public,
		      const char *client_secret);
/* A fresh CURVE key pair as Z85 strings (41-byte buffers). 0 or -ENOTSUP. */
int kvstash_curve_keypair(char public_key[41], char secret_key[41]);

/* PING; *rtt_ms (may be NULL) gets the round trip. 0, -ETIMEDOUT, -EPROTO. */
int kvstash_ping(kvstash_client *c, double *rtt_ms);
/* GET_CHUNK_SIZE: tokens per chunk. */
int kvstash_get_chunk_size(kvstash_client *c, uint32_t *chunk_tokens);

/* ---- KV buffer registration ---- */

enum kvstash_layout {
	KVSTASH_LAYOUT_FLASH_ATTN = 0,	/* [2, NB, BS, NH, HS] */
	KVSTASH_LAYOUT_FLASHINFER = 1,	/* [NB, 2, BS, NH, HS] */
	KVSTASH_LAYOUT_MLA = 2,		/* [NB, BS, HS] */
};

struct kvstash_kv_layout {
	enum kvstash_layout layout;
	const char *dtype;	/* "bfloat16", "float16", "float32", "float8_e4m3fn", "uint8", ... */
	uint32_t ndim;		/* 5, or 3 for MLA */
	int64_t shape[5];
	int64_t stride[5];	/* elements; all zero = dense C order */
};

/* One layer's host buffer: a POSIX shm name ("/name") or a file path. */
struct kvstash_host_layer {
	const char *path;
	uint64_t offset;	/* bytes from the start of the file to element 0 */
	uint64_t nbytes;	/* bytes of the file the server may map */
};

/*
 * REGISTER_KV_CACHE with host-memory layers (protocol.md §5.2 host_shm).
 * The server replies before it knows whether mapping worked in the pinned
 * protocol, so this call checks the registration afterwards and returns
 * -EINVAL (with the server's reason) if it was refused.
 */
int kvstash_register_host(kvstash_client *c, int64_t instance_id, const char *model,
			  uint32_t world_size, const struct kvstash_kv_layout *layout,
			  const struct kvstash_host_layer *layers, size_t nlayers);
int kvstash_unregister(kvstash_client *c, int64_t instance_id);

/* One layer's GPU buffer, shared by CUDA IPC (protocol.md §5.2 cuda_ipc). */
struct kvstash_cuda_layer {
	uint8_t mem_handle[64];	/* cudaIpcGetMemHandle() of the allocation holding the layer */
	uint64_t offset;	/* bytes from the allocation's base to element 0 */
	uint64_t nbytes;	/* bytes of the allocation the server may touch */
};

/*
 * REGISTER_KV_CACHE with GPU layers on the device with @device_uuid
 * (8-4-4-4-12 hex, "GPU-" optional). The server opens each distinct handle
 * once and checks every layer against the real allocation size. Like
 * kvstash_register_host(), returns -EINVAL with the server's reason if it
 * refused the registration.
 */
int kvstash_register_cuda(kvstash_client *c, int64_t instance_id, const char *model,
			  uint32_t world_size, const struct kvstash_kv_layout *layout,
			  const char *device_uuid, const struct kvstash_cuda_layer *layers,
			  size_t nlayers);

/*
 * PING carrying @instance_id (later LMCache clients do): the server then
 * unregisters that instance --client-timeout-s after its last heartbeat,
 * closing its mappings, if the engine dies without UNREGISTER.
 */
int kvstash_heartbeat(kvstash_client *c, int64_t instance_id);

/* A shareable host buffer: memfd mapped here, passed to the server by path. */
struct kvstash_host_buffer {
	void *ptr;
	size_t bytes;
	int fd;
	char path[64];		/* "/proc/<pid>/fd/<fd>" */
};
/* 0, -ENOMEM, -errno from memfd_create/ftruncate/mmap. */
int kvstash_host_buffer_create(struct kvstash_host_buffer *b, size_t bytes, const char *name);
void kvstash_host_buffer_destroy(struct kvstash_host_buffer *b);

/* ---- cache operations ---- */

/* IPCCacheEngineKey (protocol.md §4.1). */
struct kvstash_key {
	const char *model;
	uint32_t world_size;
	int32_t worker_id;	/* -1 = nil (LOOKUP: all ranks) */
	const uint32_t *tokens;
	size_t ntokens;
	uint64_t start, end;	/* token range of STORE/RETRIEVE/FREE_LOOKUP_LOCKS */
	const char *request_id;
};

/*
 * STORE tokens [start, end) from the paged slots of @block_ids (covering the
 * range only). 0 once the server replied ok (objects present now or
 * skipped), -EIO if it replied false (reason in kvstash_last_error()).
 */
int kvstash_store(kvstash_client *c, const struct kvstash_key *key, int64_t instance_id,
		  const int64_t *block_ids, size_t nblocks);
/*
 * RETRIEVE into the paged slots, leaving the first @skip_first_n_tokens of
 * the range untouched. 0, or -ENOENT when the server replied false (a chunk
 * missing, or another error: see kvstash_last_error()).
 */
int kvstash_retrieve(kvstash_client *c, const struct kvstash_key *key, int64_t instance_id,
		     const int64_t *block_ids, size_t nblocks, uint64_t skip_first_n_tokens);
/*
 * STORE / RETRIEVE of a CUDA registration with IPC events (protocol.md
 * §5.3): @wait_event (64 bytes, or NULL) is a cudaIpcEventHandle_t the
 * server's copy waits for; @done_event (64 bytes out, or NULL) receives the
 * handle of the server's event recorded after its copies. Same results as
 * kvstash_store()/kvstash_retrieve().
 */
int kvstash_store_event(kvstash_client *c, const struct kvstash_key *key, int64_t instance_id,
			const int64_t *block_ids, size_t nblocks, const void *wait_event,
			void *done_event);
int kvstash_retrieve_event(kvstash_client *c, const struct kvstash_key *key,
			   int64_t instance_id, const int64_t *block_ids, size_t nblocks,
			   uint64_t skip_first_n_tokens, const void *wait_event, void *done_event);
/* LOOKUP: *job_id for the QUERY calls. */
int kvstash_lookup(kvstash_client *c, const struct kvstash_key *key, uint32_t tp_size,
		   int64_t *job_id);
/* QUERY_PREFETCH_STATUS (consumes the job) / _LOOKUP_HITS (does not): -ENOENT for nil. */
int kvstash_query_prefetch_status(kvstash_client *c, int64_t job_id, int64_t *chunks);
int kvstash_query_lookup_hits(kvstash_client *c, int64_t job_id, int64_t *chunks);
/* LOOKUP then QUERY_PREFETCH_STATUS: the number of leading chunks cached (locked). */
int kvstash_lookup_chunks(kvstash_client *c, const struct kvstash_key *key, uint32_t tp_size,
			  int64_t *chunks);
int kvstash_free_lookup_locks(kvstash_client *c, const struct kvstash_key *key,
			      uint32_t tp_size);
int kvstash_end_session(kvstash_client *c, const char *request_id);
int kvstash_clear(kvstash_client *c);

/* Server counters: @fn is called once per counter; a non-zero return stops. */
int kvstash_stats(kvstash_client *c, int (*fn)(const char *name, uint64_t value, void *arg),
		  void *arg);

/* The calling thread's last failure message ("" if none). */
const char *kvstash_last_error(void);

enum kvstash_log_level { KVSTASH_LOG_ERROR = 0, KVSTASH_LOG_WARN = 1, KVSTASH_LOG_DEBUG = 3 };
typedef void (*kvstash_log_fn)(enum kvstash_log_level level, const char *msg, void *arg);
/* Process-wide; NULL silences. */
void kvstash_set_log_fn(kvstash_log_fn fn, void *arg);

#ifdef __cplusplus
}
#endif
#endif /* KVSTASH_H */
