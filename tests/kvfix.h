/*
 * kvfix.h - a registered host KV cache for server tests: one memfd holding
 * every layer of a dense paged buffer, registered through libkvstash, plus
 * helpers to address one token row of one plane of one layer.
 */
#ifndef KS_TEST_KVFIX_H
#define KS_TEST_KVFIX_H

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "kvstash.h"
#include "layout.h"

struct t_kv {
	struct kvstash_host_buffer buf;
	struct kvstash_kv_layout lay;
	struct kvstash_host_layer *layers;
	int nl, nb, bs, nh, hs, eb, planes;
	size_t layer_bytes, row_bytes;
};

/* Dense C-order buffer of @nl layers in one memfd. 0 or -errno. */
static inline int t_kv_create(struct t_kv *kv, enum kvstash_layout layout, const char *dtype,
			      int nl, int nb, int bs, int nh, int hs)
{
	memset(kv, 0, sizeof(*kv));
	kv->nl = nl, kv->nb = nb, kv->bs = bs, kv->nh = layout == KVSTASH_LAYOUT_MLA ? 1 : nh;
	kv->hs = hs, kv->eb = (int)kv_dtype_bytes_by_name(dtype);
	kv->planes = layout == KVSTASH_LAYOUT_MLA ? 1 : 2;
	kv->row_bytes = (size_t)kv->nh * (size_t)hs * (size_t)kv->eb;
	kv->layer_bytes = (size_t)kv->planes * (size_t)nb * (size_t)bs * kv->row_bytes;
	kv->lay.layout = layout;
	kv->lay.dtype = dtype;
	switch (layout) {
	case KVSTASH_LAYOUT_FLASH_ATTN:
		kv->lay.ndim = 5;
		memcpy(kv->lay.shape, (int64_t[]){ 2, nb, bs, nh, hs }, 5 * sizeof(int64_t));
		break;
	case KVSTASH_LAYOUT_FLASHINFER:
		kv->lay.ndim = 5;
		memcpy(kv->lay.shape, (int64_t[]){ nb, 2, bs, nh, hs }, 5 * sizeof(int64_t));
		break;
	case KVSTASH_LAYOUT_MLA:
		kv->lay.ndim = 3;
		memcpy(kv->lay.shape, (int64_t[]){ nb, bs, hs, 0, 0 }, 5 * sizeof(int64_t));
		break;
	}
	int rc = kvstash_host_buffer_create(&kv->buf, kv->layer_bytes * (size_t)nl, "t_kv");
	if (rc)
		return rc;
	kv->layers = calloc((size_t)nl, sizeof(*kv->layers));
	if (!kv->layers)
		return -ENOMEM;
	for (int l = 0; l < nl; l++) {
		kv->layers[l].path = kv->buf.path;
		kv->layers[l].offset = (uint64_t)l * kv->layer_bytes;
		kv->layers[l].nbytes = kv->buf.bytes;
	}
	return 0;
}

static inline void t_kv_destroy(struct t_kv *kv)
{
	kvstash_host_buffer_destroy(&kv->buf);
	free(kv->layers);
}

static inline int t_kv_register(struct t_kv *kv, kvstash_client *c, int64_t instance,
				const char *model, uint32_t world_size)
{
	return kvstash_register_host(c, instance, model, world_size, &kv->lay, kv->layers,
				     (size_t)kv->nl);
}

/* Row of paged @slot, @plane (0 = K, 1 = V), @layer: row_bytes bytes. */
static inline uint8_t *t_kv_row(struct t_kv *kv, int layer, int plane, int64_t slot)
{
	size_t blk = (size_t)(slot / kv->bs), off = (size_t)(slot % kv->bs);
	size_t block_rows = (size_t)kv->bs;
	size_t row_index;

	switch (kv->lay.layout) {
	case KVSTASH_LAYOUT_FLASH_ATTN:	/* [2, NB, BS, ...] */
		row_index = ((size_t)plane * (size_t)kv->nb + blk) * block_rows + off;
		break;
	case KVSTASH_LAYOUT_FLASHINFER:	/* [NB, 2, BS, ...] */
		row_index = (blk * 2 + (size_t)plane) * block_rows + off;
		break;
	default:			/* [NB, BS, HS] */
		row_index = blk * block_rows + off;
		break;
	}
	return (uint8_t *)kv->buf.ptr + (size_t)layer * kv->layer_bytes + row_index * kv->row_bytes;
}

/* Deterministic row content for (seed, layer, plane, token). */
static inline void t_kv_fill_token(struct t_kv *kv, int64_t slot, uint64_t seed, uint64_t token)
{
	for (int l = 0; l < kv->nl; l++)
		for (int p = 0; p < kv->planes; p++)
			t_fill(t_kv_row(kv, l, p, slot), kv->row_bytes,
			       seed ^ (token << 20) ^ ((uint64_t)l << 8) ^ (uint64_t)p);
}

/* True if the rows of @slot hold t_kv_fill_token(seed, token). */
static inline bool t_kv_check_token(struct t_kv *kv, int64_t slot, uint64_t seed, uint64_t token)
{
	for (int l = 0; l < kv->nl; l++)
		for (int p = 0; p < kv->planes; p++)
			if (t_verify(t_kv_row(kv, l, p, slot), kv->row_bytes,
				     seed ^ (token << 20) ^ ((uint64_t)l << 8) ^ (uint64_t)p) !=
			    (size_t)-1)
				return false;
	return true;
}

/* Slot of range token @t with @blocks (protocol.md §3 STORE step 3). */
static inline int64_t t_kv_slot(const struct t_kv *kv, const int64_t *blocks, uint64_t t)
{
	return blocks[t / (uint64_t)kv->bs] * kv->bs + (int64_t)(t % (uint64_t)kv->bs);
}

struct t_stat_query {
	const char *name;
	uint64_t value;
};

static inline int t_stat_match(const char *name, uint64_t v, void *arg)
{
	struct t_stat_query *q = arg;

	if (strcmp(name, q->name))
		return 0;
	q->value = v;
	return 1;
}

/* One server counter by its KS_STATS name; UINT64_MAX if absent or on error. */
static inline uint64_t t_stat(kvstash_client *c, const char *name)
{
	struct t_stat_query q = { name, UINT64_MAX };

	kvstash_stats(c, t_stat_match, &q);
	return q.value;
}

#endif /* KS_TEST_KVFIX_H */
