/* Description: wire codec: protocol.md §8 bytes, request round trips, every bad input. Labels: unit */
/*
 * Byte-exact examples from protocol.md §8, encode -> decode round trips of
 * every request type, int widths, key forms (map with/without chunk_hash,
 * array, unknown keys), and each class of bad input with its error code.
 * Frames are built from hex or msgpack-c's packer into exact-size heap
 * buffers, so ASan catches any read past the end of a frame.
 */
#include <errno.h>
#include <string.h>

#include <msgpack.h>

#include "compiler.h"
#include "helpers.h"
#include "protocol.h"

/* ---- frame arena: every frame of one decode, freed by arena_reset() ---- */

#define ARENA_MAX 64
static void *arena[ARENA_MAX];
static size_t arena_n;

static void arena_reset(void)
{
	for (size_t i = 0; i < arena_n; i++)
		free(arena[i]);
	arena_n = 0;
}

static struct proto_buf arena_copy(const void *p, size_t n)
{
	uint8_t *b = malloc(n ? n : 1);

	REQUIRE(b && arena_n < ARENA_MAX);
	if (n)
		memcpy(b, p, n);
	arena[arena_n++] = b;
	return (struct proto_buf){ b, n };
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Hex (spaces allowed) -> bytes; returns the length. */
static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
	size_t n = 0;

	for (const char *p = hex; *p;) {
		if (*p == ' ' || *p == '\n') {
			p++;
			continue;
		}
		REQUIRE(hexval(p[0]) >= 0 && hexval(p[1]) >= 0 && n < cap);
		out[n++] = (uint8_t)(hexval(p[0]) << 4 | hexval(p[1]));
		p += 2;
	}
	return n;
}

static struct proto_buf H(const char *hex)
{
	static uint8_t tmp[1 << 16];

	return arena_copy(tmp, unhex(hex, tmp, sizeof(tmp)));
}

/* A packer whose output becomes a frame with P_done(). */
static msgpack_sbuffer psb;
static msgpack_packer ppk;
static msgpack_packer *P(void)
{
	msgpack_sbuffer_init(&psb);
	msgpack_packer_init(&ppk, &psb, msgpack_sbuffer_write);
	return &ppk;
}

static struct proto_buf P_done(void)
{
	struct proto_buf b = arena_copy(psb.data, psb.size);

	msgpack_sbuffer_destroy(&psb);
	return b;
}

static void pk_str(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);

	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, n ? s : "", n);
}

static struct proto_buf M(const struct proto_msg *m)
{
	return arena_copy(m->data, m->len);
}

/* ---- decode helpers ---- */

static char g_err[256];

static bool err_ok(void)
{
	return g_err[0] != '\0' && !strchr(g_err, '\n');
}

static int dec(int type, struct proto_request *r, const struct proto_buf *args, size_t n)
{
	struct proto_msg tm;
	int rc;

	REQUIRE(proto_encode_int(&tm, type) == 0);
	struct proto_buf t = M(&tm);
	proto_msg_free(&tm);
	memset(g_err, 0, sizeof(g_err));
	memset(r, 0xa5, sizeof(*r));	/* decode must not depend on a zeroed request */
	rc = proto_decode_request(&t, args, n, r, g_err, sizeof(g_err));
	if (rc) {
		/* every error: a one-line reason, and nothing left to free */
		if (!err_ok())
			fprintf(stderr, "bad err text for rc %d: '%s'\n", rc, g_err);
		CHECK(err_ok());
		CHECK(r->key.token_ids == NULL && r->layers == NULL && r->block_ids == NULL);
	}
	arena_reset();
	return rc;
}

#define NARGS(...) (sizeof((struct proto_buf[]){ __VA_ARGS__ }) / sizeof(struct proto_buf))
#define DEC(type, r, ...) dec((type), (r), (struct proto_buf[]){ __VA_ARGS__ }, NARGS(__VA_ARGS__))
#define DEC0(type, r) dec((type), (r), NULL, 0)

/* Expect @rc from a decode; on success the request is freed. */
#define EXPECT(rc_expected, call)                                                      \
	do {                                                                           \
		struct proto_request _r;                                               \
		int _rc = dec_##call;                                                  \
		if (_rc != (rc_expected))                                              \
			fprintf(stderr, "  err: %s\n", g_err);                         \
		CHECK_EQ(_rc, (rc_expected));                                          \
		if (!_rc)                                                              \
			proto_request_free(&_r);                                       \
	} while (0)
#define dec_DEC(type, ...) DEC(type, &_r, __VA_ARGS__)
#define dec_DEC0(type) DEC0(type, &_r)

/* ---- the key of §8, piecewise, so tests can drop or replace fields ---- */

static const char *const key_names_hex[7] = {
	"aa6d6f64656c5f6e616d65", "aa776f726c645f73697a65", "a9776f726b65725f6964",
	"a9746f6b656e5f696473",   "a57374617274",           "a3656e64",
	"aa726571756573745f6964",
};
static const char *const key_vals_hex[7] = { "a16d", "01", "c0", "9401020304", "00", "04", "a172" };
#define KEY_HEX_77                                                                    \
	"87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"                    \
	" a9776f726b65725f6964 c0 a9746f6b656e5f696473 94 01 02 03 04"                \
	" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172"

/*
 * Hex of a key map: field i omitted when omit == i, its value replaced when
 * over == i, plus @nextra extra entries in @extra (key and value hex).
 */
static const char *key_hex(int omit, int over, const char *over_val, int nextra, const char *extra)
{
	static char buf[8192];
	int n = 0;

	for (int i = 0; i < 7; i++)
		n += i != omit;
	snprintf(buf, sizeof(buf), "%02x", 0x80 + n + nextra);
	for (int i = 0; i < 7; i++) {
		if (i == omit)
			continue;
		strcat(buf, key_names_hex[i]);
		strcat(buf, i == over ? over_val : key_vals_hex[i]);
	}
	if (extra)
		strcat(buf, extra);
	return buf;
}

static const char *key_std(void)
{
	return key_hex(-1, -1, NULL, 0, NULL);
}

static const char *key_with(int field, const char *val)
{
	return key_hex(-1, field, val, 0, NULL);
}

static void check_std_key(const struct proto_key *k)
{
	CHECK_EQ(k->model_len, 1);
	CHECK(!strcmp(k->model, "m"));
	CHECK_EQ(k->world_size, 1);
	CHECK_EQ(k->worker_id, -1);
	CHECK_EQ(k->ntokens, 4);
	if (k->ntokens == 4)
		for (int i = 0; i < 4; i++)
			CHECK_EQ(k->token_ids[i], i + 1);
	CHECK_EQ(k->start, 0);
	CHECK_EQ(k->end, 4);
	CHECK_EQ(k->request_id_len, 1);
	CHECK(!strcmp(k->request_id, "r"));
}

/* ---- encoder byte checks ---- */

static void check_bytes(const struct proto_msg *m, const char *hex, const char *what)
{
	uint8_t want[4096];
	size_t n = unhex(hex, want, sizeof(want));

	if (m->len != n || memcmp(m->data, want, n)) {
		fprintf(stderr, "FAIL %s: %zu bytes:", what, m->len);
		for (size_t i = 0; i < m->len; i++)
			fprintf(stderr, " %02x", m->data[i]);
		fprintf(stderr, "\n  expected %s\n", hex);
		t_failures++;
	}
}

static void test_section8_bytes(void)
{
	struct proto_msg m;
	uint8_t ev[64];
	char hex[512];

	/* PING reply c3, GET_CHUNK_SIZE 256 = cd 01 00, NOOP "OK" = a2 4f 4b */
	REQUIRE(proto_encode_bool(&m, true) == 0);
	check_bytes(&m, "c3", "PING reply");
	proto_msg_free(&m);
	REQUIRE(proto_encode_bool(&m, false) == 0);
	check_bytes(&m, "c2", "false");
	proto_msg_free(&m);
	REQUIRE(proto_encode_int(&m, 256) == 0);
	check_bytes(&m, "cd 01 00", "GET_CHUNK_SIZE reply");
	proto_msg_free(&m);
	REQUIRE(proto_encode_str(&m, "OK") == 0);
	check_bytes(&m, "a2 4f 4b", "NOOP reply");
	proto_msg_free(&m);
	REQUIRE(proto_encode_nil(&m) == 0);
	check_bytes(&m, "c0", "None reply");
	proto_msg_free(&m);
	/* LOOKUP reply job 0, QUERY reply 0 */
	REQUIRE(proto_encode_int(&m, 0) == 0);
	check_bytes(&m, "00", "job 0");
	proto_msg_free(&m);

	/* host-path STORE/RETRIEVE reply */
	REQUIRE(proto_encode_xfer_reply(&m, NULL, 0, true) == 0);
	check_bytes(&m, "92 c4 00 c3", "host xfer reply");
	proto_msg_free(&m);
	REQUIRE(proto_encode_xfer_reply(&m, NULL, 0, false) == 0);
	check_bytes(&m, "92 c4 00 c2", "unknown-instance xfer reply");
	proto_msg_free(&m);
	/* GPU: 92 c4 40 <64-byte handle> c3 */
	for (int i = 0; i < 64; i++)
		ev[i] = (uint8_t)(0xa0 + i);
	strcpy(hex, "92 c4 40");
	for (int i = 0; i < 64; i++)
		snprintf(hex + strlen(hex), 4, "%02x", ev[i]);
	strcat(hex, "c3");
	REQUIRE(proto_encode_xfer_reply(&m, ev, 64, true) == 0);
	check_bytes(&m, hex, "gpu xfer reply");
	proto_msg_free(&m);

	/* UNREGISTER_KV_CACHE 12345 travels as cd 30 39 */
	int64_t id = 12345;
	REQUIRE(proto_encode_int(&m, id) == 0);
	check_bytes(&m, "cd 30 39", "instance 12345");
	proto_msg_free(&m);

	/* the 77-byte LOOKUP key */
	uint32_t toks[4] = { 1, 2, 3, 4 };
	struct proto_key k = { .model = "m", .model_len = 1, .world_size = 1, .worker_id = -1,
			       .token_ids = toks, .ntokens = 4, .start = 0, .end = 4,
			       .request_id = "r", .request_id_len = 1 };
	REQUIRE(proto_encode_key(&m, &k) == 0);
	CHECK_EQ(m.len, 77);
	check_bytes(&m, KEY_HEX_77, "LOOKUP key");
	proto_msg_free(&m);
	/* a worker id is an int, not nil */
	k.worker_id = 1;
	REQUIRE(proto_encode_key(&m, &k) == 0);
	check_bytes(&m, key_with(2, "01"), "STORE key");
	proto_msg_free(&m);
	k.worker_id = -2;
	CHECK_EQ(proto_encode_key(&m, &k), -EINVAL);
	CHECK(m.data == NULL);
	k.worker_id = 0;
	k.model_len = KS_MODEL_MAX + 1;
	CHECK_EQ(proto_encode_key(&m, &k), -EINVAL);
	k.model_len = 1;
	k.world_size = 0;
	CHECK_EQ(proto_encode_key(&m, &k), -EINVAL);
	k.world_size = 1;
	k.start = -256;
	CHECK_EQ(proto_encode_key(&m, &k), -EINVAL);
	k.start = 0;
	REQUIRE(proto_encode_key(&m, &k) == 0);
	proto_msg_free(&m);

	/* Token ids at every encoding boundary: the key's bytes equal msgpack-c's own
	 * msgpack_pack_uint64 encoding of the same array (proto_encode_key packs
	 * token ids without it, for speed). */
	{
		static const uint32_t edge[] = { 0, 1, 127, 128, 200, 255, 256, 4096, 65535, 65536,
						 151643, 16777215, 16777216, 2147483647, 4294967295u };
		uint32_t many[3000];
		msgpack_sbuffer sb;
		msgpack_packer pk;

		for (size_t i = 0; i < KS_ARRAY_SIZE(many); i++)
			many[i] = edge[i % KS_ARRAY_SIZE(edge)] ^ (uint32_t)(i & 1);
		for (int pass = 0; pass < 2; pass++) {
			k.token_ids = pass ? many : (uint32_t *)edge;
			k.ntokens = pass ? KS_ARRAY_SIZE(many) : KS_ARRAY_SIZE(edge);
			k.end = (int64_t)k.ntokens;
			REQUIRE(proto_encode_key(&m, &k) == 0);
			msgpack_sbuffer_init(&sb);
			msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
			msgpack_pack_array(&pk, k.ntokens);
			for (size_t i = 0; i < k.ntokens; i++)
				msgpack_pack_uint64(&pk, k.token_ids[i]);
			/* the array sits right after the "token_ids" key string */
			const uint8_t *at = memmem(m.data, m.len, "token_ids", 9);
			CHECK(at && (size_t)(m.data + m.len - (at + 9)) > sb.size &&
			      memcmp(at + 9, sb.data, sb.size) == 0);
			proto_msg_free(&m);
			msgpack_sbuffer_destroy(&sb);
		}
		/* and it decodes back to the same ids */
		k.token_ids = many;
		k.ntokens = KS_ARRAY_SIZE(many);
		REQUIRE(proto_encode_key(&m, &k) == 0);
		struct proto_request back;
		REQUIRE(DEC(PROTO_LOOKUP, &back, M(&m), H("01")) == 0);
		CHECK(back.key.ntokens == KS_ARRAY_SIZE(many) && back.key.token_ids &&
		      memcmp(back.key.token_ids, many, sizeof(many)) == 0);
		proto_request_free(&back);
		proto_msg_free(&m);
		k.token_ids = toks;
		k.ntokens = 4;
		k.end = 4;
	}

	/* smallest int forms, as msgspec writes them */
	static const struct {
		int64_t v;
		const char *hex;
	} ints[] = {
		{ 0, "00" }, { 127, "7f" }, { 128, "cc 80" }, { 255, "cc ff" }, { 256, "cd 01 00" },
		{ 65535, "cd ff ff" }, { 65536, "ce 00 01 00 00" }, { 4294967295ll, "ce ff ff ff ff" },
		{ 4294967296ll, "cf 00 00 00 01 00 00 00 00" },
		{ INT64_MAX, "cf 7f ff ff ff ff ff ff ff" }, { -1, "ff" }, { -32, "e0" },
		{ -33, "d0 df" }, { -128, "d0 80" }, { -129, "d1 ff 7f" }, { -32768, "d1 80 00" },
		{ -32769, "d2 ff ff 7f ff" }, { INT32_MIN, "d2 80 00 00 00" },
		{ (int64_t)INT32_MIN - 1, "d3 ff ff ff ff 7f ff ff ff" },
		{ INT64_MIN, "d3 80 00 00 00 00 00 00 00" },
	};
	for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
		REQUIRE(proto_encode_int(&m, ints[i].v) == 0);
		check_bytes(&m, ints[i].hex, "int form");
		proto_msg_free(&m);
	}
}

static void test_section8_requests(void)
{
	struct proto_request r;
	uint64_t uid = 99;
	enum proto_type t;

	/* uid and type frames of the §8 examples */
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"\x07", 1 }, &uid), 0);
	CHECK_EQ(uid, 7);
	CHECK_EQ(proto_decode_type(&(struct proto_buf){ (const uint8_t *)"\x0c", 1 }, &t), 0);
	CHECK_EQ(t, PROTO_PING);
	CHECK_EQ(proto_decode_type(&(struct proto_buf){ (const uint8_t *)"\x0b", 1 }, &t), 0);
	CHECK_EQ(t, PROTO_GET_CHUNK_SIZE);
	CHECK(!strcmp(proto_type_name(PROTO_NOOP), "NOOP"));
	CHECK(!strcmp(proto_type_name(PROTO_QUERY_PREFETCH_LOOKUP_HITS),
		      "QUERY_PREFETCH_LOOKUP_HITS"));
	CHECK(!strcmp(proto_type_name(99), "UNKNOWN"));

	/* LOOKUP [key 77 bytes] [01] */
	REQUIRE(DEC(PROTO_LOOKUP, &r, H(KEY_HEX_77), H("01")) == 0);
	CHECK_EQ(r.type, PROTO_LOOKUP);
	check_std_key(&r.key);
	CHECK_EQ(r.tp_size, 1);
	proto_request_free(&r);
	CHECK(r.key.token_ids == NULL);
	proto_request_free(&r);	/* twice is harmless */

	/* an older client's key: 88 ... chunk_hash: nil */
	REQUIRE(DEC(PROTO_LOOKUP, &r, H(key_hex(-1, -1, NULL, 1, "aa6368756e6b5f68617368 c0")),
		    H("01")) == 0);
	check_std_key(&r.key);
	proto_request_free(&r);
	/* chunk_hash as a 32-byte bin, first in the map: still ignored */
	{
		char hx[1024] = "88 aa6368756e6b5f68617368 c4 20";
		for (int i = 0; i < 32; i++)
			strcat(hx, "ab");
		strcat(hx, key_std() + 2);
		REQUIRE(DEC(PROTO_LOOKUP, &r, H(hx), H("01")) == 0);
		check_std_key(&r.key);
		proto_request_free(&r);
	}
	/* unknown keys are ignored: cache_salt "", and an odd one with a nested value */
	REQUIRE(DEC(PROTO_LOOKUP, &r,
		    H(key_hex(-1, -1, NULL, 2,
			      "aa63616368655f73616c74 a0  a27a7a 92 81 a161 c0 c3")),
		    H("01")) == 0);
	check_std_key(&r.key);
	proto_request_free(&r);
	/* keys in another order (looked up by name, not position) */
	REQUIRE(DEC(PROTO_LOOKUP, &r,
		    H("87 aa726571756573745f6964 a172 a3656e64 04 a57374617274 00"
		      " a9746f6b656e5f696473 94 01 02 03 04 a9776f726b65725f6964 c0"
		      " aa776f726c645f73697a65 01 aa6d6f64656c5f6e616d65 a16d"),
		    H("01")) == 0);
	check_std_key(&r.key);
	proto_request_free(&r);
	/* a repeated key keeps its last value */
	REQUIRE(DEC(PROTO_LOOKUP, &r, H(key_hex(-1, -1, NULL, 1, "a3656e64 08")), H("01")) == 0);
	CHECK_EQ(r.key.end, 8);
	proto_request_free(&r);

	/* array form, declaration order, with or without chunk_hash/cache_salt */
	REQUIRE(DEC(PROTO_LOOKUP, &r, H("97 a16d 01 c0 94 01 02 03 04 00 04 a172"), H("01")) == 0);
	check_std_key(&r.key);
	proto_request_free(&r);
	REQUIRE(DEC(PROTO_LOOKUP, &r, H("98 a16d 01 c0 94 01 02 03 04 00 04 a172 c0"), H("01")) ==
		0);
	check_std_key(&r.key);
	proto_request_free(&r);
	REQUIRE(DEC(PROTO_LOOKUP, &r, H("99 a16d 01 c0 94 01 02 03 04 00 04 a172 c0 a0"),
		    H("01")) == 0);
	check_std_key(&r.key);
	proto_request_free(&r);
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H("96 a16d 01 c0 94 01 02 03 04 00 04"), H("01")));

	/* QUERY_PREFETCH_STATUS [00]; UNREGISTER [cd 30 39] */
	REQUIRE(DEC(PROTO_QUERY_PREFETCH_STATUS, &r, H("00")) == 0);
	CHECK_EQ(r.job_id, 0);
	proto_request_free(&r);
	REQUIRE(DEC(PROTO_UNREGISTER_KV_CACHE, &r, H("cd 30 39")) == 0);
	CHECK_EQ(r.instance_id, 12345);
	CHECK(r.has_instance_id);
	proto_request_free(&r);
}

/* ---- KV descriptors ---- */

enum { D_KIND = 1, D_LAYOUT = 2, D_SHAPE = 4, D_STRIDE = 8, D_DTYPE = 16, D_OFFSET = 32,
       D_NBYTES = 64, D_MEMH = 128, D_UUID = 256, D_PATH = 512 };

struct dspec {
	const char *kind, *layout, *dtype, *uuid, *path;
	int ndim, nstride, mh_len;
	int64_t shape[6], stride[6];
	uint64_t offset, nbytes;
	unsigned omit;
};

/* flash_attn [2, NB 4, BS 16, NH 2, HS 8], bf16, C-order: extent 4096 bytes */
static struct dspec host_spec(void)
{
	return (struct dspec){ .kind = "host_shm", .layout = "flash_attn", .dtype = "bfloat16",
			       .path = "/kvstash-test", .ndim = 5, .nstride = 5,
			       .shape = { 2, 4, 16, 2, 8 }, .stride = { 1024, 256, 16, 8, 1 },
			       .offset = 0, .nbytes = 4096 };
}

static struct dspec cuda_spec(void)
{
	struct dspec d = host_spec();

	d.kind = "cuda_ipc";
	d.path = NULL;
	d.mh_len = 64;
	d.uuid = "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
	return d;
}

static void pack_desc(msgpack_packer *pk, const struct dspec *d)
{
	unsigned n = 0;
	uint8_t mh[80];

	for (unsigned b = 1; b <= D_PATH; b <<= 1) {
		bool have = !(d->omit & b);

		if (b == D_LAYOUT)
			have = have && d->layout;
		if (b == D_MEMH)
			have = have && d->mh_len >= 0 && !strcmp(d->kind, "cuda_ipc");
		if (b == D_UUID)
			have = have && d->uuid;
		if (b == D_PATH)
			have = have && d->path;
		n += have;
	}
	msgpack_pack_map(pk, n);
	if (!(d->omit & D_KIND))
		pk_str(pk, "kind"), pk_str(pk, d->kind);
	if (!(d->omit & D_LAYOUT) && d->layout)
		pk_str(pk, "layout"), pk_str(pk, d->layout);
	if (!(d->omit & D_SHAPE)) {
		pk_str(pk, "shape");
		msgpack_pack_array(pk, d->ndim);
		for (int i = 0; i < d->ndim; i++)
			msgpack_pack_int64(pk, d->shape[i]);
	}
	if (!(d->omit & D_STRIDE)) {
		pk_str(pk, "stride");
		msgpack_pack_array(pk, d->nstride);
		for (int i = 0; i < d->nstride; i++)
			msgpack_pack_int64(pk, d->stride[i]);
	}
	if (!(d->omit & D_DTYPE))
		pk_str(pk, "dtype"), pk_str(pk, d->dtype);
	if (!(d->omit & D_OFFSET))
		pk_str(pk, "offset"), msgpack_pack_uint64(pk, d->offset);
	if (!(d->omit & D_NBYTES))
		pk_str(pk, "nbytes"), msgpack_pack_uint64(pk, d->nbytes);
	if (!(d->omit & D_MEMH) && d->mh_len >= 0 && !strcmp(d->kind, "cuda_ipc")) {
		memset(mh, 0x5a, sizeof(mh));
		pk_str(pk, "mem_handle");
		msgpack_pack_bin(pk, d->mh_len);
		msgpack_pack_bin_body(pk, mh, d->mh_len);
	}
	if (!(d->omit & D_UUID) && d->uuid)
		pk_str(pk, "device_uuid"), pk_str(pk, d->uuid);
	if (!(d->omit & D_PATH) && d->path)
		pk_str(pk, "path"), pk_str(pk, d->path);
}

/* kv_caches frame with @n copies of @d. */
static struct proto_buf kv_frame(const struct dspec *d, unsigned n)
{
	msgpack_packer *pk = P();

	msgpack_pack_array(pk, n);
	for (unsigned i = 0; i < n; i++)
		pack_desc(pk, d);
	return P_done();
}

/* REGISTER (id 7, kv_caches, "m", world 2) */
static int reg(const struct proto_buf kv, struct proto_request *r)
{
	return DEC(PROTO_REGISTER_KV_CACHE, r, H("07"), kv, H("a16d"), H("02"));
}

static int reg_spec(const struct dspec *d)
{
	struct proto_request r;
	int rc = reg(kv_frame(d, 2), &r);

	if (!rc)
		proto_request_free(&r);
	return rc;
}

/*
 * LMCache's CudaIPCWrapper of a [2, 4, 16, 2, 8] bf16 view, pickled by
 * tests/data/make_pickles.py's stubs (protocol 4): handle = (0, 02 'c' +
 * bytes 0x40..0x7f, 4160, 1 MiB, b"/torch_1_2_0", 0, event 0xc0..0xff,
 * True), storage_offset 32 elements, uuid eb785ce3-... The 66-byte blob is
 * PyTorch's versioned handle: version 2, type 'c', cudaIpcMemHandle_t.
 */
static const char wrapper_pickle_hex[] =
	"80049585010000000000008c246c6d63616368652e76312e6d756c746970726f"
	"636573732e637573746f6d5f7479706573948c0e437564614950435772617070"
	"65729493942981947d94288c0668616e646c6594284b00434202634041424344"
	"45464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f6061626364"
	"65666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f944d40104a"
	"00001000430c2f746f7263685f315f325f30944b004340c0c1c2c3c4c5c6c7c8"
	"c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8"
	"e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff948874948c05647479"
	"7065948c05746f726368948c0862666c6f617431369493948c05736861706594"
	"284b024b044b104b024b0874948c0673747269646594284d00044d00014b104b"
	"084b0174948c0e73746f726167655f6f6666736574944b208c0b646576696365"
	"5f75756964948c2465623738356365332d336166342d643133322d323335342d"
	"6163303465663039396537619475622e";

/* A kv_caches frame of @n ext-1 elements holding @pkl. */
static struct proto_buf ext1_frame(const uint8_t *pkl, size_t len, unsigned n)
{
	msgpack_packer *pk = P();

	msgpack_pack_array(pk, n);
	for (unsigned i = 0; i < n; i++) {
		msgpack_pack_ext(pk, len, 1);
		msgpack_pack_ext_body(pk, pkl, len);
	}
	return P_done();
}

static void test_register_ext1(void)
{
	static uint8_t pkl[512];
	size_t len = unhex(wrapper_pickle_hex, pkl, sizeof(pkl));
	struct proto_request r;

	REQUIRE(len == 400);
	REQUIRE(DEC(PROTO_REGISTER_KV_CACHE, &r, H("07"), ext1_frame(pkl, len, 3), H("a16d"),
		    H("02")) == 0);
	CHECK_EQ(r.nlayers, 3);
	for (size_t i = 0; i < r.nlayers; i++) {
		const struct proto_kv_desc *d = &r.layers[i];

		CHECK_EQ(d->kind, PROTO_KV_CUDA_IPC);
		CHECK_EQ(d->layout.kind, KV_LAYOUT_FLASH_ATTN);	/* inferred: shape[0] == 2 */
		CHECK_EQ(d->layout.dtype, KV_DTYPE_BFLOAT16);
		CHECK_EQ(d->layout.ndim, 5);
		CHECK_EQ(d->layout.shape[1], 4);
		CHECK_EQ(d->layout.stride[0], 1024);
		CHECK_EQ(d->layout.num_layers, 3);
		/* storage offset bytes + storage_offset * 2 */
		CHECK_EQ(d->offset, (1u << 20) + 64);
		/* segment base -> storage end */
		CHECK_EQ(d->nbytes, (1u << 20) + 4160);
		CHECK_EQ(d->mem_handle[0], 0x40);
		CHECK_EQ(d->mem_handle[63], 0x7f);
		CHECK(!strcmp(d->device_uuid, "eb785ce3-3af4-d132-2354-ac04ef099e7a"));
	}
	proto_request_free(&r);

	/* ext 1 mixed with a native map is refused: layers must share one kind */
	{
		struct dspec d = host_spec();
		msgpack_packer *pk = P();

		msgpack_pack_array(pk, 2);
		msgpack_pack_ext(pk, len, 1);
		msgpack_pack_ext_body(pk, pkl, len);
		pack_desc(pk, &d);
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), P_done(), H("a16d"), H("02")));
		CHECK(strstr(g_err, "kv_caches[1]") != NULL);
	}
	/* every truncation of the pickle is a clean -EPROTO naming the wrapper */
	for (size_t n = 0; n < len; n++) {
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), ext1_frame(pkl, n, 1),
				    H("a16d"), H("02")));
		CHECK(strstr(g_err, "CudaIPCWrapper") != NULL);
	}
	/* the wrapper's extent must fit its storage: shrink the storage size 4160 -> 4159 */
	{
		uint8_t bad[512];

		memcpy(bad, pkl, len);
		REQUIRE(bad[0x9c] == 0x4d && bad[0x9d] == 0x40 && bad[0x9e] == 0x10);
		bad[0x9d] = 0x3f;
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), ext1_frame(bad, len, 1),
				    H("a16d"), H("02")));
		CHECK(strstr(g_err, "exceeds") != NULL);
		/* the dtype global renamed to torch.float64_: not on the allow-list */
		memcpy(bad, pkl, len);
		REQUIRE(!memcmp(bad + 0x10d, "bfloat16", 8));
		memcpy(bad + 0x10d, "float64_", 8);
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), ext1_frame(bad, len, 1),
				    H("a16d"), H("02")));
		CHECK(strstr(g_err, "not allowed") != NULL);
	}
	/* a hostile pickle: the GLOBAL is refused before anything else */
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"),
			    H("91 c7 16 01 80 02 63 6f 73 0a 73 79 73 74 65 6d 0a 58 01 00 00 00 "
			      "78 85 52 2e"), H("a16d"), H("02")));
	CHECK(strstr(g_err, "os.system is not allowed") != NULL);
}

static void test_register(void)
{
	struct proto_request r;
	struct dspec d = host_spec();

	/* native host descriptor, 3 layers */
	REQUIRE(reg(kv_frame(&d, 3), &r) == 0);
	CHECK_EQ(r.instance_id, 7);
	CHECK_EQ(r.nlayers, 3);
	CHECK(!strcmp(r.model, "m"));
	CHECK_EQ(r.model_len, 1);
	CHECK_EQ(r.world_size, 2);
	CHECK_EQ(r.layers[2].kind, PROTO_KV_HOST_SHM);
	CHECK(!strcmp(r.layers[2].path, "/kvstash-test"));
	CHECK_EQ(r.layers[2].layout.kind, KV_LAYOUT_FLASH_ATTN);
	CHECK_EQ(r.layers[2].layout.dtype, KV_DTYPE_BFLOAT16);
	CHECK_EQ(r.layers[2].layout.elem_bytes, 2);
	CHECK_EQ(r.layers[2].layout.ndim, 5);
	CHECK_EQ(r.layers[2].layout.shape[3], 2);
	CHECK_EQ(r.layers[2].layout.stride[0], 1024);
	CHECK_EQ(r.layers[2].nbytes, 4096);
	/* the server can derive the rest */
	struct kv_layout l = r.layers[0].layout;
	l.num_layers = (uint32_t)r.nlayers;
	CHECK_EQ(kv_layout_init(&l, g_err, sizeof(g_err)), 0);
	CHECK_EQ(l.block_size, 16);
	proto_request_free(&r);

	/* 5th frame layout_hints: any value */
	REQUIRE(DEC(PROTO_REGISTER_KV_CACHE, &r, H("07"), kv_frame(&d, 1), H("a16d"), H("02"),
		    H("82 a161 93 01 a0 c0 a162 cb 3ff0000000000000")) == 0);
	CHECK_EQ(r.nlayers, 1);
	proto_request_free(&r);
	EXPECT(0, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"), H("02"), H("c0")));
	/* ... but still exactly one well-formed document */
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"), H("02"),
			    H("92 01")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"), H("02"),
			    H("c0 c0")));

	/* cuda_ipc descriptor, layout absent -> inferred flashinfer [NB,2,BS,NH,HS] */
	d = cuda_spec();
	d.layout = NULL;
	memcpy(d.shape, (int64_t[]){ 4, 2, 16, 2, 8 }, 5 * sizeof(int64_t));
	memcpy(d.stride, (int64_t[]){ 512, 256, 16, 8, 1 }, 5 * sizeof(int64_t));
	d.offset = 4096;
	d.nbytes = 8192;
	REQUIRE(reg(kv_frame(&d, 2), &r) == 0);
	CHECK_EQ(r.layers[1].kind, PROTO_KV_CUDA_IPC);
	CHECK_EQ(r.layers[1].layout.kind, KV_LAYOUT_FLASHINFER);
	CHECK_EQ(r.layers[1].offset, 4096);
	CHECK_EQ(r.layers[1].mem_handle[63], 0x5a);
	CHECK(!strcmp(r.layers[1].device_uuid, "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"));
	proto_request_free(&r);
	/* MLA [NB, BS, HS] inferred from 3 dims; no GPU- prefix; offset absent = 0 */
	d = cuda_spec();
	d.layout = NULL;
	d.uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
	d.ndim = d.nstride = 3;
	memcpy(d.shape, (int64_t[]){ 4, 16, 64 }, 3 * sizeof(int64_t));
	memcpy(d.stride, (int64_t[]){ 1024, 64, 1 }, 3 * sizeof(int64_t));
	d.dtype = "uint8";
	d.nbytes = 4096;
	d.omit = D_OFFSET;
	REQUIRE(reg(kv_frame(&d, 1), &r) == 0);
	CHECK_EQ(r.layers[0].layout.kind, KV_LAYOUT_MLA);
	CHECK_EQ(r.layers[0].offset, 0);
	proto_request_free(&r);

	/* round trip through proto_encode_kv_descs */
	struct proto_kv_desc in[2];
	struct proto_msg m;
	memset(in, 0, sizeof(in));
	in[0].kind = PROTO_KV_CUDA_IPC;
	in[0].layout = (struct kv_layout){ .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_FLOAT16,
					   .ndim = 5, .shape = { 2, 8, 16, 4, 16 },
					   .stride = { 8 * 16 * 64, 16 * 64, 64, 16, 1 } };
	in[0].offset = 256;
	in[0].nbytes = 256 + 2 * 8 * 16 * 64 * 2;
	for (int i = 0; i < 64; i++)
		in[0].mem_handle[i] = (uint8_t)i;
	strcpy(in[0].device_uuid, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
	in[1] = in[0];
	in[1].offset = 512;
	in[1].nbytes += 256;
	in[1].mem_handle[5] = 0xee;
	REQUIRE(proto_encode_kv_descs(&m, in, 2) == 0);
	REQUIRE(reg(M(&m), &r) == 0);
	proto_msg_free(&m);
	REQUIRE(r.nlayers == 2);
	for (int i = 0; i < 2; i++) {
		CHECK_EQ(r.layers[i].kind, in[i].kind);
		CHECK_EQ(r.layers[i].layout.kind, in[i].layout.kind);
		CHECK_EQ(r.layers[i].layout.dtype, in[i].layout.dtype);
		CHECK(!memcmp(r.layers[i].layout.shape, in[i].layout.shape, 5 * sizeof(int64_t)));
		CHECK(!memcmp(r.layers[i].layout.stride, in[i].layout.stride, 5 * sizeof(int64_t)));
		CHECK_EQ(r.layers[i].offset, in[i].offset);
		CHECK_EQ(r.layers[i].nbytes, in[i].nbytes);
		CHECK(!memcmp(r.layers[i].mem_handle, in[i].mem_handle, 64));
		CHECK(!strcmp(r.layers[i].device_uuid, in[i].device_uuid));
	}
	proto_request_free(&r);
	in[0].kind = in[1].kind = PROTO_KV_HOST_SHM;
	strcpy(in[0].path, "/dev/shm/x");
	strcpy(in[1].path, "/y");
	REQUIRE(proto_encode_kv_descs(&m, in, 2) == 0);
	REQUIRE(reg(M(&m), &r) == 0);
	proto_msg_free(&m);
	CHECK(!strcmp(r.layers[0].path, "/dev/shm/x"));
	CHECK(!strcmp(r.layers[1].path, "/y"));
	proto_request_free(&r);
	in[0].layout.ndim = 4;
	CHECK_EQ(proto_encode_kv_descs(&m, in, 1), -EINVAL);

	/* ---- bad descriptors: each is -EPROTO ---- */
	d = host_spec();
	CHECK_EQ(reg_spec(&d), 0);
	d.stride[4] = 2;	/* last stride != 1 */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	CHECK(strstr(g_err, "last stride") != NULL);
	d = host_spec();
	d.nstride = 4;		/* shape/stride length mismatch */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.dtype = "float64";	/* unknown dtype */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	CHECK(strstr(g_err, "dtype") != NULL);
	d = host_spec();
	d.path = NULL;		/* host_shm without path */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	CHECK(strstr(g_err, "path") != NULL);
	d = host_spec();
	d.path = "relative/file";
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.kind = "rdma";
	CHECK_EQ(reg_spec(&d), -EPROTO);
	for (unsigned b = D_KIND; b <= D_NBYTES; b <<= 1) {
		if (b == D_LAYOUT || b == D_OFFSET)
			continue;	/* optional */
		d = host_spec();
		d.omit = b;
		CHECK_EQ(reg_spec(&d), -EPROTO);
		CHECK(strstr(g_err, "missing") != NULL);
	}
	d = host_spec();
	d.ndim = d.nstride = 4;	/* neither 3 nor 5 dims */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.ndim = d.nstride = 6;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.layout = "mla";	/* layout does not match the shape */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.layout = "paged";
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.layout = NULL;	/* nothing to infer from */
	d.shape[0] = 3;
	d.stride[0] = 2048;
	d.nbytes = 3 * 2048;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.shape[2] = 0;		/* empty dimension */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.shape[2] = -16;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.nbytes = 4095;	/* offset + extent > nbytes */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.offset = UINT64_MAX - 10;	/* offset + extent overflows */
	d.nbytes = UINT64_MAX;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.stride[1] = INT64_MAX / 2;	/* extent overflows 64 bits */
	d.nbytes = UINT64_MAX;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.stride[3] = 4;	/* heads overlap (layout.c rule) */
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = host_spec();
	d.dtype = "uint8";	/* row of 16 bytes OK; HS 3 -> 6-byte row is not */
	d.shape[4] = 3, d.stride[3] = 3, d.shape[3] = 2;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = cuda_spec();
	CHECK_EQ(reg_spec(&d), 0);
	d.mh_len = 63;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = cuda_spec();
	d.omit = D_MEMH;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = cuda_spec();
	d.uuid = NULL;
	CHECK_EQ(reg_spec(&d), -EPROTO);
	d = cuda_spec();
	d.uuid = "GPU-not-a-uuid";
	CHECK_EQ(reg_spec(&d), -EPROTO);
	/* layers disagree on shape */
	{
		struct dspec d2 = host_spec();
		msgpack_packer *pk = P();

		d = host_spec();
		d2.shape[1] = 2;
		msgpack_pack_array(pk, 2);
		pack_desc(pk, &d);
		pack_desc(pk, &d2);
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), P_done(), H("a16d"), H("02")));
		CHECK(strstr(g_err, "kv_caches[1]") != NULL);
	}
	/* empty kv_caches, kv_caches not an array, element not a map */
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), H("90"), H("a16d"), H("02")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), H("80"), H("a16d"), H("02")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), H("91 01"), H("a16d"), H("02")));
	/* LMCache's CudaIPCWrapper (ext 1 + pickle): a broken pickle is refused with a reason */
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), H("91 c7 05 01 80 04 95 00 2e"),
			    H("a16d"), H("02")));
	CHECK(strstr(g_err, "pickle") != NULL && strstr(g_err, "CudaIPCWrapper") != NULL);
	test_register_ext1();
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), H("91 d4 01 00"), H("a16d"),
			    H("02")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), H("91 d4 05 00"), H("a16d"),
			    H("02")));
	/* other REGISTER frames */
	d = host_spec();
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("a0"), kv_frame(&d, 1), H("a16d"), H("02")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("01"), H("02")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"), H("00")));
	EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"), H("a0")));
	/* oversize */
	EXPECT(-E2BIG, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, PROTO_MAX_LAYERS + 1),
			   H("a16d"), H("02")));
	EXPECT(0, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, PROTO_MAX_LAYERS), H("a16d"),
		      H("02")));
	{
		char path[PROTO_PATH_MAX + 2];

		memset(path, 'p', sizeof(path));
		path[0] = '/';
		path[PROTO_PATH_MAX + 1] = '\0';
		d.path = path;
		CHECK_EQ(reg_spec(&d), -E2BIG);
		path[PROTO_PATH_MAX] = '\0';
		CHECK_EQ(reg_spec(&d), 0);
	}
	/* a NUL inside a str is refused: the path would alias "/a" */
	{
		struct dspec dd = host_spec();
		msgpack_sbuffer tmp;
		msgpack_packer tpk;
		msgpack_packer *pk = P();

		dd.omit = D_PATH;
		msgpack_sbuffer_init(&tmp);
		msgpack_packer_init(&tpk, &tmp, msgpack_sbuffer_write);
		pack_desc(&tpk, &dd);
		tmp.data[0]++;	/* the fixmap header: one more entry, appended below */
		msgpack_pack_array(pk, 1);
		pk->callback(pk->data, tmp.data, tmp.size);
		msgpack_sbuffer_destroy(&tmp);
		pk_str(pk, "path");
		msgpack_pack_str(pk, 8);
		msgpack_pack_str_body(pk, "/a\0bcdef", 8);
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), P_done(), H("a16d"), H("02")));
		CHECK(strstr(g_err, "NUL") != NULL);
	}
	d = cuda_spec();
	d.uuid = "GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-0f1e2d3c-4b5a-6978-8796-a5b4c3";
	CHECK_EQ(reg_spec(&d), -E2BIG);
}

/* ---- STORE / RETRIEVE ---- */

static const char *ev64(void)
{
	static char hx[200];

	strcpy(hx, "c4 40");
	for (int i = 0; i < 64; i++)
		snprintf(hx + strlen(hx), 4, "%02x", i);
	return hx;
}

static void test_store_retrieve(void)
{
	struct proto_request r;
	struct proto_msg mk, mb, me;
	uint32_t toks[512];
	int64_t blocks[3] = { 7, 0, 123456789012ll };

	for (int i = 0; i < 512; i++)
		toks[i] = (uint32_t)(i * 2654435761u);
	struct proto_key k = { .model = "meta-llama/Llama-3-8B", .model_len = 21, .world_size = 2,
			       .worker_id = 1, .token_ids = toks, .ntokens = 512, .start = 256,
			       .end = 512, .request_id = "cmpl-42", .request_id_len = 7 };
	REQUIRE(proto_encode_key(&mk, &k) == 0);
	REQUIRE(proto_encode_int_list(&mb, blocks, 3) == 0);
	uint8_t ev[64];
	for (int i = 0; i < 64; i++)
		ev[i] = (uint8_t)(255 - i);
	REQUIRE(proto_encode_bin(&me, ev, 64) == 0);

	for (int type = PROTO_STORE; type <= PROTO_RETRIEVE; type++) {
		int rc;

		if (type == PROTO_STORE)
			rc = DEC(type, &r, M(&mk), H("cf 7fffffffffffffff"), M(&mb), M(&me));
		else
			rc = DEC(type, &r, M(&mk), H("cf 7fffffffffffffff"), M(&mb), M(&me),
				 H("cd 01 2c"));
		REQUIRE(rc == 0);
		CHECK_EQ(r.type, type);
		CHECK(!strcmp(r.key.model, k.model));
		CHECK_EQ(r.key.model_len, 21);
		CHECK_EQ(r.key.world_size, 2);
		CHECK_EQ(r.key.worker_id, 1);
		CHECK_EQ(r.key.ntokens, 512);
		CHECK(r.key.ntokens == 512 && !memcmp(r.key.token_ids, toks, sizeof(toks)));
		CHECK_EQ(r.key.start, 256);
		CHECK_EQ(r.key.end, 512);
		CHECK(!strcmp(r.key.request_id, "cmpl-42"));
		CHECK_EQ(r.instance_id, INT64_MAX);
		CHECK_EQ(r.nblocks, 3);
		CHECK(r.nblocks == 3 && !memcmp(r.block_ids, blocks, sizeof(blocks)));
		CHECK_EQ(r.event_len, 64);
		CHECK(!memcmp(r.event, ev, 64));
		CHECK_EQ(r.skip_first_n_tokens, type == PROTO_RETRIEVE ? 300 : 0);
		proto_request_free(&r);
	}
	/* host path: empty event; empty block list; negative instance id */
	REQUIRE(DEC(PROTO_STORE, &r, H(key_with(2, "00")), H("ff"), H("90"), H("c4 00")) == 0);
	CHECK_EQ(r.event_len, 0);
	CHECK_EQ(r.nblocks, 0);
	CHECK_EQ(r.instance_id, -1);
	CHECK_EQ(r.key.worker_id, 0);
	proto_request_free(&r);

	/* bad event handles */
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("90"), H("c4 01 00")));
	{
		char hx[300] = "c4 3f";
		for (int i = 0; i < 63; i++)
			strcat(hx, "00");
		EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("90"), H(hx)));
		strcpy(hx, "c4 41");
		for (int i = 0; i < 65; i++)
			strcat(hx, "00");
		EXPECT(-EPROTO, DEC(PROTO_RETRIEVE, H(key_std()), H("01"), H("90"), H(hx), H("00")));
	}
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("90"), H("a0")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("90"), H("c0")));
	EXPECT(0, DEC(PROTO_STORE, H(key_std()), H("01"), H("90"), H(ev64())));
	/* wrong types per field */
	EXPECT(-EPROTO, DEC(PROTO_STORE, H("a16b"), H("01"), H("90"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("a16b"), H("90"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("c0"), H("90"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("cb 3ff0000000000000"), H("90"),
			    H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("01"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("91 a0"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("92 01 ff"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("91 cf ffffffffffffffff"),
			    H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_RETRIEVE, H(key_std()), H("01"), H("90"), H("c400"), H("ff")));
	EXPECT(-EPROTO, DEC(PROTO_RETRIEVE, H(key_std()), H("01"), H("90"), H("c400"), H("a0")));
	EXPECT(0, DEC(PROTO_RETRIEVE, H(key_std()), H("01"), H("90"), H("c400"),
		      H("cf ffffffffffffffff")));
	/* oversize block list (the limit itself is fine) */
	{
		size_t n = PROTO_MAX_BLOCKS + 1;
		uint8_t *big = malloc(5 + n);

		REQUIRE(big);
		big[0] = 0xdd;
		big[1] = (uint8_t)(n >> 24), big[2] = (uint8_t)(n >> 16);
		big[3] = (uint8_t)(n >> 8), big[4] = (uint8_t)n;
		memset(big + 5, 0x01, n);
		EXPECT(-E2BIG, DEC(PROTO_STORE, H(key_std()), H("01"),
				   ((struct proto_buf){ big, 5 + n }), H("c400")));
		n--;
		big[1] = (uint8_t)(n >> 24), big[2] = (uint8_t)(n >> 16);
		big[3] = (uint8_t)(n >> 8), big[4] = (uint8_t)n;
		REQUIRE(DEC(PROTO_STORE, &r, H(key_std()), H("01"), ((struct proto_buf){ big, 5 + n }),
			    H("c400")) == 0);
		CHECK_EQ(r.nblocks, PROTO_MAX_BLOCKS);
		CHECK_EQ(r.block_ids[PROTO_MAX_BLOCKS - 1], 1);
		proto_request_free(&r);
		free(big);
	}
	proto_msg_free(&mk);
	proto_msg_free(&mb);
	proto_msg_free(&me);
}

/* ---- keys: widths, ranges, missing fields, types, sizes ---- */

static void test_key(void)
{
	struct proto_request r;

	/* every int width for world_size = 1; bools read as 0/1 (§2) */
	static const char *const one[] = { "01", "cc 01", "cd 00 01", "ce 00 00 00 01",
					   "cf 00 00 00 00 00 00 00 01", "d0 01", "d1 00 01",
					   "d2 00 00 00 01", "d3 00 00 00 00 00 00 00 01", "c3" };
	for (size_t i = 0; i < sizeof(one) / sizeof(one[0]); i++) {
		REQUIRE(DEC(PROTO_LOOKUP, &r, H(key_with(1, one[i])), H(one[i])) == 0);
		CHECK_EQ(r.key.world_size, 1);
		CHECK_EQ(r.tp_size, 1);
		proto_request_free(&r);
	}
	/* tokens at the edges of [0, 2^32), in every width */
	REQUIRE(DEC(PROTO_LOOKUP, &r,
		    H(key_with(3, "98 00 d0 00 7f cc ff cd ffff ce ffffffff cf 00000000ffffffff"
				  " d3 00000000fffffffe")),
		    H("00")) == 0);
	CHECK_EQ(r.key.ntokens, 8);
	CHECK_EQ(r.key.token_ids[0], 0);
	CHECK_EQ(r.key.token_ids[1], 0);
	CHECK_EQ(r.key.token_ids[2], 127);
	CHECK_EQ(r.key.token_ids[5], 0xffffffffu);
	CHECK_EQ(r.key.token_ids[6], 0xffffffffu);
	CHECK_EQ(r.key.token_ids[7], 0xfffffffeu);
	proto_request_free(&r);
	/* token -1 and 2^32: frame-level faults */
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_with(3, "92 01 ff")), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_with(3, "92 01 d3 ffffffffffffffff")), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_with(3, "92 01 cf 0000000100000000")), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_with(3, "92 01 cb 3ff0000000000000")), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_with(3, "92 01 a131")), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_with(3, "92 01 c0")), H("01")));
	/* empty token list is a valid (zero-hit) lookup */
	REQUIRE(DEC(PROTO_LOOKUP, &r, H(key_with(3, "90")), H("01")) == 0);
	CHECK_EQ(r.key.ntokens, 0);
	CHECK(r.key.token_ids == NULL);
	proto_request_free(&r);

	/* every required field missing, in turn */
	for (int i = 0; i < 7; i++) {
		EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_hex(i, -1, NULL, 0, NULL)), H("01")));
		CHECK(strstr(g_err, "missing") != NULL);
	}
	/* wrong types per field */
	static const struct {
		int field;
		const char *val;
	} bad[] = {
		{ 0, "01" }, { 0, "c0" }, { 0, "c4 01 6d" }, { 0, "91 a16d" },
		{ 1, "a131" }, { 1, "c0" }, { 1, "00" }, { 1, "ff" }, { 1, "cf 0000000100000000" },
		{ 1, "ca 3f800000" },
		{ 2, "a131" }, { 2, "ff" }, { 2, "ce 80000000" }, { 2, "90" },
		{ 3, "01" }, { 3, "c0" }, { 3, "a0" }, { 3, "80" }, { 3, "c4 00" },
		{ 4, "a0" }, { 4, "c0" }, { 4, "ff" }, { 4, "cf 8000000000000000" },
		{ 5, "c0" }, { 5, "90" }, { 5, "d0 fe" },
		{ 6, "01" }, { 6, "c0" }, { 6, "c4 01 72" },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct proto_request rr;
		int rc = DEC(PROTO_LOOKUP, &rr, H(key_with(bad[i].field, bad[i].val)), H("01"));

		if (rc != -EPROTO)
			fprintf(stderr, "  key field %d value %s: rc %d\n", bad[i].field, bad[i].val,
				rc);
		CHECK_EQ(rc, -EPROTO);
		if (!rc)
			proto_request_free(&rr);
	}
	/* key not a map/array; non-str map key */
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H("a16b"), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H("c0"), H("01")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_hex(-1, -1, NULL, 1, "01 01")), H("01")));
	/* tp_size */
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_std()), H("ff")));
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_std()), H("cf 0000000100000000")));
	EXPECT(-EPROTO, DEC(PROTO_FREE_LOOKUP_LOCKS, H(key_std()), H("c0")));
	REQUIRE(DEC(PROTO_FREE_LOOKUP_LOCKS, &r, H(key_std()), H("ce ffffffff")) == 0);
	CHECK_EQ(r.type, PROTO_FREE_LOOKUP_LOCKS);
	CHECK_EQ(r.tp_size, 0xffffffffu);
	check_std_key(&r.key);
	proto_request_free(&r);

	/* string limits: model_name 255 ok / 256 E2BIG; request_id likewise */
	{
		char val[2 * 260 + 16], *p;

		for (int len = KS_MODEL_MAX; len <= KS_MODEL_MAX + 1; len++) {
			p = val + (len < 256 ? snprintf(val, sizeof(val), "d9 %02x", len)
					     : snprintf(val, sizeof(val), "da %04x", len));
			for (int i = 0; i < len; i++)
				p += sprintf(p, "6d");
			EXPECT(len > KS_MODEL_MAX ? -E2BIG : 0,
			       DEC(PROTO_LOOKUP, H(key_with(0, val)), H("01")));
			EXPECT(len > (int)PROTO_REQUEST_ID_MAX ? -E2BIG : 0,
			       DEC(PROTO_LOOKUP, H(key_with(6, val)), H("01")));
			EXPECT(len > (int)PROTO_REQUEST_ID_MAX ? -E2BIG : 0,
			       DEC(PROTO_END_SESSION, H(val)));
		}
	}
	/* token list limit */
	{
		size_t n = PROTO_MAX_TOKENS + 1, hdr;
		uint8_t *big = malloc(128 + n);
		uint8_t tmp[256];

		REQUIRE(big);
		/* key map with token_ids last, so the big array ends the frame */
		hdr = unhex("87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
			    " a9776f726b65725f6964 c0 a57374617274 00 a3656e64 04"
			    " aa726571756573745f6964 a172 a9746f6b656e5f696473 dd",
			    tmp, sizeof(tmp));
		memcpy(big, tmp, hdr);
		for (int pass = 0; pass < 2; pass++, n--) {
			big[hdr] = (uint8_t)(n >> 24), big[hdr + 1] = (uint8_t)(n >> 16);
			big[hdr + 2] = (uint8_t)(n >> 8), big[hdr + 3] = (uint8_t)n;
			memset(big + hdr + 4, 0x05, n);
			struct proto_buf f = { big, hdr + 4 + n };
			int rc = DEC(PROTO_LOOKUP, &r, f, H("01"));

			CHECK_EQ(rc, pass == 0 ? -E2BIG : 0);
			if (!rc) {
				CHECK_EQ(r.key.ntokens, PROTO_MAX_TOKENS);
				CHECK_EQ(r.key.token_ids[PROTO_MAX_TOKENS - 1], 5);
				proto_request_free(&r);
			}
		}
		free(big);
	}
}

/*
 * A key frame's token ids are read straight from its bytes
 * (proto_decode_key_frame); the object-tree decoder is the reference: same
 * result, same reason, same tokens, on good keys and on every kind of bad
 * one, including those the fast path hands back to the tree path.
 */
static void test_key_fast_path(void)
{
	static const char *const frames[] = {
		NULL,	/* key_std() */
		"87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 93 01 cd 0100 c3"
		" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172",
		/* array form, trailing chunk_hash */
		"98 a16d 01 c0 94 01 02 03 04 00 04 a172 c0",
		/* array form, too short */
		"93 a16d 01 c0",
		/* token_ids twice: the last wins */
		"88 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 92 01 02"
		" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172"
		" a9746f6b656e5f696473 91 09",
		/* a bad token after good ones; a truncated frame; trailing bytes */
		"87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 93 01 02 d0 ff"
		" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172",
		"87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 93 01 02",
		"87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 91 01"
		" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172 c0",
		/* a bad field besides the tokens, and tokens not an array */
		"87 aa6d6f64656c5f6e616d65 01 aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 91 01"
		" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172",
		"87 aa6d6f64656c5f6e616d65 a16d aa776f726c645f73697a65 01"
		" a9776f726b65725f6964 c0 a9746f6b656e5f696473 c0"
		" a57374617274 00 a3656e64 04 aa726571756573745f6964 a172",
		"c1",
	};
	for (size_t i = 0; i < sizeof(frames) / sizeof(frames[0]); i++) {
		struct proto_buf f = H(frames[i] ? frames[i] : key_std());
		struct proto_key a, b;
		char ea[256], eb[256];
		int ra = proto_decode_key_frame(&f, &a, false, ea, sizeof(ea));
		int rb = proto_decode_key_frame(&f, &b, true, eb, sizeof(eb));

		CHECK_EQ(ra, rb);
		if (ra || rb) {
			if (strcmp(ea, eb))
				fprintf(stderr, "  key %zu: '%s' vs '%s'\n", i, ea, eb);
			CHECK(!strcmp(ea, eb));
			CHECK(!a.token_ids && !b.token_ids);
			continue;
		}
		CHECK_EQ(a.ntokens, b.ntokens);
		CHECK(!a.ntokens || !memcmp(a.token_ids, b.token_ids, a.ntokens * 4));
		CHECK(!strcmp(a.model, b.model) && !strcmp(a.request_id, b.request_id));
		CHECK(a.world_size == b.world_size && a.worker_id == b.worker_id);
		CHECK(a.start == b.start && a.end == b.end);
		free(a.token_ids);
		free(b.token_ids);
		free(a.null_chunk_mask);
		free(b.null_chunk_mask);
	}
	/* the repeated field: its last value, both ways */
	{
		struct proto_request r;

		REQUIRE(DEC(PROTO_LOOKUP, &r, H(frames[4]), H("01")) == 0);
		CHECK_EQ(r.key.ntokens, 1);
		CHECK_EQ(r.key.token_ids[0], 9);
		proto_request_free(&r);
	}
	{
		struct proto_key k;

		CHECK_EQ(proto_decode_key_frame(NULL, &k, false, NULL, 0), -EINVAL);
	}
}

/* ---- framing faults: truncation, trailing bytes, types, counts ---- */

static void test_framing(void)
{
	struct proto_request r;
	uint8_t full[128];
	size_t n = unhex(KEY_HEX_77, full, sizeof(full));
	enum proto_type t;
	uint64_t uid;

	/* every proper prefix of the key is truncated msgpack */
	for (size_t len = 0; len < n; len++) {
		EXPECT(-EPROTO, DEC(PROTO_LOOKUP, arena_copy(full, len), H("01")));
	}
	/* trailing bytes after a document */
	{
		char hx[400];

		snprintf(hx, sizeof(hx), "%s c0", KEY_HEX_77);
		EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(hx), H("01")));
		CHECK(strstr(g_err, "trailing") != NULL);
	}
	EXPECT(-EPROTO, DEC(PROTO_LOOKUP, H(key_std()), H("01 00")));
	EXPECT(-EPROTO, DEC(PROTO_UNREGISTER_KV_CACHE, H("cd 30 39 00")));
	EXPECT(-EPROTO, DEC(PROTO_UNREGISTER_KV_CACHE, H("cd 30")));
	EXPECT(-EPROTO, DEC(PROTO_UNREGISTER_KV_CACHE, H("")));
	EXPECT(-EPROTO, DEC(PROTO_UNREGISTER_KV_CACHE, H("c1")));
	EXPECT(-EPROTO, DEC(PROTO_END_SESSION, H("a3 61 62")));
	EXPECT(-EPROTO, DEC(PROTO_END_SESSION, H("c7 01")));
	/* a header promising more than the frame holds: refused before any allocation */
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("dd ffffffff"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_STORE, H(key_std()), H("01"), H("df ffffffff"), H("c400")));
	EXPECT(-EPROTO, DEC(PROTO_END_SESSION, H("db ffffffff 61")));
	/* nesting: PROTO_MAX_DEPTH containers deep is fine, one more is not */
	{
		char hx[200] = "";

		for (unsigned i = 0; i < PROTO_MAX_DEPTH; i++)
			strcat(hx, "91");
		strcat(hx, "c0");
		struct dspec d = host_spec();
		EXPECT(0, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"), H("02"),
			      H(hx)));
		memmove(hx + 2, hx, strlen(hx) + 1);
		memcpy(hx, "91", 2);
		EXPECT(-EPROTO, DEC(PROTO_REGISTER_KV_CACHE, H("07"), kv_frame(&d, 1), H("a16d"),
				    H("02"), H(hx)));
		CHECK(strstr(g_err, "nested") != NULL);
	}

	/* uid frame */
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"\xcf\xff\xff\xff\xff"
									"\xff\xff\xff\xff", 9 },
				  &uid), 0);
	CHECK(uid == UINT64_MAX);
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"\xd0\x05", 2 }, &uid), 0);
	CHECK_EQ(uid, 5);
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"\xff", 1 }, &uid), -EPROTO);
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"\xa0", 1 }, &uid), -EPROTO);
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"\x07\x07", 2 }, &uid),
		 -EPROTO);
	CHECK_EQ(proto_decode_uid(&(struct proto_buf){ (const uint8_t *)"", 0 }, &uid), -EPROTO);

	/* type frame: unknown numbers are -EBADMSG, non-ints -EPROTO */
	static const char *const unknown[] = { "00", "0e", "15", "cc c7", "cc ca", "ff",
					       "cf ffffffffffffffff", "d3 8000000000000000" };
	for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
		struct proto_buf tf = H(unknown[i]);

		CHECK_EQ(proto_decode_type(&tf, &t), -EBADMSG);
		memset(g_err, 0, sizeof(g_err));
		CHECK_EQ(proto_decode_request(&tf, NULL, 0, &r, g_err, sizeof(g_err)), -EBADMSG);
		CHECK(err_ok());
		arena_reset();
	}
	static const char *const nonint[] = { "a10c", "c0", "c3", "cb 4028000000000000", "91 0c",
					      "0c 00", "", "cd 00" };
	for (size_t i = 0; i < sizeof(nonint) / sizeof(nonint[0]); i++) {
		struct proto_buf tf = H(nonint[i]);

		CHECK_EQ(proto_decode_type(&tf, &t), -EPROTO);
		memset(g_err, 0, sizeof(g_err));
		CHECK_EQ(proto_decode_request(&tf, NULL, 0, &r, g_err, sizeof(g_err)), -EPROTO);
		CHECK(err_ok());
		arena_reset();
	}
	/* any width names a known type */
	CHECK_EQ(proto_decode_type(&(struct proto_buf){ (const uint8_t *)"\xd1\x00\x0c", 3 }, &t), 0);
	CHECK_EQ(t, PROTO_PING);
	CHECK_EQ(proto_decode_type(&(struct proto_buf){ (const uint8_t *)"\xcc\xc9", 2 }, &t), 0);
	CHECK_EQ(t, PROTO_KS_STATS);
	/* NULL err buffer is allowed */
	CHECK_EQ(proto_decode_request(&(struct proto_buf){ (const uint8_t *)"\x0e", 1 }, NULL, 0, &r,
				      NULL, 0), -EBADMSG);

	/* wrong frame counts for every type: checked before any argument */
	static const struct {
		int type;
		unsigned min, max;
	} counts[] = {
		{ PROTO_REGISTER_KV_CACHE, 4, 5 }, { PROTO_UNREGISTER_KV_CACHE, 1, 1 },
		{ PROTO_STORE, 4, 4 }, { PROTO_RETRIEVE, 5, 5 }, { PROTO_LOOKUP, 2, 2 },
		{ PROTO_QUERY_PREFETCH_STATUS, 1, 1 }, { PROTO_QUERY_PREFETCH_LOOKUP_HITS, 1, 1 },
		{ PROTO_FREE_LOOKUP_LOCKS, 2, 2 }, { PROTO_END_SESSION, 1, 1 }, { PROTO_CLEAR, 0, 0 },
		{ PROTO_GET_CHUNK_SIZE, 0, 0 }, { PROTO_PING, 0, 1 }, { PROTO_NOOP, 0, 0 },
		{ PROTO_KS_LAST_ERROR, 0, 0 }, { PROTO_KS_STATS, 0, 0 },
	};
	for (size_t i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
		struct proto_buf nil[8];

		for (unsigned k = 0; k < 8; k++)
			nil[k] = (struct proto_buf){ (const uint8_t *)"\xc0", 1 };
		for (unsigned k = 0; k <= 7; k++) {
			if (k >= counts[i].min && k <= counts[i].max)
				continue;
			int rc = dec(counts[i].type, &r, nil, k);

			if (rc != -EINVAL)
				fprintf(stderr, "  %s with %u frames: rc %d\n",
					proto_type_name(counts[i].type), k, rc);
			CHECK_EQ(rc, -EINVAL);
		}
	}
}

/* ---- the small requests ---- */

static void test_small_requests(void)
{
	struct proto_request r;
	static const int zero_arg[] = { PROTO_CLEAR, PROTO_GET_CHUNK_SIZE, PROTO_NOOP, PROTO_PING,
					PROTO_KS_LAST_ERROR, PROTO_KS_STATS };

	for (size_t i = 0; i < sizeof(zero_arg) / sizeof(zero_arg[0]); i++) {
		REQUIRE(DEC0(zero_arg[i], &r) == 0);
		CHECK_EQ(r.type, zero_arg[i]);
		CHECK(!r.has_instance_id);
		CHECK(r.key.token_ids == NULL && r.layers == NULL && r.block_ids == NULL);
		proto_request_free(&r);
	}
	/* PING [instance_id] (later clients): a 63-bit int, or nil */
	REQUIRE(DEC(PROTO_PING, &r, H("cf 7fffffffffff0001")) == 0);
	CHECK(r.has_instance_id);
	CHECK_EQ(r.instance_id, 0x7fffffffffff0001ll);
	proto_request_free(&r);
	REQUIRE(DEC(PROTO_PING, &r, H("c0")) == 0);
	CHECK(!r.has_instance_id);
	proto_request_free(&r);
	EXPECT(-EPROTO, DEC(PROTO_PING, H("a0")));
	EXPECT(-EPROTO, DEC(PROTO_PING, H("cf ffffffffffffffff")));

	/* QUERY_*: an int job id */
	for (int type = PROTO_QUERY_PREFETCH_STATUS; type <= PROTO_QUERY_PREFETCH_LOOKUP_HITS;
	     type++) {
		REQUIRE(DEC(type, &r, H("cd 01 00")) == 0);
		CHECK_EQ(r.type, type);
		CHECK_EQ(r.job_id, 256);
		proto_request_free(&r);
		EXPECT(-EPROTO, DEC(type, H("a1 30")));
		EXPECT(-EPROTO, DEC(type, H("c0")));
	}
	/* END_SESSION: a str */
	REQUIRE(DEC(PROTO_END_SESSION, &r, H("a7 636d706c2d3432")) == 0);
	CHECK(!strcmp(r.request_id, "cmpl-42"));
	CHECK_EQ(r.request_id_len, 7);
	proto_request_free(&r);
	REQUIRE(DEC(PROTO_END_SESSION, &r, H("a0")) == 0);
	CHECK_EQ(r.request_id_len, 0);
	proto_request_free(&r);
	EXPECT(-EPROTO, DEC(PROTO_END_SESSION, H("01")));
	EXPECT(-EPROTO, DEC(PROTO_END_SESSION, H("c4 01 61")));
	/* UNREGISTER */
	EXPECT(-EPROTO, DEC(PROTO_UNREGISTER_KV_CACHE, H("c0")));
	EXPECT(-EPROTO, DEC(PROTO_UNREGISTER_KV_CACHE, H("cf 8000000000000000")));
	REQUIRE(DEC(PROTO_UNREGISTER_KV_CACHE, &r, H("d3 8000000000000000")) == 0);
	CHECK(r.instance_id == INT64_MIN);
	proto_request_free(&r);
}

/* ---- replies (client side) ---- */

static int reply(const char *hex, struct proto_reply *out)
{
	struct proto_buf f = H(hex);
	int rc = proto_decode_reply(&f, out);

	arena_reset();
	return rc;
}

static void test_replies(void)
{
	static struct proto_reply rp;
	struct proto_msg m;

	CHECK_EQ(reply("c3", &rp), 0);
	CHECK(rp.kind == PROTO_REPLY_BOOL && rp.b);
	CHECK_EQ(reply("c2", &rp), 0);
	CHECK(rp.kind == PROTO_REPLY_BOOL && !rp.b);
	CHECK_EQ(reply("c0", &rp), 0);
	CHECK_EQ(rp.kind, PROTO_REPLY_NIL);
	CHECK_EQ(reply("cd 01 00", &rp), 0);
	CHECK(rp.kind == PROTO_REPLY_INT && rp.i == 256);
	CHECK_EQ(reply("d0 80", &rp), 0);
	CHECK(rp.kind == PROTO_REPLY_INT && rp.i == -128);
	CHECK_EQ(reply("a2 4f 4b", &rp), 0);
	CHECK(rp.kind == PROTO_REPLY_STR && !strcmp(rp.str, "OK"));
	CHECK_EQ(reply("92 c4 00 c3", &rp), 0);
	CHECK(rp.kind == PROTO_REPLY_XFER && rp.b && rp.event_len == 0);
	CHECK_EQ(reply("92 c4 00 00", &rp), 0);	/* ok as 0/1 int */
	CHECK(rp.kind == PROTO_REPLY_XFER && !rp.b);
	{
		char hx[300];

		snprintf(hx, sizeof(hx), "92 %s c2", ev64());
		CHECK_EQ(reply(hx, &rp), 0);
		CHECK(rp.kind == PROTO_REPLY_XFER && !rp.b && rp.event_len == 64 &&
		      rp.event[63] == 63);
	}
	/* long strings are truncated, not refused */
	{
		char msg[2000];

		memset(msg, 'x', sizeof(msg) - 1);
		msg[sizeof(msg) - 1] = '\0';
		REQUIRE(proto_encode_str(&m, msg) == 0);
		CHECK_EQ(proto_decode_reply(&(struct proto_buf){ m.data, m.len }, &rp), 0);
		CHECK_EQ(strlen(rp.str), PROTO_REPLY_STR_MAX);
		proto_msg_free(&m);
	}
	/* stats map round trip */
	{
		const char *names[3] = { "requests_total", "frames_dropped_total", "z" };
		uint64_t vals[3] = { 12, 0, UINT64_MAX };

		REQUIRE(proto_encode_stats(&m, names, vals, 3) == 0);
		CHECK_EQ(m.data[0], 0x83);
		CHECK_EQ(proto_decode_reply(&(struct proto_buf){ m.data, m.len }, &rp), 0);
		proto_msg_free(&m);
		CHECK_EQ(rp.kind, PROTO_REPLY_MAP);
		CHECK_EQ(rp.map_n, 3);
		CHECK(!strcmp(rp.map_keys[1], "frames_dropped_total"));
		CHECK(rp.map_vals[2] == UINT64_MAX);
		CHECK_EQ(rp.map_vals[0], 12);
		REQUIRE(proto_encode_stats(&m, NULL, NULL, 0) == 0);
		check_bytes(&m, "80", "empty stats");
		CHECK_EQ(proto_decode_reply(&(struct proto_buf){ m.data, m.len }, &rp), 0);
		CHECK(rp.kind == PROTO_REPLY_MAP && rp.map_n == 0);
		proto_msg_free(&m);
	}
	/* every other shape is -EPROTO */
	static const char *const bad[] = {
		"", "c1", "cb 3ff0000000000000", "c4 00", "91 c4 00", "93 c4 00 c3 c3", "92 c3 c4 00",
		"92 c4 01 00 c3", "92 c4 00 02", "92 c4 00 a0", "92 a0 c3", "c3 c3", "92 c4 00",
		"cf 8000000000000000", "81 01 01", "81 a161 ff", "81 a161 a0", "d4 01 00",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = reply(bad[i], &rp);

		if (rc != -EPROTO)
			fprintf(stderr, "  reply %s: rc %d\n", bad[i], rc);
		CHECK_EQ(rc, -EPROTO);
	}
	/* map limits: 128 entries fine, 129 not; a 64-byte key is too long */
	{
		msgpack_packer *pk = P();
		char name[80];

		msgpack_pack_map(pk, PROTO_REPLY_MAP_MAX + 1);
		for (unsigned i = 0; i <= PROTO_REPLY_MAP_MAX; i++) {
			snprintf(name, sizeof(name), "k%u", i);
			pk_str(pk, name);
			msgpack_pack_uint64(pk, i);
		}
		struct proto_buf f = P_done();
		CHECK_EQ(proto_decode_reply(&f, &rp), -EPROTO);
		arena_reset();
		pk = P();
		msgpack_pack_map(pk, 1);
		memset(name, 'n', 64);
		name[64] = '\0';
		pk_str(pk, name);
		msgpack_pack_uint64(pk, 1);
		f = P_done();
		CHECK_EQ(proto_decode_reply(&f, &rp), -EPROTO);
		arena_reset();
	}
	/* encoder argument checks */
	CHECK_EQ(proto_encode_xfer_reply(&m, NULL, 64, true), -EINVAL);
	CHECK_EQ(proto_encode_int_list(&m, NULL, 3), -EINVAL);
	CHECK_EQ(proto_encode_bin(&m, NULL, 3), -EINVAL);
	REQUIRE(proto_encode_int_list(&m, NULL, 0) == 0);
	check_bytes(&m, "90", "empty list");
	proto_msg_free(&m);
	REQUIRE(proto_encode_bin(&m, NULL, 0) == 0);
	check_bytes(&m, "c4 00", "empty bin");
	proto_msg_free(&m);
	proto_msg_free(&m);
}

/* proto_check_frame on its own */
static void test_check_frame(void)
{
	char err[128];

	CHECK_EQ(proto_check_frame(&(struct proto_buf){ (const uint8_t *)"\x90", 1 }, err,
				   sizeof(err)), 0);
	CHECK_EQ(proto_check_frame(&(struct proto_buf){ (const uint8_t *)"\x92\x01", 2 }, err,
				   sizeof(err)), -EPROTO);
	CHECK(strstr(err, "truncated") != NULL);
	CHECK_EQ(proto_check_frame(&(struct proto_buf){ (const uint8_t *)"\x01\x02", 2 }, err,
				   sizeof(err)), -EPROTO);
	CHECK(strstr(err, "trailing") != NULL);
	CHECK_EQ(proto_check_frame(&(struct proto_buf){ (const uint8_t *)"\xc7\x00\x01", 3 }, err,
				   sizeof(err)), 0);	/* empty ext */
	CHECK_EQ(proto_check_frame(&(struct proto_buf){ (const uint8_t *)"\xd8\x01", 2 }, err,
				   sizeof(err)), -EPROTO);
	CHECK_EQ(proto_check_frame(&(struct proto_buf){ (const uint8_t *)"\xdc\x00\x00", 3 }, err,
				   sizeof(err)), 0);
	CHECK_EQ(proto_check_frame(NULL, err, sizeof(err)), -EINVAL);
	/* over PROTO_MAX_ELEMS entries with the bytes present: -E2BIG */
	{
		size_t n = PROTO_MAX_ELEMS + 1;
		uint8_t *b = calloc(1, 5 + n);

		REQUIRE(b);
		b[0] = 0xdd;
		b[1] = (uint8_t)(n >> 24), b[2] = (uint8_t)(n >> 16), b[3] = (uint8_t)(n >> 8);
		b[4] = (uint8_t)n;
		CHECK_EQ(proto_check_frame(&(struct proto_buf){ b, 5 + n }, err, sizeof(err)), -E2BIG);
		free(b);
	}
}


/* ---- the current dialect (protocol.md §11) ---- */

/* Decode in @dialect with an arbitrary op frame (int or str hex). */
static int decd(enum proto_dialect dialect, const char *op_hex, struct proto_request *r,
		const struct proto_buf *args, size_t n)
{
	struct proto_buf t = H(op_hex);
	int rc;

	memset(g_err, 0, sizeof(g_err));
	memset(r, 0xa5, sizeof(*r));
	rc = proto_decode_request_in(dialect, &t, args, n, r, g_err, sizeof(g_err));
	if (rc) {
		CHECK(err_ok());
		CHECK(r->key.token_ids == NULL && r->layers == NULL && r->block_ids == NULL &&
		      r->groups == NULL && r->key.null_chunk_mask == NULL);
	}
	arena_reset();
	return rc;
}
#define DECD(d, op, r, ...) \
	decd((d), (op), (r), (struct proto_buf[]){ __VA_ARGS__ }, NARGS(__VA_ARGS__))
#define DECD0(d, op, r) decd((d), (op), (r), NULL, 0)

/* What an AUTO decode of a request made of @op and args found. */
#define EXPECT_AUTO(op, want_rc, want_type, want_dialect, ...)                          \
	do {                                                                           \
		struct proto_request _r;                                               \
		int _rc = DECD(PROTO_DIALECT_AUTO, (op), &_r, __VA_ARGS__);            \
		if (_rc != (want_rc))                                                  \
			fprintf(stderr, "  op %s: err: %s\n", (op), g_err);            \
		CHECK_EQ(_rc, (want_rc));                                              \
		if (!_rc) {                                                            \
			CHECK_EQ(_r.type, (want_type));                                \
			CHECK_EQ(_r.dialect, (want_dialect));                          \
			proto_request_free(&_r);                                       \
		}                                                                      \
	} while (0)

/* The §11.4 key: the March fields of key_std() plus the current ones. */
#define CUR_FIELDS_HEX                                                                 \
	"aa63616368655f73616c74 a0"	      /* cache_salt: "" */                       \
	" af726571756573745f636f6e66696773 c0" /* request_configs: nil */                \
	" ae6e756d5f6b765f72656164657273 01"   /* num_kv_readers: 1 */                   \
	" af6e756c6c5f6368756e6b5f6d61736b c0" /* null_chunk_mask: nil */

static const char *key_current(const char *salt_hex, const char *readers_hex, const char *mask_hex)
{
	static char extra[4096];

	snprintf(extra, sizeof(extra),
		 "aa63616368655f73616c74 %s af726571756573745f636f6e66696773 c0 "
		 "ae6e756d5f6b765f72656164657273 %s af6e756c6c5f6368756e6b5f6d61736b %s",
		 salt_hex, readers_hex, mask_hex);
	return key_hex(-1, -1, NULL, 4, extra);
}

static void test_current_classify(void)
{
	static char march_key[1024], cur_key[1024];	/* key_hex's buffer is reused */
	struct dspec d = host_spec();

	snprintf(march_key, sizeof(march_key), "%s", key_std());
	snprintf(cur_key, sizeof(cur_key), "%s", key_hex(-1, -1, NULL, 4, CUR_FIELDS_HEX));
	/* Neutral: UNREGISTER means the same in both, and latches nothing. */
	EXPECT_AUTO("02", 0, PROTO_UNREGISTER_KV_CACHE, PROTO_DIALECT_AUTO, H("cd 3039"));
	EXPECT_AUTO("cc c9", -EINVAL, 0, 0, H("c0"), H("c0"));	/* KS_STATS takes none */
	{
		struct proto_request r;

		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "cc c9", &r), 0);
		CHECK_EQ(r.type, PROTO_KS_STATS);
		CHECK_EQ(r.dialect, PROTO_DIALECT_AUTO);
	}
	/* REGISTER: 4 or 5 frames March, 6 or 7 current */
	EXPECT_AUTO("01", 0, PROTO_REGISTER_KV_CACHE, PROTO_DIALECT_MARCH, H("07"), kv_frame(&d, 2),
		    H("a16d"), H("02"));
	EXPECT_AUTO("01", 0, PROTO_REGISTER_KV_CACHE, PROTO_DIALECT_CURRENT, H("07"),
		    kv_frame(&d, 2), H("a16d"), H("02"), H("a4766c6c6d"), H("80"), H("90"));
	EXPECT_AUTO("01", 0, PROTO_REGISTER_KV_CACHE, PROTO_DIALECT_CURRENT, H("07"),
		    kv_frame(&d, 2), H("a16d"), H("02"), H("a4766c6c6d"), H("c0"));
	EXPECT_AUTO("01", -EINVAL, 0, 0, H("07"), kv_frame(&d, 2), H("a16d"));
	/* 3..7: March STORE/RETRIEVE/LOOKUP/QUERY_* against current Q-cache/STORE/RETRIEVE */
	EXPECT_AUTO("03", 0, PROTO_STORE, PROTO_DIALECT_MARCH, H(key_with(2, "00")), H("01"),
		    H("91 00"), H("c4 00"));
	EXPECT_AUTO("04", 0, PROTO_UNSUPPORTED, PROTO_DIALECT_CURRENT, H("01"));
	EXPECT_AUTO("05", 0, PROTO_LOOKUP, PROTO_DIALECT_MARCH, H(march_key), H("01"));
	EXPECT_AUTO("06", 0, PROTO_QUERY_PREFETCH_STATUS, PROTO_DIALECT_MARCH, H("05"));
	EXPECT_AUTO("06", 0, PROTO_STORE, PROTO_DIALECT_CURRENT, H(cur_key), H("01"),
		    H("91 91 00"), H("c4 00"));
	EXPECT_AUTO("07", 0, PROTO_QUERY_PREFETCH_LOOKUP_HITS, PROTO_DIALECT_MARCH, H("05"));
	EXPECT_AUTO("07", 0, PROTO_RETRIEVE, PROTO_DIALECT_CURRENT, H(cur_key), H("01"),
		    H("91 91 00"), H("c4 00"), H("00"));
	/* 8: [key, int] in both; the key's fields tell them apart */
	EXPECT_AUTO("08", 0, PROTO_FREE_LOOKUP_LOCKS, PROTO_DIALECT_MARCH, H(march_key), H("01"));
	EXPECT_AUTO("08", 0, PROTO_LOOKUP, PROTO_DIALECT_CURRENT, H(cur_key), H("01"));
	/* 9: [str] in both: ambiguous until latched */
	EXPECT_AUTO("09", 0, PROTO_AMBIGUOUS, PROTO_DIALECT_AUTO, H("a172"));
	EXPECT_AUTO("09", -EINVAL, 0, 0, H("05"));
	EXPECT_AUTO("0a", -EINVAL, 0, 0, H("c0"));	/* CLEAR takes none, WAIT two */
	{
		struct proto_request r;

		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "0a", &r), 0);
		CHECK_EQ(r.type, PROTO_CLEAR);
		CHECK_EQ(r.dialect, PROTO_DIALECT_MARCH);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "0b", &r), 0);
		CHECK_EQ(r.type, PROTO_GET_CHUNK_SIZE);
		CHECK_EQ(r.dialect, PROTO_DIALECT_MARCH);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "0c", &r), 0);
		CHECK_EQ(r.type, PROTO_PING);
		CHECK_EQ(r.dialect, PROTO_DIALECT_MARCH);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "0d", &r), 0);
		CHECK_EQ(r.type, PROTO_NOOP);
		CHECK_EQ(r.dialect, PROTO_DIALECT_MARCH);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "14", &r), 0);	/* 20: clear (force defaulted) */
		CHECK_EQ(r.type, PROTO_CLEAR);
		CHECK_EQ(r.dialect, PROTO_DIALECT_CURRENT);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "15", &r), 0);
		CHECK_EQ(r.type, PROTO_GET_CHUNK_SIZE);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "18", &r), 0);
		CHECK_EQ(r.type, PROTO_NOOP);
		CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "20", &r), 0);
		CHECK_EQ(r.type, PROTO_GET_EXPERIMENTAL);
		CHECK_EQ(r.dialect, PROTO_DIALECT_CURRENT);
	}
	EXPECT_AUTO("0a", 0, PROTO_WAIT_PREFETCH_STATUS, PROTO_DIALECT_CURRENT, H("a172"),
		    H("cb 3fb999999999999a"));
	EXPECT_AUTO("0b", 0, PROTO_QUERY_PREFETCH_LOOKUP_HITS, PROTO_DIALECT_CURRENT, H("a172"));
	EXPECT_AUTO("0c", 0, PROTO_PING, PROTO_DIALECT_MARCH, H("c0"));
	EXPECT_AUTO("0c", 0, PROTO_FREE_LOOKUP_LOCKS, PROTO_DIALECT_CURRENT, H(cur_key), H("01"));
	EXPECT_AUTO("0d", 0, PROTO_END_SESSION, PROTO_DIALECT_CURRENT, H("a172"));
	EXPECT_AUTO("0d", 0, PROTO_END_SESSION, PROTO_DIALECT_CURRENT, H("a172"),
		    H("82 ad66696e6973685f726561736f6e a473746f70 ad73746f705f746f6b656e5f6964 02"));
	EXPECT_AUTO("16", 0, PROTO_PING, PROTO_DIALECT_CURRENT, H("c0"));
	EXPECT_AUTO("16", 0, PROTO_PING, PROTO_DIALECT_CURRENT, H("cf 7fffffffffffffff"));
	EXPECT_AUTO("17", 0, PROTO_REPORT_BLOCK_ALLOCATION, PROTO_DIALECT_CURRENT, H("01"),
		    H("a16d"), H("90"));
	/* 35 is past the frozen table; beyond int64 and negative ids are unknown too */
	EXPECT_AUTO("23", -EBADMSG, 0, 0, H("00"));
	EXPECT_AUTO("d0 ff", -EBADMSG, 0, 0, H("00"));
}

static void test_current_ops(void)
{
	struct proto_request r;

	/* string op names: a frozen op by name, and names kvstash does not know */
	REQUIRE(DECD0(PROTO_DIALECT_AUTO, "a46e6f6f70", &r) == 0);	/* "noop" */
	CHECK_EQ(r.type, PROTO_NOOP);
	CHECK_EQ(r.dialect, PROTO_DIALECT_CURRENT);
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "b7 73746f72655f776974685f6368756e6b5f6576656e7473", &r,
		     H("01"), H("02")) == 0);	/* "store_with_chunk_events" */
	CHECK_EQ(r.type, PROTO_UNSUPPORTED);
	CHECK(r.op_name && !strcmp(r.op_name, "store_with_chunk_events"));
	CHECK_EQ(r.unsupported_reply, PROTO_UNSUP_NONE);
	/* every unsupported frozen op, with the answer LMCache's client handles */
	static const struct {
		const char *op;
		enum proto_unsupported_reply reply;
	} unsup[] = {
		{ "03", PROTO_UNSUP_NONE }, { "05", PROTO_UNSUP_XFER_FAIL },
		{ "0e", PROTO_UNSUP_ED_REGISTER }, { "0f", PROTO_UNSUP_NONE },
		{ "10", PROTO_UNSUP_PREPARE_STORE }, { "11", PROTO_UNSUP_FALSE },
		{ "12", PROTO_UNSUP_PREPARE_RETRIEVE }, { "13", PROTO_UNSUP_FALSE },
		{ "19", PROTO_UNSUP_NONE }, { "1a", PROTO_UNSUP_NONE },
		{ "1b", PROTO_UNSUP_XFER_FAIL }, { "1c", PROTO_UNSUP_CB_LOOKUP },
		{ "1d", PROTO_UNSUP_ZERO }, { "1e", PROTO_UNSUP_EMPTY_LIST },
		{ "1f", PROTO_UNSUP_NONE }, { "21", PROTO_UNSUP_HANDSHAKE },
		{ "22", PROTO_UNSUP_NONE },
	};
	for (size_t i = 0; i < KS_ARRAY_SIZE(unsup); i++) {
		struct proto_msg m;

		REQUIRE(DECD(PROTO_DIALECT_CURRENT, unsup[i].op, &r, H("01")) == 0);
		CHECK_EQ(r.type, PROTO_UNSUPPORTED);
		CHECK_EQ(r.unsupported_reply, unsup[i].reply);
		CHECK(r.op_name && r.op_name[0]);
		if (unsup[i].reply == PROTO_UNSUP_NONE) {
			CHECK_EQ(proto_encode_unsupported(&m, unsup[i].reply), -EINVAL);
		} else {
			REQUIRE(proto_encode_unsupported(&m, unsup[i].reply) == 0);
			CHECK_EQ(proto_check_frame(&(struct proto_buf){ m.data, m.len }, NULL, 0), 0);
			proto_msg_free(&m);
		}
	}
	/* the answers' exact bytes where a client checks types strictly */
	struct proto_msg m;
	REQUIRE(proto_encode_unsupported(&m, PROTO_UNSUP_XFER_FAIL) == 0);
	check_bytes(&m, "92 c4 00 c2", "store_q answer");
	proto_msg_free(&m);
	REQUIRE(proto_encode_unsupported(&m, PROTO_UNSUP_HANDSHAKE) == 0);
	check_bytes(&m, "92 00 c2", "cb_protocol_handshake answer");
	proto_msg_free(&m);
	REQUIRE(proto_encode_unsupported(&m, PROTO_UNSUP_PREPARE_STORE) == 0);
	check_bytes(&m, "81 a7636f6e74657874 80", "prepare_store answer");
	proto_msg_free(&m);
	REQUIRE(proto_encode_empty_list(&m) == 0);
	check_bytes(&m, "90", "get_experimental answer");
	proto_msg_free(&m);

	/* pinned dialects: each refuses the other's ops */
	CHECK_EQ(DECD0(PROTO_DIALECT_MARCH, "20", &r), -EBADMSG);
	CHECK_EQ(DECD0(PROTO_DIALECT_MARCH, "a46e6f6f70", &r), -EBADMSG);
	CHECK_EQ(DECD0(PROTO_DIALECT_CURRENT, "0b", &r), -EINVAL);	/* QPLH needs [request_id] */
	REQUIRE(DECD0(PROTO_DIALECT_CURRENT, "cc c8", &r) == 0);	/* the extensions: both */
	CHECK_EQ(r.type, PROTO_KS_LAST_ERROR);
	/* A latched connection never switches: op 12 [] is not a PING in the current dialect */
	CHECK_EQ(DECD0(PROTO_DIALECT_CURRENT, "0c", &r), -EINVAL);
	/* ... and op 9 [str] is END_SESSION on a March connection, QPS on a current one */
	REQUIRE(DECD(PROTO_DIALECT_MARCH, "09", &r, H("a172")) == 0);
	CHECK_EQ(r.type, PROTO_END_SESSION);
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "09", &r, H("a172")) == 0);
	CHECK_EQ(r.type, PROTO_QUERY_PREFETCH_STATUS);
	CHECK_EQ(r.request_id_len, 1);
	/* op 8 on a March connection is FREE_LOOKUP_LOCKS whatever the key carries */
	REQUIRE(DECD(PROTO_DIALECT_MARCH, "08", &r, H(key_current("a0", "01", "c0")), H("01")) ==
		0);
	CHECK_EQ(r.type, PROTO_FREE_LOOKUP_LOCKS);
	proto_request_free(&r);

	/* bad op frames: oversized, empty, non-printable names, wrong types */
	static char big[2 * 80 + 8];
	strcpy(big, "d9 41");
	for (int i = 0; i < 65; i++)
		strcat(big, "61");
	CHECK_EQ(DECD0(PROTO_DIALECT_CURRENT, big, &r), -E2BIG);
	CHECK_EQ(DECD0(PROTO_DIALECT_CURRENT, "a0", &r), -EPROTO);
	CHECK_EQ(DECD0(PROTO_DIALECT_CURRENT, "a2 6101", &r), -EPROTO);
	CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "c3", &r), -EPROTO);
	CHECK_EQ(DECD0(PROTO_DIALECT_AUTO, "c4 01 00", &r), -EPROTO);
	/* WAIT's timeout: int or float, never negative or NaN */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "0a", &r, H("a172"), H("05")) == 0);
	CHECK(r.wait_timeout_s == 5.0);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "0a", &r, H("a172"), H("cb bff0000000000000")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "0a", &r, H("a172"), H("cb 7ff8000000000000")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "0a", &r, H("a172"), H("a131")), -EPROTO);
	/* CLEAR's force */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "14", &r, H("c3")) == 0);
	CHECK(r.force);
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "14", &r, H("c2")) == 0);
	CHECK(!r.force);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "14", &r, H("a178")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "14", &r, H("c2"), H("c2")), -EINVAL);
}

static void test_current_key(void)
{
	struct proto_request r;

	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a3 616263", "03", "c0")),
		     H("01")) == 0);
	check_std_key(&r.key);
	CHECK(r.key.has_current_fields);
	CHECK(!strcmp(r.key.cache_salt, "abc"));
	CHECK_EQ(r.key.cache_salt_len, 3);
	CHECK_EQ(r.key.num_kv_readers, 3);
	CHECK(r.key.null_chunk_mask == NULL);
	proto_request_free(&r);
	/* a March key has none of them */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_std()), H("01")) == 0);
	CHECK(!r.key.has_current_fields);
	CHECK_EQ(r.key.num_kv_readers, 0);
	proto_request_free(&r);
	/* null_chunk_mask [[true, false], [false]]: 2 groups, missing entries false */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a0", "01", "92 92 c3 c2 91 c2")),
		     H("01")) == 0);
	CHECK_EQ(r.key.mask_groups, 2);
	CHECK_EQ(r.key.mask_chunks, 2);
	if (r.key.null_chunk_mask) {
		CHECK(r.key.null_chunk_mask[0] && !r.key.null_chunk_mask[1]);
		CHECK(!r.key.null_chunk_mask[2] && !r.key.null_chunk_mask[3]);
	}
	proto_request_free(&r);
	/* salts LMCache refuses: '/', '@', '\\', NUL, over 128 characters */
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a3 612f62", "01", "c0")),
		      H("01")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a3 614062", "01", "c0")),
		      H("01")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a3 615c62", "01", "c0")),
		      H("01")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a3 610062", "01", "c0")),
		      H("01")), -EPROTO);
	{
		static char salt[2 * 130 + 8];

		strcpy(salt, "d9 81");
		for (int i = 0; i < 129; i++)
			strcat(salt, "73");
		CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current(salt, "01", "c0")),
			      H("01")), -EPROTO);
		salt[4] = '0';	/* d9 80: exactly 128 */
		salt[strlen(salt) - 2] = '\0';
		REQUIRE(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current(salt, "01", "c0")),
			     H("01")) == 0);
		CHECK_EQ(r.key.cache_salt_len, 128);
		proto_request_free(&r);
	}
	/* wrong types */
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("01", "01", "c0")), H("01")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a0", "ff", "c0")), H("01")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a0", "01", "91 91 01")),
		      H("01")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a0", "01", "91 c3")),
		      H("01")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r, H(key_current("a0", "01", "a178")),
		      H("01")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "08", &r,
		      H(key_hex(-1, -1, NULL, 1, "af726571756573745f636f6e66696773 a178")), H("01")),
		 -EPROTO);
}

static void test_current_store(void)
{
	struct proto_request r;
	const char *k = key_current("a0", "01", "c0");
	uint8_t sem[81];
	char sem_hex[2 * 81 + 8] = "c4 51 ";

	/* per-group block lists, and a flat list taken as one group */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("92 92 01 02 91 03"),
		     H("c4 00")) == 0);
	CHECK_EQ(r.type, PROTO_STORE);
	CHECK_EQ(r.nblock_lists, 2);
	CHECK_EQ(r.nblocks, 3);
	CHECK_EQ(r.block_list_len[0], 2);
	CHECK_EQ(r.block_list_len[1], 1);
	CHECK_EQ(r.block_ids[r.block_list_off[1]], 3);
	CHECK_EQ(r.event_kind, PROTO_EVENT_NONE);
	proto_request_free(&r);
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("92 01 02"), H("c4 00")) ==
		0);
	CHECK_EQ(r.nblock_lists, 1);
	CHECK_EQ(r.nblocks, 2);
	proto_request_free(&r);
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("90"), H("c4 00")) == 0);
	CHECK_EQ(r.nblock_lists, 1);
	CHECK_EQ(r.nblocks, 0);
	proto_request_free(&r);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("92 91 01 02"), H("c4 00")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("91 91 ff"), H("c4 00")),
		 -EPROTO);
	/* events: 64-byte CUDA, 81-byte isolated IPC (version 1), the CPU stub */
	memset(sem, 0x11, sizeof(sem));
	sem[0] = 1;
	for (int i = 0; i < 81; i++)
		snprintf(sem_hex + strlen(sem_hex), sizeof(sem_hex) - strlen(sem_hex), "%02x",
			 sem[i]);
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "07", &r, H(k), H("01"), H("91 91 00"), H(sem_hex),
		     H("00")) == 0);
	CHECK_EQ(r.event_kind, PROTO_EVENT_SEMAPHORE);
	CHECK_EQ(r.event_len, 81);
	CHECK_EQ(r.event[0], 1);
	proto_request_free(&r);
	sem_hex[6] = '0', sem_hex[7] = '2';	/* version 2 */
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "07", &r, H(k), H("01"), H("91 91 00"), H(sem_hex),
		      H("00")), -EPROTO);
	sem_hex[7] = '1';
	CHECK_EQ(DECD(PROTO_DIALECT_MARCH, "04", &r, H(key_with(2, "00")), H("01"), H("91 00"),
		      H(sem_hex), H("00")), -EPROTO);	/* March: 0 or 64 bytes only */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("91 91 00"),
		     H("c4 0f 737475625f6970635f68616e646c65")) == 0);
	CHECK_EQ(r.event_kind, PROTO_EVENT_CPU_STUB);
	proto_request_free(&r);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("91 91 00"),
		      H("c4 0f 737475625f6970635f68616e646c66")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "06", &r, H(k), H("01"), H("91 91 00"), H("c4 01 00")),
		 -EPROTO);
}

static void test_current_register(void)
{
	struct proto_request r;
	struct dspec d = host_spec();

	/* two groups over four layers; unknown EngineGroupInfo fields ignored */
	REQUIRE(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 4), H("a16d"), H("02"),
		     H("a4766c6c6d"), H("81 a96b765f6c61796f7574 a3 4e4844"),
		     H("92"
		       " 83 af656e67696e655f67726f75705f6964 00 ad6c617965725f696e6469636573 92 00 02"
		       "    af726563757272656e745f7374617465 c2"
		       " 84 af656e67696e655f67726f75705f6964 01 ad6c617965725f696e6469636573 92 01 03"
		       "    b0746f6b656e735f7065725f626c6f636b 10"
		       "    ae73775f73697a655f746f6b656e73 cd 1000")) == 0);
	CHECK_EQ(r.ngroups, 2);
	if (r.ngroups == 2) {
		CHECK_EQ(r.groups[0].nlayers, 2);
		CHECK_EQ(r.groups[0].layers[1], 2);
		CHECK_EQ(r.groups[0].sw_size_tokens, -1);
		CHECK_EQ(r.groups[1].engine_group_id, 1);
		CHECK_EQ(r.groups[1].tokens_per_block, 16);
		CHECK_EQ(r.groups[1].sw_size_tokens, 4096);
	}
	proto_request_free(&r);
	/* a layer outside kv_caches, one in two groups, a group with none, no id */
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("a4766c6c6d"), H("80"),
		      H("91 82 af656e67696e655f67726f75705f6964 00 ad6c617965725f696e6469636573 91 02")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("a4766c6c6d"), H("80"),
		      H("92 82 af656e67696e655f67726f75705f6964 00 ad6c617965725f696e6469636573 91 00"
			"   82 af656e67696e655f67726f75705f6964 01 ad6c617965725f696e6469636573 91 00")),
		 -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("a4766c6c6d"), H("80"),
		      H("91 81 af656e67696e655f67726f75705f6964 00")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("a4766c6c6d"), H("80"),
		      H("91 81 ad6c617965725f696e6469636573 91 00")), -EPROTO);
	/* engine_type a scalar, layout_hints a map or nil */
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("90"), H("80"), H("90")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("a4766c6c6d"), H("a178"), H("90")), -EPROTO);
	CHECK_EQ(DECD(PROTO_DIALECT_CURRENT, "01", &r, H("07"), kv_frame(&d, 2), H("a16d"),
		      H("02"), H("a4766c6c6d"), H("80"), H("a178")), -EPROTO);
}

int main(void)
{
	test_section8_bytes();
	test_section8_requests();
	test_key();
	test_key_fast_path();
	test_register();
	test_store_retrieve();
	test_small_requests();
	test_framing();
	test_replies();
	test_check_frame();
	test_current_classify();
	test_current_ops();
	test_current_key();
	test_current_store();
	test_current_register();
	arena_reset();
	return t_result("protocol");
}
