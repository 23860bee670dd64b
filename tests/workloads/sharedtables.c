/* sharedtables: a zdtm-like self-checking workload for processes sharing their fd table
 * (clone CLONE_FILES) or their file system information (clone CLONE_FS: working directory,
 * root, umask), which are not threads.
 *
 * Usage: sharedtables MODE DIR   (DIR: an existing directory of the test's own)
 *   processes       the main process P, a child F made with CLONE_FILES and a child S made
 *                   with CLONE_FS, in lockstep with P over pipes. Each step F puts an fd at
 *                   a new number, which P must see and closes, and F must see closed; S
 *                   changes directory (DIR/a or DIR/b) and umask, which P must see.
 *   processes-chroot  the same in a chroot (DIR): S's directories are /a and /b
 *   thread-unshare  a thread that made its own fd table and fs (unshare CLONE_FILES|CLONE_FS)
 *   orphan-share    a child B made with CLONE_FILES makes D with CLONE_FILES, then leaves the
 *                   table (unshare): P and D share one, though D's parent B does not
 * Every 2 ms a step; every 100 steps P prints "it=N ok" (deterministic), or "BAD what" and
 * everything exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int pf[2], fp[2], ps[2], sp[2];
static struct stat dirs[2];

static pid_t clone_child(unsigned long flags)
{
    /* without CLONE_VM clone returns twice like fork, on a copy of the stack */
    return (pid_t)syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
}

static void get(int fd, long *k)
{
    if (read(fd, k, sizeof *k) != sizeof *k)
        exit(0);                       /* the other side is gone */
}

static void files_child(void)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
        long k;
        get(pf[0], &k);
        if (k > 1 && (fcntl(200 + (int)((k - 1) % 10), F_GETFD) != -1 || errno != EBADF)) {
            printf("BAD F: fd %ld is still open here after P closed it\n", 200 + (k - 1) % 10);
            exit(1);
        }
        if (dup2(pf[0], 200 + (int)(k % 10)) < 0) {
            printf("BAD F: dup2 %s\n", strerror(errno));
            exit(1);
        }
        write(fp[1], &k, sizeof k);
    }
}

static char base[4096];

static void fs_child(void)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
        long k;
        char path[4200];
        get(ps[0], &k);
        snprintf(path, sizeof path, "%s/%s", base, k % 2 ? "b" : "a");
        if (chdir(path)) {
            printf("BAD S: chdir %s: %s\n", path, strerror(errno));
            exit(1);
        }
        umask(k % 2 ? 027 : 022);
        write(sp[1], &k, sizeof k);
    }
}

static int step(long k)
{
    long r;
    write(pf[1], &k, sizeof k);
    get(fp[0], &r);
    int fd = 200 + (int)(k % 10);
    struct stat a, b;
    if (r != k || fstat(fd, &a) || fstat(pf[0], &b) || a.st_ino != b.st_ino) {
        printf("BAD P: the fd F put at %d is not here (%s)\n", fd, strerror(errno));
        return 0;
    }
    close(fd);
    write(ps[1], &k, sizeof k);
    get(sp[0], &r);
    struct stat dot;
    mode_t mask = umask(0);
    umask(mask);
    if (r != k || stat(".", &dot) || dot.st_ino != dirs[k % 2].st_ino ||
        mask != (mode_t)(k % 2 ? 027 : 022)) {
        printf("BAD P: S's directory or umask is not here (umask %o)\n", mask);
        return 0;
    }
    return 1;
}

static void *unshared_thread(void *arg)
{
    (void)arg;
    if (unshare(CLONE_FILES | CLONE_FS) || chdir("a")) {
        perror("unshare");
        exit(2);
    }
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 3 || chdir(argv[2]) || !realpath(".", base)) {
        fprintf(stderr, "usage: sharedtables MODE DIR\n");
        return 2;
    }
    mkdir("a", 0755);
    mkdir("b", 0755);
    if (stat("a", &dirs[0]) || stat("b", &dirs[1]))
        return 2;
    int stepping = !strncmp(argv[1], "processes", 9);
    if (!strcmp(argv[1], "processes-chroot")) {
        if (chroot("."))
            return 2;
        base[0] = 0;
    }
    if (!strcmp(argv[1], "orphan-share")) {
        pid_t b = clone_child(CLONE_FILES);
        if (b == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (clone_child(CLONE_FILES) == 0) {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                for (;;)
                    pause();
            }
            if (unshare(CLONE_FILES))
                exit(2);
            for (;;)
                pause();
        }
    } else if (!strcmp(argv[1], "thread-unshare")) {
        pthread_t t;
        pthread_create(&t, NULL, unshared_thread, NULL);
    } else {
        if (pipe(pf) || pipe(fp) || pipe(ps) || pipe(sp))
            return 2;
        pid_t f = clone_child(CLONE_FILES);
        if (f == 0)
            files_child();
        pid_t s = clone_child(CLONE_FS);
        if (s == 0)
            fs_child();
        if (f < 0 || s < 0) {
            perror("clone");
            return 2;
        }
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        if (stepping && !step(it))
            return 1;
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
