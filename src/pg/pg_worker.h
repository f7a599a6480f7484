/*
 * pg_worker.h — the inference background workers (pg_worker.c).
 */
#ifndef KL_PG_WORKER_H
#define KL_PG_WORKER_H

/* _PG_init, in the postmaster: register kimi_linear.workers workers */
void		kl_register_workers(void);

#endif
