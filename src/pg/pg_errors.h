/*
 * pg_errors.h — the one table from error codes to SQLSTATEs.
 *
 * An error the extension reports from the engine carries the engine's code
 * (kl_err.code, kl_util.h), set where the error was raised; an inference
 * worker's ERROR reply carries the same codes, plus a few of the worker's own
 * (KL_ERR_*, pg_protocol.h).  Every one of them becomes a SQLSTATE here, and
 * nowhere else: README.md, "Errors", lists the table.
 *
 * Where the extension knows more than the engine about where the bytes came
 * from, it says so by the code it passes, not by a SQLSTATE of its own: a
 * state given as an argument is the caller's input whatever is wrong with it
 * (KL_E_INVALID), a conversation's stored state that fails its checks is
 * damaged data (KL_E_CORRUPT).
 */
#ifndef KL_PG_ERRORS_H
#define KL_PG_ERRORS_H

#include "postgres.h"

#include "kl_util.h"

/* The SQLSTATE (an ERRCODE_* value) of an engine code or a worker's KL_ERR_* code. */
int			kl_sqlstate(int code);

/*
 * ereport(ERROR) an engine error: its message, after "context: " when
 * context is not NULL, the SQLSTATE of its code, and the hint if not NULL.
 */
void		kl_engine_error(const kl_err *err, const char *context, const char *hint) pg_attribute_noreturn();

#endif
