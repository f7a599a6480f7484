/*
 * quant_config.h — the "quantization_config" of a published quantized
 * checkpoint's config.json, and which modules it says are quantized.
 *
 * Supported (anything else is refused with a message naming it):
 *   quant_method "compressed-tensors", format (top level or per config
 *   group) "float-quantized" / "naive-quantized" (FP8 E4M3 or int8 weights
 *   stored as F8_E4M3 / I8 tensors), "int-quantized" (int8), "pack-quantized"
 *   (4- or 8-bit integers packed into I32 words); weights symmetric, static,
 *   with strategy "channel", "tensor", "group" (group_size) or, for FP8,
 *   "block" (block_structure); input activations absent or dynamic (the
 *   engine keeps activations in fp32, see quant.h); config groups may be
 *   several if their weight arguments agree; targets are class "Linear",
 *   exact module names or "re:" regular expressions (anchored at the start,
 *   as Python's re.match), and so are the entries of "ignore".
 *   quant_method "fp8" (Hugging Face fine-grained FP8, as Kimi K2 and
 *   DeepSeek V3 publish): fmt "e4m3", activation_scheme "dynamic",
 *   weight_block_size [rows, cols]; quantized modules are those whose weight
 *   is F8_E4M3 with a weight_scale_inv.
 */
#ifndef KL_QUANT_CONFIG_H
#define KL_QUANT_CONFIG_H

#include <stdbool.h>

#include "kl_util.h"
#include "quant.h"

typedef enum kl_qscheme
{
	KL_QS_NONE = 0,				/* no quantization_config */
	KL_QS_CT_FP8,				/* compressed-tensors, F8_E4M3 weight + weight_scale */
	KL_QS_CT_INT8,				/* compressed-tensors, I8 weight + weight_scale */
	KL_QS_CT_PACKED,			/* compressed-tensors pack-quantized: weight_packed, weight_scale, weight_shape */
	KL_QS_FP8_BLOCK				/* quant_method fp8: F8_E4M3 weight + weight_scale_inv per block */
} kl_qscheme;

typedef enum kl_qstrategy
{
	KL_QSTRAT_CHANNEL = 0,
	KL_QSTRAT_TENSOR,
	KL_QSTRAT_GROUP,
	KL_QSTRAT_BLOCK
} kl_qstrategy;

typedef struct kl_qpattern
{
	char	   *text;			/* as written in config.json */
	void	   *re;				/* compiled "re:" pattern (pcre2_code), or NULL */
	bool		is_class_linear;	/* "Linear" */
} kl_qpattern;

typedef struct kl_qconfig
{
	kl_qscheme	scheme;
	kl_qstrategy strategy;
	int			bits;			/* 4 or 8 */
	int			group;			/* GROUP: columns per scale */
	int			block_rows,
				block_cols;		/* BLOCK */
	kl_qpattern *targets;
	int			n_targets;
	kl_qpattern *ignore;
	int			n_ignore;
	char		describe[96];	/* e.g. "int4 g32 (compressed-tensors)" */
} kl_qconfig;

/* Parse config.json's quantization_config, if any (scheme KL_QS_NONE without). */
/* root: as kl_file.h (NULL: no confinement). */
int			kl_qconfig_load(const char *root, const char *config_path, kl_qconfig *qc, kl_err *err);
int			kl_qconfig_parse(const char *json, size_t len, const char *what, kl_qconfig *qc, kl_err *err);
void		kl_qconfig_free(kl_qconfig *qc);

/*
 * Whether the config says module `name` (e.g. "model.layers.0.self_attn.q_proj")
 * is quantized: 1 yes, 0 no, -1 the config does not say (quant_method fp8,
 * which marks quantized modules by their tensors only).  `is_linear`: the
 * module is a torch Linear in the reference code (every matrix the engine
 * binds except the embedding and the MoE router).
 */
int			kl_qconfig_expects(const kl_qconfig *qc, const char *name, bool is_linear);

#endif
