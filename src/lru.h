/*
 * lru.h - the index's LRU: a list.h list with its own lock and length.
 *
 * It knows nothing about what it links. Users embed a struct ks_list in
 * their object and get the object back with ks_list_entry().
 * The head is the most recently used end, the tail the least recently used;
 * an eviction walker starts at lru_tail() and moves towards the head with
 * lru_newer().
 *
 * Lock order (the tree is in lock.h): lru->lock (LRU) is taken under
 * idx_shard->lock; pool->free_lock may be taken under it. The index's
 * eviction walker holds it and only trylocks a shard.
 *
 * do_lru_* functions need lru->lock held by the caller (the do_ prefix convention); the
 * compiler checks it with -Wthread-safety. A node's links are protected by
 * the lock of the list it is on, so ks_list_linked() too needs it held (or the
 * caller's own guarantee that no other thread can move the node).
 */
#ifndef KS_LRU_H
#define KS_LRU_H

#include <stddef.h>

#include "list.h"
#include "lock.h"

struct lru {
	struct ks_mutex lock;	/* protects head, len and the links of every node on the list */
	struct ks_list head;	/* sentinel: head.next = MRU, head.prev = LRU */
	size_t len;
};

/* 0 or -errno from ks_mutex_init. @name must be a static string. */
int lru_init(struct lru *l, const char *name);
/* The list must be empty or its nodes abandoned; no thread may use @l after. */
void lru_destroy(struct lru *l);

/* 0 (held) or -ETIMEDOUT. */
static inline int lru_lock(struct lru *l) TRY_ACQUIRE(0, l->lock)
{
	return ks_lock(&l->lock);
}

static inline void lru_unlock(struct lru *l) RELEASE(l->lock)
{
	ks_unlock(&l->lock);
}

/* Link @n (on no list) at the head: it becomes the most recently used. */
void do_lru_push_head(struct lru *l, struct ks_list *n) REQUIRES(l->lock);
/* Unlink @n (on @l). Its links are NULL after. */
void do_lru_remove(struct lru *l, struct ks_list *n) REQUIRES(l->lock);
/* Move @n (on @l) to the head. */
void do_lru_move_to_head(struct lru *l, struct ks_list *n) REQUIRES(l->lock);
/* The least recently used node, or NULL when empty. */
struct ks_list *do_lru_tail(struct lru *l) REQUIRES(l->lock);
/* The node just more recent than @n (on @l), or NULL when @n is the head. */
struct ks_list *do_lru_newer(struct lru *l, struct ks_list *n) REQUIRES(l->lock);

static inline size_t do_lru_len(const struct lru *l) REQUIRES(l->lock)
{
	return l->len;
}

#endif /* KS_LRU_H */
