/*
 * transfer_cuda_stub.c - the CUDA transfer engine's API when kvstash is
 * built without CUDA: every call returns -ENODEV, so the server runs on the
 * host backend alone. With CUDA, transfer_cuda.cu defines these and this
 * file compiles to nothing (cmake/cuda.cmake also drops it from the build).
 */
#include "transfer_cuda.h"

#ifndef KVSTASH_HAVE_CUDA

#include <errno.h>

int xfer_cuda_device_count(int *count)
{
	if (count)
		*count = 0;
	return -ENODEV;
}

int xfer_cuda_device_name(int dev, char *buf, size_t len)
{
	(void)dev, (void)buf, (void)len;
	return -ENODEV;
}

int xfer_cuda_device_uuid(int dev, char out[XFER_CUDA_UUID_STR_BYTES])
{
	(void)dev, (void)out;
	return -ENODEV;
}

int xfer_cuda_device_by_uuid(const char *uuid, int *ordinal)
{
	(void)uuid, (void)ordinal;
	return -ENODEV;
}

int xfer_cuda_host_register(void *base, size_t bytes)
{
	(void)base, (void)bytes;
	return -ENODEV;
}

int xfer_cuda_host_unregister(void *base)
{
	(void)base;
	return -ENODEV;
}

int xfer_cuda_ipc_open_mem(int dev, const void *handle, void **dev_ptr)
{
	(void)dev, (void)handle, (void)dev_ptr;
	return -ENODEV;
}

int xfer_cuda_mem_range(int dev, const void *ptr, void **base, size_t *bytes)
{
	(void)dev;
	(void)ptr;
	(void)base;
	(void)bytes;
	return -ENODEV;
}

int xfer_cuda_ipc_close_mem(int dev, void *dev_ptr)
{
	(void)dev, (void)dev_ptr;
	return -ENODEV;
}

const char *xfer_cuda_path_name(enum xfer_cuda_path p)
{
	switch (p) {
	case XFER_CUDA_PATH_DEFAULT: return "default";
	case XFER_CUDA_PATH_ZEROCOPY: return "zerocopy";
	case XFER_CUDA_PATH_STAGED: return "staged";
	}
	return "unknown";
}

int xfer_cuda_ctx_create(int dev, const struct xfer_cuda_opts *opts, struct xfer_cuda_ctx **out)
{
	(void)dev, (void)opts;
	if (out)
		*out = NULL;
	return -ENODEV;
}

void xfer_cuda_ctx_destroy(struct xfer_cuda_ctx *ctx)
{
	(void)ctx;
}

int xfer_cuda_ctx_failed(const struct xfer_cuda_ctx *ctx)
{
	(void)ctx;
	return 1;
}

int xfer_cuda_ctx_device(const struct xfer_cuda_ctx *ctx)
{
	(void)ctx;
	return -ENODEV;
}

enum xfer_cuda_path xfer_cuda_ctx_path(const struct xfer_cuda_ctx *ctx, int retrieve)
{
	(void)ctx, (void)retrieve;
	return XFER_CUDA_PATH_DEFAULT;
}

int xfer_cuda_drain(struct xfer_cuda_ctx *ctx, unsigned timeout_ms)
{
	(void)ctx, (void)timeout_ms;
	return -ENODEV;
}

int xfer_cuda_store(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *job)
{
	(void)ctx, (void)job;
	return -ENODEV;
}

int xfer_cuda_retrieve(struct xfer_cuda_ctx *ctx, const struct xfer_cuda_job *job)
{
	(void)ctx, (void)job;
	return -ENODEV;
}

#else
/* ISO C wants at least one declaration in a translation unit. */
typedef int xfer_cuda_stub_unused;
#endif /* KVSTASH_HAVE_CUDA */
