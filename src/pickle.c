/*
 * pickle.c - a restricted pickle reader and the decoder of LMCache's KV-cache
 * wrappers (pickle.h; the format is in docs/pytorch-ipc.md).
 *
 * The reader is a stack machine like CPython's Lib/pickle.py _Unpickler, cut
 * down to the opcodes that pickle.dumps() emits for the wrapper with
 * protocols 2 to 5, and to data: a GLOBAL resolves to an entry of
 * pk_globals[] or fails, and nothing a pickle names is ever called. Values
 * live in one arena per document (chunks of PK_CHUNK bytes, PK_MAX_ARENA in
 * all), freed at once by pk_free(), so no path frees a value by walking the
 * tree: a pickle may alias or even nest a list inside itself through the memo
 * without any code here recursing over it.
 */
#include "pickle.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compiler.h"
#include "errbuf.h"

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */
/* ------------------------------------------------------------------------ */

/* Reasons go into a struct ks_errbuf with ks_err() (errbuf.h). */

/* Untrusted text in a message: at most 40 bytes, non-printable bytes as '?'. */
static const char *pk_quote(const uint8_t *p, size_t n, char out[48])
{
	size_t i, k = KS_MIN(n, (size_t)40);

	for (i = 0; i < k; i++)
		out[i] = (p[i] >= 0x20 && p[i] < 0x7f) ? (char)p[i] : '?';
	if (n > k) {
		memcpy(out + k, "...", 3);
		k += 3;
	}
	out[k] = '\0';
	return out;
}

/* ------------------------------------------------------------------------ */
/* Arena                                                                    */
/* ------------------------------------------------------------------------ */

#define PK_CHUNK (16u * 1024)

struct pk_chunk {
	struct pk_chunk *next;
	size_t used, size;
	unsigned char mem[];	/* at offset 24: 8-aligned, all a value needs */
};

struct pk_doc {
	struct pk_chunk *chunks;	/* owns; newest first */
	size_t arena_bytes;		/* sum of chunk sizes, <= PK_MAX_ARENA */
	uint32_t nvalues;
	const struct pk_value *root;
};

/* @n bytes, 8-aligned, zeroed. -E2BIG past PK_MAX_ARENA, -ENOMEM. */
static int pk_alloc(struct pk_doc *d, size_t n, void **out)
{
	struct pk_chunk *c = d->chunks;
	size_t want;

	n = ks_align_up(n ? n : 1, 8);
	if (!c || c->size - c->used < n) {
		want = KS_MAX((size_t)PK_CHUNK, n);
		if (want > PK_MAX_ARENA || d->arena_bytes > PK_MAX_ARENA - want)
			return -E2BIG;
		c = malloc(sizeof(*c) + want);
		if (!c)
			return -ENOMEM;
		c->size = want;
		c->used = 0;
		c->next = d->chunks;
		d->chunks = c;
		d->arena_bytes += want;
	}
	*out = c->mem + c->used;
	c->used += n;
	memset(*out, 0, n);
	return 0;
}

void pk_free(struct pk_doc *d)
{
	if (!d)
		return;
	while (d->chunks) {
		struct pk_chunk *next = d->chunks->next;

		free(d->chunks);
		d->chunks = next;
	}
	free(d);
}

const struct pk_value *pk_root(const struct pk_doc *d)
{
	return d ? d->root : NULL;
}

/* ------------------------------------------------------------------------ */
/* Allow-list                                                               */
/* ------------------------------------------------------------------------ */

/*
 * Every name a pickle may refer to, compared whole. pickle writes a class's
 * defining module, and LMCache has moved its wrappers twice
 * (docs/pytorch-ipc.md §1): custom_types until June 2026, platform.cuda /
 * platform.cpu until September, platform.devices since. VmmCudaIPCWrapper is
 * listed only so that its pickle parses and pk_cuda_ipc_decode() can refuse
 * it with a reason. The dtypes are the KV dtypes kvstash moves (protocol.md
 * §5.2); torch pickles a dtype as the global torch.<name>
 * (torch.dtype.__reduce__ returns its name). __builtin__ is protocol 2's
 * spelling of builtins (pickle's fix_imports).
 */
#define PK_MOD_CUSTOM_TYPES "lmcache.v1.multiprocess.custom_types"
#define PK_MOD_CUDA_IPC "lmcache.v1.platform.cuda.ipc_wrapper"
#define PK_MOD_DEV_CUDA_IPC "lmcache.v1.platform.devices.cuda.ipc_wrapper"
#define PK_MOD_CPU_SHM "lmcache.v1.platform.cpu.shm"
#define PK_MOD_DEV_CPU_SHM "lmcache.v1.platform.devices.cpu.shm"
#define PK_CLASS(mod, name, g) { mod, #name, mod "." #name, g }
static const struct pk_global_def {
	const char *module, *name, *full;
	enum pk_global global;
} pk_globals[] = {
	PK_CLASS(PK_MOD_CUSTOM_TYPES, CudaIPCWrapper, PK_G_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_CUSTOM_TYPES, RawCudaIPCWrapper, PK_G_RAW_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_CUSTOM_TYPES, CpuShmTensorWrapper, PK_G_CPU_SHM_TENSOR_WRAPPER),
	PK_CLASS(PK_MOD_CUDA_IPC, CudaIPCWrapper, PK_G_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_CUDA_IPC, RawCudaIPCWrapper, PK_G_RAW_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_DEV_CUDA_IPC, CudaIPCWrapper, PK_G_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_DEV_CUDA_IPC, RawCudaIPCWrapper, PK_G_RAW_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_DEV_CUDA_IPC, VmmCudaIPCWrapper, PK_G_VMM_CUDA_IPC_WRAPPER),
	PK_CLASS(PK_MOD_CPU_SHM, CpuShmTensorWrapper, PK_G_CPU_SHM_TENSOR_WRAPPER),
	PK_CLASS(PK_MOD_DEV_CPU_SHM, CpuShmTensorWrapper, PK_G_CPU_SHM_TENSOR_WRAPPER),
	{ "torch", "Size", "torch.Size", PK_G_TORCH_SIZE },
	{ "torch", "float16", "torch.float16", PK_G_TORCH_DTYPE },
	{ "torch", "bfloat16", "torch.bfloat16", PK_G_TORCH_DTYPE },
	{ "torch", "float32", "torch.float32", PK_G_TORCH_DTYPE },
	{ "torch", "float8_e4m3fn", "torch.float8_e4m3fn", PK_G_TORCH_DTYPE },
	{ "torch", "float8_e5m2", "torch.float8_e5m2", PK_G_TORCH_DTYPE },
	{ "torch", "uint8", "torch.uint8", PK_G_TORCH_DTYPE },
	{ "torch", "int8", "torch.int8", PK_G_TORCH_DTYPE },
	{ "_codecs", "encode", "_codecs.encode", PK_G_CODECS_ENCODE },
	{ "builtins", "bytes", "builtins.bytes", PK_G_BYTES },
	{ "__builtin__", "bytes", "__builtin__.bytes", PK_G_BYTES },
};

static bool mem_is(const uint8_t *p, size_t n, const char *s)
{
	return strlen(s) == n && (n == 0 || !memcmp(p, s, n));
}

static const struct pk_global_def *pk_global_find(const uint8_t *mod, size_t mod_len,
						  const uint8_t *name, size_t name_len)
{
	for (size_t i = 0; i < KS_ARRAY_SIZE(pk_globals); i++)
		if (mem_is(mod, mod_len, pk_globals[i].module) &&
		    mem_is(name, name_len, pk_globals[i].name))
			return &pk_globals[i];
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Unpickler                                                                */
/* ------------------------------------------------------------------------ */

struct pk_state {
	struct pk_doc *doc;
	const uint8_t *p;
	size_t len, off;
	size_t op_off;		/* offset of the opcode being run, for messages */
	struct ks_errbuf *e;
	struct pk_value *stack[PK_MAX_STACK];
	uint32_t sp;
	uint32_t marks[PK_MAX_MARKS];	/* stack heights at each MARK */
	uint32_t nmarks;
	struct pk_value *memo[PK_MAX_MEMO];
	uint32_t memo_count;	/* distinct slots set: MEMOIZE's next index */
};

/* Fail with "pickle offset N: reason", N the offset of the current opcode. */
static int KS_PRINTF(3, 4) pk_fail(struct pk_state *s, int rc, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return ks_err(s->e, rc, "pickle offset %zu: %s", s->op_off, msg);
}

static int need(struct pk_state *s, size_t n)
{
	if (s->len - s->off < n)
		return pk_fail(s, -EPROTO, "truncated (%zu bytes, %zu more needed)", s->len,
			       n - (s->len - s->off));
	return 0;
}

/* Little-endian unsigned of @n bytes (n <= 8). */
static int read_le(struct pk_state *s, unsigned n, uint64_t *v)
{
	int rc = need(s, n);

	if (rc)
		return rc;
	*v = 0;
	for (unsigned i = 0; i < n; i++)
		*v |= (uint64_t)s->p[s->off + i] << (8 * i);
	s->off += n;
	return 0;
}

static int new_value(struct pk_state *s, enum pk_kind kind, struct pk_value **out)
{
	void *m;
	int rc;

	if (s->doc->nvalues >= PK_MAX_VALUES)
		return pk_fail(s, -E2BIG, "more than %u values", PK_MAX_VALUES);
	rc = pk_alloc(s->doc, sizeof(struct pk_value), &m);
	if (rc)
		return pk_fail(s, rc, "%s", rc == -E2BIG ? "decoder memory limit reached" :
						       "out of memory");
	s->doc->nvalues++;
	*out = m;
	(*out)->kind = kind;
	return 0;
}

static int push(struct pk_state *s, struct pk_value *v)
{
	if (s->sp >= PK_MAX_STACK)
		return pk_fail(s, -E2BIG, "stack deeper than %u", PK_MAX_STACK);
	s->stack[s->sp++] = v;
	return 0;
}

/* The floor of the stack for plain pops: values above the innermost MARK. */
static uint32_t stack_floor(const struct pk_state *s)
{
	return s->nmarks ? s->marks[s->nmarks - 1] : 0;
}

static int pop(struct pk_state *s, struct pk_value **v)
{
	if (s->sp <= stack_floor(s))
		return pk_fail(s, -EPROTO, "stack underflow");
	*v = s->stack[--s->sp];
	return 0;
}

static int top(struct pk_state *s, struct pk_value **v)
{
	if (s->sp <= stack_floor(s))
		return pk_fail(s, -EPROTO, "stack underflow");
	*v = s->stack[s->sp - 1];
	return 0;
}

/* Pop to the innermost MARK: values at stack[*first, sp) become the caller's. */
static int pop_mark(struct pk_state *s, uint32_t *first)
{
	if (!s->nmarks)
		return pk_fail(s, -EPROTO, "no MARK to pop to");
	*first = s->marks[--s->nmarks];
	return 0;
}

static int set_depth(struct pk_state *s, struct pk_value *c, const struct pk_value *child)
{
	if (child->depth + 1 > c->depth)
		c->depth = child->depth + 1;
	if (c->depth > PK_MAX_DEPTH)
		return pk_fail(s, -E2BIG, "containers nested deeper than %u", PK_MAX_DEPTH);
	return 0;
}

/* Append @n values to container @c (items grow by doubling inside the arena). */
static int add_items(struct pk_state *s, struct pk_value *c, struct pk_value *const *v, uint32_t n)
{
	uint32_t slots = c->kind == PK_DICT ? 2 : 1;	/* per entry */
	uint32_t have = c->n * slots;
	int rc;

	if (c->kind == PK_DICT && n % 2)
		return pk_fail(s, -EPROTO, "odd number of values for a dict");
	if (n / slots > PK_MAX_ITEMS - c->n)
		return pk_fail(s, -E2BIG, "container of more than %u entries", PK_MAX_ITEMS);
	if (have + n > c->cap) {
		uint32_t cap = KS_MAX(c->cap * 2, 4u);
		void *m;

		while (cap < have + n)
			cap *= 2;
		rc = pk_alloc(s->doc, (size_t)cap * sizeof(*c->items), &m);
		if (rc)
			return pk_fail(s, rc, "%s", rc == -E2BIG ? "decoder memory limit reached" :
								   "out of memory");
		if (have)
			memcpy(m, c->items, have * sizeof(*c->items));
		c->items = m;
		c->cap = cap;
	}
	for (uint32_t i = 0; i < n; i++) {
		rc = set_depth(s, c, v[i]);
		if (rc)
			return rc;
		c->items[have + i] = v[i];
	}
	c->n += n / slots;
	return 0;
}

/* A new tuple (or list/dict) of the values stack[first, sp), popped. */
static int build_from_stack(struct pk_state *s, enum pk_kind kind, uint32_t first)
{
	struct pk_value *c = NULL;
	int rc = new_value(s, kind, &c);

	if (rc)
		return rc;
	rc = add_items(s, c, &s->stack[first], s->sp - first);
	if (rc)
		return rc;
	s->sp = first;
	return push(s, c);
}

/* The last @n values (above the innermost MARK) as a tuple. */
static int tuple_n(struct pk_state *s, uint32_t n)
{
	if (s->sp - stack_floor(s) < n)
		return pk_fail(s, -EPROTO, "stack underflow");
	return build_from_stack(s, PK_TUPLE, s->sp - n);
}

/*
 * Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as
 * Python's decoder requires for BINUNICODE.
 */
static bool utf8_valid(const uint8_t *p, size_t n)
{
	size_t i = 0;

	while (i < n) {
		uint8_t c = p[i];
		uint32_t cp;
		size_t k;

		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xe0) == 0xc0) {
			k = 1, cp = c & 0x1f;
		} else if ((c & 0xf0) == 0xe0) {
			k = 2, cp = c & 0x0f;
		} else if ((c & 0xf8) == 0xf0) {
			k = 3, cp = c & 0x07;
		} else {
			return false;
		}
		if (n - i - 1 < k)
			return false;
		for (size_t j = 1; j <= k; j++) {
			if ((p[i + j] & 0xc0) != 0x80)
				return false;
			cp = (cp << 6) | (p[i + j] & 0x3f);
		}
		if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
		    cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += k + 1;
	}
	return true;
}

/* A str or bytes of @n bytes at the read position. */
static int read_blob(struct pk_state *s, enum pk_kind kind, uint64_t n)
{
	struct pk_value *v = NULL;
	int rc;

	if (n > PK_MAX_BYTES)
		return pk_fail(s, -E2BIG, "%s of %llu bytes exceeds the limit of %u",
			       kind == PK_STR ? "str" : "bytes", (unsigned long long)n,
			       PK_MAX_BYTES);
	rc = need(s, (size_t)n);
	if (rc)
		return rc;
	if (kind == PK_STR && !utf8_valid(s->p + s->off, (size_t)n))
		return pk_fail(s, -EPROTO, "str is not valid UTF-8");
	rc = new_value(s, kind, &v);
	if (rc)
		return rc;
	v->data = s->p + s->off;
	v->len = (size_t)n;
	s->off += (size_t)n;
	return push(s, v);
}

static int push_int(struct pk_state *s, enum pk_kind kind, int64_t i)
{
	struct pk_value *v = NULL;
	int rc = new_value(s, kind, &v);

	if (rc)
		return rc;
	v->i = i;
	return push(s, v);
}

/* LONG1: @n bytes of little-endian two's complement; at most 64 bits here. */
static int read_long(struct pk_state *s, uint64_t n)
{
	uint64_t u = 0;
	int rc;

	if (n > 8)
		return pk_fail(s, -EPROTO, "integer of %llu bytes is wider than 64 bits",
			       (unsigned long long)n);
	rc = read_le(s, (unsigned)n, &u);
	if (rc)
		return rc;
	if (n && n < 8 && (u >> (8 * n - 1)) & 1)
		u |= ~0ull << (8 * n);	/* sign-extend */
	return push_int(s, PK_INT, (int64_t)u);
}

static int push_global(struct pk_state *s, const uint8_t *mod, size_t mod_len,
		       const uint8_t *name, size_t name_len)
{
	const struct pk_global_def *g = pk_global_find(mod, mod_len, name, name_len);
	struct pk_value *v = NULL;
	char q1[48], q2[48];
	int rc;

	if (!g)
		return pk_fail(s, -EPERM, "global %s.%s is not allowed",
			       pk_quote(mod, mod_len, q1), pk_quote(name, name_len, q2));
	rc = new_value(s, PK_GLOBAL, &v);
	if (rc)
		return rc;
	v->global = g->global;
	v->name = g->full;
	return push(s, v);
}

/* GLOBAL: "module\nname\n" in the opcode stream (protocols 0-3). */
static int op_global(struct pk_state *s)
{
	const uint8_t *mod = s->p + s->off, *name, *nl;
	size_t left = s->len - s->off, mod_len, name_len;

	nl = memchr(mod, '\n', KS_MIN(left, (size_t)256));
	if (!nl)
		return pk_fail(s, -EPROTO, "GLOBAL module name unterminated or too long");
	mod_len = (size_t)(nl - mod);
	name = nl + 1;
	left -= mod_len + 1;
	nl = memchr(name, '\n', KS_MIN(left, (size_t)256));
	if (!nl)
		return pk_fail(s, -EPROTO, "GLOBAL name unterminated or too long");
	name_len = (size_t)(nl - name);
	s->off += mod_len + 1 + name_len + 1;
	return push_global(s, mod, mod_len, name, name_len);
}

static int op_stack_global(struct pk_state *s)
{
	struct pk_value *mod = NULL, *name = NULL;
	int rc = pop(s, &name);

	if (!rc)
		rc = pop(s, &mod);
	if (rc)
		return rc;
	if (mod->kind != PK_STR || name->kind != PK_STR)
		return pk_fail(s, -EPROTO, "STACK_GLOBAL needs two str");
	return push_global(s, mod->data, mod->len, name->data, name->len);
}

/*
 * REDUCE (callable, args): only the data transforms in pickle.h. Protocol 2
 * pickles bytes b as _codecs.encode(b.decode("latin1"), "latin1") (b"" as
 * bytes()), and older LMCache kept a torch.Size, pickled as torch.Size(tuple).
 */
static int op_reduce(struct pk_state *s)
{
	struct pk_value *fn = NULL, *args = NULL, *v = NULL;
	int rc = pop(s, &args);

	if (!rc)
		rc = pop(s, &fn);
	if (rc)
		return rc;
	if (fn->kind != PK_GLOBAL)
		return pk_fail(s, -EPERM, "REDUCE of a non-global");
	if (args->kind != PK_TUPLE)
		return pk_fail(s, -EPROTO, "REDUCE arguments are not a tuple");
	switch (fn->global) {
	case PK_G_TORCH_SIZE:
		if (args->n != 1 || args->items[0]->kind != PK_TUPLE)
			return pk_fail(s, -EPROTO, "torch.Size() needs one tuple");
		for (uint32_t i = 0; i < args->items[0]->n; i++)
			if (args->items[0]->items[i]->kind != PK_INT)
				return pk_fail(s, -EPROTO, "torch.Size() of a non-int");
		return push(s, args->items[0]);	/* immutable: share it */
	case PK_G_BYTES:
		if (args->n != 0)
			return pk_fail(s, -EPERM, "bytes() with arguments");
		rc = new_value(s, PK_BYTES, &v);
		if (rc)
			return rc;
		v->data = (const uint8_t *)"";
		return push(s, v);
	case PK_G_CODECS_ENCODE: {
		const struct pk_value *str, *enc;
		uint8_t *out;
		size_t n = 0;
		void *m;

		if (args->n != 2 || args->items[0]->kind != PK_STR ||
		    args->items[1]->kind != PK_STR)
			return pk_fail(s, -EPROTO, "_codecs.encode() needs (str, str)");
		str = args->items[0];
		enc = args->items[1];
		if (!mem_is(enc->data, enc->len, "latin1") && !mem_is(enc->data, enc->len, "latin-1"))
			return pk_fail(s, -EPERM, "_codecs.encode() to an encoding other than latin1");
		rc = pk_alloc(s->doc, str->len, &m);
		if (rc)
			return pk_fail(s, rc, "%s", rc == -E2BIG ? "decoder memory limit reached" :
								   "out of memory");
		out = m;
		/* the str is valid UTF-8 (read_blob): U+0000..U+00FF take 1 or 2 bytes */
		for (size_t i = 0; i < str->len; n++) {
			uint8_t c = str->data[i];

			if (c < 0x80) {
				out[n] = c;
				i++;
			} else if (c == 0xc2 || c == 0xc3) {
				out[n] = (uint8_t)(((c & 0x03) << 6) | (str->data[i + 1] & 0x3f));
				i += 2;
			} else {
				return pk_fail(s, -EPROTO, "latin1 encode of a code point above U+00FF");
			}
		}
		rc = new_value(s, PK_BYTES, &v);
		if (rc)
			return rc;
		v->data = out;
		v->len = n;
		return push(s, v);
	}
	default:
		return pk_fail(s, -EPERM, "REDUCE of %s is not allowed", fn->name);
	}
}

static bool pk_global_is_wrapper(enum pk_global g)
{
	return g == PK_G_CUDA_IPC_WRAPPER || g == PK_G_RAW_CUDA_IPC_WRAPPER ||
	       g == PK_G_CPU_SHM_TENSOR_WRAPPER || g == PK_G_VMM_CUDA_IPC_WRAPPER;
}

/* NEWOBJ (cls, args): an empty object of an allow-listed class. */
static int op_newobj(struct pk_state *s)
{
	struct pk_value *cls = NULL, *args = NULL, *v = NULL;
	int rc = pop(s, &args);

	if (!rc)
		rc = pop(s, &cls);
	if (rc)
		return rc;
	if (cls->kind != PK_GLOBAL || !pk_global_is_wrapper(cls->global))
		return pk_fail(s, -EPERM, "NEWOBJ of %s is not allowed",
			       cls->kind == PK_GLOBAL ? cls->name : "a non-class");
	if (args->kind != PK_TUPLE || args->n != 0)
		return pk_fail(s, -EPROTO, "NEWOBJ of %s with arguments", cls->name);
	rc = new_value(s, PK_OBJECT, &v);
	if (rc)
		return rc;
	v->cls = cls;
	return push(s, v);
}

/* BUILD (obj, state): attach a state dict to an object, once. */
static int op_build(struct pk_state *s)
{
	struct pk_value *obj = NULL, *state = NULL;
	int rc = pop(s, &state);

	if (!rc)
		rc = top(s, &obj);
	if (rc)
		return rc;
	if (obj->kind != PK_OBJECT)
		return pk_fail(s, -EPROTO, "BUILD of a non-object");
	if (obj->state)
		return pk_fail(s, -EPROTO, "BUILD of an object twice");
	if (state->kind == PK_NONE)
		return 0;
	if (state->kind != PK_DICT)
		return pk_fail(s, -EPROTO, "BUILD state is not a dict");
	obj->state = state;
	return set_depth(s, obj, state);
}

static int memo_put(struct pk_state *s, uint64_t idx)
{
	struct pk_value *v = NULL;
	int rc = top(s, &v);

	if (rc)
		return rc;
	if (idx >= PK_MAX_MEMO)
		return pk_fail(s, -E2BIG, "memo index %llu exceeds the limit of %u",
			       (unsigned long long)idx, PK_MAX_MEMO - 1);
	if (!s->memo[idx])
		s->memo_count++;
	s->memo[idx] = v;
	return 0;
}

static int memo_get(struct pk_state *s, uint64_t idx)
{
	if (idx >= PK_MAX_MEMO || !s->memo[idx])
		return pk_fail(s, -EPROTO, "memo index %llu was never set",
			       (unsigned long long)idx);
	return push(s, s->memo[idx]);
}

/* Opcodes (CPython Lib/pickle.py names). */
enum {
	OP_MARK = '(', OP_STOP = '.', OP_BININT = 'J', OP_BININT1 = 'K', OP_BININT2 = 'M',
	OP_NONE = 'N', OP_REDUCE = 'R', OP_BINUNICODE = 'X', OP_APPEND = 'a', OP_BUILD = 'b',
	OP_GLOBAL = 'c', OP_DICT = 'd', OP_EMPTY_DICT = '}', OP_APPENDS = 'e', OP_BINGET = 'h',
	OP_LONG_BINGET = 'j', OP_LIST = 'l', OP_EMPTY_LIST = ']', OP_BINPUT = 'q',
	OP_LONG_BINPUT = 'r', OP_SETITEM = 's', OP_TUPLE = 't', OP_EMPTY_TUPLE = ')',
	OP_SETITEMS = 'u', OP_PROTO = 0x80, OP_NEWOBJ = 0x81, OP_TUPLE1 = 0x85,
	OP_TUPLE2 = 0x86, OP_TUPLE3 = 0x87, OP_NEWTRUE = 0x88, OP_NEWFALSE = 0x89,
	OP_LONG1 = 0x8a, OP_BINBYTES = 'B', OP_SHORT_BINBYTES = 'C',
	OP_SHORT_BINUNICODE = 0x8c, OP_BINUNICODE8 = 0x8d, OP_BINBYTES8 = 0x8e,
	OP_STACK_GLOBAL = 0x93, OP_MEMOIZE = 0x94, OP_FRAME = 0x95,
};

static int container_op(struct pk_state *s, uint8_t op)
{
	struct pk_value *c = NULL, *v[2];
	uint32_t first = 0;
	int rc;

	switch (op) {
	case OP_APPEND:
	case OP_SETITEM: {
		uint32_t n = op == OP_SETITEM ? 2 : 1;

		if (s->sp - stack_floor(s) < n + 1)
			return pk_fail(s, -EPROTO, "stack underflow");
		c = s->stack[s->sp - n - 1];
		if (c->kind != (op == OP_SETITEM ? PK_DICT : PK_LIST))
			return pk_fail(s, -EPROTO, "%s on a non-%s", op == OP_SETITEM ? "SETITEM" :
				       "APPEND", op == OP_SETITEM ? "dict" : "list");
		v[0] = s->stack[s->sp - n];
		v[1] = n == 2 ? s->stack[s->sp - 1] : NULL;
		rc = add_items(s, c, v, n);
		if (!rc)
			s->sp -= n;
		return rc;
	}
	case OP_APPENDS:
	case OP_SETITEMS:
		rc = pop_mark(s, &first);
		if (rc)
			return rc;
		if (first <= stack_floor(s))
			return pk_fail(s, -EPROTO, "%s with no container below its MARK",
				       op == OP_SETITEMS ? "SETITEMS" : "APPENDS");
		c = s->stack[first - 1];
		if (c->kind != (op == OP_SETITEMS ? PK_DICT : PK_LIST))
			return pk_fail(s, -EPROTO, "%s on a non-%s",
				       op == OP_SETITEMS ? "SETITEMS" : "APPENDS",
				       op == OP_SETITEMS ? "dict" : "list");
		rc = add_items(s, c, &s->stack[first], s->sp - first);
		if (!rc)
			s->sp = first;
		return rc;
	}
	return pk_fail(s, -EPROTO, "internal: opcode 0x%02x", op);
}

static int run_op(struct pk_state *s, uint8_t op, bool *stop)
{
	struct pk_value *v = NULL;
	uint64_t n;
	uint32_t first = 0;
	int rc;

	switch (op) {
	case OP_PROTO:
		rc = read_le(s, 1, &n);
		if (rc)
			return rc;
		if (n > 5)
			return pk_fail(s, -EPROTO, "pickle protocol %llu is newer than 5",
				       (unsigned long long)n);
		return 0;
	case OP_FRAME:
		/* framing is only a buffering hint: check the length and read on */
		rc = read_le(s, 8, &n);
		if (rc)
			return rc;
		if (n > s->len - s->off)
			return pk_fail(s, -EPROTO, "FRAME of %llu bytes, %zu left",
				       (unsigned long long)n, s->len - s->off);
		return 0;
	case OP_STOP:
		*stop = true;
		return 0;
	case OP_MARK:
		if (s->nmarks >= PK_MAX_MARKS)
			return pk_fail(s, -E2BIG, "more than %u MARKs open", PK_MAX_MARKS);
		s->marks[s->nmarks++] = s->sp;
		return 0;
	case OP_NONE:
		return push_int(s, PK_NONE, 0);
	case OP_NEWTRUE:
	case OP_NEWFALSE:
		return push_int(s, PK_BOOL, op == OP_NEWTRUE);
	case OP_BININT:
		rc = read_le(s, 4, &n);
		return rc ? rc : push_int(s, PK_INT, (int64_t)(int32_t)(uint32_t)n);
	case OP_BININT1:
	case OP_BININT2:
		rc = read_le(s, op == OP_BININT1 ? 1 : 2, &n);
		return rc ? rc : push_int(s, PK_INT, (int64_t)n);
	case OP_LONG1:
		rc = read_le(s, 1, &n);
		return rc ? rc : read_long(s, n);
	case OP_SHORT_BINBYTES:
	case OP_SHORT_BINUNICODE:
		rc = read_le(s, 1, &n);
		return rc ? rc : read_blob(s, op == OP_SHORT_BINBYTES ? PK_BYTES : PK_STR, n);
	case OP_BINBYTES:
	case OP_BINUNICODE:
		rc = read_le(s, 4, &n);
		return rc ? rc : read_blob(s, op == OP_BINBYTES ? PK_BYTES : PK_STR, n);
	case OP_BINBYTES8:
	case OP_BINUNICODE8:
		rc = read_le(s, 8, &n);
		return rc ? rc : read_blob(s, op == OP_BINBYTES8 ? PK_BYTES : PK_STR, n);
	case OP_EMPTY_TUPLE:
		return tuple_n(s, 0);
	case OP_TUPLE1:
	case OP_TUPLE2:
	case OP_TUPLE3:
		return tuple_n(s, (uint32_t)(op - OP_TUPLE1 + 1));
	case OP_TUPLE:
	case OP_LIST:
	case OP_DICT:
		rc = pop_mark(s, &first);
		if (rc)
			return rc;
		return build_from_stack(s, op == OP_TUPLE ? PK_TUPLE :
					   op == OP_LIST ? PK_LIST : PK_DICT, first);
	case OP_EMPTY_LIST:
	case OP_EMPTY_DICT:
		rc = new_value(s, op == OP_EMPTY_LIST ? PK_LIST : PK_DICT, &v);
		return rc ? rc : push(s, v);
	case OP_APPEND:
	case OP_APPENDS:
	case OP_SETITEM:
	case OP_SETITEMS:
		return container_op(s, op);
	case OP_MEMOIZE:
		return memo_put(s, s->memo_count);
	case OP_BINPUT:
	case OP_LONG_BINPUT:
		rc = read_le(s, op == OP_BINPUT ? 1 : 4, &n);
		return rc ? rc : memo_put(s, n);
	case OP_BINGET:
	case OP_LONG_BINGET:
		rc = read_le(s, op == OP_BINGET ? 1 : 4, &n);
		return rc ? rc : memo_get(s, n);
	case OP_GLOBAL:
		return op_global(s);
	case OP_STACK_GLOBAL:
		return op_stack_global(s);
	case OP_REDUCE:
		return op_reduce(s);
	case OP_NEWOBJ:
		return op_newobj(s);
	case OP_BUILD:
		return op_build(s);
	default:
		if (op >= 0x20 && op < 0x7f)
			return pk_fail(s, -EPROTO, "opcode 0x%02x '%c' is not supported", op, op);
		return pk_fail(s, -EPROTO, "opcode 0x%02x is not supported", op);
	}
}

int pk_parse(const uint8_t *p, size_t len, struct pk_doc **out, char *err, size_t errlen)
{
	struct ks_errbuf e = { err, errlen };
	struct pk_state *s;
	bool stop = false;
	int rc = 0;

	*out = NULL;
	if (!p && len)
		return ks_err(&e, -EPROTO, "no pickle");
	if (len == 0)
		return ks_err(&e, -EPROTO, "empty pickle");
	if (len > PK_MAX_INPUT)
		return ks_err(&e, -E2BIG, "pickle of %zu bytes exceeds the limit of %u", len,
			      PK_MAX_INPUT);
	/* the state (stack, memo) is ~12 KB: heap, not the caller's stack */
	s = calloc(1, sizeof(*s));
	if (!s)
		return ks_err(&e, -ENOMEM, "out of memory");
	s->doc = calloc(1, sizeof(*s->doc));
	if (!s->doc) {
		free(s);
		return ks_err(&e, -ENOMEM, "out of memory");
	}
	s->p = p;
	s->len = len;
	s->e = &e;
	while (!stop) {
		s->op_off = s->off;
		if (s->off >= s->len) {
			rc = pk_fail(s, -EPROTO, "truncated: no STOP opcode");
			break;
		}
		rc = run_op(s, s->p[s->off++], &stop);
		if (rc)
			break;
	}
	if (!rc && s->nmarks)
		rc = pk_fail(s, -EPROTO, "STOP with a MARK still open");
	if (!rc && s->sp != 1)
		rc = pk_fail(s, -EPROTO, "STOP with %u values on the stack, expected 1", s->sp);
	if (!rc && s->off != s->len)
		rc = pk_fail(s, -EPROTO, "%zu trailing bytes after STOP", s->len - s->off);
	if (rc) {
		pk_free(s->doc);
		free(s);
		return rc;
	}
	s->doc->root = s->stack[0];
	*out = s->doc;
	free(s);
	return 0;
}

const struct pk_value *pk_dict_get(const struct pk_value *d, const char *name)
{
	const struct pk_value *found = NULL;

	if (!d || d->kind != PK_DICT)
		return NULL;
	for (uint32_t i = 0; i < d->n; i++) {
		const struct pk_value *k = d->items[2 * i];

		if (k->kind == PK_STR && mem_is(k->data, k->len, name))
			found = d->items[2 * i + 1];
	}
	return found;
}

/* ------------------------------------------------------------------------ */
/* LMCache's wrappers                                                       */
/* ------------------------------------------------------------------------ */

static const char *kind_name(const struct pk_value *v)
{
	static const char *const names[] = {
		"None", "bool", "int", "bytes", "str", "tuple", "list", "dict", "global", "object",
	};

	return (size_t)v->kind < KS_ARRAY_SIZE(names) ? names[v->kind] : "?";
}

static int want_int(const struct pk_value *v, const char *what, int64_t min, int64_t max,
		    int64_t *out, struct ks_errbuf *e)
{
	if (!v)
		return ks_err(e, -EPROTO, "missing %s", what);
	if (v->kind != PK_INT)
		return ks_err(e, -EPROTO, "%s: expected int, got %s", what, kind_name(v));
	if (v->i < min || v->i > max)
		return ks_err(e, -EPROTO, "%s: %lld out of range [%lld, %lld]", what,
			      (long long)v->i, (long long)min, (long long)max);
	*out = v->i;
	return 0;
}

static int want_bytes(const struct pk_value *v, const char *what, struct ks_errbuf *e)
{
	if (!v)
		return ks_err(e, -EPROTO, "missing %s", what);
	if (v->kind != PK_BYTES)
		return ks_err(e, -EPROTO, "%s: expected bytes, got %s", what, kind_name(v));
	return 0;
}

/* A tuple or list of 1..PK_MAX_DIMS ints in [min, max]. */
static int want_dims(const struct pk_value *v, const char *what, int64_t min, int64_t max,
		     int64_t *dims, uint32_t *ndim, struct ks_errbuf *e)
{
	char nb[32];

	if (!v)
		return ks_err(e, -EPROTO, "missing %s", what);
	if (v->kind != PK_TUPLE && v->kind != PK_LIST)
		return ks_err(e, -EPROTO, "%s: expected tuple, got %s", what, kind_name(v));
	if (v->n == 0 || v->n > PK_MAX_DIMS)
		return ks_err(e, -EPROTO, "%s: %u dims, expected 1 to %u", what, v->n, PK_MAX_DIMS);
	for (uint32_t i = 0; i < v->n; i++) {
		snprintf(nb, sizeof(nb), "%s[%u]", what, i);
		int rc = want_int(v->items[i], nb, min, max, &dims[i], e);

		if (rc)
			return rc;
	}
	*ndim = v->n;
	return 0;
}

/*
 * handle[1]: the memory blob of CUDACachingAllocator::shareIpcHandle().
 * 64 bytes: a bare cudaIpcMemHandle_t (PyTorch before the versioned format).
 * Otherwise [version][type][payload]: type 'c' (cudaMalloc'd segment) is
 * followed by the 64-byte handle; 'e' (expandable segment) by a VMM export
 * kvstash cannot open.
 */
#define PK_HANDLE_VERSION_MAX 3	/* 'c' payload unchanged through version 3 */
static int decode_mem_blob(const struct pk_value *b, struct pk_cuda_ipc *w, struct ks_errbuf *e)
{
	if (b->len == PK_IPC_HANDLE_LEN) {
		memcpy(w->mem_handle, b->data, PK_IPC_HANDLE_LEN);
		w->handle_version = 0;
		return 0;
	}
	if (b->len < 2)
		return ks_err(e, -EPROTO, "memory handle of %zu bytes, expected 64 or 66", b->len);
	if (b->data[1] == 'e')
		return ks_err(e, -EOPNOTSUPP,
			      "memory handle is an expandable segment (PyTorch "
			      "expandable_segments:True); kvstash opens only cudaMalloc'd memory: "
			      "unset expandable_segments in PYTORCH_CUDA_ALLOC_CONF");
	if (b->data[1] != 'c')
		return ks_err(e, -EPROTO, "memory handle type 0x%02x, expected 'c'", b->data[1]);
	if (b->data[0] == 0 || b->data[0] > PK_HANDLE_VERSION_MAX)
		return ks_err(e, -EOPNOTSUPP,
			      "memory handle version %u is not one kvstash knows (1 to %d)",
			      b->data[0], PK_HANDLE_VERSION_MAX);
	if (b->len != 2 + PK_IPC_HANDLE_LEN)
		return ks_err(e, -EPROTO, "memory handle of %zu bytes, expected 66", b->len);
	memcpy(w->mem_handle, b->data + 2, PK_IPC_HANDLE_LEN);
	w->handle_version = b->data[0];
	return 0;
}

/* The 8-tuple of THPStorage_shareCuda (torch/csrc/StorageSharing.cpp). */
static int decode_share_cuda(const struct pk_value *h, struct pk_cuda_ipc *w, struct ks_errbuf *e)
{
	int64_t v = 0;	/* set by want_int on success; gcc -O3 cannot see that */
	int rc;

	if (!h)
		return ks_err(e, -EPROTO, "missing handle");
	if (h->kind != PK_TUPLE)
		return ks_err(e, -EPROTO, "handle: expected tuple, got %s", kind_name(h));
	if (h->n != 8)
		return ks_err(e, -EPROTO, "handle: %u entries, expected 8", h->n);
	rc = want_int(h->items[0], "handle[0] (device)", 0, INT32_MAX, &v, e);
	if (rc)
		return rc;
	w->device = (int32_t)v;
	if (h->items[1]->kind == PK_NONE)
		return ks_err(e, -EOPNOTSUPP, "handle: the storage has no memory (empty tensor)");
	rc = want_bytes(h->items[1], "handle[1] (memory handle)", e);
	if (rc)
		return rc;
	rc = decode_mem_blob(h->items[1], w, e);
	if (rc)
		return rc;
	rc = want_int(h->items[2], "handle[2] (storage size bytes)", 0, INT64_MAX, &v, e);
	if (rc)
		return rc;
	w->storage_size_bytes = (uint64_t)v;
	rc = want_int(h->items[3], "handle[3] (storage offset bytes)", 0, INT64_MAX, &v, e);
	if (rc)
		return rc;
	w->storage_offset_bytes = (uint64_t)v;
	rc = want_bytes(h->items[4], "handle[4] (ref counter)", e);
	if (rc)
		return rc;
	if (h->items[4]->len > PK_REF_COUNTER_MAX)
		return ks_err(e, -EPROTO, "handle[4] (ref counter): %zu bytes, limit %u",
			      h->items[4]->len, PK_REF_COUNTER_MAX);
	if (h->items[4]->len && memchr(h->items[4]->data, 0, h->items[4]->len))
		return ks_err(e, -EPROTO, "handle[4] (ref counter): contains a NUL byte");
	memcpy(w->ref_counter, h->items[4]->data, h->items[4]->len);
	w->ref_counter[h->items[4]->len] = '\0';
	rc = want_int(h->items[5], "handle[5] (ref counter offset)", 0, INT64_MAX, &v, e);
	if (rc)
		return rc;
	w->ref_counter_offset = (uint64_t)v;
	rc = want_bytes(h->items[6], "handle[6] (event handle)", e);
	if (rc)
		return rc;
	if (h->items[6]->len != PK_IPC_HANDLE_LEN)
		return ks_err(e, -EPROTO, "handle[6] (event handle): %zu bytes, expected %u",
			      h->items[6]->len, PK_IPC_HANDLE_LEN);
	memcpy(w->event_handle, h->items[6]->data, PK_IPC_HANDLE_LEN);
	if (h->items[7]->kind != PK_BOOL)
		return ks_err(e, -EPROTO, "handle[7] (event sync): expected bool, got %s",
			      kind_name(h->items[7]));
	w->event_sync_required = h->items[7]->i != 0;
	return 0;
}

/*
 * RawCudaIPCWrapper. Current LMCache takes the handle at the allocation base
 * and sends _alloc_offset (base -> element 0) with _nbytes = the view's bytes;
 * the older form (no _alloc_offset) took it at element 0, _nbytes = storage.
 */
static int decode_raw(const struct pk_value *st, struct pk_cuda_ipc *w, struct ks_errbuf *e)
{
	const struct pk_value *v = pk_dict_get(st, "_ipc_handle_reserved");
	int64_t x = 0;	/* set by want_int on success; gcc -O3 cannot see that */
	int rc;

	w->kind = PK_WRAPPER_RAW_CUDA_IPC;
	w->device = -1;
	rc = want_bytes(v, "_ipc_handle_reserved", e);
	if (rc)
		return rc;
	if (v->len != PK_IPC_HANDLE_LEN)
		return ks_err(e, -EPROTO, "_ipc_handle_reserved: %zu bytes, expected %u", v->len,
			      PK_IPC_HANDLE_LEN);
	memcpy(w->mem_handle, v->data, PK_IPC_HANDLE_LEN);
	v = pk_dict_get(st, "_alloc_offset");
	if (v) {
		rc = want_int(v, "_alloc_offset", 0, INT64_MAX, &x, e);
		if (rc)
			return rc;
		w->has_alloc_offset = true;
		w->alloc_offset = (uint64_t)x;
	}
	rc = want_int(pk_dict_get(st, "_nbytes"), "_nbytes", 0, INT64_MAX, &x, e);
	if (rc)
		return rc;
	w->storage_size_bytes = (uint64_t)x;
	return 0;
}

/*
 * CpuShmTensorWrapper: shm_name is what shm_open() gets, so it must be a POSIX
 * shm name: one path component after an optional leading '/', not "." or "..".
 * nbytes (_nbytes in the oldest LMCache) is the mmap length from offset 0.
 */
static int decode_cpu_shm(const struct pk_value *st, struct pk_cuda_ipc *w, struct ks_errbuf *e)
{
	const struct pk_value *v = pk_dict_get(st, "shm_name");
	const char *what = "nbytes";
	const uint8_t *body;
	size_t body_len;
	char q[48];
	int64_t x = 0;	/* set by want_int on success; gcc -O3 cannot see that */
	int rc;

	w->kind = PK_WRAPPER_CPU_SHM;
	w->device = -1;
	if (!v)
		return ks_err(e, -EPROTO, "missing shm_name");
	if (v->kind != PK_STR)
		return ks_err(e, -EPROTO, "shm_name: expected str, got %s", kind_name(v));
	if (v->len == 0)
		return ks_err(e, -EOPNOTSUPP, "shm_name is empty: the tensor has no memory "
			      "(empty tensor)");
	if (v->len > PK_SHM_NAME_MAX)
		return ks_err(e, -EPROTO, "shm_name: %zu bytes, limit %u", v->len, PK_SHM_NAME_MAX);
	if (memchr(v->data, 0, v->len))
		return ks_err(e, -EPROTO, "shm_name: contains a NUL byte");
	body = v->data + (v->data[0] == '/');
	body_len = v->len - (size_t)(body - v->data);
	if (memchr(body, '/', body_len))
		return ks_err(e, -EPROTO, "shm_name '%s': a '/' after the first character",
			      pk_quote(v->data, v->len, q));
	if (mem_is(body, body_len, "") || mem_is(body, body_len, ".") ||
	    mem_is(body, body_len, ".."))
		return ks_err(e, -EPROTO, "shm_name '%s' is not a POSIX shm name",
			      pk_quote(v->data, v->len, q));
	memcpy(w->shm_name, v->data, v->len);
	w->shm_name[v->len] = '\0';
	v = pk_dict_get(st, what);
	if (!v) {
		what = "_nbytes";
		v = pk_dict_get(st, what);
	}
	if (!v)
		return ks_err(e, -EPROTO, "missing nbytes");
	rc = want_int(v, what, 1, INT64_MAX, &x, e);
	if (rc)
		return rc;
	w->storage_size_bytes = (uint64_t)x;
	return 0;
}

static int decode_wrapper(const struct pk_value *root, struct pk_cuda_ipc *w, struct ks_errbuf *e)
{
	const struct pk_value *st, *v;
	int64_t x = 0;	/* set by want_int on success; gcc -O3 cannot see that */
	uint32_t ndim;
	int rc;

	if (root->kind != PK_OBJECT)
		return ks_err(e, -EPROTO, "pickle holds a %s, not a CudaIPCWrapper",
			      kind_name(root));
	if (root->cls->global == PK_G_VMM_CUDA_IPC_WRAPPER)
		return ks_err(e, -EOPNOTSUPP, "VmmCudaIPCWrapper (lmcache.mp.use_vmm_api) is not "
			      "supported by kvstash: register with the default CudaIPCWrapper or "
			      "isolated_ipc's RawCudaIPCWrapper");
	if (!root->state)
		return ks_err(e, -EPROTO, "%s has no state", root->cls->name);
	st = root->state;
	switch (root->cls->global) {
	case PK_G_RAW_CUDA_IPC_WRAPPER:
		rc = decode_raw(st, w, e);
		break;
	case PK_G_CPU_SHM_TENSOR_WRAPPER:
		rc = decode_cpu_shm(st, w, e);
		break;
	default:
		w->kind = PK_WRAPPER_CUDA_IPC;
		rc = decode_share_cuda(pk_dict_get(st, "handle"), w, e);
		break;
	}
	if (rc)
		return rc;

	v = pk_dict_get(st, "dtype");
	if (!v)
		return ks_err(e, -EPROTO, "missing dtype");
	if (v->kind != PK_GLOBAL || v->global != PK_G_TORCH_DTYPE)
		return ks_err(e, -EPROTO, "dtype: expected a torch dtype, got %s",
			      v->kind == PK_GLOBAL ? v->name : kind_name(v));
	snprintf(w->dtype, sizeof(w->dtype), "%s", v->name + strlen("torch."));

	rc = want_dims(pk_dict_get(st, "shape"), "shape", 0, INT64_MAX, w->shape, &w->ndim, e);
	if (rc)
		return rc;
	v = pk_dict_get(st, "stride");
	if (v) {
		rc = want_dims(v, "stride", 0, INT64_MAX, w->stride, &ndim, e);
		if (rc)
			return rc;
		if (ndim != w->ndim)
			return ks_err(e, -EPROTO, "stride has %u dims but shape has %u", ndim,
				      w->ndim);
		w->has_stride = true;
	} else {
		/* wrappers older than the stride field described dense tensors */
		int64_t s = 1;

		for (uint32_t i = w->ndim; i-- > 0;) {
			w->stride[i] = s;
			if (w->shape[i] && __builtin_mul_overflow(s, w->shape[i], &s))
				return ks_err(e, -EPROTO, "shape: element count overflows");
		}
	}
	v = pk_dict_get(st, "storage_offset");
	if (v) {
		rc = want_int(v, "storage_offset", 0, INT64_MAX, &x, e);
		if (rc)
			return rc;
		w->storage_offset = (uint64_t)x;
	}
	v = pk_dict_get(st, "device_uuid");
	if (!v)
		return ks_err(e, -EPROTO, "missing device_uuid");
	if (v->kind != PK_STR)
		return ks_err(e, -EPROTO, "device_uuid: expected str, got %s", kind_name(v));
	if (v->len > PK_UUID_MAX)
		return ks_err(e, -EPROTO, "device_uuid: %zu bytes, limit %u", v->len, PK_UUID_MAX);
	if (v->len && memchr(v->data, 0, v->len))
		return ks_err(e, -EPROTO, "device_uuid: contains a NUL byte");
	memcpy(w->device_uuid, v->data, v->len);
	w->device_uuid[v->len] = '\0';
	return 0;
}

int pk_cuda_ipc_decode(const uint8_t *p, size_t len, struct pk_cuda_ipc *out, char *err,
		       size_t errlen)
{
	struct ks_errbuf e = { err, errlen };
	struct pk_doc *doc;
	int rc;

	memset(out, 0, sizeof(*out));
	rc = pk_parse(p, len, &doc, err, errlen);
	if (rc)
		return rc;
	rc = decode_wrapper(pk_root(doc), out, &e);
	pk_free(doc);
	if (rc)
		memset(out, 0, sizeof(*out));
	return rc;
}
