/*
 * vocab_trie.c — building a vocabulary's byte trie and its precomputed
 * masks (see vocab_trie.h).
 *
 * The trie is built from the tokens sorted by their bytes (so that every
 * node's children are created in increasing byte order), as a first-child /
 * next-sibling tree, then renumbered breadth first so that each node's
 * children are consecutive: the walk in json_constraint.c then needs only
 * a range per node.
 */
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "vocab_trie.h"

typedef struct tok_ref
{
	const uint8_t *b;
	size_t		len;
	int32_t		id;
} tok_ref;

static int
cmp_tok(const void *pa, const void *pb)
{
	const tok_ref *a = pa,
			   *b = pb;
	size_t		n = a->len < b->len ? a->len : b->len;
	int			c = memcmp(a->b, b->b, n);

	if (c != 0)
		return c;
	return (a->len > b->len) - (a->len < b->len);
}

static void
trie_free(kl_byte_trie *t)
{
	free(t->first);
	free(t->count);
	free(t->byte);
	free(t->token);
	memset(t, 0, sizeof(*t));
}

/* Build t from refs[0..n) (sorted here). */
static int
trie_build(kl_byte_trie *t, tok_ref *refs, size_t n, kl_err *err)
{
	size_t		cap = 1;
	int32_t    *child = NULL,
			   *sibling = NULL,
			   *last = NULL,
			   *tok = NULL,
			   *order = NULL,
			   *newid = NULL;
	uint8_t    *byte = NULL;
	int32_t		nn = 1,
				depth = 0;
	int			rc = KL_FAIL;

	memset(t, 0, sizeof(*t));
	qsort(refs, n, sizeof(tok_ref), cmp_tok);
	for (size_t i = 0; i < n; i++)
		cap += refs[i].len;
	if (cap > INT32_MAX)
		return kl_errc(err, KL_E_RESOURCES, "vocabulary too large for its trie (%zu bytes)", cap);
	child = malloc(cap * sizeof(int32_t));
	sibling = malloc(cap * sizeof(int32_t));
	last = malloc(cap * sizeof(int32_t));
	tok = malloc(cap * sizeof(int32_t));
	byte = malloc(cap);
	if (!child || !sibling || !last || !tok || !byte)
	{
		kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary trie");
		goto out;
	}
	child[0] = sibling[0] = last[0] = tok[0] = -1;
	byte[0] = 0;
	for (size_t i = 0; i < n; i++)
	{
		int32_t		node = 0;

		if (refs[i].len == 0)
			continue;
		if ((int32_t) refs[i].len > depth)
			depth = (int32_t) refs[i].len;
		for (size_t k = 0; k < refs[i].len; k++)
		{
			uint8_t		c = refs[i].b[k];
			int32_t		l = last[node];

			/* sorted input: the child for c is the last one created, or a new one after it */
			if (l >= 0 && byte[l] == c)
			{
				node = l;
				continue;
			}
			child[nn] = sibling[nn] = last[nn] = tok[nn] = -1;
			byte[nn] = c;
			if (l >= 0)
				sibling[l] = nn;
			else
				child[node] = nn;
			last[node] = nn;
			node = nn++;
		}
		if (tok[node] < 0)
			tok[node] = refs[i].id;
	}

	/* breadth-first renumbering: children become consecutive */
	order = malloc((size_t) nn * sizeof(int32_t));
	newid = malloc((size_t) nn * sizeof(int32_t));
	t->first = malloc((size_t) nn * sizeof(int32_t));
	t->count = malloc((size_t) nn * sizeof(uint16_t));
	t->byte = malloc((size_t) nn);
	t->token = malloc((size_t) nn * sizeof(int32_t));
	if (!order || !newid || !t->first || !t->count || !t->byte || !t->token)
	{
		kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary trie");
		goto out;
	}
	{
		int32_t		head = 0,
					tail = 0;

		order[tail++] = 0;
		newid[0] = 0;
		while (head < tail)
		{
			int32_t		old = order[head];
			int32_t		me = head++;
			int			cnt = 0;

			t->first[me] = tail;
			for (int32_t c = child[old]; c >= 0; c = sibling[c])
			{
				newid[c] = tail;
				order[tail++] = c;
				cnt++;
			}
			t->count[me] = (uint16_t) cnt;
			t->byte[me] = byte[old];
			t->token[me] = tok[old];
		}
	}
	t->n_nodes = nn;
	t->max_depth = depth;
	rc = KL_OK;
out:
	free(child);
	free(sibling);
	free(last);
	free(tok);
	free(byte);
	free(order);
	free(newid);
	if (rc != KL_OK)
		trie_free(t);
	return rc;
}

/*
 * The characters of b[0..n) if the token keeps a JSON string open from a
 * character boundary: well-formed UTF-8 (the last character may be cut short:
 * it is counted, as the string automaton counts a character at its first
 * byte) with no byte a JSON string must escape ('"', '\\', below 0x20);
 * -1 otherwise.
 */
static int32_t
string_safe_chars(const uint8_t *b, size_t n)
{
	int32_t		chars = 0;
	size_t		i = 0;

	while (i < n)
	{
		uint8_t		c = b[i],
					lo = 0x80,
					hi = 0xBF;
		int			need;

		if (c < 0x80)
		{
			if (c < 0x20 || c == '"' || c == '\\')
				return -1;
			chars++;
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF)
			need = 1;
		else if (c >= 0xE0 && c <= 0xEF)
		{
			need = 2;
			lo = c == 0xE0 ? 0xA0 : 0x80;
			hi = c == 0xED ? 0x9F : 0xBF;
		}
		else if (c >= 0xF0 && c <= 0xF4)
		{
			need = 3;
			lo = c == 0xF0 ? 0x90 : 0x80;
			hi = c == 0xF4 ? 0x8F : 0xBF;
		}
		else
			return -1;
		chars++;
		i++;
		for (int k = 0; k < need && i < n; k++, i++)
		{
			if (b[i] < lo || b[i] > hi)
				return -1;
			lo = 0x80;
			hi = 0xBF;
		}
	}
	return n > 0 ? chars : -1;
}

/* Copy the ordinary tokens' bytes into v->pool (refs then point there). */
static int
vocab_pool(kl_vocab *v, tok_ref *refs, size_t n_refs, kl_err *err)
{
	size_t		total = 0;

	for (size_t i = 0; i < n_refs; i++)
		total += refs[i].len;
	if (total > UINT32_MAX)
		return kl_errc(err, KL_E_RESOURCES, "vocabulary too large (%zu bytes of tokens)", total);
	v->pool = malloc(total + 1);
	v->off = calloc((size_t) v->n_ids + 1, sizeof(uint32_t));
	if (!v->pool || !v->off)
		return kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary");
	/* ids in order, so that off[] is monotone: refs are in id order here */
	total = 0;
	for (size_t i = 0, k = 0; i < (size_t) v->n_ids; i++)
	{
		v->off[i] = (uint32_t) total;
		if (k < n_refs && refs[k].id == (int32_t) i)
		{
			memcpy(v->pool + total, refs[k].b, refs[k].len);
			refs[k].b = v->pool + total;
			total += refs[k].len;
			k++;
		}
	}
	v->off[v->n_ids] = (uint32_t) total;
	return KL_OK;
}

/* The masks and the unsafe trie, once sym[] and the ordinary tokens (in id order) are known. */
static int
vocab_finish(kl_vocab *v, tok_ref *refs, size_t n_refs, kl_err *err)
{
	size_t		words = kl_mask_words(v->n_ids);
	size_t		n_unsafe = 0;
	tok_ref    *unsafe;

	if (vocab_pool(v, refs, n_refs, err) != KL_OK)
		return KL_FAIL;

	v->string_safe = calloc(words, sizeof(uint32_t));
	v->text_mask = calloc(words, sizeof(uint32_t));
	v->safe_chars = malloc(sizeof(int32_t) * (size_t) v->n_ids);
	v->special_ids = malloc(sizeof(int32_t) * (size_t) v->n_ids);
	unsafe = malloc(sizeof(tok_ref) * (n_refs + 1));
	if (!v->string_safe || !v->text_mask || !v->safe_chars || !v->special_ids || !unsafe)
	{
		free(unsafe);
		return kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary masks");
	}
	for (int i = 0; i < v->n_ids; i++)
	{
		v->safe_chars[i] = -1;
		if (v->sym[i] == KL_VSYM_BYTES || v->sym[i] == KL_VSYM_OTHER)
			kl_mask_set(v->text_mask, i);
		if (v->sym[i] != KL_VSYM_BYTES && v->sym[i] != KL_VSYM_NONE)
			v->special_ids[v->n_special++] = i;
	}
	for (size_t i = 0; i < n_refs; i++)
	{
		int32_t		c = string_safe_chars(refs[i].b, refs[i].len);

		v->safe_chars[refs[i].id] = c;
		if (c >= 0)
			kl_mask_set(v->string_safe, refs[i].id);
		else
			unsafe[n_unsafe++] = refs[i];
	}
	/* string-safe tokens by length: a bounded string takes those that still fit, with one mask */
	v->safe_upto = calloc(words * KL_SAFE_BUCKETS, sizeof(uint32_t));
	if (!v->safe_upto)
	{
		free(unsafe);
		return kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary masks");
	}
	for (int i = 0; i < v->n_ids; i++)
	{
		int32_t		ch = v->safe_chars[i];

		if (ch > v->max_safe_chars)
			v->max_safe_chars = ch;
		for (int32_t k = ch; ch >= 0 && k < KL_SAFE_BUCKETS; k++)
			kl_mask_set(v->safe_upto + (size_t) k * words, i);
	}
	if (trie_build(&v->unsafe, unsafe, n_unsafe, err) != KL_OK)
	{
		free(unsafe);
		return KL_FAIL;
	}
	free(unsafe);
	return trie_build(&v->all, refs, n_refs, err);
}

static kl_vocab *
vocab_alloc(int n_ids, kl_err *err)
{
	kl_vocab   *v;

	if (n_ids <= 0)
	{
		kl_errc(err, KL_E_INVALID, "a vocabulary needs at least one token");
		return NULL;
	}
	v = kl_calloc(1, sizeof(kl_vocab), err);
	if (!v)
		return NULL;
	v->n_ids = n_ids;
	v->sym = malloc((size_t) n_ids);
	if (!v->sym)
	{
		free(v);
		kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary");
		return NULL;
	}
	for (int k = 0; k <= KL_VSYM_TOOL_LAST; k++)
		v->tool_ids[k] = -1;
	v->tool_text[KL_VSYM_SECTION_BEGIN] = KL_TOK_SECTION_BEGIN;
	v->tool_text[KL_VSYM_SECTION_END] = KL_TOK_SECTION_END;
	v->tool_text[KL_VSYM_CALL_BEGIN] = KL_TOK_CALL_BEGIN;
	v->tool_text[KL_VSYM_ARG_BEGIN] = KL_TOK_ARG_BEGIN;
	v->tool_text[KL_VSYM_CALL_END] = KL_TOK_CALL_END;
	return v;
}

int
kl_vocab_from_tokenizer(const kl_tokenizer *tok, int n_ids, kl_vocab **out, kl_err *err)
{
	kl_vocab   *v = vocab_alloc(n_ids, err);
	tok_ref    *refs;
	size_t		n_refs = 0;
	int			n_base = kl_tokenizer_n_base(tok),
				n_tok = kl_tokenizer_n_vocab(tok);

	*out = NULL;
	if (!v)
		return KL_FAIL;
	refs = malloc(sizeof(tok_ref) * (size_t) n_ids);
	if (!refs)
	{
		kl_vocab_free(v);
		return kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary");
	}
	for (int id = 0; id < n_ids; id++)
	{
		size_t		len;
		const uint8_t *b = id < n_base ? kl_tokenizer_token_bytes(tok, id, &len) : NULL;

		if (b)
		{
			v->sym[id] = KL_VSYM_BYTES;
			refs[n_refs++] = (tok_ref) {b, len, id};
		}
		else if (id < n_tok && kl_tokenizer_special_text(tok, id))
			v->sym[id] = KL_VSYM_OTHER;
		else
			v->sym[id] = KL_VSYM_NONE;
	}
	for (int k = KL_VSYM_TOOL_FIRST; k <= KL_VSYM_TOOL_LAST; k++)
	{
		int32_t		id = kl_tokenizer_special_id(tok, v->tool_text[k]);

		if (id >= 0 && id < n_ids)
		{
			v->tool_ids[k] = id;
			v->sym[id] = (uint8_t) k;
		}
	}
	if (vocab_finish(v, refs, n_refs, err) != KL_OK)
	{
		free(refs);
		kl_vocab_free(v);
		return KL_FAIL;
	}
	free(refs);
	*out = v;
	return KL_OK;
}

int
kl_vocab_from_bytes(const uint8_t *const *bytes, const size_t *lens, int n, kl_vocab **out, kl_err *err)
{
	kl_vocab   *v = vocab_alloc(n, err);
	tok_ref    *refs;

	*out = NULL;
	if (!v)
		return KL_FAIL;
	refs = malloc(sizeof(tok_ref) * (size_t) n);
	if (!refs)
	{
		kl_vocab_free(v);
		return kl_errc(err, KL_E_RESOURCES, "out of memory for the vocabulary");
	}
	for (int id = 0; id < n; id++)
	{
		v->sym[id] = lens[id] > 0 ? KL_VSYM_BYTES : KL_VSYM_NONE;
		refs[id] = (tok_ref) {bytes[id], lens[id], id};
	}
	if (vocab_finish(v, refs, (size_t) n, err) != KL_OK)
	{
		free(refs);
		kl_vocab_free(v);
		return KL_FAIL;
	}
	free(refs);
	*out = v;
	return KL_OK;
}

void
kl_vocab_free(kl_vocab *v)
{
	if (!v)
		return;
	trie_free(&v->all);
	trie_free(&v->unsafe);
	free(v->pool);
	free(v->off);
	free(v->string_safe);
	free(v->safe_chars);
	free(v->safe_upto);
	free(v->text_mask);
	free(v->sym);
	free(v->special_ids);
	free(v);
}
