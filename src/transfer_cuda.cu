/*
 * transfer_cuda.cu - the CUDA transfer engine: kernels that move a whole
 * request between paged GPU KV and the chunk objects of the pinned host
 * pool, device discovery, pool registration and CUDA IPC.
 *
 * DESIGN: each transfer worker thread owns one struct xfer_cuda_ctx per
 * device: two streams (kernel, copy), its events, a device-side table of
 * layer/object/slot addresses with a pinned host twin (for jobs whose
 * table does not fit in the launch parameters) and a staging ring. Nothing
 * on the data path is shared between workers, so this file takes no lock
 * at all, and a caller must hold none across a call (docs/architecture.md:
 * no lock across a CUDA call). A job is: validate on the host (slots
 * against NB*BS, objects against the pool) -> build the table (inline, or
 * uploaded) -> optionally wait on the client's IPC event -> launch ->
 * record the completion events -> poll cudaEventQuery up to the job's
 * timeout. The
 * caller's thread returns only after the copy completed, or with
 * -ETIMEDOUT while it still runs (the ctx then refuses jobs with -EBUSY
 * until xfer_cuda_drain() sees it finish, so no buffer is reused under a
 * running copy). Nothing here runs CUDA callbacks.
 *
 * Two ways across PCIe (enum xfer_cuda_path; STAGED is the default, chosen
 * by measurement: on an H100/H200 it is 1-6% faster one direction at a
 * time and ~1.7x faster with STOREs and RETRIEVEs running at once, where
 * SM-issued PCIe traffic tops out near 52 GB/s; docs/performance.md):
 *   ZEROCOPY  one launch of kv_xfer_kernel moves every row of the request,
 *             all layers, K and V, reading/writing the mapped host objects
 *             directly through UVA.
 *   STAGED    the same kernel fills (STORE) or drains (RETRIEVE) a segment
 *             of a device staging ring (one launch per segment), the copy
 *             engine moves the segment with one cudaMemcpyAsync, and the two
 *             streams overlap kernel i+1 with the copy of segment i.
 */
#include <cuda.h>	/* types only: the driver is reached through the runtime */
#include <cuda_runtime.h>

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sched.h>
#include <time.h>

extern "C" {
#include "layout.h"
}
#include "transfer_cuda.h"

/*
 * log.h declares `extern _Atomic int log_level`, which C++17 cannot parse;
 * declare the two symbols used here. _Atomic int has int's size and
 * alignment on every ABI we build for, and is read with an atomic load.
 */
extern "C" void log_emit(int lvl, const char *file, int line, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
extern "C" int log_level;
#define XLOG_ERROR 0
#define XLOG_WARN 1
#define XLOG_INFO 2
#define xlog_at(lvl, ...)                                                   \
	do {                                                                \
		if (__atomic_load_n(&log_level, __ATOMIC_RELAXED) >= (lvl)) \
			log_emit((lvl), __FILE__, __LINE__, __VA_ARGS__);   \
	} while (0)
#define log_error(...) xlog_at(XLOG_ERROR, __VA_ARGS__)
#define log_warn(...) xlog_at(XLOG_WARN, __VA_ARGS__)
#define log_info(...) xlog_at(XLOG_INFO, __VA_ARGS__)

/* ---- tuning constants ---------------------------------------------------------- */

/* Threads per CTA: 8 warps; 8 resident CTAs fill an SM's 2048 threads. */
#define XFER_THREADS 256
/*
 * Loads each thread issues before its first store: zero-copy reads of host
 * memory wait ~1-2 us on PCIe, so several independent 16-byte loads per
 * thread are needed to keep ~100 KB in flight per direction.
 */
#define XFER_UNROLL 4
/* Bytes one CTA moves: 256 threads x 16 B x 4 unrolled x 2 passes. */
#define XFER_CTA_BYTES (32u << 10)
/* Cap on rows per CTA (per-row pointers live in shared memory). */
#define XFER_MAX_ROWS_PER_CTA 64u
/* Staging ring depth: one segment in the kernel, one on the copy engine, two queued. */
#define XFER_STAGE_BUFS 4
/*
 * Default staging ring: 4 segments of 16 MiB. Each cudaMemcpyAsync costs the
 * copy engine ~2.5 us of setup (per-block memcpy on an H100: 32 KiB at
 * ~10-14 GB/s), 1% of a 16 MiB segment's ~300 us; 4 MiB segments lost ~4%
 * (bench/gpu_bench "staging ring" table, docs/performance.md).
 */
#define XFER_STAGING_DEFAULT (64u << 20)
/*
 * The pipeline's exposed end (STORE's first kernel, RETRIEVE's last one) is
 * a 1/16 segment: 1 MiB, ~1-2 us of HBM gather instead of ~6 for 16 MiB.
 */
#define XFER_RAMP_DIV 16
/* Interprocess events handed out in turn: a returned handle stays valid for 8 more jobs. */
#define XFER_EVENT_RING 8
/* Clients' semaphore buffers a worker keeps open (least recently used closed). */
#define XFER_SEM_PEERS 16
/* Initial table capacity in 8-byte entries (layers + objects + slots). */
#define XFER_TABLE_MIN_ENTRIES (64u << 10)
/*
 * Completion polling (ctx_wait): a job of B bytes is expected to take
 * B / XFER_POLL_GBPS; 60 GB/s is above what one PCIe Gen5 x16 direction
 * delivers (~55), so the first sleep never oversleeps a fast transfer.
 * XFER_POLL_SLACK_NS covers the timer slack (50 us) plus wake-up latency.
 */
#define XFER_POLL_GBPS 60ull
#define XFER_POLL_SLACK_NS 80000ull
/* xfer_cuda_ctx_destroy() waits this long for a timed-out job. */
#define XFER_DESTROY_WAIT_MS 10000u

/*
 * The measured defaults (bench/gpu_bench on an H100, docs/performance.md).
 * XFER_CUDA_DEFAULT_* may be overridden at build time for experiments.
 */
#ifndef XFER_CUDA_DEFAULT_STORE
#define XFER_CUDA_DEFAULT_STORE XFER_CUDA_PATH_STAGED
#endif
#ifndef XFER_CUDA_DEFAULT_RETRIEVE
#define XFER_CUDA_DEFAULT_RETRIEVE XFER_CUDA_PATH_STAGED
#endif

/* ---- errors -------------------------------------------------------------------- */

/* Errors after which the device context is unusable (every later call fails). */
static bool cuda_err_sticky(cudaError_t e)
{
	switch (e) {
	case cudaErrorIllegalAddress:
	case cudaErrorLaunchTimeout:
	case cudaErrorHardwareStackError:
	case cudaErrorIllegalInstruction:
	case cudaErrorMisalignedAddress:
	case cudaErrorInvalidAddressSpace:
	case cudaErrorInvalidPc:
	case cudaErrorLaunchFailure:
	case cudaErrorAssert:
	case cudaErrorECCUncorrectable:
	case cudaErrorNvlinkUncorrectable:
	case cudaErrorContextIsDestroyed:
	case cudaErrorDevicesUnavailable:
	case cudaErrorTensorMemoryLeak:
	case cudaErrorExternalDevice:
	case cudaErrorUnknown:
		return true;
	default:
		return false;
	}
}

/*
 * Error convention: logs and evaluates to 0 or -EIO, never aborts, hides no
 * return. Clears the runtime's last-error slot so a later
 * cudaGetLastError() after a launch reports only that launch.
 */
#define CUDA_RC(call) cuda_rc((call), #call, __FILE__, __LINE__)
static int cuda_rc(cudaError_t e, const char *call, const char *file, int line)
{
	if (e == cudaSuccess)
		return 0;
	(void)cudaGetLastError();
	log_emit(XLOG_ERROR, file, line, "%s: %s (%d)", call, cudaGetErrorString(e), (int)e);
	return -EIO;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- kernels ------------------------------------------------------------------- */

/*
 * One launch's description. A request of ntokens tokens has
 * R = K * NL * ntokens rows (one token of one plane of one layer,
 * row_bytes each), numbered chunk-major so that consecutive rows are
 * consecutive bytes of one object:
 *   r = c * (K*NL*C) + (k*NL + l) * n_c + t'      (token c*C + t')
 * which is exactly the object's dense [K, NL, n_c, hidden] order.
 */
struct kv_xfer_args {
	/*
	 * [NL + NCHUNKS + NTOKENS] the job's table, on the device (NULL when
	 * it travels inline in the kernel's parameters):
	 *   [0, NL)                  device address of layer l's element 0
	 *   [objs_off, +NCHUNKS)     host (UVA) address of chunk c's object
	 *   [slots_off, +NTOKENS)    paged slot of each range token, < NB*BS
	 */
	const uint64_t *table;
	uint32_t objs_off;	/* NL */
	uint32_t slots_off;	/* NL + NCHUNKS */
	char *stage;		/* [nrows, row_bytes] staging segment, or NULL (zero-copy) */
	uint32_t row_begin;	/* first request row of this launch, < R */
	uint32_t nrows;		/* rows of this launch, row_begin + nrows <= R */
	uint32_t rows_per_cta;	/* rows per CTA, <= XFER_MAX_ROWS_PER_CTA */
	uint32_t rows_per_chunk;	/* K * NL * C */
	uint32_t num_layers;	/* NL */
	uint32_t chunk_tokens;	/* C */
	uint32_t ntokens;	/* NTOKENS */
	uint32_t skip_tokens;	/* rows of tokens < skip_tokens are not moved */
	uint32_t row_words;	/* row_bytes / sizeof(T) */
	uint32_t head_words;	/* HS * elem_bytes / sizeof(T) (strided heads only) */
	uint32_t rows_contiguous;	/* 1: a row is row_bytes contiguous bytes */
	uint32_t block_size;	/* BS */
	uint64_t row_bytes;	/* hidden * elem_bytes */
	int64_t plane_stride_b;	/* bytes between K and V of a slot (0 for MLA) */
	int64_t block_stride_b;	/* bytes between blocks */
	int64_t token_stride_b;	/* bytes between the tokens of a block */
	int64_t head_stride_b;	/* bytes between heads */
};

/*
 * A small job's table travels in the launch's parameter space instead of
 * through a host->device copy that the first kernel would wait for (~4 us,
 * 2-3% of a 256-token MLA chunk). 480 entries keep args + table under the
 * classic 4 KiB kernel parameter limit: a 256-token chunk of a 61-layer
 * model needs 318.
 */
#define XFER_INLINE_ENTRIES 480
struct kv_xfer_table {
	uint64_t e[XFER_INLINE_ENTRIES];
};
/* The table's stand-in for jobs whose table is on the device. */
struct kv_xfer_notable {
	uint64_t unused;
};
static_assert(sizeof(struct kv_xfer_args) + sizeof(struct kv_xfer_table) <= 4096,
	      "kernel parameters over 4 KiB");

/*
 * Grid: one CTA per rows_per_cta consecutive request rows (x only).
 * Block: XFER_THREADS threads striding the CTA's rows * row_words words,
 * so a warp touches 32 consecutive words of the object side: coalesced,
 * full 128-byte lines on PCIe. The first rows_per_cta threads resolve
 * their row's two addresses into shared memory first.
 */
template <typename T, bool STORE, typename TAB>	// T: the copy word (uint4, uint64_t, ...),
							// not the KV dtype; TAB: kv_xfer_table
							// (inline) or kv_xfer_notable
__global__ void __launch_bounds__(XFER_THREADS)
kv_xfer_kernel(const __grid_constant__ struct kv_xfer_args a,	// the launch, above
	       const __grid_constant__ TAB tab)		// [NL + NCHUNKS + NTOKENS] or unused
{
	/* __grid_constant__: indexed in place in parameter space, no copy. */
	const uint64_t *table = a.table ? a.table : (const uint64_t *)&tab;
	__shared__ char *s_paged[XFER_MAX_ROWS_PER_CTA];
	__shared__ char *s_obj[XFER_MAX_ROWS_PER_CTA];
	const uint32_t first = a.row_begin + blockIdx.x * a.rows_per_cta;
	const uint32_t end = a.row_begin + a.nrows;
	const uint32_t rows = min(a.rows_per_cta, end - first);

	if (threadIdx.x < rows) {
		const uint32_t r = first + threadIdx.x;
		const uint32_t c = r / a.rows_per_chunk;
		const uint32_t rr = r - c * a.rows_per_chunk;
		const uint32_t t0 = c * a.chunk_tokens;
		const uint32_t n_c = min(a.chunk_tokens, a.ntokens - t0);
		const uint32_t kl = rr / n_c;
		const uint32_t token = t0 + (rr - kl * n_c);
		const uint32_t k = kl / a.num_layers;
		const uint32_t l = kl - k * a.num_layers;
		char *paged = NULL, *obj = NULL;

		if (token >= a.skip_tokens) {
			const int64_t slot = (int64_t)table[a.slots_off + token];
			const int64_t blk = slot / a.block_size;
			const int64_t off = slot - blk * a.block_size;

			paged = (char *)table[l] + k * a.plane_stride_b + blk * a.block_stride_b +
				off * a.token_stride_b;
			obj = a.stage ? a.stage + (uint64_t)(r - a.row_begin) * a.row_bytes
				      : (char *)table[a.objs_off + c] + (uint64_t)rr * a.row_bytes;
		}
		s_paged[threadIdx.x] = paged;
		s_obj[threadIdx.x] = obj;
	}
	__syncthreads();

	const uint32_t n = rows * a.row_words;
	for (uint32_t base = threadIdx.x; base < n; base += XFER_THREADS * XFER_UNROLL) {
		T v[XFER_UNROLL];
		T *dst[XFER_UNROLL];

		/* All loads first: XFER_UNROLL independent requests in flight. */
#pragma unroll
		for (int u = 0; u < XFER_UNROLL; u++) {
			const uint32_t j = base + u * XFER_THREADS;

			dst[u] = NULL;
			if (j >= n)
				continue;
			const uint32_t row = j / a.row_words;
			const uint32_t w = j - row * a.row_words;
			char *p = s_paged[row];

			if (!p)
				continue;
			uint64_t po;
			if (a.rows_contiguous) {
				po = (uint64_t)w * sizeof(T);
			} else {
				const uint32_t h = w / a.head_words;

				po = h * a.head_stride_b + (uint64_t)(w - h * a.head_words) * sizeof(T);
			}
			T *pw = (T *)(p + po);
			T *ow = (T *)(s_obj[row] + (uint64_t)w * sizeof(T));
			/* .cs (evict-first): every byte is touched once; keep the
			 * engine's working set in L2. */
			if (STORE) {
				v[u] = __ldcs(pw);
				dst[u] = ow;
			} else {
				v[u] = __ldcs(ow);
				dst[u] = pw;
			}
		}
#pragma unroll
		for (int u = 0; u < XFER_UNROLL; u++)
			if (dst[u])
				__stcs(dst[u], v[u]);
	}
}

template <typename T>
static void kv_xfer_launch(bool store, const struct kv_xfer_args &a,
			   const struct kv_xfer_table *inl, unsigned grid, cudaStream_t s)
{
	const struct kv_xfer_notable none = {};

	if (inl && store)
		kv_xfer_kernel<T, true><<<grid, XFER_THREADS, 0, s>>>(a, *inl);
	else if (inl)
		kv_xfer_kernel<T, false><<<grid, XFER_THREADS, 0, s>>>(a, *inl);
	else if (store)
		kv_xfer_kernel<T, true><<<grid, XFER_THREADS, 0, s>>>(a, none);
	else
		kv_xfer_kernel<T, false><<<grid, XFER_THREADS, 0, s>>>(a, none);
}

/*
 * Launch rows [row_begin, row_begin + nrows) with the widest copy word that
 * every address and stride of the job is aligned to (@align: the OR of them).
 */
static int kv_xfer_dispatch(bool store, struct kv_xfer_args a, const struct kv_xfer_table *inl,
			    uint64_t align, cudaStream_t s)
{
	unsigned w;

	if (!a.nrows)
		return 0;
	if (!(align & 15))
		w = 16;
	else if (!(align & 7))
		w = 8;
	else if (!(align & 3))
		w = 4;
	else if (!(align & 1))
		w = 2;
	else
		w = 1;
	a.row_words = (uint32_t)(a.row_bytes / w);
	a.head_words = a.head_words / w;	/* set in bytes by the caller */
	const unsigned grid = (a.nrows + a.rows_per_cta - 1) / a.rows_per_cta;
	switch (w) {
	case 16: kv_xfer_launch<uint4>(store, a, inl, grid, s); break;
	case 8: kv_xfer_launch<uint64_t>(store, a, inl, grid, s); break;
	case 4: kv_xfer_launch<uint32_t>(store, a, inl, grid, s); break;
	case 2: kv_xfer_launch<uint16_t>(store, a, inl, grid, s); break;
	default: kv_xfer_launch<uint8_t>(store, a, inl, grid, s); break;
	}
	return CUDA_RC(cudaGetLastError());
}

/* ---- devices ------------------------------------------------------------------- */

extern "C" int xfer_cuda_device_count(int *count)
{
	int n = 0;
	cudaError_t e;

	if (!count)
		return -EINVAL;
	*count = 0;
	e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess) {
		(void)cudaGetLastError();
		return -ENODEV;
	}
	*count = n;
	return n > 0 ? 0 : -ENODEV;
}

static int check_dev(int dev)
{
	int n;

	if (xfer_cuda_device_count(&n))
		return -ENODEV;
	return dev >= 0 && dev < n ? 0 : -EINVAL;
}

extern "C" int xfer_cuda_device_name(int dev, char *buf, size_t len)
{
	cudaDeviceProp p;
	int rc;

	if (!buf || !len)
		return -EINVAL;
	rc = check_dev(dev);
	if (rc)
		return rc;
	if (CUDA_RC(cudaGetDeviceProperties(&p, dev)))
		return -EIO;
	snprintf(buf, len, "%s", p.name);
	return 0;
}

static void uuid_format(const unsigned char b[16], char out[XFER_CUDA_UUID_STR_BYTES])
{
	static const char hex[] = "0123456789abcdef";
	char *o = out;

	for (int i = 0; i < 16; i++) {
		if (i == 4 || i == 6 || i == 8 || i == 10)
			*o++ = '-';
		*o++ = hex[b[i] >> 4];
		*o++ = hex[b[i] & 15];
	}
	*o = 0;
}

extern "C" int xfer_cuda_device_uuid(int dev, char out[XFER_CUDA_UUID_STR_BYTES])
{
	cudaDeviceProp p;
	int rc;

	if (!out)
		return -EINVAL;
	rc = check_dev(dev);
	if (rc)
		return rc;
	if (CUDA_RC(cudaGetDeviceProperties(&p, dev)))
		return -EIO;
	uuid_format((const unsigned char *)p.uuid.bytes, out);
	return 0;
}

static int hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/* "GPU-"? 8-4-4-4-12 hex -> 16 bytes; -EINVAL if malformed. */
static int uuid_parse(const char *s, unsigned char out[16])
{
	int nb = 0;

	if (!strncasecmp(s, "GPU-", 4))
		s += 4;
	if (strlen(s) != 36)
		return -EINVAL;
	for (int i = 0; i < 36;) {
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (s[i] != '-')
				return -EINVAL;
			i++;
			continue;
		}
		int hi = hexval(s[i]), lo = hexval(s[i + 1]);
		if (hi < 0 || lo < 0)
			return -EINVAL;
		out[nb++] = (unsigned char)(hi << 4 | lo);
		i += 2;
	}
	return nb == 16 ? 0 : -EINVAL;
}

extern "C" int xfer_cuda_device_by_uuid(const char *uuid, int *ordinal)
{
	unsigned char want[16];
	int n;

	if (!uuid || !ordinal || uuid_parse(uuid, want))
		return -EINVAL;
	if (xfer_cuda_device_count(&n))
		return -ENODEV;
	for (int d = 0; d < n; d++) {
		cudaDeviceProp p;

		if (CUDA_RC(cudaGetDeviceProperties(&p, d)))
			continue;
		if (!memcmp(p.uuid.bytes, want, 16)) {
			*ordinal = d;
			return 0;
		}
	}
	return -ENODEV;
}

/* ---- host pool ------------------------------------------------------------------- */

extern "C" int xfer_cuda_host_register(void *base, size_t bytes)
{
	int n;
	cudaError_t e;

	if (!base || !bytes)
		return -EINVAL;
	if (xfer_cuda_device_count(&n))
		return -ENODEV;
	/* NOTE: synchronizes; pins every page, ~0.1-0.3 s per GiB. */
	e = cudaHostRegister(base, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
	if (e == cudaErrorHostMemoryAlreadyRegistered) {
		(void)cudaGetLastError();
		return -EEXIST;
	}
	if (e == cudaErrorMemoryAllocation) {
		(void)cudaGetLastError();
		log_error("cudaHostRegister(%zu bytes): out of pinnable memory", bytes);
		return -ENOMEM;
	}
	if (e == cudaErrorInvalidValue) {
		(void)cudaGetLastError();
		return -EINVAL;
	}
	return CUDA_RC(e);
}

extern "C" int xfer_cuda_host_unregister(void *base)
{
	int n;
	cudaError_t e;

	if (!base)
		return -EINVAL;
	if (xfer_cuda_device_count(&n))
		return -ENODEV;
	e = cudaHostUnregister(base);
	if (e == cudaErrorHostMemoryNotRegistered || e == cudaErrorInvalidValue) {
		(void)cudaGetLastError();
		return -EINVAL;
	}
	return CUDA_RC(e);
}

/* ---- IPC ------------------------------------------------------------------------- */

extern "C" int xfer_cuda_ipc_open_mem(int dev, const void *handle, void **dev_ptr)
{
	cudaIpcMemHandle_t h;
	void *p = NULL;
	int rc;

	if (!handle || !dev_ptr)
		return -EINVAL;
	rc = check_dev(dev);
	if (rc)
		return rc;
	static_assert(sizeof(h) == XFER_CUDA_IPC_HANDLE_BYTES, "cudaIpcMemHandle_t size");
	memcpy(&h, handle, sizeof(h));
	if (CUDA_RC(cudaSetDevice(dev)))
		return -EIO;
	/* NOTE: synchronizes with the driver; maps the peer's allocation. */
	if (CUDA_RC(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess)))
		return -EIO;
	*dev_ptr = p;
	return 0;
}

extern "C" int xfer_cuda_mem_range(int dev, const void *ptr, void **base, size_t *bytes)
{
	typedef CUresult (*range_fn)(CUdeviceptr *, size_t *, CUdeviceptr);
	cudaDriverEntryPointQueryResult q;
	void *fn = NULL;
	CUdeviceptr b = 0;
	size_t sz = 0;
	int rc;

	if (!ptr || !base || !bytes)
		return -EINVAL;
	rc = check_dev(dev);
	if (rc)
		return rc;
	if (CUDA_RC(cudaSetDevice(dev)))
		return -EIO;
	/* The runtime hands out driver entry points, so kvstashd does not link
	 * libcuda and still starts on machines without a GPU driver. */
	if (CUDA_RC(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000,
						     cudaEnableDefault, &q)) ||
	    q != cudaDriverEntryPointSuccess || !fn)
		return -EIO;
	if (((range_fn)fn)(&b, &sz, (CUdeviceptr)(uintptr_t)ptr) != CUDA_SUCCESS)
		return -EINVAL;
	*base = (void *)(uintptr_t)b;
	*bytes = sz;
	return 0;
}

extern "C" int xfer_cuda_ipc_close_mem(int dev, void *dev_ptr)
{
	int rc;

	if (!dev_ptr)
		return -EINVAL;
	rc = check_dev(dev);
	if (rc)
		return rc;
	if (CUDA_RC(cudaSetDevice(dev)))
		return -EIO;
	return CUDA_RC(cudaIpcCloseMemHandle(dev_ptr));
}

/* ---- per-worker context ---------------------------------------------------------- */

struct xfer_cuda_ctx {
	int dev;
	bool failed;		/* a sticky error: every job returns -EIO */
	bool inflight;		/* a job returned -ETIMEDOUT and may still run */
	enum xfer_cuda_path path[2];	/* [0] STORE, [1] RETRIEVE; never DEFAULT */
	bool zerocopy_ok;	/* the device addresses registered host memory at its pointer */
	const char *host_lo;	/* registered pool [host_lo, host_hi), or NULL: ask the driver */
	const char *host_hi;
	cudaStream_t sk;	/* owns: kernels, table upload, client event waits */
	cudaStream_t sc;	/* owns: copy-engine memcpys of STAGED */
	cudaEvent_t done;	/* owns: recorded last in every job; polled */
	cudaEvent_t seg_ready[XFER_STAGE_BUFS];	/* owns: segment b filled (kernel or copy) */
	cudaEvent_t seg_free[XFER_STAGE_BUFS];	/* owns: segment b drained, reusable */
	cudaEvent_t ipc_ev[XFER_EVENT_RING];	/* owns: interprocess events handed out */
	cudaIpcEventHandle_t ipc_h[XFER_EVENT_RING];
	unsigned ipc_next;
	size_t staging_bytes;
	char *stage;		/* owns: device, staging_bytes, or NULL until first STAGED job */
	uint64_t *tab_host;	/* owns: pinned host twin of the table */
	uint64_t *tab_dev;	/* owns: device table [NL][NCHUNKS][NTOKENS] */
	size_t tab_entries;	/* capacity of both, in 8-byte entries */
	/* Isolated IPC (LMCache's timeline semaphores), made on first use: */
	uint64_t *sem;		/* owns: device [XFER_CUDA_SEM_SLOTS] u64, slot 1 is ours */
	cudaIpcMemHandle_t sem_h;	/* its IPC handle, in every reply */
	uint64_t sem_seq;	/* last value written to our slot; only grows */
	struct sem_peer {	/* clients' semaphore buffers opened here, LRU */
		unsigned char h[XFER_CUDA_IPC_HANDLE_BYTES];
		void *base;	/* owns: cudaIpcOpenMemHandle mapping, or NULL */
		uint64_t used;
	} peers[XFER_SEM_PEERS];
	uint64_t peer_clock;
};

extern "C" const char *xfer_cuda_path_name(enum xfer_cuda_path p)
{
	switch (p) {
	case XFER_CUDA_PATH_DEFAULT: return "default";
	case XFER_CUDA_PATH_ZEROCOPY: return "zerocopy";
	case XFER_CUDA_PATH_STAGED: return "staged";
	}
	return "unknown";
}

/* A CUDA error inside a job: log, mark the ctx failed if sticky, -EIO. */
static int ctx_err(struct xfer_cuda_ctx *ctx, cudaError_t e, const char *what, int line)
{
	int rc = cuda_rc(e, what, __FILE__, line);

	if (rc && cuda_err_sticky(e)) {
		if (!ctx->failed)
			log_error("cuda device %d: sticky error, transfer context failed", ctx->dev);
		ctx->failed = true;
	}
	return rc;
}
#define CTX_RC(ctx, call) ctx_err((ctx), (call), #call, __LINE__)

static int resolve_path(const struct xfer_cuda_ctx *ctx, enum xfer_cuda_path p, bool retrieve,
			enum xfer_cuda_path *out)
{
	if (p == XFER_CUDA_PATH_DEFAULT) {
		p = retrieve ? XFER_CUDA_DEFAULT_RETRIEVE : XFER_CUDA_DEFAULT_STORE;
		if (p == XFER_CUDA_PATH_ZEROCOPY && !ctx->zerocopy_ok)
			p = XFER_CUDA_PATH_STAGED;
	}
	if (p != XFER_CUDA_PATH_ZEROCOPY && p != XFER_CUDA_PATH_STAGED)
		return -EINVAL;
	if (p == XFER_CUDA_PATH_ZEROCOPY && !ctx->zerocopy_ok)
		return -EOPNOTSUPP;
	*out = p;
	return 0;
}

/* Allocate the staging ring on first use. NOTE: synchronizes (cudaMalloc), once. */
static int ctx_stage_alloc(struct xfer_cuda_ctx *ctx)
{
	void *p;

	if (ctx->stage)
		return 0;
	if (CTX_RC(ctx, cudaMalloc(&p, ctx->staging_bytes)))
		return -ENOMEM;
	ctx->stage = (char *)p;
	return 0;
}

/* Grow the table to @entries. NOTE: synchronizes (cudaFree/cudaMalloc); only when growing. */
static int ctx_table_reserve(struct xfer_cuda_ctx *ctx, size_t entries)
{
	void *h = NULL, *d = NULL;
	size_t n = ctx->tab_entries ? ctx->tab_entries : XFER_TABLE_MIN_ENTRIES;

	if (entries <= ctx->tab_entries)
		return 0;
	while (n < entries)
		n *= 2;
	if (CTX_RC(ctx, cudaHostAlloc(&h, n * 8, cudaHostAllocPortable)))
		return -ENOMEM;
	if (CTX_RC(ctx, cudaMalloc(&d, n * 8))) {
		cudaFreeHost(h);
		return -ENOMEM;
	}
	if (ctx->tab_host)
		cudaFreeHost(ctx->tab_host);
	if (ctx->tab_dev)
		cudaFree(ctx->tab_dev);
	ctx->tab_host = (uint64_t *)h;
	ctx->tab_dev = (uint64_t *)d;
	ctx->tab_entries = n;
	return 0;
}

static void ctx_free(struct xfer_cuda_ctx *ctx)
{
	for (int i = 0; i < XFER_SEM_PEERS; i++)
		if (ctx->peers[i].base)
			(void)cudaIpcCloseMemHandle(ctx->peers[i].base);
	if (ctx->sem)
		cudaFree(ctx->sem);
	if (ctx->stage)
		cudaFree(ctx->stage);
	if (ctx->tab_dev)
		cudaFree(ctx->tab_dev);
	if (ctx->tab_host)
		cudaFreeHost(ctx->tab_host);
	for (int i = 0; i < XFER_EVENT_RING; i++)
		if (ctx->ipc_ev[i])
			cudaEventDestroy(ctx->ipc_ev[i]);
	for (int i = 0; i < XFER_STAGE_BUFS; i++) {
		if (ctx->seg_ready[i])
			cudaEventDestroy(ctx->seg_ready[i]);
		if (ctx->seg_free[i])
			cudaEventDestroy(ctx->seg_free[i]);
	}
	if (ctx->done)
		cudaEventDestroy(ctx->done);
	if (ctx->sc)
		cudaStreamDestroy(ctx->sc);
	if (ctx->sk)
		cudaStreamDestroy(ctx->sk);
	(void)cudaGetLastError();
	free(ctx);
}

/* Is [p, p + n) registered, mapped host memory at the same address? */
static bool host_range_mapped(const void *p, size_t n)
{
	const char *c = (const char *)p;
	const char *ends[2] = { c, c + n - 1 };

	for (int i = 0; i < 2; i++) {
		cudaPointerAttributes at;

		if (cudaPointerGetAttributes(&at, ends[i]) != cudaSuccess) {
			(void)cudaGetLastError();
			return false;
		}
		if (at.type != cudaMemoryTypeHost || at.devicePointer != (const void *)ends[i])
			return false;
	}
	return true;
}

extern "C" int xfer_cuda_ctx_create(int dev, const struct xfer_cuda_opts *opts,
				    struct xfer_cuda_ctx **out)
{
	struct xfer_cuda_opts o = {};
	struct xfer_cuda_ctx *ctx;
	int a1 = 0, a2 = 0, rc;

	if (!out)
		return -EINVAL;
	*out = NULL;
	rc = check_dev(dev);
	if (rc)
		return rc;
	if (opts)
		o = *opts;
	if (!o.staging_bytes)
		o.staging_bytes = XFER_STAGING_DEFAULT;
	o.staging_bytes &= ~(size_t)(256 * XFER_STAGE_BUFS - 1);	/* 256-aligned segments */
	if (o.staging_bytes < 256 * XFER_STAGE_BUFS || (o.host_bytes && !o.host_base))
		return -EINVAL;
	if (CUDA_RC(cudaSetDevice(dev)))
		return -EIO;
	if (CUDA_RC(cudaDeviceGetAttribute(&a1, cudaDevAttrCanMapHostMemory, dev)) ||
	    CUDA_RC(cudaDeviceGetAttribute(&a2, cudaDevAttrCanUseHostPointerForRegisteredMem, dev)))
		return -EIO;

	ctx = (struct xfer_cuda_ctx *)calloc(1, sizeof(*ctx));
	if (!ctx)
		return -ENOMEM;
	ctx->dev = dev;
	ctx->zerocopy_ok = a1 && a2;
	ctx->staging_bytes = o.staging_bytes;
	rc = resolve_path(ctx, o.store_path, false, &ctx->path[0]);
	if (!rc)
		rc = resolve_path(ctx, o.retrieve_path, true, &ctx->path[1]);
	if (rc)
		goto out_free;
	if (o.host_bytes) {
		size_t check = o.host_bytes;

		if (o.host_registering && o.host_registered_bytes < check)
			check = o.host_registered_bytes;
		if (check && !host_range_mapped(o.host_base, check)) {
			log_error("transfer ctx: host pool %p+%zu is not registered with CUDA",
				  o.host_base, check);
			rc = -EINVAL;
			goto out_free;
		}
		ctx->host_lo = (const char *)o.host_base;
		ctx->host_hi = ctx->host_lo + o.host_bytes;
	}
	rc = -EIO;
	if (CTX_RC(ctx, cudaStreamCreateWithFlags(&ctx->sk, cudaStreamNonBlocking)) ||
	    CTX_RC(ctx, cudaStreamCreateWithFlags(&ctx->sc, cudaStreamNonBlocking)) ||
	    CTX_RC(ctx, cudaEventCreateWithFlags(&ctx->done, cudaEventDisableTiming)))
		goto out_free;
	for (int i = 0; i < XFER_STAGE_BUFS; i++)
		if (CTX_RC(ctx, cudaEventCreateWithFlags(&ctx->seg_ready[i], cudaEventDisableTiming)) ||
		    CTX_RC(ctx, cudaEventCreateWithFlags(&ctx->seg_free[i], cudaEventDisableTiming)))
			goto out_free;
	for (int i = 0; i < XFER_EVENT_RING; i++) {
		if (CTX_RC(ctx, cudaEventCreateWithFlags(&ctx->ipc_ev[i], cudaEventDisableTiming |
									    cudaEventInterprocess)))
			goto out_free;
		/* Record once so a handle opened before its first job is a completed event. */
		if (CTX_RC(ctx, cudaEventRecord(ctx->ipc_ev[i], ctx->sk)) ||
		    CTX_RC(ctx, cudaIpcGetEventHandle(&ctx->ipc_h[i], ctx->ipc_ev[i])))
			goto out_free;
	}
	rc = ctx_table_reserve(ctx, XFER_TABLE_MIN_ENTRIES);
	if (rc)
		goto out_free;
	if (ctx->path[0] == XFER_CUDA_PATH_STAGED || ctx->path[1] == XFER_CUDA_PATH_STAGED) {
		rc = ctx_stage_alloc(ctx);
		if (rc)
			goto out_free;
	}
	/* NOTE: synchronizes (creation only): the ring's first records are done. */
	if (CTX_RC(ctx, cudaStreamSynchronize(ctx->sk))) {
		rc = -EIO;
		goto out_free;
	}
	*out = ctx;
	return 0;
out_free:
	ctx_free(ctx);
	return rc;
}

extern "C" int xfer_cuda_ctx_failed(const struct xfer_cuda_ctx *ctx)
{
	return ctx && ctx->failed;
}

extern "C" int xfer_cuda_ctx_device(const struct xfer_cuda_ctx *ctx)
{
	return ctx ? ctx->dev : -EINVAL;
}

extern "C" enum xfer_cuda_path xfer_cuda_ctx_path(const struct xfer_cuda_ctx *ctx, int retrieve)
{
	return ctx ? ctx->path[retrieve ? 1 : 0] : XFER_CUDA_PATH_DEFAULT;
}

/*
 * Poll ctx->done until it completes or @timeout_ms passes. @expect_ns is
 * the job's duration at XFER_POLL_GBPS: sleep through most of it in one
 * nanosleep (the kernel's default timer slack makes short sleeps ~50 us
 * late, which alone would cost 8% of a 256-token chunk), spin with
 * sched_yield around the expected end, then back off to sleeps of 1/64 of
 * the time waited (2 us .. 1 ms) once the job runs late, so a slow or hung
 * device costs little CPU. Entering the spin calls @j's near_done hook.
 */
static int ctx_wait(struct xfer_cuda_ctx *ctx, unsigned timeout_ms, uint64_t expect_ns,
		    const struct xfer_cuda_job *j = NULL)
{
	const uint64_t limit_ns = (uint64_t)timeout_ms * 1000000ull;
	const uint64_t t0 = mono_ns();
	bool slept = false;

	for (;;) {
		cudaError_t e = cudaEventQuery(ctx->done);

		if (e == cudaSuccess) {
			ctx->inflight = false;
			return 0;
		}
		if (e != cudaErrorNotReady) {
			ctx->inflight = false;
			return ctx_err(ctx, e, "cudaEventQuery(done)", __LINE__);
		}
		const uint64_t el = mono_ns() - t0;
		if (el >= limit_ns) {
			ctx->inflight = true;
			return -ETIMEDOUT;
		}
		uint64_t ns;
		if (!slept && expect_ns > el + XFER_POLL_SLACK_NS) {
			ns = expect_ns - el - XFER_POLL_SLACK_NS;
			slept = true;
		} else if (el < expect_ns + expect_ns / 4 + XFER_POLL_SLACK_NS) {
			if (j && j->near_done) {
				j->near_done(j->near_done_arg);
				j = NULL;	/* once */
			}
			sched_yield();
			continue;
		} else {
			ns = el / 64;
			ns = ns < 2000 ? 2000 : ns > 1000000 ? 1000000 : ns;
		}
		if (ns > limit_ns - el)
			ns = limit_ns - el;
		struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
		nanosleep(&ts, NULL);
	}
}

extern "C" int xfer_cuda_drain(struct xfer_cuda_ctx *ctx, unsigned timeout_ms)
{
	if (!ctx)
		return -EINVAL;
	if (!ctx->inflight)
		return ctx->failed ? -EIO : 0;
	if (CUDA_RC(cudaSetDevice(ctx->dev)))
		return -EIO;
	return ctx_wait(ctx, timeout_ms, 0);
}

extern "C" void xfer_cuda_ctx_destroy(struct xfer_cuda_ctx *ctx)
{
	if (!ctx)
		return;
	(void)cudaSetDevice(ctx->dev);
	if (ctx->inflight && !ctx->failed && ctx_wait(ctx, XFER_DESTROY_WAIT_MS, 0) == -ETIMEDOUT) {
		log_error("cuda device %d: a transfer still runs after %u ms; leaking its buffers",
			  ctx->dev, XFER_DESTROY_WAIT_MS);
		return;
	}
	ctx_free(ctx);
}

/* ---- jobs -------------------------------------------------------------------------- */

/* What validation derived from a job. */
struct job_plan {
	uint32_t K, NL, C, nchunks;
	uint32_t first_chunk;	/* RETRIEVE: chunks before it are fully skipped */
	uint64_t row_bytes;
	uint64_t align;		/* OR of every address and stride the kernel uses */
	const struct kv_xfer_table *inl;	/* the table inline, or NULL: ctx->tab_dev */
};

#define KS_MINU(a, b) ((a) < (b) ? (a) : (b))

static uint32_t chunk_len(const struct xfer_cuda_job *j, uint32_t c)
{
	uint32_t t0 = c * j->chunk_tokens;

	return j->ntokens - t0 < j->chunk_tokens ? j->ntokens - t0 : j->chunk_tokens;
}

/* Host-side checks: everything that could make a kernel fault is rejected here. */
static int job_validate(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *j, bool store,
			struct job_plan *pl)
{
	const struct kv_layout *l = j->layout;

	if (!l || !j->layers || !j->slots || !j->objs || !j->chunk_tokens)
		return -EINVAL;
	if (store && j->skip_tokens)
		return -EINVAL;
	if (!l->kv_planes || !l->num_layers || !l->row_bytes || !l->block_size ||
	    !l->elem_bytes)
		return -EINVAL;	/* kv_layout_init() was not run */
	pl->K = l->kv_planes;
	pl->NL = l->num_layers;
	pl->C = j->chunk_tokens;
	pl->row_bytes = l->row_bytes;
	pl->nchunks = (uint32_t)(((uint64_t)j->ntokens + pl->C - 1) / pl->C);
	if ((uint64_t)pl->K * pl->NL * j->ntokens > INT32_MAX ||
	    (uint64_t)pl->K * pl->NL * pl->C > INT32_MAX)
		return -E2BIG;
	pl->first_chunk = store ? 0 : (j->skip_tokens >= j->ntokens ? pl->nchunks
								    : j->skip_tokens / pl->C);

	const int64_t nslots = kv_num_slots(l);
	for (uint32_t t = 0; t < j->ntokens; t++)
		if (j->slots[t] < 0 || j->slots[t] >= nslots) {
			log_warn("transfer: token %u slot %lld outside [0, %lld)", t,
				 (long long)j->slots[t], (long long)nslots);
			return -ERANGE;
		}

	uint64_t a = pl->row_bytes;
	const uint64_t eb = l->elem_bytes;
	a |= (uint64_t)l->plane_stride * eb | (uint64_t)l->block_stride * eb |
	     (uint64_t)l->token_stride * eb;
	if (!l->rows_contiguous)
		a |= (uint64_t)l->head_stride * eb | (uint64_t)l->head_size * eb;
	for (uint32_t i = 0; i < pl->NL; i++) {
		if (!j->layers[i])
			return -EINVAL;
		a |= (uint64_t)(uintptr_t)j->layers[i];
	}
	for (uint32_t c = pl->first_chunk; c < pl->nchunks; c++) {
		const char *o = (const char *)j->objs[c];
		const uint64_t bytes = (uint64_t)pl->K * pl->NL * chunk_len(j, c) * pl->row_bytes;

		if (!o)
			return -EINVAL;
		if (ctx->host_lo) {
			if (o < ctx->host_lo || o > ctx->host_hi ||
			    bytes > (uint64_t)(ctx->host_hi - o))
				return -EFAULT;
		} else if (!host_range_mapped(o, bytes)) {
			return -EFAULT;
		}
		a |= (uint64_t)(uintptr_t)o;
	}
	pl->align = a;
	return 0;
}

static struct kv_xfer_args job_args(const struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *j,
				    const struct job_plan *pl)
{
	const struct kv_layout *l = j->layout;
	const uint64_t eb = l->elem_bytes;
	struct kv_xfer_args a = {};
	uint64_t rpc = XFER_CTA_BYTES / pl->row_bytes;

	a.table = pl->inl ? NULL : ctx->tab_dev;
	a.objs_off = pl->NL;
	a.slots_off = pl->NL + pl->nchunks;
	a.rows_per_cta = (uint32_t)(rpc < 1 ? 1 : rpc > XFER_MAX_ROWS_PER_CTA ? XFER_MAX_ROWS_PER_CTA
									     : rpc);
	a.rows_per_chunk = pl->K * pl->NL * pl->C;
	a.num_layers = pl->NL;
	a.chunk_tokens = pl->C;
	a.ntokens = j->ntokens;
	a.skip_tokens = j->skip_tokens;
	a.head_words = (uint32_t)(l->head_size * eb);	/* bytes; dispatch divides */
	a.rows_contiguous = l->rows_contiguous ? 1 : 0;
	a.block_size = l->block_size;
	a.row_bytes = pl->row_bytes;
	a.plane_stride_b = l->plane_stride * (int64_t)eb;
	a.block_stride_b = l->block_stride * (int64_t)eb;
	a.token_stride_b = l->token_stride * (int64_t)eb;
	a.head_stride_b = l->head_stride * (int64_t)eb;
	return a;
}

/* ZEROCOPY: one launch over every row from the first unskipped chunk on. */
static int run_zerocopy(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *j,
			const struct job_plan *pl, bool store)
{
	struct kv_xfer_args a = job_args(ctx, j, pl);
	const uint32_t R = pl->K * pl->NL * j->ntokens;

	a.row_begin = pl->first_chunk * a.rows_per_chunk;
	a.nrows = R > a.row_begin ? R - a.row_begin : 0;
	return kv_xfer_dispatch(store, a, pl->inl, pl->align, ctx->sk);
}

/*
 * STAGED: segments of at most seg_rows rows, never crossing a chunk (each
 * segment is one contiguous range of one object). STORE: kernel fills ring
 * buffer b on sk -> seg_ready[b] -> sc copies it to the object ->
 * seg_free[b]; RETRIEVE the other way round. Returns the stream that ends
 * the job.
 */
static int run_staged(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *j,
		      const struct job_plan *pl, bool store, cudaStream_t *last)
{
	struct kv_xfer_args a = job_args(ctx, j, pl);
	const size_t seg_bytes = ctx->staging_bytes / XFER_STAGE_BUFS;
	const uint64_t seg_rows = seg_bytes / pl->row_bytes;
	unsigned nseg = 0;
	int rc;

	if (!seg_rows) {
		log_error("transfer: a row of %llu bytes exceeds the %zu-byte staging segment",
			  (unsigned long long)pl->row_bytes, seg_bytes);
		return -EINVAL;
	}
	rc = ctx_stage_alloc(ctx);
	if (rc)
		return rc;
	*last = store ? ctx->sc : ctx->sk;
	const uint32_t small = (uint32_t)(seg_rows / XFER_RAMP_DIV ? seg_rows / XFER_RAMP_DIV : 1);
	for (uint32_t c = pl->first_chunk; c < pl->nchunks; c++) {
		const uint32_t chunk_rows = pl->K * pl->NL * chunk_len(j, c);
		const bool last_chunk = c + 1 == pl->nchunks;
		char *obj = (char *)j->objs[c];

		for (uint32_t off = 0, n; off < chunk_rows; off += n, nseg++) {
			const unsigned b = nseg % XFER_STAGE_BUFS;
			const uint32_t rest = chunk_rows - off;

			n = (uint32_t)(rest < seg_rows ? rest : seg_rows);
			/* Ramp: the exposed ends of the pipeline are STORE's first
			 * kernel and RETRIEVE's last kernel; make those segments small. */
			if (store && !nseg && n > small)
				n = small;
			if (!store && last_chunk && rest > small && rest <= seg_rows + small)
				n = rest - small;
			char *buf = ctx->stage + b * seg_bytes;
			const size_t bytes = (size_t)n * pl->row_bytes;
			char *host = obj + (size_t)off * pl->row_bytes;

			a.row_begin = c * a.rows_per_chunk + off;
			a.nrows = n;
			a.stage = buf;
			if (store) {
				if (nseg >= XFER_STAGE_BUFS &&
				    CTX_RC(ctx, cudaStreamWaitEvent(ctx->sk, ctx->seg_free[b], 0)))
					return -EIO;
				rc = kv_xfer_dispatch(true, a, pl->inl, pl->align, ctx->sk);
				if (rc || CTX_RC(ctx, cudaEventRecord(ctx->seg_ready[b], ctx->sk)) ||
				    CTX_RC(ctx, cudaStreamWaitEvent(ctx->sc, ctx->seg_ready[b], 0)) ||
				    CTX_RC(ctx, cudaMemcpyAsync(host, buf, bytes, cudaMemcpyDeviceToHost,
								ctx->sc)) ||
				    CTX_RC(ctx, cudaEventRecord(ctx->seg_free[b], ctx->sc)))
					return -EIO;
			} else {
				if (nseg >= XFER_STAGE_BUFS &&
				    CTX_RC(ctx, cudaStreamWaitEvent(ctx->sc, ctx->seg_free[b], 0)))
					return -EIO;
				if (CTX_RC(ctx, cudaMemcpyAsync(buf, host, bytes, cudaMemcpyHostToDevice,
								ctx->sc)) ||
				    CTX_RC(ctx, cudaEventRecord(ctx->seg_ready[b], ctx->sc)) ||
				    CTX_RC(ctx, cudaStreamWaitEvent(ctx->sk, ctx->seg_ready[b], 0)))
					return -EIO;
				rc = kv_xfer_dispatch(false, a, pl->inl, pl->align, ctx->sk);
				if (rc || CTX_RC(ctx, cudaEventRecord(ctx->seg_free[b], ctx->sk)))
					return -EIO;
			}
		}
	}
	if (store && !nseg)
		*last = ctx->sk;
	return 0;
}

/* ---- isolated IPC: LMCache's timeline semaphores ---------------------------------- */

typedef CUresult (*stream_value_fn)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);

/* cuStreamWaitValue64 / cuStreamWriteValue64, from the runtime (no libcuda link). */
static stream_value_fn stream_value_entry(const char *name)
{
	cudaDriverEntryPointQueryResult q;
	void *fn = NULL;

	if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &q) !=
		    cudaSuccess ||
	    q != cudaDriverEntryPointSuccess)
		return NULL;
	return (stream_value_fn)fn;
}

static uint64_t be64_load(const unsigned char *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static void be64_store(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)v;
}

/* The client's semaphore buffer of handle @h, opened once and kept (LRU). */
static int sem_peer_open(struct xfer_cuda_ctx *ctx, const unsigned char *h, void **base)
{
	struct xfer_cuda_ctx::sem_peer *victim = &ctx->peers[0];
	cudaIpcMemHandle_t mh;

	for (int i = 0; i < XFER_SEM_PEERS; i++) {
		struct xfer_cuda_ctx::sem_peer *p = &ctx->peers[i];

		if (p->base && !memcmp(p->h, h, sizeof(p->h))) {
			p->used = ++ctx->peer_clock;
			*base = p->base;
			return 0;
		}
		if (!p->base || p->used < victim->used)
			victim = p;
	}
	if (victim->base) {
		/* NOTE: unmapping waits for nothing of ours: every job before this
		 * one has completed (xfer_job is synchronous). */
		(void)cudaIpcCloseMemHandle(victim->base);
		victim->base = NULL;
	}
	memcpy(&mh, h, sizeof(mh));
	/* NOTE: synchronizes with the driver; maps the client's 32 KiB buffer. */
	if (CTX_RC(ctx, cudaIpcOpenMemHandle(&victim->base, mh, cudaIpcMemLazyEnablePeerAccess))) {
		victim->base = NULL;
		return -EIO;
	}
	memcpy(victim->h, h, sizeof(victim->h));
	victim->used = ++ctx->peer_clock;
	*base = victim->base;
	return 0;
}

/*
 * Make stream sk wait until the client's slot reaches its sequence number
 * (handle validated by the protocol decoder: version 1). seq 0 was never
 * recorded: nothing to wait for.
 */
static int sem_wait(struct xfer_cuda_ctx *ctx, const unsigned char *handle)
{
	const uint64_t off = be64_load(handle + 65), seq = be64_load(handle + 73);
	static stream_value_fn wait_fn;
	void *base;
	int rc;

	if (handle[0] != 1 || off % 8 || off >= XFER_CUDA_SEM_SLOTS * 8)
		return -EINVAL;
	if (seq == 0)
		return 0;
	if (!wait_fn && !(wait_fn = stream_value_entry("cuStreamWaitValue64")))
		return -EIO;
	rc = sem_peer_open(ctx, handle + 1, &base);
	if (rc)
		return rc;
	if (wait_fn((CUstream)ctx->sk, (CUdeviceptr)(uintptr_t)((char *)base + off), seq,
		    CU_STREAM_WAIT_VALUE_GEQ) != CUDA_SUCCESS)
		return -EIO;
	return 0;
}

/*
 * Signal this worker's slot on @stream after what is queued there, and put
 * the handle a client waits on in @out (81 bytes).
 */
static int sem_signal(struct xfer_cuda_ctx *ctx, cudaStream_t stream, unsigned char *out)
{
	static stream_value_fn write_fn;
	const uint64_t slot_off = 8;	/* slot 0 is LMCache's probe slot */

	if (!write_fn && !(write_fn = stream_value_entry("cuStreamWriteValue64")))
		return -EIO;
	if (!ctx->sem) {
		if (CTX_RC(ctx, cudaMalloc((void **)&ctx->sem, XFER_CUDA_SEM_SLOTS * 8)) ||
		    CTX_RC(ctx, cudaMemset(ctx->sem, 0, XFER_CUDA_SEM_SLOTS * 8)) ||
		    CTX_RC(ctx, cudaIpcGetMemHandle(&ctx->sem_h, ctx->sem))) {
			if (ctx->sem)
				cudaFree(ctx->sem);
			ctx->sem = NULL;
			return -EIO;
		}
	}
	if (write_fn((CUstream)stream, (CUdeviceptr)(uintptr_t)((char *)ctx->sem + slot_off),
		     ctx->sem_seq + 1, 0) != CUDA_SUCCESS)
		return -EIO;
	ctx->sem_seq++;
	out[0] = 1;
	memcpy(out + 1, &ctx->sem_h, sizeof(ctx->sem_h));
	be64_store(out + 65, slot_off);
	be64_store(out + 73, ctx->sem_seq);
	return 0;
}

static int xfer_job(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *j, bool store)
{
	const bool retrieve = !store;
	struct job_plan pl = {};
	enum xfer_cuda_path path;
	cudaStream_t last;
	int rc;

	if (!ctx || !j)
		return -EINVAL;
	if (ctx->failed)
		return -EIO;
	if (ctx->inflight) {
		/* A timed-out job: the table and the ring are its until it ends. */
		if (CUDA_RC(cudaSetDevice(ctx->dev)))
			return -EIO;
		rc = ctx_wait(ctx, 0, 0);
		if (rc)
			return rc == -ETIMEDOUT ? -EBUSY : rc;
	}
	if (j->path == XFER_CUDA_PATH_DEFAULT)
		path = ctx->path[retrieve];
	else if ((rc = resolve_path(ctx, j->path, retrieve, &path)))
		return rc;
	if (CUDA_RC(cudaSetDevice(ctx->dev)))
		return -EIO;
	rc = job_validate(ctx, j, store, &pl);
	if (rc)
		return rc;

	/*
	 * Table: layers[NL] | objs[nchunks] | slots[ntokens]: inline in the
	 * launch parameters when it fits, else one H2D copy into the ctx's
	 * device table (the pinned twin is free: the previous job completed).
	 */
	const size_t entries = (size_t)pl.NL + pl.nchunks + j->ntokens;
	struct kv_xfer_table inl;
	uint64_t *t;
	if (entries <= XFER_INLINE_ENTRIES) {
		pl.inl = &inl;
		t = inl.e;
	} else {
		rc = ctx_table_reserve(ctx, entries);
		if (rc)
			return rc;
		t = ctx->tab_host;
	}
	for (uint32_t i = 0; i < pl.NL; i++)
		*t++ = (uint64_t)(uintptr_t)j->layers[i];
	for (uint32_t c = 0; c < pl.nchunks; c++)
		*t++ = (uint64_t)(uintptr_t)j->objs[c];
	memcpy(t, j->slots, (size_t)j->ntokens * sizeof(int64_t));
	if (!pl.inl && CTX_RC(ctx, cudaMemcpyAsync(ctx->tab_dev, ctx->tab_host, entries * 8,
						   cudaMemcpyHostToDevice, ctx->sk)))
		return -EIO;

	if (j->wait_event) {
		cudaIpcEventHandle_t h;
		cudaEvent_t ev;

		static_assert(sizeof(h) == XFER_CUDA_IPC_HANDLE_BYTES, "cudaIpcEventHandle_t size");
		memcpy(&h, j->wait_event, sizeof(h));
		if (CTX_RC(ctx, cudaIpcOpenEventHandle(&ev, h)))
			goto out_sync;
		rc = CTX_RC(ctx, cudaStreamWaitEvent(ctx->sk, ev, 0));
		/* The wait keeps what it needs; the handle may go now. */
		(void)cudaEventDestroy(ev);
		if (rc)
			goto out_sync;
	}
	if (j->wait_semaphore) {
		rc = sem_wait(ctx, (const unsigned char *)j->wait_semaphore);
		if (rc)
			goto out_sync;
	}

	last = ctx->sk;
	if (path == XFER_CUDA_PATH_ZEROCOPY)
		rc = run_zerocopy(ctx, j, &pl, store);
	else
		rc = run_staged(ctx, j, &pl, store, &last);
	if (rc)
		goto out_sync;
	/* before "done": the reply then means the client's wait is already met */
	if (j->done_semaphore) {
		rc = sem_signal(ctx, last, (unsigned char *)j->done_semaphore);
		if (rc)
			goto out_sync;
	}
	if (CTX_RC(ctx, cudaEventRecord(ctx->done, last)))
		goto out_sync;
	if (j->done_event) {
		const unsigned i = ctx->ipc_next++ % XFER_EVENT_RING;

		if (CTX_RC(ctx, cudaEventRecord(ctx->ipc_ev[i], last)))
			goto out_sync;
		memcpy(j->done_event, &ctx->ipc_h[i], XFER_CUDA_IPC_HANDLE_BYTES);
	}

	{
		const uint32_t first_tok = store ? 0 : KS_MINU(j->skip_tokens, j->ntokens);
		const uint64_t bytes = (uint64_t)pl.K * pl.NL * (j->ntokens - first_tok) * pl.row_bytes;

		return ctx_wait(ctx, j->timeout_ms, bytes / XFER_POLL_GBPS, j);
	}

out_sync:
	/*
	 * Part of the job may be queued on either stream: never return while
	 * it could still touch the caller's buffers. Join sc into sk and wait,
	 * bounded by the job's timeout. NOTE: synchronizes (error path only).
	 */
	if (!ctx->failed && !CTX_RC(ctx, cudaEventRecord(ctx->seg_ready[0], ctx->sc)) &&
	    !CTX_RC(ctx, cudaStreamWaitEvent(ctx->sk, ctx->seg_ready[0], 0)) &&
	    !CTX_RC(ctx, cudaEventRecord(ctx->done, ctx->sk)) &&
	    ctx_wait(ctx, j->timeout_ms, 0) == -ETIMEDOUT)
		return -ETIMEDOUT;
	return rc ? rc : -EIO;
}

extern "C" int xfer_cuda_store(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *job)
{
	return xfer_job(ctx, job, true);
}

extern "C" int xfer_cuda_retrieve(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *job)
{
	return xfer_job(ctx, job, false);
}
