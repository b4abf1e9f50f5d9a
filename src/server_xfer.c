/*
 * server_xfer.c - STORE and RETRIEVE: validating a request and building
 * its job (keys, slot table), queueing it, the transfer workers' run()
 * functions for host and CUDA copies (reserve/commit for STORE, pin/unpin
 * for RETRIEVE), the CUDA registration and unmap jobs, and the completion
 * side: reply, counters, per-phase timing. Also the SIGBUS guard around
 * host copies from clients' shared files.
 *
 * Threads: srv_handle_xfer, xfer_prepare, srv_submit_job, complete_xfer and
 * srv_drain_completions run on the io thread (srv_drain_completions also in
 * srv_destroy's caller, after the workers stopped); the run_* functions on
 * transfer workers: host jobs on the host engine's, CUDA jobs on their
 * device's, each worker with its own CUDA context (cuda_ctx_of: only that
 * worker touches it). sigbus_handler runs on the worker that faulted.
 *
 * Lock ordering (see server.c and docs/architecture.md): no lock of its
 * own. Workers call idx_* (shard > LRU > pool inside each call; an eviction
 * may also reach the disk tier's lock through the demotion hook) and
 * srv_l3_write_through (a Redis node's lock) one at a time, and copy, host
 * memcpy or CUDA, holding none, so the SIGBUS guard's siglongjmp leaves no
 * lock behind. The io thread's xfer_submit/xfer_reap take a queue lock
 * inside; log_* the log ring.
 */
#include "server_priv.h"

#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "chunk_key.h"
#include "compiler.h"
#include "index.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "protocol.h"
#include "transfer.h"
#include "transfer_cuda.h"
#include "transfer_host.h"

static int pin_all(struct srv_xfer_job *j);

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

void srv_install_sigbus_guard(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = sigbus_handler;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &prev_sigbus);
}

/* ------------------------------------------------------------------------ */
/* STORE / RETRIEVE                                                         */

void srv_xfer_job_free(struct srv_xfer_job *j)
{
	if (j->inst)
		srv_instance_put(j->inst);
	free(j->keys);
	free(j->ev_tokens);
	switch (j->kind) {
	case JOB_XFER:
		free(j->entries);
		free(j->slots);
		free(j->group_skip);
		break;
	case JOB_REGISTER:
		free(j->descs);
		break;
	case JOB_PROBE:
	case JOB_UNMAP:
	case JOB_PREFETCH:
		break;
	}
	free(j);
}

/* Queue @j on engine @engine (io thread). 0 or -errno from xfer_submit. */
int srv_submit_job(struct srv *s, unsigned engine, struct srv_xfer_job *j)
{
	if (engine >= s->nengines || !s->engines[engine])
		return -ENODEV;
	j->engine = engine;
	return xfer_submit(s->engines[engine], &j->base);
}

/* A GPU copy's end is near (--busy-poll): have the io thread awake for it. */
static void near_done(void *arg)
{
	struct srv_xfer_job *j = arg;

	xfer_job_near_done(j->srv->engines[j->engine], &j->base);
}

/* Whether group @g of chunk @c is absent (null blocks, null_chunk_mask). */
static bool group_absent(const struct srv_xfer_job *j, uint32_t c, uint32_t g)
{
	return j->group_skip && j->group_skip[(size_t)c * j->ngroups + g];
}

/* Whether any group of chunk @c is absent: such a chunk is not stored. */
static bool chunk_incomplete(const struct srv_xfer_job *j, uint32_t c)
{
	for (uint32_t g = 0; j->group_skip && g < j->ngroups; g++)
		if (group_absent(j, c, g))
			return true;
	return false;
}

/* Group @g's paged slots for range token 0 (j->slots holds one list per group). */
static const int64_t *group_slots(const struct srv_xfer_job *j, uint32_t g)
{
	return j->slots + (size_t)g * j->nchunks * j->chunk_tokens;
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
		int rc;

		if (chunk_incomplete(j, c)) {
			/* a group's blocks are null: the object would be partly garbage */
			j->entries[c] = NULL;
			srv_ctr_add(&j->srv->ctr.store_chunks_skipped, 1);
			continue;
		}
		rc = idx_reserve_write(j->srv->idx, &j->keys[c], j->inst->object_bytes,
				       &j->entries[c]);

		if (rc) {
			j->entries[c] = NULL;
			srv_ctr_add(rc == -EEXIST ? &j->srv->ctr.store_chunks_skipped :
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
		if (j->ev_tokens)
			kve_stored(j->srv->kve, &j->keys[c],
				   c ? j->keys[c - 1].chunk_hash :
				   j->ev_has_parent ? j->ev_parent : NULL,
				   j->ev_tokens + (size_t)c * j->chunk_tokens, j->chunk_tokens,
				   KVE_MEDIUM_CPU);
		srv_l3_write_through(j->srv, &j->keys[c], j->inst->object_bytes);
	} else {
		srv_ctr_add(&j->srv->ctr.store_chunks_lost, 1);
	}
}

/* ---- CUDA jobs: run on device d's workers, each with its own context ---- */

#define SRV_CUDA_DRAIN_STEP_MS 1000

/*
 * STORE on a GPU: a reserved chunk whose slot is not pinned yet (server_pin.c)
 * is skipped as on a full pool, counted. Returns how many were dropped.
 */
static uint32_t drop_unpinned(struct srv_xfer_job *j)
{
	uint32_t n = 0;

	for (uint32_t c = 0; c < j->nchunks; c++) {
		struct idx_entry *e = j->entries[c];

		if (!e || srv_pool_range_pinned(j->srv, idx_entry_data(j->srv->idx, e),
						j->inst->object_bytes))
			continue;
		idx_abort_write(j->srv->idx, e);
		j->entries[c] = NULL;
		n++;
	}
	if (n) {
		srv_ctr_add(&j->srv->ctr.xfer_unpinned, n);
		srv_ctr_add(&j->srv->ctr.store_chunks_nospace, n);
	}
	return n;
}

/* This worker's context on @dev, created on first use (only this thread touches it). */
static struct xfer_cuda_ctx *cuda_ctx_of(struct srv *s, int dev, unsigned worker, char *err,
					 size_t errlen)
{
	struct xfer_cuda_ctx **slot = &s->cuda_ctx[dev][worker];
	/* While the pool is pinned in the background (server_pin.c) only its
	 * pinned prefix is checked; jobs copy only pinned slots (drop_unpinned,
	 * pin_all). */
	const uint64_t pinned = atomic_load_explicit(&s->pool_pinned_bytes, memory_order_acquire);
	struct xfer_cuda_opts o = { .host_base = pool_region(s->pool),
				    .host_bytes = pool_region_bytes(s->pool),
				    .host_registering = pinned < pool_region_bytes(s->pool),
				    .host_registered_bytes = (size_t)pinned };
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

/*
 * One synchronous CUDA copy per KV cache group: @cj is filled in for group
 * @g of @in (its layout and layers; @objs are the chunks' object starts,
 * offset here by the group's place in the object). Only the first copy
 * waits for the client's event; only the last records the reply's event.
 */
static int cuda_copy_group(struct xfer_cuda_ctx *ctx, bool store, const struct srv_instance *in,
			   uint32_t g, struct xfer_cuda_job *cj, void *const *objs, void **gobjs,
			   uint32_t nobjs, bool first, bool last)
{
	const struct srv_group *sg = &in->groups[g];
	const void *wait = cj->wait_event, *wait_sem = cj->wait_semaphore;
	void *done = cj->done_event, *done_sem = cj->done_semaphore;
	int rc;

	for (uint32_t c = 0; c < nobjs; c++)
		gobjs[c] = objs[c] ? (uint8_t *)objs[c] + sg->obj_offset : NULL;
	cj->layout = &sg->layout;
	cj->layers = in->layer_ptrs + sg->first;
	cj->objs = gobjs;
	if (!first)
		cj->wait_event = NULL, cj->wait_semaphore = NULL;
	if (!last)
		cj->done_event = NULL, cj->done_semaphore = NULL;
	rc = cuda_copy(ctx, store, cj);
	cj->wait_event = wait, cj->wait_semaphore = wait_sem;
	cj->done_event = done, cj->done_semaphore = done_sem;
	return rc;
}

static void run_store_cuda(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	const struct srv_instance *in = j->inst;
	uint32_t C = j->chunk_tokens, nres = 0;
	struct xfer_cuda_ctx *ctx = cuda_ctx_of(j->srv, in->device, worker, j->err, sizeof(j->err));
	int64_t *slots = NULL;
	void **objs = NULL, **gobjs = NULL;
	int rc = 0;

	if (!ctx) {
		j->result = -EIO;
		return;
	}
	nres = reserve_chunks(j);
	nres -= drop_unpinned(j);
	j->copy_begin_ns = ks_now_ns();
	/* Only the reserved chunks are copied: pack their slots and objects. */
	slots = malloc(((size_t)(nres ? nres : 1) * C) * sizeof(*slots));
	objs = malloc((nres ? nres : 1) * sizeof(*objs));
	gobjs = malloc((nres ? nres : 1) * sizeof(*gobjs));
	if (!slots || !objs || !gobjs) {
		snprintf(j->err, sizeof(j->err), "out of memory");
		j->result = -ENOMEM;
		goto out_abort;
	}
	for (uint32_t g = 0; g < in->ngroups && nres; g++) {
		uint32_t n = 0;

		for (uint32_t c = 0; c < j->nchunks; c++) {
			if (!j->entries[c])
				continue;
			memcpy(slots + (size_t)n * C, group_slots(j, g) + (size_t)c * C,
			       (size_t)C * sizeof(*slots));
			objs[n++] = idx_entry_data(j->srv->idx, j->entries[c]);
		}
		struct xfer_cuda_job cj = {
			.slots = slots, .ntokens = nres * C, .chunk_tokens = C,
			.wait_event = j->has_wait ? j->wait_event : NULL,
			.done_event = j->has_wait_sem ? NULL : j->done_event,
			.wait_semaphore = j->has_wait_sem ? j->wait_sem : NULL,
			.done_semaphore = j->has_wait_sem ? j->done_sem : NULL,
			.timeout_ms = j->srv->cfg.transfer_timeout_ms,
			/* the last copy of the job announces its end */
			.near_done = j->srv->busy_poll && g + 1 == in->ngroups ? near_done : NULL,
			.near_done_arg = j,
		};
		rc = cuda_copy_group(ctx, true, in, g, &cj, objs, gobjs, nres, g == 0,
				     g + 1 == in->ngroups);
		if (rc)
			break;
	}
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
	free(gobjs);
	return;
out_abort:
	for (uint32_t c = 0; c < j->nchunks; c++)
		if (j->entries[c]) {
			idx_abort_write(j->srv->idx, j->entries[c]);
			j->entries[c] = NULL;
		}
	free(slots);
	free(objs);
	free(gobjs);
}

/*
 * RETRIEVE's copies on a CUDA device: per group, one copy per run of
 * consecutive chunks that group has (all of them, unless some are absent),
 * each with the skip measured from its own first token.
 */
static int retrieve_cuda_copies(struct xfer_cuda_ctx *ctx, struct srv_xfer_job *j, void **objs,
				void **gobjs, uint32_t *ncopies)
{
	const struct srv_instance *in = j->inst;
	const uint32_t C = j->chunk_tokens;
	const uint64_t skip = KS_MIN(j->skip_tokens, (uint64_t)j->nchunks * C);
	uint32_t nruns = 0, run = 0;
	int rc = 0;

	/* Count the runs first: the last one records the reply's event. */
	for (uint32_t g = 0; g < in->ngroups; g++)
		for (uint32_t c = 0; c < j->nchunks; c++)
			nruns += !group_absent(j, c, g) && (c == 0 || group_absent(j, c - 1, g));
	for (uint32_t g = 0; g < in->ngroups && !rc; g++) {
		for (uint32_t c0 = 0; c0 < j->nchunks && !rc;) {
			uint32_t c1 = c0;

			if (group_absent(j, c0, g)) {
				c0++;
				continue;
			}
			while (c1 < j->nchunks && !group_absent(j, c1, g))
				c1++;
			uint64_t base_tok = (uint64_t)c0 * C;
			struct xfer_cuda_job cj = {
				.slots = group_slots(j, g) + base_tok, .ntokens = (c1 - c0) * C,
				.chunk_tokens = C,
				.skip_tokens = (uint32_t)(skip > base_tok ?
							  KS_MIN(skip - base_tok,
								 (uint64_t)(c1 - c0) * C) : 0),
				.wait_event = j->has_wait ? j->wait_event : NULL,
				.done_event = j->has_wait_sem ? NULL : j->done_event,
				.wait_semaphore = j->has_wait_sem ? j->wait_sem : NULL,
				.done_semaphore = j->has_wait_sem ? j->done_sem : NULL,
				.timeout_ms = j->srv->cfg.transfer_timeout_ms,
				.near_done = j->srv->busy_poll && run + 1 == nruns ? near_done :
									 NULL,
				.near_done_arg = j,
			};
			rc = cuda_copy_group(ctx, false, in, g, &cj, objs + c0, gobjs, c1 - c0,
					     run == 0, run + 1 == nruns);
			run++;
			c0 = c1;
		}
	}
	*ncopies = run;
	return rc;
}

static void run_retrieve_cuda(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;
	const struct srv_instance *in = j->inst;
	struct xfer_cuda_ctx *ctx = cuda_ctx_of(j->srv, in->device, worker, j->err, sizeof(j->err));
	void **objs, **gobjs;
	uint32_t ncopies = 0;
	int rc;

	if (!ctx) {
		j->result = -EIO;
		return;
	}
	if (pin_all(j))
		return;
	for (uint32_t c = 0; c < j->nchunks; c++)
		if (!srv_pool_range_pinned(j->srv, idx_entry_data(j->srv->idx, j->entries[c]),
					   in->object_bytes)) {
			/* Fail fast rather than wait for the pinning thread (server_pin.c). */
			srv_ctr_add(&j->srv->ctr.xfer_unpinned, 1);
			snprintf(j->err, sizeof(j->err), "chunk %u lies in the part of the pool not "
				 "pinned for CUDA yet (%" PRIu64 " of %" PRIu64 " MiB pinned)", c,
				 atomic_load(&j->srv->pool_pinned_bytes) >> 20,
				 j->srv->pool_pin_total >> 20);
			j->result = -EAGAIN;
			for (uint32_t k = 0; k < j->nchunks; k++) {
				idx_unpin(j->srv->idx, j->entries[k]);
				j->entries[k] = NULL;
			}
			return;
		}
	j->copy_begin_ns = ks_now_ns();
	objs = malloc(j->nchunks * sizeof(*objs));
	gobjs = malloc(j->nchunks * sizeof(*gobjs));
	if (!objs || !gobjs) {
		snprintf(j->err, sizeof(j->err), "out of memory");
		j->result = -ENOMEM;
	} else {
		for (uint32_t c = 0; c < j->nchunks; c++)
			objs[c] = idx_entry_data(j->srv->idx, j->entries[c]);
		rc = retrieve_cuda_copies(ctx, j, objs, gobjs, &ncopies);
		j->copy_end_ns = ks_now_ns();
		if (rc) {
			snprintf(j->err, sizeof(j->err), "cuda device %d: RETRIEVE copy failed: %s",
				 in->device, strerror(-rc));
			j->result = rc;
		} else {
			j->has_done = ncopies > 0;	/* none: every group absent, nothing written */
		}
	}
	free(objs);
	free(gobjs);
	/* Unpin after the device is done (cuda_copy drained it); locks go only on success. */
	for (uint32_t c = 0; c < j->nchunks; c++) {
		idx_unpin(j->srv->idx, j->entries[c]);
		if (j->result == 0)
			idx_release_read_locks(j->srv->idx, &j->keys[c], 1);
		j->entries[c] = NULL;
	}
}

/* A host copy of @j hit SIGBUS (we are past its siglongjmp): fail the job. */
static void copy_faulted(struct srv_xfer_job *j)
{
	copy_jmp = NULL;
	srv_ctr_add(&j->srv->ctr.copy_faults, 1);
	snprintf(j->err, sizeof(j->err), "bus error while copying (the client's shared KV "
		 "file was truncated, or host memory for the pool ran out)");
	j->result = -EFAULT;
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
		copy_faulted(j);
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
		for (uint32_t g = 0; g < in->ngroups; g++) {
			const struct srv_group *sg = &in->groups[g];

			xfer_host_gather(&sg->layout, in->layer_ptrs + sg->first,
					 group_slots(j, g) + (size_t)i * C, C,
					 (uint8_t *)idx_entry_data(j->srv->idx, e) + sg->obj_offset);
		}
		copy_jmp = NULL;
		if (j->srv->store_stall_ms)	/* fault point store.stall_ms: copied, not READY */
			usleep((useconds_t)j->srv->store_stall_ms * 1000);
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
			srv_ctr_add(&j->srv->ctr.retrieve_miss, 1);
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
		copy_faulted(j);
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
			for (uint32_t g = 0; g < in->ngroups; g++) {
				const struct srv_group *sg = &in->groups[g];

				if (group_absent(j, i, g))
					continue;	/* its blocks are null: nothing to write */
				xfer_host_scatter(&sg->layout, in->layer_ptrs + sg->first,
						  group_slots(j, g) + (size_t)i * C, C,
						  (uint32_t)KS_MIN(skip, (uint64_t)C - 1),
						  (const uint8_t *)idx_entry_data(j->srv->idx,
										  j->entries[i]) +
							  sg->obj_offset);
			}
			copy_jmp = NULL;
		}
		idx_unpin(j->srv->idx, j->entries[i]);
		idx_release_read_locks(j->srv->idx, &j->keys[i], 1);
	}
	j->copy_end_ns = ks_now_ns();
}

/*
 * Which (chunk, group) pairs are absent, into j->group_skip (left NULL when
 * none is): the key's null_chunk_mask, indexed [group][chunk of the range],
 * and, for a sliding-window group, a chunk whose blocks are all block 0
 * (vLLM's null block, which replaces blocks that left the window). 0, or
 * -errno with the reason in @err.
 */
static int find_absent_groups(const struct proto_request *rq, const struct srv_instance *in,
			      struct srv_xfer_job *j, char *err, size_t errlen)
{
	const struct proto_key *k = &rq->key;
	const uint32_t bpc = j->chunk_tokens / in->layout.block_size;
	bool any_sw = false;

	for (uint32_t g = 0; g < in->ngroups; g++)
		any_sw |= in->groups[g].sliding_window;
	if (!k->null_chunk_mask && !any_sw)
		return 0;
	if (k->null_chunk_mask && k->mask_groups != in->ngroups) {
		snprintf(err, errlen, "%s: null_chunk_mask has %u group(s), the registration %u",
			 proto_type_name(rq->type), k->mask_groups, in->ngroups);
		return -EINVAL;
	}
	j->group_skip = calloc((size_t)j->nchunks * in->ngroups, sizeof(*j->group_skip));
	if (!j->group_skip) {
		snprintf(err, errlen, "%s: out of memory", proto_type_name(rq->type));
		return -ENOMEM;
	}
	for (uint32_t c = 0; c < j->nchunks; c++)
		for (uint32_t g = 0; g < in->ngroups; g++) {
			bool absent = k->null_chunk_mask && c < k->mask_chunks &&
				      k->null_chunk_mask[(size_t)g * k->mask_chunks + c];

			if (!absent && in->groups[g].sliding_window) {
				const int64_t *ids = rq->block_ids + rq->block_list_off[g] +
						     (size_t)c * bpc;

				absent = true;
				for (uint32_t b = 0; b < bpc && absent; b++)
					absent = ids[b] == 0;
			}
			j->group_skip[(size_t)c * in->ngroups + g] = absent;
		}
	return 0;
}

/*
 * Validate a STORE/RETRIEVE against its instance and build the job's keys
 * and slot tables (one per KV cache group). Returns 0, or -errno with the
 * reason in @err.
 */
static int xfer_prepare(struct srv *s, const struct proto_request *rq, struct srv_xfer_job *j,
			char *err, size_t errlen)
{
	const struct proto_key *k = &rq->key;
	struct srv_instance *in = srv_instance_find(s, rq->instance_id);
	uint32_t C = s->cfg.chunk_tokens;
	const char *op = proto_type_name(rq->type);
	uint64_t range, need_blocks;
	char model[KS_MODEL_MAX + 1];
	size_t model_len;
	int rc;

	if (!in) {
		snprintf(err, errlen, "%s: instance %" PRId64 " is not registered", op,
			 rq->instance_id);
		return -ENOENT;
	}
	if (!srv_instance_owned_by(s, in, &j->addr)) {
		snprintf(err, errlen, "%s: instance %" PRId64 " was registered by another "
			 "connection (--owner-check)", op, rq->instance_id);
		return -EPERM;
	}
	if (in->device < 0 && rq->event_kind != PROTO_EVENT_NONE &&
	    rq->event_kind != PROTO_EVENT_CPU_STUB) {
		/* protocol.md §5.3: on the host path a device handle is a frame-level
		 * fault, dropped without a reply (§3 Errors rule 1; the current
		 * dialect gets [b"", false] instead, srv_handle_xfer). */
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
	if (srv_key_identity(k, model, &model_len)) {
		snprintf(err, errlen, "%s: model name and cache_salt together exceed %d bytes", op,
			 KS_MODEL_MAX);
		return -ENAMETOOLONG;
	}
	if (k->start < 0 || k->end < k->start || k->start % C || k->end % C ||
	    (uint64_t)k->end > k->ntokens) {
		snprintf(err, errlen, "%s: range [%" PRId64 ", %" PRId64 ") must be chunk-aligned "
			 "(chunk %u) and within the %zu tokens", op, k->start, k->end, C, k->ntokens);
		return -ERANGE;
	}
	if (rq->nblock_lists != in->ngroups) {
		snprintf(err, errlen, "%s: %u block id list(s), the registration has %u KV cache "
			 "group(s)", op, rq->nblock_lists, in->ngroups);
		return -EINVAL;
	}
	range = (uint64_t)(k->end - k->start);
	need_blocks = (range + in->layout.block_size - 1) / in->layout.block_size;
	for (uint32_t g = 0; g < in->ngroups; g++) {
		const int64_t *ids = rq->block_ids + rq->block_list_off[g];

		if (rq->block_list_len[g] < need_blocks) {
			snprintf(err, errlen, "%s: %zu block ids%s cover fewer than the %" PRIu64
				 " tokens of the range (block size %u)", op, rq->block_list_len[g],
				 in->ngroups > 1 ? " of a group" : "", range, in->layout.block_size);
			return -ERANGE;
		}
		for (uint64_t b = 0; b < need_blocks; b++) {
			if (ids[b] < 0 || ids[b] >= (int64_t)in->layout.num_blocks) {
				snprintf(err, errlen, "%s: block id %" PRId64 " (index %" PRIu64 ") "
					 "outside the registered %u blocks", op, ids[b], b,
					 in->layout.num_blocks);
				return -ERANGE;
			}
		}
	}
	j->nchunks = (uint32_t)(range / C);
	j->chunk_tokens = C;
	j->ngroups = in->ngroups;
	if (j->nchunks == 0)
		return 0;
	j->slots = malloc((size_t)in->ngroups * range * sizeof(*j->slots));
	j->keys = calloc(j->nchunks, sizeof(*j->keys));
	j->entries = calloc(j->nchunks, sizeof(*j->entries));
	if (!j->slots || !j->keys || !j->entries) {
		snprintf(err, errlen, "%s: out of memory", op);
		return -ENOMEM;
	}
	/* Range token t lives in slot block_ids[t / BS] * BS + t % BS (protocol.md §3),
	 * each group through its own list; block by block, no division per token. */
	for (uint32_t g = 0; g < in->ngroups; g++) {
		const int64_t *ids = rq->block_ids + rq->block_list_off[g];
		int64_t *slots = j->slots + (size_t)g * range;
		uint32_t bs = in->layout.block_size;

		for (uint64_t b = 0, t = 0; t < range; b++) {
			const int64_t base = ids[b] * bs;

			for (uint32_t i = 0; i < bs && t < range; i++, t++)
				slots[t] = base + i;
		}
	}
	rc = find_absent_groups(rq, in, j, err, errlen);
	if (rc)
		return rc;
	size_t first = (size_t)k->start / C, last = (size_t)k->end / C;
	const uint8_t(*h)[KS_HASH_LEN] = srv_chunk_hashes(s, k, last);

	if (!h) {
		snprintf(err, errlen, "%s: out of memory hashing", op);
		return -ENOMEM;
	}
	for (size_t c = first; c < last; c++)
		ks_key_init(&j->keys[c - first], h[c], model, model_len,
			    ks_kv_rank(k->world_size, (uint32_t)k->worker_id));
	if (s->kve && rq->type == PROTO_STORE) {
		/* What a BlockStored event carries, copied: the request is freed
		 * before the worker commits. */
		j->ev_tokens = malloc(range * sizeof(*j->ev_tokens));
		if (!j->ev_tokens) {
			snprintf(err, errlen, "%s: out of memory", op);
			return -ENOMEM;
		}
		memcpy(j->ev_tokens, k->token_ids + k->start, range * sizeof(*j->ev_tokens));
		j->ev_has_parent = first > 0;
		if (first > 0)
			memcpy(j->ev_parent, h[first - 1], KS_HASH_LEN);
	}
	atomic_fetch_add_explicit(&in->refs, 1, memory_order_relaxed);
	j->inst = in;
	return 0;
}

void srv_handle_xfer(struct srv *s, const struct srv_reply_addr *a,
		     const struct proto_request *rq)
{
	struct srv_xfer_job *j = calloc(1, sizeof(*j));
	char err[SRV_ERR_MAX];
	bool store = rq->type == PROTO_STORE;
	int rc;

	if (!j) {
		srv_set_last_error(s, a, "%s: out of memory", proto_type_name(rq->type));
		srv_reply_xfer(s, a, false);
		return;
	}
	j->srv = s;
	j->addr = *a;
	j->op = rq->type;
	j->recv_ns = s->cur_recv_ns;
	j->skip_tokens = rq->skip_first_n_tokens;
	if (rq->event_kind == PROTO_EVENT_CUDA) {
		memcpy(j->wait_event, rq->event, PROTO_EVENT_HANDLE_LEN);
		j->has_wait = true;
	} else if (rq->event_kind == PROTO_EVENT_SEMAPHORE) {
		/* isolated IPC: wait on the client's semaphore, answer with ours */
		memcpy(j->wait_sem, rq->event, PROTO_SEMAPHORE_HANDLE_LEN);
		j->has_wait_sem = true;
	}
	rc = xfer_prepare(s, rq, j, err, sizeof(err));
	if (rc == -EPROTO && rq->dialect != PROTO_DIALECT_CURRENT) {
		srv_frame_fault(s, a, rc, err);
		srv_xfer_job_free(j);
		return;
	}
	if (rc) {
		srv_ctr_add(&s->ctr.semantic_errors, 1);
		srv_set_last_error(s, a, "%s", err);
		goto out_fail;
	}
	if (!j->nchunks) {
		/* An empty range: nothing to copy, and ok (protocol.md §3). */
		srv_reply_xfer(s, a, true);
		srv_xfer_job_free(j);
		return;
	}
	if (j->inst->device >= 0)
		j->base.run = store ? run_store_cuda : run_retrieve_cuda;
	else
		j->base.run = store ? run_store : run_retrieve;
	rc = srv_submit_job(s, j->inst->device >= 0 ? 1 + (unsigned)j->inst->device : 0, j);
	if (rc == 0)
		return;
	srv_set_last_error(s, a, "%s: transfer queue: %s", proto_type_name(rq->type),
			   rc == -EAGAIN ? "full, try again later" : strerror(-rc));
out_fail:
	srv_reply_xfer(s, a, false);
	srv_xfer_job_free(j);
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

	_Static_assert(SRV_PHASES == 6, "one timestamp per boundary of SRV_PHASE_LIST's phases");

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
			srv_instance_free(j->inst);	/* shutting down: the workers are gone */
		free(j);
		return;
	case JOB_REGISTER:
		if (j->restore) {
			/* A resumed registration (srv_create): no client waits for a reply. */
			s->restore_pending--;
			if (ok && !xfer_job_cancelled(&j->base)) {
				srv_registry_insert(s, j->inst);
				j->inst = NULL;
			} else {
				s->restore_failed++;
				log_warn("instance %" PRId64 ": not resumed: %s (its process is gone, "
					 "or the GPU changed)", j->inst->id,
					 xfer_job_cancelled(&j->base) ? "server shutting down" : j->err);
			}
			srv_xfer_job_free(j);
			return;
		}
		if (ok && !xfer_job_cancelled(&j->base)) {
			j->inst->registered_ms = ks_now_ms();
			srv_registry_insert(s, j->inst);
			j->inst = NULL;	/* the registry owns it now */
		} else {
			srv_ctr_add(&s->ctr.semantic_errors, 1);
			srv_set_last_error(s, &j->addr, "REGISTER_KV_CACHE instance %" PRId64 ": %s",
					   j->inst->id, xfer_job_cancelled(&j->base) ?
					   "server shutting down" : j->err);
		}
		srv_reply_nil(s, &j->addr);
		srv_xfer_job_free(j);
		return;
	case JOB_PREFETCH: {
		struct srv_lookup_job *lj = &s->jobs[(uint64_t)j->lookup_job % SRV_JOB_SLOTS];

		if (xfer_job_cancelled(&j->base))
			j->prefetch_chunks = (int64_t)(j->l1_hits / j->group);	/* unlocked: shutdown */
		if (lj->id == j->lookup_job)
			lj->chunks = j->prefetch_chunks;
		srv_ctr_add(&s->ctr.lookup_hit_chunks, (uint64_t)j->prefetch_chunks);
		srv_xfer_job_free(j);
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
		srv_set_last_error(s, &j->addr, "%s failed: %s", proto_type_name(j->op), j->err);
	if (j->op == PROTO_STORE) {
		srv_ctr_add(&s->ctr.store_chunks_stored, j->committed);
		srv_ctr_add(&s->ctr.bytes_stored, j->committed * j->inst->object_bytes);
	} else if (ok) {
		srv_ctr_add(&s->ctr.retrieve_ok, 1);
		srv_ctr_add(&s->ctr.bytes_retrieved, (uint64_t)j->nchunks * j->inst->object_bytes);
	}
	log_debug("%s instance %" PRId64 ": %u chunk(s), queued %.3f ms, copy %.3f ms, %s",
		  proto_type_name(j->op), j->inst->id, j->nchunks,
		  (double)(j->base.start_ns - j->base.submit_ns) / 1e6,
		  (double)(j->base.end_ns - j->base.start_ns) / 1e6, ok ? "ok" : j->err);
	if (j->has_done && j->has_wait_sem)
		srv_reply_xfer_event(s, &j->addr, j->done_sem, PROTO_SEMAPHORE_HANDLE_LEN, ok);
	else if (j->has_done)
		srv_reply_xfer_event(s, &j->addr, j->done_event, PROTO_EVENT_HANDLE_LEN, ok);
	else
		srv_reply_xfer(s, &j->addr, ok);
	metrics_hist_observe(j->op == PROTO_STORE ? &s->lat_store : &s->lat_retrieve,
			     ks_now_ns() - j->recv_ns);
	if (ok)
		account_phases(s, j);
	srv_xfer_job_free(j);
}

void srv_drain_completions(struct srv *s)
{
	struct xfer_job *done[64];
	size_t n;

	for (unsigned e = 0; e < s->nengines; e++)
		while ((n = xfer_reap(s->engines[e], done, KS_ARRAY_SIZE(done))) > 0)
			for (size_t i = 0; i < n; i++)
				complete_xfer(s, (struct srv_xfer_job *)done[i]);
}
