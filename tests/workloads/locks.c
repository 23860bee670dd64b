/* locks: a zdtm-like self-checking workload for file locks and leases.
 *
 * In the directory argv[1], with argv[2] saying which (any of "posix", "ofd", "flock",
 * "lease"): a POSIX write lock on bytes 10-19 of one file, an OFD read lock on all of
 * another, an exclusive flock() of a third, a read lease on a fourth (opened read-only).
 * Every 2 ms it checks each as another holder would see it (an open file of its own: the OFD
 * lock conflicts with a write lock, flock(LOCK_NB) fails), the POSIX lock in
 * /proc/self/fdinfo (a process does not conflict with its own), the lease with F_GETLEASE;
 * every 100 checks it prints "it=N ok", or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static char dir[3500];

static void die(const char *what)
{
    printf("BAD setup %s: %s\n", what, strerror(errno));
    exit(2);
}

static int make(const char *name, int flags)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    int fd = open(p, O_RDWR | O_CREAT, 0644);
    if (fd < 0 || ftruncate(fd, 100))
        die(name);
    if ((flags & O_ACCMODE) == O_RDWR)
        return fd;
    close(fd);
    fd = open(p, flags);
    if (fd < 0)
        die(name);
    return fd;
}

static int reopen(const char *name)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return open(p, O_RDONLY);
}

static int fdinfo_has(int fd, const char *what)
{
    char p[64], buf[4096];
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(p, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return strstr(buf, what) != NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3)
        return 2;
    snprintf(dir, sizeof dir, "%s", argv[1]);
    int posix = -1, ofd = -1, fl = -1, lease = -1;
    if (strstr(argv[2], "posix")) {
        posix = make("posix", O_RDWR);
        struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 10};
        if (fcntl(posix, F_SETLK, &l))
            die("F_SETLK");
    }
    if (strstr(argv[2], "ofd")) {
        ofd = make("ofd", O_RDWR);
        struct flock l = {.l_type = F_RDLCK, .l_whence = SEEK_SET};
        if (fcntl(ofd, F_OFD_SETLK, &l))
            die("F_OFD_SETLK");
    }
    if (strstr(argv[2], "flock")) {
        fl = make("flock", O_RDWR);
        if (flock(fl, LOCK_EX))
            die("flock");
    }
    if (strstr(argv[2], "lease")) {
        lease = make("lease", O_RDONLY);
        if (fcntl(lease, F_SETLEASE, F_RDLCK))
            die("F_SETLEASE");
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        if (posix >= 0 && !fdinfo_has(posix, "POSIX  ADVISORY  WRITE")) {
            printf("BAD the POSIX lock is gone\n");
            return 1;
        }
        if (ofd >= 0) {
            int other = reopen("ofd");
            struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
            if (other < 0 || fcntl(other, F_OFD_GETLK, &l) || l.l_type != F_RDLCK) {
                printf("BAD the OFD lock is gone (%d)\n", l.l_type);
                return 1;
            }
            close(other);
        }
        if (fl >= 0) {
            int other = reopen("flock");
            if (other < 0 || flock(other, LOCK_SH | LOCK_NB) == 0 || errno != EWOULDBLOCK) {
                printf("BAD the flock is gone\n");
                return 1;
            }
            close(other);
        }
        if (lease >= 0 && fcntl(lease, F_GETLEASE) != F_RDLCK) {
            printf("BAD the lease is %d\n", fcntl(lease, F_GETLEASE));
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
