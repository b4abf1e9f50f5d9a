/*
 * tests/redis_fixture.h - a real redis-server for the tests and benchmarks:
 * started on a free loopback port (whose cluster bus port, +10000, is free
 * too), answering PING before t_redis_start returns, and killed by
 * t_redis_kill, at exit or on a fatal signal, so that no server outlives the
 * program that started it. Self-contained (hiredis and libc only), so a
 * benchmark can link it without the test helpers.
 */
#ifndef KVSTASH_TESTS_REDIS_FIXTURE_H
#define KVSTASH_TESTS_REDIS_FIXTURE_H

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <sys/types.h>

struct t_redis {
	pid_t pid;	/* 0 when not running */
	int port;
	char url[64];	/* redis://127.0.0.1:PORT */
};

struct t_redis_opts {
	const char *dir;	/* --dir: node file, dumps; NULL: the working directory */
	bool cluster;		/* --cluster-enabled, node file DIR/nodes-PORT.conf */
	const char *extra_flag;	/* one more "--flag value" pair, or NULL */
	const char *extra_value;
	const char *password;	/* AUTH sent by the readiness check, or NULL */
};

/* True when redis-server is on PATH. */
bool t_redis_available(void);

/* A free loopback port whose +10000 is free too, never handed out before by
 * this process; -1 when none is. */
int t_redis_free_port(void);

/* Starts a redis-server (@o may be NULL) on @s->port when it is set (a
 * restart on the same port: zero-initialise a new one), else on a free one,
 * and waits up to 10 s until it answers PING; 0, or -1 (nothing left
 * running). */
int t_redis_start(struct t_redis *s, const struct t_redis_opts *o);

/* SIGKILL and reap; no-op when not running. */
void t_redis_kill(struct t_redis *s);

/* A connection to 127.0.0.1:@port with 2 s timeouts, AUTH @password first
 * when given; NULL when it cannot connect. */
redisContext *t_redis_connect(int port, const char *password);

#endif
