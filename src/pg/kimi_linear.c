/*
 * kimi_linear.c — the extension's entry point: settings, shared memory and
 * the inference workers, set up when the library is preloaded
 * (shared_preload_libraries = 'kimi_linear').
 *
 * Loading the library in the postmaster also loads OpenBLAS, whose
 * constructor starts threads; they inherit the postmaster's mask, which
 * blocks the signals the postmaster handles at this point of its start, and
 * OpenBLAS stops them before every fork (pthread_atfork).  The engine's own
 * thread pool starts only in inference workers, on first use.
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"

#include "pg_guc.h"
#include "pg_shmem.h"
#include "pg_worker.h"

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
		return;					/* SQL functions will say that preloading is needed */

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = startup_hook;
	kl_register_workers();
}
