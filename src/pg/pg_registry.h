/*
 * pg_registry.h — the model registry kept across server restarts.
 *
 * load_model and unload_model leave the list of loaded models in a file of
 * the data directory, KL_REGISTRY_FILE: the name, the resolved directory,
 * the device and the load options (a string stored and replayed verbatim) of
 * each.  When the postmaster creates the control area (at server start, and
 * again after a crash reset) it registers every model of the file, and the
 * inference workers load them as they load any registered model; no
 * database connection is involved.
 *
 * The file is replaced atomically (a temporary file, fsync, durable rename):
 * a crash leaves either the old list or the new one.  It is JSON:
 *   {"version": 1, "models": [{"name": ..., "path": ..., "device": "cpu",
 *                              "options": ""}, ...]}
 */
#ifndef KL_PG_REGISTRY_H
#define KL_PG_REGISTRY_H

#define KL_REGISTRY_FILE "kimi_linear_models.json"

/*
 * Backend: write the file from the shared registry (the entries marked
 * persisted that are not being unloaded).  A failure is a WARNING: the models
 * stay loaded, but would not come back after a restart.
 */
void		kl_registry_save(void);

/*
 * Postmaster, creating the control area (caller holds nothing): register the
 * file's models as LOADING.  Problems are logged, never raised: the server
 * must start whatever the file holds.
 */
void		kl_registry_restore(void);

#endif
