/* pidfd: a zdtm-like self-checking workload for pidfds of the tree's own processes.
 *
 * The process P forks a child C and holds: a pidfd of C, another with PIDFD_NONBLOCK and not
 * close-on-exec, a dup of the first, a pidfd of itself, and a thread pidfd (PIDFD_THREAD) of
 * its own main thread (with the argument "outside", a pidfd of its parent too). Every 2 ms it checks each: flags and close-on-exec as they were, the
 * process it refers to (ioctl PIDFD_GET_INFO: its pid and tgid in our namespace), that C's
 * is not readable (C lives) and that a wait on the non-blocking one says so; then signals C
 * through its pidfd (pidfd_send_signal), which C answers on a pipe. Every 100 checks it
 * prints "it=N ok", or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif
#define PIDFD_THREAD_FLAG O_EXCL

struct pidfd_info_v0 {          /* struct pidfd_info (Linux 6.13+), its first version */
    uint64_t mask, cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    int32_t exit_code;
};
#define PIDFD_GET_INFO_V0 _IOWR(0xFF, 11, struct pidfd_info_v0)

static volatile sig_atomic_t usr1;
static void on_usr1(int sig) { (void)sig; usr1++; }

static void die(const char *what)
{
    printf("BAD setup %s: %s\n", what, strerror(errno));
    exit(2);
}

struct held {
    const char *name;
    int fd, getfl, getfd;
    pid_t pid, tgid;
};

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ack[2];
    if (pipe(ack))
        die("pipe");
    signal(SIGUSR1, on_usr1);
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        close(ack[0]);
        sigset_t block, old;
        sigemptyset(&block);
        sigaddset(&block, SIGUSR1);
        sigprocmask(SIG_BLOCK, &block, &old);
        int answered = 0;
        for (;;) {
            while (answered < usr1) {
                if (write(ack[1], "a", 1) != 1)
                    _exit(3);
                answered++;
            }
            sigsuspend(&old);
        }
    }
    close(ack[1]);
    pid_t me = getpid();
    struct held h[5] = {
        {"child", (int)syscall(SYS_pidfd_open, child, 0), 0, 0, child, child},
        {"child nonblocking", (int)syscall(SYS_pidfd_open, child, PIDFD_NONBLOCK), 0, 0,
         child, child},
        {"dup of child", -1, 0, 0, child, child},
        {"self", (int)syscall(SYS_pidfd_open, me, 0), 0, 0, me, me},
        {"main thread", (int)syscall(SYS_pidfd_open, me, PIDFD_THREAD_FLAG), 0, 0, me, me},
    };
    h[2].fd = dup(h[0].fd);
    for (int i = 0; i < 5; i++) {
        if (h[i].fd < 0)
            die(h[i].name);
        if (i == 1 && fcntl(h[i].fd, F_SETFD, 0))
            die("F_SETFD");
        h[i].getfl = fcntl(h[i].fd, F_GETFL);
        h[i].getfd = fcntl(h[i].fd, F_GETFD);
    }
    if (argc > 1 && !strcmp(argv[1], "outside") && syscall(SYS_pidfd_open, getppid(), 0) < 0)
        die("pidfd of the parent");             /* outside the tree: refused */
    printf("start pid=%d\n", me);
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        for (int i = 0; i < 5; i++) {
            struct pidfd_info_v0 info = {.mask = 1};         /* PIDFD_INFO_PID */
            int fl = fcntl(h[i].fd, F_GETFL), fdf = fcntl(h[i].fd, F_GETFD);
            if (fl != h[i].getfl || fdf != h[i].getfd) {
                printf("BAD %s: flags %#o fd flags %d, want %#o %d\n", h[i].name, fl, fdf,
                       h[i].getfl, h[i].getfd);
                return 1;
            }
            if (ioctl(h[i].fd, PIDFD_GET_INFO_V0, &info) || (pid_t)info.pid != h[i].pid ||
                (pid_t)info.tgid != h[i].tgid) {
                printf("BAD %s refers to pid %u tgid %u, want %d (%s)\n", h[i].name,
                       info.pid, info.tgid, h[i].pid, strerror(errno));
                return 1;
            }
        }
        struct pollfd p = {h[0].fd, POLLIN, 0};
        if (poll(&p, 1, 0) != 0) {
            printf("BAD the child's pidfd is readable: it ended\n");
            return 1;
        }
        siginfo_t si = {0};
        if (waitid(P_PIDFD, h[1].fd, &si, WEXITED | WNOHANG) || si.si_pid != 0) {
            printf("BAD waitid on the non-blocking pidfd: %s, pid %d\n", strerror(errno),
                   si.si_pid);
            return 1;
        }
        if (syscall(SYS_pidfd_send_signal, h[2].fd, SIGUSR1, NULL, 0)) {
            printf("BAD pidfd_send_signal: %s\n", strerror(errno));
            return 1;
        }
        struct pollfd a = {ack[0], POLLIN, 0};
        char c;
        if (poll(&a, 1, 30000) != 1 || read(ack[0], &c, 1) != 1) {
            printf("BAD the child did not answer its signal\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
