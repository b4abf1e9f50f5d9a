/*
 * layout.h - paged KV buffer layouts and the stored object format.
 *
 * A registered KV cache is one tensor per layer, all with the same layout:
 *   flash_attn  [2, NB, BS, NH, HS]
 *   flashinfer  [NB, 2, BS, NH, HS]
 *   mla         [NB, BS, HS]
 * with arbitrary element strides (last stride 1). A stored object is one
 * chunk of C tokens, one rank, all layers, dense C-order:
 *   [K, NL, C, hidden]   K = 2 (K then V) or 1 (MLA), hidden = NH*HS or HS
 * (protocol.md §7).
 */
#ifndef KS_LAYOUT_H
#define KS_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

enum kv_layout_kind { KV_LAYOUT_FLASH_ATTN = 0, KV_LAYOUT_FLASHINFER, KV_LAYOUT_MLA };

enum kv_dtype {
	KV_DTYPE_FLOAT16 = 0,
	KV_DTYPE_BFLOAT16,
	KV_DTYPE_FLOAT32,
	KV_DTYPE_FLOAT8_E4M3FN,
	KV_DTYPE_FLOAT8_E5M2,
	KV_DTYPE_UINT8,
	KV_DTYPE_INT8,
};

#define KV_MAX_DIMS 5

struct kv_layout {
	enum kv_layout_kind kind;
	enum kv_dtype dtype;
	uint32_t elem_bytes;
	uint32_t num_layers;	/* NL: tensors registered */
	uint32_t num_blocks;	/* NB */
	uint32_t block_size;	/* BS: tokens per block */
	uint32_t num_heads;	/* NH (1 for MLA) */
	uint32_t head_size;	/* HS */
	uint32_t ndim;		/* 5, or 3 for MLA */
	int64_t shape[KV_MAX_DIMS];
	int64_t stride[KV_MAX_DIMS];	/* elements */
	/* derived by kv_layout_init() */
	uint32_t kv_planes;	/* K: 2, or 1 for MLA */
	uint64_t row_bytes;	/* hidden * elem_bytes: one token of one plane */
	int64_t plane_stride;	/* elements between K and V of a slot (0 for MLA) */
	int64_t block_stride;	/* elements between blocks */
	int64_t token_stride;	/* elements between tokens of a block */
	int64_t head_stride;	/* elements between heads */
	int rows_contiguous;	/* head_stride == HS: a row is one memcpy */
	uint64_t extent_bytes;	/* bytes from element 0 to one past the last element */
};

/* "float16" ... -> dtype; -EINVAL for unknown names. */
int kv_dtype_parse(const char *name, size_t len, enum kv_dtype *out);
const char *kv_dtype_name(enum kv_dtype d);
uint32_t kv_dtype_bytes(enum kv_dtype d);
/* Bytes per element of the dtype named @name (NUL-terminated), 0 if unknown. */
uint32_t kv_dtype_bytes_by_name(const char *name);
/* "flash_attn" | "flashinfer" | "mla" -> kind; -EINVAL otherwise. */
int kv_layout_kind_parse(const char *name, size_t len, enum kv_layout_kind *out);
const char *kv_layout_kind_name(enum kv_layout_kind k);

/*
 * Infer the layout kind from a shape (protocol.md §5.2): 3 dims -> mla;
 * shape[0] == 2 -> flash_attn; shape[1] == 2 -> flashinfer. -EINVAL if none.
 */
int kv_layout_infer(const int64_t *shape, uint32_t ndim, enum kv_layout_kind *out);

/*
 * Fill the derived fields of @l from kind, dtype, ndim, shape, stride and
 * num_layers. Returns 0 or -EINVAL with a reason in @err: dims that do not
 * match the kind, a zero or negative size, negative strides, last stride not
 * 1, overlapping rows, or a row (hidden * elem_bytes) not a multiple of 8.
 */
int kv_layout_init(struct kv_layout *l, char *err, size_t errlen);

/* Bytes of one stored object of @chunk_tokens tokens: K * NL * C * row_bytes. */
uint64_t kv_object_bytes(const struct kv_layout *l, uint32_t chunk_tokens);
/* Slots in the paged buffer: NB * BS. */
static inline int64_t kv_num_slots(const struct kv_layout *l)
{
	return (int64_t)l->num_blocks * l->block_size;
}
/* True when two registrations would produce interchangeable objects. */
int kv_layout_same_object(const struct kv_layout *a, const struct kv_layout *b);

#endif /* KS_LAYOUT_H */
