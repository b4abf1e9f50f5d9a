/*
 * list.h - an intrusive circular doubly-linked list with a sentinel head (as
 * the kernel's list.h and Redis's adlist), and no lock of its own.
 *
 * Users embed a struct ks_list in their objects, link them on a head, and
 * get the object back with ks_list_entry(). Whoever owns the head protects it
 * and every node on it with a lock of their choosing: lru.h wraps one in a
 * mutex for the index; the disk tier links its entries under its own lock.
 * head->next is the first node (the newest, used as an LRU), head->prev the
 * last. A node on no list has NULL links.
 *
 * Lock ordering: none (no lock here).
 */
#ifndef KS_LIST_H
#define KS_LIST_H

#include <stdbool.h>
#include <stddef.h>

struct ks_list {
	struct ks_list *prev;	/* towards the first node */
	struct ks_list *next;	/* towards the last node */
};

/* The object of type @type whose member @member is @node. */
#define ks_list_entry(node, type, member) ((type *)((char *)(node) - offsetof(type, member)))

/* An empty list: the sentinel links to itself. */
static inline void ks_list_init(struct ks_list *head)
{
	head->prev = head->next = head;
}

/* A node on no list. */
static inline void ks_list_node_init(struct ks_list *n)
{
	n->prev = n->next = NULL;
}

static inline bool ks_list_linked(const struct ks_list *n)
{
	return n->next != NULL;
}

static inline bool ks_list_empty(const struct ks_list *head)
{
	return head->next == head;
}

/* Link @n (on no list) first. */
static inline void ks_list_add_first(struct ks_list *head, struct ks_list *n)
{
	n->prev = head;
	n->next = head->next;
	head->next->prev = n;
	head->next = n;
}

/* Unlink @n (on a list); its links are NULL after. */
static inline void ks_list_del(struct ks_list *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->prev = n->next = NULL;
}

/* Move @n (on @head's list) to the front. */
static inline void ks_list_move_first(struct ks_list *head, struct ks_list *n)
{
	if (head->next == n)
		return;
	ks_list_del(n);
	ks_list_add_first(head, n);
}

/* The last node, or NULL when the list is empty. */
static inline struct ks_list *ks_list_last(struct ks_list *head)
{
	return head->prev == head ? NULL : head->prev;
}

/* The node before @n (towards the first), or NULL when @n is the first. */
static inline struct ks_list *ks_list_before(struct ks_list *head, struct ks_list *n)
{
	return n->prev == head ? NULL : n->prev;
}

/* Every node from the first on; @n may be unlinked inside the loop (@tmp
 * holds the next one). */
#define ks_list_for_each_safe(n, tmp, head) \
	for ((n) = (head)->next, (tmp) = (n)->next; (n) != (head); (n) = (tmp), (tmp) = (n)->next)

#endif /* KS_LIST_H */
