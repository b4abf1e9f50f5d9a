/*
 * Description: host gather/scatter is byte-exact against a naive reference of protocol.md §7. Labels: unit
 *
 * For every layout kind (flash_attn [2,NB,BS,NH,HS], flashinfer [NB,2,BS,NH,HS],
 * mla [NB,BS,HS]) and element size (1, 2, 4 bytes) the fast path is compared
 * with an element-by-element reference written here from the element mapping
 * in protocol.md §7, using only shape[] and stride[] (none of the fields
 * kv_layout_init() derives). Cases: packed and padded strides (head, token,
 * block, plane padding; rows_contiguous 0), shuffled and consecutive block
 * ids, fully random slots, chunks that are not a multiple of BS, skip_tokens
 * inside a block and across blocks, transfers big enough to take the
 * streaming path, and misaligned layer bases. Every buffer has guard bytes
 * that must survive. Plus kv_layout_init() positive and negative cases.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compiler.h"
#include "helpers.h"
#include "layout.h"
#include "transfer_host.h"

#define GUARD 64	/* bytes of known pattern before and after every buffer */

/* ---- layouts --------------------------------------------------------------- */

/* Extra elements inserted between heads, tokens, blocks and K/V planes. */
struct pad {
	int64_t head, token, block, plane;
};

/* C-order strides with padding for @kind; fills shape/stride/ndim. */
static void make_shape(struct kv_layout *l, enum kv_layout_kind kind, enum kv_dtype dt,
		       uint32_t nl, int64_t nb, int64_t bs, int64_t nh, int64_t hs, struct pad p)
{
	memset(l, 0, sizeof(*l));
	l->kind = kind;
	l->dtype = dt;
	l->num_layers = nl;
	switch (kind) {
	case KV_LAYOUT_FLASH_ATTN: {
		int64_t s3 = hs + p.head, s2 = nh * s3 + p.token, s1 = bs * s2 + p.block;
		int64_t s0 = nb * s1 + p.plane;

		l->ndim = 5;
		memcpy(l->shape, (int64_t[]){ 2, nb, bs, nh, hs }, 5 * sizeof(int64_t));
		memcpy(l->stride, (int64_t[]){ s0, s1, s2, s3, 1 }, 5 * sizeof(int64_t));
		break;
	}
	case KV_LAYOUT_FLASHINFER: {
		int64_t s3 = hs + p.head, s2 = nh * s3 + p.token, s1 = bs * s2 + p.plane;
		int64_t s0 = 2 * s1 + p.block;

		l->ndim = 5;
		memcpy(l->shape, (int64_t[]){ nb, 2, bs, nh, hs }, 5 * sizeof(int64_t));
		memcpy(l->stride, (int64_t[]){ s0, s1, s2, s3, 1 }, 5 * sizeof(int64_t));
		break;
	}
	case KV_LAYOUT_MLA: {
		int64_t s1 = hs + p.token, s0 = bs * s1 + p.block;

		l->ndim = 3;
		memcpy(l->shape, (int64_t[]){ nb, bs, hs }, 3 * sizeof(int64_t));
		memcpy(l->stride, (int64_t[]){ s0, s1, 1 }, 3 * sizeof(int64_t));
		break;
	}
	}
}

/* ---- reference (protocol.md §7, from shape[] and stride[] only) ----------- */

static int64_t ref_bs(const struct kv_layout *l)
{
	return l->kind == KV_LAYOUT_MLA ? l->shape[1] : l->shape[2];
}

static int64_t ref_nh(const struct kv_layout *l)
{
	return l->kind == KV_LAYOUT_MLA ? 1 : l->shape[3];
}

static int64_t ref_hs(const struct kv_layout *l)
{
	return l->kind == KV_LAYOUT_MLA ? l->shape[2] : l->shape[4];
}

static uint32_t ref_planes(const struct kv_layout *l)
{
	return l->kind == KV_LAYOUT_MLA ? 1 : 2;
}

/* Element offset of paged [k, slot, h, d] per the table in protocol.md §7. */
static int64_t ref_elem(const struct kv_layout *l, int64_t k, int64_t slot, int64_t h, int64_t d)
{
	int64_t b = slot / ref_bs(l), o = slot % ref_bs(l);
	int64_t idx[5];

	switch (l->kind) {
	case KV_LAYOUT_FLASH_ATTN:
		memcpy(idx, (int64_t[]){ k, b, o, h, d }, sizeof(idx));
		break;
	case KV_LAYOUT_FLASHINFER:
		memcpy(idx, (int64_t[]){ b, k, o, h, d }, sizeof(idx));
		break;
	default:
		memcpy(idx, (int64_t[]){ b, o, d, 0, 0 }, sizeof(idx));
		break;
	}
	int64_t off = 0;

	for (uint32_t i = 0; i < l->ndim; i++)
		off += idx[i] * l->stride[i];
	return off;
}

/* obj[k][i][t][h*HS+d] <-> paged; byte by byte. to_obj: gather. */
static void ref_copy(const struct kv_layout *l, uint8_t *const *layers, const int64_t *slots,
		     uint32_t c, uint32_t skip, uint8_t *obj, int to_obj)
{
	int64_t nh = ref_nh(l), hs = ref_hs(l), hidden = nh * hs;
	size_t eb = kv_dtype_bytes(l->dtype);

	for (uint32_t k = 0; k < ref_planes(l); k++)
		for (uint32_t i = 0; i < l->num_layers; i++)
			for (uint32_t t = skip; t < c; t++)
				for (int64_t h = 0; h < nh; h++)
					for (int64_t d = 0; d < hs; d++) {
						size_t oe = (((size_t)k * l->num_layers + i) * c + t) *
								    (size_t)hidden +
							    (size_t)(h * hs + d);
						uint8_t *p = layers[i] +
							     (size_t)ref_elem(l, k, slots[t], h, d) * eb;

						for (size_t b = 0; b < eb; b++) {
							if (to_obj)
								obj[oe * eb + b] = p[b];
							else
								p[b] = obj[oe * eb + b];
						}
					}
}

/* ---- buffers --------------------------------------------------------------- */

/* One allocation per layer: GUARD | misalign | extent | GUARD, all t_fill'ed. */
struct paged {
	uint32_t nl;
	size_t alloc;
	uint8_t *mem[8];
	uint8_t *base[8];	/* element 0 of each layer */
	void *vbase[8];		/* the same, as xfer_host_*() take them */
};

static void paged_alloc(struct paged *pg, const struct kv_layout *l, size_t misalign, uint64_t seed)
{
	REQUIRE(l->num_layers <= 8);
	pg->nl = l->num_layers;
	pg->alloc = GUARD + misalign + 8 * 7 + l->extent_bytes + GUARD;
	for (uint32_t i = 0; i < pg->nl; i++) {
		pg->mem[i] = malloc(pg->alloc);
		REQUIRE(pg->mem[i]);
		t_fill(pg->mem[i], pg->alloc, seed + i);
		/* Layers at different misalignments too: layer i gets 8*i more. */
		pg->base[i] = pg->mem[i] + GUARD + misalign + 8 * i;
		pg->vbase[i] = pg->base[i];
	}
}

static void paged_free(struct paged *pg)
{
	for (uint32_t i = 0; i < pg->nl; i++)
		free(pg->mem[i]);
}

/* ---- slot patterns ----------------------------------------------------------- */

enum slot_pattern {
	SLOTS_SHUFFLED_BLOCKS,	/* distinct random blocks, in-block order kept */
	SLOTS_CONSECUTIVE,	/* blocks b0, b0+1, ...: cross-block merges */
	SLOTS_RANDOM,		/* any distinct slots: no merges */
	SLOTS_UNALIGNED,	/* starts mid-block, runs on into the next blocks */
};

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

/* Random permutation of [0, n). */
static int64_t *perm(int64_t n)
{
	int64_t *p = malloc((size_t)n * sizeof(*p));

	REQUIRE(p);
	for (int64_t i = 0; i < n; i++)
		p[i] = i;
	for (int64_t i = n - 1; i > 0; i--) {
		int64_t j = (int64_t)(rng() % (uint64_t)(i + 1)), tmp = p[i];

		p[i] = p[j];
		p[j] = tmp;
	}
	return p;
}

/* [c] distinct slots following @pat; caller frees. */
static int64_t *make_slots(const struct kv_layout *l, uint32_t c, enum slot_pattern pat)
{
	int64_t bs = ref_bs(l), nb = l->shape[l->kind == KV_LAYOUT_FLASHINFER ? 0 :
					       l->kind == KV_LAYOUT_MLA ? 0 : 1];
	int64_t *s = malloc((size_t)c * sizeof(*s));
	int64_t *p;

	REQUIRE(s);
	switch (pat) {
	case SLOTS_SHUFFLED_BLOCKS:
		REQUIRE((c + bs - 1) / bs <= nb);
		p = perm(nb);
		for (uint32_t t = 0; t < c; t++)
			s[t] = p[t / bs] * bs + t % bs;
		free(p);
		break;
	case SLOTS_CONSECUTIVE: {
		int64_t b0 = nb - (c + bs - 1) / bs;

		REQUIRE(b0 >= 0);
		b0 = b0 ? (int64_t)(rng() % (uint64_t)(b0 + 1)) : 0;
		for (uint32_t t = 0; t < c; t++)
			s[t] = b0 * bs + t;
		break;
	}
	case SLOTS_RANDOM:
		REQUIRE(c <= nb * bs);
		p = perm(nb * bs);
		memcpy(s, p, (size_t)c * sizeof(*s));
		free(p);
		break;
	case SLOTS_UNALIGNED: {
		/* Blocks shuffled, but the chunk starts at offset bs/2 + 1 of its
		 * first block, so every run crosses a block boundary mid-way. */
		int64_t start = bs / 2 + 1;

		REQUIRE((c + start + bs - 1) / bs <= nb);
		p = perm(nb);
		for (uint32_t t = 0; t < c; t++) {
			int64_t v = start + t;

			s[t] = p[v / bs] * bs + v % bs;
		}
		free(p);
		break;
	}
	}
	return s;
}

/* ---- one case --------------------------------------------------------------- */

struct tcase {
	const char *name;
	enum kv_layout_kind kind;
	enum kv_dtype dt;
	uint32_t nl;
	int64_t nb, bs, nh, hs;
	struct pad pad;
	uint32_t c;
	enum slot_pattern pat;
	size_t misalign;	/* bytes added to every layer base (multiple of 8) */
	int want_contig;	/* expected rows_contiguous */
};

static int cases_run;

/*
 * Gather: fast vs reference from the same paged bytes, and the paged buffer
 * must be unchanged. Scatter, for each skip: fast vs reference into two
 * identical paged buffers, compared in full (skipped and unlisted slots and
 * guards included), and skipped tokens checked against the original fill
 * independently of the reference. Then gather(scatter(obj)) == obj for the
 * tokens >= skip.
 */
static void run_case(const struct tcase *tc)
{
	struct kv_layout l;
	char err[128] = "";
	struct paged a, b;

	make_shape(&l, tc->kind, tc->dt, tc->nl, tc->nb, tc->bs, tc->nh, tc->hs, tc->pad);
	int rc = kv_layout_init(&l, err, sizeof(err));

	if (rc) {
		fprintf(stderr, "FAIL %s: kv_layout_init: %s\n", tc->name, err);
		t_failures++;
		return;
	}
	CHECK_EQ(l.rows_contiguous, tc->want_contig);

	int64_t *slots = make_slots(&l, tc->c, tc->pat);
	size_t obj_bytes = kv_object_bytes(&l, tc->c);
	uint8_t *obj_mem = malloc(obj_bytes + 2 * GUARD), *ref_mem = malloc(obj_bytes + 2 * GUARD);
	uint8_t *obj = obj_mem + GUARD, *ref = ref_mem + GUARD;
	int fails0 = t_failures;

	REQUIRE(obj_mem && ref_mem);
	CHECK_EQ(obj_bytes, (size_t)ref_planes(&l) * tc->nl * tc->c * tc->nh * tc->hs *
				    kv_dtype_bytes(tc->dt));

	/* Gather. */
	paged_alloc(&a, &l, tc->misalign, 1000);
	t_fill(obj_mem, obj_bytes + 2 * GUARD, 7);
	t_fill(ref_mem, obj_bytes + 2 * GUARD, 7);
	xfer_host_gather(&l, a.vbase, slots, tc->c, obj);
	ref_copy(&l, a.base, slots, tc->c, 0, ref, 1);
	CHECK(memcmp(obj_mem, ref_mem, obj_bytes + 2 * GUARD) == 0);
	for (uint32_t i = 0; i < a.nl; i++)
		CHECK_EQ(t_verify(a.mem[i], a.alloc, 1000 + i), (size_t)-1);

	/* Scatter at several skips: none, inside the first block, exactly one
	 * block, across blocks, all but one token, everything. */
	uint32_t skips[] = { 0, 1, (uint32_t)tc->bs / 2, (uint32_t)tc->bs, (uint32_t)tc->bs + 3,
			     tc->c - 1, tc->c };

	for (size_t si = 0; si < KS_ARRAY_SIZE(skips); si++) {
		uint32_t skip = skips[si];

		if (skip > tc->c)
			continue;
		paged_alloc(&b, &l, tc->misalign, 2000);
		/* a := b's fill */
		for (uint32_t i = 0; i < a.nl; i++)
			t_fill(a.mem[i], a.alloc, 2000 + i);
		t_fill(obj_mem, obj_bytes + 2 * GUARD, 300 + si);
		xfer_host_scatter(&l, a.vbase, slots, tc->c, skip, obj);
		ref_copy(&l, b.base, slots, tc->c, skip, obj, 0);
		CHECK_EQ(t_verify(obj_mem, obj_bytes + 2 * GUARD, 300 + si), (size_t)-1);
		for (uint32_t i = 0; i < a.nl; i++)
			CHECK(memcmp(a.mem[i], b.mem[i], a.alloc) == 0);

		/* Skipped tokens: every byte of their rows still holds the fill.
		 * Checked against a fresh fill, not against the reference. */
		paged_free(&b);
		paged_alloc(&b, &l, tc->misalign, 2000);
		size_t eb = kv_dtype_bytes(tc->dt);

		for (uint32_t i = 0; i < a.nl; i++)
			for (uint32_t k = 0; k < ref_planes(&l); k++)
				for (uint32_t t = 0; t < skip; t++)
					for (int64_t h = 0; h < tc->nh; h++) {
						size_t off = (size_t)ref_elem(&l, k, slots[t], h, 0) * eb;

						CHECK(memcmp(a.base[i] + off, b.base[i] + off,
							     (size_t)tc->hs * eb) == 0);
					}
		paged_free(&b);

		/* Round trip: the scattered tokens come back as they went in. */
		xfer_host_gather(&l, a.vbase, slots, tc->c, ref);
		size_t row = (size_t)l.row_bytes;

		for (uint32_t k = 0; k < ref_planes(&l); k++)
			for (uint32_t i = 0; i < tc->nl; i++) {
				size_t o = (((size_t)k * tc->nl + i) * tc->c + skip) * row;

				CHECK(memcmp(ref + o, obj + o, (size_t)(tc->c - skip) * row) == 0);
			}
	}
	paged_free(&a);
	free(obj_mem);
	free(ref_mem);
	free(slots);
	cases_run++;
	if (t_failures != fails0)
		fprintf(stderr, "  in case %s\n", tc->name);
}

/* ---- kv_layout_init ------------------------------------------------------------ */

static void check_reject(const char *what, struct kv_layout *l, const char *needle)
{
	char err[160] = "";
	int rc = kv_layout_init(l, err, sizeof(err));

	CHECK_EQ(rc, -EINVAL);
	if (rc != -EINVAL || !strstr(err, needle))
		fprintf(stderr, "  %s: rc %d err \"%s\" (want \"%s\")\n", what, rc, err, needle);
	CHECK(strstr(err, needle) != NULL);
}

static void test_layout_init(void)
{
	struct kv_layout l;
	struct pad none = { 0 };
	char err[160];

	/* Positive: vLLM flash_attn packed, derived fields by hand. */
	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 2, 10, 16, 8, 128, none);
	CHECK_EQ(kv_layout_init(&l, err, sizeof(err)), 0);
	CHECK_EQ(l.kv_planes, 2);
	CHECK_EQ(l.row_bytes, 8 * 128 * 2);
	CHECK_EQ(l.plane_stride, 10 * 16 * 8 * 128);
	CHECK_EQ(l.block_stride, 16 * 8 * 128);
	CHECK_EQ(l.token_stride, 8 * 128);
	CHECK_EQ(l.head_stride, 128);
	CHECK_EQ(l.rows_contiguous, 1);
	CHECK_EQ(l.extent_bytes, 2ull * 10 * 16 * 8 * 128 * 2);
	CHECK_EQ(kv_object_bytes(&l, 256), 2ull * 2 * 256 * 8 * 128 * 2);

	/* flashinfer: plane and block strides swap places. */
	make_shape(&l, KV_LAYOUT_FLASHINFER, KV_DTYPE_FLOAT16, 1, 10, 16, 4, 64, none);
	CHECK_EQ(kv_layout_init(&l, err, sizeof(err)), 0);
	CHECK_EQ(l.plane_stride, 16 * 4 * 64);
	CHECK_EQ(l.block_stride, 2 * 16 * 4 * 64);

	/* MLA: one plane. */
	make_shape(&l, KV_LAYOUT_MLA, KV_DTYPE_BFLOAT16, 1, 10, 16, 1, 576, none);
	CHECK_EQ(kv_layout_init(&l, err, sizeof(err)), 0);
	CHECK_EQ(l.kv_planes, 1);
	CHECK_EQ(l.row_bytes, 576 * 2);
	CHECK_EQ(kv_object_bytes(&l, 256), 1ull * 256 * 576 * 2);

	/* Negative cases. */
	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.stride[4] = 2;
	check_reject("last stride 2", &l, "last stride");

	make_shape(&l, KV_LAYOUT_MLA, KV_DTYPE_BFLOAT16, 1, 10, 16, 1, 64, none);
	l.stride[2] = 0;
	check_reject("mla last stride 0", &l, "last stride");

	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.ndim = 4;
	check_reject("flash_attn with 4 dims", &l, "dims");

	make_shape(&l, KV_LAYOUT_MLA, KV_DTYPE_BFLOAT16, 1, 10, 16, 1, 64, none);
	l.ndim = 5;
	check_reject("mla with 5 dims", &l, "dims");

	/* 3 fp16 elements = 6 bytes; 1 fp8 head of 12 = 12 bytes. */
	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_FLOAT16, 1, 10, 16, 1, 3, none);
	check_reject("row of 6 bytes", &l, "multiple of 8");
	make_shape(&l, KV_LAYOUT_MLA, KV_DTYPE_FLOAT8_E4M3FN, 1, 10, 16, 1, 12, none);
	check_reject("fp8 row of 12 bytes", &l, "multiple of 8");

	/* Heads overlap: head stride 64 < head size 128. */
	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128,
		   (struct pad){ .head = -64 });
	check_reject("head stride 64 < 128", &l, "overlap");

	/* Tokens overlap: token stride one head short of the row. */
	make_shape(&l, KV_LAYOUT_FLASHINFER, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128,
		   (struct pad){ .token = -128 });
	check_reject("token stride < row", &l, "overlap");

	/* K and V at the same address (plane stride 0) alias: rejected. */
	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.stride[0] = 0;
	check_reject("plane stride 0", &l, "overlap");

	/* Strides whose extent wraps 64 bits are refused, not truncated. */
	make_shape(&l, KV_LAYOUT_MLA, KV_DTYPE_FLOAT32, 1, 10, 16, 1, 8, none);
	l.shape[0] = (1 << 14) + 1;
	l.stride[0] = 1ll << 48;
	check_reject("extent overflow", &l, "extent");
	make_shape(&l, KV_LAYOUT_MLA, KV_DTYPE_FLOAT32, 1, 10, 16, 1, 8, none);
	l.shape[0] = 1ll << 32;
	check_reject("dim of 2^32", &l, "out of range");

	/* vLLM's HND FlashInfer layout [NB, 2, BS, NH, HS] with heads outside
	 * tokens: strides (2*NH*BS*HS, NH*BS*HS, HS, BS*HS, 1) are valid. */
	make_shape(&l, KV_LAYOUT_FLASHINFER, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.stride[0] = 2 * 8 * 16 * 128;
	l.stride[1] = 8 * 16 * 128;
	l.stride[2] = 128;
	l.stride[3] = 16 * 128;
	l.stride[4] = 1;
	{
		char e2[160] = "";

		CHECK_EQ(kv_layout_init(&l, e2, sizeof(e2)), 0);
		CHECK_EQ(l.rows_contiguous, 0);
	}

	/* Wrong K dimension for the kind. */
	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.shape[0] = 3;
	check_reject("flash_attn shape[0] 3", &l, "shape[0]");

	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.shape[3] = 0;
	check_reject("zero heads", &l, "out of range");

	make_shape(&l, KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 1, 10, 16, 8, 128, none);
	l.stride[1] = -1;
	check_reject("negative stride", &l, "out of range");
}

/* ---- cases ------------------------------------------------------------------------ */

#define FA KV_LAYOUT_FLASH_ATTN
#define FI KV_LAYOUT_FLASHINFER
#define MLA KV_LAYOUT_MLA
#define NOPAD ((struct pad){ 0 })

static const struct tcase cases[] = {
	/* name                          kind dtype                   nl nb  bs nh hs  pad                       c   pattern              mis contig */
	/* dtype sizes, packed (vLLM) layouts, shuffled blocks */
	{ "fa bf16 shuffled",            FA, KV_DTYPE_BFLOAT16,      3, 12, 16, 4, 32, NOPAD,                    64, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "fa fp16 shuffled",            FA, KV_DTYPE_FLOAT16,       2, 12, 8,  2, 16, NOPAD,                    48, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	{ "fa fp32 shuffled",            FA, KV_DTYPE_FLOAT32,       2, 12, 8,  3, 6,  NOPAD,                    40, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "fa fp8 shuffled",             FA, KV_DTYPE_FLOAT8_E4M3FN, 2, 12, 16, 2, 8,  NOPAD,                    64, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	{ "fi bf16 shuffled",            FI, KV_DTYPE_BFLOAT16,      3, 12, 16, 4, 32, NOPAD,                    64, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "fi fp16 shuffled",            FI, KV_DTYPE_FLOAT16,       2, 12, 8,  2, 16, NOPAD,                    48, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	{ "fi fp32 shuffled",            FI, KV_DTYPE_FLOAT32,       2, 12, 8,  1, 6,  NOPAD,                    40, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "fi fp8 shuffled",             FI, KV_DTYPE_FLOAT8_E5M2,   2, 12, 16, 3, 8,  NOPAD,                    64, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	{ "mla bf16 shuffled",           MLA, KV_DTYPE_BFLOAT16,     3, 12, 16, 1, 36, NOPAD,                    64, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "mla fp16 shuffled",           MLA, KV_DTYPE_FLOAT16,      2, 12, 8,  1, 20, NOPAD,                    48, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	{ "mla fp32 shuffled",           MLA, KV_DTYPE_FLOAT32,      2, 12, 8,  1, 10, NOPAD,                    40, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "mla fp8 shuffled",            MLA, KV_DTYPE_UINT8,        2, 12, 16, 1, 24, NOPAD,                    64, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	/* consecutive blocks: packed merges across blocks, padded must not */
	{ "fa consecutive",              FA, KV_DTYPE_BFLOAT16,      2, 12, 16, 4, 32, NOPAD,                    64, SLOTS_CONSECUTIVE,     0, 1 },
	{ "fa consecutive block pad",    FA, KV_DTYPE_BFLOAT16,      2, 12, 16, 4, 32, { .block = 8 },           64, SLOTS_CONSECUTIVE,     0, 1 },
	{ "fi consecutive",              FI, KV_DTYPE_FLOAT16,       2, 12, 8,  2, 16, NOPAD,                    48, SLOTS_CONSECUTIVE,     8, 1 },
	{ "mla consecutive",             MLA, KV_DTYPE_BFLOAT16,     2, 12, 16, 1, 36, NOPAD,                    64, SLOTS_CONSECUTIVE,     0, 1 },
	{ "mla consecutive block pad",   MLA, KV_DTYPE_BFLOAT16,     2, 12, 16, 1, 36, { .block = 4 },           64, SLOTS_CONSECUTIVE,     0, 1 },
	/* token padding: consecutive slots are not adjacent rows */
	{ "fa token pad",                FA, KV_DTYPE_FLOAT32,       2, 12, 8,  2, 4,  { .token = 2 },           40, SLOTS_CONSECUTIVE,     0, 1 },
	{ "mla token pad",               MLA, KV_DTYPE_FLOAT16,      2, 12, 8,  1, 20, { .token = 4 },           40, SLOTS_SHUFFLED_BLOCKS, 8, 1 },
	/* strided heads: rows_contiguous 0, one copy per head */
	{ "fa head pad",                 FA, KV_DTYPE_BFLOAT16,      2, 12, 16, 4, 32, { .head = 8 },            64, SLOTS_SHUFFLED_BLOCKS, 0, 0 },
	{ "fi head pad fp32",            FI, KV_DTYPE_FLOAT32,       2, 12, 8,  3, 4,  { .head = 2, .plane = 6 },40, SLOTS_CONSECUTIVE,     8, 0 },
	{ "fi head pad fp8",             FI, KV_DTYPE_FLOAT8_E4M3FN, 2, 12, 16, 2, 8,  { .head = 24 },           64, SLOTS_RANDOM,          0, 0 },
	{ "fa one head padded",          FA, KV_DTYPE_BFLOAT16,      2, 12, 16, 1, 64, { .head = 16, .token = -16 }, 64, SLOTS_CONSECUTIVE,     0, 1 },
	/* plane padding and every pad at once */
	{ "fa plane pad",                FA, KV_DTYPE_FLOAT16,       2, 12, 8,  2, 16, { .plane = 40 },          48, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "fa all pads",                 FA, KV_DTYPE_FLOAT16,       2, 12, 8,  2, 16, { 4, 4, 12, 40 },         48, SLOTS_UNALIGNED,       8, 0 },
	/* random slots (no merges) and chunks not aligned to blocks */
	{ "fa random slots",             FA, KV_DTYPE_BFLOAT16,      2, 12, 16, 4, 32, NOPAD,                    64, SLOTS_RANDOM,          0, 1 },
	{ "fi unaligned",                FI, KV_DTYPE_BFLOAT16,      2, 12, 16, 4, 32, NOPAD,                    64, SLOTS_UNALIGNED,       0, 1 },
	{ "mla unaligned",               MLA, KV_DTYPE_FLOAT32,      2, 12, 8,  1, 10, NOPAD,                    40, SLOTS_UNALIGNED,       8, 1 },
	{ "fa partial last block",       FA, KV_DTYPE_BFLOAT16,      2, 12, 16, 4, 32, NOPAD,                    53, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "mla partial last block",      MLA, KV_DTYPE_FLOAT16,      2, 12, 16, 1, 20, NOPAD,                    37, SLOTS_CONSECUTIVE,     8, 1 },
	/* > 256 runs: the run window refills */
	{ "fa 600 random tokens",        FA, KV_DTYPE_FLOAT16,       1, 64, 16, 1, 8,  NOPAD,                   600, SLOTS_RANDOM,          8, 1 },
	{ "fa 600 tokens head pad",      FA, KV_DTYPE_FLOAT16,       1, 64, 16, 2, 4,  { .head = 4 },           600, SLOTS_SHUFFLED_BLOCKS, 0, 0 },
	/* >= 1 MiB: the streaming path, aligned and misaligned bases */
	{ "fa stream bf16",              FA, KV_DTYPE_BFLOAT16,      2, 40, 16, 8, 64, NOPAD,                   256, SLOTS_SHUFFLED_BLOCKS, 0, 1 },
	{ "fa stream misaligned",        FA, KV_DTYPE_BFLOAT16,      2, 40, 16, 8, 64, NOPAD,                   256, SLOTS_UNALIGNED,       8, 1 },
	{ "fi stream head pad",          FI, KV_DTYPE_BFLOAT16,      2, 40, 16, 8, 64, { .head = 4 },           256, SLOTS_SHUFFLED_BLOCKS, 8, 0 },
	{ "mla stream fp8 24B rows",     MLA, KV_DTYPE_UINT8,        8, 600, 16, 1, 24, NOPAD,                 6000, SLOTS_CONSECUTIVE,     8, 1 },
	{ "mla stream fp8 random",       MLA, KV_DTYPE_UINT8,        8, 600, 16, 1, 24, NOPAD,                 6000, SLOTS_RANDOM,          0, 1 },
};

int main(void)
{
	test_layout_init();
	for (size_t i = 0; i < KS_ARRAY_SIZE(cases); i++)
		run_case(&cases[i]);
	CHECK_EQ(cases_run, (int)KS_ARRAY_SIZE(cases));
	return t_result("transfer_host");
}
