/* tests/tier_node.c - see tier_node.h. */
#include "tier_node.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "compiler.h"

/* A prompt's blocks, out of order so that a copy that ignores the block
 * table is caught. */
static const int64_t src_blocks[TIER_PROMPT * TIER_CHUNK / TIER_BS] = {
	5,  3,  9,  1,  0,  2,  4,  6,  8,  7,  10, 12, 11, 14, 13, 15, 17, 16, 19, 18, 21, 20,
	23, 22, 25, 24, 27, 26, 29, 28, 31, 30, 33, 32, 35, 34, 37, 36, 39, 38, 41, 40, 43, 42,
	45, 44, 47, 46, 49, 48, 51, 50, 53, 52, 55, 54, 57, 56, 59, 58, 61, 60, 63, 62
};

void tier_node_start(struct tier_node *n, const char *args, int64_t inst, int layers)
{
	memset(n, 0, sizeof(*n));
	n->d = t_daemon_start(args);
	REQUIRE(n->d);
	REQUIRE(kvstash_connect(n->d->endpoint, 10000, &n->c) == 0);
	REQUIRE(t_kv_create(&n->kv, KVSTASH_LAYOUT_FLASH_ATTN, "bfloat16", layers, TIER_NB, TIER_BS,
			    TIER_NH, TIER_HS) == 0);
	n->inst = inst;
	n->disk = strstr(args, "--disk-path") != NULL;
	REQUIRE(t_kv_register(&n->kv, n->c, inst, "m-tier", 1) == 0);
}

int tier_node_stop(struct tier_node *n)
{
	kvstash_close(n->c);
	t_kv_destroy(&n->kv);
	return t_daemon_stop(n->d);
}

static void prompt_tokens(int p, uint32_t *tok)
{
	for (size_t t = 0; t < TIER_PROMPT * TIER_CHUNK; t++)
		tok[t] = (uint32_t)p * 7919u + (uint32_t)t * 3u + 1u;
}

static uint64_t seed_of(int p)
{
	return 0x7ee0000ull + (uint64_t)p;
}

int tier_store_prompt(struct tier_node *n, int p, int nchunks)
{
	uint32_t tok[TIER_PROMPT * TIER_CHUNK];
	char rid[32];

	prompt_tokens(p, tok);
	for (size_t t = 0; t < (size_t)nchunks * TIER_CHUNK; t++)
		t_kv_fill_token(&n->kv, t_kv_slot(&n->kv, src_blocks, t), seed_of(p), t);
	snprintf(rid, sizeof(rid), "p%d", p);
	struct kvstash_key k = { .model = "m-tier", .world_size = 1, .worker_id = 0, .tokens = tok,
				 .ntokens = TIER_PROMPT * TIER_CHUNK, .start = 0,
				 .end = (uint64_t)nchunks * TIER_CHUNK, .request_id = rid };
	return kvstash_store(n->c, &k, n->inst, src_blocks, (size_t)nchunks * TIER_CHUNK / TIER_BS);
}

int64_t tier_lookup_prompt(struct tier_node *n, int p)
{
	uint32_t tok[TIER_PROMPT * TIER_CHUNK];
	int64_t job, chunks = -1;

	prompt_tokens(p, tok);
	struct kvstash_key k = { .model = "m-tier", .world_size = 1, .worker_id = -1, .tokens = tok,
				 .ntokens = TIER_PROMPT * TIER_CHUNK, .start = 0,
				 .end = TIER_PROMPT * TIER_CHUNK, .request_id = "lookup" };
	if (kvstash_lookup(n->c, &k, 1, &job))
		return -1;
	/* QUERY_PREFETCH_LOOKUP_HITS is nil while loading, then the count;
	 * bounded in time: a daemon that died answers nothing */
	for (uint64_t end = ks_now_ms() + 10000; ks_now_ms() < end;) {
		if (kvstash_query_lookup_hits(n->c, job, &chunks) == 0)
			break;
		usleep(20000);
	}
	if (kvstash_query_prefetch_status(n->c, job, &chunks))
		return -1;
	return chunks;
}

long tier_retrieve_check(struct tier_node *n, int p, int nchunks)
{
	uint32_t tok[TIER_PROMPT * TIER_CHUNK];
	int64_t dst[TIER_PROMPT * TIER_CHUNK / TIER_BS];
	long bad = 0;

	prompt_tokens(p, tok);
	for (size_t b = 0; b < TIER_PROMPT * TIER_CHUNK / TIER_BS; b++)
		dst[b] = 100 + (int64_t)b;
	for (size_t t = 0; t < (size_t)nchunks * TIER_CHUNK; t++)
		for (int l = 0; l < n->kv.nl; l++)
			for (int pl = 0; pl < 2; pl++)
				memset(t_kv_row(&n->kv, l, pl, t_kv_slot(&n->kv, dst, t)), 0,
				       n->kv.row_bytes);
	struct kvstash_key k = { .model = "m-tier", .world_size = 1, .worker_id = 0, .tokens = tok,
				 .ntokens = TIER_PROMPT * TIER_CHUNK, .start = 0,
				 .end = (uint64_t)nchunks * TIER_CHUNK, .request_id = "retrieve" };
	if (kvstash_retrieve(n->c, &k, n->inst, dst, (size_t)nchunks * TIER_CHUNK / TIER_BS, 0)) {
		fprintf(stderr, "retrieve prompt %d: %s\n", p, kvstash_last_error());
		return -1;
	}
	for (size_t t = 0; t < (size_t)nchunks * TIER_CHUNK; t++)
		bad += !t_kv_check_token(&n->kv, t_kv_slot(&n->kv, dst, t), seed_of(p), t);
	return bad;
}

uint64_t tier_wait_stat(struct tier_node *n, const char *name, uint64_t want)
{
	uint64_t v = 0;

	for (int i = 0; i < 250 && (v = t_stat(n->c, name)) < want; i++)
		usleep(20000);
	return v;
}
