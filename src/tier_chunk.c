/*
 * tier_chunk.c - encode, decode and verify the tier chunk format
 * (layout in tier_chunk.h). Pure functions: no locks, no I/O.
 */
#include "tier_chunk.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <xxhash.h>

static const uint8_t tier_chunk_magic[8] = { 'K', 'V', 'S', 'C', 'H', 'N', 'K', '1' };

enum {
	OFF_MAGIC = 0,
	OFF_VERSION = 8,
	OFF_HDR_SIZE = 12,
	OFF_HASH = 16,
	OFF_RANK = 48,
	OFF_MODEL_LEN = 52,
	OFF_SUM_ALGO = 54,
	OFF_LAYOUT = 56,
	OFF_LEN = 64,
	OFF_PSUM = 72,
	OFF_MODEL = 80,
	OFF_HSUM = TIER_CHUNK_HDR_SIZE - 8,
};
_Static_assert(OFF_MODEL + KS_MODEL_MAX + 1 <= OFF_HSUM, "model name overlaps the header sum");

static void put_le(uint8_t *p, uint64_t v, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, unsigned n)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < n; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

uint64_t tier_chunk_sum(const void *buf, size_t n)
{
	return XXH3_64bits(buf, n);
}

void tier_chunk_hdr_encode(uint8_t hdr[TIER_CHUNK_HDR_SIZE], const struct ks_key *key,
			   uint64_t layout_tag, uint64_t payload_len, uint64_t payload_sum)
{
	memset(hdr, 0, TIER_CHUNK_HDR_SIZE);
	memcpy(hdr + OFF_MAGIC, tier_chunk_magic, sizeof(tier_chunk_magic));
	put_le(hdr + OFF_VERSION, TIER_CHUNK_VERSION, 4);
	put_le(hdr + OFF_HDR_SIZE, TIER_CHUNK_HDR_SIZE, 4);
	memcpy(hdr + OFF_HASH, key->chunk_hash, KS_HASH_LEN);
	put_le(hdr + OFF_RANK, key->kv_rank, 4);
	put_le(hdr + OFF_MODEL_LEN, key->model_len, 2);
	put_le(hdr + OFF_SUM_ALGO, TIER_CHUNK_SUM_XXH3, 2);
	put_le(hdr + OFF_LAYOUT, layout_tag, 8);
	put_le(hdr + OFF_LEN, payload_len, 8);
	put_le(hdr + OFF_PSUM, payload_sum, 8);
	memcpy(hdr + OFF_MODEL, key->model, key->model_len);
	put_le(hdr + OFF_HSUM, XXH3_64bits(hdr, OFF_HSUM), 8);
}

int tier_chunk_hdr_decode(const uint8_t hdr[TIER_CHUNK_HDR_SIZE], struct tier_chunk_meta *out)
{
	if (memcmp(hdr + OFF_MAGIC, tier_chunk_magic, sizeof(tier_chunk_magic)) ||
	    get_le(hdr + OFF_VERSION, 4) != TIER_CHUNK_VERSION ||
	    get_le(hdr + OFF_HDR_SIZE, 4) != TIER_CHUNK_HDR_SIZE ||
	    get_le(hdr + OFF_SUM_ALGO, 2) != TIER_CHUNK_SUM_XXH3 ||
	    get_le(hdr + OFF_HSUM, 8) != XXH3_64bits(hdr, OFF_HSUM))
		return -EBADMSG;
	uint64_t model_len = get_le(hdr + OFF_MODEL_LEN, 2);

	if (model_len > KS_MODEL_MAX)
		return -EBADMSG;
	memset(&out->key, 0, sizeof(out->key));
	memcpy(out->key.chunk_hash, hdr + OFF_HASH, KS_HASH_LEN);
	out->key.kv_rank = (uint32_t)get_le(hdr + OFF_RANK, 4);
	out->key.model_len = (uint16_t)model_len;
	memcpy(out->key.model, hdr + OFF_MODEL, model_len);
	out->layout_tag = get_le(hdr + OFF_LAYOUT, 8);
	out->payload_len = get_le(hdr + OFF_LEN, 8);
	out->payload_sum = get_le(hdr + OFF_PSUM, 8);
	return 0;
}

int tier_chunk_verify(const struct tier_chunk_meta *m, const struct ks_key *want,
		      const void *payload, size_t got)
{
	if (!ks_key_equal(&m->key, want) || m->payload_len != got ||
	    tier_chunk_sum(payload, got) != m->payload_sum)
		return -EBADMSG;
	return 0;
}

void tier_chunk_name(const struct ks_key *key, char out[TIER_CHUNK_NAME_MAX])
{
	char hex[2 * KS_HASH_LEN + 1];

	ks_hash_hex(key->chunk_hash, hex);
	snprintf(out, TIER_CHUNK_NAME_MAX, "%s-%08x-%016llx", hex, key->kv_rank,
		 (unsigned long long)XXH64(key->model, key->model_len, 0));
}
