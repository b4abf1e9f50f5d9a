/*
 * phase_stats.h - the server's per-phase time sums for STORE and RETRIEVE
 * as KS_STATS reports them (store_timed, store_accept_us, ...; the phases
 * of SRV_PHASE_LIST in src/server_priv.h), for the benchmarks that split a
 * request's time: gpu_server_bench and request_bench. Header only.
 */
#ifndef KS_BENCH_PHASE_STATS_H
#define KS_BENCH_PHASE_STATS_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define NPHASES 6
static const char *const phase_name[NPHASES] = { "accept", "queue", "prepare", "copy",
						  "finish", "reply" };

/* Sums per op: [0] STORE, [1] RETRIEVE; timed = requests they cover. */
struct phase_sums {
	uint64_t timed[2], us[2][NPHASES];
};

/* kvstash_stats() callback filling a struct phase_sums (@arg). */
static inline int phase_stat(const char *name, uint64_t v, void *arg)
{
	struct phase_sums *ps = arg;

	for (int op = 0; op < 2; op++) {
		const char *pre = op ? "retrieve_" : "store_";
		size_t pl = strlen(pre);
		char want[40];

		if (strncmp(name, pre, pl))
			continue;
		if (!strcmp(name + pl, "timed"))
			ps->timed[op] = v;
		for (int p = 0; p < NPHASES; p++) {
			snprintf(want, sizeof(want), "%s_us", phase_name[p]);
			if (!strcmp(name + pl, want))
				ps->us[op][p] = v;
		}
	}
	return 0;
}

#endif /* KS_BENCH_PHASE_STATS_H */
