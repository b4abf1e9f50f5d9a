/*
 * lock.h - kvstash's only mutex and condition variable types, and the lock
 * order: the tree below is its one full statement (docs/architecture.md
 * shows a copy; tests/test_lock_tree.sh fails when the two differ, or when a
 * comment names a lock that no ks_mutex_init() creates).
 *
 * Every mutex has a rank (enum lock_rank). A thread may take a lock only if
 * its rank is numerically greater than every rank the thread already holds;
 * debug and sanitizer builds (KS_LOCKDEP) keep a per-thread stack of held
 * locks and abort, naming both locks, on a violation. The only way against
 * the order is ks_trylock(), with a comment at the call saying why.
 *
 * Lock tree: a lock indented under another is taken while holding it; locks
 * at the left margin are taken with no kvstash lock held.
 *
 * kvstash_client->idle_lock  CLIENT 10     libkvstash: a client's idle
 *                                          connection stack; a leaf
 * idx_shard->lock            IDX_SHARD 20  one per index shard; never two
 *   lru->lock                LRU 30        the index's eviction list; its
 *                                          walker only trylocks a shard
 *     pool->free_lock        POOL 40       free slot stack (freeing a slot
 *                                          takes it under a shard lock, with
 *                                          or without lru->lock)
 * tier_disk->lock            TIER 45       the disk tier's index, LRU, queue
 * tr_node->lock              TIER 45       a Redis node's request queue
 * tier_redis->map_lock       TIER 45       the cluster map's stop flag and
 *                                          parked redirects
 * tr_waiter->lock            TIER 45       one tier_redis_exists_wait() answer
 * xfer_queue->lock           QUEUE 50      a transfer engine's job FIFO and
 *                                          completion list
 * kve->lock                  KV_EVENTS 55  the KV event report queue
 * any lock above
 *   log ring lock            LOG 60        log lines; takes nothing
 *
 * The tier, queue and KV event locks are leaves (nothing but the log ring
 * is taken under them), one at a time. Metrics are _Atomic counters, never a
 * lock.
 *
 * No lock is held across a CUDA call, pread/pwrite, zmq_send/zmq_msg_recv,
 * Redis I/O, a callback or a wait on another thread (ks_cond_wait_ms
 * releases its own mutex).
 *
 * Every wait has a CLOCK_MONOTONIC deadline: ks_lock() gives up after the
 * mutex's timeout_ms and returns -ETIMEDOUT with a log line.
 */
#ifndef KS_LOCK_H
#define KS_LOCK_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* clang -Wthread-safety annotations; empty for gcc and nvcc. */
#if defined(__clang__) && !defined(__CUDACC__)
#define KS_TSA(x) __attribute__((x))
#else
#define KS_TSA(x)
#endif
#define CAPABILITY(x) KS_TSA(capability(x))
#define REQUIRES(...) KS_TSA(requires_capability(__VA_ARGS__))
#define ACQUIRE(...) KS_TSA(acquire_capability(__VA_ARGS__))
#define RELEASE(...) KS_TSA(release_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) KS_TSA(try_acquire_capability(__VA_ARGS__))
#define EXCLUDES(...) KS_TSA(locks_excluded(__VA_ARGS__))
#define NO_THREAD_SAFETY_ANALYSIS KS_TSA(no_thread_safety_analysis)
/* GUARDED_BY on struct members needs clang >= 19 in C; documentation only before. */
#if defined(__clang__) && !defined(__CUDACC__) && __clang_major__ >= 19
#define GUARDED_BY(x) KS_TSA(guarded_by(x))
#else
#define GUARDED_BY(x)
#endif

/* Position in the lock order: a thread may only take a rank above all it holds. */
enum lock_rank {
	LOCK_RANK_CLIENT = 10,
	LOCK_RANK_IDX_SHARD = 20,
	LOCK_RANK_LRU = 30,
	LOCK_RANK_POOL = 40,
	/* tier_disk->lock, tr_node->lock, tier_redis->map_lock, tr_waiter->lock: leaves */
	LOCK_RANK_TIER = 45,
	/* xfer_queue->lock: a leaf */
	LOCK_RANK_QUEUE = 50,
	/* kve->lock: the KV event queue (kv_events.c); a leaf */
	LOCK_RANK_KV_EVENTS = 55,
	LOCK_RANK_LOG = 60,
};

/* Default bound on any mutex wait; a lock is held for microseconds. */
#define KS_LOCK_TIMEOUT_MS_DEFAULT 2000u

struct CAPABILITY("mutex") ks_mutex {
	pthread_mutex_t mu;
	enum lock_rank rank;	/* position in the order; KS_LOCKDEP checks it */
	unsigned timeout_ms;	/* ks_lock() gives up after this long */
	const char *name;	/* static string, for log lines and lockdep aborts */
};

/* A condition variable on CLOCK_MONOTONIC. */
struct ks_cond {
	pthread_cond_t cv;
};

/* 0 or -errno from pthread_mutex_init. @name must be a static string. */
int ks_mutex_init(struct ks_mutex *m, enum lock_rank rank, const char *name);
void ks_mutex_destroy(struct ks_mutex *m);

/*
 * Take @m, waiting at most m->timeout_ms. Returns 0 (held) or -ETIMEDOUT
 * (not held; logged and counted in ks_lock_timeouts_total()).
 */
int ks_lock(struct ks_mutex *m) TRY_ACQUIRE(0, m);
/* Take @m if free right now: 0 (held) or -EBUSY. Allowed against the order. */
int ks_trylock(struct ks_mutex *m) TRY_ACQUIRE(0, m);
void ks_unlock(struct ks_mutex *m) RELEASE(m);

int ks_cond_init(struct ks_cond *c);
void ks_cond_destroy(struct ks_cond *c);
/*
 * Wait on @c, releasing @m, for at most @timeout_ms. Returns 0 when woken
 * (spuriously too: callers loop on their predicate), -ETIMEDOUT after the
 * deadline. @m is held again on return in both cases.
 */
int ks_cond_wait_ms(struct ks_cond *c, struct ks_mutex *m, uint64_t timeout_ms) REQUIRES(m);
void ks_cond_signal(struct ks_cond *c);
void ks_cond_broadcast(struct ks_cond *c);

/* Timeout given to mutexes initialised from now on (--lock-timeout-ms). */
void ks_lock_set_default_timeout_ms(unsigned ms);

/* Lock waits that timed out since start (metrics). */
uint64_t ks_lock_timeouts_total(void);

/* Number of ks_mutexes the calling thread holds (KS_LOCKDEP builds; else 0). */
int ks_locks_held(void);

/*
 * Debug builds: abort if the calling thread holds any ks_mutex. Called
 * before every blocking call (CUDA, disk, network, waits on other threads).
 */
#ifdef KS_LOCKDEP
void ks_assert_unlocked_at(const char *file, int line);
#define ks_assert_unlocked() ks_assert_unlocked_at(__FILE__, __LINE__)
#else
#define ks_assert_unlocked() ((void)0)
#endif

#endif /* KS_LOCK_H */
