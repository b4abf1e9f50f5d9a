/*
 * Description: chunk prefix hashing matches protocol.md §8 vectors and digests
 * computed independently by b3sum over bytes this test writes. Labels: unit
 */
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

#include "chunk_key.h"
#include "helpers.h"

static void hex(const uint8_t h[32], char out[65])
{
	ks_hash_hex(h, out);
}

/* b3sum of @n bytes written to a temp file; 0 on success. */
static int b3sum_bytes(const uint8_t *buf, size_t n, char out[65])
{
	char *dir = t_mkdtemp("hash");
	char path[512], cmd[600];
	FILE *f, *p;
	int rc = -1;

	if (!dir)
		return -1;
	snprintf(path, sizeof(path), "%s/in", dir);
	f = fopen(path, "wb");
	if (!f)
		goto out;
	if (fwrite(buf, 1, n, f) != n) {
		fclose(f);
		goto out;
	}
	fclose(f);
	snprintf(cmd, sizeof(cmd), "b3sum --no-names '%s'", path);
	p = popen(cmd, "r");
	if (!p)
		goto out;
	if (fscanf(p, "%64s", out) == 1)
		rc = 0;
	if (pclose(p) != 0)
		rc = -1;
out:
	t_rmtree(dir);
	free(dir);
	return rc;
}

/* prev || BE32 tokens, as the spec defines the hash input. */
static size_t build_input(uint8_t *buf, const uint8_t prev[32], const uint32_t *tok, size_t n)
{
	memcpy(buf, prev, 32);
	for (size_t i = 0; i < n; i++) {
		buf[32 + 4 * i] = (uint8_t)(tok[i] >> 24);
		buf[33 + 4 * i] = (uint8_t)(tok[i] >> 16);
		buf[34 + 4 * i] = (uint8_t)(tok[i] >> 8);
		buf[35 + 4 * i] = (uint8_t)tok[i];
	}
	return 32 + 4 * n;
}

int main(void)
{
	uint8_t none[32], h[4][32];
	char s[65], ref[65];

	ks_none_hash(none);
	hex(none, s);
	CHECK(!strcmp(s, "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"));

	/* protocol.md §8.2: C = 4, tokens 1..10 -> two chunks, 9 and 10 ignored. */
	uint32_t small[10] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 };
	ks_hash_chunks(none, small, 0, 2, 4, h);
	hex(h[0], s);
	CHECK(!strcmp(s, "6309ed506b8721905753f5c73c070bb21c3aafbd9b474b1e231f41368b71123c"));
	hex(h[1], s);
	CHECK(!strcmp(s, "98efc76eafb06cfe774c31ff151f300b61a614c27982a211bb8cdbd83a8c0e19"));

	/* §8.3: C = 256, tokens 0..511. */
	uint32_t tok[1024];
	for (uint32_t i = 0; i < 1024; i++)
		tok[i] = i;
	ks_hash_chunks(none, tok, 0, 2, 256, h);
	hex(h[0], s);
	CHECK(!strcmp(s, "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4"));
	hex(h[1], s);
	CHECK(!strcmp(s, "e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0"));

	/* Resuming from a middle chunk equals hashing from 0 (the session cache relies on it). */
	uint8_t mid[1][32];
	ks_hash_chunks(h[0], tok, 1, 1, 256, mid);
	CHECK(!memcmp(mid[0], h[1], 32));

	/* Independent digests: large tokens (all four BE bytes used), first, middle and a
	 * chunk followed by a partial tail, against b3sum over bytes built here. */
	if (access("/usr/bin/b3sum", X_OK) != 0) {
		fprintf(stderr, "b3sum missing: apt-get install b3sum\n");
		return T_EXIT_FAIL;
	}
	uint32_t big[1000];
	for (uint32_t i = 0; i < 1000; i++)
		big[i] = 0xdeadbeefu ^ (i * 2654435761u);
	uint8_t hb[3][32];
	ks_hash_chunks(none, big, 0, 3, 256, hb);	/* tokens 768..999 are a partial chunk */
	static uint8_t input[32 + 4 * 256];
	const uint8_t *prev = none;
	for (int c = 0; c < 3; c++) {
		size_t n = build_input(input, prev, big + 256 * c, 256);
		REQUIRE(b3sum_bytes(input, n, ref) == 0);
		hex(hb[c], s);
		CHECK(!strcmp(s, ref));
		prev = hb[c];
	}

	/* Keys: kv_rank packing and equality. */
	CHECK_EQ(ks_kv_rank(2, 1), 0x02010201);
	CHECK_EQ(ks_kv_rank(2, 0), 0x02000200);
	struct ks_key a, b;
	CHECK_EQ(ks_key_init(&a, h[0], "m", 1, 1), 0);
	CHECK_EQ(ks_key_init(&b, h[0], "m", 1, 1), 0);
	CHECK(ks_key_equal(&a, &b));
	b.kv_rank = 2;
	CHECK(!ks_key_equal(&a, &b));
	char longname[KS_MODEL_MAX + 2];
	memset(longname, 'x', sizeof(longname));
	CHECK_EQ(ks_key_init(&a, h[0], longname, sizeof(longname), 1), -ENAMETOOLONG);
	return t_result("hash");
}
