/* Description: a client whose connection is replaced keeps its instance, another process cannot take it, an idle connected engine is not reaped, a reaped one gets failure replies. Labels: unit tsan
 *
 * kvstashd runs with --client-timeout-s=3, once on ipc:// and once on
 * tcp://127.0.0.1. Client A registers instance 4242 (a memfd KV buffer),
 * PINGs with its id once (so the reaper's PING rule applies to it) and
 * STOREs two chunks. Then:
 *   1. A stays connected but idle for longer than the timeout: the instance
 *      is kept. A PINGs again (so the steps below have a full timeout
 *      before the reaper may take the instance once A's connection closes).
 *   2. A forked child (another process, its own connection) tries to
 *      RETRIEVE into instance 4242's blocks and to STORE from them: refused,
 *      and A's target blocks are untouched.
 *   3. A's connection closes (as on a dropped TCP connection or a server
 *      restart). ipc:// only: the child is refused again (another pid).
 *   4. A new connection B of the same process, same instance id, no
 *      re-REGISTER: RETRIEVE is byte-exact, a new STORE works, the PING with
 *      the id works; instances_adopted counts it.
 *      A side connection that PINGs first (no instance id) does not take it
 *      over.
 *   5. B closes too and stays away past the timeout: the instance is reaped,
 *      and a STORE/RETRIEVE for it gets a failure reply ("not registered").
 *      ipc:// only: not while another connection of the process is open
 *      (the observer's); reaped once that one closes too.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "kvfix.h"
#include "kvstash.h"

#define IID 4242
#define NL 2
#define NB 64
#define BS 16
#define NH 2
#define HS 64
#define C 256
#define NCHUNKS 2
#define MODEL "m-reconnect"

static uint32_t tokens[NCHUNKS * C + C];
static int64_t src[NCHUNKS * C / BS], dst[NCHUNKS * C / BS];
static const size_t nblk = NCHUNKS * C / BS;

/* The block ids and the prompt of a case (the intruder recomputes them). */
static void set_ids(bool ipc)
{
	for (size_t i = 0; i < nblk; i++) {
		src[i] = (int64_t)i;
		dst[i] = (int64_t)(nblk + i);
	}
	for (size_t t = 0; t < sizeof(tokens) / sizeof(tokens[0]); t++)
		tokens[t] = (uint32_t)(t * 2654435761u) ^ (ipc ? 1u : 2u);
}

static struct kvstash_key key_of(uint64_t start, uint64_t end, const char *rid)
{
	struct kvstash_key k = { .model = MODEL, .world_size = 1, .worker_id = 0,
				 .tokens = tokens, .ntokens = sizeof(tokens) / sizeof(tokens[0]),
				 .start = start, .end = end, .request_id = rid };
	return k;
}

/* Wait until the server counted @want closed connections (5 s at most). */
static bool wait_closed(kvstash_client *obs, uint64_t want)
{
	for (int i = 0; i < 500; i++) {
		uint64_t v = t_stat(obs, "connections_closed");

		if (v != UINT64_MAX && v >= want)
			return true;
		usleep(10000);
	}
	return false;
}

/* Another process with its own connection tries to write into and read from
 * instance IID's blocks. Exit 0 if every attempt was refused. */
static int intruder(const char *endpoint)
{
	kvstash_client *c;
	struct kvstash_key k = key_of(0, NCHUNKS * C, "intruder");
	int bad = 0;

	if (kvstash_connect(endpoint, 5000, &c))
		_exit(3);
	if (kvstash_retrieve(c, &k, IID, dst, nblk, 0) == 0)
		bad++;
	else if (!strstr(kvstash_last_error(), "another connection"))
		fprintf(stderr, "intruder RETRIEVE refused with: %s\n", kvstash_last_error()), bad++;
	tokens[0] ^= 0x5a5a;	/* other chunks: a STORE would read A's blocks */
	if (kvstash_store(c, &k, IID, src, nblk) == 0)
		bad++;
	if (kvstash_heartbeat(c, IID) != 0)
		bad++;		/* PING itself is answered true */
	kvstash_close(c);
	_exit(bad ? 1 : 0);
}

/*
 * Run intruder() in another process: this program again (exec, not just
 * fork: a forked child of a threaded process may not start threads under
 * ThreadSanitizer, and libkvstash's ZMQ context starts some).
 */
static int run_intruder(const char *endpoint, bool ipc)
{
	int st = -1;
	pid_t p = fork();

	if (p == 0) {
		execl("/proc/self/exe", "test_reconnect", "--intruder", endpoint, ipc ? "ipc" : "tcp",
		      (char *)NULL);
		_exit(127);
	}
	if (p < 0 || waitpid(p, &st, 0) != p)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static size_t count_bad(struct t_kv *kv, const int64_t *blocks, uint64_t seed)
{
	size_t bad = 0;

	for (size_t t = 0; t < NCHUNKS * C; t++)
		bad += !t_kv_check_token(kv, t_kv_slot(kv, blocks, t), seed, t);
	return bad;
}

static bool all_zero(struct t_kv *kv, const int64_t *blocks)
{
	for (size_t t = 0; t < NCHUNKS * C; t++)
		for (int l = 0; l < NL; l++)
			for (int p = 0; p < kv->planes; p++) {
				const uint8_t *r = t_kv_row(kv, l, p, t_kv_slot(kv, blocks, t));

				for (size_t i = 0; i < kv->row_bytes; i++)
					if (r[i])
						return false;
			}
	return true;
}

static void run_case(const char *listen)
{
	char args[256];
	struct t_daemon *d;
	kvstash_client *a, *b, *c, *obs;
	struct t_kv kv;
	const uint64_t seed = 0xa11ce;
	const bool ipc = listen == NULL;
	struct kvstash_key k = key_of(0, NCHUNKS * C, "req-a");

	snprintf(args, sizeof(args), "--pool-size=64M --client-timeout-s=3%s%s",
		 listen ? " --listen=" : "", listen ? listen : "");
	d = t_daemon_start(args);
	REQUIRE(d);
	fprintf(stderr, "case %s\n", d->endpoint);
	REQUIRE(t_kv_create(&kv, KVSTASH_LAYOUT_FLASH_ATTN, "float16", NL, NB, BS, NH, HS) == 0);
	set_ids(ipc);
	memset(kv.buf.ptr, 0, kv.buf.bytes);
	for (size_t t = 0; t < NCHUNKS * C; t++)
		t_kv_fill_token(&kv, t_kv_slot(&kv, src, t), seed, t);

	REQUIRE(kvstash_connect(d->endpoint, 5000, &obs) == 0);
	REQUIRE(kvstash_connect(d->endpoint, 5000, &a) == 0);
	CHECK_EQ(t_stat(obs, "instances"), 0);
	REQUIRE(t_kv_register(&kv, a, IID, MODEL, 1) == 0);
	CHECK_EQ(kvstash_heartbeat(a, IID), 0);
	CHECK_EQ(kvstash_store(a, &k, IID, src, nblk), 0);

	/* 1. Idle but connected past the timeout: kept. */
	usleep(4000 * 1000);
	CHECK_EQ(t_stat(obs, "instances"), 1);
	CHECK_EQ(t_stat(obs, "instances_reaped"), 0);
	CHECK_EQ(kvstash_heartbeat(a, IID), 0);

	/* 2. Another process, A still connected: refused, A's blocks untouched. */
	CHECK_EQ(run_intruder(d->endpoint, ipc), 0);
	CHECK(all_zero(&kv, dst));
	CHECK_EQ(count_bad(&kv, src, seed), 0);

	/* 3. A's connection closes. */
	uint64_t closed = t_stat(obs, "connections_closed");

	kvstash_close(a);
	REQUIRE(wait_closed(obs, closed + 1));
	if (ipc) {
		/* another pid never takes it over */
		CHECK_EQ(run_intruder(d->endpoint, ipc), 0);
		CHECK(all_zero(&kv, dst));
		CHECK_EQ(t_stat(obs, "instances_adopted"), 0);
	}

	/* 4. A new connection of the same process, no re-REGISTER. A side
	 * connection that speaks first without naming the instance (a PING)
	 * does not take it over. */
	{
		kvstash_client *side;
		double rtt;

		REQUIRE(kvstash_connect(d->endpoint, 5000, &side) == 0);
		CHECK_EQ(kvstash_ping(side, &rtt), 0);
		CHECK_EQ(t_stat(obs, "instances_adopted"), 0);
		kvstash_close(side);
	}
	REQUIRE(kvstash_connect(d->endpoint, 5000, &b) == 0);
	k.request_id = "req-b";
	CHECK_EQ(kvstash_retrieve(b, &k, IID, dst, nblk, 0), 0);
	CHECK_EQ(count_bad(&kv, dst, seed), 0);
	struct kvstash_key k2 = key_of(NCHUNKS * C, NCHUNKS * C + C, "req-b2");
	CHECK_EQ(kvstash_store(b, &k2, IID, src, C / BS), 0);
	CHECK_EQ(kvstash_heartbeat(b, IID), 0);
	CHECK_EQ(t_stat(obs, "instances_adopted"), 1);
	CHECK_EQ(t_stat(obs, "instances"), 1);
	int64_t chunks = -1;
	struct kvstash_key lk = key_of(0, 0, "req-lookup");

	lk.worker_id = -1;
	CHECK_EQ(kvstash_lookup_chunks(obs, &lk, 1, &chunks), 0);
	CHECK_EQ(chunks, NCHUNKS + 1);
	if (!ipc) {
		/* plain tcp: a second connection from the same host while B is
		 * connected is another client (docs/architecture.md) */
		CHECK_EQ(run_intruder(d->endpoint, ipc), 0);
	}

	/* 5. B goes away for good: reaped past the timeout, then failure replies. */
	closed = t_stat(obs, "connections_closed");
	kvstash_close(b);
	REQUIRE(wait_closed(obs, closed + 1));
	if (ipc) {
		/* Another connection of the process (obs) is open: still alive. */
		usleep(4000 * 1000);
		CHECK_EQ(t_stat(obs, "instances_reaped"), 0);
		CHECK_EQ(t_stat(obs, "instances"), 1);
		kvstash_close(obs);
		obs = NULL;
	}
	usleep(4000 * 1000);
	if (!obs)
		REQUIRE(kvstash_connect(d->endpoint, 5000, &obs) == 0);
	CHECK_EQ(t_stat(obs, "instances_reaped"), 1);
	CHECK_EQ(t_stat(obs, "instances"), 0);
	REQUIRE(kvstash_connect(d->endpoint, 5000, &c) == 0);
	k.request_id = "req-c";
	CHECK_EQ(kvstash_store(c, &k, IID, src, nblk), -EIO);
	CHECK(strstr(kvstash_last_error(), "not registered") != NULL);
	CHECK_EQ(kvstash_retrieve(c, &k, IID, dst, nblk, 0), -ENOENT);
	CHECK(strstr(kvstash_last_error(), "not registered") != NULL);
	kvstash_close(c);
	kvstash_close(obs);
	t_kv_destroy(&kv);
	if (t_failures)
		t_daemon_dump_log(d);
	CHECK_EQ(t_daemon_stop(d), 0);
}

int main(int argc, char **argv)
{
	char tcp[64];

	if (argc == 4 && !strcmp(argv[1], "--intruder")) {
		set_ids(!strcmp(argv[3], "ipc"));
		intruder(argv[2]);
	}

	signal(SIGPIPE, SIG_IGN);
	run_case(NULL);
	/* a port unlikely to be taken by the tests running beside this one */
	snprintf(tcp, sizeof(tcp), "tcp://127.0.0.1:%d", 20000 + (int)(getpid() % 20000));
	run_case(tcp);
	return t_result("reconnect");
}
