/* cgroups: a zdtm-like self-checking workload for cgroup v2 membership.
 *
 * Usage: cgroups PARENT_DIR PARENT_PATH CHILD_DIR CHILD_PATH
 * The process puts itself into the cgroup v2 directory PARENT_DIR (whose path, as
 * /proc/self/cgroup shows it, is PARENT_PATH), then forks a child that puts itself into
 * CHILD_DIR (CHILD_PATH) and dies with its parent. Every 2 ms each checks its own
 * /proc/self/cgroup "0::" line (the child too, printing BAD and exiting if it changed); the
 * parent also checks that the child still runs. Every 100 checks the parent prints "it=N ok"
 * (a deterministic line: an unmigrated run prints the same), or "BAD what" and exits.
 * One other cgroup is taken: a restorer's gate (".../prerestore-gate-PID-PIDNS"), where a restored
 * tree runs for the few milliseconds between being let go all at once and being moved into
 * its own cgroups (README: cgroup membership); the test checks from outside that it ends in
 * its own. Env SUFFIX=1: a path that ends with PARENT_PATH (CHILD_PATH) is taken too (a tree
 * restored under another cgroup root, --cgroup-root). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void join(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int fd = open(path, O_WRONLY);
    if (fd < 0 || write(fd, "0", 1) != 1) {
        printf("BAD cannot join %s\n", dir);
        fflush(stdout);
        exit(1);
    }
    close(fd);
}

/* "0::.../prerestore-gate-PID-PIDNS\n" (digits and dashes) */
static int in_gate(const char *line)
{
    const char *g = strstr(line, "/prerestore-gate-");
    if (strncmp(line, "0::", 3) != 0 || !g)
        return 0;
    g += strlen("/prerestore-gate-");
    if (*g < '0' || *g > '9')
        return 0;
    while ((*g >= '0' && *g <= '9') || *g == '-')
        g++;
    return strcmp(g, "\n") == 0;
}

/* 1 if /proc/self/cgroup's v2 line names want (or a restorer's gate, for a moment) */
static int in_cgroup(const char *want)
{
    char buf[8192], line[4200];
    FILE *f = fopen("/proc/self/cgroup", "r");
    int ok = 0;
    if (!f)
        return 0;
    snprintf(line, sizeof line, "0::%s\n", want);
    size_t n = strlen(line);
    int suffix = getenv("SUFFIX") != NULL;
    while (fgets(buf, sizeof buf, f)) {
        size_t m = strlen(buf);
        if (strcmp(buf, line) == 0 || in_gate(buf) ||
            (suffix && strncmp(buf, "0::", 3) == 0 && m > n &&
             strcmp(buf + m - n + 3, line + 3) == 0))
            ok = 1;
    }
    fclose(f);
    return ok;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: cgroups PARENT_DIR PARENT_PATH CHILD_DIR CHILD_PATH\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec ts = {0, 2000000};
    join(argv[1]);
    pid_t parent = getpid();
    pid_t child = fork();
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        join(argv[3]);
        for (;;) {
            if (!in_cgroup(argv[4])) {
                printf("BAD child not in cgroup %s\n", argv[4]);
                _exit(1);
            }
            nanosleep(&ts, NULL);
        }
    }
    printf("start pid=%d\n", getpid());
    for (long it = 1;; it++) {
        int status;
        if (!in_cgroup(argv[2])) {
            printf("BAD parent not in cgroup %s\n", argv[2]);
            return 1;
        }
        if (waitpid(child, &status, WNOHANG) != 0) {
            printf("BAD child ended\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
