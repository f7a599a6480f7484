/*
 * model.h — a loaded checkpoint: the config, the tensors bound to the layer
 * structures the forward pass uses, and the backend that holds them.
 * Internal to the engine; kl.h is the public face.
 */
#ifndef KL_MODEL_H
#define KL_MODEL_H

#include "backend.h"
#include "config.h"
#include "kl.h"
#include "quant_config.h"
#include "safetensors.h"

struct kl_model
{
	char	   *dir;
	kl_config	cfg;
	kl_safetensors st;
	kl_backend *be;
	const char *precision;		/* in force: "fp32", "bf16" or "fp8" (kl_model_precision) */
	kl_tokenizer *tok;

	kl_weight	embed;			/* [vocab, D] */
	float	   *final_norm;		/* [D] */
	kl_weight	lm_head;		/* [vocab, D] */
	kl_layer   *layers;			/* [L] */

	/* names of random-model tensors (no files to point into) */
	char	  **names;
	int			n_names,
				cap_names;

	/* small fp32 vectors the backend holds, freed at unload */
	float	  **vecs;
	int			n_vecs;
	int			cap_vecs;

	int64_t		n_params;
	uint64_t	weight_bytes;	/* the checkpoint's tensors, as stored */
	uint8_t		fingerprint[16];
	/* the fingerprint the same weights have under the other MoE routing rule
	 * (MoE models only), so that a refused state can say why */
	uint8_t		fingerprint_other_routing[16];
	bool		has_other_routing;

	/* quantization (quant.h): a published format (qcfg), or at load */
	kl_qconfig	qcfg;
	kl_qtype	quantize;		/* at load; KL_Q_NONE: none */
	void	  **allocs;			/* quantized data and scales the loader made */
	int			n_allocs,
				cap_allocs;
	int			n_matrices,
				n_quantized,	/* matrices in a quantized form */
				n_fp8,			/* ... of them FP8 (precision fp8 needs some) */
				n_dequantized;	/* ... turned into bf16 for a backend without quantized kernels */
	uint64_t	resident_bytes; /* weights as the backend holds them */
	char		weight_format[160];
	uint8_t		base_digest[32];	/* the fingerprint's hash before quantization at load */
	uint8_t		base_digest_other_routing[32];	/* the same under the other MoE routing rule */
};

/*
 * Which quantization at load (kl_qtype) of this model's checkpoint a
 * fingerprint belongs to, or -1 if none (another model): lets a refused
 * state say why.
 */
int			kl_model_quantization_of(const kl_model *m, const uint8_t fingerprint[16]);

#endif
