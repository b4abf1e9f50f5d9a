/*
 * Description: CURVE: with --curve-secret-key-file and
 * --curve-allowed-clients only a client holding a listed key pair (and the
 * server's public key) gets answers; a plain client, a client with an
 * unlisted key and one with the wrong server key time out; a bad key file is
 * refused at start. Labels: unit
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include "helpers.h"
#include "kvstash.h"

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	REQUIRE(f);
	fputs(text, f);
	fclose(f);
}

/* PING through a client with the given keys (NULL = plain). */
static int ping_with(const char *ep, const char *srv_pub, const char *pub, const char *sec)
{
	kvstash_client *c;
	double rtt;
	int rc;

	REQUIRE(kvstash_connect(ep, 700, &c) == 0);
	if (srv_pub)
		REQUIRE(kvstash_set_curve(c, srv_pub, pub, sec) == 0);
	rc = kvstash_ping(c, &rtt);
	kvstash_close(c);
	return rc;
}

int main(void)
{
	char srv_pub[41], srv_sec[41], cli_pub[41], cli_sec[41], other_pub[41], other_sec[41];
	char *dir = t_mkdtemp("curve");
	char secret_path[512], allowed_path[512], text[256];

	if (!zmq_has("curve")) {
		fprintf(stderr, "libzmq without CURVE\n");
		return T_EXIT_FAIL;	/* Debian's libzmq has it: its absence is a failure */
	}
	REQUIRE(dir);
	REQUIRE(kvstash_curve_keypair(srv_pub, srv_sec) == 0);
	REQUIRE(kvstash_curve_keypair(cli_pub, cli_sec) == 0);
	REQUIRE(kvstash_curve_keypair(other_pub, other_sec) == 0);
	snprintf(secret_path, sizeof(secret_path), "%s/server.secret", dir);
	snprintf(allowed_path, sizeof(allowed_path), "%s/allowed", dir);
	snprintf(text, sizeof(text), "%s\n", srv_sec);
	write_file(secret_path, text);
	snprintf(text, sizeof(text), "# engines allowed to use the cache\n%s\n", cli_pub);
	write_file(allowed_path, text);

	/* Allowed list: only cli_* gets in. t_daemon_start waits for a plain
	 * PING, which CURVE refuses, so the daemon is started by hand. */
	{
		char ep[600], listen[700];
		char *dir2 = t_mkdtemp("curve-d");
		pid_t pid;
		int status;

		REQUIRE(dir2);
		snprintf(ep, sizeof(ep), "ipc://%s/sock", dir2);
		snprintf(listen, sizeof(listen), "--listen=%s", ep);
		pid = fork();
		if (pid == 0) {
			char sk[600], al[600];

			snprintf(sk, sizeof(sk), "--curve-secret-key-file=%s", secret_path);
			snprintf(al, sizeof(al), "--curve-allowed-clients=%s", allowed_path);
			execl(t_build_path("kvstashd"), "kvstashd", listen, "--pool-size=64M", sk, al,
			      "--http-port=0", (char *)NULL);
			_exit(127);
		}
		int rc = -1;
		for (int i = 0; i < 50 && rc; i++)
			rc = ping_with(ep, srv_pub, cli_pub, cli_sec);
		CHECK_EQ(rc, 0);
		CHECK_EQ(ping_with(ep, NULL, NULL, NULL), -ETIMEDOUT);
		CHECK_EQ(ping_with(ep, srv_pub, other_pub, other_sec), -ETIMEDOUT);
		CHECK_EQ(ping_with(ep, other_pub, cli_pub, cli_sec), -ETIMEDOUT);
		CHECK_EQ(ping_with(ep, srv_pub, cli_pub, cli_sec), 0);
		kill(pid, SIGTERM);
		waitpid(pid, &status, 0);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);

		/* A key file without a key is refused at start with exit status 1. */
		write_file(secret_path, "not a key\n");
		pid = fork();
		if (pid == 0) {
			char sk[600];
			int fd = open("/dev/null", 1);

			dup2(fd, 2);
			snprintf(sk, sizeof(sk), "--curve-secret-key-file=%s", secret_path);
			execl(t_build_path("kvstashd"), "kvstashd", listen, "--pool-size=64M", sk,
			      "--http-port=0", (char *)NULL);
			_exit(127);
		}
		waitpid(pid, &status, 0);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 1);
		t_rmtree(dir2);
		free(dir2);
	}
	t_rmtree(dir);
	free(dir);
	return t_result("curve");
}
