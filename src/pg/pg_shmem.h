/*
 * pg_shmem.h — the control area in shared memory: the settings, the model
 * registry, the inference workers' status and the request slots.
 *
 * The postmaster reserves it (shared_preload_libraries); backends and workers
 * attach.  Registry and slot allocation are protected by one LWLock; a slot's
 * progress fields by its spinlock; cancel flags are atomics.
 */
#ifndef KL_PG_SHMEM_H
#define KL_PG_SHMEM_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "port/atomics.h"
#include "storage/dsm.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/spin.h"

#include "pg_protocol.h"

#define KL_MAX_WORKERS 16
#define KL_MAX_MODELS 16

/* ------------------------------------------------------------------ settings (pg_guc.c) */

extern char *kl_guc_model_dir;
extern char *kl_guc_default_model;
extern int	kl_workers;
extern int	kl_device;
extern int	kl_threads;
extern int	kl_max_context;
extern int	kl_max_new_tokens;
extern int	kl_max_requests;
extern int	kl_prefill_chunk;
extern int	kl_page_size;

#define KL_DEVICE_CPU 0
#define KL_DEVICE_CUDA 1
#define KL_DEVICE_AUTO 2

void		kl_define_gucs(void);
const char *kl_device_name(int device);

/* ------------------------------------------------------------------ registry */

typedef enum KlModelState
{
	KL_MODEL_FREE = 0,
	KL_MODEL_LOADING,			/* registered; workers are loading it */
	KL_MODEL_READY,				/* every live worker has it */
	KL_MODEL_FAILED,			/* a worker could not load it (error below) */
	KL_MODEL_UNLOADING			/* workers are releasing it */
} KlModelState;

/* per worker: has it loaded this entry? */
#define KL_WLOAD_NONE 0
#define KL_WLOAD_READY 1
#define KL_WLOAD_FAILED 2

typedef struct KlModelEntry
{
	KlModelState state;
	uint32		generation;		/* changes whenever the entry is reused */
	char		name[KL_MODEL_NAME_LEN];
	char		path[MAXPGPATH];
	int			device;			/* as requested at load time */
	uint8		wload[KL_MAX_WORKERS];
	char		error[512];
	/* filled by the first worker that loads it */
	int64		n_params;
	int64		bytes;
	char		device_name[16];	/* where it actually runs */
	int32		vocab_size;
	TimestampTz loaded_at;
} KlModelEntry;

/* ------------------------------------------------------------------ workers */

typedef struct KlWorkerInfo
{
	pid_t		pid;			/* 0 when not running */
	PGPROC	   *proc;			/* for its latch */
	uint32		generation;		/* bumped at every (re)start: backends notice deaths */
	int			active;			/* requests admitted and not finished */
} KlWorkerInfo;

/* ------------------------------------------------------------------ request slots */

typedef enum KlSlotState
{
	KL_SLOT_FREE = 0,
	KL_SLOT_SUBMITTED,			/* backend has sent the request; worker not yet admitted it */
	KL_SLOT_RUNNING,			/* admitted by the worker */
	KL_SLOT_FINISHED			/* the worker is done with it (backend frees it) */
} KlSlotState;

typedef enum KlPhase
{
	KL_PHASE_QUEUED = 0,
	KL_PHASE_PREFILL,
	KL_PHASE_DECODE,
	KL_PHASE_DONE
} KlPhase;

typedef struct KlSlot
{
	/* set by the backend under the LWLock */
	KlSlotState state;
	uint64		request_id;
	int			worker;
	uint32		worker_generation;
	dsm_handle	handle;
	pid_t		backend_pid;
	PGPROC	   *backend_proc;
	char		model[KL_MODEL_NAME_LEN];
	pg_atomic_uint32 cancel;	/* backend: stop this request */

	/* progress, written by the worker under the spinlock (the activity view) */
	slock_t		mutex;
	KlPhase		phase;
	int64		prompt_done;
	int64		prompt_total;
	int64		generated;
	TimestampTz submitted_at;
	TimestampTz started_at;
	double		tokens_per_second;
} KlSlot;

typedef struct KlShared
{
	LWLock	   *lock;
	uint64		next_request_id;
	int			n_workers;
	KlWorkerInfo workers[KL_MAX_WORKERS];
	KlModelEntry models[KL_MAX_MODELS];
	int			n_slots;
	KlSlot		slots[FLEXIBLE_ARRAY_MEMBER];
} KlShared;

extern KlShared *kl_shared;

void		kl_shmem_request(void);
void		kl_shmem_startup(void);
/* error unless the library was preloaded (the control area exists) */
void		kl_require_shared(void);

/* wake a worker (or all when w < 0) */
void		kl_wake_workers(int w);

#endif
