/*
 * test_threadpool.c — every task of every job runs exactly once, with the
 * job's own function and argument, across many short jobs of varying sizes
 * (the pattern of decode steps), also with more threads than cores.
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kl.h"
#include "tap.h"
#include "threadpool.h"

#define MAX_TASKS 97

typedef struct job
{
	int			id;
	atomic_int	runs[MAX_TASKS];
	atomic_int	wrong_job;
} job;

static void
task_a(void *arg, int t, int thread)
{
	job		   *j = arg;

	(void) thread;
	atomic_fetch_add(&j->runs[t], 1);
}

static void
task_b(void *arg, int t, int thread)
{
	job		   *j = arg;

	(void) thread;
	if (j->id % 2 == 0)
		atomic_fetch_add(&j->wrong_job, 1);	/* task_b only ever gets odd jobs */
	atomic_fetch_add(&j->runs[t], 1);
}

static int
run_jobs(int threads, int n_jobs)
{
	job		   *jobs = calloc(2, sizeof(job));
	int			bad = 0;
	uint64_t	x = 7;

	kl_set_threads(threads);
	for (int k = 0; k < n_jobs; k++)
	{
		job		   *j = &jobs[k % 2];
		int			n;

		memset(j, 0, sizeof(*j));
		j->id = k;
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		n = 1 + (int) (x % MAX_TASKS);
		kl_parallel_for(n, k % 2 ? task_b : task_a, j);
		for (int t = 0; t < MAX_TASKS; t++)
			if (atomic_load(&j->runs[t]) != (t < n ? 1 : 0))
				bad++;
		if (atomic_load(&j->wrong_job))
			bad++;
	}
	free(jobs);
	return bad;
}

int
main(void)
{
	tap_ok(run_jobs(2, 200000) == 0, "200000 jobs of 1..97 tasks on 2 threads: each task ran exactly once, "
		   "with its own job's function");
	tap_ok(run_jobs(8, 50000) == 0, "50000 jobs on 8 threads (more than the cores): each task exactly once");
	tap_ok(run_jobs(1, 10000) == 0, "10000 jobs on 1 thread");
	return tap_done();
}
