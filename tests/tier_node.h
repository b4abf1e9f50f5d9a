/*
 * tests/tier_node.h - one kvstashd with one registered engine, and prompts
 * of TIER_PROMPT chunks that it STOREs, LOOKUPs and RETRIEVEs byte-exact:
 * what the tier tests (disk, Redis, Redis Cluster) do to each node.
 *
 * The engine's buffers are flash_attn, bf16, [2, TIER_NB, TIER_BS, TIER_NH,
 * TIER_HS] per layer (rows of 2 KiB); a prompt's chunks are TIER_CHUNK
 * tokens. Prompt p's tokens and KV contents are functions of p alone, so
 * two nodes agree on them.
 */
#ifndef KVSTASH_TESTS_TIER_NODE_H
#define KVSTASH_TESTS_TIER_NODE_H

#include <stdbool.h>
#include <stdint.h>

#include "helpers.h"
#include "kvfix.h"

#define TIER_NB 192
#define TIER_BS 16
#define TIER_NH 8
#define TIER_HS 128
#define TIER_CHUNK 256
#define TIER_PROMPT 4	/* chunks per prompt */

struct tier_node {
	struct t_daemon *d;
	kvstash_client *c;
	struct t_kv kv;
	int64_t inst;
	bool disk;	/* started with --disk-path: every eviction is demoted */
};

/* Starts kvstashd with @args and registers instance @inst with @layers
 * layers (REQUIRE: the test stops on failure). */
void tier_node_start(struct tier_node *n, const char *args, int64_t inst, int layers);

/* Closes the client and stops kvstashd: its exit status (0 = clean). */
int tier_node_stop(struct tier_node *n);

/* STORE chunks [0, nchunks) of prompt @p: 0 or the client's error. */
int tier_store_prompt(struct tier_node *n, int p, int nchunks);

/* LOOKUP prompt @p and wait (10 s at most) for its prefetch: the chunk
 * count, or -1. */
int64_t tier_lookup_prompt(struct tier_node *n, int p);

/* RETRIEVE chunks [0, nchunks) of prompt @p into other blocks: the number
 * of wrong tokens, or -1 when the RETRIEVE fails. */
long tier_retrieve_check(struct tier_node *n, int p, int nchunks);

/* Waits (5 s at most) until stat @name reaches @want; its last value. */
uint64_t tier_wait_stat(struct tier_node *n, const char *name, uint64_t want);

#endif
