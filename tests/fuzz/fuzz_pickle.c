/*
 * fuzz_pickle.c - libFuzzer target for the restricted pickle reader and the
 * CudaIPCWrapper decoder (src/pickle.c), and for the ext-1 path of
 * REGISTER_KV_CACHE that uses them (src/protocol.c).
 *
 * Input: the raw pickle bytes (the seeds in tests/fuzz/corpus_pickle are the
 * goldens of tests/data, real PyTorch 2.11 pickles among them). The input is
 * copied into an exact-size heap buffer so ASan flags any read past its end.
 *
 * Checked beyond "no crash": only the documented error codes come back, with
 * a one-line NUL-terminated reason; a successful parse has exactly one root;
 * a decoded wrapper has sane fields; and the same bytes as an ext-1 element
 * of REGISTER_KV_CACHE decode into a descriptor whose extent fits nbytes, or
 * fail with -EPROTO/-E2BIG/-ENOMEM.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include "pickle.h"
#include "protocol.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ASSERT(c)                         \
	do {                              \
		if (!(c))                 \
			__builtin_trap(); \
	} while (0)

static void check_err(const char *err, size_t errlen)
{
	ASSERT(memchr(err, '\0', errlen) && !strchr(err, '\n') && err[0] != '\0');
}

static struct proto_buf own(const void *p, size_t n)
{
	uint8_t *b = malloc(n ? n : 1);

	ASSERT(b);
	if (n)
		memcpy(b, p, n);
	return (struct proto_buf){ b, n };
}

static struct proto_buf packed(msgpack_sbuffer *sb)
{
	struct proto_buf b = own(sb->data, sb->size);

	msgpack_sbuffer_destroy(sb);
	return b;
}

static void register_path(const uint8_t *data, size_t size)
{
	struct proto_buf f[5];
	struct proto_request r;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	char err[256];
	int rc;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_int(&pk, PROTO_REGISTER_KV_CACHE);
	f[0] = packed(&sb);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_int(&pk, 7);
	f[1] = packed(&sb);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 2);
	for (int i = 0; i < 2; i++) {
		msgpack_pack_ext(&pk, size, 1);
		msgpack_pack_ext_body(&pk, data, size);
	}
	f[2] = packed(&sb);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_str(&pk, 1);
	msgpack_pack_str_body(&pk, "m", 1);
	f[3] = packed(&sb);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_int(&pk, 1);
	f[4] = packed(&sb);

	rc = proto_decode_request(&f[0], &f[1], 4, &r, err, sizeof(err));
	if (rc == 0) {
		ASSERT(r.nlayers == 2);
		for (size_t i = 0; i < r.nlayers; i++) {
			struct kv_layout l = r.layers[i].layout;
			char lerr[128];

			ASSERT(r.layers[i].kind == PROTO_KV_CUDA_IPC ||
			       r.layers[i].kind == PROTO_KV_HOST_SHM);
			ASSERT(kv_layout_init(&l, lerr, sizeof(lerr)) == 0);
			ASSERT(r.layers[i].offset + l.extent_bytes >= r.layers[i].offset);
			ASSERT(r.layers[i].offset + l.extent_bytes <= r.layers[i].nbytes);
			ASSERT(strlen(r.layers[i].device_uuid) <= PROTO_UUID_MAX);
		}
		proto_request_free(&r);
	} else {
		ASSERT(rc == -EPROTO || rc == -E2BIG || rc == -ENOMEM);
		check_err(err, sizeof(err));
		ASSERT(!r.layers && !r.key.token_ids && !r.block_ids);
	}
	for (int i = 0; i < 5; i++)
		free((void *)f[i].data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct proto_buf in = own(data, size);
	struct pk_cuda_ipc w;
	struct pk_doc *doc = NULL;
	char err[256];
	int rc;

	err[0] = 'x';
	rc = pk_parse(in.data, in.len, &doc, err, sizeof(err));
	if (rc == 0) {
		const struct pk_value *root = pk_root(doc);

		ASSERT(root && root->kind <= PK_OBJECT && root->depth <= PK_MAX_DEPTH);
		if (root->kind == PK_TUPLE || root->kind == PK_LIST || root->kind == PK_DICT)
			ASSERT(root->n <= PK_MAX_ITEMS && (!root->n || root->items));
		(void)pk_dict_get(root, "handle");
		pk_free(doc);
	} else {
		ASSERT(rc == -EPROTO || rc == -EPERM || rc == -E2BIG || rc == -ENOMEM);
		ASSERT(!doc);
		check_err(err, sizeof(err));
	}

	err[0] = 'x';
	rc = pk_cuda_ipc_decode(in.data, in.len, &w, err, sizeof(err));
	if (rc == 0) {
		ASSERT(w.ndim >= 1 && w.ndim <= PK_MAX_DIMS);
		ASSERT(w.kind == PK_WRAPPER_CUDA_IPC || w.kind == PK_WRAPPER_RAW_CUDA_IPC ||
		       w.kind == PK_WRAPPER_CPU_SHM);
		ASSERT(memchr(w.shm_name, '\0', sizeof(w.shm_name)));
		ASSERT(w.kind == PK_WRAPPER_CPU_SHM ? w.shm_name[0] && w.storage_size_bytes :
		       !w.shm_name[0]);
		ASSERT(!w.has_alloc_offset || w.kind == PK_WRAPPER_RAW_CUDA_IPC);
		ASSERT(memchr(w.dtype, '\0', sizeof(w.dtype)) && w.dtype[0]);
		ASSERT(memchr(w.device_uuid, '\0', sizeof(w.device_uuid)));
		ASSERT(memchr(w.ref_counter, '\0', sizeof(w.ref_counter)));
		for (uint32_t i = 0; i < w.ndim; i++)
			ASSERT(w.shape[i] >= 0 && w.stride[i] >= 0);
	} else {
		ASSERT(rc == -EPROTO || rc == -EPERM || rc == -E2BIG || rc == -ENOMEM ||
		       rc == -EOPNOTSUPP);
		check_err(err, sizeof(err));
	}
	if (size <= PK_MAX_INPUT)
		register_path(in.data, in.len);
	free((void *)in.data);
	return 0;
}
