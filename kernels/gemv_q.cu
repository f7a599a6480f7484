/*
 * gemv_q.cu — decode products y = x W^T of quantized weights (FP8 E4M3,
 * int8, int4: kernels.h "Quantized weights on the device") with fp32
 * activations and fp32 arithmetic, on the CUDA cores: every decode product
 * of the fp32 precision mode and the small-batch ones of the bf16 mode.
 *
 * Design: gemv.cu's block rows.  A block of BT threads takes RB consecutive
 * weight rows; thread t reads the 16-byte pieces t, t + BT, ... of each of
 * them (16 FP8 / int8 weights or 32 int4 weights a piece), so the block
 * reads its rows front to back as a copy does, and the next piece of every
 * row is in flight while the current ones are used.  The first pieces are
 * requested before kk_dep_wait (weights are never written by kernels): one
 * a thread and row, or for products of 2 input rows (KL_CUDA_ROWS_EARLY)
 * up to 3 (q_np: whole rows at the 48B model's 2304 and 4096 columns), and
 * of 1 in the launches KL_CUDA_Q_EARLY1 picks.
 * Each input piece (fp32, through the read-only cache) is loaded once for
 * all RB rows; partial sums are reduced over the block in a fixed order.
 *
 * Decoding, exact in every case (quant.h's values):
 *   FP8  sm_89 and later: cvt.rn.f16x2.e4m3x2 (two weights an instruction)
 *        then the exact f16 -> f32 widening; before (compute_80 PTX): the
 *        byte's sign, exponent and mantissa moved into an f16, whose value is
 *        then the weight times 2^-8 (subnormals included), the 2^8 folded
 *        into the scale;
 *   int8 the byte (sign flipped: q + 128) as the low mantissa of 2^23, minus
 *        2^23 + 128;
 *   int4 the nibble (q + 8) likewise, minus 2^23 + 8.
 * A 16-byte piece never straddles a scale group (groups are cols or a
 * multiple of 16 / 32 columns), so each piece's dot product is computed
 * unscaled and added times its group's scale.  The piece's group is found
 * with a multiply-high by a reciprocal of the pieces a group holds (exact
 * for the 16-bit piece and group counts of any model), not a division.
 *
 * Shapes that are not multiples of a piece, or unaligned activations, take a
 * scalar path computing each weight as fl(q * scale) as quant.h does.
 * kk_gemv_multi_q jobs may also be bf16 or fp32 matrices (pieces of 8 and 4
 * columns), so a layer's projections are one launch whatever their formats.
 */
#include <string.h>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define Q_FP8_HW 1
#else
#define Q_FP8_HW 0
#endif

#define Q_MAX_NR 8				/* input rows per pass */

/* columns in a 16-byte piece of each format */
template <int FMT>
struct q_fmt
{
	static constexpr int cols = FMT == KK_WF_INT4 ? 32 : FMT == KK_WF_BF16 ? 8 : FMT == KK_WF_F32 ? 4 : 16;
	static constexpr int wc = cols / 4;	/* columns of each 32-bit word */
	static constexpr bool quant = FMT >= KK_WF_FP8;
};

/* columns of a piece at run time */
__host__ __device__ static inline int
q_piece_cols(int fmt)
{
	return fmt == KK_WF_INT4 ? 32 : fmt == KK_WF_BF16 ? 8 : fmt == KK_WF_F32 ? 4 : 16;
}

/*
 * The factor the decoded FP8 values carry (the f16 shift gives the weight
 * times 2^-8): the kernels multiply the scale by its inverse, 256 there.
 * Exact, as |scale| < 256 (kl_q_validate).
 */
__device__ __forceinline__ float
q_scale_factor(int fmt)
{
	return fmt == KK_WF_FP8 && !Q_FP8_HW ? 256.0f : 1.0f;
}

/* two f16 (a 32-bit word) to two floats, exactly */
__device__ __forceinline__ void
q_h2_to_f2(uint32_t h, float *f)
{
	unsigned short lo = (unsigned short) (h & 0xffffu),
				hi = (unsigned short) (h >> 16);

	asm("cvt.f32.f16 %0, %1;" : "=f"(f[0]) : "h"(lo));
	asm("cvt.f32.f16 %0, %1;" : "=f"(f[1]) : "h"(hi));
}

/*
 * The four FP8 weights of word v (column order: byte 0 first) as floats:
 * their values (hardware conversion) or their values times 2^-8.
 */
__device__ __forceinline__ void
q_fp8_word(uint32_t v, float *f)
{
	uint32_t	h01,
				h23;

#if Q_FP8_HW
	{
		unsigned short lo = (unsigned short) (v & 0xffffu),
					hi = (unsigned short) (v >> 16);

		asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h01) : "h"(lo));
		asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h23) : "h"(hi));
	}
#else
	{
		/* byte b to bits 8-15 of a half: sign stays at bit 15, the seven
		 * exponent and mantissa bits go one right (exponent 4 bits into
		 * the f16's 5, mantissa 3 into the top of its 10): value * 2^-8 */
		uint32_t	t01 = __byte_perm(v, 0, 0x1404),
					t23 = __byte_perm(v, 0, 0x3424);

		h01 = (t01 & 0x80008000u) | ((t01 >> 1) & 0x3f803f80u);
		h23 = (t23 & 0x80008000u) | ((t23 >> 1) & 0x3f803f80u);
	}
#endif
	q_h2_to_f2(h01, f);
	q_h2_to_f2(h23, f + 2);
}

/* byte k of u as the low mantissa byte of 2^23 (k a constant: one byte permute) */
#define Q_MAGIC_BYTE(u, k) __uint_as_float(__byte_perm((u), 0x4B000000u, 0x7440u | (k)))

/* four int8 weights (q) of word v */
__device__ __forceinline__ void
q_int8_word(uint32_t v, float *f)
{
	uint32_t	u = v ^ 0x80808080u;	/* q + 128, unsigned */

	f[0] = Q_MAGIC_BYTE(u, 0) - 8388736.0f;
	f[1] = Q_MAGIC_BYTE(u, 1) - 8388736.0f;
	f[2] = Q_MAGIC_BYTE(u, 2) - 8388736.0f;
	f[3] = Q_MAGIC_BYTE(u, 3) - 8388736.0f;
}

/* eight int4 weights (q) of word v: column 2k is the low nibble of byte k */
__device__ __forceinline__ void
q_int4_word(uint32_t v, float *f)
{
	uint32_t	lo = v & 0x0f0f0f0fu,
				hi = (v >> 4) & 0x0f0f0f0fu;

	f[0] = Q_MAGIC_BYTE(lo, 0) - 8388616.0f;
	f[1] = Q_MAGIC_BYTE(hi, 0) - 8388616.0f;
	f[2] = Q_MAGIC_BYTE(lo, 1) - 8388616.0f;
	f[3] = Q_MAGIC_BYTE(hi, 1) - 8388616.0f;
	f[4] = Q_MAGIC_BYTE(lo, 2) - 8388616.0f;
	f[5] = Q_MAGIC_BYTE(hi, 2) - 8388616.0f;
	f[6] = Q_MAGIC_BYTE(lo, 3) - 8388616.0f;
	f[7] = Q_MAGIC_BYTE(hi, 3) - 8388616.0f;
}

/* the q_fmt<FMT>::wc weights of word v, in column order */
template <int FMT>
__device__ __forceinline__ void
q_decode_word(uint32_t v, float *f)
{
	if constexpr (FMT == KK_WF_FP8)
		q_fp8_word(v, f);
	else if constexpr (FMT == KK_WF_INT8)
		q_int8_word(v, f);
	else if constexpr (FMT == KK_WF_INT4)
		q_int4_word(v, f);
	else if constexpr (FMT == KK_WF_BF16)
	{
		f[0] = __uint_as_float(v << 16);
		f[1] = __uint_as_float(v & 0xffff0000u);
	}
	else
		f[0] = __uint_as_float(v);
}

/* the wc activations of word k of piece ch (xp: a row's start) */
template <int WC>
__device__ __forceinline__ void
q_load_x(const float *xp, int col, float *a)
{
	if constexpr (WC >= 4)
	{
#pragma unroll
		for (int i = 0; i < WC / 4; i++)
		{
			float4		v = __ldg((const float4 *) (xp + col) + i);

			a[4 * i] = v.x;
			a[4 * i + 1] = v.y;
			a[4 * i + 2] = v.z;
			a[4 * i + 3] = v.w;
		}
	}
	else if constexpr (WC == 2)
	{
		float2		v = __ldg((const float2 *) (xp + col));

		a[0] = v.x;
		a[1] = v.y;
	}
	else
		a[0] = __ldg(xp + col);
}

/* one weight (r, c) of a row as quant.h computes it: fl(value(q) * scale); bf16 / fp32 as stored */
__device__ __forceinline__ float
q_weight(int fmt, const uint8_t *row, const float *sc, int c, int group)
{
	switch (fmt)
	{
		case KK_WF_F32:
			return ((const float *) row)[c];
		case KK_WF_BF16:
			return bf16_to_f32(((const uint16_t *) row)[c]);
		case KK_WF_INT8:
			return (float) (int8_t) row[c] * sc[c / group];
		case KK_WF_INT4:
			return (float) ((int) ((row[c >> 1] >> ((c & 1) * 4)) & 15) - 8) * sc[c / group];
		default:
			{
				/* FP8 through the same f16 shift as the vector path; the 2^8 applied exactly */
				uint32_t	b = row[c];
				uint32_t	h = ((b & 0x80u) << 8) | ((b & 0x7fu) << 7);
				float		f;

				asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short) h));
				return f * 256.0f * sc[c / group];
			}
	}
}

/*
 * The weight rows a block works on: Wr[w] row w's bytes (NULL past the
 * matrix), sc[w] its scales (quantized formats); gmul: the multiplier that
 * turns a piece index into its group index (0: one scale a row).
 */
template <int RB>
struct q_rows
{
	const uint8_t *Wr[RB];
	const float *sc[RB];
	unsigned	gmul;
	bool		gone;			/* one piece a group: the group is the piece */
	int			cols,
				group,
				fmt;
};

/*
 * Rows [row0, row0 + RB) of the quantized matrix W (fmt, group, rows, cols)
 * into R (with W1 given: the first HALF rows from W, the rest from W1 at the
 * same rows: SwiGLU's gate and up).
 */
template <int RB>
__device__ __forceinline__ void
q_rows_init(q_rows<RB> &R, const void *W, const void *W1, int half, int fmt, int group, int rows, int cols, int row0)
{
	size_t		rb = kk_q_row_bytes(fmt, cols);
	size_t		so = kk_q_scale_offset(rows, fmt, cols);
	int			ng = (cols + group - 1) / group;
	int			pc = q_piece_cols(fmt);

	R.cols = cols;
	R.group = group;
	R.fmt = fmt;
	/*
	 * gp pieces a group: with gmul = floor(2^32 / gp) + 1, umulhi(ch, gmul) =
	 * floor(ch / gp) whenever ch gp < 2^32 (any real shape); gp 1 would need
	 * 2^32 + 1, so it has its flag; gmul 0: one scale a row (group 0)
	 */
	R.gone = fmt >= KK_WF_FP8 && group < cols && group == pc;
	R.gmul = group >= cols || fmt < KK_WF_FP8 || R.gone ? 0u : 0xffffffffu / (unsigned) (group / pc) + 1u;
#pragma unroll
	for (int w = 0; w < RB; w++)
	{
		const uint8_t *base = (const uint8_t *) (W1 && w >= half ? W1 : W);
		int			row = row0 + (W1 ? w % half : w);

		R.Wr[w] = row < rows ? base + (size_t) row * rb : NULL;
		R.sc[w] = row < rows ? (const float *) (base + so) + (size_t) row * ng : NULL;
	}
}

/*
 * This thread's pieces threadIdx.x + p BT (p < NP) of the rows, zeros past
 * the rows or the matrix: the first NP pieces, requested before kk_dep_wait
 * (weights only; NP > 1: gemv_q_kernel's early form, Q_EARLY_NR).
 */
template <int NP, int RB, int BT>
__device__ __forceinline__ void
q_rows_first(uint4 (&held)[NP][RB], const q_rows<RB> &R, int nch)
{
#pragma unroll
	for (int p = 0; p < NP; p++)
	{
		int			ch = (int) threadIdx.x + p * BT;

#pragma unroll
		for (int w = 0; w < RB; w++)
			held[p][w] = R.Wr[w] && ch < nch ? __ldg((const uint4 *) R.Wr[w] + (unsigned) ch) : make_uint4(0, 0, 0, 0);
	}
}

/*
 * acc[w][r] += W_w . x_r over piece ch of the rows, held in raw (the step of
 * q_rows_dot and q_rows_dot_held): the piece's dot product unscaled, then
 * added times its group's scale.  NEXT: raw then takes piece ch + BT (zeros
 * past the rows), in flight while this one is used.  Word k of every row's
 * piece is decoded once and used for all NR input rows; the input words
 * once for all RB weight rows.
 */
template <int FMT, int NR, int RB, int BT, bool NEXT>
__device__ __forceinline__ void
q_rows_step(float (&acc)[RB][NR], uint4 (&raw)[RB], const q_rows<RB> &R, const float *const (&xr)[NR], int ch,
			int nch)
{
	constexpr int PC = q_fmt<FMT>::cols,
				WC = q_fmt<FMT>::wc;
	float		sfac = q_scale_factor(FMT);
	uint4		cur[RB];
	float		pd[RB][NR];
	int			g = R.gone ? ch : (int) __umulhi((unsigned) ch, R.gmul);

#pragma unroll
	for (int w = 0; w < RB; w++)
	{
		cur[w] = raw[w];
		if constexpr (NEXT)
			raw[w] = R.Wr[w] && ch + BT < nch ? __ldg((const uint4 *) R.Wr[w] + ch + BT) : make_uint4(0, 0, 0, 0);
#pragma unroll
		for (int r = 0; r < NR; r++)
			pd[w][r] = 0;
	}
#pragma unroll
	for (int k = 0; k < 4; k++)
	{
		float		xa[NR][WC];

#pragma unroll
		for (int r = 0; r < NR; r++)
			q_load_x<WC>(xr[r], ch * PC + k * WC, xa[r]);
#pragma unroll
		for (int w = 0; w < RB; w++)
		{
			float		f[WC];
			uint32_t	v = k == 0 ? cur[w].x : k == 1 ? cur[w].y : k == 2 ? cur[w].z : cur[w].w;

			q_decode_word<FMT>(v, f);
#pragma unroll
			for (int r = 0; r < NR; r++)
#pragma unroll
				for (int i = 0; i < WC; i++)
					pd[w][r] = fmaf(f[i], xa[r][i], pd[w][r]);
		}
	}
#pragma unroll
	for (int w = 0; w < RB; w++)
	{
		float		s = 1.0f;

		if (q_fmt<FMT>::quant && R.Wr[w])
			s = __ldg(R.sc[w] + g) * sfac;
#pragma unroll
		for (int r = 0; r < NR; r++)
			acc[w][r] = fmaf(pd[w][r], s, acc[w][r]);
	}
}

/*
 * acc[w][r] += W_w . x_r over this thread's pieces ch0, ch0 + BT, ... (ch0:
 * threadIdx.x unless q_rows_dot_held took the first ones) of the nch pieces
 * of each row, raw holding piece ch0.
 */
template <int FMT, int NR, int RB, int BT>
__device__ __forceinline__ void
q_rows_dot(float (&acc)[RB][NR], uint4 (&raw)[RB], const q_rows<RB> &R, const float *const (&xr)[NR], int nch,
		   int ch0 = threadIdx.x)
{
	for (int ch = ch0; ch < nch; ch += BT)
		q_rows_step<FMT, NR, RB, BT, true>(acc, raw, R, xr, ch, nch);
}

/*
 * q_rows_dot with this thread's first NP pieces already in held
 * (q_rows_first<NP>): the piece after them is requested first, so it is in
 * flight while they are used; then they are summed and the rest streamed as
 * q_rows_dot does.  Piece by piece in q_rows_dot's order: the same bits.
 */
template <int FMT, int NR, int RB, int BT, int NP>
__device__ __forceinline__ void
q_rows_dot_held(float (&acc)[RB][NR], uint4 (&held)[NP][RB], const q_rows<RB> &R,
				const float *const (&xr)[NR], int nch)
{
	int			ch0 = (int) threadIdx.x + NP * BT;
	uint4		raw[RB];

#pragma unroll
	for (int w = 0; w < RB; w++)
		raw[w] = R.Wr[w] && ch0 < nch ? __ldg((const uint4 *) R.Wr[w] + ch0) : make_uint4(0, 0, 0, 0);
#pragma unroll
	for (int p = 0; p < NP; p++)
		if ((int) threadIdx.x + p * BT < nch)
			q_rows_step<FMT, NR, RB, BT, false>(acc, held[p], R, xr, (int) threadIdx.x + p * BT, nch);
	q_rows_dot<FMT, NR, RB, BT>(acc, raw, R, xr, nch, ch0);
}

/* the sums of the rows from the NP pieces in held: q_rows_dot (NP 1: held[0] is its raw) or q_rows_dot_held */
template <int FMT, int NR, int RB, int BT, int NP>
__device__ __forceinline__ void
q_rows_dot_np(float (&acc)[RB][NR], uint4 (&held)[NP][RB], const q_rows<RB> &R, const float *const (&xr)[NR],
			  int nch)
{
	if constexpr (NP == 1)
		q_rows_dot<FMT, NR, RB, BT>(acc, held[0], R, xr, nch);
	else
		q_rows_dot_held<FMT, NR, RB, BT, NP>(acc, held, R, xr, nch);
}

/* the scalar path: any shape, any alignment (each weight fl(q * scale)) */
template <int NR, int RB, int BT>
__device__ __forceinline__ void
q_rows_scalar(float (&acc)[RB][NR], const q_rows<RB> &R, const float *const (&xr)[NR])
{
	for (int c = threadIdx.x; c < R.cols; c += BT)
	{
		float		xv[NR];

#pragma unroll
		for (int r = 0; r < NR; r++)
			xv[r] = xr[r][c];
#pragma unroll
		for (int w = 0; w < RB; w++)
			if (R.Wr[w])
			{
				float		wv = q_weight(R.fmt, R.Wr[w], R.sc[w], c, R.group);

#pragma unroll
				for (int r = 0; r < NR; r++)
					acc[w][r] = fmaf(wv, xv[r], acc[w][r]);
			}
	}
}

/* the vector path of the format the block's rows have (fmt is uniform over the block) */
template <int NR, int RB, int BT, int NP>
__device__ __forceinline__ void
q_rows_dot_any(float (&acc)[RB][NR], uint4 (&held)[NP][RB], const q_rows<RB> &R, const float *const (&xr)[NR],
			   int nch)
{
	switch (R.fmt)
	{
		case KK_WF_FP8:
			q_rows_dot_np<KK_WF_FP8, NR, RB, BT, NP>(acc, held, R, xr, nch);
			break;
		case KK_WF_INT8:
			q_rows_dot_np<KK_WF_INT8, NR, RB, BT, NP>(acc, held, R, xr, nch);
			break;
		case KK_WF_INT4:
			q_rows_dot_np<KK_WF_INT4, NR, RB, BT, NP>(acc, held, R, xr, nch);
			break;
		case KK_WF_BF16:
			q_rows_dot_np<KK_WF_BF16, NR, RB, BT, NP>(acc, held, R, xr, nch);
			break;
		default:
			q_rows_dot_np<KK_WF_F32, NR, RB, BT, NP>(acc, held, R, xr, nch);
			break;
	}
}

/*
 * sums[w * NR + r] = W_w . x_r for the block's rows (x rows xr): the vector
 * path where vec (held already holds this thread's first NP pieces when
 * LOADED), else the scalar one.  FMT: the format, or -1 for the one R.fmt
 * names.
 */
template <int FMT, int NR, int RB, int BT, int NP>
__device__ __forceinline__ void
q_rows_sums(const q_rows<RB> &R, uint4 (&held)[NP][RB], bool vec, bool loaded, const float *const (&xr)[NR],
			float *sums)
{
	float		acc[RB][NR];
	int			nch = vec ? R.cols / q_piece_cols(R.fmt) : 0;

#pragma unroll
	for (int w = 0; w < RB; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
			acc[w][r] = 0;
	if (vec)
	{
		if (!loaded)
			q_rows_first<NP, RB, BT>(held, R, nch);
		if constexpr (FMT < 0)
			q_rows_dot_any<NR, RB, BT, NP>(acc, held, R, xr, nch);
		else
			q_rows_dot_np<FMT, NR, RB, BT, NP>(acc, held, R, xr, nch);
	}
	else
		q_rows_scalar<NR, RB, BT>(acc, R, xr);
	rows_block_sum<NR, RB, BT>(acc, sums);
}

/* ------------------------------------------------------------------ plain and batched */

/*
 * Block (b, pass): RB rows of the job whose range of blocks holds b, input
 * rows pass * NR .. (grid.y: passes of NR rows, for kk_gemv_q's n > 8).
 * The first NP pieces a thread of each row are requested before kk_dep_wait
 * (NP > 1: the early form, Q_EARLY_NR; the same sums in the same order).
 */
template <int NR, int RB, int BT, int NP>
__global__ void __launch_bounds__(BT)
gemv_q_kernel(kk_gemv_batch b)
{
	__shared__ float sums[RB * NR];
	int			j = kk_batch_job(b);
	const kk_gemv_job *jb = &b.job[j];
	int			row0 = ((int) blockIdx.x - b.first_block[j]) * RB;
	bool		vec = jb->vec != 0;
	q_rows<RB>	R;
	uint4		held[NP][RB];
	const float *xr[NR];
	float	   *y = jb->y + (size_t) blockIdx.y * NR * jb->ldy;

	q_rows_init<RB>(R, jb->W, NULL, RB, jb->fmt, jb->group, jb->rows, jb->cols, row0);
	if (vec)
		q_rows_first<NP, RB, BT>(held, R, jb->cols / q_piece_cols(jb->fmt));
	kk_dep_wait();
	kk_dep_launch();
#pragma unroll
	for (int r = 0; r < NR; r++)
		xr[r] = jb->x + (size_t) (blockIdx.y * NR + r) * jb->ldx;
	q_rows_sums<-1, NR, RB, BT, NP>(R, held, vec, true, xr, sums);
	for (int i = threadIdx.x; i < RB * NR; i += BT)
		if (row0 + i / NR < jb->rows)
			y[(size_t) (i % NR) * jb->ldy + row0 + i / NR] = sums[i];
}

/*
 * Threads and rows a block for rows of `pieces` 16-byte pieces: 64 threads
 * for the 48B model's 1024-2304-column FP8 / int8 rows (64-144 pieces: 1-3
 * a thread and row), 128 from 256 pieces (the bf16 kernel's wide shape), 32
 * for short rows (int4 1024 columns: 32 pieces).  Rows a block (q_rb): as
 * many as keep several pieces in flight a thread at one or two input rows
 * (8, 4, 2), fewer for more input rows, whose sums take the registers.
 */
#define Q_SHAPE_SHORT 0			/* 32 threads */
#define Q_SHAPE_MID 1			/* 64 threads */
#define Q_SHAPE_WIDE 2			/* 128 threads */

static int
q_shape(int pieces)
{
	return pieces >= 256 ? Q_SHAPE_WIDE : pieces > 48 ? Q_SHAPE_MID : Q_SHAPE_SHORT;
}

__host__ __device__ constexpr int
q_bt(int shape)
{
	return shape == Q_SHAPE_WIDE ? 128 : shape == Q_SHAPE_MID ? 64 : 32;
}

/* weight rows a block (of each matrix for SwiGLU, which holds twice as many) */
__host__ __device__ constexpr int
q_rb(int shape, int nr, bool swiglu)
{
	return (shape == Q_SHAPE_WIDE ? (nr <= 4 ? 2 : 1) : shape == Q_SHAPE_MID ? (nr <= 4 ? 4 : 2)
			: (nr <= 2 ? 8 : nr <= 4 ? 4 : 2)) / (swiglu && shape != Q_SHAPE_WIDE ? 2 : 1);
}

/*
 * The early form (gemv.cu's kk_rows_early: KL_CUDA_ROWS_EARLY, default on,
 * which covers these kernels too): products of Q_EARLY_NR = 2 input rows
 * (at 1 only as KL_CUDA_Q_EARLY1 says, below: there the 64-thread early
 * kernel takes 128 registers instead of 64, half the blocks an SM, and the
 * FP8 step at batch 1 lost 0.02 ms on the H200 with it in every launch
 * while batch 2 gained 0.03, 2026-12-02; not 4: gemv.cu's
 * ROWS_EARLY_NR, the held pieces cost more than they save) request q_np(shape) pieces a
 * thread of each of the block's rows before kk_dep_wait, not one: the whole
 * row for the 48B model's FP8 rows of 2304 columns (144 pieces, 64 threads:
 * 3) and 4096 (256, 128 threads: 2), so a product that starts under a
 * latency-bound kernel (the KDA decode kernel before o_proj, the norms before
 * the products of x) has its weights on chip when its input arrives.  The
 * short shape (32 threads, at most 48 pieces: int4 1024 columns, FP8 512)
 * holds one piece, which is already the whole row at 32 pieces.
 */
#define Q_EARLY_NR 2

extern int	kk_rows_early;

__host__ __device__ constexpr int
q_np(int shape)
{
	return shape == Q_SHAPE_WIDE ? 2 : shape == Q_SHAPE_MID ? 3 : 1;
}

/*
 * set by kk_gemv_q_force_shape (gemv_sweep, the backend's KL_CUDA_Q_SHAPE):
 * a block shape for every launch (0-2), -1: by the widest rows of a batch,
 * Q_SHAPE_BY_BYTES: by the rows of the job with the most weight bytes
 */
#define Q_SHAPE_BY_BYTES 3
static int q_forced_shape = -1;

extern "C" void
kk_gemv_q_force_shape(int shape)
{
	q_forced_shape = shape;
}

/*
 * KL_CUDA_Q_EARLY1 (kk_set_q_early1; only with kk_rows_early on): the early
 * form at one input row too, in the launches its first wave covers.  0 (the
 * default): never (the rule above; FP8 48B batch 1 on the H200, 2026-12-03:
 * 2.034 ms a step against 2.055 with 1 and 2.079 with 2, one round); 1: where the launch's blocks fit one wave of
 * the early kernel (the GPU's SMs times its blocks an SM, from the occupancy
 * calculator): at the 48B shapes the wide shape's products (o_proj: 1152
 * blocks of 128 threads at 48 registers, 10 an SM; the dense down product),
 * whose whole matrix is then requested before the wait as the bf16 o_proj's
 * is, while lm_head (40960 blocks), q/k/v (3144) and MLA's q + kv_a (1680) of
 * the 64-thread shape (128 registers early: 8 an SM) keep the plain kernel,
 * where the early one's halved residency over several waves cost more than
 * its first wave's early rows saved; 2: every one-row launch of the wide and
 * 64-thread shapes (the form that lost 0.02 ms a step in 2026-12-02's
 * measurement).  The same sums in the same order either way.
 */
int			kk_q_early1 = 0;

/* the early kernels' first waves at one row, by shape (q_wave_blocks; set with kk_q_early1, before any launch
 * or capture: 0 where not known, which keeps the plain kernel) */
static int	q_wave1[3];

/* blocks of kern (bt threads) that the GPU holds at once: one wave; 0 when not known */
template <typename K>
static int
q_wave_blocks(K kern, int bt)
{
	int			dev = 0,
				sms = 0,
				per = 0;

	if (cudaGetDevice(&dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
		cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kern, bt, 0) != cudaSuccess)
	{
		cudaGetLastError();
		return 0;
	}
	return sms * per;
}

/* (the backend calls it when it is made, on its device) */
extern "C" void
kk_set_q_early1(int mode)
{
	kk_q_early1 = mode < 0 ? 0 : mode > 2 ? 2 : mode;
	if (kk_q_early1 != 1)
		return;					/* (the waves matter only to form 1) */
	q_wave1[Q_SHAPE_WIDE] =
		q_wave_blocks(gemv_q_kernel<1, q_rb(Q_SHAPE_WIDE, 1, false), q_bt(Q_SHAPE_WIDE), q_np(Q_SHAPE_WIDE)>,
					  q_bt(Q_SHAPE_WIDE));
	q_wave1[Q_SHAPE_MID] =
		q_wave_blocks(gemv_q_kernel<1, q_rb(Q_SHAPE_MID, 1, false), q_bt(Q_SHAPE_MID), q_np(Q_SHAPE_MID)>,
					  q_bt(Q_SHAPE_MID));
}

/* whether a one-row launch of `blocks` blocks in shape takes the early form (kk_q_early1) */
static bool
q_early1_takes(int shape, int blocks)
{
	return kk_q_early1 >= 2 || (kk_q_early1 == 1 && blocks <= q_wave1[shape]);
}

/* gemv_q_kernel in shape SH for passes of NR rows: the early form (q_np(SH) pieces) where early and NR <= 2 */
template <int NR, int SH>
static void
gemv_q_go(cudaStream_t s, const kk_gemv_batch *b, int passes, bool early)
{
	dim3		grid(b->first_block[b->count], passes);

	if constexpr (NR <= Q_EARLY_NR && q_np(SH) > 1)
		if (early)
		{
			kk_launch(gemv_q_kernel<NR, q_rb(SH, NR, false), q_bt(SH), q_np(SH)>, grid, dim3(q_bt(SH)), 0, s, *b);
			return;
		}
	kk_launch(gemv_q_kernel<NR, q_rb(SH, NR, false), q_bt(SH), 1>, grid, dim3(q_bt(SH)), 0, s, *b);
}

template <int NR>
static void
gemv_q_launch_nr(cudaStream_t s, const kk_gemv_batch *b, int shape, int passes)
{
	bool		early = kk_rows_early &&
		(NR == Q_EARLY_NR || (NR == 1 && q_early1_takes(shape, b->first_block[b->count])));

	if (shape == Q_SHAPE_WIDE)
		gemv_q_go<NR, Q_SHAPE_WIDE>(s, b, passes, early);
	else if (shape == Q_SHAPE_MID)
		gemv_q_go<NR, Q_SHAPE_MID>(s, b, passes, early);
	else
		gemv_q_go<NR, Q_SHAPE_SHORT>(s, b, passes, false);
}

/* the vector path's conditions for a job: whole pieces, 16-byte aligned weights and activation rows */
static bool
q_vec_ok(const kk_gemv_job *jb)
{
	int			pc = q_piece_cols(jb->fmt);

	return jb->cols % pc == 0 && jb->ldx % 4 == 0 && ((uintptr_t) jb->x & 15) == 0 && ((uintptr_t) jb->W & 15) == 0;
}

/*
 * Launch b (nr rows a pass, `passes` passes) with the block shape of its
 * widest rows; sets each job's vec and group (0: cols) and the block ranges.
 */
static void
gemv_q_launch(cudaStream_t s, kk_gemv_batch *b, int nr, int passes)
{
	size_t		heavy_bytes = 0;
	int			most = 0,
				heavy = 0,
				shape,
				rb,
				blocks = 0;

	for (int j = 0; j < b->count; j++)
	{
		kk_gemv_job *jb = &b->job[j];
		int			pieces = jb->cols / q_piece_cols(jb->fmt);

		if (jb->group <= 0 || jb->group > jb->cols)
			jb->group = jb->cols;
		size_t		bytes = kk_q_row_bytes(jb->fmt, jb->cols) * (size_t) jb->rows;

		jb->vec = q_vec_ok(jb);
		most = pieces > most ? pieces : most;
		if (bytes > heavy_bytes)
		{
			heavy_bytes = bytes;
			heavy = pieces;
		}
	}
	shape = q_forced_shape == Q_SHAPE_BY_BYTES ? q_shape(heavy) : q_forced_shape >= 0 ? q_forced_shape : q_shape(most);
	rb = q_rb(shape, nr, false);
	for (int j = 0; j < b->count; j++)
	{
		b->first_block[j] = blocks;
		blocks += ceil_div(b->job[j].rows, rb);
	}
	b->first_block[b->count] = blocks;
	switch (nr)
	{
#define CASE(N) case N: gemv_q_launch_nr<N>(s, b, shape, passes); break;
			CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
	}
}

extern "C" void
kk_gemv_q(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int fmt, int group,
		  int rows, int cols)
{
	kk_gemv_batch b;
	int			full = n / Q_MAX_NR;

	if (n <= 0 || rows <= 0 || cols <= 0)
		return;
	kk_one_job(&b, y, ldy, x, ldx, n, W, fmt, group, rows, cols);
	/* the full passes of 8 rows in one launch (grid.y), then the rest */
	if (full > 0)
	{
		b.n = Q_MAX_NR;
		gemv_q_launch(s, &b, Q_MAX_NR, full);
	}
	if (n > full * Q_MAX_NR)
	{
		b.job[0].y = y + (size_t) full * Q_MAX_NR * ldy;
		b.job[0].x = x + (size_t) full * Q_MAX_NR * ldx;
		b.n = n - full * Q_MAX_NR;
		gemv_q_launch(s, &b, b.n, 1);
	}
}

extern "C" void
kk_gemv_multi_q(cudaStream_t s, kk_gemv_batch *b)
{
	if (b->count <= 0 || b->n <= 0 || b->n > Q_MAX_NR)
		return;
	gemv_q_launch(s, b, b->n, 1);
}

/* ------------------------------------------------------------------ experts */

#define Q_EXPERT_ONE 0
#define Q_EXPERT_TWO 1
#define Q_EXPERT_SWIGLU 2

/*
 * One pass of nr = NR input rows (pairs i0 ..) of an expert work item over
 * the block's rows: y[i, row0 + w] (SwiGLU: silu(gate) * up, the gate rows
 * first in R).  LOADED: raw holds the first pieces (the PRE kernel).
 */
template <int FMT, int NR, int MODE, int RT, int BT>
__device__ __forceinline__ void
q_expert_pass(float *y, int ldy, const float *x, int ldx, const int *xrow, const q_rows<RT> &R, uint4 (&raw)[1][RT],
			  bool vec, bool loaded, int row0, int rows, int i0, float *sums)
{
	const float *xr[NR];

#pragma unroll
	for (int r = 0; r < NR; r++)
		xr[r] = x + (size_t) (xrow ? xrow[i0 + r] : i0 + r) * ldx;
	q_rows_sums<FMT, NR, RT, BT, 1>(R, raw, vec, loaded, xr, sums);
	expert_rows_store<NR, MODE == Q_EXPERT_SWIGLU, RT, BT>(y, ldy, sums, row0, rows, i0);
}

/* q_expert_pass for nr (1..N) rows: instantiates only the sizes up to N */
template <int FMT, int N, int MODE, int RT, int BT>
__device__ __forceinline__ void
q_expert_upto(int nr, float *y, int ldy, const float *x, int ldx, const int *xrow, const q_rows<RT> &R,
			  uint4 (&raw)[1][RT], bool vec, bool loaded, int row0, int rows, int i0, float *sums)
{
	if constexpr (N > 1)
	{
		if (nr < N)
		{
			q_expert_upto<FMT, N - 1, MODE, RT, BT>(nr, y, ldy, x, ldx, xrow, R, raw, vec, loaded, row0, rows, i0,
													sums);
			return;
		}
	}
	q_expert_pass<FMT, N, MODE, RT, BT>(y, ldy, x, ldx, xrow, R, raw, vec, loaded, row0, rows, i0, sums);
}

/*
 * Block (b, slot): RB rows of the work item in slot's expert (SwiGLU: RB
 * gate rows and the same RB up rows: RT = 2 RB; TWO: the second half of the
 * blocks takes W1 -> y1), its pairs in one pass of at most MAXNR (P).
 * PRE: the work item and the first weight pieces are read before
 * kk_dep_wait, under gemv.cu's expert_rows_kernel argument (kernels.h: the
 * kernel that wrote start and active is at least two launches back; read
 * through L2).  One piece a thread and row: at the 48B down shape (1024
 * columns: 64 FP8 pieces over 64 threads, 32 int4 over 32) that is already
 * the whole row, so gemv_q_kernel's early form (q_np) has nothing to add.
 * vec: the vector path (every expert matrix 16-byte aligned, whole pieces,
 * aligned activations: the launcher checked).
 */
template <int FMT, int MAXNR, int MODE, int RB, int BT, bool PRE>
__global__ void __launch_bounds__(BT)
expert_q_kernel(float *y0, float *y1, int ldy, const float *__restrict__ x, int ldx, const int *__restrict__ xrow,
				const void *const *W0, const void *const *W1, int group, int rows, int cols,
				const int *__restrict__ start, const int *__restrict__ active, int vec)
{
	constexpr int RT = MODE == Q_EXPERT_SWIGLU ? 2 * RB : RB;
	__shared__ float sums[RT * MAXNR];
	int			per = (rows + RB - 1) / RB;
	int			m = MODE == Q_EXPERT_TWO && (int) blockIdx.x >= per;
	int			row0 = ((int) blockIdx.x - m * per) * RB;
	int			e = 0,
				first = 0,
				count = 0;
	q_rows<RT>	R;
	uint4		raw[1][RT];		/* the first piece of each row (q_rows_first) */

	if constexpr (PRE)
	{
		bool		run = (int) blockIdx.y < __ldcg(active) && row0 < rows;

		if (run)
		{
			e = kk_expert_item_l2(active, start, blockIdx.y, MAXNR, &first, &count);
			q_rows_init<RT>(R, W0[e], NULL, RT, FMT, group, rows, cols, row0);
			if (vec)
				q_rows_first<1, RT, BT>(raw, R, cols / q_fmt<FMT>::cols);
		}
		/* x (h) is written by the kernel before: wait for it now */
		kk_dep_wait();
		kk_dep_launch();
		if (!run)
			return;
	}
	else
	{
		/* which experts run depends on the routing kernel before: wait first */
		kk_dep_wait();
		kk_dep_launch();
		if ((int) blockIdx.y >= active[0] || row0 >= rows)
			return;
		e = kk_expert_item(active, start, blockIdx.y, MAXNR, &first, &count);
		if (MODE == Q_EXPERT_SWIGLU)
			q_rows_init<RT>(R, W0[e], W1[e], RB, FMT, group, rows, cols, row0);
		else
			q_rows_init<RT>(R, m ? W1[e] : W0[e], NULL, RT, FMT, group, rows, cols, row0);
	}
	if (count > 0)
		q_expert_upto<FMT, MAXNR, MODE, RT, BT>(count, m ? y1 : y0, ldy, x, ldx, xrow, R, raw, vec != 0, PRE, row0,
												rows, first, sums);
}

/*
 * The expert kernel in the block shape of its rows (q_shape: the 48B
 * experts' gate/up rows are 2304 columns, 144 FP8 pieces or 72 int4: 64
 * threads; down 1024, 64 or 32: 64 or 32 threads), q_rb rows a block.
 */
template <int FMT, int MAXNR, int MODE, bool PRE>
static void
expert_q_launch(cudaStream_t s, int max_active, float *y0, float *y1, int ldy, const float *x, int ldx,
				const int *xrow, const void *const *W0, const void *const *W1, int group, int rows, int cols,
				const int *start, const int *active, int vec)
{
	int			shape = q_forced_shape >= 0 && q_forced_shape != Q_SHAPE_BY_BYTES ? q_forced_shape :
		q_shape(cols / q_fmt<FMT>::cols);

	shape = shape == Q_SHAPE_WIDE ? Q_SHAPE_MID : shape;
#define Q_GO(SH) \
	do { \
		constexpr int RB = q_rb(SH, MAXNR, MODE == Q_EXPERT_SWIGLU); \
		dim3		grid(ceil_div(rows, RB) * (MODE == Q_EXPERT_TWO ? 2 : 1), max_active); \
		kk_launch(expert_q_kernel<FMT, MAXNR, MODE, RB, q_bt(SH), PRE>, grid, dim3(q_bt(SH)), 0, s, y0, y1, ldy, x, \
				  ldx, xrow, W0, W1, group, rows, cols, start, active, vec); \
	} while (0)
	if (shape == Q_SHAPE_SHORT)
		Q_GO(Q_SHAPE_SHORT);
	else
		Q_GO(Q_SHAPE_MID);
#undef Q_GO
}

/* the pass size (1, 2, 4, 8) and the PRE choice for one format and mode */
template <int FMT, int MODE>
static void
expert_q_dispatch(cudaStream_t s, bool pre, int P, int max_active, float *y0, float *y1, int ldy, const float *x,
				  int ldx, const int *xrow, const void *const *W0, const void *const *W1, int group, int rows,
				  int cols, const int *start, const int *active, int vec)
{
#define Q_ARGS s, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows, cols, start, active, vec
	if (P <= 1)
	{
		if (MODE == Q_EXPERT_ONE && pre)
			expert_q_launch<FMT, 1, MODE, true>(Q_ARGS);
		else
			expert_q_launch<FMT, 1, MODE, false>(Q_ARGS);
	}
	else if (P <= 2)
		expert_q_launch<FMT, 2, MODE, false>(Q_ARGS);
	else if (P <= 4)
		expert_q_launch<FMT, 4, MODE, false>(Q_ARGS);
	else
		expert_q_launch<FMT, Q_MAX_NR, MODE, false>(Q_ARGS);
#undef Q_ARGS
}

template <int FMT>
static void
expert_q_modes(cudaStream_t s, int mode, bool pre, int P, int max_active, float *y0, float *y1, int ldy,
			   const float *x, int ldx, const int *xrow, const void *const *W0, const void *const *W1, int group,
			   int rows, int cols, const int *start, const int *active, int vec)
{
	if (mode == Q_EXPERT_ONE)
		expert_q_dispatch<FMT, Q_EXPERT_ONE>(s, pre, P, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows,
											  cols, start, active, vec);
	else if (mode == Q_EXPERT_TWO)
		expert_q_dispatch<FMT, Q_EXPERT_TWO>(s, false, P, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group,
											  rows, cols, start, active, vec);
	else
		expert_q_dispatch<FMT, Q_EXPERT_SWIGLU>(s, false, P, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group,
												 rows, cols, start, active, vec);
}

/* gemv.cu: the early read of the down product's work list (kk_set_expert_preload) */
extern int	kk_expert_preload;

extern "C" void
kk_expert_gemv_q(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
				 const void *const *W0, const void *const *W1, int fmt, int group, int rows, int cols,
				 const int *start, const int *active, int max_active, int max_count)
{
	/* expert matrices are separate pool objects (256-byte aligned) */
	int			vec = cols % q_piece_cols(fmt) == 0 && ldx % 4 == 0 && ((uintptr_t) x & 15) == 0;
	int			mode = !W1 ? Q_EXPERT_ONE : !y1 ? Q_EXPERT_SWIGLU : Q_EXPERT_TWO;
	int			P = kk_expert_pass_rows(max_count);
	bool		pre = kk_expert_preload != 0 && P == 1;

	if (max_active <= 0 || rows <= 0 || cols <= 0)
		return;
	if (group <= 0)
		group = cols;
	switch (fmt)
	{
		case KK_WF_FP8:
			expert_q_modes<KK_WF_FP8>(s, mode, pre, P, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows,
									  cols, start, active, vec);
			break;
		case KK_WF_INT8:
			expert_q_modes<KK_WF_INT8>(s, mode, pre, P, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows,
									   cols, start, active, vec);
			break;
		case KK_WF_INT4:
			expert_q_modes<KK_WF_INT4>(s, mode, pre, P, max_active, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows,
									   cols, start, active, vec);
			break;
		default:
			/* bf16 / fp32 experts: gemv.cu's kernels */
			kk_expert_gemv(s, y0, y1, ldy, x, ldx, xrow, W0, W1, fmt == KK_WF_BF16, rows, cols, start, active,
						   max_active, max_count);
			break;
	}
}

/* ------------------------------------------------------------------ test hooks (test/engine/test_cuda.c) */

/* one device object (kernels.h layout) from a host matrix: data rows, then its scales (none for bf16 / fp32) */
static cudaError_t
q_test_upload(void **dev, int fmt, int group, int rows, int cols, const void *data, const float *scales)
{
	size_t		rb = kk_q_row_bytes(fmt, cols);
	bool		quant = fmt >= KK_WF_FP8;
	size_t		bytes = quant ? kk_q_bytes(rows, fmt, cols, group) : rb * rows;
	cudaError_t e;

	*dev = NULL;
	if ((e = cudaMalloc(dev, bytes)) != cudaSuccess ||
		(e = cudaMemcpy(*dev, data, rb * rows, cudaMemcpyHostToDevice)) != cudaSuccess)
		return e;
	if (quant)
		e = cudaMemcpy((char *) *dev + kk_q_scale_offset(rows, fmt, cols), scales,
					   sizeof(float) * (size_t) rows * kk_q_groups(cols, group), cudaMemcpyHostToDevice);
	return e;
}

/*
 * Plain and batched products on host arrays.  Job j: matrix [rows[j],
 * cols[j]] in fmt[j] (group[j] columns a scale): data[j] its rows as quant.h
 * stores them (or bf16 / fp32 values), scales[j] its [rows, groups] scales
 * (NULL for bf16 / fp32); x: the jobs' activations one after another, [n,
 * cols[j]] each, put on the device with row stride cols[j] + xpad (xpad % 4
 * != 0: the scalar path); y: the jobs' outputs [n, rows[j]] one after
 * another.  multi 0: kk_gemv_q per job (any n); 1: one kk_gemv_multi_q
 * (n <= 8).  Returns 0, -1 for bad arguments, or a CUDA error code.
 */
extern "C" __attribute__((visibility("default"))) int
kl_cuda_test_gemv_q(int multi, int n, int count, const int *fmt, const int *group, const int *rows, const int *cols,
					const void *const *data, const float *const *scales, const float *x, int xpad, float *y)
{
	void	   *W[KK_GEMV_JOBS] = {0};
	float	   *xd[KK_GEMV_JOBS] = {0},
			   *yd[KK_GEMV_JOBS] = {0};
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	kk_gemv_batch b;
	size_t		xo = 0,
				yo = 0;

	if (n <= 0 || count <= 0 || count > KK_GEMV_JOBS || xpad < 0 || (multi && n > Q_MAX_NR))
		return -1;
	memset(&b, 0, sizeof(b));
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess)
		goto out;
	for (int j = 0; j < count; j++)
	{
		int			ldx = cols[j] + xpad;

		if ((e = q_test_upload(&W[j], fmt[j], group[j], rows[j], cols[j], data[j], scales[j])) != cudaSuccess ||
			(e = cudaMalloc((void **) &xd[j], sizeof(float) * (size_t) n * ldx)) != cudaSuccess ||
			(e = cudaMalloc((void **) &yd[j], sizeof(float) * (size_t) n * rows[j])) != cudaSuccess ||
			(e = cudaMemset(yd[j], 0xff, sizeof(float) * (size_t) n * rows[j])) != cudaSuccess)
			goto out;
		for (int r = 0; r < n; r++)
			if ((e = cudaMemcpy(xd[j] + (size_t) r * ldx, x + xo + (size_t) r * cols[j], sizeof(float) * cols[j],
								cudaMemcpyHostToDevice)) != cudaSuccess)
				goto out;
		xo += (size_t) n * cols[j];
		b.job[j].y = yd[j];
		b.job[j].x = xd[j];
		b.job[j].W = W[j];
		b.job[j].ldy = rows[j];
		b.job[j].ldx = ldx;
		b.job[j].rows = rows[j];
		b.job[j].cols = cols[j];
		b.job[j].fmt = fmt[j];
		b.job[j].bf16 = fmt[j] == KK_WF_BF16;
		b.job[j].group = group[j];
	}
	b.count = count;
	b.n = n;
	if (multi)
		kk_gemv_multi_q(s, &b);
	else
		for (int j = 0; j < count; j++)
			kk_gemv_q(s, yd[j], rows[j], xd[j], cols[j] + xpad, n, W[j], fmt[j], group[j], rows[j], cols[j]);
	if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaStreamSynchronize(s)) != cudaSuccess)
		goto out;
	for (int j = 0; j < count; j++)
	{
		if ((e = cudaMemcpy(y + yo, yd[j], sizeof(float) * (size_t) n * rows[j], cudaMemcpyDeviceToHost)) !=
			cudaSuccess)
			goto out;
		yo += (size_t) n * rows[j];
	}
out:
	for (int j = 0; j < KK_GEMV_JOBS; j++)
	{
		cudaFree(W[j]);
		cudaFree(xd[j]);
		cudaFree(yd[j]);
	}
	if (s)
		cudaStreamDestroy(s);
	return e == cudaSuccess ? 0 : (int) e;
}

/* kk_set_rows_early for the checks of gemv_q_kernel's early form; returns the setting it replaces */
extern "C" __attribute__((visibility("default"))) int
kl_cuda_test_rows_early(int on)
{
	int			was = kk_rows_early;

	kk_set_rows_early(on);
	return was;
}

/* kk_set_q_early1 for the checks of the one-row early form; returns the setting it replaces */
extern "C" __attribute__((visibility("default"))) int
kl_cuda_test_q_early1(int mode)
{
	int			was = kk_q_early1;

	kk_set_q_early1(mode);
	return was;
}

/*
 * Expert products on host arrays: E experts' matrices (data0[e] /
 * scales0[e], and data1 / scales1 for modes TWO and SWIGLU: mode 0 one
 * matrix, 1 two, 2 SwiGLU), all fmt / group / [rows, cols]; expert e has
 * the pairs [start[e], start[e + 1]) (start: E + 1 ints); the work list is
 * made here as kk_moe_group makes it (items of P = kk_expert_pass_rows(
 * max_count) pairs, experts in order), the grid two slots longer than it.
 * x: [nx, cols] (device row stride cols + xpad), xrow: the pairs' x rows
 * (NULL: pair i reads row i); y0 (and y1 in mode TWO): [pairs, rows].
 * preload: kk_set_expert_preload for the call.  Returns 0, -1 for bad
 * arguments, or a CUDA error code.
 */
extern "C" __attribute__((visibility("default"))) int
kl_cuda_test_expert_gemv_q(int mode, int fmt, int group, int rows, int cols, int E, const void *const *data0,
						   const float *const *scales0, const void *const *data1, const float *const *scales1,
						   int nx, const float *x, int xpad, const int *xrow, const int *start, int max_count,
						   int preload, float *y0, float *y1)
{
	int			pairs = start[E],
				P = kk_expert_pass_rows(max_count),
				items = 0,
				ldx = cols + xpad,
				was;
	void	  **Wh = (void **) calloc(2 * (size_t) E, sizeof(void *));
	int		   *act = (int *) malloc(sizeof(int) * (1 + (size_t) E * 64));
	void	  **Wd = NULL;
	float	   *xd = NULL,
			   *yd = NULL;
	int		   *md = NULL;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;

	if (!Wh || !act || mode < 0 || mode > 2 || nx <= 0 || pairs <= 0)
	{
		free(Wh);
		free(act);
		return -1;
	}
	for (int k = 0; k < E; k++)
		for (int c = 0; c * P < start[k + 1] - start[k] && c < 64; c++)
			act[1 + items++] = k * 64 + c;
	act[0] = items;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess)
		goto out;
	for (int k = 0; k < E; k++)
		if ((e = q_test_upload(&Wh[k], fmt, group, rows, cols, data0[k], scales0[k])) != cudaSuccess ||
			(mode && (e = q_test_upload(&Wh[E + k], fmt, group, rows, cols, data1[k], scales1[k])) != cudaSuccess))
			goto out;
	if ((e = cudaMalloc((void **) &Wd, sizeof(void *) * 2 * E)) != cudaSuccess ||
		(e = cudaMemcpy(Wd, Wh, sizeof(void *) * 2 * E, cudaMemcpyHostToDevice)) != cudaSuccess ||
		(e = cudaMalloc((void **) &xd, sizeof(float) * (size_t) nx * ldx)) != cudaSuccess ||
		(e = cudaMalloc((void **) &yd, sizeof(float) * 2 * (size_t) pairs * rows)) != cudaSuccess ||
		(e = cudaMemset(yd, 0xff, sizeof(float) * 2 * (size_t) pairs * rows)) != cudaSuccess ||
		(e = cudaMalloc((void **) &md, sizeof(int) * (E + 1 + pairs + 1 + items))) != cudaSuccess ||
		(e = cudaMemcpy(md, start, sizeof(int) * (E + 1), cudaMemcpyHostToDevice)) != cudaSuccess ||
		(xrow && (e = cudaMemcpy(md + E + 1, xrow, sizeof(int) * pairs, cudaMemcpyHostToDevice)) != cudaSuccess) ||
		(e = cudaMemcpy(md + E + 1 + pairs, act, sizeof(int) * (1 + items), cudaMemcpyHostToDevice)) != cudaSuccess)
		goto out;
	for (int r = 0; r < nx; r++)
		if ((e = cudaMemcpy(xd + (size_t) r * ldx, x + (size_t) r * cols, sizeof(float) * cols,
							cudaMemcpyHostToDevice)) != cudaSuccess)
			goto out;
	was = kk_set_expert_preload(preload);
	kk_expert_gemv_q(s, yd, mode == 1 ? yd + (size_t) pairs * rows : NULL, rows, xd, ldx, xrow ? md + E + 1 : NULL,
					 (const void *const *) Wd, mode ? (const void *const *) (Wd + E) : NULL, fmt, group, rows, cols,
					 md, md + E + 1 + pairs, items + 2, max_count);
	kk_set_expert_preload(was);
	if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaStreamSynchronize(s)) != cudaSuccess ||
		(e = cudaMemcpy(y0, yd, sizeof(float) * (size_t) pairs * rows, cudaMemcpyDeviceToHost)) != cudaSuccess ||
		(mode == 1 && (e = cudaMemcpy(y1, yd + (size_t) pairs * rows, sizeof(float) * (size_t) pairs * rows,
									  cudaMemcpyDeviceToHost)) != cudaSuccess))
		goto out;
out:
	for (int k = 0; k < 2 * E; k++)
		cudaFree(Wh[k]);
	cudaFree(Wd);
	cudaFree(xd);
	cudaFree(yd);
	cudaFree(md);
	if (s)
		cudaStreamDestroy(s);
	free(Wh);
	free(act);
	return e == cudaSuccess ? 0 : (int) e;
}
