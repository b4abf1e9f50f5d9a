/*
 * server_lookup.c - the current dialect's view of LOOKUP jobs
 * (docs/protocol.md §11.3): LOOKUP replies None and its result is asked for
 * by request_id (QUERY_PREFETCH_STATUS, QUERY_PREFETCH_LOOKUP_HITS,
 * WAIT_PREFETCH_STATUS), where the March dialect returned a job id. A job
 * itself lives in srv.jobs as in the March dialect; this file maps request
 * ids onto job ids and parks WAIT_PREFETCH_STATUS calls until their job's
 * L2/L3 prefetch lands or their timeout passes.
 *
 * The map is bounded: it keeps the SRV_RID_MAX most recent LOOKUPs (a ring
 * in insertion order), so a request id asked about after that reads as
 * unknown (0 chunks: a miss, never a wrong hit; its read locks expire by
 * TTL). A second LOOKUP with the same request id replaces the first, as in
 * LMCache.
 *
 * Threads: io thread only. Lock ordering: none of its own and none taken.
 */
#include "server_priv.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

static struct srv_rid_job **rid_bucket(struct srv *s, const char *rid, size_t len)
{
	return &s->rid_jobs[srv_identity_hash((const uint8_t *)rid, len) % SRV_RID_BUCKETS];
}

struct srv_rid_job *srv_rid_job_find(struct srv *s, const char *rid, size_t len)
{
	for (struct srv_rid_job *r = *rid_bucket(s, rid, len); r; r = r->next)
		if (r->request_id_len == len && !memcmp(r->request_id, rid, len))
			return r;
	return NULL;
}

void srv_rid_job_drop(struct srv *s, struct srv_rid_job *r)
{
	for (struct srv_rid_job **pp = rid_bucket(s, r->request_id, r->request_id_len); *pp;
	     pp = &(*pp)->next)
		if (*pp == r) {
			*pp = r->next;
			break;
		}
	s->rid_ring[r->ring_pos] = NULL;
	free(r);
}

/*
 * Remember that @rid's LOOKUP is job @job (replacing an earlier one). The
 * ring holds [rid_head, rid_head + rid_span) in insertion order; entries
 * consumed since are NULL holes, skipped when they reach the head.
 */
void srv_rid_job_put(struct srv *s, const char *rid, size_t len, int64_t job)
{
	struct srv_rid_job *r = srv_rid_job_find(s, rid, len);
	uint32_t pos;

	if (r) {
		r->job = job;
		return;
	}
	while (s->rid_span && !s->rid_ring[s->rid_head]) {
		s->rid_head = (s->rid_head + 1) % SRV_RID_MAX;
		s->rid_span--;
	}
	if (s->rid_span == SRV_RID_MAX) {
		srv_rid_job_drop(s, s->rid_ring[s->rid_head]);	/* forget the oldest */
		s->rid_head = (s->rid_head + 1) % SRV_RID_MAX;
		s->rid_span--;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		log_warn("out of memory remembering LOOKUP %.*s: its QUERY will read 0", (int)len,
			 rid);
		return;
	}
	pos = (s->rid_head + s->rid_span) % SRV_RID_MAX;
	memcpy(r->request_id, rid, len);
	r->request_id_len = (uint16_t)len;
	r->job = job;
	r->ring_pos = pos;
	r->next = *rid_bucket(s, rid, len);
	*rid_bucket(s, rid, len) = r;
	s->rid_ring[pos] = r;
	s->rid_span++;
}

void srv_rid_jobs_free(struct srv *s)
{
	if (s->rid_jobs)
		for (size_t b = 0; b < SRV_RID_BUCKETS; b++)
			while (s->rid_jobs[b]) {
				struct srv_rid_job *r = s->rid_jobs[b];

				s->rid_jobs[b] = r->next;
				free(r);
			}
	free(s->rid_jobs);
	free(s->rid_ring);
	s->rid_jobs = NULL;
	s->rid_ring = NULL;
	s->rid_span = 0;
}

/*
 * The job @r names: NULL when it is gone (consumed through another path, or
 * overwritten in the job ring), and @r is dropped then.
 */
static struct srv_lookup_job *rid_live_job(struct srv *s, struct srv_rid_job *r)
{
	struct srv_lookup_job *job = &s->jobs[(uint64_t)r->job % SRV_JOB_SLOTS];

	if (job->id == r->job)
		return job;
	srv_rid_job_drop(s, r);
	return NULL;
}

/* Reply a finished job's chunks; with @consume, forget the job (exactly-once). */
static void reply_done(struct srv *s, const struct srv_reply_addr *a, struct srv_lookup_job *job,
		       struct srv_rid_job *r, bool consume)
{
	srv_reply_int(s, a, job->chunks);
	if (consume) {
		job->id = -1;
		if (r)
			srv_rid_job_drop(s, r);
	}
}

/*
 * QUERY_PREFETCH_STATUS (@consume) and QUERY_PREFETCH_LOOKUP_HITS, current
 * dialect: 0 for an unknown or consumed request id, None while the job's
 * prefetch is loading, else the prefix hit in chunks.
 */
void srv_handle_query_current(struct srv *s, const struct srv_reply_addr *a,
			      const struct proto_request *rq, bool consume)
{
	struct srv_rid_job *r = srv_rid_job_find(s, rq->request_id, rq->request_id_len);
	struct srv_lookup_job *job = r ? rid_live_job(s, r) : NULL;

	if (!job) {
		srv_reply_int(s, a, 0);
		return;
	}
	if (job->chunks < 0) {
		srv_reply_nil(s, a);
		return;
	}
	reply_done(s, a, job, r, consume);
}

/*
 * WAIT_PREFETCH_STATUS: QUERY_PREFETCH_STATUS that waits up to the given
 * timeout for a loading job. The io thread never blocks: the call is parked
 * and answered by srv_waits_poll() when the job lands (None and the job kept
 * when the timeout passes first).
 */
void srv_handle_wait(struct srv *s, const struct srv_reply_addr *a, const struct proto_request *rq)
{
	struct srv_rid_job *r = srv_rid_job_find(s, rq->request_id, rq->request_id_len);
	struct srv_lookup_job *job = r ? rid_live_job(s, r) : NULL;
	struct srv_wait *w;

	if (!job) {
		srv_reply_int(s, a, 0);
		return;
	}
	if (job->chunks >= 0) {
		reply_done(s, a, job, r, true);
		return;
	}
	if (rq->wait_timeout_s <= 0 || s->nwaits >= SRV_WAIT_MAX || !(w = calloc(1, sizeof(*w)))) {
		srv_reply_nil(s, a);
		return;
	}
	w->addr = *a;
	w->job = r->job;
	memcpy(w->request_id, rq->request_id, rq->request_id_len);
	w->request_id_len = rq->request_id_len;
	/* Capped at a day: a larger timeout would only overflow the sum. */
	w->deadline_ms = ks_now_ms() + (uint64_t)(KS_MIN(rq->wait_timeout_s, 86400.0) * 1000.0);
	w->next = s->waits;
	s->waits = w;
	s->nwaits++;
}

/* Answer the parked WAITs whose job landed or whose deadline passed. */
void srv_waits_poll(struct srv *s, uint64_t now_ms)
{
	for (struct srv_wait **pp = &s->waits; *pp;) {
		struct srv_wait *w = *pp;
		struct srv_lookup_job *job = &s->jobs[(uint64_t)w->job % SRV_JOB_SLOTS];

		if (job->id != w->job) {
			srv_reply_int(s, &w->addr, 0);	/* consumed meanwhile */
		} else if (job->chunks >= 0) {
			struct srv_rid_job *r = srv_rid_job_find(s, w->request_id, w->request_id_len);

			reply_done(s, &w->addr, job, r && r->job == w->job ? r : NULL, true);
		} else if (now_ms >= w->deadline_ms) {
			srv_reply_nil(s, &w->addr);
		} else {
			pp = &w->next;
			continue;
		}
		*pp = w->next;
		s->nwaits--;
		free(w);
	}
}

void srv_waits_free(struct srv *s)
{
	while (s->waits) {
		struct srv_wait *w = s->waits;

		s->waits = w->next;
		free(w);
	}
	s->nwaits = 0;
}
