/* threadcreds: a zdtm-like self-checking workload for credentials that are not the same in
 * every thread. Run as root. One thread changes its own uids and gids with the raw system
 * calls (glibc's setuid() would change every thread's), another its file system uid and gid
 * only; the main thread keeps root. Each thread reads its own ids (getresuid, getresgid,
 * setfsuid(-1), setfsgid(-1)) every millisecond; every 2 ms the main thread checks them all
 * and prints "it=N ok" every 100 checks, or "BAD what" and exits. (Not /proc: restored in a
 * new pid namespace, the tree still sees this host's /proc.) */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct ids {
    volatile unsigned r, e, s, fs;
    volatile unsigned gr, ge, gs, gfs;
};

static struct ids seen[3];
static pthread_barrier_t ready;

static void look(struct ids *out)
{
    unsigned r, e, s;
    syscall(SYS_getresuid, &r, &e, &s);
    out->r = r, out->e = e, out->s = s;
    out->fs = (unsigned)syscall(SYS_setfsuid, -1);     /* -1: no change, returns the current */
    syscall(SYS_getresgid, &r, &e, &s);
    out->gr = r, out->ge = e, out->gs = s;
    out->gfs = (unsigned)syscall(SYS_setfsgid, -1);
}

static void *thread(void *arg)
{
    long which = (long)arg;
    if (which == 1 && (syscall(SYS_setresgid, 4343, 4343, 4343) ||
                       syscall(SYS_setresuid, 4242, 4242, 4242))) {
        perror("setres*id");
        exit(2);
    }
    if (which == 2) {
        syscall(SYS_setfsgid, 5353);
        syscall(SYS_setfsuid, 5252);
    }
    look(&seen[which]);
    pthread_barrier_wait(&ready);
    struct timespec ts = {0, 1000 * 1000};
    for (;;) {
        look(&seen[which]);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static int expect(int which, unsigned uid, unsigned fsuid, unsigned gid, unsigned fsgid)
{
    struct ids *i = &seen[which];
    if (i->r != uid || i->e != uid || i->s != uid || i->fs != fsuid || i->gr != gid ||
        i->ge != gid || i->gs != gid || i->gfs != fsgid) {
        printf("BAD thread %d: uids %u %u %u fs %u gids %u %u %u fs %u\n", which, i->r, i->e,
               i->s, i->fs, i->gr, i->ge, i->gs, i->gfs);
        return 0;
    }
    return 1;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    pthread_barrier_init(&ready, NULL, 3);
    pthread_t t;
    pthread_create(&t, NULL, thread, (void *)1L);
    pthread_create(&t, NULL, thread, (void *)2L);
    pthread_barrier_wait(&ready);
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        look(&seen[0]);
        if (!expect(0, 0, 0, 0, 0) || !expect(1, 4242, 4242, 4343, 4343) ||
            !expect(2, 0, 5252, 0, 5353))
            return 1;
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
