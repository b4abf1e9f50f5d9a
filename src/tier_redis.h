/*
 * tier_redis.h - L3: chunks in Redis/Valkey, shared by every kvstashd that
 * points at the same servers.
 *
 * Values use the tier_chunk.h format (header with the full key, layout tag,
 * length and checksums, then the payload) under "<prefix><chunk name>"
 * (tier_chunk_name()), so any instance can verify what another stored. With
 * redis:// URLs keys are spread over the configured nodes by
 * XXH64(redis key) % nnodes: every instance must list the nodes in the same
 * order. With redis+cluster:// seeds the nodes are a Redis Cluster's
 * masters, read from CLUSTER SLOTS and kept current; keys go by hash slot,
 * MOVED/ASK are followed (docs/operations.md).
 *
 * Every call returns at once; a worker thread per node does the network
 * I/O (hiredis, connect and per-call timeouts), pipelining what is queued.
 * There is no local index: whether a chunk exists is asked with
 * tier_redis_exists() (async, safe from the io thread) or
 * tier_redis_exists_wait() (blocks up to a timeout: transfer workers and
 * prefetch threads only, never the io thread).
 *
 * A lost connection fails what was in flight with -ENOTCONN, and while a
 * node is down its new requests fail fast: put/get return -ENOTCONN at once
 * (no callback), requests already queued get -ENOTCONN through the
 * callback; both are counted in notconn. The worker reconnects with
 * exponential backoff (backoff_min_ms doubling to backoff_max_ms).
 *
 * Lock order (the tree is in lock.h): the tier's locks are LOCK_RANK_TIER
 * leaves taken with no lock held; call in holding none. They are never held
 * across hiredis calls or callbacks.
 */
#ifndef KS_TIER_REDIS_H
#define KS_TIER_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "chunk_key.h"
#include "tier_chunk.h"

struct tier_redis;

struct tier_redis_config {
	/* "[redis://][user:password@]host[:port]", or cluster seeds, the first
	 * "redis+cluster://[user:password@]host:port", the others alike or bare
	 * "host:port"; borrowed */
	const char *const *urls;
	size_t nurls;			/* 1..TIER_REDIS_MAX_NODES */
	const char *key_prefix;		/* NULL = "kvstash:" */
	unsigned ttl_s;			/* SET ... EX ttl_s; 0 = no expiry */
	unsigned queue_depth;		/* per node, queued or in flight; 0 = 64 */
	unsigned connect_timeout_ms;	/* 0 = 1000 */
	unsigned io_timeout_ms;		/* per send/receive; 0 = 5000 */
	unsigned backoff_min_ms;	/* first reconnect delay; 0 = 50 */
	unsigned backoff_max_ms;	/* cap of the doubling; 0 = 2000 */
	uint64_t pipeline_bytes;	/* value bytes per pipelined batch; 0 = 64 MiB */
	unsigned lock_timeout_ms;	/* 0 = KS_LOCK_TIMEOUT_MS_DEFAULT */
	const char *user;		/* ACL user (AUTH user password), or NULL */
	const char *password;		/* AUTH password, or NULL (copied; not in URLs then) */
};

#define TIER_REDIS_MAX_NODES 64

struct tier_redis_stats {
	uint64_t puts, put_errors;	/* SETs acknowledged / failed (any reason) */
	uint64_t gets, hits, misses;	/* GETs answered; served; nil */
	uint64_t corrupt;		/* values failing the header/checksum/key check */
	uint64_t notconn;		/* requests failed with -ENOTCONN (node down) */
	uint64_t dropped_full;		/* refused with -EAGAIN (queue full) */
	uint64_t timeouts;		/* hiredis calls that hit io_timeout_ms */
	uint64_t reconnects;		/* successful connects after a loss */
	uint64_t exists_keys, exists_hits;
	uint64_t bytes_out, bytes_in;	/* value bytes sent / received */
	unsigned nodes, nodes_up;	/* cluster: masters known (ever), connected */
	bool cluster;
	uint64_t moved, asked;		/* cluster redirects followed */
	uint64_t map_refreshes;		/* slot maps read */
	uint64_t map_errors;		/* refreshes no node answered (or malformed) */
	unsigned slots_uncovered;	/* hash slots no master serves in the current map */
};

struct tier_redis_node_info {
	char addr[272];			/* host:port (never credentials) */
	bool up;			/* connected */
	unsigned slots;			/* cluster: slots owned in the current map */
};

/* tier_redis_put() flags */
#define TIER_REDIS_PUT_COPY 1u	/* copy @data before returning (else borrowed until done) */

/*
 * Parse the config, connect each node once (bounded by connect_timeout_ms;
 * a node that is down is retried in the background) and start one worker
 * per node. Returns 0 with *out set, -EINVAL (bad URL or config), -ENOMEM,
 * or -errno from thread creation.
 */
int tier_redis_open(const struct tier_redis_config *cfg, struct tier_redis **out);

/* Stop the workers (queued requests get -ECANCELED) and free. Not from a callback. */
void tier_redis_close(struct tier_redis *tr);

/*
 * SET the chunk @key = header + @data[0..nbytes) EX ttl_s. Without
 * TIER_REDIS_PUT_COPY @data is borrowed until @done. Returns 0 (@done gets
 * 0, -ENOTCONN, -ETIMEDOUT, -ENOSPC (server OOM), -EIO (other server error)
 * or -ECANCELED), or without a callback: -EAGAIN (queue full, counted),
 * -ENOTCONN (node down, counted), -EINVAL, -ENOMEM, -ETIMEDOUT (lock).
 */
int tier_redis_put(struct tier_redis *tr, const struct ks_key *key, uint64_t layout_tag,
		   const void *data, size_t nbytes, unsigned flags, ks_tier_done_fn done,
		   void *arg);

/*
 * GET the chunk @key into @dst (capacity @cap). Returns 0 (@done gets 0
 * with tag and length, -ENOENT (no such key), -EBADMSG (corrupt: counted,
 * key deleted), -EMSGSIZE (payload > cap), -ENOTCONN, -ETIMEDOUT,
 * -ECANCELED), or the synchronous errors of tier_redis_put().
 */
int tier_redis_get(struct tier_redis *tr, const struct ks_key *key, void *dst, size_t cap,
		   ks_tier_done_fn done, void *arg);

/*
 * Completion of tier_redis_exists(): @present[i] tells whether keys[i]
 * exists (valid during the call only). @status is 0, or the first error of
 * any node (-ENOTCONN, -ETIMEDOUT, -ECANCELED); keys on a failed node read
 * as absent. Runs on a worker thread with no lock held.
 */
typedef void (*tier_redis_exists_fn)(void *arg, int status, const bool *present, size_t n);

/*
 * Ask which of @keys[0..n) exist (pipelined EXISTS, split over nodes).
 * @keys is copied. Returns 0 (@done called once), -EINVAL, -ENOMEM, or
 * -ETIMEDOUT (lock); a node's queue being full counts as that node failing
 * with -EAGAIN through @done.
 */
int tier_redis_exists(struct tier_redis *tr, const struct ks_key *keys, size_t n,
		      tier_redis_exists_fn done, void *arg);

/*
 * tier_redis_exists(), waiting at most @timeout_ms for the answer: fills
 * @present[0..n) and returns the number of leading keys present (the prefix
 * length) or -errno (-ETIMEDOUT: no answer in time; @present all false).
 * Blocks: call with no lock held, never from the io thread or a callback.
 */
long tier_redis_exists_wait(struct tier_redis *tr, const struct ks_key *keys, size_t n,
			    bool *present, unsigned timeout_ms);

/* Asynchronous DEL of @key; 0 or a synchronous error as in tier_redis_put(). */
int tier_redis_remove(struct tier_redis *tr, const struct ks_key *key);

void tier_redis_get_stats(struct tier_redis *tr, struct tier_redis_stats *out);

/* Per-node state into @out[0..max); returns how many. */
size_t tier_redis_nodes(struct tier_redis *tr, struct tier_redis_node_info *out, size_t max);

/* Redis Cluster hash slot (0..16383) of @key, {hash tags} honoured. */
unsigned tier_redis_key_slot(const char *key, size_t len);

/* @url (comma-separated list too) with every password replaced by "***", for logs. */
void tier_redis_redact_url(const char *url, char *out, size_t n);

/*
 * The password on the first line of @path (line end stripped) into @out.
 * 0, -errno (cannot open/read), -ENODATA (empty), -ENAMETOOLONG (longer
 * than @n - 1).
 */
int tier_redis_read_password_file(const char *path, char *out, size_t n);

/* The Redis key of @key (prefix + tier_chunk_name()) into @out of @n bytes. */
void tier_redis_key(const struct tier_redis *tr, const struct ks_key *key, char *out, size_t n);

#endif /* KS_TIER_REDIS_H */
