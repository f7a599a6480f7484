/*
 * pg_activity.c — observability: the activity view (every request in flight,
 * its phase and progress, updated by the worker at every step, so a long
 * prefill shows how far it is; for a set-based call, how many of its inputs
 * are done) and the workers view.
 */
#include "postgres.h"

#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "pg_shmem.h"

PG_FUNCTION_INFO_V1(kl_sql_activity);
PG_FUNCTION_INFO_V1(kl_sql_workers);

/* _activity() -> (worker, request_id, backend_pid, model, phase, prompt_tokens_done, prompt_tokens,
 *                 generated_tokens, max_tokens, tokens_per_second, submitted_at, started_at,
 *                 batch_id, batch_done, batch_total) */
Datum
kl_sql_activity(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	static const char *phases[] = {"queued", "prefill", "decode", "finishing"};

	kl_require_shared();
	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < kl_shared->n_slots; i++)
	{
		KlSlot	   *s = &kl_shared->slots[i];
		Datum		v[15];
		bool		nulls[15] = {0};
		KlSlotState st;
		int			worker;
		uint64		id;
		pid_t		pid;
		char		model[KL_MODEL_NAME_LEN];
		KlPhase		phase;
		int64		pd,
					pt,
					gen,
					mt;
		double		tps;
		TimestampTz sub,
					start;
		int64		batch_id,
					batch_done,
					batch_total;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		st = s->state;
		worker = s->worker;
		id = s->request_id;
		pid = s->backend_pid;
		strlcpy(model, s->model, sizeof(model));
		LWLockRelease(kl_shared->lock);
		if (st == KL_SLOT_FREE)
			continue;
		SpinLockAcquire(&s->mutex);
		phase = s->phase;
		pd = s->prompt_done;
		pt = s->prompt_total;
		gen = s->generated;
		mt = s->max_tokens;
		tps = s->tokens_per_second;
		sub = s->submitted_at;
		start = s->started_at;
		batch_id = s->batch_id;
		batch_done = s->batch_done;
		batch_total = s->batch_total;
		SpinLockRelease(&s->mutex);
		v[0] = Int32GetDatum(worker);
		v[1] = Int64GetDatum((int64) id);
		v[2] = Int32GetDatum(pid);
		v[3] = CStringGetTextDatum(model);
		v[4] = CStringGetTextDatum(st == KL_SLOT_SUBMITTED ? "queued" : phases[phase]);
		v[5] = Int64GetDatum(pd);
		v[6] = Int64GetDatum(pt);
		v[7] = Int64GetDatum(gen);
		v[8] = Int64GetDatum(mt);
		v[9] = Float8GetDatum(tps);
		v[10] = TimestampTzGetDatum(sub);
		if (start && st != KL_SLOT_SUBMITTED)
			v[11] = TimestampTzGetDatum(start);
		else
			nulls[11] = true;
		/* the set-based call it belongs to: inputs finished of the batch's total */
		v[12] = Int64GetDatum(batch_id);
		v[13] = Int64GetDatum(batch_done);
		v[14] = Int64GetDatum(batch_total);
		nulls[12] = nulls[13] = nulls[14] = batch_id == 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	return (Datum) 0;
}

/* _workers() -> (worker, pid, active_requests, restarts, started_at, steps, tokens) */
Datum
kl_sql_workers(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	kl_require_shared();
	InitMaterializedSRF(fcinfo, 0);
	for (int w = 0; w < kl_shared->n_workers; w++)
	{
		Datum		v[7];
		bool		nulls[7] = {0};
		KlWorkerInfo wi;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		wi = kl_shared->workers[w];
		LWLockRelease(kl_shared->lock);
		v[0] = Int32GetDatum(w);
		if (wi.pid)
			v[1] = Int32GetDatum(wi.pid);
		else
			nulls[1] = true;
		v[2] = Int32GetDatum(wi.active);
		v[3] = Int32GetDatum(wi.restarts);
		if (wi.started_at)
			v[4] = TimestampTzGetDatum(wi.started_at);
		else
			nulls[4] = true;
		v[5] = Int64GetDatum(wi.steps);
		v[6] = Int64GetDatum(wi.tokens);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	return (Datum) 0;
}
