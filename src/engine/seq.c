/*
 * seq.c — a sequence's state in backend memory (struct kl_seq in backend.h):
 * per KDA layer the recurrent state S [H, K, V] and the conv tails
 * [3, H*K, W]; per MLA layer the paged latent cache.
 */
#include <stdlib.h>
#include <string.h>

#include "model.h"

static size_t
kda_state_floats(const kl_config *c)
{
	return (size_t) c->kda_heads * c->kda_head_dim * c->kda_head_dim;
}

static size_t
kda_conv_floats(const kl_config *c)
{
	return (size_t) 3 * c->kda_heads * c->kda_head_dim * c->conv_kernel;
}

int
kl_seq_new(const kl_model *m, kl_seq **out, kl_err *err)
{
	const kl_config *c = &m->cfg;
	kl_backend *be = m->be;
	kl_seq	   *s;

	*out = NULL;
	s = kl_calloc(1, sizeof(kl_seq), err);
	if (!s)
		return KL_FAIL;
	s->model = m;
	s->pending = -1;
	s->kda_S = kl_calloc((size_t) c->n_kda_layers + 1, sizeof(float *), err);
	s->kda_conv = kl_calloc((size_t) c->n_kda_layers + 1, sizeof(float *), err);
	s->mla = kl_calloc((size_t) c->n_mla_layers + 1, sizeof(kl_mla_cache), err);
	if (!s->kda_S || !s->kda_conv || !s->mla)
		goto fail;
	for (int i = 0; i < c->n_kda_layers; i++)
	{
		s->kda_S[i] = be->ops->alloc(be, sizeof(float) * kda_state_floats(c));
		s->kda_conv[i] = be->ops->alloc(be, sizeof(float) * kda_conv_floats(c));
		if (!s->kda_S[i] || !s->kda_conv[i])
		{
			kl_errc(err, KL_E_RESOURCES, "out of %s memory for a sequence's KDA state", be->ops->name);
			goto fail;
		}
	}
	*out = s;
	return KL_OK;
fail:
	kl_seq_free(s);
	return KL_FAIL;
}

static void
free_mla_pages(kl_seq *s, bool keep_array)
{
	kl_backend *be = s->model->be;

	for (int j = 0; j < s->model->cfg.n_mla_layers; j++)
	{
		for (int p = 0; p < s->mla[j].n_pages; p++)
			be->ops->release(be, s->mla[j].pages[p]);
		s->mla[j].n_pages = 0;
		if (!keep_array)
		{
			free(s->mla[j].pages);
			s->mla[j].pages = NULL;
			s->mla[j].cap_pages = 0;
		}
	}
}

void
kl_seq_free(kl_seq *s)
{
	kl_backend *be;

	if (!s)
		return;
	be = s->model->be;
	if (s->mla)
		free_mla_pages(s, false);
	for (int i = 0; i < s->model->cfg.n_kda_layers; i++)
	{
		if (s->kda_S && s->kda_S[i])
			be->ops->release(be, s->kda_S[i]);
		if (s->kda_conv && s->kda_conv[i])
			be->ops->release(be, s->kda_conv[i]);
	}
	free(s->kda_S);
	free(s->kda_conv);
	free(s->mla);
	free(s);
}

void
kl_seq_reset(kl_seq *s)
{
	const kl_config *c = &s->model->cfg;
	kl_backend *be = s->model->be;
	float	   *zero;
	size_t		n = kda_state_floats(c) > kda_conv_floats(c) ? kda_state_floats(c) : kda_conv_floats(c);

	/* zero through upload so that device memory is cleared too */
	zero = calloc(n ? n : 1, sizeof(float));
	for (int i = 0; i < c->n_kda_layers; i++)
	{
		if (zero)
		{
			be->ops->upload(be, s->kda_S[i], zero, sizeof(float) * kda_state_floats(c));
			be->ops->upload(be, s->kda_conv[i], zero, sizeof(float) * kda_conv_floats(c));
		}
	}
	free(zero);
	free_mla_pages(s, true);
	s->pos = 0;
	s->pending = -1;
}

int
kl_seq_clone(const kl_seq *src, kl_seq **out, kl_err *err)
{
	const kl_config *c = &src->model->cfg;
	kl_backend *be = src->model->be;
	kl_seq	   *s;
	size_t		page_bytes = kl_mla_page_bytes(be, c);

	if (kl_seq_new(src->model, &s, err) != KL_OK)
		return KL_FAIL;
	for (int i = 0; i < c->n_kda_layers; i++)
	{
		be->ops->copy(be, s->kda_S[i], src->kda_S[i], sizeof(float) * kda_state_floats(c));
		be->ops->copy(be, s->kda_conv[i], src->kda_conv[i], sizeof(float) * kda_conv_floats(c));
	}
	for (int j = 0; j < c->n_mla_layers; j++)
	{
		const kl_mla_cache *sm = &src->mla[j];
		kl_mla_cache *dm = &s->mla[j];

		if (sm->n_pages == 0)
			continue;
		dm->pages = kl_calloc((size_t) sm->n_pages, sizeof(float *), err);
		if (!dm->pages)
			goto fail;
		dm->cap_pages = sm->n_pages;
		for (int p = 0; p < sm->n_pages; p++)
		{
			dm->pages[p] = be->ops->alloc(be, page_bytes);
			if (!dm->pages[p])
			{
				kl_errc(err, KL_E_RESOURCES, "out of %s memory copying a sequence", be->ops->name);
				goto fail;
			}
			dm->n_pages++;
			be->ops->copy(be, dm->pages[p], sm->pages[p], page_bytes);
		}
	}
	s->pos = src->pos;
	s->pending = src->pending;
	*out = s;
	return KL_OK;
fail:
	kl_seq_free(s);
	return KL_FAIL;
}

/* what one allocation of n bytes costs at least (backends align to 64 bytes) */
static size_t
aligned_bytes(size_t n)
{
	return (n + 63) & ~(size_t) 63;
}

size_t
kl_seq_bytes(const kl_seq *s)
{
	const kl_config *c = &s->model->cfg;
	size_t		page_bytes = aligned_bytes(kl_mla_page_bytes(s->model->be, c));
	size_t		n = sizeof(kl_seq);

	n += 2 * ((size_t) c->n_kda_layers + 1) * sizeof(float *);
	n += ((size_t) c->n_mla_layers + 1) * sizeof(kl_mla_cache);
	n += (size_t) c->n_kda_layers * (aligned_bytes(sizeof(float) * kda_state_floats(c)) +
									 aligned_bytes(sizeof(float) * kda_conv_floats(c)));
	for (int j = 0; j < c->n_mla_layers; j++)
		n += (size_t) s->mla[j].cap_pages * sizeof(float *) + (size_t) s->mla[j].n_pages * page_bytes;
	return n;
}

int64_t
kl_seq_positions(const kl_seq *s)
{
	return s->pos;
}

int32_t
kl_seq_pending(const kl_seq *s)
{
	return s->pending;
}

void
kl_seq_set_pending(kl_seq *s, int32_t id)
{
	s->pending = id < 0 ? -1 : id;
}
