/* Description: host pool slots: configure rules, alignment, exhaustion, reuse, byte accounting. Labels: unit */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "helpers.h"
#include "pool.h"

#define MIB (1ull << 20)

static void test_create_rules(void)
{
	struct pool *p = NULL;

	CHECK_EQ(pool_create(0, &p), -EINVAL);
	CHECK_EQ(pool_create(POOL_SLOT_ALIGN - 1, &p), -EINVAL);
	REQUIRE(pool_create(POOL_SLOT_ALIGN, &p) == 0);
	CHECK_EQ(pool_region_bytes(p), POOL_SLOT_ALIGN);
	CHECK(pool_region(p) != NULL);
	pool_destroy(p);
	pool_destroy(NULL);	/* like free(NULL) */
}

static void test_unconfigured(void)
{
	struct pool_stats st;
	struct pool *p;
	uint32_t slot = 7;

	REQUIRE(pool_create(MIB, &p) == 0);
	CHECK_EQ(pool_slot_bytes(p), 0);
	CHECK_EQ(pool_nslots(p), 0);
	CHECK_EQ(pool_alloc(p, &slot), -ENODEV);
	CHECK_EQ(slot, 7);	/* untouched on failure */
	CHECK(pool_slot_ptr(p, 0) == NULL);
	pool_free(p, 0);	/* ignored, counted */
	pool_get_stats(p, &st);
	CHECK_EQ(st.region_bytes, MIB);
	CHECK_EQ(st.slot_bytes, 0);
	CHECK_EQ(st.nslots, 0);
	CHECK_EQ(st.free_slots, 0);
	CHECK_EQ(st.used_bytes, 0);
	CHECK_EQ(st.bad_frees, 1);
	pool_destroy(p);
}

static void test_configure_rules(void)
{
	struct pool *p;

	REQUIRE(pool_create(MIB, &p) == 0);
	CHECK_EQ(pool_configure_slots(p, 0), -EINVAL);
	CHECK_EQ(pool_configure_slots(p, MIB + 1), -E2BIG);
	CHECK_EQ(pool_slot_bytes(p), 0);	/* failed calls decide nothing */
	CHECK_EQ(pool_configure_slots(p, 5000), 0);
	CHECK_EQ(pool_slot_bytes(p), 8192);	/* rounded up to 4 KiB */
	CHECK_EQ(pool_nslots(p), MIB / 8192);
	CHECK_EQ(pool_free_slots(p), MIB / 8192);
	/* Later calls: anything that fits the slot is fine, bigger is not. */
	CHECK_EQ(pool_configure_slots(p, 8192), 0);
	CHECK_EQ(pool_configure_slots(p, 100), 0);
	CHECK_EQ(pool_configure_slots(p, 8193), -E2BIG);
	CHECK_EQ(pool_configure_slots(p, 0), -EINVAL);
	CHECK_EQ(pool_slot_bytes(p), 8192);
	CHECK_EQ(pool_nslots(p), MIB / 8192);
	pool_destroy(p);

	/* Fits the region only before rounding up: no slot at all. */
	REQUIRE(pool_create(6000, &p) == 0);
	CHECK_EQ(pool_configure_slots(p, 5000), -E2BIG);
	CHECK_EQ(pool_slot_bytes(p), 0);
	CHECK_EQ(pool_configure_slots(p, 4096), 0);
	CHECK_EQ(pool_nslots(p), 1);	/* the tail that fits no slot is unused */
	pool_destroy(p);

	/* One object as large as the region: one slot. */
	REQUIRE(pool_create(3 * 4096, &p) == 0);
	CHECK_EQ(pool_configure_slots(p, 3 * 4096), 0);
	CHECK_EQ(pool_nslots(p), 1);
	CHECK_EQ(pool_slot_bytes(p), 3 * 4096);
	pool_destroy(p);
}

static void test_exhaustion_alignment_accounting(void)
{
	const uint64_t region = 4 * MIB;	/* a 2 MiB multiple: hugepages are tried */
	struct pool_stats st;
	struct pool *p;
	uint32_t n, slot, extra;
	uint32_t *slots;
	uint8_t *seen;
	uint8_t *base;

	REQUIRE(pool_create(region, &p) == 0);
	base = pool_region(p);
	CHECK_EQ((uintptr_t)base % POOL_SLOT_ALIGN, 0);
	pool_get_stats(p, &st);
	if (st.hugepages)
		CHECK_EQ((uintptr_t)base % (2 * MIB), 0);
	REQUIRE(pool_configure_slots(p, 3 * 4096 + 1) == 0);	/* -> 16 KiB slots */
	CHECK_EQ(pool_slot_bytes(p), 16384);
	n = pool_nslots(p);
	CHECK_EQ(n, region / 16384);

	slots = calloc(n, sizeof(*slots));
	seen = calloc(n, 1);
	REQUIRE(slots && seen);
	for (uint32_t i = 0; i < n; i++) {
		uint8_t *ptr;

		REQUIRE(pool_alloc(p, &slots[i]) == 0);
		CHECK(slots[i] < n);
		if (slots[i] < n) {
			CHECK_EQ(seen[slots[i]], 0);	/* never handed out twice */
			seen[slots[i]] = 1;
		}
		ptr = pool_slot_ptr(p, slots[i]);
		CHECK(ptr == base + (uint64_t)slots[i] * 16384);
		CHECK_EQ((uintptr_t)ptr % POOL_SLOT_ALIGN, 0);
		CHECK(ptr + 16384 <= base + region);
		CHECK_EQ(pool_free_slots(p), n - i - 1);
		pool_get_stats(p, &st);
		CHECK_EQ(st.used_bytes, (uint64_t)(i + 1) * 16384);
		t_fill(ptr, 16384, slots[i]);
	}
	/* Every slot holds its own bytes: no two slots overlap. */
	for (uint32_t i = 0; i < n; i++)
		CHECK_EQ(t_verify(pool_slot_ptr(p, slots[i]), 16384, slots[i]), (size_t)-1);

	CHECK_EQ(pool_alloc(p, &slot), -ENOSPC);
	CHECK_EQ(pool_alloc(p, &slot), -ENOSPC);
	pool_get_stats(p, &st);
	CHECK_EQ(st.alloc_failures, 2);
	CHECK_EQ(st.free_slots, 0);
	CHECK_EQ(st.used_bytes, region);

	/* Reuse: a freed slot is the next one handed out (LIFO: its pages are warm). */
	pool_free(p, slots[5]);
	CHECK_EQ(pool_free_slots(p), 1);
	pool_get_stats(p, &st);
	CHECK_EQ(st.used_bytes, region - 16384);
	REQUIRE(pool_alloc(p, &extra) == 0);
	CHECK_EQ(extra, slots[5]);
	CHECK_EQ(pool_alloc(p, &slot), -ENOSPC);

	/* Double and stray frees are refused and do not grow the free stack. */
	pool_free(p, slots[0]);
	pool_free(p, slots[0]);
	pool_free(p, n);
	pool_free(p, POOL_NO_SLOT);
	pool_get_stats(p, &st);
	CHECK_EQ(st.bad_frees, 3);
	CHECK_EQ(st.free_slots, 1);
	CHECK_EQ(st.used_bytes, region - 16384);
	REQUIRE(pool_alloc(p, &slot) == 0);
	CHECK_EQ(slot, slots[0]);
	CHECK_EQ(pool_alloc(p, &slot), -ENOSPC);	/* not handed out twice */

	for (uint32_t i = 0; i < n; i++)
		pool_free(p, slots[i]);
	pool_get_stats(p, &st);
	CHECK_EQ(st.free_slots, n);
	CHECK_EQ(st.used_bytes, 0);
	CHECK_EQ(st.bad_frees, 3);
	CHECK(pool_slot_ptr(p, n) == NULL);
	free(slots);
	free(seen);
	pool_destroy(p);
}

int main(void)
{
	test_create_rules();
	test_unconfigured();
	test_configure_rules();
	test_exhaustion_alignment_accounting();
	return t_result("pool");
}
