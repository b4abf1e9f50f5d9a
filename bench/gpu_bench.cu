/*
 * gpu_bench.cu - the CUDA transfer engine against the limits of the machine.
 *
 * For each model layout and request size, in one run on one GPU:
 *   memcpy      one contiguous pinned cudaMemcpyAsync of the request's bytes,
 *               each direction, and both directions at once (two streams):
 *               the PCIe ceiling;
 *   per-block   one cudaMemcpyAsync per (plane, layer, block): the naive way
 *               (vLLM swap_blocks);
 *   kvstash     xfer_cuda_store / xfer_cuda_retrieve end to end (validation,
 *               table upload, launch, completion poll), ZEROCOPY and STAGED,
 *               and a STORE and a RETRIEVE at once from two workers (two
 *               contexts, two threads, both PCIe directions).
 * Every number is bytes moved over the median wall time of a synchronous
 * call (GB = 1e9 bytes). Usage: gpu_bench [--quick] [--reps N]
 */
#include <cuda_runtime.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <vector>

extern "C" {
#include "layout.h"
}
#include "transfer_cuda.h"

#define CK(call)                                                                          \
	do {                                                                              \
		cudaError_t _e = (call);                                                  \
		if (_e != cudaSuccess) {                                                  \
			fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,      \
				cudaGetErrorString(_e));                                  \
			exit(1);                                                          \
		}                                                                         \
	} while (0)
#define RC(call)                                                                          \
	do {                                                                              \
		int _r = (call);                                                          \
		if (_r) {                                                                 \
			fprintf(stderr, "%s:%d: %s: %d (%s)\n", __FILE__, __LINE__, #call, _r, \
				strerror(-_r));                                           \
			exit(1);                                                          \
		}                                                                         \
	} while (0)

static double now_s()
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double median(std::vector<double> v)
{
	std::sort(v.begin(), v.end());
	return v[v.size() / 2];
}

/* Pseudo-random device fill (never time on zeros). */
__global__ void fill_kernel(uint64_t *p, size_t n, uint64_t seed)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
	     i += (size_t)gridDim.x * blockDim.x) {
		uint64_t x = (i + seed) * 0x9e3779b97f4a7c15ull;
		x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
		x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
		p[i] = x ^ (x >> 31);
	}
}

struct model {
	const char *name;
	enum kv_layout_kind kind;
	enum kv_dtype dtype;
	uint32_t NL, NH, HS, BS;
};

static const struct model models[] = {
	{ "llama3-8b bf16", KV_LAYOUT_FLASH_ATTN, KV_DTYPE_BFLOAT16, 32, 8, 128, 16 },
	{ "dsv3-mla fp8", KV_LAYOUT_MLA, KV_DTYPE_FLOAT8_E4M3FN, 61, 1, 576, 64 },
	{ "dsv3-mla bf16", KV_LAYOUT_MLA, KV_DTYPE_BFLOAT16, 61, 1, 576, 64 },
};
static const uint32_t sizes[] = { 256, 4096, 16384 };
#define CHUNK 256u

/* Everything one configuration needs, carved from the big buffers. */
struct setup {
	struct kv_layout l;
	uint32_t ntokens, nchunks;
	size_t layer_bytes, obj_bytes, total;	/* total = request bytes */
	std::vector<int64_t> slots;
	std::vector<uint32_t> bids;
	std::vector<void *> layers_a, layers_b;	/* store source, retrieve target */
	std::vector<void *> objs_a, objs_b;	/* store target, retrieve source */
};

static uint8_t *g_dev_a, *g_dev_b, *g_host;
static size_t g_dev_bytes, g_host_bytes;

static void make_setup(const struct model &m, uint32_t ntokens, struct setup &s)
{
	char err[128];
	const uint32_t nblk = (ntokens + m.BS - 1) / m.BS;
	const uint32_t NB = nblk + nblk / 4 + 1;	/* 25% more blocks than used */
	const int64_t hid = (int64_t)m.NH * m.HS;
	struct kv_layout &l = s.l;

	memset(&l, 0, sizeof(l));
	l.kind = m.kind;
	l.dtype = m.dtype;
	l.num_layers = m.NL;
	if (m.kind == KV_LAYOUT_MLA) {
		l.ndim = 3;
		l.shape[0] = NB, l.shape[1] = m.BS, l.shape[2] = m.HS;
		l.stride[0] = m.BS * hid, l.stride[1] = hid, l.stride[2] = 1;
	} else {
		l.ndim = 5;
		l.shape[0] = 2, l.shape[1] = NB, l.shape[2] = m.BS, l.shape[3] = m.NH, l.shape[4] = m.HS;
		l.stride[4] = 1, l.stride[3] = m.HS, l.stride[2] = hid, l.stride[1] = m.BS * hid;
		l.stride[0] = (int64_t)NB * m.BS * hid;
	}
	if (kv_layout_init(&l, err, sizeof(err))) {
		fprintf(stderr, "layout: %s\n", err);
		exit(1);
	}
	s.ntokens = ntokens;
	s.nchunks = (ntokens + CHUNK - 1) / CHUNK;
	s.layer_bytes = (l.extent_bytes + 4095) / 4096 * 4096;
	s.obj_bytes = kv_object_bytes(&l, CHUNK);
	s.total = (size_t)l.kv_planes * m.NL * ntokens * l.row_bytes;
	if (s.layer_bytes * m.NL > g_dev_bytes || 2 * s.obj_bytes * s.nchunks > g_host_bytes) {
		fprintf(stderr, "buffers too small\n");
		exit(1);
	}
	/* Random distinct blocks: a real, fragmented block table. */
	s.bids.resize(NB);
	for (uint32_t i = 0; i < NB; i++)
		s.bids[i] = i;
	uint64_t r = 12345;
	for (uint32_t i = NB - 1; i > 0; i--) {
		r = r * 6364136223846793005ull + 1442695040888963407ull;
		std::swap(s.bids[i], s.bids[(r >> 33) % (i + 1)]);
	}
	s.bids.resize(nblk);
	s.slots.resize(ntokens);
	for (uint32_t t = 0; t < ntokens; t++)
		s.slots[t] = (int64_t)s.bids[t / m.BS] * m.BS + t % m.BS;
	s.layers_a.resize(m.NL), s.layers_b.resize(m.NL);
	for (uint32_t i = 0; i < m.NL; i++) {
		s.layers_a[i] = g_dev_a + i * s.layer_bytes;
		s.layers_b[i] = g_dev_b + i * s.layer_bytes;
	}
	s.objs_a.resize(s.nchunks), s.objs_b.resize(s.nchunks);
	for (uint32_t c = 0; c < s.nchunks; c++) {
		s.objs_a[c] = g_host + c * s.obj_bytes;
		s.objs_b[c] = g_host + g_host_bytes / 2 + c * s.obj_bytes;
	}
}

static struct xfer_cuda_job make_job(struct setup &s, bool store, enum xfer_cuda_path p)
{
	struct xfer_cuda_job j = {};

	j.layout = &s.l;
	j.layers = store ? s.layers_a.data() : s.layers_b.data();
	j.slots = s.slots.data();
	j.ntokens = s.ntokens;
	j.chunk_tokens = CHUNK;
	j.objs = store ? s.objs_a.data() : s.objs_b.data();
	j.timeout_ms = 60000;
	j.path = p;
	return j;
}

/* One cudaMemcpyAsync per (plane, layer, block): what vLLM's swap_blocks does. */
static void per_block(struct setup &s, bool d2h, cudaStream_t st)
{
	const struct kv_layout &l = s.l;
	const uint32_t K = l.kv_planes, NL = l.num_layers, BS = l.block_size;
	const size_t eb = l.elem_bytes;

	for (uint32_t k = 0; k < K; k++)
		for (uint32_t ly = 0; ly < NL; ly++)
			for (uint32_t t = 0; t < s.ntokens; t += BS) {
				uint32_t c = t / CHUNK, n_c = std::min(CHUNK, s.ntokens - c * CHUNK);
				uint32_t n = std::min(BS, s.ntokens - t);
				char *obj = (char *)(d2h ? s.objs_a[c] : s.objs_b[c]) +
					    (((size_t)k * NL + ly) * n_c + t % CHUNK) * l.row_bytes;
				char *pg = (char *)(d2h ? s.layers_a[ly] : s.layers_b[ly]) +
					   (k * l.plane_stride + (int64_t)s.bids[t / BS] * l.block_stride) * eb;
				if (d2h)
					CK(cudaMemcpyAsync(obj, pg, n * l.row_bytes, cudaMemcpyDeviceToHost, st));
				else
					CK(cudaMemcpyAsync(pg, obj, n * l.row_bytes, cudaMemcpyHostToDevice, st));
			}
}

struct sim_arg {
	struct xfer_cuda_ctx *ctx;
	struct xfer_cuda_job job;
	bool store;
	int reps;
	pthread_barrier_t *bar;
	int rc;
};

static void *sim_main(void *p)
{
	struct sim_arg *a = (struct sim_arg *)p;

	pthread_barrier_wait(a->bar);
	for (int i = 0; i < a->reps && !a->rc; i++)
		a->rc = a->store ? xfer_cuda_store(a->ctx, &a->job) : xfer_cuda_retrieve(a->ctx, &a->job);
	return NULL;
}

/* STORE on @cs and RETRIEVE on @cr at once, @reps each: total GB/s. */
static double simultaneous(struct xfer_cuda_ctx *cs, struct xfer_cuda_ctx *cr, struct setup &s,
			   enum xfer_cuda_path p, int reps)
{
	pthread_barrier_t bar;
	pthread_t th[2];
	struct sim_arg a[2] = {};

	pthread_barrier_init(&bar, NULL, 3);
	a[0].ctx = cs, a[0].job = make_job(s, true, p), a[0].store = true;
	a[1].ctx = cr, a[1].job = make_job(s, false, p), a[1].store = false;
	for (int i = 0; i < 2; i++) {
		a[i].reps = reps, a[i].bar = &bar;
		pthread_create(&th[i], NULL, sim_main, &a[i]);
	}
	pthread_barrier_wait(&bar);
	double t0 = now_s();
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	double t = now_s() - t0;
	pthread_barrier_destroy(&bar);
	RC(a[0].rc);
	RC(a[1].rc);
	return 2.0 * reps * s.total / t / 1e9;
}

struct row {
	char name[40];
	uint32_t tokens;
	double mib;
	double mc_d2h, mc_h2d, mc_both, pb_d2h, pb_h2d;
	double st_zc, st_sg, rt_zc, rt_sg, both_zc, both_sg, both_def;
};

int main(int argc, char **argv)
{
	int reps_arg = 0;
	bool quick = false;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--quick"))
			quick = true;
		else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
			reps_arg = atoi(argv[++i]);
	}
	int ndev = 0;
	if (xfer_cuda_device_count(&ndev)) {
		fprintf(stderr, "gpu_bench: no CUDA device\n");
		return 77;
	}
	cudaDeviceProp prop;
	int drv = 0, rt = 0;
	CK(cudaGetDeviceProperties(&prop, 0));
	CK(cudaDriverGetVersion(&drv));
	CK(cudaRuntimeGetVersion(&rt));
	CK(cudaSetDevice(0));

	/* Size the buffers for the largest configuration. */
	for (const struct model &m : models) {
		size_t nblk = (sizes[2] + m.BS - 1) / m.BS;
		size_t NB = nblk + nblk / 4 + 1;
		size_t row = (size_t)m.NH * m.HS * kv_dtype_bytes(m.dtype);
		size_t K = m.kind == KV_LAYOUT_MLA ? 1 : 2;
		g_dev_bytes = std::max(g_dev_bytes, (K * NB * m.BS * row + 4095) / 4096 * 4096 * m.NL);
		g_host_bytes = std::max(g_host_bytes, 2 * K * m.NL * row * sizes[2]);
	}
	double t0 = now_s();
	CK(cudaMalloc((void **)&g_dev_a, g_dev_bytes));
	CK(cudaMalloc((void **)&g_dev_b, g_dev_bytes));
	if (posix_memalign((void **)&g_host, 4096, g_host_bytes))
		return 1;
	memset(g_host, 0x3c, g_host_bytes);
	RC(xfer_cuda_host_register(g_host, g_host_bytes));
	fill_kernel<<<1024, 256>>>((uint64_t *)g_dev_a, g_dev_bytes / 8, 1);
	fill_kernel<<<1024, 256>>>((uint64_t *)g_dev_b, g_dev_bytes / 8, 2);
	CK(cudaGetLastError());
	CK(cudaMemcpy(g_host + g_host_bytes / 2, g_dev_b, g_host_bytes / 2, cudaMemcpyDeviceToHost));
	CK(cudaDeviceSynchronize());
	printf("gpu_bench: %s, %d SMs, cc %d.%d, PCI %04x:%02x:%02x, driver %d, runtime %d\n",
	       prop.name, prop.multiProcessorCount, prop.major, prop.minor, prop.pciDomainID,
	       prop.pciBusID, prop.pciDeviceID, drv, rt);
	printf("gpu_bench: device buffers 2 x %.2f GiB, pinned host %.2f GiB (setup %.1f s)\n",
	       g_dev_bytes / 1073741824.0, g_host_bytes / 1073741824.0, now_s() - t0);

	struct xfer_cuda_opts o = {};
	o.host_base = g_host, o.host_bytes = g_host_bytes;
	struct xfer_cuda_ctx *ca, *cb;
	RC(xfer_cuda_ctx_create(0, &o, &ca));
	RC(xfer_cuda_ctx_create(0, &o, &cb));
	const enum xfer_cuda_path def_st = xfer_cuda_ctx_path(ca, 0), def_rt = xfer_cuda_ctx_path(ca, 1);
	cudaStream_t s1, s2;
	CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
	CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));

	std::vector<struct row> rows;
	for (const struct model &m : models)
		for (uint32_t ntok : sizes) {
			if (quick && ntok == 16384)
				continue;
			struct setup s;
			make_setup(m, ntok, s);
			struct row r = {};
			snprintf(r.name, sizeof(r.name), "%s", m.name);
			r.tokens = ntok;
			r.mib = s.total / 1048576.0;
			const int reps = reps_arg ? reps_arg : ntok <= 4096 ? 15 : 7;
			std::vector<double> t;

			auto timeit = [&](auto fn) {
				fn();	/* warm-up */
				t.clear();
				for (int i = 0; i < reps; i++) {
					double a = now_s();
					fn();
					t.push_back(now_s() - a);
				}
				return s.total / median(t) / 1e9;
			};
			r.mc_d2h = timeit([&] {
				CK(cudaMemcpyAsync(g_host, g_dev_a, s.total, cudaMemcpyDeviceToHost, s1));
				CK(cudaStreamSynchronize(s1));
			});
			r.mc_h2d = timeit([&] {
				CK(cudaMemcpyAsync(g_dev_b, g_host + g_host_bytes / 2, s.total,
						   cudaMemcpyHostToDevice, s1));
				CK(cudaStreamSynchronize(s1));
			});
			r.mc_both = 2 * timeit([&] {
				CK(cudaMemcpyAsync(g_host, g_dev_a, s.total, cudaMemcpyDeviceToHost, s1));
				CK(cudaMemcpyAsync(g_dev_b, g_host + g_host_bytes / 2, s.total,
						   cudaMemcpyHostToDevice, s2));
				CK(cudaStreamSynchronize(s1));
				CK(cudaStreamSynchronize(s2));
			});
			r.pb_d2h = timeit([&] {
				per_block(s, true, s1);
				CK(cudaStreamSynchronize(s1));
			});
			/* per_block D2H wrote the objects exactly: the reference for the
			 * kvstash STOREs below ("fast because wrong" guard). */
			std::vector<uint8_t> ref0((uint8_t *)s.objs_a[0], (uint8_t *)s.objs_a[0] + s.obj_bytes);
			const size_t last_bytes = (size_t)s.l.kv_planes * m.NL *
						  (ntok - (s.nchunks - 1) * CHUNK) * s.l.row_bytes;
			std::vector<uint8_t> refl((uint8_t *)s.objs_a[s.nchunks - 1],
						  (uint8_t *)s.objs_a[s.nchunks - 1] + last_bytes);
			r.pb_h2d = timeit([&] {
				per_block(s, false, s1);
				CK(cudaStreamSynchronize(s1));
			});
			for (int p = 0; p < 2; p++) {
				enum xfer_cuda_path path = p ? XFER_CUDA_PATH_STAGED : XFER_CUDA_PATH_ZEROCOPY;
				struct xfer_cuda_job js = make_job(s, true, path);
				struct xfer_cuda_job jr = make_job(s, false, path);

				memset(s.objs_a[0], 0, s.obj_bytes);
				memset(s.objs_a[s.nchunks - 1], 0, last_bytes);
				double st = timeit([&] { RC(xfer_cuda_store(ca, &js)); });
				if (memcmp(s.objs_a[0], ref0.data(), s.obj_bytes) ||
				    memcmp(s.objs_a[s.nchunks - 1], refl.data(), last_bytes)) {
					fprintf(stderr, "gpu_bench: %s %u %s store MISMATCH vs per-block copy\n",
						m.name, ntok, xfer_cuda_path_name(path));
					return 1;
				}
				double rt2 = timeit([&] { RC(xfer_cuda_retrieve(ca, &jr)); });
				double both = simultaneous(ca, cb, s, path, reps);
				if (p) {
					r.st_sg = st, r.rt_sg = rt2, r.both_sg = both;
				} else {
					r.st_zc = st, r.rt_zc = rt2, r.both_zc = both;
				}
			}
			r.both_def = def_st == XFER_CUDA_PATH_STAGED ? r.both_sg : r.both_zc;
			rows.push_back(r);
			fprintf(stderr, "  done %s %u\n", m.name, ntok);
		}

	printf("\nGPU: %s (%d SMs), CUDA driver %d, runtime %d. GB/s = 1e9 B/s, median of "
	       "synchronous calls.\n",
	       prop.name, prop.multiProcessorCount, drv, rt);
	printf("default paths: store %s, retrieve %s\n\n", xfer_cuda_path_name(def_st),
	       xfer_cuda_path_name(def_rt));
	printf("%-15s %6s %7s | %-21s | %-13s | %-13s | %-13s | %-19s\n", "", "", "",
	       "contiguous memcpy", "per-block", "kvs store", "kvs retrieve", "kvs store+retr");
	printf("%-15s %6s %7s | %6s %6s %7s | %6s %6s | %6s %6s | %6s %6s | %6s %6s\n", "config",
	       "tokens", "MiB", "D2H", "H2D", "both", "D2H", "H2D", "zcopy", "staged", "zcopy",
	       "staged", "zcopy", "staged");
	for (const struct row &r : rows)
		printf("%-15s %6u %7.0f | %6.1f %6.1f %7.1f | %6.1f %6.1f | %6.1f %6.1f | %6.1f %6.1f | "
		       "%6.1f %6.1f\n",
		       r.name, r.tokens, r.mib, r.mc_d2h, r.mc_h2d, r.mc_both, r.pb_d2h, r.pb_h2d,
		       r.st_zc, r.st_sg, r.rt_zc, r.rt_sg, r.both_zc, r.both_sg);

	printf("\nratios (default paths; targets: >= 0.95x memcpy, >= 4x per-block, both >= 75 GB/s)\n");
	printf("%-15s %6s | %8s %8s | %8s %8s | %9s | %s\n", "config", "tokens", "st/mcpy",
	       "rt/mcpy", "st/pblk", "rt/pblk", "both GB/s", "ceiling mcpy/pblk D2H H2D");
	for (const struct row &r : rows) {
		double st = def_st == XFER_CUDA_PATH_STAGED ? r.st_sg : r.st_zc;
		double rt2 = def_rt == XFER_CUDA_PATH_STAGED ? r.rt_sg : r.rt_zc;
		printf("%-15s %6u | %8.3f %8.3f | %8.2f %8.2f | %9.1f | %12.2f %5.2f\n", r.name,
		       r.tokens, st / r.mc_d2h, rt2 / r.mc_h2d, st / r.pb_d2h, rt2 / r.pb_h2d,
		       r.both_def, r.mc_d2h / r.pb_d2h, r.mc_h2d / r.pb_h2d);
	}
	printf("\nzero-copy vs staged (ratio zcopy/staged; > 1: zero-copy faster)\n");
	printf("%-15s %6s | %8s %8s %8s\n", "config", "tokens", "store", "retrieve", "both");
	for (const struct row &r : rows)
		printf("%-15s %6u | %8.3f %8.3f %8.3f\n", r.name, r.tokens, r.st_zc / r.st_sg,
		       r.rt_zc / r.rt_sg, r.both_zc / r.both_sg);

	/* Fixed cost per job: an empty job (table upload, events, completion
	 * poll) and a one-block request, against a memcpy of the same bytes. */
	{
		struct setup s;
		make_setup(models[0], 16, s);
		const int reps = 200;
		std::vector<double> t;
		auto lat = [&](auto fn) {
			for (int i = 0; i < 10; i++)
				fn();
			t.clear();
			for (int i = 0; i < reps; i++) {
				double a = now_s();
				fn();
				t.push_back(now_s() - a);
			}
			return median(t) * 1e6;
		};
		double mc = lat([&] {
			CK(cudaMemcpyAsync(g_host, g_dev_a, s.total, cudaMemcpyDeviceToHost, s1));
			CK(cudaStreamSynchronize(s1));
		});
		printf("\nfixed cost per job (median us, %s, 16 tokens = %.0f KiB)\n", models[0].name,
		       s.total / 1024.0);
		printf("  memcpy D2H of the same bytes      %7.1f\n", mc);
		for (int p = 0; p < 2; p++) {
			enum xfer_cuda_path path = p ? XFER_CUDA_PATH_STAGED : XFER_CUDA_PATH_ZEROCOPY;
			struct xfer_cuda_job js = make_job(s, true, path), jr = make_job(s, false, path);
			struct xfer_cuda_job je = js;
			je.ntokens = 0;
			double e = lat([&] { RC(xfer_cuda_store(ca, &je)); });
			double st = lat([&] { RC(xfer_cuda_store(ca, &js)); });
			double rt2 = lat([&] { RC(xfer_cuda_retrieve(ca, &jr)); });
			printf("  %-8s empty job %7.1f   store %7.1f   retrieve %7.1f\n",
			       xfer_cuda_path_name(path), e, st, rt2);
		}
	}

	/* Staging ring size: STAGED store/retrieve per ring size (4 segments each). */
	static const size_t ring_mib[] = { 16, 32, 64, 128 };
	printf("\nstaging ring (STAGED path, GB/s; ring = 4 segments; default %s)\n",
	       "64 MiB");
	printf("%-15s %6s | %-31s | %-31s\n", "", "", "store, ring MiB", "retrieve, ring MiB");
	printf("%-15s %6s |", "config", "tokens");
	for (int d = 0; d < 2; d++) {
		for (size_t mib : ring_mib)
			printf(" %7zu", mib);
		printf(" |");
	}
	printf("\n");
	for (const struct model &m : models)
		for (uint32_t ntok : sizes) {
			if (quick && ntok == 16384)
				continue;
			struct setup s;
			make_setup(m, ntok, s);
			const int reps = reps_arg ? reps_arg : ntok <= 4096 ? 15 : 5;
			double res[2][4];
			for (int ri = 0; ri < 4; ri++) {
				struct xfer_cuda_opts ro = o;
				struct xfer_cuda_ctx *cr;
				ro.staging_bytes = ring_mib[ri] << 20;
				RC(xfer_cuda_ctx_create(0, &ro, &cr));
				for (int d = 0; d < 2; d++) {
					struct xfer_cuda_job j = make_job(s, d == 0, XFER_CUDA_PATH_STAGED);
					std::vector<double> t;
					RC(d ? xfer_cuda_retrieve(cr, &j) : xfer_cuda_store(cr, &j));
					for (int i = 0; i < reps; i++) {
						double a = now_s();
						RC(d ? xfer_cuda_retrieve(cr, &j) : xfer_cuda_store(cr, &j));
						t.push_back(now_s() - a);
					}
					res[d][ri] = s.total / median(t) / 1e9;
				}
				xfer_cuda_ctx_destroy(cr);
			}
			printf("%-15s %6u |", m.name, ntok);
			for (int d = 0; d < 2; d++) {
				for (int ri = 0; ri < 4; ri++)
					printf(" %7.1f", res[d][ri]);
				printf(" |");
			}
			printf("\n");
		}

	xfer_cuda_ctx_destroy(ca);
	xfer_cuda_ctx_destroy(cb);
	RC(xfer_cuda_host_unregister(g_host));
	free(g_host);
	return 0;
}
