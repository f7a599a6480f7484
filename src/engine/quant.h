/*
 * quant.h — quantized weight matrices: the three forms the CPU kernels
 * compute with, quantization of f32 weights at load, exact dequantization,
 * and the FP8 E4M3 number format.
 *
 * Forms (a matrix W [rows, cols], row-major; each row has ceil(cols / group)
 * f32 scales, one per `group` consecutive columns; group == cols means one
 * scale per output channel):
 *
 *   KL_Q_FP8   one byte per weight, FP8 E4M3 ("e4m3fn": bias 7, no
 *              infinities, 0x7f/0xff are NaN and refused at load);
 *              w = e4m3(byte) * scale.  Group: cols, or a multiple of 16.
 *   KL_Q_INT8  one signed byte per weight q in [-127, 127] (-128 accepted);
 *              w = q * scale.  Group: cols, or a multiple of 16.
 *   KL_Q_INT4  the compressed-tensors "pack-quantized" layout, used in place:
 *              a row is ceil(cols / 8) little-endian 32-bit words; column c
 *              is the nibble at bits 4 * (c % 8) of word c / 8, holding
 *              q + 8 for q in [-8, 7]; w = q * scale.  In bytes: byte j of
 *              a row holds column 2j (low nibble) and 2j + 1 (high nibble).
 *              Group: cols, or a multiple of 32.
 *
 * Dequantization is exact in the sense that every kernel computes each
 * weight as the single fp32 rounding of q * scale (fl(q * s)), the value a
 * checkpoint of dequantized f32 weights holds; the dot products then run in
 * fp32 as for f32 weights.  Activations are never quantized.
 */
#ifndef KL_QUANT_H
#define KL_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kl_util.h"

typedef enum kl_qtype
{
	KL_Q_NONE = 0,				/* not quantized: f32 or bf16 as stored */
	KL_Q_FP8,
	KL_Q_INT8,
	KL_Q_INT4
} kl_qtype;

typedef struct kl_qmat
{
	kl_qtype	type;
	int			rows,
				cols;
	const uint8_t *data;		/* row r starts at data + r * row_bytes */
	size_t		row_bytes;
	const float *scales;		/* [rows, n_groups] */
	int			group;			/* columns per scale */
	int			n_groups;		/* ceil(cols / group) */
} kl_qmat;

const char *kl_qtype_name(kl_qtype t);	/* "fp8", "int8", "int4" */

/* Bytes of a row of `cols` weights in form t. */
size_t		kl_q_row_bytes(kl_qtype t, int cols);

/* Bytes of data and scales together. */
size_t		kl_q_bytes(const kl_qmat *q);

/*
 * Check the invariants the kernels rely on: group a multiple of the form's
 * block (16 columns, 32 for int4) or equal to cols; every scale finite (FP8:
 * |scale| < 256, so that the kernels may fold 2^120 into it); no FP8 NaN
 * byte.  `what` names the tensor in the message.
 */
int			kl_q_validate(const kl_qmat *q, const char *what, kl_err *err);

/* ------------------------------------------------------------------ FP8 E4M3 */

/* Exact. NaN codes (0x7f, 0xff) give NaN. */
float		kl_e4m3_to_f32(uint8_t b);
/* Round to nearest even; beyond the largest finite value (448) saturates to
 * +-448; NaN gives 0x7f. */
uint8_t		kl_f32_to_e4m3(float f);

/* ------------------------------------------------------------------ dequantization */

/* out[c] = fl(q[r, c] * scale) for c < cols (the reference every kernel matches). */
void		kl_q_dequant_row(const kl_qmat *q, int r, float *out);

/*
 * The portable and AVX2 int4 kernels read the activations in the order the
 * nibbles come out of a 16-byte load: per block of 32 columns, the 16 even
 * columns, then the 16 odd ones.  dst has room for kl_q4_xperm_len(cols)
 * floats; the padding of the last block is zero.  (AVX-512 has its own
 * layout: simd_quant.h; kl_simd.q4_permute is the level's.)
 */
static inline int
kl_q4_xperm_len(int cols)
{
	return (cols + 31) / 32 * 32;
}
void		kl_q4_permute_x(float *dst, const float *x, int cols);

/* ------------------------------------------------------------------ quantization at load */

/*
 * Quantize rows [r0, r1) of an f32 matrix into q (whose data and scales the
 * caller allocated for the whole matrix, q->type and q->group set); src
 * holds rows r0 .. r1 - 1, cols floats each.  Methods (weights only; round to nearest, ties to even):
 *   fp8   scale = absmax / 448 per group, byte = e4m3(w / scale)
 *   int8  scale = absmax / 127 per group, q = clamp(rne(w / scale), -127, 127)
 *   int4  q = clamp(rne(w / scale), -8, 7) with the scale among
 *         absmax / (7 + k/8), k = 0..8, that gives the group the least
 *         squared error (absmax / 8 represents a negative extreme exactly)
 * An all-zero group gets scale 0 (every q 0).
 */
void		kl_q_quantize_rows(kl_qmat *q, const float *src, int r0, int r1);

/* Parse a --quantize / load option: "fp8", "int8", "int4" (or NULL, "", "none"
 * for none).  Anything else is an error naming the choices. */
int			kl_qtype_parse(const char *s, kl_qtype *out, kl_err *err);

/* The group size quantization at load uses for a form (cols: the matrix's). */
int			kl_q_default_group(kl_qtype t, int cols);

/*
 * What a weight matrix is, by its checkpoint name (the reference code's):
 * the large projections (attention, MLPs, experts) and lm_head are
 * quantized at load; the KDA low-rank decay and gate projections, beta and
 * MLA's kv_b (which the CPU expands to fp32 anyway) stay as stored; the
 * embedding and the MoE router are never quantized (nor Linear modules in
 * the reference code).
 */
typedef enum kl_wrole
{
	KL_W_EMBED,
	KL_W_ROUTER,
	KL_W_PROJ,
	KL_W_SMALL,
	KL_W_LM_HEAD
} kl_wrole;

kl_wrole	kl_q_role(const char *tensor_name);
/* The form quantization at load to q gives the tensor (KL_Q_NONE: kept). */
kl_qtype	kl_q_at_load(const char *tensor_name, kl_qtype q);

#endif
