/*
 * tests/redis_fixture.c - see redis_fixture.h. Every server started is
 * remembered in a small table; an atexit handler and handlers for the fatal
 * signals kill what is left (a failed REQUIRE exits, a crash raises), and
 * only async-signal-safe calls run in the signal handler.
 */
#include "redis_fixture.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static volatile pid_t spawned[32];

static void kill_spawned(void)
{
	for (size_t i = 0; i < sizeof(spawned) / sizeof(spawned[0]); i++)
		if (spawned[i] > 0) {
			kill(spawned[i], SIGKILL);
			waitpid(spawned[i], NULL, 0);
			spawned[i] = 0;
		}
}

static void on_fatal(int sig)
{
	for (size_t i = 0; i < sizeof(spawned) / sizeof(spawned[0]); i++)
		if (spawned[i] > 0)
			kill(spawned[i], SIGKILL);
	signal(sig, SIG_DFL);
	raise(sig);
}

static void track(pid_t pid, bool add)
{
	static bool hooked;

	if (add && !hooked) {
		static const int fatal[] = { SIGABRT, SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIGTERM,
					     SIGINT };

		hooked = true;
		atexit(kill_spawned);
		for (size_t i = 0; i < sizeof(fatal) / sizeof(fatal[0]); i++)
			signal(fatal[i], on_fatal);
	}
	for (size_t i = 0; i < sizeof(spawned) / sizeof(spawned[0]); i++)
		if (add ? spawned[i] <= 0 : spawned[i] == pid) {
			spawned[i] = add ? pid : 0;
			return;
		}
}

bool t_redis_available(void)
{
	const char *path = getenv("PATH");
	char buf[4096], *save = NULL;

	snprintf(buf, sizeof(buf), "%s", path ? path : "/usr/bin:/bin");
	for (char *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
		char exe[4200];

		snprintf(exe, sizeof(exe), "%s/redis-server", d);
		if (!access(exe, X_OK))
			return true;
	}
	return false;
}

static bool port_free(int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
				 .sin_port = htons((uint16_t)port) };
	int s = socket(AF_INET, SOCK_STREAM, 0);
	bool ok = s >= 0 && !bind(s, (struct sockaddr *)&a, sizeof(a));

	if (s >= 0)
		close(s);
	return ok;
}

/* Below the ephemeral range (no clash with outgoing connections), starting
 * at a place of this process's own so parallel tests rarely race. */
int t_redis_free_port(void)
{
	static int next;

	if (!next)
		next = 20000 + (int)((unsigned)getpid() * 7919u % 9000u);
	for (int tries = 0; tries < 9000; tries++) {
		int p = next++;

		if (next >= 30000)
			next = 20000;
		if (port_free(p) && port_free(p + 10000))
			return p;
	}
	return -1;
}

redisContext *t_redis_connect(int port, const char *password)
{
	struct timeval tv = { 2, 0 };
	redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);

	if (c && c->err) {
		redisFree(c);
		return NULL;
	}
	if (c)
		redisSetTimeout(c, tv);
	if (c && password)
		freeReplyObject(redisCommand(c, "AUTH %s", password));
	return c;
}

static bool answers_ping(int port, const char *password)
{
	redisContext *c = t_redis_connect(port, password);
	redisReply *r = c ? redisCommand(c, "PING") : NULL;
	bool ok = r && r->type == REDIS_REPLY_STATUS;

	freeReplyObject(r);
	if (c)
		redisFree(c);
	return ok;
}

int t_redis_start(struct t_redis *s, const struct t_redis_opts *o)
{
	static const struct t_redis_opts none;
	char port[16], conf[600];
	char *argv[32];
	int a = 0;
	posix_spawn_file_actions_t fa;

	if (!o)
		o = &none;
	s->pid = 0;
	if (s->port <= 0)
		s->port = t_redis_free_port();
	if (s->port < 0)
		return -1;
	snprintf(port, sizeof(port), "%d", s->port);
	snprintf(s->url, sizeof(s->url), "redis://127.0.0.1:%d", s->port);
	argv[a++] = "redis-server";
	argv[a++] = "--port";
	argv[a++] = port;
	argv[a++] = "--bind";
	argv[a++] = "127.0.0.1";
	argv[a++] = "--save";
	argv[a++] = "";
	argv[a++] = "--appendonly";
	argv[a++] = "no";
	argv[a++] = "--daemonize";
	argv[a++] = "no";
	argv[a++] = "--loglevel";
	argv[a++] = "warning";
	if (o->dir) {
		argv[a++] = "--dir";
		argv[a++] = (char *)o->dir;
	}
	if (o->cluster) {
		snprintf(conf, sizeof(conf), "%s/nodes-%d.conf", o->dir ? o->dir : ".", s->port);
		argv[a++] = "--cluster-enabled";
		argv[a++] = "yes";
		argv[a++] = "--cluster-config-file";
		argv[a++] = conf;
		/* generous: no spurious failover on a loaded machine; tests
		 * promote replicas themselves (CLUSTER FAILOVER TAKEOVER) */
		argv[a++] = "--cluster-node-timeout";
		argv[a++] = "15000";
	}
	if (o->extra_flag) {
		argv[a++] = (char *)o->extra_flag;
		argv[a++] = (char *)o->extra_value;
	}
	argv[a] = NULL;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
	if (posix_spawnp(&s->pid, "redis-server", &fa, NULL, argv, environ)) {
		posix_spawn_file_actions_destroy(&fa);
		s->pid = 0;
		return -1;
	}
	posix_spawn_file_actions_destroy(&fa);
	track(s->pid, true);
	for (int i = 0; i < 1000; i++) {	/* 10 s */
		if (answers_ping(s->port, o->password))
			return 0;
		if (waitpid(s->pid, NULL, WNOHANG) == s->pid) {	/* exited: bad flags */
			track(s->pid, false);
			s->pid = 0;
			return -1;
		}
		usleep(10000);
	}
	t_redis_kill(s);
	return -1;
}

void t_redis_kill(struct t_redis *s)
{
	if (s->pid > 0) {
		kill(s->pid, SIGKILL);
		waitpid(s->pid, NULL, 0);
		track(s->pid, false);
	}
	s->pid = 0;
}
