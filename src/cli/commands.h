/*
 * commands.h — the subcommands of the ./kl command-line tool.  kl.c parses the
 * first argument and calls one of these with the remaining arguments
 * (argv[0] is the subcommand name).  Each returns the process exit status.
 */
#ifndef KL_CLI_COMMANDS_H
#define KL_CLI_COMMANDS_H

int			cmd_logits(int argc, char **argv);
int			cmd_generate(int argc, char **argv);
int			cmd_bench(int argc, char **argv);
int			cmd_state(int argc, char **argv);
int			cmd_quantize(int argc, char **argv);	/* cmd_quantize.c */
int			cmd_perplexity(int argc, char **argv);	/* cmd_perplexity.c */

/* tokenizer commands (cmd_tokenizer.c) */
int			cmd_tokenize(int argc, char **argv);
int			cmd_detokenize(int argc, char **argv);
int			cmd_bench_tokenizer(int argc, char **argv);

/* the chat format (cmd_chat.c) and the JSON constraint's benchmark (bench_constraint.c) */
int			cmd_render(int argc, char **argv);
int			cmd_parse_reply(int argc, char **argv);
int			cmd_bench_constraint(int argc, char **argv);

#endif
