/*
 * pg_writable.h — functions that must write (say, new_conversation,
 * fork_conversation) check up front that they can, and say so in their own
 * words when they cannot: on a standby (hot standby serves reads only) or in
 * a read-only transaction, instead of the first statement's generic
 * "cannot execute ... in a read-only transaction".
 */
#ifndef KL_PG_WRITABLE_H
#define KL_PG_WRITABLE_H

/*
 * ERROR (read_only_sql_transaction) unless this transaction may write.
 * fn: the SQL function's name; why: what it writes, as a sentence; hint:
 * what to do instead on a standby (NULL: only "run it on the primary").
 */
void		kl_require_writable(const char *fn, const char *why, const char *standby_hint);

#endif
