/*
 * pg_worker.c — the inference background workers.
 *
 * The postmaster starts kimi_linear.workers of them (pg_worker.h).  Each one
 * owns its loaded models (the engine maps the safetensors files read-only, so
 * the weights sit once in the page cache whatever the number of workers and
 * connections) and runs every request addressed to it through its batch
 * (pg_batch.c).  Backends never load weights.
 *
 * Signals: SIGTERM (shutdown, pg_terminate_backend) only sets a flag; the
 * loop notices it between forward steps, tells every waiting backend, and
 * exits with status 1, so the postmaster restarts the worker after
 * bgw_restart_time.  The engine's thread pool blocks all signals in its
 * threads, so handlers always run on this (the main) thread.
 *
 * Errors: an ERROR escaping into the loop (out of memory in palloc, a bug)
 * fails the requests in flight and the loop goes on; it never takes the
 * worker down with a request's bad input.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "kl.h"
#include "tokenizer.h"

#include "pg_load_options.h"
#include "pg_batch.h"
#include "pg_worker.h"

PGDLLEXPORT void kl_worker_main(Datum arg);

static int	applied_threads = -1;

void
kl_register_workers(void)
{
	for (int i = 0; i < kl_workers; i++)
	{
		BackgroundWorker bgw;

		memset(&bgw, 0, sizeof(bgw));
		/* a database-less connection: it shows in pg_stat_activity and pg_terminate_backend works on it */
		bgw.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
		bgw.bgw_start_time = BgWorkerStart_ConsistentState;
		bgw.bgw_restart_time = 1;
		snprintf(bgw.bgw_library_name, BGW_MAXLEN, "kimi_linear");
		snprintf(bgw.bgw_function_name, BGW_MAXLEN, "kl_worker_main");
		snprintf(bgw.bgw_name, BGW_MAXLEN, "kimi_linear worker %d", i);
		snprintf(bgw.bgw_type, BGW_MAXLEN, "kimi_linear worker");
		bgw.bgw_main_arg = Int32GetDatum(i);
		bgw.bgw_notify_pid = 0;
		RegisterBackgroundWorker(&bgw);
	}
}

/* ------------------------------------------------------------------ models */

static void
free_wmodel(KlWModel *wm)
{
	kl_cache_drop_model(wm);
	kl_ctx_free(wm->ctx);
	kl_model_free(wm->m);
	kl_vocab_free(wm->cvocab);
	memset(wm, 0, sizeof(*wm));
}

/*
 * Bring this worker's models in line with the registry: load what is
 * registered and not held, free what was unloaded or replaced.  Loading
 * happens outside the lock; a failure is recorded for the backend waiting in
 * load_model.
 */
static void
sync_models(void)
{
	int			me = kl_worker_index;

	for (int i = 0; i < KL_MAX_MODELS; i++)
	{
		KlModelEntry *e = &kl_shared->models[i];
		KlWModel   *wm = &kl_wmodels[i];
		KlModelState state;
		uint32		gen;
		uint8		mine;
		char		path[MAXPGPATH];
		char		root[MAXPGPATH];
		char		name[KL_MODEL_NAME_LEN];
		char		options[KL_MODEL_OPTIONS_LEN];
		int			device;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		state = e->state;
		gen = e->generation;
		mine = e->wload[me];
		strlcpy(path, e->path, sizeof(path));
		strlcpy(root, e->root, sizeof(root));
		strlcpy(name, e->name, sizeof(name));
		device = e->device;
		strlcpy(options, e->options, sizeof(options));
		LWLockRelease(kl_shared->lock);

		/* held but no longer wanted */
		if (wm->in_use && (wm->generation != gen || state == KL_MODEL_FREE ||
						   state == KL_MODEL_UNLOADING || state == KL_MODEL_FAILED))
		{
			char		msg[256];

			snprintf(msg, sizeof(msg), "model \"%s\" was unloaded while this request was running", wm->name);
			kl_batch_fail_all(wm, KL_ERR_MODEL, msg, NULL);
			kl_batch_drain(200);
			free_wmodel(wm);
			elog(LOG, "kimi_linear worker %d: unloaded model \"%s\"", me, name);
		}
		if (state == KL_MODEL_UNLOADING && mine != KL_WLOAD_NONE)
		{
			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (e->generation == gen)
				e->wload[me] = KL_WLOAD_NONE;
			LWLockRelease(kl_shared->lock);
		}

		/* wanted and not held */
		if ((state == KL_MODEL_LOADING || state == KL_MODEL_READY) && mine == KL_WLOAD_NONE && !wm->in_use)
		{
			kl_load_opts opts;
			KlLoadOptions lo;
			kl_model   *m = NULL;
			kl_err		err;
			int			rc;
			double		t0 = kl_now();

			memset(&opts, 0, sizeof(opts));
			opts.device = kl_device_name(device);
			/* every file of the model must resolve inside kimi_linear.model_dir */
			opts.root = root;
			pgstat_report_activity(STATE_RUNNING, "loading a model");
			/* the options come from the backend or the registry file: checked again */
			if (!kl_load_options_parse(options, &lo, err.msg, sizeof(err.msg)))
			{
				err.code = KL_E_INVALID;
				rc = KL_FAIL;
			}
			else
			{
				kl_load_options_apply(&lo, &opts);
				rc = kl_model_load(path, &opts, &m, &err);
			}
			if (rc == KL_OK)
			{
				const kl_config *cfg = kl_model_config(m);

				wm->m = m;
				wm->entry = i;
				wm->generation = gen;
				strlcpy(wm->name, name, sizeof(wm->name));
				wm->tok = kl_model_tokenizer(m);
				wm->vocab = cfg->vocab_size;
				wm->eos = cfg->eos_id;
				if (!(wm->ctx = NULL, kl_ctx_new(m, Max(kl_prefill_chunk, KL_DECODE_GROUP), &wm->ctx, &err) == KL_OK))
				{
					kl_model_free(m);
					memset(wm, 0, sizeof(*wm));
					rc = KL_FAIL;
				}
				else
				{
					wm->ctx_tokens = Max(kl_prefill_chunk, KL_DECODE_GROUP);
					wm->in_use = true;
				}
			}
			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (e->generation != gen || (e->state != KL_MODEL_LOADING && e->state != KL_MODEL_READY))
			{
				/* unloaded while we were loading it */
				LWLockRelease(kl_shared->lock);
				if (rc == KL_OK)
					free_wmodel(wm);
				continue;
			}
			if (rc == KL_OK)
			{
				bool		all = true;

				e->wload[me] = KL_WLOAD_READY;
				/* ready once every running worker has it */
				for (int w = 0; w < kl_shared->n_workers; w++)
					if (kl_shared->workers[w].pid != 0 && e->wload[w] != KL_WLOAD_READY)
						all = false;
				if (all && e->state == KL_MODEL_LOADING)
					e->state = KL_MODEL_READY;
				if (e->loaded_at == 0)
				{
					e->n_params = kl_model_n_params(m);
					e->bytes = (int64) kl_model_weight_bytes(m);
					strlcpy(e->device_name, kl_model_device(m), sizeof(e->device_name));
					strlcpy(e->routing_in_force, kl_model_moe_routing(m) ? kl_model_moe_routing(m) : "",
							sizeof(e->routing_in_force));
					strlcpy(e->precision_in_force, kl_model_precision(m), sizeof(e->precision_in_force));
					strlcpy(e->weight_format, kl_model_weight_format(m), sizeof(e->weight_format));
					e->weight_bytes = (int64) kl_model_resident_bytes(m);
					e->vocab_size = wm->vocab;
					e->has_tokenizer = wm->tok != NULL;
					e->loaded_at = GetCurrentTimestamp();
				}
			}
			else
			{
				e->wload[me] = KL_WLOAD_FAILED;
				if (e->error[0] == '\0')
				{
					strlcpy(e->error, err.msg, sizeof(e->error));
					e->error_code = err.code;
				}
				e->state = KL_MODEL_FAILED;
			}
			LWLockRelease(kl_shared->lock);
			if (rc == KL_OK)
				elog(LOG, "kimi_linear worker %d: loaded model \"%s\" from %s in %.2f s", me, name, path,
					 kl_now() - t0);
			else
				elog(LOG, "kimi_linear worker %d: could not load model \"%s\" from %s: %s", me, name, path,
					 err.msg);
			pgstat_report_activity(STATE_IDLE, NULL);
		}
	}
}

/* ------------------------------------------------------------------ lifetime */

/* At exit: every request this worker held fails at once (its backend is woken). */
static void
worker_exit(int code, Datum arg)
{
	int			me = kl_worker_index;

	if (kl_shared == NULL || me < 0)
		return;
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < kl_shared->n_slots; i++)
	{
		KlSlot	   *s = &kl_shared->slots[i];

		if (s->state == KL_SLOT_RUNNING && s->worker == me)
		{
			s->worker_done = true;
			if (s->backend_proc)
				SetLatch(&s->backend_proc->procLatch);
			kl_slot_release_locked(s);
		}
	}
	kl_shared->workers[me].pid = 0;
	kl_shared->workers[me].proc = NULL;
	kl_shared->workers[me].active = 0;
	LWLockRelease(kl_shared->lock);
}

static void
worker_start(int me)
{
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	/* requests a previous incarnation had taken cannot be finished: let their backends know */
	for (int i = 0; i < kl_shared->n_slots; i++)
	{
		KlSlot	   *s = &kl_shared->slots[i];

		if (s->state == KL_SLOT_RUNNING && s->worker == me)
		{
			s->worker_done = true;
			if (s->backend_proc)
				SetLatch(&s->backend_proc->procLatch);
			kl_slot_release_locked(s);
		}
	}
	for (int i = 0; i < KL_MAX_MODELS; i++)
		kl_shared->models[i].wload[me] = KL_WLOAD_NONE;
	kl_shared->workers[me].pid = MyProcPid;
	kl_shared->workers[me].proc = MyProc;
	if (kl_shared->workers[me].generation++ > 0)
		kl_shared->workers[me].restarts++;
	kl_shared->workers[me].started_at = GetCurrentTimestamp();
	kl_shared->workers[me].active = 0;
	LWLockRelease(kl_shared->lock);
}

static void
apply_settings(void)
{
	if (applied_threads != kl_threads)
	{
		kl_set_threads(kl_threads);
		applied_threads = kl_threads;
	}
}

void
kl_worker_main(Datum arg)
{
	int			me = DatumGetInt32(arg);
	sigjmp_buf	local_sigjmp_buf;

	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	kl_require_shared();
	if (me < 0 || me >= kl_shared->n_workers)
		proc_exit(0);
	kl_worker_index = me;
	before_shmem_exit(worker_exit, (Datum) 0);
	worker_start(me);
	kl_batch_init();
	apply_settings();
	pgstat_report_appname("kimi_linear worker");
	elog(LOG, "kimi_linear worker %d started (%d engine threads)", me, kl_get_threads());

	/*
	 * Error recovery: like the auxiliary processes' loops, an ERROR returns
	 * here; the requests in flight get it as their reply.
	 */
	if (sigsetjmp(local_sigjmp_buf, 1) != 0)
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		error_context_stack = NULL;
		LWLockReleaseAll();
		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		EmitErrorReport();
		FlushErrorState();
		kl_batch_fail_all(NULL, KL_E_INTERNAL, edata->message,
						  "The inference worker hit an internal error; see the server log.");
		FreeErrorData(edata);
		RESUME_INTERRUPTS();
	}
	PG_exception_stack = &local_sigjmp_buf;

	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		if (ShutdownRequestPending)
		{
			kl_batch_fail_all(NULL, KL_ERR_SHUTDOWN,
							  "the kimi_linear inference worker was terminated while running this request",
							  "The worker restarts by itself; run the statement again.");
			kl_batch_drain(500);
			elog(LOG, "kimi_linear worker %d: terminating on request", me);
			proc_exit(1);		/* 1: the postmaster restarts us */
		}
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			apply_settings();
			kl_cache_trim();
		}
		ResetLatch(MyLatch);
		sync_models();
		kl_batch_admit();
		kl_batch_poll();
		if (kl_batch_runnable())
		{
			pgstat_report_activity(STATE_RUNNING, "inference");
			kl_batch_step();
			kl_batch_poll();
			continue;
		}
		pgstat_report_activity(STATE_IDLE, NULL);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1000,
						 PG_WAIT_EXTENSION);
	}
}
