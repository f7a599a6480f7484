/*
 * pg_model.c — the model registry, backend side (pg_model.h), and the SQL
 * functions load_model, unload_model, _resolve_model and the models view.
 *
 * A backend registers a model in shared memory (state LOADING) and waits;
 * every inference worker maps it and reports; the entry is READY when all
 * running workers have it, FAILED with the first worker's error otherwise.
 * Only superusers and members of kimi_linear_admin may load or unload, and
 * only from under kimi_linear.model_dir, checked after resolving symbolic
 * links; the workers and the backends' tokenizers then open every file of
 * the model confined to that directory (kl_load_opts.root), so a link inside
 * the model directory cannot lead out of it either.  A path outside gets the
 * error of a missing one: load_model does not tell what exists elsewhere.
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

#include "pg_errors.h"
#include "pg_load_options.h"
#include "pg_guc.h"
#include "pg_model.h"
#include "pg_registry.h"
#include "pg_shmem.h"

PG_FUNCTION_INFO_V1(kl_sql_load_model);
PG_FUNCTION_INFO_V1(kl_sql_unload_model);
PG_FUNCTION_INFO_V1(kl_sql_resolve_model);
PG_FUNCTION_INFO_V1(kl_sql_chat_model);
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

/*
 * path -> canonical absolute directory inside model_dir (out), and model_dir
 * itself resolved (root), or ERROR.  Missing, not a directory, and outside
 * (through "..", an absolute path or a symbolic link) are one error.
 */
static void
resolve_model_path(const char *path, char *out, char *root)
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
	dl = strlen(dir);
	if (!realpath(candidate, real) || !(strncmp(real, dir, dl) == 0 && real[dl] == '/') ||
		stat(real, &sb) != 0 || !S_ISDIR(sb.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FILE),
				 errmsg("model directory \"%s\" does not exist in kimi_linear.model_dir", candidate),
				 errhint("Paths are relative to kimi_linear.model_dir (%s) and must stay inside it, symbolic links included.",
						 kl_guc_model_dir)));
	strlcpy(out, real, MAXPGPATH);
	strlcpy(root, dir, MAXPGPATH);
}

/* caller holds the lock exclusively: the entry becomes free (a new generation) */
static void
free_entry_locked(int e)
{
	kl_shared->models[e].state = KL_MODEL_FREE;
	kl_shared->models[e].generation = kl_shared->next_model_generation++;
	kl_shared->models[e].persisted = false;
	memset(kl_shared->models[e].wload, 0, sizeof(kl_shared->models[e].wload));
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

/*
 * Wait until the entry is READY (returns) or FAILED / gone (ERROR).
 * forget_failed: a FAILED entry is freed first (load_model's own attempt, so
 * that a corrected model can be loaded under the name); a call that only
 * uses the model leaves it listed with its error.
 */
static void
wait_loaded(int e, uint32 gen, const char *name, bool forget_failed)
{
	for (;;)
	{
		KlModelState st;
		char		error[1024];
		int			error_code;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		st = kl_shared->models[e].generation == gen ? kl_shared->models[e].state : KL_MODEL_FREE;
		strlcpy(error, kl_shared->models[e].error, sizeof(error));
		error_code = kl_shared->models[e].error_code;
		LWLockRelease(kl_shared->lock);
		if (st == KL_MODEL_READY)
			return;
		if (st == KL_MODEL_FAILED)
		{
			if (forget_failed)
			{
				LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
				if (kl_shared->models[e].generation == gen && kl_shared->models[e].state == KL_MODEL_FAILED)
					free_entry_locked(e);
				LWLockRelease(kl_shared->lock);
				kl_wake_workers(-1);
			}
			ereport(ERROR,
					(errcode(kl_sqlstate(error_code)),
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

/*
 * bf16 precision on a server whose models go to the CPU: refused here, with
 * what to do, rather than by the worker (whose load error would come back
 * with the hint about checkpoints).  With kimi_linear.device = auto the
 * worker decides, and its error says the same.
 */
static void
check_precision_device(const KlLoadOptions *lo)
{
	if (kl_device == KL_DEVICE_CPU && (strcmp(lo->precision, "bf16") == 0 || strcmp(lo->precision, "fp8") == 0))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("precision %s runs only on a GPU, and kimi_linear.device is cpu", lo->precision),
				 errdetail("The CPU engine computes in fp32."),
				 errhint("Use precision 'auto' (bf16 on a GPU, fp32 on the CPU) or 'fp32', or set kimi_linear.device to 'cuda'.")));
}

void
kl_model_register(const char *name, const char *path, bool check_privilege)
{
	KlLoadOptions lo;
	char		options[KL_MODEL_OPTIONS_LEN];

	/* every option at its default, but the precision setting applies as for load_model */
	kl_load_options_from_args(NULL, NULL, kl_precision_name(kl_precision), &lo);
	check_precision_device(&lo);
	kl_load_options_format(&lo, options, sizeof(options));
	kl_model_register_with(name, path, options, check_privilege);
}

void
kl_model_register_with(const char *name, const char *path, const char *options, bool check_privilege)
{
	char		real[MAXPGPATH];
	char		root[MAXPGPATH];
	int			e = -1;
	uint32		gen;
	bool		dropped_persisted = false;

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
	if (strlen(options) >= KL_MODEL_OPTIONS_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the load options of a model take at most %d bytes", KL_MODEL_OPTIONS_LEN - 1)));
	resolve_model_path(path, real, root);

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	e = find_entry(name);
	if (e >= 0 && kl_shared->models[e].state == KL_MODEL_FAILED)
	{
		/* it failed to load (at server start, from the registry file): try again */
		dropped_persisted = kl_shared->models[e].persisted;
		free_entry_locked(e);
		e = -1;
	}
	if (e >= 0)
	{
		bool		same_dir = strcmp(kl_shared->models[e].path, real) == 0;
		bool		same_options = strcmp(kl_shared->models[e].options, options) == 0;
		char		loaded_options[KL_MODEL_OPTIONS_LEN];

		strlcpy(loaded_options, kl_shared->models[e].options, sizeof(loaded_options));
		gen = kl_shared->models[e].generation;
		LWLockRelease(kl_shared->lock);
		if (!same_dir)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("a model named \"%s\" is already loaded from another directory", name),
					 errhint("Unload it first with kimi_linear.unload_model('%s').", name)));
		if (!same_options)
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_OBJECT),
					 errmsg("a model named \"%s\" is already loaded with other options", name),
					 errdetail("Loaded with \"%s\", asked for \"%s\" (\"\" = the defaults).",
							   loaded_options, options),
					 errhint("Unload it first with kimi_linear.unload_model('%s').", name)));
		/* the same model again: nothing to do once it is ready */
		wait_loaded(e, gen, name, true);
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
		if (dropped_persisted)
			kl_registry_save();
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
		strlcpy(me->root, root, sizeof(me->root));
		strlcpy(me->options, options, sizeof(me->options));
		me->persisted = false;
		me->device = kl_device;
		me->routing_in_force[0] = '\0';
		me->precision_in_force[0] = '\0';
		me->weight_format[0] = '\0';
		me->weight_bytes = 0;
		memset(me->wload, 0, sizeof(me->wload));
		me->error[0] = '\0';
		me->error_code = KL_E_NONE;
		me->n_params = me->bytes = 0;
		me->device_name[0] = '\0';
		me->vocab_size = 0;
		me->has_tokenizer = false;
		me->loaded_at = 0;
		me->state = KL_MODEL_LOADING;
	}
	LWLockRelease(kl_shared->lock);
	kl_wake_workers(-1);
	if (dropped_persisted)
		kl_registry_save();		/* the failed entry is gone from the file until this load succeeds */
	wait_loaded(e, gen, name, true);

	/* loaded: remember it across restarts */
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	if (kl_shared->models[e].generation == gen && kl_shared->models[e].state == KL_MODEL_READY)
		kl_shared->models[e].persisted = true;
	LWLockRelease(kl_shared->lock);
	kl_registry_save();
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
				free_entry_locked(e);
				gone = true;
			}
		}
		LWLockRelease(kl_shared->lock);
		if (gone)
		{
			/* (an unloading entry is no longer written: the file may be rewritten now) */
			kl_registry_save();
			return;
		}
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
	{
		e = find_entry(want);
		/* the bundled model loads by itself: a failed load of it is retried, as on first use */
		if (e >= 0 && kl_shared->models[e].state == KL_MODEL_FAILED && strcmp(want, KL_BUNDLED_MODEL) == 0)
			e = -1;
	}
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
		kl_model_register(KL_BUNDLED_MODEL, KL_BUNDLED_MODEL, false);
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
	wait_loaded(e, gen, want ? want : KL_BUNDLED_MODEL, false);
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
	char		root[MAXPGPATH];
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
	strlcpy(root, kl_shared->models[e].root, sizeof(root));
	LWLockRelease(kl_shared->lock);
	if (tok_cache[e].tok)
	{
		kl_tokenizer_free(tok_cache[e].tok);
		tok_cache[e].tok = NULL;
	}
	if (kl_tokenizer_load_under(path, root, &t, &err) != KL_OK)
		kl_engine_error(&err, psprintf("could not load the tokenizer of model \"%s\"", ref->name), NULL);
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

/*
 * load_model(name text, path text, moe_routing text DEFAULT NULL, quantize text DEFAULT NULL,
 *            matmul_precision text DEFAULT NULL): NULL is the setting kimi_linear.precision
 */
Datum
kl_sql_load_model(PG_FUNCTION_ARGS)
{
	char	   *name = required_arg(fcinfo, 0, "name");
	char	   *path = required_arg(fcinfo, 1, "path");
	char	   *routing = PG_NARGS() > 2 && !PG_ARGISNULL(2) ? text_to_cstring(PG_GETARG_TEXT_PP(2)) : NULL;
	char	   *quantize = PG_NARGS() > 3 && !PG_ARGISNULL(3) ? text_to_cstring(PG_GETARG_TEXT_PP(3)) : NULL;
	const char *precision = PG_NARGS() > 4 && !PG_ARGISNULL(4) ? text_to_cstring(PG_GETARG_TEXT_PP(4)) :
		kl_precision_name(kl_precision);
	KlLoadOptions lo;
	char		options[KL_MODEL_OPTIONS_LEN];

	kl_load_options_from_args(routing, quantize, precision, &lo);
	check_precision_device(&lo);
	kl_load_options_format(&lo, options, sizeof(options));
	kl_model_register_with(name, path, options, true);
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

/*
 * _chat_model(name) -> the model a new conversation naming it would use.
 * new_conversation() calls it so that a model that cannot hold a
 * conversation (no tokenizer, or one without the chat format) is refused
 * when the conversation starts, not at its first say().
 */
Datum
kl_sql_chat_model(PG_FUNCTION_ARGS)
{
	KlModelRef	ref;
	const kl_tokenizer *tok;

	kl_model_resolve(PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0)), &ref);
	if (!ref.has_tokenizer)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("model \"%s\" cannot hold a conversation: it has no tokenizer", ref.name),
				 errhint("Conversations are text: use a model whose directory has tiktoken.model and tokenizer_config.json.")));
	tok = kl_ref_tokenizer(&ref);
	if (kl_tokenizer_special_id(tok, "<|im_end|>") < 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("model \"%s\" cannot hold a conversation: its tokenizer has no chat format (no <|im_end|> token)",
						ref.name)));
	PG_RETURN_TEXT_P(cstring_to_text(ref.name));
}

/* _models() -> (name, path, parameters, bytes, device, moe_routing, status, loaded_at, error, weight_format,
 *             weight_bytes, matmul_precision) */
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
		Datum		v[12];
		bool		nulls[12] = {0};
		KlLoadOptions lo;
		char		why[128];
		bool		options_ok;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		memcpy(&me, &kl_shared->models[e], sizeof(me));
		LWLockRelease(kl_shared->lock);
		if (me.state == KL_MODEL_FREE)
			continue;
		options_ok = kl_load_options_parse(me.options, &lo, why, sizeof(why));
		v[0] = CStringGetTextDatum(me.name);
		v[1] = CStringGetTextDatum(me.path);
		v[2] = Int64GetDatum(me.n_params);
		v[3] = Int64GetDatum(me.bytes);
		v[4] = CStringGetTextDatum(me.device_name[0] ? me.device_name : kl_device_name(me.device));
		/* the rule in force once loaded (NULL for a dense model); the one asked for before */
		if (me.loaded_at)
			v[5] = CStringGetTextDatum(me.routing_in_force);
		else
			v[5] = CStringGetTextDatum(options_ok && lo.moe_routing[0] ? lo.moe_routing : "select");
		nulls[5] = me.loaded_at && !me.routing_in_force[0];
		v[6] = CStringGetTextDatum(states[me.state]);
		if (me.loaded_at)
			v[7] = TimestampTzGetDatum(me.loaded_at);
		else
			nulls[7] = true;
		if (me.error[0])
			v[8] = CStringGetTextDatum(me.error);
		else
			nulls[8] = true;
		v[9] = CStringGetTextDatum(me.weight_format);
		v[10] = Int64GetDatum(me.weight_bytes);
		/* the precision in force once loaded; the one asked for (auto unless given) before */
		if (me.loaded_at)
			v[11] = CStringGetTextDatum(me.precision_in_force);
		else
			v[11] = CStringGetTextDatum(options_ok && lo.precision[0] ? lo.precision : "auto");
		if (me.state != KL_MODEL_READY)
			nulls[2] = nulls[3] = nulls[9] = nulls[10] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	return (Datum) 0;
}
