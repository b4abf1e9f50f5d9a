/*
 * config.c - the option table and its parsers (Redis config.c static_configs).
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "compiler.h"
#include "log.h"
#include "tier_redis.h"

enum cfg_type { CFG_STR, CFG_U32, CFG_BYTES, CFG_ENUM };

struct cfg_opt {
	const char *name;
	const char *alias;	/* LMCache MP flag meaning the same, or NULL */
	enum cfg_type type;
	size_t off;
	size_t size;		/* CFG_STR/CFG_ENUM: buffer size */
	const char *def;
	uint64_t min, max;	/* CFG_U32 / CFG_BYTES */
	const char *choices;	/* CFG_ENUM: "a|b|c" */
	const char *help;
};

#define F(field) offsetof(struct srv_config, field), sizeof(((struct srv_config *)0)->field)
#define KIB 1024ull
#define MIB (1024ull * KIB)
#define GIB (1024ull * MIB)
#define TIB (1024ull * GIB)

static const struct cfg_opt cfg_opts[] = {
	/* name, alias, type, field, default, min, max, choices, help */
	{ "listen", NULL, CFG_STR, F(listen), "", 0, 0, NULL,
	  "ZMQ endpoint to bind, e.g. tcp://127.0.0.1:5555 or ipc:///run/kvstash.sock; "
	  "overrides --host/--port" },
	{ "host", NULL, CFG_STR, F(host), "127.0.0.1", 0, 0, NULL,
	  "address to bind; anything but loopback is logged as a warning" },
	{ "port", NULL, CFG_U32, F(port), "5555", 1, 65535, NULL, "TCP port to bind" },
	{ "chunk-size", "chunk-tokens", CFG_U32, F(chunk_tokens), "256", 16, 65536, NULL,
	  "tokens per stored chunk (GET_CHUNK_SIZE); a multiple of every block size" },
	{ "pool-size", NULL, CFG_BYTES, F(pool_bytes), "4G", 64 * MIB, 4 * TIB, NULL,
	  "host memory pool for cached chunks (K/M/G/T suffixes); reserved at start, "
	  "touched on use" },
	{ "workers", "max-workers", CFG_U32, F(workers), "2", 1, 256, NULL,
	  "transfer worker threads per device" },
	{ "queue-depth", NULL, CFG_U32, F(queue_depth), "4096", 1, 1 << 20, NULL,
	  "transfer jobs queued per device before STORE/RETRIEVE fail fast" },
	{ "shards", NULL, CFG_U32, F(shards), "64", 1, 65536, NULL,
	  "index shards (rounded up to a power of two)" },
	{ "read-ttl-s", NULL, CFG_U32, F(read_ttl_s), "300", 1, 86400, NULL,
	  "seconds before a LOOKUP read lock that no RETRIEVE/FREE released expires" },
	{ "write-ttl-s", NULL, CFG_U32, F(write_ttl_s), "600", 1, 86400, NULL,
	  "seconds before an unfinished STORE reservation expires" },
	{ "session-ttl-s", NULL, CFG_U32, F(session_ttl_s), "600", 1, 86400, NULL,
	  "seconds a request's cached token hashes live without END_SESSION" },
	{ "client-timeout-s", "worker-reap-timeout-seconds", CFG_U32, F(client_timeout_s),
	  "120", 1, 86400, NULL,
	  "unregister an instance this long after its last PING that carried its id" },
	{ "registration-grace-s", "worker-registration-grace-seconds", CFG_U32,
	  F(registration_grace_s), "0", 0, 864000, NULL,
	  "unregister an instance that never sent such a PING after this long (0 = never)" },
	{ "max-message-mb", NULL, CFG_U32, F(max_message_mb), "256", 1, 4096, NULL,
	  "largest request accepted (ZMQ_MAXMSGSIZE); bigger ones close that connection" },
	{ "lock-timeout-ms", NULL, CFG_U32, F(lock_timeout_ms), "2000", 1, 600000, NULL,
	  "longest wait for any internal lock before the request fails" },
	{ "transfer-timeout-ms", NULL, CFG_U32, F(transfer_timeout_ms), "30000", 100, 3600000, NULL,
	  "longest wait for one GPU copy or one tier read before the request fails (a GPU copy "
	  "still running then keeps its buffers until the device confirms it ended)" },
	{ "evict-watermark-pct", NULL, CFG_U32, F(evict_watermark_pct), "2", 0, 50, NULL,
	  "when a STORE needs space, evict until this percent of slots is free" },
	{ "owner-check", NULL, CFG_ENUM, F(owner_check), "on", 0, 0, "on|off",
	  "only the connection that registered an instance may STORE, RETRIEVE, UNREGISTER "
	  "or heartbeat it (a re-REGISTER moves it); off: any connection may" },
	{ "io-priority", NULL, CFG_ENUM, F(io_priority), "realtime", 0, 0, "realtime|nice|normal",
	  "CPU priority of the io thread and of libzmq's I/O thread, which every PING crosses: "
	  "realtime = SCHED_FIFO priority 1, so a PING never waits for a core behind a copy or "
	  "another process (both threads do short, bounded work per wake-up); nice = nice -10; "
	  "both need CAP_SYS_NICE (realtime: or an RLIMIT_RTPRIO of 1), and fall back one step "
	  "(realtime to nice to normal) with a log line when it is missing" },
	{ "busy-poll", NULL, CFG_ENUM, F(busy_poll), "auto", 0, 0, "auto|on|off",
	  "GPU transfers: a transfer worker polls for the next job for 1 ms after each one, "
	  "and the io thread polls for a copy's completion from shortly before its expected "
	  "end (at most 0.3 ms), instead of sleeping; saves two thread wake-ups per request "
	  "(tens of us each on a virtual machine) for up to 1.3 ms of CPU per request; "
	  "auto = on with at least 8 CPUs" },
	{ "protocol", NULL, CFG_ENUM, F(protocol), "auto", 0, 0, "auto|march|current",
	  "LMCache MP wire dialect: auto serves March 2026 clients and today's (frozen ids and "
	  "string ops, Sept 2026 on) on one port, each connection latched to the dialect its "
	  "first telling request uses; march or current serve only that one" },
	{ "cuda", NULL, CFG_ENUM, F(cuda), "auto", 0, 0, "auto|off",
	  "serve CUDA IPC registrations on every visible GPU (auto) or host buffers only (off)" },
	{ "state-dir", NULL, CFG_STR, F(state_dir), "", 0, 0, NULL,
	  "warm restart: keep the pool in a file in this directory (on tmpfs, e.g. "
	  "/dev/shm/kvstash) with its index and the registrations, so that a restarted "
	  "kvstashd (same version or an upgrade) serves the chunks cached before and keeps "
	  "the engines' registrations (docs/operations.md, \"Warm restart\"); a state that does not match "
	  "(--pool-size, --chunk-size, format version) is set aside and the start is empty; "
	  "empty = off" },
	{ "disk-path", NULL, CFG_STR, F(disk_path), "", 0, 0, NULL,
	  "directory for the L2 disk tier (evicted chunks are written there, found again "
	  "after a restart); empty = no disk tier" },
	{ "disk-size-gb", NULL, CFG_U32, F(disk_size_gb), "100", 1, 1 << 20, NULL,
	  "capacity of the disk tier in GiB (oldest chunks are removed beyond it)" },
	{ "redis-url", NULL, CFG_STR, F(redis_url), "", 0, 0, NULL,
	  "L3 Redis/Valkey tier: redis://[user:password@]host:port, several separated by commas "
	  "(keys are sharded over them; every kvstashd sharing the tier lists them in the same "
	  "order), or a Redis/Valkey Cluster: redis+cluster://[user:password@]host:port"
	  "[,host:port...] (seed nodes; the masters are found and followed)" },
	{ "redis-prefix", NULL, CFG_STR, F(redis_prefix), "kvstash:", 0, 0, NULL,
	  "prefix of the Redis keys" },
	{ "redis-ttl-s", NULL, CFG_U32, F(redis_ttl_s), "86400", 0, 31536000, NULL,
	  "expiry of chunks written to Redis, seconds (0 = never)" },
	{ "redis-user", NULL, CFG_STR, F(redis_user), "", 0, 0, NULL,
	  "Redis ACL user to AUTH as (needs --redis-password-file)" },
	{ "redis-password-file", NULL, CFG_STR, F(redis_password_file), "", 0, 0, NULL,
	  "file whose first line is the Redis AUTH password (keeps it out of ps and logs)" },
	{ "curve-secret-key-file", NULL, CFG_STR, F(curve_secret_key_file), "", 0, 0, NULL,
	  "file with the server's Z85 CURVE secret key: encrypt all traffic and require "
	  "clients to know the server's public key (kvstash keygen makes one)" },
	{ "curve-allowed-clients", NULL, CFG_STR, F(curve_allowed_clients), "", 0, 0, NULL,
	  "file of Z85 client public keys, one per line: only these may connect "
	  "(needs --curve-secret-key-file)" },
	{ "log-level", NULL, CFG_ENUM, F(log_level), "info", 0, 0, "error|warn|info|debug",
	  "log verbosity" },
	{ "log-format", NULL, CFG_ENUM, F(log_format), "text", 0, 0, "text|json",
	  "log line format" },
	{ "http-host", NULL, CFG_STR, F(http_host), "127.0.0.1", 0, 0, NULL,
	  "address of the HTTP endpoint (/metrics, /healthz, /stats); it has no authentication" },
	{ "http-port", NULL, CFG_U32, F(http_port), "8080", 0, 65535, NULL,
	  "TCP port of the HTTP endpoint (0 = no HTTP endpoint)" },
	{ "kv-events-endpoint", NULL, CFG_STR, F(kv_events_endpoint), "", 0, 0, NULL,
	  "publish KV cache events in vLLM's format on a ZMQ PUB socket, e.g. tcp://*:5557 "
	  "(bound if it has '*' or is ipc://, else connected); empty = off (docs/kv-events.md)" },
	{ "kv-events-topic", NULL, CFG_STR, F(kv_events_topic), "", 0, 0, NULL,
	  "topic frame of every event message (llm-d: kv@<pod-ip:port>@<model>)" },
	{ "kv-events-buffer", NULL, CFG_U32, F(kv_events_buffer), "10000", 1, 1000000, NULL,
	  "event batches kept for replay" },
	{ "kv-events-format", NULL, CFG_ENUM, F(kv_events_format), "map", 0, 0, "map|array",
	  "event encoding inside the positional [ts, events, rank] batch: map = events as "
	  "msgpack maps named by \"type\" (vLLM 0.26 and later); array = positional events "
	  "(earlier vLLM releases, array_like=True)" },
	{ "kv-events-replay-endpoint", NULL, CFG_STR, F(kv_events_replay_endpoint), "", 0, 0,
	  NULL, "ZMQ ROUTER to bind for replay requests (vLLM's protocol); empty = none" },
};

static int parse_u64(const char *s, uint64_t *out, bool bytes)
{
	char *end;
	unsigned long long v;

	if (!*s || *s == '-' || isspace((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	if (bytes && *end) {
		uint64_t mul;

		switch (toupper((unsigned char)*end)) {
		case 'K': mul = KIB; break;
		case 'M': mul = MIB; break;
		case 'G': mul = GIB; break;
		case 'T': mul = TIB; break;
		default: return -EINVAL;
		}
		end++;
		if (*end == 'i' || *end == 'I')
			end++;
		if (*end == 'B' || *end == 'b')
			end++;
		if (v > UINT64_MAX / mul)
			return -EINVAL;
		v *= mul;
	}
	if (*end)
		return -EINVAL;
	*out = v;
	return 0;
}

static int set_opt(struct srv_config *c, const struct cfg_opt *o, const char *val, char *err,
		   size_t errlen)
{
	char *field = (char *)c + o->off;
	uint64_t v;

	switch (o->type) {
	case CFG_STR:
		if (strlen(val) >= o->size) {
			snprintf(err, errlen, "--%s: value longer than %zu bytes", o->name,
				 o->size - 1);
			return -EINVAL;
		}
		memcpy(field, val, strlen(val) + 1);
		return 0;
	case CFG_ENUM: {
		const char *p = o->choices;
		size_t n = strlen(val);

		while (p && *p) {
			const char *bar = strchr(p, '|');
			size_t len = bar ? (size_t)(bar - p) : strlen(p);

			if (len == n && !strncasecmp(p, val, n) && n < o->size) {
				memcpy(field, p, n);
				field[n] = '\0';
				return 0;
			}
			p = bar ? bar + 1 : NULL;
		}
		snprintf(err, errlen, "--%s: '%s' is not one of %s", o->name, val, o->choices);
		return -EINVAL;
	}
	case CFG_U32:
	case CFG_BYTES:
		if (parse_u64(val, &v, o->type == CFG_BYTES) || v < o->min || v > o->max) {
			snprintf(err, errlen, "--%s: '%s' is not %s between %" PRIu64 " and %" PRIu64,
				 o->name, val, o->type == CFG_BYTES ? "a size" : "an integer",
				 o->min, o->max);
			return -EINVAL;
		}
		if (o->type == CFG_U32)
			*(uint32_t *)field = (uint32_t)v;
		else
			*(uint64_t *)field = v;
		return 0;
	}
	return -EINVAL;
}

/* LMCache's --l1-size-gb is a float number of GiB; map it onto pool-size. */
static int set_l1_size_gb(struct srv_config *c, const char *val, char *err, size_t errlen)
{
	char *end;
	double gb;

	errno = 0;
	gb = strtod(val, &end);
	if (errno || end == val || *end || gb < 0.0625 || gb > 4096) {
		snprintf(err, errlen, "--l1-size-gb: '%s' is not a size in GiB between 0.0625 and 4096",
			 val);
		return -EINVAL;
	}
	c->pool_bytes = (uint64_t)(gb * (double)GIB);
	return 0;
}

static const struct cfg_opt *find_opt(const char *name, size_t len)
{
	for (size_t i = 0; i < KS_ARRAY_SIZE(cfg_opts); i++) {
		const struct cfg_opt *o = &cfg_opts[i];

		if ((strlen(o->name) == len && !strncmp(o->name, name, len)) ||
		    (o->alias && strlen(o->alias) == len && !strncmp(o->alias, name, len)))
			return o;
	}
	return NULL;
}

/* Accept LMCache spellings with underscores: --chunk_size == --chunk-size. */
static void dashes(char *s)
{
	for (; *s; s++)
		if (*s == '_')
			*s = '-';
}

static int set_named(struct srv_config *c, const char *name, const char *val, char *err,
		     size_t errlen)
{
	char norm[64];
	const struct cfg_opt *o;

	snprintf(norm, sizeof(norm), "%s", name);
	dashes(norm);
	if (!strcmp(norm, "l1-size-gb"))
		return set_l1_size_gb(c, val, err, errlen);
	o = find_opt(norm, strlen(norm));
	if (!o) {
		snprintf(err, errlen, "unknown option '%s' (see --help)", name);
		return -EINVAL;
	}
	return set_opt(c, o, val, err, errlen);
}

void cfg_defaults(struct srv_config *c)
{
	char err[256];

	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < KS_ARRAY_SIZE(cfg_opts); i++)
		set_opt(c, &cfg_opts[i], cfg_opts[i].def, err, sizeof(err));
}

int cfg_load_file(struct srv_config *c, const char *path, char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	char line[1024];
	int lineno = 0, rc = 0;
	struct stat st;

	if (!f) {
		rc = -errno;
		snprintf(err, errlen, "--config: cannot open %s: %s", path, strerror(errno));
		return rc;
	}
	if (fstat(fileno(f), &st) == 0 && !S_ISREG(st.st_mode)) {
		fclose(f);
		snprintf(err, errlen, "--config: %s is not a regular file", path);
		return -EINVAL;
	}
	while (fgets(line, sizeof(line), f)) {
		char *p = line, *eq, *k, *v, *e;

		lineno++;
		while (isspace((unsigned char)*p))
			p++;
		if (!*p || *p == '#')
			continue;
		eq = strchr(p, '=');
		if (!eq) {
			snprintf(err, errlen, "%s:%d: expected 'key = value'", path, lineno);
			rc = -EINVAL;
			break;
		}
		*eq = '\0';
		k = p;
		v = eq + 1;
		for (e = k + strlen(k); e > k && isspace((unsigned char)e[-1]);)
			*--e = '\0';
		while (isspace((unsigned char)*v))
			v++;
		for (e = v + strlen(v); e > v && isspace((unsigned char)e[-1]);)
			*--e = '\0';
		char msg[256];
		rc = set_named(c, k, v, msg, sizeof(msg));
		if (rc) {
			snprintf(err, errlen, "%s:%d: %s", path, lineno, msg);
			break;
		}
	}
	if (!rc && ferror(f)) {
		rc = -EIO;
		snprintf(err, errlen, "--config: cannot read %s: %s", path, strerror(errno));
	}
	fclose(f);
	return rc;
}

void cfg_print_help(FILE *out, const char *prog)
{
	fprintf(out,
		"Usage: %s [OPTIONS]\n"
		"kvstashd: KV-cache server for LLM inference engines (LMCache MP protocol).\n\n"
		"Options (--name=value or --name value; also 'name = value' lines in --config):\n",
		prog);
	for (size_t i = 0; i < KS_ARRAY_SIZE(cfg_opts); i++) {
		const struct cfg_opt *o = &cfg_opts[i];
		char left[96];

		snprintf(left, sizeof(left), "--%s=%s", o->name,
			 o->type == CFG_ENUM ? o->choices : o->type == CFG_STR ? "STR" :
			 o->type == CFG_BYTES ? "SIZE" : "N");
		fprintf(out, "  %-34s %s (default: %s)\n", left, o->help,
			*o->def ? o->def : "none");
		if (o->alias) {
			snprintf(left, sizeof(left), "--%s=%s", o->alias,
				 o->type == CFG_ENUM ? o->choices : o->type == CFG_STR ? "STR" :
				 o->type == CFG_BYTES ? "SIZE" : "N");
			fprintf(out, "  %-34s alias of --%s (LMCache name)\n", left, o->name);
		}
	}
	fprintf(out, "  %-34s %s\n", "--l1-size-gb=GIB", "LMCache alias: --pool-size in GiB");
	fprintf(out, "  %-34s %s\n", "--config=FILE", "read options from FILE first; flags override it");
	fprintf(out, "  %-34s %s\n", "--print-config", "print the default config file and exit");
	fprintf(out, "  %-34s %s\n", "--print-man", "print the kvstashd(8) man page (roff) and exit");
	fprintf(out, "  %-34s %s\n", "--help", "show this text");
	fprintf(out, "  %-34s %s\n", "--version", "show the version");
}

int cfg_parse_args(struct srv_config *c, int argc, char **argv, FILE *out, char *err,
		   size_t errlen)
{
	int rc;

	/* The config file first, wherever --config appears, so flags override it. */
	for (int i = 1; i < argc; i++) {
		const char *path = NULL;

		if (!strncmp(argv[i], "--config=", 9))
			path = argv[i] + 9;
		else if (!strcmp(argv[i], "--config")) {
			if (i + 1 >= argc) {
				snprintf(err, errlen, "--config: missing file name");
				return -EINVAL;
			}
			path = argv[i + 1];
		}
		if (path) {
			rc = cfg_load_file(c, path, err, errlen);
			if (rc)
				return -EINVAL;
		}
	}
	for (int i = 1; i < argc; i++) {
		char name[64];
		const char *arg = argv[i], *val, *eq;
		size_t len;

		if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
			cfg_print_help(out, argv[0]);
			return 1;
		}
		if (!strcmp(arg, "--version")) {
			fprintf(out, "kvstashd %s\n", KVSTASH_VERSION);
			return 1;
		}
		if (!strcmp(arg, "--print-config")) {
			cfg_print_config(out);
			return 1;
		}
		if (!strcmp(arg, "--print-man")) {
			cfg_print_man(out);
			return 1;
		}
		if (strncmp(arg, "--", 2)) {
			snprintf(err, errlen, "unexpected argument '%s' (options start with --)", arg);
			return -EINVAL;
		}
		arg += 2;
		eq = strchr(arg, '=');
		len = eq ? (size_t)(eq - arg) : strlen(arg);
		if (len >= sizeof(name)) {
			snprintf(err, errlen, "unknown option '--%.40s...'", arg);
			return -EINVAL;
		}
		memcpy(name, arg, len);
		name[len] = '\0';
		if (eq) {
			val = eq + 1;
		} else {
			if (i + 1 >= argc) {
				snprintf(err, errlen, "--%s: missing value", name);
				return -EINVAL;
			}
			val = argv[++i];
		}
		if (!strcmp(name, "config"))
			continue;
		rc = set_named(c, name, val, err, errlen);
		if (rc)
			return rc;
	}
	if (c->chunk_tokens % 8) {
		snprintf(err, errlen, "--chunk-size: %u is not a multiple of 8", c->chunk_tokens);
		return -EINVAL;
	}
	return 0;
}

void cfg_format(const struct srv_config *c, char *buf, size_t len)
{
	size_t n = (size_t)snprintf(buf, len, "config:");

	for (size_t i = 0; i < KS_ARRAY_SIZE(cfg_opts) && n < len; i++) {
		const struct cfg_opt *o = &cfg_opts[i];
		const char *field = (const char *)c + o->off;

		switch (o->type) {
		case CFG_STR:
		case CFG_ENUM:
			if (o->off == offsetof(struct srv_config, redis_url)) {
				/* a password in the URL never reaches a log line */
				char shown[sizeof(c->redis_url) + 256];

				tier_redis_redact_url(field, shown, sizeof(shown));
				n += (size_t)snprintf(buf + n, len - n, " %s=%s", o->name, shown);
				break;
			}
			n += (size_t)snprintf(buf + n, len - n, " %s=%s", o->name, field);
			break;
		case CFG_U32:
			n += (size_t)snprintf(buf + n, len - n, " %s=%u", o->name,
					      *(const uint32_t *)field);
			break;
		case CFG_BYTES:
			n += (size_t)snprintf(buf + n, len - n, " %s=%" PRIu64, o->name,
					      *(const uint64_t *)field);
			break;
		}
	}
}

void cfg_endpoint(const struct srv_config *c, char *buf, size_t len)
{
	if (c->listen[0])
		snprintf(buf, len, "%s", c->listen);
	else if (strchr(c->host, ':'))
		snprintf(buf, len, "tcp://[%s]:%u", c->host, c->port);
	else
		snprintf(buf, len, "tcp://%s:%u", c->host, c->port);
}

static const char *opt_metavar(const struct cfg_opt *o)
{
	return o->type == CFG_ENUM ? o->choices : o->type == CFG_STR ? "STR" :
	       o->type == CFG_BYTES ? "SIZE" : "N";
}

/* Write @s wrapped at ~76 columns, each line starting with @prefix. */
static void put_wrapped(FILE *out, const char *prefix, const char *s)
{
	size_t col = 0;

	while (*s) {
		size_t w = strcspn(s, " ");

		if (col && col + 1 + w > 76) {
			fputc('\n', out);
			col = 0;
		}
		if (!col)
			col = (size_t)fprintf(out, "%s", prefix);
		else
			col += (size_t)fprintf(out, " ");
		col += fwrite(s, 1, w, out);
		s += w;
		while (*s == ' ')
			s++;
	}
	if (col)
		fputc('\n', out);
}

void cfg_print_config(FILE *out)
{
	fprintf(out,
		"# kvstashd.conf - configuration of kvstashd %s (kvstashd --config FILE).\n"
		"# Every option of kvstashd(8) is listed below, commented out, with its\n"
		"# default; uncomment a line to change it. One 'name = value' per line;\n"
		"# a command-line flag overrides the same option here.\n"
		"# Generated by kvstashd --print-config.\n",
		KVSTASH_VERSION);
	for (size_t i = 0; i < KS_ARRAY_SIZE(cfg_opts); i++) {
		const struct cfg_opt *o = &cfg_opts[i];

		fputc('\n', out);
		put_wrapped(out, "# ", o->help);
		if (o->type == CFG_ENUM)
			fprintf(out, "# One of: %s\n", o->choices);
		fprintf(out, "#%s =%s%s\n", o->name, *o->def ? " " : "", o->def);
	}
}

/* roff text: escape backslashes and dashes, keep a line from starting with '.' or '\''. */
static void roff_puts(FILE *out, const char *s)
{
	if (*s == '.' || *s == '\'')
		fputs("\\&", out);
	for (; *s; s++) {
		if (*s == '\\')
			fputs("\\e", out);
		else if (*s == '-')
			fputs("\\-", out);
		else
			fputc(*s, out);
	}
}

void cfg_print_man(FILE *out)
{
	fprintf(out,
		".\\\" Generated by kvstashd --print-man from kvstashd's option table.\n"
		".TH KVSTASHD 8 \"\" \"kvstash %s\" \"System Administration\"\n"
		".SH NAME\n"
		"kvstashd \\- KV\\-cache server for LLM inference engines\n"
		".SH SYNOPSIS\n"
		".B kvstashd\n"
		"[\\fB\\-\\-config\\fR \\fIFILE\\fR] [\\fIOPTION\\fR...]\n"
		".SH DESCRIPTION\n"
		"kvstashd keeps the attention KV\\-cache chunks of LLM inference engines\n"
		"(vLLM and others speaking LMCache's multiprocess protocol over ZeroMQ) in a\n"
		"host\\-memory pool, with optional disk and Redis tiers, so that a repeated\n"
		"prompt prefix is copied back instead of recomputed.\n"
		".PP\n"
		"Every option is given as \\fB\\-\\-name\\fR=\\fIvalue\\fR or\n"
		"\\fB\\-\\-name\\fR \\fIvalue\\fR on the command line, or as a\n"
		"\\fIname\\fR = \\fIvalue\\fR line in the file named by \\fB\\-\\-config\\fR,\n"
		"which is read first; flags override it.\n"
		".SH OPTIONS\n",
		KVSTASH_VERSION);
	for (size_t i = 0; i < KS_ARRAY_SIZE(cfg_opts); i++) {
		const struct cfg_opt *o = &cfg_opts[i];

		fputs(".TP\n\\fB", out);
		roff_puts(out, "--");
		roff_puts(out, o->name);
		fputs("\\fR=\\fI", out);
		roff_puts(out, opt_metavar(o));
		fputs("\\fR\n", out);
		roff_puts(out, o->help);
		fputs(" (default: ", out);
		roff_puts(out, *o->def ? o->def : "none");
		fputs(")", out);
		if (o->alias) {
			fputs("; LMCache name: \\fB", out);
			roff_puts(out, "--");
			roff_puts(out, o->alias);
			fputs("\\fR", out);
		}
		fputs(".\n", out);
	}
	fputs(".TP\n\\fB\\-\\-l1\\-size\\-gb\\fR=\\fIGIB\\fR\n"
	      "LMCache alias: \\fB\\-\\-pool\\-size\\fR in GiB.\n"
	      ".TP\n\\fB\\-\\-config\\fR=\\fIFILE\\fR\n"
	      "Read options from \\fIFILE\\fR first; flags override it.\n"
	      ".TP\n\\fB\\-\\-help\\fR\nShow the options and exit.\n"
	      ".TP\n\\fB\\-\\-version\\fR\nShow the version and exit.\n"
	      ".SH FILES\n"
	      ".TP\n.I /etc/kvstash/kvstashd.conf\n"
	      "The configuration read by kvstashd.service: every option above, commented\n"
	      "out, with its default.\n"
	      ".TP\n.I /lib/systemd/system/kvstashd.service\n"
	      "The systemd unit; change it with \\fBsystemctl edit kvstashd\\fR.\n"
	      ".SH EXIT STATUS\n"
	      "0 after a clean stop (SIGTERM, SIGINT); 1 when the server cannot start;\n"
	      "2 for a bad option or configuration line.\n"
	      ".SH SEE ALSO\n"
	      ".BR kvstash (1)\n", out);
}
