/*
 * kl.c — the command-line tool: ./kl COMMAND [options].
 *
 *   logits      logits of every position of a token sequence, as safetensors
 *   generate    generate a continuation (ids, and text with a tokenizer)
 *   bench       prefill / decode throughput table (bench.c)
 *   perplexity  token-level perplexity over a corpus (cmd_perplexity.c)
 *   quantize    write a quantized checkpoint, or its dequantized f32 copy (cmd_quantize.c)
 *   tokenize, detokenize, bench-tokenizer   (cmd_tokenizer.c)
 *   render, parse-reply   the Kimi chat format with tools (cmd_chat.c)
 *   bench-constraint      the per-step cost of JSON constraint masks (bench_constraint.c)
 *
 * Used by the tests and benchmarks; a thin layer over the engine (kl.h).
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "cli_util.h"
#include "commands.h"
#include "json_constraint.h"
#include "kl.h"
#include "tokenizer.h"

static void
usage(void)
{
	fprintf(stderr,
			"usage: kl COMMAND [options]\n"
			"  logits     --model DIR --ids 1,2,3 [--split N] [--recurrent] --out FILE\n"
			"  generate   --model DIR (--ids 1,2,3 | --prompt TEXT | --chat TEXT [--system TEXT] | --chat-json FILE)\n"
			"             [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P]\n"
			"             [--repetition-penalty R] [--seed S] [--stop-ids a,b] [--ignore-eos]\n"
			"             [--json-schema FILE] [--tool-choice auto|none|required|NAME]   (constrained output)\n"
			"             [--state-in FILE] [--state-out FILE]   (resume from / save the sequence state)\n"
			"  render     --chat-json FILE [--model DIR] [--ids] [--format kimi|model]   (the Kimi chat format)\n"
			"  parse-reply [--tools FILE] < reply text      (content and tool calls as JSON)\n"
			"  bench-constraint --model DIR [--synthetic N] [--steps N]   (JSON constraint masks per step)\n"
			"  bench      --model DIR | --config FILE  [--prefill 512,4096] [--decode 0,4096] [--dtype bf16]\n"
			"  perplexity --model DIR --corpus FILE [--max-tokens N] [--save-argmax FILE] [--agree-with FILE]\n"
			"  quantize   --model DIR (--format FMT --out DIR | --at-load fp8|int8|int4) [--dequantized DIR]\n"
			"  tokenize   --model DIR [--special]        (text on stdin, ids on stdout)\n"
			"  detokenize --model DIR                    (ids on stdin, text on stdout)\n"
			"  bench-tokenizer --model DIR --corpus FILE\n"
			"common options: --threads N (default: all cores), --device cpu|cuda|auto,\n"
			"                --moe-routing select|reference (MoE models: select = the router bias chooses\n"
			"                the experts, the scores weight them (default); reference = the bias is added\n"
			"                into the weights too, as the released kimi_linear code does),\n"
			"                --quantize fp8|int8|int4 (quantize the weights at load)\n");
}

/* ------------------------------------------------------------------ logits */

/* Write one F32 tensor "logits" [rows, cols] as a safetensors file. */
static int
write_logits(const char *path, const float *data, int rows, int cols)
{
	char		header[256];
	size_t		bytes = sizeof(float) * (size_t) rows * cols;
	int			n = snprintf(header, sizeof(header),
							 "{\"logits\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[0,%zu]}}",
							 rows, cols, bytes);
	uint64_t	hlen;
	FILE	   *f;

	/* pad the header with spaces so that the data is 8-byte aligned */
	while ((8 + n) % 8 != 0)
		header[n++] = ' ';
	hlen = (uint64_t) n;
	f = fopen(path, "wb");
	if (!f)
	{
		fprintf(stderr, "kl: cannot write %s: %s\n", path, strerror(errno));
		return 1;
	}
	if (fwrite(&hlen, 8, 1, f) != 1 || fwrite(header, 1, (size_t) n, f) != (size_t) n ||
		fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0)
	{
		fprintf(stderr, "kl: error writing %s\n", path);
		return 1;
	}
	return 0;
}

int
cmd_logits(int argc, char **argv)
{
	cli_common co;
	const char *ids_s = NULL,
			   *out = NULL;
	int			split = -1;
	bool		recurrent = false;
	kl_err		err;
	kl_model   *m = NULL;
	kl_ctx	   *ctx = NULL;
	kl_seq	   *seq = NULL;
	int32_t    *ids = NULL;
	int			n = 0;
	float	   *logits = NULL;
	int			rc = 1;
	const cli_opt opts[] = {
		CLI_OPT("--ids", CLI_OPT_STRING, &ids_s),
		CLI_OPT("--out", CLI_OPT_STRING, &out),
		CLI_OPT("--split", CLI_OPT_INT, &split),
		CLI_OPT("--recurrent", CLI_OPT_SET, &recurrent),
	};

	cli_common_init(&co);
	if (cli_parse_options("logits", argc, argv, &co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!co.model || !ids_s || !out)
	{
		fprintf(stderr, "kl logits: --model, --ids and --out are required\n");
		return 2;
	}
	if (cli_parse_ids(ids_s, &ids, &n) != 0 || n == 0)
	{
		fprintf(stderr, "kl logits: --ids must be a non-empty comma-separated list of token ids\n");
		return 2;
	}
	if (split > n)
	{
		fprintf(stderr, "kl logits: --split %d is beyond the %d ids\n", split, n);
		goto out;
	}
	if (cli_load(&co, &m, &err) != KL_OK || kl_ctx_new(m, 0, &ctx, &err) != KL_OK ||
		kl_seq_new(m, &seq, &err) != KL_OK)
		goto fail;
	kl_ctx_force_recurrent(ctx, recurrent);
	logits = malloc(sizeof(float) * (size_t) n * kl_model_config(m)->vocab_size);
	if (!logits)
	{
		fprintf(stderr, "kl: out of memory\n");
		goto out;
	}
	{
		int			first = split > 0 ? split : n;
		kl_batch_item it = {seq, ids, first, logits, true};

		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
			goto fail;
		if (split > 0 && split < n)
		{
			/* through the serializer: save, drop the sequence, restore, go on */
			uint8_t    *blob;
			size_t		len;
			kl_blob		part;

			if (kl_state_save(seq, 0, &blob, &len, &err) != KL_OK)
				goto fail;
			kl_seq_free(seq);
			seq = NULL;
			if (kl_seq_new(m, &seq, &err) != KL_OK)
			{
				free(blob);
				goto fail;
			}
			part.data = blob;
			part.len = len;
			if (kl_state_load(seq, &part, 1, &err) != KL_OK)
			{
				free(blob);
				goto fail;
			}
			free(blob);
			it.seq = seq;
			it.ids = ids + split;
			it.n = n - split;
			it.logits = logits + (size_t) split * kl_model_config(m)->vocab_size;
			if (kl_forward(ctx, &it, 1, &err) != KL_OK)
				goto fail;
		}
	}
	rc = write_logits(out, logits, n, kl_model_config(m)->vocab_size);
	goto out;
fail:
	fprintf(stderr, "kl: %s\n", err.msg);
out:
	free(ids);
	free(logits);
	kl_seq_free(seq);
	kl_ctx_free(ctx);
	kl_model_free(m);
	return rc;
}

/* ------------------------------------------------------------------ generate */

int
cmd_generate(int argc, char **argv)
{
	cli_common co;
	const char *ids_s = NULL,
			   *prompt = NULL,
			   *chat = NULL,
			   *system_msg = NULL,
			   *stop_s = NULL,
			   *state_in = NULL,
			   *state_out = NULL,
			   *chat_json = NULL,
			   *schema_file = NULL,
			   *tool_choice = NULL;
	kl_gen_params gp;
	kl_chat    *chat_c = NULL;
	kl_grammar *grammar = NULL;
	kl_vocab   *vocab = NULL;
	kl_constraint *con = NULL;
	char	   *spec = NULL;
	uint8_t    *schema = NULL;
	size_t		schema_len = 0;
	kl_err		err;
	kl_model   *m = NULL;
	kl_ctx	   *ctx = NULL;
	kl_seq	   *seq = NULL;
	int32_t    *ids = NULL,
			   *stops = NULL;
	int			n = 0,
				n_stops = 0;
	kl_tokens	out = {0};
	int			rc = 1;
	double		t0,
				t1;

	memset(&gp, 0, sizeof(gp));
	kl_sampling_default(&gp.sampling);
	gp.max_tokens = 64;
	cli_common_init(&co);
	for (int i = 1; i < argc; i++)
	{
		if (cli_common_arg(&co, argc, argv, &i))
			continue;
		if (strcmp(argv[i], "--ids") == 0 && i + 1 < argc)
			ids_s = argv[++i];
		else if (strcmp(argv[i], "--prompt") == 0 && i + 1 < argc)
			prompt = argv[++i];
		else if (strcmp(argv[i], "--chat") == 0 && i + 1 < argc)
			chat = argv[++i];
		else if (strcmp(argv[i], "--system") == 0 && i + 1 < argc)
			system_msg = argv[++i];
		else if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc)
			gp.max_tokens = atoi(argv[++i]);
		else if (strcmp(argv[i], "--temperature") == 0 && i + 1 < argc)
			gp.sampling.temperature = strtof(argv[++i], NULL);
		else if (strcmp(argv[i], "--top-k") == 0 && i + 1 < argc)
			gp.sampling.top_k = atoi(argv[++i]);
		else if (strcmp(argv[i], "--top-p") == 0 && i + 1 < argc)
			gp.sampling.top_p = strtof(argv[++i], NULL);
		else if (strcmp(argv[i], "--min-p") == 0 && i + 1 < argc)
			gp.sampling.min_p = strtof(argv[++i], NULL);
		else if (strcmp(argv[i], "--repetition-penalty") == 0 && i + 1 < argc)
			gp.sampling.repetition_penalty = strtof(argv[++i], NULL);
		else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
			gp.sampling.seed = strtoull(argv[++i], NULL, 10);
		else if (strcmp(argv[i], "--stop-ids") == 0 && i + 1 < argc)
			stop_s = argv[++i];
		else if (strcmp(argv[i], "--ignore-eos") == 0)
			gp.ignore_eos = true;
		else if (strcmp(argv[i], "--state-in") == 0 && i + 1 < argc)
			state_in = argv[++i];
		else if (strcmp(argv[i], "--state-out") == 0 && i + 1 < argc)
			state_out = argv[++i];
		else if (strcmp(argv[i], "--chat-json") == 0 && i + 1 < argc)
			chat_json = argv[++i];
		else if (strcmp(argv[i], "--json-schema") == 0 && i + 1 < argc)
			schema_file = argv[++i];
		else if (strcmp(argv[i], "--tool-choice") == 0 && i + 1 < argc)
			tool_choice = argv[++i];
		else
		{
			fprintf(stderr, "kl generate: unknown or incomplete option %s\n", argv[i]);
			return 2;
		}
	}
	if (!co.model || (!!ids_s + !!prompt + !!chat + !!chat_json) > 1 ||
		(!ids_s && !prompt && !chat && !chat_json && !state_in))
	{
		fprintf(stderr, "kl generate: --model and one of --ids, --prompt, --chat, --chat-json are required "
				"(none only with --state-in: continue the saved generation)\n");
		return 2;
	}
	if (schema_file && !(schema = cli_read_file(schema_file, &schema_len)))
	{
		fprintf(stderr, "kl generate: cannot read %s\n", schema_file);
		return 2;
	}
	if (stop_s && cli_parse_ids(stop_s, &stops, &n_stops) != 0)
	{
		fprintf(stderr, "kl generate: --stop-ids must be comma-separated token ids\n");
		return 2;
	}
	if (cli_load(&co, &m, &err) != KL_OK || kl_ctx_new(m, 0, &ctx, &err) != KL_OK ||
		kl_seq_new(m, &seq, &err) != KL_OK)
		goto fail;
	if (state_in)
	{
		size_t		len;
		uint8_t    *blob = cli_read_file(state_in, &len);
		kl_blob		part = {blob, len};
		int			rc_load;

		if (!blob)
		{
			fprintf(stderr, "kl generate: cannot read %s\n", state_in);
			goto out;
		}
		rc_load = kl_state_load(seq, &part, 1, &err);
		free(blob);
		if (rc_load != KL_OK)
		{
			kl_err_prefix(&err, "%s", state_in);
			goto fail;
		}
	}

	if (!ids_s && !prompt && !chat)
		n = 0;					/* continue from the state's pending token */
	else if (ids_s)
	{
		if (cli_parse_ids(ids_s, &ids, &n) != 0)
		{
			fprintf(stderr, "kl generate: --ids must be comma-separated token ids\n");
			goto out;
		}
	}
	else
	{
		const kl_tokenizer *tok = kl_model_tokenizer(m);
		kl_ids		enc = {0};

		if (!tok)
		{
			fprintf(stderr, "kl generate: %s has no tokenizer (tiktoken.model); use --ids\n", co.model);
			goto out;
		}
		if (chat_json)
		{
			/* the full Kimi format: messages and tools from a file (cmd_chat.c's forms) */
			size_t		len;
			uint8_t    *file = cli_read_file(chat_json, &len);
			json_t	   *j = file ? json_loadb((const char *) file, len, 0, NULL) : NULL;
			json_t	   *m = json_is_array(j) ? j : json_object_get(j, "messages");
			json_t	   *t = json_is_object(j) ? json_object_get(j, "tools") : NULL;
			char	   *ms = m ? json_dumps(m, JSON_COMPACT) : NULL,
					   *ts = t && !json_is_null(t) ? json_dumps(t, JSON_COMPACT) : NULL;
			kl_chat_format f;
			kl_chat_render_opts o = {0};
			int32_t		chat_stops[8];
			int			ns,
						rc_parse;

			free(file);
			json_decref(j);
			rc_parse = kl_chat_parse(ms, ms ? strlen(ms) : 0, ts, ts ? strlen(ts) : 0, false, &chat_c, &err);
			free(ms);
			free(ts);
			if (rc_parse != KL_OK)
				goto fail;
			kl_chat_format_of(tok, &f);
			o.format = &f;
			o.add_generation_prompt = true;
			if (kl_chat_render_ids(tok, chat_c, &o, &enc, &err) != KL_OK ||
				kl_chat_grammar_spec(chat_c, tool_choice, (const char *) schema, schema_len,
									 kl_chat_count_calls(chat_c), &spec, &err) != KL_OK)
				goto fail;
			ns = kl_tokenizer_stop_ids(tok, chat_stops, 8);
			stops = realloc(stops, sizeof(int32_t) * (size_t) (n_stops + ns));
			for (int i = 0; i < ns; i++)
				stops[n_stops++] = chat_stops[i];
		}
		else if (prompt)
		{
			/* a fresh text prompt starts with the bos token, as the model was trained */
			if (kl_seq_positions(seq) == 0 && kl_seq_pending(seq) < 0 && kl_tokenizer_bos(tok) >= 0 &&
				kl_ids_push(&enc, kl_tokenizer_bos(tok), &err) != KL_OK)
				goto fail;
			if (kl_encode(tok, prompt, strlen(prompt), 0, &enc, &err) != KL_OK)
				goto fail;
		}
		else
		{
			kl_chat_message msgs[2];
			size_t		nm = 0;
			int32_t		chat_stops[8];
			int			ns;

			if (system_msg)
			{
				msgs[nm].role = "system";
				msgs[nm].content = system_msg;
				msgs[nm++].content_len = strlen(system_msg);
			}
			msgs[nm].role = "user";
			msgs[nm].content = chat;
			msgs[nm++].content_len = strlen(chat);
			if (kl_chat_render(tok, msgs, nm, 1, &enc, &err) != KL_OK)
				goto fail;
			/* a chat reply ends at the chat stop tokens */
			ns = kl_tokenizer_stop_ids(tok, chat_stops, 8);
			stops = realloc(stops, sizeof(int32_t) * (size_t) (n_stops + ns));
			for (int i = 0; i < ns; i++)
				stops[n_stops++] = chat_stops[i];
		}
		ids = enc.ids;
		n = (int) enc.n;
	}
	gp.stop_ids = stops;
	gp.n_stop_ids = n_stops;
	if (schema && !spec)
	{
		/* a JSON value (after a prompt or --chat): {"json_schema": ...} */
		kl_chat    *none = NULL;

		if (kl_chat_parse(NULL, 0, NULL, 0, false, &none, &err) != KL_OK ||
			kl_chat_grammar_spec(none, NULL, (const char *) schema, schema_len, 0, &spec, &err) != KL_OK)
		{
			kl_chat_free(none);
			goto fail;
		}
		kl_chat_free(none);
	}
	if (spec)
	{
		int32_t		ends[72];
		int			n_ends = 0;

		if (!kl_model_tokenizer(m))
		{
			fprintf(stderr, "kl generate: constrained output needs a model with a tokenizer\n");
			goto out;
		}
		if (!gp.ignore_eos && kl_model_config(m)->eos_id >= 0)
			ends[n_ends++] = kl_model_config(m)->eos_id;
		for (int i = 0; i < n_stops && n_ends < 72; i++)
			ends[n_ends++] = stops[i];
		if (kl_grammar_compile(spec, strlen(spec), &grammar, &err) != KL_OK ||
			kl_vocab_from_tokenizer(kl_model_tokenizer(m), kl_model_config(m)->vocab_size, &vocab, &err) != KL_OK ||
			kl_constraint_new(grammar, vocab, ends, n_ends, &con, &err) != KL_OK)
			goto fail;
		gp.constraint = con;
	}

	t0 = kl_now();
	if (kl_generate(ctx, seq, ids, n, &gp, &out, NULL, NULL, &err) != KL_OK)
		goto fail;
	t1 = kl_now();
	if (state_out)
	{
		uint8_t    *blob;
		size_t		len;

		if (kl_state_save(seq, 0, &blob, &len, &err) != KL_OK)
			goto fail;
		if (cli_write_file(state_out, blob, len) != 0)
		{
			free(blob);
			fprintf(stderr, "kl generate: cannot write %s\n", state_out);
			goto out;
		}
		free(blob);
	}
	for (size_t i = 0; i < out.n; i++)
		printf("%s%d", i ? "," : "", out.ids[i]);
	printf("\n");
	if (kl_model_tokenizer(m))
	{
		char	   *text;
		size_t		len;

		if (kl_decode(kl_model_tokenizer(m), out.ids, out.n, &text, &len, &err) == KL_OK)
		{
			fwrite(text, 1, len, stdout);
			printf("\n");
			free(text);
		}
		if (chat_c && chat_c->n_tools > 0)
		{
			/* the reply parsed: content and tool calls */
			kl_chat_reply *r;
			char	   *json;
			size_t		jl;

			if (kl_chat_parse_reply_ids(kl_model_tokenizer(m), out.ids, out.n, chat_c, &r, &err) == KL_OK &&
				kl_chat_reply_json(r, &json, &jl, &err) == KL_OK)
			{
				printf("%s\n", json);
				free(json);
			}
			kl_chat_reply_free(r);
		}
	}
	fprintf(stderr, "kl: %d prompt tokens, %zu generated in %.3f s\n", n, out.n, t1 - t0);
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "kl: %s\n", err.msg);
out:
	free(ids);
	free(stops);
	kl_tokens_free(&out);
	kl_constraint_free(con);
	kl_grammar_free(grammar);
	kl_vocab_free(vocab);
	kl_chat_free(chat_c);
	free(spec);
	free(schema);
	kl_seq_free(seq);
	kl_ctx_free(ctx);
	kl_model_free(m);
	return rc;
}

/* ------------------------------------------------------------------ main */

int
main(int argc, char **argv)
{
	static const struct
	{
		const char *name;
		int			(*fn) (int, char **);
	}			cmds[] = {
		{"logits", cmd_logits},
		{"generate", cmd_generate},
		{"bench", cmd_bench},
		{"perplexity", cmd_perplexity},
		{"quantize", cmd_quantize},
		{"tokenize", cmd_tokenize},
		{"detokenize", cmd_detokenize},
		{"bench-tokenizer", cmd_bench_tokenizer},
		{"render", cmd_render},
		{"parse-reply", cmd_parse_reply},
		{"bench-constraint", cmd_bench_constraint},
	};

	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)
	{
		usage();
		return argc < 2 ? 2 : 0;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(argv[1], cmds[i].name) == 0)
			return cmds[i].fn(argc - 1, argv + 1);
	fprintf(stderr, "kl: unknown command \"%s\"\n", argv[1]);
	usage();
	return 2;
}
