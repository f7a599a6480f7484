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
#include "safetensors.h"

struct kl_model
{
	char	   *dir;
	kl_config	cfg;
	kl_safetensors st;
	kl_backend *be;
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
	uint64_t	weight_bytes;
	uint8_t		fingerprint[16];
	/* the fingerprint the same weights have under the other MoE routing rule
	 * (MoE models only), so that a refused state can say why */
	uint8_t		fingerprint_other_routing[16];
	bool		has_other_routing;
};

#endif
