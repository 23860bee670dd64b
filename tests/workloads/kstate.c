/* kstate: a process whose kernel state is unusual in every way prerestore claims to carry, and
 * which prints that state on demand so a test can compare it before and after migration.
 *
 * Usage: kstate DIR     (DIR: an existing directory it chdirs into and writes files in)
 * Prints "start pid=N" once set up, then waits. On SIGUSR1 it prints one line
 *   state comm=... cwd=... umask=... nofile=... altstack=... mask=... rseq=... robust=...
 *         append_off=... plain_off=... heap=... ro=...
 * and on SIGUSR2 (blocked, and queued once with a value before "start") nothing happens until
 * SIGUSR1 unblocks it: the report ends with "pending_value=N" once the queued SIGUSR2 (with its
 * sigqueue value) has been delivered, proving pending signals and their siginfo survived. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t want_report;
static volatile int pending_value = -1;
static volatile uintptr_t usr2_stack_sp;

static void on_usr1(int sig) { (void)sig; want_report = 1; }

static void on_usr2(int sig, siginfo_t *si, void *ctx)
{
    (void)sig, (void)ctx;
    int local;
    usr2_stack_sp = (uintptr_t)&local;       /* runs on the alternate stack */
    pending_value = si->si_value.sival_int;
}

int main(int argc, char **argv)
{
    if (argc != 2 || chdir(argv[1])) {
        fprintf(stderr, "usage: kstate DIR\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_NAME, "kstate-test");
    umask(027);
    struct rlimit rl = {777, 4096};
    setrlimit(RLIMIT_NOFILE, &rl);

    static char altstack[1 << 16];
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, NULL);

    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    struct sigaction sa2 = {0};
    sa2.sa_sigaction = on_usr2;
    sa2.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigaddset(&sa2.sa_mask, SIGTERM);
    sigaction(SIGUSR2, &sa2, NULL);
    signal(SIGPIPE, SIG_IGN);

    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, NULL);
    union sigval v = {.sival_int = 4242};
    sigqueue(getpid(), SIGUSR2, v);          /* stays pending until the report */

    int append_fd = open("append.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    int plain_fd = open("plain.dat", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (append_fd < 0 || plain_fd < 0 || write(append_fd, "first\n", 6) != 6 ||
        write(plain_fd, "0123456789", 10) != 10 || lseek(plain_fd, 3, SEEK_SET) != 3)
        return 3;

    /* 256 MiB reserved, 16 pages touched: the restored process must not populate the rest */
    char *sparse = mmap(NULL, 256UL << 20, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    for (int k = 0; k < 16; k++)
        sparse[(size_t)k * (16UL << 20)] = (char)k;

    char *heap = malloc(100);
    strcpy(heap, "heap-is-intact");
    char *ro = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    strcpy(ro, "read-only-page");
    mprotect(ro, 4096, PROT_READ);

    printf("start pid=%d\n", getpid());
    for (;;) {
        struct timespec ts = {10, 0};       /* it is frozen inside this call, in practice */
        nanosleep(&ts, NULL);
        if (!want_report)
            continue;
        want_report = 0;
        char cwd[256] = "", comm[17] = "";
        if (!getcwd(cwd, sizeof cwd))
            strcpy(cwd, "?");
        prctl(PR_GET_NAME, comm);
        mode_t um = umask(0);
        umask(um);
        struct rlimit now;
        getrlimit(RLIMIT_NOFILE, &now);
        stack_t cur;
        sigaltstack(NULL, &cur);
        sigset_t mask;
        sigprocmask(SIG_SETMASK, NULL, &mask);
        struct sigaction q;
        sigaction(SIGUSR2, NULL, &q);
        long append_off = lseek(append_fd, 0, SEEK_CUR), plain_off = lseek(plain_fd, 0, SEEK_CUR);
        int fl_a = fcntl(append_fd, F_GETFL), fd_p = fcntl(plain_fd, F_GETFD);
        /* unblock: the queued SIGUSR2 is delivered now, on the alternate stack */
        sigprocmask(SIG_UNBLOCK, &block, NULL);
        int on_alt = usr2_stack_sp >= (uintptr_t)altstack &&
                     usr2_stack_sp < (uintptr_t)altstack + sizeof altstack;
        sigprocmask(SIG_BLOCK, &block, NULL);
        dprintf(append_fd, "report\n");
        printf("state comm=%s cwd=%s umask=%03o nofile=%llu/%llu altstack=%s/%zu mask_usr2=%d "
               "usr2_flags=%#x usr2_mask_term=%d append_off=%ld append_flag=%d plain_off=%ld "
               "plain_cloexec=%d heap=%s ro=%s pending_value=%d on_altstack=%d\n",
               comm, strrchr(cwd, '/') ? strrchr(cwd, '/') + 1 : cwd, um,
               (unsigned long long)now.rlim_cur, (unsigned long long)now.rlim_max,
               cur.ss_sp == altstack ? "same" : "moved", cur.ss_size, sigismember(&mask, SIGUSR2),
               q.sa_flags & (SA_SIGINFO | SA_ONSTACK | SA_RESTART), sigismember(&q.sa_mask, SIGTERM),
               append_off, !!(fl_a & O_APPEND), plain_off, !!(fd_p & FD_CLOEXEC), heap, ro,
               pending_value, on_alt);
        pending_value = -1;
    }
}
