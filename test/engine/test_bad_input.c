/*
 * test_bad_input.c — broken checkpoints, broken states and bad arguments are
 * clear errors, never crashes.
 *
 * Checkpoints are made from the golden tiny_a model: copies in a temporary
 * directory with one thing wrong each (truncated, bit-flipped, wrong shape,
 * missing or extra tensor, bad config, bad shard index).  States are made by
 * the engine and then damaged.  Random mutations (fixed seed) run many times.
 *
 * Files of a model are confined: with kl_load_opts.root, no file that
 * resolves outside the root is read (symbolic links to config.json, weights,
 * shards, tokenizer files, or the directory itself), and such a path gets the
 * error of a missing one.  Errors never quote a file's content: files full of
 * a "secret" marker, broken in every way, must give errors without it.
 *
 * Every error carries a code set where it is raised (kl_err.code): the
 * representative errors of each kind are checked for theirs.
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kl.h"
#include "safetensors.h"
#include "tap.h"

static char tmpdir[256];
static char src_dir[1024];

static uint8_t *
slurp(const char *path, size_t *len)
{
	FILE	   *f = fopen(path, "rb");
	uint8_t    *b;
	long		n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	b = malloc((size_t) n + 1);
	if (fread(b, 1, (size_t) n, f) != (size_t) n)
		exit(1);
	fclose(f);
	*len = (size_t) n;
	return b;
}

static void
spit(const char *path, const void *b, size_t len)
{
	FILE	   *f = fopen(path, "wb");

	if (!f || fwrite(b, 1, len, f) != len || fclose(f) != 0)
	{
		tap_diag("cannot write %s", path);
		exit(1);
	}
}

static void
spit_str(const char *path, const char *s)
{
	spit(path, s, strlen(s));
}

/* A fresh model directory named `name` holding config.json (given text or the
 * original) and model.safetensors (given bytes or the original). */
static const char *
make_model(const char *name, const char *config, const uint8_t *st, size_t st_len)
{
	static char dir[512];
	char		path[600];
	size_t		len;
	uint8_t    *b;

	snprintf(dir, sizeof(dir), "%s/%s", tmpdir, name);
	mkdir(dir, 0700);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	if (config)
		spit(path, config, strlen(config));
	else
	{
		char		sp[1100];

		snprintf(sp, sizeof(sp), "%s/config.json", src_dir);
		b = slurp(sp, &len);
		spit(path, b, len);
		free(b);
	}
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	if (st)
		spit(path, st, st_len);
	else
	{
		char		sp[1100];

		snprintf(sp, sizeof(sp), "%s/model.safetensors", src_dir);
		b = slurp(sp, &len);
		spit(path, b, len);
		free(b);
	}
	return dir;
}

/* Load must fail with a message containing `needle`. */
static void
expect_load_error(const char *dir, const char *needle, const char *what)
{
	kl_model   *m = NULL;
	kl_err		err = {0};
	int			rc = kl_model_load(dir, NULL, &m, &err);

	if (!tap_ok(rc == KL_FAIL && m == NULL && strstr(err.msg, needle) != NULL, "%s: clear error", what))
		tap_diag("got rc=%d message \"%s\" (wanted \"%s\")", rc, err.msg, needle);
	kl_model_free(m);
}

/* Split the original safetensors into its header JSON and data. */
static json_t *
orig_header(uint8_t **data, size_t *data_len)
{
	char		path[1100];
	size_t		len;
	uint8_t    *b;
	uint64_t	hlen;
	json_t	   *h;

	snprintf(path, sizeof(path), "%s/model.safetensors", src_dir);
	b = slurp(path, &len);
	memcpy(&hlen, b, 8);
	h = json_loadb((const char *) b + 8, hlen, 0, NULL);
	*data_len = len - 8 - hlen;
	*data = malloc(*data_len);
	memcpy(*data, b + 8 + hlen, *data_len);
	free(b);
	return h;
}

static uint8_t *
build_st(json_t *h, const uint8_t *data, size_t data_len, size_t *out_len)
{
	char	   *js = json_dumps(h, JSON_COMPACT);
	uint64_t	hlen = strlen(js);
	uint8_t    *b = malloc(8 + hlen + data_len);

	memcpy(b, &hlen, 8);
	memcpy(b + 8, js, hlen);
	memcpy(b + 8 + hlen, data, data_len);
	*out_len = 8 + hlen + data_len;
	free(js);
	return b;
}

static void
test_checkpoints(void)
{
	uint8_t    *orig,
			   *data;
	size_t		olen,
				dlen,
				blen;
	char		path[1100];
	json_t	   *h;
	uint8_t    *b;

	snprintf(path, sizeof(path), "%s/model.safetensors", src_dir);
	orig = slurp(path, &olen);

	expect_load_error("/nonexistent/model", "is not a directory", "missing directory");
	{
		const char *d = make_model("noconfig", NULL, NULL, 0);

		snprintf(path, sizeof(path), "%s/config.json", d);
		unlink(path);
		expect_load_error(d, "config.json", "missing config.json");
	}
	expect_load_error(make_model("badjson", "{\"vocab_size\": 512,", NULL, 0), "not valid JSON", "config.json not JSON");
	expect_load_error(make_model("cfgtype", "{\"vocab_size\": \"many\"}", NULL, 0), "vocab_size", "config field of the wrong type");
	expect_load_error(make_model("cfgmissing", "{\"vocab_size\": 512}", NULL, 0), "hidden_size", "config field missing");

	/* config variants of the real one */
	{
		char		cp[1100];
		size_t		clen;
		char	   *cfg;
		json_t	   *c;
		char	   *txt;

		snprintf(cp, sizeof(cp), "%s/config.json", src_dir);
		cfg = (char *) slurp(cp, &clen);
		cfg[clen] = 0;

		c = json_loads(cfg, 0, NULL);
		json_object_set_new(c, "hidden_size", json_integer(-4));
		txt = json_dumps(c, 0);
		expect_load_error(make_model("cfgneg", txt, NULL, 0), "hidden_size", "negative hidden_size");
		free(txt);
		json_decref(c);

		c = json_loads(cfg, 0, NULL);
		json_object_set_new(json_object_get(c, "linear_attn_config"), "kda_layers", json_pack("[i,i,i]", 1, 2, 9));
		txt = json_dumps(c, 0);
		expect_load_error(make_model("cfglayers", txt, NULL, 0), "layer 9", "layer number out of range");
		free(txt);
		json_decref(c);

		c = json_loads(cfg, 0, NULL);
		json_object_set_new(json_object_get(c, "linear_attn_config"), "full_attn_layers", json_pack("[i]", 2));
		txt = json_dumps(c, 0);
		expect_load_error(make_model("cfgtwice", txt, NULL, 0), "appears twice", "layer in both lists");
		free(txt);
		json_decref(c);

		c = json_loads(cfg, 0, NULL);
		json_object_set_new(c, "hidden_size", json_integer(64));
		txt = json_dumps(c, 0);
		expect_load_error(make_model("cfgshape", txt, NULL, 0), "config.json implies", "config that does not match the weights");
		free(txt);
		json_decref(c);

		c = json_loads(cfg, 0, NULL);
		json_object_set_new(c, "num_experts_per_token", json_integer(99));
		txt = json_dumps(c, 0);
		expect_load_error(make_model("cfgtopk", txt, NULL, 0), "num_experts_per_token", "top-k above the expert count");
		free(txt);
		json_decref(c);

		/* more expert groups than routing supports (it wrote out of bounds) */
		c = json_loads(cfg, 0, NULL);
		json_object_set_new(c, "num_experts", json_integer(2048));
		json_object_set_new(c, "num_expert_group", json_integer(2048));
		json_object_set_new(c, "topk_group", json_integer(1100));
		txt = json_dumps(c, 0);
		expect_load_error(make_model("cfggroups", txt, NULL, 0), "num_expert_group", "more expert groups than supported");
		free(txt);
		json_decref(c);
		free(cfg);
	}

	/* truncated files */
	{
		size_t		cuts[] = {0, 4, 8, 9, 100, olen / 2, olen - 1};

		for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++)
		{
			char		what[64];

			snprintf(what, sizeof(what), "safetensors truncated to %zu bytes", cuts[i]);
			expect_load_error(make_model("trunc", NULL, orig, cuts[i]), "model.safetensors", what);
		}
	}
	/* an absurd header length */
	{
		uint8_t    *c = malloc(olen);
		uint64_t	big = (uint64_t) 1 << 40;

		memcpy(c, orig, olen);
		memcpy(c, &big, 8);
		expect_load_error(make_model("hlen", NULL, c, olen), "header length", "absurd header length");
		free(c);
	}

	/* header edits */
	h = orig_header(&data, &dlen);
	{
		json_t	   *x = json_deep_copy(h);

		json_object_del(x, "model.layers.1.self_attn.q_proj.weight");
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("missing", NULL, b, blen), "model.layers.1.self_attn.q_proj.weight\" is missing",
						  "missing tensor");
		free(b);
		json_decref(x);
	}
	{
		json_t	   *x = json_deep_copy(h);

		json_object_set_new(x, "model.layers.9.extra.weight",
							json_pack("{s:s,s:[i],s:[i,i]}", "dtype", "F32", "shape", 0, "data_offsets", 0, 0));
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("extra", NULL, b, blen), "unexpected tensor \"model.layers.9.extra.weight\"",
						  "extra tensor");
		free(b);
		json_decref(x);
	}
	{
		/* same bytes, transposed shape */
		json_t	   *x = json_deep_copy(h);
		json_t	   *t = json_object_get(x, "model.layers.0.self_attn.f_a_proj.weight");

		json_object_set_new(t, "shape", json_pack("[i,i]", 128, 32));
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("shape", NULL, b, blen), "f_a_proj.weight\" has shape [128, 32]", "wrong shape");
		free(b);
		json_decref(x);
	}
	{
		json_t	   *x = json_deep_copy(h);
		json_t	   *t = json_object_get(x, "model.layers.0.self_attn.o_norm.weight");

		json_object_set_new(t, "dtype", json_string("I32"));
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("dtype", NULL, b, blen), "o_norm.weight", "integer dtype for a weight");
		free(b);
		json_decref(x);
	}
	{
		json_t	   *x = json_deep_copy(h);
		json_t	   *t = json_object_get(x, "model.layers.0.self_attn.o_norm.weight");

		json_object_set_new(t, "data_offsets", json_pack("[I,I]", (json_int_t) dlen - 64, (json_int_t) dlen + 64));
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("offsets", NULL, b, blen), "outside", "offsets past the end");
		free(b);
		json_decref(x);
	}
	{
		/* two tensors claiming the same bytes */
		json_t	   *x = json_deep_copy(h);
		json_t	   *a = json_object_get(x, "model.layers.0.self_attn.o_norm.weight");
		json_t	   *c = json_object_get(x, "model.layers.1.self_attn.o_norm.weight");

		json_object_set(c, "data_offsets", json_object_get(a, "data_offsets"));
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("overlap", NULL, b, blen), "overlap", "overlapping tensors");
		free(b);
		json_decref(x);
	}
	{
		json_t	   *x = json_deep_copy(h);
		json_t	   *t = json_object_get(x, "model.layers.0.self_attn.o_norm.weight");

		json_object_set_new(t, "dtype", json_string("Q4_K"));
		b = build_st(x, data, dlen, &blen);
		expect_load_error(make_model("unkdtype", NULL, b, blen), "unsupported dtype", "unknown dtype");
		free(b);
		json_decref(x);
	}

	/* sharded index problems */
	{
		const char *d = make_model("shards", NULL, NULL, 0);
		char		ip[700];

		snprintf(ip, sizeof(ip), "%s/model.safetensors.index.json", d);
		spit_str(ip, "{\"weight_map\": {\"lm_head.weight\": \"../../etc/passwd\"}}");
		expect_load_error(d, "must be a file name in the model directory", "shard path escaping the directory");
		spit_str(ip, "{\"weight_map\": {\"lm_head.weight\": \"model-00009.safetensors\"}}");
		expect_load_error(d, "model-00009.safetensors", "missing shard");
		spit_str(ip, "{\"weight_map\": {\"lm_head.weight\": \"model.safetensors\"}}");
		expect_load_error(d, "not in the index", "index that omits tensors");
		spit_str(ip, "{\"weight_map\": 7}");
		expect_load_error(d, "weight_map", "index without a weight_map");
	}

	/* random bit flips in the header: an error or a valid load, never a crash */
	{
		uint64_t	hlen;
		int			errors = 0,
					loads = 0;
		uint64_t	x = 12345;

		memcpy(&hlen, orig, 8);
		for (int it = 0; it < 300; it++)
		{
			uint8_t    *c = malloc(olen);
			kl_model   *m = NULL;
			kl_err		err;
			size_t		pos;

			memcpy(c, orig, olen);
			for (int k = 0; k < 1 + it % 3; k++)
			{
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				pos = (size_t) (x % (8 + hlen));
				c[pos] ^= (uint8_t) (1u << (x >> 61));
			}
			if (kl_model_load(make_model("flip", NULL, c, olen), NULL, &m, &err) == KL_OK)
				loads++;
			else
				errors++;
			kl_model_free(m);
			free(c);
		}
		tap_ok(errors + loads == 300 && errors > 0, "300 random header bit flips: %d clear errors, %d still-valid loads, "
			   "no crash", errors, loads);
	}
	json_decref(h);
	free(data);
	free(orig);
}

static void
test_states(void)
{
	kl_model   *m,
			   *other;
	kl_ctx	   *ctx;
	kl_seq	   *s,
			   *t;
	kl_err		err;
	int32_t		ids[50];
	uint8_t    *blob;
	size_t		len;
	kl_blob		part;
	char		other_dir[1100];

	if (kl_model_load(src_dir, NULL, &m, &err) != KL_OK || kl_ctx_new(m, 0, &ctx, &err) != KL_OK)
	{
		tap_ok(0, "load tiny_a: %s", err.msg);
		return;
	}
	for (int i = 0; i < 50; i++)
		ids[i] = (i * 37) % 500;
	kl_seq_new(m, &s, &err);
	kl_seq_new(m, &t, &err);
	{
		kl_batch_item it = {s, ids, 50, NULL, false};

		kl_forward(ctx, &it, 1, &err);
	}
	kl_seq_set_pending(s, 7);
	{
		int			rc = kl_state_save(s, 0, &blob, &len, &err);

		tap_ok(rc == KL_OK, "save a state of 50 positions (%zu bytes)", len);
	}
	part.data = blob;
	part.len = len;
	tap_ok(kl_state_load(t, &part, 1, &err) == KL_OK && kl_seq_positions(t) == 50 && kl_seq_pending(t) == 7,
		   "it loads back with its positions and pending token");

	/* truncated at every length class */
	{
		int			bad = 0,
					n = 0;

		for (size_t cut = 0; cut < len; cut += (cut < 200 ? 1 : 997))
		{
			part.len = cut;
			if (kl_state_load(t, &part, 1, &err) != KL_OK && kl_seq_positions(t) == 0)
				bad++;
			n++;
		}
		part.len = len;
		tap_ok(bad == n, "%d truncations of the state: all rejected, sequence reset", n);
	}
	/* every single-bit flip in the header and a sample in the payload */
	{
		uint8_t    *c = malloc(len);
		int			bad = 0,
					n = 0;

		for (size_t pos = 0; pos < len; pos += (pos < 128 ? 1 : 61))
			for (int bit = 0; bit < 8; bit += (pos < 128 ? 1 : 3))
			{
				memcpy(c, blob, len);
				c[pos] ^= (uint8_t) (1u << bit);
				part.data = c;
				if (kl_state_load(t, &part, 1, &err) != KL_OK)
					bad++;
				n++;
			}
		part.data = blob;
		tap_ok(bad == n, "%d bit flips in the state: all rejected (checksum)", n);
		tap_ok(strstr(err.msg, "checksum") != NULL || strstr(err.msg, "corrupt") != NULL,
			   "the message says it is corrupt: \"%s\"", err.msg);
		free(c);
	}
	/* random bytes */
	{
		uint8_t		r[4096];
		uint64_t	x = 99;
		int			bad = 0;

		for (int it = 0; it < 200; it++)
		{
			size_t		n = (size_t) (x % sizeof(r));

			for (size_t i = 0; i < n; i++)
			{
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				r[i] = (uint8_t) x;
			}
			if (it % 2)
				memcpy(r, "KLSTATE", 8 < n ? 8 : n);
			part.data = r;
			part.len = n;
			if (kl_state_load(t, &part, 1, &err) != KL_OK)
				bad++;
		}
		part.data = blob;
		part.len = len;
		tap_ok(bad == 200, "200 random byte strings: all rejected");
	}
	/* a state from another model */
	snprintf(other_dir, sizeof(other_dir), "%s/golden/tiny_c", tap_fixture_dir());
	if (kl_model_load(other_dir, NULL, &other, &err) == KL_OK)
	{
		kl_seq	   *o;

		kl_seq_new(other, &o, &err);
		tap_ok(kl_state_load(o, &part, 1, &err) != KL_OK && strstr(err.msg, "different model"),
			   "a state from another model: \"%s\"", err.msg);
		kl_seq_free(o);
		kl_model_free(other);
	}
	/* pages: a rows part, then a head; missing or out-of-order pages */
	{
		uint8_t    *page,
				   *head;
		size_t		plen,
					hlen;
		kl_blob		parts[2];

		kl_state_save_rows(s, 0, 20, &page, &plen, &err);
		kl_state_save(s, 20, &head, &hlen, &err);
		parts[0].data = page;
		parts[0].len = plen;
		parts[1].data = head;
		parts[1].len = hlen;
		tap_ok(kl_state_load(t, parts, 2, &err) == KL_OK && kl_seq_positions(t) == 50,
			   "a page of rows plus a head loads as one state");
		tap_ok(kl_state_load(t, parts + 1, 1, &err) != KL_OK && strstr(err.msg, "page is missing"),
			   "a head without its page: \"%s\"", err.msg);
		parts[1] = parts[0];
		parts[0].data = head;
		parts[0].len = hlen;
		tap_ok(kl_state_load(t, parts, 2, &err) != KL_OK, "parts out of order are rejected: \"%s\"", err.msg);
		free(page);
		free(head);
	}
	/* bad forward arguments */
	{
		int32_t		bad_ids[2] = {3, 512};
		kl_batch_item it = {t, bad_ids, 2, NULL, false};

		tap_ok(kl_forward(ctx, &it, 1, &err) != KL_OK && strstr(err.msg, "outside the vocabulary"),
			   "a token id outside the vocabulary: \"%s\"", err.msg);
		it.n = -1;
		tap_ok(kl_forward(ctx, &it, 1, &err) != KL_OK, "a negative token count is rejected");
	}
	/* sampling settings */
	{
		kl_sampling sp;

		kl_sampling_default(&sp);
		sp.temperature = -1;
		tap_ok(kl_sampling_validate(&sp, &err) != KL_OK && strstr(err.msg, "temperature"),
			   "negative temperature: \"%s\"", err.msg);
		kl_sampling_default(&sp);
		sp.top_p = 0;
		tap_ok(kl_sampling_validate(&sp, &err) != KL_OK, "top_p = 0: \"%s\"", err.msg);
		kl_sampling_default(&sp);
		sp.top_k = -5;
		tap_ok(kl_sampling_validate(&sp, &err) != KL_OK, "negative top_k: \"%s\"", err.msg);
		kl_sampling_default(&sp);
		sp.repetition_penalty = 0.0f / 0.0f;
		tap_ok(kl_sampling_validate(&sp, &err) != KL_OK, "NaN repetition penalty: \"%s\"", err.msg);
	}
	free(blob);
	kl_seq_free(s);
	kl_seq_free(t);
	kl_ctx_free(ctx);
	kl_model_free(m);
}

static void
copy_file(const char *from, const char *to)
{
	size_t		len;
	uint8_t    *b = slurp(from, &len);

	if (!b)
	{
		tap_diag("cannot read %s", from);
		exit(1);
	}
	spit(to, b, len);
	free(b);
}

/* dir/name <- the file of the same name in the golden tiny model or the bundled model */
static void
copy_in(const char *dir, const char *name, bool from_pgdocs)
{
	char		from[1100],
				to[1100];

	if (from_pgdocs)
		snprintf(from, sizeof(from), "%s/pgdocs-kimi-18m/%s", tap_models_dir(), name);
	else
		snprintf(from, sizeof(from), "%s/%s", src_dir, name);
	snprintf(to, sizeof(to), "%s/%s", dir, name);
	unlink(to);					/* a link there is replaced, not written through */
	copy_file(from, to);
}

/* A complete model directory (the tiny model's weights, the bundled model's tokenizer files). */
static const char *
full_model(const char *parent, const char *name)
{
	static char dir[700];

	snprintf(dir, sizeof(dir), "%s/%s", parent, name);
	mkdir(dir, 0700);
	copy_in(dir, "config.json", false);
	copy_in(dir, "model.safetensors", false);
	copy_in(dir, "tiktoken.model", true);
	copy_in(dir, "tokenizer_config.json", true);
	return dir;
}

static void
put(const char *dir, const char *name, const char *text)
{
	char		p[1100];

	snprintf(p, sizeof(p), "%s/%s", dir, name);
	unlink(p);
	spit_str(p, text);
}

static void
link_to(const char *dir, const char *name, const char *target)
{
	char		p[1100];

	snprintf(p, sizeof(p), "%s/%s", dir, name);
	unlink(p);
	if (symlink(target, p) != 0)
	{
		tap_diag("cannot link %s", p);
		exit(1);
	}
}

#define SECRET "TOPSECRET"

/* Load must fail, and the message must not contain `secret`. */
static void
expect_no_echo(const char *dir, const char *secret, const char *what)
{
	kl_model   *m = NULL;
	kl_err		err = {0};
	int			rc = kl_model_load(dir, NULL, &m, &err);

	if (!tap_ok(rc == KL_FAIL && strstr(err.msg, secret) == NULL, "%s: an error that quotes nothing of the file", what))
		tap_diag("got rc=%d message \"%s\"", rc, err.msg);
	else
		tap_diag("%s", err.msg);
	kl_model_free(m);
}

static void
test_no_echo(void)
{
	char		parent[600];
	const char *d;
	uint8_t		junk[64];
	char		num[32];
	uint64_t	first8;

	snprintf(parent, sizeof(parent), "%s/echo", tmpdir);
	mkdir(parent, 0700);
	d = full_model(parent, "m");

	put(d, "config.json", SECRET "-1 this file is not JSON at all");
	expect_no_echo(d, SECRET, "config.json that is not JSON");
	put(d, "config.json", "{\"model_type\": \"" SECRET "-2\", \"vocab_size\": 512}");
	expect_no_echo(d, SECRET, "config.json with an unknown model_type");
	put(d, "config.json", "{\"vocab_size\": 512, \"vocab_size\": \"" SECRET "-3\"}");
	expect_no_echo(d, SECRET, "config.json with a key twice");
	copy_in(d, "config.json", false);

	/* weights: the first 8 bytes are the header length; it must not be printed either */
	memset(junk, 'x', sizeof(junk));
	memcpy(junk, SECRET "-4", 11);
	memcpy(&first8, junk, 8);
	snprintf(num, sizeof(num), "%llu", (unsigned long long) first8);
	{
		char		p[1100];

		snprintf(p, sizeof(p), "%s/model.safetensors", d);
		spit(p, junk, sizeof(junk));
	}
	expect_no_echo(d, SECRET, "model.safetensors that is not one");
	expect_no_echo(d, num, "... nor its first bytes as a number");
	{
		/* a plausible length, then a header that is not JSON */
		uint64_t	hlen = 40;
		char		p[1100];
		uint8_t		b[8 + 40];

		memcpy(b, &hlen, 8);
		memset(b + 8, ' ', 40);
		memcpy(b + 8, SECRET "-5 {", 13);
		snprintf(p, sizeof(p), "%s/model.safetensors", d);
		spit(p, b, sizeof(b));
	}
	expect_no_echo(d, SECRET, "a safetensors header that is not JSON");
	copy_in(d, "model.safetensors", false);

	put(d, "model.safetensors.index.json", SECRET "-6 [");
	expect_no_echo(d, SECRET, "an index that is not JSON");
	{
		char		p[1100];

		snprintf(p, sizeof(p), "%s/model.safetensors.index.json", d);
		unlink(p);
	}

	put(d, "tiktoken.model", "QQ== " SECRET "-7\n");
	expect_no_echo(d, SECRET, "tiktoken.model with a bad rank");
	put(d, "tiktoken.model", SECRET "7A== 0\n");
	expect_no_echo(d, SECRET, "tiktoken.model with bad base64");
	copy_in(d, "tiktoken.model", true);
	put(d, "tokenizer_config.json", SECRET "-8 }");
	expect_no_echo(d, SECRET, "tokenizer_config.json that is not JSON");
	put(d, "tokenizer_config.json", "{\"bos_token\": \"" SECRET "-9\"}");
	expect_no_echo(d, SECRET, "tokenizer_config.json naming an unknown token");
}


/* With root: the load fails with the error of a missing file, and never mentions the target. */
static void
expect_confined(const char *dir, const char *root, const char *needle, const char *what)
{
	kl_model   *m = NULL;
	kl_err		err = {0};
	kl_load_opts o = {0};
	int			rc;

	o.root = root;
	rc = kl_model_load(dir, &o, &m, &err);
	if (!tap_ok(rc == KL_FAIL && strstr(err.msg, needle) != NULL && strstr(err.msg, "outside") == NULL,
				"%s: refused as missing", what))
		tap_diag("got rc=%d message \"%s\" (wanted \"%s\")", rc, err.msg, needle);
	else
		tap_diag("%s", err.msg);
	kl_model_free(m);
}

static bool
loads(const char *dir, const char *root)
{
	kl_model   *m = NULL;
	kl_err		err = {0};
	kl_load_opts o = {0};
	int			rc;

	o.root = root;
	rc = kl_model_load(dir, &o, &m, &err);
	if (rc != KL_OK)
		tap_diag("load %s: %s", dir, err.msg);
	kl_model_free(m);
	return rc == KL_OK;
}

static void
test_confinement(void)
{
	char		root[600],
				outside[600],
				target[1100];
	const char *out,
			   *d;
	const char *missing = "no such file in the model directory";

	snprintf(root, sizeof(root), "%s/root", tmpdir);
	snprintf(outside, sizeof(outside), "%s/outside", tmpdir);
	mkdir(root, 0700);
	mkdir(outside, 0700);
	out = full_model(outside, "m");
	snprintf(target, sizeof(target), "%s", out);
	d = full_model(root, "m");
	tap_ok(loads(d, root), "a complete model inside the root loads");

	/* each file, in turn a link to its copy outside */
	{
		const char *files[] = {"config.json", "model.safetensors", "tiktoken.model", "tokenizer_config.json"};

		for (int i = 0; i < 4; i++)
		{
			char		t[1200];
			char		what[200];

			snprintf(t, sizeof(t), "%s/%s", target, files[i]);
			link_to(d, files[i], t);
			tap_ok(loads(d, NULL), "without a root, a link to %s outside is followed (the CLI)", files[i]);
			snprintf(what, sizeof(what), "%s linked outside the root", files[i]);
			expect_confined(d, root, missing, what);
			copy_in(d, files[i], i >= 2);
		}
	}
	/* the same file missing: the same error */
	{
		char		p[1100];

		snprintf(p, sizeof(p), "%s/tiktoken.model", d);
		unlink(p);
		link_to(d, "tiktoken.model", "/nonexistent/tiktoken.model");
		expect_confined(d, root, missing, "tiktoken.model linked to nothing");
		copy_in(d, "tiktoken.model", true);
	}
	/* a shard named by the index, linked outside */
	{
		char		t[1200];

		put(d, "model.safetensors.index.json", "{\"weight_map\": {}}");
		link_to(outside, "shard.safetensors", "m/model.safetensors");
		{
			/* an index listing every tensor of the tiny model in one shard */
			char		ip[1100];
			uint8_t    *data;
			size_t		dlen;
			json_t	   *h = orig_header(&data, &dlen),
					   *idx = json_object(),
					   *wm = json_object();
			const char *k;
			json_t	   *v;

			json_object_foreach(h, k, v)
				if (strcmp(k, "__metadata__") != 0)
				json_object_set_new(wm, k, json_string("shard.safetensors"));
			json_object_set_new(idx, "weight_map", wm);
			snprintf(ip, sizeof(ip), "%s/model.safetensors.index.json", d);
			json_dump_file(idx, ip, 0);
			json_decref(idx);
			json_decref(h);
			free(data);
		}
		snprintf(t, sizeof(t), "%s/m/model.safetensors", outside);
		link_to(d, "shard.safetensors", t);
		tap_ok(loads(d, NULL), "without a root, a sharded model whose shard links outside loads");
		expect_confined(d, root, missing, "a shard linked outside the root");
		link_to(d, "shard.safetensors", "model.safetensors");
		tap_ok(loads(d, root), "a shard linked to a file inside the root loads");
		{
			char		ip[1100];

			snprintf(ip, sizeof(ip), "%s/model.safetensors.index.json", d);
			unlink(ip);
		}
	}
	/* the model directory itself a link outside, and a missing one: the same error */
	{
		char		ld[700],
					md[700];
		kl_model   *m = NULL;
		kl_err		e1 = {0},
					e2 = {0};
		kl_load_opts o = {0};
		char	   *p1,
				   *p2;

		snprintf(ld, sizeof(ld), "%s/escape", root);
		snprintf(md, sizeof(md), "%s/nothere", root);
		if (symlink(target, ld) != 0)
			exit(1);
		tap_ok(loads(ld, NULL), "without a root, a model directory linked outside loads");
		o.root = root;
		kl_model_load(ld, &o, &m, &e1);
		kl_model_free(m);
		m = NULL;
		kl_model_load(md, &o, &m, &e2);
		kl_model_free(m);
		/* the messages, with the directory names cut out, are the same */
		p1 = strstr(e1.msg, "escape");
		p2 = strstr(e2.msg, "nothere");
		if (!tap_ok(p1 && p2 && strcmp(p1 + strlen("escape"), p2 + strlen("nothere")) == 0 &&
					strstr(e1.msg, "outside") == NULL,
					"a model directory linked outside gets the error of a missing one"))
			tap_diag("\"%s\" vs \"%s\"", e1.msg, e2.msg);
		else
			tap_diag("%s", e1.msg);
	}
	/* a link that stays inside the root is fine */
	{
		char		in[700];

		snprintf(in, sizeof(in), "%s/m2", root);
		mkdir(in, 0700);
		link_to(in, "config.json", "../m/config.json");
		link_to(in, "model.safetensors", "../m/model.safetensors");
		tap_ok(loads(in, root), "links that stay inside the root are followed");
	}
}



/* The code of a model load's error (KL_E_NONE if it loaded). */
static kl_errcode
load_code(const char *dir, const char *device, char *msg, size_t msg_size)
{
	kl_model   *m = NULL;
	kl_load_opts o = {0};
	kl_err		err = {0};

	o.device = device;
	if (kl_model_load(dir, &o, &m, &err) == KL_OK)
	{
		kl_model_free(m);
		return KL_E_NONE;
	}
	snprintf(msg, msg_size, "%s", err.msg);
	return err.code;
}

static void
expect_code(kl_errcode got, kl_errcode want, const char *what, const char *msg)
{
	if (!tap_ok(got == want, "%s: %s", what, kl_errcode_name(want)))
		tap_diag("got %s (%d): %s", kl_errcode_name(got), (int) got, msg);
}

/* A config.json of tiny_a with one field set to a JSON value. */
static char *
config_with(const char *key, json_t *value)
{
	char		cp[1100];
	size_t		clen;
	char	   *cfg,
			   *txt;
	json_t	   *c;

	snprintf(cp, sizeof(cp), "%s/config.json", src_dir);
	cfg = (char *) slurp(cp, &clen);
	cfg[clen] = 0;
	c = json_loads(cfg, 0, NULL);
	json_object_set_new(c, key, value);
	txt = json_dumps(c, 0);
	json_decref(c);
	free(cfg);
	return txt;
}

/*
 * Each kind of error carries its code: invalid input, corrupt data, out of
 * resources, not supported.  (Internal errors are failures of libraries and
 * bugs: nothing here can raise one, so only their propagation is checked.)
 */
static void
test_error_codes(void)
{
	char		msg[1024] = "";
	char		path[1100];
	uint8_t    *orig;
	size_t		olen;
	char	   *cfg;

	snprintf(path, sizeof(path), "%s/model.safetensors", src_dir);
	orig = slurp(path, &olen);

	/* checkpoints */
	expect_code(load_code("/nonexistent/model", NULL, msg, sizeof(msg)), KL_E_INVALID, "a missing model directory", msg);
	expect_code(load_code(make_model("code_json", "{\"vocab_size\": 512,", NULL, 0), NULL, msg, sizeof(msg)),
				KL_E_INVALID, "config.json that is not JSON", msg);
	cfg = config_with("hidden_size", json_integer(-4));
	expect_code(load_code(make_model("code_range", cfg, NULL, 0), NULL, msg, sizeof(msg)), KL_E_INVALID,
				"a config field out of range", msg);
	free(cfg);
	cfg = config_with("model_type", json_string("llama"));
	expect_code(load_code(make_model("code_type", cfg, NULL, 0), NULL, msg, sizeof(msg)), KL_E_UNSUPPORTED,
				"another model_type", msg);
	free(cfg);
	cfg = config_with("quantization_config", json_pack("{s:s}", "quant_method", "awq"));
	expect_code(load_code(make_model("code_awq", cfg, NULL, 0), NULL, msg, sizeof(msg)), KL_E_UNSUPPORTED,
				"an unsupported quantization method", msg);
	free(cfg);
	expect_code(load_code(make_model("code_trunc", NULL, orig, olen / 2), NULL, msg, sizeof(msg)), KL_E_CORRUPT,
				"a safetensors file cut in half", msg);
	expect_code(load_code(make_model("code_trunc4", NULL, orig, 4), NULL, msg, sizeof(msg)), KL_E_CORRUPT,
				"a safetensors file of 4 bytes", msg);
	expect_code(load_code(src_dir, "tpu", msg, sizeof(msg)), KL_E_INVALID, "an unknown device", msg);
	free(orig);

	/* states */
	{
		kl_model   *m,
				   *other;
		kl_ctx	   *ctx = NULL;
		kl_seq	   *s,
				   *t;
		kl_err		err = {0};
		int32_t		ids[8] = {1, 2, 3, 4, 5, 6, 7, 8};
		kl_batch_item it;
		uint8_t    *blob,
				   *c;
		size_t		len;
		kl_blob		part;

		if (kl_model_load(src_dir, NULL, &m, &err) != KL_OK || kl_ctx_new(m, 0, &ctx, &err) != KL_OK ||
			kl_seq_new(m, &s, &err) != KL_OK || kl_seq_new(m, &t, &err) != KL_OK)
		{
			tap_ok(0, "load tiny_a: %s", err.msg);
			return;
		}
		it = (kl_batch_item) {s, ids, 8, NULL, false};
		kl_forward(ctx, &it, 1, &err);
		kl_state_save(s, 0, &blob, &len, &err);
		c = malloc(len);

		memcpy(c, blob, len);
		c[len / 2] ^= 4;
		part = (kl_blob) {c, len};
		kl_state_load(t, &part, 1, &err);
		expect_code(err.code, KL_E_CORRUPT, "a state with a flipped bit (checksum)", err.msg);
		part = (kl_blob) {blob, len - 10};
		kl_state_load(t, &part, 1, &err);
		expect_code(err.code, KL_E_CORRUPT, "a state cut short", err.msg);
		part = (kl_blob) {(const uint8_t *) "not a state, not at all, not even close to one; a sentence of "
			"more than one hundred bytes, which is the least a state has.", 120};
		kl_state_load(t, &part, 1, &err);
		expect_code(err.code, KL_E_INVALID, "bytes that are not a state", err.msg);
		memcpy(c, blob, len);
		c[8] = 9;				/* format version 9 */
		part = (kl_blob) {c, len};
		kl_state_load(t, &part, 1, &err);
		expect_code(err.code, KL_E_UNSUPPORTED, "a state of a later format version", err.msg);
		snprintf(path, sizeof(path), "%s/golden/tiny_c", tap_fixture_dir());
		if (kl_model_load(path, NULL, &other, &err) == KL_OK)
		{
			kl_seq	   *o;

			kl_seq_new(other, &o, &err);
			part = (kl_blob) {blob, len};
			kl_state_load(o, &part, 1, &err);
			expect_code(err.code, KL_E_INVALID, "another model's state", err.msg);
			kl_seq_free(o);
			kl_model_free(other);
		}

		/* arguments and limits */
		ids[0] = 512;
		it = (kl_batch_item) {t, ids, 1, NULL, false};
		kl_forward(ctx, &it, 1, &err);
		expect_code(err.code, KL_E_INVALID, "a token id outside the vocabulary", err.msg);
		{
			kl_sampling sp;

			kl_sampling_default(&sp);
			sp.top_p = 0;
			kl_sampling_validate(&sp, &err);
			expect_code(err.code, KL_E_INVALID, "a sampling setting out of range", err.msg);
		}
		{
			kl_ctx	   *big = NULL;

			kl_ctx_new(m, 1 << 21, &big, &err);
			expect_code(err.code, KL_E_RESOURCES, "a context for 2M tokens per step", err.msg);
		}
		free(c);
		free(blob);
		kl_seq_free(s);
		kl_seq_free(t);
		kl_ctx_free(ctx);
		kl_model_free(m);
	}

	/* passing errors on keeps their code; errno's codes */
	{
		kl_err		err = {0};

		kl_errc(&err, KL_E_INTERNAL, "a library failed");
		kl_err_prefix(&err, "loading %s", "x");
		tap_ok(err.code == KL_E_INTERNAL && strcmp(err.msg, "loading x: a library failed") == 0,
			   "kl_err_prefix keeps the code: \"%s\"", err.msg);
		tap_ok(kl_errno_code(ENOMEM) == KL_E_RESOURCES && kl_errno_code(EMFILE) == KL_E_RESOURCES &&
			   kl_errno_code(ENOENT) == KL_E_INVALID && kl_errno_code(EACCES) == KL_E_INVALID &&
			   kl_errno_code(EIO) == KL_E_INTERNAL, "errno values map to codes");
	}
}

static void
rm_rf(const char *path)
{
	DIR		   *d;
	struct dirent *e;
	char		p[1024];
	struct stat sb;

	if (lstat(path, &sb) != 0 || !S_ISDIR(sb.st_mode) || (d = opendir(path)) == NULL)
	{
		unlink(path);			/* files and symbolic links (never followed) */
		return;
	}
	while ((e = readdir(d)) != NULL)
	{
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		snprintf(p, sizeof(p), "%s/%s", path, e->d_name);
		rm_rf(p);
	}
	closedir(d);
	rmdir(path);
}

int
main(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/kl-bad-input-XXXXXX");
	if (!mkdtemp(tmpdir))
		return 1;
	snprintf(src_dir, sizeof(src_dir), "%s/golden/tiny_a", tap_fixture_dir());
	kl_set_threads(2);
	test_checkpoints();
	test_no_echo();

	test_confinement();

	test_states();
	test_error_codes();
	rm_rf(tmpdir);
	return tap_done();
}
