/*
 * transfer_host.c - CPU gather/scatter between paged KV and chunk objects.
 *
 * Shapes (protocol.md §5.2, §7), all in elements of l->elem_bytes:
 *   paged layer  flash_attn [2, NB, BS, NH, HS] | flashinfer [NB, 2, BS, NH, HS]
 *                | mla [NB, BS, HS], arbitrary strides, last stride 1
 *   object       [K, NL, C, hidden] dense, K = l->kv_planes, hidden = NH*HS
 *   slots        [C] paged slot (block * BS + offset) of each chunk token
 *
 * Paged element of chunk token t, plane k, head h, dim d of layer i:
 *   layers[i] + (k*plane_stride + (slot/BS)*block_stride + (slot%BS)*token_stride
 *                + h*head_stride + d) * elem_bytes
 *
 * ALGORITHM: the element offset of a token's row depends only on its slot, not
 * on the layer or plane, because every layer shares one layout. So the slots
 * are first turned into "runs" - maximal groups of consecutive chunk tokens
 * whose rows are also consecutive in paged memory (consecutive slots of one
 * block with token_stride == hidden, which is vLLM's unpadded layout; or even
 * consecutive blocks when block_stride == BS*hidden) - and then every (plane,
 * layer) pair replays the same run list with one copy per run. A run of a
 * 16-token bf16 Llama block is 32 KiB, which memcpy moves at full bandwidth,
 * whereas one copy per 2 KiB row pays the call and the page-walk setup 16x.
 * Strided heads (rows_contiguous == 0) cannot merge: one copy per head.
 *
 * Runs are built in a bounded window on the stack (XFER_HOST_MAX_RUNS), so no
 * allocation happens on the data path and any ntokens works; the common
 * 256-token chunk needs 1-256 runs and one window.
 *
 * Large transfers stream: the destination (a pool object on STORE, the
 * client's paged buffer on RETRIEVE) is not read again by this CPU, so
 * non-temporal stores skip the read-for-ownership of every destination line
 * (a third of the memory traffic of a cached copy) and do not evict the LLC.
 * glibc's memcpy makes the same choice for one big copy, but never for our
 * 32 KiB pieces, which are far below its threshold.
 *
 * Thread safety: no shared state; concurrent calls are fine as long as their
 * destinations do not overlap.
 */
#include "transfer_host.h"

#include <assert.h>
#include <stddef.h>
#include <string.h>

#include "compiler.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define XFER_HOST_HAVE_STREAM 1
#else
#define XFER_HOST_HAVE_STREAM 0
#endif

/*
 * Runs per window: 256 covers a 256-token chunk even when no two slots are
 * adjacent, in 4 KiB of stack. Longer chunks simply take more windows.
 */
#define XFER_HOST_MAX_RUNS 256

/*
 * Stream when the whole transfer is at least this big. Below it the data fits
 * in a core's L2 (>= 1 MiB on current x86 server parts), where cached stores
 * are as fast and the object may still be hot for a following hash or send.
 */
#define XFER_HOST_STREAM_MIN_BYTES (1u << 20)

/*
 * Pieces shorter than this are memcpy'd even when streaming: the 16-byte
 * alignment prologue and the loop would cost more than the line fill saved.
 */
#define XFER_HOST_STREAM_MIN_PIECE 128u

/* n tokens starting at chunk token t; their first row starts @off elements
 * from plane 0 of each layer's base. */
struct xfer_run {
	uint32_t t;
	uint32_t n;
	int64_t off;
};

/* ---- copy primitives ---------------------------------------------------- */

#if XFER_HOST_HAVE_STREAM
/*
 * memcpy with non-temporal 16-byte stores. Unaligned loads, aligned stores:
 * the head up to the first 16-byte boundary and the tail go through memcpy.
 * The caller issues _mm_sfence() once after the last piece (streamed stores
 * are weakly ordered, so without it another thread could see the reply before
 * the bytes).
 */
static void copy_stream(unsigned char *restrict dst, const unsigned char *restrict src, size_t n)
{
	size_t head = (size_t)(-(uintptr_t)dst & 15u);

	if (n < XFER_HOST_STREAM_MIN_PIECE) {
		memcpy(dst, src, n);
		return;
	}
	memcpy(dst, src, head);
	dst += head, src += head, n -= head;
	/* 64 bytes (one line) per iteration: four loads in flight, and the line's
	 * write-combining buffer is filled completely before it drains. */
	for (; n >= 64; n -= 64, dst += 64, src += 64) {
		__m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + 0));
		__m128i b = _mm_loadu_si128((const __m128i *)(const void *)(src + 16));
		__m128i c = _mm_loadu_si128((const __m128i *)(const void *)(src + 32));
		__m128i d = _mm_loadu_si128((const __m128i *)(const void *)(src + 48));

		_mm_stream_si128((__m128i *)(void *)(dst + 0), a);
		_mm_stream_si128((__m128i *)(void *)(dst + 16), b);
		_mm_stream_si128((__m128i *)(void *)(dst + 32), c);
		_mm_stream_si128((__m128i *)(void *)(dst + 48), d);
	}
	for (; n >= 16; n -= 16, dst += 16, src += 16)
		_mm_stream_si128((__m128i *)(void *)dst,
				 _mm_loadu_si128((const __m128i *)(const void *)src));
	memcpy(dst, src, n);
}

static inline void copy_piece(void *restrict dst, const void *restrict src, size_t n, int stream)
{
	if (stream)
		copy_stream(dst, src, n);
	else
		memcpy(dst, src, n);
}

static inline void copy_fence(int stream)
{
	if (stream)
		_mm_sfence();
}
#else
static inline void copy_piece(void *restrict dst, const void *restrict src, size_t n, int stream)
{
	(void)stream;
	memcpy(dst, src, n);
}

static inline void copy_fence(int stream)
{
	(void)stream;
}
#endif

/* ---- runs --------------------------------------------------------------- */

/* Element offset of @slot's row (plane 0, head 0) from a layer's base. */
static inline int64_t slot_offset(const struct kv_layout *l, int64_t slot)
{
	int64_t bs = l->block_size;

	assert(slot >= 0 && slot < kv_num_slots(l));	/* callers validated */
	return (slot / bs) * l->block_stride + (slot % bs) * l->token_stride;
}

/*
 * A row is one contiguous piece when heads are packed, or when there is only
 * one head (then head_stride is irrelevant; layout.c leaves rows_contiguous 0
 * if a 1-head tensor has an odd head stride).
 */
static inline int row_is_one_piece(const struct kv_layout *l)
{
	return l->rows_contiguous || l->num_heads == 1;
}

/*
 * Group chunk tokens [t, end) into runs, at most XFER_HOST_MAX_RUNS.
 *   slots : [ntokens] paged slots
 *   runs  : [XFER_HOST_MAX_RUNS] out
 * Returns the number of runs and sets *next to the first token not covered.
 * Tokens merge only when rows are one piece each and the next row starts
 * exactly where the run ends, so a merged run is one contiguous byte range.
 */
static uint32_t build_runs(const struct kv_layout *l, const int64_t *slots, uint32_t t,
			   uint32_t end, struct xfer_run *runs, uint32_t *next)
{
	int64_t row_elems = (int64_t)(l->row_bytes / l->elem_bytes);
	int merge = row_is_one_piece(l);
	uint32_t nr = 0;

	while (t < end && nr < XFER_HOST_MAX_RUNS) {
		struct xfer_run *r = &runs[nr++];

		r->t = t;
		r->n = 1;
		r->off = slot_offset(l, slots[t]);
		for (t++; merge && t < end; t++) {
			/* Cheap test first: only consecutive slots can be adjacent in
			 * the common layouts, and it skips the division otherwise. */
			if (slots[t] != slots[t - 1] + 1)
				break;
			if (slot_offset(l, slots[t]) != r->off + (int64_t)r->n * row_elems)
				break;
			r->n++;
		}
	}
	*next = t;
	return nr;
}

/* ---- gather / scatter --------------------------------------------------- */

/*
 * One (plane, layer) pair over a window of runs; @paged points at the layer's
 * plane (base + k*plane_stride elements), @obj at [k][i][0][0] of the object.
 * Both directions share it: @to_obj picks which side is the destination.
 */
static void copy_runs(const struct kv_layout *l, unsigned char *paged, unsigned char *obj,
		      const struct xfer_run *runs, uint32_t nr, int to_obj, int stream)
{
	const size_t eb = l->elem_bytes;
	const size_t row = (size_t)l->row_bytes;

	if (row_is_one_piece(l)) {
		for (uint32_t r = 0; r < nr; r++) {
			unsigned char *p = paged + (size_t)runs[r].off * eb;
			unsigned char *o = obj + (size_t)runs[r].t * row;
			size_t n = (size_t)runs[r].n * row;

			if (to_obj)
				copy_piece(o, p, n, stream);
			else
				copy_piece(p, o, n, stream);
		}
		return;
	}
	/* Strided heads: runs are single tokens; one copy per head. */
	const size_t head_bytes = (size_t)l->head_size * eb;
	const size_t hstride_bytes = (size_t)l->head_stride * eb;

	for (uint32_t r = 0; r < nr; r++) {
		unsigned char *p = paged + (size_t)runs[r].off * eb;
		unsigned char *o = obj + (size_t)runs[r].t * row;

		for (uint32_t h = 0; h < l->num_heads; h++) {
			if (to_obj)
				copy_piece(o, p, head_bytes, stream);
			else
				copy_piece(p, o, head_bytes, stream);
			p += hstride_bytes;
			o += head_bytes;
		}
	}
}

/*
 * Shared driver: tokens [first, ntokens) of an ntokens-token object.
 *   layers : [NL] layer bases
 *   slots  : [ntokens]
 *   obj    : [K, NL, ntokens, hidden]
 * Loop order: window, plane, layer, run - the object is written (gather) or
 * read (scatter) front to back within each window, and a window is the whole
 * chunk unless more than XFER_HOST_MAX_RUNS runs are needed.
 */
static void xfer_host_copy(const struct kv_layout *l, void *const *layers, const int64_t *slots,
			   uint32_t ntokens, uint32_t first, unsigned char *obj, int to_obj)
{
	struct xfer_run runs[XFER_HOST_MAX_RUNS];
	const size_t eb = l->elem_bytes;
	const size_t plane_obj_bytes = (size_t)ntokens * (size_t)l->row_bytes;	/* one [C, hidden] */
	const uint64_t total = (uint64_t)(ntokens - first) * l->row_bytes * l->kv_planes *
			       l->num_layers;
	const int stream = XFER_HOST_HAVE_STREAM && total >= XFER_HOST_STREAM_MIN_BYTES;
	uint32_t t = first;

	while (t < ntokens) {
		uint32_t next;
		uint32_t nr = build_runs(l, slots, t, ntokens, runs, &next);

		for (uint32_t k = 0; k < l->kv_planes; k++) {
			for (uint32_t i = 0; i < l->num_layers; i++) {
				unsigned char *paged = (unsigned char *)layers[i] +
						       (size_t)((int64_t)k * l->plane_stride) * eb;
				unsigned char *o = obj + ((size_t)k * l->num_layers + i) *
							 plane_obj_bytes;

				copy_runs(l, paged, o, runs, nr, to_obj, stream);
			}
		}
		t = next;
	}
	copy_fence(stream);
}

void xfer_host_gather(const struct kv_layout *l, void *const *layers, const int64_t *slots,
		      uint32_t ntokens, void *obj)
{
	xfer_host_copy(l, layers, slots, ntokens, 0, obj, 1);
}

void xfer_host_scatter(const struct kv_layout *l, void *const *layers, const int64_t *slots,
		       uint32_t ntokens, uint32_t skip_tokens, const void *obj)
{
	if (skip_tokens >= ntokens)
		return;
	/* The object is only read on this path; the shared driver takes a
	 * mutable pointer because it serves both directions. */
	xfer_host_copy(l, layers, slots, ntokens, skip_tokens, (unsigned char *)(uintptr_t)obj, 0);
}
