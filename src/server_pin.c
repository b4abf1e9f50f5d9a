/*
 * server_pin.c - pinning the host pool for CUDA without making kvstashd
 * wait for it.
 *
 * cudaHostRegister touches and pins every page: about 0.35 s per GiB on an
 * H200 host, so pinning a 64 GiB pool before serving kept engines without a
 * PING reply for 22 s at every start. Instead a thread ("pool-pin") pins the
 * pool in pieces from its start while the io thread serves: PING, LOOKUP
 * and host transfers never touch pinning. [0, pool_pinned_bytes) is pinned;
 * a fresh pool hands out its slots in address order (pool.c), so early
 * STOREs land in the pinned part. A GPU transfer whose slot is not pinned
 * yet does not wait: a STORE skips that chunk (as on a full pool) and a
 * RETRIEVE fails, both counted (kvstash_xfer_unpinned_chunks_total); the
 * engine recomputes (docs/architecture.md, "Start-up").
 *
 * Pieces are 1 GiB, 2 MiB aligned (whole hugepages), each its own
 * registration; a slot that straddles two is reachable through UVA at the
 * same address in both, and a copy engine transfer across the boundary is
 * still correct (the driver treats it as pageable memory: slower, not wrong).
 *
 * Without CUDA there is nothing to pin: the pool counts as pinned at once.
 * Fault point pin.ms_per_gib=N makes the thread run (and take N ms per GiB)
 * on the host backend too, so tests can watch serving
 * while pinning is in progress.
 *
 * Threads: srv_pin_start/srv_pin_stop on the thread that creates/destroys the
 * server; the pin thread writes pool_pinned_bytes (atomic) and pin_pieces
 * (read only after it is joined); any thread reads pool_pinned_bytes.
 * Lock ordering: no lock of its own and none taken; the CUDA call is made
 * with no lock held.
 */
#include "server_priv.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "compiler.h"
#include "fault.h"
#include "lock.h"
#include "log.h"
#include "pool.h"

#define PIN_PIECE_BYTES (1ull << 30)
/* Faulted in this much at a time before a piece is registered (see populate). */
#define PIN_POPULATE_BYTES (16ull << 20)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23	/* Linux 5.14 */
#endif

/* Sleep @ms, or less if a stop is requested. True if stopping. */
static bool pin_sleep(struct srv *s, uint64_t ms)
{
	struct pollfd p = { .fd = s->pin_stop_fd, .events = POLLIN };

	while (ms) {
		int step = (int)KS_MIN(ms, (uint64_t)1000);

		if (poll(&p, 1, step) > 0)
			return true;
		ms -= (uint64_t)step;
	}
	return poll(&p, 1, 0) > 0;
}

/*
 * Fault piece [@p, @p + @n) in before it is registered, PIN_POPULATE_BYTES
 * at a time. cudaHostRegister pins under the process's mmap lock (held for
 * reading for the whole call); with the pages still to be allocated and
 * zeroed, a 1 GiB piece holds it ~0.35 s, and a thread that maps or unmaps
 * memory meanwhile (a large malloc on the io thread, libzmq) queues as a
 * writer behind it, with every page fault of the process queued behind that
 * writer: io loop turns of 100-185 ms right after a start, measured on an
 * H100 host. Each populate step holds the lock for a few milliseconds, and
 * registering pages already present takes a fraction of the time. Nothing
 * is written to the pages (MADV_POPULATE_WRITE only maps them writable), so
 * it is safe beside transfers into the pool and on a resumed pool. On a
 * kernel without it the piece is registered as before.
 */
static void populate(struct srv *s, uint8_t *p, uint64_t n)
{
	for (uint64_t off = 0; off < n; off += PIN_POPULATE_BYTES) {
		if (madvise(p + off, (size_t)KS_MIN(PIN_POPULATE_BYTES, n - off),
			    MADV_POPULATE_WRITE)) {
			if (errno != EINVAL)
				log_warn("pool: faulting in before pinning: %s", strerror(errno));
			return;
		}
		if (pin_sleep(s, 0))
			return;
	}
}

static void *pin_main(void *arg)
{
	struct srv *s = arg;
	uint8_t *base = pool_region(s->pool);
	const uint64_t total = s->pool_pin_total, t0 = ks_now_ms();
	uint64_t done = 0;

	pthread_setname_np(pthread_self(), "pool-pin");
	while (done < total) {
		uint64_t n = KS_MIN(PIN_PIECE_BYTES, total - done);
		int rc = 0;

		if (s->pin_test_ms_per_gib &&
		    pin_sleep(s, (s->pin_test_ms_per_gib * n + (1ull << 30) - 1) >> 30))
			break;
		if (s->pin_step) {
			ks_assert_unlocked();
			populate(s, base + done, n);
			rc = s->pin_step(base + done, (size_t)n);
			if (rc == 0)
				s->pin_pieces[s->npin_pieces++] = base + done;
		}
		if (rc) {
			log_error("pool: pinning bytes %" PRIu64 "..%" PRIu64 " for CUDA failed (%s): "
				  "GPU transfers use the first %" PRIu64 " MiB only", done, done + n,
				  strerror(-rc), done >> 20);
			return NULL;
		}
		done += n;
		atomic_store_explicit(&s->pool_pinned_bytes, done, memory_order_release);
		if (pin_sleep(s, 0))
			break;
	}
	if (done == total)
		log_info("pool: %" PRIu64 " MiB pinned for CUDA in %.1f s", total >> 20,
			 (double)(ks_now_ms() - t0) / 1000);
	return NULL;
}

/* Start pinning in the background (or count the pool pinned: host only). */
int srv_pin_start(struct srv *s)
{
	const uint64_t bytes = pool_region_bytes(s->pool);
	int rc;

	if (ks_fault_value(KS_FAULT_PIN_MS_PER_GIB, &s->pin_test_ms_per_gib))
		log_warn("fault point: pinning the pool takes %" PRIu64 " ms per GiB",
			 s->pin_test_ms_per_gib);
	s->pool_pin_total = bytes;
	if (!s->pin_step && !s->pin_test_ms_per_gib) {
		atomic_store(&s->pool_pinned_bytes, bytes);
		return 0;
	}
	s->pin_pieces = calloc(bytes / PIN_PIECE_BYTES + 1, sizeof(*s->pin_pieces));
	s->pin_stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (!s->pin_pieces || s->pin_stop_fd < 0)
		return s->pin_stop_fd < 0 ? -errno : -ENOMEM;
	rc = pthread_create(&s->pin_thread, NULL, pin_main, s);
	if (rc)
		return -rc;
	s->pin_started = true;
	log_info("pool: pinning %" PRIu64 " MiB for CUDA in the background; serving meanwhile",
		 bytes >> 20);
	return 0;
}

/* Stop the thread (it finishes the piece it is pinning) and join it. */
void srv_pin_stop(struct srv *s)
{
	uint64_t one = 1;

	if (s->pin_started) {
		if (write(s->pin_stop_fd, &one, sizeof(one)) < 0) {
			/* EAGAIN only: a stop is already pending */
		}
		pthread_join(s->pin_thread, NULL);
		s->pin_started = false;
	}
	if (s->pin_stop_fd >= 0) {
		close(s->pin_stop_fd);
		s->pin_stop_fd = -1;
	}
}

/* True if [@p, @p + @bytes) of the pool is pinned. */
bool srv_pool_range_pinned(struct srv *s, const void *p, uint64_t bytes)
{
	const uint8_t *base = pool_region(s->pool);
	const uint64_t end = (uint64_t)((const uint8_t *)p - base) + bytes;

	return end <= atomic_load_explicit(&s->pool_pinned_bytes, memory_order_acquire);
}
