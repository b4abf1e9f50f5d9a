/*
 * cli_bench.c - kvstash bench: how fast kvstashd moves KV chunks on this
 * machine, next to memcpy measured in the same run.
 *
 * It runs the host sweep below, or (--gpu, --tiers) the benchmark programs
 * of bench/ next to this binary, as they are.
 *
 * Host sweep: a Llama-3-8B-like paged KV buffer (32 layers of flash_attn
 * [2, NB, 16, 8, 128] bf16 in one memfd) is registered with a kvstashd (one
 * started for the run on a private ipc:// endpoint, unless --endpoint). One
 * untimed warm-up of STOREs first cycles the pool, so the timed ones do not
 * pay its first-touch page faults. Then, for each request size, for
 * --seconds each: memcpy of the request's bytes on one thread (same buffers
 * size, same run), STORE of fresh prompts (new token lists: no object is
 * ever skipped as present), RETRIEVE of the last prompt stored; then one
 * more RETRIEVE into zeroed blocks is checked byte for byte against the
 * blocks it was stored from. GB/s = request bytes x completed requests /
 * wall time of the phase (1 GB = 1e9 B). One thread, one request at a time:
 * the latency-bound figure an engine sees per request.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "compiler.h"
#include "kvstash.h"

#define BENCH_LAYERS 32
#define BENCH_BLOCK_TOKENS 16
#define BENCH_HEADS 8
#define BENCH_HEAD_SIZE 128
#define BENCH_ROW_BYTES ((size_t)BENCH_HEADS * BENCH_HEAD_SIZE * 2)	/* bf16 */
/* A 16-chunk request moves 512 MiB: leave room for sanitizer builds. */
#define BENCH_TIMEOUT_MS 60000
#define BENCH_START_TIMEOUT_S 20.0	/* kvstashd answering PING after exec */
#define BENCH_STOP_TIMEOUT_S 10.0	/* kvstashd gone after SIGTERM, else SIGKILL */
/* Pool of the started kvstashd: room for the warm-up's prompts and more. */
#define BENCH_POOL_REQUESTS 3
#define BENCH_MIN_POOL_MIB 256
#define BENCH_WARMUP_REQUESTS 4	/* largest requests stored untimed into a running server */
#define BENCH_BAR_WIDTH 30
#define BENCH_MODEL "kvstash-bench"

static const int bench_default_sizes[] = { 1, 2, 4, 8, 16 };

struct bench_row {
	int chunks;
	double mib;
	double store_gbps, retrieve_gbps, memcpy_gbps;
};

/* Progress on stderr: a redrawn bar on a terminal, else one line per step. */
struct bench_progress {
	bool tty;
	bool drawn;		/* a bar is on the line now */
	int step, nsteps;
	double last_draw;
};

/* A kvstashd started for the run. */
struct bench_daemon {
	pid_t pid;		/* 0: none */
	char dir[96];		/* mkdtemp; holds the socket and the log */
	char endpoint[128];	/* ipc://<dir>/sock */
	char log[128];		/* <dir>/kvstashd.log: its stdout and stderr */
};

struct bench_ctx {
	const struct cli_opts *o;
	kvstash_client *c;	/* owns */
	struct kvstash_host_buffer buf;	/* the paged KV buffer, all layers */
	int64_t instance;
	bool registered;
	uint32_t chunk_tokens;
	size_t nb;		/* blocks per plane per layer */
	size_t block_bytes;	/* one block of one plane of one layer */
	size_t layer_bytes;
	size_t object_bytes;	/* one chunk, all layers, K and V */
	int64_t *src, *dst;	/* owns; nb / 2 block ids each, disjoint, shuffled */
	uint32_t *tokens;	/* owns; the last prompt stored */
	uint64_t seed, prompts;	/* prompts stored so far: each gets new tokens */
	uint8_t *mc_src, *mc_dst;	/* owns; memcpy baseline buffers of one request */
	struct bench_progress pg;
};

/* The directory holding this program (for kvstashd and bench/). */
static int bench_self_dir(const char *argv0, char *out, size_t len)
{
	char path[4096];
	ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
	char *slash;

	if (n > 0) {
		path[n] = '\0';
	} else if (argv0 && strchr(argv0, '/')) {
		snprintf(path, sizeof(path), "%s", argv0);
	} else {
		fprintf(stderr, "kvstash bench: cannot tell where this program is\n");
		return -1;
	}
	slash = strrchr(path, '/');
	if (slash == path)
		slash++;
	*slash = '\0';
	if ((size_t)snprintf(out, len, "%s", path) >= len) {
		fprintf(stderr, "kvstash bench: path too long: %s\n", path);
		return -1;
	}
	return 0;
}

/* An executable @name on $PATH into @out; false if there is none. */
static bool bench_find_in_path(const char *name, char *out, size_t len)
{
	const char *p = getenv("PATH");

	while (p && *p) {
		const char *end = strchr(p, ':');
		size_t n = end ? (size_t)(end - p) : strlen(p);

		if (n && (size_t)snprintf(out, len, "%.*s/%s", (int)n, p, name) < len &&
		    access(out, X_OK) == 0)
			return true;
		p = end ? end + 1 : NULL;
	}
	return false;
}

static void bench_draw(struct bench_progress *pg, double step_frac, const char *label,
		       double gbps)
{
	char bar[BENCH_BAR_WIDTH + 1];
	double t = cli_now_s(), f;
	int fill;

	if (!pg->tty || (t - pg->last_draw < 0.1 && step_frac > 0))
		return;
	pg->last_draw = t;
	f = ((double)pg->step + fmin(fmax(step_frac, 0), 1)) / pg->nsteps;
	fill = (int)(f * BENCH_BAR_WIDTH + 0.5);
	for (int i = 0; i < BENCH_BAR_WIDTH; i++)
		bar[i] = i < fill ? '#' : '.';
	bar[BENCH_BAR_WIDTH] = '\0';
	fprintf(stderr, "\r\033[K[%s] %3.0f%%  %s", bar, 100 * f, label);
	pg->drawn = true;
	if (gbps > 0)
		fprintf(stderr, "  %.2f GB/s", gbps);
	fflush(stderr);
}

static void bench_step_done(struct bench_progress *pg, const char *label, double gbps)
{
	pg->step++;
	if (pg->tty) {
		pg->last_draw = 0;
		bench_draw(pg, 0, label, gbps);
	} else {
		fprintf(stderr, "kvstash bench: [%2d/%d] %-40s %8.2f GB/s\n", pg->step, pg->nsteps,
			label, gbps);
	}
}

static void bench_progress_end(struct bench_progress *pg)
{
	if (pg->drawn)
		fprintf(stderr, "\r\033[K");
	pg->drawn = false;
}

/* Remove what bench_daemon_start() made in its directory, then the directory. */
static void bench_daemon_rmdir(struct bench_daemon *d)
{
	char sock[160];

	snprintf(sock, sizeof(sock), "%s/sock", d->dir);
	unlink(sock);
	unlink(d->log);
	rmdir(d->dir);
}

static void bench_daemon_print_log(const struct bench_daemon *d)
{
	char line[512];
	FILE *f = fopen(d->log, "r");

	if (!f)
		return;
	fprintf(stderr, "kvstash bench: kvstashd's output:\n");
	while (fgets(line, sizeof(line), f))
		fprintf(stderr, "  %s", line);
	fclose(f);
}

/*
 * Start <bindir>/kvstashd on ipc://<mkdtemp dir>/sock with a pool of
 * @pool_mib and no HTTP endpoint, and wait (at most BENCH_START_TIMEOUT_S)
 * until it answers PING. 0, or -1 with the reason printed.
 */
static int bench_daemon_start(struct bench_daemon *d, const char *bindir, size_t pool_mib)
{
	const char *tmp = getenv("TMPDIR");
	char exe[4200], listen[160], pool[48];
	kvstash_client *probe = NULL;
	double deadline;
	int fd, status;

	/* ipc:// paths must fit sockaddr_un (108 bytes): fall back to /tmp. */
	if (!tmp || !*tmp || strlen(tmp) > 60)
		tmp = "/tmp";
	snprintf(exe, sizeof(exe), "%s/kvstashd", bindir);
	if (access(exe, X_OK)) {
		fprintf(stderr, "kvstash bench: no kvstashd next to this program (%s): %s\n", exe,
			strerror(errno));
		return -1;
	}
	snprintf(d->dir, sizeof(d->dir), "%s/kvstash-cli-bench-XXXXXX", tmp);
	if (!mkdtemp(d->dir)) {
		fprintf(stderr, "kvstash bench: mkdtemp %s: %s\n", d->dir, strerror(errno));
		return -1;
	}
	snprintf(d->endpoint, sizeof(d->endpoint), "ipc://%s/sock", d->dir);
	snprintf(d->log, sizeof(d->log), "%s/kvstashd.log", d->dir);
	snprintf(listen, sizeof(listen), "--listen=%s", d->endpoint);
	snprintf(pool, sizeof(pool), "--pool-size=%zuM", pool_mib);
	fd = open(d->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(stderr, "kvstash bench: %s: %s\n", d->log, strerror(errno));
		rmdir(d->dir);
		return -1;
	}
	fflush(stdout);
	fflush(stderr);
	d->pid = fork();
	if (d->pid == 0) {
		dup2(fd, STDOUT_FILENO);
		dup2(fd, STDERR_FILENO);
		execl(exe, exe, listen, pool, "--http-port=0", "--cuda=off", "--log-level=warn",
		      (char *)NULL);
		dprintf(STDERR_FILENO, "cannot run %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	close(fd);
	if (d->pid < 0) {
		fprintf(stderr, "kvstash bench: fork: %s\n", strerror(errno));
		d->pid = 0;
		bench_daemon_rmdir(d);
		return -1;
	}
	/* Short per-PING timeout: ZMQ connects lazily, so early PINGs just time out. */
	if (kvstash_connect(d->endpoint, 200, &probe)) {
		fprintf(stderr, "kvstash bench: %s\n", kvstash_last_error());
		return -1;
	}
	deadline = cli_now_s() + BENCH_START_TIMEOUT_S;
	while (kvstash_ping(probe, NULL)) {
		if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
			d->pid = 0;
			fprintf(stderr, "kvstash bench: kvstashd exited at start (status %d)\n",
				WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
			bench_daemon_print_log(d);
			kvstash_close(probe);
			return -1;
		}
		if (cli_now_s() > deadline || atomic_load(&cli_stop)) {
			fprintf(stderr, "kvstash bench: kvstashd did not answer PING at %s in %.0f s\n",
				d->endpoint, BENCH_START_TIMEOUT_S);
			bench_daemon_print_log(d);
			kvstash_close(probe);
			return -1;
		}
	}
	kvstash_close(probe);
	return 0;
}

/*
 * SIGTERM the started kvstashd, wait BENCH_STOP_TIMEOUT_S for it (then
 * SIGKILL) and remove its directory. 0 if it exited with status 0, else -1
 * with its log printed: a benchmark whose server failed is not to be trusted.
 */
static int bench_daemon_stop(struct bench_daemon *d)
{
	double deadline = cli_now_s() + BENCH_STOP_TIMEOUT_S;
	int status = 0, rc = 0;

	if (d->pid > 0) {
		kill(d->pid, SIGTERM);
		for (;;) {
			pid_t w = waitpid(d->pid, &status, WNOHANG);

			if (w == d->pid || (w < 0 && errno != EINTR))
				break;
			if (cli_now_s() > deadline) {
				fprintf(stderr, "kvstash bench: kvstashd ignored SIGTERM for %.0f s; "
					"killing it\n", BENCH_STOP_TIMEOUT_S);
				kill(d->pid, SIGKILL);
				while (waitpid(d->pid, &status, 0) < 0 && errno == EINTR)
					;
				rc = -1;
				break;
			}
			usleep(10000);
		}
		if (!WIFEXITED(status) || WEXITSTATUS(status)) {
			fprintf(stderr, "kvstash bench: kvstashd ended with %s %d\n",
				WIFEXITED(status) ? "status" : "signal",
				WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
			bench_daemon_print_log(d);
			rc = -1;
		}
		d->pid = 0;
	}
	if (d->dir[0])
		bench_daemon_rmdir(d);
	return rc;
}

static void bench_shuffle(int64_t *v, size_t n, uint64_t *rng)
{
	for (size_t i = n - 1; i > 0; i--) {
		*rng = cli_mix64(*rng);
		size_t j = (size_t)(*rng % (i + 1));
		int64_t t = v[i];

		v[i] = v[j];
		v[j] = t;
	}
}

/*
 * Connect, size the paged buffer for @max_chunks per request (as many blocks
 * again to retrieve into), fill it with a pattern unique per 8 bytes (every
 * page touched before timing), register it. 0 or -1 with the reason printed.
 */
static int bench_setup(struct bench_ctx *b, const char *endpoint, int max_chunks)
{
	int timeout = b->o->timeout_set ? b->o->timeout_ms : BENCH_TIMEOUT_MS;
	struct kvstash_host_layer layers[BENCH_LAYERS];
	struct kvstash_kv_layout lay = { .layout = KVSTASH_LAYOUT_FLASH_ATTN, .dtype = "bfloat16",
					 .ndim = 5 };
	size_t max_blocks;
	int64_t *all;
	uint64_t rng;

	if (kvstash_connect(endpoint, timeout, &b->c)) {
		fprintf(stderr, "kvstash bench: %s\n", kvstash_last_error());
		return -1;
	}
	if (kvstash_get_chunk_size(b->c, &b->chunk_tokens)) {
		fprintf(stderr, "kvstash bench: GET_CHUNK_SIZE at %s: %s\n", endpoint,
			kvstash_last_error());
		return -1;
	}
	if (!b->chunk_tokens || b->chunk_tokens % BENCH_BLOCK_TOKENS) {
		fprintf(stderr, "kvstash bench: chunk size %u is not a multiple of the %d-token "
			"block\n", b->chunk_tokens, BENCH_BLOCK_TOKENS);
		return -1;
	}
	max_blocks = (size_t)max_chunks * b->chunk_tokens / BENCH_BLOCK_TOKENS;
	b->nb = 2 * max_blocks;
	b->block_bytes = BENCH_BLOCK_TOKENS * BENCH_ROW_BYTES;
	b->layer_bytes = 2 * b->nb * b->block_bytes;
	b->object_bytes = 2 * (size_t)BENCH_LAYERS * b->chunk_tokens * BENCH_ROW_BYTES;
	if (kvstash_host_buffer_create(&b->buf, b->layer_bytes * BENCH_LAYERS, "kvstash-bench")) {
		fprintf(stderr, "kvstash bench: KV buffer of %zu MiB: %s\n",
			b->layer_bytes * BENCH_LAYERS >> 20, kvstash_last_error());
		return -1;
	}
	all = calloc(b->nb, sizeof(*all));
	b->src = calloc(max_blocks, sizeof(*b->src));
	b->dst = calloc(max_blocks, sizeof(*b->dst));
	b->tokens = calloc(max_blocks * BENCH_BLOCK_TOKENS, sizeof(*b->tokens));
	if (!all || !b->src || !b->dst || !b->tokens) {
		free(all);
		fprintf(stderr, "kvstash bench: out of memory\n");
		return -1;
	}
	/* Paged caches are fragmented: blocks in no particular order. */
	for (size_t i = 0; i < b->nb; i++)
		all[i] = (int64_t)i;
	rng = b->seed;
	bench_shuffle(all, b->nb, &rng);
	memcpy(b->src, all, max_blocks * sizeof(*all));
	memcpy(b->dst, all + max_blocks, max_blocks * sizeof(*all));
	free(all);
	for (size_t i = 0; i < b->buf.bytes / 8; i++) {
		uint64_t v = cli_mix64(b->seed ^ (i * 0x9e3779b97f4a7c15ull));

		memcpy((uint8_t *)b->buf.ptr + 8 * i, &v, 8);
	}
	lay.shape[0] = 2;
	lay.shape[1] = (int64_t)b->nb;
	lay.shape[2] = BENCH_BLOCK_TOKENS;
	lay.shape[3] = BENCH_HEADS;
	lay.shape[4] = BENCH_HEAD_SIZE;
	for (int l = 0; l < BENCH_LAYERS; l++)
		layers[l] = (struct kvstash_host_layer){ .path = b->buf.path,
							 .offset = (uint64_t)l * b->layer_bytes,
							 .nbytes = b->buf.bytes };
	if (kvstash_register_host(b->c, b->instance, BENCH_MODEL, 1, &lay, layers, BENCH_LAYERS)) {
		fprintf(stderr, "kvstash bench: REGISTER: %s\n", kvstash_last_error());
		return -1;
	}
	b->registered = true;
	return 0;
}

static void bench_teardown(struct bench_ctx *b)
{
	if (b->registered)
		kvstash_unregister(b->c, b->instance);
	if (b->c)
		kvstash_close(b->c);
	if (b->buf.ptr)
		kvstash_host_buffer_destroy(&b->buf);
	free(b->src);
	free(b->dst);
	free(b->tokens);
	free(b->mc_src);
	free(b->mc_dst);
}

/* One request of @chunks; 0, or a negative errno with the reason printed. */
typedef int (*bench_op_fn)(struct bench_ctx *b, int chunks);

static struct kvstash_key bench_key(const struct bench_ctx *b, int chunks, const char *rid)
{
	size_t ntok = (size_t)chunks * b->chunk_tokens;

	return (struct kvstash_key){ .model = BENCH_MODEL, .world_size = 1, .worker_id = 0,
				     .tokens = b->tokens, .ntokens = ntok, .start = 0,
				     .end = ntok, .request_id = rid };
}

/* STORE a fresh prompt: new tokens from the first one, so every chunk is new. */
static int bench_store(struct bench_ctx *b, int chunks)
{
	size_t ntok = (size_t)chunks * b->chunk_tokens;
	uint64_t p = b->prompts++;
	char rid[64];
	int rc;

	for (size_t t = 0; t < ntok; t++)
		b->tokens[t] = (uint32_t)cli_mix64(b->seed ^ (p << 32) ^ t);
	snprintf(rid, sizeof(rid), "kvstash-bench-%" PRIx64 "-%" PRIu64, b->seed, p);
	struct kvstash_key k = bench_key(b, chunks, rid);

	rc = kvstash_store(b->c, &k, b->instance, b->src, ntok / BENCH_BLOCK_TOKENS);
	if (rc) {
		bench_progress_end(&b->pg);
		fprintf(stderr, "kvstash bench: STORE of %d chunk(s): %s\n", chunks,
			kvstash_last_error());
		return rc;
	}
	kvstash_end_session(b->c, rid);
	return 0;
}

/* RETRIEVE the last prompt stored into the dst blocks. */
static int bench_retrieve(struct bench_ctx *b, int chunks)
{
	size_t ntok = (size_t)chunks * b->chunk_tokens;
	struct kvstash_key k = bench_key(b, chunks, "kvstash-bench-retrieve");
	int rc = kvstash_retrieve(b->c, &k, b->instance, b->dst, ntok / BENCH_BLOCK_TOKENS, 0);

	if (rc) {
		bench_progress_end(&b->pg);
		fprintf(stderr, "kvstash bench: RETRIEVE of %d chunk(s): %s\n", chunks,
			kvstash_last_error());
	}
	return rc;
}

static int bench_memcpy(struct bench_ctx *b, int chunks)
{
	memcpy(b->mc_dst, b->mc_src, (size_t)chunks * b->object_bytes);
	return 0;
}

/*
 * Run @op once untimed, then back to back for --seconds (at least once),
 * and put the request bytes per second into *gbps. 0, -EINTR on SIGINT/SIGTERM, or @op's error.
 */
static int bench_time(struct bench_ctx *b, int chunks, bench_op_fn op, const char *label,
		      double *gbps)
{
	double bytes = (double)chunks * (double)b->object_bytes, t0, t;
	uint64_t n = 0;
	int rc;

	*gbps = 0;
	bench_draw(&b->pg, 0, label, 0);
	/* One untimed request: the server maps the client's pages on first use. */
	if (atomic_load(&cli_stop))
		return -EINTR;
	rc = op(b, chunks);
	if (rc)
		return rc;
	t0 = cli_now_s();
	do {
		if (atomic_load(&cli_stop))
			return -EINTR;
		rc = op(b, chunks);
		if (rc)
			return rc;
		n++;
		t = cli_now_s() - t0;
		*gbps = (double)n * bytes / t / 1e9;
		bench_draw(&b->pg, t / b->o->seconds, label, *gbps);
	} while (t < b->o->seconds);
	bench_step_done(&b->pg, label, *gbps);
	return 0;
}

/*
 * Zero the dst blocks of a @chunks request, RETRIEVE into them once more and
 * compare each (layer, plane, block) with the src block it was stored from.
 * 0, -EIO on a mismatch, or the RETRIEVE's error.
 */
static int bench_verify(struct bench_ctx *b, int chunks)
{
	size_t nblk = (size_t)chunks * b->chunk_tokens / BENCH_BLOCK_TOKENS, bad = 0;
	uint8_t *base = b->buf.ptr;
	int rc;

	for (size_t l = 0; l < BENCH_LAYERS; l++)
		for (size_t p = 0; p < 2; p++)
			for (size_t i = 0; i < nblk; i++)
				memset(base + l * b->layer_bytes +
					       (p * b->nb + (size_t)b->dst[i]) * b->block_bytes,
				       0, b->block_bytes);
	rc = bench_retrieve(b, chunks);
	if (rc)
		return rc;
	for (size_t l = 0; l < BENCH_LAYERS; l++) {
		uint8_t *lb = base + l * b->layer_bytes;

		for (size_t p = 0; p < 2; p++)
			for (size_t i = 0; i < nblk; i++)
				bad += memcmp(lb + (p * b->nb + (size_t)b->src[i]) * b->block_bytes,
					      lb + (p * b->nb + (size_t)b->dst[i]) * b->block_bytes,
					      b->block_bytes) != 0;
	}
	if (bad) {
		bench_progress_end(&b->pg);
		fprintf(stderr, "kvstash bench: RETRIEVE of %d chunk(s) returned wrong bytes in "
			"%zu of %zu blocks\n", chunks, bad, nblk * 2 * BENCH_LAYERS);
		return -EIO;
	}
	return 0;
}

/*
 * STORE fresh prompts of @chunks, untimed, until @bytes went in: the pool of
 * a fresh kvstashd is touched on use, and the timed requests should measure
 * copies, not its page faults.
 */
static int bench_warmup(struct bench_ctx *b, int chunks, double bytes)
{
	double done = 0, req = (double)chunks * (double)b->object_bytes;
	char label[96];

	snprintf(label, sizeof(label), "warm-up: STORE %.0f MiB", bytes / (1 << 20));
	bench_draw(&b->pg, 0, label, 0);
	while (done < bytes) {
		int rc;

		if (atomic_load(&cli_stop))
			return -EINTR;
		rc = bench_store(b, chunks);
		if (rc)
			return rc;
		done += req;
		bench_draw(&b->pg, done / bytes, label, 0);
	}
	b->pg.step++;
	if (!b->pg.tty)
		fprintf(stderr, "kvstash bench: [%2d/%d] %s\n", b->pg.step, b->pg.nsteps, label);
	return 0;
}

/* One size: memcpy, STORE, RETRIEVE, verify. */
static int bench_one_size(struct bench_ctx *b, struct bench_row *r)
{
	char label[96];
	size_t bytes = (size_t)r->chunks * b->object_bytes;
	int rc;

	r->mib = (double)bytes / (1 << 20);
	/* Fresh buffers per size, touched before the clock starts. */
	free(b->mc_src);
	free(b->mc_dst);
	b->mc_src = malloc(bytes);
	b->mc_dst = malloc(bytes);
	if (!b->mc_src || !b->mc_dst) {
		fprintf(stderr, "kvstash bench: out of memory for the memcpy baseline\n");
		return -ENOMEM;
	}
	memset(b->mc_src, 0x5a, bytes);
	memset(b->mc_dst, 0, bytes);
	snprintf(label, sizeof(label), "%2d chunk(s) %5.0f MiB  memcpy", r->chunks, r->mib);
	rc = bench_time(b, r->chunks, bench_memcpy, label, &r->memcpy_gbps);
	free(b->mc_src);
	free(b->mc_dst);
	b->mc_src = b->mc_dst = NULL;
	if (rc)
		return rc;
	snprintf(label, sizeof(label), "%2d chunk(s) %5.0f MiB  STORE", r->chunks, r->mib);
	rc = bench_time(b, r->chunks, bench_store, label, &r->store_gbps);
	if (rc)
		return rc;
	snprintf(label, sizeof(label), "%2d chunk(s) %5.0f MiB  RETRIEVE", r->chunks, r->mib);
	rc = bench_time(b, r->chunks, bench_retrieve, label, &r->retrieve_gbps);
	if (rc)
		return rc;
	return bench_verify(b, r->chunks);
}

struct bench_stat {
	const char *name;
	uint64_t value;
	bool found;
};

static int bench_stat_cb(const char *name, uint64_t value, void *arg)
{
	struct bench_stat *s = arg;

	if (!strcmp(name, s->name)) {
		s->value = value;
		s->found = true;
		return 1;
	}
	return 0;
}

/* The server's counter @name into *out; false if it has none (or STATS failed). */
static bool bench_server_stat(kvstash_client *c, const char *name, uint64_t *out)
{
	struct bench_stat s = { .name = name };

	kvstash_stats(c, bench_stat_cb, &s);
	*out = s.value;
	return s.found;
}

static void bench_print_table(const struct bench_ctx *b, const char *endpoint, bool started,
			      const struct bench_row *rows, int n)
{
	uint64_t workers = 0;
	bool have_workers = bench_server_stat(b->c, "workers", &workers);

	printf("kvstash bench: kvstashd at %s (%s", endpoint,
	       started ? "started for this run" : "already running");
	if (have_workers)
		printf(", %" PRIu64 " transfer worker(s)", workers);
	printf(")\n");
	printf("Llama-3-8B-like layout: %d layers, flash_attn [2, NB, %d, %d, %d] bf16, "
	       "%u-token chunks of %.0f MiB\n", BENCH_LAYERS, BENCH_BLOCK_TOKENS, BENCH_HEADS,
	       BENCH_HEAD_SIZE, b->chunk_tokens, (double)b->object_bytes / (1 << 20));
	printf("one request at a time, %.3g s per figure; memcpy: one thread, same sizes, same run; "
	       "1 GB = 1e9 B\n\n", b->o->seconds);
	printf("%6s %8s %11s %14s %12s %13s %16s\n", "chunks", "MiB", "STORE GB/s",
	       "RETRIEVE GB/s", "memcpy GB/s", "STORE/memcpy", "RETRIEVE/memcpy");
	for (int i = 0; i < n; i++) {
		const struct bench_row *r = &rows[i];

		printf("%6d %8.0f %11.2f %14.2f %12.2f %13.2f %16.2f\n", r->chunks, r->mib,
		       r->store_gbps, r->retrieve_gbps, r->memcpy_gbps,
		       r->store_gbps / r->memcpy_gbps, r->retrieve_gbps / r->memcpy_gbps);
	}
	printf("\nevery size's RETRIEVE was checked byte for byte against the blocks it was "
	       "stored from\n");
}

/* @s in a gnuplot single-quoted string: ' doubles. */
static void bench_gp_str(FILE *f, const char *s)
{
	fputc('\'', f);
	for (; *s; s++) {
		if (*s == '\'')
			fputc('\'', f);
		fputc(*s, f);
	}
	fputc('\'', f);
}

/* FILE.png -> FILE.<ext>, else FILE + .<ext>. */
static void bench_sibling(const char *png, const char *ext, char *out, size_t len)
{
	size_t n = strlen(png);

	if (n > 4 && !strcasecmp(png + n - 4, ".png"))
		n -= 4;
	snprintf(out, len, "%.*s.%s", (int)n, png, ext);
}

/* Create the three --plot files now, so a bad path fails before the sweep. */
static int bench_plot_writable(const char *png)
{
	char path[4200];
	const char *ext[] = { NULL, "dat", "gp" };

	for (int i = 0; i < 3; i++) {
		FILE *f;

		if (ext[i])
			bench_sibling(png, ext[i], path, sizeof(path));
		else
			snprintf(path, sizeof(path), "%s", png);
		f = fopen(path, "w");
		if (!f) {
			fprintf(stderr, "kvstash bench: --plot: cannot write %s: %s\n", path,
				strerror(errno));
			return -1;
		}
		fclose(f);
	}
	return 0;
}

/*
 * Write the sweep to PLOT.dat, a gnuplot script to PLOT.gp, run gnuplot on
 * it and check PLOT starts with the PNG signature. 0 or -1 with the reason
 * printed.
 */
static int bench_plot(const struct bench_ctx *b, const char *gnuplot, const struct bench_row *rows,
		      int n)
{
	static const unsigned char png_sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
	const char *png = b->o->plot;
	char dat[4200], gp[4200];
	unsigned char sig[8];
	double lo = rows[0].mib, hi = rows[0].mib;
	uint64_t workers = 0;
	bool have_workers = bench_server_stat(b->c, "workers", &workers);
	FILE *f;
	int status;
	pid_t pid;

	bench_sibling(png, "dat", dat, sizeof(dat));
	bench_sibling(png, "gp", gp, sizeof(gp));
	f = fopen(dat, "w");
	if (!f) {
		fprintf(stderr, "kvstash bench: %s: %s\n", dat, strerror(errno));
		return -1;
	}
	fprintf(f, "# kvstash bench: host STORE/RETRIEVE through kvstashd, GB/s (1 GB = 1e9 B)\n");
	fprintf(f, "# chunks MiB store_gbps retrieve_gbps memcpy_gbps\n");
	for (int i = 0; i < n; i++) {
		fprintf(f, "%d %.0f %.4f %.4f %.4f\n", rows[i].chunks, rows[i].mib,
			rows[i].store_gbps, rows[i].retrieve_gbps, rows[i].memcpy_gbps);
		lo = fmin(lo, rows[i].mib);
		hi = fmax(hi, rows[i].mib);
	}
	if (fclose(f)) {
		fprintf(stderr, "kvstash bench: %s: %s\n", dat, strerror(errno));
		return -1;
	}
	f = fopen(gp, "w");
	if (!f) {
		fprintf(stderr, "kvstash bench: %s: %s\n", gp, strerror(errno));
		return -1;
	}
	fprintf(f, "# kvstash bench --plot: rerun with 'gnuplot %s' after editing\n", gp);
	fprintf(f, "set terminal pngcairo size 1000,620 noenhanced font 'sans,11'\n");
	fprintf(f, "set output ");
	bench_gp_str(f, png);
	fprintf(f, "\nset title \"kvstash host backend: STORE / RETRIEVE through kvstashd vs "
		"single-thread memcpy\\nLlama-3-8B-like layout (32 layers, 8 x 128 bf16, "
		"%u-token chunks of %.0f MiB)", b->chunk_tokens, (double)b->object_bytes / (1 << 20));
	if (have_workers)
		fprintf(f, ", %" PRIu64 " transfer worker(s)", workers);
	fprintf(f, ", one request at a time\"\n");
	fprintf(f, "set xlabel 'request size (MiB, log2 scale)'\n");
	fprintf(f, "set ylabel 'GB/s (1 GB = 1e9 bytes)'\n");
	fprintf(f, "set logscale x 2\n");
	fprintf(f, "set xrange [%g:%g]\n", lo / 1.5, hi * 1.5);
	fprintf(f, "set yrange [0:*]\n");
	fprintf(f, "set grid\n");
	fprintf(f, "set key outside below horizontal\n");
	fprintf(f, "set bmargin 5\n");
	fprintf(f, "set datafile commentschars '#'\n");
	fprintf(f, "plot ");
	bench_gp_str(f, dat);
	fprintf(f, " using 2:5:xtic(2) title 'memcpy, 1 thread' with linespoints "
		"dt 2 lw 2 pt 6 ps 1.2 lc rgb '#777777', \\\n     '' using 2:3 title 'STORE "
		"(paged -> pool)' with linespoints lw 2 pt 7 ps 1.2 lc rgb '#1f77b4', \\\n"
		"     '' using 2:4 title 'RETRIEVE (pool -> paged)' with linespoints lw 2 pt 5 "
		"ps 1.2 lc rgb '#d62728', \\\n"
		"     '' using 2:3:(sprintf('%%.1f', $3)) notitle with labels offset 0,-1 "
		"tc rgb '#1f77b4', \\\n"
		"     '' using 2:4:(sprintf('%%.1f', $4)) notitle with labels offset 0,1 "
		"tc rgb '#d62728'\n");
	if (fclose(f)) {
		fprintf(stderr, "kvstash bench: %s: %s\n", gp, strerror(errno));
		return -1;
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid == 0) {
		execl(gnuplot, "gnuplot", gp, (char *)NULL);
		dprintf(STDERR_FILENO, "kvstash bench: cannot run %s: %s\n", gnuplot,
			strerror(errno));
		_exit(127);
	}
	if (pid < 0) {
		fprintf(stderr, "kvstash bench: fork: %s\n", strerror(errno));
		return -1;
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "kvstash bench: gnuplot failed (%s %d) on %s; the data is in %s\n",
			WIFEXITED(status) ? "status" : "signal",
			WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), gp, dat);
		return -1;
	}
	f = fopen(png, "rb");
	if (!f || fread(sig, 1, sizeof(sig), f) != sizeof(sig) || memcmp(sig, png_sig, 8)) {
		fprintf(stderr, "kvstash bench: gnuplot did not write a PNG to %s\n", png);
		if (f)
			fclose(f);
		return -1;
	}
	fclose(f);
	printf("plot: %s (data %s, gnuplot script %s)\n", png, dat, gp);
	return 0;
}

/* The host sweep. 0, 1 (failure), 130 (interrupted). */
static int bench_host(const struct cli_opts *o, const char *bindir)
{
	struct bench_daemon d = { 0 };
	struct bench_ctx b = { .o = o, .buf = { .fd = -1 } };
	struct bench_row rows[BENCH_MAX_SIZES] = { { 0 } };
	const char *endpoint = o->endpoint, *gnuplot = NULL;
	char gnuplot_path[4200];
	int max_chunks = 0, rc = 0, ret = 1;
	struct sigaction sa = { .sa_handler = cli_on_signal }, old_int, old_term;

	/* Fail fast, before a sweep of minutes, if the picture cannot be drawn. */
	if (o->plot) {
		if (!bench_find_in_path("gnuplot", gnuplot_path, sizeof(gnuplot_path))) {
			fprintf(stderr, "kvstash bench: --plot needs gnuplot, which is not installed "
				"(Debian: apt-get install gnuplot-nox); nothing was measured\n");
			return 1;
		}
		gnuplot = gnuplot_path;
		if (bench_plot_writable(o->plot))
			return 1;
	}
	for (int i = 0; i < o->nsizes; i++) {
		rows[i].chunks = o->sizes[i];
		if (o->sizes[i] > max_chunks)
			max_chunks = o->sizes[i];
	}
	b.seed = cli_mix64((uint64_t)time(NULL) ^ (uint64_t)getpid() << 20);
	b.instance = (int64_t)(b.seed & 0x7fffffff);
	b.pg.tty = isatty(STDERR_FILENO);
	b.pg.nsteps = 1 + 3 * o->nsizes;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	if (!endpoint) {
		/* Objects of the standard 256-token chunk: 32 MiB. */
		size_t req_mib = (size_t)max_chunks * 2 * BENCH_LAYERS * 256 * BENCH_ROW_BYTES >> 20;
		size_t pool_mib = BENCH_POOL_REQUESTS * req_mib;

		if (pool_mib < BENCH_MIN_POOL_MIB)
			pool_mib = BENCH_MIN_POOL_MIB;
		if (bench_daemon_start(&d, bindir, pool_mib))
			goto out;
		endpoint = d.endpoint;
	}
	if (bench_setup(&b, endpoint, max_chunks))
		goto out;
	{
		/*
		 * Fill our own kvstashd's pool and then some; of a running
		 * server's pool, only as much as a few requests use.
		 */
		double req = (double)max_chunks * (double)b.object_bytes;
		double warm = BENCH_WARMUP_REQUESTS * req;
		uint64_t pool = 0;

		if (bench_server_stat(b.c, "pool_bytes", &pool) && pool &&
		    (d.pid > 0 || (double)pool + req < warm))
			warm = (double)pool + req;
		rc = bench_warmup(&b, max_chunks, warm);
	}
	for (int i = 0; !rc && i < o->nsizes; i++)
		rc = bench_one_size(&b, &rows[i]);
	bench_progress_end(&b.pg);
	if (rc == -EINTR) {
		fprintf(stderr, "kvstash bench: interrupted\n");
		ret = 130;
		goto out;
	}
	if (rc)
		goto out;
	bench_print_table(&b, endpoint, d.pid > 0, rows, o->nsizes);
	fflush(stdout);
	ret = 0;
	if (o->plot && bench_plot(&b, gnuplot, rows, o->nsizes))
		ret = 1;
out:
	bench_progress_end(&b.pg);
	bench_teardown(&b);
	if (bench_daemon_stop(&d) && ret == 0)
		ret = 1;
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	return ret;
}

/*
 * Run <bindir>/bench/@name with @args, its output passed through. 0 if it
 * ran and passed, 1 if it failed, 77 if it skipped (exit 77) or is not built.
 */
static int bench_program(const char *bindir, const char *name, char *const args[], int nargs,
			 const char *skip_why)
{
	char exe[4200];
	char *argv[8];
	int status;
	pid_t pid;

	if (nargs > 6)
		return 1;

	snprintf(exe, sizeof(exe), "%s/bench/%s", bindir, name);
	if (access(exe, X_OK)) {
		printf("kvstash bench: %s: not built (%s): %s\n", name, exe, skip_why);
		return 77;
	}
	argv[0] = exe;
	for (int i = 0; i < nargs; i++)
		argv[i + 1] = args[i];
	argv[nargs + 1] = NULL;
	printf("== %s\n", name);
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid == 0) {
		execv(exe, argv);
		dprintf(STDERR_FILENO, "kvstash bench: cannot run %s: %s\n", exe, strerror(errno));
		_exit(127);
	}
	if (pid < 0) {
		fprintf(stderr, "kvstash bench: fork: %s\n", strerror(errno));
		return 1;
	}
	/* No deadline: the program is a benchmark of its own; Ctrl-C reaches it too. */
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return 1;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
		printf("kvstash bench: %s: skipped (exit 77): %s\n", name, skip_why);
		return 77;
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		fprintf(stderr, "kvstash bench: %s failed (%s %d)\n", name,
			WIFEXITED(status) ? "status" : "signal",
			WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
		return 1;
	}
	return 0;
}

int cli_bench(const struct cli_opts *o_in, const char *argv0)
{
	struct cli_opts opts = *o_in;
	const struct cli_opts *o = &opts;
	static const char no_gpu[] = "no GPU/CUDA";
	char bindir[4096], secs[32];
	int ran = 0, failed = 0, rc;

	if (!opts.nsizes) {
		opts.nsizes = (int)KS_ARRAY_SIZE(bench_default_sizes);
		memcpy(opts.sizes, bench_default_sizes, sizeof(bench_default_sizes));
	}
	if (bench_self_dir(argv0, bindir, sizeof(bindir)))
		return 1;
	if (!o->gpu && !o->tiers)
		return bench_host(o, bindir);
	snprintf(secs, sizeof(secs), "%g", o->seconds);
	if (o->gpu) {
		static char flag_seconds[] = "--seconds";
		char *sargs[] = { flag_seconds, secs };

		rc = bench_program(bindir, "gpu_bench", NULL, 0, no_gpu);
		ran += rc == 0;
		failed += rc == 1;
		rc = bench_program(bindir, "gpu_server_bench", sargs, o->seconds_set ? 2 : 0, no_gpu);
		ran += rc == 0;
		failed += rc == 1;
		if (!ran && !failed)
			printf("kvstash bench --gpu: no GPU on this machine or no CUDA in this build "
			       "(cmake -DKVSTASH_CUDA=ON on a host with a GPU): nothing measured\n");
	}
	if (o->tiers) {
		rc = bench_program(bindir, "tier_bench", NULL, 0, "the tier benchmark cannot run here");
		failed += rc == 1;
	}
	return failed ? 1 : 0;
}

/* --sizes 1,2,4: chunks per request, 1..BENCH_MAX_CHUNKS, at most BENCH_MAX_SIZES. */
