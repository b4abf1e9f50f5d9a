/*
 * index.c - the chunk index: a sharded hash table of cached objects, their
 * states, read locks, pins, the LRU and eviction (see index.h).
 *
 * Lock order (the tree is in lock.h): idx_shard->lock (IDX_SHARD) is taken
 * with no lock held, one shard at a time (hv & shard_mask); under it this
 * file takes lru->lock (ix->lru) and, freeing a slot, pool->free_lock. The
 * eviction walker holds lru->lock and only trylocks a shard.
 *
 * Never held across anything slow: no allocation, no I/O, no wait on another
 * thread happens under a shard or LRU lock here (free() of entry metadata
 * happens after the locks drop; a table resize allocates before locking).
 *
 * DESIGN: any thread calls in (io thread: lookups, releases, CLEAR; transfer
 * workers: reserve/commit/abort, pin/unpin; housekeeping: expire, evict).
 *
 * - An entry belongs to the shard of its key hash for its whole life, and
 *   every mutable field of it is protected by that shard's lock. Its LRU links
 *   (and the on_lru flag) change only with both the shard lock and lru->lock
 *   held, so either lock is enough to read on_lru.
 * - LRU membership is exact: an entry is on ix->lru iff it is linked, READY,
 *   and has no read locks and no pins. Only LRU entries are evicted, so a
 *   WRITING, locked or pinned entry can never be evicted.
 * - An unlinked entry (cleared, or an expired reservation) that is still
 *   referenced (pins, or its writer) sits on its shard's orphan list until the
 *   last reference drops; it is freed there, under the shard lock.
 * - Refcount invariant: an entry is freed only when it is unlinked and has no
 *   pins and no writer, under its shard lock; pins are taken only under it.
 * - Eviction walks the LRU from the tail holding lru->lock. Taking a shard
 *   lock there goes against the order (shard > lru), so the walker only
 *   trylocks and skips entries whose shard is busy: the holder may be waiting
 *   for lru->lock, and blocking on its shard would deadlock with it.
 * - A release (idx_unpin, idx_abort_write) whose shard lock wait times out
 *   is deferred, not lost: the reference it drops still holds the entry, so
 *   the entry goes on its shard's lock-free deferred stack and the next
 *   release, commit or housekeeping round that holds the shard lock applies
 *   it (counted in deferred_releases).
 * - Every entry in the books (linked, or unlinked and referenced) owns exactly
 *   one pool slot; slots return to the pool under the shard lock when the
 *   entry is freed, so idx_check_invariants can match entries to slots.
 * - Deadlines: each shard keeps its linked WRITING entries and its linked
 *   read-locked entries on two lists ordered by deadline (IDX_DQ_WRITE,
 *   IDX_DQ_READ; an entry is on at most one). A TTL is the same for every
 *   entry, so a new deadline is almost always the latest and goes in at the
 *   tail (a thread that read the clock before another one took the lock
 *   walks back a step or two). Expiry pops due entries off the heads: its
 *   cost is the number of shards plus what is due, never the table size.
 */
#include "index.h"

#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compiler.h"
#include "fault.h"
#include "lock.h"
#include "log.h"
#include "lru.h"

#define IDX_DEFAULT_SHARDS 64u
#define IDX_MAX_SHARDS 65536u
#define IDX_DEFAULT_READ_TTL_MS 300000u	/* LMCache read_ttl_seconds (protocol.md §4.5) */
#define IDX_DEFAULT_WRITE_TTL_MS 600000u	/* LMCache write_ttl_seconds */

/* Buckets per shard: grow by doubling past IDX_LOAD_FACTOR entries a bucket. */
#define IDX_MIN_BUCKETS 16u
#define IDX_MAX_BUCKETS (1u << 24)
#define IDX_LOAD_FACTOR 2u

/*
 * The walker evicts at most EVICT_BATCH victims and looks at most EVICT_SCAN
 * nodes per hold of lru->lock, so every other LRU user waits for at most a
 * few dozen list operations; it then drops the lock and frees the batch.
 */
#define EVICT_BATCH 16u
#define EVICT_SCAN 64u
/* idx_reserve_write: evict-and-retry rounds when other threads take the slots first. */
#define RESERVE_EVICT_TRIES 8

struct idx_entry {
	/*
	 * Chain links: the shard table bucket while linked, the shard's orphan
	 * list while not. hpprev points at whatever points at us, so unlinking
	 * is O(1) from either list.
	 */
	struct idx_entry *hnext;
	struct idx_entry **hpprev;
	struct ks_list lru;	/* on ix->lru iff on_lru */
	/* Deadline list of the shard (dq says which); protected by the shard lock. */
	struct idx_entry *dq_prev, *dq_next;

	/* Immutable after idx_reserve_write publishes the entry. */
	uint64_t hv;		/* ks_key_hash64(&key) */
	uint32_t shard;		/* index into ix->shards */
	uint32_t slot;		/* owns: pool slot, returned when the entry is freed */
	uint64_t nbytes;	/* object size, <= slot size */

	/* Protected by the shard lock. */
	uint64_t read_deadline_ms;	/* read locks expire after this (CLOCK_MONOTONIC) */
	uint64_t write_deadline_ms;	/* the reservation expires after this */
	uint32_t read_locks;	/* LOOKUP locks; 0 once unlinked (voided) */
	uint32_t pins;		/* RETRIEVE copies in flight; never expire */
	bool writer;		/* reserved, not yet committed or aborted */
	bool linked;		/* in the shard table, else on the orphan list */
	bool on_lru;		/* changed under shard lock + lru->lock */
	uint8_t dq;		/* IDX_DQ_NONE, or the deadline list it is on */

	/* Releases owed (entry_defer_release), applied under the shard lock. */
	_Atomic uint32_t deferred;
	struct idx_entry *deferred_next;	/* on the shard's deferred stack while deferred */

	struct ks_key key;
};

struct idx_shard {
	/* protects the table, the orphan list, the books and all entries of this shard */
	_Alignas(64) struct ks_mutex lock;
	struct idx_entry **buckets GUARDED_BY(lock);	/* owns: nbuckets chain heads */
	uint32_t nbuckets GUARDED_BY(lock);	/* power of two */
	struct idx_entry *orphans GUARDED_BY(lock);	/* unlinked, still referenced */
	/* Linked entries by deadline, earliest first: [IDX_DQ_READ] read-locked
	 * (read_deadline_ms), [IDX_DQ_WRITE] WRITING (write_deadline_ms). */
	struct idx_dq {
		struct idx_entry *head, *tail;
	} dq[2] GUARDED_BY(lock);
	/* Entries owing a deferred release: pushed without the lock, taken whole under it. */
	_Atomic(struct idx_entry *) deferred;

	/* Books, kept by entry_account(): what idx_get_stats sums. */
	uint64_t nentries GUARDED_BY(lock);	/* linked */
	uint64_t nwriting GUARDED_BY(lock), nready GUARDED_BY(lock), nreading GUARDED_BY(lock);
	uint64_t read_locks GUARDED_BY(lock);	/* sum over linked entries */
	uint64_t pins GUARDED_BY(lock);	/* sum over linked and orphan entries */
	uint64_t orphan_pinned GUARDED_BY(lock);
	uint64_t orphan_writing GUARDED_BY(lock);
};

/* Which deadline list an entry is on (idx_entry.dq); also the index of idx_shard.dq. */
enum { IDX_DQ_READ = 0, IDX_DQ_WRITE = 1, IDX_DQ_NONE = 2 };

struct idx {
	struct pool *pool;	/* borrowed until idx_destroy */
	struct idx_shard *shards;	/* owns: nshards, 64-byte aligned */
	uint32_t nshards;
	uint32_t shard_mask;
	uint64_t read_ttl_ms;
	uint64_t write_ttl_ms;
	_Atomic uint32_t low_wm;	/* evict_low_watermark_slots; idx_set_low_watermark */
	struct lru lru;		/* evictable entries; lock ranks below every shard */

	/* Metrics: totals since creation. */
	_Atomic uint64_t evictions;
	idx_evict_fn evict_fn;	/* set before use, read-only after */
	void *evict_arg;
	struct idx_journal journal;	/* idx_set_journal; all NULL: none */
	_Atomic uint64_t expired_read_locks;
	_Atomic uint64_t expired_writes;
	_Atomic uint64_t lock_timeouts;
	/* idx_expire_some: the shard the next call starts at, so a budget cut
	 * short in one shard does not starve the others. */
	_Atomic uint32_t expire_cursor;
	_Atomic uint64_t deferred_releases;
};

/* ---- helpers --------------------------------------------------------------- */

static inline int idx_timed_out(struct idx *ix)
{
	atomic_fetch_add_explicit(&ix->lock_timeouts, 1, memory_order_relaxed);
	return -ETIMEDOUT;
}

static inline uint64_t deadline_after(uint64_t now_ms, uint64_t ttl_ms)
{
	return ttl_ms > UINT64_MAX - now_ms ? UINT64_MAX : now_ms + ttl_ms;
}

static inline struct idx_shard *shard_of(struct idx *ix, uint64_t hv)
{
	return &ix->shards[hv & ix->shard_mask];
}

/* Bucket bits come from the high half: the low bits already chose the shard. */
static inline uint32_t bucket_of(uint32_t nbuckets, uint64_t hv)
{
	return (uint32_t)(hv >> 32) & (nbuckets - 1);
}

static inline enum idx_state entry_state(const struct idx_entry *e)
{
	if (e->writer)
		return IDX_WRITING;
	return e->read_locks || e->pins ? IDX_READING : IDX_READY;
}

static inline bool entry_evictable(const struct idx_entry *e)
{
	return e->linked && !e->writer && !e->read_locks && !e->pins;
}

static void chain_insert(struct idx_entry **head, struct idx_entry *e)
{
	e->hnext = *head;
	if (*head)
		(*head)->hpprev = &e->hnext;
	*head = e;
	e->hpprev = head;
}

static void chain_remove(struct idx_entry *e)
{
	*e->hpprev = e->hnext;
	if (e->hnext)
		e->hnext->hpprev = e->hpprev;
	e->hnext = NULL;
	e->hpprev = NULL;
}

static inline void book(uint64_t *counter, int sign, uint64_t v)
{
	if (sign > 0)
		*counter += v;
	else
		*counter -= v;
}

/*
 * Add (@sign = +1) or remove (-1) @e's share of the shard books. Every
 * mutation of an entry is bracketed by entry_account(-1) and (+1), so the
 * books always equal a fresh count (idx_check_invariants verifies).
 */
static void entry_account(struct idx_shard *sh, const struct idx_entry *e, int sign)
	REQUIRES(sh->lock)
{
	book(&sh->pins, sign, e->pins);
	if (!e->linked) {
		if (e->writer)
			book(&sh->orphan_writing, sign, 1);
		else if (e->pins)
			book(&sh->orphan_pinned, sign, 1);
		return;
	}
	book(&sh->nentries, sign, 1);
	book(&sh->read_locks, sign, e->read_locks);
	switch (entry_state(e)) {
	case IDX_WRITING:
		book(&sh->nwriting, sign, 1);
		break;
	case IDX_READY:
		book(&sh->nready, sign, 1);
		break;
	default:
		book(&sh->nreading, sign, 1);
		break;
	}
}

/*
 * Link the new entry @e (key hash @hv) into its bucket and the books. Returns
 * the bucket count to grow from once the lock is dropped (shard_grow), or 0.
 */
static uint32_t do_shard_link(struct idx_shard *sh, uint64_t hv, struct idx_entry *e)
	REQUIRES(sh->lock)
{
	chain_insert(&sh->buckets[bucket_of(sh->nbuckets, hv)], e);
	entry_account(sh, e, +1);
	if (sh->nentries > (uint64_t)sh->nbuckets * IDX_LOAD_FACTOR &&
	    sh->nbuckets < IDX_MAX_BUCKETS)
		return sh->nbuckets;
	return 0;
}

static inline uint64_t dq_deadline(const struct idx_entry *e, int q)
{
	return q == IDX_DQ_WRITE ? e->write_deadline_ms : e->read_deadline_ms;
}

/* Take @e off its deadline list, if it is on one. */
static void do_dq_remove(struct idx_shard *sh, struct idx_entry *e) REQUIRES(sh->lock)
{
	struct idx_dq *q;

	if (e->dq == IDX_DQ_NONE)
		return;
	q = &sh->dq[e->dq];
	if (e->dq_prev)
		e->dq_prev->dq_next = e->dq_next;
	else
		q->head = e->dq_next;
	if (e->dq_next)
		e->dq_next->dq_prev = e->dq_prev;
	else
		q->tail = e->dq_prev;
	e->dq_prev = e->dq_next = NULL;
	e->dq = IDX_DQ_NONE;
}

/*
 * Put @e on the deadline list its state calls for (WRITING: the write list;
 * read-locked: the read list; otherwise none), in deadline order, after any
 * entry with the same deadline. Call after its state or deadline changed;
 * an entry whose deadline changed must be removed first.
 */
static void do_dq_place(struct idx_shard *sh, struct idx_entry *e) REQUIRES(sh->lock)
{
	int want = !e->linked ? IDX_DQ_NONE :
		   e->writer ? IDX_DQ_WRITE :
		   e->read_locks ? IDX_DQ_READ : IDX_DQ_NONE;
	struct idx_entry *after;
	struct idx_dq *q;
	uint64_t d;

	if (e->dq == want)
		return;
	do_dq_remove(sh, e);
	if (want == IDX_DQ_NONE)
		return;
	q = &sh->dq[want];
	d = dq_deadline(e, want);
	/* From the tail: with one TTL per list, the new deadline is nearly always the latest. */
	for (after = q->tail; after && dq_deadline(after, want) > d; after = after->dq_prev)
		;
	e->dq_prev = after;
	e->dq_next = after ? after->dq_next : q->head;
	if (e->dq_next)
		e->dq_next->dq_prev = e;
	else
		q->tail = e;
	if (after)
		after->dq_next = e;
	else
		q->head = e;
	e->dq = (uint8_t)want;
}

static struct idx_entry *do_shard_find(struct idx_shard *sh, uint64_t hv, const struct ks_key *k)
	REQUIRES(sh->lock)
{
	struct idx_entry *e = sh->buckets[bucket_of(sh->nbuckets, hv)];

	for (; e; e = e->hnext)
		if (e->hv == hv && ks_key_equal(&e->key, k))
			return e;
	return NULL;
}

/*
 * Take @e off the LRU before it stops being evictable. Returns 0, or
 * -ETIMEDOUT with nothing changed (the caller then fails its operation).
 */
static int do_entry_lru_del(struct idx *ix, struct idx_shard *sh, struct idx_entry *e)
	REQUIRES(sh->lock)
{
	(void)sh;	/* for REQUIRES: on_lru is read under the entry's shard lock */
	if (!e->on_lru)
		return 0;
	if (lru_lock(&ix->lru))
		return idx_timed_out(ix);
	do_lru_remove(&ix->lru, &e->lru);
	e->on_lru = false;
	lru_unlock(&ix->lru);
	return 0;
}

/*
 * Put @e at the most recently used end if it has become evictable. On a
 * lock timeout it stays off the list (not evictable until its next state
 * change puts it back) rather than the caller undoing a release.
 */
static void do_entry_lru_add(struct idx *ix, struct idx_shard *sh, struct idx_entry *e)
	REQUIRES(sh->lock)
{
	(void)sh;	/* for REQUIRES: on_lru is read under the entry's shard lock */
	if (e->on_lru || !entry_evictable(e))
		return;
	if (lru_lock(&ix->lru)) {
		idx_timed_out(ix);
		log_error("index: slot %u not put on the LRU: lock timed out", e->slot);
		return;
	}
	do_lru_push_head(&ix->lru, &e->lru);
	e->on_lru = true;
	lru_unlock(&ix->lru);
}

/*
 * Free @e's slot and queue its memory on *@garbage, for free() once the
 * locks are dropped. @e is already off every list and out of the books.
 */
static void do_entry_release(struct idx *ix, struct idx_shard *sh, struct idx_entry *e,
			     struct idx_entry **garbage) REQUIRES(sh->lock)
{
	(void)sh;	/* only for the REQUIRES annotation: the slot goes back under it */
	if (ix->journal.freed)
		ix->journal.freed(ix->journal.arg, e->slot);
	pool_free(ix->pool, e->slot);
	e->hnext = *garbage;
	*garbage = e;
}

static void free_garbage(struct idx_entry *garbage)
{
	while (garbage) {
		struct idx_entry *next = garbage->hnext;

		free(garbage);
		garbage = next;
	}
}

/*
 * Unlink @e (linked, not on the LRU) from the table. Its read locks are
 * voided. If nothing references it any more its slot is freed and it goes on
 * *@garbage; otherwise it waits on the orphan list for its last reference.
 */
static void do_entry_unlink(struct idx *ix, struct idx_shard *sh, struct idx_entry *e,
			    struct idx_entry **garbage) REQUIRES(sh->lock)
{
	do_dq_remove(sh, e);
	entry_account(sh, e, -1);
	chain_remove(e);
	e->linked = false;
	e->read_locks = 0;
	if (e->writer || e->pins) {
		chain_insert(&sh->orphans, e);
		entry_account(sh, e, +1);
		return;
	}
	do_entry_release(ix, sh, e, garbage);
}

/*
 * Drop an orphan's last accounting change: called after its pins or writer
 * changed (books already removed by the caller). Frees it when unreferenced.
 */
static void do_orphan_settle(struct idx *ix, struct idx_shard *sh, struct idx_entry *e,
			     struct idx_entry **garbage) REQUIRES(sh->lock)
{
	if (e->writer || e->pins) {
		entry_account(sh, e, +1);
		return;
	}
	chain_remove(e);
	do_entry_release(ix, sh, e, garbage);
}

/*
 * Double @sh's bucket array if it still has @seen buckets. The new array is
 * allocated before taking the lock (no allocation under a ks_mutex).
 * NOTE: the rehash runs under the shard lock, O(entries of the shard); the
 * table doubles, so this is amortized O(1) per insert.
 */
static void shard_grow(struct idx *ix, struct idx_shard *sh, uint32_t seen)
{
	uint32_t nb = seen * 2;
	struct idx_entry **nbk = calloc(nb, sizeof(*nbk));
	struct idx_entry **old;

	if (!nbk)
		return;	/* longer chains: slower, still correct */
	if (ks_lock(&sh->lock)) {
		idx_timed_out(ix);
		free(nbk);
		return;
	}
	if (sh->nbuckets != seen) {
		ks_unlock(&sh->lock);	/* another thread grew it first */
		free(nbk);
		return;
	}
	old = sh->buckets;
	for (uint32_t i = 0; i < seen; i++) {
		struct idx_entry *e = old[i];

		while (e) {
			struct idx_entry *next = e->hnext;

			chain_insert(&nbk[bucket_of(nb, e->hv)], e);
			e = next;
		}
	}
	sh->buckets = nbk;
	sh->nbuckets = nb;
	ks_unlock(&sh->lock);
	free(old);
}

/* Drop the reservation of WRITING @e (linked or orphaned); its slot returns to the pool. */
static void do_entry_abort(struct idx *ix, struct idx_shard *sh, struct idx_entry *e,
			   struct idx_entry **garbage) REQUIRES(sh->lock)
{
	/* A WRITING entry is never on the LRU and has no pins or read locks. */
	do_dq_remove(sh, e);
	entry_account(sh, e, -1);
	chain_remove(e);	/* from the table or the orphan list alike */
	e->linked = false;
	e->writer = false;
	do_entry_release(ix, sh, e, garbage);
}

/* Drop one pin of @e; frees an orphan at its last pin, else it may rejoin the LRU. */
static void do_entry_unpin(struct idx *ix, struct idx_shard *sh, struct idx_entry *e,
			   struct idx_entry **garbage) REQUIRES(sh->lock)
{
	if (ks_unlikely(e->pins == 0)) {
		log_error("index: unpin of slot %u which has no pins", e->slot);
		return;
	}
	entry_account(sh, e, -1);
	e->pins--;
	if (!e->linked) {
		do_orphan_settle(ix, sh, e, garbage);	/* frees it at the last unpin */
	} else {
		entry_account(sh, e, +1);
		do_entry_lru_add(ix, sh, e);
	}
}

/*
 * A release whose shard lock timed out. The pin or reservation it drops
 * still holds @e, so @e stays alive until it is applied: count it in
 * e->deferred and, on the step from 0, push @e on the shard's deferred
 * stack. An entry is pushed only while its count is 0 -> 1 and the settler
 * reads its link before taking the count, so it is never on the stack twice.
 */
static void entry_defer_release(struct idx *ix, struct idx_entry *e, const char *what)
{
	struct idx_shard *sh = &ix->shards[e->shard];

	atomic_fetch_add_explicit(&ix->deferred_releases, 1, memory_order_relaxed);
	if (atomic_fetch_add(&e->deferred, 1) == 0) {
		struct idx_entry *head = atomic_load(&sh->deferred);

		do
			e->deferred_next = head;
		while (!atomic_compare_exchange_weak(&sh->deferred, &head, e));
	}
	log_error("index: %s of slot %u deferred: shard lock timed out", what, e->slot);
}

/* Apply every release owed on @sh's deferred stack. */
static void do_shard_settle_deferred(struct idx *ix, struct idx_shard *sh,
				     struct idx_entry **garbage) REQUIRES(sh->lock)
{
	struct idx_entry *e;

	if (!atomic_load_explicit(&sh->deferred, memory_order_relaxed))
		return;
	e = atomic_exchange(&sh->deferred, NULL);
	while (e) {
		struct idx_entry *next = e->deferred_next;
		uint32_t n = atomic_exchange(&e->deferred, 0);

		if (e->writer) {
			/* Only its one writer releases a WRITING entry: an abort. */
			do_entry_abort(ix, sh, e, garbage);
		} else {
			while (n--)
				do_entry_unpin(ix, sh, e, garbage);
		}
		e = next;
	}
}

/* ks_lock() of the shard lock for the release paths, which fault point idx.release_lock
 * fails as a timeout. */
static int release_lock_or_fault(struct idx_shard *sh) TRY_ACQUIRE(0, sh->lock)
	NO_THREAD_SAFETY_ANALYSIS
{
	if (ks_fault_fire(KS_FAULT_IDX_RELEASE_LOCK))
		return -ETIMEDOUT;
	return ks_lock(&sh->lock);
}

/* ---- create / destroy ------------------------------------------------------ */

static uint32_t pow2_at_least(uint64_t x)
{
	uint32_t p = 1;

	while (p < x && p < (1u << 31))
		p <<= 1;
	return p;
}

int idx_create(const struct idx_config *cfg, struct pool *pool, struct idx **out)
{
	struct idx_config c = cfg ? *cfg : (struct idx_config){ 0 };
	uint32_t nbuckets = IDX_MIN_BUCKETS;
	struct idx *ix;
	size_t bytes;
	uint32_t i;
	int rc;

	if (!pool)
		return -EINVAL;
	if (!c.nshards)
		c.nshards = IDX_DEFAULT_SHARDS;
	if (c.nshards > IDX_MAX_SHARDS || (c.nshards & (c.nshards - 1)))
		return -EINVAL;
	ix = calloc(1, sizeof(*ix));
	if (!ix)
		return -ENOMEM;
	ix->pool = pool;
	ix->nshards = c.nshards;
	ix->shard_mask = c.nshards - 1;
	ix->read_ttl_ms = c.read_ttl_ms ? c.read_ttl_ms : IDX_DEFAULT_READ_TTL_MS;
	ix->write_ttl_ms = c.write_ttl_ms ? c.write_ttl_ms : IDX_DEFAULT_WRITE_TTL_MS;
	atomic_init(&ix->low_wm, c.evict_low_watermark_slots ? c.evict_low_watermark_slots : 1);

	/* Size the tables for a full pool when its geometry is known already. */
	if (pool_nslots(pool)) {
		nbuckets = pow2_at_least(pool_nslots(pool) / c.nshards / IDX_LOAD_FACTOR + 1);
		nbuckets = KS_MAX(nbuckets, IDX_MIN_BUCKETS);
		nbuckets = KS_MIN(nbuckets, IDX_MAX_BUCKETS);
	}

	rc = lru_init(&ix->lru, "idx lru");
	if (rc)
		goto out_free_ix;
	bytes = sizeof(struct idx_shard) * c.nshards;	/* a multiple of its 64-byte alignment */
	ix->shards = aligned_alloc(_Alignof(struct idx_shard), bytes);
	if (!ix->shards) {
		rc = -ENOMEM;
		goto out_lru;
	}
	memset(ix->shards, 0, bytes);
	for (i = 0; i < c.nshards; i++) {
		struct idx_shard *sh = &ix->shards[i];

		rc = ks_mutex_init(&sh->lock, LOCK_RANK_IDX_SHARD, "idx shard");
		if (rc)
			goto out_shards;
		sh->buckets = calloc(nbuckets, sizeof(*sh->buckets));
		if (!sh->buckets) {
			ks_mutex_destroy(&sh->lock);
			rc = -ENOMEM;
			goto out_shards;
		}
		sh->nbuckets = nbuckets;
	}
	*out = ix;
	return 0;

out_shards:
	while (i--) {
		free(ix->shards[i].buckets);
		ks_mutex_destroy(&ix->shards[i].lock);
	}
	free(ix->shards);
out_lru:
	lru_destroy(&ix->lru);
out_free_ix:
	free(ix);
	return rc;
}

/* No other thread may use @ix, so the shard books are read without locks. */
void idx_destroy(struct idx *ix) NO_THREAD_SAFETY_ANALYSIS
{
	if (!ix)
		return;
	for (uint32_t i = 0; i < ix->nshards; i++) {
		struct idx_shard *sh = &ix->shards[i];
		struct idx_entry *e, *next;

		for (uint32_t b = 0; b <= sh->nbuckets; b++) {
			e = b < sh->nbuckets ? sh->buckets[b] : sh->orphans;
			for (; e; e = next) {
				next = e->hnext;
				pool_free(ix->pool, e->slot);
				free(e);
			}
		}
		free(sh->buckets);
		ks_mutex_destroy(&sh->lock);
	}
	free(ix->shards);
	lru_destroy(&ix->lru);
	free(ix);
}

/* ---- eviction ---------------------------------------------------------------- */

/*
 * Evict least recently used entries until @max are gone or the pool has
 * @target_free free slots. Returns the number evicted; sets *busy when a
 * candidate was skipped because its shard was held by another thread.
 * Called with no lock held.
 */
static size_t evict_lru(struct idx *ix, size_t max, uint32_t target_free, bool *busy)
{
	size_t total = 0;

	while (total < max && pool_free_slots(ix->pool) < target_free) {
		struct idx_entry *garbage = NULL, *hooked[EVICT_BATCH];
		struct ks_list *node;
		size_t n = 0, scanned = 0, nhook = 0;

		if (lru_lock(&ix->lru)) {
			idx_timed_out(ix);
			break;
		}
		node = do_lru_tail(&ix->lru);
		/* A hooked entry's slot is freed after the hook (below): count it as
		 * free already, or one reservation would evict a whole batch. */
		while (node && n < EVICT_BATCH && scanned < EVICT_SCAN && total + n < max &&
		       pool_free_slots(ix->pool) + nhook < target_free) {
			/* Nodes on the list are alive: freeing one needs lru->lock to unlink it. */
			struct idx_entry *e = ks_list_entry(node, struct idx_entry, lru);
			struct idx_shard *sh = &ix->shards[e->shard];
			struct ks_list *newer = do_lru_newer(&ix->lru, node);

			scanned++;
			/*
			 * Against the lock order (shard > lru): the thread holding this
			 * shard may be waiting for lru->lock right now, so waiting for
			 * the shard here could deadlock. Trylock and skip a busy one.
			 */
			if (ks_trylock(&sh->lock) == 0) {
				/* On the LRU and we hold both locks: READY, unlocked, unpinned. */
				do_lru_remove(&ix->lru, &e->lru);
				e->on_lru = false;
				if (ix->evict_fn && nhook < EVICT_BATCH) {
					/* Pinned, it goes to the orphans: the slot stays ours
					 * until the hook has read it outside the locks. */
					entry_account(sh, e, -1);
					e->pins++;
					entry_account(sh, e, +1);
					hooked[nhook++] = e;
				}
				do_entry_unlink(ix, sh, e, &garbage);
				ks_unlock(&sh->lock);
				n++;
			} else {
				*busy = true;
			}
			node = newer;
		}
		lru_unlock(&ix->lru);
		free_garbage(garbage);
		for (size_t h = 0; h < nhook; h++) {
			ks_assert_unlocked();
			ix->evict_fn(ix->evict_arg, &hooked[h]->key,
				     pool_slot_ptr(ix->pool, hooked[h]->slot), hooked[h]->nbytes);
			idx_unpin(ix, hooked[h]);	/* last pin: the slot goes back */
		}
		total += n;
		if (n == 0)
			break;
	}
	if (total)
		atomic_fetch_add_explicit(&ix->evictions, total, memory_order_relaxed);
	return total;
}

void idx_set_low_watermark(struct idx *ix, uint32_t slots)
{
	atomic_store(&ix->low_wm, slots ? slots : 1);
}

void idx_set_journal(struct idx *ix, const struct idx_journal *j)
{
	if (j)
		ix->journal = *j;
	else
		memset(&ix->journal, 0, sizeof(ix->journal));
}

int idx_restore_ready(struct idx *ix, const struct ks_key *k, uint32_t slot, uint64_t nbytes)
{
	uint64_t slot_bytes = pool_slot_bytes(ix->pool);
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;
	uint32_t seen_buckets = 0;

	if (!slot_bytes || slot >= pool_nslots(ix->pool))
		return -EINVAL;
	if (nbytes == 0 || nbytes > slot_bytes)
		return -E2BIG;
	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->key = *k;
	e->hv = hv;
	e->shard = (uint32_t)(hv & ix->shard_mask);
	e->slot = slot;
	e->nbytes = nbytes;
	e->linked = true;
	ks_list_node_init(&e->lru);
	if (ks_lock(&sh->lock)) {
		free(e);
		return idx_timed_out(ix);
	}
	if (do_shard_find(sh, hv, k)) {
		ks_unlock(&sh->lock);
		free(e);
		return -EEXIST;
	}
	seen_buckets = do_shard_link(sh, hv, e);
	do_entry_lru_add(ix, sh, e);
	ks_unlock(&sh->lock);
	if (seen_buckets)
		shard_grow(ix, sh, seen_buckets);
	return 0;
}

void idx_set_evict_hook(struct idx *ix, idx_evict_fn fn, void *arg)
{
	ix->evict_arg = arg;
	ix->evict_fn = fn;
}

size_t idx_evict(struct idx *ix, size_t n)
{
	bool busy = false;

	return evict_lru(ix, n, UINT32_MAX, &busy);
}

/*
 * A free slot for a reservation. On a full pool, evict down to the low
 * watermark (not just one: hysteresis, so the next STOREs find free slots)
 * and retry; another thread may take the freed slots first, hence the rounds.
 */
static int reserve_slot(struct idx *ix, uint32_t *slot)
{
	for (int round = 0;; round++) {
		bool busy = false;
		int rc = pool_alloc(ix->pool, slot);

		if (rc != -ENOSPC || round == RESERVE_EVICT_TRIES)
			return rc;
		if (evict_lru(ix, SIZE_MAX, KS_MAX(atomic_load(&ix->low_wm), 1u), &busy) == 0 &&
		    !busy && pool_free_slots(ix->pool) == 0)
			return -ENOSPC;	/* nothing evictable: every entry is in use */
		if (busy)
			sched_yield();	/* the shards at the cold end are held: let them go */
	}
}

/* ---- STORE ------------------------------------------------------------------- */

int idx_reserve_write(struct idx *ix, const struct ks_key *k, uint64_t nbytes,
		      struct idx_entry **out)
{
	uint64_t slot_bytes = pool_slot_bytes(ix->pool);
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;
	uint32_t slot, seen_buckets = 0;
	bool exists;
	int rc;

	if (!slot_bytes)
		return -ENODEV;
	if (nbytes == 0)
		return -EINVAL;
	if (nbytes > slot_bytes)
		return -E2BIG;

	/* A STORE of an already cached prefix skips here, before taking a slot. */
	if (ks_lock(&sh->lock))
		return idx_timed_out(ix);
	exists = do_shard_find(sh, hv, k) != NULL;
	ks_unlock(&sh->lock);
	if (exists)
		return -EEXIST;

	rc = reserve_slot(ix, &slot);
	if (rc)
		return rc;
	/* Before the caller writes a byte: a crash from here on drops the slot. */
	if (ix->journal.writing)
		ix->journal.writing(ix->journal.arg, slot);
	e = calloc(1, sizeof(*e));
	if (!e) {
		rc = -ENOMEM;
		goto out_free_slot;
	}
	e->key = *k;
	e->hv = hv;
	e->shard = (uint32_t)(hv & ix->shard_mask);
	e->slot = slot;
	e->nbytes = nbytes;
	e->writer = true;
	e->linked = true;
	e->write_deadline_ms = deadline_after(ks_now_ms(), ix->write_ttl_ms);
	e->dq = IDX_DQ_NONE;
	ks_list_node_init(&e->lru);

	if (ks_lock(&sh->lock)) {
		rc = idx_timed_out(ix);
		goto out_free_entry;
	}
	/* Checked again: another writer may have reserved @k while we had no lock. */
	if (do_shard_find(sh, hv, k)) {
		ks_unlock(&sh->lock);
		rc = -EEXIST;
		goto out_free_entry;
	}
	seen_buckets = do_shard_link(sh, hv, e);
	do_dq_place(sh, e);
	ks_unlock(&sh->lock);
	if (seen_buckets)
		shard_grow(ix, sh, seen_buckets);
	*out = e;
	return 0;

out_free_entry:
	free(e);
out_free_slot:
	if (ix->journal.freed)
		ix->journal.freed(ix->journal.arg, slot);
	pool_free(ix->pool, slot);
	return rc;
}

void idx_abort_write(struct idx *ix, struct idx_entry *e)
{
	struct idx_shard *sh = &ix->shards[e->shard];
	struct idx_entry *garbage = NULL;

	if (release_lock_or_fault(sh)) {
		idx_timed_out(ix);
		entry_defer_release(ix, e, "abort of the reservation");
		return;
	}
	do_shard_settle_deferred(ix, sh, &garbage);
	do_entry_abort(ix, sh, e, &garbage);
	ks_unlock(&sh->lock);
	free_garbage(garbage);
}

int idx_commit_write(struct idx *ix, struct idx_entry *e)
{
	struct idx_shard *sh = &ix->shards[e->shard];
	struct idx_entry *garbage = NULL;

	/*
	 * Journal first, with no lock held (it checksums the object): while we
	 * are the writer nobody else frees the slot, so its record cannot be
	 * marked free before this READY lands, only after.
	 */
	if (ix->journal.ready)
		ix->journal.ready(ix->journal.arg, e->slot, &e->key, pool_slot_ptr(ix->pool, e->slot),
				  e->nbytes);
	if (ks_lock(&sh->lock)) {
		idx_timed_out(ix);
		idx_abort_write(ix, e);	/* tries the lock once more; deferred if that fails too */
		return -ETIMEDOUT;
	}
	do_shard_settle_deferred(ix, sh, &garbage);
	do_dq_remove(sh, e);
	entry_account(sh, e, -1);
	e->writer = false;
	if (!e->linked) {
		/* Expired or cleared while the copy ran: nobody can find it any more. */
		do_orphan_settle(ix, sh, e, &garbage);
		ks_unlock(&sh->lock);
		free_garbage(garbage);
		return -ESTALE;
	}
	entry_account(sh, e, +1);
	do_entry_lru_add(ix, sh, e);
	ks_unlock(&sh->lock);
	free_garbage(garbage);
	return 0;
}

/* ---- RETRIEVE ---------------------------------------------------------------- */

int idx_pin(struct idx *ix, const struct ks_key *k, uint64_t nbytes, struct idx_entry **out)
{
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;
	int rc;

	if (ks_lock(&sh->lock))
		return idx_timed_out(ix);
	e = do_shard_find(sh, hv, k);
	if (!e || e->writer) {
		rc = -ENOENT;
		goto out_unlock;
	}
	if (e->nbytes != nbytes) {
		rc = -EMSGSIZE;
		goto out_unlock;
	}
	/* Off the LRU first: once pinned the walker must not see it. */
	rc = do_entry_lru_del(ix, sh, e);
	if (rc)
		goto out_unlock;
	entry_account(sh, e, -1);
	e->pins++;
	entry_account(sh, e, +1);
	*out = e;
out_unlock:
	ks_unlock(&sh->lock);
	return rc;
}

void idx_unpin(struct idx *ix, struct idx_entry *e)
{
	struct idx_shard *sh = &ix->shards[e->shard];
	struct idx_entry *garbage = NULL;

	if (release_lock_or_fault(sh)) {
		idx_timed_out(ix);
		entry_defer_release(ix, e, "unpin");
		return;
	}
	do_shard_settle_deferred(ix, sh, &garbage);
	do_entry_unpin(ix, sh, e, &garbage);
	ks_unlock(&sh->lock);
	free_garbage(garbage);
}

void *idx_entry_data(const struct idx *ix, const struct idx_entry *e)
{
	return pool_slot_ptr(ix->pool, e->slot);
}

uint32_t idx_entry_slot(const struct idx_entry *e)
{
	return e->slot;
}

/* ---- LOOKUP ------------------------------------------------------------------ */

/*
 * If @k is READY/READING, set *present and add @locks read locks with
 * deadline @deadline_ms. 0 or -ETIMEDOUT (nothing changed).
 */
static int lock_one(struct idx *ix, const struct ks_key *k, uint32_t locks, uint64_t deadline_ms,
		    bool *present)
{
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;
	int rc = 0;

	if (ks_lock(&sh->lock))
		return idx_timed_out(ix);
	e = do_shard_find(sh, hv, k);
	*present = e && !e->writer;
	if (!*present || !locks)
		goto out_unlock;
	rc = do_entry_lru_del(ix, sh, e);
	if (rc)
		goto out_unlock;
	entry_account(sh, e, -1);
	e->read_locks = locks > UINT32_MAX - e->read_locks ? UINT32_MAX : e->read_locks + locks;
	do_dq_remove(sh, e);	/* its place moves with the deadline */
	e->read_deadline_ms = deadline_ms;
	entry_account(sh, e, +1);
	do_dq_place(sh, e);
out_unlock:
	ks_unlock(&sh->lock);
	return rc;
}

/* Drop up to @count read locks on @k. 0, -ENOENT, -ETIMEDOUT. */
static int unlock_one(struct idx *ix, const struct ks_key *k, uint32_t count)
{
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;

	if (ks_lock(&sh->lock))
		return idx_timed_out(ix);
	e = do_shard_find(sh, hv, k);
	if (!e) {
		ks_unlock(&sh->lock);
		return -ENOENT;
	}
	entry_account(sh, e, -1);
	e->read_locks -= KS_MIN(count, e->read_locks);
	entry_account(sh, e, +1);
	do_dq_place(sh, e);	/* off the read list once the last lock is gone */
	do_entry_lru_add(ix, sh, e);
	ks_unlock(&sh->lock);
	return 0;
}

/* Undo our locks on keys [from, to): a timed-out undo leaves them to the TTL. */
static void unlock_range(struct idx *ix, const struct ks_key *keys, size_t from, size_t to,
			 uint32_t locks)
{
	for (size_t i = from; i < to; i++) {
		int rc = unlock_one(ix, &keys[i], locks);

		if (rc == -ETIMEDOUT)
			log_warn("index: lookup lock undo timed out; the lock expires by TTL");
	}
}

int idx_lookup_lock(struct idx *ix, const struct ks_key *keys, size_t n, size_t group,
		    uint32_t locks_per_key, size_t *hits)
{
	uint64_t deadline_ms = deadline_after(ks_now_ms(), ix->read_ttl_ms);
	size_t i, full;

	*hits = 0;
	if (group == 0)
		group = 1;
	/*
	 * One pass, one shard lock per key: lock each present key as we go and
	 * stop at the first miss. Only then is the locked length known, so the
	 * locks on the partial group after the last full one (< group keys) are
	 * given back. Locking in the same visit that saw the key present means a
	 * locked key can't be evicted between the count and the lock.
	 */
	for (i = 0; i < n; i++) {
		bool present = false;
		int rc = lock_one(ix, &keys[i], locks_per_key, deadline_ms, &present);

		if (rc) {
			if (locks_per_key)
				unlock_range(ix, keys, 0, i, locks_per_key);
			return rc;
		}
		if (!present)
			break;
	}
	full = i / group * group;
	if (locks_per_key)
		unlock_range(ix, keys, full, i, locks_per_key);
	*hits = i;
	return 0;
}

int idx_release_read_locks(struct idx *ix, const struct ks_key *k, uint32_t count)
{
	return unlock_one(ix, k, count);
}

bool idx_contains(struct idx *ix, const struct ks_key *k)
{
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;
	bool present;

	if (ks_lock(&sh->lock)) {
		idx_timed_out(ix);
		return false;
	}
	e = do_shard_find(sh, hv, k);
	present = e && !e->writer;
	ks_unlock(&sh->lock);
	return present;
}

int idx_key_info(struct idx *ix, const struct ks_key *k, struct idx_entry_info *info)
{
	uint64_t hv = ks_key_hash64(k);
	struct idx_shard *sh = shard_of(ix, hv);
	struct idx_entry *e;

	if (ks_lock(&sh->lock))
		return idx_timed_out(ix);
	e = do_shard_find(sh, hv, k);
	if (!e) {
		ks_unlock(&sh->lock);
		return -ENOENT;
	}
	*info = (struct idx_entry_info){
		.state = entry_state(e),
		.read_locks = e->read_locks,
		.pins = e->pins,
		.slot = e->slot,
		.nbytes = e->nbytes,
		.read_deadline_ms = e->read_deadline_ms,
		.write_deadline_ms = e->write_deadline_ms,
		.on_lru = e->on_lru,
	};
	ks_unlock(&sh->lock);
	return 0;
}

/* ---- housekeeping ------------------------------------------------------------ */

/*
 * Expire the deadlines of one shard that fall before @now_ms, at most
 * *@budget entries (decremented). Returns the entries affected; sets *@more
 * when a due entry was left for lack of budget.
 */
static size_t do_shard_expire(struct idx *ix, struct idx_shard *sh, uint64_t now_ms,
			      size_t *budget, bool *more) REQUIRES(sh->lock)
{
	size_t reads = 0, writes = 0;
	struct idx_entry *e;

	while ((e = sh->dq[IDX_DQ_WRITE].head) && e->write_deadline_ms < now_ms) {
		if (!*budget) {
			*more = true;
			break;
		}
		--*budget;
		/* Unlink so the key can be stored again; the writer still owns it. */
		do_dq_remove(sh, e);
		entry_account(sh, e, -1);
		chain_remove(e);
		e->linked = false;
		chain_insert(&sh->orphans, e);
		entry_account(sh, e, +1);
		writes++;
	}
	while ((e = sh->dq[IDX_DQ_READ].head) && e->read_deadline_ms < now_ms) {
		if (!*budget) {
			*more = true;
			break;
		}
		--*budget;
		do_dq_remove(sh, e);
		entry_account(sh, e, -1);
		e->read_locks = 0;
		entry_account(sh, e, +1);
		do_entry_lru_add(ix, sh, e);
		reads++;
	}
	if (reads)
		atomic_fetch_add_explicit(&ix->expired_read_locks, reads, memory_order_relaxed);
	if (writes)
		atomic_fetch_add_explicit(&ix->expired_writes, writes, memory_order_relaxed);
	return reads + writes;
}

size_t idx_expire_some(struct idx *ix, uint64_t now_ms, size_t budget, bool *more)
{
	uint32_t first = atomic_load_explicit(&ix->expire_cursor, memory_order_relaxed);
	size_t affected = 0;
	bool left = false;

	for (uint32_t k = 0; k < ix->nshards && !left; k++) {
		uint32_t i = (first + k) & ix->shard_mask;
		struct idx_shard *sh = &ix->shards[i];

		struct idx_entry *garbage = NULL;

		if (ks_lock(&sh->lock)) {
			idx_timed_out(ix);
			continue;	/* the next housekeeping round gets it */
		}
		do_shard_settle_deferred(ix, sh, &garbage);
		affected += do_shard_expire(ix, sh, now_ms, &budget, &left);
		ks_unlock(&sh->lock);
		free_garbage(garbage);
		if (left)	/* out of budget here: the next call starts with this shard */
			atomic_store_explicit(&ix->expire_cursor, i, memory_order_relaxed);
	}
	if (more)
		*more = left;
	return affected;
}

size_t idx_expire(struct idx *ix, uint64_t now_ms)
{
	return idx_expire_some(ix, now_ms, SIZE_MAX, NULL);
}

size_t idx_clear(struct idx *ix)
{
	size_t unlinked = 0;

	for (uint32_t i = 0; i < ix->nshards; i++) {
		struct idx_shard *sh = &ix->shards[i];
		struct idx_entry *garbage = NULL;

		if (ks_lock(&sh->lock)) {
			idx_timed_out(ix);
			log_error("index: CLEAR skipped a shard: lock timed out");
			continue;
		}
		for (uint32_t b = 0; b < sh->nbuckets; b++) {
			struct idx_entry *e = sh->buckets[b], *enext;

			for (; e; e = enext) {
				enext = e->hnext;
				/* An entry on the LRU must leave it before it is freed. */
				if (do_entry_lru_del(ix, sh, e))
					continue;	/* stays cached; logged via the timeout */
				do_entry_unlink(ix, sh, e, &garbage);
				unlinked++;
			}
		}
		ks_unlock(&sh->lock);
		free_garbage(garbage);
	}
	return unlinked;
}

void idx_get_stats(struct idx *ix, struct idx_stats *st)
{
	memset(st, 0, sizeof(*st));
	for (uint32_t i = 0; i < ix->nshards; i++) {
		struct idx_shard *sh = &ix->shards[i];

		if (ks_lock(&sh->lock)) {
			idx_timed_out(ix);
			continue;
		}
		st->entries += sh->nentries;
		st->writing += sh->nwriting;
		st->ready += sh->nready;
		st->reading += sh->nreading;
		st->read_locks += sh->read_locks;
		st->pins += sh->pins;
		st->unlinked_pinned += sh->orphan_pinned;
		st->unlinked_writing += sh->orphan_writing;
		ks_unlock(&sh->lock);
	}
	st->evictions = atomic_load_explicit(&ix->evictions, memory_order_relaxed);
	st->expired_read_locks = atomic_load_explicit(&ix->expired_read_locks, memory_order_relaxed);
	st->expired_writes = atomic_load_explicit(&ix->expired_writes, memory_order_relaxed);
	st->lock_timeouts = atomic_load_explicit(&ix->lock_timeouts, memory_order_relaxed);
	st->deferred_releases = atomic_load_explicit(&ix->deferred_releases, memory_order_relaxed);
}

/* ---- invariants -------------------------------------------------------------- */

struct inv_ctx {
	char *err;
	size_t errlen;
	uint8_t *slot_seen;	/* owns: one flag per pool slot */
	uint32_t nslots;
	uint64_t slot_bytes;
	uint64_t evictable;	/* entries that must be on the LRU */
	uint64_t owners;	/* entries owning a slot */
};

static int inv_fail(struct inv_ctx *c, const char *fmt, ...) KS_PRINTF(2, 3);
static int inv_fail(struct inv_ctx *c, const char *fmt, ...)
{
	va_list ap;

	if (c->err && c->errlen) {
		va_start(ap, fmt);
		vsnprintf(c->err, c->errlen, fmt, ap);
		va_end(ap);
	}
	return -EUCLEAN;
}

/* Checks common to linked and orphan entries. */
static int do_inv_entry(struct inv_ctx *c, struct idx_shard *sh, uint32_t shard,
			const struct idx_entry *e) REQUIRES(sh->lock)
{
	(void)sh;	/* for REQUIRES: the entry's fields are read under it */
	if (e->shard != shard)
		return inv_fail(c, "slot %u: entry in shard %u says shard %u", e->slot, shard,
				e->shard);
	if (*e->hpprev != e)
		return inv_fail(c, "slot %u: broken chain links", e->slot);
	if (e->slot >= c->nslots)
		return inv_fail(c, "slot %u out of range (%u slots)", e->slot, c->nslots);
	if (c->slot_seen[e->slot]++)
		return inv_fail(c, "slot %u owned by two entries", e->slot);
	if (e->nbytes == 0 || e->nbytes > c->slot_bytes)
		return inv_fail(c, "slot %u: %llu bytes in a %llu-byte slot", e->slot,
				(unsigned long long)e->nbytes, (unsigned long long)c->slot_bytes);
	if (e->writer && (e->pins || e->read_locks))
		return inv_fail(c, "slot %u: WRITING with %u pins, %u read locks", e->slot, e->pins,
				e->read_locks);
	if (e->dq != (!e->linked ? IDX_DQ_NONE : e->writer ? IDX_DQ_WRITE :
		      e->read_locks ? IDX_DQ_READ : IDX_DQ_NONE))
		return inv_fail(c, "slot %u: on deadline list %u (linked=%d writer=%d locks=%u)",
				e->slot, e->dq, e->linked, e->writer, e->read_locks);
	if (e->on_lru != entry_evictable(e))
		return inv_fail(c, "slot %u: on_lru=%d but evictable=%d (state %d, %u locks, %u pins)",
				e->slot, e->on_lru, entry_evictable(e), (int)entry_state(e),
				e->read_locks, e->pins);
	c->owners++;
	c->evictable += entry_evictable(e);
	return 0;
}

static int do_inv_shard(struct inv_ctx *c, struct idx *ix, struct idx_shard *sh, uint32_t shard)
	REQUIRES(sh->lock)
{
	uint64_t n = 0, w = 0, r = 0, rd = 0, locks = 0, pins = 0, opin = 0, owr = 0, locked = 0;
	const struct idx_entry *e;
	int rc;

	for (uint32_t b = 0; b < sh->nbuckets; b++) {
		for (e = sh->buckets[b]; e; e = e->hnext) {
			if (!e->linked)
				return inv_fail(c, "slot %u: in the table but not linked", e->slot);
			if ((e->hv & ix->shard_mask) != shard || bucket_of(sh->nbuckets, e->hv) != b)
				return inv_fail(c, "slot %u: in the wrong shard or bucket", e->slot);
			if (e->hv != ks_key_hash64(&e->key))
				return inv_fail(c, "slot %u: stored hash does not match its key",
						e->slot);
			rc = do_inv_entry(c, sh, shard, e);
			if (rc)
				return rc;
			n++;
			w += entry_state(e) == IDX_WRITING;
			r += entry_state(e) == IDX_READY;
			rd += entry_state(e) == IDX_READING;
			locks += e->read_locks;
			locked += e->read_locks != 0;
			pins += e->pins;
		}
	}
	for (int q = IDX_DQ_READ; q <= IDX_DQ_WRITE; q++) {
		uint64_t on_q = 0, want = q == IDX_DQ_WRITE ? w : locked, prev_deadline = 0;
		const struct idx_entry *prev = NULL;

		for (e = sh->dq[q].head; e; prev = e, e = e->dq_next) {
			if (e->dq != q || e->dq_prev != prev)
				return inv_fail(c, "shard %u: deadline list %d broken at slot %u",
						shard, q, e->slot);
			if (dq_deadline(e, q) < prev_deadline)
				return inv_fail(c, "shard %u: deadline list %d out of order at slot %u",
						shard, q, e->slot);
			prev_deadline = dq_deadline(e, q);
			if (++on_q > n)
				return inv_fail(c, "shard %u: deadline list %d longer than the table",
						shard, q);
		}
		if (sh->dq[q].tail != prev)
			return inv_fail(c, "shard %u: deadline list %d tail is wrong", shard, q);
		if (on_q != want)
			return inv_fail(c, "shard %u: deadline list %d holds %llu, expected %llu",
					shard, q, (unsigned long long)on_q, (unsigned long long)want);
	}
	for (e = sh->orphans; e; e = e->hnext) {
		if (e->linked || e->read_locks || (!e->writer && !e->pins))
			return inv_fail(c, "slot %u: orphan linked=%d locks=%u pins=%u writer=%d",
					e->slot, e->linked, e->read_locks, e->pins, e->writer);
		rc = do_inv_entry(c, sh, shard, e);
		if (rc)
			return rc;
		pins += e->pins;
		owr += e->writer;
		opin += !e->writer;
	}
	if (n != sh->nentries || w != sh->nwriting || r != sh->nready || rd != sh->nreading ||
	    locks != sh->read_locks || pins != sh->pins || opin != sh->orphan_pinned ||
	    owr != sh->orphan_writing)
		return inv_fail(c,
				"shard %u books: entries %llu/%llu writing %llu/%llu ready %llu/%llu "
				"reading %llu/%llu locks %llu/%llu pins %llu/%llu orphans %llu/%llu "
				"%llu/%llu (counted/booked)",
				shard, (unsigned long long)n, (unsigned long long)sh->nentries,
				(unsigned long long)w, (unsigned long long)sh->nwriting,
				(unsigned long long)r, (unsigned long long)sh->nready,
				(unsigned long long)rd, (unsigned long long)sh->nreading,
				(unsigned long long)locks, (unsigned long long)sh->read_locks,
				(unsigned long long)pins, (unsigned long long)sh->pins,
				(unsigned long long)opin, (unsigned long long)sh->orphan_pinned,
				(unsigned long long)owr, (unsigned long long)sh->orphan_writing);
	return 0;
}

int idx_check_invariants(struct idx *ix, char *err, size_t errlen)
{
	struct inv_ctx c = { .err = err, .errlen = errlen };
	struct pool_stats ps;
	uint64_t on_list = 0;
	int rc = 0;

	if (err && errlen)
		err[0] = '\0';
	pool_get_stats(ix->pool, &ps);
	c.nslots = ps.nslots;
	c.slot_bytes = ps.slot_bytes;
	c.slot_seen = calloc(KS_MAX(c.nslots, 1u), 1);
	if (!c.slot_seen)
		return -ENOMEM;

	for (uint32_t i = 0; i < ix->nshards && !rc; i++) {
		struct idx_shard *sh = &ix->shards[i];

		if (ks_lock(&sh->lock)) {
			rc = idx_timed_out(ix);
			break;
		}
		rc = do_inv_shard(&c, ix, sh, i);
		ks_unlock(&sh->lock);
	}
	if (rc)
		goto out;

	if (lru_lock(&ix->lru)) {
		rc = idx_timed_out(ix);
		goto out;
	}
	for (struct ks_list *n = do_lru_tail(&ix->lru); n; n = do_lru_newer(&ix->lru, n)) {
		/* on_lru changes only with lru->lock held too, so reading it here is safe. */
		if (!ks_list_entry(n, struct idx_entry, lru)->on_lru) {
			rc = inv_fail(&c, "LRU holds an entry whose on_lru flag is clear");
			break;
		}
		if (++on_list > c.owners) {
			rc = inv_fail(&c, "LRU longer than the entries (cycle?)");
			break;
		}
	}
	if (!rc && on_list != do_lru_len(&ix->lru))
		rc = inv_fail(&c, "LRU length %llu but %llu nodes linked",
			      (unsigned long long)do_lru_len(&ix->lru), (unsigned long long)on_list);
	lru_unlock(&ix->lru);
	if (rc)
		goto out;
	if (on_list != c.evictable) {
		rc = inv_fail(&c, "LRU holds %llu entries, %llu are evictable",
			      (unsigned long long)on_list, (unsigned long long)c.evictable);
		goto out;
	}
	if ((uint64_t)ps.nslots - ps.free_slots != c.owners) {
		rc = inv_fail(&c, "pool has %u of %u slots in use, entries own %llu",
			      ps.nslots - ps.free_slots, ps.nslots, (unsigned long long)c.owners);
		goto out;
	}
	if (ps.used_bytes != c.owners * ps.slot_bytes)
		rc = inv_fail(&c, "pool used_bytes %llu != %llu entries * %llu",
			      (unsigned long long)ps.used_bytes, (unsigned long long)c.owners,
			      (unsigned long long)ps.slot_bytes);
out:
	free(c.slot_seen);
	return rc;
}
