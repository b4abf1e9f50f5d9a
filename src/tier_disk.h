/*
 * tier_disk.h - L2: chunks on a local disk, one file per chunk.
 *
 * Every call here returns at once: reads and writes run on the tier's
 * worker thread (io_uring, or pread/pwrite where io_uring is unavailable),
 * and finish through a ks_tier_done_fn (tier_chunk.h). The index of what is
 * on disk lives in memory, so tier_disk_contains() does no I/O.
 *
 * Lock order (the tree is in lock.h): tier_disk->lock is LOCK_RANK_TIER,
 * a leaf taken with no lock held; call in holding none. It is never held
 * across I/O or a callback.
 */
#ifndef KS_TIER_DISK_H
#define KS_TIER_DISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunk_key.h"
#include "tier_chunk.h"

struct tier_disk;

struct tier_disk_config {
	const char *path;		/* directory, created (mode 0700) if missing; borrowed */
	uint64_t capacity_bytes;	/* file bytes (header + payload) kept; LRU evicts above */
	unsigned queue_depth;		/* requests queued or in flight; beyond: -EAGAIN. 0 = 64 */
	uint64_t staging_bytes;		/* TIER_PUT_COPY bytes held at once; 0 = 256 MiB */
	bool force_pwrite;		/* skip io_uring */
	unsigned lock_timeout_ms;	/* 0 = KS_LOCK_TIMEOUT_MS_DEFAULT */
	/* Called for each chunk removed for capacity, on the tier's worker (or in
	 * tier_disk_open) with no lock held; NULL = none. */
	void (*evicted_fn)(void *arg, const struct ks_key *key);
	void *evicted_arg;
};

struct tier_disk_stats {
	uint64_t objects, bytes;	/* in the index now (bytes: whole files) */
	uint64_t capacity_bytes;
	uint64_t puts;			/* puts written and indexed */
	uint64_t put_errors;		/* puts failed by an I/O error, all kinds */
	uint64_t nospace;		/* of which ENOSPC / EFBIG / EDQUOT */
	uint64_t dropped_full;		/* puts refused with -EAGAIN (queue or staging full) */
	uint64_t gets, hits, misses;	/* gets submitted; served; not found (index or file) */
	uint64_t corrupt;		/* bad checksum, header, key or length: -EBADMSG */
	uint64_t io_errors;		/* read/open/rename errors other than ENOENT */
	uint64_t evictions;		/* files removed for capacity */
	uint64_t scan_found, scan_bad;	/* tier_disk_open: files indexed / bad files removed */
	bool uring;			/* io_uring in use (false: pread/pwrite fallback) */
};

/* tier_disk_put() flags */
#define TIER_PUT_COPY 1u	/* copy @data before returning (else borrowed until done_cb) */

/*
 * Open the tier at cfg->path: scan chunk files (*.kvc), index those whose
 * header and size check out, remove bad ones and leftover temporaries, evict
 * oldest (mtime) above capacity, and start the worker. The scan reads every
 * header on the calling thread (startup only). Returns 0 with *out set,
 * -EINVAL (bad config), -ENOMEM, or -errno from mkdir/opendir/thread start.
 */
int tier_disk_open(const struct tier_disk_config *cfg, struct tier_disk **out);

/*
 * Stop the worker and free the tier. Queued requests that did not start get
 * -ECANCELED; started ones finish (bounded by I/O). Files stay on disk.
 * Not to be called from a tier callback.
 */
void tier_disk_close(struct tier_disk *td);

/*
 * Write @nbytes at @data as the chunk @key (replacing any older copy) with
 * the caller's @layout_tag. Without TIER_PUT_COPY, @data is borrowed until
 * @done runs; with it, it is copied before return. Returns 0 (@done will be
 * called once: 0, or -ENOSPC/-EFBIG/-EDQUOT/-EIO/... from the file system,
 * -ECANCELED at close), -EAGAIN when the queue (or staging) is full (dropped
 * and counted, @done not called), -EINVAL (nbytes 0 or too large), -ENOMEM,
 * -ETIMEDOUT (tier lock).
 */
int tier_disk_put(struct tier_disk *td, const struct ks_key *key, uint64_t layout_tag,
		  const void *data, size_t nbytes, unsigned flags, ks_tier_done_fn done,
		  void *arg);

/*
 * Read the chunk @key into @dst (capacity @cap bytes). Returns 0 (@done will
 * be called once with 0 and the payload's tag and length, or -EBADMSG for a
 * corrupt or truncated file (counted, file removed), -ENOENT if the file
 * vanished, -EMSGSIZE if the payload exceeds @cap, -EIO, -ECANCELED), or,
 * without calling @done: -ENOENT (not in the index), -EAGAIN (queue full),
 * -ETIMEDOUT (tier lock). @dst is written only by the worker, until @done.
 */
int tier_disk_get(struct tier_disk *td, const struct ks_key *key, void *dst, size_t cap,
		  ks_tier_done_fn done, void *arg);

/*
 * Whether @key is indexed (no I/O; counts nothing). If so and @layout_tag /
 * @nbytes are non-NULL, they receive the payload's tag and length.
 */
bool tier_disk_contains(struct tier_disk *td, const struct ks_key *key, uint64_t *layout_tag,
			size_t *nbytes);

/* Length of the leading run of @keys[0..n) that are indexed (one lock hold; for LOOKUP). */
size_t tier_disk_contains_prefix(struct tier_disk *td, const struct ks_key *keys, size_t n);

/*
 * Drop @key from the index now (contains() is false on return); the file
 * is unlinked by the worker. Returns 0, -ENOENT, or -ETIMEDOUT.
 */
int tier_disk_remove(struct tier_disk *td, const struct ks_key *key);

void tier_disk_get_stats(struct tier_disk *td, struct tier_disk_stats *out);

#endif /* KS_TIER_DISK_H */
