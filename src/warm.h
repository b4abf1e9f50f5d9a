/*
 * warm.h - warm restart state (--state-dir): the host pool in a shared file,
 * a per-slot commit table beside it, and a manifest, so that a restarted
 * kvstashd (the same binary or a new one) re-attaches the same bytes and
 * serves what was READY, with the engines' registrations.
 *
 * Files in the state directory (docs/architecture.md, "Warm restart"):
 *
 *   lock    flock()ed while a kvstashd uses the directory (holds its pid)
 *   pool    the pool region, mmap()ed MAP_SHARED (tmpfs: survives the
 *           process, not a reboot; no writeback to a disk)
 *   slots   a 4 KiB header (geometry) and one record per slot: FREE,
 *           WRITING or READY with the key, size and XXH3 of the object.
 *           Written in place by the transfer workers through the index's
 *           journal callbacks (index.h), in an order that survives SIGKILL
 *           at any instant: WRITING before the first byte of a new object,
 *           READY (checksum first, state last) after its last byte.
 *   state   the manifest: format version, geometry, chunk size, whether
 *           the last exit was clean, and the registrations (opaque blobs
 *           from the server). Replaced atomically (temp, fsync, rename) at
 *           every registration change and at SIGTERM after the drain.
 *
 * At start a state that matches (magic, version, pool size, chunk size,
 * file sizes, header checksums) is resumed: READY records whose object
 * still has its checksum become READY index entries, everything else is
 * dropped and its slot freed. Anything that does not match is refused with
 * a log line naming the reason; its index files are moved to rejected/
 * and its pool file removed, and kvstashd starts empty.
 *
 * Threads: warm_open/warm_restore/warm_close on the thread that creates and
 * destroys the server, warm_save on the io thread (or that one after the io
 * loop ended), the journal callbacks on whichever thread owns the slot at
 * that moment (index.h). No lock of its own: a record has one writer at a
 * time, the slot's owner, and the table pointer is published once (release)
 * before any slot can be reserved.
 */
#ifndef KS_WARM_H
#define KS_WARM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "index.h"
#include "pool.h"

#define WARM_FORMAT_VERSION 1u

struct warm;

/* What warm_open found in the directory. */
struct warm_found {
	bool resumed;		/* a matching state: the pool's bytes are kept */
	bool clean;		/* ...written at a clean shutdown (SIGTERM) */
	bool refused;		/* a state was there and did not match: see why */
	char why[256];		/* the reason it was refused */
	uint64_t slot_bytes;	/* resumed slot geometry (0: none configured then) */
};

/* What warm_restore did. */
struct warm_restored {
	uint64_t chunks;		/* READY entries back in the index */
	uint64_t dropped_writing;	/* objects not READY at the crash */
	uint64_t dropped_checksum;	/* object bytes do not match the checksum */
	uint64_t dropped_record;	/* record damaged, or a key linked twice */
	uint64_t verified_bytes;	/* object bytes checksummed */
	double verify_s;		/* wall time of the checksum pass */
};

/*
 * Open (create) @dir, lock it, and map the pool file of @region_bytes: the
 * previous one if the state there matches @region_bytes and @chunk_tokens,
 * else a new empty one (a refused state is moved aside, *found says why).
 * On success the caller owns *region (munmap of *map_bytes, passed to
 * pool_create_mapped). Returns 0, or -errno with a message in @err for a
 * directory that cannot be used (not a directory, no permission, on
 * hugetlbfs, in use by another kvstashd, its filesystem too small for the
 * pool): a bad state is never an error, only a refused one.
 */
int warm_open(const char *dir, uint64_t region_bytes, uint32_t chunk_tokens, struct warm **out,
	      void **region, size_t *map_bytes, struct warm_found *found, char *err,
	      size_t errlen);
/* Unmap the slot table, drop the lock. The pool region belongs to the pool. */
void warm_close(struct warm *w);

/* Journal callbacks for idx_set_journal() over this table. */
void warm_journal(struct warm *w, struct idx_journal *j);

/*
 * After pool_configure_slots(): with the resumed geometry, verify the READY
 * records (checksums, in parallel) and link them into @ix, taking their
 * slots from @p; a fresh pool with nothing configured yet returns at once.
 * The slot table is (re)created for the pool's geometry where it did not
 * exist: call again after every pool_configure_slots() (it is idempotent).
 * 0 or -errno (the table could not be created: journaling is then off and
 * the next start is empty, logged).
 */
int warm_restore(struct warm *w, struct pool *p, struct idx *ix, struct warm_restored *r);

/* A registration as the server keeps it: an opaque blob. */
struct warm_blob {
	const void *data;
	size_t len;
};
/* The registrations of the resumed manifest (none for a fresh start). */
size_t warm_nregs(const struct warm *w);
struct warm_blob warm_reg(const struct warm *w, size_t i);

/*
 * Replace the manifest atomically (write state.tmp, fsync, rename, fsync the
 * directory) with @regs and @clean (true only after the drain at SIGTERM).
 * 0 or -errno (logged by the caller; the previous manifest stays).
 */
int warm_save(struct warm *w, bool clean, const struct warm_blob *regs, size_t nregs);

/* The slot records that are READY now (for the shutdown log line). */
uint64_t warm_ready_count(const struct warm *w);

#endif /* KS_WARM_H */
