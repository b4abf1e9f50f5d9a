/*
 * index.h - the chunk index: (chunk_hash, model, kv_rank) -> object.
 *
 * A sharded hash table of entries, each owning one pool slot. States:
 *
 *   FREE -> WRITING -> READY <-> READING(read_locks + pins) -> FREE
 *
 * - WRITING: reserved by a STORE (idx_reserve_write); invisible to lookups.
 *   Becomes READY only by idx_commit_write after the copy completed. The
 *   reservation expires after write_ttl_ms: the key is unlinked so it can be
 *   stored again, and the slot is freed when the writer commits (which then
 *   fails with -ESTALE) or aborts. Writers are in-process transfer workers,
 *   so one of the two always happens.
 * - READING: READY with read_locks > 0 (LOOKUP locks, expire after
 *   read_ttl_ms since last taken) or pins > 0 (a RETRIEVE copying out; pins
 *   never expire, workers always unpin).
 * - Only READY entries with no read locks and no pins are on the LRU list,
 *   and only they are evicted.
 * - CLEAR unlinks every entry; entries with pins are freed at the last unpin
 *   (or at commit/abort for writers), never under a running copy.
 *
 * Refcount invariant: an entry is freed only when it is unlinked and its
 * pins are 0, under its shard lock; pins are taken only under that lock.
 *
 * Lock order (the tree is in lock.h): every idx_* call takes its locks
 * (idx_shard->lock, under it lru->lock and pool->free_lock) and drops them
 * before it returns; call it holding no lock.
 */
#ifndef KS_INDEX_H
#define KS_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunk_key.h"
#include "pool.h"

struct idx;
struct idx_entry;

enum idx_state { IDX_FREE = 0, IDX_WRITING, IDX_READY, IDX_READING };

struct idx_config {
	unsigned nshards;		/* power of two; 0 = 64 */
	uint64_t read_ttl_ms;		/* lookup read locks; 0 = 300000 */
	uint64_t write_ttl_ms;		/* write reservations; 0 = 600000 */
	/* Evict until at least this many slots are free when a reservation
	 * needs space (hysteresis so every STORE does not evict one by one). */
	uint32_t evict_low_watermark_slots;	/* 0 = 1 */
};

struct idx_stats {
	uint64_t entries;	/* linked entries, any state */
	uint64_t writing, ready, reading;
	uint64_t read_locks;	/* sum over entries */
	uint64_t pins;		/* sum over entries, unlinked ones included */
	uint64_t unlinked_pinned;	/* cleared/expired, waiting for the last unpin */
	uint64_t unlinked_writing;	/* reservations cleared/expired, waiting for commit/abort */
	uint64_t evictions;	/* total */
	uint64_t expired_read_locks;	/* entries whose read locks expired (total) */
	uint64_t expired_writes;	/* write reservations that expired (total) */
	uint64_t lock_timeouts;	/* shard/LRU lock waits that timed out (total) */
	uint64_t deferred_releases;	/* unpins/aborts deferred by a lock timeout (total) */
};

/*
 * Information about one linked entry (idx_key_info), for tests, debug and
 * admin tools. A snapshot: it may be stale as soon as the shard lock drops.
 */
struct idx_entry_info {
	enum idx_state state;		/* IDX_WRITING, IDX_READY or IDX_READING */
	uint32_t read_locks;
	uint32_t pins;
	uint32_t slot;
	uint64_t nbytes;
	uint64_t read_deadline_ms;	/* CLOCK_MONOTONIC ms; meaningful with read_locks > 0 */
	uint64_t write_deadline_ms;	/* CLOCK_MONOTONIC ms; meaningful while WRITING */
	bool on_lru;			/* evictable: READY with no read locks or pins */
};

/*
 * 0, -EINVAL (bad config: nshards not a power of two or over 65536), -ENOMEM.
 * @pool is borrowed until idx_destroy. The pool may be configured later
 * (pool_configure_slots); until then idx_reserve_write fails with -ENODEV.
 */
int idx_create(const struct idx_config *cfg, struct pool *pool, struct idx **out);
/* Frees every entry and returns their slots. No thread may use @ix any more. */
void idx_destroy(struct idx *ix);

/* ---- STORE ---- */

/*
 * Reserve a WRITING entry for @k with a fresh slot (evicting LRU entries if
 * the pool is short). The caller owns the reservation until commit/abort.
 * Returns 0 with *out set, -EEXIST if @k is linked in any state (skip it),
 * -ENOSPC if no slot could be found, -E2BIG if @nbytes exceeds the slot
 * size, -ETIMEDOUT if a lock wait timed out, -EINVAL for @nbytes == 0,
 * -ENODEV before pool_configure_slots(), -ENOMEM if entry metadata could not
 * be allocated. Eviction runs with no shard lock held, until the pool has
 * evict_low_watermark_slots free slots (or nothing more is evictable).
 */
int idx_reserve_write(struct idx *ix, const struct ks_key *k, uint64_t nbytes,
		      struct idx_entry **out);
/*
 * WRITING -> READY. Returns 0, or -ESTALE if the reservation expired or was
 * cleared meanwhile (the entry and its slot are freed; the data is lost), or
 * -ETIMEDOUT (then the entry is aborted as by idx_abort_write).
 * @e must not be used after the call either way.
 * "Expired" means idx_expire() unlinked it; a commit after the deadline but
 * before the next idx_expire() succeeds (the data is complete either way).
 * The new READY entry goes to the most recently used end of the LRU.
 */
int idx_commit_write(struct idx *ix, struct idx_entry *e);
/*
 * Drop a reservation; the slot returns to the pool. @e is gone after.
 * If the shard lock times out (a thread is stuck holding it) the release is
 * deferred rather than this thread waiting without a deadline: logged,
 * counted in deferred_releases and lock_timeouts, and applied by the next
 * release, commit or idx_expire() that holds the shard lock. Until then the
 * entry stays reserved. idx_unpin does the same (the entry stays pinned).
 */
void idx_abort_write(struct idx *ix, struct idx_entry *e);

/* ---- RETRIEVE ---- */

/*
 * Pin a READY/READING entry for copying out. Returns 0 with *out set,
 * -ENOENT if @k is absent or still WRITING, -EMSGSIZE if it holds a
 * different number of bytes than @nbytes (layout mismatch), -ETIMEDOUT.
 */
int idx_pin(struct idx *ix, const struct ks_key *k, uint64_t nbytes, struct idx_entry **out);
/*
 * Drop a pin from idx_pin. Frees the entry if it was unlinked meanwhile;
 * otherwise an entry left with no pins or read locks goes to the most
 * recently used end of the LRU.
 */
void idx_unpin(struct idx *ix, struct idx_entry *e);

/* Slot memory of a reserved or pinned entry (borrowed while reserved/pinned). */
void *idx_entry_data(const struct idx *ix, const struct idx_entry *e);
uint32_t idx_entry_slot(const struct idx_entry *e);

/* ---- LOOKUP ---- */

/*
 * Count the leading run of @keys that are READY or READING, stopping at the
 * first miss; *hits = that count. Then take @locks_per_key read locks on each
 * of the first (hits / group) * group keys (group = world_size; keys are
 * chunk-major), resetting their deadline to now + read_ttl_ms. Returns 0 or
 * -ETIMEDOUT (no locks held then). @group >= 1 (0 is taken as 1).
 * Locked entries leave the LRU; they return to its most recently used end
 * when their last lock or pin goes. With @locks_per_key == 0 this only counts
 * (no lock, no LRU change). Each key's shard is locked on its own (never two
 * at once): a key evicted or cleared between two keys' visits ends the run
 * there, so *hits is always a run that was present when it was counted.
 * Read-lock counts saturate at UINT32_MAX.
 */
int idx_lookup_lock(struct idx *ix, const struct ks_key *keys, size_t n, size_t group,
		    uint32_t locks_per_key, size_t *hits);
/*
 * Release up to @count read locks on @k (saturating at 0). Returns 0,
 * -ENOENT if @k is not linked, -ETIMEDOUT.
 */
int idx_release_read_locks(struct idx *ix, const struct ks_key *k, uint32_t count);
/* True if @k is READY or READING (no locks taken). False on a lock timeout. */
bool idx_contains(struct idx *ix, const struct ks_key *k);
/* Snapshot of linked @k into *info: 0, -ENOENT (not linked), -ETIMEDOUT. */
int idx_key_info(struct idx *ix, const struct ks_key *k, struct idx_entry_info *info);

/*
 * Evict down to @slots free slots when a reservation finds the pool full
 * (hysteresis, so concurrent STOREs do not each evict one and take each
 * other's slot). Any thread; takes effect for later reservations.
 */
void idx_set_low_watermark(struct idx *ix, uint32_t slots);

/* ---- eviction hook (demotion to a lower tier) ---- */

/*
 * Called once per evicted object, before its slot can be reused: on the
 * evicting thread, with no index lock held, the entry already unlinked (the
 * key can be stored again meanwhile). @data is readable only during the
 * call; copy what you keep. Must not block for long (a bounded copy).
 */
typedef void (*idx_evict_fn)(void *arg, const struct ks_key *k, const void *data,
			     uint64_t nbytes);
/* Install @fn (NULL: none). Call before other threads use @ix. */
void idx_set_evict_hook(struct idx *ix, idx_evict_fn fn, void *arg);

/* ---- slot journal (warm restart, --state-dir) ---- */

/*
 * What the index tells a persistent slot table about each slot, so that a
 * kvstashd killed at any instant leaves a table that names only complete
 * objects (warm.c):
 * - writing: @slot was just taken for a reservation; called before the
 *   reservation is returned, so before any byte of the new object lands.
 * - ready: the object in @slot is complete; called by idx_commit_write
 *   before the entry becomes READY (and before any other thread can free
 *   it), with no lock held: @data is the slot, readable for @nbytes.
 * - freed: @slot goes back to the pool (eviction, CLEAR, abort, a lost
 *   commit); called under the entry's shard lock, so it must only store.
 * Each runs on the thread that changes the slot; the slot's owner is the
 * only writer of its record, so the callbacks need no lock of their own.
 */
struct idx_journal {
	void (*writing)(void *arg, uint32_t slot);
	void (*ready)(void *arg, uint32_t slot, const struct ks_key *k, const void *data,
		      uint64_t nbytes);
	void (*freed)(void *arg, uint32_t slot);
	void *arg;
};
/*
 * Install @j (copied; NULL: none). Call before other threads use @ix, or
 * after they stopped: idx_destroy() must not journal its frees (the objects
 * are not gone, the process is), so the caller detaches it first.
 */
void idx_set_journal(struct idx *ix, const struct idx_journal *j);
/*
 * Link a READY entry for @k that owns @slot (already taken from the pool
 * with pool_take_slots), for a warm restart. Returns 0, -EEXIST if @k is
 * linked already (the caller returns the slot), -E2BIG if @nbytes exceeds
 * the slot size, -ENOMEM, -ETIMEDOUT. Not journaled: the record is there.
 */
int idx_restore_ready(struct idx *ix, const struct ks_key *k, uint32_t slot, uint64_t nbytes);

/* ---- housekeeping ---- */

/*
 * Expire read locks and write reservations whose deadline is before @now_ms
 * (CLOCK_MONOTONIC ms, as ks_now_ms()). Returns the number of entries
 * affected. An entry's expired read locks all drop at once (READING ->
 * READY unless pinned); an expired WRITING entry is unlinked and waits for
 * its writer's commit (-ESTALE) or abort. Each shard keeps its deadlines in
 * order, so the cost is the shard count plus the entries expired, whatever
 * the number of entries in the table.
 */
size_t idx_expire(struct idx *ix, uint64_t now_ms);
/*
 * idx_expire, but at most @budget entries per call, earliest first within a
 * shard; *@more (may be NULL) is set when due entries were left, and the
 * next call starts in the shard where this one stopped. For a caller whose
 * turn must stay short (the io thread): the backlog goes in later calls.
 */
size_t idx_expire_some(struct idx *ix, uint64_t now_ms, size_t budget, bool *more);
/*
 * Evict up to @n LRU entries, least recently used first. Returns how many
 * were evicted; fewer when the LRU runs out or the only candidates sit in
 * shards that other threads hold at that moment (the walker skips them).
 */
size_t idx_evict(struct idx *ix, size_t n);
/*
 * Unlink every entry (CLEAR). Returns how many were unlinked. Read locks are
 * voided; unpinned entries are freed at once; pinned entries and reservations
 * are freed at their last unpin or at commit (-ESTALE) / abort.
 */
size_t idx_clear(struct idx *ix);

void idx_get_stats(struct idx *ix, struct idx_stats *st);
/*
 * Walk every shard and check the books: state counts match, LRU holds exactly
 * the evictable entries, linked + unlinked-pinned + unlinked-writing entries
 * == slots in use, no slot owned twice. Returns 0, -EUCLEAN with a
 * description in @err, -ENOMEM or -ETIMEDOUT. For tests and debug: exact only
 * while no other thread uses the index (shards are checked one at a time).
 */
int idx_check_invariants(struct idx *ix, char *err, size_t errlen);

#endif /* KS_INDEX_H */
