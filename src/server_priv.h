/*
 * server_priv.h - private to the server files (server.c, server_registry.c,
 * server_xfer.c, server_tiers.c, server_stats.c): the server's types and
 * limits, and the functions one of them calls in another. Everything else
 * includes server.h.
 *
 * These structs are touched by several threads; each field's comment, and
 * each file's top comment, says which. No type here carries a lock.
 */
#ifndef KS_SERVER_PRIV_H
#define KS_SERVER_PRIV_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "chunk_key.h"
#include "compiler.h"
#include "config.h"
#include "kv_events.h"
#include "layout.h"
#include "metrics.h"
#include "protocol.h"
#include "transfer.h"
#include "transfer_cuda.h"
#include "warm.h"

#include <zmq.h>

/* Engines: [0] the host backend, [1 + d] CUDA device d. */
#define SRV_MAX_DEVICES 16
#define SRV_MAX_ENGINES (1 + SRV_MAX_DEVICES)
#define SRV_MAX_WORKERS 256
/* Frames in one request: identity + uid + type + up to 5 arguments, with room. */
#define SRV_MAX_FRAMES 16
/* Messages handled per poll round before completions and timers get a turn. */
#define SRV_RECV_BATCH 64
/* --state-dir: longest wait at start for resumed CUDA registrations' handles. */
#define SRV_RESTORE_WAIT_MS 10000
/* Housekeeping period: TTL expiry, session GC, reaper. */
#define SRV_TICK_MS 100
/* Lookup job table: ids older than this many LOOKUPs ago read as unknown. */
#define SRV_JOB_SLOTS 65536u
/* Current dialect: LOOKUPs remembered by request_id (oldest forgotten first). */
#define SRV_RID_BUCKETS 4096u
#define SRV_RID_MAX 65536u
/* WAIT_PREFETCH_STATUS calls parked until their prefetch loads or they time out. */
#define SRV_WAIT_MAX 4096u
/* Connections (ROUTER identities) whose dialect is remembered; the least
 * recently seen is forgotten beyond this (it latches again on its next
 * telling request). */
#define SRV_CONN_BUCKETS 1024u
#define SRV_CONN_MAX 16384u
/* Per-client last-error table (direct-mapped by identity hash). */
#define SRV_LAST_ERROR_SLOTS 1024u
#define SRV_ERR_MAX 256
/* Sessions: bucket count and the most kept at once (oldest dropped first). */
#define SRV_SESSION_BUCKETS 4096u
#define SRV_SESSION_MAX 65536u
/*
 * Expiry work per io loop turn: at most this many index deadlines and idle
 * sessions. A backlog (a burst of locks all timing out together) is worked
 * off in later turns, 1 ms apart, so no turn grows with the table sizes.
 */
#define SRV_EXPIRE_BUDGET 256u
#define SRV_SESSION_EXPIRE_BUDGET 128u
#define SRV_EXPIRE_BACKLOG_POLL_MS 1
/*
 * --busy-poll: how long a CUDA transfer worker polls for the next job after
 * one (an engine with one request in flight sends the next 0.2-0.8 ms after
 * the previous job ended: reply, client, the next request's accept; a
 * worker that polls the whole window costs 1 ms of CPU, 2.5% of a
 * 16384-token request's 40 ms), and the longest the io thread polls for a
 * completion announced near its end (the copy poll's slack, 80 us, plus a
 * late end). "auto" needs this many online CPUs: a polling thread holds one.
 */
#define SRV_BUSY_POLL_WORKER_NS (1000ull * 1000)
#define SRV_BUSY_POLL_IO_NS (300ull * 1000)
#define SRV_BUSY_POLL_MIN_CPUS 8
/* CPU priority of the io thread, when the process may raise it (CAP_SYS_NICE):
 * --io-priority realtime, else nice. */
#define SRV_IO_NICE (-10)
#define SRV_IO_RT_PRIORITY 1
/* LOOKUP's L3 EXISTS round trip, waited for on a worker. */
#define SRV_L3_EXISTS_TIMEOUT_MS 500
/* Health: the io loop must turn, and a probe must cross the transfer queue. */
#define SRV_HEALTH_IO_MS 2000
#define SRV_HEALTH_PROBE_MS 2000
#define SRV_PROBE_MS 1000
/* How long shutdown lets queued transfers finish before failing them. */
#define SRV_DRAIN_MS 5000
/* ROUTER identities are 5 bytes when auto-assigned; allow what ZMQ allows. */
#define SRV_IDENTITY_MAX 255
#define SRV_SMALL_FRAME_MAX 16	/* the uid frame: one msgpack int */
#define SRV_OP_FRAME_MAX (PROTO_OP_NAME_MAX + 2)	/* an int, or a str op name */
/* An io loop turn busier than this is logged (at most once a second): a PING
 * that arrived during it waited that long. */
#define SRV_IO_SLOW_NS (5ull * 1000 * 1000)

/*
 * The phases of a STORE/RETRIEVE, in order, from receipt to reply:
 * decode..submit on the io thread, the transfer queue, reserve (STORE) or
 * pin (RETRIEVE) on the worker, the copy (host STOREs also commit chunk by
 * chunk inside it), commit/unpin, then the completion hop back to the io
 * thread and the reply. One list: the count, the metric labels and the
 * KS_STATS names (server_stats.c) all come from it; account_phases
 * (server_xfer.c) takes its timestamps in this order.
 */
#define SRV_PHASE_LIST(X) X(accept) X(queue) X(prepare) X(copy) X(finish) X(reply)
#define SRV_PHASE_ONE(p) +1
enum { SRV_PHASES = 0 SRV_PHASE_LIST(SRV_PHASE_ONE) };

/* ------------------------------------------------------------------------ */
/* Types                                                                    */

struct srv_mapping {
	void *base;		/* host: mmap base; CUDA: the IPC-opened allocation base */
	size_t len;		/* host: bytes mapped; CUDA: the allocation's size */
	char path[PROTO_PATH_MAX + 1];	/* host_shm */
	uint8_t handle[PROTO_MEM_HANDLE_LEN];	/* cuda_ipc */
};

/*
 * One KV cache group of an instance: layers [first, first + layout.num_layers)
 * of srv_instance.layer_ptrs, addressed through STORE/RETRIEVE's block list
 * of the same index. A stored object is the groups' sub-objects one after
 * the other, group g's [K, NL_g, C, hidden] at byte obj_offset
 * (protocol.md §7; one group: exactly §7's object).
 */
struct srv_group {
	struct kv_layout layout;	/* the instance's, num_layers = NL_g */
	uint32_t first;			/* index of its first layer in layer_ptrs */
	uint64_t obj_offset;		/* bytes from the object start */
	bool sliding_window;		/* sw_size_tokens > 0: a chunk whose blocks are
					 * all block 0 (vLLM's null block) is not there */
};

/*
 * Who is at the other end of a connection, as the kernel or the transport
 * vouches for it (docs/architecture.md, "Reconnects"): on ipc:// the peer's
 * process (SO_PEERCRED), on tcp:// with CURVE the client's public key, on
 * plain tcp:// only the peer's address. NONE: nothing known (the identity
 * alone counts).
 */
enum srv_peer_kind { SRV_PEER_NONE = 0, SRV_PEER_PROCESS, SRV_PEER_CURVE_KEY, SRV_PEER_HOST };
struct srv_peer {
	enum srv_peer_kind kind;
	uint32_t pid, uid;	/* PROCESS */
	char addr[64];		/* CURVE_KEY: the Z85 key; HOST: the IP address */
};

/* One engine worker's registration (REGISTER_KV_CACHE). */
struct srv_instance {
	_Atomic int refs;	/* registry + each queued job; last put unmaps */
	struct srv *srv;	/* borrowed: for the CUDA unmap job */
	int64_t id;
	char model[KS_MODEL_MAX + 1];
	uint16_t model_len;
	uint32_t world_size;
	struct kv_layout layout;	/* num_layers: the layers transferred (in groups) */
	uint64_t object_bytes;
	struct srv_group *groups;	/* owned, [ngroups] >= 1 */
	uint32_t ngroups;
	uint32_t *layer_index;	/* owned, [layout.num_layers]: the kv_caches index of
				 * each layer_ptrs entry (group order) */
	int device;		/* -1: host buffers; else the CUDA ordinal (cuda_ipc) */
	void **layer_ptrs;	/* [num_layers] element 0 of each layer (device
				 * addresses for cuda_ipc); owned */
	struct srv_mapping *maps;	/* owned */
	size_t nmaps;
	uint64_t registered_ms;
	uint64_t last_ping_ms;	/* 0 = never pinged with its id */
	uint8_t owner[SRV_IDENTITY_MAX];	/* ROUTER identity of the connection that
						 * registered it, or adopted it since */
	size_t owner_len;
	/* --state-dir: the REGISTER's frames as received (srv_registry_keep_frames), so a
	 * restarted kvstashd rebuilds the instance; and the registering process's pid
	 * where the descriptors name it (/proc/<pid>/fd/<n> paths), else 0. */
	uint8_t *reg_frames;	/* owned; NULL: not kept */
	size_t reg_frames_len;
	int32_t owner_pid;
	struct srv_peer owner_peer;	/* who that connection was (io thread) */
	bool owner_up;			/* that connection is open (socket monitor) */
	struct srv_instance *next;	/* registry list (io thread) */
};

struct srv_reply_addr {
	uint8_t identity[SRV_IDENTITY_MAX];
	size_t identity_len;
	uint8_t uid[SRV_SMALL_FRAME_MAX];
	size_t uid_len;
	uint8_t type[SRV_OP_FRAME_MAX];
	size_t type_len;
	/* The dialect the reply is in: CURRENT sends no response frame for None,
	 * as LMCache's server does; MARCH and AUTO (neutral requests) send c0. */
	enum proto_dialect dialect;
};

/*
 * A job for the transfer workers (xfer_submit), of one of five kinds. As
 * Redis's bio jobs: a header every kind has, then a union of one struct per
 * kind (anonymous, so a field reads j->nchunks whatever the kind; only the
 * fields of j->kind's struct are meaningful, and srv_xfer_job_free frees by
 * kind). The name stays srv_xfer_job: STORE/RETRIEVE are most of them.
 */
enum srv_job_kind {
	JOB_XFER = 0,	/* STORE / RETRIEVE: copies between a client's blocks and the pool */
	JOB_PROBE,	/* data-path probe: the worker answers (health, server_stats.c) */
	JOB_REGISTER,	/* open a CUDA registration's IPC handles on its device */
	JOB_UNMAP,	/* release an instance's mappings off the io thread */
	JOB_PREFETCH,	/* load a LOOKUP's chunks from the disk/Redis tiers */
};

struct srv_xfer_job {
	/* ---- every kind ---- */
	struct xfer_job base;	/* first: the engine hands this pointer back */
	struct srv *srv;
	enum srv_job_kind kind;
	unsigned engine;		/* index into srv.engines it was queued on */
	struct srv_reply_addr addr;	/* XFER, REGISTER: who gets the reply */
	enum proto_type op;
	struct srv_instance *inst;	/* XFER, REGISTER, UNMAP: reference held */
	int result;			/* 0 or -errno, set by run() */
	char err[SRV_ERR_MAX];
	/* ---- XFER and PREFETCH: the chunks' keys and tokens ---- */
	uint32_t chunk_tokens;
	struct ks_key *keys;		/* XFER: [nchunks]; PREFETCH: [nkeys]; owned */
	/* XFER with KV events on: the range's tokens [nchunks * chunk_tokens];
	 * PREFETCH: the LOOKUP's tokens from token 0. Owned; NULL = events off. */
	uint32_t *ev_tokens;
	union {
		struct {	/* JOB_XFER */
			uint32_t nchunks;
			struct idx_entry **entries;	/* [nchunks]; NULL = skipped (STORE) */
			int64_t *slots;		/* [ngroups][nchunks * chunk_tokens] paged slots */
			uint64_t skip_tokens;	/* RETRIEVE */
			uint32_t committed;	/* STORE: chunks made READY */
			uint64_t recv_ns;	/* when the request arrived (latency) */
			uint64_t copy_begin_ns, copy_end_ns;	/* worker: around the copy */
			uint32_t ngroups;	/* == inst->ngroups; slots hold ngroups lists */
			bool *group_skip;	/* [nchunks][ngroups]: that group of that chunk
						 * is absent (null blocks / null_chunk_mask);
						 * NULL: none */
			uint8_t wait_event[PROTO_EVENT_HANDLE_LEN];	/* client's (CUDA) */
			bool has_wait;
			uint8_t done_event[PROTO_EVENT_HANDLE_LEN];	/* ours, for the reply */
			bool has_done;
			/* Isolated IPC (current dialect): the client's 81-byte semaphore
			 * handle, and ours for the reply in its place of done_event. */
			uint8_t wait_sem[PROTO_SEMAPHORE_HANDLE_LEN];
			bool has_wait_sem;
			uint8_t done_sem[PROTO_SEMAPHORE_HANDLE_LEN];
			/* STORE with KV events on: the hash of the chunk before the
			 * range (ev_has_parent: the range does not start at token 0). */
			uint8_t ev_parent[KS_HASH_LEN];
			bool ev_has_parent;
		};
		struct {	/* JOB_PREFETCH: keys[0..nkeys) of a LOOKUP, the first l1_hits in L1 */
			size_t nkeys, l1_hits;
			uint32_t group, locks_per_key;
			uint64_t object_bytes;
			int64_t lookup_job;
			int64_t prefetch_chunks;	/* result */
		};
		struct {	/* JOB_REGISTER */
			struct proto_kv_desc *descs;	/* the layers' descriptors; owned */
			bool restore;	/* a resumed registration: no reply */
		};
	};
};

struct srv_lookup_job {
	int64_t id;		/* -1 = empty */
	int64_t chunks;		/* -1 while a prefetch from L2/L3 is loading */
};

/* Current dialect: a LOOKUP's job, found by its request_id (QUERY_*, WAIT). */
struct srv_rid_job {
	char request_id[PROTO_REQUEST_ID_MAX + 1];
	uint16_t request_id_len;
	int64_t job;		/* id in srv.jobs */
	uint32_t ring_pos;	/* its place in srv.rid_ring */
	struct srv_rid_job *next;
};

/* A WAIT_PREFETCH_STATUS parked until its job loads or its deadline. */
struct srv_wait {
	struct srv_reply_addr addr;
	int64_t job;
	char request_id[PROTO_REQUEST_ID_MAX + 1];
	uint16_t request_id_len;
	uint64_t deadline_ms;
	struct srv_wait *next;
};

/* What the io thread remembers of one connection (ROUTER identity). */
struct srv_conn {
	uint8_t identity[SRV_IDENTITY_MAX];
	size_t identity_len;
	int fd;			/* its socket while open (socket monitor); -1: closed or unknown */
	bool bound;		/* fd and peer were looked up (at its first message) */
	struct srv_peer peer;
	enum proto_dialect dialect;	/* AUTO until a telling request */
	uint64_t unsupported_logged;	/* bit i: current_ops entry i logged (63: by name) */
	struct srv_conn *next;		/* bucket chain */
	struct srv_conn *lru_prev, *lru_next;	/* most recently seen first */
};

struct srv_session {
	char request_id[PROTO_REQUEST_ID_MAX + 1];
	uint16_t request_id_len;
	uint32_t *tokens;	/* the tokens the hashes cover; owned */
	uint8_t (*hashes)[KS_HASH_LEN];	/* owned */
	size_t nchunks, cap;	/* hashes held / allocated */
	uint64_t last_used_ms;
	struct srv_session *next;	/* bucket chain */
	/* Most recently used first: expiry takes the idle ones off the tail. */
	struct srv_session *lru_prev, *lru_next;
};

struct srv_last_error {
	uint8_t identity[SRV_IDENTITY_MAX];
	size_t identity_len;
	char msg[SRV_ERR_MAX];
};

/* Counters; the io thread writes most, workers a few: all atomics. */
struct srv_counters {
	_Atomic uint64_t requests[PROTO_OP_COUNT];
	_Atomic uint64_t unsupported_ops;	/* current-dialect ops kvstash does not implement */
	_Atomic uint64_t ambiguous_requests;	/* answered nil before the connection latched */
	_Atomic uint64_t lookup_refused;	/* current LOOKUP/FREE with num_kv_readers 0 */
	_Atomic uint64_t frame_faults;
	_Atomic uint64_t semantic_errors;
	_Atomic uint64_t replies_dropped;
	_Atomic uint64_t store_chunks_stored;
	_Atomic uint64_t store_chunks_skipped;
	_Atomic uint64_t store_chunks_nospace;
	_Atomic uint64_t store_chunks_lost;	/* commit found the reservation expired/cleared */
	_Atomic uint64_t retrieve_ok;
	_Atomic uint64_t retrieve_miss;
	_Atomic uint64_t bytes_stored;
	_Atomic uint64_t bytes_retrieved;
	_Atomic uint64_t lookup_hit_chunks;
	_Atomic uint64_t instances_reaped;
	_Atomic uint64_t instances_adopted;	/* taken over by a reconnected client */
	_Atomic uint64_t owner_refused;	/* requests refused by --owner-check */
	_Atomic uint64_t conn_opened, conn_closed;	/* socket monitor */
	_Atomic uint64_t xfer_unpinned;	/* GPU chunks refused: slot not pinned yet */
	_Atomic uint64_t copy_faults;	/* SIGBUS while copying a client's buffer */
	_Atomic uint64_t demoted, demote_dropped, demote_failed;	/* L1 -> L2 */
	_Atomic uint64_t l3_written, l3_dropped, l3_failed;	/* L1 -> L3 write-through */
	_Atomic uint64_t promoted_l2, promoted_l3, promote_failed;	/* L2/L3 -> L1 */
};

struct srv {
	struct srv_config cfg;
	char endpoint[512];
	void *zctx, *sock;
	struct auth *auth;	/* CURVE + ZAP, or NULL */
	int stop_fd;
	struct pool *pool;
	struct idx *idx;
	/* --state-dir (warm.c), or NULL; what its open found; registrations being
	 * resumed by CUDA jobs; set while the registry is rebuilt (no manifest writes). */
	struct warm *warm;
	struct warm_found warm_found;
	unsigned restore_pending, restore_failed;
	bool restoring;
	struct xfer_engine *host_xfer;	/* == engines[0] */
	struct tier_disk *l2;		/* or NULL */
	struct tier_redis *l3;		/* or NULL */
	struct kve *kve;		/* KV cache events (kv_events.c), or NULL */
	struct xfer_engine *engines[SRV_MAX_ENGINES];	/* [0] host, [1 + d] CUDA device d */
	unsigned nengines;
	int ncuda;			/* CUDA devices served (0: host only) */
	char cuda_uuid[SRV_MAX_DEVICES][XFER_CUDA_UUID_STR_BYTES];	/* lowercase, no GPU- */
	pthread_t io_thread;		/* the thread in srv_run */
	bool io_running;
	/* Per CUDA device, per worker: that worker's context, created on its
	 * first job and touched only by that worker thread (no lock). */
	struct xfer_cuda_ctx *cuda_ctx[SRV_MAX_DEVICES][SRV_MAX_WORKERS];
	uint8_t none_hash[KS_HASH_LEN];
	struct srv_instance *instances;
	struct srv_lookup_job *jobs;	/* [SRV_JOB_SLOTS] */
	int64_t next_job_id;
	/* Current dialect: LOOKUP jobs by request_id, and parked WAITs (io thread). */
	struct srv_rid_job **rid_jobs;	/* [SRV_RID_BUCKETS] */
	struct srv_rid_job **rid_ring;	/* [SRV_RID_MAX] insertion order; NULL = gone */
	uint32_t rid_head, rid_span;	/* ring positions in use, holes included */
	struct srv_wait *waits;
	uint32_t nwaits;
	/* Connections and their dialect (io thread); counts mirrored for stats. */
	struct srv_conn **conns;	/* [SRV_CONN_BUCKETS] */
	struct srv_conn *conn_lru_head, *conn_lru_tail;
	uint32_t nconns;
	enum proto_dialect pinned_dialect;	/* --protocol: AUTO, or the one served */
	/* The ROUTER's socket monitor (ACCEPTED/DISCONNECTED with the fd) and,
	 * by fd, whether that socket is open and which connection it carries
	 * (server_conn.c; io thread). NULL monitor: connection state unknown. */
	void *monitor;
	struct srv_fd_slot { bool open; struct srv_conn *conn; } *fds;
	size_t nfds;
	struct srv_conn *cur_conn;	/* connection of the request being dispatched */
	/* The pool's pinning for CUDA (server_pin.c): a thread pins it piece
	 * by piece from the start; [0, pool_pinned_bytes) is pinned. */
	_Atomic uint64_t pool_pinned_bytes;
	uint64_t pool_pin_total;	/* bytes to pin: the region, or 0 (host only) */
	int (*pin_step)(void *base, size_t bytes);	/* NULL: nothing to pin */
	uint64_t pin_test_ms_per_gib;	/* fault point pin.ms_per_gib */
	pthread_t pin_thread;
	bool pin_started;
	int pin_stop_fd;
	void **pin_pieces;		/* bases registered, for unregistering */
	size_t npin_pieces;
	_Atomic uint64_t conns_by_dialect[3];	/* indexed by enum proto_dialect */
	struct srv_session **sessions;	/* [SRV_SESSION_BUCKETS] */
	size_t nsessions;		/* io thread */
	struct srv_session *session_lru_head, *session_lru_tail;	/* by last_used_ms */
	_Atomic uint64_t nsessions_pub;	/* mirror for other threads */
	_Atomic uint64_t ninstances;	/* registry size, for other threads */
	struct srv_last_error *last_errors;	/* [SRV_LAST_ERROR_SLOTS] */
	uint64_t last_tick_ms;
	bool expiry_backlog;		/* housekeeping left due work for the next turn */
	bool busy_poll;			/* --busy-poll in effect (GPU engines only) */
	uint64_t busy_poll_until_ns;	/* io thread polls without sleeping until then */
	uint64_t expired_unlogged;	/* index expiries not yet reported in the log */
	struct srv_counters ctr;
	/* Latency from request receipt to reply, per kind (any thread reads). */
	struct metrics_hist lat_store, lat_retrieve, lat_lookup, lat_ping;
	/* Where STORE [0] / RETRIEVE [1] time goes, summed over finished jobs
	 * (in SRV_PHASE_LIST order); the io thread writes, any thread reads. */
	_Atomic uint64_t phase_ns[2][SRV_PHASES];
	_Atomic uint64_t phase_jobs[2];
	/* The io loop's busy time per turn (poll return to next poll): what a
	 * PING can wait behind. Max since start, and when a slow turn was last logged. */
	struct metrics_hist io_busy;
	_Atomic uint64_t io_busy_max_ns;
	/* The longest turn in this second and in the one before (wall seconds
	 * of CLOCK_MONOTONIC): "io_turn_max_recent_us", for a benchmark's
	 * measuring window or an operator watching a live server. */
	_Atomic uint64_t io_busy_win_ns, io_busy_prev_win_ns;
	uint64_t io_win_s;		/* io thread: the second io_busy_win_ns covers */
	uint64_t io_slow_logged_ms;
	/* Health: the io loop's last turn, and the data-path probe. */
	_Atomic uint64_t io_alive_ms;
	_Atomic uint64_t probe_sent_ms[SRV_MAX_ENGINES];	/* 0 = none outstanding */
	_Atomic uint64_t probe_done_ms[SRV_MAX_ENGINES];
	uint64_t probe_stall_ms;	/* fault point probe.stall_ms */
	uint64_t store_stall_ms;	/* fault point store.stall_ms: before each host
					 * STORE chunk's commit (crash tests) */
	uint64_t cur_recv_ns;		/* receipt time of the request being dispatched */
	/* Frames of the request being dispatched (REGISTER keeps them, --state-dir);
	 * they point into dispatch()'s frame, valid only while it runs. */
	const struct proto_buf *cur_type_frame, *cur_args;
	size_t cur_nargs;
	/* Scratch for hashing and key expansion (io thread only). */
	uint8_t (*hash_buf)[KS_HASH_LEN];
	size_t hash_cap;
	struct ks_key *key_buf;
	size_t key_cap;
};

/* Counters order nothing: relaxed adds, from the io thread and workers alike. */
static inline void srv_ctr_add(_Atomic uint64_t *c, uint64_t v)
{
	atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

/* ------------------------------------------------------------------------ */
/* Shared between the server files (each is documented where it is defined) */

/* server.c: replies and the last-error table (io thread). */
uint64_t srv_identity_hash(const uint8_t *id, size_t len);
void KS_PRINTF(3, 4) srv_set_last_error(struct srv *s, const struct srv_reply_addr *addr,
					const char *fmt, ...);
void srv_send_encoded(struct srv *s, const struct srv_reply_addr *a, int rc, struct proto_msg *m);
void srv_reply_nil(struct srv *s, const struct srv_reply_addr *a);
void srv_reply_xfer_event(struct srv *s, const struct srv_reply_addr *a, const uint8_t *event,
			  size_t event_len, bool ok);
void srv_reply_xfer(struct srv *s, const struct srv_reply_addr *a, bool ok);
void srv_reply_int(struct srv *s, const struct srv_reply_addr *a, int64_t v);
void srv_frame_fault(struct srv *s, const struct srv_reply_addr *a, int rc, const char *why);

/* server_registry.c: instances and sessions. */
void srv_instance_free(struct srv_instance *in);
void srv_instance_put(struct srv_instance *in);
struct srv_instance *srv_instance_find(struct srv *s, int64_t id);
bool srv_instance_owned_by(struct srv *s, struct srv_instance *in, const struct srv_reply_addr *a);
void srv_instance_set_owner(struct srv *s, struct srv_instance *in, const struct srv_reply_addr *a);
void srv_instances_owner_closed(struct srv *s, const struct srv_conn *c);
bool srv_instance_remove(struct srv *s, int64_t id);
struct srv_instance *srv_model_instance(struct srv *s, const char *model, size_t len,
					uint32_t world_size);
int srv_instance_build(struct srv *s, const struct proto_request *rq, struct srv_instance **out,
		       char *err, size_t errlen);
void srv_registry_insert(struct srv *s, struct srv_instance *in);
int srv_registry_submit_cuda(struct srv *s, struct srv_instance *in, const struct proto_request *rq,
			 const struct srv_reply_addr *a);
int srv_registry_keep_frames(struct srv_instance *in, enum proto_dialect d,
			     const struct proto_buf *type, const struct proto_buf *args, size_t nargs);
void srv_registry_persist(struct srv *s, bool clean);
void srv_registry_restore(struct srv *s, unsigned *resumed, unsigned *dropped);
int32_t srv_registry_owner_pid(const struct proto_request *rq);
void srv_session_free(struct srv_session *ss);
bool srv_session_unlink(struct srv *s, const char *rid, size_t len);
bool srv_sessions_expire(struct srv *s, uint64_t now_ms, size_t budget);
const uint8_t (*srv_chunk_hashes(struct srv *s, const struct proto_key *k,
				 size_t nchunks))[KS_HASH_LEN];
ssize_t srv_expand_keys(struct srv *s, const struct proto_key *k,
			const uint8_t (*hashes)[KS_HASH_LEN], size_t first, size_t n);
uint32_t srv_extra_lock_count(uint32_t tp_size, uint32_t world_size);
int srv_key_identity(const struct proto_key *k, char *out, size_t *len);

/* server_xfer.c: STORE/RETRIEVE and the other jobs' life. */
void srv_install_sigbus_guard(void);
void srv_xfer_job_free(struct srv_xfer_job *j);
int srv_submit_job(struct srv *s, unsigned engine, struct srv_xfer_job *j);
void srv_handle_xfer(struct srv *s, const struct srv_reply_addr *a, const struct proto_request *rq);
void srv_drain_completions(struct srv *s);

/* server_lookup.c: current-dialect LOOKUP jobs by request_id, parked WAITs. */
void srv_rid_job_put(struct srv *s, const char *rid, size_t len, int64_t job);
struct srv_rid_job *srv_rid_job_find(struct srv *s, const char *rid, size_t len);
void srv_rid_job_drop(struct srv *s, struct srv_rid_job *r);
void srv_rid_jobs_free(struct srv *s);
void srv_handle_query_current(struct srv *s, const struct srv_reply_addr *a,
			      const struct proto_request *rq, bool consume);
void srv_handle_wait(struct srv *s, const struct srv_reply_addr *a, const struct proto_request *rq);
void srv_waits_poll(struct srv *s, uint64_t now_ms);
void srv_waits_free(struct srv *s);

/* server_conn.c: connections and their dialect. */
struct srv_conn *srv_conn_get(struct srv *s, const uint8_t *identity, size_t len);
void srv_conn_latch(struct srv *s, struct srv_conn *c, enum proto_dialect d);
void srv_conns_free(struct srv *s);
int srv_conn_monitor_open(struct srv *s);
void srv_conn_monitor_drain(struct srv *s);
void srv_conn_bind(struct srv *s, struct srv_conn *c, zmq_msg_t *identity_frame);
bool srv_conn_up(struct srv *s, const uint8_t *identity, size_t len);
bool srv_process_connected(struct srv *s, const struct srv_peer *p);
bool srv_peer_same(const struct srv_peer *a, const struct srv_peer *b);
const char *srv_peer_name(const struct srv_peer *p, char *buf, size_t len);

/* server_pin.c: pinning the pool for CUDA in the background. */
int srv_pin_start(struct srv *s);
void srv_pin_stop(struct srv *s);
bool srv_pool_range_pinned(struct srv *s, const void *p, uint64_t bytes);

/* server_tiers.c: L2/L3. */
void srv_demote_hook(void *arg, const struct ks_key *k, const void *data, uint64_t nbytes);
void srv_disk_evicted(void *arg, const struct ks_key *k);
void srv_l3_write_through(struct srv *s, const struct ks_key *k, uint64_t nbytes);
struct srv_xfer_job *srv_prefetch_job(struct srv *s, const struct ks_key *keys, size_t nkeys,
				      size_t l1_hits, uint32_t group, uint32_t locks_per_key,
				      uint64_t object_bytes, const uint32_t *tokens);

/* server_stats.c: KS_STATS and the data-path probe (io thread). */
void srv_handle_stats(struct srv *s, const struct srv_reply_addr *a);
void srv_maybe_probe(struct srv *s, uint64_t now);

#endif /* KS_SERVER_PRIV_H */
