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

uint32_t kv_dtype_bytes_by_name(const char *name)
{
	enum kv_dtype d;

	return name && kv_dtype_parse(name, strlen(name), &d) == 0 ? kv_dtype_bytes(d) : 0;
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

/* acc += a * b, failing instead of wrapping. Returns 1 on success. */
static int add_mul_u64(uint64_t *acc, uint64_t a, uint64_t b)
{
	uint64_t p;

	return !__builtin_mul_overflow(a, b, &p) && !__builtin_add_overflow(*acc, p, acc);
}

/* Largest extent a registration may describe; keeps every later offset in range. */
#define LAYOUT_MAX_EXTENT_BYTES (1ull << 48)

/*
 * No two elements may share an address: sort the dims (with size > 1) by
 * stride and require each stride to step over everything the smaller dims
 * span. Accepts any dim order (vLLM's HND FlashInfer layout puts heads
 * outside tokens); rejects aliasing such as K and V at the same address.
 */
static int dims_disjoint(const uint64_t *shape, const uint64_t *stride, int n)
{
	int idx[KV_MAX_DIMS + 1], m = 0;
	uint64_t span = 1;	/* elements covered by the dims taken so far */

	for (int i = 0; i < n; i++)
		if (shape[i] > 1)
			idx[m++] = i;
	for (int i = 1; i < m; i++)	/* insertion sort by stride: m <= 6 */
		for (int j = i; j > 0 && stride[idx[j]] < stride[idx[j - 1]]; j--) {
			int t = idx[j];

			idx[j] = idx[j - 1];
			idx[j - 1] = t;
		}
	for (int i = 0; i < m; i++) {
		uint64_t st = stride[idx[i]];

		if (st < span)
			return 0;
		span = 1;
		/* span of dims 0..i: the last element's offset + 1 */
		for (int k = 0; k <= i; k++)
			if (!add_mul_u64(&span, shape[idx[k]] - 1, stride[idx[k]]))
				return 0;
	}
	return 1;
}

int kv_layout_init(struct kv_layout *l, char *err, size_t errlen)
{
	uint64_t nb, bs, nh, hs, last, ext;

	l->elem_bytes = kv_dtype_bytes(l->dtype);
	if (!l->elem_bytes)
		LAYOUT_FAIL("unknown dtype %d", (int)l->dtype);
	if (l->num_layers == 0)
		LAYOUT_FAIL("no layers");
	if (l->ndim != (l->kind == KV_LAYOUT_MLA ? 3u : 5u))
		LAYOUT_FAIL("layout %s needs %u dims, got %u", kv_layout_kind_name(l->kind),
			    l->kind == KV_LAYOUT_MLA ? 3u : 5u, l->ndim);
	for (uint32_t d = 0; d < l->ndim; d++) {
		if (l->shape[d] <= 0 || l->shape[d] > (int64_t)UINT32_MAX)
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
		nb = (uint64_t)l->shape[1], bs = (uint64_t)l->shape[2];
		nh = (uint64_t)l->shape[3], hs = (uint64_t)l->shape[4];
		l->plane_stride = l->stride[0];
		l->block_stride = l->stride[1];
		l->token_stride = l->stride[2];
		l->head_stride = l->stride[3];
		l->kv_planes = 2;
		break;
	case KV_LAYOUT_FLASHINFER:	/* [NB, 2, BS, NH, HS] */
		if (l->shape[1] != 2)
			LAYOUT_FAIL("flashinfer shape[1] must be 2, got %lld", (long long)l->shape[1]);
		nb = (uint64_t)l->shape[0], bs = (uint64_t)l->shape[2];
		nh = (uint64_t)l->shape[3], hs = (uint64_t)l->shape[4];
		l->plane_stride = l->stride[1];
		l->block_stride = l->stride[0];
		l->token_stride = l->stride[2];
		l->head_stride = l->stride[3];
		l->kv_planes = 2;
		break;
	case KV_LAYOUT_MLA:	/* [NB, BS, HS] */
		nb = (uint64_t)l->shape[0], bs = (uint64_t)l->shape[1];
		nh = 1, hs = (uint64_t)l->shape[2];
		l->plane_stride = 0;
		l->block_stride = l->stride[0];
		l->token_stride = l->stride[1];
		l->head_stride = (int64_t)hs;
		l->kv_planes = 1;
		break;
	default:
		LAYOUT_FAIL("unknown layout kind %d", (int)l->kind);
	}

	/* Highest element offset + 1, in bytes, without wrapping: the extent the
	 * mapping must cover. */
	last = hs - 1;
	if (!add_mul_u64(&last, nb - 1, (uint64_t)l->block_stride) ||
	    !add_mul_u64(&last, bs - 1, (uint64_t)l->token_stride) ||
	    !add_mul_u64(&last, nh - 1, (uint64_t)l->head_stride) ||
	    !add_mul_u64(&last, l->kv_planes - 1, (uint64_t)l->plane_stride) ||
	    __builtin_mul_overflow(last + 1, (uint64_t)l->elem_bytes, &ext) ||
	    ext > LAYOUT_MAX_EXTENT_BYTES)
		LAYOUT_FAIL("layout extent exceeds %llu bytes",
			    (unsigned long long)LAYOUT_MAX_EXTENT_BYTES);
	l->extent_bytes = ext;

	{
		uint64_t shp[5] = { l->kv_planes, nb, bs, nh, hs };
		uint64_t str[5] = { (uint64_t)l->plane_stride, (uint64_t)l->block_stride,
				    (uint64_t)l->token_stride, (uint64_t)l->head_stride, 1 };

		if (!dims_disjoint(shp, str, 5))
			LAYOUT_FAIL("strides make elements overlap (planes %lld, blocks %lld, "
				    "tokens %lld, heads %lld)", (long long)l->plane_stride,
				    (long long)l->block_stride, (long long)l->token_stride,
				    (long long)l->head_stride);
	}
	l->num_blocks = (uint32_t)nb;
	l->block_size = (uint32_t)bs;
	l->num_heads = (uint32_t)nh;
	l->head_size = (uint32_t)hs;
	/* nh * hs <= extent / elem_bytes <= 2^48: no wrap. */
	l->row_bytes = nh * hs * l->elem_bytes;
	if (l->row_bytes % 8)
		LAYOUT_FAIL("row of %llu bytes (heads*head_size*elem) is not a multiple of 8",
			    (unsigned long long)l->row_bytes);
	/* One memcpy per row: heads back to back (a single head always is). */
	l->rows_contiguous = nh == 1 || (uint64_t)l->head_stride == hs;
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
