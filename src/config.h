/*
 * config.h - kvstashd's configuration: one table (config.c) from which the
 * flags, the config file, --help, validation and the startup "config:" log
 * line all come, so they cannot drift apart.
 */
#ifndef KS_CONFIG_H
#define KS_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct srv_config {
	char listen[512];	/* ZMQ endpoint; empty = tcp://host:port */
	char host[256];
	uint32_t port;
	uint32_t chunk_tokens;
	uint64_t pool_bytes;
	uint32_t workers;
	uint32_t queue_depth;
	uint32_t shards;
	uint32_t read_ttl_s;
	uint32_t write_ttl_s;
	uint32_t session_ttl_s;
	uint32_t client_timeout_s;
	uint32_t registration_grace_s;
	uint32_t max_message_mb;
	uint32_t lock_timeout_ms;
	uint32_t transfer_timeout_ms;
	uint32_t evict_watermark_pct;
	char log_level[16];
	char log_format[16];
	char cuda[8];
	char owner_check[8];
	char io_priority[16];	/* realtime | nice | normal: the io and libzmq I/O threads */
	char busy_poll[8];	/* auto | on | off: GPU workers and io thread poll, not sleep */
	char protocol[16];	/* auto | march | current: the wire dialect(s) served */
	char state_dir[512];	/* --state-dir: warm restart state (warm.c); empty = off */
	char disk_path[512];
	uint32_t disk_size_gb;
	char redis_url[1024];
	char redis_prefix[64];
	uint32_t redis_ttl_s;
	char redis_user[256];		/* ACL user for AUTH; "" = default user */
	char redis_password_file[512];	/* first line = AUTH password; "" = none */
	char curve_secret_key_file[512];
	char curve_allowed_clients[512];
	char http_host[256];	/* HTTP endpoint (/metrics, /healthz, /stats) */
	uint32_t http_port;	/* 0 = no HTTP endpoint */
	char kv_events_endpoint[512];	/* ZMQ PUB for KV cache events; empty = off */
	char kv_events_replay_endpoint[512];	/* ROUTER for replay; empty = none */
	char kv_events_topic[256];
	uint32_t kv_events_buffer;	/* batches kept for replay */
	char kv_events_format[8];	/* map | array: vLLM msgspec encodings (docs/kv-events.md) */
};

/* Fill @c with every option's default. */
void cfg_defaults(struct srv_config *c);

/*
 * Parse argv (--name=value, --name value, LMCache aliases, --config FILE
 * read first wherever it appears, so flags override the file). Returns 0,
 * 1 when --help or --version was printed to @out, or -EINVAL with a message
 * naming the flag in @err.
 */
int cfg_parse_args(struct srv_config *c, int argc, char **argv, FILE *out, char *err,
		   size_t errlen);
/* Read "key = value" lines ('#' comments). 0, -errno, or -EINVAL with @err. */
int cfg_load_file(struct srv_config *c, const char *path, char *err, size_t errlen);
/* Print --help from the table. */
void cfg_print_help(FILE *out, const char *prog);
/* The default config file (every option commented, with its default): --print-config. */
void cfg_print_config(FILE *out);
/* The kvstashd(8) man page in roff: --print-man. */
void cfg_print_man(FILE *out);
/* One "config: k=v k=v ..." line, for the startup log. */
void cfg_format(const struct srv_config *c, char *buf, size_t len);
/* The endpoint to bind: listen, or tcp://host:port. */
void cfg_endpoint(const struct srv_config *c, char *buf, size_t len);

#endif /* KS_CONFIG_H */
