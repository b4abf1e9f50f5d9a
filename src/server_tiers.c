/*
 * server_tiers.c - the server's side of the L2 disk and L3 Redis tiers:
 * demoting L1 chunks as they are evicted, writing committed STOREs through
 * to L3, and the prefetch that loads a LOOKUP's missing prefix from L2/L3
 * into L1. The tiers themselves are tier_disk.c and tier_redis.c; they are
 * opened in srv_create (server.c).
 *
 * Threads: srv_demote_hook runs on the thread whose reservation evicted (a
 * transfer worker), after the index dropped its locks; srv_l3_write_through on
 * the worker that committed a STORE; srv_prefetch_job on the io thread and
 * run_prefetch on a host transfer worker, which waits for tier reads
 * (bounded by --transfer-timeout-ms) and Redis EXISTS. The *_done
 * callbacks run on the tiers' own threads (cancelled requests' too, at
 * close) and touch only counters or their struct tier_wait.
 *
 * Lock ordering (see server.c and docs/architecture.md): no lock of its
 * own. idx_* take shard > LRU > pool inside each call, tier_disk_* and
 * tier_redis_* their tier lock, log_* the log ring; none is held when the
 * next call is made, nor while a worker waits for a tier read.
 */
#include "server_priv.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "chunk_key.h"
#include "index.h"
#include "lock.h"
#include "log.h"
#include "tier_disk.h"
#include "tier_redis.h"

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
	srv_ctr_add(status ? &s->ctr.demote_failed : &s->ctr.demoted, 1);
}

/* A demotion with KV events on: its key, for the event when the write ends. */
struct demote_ev {
	struct srv *s;
	struct ks_key key;
};

static void demote_done_ev(void *arg, int status, uint64_t tag, size_t nbytes)
{
	struct demote_ev *d = arg;

	demote_done(d->s, status, tag, nbytes);
	kve_demoted(d->s->kve, &d->key, status == 0);
	free(d);
}

/* tier_disk eviction callback (its worker, no lock held): the chunk left the disk. */
void srv_disk_evicted(void *arg, const struct ks_key *k)
{
	struct srv *s = arg;

	kve_removed(s->kve, k, KVE_MEDIUM_DISK);
}

/*
 * idx eviction hook: runs on the evicting worker with no index lock held.
 * Installed with a disk tier (demotion) or with KV events (BlockRemoved).
 */
void srv_demote_hook(void *arg, const struct ks_key *k, const void *data, uint64_t nbytes)
{
	struct srv *s = arg;
	struct demote_ev *d;

	if (!s->l2) {
		/* The chunk leaves the pool: a queued report, never a wait. */
		kve_removed(s->kve, k, KVE_MEDIUM_CPU);
		return;
	}
	if (!s->kve) {
		/* A copy into the tier's bounded staging; a full tier drops, never blocks. */
		if (tier_disk_put(s->l2, k, nbytes, data, nbytes, TIER_PUT_COPY, demote_done, s))
			srv_ctr_add(&s->ctr.demote_dropped, 1);
		return;
	}
	/* Reported before the put: the write may end before tier_disk_put returns. */
	kve_demoting(s->kve, k);
	d = malloc(sizeof(*d));
	if (d) {
		d->s = s;
		d->key = *k;
	}
	if (!d || tier_disk_put(s->l2, k, nbytes, data, nbytes, TIER_PUT_COPY, demote_done_ev, d)) {
		srv_ctr_add(&s->ctr.demote_dropped, 1);
		kve_demoted(s->kve, k, false);
		free(d);
	}
}

static void l3_done(void *arg, int status, uint64_t tag, size_t nbytes)
{
	struct srv *s = arg;

	(void)tag;
	(void)nbytes;
	srv_ctr_add(status ? &s->ctr.l3_failed : &s->ctr.l3_written, 1);
}

/* After a STORE committed @k: copy it to Redis so other kvstashd can find it. */
void srv_l3_write_through(struct srv *s, const struct ks_key *k, uint64_t nbytes)
{
	struct idx_entry *e;

	if (!s->l3)
		return;
	/* Pinned while copied: eviction cannot reuse the slot under the copy. */
	if (idx_pin(s->idx, k, nbytes, &e))
		return;
	if (tier_redis_put(s->l3, k, nbytes, idx_entry_data(s->idx, e), nbytes, TIER_REDIS_PUT_COPY,
			   l3_done, s))
		srv_ctr_add(&s->ctr.l3_dropped, 1);
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
		if (poll(&pfd, 1, SRV_TIER_WAIT_STEP_MS) > 0) {
			uint64_t v;

			/* Consume the event: the read pairs with the callback's write
			 * (thread sanitizers see that order; they do not see poll's). */
			if (read(w->efd, &v, sizeof(v)) < 0) {
				/* counted by the callback's write; nothing else to do */
			}
			return atomic_load(&w->status);
		}
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
			srv_ctr_add(&s->ctr.promote_failed, 1);
			log_info("prefetch: %s chunk failed to load (%s): prefix ends here",
				 from_l3 ? "L3" : "L2", strerror(-rc));
			break;
		}
		if (idx_commit_write(s->idx, e) != 0)
			break;
		srv_ctr_add(from_l3 ? &s->ctr.promoted_l3 : &s->ctr.promoted_l2, 1);
		if (j->ev_tokens) {
			/* Back in the pool: announced with the LOOKUP's tokens; the keys
			 * are chunk-major from the prompt's first chunk, group per chunk. */
			size_t c = (start + loaded) / j->group;

			kve_stored(s->kve, k, c ? j->keys[(c - 1) * j->group].chunk_hash : NULL,
				   j->ev_tokens + c * j->chunk_tokens, j->chunk_tokens,
				   KVE_MEDIUM_CPU);
		}
	}
	/* Lock what is READY now from the first unlocked group on (LOOKUP locked
	 * [0, lock_start) already); idx_lookup_lock stops at the first miss. */
	if (idx_lookup_lock(s->idx, j->keys + lock_start, start + loaded - lock_start, j->group,
			    j->locks_per_key, &hits) == 0)
		j->prefetch_chunks = (int64_t)((lock_start + hits) / j->group);
	else
		j->prefetch_chunks = (int64_t)(lock_start / j->group);
}

/*
 * A prefetch job for LOOKUP keys [@l1_hits, @nkeys) (copies the keys), or
 * NULL. With KV events on it also copies the prompt's @tokens (at least
 * nkeys / group chunks of them), to announce the chunks it loads.
 */
struct srv_xfer_job *srv_prefetch_job(struct srv *s, const struct ks_key *keys, size_t nkeys,
				      size_t l1_hits, uint32_t group, uint32_t locks_per_key,
				      uint64_t object_bytes, const uint32_t *tokens)
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
	if (s->kve && tokens && group) {
		size_t ntok = nkeys / group * s->cfg.chunk_tokens;

		j->ev_tokens = malloc(ntok * sizeof(*j->ev_tokens));
		if (j->ev_tokens)
			memcpy(j->ev_tokens, tokens, ntok * sizeof(*tokens));
		/* else: the chunks load all the same, unannounced */
		j->chunk_tokens = s->cfg.chunk_tokens;
	}
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
