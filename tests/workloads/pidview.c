/* pidview: a zdtm-like self-checking workload for what a process sees of pids in /proc.
 *
 * Forks two children. Every 2 ms the parent checks, through /proc (the procfs mounted on
 * /proc, as every program reads it): /proc/self is its pid; /proc/self/status says Pid and
 * NSpid = getpid() (one level: that /proc is of its own pid namespace); /proc/<child>/stat of
 * each child names that child, its parent (getpid()) and the child's name; /proc/<child>/status
 * NSpid is the child's pid. Each child checks its own /proc/self and NSpid, and that
 * /proc/<getppid()>/stat is its parent. Every 100 checks the parent prints "it=N ok" (an
 * unmigrated run prints the same), or "BAD what" and exits (a child prints BAD and exits;
 * the parent notices that it ended). The pids themselves are not printed: an unmigrated
 * run has others. Restored into a new pid namespace (pid taken on this host), a tree with
 * the host's /proc would see another process at /proc/<child> and the host's pid at
 * /proc/self. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void bad(const char *what, long a, long b)
{
    printf("BAD %s (%ld, %ld)\n", what, a, b);
    fflush(stdout);
    exit(1);
}

/* the value of "Key:" in /proc/<who>/status, who "self" or a pid; -1 if missing, -2 if it
 * has more than one number */
static long status_field(const char *who, const char *key)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%s/status", who);
    FILE *f = fopen(path, "r");
    long v = -1;
    if (!f)
        return -1;
    size_t n = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, n) == 0 && line[n] == ':') {
            char *end;
            v = strtol(line + n + 1, &end, 10);
            while (*end == ' ' || *end == '\t')
                end++;
            if (*end != '\n' && *end != 0)
                v = -2;
        }
    }
    fclose(f);
    return v;
}

static long self_link(void)
{
    char buf[64];
    ssize_t n = readlink("/proc/self", buf, sizeof buf - 1);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return strtol(buf, NULL, 10);
}

/* /proc/<pid>/stat: its pid, name and parent; 0 if all match */
static int stat_is(pid_t pid, const char *comm, pid_t ppid)
{
    char path[64], name[64];
    int p, pp;
    char state;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int n = fscanf(f, "%d (%63[^)]) %c %d", &p, name, &state, &pp);
    fclose(f);
    return n == 4 && p == pid && strcmp(name, comm) == 0 && (ppid < 0 || pp == ppid) ? 0 : -2;
}

static void check_self(void)
{
    long me = getpid();
    if (self_link() != me)
        bad("/proc/self is not me", self_link(), me);
    if (status_field("self", "Pid") != me)
        bad("/proc/self/status Pid", status_field("self", "Pid"), me);
    if (status_field("self", "NSpid") != me)
        bad("/proc/self/status NSpid", status_field("self", "NSpid"), me);
}

int main(void)
{
    struct timespec ts = {0, 2000000};
    pid_t kids[2];
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t parent = getpid();
    for (int i = 0; i < 2; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(0);
            prctl(PR_SET_NAME, i ? "pidview-kid1" : "pidview-kid0");
            for (;;) {
                check_self();
                if (stat_is(getppid(), "pidview", -1) != 0 ||
                    status_field("self", "PPid") != getppid())
                    bad("child: /proc/<parent> is not my parent", getppid(), 0);
                nanosleep(&ts, NULL);
            }
        }
    }
    printf("start pid=%d\n", getpid());
    for (long it = 1;; it++) {
        int status;
        check_self();
        for (int i = 0; i < 2; i++) {
            char who[16];
            snprintf(who, sizeof who, "%d", kids[i]);
            if (waitpid(kids[i], &status, WNOHANG) != 0)
                bad("a child ended", i, kids[i]);
            /* its name is set right after fork: only a name that is another's is wrong */
            int s = stat_is(kids[i], i ? "pidview-kid1" : "pidview-kid0", getpid());
            if (s != 0 && !(it < 50 && stat_is(kids[i], "pidview", getpid()) == 0))
                bad("/proc/<child>/stat is not my child", i, kids[i]);
            if (status_field(who, "NSpid") != kids[i])
                bad("/proc/<child>/status NSpid", status_field(who, "NSpid"), kids[i]);
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
