/*
 * pg_client.c — the backend's side of inference requests and of the model
 * registry (see pg_client.h, pg_protocol.h).
 *
 * Waiting is always on the process latch with a 100 ms timeout, so a backend
 * notices cancellation (pg_cancel_backend, statement_timeout) and a dead
 * worker promptly; nothing here blocks indefinitely.  Requests that are in
 * flight when a (sub)transaction aborts are handed back by an abort callback:
 * the slot is freed and the worker, seeing the cancel flag, drops the work.
 */
#include "postgres.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "kl.h"
#include "pg_client.h"
#include "pg_shmem.h"

#define KL_QUEUE_SIZE (256 * 1024)
#define KL_BUNDLED_MODEL "pgdocs-kimi-18m"

/* in-flight requests of this backend, for cleanup at abort */
typedef struct Inflight
{
	bool		used;
	int			slot;
	uint64		request_id;
	SubTransactionId subxact;
} Inflight;

static Inflight inflight[16];
static bool callbacks_registered = false;

static void
slot_give_back(int slot, uint64 request_id)
{
	KlSlot	   *s = &kl_shared->slots[slot];

	pg_atomic_write_u32(&s->cancel, 1);
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	if (s->request_id == request_id && s->state != KL_SLOT_FREE)
	{
		int			w = s->worker;

		s->state = KL_SLOT_FREE;
		s->request_id = 0;
		LWLockRelease(kl_shared->lock);
		kl_wake_workers(w);		/* so that it drops the work now */
		return;
	}
	LWLockRelease(kl_shared->lock);
}

static void
abort_inflight(bool only_subxact, SubTransactionId subxact)
{
	for (int i = 0; i < lengthof(inflight); i++)
		if (inflight[i].used && (!only_subxact || inflight[i].subxact == subxact))
		{
			inflight[i].used = false;
			if (kl_shared)
				slot_give_back(inflight[i].slot, inflight[i].request_id);
		}
}

static void
xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_COMMIT || event == XACT_EVENT_PREPARE)
		abort_inflight(false, 0);
}

static void
subxact_callback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		abort_inflight(true, mySubid);
}

static void
track(KlClient *c)
{
	if (!callbacks_registered)
	{
		RegisterXactCallback(xact_callback, NULL);
		RegisterSubXactCallback(subxact_callback, NULL);
		callbacks_registered = true;
	}
	for (int i = 0; i < lengthof(inflight); i++)
		if (!inflight[i].used)
		{
			inflight[i].used = true;
			inflight[i].slot = c->slot;
			inflight[i].request_id = c->request_id;
			inflight[i].subxact = GetCurrentSubTransactionId();
			return;
		}
	/* more than 16 at once in one backend: the slots are still freed by release */
}

static void
untrack(KlClient *c)
{
	for (int i = 0; i < lengthof(inflight); i++)
		if (inflight[i].used && inflight[i].request_id == c->request_id)
			inflight[i].used = false;
}

/* ------------------------------------------------------------------ waiting */

static void
check_worker(KlClient *c)
{
	if (kl_shared->workers[c->worker].generation != c->worker_generation)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the kimi_linear inference worker stopped during the request"),
				 errhint("The worker restarts by itself; run the statement again.")));
}

static void
wait_a_bit(void)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 100, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

/* ------------------------------------------------------------------ requests */

void
kl_client_submit(KlClient *c, const KlRequest *hdr, const int32 *stop_ids, const int32 *prompt, int n_prompt,
				 bytea **state_parts, int n_state_parts)
{
	int			best = -1;
	Size		size = MAXALIGN(sizeof(uint64)) + 2 * (Size) KL_QUEUE_SIZE;
	char	   *base;
	shm_mq	   *req_mq,
			   *rep_mq;
	shm_mq_iovec *iov;
	int			niov = 0;
	uint64	   *lens;

	kl_require_shared();
	memset(c, 0, sizeof(*c));
	c->slot = -1;
	c->mcxt = CurrentMemoryContext;
	initStringInfo(&c->text);

	c->seg = dsm_create(size, 0);
	base = dsm_segment_address(c->seg);
	req_mq = shm_mq_create(base + MAXALIGN(sizeof(uint64)), KL_QUEUE_SIZE);
	rep_mq = shm_mq_create(base + MAXALIGN(sizeof(uint64)) + KL_QUEUE_SIZE, KL_QUEUE_SIZE);
	shm_mq_set_sender(req_mq, MyProc);
	shm_mq_set_receiver(rep_mq, MyProc);
	c->req = shm_mq_attach(req_mq, c->seg, NULL);
	c->rep = shm_mq_attach(rep_mq, c->seg, NULL);

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	/* the least busy running worker */
	for (int w = 0; w < kl_shared->n_workers; w++)
		if (kl_shared->workers[w].pid != 0 &&
			(best < 0 || kl_shared->workers[w].active < kl_shared->workers[best].active))
			best = w;
	if (best < 0)
	{
		LWLockRelease(kl_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no kimi_linear inference worker is running"),
				 errhint("Workers start with the server (kimi_linear.workers); a stopped one restarts within seconds.")));
	}
	for (int s = 0; s < kl_shared->n_slots; s++)
		if (kl_shared->slots[s].state == KL_SLOT_FREE)
		{
			KlSlot	   *slot = &kl_shared->slots[s];

			c->slot = s;
			c->request_id = kl_shared->next_request_id++;
			c->worker = best;
			c->worker_generation = kl_shared->workers[best].generation;
			slot->state = KL_SLOT_SUBMITTED;
			slot->request_id = c->request_id;
			slot->worker = best;
			slot->worker_generation = c->worker_generation;
			slot->handle = dsm_segment_handle(c->seg);
			slot->backend_pid = MyProcPid;
			slot->backend_proc = MyProc;
			strlcpy(slot->model, hdr->model, sizeof(slot->model));
			pg_atomic_write_u32(&slot->cancel, 0);
			SpinLockAcquire(&slot->mutex);
			slot->phase = KL_PHASE_QUEUED;
			slot->prompt_done = 0;
			slot->prompt_total = n_prompt;
			slot->generated = 0;
			slot->submitted_at = GetCurrentTimestamp();
			slot->tokens_per_second = 0;
			SpinLockRelease(&slot->mutex);
			break;
		}
	LWLockRelease(kl_shared->lock);
	if (c->slot < 0)
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many kimi_linear requests in flight (kimi_linear.max_requests = %d)", kl_max_requests),
				 errhint("Retry when others have finished, or raise kimi_linear.max_requests (needs a restart).")));
	track(c);
	kl_wake_workers(c->worker);

	/* the request: header, stop ids, prompt, then (length, bytes) per state part */
	iov = palloc(sizeof(shm_mq_iovec) * (3 + 2 * n_state_parts));
	lens = palloc(sizeof(uint64) * (n_state_parts + 1));
	iov[niov].data = (const char *) hdr;
	iov[niov++].len = sizeof(KlRequest);
	iov[niov].data = (const char *) stop_ids;
	iov[niov++].len = sizeof(int32) * hdr->n_stop_ids;
	iov[niov].data = (const char *) prompt;
	iov[niov++].len = sizeof(int32) * n_prompt;
	for (int i = 0; i < n_state_parts; i++)
	{
		lens[i] = VARSIZE_ANY_EXHDR(state_parts[i]);
		iov[niov].data = (const char *) &lens[i];
		iov[niov++].len = sizeof(uint64);
		iov[niov].data = VARDATA_ANY(state_parts[i]);
		iov[niov++].len = lens[i];
	}
	for (;;)
	{
		shm_mq_result res = shm_mq_sendv(c->req, iov, niov, true, true);

		if (res == SHM_MQ_SUCCESS)
			break;
		check_worker(c);
		if (res == SHM_MQ_DETACHED)
		{
			/* the worker gave up on it: its reason is waiting in the reply queue */
			break;
		}
		wait_a_bit();
	}
	pfree(iov);
	pfree(lens);
}

static void
add_ids(KlClient *c, const int32 *ids, int n)
{
	if (c->n_ids + n > c->cap_ids)
	{
		int			cap = Max(64, 2 * (c->n_ids + n));

		c->ids = c->ids ? repalloc(c->ids, sizeof(int32) * cap) : MemoryContextAlloc(c->mcxt, sizeof(int32) * cap);
		c->cap_ids = cap;
	}
	memcpy(c->ids + c->n_ids, ids, sizeof(int32) * n);
	c->n_ids += n;
}

char *
kl_client_next(KlClient *c)
{
	for (;;)
	{
		Size		len;
		void	   *data;
		shm_mq_result res;

		if (c->finished)
			return NULL;
		res = shm_mq_receive(c->rep, &len, &data, true);
		if (res == SHM_MQ_WOULD_BLOCK)
		{
			check_worker(c);
			wait_a_bit();
			continue;
		}
		if (res == SHM_MQ_DETACHED)
		{
			check_worker(c);
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("the kimi_linear inference worker ended the request without an answer")));
		}
		if (len < 1)
			continue;
		switch (((const char *) data)[0])
		{
			case KL_MSG_TOKENS:
				{
					KlMsgTokens m;
					char	   *piece;
					MemoryContext old;

					if (len < sizeof(m))
						break;
					memcpy(&m, data, sizeof(m));
					if (m.n_ids < 0 || m.text_len < 0 ||
						sizeof(m) + sizeof(int32) * (Size) m.n_ids + (Size) m.text_len != len)
						break;
					old = MemoryContextSwitchTo(c->mcxt);
					add_ids(c, (const int32 *) ((const char *) data + sizeof(m)), m.n_ids);
					piece = pnstrdup((const char *) data + sizeof(m) + sizeof(int32) * m.n_ids, m.text_len);
					appendBinaryStringInfo(&c->text, piece, m.text_len);
					MemoryContextSwitchTo(old);
					return piece;
				}
			case KL_MSG_STATE:
				{
					KlMsgState m;
					KlStatePart *p;

					if (len < sizeof(m))
						break;
					memcpy(&m, data, sizeof(m));
					if (m.len != len - sizeof(m) || m.len > MaxAllocSize - VARHDRSZ)
						ereport(ERROR,
								(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
								 errmsg("a state part of %llu bytes exceeds the 1 GB limit of a value",
										(unsigned long long) m.len),
								 errhint("Use a conversation (kimi_linear.say), which stores long histories in pages.")));
					if (c->n_parts == c->cap_parts)
					{
						c->cap_parts = Max(4, c->cap_parts * 2);
						c->parts = c->parts ? repalloc(c->parts, sizeof(KlStatePart) * c->cap_parts)
							: MemoryContextAlloc(c->mcxt, sizeof(KlStatePart) * c->cap_parts);
					}
					p = &c->parts[c->n_parts++];
					p->kind = m.kind;
					p->from_pos = m.from_pos;
					p->to_pos = m.to_pos;
					p->blob = MemoryContextAlloc(c->mcxt, VARHDRSZ + m.len);
					SET_VARSIZE(p->blob, VARHDRSZ + m.len);
					memcpy(VARDATA(p->blob), (const char *) data + sizeof(m), m.len);
					break;
				}
			case KL_MSG_DONE:
				if (len >= sizeof(KlMsgDone))
					memcpy(&c->done, data, sizeof(KlMsgDone));
				c->finished = true;
				return NULL;
			case KL_MSG_ERROR:
				{
					KlMsgError m;
					char	   *msg;
					int			code;

					memcpy(&m, data, Min(len, sizeof(m)));
					msg = pnstrdup((const char *) data + sizeof(m), Max(0, Min(m.len, (int32) (len - sizeof(m)))));
					code = m.code == KL_ERR_INVALID ? ERRCODE_INVALID_PARAMETER_VALUE :
						m.code == KL_ERR_RESOURCES ? ERRCODE_PROGRAM_LIMIT_EXCEEDED :
						m.code == KL_ERR_MODEL ? ERRCODE_UNDEFINED_OBJECT : ERRCODE_INTERNAL_ERROR;
					c->finished = true;
					ereport(ERROR, (errcode(code), errmsg("%s", msg)));
				}
		}
	}
}

void
kl_client_wait(KlClient *c)
{
	while (kl_client_next(c) != NULL)
		;
}

void
kl_client_release(KlClient *c)
{
	if (c->slot >= 0)
	{
		slot_give_back(c->slot, c->request_id);
		untrack(c);
		c->slot = -1;
	}
	if (c->seg)
	{
		dsm_detach(c->seg);
		c->seg = NULL;
	}
}

/* ------------------------------------------------------------------ models */

static bool
valid_model_name(const char *name)
{
	size_t		n = strlen(name);

	if (n == 0 || n >= KL_MODEL_NAME_LEN)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!(isalnum((unsigned char) name[i]) || name[i] == '_' || name[i] == '-' || name[i] == '.'))
			return false;
	return true;
}

static void
check_admin(void)
{
	Oid			admin = get_role_oid("kimi_linear_admin", true);

	if (!superuser() && !(OidIsValid(admin) && has_privs_of_role(GetUserId(), admin)))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to load or unload kimi_linear models"),
				 errhint("Only superusers and members of kimi_linear_admin may; ask for GRANT kimi_linear_admin TO %s.",
						 GetUserNameFromId(GetUserId(), false))));
}

/* path -> canonical absolute path inside model_dir, or ERROR */
static void
resolve_model_path(const char *path, char *out)
{
	char		candidate[MAXPGPATH];
	char		dir[PATH_MAX];
	char		real[PATH_MAX];
	struct stat sb;
	size_t		dl;

	if (!path || !*path)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("model path must not be empty")));
	if (!realpath(kl_guc_model_dir, dir))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("kimi_linear.model_dir \"%s\" does not exist", kl_guc_model_dir),
				 errhint("Create it, or set kimi_linear.model_dir to the directory that holds your models.")));
	if (path[0] == '/')
		strlcpy(candidate, path, sizeof(candidate));
	else
		snprintf(candidate, sizeof(candidate), "%s/%s", kl_guc_model_dir, path);
	if (!realpath(candidate, real) || stat(real, &sb) != 0 || !S_ISDIR(sb.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("model directory \"%s\" does not exist", candidate),
				 errhint("Paths are relative to kimi_linear.model_dir (%s).", kl_guc_model_dir)));
	dl = strlen(dir);
	if (!(strncmp(real, dir, dl) == 0 && (real[dl] == '/' || real[dl] == 0)) || strcmp(real, dir) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("model path \"%s\" is outside kimi_linear.model_dir (%s)", path, dir),
				 errhint("Models load only from a directory under kimi_linear.model_dir (symbolic links are resolved first).")));
	strlcpy(out, real, MAXPGPATH);
}

static int
find_entry(const char *name)
{
	for (int e = 0; e < KL_MAX_MODELS; e++)
		if (kl_shared->models[e].state != KL_MODEL_FREE && strcmp(kl_shared->models[e].name, name) == 0)
			return e;
	return -1;
}

/* Wait until the entry is READY (returns) or FAILED / gone (ERROR). */
static void
wait_loaded(int e, uint32 gen, const char *name)
{
	for (;;)
	{
		KlModelState st;
		char		error[512];

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		st = kl_shared->models[e].generation == gen ? kl_shared->models[e].state : KL_MODEL_FREE;
		strlcpy(error, kl_shared->models[e].error, sizeof(error));
		LWLockRelease(kl_shared->lock);
		if (st == KL_MODEL_READY)
			return;
		if (st == KL_MODEL_FAILED)
		{
			/* forget the failed entry so that a corrected model can be loaded again */
			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (kl_shared->models[e].generation == gen && kl_shared->models[e].state == KL_MODEL_FAILED)
			{
				kl_shared->models[e].state = KL_MODEL_UNLOADING;
				kl_shared->models[e].generation++;
				memset(kl_shared->models[e].wload, 0, sizeof(kl_shared->models[e].wload));
				kl_shared->models[e].state = KL_MODEL_FREE;
			}
			LWLockRelease(kl_shared->lock);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("could not load model \"%s\": %s", name, error)));
		}
		if (st == KL_MODEL_FREE || st == KL_MODEL_UNLOADING)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("model \"%s\" was unloaded while loading", name)));
		wait_a_bit();
	}
}

void
kl_model_register(const char *name, const char *path, bool check_privilege)
{
	char		real[MAXPGPATH];
	int			e = -1;
	uint32		gen;

	kl_require_shared();
	if (check_privilege)
		check_admin();
	if (!name || !valid_model_name(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid model name \"%s\"", name ? name : "(null)"),
				 errhint("A name has 1 to %d letters, digits, '_', '-' or '.'.", KL_MODEL_NAME_LEN - 1)));
	resolve_model_path(path, real);

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	if (find_entry(name) >= 0)
	{
		LWLockRelease(kl_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("a model named \"%s\" is already loaded", name),
				 errhint("Unload it first with kimi_linear.unload_model('%s').", name)));
	}
	for (int i = 0; i < KL_MAX_MODELS; i++)
		if (kl_shared->models[i].state == KL_MODEL_FREE)
		{
			e = i;
			break;
		}
	if (e < 0)
	{
		LWLockRelease(kl_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many models loaded (at most %d)", KL_MAX_MODELS)));
	}
	{
		KlModelEntry *me = &kl_shared->models[e];

		me->generation++;
		gen = me->generation;
		strlcpy(me->name, name, sizeof(me->name));
		strlcpy(me->path, real, sizeof(me->path));
		me->device = kl_device;
		memset(me->wload, 0, sizeof(me->wload));
		me->error[0] = 0;
		me->n_params = me->bytes = 0;
		me->device_name[0] = 0;
		me->loaded_at = 0;
		me->state = KL_MODEL_LOADING;
	}
	LWLockRelease(kl_shared->lock);
	kl_wake_workers(-1);
	wait_loaded(e, gen, name);
}

void
kl_model_unregister(const char *name)
{
	int			e;
	uint32		gen;

	kl_require_shared();
	check_admin();
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	e = name ? find_entry(name) : -1;
	if (e < 0)
	{
		LWLockRelease(kl_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" is not loaded", name ? name : "(null)")));
	}
	kl_shared->models[e].state = KL_MODEL_UNLOADING;
	gen = kl_shared->models[e].generation;
	LWLockRelease(kl_shared->lock);
	kl_wake_workers(-1);
	/* wait for every worker to let it go */
	for (;;)
	{
		bool		gone;

		LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
		gone = kl_shared->models[e].generation != gen || kl_shared->models[e].state == KL_MODEL_FREE;
		if (!gone)
		{
			bool		any = false;

			for (int w = 0; w < kl_shared->n_workers; w++)
				if (kl_shared->workers[w].pid != 0 && kl_shared->models[e].wload[w] != KL_WLOAD_NONE)
					any = true;
			if (!any)
			{
				kl_shared->models[e].state = KL_MODEL_FREE;
				kl_shared->models[e].generation++;
				gone = true;
			}
		}
		LWLockRelease(kl_shared->lock);
		if (gone)
			return;
		wait_a_bit();
	}
}

int
kl_model_resolve(const char *name)
{
	int			e;
	uint32		gen;
	const char *want = name;

	kl_require_shared();
	if (!want || !*want)
		want = kl_guc_default_model && *kl_guc_default_model ? kl_guc_default_model : NULL;

	LWLockAcquire(kl_shared->lock, LW_SHARED);
	if (want)
		e = find_entry(want);
	else
	{
		int			n = 0;

		e = -1;
		for (int i = 0; i < KL_MAX_MODELS; i++)
			if (kl_shared->models[i].state != KL_MODEL_FREE && kl_shared->models[i].state != KL_MODEL_UNLOADING)
			{
				n++;
				e = i;
			}
		if (n > 1)
		{
			LWLockRelease(kl_shared->lock);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("several models are loaded and no model was named"),
					 errhint("Pass model => 'name', or set kimi_linear.default_model.")));
		}
	}
	gen = e >= 0 ? kl_shared->models[e].generation : 0;
	LWLockRelease(kl_shared->lock);

	if (e < 0)
	{
		/* the default: load it on first use */
		const char *auto_name = want ? want : KL_BUNDLED_MODEL;

		if (name && *name && !(kl_guc_default_model && strcmp(name, kl_guc_default_model) == 0) &&
			strcmp(name, KL_BUNDLED_MODEL) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("model \"%s\" is not loaded", name),
					 errhint("Load it with kimi_linear.load_model('%s', 'directory under kimi_linear.model_dir').", name)));
		PG_TRY();
		{
			kl_model_register(auto_name, auto_name, false);
		}
		PG_CATCH();
		{
			/* another session may have registered it first */
			LWLockAcquire(kl_shared->lock, LW_SHARED);
			e = find_entry(auto_name);
			LWLockRelease(kl_shared->lock);
			if (e < 0)
				PG_RE_THROW();
			FlushErrorState();
		}
		PG_END_TRY();
		LWLockAcquire(kl_shared->lock, LW_SHARED);
		e = find_entry(auto_name);
		gen = e >= 0 ? kl_shared->models[e].generation : 0;
		LWLockRelease(kl_shared->lock);
		if (e < 0)
			ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT), errmsg("model \"%s\" is not loaded", auto_name)));
	}
	wait_loaded(e, gen, kl_shared->models[e].name);
	return e;
}

void
kl_model_entry_name(int e, char *out)
{
	LWLockAcquire(kl_shared->lock, LW_SHARED);
	strlcpy(out, kl_shared->models[e].name, KL_MODEL_NAME_LEN);
	LWLockRelease(kl_shared->lock);
}

/* one tokenizer per registry entry, loaded in this backend on first use */
static struct
{
	uint32		generation;
	kl_tokenizer *tok;
}			tok_cache[KL_MAX_MODELS];

const kl_tokenizer *
kl_model_tokenizer_for(int e)
{
	char		path[MAXPGPATH];
	uint32		gen;
	kl_err		err;
	kl_tokenizer *t;

	LWLockAcquire(kl_shared->lock, LW_SHARED);
	gen = kl_shared->models[e].generation;
	strlcpy(path, kl_shared->models[e].path, sizeof(path));
	LWLockRelease(kl_shared->lock);
	if (tok_cache[e].tok && tok_cache[e].generation == gen)
		return tok_cache[e].tok;
	if (tok_cache[e].tok)
	{
		kl_tokenizer_free(tok_cache[e].tok);
		tok_cache[e].tok = NULL;
	}
	if (kl_tokenizer_load(path, &t, &err) != KL_OK)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the model has no usable tokenizer: %s", err.msg),
				 errhint("Models without tiktoken.model accept token ids only (the ids argument).")));
	tok_cache[e].tok = t;
	tok_cache[e].generation = gen;
	return t;
}
