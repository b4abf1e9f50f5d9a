/* Description: kvstashd serves PING, LOOKUP and host transfers at once while the pool is still being pinned in the background, and reports the progress. Labels: unit faults
 *
 * Fault point pin.ms_per_gib=3000 makes the pinning thread run on the host
 * backend and take 3 s per GiB (an H200 host pins about 0.35 s per GiB; the
 * fault point stands in for cudaHostRegister, which needs a GPU). Built
 * only with fault injection (label faults). With a 2 GiB pool: while pool_pinned_bytes is still below
 * pool_pin_total_bytes, PING answers, a host STORE/LOOKUP/RETRIEVE round
 * trip is byte-exact; then the pinned bytes grow a piece at a time to the
 * total. The GPU side (a transfer into a slot not pinned yet fails fast) is
 * exercised by tests/test_cuda_server on a GPU host.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fault.h"
#include "helpers.h"
#include "kvfix.h"
#include "kvstash.h"

#define C 256

int main(void)
{
	struct t_daemon *d;
	kvstash_client *c;
	struct t_kv kv;
	uint32_t tokens[2 * C];
	int64_t src[32], dst[32];
	const uint64_t seed = 0x9199;
	double rtt = -1;

	setenv(KS_FAULT_ENV, "pin.ms_per_gib=3000", 1);
	d = t_daemon_start("--pool-size=2G");
	unsetenv(KS_FAULT_ENV);
	REQUIRE(d);
	REQUIRE(kvstash_connect(d->endpoint, 5000, &c) == 0);
	const uint64_t total = t_stat(c, "pool_pin_total_bytes");

	CHECK_EQ(total, 2ull << 30);
	CHECK(t_stat(c, "pool_pinned_bytes") < total);
	CHECK_EQ(kvstash_ping(c, &rtt), 0);
	CHECK(rtt >= 0 && rtt < 1000);

	/* Host transfers and LOOKUP while pinning runs. */
	REQUIRE(t_kv_create(&kv, KVSTASH_LAYOUT_FLASH_ATTN, "float16", 2, 64, 16, 2, 64) == 0);
	for (int i = 0; i < 32; i++) {
		src[i] = i;
		dst[i] = 32 + i;
	}
	for (size_t t = 0; t < 2 * C; t++)
		tokens[t] = (uint32_t)(t * 2654435761u);
	memset(kv.buf.ptr, 0, kv.buf.bytes);
	for (size_t t = 0; t < 2 * C; t++)
		t_kv_fill_token(&kv, t_kv_slot(&kv, src, t), seed, t);
	CHECK_EQ(t_kv_register(&kv, c, 9, "m-pin", 1), 0);
	struct kvstash_key k = { .model = "m-pin", .world_size = 1, .worker_id = 0,
				 .tokens = tokens, .ntokens = 2 * C, .start = 0, .end = 2 * C,
				 .request_id = "r" };
	CHECK_EQ(kvstash_store(c, &k, 9, src, 32), 0);
	struct kvstash_key lk = k;
	int64_t chunks = -1;

	lk.worker_id = -1;
	lk.request_id = "l";
	CHECK_EQ(kvstash_lookup_chunks(c, &lk, 1, &chunks), 0);
	CHECK_EQ(chunks, 2);
	CHECK_EQ(kvstash_retrieve(c, &k, 9, dst, 32, 0), 0);
	size_t bad = 0;

	for (size_t t = 0; t < 2 * C; t++)
		bad += !t_kv_check_token(&kv, t_kv_slot(&kv, dst, t), seed, t);
	CHECK_EQ(bad, 0);
	CHECK(t_stat(c, "pool_pinned_bytes") < total);	/* all of it happened meanwhile */

	/* Progress: a piece at a time, up to the total (6 s at the hook's rate). */
	uint64_t last = 0, seen_partial = 0;

	for (int i = 0; i < 1500; i++) {
		uint64_t v = t_stat(c, "pool_pinned_bytes");

		REQUIRE(v != UINT64_MAX);
		CHECK(v >= last);
		last = v;
		if (v > 0 && v < total)
			seen_partial = v;
		if (v == total)
			break;
		CHECK_EQ(kvstash_ping(c, &rtt), 0);
		usleep(10000);
	}
	CHECK_EQ(last, total);
	CHECK_EQ(seen_partial, 1ull << 30);
	kvstash_close(c);
	t_kv_destroy(&kv);
	if (t_failures)
		t_daemon_dump_log(d);
	CHECK_EQ(t_daemon_stop(d), 0);
	return t_result("startup_pin");
}
