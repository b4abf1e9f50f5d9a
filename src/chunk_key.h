/*
 * chunk_key.h - chunk prefix hashing (protocol.md §4.2) and cache keys (§4.3).
 *
 * h_i = BLAKE3(h_{i-1} || BE32(tok[i*C]) || ... || BE32(tok[i*C+C-1])),
 * h_{-1} = NONE_HASH = BLAKE3(twelve 0x00 bytes). Only full chunks hash.
 */
#ifndef KS_CHUNK_KEY_H
#define KS_CHUNK_KEY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KS_HASH_LEN 32
/* Longest model name accepted on the wire (bytes, without NUL). */
#define KS_MODEL_MAX 255

/* One cached object's identity: (chunk_hash, model_name, kv_rank). */
struct ks_key {
	uint8_t chunk_hash[KS_HASH_LEN];
	uint32_t kv_rank;
	uint16_t model_len;
	char model[KS_MODEL_MAX + 1];	/* NUL-terminated, zero-padded */
};

/* The normative seed: BLAKE3(00 x 12) = 7e3eff9e...d56d473b. */
void ks_none_hash(uint8_t out[KS_HASH_LEN]);

/*
 * Hash chunks [first, first + n) of @tokens with chunk size @chunk_tokens,
 * continuing from @prev (the hash of chunk first-1, or NONE_HASH when first is
 * 0). Writes n digests to @out. The caller guarantees the tokens exist:
 * (first + n) * chunk_tokens <= number of tokens.
 */
void ks_hash_chunks(const uint8_t prev[KS_HASH_LEN], const uint32_t *tokens,
		    size_t first, size_t n, uint32_t chunk_tokens,
		    uint8_t (*out)[KS_HASH_LEN]);

/* kv_rank = (ws<<24) | (wid<<16) | (ws<<8) | wid (protocol.md §4.3). */
static inline uint32_t ks_kv_rank(uint32_t world_size, uint32_t worker_id)
{
	return ((world_size & 0xff) << 24) | ((worker_id & 0xff) << 16) |
	       ((world_size & 0xff) << 8) | (worker_id & 0xff);
}

/* Fill @k. Returns 0, or -ENAMETOOLONG when the model name is too long. */
int ks_key_init(struct ks_key *k, const uint8_t chunk_hash[KS_HASH_LEN], const char *model,
		size_t model_len, uint32_t kv_rank);
bool ks_key_equal(const struct ks_key *a, const struct ks_key *b);
/* 64-bit value for table sharding/bucketing (the chunk hash is uniform already). */
uint64_t ks_key_hash64(const struct ks_key *k);

/* Lowercase hex of a digest into @out (65 bytes). */
void ks_hash_hex(const uint8_t h[KS_HASH_LEN], char out[2 * KS_HASH_LEN + 1]);

#endif /* KS_CHUNK_KEY_H */
