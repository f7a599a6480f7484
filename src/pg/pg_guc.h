/*
 * pg_guc.h — the kimi_linear.* settings (README.md, "Settings", documents
 * each one).  Defined in _PG_init; workers re-read the SIGHUP ones.
 */
#ifndef KL_PG_GUC_H
#define KL_PG_GUC_H

#define KL_DEVICE_CPU 0
#define KL_DEVICE_CUDA 1
#define KL_DEVICE_AUTO 2

/* the model shipped with the extension, loaded on first use when no other is */
#define KL_BUNDLED_MODEL "pgdocs-kimi-18m"

extern char *kl_guc_model_dir;			/* the only directory models load from */
extern char *kl_guc_default_model;		/* model used when a call names none */
extern int	kl_workers;				/* inference workers (postmaster) */
extern int	kl_device;				/* KL_DEVICE_* for load_model */
#define KL_PRECISION_FP32 0
#define KL_PRECISION_BF16 1
#define KL_PRECISION_AUTO 2
#define KL_PRECISION_FP8 3
extern int	kl_precision;			/* KL_PRECISION_* for load_model (auto: bf16 on a GPU, fp32 on the CPU) */
extern int	kl_threads;				/* engine threads per worker, 0 = all cores */
extern int	kl_max_context;			/* positions per sequence */
extern int	kl_max_new_tokens;		/* max_tokens of one call */
extern int	kl_max_requests;		/* concurrent requests (postmaster) */
extern int	kl_max_requests_per_call;	/* requests one set-based call keeps in flight */
extern int	kl_prefill_chunk;		/* prompt tokens per prefill step */
extern int	kl_prefill_budget;		/* prompt tokens per worker step, all requests (0: one chunk) */
extern int	kl_page_size;			/* conversation positions per stored page */
extern int	kl_state_cache_mb;		/* worker-side conversation cache */

void		kl_define_gucs(void);
const char *kl_device_name(int device);
const char *kl_precision_name(int precision);

#endif
