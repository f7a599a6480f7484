/*
 * config.c — config.json -> kl_config, with jansson.
 *
 * Everything is checked: types, ranges, and the consistency of the layer
 * lists, so that later code can size buffers from the config without further
 * checks.  Limits are generous (far above any released model) but finite, so
 * that a hostile config cannot make the loader allocate absurd amounts.
 * Errors name the field and the rule; they never quote the file's text (a
 * file that is not a config at all must not have its start shown).
 */
#include "config.h"

#include <errno.h>
#include "kl_file.h"
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM		(1 << 20)	/* any single width */
#define MAX_VOCAB	(1 << 23)

typedef struct cfg_reader
{
	json_t	   *root;
	const char *what;
	kl_err	   *err;
	bool		failed;
} cfg_reader;

static json_t *
lookup(json_t *obj, const char *key)
{
	json_t	   *v = json_object_get(obj, key);

	return (v && !json_is_null(v)) ? v : NULL;
}

/* Integer field: required unless def_if_missing != INT32_MIN. */
static int
get_int(cfg_reader *r, json_t *obj, const char *key, int lo, int hi, int def_if_missing)
{
	json_t	   *v = lookup(obj, key);
	json_int_t	x;

	if (r->failed)
		return 0;
	if (!v)
	{
		if (def_if_missing != INT32_MIN)
			return def_if_missing;
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: required field \"%s\" is missing", r->what, key);
		return 0;
	}
	if (!json_is_integer(v))
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: field \"%s\" must be an integer", r->what, key);
		return 0;
	}
	x = json_integer_value(v);
	if (x < lo || x > hi)
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: field \"%s\" is %lld, outside the supported range [%d, %d]",
				r->what, key, (long long) x, lo, hi);
		return 0;
	}
	return (int) x;
}

static double
get_num(cfg_reader *r, json_t *obj, const char *key, double lo, double hi, double def, bool required)
{
	json_t	   *v = lookup(obj, key);
	double		x;

	if (r->failed)
		return 0;
	if (!v)
	{
		if (!required)
			return def;
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: required field \"%s\" is missing", r->what, key);
		return 0;
	}
	if (!json_is_number(v))
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: field \"%s\" must be a number", r->what, key);
		return 0;
	}
	x = json_number_value(v);
	if (!(x >= lo && x <= hi))
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: field \"%s\" is %g, outside the supported range [%g, %g]",
				r->what, key, x, lo, hi);
		return 0;
	}
	return x;
}

static bool
get_bool(cfg_reader *r, json_t *obj, const char *key, bool def)
{
	json_t	   *v = lookup(obj, key);

	if (r->failed || !v)
		return def;
	if (!json_is_boolean(v))
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: field \"%s\" must be true or false", r->what, key);
		return def;
	}
	return json_is_true(v);
}

static const char *
get_str(cfg_reader *r, json_t *obj, const char *key, const char *def)
{
	json_t	   *v = lookup(obj, key);

	if (r->failed || !v)
		return def;
	if (!json_is_string(v))
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: field \"%s\" must be a string", r->what, key);
		return def;
	}
	return json_string_value(v);
}

/* Mark the 1-based layer numbers of a list in `mark` (value `kind`). */
static void
read_layer_list(cfg_reader *r, json_t *lac, const char *key, int n_layers,
				unsigned char *mark, unsigned char kind)
{
	json_t	   *list = lookup(lac, key);
	size_t		i;
	json_t	   *v;

	if (r->failed || !list)
		return;
	if (!json_is_array(list))
	{
		r->failed = true;
		kl_errc(r->err, KL_E_INVALID, "%s: linear_attn_config.%s must be a list of layer numbers", r->what, key);
		return;
	}
	json_array_foreach(list, i, v)
	{
		json_int_t	n;

		if (!json_is_integer(v))
		{
			r->failed = true;
			kl_errc(r->err, KL_E_INVALID, "%s: linear_attn_config.%s[%zu] is not an integer", r->what, key, i);
			return;
		}
		n = json_integer_value(v);
		if (n < 1 || n > n_layers)
		{
			r->failed = true;
			kl_errc(r->err, KL_E_INVALID, "%s: linear_attn_config.%s names layer %lld, but layers are numbered 1..%d "
					"(num_hidden_layers)", r->what, key, (long long) n, n_layers);
			return;
		}
		if (mark[n - 1] != 0)
		{
			r->failed = true;
			kl_errc(r->err, KL_E_INVALID, "%s: layer %lld appears twice in linear_attn_config's layer lists",
					r->what, (long long) n);
			return;
		}
		mark[n - 1] = kind;
	}
}

int
kl_config_parse(const char *text, size_t len, const char *what, kl_config *c, kl_err *err)
{
	json_error_t jerr;
	json_t	   *root;
	json_t	   *lac;
	cfg_reader	r;
	unsigned char mark[KL_MAX_LAYERS];
	const char *s;
	int			i;

	memset(c, 0, sizeof(*c));
	root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return kl_errc(err, KL_E_INVALID, "%s: not valid JSON at line %d column %d: %s",
					   what, jerr.line, jerr.column, kl_json_error_kind(&jerr));
	if (!json_is_object(root))
	{
		json_decref(root);
		return kl_errc(err, KL_E_INVALID, "%s: the top level must be a JSON object", what);
	}
	r.root = root;
	r.what = what;
	r.err = err;
	r.failed = false;

	s = get_str(&r, root, "model_type", "kimi_linear");
	if (!r.failed)
	{
		c->bias_in_weights = false;		/* the default routing rule; see config.h */
		if (strcmp(s, "kimi_linear") != 0 && strcmp(s, "kimi_k3") != 0)
		{
			r.failed = true;
			kl_errc(err, KL_E_UNSUPPORTED, "%s: this model_type is not supported (expected \"kimi_linear\")", what);
		}
		if (!r.failed)
			snprintf(c->model_type, sizeof(c->model_type), "%s", s);
	}
	s = get_str(&r, root, "hidden_act", "silu");
	if (!r.failed && strcmp(s, "silu") != 0)
	{
		r.failed = true;
		kl_errc(err, KL_E_UNSUPPORTED, "%s: this hidden_act is not supported (only \"silu\")", what);
	}
	if (!r.failed && !get_bool(&r, root, "mla_use_nope", true) && !r.failed)
	{
		r.failed = true;
		kl_errc(err, KL_E_UNSUPPORTED, "%s: mla_use_nope = false (rotary MLA) is not supported", what);
	}

	c->vocab_size = get_int(&r, root, "vocab_size", 1, MAX_VOCAB, INT32_MIN);
	c->hidden_size = get_int(&r, root, "hidden_size", 1, 65536, INT32_MIN);
	c->n_layers = get_int(&r, root, "num_hidden_layers", 1, KL_MAX_LAYERS, INT32_MIN);
	c->intermediate_size = get_int(&r, root, "intermediate_size", 1, MAX_DIM, INT32_MIN);
	c->rms_norm_eps = (float) get_num(&r, root, "rms_norm_eps", 0.0, 1.0, 1e-6, true);
	c->bos_id = get_int(&r, root, "bos_token_id", 0, MAX_VOCAB, -1);
	c->eos_id = get_int(&r, root, "eos_token_id", 0, MAX_VOCAB, -1);
	c->pad_id = get_int(&r, root, "pad_token_id", 0, MAX_VOCAB, -1);
	if (!r.failed && get_bool(&r, root, "tie_word_embeddings", false) && !r.failed)
	{
		r.failed = true;
		kl_errc(err, KL_E_UNSUPPORTED,
				"%s: tie_word_embeddings = true is not supported (Kimi Linear checkpoints have lm_head.weight)", what);
	}

	lac = lookup(root, "linear_attn_config");
	if (!r.failed && (!lac || !json_is_object(lac)))
	{
		r.failed = true;
		kl_errc(err, KL_E_INVALID, "%s: linear_attn_config (an object) is missing", what);
	}
	if (!r.failed)
	{
		c->kda_heads = get_int(&r, lac, "num_heads", 1, 4096, INT32_MIN);
		c->kda_head_dim = get_int(&r, lac, "head_dim", 1, 4096, INT32_MIN);
		c->conv_kernel = get_int(&r, lac, "short_conv_kernel_size", 1, 64, INT32_MIN);
		memset(mark, 0, sizeof(mark));
		read_layer_list(&r, lac, "kda_layers", c->n_layers, mark, KL_LAYER_KDA);
		read_layer_list(&r, lac, "full_attn_layers", c->n_layers, mark, KL_LAYER_MLA);
		for (i = 0; i < c->n_layers && !r.failed; i++)
		{
			/* docs/model.md: KDA iff listed in kda_layers, otherwise MLA. */
			c->layer_kind[i] = mark[i] == KL_LAYER_KDA ? KL_LAYER_KDA : KL_LAYER_MLA;
			if (c->layer_kind[i] == KL_LAYER_KDA)
				c->n_kda_layers++;
			else
				c->n_mla_layers++;
		}
	}
	if (!r.failed && (int64_t) c->kda_heads * c->kda_head_dim > MAX_DIM)
	{
		r.failed = true;
		kl_errc(err, KL_E_INVALID, "%s: KDA num_heads x head_dim is too large", what);
	}

	if (c->n_mla_layers > 0 || lookup(root, "num_attention_heads"))
	{
		c->mla_heads = get_int(&r, root, "num_attention_heads", 1, 4096, INT32_MIN);
		c->q_lora_rank = get_int(&r, root, "q_lora_rank", 1, MAX_DIM, 0);
		c->kv_lora_rank = get_int(&r, root, "kv_lora_rank", 1, MAX_DIM, INT32_MIN);
		c->qk_nope_dim = get_int(&r, root, "qk_nope_head_dim", 1, 4096, INT32_MIN);
		c->qk_rope_dim = get_int(&r, root, "qk_rope_head_dim", 0, 4096, INT32_MIN);
		c->v_head_dim = get_int(&r, root, "v_head_dim", 1, 4096, INT32_MIN);
	}

	c->n_experts = get_int(&r, root, "num_experts", 1, 65536, 0);
	if (c->n_experts > 0 && !r.failed)
	{
		c->experts_per_token = get_int(&r, root, "num_experts_per_token", 1, c->n_experts, INT32_MIN);
		c->n_shared_experts = get_int(&r, root, "num_shared_experts", 0, 1024, 0);
		c->moe_intermediate = get_int(&r, root, "moe_intermediate_size", 1, MAX_DIM, INT32_MIN);
		c->first_k_dense = get_int(&r, root, "first_k_dense_replace", 0, KL_MAX_LAYERS, 0);
		c->moe_layer_freq = get_int(&r, root, "moe_layer_freq", 1, KL_MAX_LAYERS, 1);
		c->moe_renormalize = get_bool(&r, root, "moe_renormalize", true);
		c->routed_scaling = (float) get_num(&r, root, "routed_scaling_factor", 0.0, 1e6, 1.0, false);
		c->n_expert_groups = get_int(&r, root, "num_expert_group", 1,
									 c->n_experts < KL_MAX_EXPERT_GROUPS ? c->n_experts : KL_MAX_EXPERT_GROUPS, 1);
		c->topk_groups = get_int(&r, root, "topk_group", 1, c->n_experts, 1);
		s = get_str(&r, root, "moe_router_activation_func", "sigmoid");
		if (!r.failed)
		{
			if (strcmp(s, "sigmoid") == 0)
				c->router_softmax = false;
			else if (strcmp(s, "softmax") == 0)
				c->router_softmax = true;
			else
			{
				r.failed = true;
				kl_errc(err, KL_E_UNSUPPORTED,
						"%s: this moe_router_activation_func is not supported (sigmoid or softmax)", what);
			}
		}
		if (!r.failed && c->n_experts % c->n_expert_groups != 0)
		{
			r.failed = true;
			kl_errc(err, KL_E_INVALID, "%s: num_experts (%d) is not a multiple of num_expert_group (%d)",
					what, c->n_experts, c->n_expert_groups);
		}
		if (!r.failed && c->topk_groups > c->n_expert_groups)
		{
			r.failed = true;
			kl_errc(err, KL_E_INVALID, "%s: topk_group (%d) exceeds num_expert_group (%d)", what,
					c->topk_groups, c->n_expert_groups);
		}
		if (!r.failed && c->experts_per_token > c->topk_groups * (c->n_experts / c->n_expert_groups))
		{
			r.failed = true;
			kl_errc(err, KL_E_INVALID, "%s: num_experts_per_token (%d) exceeds the experts in topk_group groups",
					what, c->experts_per_token);
		}
	}

	json_decref(root);
	return r.failed ? KL_FAIL : KL_OK;
}

int
kl_config_load_under(const char *root, const char *path, kl_config *c, kl_err *err)
{
	char	   *buf;
	size_t		n;
	int			rc;

	if (kl_file_read(root, path, 16 << 20, "a config file", &buf, &n, err) != KL_OK)
		return KL_FAIL;
	rc = kl_config_parse(buf, n, path, c, err);
	free(buf);
	return rc;
}

int
kl_config_load(const char *path, kl_config *c, kl_err *err)
{
	return kl_config_load_under(NULL, path, c, err);
}
