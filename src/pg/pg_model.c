/*
 * pg_model.c — the model registry, backend side (pg_model.h), and the SQL
 * functions load_model, unload_model, _resolve_model and the models view.
 *
 * A backend registers a model in shared memory (state LOADING) and waits;
 * every inference worker maps it and reports; the entry is READY when all
 * running workers have it, FAILED with the first worker's error otherwise.
 * Only superusers and members of kimi_linear_admin may load or unload, and
 * only from under kimi_linear.model_dir, checked after resolving symbolic
 * links.
 */
#include "postgres.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "funcapi.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "kl.h"
#include "quant.h"

#include "pg_guc.h"
#include "pg_model.h"
#include "pg_shmem.h"

PG_FUNCTION_INFO_V1(kl_sql_load_model);
PG_FUNCTION_INFO_V1(kl_sql_unload_model);
PG_FUNCTION_INFO_V1(kl_sql_resolve_model);
PG_FUNCTION_INFO_V1(kl_sql_models);

static void
wait_a_bit(void)
{
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 20, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	CHECK_FOR_INTERRUPTS();
}

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
				 errhint("Only superusers and members of kimi_linear_admin may; a superuser can GRANT kimi_linear_admin TO %s.",
						 GetUserNameFromId(GetUserId(), false))));
}

/* path -> canonical absolute directory inside model_dir, or ERROR */
static void
resolve_model_path(const char *path, char *out)
{
	char		candidate[MAXPGPATH];
	char		dir[PATH_MAX];
	char		real[PATH_MAX];
	struct stat sb;
	size_t		dl;

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
	if (!(strncmp(real, dir, dl) == 0 && real[dl] == '/'))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("model path \"%s\" is outside kimi_linear.model_dir (%s)", path, dir),
				 errhint("Models load only from a directory under kimi_linear.model_dir; symbolic links are resolved before the check.")));
	strlcpy(out, real, MAXPGPATH);
}

/* caller holds the lock */
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
		char		error[1024];

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		st = kl_shared->models[e].generation == gen ? kl_shared->models[e].state : KL_MODEL_FREE;
		strlcpy(error, kl_shared->models[e].error, sizeof(error));
		LWLockRelease(kl_shared->lock);
		if (st == KL_MODEL_READY)
			return;
		if (st == KL_MODEL_FAILED)
		{
			/* forget the failed entry so that a corrected model can be loaded under the name */
			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (kl_shared->models[e].generation == gen && kl_shared->models[e].state == KL_MODEL_FAILED)
			{
				kl_shared->models[e].state = KL_MODEL_UNLOADING;
				kl_shared->models[e].generation = kl_shared->next_model_generation++;
				memset(kl_shared->models[e].wload, 0, sizeof(kl_shared->models[e].wload));
				kl_shared->models[e].state = KL_MODEL_FREE;
			}
			LWLockRelease(kl_shared->lock);
			kl_wake_workers(-1);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("could not load model \"%s\": %s", name, error),
					 errhint("Check that the directory holds a Kimi Linear checkpoint (config.json, *.safetensors) readable by the server.")));
		}
		if (st == KL_MODEL_FREE || st == KL_MODEL_UNLOADING)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("model \"%s\" was unloaded while it was loading", name)));
		wait_a_bit();
	}
}

void
kl_model_register(const char *name, const char *path, const char *quantize, bool check_privilege)
{
	char		real[MAXPGPATH];
	int			e = -1;
	uint32		gen;
	kl_qtype	qt;
	kl_err		err;
	const char *q;

	kl_require_shared();
	if (check_privilege)
		check_admin();
	if (!valid_model_name(name))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid model name \"%s\"", name),
				 errhint("A name has 1 to %d letters, digits, '_', '-' or '.'.", KL_MODEL_NAME_LEN - 1)));
	if (path[0] == '\0')
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("model path must not be empty")));
	if (kl_qtype_parse(quantize, &qt, &err) != KL_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s", err.msg),
				 errhint("quantize => NULL (the weights as stored), 'fp8', 'int8' or 'int4'.")));
	q = qt == KL_Q_NONE ? "" : kl_qtype_name(qt);
	resolve_model_path(path, real);

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	e = find_entry(name);
	if (e >= 0)
	{
		bool		same = strcmp(kl_shared->models[e].path, real) == 0;
		char		had[sizeof(kl_shared->models[e].quantize)];

		gen = kl_shared->models[e].generation;
		strlcpy(had, kl_shared->models[e].quantize, sizeof(had));
		LWLockRelease(kl_shared->lock);
		if (!same)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("a model named \"%s\" is already loaded from another directory", name),
					 errhint("Unload it first with kimi_linear.unload_model('%s').", name)));
		if (strcmp(had, q) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("model \"%s\" is already loaded %s%s", name,
							had[0] ? "quantized to " : "without quantization", had),
					 errhint("Unload it first with kimi_linear.unload_model('%s'), or load it under another name.",
							 name)));
		/* the same model again: nothing to do once it is ready */
		wait_loaded(e, gen, name);
		return;
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
				 errmsg("too many models loaded (at most %d)", KL_MAX_MODELS),
				 errhint("Unload one with kimi_linear.unload_model(name).")));
	}
	{
		KlModelEntry *me = &kl_shared->models[e];

		me->generation = kl_shared->next_model_generation++;
		gen = me->generation;
		strlcpy(me->name, name, sizeof(me->name));
		strlcpy(me->path, real, sizeof(me->path));
		me->device = kl_device;
		strlcpy(me->quantize, q, sizeof(me->quantize));
		me->weight_format[0] = '\0';
		me->weight_bytes = 0;
		memset(me->wload, 0, sizeof(me->wload));
		me->error[0] = '\0';
		me->n_params = me->bytes = 0;
		me->device_name[0] = '\0';
		me->vocab_size = 0;
		me->has_tokenizer = false;
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
	e = find_entry(name);
	if (e < 0 || kl_shared->models[e].state == KL_MODEL_UNLOADING)
	{
		LWLockRelease(kl_shared->lock);
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" is not loaded", name),
				 errhint("SELECT name FROM kimi_linear.models lists the loaded models.")));
	}
	kl_shared->models[e].state = KL_MODEL_UNLOADING;
	gen = kl_shared->models[e].generation;
	LWLockRelease(kl_shared->lock);
	kl_wake_workers(-1);
	/* wait for every running worker to let it go (requests using it fail) */
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
				kl_shared->models[e].generation = kl_shared->next_model_generation++;
				memset(kl_shared->models[e].wload, 0, sizeof(kl_shared->models[e].wload));
				gone = true;
			}
		}
		LWLockRelease(kl_shared->lock);
		if (gone)
			return;
		wait_a_bit();
	}
}

void
kl_model_resolve(const char *name, KlModelRef *out)
{
	int			e;
	uint32		gen;
	const char *want = name && *name ? name : NULL;

	kl_require_shared();
	if (!want && kl_guc_default_model && *kl_guc_default_model)
		want = kl_guc_default_model;

	LWLockAcquire(kl_shared->lock, LW_SHARED);
	if (want)
		e = find_entry(want);
	else
	{
		int			n = 0;

		e = -1;
		for (int i = 0; i < KL_MAX_MODELS; i++)
			if (kl_shared->models[i].state == KL_MODEL_LOADING || kl_shared->models[i].state == KL_MODEL_READY)
			{
				n++;
				e = i;
			}
		if (n > 1)
		{
			LWLockRelease(kl_shared->lock);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("several models are loaded and the call names none"),
					 errhint("Pass model => 'name', or set kimi_linear.default_model.")));
		}
	}
	gen = e >= 0 ? kl_shared->models[e].generation : 0;
	LWLockRelease(kl_shared->lock);

	if (e < 0)
	{
		/* only the bundled model loads by itself, on first use */
		if (want && strcmp(want, KL_BUNDLED_MODEL) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("model \"%s\" is not loaded", want),
					 errhint("Load it with kimi_linear.load_model('%s', 'directory under kimi_linear.model_dir').", want)));
		/* (registering is idempotent: two sessions may do this at once) */
		kl_model_register(KL_BUNDLED_MODEL, KL_BUNDLED_MODEL, NULL, false);
		LWLockAcquire(kl_shared->lock, LW_SHARED);
		e = find_entry(KL_BUNDLED_MODEL);
		gen = e >= 0 ? kl_shared->models[e].generation : 0;
		LWLockRelease(kl_shared->lock);
		if (e < 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("no model is loaded"),
					 errhint("Load one with kimi_linear.load_model(name, path).")));
	}
	wait_loaded(e, gen, want ? want : KL_BUNDLED_MODEL);
	LWLockAcquire(kl_shared->lock, LW_SHARED);
	out->entry = e;
	out->generation = kl_shared->models[e].generation;
	strlcpy(out->name, kl_shared->models[e].name, sizeof(out->name));
	out->vocab_size = kl_shared->models[e].vocab_size;
	out->has_tokenizer = kl_shared->models[e].has_tokenizer;
	LWLockRelease(kl_shared->lock);
}

/* one tokenizer per registry entry, loaded in this backend on first use */
static struct
{
	uint32		generation;
	kl_tokenizer *tok;
}			tok_cache[KL_MAX_MODELS];

const kl_tokenizer *
kl_ref_tokenizer(const KlModelRef *ref)
{
	char		path[MAXPGPATH];
	kl_err		err;
	kl_tokenizer *t;
	int			e = ref->entry;

	if (tok_cache[e].tok && tok_cache[e].generation == ref->generation)
		return tok_cache[e].tok;
	if (!ref->has_tokenizer)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("model \"%s\" has no tokenizer", ref->name),
				 errhint("Its directory has no tiktoken.model; call generate_ids with token ids instead of text.")));
	LWLockAcquire(kl_shared->lock, LW_SHARED);
	strlcpy(path, kl_shared->models[e].path, sizeof(path));
	LWLockRelease(kl_shared->lock);
	if (tok_cache[e].tok)
	{
		kl_tokenizer_free(tok_cache[e].tok);
		tok_cache[e].tok = NULL;
	}
	if (kl_tokenizer_load(path, &t, &err) != KL_OK)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("could not load the tokenizer of model \"%s\": %s", ref->name, err.msg)));
	tok_cache[e].tok = t;
	tok_cache[e].generation = ref->generation;
	return t;
}

/* ------------------------------------------------------------------ SQL */

static char *
required_arg(FunctionCallInfo fcinfo, int i, const char *what)
{
	char	   *s;

	if (PG_ARGISNULL(i))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("%s must not be NULL", what)));
	s = text_to_cstring(PG_GETARG_TEXT_PP(i));
	if (s[0] == '\0')
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s must not be empty", what)));
	return s;
}

/* load_model(name text, path text, quantize text DEFAULT NULL) */
Datum
kl_sql_load_model(PG_FUNCTION_ARGS)
{
	char	   *name = required_arg(fcinfo, 0, "name");
	char	   *path = required_arg(fcinfo, 1, "path");
	char	   *quantize = PG_NARGS() > 2 && !PG_ARGISNULL(2) ? text_to_cstring(PG_GETARG_TEXT_PP(2)) : NULL;

	kl_model_register(name, path, quantize, true);
	PG_RETURN_VOID();
}

/* unload_model(name text) */
Datum
kl_sql_unload_model(PG_FUNCTION_ARGS)
{
	kl_model_unregister(required_arg(fcinfo, 0, "name"));
	PG_RETURN_VOID();
}

/* _resolve_model(name) -> the model a call naming it would use (loading the bundled one if needed) */
Datum
kl_sql_resolve_model(PG_FUNCTION_ARGS)
{
	KlModelRef	ref;

	kl_model_resolve(PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0)), &ref);
	PG_RETURN_TEXT_P(cstring_to_text(ref.name));
}

/* _models() -> (name, path, parameters, bytes, device, status, loaded_at, error, weight_format, weight_bytes) */
Datum
kl_sql_models(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	static const char *states[] = {"free", "loading", "ready", "failed", "unloading"};

	kl_require_shared();
	InitMaterializedSRF(fcinfo, 0);
	for (int e = 0; e < KL_MAX_MODELS; e++)
	{
		KlModelEntry me;
		Datum		v[10];
		bool		nulls[10] = {0};

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		memcpy(&me, &kl_shared->models[e], sizeof(me));
		LWLockRelease(kl_shared->lock);
		if (me.state == KL_MODEL_FREE)
			continue;
		v[0] = CStringGetTextDatum(me.name);
		v[1] = CStringGetTextDatum(me.path);
		v[2] = Int64GetDatum(me.n_params);
		v[3] = Int64GetDatum(me.bytes);
		v[4] = CStringGetTextDatum(me.device_name[0] ? me.device_name : kl_device_name(me.device));
		v[5] = CStringGetTextDatum(states[me.state]);
		if (me.loaded_at)
			v[6] = TimestampTzGetDatum(me.loaded_at);
		else
			nulls[6] = true;
		if (me.error[0])
			v[7] = CStringGetTextDatum(me.error);
		else
			nulls[7] = true;
		v[8] = CStringGetTextDatum(me.weight_format);
		v[9] = Int64GetDatum(me.weight_bytes);
		if (me.state != KL_MODEL_READY)
		{
			nulls[2] = nulls[3] = nulls[8] = nulls[9] = true;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	return (Datum) 0;
}
