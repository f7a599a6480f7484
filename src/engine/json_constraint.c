/*
 * json_constraint.c — JSON schemas and tool-call replies compiled to a
 * pushdown automaton over bytes and special tokens, and the per-step masks
 * of allowed token ids (see json_constraint.h for the contract).
 *
 * Compiling: a schema becomes a graph of nodes (sc_node): the JSON types a
 * value may have, and per type what constrains it (the property names of an
 * object, as a byte trie of their quoted spellings; the items' node and
 * count bounds; string length bounds; or the exact spellings of enum
 * values, as a trie).  A reply grammar adds the tool names (a trie of
 * "functions.NAME:") and each tool's parameter node.
 *
 * Running: the state is a stack of frames.  The bottom frame is the reply
 * program (free text, tool-call section, calls, the end); above it one frame
 * per JSON value being written (object, array, string, number, literal) and
 * the value expected next.  A symbol (a byte, or a special token) is offered
 * to the top frame, which takes it, rejects it, or — a number or a literal
 * that may end here, offered something that cannot continue it — ends and
 * passes the symbol to the frame below.  States are small and copied, which
 * is what the mask computation does at every trie node: copy the parent's
 * state, offer the node's byte, keep the subtree only if it was taken.
 *
 * Every state the automaton can reach has a continuation (strings can close
 * once long enough, objects have a key left while required ones are
 * missing, numbers leave room for their last digit, depth is checked at
 * compile time), so generation never gets stuck.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_constraint.h"
#include "json_text.h"

#define JC_MAX_DEPTH 32			/* frames: the program + nested values */
#define JC_MAX_SCHEMA_DEPTH 16
#define JC_MAX_WS 16
#define JC_MAX_NUM 24
#define JC_MAX_EXP_DIGITS 2
#define JC_MAX_INT_DIGITS 18
#define JC_MAX_PROPS 64
#define JC_MAX_NODES 4096
#define JC_MAX_ENUM 1024
#define JC_MAX_LITERAL 1024
#define JC_MAX_TOOLS 256
#define JC_MAX_CALLS 16
#define JC_MAX_INDEX 1000000

/* symbols beyond the bytes */
enum
{
	SYM_END = 256,
	SYM_SECTION_BEGIN,
	SYM_SECTION_END,
	SYM_CALL_BEGIN,
	SYM_ARG_BEGIN,
	SYM_CALL_END,
	SYM_OTHER
};

/* JSON types */
enum
{
	T_OBJECT = 1,
	T_ARRAY = 2,
	T_STRING = 4,
	T_NUMBER = 8,
	T_INTEGER = 16,
	T_BOOLEAN = 32,
	T_NULL = 64,
	T_ANY = 127
};

typedef struct sc_node
{
	uint8_t		types;
	int32_t		enum_root;		/* trie of the enum values' spellings, -1: none */
	int32_t		key_root;		/* trie of '<key>"' of the declared properties, -1: any keys */
	int32_t		prop_first;		/* property k's node: props[prop_first + k] */
	int32_t		n_props;
	uint64_t	required;
	int32_t		values;			/* any keys: the values' node */
	int32_t		items;
	int32_t		min_items,
				max_items;		/* -1: no maximum */
	int32_t		min_len,
				max_len;
} sc_node;

typedef struct lit_node
{
	int32_t		first_child,
				next_sibling;
	int32_t		term;			/* the literal ending here, -1 */
	uint64_t	below;			/* terms < 64 ending in this subtree */
	uint8_t		byte;
} lit_node;

enum
{
	MODE_AUTO,
	MODE_NONE,
	MODE_REQUIRED,
	MODE_NAMED
};

struct kl_grammar
{
	sc_node    *nodes;
	int32_t		n_nodes,
				cap_nodes;
	int32_t    *props;
	int32_t		n_props,
				cap_props;
	lit_node   *lits;
	int32_t		n_lits,
				cap_lits;
	int32_t		any;			/* the node of any JSON value */
	int32_t		lit_bool,
				lit_null;

	int32_t		root;			/* json_schema's node, -1: none */
	bool		tools;
	int			mode;
	int			n_tools;
	int32_t    *tool_node;
	int32_t		names_root;		/* trie of "functions.NAME:" */
	int32_t		first_index;
};

/* ------------------------------------------------------------------ building */

static int32_t
new_node(kl_grammar *g, kl_err *err)
{
	sc_node    *n;

	if (g->n_nodes >= JC_MAX_NODES)
		return kl_errc(err, KL_E_RESOURCES, "the schema is too large (more than %d nodes)", JC_MAX_NODES);
	if (g->n_nodes == g->cap_nodes)
	{
		int32_t		cap = g->cap_nodes ? g->cap_nodes * 2 : 16;
		sc_node    *p = realloc(g->nodes, sizeof(sc_node) * (size_t) cap);

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		g->nodes = p;
		g->cap_nodes = cap;
	}
	n = &g->nodes[g->n_nodes];
	memset(n, 0, sizeof(*n));
	n->enum_root = n->key_root = -1;
	n->values = n->items = g->any;
	n->max_items = n->max_len = -1;
	return g->n_nodes++;
}

static int32_t
new_lit(kl_grammar *g, uint8_t byte, kl_err *err)
{
	if (g->n_lits == g->cap_lits)
	{
		int32_t		cap = g->cap_lits ? g->cap_lits * 2 : 64;
		lit_node   *p = realloc(g->lits, sizeof(lit_node) * (size_t) cap);

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		g->lits = p;
		g->cap_lits = cap;
	}
	g->lits[g->n_lits] = (lit_node) {-1, -1, -1, 0, byte};
	return g->n_lits++;
}

/* Add the literal s[0..n) ending with term to the trie at root. */
static int
lit_add(kl_grammar *g, int32_t root, const char *s, size_t n, int32_t term, kl_err *err)
{
	int32_t		node = root;

	if (term < 64)
		g->lits[root].below |= 1ull << term;
	for (size_t i = 0; i < n; i++)
	{
		int32_t		c;

		for (c = g->lits[node].first_child; c >= 0 && g->lits[c].byte != (uint8_t) s[i]; c = g->lits[c].next_sibling)
			;
		if (c < 0)
		{
			if ((c = new_lit(g, (uint8_t) s[i], err)) < 0)
				return KL_FAIL;
			g->lits[c].next_sibling = g->lits[node].first_child;
			g->lits[node].first_child = c;
		}
		node = c;
		if (term < 64)
			g->lits[node].below |= 1ull << term;
	}
	if (g->lits[node].term >= 0)
		return kl_errc(err, KL_E_INVALID, "a value is listed twice");
	g->lits[node].term = term;
	return KL_OK;
}

static int32_t
add_prop_slot(kl_grammar *g, kl_err *err)
{
	if (g->n_props == g->cap_props)
	{
		int32_t		cap = g->cap_props ? g->cap_props * 2 : 16;
		int32_t    *p = realloc(g->props, sizeof(int32_t) * (size_t) cap);

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		g->props = p;
		g->cap_props = cap;
	}
	g->props[g->n_props] = -1;
	return g->n_props++;
}

/* ------------------------------------------------------------------ schema compiler */

static const char *const annotations[] = {
	"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
	"writeOnly", NULL
};
static const char *const keywords[] = {
	"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
	"minLength", "maxLength", NULL
};

static bool
in_list(const char *const *list, const char *s)
{
	for (; *list; list++)
		if (strcmp(*list, s) == 0)
			return true;
	return false;
}

static int
type_bit(const char *name)
{
	static const struct
	{
		const char *name;
		int			bit;
	}			t[] = {{"object", T_OBJECT}, {"array", T_ARRAY}, {"string", T_STRING}, {"number", T_NUMBER},
	{"integer", T_INTEGER}, {"boolean", T_BOOLEAN}, {"null", T_NULL}};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++)
		if (strcmp(t[i].name, name) == 0)
			return t[i].bit;
	return 0;
}

static int
value_type(const json_t *v)
{
	switch (json_typeof(v))
	{
		case JSON_OBJECT:
			return T_OBJECT;
		case JSON_ARRAY:
			return T_ARRAY;
		case JSON_STRING:
			return T_STRING;
		case JSON_INTEGER:
			return T_INTEGER | T_NUMBER;
		case JSON_REAL:
			return T_NUMBER;
		case JSON_TRUE:
		case JSON_FALSE:
			return T_BOOLEAN;
		default:
			return T_NULL;
	}
}

/* A non-negative integer keyword (bounds); -1 if absent. */
static int
bound(json_t *s, const char *key, const char *path, int32_t *out, kl_err *err)
{
	json_t	   *v = json_object_get(s, key);

	*out = -1;
	if (!v)
		return KL_OK;
	if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
		return kl_errc(err, KL_E_INVALID, "%s: \"%s\" must be a non-negative integer", path, key);
	*out = (int32_t) json_integer_value(v);
	return KL_OK;
}

static int32_t compile_schema(kl_grammar *g, json_t *s, int depth, const char *path, kl_err *err);

static int
compile_enum(kl_grammar *g, int32_t node, json_t *values, const char *path, kl_err *err)
{
	int32_t		root;
	int			kept = 0;
	uint8_t		types = g->nodes[node].types;
	if (!json_is_array(values) || json_array_size(values) == 0)
		return kl_errc(err, KL_E_INVALID, "%s: \"enum\" must be a non-empty array", path);
	if (json_array_size(values) > JC_MAX_ENUM)
		return kl_errc(err, KL_E_RESOURCES, "%s: \"enum\" has more than %d values", path, JC_MAX_ENUM);
	if ((root = new_lit(g, 0, err)) < 0)
		return KL_FAIL;
	for (size_t i = 0; i < json_array_size(values); i++)
	{
		json_t	   *v = json_array_get(values, i);
		kl_buf		b = {0};
		bool		dup;

		if (!(value_type(v) & types))
			continue;			/* not of the allowed types: never valid */
		kl_json_dump_py(&b, v, true);
		if (kl_buf_check(&b, err) != KL_OK)
			return KL_FAIL;
		if (b.len > JC_MAX_LITERAL)
		{
			kl_buf_free(&b);
			return kl_errc(err, KL_E_RESOURCES,
						   "%s: an enum value is longer than %d bytes as JSON", path, JC_MAX_LITERAL);
		}
		/* equal spellings are one value */
		{
			int32_t		n = root;

			for (size_t k = 0; k < b.len && n >= 0; k++)
			{
				int32_t		c;

				for (c = g->lits[n].first_child; c >= 0 && g->lits[c].byte != (uint8_t) b.data[k];
					 c = g->lits[c].next_sibling)
					;
				n = c;
			}
			dup = n >= 0 && g->lits[n].term >= 0;
		}
		if (!dup && lit_add(g, root, b.data, b.len, (int32_t) (64 + i), err) != KL_OK)
		{
			kl_buf_free(&b);
			return KL_FAIL;
		}
		kl_buf_free(&b);
		kept++;
	}
	if (kept == 0)
		return kl_errc(err, KL_E_INVALID, "%s: no value of \"enum\" has the schema's type", path);
	g->nodes[node].enum_root = root;
	return KL_OK;
}

static int
compile_object(kl_grammar *g, int32_t node, json_t *s, int depth, const char *path, kl_err *err)
{
	json_t	   *props = json_object_get(s, "properties"),
			   *req = json_object_get(s, "required"),
			   *add = json_object_get(s, "additionalProperties");
	char		sub[512];

	if (props && !json_is_object(props))
		return kl_errc(err, KL_E_INVALID, "%s: \"properties\" must be an object", path);
	if (add && !json_is_boolean(add) && !json_is_object(add))
		return kl_errc(err, KL_E_INVALID, "%s: \"additionalProperties\" must be false, true or a schema", path);
	if (props)
	{
		const char *key;
		json_t	   *val;
		int32_t		k = 0,
					first,
					root;

		if (add && !json_is_false(add))
			return kl_errc(err, KL_E_INVALID, "%s: \"additionalProperties\" other than false cannot be combined with "
						   "\"properties\" (objects with properties take only those keys)", path);
		if (json_object_size(props) > JC_MAX_PROPS)
			return kl_errc(err, KL_E_RESOURCES, "%s: more than %d properties", path, JC_MAX_PROPS);
		if ((root = new_lit(g, 0, err)) < 0)
			return KL_FAIL;
		first = g->n_props;
		for (size_t i = 0; i < json_object_size(props); i++)
			if (add_prop_slot(g, err) < 0)
				return KL_FAIL;
		json_object_foreach(props, key, val)
		{
			kl_buf		b = {0};
			int32_t		child;

			/* the key as written after its opening quote: escaped text, closing quote */
			kl_json_put_string(&b, key, strlen(key));
			if (kl_buf_check(&b, err) != KL_OK)
				return KL_FAIL;
			if (b.len > JC_MAX_LITERAL)
			{
				kl_buf_free(&b);
				return kl_errc(err, KL_E_RESOURCES, "%s: a property name is too long", path);
			}
			if (lit_add(g, root, b.data + 1, b.len - 1, k, err) != KL_OK)
			{
				kl_buf_free(&b);
				return KL_FAIL;
			}
			kl_buf_free(&b);
			snprintf(sub, sizeof(sub), "%s/properties/%s", path, key);
			if ((child = compile_schema(g, val, depth + 1, sub, err)) < 0)
				return KL_FAIL;
			g->props[first + k] = child;
			k++;
		}
		g->nodes[node].key_root = root;
		g->nodes[node].prop_first = first;
		g->nodes[node].n_props = k;
	}
	else if (add && json_is_object(add))
	{
		int32_t		child;

		snprintf(sub, sizeof(sub), "%s/additionalProperties", path);
		if ((child = compile_schema(g, add, depth + 1, sub, err)) < 0)
			return KL_FAIL;
		g->nodes[node].values = child;
	}
	else if (add && json_is_false(add))
	{
		/* no properties and no other keys: only {} */
		int32_t		root = new_lit(g, 0, err);

		if (root < 0)
			return KL_FAIL;
		g->nodes[node].key_root = root;
	}
	if (req)
	{
		if (!json_is_array(req))
			return kl_errc(err, KL_E_INVALID, "%s: \"required\" must be an array of property names", path);
		for (size_t i = 0; i < json_array_size(req); i++)
		{
			json_t	   *r = json_array_get(req, i);
			int32_t		k = 0;
			bool		found = false;
			const char *key;
			json_t	   *val;

			if (!json_is_string(r))
				return kl_errc(err, KL_E_INVALID, "%s: \"required\" must be an array of property names", path);
			if (!props)
				return kl_errc(err, KL_E_INVALID,
							   "%s: \"required\" needs \"properties\" naming the required ones", path);
			json_object_foreach(props, key, val)
			{
				(void) val;
				if (strcmp(key, json_string_value(r)) == 0)
				{
					found = true;
					break;
				}
				k++;
			}
			if (!found)
				return kl_errc(err, KL_E_INVALID, "%s: required property \"%s\" is not in \"properties\"", path,
							   json_string_value(r));
			g->nodes[node].required |= 1ull << k;
		}
	}
	return KL_OK;
}

static int32_t
compile_schema(kl_grammar *g, json_t *s, int depth, const char *path, kl_err *err)
{
	int32_t		node;
	const char *key;
	json_t	   *val,
			   *type;
	bool		has_enum;
	int			types = 0;
	int32_t		lo,
				hi;

	if (depth > JC_MAX_SCHEMA_DEPTH)
		return kl_errc(err, KL_E_RESOURCES, "%s: schemas nest more than %d levels", path, JC_MAX_SCHEMA_DEPTH);
	if (json_is_true(s))
		s = NULL;				/* true: any value */
	else if (!json_is_object(s))
		return kl_errc(err, KL_E_INVALID, "%s: a schema must be a JSON object (or true)", path);
	if ((node = new_node(g, err)) < 0)
		return KL_FAIL;
	if (!s)
	{
		g->nodes[node].types = T_ANY;
		return node;
	}
	json_object_foreach(s, key, val)
	{
		(void) val;
		if (!in_list(keywords, key) && !in_list(annotations, key))
			return kl_errc(err, KL_E_UNSUPPORTED, "%s: the keyword \"%s\" is not supported; supported: %s", path, key,
						   KL_JSON_SCHEMA_SUPPORTED);
	}
	type = json_object_get(s, "type");
	if (json_is_string(type))
	{
		if (!(types = type_bit(json_string_value(type))))
			return kl_errc(err, KL_E_INVALID,
						   "%s: unknown type \"%s\" (object, array, string, number, integer, boolean, null)",
						   path, json_string_value(type));
	}
	else if (json_is_array(type) && json_array_size(type) > 0)
	{
		for (size_t i = 0; i < json_array_size(type); i++)
		{
			json_t	   *t = json_array_get(type, i);
			int			bit = json_is_string(t) ? type_bit(json_string_value(t)) : 0;

			if (!bit)
				return kl_errc(err, KL_E_INVALID,
							   "%s: \"type\" lists something other than object, array, string, number, "
							   "integer, boolean, null", path);
			types |= bit;
		}
	}
	else if (type)
		return kl_errc(err, KL_E_INVALID, "%s: \"type\" must be a type name or a non-empty list of them", path);
	else
	{
		/* no type: what the keywords imply, else anything */
		if (json_object_get(s, "properties") || json_object_get(s, "required") ||
			json_object_get(s, "additionalProperties"))
			types |= T_OBJECT;
		if (json_object_get(s, "items") || json_object_get(s, "minItems") || json_object_get(s, "maxItems"))
			types |= T_ARRAY;
		if (json_object_get(s, "minLength") || json_object_get(s, "maxLength"))
			types |= T_STRING;
		if (!types)
			types = T_ANY;
	}
	if (types & T_NUMBER)
		types |= T_INTEGER;
	g->nodes[node].types = (uint8_t) types;

	has_enum = json_object_get(s, "enum") || json_object_get(s, "const");
	if (has_enum)
	{
		json_t	   *values = json_object_get(s, "enum");
		json_t	   *tmp = NULL;
		int			rc;

		json_object_foreach(s, key, val)
		{
			(void) val;
			if (in_list(keywords, key) && strcmp(key, "type") != 0 && strcmp(key, "enum") != 0 &&
				strcmp(key, "const") != 0)
				return kl_errc(err, KL_E_INVALID,
							   "%s: \"enum\" and \"const\" combine only with \"type\", not with \"%s\"",
							   path, key);
		}
		if (values && json_object_get(s, "const"))
			return kl_errc(err, KL_E_INVALID, "%s: give \"enum\" or \"const\", not both", path);
		if (!values)
			values = tmp = json_pack("[O]", json_object_get(s, "const"));
		if (!values)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		rc = compile_enum(g, node, values, path, err);
		json_decref(tmp);
		return rc == KL_OK ? node : KL_FAIL;
	}

	if (compile_object(g, node, s, depth, path, err) != KL_OK)
		return KL_FAIL;
	{
		json_t	   *items = json_object_get(s, "items");

		if (items)
		{
			char		sub[512];
			int32_t		child;

			if (json_is_array(items))
				return kl_errc(err, KL_E_UNSUPPORTED,
							   "%s: \"items\" as a list (tuples) is not supported; give one schema", path);
			snprintf(sub, sizeof(sub), "%s/items", path);
			if ((child = compile_schema(g, items, depth + 1, sub, err)) < 0)
				return KL_FAIL;
			g->nodes[node].items = child;
		}
	}
	if (bound(s, "minItems", path, &lo, err) != KL_OK || bound(s, "maxItems", path, &hi, err) != KL_OK)
		return KL_FAIL;
	if (lo >= 0 && hi >= 0 && lo > hi)
		return kl_errc(err, KL_E_INVALID, "%s: minItems is greater than maxItems", path);
	g->nodes[node].min_items = lo < 0 ? 0 : lo;
	g->nodes[node].max_items = hi;
	if (bound(s, "minLength", path, &lo, err) != KL_OK || bound(s, "maxLength", path, &hi, err) != KL_OK)
		return KL_FAIL;
	if (lo >= 0 && hi >= 0 && lo > hi)
		return kl_errc(err, KL_E_INVALID, "%s: minLength is greater than maxLength", path);
	g->nodes[node].min_len = lo < 0 ? 0 : lo;
	g->nodes[node].max_len = hi;
	return node;
}

static kl_grammar *
grammar_alloc(kl_err *err)
{
	kl_grammar *g = kl_calloc(1, sizeof(kl_grammar), err);

	if (!g)
		return NULL;
	g->root = -1;
	g->names_root = -1;
	g->any = 0;
	if (new_node(g, err) != 0)	/* node 0: any value (its children are any values too) */
		goto fail;
	g->nodes[0].types = T_ANY;
	if ((g->lit_bool = new_lit(g, 0, err)) < 0 || lit_add(g, g->lit_bool, "true", 4, 0, err) != KL_OK ||
		lit_add(g, g->lit_bool, "false", 5, 1, err) != KL_OK ||
		(g->lit_null = new_lit(g, 0, err)) < 0 || lit_add(g, g->lit_null, "null", 4, 0, err) != KL_OK)
		goto fail;
	return g;
fail:
	kl_grammar_free(g);
	return NULL;
}

void
kl_grammar_free(kl_grammar *g)
{
	if (!g)
		return;
	free(g->nodes);
	free(g->props);
	free(g->lits);
	free(g->tool_node);
	free(g);
}

bool
kl_grammar_has_tools(const kl_grammar *g)
{
	return g->tools && g->mode != MODE_NONE;
}

int
kl_json_schema_check(const char *schema, size_t len, const char *what, kl_err *err)
{
	json_error_t jerr;
	json_t	   *s = json_loadb(schema, len, JSON_REJECT_DUPLICATES, &jerr);
	kl_grammar *g;
	int			rc;

	if (!s)
		return kl_errc(err, KL_E_INVALID, "%s is not valid JSON: %s", what, jerr.text);
	if (!(g = grammar_alloc(err)))
	{
		json_decref(s);
		return KL_FAIL;
	}
	rc = compile_schema(g, s, 0, what, err) < 0 ? KL_FAIL : KL_OK;
	kl_grammar_free(g);
	json_decref(s);
	return rc;
}

static bool
valid_tool_name(const char *s)
{
	size_t		n = strlen(s);

	if (n == 0 || n > 64)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
			  s[i] == '_' || s[i] == '-'))
			return false;
	return true;
}

static int
compile_tools(kl_grammar *g, json_t *tools, json_t *choice, kl_err *err)
{
	const char *named = NULL;
	char		path[128];
	size_t		n = json_array_size(tools);

	if (!json_is_array(tools) || n == 0 || n > JC_MAX_TOOLS)
		return kl_errc(err, KL_E_INVALID,
					   "spec: \"tools\" must be an array of 1 to %d {\"name\", \"parameters\"}", JC_MAX_TOOLS);
	g->tools = true;
	g->mode = MODE_AUTO;
	if (choice && !json_is_null(choice))
	{
		const char *c = json_is_string(choice) ? json_string_value(choice) : NULL;

		if (!c)
			return kl_errc(err, KL_E_INVALID, "tool_choice must be \"auto\", \"none\", \"required\" or a tool's name");
		if (strcmp(c, "auto") == 0)
			g->mode = MODE_AUTO;
		else if (strcmp(c, "none") == 0)
			g->mode = MODE_NONE;
		else if (strcmp(c, "required") == 0)
			g->mode = MODE_REQUIRED;
		else
		{
			g->mode = MODE_NAMED;
			named = c;
		}
	}
	g->tool_node = calloc(n, sizeof(int32_t));
	if (!g->tool_node || (g->names_root = new_lit(g, 0, err)) < 0)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	g->n_tools = (int) n;
	for (size_t i = 0; i < n; i++)
	{
		json_t	   *t = json_array_get(tools, i);
		json_t	   *name = json_object_get(t, "name"),
				   *params = json_object_get(t, "parameters");
		char		id[96];
		int32_t		node;

		if (!json_is_string(name) || !valid_tool_name(json_string_value(name)))
			return kl_errc(err, KL_E_INVALID, "tool %zu: \"name\" must be 1 to 64 letters, digits, _ or -", i + 1);
		snprintf(path, sizeof(path), "tool \"%s\" parameters", json_string_value(name));
		if (params && !json_is_null(params))
		{
			if ((node = compile_schema(g, params, 0, path, err)) < 0)
				return KL_FAIL;
		}
		else if ((node = new_node(g, err)) < 0)
			return KL_FAIL;
		else
			g->nodes[node].types = T_OBJECT;
		/* arguments are always an object */
		g->nodes[node].types &= T_OBJECT;
		if (g->nodes[node].types == 0 || g->nodes[node].enum_root >= 0)
			return kl_errc(err, KL_E_INVALID, "%s: must describe an object (\"type\": \"object\")", path);
		g->tool_node[i] = node;
		snprintf(id, sizeof(id), "functions.%s:", json_string_value(name));
		if (named && strcmp(named, json_string_value(name)) != 0)
			continue;
		if (lit_add(g, g->names_root, id, strlen(id), (int32_t) i, err) != KL_OK)
			return kl_errc(err, KL_E_INVALID, "tool \"%s\" is declared twice", json_string_value(name));
	}
	if (g->lits[g->names_root].first_child < 0)
		return kl_errc(err, KL_E_INVALID, "tool_choice names \"%s\", which is not a declared tool", named);
	return KL_OK;
}

int
kl_grammar_compile(const char *spec, size_t len, kl_grammar **out, kl_err *err)
{
	json_error_t jerr;
	json_t	   *s = json_loadb(spec, len, JSON_REJECT_DUPLICATES, &jerr);
	json_t	   *schema,
			   *tools,
			   *first;
	kl_grammar *g = NULL;

	*out = NULL;
	if (!s || !json_is_object(s))
	{
		if (s)
			json_decref(s);
		return kl_errc(err, KL_E_INVALID, "constraint spec: not a JSON object%s%s", s ? "" : ": ", s ? "" : jerr.text);
	}
	schema = json_object_get(s, "json_schema");
	tools = json_object_get(s, "tools");
	first = json_object_get(s, "first_index");
	if (!(g = grammar_alloc(err)))
		goto fail;
	if (schema && !json_is_null(schema) && (g->root = compile_schema(g, schema, 0, "json_schema", err)) < 0)
		goto fail;
	if (tools && !json_is_null(tools) && compile_tools(g, tools, json_object_get(s, "tool_choice"), err) != KL_OK)
		goto fail;
	if (g->root < 0 && !g->tools)
	{
		kl_errc(err, KL_E_INVALID, "constraint spec: give \"json_schema\" or \"tools\"");
		goto fail;
	}
	if (first && (!json_is_integer(first) || json_integer_value(first) < 0 ||
				  json_integer_value(first) > JC_MAX_INDEX))
	{
		kl_errc(err, KL_E_INVALID, "constraint spec: \"first_index\" must be an integer from 0 to %d", JC_MAX_INDEX);
		goto fail;
	}
	g->first_index = first ? (int32_t) json_integer_value(first) : 0;
	json_decref(s);
	*out = g;
	return KL_OK;
fail:
	json_decref(s);
	kl_grammar_free(g);
	return KL_FAIL;
}

/* ------------------------------------------------------------------ the automaton */

enum
{
	K_PROG,
	K_VALUE,
	K_OBJ,
	K_ARR,
	K_STR,
	K_NUM,
	K_LIT,
	K_KEY,
	K_NAME,
	K_DIGITS
};

/* K_PROG phases */
enum
{
	P_TEXT,						/* free text; the end; a tool-call section (auto) */
	P_CHOICE,					/* a JSON value or a tool-call section */
	P_SECB,						/* a tool-call section must begin */
	P_SEC,						/* a call must begin */
	P_INDEX_DONE,				/* after functions.NAME:K: the arguments begin */
	P_ARGS_DONE,				/* after the arguments: the call ends */
	P_NEXT,						/* another call or the end of the section */
	P_END_ONLY,
	P_DONE
};

/* K_OBJ / K_ARR phases */
enum
{
	O_OPEN,
	O_AFTER_KEY,
	O_AFTER_VALUE,
	O_EXPECT_KEY
};
enum
{
	A_OPEN,
	A_AFTER_ITEM,
	A_EXPECT_ITEM
};

/* K_STR phases: characters, after a backslash, the 4 hex digits of \u */
enum
{
	S_CHARS,
	S_ESC,
	S_U1,
	S_U2,
	S_U3,
	S_U4
};

/* K_NUM phases */
enum
{
	N_START,
	N_MINUS,
	N_ZERO,
	N_INT,
	N_DOT,
	N_FRAC,
	N_E,
	N_ESIGN,
	N_EXP
};

typedef struct jc_frame
{
	uint8_t		kind;
	uint8_t		phase;
	uint16_t	aux;			/* K_OBJ: the property being read; K_STR: \u value; K_NUM: integer only;
								 * K_PROG: the tool being called; K_NUM: exponent digits (high byte) */
	int32_t		node;			/* schema node; K_LIT, K_KEY, K_NAME: trie node */
	int32_t		count;			/* items, characters, bytes, calls; K_DIGITS: the number */
	uint64_t	used;			/* K_OBJ: properties present; K_STR: 1 = an object key;
								 * K_NUM: digits of the integer part */
} jc_frame;

typedef struct jc_state
{
	int16_t		depth;
	uint8_t		ws;				/* whitespace bytes in a row */
	uint8_t		ws_nl;			/* ... of which one was a line break */
	uint8_t		u8_need;		/* UTF-8 continuation bytes still due in a string */
	uint8_t		u8_lo,
				u8_hi;			/* the range of the next continuation byte */
	jc_frame	f[JC_MAX_DEPTH];
} jc_state;

static inline void
state_copy(jc_state *dst, const jc_state *src)
{
	memcpy(dst, src, offsetof(jc_state, f) + sizeof(jc_frame) * (size_t) src->depth);
}

typedef enum
{
	R_REJECT,
	R_OK,
	R_AGAIN,					/* the top frame changed: offer the symbol to it again */
	R_POP_RETRY					/* the top frame is complete: pop it, offer the symbol below */
} jc_res;

static inline bool
is_ws(int sym)
{
	return sym == ' ' || sym == '\n' || sym == '\t' || sym == '\r';
}

/*
 * Whitespace between tokens: at most JC_MAX_WS bytes in a row, with at most
 * one line break ("\n"; no "\r") — room for compact and pretty-printed JSON,
 * none for the runs of blank lines a small model drifts into.
 */
static inline jc_res
take_ws(jc_state *s, int sym)
{
	if (s->ws >= JC_MAX_WS || sym == '\r' || (sym == '\n' && s->ws_nl))
		return R_REJECT;
	if (sym == '\n')
		s->ws_nl = 1;
	s->ws++;
	return R_OK;
}

static inline bool
push(jc_state *s, uint8_t kind, int32_t node)
{
	jc_frame   *f;

	if (s->depth >= JC_MAX_DEPTH)
		return false;
	f = &s->f[s->depth++];
	memset(f, 0, sizeof(*f));
	f->kind = kind;
	f->node = node;
	return true;
}

static jc_res
on_value(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	const sc_node *n = &g->nodes[f->node];
	bool		room = s->depth < JC_MAX_DEPTH;	/* for a child frame */

	if (is_ws(sym))
		return take_ws(s, sym);
	if (sym >= 256)
		return R_REJECT;
	if (n->enum_root >= 0)
	{
		f->kind = K_LIT;
		f->node = n->enum_root;
		return R_AGAIN;
	}
	switch (sym)
	{
		case '{':
			if (!(n->types & T_OBJECT) || !room)
				return R_REJECT;
			f->kind = K_OBJ;
			f->phase = O_OPEN;
			f->used = 0;
			return R_OK;
		case '[':
			if (!(n->types & T_ARRAY) || !room)
				return R_REJECT;
			f->kind = K_ARR;
			f->phase = A_OPEN;
			f->count = 0;
			return R_OK;
		case '"':
			if (!(n->types & T_STRING))
				return R_REJECT;
			f->kind = K_STR;
			f->phase = S_CHARS;
			f->count = 0;
			f->used = 0;
			return R_OK;
		case 't':
		case 'f':
			if (!(n->types & T_BOOLEAN))
				return R_REJECT;
			f->kind = K_LIT;
			f->node = g->lit_bool;
			return R_AGAIN;
		case 'n':
			if (!(n->types & T_NULL))
				return R_REJECT;
			f->kind = K_LIT;
			f->node = g->lit_null;
			return R_AGAIN;
		default:
			if ((sym == '-' || (sym >= '0' && sym <= '9')) && (n->types & (T_NUMBER | T_INTEGER)))
			{
				f->kind = K_NUM;
				f->phase = N_START;
				f->aux = (n->types & T_NUMBER) ? 0 : 1;
				f->count = 0;
				f->used = 0;
				return R_AGAIN;
			}
			return R_REJECT;
	}
}

/* Is there a declared property not yet present? */
static inline bool
keys_left(const kl_grammar *g, const sc_node *n, const jc_frame *f)
{
	return n->key_root < 0 || (g->lits[n->key_root].below & ~f->used) != 0;
}

static jc_res
start_key(const kl_grammar *g, jc_state *s, jc_frame *f, const sc_node *n)
{
	f->phase = O_AFTER_KEY;
	if (n->key_root < 0)
	{
		push(s, K_STR, g->any);
		s->f[s->depth - 1].used = 1;	/* a key: its end leads the object on */
		return R_OK;
	}
	if (!keys_left(g, n, f))
		return R_REJECT;
	push(s, K_KEY, n->key_root);
	return R_OK;
}

static jc_res
on_object(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	const sc_node *n = &g->nodes[f->node];

	if (is_ws(sym))
		return take_ws(s, sym);
	switch (f->phase)
	{
		case O_OPEN:
			if (sym == '}' && n->required == 0)
			{
				s->depth--;
				return R_OK;
			}
			return sym == '"' ? start_key(g, s, f, n) : R_REJECT;
		case O_EXPECT_KEY:
			return sym == '"' ? start_key(g, s, f, n) : R_REJECT;
		case O_AFTER_KEY:
			if (sym != ':')
				return R_REJECT;
			f->phase = O_AFTER_VALUE;
			push(s, K_VALUE, n->key_root < 0 ? n->values : g->props[n->prop_first + f->aux]);
			return R_OK;
		case O_AFTER_VALUE:
			if (sym == ',' && keys_left(g, n, f))
			{
				f->phase = O_EXPECT_KEY;
				return R_OK;
			}
			if (sym == '}' && (n->required & ~f->used) == 0)
			{
				s->depth--;
				return R_OK;
			}
			return R_REJECT;
	}
	return R_REJECT;
}

static jc_res
on_array(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	const sc_node *n = &g->nodes[f->node];

	if (is_ws(sym))
		return take_ws(s, sym);
	if (sym >= 256)
		return R_REJECT;
	switch (f->phase)
	{
		case A_OPEN:
			if (sym == ']')
			{
				if (n->min_items > 0)
					return R_REJECT;
				s->depth--;
				return R_OK;
			}
			if (n->max_items == 0)
				return R_REJECT;
			/* FALLTHROUGH */
		case A_EXPECT_ITEM:
			f->count++;
			f->phase = A_AFTER_ITEM;
			push(s, K_VALUE, n->items);
			return R_AGAIN;
		case A_AFTER_ITEM:
			if (sym == ',' && (n->max_items < 0 || f->count < n->max_items))
			{
				f->phase = A_EXPECT_ITEM;
				return R_OK;
			}
			if (sym == ']' && f->count >= n->min_items)
			{
				s->depth--;
				return R_OK;
			}
			return R_REJECT;
	}
	return R_REJECT;
}

static inline int
hex_value(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * Inside a string, only a few numbers matter: characters so far, the escape
 * being read, the UTF-8 continuation bytes due.  This local state is what
 * on_string() and the string walk of the masks (walk_string) both step.
 */
typedef struct str_local
{
	int32_t		count;
	uint16_t	aux;			/* \u value so far */
	uint8_t		phase;
	uint8_t		need,
				lo,
				hi;
} str_local;

/* One byte of a string: 1 = taken (still inside), 2 = the closing quote, 0 = refused. */
static inline int
str_step(const sc_node *n, str_local *s, int sym)
{
	if (s->need)
	{
		if (sym < s->lo || sym > s->hi)
			return 0;
		s->need--;
		s->lo = 0x80;
		s->hi = 0xBF;
		return 1;
	}
	switch (s->phase)
	{
		case S_CHARS:
			if (sym == '"')
				return s->count >= n->min_len ? 2 : 0;
			if (sym < 0x20 || (n->max_len >= 0 && s->count >= n->max_len))
				return 0;
			if (sym == '\\')
			{
				s->phase = S_ESC;
				return 1;
			}
			if (sym >= 0x80)
			{
				/* Unicode's well-formed UTF-8: no overlongs, no surrogates, nothing past U+10FFFF */
				s->lo = 0x80;
				s->hi = 0xBF;
				if (sym >= 0xC2 && sym <= 0xDF)
					s->need = 1;
				else if (sym >= 0xE0 && sym <= 0xEF)
				{
					s->need = 2;
					if (sym == 0xE0)
						s->lo = 0xA0;
					else if (sym == 0xED)
						s->hi = 0x9F;
				}
				else if (sym >= 0xF0 && sym <= 0xF4)
				{
					s->need = 3;
					if (sym == 0xF0)
						s->lo = 0x90;
					else if (sym == 0xF4)
						s->hi = 0x8F;
				}
				else
					return 0;
			}
			s->count++;
			return 1;
		case S_ESC:
			if (sym != 0 && strchr("\"\\/bfnrt", sym))
			{
				s->phase = S_CHARS;
				s->count++;
				return 1;
			}
			if (sym == 'u')
			{
				s->phase = S_U1;
				s->aux = 0;
				return 1;
			}
			return 0;
		default:
			{
				int			v = hex_value(sym);

				if (v < 0)
					return 0;
				/* no surrogates (D800-DFFF) and no U+0000: jsonb refuses both */
				if (s->phase == S_U2 && s->aux == 0xD && v >= 8)
					return 0;
				if (s->phase == S_U4 && s->aux == 0 && v == 0)
					return 0;
				s->aux = (uint16_t) (s->aux * 16 + v);
				if (s->phase == S_U4)
				{
					s->phase = S_CHARS;
					s->count++;
				}
				else
					s->phase++;
				return 1;
			}
	}
}

static jc_res
on_string(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	str_local	l = {f->count, f->aux, f->phase, s->u8_need, s->u8_lo, s->u8_hi};
	int			r = sym < 256 ? str_step(&g->nodes[f->node], &l, sym) : 0;

	if (r == 0)
		return R_REJECT;
	if (r == 2)
	{
		s->depth--;
		return R_OK;
	}
	f->count = l.count;
	f->aux = l.aux;
	f->phase = l.phase;
	s->u8_need = l.need;
	s->u8_lo = l.lo;
	s->u8_hi = l.hi;
	return R_OK;
}

static jc_res
on_number(jc_state *s, jc_frame *f, int sym)
{
	bool		int_only = (f->aux & 0xFF) != 0;
	int			exp_digits = f->aux >> 8;
	bool		digit = sym >= '0' && sym <= '9';
	int			next = -1;
	bool		accepting = f->phase == N_ZERO || f->phase == N_INT || f->phase == N_FRAC || f->phase == N_EXP;

	(void) s;
	switch (f->phase)
	{
		case N_START:
			next = sym == '-' ? N_MINUS : sym == '0' ? N_ZERO : digit ? N_INT : -1;
			break;
		case N_MINUS:
			next = sym == '0' ? N_ZERO : digit ? N_INT : -1;
			break;
		case N_ZERO:
		case N_INT:
			if (digit && f->phase == N_INT)
				next = N_INT;
			else if (sym == '.' && !int_only)
				next = N_DOT;
			else if ((sym == 'e' || sym == 'E') && !int_only)
				next = N_E;
			break;
		case N_DOT:
		case N_FRAC:
			if (digit)
				next = N_FRAC;
			else if ((sym == 'e' || sym == 'E') && f->phase == N_FRAC)
				next = N_E;
			break;
		case N_E:
			next = (sym == '+' || sym == '-') ? N_ESIGN : digit ? N_EXP : -1;
			break;
		case N_ESIGN:
		case N_EXP:
			next = digit && exp_digits < JC_MAX_EXP_DIGITS ? N_EXP : -1;
			break;
	}
	/* integer parts of at most 18 digits: every integer fits in 64 bits */
	if (next == N_INT && f->used >= JC_MAX_INT_DIGITS)
		next = -1;
	if (next >= 0)
	{
		bool		next_accepting = next == N_ZERO || next == N_INT || next == N_FRAC || next == N_EXP;

		/* leave room to finish: a state that needs another byte needs space for it */
		if (f->count + (next_accepting ? 1 : 2) > JC_MAX_NUM)
			next = -1;
	}
	if (next < 0)
		return accepting ? R_POP_RETRY : R_REJECT;
	if (next == N_EXP)
		f->aux = (uint16_t) ((f->aux & 0xFF) | ((exp_digits + 1) << 8));
	if (next == N_INT || next == N_ZERO)
		f->used++;
	f->phase = (uint8_t) next;
	f->count++;
	return R_OK;
}

/* The child of trie node `node` for byte b (and, for keys, a property not yet used). */
static inline int32_t
lit_child(const kl_grammar *g, int32_t node, int sym, uint64_t exclude)
{
	for (int32_t c = g->lits[node].first_child; c >= 0; c = g->lits[c].next_sibling)
		if (g->lits[c].byte == sym)
			return (g->lits[c].below & ~exclude) || !exclude ? c : -1;
	return -1;
}

static jc_res
on_literal(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	int32_t		c = sym < 256 ? lit_child(g, f->node, sym, 0) : -1;

	if (c < 0)
		return g->lits[f->node].term >= 0 ? R_POP_RETRY : R_REJECT;
	if (g->lits[c].term >= 0 && g->lits[c].first_child < 0)
		s->depth--;				/* complete, and nothing can follow within it */
	else
		f->node = c;
	return R_OK;
}

static jc_res
on_key(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	jc_frame   *obj = f - 1;
	int32_t		c = sym < 256 ? lit_child(g, f->node, sym, obj->used) : -1;

	if (c < 0)
		return R_REJECT;
	if (g->lits[c].term >= 0)
	{
		/* the closing quote: this property is now present */
		obj->aux = (uint16_t) g->lits[c].term;
		obj->used |= 1ull << g->lits[c].term;
		s->depth--;
		return R_OK;
	}
	f->node = c;
	return R_OK;
}

static jc_res
on_name(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	jc_frame   *prog = &s->f[0];
	int32_t		c = sym < 256 ? lit_child(g, f->node, sym, 0) : -1;

	(void) s;
	if (c < 0)
		return R_REJECT;
	if (g->lits[c].term < 0)
	{
		f->node = c;
		return R_OK;
	}
	/* "functions.NAME:" written: the call's number follows */
	prog->aux = (uint16_t) g->lits[c].term;
	prog->phase = P_INDEX_DONE;
	f->kind = K_DIGITS;
	f->phase = 0;
	f->count = g->first_index + prog->count;
	return R_OK;
}

static jc_res
on_digits(jc_state *s, jc_frame *f, int sym)
{
	char		d[16];
	int			n = snprintf(d, sizeof(d), "%d", f->count);

	if (sym != d[f->phase])
		return R_REJECT;
	if (++f->phase == n)
		s->depth--;
	return R_OK;
}

static jc_res
on_program(const kl_grammar *g, jc_state *s, jc_frame *f, int sym)
{
	switch (f->phase)
	{
		case P_TEXT:
			if (sym < 256 || sym == SYM_OTHER)
				return R_OK;
			if (sym == SYM_END)
			{
				f->phase = P_DONE;
				return R_OK;
			}
			if (sym == SYM_SECTION_BEGIN && g->mode == MODE_AUTO)
			{
				f->phase = P_SEC;
				return R_OK;
			}
			return R_REJECT;
		case P_CHOICE:
			if (sym == SYM_SECTION_BEGIN)
			{
				f->phase = P_SEC;
				return R_OK;
			}
			if (sym >= 256)
				return R_REJECT;
			f->phase = P_END_ONLY;
			push(s, K_VALUE, g->root);
			return R_AGAIN;
		case P_SECB:
			if (sym != SYM_SECTION_BEGIN)
				return R_REJECT;
			f->phase = P_SEC;
			return R_OK;
		case P_SEC:
			if (sym != SYM_CALL_BEGIN)
				return R_REJECT;
			push(s, K_NAME, g->names_root);
			return R_OK;
		case P_INDEX_DONE:
			if (sym != SYM_ARG_BEGIN)
				return R_REJECT;
			f->phase = P_ARGS_DONE;
			push(s, K_VALUE, g->tool_node[f->aux]);
			return R_OK;
		case P_ARGS_DONE:
			if (sym != SYM_CALL_END)
				return R_REJECT;
			f->count++;
			f->phase = P_NEXT;
			return R_OK;
		case P_NEXT:
			if (sym == SYM_CALL_BEGIN && g->mode != MODE_NAMED && f->count < JC_MAX_CALLS)
			{
				push(s, K_NAME, g->names_root);
				return R_OK;
			}
			if (sym == SYM_SECTION_END)
			{
				f->phase = P_END_ONLY;
				return R_OK;
			}
			return R_REJECT;
		case P_END_ONLY:
			if (sym != SYM_END)
				return R_REJECT;
			f->phase = P_DONE;
			return R_OK;
	}
	return R_REJECT;
}

/* Offer one symbol; false if not allowed (s is then garbage: step a copy). */
static bool
step(const kl_grammar *g, jc_state *s, int sym)
{
	for (;;)
	{
		jc_frame   *f = &s->f[s->depth - 1];
		jc_res		r;

		switch (f->kind)
		{
			case K_PROG:
				r = on_program(g, s, f, sym);
				break;
			case K_VALUE:
				r = on_value(g, s, f, sym);
				break;
			case K_OBJ:
				r = on_object(g, s, f, sym);
				break;
			case K_ARR:
				r = on_array(g, s, f, sym);
				break;
			case K_STR:
				r = on_string(g, s, f, sym);
				break;
			case K_NUM:
				r = on_number(s, f, sym);
				break;
			case K_LIT:
				r = on_literal(g, s, f, sym);
				break;
			case K_KEY:
				r = on_key(g, s, f, sym);
				break;
			case K_NAME:
				r = on_name(g, s, f, sym);
				break;
			case K_DIGITS:
				r = on_digits(s, f, sym);
				break;
			default:
				return false;
		}
		if (r == R_OK)
		{
			if (!is_ws(sym))
				s->ws = s->ws_nl = 0;
			return true;
		}
		if (r == R_REJECT)
			return false;
		if (r == R_POP_RETRY)
		{
			s->depth--;
			if (s->depth == 0)
				return false;
		}
	}
}

static void
state_init(const kl_grammar *g, jc_state *s)
{
	memset(s, 0, offsetof(jc_state, f));
	s->depth = 0;
	push(s, K_PROG, -1);
	if (!g->tools || g->mode == MODE_NONE)
	{
		if (g->root >= 0)
		{
			s->f[0].phase = P_END_ONLY;
			push(s, K_VALUE, g->root);
		}
		else
			s->f[0].phase = P_TEXT;
	}
	else if (g->mode == MODE_AUTO)
		s->f[0].phase = g->root >= 0 ? P_CHOICE : P_TEXT;
	else
		s->f[0].phase = P_SECB;
}

/* ------------------------------------------------------------------ constraints and masks */

struct kl_constraint
{
	const kl_grammar *g;
	const kl_vocab *v;
	int32_t    *end_ids;
	int			n_end;
	jc_state	cur;
	bool		fast;
	/* the walk's stacks: one state and one child range per trie depth */
	jc_state   *st;
	int32_t    *it,
			   *stop;
	/* the string walk's: a local string state and a child range per depth */
	str_local  *sst;
	int32_t    *sit,
			   *sstop;
};

static int
vsym_symbol(uint8_t vs)
{
	switch (vs)
	{
		case KL_VSYM_SECTION_BEGIN:
			return SYM_SECTION_BEGIN;
		case KL_VSYM_SECTION_END:
			return SYM_SECTION_END;
		case KL_VSYM_CALL_BEGIN:
			return SYM_CALL_BEGIN;
		case KL_VSYM_ARG_BEGIN:
			return SYM_ARG_BEGIN;
		case KL_VSYM_CALL_END:
			return SYM_CALL_END;
		case KL_VSYM_OTHER:
			return SYM_OTHER;
		default:
			return -1;
	}
}

int
kl_constraint_new(const kl_grammar *g, const kl_vocab *v, const int32_t *end_ids, int n_end,
				  kl_constraint **out, kl_err *err)
{
	kl_constraint *c;
	int			depth = (v->all.max_depth > v->unsafe.max_depth ? v->all.max_depth : v->unsafe.max_depth) + 2;

	*out = NULL;
	if (n_end <= 0)
		return kl_errc(err, KL_E_INVALID, "constrained output needs an end token (do not combine it with ignore_eos)");
	if (kl_grammar_has_tools(g))
		for (int k = KL_VSYM_TOOL_FIRST; k <= KL_VSYM_TOOL_LAST; k++)
			if (v->tool_ids[k] < 0)
				return kl_errc(err, KL_E_INVALID,
							   "this model's tokenizer has no %s token, so it cannot make tool calls in the "
							   "Kimi format (its tokenizer_config.json must declare the tool tokens)",
							   v->tool_text[k]);
	for (int i = 0; i < n_end; i++)
		if (end_ids[i] < 0 || end_ids[i] >= v->n_ids)
			return kl_errc(err, KL_E_INVALID, "end token %d is outside the vocabulary", end_ids[i]);
	c = kl_calloc(1, sizeof(kl_constraint), err);
	if (!c)
		return KL_FAIL;
	c->g = g;
	c->v = v;
	c->fast = true;
	c->end_ids = malloc(sizeof(int32_t) * (size_t) n_end);
	c->st = malloc(sizeof(jc_state) * (size_t) depth);
	c->it = malloc(sizeof(int32_t) * (size_t) depth);
	c->stop = malloc(sizeof(int32_t) * (size_t) depth);
	c->sst = malloc(sizeof(str_local) * (size_t) depth);
	c->sit = malloc(sizeof(int32_t) * (size_t) depth);
	c->sstop = malloc(sizeof(int32_t) * (size_t) depth);
	if (!c->end_ids || !c->st || !c->it || !c->stop || !c->sst || !c->sit || !c->sstop)
	{
		kl_constraint_free(c);
		return kl_errc(err, KL_E_RESOURCES, "out of memory for a constraint");
	}
	memcpy(c->end_ids, end_ids, sizeof(int32_t) * (size_t) n_end);
	c->n_end = n_end;
	state_init(g, &c->cur);
	*out = c;
	return KL_OK;
}

void
kl_constraint_free(kl_constraint *c)
{
	if (!c)
		return;
	free(c->end_ids);
	free(c->st);
	free(c->it);
	free(c->stop);
	free(c->sst);
	free(c->sit);
	free(c->sstop);
	free(c);
}

int
kl_constraint_n_ids(const kl_constraint *c)
{
	return c->v->n_ids;
}

void
kl_constraint_use_fast_paths(kl_constraint *c, bool on)
{
	c->fast = on;
}

const char *
kl_constraint_state_kind(const kl_constraint *c)
{
	const jc_frame *f = &c->cur.f[c->cur.depth - 1];

	switch (f->kind)
	{
		case K_PROG:
			return f->phase == P_TEXT ? "text" : f->phase == P_END_ONLY || f->phase == P_DONE ? "end" : "structure";
		case K_STR:
			if (f->phase != S_CHARS || c->cur.u8_need)
				return "string, mid-escape or character";
			return f->used ? "key" : "string";
		case K_KEY:
		case K_NAME:
			return "key";
		case K_NUM:
		case K_DIGITS:
			return "number";
		case K_LIT:
			return "literal";
		default:
			return "structure";
	}
}

bool
kl_constraint_done(const kl_constraint *c)
{
	return c->cur.depth == 1 && c->cur.f[0].kind == K_PROG && c->cur.f[0].phase == P_DONE;
}

static bool
is_end(const kl_constraint *c, int32_t id)
{
	for (int i = 0; i < c->n_end; i++)
		if (c->end_ids[i] == id)
			return true;
	return false;
}

/* Every token below trie node `node` of t whose bytes the automaton takes from state `from`. */
static void
walk_from(kl_constraint *c, const kl_byte_trie *t, uint32_t *mask, const jc_state *from, int32_t node)
{
	jc_state   *st = c->st;
	int32_t    *it = c->it,
			   *stop = c->stop;
	int			d = 0;

	if (t->n_nodes == 0)
		return;
	state_copy(&st[0], from);
	it[0] = t->first[node];
	stop[0] = t->first[node] + t->count[node];
	while (d >= 0)
	{
		int32_t		n;

		if (it[d] == stop[d])
		{
			d--;
			continue;
		}
		n = it[d]++;
		state_copy(&st[d + 1], &st[d]);
		if (!step(c->g, &st[d + 1], t->byte[n]))
			continue;
		if (t->token[n] >= 0 && t->token[n] < c->v->n_ids)
			kl_mask_set(mask, t->token[n]);
		if (t->count[n] > 0)
		{
			d++;
			it[d] = t->first[n];
			stop[d] = t->first[n] + t->count[n];
		}
	}
}

/*
 * The same from a state inside a string: bytes that stay inside it only
 * change the string's few numbers, so they are stepped on those alone; where
 * the closing quote comes, the rest of that subtree is walked from the full
 * state after the string.
 */
static void
walk_string(kl_constraint *c, const kl_byte_trie *t, uint32_t *mask)
{
	const jc_frame *top = &c->cur.f[c->cur.depth - 1];
	const sc_node *n = &c->g->nodes[top->node];
	str_local  *sl = c->sst;
	int32_t    *it = c->sit,
			   *stop = c->sstop;
	int			d = 0;
	jc_state	after;

	if (t->n_nodes == 0)
		return;
	/* the state once the string has closed */
	state_copy(&after, &c->cur);
	after.depth--;
	after.ws = after.ws_nl = 0;
	sl[0] = (str_local) {top->count, top->aux, top->phase, c->cur.u8_need, c->cur.u8_lo, c->cur.u8_hi};
	it[0] = t->first[0];
	stop[0] = t->first[0] + t->count[0];
	while (d >= 0)
	{
		int32_t		nn;
		int			r;

		if (it[d] == stop[d])
		{
			d--;
			continue;
		}
		nn = it[d]++;
		sl[d + 1] = sl[d];
		r = str_step(n, &sl[d + 1], t->byte[nn]);
		if (r == 0)
			continue;
		if (t->token[nn] >= 0 && t->token[nn] < c->v->n_ids)
			kl_mask_set(mask, t->token[nn]);
		if (r == 2)
		{
			if (t->count[nn] > 0)
				walk_from(c, t, mask, &after, nn);
			continue;
		}
		if (t->count[nn] > 0)
		{
			d++;
			it[d] = t->first[nn];
			stop[d] = t->first[nn] + t->count[nn];
		}
	}
}

int
kl_constraint_mask(kl_constraint *c, uint32_t *mask, int *n_allowed, kl_err *err)
{
	const kl_vocab *v = c->v;
	size_t		words = kl_mask_words(v->n_ids);
	const jc_frame *top = &c->cur.f[c->cur.depth - 1];
	jc_state	tmp;
	int			count = 0;

	memset(mask, 0, words * sizeof(uint32_t));
	if (top->kind == K_PROG && top->phase == P_TEXT)
	{
		/* free text: every ordinary token and the other specials */
		memcpy(mask, v->text_mask, words * sizeof(uint32_t));
	}
	else if (c->fast && top->kind == K_STR && top->phase == S_CHARS && c->cur.u8_need == 0)
	{
		/* inside a string: whole-character tokens without quotes or escapes all stay inside it */
		const sc_node *n = &c->g->nodes[top->node];

		int32_t		room = n->max_len < 0 ? INT32_MAX : n->max_len - top->count;

		if (room >= v->max_safe_chars)
			memcpy(mask, v->string_safe, words * sizeof(uint32_t));
		else if (room < KL_SAFE_BUCKETS)
			memcpy(mask, v->safe_upto + (size_t) room * words, words * sizeof(uint32_t));
		else
			for (int id = 0; id < v->n_ids; id++)
				if (v->safe_chars[id] >= 0 && v->safe_chars[id] <= room)
					kl_mask_set(mask, id);
		walk_string(c, &v->unsafe, mask);
	}
	else if (c->fast && top->kind == K_STR)
		walk_string(c, &v->all, mask);	/* inside an escape or a character */
	else
		walk_from(c, &v->all, mask, &c->cur, 0);

	/* special tokens: the tool tokens (text states have taken the others above) */
	for (int k = KL_VSYM_TOOL_FIRST; k <= KL_VSYM_TOOL_LAST; k++)
	{
		int32_t		id = v->tool_ids[k];

		if (id < 0 || is_end(c, id))
			continue;
		state_copy(&tmp, &c->cur);
		if (step(c->g, &tmp, vsym_symbol((uint8_t) k)))
			kl_mask_set(mask, id);
	}
	for (int i = 0; i < c->n_end; i++)
	{
		state_copy(&tmp, &c->cur);
		if (step(c->g, &tmp, SYM_END))
			kl_mask_set(mask, c->end_ids[i]);
		else
			mask[c->end_ids[i] >> 5] &= ~(1u << (c->end_ids[i] & 31));
	}
	for (size_t w = 0; w < words; w++)
		count += __builtin_popcount(mask[w]);
	if (n_allowed)
		*n_allowed = count;
	if (count == 0)
		return kl_errc(err, KL_E_INVALID,
					   "the output constraint allows no token here (the vocabulary cannot continue it)");
	return KL_OK;
}

int
kl_constraint_accept(kl_constraint *c, int32_t id, kl_err *err)
{
	jc_state	tmp;
	bool		ok = true;

	if (id < 0 || id >= c->v->n_ids)
		return kl_errc(err, KL_E_INVALID, "token %d is outside the vocabulary", id);
	state_copy(&tmp, &c->cur);
	if (is_end(c, id))
		ok = step(c->g, &tmp, SYM_END);
	else if (c->v->sym[id] == KL_VSYM_BYTES)
	{
		for (uint32_t i = c->v->off[id]; i < c->v->off[id + 1] && ok; i++)
			ok = step(c->g, &tmp, c->v->pool[i]);
	}
	else
	{
		int			sym = vsym_symbol(c->v->sym[id]);

		ok = sym >= 0 && step(c->g, &tmp, sym);
	}
	if (!ok)
		return kl_errc(err, KL_E_INVALID, "token %d is not allowed by the output constraint here", id);
	state_copy(&c->cur, &tmp);
	return KL_OK;
}

bool
kl_constraint_feed(kl_constraint *c, const char *bytes, size_t n)
{
	jc_state	tmp;

	state_copy(&tmp, &c->cur);
	for (size_t i = 0; i < n; i++)
		if (!step(c->g, &tmp, (uint8_t) bytes[i]))
			return false;
	state_copy(&c->cur, &tmp);
	return true;
}

bool
kl_constraint_feed_end(kl_constraint *c)
{
	jc_state	tmp;

	state_copy(&tmp, &c->cur);
	if (!step(c->g, &tmp, SYM_END))
		return false;
	state_copy(&c->cur, &tmp);
	return true;
}
