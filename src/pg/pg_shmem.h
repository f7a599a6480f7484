/*
 * pg_shmem.h — the control area in shared memory: the model registry, the
 * inference workers' status and the request slots.
 *
 * The postmaster reserves it (shared_preload_libraries) and fills the
 * registry from the registry file (pg_registry.h); backends and workers
 * attach.  The registry, worker entries and slot allocation are protected by
 * one LWLock (kl_shared->lock); a slot's progress fields by its spinlock;
 * cancel flags are atomics.  Nothing here points into process memory except
 * the PGPROC pointers (themselves in shared memory) used to set latches.
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

#include "pg_guc.h"
#include "pg_protocol.h"

#define KL_MAX_WORKERS 16
#define KL_MAX_MODELS 16
#define KL_MODEL_OPTIONS_LEN 256

/* ------------------------------------------------------------------ registry */

typedef enum KlModelState
{
	KL_MODEL_FREE = 0,
	KL_MODEL_LOADING,			/* registered; workers are loading it */
	KL_MODEL_READY,				/* every live worker has it */
	KL_MODEL_FAILED,			/* a worker could not load it (error below) */
	KL_MODEL_UNLOADING			/* workers are releasing it */
} KlModelState;

/* per worker: what it has done with this entry */
#define KL_WLOAD_NONE 0
#define KL_WLOAD_READY 1
#define KL_WLOAD_FAILED 2

typedef struct KlModelEntry
{
	KlModelState state;
	uint32		generation;		/* new value whenever the entry is (re)used */
	char		name[KL_MODEL_NAME_LEN];
	char		path[MAXPGPATH];	/* resolved (realpath) directory */
	char		root[MAXPGPATH];	/* resolved kimi_linear.model_dir it was checked against:
									 * every file of the model must resolve inside it */
	int			device;			/* KL_DEVICE_* requested at load time */
	char		options[KL_MODEL_OPTIONS_LEN];	/* load options, kept and replayed verbatim
												 * (pg_registry.h) */
	bool		persisted;		/* in the registry file: loaded again after a restart */
	uint8		wload[KL_MAX_WORKERS];
	char		error[1024];	/* why loading failed */
	int			error_code;		/* and the code of that error (kl_errcode) */
	/* filled by the first worker that loads it */
	int64		n_params;
	int64		bytes;
	char		device_name[16];	/* where it actually runs */
	char		routing_in_force[16];	/* "select", "reference", "" for a dense model */
	char		precision_in_force[8];	/* "fp32", "bf16" or "fp8" (kl_model_precision) */
	char		weight_format[160]; /* kl_model_weight_format */
	int64		weight_bytes;	/* kl_model_resident_bytes */
	int32		vocab_size;
	bool		has_tokenizer;
	TimestampTz loaded_at;
} KlModelEntry;

/* ------------------------------------------------------------------ workers */

typedef struct KlWorkerInfo
{
	pid_t		pid;			/* 0 when not running */
	PGPROC	   *proc;			/* for its latch */
	uint32		generation;		/* bumped at every start */
	int			restarts;		/* starts after the first */
	TimestampTz started_at;
	int			active;			/* requests taken and not finished */
	int64		steps;			/* forward steps run (observability) */
	int64		tokens;			/* tokens processed */
} KlWorkerInfo;

/* ------------------------------------------------------------------ request slots */

typedef enum KlSlotState
{
	KL_SLOT_FREE = 0,
	KL_SLOT_SUBMITTED,			/* sent; the worker has not taken it yet */
	KL_SLOT_RUNNING				/* taken by the worker */
} KlSlotState;

typedef enum KlPhase
{
	KL_PHASE_QUEUED = 0,
	KL_PHASE_PREFILL,
	KL_PHASE_DECODE,
	KL_PHASE_FINISHING			/* sending the state back */
} KlPhase;

typedef struct KlSlot
{
	/* under kl_shared->lock */
	KlSlotState state;
	uint64		request_id;
	int			worker;
	dsm_handle	handle;
	pid_t		backend_pid;
	PGPROC	   *backend_proc;
	bool		backend_done;	/* the backend has let go of the request */
	bool		worker_done;	/* the worker has let go of it */
	char		model[KL_MODEL_NAME_LEN];
	pg_atomic_uint32 cancel;	/* set by the backend: stop this request */

	/* progress, written by the worker under the spinlock (the activity view) */
	slock_t		mutex;
	KlPhase		phase;
	int64		prompt_done;
	int64		prompt_total;
	int64		generated;
	int64		max_tokens;
	TimestampTz submitted_at;
	TimestampTz started_at;		/* taken by the worker */
	double		tokens_per_second;
	/* written by the backend: the set-based call this request is part of (0: none) */
	int64		batch_id;
	int64		batch_done;		/* inputs of the batch finished */
	int64		batch_total;	/* inputs of the batch */
} KlSlot;

typedef struct KlShared
{
	LWLock	   *lock;
	LWLock	   *registry_lock;	/* serializes writers of the registry file (pg_registry.c) */
	uint64		next_request_id;
	uint32		next_model_generation;
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
/* wake one worker, or all when w < 0 */
void		kl_wake_workers(int w);
/* free a slot once both sides are done with it; caller holds the lock */
void		kl_slot_release_locked(KlSlot *slot);

#endif
