/*
 * quant_config.c — config.json's quantization_config -> kl_qconfig (see
 * quant_config.h for what is supported).  Every field that changes how the
 * weights must be read is checked; an unknown method, format, strategy,
 * bit width, asymmetric or static-activation scheme is an error that names
 * the field and its value, never a silent misreading.
 */
#include "kl_file.h"
#include "quant_config.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static json_t *
field(json_t *obj, const char *key)
{
	json_t	   *v = json_object_get(obj, key);

	return (v && !json_is_null(v)) ? v : NULL;
}

static const char *
str_field(json_t *obj, const char *key)
{
	json_t	   *v = field(obj, key);

	return json_is_string(v) ? json_string_value(v) : NULL;
}

static int
compile_patterns(json_t *list, const char *what, const char *key, kl_qpattern **out, int *n, kl_err *err)
{
	size_t		i;
	json_t	   *v;

	*out = NULL;
	*n = 0;
	if (!list)
		return KL_OK;
	if (!json_is_array(list))
		return kl_errc(err, KL_E_INVALID,
					   "%s: quantization_config %s must be a list of module names or patterns", what, key);
	*out = calloc(json_array_size(list) + 1, sizeof(kl_qpattern));
	if (!*out)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	json_array_foreach(list, i, v)
	{
		kl_qpattern *p = &(*out)[*n];
		const char *s;

		if (!json_is_string(v))
			return kl_errc(err, KL_E_INVALID, "%s: quantization_config %s[%zu] is not a string", what, key, i);
		s = json_string_value(v);
		p->text = strdup(s);
		if (!p->text)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		(*n)++;
		if (strncmp(s, "re:", 3) == 0)
		{
			int			ec;
			PCRE2_SIZE	eo;

			p->re = pcre2_compile((PCRE2_SPTR) (s + 3), PCRE2_ZERO_TERMINATED, PCRE2_ANCHORED, &ec, &eo, NULL);
			if (!p->re)
			{
				PCRE2_UCHAR msg[256];

				pcre2_get_error_message(ec, msg, sizeof(msg));
				return kl_errc(err, KL_E_INVALID,
							   "%s: quantization_config %s[%zu] is not a supported regular expression "
							   "(%s at offset %zu)", what, key, i, (const char *) msg, (size_t) eo);
			}
		}
		else if (strcmp(s, "Linear") == 0)
			p->is_class_linear = true;
		else if (strchr(s, '.') == NULL && strcmp(s, "lm_head") != 0)
			return kl_errc(err, KL_E_UNSUPPORTED,
						   "%s: quantization_config %s[%zu] is neither \"Linear\", a module name nor a "
						   "\"re:\" pattern; module classes other than Linear are not supported", what, key, i);
	}
	return KL_OK;
}

void
kl_qconfig_free(kl_qconfig *qc)
{
	kl_qpattern *lists[2] = {qc->targets, qc->ignore};
	int			counts[2] = {qc->n_targets, qc->n_ignore};

	for (int l = 0; l < 2; l++)
	{
		for (int i = 0; i < counts[l]; i++)
		{
			free(lists[l][i].text);
			if (lists[l][i].re)
				pcre2_code_free(lists[l][i].re);
		}
		free(lists[l]);
	}
	memset(qc, 0, sizeof(*qc));
}

/* The weights' arguments of one compressed-tensors config group. */
typedef struct ct_args
{
	const char *format;
	const char *type;
	int			bits;
	const char *strategy;
	int			group;
	int			block[2];
} ct_args;

static int
read_ct_group(json_t *grp, const char *gname, const char *top_format, const char *what, ct_args *a,
			  kl_err *err)
{
	json_t	   *w = field(grp, "weights"),
			   *in = field(grp, "input_activations"),
			   *out = field(grp, "output_activations"),
			   *v;
	const char *s;

	memset(a, 0, sizeof(*a));
	if (!json_is_object(grp))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: quantization_config.config_groups.%s must be an object (preset scheme "
					   "names are not supported)", what, gname);
	if (!json_is_object(w))
		return kl_errc(err, KL_E_INVALID, "%s: config group %s has no \"weights\" arguments (only weight quantization "
					   "is supported)", what, gname);
	a->format = str_field(grp, "format") ? str_field(grp, "format") : top_format;
	a->type = str_field(w, "type");
	if (!a->type || (strcmp(a->type, "int") != 0 && strcmp(a->type, "float") != 0))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: config group %s: weights type \"%s\" is not supported (int or float)",
					   what, gname, a->type ? kl_file_token(a->type) : "(missing)");
	v = field(w, "num_bits");
	if (!json_is_integer(v))
		return kl_errc(err, KL_E_INVALID, "%s: config group %s: weights num_bits is missing", what, gname);
	a->bits = (int) json_integer_value(v);
	if (!(a->bits == 8 || (a->bits == 4 && strcmp(a->type, "int") == 0)))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: config group %s: %d-bit %s weights are not supported (8-bit float, 8- or "
					   "4-bit int)", what, gname, a->bits, a->type);
	v = field(w, "symmetric");
	if (v && !json_is_true(v))
		return kl_errc(err, KL_E_UNSUPPORTED, "%s: config group %s: asymmetric weights (zero points) are not supported",
					   what, gname);
	v = field(w, "dynamic");
	if (v && !json_is_false(v))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: config group %s: dynamic weight quantization is not supported", what, gname);
	s = str_field(w, "actorder");
	v = field(w, "actorder");
	if (v && !(json_is_false(v) || (s && strcmp(s, "static") == 0)))
		return kl_errc(err, KL_E_INVALID,
					   "%s: config group %s: actorder \"%s\" (reordered groups, weight_g_idx) is not "
					   "supported", what, gname, s ? kl_file_token(s) : "?");
	a->strategy = str_field(w, "strategy");
	if (!a->strategy)
		return kl_errc(err, KL_E_INVALID, "%s: config group %s: weights strategy is missing", what, gname);
	if (strcmp(a->strategy, "group") == 0)
	{
		v = field(w, "group_size");
		if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 20))
			return kl_errc(err, KL_E_INVALID,
						   "%s: config group %s: strategy group needs a positive group_size", what, gname);
		a->group = (int) json_integer_value(v);
	}
	else if (strcmp(a->strategy, "block") == 0)
	{
		v = field(w, "block_structure");
		if (!json_is_array(v) || json_array_size(v) != 2 ||
			!json_is_integer(json_array_get(v, 0)) || !json_is_integer(json_array_get(v, 1)) ||
			json_integer_value(json_array_get(v, 0)) < 1 || json_integer_value(json_array_get(v, 1)) < 1 ||
			json_integer_value(json_array_get(v, 0)) > 65536 || json_integer_value(json_array_get(v, 1)) > 65536)
			return kl_errc(err, KL_E_INVALID, "%s: config group %s: strategy block needs block_structure [rows, cols]",
						   what, gname);
		a->block[0] = (int) json_integer_value(json_array_get(v, 0));
		a->block[1] = (int) json_integer_value(json_array_get(v, 1));
	}
	else if (strcmp(a->strategy, "channel") != 0 && strcmp(a->strategy, "tensor") != 0)
		return kl_errc(err, KL_E_UNSUPPORTED, "%s: config group %s: weights strategy \"%s\" is not supported (channel, "
					   "tensor, group, block)", what, gname, kl_file_token(a->strategy));
	if (in)
	{
		json_t	   *dyn = field(in, "dynamic");

		if (!(dyn && (json_is_true(dyn) || (json_is_string(dyn) && strcmp(json_string_value(dyn), "local") == 0))))
			return kl_errc(err, KL_E_UNSUPPORTED,
						   "%s: config group %s: static input activation quantization (input_scale) is "
						   "not supported; dynamic activations are (the engine keeps them in fp32)", what, gname);
	}
	if (out)
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: config group %s: output activation quantization is not supported", what, gname);
	return KL_OK;
}

static int
parse_compressed_tensors(json_t *q, const char *what, kl_qconfig *qc, kl_err *err)
{
	json_t	   *groups = field(q, "config_groups");
	const char *top_format = str_field(q, "format");
	const char *status = str_field(q, "quantization_status");
	const char *gname;
	json_t	   *grp;
	ct_args		first = {0};
	int			n = 0;
	const char *fmt;

	if (field(q, "kv_cache_scheme"))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: quantization_config.kv_cache_scheme (a quantized KV cache) is not supported", what);
	if (status && strcmp(status, "compressed") != 0)
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: quantization_status \"%s\" is not supported (only \"compressed\" checkpoints)",
					   what, kl_file_token(status));
	if (!json_is_object(groups) || json_object_size(groups) == 0)
		return kl_errc(err, KL_E_INVALID, "%s: quantization_config.config_groups is missing or empty", what);
	json_object_foreach(groups, gname, grp)
	{
		ct_args		a;
		json_t	   *t = field(grp, "targets");
		kl_qpattern *pt;
		int			npt;

		if (read_ct_group(grp, gname, top_format, what, &a, err) != KL_OK)
			return KL_FAIL;
		if (n == 0)
			first = a;
		else if (a.bits != first.bits || strcmp(a.type, first.type) != 0 ||
				 strcmp(a.strategy, first.strategy) != 0 || a.group != first.group ||
				 a.block[0] != first.block[0] || a.block[1] != first.block[1] ||
				 (a.format == NULL) != (first.format == NULL) ||
				 (a.format && strcmp(a.format, first.format) != 0))
			return kl_errc(err, KL_E_INVALID, "%s: config groups %s and others quantize weights differently (mixed "
						   "precision); only one weight scheme per checkpoint is supported", what, gname);
		n++;
		if (compile_patterns(t, what, "targets", &pt, &npt, err) != KL_OK)
		{
			for (int i = 0; i < npt; i++)
			{
				free(pt[i].text);
				if (pt[i].re)
					pcre2_code_free(pt[i].re);
			}
			free(pt);
			return KL_FAIL;
		}
		/* append to the union of targets */
		{
			kl_qpattern *nt = realloc(qc->targets, sizeof(kl_qpattern) * (size_t) (qc->n_targets + npt + 1));

			if (!nt)
			{
				free(pt);
				return kl_errc(err, KL_E_RESOURCES, "out of memory");
			}
			qc->targets = nt;
			memcpy(qc->targets + qc->n_targets, pt, sizeof(kl_qpattern) * (size_t) npt);
			qc->n_targets += npt;
			free(pt);
		}
	}
	if (qc->n_targets == 0)
		return kl_errc(err, KL_E_INVALID, "%s: quantization_config names no targets", what);
	if (compile_patterns(field(q, "ignore"), what, "ignore", &qc->ignore, &qc->n_ignore, err) != KL_OK)
		return KL_FAIL;

	fmt = first.format;
	if (!fmt)
		return kl_errc(err, KL_E_INVALID, "%s: quantization_config has no \"format\"", what);
	qc->bits = first.bits;
	qc->group = first.group;
	qc->block_rows = first.block[0];
	qc->block_cols = first.block[1];
	qc->strategy = strcmp(first.strategy, "channel") == 0 ? KL_QSTRAT_CHANNEL :
		strcmp(first.strategy, "tensor") == 0 ? KL_QSTRAT_TENSOR :
		strcmp(first.strategy, "group") == 0 ? KL_QSTRAT_GROUP : KL_QSTRAT_BLOCK;
	if (strcmp(fmt, "pack-quantized") == 0)
	{
		if (strcmp(first.type, "int") != 0)
			return kl_errc(err, KL_E_UNSUPPORTED, "%s: pack-quantized float weights are not supported", what);
		if (qc->strategy == KL_QSTRAT_BLOCK)
			return kl_errc(err, KL_E_UNSUPPORTED,
						   "%s: block strategy is not supported for pack-quantized weights", what);
		qc->scheme = KL_QS_CT_PACKED;
	}
	else if (strcmp(fmt, "float-quantized") == 0 || strcmp(fmt, "naive-quantized") == 0 ||
			 strcmp(fmt, "int-quantized") == 0)
	{
		if (first.bits != 8)
			return kl_errc(err, KL_E_UNSUPPORTED,
						   "%s: %d-bit weights in format %s are not supported (use pack-quantized)",
						   what, first.bits, fmt);
		if (strcmp(first.type, "float") == 0)
		{
			if (strcmp(fmt, "int-quantized") == 0)
				return kl_errc(err, KL_E_INVALID, "%s: format int-quantized with float weights is inconsistent", what);
			qc->scheme = KL_QS_CT_FP8;
		}
		else
		{
			if (strcmp(fmt, "float-quantized") == 0)
				return kl_errc(err, KL_E_INVALID, "%s: format float-quantized with int weights is inconsistent", what);
			if (qc->strategy == KL_QSTRAT_BLOCK)
				return kl_errc(err, KL_E_INVALID, "%s: block strategy is supported for FP8 weights only", what);
			qc->scheme = KL_QS_CT_INT8;
		}
	}
	else
		return kl_errc(err, KL_E_UNSUPPORTED, "%s: compressed-tensors format \"%s\" is not supported (float-quantized, "
					   "naive-quantized, int-quantized, pack-quantized)", what, kl_file_token(fmt));

	{
		char		how[40];

		if (qc->strategy == KL_QSTRAT_GROUP)
			snprintf(how, sizeof(how), "g%d", qc->group);
		else if (qc->strategy == KL_QSTRAT_BLOCK)
			snprintf(how, sizeof(how), "block %dx%d", qc->block_rows, qc->block_cols);
		else
			snprintf(how, sizeof(how), "%s", qc->strategy == KL_QSTRAT_TENSOR ? "per tensor" : "per channel");
		snprintf(qc->describe, sizeof(qc->describe), "%s %s (compressed-tensors)",
				 qc->scheme == KL_QS_CT_FP8 ? "fp8" : qc->bits == 4 ? "int4" : "int8", how);
	}
	return KL_OK;
}

static int
parse_hf_fp8(json_t *q, const char *what, kl_qconfig *qc, kl_err *err)
{
	const char *fmt = str_field(q, "fmt");
	const char *act = str_field(q, "activation_scheme");
	json_t	   *bs = field(q, "weight_block_size");

	if (fmt && strcmp(fmt, "e4m3") != 0)
		return kl_errc(err, KL_E_UNSUPPORTED, "%s: quant_method fp8 with fmt \"%s\" is not supported (only e4m3)", what,
					   kl_file_token(fmt));
	if (act && strcmp(act, "dynamic") != 0)
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: quant_method fp8 with activation_scheme \"%s\" is not supported (only "
					   "dynamic: the engine keeps activations in fp32)", what, kl_file_token(act));
	if (!json_is_array(bs) || json_array_size(bs) != 2 || !json_is_integer(json_array_get(bs, 0)) ||
		!json_is_integer(json_array_get(bs, 1)) || json_integer_value(json_array_get(bs, 0)) < 1 ||
		json_integer_value(json_array_get(bs, 1)) < 1 || json_integer_value(json_array_get(bs, 0)) > 65536 ||
		json_integer_value(json_array_get(bs, 1)) > 65536)
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: quant_method fp8 needs weight_block_size [rows, cols] (per-tensor FP8 is "
					   "not supported)", what);
	qc->scheme = KL_QS_FP8_BLOCK;
	qc->strategy = KL_QSTRAT_BLOCK;
	qc->bits = 8;
	qc->block_rows = (int) json_integer_value(json_array_get(bs, 0));
	qc->block_cols = (int) json_integer_value(json_array_get(bs, 1));
	snprintf(qc->describe, sizeof(qc->describe), "fp8 block %dx%d", qc->block_rows, qc->block_cols);
	return KL_OK;
}

int
kl_qconfig_parse(const char *text, size_t len, const char *what, kl_qconfig *qc, kl_err *err)
{
	json_error_t jerr;
	json_t	   *root,
			   *q;
	const char *method;
	int			rc;

	memset(qc, 0, sizeof(*qc));
	root = json_loadb(text, len, 0, &jerr);
	if (!root)
		return kl_errc(err, KL_E_INVALID, "%s: not valid JSON at line %d column %d: %s", what, jerr.line, jerr.column,
					   kl_json_error_kind(&jerr));
	q = json_is_object(root) ? field(root, "quantization_config") : NULL;
	if (!q)
	{
		json_decref(root);
		return KL_OK;
	}
	if (!json_is_object(q))
	{
		json_decref(root);
		return kl_errc(err, KL_E_INVALID, "%s: quantization_config must be an object", what);
	}
	method = str_field(q, "quant_method");
	if (!method)
		rc = kl_errc(err, KL_E_INVALID, "%s: quantization_config.quant_method is missing", what);
	else if (strcmp(method, "compressed-tensors") == 0)
		rc = parse_compressed_tensors(q, what, qc, err);
	else if (strcmp(method, "fp8") == 0)
		rc = parse_hf_fp8(q, what, qc, err);
	else
		rc = kl_errc(err, KL_E_UNSUPPORTED,
					 "%s: quant_method \"%s\" is not supported (compressed-tensors with FP8, int8 or "
					 "pack-quantized int4 weights, or fp8 with block scales)", what, kl_file_token(method));
	json_decref(root);
	if (rc != KL_OK)
		kl_qconfig_free(qc);
	return rc;
}

int
kl_qconfig_load(const char *root, const char *path, kl_qconfig *qc, kl_err *err)
{
	char	   *buf;
	size_t		n;
	int			rc;

	memset(qc, 0, sizeof(*qc));
	if (kl_file_read(root, path, 16 << 20, "a config file", &buf, &n, err) != KL_OK)
		return KL_FAIL;
	rc = kl_qconfig_parse(buf, n, path, qc, err);
	free(buf);
	return rc;
}

static bool
pattern_matches(const kl_qpattern *p, const char *name, bool is_linear)
{
	if (p->is_class_linear)
		return is_linear;
	if (p->re)
	{
		pcre2_match_data *md = pcre2_match_data_create(1, NULL);
		int			rc;

		if (!md)
			return false;
		rc = pcre2_match(p->re, (PCRE2_SPTR) name, strlen(name), 0, 0, md, NULL);
		pcre2_match_data_free(md);
		return rc >= 0;
	}
	return strcmp(p->text, name) == 0;
}

int
kl_qconfig_expects(const kl_qconfig *qc, const char *name, bool is_linear)
{
	bool		targeted = false;

	if (qc->scheme == KL_QS_NONE)
		return 0;
	if (qc->scheme == KL_QS_FP8_BLOCK)
		return -1;
	for (int i = 0; i < qc->n_targets && !targeted; i++)
		targeted = pattern_matches(&qc->targets[i], name, is_linear);
	if (!targeted)
		return 0;
	for (int i = 0; i < qc->n_ignore; i++)
		if (pattern_matches(&qc->ignore[i], name, is_linear))
			return 0;
	return 1;
}
