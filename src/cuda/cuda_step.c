/*
 * cuda_step.c — what happens once per forward step: the step's metadata goes
 * to the device in one copy, and decode steps run as CUDA graphs.
 *
 * Metadata (begin_step): row offsets, positions, the row -> sequence map, the
 * MLA form of each sequence, and per sequence the device pointers of its KDA
 * states and MLA cache pages (the page table).  The kernels read all of it
 * from device memory, so a kernel sequence recorded for one decode step is
 * valid for every later step of the same shape, whatever the positions and
 * whichever sequences take part.
 *
 * Graphs: a decode step (every sequence feeding one token) of a given shape
 * (tokens, sequences, page-table capacity, the MLA attention's key ranges
 * (cuda_mla_plan), the rows it computes logits of, and the kl_ctx, known by
 * its residual buffer) runs eagerly the first time, is captured into a graph the
 * second time, and from then on its ops are only traced while the graph is
 * launched once at end_step: hundreds of small launches become one.  The
 * trace (a hash of every op and its arguments) must equal the captured one,
 * which guards against replaying a graph for a different kernel sequence.
 * KL_CUDA_GRAPHS=0 turns graphs off (checked at every step).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define EXPAND_MIN_ROWS 64		/* a sequence feeding this many rows takes the expanded MLA form */
#define GRAPH_MAX_TOKENS 64		/* decode steps of at most this many sequences use graphs */

static uint64_t
mix(uint64_t h, uint64_t v)
{
	h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
	return h * 0xff51afd7ed558ccdull;
}

bool
cuda_step_skip(kl_backend *be, int op, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d)
{
	cuda_state *cs = CS(be);

	if (cs->mode == GM_PENDING)
		cs->mode = GM_EAGER;	/* embed was not the first op: no graph this time */
	if (op != OP_PREFETCH)
		cs->prefetch_used = 0;	/* a new window of prefetch hints starts after this op */
	/* a bf16 twin (cuda_state.tw) lives through products (cuda_matmul_raw
	 * drops it when one writes over its rows), prefetch hints and the MoE op
	 * of its rows (b: the op's input, which it does not write); any other op
	 * may write its rows, or is a norm or SwiGLU that writes a new one */
	if (op == OP_MOE ? (const float *) b != cs->tw.src : op != OP_MATMUL && op != OP_PREFETCH)
		cs->tw.valid = false;
	/* (precision fp8's kept E4M3 rows of one input: the same rule) */
	if (op == OP_MOE ? (const float *) b != cs->f8.src : op != OP_MATMUL && op != OP_PREFETCH)
		cs->f8.valid = false;
	if (cs->mode == GM_CAPTURE || cs->mode == GM_REPLAY)
		cs->trace = mix(mix(mix(mix(mix(cs->trace, (uint64_t) op), a), b), c), d);
	if (cs->mode == GM_REPLAY || be->failed)
		return true;
	if (op != OP_RMSNORM && op != OP_ADD)
		cuda_flush_add(be);
	/* bf16 product results (cuda_state.r16) are the KDA op's to read; any
	 * other op but a product (which checks its own rows) or a hint gets
	 * them back in fp32 first, so it never reads a stale y */
	if (cs->n_r16 > 0 && op != OP_KDA && op != OP_MATMUL && op != OP_PREFETCH)
		cuda_r16_flush(be);
	return false;
}

/* ------------------------------------------------------------------ graphs */

static void
drop_graph(cuda_graph *g)
{
	if (g->exec)
		cudaGraphExecDestroy(g->exec);
	memset(g, 0, sizeof(*g));
}

void
cuda_graphs_destroy(kl_backend *be)
{
	cuda_state *cs = CS(be);

	for (int i = 0; i < CUDA_MAX_GRAPHS; i++)
		drop_graph(&cs->graphs[i]);
}

/* a kl_ctx is being freed (its residual buffer released): its graphs go */
void
cuda_graphs_forget_buffer(kl_backend *be, const void *p)
{
	cuda_state *cs = CS(be);

	for (int i = 0; i < CUDA_MAX_GRAPHS; i++)
		if (cs->graphs[i].x == p && cs->graphs[i].n_tokens > 0)
			drop_graph(&cs->graphs[i]);
}

static int
find_graph(cuda_state *cs, const float *x)
{
	for (int i = 0; i < CUDA_MAX_GRAPHS; i++)
	{
		cuda_graph *g = &cs->graphs[i];

		if (g->n_tokens == cs->n_tokens && g->n_seqs == cs->n_seqs && g->page_cap == cs->page_cap && g->x == x &&
			g->logit_key == cs->logit_key && g->mla_split == cs->mla_split)
			return i;
	}
	return -1;
}

static int
new_graph_slot(cuda_state *cs, const float *x)
{
	int			best = 0;

	for (int i = 0; i < CUDA_MAX_GRAPHS; i++)
	{
		if (cs->graphs[i].n_tokens == 0)
		{
			best = i;
			break;
		}
		if (cs->graphs[i].last_use < cs->graphs[best].last_use)
			best = i;
	}
	drop_graph(&cs->graphs[best]);
	cs->graphs[best].n_tokens = cs->n_tokens;
	cs->graphs[best].n_seqs = cs->n_seqs;
	cs->graphs[best].page_cap = cs->page_cap;
	cs->graphs[best].mla_split = cs->mla_split;
	cs->graphs[best].x = x;
	cs->graphs[best].logit_key = cs->logit_key;
	cs->graphs[best].last_use = ++cs->clock;
	return best;
}

/* ------------------------------------------------------------------ begin / end */

/* KL_CUDA_GRAPHS=0 (read at every step, so a benchmark can switch it) */
static bool
graphs_off_by_env(void)
{
	const char *g = getenv("KL_CUDA_GRAPHS");

	return g && strcmp(g, "0") == 0;
}

static size_t
align16(size_t n)
{
	return (n + 15) & ~(size_t) 15;
}

int
cuda_begin_step(kl_backend *be, const kl_step *st, kl_err *err)
{
	cuda_state *cs = CS(be);
	const kl_model *m = st->seqs[0]->model;
	const kl_config *cfg = &m->cfg;
	int			ns = st->n_seqs,
				nt = st->n_tokens;
	int			nk = cfg->n_kda_layers,
				nm = cfg->n_mla_layers;
	int			maxp = 1,
				cap = 4;
	size_t		o_row0,
				o_pos0,
				o_rowseq,
				o_abs,
				o_S,
				o_conv,
				o_pages,
				total;
	uint8_t    *h;
	bool		decode = nt <= GRAPH_MAX_TOKENS;
	bool		attend_ok = cs->mla_mma ||
		kk_mla_attend_supported(cfg->mla_heads, cfg->kv_lora_rank, cfg->qk_rope_dim);

	if (be->failed)
		return cuda_take_failure(be, err, NULL);
	cuda_abort_capture(be);		/* a step that failed half-way may have left one open */
	cs->pend = false;			/* (and an add or a combine held back) */
	cs->pf_pending = false;
	cs->pf_wait_for = NULL;
	cs->pend_moe = false;
	cuda_acts_invalid(cs);		/* (and a bf16 twin) */
	cs->tw_scope = false;
	cuda_r16_forget(cs);		/* (and bf16 product results: end_step widened any left) */
	cs->step_prefill = nt != ns;
	cs->mode = GM_EAGER;
	cudaSetDevice(cs->device);
	for (int s = 0; s < ns; s++)
		for (int j = 0; j < nm; j++)
			maxp = st->seqs[s]->mla[j].n_pages > maxp ? st->seqs[s]->mla[j].n_pages : maxp;
	while (cap < maxp)
		cap *= 2;

	o_row0 = 0;
	o_pos0 = align16(o_row0 + sizeof(int) * (size_t) (ns + 1));
	o_rowseq = align16(o_pos0 + sizeof(int64_t) * (size_t) ns);
	o_abs = align16(o_rowseq + sizeof(int) * (size_t) nt);
	o_S = align16(o_abs + sizeof(int) * (size_t) ns);
	o_conv = align16(o_S + sizeof(float *) * (size_t) nk * ns);
	o_pages = align16(o_conv + sizeof(float *) * (size_t) nk * ns);
	total = align16(o_pages + sizeof(float *) * (size_t) nm * ns * cap);

	if (total > cs->meta_cap || ns > cs->h_absorbed_cap)
	{
		/* graphs read the metadata at its old address: they go with it */
		cudaStreamSynchronize(cs->stream);
		cuda_graphs_destroy(be);
		if (total > cs->meta_cap)
		{
			size_t		ncap = total * 2 + 4096;

			cudaFreeHost(cs->meta_host);
			cudaFree(cs->meta_dev);
			cs->meta_host = NULL;
			cs->meta_dev = NULL;
			cs->meta_cap = 0;
			if (!cuda_ok(be, cudaMallocHost(&cs->meta_host, ncap), "cudaMallocHost (step metadata)") ||
				!cuda_ok(be, cudaMalloc(&cs->meta_dev, ncap), "cudaMalloc (step metadata)"))
				goto fail;
			cs->meta_cap = ncap;
		}
		if (ns > cs->h_absorbed_cap)
		{
			int		   *na = realloc(cs->h_absorbed, sizeof(int) * (size_t) ns * 2);

			if (!na)
			{
				cuda_fail(be, KL_E_RESOURCES, "out of memory");
				goto fail;
			}
			cs->h_absorbed = na;
			cs->h_absorbed_cap = ns * 2;
		}
	}
	/* the previous step's copy has read the staging buffer */
	if (!cuda_ok(be, cudaEventSynchronize(cs->meta_done), "step metadata"))
		goto fail;

	h = cs->meta_host;
	memset(h, 0, total);
	cs->any_absorbed = cs->any_expanded = false;
	for (int s = 0; s < ns; s++)
	{
		int			n = st->row0[s + 1] - st->row0[s];

		((int *) (h + o_row0))[s] = st->row0[s];
		((int64_t *) (h + o_pos0))[s] = st->pos0[s];
		for (int r = st->row0[s]; r < st->row0[s + 1]; r++)
			((int *) (h + o_rowseq))[r] = s;
		cs->h_absorbed[s] = attend_ok && n < EXPAND_MIN_ROWS;
		((int *) (h + o_abs))[s] = cs->h_absorbed[s];
		if (cs->h_absorbed[s])
			cs->any_absorbed = true;
		else
			cs->any_expanded = true;
		for (int i = 0; i < nk; i++)
		{
			((float **) (h + o_S))[(size_t) i * ns + s] = st->seqs[s]->kda_S[i];
			((float **) (h + o_conv))[(size_t) i * ns + s] = st->seqs[s]->kda_conv[i];
		}
		for (int j = 0; j < nm; j++)
			for (int p = 0; p < st->seqs[s]->mla[j].n_pages; p++)
				((float **) (h + o_pages))[((size_t) j * ns + s) * cap + p] = st->seqs[s]->mla[j].pages[p];
		if (n != 1)
			decode = false;
	}
	((int *) (h + o_row0))[ns] = st->row0[ns];
	if (!cuda_ok(be, cudaMemcpyAsync(cs->meta_dev, cs->meta_host, total, cudaMemcpyHostToDevice, cs->stream),
				 "step metadata upload") ||
		!cuda_ok(be, cudaEventRecord(cs->meta_done, cs->stream), "step metadata"))
		goto fail;

	cs->n_seqs = ns;
	cs->n_tokens = nt;
	cs->page_cap = cap;
	cuda_mla_plan(cs, (int64_t) maxp * KL_MLA_PAGE, (int64_t) cap * KL_MLA_PAGE, nt);
	cs->logit_key = st->logit_key;
	cs->d_row0 = (int *) ((uint8_t *) cs->meta_dev + o_row0);
	cs->d_pos0 = (int64_t *) ((uint8_t *) cs->meta_dev + o_pos0);
	cs->d_row_seq = (int *) ((uint8_t *) cs->meta_dev + o_rowseq);
	cs->d_absorbed = (int *) ((uint8_t *) cs->meta_dev + o_abs);
	cs->d_kda_S = (float **) ((uint8_t *) cs->meta_dev + o_S);
	cs->d_kda_conv = (float **) ((uint8_t *) cs->meta_dev + o_conv);
	cs->d_pages = (float **) ((uint8_t *) cs->meta_dev + o_pages);

	if (cs->graphs_enabled && decode && !st->force_recurrent && !graphs_off_by_env())
		cs->mode = GM_PENDING;
	return KL_OK;
fail:
	return cuda_take_failure(be, err, NULL);
}

void
cuda_end_step(kl_backend *be, const kl_step *st)
{
	cuda_state *cs = CS(be);
	cuda_graph *g = cs->cur >= 0 && cs->cur < CUDA_MAX_GRAPHS ? &cs->graphs[cs->cur] : NULL;
	cuda_graph_mode mode;

	(void) st;
	cuda_flush_add(be);			/* the step's last residual add belongs to it */
	cuda_acts_invalid(cs);
	cuda_r16_flush(be);			/* (bf16 product results no op read: their y in fp32, as without them) */
	cuda_prefetch_join(be);
	mode = cs->mode;
	cs->mode = GM_EAGER;
	if (mode == GM_CAPTURE)
	{
		cudaGraph_t graph = NULL;
		cudaError_t e = cudaStreamEndCapture(cs->stream, &graph);

		if (e != cudaSuccess || be->failed || !graph)
		{
			if (graph)
				cudaGraphDestroy(graph);
			cudaGetLastError();
			cuda_fail(be, KL_E_INTERNAL, "capturing the decode step as a CUDA graph failed: %s (set KL_CUDA_GRAPHS=0 to run "
					  "without graphs)", cudaGetErrorString(e));
			cs->graphs_enabled = false;
			drop_graph(g);
			return;
		}
		{
			/* count its kernels (benchmarks report kernels per step) */
			size_t		nn = 0;
			cudaGraphNode_t *nodes;

			g->kernels = 0;
			if (cudaGraphGetNodes(graph, NULL, &nn) == cudaSuccess && nn > 0 &&
				(nodes = malloc(sizeof(cudaGraphNode_t) * nn)) != NULL)
			{
				if (cudaGraphGetNodes(graph, nodes, &nn) == cudaSuccess)
					for (size_t i = 0; i < nn; i++)
					{
						enum cudaGraphNodeType t;

						if (cudaGraphNodeGetType(nodes[i], &t) == cudaSuccess && t == cudaGraphNodeTypeKernel)
							g->kernels++;
					}
				free(nodes);
			}
			cudaGetLastError();
		}
		e = cudaGraphInstantiate(&g->exec, graph, 0);
		cudaGraphDestroy(graph);
		if (!cuda_ok(be, e, "cudaGraphInstantiate"))
		{
			g->exec = NULL;
			cs->graphs_enabled = false;
			return;
		}
		g->trace = cs->trace;
	}
	else if (mode == GM_REPLAY)
	{
		if (cs->trace != g->trace)
		{
			cuda_fail(be, KL_E_INTERNAL, "internal error: a decode step differs from its recorded CUDA graph (set "
					  "KL_CUDA_GRAPHS=0 to run without graphs, and please report this)");
			cs->graphs_enabled = false;
			cuda_graphs_destroy(be);
			return;
		}
	}
	else
		return;
	g->last_use = ++cs->clock;
	be->step_kernels = g->kernels;
	if (cuda_ok(be, cudaGraphLaunch(g->exec, cs->stream), "cudaGraphLaunch"))
		cuda_ok(be, cudaEventRecord(cs->ids_done, cs->stream), "graph launch");
}

/* ------------------------------------------------------------------ embed: the step's first op */

void
cuda_embed(kl_backend *be, float *x, const kl_weight *E, const int32_t *ids, int n)
{
	cuda_state *cs = CS(be);

	if (be->failed)
		return;
	if (cuda_weight_quantized(E))
	{
		/* (the loader refuses quantized embeddings; rows are read as bf16 or fp32) */
		cuda_fail(be, KL_E_UNSUPPORTED, "a quantized embedding matrix is not supported on the GPU");
		return;
	}
	if (n > cs->ids_cap)
	{
		int			cap = n * 2 > 256 ? n * 2 : 256;

		/* graphs copy from the old staging buffer */
		cudaStreamSynchronize(cs->stream);
		cuda_graphs_destroy(be);
		cudaFreeHost(cs->ids_host);
		cudaFree(cs->ids_dev);
		cs->ids_host = NULL;
		cs->ids_dev = NULL;
		cs->ids_cap = 0;
		if (!cuda_ok(be, cudaMallocHost((void **) &cs->ids_host, sizeof(int32_t) * (size_t) cap), "cudaMallocHost (ids)") ||
			!cuda_ok(be, cudaMalloc((void **) &cs->ids_dev, sizeof(int32_t) * (size_t) cap), "cudaMalloc (ids)"))
			return;
		cs->ids_cap = cap;
	}
	/* the previous copy out of the staging buffer is done */
	if (!cuda_ok(be, cudaEventSynchronize(cs->ids_done), "embed"))
		return;
	memcpy(cs->ids_host, ids, sizeof(int32_t) * (size_t) n);
	if (cs->mode == GM_PENDING)
	{
		int			i = find_graph(cs, x);

		cs->trace = 0;
		if (i >= 0 && cs->graphs[i].exec)
		{
			cs->mode = GM_REPLAY;
			cs->cur = i;
		}
		else if (i >= 0)
		{
			/* second time this shape: record it */
			cs->cur = i;
			if (cuda_ok(be, cudaStreamBeginCapture(cs->stream, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture"))
				cs->mode = GM_CAPTURE;
			else
			{
				cs->mode = GM_EAGER;
				cs->graphs_enabled = false;
				return;
			}
		}
		else
		{
			cs->cur = new_graph_slot(cs, x);
			cs->mode = GM_EAGER;
		}
	}
	/* replay: the ids are staged, the graph's copy picks them up */
	if (cuda_step_skip(be, OP_EMBED, (uintptr_t) x, (uintptr_t) E, (uintptr_t) n, 0))
		return;
	if (!cuda_ok(be, cudaMemcpyAsync(cs->ids_dev, cs->ids_host, sizeof(int32_t) * (size_t) n, cudaMemcpyHostToDevice,
									 cs->stream), "embed (ids)"))
		return;
	if (cs->mode == GM_EAGER)
		cuda_ok(be, cudaEventRecord(cs->ids_done, cs->stream), "embed");
	kk_embed(cs->stream, x, E->dev, E->dtype == KL_DT_BF16, E->cols, cs->ids_dev, n);
	cuda_launched(be, "embed");
}

/* An error inside a capture: close it, so that the stream works again. */
void
cuda_abort_capture(kl_backend *be)
{
	cuda_state *cs = CS(be);
	cudaGraph_t graph = NULL;

	if (cs->mode != GM_CAPTURE)
		return;
	cs->mode = GM_EAGER;
	if (cudaStreamEndCapture(cs->stream, &graph) == cudaSuccess && graph)
		cudaGraphDestroy(graph);
	cudaGetLastError();
	if (cs->cur >= 0 && cs->cur < CUDA_MAX_GRAPHS)
		drop_graph(&cs->graphs[cs->cur]);
}
