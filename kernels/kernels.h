/*
 * kernels.h — the launchers of the CUDA kernels (kernels/NAME.cu), callable from
 * the C host code of the backend (src/cuda/).  Every launcher enqueues work on
 * the given stream and returns at once; the caller checks cudaGetLastError().
 * Launchers that return int give 0, -1 for a shape they do not support, or a
 * CUDA error code.
 *
 * All pointers are device pointers unless a comment says otherwise.
 * Activations are fp32 row-major; `bf16` flags say whether a weight matrix is
 * bf16 (else fp32).
 */
#ifndef KL_CUDA_KERNELS_H
#define KL_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

/* rows per page of the MLA latent cache: must equal KL_MLA_PAGE (backend.h) */
#define KK_MLA_PAGE 1024

#ifdef __cplusplus
extern "C"
{
#endif

/* elementwise.cu */
/* launch the decode kernels with programmatic dependent launch (common.cuh) */
void		kk_set_pdl(int on);
void		kk_embed(cudaStream_t s, float *x, const void *E, int bf16, int D, const int32_t *ids, int n);
void		kk_rmsnorm(cudaStream_t s, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int d,
					   float eps);
void		kk_add(cudaStream_t s, float *y, const float *x, size_t n);
/* prefetch.cu: start fetching [p, p + bytes) into L2 (a hint; see there) */
void		kk_prefetch_weight(cudaStream_t s, const void *p, size_t bytes);
/* x += a, then y = rmsnorm(x) (contiguous rows of d; y may be a) */
void		kk_add_rmsnorm(cudaStream_t s, float *y, float *x, const float *a, const float *w, int rows, int d,
						   float eps);
/* the row kernels behind kk_rmsnorm (mode 0), kk_add_rmsnorm (1) and
 * kk_moe_combine_add_rmsnorm (2), for rows they cover (d % 4 == 0, aligned):
 * 0 when launched, -1 when the caller must use the general kernel */
int			kk_row_norm(cudaStream_t s, int mode, float *y, int ldy, float *x, int ldx, const float *a, const float *w,
						int rows, int d, float eps, int k, const float *wts, const int *inv, const float *ye,
						const float *ys);
/* kk_row_norm's mode 2 with bf16 expert outputs ye16 (contiguous rows of d):
 * 0 when launched, -1 when the caller must use the general kernel */
int			kk_row_norm_combine16(cudaStream_t s, float *y, float *x, const float *w, int rows, int d, float eps,
								  int k, const float *wts, const int *inv, const uint16_t *ye16, const float *ys);
void		kk_swiglu(cudaStream_t s, float *h, const float *g, const float *u, int rows, int width, int ld);
void		kk_f32_to_bf16(cudaStream_t s, uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols);
/*
 * bf16 twins (KL_CUDA_BF16_TWIN, cuda_matmul.c): producers that also write
 * the bf16 rounding (f32_to_bf16) of their fp32 output, rows contiguous, so
 * that the products reading it need no conversion pass.  0 when launched,
 * -1 when the shape or alignment is not covered (nothing launched).
 * kk_row_norm_twin: kk_row_norm's modes 0, 1, 2 and 3 (3: the bf16 expert
 * outputs of kk_row_norm_combine16 in ye) with y16 [rows, d] (NULL: none);
 * early (KL_CUDA_NORM_EARLY, 2 by default; the same bits in every form since
 * the sum of squares is written out, elementwise.cu): what the kernel
 * reads before waiting for the kernel launched before it (elementwise.cu's
 * row kernels): 0 nothing, 1 the norm weight w, 2 (modes 2 and 3; k <= 8,
 * else 1) also x, wts and inv, which the caller guarantees no kernel wrote
 * within the last launch (routing, gate/up, down, this: three launches), as
 * kk_expert_gemv's early read of start and active.
 * kk_swiglu_twin: kk_swiglu with h16 [rows, width].
 * kk_f32_to_bf16_v4: kk_f32_to_bf16 (the same numbers) four columns a thread.
 */
int			kk_row_norm_twin(cudaStream_t s, int mode, float *y, int ldy, uint16_t *y16, float *x, int ldx,
							 const float *a, const float *w, int rows, int d, float eps, int k, const float *wts,
							 const int *inv, const void *ye, const float *ys, int early);
int			kk_swiglu_twin(cudaStream_t s, float *h, uint16_t *h16, const float *g, const float *u, int rows,
						   int width, int ld);
void		kk_f32_to_bf16_v4(cudaStream_t s, uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols);
/* kda.cu: kk_kda_gated_norm with out16 [n_tokens, H*V] (8-byte aligned; NULL: none) */
void		kk_kda_gated_norm_twin(cudaStream_t s, int n_tokens, int H, int V, const float *o, const float *gate,
								   const float *w, float eps, float *out, uint16_t *out16);
void		kk_bf16_to_f32(cudaStream_t s, float *dst, const uint16_t *src, size_t n);
void		kk_fill_random(cudaStream_t s, void *dst, int bf16, size_t n, uint64_t seed, float scale);

/* gemv.cu: y[n, rows] (ldy) = x[n, cols] (ldx) W^T for few rows n */
/* bf16 GEMVs in the block-rows design (1, the default) or one warp per row (0) */
void		kk_set_gemv_rows(int on);
/* their products of 1 or 2 input rows request every weight piece a thread holds (up to 4 a row) before
 * kk_dep_wait (1, the default) or only the first (0); the same bits either way.  It covers gemv_q.cu's
 * kk_gemv_q / kk_gemv_multi_q too at 2 input rows (up to 3 pieces a row: whole FP8 rows of 2304 and 4096
 * columns; at 1 as kk_set_q_early1 says: in every launch the early kernel's registers cost more than it saved) */
void		kk_set_rows_early(int on);
/* rows a block of the wide block-rows GEMV (128 threads; rows of 512+ pieces) for one input row in the early
 * form: 2 (the shape of the other row counts), 3 or 4 (KL_CUDA_ROWS_WIDE1; the same bits at any) */
void		kk_set_rows_wide1(int rb);
/* the most input rows an expert GEMV pass takes (1, 2, 4 or 8; default 4) */
void		kk_set_expert_nr(int nr);
/* P: the rows of one expert work item for a step of max_count tokens */
int			kk_expert_pass_rows(int max_count);
/*
 * 1 (the default): kk_expert_gemv's one-matrix mode in the block-rows design
 * (the down product) reads start and active and requests its first weights
 * before waiting for the kernel launched before it (KL_CUDA_EXPERT_PRELOAD);
 * returns the setting it replaces
 */
int			kk_set_expert_preload(int on);
/*
 * KL_CUDA_EXPERT_B1: the SwiGLU gate/up and the one-matrix (down) expert
 * products at one row a work item (P = 1: batch 1) in gemv.cu's tiled kernel,
 * gate_up / down tiles of rows a block: 1, 2 or 4 (4 the default for both:
 * about one wave at batch 1), 0 expert_rows_kernel as before; every piece a
 * thread takes of a tile requested at once, the next tile's while the last is
 * summed.  shared (kk_expert_gemv_shared's guess): 0 none, 1 the shared
 * expert's blocks request their first tile before the PDL wait, 2 (default)
 * and their later tiles into L2.  The same bits in every form.
 * kk_expert_b1(which): the setting of gate_up (0), down (1) or shared (2).
 */
void		kk_set_expert_b1(int gate_up, int down, int shared);
int			kk_expert_b1(int which);
void		kk_gemv(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int bf16,
					int rows, int cols);
/* up to KK_GEMV_JOBS products of the same n <= 8 rows in one launch */
#define KK_GEMV_JOBS 8
typedef struct kk_gemv_job
{
	float	   *y;
	const float *x;
	const void *W;
	int			ldy,
				ldx,
				rows,
				cols,
				bf16,
				vec,			/* set by the launcher */
				fmt,			/* KK_WF_*: read by the _q launchers (which ignore bf16) */
				group;			/* quantized: columns per scale */
	/*
	 * The dense FP8 kernel's bf16 rows of x (kk_gemv_multi_mma_q): NULL
	 * (memset) and the launcher converts x into b->xq and sets it; or
	 * preset by the caller to a bf16 twin of x: f32_to_bf16 of every
	 * value (unscaled), row-major with row stride cols (not ldx), at least
	 * n rows, unchanged until the product kernel has run (stream order);
	 * then that job needs no room and no conversion.  Other kernels ignore it.
	 */
	const uint16_t *x16;
} kk_gemv_job;
typedef struct kk_gemv_batch
{
	kk_gemv_job job[KK_GEMV_JOBS];
	int			first_block[KK_GEMV_JOBS + 1];	/* set by the launcher */
	int			count,
				n;
	/* kk_gemv_multi_mma_q only: room for the dense FP8 kernel's converted
	 * activations (kk_gemv_mma_q_room bytes; NULL: that kernel is not used) */
	uint16_t   *xq;
	size_t		xq_bytes;
	/* set by the launcher (kk_set_mma_q_l2): the dense FP8 kernels ask for a
	 * block's weight rows in L2 with one bulk prefetch when it starts */
	int			l2_rows;
} kk_gemv_batch;
void		kk_gemv_multi(cudaStream_t s, kk_gemv_batch *b);
/*
 * Expert products: for each work item listed in active (active[0] = how many,
 * then items e * 64 + c; at most max_active): expert e's pairs i in
 * [start[e] + c P, ...) up to P of them and start[e+1] (P =
 * kk_expert_pass_rows(max_count)):
 * y0[i] = W0[e] x[xrow[i]] and, when W1 is not NULL, y1[i] = W1[e] x[xrow[i]]
 * (xrow NULL: x row i).  W0, W1: device arrays of device pointers.
 * W1 given and y1 NULL: SwiGLU, y0[i] = silu(W0[e] x) * (W1[e] x).
 * max_count: the most rows any one expert can have (the step's token count).
 * With kk_set_expert_preload on, the one-matrix mode (W1 NULL) reads start
 * and active before the previous kernel has completed: the kernel that wrote
 * them must be at least two launches back in the stream (routing, gate/up,
 * down), never the one right before.
 */
void		kk_expert_gemv(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
						   const void *const *W0, const void *const *W1, int bf16, int rows, int cols,
						   const int *start, const int *active, int max_active, int max_count);
/*
 * kk_expert_gemv where the work list holds a fused shared expert: expert
 * shared_e (an index of W0 / W1) over shared_n rows, its items the list's
 * last (kk_moe_group's layout).  At one row an item the tiled kernel
 * (kk_set_expert_b1) takes those slots first and requests their weights
 * before the PDL wait, since they do not depend on the routing kernel; it
 * checks each slot's expert after the wait, so a wrong guess costs time, not
 * results.  shared_n 0: none (kk_expert_gemv).
 */
void		kk_expert_gemv_shared(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx,
								  const int *xrow, const void *const *W0, const void *const *W1, int bf16, int rows,
								  int cols, const int *start, const int *active, int max_active, int max_count,
								  int shared_e, int shared_n);

/*
 * expert_mma.cu: the same expert products on the tensor cores (bf16 weights;
 * the activations rounded to bf16), for work items of at most
 * KK_EXPERT_MMA_ROWS rows: P (the item size the grouping used) <= that.
 * Same arguments and modes as kk_expert_gemv, W0/W1 bf16 and 16-byte aligned
 * (the weight pool's 256-byte objects are).
 * kk_expert_mma_ok(cols): whether the kernel takes rows of cols (cols % 32
 * == 0 and the staged tokens fit in shared memory); else use kk_expert_gemv.
 */
#define KK_EXPERT_MMA_ROWS 8
int			kk_expert_mma_ok(int cols);
void		kk_expert_mma(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
						  const void *const *W0, const void *const *W1, int rows, int cols, const int *start,
						  const int *active, int max_active, int P);
/*
 * Plain products of n <= 8 rows on the tensor cores (bf16 weights, the
 * activations rounded to bf16: the bf16 precision mode's decode), as
 * kk_gemv / kk_gemv_multi (every job bf16).  kk_gemv_mma_ok(cols): cols % 32
 * == 0.
 */
int			kk_gemv_mma_ok(int cols);
void		kk_gemv_mma(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int rows,
						int cols);
void		kk_gemv_multi_mma(cudaStream_t s, kk_gemv_batch *b);
/*
 * Which kernel those take: slabs of 16-128 weight rows a block with the
 * activations staged once in shared memory (1, the default;
 * KL_CUDA_GEMV_MMA_SLAB) or a 16-row tile a block reading them per chunk (0,
 * the older gemv_mma_kernel; also where the staged rows would not fit).
 * kk_gemv_multi_mma_as: the same with the choice given (the test hook).
 */
void		kk_set_gemv_mma_slab(int on);
void		kk_gemv_multi_mma_as(cudaStream_t s, kk_gemv_batch *b, int slab);

/*
 * Quantized weights on the device (quant.h's forms, loaded as they are).
 * fmt: KK_WF_F32 / KK_WF_BF16 are the values the `bf16` flags above take;
 * KK_WF_FP8 (E4M3, one byte a weight), KK_WF_INT8 (signed byte), KK_WF_INT4
 * (quant.h's pack-quantized nibbles: a row is ceil(cols / 8) little-endian
 * 32-bit words, column c at bits 4 (c % 8) of word c / 8, holding q + 8).
 * A quantized matrix [rows, cols] is one device object:
 *     data    rows x kk_q_row_bytes(fmt, cols) bytes, row-major, then
 *     scales  at data + kk_q_scale_offset(rows, fmt, cols): fp32 [rows,
 *             ceil(cols / group)], the checkpoint's own values: weight (r, c)
 *             = value(q) * scales[r, c / group] (group == cols: one scale
 *             a row).
 * group is cols or a multiple of 16 (fp8, int8) or 32 (int4) (quant.h's
 * kl_q_validate).  FP8 scales satisfy |scale| < 256, so a kernel may fold a
 * power of two up to 2^120 into them (the E4M3 byte shifted into a bf16 or
 * f32 is the value times 2^-120, subnormals included; into an f16, times
 * 2^-8).  Kernels compute each group's dot product and multiply it by the
 * group's scale (or apply the scale to the weights); the results match
 * quant.h's reference (fl(q * scale) weights, fp32 dot products) to fp32
 * rounding, not bit for bit.  Matrices for the vector paths are 16-byte
 * aligned (the pool's objects are 256-byte aligned) and every row starts
 * 16-byte aligned where cols % 16 == 0 (fp8, int8) or cols % 32 == 0 (int4);
 * other shapes must still give right answers (a scalar path).
 */
/* the layout helpers below serve host and device code alike */
#ifdef __CUDACC__
#define KK_HD __host__ __device__
#else
#define KK_HD
#endif
enum
{
	KK_WF_F32 = 0,
	KK_WF_BF16 = 1,
	KK_WF_FP8 = 2,
	KK_WF_INT8 = 3,
	KK_WF_INT4 = 4
};
KK_HD static inline size_t
kk_q_row_bytes(int fmt, int cols)
{
	return fmt == KK_WF_INT4 ? (size_t) (cols + 7) / 8 * 4 : fmt == KK_WF_F32 ? (size_t) cols * 4
		: fmt == KK_WF_BF16 ? (size_t) cols * 2 : (size_t) cols;
}
KK_HD static inline size_t
kk_q_scale_offset(int rows, int fmt, int cols)
{
	return ((size_t) rows * kk_q_row_bytes(fmt, cols) + 255) & ~(size_t) 255;
}
KK_HD static inline int
kk_q_groups(int cols, int group)
{
	return (cols + group - 1) / group;
}
/* bytes of the whole object */
KK_HD static inline size_t
kk_q_bytes(int rows, int fmt, int cols, int group)
{
	return kk_q_scale_offset(rows, fmt, cols) + sizeof(float) * (size_t) rows * kk_q_groups(cols, group);
}

/*
 * gemv_q.cu: the CUDA-core products (fp32 activations, fp32 arithmetic) of
 * quantized weights, for both precision modes' decode and for fp32 mode:
 * kk_gemv_q: y[n, rows] (ldy) = x[n, cols] (ldx) W^T, any n (passes of 8);
 * kk_gemv_multi_q: as kk_gemv_multi (n <= 8, up to KK_GEMV_JOBS jobs) where
 * each job has its own fmt and group (kk_gemv_job; jobs may mix quantized,
 * bf16 and fp32 matrices);
 * kk_expert_gemv_q: as kk_expert_gemv (same modes, work list, P rows an item
 * = kk_expert_pass_rows(max_count)), every expert matrix of W0 (and W1) in
 * format fmt with columns per scale group.
 * kk_gemv_q_force_shape(shape) (the backend's KL_CUDA_Q_SHAPE, default 3;
 * gemv_sweep): the block shape of every launch, 0 / 1 / 2 = 32 / 64 / 128
 * threads, 3 the shape of the rows of a batch's job with the most weight
 * bytes, -1 (the library's own default) the shape of its widest rows: a
 * step's KDA batch has small bf16 jobs of wide rows beside its FP8 q / k / v,
 * which then ran in 128-thread blocks, 47 % of the copy rate alone against
 * 59-78 % in 64 / 32 (H200, FP8 batch 1 2.42 -> 2.34 ms a step with 3).
 */
void		kk_gemv_q_force_shape(int shape);
/* KL_CUDA_Q_EARLY1: their products of one input row in the early form too (kk_set_rows_early's, which must be
 * on): 0 (default) never, 1 in launches of at most one wave of the early kernel, 2 in every launch of the 64-
 * and 128-thread shapes; the same bits in every form.  Call it on the device the products will run on (it asks
 * the occupancy calculator there), before any capture */
void		kk_set_q_early1(int mode);
void		kk_gemv_q(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int fmt,
					  int group, int rows, int cols);
void		kk_gemv_multi_q(cudaStream_t s, kk_gemv_batch *b);
void		kk_expert_gemv_q(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx,
							 const int *xrow, const void *const *W0, const void *const *W1, int fmt, int group,
							 int rows, int cols, const int *start, const int *active, int max_active,
							 int max_count);

/*
 * mma_q.cu: the same on the tensor cores for the bf16 precision mode (the
 * activations rounded to bf16, the weights' values exact in bf16, fp32
 * accumulation; fmt KK_WF_FP8 or KK_WF_INT4, also KK_WF_INT8 where the
 * kernel says so).  kk_mma_q_ok(fmt, group, cols): whether these kernels
 * take the shape, else the caller uses gemv_q.cu's.
 * kk_gemv_mma_q: y = x W^T for n <= KK_GEMV_MMA_Q_ROWS rows, each weight read
 * once for all n rows (the dense products of decode steps up to 64 tokens);
 * kk_gemv_multi_mma_q: up to KK_GEMV_JOBS such products of the same n rows
 * (every job quantized, fmt and group per job);
 * kk_expert_mma_q: as kk_expert_mma (items of at most KK_EXPERT_MMA_ROWS).
 * kk_set_mma_q_direct(on) (default 1; the backend's KL_CUDA_Q_DIRECT): FP8
 * products with one scale a row, cols % 64 == 0 and n <= 8 in the direct
 * kernel (a 16-row tile a block, activations read per chunk), else all in
 * the staging one.
 * kk_set_mma_q_dense(mt, max_rows) (default 0: off; the backend's
 * KL_CUDA_Q_DENSE, default 2, and KL_CUDA_Q_DENSE_ROWS): FP8 products with one scale a
 * row, cols % 64 == 0 and n <= max_rows (0: KK_GEMV_MMA_Q_ROWS) in the
 * dense kernel, up to mt (1 or 2) 16-row tiles a block, ahead of the direct
 * and staging ones (mt 3: the slab kernel, 64-row slabs copied (cp.async) into
 * shared memory, k split over a cluster; compute capability 9 only, where
 * the shapes fit it, else as 2; its sums differ from 2's in order): a conversion launch writes the batch's activations once
 * as bf16 (n rows, unscaled; the kernels multiply by 2^64 as they load) into b->xq, which the caller provides
 * (kk_gemv_mma_q_room(b) bytes, 0 when no job takes the dense kernel or
 * every such job's x16 is preset (a twin: kk_gemv_job.x16; no conversion
 * launch then); without the room those jobs take the other kernels, as
 * kk_gemv_mma_q's always do).  At n <= 8 its results equal the direct
 * kernel's bit for bit (but for fp32-subnormal activations: mma_q.cu, mx_x64).
 * kk_gemv_multi_mma_q_as / kk_gemv_mma_q_room_as: the same with the
 * settings given (direct, dense; dense at any n), for the test hook.
 */
#define KK_GEMV_MMA_Q_ROWS 64
void		kk_set_mma_q_direct(int on);
void		kk_set_mma_q_dense(int mt, int max_rows);
/*
 * kk_set_mma_q_tok(on) (default 0; the backend's KL_CUDA_Q_TOK, default 1):
 * the dense kernel's jobs of 9-64 tokens (dense 1 or 2) in its tokens-as-M
 * form (gemv_mma_q_tok_kernel: the activations as the mma's A operand, 8
 * weight rows an n-tile, each activation fragment feeding 1-8 of them),
 * where the batch has rows enough for every SM (mma_q.cu, mt_tok_r);
 * returns the setting it replaces
 */
int			kk_set_mma_q_tok(int on);
/*
 * kk_set_mma_q_l2(on) (default 0; the backend's KL_CUDA_Q_L2, default 1):
 * bit 1 (on & 1; the other bits are ignored), in batches of 9-64 rows each
 * block of the dense FP8 kernel's tokens-as-M form (or of the dense kernel
 * where that form does not run) first asks for all of its weight rows (a
 * contiguous run of the row-major FP8 matrix) in L2 with one
 * cp.async.bulk.prefetch.L2 (compute capability 9; a hint: the results are
 * the same bits), so that a block's DRAM reads are in flight at once
 * rather than as its warps' registers free up.  Returns the setting it
 * replaces.
 */
int			kk_set_mma_q_l2(int on);
/*
 * kk_set_mma_q_dense_occ(occ) (default 2; the backend's KL_CUDA_Q_DENSE_OCC, default 3):
 * blocks an SM of the dense FP8 kernel at 2-8 tokens (one n-block): 2, or
 * 3 with half the weight chunks a register set (the same sums in the same
 * order: the same bits).  Returns the setting it replaces.
 */
int			kk_set_mma_q_dense_occ(int occ);
size_t		kk_gemv_mma_q_room(const kk_gemv_batch *b);
size_t		kk_gemv_mma_q_room_as(const kk_gemv_batch *b, int dense);
void		kk_gemv_multi_mma_q_as(cudaStream_t s, kk_gemv_batch *b, int direct, int dense);
int			kk_mma_q_ok(int fmt, int group, int cols);
void		kk_gemv_mma_q(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int fmt,
						  int group, int rows, int cols);
void		kk_gemv_multi_mma_q(cudaStream_t s, kk_gemv_batch *b);
void		kk_expert_mma_q(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
							const void *const *W0, const void *const *W1, int fmt, int group, int rows, int cols,
							const int *start, const int *active, int max_active, int P);

/*
 * quant.cu: whole-matrix conversions (prefill: the products of many rows go
 * through cuBLAS on converted panels of weight rows) and random quantized
 * weights (benchmarks).
 * kk_q_dequant: rows [r0, r0 + nr) of the quantized W into dst (ld = cols),
 * as fp32 (out_bf16 0: fl(value(q) * scale), quant.h's reference values) or
 * bf16 (1: those values rounded to nearest even).
 * kk_q_dequant_many_bf16: count matrices of one form and shape [rows, cols]
 * at once, Ws[i] (device form) into dsts[i] as bf16 (kk_q_dequant's bf16
 * values); both pointer arrays in device memory.  Needs the form
 * kk_q_dequant_many_ok takes (a quantized fmt, cols and group multiples of
 * 16) and 16-byte aligned matrices: -1 (nothing launched) otherwise, 0
 * launched.
 * kk_q_fill_random: a random quantized matrix for fmt/group (values with
 * standard deviation about `scale`, like kk_fill_random's; deterministic in
 * seed), data and scales.
 */
void		kk_q_dequant(cudaStream_t s, void *dst, int out_bf16, const void *W, int fmt, int group, int rows,
						 int cols, int r0, int nr);
int			kk_q_dequant_many_ok(int fmt, int group, int cols);
int			kk_q_dequant_many_bf16(cudaStream_t s, void *const *dsts, const void *const *Ws, int count, int fmt,
								   int group, int rows, int cols);
void		kk_q_fill_random(cudaStream_t s, void *W, int fmt, int group, int rows, int cols, uint64_t seed,
							 float scale);

/* kda.cu (step metadata: row_seq [n_tokens], row0 [n_seqs + 1]; conv_tab and
 * S_tab: per sequence, that sequence's conv tails / state of this layer) */
void		kk_kda_prep(cudaStream_t s, int n_tokens, int H, int K, int W, const float *q, const float *k,
						const float *v, float *f, const float *b, float *qo, float *ko, float *vo, float *beta,
						const float *conv_q, const float *conv_k, const float *conv_v, const float *A_log,
						const float *dt_bias, const int *row_seq, const int *row0, float *const *conv_tab,
						int write_tails, int fast);	/* write_tails: every sequence has one row; no
													 * kk_kda_tails.  fast: the caller's outputs
													 * are rounded to bf16 next (KK_KDA_EW_FAST) */
void		kk_kda_tails(cudaStream_t s, int n_seqs, int HK, int W, const float *q, const float *k, const float *v,
						 const int *row0, float *const *conv_tab);
/*
 * Prefill prep by kda_prep_rows_kernel only (no tails shifted), with the raw
 * q, k, v, f in bf16 (in16: [n_tokens, H K] bf16 as uint16_t, 8-byte aligned
 * rows; else fp32, 16-byte) and the prepared q, k, v in bf16 (out16, rounded
 * to nearest even; else fp32); the decay g always fp32 into g (may be f when
 * f is fp32: in place), beta fp32.  The element math is kk_kda_prep's rows
 * kernel's, so a bf16 input gives the outputs of its widened values bit for
 * bit, and out16's q, k, v are the fp32 outputs rounded.  Returns 0
 * launched, -1 not covered (K 32 / 64 / 128, conv width 2 .. 4, alignment,
 * KK_KDA_EW_PREP_ROWS clear, too many rows): nothing launched.
 * kk_kda_tails16: kk_kda_tails reading bf16 raw inputs (the tails hold the
 * widened values, those the conv read).
 */
int			kk_kda_prep_rows16(cudaStream_t s, int n_tokens, int H, int K, int W, int in16, const void *q,
							   const void *k, const void *v, const void *f, float *g, const float *b, int out16,
							   void *qo, void *ko, void *vo, float *beta, const float *conv_q, const float *conv_k,
							   const float *conv_v, const float *A_log, const float *dt_bias, const int *row_seq,
							   const int *row0, float *const *conv_tab, int fast);
void		kk_kda_tails16(cudaStream_t s, int n_seqs, int HK, int W, const uint16_t *q, const uint16_t *k,
						   const uint16_t *v, const int *row0, float *const *conv_tab);
/* Which kernels kk_kda_prep and kk_kda_gated_norm run (KL_CUDA_KDA_ELEM_WARP,
 * a mask of these bits; 0: a block per (row, head) for both, the old path).
 * All give the same outputs bit for bit but FAST (within ~4e-6 relative:
 * common.cuh's siluf_fast), which only applies where kk_kda_prep's caller
 * says fast (precision bf16).  K = 32, 64, 128 and 16-byte aligned rows
 * only; elsewhere the block kernels.  (Bit 1, the prep as a warp per
 * (row, head), was removed: slower than both; it is ignored.) */
#define KK_KDA_EW_NORM_WARP 2	/* gated norm: a warp per (row, head) */
#define KK_KDA_EW_PREP_ROWS 4	/* prefill prep (no tails to shift; conv 2..4): a warp walks 16 rows */
#define KK_KDA_EW_FAST 8			/* with PREP_ROWS and kk_kda_prep's fast: siluf_fast, softplusf_fast */
#define KK_KDA_EW_DEFAULT (KK_KDA_EW_NORM_WARP | KK_KDA_EW_PREP_ROWS | KK_KDA_EW_FAST)
/* sets the mask; returns the one it replaces */
int			kk_set_kda_elem_warp(int mode);
/*
 * Which form of prefill's rows prep (KK_KDA_EW_PREP_ROWS: kda.cu's
 * kda_prep_rows_kernel) runs (KL_CUDA_KDA_PREP_FORM): 0 the kernel as it
 * was; 1 and up the variants kda.cu's KDA_PF_* comment lists (how many rows
 * a warp has in flight, its occupancy, fewer instructions in the FAST
 * math).  Every form gives form 0's outputs bit for bit except where that
 * comment says otherwise, and then only in the FAST form (precision bf16),
 * within a bound it documents.  Out of range: 0.  Returns the one it
 * replaces.
 */
int			kk_set_kda_prep_form(int form);
/* sequences with more than max_rows rows are left to kk_kda_chunked */
/* round16: store the state rounded to bf16 (measuring a bf16 state; KL_CUDA_KDA_STATE_ROUND=bf16) */
int			kk_kda_recurrent(cudaStream_t s, int n_seqs, int H, int K, const float *q, const float *k,
							 const float *v, const float *g, const float *beta, float *o, const int *row0,
							 float *const *S_tab, int max_rows, int round16);
size_t		kk_kda_chunk_scratch(int n, int H, int K);
int			kk_kda_chunked(cudaStream_t s, int n, int H, int K, const float *q, const float *k, const float *v,
						   const float *g, const float *beta, float *S, float *o, float *scratch);
/*
 * kda_chunk_mma.cu: the same chunkwise form as kk_kda_chunked (same inputs,
 * same state S [H][K][V] fp32, updated in place, same o) with its products
 * on tensor cores in bf16 operands and fp32 accumulators, for precision
 * bf16.  Scratch: kk_kda_chunk_mma_scratch(n, H, K) bytes (16-byte aligned).
 * The state stays fp32 (registers inside the kernel; S in and out of
 * memory once per call); the decays stay fp32 until folded into operands.
 * Needs sm_80 (mma.sync, cp.async).  Returns 0, -1 for an unsupported head
 * size (32, 64, 128 only), -2 when the GPU's shared memory is too small,
 * or a CUDA error code; on a nonzero return nothing was launched that
 * changes S or o.  kk_kda_chunk_prep_bf16 (kda_chunk_prep_mma.cu) is its
 * parallel half.
 */
size_t		kk_kda_chunk_mma_scratch(int n, int H, int K);
int			kk_kda_chunked_mma(cudaStream_t s, int n, int H, int K, const float *q, const float *k, const float *v,
							   const float *g, const float *beta, float *S, float *o, void *scratch);
/* kk_kda_chunked_mma with q, k, v in bf16 ([n, H K] row-major; g, beta
 * fp32), K = 128 only (-1 otherwise): its parallel half is
 * kk_kda_chunk_prep_bf16_in16; outputs those of kk_kda_chunked_mma with
 * KL_CUDA_KDA_PREP_MMA=6 (or 3) on fp32 q, k, v holding the same values,
 * bit for bit */
int			kk_kda_chunked_mma16(cudaStream_t s, int n, int H, int K, const uint16_t *q, const uint16_t *k,
								 const uint16_t *v, const float *g, const float *beta, float *S, float *o,
								 void *scratch);
/* kk_kda_chunked_mma's sequential part (KL_CUDA_KDA_MMA): 1 the 4-warp
 * kernel (a block per head and 32 columns of V), 2 (default) the wide one,
 * 16 warps a block (8 at K = 32), 3 the wide one with 64 columns a block,
 * 4 with 8 warps (K = 32: 3 and 4 as 2); the same numbers bit for bit */
void		kk_set_kda_mma_form(int form);
/* kk_kda_chunk_prep_bf16 on tensor cores in blocks of 256 threads in 63.5 KB
 * of shared memory (3; K = 128, else as 1), of 256 in 95.5 KB (2;
 * K = 128, else as 1) or of 128 (1), or as the fp32 prep kernel with bf16
 * stores (0); the same outputs within bf16 rounding; 4: as 3, and
 * kk_kda_chunked_mma_fused in prefill (below); 6 (default): 3's outputs bit for bit
 * from two kernels of independent blocks (a sub-chunk's operands, pairs and
 * diagonal inverse; then the solve and the W / U0 products; K = 128, else
 * as 1) */
void		kk_set_kda_prep_mma(int on);
int			kk_kda_chunk_prep_bf16(cudaStream_t s, int n, int H, int K, const float *q, const float *k,
								   const float *v, const float *g, const float *beta, uint16_t *W16, uint16_t *U16,
								   uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl);
/* kk_kda_chunk_prep_bf16 of q, k, v in bf16 (g, beta fp32) by =6's kernels
 * whatever kk_set_kda_prep_mma says; K = 128 only (-1 otherwise); the
 * outputs of kk_kda_chunk_prep_bf16 (=6 or 3) on fp32 q, k, v holding the
 * same values, bit for bit */
int			kk_kda_chunk_prep_bf16_in16(cudaStream_t s, int n, int H, int K, const uint16_t *q, const uint16_t *k,
										const uint16_t *v, const float *g, const float *beta, uint16_t *W16,
										uint16_t *U16, uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl);
/* =6's kernels (both input types): 1 their wide forms -- the sub-chunk
 * kernel reads its q, k rows as 16-byte pieces into shared memory and folds
 * g once a channel, the solve pads its shared arrays against bank conflicts
 * and stores W / U0 16 bytes a lane --, 2 (default) those with the
 * right-hand side Kb^T formed by the sub-chunk kernel (left in the tile's
 * U16 room; the solve then reads no g or k), or 0 the forms before; the
 * same outputs bit for bit (q or k not 16-byte aligned: the forms before). */
void		kk_set_kda_kp6_wide(int on);
/* KL_CUDA_KDA_KP6_INTRA: 1 = the sub-chunk kernel's pairs of rows 8 .. 15
 * with columns 0 .. 7 of each 16-row sub-chunk on tensor cores (mma with
 * fp16 operands through the reference point row 7: P's and A's entries
 * there within ~2^-10 of their terms' magnitudes, the rest bit for bit;
 * wide forms only; the default), 0 = all on CUDA cores as before.
 * Returns the value it replaces. */
int			kk_set_kda_kp6_intra(int on);
/*
 * KL_CUDA_KDA_PREP_MMA=4 (K = 128, conv width 1 .. 4: kk_kda_prep_fused_ok):
 * kk_kda_chunked_mma of one sequence computed from the op's raw inputs, the
 * elementwise prep (kk_kda_prep's conv + silu, L2 norms, decay, beta) fused
 * into the 63.5 KB prep kernel: q, k, v, f, b the projections at the
 * sequence's row 0 (f is not changed), *tailp its conv tails before the step
 * (read, not updated: kk_kda_tails must run after), S, o, scratch as
 * kk_kda_chunked_mma.  kda_prep's q, k, v, g, beta are computed in the same
 * order (so the outputs are those of kk_kda_prep + kk_kda_chunked_mma with
 * 3, bit for bit as far as the compiler contracts alike).  Returns 0, -1
 * when not accepted (nothing launched), or a CUDA error code.
 */
int			kk_kda_prep_fused_ok(int K, int W);
int			kk_kda_chunk_prep_bf16_fused(cudaStream_t s, int n, int H, int K, int W, const float *q, const float *k,
										 const float *v, const float *f, const float *b, const float *conv_q,
										 const float *conv_k, const float *conv_v, const float *A_log,
										 const float *dt_bias, float *const *tailp, uint16_t *W16, uint16_t *U16,
										 uint16_t *Q16, uint16_t *Kt16, uint16_t *P16, float *gl);
int			kk_kda_chunked_mma_fused(cudaStream_t s, int n, int H, int K, int W, const float *q, const float *k,
									 const float *v, const float *f, const float *b, const float *conv_q,
									 const float *conv_k, const float *conv_v, const float *A_log,
									 const float *dt_bias, float *const *tailp, float *S, float *o, void *scratch);
void		kk_kda_gated_norm(cudaStream_t s, int n_tokens, int H, int V, const float *o, const float *gate,
							  const float *w, float eps, float *out);
/*
 * A decode step (every sequence exactly one row, row0[s] its row) in one
 * kernel: prep, recurrence and gated norm, outputs bit for bit those of
 * kk_kda_prep (write_tails) + kk_kda_recurrent + kk_kda_gated_norm; f is
 * only read (the three kernels leave g in it).  Needs thread-block clusters
 * (kk_kda_decode_supported: K 32, 64 or 128 on Hopper and later).  Returns
 * 0, -1 for a head size it does not cover, or the launch's CUDA error.
 * early (KL_CUDA_KDA_DEC_EARLY; conv width 4, else ignored): the kernel that reads
 * the state, the conv tails, row0, S_tab and conv_tab before waiting for
 * the kernel launched before it, so none of them may be written by that
 * kernel (the step's metadata, and the state and tails by this layer's KDA
 * kernels of earlier steps, are at least two launches back); same outputs
 * bit for bit.
 */
int			kk_kda_decode_supported(int K);
int			kk_kda_decode(cudaStream_t s, int n_seqs, int H, int K, int W, const float *q, const float *k,
						  const float *v, const float *f, const float *b, const float *gate, const float *conv_q,
						  const float *conv_k, const float *conv_v, const float *A_log, const float *dt_bias,
						  const float *o_norm, float eps, const int *row0, float *const *S_tab,
						  float *const *conv_tab, int round16, float *out, int early);
/* kk_kda_decode that also writes out16 [n rows, H K] = f32_to_bf16 of out
 * (the bf16 twin o_proj reads: KL_CUDA_Q_TWIN; NULL: none, as kk_kda_decode) */
int			kk_kda_decode_twin(cudaStream_t s, int n_seqs, int H, int K, int W, const float *q, const float *k,
							   const float *v, const float *f, const float *b, const float *gate,
							   const float *conv_q, const float *conv_k, const float *conv_v, const float *A_log,
							   const float *dt_bias, const float *o_norm, float eps, const int *row0,
							   float *const *S_tab, float *const *conv_tab, int round16, float *out,
							   uint16_t *out16, int early);

/* mla.cu (pages: for each sequence, page_cap page pointers of this layer;
 * c16: the cache rows are bf16, else fp32) */
void		kk_mla_append(cudaStream_t s, int n_tokens, int Wa, const float *kv, const int *row_seq,
						  const int *row0, const int64_t *pos0, float *const *pages, int page_cap, int c16);
void		kk_mla_gather(cudaStream_t s, float *dst, int64_t m, int Wa, float *const *pages, int c16);
void		kk_mla_absorb_q(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R, const float *q,
							const void *kv_b, int bf16, float *qabs, const int *row_seq, const int *absorbed);
/*
 * The same two products for decode steps (KL_CUDA_MLA_SMALL): 1 ..
 * KK_MLA_STREAM_MAX_TOKENS tokens, weights streamed in 16-byte loads (kv_b
 * 16-byte aligned, R a multiple of 8; absorb: Dn <= 128; out: R <= 512 and
 * olat 16-byte aligned).  Same results as kk_mla_absorb_q / kk_mla_out up to
 * the order of the fp32 sums; -1 (nothing launched) when the shape is not
 * covered, else 0.
 */
#define KK_MLA_STREAM_MAX_TOKENS 64
int			kk_mla_absorb_q_stream(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R,
								   const float *q, const void *kv_b, int bf16, float *qabs, const int *row_seq,
								   const int *absorbed);
/*
 * kk_mla_absorb_q_stream that also appends the step's new latent rows to the
 * cache (kk_mla_append's work and arguments, its bytes bit for bit: one
 * launch fewer a layer; KL_CUDA_MLA_FOLD).  Every token's row is appended,
 * absorbed or not; the cache rows are R + Dr wide.  qabs16 (not NULL):
 * Qabs written there as bf16 (cvt.rn, as kk_mla_decode_wg rounds it),
 * instead of qabs, for kk_mla_decode_args' qabs16.  -1 (nothing launched)
 * where kk_mla_absorb_q_stream would not take the shape, else 0.
 */
int			kk_mla_absorb_q_append(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dr, int Dv, int R,
								   const float *q, const void *kv_b, int bf16, float *qabs, uint16_t *qabs16,
								   const int *row_seq, const int *absorbed, const float *kv, const int *row0,
								   const int64_t *pos0, float *const *pages, int page_cap, int c16);
int			kk_mla_out_stream(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat,
							  const void *kv_b, int bf16, float *out, const int *row_seq, const int *absorbed);
/* kk_mla_out_stream that also writes out16 = f32_to_bf16 of every out value
 * it writes (the rows of absorbed tokens: o_proj's bf16 twin when every
 * token is absorbed; KL_CUDA_Q_TWIN) */
int			kk_mla_out_stream_twin(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat,
								   const void *kv_b, int bf16, float *out, const int *row_seq,
								   const int *absorbed, uint16_t *out16);
int			kk_mla_attend_supported(int Ha, int R, int Dr);
int			kk_mla_attend(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R, int Dr,
						  const float *qabs, float scale, const int *row_seq, const int *row0, const int64_t *pos0,
						  const int *absorbed, float *const *pages, int page_cap, float *part_acc, float *part_ml,
						  int c16);
/* the bf16 cache on tensor cores (Qabs and P rounded to bf16; same partials
 * as kk_mla_attend; split_keys a multiple of 64, the kernel's key tile) */
int			kk_mla_attend_mma_supported(int Ha, int R, int Dr);
int			kk_mla_attend_mma(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R, int Dr,
							  const float *qabs, float scale, const int *row_seq, const int *row0,
							  const int64_t *pos0, const int *absorbed, float *const *pages, int page_cap,
							  float *part_acc, float *part_ml);
/*
 * MLA decode attention variants over the bf16 cache (KL_CUDA_MLA_MMA=N; 1 is
 * kk_mla_attend_mma above).  Contract of every variant: the olat of
 * mla_attend_mma + mla_merge for the same inputs (Qabs rounded to bf16 once,
 * P rounded to bf16 before P V with the running sum made of the rounded
 * values, all else fp32), as partials in kk_mla_attend_mma's layout
 * (part_acc [(t max_splits + p) Ha + h][R], part_ml [..][2]) that the caller
 * merges into olat [t][Ha][R] (kk_mla_merge or kk_mla_merge_wide).
 * split_keys: a multiple of the 64-key tile (the backend's mma_split: from
 * the page-table capacity and the token count only, so that a recorded CUDA
 * graph stays valid as positions grow).  Returns 0, -1 where the
 * variant does not take the shape on this device, or a CUDA error code.
 */
typedef struct kk_mla_decode_args
{
	int			n_tokens,
				Ha,
				R,
				Dr;
	float		scale;
	const float *qabs;			/* [n_tokens][Ha][R + Dr] fp32 */
	const int  *row_seq,
			   *row0,
			   *absorbed;
	const int64_t *pos0;
	float	   *const *pages;	/* [seq * page_cap + page] rows of R + Dr bf16 */
	int			page_cap,
				max_splits;
	int64_t		split_keys;
	float	   *part_acc,
			   *part_ml,
			   *olat;
	/*
	 * kk_mla_decode_wg only (KL_CUDA_MLA_FOLD): nonzero: the block reads the
	 * step metadata and its first two key tiles' rows of earlier steps
	 * (keys below pos0 of the sequence) before kk_dep_wait, the step's new
	 * rows and Qabs after it.  The caller guarantees that no kernel of
	 * this step before the attention writes those older rows (only the
	 * step's append writes the cache) and that the metadata and page table
	 * were uploaded before the step's first kernel.
	 */
	int			early;
	/* kk_mla_decode_wg only: not NULL: Qabs already rounded to bf16 (cvt.rn
	 * of qabs, the same layout; kk_mla_absorb_q_append's qabs16), read
	 * instead of qabs: half the bytes, the same numbers (KL_CUDA_MLA_FOLD) */
	const uint16_t *qabs16;
	/*
	 * kk_mla_decode_wg only (KL_CUDA_MLA_WG_DUAL): nonzero: each of a
	 * block's two warpgroups streams a key range of its own (ranges 2 b and
	 * 2 b + 1 of block b, one tile buffer each): the grid holds
	 * ceil(max_splits / 2) blocks a token; split_keys and max_splits are
	 * still the ranges' (the merge's).  The partials equal the one-range
	 * kernel's for the same split_keys bit for bit.
	 */
	int			wg_dual;
	/* kk_mla_decode_wg only (KL_CUDA_MLA_WG_PF): each range requests its tiles into L2 this many tiles ahead of
	 * their copies to shared memory (0: none; a hint: the same results) */
	int			wg_pf;
} kk_mla_decode_args;

/* mla_decode_wg.cu: on Hopper's wgmma, sm_90a image only (KL_CUDA_MLA_MMA=2, the default where it runs) */
int			kk_mla_decode_wg_supported(int Ha, int R, int Dr);
int			kk_mla_decode_wg(cudaStream_t s, const kk_mla_decode_args *a);

void		kk_mla_merge(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R,
						 const float *part_acc, const float *part_ml, const int *row_seq, const int *row0,
						 const int64_t *pos0, const int *absorbed, float *olat);
/* kk_mla_merge's result from (token, head, 64-column slice) blocks, the ranges
 * split over 8 warps: for steps of few tokens (R even) */
void		kk_mla_merge_wide(cudaStream_t s, int n_tokens, int max_splits, int split_keys, int Ha, int R,
							  const float *part_acc, const float *part_ml, const int *row_seq, const int *row0,
							  const int64_t *pos0, const int *absorbed, float *olat);
void		kk_mla_out(cudaStream_t s, int n_tokens, int Ha, int Dn, int Dv, int R, const float *olat,
					   const void *kv_b, int bf16, float *out, const int *row_seq, const int *absorbed);
void		kk_mla_softmax(cudaStream_t s, float *S, uint16_t *P16, int Ha, int nq, int kb, int64_t first_pos);

/*
 * mla_flash.cu: MLA prefill attention of one sequence's step in one kernel
 * (KL_CUDA_MLA_FLASH), bf16 operands on tensor cores, fp32 softmax and
 * accumulation, no score matrix in memory.
 *   q16   [nr, Ha (Dn + Dr)] bf16: per head Dn nope then Dr rope numbers
 *   kv16  [m, Ha (Dn + Dv)] bf16: per head Dn nope-key then Dv value columns
 *   lat16 [m, R + Dr] bf16: columns R .. R + Dr - 1 the rope key of all heads
 *   out   [nr, Ha Dv] fp32 (written, rows of the step only)
 * m = pos0 + nr keys; query i is at position pos0 + i and sees keys
 * 0 .. pos0 + i; out = softmax(scale (q_nope k_nope + q_pe k_pe)) v with the
 * probabilities rounded to bf16 before the product (their sum from the
 * rounded values).  All pointers 16-byte aligned.  Head shapes covered
 * (kk_mla_flash_supported): (Dn, Dr, Dv) = (128, 64, 128), the 48B model's,
 * and (32, 16, 32), the golden tiny models'; R a multiple of 8.  Returns 0,
 * -1 (nothing launched) for a shape or alignment not covered, or the CUDA
 * error of the launch's setup.
 */
int			kk_mla_flash_supported(int Ha, int Dn, int Dr, int Dv, int R);
int			kk_mla_flash(cudaStream_t s, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R,
						 const uint16_t *q16, const uint16_t *kv16, const uint16_t *lat16, float scale, float *out);

/*
 * mla_flash_wgmma.cu: kk_mla_flash's contract and numbers on Hopper's wgmma
 * (KL_CUDA_MLA_FLASH=2 or 3): blocks of `groups` (2 or 3) warpgroups of 64
 * query rows.  Covers only (Dn, Dr, Dv) = (128, 64, 128), R a multiple of 8,
 * and only where the current device runs this library's sm_90a image
 * (kk_mla_flash_wgmma_supported probes that once per device; 0 elsewhere,
 * so callers fall back to kk_mla_flash).  Returns as kk_mla_flash.
 */
int			kk_mla_flash_wgmma_supported(int groups, int Ha, int Dn, int Dr, int Dv, int R);
int			kk_mla_flash_wgmma(cudaStream_t s, int groups, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R,
							   const uint16_t *q16, const uint16_t *kv16, const uint16_t *lat16, float scale,
							   float *out);

/* moe.cu */
/* k <= 64 experts per token; shared memory (2E + G) floats + (E + G) ints */
void		kk_moe_route(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
						 int bias_in_w, float scaling, const float *logits, const float *bias, int *sel, float *wts);
/* shared_rows > 0: the shared expert becomes expert E (start[E+2], rows nk..nk+shared_rows);
 * active: the work list of kk_expert_gemv, items of at most P rows */
void		kk_moe_group(cudaStream_t s, int nk, int E, int k, int shared_rows, int P, const int *sel, int *start,
						 int *xrow, int *inv, int *active);
void		kk_moe_combine(cudaStream_t s, float *y, int n, int D, int k, const float *wts, const int *inv,
						   const float *ye, const float *ys);
/* kk_moe_route then kk_moe_group in one launch (decode sizes): -1 when the
 * shape is not covered (k > 32, E > 1024, n k > 4096), else 0 or a CUDA error */
int			kk_moe_route_group(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
							   int bias_in_w, float scaling, const float *logits, const float *bias, int *sel,
							   float *wts, int shared_rows, int P, int *start, int *xrow, int *inv, int *active);
/* kk_moe_route_group's outputs, bit for bit (router logits without NaN), in
 * warps without block-wide scans: -1 when the shape is not covered (E > 256,
 * k > 32, k > E, n k too large for 48 KB of shared memory), else 0 */
int			kk_moe_route_group_warp(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
									int bias_in_w, float scaling, const float *logits, const float *bias, int *sel,
									float *wts, int shared_rows, int P, int *start, int *xrow, int *inv,
									int *active);
/* kk_moe_route_group_warp's outputs, bit for bit (NaN and infinite logits
 * too), with a thread per expert choosing by rank instead of k dependent
 * warp picks: -1 when the shape is not covered (n > 8, E > 256, k > 32,
 * k > E, group-limited routing: G > 1 and Tg < G), else 0 */
int			kk_moe_route_group_rank(cudaStream_t s, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
									int bias_in_w, float scaling, const float *logits, const float *bias, int *sel,
									float *wts, int shared_rows, int P, int *start, int *xrow, int *inv,
									int *active);
/* kk_moe_route_group_rank at one token with the grouping read from ballots, no block scan (1, the default) or
 * by counts as at other n (0); the same outputs (KL_CUDA_ROUTE_RANK1).  Returns the setting it replaces */
int			kk_set_route_rank1(int on);
/* kk_moe_combine with bf16 expert outputs (ye16 rows of D at the slots' inv positions) */
void		kk_moe_combine16(cudaStream_t s, float *y, int n, int D, int k, const float *wts, const int *inv,
							 const uint16_t *ye16, const float *ys);
/* kk_moe_combine into y, then x += y and xn = rmsnorm(x; w) (kk_add_rmsnorm), without y in memory */
void		kk_moe_combine_add_rmsnorm(cudaStream_t s, float *xn, float *x, int n, int D, int k, const float *wts,
									   const int *inv, const float *ye, const float *ys, const float *w, float eps);
/* kk_moe_combine_add_rmsnorm with bf16 expert outputs */
void		kk_moe_combine16_add_rmsnorm(cudaStream_t s, float *xn, float *x, int n, int D, int k, const float *wts,
										 const int *inv, const uint16_t *ye16, const float *ys, const float *w,
										 float eps);
void		kk_gather_rows(cudaStream_t s, float *dst, const float *src, int ld, const int *rows, int n, int D);
void		kk_gather_rows_bf16(cudaStream_t s, uint16_t *dst, const float *src, int ld, const int *rows, int n, int D);
/* token-major: dst (bf16) row inv[t k + r] = src row t for r < k (each src row read once); other dst rows
 * are left alone */
void		kk_gather_tok_bf16(cudaStream_t s, uint16_t *dst, const float *src, int ld, const int *inv, int n, int k,
							   int D);
/*
 * KL_CUDA_MOE_PREFILL=4: the n k choices sel [n][k] grouped on the device
 * into variant 3's padded size-class layout (cuda_moe_prefill.c): inv [n k]
 * the padded row of each pair, stable within an expert; summary [2 E + 3]
 * ints: the counts [E], each expert's first padded row [E] (-1 unused), the
 * padded rows, the pairs counted (< n k: an id out of range), 1 when the
 * padded rows exceed cap (inv then stays below n k).  work: at least
 * kk_moe_pad_group_ints(n, E) ints.  Three launches without programmatic
 * dependent launch.  Returns -1 when the shape is not covered (E > 1024,
 * k > 64), else 0.
 */
size_t		kk_moe_pad_group_ints(int n, int E);
int			kk_moe_pad_group(cudaStream_t s, int n, int E, int k, int cap, const int *sel, int *work, int *summary,
							 int *inv);
void		kk_swiglu_bf16(cudaStream_t s, uint16_t *h, const float *g, const float *u, size_t n);
/* h (bf16) = silu(g) * u from bf16 g and u, contiguous [n] (16-byte aligned buffers) */
void		kk_swiglu_bf16_bf16(cudaStream_t s, uint16_t *h, const uint16_t *g, const uint16_t *u, size_t n);

/*
 * fp8_act.cu: activations rounded to E4M3 for precision "fp8"'s W8A8
 * products (src/cuda/cuda_fp8.c).  Every rounding is one row's: scale s =
 * amax / 448 (1 where that is not > 0; NaN ignored in amax), code = E4M3 of
 * v / s, nearest even, saturating at 448 (fp8_act.cu's header).
 * kk_fp8_quant_rows: x [rows, cols] (ldx) to q [rows, cols] (ldq bytes),
 * scale [rows].  kk_fp8_quant_gather: token t of x [n, cols] to padded rows
 * p = inv[t k + j] (j < k) of dst (row stride cols), dscale[p] its scale,
 * dexp[p] = sel[t k + j]; -1 where k > 256.  kk_fp8_swiglu_quant: padded
 * row p of the unscaled gate / up products g16, u16 [rows, F] (bf16): g =
 * (g16 xs[p]) sg[f], u likewise, h = silu(g) u rounded per row into hq
 * [rows, F], hs [rows]; sg, su: the fp32 scales at gate[e] + soff, up[e] +
 * soff, e = rexp[p] (0 where out of [0, E)); -1 where F > 12288.
 * kk_fp8_rescale_rows: y16 [rows, D] (bf16) = (y16 hs[p]) sd[d], sd at
 * down[e] + soff.
 */
void		kk_fp8_quant_rows(cudaStream_t s, uint8_t *q, int ldq, float *scale, const float *x, int ldx, int rows,
							  int cols);
int			kk_fp8_quant_gather(cudaStream_t s, uint8_t *dst, float *dscale, int *dexp, const float *x, int ldx,
								const int *inv, const int *sel, int n, int k, int cols);
int			kk_fp8_swiglu_quant(cudaStream_t s, uint8_t *hq, float *hs, const uint16_t *g16, const uint16_t *u16,
								const float *xs, const int *rexp, const void *const *gate, const void *const *up,
								size_t soff, int E, int rows, int F);
void		kk_fp8_rescale_rows(cudaStream_t s, uint16_t *y16, const float *hs, const int *rexp,
								const void *const *down, size_t soff, int E, int rows, int D);

/* sample.cu: one row of a sampling call (src/cuda/cuda_sample.c fills it) */
typedef struct kk_sample_row
{
	int			row;			/* row of the logits matrix */
	float		temperature,
				top_p,
				min_p,
				penalty;
	int			top_k;
	double		u0;				/* the uniform draw (kl_sample_uniform) */
	int			recent_off,		/* distinct penalty ids: recent[recent_off ..] */
				n_recent;
	int			mask_off;		/* allowed-token bits at masks[mask_off ..], -1: all allowed */
} kk_sample_row;
/* out[i] = kl_sample_draw's choice for rows[i] (rows: device memory);
 * scratch [n, V] floats; the logits rows are modified */
int			kk_sample(cudaStream_t s, float *logits, int V, int n, const kk_sample_row *rows, const int32_t *recent,
					  const uint32_t *masks, float *scratch, int32_t *out);
/* the same choices with a cluster of blocks per row (KL_CUDA_SAMPLE_WIDE): the
 * logits are not modified and no scratch is needed; returns -1 without
 * launching where it cannot run (before Hopper, or V too large for its shared
 * memory: over 655360 where 16-block clusters run, else 327680), then use kk_sample */
int			kk_sample_wide(cudaStream_t s, const float *logits, int V, int n, const kk_sample_row *rows,
						   const int32_t *recent, const uint32_t *masks, int32_t *out);
/* the same choices and contract as kk_sample_wide, in fewer passes over the row
 * and fewer cluster barriers (KL_CUDA_SAMPLE_WIDE=2; sample.cu's "fast wide kernel") */
int			kk_sample_fast(cudaStream_t s, const float *logits, int V, int n, const kk_sample_row *rows,
						   const int32_t *recent, const uint32_t *masks, int32_t *out);

#ifdef __cplusplus
}
#endif

#endif
