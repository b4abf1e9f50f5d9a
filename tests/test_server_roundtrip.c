/*
 * Description: STORE then RETRIEVE through a real kvstashd returns every byte,
 * for each layout (flash_attn, flashinfer, mla) and dtype size, with shuffled
 * block ids, a partial tail chunk, skip_first_n_tokens, and LOOKUP prefix
 * semantics seen from a second client. Labels: unit
 */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "helpers.h"
#include "kvfix.h"

#define NL 4
#define NB 96
#define BS 16
#define NH 4
#define HS 64
#define C 256
#define NCHUNKS 2
#define TAIL 100	/* tokens after the last full chunk: never stored */

static void shuffle(int64_t *v, size_t n, uint64_t seed)
{
	for (size_t i = n - 1; i > 0; i--) {
		size_t j = (size_t)((seed = seed * 6364136223846793005ull + 1442695040888963407ull) >> 33) %
			   (i + 1);
		int64_t t = v[i];

		v[i] = v[j];
		v[j] = t;
	}
}

static void run_case(enum kvstash_layout layout, const char *dtype, int hs)
{
	struct t_daemon *d = t_daemon_start("--pool-size=128M --workers=2");
	kvstash_client *a = NULL, *b = NULL;
	struct t_kv kv;
	const size_t ntok = NCHUNKS * C + TAIL, nrange = NCHUNKS * C;
	const size_t nblk = nrange / BS;
	int64_t blocks[NB];
	uint32_t tokens[NCHUNKS * C + TAIL];
	const uint64_t seed = 0x5eed0000u + (uint64_t)layout * 16 + (uint64_t)strlen(dtype);
	int64_t *src = blocks, *dst = blocks + nblk, *dst2 = blocks + 2 * nblk;
	int64_t chunks = -1;

	fprintf(stderr, "case %d %s hs %d\n", (int)layout, dtype, hs);
	REQUIRE(d);
	REQUIRE(kvstash_connect(d->endpoint, 5000, &a) == 0);
	REQUIRE(kvstash_connect(d->endpoint, 5000, &b) == 0);
	REQUIRE(t_kv_create(&kv, layout, dtype, NL, NB, BS, NH, hs) == 0);
	REQUIRE(3 * nblk <= NB);
	for (int i = 0; i < NB; i++)
		blocks[i] = i;
	shuffle(blocks, NB, seed);
	for (size_t t = 0; t < ntok; t++)
		tokens[t] = (uint32_t)(t * 2654435761u) ^ (uint32_t)seed;
	memset(kv.buf.ptr, 0, kv.buf.bytes);
	for (size_t t = 0; t < nrange; t++)
		t_kv_fill_token(&kv, t_kv_slot(&kv, src, t), seed, t);

	CHECK_EQ(t_kv_register(&kv, a, 7, "m-roundtrip", 1), 0);
	struct kvstash_key key = { .model = "m-roundtrip", .world_size = 1, .worker_id = 0,
				   .tokens = tokens, .ntokens = ntok, .start = 0, .end = nrange,
				   .request_id = "req-a" };
	CHECK_EQ(kvstash_store(a, &key, 7, src, nblk), 0);

	/* A second client sees both full chunks; the 100-token tail is not a chunk. */
	struct kvstash_key lk = key;
	lk.worker_id = -1;
	lk.request_id = "req-b";
	CHECK_EQ(kvstash_lookup_chunks(b, &lk, 1, &chunks), 0);
	CHECK_EQ(chunks, NCHUNKS);

	/* Tokens that diverge inside chunk 1: only chunk 0 is a hit. */
	uint32_t other[NCHUNKS * C + TAIL];
	memcpy(other, tokens, sizeof(other));
	other[C + 17] ^= 1;
	lk.tokens = other;
	lk.request_id = "req-c";
	CHECK_EQ(kvstash_lookup_chunks(b, &lk, 1, &chunks), 0);
	CHECK_EQ(chunks, 1);
	/* Diverging in chunk 0: a miss at the start means no hits at all. */
	other[3] ^= 1;
	lk.request_id = "req-d";
	CHECK_EQ(kvstash_lookup_chunks(b, &lk, 1, &chunks), 0);
	CHECK_EQ(chunks, 0);

	/* RETRIEVE into other blocks: every token's rows, every layer and plane. */
	CHECK_EQ(kvstash_retrieve(a, &key, 7, dst, nblk, 0), 0);
	size_t bad = 0;
	for (size_t t = 0; t < nrange; t++)
		bad += !t_kv_check_token(&kv, t_kv_slot(&kv, dst, t), seed, t);
	CHECK_EQ(bad, 0);
	/* The source blocks were only read. */
	bad = 0;
	for (size_t t = 0; t < nrange; t++)
		bad += !t_kv_check_token(&kv, t_kv_slot(&kv, src, t), seed, t);
	CHECK_EQ(bad, 0);

	/* skip_first_n_tokens: 300 skips chunk 0 whole and 44 tokens of chunk 1;
	 * the skipped target rows keep what they held (zeros). */
	for (size_t t = 0; t < nrange; t++)
		for (int l = 0; l < NL; l++)
			for (int p = 0; p < kv.planes; p++)
				memset(t_kv_row(&kv, l, p, t_kv_slot(&kv, dst2, t)), 0, kv.row_bytes);
	/* Only the connection that registered instance 7 may write its blocks. */
	CHECK_EQ(kvstash_retrieve(b, &key, 7, dst2, nblk, 300), -ENOENT);
	CHECK(strstr(kvstash_last_error(), "registered by another connection") != NULL);
	CHECK_EQ(kvstash_unregister(b, 7), 0);	/* refused (logged), instance stays */
	CHECK_EQ(kvstash_retrieve(a, &key, 7, dst2, nblk, 300), 0);
	size_t wrong_skipped = 0, wrong_copied = 0;
	for (size_t t = 0; t < nrange; t++) {
		int64_t slot = t_kv_slot(&kv, dst2, t);

		if (t < 300) {
			for (int l = 0; l < NL; l++)
				for (int p = 0; p < kv.planes; p++) {
					const uint8_t *r = t_kv_row(&kv, l, p, slot);

					for (size_t i = 0; i < kv.row_bytes; i++)
						wrong_skipped += r[i] != 0;
				}
		} else {
			wrong_copied += !t_kv_check_token(&kv, slot, seed, t);
		}
	}
	CHECK_EQ(wrong_skipped, 0);
	CHECK_EQ(wrong_copied, 0);

	/* A range starting at chunk 1 (block ids cover the range only). */
	struct kvstash_key k1 = key;
	k1.start = C;
	k1.end = nrange;
	for (int l = 0; l < NL; l++)
		for (size_t t = 0; t < C; t++)
			for (int p = 0; p < kv.planes; p++)
				memset(t_kv_row(&kv, l, p, t_kv_slot(&kv, dst2, t)), 0, kv.row_bytes);
	CHECK_EQ(kvstash_retrieve(a, &k1, 7, dst2, C / BS, 0), 0);
	bad = 0;
	for (size_t t = 0; t < C; t++)
		bad += !t_kv_check_token(&kv, t_kv_slot(&kv, dst2, t), seed, C + t);
	CHECK_EQ(bad, 0);

	/* A chunk never stored: RETRIEVE fails and says why. */
	uint32_t fresh[C];
	for (size_t t = 0; t < C; t++)
		fresh[t] = (uint32_t)t + 0x40000000u;
	struct kvstash_key kmiss = { .model = "m-roundtrip", .world_size = 1, .worker_id = 0,
				     .tokens = fresh, .ntokens = C, .start = 0, .end = C,
				     .request_id = "req-miss" };
	CHECK_EQ(kvstash_retrieve(a, &kmiss, 7, dst, C / BS, 0), -ENOENT);
	CHECK(strstr(kvstash_last_error(), "not cached") != NULL);

	/* Storing the same chunks again is ok and stores nothing new. */
	CHECK_EQ(kvstash_store(a, &key, 7, src, nblk), 0);

	CHECK_EQ(kvstash_unregister(a, 7), 0);
	kvstash_close(a);
	kvstash_close(b);
	t_kv_destroy(&kv);
	CHECK_EQ(t_daemon_stop(d), 0);
}

int main(void)
{
	static const char *const dtypes[] = { "bfloat16", "float16", "float32", "float8_e4m3fn" };

	for (int layout = 0; layout < 3; layout++)
		for (unsigned i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
			run_case((enum kvstash_layout)layout, dtypes[i],
				 layout == KVSTASH_LAYOUT_MLA ? 576 : HS);
	return t_result("server_roundtrip");
}
