/*
 * cuda_internal.h — what the host files of the CUDA backend share:
 *   cuda_backend.c  creation, memory, weights, element-wise ops, the ops table
 *   cuda_matmul.c   matrix products (our GEMV for few rows, cuBLAS otherwise)
 *   cuda_step.c     per-step metadata on the device, CUDA graphs for decode
 *   cuda_pool.c     device memory by size class (no per-object page rounding)
 *   cuda_kda.c, cuda_mla.c, cuda_moe.c   the mixers and the MoE feed-forward
 *   cuda_moe_prefill.c                   the MoE's prefill expert paths
 *   cuda_fp8.c      precision fp8: W8A8 prefill products on cuBLASLt
 *   cuda_sample.c   choosing tokens on the device
 *   cuda_test_hooks.c  buffer handling shared by the mixers' test hooks
 * The kernels are in kernels/ (launchers: kernels/kernels.h).
 *
 * Errors: every CUDA and cuBLAS call is checked; a failure sets be->failed and
 * a message in be->err (backend.h), which forward.c turns into an error of the
 * forward pass.  Nothing here aborts the process: it runs inside PostgreSQL
 * background workers.
 */
#ifndef KL_CUDA_INTERNAL_H
#define KL_CUDA_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include <cuda_runtime_api.h>
#include <cublas_v2.h>

#include "backend.h"
#include "model.h"
#include "../../kernels/kernels.h"

/* scratch buffers of the backend, by id (grow-only) */
enum cuda_buf_id
{
	CB_X_BF16,					/* matmul: activations rounded to bf16 */
	CB_Q_X16,					/* matmul: the dense FP8 kernel's converted activations (KL_CUDA_Q_DENSE) */
	CB_PANEL,					/* matmul: bf16 weight rows widened to fp32 */
	CB_KDA_Q,
	CB_KDA_K,
	CB_KDA_V,
	CB_KDA_BETA,
	CB_KDA_O,
	CB_KDA_CHUNK,
	CB_MLA_QABS,
	CB_MLA_QABS16,				/* decode: Qabs in bf16 for the wgmma attention (KL_CUDA_MLA_FOLD) */
	CB_MLA_OLAT,
	CB_MLA_PACC,
	CB_MLA_PML,
	CB_MLA_LAT,
	CB_MLA_LAT16,
	CB_MLA_KV,
	CB_MLA_Q16,
	CB_MLA_S,
	CB_MLA_P16,
	CB_MOE_LOGITS,
	CB_MOE_SEL,
	CB_MOE_WTS,
	CB_MOE_START,
	CB_MOE_XROW,
	CB_MOE_INV,
	CB_MOE_ACTIVE,
	CB_MOE_G,
	CB_MOE_U,
	CB_MOE_Y,
	CB_MOE_X,
	CB_MOE_H16,
	CB_MOE_PTRS,
	CB_MOE_SG,
	CB_MOE_SU,
	CB_MOE_SY,
	CB_MOE_Y16,					/* KL_CUDA_MOE_PREFILL=3: expert outputs in bf16, where CB_MOE_Y lacks room */
	CB_MOE_GU16,				/* KL_CUDA_MOE_PREFILL=3: gate and up results in bf16, where CB_MOE_G/U lack room */
	CB_MOE_PAD,					/* KL_CUDA_MOE_PREFILL=4: kk_moe_pad_group's work and summary */
	CB_MOE_WQ16,				/* variants 3 and 4: quantized experts converted to bf16 (cuda_moe_prefill.c) */
	CB_SAMPLE_PROB,
	CB_TWIN,					/* bf16 twins written by their producers (cuda_twin_out) */
	CB_X_FP8,					/* precision fp8: activations as E4M3 rows and their scales (cuda_fp8.c) */
	CB_KDA_R16,					/* KL_CUDA_KDA_IN16: bf16 product results, CUDA_R16_MAX buffers from here */
	CB_KDA_R16_LAST = CB_KDA_R16 + 4,
	CB_COUNT
};
#define CUDA_R16_MAX 5			/* bf16 results kept at once: the KDA op's q, k, v, f and gate */

/* device tables of one MoE layer's expert matrices */
typedef struct cuda_moe_tables
{
	const kl_moe_layer *w;
	void	  **dev;			/* [3][E]: gate, up, down device pointers */
	/* the routed experts' form (KK_WF_*; quantized: columns per scale):
	 * gate and up, then down */
	int			fmt_gu,
				group_gu,
				fmt_down,
				group_down;
	bool		uniform;		/* every routed expert's matrices in that form */
	bool		shared_same;	/* the shared expert's too (it may join as expert E) */
} cuda_moe_tables;

/* backend-private form of an MLA layer's kv_b (kl_mla_layer.prepared) */
typedef struct cuda_mla_prep
{
	const void *kv_b;			/* [Ha*(Dn+Dv), R], fp32 or bf16 */
	bool		bf16;
	void	   *owned;			/* our fp32 copy, when the weight is bf16 in fp32 mode */
} cuda_mla_prep;

/*
 * The wgmma decode attention's forms (kernels.h, kk_mla_decode_args; read
 * from the environment by cuda_mla_wg_read, once a backend): its keys a
 * block, its L2 prefetch, and each warpgroup a range of its own.
 */
typedef struct cuda_mla_wg
{
	int			split;			/* KL_CUDA_MLA_WG_SPLIT: keys a block (a multiple of 64); 0: mma_split's */
	int			pf;				/* KL_CUDA_MLA_WG_PF: tiles a range requests into L2 ahead of its copies */
	bool		dual;			/* KL_CUDA_MLA_WG_DUAL: a range a warpgroup where a block holds 2 tiles or more */
	bool		plan_cap;		/* KL_CUDA_MLA_PLAN_CAP=1: ranges planned for the page table's capacity (before 2026-12-03) */
} cuda_mla_wg;

typedef enum cuda_graph_mode
{
	GM_EAGER,					/* ops run as called */
	GM_PENDING,					/* a decode step: embed decides */
	GM_CAPTURE,					/* ops are recorded into a new graph */
	GM_REPLAY					/* ops are skipped; end_step launches a recorded graph */
} cuda_graph_mode;

#define CUDA_MAX_GRAPHS 32

typedef struct cuda_graph
{
	int			n_tokens,
				n_seqs,
				page_cap,
				mla_split;		/* the step's MLA decode keys a range (cuda_mla_plan; page_cap gives the rest) */
	const float *x;				/* the context's residual buffer: identifies the kl_ctx */
	uint64_t	logit_key;		/* kl_step.logit_key: the rows whose logits end the step */
	uint64_t	trace;			/* hash of the ops and their arguments */
	cudaGraphExec_t exec;		/* NULL: seen once, not captured yet */
	int			kernels;		/* kernel nodes in it */
	uint64_t	last_use;
} cuda_graph;

typedef struct cuda_pool cuda_pool;	/* cuda_pool.c */
typedef struct cuda_fp8 cuda_fp8;	/* cuda_fp8.c: cuBLASLt and its cached plans */

/* cuBLAS's workspace (cuda_state.blas_ws), which cuBLASLt's calls share: one stream */
#define CUDA_BLAS_WORKSPACE ((size_t) 32 << 20)

typedef struct cuda_state
{
	int			device;
	int			sm_count;
	bool		bf16;			/* precision "bf16" (or "fp8"): weights and matmul activations */
	/*
	 * Precision "fp8" (cuda_fp8.c; bf16 is set too): fp8 holds cuBLASLt
	 * (NULL in other precisions); products of FP8 per-channel weights with
	 * at least fp8_act_min rows (KL_CUDA_FP8_ACT_MIN, default 65) take FP8
	 * activations; fp8_experts_refused: cuBLASLt refused the experts'
	 * batches (the bf16 arena runs them from then on).  f8: the E4M3 rows
	 * of one input kept for the products after (the bf16 twin's rules:
	 * cuda_acts_invalid drops both).
	 */
	cuda_fp8   *fp8;
	int			fp8_act_min;
	bool		fp8_experts_refused;
	struct
	{
		const float *src;
		int			ld,
					rows,
					cols;
		const uint8_t *q;
		const float *scales;
		bool		valid;
	}			f8;
	bool		mla_c16;		/* the MLA latent cache holds bf16 (bf16 precision) */
	int			mla_mma;		/* decode attention over the bf16 cache on tensor cores: 0 no
								 * (mla_attend), 1 mla_attend_mma, 2 the wgmma variant of
								 * kernels.h "MLA decode attention variants" */
	bool		mla_merge_wide; /* decode: kk_mla_merge_wide (KL_CUDA_MLA_MERGE=0: kk_mla_merge) */
	bool		mla_small;		/* decode steps: the 16-byte-load absorb and output products */
	bool		mla_fold;		/* decode steps: the append folded into that absorb (KL_CUDA_MLA_FOLD) */
	bool		mla_early;		/* the wgmma decode attention's first key tiles' older rows
								 * requested before its wait, its Qabs made in bf16 by the
								 * folded absorb (KL_CUDA_MLA_FOLD=1, the default) */
	cuda_mla_wg mla_wg;			/* the wgmma decode attention's split, L2 prefetch and dual form */
	int			mla_flash;		/* bf16 prefill attention in one kernel: 0 no (cuBLAS), 1 mma.sync
								 * (kernels/mla_flash.cu), 2 or 3 wgmma with that many warpgroups
								 * (kernels/mla_flash_wgmma.cu) */
	cudaStream_t stream;
	cublasHandle_t blas;
	void	   *blas_ws;

	cuda_pool  *pool;			/* weights, states, pages, activations */
	void	   *buf[CB_COUNT];
	size_t		buf_cap[CB_COUNT];
	void	  **deferred;		/* replaced buffers that a graph may still use */
	int			n_deferred,
				cap_deferred;

	/* this step's metadata (device), uploaded by begin_step */
	void	   *meta_host;		/* pinned */
	void	   *meta_dev;
	size_t		meta_cap;
	cudaEvent_t meta_done;
	int			n_seqs,
				n_tokens,
				page_cap;
	int			mla_split,		/* cuda_mla_plan: keys a range of the MLA decode attention, */
				mla_max_splits;	/* ranges a token (the grid, for the page table's capacity) */
	int			mla_dual;		/* and each warpgroup a range of its own (KL_CUDA_MLA_WG_DUAL) */
	uint64_t	logit_key;
	int		   *d_row0,
			   *d_row_seq,
			   *d_absorbed;
	int64_t    *d_pos0;
	float	  **d_kda_S,
			  **d_kda_conv,
			  **d_pages;
	int		   *h_absorbed;		/* host copy, [n_seqs] */
	int			h_absorbed_cap;
	bool		any_absorbed,
				any_expanded;

	/* token ids for embed */
	int32_t    *ids_host;		/* pinned */
	int32_t    *ids_dev;
	int			ids_cap;
	cudaEvent_t ids_done;

	cuda_moe_tables *moe;
	int			n_moe,
				cap_moe;

	/* graphs of decode steps */
	bool		graphs_enabled;
	cuda_graph_mode mode;
	uint64_t	trace;
	int			cur;			/* graph entry of the step (PENDING/CAPTURE/REPLAY) */
	cuda_graph	graphs[CUDA_MAX_GRAPHS];
	uint64_t	clock;

	/* a residual add held back to be fused into the rmsnorm that follows it */
	bool		pend;
	float	   *pend_y;
	const float *pend_x;
	size_t		pend_n;
	/* a MoE combine held back likewise (cuda_defer_combine) */
	bool		pend_moe;
	float	   *pm_y;
	int			pm_n,
				pm_D,
				pm_k;
	const float *pm_wts,
			   *pm_ye,
			   *pm_ys;
	const uint16_t *pm_ye16;	/* bf16 expert outputs instead of pm_ye (cuda_defer_combine16) */
	const int  *pm_inv;
	/* the MoE op that held it was cuda_moe's fused decode path (routing, gate/up,
	 * down), so the kernel that wrote pm_wts and pm_inv is three launches before
	 * the combine's (row_norm_kernel's early form 2 may read them before its PDL
	 * wait) */
	bool		pm_route_early;
	/* KL_CUDA_NORM_EARLY (2, the default; 0: off): the row norms read before
	 * their PDL wait the norm weight (1), and with a combine held back as above
	 * also the residual and the routing weights and indices (2);
	 * kk_row_norm_twin's early, the same bits in every form (kernels.h) */
	int			norm_early;

	/* decode-step switches (KL_CUDA_MOE_FUSE=0, KL_CUDA_PDL=0 turn them off) */
	bool		fuse_moe;
	/* KL_CUDA_EXPERT_MMA: decode steps of at least this many tokens run the
	 * experts on the tensor cores in bf16 precision (0: never) */
	int			expert_mma_min;
	/* KL_CUDA_GEMV_MMA: bf16-precision decode products of at least this many
	 * rows (and at most 8) run on the tensor cores (0: never) */
	int			gemv_mma_min;
	/* KL_CUDA_Q_MMA: bf16-precision decode products of quantized weights of
	 * at least this many rows run on the tensor cores (default 2; 0: never;
	 * KL_CUDA_Q_DIRECT=0 keeps FP8 ones of up to 8 rows out of mma_q.cu's
	 * direct kernel: kk_set_mma_q_direct; KL_CUDA_Q_DENSE=N (default 2)
	 * puts FP8 ones of up to KL_CUDA_Q_DENSE_ROWS rows in its dense kernel,
	 * N tiles a block at most: kk_set_mma_q_dense; KL_CUDA_Q_SHAPE=-1..3
	 * sets how the CUDA-core kernels choose their block shape:
	 * kk_gemv_q_force_shape, default 3, by the heaviest job) */
	int			q_mma_min;
	/*
	 * KL_CUDA_Q_TWIN (default on; =0 off): the dense FP8 decode products
	 * (mma_q.cu's dense / tokens-as-M kernels) read their input's bf16 twin
	 * (tw) where one is valid instead of converting it in a launch of their
	 * own (q_mma_launch presets kk_gemv_job.x16), and the producers of
	 * decode steps of q_mma_min .. q_twin_rows rows write twins
	 * (cuda_twin_out) where the model has such products (q_fp8_dense: an
	 * FP8 weight of one scale a row and cols % 64 == 0 was loaded).
	 * q_twin_rows: 0 when off, else the rows the dense kernel takes
	 * (KL_CUDA_Q_DENSE on: KL_CUDA_Q_DENSE_ROWS or KK_GEMV_MMA_Q_ROWS).
	 */
	int			q_twin_rows;
	bool		q_fp8_dense;
	/* KL_CUDA_Q_EXPERT_MMA: decode steps of at least this many tokens run
	 * quantized experts on the tensor cores in bf16 precision (default 4:
	 * FP8 at batch 4 4.22 ms a step against 5.30 on the CUDA cores, batch 2
	 * 3.35 against 3.31, H200 2026-11-30; 0: never) */
	int			q_expert_mma_min;
	/* fused routing in warps (kk_moe_route_group_warp) for steps of at most
	 * this many tokens; 0: the block kernel (KL_CUDA_ROUTE_WARP) */
	int			route_warp;
	/* KL_CUDA_ROUTE_RANK: where the warp routing would run, steps of up to
	 * this many tokens route by rank (kk_moe_route_group_rank) where it
	 * covers the shape; 0: never */
	int			route_rank_max;
	/* KL_CUDA_KDA_STATE_ROUND=bf16: the per-token recurrence stores its state
	 * rounded to bf16 (measures a bf16 state's drift; the storage stays fp32) */
	int			kda_round16;
	/* decode steps of up to this many sequences run the KDA mixer in one
	 * kernel (kk_kda_decode), others as three (prep, recurrence, gated norm);
	 * the same outputs bit for bit.  KL_CUDA_KDA_FUSED: 0 never, N up to N,
	 * default 8; 0 below Hopper and for head sizes it does not cover */
	int			kda_fused_max;
	/* that kernel in the form that reads the state, the conv tails and the
	 * step's metadata before waiting for the kernel before it
	 * (kda_decode_early_kernel; KL_CUDA_KDA_DEC_EARLY=0: kda_decode_kernel,
	 * the order of before; the same outputs bit for bit) */
	bool		kda_dec_early;
	/* precision bf16: the chunkwise KDA form (prefill) on tensor cores,
	 * kk_kda_chunked_mma (KL_CUDA_KDA_MMA=0: the fp32 kernels, as in
	 * precision fp32; default on from sm_80 for head sizes 32, 64, 128) */
	bool		kda_mma;

	/* sampling: staging (pinned) and its device copy (cuda_sample.c) */
	void	   *smp_host;
	void	   *smp_dev;
	size_t		smp_cap;
	/* KL_CUDA_SAMPLE_WIDE=0: one block per row (kk_sample) instead of a
	 * cluster of blocks per row (kk_sample_wide); the same choices */
	bool		sample_wide;
	/* KL_CUDA_SAMPLE_WIDE=2: the fast cluster kernel (kk_sample_fast), the same choices */
	bool		sample_fast;
	/* KL_CUDA_PREFETCH: decode steps of at least this many tokens act on the
	 * prefetch hint (cu_prefetch; INT_MAX never) */
	int			prefetch_min;
	/* KL_CUDA_PREFETCH_MB: bytes one window of hints may fetch; used so far */
	size_t		prefetch_budget,
				prefetch_used;
	/* KL_CUDA_PREFETCH_Q: quantized weights take the hints too (default off) */
	bool		prefetch_q;
	/* the prefetches run on a side stream forked off the step's stream, so
	 * they never delay it; the product of pf_wait_for joins it back */
	cudaStream_t pf_stream;
	cudaEvent_t pf_fork,
				pf_join;
	bool		pf_pending;
	const kl_weight *pf_wait_for;

	bool		no_grouped_gemm;	/* cuBLAS here lacks bf16 grouped GEMM: loop instead */
	/*
	 * KL_CUDA_MOE_PREFILL: the routed experts of a prefill batch (more than
	 * 64 tokens, bf16 precision, bf16 experts) — 0 the older code (grouped
	 * products with fp32 results, else a product per expert through
	 * cuda_matmul_raw), 3 batched products over size classes (below),
	 * falling back to 0 where cuBLAS refuses them; 4 (default) the same
	 * products with the grouping made on the device (cuda_moe_device_group),
	 * falling back to 3 where the shape is not covered and to 0 where cuBLAS
	 * refuses.  Quantized experts take 3 and 4 too (moe_q_batched,
	 * KL_CUDA_Q_BATCHED=0 keeps them on 0): the layer's used experts are
	 * converted to bf16 (kk_q_dequant_many_bf16, the panels' values) into
	 * CB_MOE_WQ16 before each stage's products.
	 * moe_prefill_ran: the variant the last such op ran (-1: none yet).
	 */
	int			moe_prefill;
	int			moe_prefill_ran;
	bool		moe_q_batched;
	/*
	 * Variant 3 (cuda_moe_prefill.c, cuda_moe_experts_batched16): the used
	 * experts of the last prefill op by size class, from cuda_moe_host_group
	 * — each expert's rows padded to its class's size (a multiple of 64 or
	 * 128) in a slot of the padded layout; one cublasGemmBatchedEx per class
	 * and stage.
	 * moe_cls holds, for moe_cls_cap experts: base [cap] (an expert's first
	 * padded row), order [cap] (the used experts, class by class), size
	 * [cap] and first [cap + 1] (class c: order[first[c] .. first[c + 1]),
	 * slots of size[c] rows).  moe_npad: the padded rows of all slots.
	 * moe_batched_refused / _status: cuBLAS refused a batched call (variant
	 * 0 runs instead for the backend's life).
	 */
	int			moe_cls_cap;
	int		   *moe_cls;
	int			moe_ncls;
	int			moe_npad;
	bool		moe_batched_refused;
	int			moe_batched_status;
	/*
	 * Variant 4 (cuda_moe_prefill.c, cuda_moe_device_group): the same layout
	 * made on the device; its summary (kk_moe_pad_group: counts, first
	 * padded rows, totals) comes back into pinned moe_pad_host (room for
	 * moe_pad_host_cap ints), moe_pad_done recorded after that copy.
	 */
	int		   *moe_pad_host;
	int			moe_pad_host_cap;
	cudaEvent_t moe_pad_done;
	/* variant 3's pointer arrays for moe_grp_cap problems (pinned, uploaded
	 * asynchronously: cuda_upload_sync would drain the stream) */
	int			moe_grp_cap;
	void	  **moe_grp_ptrs;	/* pinned [4][cap]: A (weights), B (rows), C, quantized source of A */
	/*
	 * Benchmarks only (kl_cuda_bench_moe_products, cuda_moe.c): events
	 * recorded around a prefill MoE's expert products (NULL: none), and
	 * which of them the last MoE op recorded.
	 */
	cudaEvent_t *moe_ev;
	unsigned	moe_ev_mask;

	/*
	 * KL_CUDA_BF16_TWIN (default on; bf16 precision only): the bf16 rounding
	 * of one activation, so that the products of it convert it once or not
	 * at all (cuda_matmul.c, cuda_x_bf16).  tw describes it: the fp32 rows
	 * src [rows, cols] (row stride ld) whose f32_to_bf16 is at dst (rows
	 * contiguous); valid until any op but a product (or the MoE op of src)
	 * runs, a product writes over src, or dst's buffer is written again.
	 * Written by the row norms and the SwiGLU of many rows into CB_TWIN
	 * (in_xbuf false), or by a product's conversion into CB_X_BF16
	 * (in_xbuf true).  tw_scope: the products running now may use and record
	 * it (forward.c's products, the MoE's shared expert), where the input
	 * is not written by an op behind the step's back.
	 */
	bool		bf16_twin;
	bool		tw_scope;
	struct
	{
		const float *src;
		int			ld,
					rows,
					cols;
		const uint16_t *dst;
		bool		valid,
					in_xbuf;
	}			tw;

	/*
	 * KL_CUDA_KDA_IN16 (precision bf16, prefill steps): products whose job
	 * says result16 (forward.c: the KDA op's q, k, v, f and gate) and that
	 * run as GEMMs write their result as bf16 into a buffer of their own
	 * (CB_KDA_R16 + i) and leave the fp32 y unwritten; r16 records them
	 * (y [rows, cols] contiguous -> dst).  kda_in16: the KL_R16_* roles kept
	 * (default KL_R16_KDA_IN; 0 none).  cuda_kda reads them (q, k, v, f by
	 * the rows prep and the tails) and widens what a path cannot read; any
	 * other op, a product over or from y's rows, an upload or download, and
	 * end of step widen them back into y first (cuda_r16_flush), so no
	 * reader ever sees a stale y.  kda_out16 (KL_CUDA_KDA_OUT16=1, opt-in,
	 * precision bf16): in prefill steps whose every sequence takes the
	 * chunkwise form on tensor cores (K = 128), the rows prep writes the
	 * prepared q, k, v as bf16 only and kk_kda_chunked_mma16 reads them.
	 * step_prefill: the step is not a decode step (n_tokens != n_seqs);
	 * decode steps never keep bf16 results.
	 */
	int			kda_in16;
	bool		kda_out16;
	bool		step_prefill;
	int			n_r16;
	struct
	{
		const float *y;
		int			rows,
					cols;
		const uint16_t *dst;
		int			buf;		/* its cuda_buf id */
	}			r16[CUDA_R16_MAX];

	/* host staging for MoE grouping of prefill batches */
	int		   *h_sel,
			   *h_xrow,
			   *h_inv,
			   *h_start;
	size_t		h_moe_cap;
} cuda_state;

static inline cuda_state *
CS(kl_backend *be)
{
	return (cuda_state *) be->impl;
}

/* an op may have written the rows of a kept activation: drop the bf16 twin and the FP8 rows */
static inline void
cuda_acts_invalid(cuda_state *cs)
{
	cs->tw.valid = false;
	cs->f8.valid = false;
}

/*
 * A weight's device form (kernels.h's KK_WF_*): quantized weights (w->q.type,
 * quant.h) are one object of data rows then fp32 scales at w->dev; the
 * others bf16 or fp32 as stored (f16 is widened to fp32 at load).
 */
static inline int
cuda_weight_fmt(const kl_weight *W)
{
	switch (W->q.type)
	{
		case KL_Q_FP8:
			return KK_WF_FP8;
		case KL_Q_INT8:
			return KK_WF_INT8;
		case KL_Q_INT4:
			return KK_WF_INT4;
		default:
			return W->dtype == KL_DT_BF16 ? KK_WF_BF16 : KK_WF_F32;
	}
}

static inline bool
cuda_weight_quantized(const kl_weight *W)
{
	return W->q.type != KL_Q_NONE;
}

/* bytes of W's device object */
static inline size_t
cuda_weight_bytes(const kl_weight *W)
{
	if (cuda_weight_quantized(W))
		return kk_q_bytes(W->rows, cuda_weight_fmt(W), W->cols, W->q.group);
	return (size_t) W->rows * W->cols * (W->dtype == KL_DT_BF16 ? 2 : 4);
}

/* error reporting: false (and be->failed set) when the call failed */
bool		cuda_ok(kl_backend *be, cudaError_t e, const char *what);
bool		cuda_launched(kl_backend *be, const char *what);
bool		blas_ok(kl_backend *be, cublasStatus_t st, const char *what);
void		cuda_fail(kl_backend *be, kl_errcode code, const char *fmt,...) __attribute__((format(printf, 3, 4)));
/* Move the failure recorded in be->err into err (after "context: ", unless
 * context is NULL), code included, and clear it.  Returns KL_FAIL. */
int			cuda_take_failure(kl_backend *be, kl_err *err, const char *context);

/* a scratch buffer of at least `bytes` (contents undefined); NULL on failure */
void	   *cuda_buf(kl_backend *be, int id, size_t bytes);
/* cuda_pool.c: device objects carved from slabs by size (see there) */
void	   *cuda_pool_alloc(kl_backend *be, size_t bytes);
void		cuda_pool_free(kl_backend *be, void *p);
void		cuda_pool_destroy(kl_backend *be);

/* host -> device, synchronous */
bool		cuda_upload_sync(kl_backend *be, void *dst, const void *src, size_t bytes);

/* Returns true when the op must not run now: the backend failed, or a graph
 * replay is pending (the op is traced instead).  Every op that a forward step
 * calls starts with it. */
bool		cuda_step_skip(kl_backend *be, int op, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d);
/* the step's stream waits for the prefetch side stream, if forked */
void		cuda_prefetch_join(kl_backend *be);
/* launch a held-back residual add (any op but the fusing rmsnorm calls it first) */
void		cuda_flush_add(kl_backend *be);
/* y = the MoE combine (kk_moe_combine), held back: the residual add that reads
 * y and the rmsnorm after it become one kernel (kk_moe_combine_add_rmsnorm);
 * any other op launches it first */
void		cuda_defer_combine(kl_backend *be, float *y, int n, int D, int k, const float *wts, const int *inv,
							   const float *ye, const float *ys);
/* cuda_defer_combine with bf16 expert outputs ye16 (kk_moe_combine16) */
void		cuda_defer_combine16(kl_backend *be, float *y, int n, int D, int k, const float *wts, const int *inv,
								 const uint16_t *ye16, const float *ys);

enum cuda_op
{
	OP_EMBED = 1, OP_RMSNORM, OP_MATMUL, OP_ADD, OP_SWIGLU, OP_KDA, OP_MLA, OP_MOE, OP_COPY, OP_PREFETCH
};

/* cuda_matmul.c */
void		cuda_matmul(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);
void		cuda_matmul_batch(kl_backend *be, const kl_matmul_job *jobs, int count);
void		cuda_matmul_batch_raw(kl_backend *be, const kl_matmul_job *jobs, int count);
/* the product itself, without the step bookkeeping (for the mixers) */
void		cuda_matmul_raw(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);
/* the same in fp32 arithmetic whatever the precision mode (MoE routing) */
void		cuda_matmul_fp32(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);
/*
 * bf16 twins (KL_CUDA_BF16_TWIN; see cuda_state.tw).  cuda_twin_out: the
 * CB_TWIN buffer for a producer's twin of rows x cols, or NULL where none
 * is wanted (off, fp32 precision, rows the products take as GEMVs, unless
 * dense FP8 products read twins at those rows: q_twin_rows) or on
 * failure (be->failed set); any twin held there is dropped.  The producer
 * then calls cuda_twin_set when it launched the writes.  cuda_x_bf16: the
 * bf16 rows of x [n, cols] (ldx) for a product, *ld16 their stride: the twin
 * where it is x's, else converted (into CB_X_BF16, recorded as the twin when
 * in tw_scope); NULL on failure.  cuda_to_bf16: kk_f32_to_bf16, by the
 * four-column kernel when the switch is on (the same numbers).
 */
uint16_t   *cuda_twin_out(kl_backend *be, int rows, int cols);
void		cuda_twin_set(cuda_state *cs, const float *src, int ld, int rows, int cols, const uint16_t *dst,
						  bool in_xbuf);
const uint16_t *cuda_x_bf16(kl_backend *be, const float *x, int ldx, int n, int cols, int *ld16);
void		cuda_to_bf16(kl_backend *be, uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols);
/*
 * bf16 product results (KL_CUDA_KDA_IN16; cuda_state.r16).
 * cuda_r16_product: run job jb keeping its result in bf16 only where the
 * backend takes its result16 (true: done, or the backend failed); false:
 * run it as usual.  cuda_r16_offer: record fp32 rows y [n, cols] as if a
 * product had kept them (converted to bf16 by the record's own path; for
 * bench_cuda's KDA op, kl_cuda_bench_kda_offer16); false when not kept.
 * cuda_r16_find: the bf16 rows kept for y [rows, cols], or NULL.
 * cuda_r16_widen: y's record widened into y and dropped (none: nothing).
 * cuda_r16_overlap: the same for every record whose rows overlap p [rows,
 * cols] (row stride ld).  cuda_r16_flush: all of them.  cuda_r16_drop:
 * y's record dropped without widening (its reader consumed it; the bf16
 * rows stay readable in stream order until a later product takes the
 * buffer).  cuda_r16_forget: all dropped so (a new step).
 */
bool		cuda_r16_product(kl_backend *be, const kl_matmul_job *jb);
bool		cuda_r16_offer(kl_backend *be, const float *y, int n, int cols, int role);
const uint16_t *cuda_r16_find(const cuda_state *cs, const float *y, int rows, int cols);
void		cuda_r16_widen(kl_backend *be, const float *y);
void		cuda_r16_overlap(kl_backend *be, const float *p, int ld, int rows, int cols);
void		cuda_r16_flush(kl_backend *be);
void		cuda_r16_drop(cuda_state *cs, const float *y);
void		cuda_r16_forget(cuda_state *cs);
/* C (bf16) [n, rows] = x16 [n, cols] (bf16, ldx) W^T, W bf16 */
bool		cuda_gemm_bf16_out(kl_backend *be, uint16_t *y, int ldy, const uint16_t *x, int ldx, int n,
							   const void *W, int rows, int cols);

/* cuda_step.c */
int			cuda_begin_step(kl_backend *be, const kl_step *st, kl_err *err);
void		cuda_end_step(kl_backend *be, const kl_step *st);
void		cuda_embed(kl_backend *be, float *x, const kl_weight *E, const int32_t *ids, int n);
void		cuda_graphs_forget_buffer(kl_backend *be, const void *p);
void		cuda_graphs_destroy(kl_backend *be);
void		cuda_abort_capture(kl_backend *be);

/* cuda_kda.c, cuda_mla.c, cuda_moe.c */
void		cuda_kda(kl_backend *be, const kl_step *st, const kl_kda_args *a);
void		cuda_mla(kl_backend *be, const kl_step *st, const kl_mla_args *a);
int			cuda_prepare_mla(kl_backend *be, kl_mla_layer *w, kl_err *err);
void		cuda_release_mla(kl_backend *be, kl_mla_layer *w);
int			cuda_mla_decode_variant(int asked, bool c16, int Ha, int R, int Dr);
int			cuda_mla_decode_variant(int asked, bool c16, int Ha, int R, int Dr);
void		cuda_mla_wg_read(cuda_mla_wg *o);
void		cuda_mla_plan(cuda_state *cs, int64_t keys, int64_t cap_keys, int n);
void		cuda_moe(kl_backend *be, const kl_config *cfg, const kl_moe_layer *w, float *y, const float *x, int n);
void		cuda_moe_free(kl_backend *be);

/*
 * Shared by cuda_moe.c (the op) and cuda_moe_prefill.c (its prefill expert
 * paths).  cuda_moe_mark (cuda_moe.c): records benchmark event i of the op
 * (pairs start, end: routed gate/up, routed down, shared gate/up, shared
 * down) when a benchmark asked for them (cs->moe_ev) in eager mode.
 */
void		cuda_moe_mark(cuda_state *cs, int i);
/*
 * cuda_moe_prefill.c.  cuda_moe_host_group: downloads the expert choices
 * d_sel [n][k] (a stream drain), counts them into cs->h_start, and uploads
 * the stable grouping: d_xrow (the token of each grouped row) and d_inv (the
 * grouped row of each (token, slot) pair); pad (variant 3): rows go to their
 * expert's slot of the padded size-class layout instead (d_inv only).
 * False: be->failed set.
 */
bool		cuda_moe_host_group(kl_backend *be, int n, int E, int k, const int *d_sel, int *d_xrow, int *d_inv,
								bool pad);
/*
 * KL_CUDA_MOE_PREFILL=3 on the padded grouping: the expert outputs [npad, D]
 * (bf16), or NULL: be->failed set, or clear when cuBLAS refused (the caller
 * groups again without padding and runs variant 0).  g, u, ye: the caller's
 * fp32 buffers, used as bf16 scratch when the padded layout fits them.
 */
const uint16_t *cuda_moe_experts_batched16(kl_backend *be, const kl_moe_layer *w, int D, int F, const float *x,
										   const int *inv, int n, int k, float *g, float *u, float *ye);
/*
 * KL_CUDA_MOE_PREFILL=4, in two calls around the work that does not need
 * the grouping (the shared expert): cuda_moe_device_group launches the
 * grouping of d_sel on the device (d_inv: variant 3's padded layout), the
 * copy of its summary to the host and the token-major gather of x [n, D]
 * into the bf16 rows the products read, without waiting; false with
 * be->failed clear: the shape is not covered (the caller runs variant 3).
 * cuda_moe_device_group_wait waits for the summary alone and lays out the
 * size classes from it (cs->h_start, moe_classes), checking that the host's
 * layout is the one the device wrote.  Then cuda_moe_batched_products.
 */
bool		cuda_moe_device_group(kl_backend *be, int n, int E, int k, const int *d_sel, int *d_inv, const float *x,
								  int D, bool gather16);
bool		cuda_moe_device_group_wait(kl_backend *be, int n, int E, int k);
/*
 * The products of variants 3 and 4 on rows already gathered (CB_MOE_X) in
 * the layout of cs->moe_cls: the expert outputs as
 * cuda_moe_experts_batched16 returns them.
 */
const uint16_t *cuda_moe_batched_products(kl_backend *be, const kl_moe_layer *w, int D, int F, int n, int k,
										  float *g, float *u, float *ye);
/*
 * KL_CUDA_MOE_PREFILL=0 in bf16: the same outputs through three grouped
 * products with fp32 results.  False with be->failed clear: not done here
 * (cuBLAS refused, or no host memory for the argument lists; the caller
 * loops over the experts); with be->failed set: an error.
 */
bool		cuda_moe_experts_grouped(kl_backend *be, const kl_moe_layer *w, const int *st, int E, int D, int F,
									 const float *x, const int *xrow, size_t nk, float *g, float *u, float *ye);

/*
 * Variant 3's pinned pointer arrays (cs->moe_grp_ptrs) for at least cap
 * problems, and problem i in them: A (the weights a product reads), B
 * (rows), C (results), the quantized matrix A is converted from (NULL: none).
 */
bool		cuda_moe_batch_arrays(kl_backend *be, int cap);
/* the batched products' bf16 results: in the caller's g, u, ye when the padded rows fit, else own buffers */
bool		cuda_moe_out16(kl_backend *be, float *g, float *u, float *ye, size_t room, size_t Np, int D, int F,
						   uint16_t **g16, uint16_t **u16, uint16_t **ye16);
void		cuda_moe_batch_problem(cuda_state *cs, int i, const void *W, const void *X, void *C, const void *Wq);

/*
 * cuda_fp8.c (precision fp8).  cuda_fp8_create: cuBLASLt and its state in
 * cs->fp8 (-1: failed); cuda_fp8_free releases them.  cuda_fp8_dense_takes:
 * does a product of n rows with W take FP8 activations?  cuda_matmul_fp8:
 * y = x W^T that way; false where cuBLASLt refused the shape (nothing done:
 * the caller runs precision bf16's path).  cuda_fp8_experts_take: do a
 * layer's routed experts (FP8 per channel) take the FP8 batches?
 * cuda_fp8_experts: variants 3 / 4's products that way on the padded
 * layout of cs->moe_cls (inv: each pair's padded row; sel: the pairs'
 * experts; tab_dev: cuda_moe_tables.dev), the expert outputs [npad, D]
 * in bf16 (scaled), or NULL: be->failed set, or clear where cuBLASLt
 * refused (the caller runs variant 0).
 */
int			cuda_fp8_create(kl_backend *be);
void		cuda_fp8_free(cuda_state *cs);
bool		cuda_fp8_dense_takes(const cuda_state *cs, int n, const kl_weight *W);
bool		cuda_matmul_fp8(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);
bool		cuda_fp8_experts_take(const cuda_state *cs, const kl_moe_layer *w, int E, int D, int F);
const uint16_t *cuda_fp8_experts(kl_backend *be, const kl_moe_layer *w, const void *const *tab_dev, int E, int D,
								 int F, const float *x, const int *sel, const int *inv, int n, int k, float *g,
								 float *u, float *ye);

/* cuda_sample.c: the backend's sample op */
int			cuda_sample(kl_backend *be, float *logits, int vocab, const kl_sample_row *rows, int n, int32_t *ids,
						kl_err *err);

/*
 * cuda_test_hooks.c: the buffer handling of the test hooks of cuda_kda.c and
 * cuda_mla.c (never the backend's).  The caller sets *s and d[0 .. nbuf-1]
 * to NULL first and calls hook_close whatever hook_open returned.
 * hook_open makes the stream *s (non-blocking), then for each of the nbuf
 * device buffers in turn allocates d[i] of sz[i] bytes and uploads in[i]
 * where it is not NULL; it stops at the first failure.  hook_open_fill
 * does the same, and sets every byte of a buffer without input (in[i]
 * NULL) to fill where fill >= 0 (0xff: fp32 NaN, so that what a kernel
 * leaves unwritten shows), each in its turn with the uploads.
 * hook_close, while rc is still 0, copies device buffer d[dev_of[i]]
 * (sz[dev_of[i]] bytes) into host_out[i] for i < nout, then waits for the
 * stream (when there is one) and frees the buffers and the stream.
 * hook_open and hook_open_fill return 0 or the first CUDA error; hook_close
 * returns rc where it is not 0, else the first CUDA error of its copies or
 * its wait, else 0.
 */
int			hook_open(cudaStream_t *s, void **d, const size_t *sz, const void *const *in, int nbuf);
int			hook_open_fill(cudaStream_t *s, void **d, const size_t *sz, const void *const *in, int nbuf, int fill);
int			hook_close(cudaStream_t s, void **d, const size_t *sz, int nbuf, const int *dev_of,
					   void *const *host_out, int nout, int rc);

/* test hook of cuda_moe.c (test_cuda.c calls it through dlsym): the fused
 * decode routing launchers on host inputs, outputs copied back */
/* test hook of cuda_mla.c: the MLA absorb and output products of n decode
 * tokens through the older kernels and the KL_CUDA_MLA_SMALL ones */
int			kl_cuda_test_mla_small(int n, int Ha, int Dn, int Dr, int Dv, int R, int bf16, const float *q,
								   const void *kv_b, const float *olat, const int *absorbed, float *qabs_old,
								   float *qabs_new, float *out_old, float *out_new);
/* test hook of cuda_mla.c: the flash prefill attention of a KL_CUDA_MLA_FLASH kind (1, 2, 3) on host bf16 inputs */
int			kl_cuda_test_mla_flash(int kind, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R,
								   const uint16_t *q16, const uint16_t *kv16, const uint16_t *lat16, float *out);
/* benchmark hook of cuda_mla.c: the prefill attention alone, flash kernel or cuBLAS path */
int			kl_cuda_bench_mla(kl_backend *be, int T, int Ha, int Dn, int Dr, int Dv, int R, int flash, int reps,
							  double *ms);
/* test hook of cuda_matmul.c: one batch of plain tensor-core products
 * through gemv_mma_kernel and gemv_slab_kernel (KL_CUDA_GEMV_MMA_SLAB) */
int			kl_cuda_test_gemv_slab(int n, int count, const int *rows, const int *cols, int xpad,
								   unsigned long long seed, float *out_old, float *out_new);
/* test hook of cuda_kda.c: one KDA decode step through the three kernels
 * and through kk_kda_decode (KL_CUDA_KDA_FUSED; early: KL_CUDA_KDA_DEC_EARLY's form) */
int			kl_cuda_test_kda_decode(int early, int ns, int H, int K, int W, int round16, float eps, const float *q,
									const float *k, const float *v, const float *f, const float *b, const float *gate,
									const float *conv_q, const float *conv_k, const float *conv_v,
									const float *A_log, const float *dt_bias, const float *o_norm, const float *S,
									const float *tails, float *out_old, float *out_new, float *S_old, float *S_new,
									float *tails_old, float *tails_new);
/* test and bench hook of cuda_moe.c: the KL_CUDA_MOE_PREFILL variant asked,
 * the one the last prefill MoE op ran (-1 none), the cuBLAS status that made
 * variant 3 or 4 fall back to 0 (0 none) */
int			kl_cuda_moe_prefill_path(kl_backend *be, int info[3]);
/* test hook of cuda_moe_prefill.c: kk_moe_pad_group (KL_CUDA_MOE_PREFILL=4's grouping) on host choices */
int			kl_cuda_test_moe_pad_group(int n, int E, int k, const int *sel, int *inv, int *summary);
int			kl_cuda_test_route_group(int warp, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
									 int bias_in_w, float scaling, int shared_rows, int P, const float *logits,
									 const float *bias, int *sel, float *wts, int *start, int *xrow, int *inv,
									 int *active);

#endif
