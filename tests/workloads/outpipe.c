/* outpipe: a zdtm-like self-checking workload for an fd whose other end is outside the tree
 * (a service's stdout read by its supervisor).
 *
 * Usage: outpipe FD   (FD: the write end of a pipe its starter reads; if FD is not open, as
 * in a reference run, /dev/null stands for it)
 * Every 2 ms it writes one byte to FD, the iteration number modulo 256 (the reader checks
 * that none is lost or repeated), checks that FD is still a write-only pipe, and every 100
 * iterations prints "it=N ok" (deterministic), or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2)
        return 2;
    int fd = atoi(argv[1]);
    int piped = fcntl(fd, F_GETFD) != -1;
    if (!piped) {
        int null = open("/dev/null", O_WRONLY);
        if (null < 0 || dup2(null, fd) < 0)
            return 2;
        close(null);
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        unsigned char c = (unsigned char)it;
        struct stat st;
        if (write(fd, &c, 1) != 1) {
            printf("BAD write: %s\n", strerror(errno));
            return 1;
        }
        if (piped && (fstat(fd, &st) || !S_ISFIFO(st.st_mode) ||
                      (fcntl(fd, F_GETFL) & O_ACCMODE) != O_WRONLY)) {
            printf("BAD fd %d is no longer a write-only pipe\n", fd);
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
