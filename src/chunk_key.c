/*
 * chunk_key.c - BLAKE3 rolling chunk prefix hash and cache key helpers.
 *
 * BLAKE3 comes from the official C sources that Debian's librust-blake3-dev
 * installs; CMake compiles them into libkvstash_core.
 */
#include "chunk_key.h"

#include <errno.h>
#include <string.h>

#include "blake3.h"

/* Tokens converted to big-endian per BLAKE3 update call (16 KiB on the stack). */
#define HASH_TOKEN_BATCH 4096

void ks_none_hash(uint8_t out[KS_HASH_LEN])
{
	static const uint8_t zeros[12];
	blake3_hasher h;

	blake3_hasher_init(&h);
	blake3_hasher_update(&h, zeros, sizeof(zeros));
	blake3_hasher_finalize(&h, out, KS_HASH_LEN);
}

void ks_hash_chunks(const uint8_t prev[KS_HASH_LEN], const uint32_t *tokens,
		    size_t first, size_t n, uint32_t chunk_tokens,
		    uint8_t (*out)[KS_HASH_LEN])
{
	uint8_t be[HASH_TOKEN_BATCH * 4];
	const uint8_t *p = prev;

	for (size_t c = 0; c < n; c++) {
		const uint32_t *t = tokens + (first + c) * (size_t)chunk_tokens;
		blake3_hasher h;

		blake3_hasher_init(&h);
		blake3_hasher_update(&h, p, KS_HASH_LEN);
		for (uint32_t done = 0; done < chunk_tokens;) {
			uint32_t m = chunk_tokens - done;

			if (m > HASH_TOKEN_BATCH)
				m = HASH_TOKEN_BATCH;
			for (uint32_t i = 0; i < m; i++) {
				uint32_t v = t[done + i];

				be[4 * i + 0] = (uint8_t)(v >> 24);
				be[4 * i + 1] = (uint8_t)(v >> 16);
				be[4 * i + 2] = (uint8_t)(v >> 8);
				be[4 * i + 3] = (uint8_t)v;
			}
			blake3_hasher_update(&h, be, (size_t)m * 4);
			done += m;
		}
		blake3_hasher_finalize(&h, out[c], KS_HASH_LEN);
		p = out[c];
	}
}

int ks_key_init(struct ks_key *k, const uint8_t chunk_hash[KS_HASH_LEN], const char *model,
		size_t model_len, uint32_t kv_rank)
{
	if (model_len > KS_MODEL_MAX)
		return -ENAMETOOLONG;
	memset(k, 0, sizeof(*k));
	memcpy(k->chunk_hash, chunk_hash, KS_HASH_LEN);
	memcpy(k->model, model, model_len);
	k->model_len = (uint16_t)model_len;
	k->kv_rank = kv_rank;
	return 0;
}

bool ks_key_equal(const struct ks_key *a, const struct ks_key *b)
{
	return a->kv_rank == b->kv_rank && a->model_len == b->model_len &&
	       !memcmp(a->chunk_hash, b->chunk_hash, KS_HASH_LEN) &&
	       !memcmp(a->model, b->model, a->model_len);
}

uint64_t ks_key_hash64(const struct ks_key *k)
{
	uint64_t v;

	/* Mix the rank and model length in so ranks of one chunk spread over shards. */
	memcpy(&v, k->chunk_hash, sizeof(v));
	v ^= (uint64_t)k->kv_rank * 0x9e3779b97f4a7c15ull;
	v ^= (uint64_t)k->model_len << 48;
	for (uint16_t i = 0; i < k->model_len; i++)
		v = (v ^ (uint8_t)k->model[i]) * 0x100000001b3ull;
	return v ^ (v >> 29);
}

void ks_hash_hex(const uint8_t h[KS_HASH_LEN], char out[2 * KS_HASH_LEN + 1])
{
	static const char hex[] = "0123456789abcdef";

	for (int i = 0; i < KS_HASH_LEN; i++) {
		out[2 * i] = hex[h[i] >> 4];
		out[2 * i + 1] = hex[h[i] & 15];
	}
	out[2 * KS_HASH_LEN] = '\0';
}
