/*
 * test_json_constraint.c — constrained decoding (src/engine/json_constraint.c,
 * vocab_trie.c, kl_sample_masked):
 *   - schemas the compiler refuses, each with a message naming the problem;
 *   - texts the automaton accepts and rejects;
 *   - masks equal to the brute-force answer (every token's bytes fed to a
 *     copy of the state), with and without the string fast path, on the
 *     bundled vocabulary and on a 160k-token synthetic one;
 *   - thousands of generations from random logits: all complete, all valid
 *     against the schema (checked by an independent validator here);
 *   - tool-call replies (named, required, auto), parsed back into calls;
 *   - 1,000 seeded generations at temperature 1 from the bundled model, all
 *     valid, and the same tokens when repeated in another batch.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "json_constraint.h"
#include "kl.h"
#include "tap.h"
#include "tokenizer.h"

static kl_tokenizer *tok;
static kl_vocab *vocab;
static int32_t end_id;

/* ------------------------------------------------------------------ an independent validator */

static size_t
utf8_chars(const char *s)
{
	size_t		n = 0;

	for (; *s; s++)
		if (((unsigned char) *s & 0xC0) != 0x80)
			n++;
	return n;
}

static bool
type_ok(const json_t *v, const char *t)
{
	if (strcmp(t, "object") == 0)
		return json_is_object(v);
	if (strcmp(t, "array") == 0)
		return json_is_array(v);
	if (strcmp(t, "string") == 0)
		return json_is_string(v);
	if (strcmp(t, "integer") == 0)
		return json_is_integer(v);
	if (strcmp(t, "number") == 0)
		return json_is_number(v);
	if (strcmp(t, "boolean") == 0)
		return json_is_boolean(v);
	if (strcmp(t, "null") == 0)
		return json_is_null(v);
	return false;
}

static bool
validate(const json_t *v, const json_t *s)
{
	json_t	   *type,
			   *e,
			   *props;

	if (json_is_true(s) || json_object_size(s) == 0)
		return true;
	type = json_object_get(s, "type");
	if (json_is_string(type) && !type_ok(v, json_string_value(type)))
		return false;
	if (json_is_array(type))
	{
		bool		any = false;

		for (size_t i = 0; i < json_array_size(type); i++)
			any = any || type_ok(v, json_string_value(json_array_get(type, i)));
		if (!any)
			return false;
	}
	if ((e = json_object_get(s, "enum")))
	{
		bool		found = false;

		for (size_t i = 0; i < json_array_size(e); i++)
			found = found || json_equal(v, json_array_get(e, i));
		return found;
	}
	if ((e = json_object_get(s, "const")))
		return json_equal(v, e);
	if (json_is_object(v))
	{
		const char *key;
		json_t	   *val;
		json_t	   *req = json_object_get(s, "required");
		json_t	   *add = json_object_get(s, "additionalProperties");

		props = json_object_get(s, "properties");
		json_object_foreach((json_t *) v, key, val)
		{
			json_t	   *ps = props ? json_object_get(props, key) : NULL;

			if (props && !ps)
				return false;	/* only the declared keys */
			if (!props && json_is_false(add))
				return false;
			if (!validate(val, ps ? ps : (json_is_object(add) ? add : json_true())))
				return false;
		}
		for (size_t i = 0; i < json_array_size(req); i++)
			if (!json_object_get(v, json_string_value(json_array_get(req, i))))
				return false;
	}
	if (json_is_array(v))
	{
		json_t	   *items = json_object_get(s, "items");
		json_t	   *mn = json_object_get(s, "minItems"),
				   *mx = json_object_get(s, "maxItems");

		if ((mn && (json_int_t) json_array_size(v) < json_integer_value(mn)) ||
			(mx && (json_int_t) json_array_size(v) > json_integer_value(mx)))
			return false;
		for (size_t i = 0; items && i < json_array_size(v); i++)
			if (!validate(json_array_get(v, i), items))
				return false;
	}
	if (json_is_string(v))
	{
		json_t	   *mn = json_object_get(s, "minLength"),
				   *mx = json_object_get(s, "maxLength");
		size_t		n = utf8_chars(json_string_value(v));

		if ((mn && (json_int_t) n < json_integer_value(mn)) || (mx && (json_int_t) n > json_integer_value(mx)))
			return false;
	}
	return true;
}

/* ------------------------------------------------------------------ helpers */

static kl_grammar *
schema_grammar(const char *schema, kl_err *err)
{
	char		spec[8192];
	kl_grammar *g = NULL;

	snprintf(spec, sizeof(spec), "{\"json_schema\": %s}", schema);
	if (kl_grammar_compile(spec, strlen(spec), &g, err) != KL_OK)
		return NULL;
	return g;
}

/* Does the automaton take text (and then the end)? */
static bool
takes(const char *schema, const char *text)
{
	kl_err		err;
	kl_grammar *g = schema_grammar(schema, &err);
	kl_constraint *c = NULL;
	bool		ok;

	if (!g)
	{
		tap_diag("schema %s: %s", schema, err.msg);
		return false;
	}
	kl_constraint_new(g, vocab, &end_id, 1, &c, &err);
	ok = kl_constraint_feed(c, text, strlen(text)) && kl_constraint_feed_end(c) && kl_constraint_done(c);
	kl_constraint_free(c);
	kl_grammar_free(g);
	return ok;
}

static uint64_t rs = 0x2545F4914F6CDD1Dull;

static uint64_t
rnd(void)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return rs;
}

/* ------------------------------------------------------------------ compile errors */

static void
compile_errors(void)
{
	static const struct
	{
		const char *schema;
		const char *want;
	}			cases[] = {
		{"{\"type\": \"string\", \"pattern\": \"^a\"}", "\"pattern\" is not supported"},
		{"{\"type\": \"number\", \"minimum\": 0}", "\"minimum\" is not supported"},
		{"{\"anyOf\": [{\"type\": \"string\"}]}", "\"anyOf\" is not supported"},
		{"{\"$ref\": \"#/defs/x\"}", "\"$ref\" is not supported"},
		{"{\"type\": \"text\"}", "unknown type \"text\""},
		{"{\"type\": []}", "non-empty list"},
		{"{\"type\": \"object\", \"properties\": {\"a\": {}}, \"required\": [\"b\"]}", "required property \"b\""},
		{"{\"type\": \"object\", \"required\": [\"b\"]}", "needs \"properties\""},
		{"{\"type\": \"array\", \"minItems\": 3, \"maxItems\": 2}", "minItems is greater than maxItems"},
		{"{\"type\": \"string\", \"maxLength\": -1}", "non-negative integer"},
		{"{\"enum\": []}", "non-empty array"},
		{"{\"type\": \"string\", \"enum\": [1, 2]}", "no value of \"enum\" has the schema's type"},
		{"{\"enum\": [\"a\"], \"maxLength\": 3}", "combine only with \"type\""},
		{"{\"type\": \"array\", \"items\": [{\"type\": \"string\"}]}", "tuples"},
		{"{\"type\": \"object\", \"properties\": {\"a\": {}}, \"additionalProperties\": true}", "cannot be combined"},
		{"\"string\"", "must be a JSON object"},
		{"{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"object\", \"properties\": {\"b\": {\"format\": \"x\"}}}}}",
		"json_schema/properties/a/properties/b"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		kl_err		err;
		kl_grammar *g = schema_grammar(cases[i].schema, &err);

		tap_ok(!g && strstr(err.msg, cases[i].want), "refused: %s -> %s", cases[i].schema, g ? "accepted" : err.msg);
		kl_grammar_free(g);
	}
	{
		kl_err		err;
		char		deep[4096] = "";

		for (int i = 0; i < 20; i++)
			strcat(deep, "{\"type\": \"array\", \"items\": ");
		strcat(deep, "{\"type\": \"null\"}");
		for (int i = 0; i < 20; i++)
			strcat(deep, "}");
		tap_ok(!schema_grammar(deep, &err) && strstr(err.msg, "nest"), "a schema nesting 20 levels is refused: %s", err.msg);
		const char *annotated = "{\"type\": \"object\", \"title\": \"t\", \"description\": \"d\", \"$schema\": \"x\"}";

		tap_ok(kl_json_schema_check(annotated, strlen(annotated), "json_schema", &err) == KL_OK,
			   "annotations are accepted");
	}
}

/* ------------------------------------------------------------------ what the automaton takes */

static void
acceptance(void)
{
	const char *person = "{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\", \"maxLength\": 5}, "
		"\"age\": {\"type\": \"integer\"}, \"tags\": {\"type\": \"array\", \"items\": {\"enum\": [\"a\", \"b\"]}, "
		"\"maxItems\": 2}}, \"required\": [\"name\"]}";
	static const struct
	{
		const char *text;
		bool		ok;
	}			texts[] = {
		{"{\"name\": \"Ann\"}", true},
		{"{ \"age\" : 41 , \"name\":\"Bo\" }", true},
		{"{\"name\": \"Ann\", \"tags\": [\"a\", \"b\"]}", true},
		{"{\"name\": \"Ann\",\n  \"tags\": []\n}", true},
		{"{\"age\": 41}", false},	/* required name missing */
		{"{\"name\": \"Annabel\"}", false},	/* too long */
		{"{\"name\": \"Ann\", \"name\": \"Bo\"}", false},	/* twice */
		{"{\"name\": \"Ann\", \"x\": 1}", false},	/* undeclared */
		{"{\"name\": \"Ann\", \"age\": 4.5}", false},	/* not an integer */
		{"{\"name\": \"Ann\", \"age\": 041}", false},	/* leading zero */
		{"{\"name\": \"Ann\", \"tags\": [\"c\"]}", false},	/* not in the enum */
		{"{\"name\": \"Ann\", \"tags\": [\"a\", \"b\", \"a\"]}", false},	/* maxItems */
		{"{\"name\": \"Ann\",}", false},	/* trailing comma */
		{"{\"name\": \"A\\u00e9\"}", true},
		{"{\"name\": \"A\\ud800\"}", false},	/* a lone surrogate escape */
		{"{\"name\": \"A\\u0000\"}", false},	/* NUL */
		{"{\"name\": \"A\tb\"}", false},	/* a raw control character */
		{"{\"name\": \"\xc3\xa9t\xc3\xa9\"}", true},	/* UTF-8, 3 characters */
		{"{\"name\": \"\xc3\"}", false},	/* broken UTF-8 */
		{"{\"name\": \"\xed\xa0\x80\"}", false},	/* an encoded surrogate */
		{"{\"name\": \"Ann\"}x", false},	/* text after the value */
		{"{\"name\":                  \"Ann\"}", false},	/* more than 16 blanks in a row */
		{"{\n  \"name\": \"Ann\"\n}", true},	/* pretty-printed */
		{"{\n\n  \"name\": \"Ann\"}", false},	/* a blank line */
		{"{\r\n\"name\": \"Ann\"}", false},	/* CR */
	};

	for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
		tap_ok(takes(person, texts[i].text) == texts[i].ok, "%s: %s", texts[i].ok ? "taken" : "refused", texts[i].text);

	tap_ok(takes("{\"type\": \"number\"}", "-12.5e+10") && takes("{\"type\": \"number\"}", "0") &&
		   !takes("{\"type\": \"number\"}", "1.") && !takes("{\"type\": \"number\"}", "-") &&
		   !takes("{\"type\": \"number\"}", "1e123") && takes("{\"type\": \"number\"}", "1e-99") &&
		   !takes("{\"type\": \"integer\"}", "1e5") &&
		   takes("{\"type\": \"integer\"}", "123456789012345678") &&
		   !takes("{\"type\": \"integer\"}", "1234567890123456789"),
		   "numbers: JSON's grammar, integer parts of at most 18 digits, exponents of at most 2");
	tap_ok(takes("{\"type\": [\"string\", \"null\"]}", "null") && takes("{\"type\": [\"string\", \"null\"]}", "\"x\"") &&
		   !takes("{\"type\": [\"string\", \"null\"]}", "1"), "type unions");
	tap_ok(takes("{\"enum\": [1, 12, \"x\", null, [1,2], {\"a\":true}]}", "12") &&
		   takes("{\"enum\": [1, 12, \"x\", null, [1,2], {\"a\":true}]}", "1") &&
		   takes("{\"enum\": [1, 12, \"x\", null, [1,2], {\"a\":true}]}", "{\"a\":true}") &&
		   !takes("{\"enum\": [1, 12, \"x\", null, [1,2], {\"a\":true}]}", "123"),
		   "enums of any JSON values, one a prefix of another");
	tap_ok(takes("{\"const\": \"yes\"}", "\"yes\"") && !takes("{\"const\": \"yes\"}", "\"no\""), "const");
	tap_ok(takes("{}", "[{\"a\": [1, \"b\", null, {}]}, true, -0.5]") && takes("true", "\"any\""),
		   "free-form values");
	tap_ok(takes("{\"type\": \"object\", \"additionalProperties\": {\"type\": \"integer\"}}", "{\"x\": 1, \"y\": 2}") &&
		   !takes("{\"type\": \"object\", \"additionalProperties\": {\"type\": \"integer\"}}", "{\"x\": \"1\"}") &&
		   takes("{\"type\": \"object\", \"additionalProperties\": false}", "{}") &&
		   !takes("{\"type\": \"object\", \"additionalProperties\": false}", "{\"a\": 1}"),
		   "additionalProperties without properties");
	tap_ok(takes("{\"type\": \"string\", \"minLength\": 2}", "\"ab\"") &&
		   !takes("{\"type\": \"string\", \"minLength\": 2}", "\"a\""), "minLength");
	{
		/* a key that must be escaped */
		const char *s = "{\"type\": \"object\", \"properties\": {\"a\\\"b\": {\"type\": \"null\"}}}";

		tap_ok(takes(s, "{\"a\\\"b\": null}") && !takes(s, "{\"a\\u0022b\": null}"),
			   "property names are matched in their one escaped spelling");
	}
	{
		char		deep[256] = "";

		for (int i = 0; i < 31; i++)
			strcat(deep, "[");
		tap_ok(!takes("{}", deep), "free-form nesting is bounded (31 levels refused)");
	}
}

/* ------------------------------------------------------------------ masks against brute force */

/* The masks with and without the string fast path. */
static bool
masks_agree(const kl_vocab *v, kl_constraint *c, kl_constraint *shadow, uint32_t *mask, uint32_t *slow)
{
	kl_err		err;

	kl_constraint_use_fast_paths(c, true);
	kl_constraint_use_fast_paths(shadow, false);
	if (kl_constraint_mask(c, mask, NULL, &err) != KL_OK || kl_constraint_mask(shadow, slow, NULL, &err) != KL_OK)
		return false;
	return memcmp(mask, slow, kl_mask_words(v->n_ids) * 4) == 0;
}

/* Replay bytes into a fresh constraint (the state after them). */
static kl_constraint *
replay(const kl_grammar *g, const kl_vocab *v, const char *bytes, size_t n)
{
	kl_constraint *c;
	kl_err		err;

	if (kl_constraint_new(g, v, &end_id, 1, &c, &err) != KL_OK)
		return NULL;
	if (!kl_constraint_feed(c, bytes, n))
	{
		kl_constraint_free(c);
		return NULL;
	}
	return c;
}

/*
 * Walk randomly through the grammar; at each visited state compare the mask
 * with feeding each token's bytes to a replayed copy.
 */
static void
brute_force(const char *label, const kl_vocab *v, const char *schema, int states, int sample_ids)
{
	kl_err		err;
	kl_grammar *g = schema_grammar(schema, &err);
	uint32_t   *mask = malloc(kl_mask_words(v->n_ids) * 4),
			   *slow = malloc(kl_mask_words(v->n_ids) * 4);
	char		text[4096];
	size_t		len = 0;
	int			checked = 0,
				bad = 0,
				fast_bad = 0;

	for (int s = 0; s < states && g; s++)
	{
		kl_constraint *c = replay(g, v, text, len),
				   *shadow = replay(g, v, text, len);
		int			n_allowed = 0;

		if (!c || !shadow || kl_constraint_mask(c, mask, &n_allowed, &err) != KL_OK)
		{
			bad++;
			kl_constraint_free(c);
			kl_constraint_free(shadow);
			break;
		}
		if (!masks_agree(v, c, shadow, mask, slow))
			fast_bad++;
		for (int k = 0; k < sample_ids; k++)
		{
			int32_t		id = sample_ids >= v->n_ids ? k : (int32_t) (rnd() % (uint64_t) v->n_ids);
			bool		want = false;

			if (id >= v->n_ids)
				break;
			if (v->sym[id] == KL_VSYM_BYTES && id != end_id && len + (v->off[id + 1] - v->off[id]) < sizeof(text))
			{
				char		buf[4096];
				size_t		tl = v->off[id + 1] - v->off[id];
				kl_constraint *t;

				memcpy(buf, text, len);
				memcpy(buf + len, v->pool + v->off[id], tl);
				t = replay(g, v, buf, len + tl);
				want = t != NULL;
				kl_constraint_free(t);
			}
			else if (v->sym[id] == KL_VSYM_BYTES)
				continue;
			else if (id == end_id)
			{
				kl_constraint *t = replay(g, v, text, len);

				want = t && kl_constraint_feed_end(t);
				kl_constraint_free(t);
			}
			if (kl_mask_get(mask, id) != want)
				bad++;
			checked++;
		}
		/* move on: a random allowed token */
		{
			int			pick = (int) (rnd() % (uint64_t) n_allowed);
			int32_t		id = -1;

			for (int i = 0; i < v->n_ids && pick >= 0; i++)
				if (kl_mask_get(mask, i) && pick-- == 0)
					id = i;
			if (id == end_id || v->sym[id] != KL_VSYM_BYTES || len + (v->off[id + 1] - v->off[id]) >= sizeof(text))
				len = 0;		/* complete (or too long): start again */
			else
			{
				memcpy(text + len, v->pool + v->off[id], v->off[id + 1] - v->off[id]);
				len += v->off[id + 1] - v->off[id];
			}
		}
		kl_constraint_free(c);
		kl_constraint_free(shadow);
	}
	tap_ok(g && bad == 0 && checked > 0, "%s: masks equal feeding each token's bytes (%d checks at %d states)", label,
		   checked, states);
	tap_ok(g && fast_bad == 0, "%s: the string fast path gives the same masks as the plain walk", label);
	kl_grammar_free(g);
	free(mask);
	free(slow);
}

/* ------------------------------------------------------------------ generation from random logits */

typedef struct gen_result
{
	char	   *text;
	size_t		len;
	int			tokens;
	bool		done;
} gen_result;

static int fast_path_mismatches = 0;

/* Sample with random logits until the end (or max_tokens), through the mask (checked against the plain walk). */
static gen_result
random_generation(const kl_grammar *g, const kl_vocab *v, uint64_t seed, int max_tokens, float temperature,
				  bool check_fast_path)
{
	kl_constraint *c;
	kl_err		err;
	uint32_t   *mask = malloc(kl_mask_words(v->n_ids) * 4);
	float	   *logits = malloc(sizeof(float) * (size_t) v->n_ids);
	kl_sampling s;
	kl_rng		rng;
	gen_result	r = {0};
	size_t		cap = 256;

	r.text = malloc(cap);
	kl_sampling_default(&s);
	s.temperature = temperature;
	kl_rng_seed(&rng, seed);
	kl_constraint_new(g, v, &end_id, 1, &c, &err);
	for (int t = 0; t < max_tokens; t++)
	{
		int32_t		id;

		for (int i = 0; i < v->n_ids; i++)
			logits[i] = (float) ((kl_rng_next(&rng) >> 40) % 1000) / 100.0f;
		if (kl_constraint_mask(c, mask, NULL, &err) != KL_OK)
			break;
		if (check_fast_path)
		{
			uint32_t   *slow = malloc(kl_mask_words(v->n_ids) * 4);

			kl_constraint_use_fast_paths(c, false);
			kl_constraint_mask(c, slow, NULL, &err);
			kl_constraint_use_fast_paths(c, true);
			fast_path_mismatches += memcmp(mask, slow, kl_mask_words(v->n_ids) * 4) != 0;
			free(slow);
		}
		id = kl_sample_masked(&s, &rng, logits, v->n_ids, NULL, 0, mask);
		if (kl_constraint_accept(c, id, &err) != KL_OK)
		{
			tap_diag("accept failed: %s", err.msg);
			break;
		}
		r.tokens++;
		if (kl_constraint_done(c))
		{
			r.done = true;
			break;
		}
		if (v->sym[id] == KL_VSYM_BYTES)
		{
			size_t		tl = v->off[id + 1] - v->off[id];

			while (r.len + tl + 1 > cap)
				r.text = realloc(r.text, cap *= 2);
			memcpy(r.text + r.len, v->pool + v->off[id], tl);
			r.len += tl;
		}
	}
	r.text[r.len] = 0;
	kl_constraint_free(c);
	free(mask);
	free(logits);
	return r;
}

static const char *bounded_schema =
	"{\"type\": \"object\", \"properties\": {"
	"\"name\": {\"type\": \"string\", \"maxLength\": 12},"
	"\"rows\": {\"type\": \"integer\"},"
	"\"kind\": {\"enum\": [\"table\", \"view\", \"index\"]},"
	"\"columns\": {\"type\": \"array\", \"items\": {\"type\": \"string\", \"maxLength\": 8}, \"maxItems\": 3},"
	"\"logged\": {\"type\": \"boolean\"},"
	"\"ratio\": {\"type\": \"number\"},"
	"\"comment\": {\"type\": [\"string\", \"null\"], \"maxLength\": 10}},"
	"\"required\": [\"name\", \"rows\", \"kind\"]}";

static void
random_generations(const char *label, const kl_vocab *v, int n, float temperature, int check_first)
{
	kl_err		err;
	kl_grammar *g = schema_grammar(bounded_schema, &err);
	json_t	   *schema = json_loads(bounded_schema, 0, NULL);
	int			complete = 0,
				valid = 0,
				tokens = 0;

	for (int i = 0; i < n && g; i++)
	{
		gen_result r = random_generation(g, v, 1000 + (uint64_t) i, 2000, temperature, i < check_first);
		json_t	   *j = r.done ? json_loadb(r.text, r.len, JSON_REJECT_DUPLICATES, NULL) : NULL;

		complete += r.done;
		if (j && validate(j, schema))
			valid++;
		else if (r.done)
			tap_diag("invalid: %s", r.text);
		tokens += r.tokens;
		json_decref(j);
		free(r.text);
	}
	tap_ok(complete == n && valid == n, "%s: %d generations from random logits all end and all validate (%d tokens)",
		   label, n, tokens);
	if (check_first > 0)
		tap_ok(fast_path_mismatches == 0, "%s: at every step of %d of them the masks equal the plain walk's", label,
			   check_first);
	json_decref(schema);
	kl_grammar_free(g);
}

/* ------------------------------------------------------------------ tool-call replies */

static void
tool_replies(void)
{
	const char *tools = "[{\"name\": \"run_sql\", \"parameters\": {\"type\": \"object\", \"properties\": "
		"{\"query\": {\"type\": \"string\", \"maxLength\": 20}}, \"required\": [\"query\"]}},"
		"{\"name\": \"table_size\", \"parameters\": {\"type\": \"object\", \"properties\": "
		"{\"table\": {\"enum\": [\"orders\", \"customers\"]}}, \"required\": [\"table\"]}}]";
	const char *decl = "[{\"type\": \"function\", \"function\": {\"name\": \"run_sql\"}},"
		"{\"type\": \"function\", \"function\": {\"name\": \"table_size\"}}]";
	static const char *const choices[] = {"run_sql", "required", "auto", "none"};
	kl_chat    *c;
	kl_err		err;

	kl_chat_parse(NULL, 0, decl, strlen(decl), false, &c, &err);
	for (int k = 0; k < 4; k++)
	{
		char		spec[2048];
		kl_grammar *g;
		int			calls = 0,
					good = 0,
					texts = 0,
					n = 40;

		snprintf(spec, sizeof(spec), "{\"tools\": %s, \"tool_choice\": \"%s\", \"first_index\": 7}", tools, choices[k]);
		if (kl_grammar_compile(spec, strlen(spec), &g, &err) != KL_OK)
		{
			tap_ok(0, "tool grammar %s: %s", choices[k], err.msg);
			continue;
		}
		for (int i = 0; i < n; i++)
		{
			kl_constraint *con;
			uint32_t   *mask = malloc(kl_mask_words(vocab->n_ids) * 4);
			float	   *logits = malloc(sizeof(float) * (size_t) vocab->n_ids);
			kl_ids		ids = {0};
			kl_rng		rng;
			kl_sampling s;
			kl_chat_reply *r = NULL;

			kl_sampling_default(&s);
			s.temperature = 1;
			kl_rng_seed(&rng, (uint64_t) i);
			kl_constraint_new(g, vocab, &end_id, 1, &con, &err);
			for (int t = 0; t < 300 && !kl_constraint_done(con); t++)
			{
				int32_t		id;

				for (int q = 0; q < vocab->n_ids; q++)
					logits[q] = (float) ((kl_rng_next(&rng) >> 40) % 1000) / 100.0f;
				/* make the section (and the end) likely in auto mode, so both kinds of reply happen */
				logits[3851] += 6;
				logits[end_id] += 7;
				kl_constraint_mask(con, mask, NULL, &err);
				id = kl_sample_masked(&s, &rng, logits, vocab->n_ids, NULL, 0, mask);
				kl_constraint_accept(con, id, &err);
				kl_ids_push(&ids, id, &err);
			}
			kl_chat_parse_reply_ids(tok, ids.ids, ids.n, c, &r, &err);
			if (r && r->n_calls > 0)
			{
				bool		all = true;

				for (int q = 0; q < r->n_calls; q++)
				{
					char		want[64];

					snprintf(want, sizeof(want), "functions.%s:%d", r->calls[q].name ? r->calls[q].name : "?", 7 + q);
					all = all && !r->calls[q].error && strcmp(r->calls[q].id, want) == 0;
				}
				calls++;
				good += all && kl_constraint_done(con) &&
					(k != 0 || (r->n_calls == 1 && strcmp(r->calls[0].name, "run_sql") == 0));
			}
			else if (r && kl_constraint_done(con))
				texts++;
			kl_chat_reply_free(r);
			kl_constraint_free(con);
			kl_ids_free(&ids);
			free(mask);
			free(logits);
		}
		if (k <= 1)
			tap_ok(calls == n && good == n, "tool_choice %s: %d of %d replies are well-formed calls numbered from 7%s",
				   choices[k], good, n, k == 0 ? ", one call of run_sql each" : "");
		else if (k == 2)
			tap_ok(calls > 0 && texts > 0 && good == calls, "tool_choice auto: %d replies with calls (all well formed), %d in text",
				   calls, texts);
		else
			tap_ok(calls == 0 && texts == n, "tool_choice none: %d text replies, no calls", texts);
		kl_grammar_free(g);
	}
	kl_chat_free(c);
}

/* ------------------------------------------------------------------ the bundled model */

/*
 * n generations at temperature 1 with seeds seed0 .. seed0 + n - 1, batch
 * sequences at a time; the token ids of each into out[i].
 */
static bool
model_generations(kl_model *m, const kl_grammar *g, const int32_t *prompt, int n_prompt, int n, int batch,
				  uint64_t seed0, int max_tokens, kl_tokens *out)
{
	kl_ctx	   *ctx;
	kl_seq	   *base;
	kl_err		err;
	int			V = kl_model_config(m)->vocab_size;
	float	   *logits = malloc(sizeof(float) * (size_t) V * (size_t) batch);
	float	   *last = malloc(sizeof(float) * (size_t) V);
	uint32_t   *mask = malloc(kl_mask_words(V) * 4);
	kl_batch_item one = {0};
	bool		ok = true;

	if (kl_ctx_new(m, 512, &ctx, &err) != KL_OK || kl_seq_new(m, &base, &err) != KL_OK)
		return false;
	one.seq = base;
	one.ids = prompt;
	one.n = n_prompt;
	one.logits = last;
	if (kl_forward(ctx, &one, 1, &err) != KL_OK)
		return false;
	for (int b0 = 0; b0 < n && ok; b0 += batch)
	{
		int			nb = n - b0 < batch ? n - b0 : batch;
		kl_seq	   *seq[64];
		kl_constraint *con[64];
		kl_rng		rng[64];
		int32_t		next[64];
		bool		live[64];
		kl_sampling s;

		kl_sampling_default(&s);
		s.temperature = 1.0f;
		for (int i = 0; i < nb; i++)
		{
			kl_seq_clone(base, &seq[i], &err);
			kl_constraint_new(g, vocab, &end_id, 1, &con[i], &err);
			kl_rng_seed(&rng[i], seed0 + (uint64_t) (b0 + i));
			memcpy(logits + (size_t) i * V, last, sizeof(float) * (size_t) V);
			live[i] = true;
		}
		for (int step = 0; step < max_tokens; step++)
		{
			kl_batch_item items[64];
			int			ni = 0;

			for (int i = 0; i < nb; i++)
			{
				float	   *l = logits + (size_t) i * V;

				if (!live[i])
					continue;
				if (kl_constraint_mask(con[i], mask, NULL, &err) != KL_OK)
				{
					ok = false;
					live[i] = false;
					continue;
				}
				next[i] = kl_sample_masked(&s, &rng[i], l, V, NULL, 0, mask);
				kl_constraint_accept(con[i], next[i], &err);
				kl_tokens_push(&out[b0 + i], next[i], &err);
				if (kl_constraint_done(con[i]))
				{
					live[i] = false;
					continue;
				}
				items[ni].seq = seq[i];
				items[ni].ids = &next[i];
				items[ni].n = 1;
				items[ni].logits = l;
				items[ni].all_logits = false;
				ni++;
			}
			if (ni == 0)
				break;
			if (kl_forward(ctx, items, ni, &err) != KL_OK)
			{
				tap_diag("forward: %s", err.msg);
				ok = false;
				break;
			}
		}
		for (int i = 0; i < nb; i++)
		{
			kl_seq_free(seq[i]);
			kl_constraint_free(con[i]);
		}
		if (getenv("KL_TEST_VERBOSE"))
		{
			size_t		tokens = 0,
						longest = 0;

			for (int i = 0; i < nb; i++)
			{
				tokens += out[b0 + i].n;
				longest = out[b0 + i].n > longest ? out[b0 + i].n : longest;
			}
			tap_diag("batch at %d: %zu tokens, longest %zu", b0, tokens, longest);
		}
	}
	kl_seq_free(base);
	kl_ctx_free(ctx);
	free(logits);
	free(last);
	free(mask);
	return ok;
}

/* short replies (1,000 of them run here): every kind of value, few tokens */
static const char *model_schema =
	"{\"type\": \"object\", \"properties\": {"
	"\"name\": {\"type\": \"string\", \"maxLength\": 10},"
	"\"rows\": {\"type\": \"integer\"},"
	"\"kind\": {\"enum\": [\"table\", \"view\", \"index\"]},"
	"\"logged\": {\"type\": [\"boolean\", \"null\"]},"
	"\"tags\": {\"type\": \"array\", \"items\": {\"type\": \"string\", \"maxLength\": 4}, \"maxItems\": 2}},"
	"\"required\": [\"name\", \"kind\"]}";

static void
bundled_model(void)
{
	char		dir[1200];
	kl_model   *m = NULL;
	kl_err		err;
	kl_grammar *g = schema_grammar(model_schema, &err);
	json_t	   *schema = json_loads(model_schema, 0, NULL);
	kl_chat_message msgs[2] = {
		{"system", "Answer with a JSON object describing a table.", 0},
		{"user", "Describe the table pg_class.", 0}};
	kl_ids		prompt = {0};
	const int	N = getenv("KL_CONSTRAINT_GENERATIONS") ? atoi(getenv("KL_CONSTRAINT_GENERATIONS")) : 1000;
	kl_tokens  *out = calloc((size_t) N + 20, sizeof(kl_tokens)),
			   *again = calloc(8, sizeof(kl_tokens));
	int			valid = 0,
				same = 0;
	long		tokens = 0;
	double		t0;

	snprintf(dir, sizeof(dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (kl_model_load(dir, NULL, &m, &err) != KL_OK)
	{
		tap_ok(0, "bundled model loads: %s", err.msg);
		return;
	}
	for (int i = 0; i < 2; i++)
		msgs[i].content_len = strlen(msgs[i].content);
	kl_chat_render(tok, msgs, 2, true, &prompt, &err);
	t0 = kl_now();
	if (!model_generations(m, g, prompt.ids, (int) prompt.n, N, 64, 1, 1000, out))
		tap_diag("generation failed");
	for (int i = 0; i < N; i++)
	{
		char	   *text;
		size_t		len;
		json_t	   *j;

		tokens += (long) out[i].n;
		/* the last token is the end token */
		if (out[i].n == 0 || out[i].ids[out[i].n - 1] != end_id ||
			kl_decode(tok, out[i].ids, out[i].n - 1, &text, &len, &err) != KL_OK)
			continue;
		j = json_loadb(text, len, JSON_REJECT_DUPLICATES, NULL);
		if (j && validate(j, schema))
			valid++;
		else
			tap_diag("invalid generation %d: %s", i, text);
		if (i < 3 && getenv("KL_TEST_VERBOSE"))
			tap_diag("generation %d: %s", i, text);
		json_decref(j);
		free(text);
	}
	tap_ok(valid == N, "%d generations of the bundled model (seeded, temperature 1) all end and validate against "
		   "the schema (%ld tokens, %.1f s)", N, tokens, kl_now() - t0);
	/* the same seeds again, in a batch of another size: the same tokens */
	model_generations(m, g, prompt.ids, (int) prompt.n, 8, 3, 1, 1000, again);
	for (int i = 0; i < 8; i++)
		same += again[i].n == out[i].n && memcmp(again[i].ids, out[i].ids, out[i].n * sizeof(int32_t)) == 0;
	tap_ok(same == 8, "seeded constrained generation is deterministic (8 of 8 repeated in batches of 3)");
	for (int i = 0; i < N; i++)
		kl_tokens_free(&out[i]);
	for (int i = 0; i < 8; i++)
		kl_tokens_free(&again[i]);
	free(out);
	free(again);
	kl_ids_free(&prompt);
	json_decref(schema);
	kl_grammar_free(g);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ a 160k-token vocabulary */

/* Synthetic tokens like a large BPE vocabulary's: words with a leading space, CJK, punctuation, digits, bytes. */
static kl_vocab *
synthetic_vocab(int n)
{
	uint8_t   **b = malloc(sizeof(uint8_t *) * (size_t) n);
	size_t	   *l = malloc(sizeof(size_t) * (size_t) n);
	kl_vocab   *v = NULL;
	kl_err		err;
	static const char punct[] = "{}[]\":, .\\-_/()'!?;\n";
	for (int i = 0; i < n; i++)
	{
		uint8_t		t[48];
		size_t		len = 0;

		if (i < 256)
			t[len++] = (uint8_t) i;
		else
		{
			int			kind = (int) (rnd() % 10);
			int			k = 1 + (int) (rnd() % 9);

			if (kind < 5)
			{
				if (rnd() % 2)
					t[len++] = ' ';
				for (int q = 0; q < k; q++)
					t[len++] = (uint8_t) ('a' + rnd() % 26);
			}
			else if (kind < 7)
			{
				for (int q = 0; q < 1 + k % 4; q++)
				{
					unsigned	cp = 0x4E00 + (unsigned) (rnd() % 0x5000);

					t[len++] = (uint8_t) (0xE0 | (cp >> 12));
					t[len++] = (uint8_t) (0x80 | ((cp >> 6) & 0x3F));
					t[len++] = (uint8_t) (0x80 | (cp & 0x3F));
				}
				if (rnd() % 8 == 0)
					len--;		/* a token ending inside a character */
			}
			else if (kind < 9)
			{
				for (int q = 0; q < 1 + k % 3; q++)
					t[len++] = (uint8_t) punct[rnd() % (sizeof(punct) - 1)];
			}
			else
				for (int q = 0; q < k % 4 + 1; q++)
					t[len++] = (uint8_t) ('0' + rnd() % 10);
			/* make it distinct */
			len += (size_t) snprintf((char *) t + len, sizeof(t) - len, "%c%d", 'A' + (int) (rnd() % 26), i);
		}
		b[i] = malloc(len);
		memcpy(b[i], t, len);
		l[i] = len;
	}
	if (kl_vocab_from_bytes((const uint8_t *const *) b, l, n, &v, &err) != KL_OK)
		tap_diag("synthetic vocabulary: %s", err.msg);
	for (int i = 0; i < n; i++)
		free(b[i]);
	free(b);
	free(l);
	return v;
}

int
main(void)
{
	char		dir[1200];
	kl_err		err;
	kl_vocab   *big;
	double		t0;

	snprintf(dir, sizeof(dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (!tap_ok(kl_tokenizer_load(dir, &tok, &err) == KL_OK &&
				kl_vocab_from_tokenizer(tok, 4096, &vocab, &err) == KL_OK, "the bundled vocabulary indexes"))
	{
		tap_diag("%s", err.msg);
		return tap_done();
	}
	end_id = kl_tokenizer_eos(tok);
	compile_errors();
	acceptance();
	t0 = kl_now();
	brute_force("bundled vocabulary", vocab, bounded_schema, 80, 4096);
	brute_force("bundled vocabulary, free-form JSON", vocab, "{}", 40, 4096);
	random_generations("bundled vocabulary", vocab, 1000, 1.0f, 100);
	tool_replies();
	tap_diag("bundled vocabulary: %.1f s", kl_now() - t0);
	t0 = kl_now();
	big = synthetic_vocab(160000);
	end_id = 0;
	if (big)
	{
		brute_force("160k synthetic vocabulary", big, bounded_schema, 40, 2000);
		random_generations("160k synthetic vocabulary", big, 30, 1.0f, 0);
	}
	kl_vocab_free(big);
	tap_diag("160k vocabulary: %.1f s", kl_now() - t0);
	end_id = kl_tokenizer_eos(tok);
	bundled_model();
	kl_vocab_free(vocab);
	kl_tokenizer_free(tok);
	return tap_done();
}
