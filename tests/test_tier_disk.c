/* Description: L2 disk tier on a real directory: round trips, restart, corruption, eviction, queue full, pwrite fallback, file-size limit. Labels: unit tsan */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chunk_key.h"
#include "fault.h"
#include "helpers.h"
#include "tier_chunk.h"
#include "tier_disk.h"
#include "tierwait.h"

/* Wait (10 s at most) for @w; returns its status, or -ETIME on timeout. */
#define WAIT_MS 10000	/* the longest a tier callback may take here */

static int wait_done(struct waiter *w)
{
	return wait_done_ms(w, WAIT_MS);
}

static struct ks_key mkkey(unsigned i)
{
	struct ks_key k;
	uint8_t h[KS_HASH_LEN];

	for (unsigned b = 0; b < KS_HASH_LEN; b++)
		h[b] = (uint8_t)(i * 131 + b * 7 + (i >> 8));
	ks_key_init(&k, h, "llama-3-8b", 10, ks_kv_rank(2, i & 1));
	return k;
}

static void file_path(const char *dir, const struct ks_key *k, char *out, size_t n)
{
	char name[TIER_CHUNK_NAME_MAX];

	tier_chunk_name(k, name);
	snprintf(out, n, "%s/%s.kvc", dir, name);
}

static struct tier_disk *open_td(const char *dir, uint64_t cap, unsigned depth, bool pw)
{
	struct tier_disk_config cfg = { .path = dir, .capacity_bytes = cap,
					.queue_depth = depth, .force_pwrite = pw };
	struct tier_disk *td = NULL;
	int rc = tier_disk_open(&cfg, &td);

	if (rc)
		fprintf(stderr, "tier_disk_open: %s\n", strerror(-rc));
	REQUIRE(rc == 0 && td);
	return td;
}

static int put_sync(struct tier_disk *td, const struct ks_key *k, uint64_t tag, const void *d,
		    size_t n, unsigned flags)
{
	struct waiter w = { 0 };

	return waiter_finish(&w, tier_disk_put(td, k, tag, d, n, flags, done_cb, &w), WAIT_MS, NULL, NULL);
}

static int get_sync(struct tier_disk *td, const struct ks_key *k, void *dst, size_t cap,
		    uint64_t *tag, size_t *n)
{
	struct waiter w = { 0 };

	return waiter_finish(&w, tier_disk_get(td, k, dst, cap, done_cb, &w), WAIT_MS, tag, n);
}

static const size_t sizes[] = { 1, 511, 4096, 65537, (1u << 20) + 3, 8u << 20 };
#define NSIZES (sizeof(sizes) / sizeof(sizes[0]))

/* Round trips of several sizes, async in parallel; then restart and read again. */
static void test_roundtrip_restart(bool pw)
{
	char *dir = t_mkdtemp("tierdisk");
	struct tier_disk *td = open_td(dir, 1ull << 30, 64, pw);
	struct tier_disk_stats st;
	struct waiter w[NSIZES] = { 0 };
	uint8_t *src[NSIZES], *dst = malloc(8u << 20);
	struct ks_key keys[NSIZES];

	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.uring, !pw);
	for (size_t i = 0; i < NSIZES; i++) {
		keys[i] = mkkey((unsigned)i);
		src[i] = malloc(sizes[i]);
		t_fill(src[i], sizes[i], 1000 + i);
		/* borrowed buffers, all in flight at once */
		CHECK_EQ(tier_disk_put(td, &keys[i], 0xab00 + i, src[i], sizes[i],
				       i & 1 ? TIER_PUT_COPY : 0, done_cb, &w[i]), 0);
	}
	for (size_t i = 0; i < NSIZES; i++)
		CHECK_EQ(wait_done(&w[i]), 0);
	CHECK_EQ(tier_disk_contains_prefix(td, keys, NSIZES), NSIZES);
	for (int pass = 0; pass < 2; pass++) {
		for (size_t i = 0; i < NSIZES; i++) {
			uint64_t tag = 0;
			size_t n = 0, tn = 0;

			memset(dst, 0, 8u << 20);
			CHECK(tier_disk_contains(td, &keys[i], &tag, &tn));
			CHECK_EQ(tn, sizes[i]);
			CHECK_EQ(get_sync(td, &keys[i], dst, 8u << 20, &tag, &n), 0);
			CHECK_EQ(n, sizes[i]);
			CHECK_EQ(tag, 0xab00 + i);
			CHECK_EQ(t_verify(dst, sizes[i], 1000 + i), (size_t)-1);
		}
		tier_disk_get_stats(td, &st);
		CHECK_EQ(st.objects, NSIZES);
		if (pass == 0) {
			CHECK_EQ(st.puts, NSIZES);
			CHECK_EQ(st.hits, NSIZES);
			tier_disk_close(td);
			/* restart: the index comes back from the headers */
			td = open_td(dir, 1ull << 30, 64, pw);
			tier_disk_get_stats(td, &st);
			CHECK_EQ(st.scan_found, NSIZES);
			CHECK_EQ(st.scan_bad, 0);
			CHECK_EQ(st.puts, 0);
		} else {
			CHECK_EQ(st.hits, NSIZES);
		}
	}
	/* a too-small buffer is refused, not overrun */
	CHECK_EQ(get_sync(td, &keys[NSIZES - 1], dst, 4096, NULL, NULL), -EMSGSIZE);
	/* a second process (or tier) on the same directory is refused */
	{
		struct tier_disk_config cfg = { .path = dir, .capacity_bytes = 1 << 20 };
		struct tier_disk *td2 = NULL;

		CHECK_EQ(tier_disk_open(&cfg, &td2), -EBUSY);
	}
	/* remove: gone from the index at once, file unlinked by the worker */
	char p[1024];

	file_path(dir, &keys[0], p, sizeof(p));
	CHECK_EQ(tier_disk_remove(td, &keys[0]), 0);
	CHECK(!tier_disk_contains(td, &keys[0], NULL, NULL));
	CHECK_EQ(tier_disk_remove(td, &keys[0]), -ENOENT);
	CHECK_EQ(tier_disk_get(td, &keys[0], dst, 8u << 20, done_cb, NULL), -ENOENT);
	/* a put after remove is ordered after the unlink */
	CHECK_EQ(put_sync(td, &keys[0], 7, src[0], sizes[0], 0), 0);
	CHECK_EQ(access(p, F_OK), 0);
	CHECK_EQ(get_sync(td, &keys[0], dst, 8u << 20, NULL, NULL), 0);
	CHECK_EQ(tier_disk_remove(td, &keys[0]), 0);
	tier_disk_close(td);	/* drains the unlink */
	CHECK(access(p, F_OK) != 0);
	for (size_t i = 0; i < NSIZES; i++)
		free(src[i]);
	free(dst);
	t_rmtree(dir);
	free(dir);
}

/* Corrupt payload byte, truncated file, bad header: -EBADMSG, counted, removed. */
static void test_corruption(bool pw)
{
	char *dir = t_mkdtemp("tierdisk");
	struct tier_disk *td = open_td(dir, 1ull << 30, 64, pw);
	struct tier_disk_stats st;
	size_t n = 256 << 10;
	uint8_t *src = malloc(n), *dst = malloc(n);
	struct ks_key k[5];
	char p[1024];
	int fd;

	for (unsigned i = 0; i < 5; i++) {
		k[i] = mkkey(100 + i);
		t_fill(src, n, 50 + i);
		CHECK_EQ(put_sync(td, &k[i], i, src, n, 0), 0);
	}
	/* one flipped payload byte */
	file_path(dir, &k[0], p, sizeof(p));
	fd = open(p, O_RDWR);
	REQUIRE(fd >= 0);
	uint8_t b;
	CHECK_EQ(pread(fd, &b, 1, TIER_CHUNK_HDR_SIZE + 777), 1);
	b ^= 0x10;
	CHECK_EQ(pwrite(fd, &b, 1, TIER_CHUNK_HDR_SIZE + 777), 1);
	close(fd);
	CHECK_EQ(get_sync(td, &k[0], dst, n, NULL, NULL), -EBADMSG);
	CHECK(!tier_disk_contains(td, &k[0], NULL, NULL));
	CHECK(access(p, F_OK) != 0);
	/* truncated */
	file_path(dir, &k[1], p, sizeof(p));
	CHECK_EQ(truncate(p, TIER_CHUNK_HDR_SIZE + n / 2), 0);
	CHECK_EQ(get_sync(td, &k[1], dst, n, NULL, NULL), -EBADMSG);
	CHECK(access(p, F_OK) != 0);
	/* removed behind the tier's back: a miss, not corruption */
	file_path(dir, &k[2], p, sizeof(p));
	CHECK_EQ(unlink(p), 0);
	CHECK_EQ(get_sync(td, &k[2], dst, n, NULL, NULL), -ENOENT);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.corrupt, 2);
	CHECK_EQ(st.misses, 1);
	CHECK_EQ(st.hits, 0);
	CHECK_EQ(st.objects, 3);	/* the unlinked one is still indexed until read */
	tier_disk_close(td);

	/* restart with a bad header byte, a truncated file and a stray .kvc */
	file_path(dir, &k[3], p, sizeof(p));
	fd = open(p, O_RDWR);
	REQUIRE(fd >= 0);
	CHECK_EQ(pwrite(fd, "X", 1, 20), 1);
	close(fd);
	file_path(dir, &k[4], p, sizeof(p));
	CHECK_EQ(truncate(p, TIER_CHUNK_HDR_SIZE + 10), 0);
	snprintf(p, sizeof(p), "%s/junk.kvc", dir);
	fd = open(p, O_WRONLY | O_CREAT, 0600);
	CHECK_EQ(write(fd, "hello", 5), 5);
	close(fd);
	snprintf(p, sizeof(p), "%s/notes.txt", dir);	/* not ours: left alone */
	fd = open(p, O_WRONLY | O_CREAT, 0600);
	close(fd);
	td = open_td(dir, 1ull << 30, 64, pw);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.scan_bad, 3);
	CHECK_EQ(st.scan_found, 0);	/* k[2]'s file was unlinked above */
	CHECK_EQ(st.objects, 0);
	CHECK_EQ(access(p, F_OK), 0);
	tier_disk_close(td);
	free(src);
	free(dst);
	t_rmtree(dir);
	free(dir);
}

/* Disk LRU: over capacity, the least recently used file goes first. */
static void test_eviction(bool pw)
{
	char *dir = t_mkdtemp("tierdisk");
	size_t n = 4096;
	struct tier_disk *td = open_td(dir, 3 * (TIER_CHUNK_HDR_SIZE + n), 64, pw);
	struct tier_disk_stats st;
	uint8_t *buf = malloc(n);
	struct ks_key k[5];
	char p[1024];

	t_fill(buf, n, 9);
	for (unsigned i = 0; i < 5; i++)
		k[i] = mkkey(200 + i);
	for (unsigned i = 0; i < 3; i++)
		CHECK_EQ(put_sync(td, &k[i], i, buf, n, 0), 0);
	CHECK_EQ(get_sync(td, &k[0], buf, n, NULL, NULL), 0);	/* k0 is hot now */
	CHECK_EQ(put_sync(td, &k[3], 3, buf, n, 0), 0);		/* evicts k1 */
	CHECK(tier_disk_contains(td, &k[0], NULL, NULL));
	CHECK(!tier_disk_contains(td, &k[1], NULL, NULL));
	CHECK(tier_disk_contains(td, &k[2], NULL, NULL));
	CHECK(tier_disk_contains(td, &k[3], NULL, NULL));
	file_path(dir, &k[1], p, sizeof(p));
	CHECK(access(p, F_OK) != 0);
	CHECK_EQ(put_sync(td, &k[4], 4, buf, n, 0), 0);		/* evicts k2 */
	CHECK(!tier_disk_contains(td, &k[2], NULL, NULL));
	CHECK(tier_disk_contains(td, &k[0], NULL, NULL));
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.evictions, 2);
	CHECK_EQ(st.objects, 3);
	CHECK_EQ(st.bytes, 3 * (TIER_CHUNK_HDR_SIZE + n));
	/* larger than the whole tier: refused up front */
	CHECK_EQ(tier_disk_put(td, &k[1], 0, buf, 4 * n, 0, done_cb, NULL), -EINVAL);
	tier_disk_close(td);
	/* restart with a smaller capacity: the oldest (by mtime) go */
	td = open_td(dir, 1 * (TIER_CHUNK_HDR_SIZE + n), 64, pw);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.objects, 1);
	CHECK_EQ(st.evictions, 2);
	tier_disk_close(td);
	free(buf);
	t_rmtree(dir);
	free(dir);
}

/* A full queue refuses at once with -EAGAIN and counts the drop. */
static void test_queue_full(bool pw)
{
	char *dir = t_mkdtemp("tierdisk");
	struct tier_disk_config cfg = { .path = dir, .capacity_bytes = 1ull << 30,
					.queue_depth = 2, .force_pwrite = pw,
					.staging_bytes = 1 << 20 };
	struct tier_disk *td = NULL;
	struct tier_disk_stats st;
	struct waiter w[4] = { 0 };
	size_t n = 64 << 10;
	uint8_t *buf = malloc(2 << 20);
	struct ks_key k[4];

	REQUIRE(tier_disk_open(&cfg, &td) == 0);
	t_fill(buf, 2 << 20, 3);
	for (unsigned i = 0; i < 4; i++)
		k[i] = mkkey(300 + i);
	CHECK_EQ(tier_disk_put(td, &k[0], 0, buf, n, 0, block_cb, &w[0]), 0);
	for (int i = 0; i < 10000 && !atomic_load(&w[0].entered); i++)
		usleep(1000);
	REQUIRE(atomic_load(&w[0].entered));
	/* the worker is stuck in a callback: two more fill the queue */
	CHECK_EQ(tier_disk_put(td, &k[1], 0, buf, n, 0, done_cb, &w[1]), 0);
	CHECK_EQ(tier_disk_put(td, &k[2], 0, buf, n, TIER_PUT_COPY, done_cb, &w[2]), 0);
	CHECK_EQ(tier_disk_put(td, &k[3], 0, buf, n, 0, done_cb, &w[3]), -EAGAIN);
	CHECK_EQ(tier_disk_get(td, &k[0], buf, n, done_cb, &w[3]), -EAGAIN);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.dropped_full, 1);
	atomic_store(&w[0].release, 1);
	for (int i = 0; i < 3; i++)
		CHECK_EQ(wait_done(&w[i]), 0);
	/* staging: a copy larger than the staging budget is dropped too */
	CHECK_EQ(tier_disk_put(td, &k[3], 0, buf, 2 << 20, TIER_PUT_COPY, done_cb, &w[3]),
		 -EAGAIN);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.dropped_full, 2);
	CHECK_EQ(st.puts, 3);
	tier_disk_close(td);
	free(buf);
	t_rmtree(dir);
	free(dir);
}

/*
 * Disk full: RLIMIT_FSIZE (SIGXFSZ ignored) makes writes fail with EFBIG
 * the way ENOSPC does; works as root and in CI without mounting anything.
 */
static void test_disk_full(bool pw)
{
	char *dir = t_mkdtemp("tierdisk");
	struct tier_disk *td = open_td(dir, 1ull << 30, 64, pw);
	struct tier_disk_stats st;
	struct rlimit old, lim;
	size_t n = 4 << 20;
	uint8_t *buf = malloc(n);
	struct ks_key k = mkkey(400);
	char p[1024];
	int rc;

	t_fill(buf, n, 4);
	REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
	signal(SIGXFSZ, SIG_IGN);
	lim = old;
	lim.rlim_cur = 1 << 20;
	REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);
	rc = put_sync(td, &k, 0, buf, n, 0);
	REQUIRE(setrlimit(RLIMIT_FSIZE, &old) == 0);
	CHECK(rc == -EFBIG || rc == -ENOSPC);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.nospace, 1);
	CHECK_EQ(st.put_errors, 1);
	CHECK_EQ(st.puts, 0);
	CHECK_EQ(st.objects, 0);
	CHECK(!tier_disk_contains(td, &k, NULL, NULL));
	file_path(dir, &k, p, sizeof(p));
	CHECK(access(p, F_OK) != 0);
	/* space is back: the same put works */
	CHECK_EQ(put_sync(td, &k, 0, buf, n, 0), 0);
	CHECK_EQ(get_sync(td, &k, buf, n, NULL, NULL), 0);
	CHECK_EQ(t_verify(buf, n, 4), (size_t)-1);
	tier_disk_close(td);
	/* no temporary left behind: a reopen finds exactly one file */
	td = open_td(dir, 1ull << 30, 64, pw);
	tier_disk_get_stats(td, &st);
	CHECK_EQ(st.scan_found, 1);
	CHECK_EQ(st.scan_bad, 0);
	tier_disk_close(td);
	free(buf);
	t_rmtree(dir);
	free(dir);
}

int main(void)
{
	for (int pw = 0; pw < 2; pw++) {
		fprintf(stderr, "--- %s\n", pw ? "pread/pwrite fallback" : "io_uring");
		test_roundtrip_restart(pw);
		test_corruption(pw);
		test_eviction(pw);
		test_queue_full(pw);
		test_disk_full(pw);
	}
	/* io_uring failing to start (fault point tier_disk.no_uring) falls back too */
#ifdef KS_FAULT_INJECTION
	{
		char *dir = t_mkdtemp("tierdisk");
		char err[256];
		struct tier_disk *td;
		struct tier_disk_stats st;

		REQUIRE(ks_fault_configure("tier_disk.no_uring", err, sizeof(err)) == 0);
		td = open_td(dir, 1 << 20, 0, false);
		REQUIRE(ks_fault_configure(NULL, err, sizeof(err)) == 0);
		tier_disk_get_stats(td, &st);
		CHECK(!st.uring);
		tier_disk_close(td);
		t_rmtree(dir);
		free(dir);
	}
#endif
	return t_result("tier_disk");
}
