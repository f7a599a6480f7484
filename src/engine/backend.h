/*
 * backend.h — the interface between the forward pass (forward.c) and the
 * hardware.  `cpu` (backend_cpu.c and cpu_*.c) and `cuda` (kernels/ (CUDA C),
 * loaded with dlopen where a GPU is present) implement it.
 *
 * All activations are fp32, row-major, in backend memory ("device pointers";
 * on the CPU they are ordinary pointers).  Weights are matrices in the
 * checkpoint's dtype that the backend may convert or upload once, at load.
 * Small per-layer vectors (norm weights, conv kernels, decay parameters) are
 * fp32 in backend memory.
 *
 * A forward step runs over a ragged batch (kl_step): several sequences, each
 * contributing a contiguous range of token rows.  Linear layers see all rows
 * at once; the mixers (KDA, MLA) work per sequence on their rows and state.
 */
#ifndef KL_BACKEND_H
#define KL_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "kl.h"
#include "kl_util.h"
#include "quant.h"
#include "safetensors.h"

typedef struct kl_backend kl_backend;
typedef struct kl_seq kl_seq;

/*
 * A weight matrix W [rows, cols]; a linear layer computes y = x W^T.
 * Quantized matrices (q.type != KL_Q_NONE, quant.h) reach only backends that
 * set kl_backend_ops.quantized_weights; for the others the loader
 * dequantizes them to bf16 first.
 */
typedef struct kl_weight
{
	const char *name;
	kl_dtype	dtype;			/* as stored: F32 or BF16 (F16 is widened at load) */
	int			rows,
				cols;
	const void *host;			/* checkpoint data (mapped) */
	void	   *dev;			/* what the backend computes with */
	kl_qmat		q;				/* the quantized form (q.type KL_Q_NONE: dtype above) */
} kl_weight;

/*
 * One product of a batch: y[n, W.rows] (stride ldy) = x[n, W.cols] (stride ldx) W^T.
 * result16 (KL_R16_*): 0, y as usual; else y's only reader is the next op
 * of the layer, which takes the rows from the backend (kl_kda_args: q, k,
 * v, f, gate), so a backend may keep the result in bf16 only and leave y
 * unwritten until something else needs it (the CUDA backend in precision
 * bf16; the CPU backend ignores it).  The value says which input it is, so
 * that a backend can keep some only.
 */
#define KL_R16_KDA_IN 1			/* the KDA op's q, k, v or f */
#define KL_R16_KDA_GATE 2		/* the KDA op's gate */
typedef struct kl_matmul_job
{
	float	   *y;
	int			ldy;
	const float *x;
	int			ldx;
	int			n;
	const kl_weight *W;
	int			result16;
} kl_matmul_job;

typedef struct kl_kda_layer
{
	kl_weight	q_proj,
				k_proj,
				v_proj;			/* [H*K, D] */
	kl_weight	f_a,
				f_b;			/* [K, D], [H*K, K]: decay low-rank */
	kl_weight	b_proj;			/* [H, D]: beta */
	kl_weight	g_a,
				g_b;			/* [K, D], [H*K, K]: output gate */
	kl_weight	o_proj;			/* [D, H*K] */
	float	   *conv_q,
			   *conv_k,
			   *conv_v;			/* [H*K, W] depthwise causal conv kernels */
	float	   *A_log;			/* [H] */
	float	   *dt_bias;		/* [H*K] */
	float	   *o_norm;			/* [K] */
} kl_kda_layer;

typedef struct kl_mla_layer
{
	kl_weight	q_proj;			/* [Ha*(Dn+Dr), D] when q_lora_rank == 0 */
	kl_weight	q_a,
				q_b;			/* low-rank q: [Rq, D], [Ha*(Dn+Dr), Rq] */
	float	   *q_a_norm;		/* [Rq] */
	kl_weight	kv_a;			/* [R+Dr, D] */
	float	   *kv_a_norm;		/* [R] */
	kl_weight	kv_b;			/* [Ha*(Dn+Dv), R]: per head Dn rows of W_uk then Dv rows of W_uv */
	kl_weight	o_proj;			/* [D, Ha*Dv] */
	void	   *prepared;		/* backend-private form of kv_b for absorbed attention */
} kl_mla_layer;

typedef struct kl_mlp
{
	kl_weight	gate,
				up,
				down;			/* [I, D], [I, D], [D, I] */
} kl_mlp;

typedef struct kl_moe_layer
{
	kl_weight	router;			/* [E, D] */
	float	   *score_bias;		/* [E] e_score_correction_bias */
	kl_mlp	   *experts;		/* [E]: gate = w1, up = w3, down = w2 */
	kl_mlp		shared;			/* intermediate F*S; absent when S == 0 */
	bool		has_shared;
} kl_moe_layer;

typedef struct kl_layer
{
	kl_layer_kind kind;
	int			kind_index;		/* index among the KDA (or MLA) layers */
	float	   *input_norm;		/* [D] */
	float	   *post_norm;		/* [D] */
	kl_kda_layer kda;
	kl_mla_layer mla;
	bool		is_moe;
	kl_mlp		mlp;
	kl_moe_layer moe;
} kl_layer;

/*
 * Per-sequence state in backend memory.  The MLA latent cache is paged: page p
 * of MLA layer j holds positions [p*KL_MLA_PAGE, (p+1)*KL_MLA_PAGE), each a
 * row of R+Dr numbers (the normalized latent c, then k_pe): floats, or bf16
 * where the backend says so (kl_backend.mla_cache_bf16; the pointers are
 * then to bf16 data, and rows reach the host through read_mla_rows).
 */
#define KL_MLA_PAGE 1024

typedef struct kl_mla_cache
{
	float	  **pages;
	int			n_pages;
	int			cap_pages;
} kl_mla_cache;

struct kl_seq
{
	const struct kl_model *model;
	int64_t		pos;			/* tokens fed */
	int32_t		pending;		/* sampled, not yet fed; -1 none */
	float	  **kda_S;			/* [n_kda][H*K*V] */
	float	  **kda_conv;		/* [n_kda][3*H*K*W]: q, k, v conv tails (last W inputs, oldest first) */
	kl_mla_cache *mla;			/* [n_mla] */
};

/* The ragged batch of one forward step. */
typedef struct kl_step
{
	int			n_tokens;		/* rows of the activation matrices */
	int			n_seqs;
	struct kl_seq **seqs;		/* [n_seqs] */
	const int  *row0;			/* [n_seqs + 1]: rows of seq i are row0[i] .. row0[i+1]-1 */
	const int64_t *pos0;		/* [n_seqs]: the sequence's position before this step */
	bool		force_recurrent;	/* KDA: per-token recurrence even for long inputs */
	uint64_t	logit_key;		/* which rows the step computes logits of (equal keys: same rows) */
} kl_step;

/*
 * Inputs of the KDA mixer for one layer (all [n_tokens, ...] row-major):
 * q, k, v: the projections before the short conv, [n, H*K];
 * f: f_b(f_a(x)) before softplus, [n, H*K]; b: b_proj(x) before sigmoid, [n, H];
 * gate: g_b(g_a(x)) before sigmoid, [n, H*K].
 * The op runs conv + silu, L2 norm, decay, beta, the delta rule (updating the
 * sequences' state) and the gated per-head RMSNorm, writing out [n, H*K]
 * ready for o_proj.  q, k, v, f may be overwritten.
 */
typedef struct kl_kda_args
{
	const kl_kda_layer *w;
	int			kda_index;
	float	   *q,
			   *k,
			   *v,
			   *f,
			   *b;
	const float *gate;
	float	   *out;
} kl_kda_args;

/*
 * Inputs of the MLA mixer for one layer: q [n, Ha*(Dn+Dr)] and the new latent
 * rows kv [n, R+Dr] (c already RMS-normalized, then k_pe).  The op appends the
 * rows to each sequence's cache, attends causally over the whole cache and
 * writes out [n, Ha*Dv] ready for o_proj.
 */
typedef struct kl_mla_args
{
	const kl_mla_layer *w;
	int			mla_index;
	const float *q;
	const float *kv;
	float	   *out;
} kl_mla_args;

/*
 * One row of a device sampling call (backend op `sample`): the row of the
 * logits matrix, the settings, the uniform draw already taken
 * (kl_sample_uniform), the repetition-penalty ids and the optional
 * allowed-token bitmask (host memory, as kl_sample_masked).
 */
typedef struct kl_sample_row
{
	int			row;
	const kl_sampling *s;
	double		u0;
	const int32_t *recent;
	int			n_recent;
	const uint32_t *allowed;
} kl_sample_row;

typedef struct kl_backend_ops
{
	const char *name;

	/* memory: alloc returns zeroed memory or NULL */
	void	   *(*alloc) (kl_backend *be, size_t bytes);
	void		(*release) (kl_backend *be, void *p);
	void		(*upload) (kl_backend *be, void *dst, const void *src, size_t bytes);
	void		(*download) (kl_backend *be, void *dst, const void *src, size_t bytes);
	void		(*copy) (kl_backend *be, void *dst, const void *src, size_t bytes);

	/* called once per weight at model load; sets w->dev */
	int			(*load_weight) (kl_backend *be, kl_weight *w, kl_err *err);
	void		(*unload_weight) (kl_backend *be, kl_weight *w);
	/* a weight with random values (uniform, standard deviation `scale`), made in
	 * backend memory: w->dtype, rows, cols set, w->host NULL; sets w->dev
	 * (w->q.type set: random quantized weights, see random_quantized) */
	int			(*init_random_weight) (kl_backend *be, kl_weight *w, uint64_t seed, float scale, kl_err *err);
	/* called once per MLA layer after its weights are loaded; sets/frees w->prepared */
	int			(*prepare_mla) (kl_backend *be, kl_mla_layer *w, kl_err *err);
	void		(*release_mla) (kl_backend *be, kl_mla_layer *w);

	/* x[n, D] = E[ids] (ids in host memory, already validated) */
	void		(*embed) (kl_backend *be, float *x, const kl_weight *E, const int32_t *ids, int n);
	/* y[r] = w * x[r] / sqrt(mean(x[r]^2) + eps) for rows r < rows, width d; row strides ldy, ldx
	 * (y may be x) */
	void		(*rmsnorm) (kl_backend *be, float *y, int ldy, const float *x, int ldx, const float *w,
							int rows, int d, float eps);
	/* y[n, W.rows] (row stride ldy) = x[n, W.cols] (row stride ldx) W^T */
	void		(*matmul) (kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);
	/* several independent products at once (one dispatch for all: decode
	 * reads many small matrices, and per-product overheads add up) */
	void		(*matmul_batch) (kl_backend *be, const kl_matmul_job *jobs, int count);
	/* y += x */
	void		(*add) (kl_backend *be, float *y, const float *x, size_t count);
	/* h[r, c] = silu(g[r, c]) * u[r, c]; g and u with row stride ld, h with width */
	void		(*swiglu) (kl_backend *be, float *h, const float *g, const float *u, int rows, int width, int ld);

	/*
	 * optional (NULL: plain download / upload, the cache holds fp32): rows
	 * [row, row + n) of an MLA cache page to / from fp32 host rows of `width`
	 * numbers, converting the backend's cache format (the state format and
	 * the CPU keep fp32)
	 */
	void		(*read_mla_rows) (kl_backend *be, float *dst, const void *page, int row, int n, int width);
	void		(*write_mla_rows) (kl_backend *be, void *page, int row, const float *src, int n, int width);

	void		(*kda) (kl_backend *be, const kl_step *step, const kl_kda_args *a);
	void		(*mla) (kl_backend *be, const kl_step *step, const kl_mla_args *a);
	/* y[n, D] = MoE(x[n, D]) including the shared experts */
	void		(*moe) (kl_backend *be, const kl_config *cfg, const kl_moe_layer *w, float *y, const float *x, int n);

	/*
	 * optional (NULL: forward.c downloads the logits and samples on the
	 * host): choose one token per listed row of logits [*, vocab] (backend
	 * memory; may be overwritten) exactly as kl_sample_draw would; ids[i] for
	 * rows[i] into host memory.  Only the ids come back.
	 */
	int			(*sample) (kl_backend *be, float *logits, int vocab, const kl_sample_row *rows, int n,
						   int32_t *ids, kl_err *err);

	/*
	 * optional (NULL: nothing): a hint that the step will read W soon, after a
	 * few small kernels (forward.c gives it for a mixer's o_proj, then the MoE
	 * router and shared expert, right after the mixer's input products); a
	 * backend may start moving W closer to its compute units meanwhile (in
	 * the order given, as much as it sees fit).  No effect on results.
	 */
	void		(*prefetch) (kl_backend *be, const kl_weight *W);

	/* optional (NULL on the CPU): called before and after the layers of each
	 * step, e.g. to upload the step's row offsets and page tables once, or to
	 * capture/replay a graph of the step's kernels */
	int			(*begin_step) (kl_backend *be, const kl_step *step, kl_err *err);
	void		(*end_step) (kl_backend *be, const kl_step *step);

	/* wait for queued work (no-op on the CPU) */
	void		(*sync) (kl_backend *be);
	void		(*destroy) (kl_backend *be);

	/* matmul takes quantized weights (kl_weight.q, quant.h) as they are */
	bool		quantized_weights;
	/*
	 * init_random_weight makes random quantized weights itself, in its own
	 * memory: for a weight to be quantized the loader sets w->q's type,
	 * rows, cols, group, n_groups and row_bytes (data and scales NULL)
	 * before the call.  Without it, the loader quantizes the random weights
	 * the backend made, which must then be in host memory (the CPU backend).
	 */
	bool		random_quantized;
} kl_backend_ops;

struct kl_backend
{
	const kl_backend_ops *ops;
	const kl_config *cfg;
	void	   *impl;
	/* set by an op that failed (out of device memory, ...); checked by forward */
	kl_err		err;
	bool		failed;
	/* the MLA latent cache holds bf16 numbers (set at creation; see struct kl_seq) */
	bool		mla_cache_bf16;
	/* kernels in the graph of the last decode step run as one (0: none), for benchmarks */
	int			step_kernels;
};

/* bytes of one page of an MLA layer's latent cache */
static inline size_t
kl_mla_page_bytes(const kl_backend *be, const kl_config *c)
{
	return (size_t) KL_MLA_PAGE * (c->kv_lora_rank + c->qk_rope_dim) * (be->mla_cache_bf16 ? 2 : 4);
}

/* Options a backend is created with (from kl_load_opts). */
typedef struct kl_backend_opts
{
	const char *precision;		/* "fp32" (default) or "bf16" (matrix products with bf16 activations) */
	int			device_index;	/* which GPU (CUDA) */
} kl_backend_opts;

int			kl_backend_cpu_create(const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err);

/*
 * The ABI between the engine and the CUDA backend library, which is built
 * apart (kimi_linear_cuda.so) and may be older than the engine that loads it.
 * The library returns the version it was built with from
 * kl_cuda_backend_abi_version(); the loader refuses any other (a library
 * without the function is version 0).  Bump it whenever this header,
 * kl_weight, kl_backend_ops, kl_backend_opts or any structure they reach
 * (config.h, quant.h's kl_qmat, kl_err) changes in a way that moves a field
 * or changes a signature.
 */
#define KL_BACKEND_ABI_VERSION 2

/*
 * dlopen()s the CUDA backend library; a clear error where there is none, it
 * was built for another KL_BACKEND_ABI_VERSION, or there is no GPU.
 */
int			kl_backend_cuda_create(const kl_config *cfg, const kl_backend_opts *opts, kl_backend **out, kl_err *err);

/*
 * MoE routing, shared by every backend (docs/model.md, "Routing"): from the
 * router logits of one token choose k experts and their weights.
 * logits[E] in, experts[k] and weights[k] out; scratch has room for 2*E floats.
 */
void		kl_moe_route(const kl_config *cfg, const float *logits, const float *bias,
						 int *experts, float *weights, float *scratch);

#endif
