/*
 * state.c — the serialized form of a sequence's state (docs/engine.md, "The
 * state format").  The one place that defines it.
 *
 * A state is one or more parts.  Every part is
 *
 *   offset size  field (little-endian)
 *        0    8  magic "KLSTATE\0"
 *        8    2  format version (1)
 *       10    2  kind: 1 = head, 2 = rows
 *       12    4  header size (96)
 *       16   16  model fingerprint (kl_model_fingerprint)
 *       32    8  positions: head: the sequence's position count; rows: to_pos
 *       40    8  from_pos: first position whose MLA rows are in this part
 *       48    8  to_pos: one past the last such position
 *       56    4  pending token id, -1 if none (head; -1 in rows parts)
 *       60    4  element type: 1 = f32
 *       64    4  number of KDA layers       68  4  KDA heads H
 *       72    4  KDA head dim K (= V)       76  4  conv kernel W
 *       80    4  number of MLA layers       84  4  MLA row width R + Dr
 *       88    8  payload bytes
 *       96       payload:
 *                  head only: for each KDA layer, S [H, K, V] then the conv
 *                  tails [3 (q, k, v), H*K, W] (the last W inputs, oldest first);
 *                  then for each MLA layer its rows [from_pos, to_pos) x (R + Dr)
 *      end    4  CRC-32C of everything before it
 *
 * A head with from_pos = 0 is a complete state.  Long histories keep their
 * early MLA rows in rows parts ("pages") written once; each new turn writes
 * only a new head (fixed KDA size plus the rows since the last page).
 *
 * Decoding trusts nothing: sizes are checked against the header, the header
 * against the model, and the checksum before any field is used.
 */
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define STATE_MAGIC "KLSTATE"	/* 8 bytes with the NUL */
#define STATE_VERSION 1
#define HEADER_SIZE 96
#define ELEM_F32 1
#define MAX_POSITIONS (INT64_C(1) << 32)

typedef struct state_header
{
	int			kind;
	uint8_t		fingerprint[16];
	int64_t		positions,
				from_pos,
				to_pos;
	int32_t		pending;
	uint32_t	n_kda,
				H,
				K,
				W,
				n_mla,
				mla_row;
	uint64_t	payload;
} state_header;

static void
put16(uint8_t *p, uint16_t v)
{
	memcpy(p, &v, 2);
}

static void
put32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4);
}

static void
put64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

static uint16_t
get16(const uint8_t *p)
{
	uint16_t	v;

	memcpy(&v, p, 2);
	return v;
}

static uint32_t
get32(const uint8_t *p)
{
	uint32_t	v;

	memcpy(&v, p, 4);
	return v;
}

static uint64_t
get64(const uint8_t *p)
{
	uint64_t	v;

	memcpy(&v, p, 8);
	return v;
}

static size_t
kda_floats(const kl_config *c)
{
	size_t		HK = (size_t) c->kda_heads * c->kda_head_dim;

	return HK * c->kda_head_dim + 3 * HK * c->conv_kernel;
}

/* Payload size of a part; 0 with *ok = false on overflow. */
static uint64_t
payload_size(const kl_config *c, int kind, int64_t from, int64_t to, bool *ok)
{
	uint64_t	rows = (uint64_t) (to - from);
	uint64_t	mla,
				kda;

	*ok = !__builtin_mul_overflow(rows, (uint64_t) kl_mla_row(c) * c->n_mla_layers * sizeof(float), &mla);
	kda = kind == KL_STATE_HEAD ? (uint64_t) kda_floats(c) * c->n_kda_layers * sizeof(float) : 0;
	if (*ok && mla + kda < mla)
		*ok = false;
	return *ok ? mla + kda : 0;
}

static void
write_header(uint8_t *b, const kl_seq *s, int kind, int64_t from, int64_t to, uint64_t payload)
{
	const kl_config *c = &s->model->cfg;

	memset(b, 0, HEADER_SIZE);
	memcpy(b, STATE_MAGIC, 8);
	put16(b + 8, STATE_VERSION);
	put16(b + 10, (uint16_t) kind);
	put32(b + 12, HEADER_SIZE);
	memcpy(b + 16, s->model->fingerprint, 16);
	put64(b + 32, (uint64_t) (kind == KL_STATE_HEAD ? s->pos : to));
	put64(b + 40, (uint64_t) from);
	put64(b + 48, (uint64_t) to);
	put32(b + 56, (uint32_t) (kind == KL_STATE_HEAD ? s->pending : -1));
	put32(b + 60, ELEM_F32);
	put32(b + 64, (uint32_t) c->n_kda_layers);
	put32(b + 68, (uint32_t) c->kda_heads);
	put32(b + 72, (uint32_t) c->kda_head_dim);
	put32(b + 76, (uint32_t) c->conv_kernel);
	put32(b + 80, (uint32_t) c->n_mla_layers);
	put32(b + 84, (uint32_t) kl_mla_row(c));
	put64(b + 88, payload);
}

/* copy MLA rows [from, to) of every MLA layer to dst (host) */
static uint8_t *
write_rows(const kl_seq *s, int64_t from, int64_t to, uint8_t *dst)
{
	const kl_config *c = &s->model->cfg;
	kl_backend *be = s->model->be;
	size_t		rowb = sizeof(float) * (size_t) kl_mla_row(c);

	for (int j = 0; j < c->n_mla_layers; j++)
		for (int64_t p = from; p < to;)
		{
			int64_t		in_page = KL_MLA_PAGE - p % KL_MLA_PAGE;
			int64_t		n = to - p < in_page ? to - p : in_page;

			if (be->ops->read_mla_rows)
				be->ops->read_mla_rows(be, (float *) dst, s->mla[j].pages[p / KL_MLA_PAGE], (int) (p % KL_MLA_PAGE),
									   (int) n, kl_mla_row(c));
			else
				be->ops->download(be, dst, (const uint8_t *) s->mla[j].pages[p / KL_MLA_PAGE] +
								  (size_t) (p % KL_MLA_PAGE) * rowb, (size_t) n * rowb);
			dst += (size_t) n * rowb;
			p += n;
		}
	return dst;
}

static int
save_part(const kl_seq *s, int kind, int64_t from, int64_t to, uint8_t **blob, size_t *len, kl_err *err)
{
	const kl_config *c = &s->model->cfg;
	kl_backend *be = s->model->be;
	bool		ok;
	uint64_t	payload;
	size_t		total;
	uint8_t    *b,
			   *p;

	*blob = NULL;
	*len = 0;
	if (from < 0 || from > to || to > s->pos)
		return kl_errc(err, KL_E_INVALID, "state positions [%lld, %lld) are outside the sequence's [0, %lld)",
					   (long long) from, (long long) to, (long long) s->pos);
	payload = payload_size(c, kind, from, to, &ok);
	if (!ok || payload > SIZE_MAX - HEADER_SIZE - 4)
		return kl_errc(err, KL_E_RESOURCES, "state too large");
	total = HEADER_SIZE + (size_t) payload + 4;
	b = kl_malloc(total, err);
	if (!b)
		return kl_err_prefix(err, "serializing a state of %zu bytes", total);
	write_header(b, s, kind, from, to, payload);
	p = b + HEADER_SIZE;
	if (kind == KL_STATE_HEAD)
	{
		size_t		HK = (size_t) c->kda_heads * c->kda_head_dim;
		size_t		sbytes = sizeof(float) * HK * c->kda_head_dim;
		size_t		cbytes = sizeof(float) * 3 * HK * c->conv_kernel;

		for (int i = 0; i < c->n_kda_layers; i++)
		{
			be->ops->download(be, p, s->kda_S[i], sbytes);
			p += sbytes;
			be->ops->download(be, p, s->kda_conv[i], cbytes);
			p += cbytes;
		}
	}
	p = write_rows(s, from, to, p);
	put32(p, kl_crc32c(b, (size_t) (p - b)));
	*blob = b;
	*len = total;
	return KL_OK;
}

int
kl_state_save(const kl_seq *s, int64_t from_pos, uint8_t **blob, size_t *len, kl_err *err)
{
	return save_part(s, KL_STATE_HEAD, from_pos, s->pos, blob, len, err);
}

int
kl_state_save_rows(const kl_seq *s, int64_t from_pos, int64_t to_pos, uint8_t **blob, size_t *len, kl_err *err)
{
	return save_part(s, KL_STATE_ROWS, from_pos, to_pos, blob, len, err);
}

/* Header and checksum, no model. */
static int
read_header(const uint8_t *b, size_t len, state_header *h, kl_err *err)
{
	uint16_t	version;
	uint64_t	payload;

	if (!b || len < HEADER_SIZE + 4)
		return kl_errc(err, KL_E_INVALID, "state is %zu bytes, shorter than any valid state (%d): truncated or not a "
					   "kimi_linear state", len, HEADER_SIZE + 4);
	if (memcmp(b, STATE_MAGIC, 8) != 0)
		return kl_errc(err, KL_E_INVALID, "not a kimi_linear state (bad magic bytes)");
	version = get16(b + 8);
	if (version != STATE_VERSION)
		return kl_errc(err, KL_E_UNSUPPORTED, "state format version %u is not supported (this build reads version %d)",
					   version, STATE_VERSION);
	if (get32(b + 12) != HEADER_SIZE)
		return kl_errc(err, KL_E_CORRUPT, "state header size %u is invalid (expected %d): the state is corrupt",
					   get32(b + 12), HEADER_SIZE);
	payload = get64(b + 88);
	if (payload != len - HEADER_SIZE - 4)
		return kl_errc(err, KL_E_CORRUPT, "state is %zu bytes but its header describes %llu: truncated or corrupt",
					   len, (unsigned long long) payload + HEADER_SIZE + 4);
	if (kl_crc32c(b, len - 4) != get32(b + len - 4))
		return kl_errc(err, KL_E_CORRUPT, "state checksum mismatch: the state is corrupt (altered or truncated)");
	h->kind = get16(b + 10);
	if (h->kind != KL_STATE_HEAD && h->kind != KL_STATE_ROWS)
		return kl_errc(err, KL_E_INVALID, "state part kind %d is invalid", h->kind);
	memcpy(h->fingerprint, b + 16, 16);
	h->positions = (int64_t) get64(b + 32);
	h->from_pos = (int64_t) get64(b + 40);
	h->to_pos = (int64_t) get64(b + 48);
	h->pending = (int32_t) get32(b + 56);
	if (get32(b + 60) != ELEM_F32)
		return kl_errc(err, KL_E_UNSUPPORTED, "state element type %u is not supported", get32(b + 60));
	h->n_kda = get32(b + 64);
	h->H = get32(b + 68);
	h->K = get32(b + 72);
	h->W = get32(b + 76);
	h->n_mla = get32(b + 80);
	h->mla_row = get32(b + 84);
	h->payload = payload;
	if (h->from_pos < 0 || h->from_pos > h->to_pos || h->to_pos > MAX_POSITIONS ||
		h->positions != h->to_pos)
		return kl_errc(err, KL_E_INVALID, "state positions are inconsistent (from %lld, to %lld, total %lld)",
					   (long long) h->from_pos, (long long) h->to_pos, (long long) h->positions);
	if (h->pending < -1)
		return kl_errc(err, KL_E_INVALID, "state pending token %d is invalid", h->pending);
	return KL_OK;
}

int
kl_state_info_read(const uint8_t *blob, size_t len, kl_state_info *info, kl_err *err)
{
	state_header h = {0};

	if (read_header(blob, len, &h, err) != KL_OK)
		return KL_FAIL;
	info->kind = h.kind;
	info->version = STATE_VERSION;
	memcpy(info->fingerprint, h.fingerprint, 16);
	info->positions = h.positions;
	info->from_pos = h.from_pos;
	info->to_pos = h.to_pos;
	info->pending = h.pending;
	return KL_OK;
}

/* Everything about a part that depends on the model. */
static int
check_part(const kl_seq *s, const state_header *h, kl_err *err)
{
	const kl_config *c = &s->model->cfg;
	bool		ok;
	uint64_t	want;

	if (memcmp(h->fingerprint, s->model->fingerprint, 16) != 0)
	{
		const kl_model *m = s->model;
		int			q = kl_model_quantization_of(m, h->fingerprint);
		const char *mine = kl_model_quantize(m);

		if (m->has_other_routing && memcmp(h->fingerprint, m->fingerprint_other_routing, 16) == 0)
			return kl_errc(err, KL_E_INVALID,
						   "the state was made by this model under the MoE routing rule \"%s\", and the "
						   "model is loaded with \"%s\": load it with moe_routing \"%s\" to resume this state",
						   c->bias_in_weights ? "select" : "reference", kl_model_moe_routing(m),
						   c->bias_in_weights ? "select" : "reference");
		if (q >= 0)
			return kl_errc(err, KL_E_INVALID, "the state was made by this model %s%s, but it is loaded %s%s: resume it "
						   "with the quantization that produced it (fingerprint mismatch)",
						   q ? "quantized at load to " : "without quantization", q ? kl_qtype_name(q) : "",
						   mine ? "quantized at load to " : "without quantization", mine ? mine : "");
		return kl_errc(err, KL_E_INVALID, "the state was made by a different model (fingerprint mismatch): resume it "
					   "with the model that produced it");
	}
	if (h->n_kda != (uint32_t) c->n_kda_layers || h->H != (uint32_t) c->kda_heads ||
		h->K != (uint32_t) c->kda_head_dim || h->W != (uint32_t) c->conv_kernel ||
		h->n_mla != (uint32_t) c->n_mla_layers || h->mla_row != (uint32_t) kl_mla_row(c))
		return kl_errc(err, KL_E_INVALID, "the state's dimensions do not match the model");
	want = payload_size(c, h->kind, h->from_pos, h->to_pos, &ok);
	if (!ok || want != h->payload)
		return kl_errc(err, KL_E_INVALID, "the state has %llu bytes of data where its header implies %llu",
					   (unsigned long long) h->payload, (unsigned long long) want);
	if (h->kind == KL_STATE_HEAD && h->pending >= c->vocab_size)
		return kl_errc(err, KL_E_INVALID, "the state's pending token %d is outside the vocabulary", h->pending);
	return KL_OK;
}

static void
read_rows(kl_seq *s, int64_t from, int64_t to, const uint8_t *src)
{
	const kl_config *c = &s->model->cfg;
	kl_backend *be = s->model->be;
	size_t		rowb = sizeof(float) * (size_t) kl_mla_row(c);

	for (int j = 0; j < c->n_mla_layers; j++)
		for (int64_t p = from; p < to;)
		{
			int64_t		in_page = KL_MLA_PAGE - p % KL_MLA_PAGE;
			int64_t		n = to - p < in_page ? to - p : in_page;

			if (be->ops->write_mla_rows)
				be->ops->write_mla_rows(be, s->mla[j].pages[p / KL_MLA_PAGE], (int) (p % KL_MLA_PAGE),
										(const float *) src, (int) n, kl_mla_row(c));
			else
				be->ops->upload(be, (uint8_t *) s->mla[j].pages[p / KL_MLA_PAGE] + (size_t) (p % KL_MLA_PAGE) * rowb,
								src, (size_t) n * rowb);
			src += (size_t) n * rowb;
			p += n;
		}
}

/* forward.c's page reservation, shared */
static int
reserve_pages(kl_seq *s, int64_t upto, kl_err *err)
{
	const kl_config *c = &s->model->cfg;
	kl_backend *be = s->model->be;
	int64_t		need = (upto + KL_MLA_PAGE - 1) / KL_MLA_PAGE;
	size_t		page_bytes = kl_mla_page_bytes(be, c);

	for (int j = 0; j < c->n_mla_layers; j++)
	{
		kl_mla_cache *mc = &s->mla[j];

		if (need > mc->cap_pages)
		{
			float	  **np = realloc(mc->pages, sizeof(float *) * (size_t) need);

			if (!np)
				return kl_errc(err, KL_E_RESOURCES, "out of memory restoring a state");
			mc->pages = np;
			mc->cap_pages = (int) need;
		}
		while (mc->n_pages < need)
		{
			float	   *p = be->ops->alloc(be, page_bytes);

			if (!p)
				return kl_errc(err, KL_E_RESOURCES, "out of %s memory restoring a state of %lld positions",
							   be->ops->name, (long long) upto);
			mc->pages[mc->n_pages++] = p;
		}
	}
	return KL_OK;
}

int
kl_state_load(kl_seq *s, const kl_blob *parts, int n_parts, kl_err *err)
{
	const kl_config *c = &s->model->cfg;
	kl_backend *be = s->model->be;
	state_header *hs;
	int64_t		next = 0;

	kl_seq_reset(s);
	if (n_parts < 1 || !parts)
		return kl_errc(err, KL_E_INVALID, "no state given");
	hs = kl_calloc((size_t) n_parts, sizeof(state_header), err);
	if (!hs)
		return KL_FAIL;
	for (int i = 0; i < n_parts; i++)
	{
		if (read_header(parts[i].data, parts[i].len, &hs[i], err) != KL_OK ||
			check_part(s, &hs[i], err) != KL_OK)
		{
			if (n_parts > 1)
				kl_err_prefix(err, "state part %d of %d", i + 1, n_parts);
			goto fail;
		}
		if ((i < n_parts - 1) != (hs[i].kind == KL_STATE_ROWS))
		{
			kl_errc(err, KL_E_INVALID, "state parts must be pages of rows followed by one head; part %d is a %s",
					i + 1, hs[i].kind == KL_STATE_HEAD ? "head" : "rows page");
			goto fail;
		}
		if (hs[i].from_pos != next)
		{
			kl_errc(err, KL_E_INVALID, "state part %d starts at position %lld but the previous parts end at %lld "
					"(a page is missing or out of order)", i + 1, (long long) hs[i].from_pos, (long long) next);
			goto fail;
		}
		next = hs[i].to_pos;
	}
	if (reserve_pages(s, next, err) != KL_OK)
		goto fail;
	for (int i = 0; i < n_parts; i++)
	{
		const uint8_t *p = parts[i].data + HEADER_SIZE;

		if (hs[i].kind == KL_STATE_HEAD)
		{
			size_t		HK = (size_t) c->kda_heads * c->kda_head_dim;
			size_t		sbytes = sizeof(float) * HK * c->kda_head_dim;
			size_t		cbytes = sizeof(float) * 3 * HK * c->conv_kernel;

			for (int l = 0; l < c->n_kda_layers; l++)
			{
				be->ops->upload(be, s->kda_S[l], p, sbytes);
				p += sbytes;
				be->ops->upload(be, s->kda_conv[l], p, cbytes);
				p += cbytes;
			}
			s->pending = hs[i].pending;
		}
		read_rows(s, hs[i].from_pos, hs[i].to_pos, p);
	}
	s->pos = next;
	free(hs);
	return KL_OK;
fail:
	free(hs);
	kl_seq_reset(s);
	return KL_FAIL;
}
