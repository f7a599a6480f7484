/*
 * pg_guc.c — the kimi_linear.* settings.
 *
 * Who may change what: model_dir, default_model and the limits are for
 * superusers (SUSET) — an ordinary user must not point the server at other
 * files or lift the limits that protect it; workers, max_requests need a
 * restart (they size shared memory and processes); device, threads and
 * prefill_chunk take effect at a reload (SIGHUP).
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include "pg_shmem.h"

char	   *kl_guc_model_dir = NULL;
char	   *kl_guc_default_model = NULL;
int			kl_workers = 1;
int			kl_device = KL_DEVICE_CPU;
int			kl_threads = 0;
int			kl_max_context = 131072;
int			kl_max_new_tokens = 4096;
int			kl_max_requests = 64;
int			kl_prefill_chunk = 512;
int			kl_page_size = 4096;

static char default_model_dir[MAXPGPATH];

static const struct config_enum_entry device_options[] = {
	{"cpu", KL_DEVICE_CPU, false},
	{"cuda", KL_DEVICE_CUDA, false},
	{"auto", KL_DEVICE_AUTO, false},
	{NULL, 0, false}
};

const char *
kl_device_name(int device)
{
	return device == KL_DEVICE_CUDA ? "cuda" : device == KL_DEVICE_AUTO ? "auto" : "cpu";
}

static bool
check_model_dir(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] != '/')
	{
		GUC_check_errmsg("kimi_linear.model_dir must be an absolute path");
		return false;
	}
	return true;
}

void
kl_define_gucs(void)
{
	char		share[MAXPGPATH];

	get_share_path(my_exec_path, share);
	snprintf(default_model_dir, sizeof(default_model_dir), "%s/kimi_linear/models", share);

	DefineCustomStringVariable("kimi_linear.model_dir",
							   "Directory that models are loaded from; the only place they may come from.",
							   "load_model paths are relative to it, or must resolve inside it.",
							   &kl_guc_model_dir, default_model_dir, PGC_SUSET, 0,
							   check_model_dir, NULL, NULL);
	DefineCustomStringVariable("kimi_linear.default_model",
							   "Model used when a function is not given one.",
							   "A name of a loaded model, or a directory under model_dir loaded on first use. "
							   "Empty: the bundled pgdocs-kimi-18m when no other model is loaded.",
							   &kl_guc_default_model, "", PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.workers",
							"Number of inference background workers.",
							NULL, &kl_workers, 1, 1, KL_MAX_WORKERS, PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
	DefineCustomEnumVariable("kimi_linear.device",
							 "Where models run: cpu, cuda, or auto (cuda where a GPU is present).",
							 "Applies to models loaded afterwards.",
							 &kl_device, KL_DEVICE_CPU, device_options, PGC_SIGHUP, 0,
							 NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.threads",
							"CPU threads per inference worker (0 = all cores).",
							NULL, &kl_threads, 0, 0, 1024, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_context",
							"Most positions (tokens) one sequence may hold.",
							NULL, &kl_max_context, 131072, 16, 1 << 24, PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_new_tokens",
							"Most tokens one request may generate.",
							NULL, &kl_max_new_tokens, 4096, 1, 1 << 20, PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_requests",
							"Most inference requests in flight at once (all sessions together).",
							"Further requests fail at once instead of waiting.",
							&kl_max_requests, 64, 1, 4096, PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.prefill_chunk",
							"Prompt tokens a worker processes per step, between decode steps of other requests.",
							NULL, &kl_prefill_chunk, 512, 16, 65536, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.page_size",
							"Positions per stored page of a conversation's attention cache.",
							"A conversation's state is stored as pages that never change plus a head that each turn rewrites.",
							&kl_page_size, 4096, 256, 1 << 20, PGC_SUSET, 0, NULL, NULL, NULL);
	MarkGUCPrefixReserved("kimi_linear");
}
