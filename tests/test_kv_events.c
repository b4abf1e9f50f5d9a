/*
 * Description: KV cache events in vLLM's format from a real kvstashd, read by a ZMQ SUB and decoded as vLLM's consumers decode them: a 3-chunk STORE publishes one BlockStored per chunk with its tokens, parent chain and block size = chunk size; the same STORE again publishes nothing; evictions publish BlockRemoved for exactly the evicted chunks; CLEAR publishes AllBlocksCleared; batches are positional [ts, events, rank] with events as maps (vLLM 0.26+) or positional arrays with --kv-events-format=array; a salted prompt's first chunk carries extra_keys [(salt,)]; sequences are contiguous; replay from a start sequence returns the buffered batches then -1, and rebuilds the view of a subscriber that never dropped; a start older than the buffer (or "snapshot") gets one snapshot batch that rebuilds the full view, parents first; a restart's batch 0 is AllBlocksCleared; bad replay input gets no reply; with a disk tier an evicted chunk moves from CPU to STORAGE, the disk's capacity evictions publish BlockRemoved STORAGE for exactly the removed files, a CLEAR re-announces the disk and a LOOKUP that loads chunks back announces them in CPU with their tokens; a stuck publisher drops (counted, a sequence gap) and never holds up STORE; bad endpoints fail at start with a message. Labels: unit tsan
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <msgpack.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "chunk_key.h"
#include "fault.h"
#include "helpers.h"
#include "kv_events.h"
#include "kvfix.h"

/* How long test_slow_publisher holds the publisher: start + a STORE must fit
 * in it (about 6.5 s under TSan on a loaded 2-core machine). */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SLOW_PUBLISHER_MS 20000
#else
#define SLOW_PUBLISHER_MS 6000
#endif
#define NL 4
#define NB 192
#define BS 16
#define NH 8
#define HS 128	/* objects of 4 MiB */
#define C 256
#define PROMPT 3	/* chunks per prompt */
#define MODEL "m-ev"
#define MAXEV 4096

static const int64_t src_blocks[PROMPT * C / BS] = {
	5, 3, 9, 1, 0, 2, 4, 6, 8, 7, 10, 12, 11, 14, 13, 15, 17, 16, 19, 18, 21, 20, 23, 22,
	25, 24, 27, 26, 29, 28, 31, 30, 33, 32, 35, 34, 37, 36, 39, 38, 41, 40, 43, 42, 45, 44,
	47, 46,
};

/* One decoded event. */
struct ev {
	char type[24];
	uint64_t hash;
	bool has_parent;
	uint64_t parent;
	uint32_t ntokens;
	uint32_t tok0, tok_last;	/* first and last token */
	uint32_t block_size;
	char medium[16];
	char salt[32];		/* extra_keys [(salt,)], if sent */
	bool has_extra;
	uint64_t seq;
};

struct sub {
	void *sock;
	struct ev evs[MAXEV];
	size_t nev;
	uint64_t seqs[MAXEV];
	size_t nseq;
	bool gap;		/* a sequence number was skipped */
	bool array_form;	/* expect --kv-events-format=array (positional) */
};

static void *zctx;

static uint64_t t_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void prompt_tokens(int p, uint32_t *tok)
{
	for (size_t t = 0; t < PROMPT * C; t++)
		tok[t] = (uint32_t)p * 7919u + (uint32_t)t * 3u + 1u;
}

static uint64_t expect_hash(int p, int c)
{
	uint32_t tok[PROMPT * C];
	uint8_t h[PROMPT][KS_HASH_LEN], none[KS_HASH_LEN];
	struct ks_key k;

	prompt_tokens(p, tok);
	ks_none_hash(none);
	ks_hash_chunks(none, tok, 0, PROMPT, C, h);
	ks_key_init(&k, h[c], MODEL, strlen(MODEL), ks_kv_rank(1, 0));
	return kve_block_hash(&k, h[c]);
}

static bool str_is(const msgpack_object *o, const char *s)
{
	return o->type == MSGPACK_OBJECT_STR && o->via.str.size == strlen(s) &&
	       !memcmp(o->via.str.ptr, s, o->via.str.size);
}

static uint64_t as_u64(const msgpack_object *o)
{
	return o->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? o->via.u64 : (uint64_t)o->via.i64;
}

/* Decode one batch payload [ts, [events], dp_rank] into @s. */
/* One event field by name (whichever form it came in) into @d. */
static void decode_field(struct ev *d, const char *name, const msgpack_object *v)
{
	if (!strcmp(name, "type") && v->type == MSGPACK_OBJECT_STR)
		snprintf(d->type, sizeof(d->type), "%.*s", (int)v->via.str.size, v->via.str.ptr);
	else if (!strcmp(name, "medium") && v->type == MSGPACK_OBJECT_STR)
		snprintf(d->medium, sizeof(d->medium), "%.*s", (int)v->via.str.size,
			 v->via.str.ptr);
	else if (!strcmp(name, "block_hashes") && v->type == MSGPACK_OBJECT_ARRAY &&
		 v->via.array.size == 1)
		d->hash = as_u64(&v->via.array.ptr[0]);
	else if (!strcmp(name, "parent_block_hash")) {
		d->has_parent = v->type != MSGPACK_OBJECT_NIL;
		d->parent = d->has_parent ? as_u64(v) : 0;
	} else if (!strcmp(name, "token_ids") && v->type == MSGPACK_OBJECT_ARRAY) {
		d->ntokens = v->via.array.size;
		if (d->ntokens) {
			d->tok0 = (uint32_t)as_u64(&v->via.array.ptr[0]);
			d->tok_last = (uint32_t)as_u64(&v->via.array.ptr[d->ntokens - 1]);
		}
	} else if (!strcmp(name, "block_size")) {
		d->block_size = (uint32_t)as_u64(v);
	} else if (!strcmp(name, "extra_keys")) {
		/* one entry per block hash; kvstashd sends only [(salt,)] */
		d->has_extra = true;
		if (v->type == MSGPACK_OBJECT_ARRAY && v->via.array.size == 1 &&
		    v->via.array.ptr[0].type == MSGPACK_OBJECT_ARRAY &&
		    v->via.array.ptr[0].via.array.size == 1 &&
		    v->via.array.ptr[0].via.array.ptr[0].type == MSGPACK_OBJECT_STR) {
			const msgpack_object_str *st = &v->via.array.ptr[0].via.array.ptr[0].via.str;

			snprintf(d->salt, sizeof(d->salt), "%.*s", (int)st->size, st->ptr);
		}
	}
}

/* vLLM's field order of each event (KVCacheEvent subclasses), type first. */
static const char *const stored_fields[] = { "type", "block_hashes", "parent_block_hash",
					      "token_ids", "block_size", "lora_id", "medium",
					      "lora_name", "extra_keys" };
static const char *const removed_fields[] = { "type", "block_hashes", "medium" };

/*
 * One event: a map with "type" (map form) or [type, fields by position]
 * (array form); it must be in the same form as its batch. false if not.
 */
static bool decode_event(struct ev *d, const msgpack_object *e, bool array_form)
{
	if (!array_form) {
		if (e->type != MSGPACK_OBJECT_MAP || !e->via.map.size ||
		    !str_is(&e->via.map.ptr[0].key, "type"))
			return false;
		for (uint32_t f = 0; f < e->via.map.size; f++) {
			const msgpack_object *key = &e->via.map.ptr[f].key;
			char name[32];

			if (key->type != MSGPACK_OBJECT_STR || key->via.str.size >= sizeof(name))
				return false;
			snprintf(name, sizeof(name), "%.*s", (int)key->via.str.size, key->via.str.ptr);
			decode_field(d, name, &e->via.map.ptr[f].val);
		}
		return true;
	}
	if (e->type != MSGPACK_OBJECT_ARRAY || !e->via.array.size)
		return false;
	decode_field(d, "type", &e->via.array.ptr[0]);
	const char *const *names = !strcmp(d->type, "BlockStored") ? stored_fields :
				   !strcmp(d->type, "BlockRemoved") ? removed_fields : NULL;
	size_t nnames = names == stored_fields ? 8 : names == removed_fields ? 3 : 1;

	/* extra_keys, the 9th, only for a salted prompt's first chunk */
	if (e->via.array.size != nnames && !(names == stored_fields && e->via.array.size == 9))
		return false;
	for (uint32_t f = 1; f < e->via.array.size; f++)
		decode_field(d, names[f], &e->via.array.ptr[f]);
	return true;
}

/*
 * A batch as vLLM's EventBatch encodes it in every release: [ts, events,
 * data_parallel_rank] (array_like), its events maps or positional arrays
 * as this subscriber expects, checked strictly.
 */
static bool decode_batch(struct sub *s, uint64_t seq, const void *data, size_t len)
{
	msgpack_unpacked u;
	const msgpack_object *ts, *events, *rank;
	bool ok = false;

	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, data, len, NULL) != MSGPACK_UNPACK_SUCCESS)
		goto out;
	const msgpack_object *b = &u.data;

	if (b->type != MSGPACK_OBJECT_ARRAY || b->via.array.size != 3)
		goto out;
	ts = &b->via.array.ptr[0];
	events = &b->via.array.ptr[1];
	rank = &b->via.array.ptr[2];
	if (ts->type != MSGPACK_OBJECT_FLOAT64 || events->type != MSGPACK_OBJECT_ARRAY ||
	    rank->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		goto out;
	for (uint32_t i = 0; i < events->via.array.size; i++) {
		struct ev *d;

		if (s->nev >= MAXEV)
			goto out;
		d = &s->evs[s->nev++];
		memset(d, 0, sizeof(*d));
		d->seq = seq;
		if (!decode_event(d, &events->via.array.ptr[i], s->array_form))
			goto out;
	}
	ok = true;
out:
	msgpack_unpacked_destroy(&u);
	return ok;
}

/* Receive what arrives within @ms (until quiet for @ms). Returns messages read. */
static int sub_drain(struct sub *s, const char *topic, int ms)
{
	int n = 0;

	for (;;) {
		zmq_pollitem_t it = { .socket = s->sock, .events = ZMQ_POLLIN };
		zmq_msg_t f[3];
		int more, nf = 0;
		size_t ml = sizeof(more);

		if (zmq_poll(&it, 1, ms) <= 0)
			return n;
		do {
			zmq_msg_init(&f[nf < 3 ? nf : 2]);
			REQUIRE(zmq_msg_recv(&f[nf < 3 ? nf : 2], s->sock, 0) >= 0);
			nf++;
			zmq_getsockopt(s->sock, ZMQ_RCVMORE, &more, &ml);
		} while (more && nf < 3);
		CHECK_EQ(nf, 3);
		CHECK(!more);
		CHECK_EQ(zmq_msg_size(&f[0]), strlen(topic));
		CHECK(!memcmp(zmq_msg_data(&f[0]), topic, strlen(topic)));
		REQUIRE(zmq_msg_size(&f[1]) == 8);
		uint64_t seq = 0;
		const uint8_t *sb = zmq_msg_data(&f[1]);

		for (int i = 0; i < 8; i++)
			seq = seq << 8 | sb[i];
		if (s->nseq && seq != s->seqs[s->nseq - 1] + 1)
			s->gap = true;
		if (s->nseq < MAXEV)
			s->seqs[s->nseq++] = seq;
		CHECK(decode_batch(s, seq, zmq_msg_data(&f[2]), zmq_msg_size(&f[2])));
		for (int i = 0; i < 3; i++)
			zmq_msg_close(&f[i]);
		n++;
	}
}

static void sub_open(struct sub *s, const char *ep, const char *topic)
{
	memset(s, 0, sizeof(*s));
	s->sock = zmq_socket(zctx, ZMQ_SUB);
	REQUIRE(s->sock);
	REQUIRE(zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, topic, strlen(topic)) == 0);
	REQUIRE(zmq_connect(s->sock, ep) == 0);
	usleep(300 * 1000);	/* the subscription reaches the publisher */
}

/* A view as a router builds it: hashes stored in CPU, minus removals. */
struct view {
	uint64_t h[MAXEV];
	size_t n;
};

static void view_apply(struct view *v, const struct ev *e)
{
	if (!strcmp(e->type, "AllBlocksCleared")) {
		v->n = 0;
	} else if (!strcmp(e->type, "BlockStored")) {
		for (size_t i = 0; i < v->n; i++)
			if (v->h[i] == e->hash)
				return;
		v->h[v->n++] = e->hash;
	} else if (!strcmp(e->type, "BlockRemoved")) {
		for (size_t i = 0; i < v->n; i++)
			if (v->h[i] == e->hash) {
				v->h[i] = v->h[--v->n];
				return;
			}
	}
}

static bool view_has(const struct view *v, uint64_t h)
{
	for (size_t i = 0; i < v->n; i++)
		if (v->h[i] == h)
			return true;
	return false;
}

static bool view_equal(const struct view *a, const struct view *b)
{
	if (a->n != b->n)
		return false;
	for (size_t i = 0; i < a->n; i++)
		if (!view_has(b, a->h[i]))
			return false;
	return true;
}

struct node {
	struct t_daemon *d;
	kvstash_client *c;
	struct t_kv kv;
};

static void node_start(struct node *n, const char *args)
{
	memset(n, 0, sizeof(*n));
	n->d = t_daemon_start(args);
	REQUIRE(n->d);
	REQUIRE(kvstash_connect(n->d->endpoint, 10000, &n->c) == 0);
	REQUIRE(t_kv_create(&n->kv, KVSTASH_LAYOUT_FLASH_ATTN, "bfloat16", NL, NB, BS, NH, HS) == 0);
	REQUIRE(t_kv_register(&n->kv, n->c, 1, MODEL, 1) == 0);
}

static int node_stop(struct node *n)
{
	kvstash_close(n->c);
	t_kv_destroy(&n->kv);
	return t_daemon_stop(n->d);
}

/* STORE prompt @p; *@store_ms (if set): how long the STORE call alone took. */
static int store_prompt_ms(struct node *n, int p, uint64_t *store_ms)
{
	uint32_t tok[PROMPT * C];
	uint64_t t0;
	int rc;

	prompt_tokens(p, tok);
	for (size_t t = 0; t < PROMPT * C; t++)
		t_kv_fill_token(&n->kv, t_kv_slot(&n->kv, src_blocks, t), (uint64_t)p, t);
	struct kvstash_key k = { .model = MODEL, .world_size = 1, .worker_id = 0, .tokens = tok,
				 .ntokens = PROMPT * C, .start = 0, .end = PROMPT * C,
				 .request_id = "ev" };
	t0 = t_now_ms();
	rc = kvstash_store(n->c, &k, 1, src_blocks, PROMPT * C / BS);
	if (store_ms)
		*store_ms = t_now_ms() - t0;
	return rc;
}

static int store_prompt(struct node *n, int p)
{
	return store_prompt_ms(n, p, NULL);
}

static int64_t lookup_prompt(struct node *n, int p)
{
	uint32_t tok[PROMPT * C];
	int64_t job, chunks = -1;

	prompt_tokens(p, tok);
	struct kvstash_key k = { .model = MODEL, .world_size = 1, .worker_id = -1, .tokens = tok,
				 .ntokens = PROMPT * C, .start = 0, .end = PROMPT * C,
				 .request_id = "lk" };
	if (kvstash_lookup(n->c, &k, 1, &job))
		return -1;
	/* QUERY_PREFETCH_LOOKUP_HITS is nil while a prefetch from disk loads. */
	for (int i = 0; i < 200; i++) {
		if (kvstash_query_lookup_hits(n->c, job, &chunks) == 0)
			break;
		usleep(20000);
	}
	if (kvstash_query_prefetch_status(n->c, job, &chunks))
		chunks = -1;
	kvstash_free_lookup_locks(n->c, &k, 1);
	return chunks;
}

/* Send @nframes frames on a DEALER (@frames[i] of @lens[i] bytes). */
static void dealer_send(void *d, const void *const *frames, const size_t *lens, int nframes)
{
	for (int i = 0; i < nframes; i++)
		REQUIRE(zmq_send(d, frames[i], lens[i], i + 1 < nframes ? ZMQ_SNDMORE : 0) >= 0);
}

/*
 * Replay from @from on a DEALER: every [("" ,) seq, payload] up to the end
 * marker decoded into @s. Returns the number of batches, -1 without an end.
 */
static int replay(void *d, uint64_t from, struct sub *s)
{
	uint8_t req[8];
	const void *fr[2] = { "", req };
	size_t ln[2] = { 0, 8 };
	int n = 0;

	for (int i = 7; i >= 0; i--, from >>= 8)
		req[i] = (uint8_t)from;
	dealer_send(d, fr, ln, 2);
	for (;;) {
		zmq_pollitem_t it = { .socket = d, .events = ZMQ_POLLIN };
		zmq_msg_t f[3];
		int more, nf = 0;
		size_t ml = sizeof(more);

		if (zmq_poll(&it, 1, 3000) <= 0)
			return -1;
		do {
			if (nf < 3) {
				zmq_msg_init(&f[nf]);
				REQUIRE(zmq_msg_recv(&f[nf], d, 0) >= 0);
			}
			nf++;
			zmq_getsockopt(d, ZMQ_RCVMORE, &more, &ml);
		} while (more);
		REQUIRE(nf == 3);
		REQUIRE(zmq_msg_size(&f[0]) == 0 && zmq_msg_size(&f[1]) == 8);
		uint64_t seq = 0;
		const uint8_t *sb = zmq_msg_data(&f[1]);

		for (int i = 0; i < 8; i++)
			seq = seq << 8 | sb[i];
		if (seq == UINT64_MAX) {	/* -1: the end */
			CHECK_EQ(zmq_msg_size(&f[2]), 0);
			for (int i = 0; i < 3; i++)
				zmq_msg_close(&f[i]);
			return n;
		}
		if (s->nseq && seq != s->seqs[s->nseq - 1] + 1)
			s->gap = true;
		s->seqs[s->nseq++] = seq;
		CHECK(decode_batch(s, seq, zmq_msg_data(&f[2]), zmq_msg_size(&f[2])));
		for (int i = 0; i < 3; i++)
			zmq_msg_close(&f[i]);
		n++;
	}
}

/* Nothing arrives on @d within @ms. */
static bool dealer_quiet(void *d, int ms)
{
	zmq_pollitem_t it = { .socket = d, .events = ZMQ_POLLIN };

	return zmq_poll(&it, 1, ms) == 0;
}

static size_t count_type(const struct sub *s, size_t from, const char *type)
{
	size_t n = 0;

	for (size_t i = from; i < s->nev; i++)
		n += !strcmp(s->evs[i].type, type);
	return n;
}

static void test_events(void)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], rep[256], args[800];
	const char *topic = "kv@10.0.0.1:8000@" MODEL;
	static struct sub s, dropped, rp;
	struct view full = { .n = 0 }, rebuilt = { .n = 0 };
	struct node n;
	size_t mark;

	REQUIRE(dir);
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	snprintf(rep, sizeof(rep), "ipc://%s/replay", dir);
	/* 64 MiB / 4 MiB objects = 16 slots: the sixth 3-chunk prompt evicts. */
	snprintf(args, sizeof(args), "--pool-size=64M --kv-events-endpoint=%s "
		 "--kv-events-replay-endpoint=%s --kv-events-topic=%s --kv-events-buffer=64",
		 ep, rep, topic);
	node_start(&n, args);
	sub_open(&s, ep, "kv@");
	sub_open(&dropped, ep, "");

	/* A 3-chunk prompt: one BlockStored per chunk, chained, block size = chunk. */
	REQUIRE(store_prompt(&n, 0) == 0);
	sub_drain(&s, topic, 300);
	sub_drain(&dropped, topic, 50);
	CHECK_EQ(count_type(&s, 0, "BlockStored"), PROMPT);
	CHECK_EQ(s.nev, PROMPT);
	for (size_t i = 0; i < s.nev && i < PROMPT; i++) {
		const struct ev *e = &s.evs[i];
		uint32_t tok[PROMPT * C];

		prompt_tokens(0, tok);
		CHECK(!strcmp(e->type, "BlockStored"));
		CHECK_EQ(e->hash, expect_hash(0, (int)i));
		CHECK_EQ(e->has_parent, i > 0);
		if (i > 0)
			CHECK_EQ(e->parent, expect_hash(0, (int)i - 1));
		CHECK_EQ(e->ntokens, C);
		CHECK_EQ(e->block_size, C);
		CHECK_EQ(e->tok0, tok[i * C]);
		CHECK_EQ(e->tok_last, tok[i * C + C - 1]);
		CHECK(!strcmp(e->medium, "CPU"));
	}

	/* The same STORE again: nothing new. */
	mark = s.nev;
	REQUIRE(store_prompt(&n, 0) == 0);
	sub_drain(&s, topic, 300);
	CHECK_EQ(s.nev, mark);
	CHECK_EQ(t_stat(n.c, "kv_events_published"), 1 + PROMPT);	/* + the start's clear */

	/* The subscriber "dropped" stops reading here; the others go on. */
	for (int p = 1; p <= 5; p++)
		REQUIRE(store_prompt(&n, p) == 0);
	sub_drain(&s, topic, 300);
	size_t removed = count_type(&s, mark, "BlockRemoved");

	CHECK_EQ(count_type(&s, mark, "BlockStored"), 5 * PROMPT);
	CHECK(removed > 0);
	CHECK_EQ(removed, t_stat(n.c, "evictions"));
	/* Exactly the evicted chunks: every removed hash was stored and is gone,
	 * every stored one not removed is still there (LRU: prompts' leading chunks). */
	for (size_t i = 0; i < s.nev; i++)
		view_apply(&full, &s.evs[i]);
	for (int p = 0; p <= 5; p++) {
		int64_t hits = lookup_prompt(&n, p);
		int64_t expect = 0;

		while (expect < PROMPT && view_has(&full, expect_hash(p, (int)expect)))
			expect++;
		/* A LOOKUP counts a leading run: removals of a prompt start at chunk 0. */
		if (!view_has(&full, expect_hash(p, 0)))
			expect = 0;
		CHECK_EQ(hits, expect);
		for (int c = 0; c < PROMPT; c++) {
			bool in = view_has(&full, expect_hash(p, c));

			if (hits == PROMPT)
				CHECK(in);
			if (c >= hits && hits > 0)
				CHECK(!in);
		}
	}
	for (size_t i = mark; i < s.nev; i++)
		if (!strcmp(s.evs[i].type, "BlockRemoved")) {
			bool stored_before = false;

			for (size_t j = 0; j < i; j++)
				stored_before |= !strcmp(s.evs[j].type, "BlockStored") &&
						 s.evs[j].hash == s.evs[i].hash;
			CHECK(stored_before);
			CHECK(!strcmp(s.evs[i].medium, "CPU"));
		}

	/* CLEAR: AllBlocksCleared. */
	mark = s.nev;
	REQUIRE(kvstash_clear(n.c) == 0);
	sub_drain(&s, topic, 300);
	CHECK_EQ(s.nev, mark + 1);
	CHECK(s.nev > mark && !strcmp(s.evs[mark].type, "AllBlocksCleared"));
	REQUIRE(store_prompt(&n, 7) == 0);
	sub_drain(&s, topic, 300);
	CHECK(!s.gap);
	for (size_t i = 1; i < s.nseq; i++)
		CHECK_EQ(s.seqs[i], s.seqs[i - 1] + 1);

	/* Replay: the start's AllBlocksCleared is batch 0, then everything. */
	void *d = zmq_socket(zctx, ZMQ_DEALER);

	REQUIRE(d && zmq_connect(d, rep) == 0);
	memset(&rp, 0, sizeof(rp));
	int nb = replay(d, 0, &rp);

	CHECK(nb > 0);
	CHECK(!rp.gap);
	CHECK(rp.nseq > 0 && rp.seqs[0] == 0);
	CHECK(rp.nev > 0 && !strcmp(rp.evs[0].type, "AllBlocksCleared"));
	CHECK(rp.nseq > 0 && s.nseq > 0 && rp.seqs[rp.nseq - 1] == s.seqs[s.nseq - 1]);
	/* The dropped subscriber resynchronises from its last sequence + 1. */
	REQUIRE(dropped.nseq > 0);
	struct sub *tail = calloc(1, sizeof(*tail));

	REQUIRE(tail);
	nb = replay(d, dropped.seqs[dropped.nseq - 1] + 1, tail);
	CHECK(nb > 0);
	CHECK(tail->nseq > 0 && tail->seqs[0] == dropped.seqs[dropped.nseq - 1] + 1);
	for (size_t i = 0; i < dropped.nev; i++)
		view_apply(&rebuilt, &dropped.evs[i]);
	for (size_t i = 0; i < tail->nev; i++)
		view_apply(&rebuilt, &tail->evs[i]);
	memset(&full, 0, sizeof(full));
	for (size_t i = 0; i < s.nev; i++)
		view_apply(&full, &s.evs[i]);
	CHECK(view_equal(&full, &rebuilt));
	CHECK_EQ(full.n, PROMPT);	/* prompt 7 after the CLEAR */
	/* From past the end: only the end marker. */
	memset(tail, 0, sizeof(*tail));
	CHECK_EQ(replay(d, s.seqs[s.nseq - 1] + 1000, tail), 0);
	free(tail);

	/* Bad replay input: short, long, garbage frames; no reply, then a good one works. */
	{
		const void *f1[2] = { "", "abc" };
		size_t l1[2] = { 0, 3 };
		const void *f2[2] = { "", "0123456789abcdef" };
		size_t l2[2] = { 0, 16 };
		const void *f3[1] = { "\0\0\0\0\0\0\0\0" };
		size_t l3[1] = { 8 };
		const void *f4[4] = { "", "\0\0\0\0\0\0\0\0", "x", "yy" };
		size_t l4[4] = { 0, 8, 1, 2 };

		dealer_send(d, f1, l1, 2);
		dealer_send(d, f2, l2, 2);
		dealer_send(d, f3, l3, 1);
		dealer_send(d, f4, l4, 4);
		CHECK(dealer_quiet(d, 300));
		CHECK(t_stat(n.c, "kv_events_replay_bad") >= 4);
		memset(&rp, 0, sizeof(rp));
		CHECK(replay(d, 0, &rp) > 0);
	}
	zmq_close(d);
	zmq_close(s.sock);
	zmq_close(dropped.sock);
	CHECK_EQ(t_stat(n.c, "kv_events_dropped"), 0);
	CHECK_EQ(node_stop(&n), 0);
	t_rmtree(dir);
	free(dir);
}

/*
 * With a disk tier: an evicted chunk is removed from CPU and stored on "Disk"
 * with the same hash, tokens and parent; a CLEAR of the pool re-announces the
 * disk's chunks after AllBlocksCleared.
 */
static void test_disk(void)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], args[800];
	static struct sub s;
	struct view cpu = { .n = 0 }, disk = { .n = 0 };
	struct node n;
	size_t mark;

	REQUIRE(dir);
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	/* 16 pool slots; the disk holds 1 GiB = about 250 chunks of 4 MiB. */
	snprintf(args, sizeof(args), "--pool-size=64M --kv-events-endpoint=%s --disk-path=%s/l2 "
		 "--disk-size-gb=1", ep, dir);
	node_start(&n, args);
	sub_open(&s, ep, "");
	for (int p = 0; p < 8; p++)
		REQUIRE(store_prompt(&n, 200 + p) == 0);
	sub_drain(&s, "", 600);
	for (size_t i = 0; i < s.nev; i++) {
		const struct ev *e = &s.evs[i];

		if (!strcmp(e->type, "AllBlocksCleared")) {
			cpu.n = disk.n = 0;
			continue;
		}
		view_apply(!strcmp(e->medium, "STORAGE") ? &disk : &cpu, e);
		if (!strcmp(e->type, "BlockStored") && !strcmp(e->medium, "STORAGE")) {
			/* The same block as its CPU store: tokens and parent. */
			bool found = false;

			for (size_t j = 0; j < i; j++) {
				const struct ev *c = &s.evs[j];

				if (strcmp(c->type, "BlockStored") || c->hash != e->hash)
					continue;
				found = true;
				CHECK_EQ(c->ntokens, e->ntokens);
				CHECK_EQ(c->tok0, e->tok0);
				CHECK_EQ(c->tok_last, e->tok_last);
				CHECK_EQ(c->has_parent, e->has_parent);
				CHECK_EQ(c->parent, e->parent);
				CHECK_EQ(e->block_size, C);
			}
			CHECK(found);
		}
	}
	CHECK(disk.n > 0);
	CHECK_EQ(disk.n, t_stat(n.c, "l2_objects"));
	CHECK_EQ(disk.n, t_stat(n.c, "l2_demoted"));
	for (size_t i = 0; i < disk.n; i++)
		CHECK(!view_has(&cpu, disk.h[i]));	/* removed from CPU, stored on disk */
	CHECK_EQ(cpu.n + disk.n, 8 * PROMPT);

	/* CLEAR drops the pool only: the disk's chunks are announced again. */
	mark = s.nev;
	REQUIRE(kvstash_clear(n.c) == 0);
	sub_drain(&s, "", 300);
	CHECK(s.nev > mark && !strcmp(s.evs[mark].type, "AllBlocksCleared"));
	CHECK_EQ(s.nev - mark, 1 + disk.n);
	for (size_t i = mark + 1; i < s.nev; i++)
		CHECK(!strcmp(s.evs[i].type, "BlockStored") &&
		      !strcmp(s.evs[i].medium, "STORAGE") && view_has(&disk, s.evs[i].hash));
	/* Parents first: each re-announced block's parent is on disk before it, or not at all. */
	for (size_t i = mark + 1; i < s.nev; i++) {
		bool before = false, on_disk = view_has(&disk, s.evs[i].parent);

		for (size_t j = mark + 1; j < i; j++)
			before |= s.evs[j].hash == s.evs[i].parent;
		if (s.evs[i].has_parent && on_disk)
			CHECK(before);
	}

	/*
	 * A LOOKUP loads a prompt's chunks back from the disk into the empty
	 * pool: each is announced in CPU again, with the tokens and parent of
	 * its first store.
	 */
	int lp = -1;

	for (int p = 0; p < 8 && lp < 0; p++)
		if (view_has(&disk, expect_hash(200 + p, 0)) && view_has(&disk, expect_hash(200 + p, 1)))
			lp = 200 + p;
	REQUIRE(lp >= 0);
	mark = s.nev;
	CHECK(lookup_prompt(&n, lp) >= 2);
	sub_drain(&s, "", 300);
	CHECK(count_type(&s, mark, "BlockStored") >= 2);
	CHECK(t_stat(n.c, "l2_promoted") >= 2);
	for (int c = 0; c < 2; c++) {
		bool found = false;
		uint32_t tok[PROMPT * C];

		prompt_tokens(lp, tok);
		for (size_t i = mark; i < s.nev; i++) {
			const struct ev *e = &s.evs[i];

			if (strcmp(e->type, "BlockStored") || e->hash != expect_hash(lp, c))
				continue;
			found = true;
			CHECK(!strcmp(e->medium, "CPU"));
			CHECK_EQ(e->ntokens, C);
			CHECK_EQ(e->tok0, tok[c * C]);
			CHECK_EQ(e->tok_last, tok[c * C + C - 1]);
			CHECK_EQ(e->has_parent, c > 0);
			if (c > 0)
				CHECK_EQ(e->parent, expect_hash(lp, c - 1));
		}
		CHECK(found);
	}
	CHECK(!s.gap);
	zmq_close(s.sock);
	CHECK_EQ(node_stop(&n), 0);
	t_rmtree(dir);
	free(dir);
}

/*
 * The disk tier removes chunks for capacity: BlockRemoved "STORAGE" for
 * exactly the chunks it dropped, so what the events say is on disk is what
 * the disk holds.
 */
static void test_disk_evict(void)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], args[800], cap[64];
	static struct sub s;
	struct view disk = { .n = 0 };
	struct node n;
	size_t removed = 0;

	REQUIRE(dir);
#ifndef KS_FAULT_INJECTION
	fprintf(stderr, "SKIP test_disk_evict: this build has no fault injection\n");
	t_rmtree(dir);
	free(dir);
	return;
#endif
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	snprintf(args, sizeof(args), "--pool-size=64M --kv-events-endpoint=%s --disk-path=%s/l2 "
		 "--disk-size-gb=1", ep, dir);
	/* Room for 6 chunk files of 4 MiB + header on the disk. */
	snprintf(cap, sizeof(cap), "tier_disk.capacity_bytes=%llu", 6ull * ((4ull << 20) + 512));
	setenv(KS_FAULT_ENV, cap, 1);
	node_start(&n, args);
	unsetenv(KS_FAULT_ENV);
	sub_open(&s, ep, "");
	for (int p = 0; p < 10; p++)
		REQUIRE(store_prompt(&n, 300 + p) == 0);
	sub_drain(&s, "", 600);
	for (size_t i = 0; i < s.nev; i++) {
		const struct ev *e = &s.evs[i];

		if (!strcmp(e->type, "AllBlocksCleared")) {
			disk.n = 0;
			continue;
		}
		if (strcmp(e->medium, "STORAGE"))
			continue;
		if (!strcmp(e->type, "BlockRemoved")) {
			CHECK(view_has(&disk, e->hash));	/* only what was announced there */
			removed++;
		}
		view_apply(&disk, e);
	}
	CHECK(removed > 0);
	CHECK_EQ(removed, t_stat(n.c, "l2_evictions"));
	CHECK_EQ(disk.n, t_stat(n.c, "l2_objects"));
	CHECK(disk.n <= 6);
	CHECK(!s.gap);
	zmq_close(s.sock);
	CHECK_EQ(node_stop(&n), 0);
	t_rmtree(dir);
	free(dir);
}

/* Send the 8-byte @req on @d; decode the reply into @s (batches, or -1 without an end). */
static int replay_raw(void *d, const uint8_t req[8], struct sub *s)
{
	uint64_t from = 0;

	for (int i = 0; i < 8; i++)
		from = from << 8 | req[i];
	return replay(d, from, s);
}

/*
 * A consumer that starts late: the buffer (4 batches) no longer reaches
 * back to 0, so a replay from 0 gets a snapshot: one batch, numbered as the
 * last one published, AllBlocksCleared then every cached block parents
 * first, rebuilding the view of a subscriber that saw everything; the word
 * "snapshot" asks for one at any time. After a restart, a replay from 0
 * starts with the new process's AllBlocksCleared.
 */
static void test_snapshot(void)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], rep[256], args[800];
	static struct sub s, rp;
	struct view full = { .n = 0 }, snap = { .n = 0 };
	struct node n;
	void *d;

	REQUIRE(dir);
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	snprintf(rep, sizeof(rep), "ipc://%s/replay", dir);
	snprintf(args, sizeof(args), "--pool-size=64M --kv-events-endpoint=%s "
		 "--kv-events-replay-endpoint=%s --kv-events-buffer=4", ep, rep);
	node_start(&n, args);
	sub_open(&s, ep, "");
	/* Stored one by one (one batch each at least), with evictions. */
	for (int p = 0; p < 8; p++) {
		REQUIRE(store_prompt(&n, 400 + p) == 0);
		sub_drain(&s, "", 100);
	}
	sub_drain(&s, "", 300);
	REQUIRE(s.nseq > 4);
	for (size_t i = 0; i < s.nev; i++)
		view_apply(&full, &s.evs[i]);
	CHECK(full.n > 0);
	d = zmq_socket(zctx, ZMQ_DEALER);
	REQUIRE(d && zmq_connect(d, rep) == 0);
	memset(&rp, 0, sizeof(rp));
	CHECK_EQ(replay(d, 0, &rp), 1);
	CHECK(rp.nseq == 1 && rp.seqs[0] == s.seqs[s.nseq - 1]);
	CHECK(rp.nev > 0 && !strcmp(rp.evs[0].type, "AllBlocksCleared"));
	CHECK_EQ(count_type(&rp, 0, "AllBlocksCleared"), 1);
	for (size_t i = 0; i < rp.nev; i++) {
		view_apply(&snap, &rp.evs[i]);
		/* parents first: a parent in the snapshot comes before its child */
		if (rp.evs[i].has_parent && view_has(&full, rp.evs[i].parent)) {
			bool before = false;

			for (size_t j = 1; j < i; j++)
				before |= rp.evs[j].hash == rp.evs[i].parent;
			CHECK(before);
		}
		if (i > 0) {
			CHECK(!strcmp(rp.evs[i].type, "BlockStored"));
			CHECK_EQ(rp.evs[i].ntokens, C);
		}
	}
	CHECK(view_equal(&full, &snap));
	CHECK_EQ(t_stat(n.c, "kv_events_snapshots"), 1);
	/* Within the buffer: the batches themselves, as before. */
	memset(&rp, 0, sizeof(rp));
	CHECK(replay(d, s.seqs[s.nseq - 2], &rp) >= 1);
	CHECK(rp.nseq > 0 && rp.seqs[0] == s.seqs[s.nseq - 2]);
	/* "snapshot": one whatever the start. */
	memset(&rp, 0, sizeof(rp));
	CHECK_EQ(replay_raw(d, (const uint8_t *)"snapshot", &rp), 1);
	memset(&snap, 0, sizeof(snap));
	for (size_t i = 0; i < rp.nev; i++)
		view_apply(&snap, &rp.evs[i]);
	CHECK(view_equal(&full, &snap));
	CHECK_EQ(t_stat(n.c, "kv_events_snapshots"), 2);
	zmq_close(d);
	CHECK_EQ(node_stop(&n), 0);

	/* A restart starts empty: batch 0 of the new process is AllBlocksCleared. */
	node_start(&n, args);
	d = zmq_socket(zctx, ZMQ_DEALER);
	REQUIRE(d && zmq_connect(d, rep) == 0);
	memset(&rp, 0, sizeof(rp));
	CHECK_EQ(replay(d, 0, &rp), 1);
	CHECK(rp.nseq == 1 && rp.seqs[0] == 0);
	CHECK(rp.nev == 1 && !strcmp(rp.evs[0].type, "AllBlocksCleared"));
	zmq_close(d);
	zmq_close(s.sock);
	CHECK_EQ(node_stop(&n), 0);
	t_rmtree(dir);
	free(dir);
}

/*
 * A salted key's objects are stored under "model@salt": the publisher puts
 * the salt in extra_keys of a prompt's first chunk, as vLLM does ([(salt,)]),
 * and nowhere else. Driven through the publisher itself (the C client
 * speaks the March dialect, which has no salt).
 */
static void test_salt(bool array_form)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], err[256];
	static struct sub s;
	struct kve *ev = NULL;
	uint32_t tok[PROMPT * C];
	uint8_t h[2][KS_HASH_LEN], none[KS_HASH_LEN];
	struct ks_key k0, k1, plain;

	REQUIRE(dir);
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	struct kve_config cfg = { .endpoint = ep, .topic = "t", .buffer_batches = 8,
				  .array_form = array_form };

	REQUIRE(kve_create(&cfg, &ev, err, sizeof(err)) == 0);
	sub_open(&s, ep, "t");
	s.array_form = array_form;
	prompt_tokens(9, tok);
	ks_none_hash(none);
	ks_hash_chunks(none, tok, 0, 2, C, h);
	REQUIRE(ks_key_init(&k0, h[0], "m@tenant-a", 10, ks_kv_rank(1, 0)) == 0);
	REQUIRE(ks_key_init(&k1, h[1], "m@tenant-a", 10, ks_kv_rank(1, 0)) == 0);
	REQUIRE(ks_key_init(&plain, h[0], "m", 1, ks_kv_rank(1, 0)) == 0);
	kve_stored(ev, &k0, NULL, tok, C, KVE_MEDIUM_CPU);
	kve_stored(ev, &k1, h[0], tok + C, C, KVE_MEDIUM_CPU);
	kve_stored(ev, &plain, NULL, tok, C, KVE_MEDIUM_CPU);
	sub_drain(&s, "t", 300);
	REQUIRE(s.nev == 3);
	CHECK(s.evs[0].has_extra && !strcmp(s.evs[0].salt, "tenant-a"));
	CHECK(!s.evs[1].has_extra);	/* not the first chunk */
	CHECK(!s.evs[2].has_extra);	/* no salt */
	CHECK_EQ(s.evs[1].parent, s.evs[0].hash);
	CHECK(s.evs[0].hash != s.evs[2].hash);	/* the salt is part of the identity */
	zmq_close(s.sock);
	kve_destroy(ev);
	t_rmtree(dir);
	free(dir);
}

/*
 * A publisher stuck on a batch: STOREs go on (they complete while nothing was
 * published), the full queue drops (counted), and the sequence shows the gap
 * once the publisher goes on.
 */
static void test_slow_publisher(void)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], args[600];
	static struct sub s;
	struct node n;
	uint64_t dt = 0;

	REQUIRE(dir);
#ifndef KS_FAULT_INJECTION
	fprintf(stderr, "SKIP test_slow_publisher: this build has no fault injection\n");
	t_rmtree(dir);
	free(dir);
	return;
#endif
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	snprintf(args, sizeof(args), "--pool-size=64M --kv-events-endpoint=%s", ep);
	/* The start's AllBlocksCleared is held SLOW_PUBLISHER_MS; 2 events fit
	 * in the queue. The checks below are only meaningful while it is held. */
	char faults[128];
	uint64_t t0 = t_now_ms();

	snprintf(faults, sizeof(faults), "kv_events.stall_ms=%d,kv_events.queue=2",
		 SLOW_PUBLISHER_MS);
	setenv(KS_FAULT_ENV, faults, 1);
	node_start(&n, args);
	unsetenv(KS_FAULT_ENV);
	sub_open(&s, ep, "");
	REQUIRE(store_prompt_ms(&n, 100, &dt) == 0);
	fprintf(stderr, "STORE with a stuck publisher: %" PRIu64 " ms\n", dt);
	/* It was answered while the publisher had sent nothing: it did not wait. */
	CHECK_EQ(t_stat(n.c, "kv_events_batches"), 0);
	CHECK(t_stat(n.c, "kv_events_dropped") > 0);
	if (t_now_ms() - t0 >= SLOW_PUBLISHER_MS)
		fprintf(stderr, "test_slow_publisher: start and STORE took %" PRIu64 " ms, longer "
			"than the %d ms stall: the checks above saw a publisher going again\n",
			t_now_ms() - t0, SLOW_PUBLISHER_MS);
	for (int p = 1; p < 6; p++)
		REQUIRE(store_prompt(&n, 100 + p) == 0);
	sub_drain(&s, "", SLOW_PUBLISHER_MS + 2000);
	CHECK(s.nseq >= 2);
	CHECK(s.gap);	/* the sequence says events were lost */
	CHECK(t_stat(n.c, "kv_events_next_seq") > t_stat(n.c, "kv_events_batches"));
	zmq_close(s.sock);
	CHECK_EQ(node_stop(&n), 0);
	t_rmtree(dir);
	free(dir);
}

/* Run kvstashd with @flag and @flag2: it must exit non-zero (no signal) saying @needle. */
static void bad_flag(const char *flag, const char *flag2, const char *needle)
{
	char *dir = t_mkdtemp("kvev");
	char listen[300], logp[300], buf[8192];
	pid_t pid;
	int st = 0, fd;
	ssize_t got;

	REQUIRE(dir);
	snprintf(listen, sizeof(listen), "--listen=ipc://%s/sock", dir);
	snprintf(logp, sizeof(logp), "%s/log", dir);
	pid = fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		fd = open(logp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
		}
		execl(t_build_path("kvstashd"), "kvstashd", listen, "--http-port=0",
		      "--pool-size=64M", flag, flag2, (char *)NULL);
		_exit(127);
	}
	REQUIRE(waitpid(pid, &st, 0) == pid);
	CHECK(WIFEXITED(st));
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) != 0 && WEXITSTATUS(st) != 127);
	fd = open(logp, O_RDONLY);
	REQUIRE(fd >= 0);
	got = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[got > 0 ? got : 0] = 0;
	if (!strstr(buf, needle)) {
		fprintf(stderr, "FAIL: %s: no '%s' in:\n%s\n", flag, needle, buf);
		t_failures++;
	}
	t_rmtree(dir);
	free(dir);
}

/* --kv-events-format=array: the same events, positional, as array_like vLLM releases send. */
static void test_array_form(void)
{
	char *dir = t_mkdtemp("kvev");
	char ep[256], args[600];
	static struct sub s;
	struct node n;
	uint32_t tok[PROMPT * C];

	REQUIRE(dir);
	snprintf(ep, sizeof(ep), "ipc://%s/ev", dir);
	snprintf(args, sizeof(args), "--pool-size=64M --kv-events-endpoint=%s "
		 "--kv-events-format=array", ep);
	node_start(&n, args);
	sub_open(&s, ep, "");
	s.array_form = true;
	REQUIRE(store_prompt(&n, 0) == 0);
	sub_drain(&s, "", 300);
	CHECK_EQ(count_type(&s, 0, "BlockStored"), PROMPT);
	prompt_tokens(0, tok);
	for (size_t i = 0; i < s.nev && i < PROMPT; i++) {
		const struct ev *e = &s.evs[i];

		CHECK_EQ(e->hash, expect_hash(0, (int)i));
		CHECK_EQ(e->has_parent, i > 0);
		if (i > 0)
			CHECK_EQ(e->parent, expect_hash(0, (int)i - 1));
		CHECK_EQ(e->block_size, C);
		CHECK_EQ(e->tok0, tok[i * C]);
		CHECK(!strcmp(e->medium, "CPU"));
	}
	size_t mark = s.nev;

	REQUIRE(kvstash_clear(n.c) == 0);
	sub_drain(&s, "", 300);
	CHECK_EQ(count_type(&s, mark, "AllBlocksCleared"), 1);
	zmq_close(s.sock);
	CHECK_EQ(node_stop(&n), 0);
	t_rmtree(dir);
	free(dir);
}

int main(void)
{
	zctx = zmq_ctx_new();
	REQUIRE(zctx);
	bad_flag("--kv-events-endpoint=bogus://nowhere", "--log-level=info",
		 "--kv-events-endpoint bogus://nowhere");
	bad_flag("--kv-events-endpoint=tcp://*:notaport", "--log-level=info",
		 "--kv-events-endpoint tcp://*:notaport");
	bad_flag("--kv-events-endpoint=ipc:///nonexistent-dir/x/ev", "--log-level=info",
		 "--kv-events-endpoint");
	bad_flag("--kv-events-endpoint=tcp://127.0.0.1:1", "--kv-events-replay-endpoint=nonsense",
		 "--kv-events-replay-endpoint nonsense");
	bad_flag("--kv-events-replay-endpoint=tcp://127.0.0.1:0", "--log-level=info",
		 "needs --kv-events-endpoint");
	test_salt(false);
	test_salt(true);
	test_events();
	test_disk();
	test_disk_evict();
	test_snapshot();
	test_slow_publisher();
	test_array_form();
	zmq_ctx_term(zctx);
	return t_result("kv_events");
}
