/*
 * lru.c - the index's LRU (see lru.h) on list.h.
 *
 * Lock order: see lru.h. Every list operation is O(1) and runs with
 * lru->lock held by the caller; nothing here blocks or allocates.
 */
#include "lru.h"

int lru_init(struct lru *l, const char *name)
{
	ks_list_init(&l->head);
	l->len = 0;
	return ks_mutex_init(&l->lock, LOCK_RANK_LRU, name);
}

void lru_destroy(struct lru *l)
{
	ks_mutex_destroy(&l->lock);
}

void do_lru_push_head(struct lru *l, struct ks_list *n)
{
	ks_list_add_first(&l->head, n);
	l->len++;
}

void do_lru_remove(struct lru *l, struct ks_list *n)
{
	ks_list_del(n);
	l->len--;
}

void do_lru_move_to_head(struct lru *l, struct ks_list *n)
{
	ks_list_move_first(&l->head, n);
}

struct ks_list *do_lru_tail(struct lru *l)
{
	return ks_list_last(&l->head);
}

struct ks_list *do_lru_newer(struct lru *l, struct ks_list *n)
{
	return ks_list_before(&l->head, n);
}
