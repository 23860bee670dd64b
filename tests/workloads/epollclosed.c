/* epollclosed: a zdtm-like self-checking workload for an epoll that watches a file under an
 * fd number closed since (epoll_ctl(ADD, fd) then dup(fd) and close(fd): the registration
 * stays, under the old number, as long as the file is open).
 *
 * An epoll watches a pipe's read end that way (data 0x1234), and an eventfd registered
 * plainly (data 0x5678). Every 2 ms it writes a byte into the pipe and must get exactly the
 * pipe's event from epoll_wait, reads the byte through the dup, then bumps the eventfd and
 * must get exactly its event; every 100 checks it prints "it=N ok", or "BAD what" and exits.
 * With the argument "child", the only other holder of the pipe's read end is a child
 * process that let the epoll go (refused by name in images). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    printf("BAD setup %s: %s\n", what, strerror(errno));
    exit(2);
}

static int one_event(int ep, uint64_t want, const char *what)
{
    struct epoll_event ev[4];
    int n = epoll_wait(ep, ev, 4, 5000);
    if (n != 1 || ev[0].data.u64 != want || !(ev[0].events & EPOLLIN)) {
        printf("BAD %s: %d events, first data %#llx\n", what, n,
               n > 0 ? (unsigned long long)ev[0].data.u64 : 0ULL);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int child_mode = argc > 1 && !strcmp(argv[1], "child");
    int p[2], ep = epoll_create1(EPOLL_CLOEXEC), ev = eventfd(0, EFD_NONBLOCK);
    if (pipe2(p, O_NONBLOCK) || ep < 0 || ev < 0)
        die("pipe/epoll/eventfd");
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 0x1234};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e))
        die("epoll_ctl pipe");
    e.data.u64 = 0x5678;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e))
        die("epoll_ctl eventfd");
    int held = -1;
    pid_t parent = getpid();
    if (child_mode) {
        pid_t c = fork();
        if (c < 0)
            die("fork");
        if (c == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(0);
            close(ep);              /* it lets the epoll go, and keeps the pipe */
            for (;;)
                pause();
        }
    } else {
        held = dup(p[0]);
        if (held < 0)
            die("dup");
    }
    close(p[0]);
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        char c = 'x';
        if (!child_mode) {            /* (the child holds the pipe: only the eventfd then) */
            if (write(p[1], &c, 1) != 1)
                die("write");
            if (!one_event(ep, 0x1234, "the pipe watched under a closed fd"))
                return 1;
            if (read(held, &c, 1) != 1) {
                printf("BAD read through the dup\n");
                return 1;
            }
        }
        uint64_t one = 1;
        if (write(ev, &one, 8) != 8 || !one_event(ep, 0x5678, "the eventfd") ||
            read(ev, &one, 8) != 8) {
            printf("BAD eventfd\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
