/*
 * pg_registry.c — the model registry kept across server restarts (see
 * pg_registry.h).
 *
 * Writers (load_model, unload_model in any backend) take the registry file
 * lock, then snapshot the shared registry, so the last file written always
 * reflects the latest change.  The reader is the postmaster alone, before
 * any worker starts.
 */
#include "postgres.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <jansson.h>

#include "lib/stringinfo.h"
#include "storage/fd.h"
#include "storage/lwlock.h"
#include "utils/json.h"

#include "kl_file.h"
#include "pg_registry.h"
#include "pg_shmem.h"

#define TMP_FILE KL_REGISTRY_FILE ".tmp"
#define MAX_FILE (1 << 20)

/* ------------------------------------------------------------------ writing */

/*
 * The persisted entries as a JSON text (palloc'd).  Written with PostgreSQL's
 * escape_json, not jansson: the server exports a function named json_object
 * that would stand in for jansson's constructor of the same name.
 */
static char *
registry_json(void)
{
	StringInfoData b;
	bool		first = true;

	initStringInfo(&b);
	appendStringInfoString(&b, "{\"version\": 1, \"models\": [");
	LWLockAcquire(kl_shared->lock, LW_SHARED);
	for (int e = 0; e < KL_MAX_MODELS; e++)
	{
		KlModelEntry *me = &kl_shared->models[e];

		if (!me->persisted || me->state == KL_MODEL_FREE || me->state == KL_MODEL_UNLOADING)
			continue;
		appendStringInfoString(&b, first ? "\n  {\"name\": " : ",\n  {\"name\": ");
		escape_json(&b, me->name);
		appendStringInfoString(&b, ", \"path\": ");
		escape_json(&b, me->path);
		appendStringInfoString(&b, ", \"device\": ");
		escape_json(&b, kl_device_name(me->device));
		appendStringInfoString(&b, ", \"options\": ");
		escape_json(&b, me->options);
		appendStringInfoChar(&b, '}');
		first = false;
	}
	LWLockRelease(kl_shared->lock);
	appendStringInfoString(&b, "\n]}\n");
	return b.data;
}

void
kl_registry_save(void)
{
	char	   *text;
	int			fd;
	size_t		len;
	bool		ok = false;

	LWLockAcquire(kl_shared->registry_lock, LW_EXCLUSIVE);
	text = registry_json();
	len = strlen(text);
	fd = OpenTransientFile(TMP_FILE, O_WRONLY | O_CREAT | O_TRUNC | PG_BINARY);
	if (fd >= 0)
	{
		ok = write(fd, text, len) == (ssize_t) len && pg_fsync(fd) == 0;
		if (CloseTransientFile(fd) != 0)
			ok = false;
		/* the rename is fsync'd with the directory: after a crash, the old file or the new */
		if (ok)
			ok = durable_rename(TMP_FILE, KL_REGISTRY_FILE, WARNING) == 0;
	}
	pfree(text);
	LWLockRelease(kl_shared->registry_lock);
	if (!ok)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not save the list of loaded models in \"%s\": %m", KL_REGISTRY_FILE),
				 errdetail("The models stay loaded, but will not be loaded again after a server restart.")));
}

/* ------------------------------------------------------------------ reading */

static const char *
string_field(json_t *obj, const char *key)
{
	json_t	   *v = json_object_get(obj, key);

	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* one model of the file -> a free registry entry, LOADING (or FAILED, with the reason) */
static void
restore_entry(json_t *m, const char *root, int index)
{
	const char *name = string_field(m, "name");
	const char *path = string_field(m, "path");
	const char *device = string_field(m, "device");
	const char *options = string_field(m, "options");
	KlModelEntry *me = NULL;
	int			dev;
	char		real[PATH_MAX];

	if (!name || !path || !device || !options || name[0] == '\0' || strlen(name) >= KL_MODEL_NAME_LEN ||
		strlen(path) >= MAXPGPATH || strlen(options) >= KL_MODEL_OPTIONS_LEN)
	{
		elog(LOG, "kimi_linear: %s: model %d is malformed; it is not loaded", KL_REGISTRY_FILE, index + 1);
		return;
	}
	if (strcmp(device, "cpu") == 0)
		dev = KL_DEVICE_CPU;
	else if (strcmp(device, "cuda") == 0)
		dev = KL_DEVICE_CUDA;
	else if (strcmp(device, "auto") == 0)
		dev = KL_DEVICE_AUTO;
	else
	{
		elog(LOG, "kimi_linear: %s: model \"%s\" has an unknown device; it is not loaded", KL_REGISTRY_FILE, name);
		return;
	}
	for (int e = 0; e < KL_MAX_MODELS; e++)
	{
		if (kl_shared->models[e].state != KL_MODEL_FREE && strcmp(kl_shared->models[e].name, name) == 0)
		{
			elog(LOG, "kimi_linear: %s: model \"%s\" is listed twice", KL_REGISTRY_FILE, name);
			return;
		}
		if (!me && kl_shared->models[e].state == KL_MODEL_FREE)
			me = &kl_shared->models[e];
	}
	if (!me)
	{
		elog(LOG, "kimi_linear: %s: more than %d models; \"%s\" is not loaded", KL_REGISTRY_FILE, KL_MAX_MODELS, name);
		return;
	}
	memset(me, 0, sizeof(*me));
	me->generation = kl_shared->next_model_generation++;
	strlcpy(me->name, name, sizeof(me->name));
	strlcpy(me->path, path, sizeof(me->path));
	strlcpy(me->options, options, sizeof(me->options));
	me->device = dev;
	me->persisted = true;
	me->state = KL_MODEL_LOADING;
	/* kimi_linear.model_dir may have changed since: the model must still be in it */
	if (root == NULL)
		snprintf(me->error, sizeof(me->error), "kimi_linear.model_dir \"%s\" does not exist", kl_guc_model_dir);
	else
	{
		size_t		rl = strlen(root);

		strlcpy(me->root, root, sizeof(me->root));
		if (!realpath(path, real) || strncmp(real, root, rl) != 0 || real[rl] != '/')
			snprintf(me->error, sizeof(me->error), "model directory \"%s\" does not exist in kimi_linear.model_dir",
					 path);
	}
	if (me->error[0])
	{
		me->error_code = KL_E_INVALID;
		me->state = KL_MODEL_FAILED;
		elog(LOG, "kimi_linear: model \"%s\" is not loaded again: %s", name, me->error);
	}
}

void
kl_registry_restore(void)
{
	char	   *buf;
	size_t		len;
	json_t	   *root,
			   *models;
	json_error_t jerr;
	char		dir[PATH_MAX];
	bool		have_dir;
	kl_err		err;

	if (access(KL_REGISTRY_FILE, F_OK) != 0 && errno == ENOENT)
		return;					/* no model was ever loaded with load_model */
	if (kl_file_read(NULL, KL_REGISTRY_FILE, MAX_FILE, "the model registry file", &buf, &len, &err) != KL_OK)
	{
		elog(LOG, "kimi_linear: %s; no model is loaded at start", err.msg);
		return;
	}
	root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
	free(buf);
	models = root ? json_object_get(root, "models") : NULL;
	if (!json_is_array(models) || !json_is_integer(json_object_get(root, "version")) ||
		json_integer_value(json_object_get(root, "version")) != 1)
	{
		elog(LOG, "kimi_linear: \"%s\" is not a list of models (line %d); no model is loaded at start",
			 KL_REGISTRY_FILE, root ? 0 : jerr.line);
		json_decref(root);
		return;
	}
	have_dir = realpath(kl_guc_model_dir, dir) != NULL;
	for (size_t i = 0; i < json_array_size(models); i++)
		if (json_is_object(json_array_get(models, i)))
			restore_entry(json_array_get(models, i), have_dir ? dir : NULL, (int) i);
	elog(LOG, "kimi_linear: %zu model(s) of \"%s\" registered for loading", json_array_size(models), KL_REGISTRY_FILE);
	json_decref(root);
}
