/*
 * pool.c - the host memory pool: one mapping cut into fixed chunk slots.
 *
 * Lock order (the tree is in lock.h): pool->free_lock (POOL) may be taken
 * under idx_shard->lock and lru->lock; nothing but the log ring is taken
 * under it. It is held only for a push or a pop (and for the one-time
 * slot configuration), never across anything that blocks or allocates.
 *
 * DESIGN: any thread calls in. The region is reserved once by pool_create()
 * and never moves, so slot addresses are stable and computed without a lock.
 * Slot geometry (slot_bytes, nslots, the stack arrays) is published once by
 * pool_configure_slots() with a release store of slot_bytes; readers that see
 * slot_bytes != 0 with an acquire load see the rest. Counters for metrics are
 * atomics written under the lock and read without it.
 * A free whose free_lock wait times out is not lost: the slot goes on a
 * lock-free deferred stack that the next holder of the lock drains.
 */
#include "pool.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "compiler.h"
#include "fault.h"
#include "lock.h"
#include "log.h"

#define POOL_HUGEPAGE_BYTES (2ull << 20)
/* deferred_next[] of a slot that is not on the deferred stack */
#define POOL_NOT_DEFERRED (UINT32_MAX - 1)

struct pool {
	struct ks_mutex free_lock;	/* protects free_stack, nfree and in_use */

	uint8_t *region;	/* owns: mmap'ed, munmap in pool_destroy */
	uint64_t region_bytes;	/* as asked for in pool_create */
	size_t map_bytes;	/* region_bytes rounded up to the page size used */
	bool hugepages;		/* MAP_HUGETLB worked */

	/* Set once by pool_configure_slots (under free_lock), then read-only. */
	_Atomic uint64_t slot_bytes;	/* release-stored last: 0 = not configured */
	uint32_t nslots;
	uint32_t *free_stack;	/* owns: nslots entries; [0, nfree) are free slots */
	uint8_t *in_use;	/* owns: nslots flags; catches double and stray frees */

	uint32_t nfree GUARDED_BY(free_lock);

	/* Metrics: written under free_lock or atomically, read without a lock. */
	_Atomic uint32_t free_slots;
	_Atomic uint64_t used_bytes;
	_Atomic uint64_t alloc_failures;
	_Atomic uint64_t bad_frees;
	_Atomic uint64_t deferred_frees;

	/*
	 * Frees that found free_lock timed out: a lock-free stack of slots
	 * linked through deferred_next, pushed by pool_free without the lock
	 * and moved to the free stack by the next pool_alloc or pool_free that
	 * holds it. Pops take the whole stack at once (exchange), so no ABA.
	 */
	_Atomic uint32_t deferred_head;	/* POOL_NO_SLOT when empty */
	_Atomic uint32_t *deferred_next;	/* owns: nslots links, else POOL_NOT_DEFERRED */
};

/*
 * Map @bytes of anonymous memory. 2 MiB pages first when the size allows
 * (fewer TLB misses for the copy kernels, and cudaHostRegister pins fewer
 * pages). That mapping must NOT carry MAP_NORESERVE: without the up-front
 * reservation the kernel grants it even with no hugepages configured and the
 * first touch of a page dies with SIGBUS; with it, mmap fails cleanly when
 * the hugepage pool is short. Then fall back to 4 KiB pages with
 * MAP_NORESERVE: the pool is usually larger than what is touched early and
 * must not be charged against overcommit.
 */
static void *pool_map(uint64_t bytes, size_t *map_bytes, bool *huge)
{
	void *p;

	*huge = false;
	if (bytes % POOL_HUGEPAGE_BYTES == 0) {
		p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
		if (p != MAP_FAILED) {
			*huge = true;
			*map_bytes = bytes;
			return p;
		}
		log_debug("pool: no hugetlb pages for %llu bytes, using 4 KiB pages",
			  (unsigned long long)bytes);
	}
	*map_bytes = ks_align_up(bytes, POOL_SLOT_ALIGN);
	p = mmap(NULL, *map_bytes, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	/* Transparent hugepages where the kernel allows; advice only, failure is fine. */
	if (bytes % POOL_HUGEPAGE_BYTES == 0)
		(void)madvise(p, *map_bytes, MADV_HUGEPAGE);
	return p;
}

/* The pool's bookkeeping without its memory: 0 or -errno. */
static int pool_new(struct pool **out)
{
	struct pool *p = calloc(1, sizeof(*p));
	int rc;

	if (!p)
		return -ENOMEM;
	atomic_init(&p->deferred_head, POOL_NO_SLOT);
	rc = ks_mutex_init(&p->free_lock, LOCK_RANK_POOL, "pool free_lock");
	if (rc) {
		free(p);
		return rc;
	}
	*out = p;
	return 0;
}

int pool_create_mapped(uint64_t region_bytes, void *region, size_t map_bytes, struct pool **out)
{
	struct pool *p;
	int rc;

	if (region_bytes < POOL_SLOT_ALIGN || !region || map_bytes < region_bytes)
		return -EINVAL;
	rc = pool_new(&p);
	if (rc)
		return rc;
	p->region = region;
	p->map_bytes = map_bytes;
	p->region_bytes = region_bytes;
	*out = p;
	return 0;
}

int pool_create(uint64_t region_bytes, struct pool **out)
{
	struct pool *p;
	int rc;

	if (region_bytes < POOL_SLOT_ALIGN || region_bytes > SIZE_MAX - POOL_SLOT_ALIGN)
		return -EINVAL;
	rc = pool_new(&p);
	if (rc)
		return rc;
	p->region = pool_map(region_bytes, &p->map_bytes, &p->hugepages);
	if (!p->region) {
		log_error("pool: mmap of %llu bytes failed", (unsigned long long)region_bytes);
		ks_mutex_destroy(&p->free_lock);
		free(p);
		return -ENOMEM;
	}
	p->region_bytes = region_bytes;
	log_info("pool: %llu bytes at %p (%s pages)", (unsigned long long)region_bytes,
		 (void *)p->region, p->hugepages ? "2 MiB" : "4 KiB");
	*out = p;
	return 0;
}

void pool_destroy(struct pool *p)
{
	if (!p)
		return;
	munmap(p->region, p->map_bytes);
	free(p->free_stack);
	free(p->in_use);
	free(p->deferred_next);
	ks_mutex_destroy(&p->free_lock);
	free(p);
}

int pool_configure_slots(struct pool *p, uint64_t object_bytes)
{
	uint64_t slot_bytes, nslots, cur;
	uint32_t *stack;
	uint8_t *in_use;
	_Atomic uint32_t *deferred_next;
	int rc;

	if (object_bytes == 0)
		return -EINVAL;
	if (object_bytes > p->region_bytes)
		return -E2BIG;
	cur = atomic_load_explicit(&p->slot_bytes, memory_order_acquire);
	if (cur)
		return object_bytes <= cur ? 0 : -E2BIG;

	slot_bytes = ks_align_up(object_bytes, POOL_SLOT_ALIGN);
	nslots = p->region_bytes / slot_bytes;
	if (nslots == 0)
		return -E2BIG;	/* fits the region only before rounding up to a slot */
	if (nslots >= POOL_NO_SLOT)
		nslots = POOL_NO_SLOT - 1;

	/* Allocate before taking the lock: no allocation under a ks_mutex. */
	stack = malloc(nslots * sizeof(*stack));
	in_use = calloc(nslots, 1);
	deferred_next = malloc(nslots * sizeof(*deferred_next));
	if (!stack || !in_use || !deferred_next) {
		free(stack);
		free(in_use);
		free(deferred_next);
		return -ENOMEM;
	}
	/* Lowest slot on top, so a fresh pool touches its pages in order. */
	for (uint64_t i = 0; i < nslots; i++) {
		stack[i] = (uint32_t)(nslots - 1 - i);
		atomic_init(&deferred_next[i], POOL_NOT_DEFERRED);
	}

	rc = ks_lock(&p->free_lock);
	if (rc)
		goto out_free;
	cur = atomic_load_explicit(&p->slot_bytes, memory_order_relaxed);
	if (cur) {
		/* Another thread configured it between our check and the lock. */
		ks_unlock(&p->free_lock);
		rc = object_bytes <= cur ? 0 : -E2BIG;
		goto out_free;
	}
	p->nslots = (uint32_t)nslots;
	p->free_stack = stack;
	p->in_use = in_use;
	p->deferred_next = deferred_next;
	p->nfree = (uint32_t)nslots;
	atomic_store_explicit(&p->free_slots, (uint32_t)nslots, memory_order_relaxed);
	atomic_store_explicit(&p->slot_bytes, slot_bytes, memory_order_release);
	ks_unlock(&p->free_lock);
	log_info("pool: %u slots of %llu bytes (objects of %llu bytes)", (unsigned)nslots,
		 (unsigned long long)slot_bytes, (unsigned long long)object_bytes);
	return 0;

out_free:
	free(stack);
	free(in_use);
	free(deferred_next);
	return rc;
}

int pool_take_slots(struct pool *p, const uint8_t *used)
{
	uint64_t slot_bytes = pool_slot_bytes(p);
	uint32_t nfree = 0, taken;
	int rc;

	if (!slot_bytes)
		return -ENODEV;
	rc = ks_lock(&p->free_lock);
	if (rc)
		return rc;
	if (p->nfree != p->nslots) {
		ks_unlock(&p->free_lock);
		return -EBUSY;
	}
	/* Rebuilt in the same order as a fresh pool: lowest free slot on top. */
	for (uint32_t i = p->nslots; i-- > 0;) {
		p->in_use[i] = used[i] ? 1 : 0;
		if (!used[i])
			p->free_stack[nfree++] = i;
	}
	p->nfree = nfree;
	taken = p->nslots - nfree;
	atomic_store_explicit(&p->free_slots, nfree, memory_order_relaxed);
	ks_unlock(&p->free_lock);
	atomic_fetch_add_explicit(&p->used_bytes, (uint64_t)taken * slot_bytes,
				  memory_order_relaxed);
	return 0;
}

uint64_t pool_slot_bytes(const struct pool *p)
{
	return atomic_load_explicit(&p->slot_bytes, memory_order_acquire);
}

/* Put @slot back on the free stack; a slot already free is counted, not pushed. */
static void do_pool_push(struct pool *p, uint32_t slot, uint64_t slot_bytes)
	REQUIRES(p->free_lock)
{
	if (!p->in_use[slot]) {
		/* A second push would hand the slot to two objects at once. */
		atomic_fetch_add_explicit(&p->bad_frees, 1, memory_order_relaxed);
		log_error("pool: double free of slot %u ignored", slot);
		return;
	}
	p->in_use[slot] = 0;
	p->free_stack[p->nfree++] = slot;
	atomic_store_explicit(&p->free_slots, p->nfree, memory_order_relaxed);
	atomic_fetch_sub_explicit(&p->used_bytes, slot_bytes, memory_order_relaxed);
}

/* Move every deferred free onto the free stack. */
static void do_pool_settle_deferred(struct pool *p, uint64_t slot_bytes) REQUIRES(p->free_lock)
{
	uint32_t slot;

	if (atomic_load_explicit(&p->deferred_head, memory_order_relaxed) == POOL_NO_SLOT)
		return;
	slot = atomic_exchange(&p->deferred_head, POOL_NO_SLOT);
	while (slot != POOL_NO_SLOT) {
		uint32_t next = atomic_load(&p->deferred_next[slot]);

		atomic_store(&p->deferred_next[slot], POOL_NOT_DEFERRED);
		do_pool_push(p, slot, slot_bytes);
		slot = next;
	}
}

/*
 * Push @slot on the deferred stack, without the lock. A slot already on it
 * is a double free: counted and ignored, as under the lock.
 */
static void pool_defer_free(struct pool *p, uint32_t slot)
{
	uint32_t expect = POOL_NOT_DEFERRED;
	uint32_t head = atomic_load(&p->deferred_head);

	if (!atomic_compare_exchange_strong(&p->deferred_next[slot], &expect, head)) {
		atomic_fetch_add_explicit(&p->bad_frees, 1, memory_order_relaxed);
		log_error("pool: double free of slot %u ignored (already deferred)", slot);
		return;
	}
	while (!atomic_compare_exchange_weak(&p->deferred_head, &head, slot))
		atomic_store(&p->deferred_next[slot], head);
	atomic_fetch_add_explicit(&p->deferred_frees, 1, memory_order_relaxed);
	log_error("pool: free of slot %u deferred: free_lock timed out", slot);
}

/* ks_lock() of free_lock for pool_free, which fault point pool.free_lock fails as a timeout. */
static int free_lock_or_fault(struct pool *p) TRY_ACQUIRE(0, p->free_lock)
	NO_THREAD_SAFETY_ANALYSIS
{
	if (ks_fault_fire(KS_FAULT_POOL_FREE_LOCK))
		return -ETIMEDOUT;
	return ks_lock(&p->free_lock);
}

int pool_alloc(struct pool *p, uint32_t *slot)
{
	uint64_t slot_bytes = pool_slot_bytes(p);
	int rc;

	if (!slot_bytes)
		return -ENODEV;
	rc = ks_lock(&p->free_lock);
	if (rc)
		return rc;
	do_pool_settle_deferred(p, slot_bytes);
	if (p->nfree == 0) {
		ks_unlock(&p->free_lock);
		atomic_fetch_add_explicit(&p->alloc_failures, 1, memory_order_relaxed);
		return -ENOSPC;
	}
	*slot = p->free_stack[--p->nfree];
	p->in_use[*slot] = 1;
	atomic_store_explicit(&p->free_slots, p->nfree, memory_order_relaxed);
	ks_unlock(&p->free_lock);
	atomic_fetch_add_explicit(&p->used_bytes, slot_bytes, memory_order_relaxed);
	return 0;
}

void pool_free(struct pool *p, uint32_t slot)
{
	uint64_t slot_bytes = pool_slot_bytes(p);

	if (!slot_bytes || slot >= p->nslots) {
		atomic_fetch_add_explicit(&p->bad_frees, 1, memory_order_relaxed);
		log_error("pool: free of slot %u out of range (%u slots)", slot, p->nslots);
		return;
	}
	/*
	 * A timed-out lock here means a thread is stuck holding free_lock; waiting
	 * longer would hang this one too, so the slot is deferred instead.
	 */
	if (free_lock_or_fault(p)) {
		pool_defer_free(p, slot);
		return;
	}
	do_pool_settle_deferred(p, slot_bytes);
	do_pool_push(p, slot, slot_bytes);
	ks_unlock(&p->free_lock);
}

void *pool_slot_ptr(const struct pool *p, uint32_t slot)
{
	uint64_t slot_bytes = pool_slot_bytes(p);

	if (!slot_bytes || slot >= p->nslots)
		return NULL;
	return p->region + (uint64_t)slot * slot_bytes;
}

void *pool_region(const struct pool *p)
{
	return p->region;
}

uint64_t pool_region_bytes(const struct pool *p)
{
	return p->region_bytes;
}

uint32_t pool_nslots(const struct pool *p)
{
	return pool_slot_bytes(p) ? p->nslots : 0;
}

uint32_t pool_free_slots(const struct pool *p)
{
	return atomic_load_explicit(&p->free_slots, memory_order_relaxed);
}

void pool_get_stats(const struct pool *p, struct pool_stats *st)
{
	st->region_bytes = p->region_bytes;
	st->slot_bytes = pool_slot_bytes(p);
	st->nslots = st->slot_bytes ? p->nslots : 0;
	st->free_slots = pool_free_slots(p);
	st->used_bytes = atomic_load_explicit(&p->used_bytes, memory_order_relaxed);
	st->alloc_failures = atomic_load_explicit(&p->alloc_failures, memory_order_relaxed);
	st->bad_frees = atomic_load_explicit(&p->bad_frees, memory_order_relaxed);
	st->deferred_frees = atomic_load_explicit(&p->deferred_frees, memory_order_relaxed);
	st->hugepages = p->hugepages;
}
