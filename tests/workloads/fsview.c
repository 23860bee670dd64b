/* fsview: a zdtm-like self-checking workload for a process's root and working directories.
 *
 * Usage: fsview MODE DIR   (DIR: an existing directory of the test's own)
 *   chroot        root DIR/jail (holding a file "marker"), working directory DIR/jail/sub
 *   deleted-cwd   working directory DIR/gone (mode 0751), removed
 *   deleted-root  root and working directory DIR/gone-root (mode 0750), removed
 *   chroot-outside  root DIR/jail, working directory DIR itself (outside the root: chroot
 *                   without chdir)
 *   chroot-socket   as chroot, holding a unix datagram socket bound to /sock (DIR/jail/sock)
 *   dir-pos         a directory fd (DIR/many, 64 files) read part of the way: its position
 *                   stays, and the entry read from it next is the same one
 * Every 2 ms it checks that the view is the one it set up (the inodes of / and . and ..
 * where they can be named, getcwd, the marker's content, that a deleted directory is still
 * deleted, with its mode), and every 100 checks prints "it=N ok" (deterministic), or
 * "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
static struct stat parent0, jail0;
static int sock = -1;
static int dfd = -1;
static off_t dir_pos;
static char next_name[64];

/* the name of the next entry of dfd (one per call: the buffer holds one) */
static int next_entry(char *name, size_t size)
{
    char buf[32];
    long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
    if (n <= 0)
        return 0;
    snprintf(name, size, "%s", buf + 19);       /* d_ino 8, d_off 8, d_reclen 2, d_type 1 */
    return 1;
}

static int same(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

static int check(void)
{
    struct stat root, dot, dotdot;
    char cwd[4096];
    if (stat("/", &root) || stat(".", &dot) || stat("..", &dotdot)) {
        printf("BAD stat: %s\n", strerror(errno));
        return 0;
    }
    /* the system call: glibc's getcwd falls back to walking up the tree with open
       directories when the kernel says "(unreachable)" */
    long n = syscall(SYS_getcwd, cwd, sizeof cwd);
    char *got = n > 0 ? cwd : NULL;
    if (dfd >= 0) {
        char name[64];
        off_t pos = lseek(dfd, 0, SEEK_CUR);
        if (pos != dir_pos || !next_entry(name, sizeof name) || strcmp(name, next_name) ||
            lseek(dfd, dir_pos, SEEK_SET) != dir_pos) {
            printf("BAD directory fd at %lld (want %lld), next entry %s (want %s)\n",
                   (long long)pos, (long long)dir_pos, name, next_name);
            return 0;
        }
        return 1;
    }
    if (sock >= 0) {
        struct sockaddr_un sun;
        socklen_t len = sizeof sun;
        if (getsockname(sock, (struct sockaddr *)&sun, &len) || strcmp(sun.sun_path, "/sock")) {
            printf("BAD socket name %s\n", sun.sun_path);
            return 0;
        }
    }
    if (!strncmp(mode, "chroot", 6) && strcmp(mode, "chroot-outside")) {
        char buf[16] = {0};
        int fd = open("/marker", O_RDONLY);
        if (fd < 0 || read(fd, buf, sizeof buf - 1) < 0 || strcmp(buf, "jail")) {
            printf("BAD /marker: %s (%s)\n", buf, fd < 0 ? strerror(errno) : "read");
            return 0;
        }
        close(fd);
        if (!got || strcmp(cwd, "/sub")) {
            printf("BAD getcwd %s\n", got ? cwd : strerror(errno));
            return 0;
        }
        if (!same(&root, &jail0) || !same(&dotdot, &jail0)) {
            printf("BAD root or .. is not the jail\n");
            return 0;
        }
    } else if (!strcmp(mode, "chroot-outside")) {
        /* the working directory is outside the root: getcwd says so */
        if (n <= 0 || strncmp(cwd, "(unreachable)", 13)) {
            printf("BAD getcwd outside the root: %s\n", n > 0 ? cwd : strerror(errno));
            return 0;
        }
        if (!same(&root, &jail0) || !same(&dot, &parent0)) {
            printf("BAD root or . moved\n");
            return 0;
        }
    } else {
        int in_root = !strcmp(mode, "deleted-root");
        struct stat *gone = in_root ? &root : &dot;
        if (gone->st_nlink != 0 || !S_ISDIR(gone->st_mode) ||
            (gone->st_mode & 07777) != (in_root ? 0750u : 0751u)) {
            printf("BAD deleted dir: nlink %lu mode %o\n", (unsigned long)gone->st_nlink,
                   gone->st_mode);
            return 0;
        }
        if (n >= 0 || errno != ENOENT) {
            printf("BAD getcwd of a deleted dir: %s\n", n >= 0 ? cwd : strerror(errno));
            return 0;
        }
        /* .. of the deleted working directory is where it was; a root's .. is itself */
        if (!same(&dotdot, in_root ? &root : &parent0) || (in_root && !same(&dot, &root))) {
            printf("BAD .. of the deleted dir moved\n");
            return 0;
        }
        if (open("x", O_CREAT | O_WRONLY, 0600) >= 0 || errno != ENOENT) {
            printf("BAD a file could be made in a deleted dir\n");
            return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 3) {
        fprintf(stderr, "usage: fsview MODE DIR\n");
        return 2;
    }
    mode = argv[1];
    if (chdir(argv[2]) || stat(".", &parent0)) {
        perror(argv[2]);
        return 2;
    }
    if (!strcmp(mode, "dir-pos")) {
        char name[64];
        mkdir("many", 0755);
        for (int i = 0; i < 64; i++) {
            snprintf(name, sizeof name, "many/f%02d", i);
            close(open(name, O_CREAT | O_WRONLY, 0644));
        }
        dfd = open("many", O_RDONLY | O_DIRECTORY);
        for (int i = 0; i < 20; i++)
            if (dfd < 0 || !next_entry(name, sizeof name)) {
                perror("many");
                return 2;
            }
        dir_pos = lseek(dfd, 0, SEEK_CUR);
        if (!next_entry(next_name, sizeof next_name) || lseek(dfd, dir_pos, SEEK_SET) != dir_pos) {
            perror("getdents");
            return 2;
        }
    } else if (!strncmp(mode, "chroot", 6)) {
        mkdir("jail", 0755);
        mkdir("jail/sub", 0755);
        int fd = open("jail/marker", O_CREAT | O_TRUNC | O_WRONLY, 0644);
        if (fd < 0 || write(fd, "jail", 4) != 4 || close(fd) || stat("jail", &jail0)) {
            perror("jail");
            return 2;
        }
        if (strcmp(mode, "chroot-outside") ? chdir("jail/sub") || chroot("..") : chroot("jail")) {
            perror("chroot");
            return 2;
        }
        if (!strcmp(mode, "chroot-socket")) {
            struct sockaddr_un sun = {.sun_family = AF_UNIX, .sun_path = "/sock"};
            unlink("/sock");
            sock = socket(AF_UNIX, SOCK_DGRAM, 0);
            if (sock < 0 || bind(sock, (struct sockaddr *)&sun, sizeof sun)) {
                perror("bind");
                return 2;
            }
        }
    } else {
        int in_root = !strcmp(mode, "deleted-root");
        const char *name = in_root ? "gone-root" : "gone";
        rmdir(name);
        /* its parent, held to remove it by: a chroot's .. is the root itself */
        int parent = open(".", O_RDONLY | O_DIRECTORY);
        if (parent < 0 || mkdir(name, 0700) || chmod(name, in_root ? 0750 : 0751) ||
            chdir(name)) {
            perror(name);
            return 2;
        }
        if (in_root && chroot(".")) {
            perror("chroot");
            return 2;
        }
        if (unlinkat(parent, name, AT_REMOVEDIR) || close(parent)) {
            perror("rmdir");
            return 2;
        }
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        if (!check())
            return 1;
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
