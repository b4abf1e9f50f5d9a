/*
 * compiler.h - small portable helpers shared by every kvstash source file.
 *
 * Clang thread-safety annotations live in lock.h; this file holds only
 * macros with no dependencies so that containers (list.h, lru.c) can use it.
 */
#ifndef KS_COMPILER_H
#define KS_COMPILER_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define KS_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ks_likely(x) __builtin_expect(!!(x), 1)
#define ks_unlikely(x) __builtin_expect(!!(x), 0)
#define KS_UNUSED __attribute__((unused))
#define KS_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* One step of a busy-wait loop: tells the core (and a hypervisor) it spins. */
#if defined(__x86_64__) || defined(__i386__)
#define ks_cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define ks_cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define ks_cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif
#define KS_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KS_MAX(a, b) ((a) > (b) ? (a) : (b))

/* Round @x up to a multiple of @align (a power of two). */
static inline size_t ks_align_up(size_t x, size_t align)
{
	return (x + align - 1) & ~(align - 1);
}

/* CLOCK_MONOTONIC now, in nanoseconds and milliseconds. */
static inline uint64_t ks_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t ks_now_ms(void)
{
	return ks_now_ns() / 1000000ull;
}

/* Absolute CLOCK_MONOTONIC deadline @ms milliseconds from now. */
static inline struct timespec ks_deadline_ms(uint64_t ms)
{
	uint64_t ns = ks_now_ns() + ms * 1000000ull;
	struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000ull),
			       .tv_nsec = (long)(ns % 1000000000ull) };
	return ts;
}

#endif /* KS_COMPILER_H */
