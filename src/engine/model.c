/*
 * model.c — loading a checkpoint: config.json + safetensors -> kl_model.
 *
 * Every tensor the config implies is looked up by its Hugging Face name and
 * checked for dtype and shape; tensors the config does not explain are an
 * error (a checkpoint that does not match its config would otherwise load and
 * produce garbage).  Matrices stay in the mapped files (the backend may
 * convert or upload them); small vectors become fp32 copies.
 *
 * Every file is opened through kl_file.h: with kl_load_opts.root, nothing
 * that resolves outside that directory is read.
 */
#include "model.h"

#include <math.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kl_file.h"
#include "quant_load.h"
#include "tokenizer.h"

typedef struct binder
{
	kl_model   *m;
	kl_err	   *err;
	EVP_MD_CTX *fp;				/* fingerprint hash */
	EVP_MD_CTX *fp_other;		/* the same under the other MoE routing rule (MoE models), else NULL */
	/* random-weight models (benchmarks): no files, weights made by the backend */
	bool		random;
	kl_dtype	random_dtype;
	kl_rng		rng;
} binder;



/* Names of random-model tensors must outlive binding (kl_weight.name). */
static const char *
keep_name(binder *b, const char *name)
{
	kl_model   *m = b->m;

	if (m->n_names == m->cap_names)
	{
		int			cap = m->cap_names ? m->cap_names * 2 : 256;
		char	  **nn = realloc(m->names, sizeof(char *) * (size_t) cap);

		if (!nn)
			return NULL;
		m->names = nn;
		m->cap_names = cap;
	}
	m->names[m->n_names] = strdup(name);
	return m->names[m->n_names] ? m->names[m->n_names++] : NULL;
}

/*
 * Values for a random model's vector parameters, chosen so that the forward
 * pass behaves like a trained model's numerically (decays in the range the
 * reference initializes them to, unit norms, zero router bias).
 */
static float
random_vector_value(binder *b, const char *name, int i)
{
	double		u = (double) (kl_rng_next(&b->rng) >> 11) * (1.0 / 9007199254740992.0);

	(void) i;
	if (strstr(name, "A_log"))
		return logf((float) (1.0 + 15.0 * u));
	if (strstr(name, "dt_bias"))
	{
		/* softplus^-1 of dt, dt log-uniform in [0.001, 0.1] */
		double		dt = exp(log(0.001) + u * (log(0.1) - log(0.001)));

		return (float) (dt + log(-expm1(-dt)));
	}
	if (strstr(name, "conv1d"))
		return (float) ((u * 2 - 1) * 0.5);
	if (strstr(name, "e_score_correction_bias"))
		return 0.0f;
	return 1.0f;				/* norm weights */
}

static void
fp_update(binder *b, const void *p, size_t n)
{
	EVP_DigestUpdate(b->fp, p, n);
	if (b->fp_other)
		EVP_DigestUpdate(b->fp_other, p, n);
}

/* Hash a tensor's identity and a sample of its bytes (not all of them:
 * hashing a 90 GB checkpoint at every load would take minutes). */
static void
fp_tensor(binder *b, const kl_st_tensor *t)
{
	size_t		sample = 64;
	int			points = 16;

	fp_update(b, t->name, strlen(t->name) + 1);
	fp_update(b, &t->dtype, sizeof(t->dtype));
	fp_update(b, t->shape, sizeof(int64_t) * (size_t) t->ndim);
	for (int i = 0; i < points; i++)
	{
		size_t		off = t->nbytes <= sample ? 0 : (t->nbytes - sample) / (size_t) (points - 1) * (size_t) i;
		size_t		len = t->nbytes - off < sample ? t->nbytes - off : sample;

		fp_update(b, (const uint8_t *) t->data + off, len);
		if (t->nbytes <= sample)
			break;
	}
}

static kl_st_tensor *
find_tensor(binder *b, const char *name, bool count_params)
{
	kl_st_tensor *t = kl_st_find(&b->m->st, name);

	if (!t)
	{
		kl_errc(b->err, KL_E_INVALID, "%s: tensor \"%s\" is missing (the checkpoint does not match its config.json)",
				b->m->dir, name);
		return NULL;
	}
	if (t->used)
	{
		kl_errc(b->err, KL_E_INVALID, "%s: tensor \"%s\" bound twice", b->m->dir, name);
		return NULL;
	}
	t->used = true;
	if (count_params)
		b->m->n_params += t->numel;
	b->m->weight_bytes += t->nbytes;
	fp_tensor(b, t);
	return t;
}

static kl_st_tensor *
find(binder *b, const char *name)
{
	return find_tensor(b, name, true);
}

static const char *
shape_str(const kl_st_tensor *t, char *buf, size_t len)
{
	size_t		o = 0;

	o += snprintf(buf + o, len - o, "[");
	for (int i = 0; i < t->ndim && o < len; i++)
		o += snprintf(buf + o, len - o, "%s%lld", i ? ", " : "", (long long) t->shape[i]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
	return buf;
}

/* Memory the loader made for the model (quantized data, scales); freed with it. */
static int
keep_alloc(binder *b, void *p)
{
	kl_model   *m = b->m;

	if (!p)
		return KL_OK;
	if (m->n_allocs == m->cap_allocs)
	{
		int			cap = m->cap_allocs ? m->cap_allocs * 2 : 256;
		void	  **na = realloc(m->allocs, sizeof(void *) * (size_t) cap);

		if (!na)
		{
			free(p);
			return kl_errc(b->err, KL_E_RESOURCES, "out of memory");
		}
		m->allocs = na;
		m->cap_allocs = cap;
	}
	m->allocs[m->n_allocs++] = p;
	return KL_OK;
}

/* Bookkeeping once a weight has its final form, then hand it to the backend;
 * a backend that does not compute with quantized weights gets bf16. */
static int
finish_weight(binder *b, kl_weight *w, const char *name)
{
	kl_model   *m = b->m;
	kl_backend *be = m->be;
	uint16_t   *tmp = NULL;
	int			rc;

	m->n_matrices++;
	if (w->q.type != KL_Q_NONE)
		m->n_quantized++;
	if (w->q.type == KL_Q_FP8 && be->ops->quantized_weights)
		m->n_fp8++;
	if (w->q.type != KL_Q_NONE && !be->ops->quantized_weights)
	{
		/* (load_weight of such a backend copies the data before returning) */
		tmp = kl_malloc(sizeof(uint16_t) * (size_t) w->rows * w->cols, b->err);
		if (!tmp || kl_qload_to_bf16(&w->q, tmp, b->err) != KL_OK)
		{
			free(tmp);
			return kl_err_prefix(b->err, "%s: dequantizing tensor \"%s\" for the %s backend", m->dir, name,
								 be->ops->name);
		}
		memset(&w->q, 0, sizeof(w->q));
		w->dtype = KL_DT_BF16;
		w->host = tmp;
		m->n_dequantized++;
	}
	if (w->q.type != KL_Q_NONE)
		m->resident_bytes += kl_q_bytes(&w->q);
	else
		m->resident_bytes += (uint64_t) w->rows * w->cols * (w->dtype == KL_DT_BF16 ? 2 : 4);
	rc = be->ops->load_weight(be, w, b->err);
	if (tmp)
	{
		free(tmp);
		w->host = NULL;
	}
	if (rc != KL_OK)
		return kl_err_prefix(b->err, "%s: tensor \"%s\"", m->dir, name);
	return KL_OK;
}

/* Quantize the f32/bf16/f16 matrix at src into w's quantized form. */
static int
quantize_at_load(binder *b, kl_weight *w, kl_qtype type, const void *src, kl_dtype dtype, const char *name)
{
	void	   *mem[2];
	kl_qmat		q;
	int			rc = kl_qload_quantize(src, dtype, w->rows, w->cols, type,
									   kl_q_default_group(type, w->cols), &q, mem, b->err);

	if (keep_alloc(b, mem[0]) != KL_OK || keep_alloc(b, mem[1]) != KL_OK || rc != KL_OK)
		return kl_err_prefix(b->err, "quantizing tensor \"%s\"", name);
	w->q = q;
	return KL_OK;
}

static int
bind_random_matrix(binder *b, kl_weight *w, int rows, int cols, const char *name)
{
	kl_model   *m = b->m;
	kl_qtype	qt = kl_q_at_load(name, m->quantize);

	memset(w, 0, sizeof(*w));
	w->name = keep_name(b, name);
	w->dtype = b->random_dtype;
	w->rows = rows;
	w->cols = cols;
	if (!w->name)
		return kl_errc(b->err, KL_E_RESOURCES, "out of memory");
	m->n_params += (int64_t) rows * cols;
	m->weight_bytes += (uint64_t) rows * cols * kl_dtype_size(w->dtype);
	m->n_matrices++;
	if (qt != KL_Q_NONE && m->be->ops->random_quantized)
	{
		/* the backend makes the quantized form itself, in its own memory */
		w->q.type = qt;
		w->q.rows = rows;
		w->q.cols = cols;
		w->q.group = kl_q_default_group(qt, cols);
		w->q.n_groups = (cols + w->q.group - 1) / w->q.group;
		w->q.row_bytes = kl_q_row_bytes(qt, cols);
	}
	if (m->be->ops->init_random_weight(m->be, w, kl_rng_next(&b->rng),
									   1.0f / sqrtf((float) cols), b->err) != KL_OK)
		return kl_err_prefix(b->err, "random tensor \"%s\"", name);
	if (qt != KL_Q_NONE && m->be->ops->random_quantized)
	{
		m->n_quantized++;
		m->n_fp8 += qt == KL_Q_FP8;
		m->resident_bytes += kl_q_bytes(&w->q);
		return KL_OK;
	}
	if (qt == KL_Q_NONE)
	{
		m->resident_bytes += (uint64_t) rows * cols * kl_dtype_size(w->dtype);
		return KL_OK;
	}
	/* quantize the random weights (made in host memory: the CPU backend) */
	if (quantize_at_load(b, w, qt, w->dev, w->dtype, name) != KL_OK)
		return KL_FAIL;
	{
		kl_qmat		q = w->q;

		memset(&w->q, 0, sizeof(w->q));
		m->be->ops->unload_weight(m->be, w);	/* the random f32 / bf16 copy */
		w->q = q;
	}
	m->n_matrices--;			/* counted again below */
	return finish_weight(b, w, name);
}

/*
 * A matrix stored quantized in a published format (quant_config.h): its
 * tensors module.weight (F8_E4M3 / I8) or module.weight_packed +
 * weight_shape, and module.weight_scale (or weight_scale_inv).
 */
static int
bind_stored_quantized(binder *b, kl_weight *w, int rows, int cols, const char *name, const char *module)
{
	kl_model   *m = b->m;
	kl_qtensors qt = {0};
	char		tn[300];
	void	   *mem[2];
	kl_qmat		q;
	int			rc;
	kl_wrole	role = kl_q_role(name);

	if (m->qcfg.scheme == KL_QS_NONE)
		return kl_errc(b->err, KL_E_INVALID, "%s: tensor \"%s\" is stored quantized, but config.json has no "
					   "quantization_config saying how to read it", m->dir, name);
	if (role == KL_W_EMBED || role == KL_W_ROUTER)
		return kl_errc(b->err, KL_E_UNSUPPORTED,
					   "%s: tensor \"%s\" is quantized; quantized %s weights are not supported "
					   "(only the linear projections, experts and lm_head may be)", m->dir, name,
					   role == KL_W_EMBED ? "embedding" : "MoE router");
	if (kl_qconfig_expects(&m->qcfg, module, true) == 0)
		return kl_errc(b->err, KL_E_INVALID,
					   "%s: tensor \"%s\" is stored quantized, but config.json's quantization_config "
					   "does not quantize module %s (not targeted, or ignored)", m->dir, name, module);
	if (m->qcfg.scheme == KL_QS_CT_PACKED)
	{
		snprintf(tn, sizeof(tn), "%s.weight_packed", module);
		if (!(qt.packed = find_tensor(b, tn, false)))
			return KL_FAIL;
		snprintf(tn, sizeof(tn), "%s.weight_shape", module);
		if (!(qt.shape = find_tensor(b, tn, false)))
			return KL_FAIL;
	}
	else if (!(qt.weight = find_tensor(b, name, false)))
		return KL_FAIL;
	snprintf(tn, sizeof(tn), "%s.%s", module, m->qcfg.scheme == KL_QS_FP8_BLOCK ? "weight_scale_inv" : "weight_scale");
	if (!(qt.scale = find_tensor(b, tn, false)))
		return KL_FAIL;
	m->n_params += (int64_t) rows * cols;
	rc = kl_qload_matrix(&m->qcfg, &qt, rows, cols, &q, mem, b->err);
	if (keep_alloc(b, mem[0]) != KL_OK || keep_alloc(b, mem[1]) != KL_OK || rc != KL_OK)
		return kl_err_prefix(b->err, "%s: quantized matrix %s", m->dir, module);
	memset(w, 0, sizeof(*w));
	w->name = keep_name(b, name);
	if (!w->name)
		return kl_errc(b->err, KL_E_RESOURCES, "out of memory");
	w->dtype = q.type == KL_Q_INT4 ? KL_DT_I32 : q.type == KL_Q_INT8 ? KL_DT_I8 : KL_DT_F8_E4M3;
	w->rows = rows;
	w->cols = cols;
	w->q = q;
	return finish_weight(b, w, name);
}

/* Parameters of quantization schemes the engine does not implement. */
static int
refuse_unsupported_parts(binder *b, const char *module)
{
	static const struct
	{
		const char *suffix;
		const char *what;
	}			parts[] = {
		{"input_scale", "static activation scales"},
		{"weight_zero_point", "zero points (asymmetric quantization)"},
		{"weight_g_idx", "activation-order group indices"},
		{"weight_global_scale", "global scales (NVFP4)"},
		{"output_scale", "output activation scales"},
		{"qweight", "AWQ / GPTQ packed weights"},
	};
	char		tn[300];

	for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++)
	{
		snprintf(tn, sizeof(tn), "%s.%s", module, parts[i].suffix);
		if (kl_st_find(&b->m->st, tn))
			return kl_errc(b->err, KL_E_UNSUPPORTED,
						   "%s: tensor \"%s\": %s are not supported", b->m->dir, tn, parts[i].what);
	}
	return KL_OK;
}

static int
bind_matrix(binder *b, kl_weight *w, int rows, int cols, const char *fmt,...)
	__attribute__((format(printf, 5, 6)));

static int
bind_matrix(binder *b, kl_weight *w, int rows, int cols, const char *fmt,...)
{
	char		name[256];
	char		module[256];
	char		tn[300];
	char		sbuf[128];
	va_list		ap;
	kl_st_tensor *t;
	kl_model   *m = b->m;
	kl_wrole	role;
	kl_qtype	qt;
	size_t		len;

	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	if (b->random)
		return bind_random_matrix(b, w, rows, cols, name);
	role = kl_q_role(name);
	len = strlen(name);
	snprintf(module, sizeof(module), "%.*s", (int) (len > 7 ? len - 7 : len), name);	/* minus ".weight" */
	if (refuse_unsupported_parts(b, module) != KL_OK)
		return KL_FAIL;
	snprintf(tn, sizeof(tn), "%s.weight_packed", module);
	t = kl_st_find(&m->st, name);
	if (kl_st_find(&m->st, tn) || (t && (t->dtype == KL_DT_F8_E4M3 || t->dtype == KL_DT_I8)))
	{
		if (m->quantize != KL_Q_NONE)
			return kl_errc(b->err, KL_E_INVALID,
						   "%s: tensor \"%s\" is already quantized; quantization at load applies to "
						   "F32, BF16 and F16 checkpoints", m->dir, name);
		return bind_stored_quantized(b, w, rows, cols, name, module);
	}
	if (!(t = find(b, name)))
		return KL_FAIL;
	if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
		return kl_errc(b->err, KL_E_INVALID, "%s: tensor \"%s\" has shape %s, but config.json implies [%d, %d]",
					   m->dir, name, shape_str(t, sbuf, sizeof(sbuf)), rows, cols);
	if (t->dtype != KL_DT_F32 && t->dtype != KL_DT_BF16 && t->dtype != KL_DT_F16)
		return kl_errc(b->err, KL_E_INVALID, "%s: tensor \"%s\" has dtype %s; weights must be F32, BF16 or F16 (or a "
					   "quantized format config.json's quantization_config describes)",
					   m->dir, name, kl_dtype_name(t->dtype));
	if (kl_qconfig_expects(&m->qcfg, module, role != KL_W_EMBED && role != KL_W_ROUTER) == 1)
		return kl_errc(b->err, KL_E_INVALID, "%s: config.json's quantization_config (%s) quantizes module %s, but its "
					   "weight is stored as %s", m->dir, m->qcfg.describe, module, kl_dtype_name(t->dtype));
	memset(w, 0, sizeof(*w));
	w->name = t->name;
	w->dtype = t->dtype;
	w->rows = rows;
	w->cols = cols;
	w->host = t->data;
	qt = kl_q_at_load(name, m->quantize);
	if (qt != KL_Q_NONE && quantize_at_load(b, w, qt, t->data, t->dtype, name) != KL_OK)
		return kl_err_prefix(b->err, "%s", m->dir);
	return finish_weight(b, w, name);
}

/*
 * A vector parameter of n elements.  Checkpoints store some with extra unit
 * dimensions (A_log is [1, 1, H, 1], conv kernels [H*K, 1, W]): any shape
 * whose dimensions other than 1 are `dims` is accepted.
 */
static int
bind_vector(binder *b, float **out, int n, const int *dims, int ndims, const char *fmt,...)
	__attribute__((format(printf, 6, 7)));

static int
bind_vector(binder *b, float **out, int n, const int *dims, int ndims, const char *fmt,...)
{
	char		name[256];
	char		sbuf[128];
	va_list		ap;
	kl_st_tensor *t;
	int			j = 0;
	float	   *tmp;
	kl_model   *m = b->m;

	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	if (b->random)
	{
		t = NULL;
		tmp = kl_malloc(sizeof(float) * (size_t) n, b->err);
		if (!tmp)
			return KL_FAIL;
		for (int i = 0; i < n; i++)
			tmp[i] = random_vector_value(b, name, i);
		b->m->n_params += n;
		b->m->weight_bytes += sizeof(float) * (size_t) n;
		goto upload;
	}
	if (!(t = find(b, name)))
		return KL_FAIL;
	for (int i = 0; i < t->ndim; i++)
	{
		if (t->shape[i] == 1 && !(j < ndims && dims[j] == 1))
			continue;
		if (j >= ndims || t->shape[i] != dims[j])
			goto bad;
		j++;
	}
	if (j != ndims || t->numel != n)
		goto bad;
	tmp = kl_malloc(sizeof(float) * (size_t) n, b->err);
	if (!tmp)
		return KL_FAIL;
	if (kl_st_to_f32(t, tmp, b->err) != KL_OK)
	{
		free(tmp);
		return kl_err_prefix(b->err, "%s", m->dir);
	}
upload:
	if (m->n_vecs == m->cap_vecs)
	{
		int			cap = m->cap_vecs ? m->cap_vecs * 2 : 64;
		float	  **nv = realloc(m->vecs, sizeof(float *) * (size_t) cap);

		if (!nv)
		{
			free(tmp);
			return kl_errc(b->err, KL_E_RESOURCES, "out of memory");
		}
		m->vecs = nv;
		m->cap_vecs = cap;
	}
	*out = m->be->ops->alloc(m->be, sizeof(float) * (size_t) n);
	if (!*out)
	{
		free(tmp);
		return kl_errc(b->err, KL_E_RESOURCES,
					   "%s: out of %s memory for tensor \"%s\"", m->dir, m->be->ops->name, name);
	}
	m->be->ops->upload(m->be, *out, tmp, sizeof(float) * (size_t) n);
	m->vecs[m->n_vecs++] = *out;
	m->resident_bytes += sizeof(float) * (size_t) n;
	free(tmp);
	return KL_OK;
bad:
	{
		char		want[128];
		size_t		o = 0;

		o += snprintf(want + o, sizeof(want) - o, "[");
		for (int i = 0; i < ndims && o < sizeof(want); i++)
			o += snprintf(want + o, sizeof(want) - o, "%s%d", i ? ", " : "", dims[i]);
		if (o < sizeof(want))
			snprintf(want + o, sizeof(want) - o, "]");
		return kl_errc(b->err, KL_E_INVALID, "%s: tensor \"%s\" has shape %s, but config.json implies %s",
					   m->dir, name, shape_str(t, sbuf, sizeof(sbuf)), want);
	}
}

#define VEC1(b, out, n0, ...) \
	bind_vector(b, out, (n0), (int[]){n0}, 1, __VA_ARGS__)
#define VEC2(b, out, n0, n1, ...) \
	bind_vector(b, out, (n0) * (n1), (int[]){n0, n1}, 2, __VA_ARGS__)

static int
bind_mlp(binder *b, kl_mlp *mlp, int D, int I, const char *prefix, const char *gate,
		 const char *up, const char *down)
{
	if (bind_matrix(b, &mlp->gate, I, D, "%s.%s.weight", prefix, gate) != KL_OK ||
		bind_matrix(b, &mlp->up, I, D, "%s.%s.weight", prefix, up) != KL_OK ||
		bind_matrix(b, &mlp->down, D, I, "%s.%s.weight", prefix, down) != KL_OK)
		return KL_FAIL;
	return KL_OK;
}

static int
bind_layer(binder *b, int i, int *n_kda, int *n_mla)
{
	const kl_config *c = &b->m->cfg;
	kl_layer   *L = &b->m->layers[i];
	int			D = c->hidden_size;
	char		p[128];

	snprintf(p, sizeof(p), "model.layers.%d", i);
	L->kind = c->layer_kind[i];
	if (VEC1(b, &L->input_norm, D, "%s.input_layernorm.weight", p) != KL_OK ||
		VEC1(b, &L->post_norm, D, "%s.post_attention_layernorm.weight", p) != KL_OK)
		return KL_FAIL;

	if (L->kind == KL_LAYER_KDA)
	{
		kl_kda_layer *k = &L->kda;
		int			H = c->kda_heads,
					K = c->kda_head_dim,
					HK = H * K,
					W = c->conv_kernel;

		L->kind_index = (*n_kda)++;
		if (bind_matrix(b, &k->q_proj, HK, D, "%s.self_attn.q_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->k_proj, HK, D, "%s.self_attn.k_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->v_proj, HK, D, "%s.self_attn.v_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->f_a, K, D, "%s.self_attn.f_a_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->f_b, HK, K, "%s.self_attn.f_b_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->b_proj, H, D, "%s.self_attn.b_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->g_a, K, D, "%s.self_attn.g_a_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->g_b, HK, K, "%s.self_attn.g_b_proj.weight", p) != KL_OK ||
			bind_matrix(b, &k->o_proj, D, HK, "%s.self_attn.o_proj.weight", p) != KL_OK ||
			VEC2(b, &k->conv_q, HK, W, "%s.self_attn.q_conv1d.weight", p) != KL_OK ||
			VEC2(b, &k->conv_k, HK, W, "%s.self_attn.k_conv1d.weight", p) != KL_OK ||
			VEC2(b, &k->conv_v, HK, W, "%s.self_attn.v_conv1d.weight", p) != KL_OK ||
			VEC1(b, &k->A_log, H, "%s.self_attn.A_log", p) != KL_OK ||
			VEC1(b, &k->dt_bias, HK, "%s.self_attn.dt_bias", p) != KL_OK ||
			VEC1(b, &k->o_norm, K, "%s.self_attn.o_norm.weight", p) != KL_OK)
			return KL_FAIL;
	}
	else
	{
		kl_mla_layer *a = &L->mla;
		int			Ha = c->mla_heads,
					R = c->kv_lora_rank,
					Dq = c->qk_nope_dim + c->qk_rope_dim;

		L->kind_index = (*n_mla)++;
		if (c->q_lora_rank > 0)
		{
			if (bind_matrix(b, &a->q_a, c->q_lora_rank, D, "%s.self_attn.q_a_proj.weight", p) != KL_OK ||
				VEC1(b, &a->q_a_norm, c->q_lora_rank, "%s.self_attn.q_a_layernorm.weight", p) != KL_OK ||
				bind_matrix(b, &a->q_b, Ha * Dq, c->q_lora_rank, "%s.self_attn.q_b_proj.weight", p) != KL_OK)
				return KL_FAIL;
		}
		else if (bind_matrix(b, &a->q_proj, Ha * Dq, D, "%s.self_attn.q_proj.weight", p) != KL_OK)
			return KL_FAIL;
		if (bind_matrix(b, &a->kv_a, R + c->qk_rope_dim, D, "%s.self_attn.kv_a_proj_with_mqa.weight", p) != KL_OK ||
			VEC1(b, &a->kv_a_norm, R, "%s.self_attn.kv_a_layernorm.weight", p) != KL_OK ||
			bind_matrix(b, &a->kv_b, Ha * (c->qk_nope_dim + c->v_head_dim), R,
						"%s.self_attn.kv_b_proj.weight", p) != KL_OK ||
			bind_matrix(b, &a->o_proj, D, Ha * c->v_head_dim, "%s.self_attn.o_proj.weight", p) != KL_OK)
			return KL_FAIL;
		if (b->m->be->ops->prepare_mla(b->m->be, a, b->err) != KL_OK)
			return kl_err_prefix(b->err, "%s: layer %d", b->m->dir, i);
	}

	L->is_moe = kl_layer_is_moe(c, i);
	if (!L->is_moe)
	{
		snprintf(p, sizeof(p), "model.layers.%d.mlp", i);
		return bind_mlp(b, &L->mlp, D, c->intermediate_size, p, "gate_proj", "up_proj", "down_proj");
	}
	else
	{
		kl_moe_layer *moe = &L->moe;
		int			E = c->n_experts,
					F = c->moe_intermediate;

		snprintf(p, sizeof(p), "model.layers.%d.block_sparse_moe", i);
		if (bind_matrix(b, &moe->router, E, D, "%s.gate.weight", p) != KL_OK ||
			VEC1(b, &moe->score_bias, E, "%s.gate.e_score_correction_bias", p) != KL_OK)
			return KL_FAIL;
		moe->experts = kl_calloc((size_t) E, sizeof(kl_mlp), b->err);
		if (!moe->experts)
			return KL_FAIL;
		for (int e = 0; e < E; e++)
		{
			char		ep[160];

			snprintf(ep, sizeof(ep), "%s.experts.%d", p, e);
			if (bind_mlp(b, &moe->experts[e], D, F, ep, "w1", "w3", "w2") != KL_OK)
				return KL_FAIL;
		}
		if (c->n_shared_experts > 0)
		{
			char		sp[160];

			snprintf(sp, sizeof(sp), "%s.shared_experts", p);
			moe->has_shared = true;
			if (bind_mlp(b, &moe->shared, D, F * c->n_shared_experts, sp,
						 "gate_proj", "up_proj", "down_proj") != KL_OK)
				return KL_FAIL;
		}
	}
	return KL_OK;
}

/*
 * The configuration's part of the fingerprint.  `routing` is the routing
 * flag hashed: for MoE models the rule in force (1 = reference), for dense
 * models, where no rule applies, the value this recipe has always hashed
 * (1 for kimi_linear, 0 for kimi_k3), so that their states stay valid.
 */
static int
fp_config_string(const kl_config *c, int routing, char *buf, size_t size)
{
	return snprintf(buf, size,
				 "kl-fingerprint-v1 %s V%d D%d L%d I%d eps%a kda%d/%d/%d mla%d/%d/%d/%d/%d/%d "
				 "moe%d/%d/%d/%d/%d/%d/%d/%d/%a/%d/%d/%d",
				 c->model_type, c->vocab_size, c->hidden_size, c->n_layers, c->intermediate_size,
				 c->rms_norm_eps, c->kda_heads, c->kda_head_dim, c->conv_kernel,
				 c->mla_heads, c->q_lora_rank, c->kv_lora_rank, c->qk_nope_dim, c->qk_rope_dim,
				 c->v_head_dim, c->n_experts, c->experts_per_token, c->n_shared_experts,
				 c->moe_intermediate, c->first_k_dense, c->moe_layer_freq, c->router_softmax,
				 c->moe_renormalize, c->routed_scaling, c->n_expert_groups, c->topk_groups,
				 routing);
}

static void
fp_config(binder *b, const kl_config *c)
{
	char		buf[1024];
	int			routing = c->n_experts > 0 ? c->bias_in_weights : strcmp(c->model_type, "kimi_linear") == 0;
	int			n = fp_config_string(c, routing, buf, sizeof(buf));

	EVP_DigestUpdate(b->fp, buf, (size_t) n);
	if (b->fp_other)
	{
		n = fp_config_string(c, !routing, buf, sizeof(buf));
		EVP_DigestUpdate(b->fp_other, buf, (size_t) n);
	}
	for (int i = 0; i < c->n_layers; i++)
		buf[i % sizeof(buf)] = (char) c->layer_kind[i];
	fp_update(b, buf, (size_t) (c->n_layers < (int) sizeof(buf) ? c->n_layers : (int) sizeof(buf)));
}

/*
 * The fingerprint of a model quantized at load: the checkpoint's digest
 * (config, tensors) hashed with the quantization method, so that a state
 * made with one quantization is refused by another (the method's version
 * is part of it: a change of method must change it).  Unquantized: the
 * digest itself, as before quantization existed.
 */
static void
quantized_fingerprint(const uint8_t base[32], kl_qtype q, uint8_t out[16])
{
	uint8_t		d[EVP_MAX_MD_SIZE];
	unsigned	dl = 0;
	char		how[96];
	EVP_MD_CTX *c;

	if (q == KL_Q_NONE)
	{
		memcpy(out, base, 16);
		return;
	}
	snprintf(how, sizeof(how), "kl-quantize-v1 %s group %d lm_head", kl_qtype_name(q), kl_q_default_group(q, 0));
	c = EVP_MD_CTX_new();
	if (c && EVP_DigestInit_ex(c, EVP_sha256(), NULL) == 1 && EVP_DigestUpdate(c, base, 32) == 1 &&
		EVP_DigestUpdate(c, how, strlen(how)) == 1 && EVP_DigestFinal_ex(c, d, &dl) == 1)
		memcpy(out, d, 16);
	else
		memset(out, 0xff, 16);	/* (out of memory in OpenSSL: matches no state) */
	EVP_MD_CTX_free(c);
}

/* kl_model_weight_format(): what the matrices are, in a few words */
static void
describe_weights(kl_model *m)
{
	char	   *o = m->weight_format;
	size_t		len = sizeof(m->weight_format);
	const char *plain;

	if (m->embed.dtype == KL_DT_F32 && m->lm_head.dtype == KL_DT_F32)
		plain = "f32";
	else if (m->embed.dtype == KL_DT_F16)
		plain = "f16";
	else
		plain = "bf16";
	if (m->quantize != KL_Q_NONE)
		snprintf(o, len, "%s%s (quantized at load from %s)", kl_qtype_name(m->quantize),
				 m->quantize == KL_Q_INT4 ? " g32" : " per channel", plain);
	else if (m->n_quantized > 0)
		snprintf(o, len, "%s", m->qcfg.describe);
	else
		snprintf(o, len, "%s", plain);
	if (m->n_dequantized > 0)
	{
		size_t		n = strlen(o);

		snprintf(o + n, len - n, ", dequantized to bf16 on %s", m->be->ops->name);
	}
}

int
kl_model_quantization_of(const kl_model *m, const uint8_t fingerprint[16])
{
	static const kl_qtype all[] = {KL_Q_NONE, KL_Q_FP8, KL_Q_INT8, KL_Q_INT4};

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
	{
		uint8_t		fp[16];

		quantized_fingerprint(m->base_digest, all[i], fp);
		if (memcmp(fp, fingerprint, 16) == 0)
			return (int) all[i];
	}
	return -1;
}


/* whether dir has an entry by this name (a link counts, wherever it points: kl_file_present) */
static bool
dir_has(const char *dir, const char *file)
{
	char		path[4096];

	snprintf(path, sizeof(path), "%s/%s", dir, file);
	return kl_file_present(path);
}

/*
 * dir must be a directory, and with a root, resolve inside it: a directory
 * outside (through a link) gets the error of a missing one.
 */
static int
check_dir(const char *dir, const char *root, kl_err *err)
{
	struct stat sb;
	int			fd;

	if (root)
	{
		/* opening the directory itself, confined, answers both questions */
		if (kl_file_open(root, dir, &fd, err) != KL_OK)
			return kl_errc(err, KL_E_INVALID, "%s is not a directory (a model is a directory with config.json and "
						   "safetensors weights)", dir);
		if (fstat(fd, &sb) != 0 || !S_ISDIR(sb.st_mode))
		{
			close(fd);
			return kl_errc(err, KL_E_INVALID, "%s is not a directory (a model is a directory with config.json and "
						   "safetensors weights)", dir);
		}
		close(fd);
		return KL_OK;
	}
	if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
		return kl_errc(err, KL_E_INVALID, "%s is not a directory (a model is a directory with config.json and "
					   "safetensors weights)", dir);
	return KL_OK;
}

/*
 * The backend the options ask for, and the precision it runs in (kl.h):
 * "auto" (or none) is bf16 on the GPU and fp32 on the CPU.  The CPU engine
 * has no bf16 arithmetic (it reads bf16 weights, and computes in fp32), so
 * an explicit bf16 there is refused rather than silently ignored; so is
 * fp8 (bf16 plus FP8 activations in the prefill products of FP8 weights:
 * the GPU only, and only for models with FP8 weights, bind_all checks).
 */
static int
create_backend(kl_model *m, const kl_load_opts *opts, kl_err *err)
{
	const char *device = (opts && opts->device) ? opts->device : "cpu";
	const char *asked = (opts && opts->precision) ? opts->precision : "auto";
	bool		on_gpu = strcmp(device, "cuda") == 0 || strcmp(device, "auto") == 0;
	kl_backend_opts bo;
	kl_err		gpu_err;

	bo.device_index = opts ? opts->device_index : 0;
	if (strcmp(asked, "auto") != 0 && strcmp(asked, "fp32") != 0 && strcmp(asked, "bf16") != 0 &&
		strcmp(asked, "fp8") != 0)
		return kl_errc(err, KL_E_INVALID, "unknown precision \"%s\" (use auto, fp32, bf16 or fp8; auto is bf16 on "
					   "the GPU and fp32 on the CPU)", asked);
	if (!on_gpu && strcmp(device, "cpu") != 0)
		return kl_errc(err, KL_E_INVALID, "unknown device \"%s\" (use cpu, cuda or auto)", device);
	if (on_gpu)
	{
		bo.precision = strcmp(asked, "auto") == 0 ? "bf16" : asked;
		if (kl_backend_cuda_create(&m->cfg, &bo, &m->be, &gpu_err) == KL_OK)
		{
			m->precision = strcmp(bo.precision, "bf16") == 0 ? "bf16" : strcmp(bo.precision, "fp8") == 0 ? "fp8" :
				"fp32";
			return KL_OK;
		}
		*err = gpu_err;
		if (strcmp(device, "cuda") == 0)
			return KL_FAIL;
		/* device auto: no usable GPU, run on the CPU (below) */
		if (strcmp(asked, "bf16") == 0 || strcmp(asked, "fp8") == 0)
			return kl_errc(err, KL_E_UNSUPPORTED, "precision %s runs only on the GPU, and there is none usable "
						   "here (%s): use precision auto (bf16 on the GPU, fp32 on the CPU) or fp32", asked,
						   gpu_err.msg);
	}
	else if (strcmp(asked, "bf16") == 0 || strcmp(asked, "fp8") == 0)
		return kl_errc(err, KL_E_UNSUPPORTED, "precision %s runs only on the GPU (device cuda): the CPU engine "
					   "computes in fp32; use precision fp32 or auto (bf16 on the GPU, fp32 on the CPU)", asked);
	bo.precision = "fp32";
	m->precision = "fp32";
	return kl_backend_cpu_create(&m->cfg, &bo, &m->be, err);
}

/* Bind every tensor the config implies (from the files, or random). */
static int
bind_all(kl_model *m, binder *b, kl_err *err)
{
	int			n_kda = 0,
				n_mla = 0;
	uint8_t		digest[EVP_MAX_MD_SIZE];
	unsigned	dlen = 0;
	int			rc = KL_FAIL;

	b->m = m;
	b->err = err;
	b->fp = EVP_MD_CTX_new();
	b->fp_other = m->cfg.n_experts > 0 ? EVP_MD_CTX_new() : NULL;
	if (!b->fp || EVP_DigestInit_ex(b->fp, EVP_sha256(), NULL) != 1 ||
		(m->cfg.n_experts > 0 && (!b->fp_other || EVP_DigestInit_ex(b->fp_other, EVP_sha256(), NULL) != 1)))
	{
		EVP_MD_CTX_free(b->fp);
		EVP_MD_CTX_free(b->fp_other);
		return kl_errc(err, KL_E_INTERNAL, "cannot initialize SHA-256");
	}
	fp_config(b, &m->cfg);
	if (b->random)
		fp_update(b, &b->rng, sizeof(b->rng));
	m->layers = kl_calloc((size_t) m->cfg.n_layers, sizeof(kl_layer), err);
	if (!m->layers ||
		bind_matrix(b, &m->embed, m->cfg.vocab_size, m->cfg.hidden_size, "model.embed_tokens.weight") != KL_OK)
		goto out;
	for (int i = 0; i < m->cfg.n_layers; i++)
		if (bind_layer(b, i, &n_kda, &n_mla) != KL_OK)
			goto out;
	if (VEC1(b, &m->final_norm, m->cfg.hidden_size, "model.norm.weight") != KL_OK ||
		bind_matrix(b, &m->lm_head, m->cfg.vocab_size, m->cfg.hidden_size, "lm_head.weight") != KL_OK)
		goto out;
	for (int i = 0; i < m->st.n_tensors; i++)
		if (!m->st.tensors[i].used)
		{
			kl_errc(err, KL_E_INVALID,
					"%s: unexpected tensor \"%s\" in %s (the checkpoint does not match its config.json)",
					m->dir, m->st.tensors[i].name, m->st.files[m->st.tensors[i].file].path);
			goto out;
		}
	EVP_DigestFinal_ex(b->fp, digest, &dlen);
	memcpy(m->base_digest, digest, 32);
	quantized_fingerprint(m->base_digest, m->quantize, m->fingerprint);
	if (b->fp_other)
	{
		EVP_DigestFinal_ex(b->fp_other, digest, &dlen);
		memcpy(m->base_digest_other_routing, digest, 32);
		quantized_fingerprint(m->base_digest_other_routing, m->quantize, m->fingerprint_other_routing);
		m->has_other_routing = true;
	}
	describe_weights(m);
	if (strcmp(m->precision, "fp8") == 0 && m->n_fp8 == 0)
	{
		/* (FP8 activations are for the products of FP8 weights: without any the mode would be bf16) */
		kl_errc(err, KL_E_INVALID, "%s: precision fp8 needs FP8 weights (an FP8 checkpoint, or quantize fp8 at "
				"load); this model has none: use precision bf16", m->dir ? m->dir : "model");
		goto out;
	}
	rc = KL_OK;
out:
	EVP_MD_CTX_free(b->fp);
	EVP_MD_CTX_free(b->fp_other);
	return rc;
}

/* The load options that change the computation (checked before anything is bound). */
static int
apply_routing(kl_config *c, const kl_load_opts *opts, kl_err *err)
{
	const char *r = opts ? opts->moe_routing : NULL;

	if (!r || strcmp(r, "select") == 0)
		c->bias_in_weights = false;
	else if (strcmp(r, "reference") == 0)
		c->bias_in_weights = true;
	else
		return kl_errc(err, KL_E_INVALID,
					   "MoE routing \"%.64s\" is unknown: use \"select\" (the default: the router bias "
					   "chooses the experts, the scores weight them) or \"reference\" (the bias is added into "
					   "the weights too, as the released kimi_linear code does)", r);
	return KL_OK;
}

int
kl_model_load(const char *dir, const kl_load_opts *opts, kl_model **out, kl_err *err)
{
	kl_model   *m;
	binder		b;
	char		path[4096];
	const char *root = opts ? opts->root : NULL;

	*out = NULL;
	if (!dir || !*dir)
		return kl_errc(err, KL_E_INVALID, "no model directory given");
	if (strlen(dir) > 3000)
		return kl_errc(err, KL_E_INVALID, "model directory path is too long");
	if (check_dir(dir, root, err) != KL_OK)
		return KL_FAIL;
	m = kl_calloc(1, sizeof(kl_model), err);
	if (!m)
		return KL_FAIL;
	m->dir = strdup(dir);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	if (!m->dir || kl_config_load_under(root, path, &m->cfg, err) != KL_OK ||
		apply_routing(&m->cfg, opts, err) != KL_OK ||
		kl_qconfig_load(root, path, &m->qcfg, err) != KL_OK ||
		kl_qtype_parse(opts ? opts->quantize : NULL, &m->quantize, err) != KL_OK)
		goto fail;
	if (m->quantize != KL_Q_NONE && m->qcfg.scheme != KL_QS_NONE)
	{
		kl_errc(err, KL_E_INVALID,
				"%s is already quantized (%s); quantization at load (%s) applies to F32, BF16 and F16 "
				"checkpoints", dir, m->qcfg.describe, kl_qtype_name(m->quantize));
		goto fail;
	}
	if (create_backend(m, opts, err) != KL_OK ||
		kl_st_open_dir(dir, root, &m->st, err) != KL_OK)
		goto fail;
	memset(&b, 0, sizeof(b));
	if (bind_all(m, &b, err) != KL_OK)
		goto fail;
	if (!(opts && opts->no_tokenizer) && dir_has(dir, "tiktoken.model") &&
		kl_tokenizer_load_under(dir, root, &m->tok, err) != KL_OK)
		goto fail;
	*out = m;
	return KL_OK;
fail:
	kl_model_free(m);
	return KL_FAIL;
}

int
kl_model_create_random(const char *config_path, const kl_load_opts *opts, const char *dtype,
					   uint64_t seed, kl_model **out, kl_err *err)
{
	kl_model   *m;
	binder		b;

	*out = NULL;
	memset(&b, 0, sizeof(b));
	b.random = true;
	if (!dtype || strcmp(dtype, "bf16") == 0)
		b.random_dtype = KL_DT_BF16;
	else if (strcmp(dtype, "f32") == 0)
		b.random_dtype = KL_DT_F32;
	else
		return kl_errc(err, KL_E_INVALID, "random weights dtype must be bf16 or f32, not \"%s\"", dtype);
	kl_rng_seed(&b.rng, seed);
	m = kl_calloc(1, sizeof(kl_model), err);
	if (!m)
		return KL_FAIL;
	m->dir = strdup(config_path);
	if (!m->dir || kl_config_load(config_path, &m->cfg, err) != KL_OK ||
		apply_routing(&m->cfg, opts, err) != KL_OK ||
		kl_qtype_parse(opts ? opts->quantize : NULL, &m->quantize, err) != KL_OK ||
		create_backend(m, opts, err) != KL_OK)
	{
		kl_model_free(m);
		return KL_FAIL;
	}
	if (m->quantize != KL_Q_NONE && !m->be->ops->quantized_weights)
	{
		kl_errc(err, KL_E_INVALID,
				"random weights quantized at load are not supported on the %s backend (it does not compute "
				"with quantized weights)", m->be->ops->name);
		kl_model_free(m);
		return KL_FAIL;
	}
	if (bind_all(m, &b, err) != KL_OK)
	{
		kl_model_free(m);
		return KL_FAIL;
	}
	*out = m;
	return KL_OK;
}

static void
unload_mlp(kl_backend *be, kl_mlp *mlp)
{
	be->ops->unload_weight(be, &mlp->gate);
	be->ops->unload_weight(be, &mlp->up);
	be->ops->unload_weight(be, &mlp->down);
}

void
kl_model_free(kl_model *m)
{
	if (!m)
		return;
	if (m->tok)
		kl_tokenizer_free(m->tok);
	if (m->be)
	{
		kl_backend *be = m->be;

		if (m->layers)
			for (int i = 0; i < m->cfg.n_layers; i++)
			{
				kl_layer   *L = &m->layers[i];
				kl_weight  *ws[] = {&L->kda.q_proj, &L->kda.k_proj, &L->kda.v_proj, &L->kda.f_a,
					&L->kda.f_b, &L->kda.b_proj, &L->kda.g_a, &L->kda.g_b, &L->kda.o_proj,
					&L->mla.q_proj, &L->mla.q_a, &L->mla.q_b, &L->mla.kv_a, &L->mla.kv_b, &L->mla.o_proj,
				&L->moe.router};

				if (L->mla.prepared)
					be->ops->release_mla(be, &L->mla);
				for (size_t j = 0; j < sizeof(ws) / sizeof(ws[0]); j++)
					be->ops->unload_weight(be, ws[j]);
				unload_mlp(be, &L->mlp);
				if (L->moe.experts)
					for (int e = 0; e < m->cfg.n_experts; e++)
						unload_mlp(be, &L->moe.experts[e]);
				unload_mlp(be, &L->moe.shared);
				free(L->moe.experts);
			}
		be->ops->unload_weight(be, &m->embed);
		be->ops->unload_weight(be, &m->lm_head);
		for (int i = 0; i < m->n_vecs; i++)
			be->ops->release(be, m->vecs[i]);
		be->ops->destroy(be);
	}
	free(m->vecs);
	for (int i = 0; i < m->n_allocs; i++)
		free(m->allocs[i]);
	free(m->allocs);
	kl_qconfig_free(&m->qcfg);
	for (int i = 0; i < m->n_names; i++)
		free(m->names[i]);
	free(m->names);
	free(m->layers);
	kl_st_close(&m->st);
	free(m->dir);
	free(m);
}

const kl_config *
kl_model_config(const kl_model *m)
{
	return &m->cfg;
}

const char *
kl_model_dir(const kl_model *m)
{
	return m->dir;
}

const char *
kl_model_moe_routing(const kl_model *m)
{
	if (m->cfg.n_experts <= 0)
		return NULL;
	return m->cfg.bias_in_weights ? "reference" : "select";
}

const char *
kl_model_device(const kl_model *m)
{
	return m->be->ops->name;
}

const char *
kl_model_precision(const kl_model *m)
{
	return m->precision;
}

int64_t
kl_model_n_params(const kl_model *m)
{
	return m->n_params;
}

uint64_t
kl_model_weight_bytes(const kl_model *m)
{
	return m->weight_bytes;
}

uint64_t
kl_model_resident_bytes(const kl_model *m)
{
	return m->resident_bytes;
}

const char *
kl_model_weight_format(const kl_model *m)
{
	return m->weight_format;
}

const char *
kl_model_quantize(const kl_model *m)
{
	return m->quantize == KL_Q_NONE ? NULL : kl_qtype_name(m->quantize);
}

const uint8_t *
kl_model_fingerprint(const kl_model *m)
{
	return m->fingerprint;
}

const kl_tokenizer *
kl_model_tokenizer(const kl_model *m)
{
	return m->tok;
}
