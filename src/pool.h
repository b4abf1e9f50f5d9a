/*
 * pool.h - the host memory pool: one allocation cut into fixed chunk slots.
 *
 * The region is reserved at start (2 MiB hugepages when the kernel has them,
 * 4 KiB-aligned anonymous memory otherwise; pages are touched on first use).
 * Slots are sized by the first registered layout (pool_configure_slots) and
 * rounded up to 4 KiB, as LMCache aligns L1 objects. A free stack hands them
 * out; byte counters are atomics so metrics read them without a lock.
 *
 * Lock order (the tree is in lock.h): pool->free_lock is taken with at most
 * idx_shard->lock and lru->lock held; nothing but the log ring under it.
 */
#ifndef KS_POOL_H
#define KS_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define POOL_SLOT_ALIGN 4096u
#define POOL_NO_SLOT UINT32_MAX

struct pool;

struct pool_stats {
	uint64_t region_bytes;	/* size of the reserved region */
	uint64_t slot_bytes;	/* 0 until configured */
	uint32_t nslots;	/* 0 until configured */
	uint32_t free_slots;
	uint64_t used_bytes;	/* slots handed out * slot_bytes */
	uint64_t alloc_failures;	/* pool_alloc() calls that found no free slot */
	uint64_t bad_frees;	/* pool_free() of a free or out-of-range slot (ignored) */
	uint64_t deferred_frees;	/* pool_free() that found the lock timed out (total) */
	bool hugepages;		/* region is backed by 2 MiB pages */
};

/*
 * Reserve @region_bytes of host memory. Returns 0 with *out set, -EINVAL for
 * a size under one 4 KiB page, -ENOMEM when the mapping fails.
 */
int pool_create(uint64_t region_bytes, struct pool **out);
/*
 * The same over a region the caller mapped (--state-dir: a MAP_SHARED file,
 * warm.c): @region of @map_bytes >= @region_bytes passes to the pool, which
 * munmaps it in pool_destroy. 0, -EINVAL, -ENOMEM.
 */
int pool_create_mapped(uint64_t region_bytes, void *region, size_t map_bytes, struct pool **out);
void pool_destroy(struct pool *p);

/*
 * Cut the region into slots of @object_bytes (rounded up to POOL_SLOT_ALIGN).
 * The first call decides; later calls succeed if @object_bytes fits the
 * existing slots. Returns 0, -EINVAL for 0 bytes, -E2BIG if one object is
 * larger than the region (or than the region once rounded up to a slot) or
 * (later calls) larger than the configured slot, -ENOMEM if the free stack
 * could not be allocated, -ETIMEDOUT if the lock timed out. Slots number
 * region_bytes / slot_bytes; the tail of the region that fits no slot is unused.
 */
int pool_configure_slots(struct pool *p, uint64_t object_bytes);

/*
 * Warm restart: take the slots whose @used[slot] is non-zero ([nslots]) out
 * of the free stack, right after pool_configure_slots() and before any
 * pool_alloc(). 0, -ENODEV before configuration, -EBUSY once a slot was
 * handed out, -ETIMEDOUT.
 */
int pool_take_slots(struct pool *p, const uint8_t *used);

/* Slot size in bytes, 0 before pool_configure_slots(). */
uint64_t pool_slot_bytes(const struct pool *p);

/*
 * Take a free slot. Returns 0 with *slot set, -ENOSPC when none is free,
 * -ENODEV before pool_configure_slots(), -ETIMEDOUT if the lock timed out.
 */
int pool_alloc(struct pool *p, uint32_t *slot);
/*
 * Return @slot (from pool_alloc) to the free stack. A slot that is out of
 * range or already free is logged, counted in bad_frees and ignored (pushing
 * it twice would hand it to two objects). If free_lock times out the slot is
 * not lost: it is logged, counted in deferred_frees and put on a lock-free
 * deferred list that the next pool_alloc or pool_free holding the lock
 * moves to the free stack (until then it counts as used).
 */
void pool_free(struct pool *p, uint32_t slot);

/* Number of slots, 0 before pool_configure_slots(). */
uint32_t pool_nslots(const struct pool *p);

/* Address of @slot's first byte; valid for pool_slot_bytes() bytes. NULL if
 * @slot is out of range or the pool is not configured. */
void *pool_slot_ptr(const struct pool *p, uint32_t slot);

/* The whole region, for cudaHostRegister. */
void *pool_region(const struct pool *p);
uint64_t pool_region_bytes(const struct pool *p);

uint32_t pool_free_slots(const struct pool *p);
void pool_get_stats(const struct pool *p, struct pool_stats *st);

#endif /* KS_POOL_H */
