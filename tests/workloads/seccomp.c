/* seccomp: a zdtm-like self-checking workload for seccomp filters. Run as root.
 *
 * "threads" (the default), under no_new_privs:
 *   - three threads; the main one installs filter A (getppid fails with errno 1234) with
 *     SECCOMP_FILTER_FLAG_TSYNC (and FLAG_LOG): all three share it;
 *   - thread 2 adds a filter of its own, B (getpgrp fails with errno 2345);
 *   - a child process forked after A inherits it, and adds C of its own (getpriority fails
 *     with errno 3456); it dies with its parent (PR_SET_PDEATHSIG);
 *   - every 100 iterations, thread 2 installs an allow-all filter with TSYNC: that works only
 *     if the other threads' filters are part of its own list (they share A as the kernel
 *     object, not a copy), and gives every thread thread 2's whole list; thread 2 then adds
 *     an allow-all filter of its own again, so that at any time the threads share a list
 *     and thread 2 has one more.
 * Every thread checks, every millisecond, that each filter acts (the errnos come back, or
 * the call works where no filter denies it) and that /proc/thread-self/status shows its
 * filter count; the main thread prints "it=N ok" every 100 checks, or "BAD ..." and exits.
 *
 * "profile": a deny-by-default allow-list of most system calls (like a container runtime's
 * default profile, some hundred rules, the architecture checked first) installed with TSYNC
 * as root without no_new_privs, in two threads; prctl and personality are denied (EPERM),
 * sigaltstack and set_tid_address are for a tracer (SECCOMP_RET_TRACE: ENOSYS with none):
 * the restorer makes such calls in the source and in the husk, tracing them; its own calls
 * must not be filtered. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 3

static int install(struct sock_filter *insns, unsigned short len, unsigned flags)
{
    struct sock_fprog prog = {len, insns};
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

/* a filter: system call nr fails with errno err, everything else is allowed */
static int deny(int nr, int err, unsigned flags)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | err),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    return install(f, 4, flags);
}

static int allow_all(unsigned flags)
{
    struct sock_filter f[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    return install(f, 1, flags);
}

/* This thread's Seccomp_filters. read(), not stdio: stdio would malloc in each thread, and
 * glibc's per-thread arenas are not what this workload is about. */
static int filters_shown(void)
{
    char buf[4096];
    int fd = open("/proc/thread-self/status", O_RDONLY), n = 0, got;
    if (fd < 0)
        return -2;
    while (n < (int)sizeof buf - 1 && (got = read(fd, buf + n, sizeof buf - 1 - n)) > 0)
        n += got;
    close(fd);
    buf[n] = 0;
    char *p = strstr(buf, "Seccomp_filters:");
    return p ? atoi(p + 16) : -1;
}

/* the call's errno if it failed, 0 if it worked */
static int fails_with(long nr, long a)
{
    errno = 0;
    long r = syscall(nr, a, 0);
    return r == -1 ? errno : 0;
}

static volatile int events;            /* TSYNCs thread 2 made */
static volatile int asked;             /* TSYNCs the main thread asked for */
static volatile int bad;
static volatile int shown[NTHREADS];   /* each thread's own look at its count */
static volatile int looked[NTHREADS];
static char why[256];

static void fail(const char *what, int thread, int got, int want)
{
    if (!bad) {
        snprintf(why, sizeof why, "%s thread %d: %d, expected %d", what, thread, got, want);
        bad = 1;
    }
}

/* What thread `which` must see after k TSYNCs of thread 2. A look that a TSYNC may have
 * overlapped (one was asked for before or during it) is not judged. */
static void check_self(int which)
{
    int k = events;
    int quiet = asked == k;
    int count = filters_shown();
    int e1 = fails_with(SYS_getppid, 0), e2 = fails_with(SYS_getpgrp, 0);
    if (!quiet || asked != k || events != k)
        return;
    int want = 1 + 2 * k + (which == 2), want2 = which == 2 || k > 0 ? 2345 : 0;
    shown[which] = count;
    if (count != want)
        fail("Seccomp_filters", which, count, want);
    if (e1 != 1234)
        fail("getppid errno", which, e1, 1234);
    if (e2 != want2)
        fail("getpgrp errno", which, e2, want2);
    looked[which]++;
}

static void *thread(void *arg)
{
    long which = (long)arg;
    struct timespec ts = {0, 1000 * 1000};
    while (!events && !asked && !looked[0])
        nanosleep(&ts, NULL);             /* until A and B are in place (main says so) */
    for (;;) {
        if (which == 2 && asked > events) {
            long r = allow_all(SECCOMP_FILTER_FLAG_TSYNC);
            if (r) {
                snprintf(why, sizeof why, "TSYNC %d: %ld (thread %ld could not sync) errno %d",
                         events + 1, r, r, errno);
                bad = 1;
            }
            if (allow_all(0)) {
                snprintf(why, sizeof why, "own filter after TSYNC: errno %d", errno);
                bad = 1;
            }
            events++;
        }
        check_self(which);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static volatile int b_installed;

static void *thread2_start(void *arg)
{
    while (!b_installed) {
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
        if (b_installed == 0 && filters_shown() == 1) {
            if (deny(SYS_getpgrp, 2345, 0)) {
                perror("filter B");
                exit(2);
            }
            b_installed = 1;
        }
    }
    return thread(arg);
}

static int child(void)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);       /* dies with its parent */
    if (deny(SYS_getpriority, 3456, 0)) {
        perror("filter C");
        return 2;
    }
    struct timespec ts = {0, 1000 * 1000};
    for (;;) {
        int n = filters_shown(), e1 = fails_with(SYS_getppid, 0),
            e2 = fails_with(SYS_getpriority, PRIO_PROCESS);
        if (n != 2 || e1 != 1234 || e2 != 3456) {
            printf("BAD child %d: Seccomp_filters %d (2), getppid errno %d (1234), getpriority "
                   "errno %d (3456)\n", getpid(), n, e1, e2);
            return 1;
        }
        nanosleep(&ts, NULL);
    }
}

static int threads_mode(void)
{
    pthread_t t;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
        perror("no_new_privs");
        return 2;
    }
    pthread_create(&t, NULL, thread, (void *)1L);
    pthread_create(&t, NULL, thread2_start, (void *)2L);
    if (deny(SYS_getppid, 1234, SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG)) {
        perror("filter A");
        return 2;
    }
    while (!b_installed)
        usleep(1000);
    pid_t kid = fork();
    if (kid == 0)
        _exit(child());
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 1000 * 1000};
    for (long it = 1;; it++) {
        check_self(0);
        int st;
        if (waitpid(kid, &st, WNOHANG) != 0) {
            printf("BAD the child ended (status %#x)\n", st);
            return 1;
        }
        if (bad) {
            printf("BAD %s\n", why);
            return 1;
        }
        if (it % 100 == 0) {
            printf("it=%ld ok\n", it);
            /* one more TSYNC: thread 2 makes it, we wait for it and for each thread to look */
            int before[NTHREADS];
            for (int i = 0; i < NTHREADS; i++)
                before[i] = looked[i];
            asked++;
            while (events < asked && !bad)
                nanosleep(&ts, NULL);
            for (int i = 1; i < NTHREADS; i++)
                while (looked[i] < before[i] + 2 && !bad)
                    nanosleep(&ts, NULL);
        }
        nanosleep(&ts, NULL);
    }
}

/* ---- profile --------------------------------------------------------------------------- */

static volatile int profile_looked;

static int profile_check(void)
{
    int n = filters_shown(), e1 = fails_with(SYS_prctl, PR_GET_DUMPABLE),
        e2 = fails_with(SYS_personality, 0xffffffff), e3 = fails_with(SYS_getpid, 0),
        e4 = fails_with(SYS_sigaltstack, 0);
    if (n != 1 || e1 != EPERM || e2 != EPERM || e3 != 0 || e4 != ENOSYS) {
        snprintf(why, sizeof why, "Seccomp_filters %d (1), prctl errno %d (%d), personality "
                 "errno %d (%d), getpid errno %d (0), sigaltstack errno %d (%d)", n, e1, EPERM,
                 e2, EPERM, e3, e4, ENOSYS);
        return 0;
    }
    return 1;
}

static void *profile_thread(void *arg)
{
    struct timespec ts = {0, 1000 * 1000};
    while (!profile_looked)
        nanosleep(&ts, NULL);
    for (;;) {
        if (!profile_check())
            bad = 1;
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static int profile_mode(void)
{
    /* denied: what the restorer itself calls (prctl, personality) and what a container's
     * profile denies; allowed: every other call up to clone3, one rule each */
    static const int denied[] = {SYS_prctl, SYS_personality, SYS_reboot, SYS_kexec_load,
                                 SYS_mount, SYS_umount2, SYS_swapon, SYS_swapoff, SYS_acct,
                                 SYS_init_module, SYS_delete_module, SYS_ptrace, SYS_bpf,
                                 SYS_unshare, SYS_setns, SYS_pivot_root, SYS_chroot};
    static struct sock_filter f[4096];
    int n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, nr));
    /* for a tracer (SECCOMP_RET_TRACE; with none, they fail with ENOSYS): calls the
     * restorer makes in every thread, sigaltstack in the source, set_tid_address in the husk */
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_sigaltstack, 1, 0);
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_set_tid_address, 0, 1);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE);
    for (int nr = 0; nr <= SYS_clone3; nr++) {
        int ok = nr != SYS_sigaltstack && nr != SYS_set_tid_address;
        for (unsigned i = 0; i < sizeof denied / sizeof denied[0]; i++)
            if (denied[i] == nr)
                ok = 0;
        if (ok)     /* nr: allow; else on to the next rule */
            f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
            f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    }
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM);
    pthread_t t;
    pthread_create(&t, NULL, profile_thread, NULL);
    if (install(f, n, SECCOMP_FILTER_FLAG_TSYNC)) {
        perror("profile");
        return 2;
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 1000 * 1000};
    for (long it = 1;; it++) {
        if (!profile_check() || bad) {
            printf("BAD %s\n", why);
            return 1;
        }
        profile_looked = 1;
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}

/* ---- lone ------------------------------------------------------------------------------ */

static volatile int lone_ready;

static void *lone_thread(void *arg)
{
    struct timespec ts = {0, 1000 * 1000};
    if (deny(SYS_getppid, 1234, 0)) {
        perror("lone filter");
        exit(2);
    }
    lone_ready = 1;
    for (;;) {
        int n = filters_shown(), e = fails_with(SYS_getppid, 0);
        if (n != 1 || e != 1234) {
            snprintf(why, sizeof why, "lone thread: Seccomp_filters %d (1), getppid errno %d "
                     "(1234)", n, e);
            bad = 1;
        }
        nanosleep(&ts, NULL);
    }
    return arg;
}

/* "lone": one thread has a filter, the main thread none (the process's status shows none) */
static int lone_mode(void)
{
    pthread_t t;
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    pthread_create(&t, NULL, lone_thread, NULL);
    while (!lone_ready)
        usleep(1000);
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 1000 * 1000};
    for (long it = 1;; it++) {
        int n = filters_shown(), e = fails_with(SYS_getppid, 0);
        if (n != 0 || e != 0 || bad) {
            printf("BAD main: Seccomp_filters %d (0), getppid errno %d (0); %s\n", n, e, why);
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && !strcmp(argv[1], "profile"))
        return profile_mode();
    if (argc > 1 && !strcmp(argv[1], "lone"))
        return lone_mode();
    return threads_mode();
}
