/*
 * config.h — the model hyper-parameters that the forward pass needs, read from
 * a Hugging Face style config.json (model_type kimi_linear).
 * docs/model.md lists the fields.
 */
#ifndef KL_CONFIG_H
#define KL_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "kl_util.h"

#define KL_MAX_LAYERS 512
/* kl_moe_route keeps one score per expert group on the stack */
#define KL_MAX_EXPERT_GROUPS 1024

typedef enum kl_layer_kind
{
	KL_LAYER_KDA = 1,
	KL_LAYER_MLA = 2
} kl_layer_kind;

typedef struct kl_config
{
	char		model_type[32];
	int			vocab_size;
	int			hidden_size;	/* D */
	int			n_layers;		/* L */
	int			intermediate_size;	/* dense MLP width I */
	float		rms_norm_eps;
	int32_t		bos_id,
				eos_id,
				pad_id;			/* -1 when absent */

	/* KDA (linear_attn_config) */
	int			kda_heads;		/* H */
	int			kda_head_dim;	/* K = V */
	int			conv_kernel;	/* W */

	/* MLA */
	int			mla_heads;		/* Ha */
	int			q_lora_rank;	/* 0: plain q_proj */
	int			kv_lora_rank;	/* R */
	int			qk_nope_dim;	/* Dn */
	int			qk_rope_dim;	/* Dr */
	int			v_head_dim;		/* Dv */

	/* MoE (n_experts == 0: dense MLP everywhere) */
	int			n_experts;		/* E */
	int			experts_per_token;	/* k */
	int			n_shared_experts;	/* S (0 = none) */
	int			moe_intermediate;	/* F */
	int			first_k_dense;
	int			moe_layer_freq;
	bool		router_softmax; /* false: sigmoid */
	bool		moe_renormalize;
	float		routed_scaling;
	int			n_expert_groups;	/* G */
	int			topk_groups;	/* Tg */
	/*
	 * The MoE routing rule (docs/model.md, "Routing"): false (the
	 * default, how vLLM, SGLang, llama.cpp and kimi_k3 serve the model): the
	 * score-correction bias chooses the experts and the plain scores weight
	 * them; true (the released kimi_linear reference code): the bias is added
	 * into the weights too.  Not a config.json field: chosen at load
	 * (kl_load_opts.moe_routing).
	 */
	bool		bias_in_weights;

	kl_layer_kind layer_kind[KL_MAX_LAYERS];
	int			n_kda_layers;
	int			n_mla_layers;
} kl_config;

/* Parse and validate dir/config.json (or the given file). */
int			kl_config_load(const char *path, kl_config *cfg, kl_err *err);
/* The same, reading the file only if it resolves inside root (kl_file.h; root NULL: anywhere). */
int			kl_config_load_under(const char *root, const char *path, kl_config *cfg, kl_err *err);
/* Parse from a JSON text (tests, fuzzing). `what` names the source in errors. */
int			kl_config_parse(const char *json, size_t len, const char *what, kl_config *cfg, kl_err *err);

static inline bool
kl_layer_is_moe(const kl_config *c, int i)
{
	return c->n_experts > 0 && i >= c->first_k_dense && (i % c->moe_layer_freq) == 0;
}

/* Latent cache width of one MLA position: R + Dr. */
static inline int
kl_mla_row(const kl_config *c)
{
	return c->kv_lora_rank + c->qk_rope_dim;
}

#endif
