/*
 * bpe.c — the ordinary vocabulary (tiktoken.model) and byte-pair merging.
 *
 * Merging follows the reference exactly: a piece starts as its bytes; the
 * adjacent pair whose concatenation has the lowest rank is merged (the
 * leftmost one on ties), again and again, until no adjacent concatenation is
 * a token.  A piece that is itself a token is that token, without merging
 * (the reference looks it up first, and merging need not reach it).
 *
 * Every part is a token at every step (single bytes are tokens, and a merge
 * only makes tokens), so instead of hashing byte strings the merge loop looks
 * up (left rank, right rank) in a table built at load time from every way of
 * cutting each token into two tokens.  That gives the same ranks without
 * hashing and comparing byte strings in the inner loop.
 *
 * Short pieces (the vast majority) merge in a small array, scanning for the
 * minimum each step; long pieces (a 300-character run of one letter, pages of
 * spaces) use a doubly linked list of parts and an indexed min-heap of pair
 * ranks, so they cost n log n instead of n^2.
 *
 * tiktoken.model is read through kl_file.h (confined to a root when the
 * loader has one); errors about its lines give the line number and the rule,
 * never the line's text.
 */
#include "tokenizer_internal.h"

#include "kl_file.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_RANK INT32_MAX
#define SMALL_PIECE 64			/* pieces up to this many bytes merge in an array */
#define MAX_VOCAB_FILE (1L << 30)

/* ------------------------------------------------------------------ hashing */

static inline uint64_t
hash_bytes(const uint8_t *p, size_t n)
{
	uint64_t	h = 0x9e3779b97f4a7c15ull ^ (n * 0x100000001b3ull);

	while (n >= 8)
	{
		uint64_t	w;

		memcpy(&w, p, 8);
		h = (h ^ w) * 0xff51afd7ed558ccdull;
		h ^= h >> 32;
		p += 8;
		n -= 8;
	}
	if (n > 0)
	{
		uint64_t	w = 0;

		memcpy(&w, p, n);
		h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
	}
	h ^= h >> 29;
	return h;
}

static inline uint64_t
hash_pair(uint64_t key)
{
	key *= 0x9e3779b97f4a7c15ull;
	return key ^ (key >> 31);
}

int32_t
kl_tok_lookup(const kl_tokenizer *t, const uint8_t *p, size_t n)
{
	uint32_t	i;

	if (n == 1)
		return t->byte_rank[p[0]];
	for (i = (uint32_t) hash_bytes(p, n) & t->rank_mask;; i = (i + 1) & t->rank_mask)
	{
		int32_t		e = t->rank_slots[i];
		uint32_t	a,
					b;

		if (e == 0)
			return -1;
		a = t->off[e - 1];
		b = t->off[e];
		if (b - a == n && memcmp(t->pool + a, p, n) == 0)
			return e - 1;
	}
}

/* The rank of the concatenation of tokens left and right, or NO_RANK. */
static inline int32_t
pair_rank(const kl_tokenizer *t, int32_t left, int32_t right)
{
	uint64_t	key = (((uint64_t) (uint32_t) left << 32) | (uint32_t) right) + 1;
	uint32_t	i;

	for (i = (uint32_t) hash_pair(key) & t->pair_mask;; i = (i + 1) & t->pair_mask)
	{
		uint64_t	k = t->pair_keys[i];

		if (k == key)
			return t->pair_ranks[i];
		if (k == 0)
			return NO_RANK;
	}
}

/* ------------------------------------------------------------------ loading tiktoken.model */

static int
b64_value(uint8_t c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/*
 * Standard padded base64 s[0..n) into out (room for n / 4 * 3 bytes).
 * Returns the byte count, or -1 with *why set.
 */
static long
b64_decode(const char *s, size_t n, uint8_t *out, const char **why)
{
	long		o = 0;
	size_t		pad = 0;

	if (n == 0)
	{
		*why = "empty token";
		return -1;
	}
	if (n % 4 != 0)
	{
		*why = "base64 length is not a multiple of 4";
		return -1;
	}
	while (pad < 2 && s[n - 1 - pad] == '=')
		pad++;
	for (size_t i = 0; i < n; i += 4)
	{
		uint32_t	acc = 0;
		int			chars = (i + 4 == n) ? 4 - (int) pad : 4;

		for (int k = 0; k < 4; k++)
		{
			int			v = k < chars ? b64_value((uint8_t) s[i + k]) : 0;

			if (v < 0)
			{
				*why = (s[i + k] == '=') ? "'=' padding in the middle" : "a character outside the base64 alphabet";
				return -1;
			}
			acc = (acc << 6) | (uint32_t) v;
		}
		out[o++] = (uint8_t) (acc >> 16);
		if (chars > 2)
			out[o++] = (uint8_t) (acc >> 8);
		if (chars > 3)
			out[o++] = (uint8_t) acc;
	}
	return o;
}

/* Parse the lines into t->pool / t->off (rank order). */
static int
parse_ranks(kl_tokenizer *t, const char *path, char *text, size_t len, kl_err *err)
{
	size_t		max_lines = 1;
	uint32_t   *tok_start = NULL;	/* per rank: offset in scratch, or UINT32_MAX */
	uint32_t   *tok_len = NULL;
	int		   *tok_line = NULL;
	uint8_t    *scratch = NULL;
	size_t		used = 0;
	int			n = 0,
				line = 0;
	int			rc = KL_FAIL;

	for (size_t i = 0; i < len; i++)
		max_lines += text[i] == '\n';
	if (max_lines > INT32_MAX / 2)
		return kl_errc(err, KL_E_RESOURCES, "%s: too many lines for a vocabulary", path);
	tok_start = kl_malloc(max_lines * sizeof(uint32_t), err);
	tok_len = kl_calloc(max_lines, sizeof(uint32_t), err);
	tok_line = kl_calloc(max_lines, sizeof(int), err);
	scratch = kl_malloc(len / 4 * 3 + 4, err);
	if (!tok_start || !tok_len || !tok_line || !scratch)
		goto out;
	memset(tok_start, 0xff, max_lines * sizeof(uint32_t));

	for (char *p = text, *end; p < text + len; p = end + 1)
	{
		char	   *sp,
				   *q,
				   *stop;
		uint64_t	rank = 0;
		long		nb;
		const char *why = NULL;

		end = memchr(p, '\n', (size_t) (text + len - p));
		if (!end)
			end = text + len;
		line++;
		stop = (end > p && end[-1] == '\r') ? end - 1 : end;
		if (stop == p)
			continue;			/* blank lines are allowed, as in the reference loader */
		sp = memchr(p, ' ', (size_t) (stop - p));
		if (!sp)
		{
			kl_errc(err, KL_E_INVALID,
					"%s line %d: expected \"<base64 of the token's bytes> <rank>\"; fix or replace the file",
					path, line);
			goto out;
		}
		if (sp + 1 == stop)
		{
			kl_errc(err, KL_E_INVALID, "%s line %d: the rank after the space is missing", path, line);
			goto out;
		}
		for (q = sp + 1; q < stop; q++)
		{
			if (*q < '0' || *q > '9')
			{
				kl_errc(err, KL_E_INVALID,
						"%s line %d: the rank (after the space) is not a non-negative decimal number", path,
						line);
				goto out;
			}
			rank = rank * 10 + (uint64_t) (*q - '0');
			if (rank >= max_lines)
				break;
		}
		if (rank >= max_lines)
		{
			kl_errc(err, KL_E_INVALID,
					"%s line %d: the rank is out of range: the file has at most %zu tokens, so ranks run "
					"from 0 to %zu", path, line, max_lines, max_lines - 1);
			goto out;
		}
		nb = b64_decode(p, (size_t) (sp - p), scratch + used, &why);
		if (nb < 0)
		{
			kl_errc(err, KL_E_INVALID,
					"%s line %d: the token (before the space) is not valid base64: %s", path, line, why);
			goto out;
		}
		if (tok_start[rank] != UINT32_MAX)
		{
			kl_errc(err, KL_E_INVALID,
					"%s line %d: rank %llu was already given on line %d; each rank must appear once", path,
					line, (unsigned long long) rank, tok_line[rank]);
			goto out;
		}
		tok_start[rank] = (uint32_t) used;
		tok_len[rank] = (uint32_t) nb;
		tok_line[rank] = line;
		used += (size_t) nb;
		n++;
	}
	if (n == 0)
	{
		kl_errc(err, KL_E_INVALID, "%s has no tokens", path);
		goto out;
	}
	for (int r = 0; r < n; r++)
		if (tok_start[r] == UINT32_MAX)
		{
			kl_errc(err, KL_E_INVALID,
					"%s: rank %d is missing: the %d tokens must have the ranks 0 to %d", path, r, n, n - 1);
			goto out;
		}
	t->pool = kl_malloc(used + 1, err);
	t->off = kl_malloc(((size_t) n + 1) * sizeof(uint32_t), err);
	if (!t->pool || !t->off)
		goto out;
	used = 0;
	for (int r = 0; r < n; r++)
	{
		memcpy(t->pool + used, scratch + tok_start[r], tok_len[r]);
		t->off[r] = (uint32_t) used;
		used += tok_len[r];
	}
	t->off[n] = (uint32_t) used;
	t->n_base = n;
	rc = KL_OK;
out:
	free(tok_start);
	free(tok_len);
	free(tok_line);
	free(scratch);
	return rc;
}

static uint32_t
table_size_for(size_t entries)
{
	uint32_t	cap = 16;

	while (cap < entries * 2)
		cap <<= 1;
	return cap;
}

static int
build_rank_table(kl_tokenizer *t, const char *path, kl_err *err)
{
	uint32_t	cap = table_size_for((size_t) t->n_base);

	t->rank_slots = kl_calloc(cap, sizeof(int32_t), err);
	if (!t->rank_slots)
		return KL_FAIL;
	t->rank_mask = cap - 1;
	for (int b = 0; b < 256; b++)
		t->byte_rank[b] = -1;
	for (int r = 0; r < t->n_base; r++)
	{
		const uint8_t *bytes = t->pool + t->off[r];
		size_t		n = t->off[r + 1] - t->off[r];
		int32_t		other = kl_tok_lookup(t, bytes, n);
		uint32_t	i;

		if (other >= 0)
			return kl_errc(err, KL_E_INVALID,
						   "%s: ranks %d and %d have the same bytes; each token must be different", path,
						   other, r);
		if (n == 1)
			t->byte_rank[bytes[0]] = r;
		for (i = (uint32_t) hash_bytes(bytes, n) & t->rank_mask; t->rank_slots[i] != 0; i = (i + 1) & t->rank_mask)
			;
		t->rank_slots[i] = r + 1;
	}
	for (int b = 0; b < 256; b++)
		if (t->byte_rank[b] < 0)
			return kl_errc(err, KL_E_INVALID,
						   "%s: byte 0x%02x has no token of its own, so some texts could not be encoded; "
						   "a byte-level vocabulary has all 256", path, b);
	return KL_OK;
}

static int
build_pair_table(kl_tokenizer *t, kl_err *err)
{
	size_t		cuts = 0,
				n_pairs = 0;
	uint64_t   *keys;
	int32_t    *vals;
	uint32_t	cap;

	for (int r = 0; r < t->n_base; r++)
		cuts += t->off[r + 1] - t->off[r] - 1;
	keys = kl_malloc((cuts + 1) * sizeof(uint64_t), err);
	vals = kl_malloc((cuts + 1) * sizeof(int32_t), err);
	if (!keys || !vals)
	{
		free(keys);
		free(vals);
		return KL_FAIL;
	}
	for (int r = 0; r < t->n_base; r++)
	{
		const uint8_t *bytes = t->pool + t->off[r];
		size_t		n = t->off[r + 1] - t->off[r];

		for (size_t cut = 1; cut < n; cut++)
		{
			int32_t		left = kl_tok_lookup(t, bytes, cut);
			int32_t		right;

			if (left < 0)
				continue;
			right = kl_tok_lookup(t, bytes + cut, n - cut);
			if (right < 0)
				continue;
			keys[n_pairs] = (((uint64_t) (uint32_t) left << 32) | (uint32_t) right) + 1;
			vals[n_pairs] = r;
			n_pairs++;
		}
	}
	cap = table_size_for(n_pairs);
	t->pair_keys = kl_calloc(cap, sizeof(uint64_t), err);
	t->pair_ranks = kl_malloc(cap * sizeof(int32_t), err);
	if (!t->pair_keys || !t->pair_ranks)
	{
		free(keys);
		free(vals);
		return KL_FAIL;
	}
	t->pair_mask = cap - 1;
	for (size_t k = 0; k < n_pairs; k++)
	{
		uint32_t	i;

		/* distinct tokens have distinct bytes, so a (left, right) pair occurs once */
		for (i = (uint32_t) hash_pair(keys[k]) & t->pair_mask; t->pair_keys[i] != 0; i = (i + 1) & t->pair_mask)
			;
		t->pair_keys[i] = keys[k];
		t->pair_ranks[i] = vals[k];
	}
	free(keys);
	free(vals);
	return KL_OK;
}

int
kl_tok_build_tables(kl_tokenizer *t, const char *root, const char *path, kl_err *err)
{
	size_t		len;
	char	   *text;
	int			rc;

	if (kl_file_read(root, path, MAX_VOCAB_FILE, "a vocabulary file", &text, &len, err) != KL_OK)
		return KL_FAIL;
	rc = parse_ranks(t, path, text, len, err);
	free(text);
	if (rc == KL_OK)
		rc = build_rank_table(t, path, err);
	if (rc == KL_OK)
		rc = build_pair_table(t, err);
	return rc;
}

/* ------------------------------------------------------------------ merging */

static int
push_ids(kl_ids *out, const int32_t *ids, size_t n, kl_err *err)
{
	if (out->n + n > out->cap)
	{
		size_t		cap = out->cap ? out->cap : 64;
		int32_t    *p;

		while (cap < out->n + n)
			cap *= 2;
		p = realloc(out->ids, cap * sizeof(int32_t));
		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory for %zu token ids", cap);
		out->ids = p;
		out->cap = cap;
	}
	memcpy(out->ids + out->n, ids, n * sizeof(int32_t));
	out->n += n;
	return KL_OK;
}

/* Parts in an array; each step scans for the lowest pair rank. */
static int
merge_small(const kl_tokenizer *t, const uint8_t *p, size_t n, kl_ids *out, kl_err *err)
{
	int32_t		part[SMALL_PIECE];
	int32_t		rank[SMALL_PIECE];	/* rank[i]: parts i and i+1 merged, or NO_RANK */
	size_t		m = n;

	for (size_t i = 0; i < n; i++)
		part[i] = t->byte_rank[p[i]];
	for (size_t i = 0; i + 1 < n; i++)
		rank[i] = pair_rank(t, part[i], part[i + 1]);
	rank[n - 1] = NO_RANK;
	while (m > 1)
	{
		size_t		best = 0;

		for (size_t i = 1; i + 1 < m; i++)
			if (rank[i] < rank[best])
				best = i;
		if (rank[best] == NO_RANK)
			break;
		/* the merged token's id is the pair's rank */
		part[best] = rank[best];
		for (size_t i = best + 1; i + 1 < m; i++)
		{
			part[i] = part[i + 1];
			rank[i] = rank[i + 1];
		}
		m--;
		rank[best] = best + 1 < m ? pair_rank(t, part[best], part[best + 1]) : NO_RANK;
		if (best > 0)
			rank[best - 1] = pair_rank(t, part[best - 1], part[best]);
	}
	return push_ids(out, part, m, err);
}

/*
 * Long pieces: parts as a doubly linked list over byte positions, and a
 * min-heap of the positions whose pair (with the next part) is a token,
 * ordered by (rank, position), with each position's index in the heap so
 * that a pair can be updated or removed in place.
 */
typedef struct merge_state
{
	int32_t    *part;			/* token of the part starting at a position */
	int32_t    *next;			/* start of the next part (n at the end) */
	int32_t    *prev;			/* start of the previous part (-1 at the start) */
	int32_t    *rank;			/* rank of the pair starting at a position, NO_RANK if none */
	int32_t    *heap;			/* positions */
	int32_t    *where;			/* position -> index in heap, -1 if absent */
	int32_t		heap_n;
} merge_state;

static inline bool
heap_before(const merge_state *s, int32_t a, int32_t b)
{
	return s->rank[a] < s->rank[b] || (s->rank[a] == s->rank[b] && a < b);
}

static void
heap_sift_up(merge_state *s, int32_t i)
{
	int32_t		pos = s->heap[i];

	while (i > 0)
	{
		int32_t		parent = (i - 1) / 2;

		if (!heap_before(s, pos, s->heap[parent]))
			break;
		s->heap[i] = s->heap[parent];
		s->where[s->heap[i]] = i;
		i = parent;
	}
	s->heap[i] = pos;
	s->where[pos] = i;
}

static void
heap_sift_down(merge_state *s, int32_t i)
{
	int32_t		pos = s->heap[i];

	for (;;)
	{
		int32_t		c = 2 * i + 1;

		if (c >= s->heap_n)
			break;
		if (c + 1 < s->heap_n && heap_before(s, s->heap[c + 1], s->heap[c]))
			c++;
		if (!heap_before(s, s->heap[c], pos))
			break;
		s->heap[i] = s->heap[c];
		s->where[s->heap[i]] = i;
		i = c;
	}
	s->heap[i] = pos;
	s->where[pos] = i;
}

static void
heap_remove(merge_state *s, int32_t pos)
{
	int32_t		i = s->where[pos],
				last;

	if (i < 0)
		return;
	s->where[pos] = -1;
	last = s->heap[--s->heap_n];
	if (i == s->heap_n)
		return;
	s->heap[i] = last;
	s->where[last] = i;
	heap_sift_up(s, i);
	heap_sift_down(s, s->where[last]);
}

/* Give the pair at pos a new rank (NO_RANK: no pair). */
static void
set_pair(merge_state *s, int32_t pos, int32_t rank)
{
	if (rank == NO_RANK)
	{
		heap_remove(s, pos);
		s->rank[pos] = NO_RANK;
		return;
	}
	if (s->where[pos] < 0)
	{
		s->rank[pos] = rank;
		s->heap[s->heap_n] = pos;
		s->where[pos] = s->heap_n++;
		heap_sift_up(s, s->where[pos]);
		return;
	}
	s->rank[pos] = rank;
	heap_sift_up(s, s->where[pos]);
	heap_sift_down(s, s->where[pos]);
}

static int
merge_large(const kl_tokenizer *t, const uint8_t *p, size_t n_bytes, kl_ids *out, kl_err *err)
{
	merge_state s;
	int32_t		n = (int32_t) n_bytes;
	int32_t    *block;
	int			rc = KL_OK;

	if (n_bytes > (size_t) INT32_MAX / 8)
		return kl_errc(err, KL_E_RESOURCES,
					   "a single piece of %zu bytes is too long to encode; split the text", n_bytes);
	block = malloc((size_t) n * 6 * sizeof(int32_t));
	if (!block)
		return kl_errc(err, KL_E_RESOURCES, "out of memory merging a piece of %zu bytes", n_bytes);
	s.part = block;
	s.next = block + n;
	s.prev = block + 2 * (size_t) n;
	s.rank = block + 3 * (size_t) n;
	s.heap = block + 4 * (size_t) n;
	s.where = block + 5 * (size_t) n;
	s.heap_n = 0;
	for (int32_t i = 0; i < n; i++)
	{
		s.part[i] = t->byte_rank[p[i]];
		s.next[i] = i + 1;
		s.prev[i] = i - 1;
		s.where[i] = -1;
	}
	/* all pairs first, then heapify: linear */
	for (int32_t i = 0; i < n; i++)
	{
		s.rank[i] = i + 1 < n ? pair_rank(t, s.part[i], s.part[i + 1]) : NO_RANK;
		if (s.rank[i] != NO_RANK)
		{
			s.heap[s.heap_n] = i;
			s.where[i] = s.heap_n++;
		}
	}
	for (int32_t i = s.heap_n / 2 - 1; i >= 0; i--)
		heap_sift_down(&s, i);

	while (s.heap_n > 0)
	{
		int32_t		a = s.heap[0];
		int32_t		b = s.next[a];
		int32_t		after = s.next[b];

		/* merge parts a and b; b's pair (with the part after it) goes away */
		s.part[a] = s.rank[a];
		set_pair(&s, b, NO_RANK);
		s.next[a] = after;
		if (after < n)
			s.prev[after] = a;
		set_pair(&s, a, after < n ? pair_rank(t, s.part[a], s.part[after]) : NO_RANK);
		if (s.prev[a] >= 0)
			set_pair(&s, s.prev[a], pair_rank(t, s.part[s.prev[a]], s.part[a]));
	}
	for (int32_t i = 0; i < n && rc == KL_OK; i = s.next[i])
		rc = push_ids(out, &s.part[i], 1, err);
	free(block);
	return rc;
}

int
kl_tok_bpe(const kl_tokenizer *t, const uint8_t *p, size_t n, kl_ids *out, kl_err *err)
{
	int32_t		whole;

	if (n == 0)
		return KL_OK;
	if (n == 2)
	{
		/* a two-byte token is the pair of its bytes; otherwise the piece stays two bytes */
		int32_t		two[2] = {t->byte_rank[p[0]], t->byte_rank[p[1]]};

		whole = pair_rank(t, two[0], two[1]);
		return whole != NO_RANK ? push_ids(out, &whole, 1, err) : push_ids(out, two, 2, err);
	}
	whole = kl_tok_lookup(t, p, n);
	if (whole >= 0)
		return push_ids(out, &whole, 1, err);
	return n <= SMALL_PIECE ? merge_small(t, p, n, out, err) : merge_large(t, p, n, out, err);
}
