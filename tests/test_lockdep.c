/*
 * Description: the lock-order checker aborts, naming both locks, when a
 * thread takes a lock whose rank is not below the ones it holds, and when a
 * blocking call is made with a lock held; the documented order passes.
 * Built with KS_LOCKDEP in every build type. Labels: unit
 */
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers.h"
#include "lock.h"

#ifndef KS_LOCKDEP
#error "test_lockdep must be compiled with KS_LOCKDEP"
#endif

/* Run @fn in a child with stderr captured; returns its wait status and output. */
static int run_child(void (*fn)(void), char *out, size_t cap)
{
	int pfd[2], status = 0;
	ssize_t n, total = 0;
	pid_t pid;

	REQUIRE(pipe(pfd) == 0);
	pid = fork();
	REQUIRE(pid >= 0);
	if (pid == 0) {
		dup2(pfd[1], STDERR_FILENO);
		close(pfd[0]);
		signal(SIGABRT, SIG_DFL);
		fn();
		_exit(0);
	}
	close(pfd[1]);
	while ((n = read(pfd[0], out + total, cap - 1 - (size_t)total)) > 0)
		total += n;
	out[total] = '\0';
	close(pfd[0]);
	waitpid(pid, &status, 0);
	return status;
}

static struct ks_mutex shard, lru, pool, shard2;

static void init_locks(void)
{
	REQUIRE(ks_mutex_init(&shard, LOCK_RANK_IDX_SHARD, "idx shard") == 0);
	REQUIRE(ks_mutex_init(&lru, LOCK_RANK_LRU, "lru") == 0);
	REQUIRE(ks_mutex_init(&pool, LOCK_RANK_POOL, "pool free") == 0);
	REQUIRE(ks_mutex_init(&shard2, LOCK_RANK_IDX_SHARD, "idx shard 2") == 0);
}

static void in_order(void)
{
	REQUIRE(ks_lock(&shard) == 0);
	REQUIRE(ks_lock(&lru) == 0);
	REQUIRE(ks_lock(&pool) == 0);
	ks_unlock(&pool);
	ks_unlock(&lru);
	ks_unlock(&shard);
	ks_assert_unlocked();
}

/* Deliberately wrong: the analysis would (rightly) reject these at compile time. */
static void inverted(void) NO_THREAD_SAFETY_ANALYSIS
{
	REQUIRE(ks_lock(&lru) == 0);
	(void)ks_lock(&shard);	/* shard ranks above lru: must abort here */
}

static void two_shards(void) NO_THREAD_SAFETY_ANALYSIS
{
	REQUIRE(ks_lock(&shard) == 0);
	(void)ks_lock(&shard2);	/* same rank: never two shards at once */
}

static void blocking_with_lock(void) NO_THREAD_SAFETY_ANALYSIS
{
	REQUIRE(ks_lock(&pool) == 0);
	ks_assert_unlocked();	/* a blocking call would follow */
}

static void trylock_against_order(void)
{
	/* The eviction walker's pattern: lru held, shard only by trylock. */
	REQUIRE(ks_lock(&lru) == 0);
	REQUIRE(ks_trylock(&shard) == 0);
	ks_unlock(&shard);
	ks_unlock(&lru);
}

int main(void)
{
	char out[4096];
	int st;

	init_locks();
	st = run_child(in_order, out, sizeof(out));
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);

	st = run_child(inverted, out, sizeof(out));
	CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
	CHECK(strstr(out, "lock order violation") != NULL);
	CHECK(strstr(out, "'idx shard'") != NULL && strstr(out, "'lru'") != NULL);

	st = run_child(two_shards, out, sizeof(out));
	CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
	CHECK(strstr(out, "'idx shard 2'") != NULL);

	st = run_child(blocking_with_lock, out, sizeof(out));
	CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
	CHECK(strstr(out, "blocking call while holding 'pool free'") != NULL);

	st = run_child(trylock_against_order, out, sizeof(out));
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	return t_result("lockdep");
}
