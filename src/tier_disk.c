/*
 * tier_disk.c - L2 disk tier: one file per chunk in one directory, an
 * in-memory index with its own LRU and capacity, a worker thread doing all
 * file I/O through io_uring (pread/pwrite fallback).
 *
 * DESIGN: callers (the io thread, transfer workers, tier callbacks) only
 * take tier_disk->lock for pointer moves: index lookups, LRU touches, queueing.
 * One worker thread owns the ring and every file operation: it opens,
 * checksums, writes "<name>.kvc" under a ".tmp-" name and renames it into
 * place (so a reader never sees a half-written file under the final name),
 * reads and verifies, unlinks evicted and removed files. Up to
 * TD_MAX_INFLIGHT requests are in the ring at once; the worker sleeps in
 * io_uring_wait_cqe_timeout() (or poll() in fallback mode) on a read of an
 * eventfd that submitters bump, with a TD_IDLE_WAIT_MS bound. Because only
 * the worker renames, evicts and unlinks, the index as the worker sees it
 * when starting a request matches the files on disk; an entry's generation
 * number tells whether it was replaced while a read was in flight.
 * Completions (ks_tier_done_fn) run on the worker with no lock held.
 * Files are not fsync'd: this is a cache; a torn file after a crash fails
 * its checksum on read and is dropped. One process per directory (flock).
 *
 * Lock order (the tree is in lock.h): tier_disk->lock (LOCK_RANK_TIER)
 * guards the index, LRU and queue; it is taken with no lock held and is a
 * leaf (only the log ring under it). Never held across open/read/write/rename/unlink, a callback or a wait.
 */
#include "tier_disk.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "compiler.h"
#include "fault.h"
#include "list.h"
#include "lock.h"
#include "log.h"

/* Requests in the ring at once: enough to keep an NVMe queue busy with
 * multi-MiB writes, few enough that the ring (2x, plus the wake read) is small. */
#ifndef TD_MAX_INFLIGHT
#define TD_MAX_INFLIGHT 16
#endif
#define TD_RING_ENTRIES 64
/* Longest sleep of an idle worker: bounds how late it sees a stop flag
 * if an eventfd wake were lost. */
#define TD_IDLE_WAIT_MS 100
#define TD_DEFAULT_QUEUE_DEPTH 64
#define TD_DEFAULT_STAGING (256ull << 20)
#define TD_SUFFIX ".kvc"
#define TD_TMP_PREFIX ".tmp-"
#define TD_NAME_BUF (sizeof(TD_TMP_PREFIX) + TIER_CHUNK_NAME_MAX + sizeof(TD_SUFFIX) + 24)

enum td_op { TD_PUT, TD_GET, TD_UNLINK };

/* One index entry: a file "<name>.kvc" that the worker has completed. */
struct td_ent {
	struct td_ent *hnext;		/* hash chain */
	struct ks_list lru;		/* on td->lru: its first node is the newest */
	struct ks_key key;
	uint64_t layout_tag;
	uint64_t payload_len;
	uint64_t file_bytes;		/* header + payload */
	uint64_t gen;			/* changes when the file is replaced */
	int64_t mtime_ns;		/* scan only: initial LRU order */
};

struct td_req {
	struct td_req *next;		/* queue link */
	enum td_op op;
	struct ks_key key;
	uint64_t layout_tag;
	const uint8_t *data;		/* put: payload; borrowed, or owned if owns_data */
	bool owns_data;
	uint8_t *dst;			/* get: caller's buffer, borrowed until done */
	size_t nbytes;			/* put: payload length; get: capacity of dst */
	ks_tier_done_fn done;
	void *arg;
	/* worker state */
	int fd;
	uint64_t gen;			/* get: entry generation at start */
	uint64_t payload_len;		/* get: expected from the index */
	off_t off;
	struct iovec iov[2];
	int iov_idx, niov;
	size_t left;			/* bytes still to transfer */
	char tmp[TD_NAME_BUF];		/* put: temporary file name */
	uint8_t hdr[TIER_CHUNK_HDR_SIZE];
};

struct tier_disk {
	void (*evicted_fn)(void *arg, const struct ks_key *key);	/* set at open */
	void *evicted_arg;
	/* Protects the index, LRU, queue and the counters not marked atomic. */
	struct ks_mutex lock;
	struct td_ent **buckets;	/* owns the entries */
	size_t nbuckets;		/* power of two */
	size_t nobjects;
	uint64_t bytes;
	struct ks_list lru;		/* the entries, newest first (list.h) */
	struct td_req *qhead, *qtail;	/* FIFO of requests not started */
	unsigned pending;		/* puts + gets queued or in flight */
	uint64_t staging_used;		/* bytes of TIER_PUT_COPY buffers alive */
	uint64_t next_gen;
	bool stopping;

	/* immutable after open */
	char *path;
	int dirfd;
	int lockfd;			/* flock()ed: one process per directory */
	int efd;			/* wakes the worker */
	uint64_t capacity;
	unsigned queue_depth;
	uint64_t staging_bytes;
	bool use_uring;
	struct io_uring ring;
	pthread_t thread;

	/* worker-only */
	unsigned inflight;
	uint64_t wake_buf;
	bool wake_armed;
	uint64_t tmp_seq;

	_Atomic uint64_t puts, put_errors, nospace, dropped_full, gets, hits, misses, corrupt,
		io_errors, evictions;
	uint64_t scan_found, scan_bad;	/* set before the worker starts */
};

#define cnt_inc(td, c) atomic_fetch_add_explicit(&(td)->c, 1, memory_order_relaxed)

/* ---- index: chained hash + LRU, all under tier_disk->lock ---------------------- */

static struct td_ent **do_td_slot(struct tier_disk *td, const struct ks_key *k) REQUIRES(td->lock)
{
	struct td_ent **pp = &td->buckets[ks_key_hash64(k) & (td->nbuckets - 1)];

	while (*pp && !ks_key_equal(&(*pp)->key, k))
		pp = &(*pp)->hnext;
	return pp;
}

static struct td_ent *do_td_find(struct tier_disk *td, const struct ks_key *k) REQUIRES(td->lock)
{
	return *do_td_slot(td, k);
}

/* Free every entry (open's error path, close: no other thread is left). */
static void td_free_entries(struct tier_disk *td)
{
	struct ks_list *n, *tmp;

	ks_list_for_each_safe(n, tmp, &td->lru)
		free(ks_list_entry(n, struct td_ent, lru));
	ks_list_init(&td->lru);
}

/* Double the table when it is fuller than one entry per bucket; a failed
 * allocation only leaves chains longer. */
static void do_td_grow(struct tier_disk *td) REQUIRES(td->lock)
{
	size_t n = td->nbuckets * 2;
	struct td_ent **nb = calloc(n, sizeof(*nb));

	if (!nb)
		return;
	for (size_t i = 0; i < td->nbuckets; i++) {
		struct td_ent *e = td->buckets[i], *nx;

		for (; e; e = nx) {
			nx = e->hnext;
			size_t b = ks_key_hash64(&e->key) & (n - 1);

			e->hnext = nb[b];
			nb[b] = e;
		}
	}
	free(td->buckets);
	td->buckets = nb;
	td->nbuckets = n;
}

/* Insert @e (newest), replacing an entry of the same key, which is freed. */
static void do_td_insert(struct tier_disk *td, struct td_ent *e) REQUIRES(td->lock)
{
	struct td_ent **pp = do_td_slot(td, &e->key);
	struct td_ent *old = *pp;

	if (old) {
		*pp = old->hnext;
		ks_list_del(&old->lru);
		td->bytes -= old->file_bytes;
		td->nobjects--;
		free(old);
	}
	e->gen = ++td->next_gen;
	e->hnext = td->buckets[ks_key_hash64(&e->key) & (td->nbuckets - 1)];
	td->buckets[ks_key_hash64(&e->key) & (td->nbuckets - 1)] = e;
	ks_list_add_first(&td->lru, &e->lru);
	td->bytes += e->file_bytes;
	td->nobjects++;
	if (td->nobjects > td->nbuckets)
		do_td_grow(td);
}

/* Take @e out of the index and LRU; the caller frees it. */
static void do_td_unlink(struct tier_disk *td, struct td_ent *e) REQUIRES(td->lock)
{
	struct td_ent **pp = do_td_slot(td, &e->key);

	if (*pp == e)
		*pp = e->hnext;
	ks_list_del(&e->lru);
	td->bytes -= e->file_bytes;
	td->nobjects--;
}

/* Unlink the oldest entries until within capacity; returns them as a list (hnext). */
static struct td_ent *do_td_evict(struct tier_disk *td) REQUIRES(td->lock)
{
	struct td_ent *victims = NULL;

	while (td->bytes > td->capacity && !ks_list_empty(&td->lru)) {
		struct td_ent *e = ks_list_entry(ks_list_last(&td->lru), struct td_ent, lru);

		do_td_unlink(td, e);
		e->hnext = victims;
		victims = e;
	}
	return victims;
}

static void td_file_name(const struct ks_key *k, char out[TD_NAME_BUF])
{
	char name[TIER_CHUNK_NAME_MAX];

	tier_chunk_name(k, name);
	snprintf(out, TD_NAME_BUF, "%s" TD_SUFFIX, name);
}

/* Worker (or open): unlink and free evicted entries. No lock held. */
static void td_drop_victims(struct tier_disk *td, struct td_ent *victims)
{
	char name[TD_NAME_BUF];

	ks_assert_unlocked();
	while (victims) {
		struct td_ent *nx = victims->hnext;

		td_file_name(&victims->key, name);
		if (unlinkat(td->dirfd, name, 0) && errno != ENOENT)
			log_warn("tier_disk: unlink %s/%s: %s", td->path, name, strerror(errno));
		cnt_inc(td, evictions);
		if (td->evicted_fn)
			td->evicted_fn(td->evicted_arg, &victims->key);
		free(victims);
		victims = nx;
	}
}

/* ---- worker: request state machine -------------------------------------- */

static void td_req_free(struct tier_disk *td, struct td_req *r)
{
	if (r->owns_data) {
		free((void *)r->data);
		if (ks_lock(&td->lock) == 0) {
			td->staging_used -= r->nbytes;
			ks_unlock(&td->lock);
		} else {
			/* NOTE: a 2 s lock timeout leaks staging credit, never memory. */
			log_warn("tier_disk: staging credit of %zu bytes lost", r->nbytes);
		}
	}
	free(r);
}

static void td_complete(struct tier_disk *td, struct td_req *r, int status, uint64_t tag,
			size_t n)
{
	ks_tier_done_fn done = r->done;
	void *arg = r->arg;
	bool counted = r->op != TD_UNLINK;

	td_req_free(td, r);
	if (counted && ks_lock(&td->lock) == 0) {
		td->pending--;
		ks_unlock(&td->lock);
	}
	ks_assert_unlocked();
	if (done)
		done(arg, status, tag, n);
}

static bool is_nospace(int err)
{
	return err == -ENOSPC || err == -EFBIG || err == -EDQUOT;
}

static void td_put_finish(struct tier_disk *td, struct td_req *r, int res)
{
	char name[TD_NAME_BUF];

	if (r->fd >= 0 && close(r->fd) && !res)
		res = -errno;
	r->fd = -1;
	if (!res) {
		td_file_name(&r->key, name);
		if (renameat(td->dirfd, r->tmp, td->dirfd, name))
			res = -errno;
	}
	if (res) {
		unlinkat(td->dirfd, r->tmp, 0);
		cnt_inc(td, put_errors);
		if (is_nospace(res))
			cnt_inc(td, nospace);
		else
			cnt_inc(td, io_errors);
		log_debug("tier_disk: put %s failed: %s", r->tmp, strerror(-res));
		td_complete(td, r, res, 0, 0);
		return;
	}

	struct td_ent *e = calloc(1, sizeof(*e));
	struct td_ent *victims = NULL;

	if (!e) {
		/* The file is complete but cannot be indexed: remove it. */
		unlinkat(td->dirfd, name, 0);
		cnt_inc(td, put_errors);
		td_complete(td, r, -ENOMEM, 0, 0);
		return;
	}
	e->key = r->key;
	e->layout_tag = r->layout_tag;
	e->payload_len = r->nbytes;
	e->file_bytes = TIER_CHUNK_HDR_SIZE + r->nbytes;
	if (ks_lock(&td->lock)) {
		free(e);
		unlinkat(td->dirfd, name, 0);
		cnt_inc(td, put_errors);
		td_complete(td, r, -ETIMEDOUT, 0, 0);
		return;
	}
	do_td_insert(td, e);
	victims = do_td_evict(td);
	ks_unlock(&td->lock);
	td_drop_victims(td, victims);
	cnt_inc(td, puts);
	td_complete(td, r, 0, 0, 0);
}

/* A read that returned bytes other than what was put: count, drop, report. */
static void td_get_corrupt(struct tier_disk *td, struct td_req *r, const char *why)
{
	char name[TD_NAME_BUF];
	struct td_ent *e = NULL;

	td_file_name(&r->key, name);
	log_warn("tier_disk: %s/%s: %s; removed", td->path, name, why);
	cnt_inc(td, corrupt);
	if (ks_lock(&td->lock) == 0) {
		e = do_td_find(td, &r->key);
		if (e && e->gen == r->gen)
			do_td_unlink(td, e);
		else
			e = NULL;	/* replaced since: the new file is not ours to judge */
		ks_unlock(&td->lock);
	}
	if (e) {
		unlinkat(td->dirfd, name, 0);
		free(e);
	}
	td_complete(td, r, -EBADMSG, 0, 0);
}

static void td_get_finish(struct tier_disk *td, struct td_req *r, int res)
{
	struct tier_chunk_meta m;

	if (r->fd >= 0)
		close(r->fd);
	r->fd = -1;
	if (res == -EBADMSG) {
		td_get_corrupt(td, r, "truncated");
		return;
	}
	if (res) {
		cnt_inc(td, io_errors);
		td_complete(td, r, res, 0, 0);
		return;
	}
	if (tier_chunk_hdr_decode(r->hdr, &m)) {
		td_get_corrupt(td, r, "bad header");
		return;
	}
	if (tier_chunk_verify(&m, &r->key, r->dst, r->payload_len)) {
		td_get_corrupt(td, r, "payload checksum, key or length mismatch");
		return;
	}
	cnt_inc(td, hits);
	td_complete(td, r, 0, m.layout_tag, (size_t)m.payload_len);
}

static void td_finish(struct tier_disk *td, struct td_req *r, int res)
{
	if (r->op == TD_PUT)
		td_put_finish(td, r, res);
	else
		td_get_finish(td, r, res);
}

/*
 * Account @res bytes (or an error) of the current transfer. Returns true
 * when the request has finished (and was completed), false when more I/O
 * is needed.
 */
static bool td_advance(struct tier_disk *td, struct td_req *r, long res)
{
	if (res < 0) {
		td_finish(td, r, (int)res);
		return true;
	}
	if (res == 0) {
		/* EOF before the length the index promised: a truncated file. */
		td_finish(td, r, r->op == TD_GET ? -EBADMSG : -EIO);
		return true;
	}
	r->off += res;
	r->left -= (size_t)res;
	while (res > 0 && r->iov_idx < r->niov) {
		struct iovec *v = &r->iov[r->iov_idx];
		size_t take = KS_MIN((size_t)res, v->iov_len);

		v->iov_base = (uint8_t *)v->iov_base + take;
		v->iov_len -= take;
		res -= (long)take;
		if (!v->iov_len)
			r->iov_idx++;
	}
	if (!r->left) {
		td_finish(td, r, 0);
		return true;
	}
	return false;
}

/* Queue the next transfer of @r on the ring, or (fallback) run it to the end. */
static void td_issue(struct tier_disk *td, struct td_req *r)
{
	if (td->use_uring) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&td->ring);

		if (!sqe) {
			io_uring_submit(&td->ring);
			sqe = io_uring_get_sqe(&td->ring);
		}
		if (!sqe) {	/* cannot happen: the ring holds 2x the requests */
			td_finish(td, r, -EBUSY);
			return;
		}
		if (r->op == TD_PUT)
			io_uring_prep_writev(sqe, r->fd, &r->iov[r->iov_idx], r->niov - r->iov_idx,
					     (uint64_t)r->off);
		else
			io_uring_prep_readv(sqe, r->fd, &r->iov[r->iov_idx], r->niov - r->iov_idx,
					    (uint64_t)r->off);
		io_uring_sqe_set_data(sqe, r);
		td->inflight++;
		return;
	}
	for (;;) {
		ssize_t n = r->op == TD_PUT ?
			pwritev(r->fd, &r->iov[r->iov_idx], r->niov - r->iov_idx, r->off) :
			preadv(r->fd, &r->iov[r->iov_idx], r->niov - r->iov_idx, r->off);

		if (n < 0 && errno == EINTR)
			continue;
		if (td_advance(td, r, n < 0 ? -errno : n))
			return;
	}
}

static void td_start_put(struct tier_disk *td, struct td_req *r)
{
	char name[TIER_CHUNK_NAME_MAX];

	tier_chunk_name(&r->key, name);
	snprintf(r->tmp, sizeof(r->tmp), TD_TMP_PREFIX "%s.%llu", name,
		 (unsigned long long)++td->tmp_seq);
	r->fd = openat(td->dirfd, r->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (r->fd < 0) {
		td_finish(td, r, -errno);
		return;
	}
	tier_chunk_hdr_encode(r->hdr, &r->key, r->layout_tag, r->nbytes,
			      tier_chunk_sum(r->data, r->nbytes));
	r->iov[0] = (struct iovec){ r->hdr, TIER_CHUNK_HDR_SIZE };
	r->iov[1] = (struct iovec){ (void *)r->data, r->nbytes };
	r->niov = 2;
	r->left = TIER_CHUNK_HDR_SIZE + r->nbytes;
	td_issue(td, r);
}

static void td_start_get(struct tier_disk *td, struct td_req *r)
{
	char name[TD_NAME_BUF];
	struct td_ent *e;
	int rc;

	/* Only this thread renames or unlinks, so the entry seen here is the file opened next. */
	rc = ks_lock(&td->lock);
	if (rc) {
		td_complete(td, r, rc, 0, 0);
		return;
	}
	e = do_td_find(td, &r->key);
	if (e) {
		r->gen = e->gen;
		r->payload_len = e->payload_len;
	}
	ks_unlock(&td->lock);
	if (!e) {
		cnt_inc(td, misses);
		td_complete(td, r, -ENOENT, 0, 0);
		return;
	}
	if (r->payload_len > r->nbytes) {
		td_complete(td, r, -EMSGSIZE, 0, 0);
		return;
	}
	td_file_name(&r->key, name);
	r->fd = openat(td->dirfd, name, O_RDONLY | O_CLOEXEC);
	if (r->fd < 0) {
		int err = -errno;

		if (err == -ENOENT)
			cnt_inc(td, misses);
		else
			cnt_inc(td, io_errors);
		td_complete(td, r, err, 0, 0);
		return;
	}
	r->iov[0] = (struct iovec){ r->hdr, TIER_CHUNK_HDR_SIZE };
	r->iov[1] = (struct iovec){ r->dst, r->payload_len };
	r->niov = r->payload_len ? 2 : 1;
	r->left = TIER_CHUNK_HDR_SIZE + r->payload_len;
	td_issue(td, r);
}

static void td_start(struct tier_disk *td, struct td_req *r)
{
	char name[TD_NAME_BUF];

	r->fd = -1;
	switch (r->op) {
	case TD_PUT:
		td_start_put(td, r);
		break;
	case TD_GET:
		td_start_get(td, r);
		break;
	case TD_UNLINK:
		td_file_name(&r->key, name);
		if (unlinkat(td->dirfd, name, 0) && errno != ENOENT)
			cnt_inc(td, io_errors);
		td_complete(td, r, 0, 0, 0);
		break;
	}
}

static void td_arm_wake(struct tier_disk *td)
{
	struct io_uring_sqe *sqe;

	if (td->wake_armed)
		return;
	sqe = io_uring_get_sqe(&td->ring);
	if (!sqe)
		return;	/* armed on a later pass; TD_IDLE_WAIT_MS bounds the sleep */
	io_uring_prep_read(sqe, td->efd, &td->wake_buf, sizeof(td->wake_buf), 0);
	io_uring_sqe_set_data(sqe, NULL);	/* NULL = the wake read */
	td->wake_armed = true;
}

/* Handle every completion that is ready. */
static void td_reap(struct tier_disk *td)
{
	struct io_uring_cqe *cqe;

	while (io_uring_peek_cqe(&td->ring, &cqe) == 0) {
		struct td_req *r = io_uring_cqe_get_data(cqe);
		int res = cqe->res;

		io_uring_cqe_seen(&td->ring, cqe);
		if (!r) {
			td->wake_armed = false;
			continue;
		}
		td->inflight--;
		if (!td_advance(td, r, res))
			td_issue(td, r);
	}
}

static void td_wait(struct tier_disk *td)
{
	ks_assert_unlocked();
	if (td->use_uring) {
		struct __kernel_timespec ts = { .tv_sec = 0,
						.tv_nsec = TD_IDLE_WAIT_MS * 1000000ll };
		struct io_uring_cqe *cqe;

		td_arm_wake(td);
		io_uring_submit_and_wait_timeout(&td->ring, &cqe, 1, &ts, NULL);
		td_reap(td);
	} else {
		struct pollfd p = { .fd = td->efd, .events = POLLIN };
		uint64_t v;

		if (poll(&p, 1, TD_IDLE_WAIT_MS) > 0 && read(td->efd, &v, sizeof(v)) < 0)
			(void)v;
	}
}

static void *td_worker(void *p)
{
	struct tier_disk *td = p;
	sigset_t all;

	/* Signals belong to the main thread; SIGXFSZ then becomes EFBIG here. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	for (;;) {
		struct td_req *batch = NULL, **tail = &batch, *cancel = NULL;
		bool stop, more;

		if (ks_lock(&td->lock)) {
			td_wait(td);
			continue;
		}
		stop = td->stopping;
		if (stop) {
			/* Cancel puts and gets that did not start; unlinks still run. */
			struct td_req *r = td->qhead, **keep = &td->qhead;

			td->qtail = NULL;
			while (r) {
				struct td_req *nx = r->next;

				if (r->op == TD_UNLINK) {
					*keep = r;
					keep = &r->next;
					td->qtail = r;
				} else {
					r->next = cancel;
					cancel = r;
				}
				r = nx;
			}
			*keep = NULL;
		}
		while (td->qhead && (td->qhead->op == TD_UNLINK ||
				     td->inflight < TD_MAX_INFLIGHT)) {
			struct td_req *r = td->qhead;

			td->qhead = r->next;
			if (!td->qhead)
				td->qtail = NULL;
			r->next = NULL;
			*tail = r;
			tail = &r->next;
			if (r->op != TD_UNLINK)
				td->inflight++;	/* reserved; td_issue counts ring entries */
		}
		more = td->qhead != NULL;
		ks_unlock(&td->lock);

		while (cancel) {
			struct td_req *nx = cancel->next;

			td_complete(td, cancel, cancel->op == TD_UNLINK ? 0 : -ECANCELED, 0, 0);
			cancel = nx;
		}
		while (batch) {
			struct td_req *nx = batch->next;

			if (batch->op != TD_UNLINK)
				td->inflight--;
			td_start(td, batch);
			batch = nx;
		}
		if (stop && !td->inflight)
			break;
		if (more && td->inflight < TD_MAX_INFLIGHT)
			continue;	/* room for more: don't sleep on a drained eventfd */
		td_wait(td);
	}
	return NULL;
}

/* ---- open: scan the directory and rebuild the index --------------------- */

static int cmp_mtime(const void *a, const void *b)
{
	const struct td_ent *x = *(struct td_ent *const *)a, *y = *(struct td_ent *const *)b;

	return (x->mtime_ns > y->mtime_ns) - (x->mtime_ns < y->mtime_ns);
}

static bool has_suffix(const char *s, const char *suf)
{
	size_t n = strlen(s), m = strlen(suf);

	return n >= m && !strcmp(s + n - m, suf);
}

/* Check one "<name>.kvc": header valid, name matches its key, size matches. */
static struct td_ent *td_scan_one(struct tier_disk *td, const char *fname)
{
	uint8_t hdr[TIER_CHUNK_HDR_SIZE];
	char want[TD_NAME_BUF];
	struct tier_chunk_meta m;
	struct td_ent *e = NULL;
	struct stat st;
	int fd = openat(td->dirfd, fname, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) || !S_ISREG(st.st_mode) ||
	    pread(fd, hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr) || tier_chunk_hdr_decode(hdr, &m))
		goto out_close;
	td_file_name(&m.key, want);
	if (strcmp(want, fname) || (uint64_t)st.st_size != TIER_CHUNK_HDR_SIZE + m.payload_len)
		goto out_close;
	e = calloc(1, sizeof(*e));
	if (!e)
		goto out_close;
	e->key = m.key;
	e->layout_tag = m.layout_tag;
	e->payload_len = m.payload_len;
	e->file_bytes = (uint64_t)st.st_size;
	e->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000ll + st.st_mtim.tv_nsec;
out_close:
	close(fd);
	return e;
}

static int td_scan(struct tier_disk *td) NO_THREAD_SAFETY_ANALYSIS	/* no other thread yet */
{
	struct td_ent **found = NULL, *victims;
	size_t n = 0, cap = 0;
	int dfd = dup(td->dirfd);
	DIR *d;
	struct dirent *de;

	if (dfd < 0)
		return -errno;
	d = fdopendir(dfd);
	if (!d) {
		close(dfd);
		return -errno;
	}
	while ((de = readdir(d))) {
		struct td_ent *e;

		if (!strncmp(de->d_name, TD_TMP_PREFIX, strlen(TD_TMP_PREFIX))) {
			unlinkat(td->dirfd, de->d_name, 0);	/* a put cut short */
			continue;
		}
		if (!has_suffix(de->d_name, TD_SUFFIX))
			continue;	/* not ours: leave it alone */
		e = td_scan_one(td, de->d_name);
		if (!e) {
			log_warn("tier_disk: %s/%s: bad chunk file; removed", td->path, de->d_name);
			unlinkat(td->dirfd, de->d_name, 0);
			td->scan_bad++;
			continue;
		}
		if (n == cap) {
			size_t ncap = cap ? 2 * cap : 256;
			struct td_ent **nf = realloc(found, ncap * sizeof(*nf));

			if (!nf) {
				free(e);
				break;
			}
			found = nf;
			cap = ncap;
		}
		found[n++] = e;
	}
	closedir(d);
	/* Oldest first, each pushed at the head: the newest file ends up hottest. */
	if (n)
		qsort(found, n, sizeof(*found), cmp_mtime);
	for (size_t i = 0; i < n; i++)
		do_td_insert(td, found[i]);
	free(found);
	td->scan_found = n;
	victims = do_td_evict(td);
	td_drop_victims(td, victims);
	return 0;
}

/* ---- public API ---------------------------------------------------------- */

int tier_disk_open(const struct tier_disk_config *cfg, struct tier_disk **out)
{
	struct tier_disk *td;
	int rc;

	if (!cfg || !cfg->path || !*cfg->path || !cfg->capacity_bytes)
		return -EINVAL;
	td = calloc(1, sizeof(*td));
	if (!td)
		return -ENOMEM;
	td->dirfd = td->lockfd = td->efd = -1;
	td->capacity = cfg->capacity_bytes;
	/* A capacity below --disk-size-gb's 1 GiB step, so that a test evicts
	 * from the disk without writing gigabytes. */
	uint64_t test_capacity;
	if (ks_fault_value(KS_FAULT_TIER_DISK_CAPACITY_BYTES, &test_capacity) && test_capacity)
		td->capacity = test_capacity;
	td->evicted_fn = cfg->evicted_fn;
	td->evicted_arg = cfg->evicted_arg;
	td->queue_depth = cfg->queue_depth ? cfg->queue_depth : TD_DEFAULT_QUEUE_DEPTH;
	td->staging_bytes = cfg->staging_bytes ? cfg->staging_bytes : TD_DEFAULT_STAGING;
	ks_list_init(&td->lru);
	td->nbuckets = 1024;
	td->buckets = calloc(td->nbuckets, sizeof(*td->buckets));
	td->path = strdup(cfg->path);
	if (!td->buckets || !td->path) {
		rc = -ENOMEM;
		goto out_free;
	}
	rc = ks_mutex_init(&td->lock, LOCK_RANK_TIER, "tier_disk");
	if (rc)
		goto out_free;
	if (cfg->lock_timeout_ms)
		td->lock.timeout_ms = cfg->lock_timeout_ms;
	if (mkdir(cfg->path, 0700) && errno != EEXIST) {
		rc = -errno;
		goto out_mutex;
	}
	td->dirfd = open(cfg->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (td->dirfd < 0) {
		rc = -errno;
		goto out_mutex;
	}
	td->lockfd = openat(td->dirfd, ".lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (td->lockfd < 0) {
		rc = -errno;
		goto out_close_fds;
	}
	if (flock(td->lockfd, LOCK_EX | LOCK_NB)) {
		rc = errno == EWOULDBLOCK ? -EBUSY : -errno;
		log_error("tier_disk: %s is in use by another process", cfg->path);
		goto out_close_fds;
	}
	td->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (td->efd < 0) {
		rc = -errno;
		goto out_close_fds;
	}
	rc = td_scan(td);
	if (rc)
		goto out_index;
	td->use_uring = !cfg->force_pwrite;
	if (td->use_uring) {
		int urc = ks_fault_fire(KS_FAULT_TIER_DISK_NO_URING)
				  ? -ENOSYS
				  : io_uring_queue_init(TD_RING_ENTRIES, &td->ring, 0);

		if (urc) {
			log_warn("tier_disk: io_uring unavailable (%s); using pread/pwrite",
				 strerror(-urc));
			td->use_uring = false;
		}
	}
	rc = -pthread_create(&td->thread, NULL, td_worker, td);
	if (rc)
		goto out_ring;
	log_info("tier_disk: %s: %zu chunk(s), %llu of %llu bytes, %s, %llu bad file(s) removed",
		 td->path, td->nobjects, (unsigned long long)td->bytes,
		 (unsigned long long)td->capacity, td->use_uring ? "io_uring" : "pread/pwrite",
		 (unsigned long long)td->scan_bad);
	*out = td;
	return 0;

out_ring:
	if (td->use_uring)
		io_uring_queue_exit(&td->ring);
out_index:
	td_free_entries(td);
out_close_fds:
	if (td->efd >= 0)
		close(td->efd);
	if (td->lockfd >= 0)
		close(td->lockfd);
	if (td->dirfd >= 0)
		close(td->dirfd);
out_mutex:
	ks_mutex_destroy(&td->lock);
out_free:
	free(td->buckets);
	free(td->path);
	free(td);
	return rc;
}

static void td_wake(struct tier_disk *td)
{
	uint64_t one = 1;

	/* EAGAIN means the counter is saturated: the worker is woken anyway. */
	if (write(td->efd, &one, sizeof(one)) < 0)
		(void)one;
}

void tier_disk_close(struct tier_disk *td)
{
	if (!td)
		return;
	/* The stop flag must be seen; a lock timeout here would leave the worker running. */
	while (ks_lock(&td->lock))
		log_warn("tier_disk: close: retrying the tier lock");
	td->stopping = true;
	ks_unlock(&td->lock);
	td_wake(td);
	/* Bounded: the worker's waits are TD_IDLE_WAIT_MS and it exits once idle. */
	pthread_join(td->thread, NULL);
	if (td->use_uring)
		io_uring_queue_exit(&td->ring);
	td_free_entries(td);
	close(td->efd);
	close(td->lockfd);
	close(td->dirfd);
	ks_mutex_destroy(&td->lock);
	free(td->buckets);
	free(td->path);
	free(td);
}

/* Append @r (allocated by the caller) to the FIFO. */
static void td_enqueue(struct tier_disk *td, struct td_req *r) REQUIRES(td->lock)
{
	r->next = NULL;
	if (td->qtail)
		td->qtail->next = r;
	else
		td->qhead = r;
	td->qtail = r;
}

int tier_disk_put(struct tier_disk *td, const struct ks_key *key, uint64_t layout_tag,
		  const void *data, size_t nbytes, unsigned flags, ks_tier_done_fn done,
		  void *arg)
{
	bool copy = flags & TIER_PUT_COPY;
	struct td_req *r;
	int rc;

	if (!nbytes || !data || TIER_CHUNK_HDR_SIZE + (uint64_t)nbytes > td->capacity)
		return -EINVAL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->op = TD_PUT;
	r->key = *key;
	r->layout_tag = layout_tag;
	r->data = data;
	r->nbytes = nbytes;
	r->done = done;
	r->arg = arg;

	rc = ks_lock(&td->lock);
	if (rc)
		goto out_free;
	if (td->stopping) {
		rc = -ECANCELED;
	} else if (td->pending >= td->queue_depth ||
		   (copy && td->staging_used + nbytes > td->staging_bytes)) {
		rc = -EAGAIN;
	} else {
		td->pending++;
		if (copy)
			td->staging_used += nbytes;
		else
			td_enqueue(td, r);
	}
	ks_unlock(&td->lock);
	if (rc == -EAGAIN)
		cnt_inc(td, dropped_full);
	if (rc)
		goto out_free;
	if (copy) {
		/* Slot and staging credit are reserved; copy with no lock held. */
		void *buf = malloc(nbytes);

		if (buf)
			memcpy(buf, data, nbytes);
		r->data = buf;
		r->owns_data = buf != NULL;
		rc = ks_lock(&td->lock);
		if (rc) {
			/* Lock timeout (logged): the credits stay taken, the memory does not. */
			free(buf);
			goto out_free;
		}
		if (buf) {
			td_enqueue(td, r);
		} else {
			td->pending--;
			td->staging_used -= nbytes;
			rc = -ENOMEM;
		}
		ks_unlock(&td->lock);
		if (rc)
			goto out_free;
	}
	td_wake(td);
	return 0;

out_free:
	free(r);
	return rc;
}

int tier_disk_get(struct tier_disk *td, const struct ks_key *key, void *dst, size_t cap,
		  ks_tier_done_fn done, void *arg)
{
	struct td_req *r = calloc(1, sizeof(*r));
	struct td_ent *e;
	int rc;

	if (!r)
		return -ENOMEM;
	r->op = TD_GET;
	r->key = *key;
	r->dst = dst;
	r->nbytes = cap;
	r->done = done;
	r->arg = arg;
	rc = ks_lock(&td->lock);
	if (rc)
		goto out_free;
	e = do_td_find(td, key);
	if (td->stopping) {
		rc = -ECANCELED;
	} else if (!e) {
		rc = -ENOENT;
	} else if (td->pending >= td->queue_depth) {
		rc = -EAGAIN;
	} else {
		/* A read makes the chunk hot again. */
		ks_list_move_first(&td->lru, &e->lru);
		td->pending++;
		td_enqueue(td, r);
	}
	ks_unlock(&td->lock);
	if (rc)
		goto out_free;
	cnt_inc(td, gets);
	td_wake(td);
	return 0;

out_free:
	if (rc == -ENOENT) {
		cnt_inc(td, gets);
		cnt_inc(td, misses);
	}
	free(r);
	return rc;
}

bool tier_disk_contains(struct tier_disk *td, const struct ks_key *key, uint64_t *layout_tag,
			size_t *nbytes)
{
	struct td_ent *e;

	if (ks_lock(&td->lock))
		return false;
	e = do_td_find(td, key);
	if (e && layout_tag)
		*layout_tag = e->layout_tag;
	if (e && nbytes)
		*nbytes = (size_t)e->payload_len;
	ks_unlock(&td->lock);
	return e != NULL;
}

size_t tier_disk_contains_prefix(struct tier_disk *td, const struct ks_key *keys, size_t n)
{
	size_t i = 0;

	if (ks_lock(&td->lock))
		return 0;
	while (i < n && do_td_find(td, &keys[i]))
		i++;
	ks_unlock(&td->lock);
	return i;
}

int tier_disk_remove(struct tier_disk *td, const struct ks_key *key)
{
	struct td_req *r = calloc(1, sizeof(*r));
	struct td_ent *e;
	int rc;

	if (!r)
		return -ENOMEM;
	r->op = TD_UNLINK;
	r->key = *key;
	rc = ks_lock(&td->lock);
	if (rc)
		goto out_free;
	e = do_td_find(td, key);
	if (e) {
		do_td_unlink(td, e);
		/* FIFO: a later put of this key renames only after this unlink ran. */
		td_enqueue(td, r);
		r = NULL;
	} else {
		rc = -ENOENT;
	}
	ks_unlock(&td->lock);
	free(e);
	if (!r)
		td_wake(td);
out_free:
	free(r);
	return rc;
}

void tier_disk_get_stats(struct tier_disk *td, struct tier_disk_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (ks_lock(&td->lock) == 0) {
		out->objects = td->nobjects;
		out->bytes = td->bytes;
		ks_unlock(&td->lock);
	}
	out->capacity_bytes = td->capacity;
#define LD(c) out->c = atomic_load_explicit(&td->c, memory_order_relaxed)
	LD(puts);
	LD(put_errors);
	LD(nospace);
	LD(dropped_full);
	LD(gets);
	LD(hits);
	LD(misses);
	LD(corrupt);
	LD(io_errors);
	LD(evictions);
#undef LD
	out->scan_found = td->scan_found;
	out->scan_bad = td->scan_bad;
	out->uring = td->use_uring;
}
