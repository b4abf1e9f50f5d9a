/*
 * pickle.h - a bounds-checked reader for the subset of Python pickle
 * (protocols 2 to 5) that LMCache's KV-cache wrappers use, and the decoder of
 * those wrappers (docs/pytorch-ipc.md).
 *
 * The reader builds a small tree of plain values (None, bool, int, bytes,
 * str, tuple, list, dict, allow-listed globals and objects of allow-listed
 * classes). It never executes anything: a GLOBAL names an entry of a fixed
 * table or is an error, REDUCE applies only the three data transforms the
 * wrapper's pickles need (torch.Size(tuple), _codecs.encode(str, "latin1")
 * and bytes() for protocol 2's bytes), NEWOBJ only creates an empty object of
 * an allow-listed class and BUILD only attaches a state dict to it.
 *
 * Every byte is untrusted: lengths are checked against the input, and the
 * limits below bound memory, nesting and work; any violation is an error with
 * a one-line reason, never an assert. This file logs nothing, takes no lock
 * and holds no global state.
 */
#ifndef KS_PICKLE_H
#define KS_PICKLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Limits on untrusted input (a real wrapper pickle is ~450 bytes, 40 values). */
#define PK_MAX_INPUT (64u * 1024)	/* bytes of one pickle */
#define PK_MAX_VALUES 4096u		/* values one pickle may create */
#define PK_MAX_STACK 256u		/* values on the unpickler's stack */
#define PK_MAX_MARKS 32u		/* MARKs open at once */
#define PK_MAX_DEPTH 16u		/* containers nested in containers */
#define PK_MAX_ITEMS 4096u		/* entries of one tuple/list/dict */
#define PK_MAX_MEMO 1024u		/* memo slots (indices 0..PK_MAX_MEMO-1) */
#define PK_MAX_BYTES (16u * 1024)	/* one str or bytes */
#define PK_MAX_ARENA (1u << 20)		/* decoder memory for one pickle */

enum pk_kind {
	PK_NONE = 0,
	PK_BOOL,
	PK_INT,
	PK_BYTES,
	PK_STR,
	PK_TUPLE,
	PK_LIST,
	PK_DICT,
	PK_GLOBAL,	/* an allow-listed name (class, dtype, reducer) */
	PK_OBJECT,	/* NEWOBJ of an allow-listed class, plus its BUILD state */
};

/*
 * The allow-list: every GLOBAL a pickle may name. A wrapper class is allowed
 * under each module LMCache has defined it in (docs/pytorch-ipc.md §1), by
 * exact name; the entry says which class, not which module.
 */
enum pk_global {
	PK_G_CUDA_IPC_WRAPPER = 0,	/* lmcache...CudaIPCWrapper */
	PK_G_RAW_CUDA_IPC_WRAPPER,	/* lmcache...RawCudaIPCWrapper */
	PK_G_TORCH_SIZE,		/* torch.Size: REDUCE (tuple,) -> tuple */
	PK_G_TORCH_DTYPE,		/* torch.<KV dtype>: a value */
	PK_G_CODECS_ENCODE,		/* _codecs.encode: protocol 2 bytes */
	PK_G_BYTES,			/* builtins.bytes: protocol 2 b"" */
	PK_G_CPU_SHM_TENSOR_WRAPPER,	/* lmcache...CpuShmTensorWrapper */
	PK_G_VMM_CUDA_IPC_WRAPPER,	/* lmcache...VmmCudaIPCWrapper: parsed, then refused */
};

struct pk_value {
	enum pk_kind kind;
	uint32_t depth;		/* containers below this one; 0 for scalars */
	int64_t i;		/* BOOL (0/1), INT */
	/* BYTES, STR (UTF-8, validated): borrowed from the input or the doc arena */
	const uint8_t *data;
	size_t len;
	/* TUPLE, LIST: items[0..n); DICT: key/value pairs items[2k], items[2k+1] */
	struct pk_value **items;
	uint32_t n, cap;
	/* GLOBAL */
	enum pk_global global;
	const char *name;	/* "module.name", static */
	/* OBJECT */
	const struct pk_value *cls;	/* a GLOBAL that is a class */
	const struct pk_value *state;	/* a DICT, or NULL before BUILD */
};

/* A parsed pickle: owns every value; borrows the input until pk_free(). */
struct pk_doc;

/*
 * Parse one pickle: p[0, len) must be exactly one pickle ending with STOP.
 * Returns 0 with *out (free with pk_free), or with a reason in @err:
 *   -EPROTO   malformed: truncated, unknown or unsupported opcode, wrong
 *             operand types, stack/mark/memo misuse, trailing bytes,
 *             invalid UTF-8
 *   -EPERM    a GLOBAL outside the allow-list, or a REDUCE/NEWOBJ of one
 *             that is not allowed there
 *   -E2BIG    over one of the PK_MAX_* limits
 *   -ENOMEM
 */
int pk_parse(const uint8_t *p, size_t len, struct pk_doc **out, char *err, size_t errlen);
const struct pk_value *pk_root(const struct pk_doc *doc);
void pk_free(struct pk_doc *doc);

/* The value of key @name in DICT @d (last one wins), or NULL. */
const struct pk_value *pk_dict_get(const struct pk_value *d, const char *name);

/* ---- LMCache's KV-cache wrappers ---------------------------------------- */

#define PK_IPC_HANDLE_LEN 64u	/* cudaIpcMemHandle_t, cudaIpcEventHandle_t */
#define PK_MAX_DIMS 8u
#define PK_UUID_MAX 63u
#define PK_REF_COUNTER_MAX 255u
#define PK_DTYPE_MAX 31u
#define PK_SHM_NAME_MAX 255u	/* a POSIX shm name, leading '/' included */

enum pk_wrapper_kind {
	PK_WRAPPER_CUDA_IPC = 0,	/* CudaIPCWrapper: storage._share_cuda_() tuple */
	PK_WRAPPER_RAW_CUDA_IPC,	/* RawCudaIPCWrapper: raw cudaIpcGetMemHandle() */
	PK_WRAPPER_CPU_SHM,		/* CpuShmTensorWrapper: a POSIX shm segment */
};

/*
 * What a wrapper pickle says (docs/pytorch-ipc.md). For PK_WRAPPER_CUDA_IPC
 * the fields come from handle = storage._share_cuda_():
 *   (device, mem blob, storage size bytes, storage offset bytes,
 *    ref-counter file, ref-counter offset, event handle, event sync flag)
 * where the mem blob is a bare 64-byte cudaIpcMemHandle_t (PyTorch before the
 * versioned format) or [version][type 'c'][64-byte handle] (66 bytes). The
 * handle names the caching allocator's segment (cudaMalloc'd block); the
 * storage starts storage_offset_bytes into it and the tensor storage_offset
 * elements after that.
 *
 * PK_WRAPPER_RAW_CUDA_IPC: mem_handle is _ipc_handle_reserved, device -1,
 * storage_size_bytes _nbytes. In the current form (has_alloc_offset) the
 * handle names the allocation base, element 0 is alloc_offset bytes into it
 * and _nbytes covers the view only; in the older form (no _alloc_offset) the
 * handle names element 0 and _nbytes is the storage's size.
 *
 * PK_WRAPPER_CPU_SHM: shm_name is the segment (as sent: "/lmcache_kv_<pid>_<n>",
 * the oldest LMCache without the '/'), storage_size_bytes its mmap length
 * (nbytes, or _nbytes in the oldest form; from file offset 0), element 0 is
 * storage_offset elements into it; device -1, mem_handle all zero,
 * device_uuid as sent ("cpu").
 */
struct pk_cuda_ipc {
	enum pk_wrapper_kind kind;
	int32_t device;				/* handle[0], the sender's ordinal (else -1) */
	uint8_t mem_handle[PK_IPC_HANDLE_LEN];	/* cudaIpcMemHandle_t of the segment base */
	uint8_t handle_version;			/* 0: bare 64-byte handle; else the version byte */
	uint64_t storage_size_bytes;		/* handle[2] (Raw: _nbytes; CpuShm: nbytes) */
	uint64_t storage_offset_bytes;		/* handle[3]: segment base -> storage (else 0) */
	bool has_alloc_offset;			/* Raw: the state has _alloc_offset */
	uint64_t alloc_offset;			/* Raw: _alloc_offset, allocation base -> element 0 */
	char shm_name[PK_SHM_NAME_MAX + 1];	/* CpuShm: shm_open() name, as sent */
	char ref_counter[PK_REF_COUNTER_MAX + 1];	/* handle[4]: shm file name */
	uint64_t ref_counter_offset;		/* handle[5] */
	uint8_t event_handle[PK_IPC_HANDLE_LEN];	/* handle[6] */
	bool event_sync_required;		/* handle[7] */
	char dtype[PK_DTYPE_MAX + 1];		/* "bfloat16", from the torch global */
	uint32_t ndim;
	int64_t shape[PK_MAX_DIMS];
	int64_t stride[PK_MAX_DIMS];		/* elements */
	bool has_stride;			/* else: dense C order was filled in */
	uint64_t storage_offset;		/* elements from the storage start to element 0 */
	char device_uuid[PK_UUID_MAX + 1];	/* str(props.uuid) as sent */
};

/*
 * Decode the ext-1 body of LMCache's CudaIPCWrapper, RawCudaIPCWrapper or
 * CpuShmTensorWrapper into @out. Returns 0, the pk_parse() errors, or -EPROTO
 * (a field missing or of the wrong type or range) / -EOPNOTSUPP (a form
 * kvstash cannot open: VmmCudaIPCWrapper, an expandable-segment or
 * newer-version memory handle, an empty storage or shm segment), with a
 * one-line reason in @err. Callers must switch on out->kind.
 */
int pk_cuda_ipc_decode(const uint8_t *p, size_t len, struct pk_cuda_ipc *out, char *err,
		       size_t errlen);

#endif /* KS_PICKLE_H */
