/*
 * threadpool.c — see threadpool.h.
 *
 * Tasks are claimed through one 64-bit word holding (job generation, next
 * task index): a worker that wakes up late cannot claim a task of a newer job
 * by mistake, since its compare-and-swap names the generation it saw.  The
 * submitter runs tasks too and then waits only until every task is *done* —
 * never for workers that did not show up.  When the machine is oversubscribed
 * (inside PostgreSQL, other processes want the cores) a descheduled worker
 * therefore costs nothing: the submitter does its share.
 *
 * Waiting is adaptive: decode steps come every few hundred microseconds and
 * waking a sleeping thread costs tens of microseconds, so workers spin (with
 * the CPU's pause hint) for a short while after a job, then sleep on a
 * condition variable; the submitter likewise for the last running tasks.
 */
#include "threadpool.h"

#include <immintrin.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "kl.h"

#define MAX_THREADS 256
#define WORKER_SPIN 4000		/* pause iterations (~0.1 ms) before a worker sleeps */
#define SUBMIT_SPIN 4000		/* before the submitter sleeps waiting for running tasks */

static struct
{
	pthread_mutex_t mu;
	pthread_cond_t wake;		/* a new job (or stop) for the workers */
	pthread_cond_t done;		/* the last task of a job finished */
	pthread_t	tid[MAX_THREADS];
	int			n_workers;		/* threads besides the caller */
	int			want_threads;	/* configured total (0 = cores) */

	/*
	 * The current job; fn, arg and n_tasks change only between jobs.  A
	 * worker reads fn and arg only after claiming a task (the claim orders
	 * them), but it may read n_tasks late, in claim_task() or task_done(),
	 * while the submitter is already replacing the job: so n_tasks is atomic
	 * (relaxed: a late value only makes a claim fail that would fail anyway).
	 */
	kl_task_fn	fn;
	void	   *arg;
	atomic_int	n_tasks;
	_Atomic uint64_t claim;		/* generation << 32 | next task index */
	atomic_int	finished;		/* tasks done in the current job */
	atomic_uint generation;		/* bumped for each job */
	unsigned	start_generation;	/* generation when the current workers were created */
	atomic_int	stop;
	bool		submitter_waiting;	/* under mu */
}			pool = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.wake = PTHREAD_COND_INITIALIZER,
	.done = PTHREAD_COND_INITIALIZER,
};

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	_mm_pause();
#endif
}

/* Claim the next task of job `gen`; -1 when none is left (or the job is over). */
static int
claim_task(unsigned gen)
{
	uint64_t	v = atomic_load(&pool.claim);

	for (;;)
	{
		unsigned	g = (unsigned) (v >> 32);
		uint32_t	i = (uint32_t) (v & 0xffffffffu);

		if (g != gen || i >= (uint32_t) atomic_load_explicit(&pool.n_tasks, memory_order_relaxed))
			return -1;
		/* on success job gen cannot end before this task does: fn/arg stay valid */
		if (atomic_compare_exchange_weak(&pool.claim, &v, v + 1))
			return (int) i;
	}
}

static void
task_done(void)
{
	/*
	 * n_tasks is this job's or, when this was the last task and the submitter
	 * saw that without sleeping, already the next job's: then nobody waits.
	 */
	if (atomic_fetch_add(&pool.finished, 1) + 1 == atomic_load_explicit(&pool.n_tasks, memory_order_relaxed))
	{
		/* the last task wakes the submitter if it went to sleep */
		pthread_mutex_lock(&pool.mu);
		if (pool.submitter_waiting)
			pthread_cond_signal(&pool.done);
		pthread_mutex_unlock(&pool.mu);
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
		int			i;

		while ((g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop))
		{
			if (++spins < WORKER_SPIN)
			{
				cpu_relax();
				continue;
			}
			pthread_mutex_lock(&pool.mu);
			while ((g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop))
				pthread_cond_wait(&pool.wake, &pool.mu);
			pthread_mutex_unlock(&pool.mu);
			break;
		}
		if (atomic_load(&pool.stop))
			return NULL;
		seen = g;
		while ((i = claim_task(g)) >= 0)
		{
			pool.fn(pool.arg, i, thread);
			task_done();
		}
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
	unsigned	gen;
	int			spins = 0;
	int			i;

	if (n_tasks <= 0)
		return;
	ensure_pool();
	if (n_tasks == 1 || pool.n_workers == 0)
	{
		for (i = 0; i < n_tasks; i++)
			fn(arg, i, 0);
		return;
	}
	/*
	 * No task of the previous job is running, but a worker may still be about
	 * to try a claim on it.  Retire the old claim word first (new generation,
	 * nothing claimable), so that such a claim fails whatever it then reads of
	 * n_tasks; only then replace the job and open it.
	 */
	gen = atomic_load(&pool.generation) + 1;
	atomic_store(&pool.claim, ((uint64_t) gen << 32) | 0xffffffffu);
	pool.fn = fn;
	pool.arg = arg;
	atomic_store_explicit(&pool.n_tasks, n_tasks, memory_order_relaxed);
	atomic_store(&pool.finished, 0);
	atomic_store(&pool.claim, (uint64_t) gen << 32);
	pthread_mutex_lock(&pool.mu);
	atomic_store(&pool.generation, gen);
	pthread_cond_broadcast(&pool.wake);
	pthread_mutex_unlock(&pool.mu);

	while ((i = claim_task(gen)) >= 0)
	{
		fn(arg, i, 0);
		task_done();
	}
	while (atomic_load(&pool.finished) < n_tasks)
	{
		if (++spins < SUBMIT_SPIN)
		{
			cpu_relax();
			continue;
		}
		pthread_mutex_lock(&pool.mu);
		pool.submitter_waiting = true;
		while (atomic_load(&pool.finished) < n_tasks)
			pthread_cond_wait(&pool.done, &pool.mu);
		pool.submitter_waiting = false;
		pthread_mutex_unlock(&pool.mu);
	}
}
