/* Description: a client SIGKILLed mid-STORE/LOOKUP, or one that truncates its shared buffer, leaks nothing and crashes nothing in kvstashd. Labels: unit
 *
 * kvstashd runs with --read-ttl-s=1 --write-ttl-s=1. Forked children, each
 * with its own libkvstash client and its own memfd KV buffer (32 layers,
 * 4 MiB objects), register and loop STORE of 8 new chunks, LOOKUP (read
 * locks) and RETRIEVE (releasing them; every 8th round the locks are left
 * dangling, the first round included). The parent SIGKILLs each child at
 * a random moment after its first round, while a thread in the parent keeps
 * storing, looking up and retrieving its own chunks and checks them byte
 * for byte. Then two children break their buffer: one truncates its memfd
 * to 0 and then STOREs (must fail with a bus-error reason, copy_faults
 * counted) and RETRIEVEs (same), the other has a STORE queued (proved by a
 * PING answered behind it on the same connection) when it truncates and is
 * killed. Afterwards PING answers, the parent's thread saw no error and no
 * wrong byte, and within a few seconds pins, read_locks, objects_writing and
 * the transfer queue return to 0, expired read locks were counted, and
 * slots_free + objects == slots_total (no slot leaked).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "helpers.h"
#include "kvstash.h"
#include "protocol.h"

#define C 256			/* kvstashd's default chunk size */
#define BS 16
#define NH 2
#define HS 64
#define NL 32
#define EB 2
#define BLOCK_BYTES ((size_t)BS * NH * HS * EB)		/* 4 KiB */
#define MODEL "kill-model"
#define CHILD_CHUNKS 8
#define CHILD_NB (2 * CHILD_CHUNKS * C / BS)		/* source + target blocks */
#define PARENT_CHUNKS 2
#define PARENT_NB (2 * PARENT_CHUNKS * C / BS)
#define KILL_ROUNDS 3

static struct t_daemon *d;

/* A REQUIRE failure exits: take the daemon down too (children die with us). */
static void kill_daemon_at_exit(void)
{
	if (d && d->pid > 0)
		kill(d->pid, SIGKILL);
}

static size_t layer_bytes(size_t nb)
{
	return 2 * nb * BLOCK_BYTES;
}

static void make_layout(struct kvstash_kv_layout *lay, size_t nb)
{
	memset(lay, 0, sizeof(*lay));
	lay->layout = KVSTASH_LAYOUT_FLASH_ATTN;
	lay->dtype = "bfloat16";
	lay->ndim = 5;
	lay->shape[0] = 2;
	lay->shape[1] = (int64_t)nb;
	lay->shape[2] = BS;
	lay->shape[3] = NH;
	lay->shape[4] = HS;
}

/* Register @buf (NL layers of @nb blocks, back to back) as @instance. */
static int register_buf(kvstash_client *c, int64_t instance, struct kvstash_host_buffer *buf,
			size_t nb)
{
	struct kvstash_kv_layout lay;
	struct kvstash_host_layer layers[NL];

	make_layout(&lay, nb);
	for (int l = 0; l < NL; l++) {
		layers[l].path = buf->path;
		layers[l].offset = (uint64_t)l * layer_bytes(nb);
		layers[l].nbytes = buf->bytes;
	}
	return kvstash_register_host(c, instance, MODEL, 1, &lay, layers, NL);
}

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static void make_tokens(uint32_t *tok, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		tok[i] = (uint32_t)mix(seed * 1000003u + i);
}

/* ---- children ------------------------------------------------------------ */

enum child_kind { CHILD_LOOP, CHILD_TRUNCATE_FIRST, CHILD_TRUNCATE_QUEUED };

struct child {
	pid_t pid;
	int go_w;		/* parent writes 1 byte: start */
	int status_r;		/* child writes progress bytes */
	enum child_kind kind;
};

static void child_say(int fd, char c)
{
	if (write(fd, &c, 1) != 1)
		_exit(3);
}

/* STORE 8 new chunks, LOOKUP, RETRIEVE (not every round): forever. */
static void child_loop(int status_w, int64_t instance)
{
	struct kvstash_host_buffer buf = { .fd = -1 };
	kvstash_client *c = NULL;
	static uint32_t tok[CHILD_CHUNKS * C];
	int64_t src[CHILD_NB / 2], dst[CHILD_NB / 2];

	if (kvstash_connect(d->endpoint, 10000, &c) ||
	    kvstash_host_buffer_create(&buf, NL * layer_bytes(CHILD_NB), "kill-child") ||
	    register_buf(c, instance, &buf, CHILD_NB))
		_exit(2);
	t_fill(buf.ptr, buf.bytes, (uint64_t)instance);
	for (int b = 0; b < CHILD_NB / 2; b++) {
		src[b] = b;
		dst[b] = CHILD_NB / 2 + b;
	}
	for (uint64_t round = 0;; round++) {
		char rid[64];
		int64_t chunks = 0;

		snprintf(rid, sizeof(rid), "child-%d-%llu", (int)getpid(),
			 (unsigned long long)round);
		make_tokens(tok, CHILD_CHUNKS * C, (uint64_t)getpid() << 32 | round);
		struct kvstash_key k = { .model = MODEL, .world_size = 1, .worker_id = 0,
					 .tokens = tok, .ntokens = CHILD_CHUNKS * C, .start = 0,
					 .end = CHILD_CHUNKS * C, .request_id = rid };
		if (kvstash_store(c, &k, instance, src, CHILD_NB / 2))
			_exit(4);
		k.worker_id = -1;
		if (kvstash_lookup_chunks(c, &k, 1, &chunks))
			_exit(5);
		k.worker_id = 0;
		/* Every 8th round (the first included) the locks are left to expire. */
		if (round % 8 != 0 && chunks == CHILD_CHUNKS)
			kvstash_retrieve(c, &k, instance, dst, CHILD_NB / 2, 0);
		kvstash_end_session(c, rid);
		if (round == 0)
			child_say(status_w, 'R');
	}
}

/* Truncate the buffer, then STORE and RETRIEVE from/into it: both must fail cleanly. */
static void child_truncate_first(int status_w, int64_t instance)
{
	struct kvstash_host_buffer buf = { .fd = -1 };
	kvstash_client *c = NULL;
	static uint32_t tok[2 * CHILD_CHUNKS * C];
	int64_t src[CHILD_NB / 2], dst[CHILD_NB / 2];
	char rid[] = "child-truncate-first";

	if (kvstash_connect(d->endpoint, 10000, &c) ||
	    kvstash_host_buffer_create(&buf, NL * layer_bytes(CHILD_NB), "kill-trunc") ||
	    register_buf(c, instance, &buf, CHILD_NB))
		_exit(2);
	t_fill(buf.ptr, buf.bytes, (uint64_t)instance);
	for (int b = 0; b < CHILD_NB / 2; b++) {
		src[b] = b;
		dst[b] = CHILD_NB / 2 + b;
	}
	make_tokens(tok, 2 * CHILD_CHUNKS * C, (uint64_t)getpid() << 32);
	/* Chunks [0, 8) stored while the buffer is whole. A STORE succeeds even
	 * when some chunks found no room (the pool is full of other clients'
	 * locked chunks) or outlived --write-ttl-s on a loaded machine, so store
	 * until a LOOKUP finds all 8: its locks also keep them from eviction
	 * until the RETRIEVE below. */
	struct kvstash_key k = { .model = MODEL, .world_size = 1, .worker_id = 0, .tokens = tok,
				 .ntokens = 2 * CHILD_CHUNKS * C, .start = 0,
				 .end = CHILD_CHUNKS * C, .request_id = rid };
	int64_t found = 0;

	for (int attempt = 0; found != CHILD_CHUNKS; attempt++) {
		if (attempt == 50 || kvstash_store(c, &k, instance, src, CHILD_NB / 2))
			_exit(4);
		k.worker_id = -1;
		if (kvstash_lookup_chunks(c, &k, 1, &found))
			_exit(5);
		k.worker_id = 0;
		if (found != CHILD_CHUNKS)
			usleep(100000);
	}
	if (ftruncate(buf.fd, 0))
		_exit(6);
	/* Chunks [8, 16): the server's copy reads past EOF (SIGBUS). */
	k.start = CHILD_CHUNKS * C;
	k.end = 2 * CHILD_CHUNKS * C;
	int rc = kvstash_store(c, &k, instance, src, CHILD_NB / 2);
	bool store_faulted = rc == -EIO && strstr(kvstash_last_error(), "bus error");

	child_say(status_w, store_faulted ? 'S' : 's');
	if (!store_faulted)
		fprintf(stderr, "child: STORE into a truncated buffer: %d %s\n", rc,
			kvstash_last_error());
	/* RETRIEVE of the chunks [0, 8): the server's copy writes past EOF. */
	k.start = 0;
	k.end = CHILD_CHUNKS * C;
	rc = kvstash_retrieve(c, &k, instance, dst, CHILD_NB / 2, 0);
	bool retrieve_faulted = rc == -ENOENT && strstr(kvstash_last_error(), "bus error");

	child_say(status_w, retrieve_faulted ? 'G' : 'g');
	if (!retrieve_faulted)
		fprintf(stderr, "child: RETRIEVE into a truncated buffer: %d %s\n", rc,
			kvstash_last_error());
	for (;;)
		pause();
}

/* A STORE in the server's hands when the buffer is truncated and we die. */
static void child_truncate_queued(int status_w, int64_t instance)
{
	struct kvstash_host_buffer buf = { .fd = -1 };
	kvstash_client *c = NULL;
	static uint32_t tok[CHILD_CHUNKS * C];
	int64_t src[CHILD_NB / 2];
	struct proto_key pk;
	struct proto_msg a[4] = { { 0 } }, u = { 0 }, t = { 0 }, u2 = { 0 }, t2 = { 0 };
	int linger = 0, tmo = 10000;
	uint8_t rb[64];

	if (kvstash_connect(d->endpoint, 10000, &c) ||
	    kvstash_host_buffer_create(&buf, NL * layer_bytes(CHILD_NB), "kill-queued") ||
	    register_buf(c, instance, &buf, CHILD_NB))
		_exit(2);
	t_fill(buf.ptr, buf.bytes, (uint64_t)instance);
	for (int b = 0; b < CHILD_NB / 2; b++)
		src[b] = b;
	make_tokens(tok, CHILD_CHUNKS * C, (uint64_t)getpid() << 32 | 1);
	memset(&pk, 0, sizeof(pk));
	memcpy(pk.model, MODEL, strlen(MODEL));
	pk.model_len = (uint16_t)strlen(MODEL);
	pk.world_size = 1;
	pk.worker_id = 0;
	pk.token_ids = tok;
	pk.ntokens = CHILD_CHUNKS * C;
	pk.start = 0;
	pk.end = CHILD_CHUNKS * C;
	memcpy(pk.request_id, "q", 1);
	pk.request_id_len = 1;
	if (proto_encode_key(&a[0], &pk) || proto_encode_int(&a[1], instance) ||
	    proto_encode_int_list(&a[2], src, CHILD_NB / 2) || proto_encode_bin(&a[3], NULL, 0) ||
	    proto_encode_int(&u, 1) || proto_encode_int(&t, PROTO_STORE) ||
	    proto_encode_int(&u2, 2) || proto_encode_int(&t2, PROTO_PING))
		_exit(7);
	void *ctx = zmq_ctx_new();
	void *s = zmq_socket(ctx, ZMQ_DEALER);
	zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
	zmq_setsockopt(s, ZMQ_RCVTIMEO, &tmo, sizeof(tmo));
	if (zmq_connect(s, d->endpoint))
		_exit(8);
	/* STORE then PING on one connection: the PING's reply proves the server
	 * has dispatched the STORE (queued it to a worker) already. */
	zmq_send(s, u.data, u.len, ZMQ_SNDMORE);
	zmq_send(s, t.data, t.len, ZMQ_SNDMORE);
	for (int i = 0; i < 4; i++)
		zmq_send(s, a[i].data, a[i].len, i < 3 ? ZMQ_SNDMORE : 0);
	zmq_send(s, u2.data, u2.len, ZMQ_SNDMORE);
	zmq_send(s, t2.data, t2.len, 0);
	for (;;) {
		int more = 1;
		size_t sz = sizeof(more);
		int n = zmq_recv(s, rb, sizeof(rb), 0);	/* uid frame */

		if (n < 0)
			_exit(9);
		bool ping = n == 1 && rb[0] == 2;
		while (zmq_getsockopt(s, ZMQ_RCVMORE, &more, &sz) == 0 && more)
			zmq_recv(s, rb, sizeof(rb), 0);
		if (ping)
			break;
	}
	if (ftruncate(buf.fd, 0))
		_exit(6);
	child_say(status_w, 'T');
	for (;;)
		pause();
}

static struct child spawn(enum child_kind kind, int64_t instance)
{
	struct child ch = { .kind = kind };
	int go[2], st[2];

	REQUIRE(pipe(go) == 0 && pipe(st) == 0);
	fflush(NULL);
	ch.pid = fork();
	REQUIRE(ch.pid >= 0);
	if (ch.pid == 0) {
		char b;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() == 1)
			_exit(0);
		close(go[1]);
		close(st[0]);
		if (read(go[0], &b, 1) != 1)
			_exit(0);	/* the parent gave up on us */
		switch (kind) {
		case CHILD_LOOP: child_loop(st[1], instance); break;
		case CHILD_TRUNCATE_FIRST: child_truncate_first(st[1], instance); break;
		case CHILD_TRUNCATE_QUEUED: child_truncate_queued(st[1], instance); break;
		}
		_exit(0);
	}
	close(go[0]);
	close(st[1]);
	ch.go_w = go[1];
	ch.status_r = st[0];
	return ch;
}

/* The next status byte from @ch within @timeout_ms, or 0. */
static char child_status(struct child *ch, int timeout_ms)
{
	zmq_pollitem_t it = { .fd = ch->status_r, .events = ZMQ_POLLIN };
	char b = 0;

	if (zmq_poll(&it, 1, timeout_ms) == 1 && read(ch->status_r, &b, 1) == 1)
		return b;
	return 0;
}

static void child_kill(struct child *ch)
{
	int st = 0;

	kill(ch->pid, SIGKILL);
	REQUIRE(waitpid(ch->pid, &st, 0) == ch->pid);
	if (!(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL))
		fprintf(stderr, "child %d ended with status 0x%x before it was killed\n",
			(int)ch->pid, st);
	CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
	close(ch->go_w);
	close(ch->status_r);
}

/* ---- the parent's own client ---------------------------------------------- */

struct parent_ctx {
	atomic_bool stop;
	atomic_int rounds, verified, not_locked, errors, mismatches;
};

static void *parent_thread(void *arg)
{
	struct parent_ctx *p = arg;
	struct kvstash_host_buffer buf = { .fd = -1 };
	kvstash_client *c = NULL;
	static uint32_t tok[PARENT_CHUNKS * C];
	int64_t src[PARENT_NB / 2], dst[PARENT_NB / 2];
	const int64_t instance = 1;
	size_t lb = layer_bytes(PARENT_NB), half = (PARENT_NB / 2) * BLOCK_BYTES;

	if (kvstash_connect(d->endpoint, 10000, &c) ||
	    kvstash_host_buffer_create(&buf, NL * lb, "kill-parent") ||
	    register_buf(c, instance, &buf, PARENT_NB)) {
		fprintf(stderr, "parent client setup: %s\n", kvstash_last_error());
		atomic_fetch_add(&p->errors, 1);
		return NULL;
	}
	for (int b = 0; b < PARENT_NB / 2; b++) {
		src[b] = b;
		dst[b] = PARENT_NB / 2 + b;
	}
	for (uint64_t round = 1; !atomic_load(&p->stop); round++) {
		char rid[32];
		int64_t chunks = -1;

		snprintf(rid, sizeof(rid), "parent-%llu", (unsigned long long)round);
		make_tokens(tok, PARENT_CHUNKS * C, round);
		/* Source blocks: the first half of each plane of each layer. */
		for (int l = 0; l < NL; l++)
			for (int pl = 0; pl < 2; pl++) {
				uint8_t *plane = (uint8_t *)buf.ptr + l * lb + pl * (lb / 2);

				t_fill(plane, half, round * 131 + (uint64_t)l * 2 + (uint64_t)pl);
				memset(plane + half, 0, half);
			}
		struct kvstash_key k = { .model = MODEL, .world_size = 1, .worker_id = 0,
					 .tokens = tok, .ntokens = PARENT_CHUNKS * C, .start = 0,
					 .end = PARENT_CHUNKS * C, .request_id = rid };
		int rc = kvstash_store(c, &k, instance, src, PARENT_NB / 2);

		k.worker_id = -1;
		if (!rc)
			rc = kvstash_lookup_chunks(c, &k, 1, &chunks);
		k.worker_id = 0;
		if (!rc && chunks == PARENT_CHUNKS) {
			rc = kvstash_retrieve(c, &k, instance, dst, PARENT_NB / 2, 0);
			if (!rc) {
				int bad = 0;

				for (int l = 0; l < NL; l++)
					for (int pl = 0; pl < 2; pl++) {
						uint8_t *plane = (uint8_t *)buf.ptr + l * lb +
								 pl * (lb / 2);

						bad += t_verify(plane + half, half,
								round * 131 + (uint64_t)l * 2 +
									(uint64_t)pl) != (size_t)-1;
					}
				atomic_fetch_add(&p->mismatches, bad);
				atomic_fetch_add(&p->verified, 1);
			}
		} else if (!rc) {
			/* No room (the children's locked chunks) or evicted: let go. */
			atomic_fetch_add(&p->not_locked, 1);
			rc = kvstash_free_lookup_locks(c, &k, 1);
		}
		if (rc) {
			fprintf(stderr, "parent round %llu: %d %s\n", (unsigned long long)round, rc,
				kvstash_last_error());
			atomic_fetch_add(&p->errors, 1);
		}
		kvstash_end_session(c, rid);
		atomic_fetch_add(&p->rounds, 1);
	}
	kvstash_unregister(c, instance);
	kvstash_close(c);
	kvstash_host_buffer_destroy(&buf);
	return NULL;
}

/* ---- stats ------------------------------------------------------------------ */

struct st {
	uint64_t pins, read_locks, objects, objects_writing, slots_total, slots_free;
	uint64_t xfer_queued, xfer_running, copy_faults, expired_read_locks, requests_store;
	uint64_t store_chunks_stored;
};

static int stat_cb(const char *name, uint64_t v, void *arg)
{
	struct st *s = arg;
#define S(n) if (!strcmp(name, #n)) s->n = v;
	S(pins) S(read_locks) S(objects) S(objects_writing) S(slots_total) S(slots_free)
	S(xfer_queued) S(xfer_running) S(copy_faults) S(expired_read_locks) S(requests_store)
	S(store_chunks_stored)
#undef S
	return 0;
}

static void get_stats(kvstash_client *c, struct st *s)
{
	memset(s, 0, sizeof(*s));
	REQUIRE(kvstash_stats(c, stat_cb, s) == 0);
}

static bool settled(const struct st *s)
{
	return s->pins == 0 && s->read_locks == 0 && s->objects_writing == 0 &&
	       s->xfer_queued == 0 && s->xfer_running == 0 &&
	       s->slots_free + s->objects == s->slots_total;
}

int main(void)
{
	struct child kids[KILL_ROUNDS + 2];
	struct parent_ctx pc;
	pthread_t th;
	kvstash_client *c = NULL;
	struct st s0, s;
	unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();

	d = t_daemon_start("--pool-size=1G --read-ttl-s=1 --write-ttl-s=1 --workers=2");
	REQUIRE(d);
	atexit(kill_daemon_at_exit);
	/* Fork every child before this process has a thread or a ZMQ context. */
	for (int i = 0; i < KILL_ROUNDS; i++)
		kids[i] = spawn(CHILD_LOOP, 100 + i);
	kids[KILL_ROUNDS] = spawn(CHILD_TRUNCATE_FIRST, 200);
	kids[KILL_ROUNDS + 1] = spawn(CHILD_TRUNCATE_QUEUED, 201);
	fprintf(stderr, "random seed %u\n", seed);
	srand(seed);

	REQUIRE(kvstash_connect(d->endpoint, 10000, &c) == 0);
	memset(&pc, 0, sizeof(pc));
	REQUIRE(pthread_create(&th, NULL, parent_thread, &pc) == 0);
	while (atomic_load(&pc.rounds) < 2 && atomic_load(&pc.errors) == 0)
		usleep(1000);
	get_stats(c, &s0);

	/* Round A: kill looping children at random moments. */
	for (int i = 0; i < KILL_ROUNDS; i++) {
		struct child *ch = &kids[i];
		int delay_ms = rand() % 300;

		child_say(ch->go_w, 'g');
		char b = child_status(ch, 20000);
		if (b != 'R')
			fprintf(stderr, "child %d: no first round (status '%c')\n", i, b ? b : '0');
		CHECK_EQ(b, 'R');
		usleep((useconds_t)delay_ms * 1000);
		child_kill(ch);
		double rtt = 0;
		CHECK_EQ(kvstash_ping(c, &rtt), 0);
		fprintf(stderr, "child %d killed %d ms after its first round; PING %.3f ms\n", i,
			delay_ms, rtt);
	}

	/* Round B1: truncate, then STORE and RETRIEVE: SIGBUS in the server, guarded. */
	{
		struct child *ch = &kids[KILL_ROUNDS];

		child_say(ch->go_w, 'g');
		char b1 = child_status(ch, 20000), b2 = child_status(ch, 20000);
		CHECK_EQ(b1, 'S');	/* STORE failed with a bus-error reason */
		CHECK_EQ(b2, 'G');	/* RETRIEVE too */
		child_kill(ch);
		CHECK_EQ(kvstash_ping(c, NULL), 0);
		get_stats(c, &s);
		CHECK(s.copy_faults >= s0.copy_faults + 2);
		fprintf(stderr, "truncated before STORE/RETRIEVE: copy_faults %llu -> %llu\n",
			(unsigned long long)s0.copy_faults, (unsigned long long)s.copy_faults);
	}
	/* Round B2: a STORE dispatched, then truncate and die. */
	{
		struct child *ch = &kids[KILL_ROUNDS + 1];
		struct st before;

		get_stats(c, &before);
		child_say(ch->go_w, 'g');
		char b = child_status(ch, 20000);
		CHECK_EQ(b, 'T');
		child_kill(ch);
		CHECK_EQ(kvstash_ping(c, NULL), 0);
		usleep(200 * 1000);
		get_stats(c, &s);
		CHECK(s.requests_store >= before.requests_store + 1);
		fprintf(stderr, "truncated with a STORE queued: copy_faults %llu -> %llu\n",
			(unsigned long long)before.copy_faults, (unsigned long long)s.copy_faults);
	}

	/* The parent kept working throughout; now stop it. */
	usleep(100 * 1000);
	atomic_store(&pc.stop, true);
	pthread_join(th, NULL);
	fprintf(stderr, "parent: %d rounds, %d verified, %d not locked, %d errors, %d mismatches\n",
		atomic_load(&pc.rounds), atomic_load(&pc.verified), atomic_load(&pc.not_locked),
		atomic_load(&pc.errors), atomic_load(&pc.mismatches));
	CHECK_EQ(atomic_load(&pc.errors), 0);
	CHECK_EQ(atomic_load(&pc.mismatches), 0);
	CHECK(atomic_load(&pc.verified) >= 5);

	/* Everything the dead clients held comes back within the TTLs. */
	uint64_t t0 = (uint64_t)time(NULL);
	do {
		get_stats(c, &s);
		if (settled(&s))
			break;
		usleep(100 * 1000);
	} while ((uint64_t)time(NULL) - t0 < 10);
	fprintf(stderr, "after %llu s: pins %llu read_locks %llu objects %llu writing %llu "
		"slots_free %llu slots_total %llu queued %llu running %llu expired_read_locks %llu\n",
		(unsigned long long)((uint64_t)time(NULL) - t0), (unsigned long long)s.pins,
		(unsigned long long)s.read_locks, (unsigned long long)s.objects,
		(unsigned long long)s.objects_writing, (unsigned long long)s.slots_free,
		(unsigned long long)s.slots_total, (unsigned long long)s.xfer_queued,
		(unsigned long long)s.xfer_running, (unsigned long long)s.expired_read_locks);
	CHECK_EQ(s.pins, 0);
	CHECK_EQ(s.read_locks, 0);
	CHECK_EQ(s.objects_writing, 0);
	CHECK_EQ(s.xfer_queued, 0);
	CHECK_EQ(s.xfer_running, 0);
	CHECK_EQ(s.slots_free + s.objects, s.slots_total);
	CHECK(s.slots_total > 0);
	CHECK(s.expired_read_locks > 0);	/* the children's dangling LOOKUP locks */
	CHECK(s.store_chunks_stored >= 8);
	CHECK_EQ(kvstash_ping(c, NULL), 0);
	kvstash_close(c);

	int st = 0;
	CHECK_EQ(waitpid(d->pid, &st, WNOHANG), 0);	/* still running */
	CHECK_EQ(t_daemon_stop(d), 0);
	d = NULL;
	return t_result("server_kill");
}
