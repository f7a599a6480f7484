/*
 * gemv.cu — matrix products for a few input rows (decode), y = x W^T, where
 * the weights must stream from memory once at full bandwidth.
 *
 * bf16 weights (what models are stored in): a block of BT threads takes RB
 * consecutive weight rows and splits their columns, thread t reading the
 * 16-byte pieces t, t + BT, ... of every row of the group, so the block reads
 * its span of rows front to back as a copy does; each input piece (fp32, read
 * through the read-only cache where the few input rows stay resident) serves
 * all RB rows.  Partial sums are reduced over the block (warp shuffles, then
 * one shared-memory pass).  On an H200 this streams the model's shapes at
 * 90-100 % of a plain read of the same bytes, against 60-85 % for the older
 * design below (bench/gemv_sweep.cu, bench/notes-cuda.md).
 *
 * fp32 weights, and bf16 with KL_CUDA_GEMV_ROWS=0: one warp per weight row;
 * each lane reads 16-byte pieces of the row (8 bf16 or 4+4 f32) and keeps four
 * pieces in flight before using them.  Partial sums are reduced across the
 * warp at the end.
 *
 * The expert variant runs the same inner loop for mixture-of-experts decode:
 * grid.y indexes the list of experts that received tokens (made on the
 * device by the routing kernels; sized for the most that can be active), so
 * a whole MoE layer's expert products are one launch with no host round trip
 * (and can be captured in a CUDA graph).
 */
#include "common.cuh"

#define GEMV_WARPS 8			/* weight rows per block */
#define GEMV_MAX_NR 8			/* input rows per pass */

/* set by kk_set_gemv_rows: bf16 GEMVs in the block-rows design (else one warp per row) */
int			kk_gemv_rows = 1;

extern "C" void
kk_set_gemv_rows(int on)
{
	kk_gemv_rows = on;
}

/* acc + w[0..8) . (a, b) (fused multiply-adds in index order): every GEMV's inner step */
__device__ __forceinline__ float
fma8_acc(const float *w, float4 a, float4 b, float acc)
{
	acc = fmaf(w[0], a.x, acc);
	acc = fmaf(w[1], a.y, acc);
	acc = fmaf(w[2], a.z, acc);
	acc = fmaf(w[3], a.w, acc);
	acc = fmaf(w[4], b.x, acc);
	acc = fmaf(w[5], b.y, acc);
	acc = fmaf(w[6], b.z, acc);
	acc = fmaf(w[7], b.w, acc);
	return acc;
}

/* acc + w[0..8) . x[0..8), x read as two float4 */
__device__ __forceinline__ float
dot8_acc(const float *w, const float4 *x, float acc)
{
	return fma8_acc(w, __ldg(x), __ldg(x + 1), acc);
}

/* 8 consecutive fp32 weights from two 16-byte loads */
__device__ __forceinline__ void
load8_f32(const float4 *p, float *w)
{
	float4		a = __ldg(p),
				b = __ldg(p + 1);

	w[0] = a.x;
	w[1] = a.y;
	w[2] = a.z;
	w[3] = a.w;
	w[4] = b.x;
	w[5] = b.y;
	w[6] = b.z;
	w[7] = b.w;
}

/* acc[r] += W[row] . x_r over cols, for NR input rows (the warp's lanes striding) */
template <int NR, bool BF16>
__device__ __forceinline__ void
dot_rows(float *acc, const void *__restrict__ Wrow, const float *const *xr, int cols, int lane, bool vec)
{
	if (vec)
	{
		int			nch = cols >> 3;
		int			ch = lane;

		/* four 16-byte (bf16) pieces in flight per lane */
		for (; ch + 96 < nch; ch += 128)
		{
			float		w[4][8];

			if (BF16)
			{
				const uint4 *wp = (const uint4 *) Wrow;
				uint4		v0 = __ldg(wp + ch),
							v1 = __ldg(wp + ch + 32),
							v2 = __ldg(wp + ch + 64),
							v3 = __ldg(wp + ch + 96);

				unpack8_bf16(v0, w[0]);
				unpack8_bf16(v1, w[1]);
				unpack8_bf16(v2, w[2]);
				unpack8_bf16(v3, w[3]);
			}
			else
			{
				const float4 *wp = (const float4 *) Wrow;

#pragma unroll
				for (int u = 0; u < 4; u++)
					load8_f32(wp + 2 * (ch + 32 * u), w[u]);
			}
#pragma unroll
			for (int u = 0; u < 4; u++)
#pragma unroll
				for (int r = 0; r < NR; r++)
					acc[r] = dot8_acc(w[u], (const float4 *) xr[r] + 2 * (ch + 32 * u), acc[r]);
		}
		for (; ch < nch; ch += 32)
		{
			float		w[8];

			if (BF16)
				unpack8_bf16(__ldg((const uint4 *) Wrow + ch), w);
			else
				load8_f32((const float4 *) Wrow + 2 * ch, w);
#pragma unroll
			for (int r = 0; r < NR; r++)
			{
				acc[r] = dot8_acc(w, (const float4 *) xr[r] + 2 * ch, acc[r]);
			}
		}
	}
	else
	{
		/* unaligned shapes (never for the models seen so far): scalar loads */
		for (int c = lane; c < cols; c += 32)
		{
			float		w = BF16 ? bf16_to_f32(((const uint16_t *) Wrow)[c]) : ((const float *) Wrow)[c];

#pragma unroll
			for (int r = 0; r < NR; r++)
				acc[r] = fmaf(w, xr[r][c], acc[r]);
		}
	}
}

/* ------------------------------------------------------------------ block rows (bf16) */

#define ROWS_BT 96				/* threads of a block-rows block (288 pieces = 2304 columns: 3 each) */
#define ROWS_RB 3				/* its weight rows */
#define ROWS_BT_WIDE 128		/* for rows of 512 pieces or a multiple of 128 above (4096 columns) */
#define ROWS_RB_WIDE 2

/*
 * The first pieces of RB weight rows (Wr[w] NULL: past the matrix, zeros):
 * loaded before kk_dep_wait, since the weights do not depend on earlier
 * kernels, so the first memory latency overlaps the previous kernel's tail.
 */
template <int RB, int BT>
__device__ __forceinline__ void
rows_first(uint4 (&raw)[RB], const uint16_t *const (&Wr)[RB], int nch, int ch0 = threadIdx.x)
{
#pragma unroll
	for (int w = 0; w < RB; w++)
		raw[w] = Wr[w] && ch0 < nch ? __ldg((const uint4 *) Wr[w] + ch0) : make_uint4(0, 0, 0, 0);
}

/*
 * acc[w][r] += W_w . x_r over this thread's pieces threadIdx.x, + BT, ...
 * of the nch 16-byte pieces (8 columns each) of the rows; raw holds the first
 * pieces (rows_first).  Each input piece is read once for all RB rows.
 */
/* acc[w][r] += W_w . x_r over piece ch of the rows, held in cur (rows_dot's and rows_dot_held's step) */
template <int NR, int RB>
__device__ __forceinline__ void
rows_piece(float (&acc)[RB][NR], const uint4 (&cur)[RB], const float *const (&xr)[NR], int ch)
{
#pragma unroll
	for (int r = 0; r < NR; r++)
	{
		float4		a = __ldg((const float4 *) xr[r] + 2 * ch),
					b = __ldg((const float4 *) xr[r] + 2 * ch + 1);

#pragma unroll
		for (int w = 0; w < RB; w++)
		{
			float		f[8];

			unpack8_bf16(cur[w], f);
			acc[w][r] = fma8_acc(f, a, b, acc[w][r]);
		}
	}
}

/*
 * acc[w][r] += W_w . x_r over this thread's pieces ch0, ch0 + BT, ... (ch0:
 * threadIdx.x unless rows_dot_held took the first ones) of the nch 16-byte
 * pieces (8 columns each) of the rows; raw holds piece ch0 (rows_first).
 * Each input piece is read once for all RB rows.
 */
template <int NR, int RB, int BT>
__device__ __forceinline__ void
rows_dot(float (&acc)[RB][NR], uint4 (&raw)[RB], const uint16_t *const (&Wr)[RB], const float *const (&xr)[NR],
		 int nch, int ch0 = threadIdx.x)
{
	for (int ch = ch0; ch < nch; ch += BT)
	{
		uint4		cur[RB];

#pragma unroll
		for (int w = 0; w < RB; w++)
		{
			cur[w] = raw[w];
			/* the next pieces are in flight while these are used */
			raw[w] = Wr[w] && ch + BT < nch ? __ldg((const uint4 *) Wr[w] + ch + BT) : make_uint4(0, 0, 0, 0);
		}
		rows_piece<NR, RB>(acc, cur, xr, ch);
	}
}

/*
 * KL_CUDA_ROWS_EARLY (kk_set_rows_early, default on): the block-rows
 * products of 1 or 2 input rows request up to ROWS_NP pieces a thread of each row before
 * kk_dep_wait, not just the first: at 2304 columns (96 threads) and 4096
 * (128) that is the whole row, so a block whose kernel starts under a
 * latency-bound kernel (the KDA decode kernel before o_proj, the norms before
 * the products of x) has its weights in registers when its input arrives.
 * The sums are rows_dot's, piece by piece in the same order: the same bits.
 */
#define ROWS_NP 4

int			kk_rows_early = 1;

extern "C" void
kk_set_rows_early(int on)
{
	kk_rows_early = on;
}

/* pieces threadIdx.x + p BT (p < NP) of the RB rows (zeros past the rows or the matrix) */
template <int RB, int BT, int NP = ROWS_NP>
__device__ __forceinline__ void
rows_first_held(uint4 (&held)[NP][RB], const uint16_t *const (&Wr)[RB], int nch)
{
#pragma unroll
	for (int p = 0; p < NP; p++)
		rows_first<RB, BT>(held[p], Wr, nch, (int) threadIdx.x + p * BT);
}

/* acc[w][r] += W_w . x_r over the pieces in held (rows_first_held), in rows_dot's order */
template <int NR, int RB, int BT, int NP = ROWS_NP>
__device__ __forceinline__ void
rows_dot_pieces(float (&acc)[RB][NR], const uint4 (&held)[NP][RB], const float *const (&xr)[NR], int nch)
{
#pragma unroll
	for (int p = 0; p < NP; p++)
		if ((int) threadIdx.x + p * BT < nch)
			rows_piece<NR, RB>(acc, held[p], xr, (int) threadIdx.x + p * BT);
}

/* rows_dot with this thread's first ROWS_NP pieces already in held (rows_first_held) */
template <int NR, int RB, int BT>
__device__ __forceinline__ void
rows_dot_held(float (&acc)[RB][NR], const uint4 (&held)[ROWS_NP][RB], const uint16_t *const (&Wr)[RB],
			  const float *const (&xr)[NR], int nch)
{
	int			ch0 = (int) threadIdx.x + ROWS_NP * BT;
	uint4		raw[RB];

	rows_dot_pieces<NR, RB, BT>(acc, held, xr, nch);
	if (ch0 < nch)
	{
		rows_first<RB, BT>(raw, Wr, nch, ch0);
		rows_dot<NR, RB, BT>(acc, raw, Wr, xr, nch, ch0);
	}
}

/*
 * y[r, row0 + w] = W_w . x_r for the block's RB rows of W [rows, cols], NR
 * input rows: the body of both block-rows kernels.  The first weight pieces
 * are requested before kk_dep_wait (weights do not depend on earlier kernels).
 */
template <int NR, int RB, int BT, bool EARLY>
__device__ __forceinline__ void
rows_product(float *y, int ldy, const float *x, int ldx, const uint16_t *W, int rows, int cols, int row0)
{
	__shared__ float sums[RB * NR];
	int			nch = cols >> 3;
	const uint16_t *Wr[RB];
	const float *xr[NR];
	uint4		raw[RB];
	uint4		held[EARLY ? ROWS_NP : 1][RB];
	float		acc[RB][NR];

#pragma unroll
	for (int w = 0; w < RB; w++)
		Wr[w] = row0 + w < rows ? W + (size_t) (row0 + w) * cols : NULL;
	if constexpr (EARLY)
		rows_first_held<RB, BT>(held, Wr, nch);
	else
		rows_first<RB, BT>(raw, Wr, nch);
	kk_dep_wait();
	kk_dep_launch();
#pragma unroll
	for (int r = 0; r < NR; r++)
		xr[r] = x + (size_t) r * ldx;
#pragma unroll
	for (int w = 0; w < RB; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
			acc[w][r] = 0;
	if constexpr (EARLY)
		rows_dot_held<NR, RB, BT>(acc, held, Wr, xr, nch);
	else
		rows_dot<NR, RB, BT>(acc, raw, Wr, xr, nch);
	rows_block_sum<NR, RB, BT>(acc, sums);
	for (int i = threadIdx.x; i < RB * NR; i += BT)
		if (row0 + i / NR < rows)
			y[(size_t) (i % NR) * ldy + row0 + i / NR] = sums[i];
}

/* rows_product for block (b, pass): rows b * RB.., input rows pass * NR.. (grid.y: passes of NR) */
template <int NR, int RB, int BT, bool EARLY>
__global__ void __launch_bounds__(BT)
gemv_rows_kernel(float *__restrict__ y, int ldy, const float *__restrict__ x, int ldx,
				 const uint16_t *__restrict__ W, int rows, int cols)
{
	rows_product<NR, RB, BT, EARLY>(y + (size_t) blockIdx.y * NR * ldy, ldy, x + (size_t) blockIdx.y * NR * ldx, ldx, W,
							 rows, cols, blockIdx.x * RB);
}

/* the wide shape (512 pieces a row, or a multiple of 128 above): two rows of 128 threads */
static bool
rows_wide(int cols)
{
	int			nch = cols >> 3;

	return nch >= 512 && nch % 128 == 0;
}

/*
 * KL_CUDA_ROWS_WIDE1 (kk_set_rows_wide1): weight rows a block of the wide
 * shape takes in products of one input row in the early form: o_proj at
 * batch 1 (2304 rows of 4096 columns, 18.9 MB) and the dense layer's down
 * product (9216 columns).  ROWS_RB_WIDE (2) gives 1152 blocks of 48
 * registers a thread (sm_90a), 10 an SM alone but 8 beside the KDA decode
 * kernel (128 blocks of 256 threads at 48 registers: about one an SM),
 * which o_proj's blocks start under: ~1064 slots, so ~90 blocks start only
 * when that kernel's blocks leave and request their rows after the wait,
 * a second memory round trip on the path.  3 or 4 rows a block hold more
 * of the matrix a register (the held pieces against the per-thread
 * overhead): 3 rows take 64 registers, 6 blocks an SM beside that kernel,
 * ~800 slots for 768 blocks; 4 rows 80, 5 an SM, ~660 for 576: the whole
 * matrix requested in one wave (bench/notes-cuda.md, issue 10's sixth
 * session).  Each row's sum is made as before (thread t its pieces t, t +
 * 128, ..., then rows_block_sum's warp and warp-order sums): the same bits
 * at any rows a block.
 */
int			kk_rows_wide1 = ROWS_RB_WIDE;

extern "C" void
kk_set_rows_wide1(int rb)
{
	kk_rows_wide1 = rb == 3 || rb == 4 ? rb : ROWS_RB_WIDE;
}

template <int NR, int RB, int BT, bool EARLY>
static void
gemv_rows_launch_rb(cudaStream_t s, float *y, int ldy, const float *x, int ldx, const void *W, int rows, int cols,
					int passes)
{
	kk_launch(gemv_rows_kernel<NR, RB, BT, EARLY>, dim3(ceil_div(rows, RB), passes), dim3(BT), 0, s, y, ldy, x, ldx,
			  (const uint16_t *) W, rows, cols);
}

template <int NR, bool EARLY>
static void
gemv_rows_launch_as(cudaStream_t s, float *y, int ldy, const float *x, int ldx, const void *W, int rows, int cols,
					int passes)
{
	if (!rows_wide(cols))
		gemv_rows_launch_rb<NR, ROWS_RB, ROWS_BT, EARLY>(s, y, ldy, x, ldx, W, rows, cols, passes);
	else if (NR == 1 && EARLY && kk_rows_wide1 == 3)
		gemv_rows_launch_rb<1, 3, ROWS_BT_WIDE, true>(s, y, ldy, x, ldx, W, rows, cols, passes);
	else if (NR == 1 && EARLY && kk_rows_wide1 == 4)
		gemv_rows_launch_rb<1, 4, ROWS_BT_WIDE, true>(s, y, ldy, x, ldx, W, rows, cols, passes);
	else
		gemv_rows_launch_rb<NR, ROWS_RB_WIDE, ROWS_BT_WIDE, EARLY>(s, y, ldy, x, ldx, W, rows, cols, passes);
}

/* the early form (kk_rows_early) for steps of 1 and 2 input rows: at 4 the held pieces' registers cost more
 * than the early requests save (H200, 2026-12-02, 48B step at 4k: batch 1 / 2 / 4 -0.01 / -0.05 / +0.03 ms);
 * both block-rows launchers take it where NR <= ROWS_EARLY_NR */
#define ROWS_EARLY_NR 2

template <int NR>
static void
gemv_rows_launch(cudaStream_t s, float *y, int ldy, const float *x, int ldx, const void *W, int rows, int cols,
				 int passes)
{
	if constexpr (NR <= ROWS_EARLY_NR)
		if (kk_rows_early)
		{
			gemv_rows_launch_as<NR, true>(s, y, ldy, x, ldx, W, rows, cols, passes);
			return;
		}
	gemv_rows_launch_as<NR, false>(s, y, ldy, x, ldx, W, rows, cols, passes);
}

static void
gemv_rows(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int nr, const void *W, int rows, int cols,
		  int passes)
{
	switch (nr)
	{
#define CASE(N) case N: gemv_rows_launch<N>(s, y, ldy, x, ldx, W, rows, cols, passes); break;
			CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
	}
}

/* ------------------------------------------------------------------ one warp a row */

template <int NR, bool BF16>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_kernel(float *__restrict__ y, int ldy, const float *__restrict__ x, int ldx,
			const void *__restrict__ W, int rows, int cols, bool vec)
{
	int			row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
	int			lane = threadIdx.x & 31;
	float		acc[NR];
	const float *xr[NR];
	const void *Wrow = BF16 ? (const void *) ((const uint16_t *) W + (size_t) row * cols)
		: (const void *) ((const float *) W + (size_t) row * cols);

	/* grid.y: passes of NR input rows in one launch */
	x += (size_t) blockIdx.y * NR * ldx;
	y += (size_t) blockIdx.y * NR * ldy;

	/* the weights do not depend on earlier kernels: start fetching them */
	if (row < rows)
		kk_prefetch_l2(Wrow, (size_t) cols * (BF16 ? 2 : 4), lane);
	kk_dep_wait();
	kk_dep_launch();
	if (row >= rows)
		return;
#pragma unroll
	for (int r = 0; r < NR; r++)
	{
		acc[r] = 0;
		xr[r] = x + (size_t) r * ldx;
	}
	dot_rows<NR, BF16>(acc, Wrow, xr, cols, lane, vec);
#pragma unroll
	for (int r = 0; r < NR; r++)
	{
		float		s = warp_sum(acc[r]);

		if (lane == 0)
			y[(size_t) r * ldy + row] = s;
	}
}

template <bool BF16>
static void
gemv_launch(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int nr, const void *W, int rows,
			int cols, bool vec, int passes = 1)
{
	dim3		grid(ceil_div(rows, GEMV_WARPS), passes);

	switch (nr)
	{
#define CASE(N) case N: \
		kk_launch(gemv_kernel<N, BF16>, grid, dim3(GEMV_WARPS * 32), 0, s, y, ldy, x, ldx, W, rows, cols, vec); \
		break;
			CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
	}
}

static bool
vector_ok(const float *x, int ldx, const void *W, int cols)
{
	return cols % 8 == 0 && ldx % 4 == 0 && ((uintptr_t) x & 15) == 0 && ((uintptr_t) W & 15) == 0;
}

extern "C" void
kk_gemv(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int bf16, int rows, int cols)
{
	bool		vec = vector_ok(x, ldx, W, cols);
	bool		by_rows = bf16 && vec && kk_gemv_rows;
	int			full = n / GEMV_MAX_NR;

	/* the full passes of GEMV_MAX_NR rows in one launch (grid.y), then the rest */
	if (full > 1)
	{
		if (by_rows)
			gemv_rows(s, y, ldy, x, ldx, GEMV_MAX_NR, W, rows, cols, full);
		else if (bf16)
			gemv_launch<true>(s, y, ldy, x, ldx, GEMV_MAX_NR, W, rows, cols, vec, full);
		else
			gemv_launch<false>(s, y, ldy, x, ldx, GEMV_MAX_NR, W, rows, cols, vec, full);
		if (n == full * GEMV_MAX_NR)
			return;
		y += (size_t) full * GEMV_MAX_NR * ldy;
		x += (size_t) full * GEMV_MAX_NR * ldx;
		n -= full * GEMV_MAX_NR;
	}
	for (int r0 = 0; r0 < n; r0 += GEMV_MAX_NR)
	{
		int			nr = n - r0 < GEMV_MAX_NR ? n - r0 : GEMV_MAX_NR;

		if (by_rows)
			gemv_rows(s, y + (size_t) r0 * ldy, ldy, x + (size_t) r0 * ldx, ldx, nr, W, rows, cols, 1);
		else if (bf16)
			gemv_launch<true>(s, y + (size_t) r0 * ldy, ldy, x + (size_t) r0 * ldx, ldx, nr, W, rows, cols, vec);
		else
			gemv_launch<false>(s, y + (size_t) r0 * ldy, ldy, x + (size_t) r0 * ldx, ldx, nr, W, rows, cols, vec);
	}
}

/*
 * Several independent products of the same few rows in one launch (the
 * projections of a layer that all read the normalized input): block b
 * belongs to the job whose range of blocks holds it.
 */
template <int NR>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
gemv_batch_kernel(kk_gemv_batch b)
{
	int			j = kk_batch_job(b);
	int			lane = threadIdx.x & 31;
	float		acc[NR];
	const float *xr[NR];

	{
		const kk_gemv_job *jb = &b.job[j];
		int			row = ((int) blockIdx.x - b.first_block[j]) * GEMV_WARPS + (threadIdx.x >> 5);

		if (row < jb->rows)
			kk_prefetch_l2((const char *) jb->W + (size_t) row * jb->cols * (jb->bf16 ? 2 : 4),
						   (size_t) jb->cols * (jb->bf16 ? 2 : 4), lane);
		kk_dep_wait();
		kk_dep_launch();
		if (row >= jb->rows)
			return;
#pragma unroll
		for (int r = 0; r < NR; r++)
		{
			acc[r] = 0;
			xr[r] = jb->x + (size_t) r * jb->ldx;
		}
		if (jb->bf16)
			dot_rows<NR, true>(acc, (const uint16_t *) jb->W + (size_t) row * jb->cols, xr, jb->cols, lane,
									 jb->vec);
		else
			dot_rows<NR, false>(acc, (const float *) jb->W + (size_t) row * jb->cols, xr, jb->cols, lane, jb->vec);
#pragma unroll
		for (int r = 0; r < NR; r++)
		{
			float		v = warp_sum(acc[r]);

			if (lane == 0)
				jb->y[(size_t) r * jb->ldy + row] = v;
		}
	}
}

/* kk_gemv_multi in the block-rows design: block b takes RB rows of the job whose range holds it */
template <int NR, int RB, int BT, bool EARLY>
__global__ void __launch_bounds__(BT)
gemv_rows_batch_kernel(kk_gemv_batch b)
{
	int			j = kk_batch_job(b);

	rows_product<NR, RB, BT, EARLY>(b.job[j].y, b.job[j].ldy, b.job[j].x, b.job[j].ldx, (const uint16_t *) b.job[j].W,
							 b.job[j].rows, b.job[j].cols, ((int) blockIdx.x - b.first_block[j]) * RB);
}

template <int NR, bool EARLY>
static void
gemv_rows_batch_launch_as(cudaStream_t s, kk_gemv_batch *b, int blocks, bool wide)
{
	if (wide)
		kk_launch(gemv_rows_batch_kernel<NR, ROWS_RB_WIDE, ROWS_BT_WIDE, EARLY>, dim3(blocks), dim3(ROWS_BT_WIDE), 0, s,
				  *b);
	else
		kk_launch(gemv_rows_batch_kernel<NR, ROWS_RB, ROWS_BT, EARLY>, dim3(blocks), dim3(ROWS_BT), 0, s, *b);
}

template <int NR>
static void
gemv_rows_batch_launch(cudaStream_t s, kk_gemv_batch *b, bool wide)
{
	int			rb = wide ? ROWS_RB_WIDE : ROWS_RB,
				blocks = 0;

	for (int j = 0; j < b->count; j++)
	{
		b->first_block[j] = blocks;
		blocks += ceil_div(b->job[j].rows, rb);
	}
	b->first_block[b->count] = blocks;
	if constexpr (NR <= ROWS_EARLY_NR)
		if (kk_rows_early)
		{
			gemv_rows_batch_launch_as<NR, true>(s, b, blocks, wide);
			return;
		}
	gemv_rows_batch_launch_as<NR, false>(s, b, blocks, wide);
}

extern "C" void
kk_gemv_multi(cudaStream_t s, kk_gemv_batch *b)
{
	int			blocks = 0;
	bool		by_rows = kk_gemv_rows,
				wide = true;

	if (b->count <= 0 || b->n <= 0)
		return;
	for (int j = 0; j < b->count; j++)
	{
		kk_gemv_job *jb = &b->job[j];

		jb->vec = vector_ok(jb->x, jb->ldx, jb->W, jb->cols);
		by_rows = by_rows && jb->vec && jb->bf16;
		wide = wide && rows_wide(jb->cols);
	}
	if (by_rows)
	{
		switch (b->n)
		{
#define CASE(N) case N: gemv_rows_batch_launch<N>(s, b, wide); break;
				CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
		}
		return;
	}
	for (int j = 0; j < b->count; j++)
	{
		b->first_block[j] = blocks;
		blocks += ceil_div(b->job[j].rows, GEMV_WARPS);
	}
	b->first_block[b->count] = blocks;
	switch (b->n)
	{
#define CASE(N) case N: \
		kk_launch(gemv_batch_kernel<N>, dim3(blocks), dim3(GEMV_WARPS * 32), 0, s, *b); \
		break;
			CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
	}
}

/* ------------------------------------------------------------------ experts */

/*
 * Modes of the expert kernel: one matrix (W0 -> y0); two matrices, the
 * second half of the blocks taking W1 -> y1; or SwiGLU: the warp computes the
 * gate row (W0) and the up row (W1) of the same output and writes
 * silu(gate) * up to y0 (the values the separate swiglu kernel would make
 * from the two products, without their round trip through memory).
 */
#define EXPERT_ONE 0
#define EXPERT_TWO 1
#define EXPERT_SWIGLU 2

template <int NR, bool BF16, int MODE>
__device__ __forceinline__ void
expert_pass(float *y, int ldy, const float *x, int ldx, const int *xrow, const void *Wrow, const void *Wrow2,
			int row, int cols, int i0, int lane, bool vec)
{
	float		acc[NR],
				acc2[NR];
	const float *xr[NR];

#pragma unroll
	for (int r = 0; r < NR; r++)
	{
		acc[r] = 0;
		acc2[r] = 0;
		xr[r] = x + (size_t) (xrow ? xrow[i0 + r] : i0 + r) * ldx;
	}
	dot_rows<NR, BF16>(acc, Wrow, xr, cols, lane, vec);
	if (MODE == EXPERT_SWIGLU)
		dot_rows<NR, BF16>(acc2, Wrow2, xr, cols, lane, vec);
#pragma unroll
	for (int r = 0; r < NR; r++)
	{
		float		s = warp_sum(acc[r]);

		if (MODE == EXPERT_SWIGLU)
		{
			float		u = warp_sum(acc2[r]);

			s = siluf_(s) * u;
		}
		if (lane == 0)
			y[(size_t) (i0 + r) * ldy + row] = s;
	}
}

/* expert_pass for nr (1..N) input rows: instantiates only the sizes up to N */
template <int N, bool BF16, int MODE>
__device__ __forceinline__ void
expert_pass_upto(int nr, float *y, int ldy, const float *x, int ldx, const int *xrow, const void *Wrow,
				 const void *Wrow2, int row, int cols, int i0, int lane, bool vec)
{
	if constexpr (N > 1)
	{
		if (nr < N)
		{
			expert_pass_upto<N - 1, BF16, MODE>(nr, y, ldy, x, ldx, xrow, Wrow, Wrow2, row, cols, i0, lane, vec);
			return;
		}
	}
	expert_pass<N, BF16, MODE>(y, ldy, x, ldx, xrow, Wrow, Wrow2, row, cols, i0, lane, vec);
}

/*
 * MAXNR: the most tokens any expert can have in this launch (the step's
 * token count, capped at GEMV_MAX_NR per pass).  Instantiating only the pass
 * sizes up to it keeps the register count of the batch-1 kernel that of the
 * plain GEMV (31 against 90 with all eight sizes), so that four times as
 * many warps stream weights per SM.
 */
template <bool BF16, int MAXNR, int MODE>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
expert_gemv_kernel(float *y0, float *y1, int ldy, const float *__restrict__ x, int ldx, const int *__restrict__ xrow,
				   const void *const *W0, const void *const *W1, int rows, int cols, const int *__restrict__ start,
				   const int *__restrict__ active, bool vec)
{
	int			e,
				first,
				count;
	/* with two matrices, the second half of the blocks takes the second */
	int			per = (rows + GEMV_WARPS - 1) / GEMV_WARPS;
	int			m = MODE == EXPERT_TWO && (int) blockIdx.x >= per;
	int			row = ((int) blockIdx.x - m * per) * GEMV_WARPS + (threadIdx.x >> 5);
	int			lane = threadIdx.x & 31;

	/* which experts run depends on the routing kernel before: wait first */
	kk_dep_wait();
	kk_dep_launch();
	if ((int) blockIdx.y >= active[0] || row >= rows)
		return;
	/* work item: expert e, at most MAXNR rows (kk_moe_group's P) */
	e = kk_expert_item(active, start, blockIdx.y, MAXNR, &first, &count);
	{
		const void *W = m ? W1[e] : W0[e];
		const void *W2 = MODE == EXPERT_SWIGLU ? W1[e] : NULL;
		size_t		esz = BF16 ? 2 : 4;
		const void *Wrow = (const char *) W + (size_t) row * cols * esz;
		const void *Wrow2 = W2 ? (const void *) ((const char *) W2 + (size_t) row * cols * esz) : NULL;
		float	   *y = m ? y1 : y0;

		if (count > 0)
			expert_pass_upto<MAXNR, BF16, MODE>(count, y, ldy, x, ldx, xrow, Wrow, Wrow2, row, cols, first, lane,
												vec);
	}
}

template <bool BF16, int MAXNR, int MODE>
static void
expert_launch(cudaStream_t s, dim3 grid, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
			  const void *const *W0, const void *const *W1, int rows, int cols, const int *start, const int *active,
			  bool vec)
{
	kk_launch(expert_gemv_kernel<BF16, MAXNR, MODE>, grid, dim3(GEMV_WARPS * 32), 0, s, y0, y1, ldy, x, ldx, xrow,
			  W0, W1, rows, cols, start, active, vec);
}

template <bool BF16, int MODE>
static void
expert_dispatch(cudaStream_t s, int max_count, dim3 grid, float *y0, float *y1, int ldy, const float *x, int ldx,
				const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols, const int *start,
				const int *active, bool vec)
{
	if (max_count <= 1)
		expert_launch<BF16, 1, MODE>(s, grid, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active, vec);
	else if (max_count <= 2)
		expert_launch<BF16, 2, MODE>(s, grid, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active, vec);
	else if (max_count <= 4)
		expert_launch<BF16, 4, MODE>(s, grid, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active, vec);
	else
		expert_launch<BF16, GEMV_MAX_NR, MODE>(s, grid, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active,
											   vec);
}

/*
 * The expert products in the block-rows design (bf16): block (b, item) takes
 * RB weight rows of the item's expert (and the same rows of the second
 * matrix for SwiGLU: RT = 2 RB rows) and the item's input rows in passes of
 * at most MAXNR; y as in expert_pass.  LOADED: raw already holds the first
 * weight pieces (rows_first, issued early by the caller).
 */
template <int NR, int MODE, int RT, int BT, bool LOADED>
__device__ __forceinline__ void
expert_rows_pass(float *y, int ldy, const float *x, int ldx, const int *xrow, const uint16_t *const (&Wr)[RT],
				 uint4 (&raw)[RT], int row0, int rows, int nch, int i0, float *sums)
{
	float		acc[RT][NR];
	const float *xr[NR];

#pragma unroll
	for (int r = 0; r < NR; r++)
		xr[r] = x + (size_t) (xrow ? xrow[i0 + r] : i0 + r) * ldx;
#pragma unroll
	for (int w = 0; w < RT; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
			acc[w][r] = 0;
	if (!LOADED)
		rows_first<RT, BT>(raw, Wr, nch);
	rows_dot<NR, RT, BT>(acc, raw, Wr, xr, nch);
	rows_block_sum<NR, RT, BT>(acc, sums);
	expert_rows_store<NR, MODE == EXPERT_SWIGLU, RT, BT>(y, ldy, sums, row0, rows, i0);
}

/* expert_rows_pass for nr (1..N) input rows: instantiates only the sizes up to N */
template <int N, int MODE, int RT, int BT, bool LOADED = false>
__device__ __forceinline__ void
expert_rows_upto(int nr, float *y, int ldy, const float *x, int ldx, const int *xrow,
				 const uint16_t *const (&Wr)[RT], uint4 (&raw)[RT], int row0, int rows, int nch, int i0, float *sums)
{
	if constexpr (N > 1)
	{
		if (nr < N)
		{
			expert_rows_upto<N - 1, MODE, RT, BT, LOADED>(nr, y, ldy, x, ldx, xrow, Wr, raw, row0, rows, nch,
																i0, sums);
			return;
		}
	}
	expert_rows_pass<N, MODE, RT, BT, LOADED>(y, ldy, x, ldx, xrow, Wr, raw, row0, rows, nch, i0, sums);
}

/* Wr[w]: RB rows of matrix A from row0, then (RT = 2 RB) the same rows of B; NULL past the matrix */
template <int RB, int RT>
__device__ __forceinline__ void
expert_rows_from(const uint16_t *(&Wr)[RT], const uint16_t *A, const uint16_t *B, int row0, int rows, int cols)
{
#pragma unroll
	for (int w = 0; w < RT; w++)
	{
		const uint16_t *Wm = w < RB ? A : B;
		int			row = row0 + w % RB;

		Wr[w] = row < rows ? Wm + (size_t) row * cols : NULL;
	}
}

/*
 * Wr[w]: the RT weight rows of expert e a block-rows expert block takes from
 * row0 (NULL past the matrix): for SwiGLU RB rows of W0 then the same rows of
 * W1, else RB rows of W0 (m = 0) or W1 (m = 1).
 */
template <int MODE, int RB, int RT>
__device__ __forceinline__ void
expert_rows_weights(const uint16_t *(&Wr)[RT], const void *const *W0, const void *const *W1, int e, int m, int row0,
					int rows, int cols)
{
	const uint16_t *A = (const uint16_t *) (MODE == EXPERT_SWIGLU ? W0[e] : m ? W1[e] : W0[e]);

	expert_rows_from<RB, RT>(Wr, A, MODE == EXPERT_SWIGLU ? (const uint16_t *) W1[e] : A, row0, rows, cols);
}

/*
 * PRE (KL_CUDA_EXPERT_PRELOAD, the down product only): the block reads its
 * work item and requests its first weight pieces BEFORE kk_dep_wait, and
 * waits only before it reads x (the gate/up output h).  Why start, active
 * and the expert table may be read that early: this kernel starts only once
 * every block of the kernel before it (gate/up; swiglu with
 * KL_CUDA_MOE_FUSE=0) has called kk_dep_launch or exited, and every kernel
 * launched through kk_launch calls kk_dep_wait before either; so that
 * kernel's own predecessor, and by the same argument everything before it in
 * the stream, has completed and its writes have reached L2 (a grid's
 * completion flushes them).  The routing kernel that wrote start and active
 * is at least two launches back (routing, gate/up, down), so it is complete.
 * They are read with __ldcg (L2, not the SM's L1, which may still hold the
 * previous layer's lines: the buffers are shared by all layers).  Nothing
 * writes them again until the next layer's routing, which waits (in its
 * kk_dep_wait) for this kernel to complete.  Without programmatic launch
 * (KL_CUDA_PDL=0, before Hopper) this kernel starts after the one before it
 * has completed, which is stronger.  In a graph replay the same holds: the
 * captured launches keep their programmatic edges (same rule), and a replay
 * starts after the previous replay's last kernel.  The expert table (W0) is
 * constant after upload.  Kernels that read active right after the routing
 * kernel (the gate/up products) must not do this: the caller guarantees the
 * two-launch distance (kk_expert_gemv's contract, kernels.h).
 */
template <int MAXNR, int MODE, int RB, int BT, bool PRE>
__global__ void __launch_bounds__(BT)
expert_rows_kernel(float *y0, float *y1, int ldy, const float *__restrict__ x, int ldx, const int *__restrict__ xrow,
				   const void *const *W0, const void *const *W1, int rows, int cols, const int *__restrict__ start,
				   const int *__restrict__ active)
{
	constexpr int RT = MODE == EXPERT_SWIGLU ? 2 * RB : RB;
	__shared__ float sums[RT * MAXNR];
	int			per = (rows + RB - 1) / RB;
	int			m = MODE == EXPERT_TWO && (int) blockIdx.x >= per;
	int			row0 = ((int) blockIdx.x - m * per) * RB;
	int			e,
				first,
				count;
	const uint16_t *Wr[RT];
	uint4		raw[RT];

	if constexpr (PRE)
	{
		bool		run = (int) blockIdx.y < __ldcg(active) && row0 < rows;

		if (run)
		{
			e = kk_expert_item_l2(active, start, blockIdx.y, MAXNR, &first, &count);
			expert_rows_weights<MODE, RB, RT>(Wr, W0, W1, e, m, row0, rows, cols);
			rows_first<RT, BT>(raw, Wr, cols >> 3);
		}
		/* x (h) is written by the kernel before: wait for it now */
		kk_dep_wait();
		kk_dep_launch();
		if (!run)
			return;
		if (count > 0)
			expert_rows_upto<MAXNR, MODE, RT, BT, true>(count, m ? y1 : y0, ldy, x, ldx, xrow, Wr, raw, row0, rows,
														cols >> 3, first, sums);
	}
	else
	{
		/* which experts run depends on the routing kernel before: wait first */
		kk_dep_wait();
		kk_dep_launch();
		if ((int) blockIdx.y >= active[0] || row0 >= rows)
			return;
		e = kk_expert_item(active, start, blockIdx.y, MAXNR, &first, &count);
		expert_rows_weights<MODE, RB, RT>(Wr, W0, W1, e, m, row0, rows, cols);
		if (count > 0)
			expert_rows_upto<MAXNR, MODE, RT, BT>(count, m ? y1 : y0, ldy, x, ldx, xrow, Wr, raw, row0, rows,
												  cols >> 3, first, sums);
	}
}

template <int MAXNR, int MODE, int RB, int BT, bool PRE>
static void
expert_rows_launch_as(cudaStream_t s, int max_active, float *y0, float *y1, int ldy, const float *x, int ldx,
					  const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols,
					  const int *start, const int *active)
{
	dim3		grid(ceil_div(rows, RB) * (MODE == EXPERT_TWO ? 2 : 1), max_active);

	kk_launch(expert_rows_kernel<MAXNR, MODE, RB, BT, PRE>, grid, dim3(BT), 0, s, y0, y1, ldy, x, ldx, xrow, W0, W1,
			  rows, cols, start, active);
}

/*
 * The block-rows expert kernel for passes of MAXNR rows, 96 threads: 2 + 2
 * rows for SwiGLU, 3 otherwise; at batch 1 4 + 4 and 6 (the fastest of four
 * shapes measured on the H200, bench/notes-cuda.md).
 */
#define EXPERT_RB(MAXNR, MODE) ((MAXNR) == 1 ? ((MODE) == EXPERT_SWIGLU ? 4 : 6) : ((MODE) == EXPERT_SWIGLU ? 2 : 3))

template <int MAXNR, int MODE>
static void
expert_rows_launch(cudaStream_t s, bool pre, int max_active, float *y0, float *y1, int ldy, const float *x, int ldx,
				   const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols,
				   const int *start, const int *active)
{
	constexpr int RB = EXPERT_RB(MAXNR, MODE);

	/* the early read of the work list only in the one-matrix mode (the down product) */
	if constexpr (MODE == EXPERT_ONE)
		if (pre)
		{
			expert_rows_launch_as<MAXNR, MODE, RB, ROWS_BT, true>(s, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1,
																   rows, cols, start, active);
			return;
		}
	expert_rows_launch_as<MAXNR, MODE, RB, ROWS_BT, false>(s, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, rows,
															cols, start, active);
}

template <int MODE>
static void
expert_rows_dispatch(cudaStream_t s, bool pre, int max_count, int max_active, float *y0, float *y1, int ldy,
					 const float *x, int ldx, const int *xrow, const void *const *W0, const void *const *W1, int rows,
					 int cols, const int *start, const int *active)
{
	if (max_count <= 1)
		expert_rows_launch<1, MODE>(s, pre, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active);
	else if (max_count <= 2)
		expert_rows_launch<2, MODE>(s, pre, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active);
	else if (max_count <= 4)
		expert_rows_launch<4, MODE>(s, pre, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active);
	else
		expert_rows_launch<GEMV_MAX_NR, MODE>(s, pre, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols,
											  start, active);
}

/*
 * Blocks an SM (the register bound) for a tile of RT rows, NP pieces a thread
 * and row: 5 where the held pieces take 64 registers or more (gate/up at
 * 2304 columns: 128 registers, 5 x 132 = 660 places for T = 4's 576
 * blocks), else 7 (down at 1024 columns: 80 registers, 8 an SM, for 864
 * blocks); no spills in either (ptxas, sm_90a)
 */
#define EXPERT_TILES_MINB(RT, NP) (4 * (NP) * (RT) >= 64 ? 5 : 7)

/* requests the pieces (rows_first_held) of the tile of RB rows of A (and of B, SwiGLU) from row0 */
template <int RB, int RT, int NP>
__device__ __forceinline__ void
expert_tile_request(uint4 (&held)[NP][RT], const uint16_t *A, const uint16_t *B, int row0, int rows, int cols)
{
	const uint16_t *Wr[RT];

	expert_rows_from<RB, RT>(Wr, A, B, row0, rows, cols);
	rows_first_held<RT, ROWS_BT, NP>(held, Wr, cols >> 3);
}

/* the L2 prefetch of rows [row0 + RB, row0 + T RB) of A (and B, SwiGLU): a block's tiles after its first */
template <int MODE, int RB, int T>
__device__ __forceinline__ void
expert_tiles_prefetch(const uint16_t *A, const uint16_t *B, int row0, int rows, int cols)
{
	int			r1 = min(rows, row0 + T * RB);

	if (row0 + RB < r1)
	{
		size_t		off = (size_t) (row0 + RB) * cols,
					bytes = (size_t) (r1 - row0 - RB) * cols * sizeof(uint16_t);

		kk_prefetch_l2(A + off, bytes, threadIdx.x, ROWS_BT);
		if (MODE == EXPERT_SWIGLU)
			kk_prefetch_l2(B + off, bytes, threadIdx.x, ROWS_BT);
	}
}

/*
 * KL_CUDA_EXPERT_B1 (kk_set_expert_b1): the SwiGLU gate/up and the down
 * products at one row a work item (P = 1: batch 1, or KL_CUDA_EXPERT_NR=1)
 * in tiles of RB weight rows (EXPERT_RB at one row), for the 48B model's
 * batch-1 decode, where expert_rows_kernel streams gate/up at ~74 % and down
 * at ~61 % of the H200's copy rate (Nsight, bench/results/cuda.md): each of
 * its blocks pays a start (the wait, the work item, the pointer table) and
 * an end (block sum, stores) with no weight bytes in flight, and rows_dot
 * requests a row's third piece only once the first has arrived.  Here:
 *  - every piece a thread takes of its tile's rows (NP of them: the whole
 *    row up to NP x ROWS_BT pieces) is requested at once, so a tile costs
 *    one memory latency;
 *  - a block takes T consecutive tiles of its item: its start is paid once,
 *    and tile t + 1's pieces are requested as soon as tile t's are summed
 *    into registers, before tile t's block sum and stores.  At T = 4 a batch-1
 *    launch is about one wave (gate/up 64 x 9 blocks, down 96 x 9;
 *    EXPERT_TILES_MINB);
 *  - the work list's last shared_n slots are, in the grouping's layout at one
 *    row an item (kk_moe_group: the routed pairs' items, then the shared
 *    rows'), the fused shared expert's (expert shared_e), whose weights do not
 *    depend on the routing kernel that runs just before gate/up.  The grid
 *    takes those slots first (blockIdx.y < shared_n), so they are in the
 *    first wave, and their first tile is requested before kk_dep_wait (with
 *    shared_l2, their later tiles too, into L2: 9.4 MB of gate/up's 85 at
 *    batch 1, while the routing kernel runs and memory is idle).  After the
 *    wait every block reads its item from the list as expert_rows_kernel
 *    does and requests its rows again if the expert is not the one guessed:
 *    the layout is a guess that is checked, not a contract;
 *  - PRE (the down product, KL_CUDA_EXPERT_PRELOAD): the work item and the
 *    first tile before the wait, as expert_rows_kernel's PRE (the argument
 *    there).
 * Every row's dot product is expert_rows_kernel<1, MODE, RB, ROWS_BT>'s: the
 * same pieces a thread in the same order (rows_dot_pieces), the same block
 * sum (rows_block_sum) and store (expert_rows_store): the same bits.
 */
template <int MODE, int RB, int NP, int T, bool PRE>
__global__ void __launch_bounds__(ROWS_BT, EXPERT_TILES_MINB(MODE == EXPERT_SWIGLU ? 2 * RB : RB, NP))
expert_tiles_kernel(float *y, int ldy, const float *__restrict__ x, int ldx, const int *__restrict__ xrow,
					const void *const *W0, const void *const *W1, int rows, int cols,
					const int *__restrict__ start, const int *__restrict__ active, int shared_e, int shared_n,
					int shared_l2)
{
	constexpr int RT = MODE == EXPERT_SWIGLU ? 2 * RB : RB;
	__shared__ float sums[RT];
	int			by = (int) blockIdx.y,
				slot = by < shared_n ? (int) gridDim.y - shared_n + by : by - shared_n,
				row0 = (int) blockIdx.x * T * RB,
				e = -1,
				have = -1,		/* the expert whose rows are requested into held */
				first = 0,
				count = 0;
	bool		run = false;
	const uint16_t *A = NULL,
			   *B = NULL;
	uint4		held[NP][RT];
	const float *xr[1];

	if constexpr (PRE)
	{
		run = slot < __ldcg(active) && row0 < rows;
		if (run)
			have = kk_expert_item_l2(active, start, slot, 1, &first, &count);
	}
	else if (by < shared_n && row0 < rows)
		have = shared_e;
	if (have >= 0)
	{
		A = (const uint16_t *) W0[have];
		B = MODE == EXPERT_SWIGLU ? (const uint16_t *) W1[have] : A;
		expert_tile_request<RB, RT, NP>(held, A, B, row0, rows, cols);
		if (!PRE && T > 1 && shared_l2)
			expert_tiles_prefetch<MODE, RB, T>(A, B, row0, rows, cols);
	}
	kk_dep_wait();
	kk_dep_launch();
	if constexpr (PRE)
		e = have;
	else
	{
		/* which expert this slot has depends on the routing kernel before: read it now */
		run = slot < active[0] && row0 < rows;
		if (run)
			e = kk_expert_item(active, start, slot, 1, &first, &count);
	}
	if (!run || count <= 0)
		return;
	if (e != have)
	{
		A = (const uint16_t *) W0[e];
		B = MODE == EXPERT_SWIGLU ? (const uint16_t *) W1[e] : A;
		expert_tile_request<RB, RT, NP>(held, A, B, row0, rows, cols);
	}
	xr[0] = x + (size_t) (xrow ? xrow[first] : first) * ldx;
#pragma unroll 1
	for (int t = 1;; t++, row0 += RB)
	{
		float		acc[RT][1];
		bool		next = t < T && row0 + RB < rows;

#pragma unroll
		for (int w = 0; w < RT; w++)
			acc[w][0] = 0;
		rows_dot_pieces<1, RT, ROWS_BT, NP>(acc, held, xr, cols >> 3);
		/* the next tile's pieces are in flight while this one is summed and stored */
		if (next)
			expert_tile_request<RB, RT, NP>(held, A, B, row0 + RB, rows, cols);
		rows_block_sum<1, RT, ROWS_BT>(acc, sums);
		expert_rows_store<1, MODE == EXPERT_SWIGLU, RT, ROWS_BT>(y, ldy, sums, row0, rows, first);
		if (!next)
			break;
	}
}

/* the tiled kernel for T tiles a block and NP pieces a thread and row (PRE: the down product only) */
template <int MODE, int NP, int T>
static void
expert_tiles_launch_as(cudaStream_t s, bool pre, int max_active, float *y, int ldy, const float *x, int ldx,
					   const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols,
					   const int *start, const int *active, int shared_e, int shared_n, int shared_l2)
{
	constexpr int RB = EXPERT_RB(1, MODE);
	dim3		grid(ceil_div(ceil_div(rows, RB), T), max_active);

	if constexpr (MODE == EXPERT_ONE)
		if (pre)
		{
			kk_launch(expert_tiles_kernel<MODE, RB, NP, T, true>, grid, dim3(ROWS_BT), 0, s, y, ldy, x, ldx, xrow, W0,
					  W1, rows, cols, start, active, shared_e, shared_n, shared_l2);
			return;
		}
	kk_launch(expert_tiles_kernel<MODE, RB, NP, T, false>, grid, dim3(ROWS_BT), 0, s, y, ldy, x, ldx, xrow, W0, W1,
			  rows, cols, start, active, shared_e, shared_n, shared_l2);
}

/* tiles: 1, 2 or 4 a block */
template <int MODE, int NP>
static void
expert_tiles_launch_np(cudaStream_t s, int tiles, bool pre, int max_active, float *y, int ldy, const float *x,
					   int ldx, const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols,
					   const int *start, const int *active, int shared_e, int shared_n, int shared_l2)
{
#define TILES_GO(T) expert_tiles_launch_as<MODE, NP, T>(s, pre, max_active, y, ldy, x, ldx, xrow, W0, W1, rows, cols, \
														start, active, shared_e, shared_n, shared_l2)
	if (tiles >= 4)
		TILES_GO(4);
	else if (tiles == 2)
		TILES_GO(2);
	else
		TILES_GO(1);
#undef TILES_GO
}

/* the most pieces a thread and row the tiled kernel holds (3 x 96 pieces: rows of up to 2304 columns) */
#define EXPERT_TILES_NP 3

/* the tiled kernel for rows of cols columns: NP = the pieces a thread takes of a row */
template <int MODE>
static void
expert_tiles_launch(cudaStream_t s, int tiles, bool pre, int max_active, float *y, int ldy, const float *x, int ldx,
					const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols,
					const int *start, const int *active, int shared_e, int shared_n, int shared_l2)
{
	int			np = (int) ceil_div(cols >> 3, ROWS_BT);

#define NP_GO(NP) expert_tiles_launch_np<MODE, NP>(s, tiles, pre, max_active, y, ldy, x, ldx, xrow, W0, W1, rows, \
												   cols, start, active, shared_e, shared_n, shared_l2)
	if (np <= 1)
		NP_GO(1);
	else if (np == 2)
		NP_GO(2);
	else
		NP_GO(EXPERT_TILES_NP);
#undef NP_GO
}

/* the most input rows of one expert pass (KL_CUDA_EXPERT_NR: 1, 2, 4 or 8) */
int			kk_expert_nr = 4;

/* the rows of one expert pass (and work item) for a step of max_count tokens */
extern "C" int
kk_expert_pass_rows(int max_count)
{
	int			nr = max_count <= 1 ? 1 : max_count <= 2 ? 2 : max_count <= 4 ? 4 : GEMV_MAX_NR;

	return nr < kk_expert_nr ? nr : kk_expert_nr;
}

extern "C" void
kk_set_expert_nr(int nr)
{
	kk_expert_nr = nr == 1 || nr == 2 || nr == 4 || nr == 8 ? nr : 4;
}

/* set by kk_set_expert_preload: the down product reads its work list before kk_dep_wait */
int			kk_expert_preload = 1;

extern "C" int
kk_set_expert_preload(int on)
{
	int			was = kk_expert_preload;

	kk_expert_preload = on;
	return was;
}

/* KL_CUDA_EXPERT_B1 (kk_set_expert_b1): the tiled kernel's tiles a block at one row an item, [0] gate/up
 * (SwiGLU), [1] down (one matrix), 0: expert_rows_kernel; [2] the shared expert's slots guessed: 0 no, 1 their
 * first tile requested before the PDL wait, 2 (with more than one tile a block) their later tiles into L2 too */
int			kk_expert_tiles[3] = {4, 4, 2};

/* 0, 1, 2 or 4 (other values: the next of those below) */
static int
expert_tiles_of(int v)
{
	return v >= 4 ? 4 : v >= 2 ? 2 : v >= 1 ? 1 : 0;
}

extern "C" void
kk_set_expert_b1(int gate_up, int down, int shared)
{
	kk_expert_tiles[0] = expert_tiles_of(gate_up);
	kk_expert_tiles[1] = expert_tiles_of(down);
	kk_expert_tiles[2] = shared < 0 ? 0 : shared > 2 ? 2 : shared;
}

extern "C" int
kk_expert_b1(int which)
{
	return kk_expert_tiles[which < 0 ? 0 : which > 2 ? 2 : which];
}

extern "C" void
kk_expert_gemv(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
			   const void *const *W0, const void *const *W1, int bf16, int rows, int cols, const int *start,
			   const int *active, int max_active, int max_count)
{
	kk_expert_gemv_shared(s, y0, y1, ldy, x, ldx, xrow, W0, W1, bf16, rows, cols, start, active, max_active, max_count,
						  -1, 0);
}

extern "C" void
kk_expert_gemv_shared(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
					  const void *const *W0, const void *const *W1, int bf16, int rows, int cols, const int *start,
					  const int *active, int max_active, int max_count, int shared_e, int shared_n)
{
	/* expert matrices are separate allocations (256-byte aligned) */
	bool		vec = cols % 8 == 0 && ldx % 4 == 0 && ((uintptr_t) x & 15) == 0;
	bool		swiglu = W1 && !y1;
	int			mode = !W1 ? EXPERT_ONE : swiglu ? EXPERT_SWIGLU : EXPERT_TWO;
	dim3		grid(ceil_div(rows, GEMV_WARPS) * (mode == EXPERT_TWO ? 2 : 1), max_active);

	if (max_active <= 0)
		return;
	/*
	 * Passes of at most kk_expert_nr rows: a kernel holding 8 rows' sums for
	 * every weight piece has twice the registers (half the resident warps),
	 * and at batch 64 an expert has ~2.3 tokens on average; the results are
	 * the same (each row's sum is made the same way in any pass size).
	 */
	max_count = kk_expert_pass_rows(max_count);
	if (bf16 && vec && kk_gemv_rows)
	{
		int			tiles = kk_expert_tiles[mode == EXPERT_ONE];

		if (max_count == 1 && tiles > 0 && mode != EXPERT_TWO && (cols >> 3) <= EXPERT_TILES_NP * ROWS_BT)
		{
			int			l2 = kk_expert_tiles[2] == 2;

			/* (no guess without a shared expert's slots in the list) */
			if (kk_expert_tiles[2] == 0 || shared_e < 0 || shared_n <= 0 || shared_n > max_active)
				shared_n = 0;
			if (mode == EXPERT_ONE)
				expert_tiles_launch<EXPERT_ONE>(s, tiles, kk_expert_preload != 0, max_active, y0, ldy, x, ldx, xrow,
												W0, W1, rows, cols, start, active, shared_e, shared_n, l2);
			else
				expert_tiles_launch<EXPERT_SWIGLU>(s, tiles, false, max_active, y0, ldy, x, ldx, xrow, W0, W1, rows,
												   cols, start, active, shared_e, shared_n, l2);
			return;
		}
		if (mode == EXPERT_ONE)
			/* the early read only at one token an item: it won 0.04 ms a step at
			 * batch 1 and lost 0.12 ms at batch 4 on the H200 (bench/notes-cuda.md) */
			expert_rows_dispatch<EXPERT_ONE>(s, kk_expert_preload != 0 && max_count == 1, max_count, max_active, y0,
											 y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active);
		else if (mode == EXPERT_TWO)
			expert_rows_dispatch<EXPERT_TWO>(s, false, max_count, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, rows,
											 cols, start, active);
		else
			expert_rows_dispatch<EXPERT_SWIGLU>(s, false, max_count, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1,
												rows, cols, start, active);
		return;
	}
#define DISPATCH(M) \
	do { \
		if (bf16) \
			expert_dispatch<true, M>(s, max_count, grid, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active, vec); \
		else \
			expert_dispatch<false, M>(s, max_count, grid, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active, vec); \
	} while (0)
	if (mode == EXPERT_ONE)
		DISPATCH(EXPERT_ONE);
	else if (mode == EXPERT_TWO)
		DISPATCH(EXPERT_TWO);
	else
		DISPATCH(EXPERT_SWIGLU);
#undef DISPATCH
}

/* ------------------------------------------------------------------ test hook */

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): kk_gemv of one input row in the block-rows design, early form,
 * with rb weight rows a block of the wide shape (kk_set_rows_wide1(rb)), on
 * the current device with a stream of its own: W [rows, cols] bf16 random
 * (seed; standard deviation 0.02), x [cols] fp32 random (seed + 1); y
 * [rows] comes back (set to NaN before the launch, so that rows no block
 * wrote show).  The switches it sets are put back.  Returns 0, -1 for bad
 * arguments, or a CUDA error code.
 */
extern "C" __attribute__((visibility("default"))) int
kl_cuda_test_rows_wide1(int rows, int cols, int rb, unsigned long long seed, float *y)
{
	cudaStream_t s = NULL;
	cudaError_t e;
	uint16_t   *W = NULL;
	float	   *x = NULL;
	int			was_rb = kk_rows_wide1,
				was_early = kk_rows_early,
				was_rows = kk_gemv_rows;

	if (rows <= 0 || cols <= 0 || cols % 8 != 0)
		return -1;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &W, sizeof(uint16_t) * (size_t) rows * cols)) != cudaSuccess ||
		(e = cudaMalloc((void **) &x, sizeof(float) * ((size_t) cols + rows))) != cudaSuccess)
		goto out;
	kk_fill_random(s, W, 1, (size_t) rows * cols, seed, 0.02f);
	kk_fill_random(s, x, 0, cols, seed + 1, 1.0f);
	if ((e = cudaMemsetAsync(x + cols, 0xff, sizeof(float) * rows, s)) != cudaSuccess)
		goto out;
	kk_set_rows_wide1(rb);
	kk_rows_early = 1;
	kk_gemv_rows = 1;
	kk_gemv(s, x + cols, rows, x, cols, 1, W, 1, rows, cols);
	kk_rows_wide1 = was_rb;
	kk_rows_early = was_early;
	kk_gemv_rows = was_rows;
	if ((e = cudaGetLastError()) != cudaSuccess ||
		(e = cudaMemcpyAsync(y, x + cols, sizeof(float) * rows, cudaMemcpyDeviceToHost, s)) != cudaSuccess)
		goto out;
	e = cudaStreamSynchronize(s);
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(W);
	cudaFree(x);
	if (s)
		cudaStreamDestroy(s);
	return (int) e;
}
