/*
 * pg_guc.c — defining the kimi_linear.* settings.
 *
 * Who may change what: the model directory and the limits are superuser-only
 * (PGC_SUSET), so an ordinary user can lower nothing that protects the
 * server and raise nothing at all; worker shape (number, request slots) is
 * fixed at server start; engine threads and prefill chunking apply at reload.
 */
#include "postgres.h"

#include <limits.h>

#include "miscadmin.h"
#include "utils/guc.h"

#include "pg_guc.h"

char	   *kl_guc_model_dir = NULL;
char	   *kl_guc_default_model = NULL;
int			kl_workers = 1;
int			kl_device = KL_DEVICE_CPU;
int			kl_precision = KL_PRECISION_AUTO;
int			kl_threads = 0;
int			kl_max_context = 131072;
int			kl_max_new_tokens = 4096;
int			kl_max_requests = 64;
int			kl_max_requests_per_call = 16;
int			kl_prefill_chunk = 512;
int			kl_prefill_budget = 0;
int			kl_page_size = 1024;
int			kl_state_cache_mb = 256;

static const struct config_enum_entry device_options[] = {
	{"cpu", KL_DEVICE_CPU, false},
	{"cuda", KL_DEVICE_CUDA, false},
	{"auto", KL_DEVICE_AUTO, false},
	{NULL, 0, false}
};

static const struct config_enum_entry precision_options[] = {
	{"auto", KL_PRECISION_AUTO, false},
	{"fp32", KL_PRECISION_FP32, false},
	{"bf16", KL_PRECISION_BF16, false},
	{"fp8", KL_PRECISION_FP8, false},
	{NULL, 0, false}
};

/* boot value of model_dir: <sharedir>/kimi_linear/models, where `make install` puts the bundled model */
static char default_model_dir[MAXPGPATH];

const char *
kl_device_name(int device)
{
	switch (device)
	{
		case KL_DEVICE_CUDA:
			return "cuda";
		case KL_DEVICE_AUTO:
			return "auto";
		default:
			return "cpu";
	}
}

const char *
kl_precision_name(int precision)
{
	switch (precision)
	{
		case KL_PRECISION_FP32:
			return "fp32";
		case KL_PRECISION_BF16:
			return "bf16";
		case KL_PRECISION_FP8:
			return "fp8";
		default:
			return "auto";
	}
}

static bool
check_model_dir(char **newval, void **extra, GucSource source)
{
	if (*newval == NULL || (*newval)[0] == '\0')
	{
		GUC_check_errdetail("kimi_linear.model_dir must not be empty.");
		return false;
	}
	if (!is_absolute_path(*newval))
	{
		GUC_check_errdetail("kimi_linear.model_dir must be an absolute path.");
		return false;
	}
	return true;
}

static bool
check_prefill_chunk(int *newval, void **extra, GucSource source)
{
	if (*newval % 64 != 0)
	{
		GUC_check_errdetail("kimi_linear.prefill_chunk must be a multiple of 64 (the KDA chunk length).");
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
							   "Directory from which models may be loaded.",
							   "Paths given to kimi_linear.load_model are relative to it, or must resolve inside it.",
							   &kl_guc_model_dir, default_model_dir,
							   PGC_SUSET, 0, check_model_dir, NULL, NULL);
	DefineCustomStringVariable("kimi_linear.default_model",
							   "Model used by calls that name none.",
							   "Empty: the only loaded model, or the bundled model " KL_BUNDLED_MODEL
							   " (loaded on first use) when none is loaded.",
							   &kl_guc_default_model, "",
							   PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.workers",
							"Number of inference background workers.",
							NULL, &kl_workers, 1, 1, 16,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("kimi_linear.device",
							 "Device that kimi_linear.load_model puts models on (cpu, cuda, auto).",
							 "auto uses a GPU when one is usable and the CPU otherwise.",
							 &kl_device, KL_DEVICE_CPU, device_options,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("kimi_linear.precision",
							 "Activations of the matrix products of the models kimi_linear.load_model loads (auto, fp32, bf16, fp8).",
							 "Read when a model is loaded, and kept with it (used again after a restart): changing it does not "
							 "change a loaded model. auto: bf16 on a GPU, fp32 on the CPU. fp32 on a GPU matches the CPU to "
							 "float rounding; bf16 runs the GPU's products on tensor cores (logits within 3e-2 of fp32) and "
							 "is refused on the CPU, which computes in fp32 only; fp8 is bf16 plus FP8 activations (rounded "
							 "per token to E4M3) in the prefill products of FP8 weights, for models with FP8 weights on a "
							 "GPU of compute capability 8.9 or later.",
							 &kl_precision, KL_PRECISION_AUTO, precision_options,
							 PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.threads",
							"Engine threads per inference worker (0 = all cores).",
							NULL, &kl_threads, 0, 0, 1024,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_context",
							"Most positions (tokens) one sequence or conversation may hold.",
							NULL, &kl_max_context, 131072, 16, INT_MAX,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_new_tokens",
							"Most tokens one call may generate (the limit on max_tokens).",
							NULL, &kl_max_new_tokens, 4096, 1, INT_MAX,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_requests",
							"Most inference requests in flight at once, over all sessions.",
							"A call beyond it fails at once rather than waiting.",
							&kl_max_requests, 64, 1, 4096,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.max_requests_per_call",
							"Most requests one set-based call (generate_each, summarize_each, ...) keeps in flight.",
							"Its share of kimi_linear.max_requests; the call's concurrency argument can only lower it.",
							&kl_max_requests_per_call, 16, 1, 4096,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.prefill_chunk",
							"Prompt tokens a worker processes per step for one sequence.",
							"Long prompts are processed in chunks of this size between decode steps of other requests.",
							&kl_prefill_chunk, 512, 64, 65536,
							PGC_SIGHUP, 0, check_prefill_chunk, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.prefill_budget",
							"Prompt tokens a worker processes per step over all requests (0: one kimi_linear.prefill_chunk).",
							"Between two decode steps the worker prefills waiting prompts, a chunk at a time, round-robin, up to this many tokens. "
							"Raise it when many long inputs arrive together (summarize_each over a column, on a GPU): the decode batch then stays full; "
							"a decode step of other requests waits longer.",
							&kl_prefill_budget, 0, 0, 1 << 20,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.page_size",
							"Positions per stored page of a conversation's attention cache.",
							"Pages are written once; each turn rewrites the head: the KDA state plus up to this many positions.",
							&kl_page_size, 1024, 64, 1 << 20,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("kimi_linear.state_cache",
							"Memory per worker for keeping recent conversations' states (0 = off).",
							"A new turn whose stored state matches a cached one skips reloading the history.",
							&kl_state_cache_mb, 256, 0, INT_MAX / 2,
							PGC_SIGHUP, GUC_UNIT_MB, NULL, NULL, NULL);

	MarkGUCPrefixReserved("kimi_linear");
}
