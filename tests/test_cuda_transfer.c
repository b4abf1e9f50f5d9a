/* Description: CUDA transfer engine: byte-exact GPU -> pinned pool -> GPU round trips for every layout, dtype size and path, slot checks before launch, bounded waits, and a second process's buffers through CUDA IPC that survive its SIGKILL. Labels: gpu */
/*
 * Everything is checked against an independent element-by-element reference
 * written from protocol.md §7 (full 5-D shape and strides), never against
 * the engine's own index arithmetic. Buffers are filled with pseudo-random
 * bytes and destinations poisoned first, so an unwritten or misplaced row
 * shows up. Run as `test_cuda_transfer --ipc-child ...` it is the exporting
 * process of the IPC cases.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "transfer_cuda.h"

#ifndef KVSTASH_HAVE_CUDA
int main(void)
{
	fprintf(stderr, "cuda_transfer: built without CUDA, skipped\n");
	return T_EXIT_SKIP;
}
#else

#include <cuda_runtime_api.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TEST_POOL_BYTES (400u << 20)
#define OBJ_ALIGN 4096u

static uint8_t *g_pool;		/* registered host pool */
static size_t g_pool_used;

#define CUDA_OK(call)                                                                    \
	do {                                                                             \
		cudaError_t _e = (call);                                                 \
		if (_e != cudaSuccess) {                                                 \
			fprintf(stderr, "FATAL %s:%d: %s: %s\n", __FILE__, __LINE__, #call, \
				cudaGetErrorString(_e));                                 \
			exit(T_EXIT_FAIL);                                               \
		}                                                                        \
	} while (0)

/*
 * Host -> device copy that has landed when it returns. cudaMemcpy from
 * pageable memory may return while its DMA is still running, and the ctx's
 * streams are non-blocking, so nothing else orders a job after it (an
 * engine orders its writes with the event or semaphore it passes instead).
 */
static void upload(void *dev, const void *host, size_t bytes)
{
	CUDA_OK(cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice));
	CUDA_OK(cudaDeviceSynchronize());
}

static uint64_t splitmix(uint64_t *s)
{
	uint64_t x = (*s += 0x9e3779b97f4a7c15ull);

	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t fnv1a(const uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

static void *pool_take(size_t bytes, size_t misalign)
{
	size_t off = (g_pool_used + OBJ_ALIGN - 1) / OBJ_ALIGN * OBJ_ALIGN + misalign;

	REQUIRE(off + bytes + OBJ_ALIGN <= TEST_POOL_BYTES);
	g_pool_used = off + bytes;
	return g_pool + off;
}

/* ---- the reference (protocol.md §7) ------------------------------------------ */

struct tcase {
	enum kv_layout_kind kind;
	enum kv_dtype dtype;
	uint32_t NL, NB, BS, NH, HS;
	uint32_t head_pad;	/* extra elements between heads (non-contiguous rows) */
	uint32_t block_pad;	/* extra elements between blocks */
	uint32_t ntokens, C;
	uint32_t skip;
	uint32_t misalign;	/* byte offset of every layer base and object */
	enum xfer_cuda_path path;
	const char *name;
};

static void make_layout(const struct tcase *tc, struct kv_layout *l)
{
	char err[128];
	int64_t hs = tc->HS, hstr = tc->HS + tc->head_pad;
	int64_t tok = (int64_t)tc->NH * hstr;

	memset(l, 0, sizeof(*l));
	l->kind = tc->kind;
	l->dtype = tc->dtype;
	l->num_layers = tc->NL;
	if (tc->kind == KV_LAYOUT_MLA) {
		int64_t blk = tc->BS * (hs + tc->head_pad) + tc->block_pad;

		l->ndim = 3;
		l->shape[0] = tc->NB, l->shape[1] = tc->BS, l->shape[2] = hs;
		l->stride[0] = blk, l->stride[1] = hs + tc->head_pad, l->stride[2] = 1;
	} else {
		int64_t blk = tc->BS * tok + tc->block_pad;

		l->ndim = 5;
		if (tc->kind == KV_LAYOUT_FLASH_ATTN) {	/* [2, NB, BS, NH, HS] */
			l->shape[0] = 2, l->shape[1] = tc->NB;
			l->stride[1] = blk, l->stride[0] = blk * tc->NB;
		} else {				/* [NB, 2, BS, NH, HS] */
			l->shape[0] = tc->NB, l->shape[1] = 2;
			l->stride[1] = blk, l->stride[0] = 2 * blk;
		}
		l->shape[2] = tc->BS, l->shape[3] = tc->NH, l->shape[4] = hs;
		l->stride[2] = tok, l->stride[3] = hstr, l->stride[4] = 1;
	}
	if (kv_layout_init(l, err, sizeof(err))) {
		fprintf(stderr, "FATAL %s: layout: %s\n", tc->name, err);
		exit(T_EXIT_FAIL);
	}
}

/* Element offset of [k, slot, h, d] in one layer, straight from shape/stride. */
static int64_t ref_elem(const struct kv_layout *l, uint32_t k, int64_t slot, uint32_t h, uint32_t d)
{
	int64_t blk = slot / l->block_size, off = slot % l->block_size;
	const int64_t *s = l->stride;

	switch (l->kind) {
	case KV_LAYOUT_FLASH_ATTN:
		return k * s[0] + blk * s[1] + off * s[2] + h * s[3] + d * s[4];
	case KV_LAYOUT_FLASHINFER:
		return blk * s[0] + k * s[1] + off * s[2] + h * s[3] + d * s[4];
	default:
		return blk * s[0] + off * s[1] + d * s[2];
	}
}

/*
 * Copy between a host mirror of the paged layers and the chunk objects,
 * element by element. @to_obj: paged -> objects, else objects -> paged for
 * tokens >= @skip.
 *   mirror : [NL][layer_bytes] host copy of the device layers
 *   objs   : [nchunks] objects, dense [K, NL, n_c, hidden]
 */
static void ref_copy(const struct kv_layout *l, uint8_t *mirror, size_t layer_bytes,
		     size_t misalign, const int64_t *slots, uint32_t ntokens, uint32_t C,
		     uint8_t *const *objs, int to_obj, uint32_t skip)
{
	const uint32_t eb = l->elem_bytes, K = l->kv_planes, NL = l->num_layers;
	const uint32_t hid = l->num_heads * l->head_size;

	for (uint32_t c = 0; c * C < ntokens; c++) {
		uint32_t n = ntokens - c * C < C ? ntokens - c * C : C;

		for (uint32_t k = 0; k < K; k++)
			for (uint32_t ly = 0; ly < NL; ly++)
				for (uint32_t t = 0; t < n; t++) {
					uint32_t tok = c * C + t;

					if (!to_obj && tok < skip)
						continue;
					for (uint32_t h = 0; h < l->num_heads; h++)
						for (uint32_t d = 0; d < l->head_size; d++) {
							uint8_t *p = mirror + ly * layer_bytes + misalign +
								     ref_elem(l, k, slots[tok], h, d) * eb;
							uint8_t *o = objs[c] +
								     ((((size_t)k * NL + ly) * n + t) * hid +
								      (size_t)h * l->head_size + d) * eb;
							if (to_obj)
								memcpy(o, p, eb);
							else
								memcpy(p, o, eb);
						}
				}
	}
}

static void fill_random(uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t s = seed;

	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = splitmix(&s);

		memcpy(p + i, &v, n - i < 8 ? n - i : 8);
	}
}

/* Random distinct block ids -> slots of a range of @ntokens tokens. */
static void make_slots(const struct kv_layout *l, uint32_t ntokens, uint64_t seed, int64_t *slots)
{
	uint32_t nb = l->num_blocks;
	uint32_t *ids = malloc(nb * sizeof(*ids));
	uint64_t s = seed;

	REQUIRE(ids);
	for (uint32_t i = 0; i < nb; i++)
		ids[i] = i;
	for (uint32_t i = nb - 1; i > 0; i--) {	/* Fisher-Yates: non-contiguous blocks */
		uint32_t j = (uint32_t)(splitmix(&s) % (i + 1));
		uint32_t x = ids[i];

		ids[i] = ids[j], ids[j] = x;
	}
	for (uint32_t t = 0; t < ntokens; t++)
		slots[t] = (int64_t)ids[t / l->block_size] * l->block_size + t % l->block_size;
	free(ids);
}

/* ---- round trips ---------------------------------------------------------------- */

static size_t first_diff(const uint8_t *a, const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (a[i] != b[i])
			return i;
	return (size_t)-1;
}

/*
 * STORE from random paged layers into poisoned objects (checked against the
 * reference, guard bytes untouched), then RETRIEVE those objects into a
 * poisoned copy of the layers with tc->skip (checked in full: written rows,
 * skipped rows, padding, unused blocks).
 */
static void round_trip(struct xfer_cuda_ctx *ctx, const struct tcase *tc, uint64_t seed)
{
	struct kv_layout l;
	make_layout(tc, &l);
	const size_t layer_bytes = (l.extent_bytes + tc->misalign + 255) / 256 * 256;
	const size_t dev_bytes = layer_bytes * tc->NL;
	const uint32_t nchunks = (tc->ntokens + tc->C - 1) / tc->C;
	uint8_t *mirror = malloc(dev_bytes), *want = malloc(dev_bytes), *got = malloc(dev_bytes);
	int64_t *slots = malloc(tc->ntokens * sizeof(*slots));
	uint8_t **objs = calloc(nchunks, sizeof(*objs)), **ref = calloc(nchunks, sizeof(*ref));
	size_t *obj_bytes = calloc(nchunks, sizeof(*obj_bytes));
	void **layers = calloc(tc->NL, sizeof(*layers));
	uint8_t *dev = NULL;
	size_t pool_mark = g_pool_used;
	int rc;

	REQUIRE(mirror && want && got && slots && objs && ref && obj_bytes && layers);
	CUDA_OK(cudaMalloc((void **)&dev, dev_bytes));
	for (uint32_t i = 0; i < tc->NL; i++)
		layers[i] = dev + i * layer_bytes + tc->misalign;
	fill_random(mirror, dev_bytes, seed);
	upload(dev, mirror, dev_bytes);
	make_slots(&l, tc->ntokens, seed ^ 0x5107, slots);
	for (uint32_t c = 0; c < nchunks; c++) {
		uint32_t n = tc->ntokens - c * tc->C < tc->C ? tc->ntokens - c * tc->C : tc->C;

		obj_bytes[c] = (size_t)l.kv_planes * tc->NL * n * l.row_bytes;
		objs[c] = pool_take(obj_bytes[c] + 64, tc->misalign);	/* + 64 guard */
		memset(objs[c], 0xA5, obj_bytes[c] + 64);
		ref[c] = malloc(obj_bytes[c]);
		REQUIRE(ref[c]);
	}
	ref_copy(&l, mirror, layer_bytes, tc->misalign, slots, tc->ntokens, tc->C, ref, 1, 0);

	struct xfer_cuda_job job = {
		.layout = &l,
		.layers = layers,
		.slots = slots,
		.ntokens = tc->ntokens,
		.chunk_tokens = tc->C,
		.objs = (void *const *)objs,
		.timeout_ms = 10000,
		.path = tc->path,
	};
	rc = xfer_cuda_store(ctx, &job);
	CHECK_EQ(rc, 0);
	for (uint32_t c = 0; c < nchunks && !rc; c++) {
		size_t d = first_diff(objs[c], ref[c], obj_bytes[c]);

		if (d != (size_t)-1) {
			fprintf(stderr, "FAIL %s: store chunk %u differs at byte %zu of %zu\n",
				tc->name, c, d, obj_bytes[c]);
			t_failures++;
		}
		for (int g = 0; g < 64; g++)
			if (objs[c][obj_bytes[c] + g] != 0xA5) {
				fprintf(stderr, "FAIL %s: store wrote past chunk %u\n", tc->name, c);
				t_failures++;
				break;
			}
	}

	/* RETRIEVE into poisoned layers; the expected image is the poison with
	 * tokens >= skip overwritten from the (verified) objects. */
	fill_random(want, dev_bytes, seed ^ 0xdead);
	upload(dev, want, dev_bytes);
	ref_copy(&l, want, layer_bytes, tc->misalign, slots, tc->ntokens, tc->C, ref, 0, tc->skip);
	/* Fully skipped chunks may be passed as NULL. */
	for (uint32_t c = 0; c < nchunks; c++)
		if ((c + 1) * tc->C <= tc->skip)
			objs[c] = NULL;
	job.skip_tokens = tc->skip;
	rc = xfer_cuda_retrieve(ctx, &job);
	CHECK_EQ(rc, 0);
	CUDA_OK(cudaMemcpy(got, dev, dev_bytes, cudaMemcpyDeviceToHost));
	size_t d = first_diff(got, want, dev_bytes);
	if (!rc && d != (size_t)-1) {
		fprintf(stderr, "FAIL %s: retrieve differs at layer %zu byte %zu\n", tc->name,
			d / layer_bytes, d % layer_bytes);
		t_failures++;
	}
	CHECK(!xfer_cuda_ctx_failed(ctx));

	CUDA_OK(cudaFree(dev));
	for (uint32_t c = 0; c < nchunks; c++)
		free(ref[c]);
	free(mirror), free(want), free(got), free(slots), free(objs), free(ref);
	free(obj_bytes), free(layers);
	g_pool_used = pool_mark;
}

static void test_round_trips(struct xfer_cuda_ctx *ctx, struct xfer_cuda_ctx *tiny)
{
	static const enum kv_layout_kind kinds[] = { KV_LAYOUT_FLASH_ATTN, KV_LAYOUT_FLASHINFER,
						     KV_LAYOUT_MLA };
	static const enum kv_dtype dtypes[] = { KV_DTYPE_BFLOAT16, KV_DTYPE_FLOAT32,
						KV_DTYPE_FLOAT8_E4M3FN };
	static const enum xfer_cuda_path paths[] = { XFER_CUDA_PATH_ZEROCOPY, XFER_CUDA_PATH_STAGED,
						     XFER_CUDA_PATH_DEFAULT };
	unsigned n = 0;

	for (unsigned ki = 0; ki < 3; ki++)
		for (unsigned di = 0; di < 3; di++)
			for (unsigned pi = 0; pi < 3; pi++)
				for (unsigned v = 0; v < 4; v++) {
					struct tcase tc = {
						.kind = kinds[ki], .dtype = dtypes[di],
						.NL = 3, .NB = 24, .BS = 16, .NH = 2, .HS = 40,
						.ntokens = 75, .C = 32, .path = paths[pi],
					};
					char name[128];

					if (tc.kind == KV_LAYOUT_MLA)
						tc.NH = 1, tc.HS = 72;
					/* v0: packed rows, partial last block and chunk, skip
					 *     inside chunk 0;
					 * v1: padded heads and blocks, BS 12, skip past chunk 0,
					 *     misaligned bases (narrow copy words);
					 * v2: one chunk per block, skip inside the last block;
					 * v3: a table too big to travel inline. */
					if (v == 1) {
						tc.head_pad = 4, tc.block_pad = 8, tc.BS = 12;
						tc.C = 24, tc.ntokens = 61, tc.skip = 30;
						tc.misalign = 2 * (di + 1) % 8;	/* 2, 4, 6 */
						if (tc.dtype == KV_DTYPE_FLOAT8_E4M3FN)
							tc.misalign = 1;
					} else if (v == 2) {
						tc.C = 16, tc.ntokens = 64, tc.skip = 60;
					} else if (v == 3) {
						/* > 480 table entries: the device-side
						 * table instead of the inline one. */
						tc.NB = 40, tc.C = 64, tc.ntokens = 520;
						tc.skip = 130;
					} else {
						tc.skip = 5;
					}
					snprintf(name, sizeof(name), "%s/%s/%s/v%u",
						 kv_layout_kind_name(tc.kind), kv_dtype_name(tc.dtype),
						 xfer_cuda_path_name(tc.path), v);
					tc.name = name;
					round_trip(ctx, &tc, 1000 + n);
					/* The tiny ring: several segments per chunk, a
					 * segment boundary inside every (k, l) run. */
					if (tc.path == XFER_CUDA_PATH_STAGED) {
						strcat(name, "/tiny");
						round_trip(tiny, &tc, 5000 + n);
					}
					n++;
				}
	fprintf(stderr, "cuda_transfer: %u round-trip cases\n", n);
}

/* ---- argument checks, bounded waits ------------------------------------------- */

static void test_rejects(struct xfer_cuda_ctx *ctx)
{
	struct tcase tc = { .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_BFLOAT16, .NL = 2,
			    .NB = 8, .BS = 16, .NH = 2, .HS = 64, .ntokens = 32, .C = 32,
			    .name = "rejects" };
	struct kv_layout l;
	make_layout(&tc, &l);
	int64_t slots[32];
	void *layers[2];
	uint8_t *dev;
	size_t ob = kv_object_bytes(&l, 32);
	uint8_t *obj = pool_take(ob, 0);
	uint8_t *outside = malloc(ob);
	void *objs[1] = { obj };

	REQUIRE(outside);
	CUDA_OK(cudaMalloc((void **)&dev, 2 * l.extent_bytes));
	layers[0] = dev, layers[1] = dev + l.extent_bytes;
	make_slots(&l, 32, 7, slots);
	struct xfer_cuda_job job = { .layout = &l, .layers = layers, .slots = slots, .ntokens = 32,
				     .chunk_tokens = 32, .objs = objs, .timeout_ms = 5000 };

	for (int p = 0; p < 2; p++) {
		job.path = p ? XFER_CUDA_PATH_STAGED : XFER_CUDA_PATH_ZEROCOPY;
		memset(obj, 0x5A, ob);
		int64_t keep = slots[17];
		slots[17] = kv_num_slots(&l);	/* one past the end */
		CHECK_EQ(xfer_cuda_store(ctx, &job), -ERANGE);
		CHECK_EQ(xfer_cuda_retrieve(ctx, &job), -ERANGE);
		slots[17] = -1;
		CHECK_EQ(xfer_cuda_store(ctx, &job), -ERANGE);
		slots[17] = keep;
		for (size_t i = 0; i < ob; i++)
			if (obj[i] != 0x5A) {
				fprintf(stderr, "FAIL rejects: a rejected job wrote byte %zu\n", i);
				t_failures++;
				break;
			}
		objs[0] = outside;	/* not in the registered pool */
		CHECK_EQ(xfer_cuda_store(ctx, &job), -EFAULT);
		objs[0] = obj;
		job.chunk_tokens = 0;
		CHECK_EQ(xfer_cuda_store(ctx, &job), -EINVAL);
		job.chunk_tokens = 32;
		job.skip_tokens = 1;	/* skip is RETRIEVE's */
		CHECK_EQ(xfer_cuda_store(ctx, &job), -EINVAL);
		job.skip_tokens = 0;
		CHECK_EQ(xfer_cuda_store(ctx, &job), 0);	/* and the ctx still works */
	}
	CHECK_EQ(xfer_cuda_store(ctx, NULL), -EINVAL);
	CHECK_EQ(xfer_cuda_store(NULL, &job), -EINVAL);
	CHECK(!xfer_cuda_ctx_failed(ctx));
	CUDA_OK(cudaFree(dev));
	free(outside);
}

/* A job that cannot finish in 0 ms: -ETIMEDOUT, then -EBUSY, drain, data right. */
static void test_timeout(struct xfer_cuda_ctx *ctx)
{
	struct tcase tc = { .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_BFLOAT16, .NL = 8,
			    .NB = 512, .BS = 16, .NH = 8, .HS = 128, .ntokens = 8192, .C = 256,
			    .name = "timeout" };
	struct kv_layout l;
	make_layout(&tc, &l);
	const uint32_t nchunks = tc.ntokens / tc.C;
	const size_t ob = kv_object_bytes(&l, tc.C);
	int64_t *slots = malloc(tc.ntokens * sizeof(*slots));
	void *layers[8], *objs[32];
	uint8_t *dev, *mirror = malloc(l.extent_bytes);
	size_t mark = g_pool_used;

	REQUIRE(slots && mirror && nchunks <= 32);
	CUDA_OK(cudaMalloc((void **)&dev, l.extent_bytes));
	fill_random(mirror, l.extent_bytes, 99);
	upload(dev, mirror, l.extent_bytes);
	for (int i = 0; i < 8; i++)
		layers[i] = dev;	/* 8 layers aliasing one buffer: 256 MiB per job */
	make_slots(&l, tc.ntokens, 3, slots);
	for (uint32_t c = 0; c < nchunks; c++) {
		objs[c] = pool_take(ob, 0);
		memset(objs[c], 0, ob);
	}
	struct xfer_cuda_job job = { .layout = &l, .layers = layers, .slots = slots,
				     .ntokens = tc.ntokens, .chunk_tokens = tc.C, .objs = objs,
				     .timeout_ms = 0 };
	int rc = xfer_cuda_store(ctx, &job);
	CHECK_EQ(rc, -ETIMEDOUT);
	if (rc == -ETIMEDOUT) {
		job.timeout_ms = 5000;
		CHECK_EQ(xfer_cuda_store(ctx, &job), -EBUSY);
		CHECK_EQ(xfer_cuda_drain(ctx, 10000), 0);
	}
	/* The timed-out job ran to completion: check the last chunk, last layer. */
	uint8_t *r = malloc(ob), *ref[1] = { r };
	REQUIRE(r);
	/* Reference for the last chunk alone (its slots, one chunk; the 8
	 * layers alias one buffer, so the layer pitch is 0). */
	ref_copy(&l, mirror, 0, 0, slots + (nchunks - 1) * tc.C, tc.C, tc.C, ref, 1, 0);
	CHECK(first_diff(objs[nchunks - 1], r, ob) == (size_t)-1);
	job.timeout_ms = 5000;
	CHECK_EQ(xfer_cuda_store(ctx, &job), 0);	/* usable again */
	CHECK_EQ(xfer_cuda_drain(ctx, 0), 0);
	CUDA_OK(cudaFree(dev));
	free(r), free(slots), free(mirror);
	g_pool_used = mark;
}

static void test_uuid(void)
{
	struct cudaDeviceProp p;
	char s[XFER_CUDA_UUID_STR_BYTES], buf[64];
	int ord = -1, n = 0;

	CHECK_EQ(xfer_cuda_device_count(&n), 0);
	CHECK(n >= 1);
	CUDA_OK(cudaGetDeviceProperties(&p, 0));
	CHECK_EQ(xfer_cuda_device_uuid(0, s), 0);
	CHECK(strlen(s) == 36 && s[8] == '-' && s[13] == '-' && s[18] == '-' && s[23] == '-');
	for (int i = 0, b = 0; i < 36 && b < 16; i++) {
		if (s[i] == '-')
			continue;
		unsigned v;
		sscanf(s + i, "%2x", &v);
		CHECK_EQ(v, (uint8_t)p.uuid.bytes[b]);
		b++, i++;
	}
	CHECK_EQ(xfer_cuda_device_by_uuid(s, &ord), 0);
	CHECK_EQ(ord, 0);
	snprintf(buf, sizeof(buf), "GPU-%s", s);
	for (char *c = buf + 4; *c; c++)
		if (*c >= 'a' && *c <= 'f')
			*c = (char)(*c - 'a' + 'A');
	ord = -1;
	CHECK_EQ(xfer_cuda_device_by_uuid(buf, &ord), 0);
	CHECK_EQ(ord, 0);
	CHECK_EQ(xfer_cuda_device_by_uuid("00000000-0000-0000-0000-000000000000", &ord), -ENODEV);
	CHECK_EQ(xfer_cuda_device_by_uuid("GPU-1234", &ord), -EINVAL);
	CHECK_EQ(xfer_cuda_device_by_uuid("0000000000000-0000-0000-00000000000", &ord), -EINVAL);
	CHECK_EQ(xfer_cuda_device_name(0, buf, sizeof(buf)), 0);
	CHECK_EQ(xfer_cuda_device_name(n, buf, sizeof(buf)), -EINVAL);
	fprintf(stderr, "cuda_transfer: device 0 %s uuid %s\n", p.name, s);
}

/* ---- IPC: the exporting process ------------------------------------------------ */

static int read_full(int fd, void *buf, size_t n)
{
	uint8_t *p = buf;

	while (n) {
		ssize_t r = read(fd, p, n);

		if (r <= 0)
			return -1;
		p += r, n -= (size_t)r;
	}
	return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
	const uint8_t *p = buf;

	while (n) {
		ssize_t r = write(fd, p, n);

		if (r <= 0)
			return -1;
		p += r, n -= (size_t)r;
	}
	return 0;
}

/*
 * --ipc-child IN OUT BYTES SEED: allocate BYTES on device 0, fill them with
 * fill_random(SEED) on a stream, record an interprocess event after the
 * fill, send both 64-byte handles. Then serve commands: 'H' + event handle
 * (wait for the parent's event, reply the FNV-1a of the buffer), 'Q' quit.
 */
static int child_main(char **argv)
{
	int in = atoi(argv[2]), out = atoi(argv[3]);
	size_t bytes = strtoull(argv[4], NULL, 10);
	uint64_t seed = strtoull(argv[5], NULL, 10);
	uint8_t *host = malloc(bytes), *dev;
	cudaIpcMemHandle_t mh;
	cudaIpcEventHandle_t eh;
	cudaStream_t st;
	cudaEvent_t ev;
	char cmd;

	REQUIRE(host);
	CUDA_OK(cudaSetDevice(0));
	CUDA_OK(cudaMalloc((void **)&dev, bytes));
	CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
	CUDA_OK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming | cudaEventInterprocess));
	fill_random(host, bytes, seed);
	CUDA_OK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, st));
	CUDA_OK(cudaEventRecord(ev, st));
	CUDA_OK(cudaIpcGetMemHandle(&mh, dev));
	CUDA_OK(cudaIpcGetEventHandle(&eh, ev));
	if (write_full(out, &mh, sizeof(mh)) || write_full(out, &eh, sizeof(eh)))
		return T_EXIT_FAIL;
	while (!read_full(in, &cmd, 1)) {
		if (cmd == 'Q')
			break;
		if (cmd == 'H') {
			cudaIpcEventHandle_t ph;
			cudaEvent_t pev;
			uint64_t h;

			if (read_full(in, &ph, sizeof(ph)))
				return T_EXIT_FAIL;
			CUDA_OK(cudaIpcOpenEventHandle(&pev, ph));
			CUDA_OK(cudaStreamWaitEvent(st, pev, 0));
			CUDA_OK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, st));
			CUDA_OK(cudaStreamSynchronize(st));
			CUDA_OK(cudaEventDestroy(pev));
			h = fnv1a(host, bytes);
			if (write_full(out, &h, sizeof(h)))
				return T_EXIT_FAIL;
		}
	}
	CUDA_OK(cudaFree(dev));
	free(host);
	return 0;
}

struct child {
	pid_t pid;
	int to, from;
	uint8_t mem_handle[64], event_handle[64];
};

static int child_start(struct child *ch, size_t bytes, uint64_t seed)
{
	int p2c[2], c2p[2];
	char a_in[16], a_out[16], a_bytes[32], a_seed[32];

	REQUIRE(!pipe(p2c) && !pipe(c2p));
	snprintf(a_in, sizeof(a_in), "%d", p2c[0]);
	snprintf(a_out, sizeof(a_out), "%d", c2p[1]);
	snprintf(a_bytes, sizeof(a_bytes), "%zu", bytes);
	snprintf(a_seed, sizeof(a_seed), "%llu", (unsigned long long)seed);
	ch->pid = fork();
	REQUIRE(ch->pid >= 0);
	if (ch->pid == 0) {
		close(p2c[1]), close(c2p[0]);
		execl("/proc/self/exe", "test_cuda_transfer", "--ipc-child", a_in, a_out, a_bytes,
		      a_seed, (char *)NULL);
		_exit(127);
	}
	close(p2c[0]), close(c2p[1]);
	ch->to = p2c[1], ch->from = c2p[0];
	if (read_full(ch->from, ch->mem_handle, 64) || read_full(ch->from, ch->event_handle, 64)) {
		fprintf(stderr, "FAIL ipc: child sent no handles\n");
		return -1;
	}
	return 0;
}

static int child_stop(struct child *ch)
{
	int st = 0;

	(void)write_full(ch->to, "Q", 1);
	close(ch->to), close(ch->from);
	if (waitpid(ch->pid, &st, 0) != ch->pid)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/*
 * The parent stores from and retrieves into the child's buffers through the
 * IPC mapping, gated by the child's IPC event; the child waits on the
 * parent's returned event and hashes what landed in its memory.
 */
static void test_ipc(struct xfer_cuda_ctx *ctx)
{
	struct tcase tc = { .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_BFLOAT16, .NL = 4,
			    .NB = 64, .BS = 16, .NH = 4, .HS = 64, .ntokens = 512, .C = 256,
			    .name = "ipc" };
	struct kv_layout l;
	make_layout(&tc, &l);
	const size_t layer_bytes = (l.extent_bytes + 255) / 256 * 256;
	const size_t bytes = layer_bytes * tc.NL;
	const uint64_t seed = 4242;
	uint8_t *mirror = malloc(bytes), *got = malloc(bytes);
	int64_t slots[512];
	void *layers[4];
	uint8_t *objs[2], *ref[2];
	const size_t ob = kv_object_bytes(&l, tc.C);
	size_t mark = g_pool_used;
	struct child ch;
	void *base = NULL;

	REQUIRE(mirror && got);
	if (child_start(&ch, bytes, seed)) {
		t_failures++;
		return;
	}
	fill_random(mirror, bytes, seed);	/* what the child wrote */
	CHECK_EQ(xfer_cuda_ipc_open_mem(0, ch.mem_handle, &base), 0);
	REQUIRE(base);
	for (uint32_t i = 0; i < tc.NL; i++)
		layers[i] = (uint8_t *)base + i * layer_bytes;
	make_slots(&l, tc.ntokens, 11, slots);
	for (int c = 0; c < 2; c++) {
		objs[c] = pool_take(ob, 0);
		ref[c] = malloc(ob);
		REQUIRE(ref[c]);
	}

	for (int p = 0; p < 2; p++) {
		uint8_t done[64];
		uint64_t h = 0;

		struct xfer_cuda_job job = {
			.layout = &l, .layers = layers, .slots = slots, .ntokens = tc.ntokens,
			.chunk_tokens = tc.C, .objs = (void *const *)objs, .timeout_ms = 10000,
			.wait_event = ch.event_handle, .done_event = done,
			.path = p ? XFER_CUDA_PATH_STAGED : XFER_CUDA_PATH_ZEROCOPY,
		};
		memset(objs[0], 0xA5, ob), memset(objs[1], 0xA5, ob);
		ref_copy(&l, mirror, layer_bytes, 0, slots, tc.ntokens, tc.C, ref, 1, 0);
		CHECK_EQ(xfer_cuda_store(ctx, &job), 0);
		CHECK(first_diff(objs[0], ref[0], ob) == (size_t)-1);
		CHECK(first_diff(objs[1], ref[1], ob) == (size_t)-1);

		/* New object contents, RETRIEVE into the child's memory with a skip. */
		fill_random(objs[0], ob, 77 + p), fill_random(objs[1], ob, 78 + p);
		job.skip_tokens = 100;
		memcpy(ref[0], objs[0], ob), memcpy(ref[1], objs[1], ob);
		ref_copy(&l, mirror, layer_bytes, 0, slots, tc.ntokens, tc.C, ref, 0, 100);
		CHECK_EQ(xfer_cuda_retrieve(ctx, &job), 0);
		CUDA_OK(cudaMemcpy(got, base, bytes, cudaMemcpyDeviceToHost));
		CHECK(first_diff(got, mirror, bytes) == (size_t)-1);
		/* The child sees it too, after waiting on our returned event. */
		REQUIRE(!write_full(ch.to, "H", 1) && !write_full(ch.to, done, 64));
		REQUIRE(!read_full(ch.from, &h, sizeof(h)));
		CHECK(h == fnv1a(mirror, bytes));
	}
	CHECK_EQ(xfer_cuda_ipc_close_mem(0, base), 0);
	CHECK_EQ(child_stop(&ch), 0);
	CHECK(!xfer_cuda_ctx_failed(ctx));
	free(ref[0]), free(ref[1]), free(mirror), free(got);
	g_pool_used = mark;
}

struct killer {
	pid_t pid;
	unsigned delay_ms;
};

static void *killer_main(void *arg)
{
	struct killer *k = arg;
	struct timespec ts = { 0, (long)k->delay_ms * 1000000l };

	nanosleep(&ts, NULL);
	kill(k->pid, SIGKILL);
	return NULL;
}

/*
 * SIGKILL the exporting process while the parent keeps moving its memory:
 * every job must end (0 or an error, never a hang), and afterwards the
 * mapping closes and the same ctx still moves bytes exactly.
 */
static void test_ipc_kill(struct xfer_cuda_ctx *ctx)
{
	struct tcase tc = { .kind = KV_LAYOUT_FLASHINFER, .dtype = KV_DTYPE_BFLOAT16, .NL = 8,
			    .NB = 512, .BS = 16, .NH = 8, .HS = 128, .ntokens = 4096, .C = 256,
			    .name = "ipc-kill" };
	struct kv_layout l;
	make_layout(&tc, &l);
	const size_t layer_bytes = (l.extent_bytes + 255) / 256 * 256;
	const size_t bytes = layer_bytes * tc.NL;	/* 256 MiB */
	int64_t *slots = malloc(tc.ntokens * sizeof(*slots));
	void *layers[8], *objs[16];
	const size_t ob = kv_object_bytes(&l, tc.C);
	size_t mark = g_pool_used;
	struct child ch;
	void *base = NULL;
	pthread_t th;
	int st = 0, ok = 0, failed = 0, other = 0;

	REQUIRE(slots);
	if (child_start(&ch, bytes, 31337)) {
		t_failures++;
		return;
	}
	CHECK_EQ(xfer_cuda_ipc_open_mem(0, ch.mem_handle, &base), 0);
	REQUIRE(base);
	for (uint32_t i = 0; i < tc.NL; i++)
		layers[i] = (uint8_t *)base + i * layer_bytes;
	make_slots(&l, tc.ntokens, 5, slots);
	for (int c = 0; c < 16; c++)
		objs[c] = pool_take(ob, 0);

	struct killer k = { ch.pid, 30 };
	REQUIRE(!pthread_create(&th, NULL, killer_main, &k));
	uint64_t t0 = (uint64_t)time(NULL);
	for (int i = 0; i < 60 && (uint64_t)time(NULL) - t0 < 20; i++) {
		struct xfer_cuda_job job = {
			.layout = &l, .layers = layers, .slots = slots, .ntokens = tc.ntokens,
			.chunk_tokens = tc.C, .objs = objs, .timeout_ms = 10000,
			.path = (i & 2) ? XFER_CUDA_PATH_STAGED : XFER_CUDA_PATH_ZEROCOPY,
		};
		int rc = (i & 1) ? xfer_cuda_retrieve(ctx, &job) : xfer_cuda_store(ctx, &job);

		if (rc == 0)
			ok++;
		else if (rc == -EIO)
			failed++;
		else
			other++;
	}
	pthread_join(th, NULL);
	CHECK(waitpid(ch.pid, &st, 0) == ch.pid);
	CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
	close(ch.to), close(ch.from);
	fprintf(stderr, "cuda_transfer: child killed mid-transfer: %d jobs ok, %d -EIO, %d other\n",
		ok, failed, other);
	CHECK_EQ(other, 0);
	CHECK_EQ(xfer_cuda_ipc_close_mem(0, base), 0);
	CHECK(!xfer_cuda_ctx_failed(ctx));
	free(slots);
	g_pool_used = mark;

	/* The same ctx still works, byte-exact. */
	struct tcase after = { .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_BFLOAT16, .NL = 3,
			       .NB = 24, .BS = 16, .NH = 2, .HS = 40, .ntokens = 75, .C = 32,
			       .skip = 5, .name = "after-kill" };
	round_trip(ctx, &after, 777);
	after.path = XFER_CUDA_PATH_STAGED;
	round_trip(ctx, &after, 778);
}

/*
 * --fault-child: a kernel fault (a layer address no allocation backs, which
 * only the registration layer can vet) must come back as -EIO, mark the
 * ctx failed, and make the next job fail at once without touching the
 * device. Runs in its own process: a sticky error ends the CUDA context.
 */
static int fault_child_main(void)
{
	struct tcase tc = { .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_BFLOAT16, .NL = 2,
			    .NB = 8, .BS = 16, .NH = 2, .HS = 64, .ntokens = 32, .C = 32,
			    .name = "fault" };
	struct kv_layout l;
	struct xfer_cuda_ctx *ctx;
	int64_t slots[32];
	void *layers[2] = { (void *)(uintptr_t)0x1000, (void *)(uintptr_t)0x1000 };
	size_t ob;
	uint8_t *obj;

	make_layout(&tc, &l);
	make_slots(&l, 32, 1, slots);
	ob = kv_object_bytes(&l, 32);
	REQUIRE(!posix_memalign((void **)&obj, OBJ_ALIGN, ob));
	REQUIRE(xfer_cuda_host_register(obj, ob) == 0);
	REQUIRE(xfer_cuda_ctx_create(0, NULL, &ctx) == 0);
	void *objs[1] = { obj };
	struct xfer_cuda_job job = { .layout = &l, .layers = layers, .slots = slots, .ntokens = 32,
				     .chunk_tokens = 32, .objs = objs, .timeout_ms = 10000,
				     .path = XFER_CUDA_PATH_ZEROCOPY };
	CHECK_EQ(xfer_cuda_store(ctx, &job), -EIO);
	CHECK_EQ(xfer_cuda_ctx_failed(ctx), 1);
	CHECK_EQ(xfer_cuda_retrieve(ctx, &job), -EIO);
	xfer_cuda_ctx_destroy(ctx);
	return t_failures ? T_EXIT_FAIL : T_EXIT_PASS;
}

static void test_fault(void)
{
	pid_t pid = fork();
	int st = 0;

	REQUIRE(pid >= 0);
	if (pid == 0) {
		execl("/proc/self/exe", "test_cuda_transfer", "--fault-child", (char *)NULL);
		_exit(127);
	}
	CHECK(waitpid(pid, &st, 0) == pid);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

int main(int argc, char **argv)
{
	/* CUDA_TRANSFER_QUICK=1: round trips and argument checks only (for
	 * compute-sanitizer, which makes the large and multi-process cases slow). */
	const char *quick = getenv("CUDA_TRANSFER_QUICK");
	struct xfer_cuda_ctx *ctx = NULL, *tiny = NULL;
	int n = 0;

	if (argc >= 6 && !strcmp(argv[1], "--ipc-child"))
		return child_main(argv);
	if (argc >= 2 && !strcmp(argv[1], "--fault-child"))
		return fault_child_main();
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		fprintf(stderr, "cuda_transfer: no CUDA device, skipped\n");
		return T_EXIT_SKIP;
	}
	signal(SIGPIPE, SIG_IGN);	/* a dead child must fail a check, not kill us */
	test_uuid();
	REQUIRE(!posix_memalign((void **)&g_pool, OBJ_ALIGN, TEST_POOL_BYTES));
	memset(g_pool, 0, TEST_POOL_BYTES);
	CHECK_EQ(xfer_cuda_host_register(g_pool, TEST_POOL_BYTES), 0);
	CHECK_EQ(xfer_cuda_host_register(g_pool, TEST_POOL_BYTES), -EEXIST);

	struct xfer_cuda_opts o = { .host_base = g_pool, .host_bytes = TEST_POOL_BYTES };
	REQUIRE(xfer_cuda_ctx_create(0, &o, &ctx) == 0);
	fprintf(stderr, "cuda_transfer: default paths: store %s, retrieve %s\n",
		xfer_cuda_path_name(xfer_cuda_ctx_path(ctx, 0)),
		xfer_cuda_path_name(xfer_cuda_ctx_path(ctx, 1)));
	/* Segments of 1 KiB: many per chunk, boundaries inside rows' runs. */
	struct xfer_cuda_opts ot = { .store_path = XFER_CUDA_PATH_STAGED,
				     .retrieve_path = XFER_CUDA_PATH_STAGED, .staging_bytes = 4096 };
	REQUIRE(xfer_cuda_ctx_create(0, &ot, &tiny) == 0);
	struct xfer_cuda_ctx *bad = (struct xfer_cuda_ctx *)1;
	CHECK_EQ(xfer_cuda_ctx_create(n, NULL, &bad), -EINVAL);	/* no such device */
	CHECK(bad == NULL);

	test_round_trips(ctx, tiny);
	test_rejects(ctx);
	if (!quick || strcmp(quick, "1")) {
		test_timeout(ctx);
		test_ipc(ctx);
		test_ipc_kill(ctx);
		test_fault();
	}

	xfer_cuda_ctx_destroy(tiny);
	xfer_cuda_ctx_destroy(ctx);
	CHECK_EQ(xfer_cuda_host_unregister(g_pool), 0);
	free(g_pool);
	return t_result("cuda_transfer");
}
#endif /* KVSTASH_HAVE_CUDA */
