/* sigio: a zdtm-like self-checking workload for signal-driven I/O (O_ASYNC), whose owner
 * (F_SETOWN / F_SETOWN_EX) and signal (F_SETSIG) /proc does not show.
 *
 * Sets up, in the process P:
 *   a pipe whose read end is O_ASYNC, owned by P (F_SETOWN getpid()), default SIGIO;
 *   a socketpair whose end s0 is O_ASYNC, owned by P's main thread (F_SETOWN_EX
 *   F_OWNER_TID), with F_SETSIG SIGRTMIN+3 (the handler checks si_fd and si_code);
 *   a pipe whose read end P holds, O_ASYNC, owned by P's child C (F_SETOWN C's pid): C
 *   counts its SIGIOs and answers each on an ack pipe;
 *   a pipe read end with F_SETOWN_EX F_OWNER_PGRP of P's group and F_SETSIG SIGRTMIN+4,
 *   not O_ASYNC (the owner and signal are still state a later fcntl(O_ASYNC) uses);
 *   with the argument "outside", /dev/null owned by its parent, outside the tree.
 * Every 2 ms it writes a byte into each, which must raise the signal in the right task
 * (P's own before write() returns; C's answered on the ack pipe), and reads the owners and
 * signals back; every 100 checks it prints "it=N ok", or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t sigio_count, rt_count, rt_bad;
static volatile int rt_fd = -1;

static void on_sigio(int sig) { (void)sig; sigio_count++; }

static void on_rt(int sig, siginfo_t *si, void *ctx)
{
    (void)sig;
    (void)ctx;
    if (si->si_fd != rt_fd || si->si_code != POLL_IN)
        rt_bad = 1;
    rt_count++;
}

static void die(const char *what)
{
    printf("BAD setup %s: %s\n", what, strerror(errno));
    exit(2);
}

static void child_loop(int ack)
{
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGIO);
    sigprocmask(SIG_BLOCK, &block, &old);
    int answered = 0;
    for (;;) {
        while (answered < sigio_count) {     /* on_sigio counts in C too */
            if (write(ack, "a", 1) != 1)
                _exit(3);
            answered++;
        }
        sigsuspend(&old);
    }
}

static int owner_is(int fd, int type, pid_t pid, int sig, const char *name)
{
    struct f_owner_ex o = {0};
    if (fcntl(fd, F_GETOWN_EX, &o) || o.type != type || o.pid != pid) {
        printf("BAD %s owner type %d pid %d, want %d %d\n", name, o.type, o.pid, type, pid);
        return 0;
    }
    int s = fcntl(fd, F_GETSIG);
    if (s != sig) {
        printf("BAD %s F_GETSIG %d, want %d\n", name, s, sig);
        return 0;
    }
    return 1;
}

static int poke(int wfd, int rfd, const char *name)
{
    char c = 'x';
    if (write(wfd, &c, 1) != 1 || read(rfd, &c, 1) != 1) {
        printf("BAD %s write/read: %s\n", name, strerror(errno));
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int mine[2], sp[2], theirs[2], ack[2], grp[2];
    if (pipe(mine) || socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || pipe(theirs) || pipe(ack) ||
        pipe(grp))
        die("pipes");
    signal(SIGIO, on_sigio);
    struct sigaction sa = {0};
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGRTMIN + 3, &sa, NULL);
    signal(SIGRTMIN + 4, SIG_IGN);
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);       /* ends with P (killed by the test) */
        if (getppid() != parent)
            _exit(0);
        close(ack[0]);
        child_loop(ack[1]);
    }
    pid_t me = getpid(), tid = (pid_t)syscall(SYS_gettid);
    rt_fd = sp[0];
    struct f_owner_ex to_thread = {F_OWNER_TID, tid}, to_group = {F_OWNER_PGRP, getpgrp()};
    if (fcntl(mine[0], F_SETOWN, me) || fcntl(mine[0], F_SETFL, O_ASYNC))
        die("pipe owner");
    if (fcntl(sp[0], F_SETOWN_EX, &to_thread) || fcntl(sp[0], F_SETSIG, SIGRTMIN + 3) ||
        fcntl(sp[0], F_SETFL, O_ASYNC))
        die("socket owner");
    if (fcntl(theirs[0], F_SETOWN, child) || fcntl(theirs[0], F_SETFL, O_ASYNC))
        die("child's owner");
    if (fcntl(grp[0], F_SETOWN_EX, &to_group) || fcntl(grp[0], F_SETSIG, SIGRTMIN + 4))
        die("group owner");
    if (argc > 1 && !strcmp(argv[1], "outside")) {
        /* a file whose SIGIO goes to our parent, outside the tree: refused */
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || fcntl(null, F_SETOWN, getppid()))
            die("outside owner");
    }
    close(ack[1]);
    printf("start pid=%d\n", me);
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        if (!owner_is(mine[0], F_OWNER_PID, me, 0, "pipe") ||
            !owner_is(sp[0], F_OWNER_TID, tid, SIGRTMIN + 3, "socket") ||
            !owner_is(theirs[0], F_OWNER_PID, child, 0, "child's pipe") ||
            !owner_is(grp[0], F_OWNER_PGRP, getpgrp(), SIGRTMIN + 4, "group's pipe"))
            return 1;
        long io = sigio_count, rt = rt_count;
        if (!poke(mine[1], mine[0], "pipe") || !poke(sp[1], sp[0], "socket") ||
            !poke(theirs[1], theirs[0], "child's pipe") || !poke(grp[1], grp[0], "group's pipe"))
            return 1;
        if (sigio_count != io + 1 || rt_count != rt + 1 || rt_bad) {
            printf("BAD signals: SIGIO %ld -> %ld, SIGRTMIN+3 %ld -> %ld%s\n", io,
                   (long)sigio_count, rt, (long)rt_count, rt_bad ? " (wrong si_fd/code)" : "");
            return 1;
        }
        struct pollfd p = {ack[0], POLLIN, 0};
        char c;
        if (poll(&p, 1, 30000) != 1 || read(ack[0], &c, 1) != 1) {
            printf("BAD the child got no SIGIO for its pipe\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
