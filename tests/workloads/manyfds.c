/* manyfds: a zdtm-like self-checking workload for a process with more fds than one SCM_RIGHTS
 * message carries (253).
 *
 * Usage: manyfds [LIMIT]   (LIMIT: its RLIMIT_NOFILE soft limit, default 4096: 1210 leaves
 * hardly any number above its highest fd, 1202)
 * Sets up: RLIMIT_NOFILE raised to LIMIT, then 500 pipes and 100 stream socketpairs (1200 fds,
 * interleaved so that fd numbers of each kind are spread out), each holding one queued byte:
 * pipe i its token in its read end, socketpair i a token each way. Every 2 ms it checks a
 * rotating slice of 60 of each (reads the byte it expects from the fd it expects, writes the
 * next token), so that a pipe given to the wrong fd, lost queued data or a missing fd shows;
 * every 100 checks it prints "it=N ok" (deterministic), or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PIPES 500
#define PAIRS 100
#define SLICE 60

static int pr[PIPES], pw[PIPES];
static unsigned char ptok[PIPES];
static int sa[PAIRS], sb[PAIRS];
static unsigned char atok[PAIRS], btok[PAIRS];

static int take(int fd, unsigned char want, const char *what, int i)
{
    unsigned char c;
    ssize_t n = read(fd, &c, 1);
    if (n != 1 || c != want) {
        printf("BAD %s %d fd %d: read %zd byte %u, want %u (errno %d)\n", what, i, fd, n,
               n == 1 ? c : 0, want, n < 0 ? errno : 0);
        return 0;
    }
    return 1;
}

static int give(int fd, unsigned char c, const char *what, int i)
{
    if (write(fd, &c, 1) != 1) {
        printf("BAD %s %d fd %d: write (errno %d)\n", what, i, fd, errno);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = argc > 1 ? (rlim_t)atol(argv[1]) : 4096;
    if (rl.rlim_max < rl.rlim_cur)
        rl.rlim_max = rl.rlim_cur;
    if (setrlimit(RLIMIT_NOFILE, &rl)) {
        perror("setrlimit");
        return 2;
    }
    for (int i = 0, j = 0; i < PIPES; i++) {
        int p[2];
        if (pipe2(p, O_NONBLOCK)) {
            perror("pipe");
            return 2;
        }
        pr[i] = p[0], pw[i] = p[1], ptok[i] = (unsigned char)i;
        if (!give(pw[i], ptok[i], "pipe", i))
            return 2;
        if (i % 5 == 4 && j < PAIRS) {
            int s[2];
            if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, s)) {
                perror("socketpair");
                return 2;
            }
            sa[j] = s[0], sb[j] = s[1];
            atok[j] = (unsigned char)(j * 3), btok[j] = (unsigned char)(j * 7);
            if (!give(sb[j], atok[j], "pair", j) || !give(sa[j], btok[j], "pair", j))
                return 2;
            j++;
        }
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        for (int k = 0; k < SLICE; k++) {
            int i = (int)((it * SLICE + k) % PIPES);
            if (!take(pr[i], ptok[i], "pipe", i))
                return 1;
            ptok[i] = (unsigned char)(ptok[i] * 5 + 1);
            if (!give(pw[i], ptok[i], "pipe", i))
                return 1;
            int j = (int)((it * SLICE + k) % PAIRS);
            if (!take(sa[j], atok[j], "pair a", j) || !take(sb[j], btok[j], "pair b", j))
                return 1;
            atok[j] = (unsigned char)(atok[j] + 11), btok[j] = (unsigned char)(btok[j] + 13);
            if (!give(sb[j], atok[j], "pair", j) || !give(sa[j], btok[j], "pair", j))
                return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
