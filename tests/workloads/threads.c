/* threads: a main thread and 8 workers sharing counters under a mutex, handing a token round
 * under a condition variable and meeting at barriers, so that what they compute does not
 * depend on scheduling. Every 100 rounds the main thread prints one `it=` line, comparable with
 * an unmigrated run. Each worker checks each round that the kernel's tid (gettid) is still the
 * one it had at start: glibc caches tids, so a restorer must give threads their exact tids.
 * With CHURN=1 in the environment a helper thread is also created every 50 rounds and joined
 * 30 rounds later, so threads come and go while the process is being migrated.
 * Usage: threads sleep|busy. Prints "start pid=N"; SIGUSR1 -> "SIGUSR1 count=N". */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NT 8
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn = PTHREAD_COND_INITIALIZER;
static pthread_barrier_t round_start, round_end;
static int token;
static uint64_t shared_total, order_hash;
static uint64_t lane[NT];
static pid_t tids[NT];
static volatile int tid_bad;
static __thread uint64_t tls;
static uint64_t tls_seen[NT];
static volatile sig_atomic_t usr1;

static uint64_t churn_total;

static void on_usr1(int s) { (void)s; usr1++; }

static void *helper(void *arg)
{
    struct timespec ts = {0, 20000000};
    nanosleep(&ts, NULL);
    pthread_mutex_lock(&mu);
    churn_total += (uint64_t)(intptr_t)arg;
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void *worker(void *arg)
{
    int i = (int)(intptr_t)arg;
    uint64_t x = 0x9E3779B97F4A7C15ULL * (i + 1);
    tids[i] = (pid_t)syscall(SYS_gettid);
    for (;;) {
        pthread_barrier_wait(&round_start);
        for (int k = 0; k < 200; k++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            pthread_mutex_lock(&mu);
            shared_total += (uint64_t)(i + 1) * (x & 0xff);
            pthread_mutex_unlock(&mu);
        }
        lane[i] = x;
        tls += (uint64_t)i + 1;
        tls_seen[i] = tls;
        pthread_mutex_lock(&mu);                    /* token ring: a fixed order */
        while (token != i)
            pthread_cond_wait(&turn, &mu);
        order_hash = order_hash * 31 + (uint64_t)i;
        token = (token + 1) % NT;
        pthread_cond_broadcast(&turn);
        pthread_mutex_unlock(&mu);
        if ((pid_t)syscall(SYS_gettid) != tids[i])
            tid_bad = 1;
        pthread_barrier_wait(&round_end);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int busy = argc > 1 && !strcmp(argv[1], "busy");
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block;                        /* workers never take SIGUSR1: the main thread does */
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    pthread_barrier_init(&round_start, NULL, NT + 1);
    pthread_barrier_init(&round_end, NULL, NT + 1);
    pthread_t th[NT];
    for (int i = 0; i < NT; i++)
        pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
    pthread_sigmask(SIG_UNBLOCK, &block, NULL);
    printf("start pid=%d\n", getpid());
    int seen = 0, churn = getenv("CHURN") != NULL;
    pthread_t helper_thread;
    for (uint64_t it = 1;; it++) {
        pthread_barrier_wait(&round_start);
        pthread_barrier_wait(&round_end);
        if (churn && it % 50 == 10)
            pthread_create(&helper_thread, NULL, helper, (void *)(intptr_t)it);
        if (churn && it % 50 == 40)
            pthread_join(helper_thread, NULL);
        if (it % 100 == 0) {
            uint64_t mix = 0, tsum = 0;
            for (int i = 0; i < NT; i++)
                mix = mix * 1000003 ^ lane[i], tsum += tls_seen[i];
            printf("it=%llu total=%llu order=%016llx mix=%016llx tls=%llu churn=%llu tids=%s\n",
                   (unsigned long long)it, (unsigned long long)shared_total,
                   (unsigned long long)order_hash, (unsigned long long)mix,
                   (unsigned long long)tsum, (unsigned long long)churn_total,
                   tid_bad ? "BAD" : "ok");
        }
        if (usr1 != seen)
            seen = usr1, printf("SIGUSR1 count=%d\n", seen);
        if (!busy) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
}
