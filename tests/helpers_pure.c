/*
 * helpers_pure.c - test helpers on libc alone: checks, patterned buffers,
 * temp directories, build paths. scripts/gpu_build.sh compiles it as is for
 * the GPU test on a machine without kvstash's libraries.
 */
#include "helpers.h"

#include <ftw.h>
#include <string.h>
#include <sys/stat.h>

/* Where the built programs are when KVSTASH_BUILD_DIR is unset (CMake's build dir). */
#ifndef KS_BUILD_DIR
#define KS_BUILD_DIR "."
#endif

int t_failures;

int t_result(const char *test_name)
{
	if (t_failures) {
		fprintf(stderr, "%s: %d check(s) failed\n", test_name, t_failures);
		return T_EXIT_FAIL;
	}
	fprintf(stderr, "%s: ok\n", test_name);
	return T_EXIT_PASS;
}

static inline uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

void t_fill(void *buf, size_t n, uint64_t seed)
{
	uint8_t *p = buf;
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		uint64_t v = splitmix64(seed ^ (i * 0x100000001b3ull));

		memcpy(p + i, &v, 8);
	}
	if (i < n) {
		uint64_t v = splitmix64(seed ^ (i * 0x100000001b3ull));

		memcpy(p + i, &v, n - i);
	}
}

size_t t_verify(const void *buf, size_t n, uint64_t seed)
{
	const uint8_t *p = buf;

	for (size_t i = 0; i < n; i += 8) {
		uint64_t v = splitmix64(seed ^ (i * 0x100000001b3ull));
		size_t m = n - i < 8 ? n - i : 8;

		if (memcmp(p + i, &v, m)) {
			for (size_t j = 0; j < m; j++)
				if (p[i + j] != ((uint8_t *)&v)[j])
					return i + j;
		}
	}
	return (size_t)-1;
}

char *t_mkdtemp(const char *tag)
{
	const char *tmp = getenv("TMPDIR");
	char *path;

	if (!tmp || !*tmp)
		tmp = "/tmp";
	if (asprintf(&path, "%s/kvstash-%s-XXXXXX", tmp, tag) < 0)
		return NULL;
	if (!mkdtemp(path)) {
		free(path);
		return NULL;
	}
	return path;
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

void t_rmtree(const char *path)
{
	if (path)
		nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

const char *t_build_path(const char *rel)
{
	static char buf[1024];
	const char *dir = getenv("KVSTASH_BUILD_DIR");

	if (!dir || !*dir)
		dir = KS_BUILD_DIR;
	snprintf(buf, sizeof(buf), "%s/%s", dir, rel);
	return buf;
}
