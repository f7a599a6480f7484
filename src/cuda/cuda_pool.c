/*
 * cuda_pool.c — device memory for weights, states, cache pages and
 * activations, carved from large slabs by size class.
 *
 * Why: cudaMalloc rounds every allocation up to its page granularity
 * (2 MiB), so the 48B model's 20,000 expert matrices of 4.5 MiB took 6 MiB
 * each (30 GB lost on a 98 GB model) and a 2.25 MiB MLA cache page took
 * 4 MiB; and cudaFree waits for the whole device.  Here objects of one size
 * (rounded to 256 bytes) are cut from slabs of up to 64 MB and recycled
 * through that size's free list; a released object is reused by a later
 * allocation on the same stream, so no wait is needed.  Objects of 64 MB or
 * more get their own cudaMalloc.  Slabs go back to the driver when the
 * backend is destroyed.  A host hash table maps each object to its class.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define SLAB_MAX ((size_t) 64 << 20)
#define SLAB_MIN ((size_t) 2 << 20)
#define DIRECT (-1)				/* class of an object with its own cudaMalloc */

typedef struct pool_class
{
	size_t		size;
	void	  **free;			/* recycled objects */
	int			n_free,
				cap_free;
	char	   *slab;			/* the slab being carved */
	size_t		slab_left;		/* objects left in it */
} pool_class;

struct cuda_pool
{
	pool_class *cls;
	int			n_cls,
				cap_cls;
	void	  **slabs;			/* every slab, for destroy */
	int			n_slabs,
				cap_slabs;
	/* open addressing: object -> class (DIRECT or index) */
	uintptr_t  *keys;
	int		   *vals;
	size_t		cap,
				used;
};

static size_t
hash_ptr(uintptr_t p, size_t cap)
{
	return (size_t) ((p >> 8) * 0x9e3779b97f4a7c15ull) & (cap - 1);
}

static bool
map_grow(cuda_pool *P)
{
	size_t		ncap = P->cap ? P->cap * 2 : 4096;
	uintptr_t  *nk = calloc(ncap, sizeof(uintptr_t));
	int		   *nv = malloc(ncap * sizeof(int));

	if (!nk || !nv)
	{
		free(nk);
		free(nv);
		return false;
	}
	for (size_t i = 0; i < P->cap; i++)
		if (P->keys[i] > 1)
		{
			size_t		h = hash_ptr(P->keys[i], ncap);

			while (nk[h])
				h = (h + 1) & (ncap - 1);
			nk[h] = P->keys[i];
			nv[h] = P->vals[i];
		}
	free(P->keys);
	free(P->vals);
	P->keys = nk;
	P->vals = nv;
	P->cap = ncap;
	/* tombstones (1) are dropped by the rehash */
	P->used = 0;
	for (size_t i = 0; i < ncap; i++)
		if (nk[i])
			P->used++;
	return true;
}

static bool
map_put(cuda_pool *P, void *p, int cls)
{
	size_t		h;

	if ((P->used + 1) * 2 > P->cap && !map_grow(P))
		return false;
	h = hash_ptr((uintptr_t) p, P->cap);
	while (P->keys[h] > 1)
		h = (h + 1) & (P->cap - 1);
	if (P->keys[h] == 0)
		P->used++;
	P->keys[h] = (uintptr_t) p;
	P->vals[h] = cls;
	return true;
}

/* the object's class, removing it from the map; -2 when unknown */
static int
map_take(cuda_pool *P, void *p)
{
	size_t		h;

	if (!P->cap)
		return -2;
	h = hash_ptr((uintptr_t) p, P->cap);
	while (P->keys[h])
	{
		if (P->keys[h] == (uintptr_t) p)
		{
			P->keys[h] = 1;		/* tombstone */
			return P->vals[h];
		}
		h = (h + 1) & (P->cap - 1);
	}
	return -2;
}

static int
class_of(cuda_pool *P, size_t size)
{
	for (int i = 0; i < P->n_cls; i++)
		if (P->cls[i].size == size)
			return i;
	if (P->n_cls == P->cap_cls)
	{
		int			cap = P->cap_cls ? P->cap_cls * 2 : 32;
		pool_class *nc = realloc(P->cls, sizeof(pool_class) * (size_t) cap);

		if (!nc)
			return -1;
		P->cls = nc;
		P->cap_cls = cap;
	}
	memset(&P->cls[P->n_cls], 0, sizeof(pool_class));
	P->cls[P->n_cls].size = size;
	return P->n_cls++;
}

/* An object of `bytes` (contents undefined); NULL when the GPU is full. */
void *
cuda_pool_alloc(kl_backend *be, size_t bytes)
{
	cuda_state *cs = CS(be);
	cuda_pool  *P = cs->pool;
	size_t		size = ((bytes ? bytes : 1) + 255) & ~(size_t) 255;
	void	   *p = NULL;
	int			c;
	pool_class *k;

	if (!P && !(P = cs->pool = calloc(1, sizeof(cuda_pool))))
		return NULL;
	if (size >= SLAB_MAX)
	{
		if (cudaMalloc(&p, size) != cudaSuccess)
		{
			cudaGetLastError();
			return NULL;
		}
		if (!map_put(P, p, DIRECT))
		{
			cudaFree(p);
			return NULL;
		}
		return p;
	}
	if ((c = class_of(P, size)) < 0)
		return NULL;
	k = &P->cls[c];
	if (k->n_free > 0)
		p = k->free[--k->n_free];
	else
	{
		if (k->slab_left == 0)
		{
			size_t		slab = size * 16;
			void	   *s = NULL;

			slab = slab > SLAB_MAX ? SLAB_MAX : slab < SLAB_MIN ? SLAB_MIN : slab;
			slab = slab / size * size;
			if (P->n_slabs == P->cap_slabs)
			{
				int			cap = P->cap_slabs ? P->cap_slabs * 2 : 64;
				void	  **ns = realloc(P->slabs, sizeof(void *) * (size_t) cap);

				if (!ns)
					return NULL;
				P->slabs = ns;
				P->cap_slabs = cap;
			}
			if (cudaMalloc(&s, slab) != cudaSuccess)
			{
				cudaGetLastError();
				return NULL;
			}
			P->slabs[P->n_slabs++] = s;
			k->slab = s;
			k->slab_left = slab / size;
		}
		p = k->slab;
		k->slab += size;
		k->slab_left--;
	}
	if (!map_put(P, p, c))
	{
		/* keep it for later rather than lose it */
		if (k->n_free < k->cap_free)
			k->free[k->n_free++] = p;
		return NULL;
	}
	return p;
}

/* Give an object back (to its class, or to the driver if it had its own allocation). */
void
cuda_pool_free(kl_backend *be, void *p)
{
	cuda_pool  *P = CS(be)->pool;
	int			c;
	pool_class *k;

	if (!p || !P)
		return;
	c = map_take(P, p);
	if (c == -2)
		return;
	if (c == DIRECT)
	{
		cudaFree(p);
		return;
	}
	k = &P->cls[c];
	if (k->n_free == k->cap_free)
	{
		int			cap = k->cap_free ? k->cap_free * 2 : 64;
		void	  **nf = realloc(k->free, sizeof(void *) * (size_t) cap);

		if (!nf)
			return;				/* lost until destroy: better than a crash */
		k->free = nf;
		k->cap_free = cap;
	}
	k->free[k->n_free++] = p;
}

void
cuda_pool_destroy(kl_backend *be)
{
	cuda_pool  *P = CS(be)->pool;

	if (!P)
		return;
	for (size_t i = 0; i < P->cap; i++)
		if (P->keys[i] > 1 && P->vals[i] == DIRECT)
			cudaFree((void *) P->keys[i]);
	for (int i = 0; i < P->n_slabs; i++)
		cudaFree(P->slabs[i]);
	for (int i = 0; i < P->n_cls; i++)
		free(P->cls[i].free);
	free(P->cls);
	free(P->slabs);
	free(P->keys);
	free(P->vals);
	free(P);
	CS(be)->pool = NULL;
}
