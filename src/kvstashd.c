/*
 * kvstashd.c - main(): configuration, logging, signals, the server loop.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "config.h"
#include "fault.h"
#include "http.h"
#include "lock.h"
#include "log.h"
#include "server.h"

static struct srv *the_server;

static void on_stop_signal(int sig)
{
	(void)sig;
	if (the_server)
		srv_request_stop(the_server);
}

/* Log "config: k=v ..." over as many lines as it takes, split between options. */
static void log_config_line(const char *line)
{
	const size_t max = 360;	/* well inside one log line */
	const char *p = line + (strncmp(line, "config:", 7) ? 0 : 7);

	while (*p) {
		size_t n = strlen(p);

		if (n > max) {
			n = max;
			while (n > 0 && p[n] != ' ')
				n--;
			if (n == 0)
				n = max;
		}
		log_info("config:%.*s", (int)n, p);
		p += n;
	}
}

int main(int argc, char **argv)
{
	struct srv_config cfg;
	struct sigaction sa;
	struct http *http = NULL;
	char err[512], line[2048];
	int rc;

	cfg_defaults(&cfg);
	rc = cfg_parse_args(&cfg, argc, argv, stdout, err, sizeof(err));
	if (rc == 1)
		return 0;
	if (rc) {
		fprintf(stderr, "kvstashd: %s\n", err);
		return 2;
	}
	ks_lock_set_default_timeout_ms(cfg.lock_timeout_ms);
	log_set_level((enum log_level)log_level_parse(cfg.log_level));
	log_set_format(strcmp(cfg.log_format, "json") ? LOG_FORMAT_TEXT : LOG_FORMAT_JSON);
	rc = log_start();
	if (rc) {
		fprintf(stderr, "kvstashd: cannot start the logger: %s\n", strerror(-rc));
		return 1;
	}
	cfg_format(&cfg, line, sizeof(line));
	log_config_line(line);
	rc = ks_fault_configure(getenv(KS_FAULT_ENV), err, sizeof(err));
	if (rc) {
		log_error("startup failed: %s=%s", KS_FAULT_ENV, err);
		log_stop();
		return 2;
	}
	if (getenv(KS_FAULT_ENV) && *getenv(KS_FAULT_ENV))
		log_warn("fault injection armed: %s=%s", KS_FAULT_ENV, getenv(KS_FAULT_ENV));

	/* A client vanishing mid-reply must not kill us; ZMQ reports it as an error. */
	signal(SIGPIPE, SIG_IGN);
	rc = srv_create(&cfg, &the_server);
	if (rc) {
		log_error("startup failed: %s", strerror(-rc));
		log_stop();
		return 1;
	}
	if (cfg.http_port) {
		rc = http_start(cfg.http_host, (uint16_t)cfg.http_port, the_server, &http);
		if (rc) {
			log_error("startup failed: http endpoint %s:%u: %s", cfg.http_host,
				  cfg.http_port, strerror(-rc));
			srv_destroy(the_server);
			log_stop();
			return 1;
		}
		log_info("http: serving http://%s%s%s:%u/metrics, /healthz, /stats",
			 strchr(cfg.http_host, ':') ? "[" : "", cfg.http_host,
			 strchr(cfg.http_host, ':') ? "]" : "", http_port(http));
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_stop_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	srv_run(the_server);
	http_stop(http);
	srv_destroy(the_server);
	the_server = NULL;
	log_stop();
	return 0;
}
