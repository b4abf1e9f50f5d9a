/*
 * fault.h - named fault injection points, for tests.
 *
 * A test arms points by name; the code at each point asks whether it is
 * armed and then fails (or waits, or shrinks a bound) the way the real fault
 * would, so the error paths behind it run for real.
 *
 *   KVSTASH_FAULTS="point[=N][,point[=N]...]"   read by kvstashd at start
 *   ks_fault_configure("point=N", ...)          in-process tests
 *
 * A trigger point (ks_fault_fire) fires on every hit, or on the next N hits
 * with =N; a value point (ks_fault_value) carries N. An unknown name, a value
 * point without =N or a malformed N is refused with a message.
 *
 * Compiled in when KS_FAULT_INJECTION is defined (CMake option
 * KVSTASH_FAULT_INJECTION: on in every build type but Release and
 * MinSizeRel). Without it the queries are constant false and a non-empty
 * configuration is refused (-ENOTSUP), so a release kvstashd never runs
 * with a test's fault armed. An unarmed point costs one relaxed load.
 */
#ifndef KS_FAULT_H
#define KS_FAULT_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum ks_fault_point {
	/* "idx.release_lock" (trigger): idx_unpin / idx_abort_write find their
	 * shard lock timed out; the release is deferred (index.c). */
	KS_FAULT_IDX_RELEASE_LOCK,
	/* "pool.free_lock" (trigger): pool_free finds free_lock timed out; the
	 * free is deferred (pool.c). */
	KS_FAULT_POOL_FREE_LOCK,
	/* "tier_disk.no_uring" (trigger): io_uring_queue_init fails, so the disk
	 * tier runs on its pread/pwrite fallback. */
	KS_FAULT_TIER_DISK_NO_URING,
	/* "tier_disk.capacity_bytes=N" (value): the disk tier holds N bytes,
	 * whatever --disk-size-gb says (evictions without gigabytes written). */
	KS_FAULT_TIER_DISK_CAPACITY_BYTES,
	/* "kv_events.queue=N" (value): the KV event queue holds N reports. */
	KS_FAULT_KV_EVENTS_QUEUE,
	/* "kv_events.stall_ms=N" (value): the publisher holds its first batch N ms. */
	KS_FAULT_KV_EVENTS_STALL_MS,
	/* "probe.stall_ms=N" (value): every data-path probe job sleeps N ms. */
	KS_FAULT_PROBE_STALL_MS,
	/* "store.stall_ms=N" (value): each host STORE chunk waits N ms after its
	 * copy, before its commit (a crash in the middle of a STORE). */
	KS_FAULT_STORE_STALL_MS,
	/* "pin.ms_per_gib=N" (value): background pinning of the pool takes at
	 * least N ms per GiB (a slow pin on a small test pool). */
	KS_FAULT_PIN_MS_PER_GIB,
	KS_FAULT_NPOINTS
};

#define KS_FAULT_ENV "KVSTASH_FAULTS"

#ifdef KS_FAULT_INJECTION
/*
 * Disarm every point, then arm those in @spec (NULL or "" arms none).
 * 0, or -EINVAL with a message in @err and nothing armed. Not thread-safe
 * against itself: call before the threads that hit the points start, or
 * from the one test thread.
 */
int ks_fault_configure(const char *spec, char *err, size_t errlen);
/* Trigger points: true when @p is armed (and counts one of its N hits). */
bool ks_fault_fire(enum ks_fault_point p);
/* Value points: true and *@value = N when @p is armed. */
bool ks_fault_value(enum ks_fault_point p, uint64_t *value);
/* The point's name, "" for an unknown one. */
const char *ks_fault_name(enum ks_fault_point p);
#else
static inline int ks_fault_configure(const char *spec, char *err, size_t errlen)
{
	if (!spec || !*spec)
		return 0;
	snprintf(err, errlen, "%s: this build has no fault injection (KVSTASH_FAULT_INJECTION=OFF)",
		 spec);
	return -ENOTSUP;
}
static inline bool ks_fault_fire(enum ks_fault_point p)
{
	(void)p;
	return false;
}
static inline bool ks_fault_value(enum ks_fault_point p, uint64_t *value)
{
	(void)p;
	(void)value;
	return false;
}
#endif

#endif /* KS_FAULT_H */
