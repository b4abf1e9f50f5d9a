/*
 * tier_chunk.h - the self-describing chunk format shared by the storage tiers
 * (tier_disk.c files, tier_redis.c values), and the completion callback type.
 *
 * A stored chunk is TIER_CHUNK_HDR_SIZE header bytes followed by the payload:
 *
 *   off  size  field (all integers little-endian)
 *     0     8  magic "KVSCHNK1"
 *     8     4  version (TIER_CHUNK_VERSION)
 *    12     4  header size (TIER_CHUNK_HDR_SIZE)
 *    16    32  chunk_hash
 *    48     4  kv_rank
 *    52     2  model_len (<= KS_MODEL_MAX)
 *    54     2  checksum algorithm (1 = XXH3_64bits, seed 0)
 *    56     8  layout tag (opaque, chosen by the caller: layout/dtype/shape id)
 *    64     8  payload length in bytes
 *    72     8  checksum of the payload
 *    80   256  model name, zero padded
 *   336   168  reserved, zero
 *   504     8  checksum of bytes [0, 504) of the header
 *
 * The header checksum catches a torn or foreign header before its length
 * is trusted; the payload checksum catches flipped or missing payload bytes.
 * XXH3_64bits (xxHash 0.8, 64-bit) is used rather than XXH64 because it hashes
 * ~2x faster on AVX2, and the checksum is on every tier read.
 */
#ifndef KS_TIER_CHUNK_H
#define KS_TIER_CHUNK_H

#include <stddef.h>
#include <stdint.h>

#include "chunk_key.h"

#define TIER_CHUNK_HDR_SIZE 512u
#define TIER_CHUNK_VERSION 1u
#define TIER_CHUNK_SUM_XXH3 1u
/* "<64 hex chunk_hash>-<8 hex kv_rank>-<16 hex XXH64(model)>" + NUL */
#define TIER_CHUNK_NAME_MAX (64 + 1 + 8 + 1 + 16 + 1)

/* What a header says about its chunk. */
struct tier_chunk_meta {
	struct ks_key key;
	uint64_t layout_tag;
	uint64_t payload_len;
	uint64_t payload_sum;
};

/*
 * Completion of a tier request, called exactly once for each request whose
 * submit call returned 0, on a tier worker thread with no kvstash lock held.
 * @status: 0 or -errno (see each tier's submit function). For a get,
 * @layout_tag and @nbytes describe the payload placed in the caller's
 * buffer; on error they are 0 and the buffer's contents are unspecified
 * (never to be used). Must not block and must not close the tier.
 */
typedef void (*ks_tier_done_fn)(void *arg, int status, uint64_t layout_tag, size_t nbytes);

/* Checksum of @n bytes (the algorithm named TIER_CHUNK_SUM_XXH3). */
uint64_t tier_chunk_sum(const void *buf, size_t n);

/* Fill @hdr for @key; @payload_sum from tier_chunk_sum() over the payload. */
void tier_chunk_hdr_encode(uint8_t hdr[TIER_CHUNK_HDR_SIZE], const struct ks_key *key,
			   uint64_t layout_tag, uint64_t payload_len, uint64_t payload_sum);

/*
 * Parse and check @hdr (magic, version, size, header checksum, model length).
 * Returns 0 with *out filled in, or -EBADMSG.
 */
int tier_chunk_hdr_decode(const uint8_t hdr[TIER_CHUNK_HDR_SIZE], struct tier_chunk_meta *out);

/*
 * Check a decoded chunk against what was asked for: the same key, a
 * payload of @got bytes matching the header's length and checksum.
 * Returns 0 or -EBADMSG.
 */
int tier_chunk_verify(const struct tier_chunk_meta *m, const struct ks_key *want,
		      const void *payload, size_t got);

/* Stable object name of @key (file name, Redis key suffix); @out holds TIER_CHUNK_NAME_MAX. */
void tier_chunk_name(const struct ks_key *key, char out[TIER_CHUNK_NAME_MAX]);

#endif /* KS_TIER_CHUNK_H */
