/*
 * kv_events.h - KV cache events in vLLM's ZMQ format (docs/kv-events.md).
 *
 * Any thread reports what a medium gained or lost (kve_stored, kve_removed,
 * kve_cleared); the report is copied into a bounded queue under a leaf lock
 * and the call returns at once. One publisher thread owns the ZMQ sockets:
 * it drains the queue into batches, sends each batch on a PUB socket as
 * [topic, seq u64 big-endian, msgpack [ts, [events...], dp_rank]], keeps the
 * last N batches for replay (at most 256 MiB) and answers replay requests on
 * a ROUTER socket (with a snapshot of what is cached when the buffer no
 * longer reaches back to the start asked for). It also keeps each announced chunk's tokens and parent, so
 * a chunk demoted to disk is announced there, and a CLEAR of the pool is
 * followed by the disk's chunks again.
 * A full queue drops the report and counts it; the next batch's sequence
 * number then skips one, so a consumer sees the gap.
 *
 * Lock order (the tree is in lock.h): kve->lock (KV_EVENTS 55) is a leaf
 * but for the log ring; it is never held across ZMQ I/O, an allocation or
 * a wait on another thread other than ks_cond_wait_ms on itself.
 */
#ifndef KS_KV_EVENTS_H
#define KS_KV_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunk_key.h"

struct kve;

/* Storage mediums as vLLM names them (BlockStored/BlockRemoved "medium"). */
enum kve_medium { KVE_MEDIUM_CPU = 0, KVE_MEDIUM_DISK /* "STORAGE" */ };

struct kve_config {
	const char *endpoint;		/* PUB: bind if it has '*', '::', ipc:// or inproc://, else connect */
	const char *replay_endpoint;	/* ROUTER (bound), or NULL/"" for none */
	const char *topic;		/* first frame of every message ("" allowed) */
	uint32_t buffer_batches;	/* batches kept for replay (>= 1) */
	bool array_form;		/* vLLM's array_like encoding, else maps (docs/kv-events.md) */
	uint32_t queue_events;		/* reports queued before drops; 0 = 65536 */
	uint64_t stall_ms;		/* fault point kv_events.stall_ms: the first batch waits this long */
};

struct kve_stats {
	uint64_t queued;	/* reports accepted */
	uint64_t dropped;	/* reports dropped: queue full (or out of memory) */
	uint64_t published;	/* events sent */
	uint64_t batches;	/* batches sent */
	uint64_t send_failed;	/* batches ZMQ refused (they are still kept for replay) */
	uint64_t replays;	/* replay requests answered */
	uint64_t replay_bad;	/* replay requests ignored (malformed) */
	uint64_t snapshots;	/* replay requests answered with a snapshot */
	uint64_t next_seq;	/* sequence number of the next batch */
};

/* Bind/connect the sockets, start the publisher. 0 or -errno (message in @err). */
int kve_create(const struct kve_config *cfg, struct kve **out, char *err, size_t errlen);
/* Publish what is queued (up to 1 s), stop the thread, close the sockets. */
void kve_destroy(struct kve *ev);

/*
 * Chunk @k entered @medium: its @ntokens tokens, its predecessor's chunk hash
 * (@parent, NULL for a prompt's first chunk) and the chunk size. A first
 * chunk of a salted key ("model@salt") is published with the salt in
 * extra_keys. Never blocks.
 */
void kve_stored(struct kve *ev, const struct ks_key *k, const uint8_t *parent,
		const uint32_t *tokens, uint32_t ntokens, enum kve_medium medium);
/* Chunk @k left @medium (evicted from the pool, removed from disk). Never blocks. */
void kve_removed(struct kve *ev, const struct ks_key *k, enum kve_medium medium);
/*
 * Chunk @k, evicted from the pool, is being written to the disk tier: it left
 * CPU; kve_demoted says how the write ended (ok: BlockStored "Disk" with the
 * tokens of its CPU store). Never block.
 */
void kve_demoting(struct kve *ev, const struct ks_key *k);
void kve_demoted(struct kve *ev, const struct ks_key *k, bool ok);
/* Everything is gone (CLEAR, start). Never blocks. */
void kve_cleared(struct kve *ev);

/* The 64-bit block hash published for @chunk_hash of @k's model and rank. */
uint64_t kve_block_hash(const struct ks_key *k, const uint8_t chunk_hash[KS_HASH_LEN]);

void kve_get_stats(struct kve *ev, struct kve_stats *st);

#endif /* KS_KV_EVENTS_H */
