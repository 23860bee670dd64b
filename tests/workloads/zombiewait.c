/* zombiewait: a zdtm-like self-checking workload for a parent waiting on its children.
 * (No /proc/PID of another process is read: a tree restored in a pid namespace of its own
 * sees the host's /proc.)
 *
 * Mode "zombie": the root forks a zombie child Z (it exits with status 7 at once), then
 * over and over forks a worker that runs 100 iterations (2 ms each, the iteration count in
 * a shared page, "it=N ok" every 100) and exits, and blocks in waitpid(worker) meanwhile:
 * a parent in wait4 with a zombie child it has not reaped. Between workers it checks that
 * Z is still its zombie child with status 7 (waitid WNOWAIT).
 *
 * Mode "churn": a worker prints the lines for ever (it checks that the root is its parent
 * and that the count of children the root reaped, in the shared page, only grows); the
 * root forks a child that exits with status n % 200 after 0-2 ms, waits for it in waitpid
 * (blocking) and checks the status; over and over, so that a freeze finds it in wait4 with
 * a child running, exiting or a zombie.
 *
 * Mode "reap": a worker prints the lines for ever; the root forks a child C that waits for
 * SIGUSR1 and then exits with status 42 (or dies of the signal argv[2], without a core; of
 * signal -argv[2] with a core dumped in the directory argv[3]), and blocks in waitpid(C); once it has it, it
 * prints "reaped status=42" ("reaped signal=N"; or BAD) and waits for the worker. A test stops the root
 * (SIGSTOP), lets C exit (SIGUSR1: C is a zombie while its parent is stopped in wait4),
 * migrates the tree and lets the root go on (SIGCONT).
 *
 * BAD lines name what changed; the process exits at the first. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pid_t root;
static volatile long *shared;     /* [0]: iterations done, [1]: children reaped */

static int death;                 /* reap mode: the signal C dies of (0: it exits) */
static int core;                  /* ... dumping a core (in the directory argv[3]) */

static void leave(int sig)
{
    (void)sig;
    if (!death)
        _exit(42);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    signal(death, SIG_DFL);
    kill(getpid(), death);
    sigset_t one;
    sigemptyset(&one);
    sigaddset(&one, death);
    sigprocmask(SIG_UNBLOCK, &one, NULL);
    _exit(99);
}

static void nap_us(long us)
{
    struct timespec ts = {0, us * 1000};
    while (nanosleep(&ts, &ts) && errno == EINTR)
        ;
}

static int check_zombie(pid_t z)
{
    siginfo_t si = {0};
    if (waitid(P_PID, z, &si, WEXITED | WNOWAIT | WNOHANG) || si.si_pid != z ||
        si.si_code != CLD_EXITED || si.si_status != 7) {
        printf("BAD the zombie %d: waitid %s pid %d code %d status %d\n", z, strerror(errno),
               si.si_pid, si.si_code, si.si_status);
        return 0;
    }
    return 1;
}

/* iterations until `until` (0: for ever) */
static void work(long until, int churn)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != root)
        _exit(0);
    long last = 0;
    for (;;) {
        if (getppid() != root) {
            printf("BAD the root %d is no longer the parent (%d)\n", root, getppid());
            exit(1);
        }
        if (churn) {
            long now = shared[1];
            if (now < last) {
                printf("BAD the root reaped %ld children, before %ld\n", now, last);
                exit(1);
            }
            last = now;
        }
        long it = ++shared[0];
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        if (until && it >= until)
            _exit(0);
        nap_us(2000);
    }
}

int main(int argc, char **argv)
{
    int churn = argc > 1 && !strcmp(argv[1], "churn");
    int reap = argc > 1 && !strcmp(argv[1], "reap");
    setvbuf(stdout, NULL, _IOLBF, 0);
    root = getpid();
    shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        return 2;
    if (churn) {
        printf("start pid=%d\n", root);
        if (fork() == 0)
            work(0, 1);
        for (long n = 1;; n++) {
            pid_t c = fork();
            if (c == 0) {
                nap_us(n % 3 * 1000);
                _exit(n % 200);
            }
            int st = 0;
            pid_t got;
            while ((got = waitpid(c, &st, 0)) < 0 && errno == EINTR)
                ;
            if (got != c || !WIFEXITED(st) || WEXITSTATUS(st) != n % 200) {
                printf("BAD child %ld (%d): waitpid %d status %#x\n", n, c, got, st);
                return 1;
            }
            shared[1] = n;
        }
    }
    if (reap) {
        death = argc > 2 ? atoi(argv[2]) : 0;
        core = death < 0;
        death = abs(death);
        signal(SIGUSR1, leave);
        pid_t c = fork();
        if (c == 0) {
            struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
            if (core && (setrlimit(RLIMIT_CORE, &unlimited) || argc < 4 || chdir(argv[3])))
                _exit(98);
            for (;;)
                pause();
        }
        signal(SIGUSR1, SIG_DFL);
        printf("child=%d\nstart pid=%d\n", c, root);
        pid_t w = fork();
        if (w == 0)
            work(0, 0);
        int st = 0;
        pid_t got;
        while ((got = waitpid(c, &st, 0)) < 0 && errno == EINTR)
            ;
        if (got != c || (death ? !WIFSIGNALED(st) || WTERMSIG(st) != death ||
                                 !WCOREDUMP(st) != !core
                               : !WIFEXITED(st) || WEXITSTATUS(st) != 42)) {
            printf("BAD child %d: waitpid %d status %#x\n", c, got, st);
            return 1;
        }
        if (death)
            printf("reaped signal=%d%s\n", WTERMSIG(st), core ? " core" : "");
        else
            printf("reaped status=%d\n", WEXITSTATUS(st));
        while ((got = waitpid(w, &st, 0)) < 0 && errno == EINTR)
            ;
        printf("BAD waitpid(worker) returned %d status %#x\n", got, st);
        return 1;
    }
    pid_t z = fork();
    if (z == 0)
        _exit(7);
    siginfo_t si;                 /* until it is a zombie, without reaping it */
    if (waitid(P_PID, z, &si, WEXITED | WNOWAIT))
        return 2;
    printf("start pid=%d\n", root);
    for (;;) {
        if (!check_zombie(z))
            return 1;
        pid_t w = fork();
        if (w == 0)
            work(shared[0] + 100, 0);
        int st = 0;
        pid_t got;
        while ((got = waitpid(w, &st, 0)) < 0 && errno == EINTR)
            ;
        if (got != w || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            printf("BAD worker %d: waitpid %d status %#x\n", w, got, st);
            return 1;
        }
    }
}
