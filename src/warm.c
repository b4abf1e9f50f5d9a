/*
 * warm.c - warm restart state (--state-dir): pool file, slot commit table,
 * manifest (see warm.h for the files and the rules).
 *
 * Lock ordering (full list in docs/architecture.md): this file defines no
 * lock. Its journal callbacks run inside index calls (writing/ready with no
 * lock held, freed under a shard lock) and only store into the mapped slot
 * table; warm_restore takes the pool's and the index's locks one call at a
 * time (pool_take_slots, idx_restore_ready, pool_free) before any other
 * thread uses them. No lock is held across its file I/O.
 *
 * Crash rule: a record is READY only if its object's last byte was written
 * before the READY store (program order on the writing thread; after a
 * SIGKILL every store that thread executed is in the tmpfs page, which
 * outlives the process), and a slot's record leaves READY (WRITING) before
 * the first byte of a new object is written into it. So after any kill the
 * READY records name complete objects; the XXH3 of each is checked again at
 * start, which also catches anything else that wrote into the files.
 */
#include "warm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>
#define XXH_STATIC_LINKING_ONLY	/* XXH3_state_t on the stack */
#include <xxhash.h>

#include "chunk_key.h"
#include "compiler.h"
#include "log.h"

#define WARM_STATE_MAGIC "KVSTSTAT"
#define WARM_SLOTS_MAGIC "KVSTSLOT"
#define WARM_BYTE_ORDER 0x01020304u
#define WARM_SLOTS_HDR_BYTES 4096u
#define WARM_STATE_MAX_BYTES (64u << 20)	/* a manifest is KiBs; refuse anything absurd */
#define WARM_VERIFY_THREADS_MAX 16u
#define WARM_TMPFS_MAGIC 0x01021994
#define WARM_HUGETLBFS_MAGIC 0x958458f6

enum warm_rec_state { REC_FREE = 0, REC_WRITING = 1, REC_READY = 2 };

/* One slot's commit record; 384 bytes, so records never share a cache line pair. */
struct warm_rec {
	_Alignas(64) _Atomic uint32_t state;	/* enum warm_rec_state; stored last */
	uint32_t slot;		/* its own index: a record copied elsewhere is caught */
	uint64_t nbytes;
	uint64_t data_sum;	/* XXH3-64 of the object's nbytes bytes */
	uint64_t seq;		/* commit order, for the LRU order after a restart */
	uint64_t rec_sum;	/* XXH3-64 of slot, nbytes, data_sum, seq and the key's fields */
	struct ks_key key;	/* model zero-padded */
};
_Static_assert(sizeof(struct warm_rec) % 64 == 0, "records are whole cache lines");

struct warm_slots_hdr {
	char magic[8];
	uint32_t version;
	uint32_t byte_order;
	uint64_t region_bytes;
	uint64_t slot_bytes;
	uint32_t nslots;
	uint32_t record_bytes;
	uint32_t chunk_tokens;
	uint32_t reserved;
	uint64_t sum;		/* XXH3-64 of the fields above */
};

struct warm_state_hdr {
	char magic[8];
	uint32_t version;
	uint32_t byte_order;
	uint64_t region_bytes;
	uint64_t pool_file_bytes;
	uint32_t chunk_tokens;
	uint32_t clean;		/* 1: written after the drain at SIGTERM */
	uint64_t written_unix_ms;
	uint32_t writer_pid;
	uint32_t nregs;
	char writer_version[32];
	/* then nregs x { uint64_t len; len bytes }, then uint64_t XXH3-64 of all before */
};

struct warm {
	char dir[PATH_MAX];
	int lock_fd;
	uint64_t region_bytes, pool_file_bytes;
	uint32_t chunk_tokens;
	uint8_t *region;		/* borrowed view (the pool owns the mapping) */
	int pool_fd;			/* the pool file, read by the checksum pass; -1 */
	/* The slot table: published once with a release store (journal readers acquire). */
	struct warm_slots_hdr *slots_map;
	size_t slots_map_bytes;
	struct warm_rec *_Atomic recs;
	uint32_t nslots;
	_Atomic uint64_t next_seq;
	/* Resumed state: the slot geometry and table found at open, not yet restored. */
	uint64_t resume_slot_bytes;
	/* Resumed manifest: registrations point into manifest_buf. */
	uint8_t *manifest_buf;
	struct warm_blob *regs;
	size_t nregs;
};

/* ---- small helpers ---- */

static void path_of(const struct warm *w, const char *name, char *out, size_t cap)
{
	snprintf(out, cap, "%s/%s", w->dir, name);
}

static uint64_t slots_hdr_sum(const struct warm_slots_hdr *h)
{
	return XXH3_64bits(h, offsetof(struct warm_slots_hdr, sum));
}

static uint64_t rec_sum_of(const struct warm_rec *r)
{
	struct {
		uint32_t slot, kv_rank;
		uint64_t nbytes, data_sum, seq;
		uint8_t hash[KS_HASH_LEN];
		uint16_t model_len;
	} f;
	XXH3_state_t st;

	memset(&f, 0, sizeof(f));
	f.slot = r->slot;
	f.kv_rank = r->key.kv_rank;
	f.nbytes = r->nbytes;
	f.data_sum = r->data_sum;
	f.seq = r->seq;
	memcpy(f.hash, r->key.chunk_hash, KS_HASH_LEN);
	f.model_len = r->key.model_len;
	XXH3_64bits_reset(&st);
	XXH3_64bits_update(&st, &f, sizeof(f));
	XXH3_64bits_update(&st, r->key.model, KS_MIN((size_t)r->key.model_len, (size_t)KS_MODEL_MAX));
	return XXH3_64bits_digest(&st);
}

static int read_all(const char *path, uint8_t **out, size_t *len, size_t max)
{
	struct stat st;
	uint8_t *buf;
	size_t got = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC), rc = 0;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		goto out;
	}
	if ((uint64_t)st.st_size > max) {
		rc = -EFBIG;
		goto out;
	}
	buf = malloc((size_t)st.st_size + 1);
	if (!buf) {
		rc = -ENOMEM;
		goto out;
	}
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = n < 0 ? -errno : -EIO;
			free(buf);
			goto out;
		}
		got += (size_t)n;
	}
	*out = buf;
	*len = got;
out:
	close(fd);
	return rc;
}

static int write_all(int fd, const void *data, size_t len)
{
	const uint8_t *p = data;

	while (len) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static bool file_exists(const struct warm *w, const char *name)
{
	char p[PATH_MAX + 16];
	struct stat st;

	path_of(w, name, p, sizeof(p));
	return lstat(p, &st) == 0;
}

static void unlink_in(const struct warm *w, const char *name)
{
	char p[PATH_MAX + 16];

	path_of(w, name, p, sizeof(p));
	if (unlink(p) < 0 && errno != ENOENT)
		log_warn("state dir: cannot remove %s: %s", p, strerror(errno));
}

/* ---- open ---- */

static int lock_dir(struct warm *w, char *err, size_t errlen)
{
	char p[PATH_MAX + 16], pid[32] = "";
	int n;

	path_of(w, "lock", p, sizeof(p));
	w->lock_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (w->lock_fd < 0) {
		int e = errno;

		snprintf(err, errlen, "cannot open %s: %s", p, strerror(e));
		return -e;
	}
	if (flock(w->lock_fd, LOCK_EX | LOCK_NB) < 0) {
		int e = errno;
		ssize_t r = pread(w->lock_fd, pid, sizeof(pid) - 1, 0);

		pid[r > 0 ? r : 0] = '\0';
		pid[strcspn(pid, "\n")] = '\0';
		snprintf(err, errlen, e == EWOULDBLOCK ? "in use by another kvstashd (pid %s): two "
			 "servers must never share a pool" : "flock %s: %s", e == EWOULDBLOCK ?
			 (pid[0] ? pid : "?") : p, strerror(e));
		return e == EWOULDBLOCK ? -EBUSY : -e;
	}
	n = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
	if (ftruncate(w->lock_fd, 0) < 0 || pwrite(w->lock_fd, pid, (size_t)n, 0) != n)
		log_warn("state dir: cannot write the pid into %s: %s", p, strerror(errno));
	return 0;
}

/* Map the pool file @fd of w->pool_file_bytes shared; 0 or -errno. */
static int map_pool(struct warm *w, int fd, void **region)
{
	void *p = mmap(NULL, w->pool_file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		return -errno;
	/* Transparent hugepages for shmem where the mount allows (huge=advise/always). */
	if (w->pool_file_bytes % (2ull << 20) == 0)
		(void)madvise(p, w->pool_file_bytes, MADV_HUGEPAGE);
	*region = p;
	w->region = p;
	return 0;
}

/* Room for the pool file on the state dir's filesystem (@have bytes already allocated). */
static int check_space(struct warm *w, int fd, uint64_t have, char *err, size_t errlen)
{
	struct statvfs vs;
	uint64_t avail;

	if (fstatvfs(fd, &vs) < 0)
		return 0;	/* cannot tell: the copies' SIGBUS guard still catches it */
	avail = (uint64_t)vs.f_bavail * vs.f_frsize + have;
	if (avail >= w->pool_file_bytes)
		return 0;
	snprintf(err, errlen, "its filesystem has %" PRIu64 " MiB free, the pool needs %" PRIu64
		 " MiB (mount a tmpfs with size= at least the pool: docs/operations.md, "
		 "\"Warm restart\")", avail >> 20, w->pool_file_bytes >> 20);
	return -ENOSPC;
}

/*
 * Validate the manifest, the pool file and the slot table; map the pool.
 * 0 = resumed; 1 = refused (reason in found->why); -errno = I/O failure
 * of a usable state (also refused by the caller).
 */
static int try_resume(struct warm *w, struct warm_found *found, void **region)
{
	char p[PATH_MAX + 16];
	const struct warm_state_hdr *h;
	uint8_t *buf = NULL;
	size_t len = 0, off;
	struct stat st;
	int fd = -1, rc;

#define REFUSE(...)                                                              \
	do {                                                                     \
		snprintf(found->why, sizeof(found->why), __VA_ARGS__);           \
		rc = 1;                                                          \
		goto out;                                                        \
	} while (0)

	path_of(w, "state", p, sizeof(p));
	rc = read_all(p, &buf, &len, WARM_STATE_MAX_BYTES);
	if (rc == -ENOENT)
		REFUSE("no manifest (state) beside the pool: an interrupted first start, or "
		       "files not written by kvstashd");
	if (rc)
		REFUSE("cannot read the manifest: %s", strerror(-rc));
	if (len < 8 || memcmp(buf, WARM_STATE_MAGIC, 8))
		REFUSE("manifest is not a kvstash state file (bad magic)");
	if (len < sizeof(*h) + 8)
		REFUSE("manifest truncated (%zu bytes)", len);
	h = (const struct warm_state_hdr *)buf;
	if (h->byte_order != WARM_BYTE_ORDER)
		REFUSE("manifest written on a machine of another byte order");
	if (h->version != WARM_FORMAT_VERSION)
		REFUSE("state format version %u, this kvstashd reads version %u", h->version,
		       WARM_FORMAT_VERSION);
	{
		uint64_t want;

		memcpy(&want, buf + len - 8, 8);
		if (XXH3_64bits(buf, len - 8) != want)
			REFUSE("manifest checksum mismatch (truncated or corrupted)");
	}
	if (h->region_bytes != w->region_bytes)
		REFUSE("pool size changed: the state has %" PRIu64 " bytes, --pool-size is %" PRIu64,
		       h->region_bytes, w->region_bytes);
	if (h->chunk_tokens != w->chunk_tokens)
		REFUSE("chunk size changed: the state has %u tokens, --chunk-size is %u",
		       h->chunk_tokens, w->chunk_tokens);
	if (h->pool_file_bytes != w->pool_file_bytes)
		REFUSE("pool file size %" PRIu64 " in the manifest, expected %" PRIu64,
		       h->pool_file_bytes, w->pool_file_bytes);
	/* The registrations: walk the blobs, bounded by the file. */
	w->regs = calloc(h->nregs ? h->nregs : 1, sizeof(*w->regs));
	if (!w->regs) {
		rc = -ENOMEM;
		goto out;
	}
	off = sizeof(*h);
	for (uint32_t i = 0; i < h->nregs; i++) {
		uint64_t bl;

		if (off + 8 > len - 8)
			REFUSE("manifest truncated in registration %u", i);
		memcpy(&bl, buf + off, 8);
		off += 8;
		if (bl > len - 8 - off)
			REFUSE("manifest registration %u runs past the end", i);
		w->regs[i].data = buf + off;
		w->regs[i].len = (size_t)bl;
		off += (size_t)bl;
	}
	if (off != len - 8)
		REFUSE("manifest has %zu trailing bytes", len - 8 - off);
	w->nregs = h->nregs;
	found->clean = h->clean == 1;

	/* The slot table, if slots were configured before the exit. */
	path_of(w, "slots", p, sizeof(p));
	fd = open(p, O_RDWR | O_CLOEXEC);
	if (fd >= 0) {
		struct warm_slots_hdr sh;
		uint64_t nslots, want_bytes;

		if (fstat(fd, &st) < 0 || (uint64_t)st.st_size < WARM_SLOTS_HDR_BYTES ||
		    pread(fd, &sh, sizeof(sh), 0) != (ssize_t)sizeof(sh))
			REFUSE("slot table truncated (%lld bytes)", (long long)st.st_size);
		if (memcmp(sh.magic, WARM_SLOTS_MAGIC, 8) || sh.byte_order != WARM_BYTE_ORDER)
			REFUSE("slot table is not a kvstash slot table (bad magic)");
		if (sh.version != WARM_FORMAT_VERSION)
			REFUSE("slot table format version %u, this kvstashd reads version %u",
			       sh.version, WARM_FORMAT_VERSION);
		if (sh.sum != slots_hdr_sum(&sh))
			REFUSE("slot table header checksum mismatch (corrupted)");
		nslots = sh.slot_bytes ? w->region_bytes / sh.slot_bytes : 0;
		if (nslots >= POOL_NO_SLOT)
			nslots = POOL_NO_SLOT - 1;
		if (sh.region_bytes != w->region_bytes || sh.chunk_tokens != w->chunk_tokens ||
		    !sh.slot_bytes || sh.slot_bytes % POOL_SLOT_ALIGN || sh.nslots != nslots ||
		    sh.record_bytes != sizeof(struct warm_rec))
			REFUSE("slot geometry changed or invalid: %u slots of %" PRIu64 " bytes, "
			       "records of %u bytes (this kvstashd: records of %zu bytes)",
			       sh.nslots, sh.slot_bytes, sh.record_bytes, sizeof(struct warm_rec));
		want_bytes = WARM_SLOTS_HDR_BYTES + nslots * sizeof(struct warm_rec);
		if ((uint64_t)st.st_size != want_bytes)
			REFUSE("slot table is %lld bytes, its geometry needs %" PRIu64,
			       (long long)st.st_size, want_bytes);
		w->slots_map = mmap(NULL, (size_t)want_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
				    fd, 0);
		if (w->slots_map == MAP_FAILED) {
			w->slots_map = NULL;
			REFUSE("cannot map the slot table: %s", strerror(errno));
		}
		w->slots_map_bytes = (size_t)want_bytes;
		w->nslots = (uint32_t)nslots;
		w->resume_slot_bytes = sh.slot_bytes;
		close(fd);
		fd = -1;
	} else if (errno != ENOENT) {
		REFUSE("cannot open the slot table: %s", strerror(errno));
	}

	path_of(w, "pool", p, sizeof(p));
	fd = open(p, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		REFUSE("cannot open the pool file: %s", strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
	    (uint64_t)st.st_size != w->pool_file_bytes)
		REFUSE("pool file is %lld bytes, the manifest says %" PRIu64,
		       (long long)st.st_size, w->pool_file_bytes);
	{
		char e[256];

		if (check_space(w, fd, (uint64_t)st.st_blocks * 512, e, sizeof(e)))
			REFUSE("%s", e);
	}
	rc = map_pool(w, fd, region);
	if (rc)
		REFUSE("cannot map the pool file: %s", strerror(-rc));
	w->pool_fd = fd;	/* for the checksum pass */
	fd = -1;
	found->resumed = true;
	found->slot_bytes = w->resume_slot_bytes;
	w->manifest_buf = buf;
	buf = NULL;
	rc = 0;
out:
#undef REFUSE
	if (fd >= 0)
		close(fd);
	free(buf);
	if (rc) {
		if (w->slots_map)
			munmap(w->slots_map, w->slots_map_bytes);
		w->slots_map = NULL;
		w->slots_map_bytes = 0;
		w->nslots = 0;
		w->resume_slot_bytes = 0;
		free(w->regs);
		w->regs = NULL;
		w->nregs = 0;
		found->clean = false;
	}
	return rc;
}

/* Move a refused state's index files to rejected/ (replacing older ones), drop its pool. */
static void set_aside(struct warm *w)
{
	char rej[PATH_MAX + 16], from[PATH_MAX + 16], to[PATH_MAX + 32];
	static const char *const moved[] = { "state", "slots" };

	path_of(w, "rejected", rej, sizeof(rej));
	if (mkdir(rej, 0700) < 0 && errno != EEXIST)
		log_warn("state dir: cannot create %s: %s", rej, strerror(errno));
	for (size_t i = 0; i < KS_ARRAY_SIZE(moved); i++) {
		path_of(w, moved[i], from, sizeof(from));
		snprintf(to, sizeof(to), "%s/%s", rej, moved[i]);
		if (rename(from, to) < 0 && errno != ENOENT) {
			log_warn("state dir: cannot move %s to %s: %s", from, to, strerror(errno));
			unlink_in(w, moved[i]);
		}
	}
	unlink_in(w, "pool");
	unlink_in(w, "state.tmp");
}

static int fresh_pool(struct warm *w, void **region, char *err, size_t errlen)
{
	char p[PATH_MAX + 16];
	int fd, rc;

	unlink_in(w, "slots");
	unlink_in(w, "state");
	unlink_in(w, "state.tmp");
	unlink_in(w, "pool");
	path_of(w, "pool", p, sizeof(p));
	fd = open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot create %s: %s", p, strerror(-rc));
		return rc;
	}
	rc = check_space(w, fd, 0, err, errlen);
	if (!rc && ftruncate(fd, (off_t)w->pool_file_bytes) < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot size %s to %" PRIu64 " bytes: %s", p,
			 w->pool_file_bytes, strerror(-rc));
	}
	if (!rc) {
		rc = map_pool(w, fd, region);
		if (rc)
			snprintf(err, errlen, "cannot map %s (%" PRIu64 " bytes): %s", p,
				 w->pool_file_bytes, strerror(-rc));
	}
	close(fd);
	if (rc)
		unlink(p);
	return rc;
}

int warm_open(const char *dir, uint64_t region_bytes, uint32_t chunk_tokens, struct warm **out,
	      void **region, size_t *map_bytes, struct warm_found *found, char *err,
	      size_t errlen)
{
	struct warm *w;
	struct statfs fs;
	struct stat st;
	int rc;

	memset(found, 0, sizeof(*found));
	if (strlen(dir) >= PATH_MAX - 32) {
		snprintf(err, errlen, "path too long");
		return -ENAMETOOLONG;
	}
	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		rc = -errno;
		snprintf(err, errlen, "cannot create it: %s", strerror(-rc));
		return rc;
	}
	if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
		snprintf(err, errlen, "not a directory");
		return -ENOTDIR;
	}
	if (statfs(dir, &fs) == 0 && (uint32_t)fs.f_type == (uint32_t)WARM_HUGETLBFS_MAGIC) {
		snprintf(err, errlen, "is on hugetlbfs, which cannot hold the manifest (no write(2)); "
			 "use a tmpfs, mounted with huge=always for huge pages");
		return -EINVAL;
	}
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	snprintf(w->dir, sizeof(w->dir), "%s", dir);
	w->lock_fd = -1;
	w->pool_fd = -1;
	w->region_bytes = region_bytes;
	w->pool_file_bytes = ks_align_up(region_bytes, POOL_SLOT_ALIGN);
	w->chunk_tokens = chunk_tokens;
	atomic_init(&w->next_seq, 1);
	rc = lock_dir(w, err, errlen);
	if (rc)
		goto out_free;
	if (statfs(dir, &fs) == 0 && (uint32_t)fs.f_type != (uint32_t)WARM_TMPFS_MAGIC)
		log_warn("--state-dir %s is not on tmpfs: the kernel writes the pool's dirty pages "
			 "back to that filesystem (disk traffic at the STORE rate); use /dev/shm or a "
			 "dedicated tmpfs", dir);

	if (file_exists(w, "state") || file_exists(w, "pool") || file_exists(w, "slots")) {
		rc = try_resume(w, found, region);
		if (rc) {
			if (rc < 0)
				snprintf(found->why, sizeof(found->why), "%s", strerror(-rc));
			found->refused = true;
			set_aside(w);
		}
	}
	if (!found->resumed) {
		rc = fresh_pool(w, region, err, errlen);
		if (rc)
			goto out_free;
	}
	*map_bytes = w->pool_file_bytes;
	*out = w;
	return 0;
out_free:
	warm_close(w);
	return rc;
}

void warm_close(struct warm *w)
{
	if (!w)
		return;
	if (w->slots_map)
		munmap(w->slots_map, w->slots_map_bytes);
	if (w->lock_fd >= 0)
		close(w->lock_fd);	/* drops the flock */
	if (w->pool_fd >= 0)
		close(w->pool_fd);
	free(w->manifest_buf);
	free(w->regs);
	free(w);
}

/* ---- journal ---- */

static struct warm_rec *rec_of(struct warm *w, uint32_t slot)
{
	struct warm_rec *recs = atomic_load_explicit(&w->recs, memory_order_acquire);

	return recs && slot < w->nslots ? &recs[slot] : NULL;
}

static void journal_writing(void *arg, uint32_t slot)
{
	struct warm_rec *r = rec_of(arg, slot);

	if (!r)
		return;
	atomic_store_explicit(&r->state, REC_WRITING, memory_order_relaxed);
	/* No store of the new object may come before this one (compiler or CPU). */
	atomic_thread_fence(memory_order_seq_cst);
}

static void journal_ready(void *arg, uint32_t slot, const struct ks_key *k, const void *data,
			  uint64_t nbytes)
{
	struct warm *w = arg;
	struct warm_rec *r = rec_of(w, slot);

	if (!r)
		return;
	/* The record is WRITING and ours: its fields change with no reader trusting them. */
	r->slot = slot;
	r->nbytes = nbytes;
	r->data_sum = XXH3_64bits(data, (size_t)nbytes);
	r->seq = atomic_fetch_add_explicit(&w->next_seq, 1, memory_order_relaxed);
	memset(&r->key, 0, sizeof(r->key));
	memcpy(r->key.chunk_hash, k->chunk_hash, KS_HASH_LEN);
	r->key.kv_rank = k->kv_rank;
	r->key.model_len = k->model_len;
	memcpy(r->key.model, k->model, KS_MIN((size_t)k->model_len, (size_t)KS_MODEL_MAX));
	r->rec_sum = rec_sum_of(r);
	/* Everything above (and the object) before READY. */
	atomic_store_explicit(&r->state, REC_READY, memory_order_release);
}

static void journal_freed(void *arg, uint32_t slot)
{
	struct warm_rec *r = rec_of(arg, slot);

	if (r)
		atomic_store_explicit(&r->state, REC_FREE, memory_order_release);
}

void warm_journal(struct warm *w, struct idx_journal *j)
{
	j->writing = journal_writing;
	j->ready = journal_ready;
	j->freed = journal_freed;
	j->arg = w;
}

/* ---- restore ---- */

enum verdict { V_FREE = 0, V_OK, V_WRITING, V_CHECKSUM, V_RECORD };

struct verify_part {
	struct warm *w;
	struct warm_rec *recs;
	uint64_t slot_bytes;
	uint8_t *verdict;
	uint32_t from, to;
	uint64_t bytes;
	pthread_t thread;
};

#define VERIFY_BUF_BYTES (1u << 20)

/*
 * XXH3 of @nbytes of the pool file at @off, read with pread() into @buf
 * rather than through the shared mapping: a fresh mapping of a tmpfs file
 * takes a page fault (and a TLB miss) per 4 KiB page, which made the pass
 * 10x slower than the kernel's copy from its direct map (measured: 1 GiB
 * in 2.9 s mapped, 0.3 s read). A read error reads as a mismatch.
 */
static bool object_sum_ok(int fd, uint8_t *buf, uint64_t off, uint64_t nbytes, uint64_t want)
{
	XXH3_state_t st;

	XXH3_64bits_reset(&st);
	while (nbytes) {
		size_t n = (size_t)KS_MIN(nbytes, (uint64_t)VERIFY_BUF_BYTES);
		ssize_t got = pread(fd, buf, n, (off_t)off);

		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return false;
		XXH3_64bits_update(&st, buf, (size_t)got);
		off += (uint64_t)got;
		nbytes -= (uint64_t)got;
	}
	return XXH3_64bits_digest(&st) == want;
}

static bool key_sane(const struct ks_key *k)
{
	if (k->model_len > KS_MODEL_MAX || k->model[k->model_len] != '\0')
		return false;
	for (size_t i = k->model_len; i <= KS_MODEL_MAX; i++)
		if (k->model[i])
			return false;
	return true;
}

static void *verify_run(void *arg)
{
	struct verify_part *vp = arg;
	uint8_t *buf = malloc(VERIFY_BUF_BYTES);

	for (uint32_t i = vp->from; i < vp->to; i++) {
		const struct warm_rec *r = &vp->recs[i];
		uint32_t st = atomic_load_explicit(&r->state, memory_order_acquire);

		if (st == REC_FREE) {
			vp->verdict[i] = V_FREE;
		} else if (st == REC_WRITING) {
			vp->verdict[i] = V_WRITING;
		} else if (st != REC_READY || r->slot != i || !r->nbytes ||
			   r->nbytes > vp->slot_bytes || !key_sane(&r->key) ||
			   r->rec_sum != rec_sum_of(r)) {
			vp->verdict[i] = V_RECORD;
		} else if (buf && vp->w->pool_fd >= 0) {
			vp->bytes += r->nbytes;
			vp->verdict[i] = object_sum_ok(vp->w->pool_fd, buf, (uint64_t)i * vp->slot_bytes,
						       r->nbytes, r->data_sum) ? V_OK : V_CHECKSUM;
		} else {
			vp->bytes += r->nbytes;
			vp->verdict[i] = XXH3_64bits(vp->w->region + (uint64_t)i * vp->slot_bytes,
						     (size_t)r->nbytes) == r->data_sum ? V_OK :
										 V_CHECKSUM;
		}
	}
	free(buf);
	return NULL;
}

static const struct warm_rec *sort_recs;

static int by_seq(const void *a, const void *b)
{
	uint64_t x = sort_recs[*(const uint32_t *)a].seq, y = sort_recs[*(const uint32_t *)b].seq;

	return x < y ? -1 : x > y;
}

static int restore_records(struct warm *w, struct pool *p, struct idx *ix, struct warm_rec *recs,
			   uint64_t slot_bytes, struct warm_restored *r)
{
	uint32_t n = w->nslots, nok = 0, nthreads;
	uint8_t *verdict = calloc(n ? n : 1, 1);
	uint32_t *ok = malloc((n ? n : 1) * sizeof(*ok));
	struct verify_part parts[WARM_VERIFY_THREADS_MAX];
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	struct timespec t0, t1;
	uint64_t max_seq = 0;
	int rc = 0;

	if (!verdict || !ok) {
		free(verdict);
		free(ok);
		return -ENOMEM;
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	nthreads = (uint32_t)KS_MAX(1L, KS_MIN(ncpu, (long)WARM_VERIFY_THREADS_MAX));
	if (nthreads > n / 64 + 1)
		nthreads = n / 64 + 1;
	for (uint32_t t = 0; t < nthreads; t++) {
		parts[t] = (struct verify_part){ .w = w, .recs = recs, .slot_bytes = slot_bytes,
						 .verdict = verdict,
						 .from = (uint32_t)((uint64_t)n * t / nthreads),
						 .to = (uint32_t)((uint64_t)n * (t + 1) / nthreads) };
		/* Thread 0's part runs on this thread; a failed create does it here too. */
		if (t == 0 || pthread_create(&parts[t].thread, NULL, verify_run, &parts[t]))
			parts[t].thread = 0;
	}
	verify_run(&parts[0]);
	for (uint32_t t = 1; t < nthreads; t++) {
		if (parts[t].thread)
			pthread_join(parts[t].thread, NULL);
		else
			verify_run(&parts[t]);
	}
	for (uint32_t t = 0; t < nthreads; t++)
		r->verified_bytes += parts[t].bytes;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	r->verify_s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;

	for (uint32_t i = 0; i < n; i++) {
		switch (verdict[i]) {
		case V_OK:
			ok[nok++] = i;
			max_seq = KS_MAX(max_seq, recs[i].seq);
			continue;
		case V_WRITING:
			r->dropped_writing++;
			break;
		case V_CHECKSUM:
			r->dropped_checksum++;
			break;
		case V_RECORD:
			r->dropped_record++;
			break;
		default:
			continue;
		}
		atomic_store_explicit(&recs[i].state, REC_FREE, memory_order_relaxed);
	}
	/* Take the slots of what is kept, then link it oldest commit first, so the
	 * LRU's cold end holds what was committed longest ago. */
	for (uint32_t i = 0; i < n; i++)
		verdict[i] = verdict[i] == V_OK;
	rc = pool_take_slots(p, verdict);
	if (rc) {
		log_error("state dir: cannot take the resumed slots: %s", strerror(-rc));
		for (uint32_t i = 0; i < nok; i++)
			atomic_store_explicit(&recs[ok[i]].state, REC_FREE, memory_order_relaxed);
		r->dropped_record += nok;
		goto out;
	}
	sort_recs = recs;
	qsort(ok, nok, sizeof(*ok), by_seq);
	for (uint32_t k = 0; k < nok; k++) {
		uint32_t i = ok[k];
		int lrc = idx_restore_ready(ix, &recs[i].key, i, recs[i].nbytes);

		if (lrc == 0) {
			r->chunks++;
			continue;
		}
		if (lrc != -EEXIST)
			log_warn("state dir: slot %u not restored: %s", i, strerror(-lrc));
		r->dropped_record++;	/* a key twice: an eviction's old copy outlived the kill */
		atomic_store_explicit(&recs[i].state, REC_FREE, memory_order_relaxed);
		pool_free(p, i);
	}
	atomic_store_explicit(&w->next_seq, max_seq + 1, memory_order_relaxed);
out:
	free(verdict);
	free(ok);
	return rc;
}

/* Create the slot table for @p's geometry (a fresh pool, or a resumed one without). */
static int create_slots(struct warm *w, struct pool *p, uint64_t slot_bytes)
{
	char path[PATH_MAX + 16];
	struct warm_slots_hdr h;
	uint32_t n = pool_nslots(p);
	size_t bytes = WARM_SLOTS_HDR_BYTES + (size_t)n * sizeof(struct warm_rec);
	void *m;
	int fd, rc = 0;

	path_of(w, "slots", path, sizeof(path));
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)bytes) < 0) {
		rc = -errno;
		goto out;
	}
	m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		rc = -errno;
		goto out;
	}
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, WARM_SLOTS_MAGIC, 8);
	h.version = WARM_FORMAT_VERSION;
	h.byte_order = WARM_BYTE_ORDER;
	h.region_bytes = w->region_bytes;
	h.slot_bytes = slot_bytes;
	h.nslots = n;
	h.record_bytes = sizeof(struct warm_rec);
	h.chunk_tokens = w->chunk_tokens;
	h.sum = slots_hdr_sum(&h);
	memcpy(m, &h, sizeof(h));
	w->slots_map = m;
	w->slots_map_bytes = bytes;
	w->nslots = n;
	log_info("state dir %s: slot table of %u slots (%zu KiB)", w->dir, n, bytes >> 10);
out:
	close(fd);
	return rc;
}

int warm_restore(struct warm *w, struct pool *p, struct idx *ix, struct warm_restored *r)
{
	uint64_t slot_bytes = pool_slot_bytes(p);
	struct warm_rec *recs;
	int rc = 0;

	memset(r, 0, sizeof(*r));
	if (!slot_bytes || atomic_load_explicit(&w->recs, memory_order_acquire))
		return 0;
	if (w->slots_map && w->resume_slot_bytes != slot_bytes) {
		/* Configured otherwise than the table says: it cannot be trusted. */
		log_warn("state dir %s: slot table for %" PRIu64 "-byte slots, the pool has %" PRIu64
			 ": its objects are dropped", w->dir, w->resume_slot_bytes, slot_bytes);
		munmap(w->slots_map, w->slots_map_bytes);
		w->slots_map = NULL;
	}
	if (w->slots_map) {
		recs = (struct warm_rec *)((uint8_t *)w->slots_map + WARM_SLOTS_HDR_BYTES);
		rc = restore_records(w, p, ix, recs, slot_bytes, r);
	} else {
		rc = create_slots(w, p, slot_bytes);
		if (rc) {
			log_error("state dir %s: cannot create the slot table: %s (objects stored from "
				  "now on do not survive a restart)", w->dir, strerror(-rc));
			return rc;
		}
		recs = (struct warm_rec *)((uint8_t *)w->slots_map + WARM_SLOTS_HDR_BYTES);
	}
	w->resume_slot_bytes = 0;
	atomic_store_explicit(&w->recs, recs, memory_order_release);
	return rc;
}

/* ---- manifest ---- */

size_t warm_nregs(const struct warm *w)
{
	return w->nregs;
}

struct warm_blob warm_reg(const struct warm *w, size_t i)
{
	return w->regs[i];
}

int warm_save(struct warm *w, bool clean, const struct warm_blob *regs, size_t nregs)
{
	char tmp[PATH_MAX + 16], dst[PATH_MAX + 16];
	struct warm_state_hdr h;
	struct timespec now;
	XXH3_state_t st;
	uint64_t sum;
	int fd, dfd, rc = 0;

	memset(&h, 0, sizeof(h));
	memcpy(h.magic, WARM_STATE_MAGIC, 8);
	h.version = WARM_FORMAT_VERSION;
	h.byte_order = WARM_BYTE_ORDER;
	h.region_bytes = w->region_bytes;
	h.pool_file_bytes = w->pool_file_bytes;
	h.chunk_tokens = w->chunk_tokens;
	h.clean = clean ? 1 : 0;
	clock_gettime(CLOCK_REALTIME, &now);
	h.written_unix_ms = (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
	h.writer_pid = (uint32_t)getpid();
	h.nregs = (uint32_t)nregs;
	snprintf(h.writer_version, sizeof(h.writer_version), "%s", KVSTASH_VERSION);

	path_of(w, "state.tmp", tmp, sizeof(tmp));
	path_of(w, "state", dst, sizeof(dst));
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	XXH3_64bits_reset(&st);
	XXH3_64bits_update(&st, &h, sizeof(h));
	rc = write_all(fd, &h, sizeof(h));
	for (size_t i = 0; !rc && i < nregs; i++) {
		uint64_t len = regs[i].len;

		XXH3_64bits_update(&st, &len, 8);
		XXH3_64bits_update(&st, regs[i].data, regs[i].len);
		rc = write_all(fd, &len, 8);
		if (!rc)
			rc = write_all(fd, regs[i].data, regs[i].len);
	}
	sum = XXH3_64bits_digest(&st);
	if (!rc)
		rc = write_all(fd, &sum, 8);
	if (!rc && fsync(fd) < 0)
		rc = -errno;
	close(fd);
	if (!rc && rename(tmp, dst) < 0)
		rc = -errno;
	if (rc) {
		unlink(tmp);
		return rc;
	}
	dfd = open(w->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		(void)fsync(dfd);
		close(dfd);
	}
	return 0;
}

uint64_t warm_ready_count(const struct warm *w)
{
	struct warm_rec *recs = atomic_load_explicit(&((struct warm *)w)->recs,
						     memory_order_acquire);
	uint64_t n = 0;

	for (uint32_t i = 0; recs && i < w->nslots; i++)
		n += atomic_load_explicit(&recs[i].state, memory_order_relaxed) == REC_READY;
	return n;
}
