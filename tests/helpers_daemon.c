/*
 * helpers_daemon.c - a real kvstashd process per test (t_daemon_*), and the
 * ZMQ PING that says it is up.
 */
#include "helpers.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

/* One PING over a fresh DEALER; true if it was answered within @timeout_ms. */
static bool ping_once(const char *endpoint, int timeout_ms)
{
	void *ctx = zmq_ctx_new();
	void *s = zmq_socket(ctx, ZMQ_DEALER);
	int linger = 0;
	bool ok = false;
	uint8_t uid = 0x00, type = 0x0c, buf[64];

	zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
	zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));
	if (zmq_connect(s, endpoint) == 0 && zmq_send(s, &uid, 1, ZMQ_SNDMORE) == 1 &&
	    zmq_send(s, &type, 1, 0) == 1) {
		int more = 1, frames = 0;
		size_t sz = sizeof(more);

		while (more) {
			if (zmq_recv(s, buf, sizeof(buf), 0) < 0)
				break;
			frames++;
			zmq_getsockopt(s, ZMQ_RCVMORE, &more, &sz);
		}
		ok = frames == 3 && buf[0] == 0xc3;
	}
	zmq_close(s);
	zmq_ctx_term(ctx);
	return ok;
}

struct t_daemon *t_daemon_start(const char *args)
{
	struct t_daemon *d = calloc(1, sizeof(*d));
	char *argv[64];
	char *argbuf = NULL;
	int argc = 0;

	if (!d)
		return NULL;
	d->dir = t_mkdtemp("daemon");
	if (!d->dir)
		goto out_free;
	snprintf(d->endpoint, sizeof(d->endpoint), "ipc://%s/sock", d->dir);
	/* A test that picks its own endpoint (--listen=tcp://...) is pinged there. */
	const char *listen = args ? strstr(args, "--listen=") : NULL;

	if (listen) {
		size_t n = strcspn(listen + 9, " ");

		snprintf(d->endpoint, sizeof(d->endpoint), "%.*s", (int)n, listen + 9);
	}
	snprintf(d->log_path, sizeof(d->log_path), "%s/kvstashd.log", d->dir);

	static char bind_arg[600];
	snprintf(bind_arg, sizeof(bind_arg), "--listen=%s", d->endpoint);
	argv[argc++] = (char *)t_build_path("kvstashd");
	argv[0] = strdup(argv[0]);
	if (!listen)
		argv[argc++] = bind_arg;
	/* No HTTP endpoint unless a test asks: tests run in parallel. */
	argv[argc++] = "--http-port=0";
	if (args) {
		argbuf = strdup(args);
		for (char *tok = strtok(argbuf, " "); tok && argc < 62; tok = strtok(NULL, " "))
			argv[argc++] = tok;
	}
	argv[argc] = NULL;

	d->pid = fork();
	if (d->pid < 0)
		goto out_free;
	if (d->pid == 0) {
		int fd = open(d->log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		if (fd >= 0) {
			dup2(fd, STDOUT_FILENO);
			dup2(fd, STDERR_FILENO);
			close(fd);
		}
		execv(argv[0], argv);
		_exit(127);
	}
	free(argbuf);
	free(argv[0]);
	for (int i = 0; i < 100; i++) {
		int st;

		if (waitpid(d->pid, &st, WNOHANG) == d->pid) {
			fprintf(stderr, "kvstashd exited at start (status %d)\n", st);
			d->pid = 0;
			t_daemon_dump_log(d);
			goto out_free;
		}
		if (ping_once(d->endpoint, 100))
			return d;
	}
	fprintf(stderr, "kvstashd did not answer PING within 10 s\n");
	t_daemon_stop(d);
	return NULL;
out_free:
	if (d->dir)
		t_rmtree(d->dir);
	free(d->dir);
	free(d);
	return NULL;
}

int t_daemon_stop(struct t_daemon *d)
{
	int status = -1;

	if (!d)
		return -1;
	if (d->pid <= 0)
		status = 0;	/* already reaped by the caller */
	else {
		kill(d->pid, SIGTERM);
		for (int i = 0; i < 1000; i++) {
			if (waitpid(d->pid, &status, WNOHANG) == d->pid)
				goto reaped;
			usleep(10000);
		}
		fprintf(stderr, "kvstashd did not exit within 10 s of SIGTERM; killing\n");
		kill(d->pid, SIGKILL);
		waitpid(d->pid, &status, 0);
	}
reaped:
	if (status != 0 || getenv("KVSTASH_TEST_DUMP_LOG"))
		t_daemon_dump_log(d);
	t_rmtree(d->dir);
	free(d->dir);
	free(d);
	return status;
}

void t_daemon_dump_log(const struct t_daemon *d)
{
	char line[1024];
	FILE *f = fopen(d->log_path, "r");

	if (!f)
		return;
	fprintf(stderr, "---- kvstashd log (%s) ----\n", d->log_path);
	while (fgets(line, sizeof(line), f))
		fputs(line, stderr);
	fprintf(stderr, "---- end of log ----\n");
	fclose(f);
}
