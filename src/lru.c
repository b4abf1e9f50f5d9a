/*
 * lru.c - intrusive doubly-linked LRU list (see lru.h).
 *
 * Lock order: see lru.h. Every list operation is O(1) and runs with
 * lru->lock held by the caller; nothing here blocks or allocates.
 */
#include "lru.h"

int lru_init(struct lru *l, const char *name)
{
	l->head.prev = l->head.next = &l->head;
	l->len = 0;
	return ks_mutex_init(&l->lock, LOCK_RANK_LRU, name);
}

void lru_destroy(struct lru *l)
{
	ks_mutex_destroy(&l->lock);
}

void do_lru_push_head(struct lru *l, struct lru_node *n)
{
	n->prev = &l->head;
	n->next = l->head.next;
	l->head.next->prev = n;
	l->head.next = n;
	l->len++;
}

void do_lru_remove(struct lru *l, struct lru_node *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->prev = n->next = NULL;
	l->len--;
}

void do_lru_move_to_head(struct lru *l, struct lru_node *n)
{
	if (l->head.next == n)
		return;
	do_lru_remove(l, n);
	do_lru_push_head(l, n);
}

struct lru_node *do_lru_tail(struct lru *l)
{
	return l->head.prev == &l->head ? NULL : l->head.prev;
}

struct lru_node *do_lru_newer(struct lru *l, struct lru_node *n)
{
	return n->prev == &l->head ? NULL : n->prev;
}
