/* timers: a zdtm-like self-checking workload for POSIX and interval timers.
 *
 * Sets up: ITIMER_REAL every 3 ms (SIGALRM); a CLOCK_MONOTONIC POSIX timer every 4 ms sending
 * the process SIGUSR1 with value 42; a CLOCK_REALTIME POSIX timer every 5 ms sending one
 * thread SIGRTMIN+1 (SIGEV_THREAD_ID); a one-shot timer due in an hour; a timer created and
 * never armed. Every 2 ms it checks that every timer id is still its own (timer_gettime
 * answers, with the interval it was given; the one-shot one still due within the hour) and
 * every 100 checks that every periodic timer has fired since the last look; then it prints
 * "it=N ok" (deterministic: an unmigrated run prints the same), or "BAD what" and exits. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile long alarms, usr1s, rts;
static volatile int usr1_value_bad, rt_wrong_thread;
static pid_t rt_tid;

static void on_alarm(int sig) { (void)sig; alarms++; }

static void on_usr1(int sig, siginfo_t *si, void *c)
{
    (void)sig, (void)c;
    if (si->si_value.sival_int != 42 || si->si_code != SI_TIMER)
        usr1_value_bad = 1;
    usr1s++;
}

static void on_rt(int sig, siginfo_t *si, void *c)
{
    (void)sig, (void)si, (void)c;
    if ((pid_t)syscall(SYS_gettid) != rt_tid)
        rt_wrong_thread = 1;
    rts++;
}

static void *rt_thread(void *arg)
{
    (void)arg;
    sigset_t rt;
    sigemptyset(&rt);
    sigaddset(&rt, SIGRTMIN + 1);
    pthread_sigmask(SIG_UNBLOCK, &rt, NULL);        /* it alone takes it */
    rt_tid = (pid_t)syscall(SYS_gettid);
    for (;;)
        pause();
    return NULL;
}

static timer_t make(clockid_t clock, int notify, int signo, int value, pid_t tid)
{
    struct sigevent se;
    memset(&se, 0, sizeof se);
    se.sigev_notify = notify;
    se.sigev_signo = signo;
    se.sigev_value.sival_int = value;
    se._sigev_un._tid = tid;
    timer_t t;
    if (timer_create(clock, &se, &t)) {
        perror("timer_create");
        exit(2);
    }
    return t;
}

static void arm(timer_t t, long interval_ns, long first_s)
{
    struct itimerspec its = {{0, interval_ns}, {first_s, first_s ? 0 : interval_ns}};
    if (timer_settime(t, 0, &its, NULL)) {
        perror("timer_settime");
        exit(2);
    }
}

static int check_timer(timer_t t, const char *name, long interval_ns, int want_armed)
{
    struct itimerspec its;
    if (timer_gettime(t, &its)) {
        printf("BAD %s: timer_gettime: %m\n", name);
        return 0;
    }
    if (its.it_interval.tv_sec != 0 || its.it_interval.tv_nsec != interval_ns) {
        printf("BAD %s: interval %ld.%09ld\n", name, its.it_interval.tv_sec,
               its.it_interval.tv_nsec);
        return 0;
    }
    int armed = its.it_value.tv_sec || its.it_value.tv_nsec;
    if (armed != want_armed || its.it_value.tv_sec > 3600) {
        printf("BAD %s: value %ld.%09ld\n", name, its.it_value.tv_sec, its.it_value.tv_nsec);
        return 0;
    }
    return 1;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = on_alarm;
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_flags = SA_RESTART | SA_SIGINFO;
    sa.sa_sigaction = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_rt;
    sigaction(SIGRTMIN + 1, &sa, NULL);

    /* only the rt thread takes SIGRTMIN+1; the main thread takes the others */
    sigset_t rt;
    sigemptyset(&rt);
    sigaddset(&rt, SIGRTMIN + 1);
    pthread_sigmask(SIG_BLOCK, &rt, NULL);
    pthread_t th;
    pthread_create(&th, NULL, rt_thread, NULL);
    while (!rt_tid)
        usleep(1000);

    struct itimerval itv = {{0, 3000}, {0, 3000}};
    setitimer(ITIMER_REAL, &itv, NULL);
    timer_t mono = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, 42, 0);
    timer_t real = make(CLOCK_REALTIME, SIGEV_THREAD_ID, SIGRTMIN + 1, 7, rt_tid);
    timer_t later = make(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, 42, 0);
    timer_t idle = make(CLOCK_BOOTTIME, SIGEV_NONE, 0, 0, 0);
    arm(mono, 4000000, 0);
    arm(real, 5000000, 0);
    arm(later, 0, 3600);
    printf("start pid=%d\n", getpid());

    long last_alarms = 0, last_usr1s = 0, last_rts = 0;
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        if (!check_timer(mono, "mono", 4000000, 1) || !check_timer(real, "real", 5000000, 1) ||
            !check_timer(later, "later", 0, 1) || !check_timer(idle, "idle", 0, 0))
            return 1;
        struct itimerval cur;
        getitimer(ITIMER_REAL, &cur);
        if (cur.it_interval.tv_sec != 0 || cur.it_interval.tv_usec != 3000) {
            printf("BAD itimer interval %ld.%06ld\n", cur.it_interval.tv_sec,
                   cur.it_interval.tv_usec);
            return 1;
        }
        if (usr1_value_bad || rt_wrong_thread) {
            printf("BAD signal: usr1 value %d, rt thread %d\n", usr1_value_bad, rt_wrong_thread);
            return 1;
        }
        if (it % 100 == 0) {
            if (alarms == last_alarms || usr1s == last_usr1s || rts == last_rts) {
                printf("BAD a periodic timer stopped: alarms %ld usr1 %ld rt %ld\n", alarms,
                       usr1s, rts);
                return 1;
            }
            last_alarms = alarms, last_usr1s = usr1s, last_rts = rts;
            printf("it=%ld ok\n", it);
        }
        nanosleep(&ts, NULL);
    }
}
