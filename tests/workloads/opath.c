/* opath: a zdtm-like self-checking workload for O_PATH descriptors.
 *
 * In the directory argv[1] it makes a file, a symlink to it, a subdirectory and a FIFO, and
 * holds O_PATH fds of: the file (close-on-exec), the symlink itself (O_PATH|O_NOFOLLOW),
 * the subdirectory (O_PATH|O_DIRECTORY), the FIFO, /dev/null, and the file through the
 * symlink; with a second argument "deleted", of a file deleted since. Every 2 ms it checks each fd: its flags (F_GETFL) and close-on-exec as they were,
 * fstat the inode of its path (lstat for the symlink), the symlink's target read through its
 * fd (readlinkat ""), a file reached through the directory fd (openat); every 100 checks it
 * prints "it=N ok", or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct held {
    const char *name;
    char path[4096];
    int flags, fd, getfl, getfd;
};

static void die(const char *what)
{
    printf("BAD setup %s: %s\n", what, strerror(errno));
    exit(2);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2)
        return 2;
    char p[4096];
    snprintf(p, sizeof p, "%s/file", argv[1]);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0640);
    if (fd < 0 || write(fd, "data\n", 5) != 5)
        die("file");
    close(fd);
    snprintf(p, sizeof p, "%s/link", argv[1]);
    unlink(p);
    if (symlink("file", p))
        die("symlink");
    snprintf(p, sizeof p, "%s/sub", argv[1]);
    if (mkdir(p, 0750) && errno != EEXIST)
        die("mkdir");
    snprintf(p, sizeof p, "%s/sub/inside", argv[1]);
    fd = open(p, O_WRONLY | O_CREAT, 0600);
    if (fd < 0)
        die("sub/inside");
    close(fd);
    snprintf(p, sizeof p, "%s/fifo", argv[1]);
    if (mkfifo(p, 0600) && errno != EEXIST)
        die("mkfifo");
    struct held h[] = {
        {"file", "", O_PATH | O_CLOEXEC},
        {"link", "", O_PATH | O_NOFOLLOW},
        {"sub", "", O_PATH | O_DIRECTORY},
        {"fifo", "", O_PATH},
        {"/dev/null", "", O_PATH},
        {"link", "", O_PATH},            /* follows it: the file */
    };
    int n = sizeof h / sizeof h[0];
    for (int i = 0; i < n; i++) {
        if (h[i].name[0] == '/')
            snprintf(h[i].path, sizeof h[i].path, "%s", h[i].name);
        else
            snprintf(h[i].path, sizeof h[i].path, "%s/%s", argv[1], h[i].name);
        h[i].fd = open(h[i].path, h[i].flags);
        if (h[i].fd < 0)
            die(h[i].path);
        h[i].getfl = fcntl(h[i].fd, F_GETFL);
        h[i].getfd = fcntl(h[i].fd, F_GETFD);
    }
    int gone = -1, gone_fl = 0;
    if (argc > 2 && !strcmp(argv[2], "deleted")) {
        /* an O_PATH fd of a file deleted since: no path to open it again by */
        snprintf(p, sizeof p, "%s/gone", argv[1]);
        fd = open(p, O_WRONLY | O_CREAT, 0600);
        gone = open(p, O_PATH);
        if (fd < 0 || gone < 0 || unlink(p))
            die("gone");
        close(fd);
        gone_fl = fcntl(gone, F_GETFL);
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        for (int i = 0; i < n; i++) {
            struct stat a, b;
            int fl = fcntl(h[i].fd, F_GETFL), fdf = fcntl(h[i].fd, F_GETFD);
            if (fl != h[i].getfl || fdf != h[i].getfd) {
                printf("BAD fd %d (%s): flags %#o fd flags %d, want %#o %d\n", h[i].fd,
                       h[i].name, fl, fdf, h[i].getfl, h[i].getfd);
                return 1;
            }
            int there = (h[i].flags & O_NOFOLLOW) ? lstat(h[i].path, &a) : stat(h[i].path, &a);
            if (there || fstat(h[i].fd, &b) || a.st_ino != b.st_ino || a.st_dev != b.st_dev ||
                (a.st_mode & S_IFMT) != (b.st_mode & S_IFMT)) {
                printf("BAD fd %d (%s) is not the inode of its path\n", h[i].fd, h[i].name);
                return 1;
            }
        }
        struct stat g;
        if (gone >= 0 && (fcntl(gone, F_GETFL) != gone_fl || fstat(gone, &g) || g.st_nlink)) {
            printf("BAD the deleted file's O_PATH fd\n");
            return 1;
        }
        char target[64] = {0};
        if (readlinkat(h[1].fd, "", target, sizeof target - 1) != 4 || strcmp(target, "file")) {
            printf("BAD the symlink's fd reads '%s'\n", target);
            return 1;
        }
        int inside = openat(h[2].fd, "inside", O_RDONLY);
        if (inside < 0) {
            printf("BAD openat through the directory's fd: %s\n", strerror(errno));
            return 1;
        }
        close(inside);
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
