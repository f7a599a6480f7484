/*
 * tokenizer.c — tiktoken-style byte-level BPE (see tokenizer.h).
 *
 * Encoding a text:
 *   1. check that it is valid UTF-8;
 *   2. (allow_special) cut it at special-token texts, found with a byte trie
 *      (longest match), which become their ids;
 *   3. cut each stretch between them into pieces with the pre-tokenizer
 *      (tokenizer_split.c);
 *   4. turn each piece into tokens by byte-pair merging (bpe.c).
 * Decoding concatenates the tokens' bytes; the streaming decoder holds back
 * an incomplete UTF-8 character until the token that completes it arrives.
 * (The chat format built on these ids is chat.c.)
 *
 * Special tokens: every entry of added_tokens_decoder is one, whatever its
 * "special" flag says (as in the reference's tokenizer, which makes all
 * reserved ids specials).  Ids between the ordinary tokens and the largest
 * added id that the file leaves out get the reference's placeholder text
 * <|reserved_token_ID|>, so that every id below n_vocab decodes.
 */
#include "tokenizer_internal.h"

#include "kl_file.h"
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SPECIALS 65536		/* ids n_base .. n_base + MAX_SPECIALS - 1 */

/* ------------------------------------------------------------------ small helpers */

int
kl_ids_push(kl_ids *v, int32_t id, kl_err *err)
{
	if (v->n == v->cap)
	{
		size_t		cap = v->cap ? v->cap * 2 : 64;
		int32_t    *p = realloc(v->ids, cap * sizeof(int32_t));

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory for %zu token ids", cap);
		v->ids = p;
		v->cap = cap;
	}
	v->ids[v->n++] = id;
	return KL_OK;
}

void
kl_ids_free(kl_ids *v)
{
	free(v->ids);
	v->ids = NULL;
	v->n = v->cap = 0;
}

/*
 * The length of the valid start of a UTF-8 character at p[0..n): how many of
 * its bytes are well-formed so far (0 if p[0] cannot start a character), and
 * in *need the length the character must have.  The ranges are those of
 * Unicode's table of well-formed byte sequences: no overlongs, no
 * surrogates, nothing above U+10FFFF.
 */
static inline int
utf8_valid_prefix(const uint8_t *p, size_t n, int *need)
{
	uint8_t		c = p[0];
	uint8_t		lo = 0x80,
				hi = 0xBF;
	int			k;

	if (c < 0x80)
	{
		*need = 1;
		return 1;
	}
	if (c >= 0xC2 && c <= 0xDF)
		*need = 2;
	else if (c >= 0xE0 && c <= 0xEF)
	{
		*need = 3;
		if (c == 0xE0)
			lo = 0xA0;
		else if (c == 0xED)
			hi = 0x9F;
	}
	else if (c >= 0xF0 && c <= 0xF4)
	{
		*need = 4;
		if (c == 0xF0)
			lo = 0x90;
		else if (c == 0xF4)
			hi = 0x8F;
	}
	else
	{
		*need = 0;
		return 0;
	}
	for (k = 1; k < *need && (size_t) k < n; k++)
	{
		if (p[k] < lo || p[k] > hi)
			break;
		lo = 0x80;
		hi = 0xBF;
	}
	return k;
}

bool
kl_utf8_valid(const char *s, size_t len, size_t *bad_offset)
{
	const uint8_t *p = (const uint8_t *) s;
	size_t		i = 0;

	while (i < len)
	{
		int			need,
					have;

		/* ASCII eight bytes at a time */
		if (i + 8 <= len)
		{
			uint64_t	w;

			memcpy(&w, p + i, 8);
			if ((w & 0x8080808080808080ull) == 0)
			{
				i += 8;
				continue;
			}
		}
		if (p[i] < 0x80)
		{
			i++;
			continue;
		}
		have = utf8_valid_prefix(p + i, len - i, &need);
		if (need == 0 || have < need)
		{
			if (bad_offset)
				*bad_offset = i;
			return false;
		}
		i += (size_t) need;
	}
	return true;
}

/* Append n bytes to a growing NUL-terminated buffer. */
static int
buf_append(char **buf, size_t *len, size_t *cap, const void *p, size_t n, kl_err *err)
{
	if (*buf == NULL || *len + n + 1 > *cap)
	{
		size_t		c = *cap ? *cap : 64;
		char	   *nb;

		while (c < *len + n + 1)
			c *= 2;
		nb = realloc(*buf, c);
		if (!nb)
			return kl_errc(err, KL_E_RESOURCES, "out of memory for %zu bytes of text", c);
		*buf = nb;
		*cap = c;
	}
	if (n > 0)
		memcpy(*buf + *len, p, n);
	*len += n;
	(*buf)[*len] = 0;
	return KL_OK;
}

/* ------------------------------------------------------------------ special tokens */

static int
trie_add_node(kl_tokenizer *t, int *cap, uint8_t byte, kl_err *err)
{
	if (t->n_trie == *cap)
	{
		int			nc = *cap ? *cap * 2 : 256;
		kl_trie_node *p = realloc(t->trie, (size_t) nc * sizeof(kl_trie_node));

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		t->trie = p;
		*cap = nc;
	}
	t->trie[t->n_trie] = (kl_trie_node) {-1, -1, -1, byte};
	return t->n_trie++;
}

static int
build_trie(kl_tokenizer *t, kl_err *err)
{
	int			cap = 0;

	if (trie_add_node(t, &cap, 0, err) < 0)
		return KL_FAIL;
	for (int k = 0; k < t->n_specials; k++)
	{
		const uint8_t *txt = (const uint8_t *) t->specials[k].text;
		int32_t		node = 0;

		for (size_t i = 0; i < t->specials[k].len; i++)
		{
			int32_t		c;

			for (c = t->trie[node].child; c >= 0 && t->trie[c].byte != txt[i]; c = t->trie[c].sibling)
				;
			if (c < 0)
			{
				c = trie_add_node(t, &cap, txt[i], err);
				if (c < 0)
					return KL_FAIL;
				t->trie[c].sibling = t->trie[node].child;
				t->trie[node].child = c;
			}
			node = c;
		}
		t->trie[node].special = k;
		t->special_first_byte[txt[0]] = true;
	}
	return KL_OK;
}

/* The longest special token text at s[i..len): its index, or -1. */
static inline int
special_at(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t i)
{
	int32_t		node = 0;
	int			found = -1;

	for (; i < len; i++)
	{
		int32_t		c;

		for (c = t->trie[node].child; c >= 0 && t->trie[c].byte != s[i]; c = t->trie[c].sibling)
			;
		if (c < 0)
			break;
		node = c;
		if (t->trie[node].special >= 0)
			found = t->trie[node].special;
	}
	return found;
}

int32_t
kl_tokenizer_special_id(const kl_tokenizer *t, const char *text)
{
	size_t		len = strlen(text);
	int			k;

	if (len == 0)
		return -1;
	k = special_at(t, (const uint8_t *) text, len, 0);
	return (k >= 0 && t->specials[k].len == len) ? t->specials[k].id : -1;
}

const char *
kl_tokenizer_special_text(const kl_tokenizer *t, int32_t id)
{
	if (id < t->n_base || id >= t->n_vocab)
		return NULL;
	return t->special_text[id - t->n_base];
}

/* ------------------------------------------------------------------ tokenizer_config.json */

/* "bos_token": "[BOS]", or {"content": "[BOS]", ...} as transformers writes AddedToken */
static const char *
token_text(json_t *v)
{
	if (json_is_string(v))
		return json_string_value(v);
	if (json_is_object(v) && json_is_string(json_object_get(v, "content")))
		return json_string_value(json_object_get(v, "content"));
	return NULL;
}

static int
named_token(kl_tokenizer *t, json_t *root, const char *path, const char *key, int32_t *id, kl_err *err)
{
	json_t	   *v = json_object_get(root, key);
	const char *text;

	*id = -1;
	if (!v || json_is_null(v))
		return KL_OK;
	text = token_text(v);
	if (!text)
		return kl_errc(err, KL_E_INVALID, "%s: \"%s\" must be a token's text (or {\"content\": text})", path, key);
	*id = kl_tokenizer_special_id(t, text);
	if (*id < 0)
		return kl_errc(err, KL_E_INVALID,
					   "%s: the text of %s is not one of the tokens of added_tokens_decoder; add it there or "
					   "fix the name", path, key);
	return KL_OK;
}

static int
compare_special_id(const void *a, const void *b)
{
	const kl_special *x = a,
			   *y = b;

	return (x->id > y->id) - (x->id < y->id);
}

static int
add_special(kl_tokenizer *t, int *cap, const char *text, int32_t id, kl_err *err)
{
	if (t->n_specials == *cap)
	{
		int			nc = *cap ? *cap * 2 : 64;
		kl_special *p = realloc(t->specials, (size_t) nc * sizeof(kl_special));

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		t->specials = p;
		*cap = nc;
	}
	t->specials[t->n_specials].text = strdup(text);
	if (!t->specials[t->n_specials].text)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	t->specials[t->n_specials].len = strlen(text);
	t->specials[t->n_specials].id = id;
	t->n_specials++;
	return KL_OK;
}

static int
load_config(kl_tokenizer *t, const char *confine, const char *path, kl_err *err)
{
	json_t	   *root = kl_json_parse_file(confine, path, 64 << 20, err);
	json_t	   *added;
	const char *key;
	json_t	   *val;
	int			rc = KL_FAIL;
	int			cap = 0;
	int32_t		max_id = t->n_base - 1;

	if (!root)
		return KL_FAIL;
	if (!json_is_object(root))
	{
		kl_errc(err, KL_E_INVALID, "%s: expected a JSON object at the top", path);
		goto out;
	}
	added = json_object_get(root, "added_tokens_decoder");
	if (added && !json_is_object(added))
	{
		kl_errc(err, KL_E_INVALID,
				"%s: added_tokens_decoder must be an object mapping ids to {\"content\": text}", path);
		goto out;
	}
	json_object_foreach(added, key, val)
	{
		char	   *endp;
		long		id;
		const char *content = token_text(val);
		json_t	   *special = json_is_object(val) ? json_object_get(val, "special") : NULL;

		id = (*key >= '0' && *key <= '9') ? strtol(key, &endp, 10) : -1;
		if (id < 0 || *endp != 0 || id < t->n_base || id >= (long) t->n_base + MAX_SPECIALS)
		{
			kl_errc(err, KL_E_INVALID,
					"%s: every id of added_tokens_decoder must be a number from %d to %d: special tokens "
					"come after the %d ordinary tokens of tiktoken.model", path, t->n_base,
					t->n_base + MAX_SPECIALS - 1, t->n_base);
			goto out;
		}
		if (!content || !*content)
		{
			kl_errc(err, KL_E_INVALID, "%s: added token %ld has no \"content\" text", path, id);
			goto out;
		}
		if (special && !json_is_boolean(special))
		{
			kl_errc(err, KL_E_INVALID, "%s: added token %ld: \"special\" must be true or false", path, id);
			goto out;
		}
		if (add_special(t, &cap, content, (int32_t) id, err) != KL_OK)
			goto out;
		max_id = id > max_id ? (int32_t) id : max_id;
	}
	t->n_vocab = max_id + 1;
	t->special_text = kl_calloc((size_t) (t->n_vocab - t->n_base) + 1, sizeof(char *), err);
	if (!t->special_text)
		goto out;
	if (t->n_specials > 0)	/* qsort's base must not be NULL, even for zero items */
		qsort(t->specials, (size_t) t->n_specials, sizeof(kl_special), compare_special_id);
	for (int k = 0; k < t->n_specials; k++)
	{
		if (k > 0 && t->specials[k].id == t->specials[k - 1].id)
		{
			kl_errc(err, KL_E_INVALID, "%s: added token %d is given twice", path, t->specials[k].id);
			goto out;
		}
		t->special_text[t->specials[k].id - t->n_base] = t->specials[k].text;
	}
	if (build_trie(t, err) != KL_OK)
		goto out;
	for (int k = 0; k < t->n_specials; k++)
		if (kl_tokenizer_special_id(t, t->specials[k].text) != t->specials[k].id)
		{
			kl_errc(err, KL_E_INVALID, "%s: added tokens %d and %d have the same text", path,
					kl_tokenizer_special_id(t, t->specials[k].text), t->specials[k].id);
			goto out;
		}
	/* placeholders for ids that the file leaves out */
	{
		bool		added_placeholder = false;

		for (int32_t id = t->n_base; id < t->n_vocab; id++)
		{
			char		name[64];

			if (t->special_text[id - t->n_base])
				continue;
			snprintf(name, sizeof(name), "<|reserved_token_%d|>", id);
			if (kl_tokenizer_special_id(t, name) >= 0)
				continue;		/* the name is taken: the id stays undecodable */
			if (add_special(t, &cap, name, id, err) != KL_OK)
				goto out;
			added_placeholder = true;
		}
		if (added_placeholder)
		{
			qsort(t->specials, (size_t) t->n_specials, sizeof(kl_special), compare_special_id);
			for (int k = 0; k < t->n_specials; k++)
				t->special_text[t->specials[k].id - t->n_base] = t->specials[k].text;
			free(t->trie);
			t->trie = NULL;
			t->n_trie = 0;
			if (build_trie(t, err) != KL_OK)
				goto out;
		}
	}
	if (named_token(t, root, path, "bos_token", &t->bos, err) != KL_OK ||
		named_token(t, root, path, "eos_token", &t->eos, err) != KL_OK ||
		named_token(t, root, path, "pad_token", &t->pad, err) != KL_OK ||
		named_token(t, root, path, "unk_token", &t->unk, err) != KL_OK)
		goto out;
	t->eos_alt = kl_tokenizer_special_id(t, "[EOS]");
	{
		json_t	   *tmpl = json_object_get(root, "chat_template");

		if (json_is_string(tmpl) && !(t->chat_template = strdup(json_string_value(tmpl))))
		{
			kl_errc(err, KL_E_RESOURCES, "out of memory");
			goto out;
		}
	}
	rc = KL_OK;
out:
	json_decref(root);
	return rc;
}

/* ------------------------------------------------------------------ loading */

int
kl_tokenizer_load(const char *dir, kl_tokenizer **out, kl_err *err)
{
	return kl_tokenizer_load_under(dir, NULL, out, err);
}

int
kl_tokenizer_load_under(const char *dir, const char *root, kl_tokenizer **out, kl_err *err)
{
	kl_tokenizer *t;
	char		path[4096];

	*out = NULL;
	if (!dir || !*dir)
		return kl_errc(err, KL_E_INVALID, "tokenizer: no model directory given");
	t = kl_calloc(1, sizeof(kl_tokenizer), err);
	if (!t)
		return KL_FAIL;
	t->bos = t->eos = t->pad = t->unk = t->eos_alt = -1;
	if ((size_t) snprintf(path, sizeof(path), "%s/tiktoken.model", dir) >= sizeof(path))
	{
		kl_errc(err, KL_E_INVALID, "the model directory name is too long");
		goto fail;
	}
	if (kl_tok_build_tables(t, root, path, err) != KL_OK)
		goto fail;
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	if (load_config(t, root, path, err) != KL_OK)
		goto fail;
	if (kl_tok_split_init(t, err) != KL_OK)
		goto fail;
	*out = t;
	return KL_OK;
fail:
	kl_err_prefix(err, "tokenizer");
	kl_tokenizer_free(t);
	return KL_FAIL;
}

void
kl_tokenizer_free(kl_tokenizer *t)
{
	if (!t)
		return;
	for (int i = 0; i < t->n_specials; i++)
		free(t->specials[i].text);
	free(t->specials);
	free(t->special_text);
	free(t->trie);
	free(t->pool);
	free(t->off);
	free(t->rank_slots);
	free(t->pair_keys);
	free(t->pair_ranks);
	free(t->chat_template);
	kl_tok_split_free(t);
	free(t);
}

int
kl_tokenizer_n_vocab(const kl_tokenizer *t)
{
	return t->n_vocab;
}

int
kl_tokenizer_n_base(const kl_tokenizer *t)
{
	return t->n_base;
}

int32_t
kl_tokenizer_bos(const kl_tokenizer *t)
{
	return t->bos;
}

int32_t
kl_tokenizer_eos(const kl_tokenizer *t)
{
	return t->eos;
}

int32_t
kl_tokenizer_pad(const kl_tokenizer *t)
{
	return t->pad;
}

int32_t
kl_tokenizer_unk(const kl_tokenizer *t)
{
	return t->unk;
}

int
kl_tokenizer_stop_ids(const kl_tokenizer *t, int32_t *out, int cap)
{
	int			n = 0;

	if (t->eos >= 0 && n < cap)
		out[n++] = t->eos;
	if (t->eos_alt >= 0 && t->eos_alt != t->eos && n < cap)
		out[n++] = t->eos_alt;
	return n;
}

const uint8_t *
kl_tokenizer_token_bytes(const kl_tokenizer *t, int32_t id, size_t *len)
{
	if (id < 0 || id >= t->n_base)
	{
		*len = 0;
		return NULL;
	}
	*len = t->off[id + 1] - t->off[id];
	return t->pool + t->off[id];
}

const char *
kl_tokenizer_chat_template(const kl_tokenizer *t)
{
	return t->chat_template;
}

/* ------------------------------------------------------------------ encoding */

/* Pieces of s[0..len) (no specials), each merged into out. */
static int
encode_ordinary(const kl_tokenizer *t, const uint8_t *s, size_t len, kl_splitter splitter,
				pcre2_match_data *md, kl_ids *out, kl_err *err)
{
	size_t		pos = 0;

	while (pos < len)
	{
		size_t		end;

		if (splitter == KL_SPLIT_PCRE2)
		{
			if (kl_tok_pcre2_piece(t, s, len, pos, md, &end, err) != KL_OK)
				return KL_FAIL;
		}
		else
			end = kl_tok_scan_piece(t, s, len, pos);
		if (kl_tok_bpe(t, s + pos, end - pos, out, err) != KL_OK)
			return KL_FAIL;
		pos = end;
	}
	return KL_OK;
}

int
kl_encode_with(const kl_tokenizer *t, const char *text, size_t len, bool allow_special, kl_splitter splitter,
			   kl_ids *out, kl_err *err)
{
	const uint8_t *s = (const uint8_t *) text;
	pcre2_match_data *md = NULL;
	size_t		bad,
				pos = 0,
				n_before = out->n;
	int			rc = KL_OK;

	if (len == 0)
		return KL_OK;
	if (!text)
		return kl_errc(err, KL_E_INVALID, "no text to encode (NULL with length %zu)", len);
	if (!kl_utf8_valid(text, len, &bad))
		return kl_errc(err, KL_E_INVALID,
					   "the text is not valid UTF-8 at byte %zu (of %zu): give UTF-8 text", bad, len);
	if (splitter == KL_SPLIT_PCRE2)
	{
		md = pcre2_match_data_create_from_pattern(t->re, NULL);
		if (!md)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
	}
	while (pos < len && rc == KL_OK)
	{
		size_t		at = len;
		int			k = -1;

		if (allow_special)
		{
			for (size_t i = pos; i < len; i++)
				if (t->special_first_byte[s[i]] && (k = special_at(t, s, len, i)) >= 0)
				{
					at = i;
					break;
				}
		}
		if (at > pos)
			rc = encode_ordinary(t, s + pos, at - pos, splitter, md, out, err);
		if (rc == KL_OK && k >= 0)
		{
			rc = kl_ids_push(out, t->specials[k].id, err);
			at += t->specials[k].len;
		}
		pos = at;
	}
	pcre2_match_data_free(md);
	if (rc != KL_OK)
		out->n = n_before;
	return rc;
}

int
kl_encode(const kl_tokenizer *t, const char *text, size_t len, bool allow_special, kl_ids *out, kl_err *err)
{
	return kl_encode_with(t, text, len, allow_special, KL_SPLIT_SCANNER, out, err);
}

int
kl_split(const kl_tokenizer *t, const char *text, size_t len, kl_splitter splitter, size_t **ends, size_t *n,
		 size_t *cap, kl_err *err)
{
	const uint8_t *s = (const uint8_t *) text;
	pcre2_match_data *md = NULL;
	size_t		bad,
				pos = 0;
	int			rc = KL_OK;

	if (len == 0)
		return KL_OK;
	if (!text)
		return kl_errc(err, KL_E_INVALID, "no text to split (NULL with length %zu)", len);
	if (!kl_utf8_valid(text, len, &bad))
		return kl_errc(err, KL_E_INVALID,
					   "the text is not valid UTF-8 at byte %zu (of %zu): give UTF-8 text", bad, len);
	if (splitter == KL_SPLIT_PCRE2 && !(md = pcre2_match_data_create_from_pattern(t->re, NULL)))
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	while (pos < len)
	{
		size_t		end;

		if (splitter == KL_SPLIT_PCRE2)
		{
			if ((rc = kl_tok_pcre2_piece(t, s, len, pos, md, &end, err)) != KL_OK)
				break;
		}
		else
			end = kl_tok_scan_piece(t, s, len, pos);
		if (*n == *cap)
		{
			size_t		c = *cap ? *cap * 2 : 256;
			size_t	   *p = realloc(*ends, c * sizeof(size_t));

			if (!p)
			{
				rc = kl_errc(err, KL_E_RESOURCES, "out of memory");
				break;
			}
			*ends = p;
			*cap = c;
		}
		(*ends)[(*n)++] = end;
		pos = end;
	}
	pcre2_match_data_free(md);
	return rc;
}

/* ------------------------------------------------------------------ decoding */

static inline int
id_bytes(const kl_tokenizer *t, int32_t id, size_t pos, const uint8_t **b, size_t *n, kl_err *err)
{
	if (id >= 0 && id < t->n_base)
	{
		*b = t->pool + t->off[id];
		*n = t->off[id + 1] - t->off[id];
		return KL_OK;
	}
	if (id >= t->n_base && id < t->n_vocab && t->special_text[id - t->n_base])
	{
		*b = (const uint8_t *) t->special_text[id - t->n_base];
		*n = strlen(t->special_text[id - t->n_base]);
		return KL_OK;
	}
	return kl_errc(err, KL_E_INVALID,
				   "token id %d at position %zu is not in the vocabulary (ids run from 0 to %d)", id, pos,
				   t->n_vocab - 1);
}

int
kl_decode(const kl_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len, kl_err *err)
{
	size_t		total = 0,
				at = 0;
	char	   *buf;

	*text = NULL;
	*len = 0;
	for (size_t i = 0; i < n; i++)
	{
		const uint8_t *b = NULL;
		size_t		nb = 0;

		if (id_bytes(t, ids[i], i, &b, &nb, err) != KL_OK)
			return KL_FAIL;
		total += nb;
	}
	buf = kl_malloc(total + 1, err);
	if (!buf)
		return KL_FAIL;
	for (size_t i = 0; i < n; i++)
	{
		const uint8_t *b = NULL;
		size_t		nb = 0;

		(void) id_bytes(t, ids[i], i, &b, &nb, err);
		memcpy(buf + at, b, nb);
		at += nb;
	}
	buf[total] = 0;
	*text = buf;
	*len = total;
	return KL_OK;
}

void
kl_detok_stream_init(kl_detok_stream *s, const kl_tokenizer *tok)
{
	s->tok = tok;
	s->n_pending = 0;
	s->n_pushed = 0;
}

static const char replacement_char[] = "\xEF\xBF\xBD";	/* U+FFFD */

/*
 * Append the complete characters of (pending bytes ++ b[0..n)) to the
 * buffer; keep an incomplete character at the end in pending.  A byte that
 * cannot continue or start a character becomes one U+FFFD per maximal
 * ill-formed subsequence (Unicode's recommended practice), as Python's
 * errors="replace" does.
 */
static int
stream_bytes(kl_detok_stream *s, const uint8_t *b, size_t n, char **buf, size_t *len, size_t *cap, kl_err *err)
{
	size_t		i = 0;

	/* first finish (or give up on) the pending character */
	while (s->n_pending > 0 && i < n)
	{
		uint8_t		tmp[4];
		int			need,
					have;

		memcpy(tmp, s->pending, (size_t) s->n_pending);
		tmp[s->n_pending] = b[i];
		have = utf8_valid_prefix(tmp, (size_t) s->n_pending + 1, &need);
		if (have == s->n_pending + 1)
		{
			i++;
			if (have == need)
			{
				s->n_pending = 0;
				if (buf_append(buf, len, cap, tmp, (size_t) need, err) != KL_OK)
					return KL_FAIL;
			}
			else
			{
				s->pending[s->n_pending++] = tmp[have - 1];
			}
		}
		else
		{
			/* b[i] does not continue it: the pending bytes are one bad sequence */
			s->n_pending = 0;
			if (buf_append(buf, len, cap, replacement_char, 3, err) != KL_OK)
				return KL_FAIL;
		}
	}
	while (i < n)
	{
		size_t		bad;
		int			need,
					have;

		if (kl_utf8_valid((const char *) b + i, n - i, &bad))
			return buf_append(buf, len, cap, b + i, n - i, err);
		if (buf_append(buf, len, cap, b + i, bad, err) != KL_OK)
			return KL_FAIL;
		i += bad;
		have = utf8_valid_prefix(b + i, n - i, &need);
		if (need > 0 && i + (size_t) have == n)
		{
			/* a character cut by the end of this token: wait for the next one */
			memcpy(s->pending, b + i, (size_t) have);
			s->n_pending = have;
			return KL_OK;
		}
		if (buf_append(buf, len, cap, replacement_char, 3, err) != KL_OK)
			return KL_FAIL;
		i += have > 0 ? (size_t) have : 1;
	}
	return KL_OK;
}

int
kl_detok_stream_push(kl_detok_stream *s, int32_t id, char **buf, size_t *len, size_t *cap, kl_err *err)
{
	const uint8_t *b = NULL;
	size_t		n = 0;

	if (id_bytes(s->tok, id, s->n_pushed, &b, &n, err) != KL_OK)
		return KL_FAIL;
	s->n_pushed++;
	/* keep *buf a valid (NUL-terminated) string even when nothing is added */
	if (*buf == NULL && buf_append(buf, len, cap, "", 0, err) != KL_OK)
		return KL_FAIL;
	return stream_bytes(s, b, n, buf, len, cap, err);
}

int
kl_detok_stream_finish(kl_detok_stream *s, char **buf, size_t *len, size_t *cap, kl_err *err)
{
	if (*buf == NULL && buf_append(buf, len, cap, "", 0, err) != KL_OK)
		return KL_FAIL;
	if (s->n_pending > 0)
	{
		s->n_pending = 0;
		return buf_append(buf, len, cap, replacement_char, 3, err);
	}
	return KL_OK;
}

int
kl_decode_text(const kl_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len, kl_err *err)
{
	kl_detok_stream s;
	char	   *buf = NULL;
	size_t		l = 0,
				cap = 0;

	*text = NULL;
	*len = 0;
	kl_detok_stream_init(&s, t);
	for (size_t i = 0; i < n; i++)
		if (kl_detok_stream_push(&s, ids[i], &buf, &l, &cap, err) != KL_OK)
		{
			free(buf);
			return KL_FAIL;
		}
	if (kl_detok_stream_finish(&s, &buf, &l, &cap, err) != KL_OK)
	{
		free(buf);
		return KL_FAIL;
	}
	*text = buf;
	*len = l;
	return KL_OK;
}
