/*
 * transfer_cuda.h - the CUDA transfer engine: paged GPU KV <-> chunk objects
 * in the pinned host pool, plus device discovery, pool registration and CUDA
 * IPC (protocol.md §5.2, §5.3, §7).
 *
 * Plain C, no CUDA types: every handle crosses this header as 64 raw bytes.
 * Built from transfer_cuda.cu when the CUDA toolkit is found
 * (KVSTASH_HAVE_CUDA); otherwise transfer_cuda_stub.c makes every function
 * return -ENODEV (and xfer_cuda_ctx_destroy a no-op).
 *
 * Threads. The discovery, registration and IPC functions may be called from
 * any thread. A struct xfer_cuda_ctx belongs to one transfer worker: only
 * that worker's thread calls the job functions on it, and it owns its
 * streams, events, device-side tables and staging buffers, so no lock is
 * taken on the data path and none may be held by the caller across a call
 * (each call enters the CUDA driver and waits for the device, bounded).
 *
 * Errors: every function returns 0 or -errno; the codes are listed at each.
 * A CUDA error is logged (log_error) and returned as -EIO. A sticky error
 * (the device context is unusable, e.g. a kernel fault) marks the ctx
 * failed: every later job on it returns -EIO at once; destroy it and report
 * the device down. Other ctxs and devices keep working.
 */
#ifndef KS_TRANSFER_CUDA_H
#define KS_TRANSFER_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of a cudaIpcMemHandle_t and of a cudaIpcEventHandle_t. */
#define XFER_CUDA_IPC_HANDLE_BYTES 64
/*
 * LMCache's "isolated IPC" completion handle (struct "!B64sQQ"): version 1,
 * the cudaIpcMemHandle_t of the exporter's semaphore buffer, the byte offset
 * of a u64 slot in it, and a sequence number. The exporter writes seq into
 * the slot (cuStreamWriteValue64) when its work is done; the importer's
 * stream waits for slot >= seq (cuStreamWaitValue64, GEQ). seq 0: done.
 */
#define XFER_CUDA_SEM_HANDLE_BYTES 81
#define XFER_CUDA_SEM_SLOTS 4096	/* u64 slots of one semaphore buffer (32 KiB) */
/* "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" plus its NUL. */
#define XFER_CUDA_UUID_STR_BYTES 37

/* ---- devices ---------------------------------------------------------------- */

/*
 * Number of CUDA devices this process sees. Returns 0 with *count >= 1, or
 * -ENODEV with *count = 0 when there is no driver or no device.
 */
int xfer_cuda_device_count(int *count);

/* Device @dev's marketing name ("NVIDIA H100 80GB HBM3"). 0, -EINVAL, -ENODEV. */
int xfer_cuda_device_name(int dev, char *buf, size_t len);

/* Device @dev's UUID as lowercase 8-4-4-4-12 hex, no "GPU-". 0, -EINVAL, -ENODEV. */
int xfer_cuda_device_uuid(int dev, char out[XFER_CUDA_UUID_STR_BYTES]);

/*
 * Map a device UUID string (protocol.md §5.2 `device_uuid`: 8-4-4-4-12 hex,
 * an optional "GPU-" prefix; hex digits of either case) to this process's
 * device ordinal. Returns 0 with *ordinal set, -EINVAL for a malformed
 * string, -ENODEV when no visible device has that UUID (or no CUDA).
 */
int xfer_cuda_device_by_uuid(const char *uuid, int *ordinal);

/* ---- the host pool -------------------------------------------------------------- */

/*
 * Pin [@base, @base + @bytes) for every device (cudaHostRegister, portable +
 * mapped), so the copy engine reaches full speed and kernels can address it
 * through UVA at the same pointer. Called once by the pool before any
 * transfer that touches it. @base should be page aligned.
 * Returns 0, -EINVAL (NULL or 0 bytes), -EEXIST (already registered),
 * -ENOMEM (the driver could not pin it), -ENODEV, -EIO.
 */
int xfer_cuda_host_register(void *base, size_t bytes);
/* Undo xfer_cuda_host_register(). No transfer may be in flight on it. 0, -EINVAL, -ENODEV, -EIO. */
int xfer_cuda_host_unregister(void *base);

/* ---- CUDA IPC ------------------------------------------------------------------- */

/*
 * Map a peer's allocation on device @dev from its 64-byte cudaIpcMemHandle_t
 * (cudaIpcOpenMemHandle with cudaIpcMemLazyEnablePeerAccess). *dev_ptr is
 * the allocation's base; add the descriptor's `offset`. Map each distinct
 * handle once per process (protocol.md §5.2) and close it with
 * xfer_cuda_ipc_close_mem() on UNREGISTER or reaping; the mapping stays
 * valid after the exporting process dies, until it is closed.
 * Returns 0, -EINVAL (bad device, NULL), -ENODEV, -EIO (the driver refused
 * the handle: stale, from this process, or another machine's).
 */
int xfer_cuda_ipc_open_mem(int dev, const void *handle, void **dev_ptr);
/*
 * The device allocation containing @ptr on @dev: its base and size
 * (cuMemGetAddressRange). Used to check a registration's layers against
 * what the client really shared, so a wrong nbytes cannot make a kernel
 * fault. 0, -EINVAL (not a device allocation), -ENODEV, -EIO.
 */
int xfer_cuda_mem_range(int dev, const void *ptr, void **base, size_t *bytes);
/* Unmap what xfer_cuda_ipc_open_mem() returned. No job may be using it. 0, -EINVAL, -ENODEV, -EIO. */
int xfer_cuda_ipc_close_mem(int dev, void *dev_ptr);

/* ---- per-worker context ------------------------------------------------------- */

/*
 * How the bytes cross PCIe.
 *   ZEROCOPY: one kernel moves every row straight between the paged device
 *             buffers and the mapped, pinned host objects (UVA).
 *   STAGED:   a kernel gathers/scatters into a device staging ring and the
 *             copy engine moves each segment with cudaMemcpyAsync; kernel
 *             and copies of successive segments overlap on two streams.
 *   DEFAULT:  the faster of the two as measured by bench/gpu_bench on an
 *             H100 (docs/performance.md, "GPU").
 */
enum xfer_cuda_path {
	XFER_CUDA_PATH_DEFAULT = 0,
	XFER_CUDA_PATH_ZEROCOPY = 1,
	XFER_CUDA_PATH_STAGED = 2,
};
const char *xfer_cuda_path_name(enum xfer_cuda_path p);

struct xfer_cuda_opts {
	enum xfer_cuda_path store_path;		/* DEFAULT: the measured default */
	enum xfer_cuda_path retrieve_path;	/* DEFAULT: the measured default */
	size_t staging_bytes;	/* device staging ring for STAGED; 0: 64 MiB */
	/*
	 * The registered host pool. When @host_bytes > 0 every object of every
	 * job must lie inside [@host_base, @host_base + @host_bytes) (-EFAULT
	 * otherwise), checked in O(chunks). When 0, each object is checked
	 * with cudaPointerGetAttributes (a few microseconds per chunk).
	 */
	const void *host_base;
	size_t host_bytes;
	/*
	 * A pool still being registered in the background, in address order
	 * (kvstashd's start): only [@host_base, @host_base +
	 * @host_registered_bytes) is checked at creation (nothing when 0), and
	 * the caller copies to or from no object outside the registered part.
	 * false: all of [@host_base, @host_base + @host_bytes) must be
	 * registered already.
	 */
	bool host_registering;
	size_t host_registered_bytes;
};

/* One worker's streams, events, tables and staging ring (opaque). */
struct xfer_cuda_ctx;

/*
 * Create a context on device @dev (@opts may be NULL for defaults).
 * Returns 0 with *out set, -EINVAL (bad device or options, host region not
 * registered), -EOPNOTSUPP (ZEROCOPY asked on a device that cannot address
 * registered host memory at its host pointer), -ENOMEM, -ENODEV, -EIO.
 */
int xfer_cuda_ctx_create(int dev, const struct xfer_cuda_opts *opts, struct xfer_cuda_ctx **out);

/*
 * Free @ctx (NULL is fine). If a timed-out job is still running, waits up
 * to 10 s for it; if it is still running then, the device buffers are
 * leaked with a log line rather than freed under a running copy.
 */
void xfer_cuda_ctx_destroy(struct xfer_cuda_ctx *ctx);

/* 1 once a sticky CUDA error has made @ctx unusable, else 0. */
int xfer_cuda_ctx_failed(const struct xfer_cuda_ctx *ctx);
/* The device ordinal and the paths that DEFAULT resolved to for @ctx. */
int xfer_cuda_ctx_device(const struct xfer_cuda_ctx *ctx);
enum xfer_cuda_path xfer_cuda_ctx_path(const struct xfer_cuda_ctx *ctx, int retrieve);

/*
 * Wait up to @timeout_ms for a job that returned -ETIMEDOUT to finish.
 * Returns 0 when nothing is in flight any more (its buffers may now be
 * released), -ETIMEDOUT, or -EIO (the job failed on the device).
 */
int xfer_cuda_drain(struct xfer_cuda_ctx *ctx, unsigned timeout_ms);

/*
 * One STORE or RETRIEVE of one request (protocol.md §3 STORE/RETRIEVE, §7).
 *
 * Range token t (0 <= t < ntokens) lives in paged slot slots[t]
 * (= block_ids[t / BS] * BS + t % BS, computed by the caller) of every
 * layer. Chunk c (0 <= c < ceil(ntokens / chunk_tokens)) is range tokens
 * [c*C, min((c+1)*C, ntokens)), n_c tokens, and its object objs[c] is dense
 * [K, NL, n_c, hidden] in the KV dtype, K = layout->kv_planes:
 *   objs[c][k][l][t'][h*HS + d] == layer l's paged element of token c*C+t'
 * (a full chunk is the pool's [K, NL, C, hidden] object; a short last chunk
 * is packed with n_c, as xfer_host_gather() packs an object of n_c tokens).
 */
struct xfer_cuda_job {
	const struct kv_layout *layout;	/* borrowed; kv_layout_init() succeeded */
	void *const *layers;	/* [NL] device address of each layer's element 0
				 * (registration base + offset), on the ctx's device */
	const int64_t *slots;	/* [ntokens] paged slots; each in [0, NB*BS) */
	uint32_t ntokens;	/* tokens of the range; 0 is a no-op */
	uint32_t chunk_tokens;	/* C, > 0 */
	void *const *objs;	/* [ceil(ntokens / C)] host objects (in the registered
				 * pool); RETRIEVE: NULL allowed for fully skipped chunks */
	uint32_t skip_tokens;	/* RETRIEVE only: range tokens [0, skip_tokens) are
				 * not written (protocol.md RETRIEVE step 2); STORE: 0 */
	const void *wait_event;	/* 64-byte cudaIpcEventHandle_t the copy must wait
				 * for (the client's), or NULL */
	void *done_event;	/* out, 64 bytes or NULL: handle of an interprocess
				 * event recorded after the copies (the reply's event) */
	const void *wait_semaphore;	/* 81-byte isolated-IPC handle the copy must wait
					 * for (the client's), or NULL */
	void *done_semaphore;	/* out, 81 bytes or NULL: this worker's semaphore
				 * handle, signalled after the copies */
	unsigned timeout_ms;	/* bound on the wait for completion */
	enum xfer_cuda_path path;	/* DEFAULT: the ctx's path for this direction */
	/* Optional: called once, on the calling thread, with no lock held, when
	 * the completion poll stops sleeping because the copy's end is expected
	 * within about 80 us (XFER_POLL_SLACK_NS): the caller may get ready for
	 * the completion (xfer_job_near_done). Not called for a job that ends
	 * before that point or fails first. */
	void (*near_done)(void *arg);
	void *near_done_arg;
};

/*
 * STORE: copy paged device KV -> host objects. RETRIEVE: copy host objects
 * -> paged device KV, leaving range tokens [0, skip_tokens) untouched.
 *
 * Synchronous: returns 0 only after every byte has landed (the host may
 * read the objects / the engine may read the blocks; *done_event, if asked
 * for, is already complete). Nothing is launched unless every argument
 * checks out, so a rejected job writes nothing.
 *
 * Returns
 *   0           done;
 *   -EINVAL     NULL or inconsistent arguments (chunk_tokens 0, a NULL
 *               object that must be copied, NL mismatch, STORE with skip);
 *   -ERANGE     a slot outside [0, NB*BS) (checked on the host before launch);
 *   -EFAULT     an object outside the registered host pool;
 *   -E2BIG      more than 2^31 rows (K * NL * ntokens) in one job;
 *   -ENOMEM     the ctx's tables could not grow;
 *   -EBUSY      an earlier job timed out and is still running: xfer_cuda_drain();
 *   -ETIMEDOUT  not complete after timeout_ms: the copy is STILL RUNNING and
 *               owns the buffers until xfer_cuda_drain() returns 0;
 *   -EIO        a CUDA error (logged; the ctx is failed if it was sticky);
 *   -ENODEV     built without CUDA.
 */
int xfer_cuda_store(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *job);
int xfer_cuda_retrieve(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *job);

#ifdef __cplusplus
}
#endif

#endif /* KS_TRANSFER_CUDA_H */
