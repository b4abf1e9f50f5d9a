/*
 * server.c - the io thread: the ROUTER socket, request dispatch, instance
 * registry, lookup jobs, per-request hash sessions, and the host transfer
 * jobs' run() functions.
 *
 * DESIGN: one io thread owns the ZMQ socket (ZMQ sockets are not
 * thread-safe) and everything only it touches: the instance registry, the
 * session hash cache, the lookup job table and the per-client last-error
 * table, so none of them has a lock. It answers PING, NOOP,
 * GET_CHUNK_SIZE, LOOKUP, the QUERY_* calls, FREE_LOOKUP_LOCKS,
 * END_SESSION, CLEAR, REGISTER and UNREGISTER inline; these touch only
 * the index (shard, LRU and pool locks, each briefly) and never wait on a
 * transfer. STORE and RETRIEVE are validated, hashed and given their index
 * entries (reserved or pinned) here, then queued to the transfer engine;
 * workers copy with no lock held and commit/unpin, and the io thread sends
 * the reply when the job comes back through the completion eventfd.
 *
 * Instances are shared with workers by reference count: a queued job holds
 * a reference, so UNREGISTER or the reaper never unmaps memory under a
 * running copy; the last reference unmaps.
 *
 * Lock ordering (full list in docs/architecture.md): this file defines no
 * lock. It calls idx_* and pool_* (shard > LRU > pool) and xfer_* (queue,
 * a leaf) one at a time, never nested, and holds none across zmq calls.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "auth.h"
#include "compiler.h"
#include "hash.h"
#include "index.h"
#include "layout.h"
#include "lock.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "protocol.h"
#include "transfer.h"
#include "transfer_cuda.h"
#include "tier_disk.h"
#include "tier_redis.h"
#include "transfer_host.h"

/* Engines: [0] the host backend, [1 + d] CUDA device d. */
#define SRV_MAX_DEVICES 16
#define SRV_MAX_ENGINES (1 + SRV_MAX_DEVICES)
#define SRV_MAX_WORKERS 256
/* Frames in one request: identity + uid + type + up to 5 arguments, with room. */
#define SRV_MAX_FRAMES 16
/* Messages handled per poll round before completions and timers get a turn. */
#define SRV_RECV_BATCH 64
/* Housekeeping period: TTL expiry, session GC, reaper. */
#define SRV_TICK_MS 100
/* Lookup job table: ids older than this many LOOKUPs ago read as unknown. */
#define SRV_JOB_SLOTS 65536u
/* Per-client last-error table (direct-mapped by identity hash). */
#define SRV_LAST_ERROR_SLOTS 1024u
#define SRV_ERR_MAX 256
/* Sessions: bucket count and the most kept at once (oldest dropped first). */
#define SRV_SESSION_BUCKETS 4096u
#define SRV_SESSION_MAX 65536u
/* CPU priority of the io thread, when the process may raise it (CAP_SYS_NICE). */
#define SRV_IO_NICE (-10)
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
#define SRV_SMALL_FRAME_MAX 16	/* uid and type frames: one msgpack int */
/* An io loop turn busier than this is logged (at most once a second): a PING
 * that arrived during it waited that long. */
#define SRV_IO_SLOW_NS (5ull * 1000 * 1000)

/*
 * The phases of a STORE/RETRIEVE, in order, from receipt to reply:
 * decode..submit on the io thread, the transfer queue, reserve (STORE) or
 * pin (RETRIEVE) on the worker, the copy (host STOREs also commit chunk by
 * chunk inside it), commit/unpin, then the completion hop back to the io
 * thread and the reply.
 */
enum srv_phase { PH_ACCEPT, PH_QUEUE, PH_PREPARE, PH_COPY, PH_FINISH, PH_REPLY, SRV_PHASES };
static const char *const srv_phase_name[SRV_PHASES] = {
	"accept", "queue", "prepare", "copy", "finish", "reply",
};

/* ------------------------------------------------------------------------ */
/* Types                                                                    */

struct srv_mapping {
	void *base;		/* host: mmap base; CUDA: the IPC-opened allocation base */
	size_t len;		/* host: bytes mapped; CUDA: the allocation's size */
	char path[PROTO_PATH_MAX + 1];	/* host_shm */
	uint8_t handle[PROTO_MEM_HANDLE_LEN];	/* cuda_ipc */
};

/* One engine worker's registration (REGISTER_KV_CACHE). */
struct srv_instance {
	_Atomic int refs;	/* registry + each queued job; last put unmaps */
	struct srv *srv;	/* borrowed: for the CUDA unmap job */
	int64_t id;
	char model[KS_MODEL_MAX + 1];
	uint16_t model_len;
	uint32_t world_size;
	struct kv_layout layout;
	uint64_t object_bytes;
	int device;		/* -1: host buffers; else the CUDA ordinal (cuda_ipc) */
	void **layer_ptrs;	/* [num_layers] element 0 of each layer (device
				 * addresses for cuda_ipc); owned */
	struct srv_mapping *maps;	/* owned */
	size_t nmaps;
	uint64_t registered_ms;
	uint64_t last_ping_ms;	/* 0 = never pinged with its id */
	uint8_t owner[SRV_IDENTITY_MAX];	/* ROUTER identity of the registering connection */
	size_t owner_len;
	struct srv_instance *next;	/* registry list (io thread) */
};

struct srv_reply_addr {
	uint8_t identity[SRV_IDENTITY_MAX];
	size_t identity_len;
	uint8_t uid[SRV_SMALL_FRAME_MAX];
	size_t uid_len;
	uint8_t type[SRV_SMALL_FRAME_MAX];
	size_t type_len;
};

struct srv_xfer_job {
	struct xfer_job base;	/* first: the engine hands this pointer back */
	struct srv *srv;
	struct srv_reply_addr addr;
	enum proto_type op;
	struct srv_instance *inst;	/* reference held */
	uint32_t chunk_tokens;
	uint32_t nchunks;
	struct ks_key *keys;		/* [nchunks] */
	struct idx_entry **entries;	/* [nchunks]; NULL = skipped (STORE) */
	int64_t *slots;			/* [nchunks * chunk_tokens] paged slots */
	uint64_t skip_tokens;		/* RETRIEVE */
	int result;			/* 0 or -errno, set by run() */
	char err[SRV_ERR_MAX];
	uint32_t committed;		/* STORE: chunks made READY */
	uint64_t recv_ns;		/* when the request arrived (latency) */
	uint64_t copy_begin_ns, copy_end_ns;	/* worker: around the copy (phase accounting) */
	uint8_t wait_event[PROTO_EVENT_HANDLE_LEN];	/* client's event (CUDA), if has_wait */
	bool has_wait;
	uint8_t done_event[PROTO_EVENT_HANDLE_LEN];	/* our event for the reply (CUDA) */
	bool has_done;
	enum { JOB_XFER = 0, JOB_PROBE, JOB_REGISTER, JOB_UNMAP, JOB_PREFETCH } kind;
	/* JOB_PREFETCH: keys[0..nkeys) of a LOOKUP, of which the first l1_hits are in L1 */
	size_t nkeys, l1_hits;
	uint32_t group, locks_per_key;
	uint64_t object_bytes;
	int64_t lookup_job;
	int64_t prefetch_chunks;	/* result */
	unsigned engine;		/* index into srv.engines it was queued on */
	struct proto_kv_desc *descs;	/* JOB_REGISTER: the layers' descriptors; owned */
};

struct srv_lookup_job {
	int64_t id;		/* -1 = empty */
	int64_t chunks;		/* -1 while a prefetch from L2/L3 is loading */
};

struct srv_session {
	char request_id[PROTO_REQUEST_ID_MAX + 1];
	uint16_t request_id_len;
	uint32_t *tokens;	/* the tokens the hashes cover; owned */
	uint8_t (*hashes)[KS_HASH_LEN];	/* owned */
	size_t nchunks, cap;	/* hashes held / allocated */
	uint64_t last_used_ms;
	struct srv_session *next;
};

struct srv_last_error {
	uint8_t identity[SRV_IDENTITY_MAX];
	size_t identity_len;
	char msg[SRV_ERR_MAX];
};

/* Counters; the io thread writes most, workers a few: all atomics. */
struct srv_counters {
	_Atomic uint64_t requests[PROTO_NOOP + 1];
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
	struct xfer_engine *host_xfer;	/* == engines[0] */
	struct tier_disk *l2;		/* or NULL */
	struct tier_redis *l3;		/* or NULL */
	struct xfer_engine *engines[SRV_MAX_ENGINES];	/* [0] host, [1 + d] CUDA device d */
	unsigned nengines;
	int ncuda;			/* CUDA devices served (0: host only) */
	char cuda_uuid[SRV_MAX_DEVICES][XFER_CUDA_UUID_STR_BYTES];	/* lowercase, no GPU- */
	pthread_t io_thread;		/* the thread in srv_run */
	bool io_running;
	bool pool_pinned;		/* pool registered with cudaHostRegister */
	/* Per CUDA device, per worker: that worker's context, created on its
	 * first job and touched only by that worker thread (no lock). */
	struct xfer_cuda_ctx *cuda_ctx[SRV_MAX_DEVICES][SRV_MAX_WORKERS];
	uint8_t none_hash[KS_HASH_LEN];
	struct srv_instance *instances;
	struct srv_lookup_job *jobs;	/* [SRV_JOB_SLOTS] */
	int64_t next_job_id;
	struct srv_session **sessions;	/* [SRV_SESSION_BUCKETS] */
	size_t nsessions;		/* io thread */
	_Atomic uint64_t nsessions_pub;	/* mirror for other threads */
	_Atomic uint64_t ninstances;	/* registry size, for other threads */
	struct srv_last_error *last_errors;	/* [SRV_LAST_ERROR_SLOTS] */
	uint64_t last_tick_ms;
	struct srv_counters ctr;
	/* Latency from request receipt to reply, per kind (any thread reads). */
	struct metrics_hist lat_store, lat_retrieve, lat_lookup, lat_ping;
	/* Where STORE [0] / RETRIEVE [1] time goes, summed over finished jobs
	 * (enum srv_phase); the io thread writes, any thread reads. */
	_Atomic uint64_t phase_ns[2][SRV_PHASES];
	_Atomic uint64_t phase_jobs[2];
	/* The io loop's busy time per turn (poll return to next poll): what a
	 * PING can wait behind. Max since start, and when a slow turn was last logged. */
	struct metrics_hist io_busy;
	_Atomic uint64_t io_busy_max_ns;
	uint64_t io_slow_logged_ms;
	/* Health: the io loop's last turn, and the data-path probe. */
	_Atomic uint64_t io_alive_ms;
	_Atomic uint64_t probe_sent_ms[SRV_MAX_ENGINES];	/* 0 = none outstanding */
	_Atomic uint64_t probe_done_ms[SRV_MAX_ENGINES];
	uint64_t probe_stall_ms;	/* test hook: KVSTASH_TEST_PROBE_STALL_MS */
	uint64_t cur_recv_ns;		/* receipt time of the request being dispatched */
	/* Scratch for hashing and key expansion (io thread only). */
	uint8_t (*hash_buf)[KS_HASH_LEN];
	size_t hash_cap;
	struct ks_key *key_buf;
	size_t key_cap;
};

static void registry_insert(struct srv *s, struct srv_instance *in);
static void run_register(struct xfer_job *base, unsigned worker);
static void xfer_job_free(struct srv_xfer_job *j);
static int pin_all(struct srv_xfer_job *j);
static struct srv_xfer_job *prefetch_job(struct srv *s, const struct ks_key *keys, size_t nkeys,
					 size_t l1_hits, uint32_t group, uint32_t locks_per_key,
					 uint64_t object_bytes);

/* ------------------------------------------------------------------------ */
/* Copy guard: a client that shrinks its shared file under us raises        */
/* SIGBUS in the copying thread; turn that into a failed job, not a crash.   */

static _Thread_local sigjmp_buf *copy_jmp;
static struct sigaction prev_sigbus;

static void sigbus_handler(int sig, siginfo_t *si, void *uc)
{
	if (copy_jmp)
		siglongjmp(*copy_jmp, 1);
	/* Not ours: behave as before we were installed. */
	sigaction(SIGBUS, &prev_sigbus, NULL);
	(void)si;
	(void)uc;
	raise(sig);
}

static void install_sigbus_guard(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = sigbus_handler;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &prev_sigbus);
}

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */

static void count_request(struct srv *s, enum proto_type t)
{
	if ((unsigned)t <= PROTO_NOOP)
		atomic_fetch_add_explicit(&s->ctr.requests[t], 1, memory_order_relaxed);
}

static inline void ctr_add(_Atomic uint64_t *c, uint64_t v)
{
	atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

static uint64_t identity_hash(const uint8_t *id, size_t len)
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
static void KS_PRINTF(3, 4) set_last_error(struct srv *s, const struct srv_reply_addr *addr,
					   const char *fmt, ...)
{
	struct srv_last_error *le =
		&s->last_errors[identity_hash(addr->identity, addr->identity_len) %
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
		&s->last_errors[identity_hash(addr->identity, addr->identity_len) %
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
		ctr_add(&s->ctr.replies_dropped, 1);
		log_debug("reply dropped: %s", zmq_strerror(zmq_errno()));
	}
}

/* Send an encoded response frame (@rc: the encoder's result) and free it. */
static void send_encoded(struct srv *s, const struct srv_reply_addr *a, int rc,
			 struct proto_msg *m)
{
	if (rc == 0)
		send_reply(s, a, m);
	proto_msg_free(m);
}

static void reply_nil(struct srv *s, const struct srv_reply_addr *a)
{
	struct proto_msg m = { 0 };

	send_encoded(s, a, proto_encode_nil(&m), &m);
}

static void reply_bool(struct srv *s, const struct srv_reply_addr *a, bool v)
{
	struct proto_msg m = { 0 };

	send_encoded(s, a, proto_encode_bool(&m, v), &m);
}

static void reply_int(struct srv *s, const struct srv_reply_addr *a, int64_t v)
{
	struct proto_msg m = { 0 };

	send_encoded(s, a, proto_encode_int(&m, v), &m);
}

static void reply_str(struct srv *s, const struct srv_reply_addr *a, const char *v)
{
	struct proto_msg m = { 0 };

	send_encoded(s, a, proto_encode_str(&m, v), &m);
}

/* [bin event, ok]: 64 bytes on the GPU path, c4 00 on the host path (protocol.md §5.3). */
static void reply_xfer_event(struct srv *s, const struct srv_reply_addr *a,
			     const uint8_t *event, size_t event_len, bool ok)
{
	struct proto_msg m = { 0 };

	send_encoded(s, a, proto_encode_xfer_reply(&m, event, event_len, ok), &m);
}

static void reply_xfer(struct srv *s, const struct srv_reply_addr *a, bool ok)
{
	reply_xfer_event(s, a, NULL, 0, ok);
}

/* ------------------------------------------------------------------------ */
/* Instances                                                                */

static void run_unmap(struct xfer_job *base, unsigned worker);
static int submit_job(struct srv *s, unsigned engine, struct srv_xfer_job *j);

/* Unmap and free; CUDA mappings are closed on the thread that calls this. */
static void instance_free(struct srv_instance *in)
{
	ks_assert_unlocked();
	for (size_t i = 0; i < in->nmaps; i++) {
		if (!in->maps[i].base)
			continue;
		if (in->device >= 0)
			xfer_cuda_ipc_close_mem(in->device, in->maps[i].base);
		else
			munmap(in->maps[i].base, in->maps[i].len);
	}
	free(in->maps);
	free(in->layer_ptrs);
	free(in);
}

/*
 * Drop a reference; the last one unmaps. The io thread makes no CUDA call
 * (a driver call can wait behind a running transfer), so a CUDA instance
 * released there is unmapped by a job on its device's workers.
 */
static void instance_put(struct srv_instance *in)
{
	if (atomic_fetch_sub_explicit(&in->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (in->device >= 0 && in->nmaps && in->srv && in->srv->io_running &&
	    pthread_equal(pthread_self(), in->srv->io_thread)) {
		struct srv_xfer_job *j = calloc(1, sizeof(*j));

		if (j) {
			j->srv = in->srv;
			j->kind = JOB_UNMAP;
			j->inst = in;
			j->base.run = run_unmap;
			if (submit_job(in->srv, 1 + (unsigned)in->device, j) == 0)
				return;
			free(j);
		}
		log_warn("instance %" PRId64 ": unmapping on the io thread (device queue full)",
			 in->id);
	}
	instance_free(in);
}

static struct srv_instance *instance_find(struct srv *s, int64_t id)
{
	for (struct srv_instance *in = s->instances; in; in = in->next)
		if (in->id == id)
			return in;
	return NULL;
}

/* Unlink @id from the registry and drop the registry's reference. */
/* True if @a may use @in (--owner-check): the connection that registered it. */
static bool instance_owned_by(const struct srv *s, const struct srv_instance *in,
			      const struct srv_reply_addr *a)
{
	if (strcmp(s->cfg.owner_check, "on"))
		return true;
	return in->owner_len == a->identity_len && !memcmp(in->owner, a->identity, a->identity_len);
}

static bool instance_remove(struct srv *s, int64_t id)
{
	for (struct srv_instance **pp = &s->instances; *pp; pp = &(*pp)->next) {
		struct srv_instance *in = *pp;

		if (in->id == id) {
			*pp = in->next;
			in->next = NULL;
			atomic_fetch_sub_explicit(&s->ninstances, 1, memory_order_relaxed);
			instance_put(in);
			return true;
		}
	}
	return false;
}

/* An instance serving (@model, @world_size), or NULL (io thread). */
static struct srv_instance *model_instance(struct srv *s, const char *model, size_t len,
					   uint32_t world_size)
{
	for (struct srv_instance *in = s->instances; in; in = in->next)
		if (in->world_size == world_size && in->model_len == len &&
		    !memcmp(in->model, model, len))
			return in;
	return NULL;
}

/* Device ordinal whose UUID is @uuid (8-4-4-4-12, optional "GPU-"), or -1. */
static int cuda_device_of(const struct srv *s, const char *uuid)
{
	if (!strncasecmp(uuid, "GPU-", 4))
		uuid += 4;
	for (int d = 0; d < s->ncuda; d++)
		if (!strcasecmp(uuid, s->cuda_uuid[d]))
			return d;
	return -1;
}

/* Map @path (a POSIX shm name or a file path) read-write, @need bytes at least. */
static int map_host_buffer(const char *path, uint64_t need, struct srv_mapping *m, char *err,
			   size_t errlen)
{
	struct stat st;
	int fd, rc = 0;

	if (path[0] == '/' && !strchr(path + 1, '/'))
		fd = shm_open(path, O_RDWR | O_CLOEXEC, 0);
	else if (path[0] == '/')
		fd = open(path, O_RDWR | O_CLOEXEC);
	else {
		snprintf(err, errlen, "path '%s' is neither a shm name nor an absolute path", path);
		return -EINVAL;
	}
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot open '%s': %s", path, strerror(errno));
		return rc;
	}
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		snprintf(err, errlen, "fstat '%s': %s", path, strerror(errno));
		goto out_close;
	}
	if ((uint64_t)st.st_size < need) {
		snprintf(err, errlen, "'%s' holds %lld bytes, the registration needs %" PRIu64, path,
			 (long long)st.st_size, need);
		rc = -EINVAL;
		goto out_close;
	}
	m->len = (size_t)need;
	m->base = mmap(NULL, m->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m->base == MAP_FAILED) {
		rc = -errno;
		m->base = NULL;
		snprintf(err, errlen, "mmap '%s' (%zu bytes): %s", path, m->len, strerror(errno));
		goto out_close;
	}
	snprintf(m->path, sizeof(m->path), "%s", path);
out_close:
	close(fd);
	return rc;
}

/*
 * Build an instance from a REGISTER request. All layers must share kind,
 * dtype, shape and stride. Each distinct path is mapped once, covering the
 * largest nbytes any layer gives for it.
 */
static int instance_build(struct srv *s, const struct proto_request *rq,
			  struct srv_instance **out, char *err, size_t errlen)
{
	struct srv_instance *in;
	const struct proto_kv_desc *d0 = &rq->layers[0];
	int rc;

	if (rq->nlayers == 0) {
		snprintf(err, errlen, "kv_caches is empty");
		return -EINVAL;
	}
	if (rq->world_size == 0 || rq->world_size > 255) {
		snprintf(err, errlen, "world_size %u out of range 1..255", rq->world_size);
		return -EINVAL;
	}
	for (size_t l = 0; l < rq->nlayers; l++) {
		const struct proto_kv_desc *d = &rq->layers[l];

		if (d->kind != d0->kind || d->layout.kind != d0->layout.kind ||
		    d->layout.dtype != d0->layout.dtype || d->layout.ndim != d0->layout.ndim ||
		    memcmp(d->layout.shape, d0->layout.shape, sizeof(d->layout.shape)) ||
		    memcmp(d->layout.stride, d0->layout.stride, sizeof(d->layout.stride))) {
			snprintf(err, errlen, "layer %zu differs from layer 0 in kind, layout, dtype, "
				 "shape or stride", l);
			return -EINVAL;
		}
	}
	in = calloc(1, sizeof(*in));
	if (!in)
		return -ENOMEM;
	atomic_init(&in->refs, 1);
	in->srv = s;
	in->device = -1;
	if (d0->kind == PROTO_KV_CUDA_IPC) {
		for (size_t l = 1; l < rq->nlayers; l++)
			if (strcasecmp(rq->layers[l].device_uuid, d0->device_uuid)) {
				snprintf(err, errlen, "layer %zu is on another device than layer 0", l);
				rc = -EINVAL;
				goto out_put;
			}
		in->device = cuda_device_of(s, d0->device_uuid);
		if (in->device < 0) {
			snprintf(err, errlen, s->ncuda ? "no visible GPU has UUID %s" :
				 "kv_caches kind cuda_ipc needs the CUDA backend, which this kvstashd "
				 "does not have (no CUDA device, or --cuda=off); device %s",
				 d0->device_uuid);
			rc = s->ncuda ? -ENODEV : -EOPNOTSUPP;
			goto out_put;
		}
	}
	in->id = rq->instance_id;
	memcpy(in->model, rq->model, rq->model_len);
	in->model_len = rq->model_len;
	in->world_size = rq->world_size;
	in->layout = d0->layout;
	in->layout.num_layers = (uint32_t)rq->nlayers;
	rc = kv_layout_init(&in->layout, err, errlen);
	if (rc)
		goto out_put;
	if (s->cfg.chunk_tokens % in->layout.block_size) {
		snprintf(err, errlen, "chunk size %u is not a multiple of block size %u",
			 s->cfg.chunk_tokens, in->layout.block_size);
		rc = -EINVAL;
		goto out_put;
	}
	in->object_bytes = kv_object_bytes(&in->layout, s->cfg.chunk_tokens);
	rc = pool_configure_slots(s->pool, in->object_bytes);
	if (rc == 0)	/* --evict-watermark-pct of the slots, once their size is known */
		idx_set_low_watermark(s->idx, (uint32_t)((uint64_t)pool_nslots(s->pool) *
							 s->cfg.evict_watermark_pct / 100));
	if (rc) {
		snprintf(err, errlen, "objects of %" PRIu64 " bytes do not fit the pool's %" PRIu64
			 "-byte slots (layout mismatch with the first registration, or pool too small)",
			 in->object_bytes, pool_slot_bytes(s->pool));
		goto out_put;
	}
	in->layer_ptrs = calloc(rq->nlayers, sizeof(*in->layer_ptrs));
	in->maps = calloc(rq->nlayers, sizeof(*in->maps));
	if (!in->layer_ptrs || !in->maps) {
		rc = -ENOMEM;
		goto out_put;
	}
	for (size_t l = 0; l < rq->nlayers; l++) {
		const struct proto_kv_desc *d = &rq->layers[l];
		uint64_t need = 0, end = d->offset + in->layout.extent_bytes;
		size_t m;

		if (d->offset > d->nbytes || end > d->nbytes || end < d->offset) {
			snprintf(err, errlen, "layer %zu: offset %" PRIu64 " + extent %" PRIu64
				 " exceeds nbytes %" PRIu64, l, d->offset, in->layout.extent_bytes,
				 d->nbytes);
			rc = -EINVAL;
			goto out_put;
		}
		if (d->offset % in->layout.elem_bytes) {
			snprintf(err, errlen, "layer %zu: offset %" PRIu64 " not aligned to %u-byte "
				 "elements", l, d->offset, in->layout.elem_bytes);
			rc = -EINVAL;
			goto out_put;
		}
		if (in->device >= 0)
			continue;	/* mapped by a job on the device's workers: run_register */
		for (m = 0; m < in->nmaps; m++)
			if (!strcmp(in->maps[m].path, d->path))
				break;
		if (m == in->nmaps) {
			/* First use of this path: map the most any layer needs from it. */
			for (size_t k = l; k < rq->nlayers; k++)
				if (!strcmp(rq->layers[k].path, d->path) && rq->layers[k].nbytes > need)
					need = rq->layers[k].nbytes;
			rc = map_host_buffer(d->path, need, &in->maps[m], err, errlen);
			if (rc)
				goto out_put;
			in->nmaps++;
		}
		in->layer_ptrs[l] = (uint8_t *)in->maps[m].base + d->offset;
	}
	in->registered_ms = ks_now_ms();
	*out = in;
	return 0;
out_put:
	instance_put(in);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* Sessions: per-request_id cache of chunk hashes (protocol.md §4.2).       */

static uint64_t rid_hash(const char *rid, size_t len)
{
	return identity_hash((const uint8_t *)rid, len);
}

static void session_free(struct srv_session *ss)
{
	free(ss->tokens);
	free(ss->hashes);
	free(ss);
}

static bool session_unlink(struct srv *s, const char *rid, size_t len)
{
	struct srv_session **pp = &s->sessions[rid_hash(rid, len) % SRV_SESSION_BUCKETS];

	for (; *pp; pp = &(*pp)->next) {
		struct srv_session *ss = *pp;

		if (ss->request_id_len == len && !memcmp(ss->request_id, rid, len)) {
			*pp = ss->next;
			session_free(ss);
			s->nsessions--;
			atomic_store_explicit(&s->nsessions_pub, s->nsessions, memory_order_relaxed);
			return true;
		}
	}
	return false;
}

/* Drop sessions idle past the TTL; when over the cap, also the oldest. */
static void sessions_expire(struct srv *s, uint64_t now_ms)
{
	uint64_t ttl = (uint64_t)s->cfg.session_ttl_s * 1000;

	for (size_t b = 0; b < SRV_SESSION_BUCKETS; b++) {
		struct srv_session **pp = &s->sessions[b];

		while (*pp) {
			struct srv_session *ss = *pp;

			if (now_ms - ss->last_used_ms > ttl) {
				*pp = ss->next;
				session_free(ss);
				s->nsessions--;
			} else {
				pp = &ss->next;
			}
		}
	}
	atomic_store_explicit(&s->nsessions_pub, s->nsessions, memory_order_relaxed);
}

static int ensure_hash_cap(struct srv *s, size_t n)
{
	if (n <= s->hash_cap)
		return 0;
	void *p = realloc(s->hash_buf, n * KS_HASH_LEN);
	if (!p)
		return -ENOMEM;
	s->hash_buf = p;
	s->hash_cap = n;
	return 0;
}

/*
 * Hashes of the first @nchunks full chunks of @k's tokens, through the
 * session cache: a cached prefix is reused only where its tokens equal the
 * request's, so the result always equals a fresh computation. Returns a
 * pointer valid until the next call, or NULL on -ENOMEM.
 */
static const uint8_t (*chunk_hashes(struct srv *s, const struct proto_key *k,
				    size_t nchunks))[KS_HASH_LEN]
{
	uint32_t C = s->cfg.chunk_tokens;
	struct srv_session *ss = NULL, **bucket;
	size_t reuse = 0;

	if (nchunks == 0)
		return s->hash_buf;
	bucket = &s->sessions[rid_hash(k->request_id, k->request_id_len) % SRV_SESSION_BUCKETS];
	for (ss = *bucket; ss; ss = ss->next)
		if (ss->request_id_len == k->request_id_len &&
		    !memcmp(ss->request_id, k->request_id, k->request_id_len))
			break;
	if (!ss && s->nsessions < SRV_SESSION_MAX) {
		ss = calloc(1, sizeof(*ss));
		if (ss) {
			memcpy(ss->request_id, k->request_id, k->request_id_len);
			ss->request_id_len = k->request_id_len;
			ss->next = *bucket;
			*bucket = ss;
			s->nsessions++;
			atomic_store_explicit(&s->nsessions_pub, s->nsessions, memory_order_relaxed);
		}
	}
	if (ss) {
		/* Reuse the longest cached prefix whose tokens are unchanged. */
		size_t same = KS_MIN(ss->nchunks, nchunks);

		while (reuse < same &&
		       !memcmp(ss->tokens + reuse * C, k->token_ids + reuse * C, (size_t)C * 4))
			reuse++;
		ss->last_used_ms = ks_now_ms();
		if (nchunks > ss->cap) {
			void *t = realloc(ss->tokens, nchunks * (size_t)C * 4);

			if (t)
				ss->tokens = t;
			void *h = t ? realloc(ss->hashes, nchunks * KS_HASH_LEN) : NULL;

			if (h)
				ss->hashes = h;
			if (!t || !h) {
				/* Out of memory for the cache: fall back to hashing from scratch. */
				session_unlink(s, k->request_id, k->request_id_len);
				ss = NULL;
				reuse = 0;
			} else {
				ss->cap = nchunks;
			}
		}
	}
	if (!ss) {
		if (ensure_hash_cap(s, nchunks))
			return NULL;
		ks_hash_chunks(s->none_hash, k->token_ids, 0, nchunks, C, s->hash_buf);
		return (const uint8_t(*)[KS_HASH_LEN])s->hash_buf;
	}
	if (reuse < nchunks) {
		ks_hash_chunks(reuse ? ss->hashes[reuse - 1] : s->none_hash, k->token_ids, reuse,
			       nchunks - reuse, C, ss->hashes + reuse);
		memcpy(ss->tokens + reuse * C, k->token_ids + reuse * C,
		       (nchunks - reuse) * (size_t)C * 4);
	}
	/* Grow to @nchunks; a shorter request keeps the longer cached prefix
	 * unless it diverged inside it (then what follows is stale). */
	if (nchunks > ss->nchunks || reuse < KS_MIN(ss->nchunks, nchunks))
		ss->nchunks = nchunks;
	return (const uint8_t(*)[KS_HASH_LEN])ss->hashes;
}

static int ensure_key_cap(struct srv *s, size_t n)
{
	if (n <= s->key_cap)
		return 0;
	void *p = realloc(s->key_buf, n * sizeof(*s->key_buf));
	if (!p)
		return -ENOMEM;
	s->key_buf = p;
	s->key_cap = n;
	return 0;
}

/*
 * Expand chunks [first, first+n) to ObjectKeys for every rank, chunk-major
 * (protocol.md §4.3), into s->key_buf. Returns the key count or -errno.
 */
static ssize_t expand_keys(struct srv *s, const struct proto_key *k,
			   const uint8_t (*hashes)[KS_HASH_LEN], size_t first, size_t n)
{
	size_t ws = k->world_size, nk = n * ws;

	if (ensure_key_cap(s, nk ? nk : 1))
		return -ENOMEM;
	for (size_t c = 0; c < n; c++)
		for (size_t r = 0; r < ws; r++)
			if (ks_key_init(&s->key_buf[c * ws + r], hashes[first + c], k->model,
					k->model_len, ks_kv_rank(k->world_size, (uint32_t)r)))
				return -ENAMETOOLONG;
	return (ssize_t)nk;
}

/* extra_count of protocol.md §4.4. */
static uint32_t extra_lock_count(uint32_t tp_size, uint32_t world_size)
{
	uint32_t tp = tp_size > 1 ? tp_size : world_size;

	return tp > world_size ? tp - 1 : 0;
}


/* ------------------------------------------------------------------------ */
/* Tiers: demotion on L1 eviction, write-through to L3, prefetch into L1.   */

/*
 * The tag stored with a chunk in L2/L3 is its object size: together with the
 * key (hash, model, rank) it identifies the layout, and a promoted chunk of
 * another size is refused rather than served.
 */
static void demote_done(void *arg, int status, uint64_t tag, size_t nbytes)
{
	struct srv *s = arg;

	(void)tag;
	(void)nbytes;
	ctr_add(status ? &s->ctr.demote_failed : &s->ctr.demoted, 1);
}

/* idx eviction hook: runs on the evicting worker with no index lock held. */
static void demote_hook(void *arg, const struct ks_key *k, const void *data, uint64_t nbytes)
{
	struct srv *s = arg;

	/* A copy into the tier's bounded staging; a full tier drops, never blocks. */
	if (tier_disk_put(s->l2, k, nbytes, data, nbytes, TIER_PUT_COPY, demote_done, s))
		ctr_add(&s->ctr.demote_dropped, 1);
}

static void l3_done(void *arg, int status, uint64_t tag, size_t nbytes)
{
	struct srv *s = arg;

	(void)tag;
	(void)nbytes;
	ctr_add(status ? &s->ctr.l3_failed : &s->ctr.l3_written, 1);
}

/* After a STORE committed @k: copy it to Redis so other kvstashd can find it. */
static void l3_write_through(struct srv *s, const struct ks_key *k, uint64_t nbytes)
{
	struct idx_entry *e;

	if (!s->l3)
		return;
	/* Pinned while copied: eviction cannot reuse the slot under the copy. */
	if (idx_pin(s->idx, k, nbytes, &e))
		return;
	if (tier_redis_put(s->l3, k, nbytes, idx_entry_data(s->idx, e), nbytes, TIER_REDIS_PUT_COPY,
			   l3_done, s))
		ctr_add(&s->ctr.l3_dropped, 1);
	idx_unpin(s->idx, e);
}

/* One tier read, waited for on a worker. The callback touches only this struct. */
struct tier_wait {
	int efd;
	_Atomic int status;
	size_t nbytes;
	uint64_t tag;
};

static void tier_wait_done(void *arg, int status, uint64_t tag, size_t nbytes)
{
	struct tier_wait *w = arg;
	uint64_t one = 1;

	w->tag = tag;
	w->nbytes = nbytes;
	atomic_store(&w->status, status);
	if (write(w->efd, &one, sizeof(one)) < 0)
		log_error("tier wait: eventfd write: %s", strerror(errno));
}

#define SRV_TIER_WAIT_STEP_MS 100

/*
 * Wait for the callback of a submitted read. Returns its status, or
 * -ETIMEDOUT after @timeout_ms (--transfer-timeout-ms): then the read still
 * owns @w and its buffer, which are deliberately leaked (never freed under
 * I/O).
 */
static int tier_wait(struct tier_wait *w, uint32_t timeout_ms)
{
	struct pollfd pfd = { .fd = w->efd, .events = POLLIN };

	ks_assert_unlocked();
	for (uint32_t waited = 0; waited < timeout_ms; waited += SRV_TIER_WAIT_STEP_MS)
		if (poll(&pfd, 1, SRV_TIER_WAIT_STEP_MS) > 0)
			return atomic_load(&w->status);
	return -ETIMEDOUT;
}

/* Read @k from L2, else L3, into @dst. 0, or -errno (the chunk is not served). */
static int tier_read(struct srv *s, const struct ks_key *k, void *dst, uint64_t nbytes,
		     bool *from_l3, bool *leaked)
{
	struct tier_wait *w = calloc(1, sizeof(*w));
	int rc = -ENOENT;

	*leaked = false;
	*from_l3 = false;
	if (!w)
		return -ENOMEM;
	w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (w->efd < 0) {
		free(w);
		return -EMFILE;
	}
	*from_l3 = false;
	if (s->l2 && tier_disk_contains(s->l2, k, NULL, NULL)) {
		rc = tier_disk_get(s->l2, k, dst, nbytes, tier_wait_done, w);
		if (rc == 0)
			rc = tier_wait(w, s->cfg.transfer_timeout_ms);
	}
	if (rc && rc != -ETIMEDOUT && s->l3) {
		uint64_t v;

		if (read(w->efd, &v, sizeof(v)) < 0) {
			/* nothing pending: fine */
		}
		*from_l3 = true;
		rc = tier_redis_get(s->l3, k, dst, nbytes, tier_wait_done, w);
		if (rc == 0)
			rc = tier_wait(w, s->cfg.transfer_timeout_ms);
	}
	if (rc == -ETIMEDOUT) {
		*leaked = true;
		log_error("tier read did not complete in %u ms: its buffer stays reserved",
			  s->cfg.transfer_timeout_ms);
		return rc;
	}
	if (rc == 0 && (w->nbytes != nbytes || w->tag != nbytes))
		rc = -EMSGSIZE;	/* another layout's object: never served */
	close(w->efd);
	free(w);
	return rc;
}

/*
 * Worker side of a LOOKUP that missed in L1: find how far the prefix goes on
 * in L2 (in-memory index) and L3 (EXISTS), load those chunks into L1 in
 * order, stop at the first that fails to load (a shorter hit, never wrong
 * bytes), then read-lock the whole prefix as LOOKUP does.
 */
static void run_prefetch(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	struct srv *s = j->srv;
	size_t start = j->l1_hits, rest = j->nkeys - start, k2 = 0, k3 = 0, loaded = 0;
	size_t lock_start = start / j->group * j->group, hits = 0;

	(void)worker;
	if (s->l2)
		k2 = tier_disk_contains_prefix(s->l2, j->keys + start, rest);
	if (s->l3 && k2 < rest) {
		bool *present = calloc(rest - k2, sizeof(*present));

		if (present) {
			long r = tier_redis_exists_wait(s->l3, j->keys + start + k2, rest - k2, present,
							SRV_L3_EXISTS_TIMEOUT_MS);
			k3 = r > 0 ? (size_t)r : 0;
			free(present);
		}
	}
	for (; loaded < k2 + k3; loaded++) {
		const struct ks_key *k = &j->keys[start + loaded];
		struct idx_entry *e;
		bool from_l3 = false, leaked = false;
		int rc = idx_reserve_write(s->idx, k, j->object_bytes, &e);

		if (rc == -EEXIST)
			continue;	/* stored meanwhile (or being stored): counts if READY below */
		if (rc)
			break;
		rc = tier_read(s, k, idx_entry_data(s->idx, e), j->object_bytes, &from_l3, &leaked);
		if (leaked)
			break;	/* the reservation stays: the read may still write its slot */
		if (rc) {
			idx_abort_write(s->idx, e);
			ctr_add(&s->ctr.promote_failed, 1);
			log_info("prefetch: %s chunk failed to load (%s): prefix ends here",
				 from_l3 ? "L3" : "L2", strerror(-rc));
			break;
		}
		if (idx_commit_write(s->idx, e) != 0)
			break;
		ctr_add(from_l3 ? &s->ctr.promoted_l3 : &s->ctr.promoted_l2, 1);
	}
	/* Lock what is READY now from the first unlocked group on (LOOKUP locked
	 * [0, lock_start) already); idx_lookup_lock stops at the first miss. */
	if (idx_lookup_lock(s->idx, j->keys + lock_start, start + loaded - lock_start, j->group,
			    j->locks_per_key, &hits) == 0)
		j->prefetch_chunks = (int64_t)((lock_start + hits) / j->group);
	else
		j->prefetch_chunks = (int64_t)(lock_start / j->group);
}

/* ------------------------------------------------------------------------ */
/* Inline handlers                                                          */

static void handle_register(struct srv *s, const struct srv_reply_addr *a,
			    const struct proto_request *rq)
{
	struct srv_instance *in = NULL;
	char err[SRV_ERR_MAX];
	int rc;

	rc = instance_build(s, rq, &in, err, sizeof(err));
	if (rc) {
		ctr_add(&s->ctr.semantic_errors, 1);
		set_last_error(s, a, "REGISTER_KV_CACHE instance %" PRId64 ": %s", rq->instance_id,
			       err);
		/* The pinned protocol has no error reply here; STOREs to it will fail. */
		reply_nil(s, a);
		return;
	}
	memcpy(in->owner, a->identity, a->identity_len);
	in->owner_len = a->identity_len;
	if (in->device >= 0) {
		/* IPC handles are opened by the device's workers; the reply waits for it. */
		struct srv_xfer_job *j = calloc(1, sizeof(*j));

		if (j)
			j->descs = malloc(rq->nlayers * sizeof(*j->descs));
		if (!j || !j->descs) {
			if (j)
				free(j);
			instance_put(in);
			set_last_error(s, a, "REGISTER_KV_CACHE instance %" PRId64 ": out of memory",
				       rq->instance_id);
			reply_nil(s, a);
			return;
		}
		memcpy(j->descs, rq->layers, rq->nlayers * sizeof(*j->descs));
		j->srv = s;
		j->addr = *a;
		j->kind = JOB_REGISTER;
		j->op = PROTO_REGISTER_KV_CACHE;
		j->inst = in;
		j->base.run = run_register;
		rc = submit_job(s, 1 + (unsigned)in->device, j);
		if (rc) {
			set_last_error(s, a, "REGISTER_KV_CACHE instance %" PRId64 ": device queue: %s",
				       rq->instance_id, strerror(-rc));
			xfer_job_free(j);
			reply_nil(s, a);
		}
		return;
	}
	registry_insert(s, in);
	reply_nil(s, a);
}

/* Put a built instance into the registry, replacing one with the same id. */
static void registry_insert(struct srv *s, struct srv_instance *in)
{
	if (instance_remove(s, in->id))
		log_info("instance %" PRId64 ": re-registered, previous registration dropped",
			 in->id);
	in->next = s->instances;
	s->instances = in;
	atomic_fetch_add_explicit(&s->ninstances, 1, memory_order_relaxed);
	log_info("instance %" PRId64 ": registered model '%s' world_size %u, %u layers %s %s "
		 "[NB %u, BS %u, NH %u, HS %u] on %s %d, %zu mapping(s), object %" PRIu64 " bytes",
		 in->id, in->model, in->world_size, in->layout.num_layers,
		 kv_layout_kind_name(in->layout.kind), kv_dtype_name(in->layout.dtype),
		 in->layout.num_blocks, in->layout.block_size, in->layout.num_heads,
		 in->layout.head_size, in->device >= 0 ? "cuda device" : "host, pid-shared files",
		 in->device >= 0 ? in->device : (int)in->nmaps, in->nmaps, in->object_bytes);
}

static void handle_unregister(struct srv *s, const struct srv_reply_addr *a,
			      const struct proto_request *rq)
{
	struct srv_instance *in = instance_find(s, rq->instance_id);

	if (in && !instance_owned_by(s, in, a)) {
		ctr_add(&s->ctr.semantic_errors, 1);
		set_last_error(s, a, "UNREGISTER_KV_CACHE: instance %" PRId64 " was registered by "
			       "another connection", rq->instance_id);
		reply_nil(s, a);
		return;
	}
	if (instance_remove(s, rq->instance_id))
		log_info("instance %" PRId64 ": unregistered", rq->instance_id);
	else
		log_info("UNREGISTER_KV_CACHE of unknown instance %" PRId64, rq->instance_id);
	reply_nil(s, a);
}

static void handle_lookup(struct srv *s, const struct srv_reply_addr *a,
			  const struct proto_request *rq)
{
	const struct proto_key *k = &rq->key;
	size_t nchunks = k->ntokens / s->cfg.chunk_tokens, hits = 0;
	int64_t chunks = 0;
	struct srv_lookup_job *job;
	struct srv_instance *in = NULL;
	struct srv_xfer_job *pf = NULL;

	if (k->world_size == 0 || k->world_size > 255) {
		set_last_error(s, a, "LOOKUP: world_size %u out of range 1..255", k->world_size);
	} else if ((in = model_instance(s, k->model, k->model_len, k->world_size)) && nchunks) {
		const uint8_t(*h)[KS_HASH_LEN] = chunk_hashes(s, k, nchunks);
		ssize_t nk = h ? expand_keys(s, k, h, 0, nchunks) : -ENOMEM;

		if (nk < 0) {
			set_last_error(s, a, "LOOKUP: %s", strerror((int)-nk));
		} else {
			int rc = idx_lookup_lock(s->idx, s->key_buf, (size_t)nk, k->world_size,
						 1 + extra_lock_count(rq->tp_size, k->world_size),
						 &hits);
			if (rc)
				set_last_error(s, a, "LOOKUP: index: %s", strerror(-rc));
			else
				chunks = (int64_t)(hits / k->world_size);
			if (!rc && hits < (size_t)nk && (s->l2 || s->l3))
				pf = prefetch_job(s, s->key_buf, (size_t)nk, hits, k->world_size,
						  1 + extra_lock_count(rq->tp_size, k->world_size),
						  in->object_bytes);
		}
	}
	job = &s->jobs[(uint64_t)s->next_job_id % SRV_JOB_SLOTS];
	job->id = s->next_job_id;
	job->chunks = chunks;
	if (pf) {
		/* The rest of the prefix may be in L2/L3: QUERY_* answer nil until loaded. */
		pf->lookup_job = job->id;
		if (submit_job(s, 0, pf) == 0) {
			job->chunks = -1;
			chunks = 0;
		} else {
			xfer_job_free(pf);
		}
	}
	ctr_add(&s->ctr.lookup_hit_chunks, (uint64_t)chunks);
	log_debug("LOOKUP model '%s' %zu tokens: %" PRId64 " chunk(s) hit, job %" PRId64,
		  k->model, k->ntokens, chunks, job->id);
	reply_int(s, a, s->next_job_id++);
}

/* A prefetch job for LOOKUP keys [@l1_hits, @nkeys) (copies the keys), or NULL. */
static struct srv_xfer_job *prefetch_job(struct srv *s, const struct ks_key *keys, size_t nkeys,
					 size_t l1_hits, uint32_t group, uint32_t locks_per_key,
					 uint64_t object_bytes)
{
	struct srv_xfer_job *j = calloc(1, sizeof(*j));

	if (!j)
		return NULL;
	j->keys = malloc(nkeys * sizeof(*j->keys));
	if (!j->keys) {
		free(j);
		return NULL;
	}
	memcpy(j->keys, keys, nkeys * sizeof(*keys));
	j->srv = s;
	j->kind = JOB_PREFETCH;
	j->nkeys = nkeys;
	j->l1_hits = l1_hits;
	j->group = group;
	j->locks_per_key = locks_per_key;
	j->object_bytes = object_bytes;
	j->base.run = run_prefetch;
	return j;
}

static void handle_query(struct srv *s, const struct srv_reply_addr *a,
			 const struct proto_request *rq, bool consume)
{
	struct srv_lookup_job *job;

	if (rq->job_id < 0) {
		reply_nil(s, a);
		return;
	}
	job = &s->jobs[(uint64_t)rq->job_id % SRV_JOB_SLOTS];
	if (job->id != rq->job_id || job->chunks < 0) {
		reply_nil(s, a);	/* unknown, consumed, too old, or still loading */
		return;
	}
	reply_int(s, a, job->chunks);
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
		set_last_error(s, a, "FREE_LOOKUP_LOCKS: world_size %u out of range", k->world_size);
	} else if (first < last) {
		const uint8_t(*h)[KS_HASH_LEN] = chunk_hashes(s, k, last);
		ssize_t nk = h ? expand_keys(s, k, h, first, last - first) : -ENOMEM;
		uint32_t n = 1 + extra_lock_count(rq->tp_size, k->world_size);

		for (ssize_t i = 0; i < nk; i++)
			idx_release_read_locks(s->idx, &s->key_buf[i], n);
	}
	reply_nil(s, a);
}

static void handle_clear(struct srv *s, const struct srv_reply_addr *a)
{
	size_t n = idx_clear(s->idx);

	log_info("CLEAR: %zu object(s) dropped", n);
	reply_nil(s, a);
}

static void handle_stats(struct srv *s, const struct srv_reply_addr *a);
static void maybe_probe(struct srv *s, uint64_t now);
static void frame_fault(struct srv *s, const struct srv_reply_addr *a, int rc, const char *why);

/* ------------------------------------------------------------------------ */
/* STORE / RETRIEVE                                                         */

static void xfer_job_free(struct srv_xfer_job *j)
{
	if (j->inst)
		instance_put(j->inst);
	free(j->keys);
	free(j->entries);
	free(j->slots);
	free(j->descs);
	free(j);
}

/* Queue @j on engine @engine (io thread). 0 or -errno from xfer_submit. */
static int submit_job(struct srv *s, unsigned engine, struct srv_xfer_job *j)
{
	if (engine >= s->nengines || !s->engines[engine])
		return -ENODEV;
	j->engine = engine;
	return xfer_submit(s->engines[engine], &j->base);
}

/*
 * STORE, on a worker: reserve a WRITING entry per chunk (not on the io
 * thread: it takes no index lock a busy worker might hold). Present chunks
 * and those without space are skipped and counted. Returns how many were
 * reserved; j->entries[c] is NULL for the others.
 */
static uint32_t reserve_chunks(struct srv_xfer_job *j)
{
	uint32_t n = 0;

	for (uint32_t c = 0; c < j->nchunks; c++) {
		int rc = idx_reserve_write(j->srv->idx, &j->keys[c], j->inst->object_bytes,
					   &j->entries[c]);

		if (rc) {
			j->entries[c] = NULL;
			ctr_add(rc == -EEXIST ? &j->srv->ctr.store_chunks_skipped :
				&j->srv->ctr.store_chunks_nospace, 1);
		} else {
			n++;
		}
	}
	return n;
}

/* STORE, after chunk @c was copied: make it READY, write it through to L3. */
static void commit_chunk(struct srv_xfer_job *j, uint32_t c)
{
	struct idx_entry *e = j->entries[c];

	j->entries[c] = NULL;
	if (idx_commit_write(j->srv->idx, e) == 0) {
		j->committed++;
		l3_write_through(j->srv, &j->keys[c], j->inst->object_bytes);
	} else {
		ctr_add(&j->srv->ctr.store_chunks_lost, 1);
	}
}

/* ---- CUDA jobs: run on device d's workers, each with its own context ---- */

#define SRV_CUDA_DRAIN_STEP_MS 1000

/* This worker's context on @dev, created on first use (only this thread touches it). */
static struct xfer_cuda_ctx *cuda_ctx_of(struct srv *s, int dev, unsigned worker, char *err,
					 size_t errlen)
{
	struct xfer_cuda_ctx **slot = &s->cuda_ctx[dev][worker];
	struct xfer_cuda_opts o = { .host_base = pool_region(s->pool),
				    .host_bytes = pool_region_bytes(s->pool) };
	int rc;

	if (*slot && xfer_cuda_ctx_failed(*slot)) {
		snprintf(err, errlen, "cuda device %d: this worker's context failed earlier "
			 "(sticky CUDA error)", dev);
		return NULL;
	}
	if (*slot)
		return *slot;
	rc = xfer_cuda_ctx_create(dev, &o, slot);
	if (rc) {
		snprintf(err, errlen, "cuda device %d: cannot create a transfer context: %s", dev,
			 strerror(-rc));
		*slot = NULL;
		return NULL;
	}
	return *slot;
}

/* Run one CUDA copy; on a timeout wait for the device before anything is released. */
static int cuda_copy(struct xfer_cuda_ctx *ctx, bool store, const struct xfer_cuda_job *cj)
{
	int rc = store ? xfer_cuda_store(ctx, cj) : xfer_cuda_retrieve(ctx, cj);

	if (rc == -ETIMEDOUT || rc == -EBUSY) {
		int d;

		log_error("cuda copy not done after %u ms: waiting for the device before "
			  "releasing its buffers", cj->timeout_ms);
		while ((d = xfer_cuda_drain(ctx, SRV_CUDA_DRAIN_STEP_MS)) == -ETIMEDOUT)
			;
		if (rc == -EBUSY && d == 0)	/* an older job was in flight: retry once */
			rc = store ? xfer_cuda_store(ctx, cj) : xfer_cuda_retrieve(ctx, cj);
	}
	return rc;
}

static void run_store_cuda(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	const struct srv_instance *in = j->inst;
	uint32_t C = j->chunk_tokens, nres = 0;
	struct xfer_cuda_ctx *ctx = cuda_ctx_of(j->srv, in->device, worker, j->err, sizeof(j->err));
	int64_t *slots = NULL;
	void **objs = NULL;
	int rc;

	if (!ctx) {
		j->result = -EIO;
		return;
	}
	nres = reserve_chunks(j);
	j->copy_begin_ns = ks_now_ns();
	/* Only the reserved chunks are copied: pack their slots and objects. */
	slots = malloc((size_t)nres * C * sizeof(*slots));
	objs = malloc((nres ? nres : 1) * sizeof(*objs));
	if (!slots || !objs) {
		snprintf(j->err, sizeof(j->err), "out of memory");
		j->result = -ENOMEM;
		goto out_abort;
	}
	nres = 0;
	for (uint32_t c = 0; c < j->nchunks; c++) {
		if (!j->entries[c])
			continue;
		memcpy(slots + (size_t)nres * C, j->slots + (size_t)c * C, (size_t)C * sizeof(*slots));
		objs[nres++] = idx_entry_data(j->srv->idx, j->entries[c]);
	}
	struct xfer_cuda_job cj = {
		.layout = &in->layout, .layers = in->layer_ptrs, .slots = slots,
		.ntokens = nres * C, .chunk_tokens = C, .objs = objs,
		.wait_event = j->has_wait ? j->wait_event : NULL, .done_event = j->done_event,
		.timeout_ms = j->srv->cfg.transfer_timeout_ms,
	};
	rc = cuda_copy(ctx, true, &cj);
	j->copy_end_ns = ks_now_ns();
	if (rc) {
		snprintf(j->err, sizeof(j->err), "cuda device %d: STORE copy failed: %s", in->device,
			 strerror(-rc));
		j->result = rc;
		goto out_abort;
	}
	j->has_done = nres > 0;
	for (uint32_t c = 0; c < j->nchunks; c++) {
		if (j->entries[c])
			commit_chunk(j, c);
	}
	free(slots);
	free(objs);
	return;
out_abort:
	for (uint32_t c = 0; c < j->nchunks; c++)
		if (j->entries[c]) {
			idx_abort_write(j->srv->idx, j->entries[c]);
			j->entries[c] = NULL;
		}
	free(slots);
	free(objs);
}

static void run_retrieve_cuda(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	const struct srv_instance *in = j->inst;
	struct xfer_cuda_ctx *ctx = cuda_ctx_of(j->srv, in->device, worker, j->err, sizeof(j->err));
	void **objs;
	int rc;

	if (!ctx) {
		j->result = -EIO;
		return;
	}
	if (pin_all(j))
		return;
	j->copy_begin_ns = ks_now_ns();
	objs = malloc(j->nchunks * sizeof(*objs));
	if (!objs) {
		snprintf(j->err, sizeof(j->err), "out of memory");
		j->result = -ENOMEM;
	} else {
		for (uint32_t c = 0; c < j->nchunks; c++)
			objs[c] = idx_entry_data(j->srv->idx, j->entries[c]);
		struct xfer_cuda_job cj = {
			.layout = &in->layout, .layers = in->layer_ptrs, .slots = j->slots,
			.ntokens = j->nchunks * j->chunk_tokens, .chunk_tokens = j->chunk_tokens,
			.objs = objs,
			.skip_tokens = (uint32_t)KS_MIN(j->skip_tokens, (uint64_t)j->nchunks *
							j->chunk_tokens),
			.wait_event = j->has_wait ? j->wait_event : NULL, .done_event = j->done_event,
			.timeout_ms = j->srv->cfg.transfer_timeout_ms,
		};
		rc = cuda_copy(ctx, false, &cj);
		j->copy_end_ns = ks_now_ns();
		if (rc) {
			snprintf(j->err, sizeof(j->err), "cuda device %d: RETRIEVE copy failed: %s",
				 in->device, strerror(-rc));
			j->result = rc;
		} else {
			j->has_done = true;
		}
		free(objs);
	}
	/* Unpin after the device is done (cuda_copy drained it); locks go only on success. */
	for (uint32_t c = 0; c < j->nchunks; c++) {
		idx_unpin(j->srv->idx, j->entries[c]);
		if (j->result == 0)
			idx_release_read_locks(j->srv->idx, &j->keys[c], 1);
		j->entries[c] = NULL;
	}
}

/* Open each distinct IPC handle once, check every layer against its allocation. */
static void run_register(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	struct srv_instance *in = j->inst;
	int dev = in->device, rc;

	(void)worker;
	for (uint32_t l = 0; l < in->layout.num_layers; l++) {
		const struct proto_kv_desc *d = &j->descs[l];
		size_t m;

		for (m = 0; m < in->nmaps; m++)
			if (!memcmp(in->maps[m].handle, d->mem_handle, PROTO_MEM_HANDLE_LEN))
				break;
		if (m == in->nmaps) {
			void *base_ptr = NULL, *alloc = NULL;
			size_t bytes = 0;

			rc = xfer_cuda_ipc_open_mem(dev, d->mem_handle, &base_ptr);
			if (rc) {
				snprintf(j->err, sizeof(j->err), "layer %u: cudaIpcOpenMemHandle on "
					 "device %d failed (stale handle, or one from this process)",
					 l, dev);
				j->result = rc;
				return;
			}
			memcpy(in->maps[m].handle, d->mem_handle, PROTO_MEM_HANDLE_LEN);
			in->maps[m].base = base_ptr;
			in->nmaps++;
			rc = xfer_cuda_mem_range(dev, base_ptr, &alloc, &bytes);
			if (rc || alloc != base_ptr) {
				snprintf(j->err, sizeof(j->err), "layer %u: cannot size the shared "
					 "allocation: %s", l, strerror(rc ? -rc : EINVAL));
				j->result = rc ? rc : -EINVAL;
				return;
			}
			in->maps[m].len = bytes;
		}
		if (d->offset + in->layout.extent_bytes > in->maps[m].len) {
			snprintf(j->err, sizeof(j->err), "layer %u: offset %" PRIu64 " + extent %" PRIu64
				 " exceeds the shared allocation's %zu bytes", l, d->offset,
				 in->layout.extent_bytes, in->maps[m].len);
			j->result = -ERANGE;
			return;
		}
		in->layer_ptrs[l] = (uint8_t *)in->maps[m].base + d->offset;
	}
}

static void run_unmap(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;

	(void)worker;
	instance_free(j->inst);
	j->inst = NULL;
}

/* Worker side of STORE: gather each reserved chunk, then make it READY. */
static void run_store(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	const struct srv_instance *in = j->inst;
	uint32_t C = j->chunk_tokens;
	sigjmp_buf jb;
	volatile uint32_t i = 0;

	(void)worker;
	reserve_chunks(j);
	j->copy_begin_ns = ks_now_ns();
	if (sigsetjmp(jb, 0)) {
		copy_jmp = NULL;
		ctr_add(&j->srv->ctr.copy_faults, 1);
		snprintf(j->err, sizeof(j->err), "bus error while copying (the client's shared KV "
			 "file was truncated, or host memory for the pool ran out)");
		j->result = -EFAULT;
		/* The chunk being copied and all later ones are dropped. */
		for (uint32_t c = i; c < j->nchunks; c++)
			if (j->entries[c]) {
				idx_abort_write(j->srv->idx, j->entries[c]);
				j->entries[c] = NULL;
			}
		return;
	}
	for (; i < j->nchunks; i++) {
		struct idx_entry *e = j->entries[i];

		if (!e)
			continue;
		copy_jmp = &jb;
		xfer_host_gather(&in->layout, in->layer_ptrs, j->slots + (size_t)i * C, C,
				 idx_entry_data(j->srv->idx, e));
		copy_jmp = NULL;
		commit_chunk(j, i);
	}
	j->copy_end_ns = ks_now_ns();
}

/*
 * Pin every chunk of a RETRIEVE, all or nothing: a missing chunk fails it,
 * writes nothing and releases no read locks (protocol.md §3 RETRIEVE step 4).
 * Returns 0, or the error (also in j->result / j->err) with nothing pinned.
 */
static int pin_all(struct srv_xfer_job *j)
{
	for (uint32_t c = 0; c < j->nchunks; c++) {
		int rc = idx_pin(j->srv->idx, &j->keys[c], j->inst->object_bytes, &j->entries[c]);

		if (rc) {
			char hex[2 * KS_HASH_LEN + 1];

			for (uint32_t u = 0; u < c; u++)
				idx_unpin(j->srv->idx, j->entries[u]);
			memset(j->entries, 0, j->nchunks * sizeof(*j->entries));
			ks_hash_hex(j->keys[c].chunk_hash, hex);
			ctr_add(&j->srv->ctr.retrieve_miss, 1);
			snprintf(j->err, sizeof(j->err), "chunk %u (%.16s...) %s", c, hex,
				 rc == -ENOENT ? "is not cached" :
				 rc == -EMSGSIZE ? "has another layout's size" : strerror(-rc));
			j->result = rc;
			return rc;
		}
	}
	return 0;
}

/* Worker side of RETRIEVE: scatter each chunk past the skip, unpin, unlock. */
static void run_retrieve(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	const struct srv_instance *in = j->inst;
	uint32_t C = j->chunk_tokens;
	sigjmp_buf jb;
	volatile uint32_t i = 0;

	(void)worker;
	if (pin_all(j))
		return;
	j->copy_begin_ns = ks_now_ns();
	if (sigsetjmp(jb, 0)) {
		copy_jmp = NULL;
		ctr_add(&j->srv->ctr.copy_faults, 1);
		snprintf(j->err, sizeof(j->err), "bus error while copying (the client's shared KV "
			 "file was truncated, or host memory for the pool ran out)");
		j->result = -EFAULT;
		/* Chunk i faulted: unpin and unlock it and every later chunk. */
		for (; i < j->nchunks; i++) {
			idx_unpin(j->srv->idx, j->entries[i]);
			idx_release_read_locks(j->srv->idx, &j->keys[i], 1);
		}
		return;
	}
	for (; i < j->nchunks; i++) {
		uint64_t base_tok = (uint64_t)i * C;

		if (j->skip_tokens < base_tok + C) {
			uint64_t skip = j->skip_tokens > base_tok ? j->skip_tokens - base_tok : 0;

			copy_jmp = &jb;
			xfer_host_scatter(&in->layout, in->layer_ptrs, j->slots + (size_t)i * C, C,
					  (uint32_t)KS_MIN(skip, (uint64_t)C - 1),
					  idx_entry_data(j->srv->idx, j->entries[i]));
			copy_jmp = NULL;
		}
		idx_unpin(j->srv->idx, j->entries[i]);
		idx_release_read_locks(j->srv->idx, &j->keys[i], 1);
	}
	j->copy_end_ns = ks_now_ns();
}

/*
 * Validate a STORE/RETRIEVE against its instance and build the job's keys
 * and slot table. Returns 0, or -errno with the reason in @err.
 */
static int xfer_prepare(struct srv *s, const struct proto_request *rq, struct srv_xfer_job *j,
			char *err, size_t errlen)
{
	const struct proto_key *k = &rq->key;
	struct srv_instance *in = instance_find(s, rq->instance_id);
	uint32_t C = s->cfg.chunk_tokens;
	const char *op = proto_type_name(rq->type);
	uint64_t range, need_blocks;

	if (!in) {
		snprintf(err, errlen, "%s: instance %" PRId64 " is not registered", op,
			 rq->instance_id);
		return -ENOENT;
	}
	if (!instance_owned_by(s, in, &j->addr)) {
		snprintf(err, errlen, "%s: instance %" PRId64 " was registered by another "
			 "connection (--owner-check)", op, rq->instance_id);
		return -EPERM;
	}
	if (rq->event_len != 0 && in->device < 0) {
		/* protocol.md §5.3: on the host path a non-empty handle is a frame-level
		 * fault, dropped without a reply (§3 Errors rule 1). */
		snprintf(err, errlen, "%s: instance %" PRId64 " is a host registration; "
			 "event_ipc_handle must be empty", op, rq->instance_id);
		return -EPROTO;
	}
	if (k->worker_id < 0) {
		snprintf(err, errlen, "%s: key.worker_id must not be nil", op);
		return -EINVAL;
	}
	if (k->world_size != in->world_size || (uint32_t)k->worker_id >= k->world_size) {
		snprintf(err, errlen, "%s: worker %d / world_size %u does not match the "
			 "registration (world_size %u)", op, k->worker_id, k->world_size,
			 in->world_size);
		return -EINVAL;
	}
	if (k->model_len != in->model_len || memcmp(k->model, in->model, k->model_len)) {
		snprintf(err, errlen, "%s: model '%s' does not match the registration's '%s'", op,
			 k->model, in->model);
		return -EINVAL;
	}
	if (k->start < 0 || k->end < k->start || k->start % C || k->end % C ||
	    (uint64_t)k->end > k->ntokens) {
		snprintf(err, errlen, "%s: range [%" PRId64 ", %" PRId64 ") must be chunk-aligned "
			 "(chunk %u) and within the %zu tokens", op, k->start, k->end, C, k->ntokens);
		return -ERANGE;
	}
	range = (uint64_t)(k->end - k->start);
	need_blocks = (range + in->layout.block_size - 1) / in->layout.block_size;
	if (rq->nblocks < need_blocks) {
		snprintf(err, errlen, "%s: %zu block ids cover fewer than the %" PRIu64 " tokens "
			 "of the range (block size %u)", op, rq->nblocks, range,
			 in->layout.block_size);
		return -ERANGE;
	}
	for (uint64_t b = 0; b < need_blocks; b++) {
		if (rq->block_ids[b] < 0 || rq->block_ids[b] >= (int64_t)in->layout.num_blocks) {
			snprintf(err, errlen, "%s: block id %" PRId64 " (index %" PRIu64 ") outside "
				 "the registered %u blocks", op, rq->block_ids[b], b,
				 in->layout.num_blocks);
			return -ERANGE;
		}
	}
	j->nchunks = (uint32_t)(range / C);
	j->chunk_tokens = C;
	if (j->nchunks == 0)
		return 0;
	j->slots = malloc(range * sizeof(*j->slots));
	j->keys = calloc(j->nchunks, sizeof(*j->keys));
	j->entries = calloc(j->nchunks, sizeof(*j->entries));
	if (!j->slots || !j->keys || !j->entries) {
		snprintf(err, errlen, "%s: out of memory", op);
		return -ENOMEM;
	}
	/* Range token t lives in slot block_ids[t / BS] * BS + t % BS (protocol.md §3). */
	for (uint64_t t = 0; t < range; t++) {
		uint32_t bs = in->layout.block_size;

		j->slots[t] = rq->block_ids[t / bs] * bs + (int64_t)(t % bs);
	}
	size_t first = (size_t)k->start / C, last = (size_t)k->end / C;
	const uint8_t(*h)[KS_HASH_LEN] = chunk_hashes(s, k, last);

	if (!h) {
		snprintf(err, errlen, "%s: out of memory hashing", op);
		return -ENOMEM;
	}
	for (size_t c = first; c < last; c++)
		ks_key_init(&j->keys[c - first], h[c], k->model, k->model_len,
			    ks_kv_rank(k->world_size, (uint32_t)k->worker_id));
	atomic_fetch_add_explicit(&in->refs, 1, memory_order_relaxed);
	j->inst = in;
	return 0;
}

static void handle_xfer(struct srv *s, const struct srv_reply_addr *a,
			const struct proto_request *rq)
{
	struct srv_xfer_job *j = calloc(1, sizeof(*j));
	char err[SRV_ERR_MAX];
	bool store = rq->type == PROTO_STORE;
	int rc;

	if (!j) {
		set_last_error(s, a, "%s: out of memory", proto_type_name(rq->type));
		reply_xfer(s, a, false);
		return;
	}
	j->srv = s;
	j->addr = *a;
	j->op = rq->type;
	j->recv_ns = s->cur_recv_ns;
	j->skip_tokens = rq->skip_first_n_tokens;
	if (rq->event_len == PROTO_EVENT_HANDLE_LEN) {
		memcpy(j->wait_event, rq->event, PROTO_EVENT_HANDLE_LEN);
		j->has_wait = true;
	}
	rc = xfer_prepare(s, rq, j, err, sizeof(err));
	if (rc == -EPROTO) {
		frame_fault(s, a, rc, err);
		xfer_job_free(j);
		return;
	}
	if (rc) {
		ctr_add(&s->ctr.semantic_errors, 1);
		set_last_error(s, a, "%s", err);
		goto out_fail;
	}
	if (!j->nchunks) {
		/* An empty range: nothing to copy, and ok (protocol.md §3). */
		reply_xfer(s, a, true);
		xfer_job_free(j);
		return;
	}
	if (j->inst->device >= 0)
		j->base.run = store ? run_store_cuda : run_retrieve_cuda;
	else
		j->base.run = store ? run_store : run_retrieve;
	rc = submit_job(s, j->inst->device >= 0 ? 1 + (unsigned)j->inst->device : 0, j);
	if (rc == 0)
		return;
	set_last_error(s, a, "%s: transfer queue: %s", proto_type_name(rq->type),
		       rc == -EAGAIN ? "full, try again later" : strerror(-rc));
out_fail:
	reply_xfer(s, a, false);
	xfer_job_free(j);
}

/*
 * Add a finished job's phases to s->phase_ns (io thread, after the reply).
 * Only jobs that copied: a failed one has no copy timestamps.
 */
static void account_phases(struct srv *s, const struct srv_xfer_job *j)
{
	const struct xfer_job *b = &j->base;
	const uint64_t now = ks_now_ns();
	const unsigned op = j->op != PROTO_STORE;
	uint64_t t[SRV_PHASES + 1] = { j->recv_ns, b->submit_ns, b->start_ns, j->copy_begin_ns,
				       j->copy_end_ns, b->end_ns, now };

	if (!j->copy_begin_ns || !j->copy_end_ns)
		return;
	for (unsigned p = 0; p < SRV_PHASES; p++)
		if (t[p + 1] >= t[p])	/* never wrap on a clock quirk */
			atomic_fetch_add_explicit(&s->phase_ns[op][p], t[p + 1] - t[p],
						  memory_order_relaxed);
	atomic_fetch_add_explicit(&s->phase_jobs[op], 1, memory_order_relaxed);
}

/* A job came back from a worker: account, reply, free. */
static void complete_xfer(struct srv *s, struct srv_xfer_job *j)
{
	bool ok = j->result == 0;

	switch (j->kind) {
	case JOB_PROBE:
		if (!xfer_job_cancelled(&j->base))
			atomic_store(&s->probe_done_ms[j->engine], ks_now_ms());
		atomic_store(&s->probe_sent_ms[j->engine], 0);
		free(j);
		return;
	case JOB_UNMAP:
		if (xfer_job_cancelled(&j->base))
			instance_free(j->inst);	/* shutting down: the workers are gone */
		free(j);
		return;
	case JOB_REGISTER:
		if (ok && !xfer_job_cancelled(&j->base)) {
			j->inst->registered_ms = ks_now_ms();
			registry_insert(s, j->inst);
			j->inst = NULL;	/* the registry owns it now */
		} else {
			ctr_add(&s->ctr.semantic_errors, 1);
			set_last_error(s, &j->addr, "REGISTER_KV_CACHE instance %" PRId64 ": %s",
				       j->inst->id, xfer_job_cancelled(&j->base) ?
				       "server shutting down" : j->err);
		}
		reply_nil(s, &j->addr);
		xfer_job_free(j);
		return;
	case JOB_PREFETCH: {
		struct srv_lookup_job *lj = &s->jobs[(uint64_t)j->lookup_job % SRV_JOB_SLOTS];

		if (xfer_job_cancelled(&j->base))
			j->prefetch_chunks = (int64_t)(j->l1_hits / j->group);	/* unlocked: shutdown */
		if (lj->id == j->lookup_job)
			lj->chunks = j->prefetch_chunks;
		ctr_add(&s->ctr.lookup_hit_chunks, (uint64_t)j->prefetch_chunks);
		xfer_job_free(j);
		return;
	}
	case JOB_XFER:
		break;
	}

	if (xfer_job_cancelled(&j->base)) {
		/* Never ran (shutdown): it reserved and pinned nothing yet. */
		snprintf(j->err, sizeof(j->err), "server shutting down");
		ok = false;
	}
	if (!ok)
		set_last_error(s, &j->addr, "%s failed: %s", proto_type_name(j->op), j->err);
	if (j->op == PROTO_STORE) {
		ctr_add(&s->ctr.store_chunks_stored, j->committed);
		ctr_add(&s->ctr.bytes_stored, j->committed * j->inst->object_bytes);
	} else if (ok) {
		ctr_add(&s->ctr.retrieve_ok, 1);
		ctr_add(&s->ctr.bytes_retrieved, (uint64_t)j->nchunks * j->inst->object_bytes);
	}
	log_debug("%s instance %" PRId64 ": %u chunk(s), queued %.3f ms, copy %.3f ms, %s",
		  proto_type_name(j->op), j->inst->id, j->nchunks,
		  (double)(j->base.start_ns - j->base.submit_ns) / 1e6,
		  (double)(j->base.end_ns - j->base.start_ns) / 1e6, ok ? "ok" : j->err);
	if (j->has_done)
		reply_xfer_event(s, &j->addr, j->done_event, PROTO_EVENT_HANDLE_LEN, ok);
	else
		reply_xfer(s, &j->addr, ok);
	metrics_hist_observe(j->op == PROTO_STORE ? &s->lat_store : &s->lat_retrieve,
			     ks_now_ns() - j->recv_ns);
	if (ok)
		account_phases(s, j);
	xfer_job_free(j);
}

static void drain_completions(struct srv *s)
{
	struct xfer_job *done[64];
	size_t n;

	for (unsigned e = 0; e < s->nengines; e++)
		while ((n = xfer_reap(s->engines[e], done, KS_ARRAY_SIZE(done))) > 0)
			for (size_t i = 0; i < n; i++)
				complete_xfer(s, (struct srv_xfer_job *)done[i]);
}

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                 */

static void frame_fault(struct srv *s, const struct srv_reply_addr *a, int rc, const char *why)
{
	ctr_add(&s->ctr.frame_faults, 1);
	/* protocol.md §3 Errors rule 1: log, count, drop (no reply). The message
	 * stays available to kvstash clients through PROTO_KS_LAST_ERROR. */
	set_last_error(s, a, "dropped malformed request (%s): %s", strerror(-rc), why);
}

static void dispatch(struct srv *s, zmq_msg_t *frames, size_t nframes)
{
	struct srv_reply_addr a;
	struct proto_buf type_frame, args[SRV_MAX_FRAMES];
	struct proto_request rq;
	char err[SRV_ERR_MAX];
	uint64_t uid;
	int rc;

	/* Receipt: before decoding, so latencies and the accept phase include it. */
	s->cur_recv_ns = ks_now_ns();
	memset(&a, 0, sizeof(a));
	a.identity_len = KS_MIN(zmq_msg_size(&frames[0]), sizeof(a.identity));
	memcpy(a.identity, zmq_msg_data(&frames[0]), a.identity_len);
	if (nframes < 3) {
		frame_fault(s, &a, -EINVAL, "fewer than 2 frames after the identity");
		return;
	}
	if (zmq_msg_size(&frames[1]) > SRV_SMALL_FRAME_MAX ||
	    zmq_msg_size(&frames[2]) > SRV_SMALL_FRAME_MAX) {
		frame_fault(s, &a, -EPROTO, "uid or type frame is not a msgpack int");
		return;
	}
	a.uid_len = zmq_msg_size(&frames[1]);
	memcpy(a.uid, zmq_msg_data(&frames[1]), a.uid_len);
	a.type_len = zmq_msg_size(&frames[2]);
	memcpy(a.type, zmq_msg_data(&frames[2]), a.type_len);
	struct proto_buf uid_frame = { a.uid, a.uid_len };
	if (proto_decode_uid(&uid_frame, &uid)) {
		frame_fault(s, &a, -EPROTO, "uid frame is not a msgpack int >= 0");
		return;
	}
	type_frame.data = a.type;
	type_frame.len = a.type_len;
	for (size_t i = 3; i < nframes; i++) {
		args[i - 3].data = zmq_msg_data(&frames[i]);
		args[i - 3].len = zmq_msg_size(&frames[i]);
	}
	memset(&rq, 0, sizeof(rq));
	rc = proto_decode_request(&type_frame, args, nframes - 3, &rq, err, sizeof(err));
	if (rc) {
		frame_fault(s, &a, rc, err);
		return;
	}
	count_request(s, rq.type);
	switch (rq.type) {
	case PROTO_PING:
		if (rq.has_instance_id) {
			struct srv_instance *in = instance_find(s, rq.instance_id);

			if (in && instance_owned_by(s, in, &a))
				in->last_ping_ms = ks_now_ms();
		}
		reply_bool(s, &a, true);
		break;
	case PROTO_NOOP:
		reply_str(s, &a, "OK");
		break;
	case PROTO_GET_CHUNK_SIZE:
		reply_int(s, &a, s->cfg.chunk_tokens);
		break;
	case PROTO_REGISTER_KV_CACHE:
		handle_register(s, &a, &rq);
		break;
	case PROTO_UNREGISTER_KV_CACHE:
		handle_unregister(s, &a, &rq);
		break;
	case PROTO_STORE:
	case PROTO_RETRIEVE:
		handle_xfer(s, &a, &rq);
		break;
	case PROTO_LOOKUP:
		handle_lookup(s, &a, &rq);
		break;
	case PROTO_QUERY_PREFETCH_STATUS:
		handle_query(s, &a, &rq, true);
		break;
	case PROTO_QUERY_PREFETCH_LOOKUP_HITS:
		handle_query(s, &a, &rq, false);
		break;
	case PROTO_FREE_LOOKUP_LOCKS:
		handle_free_lookup_locks(s, &a, &rq);
		break;
	case PROTO_END_SESSION:
		session_unlink(s, rq.request_id, rq.request_id_len);
		reply_nil(s, &a);
		break;
	case PROTO_CLEAR:
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
		handle_stats(s, &a);
		break;
	}
	if (rq.type == PROTO_PING)
		metrics_hist_observe(&s->lat_ping, ks_now_ns() - s->cur_recv_ns);
	else if (rq.type == PROTO_LOOKUP)
		metrics_hist_observe(&s->lat_lookup, ks_now_ns() - s->cur_recv_ns);
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
			frame_fault(s, &a, -E2BIG, "more frames than any request has");
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

	for (struct srv_instance **pp = &s->instances; *pp;) {
		struct srv_instance *in = *pp;
		bool dead = in->last_ping_ms ? now - in->last_ping_ms > timeout :
					       grace && now - in->registered_ms > grace;

		if (!dead) {
			pp = &in->next;
			continue;
		}
		log_warn("instance %" PRId64 ": reaped, %s", in->id,
			 in->last_ping_ms ? "no PING within --client-timeout-s" :
					    "never pinged within --registration-grace-s");
		ctr_add(&s->ctr.instances_reaped, 1);
		atomic_fetch_sub_explicit(&s->ninstances, 1, memory_order_relaxed);
		*pp = in->next;
		in->next = NULL;
		instance_put(in);
	}
}

static void housekeeping(struct srv *s)
{
	uint64_t now = ks_now_ms();
	size_t n;

	if (now - s->last_tick_ms < SRV_TICK_MS)
		return;
	s->last_tick_ms = now;
	n = idx_expire(s->idx, now);
	if (n)
		log_info("expired the locks or reservations of %zu object(s)", n);
	sessions_expire(s, now);
	reap_instances(s, now);
	maybe_probe(s, now);
}

/* ------------------------------------------------------------------------ */
/* Stats, metrics, health: one table feeds KS_STATS, /metrics and /stats.   */

enum stat_kind { STAT_COUNTER, STAT_GAUGE };

struct stat_row {
	const char *name;	/* KS_STATS / JSON key */
	const char *prom;	/* Prometheus name */
	const char *help;
	enum stat_kind kind;
	uint64_t value;
};

#define SRV_MAX_STATS 96

/* Fill @rows with every counter. Safe from any thread: atomics and stats calls only. */
static size_t collect_stats(struct srv *s, struct stat_row *rows)
{
	struct pool_stats ps;
	struct idx_stats is;
	struct xfer_stats xs;
	size_t n = 0;

#define ROW(nm, pr, kd, v, hp) \
	(rows[n++] = (struct stat_row){ (nm), (pr), (hp), (kd), (uint64_t)(v) })
#define CTR(field) atomic_load_explicit(&s->ctr.field, memory_order_relaxed)
	pool_get_stats(s->pool, &ps);
	idx_get_stats(s->idx, &is);
	memset(&xs, 0, sizeof(xs));
	for (unsigned e = 0; e < s->nengines; e++) {
		struct xfer_stats es;

		xfer_get_stats(s->engines[e], &es);
		xs.queued += es.queued;
		xs.running += es.running;
		xs.completed += es.completed;
		xs.rejected_full += es.rejected_full;
		xs.nworkers += es.nworkers;
	}
	ROW("cuda_devices", "kvstash_cuda_devices", STAT_GAUGE, s->ncuda,
	    "CUDA devices served (0: host backend only).");
	ROW("pool_bytes", "kvstash_l1_pool_bytes", STAT_GAUGE, ps.region_bytes,
	    "Bytes reserved for the host pool.");
	ROW("slot_bytes", "kvstash_l1_slot_bytes", STAT_GAUGE, ps.slot_bytes,
	    "Bytes per pool slot (one chunk object).");
	ROW("slots_total", "kvstash_l1_slots", STAT_GAUGE, ps.nslots, "Pool slots.");
	ROW("slots_free", "kvstash_l1_slots_free", STAT_GAUGE, ps.free_slots, "Free pool slots.");
	ROW("pool_used_bytes", "kvstash_l1_used_bytes", STAT_GAUGE, ps.used_bytes,
	    "Bytes of pool slots in use.");
	ROW("objects", "kvstash_l1_objects", STAT_GAUGE, is.entries, "Objects in the L1 index.");
	ROW("objects_ready", "kvstash_l1_objects_ready", STAT_GAUGE, is.ready,
	    "Objects READY (unpinned).");
	ROW("objects_writing", "kvstash_l1_objects_writing", STAT_GAUGE, is.writing,
	    "Objects being written by a STORE.");
	ROW("objects_reading", "kvstash_l1_objects_reading", STAT_GAUGE, is.reading,
	    "Objects with read locks or pins.");
	ROW("read_locks", "kvstash_l1_read_locks", STAT_GAUGE, is.read_locks,
	    "LOOKUP read locks held.");
	ROW("pins", "kvstash_l1_pins", STAT_GAUGE, is.pins, "Transfer pins held.");
	ROW("evictions", "lmcache_mp_l1_evicted_keys_total", STAT_COUNTER, is.evictions,
	    "Objects evicted from L1 (LRU).");
	ROW("expired_read_locks", "kvstash_expired_read_locks_total", STAT_COUNTER,
	    is.expired_read_locks, "Objects whose LOOKUP read locks expired (TTL).");
	ROW("expired_writes", "kvstash_expired_writes_total", STAT_COUNTER, is.expired_writes,
	    "STORE reservations that expired (TTL).");
	ROW("lock_timeouts", "kvstash_lock_timeouts_total", STAT_COUNTER, ks_lock_timeouts_total(),
	    "Lock waits that hit their deadline.");
	ROW("instances", "kvstash_instances", STAT_GAUGE, atomic_load(&s->ninstances),
	    "Registered engine instances.");
	ROW("sessions", "kvstash_sessions", STAT_GAUGE, atomic_load(&s->nsessions_pub),
	    "Per-request hash sessions cached.");
	ROW("xfer_queued", "kvstash_xfer_queue_depth", STAT_GAUGE, xs.queued,
	    "Transfer jobs waiting for a worker.");
	ROW("xfer_running", "kvstash_xfer_running", STAT_GAUGE, xs.running,
	    "Transfer jobs being copied now.");
	ROW("xfer_completed", "kvstash_xfer_completed_total", STAT_COUNTER, xs.completed,
	    "Transfer jobs completed.");
	ROW("xfer_rejected_full", "kvstash_xfer_rejected_total", STAT_COUNTER, xs.rejected_full,
	    "Transfer jobs refused because the queue was full.");
	ROW("workers", "kvstash_xfer_workers", STAT_GAUGE, xs.nworkers, "Transfer worker threads.");
	ROW("requests_store", "lmcache_mp_sm_write_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_STORE]), "STORE requests received.");
	ROW("requests_retrieve", "lmcache_mp_sm_read_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_RETRIEVE]), "RETRIEVE requests received.");
	ROW("requests_lookup", "kvstash_lookup_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_LOOKUP]), "LOOKUP requests received.");
	ROW("requests_ping", "kvstash_ping_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_PING]), "PING requests received.");
	ROW("frame_faults", "kvstash_frame_faults_total", STAT_COUNTER, CTR(frame_faults),
	    "Malformed requests dropped (protocol.md Errors rule 1).");
	ROW("semantic_errors", "kvstash_semantic_errors_total", STAT_COUNTER, CTR(semantic_errors),
	    "Well-formed requests refused (unknown instance, bad range, ...).");
	ROW("replies_dropped", "kvstash_replies_dropped_total", STAT_COUNTER, CTR(replies_dropped),
	    "Replies ZMQ could not queue (peer gone or full).");
	ROW("store_chunks_stored", "kvstash_store_chunks_total", STAT_COUNTER,
	    CTR(store_chunks_stored), "Chunks made READY by STORE.");
	ROW("store_chunks_skipped", "kvstash_store_chunks_skipped_total", STAT_COUNTER,
	    CTR(store_chunks_skipped), "STORE chunks already present.");
	ROW("store_chunks_nospace", "kvstash_store_chunks_nospace_total", STAT_COUNTER,
	    CTR(store_chunks_nospace), "STORE chunks skipped for lack of space.");
	ROW("store_chunks_lost", "kvstash_store_chunks_lost_total", STAT_COUNTER,
	    CTR(store_chunks_lost), "STORE chunks whose reservation expired or was cleared.");
	ROW("retrieve_ok", "kvstash_retrieve_ok_total", STAT_COUNTER, CTR(retrieve_ok),
	    "RETRIEVEs that copied every chunk.");
	ROW("retrieve_miss", "kvstash_retrieve_miss_total", STAT_COUNTER, CTR(retrieve_miss),
	    "RETRIEVEs refused because a chunk was missing.");
	ROW("bytes_stored", "kvstash_store_bytes_total", STAT_COUNTER, CTR(bytes_stored),
	    "Bytes copied into the pool by STORE.");
	ROW("bytes_retrieved", "kvstash_retrieve_bytes_total", STAT_COUNTER, CTR(bytes_retrieved),
	    "Bytes copied out of the pool by RETRIEVE.");
	ROW("lookup_hit_chunks", "kvstash_lookup_hit_chunks_total", STAT_COUNTER,
	    CTR(lookup_hit_chunks), "Chunks reported as hits by LOOKUP.");
	ROW("instances_reaped", "kvstash_reaped_instances_total", STAT_COUNTER,
	    CTR(instances_reaped), "Instances unregistered by the reaper.");
	ROW("copy_faults", "kvstash_copy_faults_total", STAT_COUNTER, CTR(copy_faults),
	    "Copies stopped by a bus error (client file truncated).");
	ROW("log_dropped", "kvstash_log_dropped_total", STAT_COUNTER, log_dropped_total(),
	    "Log lines dropped because the log ring was full.");
	ROW("l2_demoted", "kvstash_l2_demoted_total", STAT_COUNTER, CTR(demoted),
	    "Evicted L1 chunks written to the disk tier.");
	ROW("l2_demote_dropped", "kvstash_l2_demote_dropped_total", STAT_COUNTER, CTR(demote_dropped),
	    "Evicted chunks dropped because the disk tier's queue was full.");
	ROW("l2_demote_failed", "kvstash_l2_demote_failed_total", STAT_COUNTER, CTR(demote_failed),
	    "Disk tier writes that failed (disk full, I/O error).");
	ROW("l2_promoted", "kvstash_l2_promoted_total", STAT_COUNTER, CTR(promoted_l2),
	    "Chunks loaded from the disk tier into L1 by LOOKUP.");
	ROW("l3_written", "kvstash_l3_written_total", STAT_COUNTER, CTR(l3_written),
	    "Chunks written through to Redis.");
	ROW("l3_dropped", "kvstash_l3_dropped_total", STAT_COUNTER, CTR(l3_dropped),
	    "Write-throughs dropped (Redis queue full or down).");
	ROW("l3_failed", "kvstash_l3_failed_total", STAT_COUNTER, CTR(l3_failed),
	    "Redis writes that failed.");
	ROW("l3_promoted", "kvstash_l3_promoted_total", STAT_COUNTER, CTR(promoted_l3),
	    "Chunks loaded from Redis into L1 by LOOKUP.");
	ROW("promote_failed", "kvstash_promote_failed_total", STAT_COUNTER, CTR(promote_failed),
	    "Tier reads that failed (checksum, I/O, Redis down): the hit count was shortened.");
	/* Phase sums (KS_STATS and /stats; /metrics has them in seconds, labelled). */
	static const char *const phase_names[2][SRV_PHASES] = {
		{ "store_accept_us", "store_queue_us", "store_prepare_us", "store_copy_us",
		  "store_finish_us", "store_reply_us" },
		{ "retrieve_accept_us", "retrieve_queue_us", "retrieve_prepare_us",
		  "retrieve_copy_us", "retrieve_finish_us", "retrieve_reply_us" },
	};
	for (unsigned op = 0; op < 2; op++) {
		ROW(op ? "retrieve_timed" : "store_timed", NULL, STAT_COUNTER,
		    atomic_load_explicit(&s->phase_jobs[op], memory_order_relaxed), NULL);
		for (unsigned p = 0; p < SRV_PHASES; p++)
			ROW(phase_names[op][p], NULL, STAT_COUNTER,
			    atomic_load_explicit(&s->phase_ns[op][p], memory_order_relaxed) / 1000,
			    NULL);
	}
	ROW("io_turn_max_us", NULL, STAT_GAUGE,
	    atomic_load_explicit(&s->io_busy_max_ns, memory_order_relaxed) / 1000, NULL);
	if (s->l2) {
		struct tier_disk_stats ds;

		tier_disk_get_stats(s->l2, &ds);
		ROW("l2_objects", "kvstash_l2_objects", STAT_GAUGE, ds.objects, "Chunks on disk.");
		ROW("l2_bytes", "kvstash_l2_bytes", STAT_GAUGE, ds.bytes, "Bytes of chunk files.");
		ROW("l2_corrupt", "kvstash_l2_corrupt_total", STAT_COUNTER, ds.corrupt,
		    "Disk chunks that failed their checksum (removed, never served).");
	}
	if (s->l3) {
		struct tier_redis_stats rs;

		tier_redis_get_stats(s->l3, &rs);
		ROW("l3_notconn", "kvstash_l3_notconn_total", STAT_COUNTER, rs.notconn,
		    "Redis requests failed because a node was down.");
		ROW("l3_corrupt", "kvstash_l3_corrupt_total", STAT_COUNTER, rs.corrupt,
		    "Redis values that failed their checksum (deleted, never served).");
		ROW("l3_nodes_up", "kvstash_l3_nodes_up", STAT_GAUGE, rs.nodes_up,
		    "Redis nodes connected.");
	}
#undef CTR
#undef ROW
	return n;
}

static const struct {
	const char *name, *kind;
	size_t off;
} srv_hists[] = {
	{ "kvstash_request_duration_seconds", "store", offsetof(struct srv, lat_store) },
	{ "kvstash_request_duration_seconds", "retrieve", offsetof(struct srv, lat_retrieve) },
	{ "kvstash_request_duration_seconds", "lookup", offsetof(struct srv, lat_lookup) },
	{ "kvstash_request_duration_seconds", "ping", offsetof(struct srv, lat_ping) },
};

static void handle_stats(struct srv *s, const struct srv_reply_addr *a)
{
	struct stat_row rows[SRV_MAX_STATS];
	const char *names[SRV_MAX_STATS + 2 * KS_ARRAY_SIZE(srv_hists)];
	uint64_t vals[SRV_MAX_STATS + 2 * KS_ARRAY_SIZE(srv_hists)];
	static char hist_names[2 * KS_ARRAY_SIZE(srv_hists)][40];	/* io thread only */
	struct proto_msg m = { 0 };
	size_t n = collect_stats(s, rows);

	for (size_t i = 0; i < n; i++) {
		names[i] = rows[i].name;
		vals[i] = rows[i].value;
	}
	/* Latency sums and counts, so clients (kvstash top) can derive means per interval. */
	for (size_t i = 0; i < KS_ARRAY_SIZE(srv_hists); i++) {
		const struct metrics_hist *h =
			(const struct metrics_hist *)((const char *)s + srv_hists[i].off);

		snprintf(hist_names[2 * i], sizeof(hist_names[0]), "latency_%s_sum_us",
			 srv_hists[i].kind);
		snprintf(hist_names[2 * i + 1], sizeof(hist_names[0]), "latency_%s_count",
			 srv_hists[i].kind);
		names[n] = hist_names[2 * i];
		vals[n++] = atomic_load_explicit(&h->sum_ns, memory_order_relaxed) / 1000;
		names[n] = hist_names[2 * i + 1];
		vals[n++] = atomic_load_explicit(&h->count, memory_order_relaxed);
	}
	send_encoded(s, a, proto_encode_stats(&m, names, vals, n), &m);
}


void srv_render_metrics(struct srv *s, struct metrics_buf *out)
{
	struct stat_row rows[SRV_MAX_STATS];
	size_t n = collect_stats(s, rows);
	char labels[64];

	for (size_t i = 0; i < n; i++) {
		if (!rows[i].prom)	/* rendered below, in seconds and labelled */
			continue;
		if (rows[i].kind == STAT_COUNTER)
			metrics_counter(out, rows[i].prom, rows[i].help, NULL, rows[i].value);
		else
			metrics_gauge(out, rows[i].prom, rows[i].help, NULL, (double)rows[i].value);
	}
	for (size_t i = 0; i < KS_ARRAY_SIZE(srv_hists); i++) {
		snprintf(labels, sizeof(labels), "request=\"%s\"", srv_hists[i].kind);
		metrics_histogram(out, srv_hists[i].name,
				  i == 0 ? "Time from receiving a request to sending its reply." : NULL,
				  labels,
				  (const struct metrics_hist *)((const char *)s + srv_hists[i].off));
	}
	for (unsigned op = 0; op < 2; op++)
		for (unsigned p = 0; p < SRV_PHASES; p++) {
			snprintf(labels, sizeof(labels), "request=\"%s\",phase=\"%s\"",
				 op ? "retrieve" : "store", srv_phase_name[p]);
			metrics_counter_f(out, "kvstash_transfer_phase_seconds_total",
					  op + p == 0 ? "Time successful STOREs/RETRIEVEs spent in "
					  "each phase, receipt to reply: accept (io thread), queue, "
					  "prepare (reserve/pin), copy, finish (commit/unpin), reply "
					  "(completion hop)." : NULL, labels,
					  (double)atomic_load_explicit(&s->phase_ns[op][p],
								       memory_order_relaxed) / 1e9);
		}
	metrics_histogram(out, "kvstash_io_loop_turn_seconds",
			  "Busy time of each io loop turn (poll return to next poll): how long a "
			  "PING can wait behind other work.", NULL, &s->io_busy);
	/* Per device: its queue, and how long its last data-path probe has waited.
	 * One pass per family: Prometheus wants a family's samples together. */
	static const char *const dev_family[3][2] = {
		{ "kvstash_device_queue_depth", "Transfer jobs waiting for a worker, per device." },
		{ "kvstash_device_running", "Transfer jobs being copied now, per device." },
		{ "kvstash_device_probe_wait_seconds",
		  "How long the device's outstanding health probe has waited (0: none)." },
	};
	for (unsigned f = 0; f < 3; f++) {
		for (unsigned e = 0; e < s->nengines; e++) {
			struct xfer_stats xs;
			uint64_t sent = atomic_load(&s->probe_sent_ms[e]), now = ks_now_ms();
			double v;

			xfer_get_stats(s->engines[e], &xs);
			if (e == 0)
				snprintf(labels, sizeof(labels), "device=\"host\"");
			else
				snprintf(labels, sizeof(labels), "device=\"cuda:%u\"", e - 1);
			v = f == 0 ? (double)xs.queued : f == 1 ? (double)xs.running :
			    sent && now > sent ? (double)(now - sent) / 1e3 : 0.0;
			metrics_gauge(out, dev_family[f][0], e == 0 ? dev_family[f][1] : NULL, labels, v);
		}
	}
	char why[256];
	metrics_gauge(out, "kvstash_healthy", "1 when /healthz reports healthy.", NULL,
		      srv_health(s, why, sizeof(why)) == 0 ? 1.0 : 0.0);
}

void srv_render_stats_json(struct srv *s, struct metrics_buf *out)
{
	struct stat_row rows[SRV_MAX_STATS];
	size_t n = collect_stats(s, rows);
	char why[256];
	int rc = srv_health(s, why, sizeof(why));

	metrics_printf(out, "{\"endpoint\":\"%s\",\"healthy\":%s", s->endpoint, rc ? "false" : "true");
	for (size_t i = 0; i < n; i++)
		metrics_printf(out, ",\"%s\":%" PRIu64, rows[i].name, rows[i].value);
	for (size_t i = 0; i < KS_ARRAY_SIZE(srv_hists); i++) {
		const struct metrics_hist *h =
			(const struct metrics_hist *)((const char *)s + srv_hists[i].off);

		metrics_printf(out, ",\"%s_p50_ms\":%.3f,\"%s_p99_ms\":%.3f", srv_hists[i].kind,
			       metrics_hist_quantile(h, 0.5) * 1e3, srv_hists[i].kind,
			       metrics_hist_quantile(h, 0.99) * 1e3);
	}
	metrics_printf(out, "}\n");
}

int srv_health(struct srv *s, char *why, size_t len)
{
	uint64_t now = ks_now_ms();
	uint64_t io = atomic_load(&s->io_alive_ms);

	if (now > io && now - io > SRV_HEALTH_IO_MS) {
		snprintf(why, len, "io thread: no loop turn for %" PRIu64 " ms", now - io);
		return -EAGAIN;
	}
	for (unsigned e = 0; e < s->nengines; e++) {
		uint64_t sent = atomic_load(&s->probe_sent_ms[e]);

		if (sent && now > sent && now - sent > SRV_HEALTH_PROBE_MS) {
			if (e == 0)
				snprintf(why, len, "device host: data-path probe waiting %" PRIu64
					 " ms (workers stalled or queue backed up)", now - sent);
			else
				snprintf(why, len, "device cuda:%u: data-path probe waiting %" PRIu64
					 " ms (workers stalled or queue backed up)", e - 1, now - sent);
			return -EAGAIN;
		}
	}
	snprintf(why, len, "ok");
	return 0;
}

/* Worker side of a probe: nothing to copy; the test hook can stall it. */
static void run_probe(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;

	(void)worker;
	if (j->srv->probe_stall_ms)
		usleep((useconds_t)KS_MIN(j->srv->probe_stall_ms, 60000) * 1000);
}

/* Send a probe through each device's transfer queue once a second (io thread). */
static void maybe_probe(struct srv *s, uint64_t now)
{
	for (unsigned e = 0; e < s->nengines; e++) {
		struct srv_xfer_job *j;

		if (atomic_load(&s->probe_sent_ms[e]) ||
		    now - atomic_load(&s->probe_done_ms[e]) < SRV_PROBE_MS)
			continue;
		j = calloc(1, sizeof(*j));
		if (!j)
			return;
		j->srv = s;
		j->kind = JOB_PROBE;
		j->base.run = run_probe;
		atomic_store(&s->probe_sent_ms[e], now);
		if (submit_job(s, e, j)) {
			atomic_store(&s->probe_sent_ms[e], 0);
			free(j);
		}
	}
}

/* ------------------------------------------------------------------------ */
/* Life cycle                                                               */

static bool is_loopback_endpoint(const char *ep)
{
	return strncmp(ep, "tcp://", 6) != 0 || !strncmp(ep, "tcp://127.", 10) ||
	       !strncmp(ep, "tcp://localhost:", 16) || !strncmp(ep, "tcp://[::1]:", 12);
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
		idx_set_evict_hook(s->idx, demote_hook, s);
	}
	if (s->cfg.redis_url[0]) {
		char urls_buf[sizeof(s->cfg.redis_url)];
		const char *urls[TIER_REDIS_MAX_NODES];
		size_t n = 0;

		snprintf(urls_buf, sizeof(urls_buf), "%s", s->cfg.redis_url);
		for (char *save = NULL, *u = strtok_r(urls_buf, ",", &save);
		     u && n < TIER_REDIS_MAX_NODES; u = strtok_r(NULL, ",", &save))
			urls[n++] = u;
		struct tier_redis_config rcfg = {
			.urls = urls, .nurls = n, .key_prefix = s->cfg.redis_prefix,
			.ttl_s = s->cfg.redis_ttl_s, .lock_timeout_ms = s->cfg.lock_timeout_ms,
		};
		rc = tier_redis_open(&rcfg, &s->l3);
		if (rc) {
			log_error("redis tier %s: %s", s->cfg.redis_url, strerror(-rc));
			return rc;
		}
		log_info("redis tier: %zu node(s) (%s), key prefix '%s', ttl %u s", n,
			 s->cfg.redis_url, s->cfg.redis_prefix, s->cfg.redis_ttl_s);
	}
	return 0;
}

/*
 * With --cuda=auto and a visible GPU: pin the pool for every device
 * (cudaHostRegister touches every page: NOTE: takes about a second per
 * 10 GiB), learn each device's UUID, and start one engine per device.
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
	rc = xfer_cuda_host_register(pool_region(s->pool), pool_region_bytes(s->pool));
	if (rc) {
		log_error("cannot pin the %" PRIu64 "-byte pool for CUDA: %s",
			  pool_region_bytes(s->pool), strerror(-rc));
		return rc;
	}
	s->pool_pinned = true;
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
		xfer_cuda_device_name(d, gpu, sizeof(gpu));
		log_info("cuda:%d %s (GPU-%s): %u transfer worker(s)", d, gpu, s->cuda_uuid[d],
			 s->cfg.workers);
	}
	return 0;
}

/*
 * Create the context's first socket with this thread at SRV_IO_NICE: libzmq
 * starts its I/O thread there, and that thread inherits the caller's nice
 * value. Every PING crosses it (socket -> pipe -> io thread and back), so it
 * gets the io thread's CPU priority rather than the workers'. This thread's
 * own nice value is put back. Without CAP_SYS_NICE both stay at 0 (logged
 * once by srv_run).
 */
static void *zmq_socket_at_io_priority(void *zctx, int type)
{
	const id_t tid = (id_t)syscall(SYS_gettid);
	int old, raised;
	void *sock;

	errno = 0;
	old = getpriority(PRIO_PROCESS, tid);
	raised = errno == 0 && old > SRV_IO_NICE &&
		 setpriority(PRIO_PROCESS, tid, SRV_IO_NICE) == 0;
	sock = zmq_socket(zctx, type);
	if (raised && setpriority(PRIO_PROCESS, tid, old) < 0)
		log_warn("cannot restore nice %d of the starting thread: %s", old, strerror(errno));
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
	ks_none_hash(s->none_hash);
	s->jobs = calloc(SRV_JOB_SLOTS, sizeof(*s->jobs));
	s->sessions = calloc(SRV_SESSION_BUCKETS, sizeof(*s->sessions));
	s->last_errors = calloc(SRV_LAST_ERROR_SLOTS, sizeof(*s->last_errors));
	if (!s->jobs || !s->sessions || !s->last_errors) {
		rc = -ENOMEM;
		goto out_destroy;
	}
	for (size_t i = 0; i < SRV_JOB_SLOTS; i++)
		s->jobs[i].id = -1;

	rc = pool_create(cfg->pool_bytes, &s->pool);
	if (rc) {
		log_error("host pool of %" PRIu64 " bytes: %s", cfg->pool_bytes, strerror(-rc));
		goto out_destroy;
	}
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
	rc = tiers_open(s);
	if (rc)
		goto out_destroy;
	rc = cuda_setup(s);
	if (rc)
		goto out_destroy;
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
	s->sock = zmq_socket_at_io_priority(s->zctx, ZMQ_ROUTER);
	if (!s->sock) {
		rc = -zmq_errno();
		goto out_destroy;
	}
	maxmsg = (int64_t)cfg->max_message_mb << 20;
	zmq_setsockopt(s->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof(maxmsg));
	zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof(linger));
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
	install_sigbus_guard();
	s->last_tick_ms = ks_now_ms();
	atomic_store(&s->io_alive_ms, s->last_tick_ms);
	for (unsigned e = 0; e < SRV_MAX_ENGINES; e++)
		atomic_store(&s->probe_done_ms[e], s->last_tick_ms);
	const char *stall = getenv("KVSTASH_TEST_PROBE_STALL_MS");
	if (stall && *stall) {
		s->probe_stall_ms = strtoull(stall, NULL, 10);
		log_warn("test hook: data-path probes stall %" PRIu64 " ms", s->probe_stall_ms);
	}
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

/*
 * Account one io loop turn that started at @t0 (completions until @t1,
 * requests until @t2, then housekeeping): a PING arriving during the turn
 * waited up to its length. A slow turn is logged with the split, at most
 * once a second.
 */
static void io_turn_done(struct srv *s, uint64_t t0, uint64_t t1, uint64_t t2)
{
	const uint64_t t3 = ks_now_ns(), busy = t3 - t0;
	uint64_t max = atomic_load_explicit(&s->io_busy_max_ns, memory_order_relaxed);

	metrics_hist_observe(&s->io_busy, busy);
	if (busy > max)
		atomic_store_explicit(&s->io_busy_max_ns, busy, memory_order_relaxed);
	if (busy >= SRV_IO_SLOW_NS && t3 / 1000000 - s->io_slow_logged_ms >= 1000) {
		s->io_slow_logged_ms = t3 / 1000000;
		log_warn("io loop turn took %.2f ms (completions %.2f, requests %.2f, "
			 "housekeeping %.2f): PINGs waited that long", (double)busy / 1e6,
			 (double)(t1 - t0) / 1e6, (double)(t2 - t1) / 1e6, (double)(t3 - t2) / 1e6);
	}
}

int srv_run(struct srv *s)
{
	/* [0] socket, [1] stop, [2 + e] completions of engine e */
	zmq_pollitem_t items[2 + SRV_MAX_ENGINES] = {
		{ .socket = s->sock, .events = ZMQ_POLLIN },
		{ .fd = s->stop_fd, .events = ZMQ_POLLIN },
	};
	int nitems = 2 + (int)s->nengines;

	for (unsigned e = 0; e < s->nengines; e++) {
		items[2 + e].fd = xfer_completion_fd(s->engines[e]);
		items[2 + e].events = ZMQ_POLLIN;
	}
	s->io_thread = pthread_self();
	s->io_running = true;
	struct pool_stats ps;

	/* The heartbeat outranks the bulk path for CPU: where permitted, this
	 * thread runs below nice 0 and the transfer workers at 0. */
	if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), SRV_IO_NICE) < 0)
		log_info("io thread keeps nice 0 (%s): PING latency then depends more on "
			 "the load of other processes", strerror(errno));
	pool_get_stats(s->pool, &ps);
	log_info("kvstashd %s listening on %s: pool %" PRIu64 " MiB%s, %u transfer worker(s), "
		 "chunk %u tokens", KVSTASH_VERSION, s->endpoint, ps.region_bytes >> 20,
		 ps.hugepages ? " (hugepages)" : "", s->cfg.workers, s->cfg.chunk_tokens);
	for (;;) {
		int n = zmq_poll(items, nitems, SRV_TICK_MS);
		bool completions = false;
		uint64_t t0 = ks_now_ns(), t1, t2;

		atomic_store_explicit(&s->io_alive_ms, t0 / 1000000, memory_order_relaxed);

		if (n < 0 && zmq_errno() != EINTR) {
			log_error("zmq_poll: %s", zmq_strerror(zmq_errno()));
			break;
		}
		if (items[1].revents & ZMQ_POLLIN)
			break;
		for (int i = 2; i < nitems; i++)
			completions |= (items[i].revents & ZMQ_POLLIN) != 0;
		/* Completions first: they free pins and slots other requests may need. */
		if (completions)
			drain_completions(s);
		t1 = ks_now_ns();
		if (items[0].revents & ZMQ_POLLIN)
			drain_socket(s);
		t2 = ks_now_ns();
		housekeeping(s);
		io_turn_done(s, t0, t1, t2);
	}
	log_info("stopping: finishing queued transfers (at most %d ms)", SRV_DRAIN_MS);
	for (unsigned e = 0; e < s->nengines; e++)
		xfer_engine_stop(s->engines[e], SRV_DRAIN_MS);
	drain_completions(s);
	s->io_running = false;
	log_info("stopped");
	return 0;
}

void srv_destroy(struct srv *s)
{
	if (!s)
		return;
	s->io_running = false;	/* from here CUDA instances are unmapped inline */
	for (unsigned e = 0; e < s->nengines; e++)
		xfer_engine_stop(s->engines[e], 0);
	drain_completions(s);
	for (unsigned e = 0; e < s->nengines; e++)
		xfer_engine_destroy(s->engines[e]);
	/* After the workers: their prefetches wait on tier reads. Queued tier
	 * requests are cancelled; their callbacks only touch counters of @s. */
	if (s->l2)
		tier_disk_close(s->l2);
	if (s->l3)
		tier_redis_close(s->l3);
	for (int d = 0; d < s->ncuda; d++)
		for (unsigned w = 0; w < SRV_MAX_WORKERS; w++)
			xfer_cuda_ctx_destroy(s->cuda_ctx[d][w]);
	while (s->instances) {
		struct srv_instance *in = s->instances;

		s->instances = in->next;
		instance_put(in);
	}
	if (s->sessions) {
		for (size_t b = 0; b < SRV_SESSION_BUCKETS; b++)
			while (s->sessions[b]) {
				struct srv_session *ss = s->sessions[b];

				s->sessions[b] = ss->next;
				session_free(ss);
			}
	}
	if (s->sock)
		zmq_close(s->sock);
	auth_stop(s->auth);
	if (s->zctx)
		zmq_ctx_term(s->zctx);
	if (s->idx)
		idx_destroy(s->idx);
	if (s->pool_pinned)
		xfer_cuda_host_unregister(pool_region(s->pool));
	if (s->pool)
		pool_destroy(s->pool);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	free(s->jobs);
	free(s->sessions);
	free(s->last_errors);
	free(s->hash_buf);
	free(s->key_buf);
	free(s);
}
