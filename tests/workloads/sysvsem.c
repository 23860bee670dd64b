/* sysvsem: a zdtm-like self-checking workload for System V semaphores. Run as root.
 *
 * Usage: sysvsem own|undo
 *   own   unshare(CLONE_NEWIPC) first (an IPC namespace of its own, as a container).
 *   undo  the same, and the child also makes one operation with SEM_UNDO (an adjustment the
 *         kernel shows nowhere: such a tree is refused).
 *
 * Set S (a key, mode 0660, owner changed to 1234:2345 with IPC_SET) holds 3 semaphores:
 * [0] counts what the child posts (+1 every millisecond) and the parent takes (-1, waiting
 * in semop for it), [1] = 7 and [2] = 1234 never change. Set T (IPC_PRIVATE, mode 0600,
 * made by uid 4242 gid 4343) holds one semaphore, 3. Both count in shared memory what they
 * posted and took: posted - taken - S[0] is 0 or 1 (the child counts just before it posts).
 * The parent checks every iteration through the ids it holds (semctl IPC_STAT, GETVAL) each
 * set's key, mode, owner, creator, size and values, and that semget finds S by its key;
 * prints "it=N ok" every 100 iterations, or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KEY_S 0x5eed0101

union semun {
    int val;
    struct semid_ds *buf;
    unsigned short *array;
};

static void bad(const char *what)
{
    printf("BAD %s\n", what);
    fflush(stdout);
    exit(1);
}

static void check(int id, key_t key, int mode, uid_t uid, gid_t gid, uid_t cuid, gid_t cgid,
                  unsigned long nsems, const char *name)
{
    struct semid_ds ds;
    char what[160];
    union semun arg = {.buf = &ds};
    if (semctl(id, 0, IPC_STAT, arg) != 0) {
        snprintf(what, sizeof what, "set %s: semctl(IPC_STAT, %d) failed", name, id);
        bad(what);
    }
    if (ds.sem_perm.__key != key || (ds.sem_perm.mode & 0777) != mode ||
        ds.sem_perm.uid != uid || ds.sem_perm.gid != gid || ds.sem_perm.cuid != cuid ||
        ds.sem_perm.cgid != cgid || ds.sem_nsems != nsems) {
        snprintf(what, sizeof what, "set %s (id %d): key %x mode %o uid %u gid %u cuid %u "
                 "cgid %u nsems %lu", name, id, ds.sem_perm.__key, ds.sem_perm.mode,
                 ds.sem_perm.uid, ds.sem_perm.gid, ds.sem_perm.cuid, ds.sem_perm.cgid,
                 (unsigned long)ds.sem_nsems);
        bad(what);
    }
}

static void op(int id, int num, int delta, int flags)
{
    struct sembuf sb = {(unsigned short)num, (short)delta, (short)flags};
    while (semop(id, &sb, 1) != 0) {
        if (errno == EINTR)
            continue;
        perror("semop");
        exit(2);
    }
}

static void tick(void)
{
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
}

struct counts {
    volatile uint64_t posted, taken;
};

int main(int argc, char **argv)
{
    int undo = argc > 1 && strcmp(argv[1], "undo") == 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("start pid=%d\n", getpid());
    if (unshare(CLONE_NEWIPC) != 0) {
        perror("unshare(CLONE_NEWIPC)");
        return 2;
    }
    int s = semget(KEY_S, 3, IPC_CREAT | IPC_EXCL | 0660);
    unsigned short init[3] = {0, 7, 1234};
    union semun arg = {.array = init};
    struct semid_ds ds;
    if (s < 0 || semctl(s, 0, SETALL, arg) != 0) {
        perror("semget/SETALL");
        return 2;
    }
    arg.buf = &ds;
    semctl(s, 0, IPC_STAT, arg);
    ds.sem_perm.uid = 1234;
    ds.sem_perm.gid = 2345;
    if (semctl(s, 0, IPC_SET, arg) != 0) {
        perror("IPC_SET");
        return 2;
    }
    syscall(SYS_setresgid, -1, 4343, -1);
    syscall(SYS_setresuid, -1, 4242, -1);
    int t = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    syscall(SYS_setresuid, -1, 0, -1);
    syscall(SYS_setresgid, -1, 0, -1);
    arg.val = 3;
    if (t < 0 || semctl(t, 0, SETVAL, arg) != 0) {
        perror("semget T");
        return 2;
    }
    struct counts *c = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                            -1, 0);
    pid_t child = fork();
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (undo) {
            op(t, 0, -1, SEM_UNDO);         /* adjustment +1 on T, shown nowhere */
            op(t, 0, 1, 0);
        }
        for (;;) {
            c->posted++;
            op(s, 0, 1, 0);
            tick();
        }
    }
    for (uint64_t it = 1;; it++) {
        op(s, 0, -1, 0);                    /* waits for the child's post */
        c->taken++;
        uint64_t posted = c->posted, taken = c->taken;
        int v0 = semctl(s, 0, GETVAL), v1 = semctl(s, 1, GETVAL), v2 = semctl(s, 2, GETVAL);
        int vt = semctl(t, 0, GETVAL);
        uint64_t posted_after = c->posted;
        if (v1 != 7 || v2 != 1234 || vt != 3) {
            char what[96];
            snprintf(what, sizeof what, "values S %d %d %d T %d", v0, v1, v2, vt);
            bad(what);
        }
        if (posted < taken || (uint64_t)v0 + taken > posted_after ||
            (uint64_t)v0 + taken + 1 < posted) {
            char what[96];
            snprintf(what, sizeof what, "S[0] = %d: posted %llu taken %llu", v0,
                     (unsigned long long)posted, (unsigned long long)taken);
            bad(what);
        }
        check(s, KEY_S, 0660, 1234, 2345, 0, 0, 3, "S");
        check(t, IPC_PRIVATE, 0600, 4242, 4343, 4242, 4343, 1, "T");
        if (semget(KEY_S, 0, 0) != s)
            bad("semget(KEY_S) is not S");
        if (it % 100 == 0)
            printf("it=%llu ok\n", (unsigned long long)it);
    }
}
