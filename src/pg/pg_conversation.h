/*
 * pg_conversation.h — what the chat-turn functions (pg_conversation.c) share
 * with their set-based form (chat_with_state_each, pg_sql_each.c).
 */
#ifndef KL_PG_CONVERSATION_H
#define KL_PG_CONVERSATION_H

#include "postgres.h"

#include "kl.h"
#include "tokenizer.h"

/*
 * The ids of one chat turn after a state whose pending token is `pending`
 * (-1: none): [<|im_end|> if the last reply was cut off] + the messages
 * rendered + the assistant prompt.
 */
int32	   *kl_chat_turn_ids(const kl_tokenizer *tok, int32 pending, const kl_chat_message *msgs, int n_msgs,
							 const int32 *stops, int n_stops, int *n_out);

/*
 * ERROR unless data is a valid head part of a state; what: how to call it in
 * the message; as: the code of any failure (KL_E_INVALID for a state given
 * as an argument, KL_E_CORRUPT for a conversation's stored one).
 */
void		kl_check_state_head(const char *data, Size len, kl_state_info *info, const char *what, kl_errcode as);

#endif
