/*
 * host_bench.c - memory bandwidth of the host transfer backend next to memcpy.
 *
 * Layout: Llama-3-8B-like, one rank. NL = 32 layers, each a vLLM flash_attn
 * tensor [2, NB, 16, 8, 128] bf16, packed; chunks of 256 tokens, so one object
 * [2, 32, 256, 1024] bf16 is 32 MiB. Every chunk gets 16 distinct random
 * blocks (no two chunks share a block, so concurrent scatters never write
 * the same bytes). NB = 16 * chunks, at least 1024: 2 GiB of paged KV plus
 * 2 GiB of objects by default, far beyond the LLC, so every copy goes to DRAM.
 *
 * For each thread count (1 and --threads) it times, interleaved over several
 * rounds so that drift hits all of them alike:
 *   gather        xfer_host_gather   paged -> object, one chunk per call
 *   scatter       xfer_host_scatter  object -> paged
 *   memcpy(g)     memcpy of a contiguous 32 MiB paged range -> object
 *   memcpy(s)     memcpy object -> contiguous 32 MiB paged range
 * Each thread works on its own chunks (chunk j goes to thread j % threads).
 * GB/s = object bytes moved / wall time, 1 GB = 1e9 B (DRAM traffic is at
 * least twice that: every byte is read once and written once).
 *
 * Usage: host_bench [--threads N] [--chunks N] [--seconds S]
 *   --threads  largest thread count (default 2; 1 and N are measured)
 *   --chunks   distinct chunks/objects (default 64, at least 2*threads)
 *   --seconds  time per operation and thread count (default 1.5; about 20 s
 *              in all with setup on a 2-core VM)
 *
 * NOTE: glibc picks non-temporal stores for one memcpy above
 * glibc.cpu.x86_non_temporal_threshold (3/4 of the shared cache it detects).
 * Under a hypervisor that can exceed 32 MiB (this VM reports a 320 MiB L3),
 * and then memcpy(g/s) uses cached stores and runs slower than the streaming
 * transfer path. For a streaming baseline run with
 *   GLIBC_TUNABLES=glibc.cpu.x86_non_temporal_threshold=0x1000000
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "compiler.h"
#include "layout.h"
#include "transfer_host.h"

#define NUM_LAYERS 32
#define BLOCK_SIZE 16
#define NUM_HEADS 8
#define HEAD_SIZE 128
#define CHUNK_TOKENS 256
#define BLOCKS_PER_CHUNK (CHUNK_TOKENS / BLOCK_SIZE)
#define MIN_BLOCKS 1024		/* 2 GiB of paged KV: 64x a 32 MiB LLC */
#define ROUNDS 4		/* interleaved rounds per measurement */
#define MAX_THREADS 64

enum op { OP_GATHER, OP_SCATTER, OP_MEMCPY_G, OP_MEMCPY_S, OP_COUNT };

static const char *const op_names[OP_COUNT] = { "gather", "scatter", "memcpy(g)", "memcpy(s)" };

struct bench {
	struct kv_layout l;
	unsigned char *paged;		/* owns: NL layers of l.extent_bytes, back to back */
	void *layers[NUM_LAYERS];	/* borrows paged */
	unsigned char **objs;		/* owns: [chunks] objects of obj_bytes */
	int64_t *slots;			/* owns: [chunks][CHUNK_TOKENS] */
	uint32_t chunks;
	size_t obj_bytes;
	size_t paged_bytes;
};

struct worker {
	struct bench *b;
	pthread_t tid;
	pthread_barrier_t *start;
	enum op op;
	uint32_t id, nthreads;
	uint64_t deadline_ns;
	uint64_t bytes;		/* out */
	uint64_t end_ns;	/* out */
};

/* One chunk's worth of @op; the memcpy baselines use the chunk's 32 MiB
 * slice of the paged buffer, so they touch as many distinct bytes. */
static void do_op(struct bench *b, enum op op, uint32_t j)
{
	unsigned char *obj = b->objs[j];
	unsigned char *range = b->paged + (size_t)j * b->obj_bytes;
	const int64_t *slots = b->slots + (size_t)j * CHUNK_TOKENS;

	switch (op) {
	case OP_GATHER:
		xfer_host_gather(&b->l, b->layers, slots, CHUNK_TOKENS, obj);
		break;
	case OP_SCATTER:
		xfer_host_scatter(&b->l, b->layers, slots, CHUNK_TOKENS, 0, obj);
		break;
	case OP_MEMCPY_G:
		memcpy(obj, range, b->obj_bytes);
		break;
	case OP_MEMCPY_S:
		memcpy(range, obj, b->obj_bytes);
		break;
	default:
		break;
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct bench *b = w->b;
	uint32_t j = w->id;

	pthread_barrier_wait(w->start);
	/* At least one pass over this thread's chunks, then until the deadline. */
	for (uint32_t n = 0;; n++) {
		do_op(b, w->op, j);
		w->bytes += b->obj_bytes;
		j += w->nthreads;
		if (j >= b->chunks)
			j = w->id;
		if (n + 1 >= b->chunks / w->nthreads && ks_now_ns() >= w->deadline_ns)
			break;
	}
	w->end_ns = ks_now_ns();
	return NULL;
}

/* Run @op on @nthreads threads for @seconds; returns bytes and adds wall ns. */
static uint64_t run_op(struct bench *b, enum op op, uint32_t nthreads, double seconds,
		       uint64_t *wall_ns)
{
	struct worker w[MAX_THREADS];
	pthread_barrier_t start;
	uint64_t bytes = 0, t0, t1 = 0;

	pthread_barrier_init(&start, NULL, nthreads + 1);
	for (uint32_t i = 0; i < nthreads; i++) {
		w[i] = (struct worker){ .b = b, .start = &start, .op = op, .id = i,
					.nthreads = nthreads };
		if (pthread_create(&w[i].tid, NULL, worker_main, &w[i])) {
			fprintf(stderr, "pthread_create failed\n");
			exit(1);
		}
	}
	t0 = ks_now_ns();
	for (uint32_t i = 0; i < nthreads; i++)
		w[i].deadline_ns = t0 + (uint64_t)(seconds * 1e9);
	pthread_barrier_wait(&start);
	for (uint32_t i = 0; i < nthreads; i++) {
		pthread_join(w[i].tid, NULL);
		bytes += w[i].bytes;
		t1 = KS_MAX(t1, w[i].end_ns);
	}
	pthread_barrier_destroy(&start);
	*wall_ns += t1 - t0;
	return bytes;
}

static void *xmmap(size_t n)
{
	void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (p == MAP_FAILED) {
		fprintf(stderr, "mmap %zu bytes: %s\n", n, strerror(errno));
		exit(1);
	}
	return p;
}

/* Pages are populated by xmmap(); write them all so none is a shared zero page. */
static void fill(unsigned char *p, size_t n, uint64_t seed)
{
	memset(p, (int)(seed & 0xff) | 1, n);
}

static void setup(struct bench *b, uint32_t chunks)
{
	struct kv_layout *l = &b->l;
	char err[128];
	uint32_t nb = KS_MAX(MIN_BLOCKS, chunks * BLOCKS_PER_CHUNK);

	*l = (struct kv_layout){ .kind = KV_LAYOUT_FLASH_ATTN, .dtype = KV_DTYPE_BFLOAT16,
				 .num_layers = NUM_LAYERS, .ndim = 5 };
	int64_t shape[5] = { 2, nb, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE };
	int64_t stride[5] = { (int64_t)nb * BLOCK_SIZE * NUM_HEADS * HEAD_SIZE,
			      BLOCK_SIZE * NUM_HEADS * HEAD_SIZE, NUM_HEADS * HEAD_SIZE, HEAD_SIZE,
			      1 };

	memcpy(l->shape, shape, sizeof(shape));
	memcpy(l->stride, stride, sizeof(stride));
	if (kv_layout_init(l, err, sizeof(err))) {
		fprintf(stderr, "kv_layout_init: %s\n", err);
		exit(1);
	}
	b->chunks = chunks;
	b->obj_bytes = kv_object_bytes(l, CHUNK_TOKENS);
	b->paged_bytes = (size_t)l->extent_bytes * NUM_LAYERS;
	b->paged = xmmap(b->paged_bytes);
	fill(b->paged, b->paged_bytes, 0x5a);
	for (uint32_t i = 0; i < NUM_LAYERS; i++)
		b->layers[i] = b->paged + (size_t)i * l->extent_bytes;
	b->objs = calloc(chunks, sizeof(*b->objs));
	b->slots = calloc((size_t)chunks * CHUNK_TOKENS, sizeof(*b->slots));
	if (!b->objs || !b->slots) {
		fprintf(stderr, "out of memory\n");
		exit(1);
	}
	for (uint32_t j = 0; j < chunks; j++) {
		b->objs[j] = xmmap(b->obj_bytes);
		fill(b->objs[j], b->obj_bytes, j);
	}

	/* Random distinct blocks: a shuffled [0, nb), 16 per chunk. */
	uint32_t *perm = malloc(nb * sizeof(*perm));
	uint64_t x = 0x9e3779b97f4a7c15ull;

	if (!perm) {
		fprintf(stderr, "out of memory\n");
		exit(1);
	}
	for (uint32_t i = 0; i < nb; i++)
		perm[i] = i;
	for (uint32_t i = nb - 1; i > 0; i--) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		uint32_t k = (uint32_t)(x % (i + 1)), tmp = perm[i];

		perm[i] = perm[k];
		perm[k] = tmp;
	}
	for (uint32_t j = 0; j < chunks; j++)
		for (uint32_t t = 0; t < CHUNK_TOKENS; t++)
			b->slots[(size_t)j * CHUNK_TOKENS + t] =
				(int64_t)perm[j * BLOCKS_PER_CHUNK + t / BLOCK_SIZE] * BLOCK_SIZE +
				t % BLOCK_SIZE;
	free(perm);
}

/* Make sure we time a working copy: gather chunk 0 and spot-check rows. */
static int self_check(struct bench *b)
{
	const size_t row = b->l.row_bytes;

	for (size_t i = 0; i < b->paged_bytes; i += 4093)
		b->paged[i] = (unsigned char)(i * 31 + 7);
	xfer_host_gather(&b->l, b->layers, b->slots, CHUNK_TOKENS, b->objs[0]);
	for (uint32_t k = 0; k < 2; k++)
		for (uint32_t i = 0; i < NUM_LAYERS; i += 7)
			for (uint32_t t = 0; t < CHUNK_TOKENS; t += 5) {
				int64_t s = b->slots[t];
				const unsigned char *p =
					(const unsigned char *)b->layers[i] +
					(size_t)(k * b->l.plane_stride + (s / BLOCK_SIZE) * b->l.block_stride +
						 (s % BLOCK_SIZE) * b->l.token_stride) * 2;
				const unsigned char *o = b->objs[0] +
							 (((size_t)k * NUM_LAYERS + i) * CHUNK_TOKENS + t) * row;

				if (memcmp(p, o, row)) {
					fprintf(stderr, "self-check failed: k %u layer %u token %u\n", k, i, t);
					return -1;
				}
			}
	return 0;
}

static void usage(const char *argv0)
{
	fprintf(stderr, "usage: %s [--threads N] [--chunks N] [--seconds S]\n", argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	uint32_t max_threads = 2, chunks = 64;
	double seconds = 1.5;
	struct bench b = { 0 };

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage(argv[0]);
		if (!strcmp(argv[i], "--threads"))
			max_threads = (uint32_t)strtoul(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--chunks"))
			chunks = (uint32_t)strtoul(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--seconds"))
			seconds = strtod(argv[++i], NULL);
		else
			usage(argv[0]);
	}
	if (max_threads < 1 || max_threads > MAX_THREADS || seconds <= 0 || chunks < 1)
		usage(argv[0]);
	chunks = KS_MAX(chunks, 2 * max_threads);

	setup(&b, chunks);
	if (self_check(&b))
		return 1;

	printf("host_bench: flash_attn [2, %u, %u, %u, %u] bf16 x %u layers = %.2f GiB paged\n",
	       b.l.num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE, NUM_LAYERS,
	       (double)b.paged_bytes / (1u << 30));
	printf("            %u chunks of %u tokens, 16 random blocks each -> %.1f MiB objects "
	       "(%.2f GiB)\n", chunks, CHUNK_TOKENS, (double)b.obj_bytes / (1u << 20),
	       (double)b.obj_bytes * chunks / (1u << 30));
	printf("            %.1f s per op and thread count in %d interleaved rounds; "
	       "GB/s = object bytes / s (1e9)\n\n", seconds, ROUNDS);
	printf("%-8s %-8s %12s %12s %8s\n", "threads", "op", "xfer GB/s", "memcpy GB/s", "ratio");
	printf("%-8s %-8s %12s %12s %8s\n", "-------", "-------", "---------", "-----------",
	       "-----");

	uint32_t counts[2] = { 1, max_threads };

	for (int c = 0; c < (max_threads > 1 ? 2 : 1); c++) {
		uint32_t nt = counts[c];
		uint64_t bytes[OP_COUNT] = { 0 }, ns[OP_COUNT] = { 0 };
		double gbs[OP_COUNT];

		for (int r = 0; r < ROUNDS; r++)
			for (int op = 0; op < OP_COUNT; op++)
				bytes[op] += run_op(&b, (enum op)op, nt, seconds / ROUNDS, &ns[op]);
		for (int op = 0; op < OP_COUNT; op++)
			gbs[op] = (double)bytes[op] / (double)ns[op];
		printf("%-8u %-8s %12.2f %12.2f %8.2f\n", nt, op_names[OP_GATHER], gbs[OP_GATHER],
		       gbs[OP_MEMCPY_G], gbs[OP_GATHER] / gbs[OP_MEMCPY_G]);
		printf("%-8u %-8s %12.2f %12.2f %8.2f\n", nt, op_names[OP_SCATTER], gbs[OP_SCATTER],
		       gbs[OP_MEMCPY_S], gbs[OP_SCATTER] / gbs[OP_MEMCPY_S]);
		fflush(stdout);
	}
	for (uint32_t j = 0; j < chunks; j++)
		munmap(b.objs[j], b.obj_bytes);
	munmap(b.paged, b.paged_bytes);
	free(b.objs);
	free(b.slots);
	return 0;
}
