/*
 * server_stats.c - the server's numbers: one table of counters and gauges
 * (collect_stats) feeds KS_STATS, Prometheus /metrics and JSON /stats; the
 * health verdict for /healthz; and the data-path probe that verdict relies
 * on.
 *
 * Threads: srv_handle_stats and srv_maybe_probe run on the io thread;
 * srv_render_metrics, srv_render_stats_json and srv_health on any thread
 * (the HTTP thread, http.c) and never wait on the io thread: they read
 * atomics and call the subsystems' stats functions; run_probe on a
 * transfer worker of each engine.
 *
 * Lock ordering (see server.c and docs/architecture.md): no lock of its
 * own. The stats calls take locks inside: idx_get_stats each shard's in
 * turn, xfer_get_stats a queue's, tier_disk_get_stats the disk tier's; one
 * call at a time, never nested.
 */
#include "server.h"
#include "server_priv.h"

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "compiler.h"
#include "index.h"
#include "lock.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "protocol.h"
#include "tier_disk.h"
#include "tier_redis.h"
#include "transfer.h"

/* SRV_PHASE_LIST's names: the phase label of kvstash_transfer_phase_seconds_total, and
 * the KS_STATS / /stats names of the microsecond sums. */
#define PHASE_NAME(p) #p,
#define PHASE_STORE_US(p) "store_" #p "_us",
#define PHASE_RETRIEVE_US(p) "retrieve_" #p "_us",
static const char *const srv_phase_name[SRV_PHASES] = { SRV_PHASE_LIST(PHASE_NAME) };
static const char *const srv_phase_us_name[2][SRV_PHASES] = {
	{ SRV_PHASE_LIST(PHASE_STORE_US) },
	{ SRV_PHASE_LIST(PHASE_RETRIEVE_US) },
};

/* ------------------------------------------------------------------------ */
/* Stats, metrics, health: one table feeds KS_STATS, /metrics and /stats.   */

enum stat_kind { STAT_COUNTER, STAT_GAUGE };

struct stat_row {
	const char *name;	/* KS_STATS / JSON key */
	const char *prom;	/* Prometheus name */
	const char *help;
	enum stat_kind kind;
	uint64_t value;
};

#define SRV_MAX_STATS 128

/* Fill @rows with every counter. Safe from any thread: atomics and stats calls only. */
static size_t collect_stats(struct srv *s, struct stat_row *rows)
{
	struct pool_stats ps;
	struct idx_stats is;
	struct xfer_stats xs;
	size_t n = 0;

#define ROW(nm, pr, kd, v, hp) \
	(rows[n++] = (struct stat_row){ (nm), (pr), (hp), (kd), (uint64_t)(v) })
#define CTR(field) atomic_load_explicit(&s->ctr.field, memory_order_relaxed)
	pool_get_stats(s->pool, &ps);
	idx_get_stats(s->idx, &is);
	memset(&xs, 0, sizeof(xs));
	for (unsigned e = 0; e < s->nengines; e++) {
		struct xfer_stats es;

		xfer_get_stats(s->engines[e], &es);
		xs.queued += es.queued;
		xs.running += es.running;
		xs.completed += es.completed;
		xs.rejected_full += es.rejected_full;
		xs.nworkers += es.nworkers;
	}
	ROW("cuda_devices", "kvstash_cuda_devices", STAT_GAUGE, s->ncuda,
	    "CUDA devices served (0: host backend only).");
	ROW("pool_bytes", "kvstash_l1_pool_bytes", STAT_GAUGE, ps.region_bytes,
	    "Bytes reserved for the host pool.");
	ROW("slot_bytes", "kvstash_l1_slot_bytes", STAT_GAUGE, ps.slot_bytes,
	    "Bytes per pool slot (one chunk object).");
	ROW("slots_total", "kvstash_l1_slots", STAT_GAUGE, ps.nslots, "Pool slots.");
	ROW("slots_free", "kvstash_l1_slots_free", STAT_GAUGE, ps.free_slots, "Free pool slots.");
	ROW("pool_used_bytes", "kvstash_l1_used_bytes", STAT_GAUGE, ps.used_bytes,
	    "Bytes of pool slots in use.");
	ROW("objects", "kvstash_l1_objects", STAT_GAUGE, is.entries, "Objects in the L1 index.");
	ROW("objects_ready", "kvstash_l1_objects_ready", STAT_GAUGE, is.ready,
	    "Objects READY (unpinned).");
	ROW("objects_writing", "kvstash_l1_objects_writing", STAT_GAUGE, is.writing,
	    "Objects being written by a STORE.");
	ROW("objects_reading", "kvstash_l1_objects_reading", STAT_GAUGE, is.reading,
	    "Objects with read locks or pins.");
	ROW("read_locks", "kvstash_l1_read_locks", STAT_GAUGE, is.read_locks,
	    "LOOKUP read locks held.");
	ROW("pins", "kvstash_l1_pins", STAT_GAUGE, is.pins, "Transfer pins held.");
	ROW("evictions", "lmcache_mp_l1_evicted_keys_total", STAT_COUNTER, is.evictions,
	    "Objects evicted from L1 (LRU).");
	ROW("expired_read_locks", "kvstash_expired_read_locks_total", STAT_COUNTER,
	    is.expired_read_locks, "Objects whose LOOKUP read locks expired (TTL).");
	ROW("expired_writes", "kvstash_expired_writes_total", STAT_COUNTER, is.expired_writes,
	    "STORE reservations that expired (TTL).");
	ROW("lock_timeouts", "kvstash_lock_timeouts_total", STAT_COUNTER, ks_lock_timeouts_total(),
	    "Lock waits that hit their deadline.");
	ROW("deferred_releases", "kvstash_l1_deferred_releases_total", STAT_COUNTER,
	    is.deferred_releases, "Unpins and aborts deferred because their shard lock timed out.");
	ROW("deferred_frees", "kvstash_l1_deferred_frees_total", STAT_COUNTER, ps.deferred_frees,
	    "Slot frees deferred because the pool lock timed out.");
	ROW("instances", "kvstash_instances", STAT_GAUGE, atomic_load(&s->ninstances),
	    "Registered engine instances.");
	ROW("sessions", "kvstash_sessions", STAT_GAUGE, atomic_load(&s->nsessions_pub),
	    "Per-request hash sessions cached.");
	ROW("xfer_queued", "kvstash_xfer_queue_depth", STAT_GAUGE, xs.queued,
	    "Transfer jobs waiting for a worker.");
	ROW("xfer_running", "kvstash_xfer_running", STAT_GAUGE, xs.running,
	    "Transfer jobs being copied now.");
	ROW("xfer_completed", "kvstash_xfer_completed_total", STAT_COUNTER, xs.completed,
	    "Transfer jobs completed.");
	ROW("xfer_rejected_full", "kvstash_xfer_rejected_total", STAT_COUNTER, xs.rejected_full,
	    "Transfer jobs refused because the queue was full.");
	ROW("workers", "kvstash_xfer_workers", STAT_GAUGE, xs.nworkers, "Transfer worker threads.");
	ROW("requests_store", "lmcache_mp_sm_write_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_STORE]), "STORE requests received.");
	ROW("requests_retrieve", "lmcache_mp_sm_read_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_RETRIEVE]), "RETRIEVE requests received.");
	ROW("requests_lookup", "kvstash_lookup_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_LOOKUP]), "LOOKUP requests received.");
	ROW("requests_ping", "kvstash_ping_requests_total", STAT_COUNTER,
	    atomic_load(&s->ctr.requests[PROTO_PING]), "PING requests received.");
	/* per dialect, labelled in /metrics (kvstash_connections{dialect}) */
	ROW("connections_march", NULL, STAT_GAUGE,
	    atomic_load(&s->conns_by_dialect[PROTO_DIALECT_MARCH]),
	    "Connections latched to LMCache's March 2026 MP protocol.");
	ROW("connections_current", NULL, STAT_GAUGE,
	    atomic_load(&s->conns_by_dialect[PROTO_DIALECT_CURRENT]),
	    "Connections latched to LMCache's current (frozen-id) MP protocol.");
	ROW("connections_unlatched", NULL, STAT_GAUGE,
	    atomic_load(&s->conns_by_dialect[PROTO_DIALECT_AUTO]),
	    "Connections that sent only requests meaning the same in both dialects.");
	ROW("unsupported_ops", "kvstash_unsupported_operations_total", STAT_COUNTER,
	    CTR(unsupported_ops), "Requests for LMCache operations kvstash does not implement "
	    "(answered with a refusal or None).");
	ROW("ambiguous_requests", "kvstash_ambiguous_requests_total", STAT_COUNTER,
	    CTR(ambiguous_requests), "Requests answered nil because their connection had not "
	    "shown its dialect yet and they mean different things in each.");
	ROW("lookup_refused", "kvstash_lookup_refused_total", STAT_COUNTER, CTR(lookup_refused),
	    "LOOKUP/FREE_LOOKUP_LOCKS refused for a key with num_kv_readers 0.");
	ROW("frame_faults", "kvstash_frame_faults_total", STAT_COUNTER, CTR(frame_faults),
	    "Malformed requests dropped (protocol.md Errors rule 1).");
	ROW("semantic_errors", "kvstash_semantic_errors_total", STAT_COUNTER, CTR(semantic_errors),
	    "Well-formed requests refused (unknown instance, bad range, ...).");
	ROW("replies_dropped", "kvstash_replies_dropped_total", STAT_COUNTER, CTR(replies_dropped),
	    "Replies ZMQ could not queue (peer gone or full).");
	ROW("store_chunks_stored", "kvstash_store_chunks_total", STAT_COUNTER,
	    CTR(store_chunks_stored), "Chunks made READY by STORE.");
	ROW("store_chunks_skipped", "kvstash_store_chunks_skipped_total", STAT_COUNTER,
	    CTR(store_chunks_skipped), "STORE chunks already present.");
	ROW("store_chunks_nospace", "kvstash_store_chunks_nospace_total", STAT_COUNTER,
	    CTR(store_chunks_nospace), "STORE chunks skipped for lack of space.");
	ROW("store_chunks_lost", "kvstash_store_chunks_lost_total", STAT_COUNTER,
	    CTR(store_chunks_lost), "STORE chunks whose reservation expired or was cleared.");
	ROW("retrieve_ok", "kvstash_retrieve_ok_total", STAT_COUNTER, CTR(retrieve_ok),
	    "RETRIEVEs that copied every chunk.");
	ROW("retrieve_miss", "kvstash_retrieve_miss_total", STAT_COUNTER, CTR(retrieve_miss),
	    "RETRIEVEs refused because a chunk was missing.");
	ROW("bytes_stored", "kvstash_store_bytes_total", STAT_COUNTER, CTR(bytes_stored),
	    "Bytes copied into the pool by STORE.");
	ROW("bytes_retrieved", "kvstash_retrieve_bytes_total", STAT_COUNTER, CTR(bytes_retrieved),
	    "Bytes copied out of the pool by RETRIEVE.");
	ROW("lookup_hit_chunks", "kvstash_lookup_hit_chunks_total", STAT_COUNTER,
	    CTR(lookup_hit_chunks), "Chunks reported as hits by LOOKUP.");
	ROW("instances_reaped", "kvstash_reaped_instances_total", STAT_COUNTER,
	    CTR(instances_reaped), "Instances unregistered by the reaper.");
	ROW("instances_adopted", "kvstash_instances_adopted_total", STAT_COUNTER,
	    CTR(instances_adopted), "Instances taken over by a new connection of their client.");
	ROW("owner_refused", "kvstash_owner_refused_total", STAT_COUNTER, CTR(owner_refused),
	    "Requests refused because another client owns the instance (--owner-check).");
	ROW("connections_opened", "kvstash_connections_opened_total", STAT_COUNTER,
	    CTR(conn_opened), "Client connections accepted.");
	ROW("connections_closed", "kvstash_connections_closed_total", STAT_COUNTER,
	    CTR(conn_closed), "Client connections closed.");
	ROW("pool_pinned_bytes", "kvstash_pool_pinned_bytes", STAT_GAUGE,
	    atomic_load(&s->pool_pinned_bytes), "Bytes of the pool pinned for CUDA so far.");
	ROW("pool_pin_total_bytes", "kvstash_pool_pin_total_bytes", STAT_GAUGE,
	    s->pool_pin_total, "Bytes of the pool to pin for CUDA.");
	ROW("xfer_unpinned_chunks", "kvstash_xfer_unpinned_chunks_total", STAT_COUNTER,
	    CTR(xfer_unpinned), "GPU chunks skipped or failed: their slot was not pinned yet.");
	ROW("copy_faults", "kvstash_copy_faults_total", STAT_COUNTER, CTR(copy_faults),
	    "Copies stopped by a bus error (client file truncated).");
	ROW("log_dropped", "kvstash_log_dropped_total", STAT_COUNTER, log_dropped_total(),
	    "Log lines dropped because the log ring was full.");
	ROW("l2_demoted", "kvstash_l2_demoted_total", STAT_COUNTER, CTR(demoted),
	    "Evicted L1 chunks written to the disk tier.");
	ROW("l2_demote_dropped", "kvstash_l2_demote_dropped_total", STAT_COUNTER, CTR(demote_dropped),
	    "Evicted chunks dropped because the disk tier's queue was full.");
	ROW("l2_demote_failed", "kvstash_l2_demote_failed_total", STAT_COUNTER, CTR(demote_failed),
	    "Disk tier writes that failed (disk full, I/O error).");
	ROW("l2_promoted", "kvstash_l2_promoted_total", STAT_COUNTER, CTR(promoted_l2),
	    "Chunks loaded from the disk tier into L1 by LOOKUP.");
	ROW("l3_written", "kvstash_l3_written_total", STAT_COUNTER, CTR(l3_written),
	    "Chunks written through to Redis.");
	ROW("l3_dropped", "kvstash_l3_dropped_total", STAT_COUNTER, CTR(l3_dropped),
	    "Write-throughs dropped (Redis queue full or down).");
	ROW("l3_failed", "kvstash_l3_failed_total", STAT_COUNTER, CTR(l3_failed),
	    "Redis writes that failed.");
	ROW("l3_promoted", "kvstash_l3_promoted_total", STAT_COUNTER, CTR(promoted_l3),
	    "Chunks loaded from Redis into L1 by LOOKUP.");
	ROW("promote_failed", "kvstash_promote_failed_total", STAT_COUNTER, CTR(promote_failed),
	    "Tier reads that failed (checksum, I/O, Redis down): the hit count was shortened.");
	/* Phase sums (KS_STATS and /stats; /metrics has them in seconds, labelled). */
	for (unsigned op = 0; op < 2; op++) {
		ROW(op ? "retrieve_timed" : "store_timed", NULL, STAT_COUNTER,
		    atomic_load_explicit(&s->phase_jobs[op], memory_order_relaxed), NULL);
		for (unsigned p = 0; p < SRV_PHASES; p++)
			ROW(srv_phase_us_name[op][p], NULL, STAT_COUNTER,
			    atomic_load_explicit(&s->phase_ns[op][p], memory_order_relaxed) / 1000,
			    NULL);
	}
	ROW("io_turn_max_us", NULL, STAT_GAUGE,
	    atomic_load_explicit(&s->io_busy_max_ns, memory_order_relaxed) / 1000, NULL);
	ROW("io_turn_max_recent_us", NULL, STAT_GAUGE,
	    KS_MAX(atomic_load_explicit(&s->io_busy_win_ns, memory_order_relaxed),
		   atomic_load_explicit(&s->io_busy_prev_win_ns, memory_order_relaxed)) / 1000,
	    NULL);
	if (s->l2) {
		struct tier_disk_stats ds;

		tier_disk_get_stats(s->l2, &ds);
		ROW("l2_objects", "kvstash_l2_objects", STAT_GAUGE, ds.objects, "Chunks on disk.");
		ROW("l2_bytes", "kvstash_l2_bytes", STAT_GAUGE, ds.bytes, "Bytes of chunk files.");
		ROW("l2_evictions", "kvstash_l2_evictions_total", STAT_COUNTER, ds.evictions,
		    "Disk chunks removed for capacity.");
		ROW("l2_corrupt", "kvstash_l2_corrupt_total", STAT_COUNTER, ds.corrupt,
		    "Disk chunks that failed their checksum (removed, never served).");
	}
	if (s->l3) {
		struct tier_redis_stats rs;

		tier_redis_get_stats(s->l3, &rs);
		ROW("l3_notconn", "kvstash_l3_notconn_total", STAT_COUNTER, rs.notconn,
		    "Redis requests failed because a node was down.");
		ROW("l3_corrupt", "kvstash_l3_corrupt_total", STAT_COUNTER, rs.corrupt,
		    "Redis values that failed their checksum (deleted, never served).");
		ROW("l3_nodes_up", "kvstash_l3_nodes_up", STAT_GAUGE, rs.nodes_up,
		    "Redis nodes connected.");
		ROW("l3_nodes", "kvstash_l3_nodes", STAT_GAUGE, rs.nodes,
		    "Redis nodes known (cluster: every master seen since start).");
		ROW("l3_redirects_moved", "kvstash_l3_redirects_moved_total", STAT_COUNTER, rs.moved,
		    "Redis Cluster MOVED redirects followed.");
		ROW("l3_redirects_ask", "kvstash_l3_redirects_ask_total", STAT_COUNTER, rs.asked,
		    "Redis Cluster ASK redirects followed (slot migrations).");
		ROW("l3_map_refreshes", "kvstash_l3_map_refreshes_total", STAT_COUNTER,
		    rs.map_refreshes, "Redis Cluster slot maps read.");
		ROW("l3_map_errors", "kvstash_l3_map_errors_total", STAT_COUNTER, rs.map_errors,
		    "Redis Cluster slot map refreshes that no node answered.");
		ROW("l3_slots_uncovered", "kvstash_l3_slots_uncovered", STAT_GAUGE,
		    rs.slots_uncovered, "Redis Cluster hash slots no master serves now.");
	}
	if (s->kve) {
		struct kve_stats ks;

		kve_get_stats(s->kve, &ks);
		ROW("kv_events_published", "kvstash_kv_events_published_total", STAT_COUNTER,
		    ks.published, "KV cache events sent on --kv-events-endpoint.");
		ROW("kv_events_dropped", "kvstash_kv_events_dropped_total", STAT_COUNTER, ks.dropped,
		    "KV cache events dropped because the publisher's queue was full (the next "
		    "batch's sequence number skips one).");
		ROW("kv_events_batches", "kvstash_kv_events_batches_total", STAT_COUNTER, ks.batches,
		    "KV cache event batches (ZMQ messages) sent.");
		ROW("kv_events_send_failed", "kvstash_kv_events_send_failed_total", STAT_COUNTER,
		    ks.send_failed, "Event batches ZMQ refused to queue (kept for replay).");
		ROW("kv_events_replays", "kvstash_kv_events_replays_total", STAT_COUNTER, ks.replays,
		    "Replay requests answered.");
		ROW("kv_events_replay_bad", "kvstash_kv_events_replay_bad_total", STAT_COUNTER,
		    ks.replay_bad, "Malformed replay requests ignored.");
		ROW("kv_events_snapshots", "kvstash_kv_events_snapshots_total", STAT_COUNTER,
		    ks.snapshots, "Replay requests answered with a snapshot of what is cached.");
		ROW("kv_events_next_seq", "kvstash_kv_events_next_sequence", STAT_GAUGE, ks.next_seq,
		    "Sequence number of the next event batch.");
	}
#undef CTR
#undef ROW
	return n;
}

static const struct {
	const char *name, *kind;
	size_t off;
} srv_hists[] = {
	{ "kvstash_request_duration_seconds", "store", offsetof(struct srv, lat_store) },
	{ "kvstash_request_duration_seconds", "retrieve", offsetof(struct srv, lat_retrieve) },
	{ "kvstash_request_duration_seconds", "lookup", offsetof(struct srv, lat_lookup) },
	{ "kvstash_request_duration_seconds", "ping", offsetof(struct srv, lat_ping) },
};

void srv_handle_stats(struct srv *s, const struct srv_reply_addr *a)
{
	struct stat_row rows[SRV_MAX_STATS];
	const char *names[SRV_MAX_STATS + 2 * KS_ARRAY_SIZE(srv_hists)];
	uint64_t vals[SRV_MAX_STATS + 2 * KS_ARRAY_SIZE(srv_hists)];
	static char hist_names[2 * KS_ARRAY_SIZE(srv_hists)][40];	/* io thread only */
	struct proto_msg m = { 0 };
	size_t n = collect_stats(s, rows);

	for (size_t i = 0; i < n; i++) {
		names[i] = rows[i].name;
		vals[i] = rows[i].value;
	}
	/* Latency sums and counts, so clients (kvstash top) can derive means per interval. */
	for (size_t i = 0; i < KS_ARRAY_SIZE(srv_hists); i++) {
		const struct metrics_hist *h =
			(const struct metrics_hist *)((const char *)s + srv_hists[i].off);

		snprintf(hist_names[2 * i], sizeof(hist_names[0]), "latency_%s_sum_us",
			 srv_hists[i].kind);
		snprintf(hist_names[2 * i + 1], sizeof(hist_names[0]), "latency_%s_count",
			 srv_hists[i].kind);
		names[n] = hist_names[2 * i];
		vals[n++] = atomic_load_explicit(&h->sum_ns, memory_order_relaxed) / 1000;
		names[n] = hist_names[2 * i + 1];
		vals[n++] = atomic_load_explicit(&h->count, memory_order_relaxed);
	}
	srv_send_encoded(s, a, proto_encode_stats(&m, names, vals, n), &m);
}

void srv_render_metrics(struct srv *s, struct metrics_buf *out)
{
	struct stat_row rows[SRV_MAX_STATS];
	size_t n = collect_stats(s, rows);
	char labels[64];

	for (size_t i = 0; i < n; i++) {
		if (!rows[i].prom)	/* rendered below, in seconds and labelled */
			continue;
		if (rows[i].kind == STAT_COUNTER)
			metrics_counter(out, rows[i].prom, rows[i].help, NULL, rows[i].value);
		else
			metrics_gauge(out, rows[i].prom, rows[i].help, NULL, (double)rows[i].value);
	}
	for (size_t i = 0; i < KS_ARRAY_SIZE(srv_hists); i++) {
		snprintf(labels, sizeof(labels), "request=\"%s\"", srv_hists[i].kind);
		metrics_histogram(out, srv_hists[i].name,
				  i == 0 ? "Time from receiving a request to sending its reply." : NULL,
				  labels,
				  (const struct metrics_hist *)((const char *)s + srv_hists[i].off));
	}
	for (unsigned op = 0; op < 2; op++)
		for (unsigned p = 0; p < SRV_PHASES; p++) {
			snprintf(labels, sizeof(labels), "request=\"%s\",phase=\"%s\"",
				 op ? "retrieve" : "store", srv_phase_name[p]);
			metrics_counter_f(out, "kvstash_transfer_phase_seconds_total",
					  op + p == 0 ? "Time successful STOREs/RETRIEVEs spent in "
					  "each phase, receipt to reply: accept (io thread), queue, "
					  "prepare (reserve/pin), copy, finish (commit/unpin), reply "
					  "(completion hop)." : NULL, labels,
					  (double)atomic_load_explicit(&s->phase_ns[op][p],
								       memory_order_relaxed) / 1e9);
		}
	for (enum proto_dialect d = PROTO_DIALECT_AUTO; d <= PROTO_DIALECT_CURRENT; d++) {
		snprintf(labels, sizeof(labels), "dialect=\"%s\"",
			 d == PROTO_DIALECT_AUTO ? "unlatched" : proto_dialect_name(d));
		metrics_gauge(out, "kvstash_connections",
			      d == PROTO_DIALECT_AUTO ? "Connections (ROUTER identities) by the "
			      "LMCache MP dialect they speak (unlatched: none shown yet)." : NULL,
			      labels, (double)atomic_load(&s->conns_by_dialect[d]));
	}
	metrics_histogram(out, "kvstash_io_loop_turn_seconds",
			  "Busy time of each io loop turn (poll return to next poll): how long a "
			  "PING can wait behind other work.", NULL, &s->io_busy);
	/* Per device: its queue, and how long its last data-path probe has waited.
	 * One pass per family: Prometheus wants a family's samples together. */
	static const char *const dev_family[3][2] = {
		{ "kvstash_device_queue_depth", "Transfer jobs waiting for a worker, per device." },
		{ "kvstash_device_running", "Transfer jobs being copied now, per device." },
		{ "kvstash_device_probe_wait_seconds",
		  "How long the device's outstanding health probe has waited (0: none)." },
	};
	for (unsigned f = 0; f < 3; f++) {
		for (unsigned e = 0; e < s->nengines; e++) {
			struct xfer_stats xs;
			uint64_t sent = atomic_load(&s->probe_sent_ms[e]), now = ks_now_ms();
			double v;

			xfer_get_stats(s->engines[e], &xs);
			if (e == 0)
				snprintf(labels, sizeof(labels), "device=\"host\"");
			else
				snprintf(labels, sizeof(labels), "device=\"cuda:%u\"", e - 1);
			v = f == 0 ? (double)xs.queued : f == 1 ? (double)xs.running :
			    sent && now > sent ? (double)(now - sent) / 1e3 : 0.0;
			metrics_gauge(out, dev_family[f][0], e == 0 ? dev_family[f][1] : NULL, labels, v);
		}
	}
	/* Per Redis node: connected, and (cluster) hash slots it serves. */
	if (s->l3) {
		struct tier_redis_node_info ni[TIER_REDIS_MAX_NODES];
		size_t nn = tier_redis_nodes(s->l3, ni, TIER_REDIS_MAX_NODES);
		char nlabels[sizeof(ni[0].addr) + 16];

		for (unsigned f = 0; f < 2; f++)
			for (size_t i = 0; i < nn; i++) {
				snprintf(nlabels, sizeof(nlabels), "node=\"%s\"", ni[i].addr);
				metrics_gauge(out, f ? "kvstash_l3_node_slots" : "kvstash_l3_node_up",
					      i ? NULL : f ? "Redis Cluster hash slots the node serves." :
					      "1 when the Redis node is connected.", nlabels,
					      f ? (double)ni[i].slots : ni[i].up ? 1.0 : 0.0);
			}
	}
	char why[256];
	metrics_gauge(out, "kvstash_healthy", "1 when /healthz reports healthy.", NULL,
		      srv_health(s, why, sizeof(why)) == 0 ? 1.0 : 0.0);
}

void srv_render_stats_json(struct srv *s, struct metrics_buf *out)
{
	struct stat_row rows[SRV_MAX_STATS];
	size_t n = collect_stats(s, rows);
	char why[256];
	int rc = srv_health(s, why, sizeof(why));

	metrics_printf(out, "{\"endpoint\":\"%s\",\"healthy\":%s", s->endpoint, rc ? "false" : "true");
	for (size_t i = 0; i < n; i++)
		metrics_printf(out, ",\"%s\":%" PRIu64, rows[i].name, rows[i].value);
	for (size_t i = 0; i < KS_ARRAY_SIZE(srv_hists); i++) {
		const struct metrics_hist *h =
			(const struct metrics_hist *)((const char *)s + srv_hists[i].off);

		metrics_printf(out, ",\"%s_p50_ms\":%.3f,\"%s_p99_ms\":%.3f", srv_hists[i].kind,
			       metrics_hist_quantile(h, 0.5) * 1e3, srv_hists[i].kind,
			       metrics_hist_quantile(h, 0.99) * 1e3);
	}
	metrics_printf(out, "}\n");
}

int srv_health(struct srv *s, char *why, size_t len)
{
	uint64_t now = ks_now_ms();
	uint64_t io = atomic_load(&s->io_alive_ms);

	if (now > io && now - io > SRV_HEALTH_IO_MS) {
		snprintf(why, len, "io thread: no loop turn for %" PRIu64 " ms", now - io);
		return -EAGAIN;
	}
	for (unsigned e = 0; e < s->nengines; e++) {
		uint64_t sent = atomic_load(&s->probe_sent_ms[e]);

		if (sent && now > sent && now - sent > SRV_HEALTH_PROBE_MS) {
			if (e == 0)
				snprintf(why, len, "device host: data-path probe waiting %" PRIu64
					 " ms (workers stalled or queue backed up)", now - sent);
			else
				snprintf(why, len, "device cuda:%u: data-path probe waiting %" PRIu64
					 " ms (workers stalled or queue backed up)", e - 1, now - sent);
			return -EAGAIN;
		}
	}
	snprintf(why, len, "ok");
	return 0;
}

/* Worker side of a probe: nothing to copy; the test hook can stall it. */
static void run_probe(struct xfer_job *base, unsigned worker)
{
	struct srv_xfer_job *j = (struct srv_xfer_job *)base;

	(void)worker;
	if (j->srv->probe_stall_ms)
		usleep((useconds_t)KS_MIN(j->srv->probe_stall_ms, 60000) * 1000);
}

/* Send a probe through each device's transfer queue once a second (io thread). */
void srv_maybe_probe(struct srv *s, uint64_t now)
{
	for (unsigned e = 0; e < s->nengines; e++) {
		struct srv_xfer_job *j;

		if (atomic_load(&s->probe_sent_ms[e]) ||
		    now - atomic_load(&s->probe_done_ms[e]) < SRV_PROBE_MS)
			continue;
		j = calloc(1, sizeof(*j));
		if (!j)
			return;
		j->srv = s;
		j->kind = JOB_PROBE;
		j->base.run = run_probe;
		atomic_store(&s->probe_sent_ms[e], now);
		if (srv_submit_job(s, e, j)) {
			atomic_store(&s->probe_sent_ms[e], 0);
			free(j);
		}
	}
}
