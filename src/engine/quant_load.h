/*
 * quant_load.h — making the quantized matrices (quant.h) of a model at load:
 * from the tensors of a published quantized checkpoint (quant_config.h says
 * which formats), or by quantizing f32 / bf16 / f16 weights.
 *
 * Every function checks what it reads (dtypes, shapes against the matrix
 * the config implies, scale values) and names the tensor in its errors.
 * Memory it allocates is returned in `mem` (up to 2 blocks, NULL when
 * unused), owned by the caller from then on, also on failure.
 */
#ifndef KL_QUANT_LOAD_H
#define KL_QUANT_LOAD_H

#include "quant.h"
#include "quant_config.h"
#include "safetensors.h"

/* The tensors that hold one quantized matrix (those absent are NULL). */
typedef struct kl_qtensors
{
	const kl_st_tensor *weight;	/* F8_E4M3 or I8 [rows, cols] ("weight") */
	const kl_st_tensor *packed;	/* I32 ("weight_packed") */
	const kl_st_tensor *shape;	/* I32/I64 [2] ("weight_shape") */
	const kl_st_tensor *scale;	/* "weight_scale" or "weight_scale_inv" */
} kl_qtensors;

/*
 * The matrix [rows, cols] held by tensors `t` in the checkpoint's format
 * (qc).  Data is used in place where the format is the kernels' (FP8, int8,
 * 4-bit packed); scales are always converted to f32 [rows, n_groups].
 */
int			kl_qload_matrix(const kl_qconfig *qc, const kl_qtensors *t, int rows, int cols,
							kl_qmat *out, void *mem[2], kl_err *err);

/*
 * Quantize the f32 / bf16 / f16 matrix src [rows, cols] to form `type`
 * with `group` columns per scale (quant.h has the method), on the thread
 * pool.
 */
int			kl_qload_quantize(const void *src, kl_dtype dtype, int rows, int cols, kl_qtype type,
							  int group, kl_qmat *out, void *mem[2], kl_err *err);

/* Dequantize to bf16 (round to nearest even) into dst [rows, cols]: for
 * backends that do not compute with quantized weights. */
int			kl_qload_to_bf16(const kl_qmat *q, uint16_t *dst, kl_err *err);

#endif
