/*
 * fault.c - named fault injection points (see fault.h).
 *
 * Lock order: none. Points are atomics: the hot-path query of an unarmed
 * point is one relaxed load of its `armed` flag.
 */
#include "fault.h"

#ifdef KS_FAULT_INJECTION

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define FAULT_ALWAYS UINT64_MAX

static const struct {
	const char *name;
	bool has_value;	/* value point: =N is required and is the value */
} points[KS_FAULT_NPOINTS] = {
	[KS_FAULT_IDX_RELEASE_LOCK] = { "idx.release_lock", false },
	[KS_FAULT_POOL_FREE_LOCK] = { "pool.free_lock", false },
	[KS_FAULT_TIER_DISK_NO_URING] = { "tier_disk.no_uring", false },
	[KS_FAULT_TIER_DISK_CAPACITY_BYTES] = { "tier_disk.capacity_bytes", true },
	[KS_FAULT_KV_EVENTS_QUEUE] = { "kv_events.queue", true },
	[KS_FAULT_KV_EVENTS_STALL_MS] = { "kv_events.stall_ms", true },
	[KS_FAULT_PROBE_STALL_MS] = { "probe.stall_ms", true },
	[KS_FAULT_STORE_STALL_MS] = { "store.stall_ms", true },
	[KS_FAULT_PIN_MS_PER_GIB] = { "pin.ms_per_gib", true },
};

static struct {
	_Atomic bool armed;
	_Atomic uint64_t left;	/* trigger: hits still to fire, FAULT_ALWAYS for all */
	uint64_t value;		/* value point: N; written before armed is set */
} state[KS_FAULT_NPOINTS];

const char *ks_fault_name(enum ks_fault_point p)
{
	return (unsigned)p < KS_FAULT_NPOINTS ? points[p].name : "";
}

static void disarm_all(void)
{
	for (int i = 0; i < KS_FAULT_NPOINTS; i++)
		atomic_store(&state[i].armed, false);
}

static int arm_one(const char *item, size_t len, char *err, size_t errlen)
{
	const char *eq = memchr(item, '=', len);
	size_t nlen = eq ? (size_t)(eq - item) : len;
	uint64_t n = FAULT_ALWAYS;
	int i;

	for (i = 0; i < KS_FAULT_NPOINTS; i++)
		if (strlen(points[i].name) == nlen && !memcmp(points[i].name, item, nlen))
			break;
	if (i == KS_FAULT_NPOINTS) {
		char known[512];
		size_t used = 0;

		known[0] = '\0';
		for (int k = 0; k < KS_FAULT_NPOINTS && used < sizeof(known); k++)
			used += (size_t)snprintf(known + used, sizeof(known) - used, "%s%s%s",
						 k ? ", " : "", points[k].name,
						 points[k].has_value ? "=N" : "");
		snprintf(err, errlen, "fault point '%.*s' unknown (known: %s)", (int)nlen, item, known);
		return -EINVAL;
	}
	if (eq) {
		char buf[24], *end;
		size_t vlen = len - nlen - 1;

		if (vlen == 0 || vlen >= sizeof(buf) || eq[1] == '-') {
			snprintf(err, errlen, "fault point '%.*s': bad count or value", (int)len, item);
			return -EINVAL;
		}
		memcpy(buf, eq + 1, vlen);
		buf[vlen] = '\0';
		errno = 0;
		n = strtoull(buf, &end, 10);
		if (errno || *end || n == FAULT_ALWAYS) {
			snprintf(err, errlen, "fault point '%.*s': bad count or value", (int)len, item);
			return -EINVAL;
		}
	} else if (points[i].has_value) {
		snprintf(err, errlen, "fault point '%s' needs a value (%s=N)", points[i].name,
			 points[i].name);
		return -EINVAL;
	}
	state[i].value = n;
	atomic_store(&state[i].left, n);
	atomic_store(&state[i].armed, true);
	return 0;
}

int ks_fault_configure(const char *spec, char *err, size_t errlen)
{
	const char *p = spec;

	disarm_all();
	if (!spec)
		return 0;
	while (*p) {
		size_t len = strcspn(p, ",");
		int rc = len ? arm_one(p, len, err, errlen) : 0;

		if (rc) {
			disarm_all();
			return rc;
		}
		p += len;
		if (*p == ',')
			p++;
	}
	return 0;
}

bool ks_fault_fire(enum ks_fault_point p)
{
	uint64_t left;

	if (!atomic_load_explicit(&state[p].armed, memory_order_relaxed))
		return false;
	left = atomic_load(&state[p].left);
	if (left == FAULT_ALWAYS)
		return true;
	do {
		if (left == 0)
			return false;
	} while (!atomic_compare_exchange_weak(&state[p].left, &left, left - 1));
	return true;
}

bool ks_fault_value(enum ks_fault_point p, uint64_t *value)
{
	if (!atomic_load(&state[p].armed))
		return false;
	*value = state[p].value;
	return true;
}

#else
/* ISO C forbids an empty translation unit. */
typedef int ks_fault_disabled;
#endif
