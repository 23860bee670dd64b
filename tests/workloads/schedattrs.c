/* schedattrs: a zdtm-like self-checking workload for scheduling and process attributes.
 *
 * Sets up: the main thread SCHED_OTHER at nice 3 with SCHED_RESET_ON_FORK; a thread
 * SCHED_BATCH at nice 7 pinned to CPU 0; a thread SCHED_IDLE; a thread SCHED_FIFO priority 3
 * (it sleeps nearly all the time); oom_score_adj 321; personality UNAME26; THP disabled.
 * Then every 2 ms it checks every one of them (each thread's own, read by tid), and every 100
 * checks prints "it=N ok" (a deterministic line: an unmigrated run prints the same), or
 * "BAD what" and exits at the first difference. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FLAG_RESET_ON_FORK 0x01   /* SCHED_FLAG_RESET_ON_FORK (linux/sched.h) */

struct attr {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
    uint32_t util_min, util_max;
};

struct want {
    pid_t tid;
    uint32_t policy, priority;
    int32_t nice;
    uint64_t flags;
    int cpu0_only;
};

static struct want wants[4];
static pthread_barrier_t ready;

static void set_sched(uint32_t policy, int32_t nice, uint32_t prio, uint64_t flags)
{
    struct attr a = {.size = sizeof a, .policy = policy, .flags = flags, .nice = nice,
                     .priority = prio};
    if (syscall(SYS_sched_setattr, 0, &a, 0)) {
        perror("sched_setattr");
        exit(2);
    }
}

static void *thread(void *arg)
{
    struct want *w = arg;
    w->tid = (pid_t)syscall(SYS_gettid);
    if (w->cpu0_only) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(0, &set);
        sched_setaffinity(0, sizeof set, &set);
    }
    set_sched(w->policy, w->nice, w->priority, w->flags);
    pthread_barrier_wait(&ready);
    struct timespec ts = {0, 5 * 1000 * 1000};
    for (;;)
        nanosleep(&ts, NULL);
    return NULL;
}

static int check(const struct want *w)
{
    struct attr a = {0};
    if (syscall(SYS_sched_getattr, w->tid, &a, sizeof a, 0)) {
        printf("BAD sched_getattr tid %d\n", w->tid);
        return 0;
    }
    int nice_counts = w->policy != SCHED_FIFO && w->policy != SCHED_RR;
    if (a.policy != w->policy || a.priority != w->priority || a.flags != w->flags ||
        (nice_counts && a.nice != w->nice)) {
        printf("BAD sched tid %d: policy %u prio %u nice %d flags %llu, want %u %u %d %llu\n",
               w->tid, a.policy, a.priority, a.nice, (unsigned long long)a.flags, w->policy,
               w->priority, w->nice, (unsigned long long)w->flags);
        return 0;
    }
    if (w->cpu0_only) {
        cpu_set_t set;
        CPU_ZERO(&set);
        if (sched_getaffinity(w->tid, sizeof set, &set) || CPU_COUNT(&set) != 1 ||
            !CPU_ISSET(0, &set)) {
            printf("BAD affinity tid %d\n", w->tid);
            return 0;
        }
    }
    return 1;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    FILE *f = fopen("/proc/self/oom_score_adj", "w");
    if (!f || fprintf(f, "321\n") < 0 || fclose(f)) {
        perror("oom_score_adj");
        return 2;
    }
    if (personality(UNAME26) < 0 || prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) {
        perror("personality/thp");
        return 2;
    }
    wants[0] = (struct want){0, SCHED_OTHER, 0, 3, FLAG_RESET_ON_FORK, 0};
    wants[1] = (struct want){0, SCHED_BATCH, 0, 7, 0, 1};
    wants[2] = (struct want){0, SCHED_IDLE, 0, 0, 0, 0};
    wants[3] = (struct want){0, SCHED_FIFO, 3, 0, 0, 0};
    pthread_barrier_init(&ready, NULL, 4);
    pthread_t t;
    for (int i = 1; i < 4; i++)
        pthread_create(&t, NULL, thread, &wants[i]);
    pthread_barrier_wait(&ready);
    wants[0].tid = (pid_t)syscall(SYS_gettid);
    set_sched(SCHED_OTHER, 3, 0, FLAG_RESET_ON_FORK);
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        for (int i = 0; i < 4; i++)
            if (!check(&wants[i]))
                return 1;
        char buf[16] = {0};
        f = fopen("/proc/self/oom_score_adj", "r");
        if (!f || !fgets(buf, sizeof buf, f) || atoi(buf) != 321) {
            printf("BAD oom_score_adj %s\n", buf);
            return 1;
        }
        fclose(f);
        if (personality(0xffffffff) != UNAME26) {
            printf("BAD personality %#x\n", personality(0xffffffff));
            return 1;
        }
        if (prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 1) {
            printf("BAD thp_disable\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
