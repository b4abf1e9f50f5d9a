/* Description: pickle reader and LMCache CudaIPCWrapper decoding (goldens, real PyTorch, bad input). Labels: unit */
/*
 * Golden pickles in tests/data (tests/data/make_pickles.py: synthetic ones
 * with the wrapper's real GLOBAL names and tuple layout, protocols 2-5, and
 * real ones written by PyTorch 2.11 on an H100 by tests/gpu/
 * make_torch_wrapper.py) are decoded field by field, and through
 * REGISTER_KV_CACHE (ext 1) into the proto_kv_desc the server maps; for the
 * real ones the expected offset is data_ptr minus the allocation base that
 * cuMemGetAddressRange reported, measured apart from the pickle. Then every
 * prefix of every golden (truncation at each byte), byte flips, and crafted
 * hostile input: unknown opcodes, huge lengths, deep nesting, stack and memo
 * abuse, disallowed globals. Each input sits in an exact-size heap buffer so
 * ASan flags any read past its end.
 */
#include <errno.h>
#include <string.h>

#include <msgpack.h>

#include "helpers.h"
#include "pickle.h"
#include "protocol.h"

static char err[256];

/* @n bytes of @p in a fresh exact-size buffer (caller frees). */
static uint8_t *dup_exact(const void *p, size_t n)
{
	uint8_t *b = malloc(n ? n : 1);

	REQUIRE(b);
	if (n)
		memcpy(b, p, n);
	return b;
}

static int parse_exact(const void *p, size_t n)
{
	uint8_t *b = dup_exact(p, n);
	struct pk_doc *d = NULL;
	int rc;

	err[0] = '\0';
	rc = pk_parse(b, n, &d, err, sizeof(err));
	if (rc == 0)
		CHECK(d != NULL && pk_root(d) != NULL);
	else
		CHECK(d == NULL && err[0] != '\0' && !strchr(err, '\n'));
	pk_free(d);
	free(b);
	return rc;
}

static int decode_exact(const void *p, size_t n, struct pk_cuda_ipc *w)
{
	uint8_t *b = dup_exact(p, n);
	int rc;

	err[0] = '\0';
	rc = pk_cuda_ipc_decode(b, n, w, err, sizeof(err));
	if (rc)
		CHECK(err[0] != '\0' && !strchr(err, '\n'));
	free(b);
	return rc;
}

#define PARSE(lit) parse_exact((lit), sizeof(lit) - 1)
/* The last error names @word (NULL: no check). */
static void expect_word(const char *word, int line)
{
	if (word && !strstr(err, word)) {
		fprintf(stderr, "FAIL %s:%d: '%s' not in '%s'\n", __FILE__, line, word, err);
		t_failures++;
	}
}

#define EXPECT_PARSE(rc, lit, word)                   \
	do {                                          \
		CHECK_EQ(PARSE(lit), (rc));           \
		expect_word((word), __LINE__);        \
	} while (0)

/* ---- files ------------------------------------------------------------------------- */

static uint8_t *read_file(const char *name, size_t *len)
{
	char path[1024];
	uint8_t *b;
	long n;
	FILE *f;

	snprintf(path, sizeof(path), "%s/tests/data/%s", KS_SOURCE_DIR, name);
	f = fopen(path, "rb");
	if (!f) {
		fprintf(stderr, "cannot open %s\n", path);
		return NULL;
	}
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	b = malloc(n > 0 ? (size_t)n : 1);
	REQUIRE(b);
	REQUIRE(fread(b, 1, (size_t)n, f) == (size_t)n);
	fclose(f);
	*len = (size_t)n;
	return b;
}

static int errno_of(const char *name)
{
	static const struct { const char *n; int v; } t[] = {
		{ "0", 0 }, { "EPROTO", EPROTO }, { "EPERM", EPERM }, { "E2BIG", E2BIG },
		{ "EOPNOTSUPP", EOPNOTSUPP },
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
		if (!strcmp(t[i].n, name))
			return -t[i].v;
	fprintf(stderr, "unknown errno name %s\n", name);
	t_failures++;
	return 1;
}

static size_t parse_list(const char *csv, int64_t *out, size_t cap)
{
	size_t n = 0;
	const char *p = csv;

	while (*p && n < cap) {
		char *end;

		out[n++] = strtoll(p, &end, 10);
		p = *end == ',' ? end + 1 : end;
	}
	return n;
}

static void unhex(const char *hex, uint8_t *out, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned v = 0;

		REQUIRE(sscanf(hex + 2 * i, "%2x", &v) == 1);
		out[i] = (uint8_t)v;
	}
}

/* ---- REGISTER_KV_CACHE with ext-1 elements --------------------------------------------- */

static struct proto_buf packed(msgpack_sbuffer *sb)
{
	struct proto_buf b = { dup_exact(sb->data, sb->size), sb->size };

	msgpack_sbuffer_destroy(sb);
	return b;
}

static struct proto_buf pack_int(int64_t v)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_int64(&pk, v);
	return packed(&sb);
}

/*
 * Decode REGISTER_KV_CACHE(7, [ext1(pickle)] * nlayers, "m", 1). The reason
 * goes to err. Returns the decoder's code; @r holds the request on success.
 */
static int register_ext1(const uint8_t *pkl, size_t len, unsigned nlayers,
			 struct proto_request *r)
{
	struct proto_buf f[5];
	msgpack_sbuffer sb;
	msgpack_packer pk;
	int rc;

	f[0] = pack_int(PROTO_REGISTER_KV_CACHE);
	f[1] = pack_int(7);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, nlayers);
	for (unsigned i = 0; i < nlayers; i++) {
		msgpack_pack_ext(&pk, len, 1);
		msgpack_pack_ext_body(&pk, pkl, len);
	}
	f[2] = packed(&sb);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_str(&pk, 1);
	msgpack_pack_str_body(&pk, "m", 1);
	f[3] = packed(&sb);
	f[4] = pack_int(1);
	err[0] = '\0';
	rc = proto_decode_request(&f[0], &f[1], 4, r, err, sizeof(err));
	for (int i = 0; i < 5; i++)
		free((void *)f[i].data);
	return rc;
}

/* ---- goldens ----------------------------------------------------------------------------- */

static unsigned n_ok, n_err, n_real;

static void check_ok_line(char **tok, const uint8_t *pkl, size_t len)
{
	/* ok FILE KIND DTYPE SHAPE STRIDE SO OFF_B SIZE_B DEVICE VERSION HANDLE SYNC UUID
	 *    LAYOUT DESC_OFFSET DESC_NBYTES */
	struct pk_cuda_ipc w;
	struct proto_request r;
	int64_t shape[PK_MAX_DIMS], stride[PK_MAX_DIMS];
	uint8_t handle[64];
	size_t nd = parse_list(tok[4], shape, PK_MAX_DIMS);
	size_t ns = parse_list(tok[5], stride, PK_MAX_DIMS);
	int rc;

	unhex(tok[11], handle, 64);
	rc = decode_exact(pkl, len, &w);
	CHECK_EQ(rc, 0);
	if (rc) {
		fprintf(stderr, "  %s: %s\n", tok[1], err);
		return;
	}
	CHECK_EQ(w.kind, atoi(tok[2]));
	CHECK(!strcmp(w.dtype, tok[3]));
	CHECK_EQ(w.ndim, nd);
	CHECK_EQ(ns, nd);
	for (size_t i = 0; i < nd && i < w.ndim; i++) {
		CHECK_EQ(w.shape[i], shape[i]);
		CHECK_EQ(w.stride[i], stride[i]);
	}
	CHECK_EQ(w.storage_offset, strtoull(tok[6], NULL, 10));
	CHECK_EQ(w.storage_offset_bytes, strtoull(tok[7], NULL, 10));
	CHECK_EQ(w.storage_size_bytes, strtoull(tok[8], NULL, 10));
	CHECK_EQ(w.device, atoi(tok[9]));
	CHECK_EQ(w.handle_version, atoi(tok[10]));
	CHECK(!memcmp(w.mem_handle, handle, 64));
	CHECK_EQ(w.event_sync_required, atoi(tok[12]));
	CHECK(!strcmp(w.device_uuid, tok[13]));
	if (w.kind == PK_WRAPPER_CUDA_IPC) {
		CHECK(w.ref_counter[0] == '/');	/* a POSIX shm name, as PyTorch makes them */
		if (w.event_sync_required) {
			bool any = false;

			for (int i = 0; i < 64; i++)
				any |= w.event_handle[i] != 0;
			CHECK(any);
		}
	}

	/* the same pickle through REGISTER_KV_CACHE, two layers */
	rc = register_ext1(pkl, len, 2, &r);
	CHECK_EQ(rc, 0);
	if (rc) {
		fprintf(stderr, "  %s: REGISTER: %s\n", tok[1], err);
		return;
	}
	CHECK_EQ(r.nlayers, 2);
	for (size_t l = 0; l < r.nlayers; l++) {
		const struct proto_kv_desc *d = &r.layers[l];

		CHECK_EQ(d->kind, PROTO_KV_CUDA_IPC);
		CHECK_EQ(d->offset, strtoull(tok[15], NULL, 10));
		CHECK_EQ(d->nbytes, strtoull(tok[16], NULL, 10));
		CHECK(!memcmp(d->mem_handle, handle, 64));
		CHECK(!strcmp(d->device_uuid, tok[13]));
		CHECK(!strcmp(kv_layout_kind_name(d->layout.kind), tok[14]));
		CHECK(!strcmp(kv_dtype_name(d->layout.dtype), tok[3]));
		CHECK_EQ(d->layout.ndim, nd);
		CHECK_EQ(d->layout.num_layers, 2);
		for (size_t i = 0; i < nd; i++) {
			CHECK_EQ(d->layout.shape[i], shape[i]);
			CHECK_EQ(d->layout.stride[i], stride[i]);
		}
	}
	proto_request_free(&r);
	n_ok++;
	if (!strncmp(tok[1], "pickle_torch211_", 16))
		n_real++;
}

static void check_err_line(char **tok, const uint8_t *pkl, size_t len)
{
	/* err FILE PK_ERRNO PROTO_ERRNO WORD */
	struct pk_cuda_ipc w;
	struct proto_request r;
	int pk_rc = errno_of(tok[2]), proto_rc = errno_of(tok[3]);
	int rc = decode_exact(pkl, len, &w);

	CHECK_EQ(rc, pk_rc);
	if (pk_rc && !strstr(err, tok[4])) {
		fprintf(stderr, "FAIL %s: '%s' not in '%s'\n", tok[1], tok[4], err);
		t_failures++;
	}
	rc = register_ext1(pkl, len, 1, &r);
	CHECK_EQ(rc, proto_rc);
	if (rc == 0)
		proto_request_free(&r);
	else if (!strstr(err, tok[4]) || !strstr(err, "kv_caches[0]")) {
		fprintf(stderr, "FAIL %s: REGISTER: '%s' not in '%s'\n", tok[1], tok[4], err);
		t_failures++;
	}
	n_err++;
}

/* Every proper prefix fails cleanly; flipped bytes never crash or mislead. */
static void mutate(const uint8_t *pkl, size_t len)
{
	static const uint8_t xors[] = { 0x01, 0x80, 0xff };
	struct pk_cuda_ipc w;

	for (size_t n = 0; n < len; n++) {
		int rc = decode_exact(pkl, n, &w);

		CHECK(rc == -EPROTO || rc == -E2BIG || rc == -EPERM);
		if (rc == 0)
			fprintf(stderr, "  prefix of %zu bytes decoded\n", n);
	}
	for (size_t i = 0; i < len; i++) {
		for (size_t k = 0; k < sizeof(xors); k++) {
			uint8_t *b = dup_exact(pkl, len);
			int rc;

			b[i] ^= xors[k];
			rc = pk_cuda_ipc_decode(b, len, &w, err, sizeof(err));
			CHECK(rc == 0 || rc == -EPROTO || rc == -E2BIG || rc == -EPERM ||
			      rc == -EOPNOTSUPP);
			if (rc == 0) {
				CHECK(w.ndim >= 1 && w.ndim <= PK_MAX_DIMS);
				CHECK(strlen(w.device_uuid) <= PK_UUID_MAX);
				CHECK(strlen(w.dtype) <= PK_DTYPE_MAX);
			}
			free(b);
		}
	}
}

static void test_goldens(void)
{
	uint8_t *list;
	size_t list_len;
	char *save = NULL, *line;

	list = read_file("pickles.txt", &list_len);
	REQUIRE(list);
	list = realloc(list, list_len + 1);
	REQUIRE(list);
	list[list_len] = '\0';
	for (line = strtok_r((char *)list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *tok[20], *s2 = NULL;
		size_t ntok = 0, len = 0;
		uint8_t *pkl;

		if (line[0] == '#')
			continue;
		for (char *t = strtok_r(line, " ", &s2); t && ntok < 20; t = strtok_r(NULL, " ", &s2))
			tok[ntok++] = t;
		REQUIRE(ntok >= 5);
		pkl = read_file(tok[1], &len);
		if (!pkl) {
			t_failures++;
			continue;
		}
		if (!strcmp(tok[0], "ok")) {
			REQUIRE(ntok == 17);
			check_ok_line(tok, pkl, len);
			mutate(pkl, len);
		} else {
			check_err_line(tok, pkl, len);
		}
		free(pkl);
	}
	free(list);
	/* a golden set that shrank or lost its PyTorch files would pass vacuously */
	CHECK(n_ok >= 25);
	CHECK(n_err >= 25);
	CHECK(n_real >= 12);
	printf("goldens: %u decoded (%u from PyTorch 2.11), %u refused\n", n_ok, n_real, n_err);
}

/* ---- crafted input ------------------------------------------------------------------------- */

static void test_opcodes(void)
{
	/* minimal valid pickles of each supported shape of value */
	EXPECT_PARSE(0, "\x80\x04N.", NULL);
	EXPECT_PARSE(0, "\x80\x02\x88.", NULL);
	EXPECT_PARSE(0, "\x80\x05\x95\x03\x00\x00\x00\x00\x00\x00\x00K\x07.", NULL);
	EXPECT_PARSE(0, "\x80\x04(K\x01K\x02\x8a\x00t.", NULL);
	EXPECT_PARSE(0, "\x80\x04}(\x8c\x01" "aK\x01\x8c\x01" "bK\x02u.", NULL);
	EXPECT_PARSE(0, "\x80\x02]q\x00(K\x01K\x02" "eh\x00\x86.", NULL);	/* memo alias */
	EXPECT_PARSE(0, "\x80\x04(N\x88\x89l.", NULL);
	EXPECT_PARSE(0, "\x80\x04(\x8c\x01" "aNd.", NULL);
	EXPECT_PARSE(0, "\x80\x02]q\x00h\x00" "a.", NULL);	/* a list holding itself */

	/* opcodes outside the subset */
	EXPECT_PARSE(-EPROTO, "\x80\x04P0\n.", "'P'");		/* PERSID */
	EXPECT_PARSE(-EPROTO, "\x80\x04G\x00\x00\x00\x00\x00\x00\x00\x00.", "'G'");
	EXPECT_PARSE(-EPROTO, "\x80\x04I1\n.", "'I'");
	EXPECT_PARSE(-EPROTO, "\x80\x04S'a'\n.", "'S'");
	EXPECT_PARSE(-EPROTO, "\x80\x05\x96\x00\x00\x00\x00\x00\x00\x00\x00.", "0x96");
	EXPECT_PARSE(-EPROTO, "\x80\x05\x97.", "0x97");	/* NEXT_BUFFER */
	EXPECT_PARSE(-EPROTO, "\x80\x04\xff.", "0xff");
	EXPECT_PARSE(-EPROTO, "\x80\x04N0.", "'0'");		/* POP */
	EXPECT_PARSE(-EPROTO, "\x80\x06N.", "protocol 6");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x92.", "0x92");	/* NEWOBJ_EX */

	/* stack and mark misuse */
	EXPECT_PARSE(-EPROTO, "\x80\x04R.", "underflow");
	EXPECT_PARSE(-EPROTO, "\x80\x04t.", "MARK");
	EXPECT_PARSE(-EPROTO, "\x80\x04N(\x85.", "underflow");	/* TUPLE1 across a MARK */
	EXPECT_PARSE(-EPROTO, "\x80\x04(K\x01" "e.", "APPENDS");
	EXPECT_PARSE(-EPROTO, "\x80\x04)(K\x01" "e.", "non-list");
	EXPECT_PARSE(-EPROTO, "\x80\x04}K\x01" "a.", "non-list");
	EXPECT_PARSE(-EPROTO, "\x80\x04]K\x01K\x02s.", "non-dict");
	EXPECT_PARSE(-EPROTO, "\x80\x04}(K\x01u.", "odd");
	EXPECT_PARSE(-EPROTO, "\x80\x04NN.", "2 values");
	EXPECT_PARSE(-EPROTO, "\x80\x04(N.", "MARK");
	EXPECT_PARSE(-EPROTO, "\x80\x04.", "0 values");
	EXPECT_PARSE(-EPROTO, "\x80\x04N.N", "trailing");
	EXPECT_PARSE(-EPROTO, "\x80\x04N", "STOP");
	EXPECT_PARSE(-EPROTO, "", "empty");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c\x01" "a\x8c\x01" "b}b.", "non-object");
	EXPECT_PARSE(-EPROTO, "\x80\x04K\x01\x8c\x01" "a\x93.", "two str");

	/* str must be strict UTF-8 */
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c\x02\xc0\x80.", "UTF-8");	/* overlong NUL */
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c\x03\xed\xa0\x80.", "UTF-8");	/* surrogate */
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c\x01\xc3.", "UTF-8");	/* cut sequence */
	EXPECT_PARSE(0, "\x80\x04\x8c\x04\xf0\x9f\x98\x80.", NULL);	/* U+1F600 */
}

static void test_lengths(void)
{
	/* lengths past the limits or past the input */
	EXPECT_PARSE(-E2BIG, "\x80\x04X\xff\xff\xff\xff.", "exceeds");
	EXPECT_PARSE(-E2BIG, "\x80\x04\x8e\x00\x00\x00\x00\x00\x00\x00\x80.", "exceeds");
	EXPECT_PARSE(-E2BIG, "\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xff.", "exceeds");
	EXPECT_PARSE(-E2BIG, "\x80\x04" "B\x01\x40\x00\x00.", "exceeds");	/* 16385 */
	EXPECT_PARSE(-EPROTO, "\x80\x04\x43\xc8" "abcde.", "truncated");	/* 200 promised */
	EXPECT_PARSE(-EPROTO, "\x80\x04X\x10\x00\x00\x00" "abc", "truncated");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7fN.", "FRAME");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x09.", "64 bits");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8a\xff\x01.", "64 bits");
	EXPECT_PARSE(-EPROTO, "\x80\x04J\x01\x02.", "truncated");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "cos\nsys", "unterminated");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "cos", "unterminated");
	{
		/* a GLOBAL line longer than any allowed name */
		char b[400];
		size_t n = 0;

		memcpy(b, "\x80\x02" "c", 3), n = 3;
		memset(b + n, 'a', 300), n += 300;
		memcpy(b + n, "\nb\n.", 4), n += 4;
		CHECK_EQ(parse_exact(b, n), -EPROTO);
	}
	{
		/* the whole input over PK_MAX_INPUT */
		size_t n = PK_MAX_INPUT + 1;
		uint8_t *b = calloc(1, n);

		REQUIRE(b);
		CHECK_EQ(parse_exact(b, n), -E2BIG);
		free(b);
	}
	/* LONG1 sign extension and widths */
	{
		struct pk_doc *d = NULL;
		static const uint8_t p1[] = "\x80\x04\x8a\x02\xff\x7f.";	/* 32767 */
		static const uint8_t p2[] = "\x80\x04\x8a\x01\xff.";		/* -1 */
		static const uint8_t p3[] = "\x80\x04\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80.";
		static const uint8_t p4[] = "\x80\x04J\xfe\xff\xff\xff.";	/* -2 */

		REQUIRE(pk_parse(p1, sizeof(p1) - 1, &d, err, sizeof(err)) == 0);
		CHECK_EQ(pk_root(d)->i, 32767);
		pk_free(d);
		REQUIRE(pk_parse(p2, sizeof(p2) - 1, &d, err, sizeof(err)) == 0);
		CHECK_EQ(pk_root(d)->i, -1);
		pk_free(d);
		REQUIRE(pk_parse(p3, sizeof(p3) - 1, &d, err, sizeof(err)) == 0);
		CHECK(pk_root(d)->i == INT64_MIN);
		pk_free(d);
		REQUIRE(pk_parse(p4, sizeof(p4) - 1, &d, err, sizeof(err)) == 0);
		CHECK_EQ(pk_root(d)->i, -2);
		pk_free(d);
	}
}

/* Repeat @unit @n times between @head and @tail into a heap buffer; parse it. */
static int parse_rep(const char *head, const char *unit, size_t n, const char *tail)
{
	size_t hl = strlen(head), ul = strlen(unit), tl = strlen(tail);
	size_t len = hl + ul * n + tl;
	uint8_t *b = malloc(len);
	int rc;

	REQUIRE(b);
	memcpy(b, head, hl);
	for (size_t i = 0; i < n; i++)
		memcpy(b + hl + i * ul, unit, ul);
	memcpy(b + hl + ul * n, tail, tl);
	rc = parse_exact(b, len);
	free(b);
	return rc;
}

static void test_limits(void)
{
	/* nesting: tuples of tuples, checked where they are built */
	CHECK_EQ(parse_rep("\x80\x04N", "\x85", PK_MAX_DEPTH, "."), 0);
	CHECK_EQ(parse_rep("\x80\x04N", "\x85", PK_MAX_DEPTH + 1, "."), -E2BIG);
	CHECK(strstr(err, "nested") != NULL);
	/* nesting built by appending lists into lists */
	CHECK_EQ(parse_rep("\x80\x04", "]", PK_MAX_DEPTH + 2,
			   "aaaaaaaaaaaaaaaaa."), -E2BIG);
	/* a list appended to itself, over and over */
	CHECK_EQ(parse_rep("\x80\x02]q\x01", "h\x01" "a", 40, "."), -E2BIG);
	/* MARKs */
	CHECK_EQ(parse_rep("\x80\x04", "(", PK_MAX_MARKS, "N"), -EPROTO);	/* no STOP */
	CHECK_EQ(parse_rep("\x80\x04", "(", PK_MAX_MARKS + 1, "N."), -E2BIG);
	CHECK(strstr(err, "MARK") != NULL);
	/* stack */
	CHECK_EQ(parse_rep("\x80\x04", "N", PK_MAX_STACK + 1, "."), -E2BIG);
	CHECK(strstr(err, "stack") != NULL);
	/* values and entries: a list grown one APPEND at a time */
	CHECK_EQ(parse_rep("\x80\x04]", "Na", PK_MAX_ITEMS + 10, "."), -E2BIG);
	CHECK_EQ(parse_rep("\x80\x04]", "Na", 1000, "."), 0);
	/* memo abuse */
	EXPECT_PARSE(-EPROTO, "\x80\x04h\x05.", "never set");
	EXPECT_PARSE(-EPROTO, "\x80\x04j\x00\x10\x00\x00.", "never set");
	EXPECT_PARSE(-EPROTO, "\x80\x04j\xff\xff\xff\xff.", "never set");
	EXPECT_PARSE(-E2BIG, "\x80\x04Nr\xff\xff\xff\xff.", "memo index");
	EXPECT_PARSE(-E2BIG, "\x80\x04Nr\x00\x04\x00\x00.", "memo index");	/* 1024 */
	EXPECT_PARSE(0, "\x80\x04Nr\xff\x03\x00\x00j\xff\x03\x00\x00\x86.", NULL);	/* 1023 */
	EXPECT_PARSE(-EPROTO, "\x80\x04\x94N.", "underflow");	/* MEMOIZE, empty stack */
	EXPECT_PARSE(-EPROTO, "\x80\x04N(\x94N.", "underflow");	/* MEMOIZE past a MARK */
	/* MEMOIZE numbers slots by how many are set, as CPython does */
	EXPECT_PARSE(0, "\x80\x04(Nq\x05\x88\x94h\x01h\x05t.", NULL);
	EXPECT_PARSE(-EPROTO, "\x80\x04Nq\x05\x88\x94h\x00.", "never set");
	/* the memo can hold at most PK_MAX_MEMO slots: MEMOIZE past it fails */
	CHECK_EQ(parse_rep("\x80\x04N", "\x94", PK_MAX_MEMO, "."), 0);
	CHECK_EQ(parse_rep("\x80\x04N", "\x94", PK_MAX_MEMO + 1, "."), -E2BIG);
	/* a tiny error buffer still gets a terminated prefix */
	{
		char small[8];
		struct pk_doc *d = NULL;
		static const uint8_t p[] = "\x80\x04R.";

		memset(small, 'x', sizeof(small));
		CHECK_EQ(pk_parse(p, sizeof(p) - 1, &d, small, sizeof(small)), -EPROTO);
		CHECK(memchr(small, '\0', sizeof(small)) != NULL);
		CHECK_EQ(pk_parse(p, sizeof(p) - 1, &d, NULL, 0), -EPROTO);
	}
}

static void test_globals(void)
{
	EXPECT_PARSE(-EPERM, "\x80\x02" "cos\nsystem\nX\x04\x00\x00\x00true\x85R.", "os.system");
	EXPECT_PARSE(-EPERM, "\x80\x04\x8c\x08" "builtins\x8c\x04" "eval\x93.", "builtins.eval");
	EXPECT_PARSE(-EPERM, "\x80\x02" "csubprocess\nPopen\n.", "subprocess.Popen");
	EXPECT_PARSE(-EPERM, "\x80\x02" "cposix\nsystem\n.", "posix.system");
	EXPECT_PARSE(-EPERM, "\x80\x02" "c__builtin__\neval\n.", "__builtin__.eval");
	EXPECT_PARSE(-EPERM, "\x80\x02" "ctorch\nload\n.", "torch.load");
	EXPECT_PARSE(-EPERM, "\x80\x02" "ctorch\nfloat64\n.", "torch.float64");
	EXPECT_PARSE(-EPERM, "\x80\x02" "ccopyreg\n_reconstructor\n.", "copyreg");
	/* names are compared whole: no prefix, suffix or NUL games */
	EXPECT_PARSE(-EPERM, "\x80\x04\x8c\x05torch\x8c\x05Size2\x93.", "not allowed");
	EXPECT_PARSE(-EPERM, "\x80\x04\x8c\x05torch\x8c\x03Siz\x93.", "not allowed");
	EXPECT_PARSE(-EPERM, "\x80\x04\x8c\x06torch\x00\x8c\x04Size\x93.", "not allowed");
	/* allowed names, but not callable that way */
	EXPECT_PARSE(-EPERM, "\x80\x02" "ctorch\nbfloat16\n)R.", "REDUCE");
	EXPECT_PARSE(-EPERM, "\x80\x02" "ctorch\nSize\n)\x81.", "NEWOBJ");
	EXPECT_PARSE(-EPERM, "\x80\x04K\x01)R.", "non-global");
	EXPECT_PARSE(-EPERM, "\x80\x02" "c__builtin__\nbytes\nK\x01\x85R.", "arguments");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "ctorch\nSize\nK\x01\x85R.", "tuple");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "ctorch\nSize\n\x8c\x01\x61\x85\x85R.", "non-int");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "ctorch\nSize\nK\x01R.", "not a tuple");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "c_codecs\nencode\nK\x01K\x02\x86R.", "(str, str)");
	EXPECT_PARSE(-EPROTO, "\x80\x02" "c_codecs\nencode\nX\x02\x00\x00\x00\xc4\x80X\x06\x00\x00"
		     "\x00latin1\x86R.", "U+00FF");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c$lmcache.v1.multiprocess.custom_types\x8c\x0e"
		     "CudaIPCWrapper\x93K\x01\x85\x81.", "arguments");
	/* BUILD: once, with a dict (None is a no-op) */
	EXPECT_PARSE(0, "\x80\x04\x8c$lmcache.v1.multiprocess.custom_types\x8c\x0e"
		     "CudaIPCWrapper\x93)\x81Nb.", NULL);
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c$lmcache.v1.multiprocess.custom_types\x8c\x0e"
		     "CudaIPCWrapper\x93)\x81}b}b.", "twice");
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c$lmcache.v1.multiprocess.custom_types\x8c\x0e"
		     "CudaIPCWrapper\x93)\x81]b.", "not a dict");

	/* protocol 2 bytes: _codecs.encode(str, "latin1") and bytes() */
	{
		static const uint8_t p[] = "\x80\x02" "c_codecs\nencode\nX\x05\x00\x00\x00\xc3\xbf\x00"
					   "\xc2\x80X\x06\x00\x00\x00latin1\x86R.";
		static const uint8_t q[] = "\x80\x02" "c__builtin__\nbytes\n)R.";
		struct pk_doc *d = NULL;

		REQUIRE(pk_parse(p, sizeof(p) - 1, &d, err, sizeof(err)) == 0);
		CHECK_EQ(pk_root(d)->kind, PK_BYTES);
		CHECK_EQ(pk_root(d)->len, 3);
		CHECK(!memcmp(pk_root(d)->data, "\xff\x00\x80", 3));
		pk_free(d);
		REQUIRE(pk_parse(q, sizeof(q) - 1, &d, err, sizeof(err)) == 0);
		CHECK(pk_root(d)->kind == PK_BYTES && pk_root(d)->len == 0);
		pk_free(d);
	}
	/* pk_dict_get: the last of repeated keys wins, as in a Python dict */
	{
		static const uint8_t p[] = "\x80\x04}(\x8c\x01kK\x01\x8c\x01kK\x02u.";
		struct pk_doc *d = NULL;

		REQUIRE(pk_parse(p, sizeof(p) - 1, &d, err, sizeof(err)) == 0);
		CHECK_EQ(pk_dict_get(pk_root(d), "k")->i, 2);
		CHECK(pk_dict_get(pk_root(d), "x") == NULL);
		CHECK(pk_dict_get(NULL, "k") == NULL);
		pk_free(d);
	}
}

/* ---- LMCache's wrappers since June 2026 ------------------------------------------------ */

/*
 * Byte-exact pickles of stand-ins: stdlib pickle.dumps(obj, protocol=N) of a
 * class with LMCache's name and module path and LMCache's __dict__ (its keys
 * and value types, in order; docs/pytorch-ipc.md §1, §8). Stand-ins of the
 * current CpuShmTensorWrapper and VmmCudaIPCWrapper give the same bytes as
 * LMCache's own (same state); the memory handle is 0x40..0x7f, the event
 * handle 0x00..0x3f.
 */

/* CudaIPCWrapper, platform.devices (Sept 2026 on), protocol 4; a view at element 4096 */
static const uint8_t cuda_devices_p4[] =
		"\x80\x04\x95\x9d\x01\x00\x00\x00\x00\x00\x00\x8c,lmcache.v1.platform.devic"
		"es.cuda.ipc_wrapper\x94\x8c\x0e" "CudaIPCWrapper\x94\x93\x94)\x81\x94}\x94"
		"(\x8c\x06handle\x94(K\x00" "CB\x02" "c@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`"
		"abcdefghijklmnopqrstuvwxyz{|}~\x7f\x94J\x00 @\x00J\x00\x00\xc0\x00" "C\x16"
		"/torch_501_791401491_0\x94K\x07" "C@\x00\x01\x02\x03\x04\x05\x06\x07\x08"
		"\x09\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a"
		"\x1b\x1c\x1d\x1e\x1f !\x22#$%&'()*+,-./0123456789:;<=>\x3f\x94\x88t\x94"
		"\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c\x08" "bfloat16\x94\x93\x94\x8c"
		"\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10"
		"\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offset\x94M\x00\x10\x8c"
		"\x0b" "device_uuid\x94\x8c$6f1c2a3b-0000-1111-2222-333344445555\x94ub.";
/* the same under platform.cuda (June to Sept 2026), protocol 5 (Python 3.14) */
static const uint8_t cuda_platform_p5[] =
		"\x80\x05\x95\x95\x01\x00\x00\x00\x00\x00\x00\x8c$lmcache.v1.platform.cuda."
		"ipc_wrapper\x94\x8c\x0e" "CudaIPCWrapper\x94\x93\x94)\x81\x94}\x94(\x8c"
		"\x06handle\x94(K\x00" "CB\x02" "c@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`abcde"
		"fghijklmnopqrstuvwxyz{|}~\x7f\x94J\x00 @\x00J\x00\x00\xc0\x00" "C\x16/torc"
		"h_501_791401491_0\x94K\x07" "C@\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09"
		"\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b"
		"\x1c\x1d\x1e\x1f !\x22#$%&'()*+,-./0123456789:;<=>\x3f\x94\x88t\x94\x8c"
		"\x05" "dtype\x94\x8c\x05torch\x94\x8c\x08" "bfloat16\x94\x93\x94\x8c\x05sh"
		"ape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M"
		"\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offset\x94M\x00\x10\x8c\x0b"
		"device_uuid\x94\x8c$6f1c2a3b-0000-1111-2222-333344445555\x94ub.";
/* RawCudaIPCWrapper, current form: _alloc_offset 3 * 2^31 (LONG1), _nbytes of the view */
static const uint8_t raw_long1_p4[] =
		"\x80\x04\x95x\x01\x00\x00\x00\x00\x00\x00\x8c,lmcache.v1.platform.devices."
		"cuda.ipc_wrapper\x94\x8c\x11RawCudaIPCWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x14_ipc_handle_reserved\x94" "C@@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`a"
		"bcdefghijklmnopqrstuvwxyz{|}~\x7f\x94\x8c\x0d_alloc_offset\x94\x8a\x05\x00"
		"\x00\x00\x80\x01\x8c\x07_nbytes\x94J\x00\x00@\x00\x8c\x06handle\x94N\x8c"
		"\x05" "dtype\x94\x8c\x05torch\x94\x8c\x08" "bfloat16\x94\x93\x94\x8c\x05sh"
		"ape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M"
		"\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offset\x94K\x00\x8c\x06_opens"
		"\x94K\x00\x8c\x0b" "device_uuid\x94\x8c$6f1c2a3b-0000-1111-2222-3333444455"
		"55\x94ub.";
/* the same form under platform.cuda, protocol 5, _alloc_offset 8192 (BININT2) */
static const uint8_t raw_platform_p5[] =
		"\x80\x05\x95l\x01\x00\x00\x00\x00\x00\x00\x8c$lmcache.v1.platform.cuda.ipc"
		"_wrapper\x94\x8c\x11RawCudaIPCWrapper\x94\x93\x94)\x81\x94}\x94(\x8c\x14_i"
		"pc_handle_reserved\x94" "C@@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`abcdefghijk"
		"lmnopqrstuvwxyz{|}~\x7f\x94\x8c\x0d_alloc_offset\x94M\x00 \x8c\x07_nbytes"
		"\x94J\x00\x00@\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94"
		"\x8c\x08" "bfloat16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t"
		"\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c"
		"\x0estorage_offset\x94K\x00\x8c\x06_opens\x94K\x00\x8c\x0b" "device_uuid"
		"\x94\x8c$6f1c2a3b-0000-1111-2222-333344445555\x94ub.";
/* protocol 2: GLOBAL, _codecs.encode bytes, _alloc_offset 2^31 (LONG1) */
static const uint8_t raw_long1_p2[] =
		"\x80\x02" "clmcache.v1.platform.devices.cuda.ipc_wrapper\x0aRawCudaIPCWrap"
		"per\x0aq\x00)\x81q\x01}q\x02(X\x14\x00\x00\x00_ipc_handle_reservedq\x03"
		"c_codecs\x0a" "encode\x0aq\x04X@\x00\x00\x00@ABCDEFGHIJKLMNOPQRSTUVWXYZ["
		"\x5c]^_`abcdefghijklmnopqrstuvwxyz{|}~\x7fq\x05X\x06\x00\x00\x00latin1q"
		"\x06\x86q\x07Rq\x08X\x0d\x00\x00\x00_alloc_offsetq\x09\x8a\x05\x00\x00\x00"
		"\x80\x00X\x07\x00\x00\x00_nbytesq\x0aJ\x00\x00@\x00X\x06\x00\x00\x00handle"
		"q\x0bNX\x05\x00\x00\x00" "dtypeq\x0c" "ctorch\x0a" "bfloat16\x0aq\x0dX\x05"
		"\x00\x00\x00shapeq\x0e(K\x02K@K\x10K\x08K\x80tq\x0fX\x06\x00\x00\x00stride"
		"q\x10(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01tq\x11X\x0e\x00\x00\x00sto"
		"rage_offsetq\x12K\x00X\x06\x00\x00\x00_opensq\x13K\x00X\x0b\x00\x00\x00"
		"device_uuidq\x14X$\x00\x00\x00" "6f1c2a3b-0000-1111-2222-333344445555q\x15"
		"ub.";
/* the March form (no _alloc_offset, no _opens) under platform.cuda (@776e1641) */
static const uint8_t raw_march_platform_p4[] =
		"\x80\x04\x95N\x01\x00\x00\x00\x00\x00\x00\x8c$lmcache.v1.platform.cuda.ipc"
		"_wrapper\x94\x8c\x11RawCudaIPCWrapper\x94\x93\x94)\x81\x94}\x94(\x8c\x14_i"
		"pc_handle_reserved\x94" "C@@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`abcdefghijk"
		"lmnopqrstuvwxyz{|}~\x7f\x94\x8c\x07_nbytes\x94J\x00\x00@\x00\x8c\x06handle"
		"\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c\x08" "bfloat16\x94\x93\x94"
		"\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00"
		"\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offset\x94K\x00\x8c"
		"\x0b" "device_uuid\x94\x8c$6f1c2a3b-0000-1111-2222-333344445555\x94ub.";
/* RawCudaIPCWrapper with _alloc_offset -4096 */
static const uint8_t raw_neg_alloc[] =
		"\x80\x04\x95v\x01\x00\x00\x00\x00\x00\x00\x8c,lmcache.v1.platform.devices."
		"cuda.ipc_wrapper\x94\x8c\x11RawCudaIPCWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x14_ipc_handle_reserved\x94" "C@@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`a"
		"bcdefghijklmnopqrstuvwxyz{|}~\x7f\x94\x8c\x0d_alloc_offset\x94J\x00\xf0"
		"\xff\xff\x8c\x07_nbytes\x94J\x00\x00@\x00\x8c\x06handle\x94N\x8c\x05" "dty"
		"pe\x94\x8c\x05torch\x94\x8c\x08" "bfloat16\x94\x93\x94\x8c\x05shape\x94(K"
		"\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00"
		"\x04K\x80K\x01t\x94\x8c\x0estorage_offset\x94K\x00\x8c\x06_opens\x94K\x00"
		"\x8c\x0b" "device_uuid\x94\x8c$6f1c2a3b-0000-1111-2222-333344445555\x94ub.";
/* RawCudaIPCWrapper with _alloc_offset "0" (only the fields up to it) */
static const uint8_t raw_str_alloc[] =
		"\x80\x04\x95\xbc\x00\x00\x00\x00\x00\x00\x00\x8c,lmcache.v1.platform.devic"
		"es.cuda.ipc_wrapper\x94\x8c\x11RawCudaIPCWrapper\x94\x93\x94)\x81\x94}\x94"
		"(\x8c\x14_ipc_handle_reserved\x94" "C@@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`"
		"abcdefghijklmnopqrstuvwxyz{|}~\x7f\x94\x8c\x0d_alloc_offset\x94\x8c\x01"
		"0\x94ub.";
/* CpuShmTensorWrapper, platform.devices, protocol 4 (254 bytes: an ext8 body) */
static const uint8_t cpushm_devices_p4[] =
		"\x80\x04\x95\xf3\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x13/lmcache_kv_12345_0\x94\x8c\x06nbytes\x94J\x00"
		"\x00\x80\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c"
		"\x07" "float16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94"
		"\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0e"
		"storage_offset\x94K\x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cpu\x94ub.";
/* platform.cpu, a view at element 2097152 of a 12 MiB segment */
static const uint8_t cpushm_offset_p4[] =
		"\x80\x04\x95\xed\x00\x00\x00\x00\x00\x00\x00\x8c\x1blmcache.v1.platform.cp"
		"u.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94(\x8c\x08"
		"shm_name\x94\x8c\x12/lmcache_kv_4242_7\x94\x8c\x06nbytes\x94J\x00\x00\xc0"
		"\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c\x07" "flo"
		"at16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06strid"
		"e\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offse"
		"t\x94J\x00\x00 \x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cpu\x94ub.";
/* the oldest: custom_types, "_nbytes", a name without the leading '/' */
static const uint8_t cpushm_custom_p4[] =
		"\x80\x04\x95\xf2\x00\x00\x00\x00\x00\x00\x00\x8c$lmcache.v1.multiprocess.c"
		"ustom_types\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x10lmcache_kv_777_3\x94\x8c\x07_nbytes\x94J\x00"
		"\x00@\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c\x07"
		"float16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06st"
		"ride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_of"
		"fset\x94K\x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cpu\x94ub.";
/* a longer name, protocol 5: 259 bytes, an ext16 body */
static const uint8_t cpushm_ext16_p5[] =
		"\x80\x05\x95\xf8\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x18/lmcache_kv_4194303_1023\x94\x8c\x06nbytes\x94"
		"J\x00\x00\x80\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94"
		"\x8c\x07" "float16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t"
		"\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c"
		"\x0estorage_offset\x94K\x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cpu\x94ub.";
/* the longest name accepted: 255 bytes with the '/' */
static const uint8_t cpushm_max[] =
		"\x80\x04\x95\xdf\x01\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\xff/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk\x94\x8c\x06n"
		"bytes\x94J\x00\x00\x80\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05t"
		"orch\x94\x8c\x07" "float16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K"
		"\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t"
		"\x94\x8c\x0estorage_offset\x94K\x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cp"
		"u\x94ub.";
/* bad CpuShmTensorWrappers: full state with one field wrong */
static const uint8_t cpushm_no_name[] =
		"\x80\x04\x95\xd2\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x06nbytes\x94J\x00\x00\x80\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94"
		"\x8c\x05torch\x94\x8c\x07" "float16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K"
		"\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K"
		"\x80K\x01t\x94\x8c\x0estorage_offset\x94K\x00\x8c\x0b" "device_uuid\x94"
		"\x8c\x03" "cpu\x94ub.";
static const uint8_t cpushm_slash[] =
		"\x80\x04\x95\xf3\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x13/lmcache/kv_12345_0\x94\x8c\x06nbytes\x94J\x00"
		"\x00\x80\x00\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c"
		"\x07" "float16\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94"
		"\x8c\x06stride\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0e"
		"storage_offset\x94K\x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cpu\x94ub.";
static const uint8_t cpushm_nbytes0[] =
		"\x80\x04\x95\xf0\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x13/lmcache_kv_12345_0\x94\x8c\x06nbytes\x94K\x00"
		"\x8c\x06handle\x94N\x8c\x05" "dtype\x94\x8c\x05torch\x94\x8c\x07" "float16"
		"\x94\x93\x94\x8c\x05shape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride"
		"\x94(J\x00\x00\x10\x00M\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offset"
		"\x94K\x00\x8c\x0b" "device_uuid\x94\x8c\x03" "cpu\x94ub.";
/* bad CpuShmTensorWrappers: only the fields up to the wrong one */
static const uint8_t shm_bytes_name[] =
		"\x80\x04\x95" "b\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94" "C\x02/x\x94\x8c\x06nbytes\x94K\x01ub.";
static const uint8_t shm_empty[] =
		"\x80\x04\x95`\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devices."
		"cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94(\x8c"
		"\x08shm_name\x94\x8c\x00\x94\x8c\x06nbytes\x94K\x00ub.";
static const uint8_t shm_long[] =
		"\x80\x04\x95" "c\x01\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94X\x00\x01\x00\x00/kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
		"\x94\x8c\x06nbytes\x94K\x01ub.";
static const uint8_t shm_nul[] =
		"\x80\x04\x95" "e\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x05/kv\x00" "0\x94\x8c\x06nbytes\x94K\x01ub.";
static const uint8_t shm_root[] =
		"\x80\x04\x95" "a\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x01/\x94\x8c\x06nbytes\x94K\x01ub.";
static const uint8_t shm_dot[] =
		"\x80\x04\x95" "a\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x01.\x94\x8c\x06nbytes\x94K\x01ub.";
static const uint8_t shm_dotdot[] =
		"\x80\x04\x95" "c\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x03/..\x94\x8c\x06nbytes\x94K\x01ub.";
static const uint8_t shm_no_nbytes[] =
		"\x80\x04\x95W\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devices."
		"cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94\x8c"
		"\x08shm_name\x94\x8c\x03/kv\x94sb.";
static const uint8_t shm_str_nbytes[] =
		"\x80\x04\x95" "e\x00\x00\x00\x00\x00\x00\x00\x8c#lmcache.v1.platform.devic"
		"es.cpu.shm\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x03/kv\x94\x8c\x06nbytes\x94\x8c\x01" "1\x94ub.";
static const uint8_t shm_old_nbytes0[] =
		"\x80\x04\x95" "d\x00\x00\x00\x00\x00\x00\x00\x8c$lmcache.v1.multiprocess.c"
		"ustom_types\x94\x8c\x13" "CpuShmTensorWrapper\x94\x93\x94)\x81\x94}\x94("
		"\x8c\x08shm_name\x94\x8c\x02kv\x94\x8c\x07_nbytes\x94K\x00ub.";
/* VmmCudaIPCWrapper (fabric): handle is _export_id again, a BINGET */
static const uint8_t vmm_p4[] =
		"\x80\x04\x95\xb1\x01\x00\x00\x00\x00\x00\x00\x8c,lmcache.v1.platform.devic"
		"es.cuda.ipc_wrapper\x94\x8c\x11VmmCudaIPCWrapper\x94\x93\x94)\x81\x94}\x94"
		"(\x8c\x0a_export_id\x94" "C\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
		"\x00\x00\x00\x00\x00\x00\x94\x8c\x05_kind\x94\x8c\x06" "fabric\x94\x8c\x0c"
		"_fabric_blob\x94" "C@\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
		"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
		"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
		"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x94\x8c\x03_f"
		"d\x94N\x8c\x0b_alloc_size\x94J\x00\x00 \x00\x8c\x0d_alloc_offset\x94K\x00"
		"\x8c\x07_nbytes\x94M\x00\x10\x8c\x06handle\x94h\x06\x8c\x05" "dtype\x94"
		"\x8c\x05torch\x94\x8c\x07" "float16\x94\x93\x94\x8c\x05shape\x94(K\x02K"
		"\x01K\x10K\x08K\x08t\x94\x8c\x06stride\x94(M\x00\x04M\x00\x04K@K\x08K\x01t"
		"\x94\x8c\x0estorage_offset\x94K\x00\x8c\x0b" "device_uuid\x94\x8c$6f1c2a3b"
		"-0000-1111-2222-333344445555\x94\x8c\x06_opens\x94K\x00ub.";
/* CudaIPCWrapper under a module path that is not LMCache's */
static const uint8_t evil_module_path[] =
		"\x80\x04\x95\x95\x01\x00\x00\x00\x00\x00\x00\x8c$lmcache.v1.platform.evil."
		"ipc_wrapper\x94\x8c\x0e" "CudaIPCWrapper\x94\x93\x94)\x81\x94}\x94(\x8c"
		"\x06handle\x94(K\x00" "CB\x02" "c@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\x5c]^_`abcde"
		"fghijklmnopqrstuvwxyz{|}~\x7f\x94J\x00 @\x00J\x00\x00\xc0\x00" "C\x16/torc"
		"h_501_791401491_0\x94K\x07" "C@\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09"
		"\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b"
		"\x1c\x1d\x1e\x1f !\x22#$%&'()*+,-./0123456789:;<=>\x3f\x94\x88t\x94\x8c"
		"\x05" "dtype\x94\x8c\x05torch\x94\x8c\x08" "bfloat16\x94\x93\x94\x8c\x05sh"
		"ape\x94(K\x02K@K\x10K\x08K\x80t\x94\x8c\x06stride\x94(J\x00\x00\x10\x00M"
		"\x00@M\x00\x04K\x80K\x01t\x94\x8c\x0estorage_offset\x94M\x00\x10\x8c\x0b"
		"device_uuid\x94\x8c$6f1c2a3b-0000-1111-2222-333344445555\x94ub.";

#define DECODE(v, w) decode_exact((v), sizeof(v) - 1, (w))

static void expect_decode(const uint8_t *p, size_t n, int rc, const char *word, int line)
{
	struct pk_cuda_ipc w;
	int got = decode_exact(p, n, &w);

	if (got != rc) {
		fprintf(stderr, "FAIL %s:%d: rc %d, expected %d (%s)\n", __FILE__, line, got, rc,
			err);
		t_failures++;
	}
	expect_word(word, line);
}

#define EXPECT_DECODE(rc, v, word) expect_decode((v), sizeof(v) - 1, (rc), (word), __LINE__)

static void check_shape(const struct pk_cuda_ipc *w, const char *dtype)
{
	static const int64_t shape[] = { 2, 64, 16, 8, 128 };
	static const int64_t stride[] = { 1048576, 16384, 1024, 128, 1 };

	CHECK(!strcmp(w->dtype, dtype));
	CHECK_EQ(w->ndim, 5);
	CHECK(w->has_stride);
	for (uint32_t i = 0; i < 5 && i < w->ndim; i++) {
		CHECK_EQ(w->shape[i], shape[i]);
		CHECK_EQ(w->stride[i], stride[i]);
	}
}

static bool is_handle(const uint8_t *h)	/* 0x40..0x7f, as the stand-ins send */
{
	for (int i = 0; i < 64; i++)
		if (h[i] != 0x40 + i)
			return false;
	return true;
}

/* STACK_GLOBAL of module.name, protocol 4; returns pk_parse()'s code. */
static int parse_global(const char *mod, const char *name)
{
	uint8_t b[256];
	size_t n = 0, ml = strlen(mod), nl = strlen(name);

	REQUIRE(ml < 200 && nl < 40);
	b[n++] = 0x80, b[n++] = 4;
	b[n++] = 0x8c, b[n++] = (uint8_t)ml;
	memcpy(b + n, mod, ml), n += ml;
	b[n++] = 0x8c, b[n++] = (uint8_t)nl;
	memcpy(b + n, name, nl), n += nl;
	b[n++] = 0x93, b[n++] = '.';
	return parse_exact(b, n);
}

static void test_wrapper_globals(void)
{
	static const char *const mods[] = {
		"lmcache.v1.multiprocess.custom_types",
		"lmcache.v1.platform.cuda.ipc_wrapper",
		"lmcache.v1.platform.devices.cuda.ipc_wrapper",
		"lmcache.v1.platform.cpu.shm",
		"lmcache.v1.platform.devices.cpu.shm",
		/* never allowed: a PR branch's layout, prefixes, suffixes, look-alikes */
		"lmcache.v1.platform.backends.cuda.ipc_wrapper",
		"lmcache.v1.platform.backends.cpu.shm",
		"lmcache.v1.platform.evil.ipc_wrapper",
		"lmcache.v1.platform.devices.cuda",
		"lmcache.v1.platform.devices.cuda.ipc_wrapper2",
		"lmcache.v1.platform.devices",
		"lmcache.v1.platform.cpu.shm.x",
		"lmcache.v1.platform.base.ipc_wrapper",
		"lmcache",
	};
	static const char *const classes[] = {
		"CudaIPCWrapper", "RawCudaIPCWrapper", "CpuShmTensorWrapper", "VmmCudaIPCWrapper",
		"DeviceIPCWrapper", "CudaIPCWrapperX", "cudaipcwrapper",
	};
	/* allowed[module][class] for the first five modules and four classes */
	static const bool allowed[5][4] = {
		{ true, true, true, false },
		{ true, true, false, false },
		{ true, true, false, true },
		{ false, false, true, false },
		{ false, false, true, false },
	};

	for (size_t m = 0; m < sizeof(mods) / sizeof(mods[0]); m++) {
		for (size_t c = 0; c < sizeof(classes) / sizeof(classes[0]); c++) {
			bool ok = m < 5 && c < 4 && allowed[m][c];
			int rc = parse_global(mods[m], classes[c]);

			if (rc != (ok ? 0 : -EPERM)) {
				fprintf(stderr, "FAIL %s.%s: rc %d (%s)\n", mods[m], classes[c],
					rc, err);
				t_failures++;
			}
		}
	}
	/* the whole pickle of an allowed class under a module that is not LMCache's */
	EXPECT_DECODE(-EPERM, evil_module_path,
		      "global lmcache.v1.platform.evil.ipc_wrapper.CudaIPCWrapper is not allowed");
	/* every wrapper class is NEWOBJ-able: NEWOBJ+BUILD makes an inert object */
	EXPECT_PARSE(0, "\x80\x04\x8c\x23lmcache.v1.platform.devices.cpu.shm\x8c\x13"
		     "CpuShmTensorWrapper\x93)\x81}b.", NULL);
	EXPECT_PARSE(0, "\x80\x04\x8c\x2clmcache.v1.platform.devices.cuda.ipc_wrapper\x8c\x11"
		     "VmmCudaIPCWrapper\x93)\x81}b.", NULL);
	EXPECT_PARSE(-EPROTO, "\x80\x04\x8c\x24lmcache.v1.platform.cuda.ipc_wrapper\x8c\x11"
		     "RawCudaIPCWrapper\x93K\x01\x85\x81.", "arguments");
}

static void test_cuda_paths(void)
{
	const struct { const uint8_t *p; size_t n; } v[] = {
		{ cuda_devices_p4, sizeof(cuda_devices_p4) - 1 },
		{ cuda_platform_p5, sizeof(cuda_platform_p5) - 1 },
	};

	for (size_t i = 0; i < 2; i++) {
		struct pk_cuda_ipc w;
		struct proto_request r;
		int rc = decode_exact(v[i].p, v[i].n, &w);

		CHECK_EQ(rc, 0);
		CHECK_EQ(w.kind, PK_WRAPPER_CUDA_IPC);
		CHECK_EQ(w.device, 0);
		CHECK_EQ(w.handle_version, 2);
		CHECK(is_handle(w.mem_handle));
		CHECK_EQ(w.storage_size_bytes, 4202496);
		CHECK_EQ(w.storage_offset_bytes, 12582912);
		CHECK_EQ(w.storage_offset, 4096);
		CHECK(!strcmp(w.ref_counter, "/torch_501_791401491_0"));
		CHECK_EQ(w.ref_counter_offset, 7);
		CHECK(w.event_sync_required && w.event_handle[63] == 63);
		CHECK(!w.has_alloc_offset && w.alloc_offset == 0 && w.shm_name[0] == '\0');
		check_shape(&w, "bfloat16");
		CHECK(!strcmp(w.device_uuid, "6f1c2a3b-0000-1111-2222-333344445555"));
		/* into the same descriptor as before the move (pytorch-ipc.md §5) */
		rc = register_ext1(v[i].p, v[i].n, 1, &r);
		CHECK_EQ(rc, 0);
		if (rc == 0) {
			CHECK_EQ(r.layers[0].offset, 12582912 + 4096 * 2);
			CHECK_EQ(r.layers[0].nbytes, 12582912 + 4202496);
			proto_request_free(&r);
		}
		mutate(v[i].p, v[i].n);
	}
}

static void test_raw_alloc_offset(void)
{
	struct pk_cuda_ipc w;

	CHECK_EQ(DECODE(raw_long1_p4, &w), 0);
	CHECK_EQ(w.kind, PK_WRAPPER_RAW_CUDA_IPC);
	CHECK_EQ(w.device, -1);
	CHECK_EQ(w.handle_version, 0);
	CHECK(is_handle(w.mem_handle));
	CHECK(w.has_alloc_offset);
	CHECK_EQ(w.alloc_offset, 6442450944ull);
	CHECK_EQ(w.storage_size_bytes, 4194304);
	CHECK_EQ(w.storage_offset_bytes, 0);
	CHECK_EQ(w.storage_offset, 0);
	check_shape(&w, "bfloat16");
	CHECK(!strcmp(w.device_uuid, "6f1c2a3b-0000-1111-2222-333344445555"));
	mutate(raw_long1_p4, sizeof(raw_long1_p4) - 1);

	CHECK_EQ(DECODE(raw_platform_p5, &w), 0);
	CHECK(w.kind == PK_WRAPPER_RAW_CUDA_IPC && w.has_alloc_offset && w.alloc_offset == 8192);
	CHECK_EQ(w.storage_size_bytes, 4194304);
	CHECK(is_handle(w.mem_handle));

	CHECK_EQ(DECODE(raw_long1_p2, &w), 0);
	CHECK(w.kind == PK_WRAPPER_RAW_CUDA_IPC && w.has_alloc_offset);
	CHECK_EQ(w.alloc_offset, 2147483648ull);
	CHECK(is_handle(w.mem_handle));
	check_shape(&w, "bfloat16");
	mutate(raw_long1_p2, sizeof(raw_long1_p2) - 1);

	/* the March form: no _alloc_offset, as before */
	CHECK_EQ(DECODE(raw_march_platform_p4, &w), 0);
	CHECK(w.kind == PK_WRAPPER_RAW_CUDA_IPC && !w.has_alloc_offset && w.alloc_offset == 0);
	CHECK_EQ(w.storage_size_bytes, 4194304);
	CHECK_EQ(w.storage_offset, 0);
	CHECK(is_handle(w.mem_handle));

	EXPECT_DECODE(-EPROTO, raw_neg_alloc, "_alloc_offset: -4096 out of range");
	EXPECT_DECODE(-EPROTO, raw_str_alloc, "_alloc_offset: expected int, got str");
}

static void test_cpu_shm(void)
{
	struct pk_cuda_ipc w;
	static const uint8_t zero[64];

	CHECK_EQ(DECODE(cpushm_devices_p4, &w), 0);
	CHECK_EQ(w.kind, PK_WRAPPER_CPU_SHM);
	CHECK(!strcmp(w.shm_name, "/lmcache_kv_12345_0"));
	CHECK_EQ(w.storage_size_bytes, 8388608);
	CHECK_EQ(w.storage_offset, 0);
	CHECK_EQ(w.storage_offset_bytes, 0);
	CHECK_EQ(w.device, -1);
	CHECK(!w.has_alloc_offset && !memcmp(w.mem_handle, zero, 64));
	check_shape(&w, "float16");
	CHECK(!strcmp(w.device_uuid, "cpu"));
	mutate(cpushm_devices_p4, sizeof(cpushm_devices_p4) - 1);

	CHECK_EQ(DECODE(cpushm_offset_p4, &w), 0);
	CHECK(w.kind == PK_WRAPPER_CPU_SHM && !strcmp(w.shm_name, "/lmcache_kv_4242_7"));
	CHECK_EQ(w.storage_size_bytes, 12582912);
	CHECK_EQ(w.storage_offset, 2097152);
	check_shape(&w, "float16");

	CHECK_EQ(DECODE(cpushm_custom_p4, &w), 0);
	CHECK(w.kind == PK_WRAPPER_CPU_SHM && !strcmp(w.shm_name, "lmcache_kv_777_3"));
	CHECK_EQ(w.storage_size_bytes, 4194304);	/* from _nbytes */

	CHECK(sizeof(cpushm_ext16_p5) - 1 >= 256);
	CHECK_EQ(DECODE(cpushm_ext16_p5, &w), 0);
	CHECK(w.kind == PK_WRAPPER_CPU_SHM && !strcmp(w.shm_name, "/lmcache_kv_4194303_1023"));
	CHECK_EQ(w.storage_size_bytes, 8388608);
	mutate(cpushm_ext16_p5, sizeof(cpushm_ext16_p5) - 1);

	CHECK_EQ(DECODE(cpushm_max, &w), 0);
	CHECK_EQ(strlen(w.shm_name), PK_SHM_NAME_MAX);

	EXPECT_DECODE(-EPROTO, cpushm_no_name, "missing shm_name");
	EXPECT_DECODE(-EPROTO, cpushm_slash, "'/lmcache/kv_12345_0': a '/' after the first");
	EXPECT_DECODE(-EPROTO, cpushm_nbytes0, "nbytes: 0 out of range");
	EXPECT_DECODE(-EPROTO, shm_bytes_name, "shm_name: expected str, got bytes");
	EXPECT_DECODE(-EOPNOTSUPP, shm_empty, "empty tensor");
	EXPECT_DECODE(-EPROTO, shm_long, "shm_name: 256 bytes, limit 255");
	EXPECT_DECODE(-EPROTO, shm_nul, "NUL");
	EXPECT_DECODE(-EPROTO, shm_root, "'/' is not a POSIX shm name");
	EXPECT_DECODE(-EPROTO, shm_dot, "'.' is not a POSIX shm name");
	EXPECT_DECODE(-EPROTO, shm_dotdot, "'/..' is not a POSIX shm name");
	EXPECT_DECODE(-EPROTO, shm_no_nbytes, "missing nbytes");
	EXPECT_DECODE(-EPROTO, shm_str_nbytes, "nbytes: expected int, got str");
	EXPECT_DECODE(-EPROTO, shm_old_nbytes0, "_nbytes: 0 out of range");
}

static void test_vmm_refused(void)
{
	static const char *const why = "VmmCudaIPCWrapper (lmcache.mp.use_vmm_api) is not "
		"supported by kvstash: register with the default CudaIPCWrapper or isolated_ipc's "
		"RawCudaIPCWrapper";
	struct pk_cuda_ipc w;
	struct proto_request r;
	int rc;

	/* the pickle itself is fine (BINGET of the memoized _export_id included) */
	CHECK_EQ(parse_exact(vmm_p4, sizeof(vmm_p4) - 1), 0);
	memset(&w, 0xff, sizeof(w));
	CHECK_EQ(DECODE(vmm_p4, &w), -EOPNOTSUPP);
	CHECK(!strcmp(err, why));
	CHECK(w.kind == 0 && w.ndim == 0 && w.shm_name[0] == '\0');	/* cleared */
	/* refused before its state is looked at */
	EXPECT_PARSE(0, "\x80\x04\x8c\x2clmcache.v1.platform.devices.cuda.ipc_wrapper\x8c\x11"
		     "VmmCudaIPCWrapper\x93)\x81.", NULL);
	{
		static const uint8_t p[] = "\x80\x04\x8c\x2clmcache.v1.platform.devices.cuda."
					   "ipc_wrapper\x8c\x11VmmCudaIPCWrapper\x93)\x81.";

		EXPECT_DECODE(-EOPNOTSUPP, p, "VmmCudaIPCWrapper");
	}
	/* and REGISTER_KV_CACHE passes the reason on */
	rc = register_ext1(vmm_p4, sizeof(vmm_p4) - 1, 1, &r);
	CHECK(rc != 0);
	if (rc == 0)
		proto_request_free(&r);
	else
		CHECK(strstr(err, "VmmCudaIPCWrapper (lmcache.mp.use_vmm_api)") != NULL);
	mutate(vmm_p4, sizeof(vmm_p4) - 1);
}

int main(void)
{
	test_goldens();
	test_opcodes();
	test_lengths();
	test_limits();
	test_globals();
	test_wrapper_globals();
	test_cuda_paths();
	test_raw_alloc_offset();
	test_cpu_shm();
	test_vmm_refused();
	return t_result("pickle");
}
