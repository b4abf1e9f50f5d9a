/*
 * Description: kvstashd end to end on a GPU: engines register paged KV in
 * device memory by CUDA IPC handle, STORE and RETRIEVE through the server
 * with IPC events, byte-exact for flash_attn, flashinfer and MLA layouts in
 * several dtypes, with skip_first_n_tokens and shuffled blocks; an
 * out-of-range block id is refused; two client processes work at once; a
 * client SIGKILLed mid-STORE is reaped (its mappings closed) while the
 * server keeps serving; a round trip works while a large pool is still being
 * pinned in the background. Exits 77 without a CUDA device. Labels: gpu
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "kvfix.h"
#include "kvstash.h"

#ifndef KVSTASH_HAVE_CUDA
int main(void)
{
	fprintf(stderr, "built without CUDA\n");
	return T_EXIT_SKIP;
}
#else
#include <cuda_runtime.h>

#define C 256
#define NTOK (2 * C + 37)	/* two full chunks and a partial tail */
#define NRANGE (2 * C)
#define MAXBLK 256

struct gcase {
	const char *name;
	enum kvstash_layout layout;
	const char *dtype;
	int eb, nl, nb, bs, nh, hs;
};

/* Largest object first: the first registration sizes the pool's slots. */
static const struct gcase cases[] = {
	{ "flash_attn bf16", KVSTASH_LAYOUT_FLASH_ATTN, "bfloat16", 2, 4, 96, 16, 8, 128 },
	{ "flashinfer fp16", KVSTASH_LAYOUT_FLASHINFER, "float16", 2, 4, 96, 16, 8, 128 },
	{ "flash_attn fp32", KVSTASH_LAYOUT_FLASH_ATTN, "float32", 4, 2, 64, 16, 4, 64 },
	{ "mla bf16", KVSTASH_LAYOUT_MLA, "bfloat16", 2, 4, 24, 64, 1, 576 },
	{ "mla fp8", KVSTASH_LAYOUT_MLA, "float8_e4m3fn", 1, 4, 24, 64, 1, 576 },
};

struct gkv {
	const struct gcase *g;
	size_t row, layer_bytes, bytes;
	int planes;
	void *dev;		/* one allocation holding every layer */
	uint8_t *host;		/* mirror for filling and checking */
	struct kvstash_kv_layout lay;
	struct kvstash_cuda_layer layers[8];
};

static char dev_uuid[48];

static int gkv_create(struct gkv *kv, const struct gcase *g)
{
	memset(kv, 0, sizeof(*kv));
	kv->g = g;
	kv->planes = g->layout == KVSTASH_LAYOUT_MLA ? 1 : 2;
	kv->row = (size_t)g->nh * (size_t)g->hs * (size_t)g->eb;
	kv->layer_bytes = (size_t)kv->planes * (size_t)g->nb * (size_t)g->bs * kv->row;
	/* A gap between layers, so offsets are not just multiples of the layer size. */
	kv->bytes = (size_t)g->nl * (kv->layer_bytes + 4096);
	if (cudaMalloc(&kv->dev, kv->bytes) != cudaSuccess)
		return -ENOMEM;
	kv->host = calloc(1, kv->bytes);
	if (!kv->host)
		return -ENOMEM;
	kv->lay.layout = g->layout;
	kv->lay.dtype = g->dtype;
	if (g->layout == KVSTASH_LAYOUT_MLA) {
		kv->lay.ndim = 3;
		kv->lay.shape[0] = g->nb, kv->lay.shape[1] = g->bs, kv->lay.shape[2] = g->hs;
	} else {
		int64_t fa[5] = { 2, g->nb, g->bs, g->nh, g->hs }, fi[5] = { g->nb, 2, g->bs, g->nh, g->hs };

		kv->lay.ndim = 5;
		memcpy(kv->lay.shape, g->layout == KVSTASH_LAYOUT_FLASH_ATTN ? fa : fi, sizeof(fa));
	}
	cudaIpcMemHandle_t h;
	if (cudaIpcGetMemHandle(&h, kv->dev) != cudaSuccess)
		return -EIO;
	for (int l = 0; l < g->nl; l++) {
		memcpy(kv->layers[l].mem_handle, &h, 64);
		kv->layers[l].offset = (uint64_t)l * (kv->layer_bytes + 4096);
		kv->layers[l].nbytes = kv->bytes;
	}
	return 0;
}

static void gkv_destroy(struct gkv *kv)
{
	cudaFree(kv->dev);
	free(kv->host);
}

static size_t row_off(const struct gkv *kv, int l, int p, int64_t slot)
{
	const struct gcase *g = kv->g;
	size_t blk = (size_t)(slot / g->bs), off = (size_t)(slot % g->bs), r;

	if (g->layout == KVSTASH_LAYOUT_FLASH_ATTN)
		r = ((size_t)p * (size_t)g->nb + blk) * (size_t)g->bs + off;
	else if (g->layout == KVSTASH_LAYOUT_FLASHINFER)
		r = (blk * 2 + (size_t)p) * (size_t)g->bs + off;
	else
		r = blk * (size_t)g->bs + off;
	return (size_t)l * (kv->layer_bytes + 4096) + r * kv->row;
}

static int64_t slot_of(const struct gkv *kv, const int64_t *blocks, size_t t)
{
	return blocks[t / (size_t)kv->g->bs] * kv->g->bs + (int64_t)(t % (size_t)kv->g->bs);
}

/* An interprocess event recorded now on the default stream; its handle in @out. */
static int record_event(cudaEvent_t *ev, void *out)
{
	cudaIpcEventHandle_t h;

	if (cudaEventCreateWithFlags(ev, cudaEventDisableTiming | cudaEventInterprocess) ||
	    cudaEventRecord(*ev, 0) || cudaIpcGetEventHandle(&h, *ev))
		return -EIO;
	memcpy(out, &h, 64);
	return 0;
}

/* Wait for the server's reply event (complete already: the reply follows the copy). */
static int wait_server_event(const void *handle)
{
	static const uint8_t zero[64];
	cudaIpcEventHandle_t h;
	cudaEvent_t ev;

	if (!memcmp(handle, zero, 64))
		return 0;	/* nothing was copied */
	memcpy(&h, handle, 64);
	if (cudaIpcOpenEventHandle(&ev, h) != cudaSuccess)
		return -EIO;
	int rc = cudaEventSynchronize(ev) == cudaSuccess ? 0 : -EIO;
	cudaEventDestroy(ev);
	return rc;
}

/* Round trip of one case through @c; returns the number of mismatching rows. */
static size_t round_trip(kvstash_client *c, const struct gcase *g, int64_t inst, uint64_t seed,
			 const char *model)
{
	struct gkv kv;
	int64_t blocks[MAXBLK];
	uint32_t tok[NTOK];
	uint8_t wait_ev[64], done_ev[64];
	cudaEvent_t ev;
	size_t nblk = NRANGE / (size_t)g->bs, bad = 0;
	int64_t *src = blocks, *dst = blocks + nblk;
	char rid[64];

	REQUIRE(gkv_create(&kv, g) == 0);
	REQUIRE(2 * nblk <= (size_t)g->nb);
	for (int i = 0; i < g->nb; i++)
		blocks[i] = (i * 37 + 11) % g->nb;	/* a permutation: nb is not a multiple of 37 */
	for (size_t t = 0; t < NTOK; t++)
		tok[t] = (uint32_t)(seed * 2654435761u) ^ (uint32_t)t;
	t_fill(kv.host, kv.bytes, seed);
	/* Target rows start zeroed so the skipped ones can be told apart. */
	for (size_t t = 0; t < NRANGE; t++)
		for (int l = 0; l < g->nl; l++)
			for (int p = 0; p < kv.planes; p++)
				memset(kv.host + row_off(&kv, l, p, slot_of(&kv, dst, t)), 0, kv.row);
	REQUIRE(cudaMemcpy(kv.dev, kv.host, kv.bytes, cudaMemcpyHostToDevice) == cudaSuccess);
	REQUIRE(record_event(&ev, wait_ev) == 0);

	if (kvstash_register_cuda(c, inst, model, 1, &kv.lay, dev_uuid, kv.layers, (size_t)g->nl)) {
		fprintf(stderr, "%s: register: %s\n", g->name, kvstash_last_error());
		t_failures++;
		goto out;
	}
	snprintf(rid, sizeof(rid), "gpu-%" PRIu64, seed);
	struct kvstash_key key = { .model = model, .world_size = 1, .worker_id = 0, .tokens = tok,
				   .ntokens = NTOK, .start = 0, .end = NRANGE, .request_id = rid };
	CHECK_EQ(kvstash_store_event(c, &key, inst, src, nblk, wait_ev, done_ev), 0);
	CHECK_EQ(wait_server_event(done_ev), 0);

	int64_t chunks = -1;
	key.worker_id = -1;
	CHECK_EQ(kvstash_lookup_chunks(c, &key, 1, &chunks), 0);
	CHECK_EQ(chunks, 2);
	key.worker_id = 0;

	/* A block id past the registration is refused before any launch. */
	int64_t badblk[MAXBLK];
	memcpy(badblk, dst, nblk * sizeof(*dst));
	badblk[3] = g->nb;
	CHECK_EQ(kvstash_retrieve_event(c, &key, inst, badblk, nblk, 0, NULL, done_ev), -ENOENT);
	CHECK(strstr(kvstash_last_error(), "outside") != NULL);

	CHECK_EQ(kvstash_retrieve_event(c, &key, inst, dst, nblk, 300, wait_ev, done_ev), 0);
	CHECK_EQ(wait_server_event(done_ev), 0);
	uint8_t *back = malloc(kv.bytes);
	REQUIRE(back);
	REQUIRE(cudaMemcpy(back, kv.dev, kv.bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
	for (size_t t = 0; t < NRANGE; t++)
		for (int l = 0; l < g->nl; l++)
			for (int p = 0; p < kv.planes; p++) {
				size_t o = row_off(&kv, l, p, slot_of(&kv, dst, t));
				/* t >= 300: the source row; t < 300: untouched (the zeros). */
				const uint8_t *want = t >= 300 ? kv.host + row_off(&kv, l, p,
										  slot_of(&kv, src, t)) :
								 kv.host + o;

				bad += memcmp(back + o, want, kv.row) != 0;
			}
	/* Every byte outside the target rows is as it was (guards between layers too). */
	for (size_t t = 0; t < NRANGE; t++)
		for (int l = 0; l < g->nl; l++)
			for (int p = 0; p < kv.planes; p++) {
				size_t o = row_off(&kv, l, p, slot_of(&kv, dst, t));

				memcpy(back + o, kv.host + o, kv.row);
			}
	bad += memcmp(back, kv.host, kv.bytes) != 0;
	free(back);
	kvstash_end_session(c, rid);
	CHECK_EQ(kvstash_unregister(c, inst), 0);
out:
	cudaEventDestroy(ev);
	gkv_destroy(&kv);
	if (bad)
		fprintf(stderr, "%s: %zu rows wrong\n", g->name, bad);
	return bad;
}

static int init_device(void)
{
	int n = 0;
	struct cudaDeviceProp prop;
	const unsigned char *u;

	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0)
		return -ENODEV;
	if (cudaSetDevice(0) || cudaGetDeviceProperties(&prop, 0))
		return -EIO;
	u = (const unsigned char *)prop.uuid.bytes;
	snprintf(dev_uuid, sizeof(dev_uuid),
		 "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0],
		 u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
		 u[14], u[15]);
	fprintf(stderr, "device 0: %s (%s)\n", prop.name, dev_uuid);
	return 0;
}

/* Child modes (exec'd, so each has its own CUDA context): "rt" and "storeloop". */
static int child_main(const char *mode, const char *ep, int id)
{
	kvstash_client *c;

	if (init_device())
		return 2;
	REQUIRE(kvstash_connect(ep, 20000, &c) == 0);
	if (!strcmp(mode, "rt")) {
		size_t bad = 0;
		char model[32];

		snprintf(model, sizeof(model), "m-child-%d", id);
		for (int r = 0; r < 5; r++)
			bad += round_trip(c, &cases[id % 2], 700 + id * 10 + r, (uint64_t)id * 100 + r,
					  model);
		kvstash_close(c);
		return bad || t_failures ? 1 : 0;
	}
	/* storeloop: register, heartbeat with the id, STORE fresh chunks until killed. */
	struct gkv kv;
	int64_t blocks[MAXBLK];
	uint32_t tok[NTOK];
	const struct gcase *g = &cases[0];

	REQUIRE(gkv_create(&kv, g) == 0);
	REQUIRE(kvstash_register_cuda(c, 999, "m-doomed", 1, &kv.lay, dev_uuid, kv.layers,
				      (size_t)g->nl) == 0);
	for (int i = 0; i < g->nb; i++)
		blocks[i] = i;
	printf("ready\n");
	fflush(stdout);
	for (uint32_t it = 0;; it++) {
		kvstash_heartbeat(c, 999);
		for (size_t t = 0; t < NTOK; t++)
			tok[t] = it << 16 | (uint32_t)t;
		struct kvstash_key key = { .model = "m-doomed", .world_size = 1, .worker_id = 0,
					   .tokens = tok, .ntokens = NTOK, .start = 0,
					   .end = NRANGE, .request_id = "doomed" };
		kvstash_store(c, &key, 999, blocks, NRANGE / (size_t)g->bs);
	}
}

static pid_t spawn(const char *self, const char *mode, const char *ep, int id, int *out_fd)
{
	char idbuf[16];
	int pfd[2];
	pid_t pid;

	snprintf(idbuf, sizeof(idbuf), "%d", id);
	REQUIRE(pipe(pfd) == 0);
	pid = fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		dup2(pfd[1], STDOUT_FILENO);
		close(pfd[0]);
		execl(self, self, mode, ep, idbuf, (char *)NULL);
		_exit(127);
	}
	close(pfd[1]);
	if (out_fd)
		*out_fd = pfd[0];
	else
		close(pfd[0]);
	return pid;
}

int main(int argc, char **argv)
{
	struct t_daemon *d;
	kvstash_client *c;
	int n = 0, st;

	if (argc == 4)
		return child_main(argv[1], argv[2], atoi(argv[3]));
	/* Children are exec'd before this process touches CUDA (fork + CUDA don't mix);
	 * here only count devices through a child-free query. */
	if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
		fprintf(stderr, "no CUDA device\n");
		return T_EXIT_SKIP;
	}
	d = t_daemon_start("--pool-size=1G --client-timeout-s=2 --workers=2");
	REQUIRE(d);
	REQUIRE(init_device() == 0);
	REQUIRE(kvstash_connect(d->endpoint, 20000, &c) == 0);

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t bad = round_trip(c, &cases[i], 100 + (int64_t)i, 1000 + i, "m-gpu");

		fprintf(stderr, "%-16s %s\n", cases[i].name, bad ? "FAILED" : "byte-exact");
		CHECK_EQ(bad, 0);
	}

	/* Two client processes at once, each with its own allocations and model. */
	pid_t a = spawn(argv[0], "rt", d->endpoint, 1, NULL);
	pid_t b = spawn(argv[0], "rt", d->endpoint, 2, NULL);
	waitpid(a, &st, 0);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	waitpid(b, &st, 0);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);

	/* A client killed mid-STORE: reaped 2 s after its last heartbeat. */
	int fd;
	char buf[16] = "";
	pid_t k = spawn(argv[0], "storeloop", d->endpoint, 3, &fd);
	CHECK(read(fd, buf, sizeof(buf) - 1) > 0 && !strncmp(buf, "ready", 5));
	close(fd);
	usleep(500000);
	kill(k, SIGKILL);
	waitpid(k, &st, 0);
	CHECK(round_trip(c, &cases[0], 300, 77, "m-gpu") == 0);
	uint64_t reaped = 0;
	for (int i = 0; i < 80 && reaped == 0; i++) {
		usleep(100000);
		reaped = t_stat(c, "instances_reaped");
	}
	CHECK_EQ(reaped, 1);
	CHECK_EQ(t_stat(c, "instances"), 0);
	CHECK_EQ(t_stat(c, "pins"), 0);
	CHECK(round_trip(c, &cases[1], 301, 78, "m-gpu") == 0);
	kvstash_close(c);
	CHECK_EQ(t_daemon_stop(d), 0);

	/*
	 * GPU transfers while the pool is still being pinned in the background
	 * (48 GiB: seconds of cudaHostRegister): once the first piece is pinned,
	 * a STORE into the first slots and its RETRIEVE work, byte-exact, with
	 * the rest of the pool not pinned yet.
	 */
	d = t_daemon_start("--pool-size=48G --workers=2");
	REQUIRE(d);
	REQUIRE(kvstash_connect(d->endpoint, 20000, &c) == 0);
	uint64_t pinned = 0, total = t_stat(c, "pool_pin_total_bytes");
	for (int i = 0; i < 20000 && pinned == 0; i++) {
		usleep(1000);
		pinned = t_stat(c, "pool_pinned_bytes");
	}
	CHECK(pinned > 0);
	CHECK(round_trip(c, &cases[0], 400, 79, "m-gpu") == 0);
	pinned = t_stat(c, "pool_pinned_bytes");
	fprintf(stderr, "while pinning: round trip done with %" PRIu64 " of %" PRIu64 " MiB pinned\n",
		pinned >> 20, total >> 20);
	CHECK(pinned < total);	/* else the case above was not exercised */
	kvstash_close(c);
	CHECK_EQ(t_daemon_stop(d), 0);
	return t_result("cuda_server");
}
#endif
