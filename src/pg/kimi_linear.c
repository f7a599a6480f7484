/*
 * kimi_linear.c — the extension's entry point: settings, shared memory and
 * the inference workers, set up when the library is preloaded
 * (shared_preload_libraries = 'kimi_linear').
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"

#include "pg_shmem.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	kl_shmem_request();
}

static void
startup_hook(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	kl_shmem_startup();
}

void
_PG_init(void)
{
	kl_define_gucs();
	if (!process_shared_preload_libraries_in_progress)
		return;					/* functions will say that preloading is needed */

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = startup_hook;

	for (int i = 0; i < kl_workers; i++)
	{
		BackgroundWorker w;

		memset(&w, 0, sizeof(w));
		/* no database connection: workers only run models */
		w.bgw_flags = BGWORKER_SHMEM_ACCESS;
		w.bgw_start_time = BgWorkerStart_PostmasterStart;
		w.bgw_restart_time = 1;
		snprintf(w.bgw_library_name, BGW_MAXLEN, "kimi_linear");
		snprintf(w.bgw_function_name, BGW_MAXLEN, "kl_worker_main");
		snprintf(w.bgw_name, BGW_MAXLEN, "kimi_linear inference worker %d", i);
		snprintf(w.bgw_type, BGW_MAXLEN, "kimi_linear inference worker");
		w.bgw_main_arg = Int32GetDatum(i);
		RegisterBackgroundWorker(&w);
	}
}
