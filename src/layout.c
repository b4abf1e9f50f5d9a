/*
 * layout.c - paged KV layout validation and the object size rule.
 */
#include "layout.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "compiler.h"

static const struct {
	const char *name;
	uint32_t bytes;
} dtypes[] = {
	[KV_DTYPE_FLOAT16] = { "float16", 2 },
	[KV_DTYPE_BFLOAT16] = { "bfloat16", 2 },
	[KV_DTYPE_FLOAT32] = { "float32", 4 },
	[KV_DTYPE_FLOAT8_E4M3FN] = { "float8_e4m3fn", 1 },
	[KV_DTYPE_FLOAT8_E5M2] = { "float8_e5m2", 1 },
	[KV_DTYPE_UINT8] = { "uint8", 1 },
	[KV_DTYPE_INT8] = { "int8", 1 },
};

static const char *const kinds[] = {
	[KV_LAYOUT_FLASH_ATTN] = "flash_attn",
	[KV_LAYOUT_FLASHINFER] = "flashinfer",
	[KV_LAYOUT_MLA] = "mla",
};

int kv_dtype_parse(const char *name, size_t len, enum kv_dtype *out)
{
	for (unsigned i = 0; i < KS_ARRAY_SIZE(dtypes); i++) {
		if (strlen(dtypes[i].name) == len && !memcmp(dtypes[i].name, name, len)) {
			*out = (enum kv_dtype)i;
			return 0;
		}
	}
	return -EINVAL;
}

const char *kv_dtype_name(enum kv_dtype d)
{
	return (unsigned)d < KS_ARRAY_SIZE(dtypes) ? dtypes[d].name : "unknown";
}

uint32_t kv_dtype_bytes(enum kv_dtype d)
{
	return (unsigned)d < KS_ARRAY_SIZE(dtypes) ? dtypes[d].bytes : 0;
}

int kv_layout_kind_parse(const char *name, size_t len, enum kv_layout_kind *out)
{
	for (unsigned i = 0; i < KS_ARRAY_SIZE(kinds); i++) {
		if (strlen(kinds[i]) == len && !memcmp(kinds[i], name, len)) {
			*out = (enum kv_layout_kind)i;
			return 0;
		}
	}
	return -EINVAL;
}

const char *kv_layout_kind_name(enum kv_layout_kind k)
{
	return (unsigned)k < KS_ARRAY_SIZE(kinds) ? kinds[k] : "unknown";
}

int kv_layout_infer(const int64_t *shape, uint32_t ndim, enum kv_layout_kind *out)
{
	if (ndim == 3) {
		*out = KV_LAYOUT_MLA;
		return 0;
	}
	if (ndim == 5 && shape[0] == 2) {	/* flash_attn wins ties */
		*out = KV_LAYOUT_FLASH_ATTN;
		return 0;
	}
	if (ndim == 5 && shape[1] == 2) {
		*out = KV_LAYOUT_FLASHINFER;
		return 0;
	}
	return -EINVAL;
}

#define LAYOUT_FAIL(...)                                  \
	do {                                              \
		if (err && errlen)                        \
			snprintf(err, errlen, __VA_ARGS__); \
		return -EINVAL;                           \
	} while (0)

/* Element counts above this are nonsense for a KV cache (and would overflow). */
#define LAYOUT_MAX_DIM (1ll << 32)

int kv_layout_init(struct kv_layout *l, char *err, size_t errlen)
{
	int64_t nb, bs, nh, hs;
	uint64_t last = 0;

	l->elem_bytes = kv_dtype_bytes(l->dtype);
	if (!l->elem_bytes)
		LAYOUT_FAIL("unknown dtype %d", (int)l->dtype);
	if (l->num_layers == 0)
		LAYOUT_FAIL("no layers");
	if (l->ndim != (l->kind == KV_LAYOUT_MLA ? 3u : 5u))
		LAYOUT_FAIL("layout %s needs %u dims, got %u", kv_layout_kind_name(l->kind),
			    l->kind == KV_LAYOUT_MLA ? 3u : 5u, l->ndim);
	for (uint32_t d = 0; d < l->ndim; d++) {
		if (l->shape[d] <= 0 || l->shape[d] > LAYOUT_MAX_DIM)
			LAYOUT_FAIL("shape[%u] = %lld out of range", d, (long long)l->shape[d]);
		if (l->stride[d] < 0 || l->stride[d] > (1ll << 48))
			LAYOUT_FAIL("stride[%u] = %lld out of range", d, (long long)l->stride[d]);
	}
	if (l->stride[l->ndim - 1] != 1)
		LAYOUT_FAIL("last stride must be 1, got %lld", (long long)l->stride[l->ndim - 1]);

	switch (l->kind) {
	case KV_LAYOUT_FLASH_ATTN:	/* [2, NB, BS, NH, HS] */
		if (l->shape[0] != 2)
			LAYOUT_FAIL("flash_attn shape[0] must be 2, got %lld", (long long)l->shape[0]);
		nb = l->shape[1], bs = l->shape[2], nh = l->shape[3], hs = l->shape[4];
		l->plane_stride = l->stride[0];
		l->block_stride = l->stride[1];
		l->token_stride = l->stride[2];
		l->head_stride = l->stride[3];
		l->kv_planes = 2;
		break;
	case KV_LAYOUT_FLASHINFER:	/* [NB, 2, BS, NH, HS] */
		if (l->shape[1] != 2)
			LAYOUT_FAIL("flashinfer shape[1] must be 2, got %lld", (long long)l->shape[1]);
		nb = l->shape[0], bs = l->shape[2], nh = l->shape[3], hs = l->shape[4];
		l->plane_stride = l->stride[1];
		l->block_stride = l->stride[0];
		l->token_stride = l->stride[2];
		l->head_stride = l->stride[3];
		l->kv_planes = 2;
		break;
	case KV_LAYOUT_MLA:	/* [NB, BS, HS] */
		nb = l->shape[0], bs = l->shape[1], nh = 1, hs = l->shape[2];
		l->plane_stride = 0;
		l->block_stride = l->stride[0];
		l->token_stride = l->stride[1];
		l->head_stride = hs;
		l->kv_planes = 1;
		break;
	default:
		LAYOUT_FAIL("unknown layout kind %d", (int)l->kind);
	}
	l->num_blocks = (uint32_t)nb;
	l->block_size = (uint32_t)bs;
	l->num_heads = (uint32_t)nh;
	l->head_size = (uint32_t)hs;
	l->row_bytes = (uint64_t)nh * (uint64_t)hs * l->elem_bytes;
	if (l->row_bytes % 8)
		LAYOUT_FAIL("row of %llu bytes (heads*head_size*elem) is not a multiple of 8",
			    (unsigned long long)l->row_bytes);
	l->rows_contiguous = l->head_stride == hs;

	/* Rows must not overlap: a head is HS contiguous elements, heads must not
	 * overlap each other, and a token's row must not overlap the next token's.
	 * Blocks and planes may interleave in any order (flashinfer does). */
	if (nh > 1 && l->head_stride < hs)
		LAYOUT_FAIL("head stride %lld overlaps a head of %lld elements",
			    (long long)l->head_stride, (long long)hs);
	int64_t row_span = (nh - 1) * l->head_stride + hs;
	if (bs > 1 && l->token_stride < row_span)
		LAYOUT_FAIL("token stride %lld overlaps a row of %lld elements",
			    (long long)l->token_stride, (long long)row_span);
	/* Highest element offset + 1, in bytes: the extent the mapping must cover. */
	last = (uint64_t)(nb - 1) * (uint64_t)l->block_stride +
	       (uint64_t)(bs - 1) * (uint64_t)l->token_stride +
	       (uint64_t)(nh - 1) * (uint64_t)l->head_stride + (uint64_t)(hs - 1);
	if (l->kv_planes == 2)
		last += (uint64_t)l->plane_stride;
	l->extent_bytes = (last + 1) * l->elem_bytes;
	return 0;
}

uint64_t kv_object_bytes(const struct kv_layout *l, uint32_t chunk_tokens)
{
	return (uint64_t)l->kv_planes * l->num_layers * chunk_tokens * l->row_bytes;
}

int kv_layout_same_object(const struct kv_layout *a, const struct kv_layout *b)
{
	return a->kind == b->kind && a->elem_bytes == b->elem_bytes &&
	       a->num_layers == b->num_layers && a->row_bytes == b->row_bytes &&
	       a->kv_planes == b->kv_planes;
}
