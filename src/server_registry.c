/*
 * server_registry.c - what the io thread keeps per client: the instance
 * registry (REGISTER_KV_CACHE's validated layout and mapped buffers,
 * shared with transfer jobs by reference count) and the per-request_id
 * sessions that cache chunk hashes (protocol.md §4.2), with the key
 * expansion LOOKUP, FREE_LOOKUP_LOCKS, STORE and RETRIEVE build on them.
 *
 * Threads: the io thread builds, finds, inserts and removes instances and
 * owns the sessions; only it touches them, so they have no lock. References
 * are dropped (srv_instance_put) on the io thread, or by srv_destroy's caller.
 * The last one unmaps (srv_instance_free): for an instance released on the io
 * thread, on a transfer worker of its device (JOB_UNMAP, server_xfer.c;
 * host instances on the host engine's), otherwise on the thread that
 * dropped it.
 *
 * Lock ordering (see server.c and docs/architecture.md): no lock of its
 * own. Locks are taken only inside single calls, none held across another:
 * pool_configure_slots (pool), xfer_submit through srv_submit_job (a queue:
 * the unmap job) and log_* (log ring).
 */
#include "server_priv.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chunk_key.h"
#include "compiler.h"
#include "index.h"
#include "layout.h"
#include "lock.h"
#include "log.h"
#include "pool.h"
#include "protocol.h"
#include "transfer_cuda.h"

/* ------------------------------------------------------------------------ */
/* Instances                                                                */

/* Unmap and free, on the calling thread (named in the debug log). */
void srv_instance_free(struct srv_instance *in)
{
	size_t closed = 0;

	ks_assert_unlocked();
	for (size_t i = 0; i < in->nmaps; i++) {
		if (!in->maps[i].base)
			continue;
		if (in->device >= 0)
			xfer_cuda_ipc_close_mem(in->device, in->maps[i].base);
		else
			munmap(in->maps[i].base, in->maps[i].len);
		closed++;
	}
	if (closed) {
		char tname[16] = "?";

		pthread_getname_np(pthread_self(), tname, sizeof(tname));
		log_debug("instance %" PRId64 ": %zu mapping(s) closed on thread %s", in->id, closed,
			  tname);
	}
	free(in->maps);
	free(in->reg_frames);
	free(in->layer_ptrs);
	free(in->layer_index);
	free(in->groups);
	free(in);
}

/* Open each distinct IPC handle once, check every layer against its allocation. */
static void run_register(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	struct srv_instance *in = j->inst;
	int dev = in->device, rc;

	(void)worker;
	for (uint32_t l = 0; l < in->layout.num_layers; l++) {
		const struct proto_kv_desc *d = &j->descs[in->layer_index[l]];
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

/* Release an instance's mappings on a transfer worker (see srv_instance_put). */
static void run_unmap(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;

	(void)worker;
	srv_instance_free(j->inst);
	j->inst = NULL;
}

/*
 * Drop a reference; the last one unmaps, never on the io thread while it
 * serves: it makes no CUDA call (a driver call can wait behind a running
 * transfer), and munmap() of a client's host buffer tears down the page
 * tables of everything it touched (about 8 ms for 256 MiB here), which every
 * PING queued behind it would wait for. So an instance released there is
 * unmapped by a job on its device's workers (the host engine's for host
 * buffers).
 */
void srv_instance_put(struct srv_instance *in)
{
	if (atomic_fetch_sub_explicit(&in->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (in->nmaps && in->srv && in->srv->io_running &&
	    pthread_equal(pthread_self(), in->srv->io_thread)) {
		struct srv_xfer_job *j = calloc(1, sizeof(*j));

		if (j) {
			j->srv = in->srv;
			j->kind = JOB_UNMAP;
			j->inst = in;
			j->base.run = run_unmap;
			if (srv_submit_job(in->srv, in->device >= 0 ? 1 + (unsigned)in->device : 0,
					   j) == 0)
				return;
			free(j);
		}
		log_warn("instance %" PRId64 ": unmapping on the io thread (transfer queue full)",
			 in->id);
	}
	srv_instance_free(in);
}

/*
 * Queue the opening of @in's CUDA IPC handles (@rq: its REGISTER) on its
 * device's workers; the job's completion puts @in into the registry
 * (complete_xfer) and, for a client's REGISTER (@a not NULL), replies. A
 * resumed registration (@a NULL) is counted in srv.restore_pending. On
 * failure (-ENOMEM, or the queue's -errno) nothing is queued and @in's
 * reference is dropped.
 */
int srv_registry_submit_cuda(struct srv *s, struct srv_instance *in, const struct proto_request *rq,
			 const struct srv_reply_addr *a)
{
	struct srv_xfer_job *j = calloc(1, sizeof(*j));
	int rc;

	if (j) {
		j->kind = JOB_REGISTER;	/* first: it says which union member is live */
		j->descs = malloc(rq->nlayers * sizeof(*j->descs));
	}
	if (!j || !j->descs) {
		free(j);
		srv_instance_put(in);
		return -ENOMEM;
	}
	memcpy(j->descs, rq->layers, rq->nlayers * sizeof(*j->descs));
	j->srv = s;
	if (a)
		j->addr = *a;
	j->restore = !a;
	j->op = PROTO_REGISTER_KV_CACHE;
	j->inst = in;
	j->base.run = run_register;
	rc = srv_submit_job(s, 1 + (unsigned)in->device, j);
	if (rc) {
		srv_xfer_job_free(j);
		return rc;
	}
	if (!a)
		s->restore_pending++;
	return 0;
}

struct srv_instance *srv_instance_find(struct srv *s, int64_t id)
{
	for (struct srv_instance *in = s->instances; in; in = in->next)
		if (in->id == id)
			return in;
	return NULL;
}

/* @in's owner is now the connection of @a (the one being dispatched). */
void srv_instance_set_owner(struct srv *s, struct srv_instance *in, const struct srv_reply_addr *a)
{
	struct srv_conn *c = s->cur_conn;

	memcpy(in->owner, a->identity, a->identity_len);
	in->owner_len = a->identity_len;
	if (c && c->identity_len == a->identity_len &&
	    !memcmp(c->identity, a->identity, a->identity_len)) {
		in->owner_peer = c->peer;
		in->owner_up = c->fd >= 0;
	} else {
		memset(&in->owner_peer, 0, sizeof(in->owner_peer));
		in->owner_up = false;
	}
}

/* A new connection of @in's client takes it over (its old one closed). */
static void adopt(struct srv *s, struct srv_instance *in, const struct srv_reply_addr *a)
{
	char who[96];

	srv_instance_set_owner(s, in, a);
	srv_ctr_add(&s->ctr.instances_adopted, 1);
	log_info("instance %" PRId64 ": taken over by a new connection of %s (its previous "
		 "connection closed)", in->id, srv_peer_name(&in->owner_peer, who, sizeof(who)));
}

/*
 * True if @a may use @in (--owner-check). The connection that registered it
 * may. Once that connection has closed, so may a new connection of the same
 * client, which then owns it (docs/architecture.md, "Reconnects"):
 *  - ipc://: the same process (pid and uid from SO_PEERCRED);
 *  - tcp:// with CURVE: the same client key;
 *  - plain tcp://: the same peer address.
 * "Closed" needs the socket monitor; without it no instance changes owner.
 */
bool srv_instance_owned_by(struct srv *s, struct srv_instance *in, const struct srv_reply_addr *a)
{
	struct srv_conn *c = s->cur_conn;

	if (strcmp(s->cfg.owner_check, "on"))
		return true;
	if (in->owner_len == a->identity_len && !memcmp(in->owner, a->identity, a->identity_len))
		return true;
	if (!c || c->identity_len != a->identity_len ||
	    memcmp(c->identity, a->identity, a->identity_len) ||
	    !srv_peer_same(&in->owner_peer, &c->peer))
		goto refuse;
	if (s->monitor && !in->owner_up) {
		adopt(s, in, a);
		return true;
	}
refuse:
	srv_ctr_add(&s->ctr.owner_refused, 1);
	return false;
}

/* @c's socket closed: the instances it owned have no connection now. */
void srv_instances_owner_closed(struct srv *s, const struct srv_conn *c)
{
	for (struct srv_instance *in = s->instances; in; in = in->next)
		if (in->owner_up && in->owner_len == c->identity_len &&
		    !memcmp(in->owner, c->identity, c->identity_len)) {
			in->owner_up = false;
			log_info("instance %" PRId64 ": its connection closed; kept for its client "
				 "to come back (reaped --client-timeout-s after its last PING with "
				 "its id, if it sent any)", in->id);
		}
}

/* Unlink @id from the registry and drop the registry's reference. */
bool srv_instance_remove(struct srv *s, int64_t id)
{
	for (struct srv_instance **pp = &s->instances; *pp; pp = &(*pp)->next) {
		struct srv_instance *in = *pp;

		if (in->id == id) {
			*pp = in->next;
			in->next = NULL;
			atomic_fetch_sub_explicit(&s->ninstances, 1, memory_order_relaxed);
			srv_instance_put(in);
			srv_registry_persist(s, false);
			return true;
		}
	}
	return false;
}

/* An instance serving (@model, @world_size), or NULL (io thread). */
struct srv_instance *srv_model_instance(struct srv *s, const char *model, size_t len,
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
 * The KV cache groups of @rq (current dialect: engine_group_infos; none =
 * one group of every layer, the March form) as @in's groups, layer order and
 * transferred layer count. A layer in no group is not transferred (LMCache's
 * KV-sharing layers). Every group shares the tensors' layout, so a group
 * whose tokens_per_block differs from the tensors' block size is refused.
 */
static int build_groups(struct srv *s, const struct proto_request *rq, struct srv_instance *in,
			char *err, size_t errlen)
{
	uint32_t ngroups = rq->ngroups ? (uint32_t)rq->ngroups : 1, nl = 0, p = 0;
	uint64_t off = 0;

	for (size_t g = 0; g < rq->ngroups; g++)
		nl += rq->groups[g].nlayers;
	if (!rq->ngroups)
		nl = (uint32_t)rq->nlayers;
	in->groups = calloc(ngroups, sizeof(*in->groups));
	in->layer_index = calloc(nl, sizeof(*in->layer_index));
	if (!in->groups || !in->layer_index)
		return -ENOMEM;
	in->ngroups = ngroups;
	in->layout.num_layers = nl;
	for (uint32_t g = 0; g < ngroups; g++) {
		struct srv_group *sg = &in->groups[g];
		const struct proto_group *pg = rq->ngroups ? &rq->groups[g] : NULL;
		uint32_t n = pg ? pg->nlayers : nl;

		if (pg && pg->tokens_per_block && pg->tokens_per_block != in->layout.block_size) {
			snprintf(err, errlen, "engine group %" PRId64 " has %u tokens per block, the "
				 "KV tensors %u: groups of different block sizes are not supported",
				 pg->engine_group_id, pg->tokens_per_block, in->layout.block_size);
			return -EOPNOTSUPP;
		}
		sg->layout = in->layout;
		sg->layout.num_layers = n;
		sg->first = p;
		sg->obj_offset = off;
		sg->sliding_window = pg && pg->sw_size_tokens > 0;
		off += kv_object_bytes(&sg->layout, s->cfg.chunk_tokens);
		for (uint32_t i = 0; i < n; i++)
			in->layer_index[p++] = pg ? pg->layers[i] : i;
	}
	return 0;
}

/*
 * Build an instance from a REGISTER request. All layers must share kind,
 * dtype, shape and stride. Each distinct path is mapped once, covering the
 * largest nbytes any layer gives for it.
 */
int srv_instance_build(struct srv *s, const struct proto_request *rq,
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
	rc = build_groups(s, rq, in, err, errlen);
	if (rc == -ENOMEM)
		snprintf(err, errlen, "out of memory");
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
	if (rc == 0 && s->warm) {
		/* The first geometry: its slot table (a no-op once it exists). */
		struct warm_restored r;

		warm_restore(s->warm, s->pool, s->idx, &r);
	}
	if (rc) {
		snprintf(err, errlen, "objects of %" PRIu64 " bytes do not fit the pool's %" PRIu64
			 "-byte slots (layout mismatch with the first registration, or pool too small)",
			 in->object_bytes, pool_slot_bytes(s->pool));
		goto out_put;
	}
	in->layer_ptrs = calloc(in->layout.num_layers, sizeof(*in->layer_ptrs));
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
		for (uint32_t p = 0; p < in->layout.num_layers; p++)
			if (in->layer_index[p] == l)
				in->layer_ptrs[p] = (uint8_t *)in->maps[m].base + d->offset;
	}
	in->registered_ms = ks_now_ms();
	*out = in;
	return 0;
out_put:
	srv_instance_put(in);
	return rc;
}

/* Put a built instance into the registry, replacing one with the same id. */
void srv_registry_insert(struct srv *s, struct srv_instance *in)
{
	if (srv_instance_remove(s, in->id))
		log_info("instance %" PRId64 ": re-registered, previous registration dropped",
			 in->id);
	/* A CUDA registration is inserted when its job ends: the connection
	 * may have closed meanwhile. */
	in->owner_up = in->owner_up && srv_conn_up(s, in->owner, in->owner_len);
	in->next = s->instances;
	s->instances = in;
	atomic_fetch_add_explicit(&s->ninstances, 1, memory_order_relaxed);
	log_info("instance %" PRId64 ": registered model '%s' world_size %u, %u layers in %u "
		 "group(s) %s %s [NB %u, BS %u, NH %u, HS %u] on %s %d, %zu mapping(s), object %"
		 PRIu64 " bytes", in->id, in->model, in->world_size, in->layout.num_layers,
		 in->ngroups,
		 kv_layout_kind_name(in->layout.kind), kv_dtype_name(in->layout.dtype),
		 in->layout.num_blocks, in->layout.block_size, in->layout.num_heads,
		 in->layout.head_size, in->device >= 0 ? "cuda device" : "host, pid-shared files",
		 in->device >= 0 ? in->device : (int)in->nmaps, in->nmaps, in->object_bytes);
	srv_registry_persist(s, false);
}

/* ------------------------------------------------------------------------ */
/* Registrations that survive a restart (--state-dir, warm.c)               */

/*
 * A kept registration is the REGISTER request as it arrived, decoded again
 * by the same code at the next start, plus what the registry learned:
 *   int64 id, u32 pinged, i32 owner_pid, u32 owner_len, owner,
 *   the owner's peer (u32 kind, u32 pid, u32 uid, u32 addr_len, addr: what a
 *   reconnecting engine is matched against, see "Reconnects" in
 *   docs/architecture.md), then the frames: u32 dialect, u32 type_len, type,
 *   u32 nargs, nargs x (u32 len, bytes)
 * in host byte order (the manifest refuses another byte order).
 */
#define REG_HDR_BYTES (8 + 4 + 4 + 4 + 4 * 4)

static void put32(uint8_t **p, uint32_t v)
{
	memcpy(*p, &v, 4);
	*p += 4;
}

int srv_registry_keep_frames(struct srv_instance *in, enum proto_dialect d,
			     const struct proto_buf *type, const struct proto_buf *args, size_t nargs)
{
	size_t len = 4 + 4 + type->len + 4;
	uint8_t *buf, *p;

	for (size_t i = 0; i < nargs; i++)
		len += 4 + args[i].len;
	buf = malloc(len);
	if (!buf)
		return -ENOMEM;
	p = buf;
	put32(&p, (uint32_t)d);
	put32(&p, (uint32_t)type->len);
	memcpy(p, type->data, type->len);
	p += type->len;
	put32(&p, (uint32_t)nargs);
	for (size_t i = 0; i < nargs; i++) {
		put32(&p, (uint32_t)args[i].len);
		memcpy(p, args[i].data, args[i].len);
		p += args[i].len;
	}
	free(in->reg_frames);
	in->reg_frames = buf;
	in->reg_frames_len = len;
	return 0;
}

/*
 * Write the manifest with every kept registration (io thread; @clean only
 * after the drain at SIGTERM). A failure is logged: the previous manifest
 * stays, so a restart then resumes the registrations it names.
 */
void srv_registry_persist(struct srv *s, bool clean)
{
	struct warm_blob *blobs;
	size_t n = 0, cap = 0;
	int rc;

	if (!s->warm || s->restoring)
		return;
	for (struct srv_instance *in = s->instances; in; in = in->next)
		cap++;
	blobs = calloc(cap ? cap : 1, sizeof(*blobs));
	if (!blobs) {
		log_error("state dir: out of memory writing the manifest");
		return;
	}
	for (struct srv_instance *in = s->instances; in; in = in->next) {
		uint8_t *b, *p;
		size_t len;

		if (!in->reg_frames)
			continue;
		size_t addr_len = strnlen(in->owner_peer.addr, sizeof(in->owner_peer.addr) - 1);

		len = REG_HDR_BYTES + in->owner_len + addr_len + in->reg_frames_len;
		b = malloc(len);
		if (!b)
			continue;
		p = b;
		memcpy(p, &in->id, 8);
		p += 8;
		put32(&p, in->last_ping_ms != 0);
		put32(&p, (uint32_t)in->owner_pid);
		put32(&p, (uint32_t)in->owner_len);
		memcpy(p, in->owner, in->owner_len);
		p += in->owner_len;
		put32(&p, (uint32_t)in->owner_peer.kind);
		put32(&p, in->owner_peer.pid);
		put32(&p, in->owner_peer.uid);
		put32(&p, (uint32_t)addr_len);
		memcpy(p, in->owner_peer.addr, addr_len);
		p += addr_len;
		memcpy(p, in->reg_frames, in->reg_frames_len);
		blobs[n].data = b;
		blobs[n].len = len;
		n++;
	}
	rc = warm_save(s->warm, clean, blobs, n);
	if (rc)
		log_error("state dir: cannot write the manifest: %s (the previous one stays)",
			  strerror(-rc));
	for (size_t i = 0; i < n; i++)
		free((void *)blobs[i].data);
	free(blobs);
}

/* Bounded reader over one kept registration. */
struct reg_reader {
	const uint8_t *p, *end;
	bool bad;
};

static const uint8_t *rd_bytes(struct reg_reader *r, size_t n)
{
	const uint8_t *at = r->p;

	if (r->bad || (size_t)(r->end - r->p) < n) {
		r->bad = true;
		return NULL;
	}
	r->p += n;
	return at;
}

static uint32_t rd32(struct reg_reader *r)
{
	const uint8_t *b = rd_bytes(r, 4);
	uint32_t v = 0;

	if (b)
		memcpy(&v, b, 4);
	return v;
}

/* The pid in a "/proc/<pid>/fd/<n>" path (libkvstash's memfds), else 0. */
static int32_t pid_of_path(const char *path)
{
	char *end;
	long pid;

	if (strncmp(path, "/proc/", 6))
		return 0;
	pid = strtol(path + 6, &end, 10);
	return end != path + 6 && *end == '/' && pid > 0 && pid < INT32_MAX ? (int32_t)pid : 0;
}

/* Rebuild one kept registration; 0 = in the registry (or queued, CUDA), else dropped. */
static int restore_one(struct srv *s, struct warm_blob b)
{
	struct reg_reader r = { b.data, (const uint8_t *)b.data + b.len, false };
	struct proto_buf type, args[SRV_MAX_FRAMES];
	struct proto_request rq;
	struct srv_instance *in = NULL;
	const uint8_t *idp, *owner, *frames, *peer_addr;
	char err[SRV_ERR_MAX];
	uint32_t pinged, owner_len, dialect, nargs, peer_kind, peer_pid, peer_uid, peer_addr_len;
	int32_t pid;
	int64_t id = -1;
	int rc;

	idp = rd_bytes(&r, 8);
	if (idp)
		memcpy(&id, idp, 8);
	pinged = rd32(&r);
	pid = (int32_t)rd32(&r);
	owner_len = rd32(&r);
	owner = rd_bytes(&r, owner_len);
	peer_kind = rd32(&r);
	peer_pid = rd32(&r);
	peer_uid = rd32(&r);
	peer_addr_len = rd32(&r);
	peer_addr = rd_bytes(&r, peer_addr_len);
	frames = r.p;
	dialect = rd32(&r);
	type.len = rd32(&r);
	type.data = rd_bytes(&r, type.len);
	nargs = rd32(&r);
	if (nargs > SRV_MAX_FRAMES)
		r.bad = true;
	for (uint32_t i = 0; !r.bad && i < nargs; i++) {
		args[i].len = rd32(&r);
		args[i].data = rd_bytes(&r, args[i].len);
	}
	if (r.bad || r.p != r.end || owner_len > SRV_IDENTITY_MAX || dialect > PROTO_DIALECT_CURRENT ||
	    peer_kind > SRV_PEER_HOST || peer_addr_len >= sizeof(in->owner_peer.addr)) {
		log_warn("state dir: a kept registration is malformed: dropped");
		return -EINVAL;
	}
	if (pid > 0 && kill(pid, 0) < 0 && errno == ESRCH) {
		log_warn("instance %" PRId64 ": not resumed: its process (pid %d) is gone", id, pid);
		return -ESRCH;
	}
	memset(&rq, 0, sizeof(rq));
	rc = proto_decode_request_in((enum proto_dialect)dialect, &type, args, nargs, &rq, err,
				     sizeof(err));
	if (rc || rq.type != PROTO_REGISTER_KV_CACHE) {
		log_warn("instance %" PRId64 ": not resumed: its REGISTER no longer decodes: %s", id,
			 rc ? err : "not a REGISTER");
		if (!rc)
			proto_request_free(&rq);
		return rc ? rc : -EINVAL;
	}
	rc = srv_instance_build(s, &rq, &in, err, sizeof(err));
	if (rc) {
		log_warn("instance %" PRId64 ": not resumed: %s", id, err);
		proto_request_free(&rq);
		return rc;
	}
	memcpy(in->owner, owner, owner_len);
	in->owner_len = owner_len;
	in->owner_pid = pid;
	/* Its connection died with the previous kvstashd: the same client may
	 * take it over when it reconnects, nobody else. */
	in->owner_peer.kind = (enum srv_peer_kind)peer_kind;
	in->owner_peer.pid = peer_pid;
	in->owner_peer.uid = peer_uid;
	memcpy(in->owner_peer.addr, peer_addr, peer_addr_len);
	in->owner_peer.addr[peer_addr_len] = '\0';
	in->owner_up = false;
	if (pinged)
		in->last_ping_ms = ks_now_ms();	/* a full --client-timeout-s from now */
	in->reg_frames = malloc(b.len - (size_t)(frames - (const uint8_t *)b.data));
	if (in->reg_frames) {
		in->reg_frames_len = b.len - (size_t)(frames - (const uint8_t *)b.data);
		memcpy(in->reg_frames, frames, in->reg_frames_len);
	}
	if (in->device >= 0) {
		rc = srv_registry_submit_cuda(s, in, &rq, NULL);
		proto_request_free(&rq);
		if (rc)
			log_warn("instance %" PRId64 ": not resumed: %s", id,
				 rc == -ENOMEM ? "out of memory" : strerror(-rc));
		return rc;
	}
	proto_request_free(&rq);
	srv_registry_insert(s, in);
	return 0;
}

/*
 * Rebuild the registrations the manifest keeps (srv_create, before the io
 * loop): host buffers are mapped here, CUDA IPC handles opened by a job on
 * the device's workers (srv.restore_pending counts those still out).
 */
void srv_registry_restore(struct srv *s, unsigned *resumed, unsigned *dropped)
{
	size_t n = warm_nregs(s->warm);

	*resumed = *dropped = 0;
	s->restoring = true;
	for (size_t i = 0; i < n; i++) {
		if (restore_one(s, warm_reg(s->warm, i)) == 0)
			(*resumed)++;
		else
			(*dropped)++;
	}
	s->restoring = false;
}

/* Learn the registering process's pid where its descriptors name it. */
int32_t srv_registry_owner_pid(const struct proto_request *rq)
{
	return rq->nlayers && rq->layers[0].kind != PROTO_KV_CUDA_IPC ?
		       pid_of_path(rq->layers[0].path) : 0;
}

/* ------------------------------------------------------------------------ */
/* Sessions: per-request_id cache of chunk hashes (protocol.md §4.2).       */

static uint64_t rid_hash(const char *rid, size_t len)
{
	return srv_identity_hash((const uint8_t *)rid, len);
}

/* Recency list of sessions (most recently used at the head). */
static void session_lru_unlink(struct srv *s, struct srv_session *ss)
{
	if (ss->lru_prev)
		ss->lru_prev->lru_next = ss->lru_next;
	else
		s->session_lru_head = ss->lru_next;
	if (ss->lru_next)
		ss->lru_next->lru_prev = ss->lru_prev;
	else
		s->session_lru_tail = ss->lru_prev;
	ss->lru_prev = ss->lru_next = NULL;
}

static void session_lru_push_head(struct srv *s, struct srv_session *ss)
{
	ss->lru_prev = NULL;
	ss->lru_next = s->session_lru_head;
	if (s->session_lru_head)
		s->session_lru_head->lru_prev = ss;
	else
		s->session_lru_tail = ss;
	s->session_lru_head = ss;
}

void srv_session_free(struct srv_session *ss)
{
	free(ss->tokens);
	free(ss->hashes);
	free(ss);
}

bool srv_session_unlink(struct srv *s, const char *rid, size_t len)
{
	struct srv_session **pp = &s->sessions[rid_hash(rid, len) % SRV_SESSION_BUCKETS];

	for (; *pp; pp = &(*pp)->next) {
		struct srv_session *ss = *pp;

		if (ss->request_id_len == len && !memcmp(ss->request_id, rid, len)) {
			*pp = ss->next;
			session_lru_unlink(s, ss);
			srv_session_free(ss);
			s->nsessions--;
			atomic_store_explicit(&s->nsessions_pub, s->nsessions, memory_order_relaxed);
			return true;
		}
	}
	return false;
}

/*
 * Drop sessions idle past the TTL, the longest idle first, at most @budget
 * of them (their token arrays can be large to free). The recency list is
 * ordered by last use, so this stops at the first live one: the cost is what
 * expires, not the number of sessions. Returns true when idle sessions were
 * left for the next call.
 */
bool srv_sessions_expire(struct srv *s, uint64_t now_ms, size_t budget)
{
	uint64_t ttl = (uint64_t)s->cfg.session_ttl_s * 1000;
	struct srv_session *ss;

	while ((ss = s->session_lru_tail) && now_ms - ss->last_used_ms > ttl) {
		if (!budget--)
			return true;
		srv_session_unlink(s, ss->request_id, ss->request_id_len);
	}
	return false;
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
const uint8_t (*srv_chunk_hashes(struct srv *s, const struct proto_key *k,
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
			session_lru_push_head(s, ss);
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
		if (s->session_lru_head != ss) {
			session_lru_unlink(s, ss);
			session_lru_push_head(s, ss);
		}
		if (nchunks > ss->cap) {
			void *t = realloc(ss->tokens, nchunks * (size_t)C * 4);

			if (t)
				ss->tokens = t;
			void *h = t ? realloc(ss->hashes, nchunks * KS_HASH_LEN) : NULL;

			if (h)
				ss->hashes = h;
			if (!t || !h) {
				/* Out of memory for the cache: fall back to hashing from scratch. */
				srv_session_unlink(s, k->request_id, k->request_id_len);
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
 * The name a key's objects are stored under: the model name, or, with a
 * cache_salt (current dialect), "model@salt", so two salts never share a
 * chunk ('@' is in neither: LMCache refuses it in both). @out holds
 * KS_MODEL_MAX + 1 bytes. 0, or -ENAMETOOLONG when the two do not fit.
 */
int srv_key_identity(const struct proto_key *k, char *out, size_t *len)
{
	size_t n = k->model_len;

	if (k->cache_salt_len) {
		if (n + 1 + k->cache_salt_len > KS_MODEL_MAX)
			return -ENAMETOOLONG;
		memcpy(out, k->model, n);
		out[n++] = '@';
		memcpy(out + n, k->cache_salt, k->cache_salt_len);
		n += k->cache_salt_len;
	} else {
		memcpy(out, k->model, n);
	}
	out[n] = '\0';
	*len = n;
	return 0;
}

/*
 * Expand chunks [first, first+n) to ObjectKeys for every rank, chunk-major
 * (protocol.md §4.3), into s->key_buf. Returns the key count or -errno.
 */
ssize_t srv_expand_keys(struct srv *s, const struct proto_key *k,
			const uint8_t (*hashes)[KS_HASH_LEN], size_t first, size_t n)
{
	size_t ws = k->world_size, nk = n * ws, mlen;
	char model[KS_MODEL_MAX + 1];

	if (srv_key_identity(k, model, &mlen))
		return -ENAMETOOLONG;
	if (ensure_key_cap(s, nk ? nk : 1))
		return -ENOMEM;
	for (size_t c = 0; c < n; c++)
		for (size_t r = 0; r < ws; r++)
			if (ks_key_init(&s->key_buf[c * ws + r], hashes[first + c], model, mlen,
					ks_kv_rank(k->world_size, (uint32_t)r)))
				return -ENAMETOOLONG;
	return (ssize_t)nk;
}

/* extra_count of protocol.md §4.4. */
uint32_t srv_extra_lock_count(uint32_t tp_size, uint32_t world_size)
{
	uint32_t tp = tp_size > 1 ? tp_size : world_size;

	return tp > world_size ? tp - 1 : 0;
}
