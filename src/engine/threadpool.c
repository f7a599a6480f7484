/*
 * threadpool.c — see threadpool.h.
 *
 * Workers spin briefly after a job (decode steps come every few hundred
 * microseconds and waking a sleeping thread costs tens of microseconds), then
 * sleep on a condition variable.
 */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "kl.h"

#define MAX_THREADS 256
#define SPIN_ITERS 20000

static struct
{
	pthread_mutex_t mu;
	pthread_cond_t wake;
	pthread_t	tid[MAX_THREADS];
	int			n_workers;		/* threads besides the caller */
	int			want_threads;	/* configured total (0 = cores) */

	/* the current job */
	kl_task_fn	fn;
	void	   *arg;
	int			n_tasks;
	atomic_int	next;			/* next task index to hand out */
	atomic_int	active;			/* workers still inside the job */
	atomic_uint generation;		/* bumped for each job */
	unsigned	start_generation;	/* generation when the current workers were created */
	atomic_int	stop;
}			pool = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.wake = PTHREAD_COND_INITIALIZER,
};

static void
run_tasks(int thread)
{
	for (;;)
	{
		int			i = atomic_fetch_add(&pool.next, 1);

		if (i >= pool.n_tasks)
			break;
		pool.fn(pool.arg, i, thread);
	}
}

static void *
worker_main(void *p)
{
	int			thread = (int) (intptr_t) p;

	/* not the generation now: a job may have been published since creation */
	unsigned	seen = pool.start_generation;

	for (;;)
	{
		unsigned	g;
		int			spins = 0;

		while ((g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop))
		{
			if (++spins > SPIN_ITERS)
			{
				pthread_mutex_lock(&pool.mu);
				while ((g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop))
					pthread_cond_wait(&pool.wake, &pool.mu);
				pthread_mutex_unlock(&pool.mu);
				break;
			}
			sched_yield();
		}
		if (atomic_load(&pool.stop))
			return NULL;
		seen = g;
		run_tasks(thread);
		atomic_fetch_sub(&pool.active, 1);
	}
}

/* sysconf reads /sys on every call (tens of microseconds): ask once */
static int
online_cores(void)
{
	static int	cores;

	if (cores == 0)
	{
		long		n = sysconf(_SC_NPROCESSORS_ONLN);

		cores = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int) n;
	}
	return cores;
}

static void
stop_workers(void)
{
	atomic_store(&pool.stop, 1);
	pthread_mutex_lock(&pool.mu);
	pthread_cond_broadcast(&pool.wake);
	pthread_mutex_unlock(&pool.mu);
	for (int i = 0; i < pool.n_workers; i++)
		pthread_join(pool.tid[i], NULL);
	pool.n_workers = 0;
	atomic_store(&pool.stop, 0);
}

static void
start_workers(int total)
{
	sigset_t	all,
				old;

	/* Threads inherit the creator's mask: block everything while creating. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pool.start_generation = atomic_load(&pool.generation);
	for (int i = 0; i < total - 1; i++)
	{
		if (pthread_create(&pool.tid[i], NULL, worker_main, (void *) (intptr_t) (i + 1)) != 0)
			break;
		pool.n_workers++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static void
ensure_pool(void)
{
	int			total = pool.want_threads > 0 ? pool.want_threads : online_cores();

	if (total > MAX_THREADS)
		total = MAX_THREADS;
	if (pool.n_workers == total - 1)
		return;
	stop_workers();
	start_workers(total);
}

int
kl_pool_threads(void)
{
	ensure_pool();
	return pool.n_workers + 1;
}

void
kl_pool_set_threads(int n)
{
	pool.want_threads = n < 0 ? 0 : n;
	ensure_pool();
}

void
kl_set_threads(int n)
{
	kl_pool_set_threads(n);
}

int
kl_get_threads(void)
{
	return kl_pool_threads();
}

void
kl_parallel_for(int n_tasks, kl_task_fn fn, void *arg)
{
	if (n_tasks <= 0)
		return;
	ensure_pool();
	if (n_tasks == 1 || pool.n_workers == 0)
	{
		for (int i = 0; i < n_tasks; i++)
			fn(arg, i, 0);
		return;
	}
	pool.fn = fn;
	pool.arg = arg;
	pool.n_tasks = n_tasks;
	atomic_store(&pool.next, 0);
	atomic_store(&pool.active, pool.n_workers);
	pthread_mutex_lock(&pool.mu);
	atomic_fetch_add(&pool.generation, 1);
	pthread_cond_broadcast(&pool.wake);
	pthread_mutex_unlock(&pool.mu);
	run_tasks(0);
	while (atomic_load(&pool.active) > 0)
		;
}
