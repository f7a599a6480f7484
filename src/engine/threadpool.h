/*
 * threadpool.h — the engine's worker threads.
 *
 * One process-wide pool runs "parallel for" jobs: kl_parallel_for(n, fn, arg)
 * calls fn(arg, i, thread) for every i in [0, n), spread over the pool's
 * threads plus the caller, and returns when all are done.  Tasks are handed
 * out dynamically (an atomic counter), so uneven tasks balance themselves.
 *
 * The threads block every signal: inside a PostgreSQL background worker only
 * the main thread may run signal handlers.  Only one thread at a time may
 * submit jobs (the engine is driven by one thread per process).
 */
#ifndef KL_THREADPOOL_H
#define KL_THREADPOOL_H

typedef void (*kl_task_fn) (void *arg, int task, int thread);

/* Threads available to a job, the caller included (>= 1). */
int			kl_pool_threads(void);

/* Resize the pool: total threads including the caller (0 = online cores). */
void		kl_pool_set_threads(int n);

void		kl_parallel_for(int n_tasks, kl_task_fn fn, void *arg);

#endif
