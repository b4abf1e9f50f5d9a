/*
 * kv_events.c - KV cache events in vLLM's ZMQ format: the bounded report
 * queue, the publisher thread, the replay buffer and the ROUTER that serves
 * it (docs/kv-events.md).
 *
 * Threads: kve_stored/kve_removed/kve_cleared on any thread (transfer
 * workers, the evicting thread inside the index eviction hook, the io
 * thread); they allocate the report with no lock held and only link it in
 * under kve->lock. publisher_main owns both ZMQ sockets, the sequence
 * counter and the replay buffer (no lock: only it touches them); sockets
 * bound in kve_create are handed to it by pthread_create (a full barrier).
 *
 * Lock order (the tree is in lock.h): kve->lock (KV_EVENTS 55) is a leaf
 * but for the log ring. The reporting side takes it holding no index, LRU,
 * pool or tier lock (the eviction hook runs with none held); the publisher
 * holds it only to move queued reports to its own list, never across ZMQ
 * I/O or msgpack encoding. Its one wait is ks_cond_wait_ms with a timeout.
 */
#include "kv_events.h"

#include <errno.h>
#include <inttypes.h>
#include <msgpack.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "compiler.h"
#include "lock.h"
#include "log.h"

#define KVE_QUEUE_DEFAULT 65536u
/* Reports per batch at most: a batch is one ZMQ message. */
#define KVE_BATCH_MAX 1024u
/* The publisher wakes at least this often (replay requests, stop). */
#define KVE_WAIT_MS 20u
#define KVE_DRAIN_MS 1000u
/* The replay buffer also keeps at most this many payload bytes (oldest go first). */
#define KVE_RING_BYTES_MAX (256ull << 20)

/*
 * KVE_STORED with medium DISK carries no tokens: the publisher takes them
 * from its block table (the chunk's CPU BlockStored). KVE_REMOVED of CPU
 * with demoting set keeps the table entry until KVE_STORED DISK or
 * KVE_DEMOTE_FAILED says how the demotion ended.
 */
enum kve_type { KVE_STORED = 0, KVE_REMOVED, KVE_CLEARED, KVE_DEMOTE_FAILED };

struct kve_report {
	struct kve_report *next;
	uint8_t type;		/* enum kve_type */
	uint8_t medium;		/* enum kve_medium */
	bool has_parent;
	bool demoting;
	uint8_t salt_len;	/* cache_salt bytes after the tokens (a prompt's first chunk) */
	uint64_t hash, parent;
	uint32_t ntokens;
	uint32_t tokens[];	/* [ntokens], then salt_len bytes of cache_salt */
};

/*
 * What the publisher knows of one announced block: its tokens and parent
 * (to announce it again in another medium, or after a CLEAR of the pool)
 * and the mediums it is in. Publisher thread only.
 */
struct kve_block {
	struct kve_block *next;
	uint64_t hash, parent;
	bool has_parent, cpu, disk;
	uint8_t salt_len;
	uint32_t pending;	/* demotions under way */
	uint64_t walk;		/* the table walk that last emitted it (emit_table) */
	uint32_t ntokens;
	uint32_t tokens[];	/* [ntokens], then salt_len bytes of cache_salt */
};

/* The cache_salt kept after the tokens of a report or block. */
#define SALT_OF(x) ((const char *)((x)->tokens + (x)->ntokens))

#define KVE_TABLE_BUCKETS 65536u

struct kve_batch {
	uint64_t seq;
	size_t len;
	char *data;		/* msgpack payload; owned */
};

struct kve {
	struct ks_mutex lock;
	struct ks_cond cond;
	struct kve_report *head GUARDED_BY(lock), *tail GUARDED_BY(lock);
	uint32_t queued GUARDED_BY(lock);
	uint32_t dropped_pending GUARDED_BY(lock);	/* drops since the last drain */
	bool stop GUARDED_BY(lock);
	uint32_t queue_max;

	/* Publisher thread only. */
	void *zctx, *pub, *replay;
	char *topic;
	size_t topic_len;
	bool array_form;	/* positional encoding (array_like structs), else maps */
	uint64_t seq;
	struct kve_block **table;	/* [KVE_TABLE_BUCKETS] announced blocks */
	uint64_t walks;			/* emit_table walks so far */
	struct kve_block **chain;	/* emit_table's scratch: a block and its unemitted ancestors */
	size_t chain_cap;
	uint32_t carry_dropped;	/* drops not yet shown by a sequence gap */
	struct kve_batch *ring;	/* [buffer] replay buffer, oldest at ring_head */
	uint32_t ring_cap, ring_head, ring_len;
	uint64_t ring_bytes;
	uint64_t stall_ms;
	pthread_t thread;
	bool started;

	_Atomic uint64_t n_queued, n_dropped, n_published, n_batches, n_send_failed;
	_Atomic uint64_t n_replays, n_replay_bad, n_snapshots, next_seq;
};

/*
 * vLLM's medium names: CPULoadStoreSpec.medium() is "CPU"; its file-system
 * tier's spec says "STORAGE" (vLLM 0.27 on; 0.26 said "FS"). Dynamo maps
 * "CPU" to its host tier and "STORAGE" to its disk tier; llm-d keeps the
 * lowercased name as the device tier.
 */
static const char *const medium_name[] = { "CPU", "STORAGE" };

static uint64_t load_be64(const uint8_t *p)
{
	uint64_t v = 0;

	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

static void store_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

/*
 * The low 64 bits of the chunk's BLAKE3 prefix hash (as vLLM publishes the
 * low 64 bits of its block hash), mixed with the model name and kv_rank so
 * that each published block is exactly one kvstash object.
 */
uint64_t kve_block_hash(const struct ks_key *k, const uint8_t chunk_hash[KS_HASH_LEN])
{
	uint64_t h = 0xcbf29ce484222325ull;	/* FNV-1a over model and rank */

	for (size_t i = 0; i < k->model_len; i++)
		h = (h ^ (uint8_t)k->model[i]) * 0x100000001b3ull;
	for (int i = 0; i < 4; i++)
		h = (h ^ ((k->kv_rank >> (8 * i)) & 0xff)) * 0x100000001b3ull;
	return load_be64(chunk_hash + KS_HASH_LEN - 8) ^ h;
}

static void enqueue(struct kve *ev, struct kve_report *r)
{
	bool ok = false;

	if (!r) {
		atomic_fetch_add_explicit(&ev->n_dropped, 1, memory_order_relaxed);
		if (ks_lock(&ev->lock) == 0) {
			ev->dropped_pending++;
			ks_unlock(&ev->lock);
		}
		return;
	}
	r->next = NULL;
	if (ks_lock(&ev->lock) == 0) {
		if (ev->queued < ev->queue_max && !ev->stop) {
			if (ev->tail)
				ev->tail->next = r;
			else
				ev->head = r;
			ev->tail = r;
			ev->queued++;
			ok = true;
		} else {
			ev->dropped_pending++;
		}
		ks_unlock(&ev->lock);
	}
	if (ok) {
		atomic_fetch_add_explicit(&ev->n_queued, 1, memory_order_relaxed);
		ks_cond_signal(&ev->cond);
	} else {
		atomic_fetch_add_explicit(&ev->n_dropped, 1, memory_order_relaxed);
		free(r);
	}
}

static void report_key(struct kve *ev, const struct ks_key *k, uint8_t type, uint8_t medium,
		       bool demoting);

void kve_stored(struct kve *ev, const struct ks_key *k, const uint8_t *parent,
		const uint32_t *tokens, uint32_t ntokens, enum kve_medium medium)
{
	struct kve_report *r;
	const char *at;
	size_t salt_len = 0;

	if (!ev)
		return;
	/*
	 * A salted key's objects are stored under "model@salt" ('@' is in
	 * neither name). vLLM mixes the salt into the hash of a prompt's first
	 * block only, and publishes it there in extra_keys: so does kvstashd.
	 */
	at = parent ? NULL : memchr(k->model, '@', k->model_len);
	if (at)
		salt_len = KS_MIN((size_t)(k->model + k->model_len - at - 1), (size_t)UINT8_MAX);
	r = malloc(sizeof(*r) + (size_t)ntokens * sizeof(uint32_t) + salt_len);
	if (r) {
		r->type = KVE_STORED;
		r->medium = (uint8_t)medium;
		r->demoting = false;
		r->hash = kve_block_hash(k, k->chunk_hash);
		r->has_parent = parent != NULL;
		r->parent = parent ? kve_block_hash(k, parent) : 0;
		r->ntokens = ntokens;
		r->salt_len = (uint8_t)salt_len;
		if (ntokens)
			memcpy(r->tokens, tokens, (size_t)ntokens * sizeof(uint32_t));
		if (salt_len)
			memcpy(r->tokens + ntokens, at + 1, salt_len);
	}
	enqueue(ev, r);
}

void kve_removed(struct kve *ev, const struct ks_key *k, enum kve_medium medium)
{
	if (!ev)
		return;
	report_key(ev, k, KVE_REMOVED, (uint8_t)medium, false);
}

static void report_key(struct kve *ev, const struct ks_key *k, uint8_t type, uint8_t medium,
		       bool demoting)
{
	struct kve_report *r = malloc(sizeof(*r));

	if (r) {
		memset(r, 0, sizeof(*r));
		r->type = type;
		r->medium = medium;
		r->demoting = demoting;
		r->hash = kve_block_hash(k, k->chunk_hash);
	}
	enqueue(ev, r);
}

void kve_demoting(struct kve *ev, const struct ks_key *k)
{
	if (ev)
		report_key(ev, k, KVE_REMOVED, KVE_MEDIUM_CPU, true);
}

void kve_demoted(struct kve *ev, const struct ks_key *k, bool ok)
{
	if (ev)
		report_key(ev, k, ok ? KVE_STORED : KVE_DEMOTE_FAILED, KVE_MEDIUM_DISK, false);
}

void kve_cleared(struct kve *ev)
{
	struct kve_report *r;

	if (!ev)
		return;
	r = malloc(sizeof(*r));
	if (r) {
		memset(r, 0, sizeof(*r));
		r->type = KVE_CLEARED;
	}
	enqueue(ev, r);
}

/* ---- encoding (publisher thread) ---- */

static void pack_str(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);

	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s, n);
}

/*
 * Events are packed as vLLM's msgspec encodes its tagged structs
 * (omit_defaults). Map form (vLLM main): a map whose "type" is the class
 * name, then the fields in declaration order; fields without a default are
 * always present, defaulted ones only when set. Array form (vLLM releases
 * whose structs are array_like=True): the class name, then the same fields
 * by position; a decoder with fewer fields ignores the trailing ones.
 */
static void pack_event_head(msgpack_packer *pk, bool array_form, const char *type,
			    uint32_t nfields)
{
	if (array_form) {
		msgpack_pack_array(pk, 1 + nfields);
	} else {
		msgpack_pack_map(pk, 1 + nfields);
		pack_str(pk, "type");
	}
	pack_str(pk, type);
}

/* The name of the next field, in the map form only. */
static void pack_field(msgpack_packer *pk, bool array_form, const char *name)
{
	if (!array_form)
		pack_str(pk, name);
}

/*
 * BlockStored. extra_keys (vLLM's per-block tuple of what else went into
 * the block's hash) is sent for a salted prompt's first chunk only, as
 * [(salt,)]: left out otherwise, as vLLM's omit_defaults leaves out None,
 * which also keeps the positional form at the 8 fields decoders written
 * before extra_keys existed insist on.
 */
static void pack_stored(msgpack_packer *pk, bool array_form, uint64_t hash, bool has_parent,
			uint64_t parent, const uint32_t *tokens, uint32_t ntokens, uint8_t medium,
			const char *salt, uint8_t salt_len)
{
	pack_event_head(pk, array_form, "BlockStored", salt_len ? 8 : 7);
	pack_field(pk, array_form, "block_hashes");
	msgpack_pack_array(pk, 1);
	msgpack_pack_uint64(pk, hash);
	pack_field(pk, array_form, "parent_block_hash");
	if (has_parent)
		msgpack_pack_uint64(pk, parent);
	else
		msgpack_pack_nil(pk);
	pack_field(pk, array_form, "token_ids");
	msgpack_pack_array(pk, ntokens);
	for (uint32_t t = 0; t < ntokens; t++)
		msgpack_pack_uint32(pk, tokens[t]);
	pack_field(pk, array_form, "block_size");
	msgpack_pack_uint32(pk, ntokens);	/* one block = one whole chunk */
	pack_field(pk, array_form, "lora_id");
	msgpack_pack_nil(pk);
	pack_field(pk, array_form, "medium");
	pack_str(pk, medium_name[medium]);
	pack_field(pk, array_form, "lora_name");
	msgpack_pack_nil(pk);	/* an LMCache key names no LoRA adapter */
	if (salt_len) {
		pack_field(pk, array_form, "extra_keys");
		msgpack_pack_array(pk, 1);	/* one entry per block hash */
		msgpack_pack_array(pk, 1);	/* the tuple (cache_salt,) */
		msgpack_pack_str(pk, salt_len);
		msgpack_pack_str_body(pk, salt, salt_len);
	}
}

static void pack_block(struct kve *ev, msgpack_packer *pk, const struct kve_block *b,
		       uint8_t medium)
{
	pack_stored(pk, ev->array_form, b->hash, b->has_parent, b->parent, b->tokens, b->ntokens,
		    medium, SALT_OF(b), b->salt_len);
}

static void pack_removed(msgpack_packer *pk, bool array_form, uint64_t hash, uint8_t medium)
{
	pack_event_head(pk, array_form, "BlockRemoved", 2);
	pack_field(pk, array_form, "block_hashes");
	msgpack_pack_array(pk, 1);
	msgpack_pack_uint64(pk, hash);
	pack_field(pk, array_form, "medium");
	pack_str(pk, medium_name[medium]);
}

static struct kve_block **table_slot(struct kve *ev, uint64_t hash)
{
	struct kve_block **p = &ev->table[(hash ^ hash >> 29) & (KVE_TABLE_BUCKETS - 1)];

	while (*p && (*p)->hash != hash)
		p = &(*p)->next;
	return p;
}

/* Forget @*p if no medium holds it and no demotion is under way. */
static void table_release(struct kve_block **p)
{
	struct kve_block *b = *p;

	if (b && !b->cpu && !b->disk && !b->pending) {
		*p = b->next;
		free(b);
	}
}

/*
 * Emit @b's unemitted ancestors in the table, oldest first, then @b:
 * BlockStored for each medium it is in. Returns the events packed.
 */
static uint32_t emit_chain(struct kve *ev, msgpack_packer *pk, struct kve_block *b)
{
	size_t n = 0;
	uint32_t events = 0;

	/* Walk up to the first ancestor already emitted or not in the table. */
	while (b && b->walk != ev->walks) {
		if (n == ev->chain_cap) {
			size_t cap = ev->chain_cap ? 2 * ev->chain_cap : 256;
			struct kve_block **c = realloc(ev->chain, cap * sizeof(*c));

			if (!c)
				break;	/* out of memory: what is collected still goes out */
			ev->chain = c;
			ev->chain_cap = cap;
		}
		b->walk = ev->walks;
		ev->chain[n++] = b;
		b = b->has_parent ? *table_slot(ev, b->parent) : NULL;
	}
	while (n--) {
		struct kve_block *c = ev->chain[n];

		if (c->cpu) {
			pack_block(ev, pk, c, KVE_MEDIUM_CPU);
			events++;
		}
		if (c->disk) {
			pack_block(ev, pk, c, KVE_MEDIUM_DISK);
			events++;
		}
	}
	return events;
}

/*
 * BlockStored for every block the table holds in a medium, each after its
 * parent (a router's prefix tree drops a block whose parent it has not
 * seen). Returns the events packed.
 */
static uint32_t emit_table(struct kve *ev, msgpack_packer *pk)
{
	uint32_t n = 0;

	ev->walks++;
	for (uint32_t i = 0; i < KVE_TABLE_BUCKETS; i++)
		for (struct kve_block *b = ev->table[i]; b; b = b->next)
			n += emit_chain(ev, pk, b);
	return n;
}

/* Pack what report @r means for consumers; returns the number of events. */
static uint32_t apply(struct kve *ev, msgpack_packer *pk, const struct kve_report *r)
{
	struct kve_block **p, *b;
	uint32_t n = 0;

	switch (r->type) {
	case KVE_STORED:
		p = table_slot(ev, r->hash);
		b = *p;
		if (r->medium == KVE_MEDIUM_CPU) {
			if (!b) {
				size_t tb = (size_t)r->ntokens * sizeof(uint32_t);

				b = malloc(sizeof(*b) + tb + r->salt_len);
				if (b) {
					*b = (struct kve_block){ .hash = r->hash, .parent = r->parent,
								 .has_parent = r->has_parent,
								 .salt_len = r->salt_len,
								 .ntokens = r->ntokens };
					memcpy(b->tokens, r->tokens, tb + r->salt_len);
					*p = b;
				}
			}
			if (b)
				b->cpu = true;
			pack_stored(pk, ev->array_form, r->hash, r->has_parent, r->parent,
				    r->tokens, r->ntokens, KVE_MEDIUM_CPU, SALT_OF(r), r->salt_len);
			return 1;
		}
		/* Demoted to disk: announced with the tokens kept from its CPU store. */
		if (!b)
			return 0;
		if (b->pending)
			b->pending--;
		if (!b->disk) {
			b->disk = true;
			pack_block(ev, pk, b, KVE_MEDIUM_DISK);
			n = 1;
		}
		return n;
	case KVE_DEMOTE_FAILED:
		p = table_slot(ev, r->hash);
		if (*p && (*p)->pending)
			(*p)->pending--;
		table_release(p);
		return 0;
	case KVE_REMOVED:
		p = table_slot(ev, r->hash);
		b = *p;
		if (r->medium == KVE_MEDIUM_CPU) {
			if (b) {
				b->cpu = false;
				b->pending += r->demoting;
				table_release(p);
			}
			pack_removed(pk, ev->array_form, r->hash, KVE_MEDIUM_CPU);
			return 1;
		}
		/* Leaving the disk: only what was announced there. */
		if (!b || !b->disk)
			return 0;
		b->disk = false;
		table_release(p);
		pack_removed(pk, ev->array_form, r->hash, KVE_MEDIUM_DISK);
		return 1;
	default:
		/* The pool is empty; what is on disk stays, announced again. */
		pack_event_head(pk, ev->array_form, "AllBlocksCleared", 0);
		for (uint32_t i = 0; i < KVE_TABLE_BUCKETS; i++) {
			p = &ev->table[i];
			while (*p) {
				b = *p;
				b->cpu = false;
				if (!b->disk && !b->pending) {
					*p = b->next;
					free(b);
				} else {
					p = &b->next;
				}
			}
		}
		return 1 + emit_table(ev, pk);
	}
}

/* Keep @data (taken over) as batch @seq; the oldest go when full (batches or bytes). */
static void ring_push(struct kve *ev, uint64_t seq, char *data, size_t len)
{
	uint32_t pos;

	while (ev->ring_len && (ev->ring_len == ev->ring_cap ||
				ev->ring_bytes + len > KVE_RING_BYTES_MAX)) {
		ev->ring_bytes -= ev->ring[ev->ring_head].len;
		free(ev->ring[ev->ring_head].data);
		ev->ring_head = (ev->ring_head + 1) % ev->ring_cap;
		ev->ring_len--;
	}
	pos = (ev->ring_head + ev->ring_len) % ev->ring_cap;
	ev->ring[pos] = (struct kve_batch){ .seq = seq, .len = len, .data = data };
	ev->ring_len++;
	ev->ring_bytes += len;
}

/*
 * The batch around @n packed events in @body: EventBatch(ts, events,
 * data_parallel_rank), positional in every vLLM release (array_like, also
 * once events became maps), into @sb (initialised here).
 */
static void pack_batch(msgpack_sbuffer *sb, const msgpack_sbuffer *body, uint32_t n)
{
	msgpack_packer pk;
	struct timespec ts;

	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	clock_gettime(CLOCK_REALTIME, &ts);
	msgpack_pack_array(&pk, 3);
	msgpack_pack_double(&pk, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
	msgpack_pack_array(&pk, n);
	msgpack_sbuffer_write(sb, body->data, body->size);
	msgpack_pack_int(&pk, 0);	/* data_parallel_rank: one stream per kvstashd */
}

static void publish(struct kve *ev, struct kve_report *list, uint32_t dropped)
{
	msgpack_sbuffer body, sb;
	msgpack_packer bpk;
	uint8_t seqb[8];
	uint32_t n = 0;
	int rc;

	msgpack_sbuffer_init(&body);
	msgpack_packer_init(&bpk, &body, msgpack_sbuffer_write);
	for (struct kve_report *r = list; r; r = r->next)
		n += apply(ev, &bpk, r);
	ev->carry_dropped += dropped;
	if (!n) {
		msgpack_sbuffer_destroy(&body);
		return;
	}
	if (ev->carry_dropped) {
		ev->seq++;	/* a number no batch carries: the consumer sees the gap */
		ev->carry_dropped = 0;
	}
	pack_batch(&sb, &body, n);
	msgpack_sbuffer_destroy(&body);
	store_be64(seqb, ev->seq);
	rc = zmq_send(ev->pub, ev->topic, ev->topic_len, ZMQ_SNDMORE | ZMQ_DONTWAIT);
	if (rc >= 0)
		rc = zmq_send(ev->pub, seqb, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT);
	if (rc >= 0)
		rc = zmq_send(ev->pub, sb.data, sb.size, ZMQ_DONTWAIT);
	if (rc < 0)
		atomic_fetch_add_explicit(&ev->n_send_failed, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&ev->n_published, n, memory_order_relaxed);
	atomic_fetch_add_explicit(&ev->n_batches, 1, memory_order_relaxed);
	ring_push(ev, ev->seq, sb.data, sb.size);	/* takes the buffer */
	ev->seq++;
	atomic_store_explicit(&ev->next_seq, ev->seq, memory_order_relaxed);
}

/* [identity, "", seq, payload] to a replay peer; false if ZMQ refused (peer gone or full). */
static bool replay_send(struct kve *ev, const uint8_t *id, size_t idn, const uint8_t seqb[8],
			const void *data, size_t len)
{
	return zmq_send(ev->replay, id, idn, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
	       zmq_send(ev->replay, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
	       zmq_send(ev->replay, seqb, 8, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0 &&
	       zmq_send(ev->replay, data, len, ZMQ_DONTWAIT) >= 0;
}

/*
 * The snapshot: one batch, AllBlocksCleared then BlockStored for every
 * block in each medium it is in now (parents first), numbered as the last
 * batch published (the view it gives is the one after that batch; the live
 * stream goes on from the next number). One batch, so that a consumer that
 * skips a sequence number it has seen applies all of it or none.
 */
static bool send_snapshot(struct kve *ev, const uint8_t *id, size_t idn)
{
	msgpack_sbuffer body, sb;
	msgpack_packer pk;
	uint8_t seqb[8];
	uint32_t n;
	bool ok;

	msgpack_sbuffer_init(&body);
	msgpack_packer_init(&pk, &body, msgpack_sbuffer_write);
	pack_event_head(&pk, ev->array_form, "AllBlocksCleared", 0);
	n = 1 + emit_table(ev, &pk);
	pack_batch(&sb, &body, n);
	msgpack_sbuffer_destroy(&body);
	store_be64(seqb, ev->seq - 1);
	ok = replay_send(ev, id, idn, seqb, sb.data, sb.size);
	msgpack_sbuffer_destroy(&sb);
	atomic_fetch_add_explicit(&ev->n_snapshots, 1, memory_order_relaxed);
	return ok;
}

/* The 8-byte request that asks for a snapshot whatever the buffer holds. */
static const uint8_t snapshot_req[8] = { 's', 'n', 'a', 'p', 's', 'h', 'o', 't' };

/*
 * One replay request: [identity, "", start seq (8 bytes big-endian)] gets
 * [identity, "", seq, payload] for every kept batch from there, then
 * [identity, "", -1, ""]. A start older than the oldest kept batch (the
 * buffer no longer reaches back to it), or the word "snapshot", gets the
 * snapshot instead of the batches (send_snapshot), then the end marker.
 * Anything else is read, counted and not answered.
 */
static void serve_replay(struct kve *ev)
{
	static const uint8_t end_seq[8] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	uint8_t id[256], delim[8], start[8];
	int idn = -1, dn = -1, sn = -1, nframes = 0, more = 1;
	size_t more_len = sizeof(more);

	while (more) {
		uint8_t scratch[16];
		int n;

		if (nframes == 0)
			n = idn = zmq_recv(ev->replay, id, sizeof(id), ZMQ_DONTWAIT);
		else if (nframes == 1)
			n = dn = zmq_recv(ev->replay, delim, sizeof(delim), ZMQ_DONTWAIT);
		else if (nframes == 2)
			n = sn = zmq_recv(ev->replay, start, sizeof(start), ZMQ_DONTWAIT);
		else
			n = zmq_recv(ev->replay, scratch, sizeof(scratch), ZMQ_DONTWAIT);
		if (n < 0)
			return;
		nframes++;
		if (zmq_getsockopt(ev->replay, ZMQ_RCVMORE, &more, &more_len))
			return;
	}
	if (nframes != 3 || idn <= 0 || idn > (int)sizeof(id) || dn != 0 || sn != 8) {
		atomic_fetch_add_explicit(&ev->n_replay_bad, 1, memory_order_relaxed);
		return;
	}
	uint64_t from = load_be64(start);
	const struct kve_batch *oldest = ev->ring_len ? &ev->ring[ev->ring_head] : NULL;
	bool snapshot = !memcmp(start, snapshot_req, 8) || (oldest && from < oldest->seq);

	atomic_fetch_add_explicit(&ev->n_replays, 1, memory_order_relaxed);
	if (snapshot && ev->seq > 0) {
		if (!send_snapshot(ev, id, (size_t)idn))
			return;	/* the peer is gone or not reading: give up on it */
	} else if (!snapshot) {
		for (uint32_t i = 0; i < ev->ring_len; i++) {
			const struct kve_batch *b = &ev->ring[(ev->ring_head + i) % ev->ring_cap];
			uint8_t seqb[8];

			if (b->seq < from)
				continue;
			store_be64(seqb, b->seq);
			if (!replay_send(ev, id, (size_t)idn, seqb, b->data, b->len))
				return;
		}
	}
	replay_send(ev, id, (size_t)idn, end_seq, "", 0);
}

static void poll_replay(struct kve *ev)
{
	zmq_pollitem_t it = { .socket = ev->replay, .events = ZMQ_POLLIN };

	for (int i = 0; i < 64 && ev->replay && zmq_poll(&it, 1, 0) > 0 &&
			(it.revents & ZMQ_POLLIN); i++)
		serve_replay(ev);
}

static void free_list(struct kve_report *r)
{
	while (r) {
		struct kve_report *next = r->next;

		free(r);
		r = next;
	}
}

/* Test hook: hold the first batch back for stall_ms (until kve_destroy at most). */
static void stall(struct kve *ev)
{
	const uint64_t end = ks_now_ms() + ev->stall_ms;
	const struct timespec step = { 0, 10 * 1000000L };
	bool stop = false;

	ev->stall_ms = 0;
	while (!stop && ks_now_ms() < end) {
		nanosleep(&step, NULL);
		if (ks_lock(&ev->lock) == 0) {
			stop = ev->stop;
			ks_unlock(&ev->lock);
		}
	}
}

static void *publisher_main(void *arg)
{
	struct kve *ev = arg;

	pthread_setname_np(pthread_self(), "kv-events");
	for (;;) {
		struct kve_report *list = NULL, *last = NULL;
		uint32_t n = 0, dropped = 0;
		bool stop;

		poll_replay(ev);
		if (ks_lock(&ev->lock))
			continue;
		if (!ev->head && !ev->stop)
			(void)ks_cond_wait_ms(&ev->cond, &ev->lock, KVE_WAIT_MS);
		while (ev->head && n < KVE_BATCH_MAX) {
			struct kve_report *r = ev->head;

			ev->head = r->next;
			if (!ev->head)
				ev->tail = NULL;
			r->next = NULL;
			if (last)
				last->next = r;
			else
				list = r;
			last = r;
			n++;
		}
		ev->queued -= n;
		if (n) {
			dropped = ev->dropped_pending;
			ev->dropped_pending = 0;
		}
		stop = ev->stop && !ev->head;
		ks_unlock(&ev->lock);
		if (n) {
			if (ev->stall_ms)
				stall(ev);
			publish(ev, list, dropped);
			free_list(list);
		}
		if (stop)
			break;
	}
	return NULL;
}

/* vLLM's rule: bind a wildcard or local transport, connect to anything else. */
static bool binds(const char *ep)
{
	return strchr(ep, '*') || strstr(ep, "::") || !strncmp(ep, "ipc://", 6) ||
	       !strncmp(ep, "inproc://", 9);
}

static void kve_free(struct kve *ev)
{
	if (ev->pub)
		zmq_close(ev->pub);
	if (ev->replay)
		zmq_close(ev->replay);
	if (ev->zctx)
		zmq_ctx_term(ev->zctx);
	for (uint32_t i = 0; ev->ring && i < ev->ring_len; i++)
		free(ev->ring[(ev->ring_head + i) % ev->ring_cap].data);
	free(ev->ring);
	for (uint32_t i = 0; ev->table && i < KVE_TABLE_BUCKETS; i++)
		while (ev->table[i]) {
			struct kve_block *b = ev->table[i];

			ev->table[i] = b->next;
			free(b);
		}
	free(ev->table);
	free(ev->chain);
	free(ev->topic);
	free_list(ev->head);
	ks_cond_destroy(&ev->cond);
	ks_mutex_destroy(&ev->lock);
	free(ev);
}

int kve_create(const struct kve_config *cfg, struct kve **out, char *err, size_t errlen)
{
	struct kve *ev;
	int linger = 0, hwm = 100000, rc;

	if (!cfg->endpoint || !*cfg->endpoint || !cfg->buffer_batches) {
		snprintf(err, errlen, "kv events: an endpoint and a buffer of at least 1 batch");
		return -EINVAL;
	}
	ev = calloc(1, sizeof(*ev));
	if (!ev) {
		snprintf(err, errlen, "kv events: out of memory");
		return -ENOMEM;
	}
	rc = ks_mutex_init(&ev->lock, LOCK_RANK_KV_EVENTS, "kv events queue");
	if (rc) {
		free(ev);
		snprintf(err, errlen, "kv events: %s", strerror(-rc));
		return rc;
	}
	rc = ks_cond_init(&ev->cond);
	if (rc) {
		ks_mutex_destroy(&ev->lock);
		free(ev);
		snprintf(err, errlen, "kv events: %s", strerror(-rc));
		return rc;
	}
	ev->queue_max = cfg->queue_events ? cfg->queue_events : KVE_QUEUE_DEFAULT;
	ev->stall_ms = cfg->stall_ms;
	ev->ring_cap = cfg->buffer_batches;
	ev->ring = calloc(ev->ring_cap, sizeof(*ev->ring));
	ev->table = calloc(KVE_TABLE_BUCKETS, sizeof(*ev->table));
	ev->topic = strdup(cfg->topic ? cfg->topic : "");
	ev->zctx = zmq_ctx_new();
	if (!ev->ring || !ev->table || !ev->topic || !ev->zctx) {
		rc = -ENOMEM;
		snprintf(err, errlen, "kv events: out of memory");
		goto fail;
	}
	ev->topic_len = strlen(ev->topic);
	ev->array_form = cfg->array_form;
	ev->pub = zmq_socket(ev->zctx, ZMQ_PUB);
	if (!ev->pub) {
		rc = -zmq_errno();
		snprintf(err, errlen, "kv events: PUB socket: %s", zmq_strerror(-rc));
		goto fail;
	}
	zmq_setsockopt(ev->pub, ZMQ_LINGER, &linger, sizeof(linger));
	zmq_setsockopt(ev->pub, ZMQ_SNDHWM, &hwm, sizeof(hwm));
	if ((binds(cfg->endpoint) ? zmq_bind(ev->pub, cfg->endpoint) :
				    zmq_connect(ev->pub, cfg->endpoint)) < 0) {
		rc = -zmq_errno();
		snprintf(err, errlen, "kv events: cannot %s --kv-events-endpoint %s: %s",
			 binds(cfg->endpoint) ? "bind" : "connect", cfg->endpoint,
			 zmq_strerror(-rc));
		goto fail;
	}
	if (cfg->replay_endpoint && *cfg->replay_endpoint) {
		int64_t maxmsg64 = 4096;	/* a request is 8 bytes */

		ev->replay = zmq_socket(ev->zctx, ZMQ_ROUTER);
		if (!ev->replay) {
			rc = -zmq_errno();
			snprintf(err, errlen, "kv events: ROUTER socket: %s", zmq_strerror(-rc));
			goto fail;
		}
		/* Room for a whole replay per peer: past the high-water mark a ROUTER
		 * drops silently, and the end marker would be lost. */
		int rhwm = (int)KS_MIN((uint64_t)cfg->buffer_batches + 16, (uint64_t)INT32_MAX);

		zmq_setsockopt(ev->replay, ZMQ_LINGER, &linger, sizeof(linger));
		zmq_setsockopt(ev->replay, ZMQ_MAXMSGSIZE, &maxmsg64, sizeof(maxmsg64));
		zmq_setsockopt(ev->replay, ZMQ_SNDHWM, &rhwm, sizeof(rhwm));
		if (zmq_bind(ev->replay, cfg->replay_endpoint) < 0) {
			rc = -zmq_errno();
			snprintf(err, errlen, "kv events: cannot bind --kv-events-replay-endpoint "
				 "%s: %s", cfg->replay_endpoint, zmq_strerror(-rc));
			goto fail;
		}
	}
	rc = pthread_create(&ev->thread, NULL, publisher_main, ev);
	if (rc) {
		rc = -rc;
		snprintf(err, errlen, "kv events: thread: %s", strerror(-rc));
		goto fail;
	}
	ev->started = true;
	*out = ev;
	return 0;
fail:
	kve_free(ev);
	return rc;
}

void kve_destroy(struct kve *ev)
{
	if (!ev)
		return;
	if (ev->started) {
		uint64_t deadline = ks_now_ms() + KVE_DRAIN_MS;

		/* Let the publisher send what is queued, for a bounded time. */
		for (;;) {
			bool empty = true;

			if (ks_lock(&ev->lock) == 0) {
				empty = !ev->head;
				if (empty || ks_now_ms() >= deadline) {
					ev->stop = true;
					free_list(ev->head);
					ev->head = ev->tail = NULL;
					ev->queued = 0;
					empty = true;
				}
				ks_unlock(&ev->lock);
			}
			if (empty)
				break;
			struct timespec d = { 0, 5 * 1000000L };

			nanosleep(&d, NULL);
		}
		ks_cond_signal(&ev->cond);
		pthread_join(ev->thread, NULL);
	}
	kve_free(ev);
}

void kve_get_stats(struct kve *ev, struct kve_stats *st)
{
	memset(st, 0, sizeof(*st));
	if (!ev)
		return;
	st->queued = atomic_load_explicit(&ev->n_queued, memory_order_relaxed);
	st->dropped = atomic_load_explicit(&ev->n_dropped, memory_order_relaxed);
	st->published = atomic_load_explicit(&ev->n_published, memory_order_relaxed);
	st->batches = atomic_load_explicit(&ev->n_batches, memory_order_relaxed);
	st->send_failed = atomic_load_explicit(&ev->n_send_failed, memory_order_relaxed);
	st->replays = atomic_load_explicit(&ev->n_replays, memory_order_relaxed);
	st->replay_bad = atomic_load_explicit(&ev->n_replay_bad, memory_order_relaxed);
	st->snapshots = atomic_load_explicit(&ev->n_snapshots, memory_order_relaxed);
	st->next_seq = atomic_load_explicit(&ev->next_seq, memory_order_relaxed);
}
