/*
 * pg_shmem.c — reserving and attaching the control area (see pg_shmem.h).
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/shmem.h"

#include "pg_registry.h"
#include "pg_shmem.h"

KlShared   *kl_shared = NULL;

static Size
control_size(void)
{
	return add_size(offsetof(KlShared, slots), mul_size(sizeof(KlSlot), kl_max_requests));
}

/* shmem_request_hook: called in the postmaster */
void
kl_shmem_request(void)
{
	RequestAddinShmemSpace(control_size());
	RequestNamedLWLockTranche("kimi_linear", 2);
}

/*
 * shmem_startup_hook: create the area (postmaster), after a crash restart too,
 * with the registry as the registry file left it.
 */
void
kl_shmem_startup(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	kl_shared = ShmemInitStruct("kimi_linear", control_size(), &found);
	if (!found)
	{
		memset(kl_shared, 0, control_size());
		kl_shared->lock = &(GetNamedLWLockTranche("kimi_linear"))[0].lock;
		kl_shared->registry_lock = &(GetNamedLWLockTranche("kimi_linear"))[1].lock;
		kl_shared->next_request_id = 1;
		kl_shared->next_model_generation = 1;
		kl_shared->n_workers = kl_workers;
		kl_shared->n_slots = kl_max_requests;
		for (int i = 0; i < kl_max_requests; i++)
		{
			SpinLockInit(&kl_shared->slots[i].mutex);
			pg_atomic_init_u32(&kl_shared->slots[i].cancel, 0);
		}
		/* the models loaded before the restart: the workers load them as they start */
		kl_registry_restore();
	}
	LWLockRelease(AddinShmemInitLock);
}

void
kl_require_shared(void)
{
	if (kl_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("kimi_linear was not loaded at server start"),
				 errhint("Add kimi_linear to shared_preload_libraries in postgresql.conf and restart the server.")));
}

void
kl_wake_workers(int w)
{
	for (int i = 0; i < kl_shared->n_workers; i++)
	{
		PGPROC	   *p;

		if (w >= 0 && i != w)
			continue;
		p = kl_shared->workers[i].proc;
		if (p && kl_shared->workers[i].pid != 0)
			SetLatch(&p->procLatch);
	}
}

void
kl_slot_release_locked(KlSlot *slot)
{
	if (slot->state != KL_SLOT_FREE && slot->backend_done && slot->worker_done)
	{
		slot->state = KL_SLOT_FREE;
		slot->request_id = 0;
		slot->handle = DSM_HANDLE_INVALID;
		slot->backend_pid = 0;
		slot->backend_proc = NULL;
		pg_atomic_write_u32(&slot->cancel, 0);
	}
}
